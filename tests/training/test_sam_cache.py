"""SAM embedding cache: exact encoder output back, encoder skipped on a hit, safe on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fclm.config import preset
from fclm.training.sam_cache import SamEmbeddingCache, encoder_fingerprint, open_cache_for


class CountingEncoder:
    def __init__(self, encode):
        self.encode = encode
        self.calls: list[int] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.shape[0])
        return self.encode(images)


@pytest.fixture(scope="module")
def sam():
    from fclm.model.sam import build_sam

    torch.manual_seed(0)
    return build_sam(preset("tiny").sam).eval()


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 112, 112, generator=g)


def test_hits_return_the_encoders_exact_output_without_running_it(sam, tmp_path: Path):
    cache = open_cache_for(type("M", (), {"sam": sam})(), tmp_path)
    enc = CountingEncoder(sam.encode)
    images = _images(3, 0)
    keys = ["a", "b", "c"]
    first = cache.lookup_or_compute(keys, images, enc)
    reference = sam.encode(images)
    assert torch.equal(first, reference)
    assert enc.calls == [3]
    # all hits: the encoder is not called, the values are bit-identical
    again = cache.lookup_or_compute(keys, images, enc)
    assert enc.calls == [3] and torch.equal(again, reference)
    # partial hit: only the new image is encoded; order kept
    more = torch.cat([images[1:2], _images(1, 1)])
    mixed = cache.lookup_or_compute(["b", "d"], more, enc)
    assert enc.calls == [3, 1]
    assert torch.equal(mixed[0], reference[1])
    assert torch.equal(mixed[1:], sam.encode(more[1:]))  # encoded alone, as the cache did
    assert (cache.hits, cache.misses) == (3 + 1, 3 + 1)
    # another process / a later stage opens the same folder and reads from disk
    reopened = open_cache_for(type("M", (), {"sam": sam})(), tmp_path)
    assert reopened.dir == cache.dir and len(reopened) == 4
    got, missing = reopened.get(["c", "d", "zzz"])
    assert missing == [2] and torch.equal(got[0], reference[2]) and torch.equal(got[1], mixed[1])


def test_caches_of_different_encoders_never_mix(sam, tmp_path: Path):
    from fclm.model.sam import build_sam

    torch.manual_seed(1)
    other = build_sam(preset("tiny").sam).eval()
    assert encoder_fingerprint(other.image_encoder) != encoder_fingerprint(sam.image_encoder)
    a = open_cache_for(type("M", (), {"sam": sam})(), tmp_path)
    b = open_cache_for(type("M", (), {"sam": other})(), tmp_path)
    assert a.dir != b.dir
    images = _images(1, 2)
    a.lookup_or_compute(["k"], images, sam.encode)
    enc = CountingEncoder(other.encode)
    out = b.lookup_or_compute(["k"], images, enc)
    assert enc.calls == [1] and torch.equal(out, other.encode(images))
    assert not torch.allclose(out, a.get(["k"])[0][0][None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_round_trip_bit_exactly(tmp_path: Path, dtype: torch.dtype):
    cache = SamEmbeddingCache(tmp_path, "fp", (4, 2, 2), dtype)
    values = (torch.randn(300, 4, 2, 2) * 1e3).to(dtype)  # > one growth chunk of slots
    cache.put([f"k{i}" for i in range(300)], values)
    got, missing = SamEmbeddingCache(tmp_path, "fp", (4, 2, 2), dtype).get([f"k{i}" for i in range(300)])
    assert not missing
    assert torch.equal(torch.stack(got).view(torch.int16 if dtype != torch.float32 else torch.int32),
                       values.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_a_put_killed_before_its_index_write_leaves_a_consistent_cache(tmp_path: Path, monkeypatch):
    import fclm.training.sam_cache as sc

    cache = SamEmbeddingCache(tmp_path, "fp", (2, 1, 1))
    cache.put(["old"], torch.tensor([[[[1.0]], [[2.0]]]]))
    real = sc._write_json

    def die_on_index(path, obj):
        if path.parent.name == "index":
            raise KeyboardInterrupt("killed")
        real(path, obj)

    monkeypatch.setattr(sc, "_write_json", die_on_index)
    with pytest.raises(KeyboardInterrupt):
        cache.put(["new"], torch.tensor([[[[7.0]], [[8.0]]]]))
    monkeypatch.setattr(sc, "_write_json", real)
    fresh = SamEmbeddingCache(tmp_path, "fp", (2, 1, 1))
    got, missing = fresh.get(["old", "new"])
    assert missing == [1] and got[0].flatten().tolist() == [1.0, 2.0]
    fresh.put(["new"], torch.tensor([[[[5.0]], [[6.0]]]]))
    got, missing = SamEmbeddingCache(tmp_path, "fp", (2, 1, 1)).get(["old", "new"])
    assert not missing and got[0].flatten().tolist() == [1.0, 2.0] and got[1].flatten().tolist() == [5.0, 6.0]
    with pytest.raises(ValueError, match="holds"):
        SamEmbeddingCache(tmp_path, "fp", (3, 1, 1))


def test_model_forward_on_cached_embeddings_equals_forward_with_encoder(shapes_dir: Path, tmp_path: Path):
    """The real model on a real collator batch: cache hits give the same outputs, and SAM's encoder never runs."""
    from fclm.data import JsonlDataset
    from fclm.data.collator import FCLMCollator
    from fclm.model import build_fclm

    torch.manual_seed(0)
    model = build_fclm(preset("tiny")).eval()
    records = [JsonlDataset(shapes_dir / f"train_{t}.jsonl")[i] for t in ("region_caption", "res") for i in range(2)]
    batch = FCLMCollator(model.processor)(records)
    assert batch["region_crops"].shape[0] > 0
    with torch.no_grad():
        plain = model(dict(batch))
    cache = open_cache_for(model, tmp_path)
    cache.fill_batch(batch, model.sam.encode)  # fill (misses)
    cached = dict(batch)
    for k in ("sam_image_embeddings", "region_crop_embeddings"):
        cached.pop(k)
    calls = []
    handle = model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        cache.fill_batch(cached, model.sam.encode)  # all hits
        with torch.no_grad():
            out = model(cached)
    finally:
        handle.remove()
    assert calls == [], "the SAM image encoder ran although every embedding was cached"
    assert cache.hits == len(batch["image_keys"]) + len(batch["region_crop_keys"])
    for key in ("logits", "pred_recon_masks", "seg_embeddings", "pos_embeddings"):
        assert torch.equal(out[key], plain[key]), key
    assert torch.equal(out["heads"]["sam"]["pred_masks"], plain["heads"]["sam"]["pred_masks"])

"""On-disk cache of SAM image-encoder embeddings, memory-mapped, shared by epochs, stages and processes.

The SAM image encoder is frozen in both training stages, so the embedding of an image (or of a
region crop) depends only on the image bytes, the SAM preprocessing and the encoder's weights. The
collator names the first two in ``batch["image_keys"]`` / ``batch["region_crop_keys"]``; the cache
adds the third by living in a sub-folder named after a hash of the encoder's weights
(:func:`encoder_fingerprint`) and output dtype. :meth:`SamEmbeddingCache.fill_batch` looks every key up, runs the
encoder only on the misses, stores them, and sets ``batch["sam_image_embeddings"]`` /
``batch["region_crop_embeddings"]`` so that ``FCLM.forward`` skips the encoder.

Layout of one cache folder::

    meta.json             shape (C, h, w) and dtype of one entry, the encoder fingerprint
    data.bin              entries back to back (numpy memmap, grown in chunks)
    alloc.json            number of slots handed out
    index/xx.json         key → slot, 256 shards by the first byte of sha1(key)
    lock                  fcntl lock file (several processes may fill one cache)

Writes are ordered so that a run killed at any point leaves a usable cache: the entry's bytes are
written first (into the shared memory map), then ``alloc.json``, then the index shard (each JSON written to a
temporary file and renamed over the old one). An entry is visible only once its shard names it; a
slot that was written but never indexed is simply handed out again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch


logger = logging.getLogger(__name__)

_STORAGE = {
    # torch dtype → (numpy dtype of the stored bytes, name)
    torch.float32: (np.float32, "float32"),
    torch.float16: (np.float16, "float16"),
    torch.bfloat16: (np.uint16, "bfloat16"),  # numpy has no bfloat16: store the raw 16 bits
}
_BY_NAME = {name: (np_dtype, tdtype) for tdtype, (np_dtype, name) in _STORAGE.items()}
_GROW_ENTRIES = 256


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the encoder's parameters and buffers (hex, 16 chars)."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _write_json(path: Path, obj: object) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it over ``path``.

    No fsync: the rename makes the write atomic for a killed process (the data is in the page
    cache); durability across a power cut is not needed for a cache that can be recomputed.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _shard_of(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:2]


class SamEmbeddingCache:
    """Key → one SAM embedding (C×h×w), stored in ``root/<fingerprint>/``.

    Arguments:
        root: cache root folder (created if needed).
        fingerprint: identifies the encoder (:func:`encoder_fingerprint`); caches of different
            encoders never mix.
        shape: (C, h, w) of one embedding.
        dtype: torch dtype of the embeddings (float32, float16 or bfloat16), stored bit-exactly.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str, shape: Sequence[int], dtype: torch.dtype = torch.float32):
        if dtype not in _STORAGE:
            raise ValueError(f"SAM cache: unsupported dtype {dtype}")
        self.dir = Path(root) / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "index").mkdir(exist_ok=True)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.np_dtype, name = _STORAGE[dtype]
        self.entry_elems = int(np.prod(self.shape))
        self.entry_bytes = self.entry_elems * np.dtype(self.np_dtype).itemsize
        meta = {"shape": list(self.shape), "dtype": name, "fingerprint": fingerprint, "format_version": 1}
        meta_file = self.dir / "meta.json"
        with self._locked():
            if meta_file.is_file():
                old = json.loads(meta_file.read_text())
                if old != meta:
                    raise ValueError(f"SAM cache {self.dir} holds {old}, not {meta}; use another sam_cache.dir")
            else:
                _write_json(meta_file, meta)
            (self.dir / "data.bin").touch(exist_ok=True)
        self._shards: dict[str, dict[str, int]] = {}
        self._mm: np.memmap | None = None
        self.hits = 0
        self.misses = 0

    # -- low level -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.dir / "lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_shard(self, shard: str) -> dict[str, int]:
        path = self.dir / "index" / f"{shard}.json"
        table = json.loads(path.read_text()) if path.is_file() else {}
        self._shards[shard] = table
        return table

    def _slot(self, key: str) -> int | None:
        shard = _shard_of(key)
        table = self._shards.get(shard)
        if table is None or key not in table:
            table = self._read_shard(shard)  # another process may have added it
        return table.get(key)

    def _memmap(self, need_slots: int) -> np.memmap:
        if self._mm is None or self._mm.shape[0] < need_slots:
            path = self.dir / "data.bin"
            slots = os.path.getsize(path) // self.entry_bytes
            if slots < need_slots:
                raise RuntimeError(f"SAM cache {path}: index names slot {need_slots - 1} but the file holds {slots}")
            self._mm = np.memmap(path, dtype=self.np_dtype, mode="r+", shape=(slots, *self.shape))
        return self._mm

    def __len__(self) -> int:
        n = 0
        for path in (self.dir / "index").glob("*.json"):
            n += len(json.loads(path.read_text()))
        return n

    # -- API ----------------------------------------------------------------------------------

    def get(self, keys: Sequence[str]) -> tuple[list[torch.Tensor | None], list[int]]:
        """Look ``keys`` up: (per key a CPU tensor C×h×w or ``None``, indices of the misses)."""
        found: list[torch.Tensor | None] = []
        missing: list[int] = []
        for i, key in enumerate(keys):
            slot = self._slot(key)
            if slot is None:
                found.append(None)
                missing.append(i)
                continue
            arr = np.array(self._memmap(slot + 1)[slot])  # copy out of the map
            t = torch.from_numpy(arr)
            found.append(t.view(self.dtype) if self.dtype == torch.bfloat16 else t)
        return found, missing

    def put(self, keys: Sequence[str], embeddings: torch.Tensor) -> None:
        """Store ``embeddings[i]`` (N×C×h×w) under ``keys[i]``; keys already present are left alone."""
        if embeddings.shape[1:] != self.shape or embeddings.dtype != self.dtype:
            raise ValueError(f"SAM cache expects (N,{self.shape}) {self.dtype}, got {tuple(embeddings.shape)} {embeddings.dtype}")
        data = embeddings.detach().to("cpu").contiguous()
        if self.dtype == torch.bfloat16:
            data = data.view(torch.uint16) if hasattr(torch, "uint16") else data.view(torch.int16)
        arr = data.numpy().view(self.np_dtype)
        with self._locked():
            todo = [(k, i) for i, k in enumerate(keys) if self._slot(k) is None]
            todo = list({k: i for k, i in todo}.items())  # a key twice in one batch: store once
            if not todo:
                return
            alloc_file = self.dir / "alloc.json"
            start = json.loads(alloc_file.read_text())["slots"] if alloc_file.is_file() else 0
            path = self.dir / "data.bin"
            need = start + len(todo)
            have = os.path.getsize(path) // self.entry_bytes
            if have < need:
                grow = max(need, have + _GROW_ENTRIES, int(have * 1.25))
                with open(path, "r+b") as f:
                    f.truncate(grow * self.entry_bytes)
                self._mm = None
            mm = self._memmap(need)
            for j, (_, i) in enumerate(todo):
                mm[start + j] = arr[i]  # a shared mapping: in the page cache at once, so a kill loses nothing
            _write_json(alloc_file, {"slots": need})
            by_shard: dict[str, list[tuple[str, int]]] = {}
            for j, (k, _) in enumerate(todo):
                by_shard.setdefault(_shard_of(k), []).append((k, start + j))
            for shard, items in by_shard.items():
                table = self._read_shard(shard)
                table.update(items)
                _write_json(self.dir / "index" / f"{shard}.json", table)

    def lookup_or_compute(
        self, keys: Sequence[str], images: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Embeddings for ``keys`` (N×C×h×w on ``images.device``): cached ones read back, the others computed
        with ``encode(images[missing])`` and stored. ``encode`` is not called when every key is cached."""
        if len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} cache keys for {images.shape[0]} images")
        found, missing = self.get(keys)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = encode(images[missing])
            self.put([keys[i] for i in missing], computed)
            for j, i in enumerate(missing):
                found[i] = computed[j].detach()
        device = images.device
        return torch.stack([f.to(device) for f in found]) if found else images.new_zeros((0, *self.shape), dtype=self.dtype)

    def fill_batch(self, batch: dict, encode: Callable[[torch.Tensor], torch.Tensor], *, crops: bool = True) -> dict:
        """Set ``sam_image_embeddings`` (and ``region_crop_embeddings`` when ``crops`` and the batch has
        regions) from the cache, encoding only what is missing. Returns ``batch``."""
        batch["sam_image_embeddings"] = self.lookup_or_compute(batch["image_keys"], batch["sam_images"], encode)
        if crops and "region_crops" in batch and batch["region_crops"].shape[0] > 0:
            batch["region_crop_embeddings"] = self.lookup_or_compute(batch["region_crop_keys"], batch["region_crops"], encode)
        return batch


def open_cache_for(
    model: torch.nn.Module, root: str | os.PathLike, *, fingerprint: str | None = None, dtype: torch.dtype | None = None
) -> SamEmbeddingCache:
    """The cache of ``model.sam.image_encoder`` under ``root``: one folder per (encoder weights, output dtype).

    ``fingerprint`` / ``dtype`` override what is read from the encoder: a training run takes the
    fingerprint before DeepSpeed partitions or converts the weights and the dtype after.
    """
    sam = model.sam
    encoder = sam.image_encoder
    dtype = dtype if dtype is not None else next(encoder.parameters()).dtype
    fingerprint = fingerprint if fingerprint is not None else encoder_fingerprint(encoder)
    name = _STORAGE[dtype][1] if dtype in _STORAGE else str(dtype)
    h, w = sam.embedding_size
    return SamEmbeddingCache(root, f"{fingerprint}-{name}", (sam.embed_dim, h, w), dtype)


__all__ = ["SamEmbeddingCache", "encoder_fingerprint", "open_cache_for"]

"""Batch samplers: plain random batches and length-grouped batches, deterministic, sharded and resumable.

Both samplers yield lists of dataset indices (pass them as ``batch_sampler=`` to
``torch.utils.data.DataLoader``). The order of an epoch is a pure function of ``(seed, epoch)``;
for a :class:`fclm.data.dataset.MixtureDataset` the epoch is its weighted draw
(``epoch_indices``), for any other dataset a permutation of all indices.

Several ranks: the global list of batches is padded (by repeating its first batches) or, with
``drop_last``, cut to a multiple of ``world_size`` and rank ``r`` takes batches ``r, r + W, …`` —
every rank gets the same number of batches and, without padding, no index twice.

Resuming: ``state_dict()`` records the epoch and how many batches of it this rank has taken;
``load_state_dict()`` makes the next ``iter()`` yield exactly the remaining batches. The count is
of batches *yielded by the sampler*; a ``DataLoader`` with workers fetches a few batches ahead, so
a training loop should pass the number of batches it has *consumed* this epoch:
``sampler.state_dict(consumed=steps_in_epoch)``.
"""

from __future__ import annotations

import abc
import math
import re
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch.utils.data

from fclm.data.templates import SEG_TOKEN

_STATE_VERSION = 1


class _EpochBatchSampler(torch.utils.data.Sampler, abc.ABC):
    """Shared machinery: epoch order, sharding, position. Subclasses build the global batches."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset = dataset
        self.num_records = len(dataset)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self._resume_at = 0
        self._yielded = 0

    # -- to be provided by subclasses --------------------------------------------------------------

    @abc.abstractmethod
    def _global_batches(self, order: np.ndarray, epoch: int) -> list[list[int]]:
        """Cut the epoch's order into batches (before sharding)."""

    def _order_steps(self, steps: list[list[list[int]]], epoch: int) -> list[list[list[int]]]:
        return steps

    # -- epoch --------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``iter()`` yields (from its start)."""
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = int(epoch)
        self._yielded = self._resume_at

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if hasattr(self.dataset, "epoch_indices"):
            order = np.asarray(self.dataset.epoch_indices(self.seed, epoch), dtype=np.int64)
            return order if self.shuffle else np.sort(order, kind="stable")
        if not self.shuffle:
            return np.arange(self.num_records, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_records).astype(np.int64)

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches this rank takes in ``epoch`` (default: the current one), from its start."""
        epoch = self.epoch if epoch is None else int(epoch)
        batches = self._global_batches(self._epoch_order(epoch), epoch)
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        ws = self.world_size
        if len(batches) % ws:
            if self.drop_last or not batches:
                batches = batches[: len(batches) - len(batches) % ws]
            else:
                need = ws - len(batches) % ws
                batches = batches + [list(batches[i % len(batches)]) for i in range(need)]
        steps = [batches[i : i + ws] for i in range(0, len(batches), ws)]
        steps = self._order_steps(steps, epoch)
        return [step[self.rank] for step in steps]

    def num_batches_per_epoch(self) -> int:
        """Batches this rank takes in a full epoch.

        Only the last batch of an epoch can be incomplete (mega-batches are whole multiples of the
        batch size), so the count is the same for both samplers.
        """
        n = int(getattr(self.dataset, "epoch_size", self.num_records))
        if self.drop_last:
            return (n // self.batch_size) // self.world_size
        return math.ceil(math.ceil(n / self.batch_size) / self.world_size)

    def __len__(self) -> int:
        """Batches the next ``iter()`` yields (a full epoch minus a resumed position)."""
        return max(0, self.num_batches_per_epoch() - self._resume_at)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches()
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        for b in batches[start:]:
            self._yielded += 1
            yield b

    # -- resume ------------------------------------------------------------------------------------

    def state_dict(self, consumed: int | None = None) -> dict:
        """Position to resume from: the epoch and the batches of it this rank has taken.

        ``consumed`` overrides the sampler's own count (batches yielded so far this epoch) with the
        number the training loop has actually used, which is what matters with prefetching workers.
        """
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "position": int(self._yielded if consumed is None else consumed),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_records": self.num_records,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next ``iter()`` yields the batches of ``state['epoch']`` after ``state['position']``.

        Raises ``ValueError`` when the state was saved with another seed, batch size, world size or
        dataset size (the remaining batches would not be the ones left over).
        """
        for key in ("seed", "batch_size", "world_size", "num_records"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]} but this sampler has {getattr(self, key)}")
        self.epoch = int(state["epoch"])
        self._resume_at = int(state["position"])
        self._yielded = self._resume_at


class RandomBatchSampler(_EpochBatchSampler):
    """Batches of ``batch_size`` consecutive indices of the epoch's (shuffled) order."""

    def _global_batches(self, order: np.ndarray, epoch: int) -> list[list[int]]:
        return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]


class LengthGroupedBatchSampler(_EpochBatchSampler):
    """Batches of records of similar length, so that padding wastes little.

    The epoch's order is cut into mega-batches of ``batch_size · world_size · mega_batch_factor``
    indices; each is sorted by length (longest first) and cut into batches; the steps (one batch
    per rank) are then shuffled, with the step holding the longest record first so that a memory
    limit shows at once (``longest_first``).

    Lengths: ``lengths[i]`` for index ``i``, or ``length_fn(dataset[i])`` computed once for every
    record (e.g. tokens including image tokens, from the processor; see :func:`estimate_tokens`).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        lengths: Sequence[int] | None = None,
        length_fn: Callable[[Any], int] | None = None,
        mega_batch_factor: int = 50,
        longest_first: bool = True,
        **kwargs: Any,
    ):
        super().__init__(dataset, batch_size, **kwargs)
        if (lengths is None) == (length_fn is None):
            raise ValueError("give exactly one of lengths or length_fn")
        if lengths is None:
            lengths = [int(length_fn(dataset[i])) for i in range(self.num_records)]
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.shape != (self.num_records,):
            raise ValueError(f"{len(self.lengths)} lengths for {self.num_records} records")
        if mega_batch_factor < 1:
            raise ValueError("mega_batch_factor must be >= 1")
        self.mega_batch_factor = int(mega_batch_factor)
        self.longest_first = bool(longest_first)

    def _global_batches(self, order: np.ndarray, epoch: int) -> list[list[int]]:
        mega = self.batch_size * self.world_size * self.mega_batch_factor
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        return batches

    def _order_steps(self, steps: list[list[list[int]]], epoch: int) -> list[list[list[int]]]:
        if not self.shuffle or len(steps) < 2:
            return steps
        perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(steps))
        steps = [steps[i] for i in perm]
        if self.longest_first:
            longest = max(range(len(steps)), key=lambda s: max(int(self.lengths[b].max()) for b in steps[s]))
            steps.insert(0, steps.pop(longest))
        return steps


# --------------------------------------------------------------------------------------------------
# Lengths
# --------------------------------------------------------------------------------------------------

_REGION_RE = re.compile(r"<region\d*>")


def estimate_tokens(
    record: dict,
    *,
    count_text: Callable[[str], int] | None = None,
    image_tokens: int | Callable[[dict], int] = 0,
    tokens_per_message: int = 5,
    tokens_per_region: int = 2,
) -> int:
    """Approximate sequence length of a record for length grouping.

    ``count_text(text)`` counts the tokens of plain text (default: white-space words); each
    ``[SEG]`` counts one token and each ``<region>`` placeholder ``tokens_per_region`` (``<mask><pos>``);
    each message adds ``tokens_per_message`` of chat-template overhead (``<|im_start|>role\\n …
    <|im_end|>\\n``); ``image_tokens`` is a constant or a function of the record.
    """
    count_text = count_text or (lambda s: len(s.split()))
    n = 0
    for m in record.get("messages", []):
        text = str(m.get("content", ""))
        n_regions = len(_REGION_RE.findall(text))
        n_seg = text.count(SEG_TOKEN)
        plain = _REGION_RE.sub(" ", text).replace(SEG_TOKEN, " ")
        n += tokens_per_message + count_text(plain) + n_seg + tokens_per_region * n_regions
    n += image_tokens(record) if callable(image_tokens) else int(image_tokens)
    return int(n)


__all__ = ["RandomBatchSampler", "LengthGroupedBatchSampler", "estimate_tokens"]

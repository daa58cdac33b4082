"""Batch samplers: determinism, coverage, sharding over ranks, exact resume, length grouping."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch.utils.data

from fclm.data.dataset import MixtureDataset
from fclm.data.sampling import LengthGroupedBatchSampler, RandomBatchSampler, estimate_tokens

N = 103
LENGTHS = np.random.default_rng(0).integers(10, 500, size=N)


def make(kind: str, data=None, **kw):
    data = list(range(N)) if data is None else data
    if kind == "random":
        return RandomBatchSampler(data, kw.pop("batch_size", 8), **kw)
    return LengthGroupedBatchSampler(data, kw.pop("batch_size", 8), lengths=LENGTHS[: len(data)], mega_batch_factor=kw.pop("mega", 4), **kw)


@pytest.mark.parametrize("kind", ["random", "grouped"])
def test_deterministic_and_covering(kind):
    s = make(kind, seed=5)
    e0 = list(s)
    assert e0 == list(make(kind, seed=5)) == list(s)  # same seed and epoch: same batches, every time
    assert sorted(itertools.chain(*e0)) == list(range(N))
    assert len(e0) == len(s) == 13 and sum(len(b) < 8 for b in e0) == 1
    s.set_epoch(1)
    assert list(s) != e0
    assert list(make(kind, seed=6)) != e0
    dropped = make(kind, seed=5, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 12 and all(len(b) == 8 for b in dropped)


def test_no_shuffle_is_in_order():
    assert list(make("random", shuffle=False, batch_size=50)) == [list(range(50)), list(range(50, 100)), [100, 101, 102]]


@pytest.mark.parametrize("kind", ["random", "grouped"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_split_the_batches(kind, drop_last):
    world = 3
    per_rank = [list(make(kind, seed=2, rank=r, world_size=world, drop_last=drop_last)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
    assert len(per_rank[0]) == len(make(kind, seed=2, rank=0, world_size=world, drop_last=drop_last))
    flat = Counter(itertools.chain(*itertools.chain(*per_rank)))
    if drop_last:  # 12 full batches -> 4 steps; nothing twice
        assert len(per_rank[0]) == 4 and max(flat.values()) == 1
    else:  # 13 batches padded to 15 by repeating the first: all indices, a few twice
        assert len(per_rank[0]) == 5 and set(flat) == set(range(N))


@pytest.mark.parametrize("kind", ["random", "grouped"])
def test_resume_gives_exactly_the_remaining_batches(kind):
    for rank in range(2):
        s = make(kind, seed=9, rank=rank, world_size=2)
        s.set_epoch(3)
        full = list(s)
        it = iter(s)
        taken = [next(it) for _ in range(4)]
        state = s.state_dict()
        assert state["epoch"] == 3 and state["position"] == 4
        fresh = make(kind, seed=9, rank=rank, world_size=2)
        fresh.load_state_dict(state)
        assert len(fresh) == len(full) - 4
        rest = list(fresh)
        assert taken + rest == full
        assert list(fresh) == full  # the resume applies once; the epoch then starts over
        fresh.set_epoch(4)
        assert list(fresh) != full


def test_consumed_count_overrides_prefetching():
    s = make("random", seed=1)
    full = list(s)
    it = iter(s)
    for _ in range(6):  # e.g. a DataLoader fetched 6 batches ahead ...
        next(it)
    state = s.state_dict(consumed=2)  # ... but the loop used only 2
    t = make("random", seed=1)
    t.load_state_dict(state)
    assert list(t) == full[2:]


def test_state_from_another_configuration_is_refused():
    state = make("random", seed=1).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        make("random", seed=1, batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make("random", seed=2).load_state_dict(state)


def test_resume_through_a_dataloader():
    data = list(range(N))
    s = make("grouped", data, seed=4)
    want = list(s)
    loader = torch.utils.data.DataLoader(data, batch_sampler=s, collate_fn=list)
    got = []
    for step, batch in enumerate(loader):
        got.append(batch)
        if step == 2:
            state = s.state_dict(consumed=step + 1)
            break
    t = make("grouped", data, seed=4)
    t.load_state_dict(state)
    got += list(torch.utils.data.DataLoader(data, batch_sampler=t, collate_fn=list))
    assert got == want


def padding_efficiency(batches):
    real = sum(int(LENGTHS[b].sum()) for b in batches)
    padded = sum(int(LENGTHS[b].max()) * len(b) for b in batches)
    return real / padded


def test_length_grouping_packs_similar_lengths():
    grouped = list(make("grouped", seed=0, mega=20))
    rand = list(make("random", seed=0))
    assert padding_efficiency(grouped) > 0.9 > padding_efficiency(rand)
    assert max(LENGTHS[grouped[0]]) == LENGTHS.max()  # the longest batch comes first


def test_length_fn_and_mixture_epochs():
    records = [{"messages": [{"role": "user", "content": "a " * n}]} for n in range(20)]
    s = LengthGroupedBatchSampler(records, 4, length_fn=lambda r: len(r["messages"][0]["content"]), mega_batch_factor=5, shuffle=False)
    assert list(s) == [[19, 18, 17, 16], [15, 14, 13, 12], [11, 10, 9, 8], [7, 6, 5, 4], [3, 2, 1, 0]]
    with pytest.raises(ValueError, match="exactly one"):
        LengthGroupedBatchSampler(records, 4)
    mix = MixtureDataset([list(range(10)), list(range(10, 14))], weights=[1, 1], epoch_size=20)
    r = RandomBatchSampler(mix, 5, seed=3)
    batches = list(r)
    assert len(batches) == len(r) == 4
    assert sorted(itertools.chain(*batches)) == sorted(mix.epoch_indices(3, 0).tolist())


def test_estimate_tokens():
    rec = {"messages": [{"role": "user", "content": "Describe <region> in detail."}, {"role": "assistant", "content": "red [SEG] box"}]}
    # 2 messages x 5 overhead + 3 words + 2 (<region>) + 2 words + 1 ([SEG]) + 16 image tokens
    assert estimate_tokens(rec, image_tokens=16) == 10 + 3 + 2 + 2 + 1 + 16
    assert estimate_tokens(rec, count_text=lambda s: len(s), image_tokens=lambda r: 0) > 20

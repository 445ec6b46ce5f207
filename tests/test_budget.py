"""Token-budget packing (`budget.py`): fill, budget respected, determinism, oversize policy."""

from __future__ import annotations

import math
import random

import pytest

from dinov3_packing.data.budget import TokenBudgetPacker, pack_by_budget, segment_tokens

NUM_PREFIX = 5  # CLS + 4 registers, as in every released DINOv3


def photo_grids(n: int, seed: int) -> list[tuple[int, int]]:
    """A realistic mix: sides 16 * randint(14, 48) pixels, i.e. 196 to 2304 patches per image."""
    r = random.Random(seed)  # noqa: S311 - test data, not cryptography
    return [(r.randint(14, 48), r.randint(14, 48)) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fill_at_least_98_percent_and_within_budget(seed):
    grids, budget = photo_grids(1000, seed), 16384
    packs = pack_by_budget(grids, budget, NUM_PREFIX)
    tokens = [sum(segment_tokens(grids[i], NUM_PREFIX) for i in p) for p in packs]
    total = sum(segment_tokens(g, NUM_PREFIX) for g in grids)
    assert max(tokens) <= budget
    assert sorted(i for p in packs for i in p) == list(range(len(grids)))  # nothing lost, nothing doubled
    assert total / (len(packs) * budget) >= 0.98
    assert len(packs) <= math.ceil(total / budget) + 1  # at most one pack more than the lower bound
    assert all(p == sorted(p) for p in packs)  # arrival order inside a pack


def test_prefix_tokens_are_counted():
    # Two 10x10 images: 200 patches, but 210 tokens with CLS + 4 registers each.
    assert len(pack_by_budget([(10, 10), (10, 10)], 205, NUM_PREFIX)) == 2
    assert len(pack_by_budget([(10, 10), (10, 10)], 210, NUM_PREFIX)) == 1
    assert segment_tokens((3, 2, 2), NUM_PREFIX) == 3 * (5 + 4)


def test_deterministic():
    grids = photo_grids(300, 7)
    assert pack_by_budget(grids, 8192, NUM_PREFIX) == pack_by_budget(list(grids), 8192, NUM_PREFIX)


def test_streaming_matches_batch_helper():
    grids = photo_grids(200, 3)
    packer = TokenBudgetPacker(8192)
    streamed = []
    for i, g in enumerate(grids):
        streamed.extend(p.items for p in packer.add(i, segment_tokens(g, NUM_PREFIX)))
    streamed.extend(p.items for p in packer.flush())
    assert streamed == pack_by_budget(grids, 8192, NUM_PREFIX)


def test_oversize_own_pack_or_error():
    grids = [(4, 4), (100, 100), (4, 4)]
    packs = pack_by_budget(grids, 1000, NUM_PREFIX, oversize="own")
    assert [1] in packs and sorted(i for p in packs for i in p) == [0, 1, 2]
    with pytest.raises(ValueError, match="max_tokens"):
        pack_by_budget(grids, 1000, NUM_PREFIX, oversize="error")


@pytest.mark.parametrize(
    "kwargs, arg",
    [({"max_tokens": 0}, "max_tokens"), ({"oversize": "drop"}, "oversize"), ({"lookahead": 0}, "lookahead")],
)
def test_bad_arguments_named(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        TokenBudgetPacker(**{"max_tokens": 100, **kwargs})

"""Capacity tiers: the tier notation, user assignment, and nested item-table sizes."""
import math
import re

import pytest
import torch

import fastfair
from fastfair import HashSpec
from fastfair.fl.tiers import (Tier, assign_tiers, collapse_factor, describe, parse_tiers,
                               tier_specs)

ALL_POWERS = "2:0-1-2-3-4-5-6-7-8-9-10"


def pairs(tiers):
    return [(t.fraction, t.share) for t in tiers]


@pytest.mark.parametrize("spec,expected", [
    ("2:0-1", [(1, 0.5), (0.5, 0.5)]),
    ("2:0-1-2-3", [(1, 0.25), (0.5, 0.25), (0.25, 0.25), (0.125, 0.25)]),
    ("2:0-10", [(1, 0.5), (1 / 1024, 0.5)]),
    ("2:1", [(0.5, 1)]),
    (" 2 : 0 - 1 ", [(1, 0.5), (0.5, 0.5)]),
    ("2:3-0", [(1, 0.5), (0.125, 0.5)]),
    ("4:0-1", [(1, 0.5), (0.25, 0.5)]),
    ("2:0-0-1", [(1, 2 / 3), (0.5, 1 / 3)]),
    ("s2:0.9:0-1", [(1, 0.9), (0.5, 0.1)]),
    ("s2:0.25:3-1", [(0.5, 0.75), (0.125, 0.25)]),
    ("s2:1/4:0-2", [(1, 0.25), (0.25, 0.75)]),
    ("s2:0.5:1-1", [(0.5, 1)]),
    ("1:0.25,1/8:0.5,1/1024:0.25", [(1, 0.25), (0.125, 0.5), (1 / 1024, 0.25)]),
    ("1/1024:1/4, 0.125:0.5, 1:0.25", [(1, 0.25), (0.125, 0.5), (1 / 1024, 0.25)]),
    ("1:1", [(1, 1)]),
    ("0.5:0.5,1/2:0.5", [(0.5, 1)]),
    ("1e-3:1", [(0.001, 1)]),
])
def test_notation(spec, expected):
    got = parse_tiers(spec)
    assert all(isinstance(t, Tier) for t in got)
    flat = [x for pair in pairs(got) for x in pair]
    assert len(got) == len(expected)
    assert flat == pytest.approx([x for pair in expected for x in pair], rel=1e-12)


def test_sequences_of_tiers_and_pairs():
    expected = parse_tiers("1:0.25,1/8:0.5,1/1024:0.25")
    assert parse_tiers([(1 / 1024, 0.25), (1, 0.25), (0.125, 0.5)]) == expected
    assert parse_tiers(list(expected)) == expected
    assert parse_tiers(expected) == expected
    assert parse_tiers([Tier(0.5, 0.5), (0.5, 0.5)]) == (Tier(0.5, 1.0),)


@pytest.mark.parametrize("spec", [
    "2:", "2:a-b", "x", "", "1:0.5,0.5:0.4", "0:1", "1.5:1", "-0.5:1", "0.5:-1,1:1", "2:-1",
    "2:0.5", "2:0-1:2", "s2:1:0-1", "s2:0:0-1", "s2:0.5:0-1-2", "s2:0.5", "s1:0.5:0-1",
    "sx:0.5:0-1", "1:1/0", "1:0.5,", "2:0-5000", "3:0-700", "1e-400:1", "1:0.5:0.5",
])
def test_malformed_specs_name_the_spec(spec):
    with pytest.raises(ValueError, match=re.escape(f"tier spec {spec!r}")):
        parse_tiers(spec)


@pytest.mark.parametrize("fraction,share", [(0, 1), (1.5, 1), (-0.5, 1), (0.5, 0), (0.5, 2),
                                            (math.nan, 1), (math.inf, 1)])
def test_tier_range(fraction, share):
    with pytest.raises(ValueError, match="must be in"):
        Tier(fraction, share)


def test_bad_types():
    with pytest.raises(TypeError, match="real number"):
        Tier("0.5", 1)
    with pytest.raises(TypeError, match="real number"):
        Tier(True, 1)
    with pytest.raises(TypeError, match=r"tiers\[1\]"):
        parse_tiers([(1, 0.5), "0.5:0.5"])
    with pytest.raises(TypeError, match="tier string"):
        parse_tiers(0.5)
    with pytest.raises(ValueError, match="empty"):
        parse_tiers([])
    with pytest.raises(ValueError, match="sum to"):
        parse_tiers([(1, 0.5), (0.5, 0.4)])


@pytest.mark.parametrize("num_users,spec,counts", [
    (10, "2:0-1", [5, 5]),
    (7, "2:0-1-2", [3, 2, 2]),
    (8, "2:0-1-2", [3, 3, 2]),
    (10, "s2:0.9:0-1", [9, 1]),
    (1000, "1:0.25,1/8:0.5,1/1024:0.25", [250, 500, 250]),
    (3, "1:0.98,0.5:0.01,0.25:0.01", [1, 1, 1]),
    (5, "1:0.98,0.5:0.01,0.25:0.01", [3, 1, 1]),
    (1, "2:1", [1]),
])
def test_counts_exact(num_users, spec, counts):
    assigned = assign_tiers(num_users, spec)
    assert assigned.dtype == torch.int64 and assigned.shape == (num_users,)
    assert assigned.bincount(minlength=len(counts)).tolist() == counts


def test_counts_sum_for_many_sizes():
    tiers = parse_tiers("1:0.3,1/3:0.3,1/7:0.4")
    for n in range(3, 200):
        counts = assign_tiers(n, tiers).bincount(minlength=3)
        assert counts.sum() == n and bool((counts >= 1).all())
        quotas = torch.tensor([t.share * n for t in tiers])
        assert bool(((counts - quotas).abs() < 1).all())


@pytest.mark.parametrize("num_users,spec", [(99, "2:0-1"), (10, "1:0.3,1/3:0.3,1/7:0.4")])
def test_by_id_gives_the_first_users_the_largest_tiers(num_users, spec):
    by_id = assign_tiers(num_users, spec, by_id=True, seed=5)
    shuffled = assign_tiers(num_users, spec, seed=5)
    assert by_id.bincount().tolist() == shuffled.bincount().tolist()
    assert torch.equal(by_id, torch.sort(shuffled).values)  # non-decreasing in user id
    assert not torch.equal(by_id, shuffled)
    with pytest.raises(ValueError, match="not both"):
        assign_tiers(num_users, spec, by_id=True, by_activity=torch.ones(num_users))


def test_too_few_users():
    with pytest.raises(ValueError, match="num_users 2 is fewer than the 3 tiers"):
        assign_tiers(2, "2:0-1-2")
    with pytest.raises(ValueError, match="num_users"):
        assign_tiers(0, "2:0-1")
    with pytest.raises(TypeError, match="num_users"):
        assign_tiers(10.0, "2:0-1")


def test_seeded_permutation():
    a = assign_tiers(500, "2:0-1-2-3", seed=3)
    assert torch.equal(a, assign_tiers(500, "2:0-1-2-3", seed=3))
    assert not torch.equal(a, assign_tiers(500, "2:0-1-2-3", seed=4))
    assert not torch.equal(a, torch.sort(a).values)
    with pytest.raises(ValueError, match="seed"):
        assign_tiers(10, "2:0-1", seed=-1)


def test_by_activity_gives_big_devices_to_heavy_users():
    activity = torch.tensor([5, 1, 9, 3, 3, 0, 7, 2])
    assigned = assign_tiers(8, "2:0-1-2-3", by_activity=activity)
    # ranks: 9, 7 | 5, 3 (user 3 before user 4 on the tie) | 3, 2 | 1, 0
    assert assigned.tolist() == [1, 3, 0, 1, 2, 3, 0, 2]
    assert torch.equal(assigned, assign_tiers(8, "2:0-1-2-3", by_activity=activity, seed=9))
    heavy = torch.rand(100, generator=torch.Generator().manual_seed(0))
    assigned = assign_tiers(100, "s2:0.3:0-4", by_activity=heavy)
    assert heavy[assigned == 0].min() > heavy[assigned == 1].max()


@pytest.mark.parametrize("activity,error", [
    ([1, 2, 3], TypeError), (torch.ones(3, dtype=torch.bool), TypeError),
    (torch.ones(4), ValueError), (torch.ones(3, 1), ValueError),
    (torch.tensor([1.0, math.nan, 2.0]), ValueError),
])
def test_bad_activity(activity, error):
    with pytest.raises(error, match="by_activity"):
        assign_tiers(3, "2:0-1", by_activity=activity)


GRID = [(359_014, 8, 1), (359_014, 8, 8), (1682, 16, 1), (1682, 16, 8)]


@pytest.mark.parametrize("n,d,chunk", GRID)
def test_specs_nest(n, d, chunk):
    tiers = parse_tiers(ALL_POWERS)
    specs = tier_specs(n, d, tiers, chunk_size=chunk, seed=7)
    assert specs[0] is None
    big = specs[1]
    assert big.memory_size == fastfair.nested_size(0.5 * n * d, chunk)
    rows = torch.randint(0, n, (32,), generator=torch.Generator().manual_seed(1))
    idx_big, sign_big = fastfair.hash_index(rows, big, backend="reference")
    for small in specs[2:]:
        assert (small.num_embeddings, small.embedding_dim, small.chunk_size, small.seed) == \
            (n, d, chunk, 7)
        r = collapse_factor(big, small)
        assert big.collapse(r) == small
        assert small.memory_size % chunk == 0
        idx, sign = fastfair.hash_index(rows, small, backend="reference")
        assert torch.equal(idx, idx_big % small.memory_size)
        assert torch.equal(sign, sign_big)
    if 512 <= big.max_collapse:
        # every ratio is a power of two the big array collapses by, so the sizes form a chain
        for a, b in zip(specs[1:], specs[2:]):
            assert collapse_factor(a, b) == 2


@pytest.mark.parametrize("n,d,chunk", GRID)
@pytest.mark.parametrize("spec", [ALL_POWERS, "1:0.2,1/3:0.2,1/10:0.2,1/100:0.2,1/1000:0.2",
                                  "3:1-2-3-4-5-6"])
def test_sizes_follow_the_request(n, d, chunk, spec):
    tiers = parse_tiers(spec)
    specs = tier_specs(n, d, tiers, chunk_size=chunk)
    for t, s in zip(tiers, specs):
        if t.fraction == 1:
            assert s is None
            continue
        target = t.fraction * n * d
        if target < chunk:
            assert s.memory_size == chunk
        else:
            assert 1 / 1.5 < s.memory_size / target < 1.5
        if spec == ALL_POWERS and 0.5 / t.fraction <= specs[1].max_collapse:
            assert s.memory_size / target == pytest.approx(1, rel=2**-7)


@pytest.mark.parametrize("n,d,chunk", GRID)
def test_hash_full_heads_the_chain(n, d, chunk):
    plain = tier_specs(n, d, ALL_POWERS, chunk_size=chunk, seed=3)
    specs = tier_specs(n, d, ALL_POWERS, chunk_size=chunk, seed=3, hash_full=True)
    full = specs[0]
    assert full.memory_size == fastfair.nested_size(n * d, chunk)
    assert full.memory_size / (n * d) == pytest.approx(1, rel=2**-7)
    for small, dense_headed in zip(specs[1:], plain[1:]):
        assert full.collapse(collapse_factor(full, small)) == small
        # the hashed tiers are the sizes they were, so runs differ only in the full tier
        assert small.memory_size / dense_headed.memory_size == pytest.approx(1, rel=2**-6)
    assert tier_specs(n, d, "1:1", chunk_size=chunk, seed=3, hash_full=True) == [full]


def test_hash_full_must_be_a_bool():
    with pytest.raises(TypeError, match="hash_full must be a bool, got str"):
        tier_specs(10, 4, "2:0-1", hash_full="yes")


def test_tiny_fraction_gets_one_chunk():
    specs = tier_specs(100, 4, "1:0.5,1/1024:0.5", chunk_size=8)
    assert specs == [None, HashSpec(100, 4, 8, 8)]
    specs = tier_specs(100, 4, "2:5-10", chunk_size=4)
    assert [s.memory_size for s in specs] == [12, 4]


def test_all_dense_and_bad_arguments():
    assert tier_specs(10, 4, "1:1") == [None]
    with pytest.raises(ValueError, match="num_items"):
        tier_specs(0, 4, "2:0-1")
    with pytest.raises(ValueError, match="chunk_size"):
        tier_specs(10, 4, "2:0-1", chunk_size=0)
    with pytest.raises(ValueError, match="seed"):
        tier_specs(10, 4, "2:0-1", seed=2**32)


def test_collapse_factor_rejects_what_does_not_nest():
    big = HashSpec(100, 8, 64, 8, seed=1)
    assert collapse_factor(big, HashSpec(100, 8, 16, 8, seed=1)) == 4
    with pytest.raises(ValueError, match="seed is 1 in big and 2 in small"):
        collapse_factor(big, HashSpec(100, 8, 16, 8, seed=2))
    with pytest.raises(ValueError, match="chunk_size"):
        collapse_factor(big, HashSpec(100, 8, 16, 4, seed=1))
    with pytest.raises(ValueError, match="does not divide"):
        collapse_factor(big, HashSpec(100, 8, 24, 8, seed=1))
    with pytest.raises(TypeError, match="small must be a fastfair.HashSpec"):
        collapse_factor(big, None)


def test_describe():
    tiers = parse_tiers("2:0-1-3")
    specs = tier_specs(1682, 16, tiers, chunk_size=8)
    rows = describe(tiers, specs, 1682, 16)
    assert [r["tier"] for r in rows] == [0, 1, 2]
    assert rows[0] == {"tier": 0, "fraction": 1.0, "share": pytest.approx(1 / 3), "hashed": False,
                       "memory_size": 1682 * 16, "actual_fraction": 1.0, "bytes": 4 * 1682 * 16,
                       "collapse": None}
    assert rows[1]["memory_size"] == specs[1].memory_size and rows[1]["collapse"] == 1
    assert rows[2]["collapse"] == 4 and rows[2]["bytes"] == 4 * specs[2].memory_size
    assert rows[2]["actual_fraction"] == specs[2].memory_size / (1682 * 16)
    with pytest.raises(ValueError, match="2 specs for 3 tiers"):
        describe(tiers, specs[:2], 1682, 16)
    with pytest.raises(ValueError, match="not 1000 x 16"):
        describe(tiers, specs, 1000, 16)

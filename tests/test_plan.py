"""Partition plan: rounding that follows the ratios, whole units, edge cases, refusals."""
from fractions import Fraction

import pytest

from spmd.errors import UserError
from spmd.plan import (FFN_BLOCK, apportion, chunk_counts, diff, make_plan, move, parse_ratios, ranges,
                       replan, work_ratios)

TINYLLAMA = dict(n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab=32000)


def covers(shares, units, total):
    """Each unit of a kind is held by exactly one rank, in contiguous ranges in rank order (the start-up plan)."""
    at = 0
    for s in shares:
        held = units(s)
        assert list(held) == list(range(at, at + len(held)))
        at += len(held)
    assert at == total


def kv(s):
    return s.kv


def blocks(s):
    return s.ffn_blocks


def vocab(s):
    return range(s.vocab_start, s.vocab_start + s.n_vocab)


@pytest.mark.parametrize("ratios", ["1", "1:1", "2:3:3", "1:2:3:4", "5:1", "1:1:1:1:1:1:1", "0.5:1.5"])
def test_plan_covers_every_unit_exactly_once(ratios):
    r = parse_ratios(ratios, len(ratios.split(":")))
    shares = make_plan(r, **TINYLLAMA)
    covers(shares, kv, 4)
    covers(shares, blocks, 5632 // FFN_BLOCK)
    covers(shares, vocab, 32000)
    assert sum(s.n_ffn for s in shares) == 5632
    for s in shares:
        assert s.n_ffn == len(s.ffn_blocks) * FFN_BLOCK
        assert s.n_heads == s.n_kv * 8 and s.head_ranges == [(a * 8, b * 8) for a, b in s.kv_ranges]


def test_apportion_follows_ratios_within_one_unit():
    for total in (1, 4, 7, 176, 32000):
        for ratios in ([2, 3, 3], [1, 1], [1, 2, 3, 4], [7, 1, 1]):
            counts = apportion(total, ratios)
            assert sum(counts) == total
            for c, r in zip(counts, ratios):
                assert abs(c - Fraction(total * r, sum(ratios))) < 1


def test_largest_remainder_rounding():
    assert apportion(4, [2, 3, 3]) == [1, 2, 1]  # quotas 1, 1.5, 1.5: the tie goes to the lower rank
    assert apportion(176, [2, 3, 3]) == [44, 66, 66]
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert chunk_counts(2048, [2, 3, 3]) == [512, 768, 768]


def test_equal_shares_when_no_ratios():
    assert parse_ratios(None, 3) == (1, 1, 1)
    shares = make_plan(parse_ratios(None, 2), **TINYLLAMA)
    assert [s.n_kv for s in shares] == [2, 2]
    assert [s.n_ffn for s in shares] == [2816, 2816]
    assert [s.n_vocab for s in shares] == [16000, 16000]


def test_more_ranks_than_kv_heads_leaves_some_ranks_without_heads():
    shares = make_plan(parse_ratios(None, 6), **TINYLLAMA)
    assert sum(s.n_kv for s in shares) == 4
    assert [s.n_kv for s in shares].count(0) == 2
    assert all(s.n_ffn > 0 and s.n_vocab > 0 for s in shares)


def test_ffn_not_a_multiple_of_the_block():
    shares = make_plan(parse_ratios("1:1:1", 3), n_heads=4, n_kv_heads=4, ffn_dim=172, vocab=512)
    assert [s.n_ffn for s in shares] == [64, 64, 44]
    assert [s.ffn_ranges for s in shares] == [[(0, 64)], [(64, 128)], [(128, 172)]]
    covers(shares, blocks, 6)


@pytest.mark.parametrize("text, n, message", [
    ("1:2", 3, "has 2 values but the job has 3 ranks"),
    ("1:0:1", 3, "must be positive"),
    ("1:-2", 2, "must be positive"),
    ("a:b", 2, "expected numbers"),
    ("", 1, "expected numbers"),
    ("nan", 1, "expected numbers"),
    ("1e100000000", 1, "expected numbers|must lie between"),  # and promptly: no 100-million-digit Fraction
    ("1e7", 1, "must lie between"),
    ("1e-7:1", 2, "must lie between"),
])
def test_bad_ratios_are_refused(text, n, message):
    with pytest.raises(UserError, match=message):
        parse_ratios(text, n)


def test_ratios_that_leave_a_rank_nothing_are_refused():
    with pytest.raises(UserError, match="leave rank 1 no heads, FFN columns or vocabulary rows"):
        make_plan(parse_ratios("1000:1", 2), n_heads=2, n_kv_heads=2, ffn_dim=64, vocab=8)


def test_ranges_merge_adjacent_indices():
    assert ranges(()) == []
    assert ranges((0, 1, 2, 5, 7, 8)) == [(0, 3), (5, 6), (7, 9)]


def plan3():
    return make_plan(parse_ratios("1:1:1", 3), **TINYLLAMA)


def each_unit_once(plan, n_kv=4, n_blocks=176, n_vocab=32000):
    assert sorted(j for s in plan for j in s.kv) == list(range(n_kv))
    assert sorted(b for s in plan for b in s.ffn_blocks) == list(range(n_blocks))
    assert sorted(r for s in plan for r in vocab(s)) == list(range(n_vocab))
    for s in plan:
        assert list(s.kv) == sorted(s.kv) and list(s.ffn_blocks) == sorted(s.ffn_blocks)


def test_move_hands_over_the_sources_last_units_and_nothing_else():
    old = plan3()  # kv 2/1/1, blocks 59/59/58
    new = move(old, 1, 0, 2, kv_groups=1)
    assert [s.kv for s in new] == [(0,), (2,), (1, 3)]  # rank 1 keeps its group: shares are sets, not ranges
    assert [s.ffn_blocks for s in new] == [s.ffn_blocks for s in old]
    assert diff(old, new) == [("kv", 1, 0, 2)]
    new2 = move(new, 2, 1, 0, ffn_blocks=3)
    assert new2[0].ffn_blocks == tuple(range(59)) + (115, 116, 117) and new2[1].ffn_blocks == tuple(range(59, 115))
    assert new2[0].ffn_ranges == [(0, 59 * 32), (115 * 32, 118 * 32)] and new2[0].n_ffn == 62 * 32
    assert diff(new, new2) == [("ffn", b, 1, 0) for b in (115, 116, 117)]
    new3 = move(new2, 3, 2, 1, kv_groups=2, ffn_blocks=1)
    assert [s.kv for s in new3] == [(0,), (1, 2, 3), ()] and new3[1].ffn_blocks[-1] == 175
    each_unit_once(new3)
    assert sorted(diff(new2, new3)) == [("ffn", 175, 2, 1), ("kv", 1, 2, 1), ("kv", 3, 2, 1)]


@pytest.mark.parametrize("args, message", [
    ((1, 0, 2), "kind 1 needs 'kv_groups'"),
    ((1, 0, 2, 3), "rank 0 has 2 KV-head groups; cannot move 3"),
    ((1, 1, 2, 2), "rank 1 has 1 KV-head group; cannot move 2"),
    ((2, 0, 1, 0, 60), "rank 0 has 59 FFN blocks; cannot move 60"),
    ((3, 0, 1, 1), "kind 3 needs 'ffn_blocks'"),
    ((4, 0, 1, 1), "unknown kind 4"),
    ((1, 0, 3, 1), "'to' rank 3 is out of range: the job has ranks 0..2"),
    ((1, -1, 0, 1), "'from' rank -1 is out of range"),
    ((1, 1, 1, 1), "both rank 1: nothing would move"),
    ((2, 0, 1, 0, True), "a whole number"),
])
def test_bad_moves_are_refused_with_a_reason(args, message):
    with pytest.raises(UserError, match=message):
        move(plan3(), *args)


def test_a_move_that_leaves_a_rank_nothing_is_refused():
    plan = make_plan(parse_ratios("1:1", 2), n_heads=2, n_kv_heads=2, ffn_dim=64, vocab=1)  # rank 1: no vocab
    with pytest.raises(UserError, match="leaves rank 1 no heads, FFN columns or vocabulary rows"):
        move(plan, 3, 1, 0, kv_groups=1, ffn_blocks=1)


def test_replan_follows_the_ratios_and_keeps_what_each_rank_has():
    old = move(plan3(), 1, 0, 2, kv_groups=1)  # kv (0,) (2,) (1, 3)
    new = replan(old, parse_ratios("1:1:2", 3))
    assert [s.n_kv for s in new] == apportion(4, [1, 1, 2])
    assert [len(s.ffn_blocks) for s in new] == apportion(176, [1, 1, 2])
    assert [s.n_vocab for s in new] == [8000, 8000, 16000] and [s.vocab_start for s in new] == [0, 8000, 16000]
    assert [s.kv for s in new] == [(0,), (2,), (1, 3)]  # the counts already fit: no KV head moves
    each_unit_once(new)
    moved = diff(old, new)
    assert {m[0] for m in moved} == {"ffn", "vocab"}
    # only the surplus moves: ranks 0 and 1 give 15 blocks each to rank 2
    assert sum(m[0] == "ffn" for m in moved) == (59 - 44) * 2
    assert all(m[3] == 2 for m in moved if m[0] == "ffn")
    again = replan(new, parse_ratios("1:1:2", 3))
    assert diff(new, again) == []


def test_replan_of_random_ratios_covers_every_unit_once():
    import random
    rng = random.Random(5)
    plan = plan3()
    for _ in range(30):
        ratios = parse_ratios(":".join(str(rng.uniform(0.2, 3)) for _ in range(3)), 3)
        new = replan(plan, ratios)
        each_unit_once(new)
        for unit, counts in (("kv", apportion(4, ratios)), ("ffn", apportion(176, ratios))):
            assert [len(s.kv if unit == "kv" else s.ffn_blocks) for s in new] == counts
        for s_old, s_new in zip(plan, new):  # a rank that keeps its count keeps its units
            if s_old.n_kv == s_new.n_kv:
                assert s_old.kv == s_new.kv
        plan = new


def test_replan_refuses_ratios_that_leave_a_rank_nothing():
    plan = make_plan(parse_ratios("1:1", 2), n_heads=2, n_kv_heads=2, ffn_dim=64, vocab=8)
    with pytest.raises(UserError, match="leave rank 1 no heads"):
        replan(plan, parse_ratios("1000:1", 2))


def test_work_ratios_are_positive_and_follow_the_split():
    r = work_ratios(move(plan3(), 1, 0, 2, kv_groups=1))
    assert all(x > 0 for x in r) and r[2] > r[1]


def test_plan_module_is_free_of_mpi():
    import spmd.model
    import spmd.plan
    for mod in (spmd.plan, spmd.model):
        source = open(mod.__file__).read()
        assert "mpi4py" not in source

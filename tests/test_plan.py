"""Partition plan: rounding that follows the ratios, whole units, edge cases, refusals."""
from fractions import Fraction

import pytest

from spmd.errors import UserError
from spmd.plan import FFN_BLOCK, apportion, chunk_counts, make_plan, parse_ratios

TINYLLAMA = dict(n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab=32000)


def covers(shares, field_start, field_n, total):
    at = 0
    for s in shares:
        assert getattr(s, field_start) == at
        at += getattr(s, field_n)
    assert at == total


@pytest.mark.parametrize("ratios", ["1", "1:1", "2:3:3", "1:2:3:4", "5:1", "1:1:1:1:1:1:1", "0.5:1.5"])
def test_plan_covers_every_unit_exactly_once(ratios):
    r = parse_ratios(ratios, len(ratios.split(":")))
    shares = make_plan(r, **TINYLLAMA)
    covers(shares, "kv_start", "n_kv", 4)
    covers(shares, "ffn_start", "n_ffn", 5632)
    covers(shares, "vocab_start", "n_vocab", 32000)
    for s in shares:
        assert s.ffn_start % FFN_BLOCK == 0 and (s.n_ffn % FFN_BLOCK == 0 or s.ffn_start + s.n_ffn == 5632)
        assert s.n_heads == s.n_kv * 8 and s.head_start == s.kv_start * 8


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
    covers(shares, "ffn_start", "n_ffn", 172)


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


def test_plan_module_is_free_of_mpi():
    import spmd.model
    import spmd.plan
    for mod in (spmd.plan, spmd.model):
        source = open(mod.__file__).read()
        assert "mpi4py" not in source

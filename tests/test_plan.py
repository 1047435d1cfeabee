"""The plan: the layout text (stages, ranks, @N), layers per stage, units per rank inside a stage, whole units,
edge cases, refusals, and what is derived from a plan (its stages, its text)."""
from fractions import Fraction
from types import SimpleNamespace

import pytest

from spmd.errors import UserError
from spmd.plan import FFN_BLOCK, StageSpec, apportion, chunk_counts, ffn_counts, make_plan, parse_layout, ranges

TINYLLAMA = SimpleNamespace(n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab=32000)


def plan_of(text, dims=TINYLLAMA):
    n = len(text.replace("*", ":").split(":"))
    return make_plan(parse_layout(text, n), dims)


def covers(shares, units, total):
    """Each unit of a kind is held by exactly one rank, in contiguous ranges in rank order (the start-up plan)."""
    at = 0
    for s in shares:
        held = units(s)
        assert list(held) == list(range(at, at + len(held)))
        at += len(held)
    assert at == total


def vocab(s):
    return range(s.vocab_start, s.vocab_start + s.n_vocab)


@pytest.mark.parametrize("ratios", ["1", "1:1", "2:3:3", "1:2:3:4", "5:1", "1:1:1:1:1:1:1", "0.5:1.5"])
def test_one_stage_covers_every_unit_exactly_once(ratios):
    plan = plan_of(ratios)
    assert len(plan.stages) == 1 and plan.stages[0].layers == (0, 22)
    covers(plan, lambda s: s.kv, 4)
    covers(plan, lambda s: s.ffn_blocks, 5632 // FFN_BLOCK)
    covers(plan, vocab, 32000)
    assert sum(s.n_ffn for s in plan) == 5632
    for s in plan:
        assert s.n_ffn == len(s.ffn_blocks) * FFN_BLOCK and s.layers == (0, 22)
        assert s.n_heads == s.n_kv * 8 and s.head_ranges == [(a * 8, b * 8) for a, b in s.kv_ranges]
    assert plan.text() == ":".join(f"{float(Fraction(r)):g}" for r in ratios.split(":"))


@pytest.mark.parametrize("text, layers, ranks", [
    ("1*1*1", [(0, 8), (8, 15), (15, 22)], [(0,), (1,), (2,)]),  # 22/3: 7.33 each, the remainder to stage 0
    ("1:1*2:3", [(0, 6), (6, 22)], [(0, 1), (2, 3)]),  # in proportion to the sums 2 and 5: 6.29, 15.71
    ("1:1@10*1:1@12", [(0, 10), (10, 22)], [(0, 1), (2, 3)]),
    ("1@20*1*1", [(0, 20), (20, 21), (21, 22)], [(0,), (1,), (2,)]),
    ("2*1:1:1", [(0, 9), (9, 22)], [(0,), (1, 2, 3)]),  # sums 2 and 3: 8.8 and 13.2
    ("1000*1", [(0, 21), (21, 22)], [(0,), (1,)]),  # at least one layer a stage
])
def test_stages_get_layers_in_proportion_to_their_speed(text, layers, ranks):
    plan = plan_of(text)
    assert [st.layers for st in plan.stages] == layers
    assert [st.ranks for st in plan.stages] == ranks
    last = plan.stages[-1]
    for st in plan.stages:  # each stage splits every one of its layers among its ranks; the head is the last's
        covers([plan[r] for r in st.ranks], lambda s: s.kv, 4)
        covers([plan[r] for r in st.ranks], lambda s: s.ffn_blocks, 176)
        assert all(plan[r].layers == st.layers for r in st.ranks)
    covers([plan[r] for r in last.ranks], vocab, 32000)
    assert all(plan[r].n_vocab == 0 for st in plan.stages[:-1] for r in st.ranks)
    again = make_plan(parse_layout(plan.text(), len(plan)), TINYLLAMA)  # the text shown gives the plan back
    assert again == plan


def test_parse_layout_reads_stages_speeds_and_pins():
    assert parse_layout("1:1@10*2:3", 4).stages == (StageSpec((1, 1), 10), StageSpec((2, 3), None))
    assert parse_layout("1:1@10*2:3", 4).what == "--ratios '1:1@10*2:3'"
    assert parse_layout(None, 3).stages == (StageSpec((1, 1, 1)),)
    assert parse_layout("0.5*1/2", 2).stages == (StageSpec((Fraction(1, 2),)), StageSpec((Fraction(1, 2),)))
    assert parse_layout(" 1 : 2 * 3@ 4", 3, name="ratios").stages == (StageSpec((1, 2)), StageSpec((3,), 4))


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
    plan = make_plan(parse_layout(None, 2), TINYLLAMA)
    assert [s.n_kv for s in plan] == [2, 2]
    assert [s.n_ffn for s in plan] == [2816, 2816]
    assert [s.n_vocab for s in plan] == [16000, 16000]


def test_more_ranks_than_kv_heads_leaves_some_ranks_without_heads():
    plan = make_plan(parse_layout(None, 6), TINYLLAMA)
    assert sum(s.n_kv for s in plan) == 4
    assert [s.n_kv for s in plan].count(0) == 2
    assert all(s.n_ffn > 0 and s.n_vocab > 0 for s in plan)


def test_a_k_quant_ffn_down_is_split_in_whole_super_blocks():
    """ffn_down is split by columns: in a K-quant file the ranks' FFN ranges keep its 256-column super-blocks
    whole (8 blocks of 32), unless that would leave a working rank none."""
    from spmd.config import ffn_unit
    from spmd.gguf_file import T
    dims = SimpleNamespace(**{**TINYLLAMA.__dict__, "ffn_unit": ffn_unit([T.Q4_K, T.Q6_K])})  # 5632 = 22 x 256
    assert dims.ffn_unit == 8 and ffn_unit([T.Q8_0, T.F16]) == 1
    for text in ("1:1", "2:3:3", "1:2:3:4"):
        plan = plan_of(text, dims)
        assert all(a % 256 == 0 for s in plan for a, _ in s.ffn_ranges)
        covers(plan, lambda s: s.ffn_blocks, 176)
    assert ffn_counts(20, [1, 1, 1], 8) == [8, 8, 4]  # the last unit short
    assert ffn_counts(12, [1, 1, 1], 8) == [4, 4, 4]  # 2 units for 3 ranks: by single blocks
    assert ffn_counts(12, [1, 0, 1], 8) == [8, 0, 4]  # an idle rank needs none


def test_ffn_not_a_multiple_of_the_block():
    plan = plan_of("1:1:1", SimpleNamespace(n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=172, vocab=512))
    assert [s.n_ffn for s in plan] == [64, 64, 44]
    assert [s.ffn_ranges for s in plan] == [[(0, 64)], [(64, 128)], [(128, 172)]]
    covers(plan, lambda s: s.ffn_blocks, 6)


@pytest.mark.parametrize("text, n, message", [
    ("1:2", 3, "has 2 values but the job has 3 ranks"),
    ("1*1", 3, "has 2 values but the job has 3 ranks"),
    ("1:-1:1", 3, "must be positive"),
    ("0:1", 2, "rank 0 cannot be idle"),
    ("0*1", 2, "rank 0 cannot be idle"),
    ("1*0", 2, "stage 1 has only idle ranks"),
    ("1*0:0*1", 4, "stage 1 has only idle ranks"),
    ("1:-2", 2, "must be positive"),
    ("a:b", 2, "expected numbers"),
    ("", 1, "expected numbers"),
    ("1**1", 2, "expected numbers"),
    ("nan", 1, "expected numbers"),
    ("1e100000000", 1, "expected numbers|must lie between"),  # and promptly: no 100-million-digit Fraction
    ("1e7", 1, "must lie between"),
    ("1e-7:1", 2, "must lie between"),
    ("1:1e-400", 2, "must lie between"),  # (its float is 0, but it is not 0)
    ("1e-400:1", 2, "must lie between"),
    ("1/10000000:1", 2, "must lie between"),
    ("1@x*1", 2, "@x must be a whole number of layers"),
    ("1@0*1", 2, "@0 must be a whole number of layers, at least 1"),
    ("1@" + "9" * 5000 + "*1", 2, "@99999999999999999999 is more layers than any model has"),
    ("1@-3*1", 2, "@-3 must be a whole number"),
    ("\uff11*1", 2, "expected numbers"),  # a full-width digit
    ("\u0663*1", 2, "expected numbers"),  # an Arabic-Indic digit
    ("1_0*1", 2, "expected numbers"),
    ("1@\uff12*1", 2, "must be a whole number of layers"),
    ("1@1e0*1", 2, "must be a whole number of layers"),
    ("0x10", 1, "expected numbers"),
    ("1/0", 1, "expected numbers"),
    ("inf", 1, "expected numbers"),
])
def test_bad_layouts_are_refused(text, n, message):
    with pytest.raises(UserError, match=message):
        parse_layout(text, n)


@pytest.mark.parametrize("text, message", [
    ("1*1*1", "makes 3 stages but the model has 2 layers: at most one stage per layer"),
    ("1@1*1@2", "the @N counts add up to 3 layers but the model has 2"),
    ("1@1*1@0", "@0 must be a whole number"),
    ("1@2*1", "the @N counts add up to 2 layers but the model has 2, which leaves none for the stage without @N"),
    ("1@1*1@1*1", "makes 3 stages"),
])
def test_layouts_that_do_not_fit_the_model_are_refused(text, message):
    dims = SimpleNamespace(n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab=64)
    with pytest.raises(UserError, match=message):
        make_plan(parse_layout(text, len(text.replace("*", ":").split(":"))), dims)


def test_too_few_layers_left_for_the_stages_without_a_count():
    dims = SimpleNamespace(n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab=64)
    with pytest.raises(UserError, match="the @N counts take 3 of the model's 4 layers, which leaves 1 for 2 more "
                                        "stages: each needs at least one"):
        make_plan(parse_layout("1@3*1*1", 3), dims)


def test_ratios_that_leave_a_rank_nothing_are_refused():
    dims = SimpleNamespace(n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64, vocab=8)
    with pytest.raises(UserError, match="^--ratios '1000:1' leave rank 1 no heads, FFN columns or vocabulary rows"):
        make_plan(parse_layout("1000:1", 2), dims)
    with pytest.raises(UserError, match="leave rank 1 no heads"):  # in a middle stage: no vocabulary rows either
        make_plan(parse_layout("1000:1*1", 3), dims)


@pytest.mark.parametrize("text, stages, idle", [
    ("1:0:1", [(0, 2)], (1,)),
    ("2:0:0:3", [(0, 3)], (1, 2)),
    ("1:0*1", [(0,), (2,)], (1,)),
    ("1*0:1", [(0,), (2,)], (1,)),
    ("1:0@5*0:2@17", [(0,), (3,)], (1, 2)),
])
def test_a_zero_ratio_leaves_a_rank_idle(text, stages, idle):
    """A rank with ratio 0 holds no unit and is in no stage's working ranks; the others split everything; the
    layout text keeps it where it was written."""
    plan = plan_of(text)
    assert plan.idle == idle
    assert [st.ranks for st in plan.stages] == stages
    for r in idle:
        assert plan[r].is_empty and plan.stage_of(r) is None and plan.layout()[r]["stage"] is None
    working = [plan[r] for st in plan.stages for r in st.ranks]
    covers(working[:len(stages[0])], lambda s: s.kv, 4)
    assert sum(s.n_vocab for s in plan) == 32000
    assert plan_of(plan.text()).shares == plan.shares  # the text round-trips, idle ranks in place
    assert plan.text().count(":") + plan.text().count("*") + 1 == len(plan)


def test_ranges_merge_adjacent_indices():
    assert ranges(()) == []
    assert ranges((0, 1, 2, 5, 7, 8)) == [(0, 3), (5, 6), (7, 9)]


def test_plan_is_a_frozen_value_with_an_epoch():
    plan = plan_of("1:1*1")
    assert plan.epoch == 0 and make_plan(parse_layout("1:1*1", 3), TINYLLAMA, epoch=4).epoch == 4
    with pytest.raises(AttributeError):
        plan.epoch = 1
    assert plan.stage_of(2).index == 1 and plan.n_layers == 22
    assert plan.stage_speeds(plan.stages[0]) == (1, 1) and [s.n_vocab for s in plan] == [0, 0, 32000]


def test_an_ffn_block_is_a_quant_block():
    """plan.FFN_BLOCK repeats quants.BLOCK (plan stays free of numpy and gguf: tests/test_imports.py's LIGHT)."""
    from spmd.quants import BLOCK
    assert FFN_BLOCK == BLOCK


@pytest.mark.parametrize("gpus, n_layers, expected", [
    ([("h", 0), ("h", 1)], 22, "1*1"),  # two GPUs of one host: a stage each
    ([("h", 0), ("h", 1), ("h", 2), ("h", 3)], 4, "1*1*1*1"),
    ([("h", 0)], 22, None),  # one rank
    ([("h", 0), ("h", 0)], 22, None),  # two ranks sharing one GPU (more ranks than GPUs: wrapped)
    ([("h", 0), ("h", None)], 22, None),  # a rank on the CPU (the cpu backend, or lavapipe)
    ([("h", None), ("h", None)], 22, None),
    ([("a", 0), ("b", 0)], 22, None),  # GPUs of two hosts: the network between them, not host memory
    ([("h", 0), ("h", 1), ("h", 2)], 2, None),  # more ranks than layers: no stage each
])
def test_ranks_on_gpus_of_their_own_on_one_host_default_to_a_stage_each(gpus, n_layers, expected):
    from spmd.rank import gpu_stages
    assert gpu_stages(gpus, n_layers) == expected

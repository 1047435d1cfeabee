"""`--rebalance`'s decisions (pure): each rank's measured compute against the profile's prediction for its share,
a re-plan taken only when predicted THRESHOLD faster and worth its cost, and no going back and forth."""
from types import SimpleNamespace

import pytest

from spmd import rebalance as RB
from spmd.plan import make_plan, parse_layout
from spmd.replan import relayout
from spmd.cluster import load_profile
from spmd.planner import rank_compute_ms, scaled
from spmd.planner import plan as best_plan
from test_planner import profile

MS = (0.1, 1.0, 0.25, 0.5, 0.01)  # layer, KV group, FFN block, head, vocabulary row (ms at one row)


def cluster(n=3, n_layers=8):
    """n identical ranks on a fast network, 6 KV groups and 9 FFN blocks (a third each): the plan for them is one
    stage of equal shares."""
    return load_profile(profile(n, n_layers, ms=[MS] * n, latency=0.01, bandwidth=1e10, step_ms=0.0, n_kv_heads=6,
                                ffn_dim=9 * 32))


def figures(plan, prof, factors, steps=RB.MIN_STEPS, rows=1, allreduce_ms=0.0):
    """Every rank's recent figures as the STATUS step gives them: its compute `factors` times the profile's."""
    predicted = rank_compute_ms(prof, plan, rows)
    return [{"rank": r, "stage": None if predicted[r] is None else plan.stage_of(r).index,
             "compute_ms": None if predicted[r] is None else predicted[r] * f, "allreduce_ms": allreduce_ms,
             "rows": rows, "steps": steps} for r, f in enumerate(factors)]


def test_rank_compute_is_the_layers_halves_and_the_head():
    """Computed here from the profile's numbers: 8 layers x (0.1 + kv x 1 + blocks x 0.25) + head 0.5 + rows x 0.01."""
    prof = cluster()
    plan = make_plan(parse_layout("2:1:1", 3), prof.model)
    got = rank_compute_ms(prof, plan, 1)
    for r, s in enumerate(plan):
        assert got[r] == pytest.approx(8 * (0.1 + s.n_kv * 1.0 + len(s.ffn_blocks) * 0.25) + 0.5 + s.n_vocab * 0.01)
    idle = make_plan(parse_layout("1:0:1", 3), prof.model)
    assert rank_compute_ms(prof, idle, 1)[1] is None
    assert scaled(prof, [1, 3, 1]).ranks[1].compute[0].kv_group_ms == 3.0


def test_a_rank_measured_slower_gets_less_work():
    prof = cluster()
    rb = RB.Rebalancer(prof, "latency", 1, 64, "star")
    plan = make_plan(parse_layout("1:1:1", 3), prof.model)
    assert rb.observe(plan, figures(plan, prof, [1, 1, 5]))
    assert rb.factors == pytest.approx([1, 1, 1 + RB.SMOOTHING * 4])  # smoothed from 1 toward 5
    text = rb.consider(plan, tokens_left=1000, at=16)
    assert text is not None and rb.decisions == []  # a proposal, until it is carried out
    rb.taken()
    new = make_plan(parse_layout(text, 3), prof.model)
    work = [s.n_kv + len(s.ffn_blocks) for s in new]
    assert work[2] < work[0] and work[2] < work[1]
    d = rb.decisions[-1]
    assert (d.before, d.after, d.at) == ("1:1:1", text, 16) and d.predicted_ms_after < d.predicted_ms_before
    assert "rebalance at token 16" in d.line()


def test_no_move_below_the_threshold_or_not_worth_its_cost():
    prof = cluster()
    plan = make_plan(parse_layout("1:1:1", 3), prof.model)
    rb = RB.Rebalancer(prof, "latency", 1, 64, "star")
    rb.observe(plan, figures(plan, prof, [1, 1, 1.1]))  # 5% slower after smoothing: not worth a move
    assert rb.consider(plan, 1000, 16) is None
    rb = RB.Rebalancer(prof, "latency", 1, 64, "star")
    rb.observe(plan, figures(plan, prof, [1, 1, 5]))
    assert rb.consider(plan, tokens_left=1, at=16) is None  # one token left: the move costs more than it saves
    assert rb.decisions == []


def test_too_few_steps_under_the_plan_is_no_look():
    prof = cluster()
    plan = make_plan(parse_layout("1:1:1", 3), prof.model)
    rb = RB.Rebalancer(prof, "latency", 1, 64, "star")
    assert not rb.observe(plan, figures(plan, prof, [1, 1, 5], steps=RB.MIN_STEPS - 1))
    assert rb.factors == [1.0] * 3


def test_a_layout_left_is_not_taken_again_within_the_cooldown():
    """Measurements that flip (a rank slow, then not) would make the planner swing back; the layout it left is
    not taken again for COOLDOWN looks."""
    prof = cluster()
    rb = RB.Rebalancer(prof, "latency", 1, 64, "star")
    first = make_plan(parse_layout("1:1:1", 3), prof.model)
    rb.observe(first, figures(first, prof, [1, 1, 9]))
    moved = make_plan(parse_layout(rb.consider(first, 10**6, 16), 3), prof.model)
    rb.taken()
    rb.factors = [1.0, 1.0, 1.0]  # the slow rank is fast again: back to 1:1:1 would be predicted faster
    for look in range(RB.COOLDOWN):  # (one of these moved back: the cooldown was a look short)
        assert rb.consider(moved, 10**6, 32 + 16 * look) is None, look
    assert rb.consider(moved, 10**6, 99) == best_plan(prof, "latency").text == "1:1:1"


def test_the_move_cost_counts_the_units_that_change_hands():
    prof = cluster()
    rb = RB.Rebalancer(prof, "latency", 1, 64, "star")
    old = make_plan(parse_layout("1:1:1", 3), prof.model)
    m = SimpleNamespace(**{"kv": 1000, "ffn": 500, "vocab": 10})  # the profile's bytes per unit
    new = relayout(old, parse_layout("1:1:0", 3))  # ranks 0 and 1 keep theirs and take rank 2's
    units = {"kv": 8 * 2, "ffn": 8 * 3}  # rank 2's 2 KV groups and 3 FFN blocks in each of 8 layers go
    vocab_moved = sum(1 for i in range(64) if owner(old, i) != owner(new, i))
    expected = units["kv"] * m.kv + units["ffn"] * m.ffn + vocab_moved * m.vocab
    assert rb.move_ms(old, "1:1:0") == pytest.approx(RB.MOVE_FIXED_MS + expected / RB.MOVE_BYTES_PER_MS)


def owner(plan, row):
    return next(s.rank for s in plan if s.vocab_start <= row < s.vocab_start + s.n_vocab)


def test_a_move_that_ran_slower_is_taken_back():
    """The model predicted a gain, but the new layout measured THRESHOLD slower: the next look goes back to the
    layout that ran faster, says why, and the planner's proposal is not tried again while it measures slower."""
    prof = cluster()
    rb = RB.Rebalancer(prof, "latency", 1, 64, "star")
    first = make_plan(parse_layout("1:1:1", 3), prof.model)
    assert rb.observe(first, figures(first, prof, [1, 1, 5]), rate=100.0)
    proposed, factors = rb.consider(first, 10**6, 16), list(rb.factors)
    rb.taken()
    moved = relayout(first, parse_layout(proposed, 3))
    assert rb.observe(moved, figures(moved, prof, [1, 1, 5]), rate=60.0)  # slower than 1:1:1 ran, after all
    assert rb.consider(moved, 10**6, 32) == "1:1:1"
    d = rb.taken()
    assert d.why == "measured" and d.measured == {"1:1:1": 100.0, proposed: 60.0}
    assert "back: measured 60.0 against 100.0 tokens/s" in d.line()
    back = relayout(moved, parse_layout("1:1:1", 3))
    assert rb.observe(back, figures(back, prof, [1, 1, 5]), rate=100.0)
    rb.factors = factors  # as when it proposed the move: it would propose it again
    rb.left = {}
    assert rb.consider(back, 10**6, 48) is None  # but it measured slower
    assert rb.misses == 1  # and the next proposal must promise twice the gain


def test_allreduces_slower_than_profiled_move_work_out_of_tensor_parallelism():
    """Every rank of the one stage spends 200 ms a token communicating (8 layers, two allreduces each: 12.5 ms an
    allreduce, where the profile's links say 0.02): with the corrected allreduce cost (half-way there after one
    look) fewer ranks share the stage."""
    prof = cluster()
    rb = RB.Rebalancer(prof, "latency", 1, 64, "star")
    plan = make_plan(parse_layout("1:1:1", 3), prof.model)
    assert rb.observe(plan, figures(plan, prof, [1, 1, 1], allreduce_ms=200.0))
    links = 2 * (0.01 + 64 * 4 / 1e10 * 1e3)  # star: out and back over the slowest link, one row of dim 64
    assert rb.allreduce_ms == pytest.approx(RB.SMOOTHING * (200.0 / 16 - links))
    text = rb.consider(plan, 10**6, 16)
    assert text is not None and text.count(":") + text.count("*") == 2
    assert len(make_plan(parse_layout(text, 3), prof.model).stages[0].ranks) < 3


def test_a_proposal_not_carried_out_leaves_no_trace():
    """A socket migration may come before the rebalancer's move is applied (or the move fail): its proposal is
    then no decision, starts no cooldown and counts no miss; the next look may propose it again."""
    prof = cluster()
    rb = RB.Rebalancer(prof, "latency", 1, 64, "star")
    plan = make_plan(parse_layout("1:1:1", 3), prof.model)
    assert rb.observe(plan, figures(plan, prof, [1, 1, 5]))
    text = rb.consider(plan, 10**6, 16)
    assert text is not None
    assert rb.consider(plan, 10**6, 32) == text  # not taken: proposed again, at once
    assert rb.decisions == [] and rb.left == {} and rb.misses == 0
    assert rb.taken().at == 32 and [d.after for d in rb.decisions] == [text]


def test_a_move_that_could_not_be_made_is_not_proposed_again_at_once():
    """A host short of memory refuses the move at every try: after `refused`, its layout waits COOLDOWN looks (the
    pipeline emptied and a REPLAN refused every REBALANCE_EVERY tokens before)."""
    prof = cluster()
    rb = RB.Rebalancer(prof, "latency", 1, 64, "star")
    plan = make_plan(parse_layout("1:1:1", 3), prof.model)
    assert rb.observe(plan, figures(plan, prof, [1, 1, 5]))
    text = rb.consider(plan, 10**6, 16)
    assert rb.refused().after == text and rb.decisions == []
    for look in range(RB.COOLDOWN):
        assert rb.consider(plan, 10**6, 32 + 16 * look) is None, look
    assert rb.consider(plan, 10**6, 99) == text

"""Live changes to a plan: units moved inside a stage, layers moved between stages, whole new layouts (stages
regrouped), and the units that change hands, layer by layer."""
import random
from types import SimpleNamespace

import pytest

from spmd.errors import UserError
from spmd.plan import apportion, make_plan, parse_layout
from spmd.replan import diff, move_layers, move_units, relayout, work_ratios

DIMS = SimpleNamespace(n_layers=6, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab=32000)


def plan_of(text, dims=DIMS):
    return make_plan(parse_layout(text, len(text.replace("*", ":").split(":"))), dims)


def whole(plan, dims=DIMS):
    """Every unit of every layer is held by exactly one rank; vocabulary rows only in the last stage."""
    for layer in range(dims.n_layers):
        holders = [s for s in plan if layer in s.layer_ids]
        assert sorted(j for s in holders for j in s.kv) == list(range(dims.n_kv_heads))
        assert sorted(b for s in holders for b in s.ffn_blocks) == list(range(-(-dims.ffn_dim // 32)))
    assert sorted(r for s in plan for r in range(s.vocab_start, s.vocab_start + s.n_vocab)) == list(range(dims.vocab))
    assert all(plan[r].n_vocab == 0 for st in plan.stages[:-1] for r in st.ranks)
    for s in plan:
        assert list(s.kv) == sorted(s.kv) and list(s.ffn_blocks) == sorted(s.ffn_blocks)


def test_move_units_hands_over_the_sources_last_units_and_nothing_else():
    old = plan_of("1:1:1")  # kv 2/1/1, blocks 59/59/58
    new = move_units(old, 0, 2, kv_groups=1)
    assert new.epoch == old.epoch + 1
    assert [s.kv for s in new] == [(0,), (2,), (1, 3)]  # rank 1 keeps its group: shares are sets, not ranges
    assert [s.ffn_blocks for s in new] == [s.ffn_blocks for s in old]
    assert diff(old, new) == [("kv", layer, 1, 0, 2) for layer in range(6)]
    new2 = move_units(new, 1, 0, ffn_blocks=3)
    assert new2[0].ffn_blocks == tuple(range(59)) + (115, 116, 117) and new2[1].ffn_blocks == tuple(range(59, 115))
    assert new2[0].ffn_ranges == [(0, 59 * 32), (115 * 32, 118 * 32)] and new2[0].n_ffn == 62 * 32
    assert diff(new, new2) == [("ffn", layer, b, 1, 0) for layer in range(6) for b in (115, 116, 117)]
    new3 = move_units(new2, 2, 1, kv_groups=2, ffn_blocks=1)
    assert [s.kv for s in new3] == [(0,), (1, 2, 3), ()] and new3[1].ffn_blocks[-1] == 175
    whole(new3)
    assert sorted(m for m in diff(new2, new3) if m[1] == 0) == [("ffn", 0, 175, 2, 1), ("kv", 0, 1, 2, 1),
                                                                ("kv", 0, 3, 2, 1)]


def test_a_move_sets_the_stage_speeds_to_the_work_it_holds():
    old = plan_of("1:1*2")
    new = move_units(old, 0, 1, kv_groups=1)  # kv 2/2 -> 1/3
    assert sum(new.speeds[:2]) == sum(old.speeds[:2]) and new.speeds[2] == old.speeds[2]
    assert new.speeds[1] > new.speeds[0]
    r = work_ratios([new[0], new[1]])
    assert r[0] / r[1] == new.speeds[0] / new.speeds[1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(src=0, dst=2), "nothing to move"),
    (dict(src=0, dst=2, kv_groups=3), "rank 0 has 2 KV-head groups; cannot move 3"),
    (dict(src=1, dst=2, kv_groups=2), "rank 1 has 1 KV-head group; cannot move 2"),
    (dict(src=0, dst=1, ffn_blocks=60), "rank 0 has 59 FFN blocks; cannot move 60"),
    (dict(src=0, dst=3, kv_groups=1), "'to' rank 3 is out of range: the job has ranks 0..2"),
    (dict(src=-1, dst=0, kv_groups=1), "'from' rank -1 is out of range"),
    (dict(src=True, dst=0, kv_groups=1), "^'from' must be a rank, a whole number \\(got true\\)$"),
    (dict(src=1, dst=1, kv_groups=1), "both rank 1: nothing would move"),
    (dict(src=0, dst=1, ffn_blocks=True), "a whole number"),
    (dict(src=0, dst=1, kv_groups=0), "at least 1"),
])
def test_bad_unit_moves_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(UserError, match=message):
        move_units(plan_of("1:1:1"), **kwargs)


def test_units_move_only_inside_a_stage():
    with pytest.raises(UserError, match="ranks 1 and 2 are in different stages"):
        move_units(plan_of("1:1*1"), 1, 2, kv_groups=1)


def test_a_move_that_leaves_a_rank_nothing_is_refused():
    plan = plan_of("1:1", SimpleNamespace(n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64, vocab=1))
    with pytest.raises(UserError, match="leaves rank 1 no heads, FFN columns or vocabulary rows"):
        move_units(plan, 1, 0, kv_groups=1, ffn_blocks=1)


def test_move_layers_shifts_the_boundary_and_nothing_else():
    old = plan_of("1:1*1*1")  # layers 0-2, 3-4, 5 (6 layers over speeds 2, 1, 1: 3, 1.5, 1.5)
    assert [st.layers for st in old.stages] == [(0, 3), (3, 5), (5, 6)]
    new = move_layers(old, 0, 1, 2)  # stage 0's last two layers to stage 1
    assert [st.layers for st in new.stages] == [(0, 1), (1, 5), (5, 6)]
    assert [st.ranks for st in new.stages] == [st.ranks for st in old.stages] and new.speeds == old.speeds
    assert all((s.kv, s.ffn_blocks, s.n_vocab) == (o.kv, o.ffn_blocks, o.n_vocab) for s, o in zip(new, old))
    moved = diff(old, new)
    assert {(m[1], m[3], m[4]) for m in moved} == {(layer, src, 2) for layer in (1, 2) for src in (0, 1)}
    assert len(moved) == 2 * (4 + 176)  # every KV group and FFN block of two layers, nothing else
    back = move_layers(new, 1, 0, 2)  # and back: stage 1's first two
    assert [st.layers for st in back.stages] == [(0, 3), (3, 5), (5, 6)] and back.epoch == 2
    whole(back)
    assert new.text() == "1:1@1*1@4*1@1"


def test_idle_ranks_stay_in_place_through_every_kind_of_change():
    """A rank with ratio 0 keeps nothing and stays where the layout wrote it: layer moves carry it along, unit
    moves refuse it, a new layout can put it to work or idle another rank (its units go to the others)."""
    old = plan_of("1:0*1:1")
    moved = move_layers(old, 0, 1, 1)
    assert len(moved) == 4 and moved.idle == (1,) and moved[1].is_empty
    assert moved.text() == "1:0@1*1:1@5" and [st.ranks for st in moved.stages] == [(0,), (2, 3)]
    with pytest.raises(UserError, match="rank 1 is idle"):
        move_units(old, 0, 1, kv_groups=1)
    woken = relayout(old, parse_layout("1:1*1:0", 4))
    whole(woken)
    assert woken.idle == (3,) and woken[3].is_empty and not woken[1].is_empty
    assert {m[3] for m in diff(old, woken)} >= {3} and {m[4] for m in diff(old, woken)} >= {1}


@pytest.mark.parametrize("args, message", [
    ((0, 2, 1), "stages 0 and 2 are not adjacent"),
    ((0, 3, 1), "'to_stage' 3 is out of range: the plan has stages 0..2"),
    ((-1, 0, 1), "'from_stage' -1 is out of range"),
    ((0, "1", 1), "^'to_stage' must be a stage, a whole number \\(got \"1\"\\)$"),
    ((0, 1, 3), "stage 0 has 3 layers; it must keep at least one, so at most 2 can move"),
    ((2, 1, 1), "stage 2 has 1 layer; it must keep at least one, so at most 0 can move"),
    ((0, 1, 0), "'count' must be a whole number of layers, at least 1"),
    ((0, 1, 1.5), "'count' must be a whole number"),
    ((0, 0, 1), "stages 0 and 0 are not adjacent"),
])
def test_bad_layer_moves_are_refused_with_a_reason(args, message):
    with pytest.raises(UserError, match=message):
        move_layers(plan_of("1:1*1*1"), *args)


def test_relayout_follows_the_ratios_and_keeps_what_each_rank_has():
    old = move_units(plan_of("1:1:1"), 0, 2, kv_groups=1)  # kv (0,) (2,) (1, 3)
    new = relayout(old, parse_layout("1:1:2", 3))
    assert [s.n_kv for s in new] == apportion(4, [1, 1, 2])
    assert [len(s.ffn_blocks) for s in new] == apportion(176, [1, 1, 2])
    assert [s.n_vocab for s in new] == [8000, 8000, 16000] and [s.vocab_start for s in new] == [0, 8000, 16000]
    assert [s.kv for s in new] == [(0,), (2,), (1, 3)]  # the counts already fit: no KV head moves
    whole(new)
    moved = diff(old, new)
    assert {m[0] for m in moved} == {"ffn", "vocab"}
    assert sum(m[0] == "ffn" for m in moved) == (59 - 44) * 2 * 6  # ranks 0, 1 give 15 blocks each, every layer
    assert all(m[4] == 2 for m in moved if m[0] == "ffn")
    for same in ("1:1:2", "2:2:4", "0.5:0.5:1"):  # (ratios: one factor times the plan's changes nothing)
        with pytest.raises(UserError, match=f"^--ratios '{same}' would change nothing: the plan is already 1:1:2$"):
            relayout(new, parse_layout(same, 3))
    assert relayout(new, parse_layout("1:1:2.1", 3)).text() == "1:1:2.1"  # (other ratios: a change)


def test_relayout_regroups_stages():
    old = plan_of("1:1*1")  # stage 0: ranks 0-1, layers 0-3; stage 1: rank 2, layers 4-5
    new = relayout(old, parse_layout("1*1:1", 3))
    assert [(st.layers, st.ranks) for st in new.stages] == [((0, 2), (0,)), ((2, 6), (1, 2))]
    assert new[0].kv == (0, 1, 2, 3) and new[1].kv == (2, 3) and new[2].kv == (0, 1)  # each keeps what it can
    whole(new)
    owners = {(m[1], m[2]): m[4] for m in diff(old, new) if m[0] == "kv"}
    assert (3, 2) not in owners and owners[(3, 0)] == 2  # rank 1 keeps heads 2-3 of layer 3; rank 2 takes 0-1
    assert new.text() == "1@2*1:1@4"


def test_random_relayouts_and_moves_keep_every_unit_once():
    rng = random.Random(5)
    plan = plan_of("1:1:1:1")
    for _ in range(40):
        choice = rng.randrange(3)
        try:
            if choice == 0:
                cuts = sorted(rng.sample(range(1, 4), rng.randrange(0, 3)))
                groups = [list(range(a, b)) for a, b in zip([0] + cuts, cuts + [4])]
                text = "*".join(":".join(f"{rng.uniform(0.2, 3):.3f}" for _ in g) for g in groups)
                plan = relayout(plan, parse_layout(text, 4))
            elif choice == 1 and len(plan.stages) > 1:
                s = rng.randrange(len(plan.stages) - 1)
                a, b = (s, s + 1) if rng.random() < 0.5 else (s + 1, s)
                plan = move_layers(plan, a, b, rng.randrange(1, 3))
            else:
                st = plan.stages[rng.randrange(len(plan.stages))]
                if len(st.ranks) > 1:
                    a, b = rng.sample(st.ranks, 2)
                    plan = move_units(plan, a, b, kv_groups=1)
        except UserError:
            continue  # a move the plan refuses (too few units or layers) changes nothing
        whole(plan)
        assert sum(st.n_layers for st in plan.stages) == 6


def test_relayout_refuses_ratios_that_leave_a_rank_nothing():
    plan = plan_of("1:1", SimpleNamespace(n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64, vocab=8))
    with pytest.raises(UserError, match="leave rank 1 no heads"):
        relayout(plan, parse_layout("1000:1", 2))


def test_work_ratios_are_positive_and_follow_the_split():
    plan = move_units(plan_of("1:1:1"), 0, 2, kv_groups=1)
    r = work_ratios(plan.shares)
    assert all(x > 0 for x in r) and r[2] > r[1]

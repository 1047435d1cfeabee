"""The planner: `predict` checked by hand, the search checked against brute force over every layout on random
small clusters (the brute force shares only `predict` with the module), the cases a household meets (a slow rank,
a slow link, too little memory, rank 0's place), the profile's checks, and the command line."""
import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from spmd.errors import UserError
from spmd.plan import parse_layout
from spmd.cluster import load_profile
from spmd import planner
from spmd.planner import alternatives, main, plan, plan_within_limits, predict

HOUSEHOLD = Path(__file__).resolve().parent / "profiles" / "household.json"
TIMES = ("layer_ms", "kv_group_ms", "ffn_block_ms", "head_ms", "vocab_row_ms")


def profile(n, n_layers=8, *, ms=None, hosts=None, memory=None, latency=0.05, bandwidth=1e9, n_kv_heads=4,
            ffn_dim=256, vocab=64, context=128, step_ms=0.2):
    """A profile dict: n ranks; ms[r]: rank r's (layer, kv group, ffn block, head, vocab row) ms at one row, the
    same at every row count (default all (0.1, 1, 0.25, 0.5, 0.01)); latency and bandwidth: a number, or a
    function (i, j) -> number."""
    ms = ms or [(0.1, 1.0, 0.25, 0.5, 0.01)] * n
    link = (lambda v: v if callable(v) else (lambda i, j: v))
    lat, bw = link(latency), link(bandwidth)
    return {"format": "spmd-profile", "version": 1,
            "model": {"file": "m.gguf", "n_layers": n_layers, "dim": 64, "n_heads": 2 * n_kv_heads,
                      "n_kv_heads": n_kv_heads, "head_dim": 8, "ffn_dim": ffn_dim, "vocab": vocab,
                      "context": context, "bytes": {"layer": 100, "kv_group": 1000, "ffn_block": 500, "vocab_row": 10},
                      "kv_bytes_per_position": 1},
            "ranks": [{"rank": r, "host": (hosts or [f"h{i}" for i in range(n)])[r], "backend": "cpu", "threads": 2,
                       "memory_bytes": (memory or [None] * n)[r], "device_memory_bytes": None,
                       "compute": [{"rows": 1, **dict(zip(TIMES, ms[r]))}]} for r in range(n)],
            "links": {"latency_ms": [[None if i == j else lat(i, j) for j in range(n)] for i in range(n)],
                      "bandwidth_bytes_per_s": [[None if i == j else bw(i, j) for j in range(n)] for i in range(n)]},
            "step_ms": step_ms, "seconds": 1.0}


def random_profile(rng, n, n_layers):
    """Random speeds, links and row scaling; hosts sometimes shared; memory sometimes binding, sometimes not
    reported."""
    n_kv, blocks, vocab, context = rng.choice([1, 2, 4]), rng.choice([3, 5, 8]), rng.choice([40, 100]), 32
    p = profile(n, n_layers, n_kv_heads=n_kv, ffn_dim=32 * blocks - rng.choice([0, 7]), vocab=vocab, context=context,
                step_ms=rng.uniform(0, 1), latency=lambda i, j: rng.uniform(0.01, 2),
                bandwidth=lambda i, j: 10 ** rng.uniform(5, 9))
    b = p["model"]["bytes"] = {"layer": rng.randint(0, 500), "kv_group": rng.randint(1000, 9000),
                               "ffn_block": rng.randint(100, 2000), "vocab_row": rng.randint(1, 50)}
    p["model"]["kv_bytes_per_position"] = rng.randint(0, 20)
    whole = n_layers * (b["layer"] + n_kv * b["kv_group"] + blocks * b["ffn_block"]) + vocab * b["vocab_row"]
    for r, rank in enumerate(p["ranks"]):
        if r and rng.random() < 0.3:
            rank["host"] = p["ranks"][r - 1]["host"]
        rank["memory_bytes"] = rng.choice([None, int(whole * rng.uniform(0.2, 1.5))])
        rank["device_memory_bytes"] = rng.choice([None, None, int(whole * rng.uniform(0.2, 1.5))])
        one = {k: rng.uniform(0.01, 2) * rng.choice([0.1, 1, 5]) for k in TIMES}
        rank["compute"] = [{"rows": 1, **one}, {"rows": 3, **{k: v * rng.uniform(1, 3) for k, v in one.items()}}]
    return p


# ---- brute force: shares only predict with the module ------------------------------------------------------
def compositions(total, parts):
    """Every way to write total as an ordered sum of `parts` positive whole numbers."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        yield [b - a for a, b in zip((0,) + cuts, cuts + (total,))]


def at_rows(rank, rows, field):
    """A compute time at `rows` rows: linear between the points, from the last two beyond them."""
    pts = rank["compute"]
    lo, hi = (pts[0], pts[1]) if rows <= pts[1]["rows"] else (pts[-2], pts[-1])
    return lo[field] + (hi[field] - lo[field]) * (rows - lo["rows"]) / (hi["rows"] - lo["rows"])


def layer_units_ms(p, r, rows):
    """Rank r's time for all of one layer's KV groups and FFN blocks: 1 / its speed."""
    m, rank = p["model"], p["ranks"][r]
    return (at_rows(rank, rows, "kv_group_ms") * m["n_kv_heads"]
            + at_rows(rank, rows, "ffn_block_ms") * -(-m["ffn_dim"] // 32))


def stage_text(p, group, rows):
    """A stage's ratios: each working rank's speed, the stage's slowest 1, to 3 significant digits; idle 0."""
    slowest = max(layer_units_ms(p, r, rows) for r, working in group if working)
    return ":".join(f"{float(f'{slowest / layer_units_ms(p, r, rows):.3g}'):g}" if working else "0"
                    for r, working in group)


def brute_force(p, sequences, groupings, run=None):
    """(The least ms per token over every grouping given (lists of stages of (rank, working)) and every layer
    composition, of the layouts that fit, or None; how many layouts did not fit). run: p as a Profile with the
    run's --memory-limits, where it has some."""
    best, short, n_layers = None, 0, p["model"]["n_layers"]
    for groups in groupings:
        if len(groups) > n_layers:
            continue
        rows = -(-sequences // len(groups)) if sequences >= len(groups) else 1
        texts = [stage_text(p, g, rows) for g in groups]
        for counts in compositions(n_layers, len(groups)):
            text = texts[0] if len(groups) == 1 else "*".join(f"{t}@{c}" for t, c in zip(texts, counts))
            try:
                pred = predict(run or p, text, sequences)
            except UserError:  # a rank too slow for a whole unit
                continue
            short += not pred.fits
            if pred.fits and (best is None or pred.ms_per_token < best):
                best = pred.ms_per_token
    return best, short


def every_grouping(n):
    for choice in itertools.product("ijn", repeat=n - 1):
        groups = [[(0, True)]]
        for r, c in enumerate(choice, 1):
            if c == "n":
                groups.append([(r, True)])
            else:
                groups[-1].append((r, c == "j"))
        yield groups


def pipelines(n):
    """Every ordered subset of working ranks, rank 0 first, one a stage; idle ranks written after a stage's."""
    return [g for g in every_grouping(n) if all(sum(w for _, w in s) == 1 for s in g)]


def check_against(p, groupings, objective, sequences, shape, run=None):
    """(Whether a layout fits, whether memory ruled some out); the planner's best is the brute force's."""
    k = 1 if objective == "latency" else sequences
    want, short = brute_force(p, k, groupings, run)
    if want is None:
        with pytest.raises(UserError, match="^no .*layout.* fits"):
            plan(run or p, objective, sequences, shape=shape)
        return False, True
    got = plan(run or p, objective, sequences, shape=shape)
    assert got.fits and got.ms_per_token == pytest.approx(want, rel=1e-9), (got, want)
    assert got == predict(run or p, got.text, k)
    return True, short > 0


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_pipelines_equal_brute_force(objective):
    rng = random.Random(f"pp {objective}")
    done = [check_against(random_profile(rng, n, n_layers), pipelines(n), objective, rng.randint(1, 5), "pp")
            for n, n_layers in ((rng.randint(1, 4), rng.randint(1, 8)) for _ in range(25))]
    assert sum(fit for fit, _ in done) >= 15 and sum(fit and short for fit, short in done) >= 5


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_any_layout_equals_brute_force(objective):
    rng = random.Random(f"any {objective}")
    done = [check_against(random_profile(rng, n, n_layers), list(every_grouping(n)), objective, rng.randint(1, 4),
                          "any") for n, n_layers in ((rng.randint(1, 3), rng.randint(1, 6)) for _ in range(25))]
    assert sum(fit for fit, _ in done) >= 15 and sum(fit and short for fit, short in done) >= 5


# ---- predict, by hand ----------------------------------------------------------------------------------------
def hand_profile():
    """3 ranks, 4 layers, 2 KV groups, 2 FFN blocks, 10 classifier rows; a (1, 64) f32 row is 256 bytes."""
    p = profile(3, 4, ms=[(1.0, 2.0, 0.5, 0.3, 0.01), (2.0, 1.0, 1.0, 0.6, 0.02), (0.4, 0.5, 0.25, 0.1, 0.03)],
                n_kv_heads=2, ffn_dim=64, vocab=10, step_ms=0.25)
    p["links"] = {"latency_ms": [[None, 0.1, 0.2], [0.3, None, 0.4], [0.5, 0.6, None]],
                  "bandwidth_bytes_per_s": [[None, 256e3, 128e3], [512e3, None, 256e3], [64e3, 32e3, None]]}
    return p


def test_predict_a_hybrid_layout_by_hand():
    p = hand_profile()
    # stage 0 (ranks 0, 1; 3 layers): one KV group and one FFN block each
    attn, ffn = max(0.5 + 2.0, 1.0 + 1.0), max(0.5 + 0.5, 1.0 + 1.0)
    star = 2 * (0.1 + 256 / 256e3 * 1e3)  # 2 * link(0, 1, 256 bytes)
    t0 = 3 * (attn + ffn + 2 * star)
    # stage 1 (rank 2; 1 layer): both KV groups and FFN blocks, the 10 classifier rows
    t1 = (0.2 + 2 * 0.5) + (0.2 + 2 * 0.25) + (0.1 + 10 * 0.03) + (0.5 + 8 / 64e3 * 1e3) + (0.2 + 256 / 128e3 * 1e3)
    step = 0.25 + 0.2  # the step record: rank 0's cost and its slowest latency to another rank
    one = predict(p, "1:1@3*1@1")  # 26.7 and 5.125 ms, 32.275 ms per token
    assert one.stage_ms == pytest.approx((t0, t1))
    assert one.ms_per_token == pytest.approx(t0 + t1 + step)
    assert one.tokens_per_s == pytest.approx(1e3 / (t0 + t1 + step))
    two = predict(p, "1:1@3*1@1", sequences=2)  # two sequences, two stages: two ticks of the slower stage
    assert two.ms_per_token == pytest.approx(2 * t0 + 2 * step)
    assert two.tokens_per_s == pytest.approx(2e3 / (2 * t0 + 2 * step))
    # memory: layers * (layer + kv groups * (weights + cache of 128 positions) + blocks * block) + rows * row
    assert one.memory_bytes == (3 * (100 + 1000 + 128 + 500), 3 * (100 + 1000 + 128 + 500),
                                1 * (100 + 2 * (1000 + 128) + 2 * 500) + 10 * 10)
    assert (one.stages, one.layers, one.idle, one.fits) == (((0, 1), (2,)), (3, 1), (), True)


@pytest.mark.parametrize("allreduce, ms", [
    ("star", 2 * max(0.1 + 1.0, 0.2 + 2.0)),  # 2 * the leader's slowest link, 256 bytes
    ("ring", 2 * 2 * max(0.1 + 1 / 3, 0.4 + 1 / 3, 0.5 + 4 / 3)),  # 2 (P - 1) * the slowest neighbour, 256 / 3 bytes
    ("mpi", 2 * 2 * max(1.1, 2.2, 0.3 + 0.5, 0.4 + 1.0, 0.5 + 4.0, 0.6 + 8.0)),  # 2 ceil(log2 3) * the slowest pair
])
def test_predict_one_stage_with_each_allreduce(allreduce, ms):
    # 1:1:1 over 2 KV groups and 2 FFN blocks: ranks 0 and 1 get one of each, rank 2 only classifier rows 4:3:3
    layer = max(0.5 + 2.0, 1.0 + 1.0, 0.2) + max(0.5 + 0.5, 1.0 + 1.0, 0.2) + 2 * ms
    head = max(0.3 + 4 * 0.01, 0.6 + 3 * 0.02, 0.1 + 3 * 0.03) + max(0.3 + 8 / 512e3 * 1e3, 0.5 + 8 / 64e3 * 1e3)
    got = predict(hand_profile(), "1:1:1", allreduce=allreduce)
    assert got.ms_per_token == pytest.approx(4 * layer + head + 0.45)


def test_predict_interpolates_the_rows_of_a_batch():
    p = profile(1, 2, n_kv_heads=2, ffn_dim=64, vocab=10, step_ms=0.5)
    point = {"layer_ms": 1.0, "kv_group_ms": 1.0, "ffn_block_ms": 1.0, "head_ms": 1.0, "vocab_row_ms": 0.1}
    p["ranks"][0]["compute"] = [{"rows": rows, **{k: v * f for k, v in point.items()}}
                                for rows, f in ((1, 1), (4, 2), (16, 5))]
    whole = 2 * (1 + 2 + 2) + 1 + 10 * 0.1  # 2 layers of (layer, 2 groups, 2 blocks), the head: 12 ms at one row
    for k, factor in ((1, 1), (2, 1 + 1 / 3), (4, 2), (10, 3.5), (20, 5 + 3 / 12 * 4)):  # beyond 16: 4..16's slope
        got = predict(p, "1", sequences=k)
        assert got.ms_per_token == pytest.approx(whole * factor + 0.5)
        assert got.tokens_per_s == pytest.approx(k / (whole * factor + 0.5) * 1000)
    p["ranks"][0]["compute"] = p["ranks"][0]["compute"][:1]  # one point: in proportion to the rows
    assert predict(p, "1", sequences=3).ms_per_token == pytest.approx(3 * whole + 0.5)


def test_predict_names_the_memory_that_is_short():
    p = hand_profile()
    p["ranks"][1]["host"] = "h0"  # ranks 0 and 1 share host h0's memory, the smallest reported: 2 * 5184 bytes
    p["ranks"][0]["memory_bytes"], p["ranks"][1]["memory_bytes"] = 2 * 5184, 99999
    assert predict(p, "1:1@3*1@1").fits
    p["ranks"][0]["memory_bytes"] -= 1
    got = predict(p, "1:1@3*1@1")
    assert not got.fits and got.why == "host h0 (ranks 0, 1) would need 10.1 KiB, 1 B more than its 10.1 KiB"
    p["ranks"][0]["memory_bytes"] = None
    p["ranks"][2]["device_memory_bytes"] = 3455
    assert predict(p, "1:1@3*1@1").why.startswith("rank 2's device would need 3.4 KiB, 1 B more")


# ---- the cases a household meets -----------------------------------------------------------------------------
FAST = (0.1, 1.0, 0.25, 0.5, 0.01)


def test_a_rank_whose_memory_holds_two_layers_gets_at_most_two():
    p = profile(2, 8, ms=[FAST, tuple(v / 5 for v in FAST)])
    assert predict(p, "1@1*1@7").ms_per_token < predict(p, "1@6*1@2").ms_per_token  # rank 1 would take more
    per_layer = 100 + 4 * (1000 + 128) + 8 * 500  # all the units of a layer, with 128 positions of cache
    p["ranks"][1]["memory_bytes"] = 2 * per_layer + 64 * 10 + 99  # two layers and the classifier rows
    got = plan(p, "latency", shape="pp")
    assert got.stages == ((0,), (1,)) and got.layers == (6, 2)
    got = plan(p, "latency")
    assert got.fits and got.memory_bytes[1] <= p["ranks"][1]["memory_bytes"]


def test_a_memory_limit_bounds_a_rank_as_its_memory_does_and_where_none_fits_it_is_set_aside():
    p = profile(2, 8, ms=[FAST, tuple(v / 5 for v in FAST)])
    per_layer = 100 + 4 * (1000 + 128) + 8 * 500  # as above
    limit = 2 * per_layer + 64 * 10 + 99
    unlimited = plan(p, "latency")
    assert unlimited.memory_bytes[1] > limit
    got, note = plan_within_limits(p, [None, limit], "latency")
    assert note is None and got.memory_bytes[1] <= limit and got.text != unlimited.text
    got, note = plan_within_limits(p, [100, 100], "latency")  # nothing fits: rank 1 streams what it cannot hold
    assert note.startswith("note: no layout keeps every rank within its --memory-limit") and got == unlimited
    with pytest.raises(UserError, match="^no layout fits in memory"):  # the hosts' own memory still binds
        plan_within_limits(profile(2, 8, memory=[5000, 5000]), [None, None])


def streaming(p, limits, disk):
    """p as a Profile whose ranks read their spill folders at disk[r] bytes/s, run with these --memory-limits."""
    for rank, speed in zip(p["ranks"], disk):
        rank["disk_bytes_per_s"] = speed
    return replace(load_profile(p), memory_limits=tuple(limits))


def test_predict_costs_a_rank_over_its_limit_at_its_disk_speed():
    """Rank 1 (4 layers, the last stage) over its --memory-limit streams what is over plus a window of its largest
    half-layer, each token, at its disk speed: its stage takes the longer of its compute and that read."""
    p = profile(2, 8, ms=[FAST, FAST])
    per_layer = 100 + 4 * (1000 + 128) + 8 * 500  # all the units of a layer, with 128 positions of cache
    need = 4 * per_layer + 64 * 10  # four layers and the classifier rows
    limit = 2 * per_layer + 64 * 10 + 99
    half = 100 // 2 + max(4 * 1000, 8 * 500)  # half the norms, and the larger of the KV groups and FFN blocks
    free = predict(p, "1@4*1@4")
    slow = predict(streaming(p, [None, limit], [None, 1e5]), "1@4*1@4")
    assert slow.fits and slow.streamed_bytes == (0, need - limit + half)
    assert slow.stage_ms == (free.stage_ms[0], max(free.stage_ms[1], (need - limit + half) / 1e5 * 1e3))
    assert slow.stage_ms[1] > free.stage_ms[1]  # at 100 kB/s the disk binds
    fast = predict(streaming(p, [None, limit], [None, 1e12]), "1@4*1@4")
    assert fast.stage_ms == free.stage_ms  # at 1 TB/s it does not
    tiny = predict(streaming(p, [None, 4 * 128 * 4 + 640 + half - 1], [None, 1e9]), "1@4*1@4")  # a byte short
    assert not tiny.fits and "below what it keeps beside its weights and a window of half a layer" in tiny.why
    without = predict(streaming(p, [None, limit], [None, None]), "1@4*1@4")  # no disk speed: a hard limit
    assert not without.fits and "rank 1's --memory-limit would need" in without.why


def test_the_planner_streams_from_a_fast_disk_and_not_from_a_slow_one():
    """Rank 1, five times as fast, is limited to two layers' memory: from a fast disk it is given more layers
    (it streams the rest), from a slow one it keeps within its limit, as when its disk is unknown."""
    p = profile(2, 8, ms=[FAST, tuple(v / 5 for v in FAST)])
    per_layer = 100 + 4 * (1000 + 128) + 8 * 500
    limit = 2 * per_layer + 64 * 10 + 99
    hard = plan(streaming(profile(2, 8, ms=[FAST, tuple(v / 5 for v in FAST)]), [None, limit], [None, None]),
                "latency", shape="pp")
    assert hard.layers == (6, 2) and not any(hard.streamed_bytes)
    fast = plan(streaming(p, [None, limit], [None, 1e12]), "latency", shape="pp")
    assert fast.layers[1] > 2 and fast.streamed_bytes[1] > 0 and fast.ms_per_token < hard.ms_per_token
    slow = plan(streaming(profile(2, 8, ms=[FAST, tuple(v / 5 for v in FAST)]), [None, limit], [None, 1e3]),
                "latency", shape="pp")
    assert slow.layers == (6, 2) and not any(slow.streamed_bytes)


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_layouts_that_stream_equal_brute_force(objective):
    """Ranks over their --memory-limit stream at their disk speed (a cost convex in their layer count, no longer
    affine): the search's layer split still finds the brute force's best over every layout."""
    rng = random.Random(f"stream {objective}")
    streamed = 0
    for _ in range(40):
        n, n_layers = rng.randint(1, 3), rng.randint(1, 6)
        p = random_profile(rng, n, n_layers)
        b, m = p["model"]["bytes"], p["model"]
        whole = n_layers * (b["layer"] + m["n_kv_heads"] * b["kv_group"] + -(-m["ffn_dim"] // 32) * b["ffn_block"])
        limits = [rng.choice([None, int(whole * rng.uniform(0.1, 0.6))]) for _ in range(n)]
        prof = streaming(p, limits, [10 ** rng.uniform(5, 8) for _ in range(n)])
        fit, _ = check_against(p, list(every_grouping(n)), objective, rng.randint(1, 4), "any", prof)
        if fit:
            streamed += any(plan(prof, objective, 4).streamed_bytes)
    assert streamed >= 5


def test_nothing_fits_is_one_line():
    p = profile(2, 8, memory=[5000, 5000])
    with pytest.raises(UserError, match="^no layout fits in memory: .*would need") as e:
        plan(p)
    assert "\n" not in str(e.value)
    # one layer: rank 1 (4 times faster) would hold 6994 bytes at 1:4, both 4676 at 1:1, rank 0 alone 9252
    p = profile(2, 1, ms=[FAST, tuple(v / 4 for v in FAST)], memory=[5000, 5000])
    with pytest.raises(UserError, match=r"^no layout with ratios that follow the ranks' speeds fits in memory "
                                        r"\(with --ratios '1:4', host h1 \(rank 1\) would need 6.8 KiB.*; "
                                        r"--ratios '1:1' would$"):
        plan(p)


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_rank_0_stays_in_stage_0_however_slow(objective):
    p = profile(3, 8, ms=[tuple(20 * v for v in FAST), FAST, FAST], latency=0.01)
    got = plan(p, objective, 3)
    assert got.stages[0][0] == 0 and 0 not in got.idle
    assert parse_layout(got.text, 3)[0].speeds[0] > 0


def test_a_rank_20_times_slower_is_left_idle():
    got = plan(profile(4, 8, ms=[FAST, FAST, tuple(20 * v for v in FAST), FAST]))
    assert got.idle == (2,) and [v for s in parse_layout(got.text, 4) for v in s.speeds][2] == 0


def test_identical_ranks_on_a_fast_link_make_one_stage_of_equal_ratios():
    got = plan(profile(4, 8, latency=0.01, bandwidth=1e10), "latency")
    assert got.text == "1:1:1:1" and got.stages == ((0, 1, 2, 3),)


def test_a_slow_link_between_two_halves_splits_the_stages_there():
    def across(i, j, fast, slow):
        return fast if (i < 2) == (j < 2) else slow
    p = profile(4, 8, hosts=["a", "a", "b", "b"], latency=lambda i, j: across(i, j, 0.01, 5.0),
                bandwidth=lambda i, j: across(i, j, 1e10, 10e6 / 8))  # 10 Mbit/s, 5 ms between the halves
    got = plan(p, "throughput", 4)
    assert got.stages == ((0, 1), (2, 3)) and "*" in got.text and "@" in got.text


def test_alternatives_are_the_best_of_each_shape():
    p = profile(3, 6, ms=[FAST, tuple(v / 2 for v in FAST), FAST], latency=0.3)
    found = alternatives(p, "throughput", 2)
    assert len(found["tp"].stages) == 1 and all(len(s) == 1 for s in found["pp"].stages)
    assert found["best"].ms_per_token <= min(found["tp"].ms_per_token, found["pp"].ms_per_token)
    assert found["tp"] == plan(p, "throughput", 2, shape="tp") and found["pp"] == plan(p, "throughput", 2, shape="pp")


def test_beyond_nine_ranks_the_slowest_are_tried_idle():
    ms = [tuple(20 * v for v in FAST) if r in (4, 7) else FAST for r in range(10)]
    got = plan(profile(10, 8, ms=ms, latency=0.01, bandwidth=1e10, n_kv_heads=8, ffn_dim=512))
    assert got.idle == (4, 7) and got.text == "1:1:1:1:0:1:1:0:1:1"


@pytest.mark.parametrize("n", [10, 12, 13, 16, 40])
def test_beyond_nine_ranks_the_groupings_tried_are_bounded(n):
    """Past 12 ranks every grouping would be too many (16 ranks took two minutes, 20 never ended): where more than
    12 ranks work, the groupings of the fewest stages are tried, at most planner.CANDIDATES of them; 12 working
    ranks or fewer (the slowest idle), every grouping."""
    unit = {r: 1.0 + r for r in range(n)}  # rank n - 1 the slowest, idle first
    got = list(planner._choices(load_profile(profile(n, 2)), lambda r, rows: unit[r]))
    many = [c for c in got if n - c.count("i") > 12]
    assert len(got) == len(set(got)) and len(many) <= planner.CANDIDATES
    assert len(got) - len(many) == sum(2 ** (w - 1) for w in range(1, min(n, 12) + 1))
    if n > 16:  # (2^(n - 1) groupings to list)
        return
    every = set()  # each count of the slowest ranks idle, the others' every join/new pattern: 2^(w - 1) each
    for idle in range(n):
        for moves in itertools.product("jn", repeat=n - 1 - idle):
            every.add(moves + ("i",) * idle)
    stages = max((c.count("n") for c in many), default=n) + 1
    assert set(got) == {c for c in every if n - c.count("i") <= 12 or c.count("n") < stages}
    assert n > 12 or set(got) == every
    wide = {c for c in every if n - c.count("i") > 12}  # a stage more would pass CANDIDATES, or none is left
    assert set(many) == wide or len({c for c in wide if c.count("n") <= stages}) > planner.CANDIDATES


@pytest.mark.parametrize("n", [13, 16])
def test_a_rank_more_never_plans_slower(n):
    """Expensive allreduces make many pipeline stages the best layout: 12 ranks plan 9 stages. With one rank more
    the search had tried at most 4 stages (13 ranks planned 10.4 tokens/s against 12's 18.8); it can leave the rank
    idle and do what 12 do."""
    twelve = plan(profile(12, 64, latency=2.0, step_ms=0.01), "throughput", 8)
    more = plan(profile(n, 64, latency=2.0, step_ms=0.01), "throughput", 8)
    assert more.tokens_per_s >= twelve.tokens_per_s - 1e-9, (more.text, twelve.text)


def test_bad_arguments_are_refused():
    p = profile(2)
    for call, message in ((lambda: plan(p, "fast"), "objective must be one of latency, throughput"),
                          (lambda: plan(p, shape="ring"), "shape must be one of any, tp, pp"),
                          (lambda: predict(p, "1:1", sequences=0), "sequences must be a whole number"),
                          (lambda: predict(p, "1:1", context=0), "context must be a whole number"),
                          (lambda: predict(p, "1:1", allreduce="tree"), "allreduce must be one of star, ring, mpi"),
                          (lambda: predict(p, "0:1"), "rank 0")):
        with pytest.raises(UserError, match=message):
            call()


# ---- the profile ---------------------------------------------------------------------------------------------
def test_a_valid_profile_loads(tmp_path):
    p = load_profile(HOUSEHOLD)
    assert len(p.ranks) == 4 and p.model.n_layers == 32 and p.ranks[1].device_memory_bytes == 6 << 30
    assert load_profile(json.loads(HOUSEHOLD.read_text())).ranks == p.ranks
    saved = tmp_path / "bom.json"  # as some Windows editors save it
    saved.write_bytes(b"\xef\xbb\xbf" + HOUSEHOLD.read_bytes())
    assert load_profile(str(saved)).ranks == p.ranks


def edit(path, value):
    def change(doc):
        *parents, last = path
        for key in parents:
            doc = doc[key]
        if value is KeyError:
            del doc[last]
        else:
            doc[last] = value
    return change


@pytest.mark.parametrize("change, field", [
    (edit(["model", "n_layers"], KeyError), "model.n_layers is missing"),
    (edit(["ranks", 2, "host"], 7), "ranks[2].host must be a string"),
    (edit(["ranks", 0, "memory_bytes"], 0), "ranks[0].memory_bytes must be at least 1"),
    (edit(["ranks", 1, "compute", 1, "kv_group_ms"], float("nan")), "ranks[1].compute[1].kv_group_ms must be a number"),
    (edit(["ranks", 1, "compute", 0, "head_ms"], 1e300),
     "ranks[1].compute[0].head_ms must be a number of at least 0 and at most 1e+15"),
    (edit(["model", "bytes", "ffn_block"], 10 ** 400), "model.bytes.ffn_block must be at most 1152921504606846976"),
    (edit(["model", "ffn_unit"], 1000), "model.ffn_unit must be at most 344"),
    (edit(["ranks"], [{}] * 257), "ranks must be at most 256"),
    (edit(["links", "latency_ms", 1], [0.1, None]), "links.latency_ms[1] must be a list of 4 items"),
    (edit(["links", "bandwidth_bytes_per_s"], [[None]]), "links.bandwidth_bytes_per_s must be a list of 4 items"),
    (edit(["links", "bandwidth_bytes_per_s", 0, 1], 0),
     "links.bandwidth_bytes_per_s[0][1] must be a number above 0"),
    (edit(["ranks", 3, "compute", 0, "rows"], 2), "ranks[3].compute must have rows ascending, rows 1 first"),
    (edit(["model", "bytes", "layer"], 1.5), "model.bytes.layer must be a whole number"),
    (edit(["version"], 2), "version is 2"),
    (edit(["step_ms"], True), "step_ms must be a number"),
])
def test_a_bad_profile_is_refused_in_one_line(tmp_path, change, field):
    doc = json.loads(HOUSEHOLD.read_text())
    change(doc)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError) as e:
        load_profile(str(path))
    assert str(e.value).startswith(f"profile {path}: {field}")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [("{", "is not JSON"), ("[]", "the top level must be an object"),
                                           ("[" * 100000, "nests too deep"),
                                           ('{"version": ' + "1" * 5000 + "}", "thousands of digits"),
                                           ("{}" + " " * (16 << 20), "is over 16 MiB: not a profile")])
def test_a_file_that_is_no_profile_is_refused(tmp_path, text, message):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_profile(str(path))
    with pytest.raises(UserError, match="profile not found"):
        load_profile(str(tmp_path / "missing.json"))


# ---- the command line ----------------------------------------------------------------------------------------
def test_the_cli_prints_a_flag_parse_layout_accepts(capsys):
    main([str(HOUSEHOLD)])
    out = capsys.readouterr().out
    flag = out.splitlines()[0]
    assert flag.startswith("--ratios '") and flag.endswith("'")
    parse_layout(flag[len("--ratios '"):-1], 4)
    assert "ms per token" in out and "left idle" in out and "best TP only" in out and "best PP only" in out


def test_the_cli_writes_json(capsys):
    main([str(HOUSEHOLD), "--objective", "throughput", "--sequences", "4", "--output", "json"])
    found = json.loads(capsys.readouterr().out)
    assert found["tp"] is None  # four sequences' caches fit only when the stages spread them
    for shape in ("best", "pp"):
        layout = parse_layout(found[shape]["ratios"], 4)
        assert found[shape]["flag"] == f"--ratios '{found[shape]['ratios']}'"
        assert len(layout) > 1 and all(s.n_layers for s in layout)  # several stages: every one pinned
        assert all(float(f"{v:.3g}") == v for stage in layout for v in map(float, stage.speeds))  # 3 digits at most
    assert found["best"]["tokens_per_s"] >= found["pp"]["tokens_per_s"] and found["best"]["sequences"] == 4


def test_a_float16_kv_cache_is_planned_at_half_the_bytes(capsys):
    """--kv-cache f16: the profile's float32 figure halved, four sequences' caches fit a one-stage layout that
    float32 ones did not (above), and the best layout predicts more tokens/s."""
    assert load_profile(str(HOUSEHOLD)).with_kv_cache("f16").model.kv_bytes_per_position * 2 == \
        load_profile(str(HOUSEHOLD)).model.kv_bytes_per_position
    found = {}
    for kv_cache in ("f32", "f16"):
        main([str(HOUSEHOLD), "--objective", "throughput", "--sequences", "4", "--output", "json", "--kv-cache",
              kv_cache])
        found[kv_cache] = json.loads(capsys.readouterr().out)
    assert found["f32"]["tp"] is None and found["f16"]["tp"] is not None
    assert len(parse_layout(found["f16"]["tp"]["ratios"], 4)) == 1
    assert found["f16"]["best"]["tokens_per_s"] > found["f32"]["best"]["tokens_per_s"]


@pytest.mark.parametrize("args, message", [
    (["--kv-cache", "f8"], "error: Invalid value for '--kv-cache'"),
    (["--allreduce", "tree"], "error: Invalid value for '--allreduce'"),
    (["--sequences", "0"], "error: Invalid value for '--sequences'"),
    (["--context", "100000000"], "error: context 100000000 is beyond the model's context of"),
    (["--sequences", "4", "--objective", "latency"], "error: --sequences 4 counts only with --objective throughput"),
    (["--bogus"], "error: No such option '--bogus'"),
])
def test_the_cli_refuses_in_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main([str(HOUSEHOLD), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1


def test_the_cli_refuses_a_missing_file(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "none.json")])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: profile not found: {tmp_path / 'none.json'}\n"


@pytest.mark.parametrize("field, value", [("n_layers", 10**9), ("ffn_dim", 10**9), ("vocab", 1 << 23)])
def test_absurd_sizes_are_refused_before_the_search(field, value):
    """An edited profile cannot make the search run away (10^9 layers took all memory)."""
    p = profile(2)
    p["model"][field] = value
    with pytest.raises(UserError, match=f"model.{field} must be at most"):
        load_profile(p)


def test_a_binary_file_is_not_json(tmp_path):
    junk = tmp_path / "junk.json"
    junk.write_bytes(bytes(range(128, 256)))
    with pytest.raises(UserError, match="junk.json is not JSON: it is not UTF-8 text"):
        load_profile(str(junk))


def test_a_profiles_subset_is_the_profile_of_those_ranks_written_out():
    """Profile.subset (a relaunch on the survivors) equals loading a file holding only those ranks, in that order."""
    data = json.loads(HOUSEHOLD.read_text())
    keep = [3, 0, 2]
    by_hand = dict(data, ranks=[dict(data["ranks"][r], rank=i) for i, r in enumerate(keep)],
                   links={name: [[m[a][b] for b in keep] for a in keep] for name, m in data["links"].items()})
    sub = load_profile(HOUSEHOLD).subset(keep)
    want = load_profile(by_hand)
    assert replace(sub, source=want.source) == want
    assert [r.host for r in sub.ranks] == [data["ranks"][r]["host"] for r in keep]
    assert plan(sub, "latency").text == plan(want, "latency").text


def test_a_saved_profile_must_be_of_this_model_and_says_where_its_ranks_ran():
    """check_matches: another shape or other bytes per unit (the same shape in another weight type) is refused;
    ranks measured on other hosts are a note."""
    from types import SimpleNamespace

    from spmd.cluster import check_matches
    doc = profile(2)
    m = doc["model"]
    cfg = SimpleNamespace(**{k: m[k] for k in ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                                               "vocab", "context")})
    unit_bytes = dict(m["bytes"])
    assert check_matches(doc, cfg, unit_bytes, ["h0", "h1"]) == ""
    note = check_matches(doc, cfg, unit_bytes, ["h0", "laptop"])
    assert note.startswith("note: the profile was measured with rank 1 on h1, now laptop:")
    with pytest.raises(UserError, match=r"another model \(bytes of an FFN block 500, this one 2000\)"):
        check_matches(doc, cfg, {**unit_bytes, "ffn_block": 2000}, ["h0", "h1"])
    with pytest.raises(UserError, match=r"another model \(head_dim 8, this one 16\)"):
        check_matches(doc, SimpleNamespace(**{**vars(cfg), "head_dim": 16}), unit_bytes, ["h0", "h1"])
    with pytest.raises(UserError, match=r"another model \(context 128, this one 4096\)"):  # (its limits came from it)
        check_matches(doc, SimpleNamespace(**{**vars(cfg), "context": 4096}), unit_bytes, ["h0", "h1"])
    with pytest.raises(UserError, match="measured on 2 ranks but the job has 3"):
        check_matches(doc, cfg, unit_bytes, ["h0", "h1", "h2"])


def test_a_job_whose_plan_fits_nowhere_names_its_own_flags(tmp_path):
    """spmd.run --plan FILE where no layout fits: one line naming spmd.run's flags (it named the planner's
    --context, which spmd.run does not have); spmd.plan names its own."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    made = subprocess.run([sys.executable, "-m", "spmd.profile", "--model", "spmd/embedded.gguf", "--threads", "1",
                           "--repeats", "1", "--out", str(tmp_path / "p.json")], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    profile = json.loads((tmp_path / "p.json").read_text())
    profile["ranks"][0]["memory_bytes"] = 1
    (tmp_path / "q.json").write_text(json.dumps(profile))
    p = subprocess.run([sys.executable, "-m", "spmd.run", "--steps", "3", "--plan", str(tmp_path / "q.json")],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == "" and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith("error: no layout fits in memory") and "--context" not in p.stderr
    assert p.stderr.rstrip().endswith("(fewer --sequences or --steps)"), p.stderr
    p = subprocess.run([sys.executable, "-m", "spmd.plan", str(tmp_path / "q.json")], cwd=root, capture_output=True,
                       text=True, timeout=120)  # the planner's own command names its own
    assert p.returncode == 2 and p.stderr.rstrip().endswith("shorter ones (--sequences, --context)"), p.stderr

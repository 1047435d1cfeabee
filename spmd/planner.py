"""The automatic planner: a profile of the cluster (`python -m spmd.profile`, read by `spmd.cluster`) and the
run's needs -> the layout text `--ratios` takes. Pure, no MPI; `python -m spmd.plan PROFILE.json` runs `main`.

The cost model: `predict` and the functions it calls (`_stage_cost`, `_stage_terms`, `_memory_terms`, `_cycle_ms`).
A layout is always evaluated through `spmd.plan.make_plan`, so the prediction is for the real plan and its whole
units. For stages s = 0..S-1 with working ranks R_s (leader R_s[0]) and n_s layers, rank r holding k_r KV groups,
f_r FFN blocks and v_r classifier rows; K sequences in flight, a batch of b = ceil(K / S) rows when K >= S, else 1;
B = b * dim * 4 bytes (one f32 row per batch row); link(i, j, x) = latency_ms[i][j] + x / bandwidth[i][j] * 1e3:
    attn_r = layer_ms / 2 + k_r * kv_group_ms, ffn_r = layer_ms / 2 + f_r * ffn_block_ms, head_r = head_ms
             + v_r * vocab_row_ms, each at b rows (linear between measured rows, from the last two beyond them,
             never below the last: noise can make the last two fall; one point: in proportion to the rows)
    layer_s = max_r attn_r + max_r ffn_r + 2 * allreduce_s(B); one-rank stage: no allreduce
        star: 2 * max_{r in R_s[1:]} link(leader, r, B)
        ring: 2 * (P - 1) * max over ring neighbours r_i -> r_{i+1 mod P} of link(r_i, r_{i+1}, B / P)
        mpi:  2 * ceil(log2 P) * max over ordered pairs of the stage of link(i, j, B)
    t_s = n_s * layer_s + (last stage: max_r head_r + max_{r in R_last, r != 0} link(r, 0, 8 * b))
          + (s > 0: max_{r in R_s} link(R_{s-1}[0], r, B), the hand-off in)
    step = step_ms + max_{r != 0} latency_ms[0][r]   (the step record reaches every rank, idle ones too)
    cycle = max(sum_s t_s, m * max_s t_s) + m * step, m = min(K, S): every sequence advances one token
    ms per token = cycle; tokens/s = K / cycle * 1000
    memory_r = n_s * (layer + k_r * kv_group + f_r * ffn_block + k_r * kv_bytes_per_position * context * K)
               + v_r * vocab_row; an idle rank holds nothing. The ranks of a host must fit together in its
               memory_bytes (the smallest reported there); a rank with device_memory_bytes must fit in it too.
    A rank with a --memory-limit L_r (the run's, Profile.memory_limits) fits within it, unless the profile has
    its disk read speed d_r (`Profile.streaming`): then it may go over and stream, each token,
        streamed_r = memory_r - L_r + half_r   (half_r = layer / 2 + max(k_r * kv_group, f_r * ffn_block))
    which must leave memory_r - n_s * (layer + k_r * kv_group + f_r * ffn_block) + half_r within L_r, and
        t_s = max(the t_s above, max over its streaming ranks of streamed_r / d_r)   (the loader reads ahead).

The search (`plan`): every grouping of ranks 1..n-1 into {idle, joins the current stage, starts a new stage}
(3^(n-1): exhaustive up to EXHAUSTIVE ranks, 6561 groupings, a few seconds; beyond, 3^(n-1) takes minutes, so only
the j slowest ranks are tried idle, j = 0..n-1, each with the groupings of the n' others into stages: every 2^(n'-1)
of them where n' <= FULL (12), and where more work, into at most S stages, S the most that keeps those groupings
within CANDIDATES (13 at 13 ranks, 4 at 16, 2 at 64): the 12 fastest ranks are always grouped every way, as 12 ranks
are (a 13th rank had made a 9-stage plan a 4-stage one). This misses a layout that idles a fast rank, say one behind
a slow link, or has more stages than S with more than 12 ranks working.) Inside a stage each rank's ratio is its
speed, 1 / its time for a whole layer's units at b rows, the stage's slowest 1, rounded to 3 significant digits; the
rounded text is what is evaluated. Given the grouping and ratios, t_s is affine in n_s (a_s * n_s + c_s) and each
rank's memory in its stage's n_s (with streaming ranks t_s is convex in n_s: affine, then the steeper disk time), so
the layer split is exact: with T a bound on every t_s and f(T) the least sum_s t_s under it and the memory limits
(one layer each, then each next layer where it adds least; where one host's ranks sit in several stages, a dynamic
programme over the stages instead), the cycle of that split is at most max(f(T), m * T) + m * step, and the least of
that over T (at the first T with m * T >= f(T), or the one before) is the optimum. Every stage is pinned with @N. A
stage's units come from make_plan of its ratios, once per stage; a grouping's value comes from the cost functions
above, and each one that may beat the best so far is `predict`ed from its text. The latency objective plans one
sequence (K = 1, whatever `sequences` says); throughput, K = `sequences`. Ties: fewer working ranks, then fewer
stages, then the smaller text."""
import heapq
import json
import math
import sys
from bisect import bisect_right
from dataclasses import dataclass, replace
from itertools import combinations, product
from math import comb
from typing import NamedTuple

import click

from .choices import ALLREDUCES, KV_CACHES
from .cluster import Compute, Profile, as_profile, load_profile
from .errors import UserError, click_main, human_size
from .plan import make_plan, n_ffn_blocks, parse_layout

EXHAUSTIVE = 9  # ranks searched over every grouping (3^8 = 6561 candidates)
CANDIDATES = 4096  # past EXHAUSTIVE ranks, the most groupings of more than FULL working ranks tried
FULL = 12  # past EXHAUSTIVE ranks, working ranks up to this many are grouped into stages every way (2^(w-1))
SHAPES = ("any", "tp", "pp")
OBJECTIVES = ("latency", "throughput")


# ---- the cost model ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    """What a layout is predicted to do (see the module docstring)."""
    text: str  # the layout, as --ratios takes it
    ms_per_token: float  # one sequence's time per token: one cycle
    tokens_per_s: float  # all sequences together
    stage_ms: tuple  # t_s per stage
    stages: tuple  # the working ranks of each stage
    layers: tuple  # layer count of each stage
    memory_bytes: tuple  # per rank (0 for an idle one)
    fits: bool
    why: str  # one line naming the shortfall when it does not fit, else ""
    idle: tuple  # ranks given a ratio of 0
    sequences: int  # K the prediction is for
    context: int  # positions per sequence the KV caches hold
    streamed_bytes: tuple = ()  # per rank, weights streamed from disk per token (over a --memory-limit)


class _Work(NamedTuple):
    """What the cost model reads of a plan."""
    stages: tuple  # the working ranks of each stage
    layers: tuple  # layer count of each stage
    units: tuple  # (KV groups, FFN blocks, classifier rows) per rank; (0, 0, 0) for an idle one


def _work_of(plan) -> _Work:
    return _Work(tuple(st.ranks for st in plan.stages), tuple(st.n_layers for st in plan.stages),
                 tuple((s.n_kv, len(s.ffn_blocks), s.n_vocab) for s in plan.shares))


def _rows(sequences, n_stages) -> int:
    """Rows of a stage's batch: the sequences share the stages' ticks."""
    return -(-sequences // n_stages) if sequences >= n_stages else 1


def _allreduce_ms(prof, ranks, n_bytes, kind) -> float:
    """One allreduce of n_bytes among a stage's working ranks."""
    p = len(ranks)
    if p == 1:
        return 0.0
    if kind == "star":
        links = 2 * max(prof.link_ms(ranks[0], r, n_bytes) for r in ranks[1:])
    elif kind == "ring":
        links = 2 * (p - 1) * max(prof.link_ms(a, ranks[(i + 1) % p], n_bytes / p) for i, a in enumerate(ranks))
    else:
        links = 2 * math.ceil(math.log2(p)) * max(prof.link_ms(i, j, n_bytes) for i in ranks for j in ranks if i != j)
    return links + prof.allreduce_ms


def _stage_cost(prof, ranks, units, rows, allreduce, last) -> tuple:
    """(ms per layer, ms of the head and the candidates' return, or 0 outside the last stage) of one stage."""
    pts = [(prof.ranks[r].at(rows), units[r]) for r in ranks]
    attn = max(p.layer_ms / 2 + k * p.kv_group_ms for p, (k, f, v) in pts)
    ffn = max(p.layer_ms / 2 + f * p.ffn_block_ms for p, (k, f, v) in pts)
    per_layer = attn + ffn + 2 * _allreduce_ms(prof, ranks, rows * prof.model.dim * 4, allreduce)
    if not last:
        return per_layer, 0.0
    return per_layer, (max(p.head_ms + v * p.vocab_row_ms for p, (k, f, v) in pts)
                       + max((prof.link_ms(r, 0, 8 * rows) for r in ranks if r != 0), default=0.0))


def _stage_terms(prof, work, rows, allreduce, cost=_stage_cost) -> list:
    """(a_s, c_s) per stage: t_s = a_s * n_s + c_s ms. `cost`: _stage_cost, or a cache of it."""
    out = []
    for s, ranks in enumerate(work.stages):
        a, c = cost(prof, ranks, work.units, rows, allreduce, s == len(work.stages) - 1)
        if s > 0:  # the hand-off in: one (rows, dim) f32 from the previous stage's leader
            c += max(prof.link_ms(work.stages[s - 1][0], r, rows * prof.model.dim * 4) for r in ranks)
        out.append((a, c))
    return out


def _memory_terms(prof, work, sequences, context) -> list:
    """(bytes per layer of its stage, fixed bytes) per rank; (0, 0) for an idle one."""
    m, working = prof.model, {r for ranks in work.stages for r in ranks}
    return [(m.layer_bytes + k * m.kv_group_bytes + f * m.ffn_block_bytes
             + k * m.kv_bytes_per_position * context * sequences, v * m.vocab_row_bytes) if r in working else (0, 0)
            for r, (k, f, v) in enumerate(work.units)]


def _stream_terms(prof, work) -> dict:
    """{rank: (its --memory-limit, its weights per layer, a window of its largest half-layer, disk bytes/s)} of
    the working ranks that may stream (Profile.streaming)."""
    m, working = prof.model, {r for ranks in work.stages for r in ranks}
    out = {}
    for r, limit in prof.streaming.items():
        if r in working:
            k, f, _ = work.units[r]
            out[r] = (limit, m.layer_bytes + k * m.kv_group_bytes + f * m.ffn_block_bytes,
                      m.layer_bytes // 2 + max(k * m.kv_group_bytes, f * m.ffn_block_bytes),
                      prof.ranks[r].disk_bytes_per_s)
    return out


def _streamed_bytes(need, n, term):
    """Weights a rank holding `need` bytes (n layers of its stage) streams per token under its limit (`term`,
    from _stream_terms): 0 within it, else what is over plus a window of one half; None where not even the rest
    and that window fit."""
    limit, per_layer, half, _ = term
    if need <= limit:
        return 0
    if need - per_layer * n + half > limit:
        return None
    return need - limit + half


def _stage_table(term, cap, n_most, ranks, mem, stream) -> list:
    """t_s for n_s = 1, 2, ... while it fits (cap, n_most, every streaming rank's limit): a_s * n + c_s, or,
    where a rank streams, its disk time for the streamed bytes if longer (the loader reads while the stage
    computes). Convex and rising in n."""
    (a, c), out = term, []
    for n in range(1, min(cap, n_most) + 1):
        t = a * n + c
        for r in ranks:
            if r in stream:
                streamed = _streamed_bytes(mem[r][0] * n + mem[r][1], n, stream[r])
                if streamed is None:
                    return out
                t = max(t, streamed / stream[r][3] * 1e3)
        out.append(t)
    return out


def _cycle_ms(stage_ms, sequences, step_ms) -> float:
    """One cycle, in which every sequence in flight advances one token."""
    m = min(sequences, len(stage_ms))
    return max(sum(stage_ms), m * max(stage_ms)) + m * step_ms


def _step_ms(prof) -> float:
    """Rank 0's cost of one step record: its fixed cost and the slowest rank to hear of it."""
    return prof.step_ms + max((prof.latency_ms[0][r] for r in range(1, len(prof.ranks))), default=0.0)


def _check_run(prof, sequences, context, allreduce) -> int:
    """The context the run's KV caches hold, after checking the run's needs."""
    if isinstance(sequences, bool) or not isinstance(sequences, int) or sequences < 1:
        raise UserError(f"sequences must be a whole number of at least 1, not {sequences!r}")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise UserError(f"context must be a whole number of positions, at least 1, not {context!r}")
    if allreduce not in ALLREDUCES:
        raise UserError(f"allreduce must be one of {', '.join(ALLREDUCES)}, not {allreduce!r}")
    if context is not None and context > prof.model.context:
        raise UserError(f"context {context} is beyond the model's context of {prof.model.context} positions")
    return prof.model.context if context is None else context


def predict(profile, text, sequences=1, context=None, allreduce="star") -> Prediction:
    """The prediction for a layout text with `sequences` sequences in flight, each up to `context` positions
    (default: the model's context). `profile`: a Profile, a path or a decoded dict."""
    prof = as_profile(profile)
    context = _check_run(prof, sequences, context, allreduce)
    work = _work_of(make_plan(parse_layout(text, len(prof.ranks)), prof.model))
    terms = _stage_terms(prof, work, _rows(sequences, len(work.stages)), allreduce)
    stage_ms = [a * n + c for (a, c), n in zip(terms, work.layers)]
    n_layers = {r: n for ranks, n in zip(work.stages, work.layers) for r in ranks}
    memory = tuple(per * n_layers.get(r, 0) + fixed
                   for r, (per, fixed) in enumerate(_memory_terms(prof, work, sequences, context)))
    short = [f"{what} would need {human_size(need)}, {human_size(need - room)} more than its {human_size(room)}"
             for ranks, room, what in prof.limits if (need := sum(memory[r] for r in ranks)) > room]
    streamed = [0] * len(prof.ranks)
    for s, ranks in enumerate(work.stages):
        for r, term in _stream_terms(prof, work).items():
            if r in ranks:
                streamed[r] = _streamed_bytes(memory[r], n_layers[r], term)
                if streamed[r] is None:
                    limit, per_layer, half, _ = term
                    floor = memory[r] - per_layer * n_layers[r] + half
                    short.append(f"rank {r}'s --memory-limit of {human_size(limit)} is below what it keeps beside its "
                                 f"weights and a window of half a layer, {human_size(floor)}")
                    streamed[r] = 0
                stage_ms[s] = max(stage_ms[s], streamed[r] / term[3] * 1e3)
    cycle = _cycle_ms(stage_ms, sequences, _step_ms(prof))
    return Prediction(text, cycle, sequences / cycle * 1000 if cycle > 0 else math.inf, tuple(stage_ms),
                      work.stages, work.layers, memory, not short, short[0] if short else "",
                      tuple(r for r in range(len(prof.ranks)) if r not in n_layers), sequences, context,
                      tuple(streamed))


def allreduce_ms(profile, ranks, rows, kind="star") -> float:
    """What one allreduce of `rows` hidden rows costs among a stage's working `ranks` (the cost model's)."""
    prof = as_profile(profile)
    return _allreduce_ms(prof, tuple(ranks), rows * prof.model.dim * 4, kind)


def rank_compute_ms(profile, plan, rows) -> list:
    """Per rank, the compute one batch of `rows` decode rows costs it under `plan` (a Plan): its layers' two
    halves and its head, no communication; None for an idle rank. What `--rebalance` holds each rank's measured
    compute against."""
    prof = as_profile(profile)
    out = [None] * len(prof.ranks)
    for st in plan.stages:
        last = st.index == len(plan.stages) - 1
        for r in st.ranks:
            p, s = prof.ranks[r].at(rows), plan[r]
            head = p.head_ms + s.n_vocab * p.vocab_row_ms if last else 0.0
            out[r] = st.n_layers * (p.layer_ms + s.n_kv * p.kv_group_ms + len(s.ffn_blocks) * p.ffn_block_ms) + head
    return out


def scaled(profile, factors) -> Profile:
    """The profile with each rank's compute times multiplied by its factor (a rank measured slower or faster
    than profiled)."""
    prof = as_profile(profile)
    ranks = tuple(replace(r, compute=tuple(Compute(p.rows, *(v * f for v in p[1:])) for p in r.compute))
                  for r, f in zip(prof.ranks, factors))
    return replace(prof, ranks=ranks)


# ---- the search ----------------------------------------------------------------------------------------------
def _ratio_text(x) -> str:
    """At most 3 significant digits, without an exponent while it reads well: 2.4666 -> '2.47'."""
    return f"{float(f'{x:.3g}'):g}"


def _choices(prof, unit_ms):
    """Each rank after rank 0: 'i' idle, 'j' joins the current stage, 'n' starts a new one (module docstring)."""
    n = len(prof.ranks)
    if n <= EXHAUSTIVE:
        yield from product("ijn", repeat=n - 1)
        return
    slowest = sorted(range(1, n), key=lambda r: (-unit_ms(r, 1), r))
    most = _most_stages(n)
    for j in range(n):
        idle, working = set(slowest[:j]), n - j
        for new in range(working if working <= FULL else most):  # stages after the first
            for starts in combinations(range(working - 1), new):
                moves = ["j"] * (working - 1)
                for i in starts:
                    moves[i] = "n"
                it = iter(moves)
                yield tuple("i" if r in idle else next(it) for r in range(1, n))


def _most_stages(n) -> int:
    """The most stages a grouping of more than FULL of n ranks may have so that `_choices` yields at most
    CANDIDATES of them (at least 1): for each count of working ranks w = FULL + 1..n, the groupings of w ranks into
    s stages number C(w - 1, s - 1)."""
    def count(stages):
        return sum(comb(w - 1, k) for w in range(FULL + 1, n + 1) for k in range(stages))
    return max([1] + [s for s in range(1, n + 1) if count(s) <= CANDIDATES])


def _groups(choice) -> list:
    """The stages as the text writes them, idle ranks included: [((rank, working), ...), ...]."""
    out = [[(0, True)]]
    for r, c in enumerate(choice, 1):
        if c == "n":
            out.append([(r, True)])
        else:
            out[-1].append((r, c == "j"))
    return [tuple(g) for g in out]


def _ratios(groups, rows, unit_ms) -> dict:
    """Each rank's ratio text: its speed at `rows` rows (1 / its time for a layer's units), its stage's slowest 1;
    an idle rank 0."""
    out = {}
    for g in groups:
        unit = {r: unit_ms(r, rows) for r, working in g if working}
        slowest = max(unit.values())
        for r, _ in g:
            out[r] = "0" if r not in unit else _ratio_text(slowest / max(unit[r], slowest * 1e-6) if slowest else 1)
    return out


def _layout_text(groups, ratios, layers=None) -> str:
    parts = [":".join(ratios[r] for r, _ in g) for g in groups]
    return parts[0] if len(parts) == 1 else "*".join(f"{p}@{n}" for p, n in zip(parts, layers))


class _Search:
    """One search's inputs and caches: a stage's units and costs recur across the groupings."""

    def __init__(self, prof, sequences, context, allreduce):
        self.prof, self.sequences, self.context, self.allreduce = prof, sequences, context, allreduce
        self.step_ms = _step_ms(prof)
        self._cache = {}

    def cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def unit_ms(self, rank, rows) -> float:
        """A rank's time for one whole layer's units at `rows` rows (1 / its speed)."""
        def make():
            p, m = self.prof.ranks[rank].at(rows), self.prof.model
            return p.kv_group_ms * m.n_kv_heads + p.ffn_block_ms * n_ffn_blocks(m.ffn_dim)
        return self.cached(("unit", rank, rows), make)

    def stage_units(self, ratios, last):
        """(KV groups, FFN blocks, classifier rows) of each rank of a stage written `ratios`, from make_plan of
        its working ranks (a stage's units follow its own ratios; an idle rank gets none); None when a rank with a
        ratio would get nothing."""
        working = tuple(v for v in ratios if v != "0")

        def make():
            try:
                shares = make_plan(parse_layout(":".join(working), len(working)), self.prof.model).shares
            except UserError:  # the grouping with that rank idle is another candidate
                return None
            units = [(s.n_kv, len(s.ffn_blocks), s.n_vocab * last) for s in shares]
            return None if (0, 0, 0) in units else units  # outside the last stage, classifier rows do not count
        units = self.cached(("units", working, last), make)
        if units is None:
            return None
        held = iter(units)
        return tuple(next(held) if v != "0" else (0, 0, 0) for v in ratios)

    def stage_cost(self, prof, ranks, units, rows, allreduce, last):
        return self.cached(("cost", ranks, tuple(units[r] for r in ranks), rows, last),
                           lambda: _stage_cost(prof, ranks, units, rows, allreduce, last))

    def candidate(self, choice):
        """(predicted ms per cycle, layout text) of one grouping's best layer split, its ratios fixed by the
        ranks' speeds; None if no split fits or a rank with a ratio gets nothing."""
        groups, n_layers, k = _groups(choice), self.prof.model.n_layers, self.sequences
        if len(groups) > n_layers:
            return None
        rows = _rows(k, len(groups))
        ratios = _ratios(groups, rows, self.unit_ms)
        units = [self.stage_units(tuple(ratios[r] for r, _ in g), i == len(groups) - 1) for i, g in enumerate(groups)]
        if None in units:
            return None
        work = _Work(tuple(tuple(r for r, w in g if w) for g in groups), None, sum(units, ()))
        terms = _stage_terms(self.prof, work, rows, self.allreduce, self.stage_cost)
        mem = _memory_terms(self.prof, work, k, self.context)
        bounds = _memory_bounds(self.prof, work, mem, n_layers)
        if bounds is None:
            return None
        caps, coupled = bounds
        stream = _stream_terms(self.prof, work)
        tables = [_stage_table(term, cap, n_layers - len(terms) + 1, ranks, mem, stream)
                  for term, cap, ranks in zip(terms, caps, work.stages)]
        counts = _layer_split(tables, n_layers, k, coupled)
        if not counts:
            return None
        ms = _cycle_ms([table[n - 1] for table, n in zip(tables, counts)], k, self.step_ms)
        return ms, _layout_text(groups, ratios, counts)


def _memory_bounds(prof, work, mem, n_layers):
    """Most layers each stage's memory allows on its own, and the limits that couple several stages (a host
    whose ranks sit in more than one): (caps, [(bytes per layer of each stage, bytes left), ...]); None when
    the fixed bytes alone do not fit."""
    stage_of = {r: s for s, ranks in enumerate(work.stages) for r in ranks}
    caps, coupled = [n_layers] * len(work.stages), []
    for ranks, room, _ in prof.limits:
        per = [0] * len(caps)
        for r in ranks:
            if r in stage_of:
                per[stage_of[r]] += mem[r][0]
                room -= mem[r][1]
        touched = [s for s, w in enumerate(per) if w]
        if room < 0:
            return None
        if len(touched) == 1:
            caps[touched[0]] = min(caps[touched[0]], room // per[touched[0]])
        elif touched:
            coupled.append((tuple(per), room))
    return caps, coupled


def _least_sum(ms, hi, n_layers, coupled):
    """Layer counts (each 1..hi_s, summing to n_layers, within the coupled limits) of least sum_s t_s(n_s), with
    t_s(n) = ms[s][n - 1] convex in n (affine, or affine then steeper where a rank streams)."""
    if not coupled:  # one each, then each next layer where it adds least (ties: the lower stage)
        counts, rest = [1] * len(ms), n_layers - len(ms)
        step = lambda s: (float(f"{ms[s][counts[s]] - ms[s][counts[s] - 1]:.12g}"), s)  # noqa: E731 - rounding noise
        heap = [step(s) for s in range(len(ms)) if hi[s] > 1]
        heapq.heapify(heap)
        for _ in range(rest):
            if not heap:
                return None
            _, s = heapq.heappop(heap)
            counts[s] += 1
            if counts[s] < hi[s]:
                heapq.heappush(heap, step(s))
        return counts
    last = [max(s for s, w in enumerate(per) if w) for per, _ in coupled]
    states = {(0, (0,) * len(coupled)): (0.0, ())}  # (layers so far, bytes so far per limit) -> (cost, counts)
    for s in range(len(ms)):
        grown = {}
        for (used, held), (cost, counts) in states.items():
            for n in range(1, min(hi[s], n_layers - used - (len(ms) - 1 - s)) + 1):
                now = tuple(h + per[s] * n for h, (per, _) in zip(held, coupled))
                if any(h > room for h, (_, room) in zip(now, coupled)):
                    break
                key = (used + n, tuple(0 if last[i] <= s else h for i, h in enumerate(now)))  # settled: forget
                if key not in grown or cost + ms[s][n - 1] < grown[key][0]:
                    grown[key] = (cost + ms[s][n - 1], counts + (n,))
        states = _pareto(grown)
    done = [v for (used, _), v in states.items() if used == n_layers]
    return list(min(done)[1]) if done else None


def _pareto(states) -> dict:
    """Drop each state that another with as many layers beats or equals in both cost and bytes held."""
    kept, out = {}, {}
    for (used, held), (cost, counts) in sorted(states.items(), key=lambda kv: (kv[1], kv[0])):
        front = kept.setdefault(used, [])
        if not any(all(x <= y for x, y in zip(h, held)) for h in front):
            front.append(held)
            out[(used, held)] = (cost, counts)
    return out


def _layer_split(ms, n_layers, sequences, coupled):
    """The layer counts of least cycle, or None when no split fits; ms[s][n - 1]: t_s with n layers, for each n
    that fits (_stage_table). With T a bound on every t_s and f(T) the least sum_s t_s under it, the cycle is at
    most max(f(T), m * T) (+ m * step), and the least of that over T is the optimum; f falls and m * T grows with
    T, so the least is at the first T where m * T >= f(T) or the one before it."""
    def under(bound):  # (least sum_s t_s with every t_s <= bound, the counts), or (inf, None)
        hi = [bisect_right(v, bound) for v in ms]
        counts = (_least_sum(ms, hi, n_layers, coupled) if min(hi) >= 1 and sum(hi) >= n_layers else None)
        return (math.inf, None) if counts is None else (sum(v[n - 1] for v, n in zip(ms, counts)), counts)
    m = min(sequences, len(ms))
    if m == 1:  # the cycle is the sum
        return under(math.inf)[1]
    bounds = sorted({t for v in ms for t in v})
    lo, top = 0, len(bounds)  # bisection: m * T - f(T) grows with T
    while lo < top:
        mid = (lo + top) // 2
        lo, top = (lo, mid) if m * bounds[mid] >= under(bounds[mid])[0] else (mid + 1, top)
    found = [under(bounds[i])[1] for i in (lo - 1, lo) if 0 <= i < len(bounds)]
    found = [c for c in found if c is not None]
    return min(found, key=lambda c: _cycle_ms([ms[s][n - 1] for s, n in enumerate(c)], sequences, 0.0), default=None)


def _better(new, old) -> bool:
    """Less time per cycle (both objectives: K is fixed); ties: fewer ranks, fewer stages, the smaller text."""
    if old is None or new.ms_per_token < old.ms_per_token * (1 - 1e-9):
        return True
    if new.ms_per_token > old.ms_per_token * (1 + 1e-9):
        return False
    key = (lambda p: (sum(map(len, p.stages)), len(p.stages), p.text))
    return key(new) < key(old)


def _search(prof, objective, sequences, context, allreduce) -> dict:
    """The best layout that fits of each shape ("any", "tp", "pp"; None where none fits). A grouping's value
    comes from the same cost functions as `predict`; each one that may beat a best so far is predicted whole."""
    if objective not in OBJECTIVES:
        raise UserError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    context = _check_run(prof, sequences, context, allreduce)
    k = 1 if objective == "latency" else sequences
    search, best = _Search(prof, k, context, allreduce), dict.fromkeys(SHAPES)
    for choice in _choices(prof, search.unit_ms):
        shapes = ["any"] + ["tp"] * ("n" not in choice) + ["pp"] * ("j" not in choice)
        found = search.candidate(choice)
        if found is None or all(best[s] and found[0] > best[s].ms_per_token * (1 + 1e-9) for s in shapes):
            continue
        pred = predict(prof, found[1], k, context, allreduce)
        for shape in shapes:
            if pred.fits and _better(pred, best[shape]):
                best[shape] = pred
    if best["any"] is None:
        _shortfall(prof, search)
    return best


class TooLong(UserError):
    """No layout fits, even with the model spread over every rank: fewer or shorter sequences may (the caller
    names its own flags for them)."""


def _shortfall(prof, search):
    """Raise why nothing fits (TooLong where no layout would; a UserError naming one that would)."""
    # from one stage over every rank (the most spread out): with the search's ratios, equal ones, or rank 0 alone
    # (when some rank would get nothing); and a layout that fits if one of those does
    n, groups = len(prof.ranks), _groups("j" * (len(prof.ranks) - 1))
    whys = {}
    for text in (_layout_text(groups, _ratios(groups, search.sequences, search.unit_ms)), ":".join(["1"] * n),
                 ":".join(["1"] + ["0"] * (n - 1))):
        try:
            whys.setdefault(text, predict(prof, text, search.sequences, search.context, search.allreduce).why)
        except UserError:
            continue
    short, fits = [t for t, why in whys.items() if why], [t for t, why in whys.items() if not why]
    if fits:  # short holds rank 0 alone at least: the search tried it
        raise UserError(f"no layout with ratios that follow the ranks' speeds fits in memory (with --ratios "
                        f"'{short[0]}', {whys[short[0]]}); --ratios '{fits[0]}' would")
    raise TooLong(f"no layout fits in memory: even with --ratios '{short[0]}', {whys[short[0]]}; give fewer "
                  "sequences or shorter ones")


def plan(profile, objective="latency", sequences=1, context=None, shape="any", allreduce="star") -> Prediction:
    """The best layout that fits, for the objective (latency: one sequence; throughput: `sequences` in flight),
    of the shape asked ("any", "tp": one stage, "pp": one working rank a stage); UserError if nothing fits."""
    if shape not in SHAPES:
        raise UserError(f"shape must be one of {', '.join(SHAPES)}, not {shape!r}")
    best = _search(as_profile(profile), objective, sequences, context, allreduce)
    if best[shape] is None:
        raise UserError(f"no {shape.upper()} layout fits in memory; the best that fits is --ratios "
                        f"'{best['any'].text}'")
    return best[shape]


def plan_within_limits(profile, limits, objective="latency", sequences=1, context=None, allreduce="star"):
    """(plan's choice with each rank's --memory-limit in `limits` (bytes or None), None). A rank whose disk speed
    the profile has may go over its limit, streaming weights from disk at that speed (costed: Profile.streaming);
    one without is held within it, as by memory of its own. Where no layout fits that way: (the choice without
    the limits, a note), the ranks over their limit then streaming at a cost the model does not know."""
    limited = replace(as_profile(profile), memory_limits=tuple(limits))
    try:
        return plan(limited, objective, sequences, context, allreduce=allreduce), None
    except UserError:
        if not any(limit is not None for limit in limits):
            raise
    found = plan(profile, objective, sequences, context, allreduce=allreduce)
    return found, ("note: no layout keeps every rank within its --memory-limit; planned as if there were none "
                   "(ranks over their limit stream weights from disk at a cost the planner could not weigh)")


def alternatives(profile, objective="latency", sequences=1, context=None, allreduce="star") -> dict:
    """{"best": the chosen Prediction, "tp": the best one-stage one, "pp": the best one-rank-a-stage one (None
    where none fits)}, from one search; UserError if nothing fits."""
    best = _search(as_profile(profile), objective, sequences, context, allreduce)
    return {"best": best["any"], "tp": best["tp"], "pp": best["pp"]}


# ---- the CLI -------------------------------------------------------------------------------------------------
def _summary(pred) -> str:
    return f"--ratios '{pred.text}': {pred.ms_per_token:.2f} ms per token, {pred.tokens_per_s:.2f} tokens/s"


def _memory_lines(prof, pred) -> list:
    """Each working rank's bytes, each limit's use of what it has, each idle rank named."""
    out = [f"rank {r.rank} (host {r.host}, {r.backend}): {human_size(pred.memory_bytes[r.rank])}"
           for r in prof.ranks if r.rank not in pred.idle]
    out += [f"{what}: {human_size(sum(pred.memory_bytes[r] for r in ranks))} of {human_size(room)} available"
            for ranks, room, what in prof.limits]
    out += [f"rank {r}: over its --memory-limit of {human_size(prof.memory_limits[r])}, streams "
            f"{human_size(b)} a token from disk" for r, b in enumerate(pred.streamed_bytes) if b]
    return out + [f"rank {r} (host {prof.ranks[r].host}): left idle (the layout is predicted faster without it)"
                  for r in pred.idle]


def _as_dict(prof, pred) -> dict:
    first = [sum(pred.layers[:s]) for s in range(len(pred.layers))]
    return {"ratios": pred.text, "flag": f"--ratios '{pred.text}'", "ms_per_token": pred.ms_per_token,
            "tokens_per_s": pred.tokens_per_s, "sequences": pred.sequences, "context": pred.context,
            "stages": [{"stage": s, "ranks": list(rs), "layers": [a, a + n], "ms": ms}
                       for s, (rs, a, n, ms) in enumerate(zip(pred.stages, first, pred.layers, pred.stage_ms))],
            "ranks": [{"rank": r.rank, "host": r.host, "idle": r.rank in pred.idle,
                       "memory_bytes": pred.memory_bytes[r.rank], "host_memory_bytes": r.memory_bytes,
                       "device_memory_bytes": r.device_memory_bytes,
                       "streamed_bytes_per_token": pred.streamed_bytes[r.rank] if pred.streamed_bytes else 0}
                      for r in prof.ranks]}


def _report(prof, found, objective, allreduce) -> str:
    best = found["best"]
    first = [sum(best.layers[:s]) for s in range(len(best.layers))]
    lines = [f"--ratios '{best.text}'",
             f"predicted {best.ms_per_token:.2f} ms per token, {best.tokens_per_s:.2f} tokens/s ({objective}, "
             f"{best.sequences} sequence{'s' * (best.sequences > 1)} of up to {best.context} positions, "
             f"{allreduce} allreduce)"]
    lines += [f"stage {s}: layers {a}-{a + n - 1} on rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))}: "
              f"{ms:.2f} ms" for s, (rs, a, n, ms) in enumerate(zip(best.stages, first, best.layers, best.stage_ms))]
    lines += _memory_lines(prof, best)
    lines += [f"best {k.upper()} only: " + (_summary(found[k]) if found[k] else "none fits") for k in ("tp", "pp")]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("profile_path", metavar="PROFILE.json")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=None,
              help="latency: one sequence's time per token; throughput: tokens/s of --sequences together. "
                   "Default: throughput with --sequences above 1, else latency.")
@click.option("--sequences", default=1, show_default=True, type=click.IntRange(min=1),
              help="Sequences in flight (the throughput objective; latency plans one).")
@click.option("--context", type=click.IntRange(min=1), help="Positions per sequence (default: the model's).")
@click.option("--allreduce", type=click.Choice(ALLREDUCES), default="star", show_default=True,
              help="The allreduce the run will use inside a stage (spmd.run's --allreduce).")
@click.option("--kv-cache", type=click.Choice(KV_CACHES), default="f32", show_default=True,
              help="What the run's KV caches will hold (spmd.run's --kv-cache): f16 takes half the memory.")
@click.option("--output", type=click.Choice(("text", "json")), default="text", show_default=True,
              help="json: one object, the chosen layout ('best') and the best TP-only and PP-only ones.")
def cli(profile_path, objective, sequences, context, allreduce, kv_cache, output):
    """The layout (--ratios) predicted best for the cluster a profile (python -m spmd.profile) measured."""
    prof = load_profile(profile_path).with_kv_cache(kv_cache)
    objective = objective or ("throughput" if sequences > 1 else "latency")
    if objective == "latency" and sequences > 1:
        raise UserError(f"--sequences {sequences} counts only with --objective throughput (latency plans one)")
    try:
        found = alternatives(prof, objective, sequences, context, allreduce)
    except TooLong as e:
        raise UserError(f"{e} (--sequences, --context)") from None
    if output == "json":
        click.echo(json.dumps({"objective": objective, "allreduce": allreduce,
                               **{k: found[k] and _as_dict(prof, found[k]) for k in found}}))
    else:
        click.echo(_report(prof, found, objective, allreduce))


def main(argv=None):
    """`python -m spmd.plan`: a bad file or flag is one line on stderr and exit status 2."""
    try:
        click_main(cli, "python -m spmd.plan", argv)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)

"""Live changes to a plan, as pure functions from a plan to the next one (its epoch one higher); no MPI here.

    move_units(plan, src, dst, kv_groups=, ffn_blocks=)   KV-head groups and/or FFN blocks between two ranks of a
                                                           stage: the source's last units, nothing else moves
    move_layers(plan, from_stage, to_stage, count)         the `count` boundary layers between adjacent stages
    relayout(plan, layout)                                 a whole new layout (`plan.parse_layout`) for the same
                                                           ranks, stage structure included; each rank keeps what
                                                           it can of its KV heads and FFN blocks
    diff(old, new)                                         the units that change hands, layer by layer

`spmd.repartition` carries a new plan out on every rank; `spmd.control` validates requests with these functions.
"""
from dataclasses import replace
from fractions import Fraction
from types import SimpleNamespace

from .errors import UserError, as_sent
from .plan import Plan, apportion, n_ffn_blocks, refuse_empty, stage_layers, stage_shares, starts


def dims_of(plan) -> SimpleNamespace:
    """The model's sizes that a plan needs, read back from the plan itself."""
    s = plan.shares[0]
    last = plan.stages[-1]
    return SimpleNamespace(n_layers=plan.n_layers, n_kv_heads=sum(plan[r].n_kv for r in plan.stages[0].ranks),
                           n_heads=sum(plan[r].n_heads for r in plan.stages[0].ranks), ffn_dim=s.ffn_dim,
                           vocab=sum(plan[r].n_vocab for r in last.ranks))


def _next(plan, shares, speeds, why) -> Plan:
    refuse_empty(shares, speeds, why)
    return Plan(tuple(shares), tuple(speeds), plan.epoch + 1)


def _check_rank(plan, what, r):
    if not isinstance(r, int) or isinstance(r, bool):
        raise UserError(f"'{what}' must be a rank, a whole number (got {as_sent(r)})")
    if not 0 <= r < len(plan):
        raise UserError(f"'{what}' rank {r} is out of range: the job has ranks 0..{len(plan) - 1}")


def work_ratios(shares) -> tuple:
    """Positive ratios that describe how a stage's ranks split its work (each rank's mean fraction of KV heads, FFN
    blocks and vocabulary rows): the speeds after a move, which weight the ring allreduce's chunks."""
    totals = [sum(s.n_kv for s in shares), sum(len(s.ffn_blocks) for s in shares), sum(s.n_vocab for s in shares)]
    kinds = [i for i, t in enumerate(totals) if t]
    out = []
    for s in shares:
        mine = (s.n_kv, len(s.ffn_blocks), s.n_vocab)
        out.append(sum(Fraction(mine[i], totals[i]) for i in kinds) / len(kinds))
    return tuple(max(r, Fraction(1, 10**6)) for r in out)  # a rank with nothing of a kind still gets a chunk


def move_units(plan, src: int, dst: int, kv_groups: int = None, ffn_blocks: int = None) -> Plan:
    """`kv_groups` KV-head groups and `ffn_blocks` FFN blocks (at least one of them) from rank `src` to rank `dst`
    of the same stage: the source's last units (highest indices). Everything else stays in place."""
    _check_rank(plan, "from", src)
    _check_rank(plan, "to", dst)
    if src == dst:
        raise UserError(f"'from' and 'to' are both rank {src}: nothing would move")
    for r in (src, dst):
        if r in plan.idle:
            raise UserError(f"rank {r} is idle (ratio 0): give it work with a new layout ('ratios')")
    stage = plan.stage_of(src)
    if dst not in stage.ranks:
        raise UserError(f"ranks {src} and {dst} are in different stages ({stage.index} and "
                        f"{plan.stage_of(dst).index}): heads and FFN columns move inside a stage; move layers "
                        "between stages")
    a, b = plan[src], plan[dst]
    new_a, new_b = {}, {}
    for field, n, noun, key in (("kv", kv_groups, "KV-head group", "kv_groups"),
                                ("ffn_blocks", ffn_blocks, "FFN block", "ffn_blocks")):
        if n is None:
            continue
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UserError(f"'{key}' must be a whole number of {noun}s, at least 1 (got {as_sent(n)})")
        held = getattr(a, field)
        if n > len(held):
            raise UserError(f"rank {src} has {len(held)} {noun}{'s' * (len(held) != 1)}; cannot move {n}")
        new_a[field] = held[:len(held) - n]
        new_b[field] = tuple(sorted(getattr(b, field) + held[len(held) - n:]))
    if not new_a:
        raise UserError("nothing to move: give 'kv_groups' and/or 'ffn_blocks'")
    shares = list(plan.shares)
    shares[src], shares[dst] = replace(a, **new_a), replace(b, **new_b)
    total = sum(plan.stage_speeds(stage))  # the stage's speed stays comparable with the other stages'
    work = work_ratios([shares[r] for r in stage.ranks])
    speeds = list(plan.speeds)
    for r, w in zip(stage.ranks, work):
        speeds[r] = w * total / sum(work)
    return _next(plan, shares, speeds, f"moving them from rank {src}")


def move_layers(plan, from_stage: int, to_stage: int, count: int) -> Plan:
    """The `count` layers at the boundary of adjacent stages move from `from_stage` to `to_stage` (its last layers
    when `to_stage` follows it, its first when it precedes it); each stage keeps at least one layer."""
    stages = plan.stages
    for what, s in (("from_stage", from_stage), ("to_stage", to_stage)):
        if not isinstance(s, int) or isinstance(s, bool):
            raise UserError(f"'{what}' must be a stage, a whole number (got {as_sent(s)})")
        if not 0 <= s < len(stages):
            raise UserError(f"'{what}' {s} is out of range: the plan has stages 0..{len(stages) - 1}")
    if abs(from_stage - to_stage) != 1:
        raise UserError(f"stages {from_stage} and {to_stage} are not adjacent: layers move between neighbours")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise UserError(f"'count' must be a whole number of layers, at least 1 (got {as_sent(count)})")
    src = stages[from_stage]
    if count >= src.n_layers:
        raise UserError(f"stage {from_stage} has {src.n_layers} layer{'s' * (src.n_layers != 1)}; it must keep at "
                        f"least one, so at most {src.n_layers - 1} can move")
    (a, b), (c, d) = src.layers, stages[to_stage].layers
    new = {from_stage: (a, b - count), to_stage: (b - count, d)} if to_stage > from_stage else \
        {from_stage: (a + count, b), to_stage: (c, a + count)}
    shares = [replace(s, layers=new[g.index]) if g.index in new else s  # idle ranks too: they stay in place
              for g in plan.groups for s in (plan[r] for r in g.ranks)]
    return _next(plan, shares, plan.speeds, "moving layers")


def _keep_what_you_can(held, counts, n_units) -> list:
    """Per-rank unit tuples (possibly overlapping: ranks from different stages) -> new disjoint tuples of `counts`
    units covering 0..n_units-1, each rank keeping as many of its own as it can, lowest rank first; the rest go out
    lowest first."""
    taken, kept = set(), []
    for h, c in zip(held, counts):
        mine = [u for u in h if u not in taken][:c]
        taken.update(mine)
        kept.append(mine)
    pool = [u for u in range(n_units) if u not in taken]
    out = []
    for k, c in zip(kept, counts):
        take, pool = pool[:c - len(k)], pool[c - len(k):]
        out.append(tuple(sorted(k + take)))
    return out


def relayout(plan, layout) -> Plan:
    """A plan for the parsed `layout` (same rank count), each rank keeping what it can of its units; refuses one
    that would change nothing (the same shares, and ratios that are the plan's times one factor)."""
    n = sum(len(s.speeds) for s in layout)
    if n != len(plan):
        raise UserError(f"{layout.what} has {n} ranks but the job has {len(plan)}")
    dims = dims_of(plan)
    counts = stage_layers(layout, dims.n_layers)
    shares, rank = [], 0
    for i, (spec, first, count) in enumerate(zip(layout, starts(counts), counts)):
        ranks = range(rank, rank + len(spec.speeds))
        kv = _keep_what_you_can([plan[r].kv for r in ranks], apportion(dims.n_kv_heads, spec.speeds),
                                dims.n_kv_heads)
        blocks = _keep_what_you_can([plan[r].ffn_blocks for r in ranks],
                                    apportion(n_ffn_blocks(dims.ffn_dim), spec.speeds), n_ffn_blocks(dims.ffn_dim))
        shares += stage_shares(tuple(ranks), spec.speeds, (first, first + count), dims, i == len(layout) - 1,
                               kv, blocks)
        rank += len(ranks)
    speeds = tuple(v for s in layout for v in s.speeds)
    scale = sum(speeds) / sum(plan.speeds)  # ('2:2' is '1:1': ratios, not speeds; Fractions, exact)
    if tuple(shares) == plan.shares and all(a * scale == b for a, b in zip(plan.speeds, speeds)):
        raise UserError(f"{layout.what} would change nothing: the plan is already {plan.text()}")
    return _next(plan, shares, speeds, layout.what)


def diff(old, new) -> list:
    """The units that change hands: [(unit, layer, index, from_rank, to_rank)], unit "kv" (a KV-head group of a
    layer), "ffn" (an FFN block of a layer) or "vocab" (a classifier row; layer None), in a fixed order."""
    def owners(plan, unit):
        if unit == "vocab":
            return {(None, i): s.rank for s in plan for i in range(s.vocab_start, s.vocab_start + s.n_vocab)}
        return {(layer, i): s.rank for s in plan for layer in s.layer_ids
                for i in (s.kv if unit == "kv" else s.ffn_blocks)}
    moves = []
    for unit in ("kv", "ffn", "vocab"):
        before, after = owners(old, unit), owners(new, unit)
        moves += [(unit, key[0], key[1], before[key], after[key]) for key in
                  sorted(after, key=lambda k: (k[0] or 0, k[1])) if before[key] != after[key]]
    return moves

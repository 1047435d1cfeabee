"""The fixed live-migration schedules of the acceptance scenarios, in `python -m spmd.migrate`'s words, and the
control-socket request each entry is sent as. Pure: nothing here runs anything.

    unit_schedule   one stage (scenarios 5, 6): a kind 1, 2 and 3 move between ranks, then new ratios
    layer_schedule  a pipeline (scenarios 9, 10): layers carried stage by stage to the end of the pipeline and back,
                    a regrouping into another stage structure, then a kind-3 move inside a stage of the new one

Each entry: `at` (the token position it applies at), `args` (spmd.migrate's arguments: `move`, `layers` or
`ratios` first, `--at` last) and, in a layer schedule, `stages`: the layers and ranks of every stage once it is
applied, counted here from the layer counts the schedule itself moves (the reply must say the same).
"""
from spmd.errors import UserError
from spmd.plan import FFN_BLOCK, apportion, parse_layout, stage_layers


def positions(n_prompt: int, steps: int, count: int) -> list:
    """`count` distinct positions spread evenly from 30% to 75% of the generation's token boundaries (n_prompt ..
    n_prompt + steps - 2), with a boundary left after the last for a last status; a ValueError when `steps` is too
    few for them."""
    span = steps - 1
    at = []
    for k in range(count):
        p = n_prompt + max(1, round(span * (0.3 + 0.45 * k / max(1, count - 1))))
        at.append(max(p, at[-1] + 1) if at else p)
    if at and at[-1] > n_prompt + steps - 3:
        raise ValueError(f"{steps} steps are too few for {count} migrations at distinct positions")
    return at


def at_positions(cmds, n_prompt, steps) -> list:
    """[(args, stages or None)] -> the schedule entries, each at its own position."""
    return [dict(at=p, args=args + ["--at", str(p)], **({"stages": stages} if stages else {}))
            for p, (args, stages) in zip(positions(n_prompt, steps, len(cmds)), cmds)]


def move_args(kind, a, b, heads=0, n_blocks=0) -> list:
    return (["move", "--kind", str(kind), "--from", str(a), "--to", str(b)] + ["--heads", str(heads)] * bool(heads)
            + ["--ffn-blocks", str(n_blocks)] * bool(n_blocks))


def unit_schedule(config: dict, ratios: str, n_ranks: int, n_prompt: int, steps: int) -> list:
    """One stage: kind 1 (KV-head groups), kind 2 (FFN blocks), kind 3 (both), then new ratios, each at its own
    position. Moves are chosen on the plan the earlier moves leave (most-loaded rank to least-loaded); a ValueError
    when no rank has the units a move needs."""
    speeds = parse_layout(ratios, n_ranks)[0].speeds
    kv = apportion(config["n_kv_heads"], speeds)
    blocks = apportion(-(-config["ffn_dim"] // FFN_BLOCK), speeds)
    total_blocks = sum(blocks)

    def most(counts, floor=1):
        return max((c, r) for r, c in enumerate(counts) if c >= floor)[1]

    def least(counts, other):
        return min((c, r) for r, c in enumerate(counts) if r != other)[1]

    def move(kind, a, b, heads=0, n_blocks=0):
        kv[a], kv[b] = kv[a] - heads, kv[b] + heads
        blocks[a], blocks[b] = blocks[a] - n_blocks, blocks[b] + n_blocks
        return move_args(kind, a, b, heads, n_blocks), None

    a = most(kv)
    cmds = [move(1, a, least(kv, a), heads=1)]
    a = most(blocks, 2)
    cmds.append(move(2, a, least(blocks, a), n_blocks=max(1, min(blocks[a] - 1, total_blocks // (4 * n_ranks)))))
    a = max((kv[r], blocks[r], r) for r in range(n_ranks) if kv[r] >= 1 and blocks[r] >= 2)[2]
    cmds.append(move(3, a, least(blocks, a), heads=1, n_blocks=max(1, blocks[a] // 4)))
    new = ":".join(reversed(ratios.split(":")))
    cmds.append((["ratios", new if new != ratios else ":".join(str(r + 1) for r in range(n_ranks))], None))
    return at_positions(cmds, n_prompt, steps)


def regrouped(groups: list) -> list:
    """Another stage structure for the same ranks: stage 0's last rank joins stage 1 when stage 0 has several
    (1:1*1 -> 1*1:1), else stages 0 and 1 merge (1*1*1 -> 1:1*1)."""
    if groups[0] > 1:
        return [groups[0] - 1, groups[1] + 1] + groups[2:]
    return [groups[0] + groups[1]] + groups[2:]


def stage_list(groups, counts) -> list:
    """Rank counts and layer counts per stage -> [{"layers": [first, stop], "ranks": [...]}]."""
    out, layer, rank = [], 0, 0
    for g, c in zip(groups, counts):
        out.append({"layers": [layer, layer + c], "ranks": list(range(rank, rank + g))})
        layer, rank = layer + c, rank + g
    return out


def layer_schedule(config: dict, layout: str, n_ranks: int, n_prompt: int, steps: int) -> list:
    """A pipeline: layers carried from stage 0 (from the last stage where stage 0 has only one) stage by stage to the
    other end of the pipeline and back, the same count each time; then a regrouping `ratios` into another stage
    structure (every stage's layer count pinned with @N); then a kind-3 move between two ranks of a stage of that
    structure. A ValueError when the layout has one stage, or its first and last stages one layer each."""
    specs = parse_layout(layout, n_ranks)
    if len(specs) < 2:
        raise ValueError(f"{layout!r} has one stage: there are no stages to move layers between")
    n_layers, groups = config["n_layers"], [len(s.speeds) for s in specs]
    try:
        counts = stage_layers(specs, n_layers)
    except UserError as e:  # more stages than layers, or @N counts that do not add up
        raise ValueError(str(e)) from None
    order = list(range(len(specs)))  # layers travel from an end stage that can spare some, through to the other
    if counts[0] == 1:
        order.reverse()
    n, cmds = min(max(1, n_layers // (2 * len(specs))), counts[order[0]] - 1), []
    if n < 1:
        raise ValueError(f"the first and last stages of {layout!r} hold one layer each: neither has one to give")

    def layers(a, b):
        counts[a], counts[b] = counts[a] - n, counts[b] + n
        args = ["layers", "--from-stage", str(a), "--to-stage", str(b), "--count", str(n)]
        cmds.append((args, stage_list(groups, counts)))

    hops = list(zip(order, order[1:]))
    for a, b in hops + [(b, a) for a, b in reversed(hops)]:
        layers(a, b)
    groups = regrouped(groups)
    counts = [n_layers // len(groups) + (i < n_layers % len(groups)) for i in range(len(groups))]
    speeds = [f"{float(v):g}" for s in specs for v in s.speeds]
    parts, rank = [], 0
    for g, c in zip(groups, counts):
        parts.append(":".join(speeds[rank:rank + g]) + (f"@{c}" if len(groups) > 1 else ""))
        rank += g
    stages = stage_list(groups, counts)
    cmds.append((["ratios", "*".join(parts)], stages))
    inside = next((st for st in stages if len(st["ranks"]) > 1), None)
    if inside:
        cmds.append((unit_move(config, inside["ranks"], speeds), stages))
    return at_positions(cmds, n_prompt, steps)


def unit_move(config, ranks, speeds) -> list:
    """A kind-3 move (kind 2 where no rank has a KV head to spare) from the stage's most-loaded rank to another."""
    speeds = [speeds[r] for r in ranks]
    kv = apportion(config["n_kv_heads"], speeds)
    blocks = apportion(-(-config["ffn_dim"] // FFN_BLOCK), speeds)
    i = max(range(len(ranks)), key=lambda j: (kv[j], blocks[j], -j))
    to = ranks[1] if i == 0 else ranks[0]
    if kv[i] >= 1 and blocks[i] >= 2:
        return move_args(3, ranks[i], to, heads=1, n_blocks=max(1, blocks[i] // 4))
    return move_args(2, ranks[i], to, n_blocks=max(1, blocks[i] // 4))


MIGRATE_FIELDS = {"--kind": "kind", "--from": "from", "--to": "to", "--heads": "kv_groups",
                  "--ffn-blocks": "ffn_blocks", "--from-stage": "from_stage", "--to-stage": "to_stage",
                  "--count": "count"}  # spmd.migrate's flags -> the request's fields


def request_of(args) -> dict:
    """The control socket's request line for a schedule entry given in `spmd.migrate`'s words."""
    if args[0] == "status":
        return {"cmd": "status"}
    req, flags = {"cmd": "migrate"}, args[1:]
    if args[0] == "ratios":
        req["ratios"], flags = args[1], args[2:]
    elif args[0] == "layers":
        req["kind"] = "layers"
    flags = dict(zip(flags[::2], flags[1::2]))
    req.update({MIGRATE_FIELDS[f]: int(v) for f, v in flags.items() if f in MIGRATE_FIELDS})
    return {**req, "mode": "at", "at": int(flags["--at"])}

"""The plan: which rank runs which work, as one frozen value with an epoch. Pure functions, no MPI.

A plan splits the model's layers into **stages** (pipeline parallelism) and, inside each stage, every layer's work
among the stage's ranks (tensor parallelism). A stage is a run of consecutive ranks that hold the same layer range;
stage 0 holds layer 0 and contains rank 0. Inside a stage the work is handed out in whole units: a KV head with the
query heads that share it, a 32-column FFN block (the quant block of the down projection; the last block may be
partial), and, in the last stage only (where the classifier runs), a vocabulary row. A rank holds the same KV heads
and FFN blocks in each of its stage's layers.

The layout text (`--ratios`, EdgeVisor's syntax): `*` separates stages, `:` the ranks inside a stage, `@N` pins a
stage's layer count. Every number is a rank's relative speed, comparable across the whole cluster:
    2:3:3          one stage of three ranks (tensor parallelism only)
    1*1*1          three stages of one rank (pipeline only)
    1:1*2:3        two stages, ranks 0-1 and 2-3
    1:1@10*1:1@12  the same with 10 and 12 layers
    2:0:3          rank 1 idle: a 0 leaves a rank (never rank 0) with nothing; it takes part in no stage's work
A stage without `@N` gets layers in proportion to the sum of its ranks' speeds (largest remainder, at least one);
units inside a stage follow its ranks' speeds. Everything else (the ring allreduce's chunk weights, the logits
counts, the layout text shown) is derived from the plan; live changes to it are in `spmd.replan`.
"""
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

from .errors import UserError

FFN_BLOCK = 32
RATIO_RANGE = (1e-6, 1e6)


def ranges(indices) -> list:
    """Sorted unit indices -> merged [start, stop) ranges: (0, 1, 2, 5) -> [(0, 3), (5, 6)]."""
    out = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def scale_ranges(spans, unit, limit=None) -> list:
    """Unit ranges -> element ranges of `unit` elements each (clipped to `limit`, for a partial last block)."""
    out = [(a * unit, b * unit if limit is None else min(b * unit, limit)) for a, b in spans]
    return [(a, b) for a, b in out if b > a]


@dataclass(frozen=True)
class Share:
    """One rank's work: its stage's layers, and in each of them its KV heads (with their query heads) and FFN
    blocks; and its classifier rows (in the last stage)."""
    rank: int
    layers: tuple  # (first, stop): the stage's layer range
    kv: tuple  # sorted KV-head indices; the rank holds query heads j*group .. (j+1)*group-1 of each
    group: int  # query heads per KV head
    ffn_blocks: tuple  # sorted FFN block indices; block b is columns b*FFN_BLOCK .. min((b+1)*FFN_BLOCK, ffn_dim)-1
    ffn_dim: int  # the model's FFN width (the last block may be partial)
    vocab_start: int
    n_vocab: int  # classifier rows vocab_start .. vocab_start+n_vocab-1 (0 outside the last stage)

    @property
    def layer_ids(self) -> range:
        return range(*self.layers)

    @property
    def n_kv(self) -> int:
        return len(self.kv)

    @property
    def n_heads(self) -> int:
        return self.n_kv * self.group

    @property
    def n_ffn(self) -> int:
        return sum(b - a for a, b in self.ffn_ranges)

    @property
    def kv_ranges(self) -> list:
        return ranges(self.kv)

    @property
    def head_ranges(self) -> list:
        return scale_ranges(self.kv_ranges, self.group)

    @property
    def ffn_ranges(self) -> list:
        """FFN columns held, as merged [start, stop) ranges."""
        return scale_ranges(ranges(self.ffn_blocks), FFN_BLOCK, self.ffn_dim)

    @property
    def is_empty(self) -> bool:
        return self.n_kv == 0 and self.n_ffn == 0 and self.n_vocab == 0

    def describe(self) -> dict:
        """What the rank holds, for the result and the control socket: an idle rank's layers are an empty range (its
        `layers` keep its place in the layout text, where it may be woken)."""
        first = self.layers[0]
        return {"layers": [first, first] if self.is_empty else list(self.layers), "heads": self.n_heads,
                "kv_heads": self.n_kv, "ffn_columns": self.n_ffn, "vocab_rows": self.n_vocab}

    def layout(self) -> dict:
        """Which units the rank holds, as [start, stop) ranges (the result's and the control socket's plan)."""
        return {"rank": self.rank, **self.describe(),
                "kv_groups": [list(r) for r in self.kv_ranges], "head_ranges": [list(r) for r in self.head_ranges],
                "ffn_blocks": [list(r) for r in ranges(self.ffn_blocks)],
                "ffn_column_ranges": [list(r) for r in self.ffn_ranges],
                "vocab_range": [self.vocab_start, self.vocab_start + self.n_vocab]}


@dataclass(frozen=True)
class Stage:
    index: int
    layers: tuple  # (first, stop)
    ranks: tuple  # consecutive rank numbers; ranks[0] is the stage's leader

    @property
    def n_layers(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class Plan:
    """Every rank's share, each rank's relative speed, and how many re-partitions made it (the epoch)."""
    shares: tuple  # Share per rank, in rank order
    speeds: tuple  # Fraction per rank: the ratios it was made from (a move sets them to the work each rank holds)
    epoch: int = 0

    def __len__(self):
        return len(self.shares)

    def __getitem__(self, rank) -> Share:
        return self.shares[rank]

    def __iter__(self):
        return iter(self.shares)

    @cached_property  # derived once per plan (written to the instance's __dict__, which frozen allows)
    def groups(self) -> tuple:
        """The stages as the layout text writes them, idle ranks included: Stage per run of consecutive ranks
        that hold the same layers."""
        out = []
        for s in self.shares:
            if out and out[-1].layers == s.layers:
                out[-1] = Stage(out[-1].index, s.layers, out[-1].ranks + (s.rank,))
            else:
                out.append(Stage(len(out), s.layers, (s.rank,)))
        return tuple(out)

    @cached_property
    def stages(self) -> tuple:
        """The stages, in order, each with its working ranks only (an idle rank is in none)."""
        return tuple(Stage(g.index, g.layers, tuple(r for r in g.ranks if r not in self.idle)) for g in self.groups)

    @cached_property
    def idle(self) -> tuple:
        """The ranks given a ratio of 0: they hold nothing and take part in no stage's work."""
        return tuple(r for r, v in enumerate(self.speeds) if v == 0)

    def stage_of(self, rank):
        """The stage whose work `rank` shares; None for an idle rank."""
        return next((st for st in self.stages if rank in st.ranks), None)

    @property
    def n_layers(self) -> int:
        return self.shares[-1].layers[1]

    def stage_speeds(self, stage: Stage) -> tuple:
        """The speeds of a stage's ranks: the weights of its ring allreduce's chunks."""
        return tuple(self.speeds[r] for r in stage.ranks)

    def text(self) -> str:
        """The layout as `--ratios` takes it: '2:3:3' for one stage, '1:1@10*2:3@12' for several."""
        groups = self.groups
        parts = [":".join(f"{float(self.speeds[r]):g}" for r in st.ranks) for st in groups]
        if len(groups) == 1:
            return parts[0]
        return "*".join(f"{p}@{st.n_layers}" for p, st in zip(parts, groups))

    def describe(self) -> list:
        """[{stage, layers, ranks}] for the result and the control socket (working ranks; idle ones apart)."""
        return [{"stage": st.index, "layers": list(st.layers), "ranks": list(st.ranks)} for st in self.stages]

    def layout(self) -> list:
        """Per rank: its stage (None when idle) and the units it holds (`Share.layout`)."""
        stage = {r: st.index for st in self.stages for r in st.ranks}
        return [{**s.layout(), "stage": stage.get(s.rank)} for s in self.shares]


# ---- the layout text ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSpec:
    speeds: tuple  # Fraction per rank of the stage
    n_layers: int = None  # pinned with @N, else None


@dataclass(frozen=True)
class Layout:
    """A parsed layout: its stages, and how messages name it ("--ratios '1:1*2'", "ratios '1*1'")."""
    stages: tuple  # StageSpec per stage
    what: str

    def __iter__(self):
        return iter(self.stages)

    def __len__(self):
        return len(self.stages)

    def __getitem__(self, i):
        return self.stages[i]


NUMBER = re.compile(r"[+-]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?|[0-9]+/[0-9]+)", re.ASCII)
COUNT = re.compile(r"[0-9]+", re.ASCII)


def _numbers(part, what):
    pieces = [p.strip() for p in part.replace(",", ":").split(":")]
    bad = f"{what}: expected numbers separated by ':' and stages by '*' (for example 2:3:3 or 1:1*2)"
    if not all(len(p) <= 64 and NUMBER.fullmatch(p) for p in pieces):  # (Python will not read an integer of
        # more than 4300 digits, and no ratio in range needs 64 characters)
        raise UserError(bad)
    try:  # float() first: Fraction("1e100000000") would build a 100-million-digit integer
        approx = [float(Fraction(p)) if "/" in p else float(p) for p in pieces]
    except ZeroDivisionError:
        raise UserError(bad) from None
    if any(not v >= 0 for v in approx):
        raise UserError(f"{what}: every ratio must be positive, or 0 for a rank left idle")
    zero = [set(re.split(r"[eE/]", p)[0].lstrip("+-")) <= set("0.") for p in pieces]  # (1e-400 is not 0: its
    # float is)
    if any(not z and not RATIO_RANGE[0] <= v <= RATIO_RANGE[1] for z, v in zip(zero, approx)):
        raise UserError(f"{what}: every ratio must lie between {RATIO_RANGE[0]:g} and {RATIO_RANGE[1]:g}, or be 0 "
                        "for an idle rank")
    return tuple(Fraction(p) for p in pieces)


def parse_layout(text, n_ranks: int, name: str = "--ratios") -> Layout:
    """'1:1@10*2:3' -> stages (StageSpec((1, 1), 10), StageSpec((2, 3), None)); None -> one stage of equal speeds.
    Refuses a wrong rank count, zero or negative speeds, and a bad @N. `name` is what the messages call the text
    (the flag, or the socket request's field)."""
    if text is None:
        return Layout((StageSpec((Fraction(1),) * n_ranks),), "equal shares")
    what = f"{name} {str(text)[:200]!r}"
    specs = []
    for part in str(text).split("*"):
        layers = None
        if "@" in part:
            part, _, count = part.partition("@")
            digits = count.strip()
            if not COUNT.fullmatch(digits) or not digits.lstrip("0"):
                raise UserError(f"{what}: @{digits[:20]} must be a whole number of layers, at least 1")
            if len(digits.lstrip("0")) > 9:  # (and no int of a huge string)
                raise UserError(f"{what}: @{digits[:20]} is more layers than any model has")
            layers = int(digits)
        specs.append(StageSpec(_numbers(part, what), layers))
    if specs[0].speeds[0] == 0:
        raise UserError(f"{what}: rank 0 cannot be idle (ratio 0): it embeds the tokens and samples")
    for i, spec in enumerate(specs):
        if not any(spec.speeds):
            raise UserError(f"{what}: stage {i} has only idle ranks (ratio 0): give one of them a ratio")
    n = sum(len(s.speeds) for s in specs)
    if n != n_ranks:
        raise UserError(f"{what} has {n} value{'s' * (n != 1)} but the job has {n_ranks} rank{'s' * (n_ranks != 1)}")
    return Layout(tuple(specs), what)


def apportion(total: int, ratios) -> list:
    """Split `total` whole units in proportion to `ratios` (largest remainder; ties go to the larger ratio,
    then the lower index). The counts sum to `total` and each is within one unit of its exact quota."""
    ratios = [Fraction(r) for r in ratios]
    quotas = [total * r / sum(ratios) for r in ratios]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(ratios)), key=lambda i: (-(quotas[i] - counts[i]), -ratios[i], i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def stage_layers(layout, n_layers: int) -> list:
    """Layer count of each stage: pinned ones as given, the others in proportion to the sum of their speeds (at
    least one each)."""
    specs, what = layout.stages, layout.what
    if len(specs) > n_layers:
        raise UserError(f"{what} makes {len(specs)} stages but the model has {n_layers} "
                        f"layer{'s' * (n_layers != 1)}: at most one stage per layer")
    free = [i for i, s in enumerate(specs) if s.n_layers is None]
    pinned = sum(s.n_layers for s in specs if s.n_layers is not None)
    if not free and pinned != n_layers:
        raise UserError(f"{what}: the @N counts add up to {pinned} layers but the model has {n_layers}")
    if free and pinned >= n_layers:
        raise UserError(f"{what}: the @N counts add up to {pinned} layers but the model has {n_layers}, which "
                        f"leaves none for the stage{'s' * (len(free) != 1)} without @N")
    if free and n_layers - pinned < len(free):
        raise UserError(f"{what}: the @N counts take {pinned} of the model's {n_layers} layers, which leaves "
                        f"{n_layers - pinned} for {len(free)} more stages: each needs at least one")
    counts = [s.n_layers for s in specs]
    if free:
        shares = apportion(n_layers - pinned, [sum(specs[i].speeds) for i in free])
        for _ in range(shares.count(0)):  # at least one layer a stage: from the stage with the most
            shares[shares.index(max(shares))] -= 1
            shares[shares.index(0)] = 1
        for i, c in zip(free, shares):
            counts[i] = c
    return counts


def starts(counts) -> list:
    out, at = [], 0
    for c in counts:
        out.append(at)
        at += c
    return out


def contiguous(counts) -> list:
    """Unit counts -> consecutive index tuples: [2, 1] -> [(0, 1), (2,)]."""
    return [tuple(range(a, a + n)) for a, n in zip(starts(counts), counts)]


def n_ffn_blocks(ffn_dim: int) -> int:
    return -(-ffn_dim // FFN_BLOCK)


def ffn_counts(n_blocks: int, speeds, unit: int = 1) -> list:
    """FFN block counts in proportion to `speeds`, in whole units of `unit` blocks (the last unit may be short),
    or by single blocks where whole units would leave a working rank none (a slice then holds the blocks it cuts
    through whole, spmd.gguf_file.col_ranges: more bytes, the same numbers)."""
    counts = [u * unit for u in apportion(-(-n_blocks // unit), speeds)]
    if counts and sum(counts) > n_blocks:  # the rank holding the last unit holds its short end
        last = max(i for i, c in enumerate(counts) if c)
        counts[last] -= sum(counts) - n_blocks
    if any(c == 0 and s > 0 for c, s in zip(counts, speeds)):
        return apportion(n_blocks, speeds)
    return counts


def refuse_empty(shares, speeds, why):
    """A rank with a ratio above 0 must hold something. `why` names what made the shares, as the subject of
    "leave(s)": "--ratios '1:9'", "moving them"."""
    for s, speed in zip(shares, speeds):
        if s.is_empty and speed != 0:
            raise UserError(f"{why} leave{'s' * why.startswith('moving')} rank {s.rank} no heads, FFN columns "
                            "or vocabulary rows; raise its ratio or use fewer ranks")
    return shares


def stage_shares(ranks, speeds, layers, dims, last, kv=None, blocks=None) -> list:
    """The shares of one stage's ranks: contiguous units in proportion to `speeds`, or the given per-rank unit
    tuples `kv` and `blocks`; the vocabulary rows in proportion to `speeds` when the stage is the `last`."""
    group = dims.n_heads // dims.n_kv_heads
    kv = kv or contiguous(apportion(dims.n_kv_heads, speeds))
    blocks = blocks or contiguous(ffn_counts(n_ffn_blocks(dims.ffn_dim), speeds, getattr(dims, "ffn_unit", 1)))
    rows = apportion(dims.vocab, speeds) if last else [0] * len(ranks)
    return [Share(r, tuple(layers), k, group, b, dims.ffn_dim, at, n)
            for r, k, b, at, n in zip(ranks, kv, blocks, starts(rows), rows)]


def make_plan(layout, dims, epoch=0) -> Plan:
    """The plan for a parsed layout on a model of `dims` (anything with n_layers, n_heads, n_kv_heads, ffn_dim,
    vocab, and optionally ffn_unit: the ModelConfig); refuses layouts that leave a rank with nothing at all."""
    counts = stage_layers(layout, dims.n_layers)
    shares, rank = [], 0
    for i, (spec, first, count) in enumerate(zip(layout, starts(counts), counts)):
        ranks = tuple(range(rank, rank + len(spec.speeds)))
        shares += stage_shares(ranks, spec.speeds, (first, first + count), dims, i == len(layout) - 1)
        rank += len(ranks)
    speeds = tuple(v for s in layout for v in s.speeds)
    refuse_empty(shares, speeds, layout.what)
    return Plan(tuple(shares), speeds, epoch)


def chunk_counts(n: int, ratios) -> list:
    """Element counts of each rank's chunk of an n-vector for the weighted ring allreduce."""
    return apportion(n, ratios)


if __name__ == "__main__":  # python -m spmd.plan PROFILE.json: the planner's command, in spmd.planner
    from spmd import needs  # noqa: F401 (first: one line where this Python lacks the set-up)
    from spmd.planner import main
    main()

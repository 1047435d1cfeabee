"""Pure partitioning: ratios -> each rank's KV-head groups, FFN blocks and vocabulary rows; and the moves of a live
re-partition (`move`, `replan`, `diff`). No MPI here.

Work is handed out in whole units: a KV head with the query heads that share it, a 32-column FFN block (the quant
block of the down projection; the last block may be partial), a vocabulary row. At start-up each kind is
apportioned by the largest-remainder rule, the rounding that follows the ratios as closely as whole units allow, in
contiguous ranges. A rank holds its KV heads and FFN blocks as explicit sorted index sets, so a live move can hand
single units from one rank to another without shifting a third rank's. Vocabulary rows stay one contiguous range
per rank (the logits are gathered in rank order) and change only with new ratios.
"""
import math
from dataclasses import dataclass, replace
from fractions import Fraction

from .errors import UserError

FFN_BLOCK = 32
RATIO_RANGE = (1e-6, 1e6)
KINDS = {1: "attention heads", 2: "FFN columns", 3: "attention heads and FFN columns"}


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
    """One rank's slice of every layer: its KV heads (with their query heads), FFN blocks and vocabulary rows."""
    rank: int
    kv: tuple  # sorted KV-head indices; the rank holds query heads j*group .. (j+1)*group-1 of each
    group: int  # query heads per KV head
    ffn_blocks: tuple  # sorted FFN block indices; block b is columns b*FFN_BLOCK .. min((b+1)*FFN_BLOCK, ffn_dim)-1
    ffn_dim: int  # the model's FFN width (the last block may be partial)
    vocab_start: int
    n_vocab: int  # classifier rows vocab_start .. vocab_start+n_vocab-1

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
        return {"heads": self.n_heads, "kv_heads": self.n_kv, "ffn_columns": self.n_ffn, "vocab_rows": self.n_vocab}

    def layout(self) -> dict:
        """Which units the rank holds, as [start, stop) ranges (the control socket's `status`)."""
        return {"rank": self.rank, **self.describe(),
                "kv_groups": [list(r) for r in self.kv_ranges], "head_ranges": [list(r) for r in self.head_ranges],
                "ffn_blocks": [list(r) for r in ranges(self.ffn_blocks)],
                "ffn_column_ranges": [list(r) for r in self.ffn_ranges],
                "vocab_range": [self.vocab_start, self.vocab_start + self.n_vocab]}


def parse_ratios(text, n_ranks: int, name: str = "--ratios") -> tuple:
    """'2:3:3' -> (2, 3, 3) as Fractions; None -> equal shares. Refuses a wrong count, zero or negative values.
    `name` is what the messages call the ratios (the flag, or the socket request's field)."""
    if text is None:
        return (Fraction(1),) * n_ranks
    parts = [p.strip() for p in str(text).replace(",", ":").split(":")]
    try:
        # float() first: Fraction("1e100000000") would build a 100-million-digit integer
        approx = [float(Fraction(p)) if "/" in p else float(p) for p in parts]
    except (ValueError, ZeroDivisionError, OverflowError):
        raise UserError(f"{name} {text!r}: expected numbers separated by ':' (for example 2:3:3)") from None
    if any(not math.isfinite(v) for v in approx):
        raise UserError(f"{name} {text!r}: expected numbers separated by ':' (for example 2:3:3)")
    if any(not v > 0 for v in approx):
        raise UserError(f"{name} {text!r}: every ratio must be positive")
    if any(not RATIO_RANGE[0] <= v <= RATIO_RANGE[1] for v in approx):
        raise UserError(f"{name} {text!r}: every ratio must lie between {RATIO_RANGE[0]:g} and {RATIO_RANGE[1]:g}")
    values = tuple(Fraction(p) for p in parts)
    if len(values) != n_ranks:
        raise UserError(f"{name} {text!r} has {len(values)} value{'s' * (len(values) != 1)} but the job has "
                        f"{n_ranks} rank{'s' * (n_ranks != 1)}")
    return values


def format_ratios(ratios) -> str:
    """(Fraction(1, 2), 3) -> '0.5:3' as a user would write them."""
    return ":".join(f"{float(r):g}" for r in ratios)


def apportion(total: int, ratios) -> list:
    """Split `total` whole units in proportion to `ratios` (largest remainder; ties go to the larger ratio,
    then the lower rank). The counts sum to `total` and each is within one unit of its exact quota."""
    ratios = [Fraction(r) for r in ratios]
    quotas = [total * r / sum(ratios) for r in ratios]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(ratios)), key=lambda i: (-(quotas[i] - counts[i]), -ratios[i], i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def starts(counts) -> list:
    out, at = [], 0
    for c in counts:
        out.append(at)
        at += c
    return out


def n_ffn_blocks(ffn_dim: int) -> int:
    return -(-ffn_dim // FFN_BLOCK)


def _refuse_empty(shares, why):
    for s in shares:
        if s.is_empty:
            raise UserError(f"{why} leave{'s' * why.startswith('moving')} rank {s.rank} no heads, FFN columns "
                            "or vocabulary rows; raise its ratio or use fewer ranks")
    return shares


def make_plan(ratios, n_heads: int, n_kv_heads: int, ffn_dim: int, vocab: int) -> list:
    """The per-rank shares for `ratios`, contiguous; refuses ratios that leave a rank with nothing at all."""
    kv = apportion(n_kv_heads, ratios)
    blocks = apportion(n_ffn_blocks(ffn_dim), ratios)
    rows = apportion(vocab, ratios)
    shares = [Share(rank, tuple(range(kv_at, kv_at + n_kv)), n_heads // n_kv_heads,
                    tuple(range(blk_at, blk_at + n_blk)), ffn_dim, row_at, n_rows)
              for rank, (kv_at, n_kv, blk_at, n_blk, row_at, n_rows) in enumerate(
                  zip(starts(kv), kv, starts(blocks), blocks, starts(rows), rows))]
    return _refuse_empty(shares, f"ratios {format_ratios(ratios)}")


def chunk_counts(n: int, ratios) -> list:
    """Element counts of each rank's chunk of an n-vector for the weighted ring allreduce."""
    return apportion(n, ratios)


# ---- live re-partition ----------------------------------------------------------------------------------------
def move(plan, kind: int, src: int, dst: int, kv_groups: int = 0, ffn_blocks: int = 0) -> list:
    """A new plan with `kv_groups` KV-head groups (kind 1), `ffn_blocks` FFN blocks (kind 2) or both (kind 3) moved
    from rank `src` to rank `dst`: the source's last units (highest indices). Everything else stays in place."""
    if kind not in KINDS or isinstance(kind, bool):
        raise UserError(f"unknown kind {kind!r}: 1 moves attention heads, 2 FFN columns, 3 both")
    for what, r in (("from", src), ("to", dst)):
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < len(plan):
            raise UserError(f"'{what}' rank {r!r} is out of range: the job has ranks 0..{len(plan) - 1}")
    if src == dst:
        raise UserError(f"'from' and 'to' are both rank {src}: nothing would move")
    units = [("kv", kv_groups, "KV-head group", "kv_groups")] * (kind != 2)
    units += [("ffn_blocks", ffn_blocks, "FFN block", "ffn_blocks")] * (kind != 1)
    a, b = plan[src], plan[dst]
    new_a, new_b = {}, {}
    for field, n, noun, key in units:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UserError(f"kind {kind} needs '{key}': a whole number of {noun}s, at least 1 (got {n!r})")
        held = getattr(a, field)
        if n > len(held):
            raise UserError(f"rank {src} has {len(held)} {noun}{'s' * (len(held) != 1)}; cannot move {n}")
        new_a[field] = held[:len(held) - n]
        new_b[field] = tuple(sorted(getattr(b, field) + held[len(held) - n:]))
    new = list(plan)
    new[src], new[dst] = replace(a, **new_a), replace(b, **new_b)
    return _refuse_empty(new, f"moving them from rank {src} would")


def _rebalance(held, counts):
    """Per-rank sorted unit tuples -> new tuples of `counts` units, each rank keeping as many of its own as it can:
    ranks over their count give up their last units; ranks under it take the freed ones, lowest first."""
    kept = [h[:c] for h, c in zip(held, counts)]
    pool = sorted(u for h, c in zip(held, counts) for u in h[c:])
    out = []
    for k, c in zip(kept, counts):
        take, pool = pool[:c - len(k)], pool[c - len(k):]
        out.append(tuple(sorted(k + tuple(take))))
    return out


def replan(plan, ratios) -> list:
    """A new plan whose counts follow `ratios` (largest remainder, as `make_plan`) while each rank keeps as many of
    its KV heads and FFN blocks as it can. Vocabulary rows are contiguous ranges again, in rank order."""
    if len(ratios) != len(plan):
        raise UserError(f"ratios {format_ratios(ratios)} have {len(ratios)} values but the job has "
                        f"{len(plan)} ranks")
    s0 = plan[0]
    n_kv = sum(s.n_kv for s in plan)
    kv = _rebalance([s.kv for s in plan], apportion(n_kv, ratios))
    ffn = _rebalance([s.ffn_blocks for s in plan], apportion(n_ffn_blocks(s0.ffn_dim), ratios))
    rows = apportion(sum(s.n_vocab for s in plan), ratios)
    new = [replace(s, kv=k, ffn_blocks=f, vocab_start=at, n_vocab=n)
           for s, k, f, at, n in zip(plan, kv, ffn, starts(rows), rows)]
    return _refuse_empty(new, f"ratios {format_ratios(ratios)}")


def diff(old, new) -> list:
    """The units that change hands: [(unit, index, from_rank, to_rank)], unit "kv" (a KV-head group), "ffn" (an FFN
    block) or "vocab" (a classifier row), in unit then index order."""
    moves = []
    for unit, held in (("kv", lambda s: s.kv), ("ffn", lambda s: s.ffn_blocks),
                       ("vocab", lambda s: range(s.vocab_start, s.vocab_start + s.n_vocab))):
        owner_old = {i: s.rank for s in old for i in held(s)}
        owner_new = {i: s.rank for s in new for i in held(s)}
        moves += [(unit, i, owner_old[i], owner_new[i]) for i in sorted(owner_new) if owner_old[i] != owner_new[i]]
    return moves


def work_ratios(plan) -> tuple:
    """Positive ratios that describe a plan's split (each rank's mean fraction of KV heads, FFN blocks and
    vocabulary rows): the ring allreduce's chunk sizes after a move, and what the result reports."""
    totals = [sum(s.n_kv for s in plan), sum(len(s.ffn_blocks) for s in plan), sum(s.n_vocab for s in plan)]
    kinds = [i for i, t in enumerate(totals) if t]
    out = []
    for s in plan:
        mine = (s.n_kv, len(s.ffn_blocks), s.n_vocab)
        out.append(sum(Fraction(mine[i], totals[i]) for i in kinds) / len(kinds))
    return tuple(max(r, Fraction(1, 10**6)) for r in out)  # a rank with nothing of a kind still gets a chunk

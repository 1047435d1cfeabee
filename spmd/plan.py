"""Pure partitioning: ratios -> each rank's KV-head groups, FFN columns and vocabulary rows. No MPI here.

Work is handed out in whole units: a KV head with the query heads that share it, a 32-column FFN block (the quant
block of the down projection), a vocabulary row. Each kind is apportioned by the largest-remainder rule, the
rounding that follows the ratios as closely as whole units allow.
"""
import math
from dataclasses import dataclass
from fractions import Fraction

from .errors import UserError

FFN_BLOCK = 32
RATIO_RANGE = (1e-6, 1e6)


@dataclass(frozen=True)
class Share:
    """One rank's slice of every layer (contiguous ranges)."""
    rank: int
    kv_start: int
    n_kv: int  # KV heads; the rank holds query heads [kv_start*group, (kv_start+n_kv)*group)
    group: int  # query heads per KV head
    ffn_start: int
    n_ffn: int  # FFN columns
    vocab_start: int
    n_vocab: int  # classifier rows

    @property
    def head_start(self) -> int:
        return self.kv_start * self.group

    @property
    def n_heads(self) -> int:
        return self.n_kv * self.group

    def describe(self) -> dict:
        return {"heads": self.n_heads, "kv_heads": self.n_kv, "ffn_columns": self.n_ffn, "vocab_rows": self.n_vocab}


def parse_ratios(text, n_ranks: int) -> tuple:
    """'2:3:3' -> (2, 3, 3) as Fractions; None -> equal shares. Refuses a wrong count, zero or negative values."""
    if text is None:
        return (Fraction(1),) * n_ranks
    parts = [p.strip() for p in str(text).replace(",", ":").split(":")]
    try:
        # float() first: Fraction("1e100000000") would build a 100-million-digit integer
        approx = [float(Fraction(p)) if "/" in p else float(p) for p in parts]
    except (ValueError, ZeroDivisionError, OverflowError):
        raise UserError(f"--ratios {text!r}: expected numbers separated by ':' (for example 2:3:3)") from None
    if any(not math.isfinite(v) for v in approx):
        raise UserError(f"--ratios {text!r}: expected numbers separated by ':' (for example 2:3:3)")
    if any(not v > 0 for v in approx):
        raise UserError(f"--ratios {text!r}: every ratio must be positive")
    if any(not RATIO_RANGE[0] <= v <= RATIO_RANGE[1] for v in approx):
        raise UserError(f"--ratios {text!r}: every ratio must lie between {RATIO_RANGE[0]:g} and {RATIO_RANGE[1]:g}")
    values = tuple(Fraction(p) for p in parts)
    if len(values) != n_ranks:
        raise UserError(f"--ratios {text!r} has {len(values)} value{'s' * (len(values) != 1)} but the job has "
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


def make_plan(ratios, n_heads: int, n_kv_heads: int, ffn_dim: int, vocab: int) -> list:
    """The per-rank shares for `ratios`; refuses ratios that leave a rank with nothing at all."""
    kv = apportion(n_kv_heads, ratios)
    ffn_blocks = apportion(-(-ffn_dim // FFN_BLOCK), ratios)
    rows = apportion(vocab, ratios)
    shares = []
    for rank, (kv_at, n_kv, blk_at, n_blk, row_at, n_rows) in enumerate(
            zip(starts(kv), kv, starts(ffn_blocks), ffn_blocks, starts(rows), rows)):
        ffn_start = min(blk_at * FFN_BLOCK, ffn_dim)
        ffn_stop = min((blk_at + n_blk) * FFN_BLOCK, ffn_dim)
        share = Share(rank, kv_at, n_kv, n_heads // n_kv_heads, ffn_start, ffn_stop - ffn_start, row_at, n_rows)
        if share.n_kv == share.n_ffn == share.n_vocab == 0:
            raise UserError(f"ratios {format_ratios(ratios)} leave rank {rank} no heads, FFN columns "
                            "or vocabulary rows; raise its ratio or use fewer ranks")
        shares.append(share)
    return shares


def chunk_counts(n: int, ratios) -> list:
    """Element counts of each rank's chunk of an n-vector for the weighted ring allreduce."""
    return apportion(n, ratios)

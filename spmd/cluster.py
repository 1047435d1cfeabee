"""A cluster's profile as the planner reads it (pure, no MPI): the model's sizes and bytes per unit, each rank's
compute points, memory and host, the links between ranks, rank 0's step and allreduce costs. `load_profile`
checks a file (or its decoded dict) field by field; `python -m spmd.profile` writes one (`spmd.profile.measure`).
The format is in spmd.profile's docstring and README's "Planning the split for you"."""
import json
from bisect import bisect_right
from dataclasses import dataclass, replace
from functools import cached_property
from typing import NamedTuple

import numpy as np

from .errors import UserError, as_sent, regular_file
from .plan import n_ffn_blocks
from .model import KV_DTYPES


class Compute(NamedTuple):
    """One measured point: a pass of `rows` rows through one layer on one rank, and through the head."""
    rows: int
    layer_ms: float  # per layer, whatever the units held (norms, the rest)
    kv_group_ms: float  # per KV-head group held, per layer
    ffn_block_ms: float  # per FFN block held, per layer
    head_ms: float
    vocab_row_ms: float  # per classifier row held


@dataclass(frozen=True)
class Model:
    """The model's sizes (it serves as `make_plan`'s dims) and its bytes per unit."""
    file: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab: int
    context: int
    layer_bytes: int  # per layer, held by every rank of a stage
    kv_group_bytes: int  # one KV-head group's weights in one layer
    ffn_block_bytes: int  # one FFN block's weights in one layer
    vocab_row_bytes: int  # one classifier row
    kv_bytes_per_position: int  # KV cache of one position of one sequence, per layer per KV group
    ffn_unit: int = 1  # FFN blocks a split keeps together (config.ffn_unit)


@dataclass(frozen=True)
class RankInfo:
    """One rank as profiled: where it runs, the memory it may use, and how fast it computes."""
    rank: int
    host: str
    backend: str
    threads: int
    memory_bytes: int  # the host's available memory, or None
    device_memory_bytes: int  # a Vulkan rank's GPU memory, or None
    compute: tuple  # Compute points, rows ascending, rows 1 first
    disk_bytes_per_s: float = None  # reading its spill folder (weight streaming), or None (an older profile)

    def at(self, rows: int) -> Compute:
        """The compute point at `rows` rows, interpolated (see the module docstring)."""
        pts = self.compute
        if len(pts) == 1:
            return Compute(rows, *(v * rows / pts[0].rows for v in pts[0][1:]))
        i = min(bisect_right([p.rows for p in pts], rows), len(pts) - 1)  # >= 1: rows >= 1 = pts[0].rows
        lo, hi = pts[i - 1], pts[i]
        w = (rows - lo.rows) / (hi.rows - lo.rows)
        values = (a + (b - a) * w for a, b in zip(lo[1:], hi[1:]))
        if w > 1:  # beyond the last point
            values = (max(v, b) for v, b in zip(values, hi[1:]))
        return Compute(rows, *values)


@dataclass(frozen=True)
class Profile:
    """A checked profile (`load_profile`): the model, every rank, the links between them, rank 0's step cost."""
    model: Model
    ranks: tuple  # RankInfo per rank, in rank order
    latency_ms: tuple  # [i][j]: one message from rank i to rank j (diagonal None)
    bandwidth: tuple  # [i][j]: bytes per second from rank i to rank j (diagonal None)
    step_ms: float  # rank 0's fixed cost per step record
    seconds: float  # how long profiling took
    source: str  # how messages name it
    allreduce_ms: float = 0.0  # what one allreduce of a row costs beyond its links' latency (optional in the file)
    memory_limits: tuple = ()  # per rank: its --memory-limit in bytes, or None (the run's, never in the file)

    def subset(self, ranks) -> "Profile":
        """The profile of a job on `ranks` of this one (old rank indices, in their new order: a relaunch on the
        survivors, spmd.supervise), numbered from 0."""
        return replace(self, ranks=tuple(replace(self.ranks[r], rank=i) for i, r in enumerate(ranks)),
                       latency_ms=tuple(tuple(self.latency_ms[a][b] for b in ranks) for a in ranks),
                       bandwidth=tuple(tuple(self.bandwidth[a][b] for b in ranks) for a in ranks),
                       memory_limits=tuple(self.memory_limits[r] for r in ranks) if self.memory_limits else ())

    def with_kv_cache(self, kv_cache) -> "Profile":
        """This profile for a run whose KV caches hold --kv-cache's type (a profile's file holds float32's figure)."""
        per_position = self.model.kv_bytes_per_position * np.dtype(KV_DTYPES[kv_cache]).itemsize // 4
        return replace(self, model=replace(self.model, kv_bytes_per_position=per_position))

    def link_ms(self, i, j, n_bytes) -> float:
        return self.latency_ms[i][j] + n_bytes / self.bandwidth[i][j] * 1e3

    @cached_property
    def streaming(self) -> dict:
        """{rank: its --memory-limit} of the ranks that may go over it and stream weights from disk (their disk
        speed is known): soft limits, which the planner costs instead of refusing."""
        return {r: limit for r, limit in enumerate(self.memory_limits)
                if limit is not None and self.ranks[r].disk_bytes_per_s is not None}

    @cached_property  # derived once (written to the instance's __dict__, which frozen allows)
    def limits(self) -> list:
        """(ranks, bytes available to them together, what) for each host that reports its memory, each device and
        each rank with a --memory-limit that cannot stream (see `streaming`)."""
        hosts = {}
        for r in self.ranks:
            hosts.setdefault(r.host, []).append(r)
        out = []
        for host, rs in hosts.items():
            known = [r.memory_bytes for r in rs if r.memory_bytes is not None]
            if known:
                ranks = ", ".join(str(r.rank) for r in rs)
                out.append((tuple(r.rank for r in rs), min(known), f"host {host} (rank{'s' * (len(rs) > 1)} {ranks})"))
        out += [((r.rank,), r.device_memory_bytes, f"rank {r.rank}'s device") for r in self.ranks
                if r.device_memory_bytes is not None]
        return out + [((r,), limit, f"rank {r}'s --memory-limit") for r, limit in enumerate(self.memory_limits)
                      if limit is not None and r not in self.streaming]


# The largest sizes a profile may give: beyond any model in use (Llama 3.1 405B has 126 layers, dim 16384, FFN
# 53248, 128256 tokens), and small enough that the planner's search stays quick and small.
MOST = {"n_layers": 1024, "dim": 1 << 17, "n_heads": 1024, "n_kv_heads": 1024, "head_dim": 1 << 12,
        "ffn_dim": 1 << 20, "vocab": 1 << 22, "context": 1 << 24}
MOST_RANKS = 256
MOST_WHOLE = 1 << 60  # any other whole number (bytes: an exbibyte), so that sums and ratios stay finite floats
MOST_REAL = 1e15  # any number (bytes per second, milliseconds)
MOST_FILE_BYTES = 16 << 20  # a profile of MOST_RANKS ranks is about 2 MiB: a larger file is something else


class _Reader:
    """Typed access to the profile's JSON; each refusal is one line naming the file and the field."""

    def __init__(self, source):
        self.source = source

    def fail(self, name, why):
        raise UserError(f"{self.source}: {name} {why}")

    def get(self, obj, key, name):
        if not isinstance(obj, dict):
            self.fail(name.rpartition(".")[0] or "the top level", "must be an object")
        if key not in obj:
            self.fail(name, "is missing")
        return obj[key]

    def whole(self, obj, key, name, least=0, null=False, most=MOST_WHOLE):
        v = self.get(obj, key, name)
        if v is None and null:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(name, f"must be a whole number, not {as_sent(v)}")
        if v < least:
            self.fail(name, f"must be at least {least}, not {as_sent(v)}")
        if v > most:
            self.fail(name, f"must be at most {most}, not {as_sent(v)}")
        return v

    def real(self, obj, key, name, positive=False):
        v = self.get(obj, key, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(name, f"must be a number, not {as_sent(v)}")
        if not (0 <= v <= MOST_REAL) or (positive and v == 0):  # (False for NaN)
            self.fail(name, f"must be a number {'above' if positive else 'of at least'} 0 and at most {MOST_REAL:g}, "
                            f"not {as_sent(v)}")
        return float(v)

    def text(self, obj, key, name):
        v = self.get(obj, key, name)
        if not isinstance(v, str):
            self.fail(name, f"must be a string, not {as_sent(v)}")
        return v

    def items(self, obj, key, name, count=None):
        """A non-empty list (of `count` items when given)."""
        v = self.get(obj, key, name)
        self.check_list(v, name, count)
        return v

    def check_list(self, v, name, count=None):
        if not isinstance(v, list) or not v or (count is not None and len(v) != count):
            self.fail(name, f"must be a list of {count} items" if count else "must be a non-empty list")

    def matrix(self, obj, key, name, n, positive):
        """An n x n matrix of numbers, its diagonal ignored (null)."""
        rows = self.items(obj, key, name, n)
        for i, row in enumerate(rows):
            self.check_list(row, f"{name}[{i}]", n)
        return tuple(tuple(None if i == j else self.real(dict(enumerate(row)), j, f"{name}[{i}][{j}]", positive)
                           for j in range(n)) for i, row in enumerate(rows))


def _model(rd, m):
    b = rd.get(m, "bytes", "model.bytes")
    names = ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab", "context")
    sizes = {k: rd.whole(m, k, f"model.{k}", 1, most=MOST[k]) for k in names}
    if sizes["n_heads"] % sizes["n_kv_heads"]:
        rd.fail("model.n_kv_heads", f"must divide model.n_heads ({sizes['n_heads']})")
    blocks = n_ffn_blocks(sizes["ffn_dim"])
    return Model(rd.text(m, "file", "model.file"), **sizes,
                 **{f"{k}_bytes": rd.whole(b, k, f"model.bytes.{k}") for k in ("layer", "kv_group", "ffn_block",
                                                                               "vocab_row")},
                 kv_bytes_per_position=rd.whole(m, "kv_bytes_per_position", "model.kv_bytes_per_position"),
                 ffn_unit=rd.whole(m, "ffn_unit", "model.ffn_unit", 1, most=blocks) if "ffn_unit" in m else 1)


def _rank(rd, ranks, i):
    r, name = ranks[i], f"ranks[{i}]"
    if rd.whole(r, "rank", f"{name}.rank") != i:
        rd.fail(f"{name}.rank", f"must be {i} (the ranks in rank order)")
    points = rd.items(r, "compute", f"{name}.compute")
    compute = tuple(Compute(rd.whole(p, "rows", f"{name}.compute[{j}].rows", 1),
                            *(rd.real(p, k, f"{name}.compute[{j}].{k}") for k in Compute._fields[1:]))
                    for j, p in enumerate(points))
    if compute[0].rows != 1 or any(a.rows >= b.rows for a, b in zip(compute, compute[1:])):
        rd.fail(f"{name}.compute", "must have rows ascending, rows 1 first")
    return RankInfo(i, rd.text(r, "host", f"{name}.host"), rd.text(r, "backend", f"{name}.backend"),
                    rd.whole(r, "threads", f"{name}.threads"),
                    rd.whole(r, "memory_bytes", f"{name}.memory_bytes", 1, null=True),  # (0: nothing could run)
                    rd.whole(r, "device_memory_bytes", f"{name}.device_memory_bytes", null=True), compute,
                    None if r.get("disk_bytes_per_s") is None else rd.real(r, "disk_bytes_per_s",
                                                                           f"{name}.disk_bytes_per_s", True))


def load_profile(source) -> Profile:
    """A profile from a JSON file's path or from its decoded dict, checked field by field (UserError: one line)."""
    if isinstance(source, dict):
        rd, data = _Reader("the profile"), source
    else:
        rd = _Reader(f"profile {source}")
        try:
            with open(regular_file(source, "profile"), "rb") as f:
                raw = f.read(MOST_FILE_BYTES + 1)
            if len(raw) > MOST_FILE_BYTES:
                raise UserError(f"profile {source} is over {MOST_FILE_BYTES >> 20} MiB: not a profile "
                                "(python -m spmd.profile --out writes one)")
            data = json.loads(raw.decode("utf-8-sig"))
        except OSError as e:
            raise UserError(f"cannot read profile {source}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UserError(f"profile {source} is not JSON: it is not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise UserError(f"profile {source} is not JSON: {e.msg} at line {e.lineno}") from None
        except ValueError:  # (Python's limit on a whole number's digits, 4300)
            raise UserError(f"profile {source} is not a profile: it holds a whole number of thousands of "
                            "digits") from None
        except RecursionError:
            raise UserError(f"profile {source} is not a profile: its JSON nests too deep") from None
    if rd.get(data, "format", "format") != "spmd-profile":
        rd.fail("format", "must be \"spmd-profile\"")
    if rd.whole(data, "version", "version") != 1:
        rd.fail("version", f"is {data['version']}; this planner reads version 1")
    model = _model(rd, rd.get(data, "model", "model"))
    ranks = rd.items(data, "ranks", "ranks")
    if len(ranks) > MOST_RANKS:
        rd.fail("ranks", f"must be at most {MOST_RANKS}, not {len(ranks)}")
    n, links = len(ranks), rd.get(data, "links", "links")
    return Profile(model, tuple(_rank(rd, ranks, i) for i in range(n)),
                   rd.matrix(links, "latency_ms", "links.latency_ms", n, False),
                   rd.matrix(links, "bandwidth_bytes_per_s", "links.bandwidth_bytes_per_s", n, True),
                   rd.real(data, "step_ms", "step_ms"), rd.real(data, "seconds", "seconds"), rd.source,
                   rd.real(data, "allreduce_ms", "allreduce_ms") if "allreduce_ms" in data else 0.0)


def as_profile(p) -> Profile:
    """A Profile as it is, or loaded from a path or a decoded dict."""
    return p if isinstance(p, Profile) else load_profile(p)


UNIT_NAMES = {"layer": "a layer's norms", "kv_group": "a KV-head group", "ffn_block": "an FFN block",
              "vocab_row": "a classifier row"}


def check_matches(profile, cfg, unit_bytes, hosts) -> str:
    """A saved profile must be of this job's rank count, this model's shape (`cfg`: a ModelConfig) and its bytes per
    unit (`unit_bytes`: spmd.profile.model_bytes; another weight type is another model); a note (else "") where
    its ranks ran on other hosts than `hosts` (each rank's, this job's)."""
    prof = as_profile(profile)
    if len(prof.ranks) != len(hosts):
        raise UserError(f"{prof.source} was measured on {len(prof.ranks)} rank{'s' * (len(prof.ranks) != 1)} but the "
                        f"job has {len(hosts)}: profile this job's ranks (python -m spmd.profile) or use --plan auto")
    m = prof.model
    shape = ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab", "context")
    pairs = [(name, getattr(m, name), getattr(cfg, name)) for name in shape]
    pairs += [(f"bytes of {UNIT_NAMES[k]}", getattr(m, f"{k}_bytes"), v) for k, v in unit_bytes.items()]
    for name, theirs, mine in pairs:
        if theirs != mine:
            raise UserError(f"{prof.source} was measured on another model ({name} {theirs}, this one {mine}): "
                            "profile with this model or use --plan auto")
    moved = [f"rank {r.rank} on {r.host}, now {host}" for r, host in zip(prof.ranks, hosts) if r.host != host]
    if not moved:
        return ""
    return (f"note: {prof.source} was measured with {'; '.join(moved[:3])}{'; ...' * (len(moved) > 3)}: "
            "its speeds may not be this job's ranks' (profile this job, or use --plan auto)")

"""`python -m spmd.profile`: measure what the planner (`spmd.planner`) needs, on every rank with its own backend and
threads, in seconds. Writes a profile JSON (`--out`) and prints a table.

Per rank, on the first layers of the real file (as many as PROBE_BYTES of weights: a decode pass streams its
weights from memory, and a single layer timed again and again would run from the cache) and classifier rows,
with the rank's own backend:
  compute   a decode pass of b rows (b sequences of one token each, at position POSITION) for b in ROWS, through
            those layers holding every KV-head group and FFN block, and holding half of each: the two give the
            layer's fixed cost and its cost per weight byte, which the KV-head groups and FFN blocks take in
            proportion to their bytes (a decode product reads every weight once, a batched or prefill one
            multiplies each by every row). The head over VOCAB_ROWS and a quarter of them (behind a layer of one
            KV-head group and FFN block, whose cost is taken off) gives its fixed cost and its cost per classifier
            row. The same at prefill (one sequence of PREFILL_ROWS).
  memory    the host's available memory, and a Vulkan rank's device memory.
  disk      the read speed of the folder weight streaming spills to (--memory-limit): 64 MiB written, then read
            back once out of the page cache.
Between every pair of ranks, one pair at a time: ping-pong round trips of one hidden-state row (dim * 4 bytes,
what a decode token sends) and of LINK_LARGE bytes give each link's latency and bandwidth. Rank 0's broadcast of a
step record gives `step_ms`, and a star allreduce of one row between rank 0 and its nearest rank what an
allreduce costs beyond its links' latency and bandwidth (`allreduce_ms`: MPI's and Python's own work, paid by every
allreduce of a stage of several ranks). A compute timing is the least of `repeats` runs after one not counted
(warm-up): the others' threads and the machine's other work only ever add to it. A link's or a collective's is
the median.

`measure(...)` is the collective the run's `--plan auto` calls too; rank 0 gets the profile as a dict (the format
`spmd.cluster.load_profile` reads). Simulated slow ranks (SPMD_TEST_SLOW) and links (SPMD_TEST_LINK_DELAY_MS)
are measured as they would run.
"""
from . import needs  # (first: one line, not a traceback, where this Python lacks the set-up)
import json
import sys
import time
from dataclasses import replace

import click
import numpy as np

from .errors import UserError
from .model import Segment, kv_bytes_per_position
from .plan import Share, n_ffn_blocks

ROWS = (1, 4, 16)  # decode batch rows measured (the planner interpolates between them)
PREFILL_ROWS = 64
POSITION = 32  # positions each measured sequence already holds: the attention reads this many
VOCAB_ROWS = 4096  # classifier rows timed (at most the vocabulary); the cost per row scales to the rest
PROBE_BYTES = 128 << 20  # weights the timed layers hold at most: more than most household CPUs' last-level cache
LINK_LARGE = 1 << 20  # bytes of the bandwidth ping-pong
REPEATS = 5


def probe_shares(cfg, unit_bytes) -> dict:
    """The shares timed: the first layers (up to PROBE_BYTES, at least one) with every KV-head group and FFN block
    ("full") and with half of each ("half"); layer 0 with one of each (every backend's model runs at least one
    layer: its cost is taken off) and VOCAB_ROWS classifier rows ("head") or a quarter of them ("head_quarter")."""
    kv, blocks, rows = tuple(range(cfg.n_kv_heads)), tuple(range(n_ffn_blocks(cfg.ffn_dim))), min(VOCAB_ROWS, cfg.vocab)
    layer = len(kv) * unit_bytes["kv_group"] + len(blocks) * unit_bytes["ffn_block"]
    n_layers = min(cfg.n_layers, max(1, PROBE_BYTES // max(layer, 1)))
    full = Share(0, (0, n_layers), kv, cfg.group, blocks, cfg.ffn_dim, 0, 0)
    head = Share(0, (0, 1), kv[:1], cfg.group, blocks[:1], cfg.ffn_dim, 0, rows)
    return {"full": full, "half": replace(full, kv=kv[:-(-len(kv) // 2)], ffn_blocks=blocks[:-(-len(blocks) // 2)]),
            "head": head, "head_quarter": replace(head, n_vocab=max(1, rows // 4))}


class Timer:
    """The least milliseconds of a call over `repeats` runs after one warm-up, the simulated slowdown included."""

    def __init__(self, repeats, slow=None):
        self.repeats, self.slow = repeats, slow

    def __call__(self, fn) -> float:
        times = []
        for _ in range(self.repeats + 1):
            t = time.perf_counter()
            if self.slow is not None:
                self.slow.start()
            fn()
            if self.slow is not None:
                self.slow.pause()
            times.append(time.perf_counter() - t)
        return min(times[1:]) * 1e3


def time_share(file, cfg, backend, share, timer, rows) -> dict:
    """{rows: ms} of one share's passes (through its layers, or its head alone): decode passes of b one-token
    segments for b in `rows`, and "prefill", one segment of PREFILL_ROWS tokens."""
    from .weights import load_shard
    slots, head = max(rows), share.n_vocab > 0
    model = backend.make_model(cfg, load_shard(file, cfg, share, backend, notice=lambda _m: None), share,
                               max(POSITION + 1, PREFILL_ROWS), slots)
    rng = np.random.default_rng(0)
    out = {}
    try:
        for slot in range(slots):
            model.open(slot, POSITION + 1)
        for b in rows:
            x = rng.standard_normal((b, cfg.dim)).astype(np.float32)
            segments = [Segment(slot, POSITION, 1) for slot in range(b)]
            out[b] = timer(lambda: model.forward(x.copy(), segments, None, head=head))
        model.free(0)
        model.open(0, PREFILL_ROWS)
        x = rng.standard_normal((PREFILL_ROWS, cfg.dim)).astype(np.float32)
        out["prefill"] = timer(lambda: model.forward(x.copy(), [Segment(0, 0, PREFILL_ROWS)], None, head=head))
    finally:
        model.close()
    return out


def fit(shares, unit_bytes, times, rows) -> dict:
    """A compute point from the two shares' timings at `rows`: t = layer + cost per byte x the units' bytes, and
    head = head + cost per row x rows (each at least 0: noise can make a difference negative; where it makes the
    cost per byte or per row so, the whole time is taken as per byte or per row)."""
    held = {name: shares[name].n_kv * unit_bytes["kv_group"] + len(shares[name].ffn_blocks) * unit_bytes["ffn_block"]
            for name in ("full", "half")}
    n = len(shares["full"].layer_ids)  # the layers timed: per layer from here on
    ta, tb = times["full"][rows] / n, times["half"][rows] / n
    per_byte = (ta - tb) / (held["full"] - held["half"]) if held["full"] > held["half"] else ta / held["full"]
    if per_byte <= 0.0:  # noise: the larger share timed no slower than the smaller; its whole time, byte by byte
        per_byte = ta / held["full"]
    ha, hb = times["head"][rows], times["head_quarter"][rows]
    va, vb = shares["head"].n_vocab, shares["head_quarter"].n_vocab
    vocab_row = (ha - hb) / (va - vb) if va > vb else ha / va
    if vocab_row <= 0.0:  # noise: the larger head timed no slower than the smaller; its whole time, row by row
        vocab_row = ha / va
    layer = max(0.0, ta - per_byte * held["full"])
    one_layer = layer + per_byte * (unit_bytes["kv_group"] + unit_bytes["ffn_block"])  # the head shares' layer
    return {"rows": rows if rows != "prefill" else PREFILL_ROWS, "layer_ms": layer,
            "kv_group_ms": per_byte * unit_bytes["kv_group"], "ffn_block_ms": per_byte * unit_bytes["ffn_block"],
            "head_ms": max(0.0, ha - va * vocab_row - one_layer), "vocab_row_ms": vocab_row}


def model_bytes(file, cfg) -> dict:
    """Bytes the planner counts per unit, as the cpu backend holds them (`spmd.quants.held_type`)."""
    from .weights import share_bytes
    blocks = tuple(range(n_ffn_blocks(cfg.ffn_dim)))
    none = Share(0, (0, 1), (), cfg.group, (), cfg.ffn_dim, 0, 0)
    per = {"kv_group": replace(none, kv=(0,)), "ffn_block": replace(none, ffn_blocks=blocks[:1]),
           "vocab_row": replace(none, layers=(0, 0), n_vocab=1)}
    out = {k: share_bytes(file, cfg, s) for k, s in per.items()}
    return {"layer": 2 * cfg.dim * 4, **out}  # the layer's two norms, float32


def measure_links(comm, dim, repeats):
    """(latency ms, bandwidth bytes/s) n x n matrices (diagonal None), one pair at a time; every rank calls it."""
    n = comm.size
    lat = [[None] * n for _ in range(n)]
    bw = [[None] * n for _ in range(n)]
    for a in range(n):
        for b in range(a + 1, n):
            comm.barrier()
            small = comm.ping_pong(a, b, dim * 4, repeats)
            large = comm.ping_pong(a, b, LINK_LARGE, repeats)
            small, large = comm.bcast((small, large), root=a)
            per_byte = max((large - small) / (LINK_LARGE - dim * 4), 1e-12)
            latency = max(small - dim * 4 * per_byte, 0.0)
            lat[a][b] = lat[b][a] = latency * 1e3
            bw[a][b] = bw[b][a] = 1.0 / per_byte
    return lat, bw


def spill_read_speed():
    """The spill folder's read speed (bytes/s), or None where it cannot be measured (not writable, no room)."""
    from .stream import disk_read_speed, spill_folder
    try:
        return disk_read_speed(spill_folder())
    except OSError:
        return None


def measure(comm, file, cfg, backend, threads, repeats=REPEATS, slow=None):
    """Every rank: time this rank, the links and the step record; rank 0 returns the profile dict (else None)."""
    from .comm import host_name
    from .rank import agree, available_bytes
    t0 = time.perf_counter()
    unit_bytes = model_bytes(file, cfg)
    timer, shares = Timer(repeats, slow), probe_shares(cfg, unit_bytes)
    # a rank that cannot time (out of memory, a device that refuses) stops every rank, not only itself
    times = agree(comm, lambda: {name: time_share(file, cfg, backend, s, timer, ROWS) for name, s in shares.items()})
    mine = {"rank": comm.rank, "host": host_name(), "backend": backend.description, "threads": threads,
            "memory_bytes": available_bytes(), "device_memory_bytes": backend.device_memory_bytes(),
            "disk_bytes_per_s": spill_read_speed(),
            "compute": [fit(shares, unit_bytes, times, b) for b in ROWS],
            "prefill": fit(shares, unit_bytes, times, "prefill")}
    ranks = comm.gather(mine)
    lat, bw = measure_links(comm, cfg.dim, repeats)
    step_ms = comm.bcast_seconds(repeats * 4) * 1e3
    row = lambda r: lat[0][r] + cfg.dim * 4 / bw[0][r] * 1e3  # noqa: E731 - one row from rank 0 to rank r, ms
    peer = comm.bcast(min(range(1, comm.size), key=row) if comm.is_root and comm.size > 1 else None)
    allreduce_ms = comm.allreduce_seconds(peer, cfg.dim, repeats * 4) if peer is not None else None
    if not comm.is_root:
        return None
    return {"format": "spmd-profile", "version": 1,
            "model": {"file": file.path, "n_layers": cfg.n_layers, "dim": cfg.dim, "n_heads": cfg.n_heads,
                      "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "ffn_dim": cfg.ffn_dim,
                      "vocab": cfg.vocab, "context": cfg.context, "bytes": unit_bytes,
                      "kv_bytes_per_position": kv_bytes_per_position(cfg), "ffn_unit": cfg.ffn_unit},
            "ranks": ranks, "links": {"latency_ms": lat, "bandwidth_bytes_per_s": bw},
            "step_ms": step_ms, "allreduce_ms": max(0.0, allreduce_ms * 1e3 - 2 * row(peer)) if peer else 0.0,
            "seconds": time.perf_counter() - t0}


def table(profile) -> str:
    """The profile as a readable table: per rank, at each row count (the last: the prefill), a layer's fixed cost
    (`fixed ms`), a layer holding every unit (`layer ms`), the whole classifier (`head ms`), and its host's memory;
    then the links."""
    m = profile["model"]
    lines = [f"model {m['file']}: {m['n_layers']} layers, {m['n_kv_heads']} KV-head groups, "
             f"{n_ffn_blocks(m['ffn_dim'])} FFN blocks, {m['vocab']} classifier rows",
             f"{'rank':>4} {'host':<12} {'backend':<24} {'rows':>4} {'fixed ms':>9} {'layer ms':>11} "
             f"{'head ms':>8} {'memory':>9}"]
    for r in profile["ranks"]:
        for p in r["compute"] + [r["prefill"]]:
            whole = p["layer_ms"] + m["n_kv_heads"] * p["kv_group_ms"] + n_ffn_blocks(m["ffn_dim"]) * p["ffn_block_ms"]
            head = p["head_ms"] + m["vocab"] * p["vocab_row_ms"]
            mem = f"{r['memory_bytes'] / 2**30:.1f} GiB" if r["memory_bytes"] is not None else "?"
            lines.append(f"{r['rank']:>4} {r['host'][:12]:<12} {r['backend'][:24]:<24} {p['rows']:>4} "
                         f"{p['layer_ms']:>9.3f} {whole:>11.3f} {head:>8.3f} {mem:>9}")
    n = len(profile["ranks"])
    for a in range(n):
        for b in range(a + 1, n):
            lat, bw = profile["links"]["latency_ms"][a][b], profile["links"]["bandwidth_bytes_per_s"][a][b]
            lines.append(f"link {a}-{b}: latency {lat:.3f} ms, bandwidth {bw * 8 / 1e6:.0f} Mbit/s")
    lines.append(f"step record: {profile['step_ms']:.3f} ms; allreduce beyond its links: {profile['allreduce_ms']:.3f} "
                 f"ms; measured in {profile['seconds']:.1f} s")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", "-m", required=True, metavar="FILE.gguf",
              help="GGUF model file (the same path on every host).")
@click.option("--backend", default="cpu", show_default=True, metavar="NAME[,NAME...]",
              help="cpu, vulkan or numpy: one for every rank, or one per rank (as spmd.run takes it).")
@click.option("--gpu", default=None, metavar="N[,N...]", help="Vulkan device index on each rank's host (as spmd.run).")
@click.option("--threads", default=None, metavar="N[,N...]", help="Kernel threads of each rank (as spmd.run).")
@click.option("--out", default=None, metavar="FILE.json", help="Write the profile here (python -m spmd.plan reads it).")
@click.option("--repeats", default=REPEATS, show_default=True, type=click.IntRange(1, 1000),
              help="Runs of each timing (compute: the least counts; links and collectives: the median).")
def cli(**kw):
    """Measure every rank (compute per layer unit and classifier row, memory) and every link, for the planner.

    Run it on every rank: mpirun -hostfile hostfiles/home.txt -n 3 python -m spmd.profile --model m.gguf --out p.json
    """
    return kw


def set_up(comm, opts):
    """Every rank: its backend name, threads, the file and config (errors agreed on), then the backend."""
    from .rank import agree, check_same, make_backend, model_identity, open_model, per_rank_choice
    name, gpu, threads, wraps, _ = agree(comm, lambda: per_rank_choice(opts, comm))
    file, cfg = agree(comm, lambda: open_model(opts.model))
    check_same(comm, model_identity(file, cfg), "python -m spmd.profile")
    return file, cfg, make_backend(comm, name, threads, gpu, wraps), threads


def write_json(path, data):
    """Write `data` to `path` whole or not at all (a temporary file renamed over it; through a symbolic link, over
    the file it names)."""
    import os
    path = os.path.realpath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"--out {path}: cannot write it ({e.strerror or e})") from None


def check_out(path, model):
    """--out before anything is measured: a name, in a folder it can write, neither the model nor another file
    that is not a profile (it would be overwritten)."""
    import os
    import stat
    if not path:
        raise UserError("--out: the name is empty")
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a directory: name the file to write")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):  # (not opened: a FIFO would wait)
        raise UserError(f"--out {path} exists and is not a regular file (a device, a FIFO): name a file")
    if os.path.exists(path):
        if os.path.exists(model) and os.path.samefile(path, model):
            raise UserError(f"--out {path} is the model file: name another file to write the profile to")
        try:
            with open(path, "rb") as f:
                head = f.read(64)
        except OSError as e:
            raise UserError(f"--out {path}: cannot read what is there ({e.strerror or e})") from None
        if head and b'"spmd-profile"' not in head:
            raise UserError(f"--out {path} exists and is not a profile: not overwritten (remove it or name another)")
    tmp = f"{os.path.realpath(path)}.tmp{os.getpid()}"  # (write_json's) the folder exists and can be written
    try:
        open(tmp, "w").close()
        os.remove(tmp)
    except OSError as e:
        raise UserError(f"--out {path}: cannot write it ({e.strerror or e})") from None


def profile_run(comm, kw):
    from types import SimpleNamespace

    from .executor import slowdown
    from .rank import agree
    opts = SimpleNamespace(**kw)
    if opts.out is not None:
        agree(comm, lambda: check_out(opts.out, opts.model) if comm.is_root else None)
    file, cfg, backend, threads = set_up(comm, opts)
    profile = measure(comm, file, cfg, backend, threads, opts.repeats, slowdown(comm))
    if opts.out is not None:
        agree(comm, lambda: write_json(opts.out, profile) if comm.is_root else None)
    return profile


def main(argv=None):
    import signal

    from . import run as R
    needs.interruptible()
    signal.signal(signal.SIGTERM, R.interrupt)
    try:
        from . import comm as C  # initialises MPI
        comm = C.Comm()
        R.stdout_to_rank_0(comm)
        prog = "python -m spmd.profile"
        kw = R.flags_agreed(comm, R.parse_args(argv, comm.is_root, cli, prog), prog)
        R.imports_agreed(comm, ("backends", "executor", "weights"))
        profile = R.guarded(comm, R.root_log(comm), lambda: profile_run(comm, kw))
    except KeyboardInterrupt:
        sys.exit(R.signal_status())
    if comm.is_root:
        print(table(profile), flush=True)
        if kw["out"] is not None:
            print(f"wrote {kw['out']}: python -m spmd.plan {kw['out']}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

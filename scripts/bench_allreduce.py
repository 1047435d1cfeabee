"""Per-call latency and bytes sent of the three allreduces of spmd.comm.Comm (star, ring, mpi), across vector sizes
and rank counts, over one machine (shared memory or TCP over loopback) or over the simulated hosts of
scripts/netsim.sh. It times Comm.allreduce itself, the call the engine makes twice per layer per token.

    mpirun -n 3 python scripts/bench_allreduce.py                 # one rank count: this job's
    python scripts/bench_allreduce.py --ranks 2,3,4               # launches itself once per rank count
    python scripts/bench_allreduce.py --ranks 2,3 --tcp           # the same, MPI forced onto TCP over loopback
    python scripts/bench_allreduce.py --ranks 2,3 --hostfile hostfiles/netsim.txt   # over the simulated links
    SPMD_TEST_LINK_DELAY_MS=1 python scripts/bench_allreduce.py --ranks 3 ...       # plus a simulated latency

Each (ranks, algorithm, size) is called `--warmup` times, then timed `--repeats` times (fewer where a case would
pass --budget seconds); each timed call starts after a barrier, and its time is the slowest rank's. The table gives
the median (and 10th-90th percentiles) in microseconds, and the bytes each rank sent in one call as Comm counts them
(the algorithm's schedule; payload only): "root" is rank 0's, "most" the largest of any rank's. The per-token lines
price one decode token's allreduces for TinyLlama (22 layers x 2 of 2048 floats) and a 7B Llama (32 x 2 of 4096).
Writes bench-out/allreduce-LABEL.json and .png (--out, --label)."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import ROOT, is_netsim, mpi_prefix, save_png, where  # noqa: E402

from spmd.choices import ALLREDUCES as ALGORITHMS  # noqa: E402
SIZES = "256,1024,2048,4096,16384,65536,262144,1048576"
PER_TOKEN = {"TinyLlama-1.1B": (2048, 44), "Llama-7B": (4096, 64)}  # floats per allreduce, allreduces per token
TCP_LOOPBACK = {"UCX_TLS": "tcp,self", "MPIR_CVAR_NOLOCAL": "1"}  # MPICH: no shared memory between local ranks


# a model shape for the plan the ratios make (one stage of every rank): the ring's chunks follow its speeds
DIMS = SimpleNamespace(n_layers=8, n_heads=64, n_kv_heads=64, ffn_dim=16384, vocab=32000)


def ratios_for(spec, size):
    if spec == "equal":
        return (1,) * size
    if spec == "weighted":
        return tuple(range(1, size + 1))  # rank r holds r+1 parts: the ring's chunks follow
    try:
        values = tuple(float(v) for v in spec.split(":"))
    except ValueError:
        raise SystemExit(f"--ratios {spec!r}: expected equal, weighted or numbers separated by ':'") from None
    if len(values) != size:
        raise SystemExit(f"--ratios {spec} has {len(values)} values for {size} ranks")
    return values


def comm_for(algorithm, ratios, world):
    """spmd's Comm with `algorithm` over one stage of every rank, the ring's chunks weighted by `ratios`."""
    from spmd.comm import Comm
    from spmd.plan import make_plan, parse_layout
    comm = Comm(algorithm, comm=world)
    comm.set_plan(make_plan(parse_layout(":".join(f"{r:g}" for r in ratios), world.size), DIMS))
    return comm


def whole_numbers(flag, text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"{flag} {text!r}: expected whole numbers from 1, separated by commas")
    return values


def time_case(comm, world, x0, warmup, repeats, budget):
    """The slowest rank's time of each timed call (seconds), and the bytes this rank sent in one call."""
    from mpi4py import MPI
    x = np.empty_like(x0)
    before = comm.bytes_sent
    x[:] = x0
    comm.allreduce(x)
    sent = comm.bytes_sent - before
    t = time.perf_counter()
    for _ in range(warmup - 1):
        x[:] = x0
        comm.allreduce(x)
    first = (time.perf_counter() - t) / max(warmup - 1, 1)
    repeats = world.bcast(max(3, min(repeats, int(budget / max(first, 1e-6)))), root=0)
    times = np.empty(repeats)
    for i in range(repeats):
        x[:] = x0  # the sum would grow without bound
        world.Barrier()
        t = time.perf_counter()
        comm.allreduce(x)
        times[i] = time.perf_counter() - t
    slowest = np.empty_like(times)
    world.Allreduce(times, slowest, op=MPI.MAX)
    return slowest, sent


def measure(sizes, ratio_spec, warmup, repeats, budget):
    """Runs on every rank of this MPI job; returns the rows on rank 0 (None elsewhere)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    ratios = ratios_for(ratio_spec, world.size)
    rows = []
    for algorithm in ALGORITHMS:
        comm = comm_for(algorithm, ratios, world)
        for n in sizes:
            x0 = np.random.default_rng([n, world.rank]).standard_normal(n).astype(np.float32)
            times, sent = time_case(comm, world, x0, warmup, repeats, budget)
            sent_all = world.gather(sent, root=0)
            if world.rank == 0:
                us = times * 1e6
                rows.append(dict(ranks=world.size, algorithm=algorithm, floats=n, repeats=len(us),
                                 median_us=float(np.median(us)), p10_us=float(np.percentile(us, 10)),
                                 p90_us=float(np.percentile(us, 90)), bytes_per_rank=sent_all,
                                 ratios=":".join(f"{r:g}" for r in ratios)))
    hosts = world.gather(MPI.Get_processor_name(), root=0)
    return (rows, hosts, comm.link_delay_s * 1e3) if world.rank == 0 else None


def print_table(rows):
    print(f"{'ranks':>5} {'algorithm':<9}{'floats':>9}{'median us':>11}{'p10-p90 us':>17}{'calls':>6}"
          f"{'B sent root':>13}{'B sent most':>13}{'MB/s most':>10}")
    for r in rows:
        most = max(r["bytes_per_rank"])
        print(f"{r['ranks']:>5} {r['algorithm']:<9}{r['floats']:>9}{r['median_us']:>11.1f}"
              f"{r['p10_us']:>8.0f}-{r['p90_us']:<8.0f}{r['repeats']:>6}{r['bytes_per_rank'][0]:>13}{most:>13}"
              f"{most / r['median_us']:>10.1f}")


def per_token(rows):
    lines = []
    for model, (n, calls) in PER_TOKEN.items():
        for r in (r for r in rows if r["floats"] == n):
            lines.append(dict(model=model, ranks=r["ranks"], algorithm=r["algorithm"], calls=calls,
                              ms_per_token=r["median_us"] * calls / 1e3,
                              bytes_per_token_most=max(r["bytes_per_rank"]) * calls))
    for x in lines:
        print(f"per token, {x['model']} ({x['calls']} allreduces): {x['ranks']} ranks {x['algorithm']:<5} "
              f"{x['ms_per_token']:8.2f} ms, {x['bytes_per_token_most'] / 1e6:7.2f} MB sent by the busiest rank")
    return lines


def plot(rows, title, path):
    def draw(plt):
        fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
        styles = {"star": "o-", "ring": "s--", "mpi": "^:"}
        for p in sorted({r["ranks"] for r in rows}):
            for alg in ALGORITHMS:
                rs = [r for r in rows if r["ranks"] == p and r["algorithm"] == alg]
                if rs:
                    xs = [r["floats"] for r in rs]
                    a.plot(xs, [r["median_us"] for r in rs], styles[alg], label=f"{alg}, {p} ranks")
                    b.plot(xs, [max(r["bytes_per_rank"]) for r in rs], styles[alg], label=f"{alg}, {p} ranks")
        for ax, what in ((a, "median time per call (us)"), (b, "bytes sent per call, busiest rank")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("vector length (float32)")
            ax.set_ylabel(what)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(title)
    save_png(path, draw)


def launch(ranks, hostfile, tcp, args):
    """The wrapper mode: this script under mpirun once per rank count; the rows from each."""
    rows, runs = [], []
    for p in ranks:
        with tempfile.NamedTemporaryFile(suffix=".json") as part:
            cmd = mpi_prefix(p, hostfile) + [sys.executable, __file__, *args, "--part", part.name]
            env = {**os.environ, **(TCP_LOOPBACK if tcp else {})}
            print(f"== {p} ranks: {' '.join(cmd[:6])} ...", flush=True)
            if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
                raise SystemExit(f"the {p}-rank run failed")
            got = json.loads(Path(part.name).read_text())
        rows += got["rows"]
        runs.append(dict(ranks=p, hosts=got["hosts"], link_delay_ms=got["link_delay_ms"]))
    return rows, runs


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--ranks", default=None, help="Rank counts, e.g. 2,3,4: launch this script under mpirun for each. "
              "Without it, measure in the MPI job this runs in.")
@click.option("--hostfile", default=None, type=click.Path(exists=True, dir_okay=False),
              help="With --ranks: run from this hostfile; hostfiles/netsim.txt runs over the simulated hosts.")
@click.option("--tcp", is_flag=True, help="With --ranks on one machine: MPI over TCP on loopback, not shared memory.")
@click.option("--sizes", default=SIZES, show_default=True, help="Vector lengths in floats.")
@click.option("--ratios", default="equal", show_default=True,
              help="equal, weighted (rank r gets r+1 parts), or R0:R1:... (one rank count only).")
@click.option("--warmup", default=5, show_default=True)
@click.option("--repeats", default=50, show_default=True)
@click.option("--budget", default=3.0, show_default=True, help="Seconds per case at most (repeats drop, to 3).")
@click.option("--label", default=None, help="Name of this set-up in the file names and title (default: from flags).")
@click.option("--out", default="bench-out", show_default=True, help="Folder for the JSON and PNG.")
@click.option("--part", default=None, hidden=True)
def main(ranks, hostfile, tcp, sizes, ratios, warmup, repeats, budget, label, out, part):
    sizes = whole_numbers("--sizes", sizes)
    delay = os.environ.get("SPMD_TEST_LINK_DELAY_MS")
    if ranks is not None:
        args = ["--sizes", ",".join(map(str, sizes)), "--ratios", ratios, "--warmup", str(warmup),
                "--repeats", str(repeats), "--budget", str(budget)]
        rows, runs = launch(whole_numbers("--ranks", ranks), hostfile, tcp, args)
    else:
        if part is None and (hostfile or tcp):
            raise SystemExit("--hostfile and --tcp go with --ranks (or give them to your own mpirun)")
        got = measure(sizes, ratios, warmup, repeats, budget)
        if got is None:
            return
        rows, hosts, delay_ms = got
        runs = [dict(ranks=rows[0]["ranks"], hosts=hosts, link_delay_ms=delay_ms)]
        if part is not None:
            Path(part).write_text(json.dumps(dict(rows=rows, hosts=hosts, link_delay_ms=delay_ms)))
            return
    place = (where(hostfile) if hostfile else
             "one machine, TCP over loopback" if tcp else "one machine (MPI's shared memory)")
    label = label or "-".join(["netsim" if is_netsim(hostfile) else "tcp" if tcp else "local"]
                              + ([f"delay{delay}ms"] if delay else []))
    title = f"allreduce, {place}, ratios {ratios}" + (
        f"; simulated link delay {delay} ms per step (test-only sleep, SPMD_TEST_LINK_DELAY_MS)" if delay else "")
    print(f"\n{title}; hosts of rank 0..: {runs[-1]['hosts']}")
    print_table(rows)
    tokens = per_token(rows)
    os.makedirs(out, exist_ok=True)
    base = str(Path(out) / f"allreduce-{label}")
    Path(base + ".json").write_text(json.dumps(dict(
        where=place, label=label, ratios=ratios, link_delay_ms=float(delay) if delay else 0.0, runs=runs,
        rows=rows, per_token=tokens), indent=1))
    print(f"wrote {base}.json")
    plot(rows, title, f"{base}.png")


if __name__ == "__main__":
    main()

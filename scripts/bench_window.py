"""Decode speed against --memory-limit, from everything resident down to the smallest window, on a random-weight
model of TinyLlama-1.1B's shape (one rank), beside the two bounds a streamed token cannot beat and beside llama.cpp
on the same file under the same memory cap.

    python scripts/bench_window.py [--qtype Q4_0] [--steps 16] [--fractions 1,0.75,0.5,0.25,0] [--threads N]
                                   [--model FILE] [--json out.json]

Each run is capped by a memory cgroup the kernel enforces (scripts/memory_cap.py) of the limit plus the runtime's
own RUNTIME, page cache included, as on a machine with that much memory: the spill file's pages then cannot all
stay cached, and a streamed token reads them from the disk. Without cgroups (not root) the runs are not capped and
the page cache holds the spill file: the table says so.

The bounds per row: compute + sync (the all-resident run's ms per token) and disk time (the streamed bytes per
token over the disk's read speed, measured on the model file with its cached pages dropped first). The target is a
streamed token within 1.2x of the larger. llama.cpp (native llama-bench, scripts/build_llama_cpp.sh) maps the
file and leaves the rest to the page cache: under a cap below the model it reads evicted pages again and again.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import ROOT, llama_bench, random_prompt, write_random_model  # noqa: E402
from memory_cap import CapUnavailable, MemoryCap  # noqa: E402

MIB = 1 << 20
RUNTIME = 256 * MIB  # what a rank takes beyond --memory-limit (interpreter, libraries, compiled kernels): ~195 MiB


def disk_read_speed(folder, size=512 * MIB, block=16 * MIB):
    """Bytes/s reading back `size` bytes written to a file in `folder` (where the spill files go) once they are
    on the disk and out of the page cache: what a streamed half costs when the cache does not hold it. (On a
    virtual machine the host's own cache may serve it: the same holds for the spill file.)"""
    with tempfile.TemporaryFile(dir=folder) as f:
        chunk = os.urandom(block)
        for _ in range(size // block):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # needs no root
        buf, done, t = bytearray(block), 0, time.perf_counter()
        while (n := os.preadv(f.fileno(), [buf], done)) > 0:
            done += n
        return done / (time.perf_counter() - t)


def drop_cached(path):
    """Take `path`'s pages out of the page cache (those no process maps): read again, they are charged to the
    reader's cgroup (pages cached before, charged elsewhere, would escape its cap)."""
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def capped(limit):
    """A MemoryCap of limit + RUNTIME, or None where cgroups cannot be made."""
    try:
        return MemoryCap(limit + RUNTIME)
    except CapUnavailable as e:
        print(f"note: runs are not capped ({e}): the page cache keeps the spill file", flush=True)
        return None


def run_spmd(model, steps, prompt, threads, limit=None, cap=None):
    cmd = [sys.executable, "-m", "spmd.run", "--model", str(model), "--steps", str(steps), "--output", "json",
           "--prompt-ids", ",".join(map(str, prompt)), "--threads", str(threads)]
    if limit is not None:
        cmd += ["--memory-limit", str(limit)]
    drop_cached(model)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=cap.enter if cap else None)
    if p.returncode != 0:
        raise SystemExit(f"spmd run failed (status {p.returncode}, {' '.join(cmd[-4:])}):\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def run_llama(binary, model, steps, threads, cap=None, repack=True):
    """llama-bench's decode tok/s (one repeat: a capped run can take long), or None where it failed (killed)."""
    cmd = [binary, "-m", str(model), "-p", "0", "-n", str(steps), "-t", str(threads), "-r", "1", "-o", "json",
           "--repack", str(int(repack))]
    drop_cached(model)
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap.enter if cap else None)
    if p.returncode != 0:
        return None
    return json.loads(p.stdout)[0]["avg_ts"]


def main():
    import click

    from spmd.synth import FILE_TYPES, TINYLLAMA

    @click.command()
    @click.option("--qtype", default="Q4_0", type=click.Choice(list(FILE_TYPES)))
    @click.option("--steps", default=16, show_default=True)
    @click.option("--fractions", default="1,0.75,0.5,0.25,0", show_default=True,
                  help="Limits as fractions of the way from the smallest window (0) to everything resident (1).")
    @click.option("--threads", default=os.cpu_count(), show_default=True)
    @click.option("--model", default=None, help="Use this GGUF instead of writing a random TinyLlama-shaped one.")
    @click.option("--json", "json_out", default=None)
    def cli(qtype, steps, fractions, threads, model, json_out):
        tmp = None
        if model is None:
            tmp = tempfile.mkdtemp(prefix="spmd-bench-")
            model = os.path.join(tmp, f"tinyllama-random-{qtype}.gguf")
            write_random_model(model, TINYLLAMA, qtype)
        prompt = random_prompt(8)
        disk = disk_read_speed(tempfile.gettempdir())
        print(f"disk read speed: {disk / 1e9:.2f} GB/s ({tempfile.gettempdir()})", flush=True)
        free = run_spmd(model, steps, prompt, threads)
        need, floor = free["ranks"][0]["memory_need_bytes"], free["ranks"][0]["memory_floor_bytes"]
        compute_ms = free["ms_per_token"]
        binary = llama_bench()
        rows = []
        for fraction in (float(f) for f in fractions.split(",")):
            limit = int(floor + fraction * (need - floor))
            cap = capped(limit)
            try:
                r = run_spmd(model, steps, prompt, threads, limit, cap)
                peer = run_llama(binary, model, steps, threads, cap) if binary else None
                plain = run_llama(binary, model, steps, threads, cap, repack=False) if binary else None
            finally:
                if cap:
                    cap.remove()
            x = r["ranks"][0]
            streamed = x.get("streamed_bytes_per_token", 0)
            disk_ms = streamed / disk * 1e3
            bound = max(compute_ms, disk_ms)
            rows.append(dict(limit_mib=limit / MIB, capped=cap is not None,
                             resident_mib=x["resident_weights_bytes"] / MIB,
                             streamed_mib=streamed / MIB, window_mib=x.get("window_bytes", 0) / MIB,
                             decode_tokens_per_s=r["decode_tokens_per_s"], ms_per_token=r["ms_per_token"],
                             wait_ms=x.get("stream_wait_ms_per_token", 0.0), disk_ms=disk_ms, bound_ms=bound,
                             ratio=r["ms_per_token"] / bound, peak_rss_mib=x["peak_rss_bytes"] / MIB,
                             llama_cpp_tokens_per_s=peer, llama_cpp_no_repack_tokens_per_s=plain,
                             same_tokens=r["tokens"] == free["tokens"]))
            print(json.dumps(rows[-1]), flush=True)
        print(f"\nspmd 1 rank x {threads} threads, {Path(model).name}; all resident: {compute_ms:.1f} ms/token; "
              f"disk {disk / 1e9:.2f} GB/s; cap = limit + {RUNTIME // MIB} MiB"
              + ("" if all(r["capped"] for r in rows) else " (NOT capped: no cgroup)"))
        print("| limit MiB | resident MiB | streamed MiB/token | window MiB | tok/s | ms/token | waited ms | disk ms | "
              "bound ms | ms / bound | peak RSS MiB | llama.cpp tok/s | its --repack 0 | spmd / best llama.cpp | "
              "same tokens |")
        print("|" + "---|" * 15)
        shown = lambda v: "killed" if v is None and binary else "-" if v is None else f"{v:.2f}"  # noqa: E731
        for r in rows:
            peers = [v for v in (r["llama_cpp_tokens_per_s"], r["llama_cpp_no_repack_tokens_per_s"]) if v]
            print(f"| {r['limit_mib']:.0f} | {r['resident_mib']:.0f} | {r['streamed_mib']:.0f} | "
                  f"{r['window_mib']:.0f} | {r['decode_tokens_per_s']:.2f} | {r['ms_per_token']:.1f} | "
                  f"{r['wait_ms']:.1f} | {r['disk_ms']:.1f} | {r['bound_ms']:.1f} | {r['ratio']:.2f} | "
                  f"{r['peak_rss_mib']:.0f} | {shown(r['llama_cpp_tokens_per_s'])} | "
                  f"{shown(r['llama_cpp_no_repack_tokens_per_s'])} | "
                  f"{r['decode_tokens_per_s'] / max(peers) if peers else float('nan'):.2f} | {r['same_tokens']} |")
        if json_out:
            Path(json_out).write_text(json.dumps(dict(model=str(model), disk_bytes_per_s=disk,
                                                      compute_ms=compute_ms, rows=rows), indent=1))
        if tmp:
            os.remove(model)
            os.rmdir(tmp)

    cli()


if __name__ == "__main__":
    main()

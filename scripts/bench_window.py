"""Decode speed against --memory-limit, from everything resident down to the smallest window, on a random-weight
model of TinyLlama-1.1B's shape (one rank), beside the two bounds a streamed token cannot beat and beside llama.cpp
on the same file under the same memory cap.

    python scripts/bench_window.py [--qtype Q4_0] [--steps 16] [--fractions 1,0.75,0.5,0.25,0] [--threads N]
                                   [--model FILE] [--backend cpu|vulkan] [--json out.json]

Each run is capped by a memory cgroup the kernel enforces (scripts/memory_cap.py) of the limit plus the runtime's
own RUNTIME, page cache included, as on a machine with that much memory: the spill file's pages then cannot all
stay cached, and a streamed token reads them from the disk. Without cgroups (not root) the runs are not capped and
the page cache holds the spill file: the table says so.

The bounds per row: compute + sync (the all-resident run's ms per token) and disk time (the streamed bytes per
token over the disk's read speed, measured on the model file with its cached pages dropped first). The target is a
streamed token within 1.2x of the larger. llama.cpp (native llama-bench, scripts/build_llama_cpp.sh) maps the
file and leaves the rest to the page cache: under a cap below the model it reads evicted pages again and again.

With --backend vulkan the limit is the GPU's: nothing is capped on the host (its page cache holds the spill file),
the second bound is the streamed bytes over the speed a half comes into device memory (measured: the device's
copies from host memory where the window holds the halves there, else the host's writes), and the peer is
llama.cpp with a GPU build ($LLAMA_BENCH) offloading as large a share of the layers to the GPU as spmd keeps
resident there (`-ngl`), the rest on the CPU's threads: what llama.cpp does with a model larger than a GPU.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (ROOT, llama_bench, model_vocab, random_prompt, temporary_folder,  # noqa: E402
                          write_random_model)
from memory_cap import CapUnavailable, MemoryCap  # noqa: E402

MIB = 1 << 20
RUNTIME = 256 * MIB  # what a rank takes beyond --memory-limit (interpreter, libraries, compiled kernels): ~195 MiB


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


def device_write_speed(nbytes, size=256 * MIB):
    """(Bytes/s a streamed half comes into Vulkan device memory, how): where the weight window holds the halves
    in host memory (spmd.stream.halves_on_host, for `nbytes` of them), the device's copy from there; else the
    host's writes from host memory, in pieces on as many threads as the window's copies (the spill file's cached
    pages into a slot)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from spmd.backends import get_backend
    from spmd.backends.vk_runtime import Buffer, Recording
    from spmd.stream import COPY_PIECE, COPY_THREADS, halves_on_host
    dev = get_backend("vulkan").dev
    src, dst = np.random.default_rng(0).integers(0, 255, size, np.uint8), Buffer(dev, size)
    if halves_on_host(dev, nbytes):
        host, rec = Buffer(dev, size, "pool"), Recording(dev)
        host.write(src)
        dev.copy(rec, host, dst, size)
        rec.end()
        rec.run()
        t = time.perf_counter()
        for _ in range(5):
            rec.run()
        speed, how = 5 * size / (time.perf_counter() - t), "the device's copies from host memory"
        rec.free()
        host.free()
    else:
        with ThreadPoolExecutor(COPY_THREADS if dev.direct else 1) as pool:
            def fill():
                list(pool.map(lambda at: dst.write(src[at:at + COPY_PIECE], at), range(0, size, COPY_PIECE)))
            fill()
            t = time.perf_counter()
            for _ in range(3):
                fill()
            speed, how = 3 * size / (time.perf_counter() - t), "the host's writes"
    dst.free()
    return speed, how


def run_spmd(model, steps, prompt, threads, limit=None, cap=None, backend="cpu"):
    cmd = [sys.executable, "-m", "spmd.run", "--model", str(model), "--steps", str(steps), "--output", "json",
           "--prompt-ids", ",".join(map(str, prompt)), "--threads", str(threads), "--backend", backend]
    if limit is not None:
        cmd += ["--memory-limit", str(limit)]
    drop_cached(model)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=cap.enter if cap else None)
    if p.returncode != 0:
        raise SystemExit(f"spmd run failed (status {p.returncode}, {' '.join(cmd[-4:])}):\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def run_llama(binary, model, steps, threads, cap=None, repack=True, gpu_layers=None):
    """llama-bench's decode tok/s (one repeat: a capped run can take long), or None where it failed (killed).
    gpu_layers: a GPU build's -ngl."""
    cmd = [binary, "-m", str(model), "-p", "0", "-n", str(steps), "-t", str(threads), "-r", "1", "-o", "json",
           "--repack", str(int(repack))]
    if gpu_layers is not None:
        cmd += ["-ngl", str(gpu_layers)]
    drop_cached(model)
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap.enter if cap else None)
    if p.returncode != 0:
        return None
    return json.loads(p.stdout)[0]["avg_ts"]


def main():
    import click

    from spmd.gguf_file import GGUFFile
    from spmd.stream import disk_read_speed
    from spmd.synth import FILE_TYPES, TINYLLAMA

    @click.command()
    @click.option("--qtype", default="Q4_0", type=click.Choice(list(FILE_TYPES)))
    @click.option("--steps", default=16, show_default=True)
    @click.option("--fractions", default="1,0.75,0.5,0.25,0", show_default=True,
                  help="Limits as fractions of the way from the smallest window (0) to everything resident (1).")
    @click.option("--threads", default=os.cpu_count(), show_default=True)
    @click.option("--model", default=None, help="Use this GGUF instead of writing a random TinyLlama-shaped one.")
    @click.option("--backend", default="cpu", type=click.Choice(["cpu", "vulkan"]), show_default=True)
    @click.option("--json", "json_out", default=None)
    def cli(qtype, steps, fractions, threads, model, backend, json_out):
        if model is None:
            model = os.path.join(temporary_folder("spmd-bench-"), f"tinyllama-random-{qtype}.gguf")
            write_random_model(model, TINYLLAMA, qtype)
        prompt = random_prompt(8, model_vocab(model))
        gpu = backend == "vulkan"
        if gpu:
            disk, how = device_write_speed(os.path.getsize(model))
            print(f"host to device: {disk / 1e9:.2f} GB/s ({how})", flush=True)
        else:
            disk = disk_read_speed(tempfile.gettempdir(), 512 * MIB)
            print(f"disk read speed: {disk / 1e9:.2f} GB/s ({tempfile.gettempdir()})", flush=True)
        free = run_spmd(model, steps, prompt, threads, backend=backend)
        need, floor = free["ranks"][0]["memory_need_bytes"], free["ranks"][0]["memory_floor_bytes"]
        compute_ms = free["ms_per_token"]
        binary = llama_bench()
        n_layers = len({name.split(".")[1] for name in GGUFFile(model).tensors if name.startswith("blk.")})
        rows = []
        for fraction in (float(f) for f in fractions.split(",")):
            limit = int(floor + fraction * (need - floor))
            cap = None if gpu else capped(limit)
            try:
                r = run_spmd(model, steps, prompt, threads, limit, cap, backend)
                if gpu:  # llama.cpp with the same share of the weights on the GPU, the rest on the CPU
                    x = r["ranks"][0]
                    share = x["resident_weights_bytes"] / x["weights_bytes"]
                    peer = run_llama(binary, model, steps, threads, gpu_layers=round(share * n_layers)) \
                        if binary else None
                    plain = None
                else:
                    peer = run_llama(binary, model, steps, threads, cap) if binary else None
                    plain = run_llama(binary, model, steps, threads, cap, repack=False) if binary else None
            finally:
                if cap:
                    cap.remove()
            x = r["ranks"][0]
            streamed = x.get("streamed_bytes_per_token", 0)
            if not streamed:  # all resident again: the faster of the two runs is the compute bound (the first
                compute_ms = min(compute_ms, r["ms_per_token"])  # run on a GPU read 1.7-4x slower, clocks rising)
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
        where = "the GPU's memory; host to device" if gpu else f"cap = limit + {RUNTIME // MIB} MiB; disk"
        print(f"\nspmd 1 rank ({backend}) x {threads} threads, {Path(model).name}; all resident: {compute_ms:.1f} "
              f"ms/token; limit on {where} {disk / 1e9:.2f} GB/s"
              + ("" if gpu or all(r["capped"] for r in rows) else " (NOT capped: no cgroup)"))
        print(f"| limit MiB | resident MiB | streamed MiB/token | window MiB | tok/s | ms/token | waited ms | "
              f"{'copy' if gpu else 'disk'} ms | bound ms | ms / bound | peak RSS MiB | llama.cpp tok/s"
              f"{' (-ngl: the same share on the GPU)' if gpu else ''} | its --repack 0 | spmd / best llama.cpp | "
              "same tokens |")
        print("|" + "---|" * 15)
        shown = lambda v: "-" if v is None and (gpu or not binary) else "killed" if v is None else f"{v:.2f}"  # noqa
        for r in rows:
            peers = [v for v in (r["llama_cpp_tokens_per_s"], r["llama_cpp_no_repack_tokens_per_s"]) if v]
            ratio = f"{r['decode_tokens_per_s'] / max(peers):.2f}" if peers else "-"
            print(f"| {r['limit_mib']:.0f} | {r['resident_mib']:.0f} | {r['streamed_mib']:.0f} | "
                  f"{r['window_mib']:.0f} | {r['decode_tokens_per_s']:.2f} | {r['ms_per_token']:.1f} | "
                  f"{r['wait_ms']:.1f} | {r['disk_ms']:.1f} | {r['bound_ms']:.1f} | {r['ratio']:.2f} | "
                  f"{r['peak_rss_mib']:.0f} | {shown(r['llama_cpp_tokens_per_s'])} | "
                  f"{'-' if gpu else shown(r['llama_cpp_no_repack_tokens_per_s'])} | "
                  f"{ratio} | {r['same_tokens']} |")
        if not binary:
            print("(llama.cpp not run: no llama-bench found; bash scripts/build_llama_cpp.sh builds it, or set "
                  "LLAMA_BENCH)")
        if json_out:
            Path(json_out).write_text(json.dumps(dict(model=str(model), disk_bytes_per_s=disk,
                                                      compute_ms=compute_ms, rows=rows), indent=1))

    cli()


if __name__ == "__main__":
    main()

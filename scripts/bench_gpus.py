"""Several GPUs of one host (Vulkan ranks, one GPU each): one GPU against tensor parallelism (1:1) and pipeline
stages (1*1) on two, for one sequence and for two in flight, and llama.cpp (CUDA) split the same ways where its
llama-bench is given.

    python scripts/bench_gpus.py --model m.gguf [--llama-bench /path/to/llama-bench]
    python scripts/bench_gpus.py --shape tinyllama --qtype Q4_0          # writes a random model of that shape

Prints per layout: prompt tokens/s (one prompt of --prompt-len tokens), decode tokens/s (one sequence; with two,
tokens/s of both together), each rank's time outside compute per decode token (waiting for the other rank and in
the allreduces or hand-offs), and for tensor parallelism that time per allreduce (2 a layer): what a round trip
through host memory costs. Ratios are against one GPU. The ranks of a job share the host's memory: their
allreduces go through MPICH's shared memory after each GPU's partial sum is read back.
"""
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_decode import model_vocab, mpi_prefix  # noqa: E402
LAYOUTS = (("1 GPU", "1", "0"), ("TP 1:1", "1:1", "0,1"), ("PP 1*1", "1*1", "0,1"))


def run(model, layout, gpus, prompts, steps, threads):
    """spmd.run's JSON result for `prompts` (lists of ids) on `layout`."""
    ranks = len(layout.replace("*", ":").split(":"))
    args = ["--model", model, "--backend", "vulkan", "--gpu", gpus, "--ratios", layout, "--steps", str(steps),
            "--threads", str(threads), "--output", "json", "--sequences", str(len(prompts))]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for ids in prompts:
            f.write(json.dumps({"prompt_ids": ids}) + "\n")
    try:
        cmd = [*mpi_prefix(ranks), sys.executable, "-m", "spmd.run", *args]
        cmd += ["--prompts-file", f.name] if len(prompts) > 1 else ["--prompt-ids", ",".join(map(str, prompts[0]))]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    finally:
        os.unlink(f.name)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def llama(bench, model, split, prompt_len, steps, depth=0):
    """llama-bench's (prompt tok/s, decode tok/s) with every layer on the GPUs, split by `split` (none: GPU 0),
    flash attention on; decode with `depth` tokens already in the cache (a run of its own); None if it fails."""
    def bench_json(*args):
        p = subprocess.run([bench, "-m", str(model), "-ngl", "99", "-sm", split, "-mg", "0", "-fa", "1", "-r", "3",
                            "-o", "json", *args], capture_output=True, text=True, timeout=600)
        return json.loads(p.stdout) if p.returncode == 0 else None
    rows = bench_json("-p", str(prompt_len), "-n", "0" if depth else str(steps))
    if rows and depth:
        decode = bench_json("-p", "0", "-n", str(steps), "-d", str(depth))
        rows = rows + decode if decode else None
    if not rows:
        return None
    pick = lambda kind: next(r["avg_ts"] for r in rows if (r["n_prompt"] > 0) == (kind == "p"))  # noqa: E731
    return pick("p"), pick("n")


@click.command()
@click.option("--model", default=None, help="GGUF file; else a random model of --shape and --qtype is written.")
@click.option("--shape", default="tinyllama", type=click.Choice(["tinyllama", "7b"]), show_default=True)
@click.option("--qtype", default="Q4_0", show_default=True)
@click.option("--prompt-len", default=128, show_default=True)
@click.option("--steps", default=256, show_default=True)
@click.option("--threads", default=4, show_default=True, help="CPU threads of each rank (its host-side work).")
@click.option("--llama-bench", "bench", default=os.environ.get("LLAMA_BENCH"), help="llama.cpp's llama-bench "
              "built with CUDA: the peer (-sm none, layer, row).")
def main(model, shape, qtype, prompt_len, steps, threads, bench):
    if model is None:
        from spmd.synth import LLAMA2_7B, TINYLLAMA, write_model
        model = f"/tmp/{shape}-random-{qtype}.gguf"
        if not os.path.exists(model):
            write_model(model, TINYLLAMA if shape == "tinyllama" else LLAMA2_7B, qtype=qtype, seed=0)
    vocab = model_vocab(model)
    rng = random.Random(0)
    prompt, second = ([1] + [rng.randrange(3, vocab) for _ in range(prompt_len - 1)] for _ in range(2))
    print(f"{os.path.basename(model)}: prompt {prompt_len} tokens, {steps} generated")
    print(f"{'layout':10} {'prompt tok/s':>12} {'decode tok/s':>12} {'x 1 GPU':>8} {'2 seqs tok/s':>12} "
          f"{'x 1 GPU':>8}  {'sync ms/token per rank':>24} {'us/allreduce':>12}")
    run(model, "1", "0", [prompt[:8]], 4, threads)  # untimed: the driver's shader cache filled
    base, tokens = None, None
    for name, layout, gpus in LAYOUTS:
        one = run(model, layout, gpus, [prompt], steps, threads)
        two = run(model, layout, gpus, [prompt, second], steps, threads)
        decode, both = one["decode_tokens_per_s"], two["tokens_per_s"]
        base = base or (decode, both)
        tokens = tokens or one["tokens"]
        n = max(len(one["tokens"]) - 1, 1)
        sync = [r["sync_ms"] / n for r in one["ranks"]]
        n_layers = sum(s["layers"][1] - s["layers"][0] for s in one["stages"])
        per_allreduce = f"{max(sync) * 1e3 / (2 * n_layers):12.0f}" if ":" in layout else f"{'-':>12}"
        print(f"{name:10} {one['prompt_tokens_per_s']:12.0f} {decode:12.1f} {decode / base[0]:8.2f} {both:12.1f} "
              f"{both / base[1]:8.2f}  {' / '.join(f'{s:.2f}' for s in sync):>24} {per_allreduce}"
              + ("" if one["tokens"] == tokens else "  TOKENS DIFFER"))
    if bench:
        print("llama.cpp (CUDA), every layer on the GPUs:")
        for split in ("none", "layer", "row"):
            got = llama(bench, model, split, prompt_len, steps)
            print(f"  -sm {split:6} " + (f"prompt {got[0]:8.0f} tok/s  decode {got[1]:7.1f} tok/s" if got else
                                         "failed"))


if __name__ == "__main__":
    main()

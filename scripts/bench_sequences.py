"""Several sequences in flight: aggregate tokens/s and each rank's idle fraction against K (--ks, the sequences in
flight) for tensor-parallel, pipeline and hybrid layouts, measuring the real program: each point is one
`python -m spmd.run --output json` under mpirun with K prompts (distinct random ids, --prompt-len each, --steps
tokens each) and --sequences K. Ratios are against K = 1 of the same layout; for a layout of S stages the target is
K = S at least 0.8 x S, and with batching on one stage K = 8 at least 4x.

Where a llama.cpp build is at hand (--llama-bench PATH: its `llama-bench`, built natively as in
../shared/FIELD-NOTES.md), it runs on the same file with the same threads: its tokens/s for one sequence's steps
(tg) beside K = 1, and for a batch of K tokens through the weights at once (pp K, `-p K`: what batched decoding of
K sequences computes, less their attention) beside K > 1, as ours/llama.cpp.

    python scripts/bench_sequences.py --small                         # a small shape, a minute on 2 cores
    python scripts/bench_sequences.py --layouts 1,1:1,1*1 --threads 1 # TinyLlama shape, Q4_0
    python scripts/bench_sequences.py --hostfile hostfiles/netsim.txt --threads 1   # simulated hosts

Writes bench-out/sequences-LABEL.json (--out, --label)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (ROOT, model_vocab, mpi_prefix, parse_run, temporary_folder, where,  # noqa: E402
                          write_random_model)
from spmd.synth import TINYLLAMA, Shape  # noqa: E402

SMALL = Shape(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn=1408, vocab=32000, context=1024)


def prompts_file(folder, k, prompt_len, steps, vocab):
    """K prompts of distinct random ids (BOS first) as JSON Lines."""
    import numpy as np
    rng = np.random.default_rng(k)
    path = Path(folder) / f"prompts-{k}.jsonl"
    with open(path, "w") as f:
        for _ in range(k):
            ids = [1] + [int(x) for x in rng.integers(3, vocab, prompt_len - 1)]
            f.write(json.dumps({"prompt_ids": ids, "steps": steps}) + "\n")
    return path


def run_point(model, layout, k, prompts, hostfile, threads, env):
    n, ratios = parse_run(layout)
    cmd = mpi_prefix(n, hostfile) + [sys.executable, "-m", "spmd.run", "--model", str(model), "--output", "json",
                                     "--prompts-file", str(prompts), "--sequences", str(k),
                                     "--control-socket", "none"]
    if ratios:
        cmd += ["--ratios", ratios]
    if threads:
        cmd += ["--threads", str(threads)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    if p.returncode != 0:
        raise SystemExit(f"spmd run failed ({' '.join(cmd[:10])} ...):\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout)
    if "sequences" in r:
        tokens, seconds = r["tokens_generated"], r["elapsed_s"]
    else:  # one prompt: the single-sequence result; its prefill and decode steps
        tokens = len(r["tokens"])
        seconds = (r["prefill_ms"] + (r["ms_per_token"] or 0) * (tokens - 1)) / 1e3
    return dict(layout=layout, k=k, ranks=n, stages=len(r["stages"]), tokens=tokens, seconds=round(seconds, 4),
                tokens_per_s=round(tokens / seconds, 3), idle=[x["idle_fraction"] for x in r["ranks"]],
                ticks=r.get("pipeline_ticks"), kv_mib=[round(x["kv_bytes_peak"] / 2**20, 2) for x in r["ranks"]])


def llama_bench(binary, model, ks, steps, threads):
    """{K: tokens/s} from llama-bench: K = 1 its decode (tg), K > 1 one batch of K tokens (pp K)."""
    cmd = [binary, "-m", str(model), "-p", ",".join(str(k) for k in ks if k > 1), "-n", str(steps),
           "-t", str(threads or 1), "-r", "3", "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"llama-bench failed:\n{p.stderr[-2000:]}")
    out = {}
    for test in json.loads(p.stdout):
        k = 1 if test["n_gen"] else test["n_prompt"]
        out[k] = float(test["avg_ts"])
    return out


@click.command()
@click.option("--model", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A GGUF file (default: a random TinyLlama-1.1B-shaped Q4_0 model).")
@click.option("--small", is_flag=True, help="A small random shape (dim 512, 4 layers) for a quick run.")
@click.option("--layouts", default="1,1:1,1*1", show_default=True,
              help="--ratios values, comma-separated; a plain number of ranks (1, 2) is one stage of equal ranks.")
@click.option("--ks", default="1,2,4,8", show_default=True, help="Sequences in flight.")
@click.option("--prompt-len", default=16, show_default=True)
@click.option("--steps", default=32, show_default=True, help="Tokens generated per sequence.")
@click.option("--hostfile", default=None, type=click.Path(exists=True, dir_okay=False),
              help="MPICH hostfile; hostfiles/netsim.txt runs on the simulated hosts (scripts/netsim.sh).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="--threads of every rank.")
@click.option("--delay-ms", default=0.0, show_default=True, help="SPMD_TEST_LINK_DELAY_MS (simulated latency).")
@click.option("--llama-bench", "llama_bin", default=None, type=click.Path(exists=True, dir_okay=False),
              help="llama.cpp's llama-bench binary: its decode and K-token batch throughput on the same file.")
@click.option("--label", default=None)
@click.option("--out", default="bench-out", show_default=True)
def main(model, small, layouts, ks, prompt_len, steps, hostfile, threads, delay_ms, llama_bin, label, out):
    try:
        ks = [int(k) for k in ks.split(",")]
    except ValueError:
        raise SystemExit(f"--ks {ks!r}: expected whole numbers separated by commas") from None
    if min(ks) < 1:
        raise SystemExit(f"--ks {ks}: at least 1 sequence")
    tmp = temporary_folder("spmd-bench-seq-")
    if model is None:
        model = os.path.join(tmp, f"{'small' if small else 'tinyllama'}-random-Q4_0.gguf")
        write_random_model(model, SMALL if small else TINYLLAMA, "Q4_0")
    vocab = model_vocab(model)
    env = {"SPMD_TEST_LINK_DELAY_MS": str(delay_ms)} if delay_ms else {}
    rows = []
    for layout in layouts.split(","):
        for k in ks:
            r = run_point(model, layout, k, prompts_file(tmp, k, prompt_len, steps, vocab), hostfile, threads, env)
            rows.append(r)
            print(f"  {layout} K={k}: {r['tokens_per_s']:.2f} tok/s", flush=True)
    peer = llama_bench(llama_bin, model, ks, steps, threads) if llama_bin else {}
    print(f"\nmodel {Path(model).name}; prompt {prompt_len}, {steps} steps a sequence; {where(hostfile)}, "
          f"threads {threads or 'default'}, link delay {delay_ms} ms")
    print(f"{'layout':<12}{'K':>3}{'tok/s':>10}{f'vs K={ks[0]}':>8}{'target':>8}{'ticks':>7}  {'idle per rank':<24}"
          f"{'KV MiB/rank':<18}{'llama.cpp':>10}{'ours/l.cpp':>11}")
    for r in rows:
        base = next(x for x in rows if x["layout"] == r["layout"] and x["k"] == ks[0])["tokens_per_s"]
        target = (0.8 * r["stages"] if r["k"] == r["stages"] and r["stages"] > 1
                  else 4.0 if r["k"] == 8 and r["stages"] == 1 else None)
        r["vs_k1"] = round(r["tokens_per_s"] / base, 3)
        lc = peer.get(r["k"]) if r["ranks"] == 1 else None
        vs_lc = f"{r['tokens_per_s'] / lc:.2f}" if lc else "-"
        print(f"{r['layout']:<12}{r['k']:>3}{r['tokens_per_s']:>10.2f}{r['vs_k1']:>8.2f}"
              f"{(f'{target:.1f}' if target else '-'):>8}{str(r['ticks'] or '-'):>7}  "
              f"{'/'.join(f'{x:.2f}' for x in r['idle']):<24}{'/'.join(map(str, r['kv_mib'])):<18}"
              f"{(f'{lc:.2f}' if lc else '-'):>10}{vs_lc:>11}")
    if not llama_bin:
        print("(llama.cpp not run: give --llama-bench, the binary scripts/build_llama_cpp.sh builds)")
    os.makedirs(out, exist_ok=True)
    path = Path(out) / f"sequences-{label or Path(model).stem}.json"
    path.write_text(json.dumps(dict(model=str(model), prompt_len=prompt_len, steps=steps, hostfile=hostfile,
                                    threads=threads, delay_ms=delay_ms, rows=rows, llama_cpp=peer), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

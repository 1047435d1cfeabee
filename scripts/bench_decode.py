"""Decode and prompt speed on a random-weight model of TinyLlama-1.1B's shape, at 1 and 2 ranks, and through
llama-cpp-python on the same file when it is installed, all in one run so the ratios compare like with like.

    python scripts/bench_decode.py [--qtype Q4_0] [--steps 48] [--prompt-len 64] [--ranks 1,2] [--json out.json]

Weight-read bandwidth is the bytes of weights one decode step reads (every matrix once) divided by its time."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spmd.synth import TINYLLAMA, write_model  # noqa: E402


def run_spmd(model, ranks, steps, prompt_ids, allreduce, ratios=None):
    cmd = [sys.executable, "-m", "spmd.run", "--model", model, "--steps", str(steps), "--output", "json",
           "--allreduce", allreduce, "--prompt-ids", ",".join(map(str, prompt_ids))]
    if ratios:
        cmd += ["--ratios", ratios]
    if ranks > 1:
        cmd = [shutil.which("mpirun"), "-n", str(ranks)] + cmd
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"spmd run failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def run_llama_cpp(model, steps, prompt_ids):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=model, n_ctx=len(prompt_ids) + steps + 8, n_threads=os.cpu_count(), n_batch=512,
                verbose=False)
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # the last token's

    def greedy(ids):
        llm.eval(ids)
        return int(np.argmax(logits))
    t0 = time.perf_counter()
    tokens = [greedy(prompt_ids)]
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(steps - 1):
        tokens.append(greedy([tokens[-1]]))
    decode = time.perf_counter() - t1
    return dict(prompt_tokens_per_s=len(prompt_ids) / prefill, decode_tokens_per_s=(steps - 1) / decode,
                ms_per_token=decode * 1e3 / (steps - 1), tokens=tokens)


def matrix_bytes(model):
    from spmd.gguf_file import GGUFFile
    f = GGUFFile(model)
    return sum(t.nbytes for t in f.tensors.values() if len(t.shape) == 2 and t.name != "token_embd.weight")


@click.command()
@click.option("--qtype", default="Q4_0", type=click.Choice(["Q4_0", "Q8_0", "F16", "F32"]))
@click.option("--steps", default=48, show_default=True)
@click.option("--prompt-len", default=64, show_default=True)
@click.option("--ranks", default="1,2", show_default=True,
              help="Runs, comma-separated: a rank count (equal shares) or ratios such as 1:3.")
@click.option("--allreduce", default="star", show_default=True)
@click.option("--model", default=None, help="Use this GGUF instead of writing a random TinyLlama-shaped one.")
@click.option("--json", "json_out", default=None, help="Also write the results here.")
def main(qtype, steps, prompt_len, ranks, allreduce, model, json_out):
    tmp = None
    if model is None:
        tmp = tempfile.mkdtemp(prefix="spmd-bench-")
        model = os.path.join(tmp, f"tinyllama-random-{qtype}.gguf")
        t = time.perf_counter()
        write_model(model, TINYLLAMA, qtype=qtype, seed=0)
        print(f"wrote {model} ({os.path.getsize(model) / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s")
    weight_bytes = matrix_bytes(model)
    prompt = [1] + [int(x) for x in np.random.default_rng(0).integers(3, 32000, prompt_len - 1)]
    rows = []
    for run in ranks.split(","):
        n, ratios = (len(run.split(":")), run) if ":" in run else (int(run), None)
        r = run_spmd(model, n, steps, prompt, allreduce, ratios)
        rss = "/".join(f"{x['peak_rss_bytes'] / 2**20:.0f}" for x in r["ranks"])
        held = "/".join(f"{x['weights_bytes'] / 2**20:.0f}" for x in r["ranks"])
        rows.append(dict(name=f"spmd {n} rank{'s' if n > 1 else ''}" + (f" {ratios}" if ratios else ""), ranks=n,
                         prompt_tokens_per_s=r["prompt_tokens_per_s"], decode_tokens_per_s=r["decode_tokens_per_s"],
                         ms_per_token=r["ms_per_token"], rss_mib=rss, weights_mib=held, tokens=r["tokens"]))
    lc = run_llama_cpp(model, steps, prompt)
    if lc is not None:
        rows.append(dict(name="llama-cpp-python", ranks=1, rss_mib="-", weights_mib="-", **lc))
    base = rows[0]["decode_tokens_per_s"]
    print(f"\nmodel: TinyLlama-1.1B shape, {qtype}, {weight_bytes / 1e6:.0f} MB of matrices; prompt {prompt_len}, "
          f"{steps} steps, allreduce {allreduce}")
    print(f"{'run':<22}{'prompt tok/s':>13}{'decode tok/s':>13}{'ms/token':>10}{'GB/s':>7}{'vs first':>9}"
          f"{'weights MiB':>13}{'peak RSS MiB':>14}")
    for r in rows:
        gbs = weight_bytes * r["decode_tokens_per_s"] / 1e9
        print(f"{r['name']:<22}{r['prompt_tokens_per_s']:>13.1f}{r['decode_tokens_per_s']:>13.2f}"
              f"{r['ms_per_token']:>10.1f}{gbs:>7.1f}{r['decode_tokens_per_s'] / base:>9.2f}{r['weights_mib']:>13}"
              f"{r['rss_mib']:>14}")
    if lc is not None:
        print(f"spmd 1 rank / llama.cpp decode: {base / lc['decode_tokens_per_s']:.2f}, "
              f"prompt: {rows[0]['prompt_tokens_per_s'] / lc['prompt_tokens_per_s']:.2f}")
    same = all(r["tokens"] == rows[0]["tokens"] for r in rows if r["name"].startswith("spmd"))
    print(f"greedy tokens identical across spmd runs: {same}   (per-rank figures are rank 0/rank 1/...)")
    if lc is not None:
        agree = next((i for i, (a, b) in enumerate(zip(rows[0]["tokens"], lc["tokens"])) if a != b), steps)
        print(f"llama.cpp's greedy tokens equal ours for the first {agree} of {steps}")
    if json_out:
        Path(json_out).write_text(json.dumps(dict(qtype=qtype, weight_bytes=weight_bytes, rows=rows), indent=1))
    if tmp:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

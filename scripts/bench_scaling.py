"""Decode tokens/s against rank count and ratios, and prefill/decode tokens/s against prompt length, on a random
TinyLlama-1.1B-shaped model (or --model FILE, or --small for a quick run), measuring the real program: each point is
one `python -m spmd.run --output json` under mpirun. Where llama-cpp-python is installed (for this Python or
another: see bench_decode.py), llama.cpp runs on the same GGUF in the same run and the single-rank figures are
shown beside it as ours/llama.cpp.

    python scripts/bench_scaling.py                         # TinyLlama shape, Q4_0 (minutes on 2 cores)
    python scripts/bench_scaling.py --small                 # a small shape, seconds
    python scripts/bench_scaling.py --runs 1,2,3 --hostfile hostfiles/netsim.txt --threads 1   # simulated hosts

Table 1 (ranks and ratios, prompt --prompt-len): decode tok/s, speed-up over the first run, per-rank sync time as a
share of the run, bytes each rank sends per decode token. Table 2 (prompt lengths, at each --prompt-ranks count):
prefill and decode tok/s, and ours/llama.cpp. Writes bench-out/scaling-LABEL.json and .png (--out, --label).
Figures move by ~10% between runs on a shared machine: read the ratios, taken in one run."""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (llama_cpp_python, parse_run, random_prompt, run_llama_cpp,  # noqa: E402
                          run_spmd, save_png, where, write_random_model)
from spmd.synth import TINYLLAMA, Shape  # noqa: E402

SMALL = Shape(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn=1408, vocab=32000, context=1024)


def scaling_rows(model, runs, prompt, steps, allreduce, hostfile, threads):
    rows = []
    for run in runs:
        n, ratios = parse_run(run)
        r = run_spmd(model, n, steps, prompt, allreduce, ratios, hostfile, threads=threads)
        total = r["prefill_ms"] + r["ms_per_token"] * (len(r["tokens"]) - 1)
        rows.append(dict(run=run, ranks=n, ratios=r["ratios"], decode_tokens_per_s=r["decode_tokens_per_s"],
                         prompt_tokens_per_s=r["prompt_tokens_per_s"], ms_per_token=r["ms_per_token"],
                         sync_share=[round(x["sync_ms"] / total, 3) for x in r["ranks"]],
                         bytes_per_token=[x["bytes_per_token"] for x in r["ranks"]],
                         hosts=[x["host"] for x in r["ranks"]], tokens=r["tokens"]))
        print(f"  {run}: decode {r['decode_tokens_per_s']:.2f} tok/s", flush=True)
    return rows


def prompt_rows(model, lengths, ranks, steps, allreduce, hostfile, threads, vocab, llama_py):
    rows = []
    for length in lengths:
        prompt = random_prompt(length, vocab)
        for n in ranks:
            r = run_spmd(model, n, steps, prompt, allreduce, None, hostfile, threads=threads)
            rows.append(dict(prompt_len=length, who=f"spmd {n} rank{'s' if n > 1 else ''}", ranks=n,
                             prompt_tokens_per_s=r["prompt_tokens_per_s"],
                             decode_tokens_per_s=r["decode_tokens_per_s"]))
        if llama_py:
            lc = run_llama_cpp(model, steps, prompt, llama_py)
            rows.append(dict(prompt_len=length, who="llama.cpp", ranks=1,
                             prompt_tokens_per_s=lc["prompt_tokens_per_s"],
                             decode_tokens_per_s=lc["decode_tokens_per_s"]))
        print(f"  prompt {length}: done", flush=True)
    return rows


def print_scaling(rows, lc):
    base = rows[0]["decode_tokens_per_s"]
    print(f"{'run':<10}{'ratios':<10}{'decode tok/s':>13}{'ms/token':>10}{'vs first':>9}{'prompt tok/s':>13}"
          f"  {'sync share per rank':<24}{'bytes/token per rank'}")
    for r in rows:
        print(f"{r['run']:<10}{r['ratios']:<10}{r['decode_tokens_per_s']:>13.2f}{r['ms_per_token']:>10.1f}"
              f"{r['decode_tokens_per_s'] / base:>9.2f}{r['prompt_tokens_per_s']:>13.1f}  "
              f"{'/'.join(f'{s:.2f}' for s in r['sync_share']):<24}{'/'.join(map(str, r['bytes_per_token']))}")
    if lc:
        print(f"{'llama.cpp':<20}{lc['decode_tokens_per_s']:>13.2f}{lc['ms_per_token']:>10.1f}"
              f"{lc['decode_tokens_per_s'] / base:>9.2f}{lc['prompt_tokens_per_s']:>13.1f}   (llama-cpp-python "
              f"{lc['version']}; spmd 1st run / llama.cpp decode: {base / lc['decode_tokens_per_s']:.2f})")


def print_prompts(rows):
    print(f"{'prompt':>7}  {'who':<14}{'prefill tok/s':>14}{'decode tok/s':>13}{'prefill / llama.cpp':>21}"
          f"{'decode / llama.cpp':>20}")
    for r in rows:
        lc = next((x for x in rows if x["prompt_len"] == r["prompt_len"] and x["who"] == "llama.cpp"), None)
        ratio = (f"{r['prompt_tokens_per_s'] / lc['prompt_tokens_per_s']:>21.2f}"
                 f"{r['decode_tokens_per_s'] / lc['decode_tokens_per_s']:>20.2f}") if lc and r is not lc else ""
        print(f"{r['prompt_len']:>7}  {r['who']:<14}{r['prompt_tokens_per_s']:>14.1f}"
              f"{r['decode_tokens_per_s']:>13.2f}{ratio}")


def plot(scaling, prompts, lc, title, path):
    def draw(plt):
        fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
        names = [r["run"] for r in scaling] + (["llama.cpp"] if lc else [])
        values = [r["decode_tokens_per_s"] for r in scaling] + ([lc["decode_tokens_per_s"]] if lc else [])
        a.bar(names, values, color=["C0"] * len(scaling) + (["C3"] if lc else []))
        a.set_xlabel("ranks, or ratios (one rank each)")
        a.set_ylabel("decode tokens/s")
        a.set_title("decode vs ranks and ratios")
        for who in dict.fromkeys(r["who"] for r in prompts):
            rs = [r for r in prompts if r["who"] == who]
            xs = [r["prompt_len"] for r in rs]
            b.plot(xs, [r["prompt_tokens_per_s"] for r in rs], "o-", label=f"{who}: prefill")
            b.plot(xs, [r["decode_tokens_per_s"] for r in rs], "s--", label=f"{who}: decode")
        b.set_xscale("log", base=2)
        b.set_yscale("log")
        b.set_xlabel("prompt tokens")
        b.set_ylabel("tokens/s")
        b.set_title("prompt-length scaling")
        b.grid(True, which="both", alpha=0.3)
        b.legend(fontsize=7)
        fig.suptitle(title)
    save_png(path, draw)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A GGUF to use instead of writing a random one.")
@click.option("--small", is_flag=True, help="A small random shape (dim 512, 4 layers) for a quick run.")
@click.option("--qtype", default="Q4_0", show_default=True, type=click.Choice(["Q4_0", "Q8_0", "F16", "F32"]))
@click.option("--runs", default="1,2,3,4,1:3,2:3:3", show_default=True,
              help="Rank counts (equal shares) or ratios (one rank per value).")
@click.option("--prompt-len", default=16, show_default=True, help="Prompt length of the rank/ratio runs.")
@click.option("--prompt-lens", default="8,32,128,512", show_default=True)
@click.option("--prompt-ranks", default="1,2", show_default=True, help="Rank counts of the prompt-length runs.")
@click.option("--steps", default=32, show_default=True, help="Tokens generated per run.")
@click.option("--allreduce", default="star", show_default=True, type=click.Choice(["star", "ring", "mpi"]))
@click.option("--hostfile", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Run the ranks from this hostfile (hostfiles/netsim.txt: over the simulated hosts).")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="--threads of every rank (simulated hosts share this machine's cores: give 1).")
@click.option("--no-llama-cpp", is_flag=True, help="Do not run llama.cpp even where it is installed.")
@click.option("--label", default=None, help="Name in the output files (default: the model's).")
@click.option("--out", default="bench-out", show_default=True, help="Folder for the JSON and PNG.")
def main(model, small, qtype, runs, prompt_len, prompt_lens, prompt_ranks, steps, allreduce, hostfile, threads,
         no_llama_cpp, label, out):
    tmp = None
    if model is None:
        tmp = tempfile.mkdtemp(prefix="spmd-bench-")
        model = os.path.join(tmp, f"{'small' if small else 'tinyllama'}-random-{qtype}.gguf")
        write_random_model(model, SMALL if small else TINYLLAMA, qtype)
    from spmd.config import read_config
    from spmd.gguf_file import GGUFFile
    vocab = read_config(GGUFFile(model)).vocab
    llama_py = None if no_llama_cpp else llama_cpp_python()
    place = where(hostfile)
    delay = os.environ.get("SPMD_TEST_LINK_DELAY_MS")
    title = (f"{Path(model).name}, {place}, allreduce {allreduce}, {steps} steps"
             + (f", simulated link delay {delay} ms (test-only sleep)" if delay else ""))
    try:
        print(f"ranks and ratios (prompt {prompt_len} tokens):", flush=True)
        prompt = random_prompt(prompt_len, vocab)
        scaling = scaling_rows(model, runs.split(","), prompt, steps, allreduce, hostfile, threads)
        lc = run_llama_cpp(model, steps, prompt, llama_py) if llama_py else None
        print("prompt lengths:", flush=True)
        prompts = prompt_rows(model, [int(x) for x in prompt_lens.split(",")],
                              [int(x) for x in prompt_ranks.split(",")], steps, allreduce, hostfile, threads,
                              vocab, llama_py)
    finally:
        if tmp:
            shutil.rmtree(tmp)
    print(f"\n{title}")
    print_scaling(scaling, lc)
    print()
    print_prompts(prompts)
    if not llama_py:
        print("llama.cpp: not run" + ("" if no_llama_cpp else " (no Python here imports llama_cpp; set "
                                      "LLAMA_CPP_PYTHON or pip install llama-cpp-python)"))
    same = all(r["tokens"] == scaling[0]["tokens"] for r in scaling)
    print(f"greedy tokens identical across the rank/ratio runs: {same}")
    os.makedirs(out, exist_ok=True)
    base = str(Path(out) / f"scaling-{label or Path(model).stem}")
    Path(base + ".json").write_text(json.dumps(dict(
        model=Path(model).name, where=place, allreduce=allreduce, steps=steps, link_delay_ms=float(delay or 0),
        prompt_len=prompt_len, scaling=scaling, llama_cpp=lc, prompt_lengths=prompts), indent=1))
    print(f"wrote {base}.json")
    plot(scaling, prompts, lc, title, base + ".png")


if __name__ == "__main__":
    main()

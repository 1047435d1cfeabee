"""Decode and prompt speed on a random-weight model of TinyLlama-1.1B's shape, at 1 and 2 ranks, against
llama.cpp on the same file, all in one run so the ratios compare like with like.

    python scripts/bench_decode.py [--qtype Q4_0|Q8_0|Q4_K_M|Q5_K_M|Q6_K|...] [--steps 48] [--prompt-len 64]
                                   [--ranks 1,2] [--model FILE] [--activations f32,int8] [--kv-cache f16]
                                   [--repeats 3] [--rounds 1] [--json out.json]

spmd runs the prompt --repeats times, one sequence after another, and reports the medians (a single first pass
runs cold: its prompt speed moved by 25% between runs), as llama-bench reports the median of its repeats.
--rounds N runs every engine N times in turn and reports medians and each ratio's range: on a shared machine whose
speed drifts between minutes, a slow spell then hits both engines instead of one.

The peer is llama.cpp built natively (`llama-bench`, from scripts/build_llama_cpp.sh, or $LLAMA_BENCH), with as
many threads as spmd's one rank uses, decoding with the prompt's tokens already in its cache (`-d`: spmd decodes
after its prompt too) and its KV cache in float16 (llama-bench has no float32 cache: --kv-cache f16, the default
here, compares like with like); without it, llama-cpp-python's Python loop, labelled as such (it measured
about 0.6x of llama-bench's speed), and without that, no peer.

Weight-read bandwidth is the bytes of weights one decode step reads (every matrix once) divided by its time.

It also holds the pieces the other benchmarks share (scripts/bench_scaling.py, scripts/bench_allreduce.py): how to
start a job under mpirun (locally, from a hostfile, or over scripts/netsim.sh's simulated hosts), one run of
`python -m spmd.run --output json`, one llama.cpp run, and writing a PNG. llama-cpp-python is often installed for
another Python than the project's: the llama.cpp run happens in a child process of whichever Python imports it
(this file's `--llama-cpp-worker` mode, which needs only numpy and llama_cpp there)."""
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CUDA_BENCH = ROOT / "bench-out" / "llama.cpp" / "cuda" / "bin" / "llama-bench"  # build_llama_cpp.sh --cuda
NETSIM = ROOT / "scripts" / "netsim.sh"
NETSIM_MARK = "# netsim:"  # first line of the hostfile that scripts/netsim.sh up writes
sys.path.insert(0, str(ROOT))


# ---- launching ----------------------------------------------------------------------------------------------
def is_netsim(hostfile):
    return hostfile is not None and Path(hostfile).read_text().startswith(NETSIM_MARK)


def where(hostfile):
    """A few words on where the ranks run: the simulated hosts with their link cap, a hostfile, or here."""
    if is_netsim(hostfile):
        first = Path(hostfile).read_text().splitlines()[0]  # "# netsim: written by scripts/netsim.sh up 3 --rate ..."
        return "simulated hosts (netsim " + first.split("netsim.sh ", 1)[-1].split(";")[0] + ")"
    return f"hostfile {hostfile}" if hostfile else "one machine"


def mpi_prefix(ranks, hostfile=None):
    """The command that starts `ranks` processes: nothing for one local rank, mpirun next to this Python (the
    set-up's), or scripts/netsim.sh run when the hostfile is the simulated hosts' (one rank per namespace)."""
    if is_netsim(hostfile):
        return [str(NETSIM), "run", "--", "-n", str(ranks)]
    if ranks == 1 and hostfile is None:
        return []
    mpirun = Path(sys.executable).parent / "mpirun"
    mpirun = str(mpirun) if mpirun.exists() else shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit("mpirun not found: run scripts/setup.sh, or put an MPI's mpirun on PATH")
    return [mpirun] + (["-f", str(hostfile)] if hostfile else []) + ["-n", str(ranks)]


def run_spmd(model, ranks, steps, prompt_ids, allreduce="star", ratios=None, hostfile=None, env=None, threads=None,
             activations="f32", repeats=1, kv_cache="f16", backend=None):
    """One `python -m spmd.run --output json` under mpirun: its JSON result. threads: --threads of every rank
    (simulated hosts share one machine's cores, which each would otherwise take for its own). kv_cache: spmd's
    --kv-cache (f16 by default: the cache llama.cpp keeps, which the benchmarks compare with). repeats > 1: the
    prompt goes in that many times, one sequence after another, and the result's prompt_tokens_per_s,
    decode_tokens_per_s and ms_per_token are the medians over them (as llama-bench's over its repeats), its tokens
    the first sequence's. backend: --backend (one for every rank, or one per rank: 'cpu,vulkan')."""
    cmd = mpi_prefix(ranks, hostfile) + [
        sys.executable, "-m", "spmd.run", "--model", str(model), "--steps", str(steps), "--output", "json",
        "--allreduce", allreduce, "--activations", activations, "--kv-cache", kv_cache]
    with tempfile.TemporaryDirectory(prefix="spmd-bench-") as tmp:
        if repeats > 1:
            prompts = Path(tmp) / "prompts.jsonl"
            prompts.write_text((json.dumps({"prompt_ids": list(prompt_ids)}) + "\n") * repeats)
            cmd += ["--prompts-file", str(prompts), "--sequences", "1"]
        else:
            cmd += ["--prompt-ids", ",".join(map(str, prompt_ids))]
        if ratios:
            cmd += ["--ratios", ratios]
        if threads:
            cmd += ["--threads", str(threads)]
        if backend:
            cmd += ["--backend", backend]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise SystemExit(f"spmd run failed ({' '.join(cmd[:8])} ...):\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout)
    if repeats > 1:
        seqs = r["sequences"]
        median = lambda key: sorted(s[key] for s in seqs)[len(seqs) // 2]  # noqa: E731
        r.update(prompt_tokens_per_s=len(prompt_ids) / median("prefill_ms") * 1e3, tokens=seqs[0]["tokens"],
                 decode_tokens_per_s=median("decode_tokens_per_s"), ms_per_token=median("ms_per_token"))
    return r


def parse_run(text):
    """'3' -> (3 ranks, equal shares); '2:3:3' -> (3 ranks, those ratios); a layout with stages ('1*1*1', '1:1*2',
    '1:1@10*1:1@12') -> (its rank count, the layout)."""
    text = text.strip()
    return (int(text), None) if text.isdigit() else (len(re.split(r"[:*]", text)), text)


# ---- llama.cpp ----------------------------------------------------------------------------------------------
def llama_bench():
    """The native llama-bench: $LLAMA_BENCH, or scripts/build_llama_cpp.sh's; None if there is none."""
    path = os.environ.get("LLAMA_BENCH") or str(ROOT / "bench-out" / "llama.cpp" / "bin" / "llama-bench")
    return path if os.access(path, os.X_OK) else None


def run_llama_bench(binary, model, steps, prompt_len, threads, extra=()):
    """llama-bench's prompt (prompt_len tokens) and decode (steps tokens, with prompt_len already in the cache, as
    spmd decodes after its prompt) speed, median of 3 repeats each (its KV cache: float16). extra: more of its flags
    (a GPU build's -ngl, -fa)."""
    def bench_json(*args):
        cmd = [binary, "-m", str(model), "-t", str(threads), "-r", "3", "-o", "json", *extra, *args]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"llama-bench failed:\n{p.stderr[-2000:]}")
        return json.loads(p.stdout)

    rate = lambda r: sorted(r["samples_ts"])[len(r["samples_ts"]) // 2]  # noqa: E731
    prompt = bench_json("-p", str(prompt_len), "-n", "0")
    decode = bench_json("-p", "0", "-n", str(steps), "-d", str(prompt_len))
    return dict(prompt_tokens_per_s=rate(prompt[0]), decode_tokens_per_s=rate(decode[0]),
                ms_per_token=1e3 / rate(decode[0]), tokens=None, version=prompt[0].get("build_commit", "?"))


def llama_cpp_peer(threads):
    """(label, run(model, steps, prompt_ids) -> its figures) of the llama.cpp to compare with: native llama-bench
    with `threads`, else llama-cpp-python's Python loop, labelled as the slower peer it is; None without either."""
    native = llama_bench()
    if native:
        return f"llama.cpp -t {threads}", lambda m, steps, prompt: run_llama_bench(native, m, steps, len(prompt),
                                                                                   threads)
    py = llama_cpp_python()
    if py:
        return "llama-cpp-python (slow)", lambda m, steps, prompt: run_llama_cpp(m, steps, prompt, py)
    return None


def llama_cpp_python():
    """A Python that imports llama_cpp: this one, $LLAMA_CPP_PYTHON, or python3 on PATH; None if there is none."""
    candidates = [sys.executable, os.environ.get("LLAMA_CPP_PYTHON"), shutil.which("python3"), "/usr/bin/python3"]
    for py in dict.fromkeys(c for c in candidates if c):
        if subprocess.run([py, "-c", "import llama_cpp, numpy"], capture_output=True).returncode == 0:
            return py
    return None


def run_llama_cpp(model, steps, prompt_ids, python):
    """Greedy generation through llama-cpp-python in a child `python`: prompt and decode tokens/s, its tokens."""
    job = json.dumps(dict(model=str(model), steps=steps, prompt_ids=list(prompt_ids)))
    p = subprocess.run([python, __file__, "--llama-cpp-worker"], input=job, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"llama.cpp run failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def llama_cpp_worker(model, steps, prompt_ids):
    from llama_cpp import Llama
    llm = Llama(model_path=model, n_ctx=len(prompt_ids) + steps + 8, n_threads=os.cpu_count(), n_batch=512,
                verbose=False)
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # the last token's (0.3.x)

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
    import llama_cpp
    return dict(prompt_tokens_per_s=len(prompt_ids) / prefill, decode_tokens_per_s=(steps - 1) / decode,
                ms_per_token=decode * 1e3 / (steps - 1), tokens=tokens, version=llama_cpp.__version__)


# ---- models and plots ---------------------------------------------------------------------------------------
def random_prompt(length, vocab=32000):
    """BOS (1) and random ids from 3 up (past the llama vocabulary's specials)."""
    return [1] + [int(x) for x in np.random.default_rng(0).integers(3, vocab, length - 1)]


def model_vocab(path):
    """The vocabulary size of a GGUF file (a --model of any vocabulary: prompt ids must be below it)."""
    from spmd.config import read_config
    from spmd.gguf_file import GGUFFile
    f = GGUFFile(path)
    try:
        return read_config(f).vocab
    finally:
        f.close()


def temporary_folder(prefix):
    """A folder for the models a benchmark writes, removed when the script exits however it ends."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, tmp, True)
    return tmp


def write_random_model(path, shape, qtype):
    from spmd.synth import write_model
    t = time.perf_counter()
    write_model(path, shape, qtype=qtype, seed=0)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s", flush=True)


def matrix_bytes(model):
    from spmd.gguf_file import GGUFFile
    f = GGUFFile(model)
    return sum(t.nbytes for t in f.tensors.values() if len(t.shape) == 2 and t.name != "token_embd.weight")


def save_png(path, draw):
    """draw(plt) makes the figure; written to `path`. Without matplotlib, a note instead of a PNG."""
    try:
        import matplotlib
    except ImportError:
        print(f"no PNG ({path}): matplotlib is not installed (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    draw(plt)
    plt.savefig(path, dpi=110, bbox_inches="tight")
    plt.close("all")
    print(f"wrote {path}")
    return path


# ---- this script's own benchmark ----------------------------------------------------------------------------
FIGURES = ("prompt_tokens_per_s", "decode_tokens_per_s", "ms_per_token")


def medians(results):
    """The median of each speed figure over rounds of one run."""
    return {k: float(np.median([r[k] for r in results])) for k in FIGURES}


def ratio(row, peer, key):
    """Ours over the peer's, per round: the median, and the range where there were several rounds."""
    each = sorted(a[key] / b[key] for a, b in zip(row["rounds"], peer["rounds"]))
    text = f"{np.median(each):.2f}"
    return text + (f" ({each[0]:.2f}-{each[-1]:.2f} over {len(each)} rounds)" if len(each) > 1 else "")


def main():
    import click
    import numba
    from spmd.choices import KV_CACHES
    from spmd.synth import FILE_TYPES, TINYLLAMA

    @click.command()
    @click.option("--qtype", default="Q4_0", type=click.Choice(list(FILE_TYPES)),
                  help="The random model's file type (llama.cpp's: Q4_K_M is Q4_K with Q6_K where it gives more bits).")
    @click.option("--steps", default=48, show_default=True)
    @click.option("--prompt-len", default=64, show_default=True)
    @click.option("--ranks", default="1,2", show_default=True,
                  help="Runs, comma-separated: a rank count (equal shares) or ratios such as 1:3.")
    @click.option("--allreduce", default="star", show_default=True)
    @click.option("--model", default=None, help="Use this GGUF instead of writing a random TinyLlama-shaped one.")
    @click.option("--activations", default="f32", show_default=True,
                  help="spmd's --activations, comma-separated for runs of each: f32,int8.")
    @click.option("--kv-cache", default="f16", show_default=True, type=click.Choice(KV_CACHES),
                  help="spmd's --kv-cache (llama.cpp keeps float16: f16 compares like with like).")
    @click.option("--repeats", default=3, show_default=True,
                  help="spmd runs the prompt this many times, one sequence after another, and reports the medians "
                       "(llama-bench: the median of 3 repeats after a warm-up).")
    @click.option("--rounds", default=1, show_default=True, type=click.IntRange(1),
                  help="Run every engine this many times in turn and report the medians, with each ratio's median "
                       "and range over the rounds (this machine's speed drifts by 10-20% between minutes).")
    @click.option("--json", "json_out", default=None, help="Also write the results here.")
    def cli(qtype, steps, prompt_len, ranks, allreduce, activations, kv_cache, model, repeats, rounds, json_out):
        if model is None:
            model = os.path.join(temporary_folder("spmd-bench-"), f"tinyllama-random-{qtype}.gguf")
            write_random_model(model, TINYLLAMA, qtype)
        weight_bytes = matrix_bytes(model)
        prompt = random_prompt(prompt_len, model_vocab(model))
        configs = [(act, run) for act in activations.split(",") for run in ranks.split(",")]
        peer = llama_cpp_peer(numba.config.NUMBA_NUM_THREADS)  # as many threads as spmd's one rank: every core
        rounds_out = []  # per round: the spmd runs' figures, then the peer's (or None)
        for _ in range(rounds):  # each round runs every engine once: a slow spell of the machine hits all of them
            out = [run_spmd(model, n, steps, prompt, allreduce, ratios, activations=act, repeats=repeats,
                            kv_cache=kv_cache)
                   for act, (n, ratios) in ((act, parse_run(run)) for act, run in configs)]
            rounds_out.append((out, peer[1](model, steps, prompt) if peer else None))
        rows = []
        for i, (act, run) in enumerate(configs):
            n, ratios = parse_run(run)
            r = rounds_out[-1][0][i]  # memory (and tokens) from the last round: a first run after a change compiles
            rss = "/".join(f"{x['peak_rss_bytes'] / 2**20:.0f}" for x in r["ranks"])
            held = "/".join(f"{x['weights_bytes'] / 2**20:.0f}" for x in r["ranks"])
            rows.append(dict(name=f"spmd {n} rank{'s' if n > 1 else ''}" + (f" {ratios}" if ratios else "")
                             + (" int8" if act == "int8" else ""), activations=act, ranks=n,
                             **medians([out[i] for out, _ in rounds_out]), rss_mib=rss, weights_mib=held,
                             tokens=r["tokens"], rounds=[out[i] for out, _ in rounds_out]))
        lc = medians([p for _, p in rounds_out]) if peer else None
        if lc is not None:
            rows.append(dict(name=peer[0], ranks=1, rss_mib="-", weights_mib="-", activations=None,
                             tokens=rounds_out[-1][1]["tokens"], rounds=[p for _, p in rounds_out], **lc))
        base = rows[0]["decode_tokens_per_s"]
        print(f"\nmodel: {Path(model).name}, {weight_bytes / 1e6:.0f} MB of matrices; prompt {prompt_len}, "
              f"{steps} steps, allreduce {allreduce}, KV cache: spmd {kv_cache}, llama.cpp f16")
        print(f"{'run':<22}{'prompt tok/s':>13}{'decode tok/s':>13}{'ms/token':>10}{'GB/s':>7}{'vs first':>9}"
              f"{'weights MiB':>13}{'peak RSS MiB':>14}")
        for r in rows:
            gbs = weight_bytes * r["decode_tokens_per_s"] / 1e9
            print(f"{r['name']:<22}{r['prompt_tokens_per_s']:>13.1f}{r['decode_tokens_per_s']:>13.2f}"
                  f"{r['ms_per_token']:>10.1f}{gbs:>7.1f}{r['decode_tokens_per_s'] / base:>9.2f}"
                  f"{r['weights_mib']:>13}{r['rss_mib']:>14}")
        if lc is None:
            print("llama.cpp: not run (no native llama-bench: bash scripts/build_llama_cpp.sh; no Python here "
                  "imports llama_cpp either)")
        else:
            which = "native llama-bench" if "slow" not in peer[0] else "llama-cpp-python's Python loop, not native"
            for r in rows[:-1]:
                print(f"{r['name']} / llama.cpp ({which}) decode: {ratio(r, rows[-1], 'decode_tokens_per_s')}, "
                      f"prompt: {ratio(r, rows[-1], 'prompt_tokens_per_s')}")
        for act in activations.split(","):  # every round of every run of this mode
            tokens = [one["tokens"] for r in rows if r["activations"] == act for one in r["rounds"]]
            same = all(t == tokens[0] for t in tokens)
            print(f"greedy tokens identical across spmd runs with --activations {act}: {same}   (per-rank figures "
                  "are rank 0/rank 1/...)")
        if lc is not None and rows[-1]["tokens"] is not None:
            agree = next((i for i, (a, b) in enumerate(zip(rows[0]["tokens"], rows[-1]["tokens"])) if a != b), steps)
            print(f"llama.cpp's greedy tokens equal ours for the first {agree} of {steps}")
        if json_out:
            Path(json_out).write_text(json.dumps(dict(qtype=qtype, weight_bytes=weight_bytes, kv_cache=kv_cache,
                                                      rows=rows), indent=1))

    cli()


if __name__ == "__main__":
    if sys.argv[1:] == ["--llama-cpp-worker"]:
        print(json.dumps(llama_cpp_worker(**json.load(sys.stdin))))
    else:
        main()

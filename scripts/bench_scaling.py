"""Decode tokens/s against rank count and ratios, and prefill/decode tokens/s against prompt length, on a random
TinyLlama-1.1B-shaped model (or --model FILE, or --small for a quick run), measuring the real program: each point is
one `python -m spmd.run --output json` under mpirun. llama.cpp runs on the same GGUF in the same run (native
llama-bench where scripts/build_llama_cpp.sh built it, else llama-cpp-python's slower loop, labelled: see
bench_decode.py) and the single-rank figures are shown beside it as ours/llama.cpp.

    python scripts/bench_scaling.py                         # TinyLlama shape, Q4_0 (minutes on 2 cores)
    python scripts/bench_scaling.py --small                 # a small shape, seconds
    python scripts/bench_scaling.py --runs 1,2,3 --hostfile hostfiles/netsim.txt --threads 1   # simulated hosts

Table 1 (ranks and ratios, prompt --prompt-len): decode tok/s, speed-up over the first run, per-rank sync time as a
share of the run, bytes each rank sends per decode token. Table 2 (prompt lengths, at each --prompt-ranks count):
prefill and decode tok/s, and ours/llama.cpp. Writes bench-out/scaling-LABEL-TABLES.json and .png (--out, --label).
Figures move by ~10% between runs on a shared machine: read the ratios, taken in one run.

Table 3 (--tables layouts): tensor parallel, pipeline and hybrid layouts (--layouts, e.g. 1:1:1, 1*1*1, 1:1*1) side by
side per link condition (--links: `local`, `veth` = simulated hosts with unlimited links, or a cap such as `100mbit`;
each with every --delays value of SPMD_TEST_LINK_DELAY_MS), each allreduce where a stage has several ranks: decode
tok/s, and bytes per decode token per rank and in total. It brings scripts/netsim.sh up and down itself (root).

    python scripts/bench_scaling.py --tables layouts --links veth,100mbit --delays 0,1 --threads 1"""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (NETSIM, llama_cpp_peer, model_vocab, parse_run, random_prompt,  # noqa: E402
                          run_spmd, save_png, where, write_random_model)
from spmd.choices import ALLREDUCES  # noqa: E402
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


def prompt_rows(model, lengths, ranks, steps, allreduce, hostfile, threads, vocab, peer):
    rows = []
    for length in lengths:
        prompt = random_prompt(length, vocab)
        for n in ranks:
            r = run_spmd(model, n, steps, prompt, allreduce, None, hostfile, threads=threads)
            rows.append(dict(prompt_len=length, who=f"spmd {n} rank{'s' if n > 1 else ''}", ranks=n,
                             prompt_tokens_per_s=r["prompt_tokens_per_s"],
                             decode_tokens_per_s=r["decode_tokens_per_s"]))
        if peer:
            lc = peer[1](model, steps, prompt)
            rows.append(dict(prompt_len=length, who=peer[0], ranks=1,
                             prompt_tokens_per_s=lc["prompt_tokens_per_s"],
                             decode_tokens_per_s=lc["decode_tokens_per_s"]))
        print(f"  prompt {length}: done", flush=True)
    return rows


def print_scaling(rows, lc, peer):
    base = rows[0]["decode_tokens_per_s"]
    print(f"{'run':<10}{'ratios':<10}{'decode tok/s':>13}{'ms/token':>10}{'vs first':>9}{'prompt tok/s':>13}"
          f"  {'sync share per rank':<24}{'bytes/token per rank'}")
    for r in rows:
        print(f"{r['run']:<10}{r['ratios']:<10}{r['decode_tokens_per_s']:>13.2f}{r['ms_per_token']:>10.1f}"
              f"{r['decode_tokens_per_s'] / base:>9.2f}{r['prompt_tokens_per_s']:>13.1f}  "
              f"{'/'.join(f'{s:.2f}' for s in r['sync_share']):<24}{'/'.join(map(str, r['bytes_per_token']))}")
    if lc:
        print(f"{'llama.cpp':<20}{lc['decode_tokens_per_s']:>13.2f}{lc['ms_per_token']:>10.1f}"
              f"{lc['decode_tokens_per_s'] / base:>9.2f}{lc['prompt_tokens_per_s']:>13.1f}   ({peer[0]} "
              f"{lc['version']}; spmd 1st run / llama.cpp decode: {base / lc['decode_tokens_per_s']:.2f})")


def print_prompts(rows):
    print(f"{'prompt':>7}  {'who':<24}{'prefill tok/s':>14}{'decode tok/s':>13}{'prefill / llama.cpp':>21}"
          f"{'decode / llama.cpp':>20}")
    for r in rows:
        lc = next((x for x in rows if x["prompt_len"] == r["prompt_len"] and not x["who"].startswith("spmd")), None)
        ratio = (f"{r['prompt_tokens_per_s'] / lc['prompt_tokens_per_s']:>21.2f}"
                 f"{r['decode_tokens_per_s'] / lc['decode_tokens_per_s']:>20.2f}") if lc and r is not lc else ""
        print(f"{r['prompt_len']:>7}  {r['who']:<24}{r['prompt_tokens_per_s']:>14.1f}"
              f"{r['decode_tokens_per_s']:>13.2f}{ratio}")


# ---- table 3: tensor parallel, pipeline and hybrid layouts per link condition -----------------------------------
LAYOUTS = "1:1:1,1*1*1,1:1*1,1:1:1:1,1*1*1*1,1:1*1:1"


def kind_of(layout):
    """'1:1:1' tensor parallel, '1*1*1' pipeline, '1:1*1' hybrid (stages of several ranks)."""
    if "*" not in layout:
        return "TP" if ":" in layout else "1 rank"
    return "hybrid" if ":" in layout else "PP"


def has_allreduce(layout):
    return any(":" in stage for stage in layout.split("*"))


@contextlib.contextmanager
def link(name, hosts):
    """A link condition: 'local' (this machine, MPI's shared memory), 'veth' (scripts/netsim.sh's simulated hosts,
    links uncapped) or a rate such as '100mbit' (each host's link capped both ways). Yields the hostfile (None for
    local); the simulated hosts are brought up for the block and down after it."""
    if name == "local":
        yield None
        return
    up = ["up", str(hosts)] + ([] if name == "veth" else ["--rate", name])
    p = subprocess.run(["bash", str(NETSIM), *up], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"scripts/netsim.sh {' '.join(up)} failed:\n{p.stderr.strip()}")
    try:
        yield str(NETSIM.parents[1] / "hostfiles" / "netsim.txt")
    finally:
        subprocess.run(["bash", str(NETSIM), "down"], capture_output=True)


def link_tx(n):
    """Bytes each simulated host has sent over its link so far (its veth's bridge side receives them)."""
    try:
        return [int(Path(f"/sys/class/net/spmd-v{i}/statistics/rx_bytes").read_text()) for i in range(n)]
    except OSError:
        return None


def layout_point(model, layout, allreduce, prompt, steps, hostfile, threads, delay):
    """One run of a layout under one link condition: its figures, with the bytes that crossed each link (whole run:
    start-up, prefill and decode, MPI's own traffic included) where the hosts are simulated."""
    n, ratios = parse_run(layout)
    before, load = link_tx(n) if hostfile else None, os.getloadavg()[0]
    r = run_spmd(model, n, steps, prompt, allreduce, ratios, hostfile, threads=threads,
                 env={"SPMD_TEST_LINK_DELAY_MS": str(delay)})
    after = link_tx(n) if before else None
    sent = [x["bytes_per_token"] for x in r["ranks"]]
    return dict(layout=layout, kind=kind_of(layout), ranks=n, allreduce=allreduce if has_allreduce(layout) else None,
                applied=r["ratios"], decode_tokens_per_s=r["decode_tokens_per_s"], ms_per_token=r["ms_per_token"],
                bytes_per_token=sent, bytes_per_token_total=sum(sent),
                layers=[b - a for a, b in (st["layers"] for st in r["stages"])],
                stages=r["stages"], weights_bytes=[x["weights_bytes"] for x in r["ranks"]],
                link_bytes=[b - a for a, b in zip(before, after)] if before and after else None,
                load_1min=round(load, 2), tokens=r["tokens"])


def layout_rows(model, layouts, allreduces, links, delays, prompt, steps, threads, repeat):
    """Every layout (with each allreduce where a stage has several ranks) under every link condition, in `repeat`
    sweeps over all conditions (so that a busy spell of the machine does not fall on one condition alone); a row
    keeps its fastest sweep's figures and every sweep's decode tok/s."""
    rows = {}
    hosts = max(parse_run(x)[0] for x in layouts)
    for _sweep in range(repeat):
        for name in links:
            with link(name, hosts) as hostfile:
                for delay in delays:
                    for layout in layouts:
                        for ar in allreduces if has_allreduce(layout) else allreduces[:1]:
                            pt = layout_point(model, layout, ar, prompt, steps, hostfile, threads, delay)
                            key = (name, delay, layout, pt["allreduce"])
                            samples = rows.get(key, {}).get("samples", []) + [pt["decode_tokens_per_s"]]
                            if key not in rows or pt["decode_tokens_per_s"] > rows[key]["decode_tokens_per_s"]:
                                rows[key] = dict(link=name, delay_ms=delay, **pt)
                            rows[key]["samples"] = samples
                            print(f"  {condition(name, delay)}, {layout} {pt['allreduce'] or ''}: "
                                  f"{pt['decode_tokens_per_s']:.2f} tok/s (load {pt['load_1min']})", flush=True)
    return list(rows.values())


def condition(name, delay):
    return name + (f" +{delay:g}ms" if delay else "")


def print_layouts(rows):
    conds = list(dict.fromkeys((r["link"], r["delay_ms"]) for r in rows))
    print("decode tok/s (best of the sweeps) per link condition; bytes each rank sends per decode token "
          "(allreduces, hand-off, logits)")
    print(f"{'layout':<10}{'kind':<8}{'allreduce':<10}{'layers':<10}"
          + "".join(f"{condition(*c):>15}" for c in conds) + f"  {'KiB/token per rank':<26}{'total':>8}")
    for key in dict.fromkeys((r["layout"], r["allreduce"]) for r in rows):
        mine = {(r["link"], r["delay_ms"]): r for r in rows if (r["layout"], r["allreduce"]) == key}
        first = next(iter(mine.values()))
        speeds = "".join(f"{mine[c]['decode_tokens_per_s']:>15.2f}" if c in mine else f"{'-':>15}" for c in conds)
        per_rank = "/".join(f"{b / 1024:.1f}" for b in first["bytes_per_token"])
        print(f"{key[0]:<10}{first['kind']:<8}{key[1] or '-':<10}{'+'.join(map(str, first['layers'])):<10}{speeds}"
              f"  {per_rank:<26}{first['bytes_per_token_total'] / 1024:>8.1f}")
    print("\nbest of each kind against the best tensor-parallel run at the same rank count (above 1: faster)")
    print(f"{'ranks':<6}{'condition':<16}" + "".join(f"{k:>26}" for k in ("TP", "PP", "hybrid")))
    for n in sorted({r["ranks"] for r in rows if r["ranks"] > 1}):
        for c in conds:
            best = {}
            for r in rows:
                if r["ranks"] == n and (r["link"], r["delay_ms"]) == c and r["kind"] in ("TP", "PP", "hybrid"):
                    if r["kind"] not in best or r["decode_tokens_per_s"] > best[r["kind"]]["decode_tokens_per_s"]:
                        best[r["kind"]] = r
            tp = best.get("TP", {}).get("decode_tokens_per_s")
            cells = "".join(f"{'-':>26}" if k not in best else
                            f"{best[k]['decode_tokens_per_s']:>8.2f} {best[k]['allreduce'] or '':<5}"
                            + (f"({best[k]['decode_tokens_per_s'] / tp:.2f}x TP)" if tp else "").rjust(12)
                            for k in ("TP", "PP", "hybrid"))
            print(f"{n:<6}{condition(*c):<16}{cells}")


def layouts_title(rows, model, steps, prompt_len, threads, repeat):
    loads = [r["load_1min"] for r in rows]
    return (f"{Path(model).name}, {steps} steps, prompt {prompt_len}, --threads {threads or 'default'}, best of "
            f"{repeat}; load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores; "
            "+Nms: SPMD_TEST_LINK_DELAY_MS (test-only sleep per message)")


def plot_layouts(rows, title, path):
    def draw(plt):
        counts = sorted({r["ranks"] for r in rows if r["ranks"] > 1}) or [1]
        conds = list(dict.fromkeys((r["link"], r["delay_ms"]) for r in rows))
        one = {(r["link"], r["delay_ms"]): r["decode_tokens_per_s"] for r in rows if r["ranks"] == 1}
        fig, axes = plt.subplots(1, len(counts), figsize=(7 * len(counts), 5), squeeze=False)
        for ax, n in zip(axes[0], counts):
            for c, cond in enumerate(conds):  # the one-rank reference of each condition, across its group
                if cond in one:
                    ax.hlines(one[cond], c - 0.1, c + 0.8, colors="k", linestyles="--",
                              label="1 rank" if c == 0 else None)
            keys = list(dict.fromkeys((r["layout"], r["allreduce"]) for r in rows if r["ranks"] == n))
            width = 0.8 / len(keys)
            for i, key in enumerate(keys):
                mine = {(r["link"], r["delay_ms"]): r["decode_tokens_per_s"] for r in rows
                        if (r["layout"], r["allreduce"]) == key}
                ax.bar([c + i * width for c in range(len(conds))], [mine.get(c, 0) for c in conds], width,
                       label=f"{key[0]} {key[1] or ''}")
            ax.set_xticks([c + 0.4 - width / 2 for c in range(len(conds))], [condition(*c) for c in conds])
            ax.set_ylabel("decode tokens/s")
            ax.set_title(f"{n} rank{'s' if n > 1 else ''}")
            ax.legend(fontsize=7)
        fig.suptitle(title)
    save_png(path, draw)


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


def make_model(model, small, qtype):
    """(the model path, a temporary folder to remove or None): `model`, or a random one written now."""
    if model is not None:
        return model, None
    tmp = tempfile.mkdtemp(prefix="spmd-bench-")
    model = os.path.join(tmp, f"{'small' if small else 'tinyllama'}-random-{qtype}.gguf")
    write_random_model(model, SMALL if small else TINYLLAMA, qtype)
    return model, tmp


def split(text, kind=str):
    return [kind(x) for x in text.split(",") if x.strip()]


TABLES = ("ranks", "prompts", "layouts")  # --tables: 1, 2, 3 (each set of them writes files of its own)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A GGUF to use instead of writing a random one.")
@click.option("--small", is_flag=True, help="A small random shape (dim 512, 4 layers) for a quick run.")
@click.option("--qtype", default="Q4_0", show_default=True, type=click.Choice(["Q4_0", "Q8_0", "F16", "F32"]))
@click.option("--tables", default="ranks,prompts", show_default=True,
              help="Which tables: ranks (1), prompts (2), layouts (3), comma-separated.")
@click.option("--runs", default="1,2,3,4,1:3,2:3:3", show_default=True,
              help="Table 1: rank counts (equal shares), ratios (one rank per value) or layouts (1*1, 1:1*2).")
@click.option("--prompt-len", default=16, show_default=True, help="Prompt length of tables 1 and 3.")
@click.option("--prompt-lens", default="8,32,128,512", show_default=True)
@click.option("--prompt-ranks", default="1,2", show_default=True, help="Rank counts of the prompt-length runs.")
@click.option("--steps", default=32, show_default=True, help="Tokens generated per run.")
@click.option("--allreduce", default="star", show_default=True, type=click.Choice(ALLREDUCES),
              help="Allreduce of tables 1 and 2.")
@click.option("--hostfile", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Tables 1 and 2: run the ranks from this hostfile (hostfiles/netsim.txt: the simulated hosts).")
@click.option("--layouts", default=LAYOUTS, show_default=True, help="Table 3: the layouts (--ratios values).")
@click.option("--layout-allreduces", default="star,ring,mpi", show_default=True,
              help="Table 3: the allreduces of layouts with a stage of several ranks.")
@click.option("--links", default="veth,100mbit", show_default=True,
              help="Table 3: link conditions: local, veth (simulated hosts), or a cap such as 100mbit (needs root).")
@click.option("--delays", default="0,1", show_default=True,
              help="Table 3: SPMD_TEST_LINK_DELAY_MS values (ms per message, a test-only sleep) for every link.")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(min=1),
              help="Table 3: sweeps over each link condition; the fastest counts (a busy machine slows some).")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="--threads of every rank (simulated hosts share this machine's cores: give 1).")
@click.option("--no-llama-cpp", is_flag=True, help="Do not run llama.cpp even where it is installed.")
@click.option("--label", default=None, help="Name in the output files (default: the model's).")
@click.option("--out", default="bench-out", show_default=True, help="Folder for the JSON and PNG.")
def main(model, small, qtype, tables, runs, prompt_len, prompt_lens, prompt_ranks, steps, allreduce, hostfile,
         layouts, layout_allreduces, links, delays, repeat, threads, no_llama_cpp, label, out):
    tables = set(split(tables))
    if not tables or tables - set(TABLES):
        raise SystemExit(f"--tables: {', '.join(sorted(tables - set(TABLES))) or 'none given'}; choose among "
                         f"{', '.join(TABLES)}")
    model, tmp = make_model(model, small, qtype)
    vocab = model_vocab(model)
    peer = None if no_llama_cpp or not tables & {"ranks", "prompts"} else llama_cpp_peer(threads or os.cpu_count())
    place = where(hostfile)
    delay = os.environ.get("SPMD_TEST_LINK_DELAY_MS")
    title = (f"{Path(model).name}, {place}, allreduce {allreduce}, {steps} steps"
             + (f", simulated link delay {delay} ms (test-only sleep)" if delay else ""))
    prompt = random_prompt(prompt_len, vocab)
    scaling, prompts, lc, lrows = [], [], None, []
    try:
        if "ranks" in tables:
            print(f"ranks and ratios (prompt {prompt_len} tokens):", flush=True)
            scaling = scaling_rows(model, split(runs), prompt, steps, allreduce, hostfile, threads)
            lc = peer[1](model, steps, prompt) if peer else None
        if "prompts" in tables:
            print("prompt lengths:", flush=True)
            prompts = prompt_rows(model, split(prompt_lens, int), split(prompt_ranks, int), steps, allreduce,
                                  hostfile, threads, vocab, peer)
        if "layouts" in tables:
            print(f"layouts (prompt {prompt_len} tokens, {steps} steps):", flush=True)
            lrows = layout_rows(model, split(layouts), split(layout_allreduces), split(links), split(delays, float),
                                prompt, steps, threads, repeat)
    finally:
        if tmp:
            shutil.rmtree(tmp)
    if scaling or prompts:
        print(f"\n{title}")
    if scaling:
        print_scaling(scaling, lc, peer)
        print()
    if prompts:
        print_prompts(prompts)
    if tables & {"ranks", "prompts"} and not peer:
        print("llama.cpp: not run" + ("" if no_llama_cpp else " (no native llama-bench: bash "
                                      "scripts/build_llama_cpp.sh; no Python here imports llama_cpp either)"))
    ltitle = layouts_title(lrows, model, steps, prompt_len, threads, repeat) if lrows else ""
    if lrows:
        print(f"\n{ltitle}")
        print_layouts(lrows)
    everything = scaling + lrows
    same = all(r["tokens"] == everything[0]["tokens"] for r in everything)
    print(f"greedy tokens identical across all {len(everything)} rank/ratio/layout runs: {same}")
    os.makedirs(out, exist_ok=True)
    base = str(Path(out) / f"scaling-{label or Path(model).stem}-{'-'.join(t for t in TABLES if t in tables)}")
    Path(base + ".json").write_text(json.dumps(dict(
        model=Path(model).name, where=place, allreduce=allreduce, steps=steps, link_delay_ms=float(delay or 0),
        prompt_len=prompt_len, threads=threads, cpu_count=os.cpu_count(), scaling=scaling, llama_cpp=lc,
        prompt_lengths=prompts, layouts=lrows, tokens_identical=same), indent=1))
    print(f"wrote {base}.json")
    if scaling or prompts:
        plot(scaling, prompts, lc, title, base + ".png")
    if lrows:
        plot_layouts(lrows, ltitle, base + "-layouts.png")


if __name__ == "__main__":
    main()

"""A live migration against a restart, on a random-weight model of TinyLlama-1.1B's shape (Q4_0), in one run.

    python scripts/bench_migrate.py [--cases units,layers] [--ranks 2] [--prompt-len 32] [--qtype Q4_0] [--json F]

Two cases, each run once per weight source (`--migrate-weights file` and `peer`): one job generates while this script,
through the job's control socket (spmd.client), applies the case's moves at fixed token positions (mode "at") and
reads the time and bytes of each from the reply.

  units   --ranks ranks, one stage (tensor parallel); from rank 0 to rank 1 (the last one back):
            kind 1  one KV-head group (its query heads' rows of attn_q, the rows of attn_k/attn_v, the columns of
                    attn_output, and its KV cache rows of every layer)
            kind 2  one eighth of the FFN (22 of 176 blocks: rows of ffn_gate/ffn_up, columns of ffn_down)
            kind 3  both at once
  layers  a pipeline, --layers-layout (default `1*1`: two stages of one rank, 11 + 11 layers):
            1 boundary layer from stage 0 to stage 1, then 4 from stage 1 to stage 0 (each layer's weights, and
            its KV cache up to the position)

The restart it is compared with is what a job without live migration would do instead: start again with the new
layout (`--ratios` as the reply gives it, e.g. `1@10*1@12`) and prefill the tokens so far (the prompt and every
token generated up to the migration's position), steps 1; its cost is load time + prefill (the engine's own
figures) and, for the whole picture, the wall time of the new job from mpirun to exit.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_decode import model_vocab, mpi_prefix  # noqa: E402
from spmd.client import ClientError, request  # noqa: E402

CASES = {  # name -> (layout or None for the --ranks default, [(label, request without "at")])
    "units": (None, [
        ("1 KV-head group (kind 1)", {"kind": 1, "from": 0, "to": 1, "kv_groups": 1}),
        ("1/8 of the FFN (kind 2)", {"kind": 2, "from": 0, "to": 1, "ffn_blocks": 22}),
        ("both (kind 3)", {"kind": 3, "from": 1, "to": 0, "kv_groups": 1, "ffn_blocks": 22}),
    ]),
    "layers": ("1*1", [
        ("1 layer, stage 0 -> 1", {"kind": "layers", "from_stage": 0, "to_stage": 1, "count": 1}),
        ("4 layers, stage 1 -> 0", {"kind": "layers", "from_stage": 1, "to_stage": 0, "count": 4}),
    ]),
}
GAP = 32  # tokens between the prompt and the first move, and between moves


def n_ranks(layout):
    return len(layout.replace("*", ":").split(":"))


def job_command(model, ranks, prompt_ids, steps, *extra):
    return [*mpi_prefix(ranks), sys.executable, "-m", "spmd.run", "--model", str(model),
            "--prompt-ids", ",".join(map(str, prompt_ids)), "--steps", str(steps), "--output", "json", *extra]


def migrating_job(model, ranks, layout, prompt_ids, moves, positions, weights_from, folder):
    """One job that applies `moves` at `positions`; returns (its result, the replies)."""
    sock = os.path.join(folder, f"bench-{weights_from}.sock")
    steps = positions[-1] - len(prompt_ids) + 4
    extra = ["--control-socket", sock, "--migrate-weights", weights_from] + (["--ratios", layout] if layout else [])
    p = subprocess.Popen(job_command(model, ranks, prompt_ids, steps, *extra),
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(3000):
        if os.path.exists(sock) or p.poll() is not None:
            break
        time.sleep(0.05)
    replies = []
    try:
        for (_label, req), at in zip(moves, positions):
            reply = request(sock, {"cmd": "migrate", "mode": "at", "at": at, **req}, timeout=600)
            if not reply.get("ok"):
                raise SystemExit(f"migration refused: {reply}")
            replies.append(reply)
    except (ClientError, SystemExit) as e:
        p.kill()
        raise SystemExit(f"{e}\n{p.communicate()[1][-2000:]}") from None
    out, err = p.communicate(timeout=600)
    if p.returncode:
        raise SystemExit(f"the job failed: {err}")
    return json.loads(out), replies


def restart(model, ranks, ids_so_far, ratios):
    """The job started again with the new layout, prefilling the tokens so far: (its result, wall seconds)."""
    t = time.perf_counter()
    p = subprocess.run(job_command(model, ranks, ids_so_far, 1, "--ratios", ratios, "--control-socket", "none"),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"the restart failed: {p.stderr}")
    return json.loads(p.stdout), wall


def run_case(name, model, ranks, layout, prompt, folder):
    """Both weight sources' migrating jobs of one case, and a restart per move: (rows, decode ms/token, tokens
    equal)."""
    moves = CASES[name][1]
    ranks = n_ranks(layout) if layout else ranks
    positions = [len(prompt) + GAP * (i + 1) for i in range(len(moves))]
    results = {w: migrating_job(model, ranks, layout, prompt, moves, positions, w, folder) for w in ("file", "peer")}
    result = results["file"][0]
    rows = []
    for i, (label, _req) in enumerate(moves):
        so_far = result["prompt_tokens"] + result["tokens"][:positions[i] - len(prompt)]
        new_ratios = results["file"][1][i]["ratios"]
        again, wall = restart(model, ranks, so_far, new_ratios)
        restart_ms = again["load_s"] * 1e3 + again["prefill_ms"]
        before = results["file"][1][i - 1]["ratios"] if i else (layout or ":".join("1" * ranks))
        rows.append(dict(
            case=name, move=label, position=positions[i], layout_before=before, layout_after=new_ratios,
            **{f"{w}_ms": results[w][1][i]["ms"] for w in ("file", "peer")},
            **{f"{w}_bytes": results[w][1][i]["bytes_moved"] for w in ("file", "peer")},
            restart_load_s=again["load_s"], restart_prefill_ms=again["prefill_ms"],
            restart_ms=round(restart_ms, 1), restart_wall_s=round(wall, 2),
            **{f"{w}_vs_restart": round(results[w][1][i]["ms"] / restart_ms, 3) for w in ("file", "peer")}))
        print(f"  {name}: {label} done", file=sys.stderr, flush=True)
    same = results["file"][0]["tokens"] == results["peer"][0]["tokens"]
    return rows, decode_ms(result), same, result["tokens"]


def decode_ms(result):
    """Decode ms per token without the migrations' time (the job's ms_per_token counts them)."""
    n = len(result["tokens"]) - 1
    return (result["ms_per_token"] * n - sum(m["ms"] for m in result["migrations"])) / n


def print_table(figures):
    print(f"{figures['model']}{', ' + figures['qtype'] if figures['qtype'] else ''}, prompt {figures['prompt_len']}, "
          "on one machine; decode ms/token "
          "(migrations excluded) "
          + ", ".join(f"{c} {ms:.1f}" for c, ms in figures["decode_ms_per_token"].items())
          + "; restart = load + prefill of the tokens so far (wall: the new job from mpirun to exit)")
    print("| case | move | at | layout after | migration, file | migration, peer | restart: load + prefill "
          "| restart wall | file / restart | peer / restart |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in figures["moves"]:
        print(f"| {r['case']} | {r['move']} | {r['position']} | `{r['layout_after']}` | {r['file_ms']:.0f} ms, "
              f"{r['file_bytes'] / 2**20:.2f} MiB | {r['peer_ms']:.0f} ms, {r['peer_bytes'] / 2**20:.1f} MiB | "
              f"{r['restart_ms'] / 1e3:.2f} s ({r['restart_load_s']:.2f} + {r['restart_prefill_ms'] / 1e3:.2f}) | "
              f"{r['restart_wall_s']:.1f} s | {r['file_vs_restart']:.2f} | {r['peer_vs_restart']:.2f} |")
    for case, same in figures["tokens_equal_file_peer"].items():
        print(f"{case}: tokens of the file and peer jobs equal: {same}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="units,layers", help="which cases: units, layers (comma-separated)")
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the units case (one stage)")
    ap.add_argument("--layers-layout", default=CASES["layers"][0], help="the layers case's starting layout")
    ap.add_argument("--qtype", default="Q4_0", help="the written model's type: a spmd.synth file type")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--model", help="an existing model file of TinyLlama's shape, whose units the cases' moves "
                    "count (default: write one to a temp folder)")
    ap.add_argument("--json", help="write the figures to this file as well")
    args = ap.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}: expected {', '.join(CASES)}")
    from spmd.synth import FILE_TYPES, TINYLLAMA, write_model
    if args.qtype not in FILE_TYPES:
        ap.error(f"--qtype {args.qtype!r}: expected one of {', '.join(FILE_TYPES)}")
    folder = tempfile.mkdtemp(prefix="spmd-bench-migrate-")
    try:
        model = args.model
        if model is None:
            model = os.path.join(folder, f"tinyllama-random-{args.qtype}.gguf")
            t = time.perf_counter()
            write_model(model, TINYLLAMA, qtype=args.qtype, seed=0)
            print(f"wrote {model} ({os.path.getsize(model) / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s",
                  file=sys.stderr)
        vocab = model_vocab(model)
        prompt = [1] + [(97 * i + 13) % (vocab - 500) + 500 for i in range(args.prompt_len - 1)]
        shape = "TinyLlama-1.1B shape" if args.model is None else os.path.basename(model)
        figures = {"model": shape, "ranks": args.ranks, "qtype": args.qtype if args.model is None else None,
                   "prompt_len": args.prompt_len, "moves": [],
                   "decode_ms_per_token": {}, "tokens_equal_file_peer": {}, "load_1min": os.getloadavg()[0]}
        tokens = {}
        for case in cases:
            layout = args.layers_layout if case == "layers" else None
            rows, ms, same, tokens[case] = run_case(case, model, args.ranks, layout, prompt, folder)
            figures["moves"] += rows
            figures["decode_ms_per_token"][case] = ms
            figures["tokens_equal_file_peer"][case] = same
        common = min(map(len, tokens.values()))
        figures["tokens_equal_across_cases"] = len({tuple(t[:common]) for t in tokens.values()}) == 1
        print_table(figures)
        print(f"tokens equal across the cases (first {common}): {figures['tokens_equal_across_cases']}; "
              f"load average at the start {figures['load_1min']:.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()

"""A live migration against a restart, on a random-weight model of TinyLlama-1.1B's shape (Q4_0), in one run.

    python scripts/bench_migrate.py [--ranks 2] [--prompt-len 32] [--qtype Q4_0] [--json out.json]

For each weight source (`--migrate-weights file` and `peer`) one job generates while this script, through the
job's control socket, moves from rank 0 to rank 1:
  kind 1  one KV-head group (its query heads' rows of attn_q, the rows of attn_k/attn_v, the columns of
          attn_output, and its KV cache rows of every layer)
  kind 2  one eighth of the FFN (22 of 176 blocks: rows of ffn_gate/ffn_up, columns of ffn_down)
  kind 3  both at once
each at a fixed token position (mode "at"), and reads the time and bytes of each from the reply. The restart it is
compared with is what a job without live migration would do instead: start again with the new ratios and prefill
the tokens so far (the prompt and every token generated up to the migration's position), steps 1; its cost is
load time + prefill (the engine's own figures) and, for the whole picture, the wall time of the new job from
mpirun to exit.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MOVES = [  # (label, request without "at")
    ("1 KV-head group (kind 1)", {"kind": 1, "from": 0, "to": 1, "kv_groups": 1}),
    ("1/8 of the FFN (kind 2)", {"kind": 2, "from": 0, "to": 1, "ffn_blocks": 22}),
    ("both (kind 3)", {"kind": 3, "from": 1, "to": 0, "kv_groups": 1, "ffn_blocks": 22}),
]


def mpirun():
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else shutil.which("mpirun")


def job_command(model, ranks, prompt_ids, steps, *extra):
    return [mpirun(), "-n", str(ranks), sys.executable, "-m", "spmd.run", "--model", str(model),
            "--prompt-ids", ",".join(map(str, prompt_ids)), "--steps", str(steps), "--output", "json", *extra]


def ask(path, req, timeout=600):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall((json.dumps(req) + "\n").encode())
    line = s.makefile("rb").readline()
    s.close()
    return json.loads(line)


def migrating_job(model, ranks, prompt_ids, positions, weights_from, folder):
    """One job that applies MOVES at `positions`; returns (its result, the replies)."""
    sock = os.path.join(folder, f"bench-{weights_from}.sock")
    steps = positions[-1] - len(prompt_ids) + 4
    p = subprocess.Popen(job_command(model, ranks, prompt_ids, steps, "--control-socket", sock,
                                     "--migrate-weights", weights_from),
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(3000):
        if os.path.exists(sock) or p.poll() is not None:
            break
        time.sleep(0.05)
    if not os.path.exists(sock):
        raise SystemExit(f"the job did not open its control socket: {p.communicate()[1]}")
    replies = []
    for (_label, req), at in zip(MOVES, positions):
        reply = ask(sock, {"cmd": "migrate", "mode": "at", "at": at, **req})
        if not reply.get("ok"):
            p.kill()
            raise SystemExit(f"migration refused: {reply}")
        replies.append(reply)
    out, err = p.communicate(timeout=600)
    if p.returncode:
        raise SystemExit(f"the job failed: {err}")
    return json.loads(out), replies


def restart(model, ranks, ids_so_far, ratios):
    """The job started again with the new ratios, prefilling the tokens so far: (its result, wall seconds)."""
    t = time.perf_counter()
    p = subprocess.run(job_command(model, ranks, ids_so_far, 1, "--ratios", ratios, "--control-socket", "none"),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"the restart failed: {p.stderr}")
    return json.loads(p.stdout), wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--qtype", default="Q4_0")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--model", help="an existing model file (default: write TinyLlama's shape to a temp folder)")
    ap.add_argument("--json", help="write the figures to this file as well")
    args = ap.parse_args()
    from spmd.synth import TINYLLAMA, write_model
    folder = tempfile.mkdtemp(prefix="spmd-bench-migrate-")
    try:
        model = args.model
        if model is None:
            model = os.path.join(folder, f"tinyllama-random-{args.qtype}.gguf")
            t = time.perf_counter()
            write_model(model, TINYLLAMA, qtype=args.qtype, seed=0)
            print(f"wrote {model} ({os.path.getsize(model) / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s",
                  file=sys.stderr)
        prompt = [1] + [(97 * i + 13) % 31000 + 500 for i in range(args.prompt_len - 1)]
        positions = [args.prompt_len + 32, args.prompt_len + 64, args.prompt_len + 96]
        figures = {"ranks": args.ranks, "qtype": args.qtype, "prompt_len": args.prompt_len, "moves": []}
        results = {}
        for weights_from in ("file", "peer"):
            result, replies = migrating_job(model, args.ranks, prompt, positions, weights_from, folder)
            results[weights_from] = (result, replies)
        if results["file"][0]["tokens"] != results["peer"][0]["tokens"]:
            print("warning: the two migrating jobs generated different tokens", file=sys.stderr)
        result = results["file"][0]
        for i, (label, _req) in enumerate(MOVES):
            at = positions[i]
            so_far = result["prompt_tokens"] + result["tokens"][:at - args.prompt_len]
            again, wall = restart(model, args.ranks, so_far, results["file"][1][i]["ratios"])
            row = dict(move=label, position=at,
                       **{f"{w}_ms": results[w][1][i]["ms"] for w in ("file", "peer")},
                       **{f"{w}_bytes": results[w][1][i]["bytes_moved"] for w in ("file", "peer")},
                       restart_load_s=again["load_s"], restart_prefill_ms=again["prefill_ms"],
                       restart_ms=round(again["load_s"] * 1e3 + again["prefill_ms"], 1),
                       restart_wall_s=round(wall, 2))
            figures["moves"].append(row)
        figures["decode_ms_per_token"] = result["ms_per_token"]
        figures["tokens_equal_file_peer"] = results["file"][0]["tokens"] == results["peer"][0]["tokens"]
        print(f"TinyLlama-1.1B shape, {args.qtype}, {args.ranks} ranks on one machine; decode "
              f"{result['ms_per_token']:.1f} ms/token; restart = load + prefill of the tokens so far (wall: the new "
              "job from mpirun to exit)")
        print("| move | at | migration, file | migration, peer | restart: load + prefill | restart wall |")
        print("|---|---|---|---|---|---|")
        for r in figures["moves"]:
            print(f"| {r['move']} | {r['position']} | {r['file_ms']:.0f} ms, {r['file_bytes'] / 2**20:.2f} MiB | "
                  f"{r['peer_ms']:.0f} ms, {r['peer_bytes'] / 2**20:.1f} MiB | {r['restart_ms'] / 1e3:.2f} s "
                  f"({r['restart_load_s']:.2f} + {r['restart_prefill_ms'] / 1e3:.2f}) | {r['restart_wall_s']:.1f} s |")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()

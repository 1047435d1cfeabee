"""What a recovery costs: a supervised run (spmd.launch) whose rank R is killed (SIGKILL) or stopped (SIGSTOP) at
step T, on a model of your choice (the 1.1B-shaped spmd.synth file by default), against the same run
uninterrupted. Prints per case: detection (last token to the failure seen), relaunch (to the new job loaded),
stall (last token before to first token after), tokens replayed, and whether the tokens equal the uninterrupted
run's. Then the same for a supervised server (`spmd.launch --serve`) while a client streams: the longest gap
between two pieces of its stream, and whether its text equals the uninterrupted run's.

    python scripts/bench_recovery.py [--model bench-out/tinyllama-random-Q4_0.gguf] [--ranks 3] [--steps 40]
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_decode import mpi_prefix  # noqa: E402


def run(model, ranks, steps, signals=None, supervised=True, progress_timeout=10):
    args = ["--model", model, "--threads", "1", "--steps", str(steps), "--prompt", "Hello there, how are you",
            "--output", "json"]
    env = dict(os.environ)
    if signals:
        env["SPMD_TEST_SIGNAL"] = signals
    cmd = [sys.executable, "-m", "spmd.launch", "-n", str(ranks), "--progress-timeout", str(progress_timeout), "--",
           *args] if supervised else [*mpi_prefix(ranks), sys.executable, "-m", "spmd.run", *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return json.loads(p.stdout), time.perf_counter() - t


def served(model, ranks, steps, signals):
    """A supervised server with SPMD_TEST_SIGNAL=`signals`, one greedy streamed completion of the same prompt:
    (its text, the longest gap between two pieces in s, the recoveries /cluster lists)."""
    cmd = [sys.executable, "-m", "spmd.launch", "-n", str(ranks), "--serve", "--", "--model", model, "--threads", "1",
           "--port", "0", "--sequences", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, SPMD_TEST_SIGNAL=signals))
    try:
        for line in proc.stderr:
            found = re.search(r"serving \S+ on (http://\S+) ", line)
            if found:
                url = found.group(1)
                break
        else:
            sys.exit(f"failed: {' '.join(cmd)}")
        body = {"prompt": "Hello there, how are you", "max_tokens": steps, "temperature": 0, "stream": True}
        request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        text, times = [], []
        with urllib.request.urlopen(request, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
                    text.append(json.loads(line[6:])["choices"][0].get("text") or "")
        with urllib.request.urlopen(url + "/cluster", timeout=60) as r:
            recoveries = json.load(r)["recoveries"]
        gaps = [b - a for a, b in zip(times[1:], times[2:])]  # from the first piece on (the prefill is before)
        return "".join(text), max(gaps, default=0.0), recoveries
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


@click.command()
@click.option("--model", default=str(ROOT / "bench-out" / "tinyllama-random-Q4_0.gguf"), show_default=True,
              help="GGUF file (written, 1.1B-shaped Q4_0 random weights, where it is not there).")
@click.option("--ranks", default=3, show_default=True, type=click.IntRange(min=2),
              help="Ranks of the job; the cases kill or stop its last rank and rank 1.")
@click.option("--steps", default=40, show_default=True, type=click.IntRange(min=8),
              help="Tokens to generate; the cases strike at an eighth, a quarter and half of them.")
@click.option("--progress-timeout", default=2.0, show_default=True)
def main(model, ranks, steps, progress_timeout):
    if not os.path.exists(model):  # the 1.1B-shaped random model the other benchmarks use
        from spmd.synth import TINYLLAMA, write_model
        os.makedirs(os.path.dirname(model), exist_ok=True)
        write_model(model, TINYLLAMA, qtype="Q4_0", seed=0)
    want, base_s = run(model, ranks, steps, supervised=False)
    print(f"uninterrupted: {base_s:.1f} s wall, load {want['load_s']:.2f} s, {want['ms_per_token']:.0f} ms/token")
    print("case                     detect_s relaunch_s stall_s replayed same_tokens wall_s")
    with tempfile.TemporaryDirectory() as d:
        last = ranks - 1
        cases = [(last, steps // 8, "KILL"), (1, steps // 2, "KILL"), (last, steps // 4, "STOP")]
        for i, (rank, step, sig) in enumerate(cases):
            name, signals = f"{'kill' if sig == 'KILL' else 'stop'} rank {rank} at step {step}", f"{rank}:{step}:{sig}"
            got, wall = run(model, ranks, steps, f"{signals}:{d}/once{i}", progress_timeout=progress_timeout)
            r = got["recoveries"][0]
            print(f"{name:24} {r['detect_s']:8.2f} {r['relaunch_s']:10.2f} {r['stall_s']:7.2f} "
                  f"{r['tokens_replayed']:8} {str(got['tokens'] == want['tokens']):>11} {wall:6.1f}")
        print("served, streaming          detect_s relaunch_s stall_s longest_gap_s same_text")
        base, base_gap, _ = served(model, ranks, steps, "")
        print(f"{'uninterrupted':26} {'-':>8} {'-':>10} {'-':>7} {base_gap:13.2f} {'-':>9}")
        for i, (name, signals) in enumerate([(f"kill rank {last} at step {steps * 3 // 10}",
                                              f"{last}:{steps * 3 // 10}:KILL")]):
            text, gap, (r,) = served(model, ranks, steps, f"{signals}:{d}/served{i}")
            print(f"{name:26} {r['detect_s']:8.2f} {r['relaunch_s']:10.2f} {r['stall_s']:7.2f} {gap:13.2f} "
                  f"{str(text == base):>9}")


if __name__ == "__main__":
    main()

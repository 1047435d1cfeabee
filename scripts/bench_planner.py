"""The planner against its baselines on one simulated cluster, measuring the real program (each point one
`python -m spmd.run --output json` under mpirun): equal ratios; an EdgeVisor-style warm-up that runs a fixed list
of layouts for a few tokens each and keeps the fastest (its warm-up time reported apart); `--plan auto`;
`--rebalance` started from equal ratios (its speed after the last move too). The cluster is made heterogeneous
with the test-only hooks: SPMD_TEST_SLOW (a rank's compute k times slower, --slow RANK:K) and a simulated link
(scripts/netsim.sh up N --rate-of I=10mbit, then --hostfile hostfiles/netsim.txt). Every layout run is also
predicted from one profile of the same cluster (`python -m spmd.profile`), so the table shows predicted against
measured ms per token.

    python scripts/bench_planner.py --ranks 4 --threads 4 --slow 3:3            # one rank 3x slower
    sudo scripts/netsim.sh up 4 --rate 1gbit --rate-of 3=10mbit
    python scripts/bench_planner.py --ranks 4 --threads 1 --hostfile hostfiles/netsim.txt

Writes bench-out/planner-LABEL.json (--out, --label)."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import ROOT, mpi_prefix, where, write_random_model  # noqa: E402
from spmd.synth import TINYLLAMA, Shape  # noqa: E402

SMALL = Shape(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn=1408, vocab=32000, context=1024)


def warmup_list(n):
    """EdgeVisor's --warmup, as a baseline: a fixed list of layouts for n ranks (TP, PP, two hybrids, one rank)."""
    out = [":".join(["1"] * n), "*".join(["1"] * n), ":".join(["1"] + ["0"] * (n - 1))]
    if n >= 4:
        half = n // 2
        out += [":".join(["1"] * half) + "*" + ":".join(["1"] * (n - half))]
    if n >= 3:
        out += ["1*" + ":".join(["1"] * (n - 1))]
    return out


class Cluster:
    def __init__(self, model, n, threads, hostfile, env, steps, prompts):
        self.model, self.n, self.threads, self.hostfile, self.env = model, n, threads, hostfile, env
        self.steps, self.prompts = steps, prompts

    def run(self, *flags, steps=None):
        cmd = mpi_prefix(self.n, self.hostfile) + [
            sys.executable, "-m", "spmd.run", "--model", str(self.model), "--output", "json", "--control-socket",
            "none", "--steps", str(steps or self.steps), "--threads", str(self.threads), *self.prompt_flags(), *flags]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **self.env})
        if p.returncode != 0:
            raise SystemExit(f"spmd run failed ({' '.join(flags)}):\n{p.stderr[-2000:]}")
        return json.loads(p.stdout)

    def prompt_flags(self):
        """One prompt, or K prompts all in flight (--sequences K: the same for every method)."""
        if not self.prompts:
            return ["--prompt-ids", "1,450,4996,310"]
        return ["--prompts-file", str(self.prompts), "--sequences", str(len(self.prompts.read_text().splitlines()))]

    def profile(self, folder):
        out = Path(folder) / "profile.json"
        cmd = mpi_prefix(self.n, self.hostfile) + [sys.executable, "-m", "spmd.profile", "--model", str(self.model),
                                                   "--threads", str(self.threads), "--out", str(out)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **self.env})
        if p.returncode != 0:
            raise SystemExit(f"spmd.profile failed:\n{p.stderr[-2000:]}")
        print(p.stdout, flush=True)
        return out


def speed(r):
    """(ms per token of one sequence, tokens/s of all) of a run's result."""
    if "sequences" in r:
        per = [s["ms_per_token"] for s in r["sequences"] if s["ms_per_token"]]
        return sum(per) / len(per), r["tokens_per_s"]
    return r["ms_per_token"], r["decode_tokens_per_s"]


def point(name, r, predicted, extra=None):
    ms, rate = speed(r)
    pred = predicted(r["ratios"]) if r["plan_epoch"] == 0 else None
    row = dict(method=name, layout=r["ratios"], ms_per_token=round(ms, 3), tokens_per_s=round(rate, 2),
               predicted_ms_per_token=round(pred, 3) if pred else None,
               predicted_over_measured=round(pred / ms, 3) if pred else None, **(extra or {}))
    print(f"{name:<22} {r['ratios']:<28} {rate:>9.2f} tok/s {ms:>8.2f} ms/token  predicted "
          f"{row['predicted_ms_per_token'] or '-':>8} ms", flush=True)
    return row


@click.command()
@click.option("--model", default=None, help="A GGUF file (default: a random TinyLlama-shaped Q4_0, or --small).")
@click.option("--small", is_flag=True, help="A small random shape (8 layers, dim 512): a minute on 2 cores.")
@click.option("--ranks", default=4, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--slow", default=None, metavar="RANK:K", help="That rank's compute K times slower (test hook).")
@click.option("--hostfile", default=None, help="hostfiles/netsim.txt for the simulated hosts (scripts/netsim.sh).")
@click.option("--steps", default=96, show_default=True)
@click.option("--sequences", default=1, show_default=True, help="Prompts in flight (throughput objective if > 1).")
@click.option("--warmup-steps", default=12, show_default=True, help="Tokens each warm-up layout runs.")
@click.option("--label", default="run")
@click.option("--out", default=None)
def main(model, small, ranks, threads, slow, hostfile, steps, sequences, warmup_steps, label, out):
    from spmd.cluster import load_profile
    from spmd.planner import predict
    env = {"SPMD_TEST_SLOW": slow} if slow else {}
    with tempfile.TemporaryDirectory() as folder:
        if model is None:
            model = Path(folder) / "model.gguf"
            write_random_model(model, SMALL if small else TINYLLAMA, "Q4_0")
        prompts = None
        if sequences > 1:
            prompts = Path(folder) / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"prompt_ids": [1, 450 + i, 4996, 310]}) + "\n"
                                       for i in range(sequences)))
        cluster = Cluster(model, ranks, threads, hostfile, env, steps, prompts)
        profile = load_profile(str(cluster.profile(folder)))
        k = sequences
        predicted = lambda text: predict(profile, text, k if k > 1 else 1, 1024).ms_per_token  # noqa: E731
        print(f"{ranks} ranks, {threads} threads each, {where(hostfile)}, slow: {slow or 'none'}; "
              f"{sequences} sequence(s) of {steps} tokens", flush=True)
        rows = [point("equal ratios", cluster.run(), predicted)]
        tried = []
        for layout in warmup_list(ranks):
            r = cluster.run("--ratios", layout, steps=warmup_steps)
            tried.append((-speed(r)[1], layout))
        best = min(tried)[1]  # the most tokens/s
        rows.append(point("warm-up of a fixed list", cluster.run("--ratios", best), predicted,
                          {"tried": [t[1] for t in tried]}))
        auto = cluster.run("--plan", "auto")
        rows.append(point("--plan auto", auto, predicted, {"planner": auto["planner"]}))
        reb = cluster.run("--rebalance")
        since = reb.get("since_last_migration")
        rows.append(point("--rebalance", reb, predicted, {"rebalances": reb.get("rebalances"), "since": since}))
        if since and since["tokens_per_s"]:
            print(f"{'  after its last move':<22} {reb['ratios']:<28} {since['tokens_per_s']:>9.2f} tok/s", flush=True)
    result = dict(label=label, ranks=ranks, threads=threads, slow=slow, where=where(hostfile), steps=steps,
                  sequences=sequences, rows=rows)
    path = Path(out or ROOT / "bench-out") / f"planner-{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The acceptance runs judged and written up: the checks, then report.md, report.json and three matplotlib charts.

Nothing here runs anything: `scripts/acceptance.py` gathers the runs (or reads them back from a report.json, with
--rerender) and calls `all_checks` and `write_report`.
"""
import json
import shlex
from dataclasses import asdict
from pathlib import Path

RANK_KEYS = ("rank", "host", "backend", "share", "compute_ms", "sync_ms", "bytes_sent", "bytes_per_token",
             "weights_bytes", "peak_rss_bytes")


# ---- checks ---------------------------------------------------------------------------------------------------
def expected_backends(run) -> list:
    names = run["backend"].split(",")
    return names * run["n_ranks"] if len(names) == 1 else names


def check_run(run, setup, model: dict, reference) -> list:
    """[(check, ok, reason)] for one run."""
    if "error" in run:
        return [("ran", False, run["error"])]
    r = run["result"]
    out = [("ran", True, f"exit 0 in {run['wall_s']:.1f} s")]
    want = min(setup.steps, model["config"]["context"] - len(r["prompt_tokens"]))
    n = len(r["tokens"])
    out.append(("tokens", n == want or 0 < n < want,
                f"{n} of {want} tokens" + (" (stopped at end of sequence)" if 0 < n < want else "")))
    got = [s.get("backend", "") for s in r["ranks"]]
    bad = [f"rank {i}: {g!r}" for i, (g, w) in enumerate(zip(got, expected_backends(run))) if not g.startswith(w)]
    out.append(("backend", not bad, "; ".join(bad) or ", ".join(sorted(set(got)))))
    out.append(("per-rank stats",) + rank_stats_ok(r, run["n_ranks"]))
    if reference is not run:
        out.append(("same tokens as scenario 1",) + same_tokens(r["tokens"], reference))
    if run.get("schedule") is not None:
        out.append(("migrations applied",) + migrations_ok(run))
        out.append(("status answered",) + statuses_ok(run))
    return out


def same_tokens(tokens, reference) -> tuple:
    """Whether a run's tokens are scenario 1's; token i > 0 comes from the pass at position n_prompt + i - 1."""
    if reference is None:
        return True, "not compared: scenario 1 is not part of this invocation"
    if "error" in reference:
        return False, "scenario 1 failed, so there is nothing to compare with"
    ref = reference["result"]["tokens"]
    at = next((i for i, (a, b) in enumerate(zip(ref, tokens)) if a != b), None)
    if at is not None:
        pos = len(reference["result"]["prompt_tokens"]) + at - 1
        where = "the prefill" if at == 0 else f"the pass at position {pos}"
        return False, f"token {at} (from {where}) differs: {tokens[at]} against scenario 1's {ref[at]}"
    if len(ref) != len(tokens):
        return False, f"{len(tokens)} tokens against scenario 1's {len(ref)}"
    return True, f"all {len(tokens)} tokens equal"


def rank_stats_ok(r, n_ranks) -> tuple:
    ranks = r.get("ranks") or []
    if len(ranks) != n_ranks:
        return False, f"{len(ranks)} rank records for {n_ranks} ranks"
    for s in ranks:
        missing = [k for k in RANK_KEYS if k not in s]
        if missing:
            return False, f"rank {s.get('rank')}: missing {', '.join(missing)}"
        if not (s["compute_ms"] > 0 and s["weights_bytes"] > 0 and s["peak_rss_bytes"] > 0):
            return False, f"rank {s['rank']}: compute, weights or memory figure is zero"
        if n_ranks > 1 and not s["bytes_sent"] > 0:
            return False, f"rank {s['rank']}: sent nothing in a {n_ranks}-rank run"
    return True, f"{n_ranks} rank record{'s' * (n_ranks > 1)} with compute, sync, bytes and memory"


def migrations_ok(run) -> tuple:
    moves = [m for m in run["migrations"] if "at" in m]
    failed = [f"{m['request']}: {m['reply'].get('error', 'not ok')}" for m in moves if not m["reply"].get("ok")]
    if failed:
        return False, "; ".join(failed)
    if len(moves) != len(run["schedule"]):
        return False, f"{len(moves)} of {len(run['schedule'])} commands sent"
    late = [f"asked for {m['at']}, applied at {m['reply'].get('applied_at')}" for m in moves
            if m["reply"].get("applied_at") != m["at"]]
    if late:
        return False, "; ".join(late)
    epochs = [m["reply"].get("epoch") for m in moves]
    if None in epochs or any(b <= a for a, b in zip([0] + epochs, epochs)):
        return False, f"plan epochs did not advance: {epochs}"
    final = run["result"].get("plan_epoch")
    if final != epochs[-1]:
        return False, f"the run ended at plan epoch {final}, not the last command's {epochs[-1]}"
    return True, f"{len(moves)} of {len(moves)} applied at their positions; plan epochs {epochs}"


def statuses_ok(run) -> tuple:
    """The status replies; the client's may miss a run so short that it ended before the client started up."""
    never_connected = ("No such file or directory", "Connection refused")
    statuses = [m for m in run["migrations"] if "at" not in m]
    missed = [m for m in statuses if m.get("via") and any(e in str(m["reply"].get("error")) for e in never_connected)]
    bad = [f"{m['command'].split(' --socket ')[0]} status: {m['reply'].get('error', 'not ok')}"
           for m in statuses if not m["reply"].get("ok") and m not in missed]
    if not any(m.get("via") == "spmd.migrate" for m in statuses):
        bad.append("the spmd.migrate client was not exercised")
    answered = sum(bool(m["reply"].get("ok")) for m in statuses)
    note = (" (the spmd.migrate client's started after this short run had ended)" if missed else
            ", one through the spmd.migrate client")
    return not bad, "; ".join(bad) or f"{answered} status replies{note}"


def all_checks(runs, setup, model) -> list:
    reference = next((r for r in runs if r["id"] == "1"), None)
    return [dict(run=run["id"], check=check, ok=bool(ok), reason=reason)
            for run in runs for check, ok, reason in check_run(run, setup, model, reference)]


# ---- report ---------------------------------------------------------------------------------------------------

def label(run) -> str:
    return f"{run['id']}: {run['n_ranks']}x {run['backend']}"


def charts(runs, out: Path) -> dict:
    """PNGs of the runs that produced a result: {name: file name}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in runs if r.get("result")]
    if not done:
        return {}
    files = {}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [label(r) for r in done]
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode tokens/s"),
                           (axes[1], "prompt_tokens_per_s", "prompt (prefill) tokens/s")):
        values = [r["result"].get(key) or 0 for r in done]
        bars = ax.barh(names, values, color=["tab:green" if "vulkan" in r["backend"] else "tab:blue" for r in done])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.invert_yaxis()
        ax.tick_params(labelsize=7)
    files["speed"] = save(fig, out / "speed.png")
    per_rank = [(f"{r['id']}/r{s['rank']}", s) for r in done for s in r["result"]["ranks"]]
    xs = range(len(per_rank))
    fig, ax = plt.subplots(figsize=(9, 3.2))
    compute = [s["compute_ms"] / 1e3 for _, s in per_rank]
    sync = [s["sync_ms"] / 1e3 for _, s in per_rank]
    ax.bar(xs, compute, label="compute", color="tab:blue")
    ax.bar(xs, sync, bottom=compute, label="sync (waiting in collectives)", color="tab:orange")
    ax.set_xticks(list(xs), [n for n, _ in per_rank], rotation=60, fontsize=7)
    ax.set_ylabel("seconds (generation)", fontsize=8)
    ax.set_title("per rank: compute vs sync, scenario/rank", fontsize=9)
    ax.legend(fontsize=7)
    files["rank_time"] = save(fig, out / "rank_time.png")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar(xs, [s["bytes_sent"] / 1e6 for _, s in per_rank], color="tab:purple")
    axes[0].set_title("bytes sent per rank (MB, whole run)", fontsize=9)
    axes[1].bar(xs, [s["peak_rss_bytes"] / 2**20 for _, s in per_rank], label="peak RSS", color="tab:gray")
    axes[1].bar(xs, [s["weights_bytes"] / 2**20 for _, s in per_rank], label="weights held", color="tab:red")
    axes[1].set_title("memory per rank (MiB)", fontsize=9)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(list(xs), [n for n, _ in per_rank], rotation=60, fontsize=7)
    files["rank_bytes"] = save(fig, out / "rank_bytes.png")
    return files


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path.name


def cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def mib(b):
    return f"{b / 2**20:.0f}" if b >= 10 * 2**20 else f"{b / 2**20:.2f}"


def is_lavapipe(description: str) -> bool:
    return "llvmpipe" in description.lower() or "lavapipe" in description.lower()


def vulkan_summary(machine, runs) -> str:
    seen = sorted({s["backend"] for r in runs if r.get("result") for s in r["result"]["ranks"]
                   if s["backend"].startswith("vulkan")})
    listed = [f"{d['name']} ({d['type']})" for d in machine["vulkan_devices"]]
    where = seen or listed
    if not where:
        return "none found (no Vulkan run succeeded and vulkaninfo lists no device)"
    soft = all(is_lavapipe(d) for d in where)
    return "; ".join(where) + (" — lavapipe, Mesa's Vulkan driver that runs on the CPU: this machine has no GPU, so "
                               "the GPU scenarios exercise the Vulkan code path at CPU speed" if soft else
                               " — a real GPU")


def setup_section(setup, machine, model, runs) -> list:
    c = model["config"]
    shape = (f"{c['arch']}, dim {c['dim']}, {c['n_layers']} layers, {c['n_heads']} heads / {c['n_kv_heads']} KV "
             f"heads, FFN {c['ffn_dim']}, vocab {c['vocab']}, context {c['context']}; matrices "
             f"{', '.join(model['matrix_types'])}")
    rows = [("date", machine["date"]), ("machine", f"{machine['host']}: {machine['os']}"),
            ("CPU", f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_bytes'] / 2**30:.1f} GiB memory"),
            ("Vulkan device", vulkan_summary(machine, runs)),
            ("Python / MPI", f"{machine['python']} / {machine['mpi']}"),
            ("commit", machine["commit"]),
            ("model file", f"`{model['path']}` ({model['bytes'] / 1e6:.1f} MB), {model['name']}"),
            ("model made", model["origin"]), ("model shape", shape),
            ("prompt", f"{setup.prompt!r} ({model['n_prompt']} tokens with BOS)"),
            ("steps / seed", f"{setup.steps} / {setup.seed} (greedy: temperature 0)"),
            ("multi-rank runs", f"{setup.ranks} ranks on this machine, ratios {setup.ratios}, allreduce "
                                f"{setup.allreduce}")]
    return ["## Setup", "", table(["", ""], rows), "",
            "Commands run from the repository root (`.venv/` is the set-up's virtual environment).", ""]


def summary_section(runs, checks, files) -> list:
    failed = {c["run"] for c in checks if not c["ok"]}
    rows = []
    for r in runs:
        res = r.get("result") or {}
        rows.append((r["id"], r["title"], r["n_ranks"], r["backend"], len(res.get("tokens", [])) if res else "-",
                     fmt(res.get("prefill_ms"), ".0f"), fmt(res.get("prompt_tokens_per_s")),
                     fmt(res.get("decode_tokens_per_s"), ".2f"), fmt(res.get("ms_per_token")),
                     "FAIL" if r["id"] in failed else "pass"))
    out = ["## Summary", "", table(["run", "scenario", "ranks", "backend", "tokens", "prefill ms", "prompt tok/s",
                                    "decode tok/s", "ms/token", "checks"], rows), ""]
    out += [f"![{name}]({f})" for name, f in files.items()] + [""]
    return out


def headlines(runs) -> list:
    """Ratios of decode speed between the scenarios that ran, and what the migrations cost."""
    done = {r["id"]: r for r in runs if r.get("result")}
    tps = {i: r["result"]["decode_tokens_per_s"] for i, r in done.items()}
    n = max((r["n_ranks"] for r in runs), default=1)
    out = []
    for a, b, what in (("3", "1", f"CPU, {n} ranks against 1"), ("4", "2", f"Vulkan, {n} ranks against 1"),
                       ("2", "1", "one rank, Vulkan against CPU"), ("4", "3", f"{n} ranks, Vulkan against CPU"),
                       ("5", "3", f"CPU, {n} ranks with migrations against without"),
                       ("6", "4", f"Vulkan, {n} ranks with migrations against without")):
        if tps.get(a) and tps.get(b):
            out.append(f"{what}: {tps[a]:.2f} / {tps[b]:.2f} decode tok/s = {tps[a] / tps[b]:.2f}x")
            run = done[a]
            if run["result"].get("migrations"):
                bare = without_migrations(run["result"], run["steps"])[0]
                out[-1] += f" ({fmt(bare, '.2f')} tok/s, {fmt(bare / tps[b], '.2f')}x, without the re-partitions' time)"
    for r in runs:
        moves = (r.get("result") or {}).get("migrations") or []
        if moves:
            ms = [m["ms"] for m in moves]
            out.append(f"run {r['id']}: {len(moves)} re-partitions took {min(ms):.0f} to {max(ms):.0f} ms each "
                       f"(mean {sum(ms) / len(ms):.0f} ms) and moved {sum(m['bytes_moved'] for m in moves):,} bytes "
                       "between ranks in all")
    return ["## Headlines", ""] + [f"- {line}" for line in out] + [""] if out else []


def checks_section(checks) -> list:
    rows = [(c["run"], c["check"], "pass" if c["ok"] else "**FAIL**", c["reason"]) for c in checks]
    return ["## Checks", "", table(["run", "check", "result", "reason"], rows), ""]


def without_migrations(res, steps) -> tuple:
    """(decode tok/s, ms/token) with the re-partitions' time taken out. The decode passes are the tokens after the
    first, or all of them when the run ended at an end-of-sequence token (the pass that sampled it counts)."""
    n = len(res["tokens"]) - 1 + (len(res["tokens"]) < steps)
    decode_ms = res["ms_per_token"] * n - sum(m["ms"] for m in res["migrations"])
    return (n * 1e3 / decode_ms, decode_ms / n) if n and decode_ms > 0 else (None, None)


def run_section(r) -> list:
    out = [f"### {r['id']}. {r['title']}", "", "```", shlex.join(r["argv"]), "```", ""]
    out += [n + "\n" for n in r.get("notes", [])]
    if r.get("attempts", 1) > 1:
        out += [f"Attempt {r['attempts']}: in the attempt{'s' * (r['attempts'] > 2)} before it a command reached the "
                "run after its position had passed (each command can only be sent once the one before it is "
                "applied, and a fast run may pass the next position meanwhile).", ""]
    if "error" in r:
        out += [f"**Did not complete:** {r['error']}", ""]
    if r.get("migrations"):
        argv = r["argv"]
        out += migration_lines(r["migrations"], argv[argv.index("--migrate-weights") + 1]
                               if "--migrate-weights" in argv else "file")
    res = r.get("result")
    if not res:
        return out
    out += ["Output (greedy):", "", "```", res["text"], "```", ""]
    if res.get("migrations"):
        spent, (tps, ms) = sum(m["ms"] for m in res["migrations"]), without_migrations(res, r["steps"])
        out += [f"The decode figures include the {len(res['migrations'])} re-partitions ({spent:.0f} ms in all); "
                f"without them: {fmt(tps, '.2f')} tok/s, {fmt(ms)} ms/token.", ""]
    out += [table(["prefill", "prompt tok/s", "decode tok/s", "ms/token", "model load s", "wall s",
                   "load average before / after"],
                  [(f"{len(res['prompt_tokens'])} tokens in {res['prefill_ms']:.0f} ms",
                    fmt(res["prompt_tokens_per_s"]), fmt(res["decode_tokens_per_s"], ".2f"),
                    fmt(res["ms_per_token"]), fmt(res["load_s"]), fmt(r["wall_s"]),
                    " / ".join(map(str, r["load_avg"])))]), ""]
    rows = [(s["rank"], s["host"], s["backend"],
             f"{s['share']['heads']} / {s['share']['kv_heads']} / {s['share']['ffn_columns']} / "
             f"{s['share']['vocab_rows']}",
             f"{s['compute_ms']:.0f}", f"{s['sync_ms']:.0f}", f"{s['bytes_sent'] / 1e6:.2f}",
             s["bytes_per_token"], mib(s["weights_bytes"]), mib(s["peak_rss_bytes"])) for s in res["ranks"]]
    out += [table(["rank", "host", "backend", "heads / KV / FFN cols / vocab rows (at the end)", "compute ms",
                   "sync ms", "sent MB", "bytes/token", "weights MiB", "peak RSS MiB"], rows), ""]
    if r.get("schedule") is not None and res.get("plan_epoch") is not None:
        out += [f"Plan epoch at the end: {res['plan_epoch']}.", ""]
    return out


def shares(plan) -> str:
    return "; ".join(f"r{p['rank']} {p['kv_heads']} KV / {p['ffn_columns']} FFN / {p['vocab_rows']} vocab"
                     for p in plan or [])


def brief(reply) -> str:
    """A reply without its bulky plan and per-rank lists (those are in report.json)."""
    return json.dumps({k: v for k, v in reply.items() if k not in ("plan", "ranks")})


def migration_lines(sent, weights_from) -> list:
    rows = []
    for m in sent:
        rep = m["reply"]
        after = shares(rep.get("plan") or rep.get("ranks")) if rep.get("ok") else rep.get("error", "")
        rows.append((m.get("at", "-"), "`" + " ".join(m["command"].split(" --socket ")[1].split()[1:]) + "`",
                     "ok" if rep.get("ok") else "**failed**", rep.get("epoch", "-"),
                     rep.get("applied_at", rep.get("position", "-")), fmt(rep.get("bytes_moved"), ",") if
                     rep.get("bytes_moved") is not None else "-", fmt(rep.get("ms")), after))
    out = ["Control commands. As soon as the run opened its socket, a `status` went through the `spmd.migrate` "
           "client (started in the background; answered at the token boundary it reached, listed first), and over "
           "one connection the migrations went, each sent once the one before it was applied (each applies at the "
           "token boundary before its `--at` position), then a last `status`. The exact command lines and the "
           "replies follow the table. `bytes moved` counts what crossed between ranks: " + (
               "with `--migrate-weights file` each rank reads the weights it takes on from its own copy of the "
               "model, so only KV-cache rows travel." if weights_from == "file" else
               "with `--migrate-weights peer` the moved weights travel from the rank that held them, with the "
               "KV-cache rows."), "",
           table(["--at", "command (after `--socket S`)", "reply", "epoch", "applied at / position", "bytes moved",
                  "ms", "split after (per rank)"], rows), "", "<details><summary>commands and replies</summary>",
           "", "```"]
    for m in sent:
        out += ["$ " + m["command"] + ("" if m.get("via") else "   # sent as " + json.dumps(m["request"])),
                brief(m["reply"])]
    return out + ["```", "", "</details>", ""]


def write_report(out: Path, setup, machine, model, runs, checks) -> Path:
    files = charts(runs, out)
    passed = all(c["ok"] for c in checks)
    md = [f"# Acceptance report: {Path(model['path']).name}", "",
          f"**{'PASS' if passed else 'FAIL'}**: {sum(c['ok'] for c in checks)} of {len(checks)} checks passed "
          f"over {len(runs)} run{'s' * (len(runs) != 1)}.", "",
          "Made by `scripts/run_acceptance.sh` (`scripts/acceptance.py`); every figure below is also in "
          "`report.json`.", ""]
    md += setup_section(setup, machine, model, runs) + summary_section(runs, checks, files) + headlines(runs)
    md += checks_section(checks)
    if setup.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in setup.notes] + [""]
    md += ["## Scenarios", ""]
    for r in runs:
        md += run_section(r)
    (out / "report.md").write_text("\n".join(md))
    everything = dict(passed=passed, setup=asdict(setup), machine=machine, model=model, runs=runs, checks=checks,
                      charts=files)
    (out / "report.json").write_text(json.dumps(everything, indent=1))
    return out / "report.md"

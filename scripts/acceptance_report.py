"""The acceptance runs written up: report.md, report.json and the charts of `acceptance_charts.py`.

Nothing here runs anything: `scripts/acceptance.py` gathers the runs (or reads them back from a report.json, with
--rerender), judges them with `acceptance_checks.all_checks` and calls `write_report`.
"""
import json
import shlex
from dataclasses import asdict
from pathlib import Path

from acceptance_charts import charts
from acceptance_checks import layer_text


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
            ("multi-rank runs", f"{setup.ranks} ranks on this machine, ratios {setup.ratios}"
                                + (f" (one stage), pipeline layout {setup.pipeline} (`*` between stages)"
                                   if any("*" in (r.get("layout") or "") for r in runs) else "")
                                + f", allreduce {setup.allreduce}")]
    return ["## Setup", "", table(["", ""], rows), "",
            "Commands run from the repository root (`.venv/` is the set-up's virtual environment).", ""]


def summary_section(runs, checks, files) -> list:
    failed = {c["run"] for c in checks if not c["ok"]}
    rows = []
    for r in runs:
        res = r.get("result") or {}
        rows.append((r["id"], r["title"], r["n_ranks"], r["backend"], res.get("ratios", r.get("layout") or "-"),
                     len(res.get("tokens", [])) if res else "-",
                     fmt(res.get("prefill_ms"), ".0f"), fmt(res.get("prompt_tokens_per_s")),
                     fmt(res.get("decode_tokens_per_s"), ".2f"), fmt(res.get("ms_per_token")),
                     "FAIL" if r["id"] in failed else "pass"))
    out = ["## Summary", "", table(["run", "scenario", "ranks", "backend", "layout (at the end)", "tokens",
                                    "prefill ms", "prompt tok/s", "decode tok/s", "ms/token", "checks"], rows), "",
           "A layout as the run applied it: `:` between the ranks of a stage, `*` between stages, `@N` a stage's "
           "layers.", ""]
    out += [f"![{name}]({f})" for name, f in files.items()] + [""]
    return out


def headlines(runs) -> list:
    """Ratios of decode speed between the scenarios that ran, and what the migrations cost."""
    done = {r["id"]: r for r in runs if r.get("result")}
    tps = {i: r["result"]["decode_tokens_per_s"] for i, r in done.items()}
    n = max((r["n_ranks"] for r in runs), default=1)
    pipe = next((f" {r['layout']}" for r in runs if "*" in (r.get("layout") or "")), "")
    out = []
    for a, b, what in (("3", "1", f"CPU, {n} ranks against 1"), ("4", "2", f"Vulkan, {n} ranks against 1"),
                       ("2", "1", "one rank, Vulkan against CPU"), ("4", "3", f"{n} ranks, Vulkan against CPU"),
                       ("5", "3", f"CPU, {n} ranks with migrations against without"),
                       ("6", "4", f"Vulkan, {n} ranks with migrations against without"),
                       ("7", "1", f"CPU, pipeline{pipe} against 1 rank"),
                       ("8", "2", f"Vulkan, pipeline{pipe} against 1 rank"),
                       ("7", "3", f"CPU, {n} ranks, pipeline{pipe} against one stage"),
                       ("8", "4", f"Vulkan, {n} ranks, pipeline{pipe} against one stage"),
                       ("9", "7", "CPU, pipeline with layer moves against without"),
                       ("10", "8", "Vulkan, pipeline with layer moves against without")):
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
                       "between ranks in all" + by_kind(r))
    return ["## Headlines", ""] + [f"- {line}" for line in out] + [""] if out else []


def by_kind(run) -> str:
    """': 4 layer moves 10 to 14 ms (mean 12 ms), ...': the applied commands' times by what they moved."""
    kinds = {"layers": "layer move", "move": "head/FFN move", "ratios": "new ratios"}
    sent = [m for m in run.get("migrations") or [] if "at" in m and m["reply"].get("ok")]
    groups = {}
    for c, m in zip(run.get("schedule") or [], sent):
        groups.setdefault(c["args"][0], []).append(m["reply"]["ms"])
    parts = [f"{len(ms)} {kinds[k]}{'s' * (len(ms) > 1 and k != 'ratios')} "
             + (f"{min(ms):.0f} to {max(ms):.0f} ms (mean {sum(ms) / len(ms):.0f} ms)" if len(ms) > 1 else
                f"{ms[0]:.0f} ms") for k, ms in groups.items()]
    return ": " + ", ".join(parts) if len(groups) > 1 else ""


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
    rows = [(s["rank"], s["host"], s["backend"], stage_cell(s),
             f"{s['share']['heads']} / {s['share']['kv_heads']} / {s['share']['ffn_columns']} / "
             f"{s['share']['vocab_rows']}",
             f"{s['compute_ms']:.0f}", f"{s['sync_ms']:.0f}", f"{s['bytes_sent'] / 1e6:.2f}",
             s["bytes_per_token"], mib(s["weights_bytes"]),
             mib(s["load_rss_bytes"]) if "load_rss_bytes" in s else "-", mib(s["peak_rss_bytes"]))
            for s in res["ranks"]]
    out += [table(["rank", "host", "backend", "stage: layers", "heads / KV / FFN cols / vocab rows (at the end)",
                   "compute ms", "sync ms", "sent MB", "bytes/token", "weights MiB", "RSS its load added MiB",
                   "peak RSS MiB"], rows), ""]
    if len(res.get("stages") or []) > 1:
        out += ["Per stage (at the end; compute and sync are its slowest rank's, over the whole generation; a later "
                "stage's sync includes waiting for the hidden state from the one before it):", "",
                table(["stage", "layers", "ranks", "compute ms", "sync ms"],
                      [(st["stage"], layer_text(st["layers"]), ", ".join(map(str, st["ranks"])),
                        f"{st['compute_ms']:.0f}", f"{st['sync_ms']:.0f}") for st in res["stages"]]), ""]
    if r.get("schedule") is not None and res.get("plan_epoch") is not None:
        out += [f"Plan epoch at the end: {res['plan_epoch']}.", ""]
    return out


def stage_cell(s) -> str:
    layers = s["share"].get("layers")
    return f"{s.get('stage', 0)}: {layer_text(layers)}" if layers else "-"


def shares(plan, stages) -> str:
    """Each rank's share after a command; with its layers where there are several stages."""
    return "; ".join(f"r{p['rank']} " + (f"L{layer_text(p['layers'])} " if len(stages) > 1 else "")
                     + f"{p['kv_heads']} KV / {p['ffn_columns']} FFN / {p['vocab_rows']} vocab" for p in plan or [])


def brief(reply) -> str:
    """A reply without its bulky plan and per-rank lists (those are in report.json)."""
    return json.dumps({k: v for k, v in reply.items() if k not in ("plan", "ranks")})


def migration_lines(sent, weights_from) -> list:
    rows = []
    for m in sent:
        rep = m["reply"]
        layout = f"{rep['ratios']}: " if "ratios" in rep else ""
        after = (layout + shares(rep.get("plan") or rep.get("ranks"), rep.get("stages") or []) if rep.get("ok") else
                 rep.get("error", ""))
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
                  "ms", "layout and split after (per rank)"], rows), "",
           "<details><summary>commands and replies</summary>", "", "```"]
    for m in sent:
        out += ["$ " + m["command"] + ("" if m.get("via") else "   # sent as " + json.dumps(m["request"])),
                brief(m["reply"])]
    return out + ["```", "", "</details>", ""]


def write_report(out: Path, setup, machine, model, runs, checks) -> Path:
    files = charts(runs, out, model["config"]["n_layers"])
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

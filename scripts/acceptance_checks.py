"""The acceptance runs judged: every check of every run, as (check, ok, reason). Nothing here runs anything."""
from spmd.plan import parse_layout, stage_layers

RANK_KEYS = ("rank", "host", "backend", "share", "compute_ms", "sync_ms", "bytes_sent", "bytes_per_token",
             "weights_bytes", "peak_rss_bytes")


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
    if is_pipeline(run):
        out.append(("stages",) + stages_ok(run, model))
        out.append(("weights split",) + weights_split(r, reference))
    if run.get("schedule") is not None:
        out.append(("migrations applied",) + migrations_ok(run))
        if any("stages" in c for c in run["schedule"]):
            out.append(("layers moved as asked",) + layers_moved(run))
        out.append(("status answered",) + statuses_ok(run))
    return out


def is_pipeline(run) -> bool:
    return "*" in (run.get("layout") or "")


def start_stages(run, n_layers) -> list:
    """The stages a run's layout gives ([{"layers": [first, stop], "ranks": [...]}]), counted by the planner's
    `stage_layers` (a pipeline run's result carries only its final stages)."""
    specs = parse_layout(run["layout"], run["n_ranks"])
    out, layer, rank = [], 0, 0
    for spec, count in zip(specs, stage_layers(specs, n_layers)):
        out.append({"layers": [layer, layer + count], "ranks": list(range(rank, rank + len(spec.speeds)))})
        layer, rank = layer + count, rank + len(spec.speeds)
    return out


def layer_text(layers) -> str:
    """[first, stop) -> '3' or '0-2'."""
    return f"{layers[0]}" if layers[1] == layers[0] + 1 else f"{layers[0]}-{layers[1] - 1}"


def shape(stages) -> list:
    return [(tuple(s["layers"]), tuple(s["ranks"])) for s in stages]


def stages_ok(run, model) -> tuple:
    """The result's stages: consecutive layer ranges that cover the model, consecutive ranks, each rank's `stage`
    and `share.layers` agreeing with them; and the ones asked for (the layout, or after migrations the last
    reply's)."""
    r, n_layers = run["result"], model["config"]["n_layers"]
    stages, layer, rank = r.get("stages") or [], 0, 0
    for i, st in enumerate(stages):
        a, b = st["layers"]
        if st["stage"] != i or a != layer or b <= a or st["ranks"] != list(range(rank, rank + len(st["ranks"]))):
            return False, f"stage record {st}: not the next layers and ranks after {layer} and {rank}"
        layer, rank = b, rank + len(st["ranks"])
    if layer != n_layers or rank != run["n_ranks"]:
        return False, f"the stages cover layers 0-{layer - 1} and {rank} ranks, not {n_layers} and {run['n_ranks']}"
    for s in r["ranks"]:
        stage, layers = s.get("stage"), s.get("share", {}).get("layers")
        if stage not in range(len(stages)) or s["rank"] not in stages[stage]["ranks"] \
                or layers != stages[stage]["layers"]:
            return False, f"rank {s['rank']}: stage {stage} and layers {layers} disagree with the stage records"
    moves = [m for m in run.get("migrations") or [] if "at" in m and m["reply"].get("ok")]
    want, source = (moves[-1]["reply"]["stages"], "the last migration's reply") if moves else \
        (start_stages(run, n_layers), f"layout {run['layout']}")
    if shape(stages) != shape(want):
        return False, f"stages {shape(stages)} against {source}'s {shape(want)}"
    return True, f"{len(stages)} stages as {source} says: {stages_text(stages)} (applied as {r.get('ratios')})"


def stages_text(stages) -> str:
    """'layers 0-1 on rank 0, layer 2 on ranks 1,2'."""
    return ", ".join(f"layer{'s' * (st['layers'][1] - st['layers'][0] > 1)} {layer_text(st['layers'])} on "
                     f"rank{'s' * (len(st['ranks']) > 1)} {','.join(map(str, st['ranks']))}" for st in stages)


def weights_split(r, reference) -> tuple:
    """Every rank of a pipeline holds fewer weight bytes than one rank holding the whole model."""
    if reference is None or "error" in reference:
        return True, "not compared: scenario 1 did not run here"
    whole = reference["result"]["ranks"][0]["weights_bytes"]
    big = [f"rank {s['rank']} holds {s['weights_bytes']:,}" for s in r["ranks"] if s["weights_bytes"] >= whole]
    if big:
        return False, f"{'; '.join(big)} bytes, as many as one rank with the whole model ({whole:,})"
    shares = [f"{s['weights_bytes'] / whole:.0%}" for s in r["ranks"]]
    return True, f"{', '.join(shares)} of the {whole:,} bytes one rank holds"


def layers_moved(run) -> tuple:
    """Each reply's stages are the ones the schedule counted for its command, and each layer move moved bytes (the
    KV cache of its layers travels with them)."""
    moves = [m for m in run["migrations"] if "at" in m and m["reply"].get("ok")]
    bad = []
    for c, m in zip(run["schedule"], moves):
        got = shape(m["reply"].get("stages") or [])
        if "stages" in c and got != shape(c["stages"]):
            bad.append(f"{command_words(c)}: stages {got}, not {shape(c['stages'])}")
        if c["args"][0] == "layers" and not m["reply"].get("bytes_moved"):
            bad.append(f"{command_words(c)}: no bytes moved")
    if bad or len(moves) != len(run["schedule"]):
        return False, "; ".join(bad) or f"{len(moves)} of {len(run['schedule'])} commands applied"
    moved = [f"{m['reply']['bytes_moved']:,}" for c, m in zip(run["schedule"], moves) if c["args"][0] == "layers"]
    return True, (f"after each of the {len(moves)} commands the stages the schedule counted; each of the "
                  f"{len(moved)} layer moves moved its layers' KV cache ({', '.join(moved)} bytes)")


def command_words(entry) -> str:
    return " ".join(entry["args"])


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

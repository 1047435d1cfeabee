"""The acceptance script on a tiny random model: its scenarios (one stage and pipeline, static and with live
migrations) pass and agree, its report is complete, a scenario made to differ fails it (non-zero exit), its
migration schedules cover every kind of move with moves the planner allows, and each schedule entry is sent as the
request `python -m spmd.migrate` would send."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spmd.synth import Shape, write_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import acceptance_schedules as schedules  # noqa: E402

SHAPE = Shape(dim=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn=256, vocab=512, context=64)  # 4 layers: 3 stages
STEPS = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", SHAPE, qtype="Q8_0", seed=1)


def run_acceptance(model, cwd, *args):
    # Each message between ranks sleeps 2 ms (the comm layer's test hook), so a step of the tiny model lasts
    # milliseconds, not microseconds, and the migration client is never outrun by it on a busy machine.
    env = {**os.environ, "SPMD_TEST_LINK_DELAY_MS": "2"}
    cmd = ["bash", str(ROOT / "scripts" / "run_acceptance.sh"), str(model), "--steps", str(STEPS),
           "--prompt", "Hello world", "--timeout", "120", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_scenarios_pass_and_report(model, tmp_path):
    p = run_acceptance(model, tmp_path, "--scenarios", "1,3,5,7,9", "--out", "rep")  # relative --out: under the cwd
    out = tmp_path / "rep"
    report = json.loads((out / "report.json").read_text())
    failed = [c for c in report["checks"] if not c["ok"]]
    assert p.returncode == 0 and not failed, (failed, p.stderr[-3000:])
    assert [r["id"] for r in report["runs"]] == ["1", "3", "5", "7", "9"]
    checked = {run: {c["check"] for c in report["checks"] if c["run"] == run} for run in ("3", "7", "9")}
    assert checked["3"] >= {"ran", "tokens", "per-rank stats", "same tokens as scenario 1"}
    assert checked["7"] >= checked["3"] | {"stages", "weights split"}
    assert checked["9"] >= checked["7"] | {"migrations applied", "layers moved as asked", "status answered"}
    tokens = {tuple(r["result"]["tokens"]) for r in report["runs"]}
    assert len(tokens) == 1 and len(next(iter(tokens))) == STEPS
    md = (out / "report.md").read_text()
    assert md.startswith("# Acceptance report") and "**PASS**" in md and "## Checks" in md
    for png in ("speed.png", "rank_time.png", "rank_bytes.png", "layers.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in md
    assert "mpirun -n 3" in md and "--ratios 2:3:3" in md and "--ratios '1*1*1'" in md  # the commands as run
    run5, run7, run9 = report["runs"][2:]
    kinds = {m["command"].split("--kind ")[1][0] for m in run5["migrations"] if "--kind" in m["command"]}
    assert kinds == {"1", "2", "3"} and any(" ratios " in m["command"] for m in run5["migrations"])
    assert run5["attempts"] == 1 and run9["attempts"] == 1
    assert [s["layers"] for s in run7["result"]["stages"]] == [[0, 2], [2, 3], [3, 4]]  # 4 layers on 3 stages
    layer_moves = [m["request"] for m in run9["migrations"] if m["request"] and m["request"].get("kind") == "layers"]
    assert [(r["from_stage"], r["to_stage"]) for r in layer_moves] == [(0, 1), (1, 2), (2, 1), (1, 0)]
    assert len(run9["result"]["stages"]) == 2 and run9["result"]["plan_epoch"] == 6  # regrouped: 1:1*1


def test_a_scenario_that_differs_fails(model, tmp_path):
    p = run_acceptance(model, tmp_path, "--scenarios", "1,3", "--out", str(tmp_path / "rep"),
                       "--scenario-args", "3=--temperature 1.5")  # test hook: scenario 3 samples
    assert p.returncode == 1, p.stderr[-3000:]
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    failed = [(c["run"], c["check"]) for c in report["checks"] if not c["ok"]]
    assert failed == [("3", "same tokens as scenario 1")]
    assert "**FAIL**" in (tmp_path / "rep" / "report.md").read_text()


def test_a_scenario_that_cannot_run_is_one_line(model, tmp_path):
    p = run_acceptance(model, tmp_path, "--scenarios", "1", "--out", str(tmp_path / "rep"),
                       "--scenario-args", "1=--ratios 0:1")  # a flag the run refuses
    assert p.returncode == 1 and "Traceback" not in p.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    (check,) = [c for c in report["checks"] if not c["ok"]]
    assert check["check"] == "ran" and check["reason"].startswith("exit 1: error:") and "\n" not in check["reason"]


def test_stage_checks_fail_on_stages_other_than_asked():
    """The pipeline checks on made-up results: right, a rank whose layers disagree with its stage, stages other than
    the layout's, and a layer move whose reply's stages are not the schedule's."""
    import acceptance_checks as checks

    def run(spans, rank_layers=None):
        stages = [dict(stage=i, layers=list(ab), ranks=[i]) for i, ab in enumerate(spans)]
        ranks = [dict(rank=i, stage=i, share=dict(layers=list(rank_layers[i] if rank_layers else ab)))
                 for i, ab in enumerate(spans)]
        return dict(id="7", layout="1*1*1", n_ranks=3, result=dict(stages=stages, ranks=ranks, ratios="?"))

    model = dict(config=dict(n_layers=4))
    assert checks.stages_ok(run([(0, 2), (2, 3), (3, 4)]), model)[0]  # 4 layers on 1*1*1: 2, 1, 1
    ok, why = checks.stages_ok(run([(0, 2), (2, 3), (3, 4)], [(0, 2), (2, 4), (3, 4)]), model)
    assert not ok and why.startswith("rank 1: stage 1 and layers [2, 4]")
    ok, why = checks.stages_ok(run([(0, 1), (1, 3), (3, 4)]), model)
    assert not ok and "against layout 1*1*1's" in why
    assert not checks.stages_ok(run([(0, 2), (2, 3)]), model)[0]  # a layer short
    schedule = [dict(at=9, args=["layers", "--from-stage", "0", "--to-stage", "1", "--count", "1", "--at", "9"],
                     stages=[dict(layers=[0, 1], ranks=[0]), dict(layers=[1, 3], ranks=[1]),
                             dict(layers=[3, 4], ranks=[2])])]
    wrong = [dict(stage=0, layers=[0, 2], ranks=[0]), dict(stage=1, layers=[2, 3], ranks=[1]),
             dict(stage=2, layers=[3, 4], ranks=[2])]
    reply = dict(ok=True, bytes_moved=512, stages=wrong)
    ok, why = checks.layers_moved(dict(schedule=schedule, migrations=[dict(at=9, reply=reply)]))
    assert not ok and why.startswith("layers --from-stage 0 --to-stage 1 --count 1 --at 9: stages")
    reply["stages"] = [dict(st, stage=i) for i, st in enumerate(schedule[0]["stages"])]
    assert checks.layers_moved(dict(schedule=schedule, migrations=[dict(at=9, reply=reply)]))[0]
    reply["bytes_moved"] = 0  # the layer's KV cache did not travel
    assert not checks.layers_moved(dict(schedule=schedule, migrations=[dict(at=9, reply=reply)]))[0]


@pytest.mark.parametrize("ratios,ffn,steps", [("2:3:3", 256, 16), ("1:1", 172, 8), ("1:2:3:4", 5632, 40)])
def test_unit_schedule_covers_every_kind(ratios, ffn, steps):
    from types import SimpleNamespace

    from spmd import plan as P
    n_prompt, n_ranks = 5, len(ratios.split(":"))
    schedule = schedules.unit_schedule(dict(n_kv_heads=4, ffn_dim=ffn), ratios, n_ranks, n_prompt, steps)
    assert [c["args"][2] if c["args"][0] == "move" else c["args"][0] for c in schedule] == ["1", "2", "3", "ratios"]
    assert_positions(schedule, n_prompt, steps)
    dims = SimpleNamespace(n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=ffn, vocab=512)
    plan = P.make_plan(P.parse_layout(ratios, n_ranks), dims)
    for c in schedule:  # every move is one the planner accepts, on the plan the earlier ones leave
        plan = apply(plan, c["args"], n_ranks)


@pytest.mark.parametrize("layout,n_layers,steps,structure", [
    ("1*1*1", 4, 24, [2, 1]), ("1*1*1", 22, 64, [2, 1]), ("1:1*1", 5, 16, [1, 2]), ("1*2:3", 6, 24, [3]),
    ("1:1@10*2:3", 22, 40, [1, 3]), ("1*1*1*1", 8, 40, [2, 1, 1])])
def test_layer_schedule_moves_layers_there_and_back_then_regroups(layout, n_layers, steps, structure):
    """Layers go stage by stage to the far end of the pipeline (forward where stage 0 can spare one) and come back;
    then new stages (rank counts `structure`), and a move inside one of them: each accepted by the planner on the
    plan the earlier ones leave, and leaving the stages the schedule says."""
    from types import SimpleNamespace

    from spmd import plan as P
    n_prompt, n_ranks = 7, len(layout.replace("*", ":").split(":"))
    config = dict(n_layers=n_layers, n_kv_heads=4, ffn_dim=256)
    schedule = schedules.layer_schedule(config, layout, n_ranks, n_prompt, steps)
    dims = SimpleNamespace(n_layers=n_layers, n_heads=8, n_kv_heads=4, ffn_dim=256, vocab=512)
    plan = P.make_plan(P.parse_layout(layout, n_ranks), dims)
    start = [st.layers for st in plan.stages]
    moves = [(int(c["args"][2]), int(c["args"][4])) for c in schedule if c["args"][0] == "layers"]
    hops = [(s, s + 1) for s in range(len(start) - 1)]
    if start[0][1] - start[0][0] == 1:  # stage 0 cannot spare a layer: from the last stage
        hops = [(b, a) for a, b in reversed(hops)]
    assert moves == hops + [(b, a) for a, b in reversed(hops)]
    assert len({c["args"][6] for c in schedule if c["args"][0] == "layers"}) == 1  # the same count each time
    assert [c["args"][0] for c in schedule][len(moves):] == ["ratios", "move"]
    assert_positions(schedule, n_prompt, steps)
    for i, c in enumerate(schedule):
        plan = apply(plan, c["args"], n_ranks)
        assert [{"layers": list(st.layers), "ranks": list(st.ranks)} for st in plan.stages] == c["stages"]
        if i == len(moves) - 1:  # back where they were
            assert [st.layers for st in plan.stages] == start
        if c["args"][0] == "ratios":
            assert [len(st.ranks) for st in plan.stages] == structure


def test_a_layer_schedule_needs_stages_with_layers_to_give():
    with pytest.raises(ValueError, match="one stage"):
        schedules.layer_schedule(dict(n_layers=4, n_kv_heads=4, ffn_dim=256), "1:1:1", 3, 5, 24)
    with pytest.raises(ValueError, match="at most one stage per layer"):
        schedules.layer_schedule(dict(n_layers=2, n_kv_heads=4, ffn_dim=256), "1*1*1", 3, 5, 24)
    with pytest.raises(ValueError, match="neither has one to give"):
        schedules.layer_schedule(dict(n_layers=3, n_kv_heads=4, ffn_dim=256), "1*1*1", 3, 5, 24)
    with pytest.raises(ValueError, match="too few"):
        schedules.layer_schedule(dict(n_layers=4, n_kv_heads=4, ffn_dim=256), "1*1*1", 3, 5, 6)


def assert_positions(schedule, n_prompt, steps):
    """Distinct increasing positions inside the generation, a token boundary left after the last for a status."""
    at = [c["at"] for c in schedule]
    assert at == sorted(set(at)) and n_prompt < at[0] and at[-1] <= n_prompt + steps - 3
    assert all(c["args"][-2:] == ["--at", str(c["at"])] for c in schedule)


def apply(plan, args, n_ranks):
    """The plan after one schedule entry, by the planner's own functions (which refuse a move it does not allow)."""
    from spmd import plan as P
    from spmd import replan as R
    a = dict(zip(args[1:-2:2], args[2:-2:2]))
    if args[0] == "ratios":
        return R.relayout(plan, P.parse_layout(args[1], n_ranks))
    if args[0] == "layers":
        return R.move_layers(plan, int(a["--from-stage"]), int(a["--to-stage"]), int(a["--count"]))
    heads, blocks = a.get("--heads"), a.get("--ffn-blocks")
    return R.move_units(plan, int(a["--from"]), int(a["--to"]), heads and int(heads), blocks and int(blocks))


def test_each_entry_is_sent_as_spmd_migrate_sends_it(monkeypatch):
    """The schedule goes over one connection as request lines; by hand, the report's `python -m spmd.migrate ...`
    lines must send the same requests."""
    from spmd import migrate
    sent = []
    monkeypatch.setattr(migrate, "request", lambda _path, req, _timeout=None: sent.append(req) or {"ok": True})
    config = dict(n_layers=6, n_kv_heads=4, ffn_dim=256)
    entries = (schedules.unit_schedule(config, "2:3:3", 3, 5, 24)
               + schedules.layer_schedule(config, "1*1*1", 3, 5, 24) + [dict(args=["status"])])
    for c in entries:
        migrate.main(["--socket", "/nonexistent.sock", *c["args"]])  # exits only on an error
        assert sent[-1] == schedules.request_of(c["args"]), c["args"]
    assert len(sent) == len(entries)

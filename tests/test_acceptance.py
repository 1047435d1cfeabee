"""The acceptance script on a tiny random model: its scenarios pass and agree, its report is complete, a scenario
made to differ fails it (non-zero exit), and its migration schedule covers every kind with moves the plan allows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spmd.synth import Shape, write_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import acceptance  # noqa: E402

SHAPE = Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn=256, vocab=512, context=64)
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
    p = run_acceptance(model, tmp_path, "--scenarios", "1,3,5", "--out", "rep")  # a relative --out: under the cwd
    out = tmp_path / "rep"
    report = json.loads((out / "report.json").read_text())
    failed = [c for c in report["checks"] if not c["ok"]]
    assert p.returncode == 0 and not failed, (failed, p.stderr[-3000:])
    assert [r["id"] for r in report["runs"]] == ["1", "3", "5"]
    assert {c["check"] for c in report["checks"] if c["run"] == "3"} >= {"ran", "tokens", "per-rank stats",
                                                                         "same tokens as scenario 1"}
    tokens = {tuple(r["result"]["tokens"]) for r in report["runs"]}
    assert len(tokens) == 1 and len(next(iter(tokens))) == STEPS
    md = (out / "report.md").read_text()
    assert md.startswith("# Acceptance report") and "**PASS**" in md and "## Checks" in md
    for png in ("speed.png", "rank_time.png", "rank_bytes.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in md
    assert "mpirun -n 3" in md and "--ratios 2:3:3" in md  # the commands as run
    run5 = report["runs"][-1]
    kinds = {m["command"].split("--kind ")[1][0] for m in run5["migrations"] if "--kind" in m["command"]}
    assert kinds == {"1", "2", "3"} and any(" ratios " in m["command"] for m in run5["migrations"])
    assert run5["attempts"] == 1


def test_a_scenario_that_differs_fails(model, tmp_path):
    p = run_acceptance(model, tmp_path, "--scenarios", "1,3", "--out", str(tmp_path / "rep"),
                       "--scenario-args", "3=--prompt-ids 1,5,6 --prompt=")  # test hook: scenario 3 another prompt
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


@pytest.mark.parametrize("ratios,ffn,steps", [("2:3:3", 256, 16), ("1:1", 172, 8), ("1:2:3:4", 5632, 40)])
def test_migration_schedule_covers_every_kind(ratios, ffn, steps):
    from types import SimpleNamespace

    from spmd import plan as P
    from spmd import replan as R
    n_prompt, n_ranks = 5, len(ratios.split(":"))
    schedule = acceptance.migration_schedule(dict(n_kv_heads=4, ffn_dim=ffn), ratios, n_ranks, n_prompt, steps)
    assert [c["args"][2] if c["args"][0] == "move" else c["args"][0] for c in schedule] == ["1", "2", "3", "ratios"]
    at = [c["at"] for c in schedule]
    assert at == sorted(set(at)) and n_prompt < at[0] and at[-1] <= n_prompt + steps - 2
    assert all(c["args"][-2:] == ["--at", str(c["at"])] for c in schedule)
    dims = SimpleNamespace(n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=ffn, vocab=512)
    plan = P.make_plan(P.parse_layout(ratios, n_ranks), dims)
    for c in schedule:  # every move is one the planner accepts, on the plan the earlier ones leave
        a = dict(zip(c["args"][1:-2:2], c["args"][2:-2:2]))
        if c["args"][0] == "ratios":
            plan = R.relayout(plan, P.parse_layout(c["args"][1], n_ranks))
        else:
            heads, blocks = a.get("--heads"), a.get("--ffn-blocks")
            plan = R.move_units(plan, int(a["--from"]), int(a["--to"]), heads and int(heads), blocks and int(blocks))

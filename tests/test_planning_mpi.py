"""The cluster's profile (`spmd.profile`): every rank measured with its own backend, the links between every pair,
a file the planner reads; simulated slow ranks and links show in it. Passes at any -n.

Run with: mpirun -n 3 python -m pytest --with-mpi tests/test_profile_mpi.py"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpi_models import MPI, SHAPE, WORLD, shared_models
from spmd.comm import Comm
from spmd.engine import Engine, RunOptions
from spmd.executor import Slowdown
from spmd.cluster import load_profile
from spmd.planner import predict
from spmd.profile import measure, set_up, table
from spmd.prompts import PromptSpec
from spmd.synth import write_model

MPIRUN = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    yield from shared_models(tmp_path_factory, "spmd-profile-")


def whole_layer_ms(profile, rank, rows=1):
    m = profile["model"]
    p = next(p for p in profile["ranks"][rank]["compute"] if p["rows"] == rows)
    return p["layer_ms"] + m["n_kv_heads"] * p["kv_group_ms"] + -(-m["ffn_dim"] // 32) * p["ffn_block_ms"]


def profile_of(model, slow=None, comm=None, backend="cpu"):
    comm = comm or Comm(comm=WORLD)
    opts = type("Opts", (), {"model": model, "backend": backend, "gpu": None, "threads": "1"})()
    file, cfg, backend, threads = set_up(comm, opts)
    return measure(comm, file, cfg, backend, threads, repeats=3, slow=slow)


@pytest.mark.mpi
def test_a_rank_profiling_another_model_file_is_refused(models):
    """A stale copy of the model on one host: its timings would be another model's, and another shape's collectives
    broke off with 'Message truncated'; refused at set-up as spmd.run refuses it, the same line on every rank."""
    from spmd.errors import UserError
    if WORLD.size == 1:
        pytest.skip("needs a second rank")
    with pytest.raises(UserError, match="rank 1 differs from rank 0 in its model file size"):
        profile_of(models["F32"] if WORLD.rank != 1 else models["Q8_0"])


@pytest.mark.mpi
def test_every_rank_and_link_is_measured_and_the_planner_reads_it(models):
    profile = profile_of(models["Q4_0"])
    if WORLD.rank != 0:
        assert profile is None
        return
    n = WORLD.size
    prof = load_profile(profile)  # the planner's own checks, field by field
    assert len(prof.ranks) == n and [r["rank"] for r in profile["ranks"]] == list(range(n))
    assert profile["model"]["n_layers"] == 2 and profile["model"]["kv_bytes_per_position"] == 2 * 32 * 4
    for r in profile["ranks"]:
        assert [p["rows"] for p in r["compute"]] == [1, 4, 16]
        assert r["memory_bytes"] > 0 and r["device_memory_bytes"] is None and r["threads"] == 1
        assert all(v >= 0 for p in r["compute"] for v in p.values())
    for i in range(n):
        for j in range(n):
            lat, bw = profile["links"]["latency_ms"][i][j], profile["links"]["bandwidth_bytes_per_s"][i][j]
            assert (lat is None) == (bw is None) == (i == j)
            if i != j:
                assert lat == profile["links"]["latency_ms"][j][i] and 0 <= lat < 50 and bw > 1e6
    # the bytes per unit, computed here from the shape: Q4_0 is 18 bytes per 32 weights
    b = profile["model"]["bytes"]
    assert b["kv_group"] == (2 * 32 + 32 + 32) * 128 * 18 // 32 + 128 * 2 * 32 * 18 // 32  # q (2 heads), k, v; o
    assert b["ffn_block"] == 3 * 32 * 128 * 18 // 32 and b["layer"] == 2 * 128 * 4
    assert "link 0-1" in table(profile) if n > 1 else "step record" in table(profile)
    assert predict(prof, ":".join(["1"] * n)).fits


@pytest.mark.mpi
def test_a_slow_rank_and_a_slow_link_show_in_the_profile(models, monkeypatch):
    """Rank n-1 computing 4x slower (the SPMD_TEST_SLOW hook's Slowdown) measures at least 2x the others' whole
    layer; a simulated 3 ms link delay shows as at least 3 ms latency on every link."""
    n = WORLD.size
    if n < 2:
        pytest.skip("needs two ranks")
    comm = Comm(comm=WORLD)
    comm.link_delay_s = 0.003
    profile = profile_of(models["Q4_0"], slow=Slowdown(4.0) if WORLD.rank == n - 1 else None, comm=comm)
    if WORLD.rank == 0:
        others = min(whole_layer_ms(profile, r) for r in range(n - 1))
        assert whole_layer_ms(profile, n - 1) > 2 * others, table(profile)
        assert all(profile["links"]["latency_ms"][i][j] >= 3.0 for i in range(n) for j in range(n) if i != j)


@pytest.mark.parametrize("backend", ["numpy", "vulkan"])
def test_every_backend_can_be_profiled(models, backend):
    """The profile runs each backend's own model (the Vulkan one has no separate head: it is timed behind one
    small layer whose cost is taken off)."""
    if backend == "vulkan":
        from test_migrate_mpi import vulkan_available
        if not vulkan_available():
            pytest.skip("no Vulkan device")
    if WORLD.rank != 0:
        return
    profile = profile_of(models["Q8_0"], comm=Comm(comm=MPI.COMM_SELF), backend=backend)
    prof = load_profile(profile)
    assert backend in prof.ranks[0].backend and whole_layer_ms(profile, 0) > 0
    assert all(p.head_ms + prof.model.vocab * p.vocab_row_ms > 0 for p in prof.ranks[0].compute)


def test_a_head_timed_faster_than_its_quarter_still_costs_its_time():
    """Noise can time the whole-vocabulary head no slower than the quarter one (seen on lavapipe under load: head
    cost 0, and the planner would think the classifier free); the head's whole time is then taken as per row, and
    a layer's as per byte where the half share timed no faster than the whole."""
    from types import SimpleNamespace as Share

    from spmd.profile import fit
    shares = {"full": Share(n_kv=2, ffn_blocks=[0, 1], layer_ids=[0, 1], n_vocab=0),
              "half": Share(n_kv=1, ffn_blocks=[0], layer_ids=[0, 1], n_vocab=0),
              "head": Share(n_kv=2, ffn_blocks=[0, 1], layer_ids=[0], n_vocab=512),
              "head_quarter": Share(n_kv=2, ffn_blocks=[0, 1], layer_ids=[0], n_vocab=128)}
    units = {"kv_group": 1000, "ffn_block": 3000}
    noisy = {"full": {1: 2.0}, "half": {1: 1.2}, "head": {1: 0.9}, "head_quarter": {1: 1.0}}
    point = fit(shares, units, noisy, 1)
    assert point["head_ms"] + 512 * point["vocab_row_ms"] == pytest.approx(0.9)
    steady = dict(noisy, head={1: 1.8})  # (1.8 - 1.0) / 384 a row
    point = fit(shares, units, steady, 1)
    assert point["vocab_row_ms"] == pytest.approx(0.8 / 384)
    layers = dict(noisy, half={1: 2.1})  # the half share timed slower than the whole: its units would be free
    point = fit(shares, units, layers, 1)  # 1.0 ms a layer of 2 * 1000 + 2 * 3000 bytes
    assert point["kv_group_ms"] == pytest.approx(1000 / 8000) and point["ffn_block_ms"] == pytest.approx(3000 / 8000)
    assert point["layer_ms"] == 0


def test_slowdown_sleeps_factor_minus_one_times_the_compute():
    slow = Slowdown(3.0)
    t = time.perf_counter()
    slow.start()
    time.sleep(0.02)  # "compute"
    slowed = slow.around(lambda x: x)
    assert slowed(5) == 5  # the sleep came before the allreduce
    slow.pause()  # nothing since the allreduce returned
    assert 0.058 <= time.perf_counter() - t < 0.2


@pytest.mark.skipif(WORLD.size > 1, reason="starts its own mpirun")
def test_the_command_writes_the_profile_and_prints_the_table(tmp_path):
    model = tmp_path / "m.gguf"
    write_model(model, SHAPE, qtype="Q8_0", seed=1)
    out, link = tmp_path / "p.json", tmp_path / "latest.json"
    link.symlink_to(out.name)  # written through: the link stays one
    p = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-m", "spmd.profile", "--model", str(model),
                        "--threads", "1", "--out", str(link), "--repeats", "2"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert link.is_symlink() and out.is_file()
    assert "link 0-1" in p.stdout and "python -m spmd.plan" in p.stderr
    load_profile(str(out))
    assert json.loads(out.read_text())["ranks"][1]["rank"] == 1
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    other, fifo = tmp_path / "notes.txt", tmp_path / "fifo"
    other.write_text("my notes")
    os.mkfifo(fifo)
    before = model.read_bytes()
    for out, said in [(tmp_path / "no" / "p.json", "cannot write it (No such file or directory)"),
                      (model, "is the model file"), (tmp_path, "is a directory"),
                      (other, "exists and is not a profile: not overwritten"), ("", "the name is empty"),
                      (fifo, "exists and is not a regular file")]:
        bad = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-m", "spmd.profile", "--model", str(model),
                              "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
        errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: --out") and said in errors[0], bad.stderr
        assert "link 0-1" not in bad.stdout  # refused before anything was measured
    assert model.read_bytes() == before and other.read_text() == "my notes" and fifo.is_fifo()


def run_job(model, prompts, comm=WORLD, **kw):
    opts = RunOptions(**{"model": model, "prompts": tuple(PromptSpec(ids=p) for p in prompts), "steps": 10,
                         "threads": "1", **kw})
    return Engine(opts, Comm(comm=comm), log=lambda _m: None).run()


PROMPTS = [(1, 72, 101, 108), (1, 44, 32), (1, 119, 111, 114, 108, 100)]


@pytest.mark.mpi
@pytest.mark.parametrize("n_prompts", [1, 3])
def test_plan_auto_gives_one_ranks_tokens_and_reports_its_prediction(models, n_prompts, monkeypatch):
    """--plan auto measures, plans and runs: the tokens equal one rank's; with the last rank 30x slower the plan
    gives it the least work (or none); the result names the plan, its prediction and what was measured."""
    n = WORLD.size
    model, prompts = models["Q8_0"], PROMPTS[:n_prompts]
    alone = run_job(model, prompts, comm=MPI.COMM_SELF) if WORLD.rank == 0 else None
    if n > 1:
        monkeypatch.setenv("SPMD_TEST_SLOW", f"{n - 1}:30")
    result = run_job(model, prompts, plan="auto")
    if WORLD.rank != 0:
        return
    tokens = lambda r: [s["tokens"] for s in r["sequences"]] if "sequences" in r else [r["tokens"]]  # noqa: E731
    assert tokens(result) == tokens(alone)
    planned = result["planner"]
    assert planned["ratios"] == result["ratios"] and planned["profile"] == "auto"
    assert planned["objective"] == ("latency" if n_prompts == 1 else "throughput")
    assert planned["predicted_ms_per_token"] > 0 and planned["measured_ms_per_token"] > 0
    if n > 1:
        work = [r["share"]["heads"] + r["share"]["ffn_columns"] for r in result["ranks"]]
        assert work[n - 1] == min(work), (result["ratios"], work)


@pytest.mark.mpi
def test_rebalance_moves_work_off_a_rank_that_turns_slow(models, monkeypatch):
    """From equal ratios, the last rank turns 30x slower at step 10 (after the profile at start-up): --rebalance
    sees it in the measured compute, moves work off it through a live migration, and the tokens stay one rank's."""
    n = WORLD.size
    model = models["Q8_0"]
    alone = run_job(model, PROMPTS[:1], comm=MPI.COMM_SELF, steps=64) if WORLD.rank == 0 else None
    if n > 1:
        monkeypatch.setenv("SPMD_TEST_SLOW", f"{n - 1}:30@10")
    result = run_job(model, PROMPTS[:1], rebalance=True, steps=64)
    if WORLD.rank != 0:
        return
    assert result["tokens"] == alone["tokens"]
    moves = result["rebalances"]
    assert [m["by"] for m in result["migrations"]] == ["rebalance"] * len(moves)
    if n == 1:
        assert moves == []  # nothing to balance
        return
    assert moves and moves[0]["before"] == ":".join(["1"] * n) and moves[0]["factors"][n - 1] > 3
    assert all(m["predicted_ms_after"] < 0.9 * m["predicted_ms_before"] for m in moves if m["why"] == "predicted")
    work = [r["share"]["heads"] + r["share"]["ffn_columns"] for r in result["ranks"]]
    assert work[n - 1] == min(work) and work[n - 1] < work[0], (result["ratios"], work)


@pytest.mark.mpi
def test_plan_auto_under_memory_limits_gives_one_ranks_tokens(models):
    """--plan auto with every rank's --memory-limit at the floor of the whole model on one rank (no share needs
    more): the planner plans within the limits or, where no layout fits them, without (the ranks over stream)."""
    model = models["Q8_0"]
    alone = WORLD.bcast(run_job(model, PROMPTS[:1], comm=MPI.COMM_SELF) if WORLD.rank == 0 else None)
    floor = alone["ranks"][0]["memory_floor_bytes"]
    result = run_job(model, PROMPTS[:1], plan="auto", memory_limit=str(floor))
    if WORLD.rank == 0:
        assert result["tokens"] == alone["tokens"]
        assert result["planner"]["ratios"] == result["ratios"]

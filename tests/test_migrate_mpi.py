"""Live re-partition through the real control socket during generation: the tokens equal an unmigrated run for every
kind of move, both weight sources, several weight types, many random migrations, a failure on one rank, and garbage
thrown at the socket. Rank 0 runs a client inside the generation loop (the emit callback, between tokens), so each
command lands at a known token boundary.

Run with: mpirun -n 3 python -m pytest --with-mpi tests/test_migrate_mpi.py (passes at any -n; moves need 2)."""
import os
import random
import shutil
import tempfile
import threading
import time

import numpy as np
import pytest

from mpi_models import MPI, PROMPT, SHAPE, WORLD, one_rank_tokens, shared_models
from spmd import plan as P
from spmd import replan as R
from spmd import repartition
from spmd.backends.numpy_ref import NumpyBackend
from spmd.client import ClientError, Connection
from spmd.comm import Comm
from spmd.engine import Engine, RunOptions
from spmd.prompts import PromptSpec
from spmd.errors import UserError
from spmd.synth import Shape
from spmd.weights import load_shard

FIRST = len(PROMPT)  # the first token boundary: the prefill is one pass, migrations apply after it
needs_two = pytest.mark.skipif(WORLD.size < 2, reason="a move needs a second rank")


DEEP = Shape(**{**SHAPE.__dict__, "n_layers": 5})  # room for a stage per rank at 4 ranks, and layers to move
# rows of 256: Q4_K and Q6_K, whose super-blocks a move of one KV head (64 columns of attn_output) or of FFN blocks
# cuts (the slices moved and kept hold the blocks around their columns)
DEEP_K = Shape(**{**DEEP.__dict__, "dim": 256})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # seed 8: 48 tokens without an end-of-sequence (seed 7's Q4_0 stops after 26)
    yield from shared_models(tmp_path_factory, "spmd-migrate-", {
        "deep F32": (DEEP, "F32", 8), "deep Q4_0": (DEEP, "Q4_0", 8), "Q4_K_M": (DEEP_K, "Q4_K_M", 8)})


@pytest.fixture
def socket_path():
    path = WORLD.bcast(os.path.join(tempfile.mkdtemp(prefix="spmd-sock-"), "c.sock") if WORLD.rank == 0 else None)
    yield path
    WORLD.Barrier()
    if WORLD.rank == 0:
        shutil.rmtree(os.path.dirname(path))


class Driver:
    """Rank 0's client. `schedule[k]` lists requests to send while token k (1-based) is emitted, that is, at the
    token boundary before position FIRST + k - 1; each is sent over the socket and the driver waits until the
    listener holds it (or answered it), so it applies at that boundary (mode next) or at its own "at"."""

    def __init__(self, path, schedule=None, each_token=None):
        self.path, self.schedule, self.each_token = path, schedule or {}, each_token
        self.engine, self.calls, self.replies, self.threads = None, 0, [], []

    def send(self, req, wait=True):
        answered = threading.Event()
        before = self.engine.control.queued() if wait else 0

        def talk():
            try:
                with Connection(self.path, 60) as c:
                    c.send(req)
                    try:
                        self.replies.append((req, c.reply()))
                    except ClientError:
                        self.replies.append((req, None))
            finally:
                answered.set()
        t = threading.Thread(target=talk)
        t.start()
        self.threads.append(t)
        if wait:
            listener = self.engine.control
            for _ in range(10000):
                if answered.is_set() or listener.queued() > before:
                    return
                time.sleep(0.001)
            raise AssertionError(f"the listener never took {req}")

    def emit(self, _piece):
        if self.calls > 0:
            for req in self.schedule.get(self.calls, []):
                self.send(req)
            if self.each_token is not None:
                self.each_token(self, self.calls)
        self.calls += 1
        return True

    def join(self):
        for t in self.threads:
            t.join(60)
        return [reply for _, reply in self.replies]


def run(model, socket_path, steps=16, schedule=None, each_token=None, **kw):
    opts = RunOptions(model=model, prompts=(PromptSpec(ids=PROMPT),), steps=steps, control_socket=socket_path, **kw)
    engine = Engine(opts, Comm(), log=lambda _m: None)
    driver = Driver(socket_path, schedule, each_token) if WORLD.rank == 0 else None
    if driver is not None:
        driver.engine = engine
    result = engine.run(driver.emit if driver else None)
    replies = driver.join() if driver else None
    return engine, result, replies


def layers(from_stage, to_stage, count, at=None):
    req = {"cmd": "migrate", "kind": "layers", "from_stage": from_stage, "to_stage": to_stage, "count": count}
    return {**req, "mode": "at", "at": at} if at is not None else req


def migrate(kind=None, src=None, dst=None, kv=None, ffn=None, at=None, ratios=None):
    req = {"cmd": "migrate"}
    if ratios is not None:
        req["ratios"] = ratios
    else:
        req.update({"kind": kind, "from": src, "to": dst})
        if kv is not None:
            req["kv_groups"] = kv
        if ffn is not None:
            req["ffn_blocks"] = ffn
    if at is not None:
        req.update(mode="at", at=at)
    return req


def every_kind():
    """Valid at 2, 3 and 4 ranks (2 KV heads, 8 FFN blocks): kinds 1, 2, 3, a ratios command, an "at" move."""
    last = WORLD.size - 1
    return {1: [migrate(1, 0, last, kv=1)],
            3: [migrate(2, 1 % WORLD.size, 0, ffn=1), {"cmd": "status"}],
            5: [migrate(3, last, 0, kv=1, ffn=1)],
            7: [migrate(ratios=":".join(str(r + 1) for r in range(WORLD.size)))],
            9: [migrate(2, last, 0, ffn=2, at=FIRST + 12)],
            10: [migrate(1, 0, last, kv=1)]}  # refused: the one before is still pending


def check_weights_equal_a_fresh_load(engine):
    """The weights a rank holds after its migrations are exactly those it would read for its final share."""
    state = engine.state
    fresh = load_shard(state.file, state.cfg, state.share, NumpyBackend())
    got = state.model.w
    assert (got.first, len(got.layers)) == (fresh.first, len(fresh.layers))
    assert (got.output is None) == (fresh.output is None)
    for lw, fw in zip(got.layers + [got], fresh.layers + [fresh]):
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"):
            if getattr(fw, name, None) is not None:
                np.testing.assert_array_equal(getattr(lw, name).w, getattr(fw, name).w, err_msg=name)


@needs_two
@pytest.mark.mpi
@pytest.mark.parametrize("weights_from", ["file", "peer"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0", "Q4_K_M", "Q4_K_M cpu"])
def test_every_kind_of_migration_keeps_the_tokens(models, socket_path, qtype, weights_from):
    model = models[qtype.split()[0]]
    cpu = qtype in ("Q8_0", "Q4_K_M cpu")
    expected = one_rank_tokens(model=model, steps=16)
    schedule = every_kind()
    engine, result, replies = run(model, socket_path, schedule=schedule, migrate_weights=weights_from,
                                  backend="cpu" if cpu else "numpy", allreduce="ring")
    if not cpu:  # the numpy backend keeps plain arrays to compare
        check_weights_equal_a_fresh_load(engine)
    if WORLD.rank == 0:
        assert result["tokens"] == expected
        by_epoch = {r["epoch"]: r for r in replies if r.get("applied_at") is not None}
        refused = [r for r in replies if not r["ok"]]
        assert refused == [{"ok": False, "error": "another migration is pending (epoch 5); wait for its reply"}]
        assert [by_epoch[e]["applied_at"] for e in (1, 2, 3, 4, 5)] == [FIRST + d for d in (0, 2, 4, 6, 12)]
        assert by_epoch[1]["bytes_moved"] > 0  # a KV head's cache always travels
        assert (by_epoch[2]["bytes_moved"] > 0) == (weights_from == "peer")  # FFN weights only in peer mode
        status = next(r for r in replies if "position" in r)
        assert status["position"] == FIRST + 2 and status["epoch"] == 2 and len(status["ranks"]) == WORLD.size
        assert result["plan_epoch"] == 5 and len(result["migrations"]) == 5
        plan = result["plan"]
        assert sum(r["kv_heads"] for r in plan) == 2 and sum(r["ffn_columns"] for r in plan) == 256
        assert [r["share"]["vocab_rows"] for r in result["ranks"]] == [r["vocab_rows"] for r in plan]
        assert not os.path.exists(socket_path)


def vulkan_available():
    try:
        from spmd.backends import get_backend
        get_backend("vulkan", device=0)
        return True
    except Exception:  # noqa: BLE001 - no Vulkan loader, no device
        return False


@needs_two
@pytest.mark.mpi
@pytest.mark.parametrize("weights_from", ["file", "peer"])
def test_vulkan_buffers_are_rebuilt_for_the_new_shapes(models, socket_path, weights_from):
    """Ranks alternate cpu and vulkan backends; every kind of move rebuilds the Vulkan model's device buffers."""
    if not all(WORLD.allgather(vulkan_available())):
        pytest.skip("no Vulkan device on every rank")
    expected = one_rank_tokens(model=models["Q8_0"], steps=16)
    backends = ",".join("vulkan" if r % 2 == 0 else "cpu" for r in range(WORLD.size))
    engine, result, replies = run(models["Q8_0"], socket_path, schedule=every_kind(), backend=backends,
                                  migrate_weights=weights_from, gpu="0")
    if WORLD.rank == 0:
        assert [r["error"] for r in replies if not r["ok"]] == ["another migration is pending (epoch 5); wait "
                                                                "for its reply"]
        assert result["tokens"] == expected and result["plan_epoch"] == 5


def pipeline(n):
    """A layout of n ranks with a stage per rank after the first two (which share a stage), or one rank a stage."""
    return "*".join(["1:1"] + ["1"] * (n - 2)) if n > 2 else "*".join(["1"] * n)


@needs_two
@pytest.mark.mpi
@pytest.mark.parametrize("moves", ["heads", "layers"])
@pytest.mark.parametrize("kv_cache", ["f32", "f16"])
def test_the_kv_cache_travels_with_its_heads_and_layers(models, socket_path, moves, kv_cache):
    """After moves, each rank's cache rows equal one rank's rows for the same (layer, KV head) (to rounding; a
    float16 cache (--kv-cache f16) travels as float16)."""
    model = models["deep F32"]
    alone = None
    if WORLD.rank == 0:
        e = Engine(RunOptions(model=model, prompts=(PromptSpec(ids=PROMPT),), steps=8, kv_cache=kv_cache),
                   Comm(comm=MPI.COMM_SELF), log=lambda _m: None)
        e.run()
        alone = e.state.model.cache_take(0, FIRST + 6)
    alone = WORLD.bcast(alone)
    last = WORLD.size - 1
    if moves == "heads":
        ratios, schedule = None, {1: [migrate(1, 0, last, kv=1)], 3: [migrate(1, last, 0, kv=1)]}
    else:  # the boundary layers there and back, then the stages regrouped
        ratios = pipeline(WORLD.size)
        regroup = "*".join(["1@1"] + ["1"] * (WORLD.size - 1))  # a stage per rank, the first of one layer
        schedule = {1: [layers(0, 1, 1)], 3: [layers(1, 0, 1)], 5: [migrate(ratios=regroup)]}
    engine, result, replies = run(model, socket_path, steps=8, migrate_weights="peer", backend="numpy",
                                  schedule=schedule, ratios=ratios, kv_cache=kv_cache)
    mine = engine.state.model.cache_take(0, FIRST + 6)
    assert set(mine) == {(layer, j) for layer in engine.state.share.layer_ids for j in engine.state.share.kv}
    for key, (k, v) in mine.items():
        for got, want in ((k, alone[key][0]), (v, alone[key][1])):
            assert got.dtype == want.dtype == (np.float16 if kv_cache == "f16" else np.float32)
            step = 2.0 ** -10 * float(np.abs(want).max()) if kv_cache == "f16" else 0.0  # a float16 rounding flip
            np.testing.assert_allclose(got, want, atol=1e-4 + step)
    if WORLD.rank == 0:
        assert all(r["ok"] for r in replies), replies
        assert result["plan_epoch"] == len(schedule)


@pytest.mark.mpi
@pytest.mark.parametrize("weights_from", ["file", "peer"])
def test_many_random_migrations_keep_a_long_generation(models, socket_path, weights_from):
    """Seeded random moves of every kind, ratios, 'next' and 'at', at most one pending, during 48 tokens."""
    if WORLD.size < 2:
        pytest.skip("a move needs a second rank")
    model = models["Q8_0" if weights_from == "file" else "Q4_0"]
    expected = one_rank_tokens(model=model, steps=48)
    rng = random.Random(WORLD.size * 10 + (weights_from == "peer"))

    random_request = random_requests(rng, stages=False)
    engine, result, replies = run(model, socket_path, steps=48, each_token=random_request,
                                  migrate_weights=weights_from, allreduce="ring")
    if WORLD.rank == 0:
        assert result["tokens"] == expected
        applied = [r for r in replies if r["ok"]]
        assert len(applied) >= 8 and result["plan_epoch"] == len(applied) == len(result["migrations"])
        assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]]


def random_layout(rng, n, stages=True):
    """Random speeds in a random grouping of n ranks into consecutive stages (at most 5: DEEP's layers), or one
    stage; now and then a rank other than 0 idle (0) where its stage keeps a working rank."""
    cuts = sorted(rng.sample(range(1, n), rng.randrange(0, n))) if stages else []
    groups = [b - a for a, b in zip([0] + cuts, cuts + [n])]
    speeds = [[f"{rng.uniform(0.3, 3):.2f}" for _ in range(g)] for g in groups]
    for i, group in enumerate(speeds):
        for j in range(1 if i == 0 else 0, len(group)):
            if rng.random() < 0.2 and sum(v != "0" for v in group) > 1:
                group[j] = "0"
    return "*".join(":".join(group) for group in speeds)


def random_requests(rng, stages):
    """The each_token callback of a random schedule: seeded moves of every kind the planner accepts (with
    `stages`, layer moves and regroupings too), 'next' and 'at', at most one pending, up to token 47 of 48."""
    def random_request(driver, k):
        engine = driver.engine
        if k > 47 or engine.control.queued() or rng.random() < 0.3:  # emit 48 is after the last boundary
            return
        plan, n = engine.state.plan, WORLD.size
        for _ in range(20):
            kind = rng.choice([1, 2, 3, "ratios"] + ["layers", "layers"] * stages)
            try:  # only a request the planner accepts
                if kind == "ratios":
                    text = random_layout(rng, n, stages)
                    req = migrate(ratios=text)
                    R.relayout(plan, P.parse_layout(text, n))
                elif kind == "layers":
                    s = rng.randrange(len(plan.stages))
                    t = s + rng.choice([-1, 1])
                    req = layers(s, t, rng.randint(1, 2))
                    R.move_layers(plan, s, t, req["count"])
                else:
                    src, dst = rng.sample(range(n), 2)
                    kv = rng.randint(1, max(1, plan[src].n_kv)) if kind != 2 else None
                    ffn = rng.randint(1, max(1, len(plan[src].ffn_blocks))) if kind != 1 else None
                    req = migrate(kind, src, dst, kv=kv, ffn=ffn)
                    R.move_units(plan, src, dst, kv, ffn)
            except UserError:
                continue
            if rng.random() < 0.3 and FIRST + k + 2 <= FIRST + 46:
                req.update(mode="at", at=FIRST + k + rng.randint(0, 2))
            driver.send(req)
            return
    return random_request


@needs_two
@pytest.mark.mpi
@pytest.mark.parametrize("weights_from", ["file", "peer"])
def test_random_layer_moves_and_regroupings_keep_a_long_generation(models, socket_path, weights_from):
    """Starting from stages, seeded random layer moves, regroupings of the stages, and head and FFN moves inside
    them, during 48 tokens: the tokens equal one rank's; the final weights equal a fresh load."""
    model = models["deep Q4_0"]
    expected = one_rank_tokens(model=model, steps=48)
    rng = random.Random(WORLD.size * 10 + 7 + (weights_from == "peer"))
    engine, result, replies = run(model, socket_path, steps=48, each_token=random_requests(rng, stages=True),
                                  migrate_weights=weights_from, allreduce="ring", ratios=pipeline(WORLD.size),
                                  backend="numpy")
    check_weights_equal_a_fresh_load(engine)
    if WORLD.rank == 0:
        assert result["tokens"] == expected
        applied = [r for r in replies if r["ok"]]
        assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]]
        assert len(applied) >= 8 and result["plan_epoch"] == len(applied)
        layouts = {r["ratios"] for r in applied}
        assert len({text.count("*") for text in layouts}) > 1  # the stage structure did change
        assert sum(r["stages"] != applied[i - 1]["stages"] for i, r in enumerate(applied) if i) >= 3


@needs_two
@pytest.mark.mpi
@pytest.mark.parametrize("phase", ["outgoing", "build"])
def test_a_failed_migration_keeps_the_old_plan(models, socket_path, monkeypatch, phase):
    """Out of memory on the last rank while it prepares or builds: every rank agrees, keeps its plan and model,
    and generation goes on unchanged; the next migration works."""
    expected = one_rank_tokens(model=models["Q8_0"], steps=12)
    if WORLD.rank == WORLD.size - 1:
        failures = [1]

        def fail_once(original):
            def wrapper(*a, **kw):
                if failures:
                    failures.pop()
                    raise MemoryError()
                return original(*a, **kw)
            return wrapper
        if phase == "build":
            monkeypatch.setattr(repartition, "build", fail_once(repartition.build))
        else:
            monkeypatch.setattr(repartition.Repartition, "_outgoing", fail_once(repartition.Repartition._outgoing))
    last = WORLD.size - 1
    engine, result, replies = run(models["Q8_0"], socket_path, steps=12, migrate_weights="peer",
                                  schedule={2: [migrate(1, 0, last, kv=1)], 4: [migrate(1, 0, last, kv=1)]})
    if WORLD.rank == 0:
        assert result["tokens"] == expected
        assert replies[0] == {"ok": False, "applied_at": None, "error": "the migration failed and the plan is "
                                                                        f"unchanged: rank {last}: out of memory"}
        assert replies[1]["ok"] and replies[1]["epoch"] == 1 and result["plan_epoch"] == 1


@pytest.mark.mpi
def test_status_at_any_rank_count(models, socket_path):
    engine, result, replies = run(models["Q4_0"], socket_path, steps=6, schedule={2: [{"cmd": "status", "id": 3}]})
    if WORLD.rank == 0:
        (status,) = replies
        assert status["ok"] and status["id"] == 3 and status["position"] == FIRST + 1 and status["epoch"] == 0
        assert [r["rank"] for r in status["ranks"]] == list(range(WORLD.size))
        for r in status["ranks"]:
            assert r["layers"] == [0, SHAPE.n_layers] and r["steps"] == 1 and r["compute_ms"] > 0
            assert r["stage"] == 0
        assert status["stages"][0]["ranks"] == list(range(WORLD.size)) and status["ratios"] == result["ratios"]
        assert sum(r["kv_heads"] for r in status["ranks"]) == SHAPE.n_kv_heads
        assert result["plan_epoch"] == 0


@pytest.mark.mpi
def test_garbage_at_the_socket_during_generation(models, socket_path):
    """Generated garbage between tokens and from a thread all along: every reply is JSON, the tokens unchanged."""
    from test_control import fuzz, garbage
    expected = one_rank_tokens(model=models["Q4_0"], steps=24)
    rng = random.Random(WORLD.size)
    done = threading.Event()

    answered, failures = [], []  # (an assertion in the thread is only a warning: kept and asserted here)

    def hammering():
        try:
            fuzz(socket_path, 99, 10**6, done.is_set, answered)
        except Exception as e:  # noqa: BLE001 - any, the fuzzer's assertions included
            failures.append(repr(e))
    hammer = threading.Thread(target=hammering, daemon=True)

    def between_tokens(driver, k):
        if k == 1:
            if WORLD.size > 1:  # a request that would leave a rank nothing, before the fuzzer may queue a move
                driver.send(migrate(ratios=":".join(["1000000"] + ["1"] * (WORLD.size - 1))))
            hammer.start()
        for _ in range(3):
            driver.send(garbage(rng), wait=False)
        time.sleep(0.01)  # the hammer's turn
    try:
        engine, result, replies = run(models["Q4_0"], socket_path, steps=24, each_token=between_tokens)
    finally:
        done.set()
    if WORLD.rank == 0:
        hammer.join(30)
        assert failures == [] and result["tokens"] == expected and len(answered) > 0
        assert all(r is None or isinstance(r["ok"], bool) for r in replies)
        if WORLD.size > 1:
            assert any(r and "no heads, FFN columns or vocabulary rows" in r.get("error", "") for r in replies)
        assert not os.path.exists(socket_path)


@needs_two
@pytest.mark.mpi
def test_a_migration_the_host_has_no_memory_for_is_refused(models, socket_path, monkeypatch):
    """A rank builds its new share while its old one is live: where the host has not the memory for what the
    changed ranks build, every rank keeps its plan and model before anything moves, the reply says which ranks
    and host; generation goes on unchanged, and the next migration (memory there again) works."""
    from spmd import rank as rank_module
    expected = one_rank_tokens(model=models["Q8_0"], steps=12)
    short = []  # rank 0 arms it at token 2: its host then reads 1000 bytes available for one look

    def available():
        return short.pop() if short else None
    monkeypatch.setattr(rank_module, "available_bytes", available)
    last = WORLD.size - 1

    def each_token(driver, k):
        if k == 2:
            short.append(1000)
    engine, result, replies = run(models["Q8_0"], socket_path, steps=12, each_token=each_token,
                                  schedule={2: [migrate(1, 0, last, kv=1)], 4: [migrate(1, 0, last, kv=1)]})
    if WORLD.rank == 0:
        assert result["tokens"] == expected
        error = replies[0]["error"]
        assert not replies[0]["ok"] and error.startswith("the migration failed and the plan is unchanged: host "), error
        assert f"has 1000 B available, and ranks 0, {last} would need" in error and "move less at a time" in error
        assert replies[1]["ok"] and replies[1]["epoch"] == 1 and result["plan_epoch"] == 1


@needs_two
@pytest.mark.mpi
def test_a_migration_a_gpu_has_no_memory_for_is_refused(models, socket_path, monkeypatch):
    """A Vulkan rank builds its new share in its device's memory, not the host's: where its GPU has not the room,
    every rank keeps its plan, the reply names the rank's GPU; the next migration (room there again) works."""
    if not all(WORLD.allgather(vulkan_available())):
        pytest.skip("no Vulkan device on every rank")
    from spmd.backends.vulkan import VulkanBackend
    expected = one_rank_tokens(model=models["Q8_0"], steps=12)
    short = []  # rank 0 (the Vulkan rank) arms it at token 2: its GPU then has 1000 bytes free for one look
    device_free = VulkanBackend.device_memory_bytes
    monkeypatch.setattr(VulkanBackend, "device_memory_bytes", lambda self: short.pop() if short else device_free(self))
    last = WORLD.size - 1

    def each_token(driver, k):
        if k == 2:
            short.append(1000)
    backends = ",".join(["vulkan"] + ["cpu"] * last)
    engine, result, replies = run(models["Q8_0"], socket_path, steps=12, each_token=each_token, backend=backends,
                                  gpu="0", schedule={2: [migrate(1, 0, last, kv=1)], 4: [migrate(1, 0, last, kv=1)]})
    if WORLD.rank == 0:
        assert result["tokens"] == expected
        error = replies[0]["error"]
        assert not replies[0]["ok"] and error.startswith("the migration failed and the plan is unchanged: rank 0's "
                                                         "GPU has 1000 B free, and the rank would need "), error
        assert replies[1]["ok"] and replies[1]["epoch"] == 1 and result["plan_epoch"] == 1

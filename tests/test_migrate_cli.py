"""End to end: `mpirun -n 2 python -m spmd.run` generating, `python -m spmd.migrate` moving its work around through
the default per-user socket; the text equals that of a run without migrations."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spmd.synth import Shape, write_model

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
# seed 4 and "Hello" settle into a loop without an end-of-sequence token: 4000 tokens, about a second at 2 ranks (the
# migrated job's rank 0 is slowed, SPMD_TEST_SLOW, so that it outlives the eight clients on a loaded machine)
SHAPE = Shape(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn=256, vocab=512, context=8192)
STEPS = 4000


def job(model, env, *extra):
    cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "spmd.run", "--model", str(model), "--prompt", "Hello",
           "--steps", str(STEPS), "--output", "json", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def client(env, *args):
    return subprocess.run([sys.executable, "-m", "spmd.migrate", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(not os.path.exists(MPIRUN), reason="mpirun not found")
def test_migrations_from_the_command_line_keep_the_text(tmp_path):
    model = write_model(tmp_path / "long.gguf", SHAPE, qtype="Q8_0", seed=4)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    os.makedirs(tmp_path / "run", mode=0o700)
    reference = job(model, env, "--control-socket", "none")
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    assert "control socket" not in err
    expected = json.loads(out)["tokens"]
    assert len(expected) == STEPS

    p = job(model, {**env, "SPMD_TEST_SLOW": "0:10"}, "--migrate-weights", "peer")
    folder = tmp_path / "run" / "spmd"
    for _ in range(600):  # the job's socket appears once it has loaded
        socks = list(folder.glob("control-*.sock")) if folder.exists() else []
        if socks or p.poll() is not None:
            break
        time.sleep(0.05)
    assert len(socks) == 1, p.communicate()
    assert oct(os.stat(folder).st_mode & 0o777) == "0o700" and oct(os.stat(socks[0]).st_mode & 0o777) == "0o600"
    steps = [client(env, "move", "--kind", "3", "--from", "0", "--to", "1", "--heads", "1", "--ffn-columns", "64"),
             client(env, "status"),
             client(env, "--json", "ratios", "1:3"),
             client(env, "move", "--kind", "1", "--from", "1", "--to", "0", "--heads", "2"),
             client(env, "move", "--kind", "2", "--from", "7", "--to", "0", "--ffn-blocks", "1"),
             client(env, "--json", "ratios", "1*1"),  # regroup: two pipeline stages of a layer each
             client(env, "status"),
             client(env, "layers", "--from-stage", "0", "--to-stage", "1", "--count", "1")]
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    for c in steps[:4] + steps[5:7]:
        assert c.returncode == 0, c.stderr
    assert steps[0].stdout.startswith("applied at position ")
    assert steps[1].stdout.startswith("position ") and "compute ms" in steps[1].stdout
    assert json.loads(steps[2].stdout)["epoch"] == 2
    assert steps[4].returncode == 1 and steps[4].stderr == "error: 'from' rank 7 is out of range: the job has " \
                                                           "ranks 0..1\n"
    assert json.loads(steps[5].stdout)["stages"] == [{"stage": 0, "layers": [0, 1], "ranks": [0]},
                                                     {"stage": 1, "layers": [1, 2], "ranks": [1]}], steps[5].stderr
    lines = steps[6].stdout.splitlines()
    assert lines[1].startswith("stage 0: layer 0 on rank 0, ") and lines[2].startswith("stage 1: layer 1 on rank 1, ")
    assert steps[7].returncode == 1 and steps[7].stderr == ("error: stage 0 has 1 layer; it must keep at least one, "
                                                            "so at most 0 can move\n")
    result = json.loads(out)
    assert result["tokens"] == expected
    assert result["plan_epoch"] == 4 and [m["epoch"] for m in result["migrations"]] == [1, 2, 3, 4]
    assert result["ratios"] == "1@1*1@1" and [r["stage"] for r in result["ranks"]] == [0, 1]
    assert err.splitlines()[0] == f"control socket: {socks[0]}"
    assert not socks[0].exists()  # removed at exit
    assert "Traceback" not in err + "".join(c.stderr for c in steps)


def test_a_socket_another_job_serves_is_refused_at_start_up(tmp_path):
    from types import SimpleNamespace

    from spmd.control import Listener
    model = write_model(tmp_path / "m.gguf", Shape(context=64), qtype="F32", seed=1)
    path = str(tmp_path / "busy.sock")
    other = Listener(path, SimpleNamespace(plan=None), 5, 10)  # another job's: nothing is asked of its plan
    try:
        p = subprocess.run([sys.executable, "-m", "spmd.run", "--model", str(model), "--steps", "4",
                            "--control-socket", path],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        other.close()
    assert p.returncode == 1
    assert p.stderr == f"error: control socket {path} is served by another job; give another --control-socket " \
                       "PATH, or none\n"


def test_a_status_with_an_idle_rank_shows_as_a_table():
    """A layout with a rank at ratio 0 (no stage, no layers) is shown as the table, the idle rank saying so (the
    table failed on its stage and the client fell back to the raw JSON)."""
    from types import SimpleNamespace
    from spmd.migrate import show
    from spmd.plan import make_plan, parse_layout
    dims = SimpleNamespace(n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab=512)
    plan = make_plan(parse_layout("1:0:1", 3), dims)
    ranks = [{**r, "compute_ms": 0.5, "sync_ms": 0.1} for r in plan.layout()]
    text = show({"position": 7, "epoch": 1, "ratios": "1:0:1", "stages": plan.describe(), "ranks": ranks})
    rows = text.splitlines()[-3:]
    assert [row.split()[:3] for row in rows] == [["0", "0", "0-3"], ["1", "idle", "-"], ["2", "0", "0-3"]], text


def test_a_job_that_does_not_answer_is_waited_for_a_bounded_time(tmp_path):
    """A job whose rank 0 has stopped takes connections (the kernel's backlog) but never answers: the client gives
    up after --timeout with one line, and by default waits a bounded time for every request but a migration --at a
    position (which waits for that position)."""
    import socket
    from spmd.migrate import MIGRATE_WAIT_S, STATUS_WAIT_S, reply_wait_s
    path = str(tmp_path / "c.sock")
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(path)
    silent.listen(4)
    try:
        t = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "spmd.migrate", "--socket", path, "--timeout", "1", "status"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and p.stderr.startswith("error: no reply from") and time.monotonic() - t < 20
    finally:
        silent.close()
    assert reply_wait_s(None, {"cmd": "status"}) == STATUS_WAIT_S
    assert reply_wait_s(None, {"cmd": "migrate", "mode": "next"}) == MIGRATE_WAIT_S
    assert reply_wait_s(None, {"cmd": "migrate", "mode": "at", "at": 9}) is None
    assert reply_wait_s(0, {"cmd": "status"}) is None and reply_wait_s(2.5, {"cmd": "status"}) == 2.5


@pytest.mark.parametrize("reply, said", [
    (b"[1]\n", "replied with something that is not a control-socket reply (a JSON object)"),
    (b"null\n", "replied with something that is not a control-socket reply (a JSON object)"),
    (b'{"ok": false}\n', 'the job refused the request without saying why: {"ok": false}'),
    (b'{"ok": false, "error": ["x"]}\n', "the job refused the request without saying why"),
])
def test_a_reply_that_is_not_the_protocols_is_one_line(tmp_path, reply, said):
    """A socket answering JSON that is not an object (a traceback, once), or a refusal without its error line (said
    as a Python dict, once)."""
    import socket
    import threading
    path = str(tmp_path / "c.sock")
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)
    other.listen(1)

    def answer():
        conn, _ = other.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(reply)
    threading.Thread(target=answer, daemon=True).start()
    try:
        p = subprocess.run([sys.executable, "-m", "spmd.migrate", "--socket", path, "--timeout", "10", "status"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        other.close()
    assert p.returncode == 1 and p.stdout == "" and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith("error: ") and said in p.stderr, p.stderr


@pytest.mark.parametrize("what", ["folder", "file"])
def test_a_socket_path_that_is_not_a_socket_is_said_so(tmp_path, what):
    """--socket naming a folder or a plain file: one line saying it is not a socket (Linux's own word for a
    connect to either is "Connection refused", as for a job that has gone)."""
    path = tmp_path / "x"
    path.mkdir() if what == "folder" else path.write_text("")
    p = client(dict(os.environ), "--socket", str(path), "status")
    assert p.returncode == 1 and p.stderr == f"error: cannot talk to {path}: not a socket (give a running job's " \
                                             "control socket)\n", p.stderr

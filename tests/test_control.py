"""The control socket without MPI: a listener and a stand-in for the engine's token loop. Protocol replies, bad
input of every kind, permissions (mode 0600, a peer of another uid refused by SO_PEERCRED), stale and live sockets,
a fuzzer, and the `python -m spmd.migrate` client."""
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from spmd import control
from spmd.client import ClientError, Connection, request
from spmd.control import MAX_CONNECTIONS, Listener
from spmd.plan import make_plan, parse_layout

ROOT = Path(__file__).resolve().parents[1]
DIMS = SimpleNamespace(n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=256, vocab=512)
PLAN = make_plan(parse_layout("1:1:1", 3), DIMS)  # kv 2/1/1, blocks 3/3/2


def state(plan=PLAN):
    """What the listener validates against: rank 0's state, of which it reads `plan`."""
    return SimpleNamespace(plan=plan)


class Loop:
    """The engine's side: a token boundary every `step_s` at positions first.., applying what `poll` returns."""

    def __init__(self, listener, first=10, step_s=0.005):
        self.listener, self.pos, self.step_s = listener, first, step_s
        self.state = listener._state
        self.applied = []
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while self.running:
            for r in self.listener.poll(self.pos):
                plan = self.state.plan
                if r.cmd == "status":
                    self.listener.finish(r, {"ok": True, "position": self.pos, "epoch": plan.epoch,
                                             "ratios": plan.text(), "n_layers": plan.n_layers,
                                             "stages": plan.describe(), "ranks": plan.layout()})
                else:
                    self.state.plan = r.plan  # the driver swaps the plan; the listener reads it from the state
                    self.applied.append((self.pos, r.plan.epoch))
                    self.listener.finish(r, {"ok": True, "epoch": r.plan.epoch, "applied_at": self.pos,
                                             "ratios": r.plan.text()})
            self.pos += 1
            time.sleep(self.step_s)

    @property
    def plan(self):
        return self.state.plan

    def stop(self):
        self.running = False
        self.thread.join()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "c.sock")


@pytest.fixture
def served(path):
    """A listener with a running loop; its last boundary is far away."""
    listener = Listener(path, state(), 10, 10_000)
    loop = Loop(listener)
    yield listener, loop
    loop.stop()
    listener.close(loop.pos)


def ask(path, req, timeout=10):
    """One request (an object, or raw bytes) on a fresh connection -> the reply object (None: no reply)."""
    with Connection(path, timeout) as c:
        c.send(req)
        try:
            return c.reply()
        except ClientError:
            return None


def test_socket_is_private_and_removed_at_close(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    folder = control.socket_dir()
    assert folder == str(tmp_path / "spmd")
    control.make_private_dir(folder)
    path = control.default_path()
    assert path == os.path.join(folder, f"control-{os.getpid()}.sock")
    listener = Listener(path, state(), 10, 20)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    listener.close()
    assert not os.path.exists(path)


def test_a_runtime_folder_that_is_not_there_is_not_made(tmp_path, monkeypatch):
    """$XDG_RUNTIME_DIR naming a folder that does not exist (or is not this user's): the sockets go to
    /tmp/spmd-UID, and nothing is created where it points."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "gone"))
    assert control.socket_dir() == f"/tmp/spmd-{os.getuid()}"
    assert not (tmp_path / "gone").exists()


def test_a_shared_folder_is_refused(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    os.chmod(open_dir, 0o777)
    with pytest.raises(control.UserError, match="only you can use"):
        control.make_private_dir(str(open_dir))


def test_status_and_migrate_replies(served, path):
    listener, loop = served
    reply = ask(path, {"cmd": "status", "id": 7})
    assert reply["id"] == 7 and reply["ok"] and reply["epoch"] == 0 and abs(reply["position"] - loop.pos) < 5
    reply = ask(path, {"cmd": "migrate", "kind": 1, "from": 0, "to": 2, "kv_groups": 1})
    assert reply["ok"] and reply["epoch"] == 1
    at = loop.pos + 20
    reply = ask(path, {"cmd": "migrate", "kind": 2, "from": 1, "to": 0, "ffn_blocks": 2, "mode": "at", "at": at})
    assert reply == {"ok": True, "epoch": 2, "applied_at": at, "ratios": loop.plan.text()}
    assert [s.kv for s in loop.plan] == [(0,), (2,), (1, 3)]
    assert [s.ffn_blocks for s in loop.plan] == [(0, 1, 2, 4, 5), (3,), (6, 7)]  # rank 1 gave its last two
    reply = ask(path, {"cmd": "migrate", "ratios": [1, 1, 2]})
    assert reply["ok"] and reply["epoch"] == 3 and [s.n_kv for s in loop.plan] == [1, 1, 2]
    reply = ask(path, {"cmd": "migrate", "ratios": "1:1*1"})  # regroup: two stages
    assert reply["ok"] and reply["epoch"] == 4
    assert [(st.layers, st.ranks) for st in loop.plan.stages] == [((0, 3), (0, 1)), ((3, 4), (2,))]
    reply = ask(path, {"cmd": "migrate", "kind": "layers", "from_stage": 0, "to_stage": 1, "count": 2})
    assert reply["ok"] and reply["epoch"] == 5
    assert [st.layers for st in loop.plan.stages] == [(0, 1), (1, 4)] and loop.plan.text() == "1:1@1*1@3"
    status = ask(path, {"cmd": "status"})
    assert status["ratios"] == "1:1@1*1@3" and status["stages"][1] == {"stage": 1, "layers": [1, 4], "ranks": [2]}


@pytest.mark.parametrize("req, message", [
    (b"{not json\n", "malformed request: not JSON"),
    (b"\xff\xfe\n", "malformed request: not JSON"),
    (b"[1, 2]\n", "expected a JSON object"),
    ({"cmd": "reboot"}, "unknown command \"reboot\""),
    ({"kind": 1}, "unknown command null"),
    ({"cmd": "status", "verbose": True}, "unknown field for status: 'verbose'"),
    ({"cmd": "migrate", "kind": 4, "from": 0, "to": 1, "kv_groups": 1}, "unknown kind 4"),
    ({"cmd": "migrate", "kind": "1", "from": 0, "to": 1, "kv_groups": 1}, "unknown kind \"1\""),
    ({"cmd": "migrate", "kind": 1, "from": 0, "to": 3, "kv_groups": 1}, "'to' rank 3 is out of range"),
    ({"cmd": "migrate", "kind": 1, "from": -1, "to": 1, "kv_groups": 1}, "'from' rank -1 is out of range"),
    ({"cmd": "migrate", "kind": 1, "from": True, "to": 1, "kv_groups": 1}, "'from' must be a rank, a whole number"),
    ({"cmd": "migrate", "kind": 1, "from": 1, "to": 1, "kv_groups": 1}, "nothing would move"),
    ({"cmd": "migrate", "kind": 1, "from": 1, "to": 0, "kv_groups": 2}, "rank 1 has 1 KV-head group; cannot move 2"),
    ({"cmd": "migrate", "kind": 2, "from": 2, "to": 0, "ffn_blocks": 3}, "rank 2 has 2 FFN blocks; cannot move 3"),
    ({"cmd": "migrate", "kind": 1, "from": 0, "to": 1, "kv_groups": 0.5}, "a whole number of KV-head groups"),
    ({"cmd": "migrate", "kind": 1, "from": 0, "to": 1}, "kind 1 needs 'kv_groups'"),
    ({"cmd": "migrate", "kind": 1, "from": 0, "to": 1, "kv_groups": 1, "ffn_blocks": 1},
     "kind 1 takes no 'ffn_blocks'"),
    ({"cmd": "migrate", "kind": 1, "to": 1, "kv_groups": 1}, "kind 1 needs 'from'"),
    ({"cmd": "migrate", "from": 0, "to": 1, "kv_groups": 1}, "migrate needs 'kind'"),
    ({"cmd": "migrate", "kind": "layers", "from_stage": 0, "to_stage": 1}, "kind 'layers' needs 'count'"),
    ({"cmd": "migrate", "kind": "layers", "from_stage": 0, "to_stage": 1, "count": 1, "from": 0},
     "kind 'layers' takes no 'from'"),
    ({"cmd": "migrate", "kind": "layers", "from_stage": 0, "to_stage": 1, "count": 1},
     r"'to_stage' 1 is out of range: the plan has stages 0..0"),
    ({"cmd": "migrate", "ratios": "1*1*1*1*1"}, "has 5 values but the job has 3 ranks"),
    ({"cmd": "migrate", "ratios": "1@3*1@3*1"}, "the @N counts add up to 6 layers but the model has 4, which leaves"),
    ({"cmd": "migrate", "ratios": "1:1:1"}, "^ratios '1:1:1' would change nothing: the plan is already 1:1:1$"),
    ({"cmd": "migrate", "ratios": "1@0*1:1"}, "@0 must be a whole number of layers, at least 1"),
    ({"cmd": "migrate", "ratios": "1:1"}, "^ratios '1:1' has 2 values but the job has 3 ranks"),
    ({"cmd": "migrate", "ratios": "0:1:1"}, "rank 0 cannot be idle"),
    ({"cmd": "migrate", "ratios": {"a": 1}}, "'ratios' must be a string"),
    ({"cmd": "migrate", "ratios": "1000000:1:1"}, "leave rank 1 no heads, FFN columns or vocabulary rows"),
    ({"cmd": "migrate", "ratios": "1:1:1", "kind": 1}, "give either 'ratios' or 'kind'"),
    ({"cmd": "migrate", "ratios": "1:1:1", "mode": "soon"}, "unknown mode \"soon\""),
    ({"cmd": "migrate", "ratios": "1:1:1", "mode": "at"}, "mode 'at' needs 'at'"),
    ({"cmd": "migrate", "ratios": "1:1:1", "mode": "at", "at": 3}, "position 3 has passed"),
    ({"cmd": "migrate", "ratios": "1:1:1", "mode": "at", "at": -1}, r"a token position, a whole number from 0 \("),
    ({"cmd": "migrate", "ratios": "1." + "0" * 4400 + ":1:1"}, "expected numbers separated by ':'"),  # (Python's
    ({"cmd": "migrate", "ratios": "1@" + "9" * 4400 + "*1:1"}, "@9{20} is more layers than"),  # limit on digits:
    ({"cmd": "migrate", "ratios": "1/" + "7" * 4400 + ":1:1"}, "expected numbers separated by ':'"),  # no reply)
    ({"cmd": "migrate", "ratios": "1:1:1", "at": 10**9},
     r"generation ends before position 1000000000 \(its last token boundary is at position 10000\)"),
    ({"cmd": "migrate", "ratios": "1:1:1", "mode": "next", "at": 50}, "mode 'next' takes no 'at'"),
    ({"cmd": "status", "id": [1]}, "'id' must be a string or an integer"),
    ({"cmd": "status", "id": "x" * 101}, "'id' must be a string or an integer of at most 100 characters"),
])
def test_bad_requests_get_a_clear_error(served, path, req, message):
    listener, loop = served
    reply = ask(path, req)
    assert reply["ok"] is False
    import re
    assert re.search(message, reply["error"]), reply["error"]
    assert loop.applied == [] and ask(path, {"cmd": "status"})["ok"]  # and the listener serves on


def test_one_pending_migration_at_a_time(served, path):
    listener, loop = served
    at = loop.pos + 200
    got = []
    t = threading.Thread(target=lambda: got.append(ask(path, {"cmd": "migrate", "kind": 1, "from": 0, "to": 1,
                                                              "kv_groups": 1, "at": at})))
    t.start()
    for _ in range(500):
        if listener._pending is not None:
            break
        time.sleep(0.01)
    reply = ask(path, {"cmd": "migrate", "kind": 2, "from": 0, "to": 1, "ffn_blocks": 1})
    assert reply == {"ok": False, "error": "another migration is pending (epoch 1); wait for its reply"}
    t.join()
    assert got[0]["ok"] and got[0]["applied_at"] == at and loop.applied == [(at, 1)]


def test_pending_requests_get_an_error_when_generation_ends(path):
    listener = Listener(path, state(), 10, 100)  # no loop: nothing is ever due
    replies = []
    threads = [threading.Thread(target=lambda r=r: replies.append(ask(path, r))) for r in
               ({"cmd": "migrate", "kind": 1, "from": 0, "to": 1, "kv_groups": 1, "at": 50}, {"cmd": "status"})]
    for t in threads:
        t.start()
    for _ in range(500):
        if listener._pending is not None and listener._status:
            break
        time.sleep(0.01)
    listener.close(pos=42)
    for t in threads:
        t.join()
    errors = sorted(r["error"] for r in replies)
    assert errors == ["generation ended before position 50 (it stopped at position 42)",
                      "generation ended before the status could be gathered (it stopped at position 42)"]
    assert not os.path.exists(path)


def test_no_boundary_left():
    listener = Listener("/tmp/spmd-test-no-boundary.sock", state(), 10, 9)  # --steps 1
    try:
        reply, _ = listener.handle(b'{"cmd": "migrate", "ratios": "1:1:2"}')
        assert reply == {"ok": False, "error": "no token boundary is left in this generation"}
    finally:
        listener.close()


def test_a_server_has_no_last_boundary_but_at_is_bounded():
    """A server's boundaries have no end: a far 'at' is queued, one past 2^53 refused (it was told a sentinel,
    "its last token boundary is at position 4611686018427387904")."""
    listener = Listener("/tmp/spmd-test-server-boundary.sock", state(), 0, None)
    try:
        reply, _ = listener.handle(b'{"cmd": "migrate", "ratios": "1:1:2", "at": 9007199254740993}')
        assert reply == {"ok": False, "error": "position 9007199254740993 is too far ahead: 'at' is at most 2^53"}
        reply, queued = listener.handle(b'{"cmd": "migrate", "ratios": "1:1:2", "at": 9007199254740992}')
        assert reply is None and queued.at == 2**53  # (queued: its reply comes once applied)
    finally:
        listener.close()


def test_a_burst_past_the_most_connections_waits_its_turn(served, path):
    """The 17th connection is turned away at once; `request` asks again until one of the 16 closes (a burst of
    clients failed at once), and gives up at its timeout."""
    held = [Connection(path, 10) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # (each admitted: the listener counts them)
        with Connection(path, 10) as c:
            assert c.reply() == {"ok": False, "busy": True,
                                 "error": f"too many connections (at most {MAX_CONNECTIONS}); try again"}
        t = time.monotonic()
        assert request(path, {"cmd": "status"}, timeout=0.5)["busy"] and time.monotonic() - t >= 0.4
        threading.Timer(0.5, held.pop().close).start()
        reply = request(path, {"cmd": "status"}, timeout=10)
        assert reply["ok"] and time.monotonic() - t >= 0.9
    finally:
        for c in held:
            c.close()


def test_long_lines_idle_clients_and_clients_that_leave_are_dropped(served, path, monkeypatch):
    listener, loop = served
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"x" * (control.MAX_LINE + 10))
    reply = json.loads(s.makefile("rb").readline())
    assert reply == {"ok": False, "error": f"request line longer than {control.MAX_LINE} bytes"}
    assert s.recv(10) == b""  # and the connection is closed
    s.close()
    for partial in (b'{"cmd": "migrate", "kind": 1, "fr', b"", b'{"cmd": "status"}'):  # leave mid-request
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(partial)
        s.close()
    monkeypatch.setattr(control, "IDLE_S", 0.2)
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(5)
    assert s.recv(10) == b""  # an idle client is let go
    s.close()
    s = socket.socket(socket.AF_UNIX)  # a byte at a time, never finishing a line: let go all the same
    s.connect(path)
    t = time.monotonic()
    try:
        for _ in range(100):
            s.sendall(b"{")
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert time.monotonic() - t < 2.0  # the whole request had 0.2 s, not each byte
    s.close()
    monkeypatch.setattr(control, "IDLE_S", 10.0)
    # a command that is not a string, and JSON nested past the parser's depth: one reply each, not a dropped line
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b'{"cmd": ["status"]}\n' + b"[" * 60000 + b"\n")
    f = s.makefile("rb")
    odd = [json.loads(f.readline()) for _ in range(2)]
    f.close()
    s.close()
    assert odd[0]["error"].startswith("unknown command [\"status\"]") and odd[1]["error"].startswith("malformed")
    # several requests on one connection, one reply line each
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b'{"cmd": "status", "id": 1}\n\n{"cmd": "nope"}\n{"cmd": "status", "id": "b"}\n')
    f = s.makefile("rb")
    lines = [json.loads(f.readline()) for _ in range(3)]
    f.close()
    s.close()
    assert [r.get("id") for r in lines] == [1, None, "b"] and [r["ok"] for r in lines] == [True, False, True]
    assert loop.applied == []
    for _ in range(500):
        if listener._connections == 0:
            break
        time.sleep(0.01)
    assert listener._connections == 0


def test_a_peer_of_another_uid_is_refused():
    if os.getuid() != 0:
        pytest.skip("needs root to start a process of another uid")
    folder = Path(tempfile.mkdtemp(prefix="spmd-peercred-", dir="/tmp"))  # pytest's tmp_path is closed to others
    path = str(folder / "c.sock")
    listener = Listener(path, state(), 10, 100)
    loop = Loop(listener)
    try:
        # the file system would let uid 65534 in: only SO_PEERCRED stands in the way
        os.chmod(folder, 0o755)
        os.chmod(path, 0o666)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become nobody and try
            try:
                os.close(read)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(10)
                s.connect(path)
                try:  # the listener may have refused and closed already
                    s.sendall(b'{"cmd": "migrate", "kind": 1, "from": 0, "to": 1, "kv_groups": 1}\n')
                except BrokenPipeError:
                    pass
                out = s.makefile("rb").readline().decode()
            except BaseException as e:  # noqa: BLE001
                out = f"child failed: {e!r}"
            os.write(write, out.encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        out = os.read(read, 65536).decode()
        os.close(read)
        assert json.loads(out) == {"ok": False, "error": "refused: the job belongs to uid 0, not 65534"}, out
        assert loop.applied == []
        assert ask(path, {"cmd": "status"})["ok"]  # its own user still gets in
    finally:
        loop.stop()
        listener.close()
        shutil.rmtree(folder)


def test_stale_socket_is_replaced_and_a_live_one_refused(tmp_path):
    path = str(tmp_path / "c.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: a job that died
    listener = Listener(path, state(), 10, 100)
    try:
        with pytest.raises(control.UserError, match="is served by another job"):
            Listener(path, state(), 10, 100)
        assert os.path.exists(path)  # the live one is left alone
    finally:
        listener.close()
    Path(path).write_text("not a socket")
    with pytest.raises(control.UserError, match="exists and is not a socket"):
        Listener(path, state(), 10, 100)


def garbage(rng):
    """One line of generated garbage: random bytes, broken JSON, or JSON of the wrong shapes and values."""
    values = [None, True, -1, 0, 1, 2, 3, 4, 2**70, 1.5, float("nan"), "", "x" * 300, "1:1:1", [], [1, 2, 3],
              [0, -1, 2], {}, {"a": [1]}, "next", "at"]
    keys = ["cmd", "kind", "from", "to", "kv_groups", "ffn_blocks", "ratios", "mode", "at", "id", "zzz"]
    choice = rng.randrange(5)
    if choice == 0:
        return bytes(rng.choice([b for b in range(256) if b != 10]) for _ in range(rng.randrange(1, 200))) + b"\n"
    if choice == 1:
        text = json.dumps({"cmd": "migrate", "kind": 1, "from": 0, "to": 1, "kv_groups": 1})
        return text[:rng.randrange(len(text))].encode() + b"\n"
    msg = {k: rng.choice(values) for k in rng.sample(keys, rng.randrange(1, len(keys)))}
    if choice >= 3:
        msg["cmd"] = rng.choice(["migrate", "status"])
    return (json.dumps(msg) + "\n").encode()


def fuzz(path, seed, n, stop_at=None, answered=None):
    """Throw `n` garbage lines at the socket, each on a fresh connection; every line gets a JSON reply. With
    `stop_at`, stop once it says so or the socket has gone (the job ended: then a line may go unanswered)."""
    rng = random.Random(seed)
    for _ in range(n):
        if stop_at is not None and stop_at():
            return
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        try:
            s.connect(path)
            line = garbage(rng)
            if rng.random() < 0.2:  # leave in the middle
                s.sendall(line[:max(1, len(line) // 2)])
                continue
            s.sendall(line)
            if not line.strip():  # a blank line is no request: nothing to wait for
                continue
            reply = s.makefile("rb").readline()
            if not reply:  # no answer: only where the job ends (its listener closes the connections it serves)
                deadline = time.monotonic() + 60
                while stop_at is not None and not stop_at() and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert stop_at is not None and stop_at(), f"no reply to {line!r}, and the job goes on"
                return
            assert isinstance(json.loads(reply)["ok"], bool)
            if answered is not None:
                answered.append(1)
        except (ConnectionError, FileNotFoundError):
            if stop_at is None:
                raise
            return
        finally:
            s.close()


def test_fuzz_never_breaks_the_listener(served, path):
    listener, loop = served
    errors = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args)
    try:
        threads = [threading.Thread(target=fuzz, args=(path, seed, 150)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        threading.excepthook = old_hook
    assert errors == []
    assert ask(path, {"cmd": "status"})["ok"]
    for _ in range(100):  # a fuzzed migration may still be waiting for its position
        if listener._pending is None:
            break
        time.sleep(0.05)
    plan = loop.plan
    assert sorted(j for s in plan for j in s.kv) == [0, 1, 2, 3]  # every applied plan was a whole one
    assert sorted(b for s in plan for b in s.ffn_blocks) == list(range(8))


def client(*args, env=None):
    return subprocess.run([sys.executable, "-m", "spmd.migrate", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_client_commands_and_errors(served, path, tmp_path):
    listener, loop = served
    p = client("--socket", path, "move", "--kind", "1", "--from", "0", "--to", "2", "--heads", "1", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["epoch"] == 1
    p = client("--socket", path, "ratios", "1:1:2", "--at", str(loop.pos + 1000), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["epoch"] == 2
    p = client("--socket", path, "move", "--kind", "1", "--from", "1", "--to", "0", "--heads", "5")
    assert p.returncode == 1 and p.stderr == "error: rank 1 has 1 KV-head group; cannot move 5\n"
    p = client("--socket", path, "ratios", "1*1:1", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["ratios"] == "1@1*1:1@3", p.stderr
    p = client("--socket", path, "layers", "--from-stage", "1", "--to-stage", "0", "--count", "2")
    assert p.returncode == 0 and loop.plan.text() == "1@3*1:1@1", p.stderr
    p = client("--socket", path, "layers", "--from-stage", "0", "--to-stage", "1", "--count", "3")
    assert p.returncode == 1 and p.stderr == ("error: stage 0 has 3 layers; it must keep at least one, so at most 2 "
                                              "can move\n")
    p = client("--socket", path, "move", "--kind", "1", "--from", "0", "--to", "1", "--heads", "1")
    assert p.returncode == 1 and "ranks 0 and 1 are in different stages" in p.stderr
    p = client("--socket", path, "move", "--kind", "2", "--from", "0", "--to", "1", "--ffn-columns", "40")
    assert p.returncode == 2 and "whole blocks of 32" in p.stderr
    p = client("--socket", str(tmp_path / "nobody.sock"), "status")
    assert p.returncode == 1 and p.stderr.startswith("error: cannot talk to ") and p.stderr.count("\n") == 1
    p = client("--socket", path, "--timeout", "nan", "status")  # was a ValueError's traceback
    assert p.returncode == 2 and "nan is not a finite number" in p.stderr and "Traceback" not in p.stderr
    # the default socket: the only live one in the per-user folder
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run")}
    p = client("status", env=env)
    assert p.returncode == 1 and "no running job has a control socket" in p.stderr
    os.makedirs(tmp_path / "run" / "spmd", mode=0o700)
    other = Listener(str(tmp_path / "run" / "spmd" / "control-1.sock"), state(), 10, 100)
    other_loop = Loop(other)
    try:
        p = client("status", env=env)
        assert p.returncode == 0 and p.stdout.startswith("position "), p.stderr
    finally:
        other_loop.stop()
        other.close()
    assert "Traceback" not in p.stderr


def test_client_prints_status_and_plans_readably(path):
    from spmd.migrate import show
    listener = Listener(path, state(), 10, 100)
    listener.close()
    plan = make_plan(parse_layout("1:1*1", 3), DIMS)
    ranks = [{**r, "compute_ms": 1.5, "sync_ms": 0.25} for r in plan.layout()]
    stages = [{**st, "compute_ms": 1.5, "sync_ms": 0.25} for st in plan.describe()]
    text = show({"ok": True, "position": 12, "epoch": 0, "ratios": plan.text(), "n_layers": 4, "stages": stages,
                 "ranks": ranks})
    lines = text.splitlines()
    assert lines[0] == "position 12, plan epoch 0, layout 1:1@3*1@1"
    assert lines[1] == "stage 0: layers 0-2 on ranks 0-1, 1.50 ms compute, 0.25 ms sync per token"
    assert lines[2] == "stage 1: layer 3 on rank 2, 1.50 ms compute, 0.25 ms sync per token"
    assert lines[4].split() == ["0", "0", "0-2", "4", "0-1", "128", "0-3", "-", "1.50", "0.25"]
    assert lines[6].split() == ["2", "1", "3", "8", "0-3", "256", "0-7", "0-511", "1.50", "0.25"]
    text = show({"ok": True, "epoch": 1, "applied_at": 30, "bytes_moved": 2_500_000, "ms": 12.25, "ratios": "1:1:2",
                 "stages": PLAN.describe(), "plan": PLAN.layout()})
    assert text.splitlines()[0] == "applied at position 30: plan epoch 1, 2.50 MB moved in 12.2 ms; layout now 1:1:2"
    assert text.splitlines()[3].split()[:3] == ["0", "0", "0-3"]  # rank 0, stage 0, layers 0-3


@pytest.mark.parametrize("args, message", [
    (["move", "--kind", "1", "--from", "0", "--to", "1", "--heads", "1.5"], "'1.5' is not a valid integer"),
    (["move", "--kind", "9", "--from", "0", "--to", "1", "--heads", "1"], "--kind"),
    (["launch"], "No such command 'launch'"),
])
def test_client_usage_mistake_is_one_line(args, message):
    p = subprocess.run([sys.executable, "-m", "spmd.migrate", *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr


def test_stale_sockets_of_dead_jobs_are_removed(tmp_path):
    folder = tmp_path / "spmd"
    control.make_private_dir(str(folder))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f"control-{int(dead.stdout)}.sock"  # a pid that has gone (and is not reused this soon)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    mine = Listener(str(folder / f"control-{os.getpid()}.sock"), state(), 10, 100)  # alive: kept
    other = folder / "notes.txt"
    other.write_text("not ours")
    try:
        control.remove_stale(str(folder))
        assert sorted(p.name for p in folder.iterdir()) == sorted([f"control-{os.getpid()}.sock", "notes.txt"])
    finally:
        mine.close()


def test_fuzzed_requests_get_one_line_replies():
    """3000 random requests (every command and field, values of every JSON type, unknown keys, bytes that are not
    JSON): each gets a reply object with `ok`, and a refusal's `error` is one line of at most 300 characters; a
    valid migration is queued (and answered here, so the next may come)."""
    rng = random.Random(5)
    values = [0, 1, 2, -1, 3, 10 ** 30, 0.5, float("nan"), "1:1:2", "", "x" * 500, [1, 2], [], {}, {"a": 1}, True,
              None, "next", "at", 12, [1, "a"], "1*1", "1:1@1*1@1"]
    keys = sorted(set().union(*control.FIELDS.values())) + ["extra", "cmd"]
    path = f"/tmp/spmd-test-fuzz-{os.getpid()}.sock"
    listener = Listener(path, state(), 10, 100)
    kinds = {"queued": 0, "refused": 0}
    try:
        for _ in range(3000):
            if rng.random() < 0.1:
                line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
            else:
                msg = {"cmd": rng.choice(["status", "migrate", "migrate", "nope", 7, ["status"]])}
                for key in rng.sample(keys, rng.randrange(0, 6)):
                    msg[key] = rng.choice(values)
                line = json.dumps(msg).encode()
            reply, request = listener.handle(line)
            if request is not None:
                kinds["queued"] += 1
                listener.finish(request, {"ok": True})
                continue
            kinds["refused"] += 1
            assert isinstance(reply, dict) and reply["ok"] is False, (line, reply)
            assert isinstance(reply["error"], str) and "\n" not in reply["error"] and len(reply["error"]) <= 300
    finally:
        listener.close()
    assert kinds["queued"] > 0 and kinds["refused"] > 0


def test_a_migration_whose_client_leaves_is_dropped(served, path):
    """Its client gives up (spmd.migrate --timeout, Ctrl-C) before the migration's position comes: the migration
    is dropped, so the next one is taken instead of refused as 'another migration is pending' until then."""
    listener, loop = served
    c = Connection(path, 10)
    c.send({"cmd": "migrate", "kind": 1, "from": 0, "to": 1, "kv_groups": 1, "at": 9000})  # (the last: 10000)
    for _ in range(500):
        if listener._pending is not None:
            break
        time.sleep(0.01)
    assert listener._pending is not None
    c.close()
    deadline = time.monotonic() + 10
    while listener._pending is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    reply = ask(path, {"cmd": "migrate", "kind": 2, "from": 0, "to": 1, "ffn_blocks": 1})
    assert reply["ok"] and loop.applied and loop.applied[-1][1] == 1, reply


def test_a_client_that_only_stops_writing_still_gets_its_reply(served, path):
    """A client may send its request and shut its writing side (`nc -N`, `socat`, a script's shutdown(SHUT_WR)):
    it is still there to read, so its migration is applied and answered, not taken for a client that left."""
    listener, loop = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        at = loop.pos + 300  # 1.5 s ahead or more: the connection looks for its client (CLIENT_LOOK_S) meanwhile
        s.sendall(json.dumps({"cmd": "migrate", "kind": 1, "from": 0, "to": 1, "kv_groups": 1, "at": at,
                              "id": "w"}).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            assert chunk, f"the connection closed without a reply (read {data!r})"
            data += chunk
    reply = json.loads(data)
    assert reply["ok"] and reply["id"] == "w" and reply["applied_at"] == at, reply
    assert loop.applied == [(at, 1)]

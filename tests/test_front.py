"""A supervised server (`spmd.launch --serve`, spmd.front): the HTTP side runs in the supervisor, so a client's
stream goes on through a lost rank, with the text an uninterrupted run gives; the protocol's supervisor side alone;
rank 0 lost ends the server with one line and an error at the end of each open stream."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from spmd.control import socket_dir
from spmd.synth import Shape, write_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = Shape(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn=128, vocab=512, context=96)
MPIRUN = shutil.which("mpirun")
STEPS = 40
GREEDY = [1, 5, 9, 22]
SEEDED = [1, 70, 3]
SERVING = re.compile(r"serving \S+ on (http://\S+) ")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", SHAPE, qtype="Q8_0", seed=3))


def reference(model, ranks, layout, ids, *extra):
    """What spmd.run says for the prompt `ids`, by plain mpirun: no supervisor, nothing lost."""
    p = subprocess.run([MPIRUN, "-n", str(ranks), sys.executable, "-m", "spmd.run", "--model", model, "--ratios",
                        layout, "--steps", str(STEPS), "--prompt-ids", ",".join(map(str, ids)), "--output", "json",
                        *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


class Launched:
    """`python -m spmd.launch --serve` running, its stderr gathered; `url` once it serves."""

    def __init__(self, model, ranks, layout, signals="", launch=(), env=None):
        env = dict(os.environ, SPMD_TEST_SIGNAL=signals, **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "spmd.launch", "-n", str(ranks), "--serve", *launch,
                                      "--", "--model", model, "--ratios", layout, "--port", "0"],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines, self.url = [], None
        self.gathering = threading.Thread(target=self._gather, daemon=True)
        self.gathering.start()
        deadline = time.monotonic() + 90
        while self.url is None and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.1)
        assert self.url, "".join(self.lines)

    def _gather(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            found = SERVING.search(line)
            if found:
                self.url = found.group(1)

    def stop(self, signum=signal.SIGINT):
        self.proc.send_signal(signum)
        return self.wait()

    def wait(self):
        """(exit status, stdout), with every line of stderr gathered."""
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.gathering.join(10)
        return self.proc.returncode, self.proc.stdout.read()


def post(url, body, timeout=120):
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def streamed(url, body):
    """(text, finish_reason, error) of a streamed completion, read as server-sent events."""
    text, finish, error = [], None, None
    with post(url, dict(body, stream=True)) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
                continue
            text.append(event["choices"][0]["text"])
            finish = event["choices"][0]["finish_reason"] or finish
    return "".join(text), finish, error


def ended(sock):
    """Whether the process a control socket is named for (control-PID.sock) has ended."""
    return not Path(f"/proc/{sock.stem.rpartition('-')[2]}").exists()


@pytest.mark.parametrize("ranks, layout, signals, after", [
    (3, "1:1:1", "2:14:KILL", "1:1"),  # tensor parallel
    (3, "1*1:1", "1:14:KILL", "1@1*1@3"),  # a rank of the second stage (which held 3 of the 4 layers)
    (3, "1:1:1", "2:10:STOP", "1:1"),  # a frozen rank: no progress, then it is found stopped
])
def test_a_clients_stream_goes_on_through_a_lost_rank(model, tmp_path, ranks, layout, signals, after):
    sockets = set(Path(socket_dir()).glob("control-*.sock"))
    want = reference(model, ranks, layout, GREEDY)["text"]
    want_seeded = reference(model, ranks, layout, SEEDED, "--temperature", "0.9", "--seed", "11")["text"]
    stop = "STOP" in signals
    server = Launched(model, ranks, layout, f"{signals}:{tmp_path / 'once'}",
                      ("--progress-timeout", "1" if stop else "20"))
    try:
        got = {}
        seeded = threading.Thread(target=lambda: got.update(seeded=json.load(post(server.url, {
            "prompt": SEEDED, "max_tokens": STEPS, "temperature": 0.9, "seed": 11}))))
        seeded.start()
        text, finish, error = streamed(server.url, {"prompt": GREEDY, "max_tokens": STEPS, "temperature": 0})
        seeded.join(120)
        assert error is None and finish == "length" and text == want
        assert got["seeded"]["choices"][0]["text"] == want_seeded
        with urllib.request.urlopen(server.url + "/cluster", timeout=30) as r:
            cluster = json.load(r)
        assert cluster["ratios"] == after and cluster["server"]["requests"] == 2  # both, though sent twice
        (recovery,) = cluster["recoveries"]
        rank = int(signals.split(":")[0])
        why = "stopped" if stop else "died (signal 9)"
        assert recovery["lost"] == [{"rank": rank, "host": "localhost", "why": why}]
        assert recovery["tokens_replayed"] > 0 and recovery["stall_s"] > 0
        # the server goes on serving on the survivors
        again = json.load(post(server.url, {"prompt": GREEDY, "max_tokens": 8, "temperature": 0}))
        assert again["usage"]["completion_tokens"] == 8
    finally:
        status, out = server.stop()
    err = "".join(server.lines)
    assert status == 0, err
    assert f"[spmd] rank {rank} (localhost) {why}" in err and "[spmd] served 3 requests, 88 tokens" in err
    assert "88 tokens in" in err and "; 1 recovery, " in err and "Traceback" not in err and out == ""
    # the killed job's rank 0's socket is removed too (one of a job running beside the test, alive, is its own)
    assert not {s for s in Path(socket_dir()).glob("control-*.sock") if s not in sockets and ended(s)}


def test_a_recovery_while_idle_stalls_only_until_the_relaunch_is_ready(model, tmp_path):
    """A rank lost while the server has no request (its heartbeat steps: the third): the recovery's stall ends
    when the relaunched job is ready, not when the next request's first token comes."""
    server = Launched(model, 3, "1:1:1", f"2:3:KILL:{tmp_path / 'once'}")
    try:
        deadline, recoveries = time.monotonic() + 60, []
        while time.monotonic() < deadline and not (recoveries and "stall_s" in recoveries[0]):
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(server.url + "/cluster", timeout=30) as r:
                    recoveries = json.load(r)["recoveries"]
            except urllib.error.HTTPError as e:  # 503 while the job relaunches
                assert e.code == 503
        time.sleep(3)  # idle after the relaunch
        again = json.load(post(server.url, {"prompt": GREEDY, "max_tokens": 4, "temperature": 0}))
        assert again["usage"]["completion_tokens"] == 4
        with urllib.request.urlopen(server.url + "/cluster", timeout=30) as r:
            (recovery,) = json.load(r)["recoveries"]
        assert recovery["stall_s"] <= recovery["detect_s"] + recovery["relaunch_s"] + 0.1, recovery
    finally:
        status, _ = server.stop()
    assert status == 0, "".join(server.lines)


def test_a_second_ctrl_c_stops_the_server_at_once(model, tmp_path):
    """The first Ctrl-C lets the answer under way finish; a second one ends everything at once: exit 130, no
    MPICH lines, no process left."""
    mark = tmp_path / "mark.gguf"
    shutil.copyfile(model, mark)  # a path no other test's ranks have in their command lines
    server = Launched(str(mark), 3, "1:1:1", env={"SPMD_TEST_SLOW": "0:200"})
    client = threading.Thread(target=lambda: streamed(server.url, {"prompt": GREEDY, "max_tokens": 80,
                                                                   "temperature": 0}), daemon=True)
    client.start()
    deadline = time.monotonic() + 60
    while not in_flight(server):  # (a first Ctrl-C with no answer under way ends the server cleanly: exit 0)
        assert time.monotonic() < deadline and client.is_alive(), "the answer never got under way"
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGINT)
    status, out = server.wait()
    err = "".join(server.lines)
    assert status == 130 and out == "", err
    assert "[proxy" not in err and "[mpiexec" not in err and "Traceback" not in err, err
    deadline = time.monotonic() + 10
    while True:  # (the job's processes end a moment after the launcher)
        left = subprocess.run(["pgrep", "-f", str(mark)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    subprocess.run(["pkill", "-9", "-f", str(mark)])
    assert left == [], "processes of the job left running"


def in_flight(server):
    """The requests the server is answering now (its /cluster page)."""
    with urllib.request.urlopen(server.url + "/cluster", timeout=30) as r:
        return json.load(r)["server"]["in_flight"]


def test_rank_0_lost_ends_the_server_with_one_line_and_the_stream_says_so(model, tmp_path):
    server = Launched(model, 3, "1:1:1", f"0:14:KILL:{tmp_path / 'once'}")
    text, finish, error = streamed(server.url, {"prompt": GREEDY, "max_tokens": STEPS, "temperature": 0})
    assert error and finish is None
    assert server.wait()[0] != 0
    err = "".join(server.lines)
    assert "error: rank 0 (localhost) died (signal 9): it drives every sequence, so the server ends here" in err
    assert "Traceback" not in err


# ---- the supervisor's side alone ----------------------------------------------------------------------------------
class Sink:
    def __init__(self):
        self.events, self.cancelled = [], False

    def piece(self, text, n):
        self.events.append(("piece", text, n))

    def done(self, finish, n):
        self.events.append(("done", finish, n))


def test_the_front_sends_requests_again_after_a_relaunch(model):
    import numpy as np

    from spmd.front import Front
    from spmd.prompts import PromptSpec, Work
    logged = []
    front = Front("127.0.0.1", 0, "m", 4, (), logged.append)
    try:
        ready = {"ev": "ready", "model": model, "tokenizer": None, "context": 96, "n_known": 512, "slots": 2}
        a, b = Sink(), Sink()
        front.inbox.put(Work(1, np.array([1, 5], np.int64), 10, PromptSpec(ids=(1, 5), steps=10, seed=3)), a)
        statuses = []
        front.inbox.ask_status(statuses.append)
        assert front.lines(False) == b"" and statuses == [None]  # no job yet: the request waits
        front.ready(ready, 3)
        assert "serving m on http://127.0.0.1:" in logged[-1]
        (line,) = [json.loads(x) for x in front.lines(True).splitlines()]
        assert line == {"ev": "work", "seq": 1, "ids": [1, 5], "steps": 10, "temperature": None, "top_k": None,
                        "top_p": None, "seed": 3, "resume": None}
        front.inbox.put(Work(2, np.array([1], np.int64), 5, PromptSpec(ids=(1,), steps=5)), b)
        assert [json.loads(x)["seq"] for x in front.lines(True).splitlines()] == [2]
        front.apply({"ev": "token", "seq": 1, "token": 7, "end": None, "rng": {"s": 1}, "out": "Hi"})
        front.apply({"ev": "token", "seq": 2, "token": 8, "end": None, "rng": None, "out": ""})
        front.apply({"ev": "token", "seq": 1, "token": 9, "end": None, "rng": {"s": 2}, "out": " there"})
        assert a.events == [("piece", "Hi", 1), ("piece", " there", 2)] and b.events == []
        b.cancelled = True  # its client went away
        assert [json.loads(x) for x in front.lines(True).splitlines()] == [{"ev": "cancel", "seq": 2}]
        front.lost()  # the job failed; a relaunched one has loaded
        front.ready(ready, 2)
        (line,) = [json.loads(x) for x in front.lines(True).splitlines()]
        assert line["seq"] == 1 and line["resume"] == {"tokens": [7, 9], "rng": {"s": 2}, "finish": None}
        front.apply({"ev": "token", "seq": 1, "token": None, "end": "eos", "rng": {"s": 3}, "out": "!"})
        assert a.events[-2:] == [("piece", "!", 2), ("done", "eos", 2)] and not front.busy
        front.inbox.ask_status(statuses.append)
        (ask,) = [json.loads(x) for x in front.lines(True).splitlines()]
        front.apply({"ev": "status", "id": ask["id"], "status": {"ok": True}})
        assert statuses[-1] == {"ok": True, "recoveries": [], "server": {"requests": 2, "tokens_generated": 3}}
    finally:
        front.close()

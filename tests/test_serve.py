"""spmd.serve as its users meet it: the real `openai` client against a real server at 1 and 3 ranks (subprocesses
under mpirun), checked against spmd.run's greedy output for the same tokens; the stream's shape, stop strings,
concurrent clients, a client that leaves, the 400/429 paths, a clean exit on SIGTERM; and spmd.chat."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import jinja2
import openai
import pytest

from spmd.gguf_file import GGUFFile
from spmd.synth import Shape, write_model
from spmd.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun")
SHAPE = Shape(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn=128, vocab=512, context=512)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% elif m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
            "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
PROMPTS = ["Once upon a time", "The quick brown fox", "Hello world the cat sat"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("serve") / "chat.gguf", SHAPE, qtype="Q8_0", seed=3,
                       chat_template=TEMPLATE)


class Served:
    """A running `[mpirun -n N] python -m spmd.serve` on a free port; `stop()` sends SIGTERM and returns the exit
    status (every rank gone)."""

    def __init__(self, model, ranks=1, extra=(), env=None):
        self.ranks = ranks
        cmd = [sys.executable, "-m", "spmd.serve", "--model", str(model), "--port", "0", "--threads", "1", *extra]
        if ranks > 1:
            cmd = [MPIRUN, "-n", str(ranks), *cmd]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self.lines, found = [], threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                if " on http://" in line:
                    found.set()
            found.set()
        threading.Thread(target=read, daemon=True).start()
        found.wait(120)
        match = next((re.search(r"on (http://\S+)", s) for s in self.lines if " on http://" in s), None)
        if match is None:
            self.proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        self.url = match.group(1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self, timeout=60):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, json.loads(r.read())

    def post(self, path, body, raw=None):
        """(status, parsed JSON body, headers) of a POST, errors included."""
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), e.headers


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_a_terminals_ctrl_c_under_mpirun_stops_the_server_cleanly(model):
    """Ctrl-C in a terminal signals the whole process group, and mpiexec forwards it to the ranks as well, so rank 0
    gets it twice within moments: that is one stop (every rank exits 0, the summary line, no socket file left), not
    the second signal's stop at once (which left the control socket and MPICH's shared memory, exit 255)."""
    from spmd.control import socket_dir
    before = set(os.listdir(socket_dir())) if os.path.isdir(socket_dir()) else set()
    server = Served(model, 2)
    assert server.post("/v1/completions", {"prompt": "hello", "max_tokens": 3, "temperature": 0})[0] == 200
    os.killpg(server.proc.pid, signal.SIGINT)
    try:
        assert server.proc.wait(60) == 0, "".join(server.lines)
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
    text = "".join(server.lines)
    assert "[spmd] served 1 request" in text and "Traceback" not in text, text
    assert set(os.listdir(socket_dir())) <= before


@pytest.fixture(scope="module", params=[1, 3], ids=["1rank", "3ranks"])
def served(request, model):
    if request.param > 1 and MPIRUN is None:
        pytest.skip("no mpirun")
    extra = ("--ratios", "1:1*1") if request.param == 3 else ()
    server = Served(model, request.param, extra)
    yield server
    assert server.stop() == 0, "".join(server.lines)
    assert "Traceback" not in "".join(server.lines)


def run_greedy(model, steps, prompt=None, ids=None):
    """spmd.run's greedy result (one rank) for a prompt text or token ids."""
    args = ["--prompt", prompt] if ids is None else ["--prompt-ids", ",".join(map(str, ids))]
    p = subprocess.run([sys.executable, "-m", "spmd.run", "--model", str(model), *args, "--steps", str(steps),
                        "--output", "json", "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def finish_of(r, steps):
    return "length" if len(r["tokens"]) == steps else "stop"


def test_completion_is_spmd_run_greedy(served, model):
    for prompt in PROMPTS[:2]:
        want = run_greedy(model, 12, prompt)
        got = served.client.completions.create(model="any", prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want["text"]
        assert got.choices[0].finish_reason == finish_of(want, 12)
        assert got.usage.prompt_tokens == len(want["prompt_tokens"])
        assert got.usage.completion_tokens == len(want["tokens"])
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_chat_uses_the_files_template(served, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Once upon a time"}]
    template = jinja2.Environment().from_string(TEMPLATE)
    text = template.render(messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    tok = load_tokenizer(GGUFFile(model))
    ids = [1] + tok.encode(text[len("<s>"):], add_bos=False)  # "<s>" is BOS, once; the rest is text
    want = run_greedy(model, 10, ids=ids)
    got = served.client.chat.completions.create(model="any", messages=messages, max_tokens=10, temperature=0)
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].message.role == "assistant"
    assert want["text"].startswith(" ")  # (the greedy answer's first word, "▁...": what the check below needs)
    assert got.choices[0].message.content == want["text"][1:]  # a chat answer drops it; a completion keeps it
    assert got.usage.completion_tokens == len(want["tokens"])


def test_stream_shape(served):
    messages = [{"role": "user", "content": "The quick brown fox"}]
    whole = served.client.chat.completions.create(model="any", messages=messages, max_tokens=9, temperature=0)
    chunks = list(served.client.chat.completions.create(model="any", messages=messages, max_tokens=9,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and not first.delta.content and first.finish_reason is None
    *middle, last_choice, usage = chunks[1:]
    assert all(c.choices[0].finish_reason is None and c.choices[0].delta.content for c in middle)
    assert "".join(c.choices[0].delta.content for c in middle) == whole.choices[0].message.content
    assert last_choice.choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage.choices == [] and usage.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(served.client.completions.create(model="any", prompt="The quick", max_tokens=5, temperature=0,
                                                  stream=True))
    assert plain[-1].choices[0].finish_reason in ("stop", "length") and all(c.usage is None for c in plain)


def test_raw_stream_ends_with_done(served):
    req = urllib.request.Request(served.url + "/v1/completions", data=json.dumps(
        {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings_are_cut(served, model):
    want = run_greedy(model, 24, PROMPTS[0])["text"]
    assert len(want) > 12
    stop = want[5:9]  # inside the text, likely across tokens
    cut = want[:want.index(stop)]
    for stream in (False, True):
        r = served.client.completions.create(model="any", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                             stop=[stop, "never-there"], stream=stream)
        if stream:
            chunks = list(r)
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == cut and finish == "stop"


def test_concurrent_clients_get_their_own_answers(served, model):
    wants = {p: run_greedy(model, 16, p)["text"] for p in PROMPTS}
    got = {}

    def ask(p):
        got[p] = served.client.completions.create(model="any", prompt=p, max_tokens=16, temperature=0).choices[0].text
    threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == wants


def test_seeded_sampling_repeats(served):
    ask = lambda: served.client.completions.create(model="any", prompt="The cat", max_tokens=12,  # noqa: E731
                                                   temperature=0.9, top_p=0.95, seed=42).choices[0].text
    assert ask() == ask()


def test_bad_requests(served):
    cases = [(b"{not json", None), (b"[1, 2]", None), (b'{"prompt": "\\ud800"}', None),
             (b'{"prompt": "x", "max_tokens": 2, "stream_options": {"include_usage": true}}', None)]
    for raw, _ in cases:
        status, body, _h = served.post("/v1/completions", None, raw=raw)
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
    for path, body, param in [
            ("/v1/chat/completions", {"messages": []}, "messages"),
            ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
            ("/v1/completions", {"prompt": "x", "temperature": 5}, "temperature"),
            ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
            ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
            ("/v1/completions", {"prompt": "x", "stop": ["a"] * 40}, "stop"),
            ("/v1/completions", {"prompt": "x", "logprobs": 3}, "logprobs"),
            ("/v1/completions", {"prompt": [1, 99999]}, "prompt"),
            ("/v1/completions", {"prompt": "the " * 600}, "prompt"),
            ("/v1/completions", {"prompt": "x", "seed": 10**400}, "seed"),
            ("/v1/completions", {"prompt": "x", "max_tokens": 10**400}, "max_tokens"),
            ("/v1/completions", {"prompt": "a " * 1_500_000}, "prompt")]:
        status, reply, _h = served.post(path, body)
        assert status == 400, (body, reply)
        assert reply["error"]["param"] == param and reply["error"]["message"]
    status, reply, _h = served.post("/v1/completions", None, raw=b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in reply["error"]["message"]
    status, reply, _h = served.post("/v1/completions", None, raw=b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}')
    assert status == 413 and "larger than" in reply["error"]["message"]
    status, reply, _h = served.post("/v1/completions", {"prompt": "x", "max_tokens": 2, "max_completion_tokens": None})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 2  # null: not given
    status, reply, _h = served.post("/v1/completions", {"prompt": None, "max_tokens": 2, "stop": None})
    assert status == 200 and reply["usage"]["prompt_tokens"] == 1  # (BOS alone, as with no prompt)
    req = urllib.request.Request(served.url + "/v1/completions", data=b"not gzip",
                                 headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400
    status, models = served.get("/v1/models")
    assert status == 200 and models["data"][0]["id"] == "chat.gguf"
    assert not [line for line in served.lines if "Unhandled" in line or "Traceback" in line]  # (the client's bytes)


def test_cluster_status(served):
    status, s = served.get("/cluster")
    assert status == 200 and s["ok"] and s["model"] == "chat.gguf"
    assert len(s["ranks"]) == served.ranks and len(s["stages"]) == (2 if served.ranks == 3 else 1)
    assert {"host", "compute_ms", "sync_ms", "layers"} <= set(s["ranks"][0])
    assert s["server"]["slots"] == 4 and s["server"]["in_flight"] == 0


# ---- one server each: slow, full, stopped ------------------------------------------------------------------------
SLOW = {"SPMD_TEST_SLOW": "0:200"}  # rank 0 computes 200x slower: an answer of many tokens takes many seconds


def test_a_client_that_leaves_frees_its_sequence(model):
    server = Served(model, 1, ("--sequences", "1"), env=SLOW)
    try:
        stream = server.client.completions.create(model="any", prompt="Once", max_tokens=400, temperature=0,
                                                  stream=True)
        for i, _chunk in enumerate(stream):
            if i == 3:
                break
        stream.close()
        left = time.perf_counter()
        while server.get("/cluster")[1]["server"]["in_flight"]:
            assert time.perf_counter() - left < 10, "the sequence of a client that left is still generating"
            time.sleep(0.05)
        generated = server.get("/cluster")[1]["server"]["tokens_generated"]
        assert generated < 60  # far from its 400
        t = time.perf_counter()
        r = server.client.completions.create(model="any", prompt="The", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1 and time.perf_counter() - t < 30
    finally:
        assert server.stop() == 0, "".join(server.lines)


def test_a_full_queue_answers_429(model):
    server = Served(model, 1, ("--sequences", "1", "--queue", "0"), env=SLOW)
    try:
        first = server.client.completions.create(model="any", prompt="Once", max_tokens=300, temperature=0,
                                                 stream=True)
        next(iter(first))
        status, body, headers = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 429 and body["error"]["type"] == "rate_limit_error" and int(headers["Retry-After"]) >= 1
        first.close()
    finally:
        assert server.stop() == 0, "".join(server.lines)


def answer_in_flight(server):
    """A long greedy completion asked on a thread, returned once the server is generating it (a stop then lands
    while it answers, however fast the host): (the thread, {"r": its reply} or {"e": its APIError} once done)."""
    got = {}

    def ask():
        try:
            got["r"] = server.client.completions.create(model="any", prompt="Once", max_tokens=400, temperature=0)
        except openai.APIError as e:
            got["e"] = e
    t = threading.Thread(target=ask)
    t.start()
    deadline = time.perf_counter() + 60
    while not server.get("/cluster")[1]["server"]["in_flight"]:
        assert time.perf_counter() < deadline and not got, got
        time.sleep(0.05)
    return t, got


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_sigterm_mid_answer_stops_every_rank(model, tmp_path):
    sock = tmp_path / "c.sock"
    server = Served(model, 3, ("--ratios", "1*1:1", "--control-socket", sock), env=SLOW)
    t, got = answer_in_flight(server)
    started = time.perf_counter()
    assert server.stop() == 0, "".join(server.lines)
    assert time.perf_counter() - started < 30
    t.join(30)
    assert "e" in got and getattr(got["e"], "status_code", None) == 503  # an unfinished answer is not a success
    assert not sock.exists()
    assert "[spmd] served 1 request," in "".join(server.lines)


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_sigterm_to_one_rank_alone_stops_the_server_as_rank_0s_would(model, tmp_path):
    """A SIGTERM that reaches only rank 2 (its host shutting down): rank 0 is asked to stop, so the answer in flight
    ends with a 503 within seconds (it waited STOP_GRACE_S, 20 s, and the socket file stayed) and every rank exits."""
    from mpi_models import rank_pid
    sock = tmp_path / "c.sock"
    server = Served(model, 3, ("--ratios", "1*1:1", "--control-socket", sock), env=SLOW)
    t, got = answer_in_flight(server)
    started = time.perf_counter()
    os.kill(rank_pid(str(sock), 2), signal.SIGTERM)
    assert server.proc.wait(30) == 0, "".join(server.lines)
    assert time.perf_counter() - started < 10
    t.join(30)
    assert "e" in got and getattr(got["e"], "status_code", None) == 503
    assert not sock.exists()
    assert "note: rank 2 was stopped (SIGTERM): stopping the job\n" in server.lines, "".join(server.lines)


def test_rank_0s_first_signal_after_another_ranks_ask_is_not_a_second_one():
    """Rank 0 of a server: another rank's ask (its signal came first: mpirun passes a signal on to the ranks one by
    one, late on a loaded machine) closes the inbox without a signal of rank 0's own; rank 0's own signal after it
    is its first (the answers in flight end cleanly), and only its own second stops at once (it had stopped at once,
    so the job ended by MPI_Abort and the launcher said 137 where a clean stop says 0)."""
    from types import SimpleNamespace

    from spmd.api import Inbox
    from spmd.serve import stop_on_signals
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    comm, inbox = SimpleNamespace(is_root=True, on_stop_asked=None), Inbox()
    try:
        stop_on_signals(comm, inbox)
        handler = signal.getsignal(signal.SIGTERM)
        comm.on_stop_asked(signal.SIGTERM)  # another rank's ask
        assert inbox.closed
        try:
            handler(signal.SIGTERM, None)  # rank 0's own first signal
        except KeyboardInterrupt:
            pytest.fail("rank 0's first own signal stopped the server at once")
        with pytest.raises(KeyboardInterrupt):  # its second
            handler(signal.SIGTERM, None)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_port_in_use_is_one_line(model):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "spmd.serve", "--model", str(model), "--port", str(port)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("host", ["", " "])
def test_an_empty_host_is_refused_not_every_interface(host):
    p = subprocess.run([sys.executable, "-m", "spmd.serve", "--host", host], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("error: Invalid value for '--host': give an address"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_chat_cli(served):
    want = served.client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hello"}],
                                                 max_tokens=8, temperature=0).choices[0].message.content
    p = subprocess.run([sys.executable, "-m", "spmd.chat", "--url", served.url, "--temperature", "0",
                        "--max-tokens", "8"], input="Hello\n/rest\n/reset\nHello\n/quit\n", cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{want}\n{want}\n"  # the same answer again after /reset forgot the first turn
    assert "chatting with chat.gguf" in p.stderr and "(conversation forgotten)" in p.stderr
    assert "(no command /rest: /reset forgets" in p.stderr  # (a mistyped command was sent as a turn)


def test_the_chat_takes_bytes_that_are_not_utf8_and_ends_1_where_a_turn_failed(served):
    """Input in another encoding (a Latin-1 terminal) is chatted with, U+FFFD for what is not UTF-8, as an OpenAI
    client's base URL (/v1) is taken; a turn the server refuses (a prompt longer than its context) is said on
    stderr, not among the answers, and a piped chat ends 1."""
    want = served.client.chat.completions.create(model="any", messages=[{"role": "user", "content": "caf\ufffd"}],
                                                 max_tokens=8, temperature=0).choices[0].message.content
    chat = [sys.executable, "-m", "spmd.chat", "--url", served.url + "/v1", "--temperature", "0", "--max-tokens", "8"]
    p = subprocess.run(chat, input=b"caf\xe9\n", cwd=ROOT, capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})  # (as in en_US.UTF-8: not C's)
    assert p.returncode == 0 and p.stdout.decode() == f"{want}\n", p.stderr.decode()
    p = subprocess.run(chat, input="word " * 3000 + "\n", cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == "" and "[error: " in p.stderr, p.stderr


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_the_chat_under_mpirun_is_one_line():
    """spmd.chat is a client: several of it under mpirun (each would read stdin and start a server) is refused in
    one line from rank 0, every rank ending 2 (rank 1 used to wait for ever on its stdin)."""
    p = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-m", "spmd.chat"], input="Hello\n", cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "", p.stderr
    assert [line for line in p.stderr.splitlines() if line.startswith("error")] == [
        "error: spmd.chat is a client of a server: run it without mpirun (python -m spmd.chat); the ranks run "
        "python -m spmd.serve"], p.stderr


def test_the_chat_waits_for_a_server_that_is_loading():
    """/health answering 503 (spmd.serve before its model is in): the chat says so once and waits for the 200,
    where it used to send every turn into 503s."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from spmd.chat import wait_loaded
    asked = []

    class Loading(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(503 if len(asked) < 3 else 200)
            self.end_headers()

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Loading)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_loaded(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=30)
    finally:
        server.shutdown()
    assert asked == ["/health"] * 3


def test_the_chat_says_where_no_server_answers():
    """A --url that is no address, or where nothing listens (with --model too, which used to skip the check and
    chat on with an error a turn): one line, exit 1 or 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # (closed below: nothing listens there)
    for args, status, said in [(["--url", "notaurl"], 2, "is not an http:// or https:// address"),
                               (["--url", "http://127.0.0.1:abc"], 2, "is not an http:// or https:// address"),
                               (["--url", "http://[::1"], 2, "is not an http:// or https:// address"),
                               (["--model", "no-such-file.gguf", "--url", f"http://127.0.0.1:{free}"], 1,
                                "no server answers at"),
                               (["--url", f"http://127.0.0.1:{free}", "--model", "m"], 1, "no server answers at")]:
        p = subprocess.run([sys.executable, "-m", "spmd.chat", *args], input="Hello\n", cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == status and p.stdout == "" and len(p.stderr.splitlines()) == 1, p.stderr
        assert said in p.stderr


MODELS = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x"}]})


@pytest.mark.parametrize("models, answer, said", [
    ("<html>My app</html>", "<html>My app</html>", "is not an OpenAI-compatible server"),  # another web app
    ("[]", "", "is not an OpenAI-compatible server"),
    ('{"data": "x"}', "", "is not an OpenAI-compatible server"),
    (None, "", "is not an OpenAI-compatible server: GET /v1/models answered 404"),  # a plain web server
    (MODELS, "data: {not json}\n\n", "[error: the answer is not an OpenAI chat stream"),
    (MODELS, "data: [1, 2]\n\n", "[error: the answer is not an OpenAI chat stream"),
    (MODELS, '{"id": "x", "object": "chat.completion", "choices": []}', "[error: the answer ended without a finish"),
])
def test_the_chat_with_a_server_that_is_not_openai_compatible_says_so_in_a_line(models, answer, said):
    """A --url of something else (a web app on that port, a server of another protocol): one line and exit 1, where
    the client's parsing used to end in a traceback, or a 200 that was no stream in an empty answer and exit 0."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Other(BaseHTTPRequestHandler):
        def reply(self, body, kind):
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if models is None:
                self.send_error(404)
                return
            self.reply(models, "text/html" if models.startswith("<") else "application/json")

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.reply(answer, "text/html" if answer.startswith("<") else
                       "text/event-stream" if answer.startswith("data:") else "application/json")

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        p = subprocess.run([sys.executable, "-m", "spmd.chat", "--url", f"http://127.0.0.1:{server.server_address[1]}"],
                           input="Hello\n", cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert [line for line in p.stderr.splitlines() if said in line], p.stderr
    if said.startswith("is not"):
        assert len(p.stderr.splitlines()) == 1, p.stderr


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_live_migrations_while_serving_keep_the_text(model, tmp_path):
    """Two streamed answers in flight while the layout changes twice (a new split, then a move of layers between
    stages) over the control socket: both equal spmd.run's greedy text."""
    wants = {p: run_greedy(model, 100, p)["text"] for p in PROMPTS[:2]}
    sock = tmp_path / "c.sock"
    server = Served(model, 3, ("--ratios", "1:1*1", "--control-socket", sock), env={"SPMD_TEST_SLOW": "0:60"})
    got = {}

    def ask(p):
        got[p] = "".join(c.choices[0].text for c in server.client.completions.create(
            model="any", prompt=p, max_tokens=100, temperature=0, stream=True))
    try:
        threads = [threading.Thread(target=ask, args=(p,)) for p in wants]
        for t in threads:
            t.start()
        for args in (["ratios", "2:1*1"], ["layers", "--from-stage", "0", "--to-stage", "1", "--count", "1"]):
            time.sleep(0.4)
            p = subprocess.run([sys.executable, "-m", "spmd.migrate", "--socket", str(sock), "--json", *args],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert p.returncode == 0 and json.loads(p.stdout)["ok"], p.stdout + p.stderr
        for t in threads:
            t.join(120)
        assert got == wants
        status = server.get("/cluster")[1]
        assert status["epoch"] == 2 and [m["by"] for m in status["migrations"]] == ["migrate", "migrate"]
        assert all(m["applied_at"] < 200 for m in status["migrations"])  # while the answers were generated
    finally:
        assert server.stop() == 0, "".join(server.lines)


def test_ctrl_c_in_the_chat_stops_the_answer_not_the_program(model):
    server = Served(model, 1, ("--sequences", "1"), env=SLOW)
    try:
        chat = subprocess.Popen([sys.executable, "-m", "spmd.chat", "--url", server.url, "--temperature", "0",
                                 "--max-tokens", "60"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        chat.stdin.write("Once upon a time\n")
        chat.stdin.flush()
        deadline = time.perf_counter() + 60
        while server.get("/cluster")[1]["server"]["tokens_generated"] < 3:
            assert time.perf_counter() < deadline
            time.sleep(0.1)
        chat.send_signal(signal.SIGINT)
        stopped = time.perf_counter()
        while server.get("/cluster")[1]["server"]["in_flight"]:
            assert time.perf_counter() - stopped < 10, "the stopped answer is still generating"
            time.sleep(0.05)
        out, err = chat.communicate("Hello\n/quit\n", timeout=120)
        assert chat.returncode == 0, err
        first, second = out.split("\n")[:2]
        assert first.endswith(" [stopped]") and second  # then the next question was answered
        assert server.get("/cluster")[1]["server"]["requests"] == 2
    finally:
        assert server.stop() == 0, "".join(server.lines)


def test_fuzzed_requests_get_json_answers(served):
    """Random values of every field (types and ranges), bounded in number: each answer is 200 or a 4xx with an
    OpenAI-style error object, never a 500, and the server stays healthy."""
    import random
    rng = random.Random(11)
    values = [None, True, False, 0, -1, 1, 2, 3.5, -0.0, 1e308, 2**70, "", "x", "stop", [], [1], ["a"], [[]], {},
              {"role": "user"}, {"include_usage": True}, [{"role": "user", "content": "hi"}],
              [{"role": "user", "content": [{"type": "text", "text": "a"}]}], [{"role": "user", "content": 5}]]
    fields = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
              "stop", "n", "stream", "stream_options", "logprobs", "frequency_penalty", "model", "echo"]
    for i in range(120):
        body = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, 6))}
        if body.get("max_tokens") is None or rng.random() < 0.5:
            body["max_tokens"] = 2  # short answers: the fuzz is of the checks, not of generation
        body["stream"] = False
        path = "/v1/chat/completions" if i % 2 else "/v1/completions"
        status, reply, _h = served.post(path, body)
        assert status in (200, 400), (path, body, status, reply)
        assert ("choices" in reply) if status == 200 else reply["error"]["message"], (body, reply)
    assert served.get("/health") == (200, {"status": "ok"})

"""The model that ships with spmd (spmd/embedded.gguf, made by scripts/train_embedded.py): used when --model is
omitted (and said so), within 16 MB with its vocabulary, licence and chat template; its greedy tokens equal the
independent numpy reference at 1 rank and at 3 (2:3:3); it writes sentences; a chat with it ends by itself."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reference
from mpi_models import no_new_shm_files, shm_files
from spmd.gguf_file import GGUFFile
from spmd.run import EMBEDDED_MODEL
from spmd.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun")
PROMPT = "The for statement"


def run_default(ranks, *args):
    cmd = [sys.executable, "-m", "spmd.run", "--prompt", PROMPT, "--steps", "24", "--threads", "1",
           "--output", "json", *args]
    if ranks > 1:
        cmd = [MPIRUN, "-n", str(ranks), *cmd]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), p.stderr


def test_the_file():
    assert os.path.getsize(EMBEDDED_MODEL) <= 16 * 10**6
    f = GGUFFile(EMBEDDED_MODEL)
    assert f.meta("general.license") == "PSF-2.0" and "Python" in f.meta("general.description")
    assert "Assistant:" in f.meta("tokenizer.chat_template")
    assert load_tokenizer(f).vocab_size == 4096


@pytest.fixture(scope="module")
def want():
    ids = load_tokenizer(GGUFFile(EMBEDDED_MODEL)).encode(PROMPT)
    return ids, reference.greedy(EMBEDDED_MODEL, ids, 24)


def test_default_model_equals_the_reference(want):
    ids, tokens = want
    r, err = run_default(1)
    assert f"no --model given: using the embedded model {EMBEDDED_MODEL}" in err
    assert r["prompt_tokens"] == ids
    assert r["tokens"] == tokens[:len(r["tokens"])] and (len(r["tokens"]) == 24 or r["finish"] == "eos")
    words = r["text"].split()
    assert len(words) >= 10 and sum(bool(re.fullmatch(r"[A-Za-z_.,()'`:]+", w)) for w in words) >= 0.8 * len(words)


def test_a_job_resumed_after_a_recovery_does_not_note_the_embedded_model_again():
    from spmd.run import model_or_embedded
    first, resumed = {"model": None}, {"model": None, "resume": "resume.json"}
    assert model_or_embedded(first) is not None and model_or_embedded(resumed) is None
    assert first["model"] == resumed["model"] == EMBEDDED_MODEL


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_three_ranks_give_the_same_tokens(want):
    r, _ = run_default(3, "--ratios", "2:3:3")
    assert r["tokens"] == want[1][:len(r["tokens"])]


def test_a_chat_with_it_ends_by_itself():
    from test_serve import Served
    server = Served(EMBEDDED_MODEL)
    try:
        r = server.client.chat.completions.create(model="any", temperature=0, max_tokens=200,
                                                  messages=[{"role": "user", "content": "How do I copy a file?"}])
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 200
        assert "shutil" in r.choices[0].message.content
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("given", [False, True])
def test_spmd_chat_starts_its_own_server_when_none_answers(given):
    """Of the embedded model, or of --model FILE (it used to serve the embedded model under the file's name)."""
    import socket
    from spmd.chat import DEFAULT_URL, answers
    host, port = DEFAULT_URL.split("//")[1].split(":")
    with socket.socket() as s:
        if s.connect_ex((host, int(port))) == 0 or answers(DEFAULT_URL):
            pytest.skip(f"something listens at {DEFAULT_URL}")
    p = subprocess.run([sys.executable, "-m", "spmd.chat", "--temperature", "0", "--max-tokens", "40",
                        *(["--model", EMBEDDED_MODEL] if given else [])],
                       input="How do I copy a file?\n", cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"starting one of {EMBEDDED_MODEL if given else 'the embedded model'}" in p.stderr, p.stderr
    assert "chatting with embedded.gguf" in p.stderr
    assert "shutil" in p.stdout


def test_the_chat_passes_on_why_the_server_it_started_failed(tmp_path):
    """A model whose logits are not finite: the server the chat started says why it stops, and the chat passes that
    line on (it used to say only that the server stopped)."""
    import socket
    from spmd.chat import DEFAULT_URL, answers
    from test_cli import nan_tensor
    host, port = DEFAULT_URL.split("//")[1].split(":")
    with socket.socket() as s:
        if s.connect_ex((host, int(port))) == 0 or answers(DEFAULT_URL):
            pytest.skip(f"something listens at {DEFAULT_URL}")
    broken = nan_tensor(EMBEDDED_MODEL, tmp_path / "nan.gguf", "output_norm.weight")
    p = subprocess.run([sys.executable, "-m", "spmd.chat", "--model", str(broken), "--temperature", "0"],
                       input="Hello\n", cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert re.search(r"^\(the server started for this chat said: error: .*not finite", p.stderr, re.M), p.stderr


@pytest.mark.parametrize("signum, after", [(signal.SIGINT, "note: no server"), (signal.SIGTERM, "chatting with")])
def test_a_chat_stopped_stops_the_server_it_started(signum, after):
    """Ctrl-C while the chat starts its server, or SIGTERM once it chats: the server it started ends too, and leaves
    no shared memory (it was left running, or killed mid-start)."""
    import socket
    from spmd.chat import DEFAULT_URL, answers
    host, port = DEFAULT_URL.split("//")[1].split(":")
    with socket.socket() as s:
        if s.connect_ex((host, int(port))) == 0 or answers(DEFAULT_URL):
            pytest.skip(f"something listens at {DEFAULT_URL}")
    before = shm_files()
    chat = subprocess.Popen([sys.executable, "-m", "spmd.chat"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        said = ""
        while after not in said:
            line = chat.stderr.readline()
            assert line, said
            said += line
        children, deadline = [], time.monotonic() + 30  # (the note comes just before the server is started)
        while not children and time.monotonic() < deadline:
            children = [int(p) for p in os.listdir("/proc") if p.isdigit() and parent_of(p) == chat.pid]
            time.sleep(0.02)
        chat.send_signal(signum)
        chat.wait(90)
    finally:
        chat.kill()
    assert chat.returncode == 128 + signum and children
    assert all(parent_of(p) is None for p in children), "the chat's server is still running"
    assert no_new_shm_files(before)


def parent_of(pid):
    """A process's parent id, or None where it has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_a_bad_flag_without_a_model_is_one_line():
    """The embedded model's note comes once the engine is up: a flag's error before that comes alone."""
    p = subprocess.run([sys.executable, "-m", "spmd.run", "--ratios", "1:x"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: --ratios '1:x'"), p.stderr

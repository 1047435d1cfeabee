"""The launcher refuses a bad hostfile or an unreachable host in one line, before any rank starts."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ssh_answers(host):
    try:
        socket.create_connection((host, 22), timeout=1).close()
        return True
    except OSError:
        return False


def launch(tmp_path, hostfile_text, *args):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_bytes(hostfile_text.encode("utf-8", "surrogateescape"))  # lone surrogates: raw bytes
    timeout = () if "--timeout" in args else ("--timeout", "2")
    return subprocess.run([sys.executable, "-m", "spmd.launch", "-f", str(hostfile), *timeout, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("text, message", [
    ("localhost:1\nnosuchhost.invalid:1\n", "line 2: host 'nosuchhost.invalid' does not resolve"),
    # 127.0.0.2 is this machine's loopback, where no ssh server listens: refused, as a host that is down would be
    ("localhost:1\n127.0.0.2:1\n", "line 2: host 127.0.0.2 is unreachable on ssh port 22"),
    ("localhost slots=2\n", "line 1: 'localhost slots=2' is not HOST or HOST:SLOTS"),
    ("localhost slots=2\n", "own lines): write localhost:2"),  # Open MPI's form: what to write instead
    ("localhost:2   # the desktop\n", "comments go on their own lines"),
    ("# nothing\n", "names no hosts"),
    ("foo..bar:1\n", "line 1: host 'foo..bar' does not resolve"),
    ("\udcff\udcfe:1\n", "is not text"),
    ("localhost:\u00b2\n", "line 1: 'localhost:\u00b2' is not HOST or HOST:SLOTS"),  # a digit to str.isdigit
    ("localhost:\u0661\n", "is not HOST or HOST:SLOTS"),  # Arabic-Indic one
    ("localhost:99999999999999999999\n", "SLOTS 1-999999"),
])
def test_bad_hostfiles_and_hosts_are_named(tmp_path, text, message):
    if "127.0.0.2" in text and ssh_answers("127.0.0.2"):
        pytest.skip("an ssh server listens on this machine's loopback")
    p = launch(tmp_path, text, "--", "--help")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and message in p.stderr


@pytest.mark.parametrize("bom", ["", "\ufeff"])  # (as some Windows editors save a file)
def test_a_good_hostfile_starts_the_job(tmp_path, bom):
    p = launch(tmp_path, bom + "# one machine\nlocalhost:2\n", "--", "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("Usage: python -m spmd.run") == 1  # two ranks, rank 0 alone prints
    alone = subprocess.run([sys.executable, "-m", "spmd.run", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.stdout == alone.stdout  # its blank lines too


def test_serve_starts_the_server(tmp_path):
    p = launch(tmp_path, "localhost:2\n", "--serve", "--", "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("Usage: python -m spmd.serve") == 1


def test_a_timeout_that_is_not_a_finite_number_is_refused(tmp_path):
    p = launch(tmp_path, "localhost:1\n", "--timeout", "nan")
    assert p.returncode == 2 and "nan is not a finite number" in p.stderr


def test_a_hostfile_that_is_a_pipe_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    p = subprocess.run([sys.executable, "-m", "spmd.launch", "-f", str(tmp_path / "fifo"), "--", "--help"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert "is not a regular file" in p.stderr


@pytest.mark.parametrize("count", ["99999999999999999999", "1025"])
def test_a_rank_count_beyond_a_household_is_refused(count):
    """-n 99999999999999999999 hung (mpirun tried to start them): refused at once, in one line."""
    p = subprocess.run([sys.executable, "-m", "spmd.launch", "-n", count, "--", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "1<=x<=1024" in p.stderr and "Traceback" not in p.stderr


def test_hostfile_slots_beyond_a_household_are_refused(tmp_path):
    p = launch(tmp_path, "localhost:999\nlocalhost:999\n", "--", "--help")
    assert p.returncode == 1 and "slots make 1998 ranks; at most 1024" in p.stderr


def test_a_jobs_flag_before_the_separator_says_where_it_goes():
    p = subprocess.run([sys.executable, "-m", "spmd.launch", "-n", "2", "--prompt", "hi"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == ["error: No such option '--prompt'. The job's own flags go after --, as in "
                                     "python -m spmd.launch -n 2 -- --prompt ... (see python -m spmd.launch --help)"]


@pytest.mark.parametrize("ssh_says, line", [
    ("user@127.0.0.3: Permission denied (publickey,password).",
     "ssh cannot log in without a password (user@127.0.0.3: Permission denied (publickey,password).): set up a key "
     "(ssh-copy-id 127.0.0.3) and accept its host key once"),
    ("ssh: connect to host 127.0.0.3 port 22: Connection timed out",  # (a key's advice, once)
     "ssh could not reach it (ssh: connect to host 127.0.0.3 port 22: Connection timed out): is its ssh server "
     "running, and the host up?"),
    ("Bad owner or permissions on /root/.ssh/config",
     "ssh failed (Bad owner or permissions on /root/.ssh/config); mpirun starts the host's ranks through it")])
def test_a_host_whose_ssh_cannot_log_in_is_named(tmp_path, ssh_says, line):
    """Its ssh port answers, but ssh cannot log in without a password (no key yet), or does not get through: one
    line naming the host and ssh's reason, before mpirun would fail with lines of its own. (A fake ssh on PATH stands
    for ssh.)"""
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.3", 22))
    except OSError:
        pytest.skip("cannot listen on 127.0.0.3:22 here")
    listener.listen()
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho '{ssh_says}' >&2\nexit 255\n")
    fake.chmod(0o755)
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("localhost:1\n127.0.0.3:1\n")
    try:
        p = subprocess.run([sys.executable, "-m", "spmd.launch", "-f", str(hostfile), "--timeout", "2", "--",
                            "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}"))
    finally:
        listener.close()
    assert p.returncode == 1
    assert p.stderr.strip() == f"error: {hostfile} line 2: host 127.0.0.3: {line}"

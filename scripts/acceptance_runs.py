"""Running one acceptance job: `spmd.run` in a session of its own (so that a timeout ends every rank), its stdout
and stderr to files, and, for a migration scenario, its schedule driven through the control socket with
`spmd.client` while it generates."""
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from acceptance_schedules import request_of
from spmd.client import ClientError, Connection

ROOT = Path(__file__).resolve().parents[1]


def venv_bin() -> Path:
    """The python and mpirun every run uses: $SPMD_VENV's (relative to the repository, or absolute), else the
    running interpreter's where mpirun is beside it (an activated set-up anywhere), else the repository's .venv."""
    if os.environ.get("SPMD_VENV"):
        return ROOT / os.environ["SPMD_VENV"] / "bin"
    here = Path(sys.executable).parent
    return here if (here / "mpirun").exists() else ROOT / ".venv" / "bin"


BIN = venv_bin()
PY, MPIRUN = str(BIN / "python"), str(BIN / "mpirun")
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def one_line(stderr: str) -> str:
    """The line of a failed run's stderr that says why: its last `error:` line, else its last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith("error")]
    line = (errors or lines or ["no output"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def parse_result(stdout: str):
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_job(argv, workdir: Path, name: str, timeout: int, during=None) -> dict:
    """Run a command in its own session (so that a timeout or Ctrl-C ends its mpirun and every rank), with stdout and
    stderr to files (no pipe to fill). `during(proc, deadline)` runs meanwhile; what it returns is `migrations`."""
    t0, load0 = time.perf_counter(), round(os.getloadavg()[0], 2)
    with open(workdir / f"{name}.stdout", "w+") as out, open(workdir / f"{name}.stderr", "w+") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            talk = during(proc, t0 + timeout) if during else None
            rc = proc.wait(timeout=max(1.0, t0 + timeout - time.perf_counter()))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:  # timed out, or interrupted
                end_group(proc)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    record = dict(returncode=rc, wall_s=round(wall, 2), load_avg=[load0, round(os.getloadavg()[0], 2)],
                  stderr_tail=stderr[-4000:], result=parse_result(stdout))
    if during:
        record["migrations"] = talk
    if rc is None:
        record["error"] = f"timed out after {timeout} s"
    elif rc != 0:
        record["error"] = f"exit {rc}: {one_line(stderr)}"
    elif record["result"] is None:
        record["error"] = "exit 0 but no JSON result on stdout"
    return record


def end_group(proc):
    """End a run we started (its mpirun and every rank: the session `run_job` gave it), and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ---- live migrations ------------------------------------------------------------------------------------------
def connect(sock: str, proc, deadline: float) -> Connection:
    """A connection to the run's control socket, made as soon as the run opens it (before it loads its weights), so
    the first command waits in the run before generation starts. One connection serves the whole schedule: a
    migration is answered once applied and only one may wait at a time, so each command goes the moment the one
    before it is answered (a new client process for each would take longer to start than a fast run takes to pass
    the next position)."""
    while True:
        try:
            return Connection(sock, timeout=max(1.0, deadline - time.perf_counter()))
        except ClientError:
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise
            time.sleep(0.002)


def ask(conn: Connection, args) -> dict:
    """One schedule entry (in spmd.migrate's words) over the connection: the command, request, reply and time."""
    req = request_of(args)
    t0 = time.perf_counter()
    try:
        reply = conn.ask(req)
    except ClientError as e:
        reply = {"ok": False, "error": f"control socket: {e}"}
    return dict(command=shlex.join([PY, "-m", "spmd.migrate", "--socket", conn.path, *args]), request=req,
                reply=reply, round_trip_ms=round((time.perf_counter() - t0) * 1e3, 1))


def drive(sock: str, proc, schedule, deadline: float) -> list:
    """A run's control commands, recorded in order. Over one connection: the schedule, each entry answered once
    applied at its position, then a `status`. Meanwhile, listed first, a `status` through the `spmd.migrate`
    client."""
    try:
        conn = connect(sock, proc, deadline)
    except ClientError as e:
        return [dict(command="connect", request=None, reply={"ok": False, "error": f"cannot connect: {e}"})]
    argv = [PY, "-m", "spmd.migrate", "--socket", sock, "status", "--json"]  # answered at a boundary
    cli = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = []
    with conn:
        for c in schedule:
            sent.append(dict(ask(conn, c["args"]), at=c["at"]))
            if not sent[-1]["reply"].get("ok"):
                break
        sent.append(ask(conn, ["status"]))
    try:
        out, err = cli.communicate(timeout=max(1.0, deadline - time.perf_counter()))
        reply = parse_result(out) or {"ok": False, "error": f"exit {cli.returncode}: {one_line(err or out)}"}
    except subprocess.TimeoutExpired:
        cli.kill()
        cli.wait()
        reply = {"ok": False, "error": "no reply"}
    return [dict(command=shlex.join(argv), request=None, reply=reply, via="spmd.migrate")] + sent


def too_late(sent) -> bool:
    """A command arrived after its position had passed (the run outran the client between two commands)."""
    return any("has passed" in str(m["reply"].get("error", "")) for m in sent if "at" in m)


ATTEMPTS = 3  # runs of a migration scenario while a command arrives too late: a safety net for a very fast run


def run_migrating(argv, schedule, workdir: Path, name: str, timeout: int) -> dict:
    """Run with a control socket and drive `schedule` through it (again, up to ATTEMPTS runs in all, while a command
    arrives after its position)."""
    sock = str(workdir / f"{name}.sock")  # in our private temporary folder
    if len(os.fsencode(sock)) > 100:  # a Unix socket's path has at most 107 bytes
        sock = os.path.join(tempfile.mkdtemp(prefix="spmd-acc-", dir="/tmp"), f"{name}.sock")
    argv = argv + ["--control-socket", sock]
    for attempt in range(1, ATTEMPTS + 1):
        record = run_job(argv, workdir, name, timeout, lambda proc, end: drive(sock, proc, schedule, end))
        if not too_late(record["migrations"]):
            break
    return dict(record, argv=argv, schedule=schedule, attempts=attempt)

"""The supervisor: runs a generation (`spmd.run`) under mpirun from outside the MPI job and, when a rank dies, a host
goes away or the job stops making progress, relaunches it on the survivors from where it was. `spmd.launch` runs
it.

MPI cannot lose a rank and go on (mpirun takes every rank down, and MPICH's fault tolerance does not start), so a
recovery is a new job: the same flags, the layout without the lost ranks (`without`), a hostfile without them, and
a resume file (spmd.journal) with each sequence's prompt, the tokens it had sampled and its sampler's state; the
new job's rank 0 re-prefills the prompt and those tokens and goes on after the last one. Rank 0 journals every token
with the text that went to stdout for it, on a pipe only the supervisor reads, and the supervisor prints that
text: what it printed is exactly what was journaled, so the text goes on after a recovery without a gap or a repeat.

A failure is:
- a rank killed: its watcher (spmd.watch) says which, in a line on stderr (mpirun's "BAD TERMINATION" banner names
  whichever process it saw end first, often one it killed itself, so it is only dropped); mpirun then ends the
  job, or the supervisor does after `DEATH_GRACE_S` (a loaded machine's mpirun took more than 10 s);
- no progress: no token for `progress_timeout` seconds plus twice the slowest recent gap between tokens (plus the
  time a pending prefill should take, from the prefills seen): a rank stopped (SIGSTOP, a sleeping laptop), a link
  down. The supervisor ends the job; a rank whose process is stopped or gone on this machine is lost;
- either way, a host that no longer answers on its ssh port (a refusal is an answer) is lost with all its ranks.
A job that ends by itself with an error (a user's mistake, say) is not relaunched, nor one that fails before it is
running (set-up, load) the first time, nor one whose rank 0 is lost: that is where the output goes.
"""
import ctypes
import functools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from fractions import Fraction
from typing import NamedTuple

from . import shm
from .control import runtime_dir
from .errors import UserError
from .journal import Record
from .plan import parse_layout
from .run import PER_RANK_FLAGS, write_stdout
from .watch import DIED as DIED_LINE, PR_SET_PDEATHSIG

DIED = re.compile(re.escape(DIED_LINE).replace(r"\{rank\}", r"(\d+)").replace(r"\{host\}", "(.*)")
                  .replace(r"\{signal\}", r"(\d+)"))  # spmd.watch's line: rank, host, signal
# mpirun's own lines on its stdout: its "BAD TERMINATION" banner, and what it says when a job is ended with SIGINT
BANNER_LINE = re.compile(r"^(=|YOUR APPLICATION TERMINATED|This typically refers|Please see the FAQ|\[mpiexec@)")
# MPICH's line for a rank that called MPI_Abort, after its own line (a stop, a failure, a bug's traceback) said why: not
# passed on; it may follow another's text
ABORTED = re.compile(r"Abort\(\d+\) on node \d+ \(rank \d+ in comm \d+\): application called MPI_Abort.*$")
# What follows a rank's death on the ranks' stderr: MPICH's process manager's lines about the lost connections (one
# proxy a host), a rank's MPI call that failed (spmd.run.guarded): held until the job ends, and said only where no
# death was seen
AFTERMATH = re.compile(r"\[(mpiexec|proxy:[^\]]*)@[^\]]*\]|error: rank \d+ \([^)]*\): an MPI call failed")
DIR_PREFIX = "spmd-supervise-"  # then the supervisor's pid: a folder of one killed with -9 is removed later
TERM_GRACE_S = 3.0  # after SIGINT, how long mpirun has to take the job down before it is killed
DEATH_GRACE_S = 2.0  # after a watcher's line says a rank died, how long mpirun has to end the job by itself
START_S = 10.0  # a user's stop waits this long at most for the ranks to start before it goes to mpirun
STOP_S = 20.0  # and then this long at most for the job to end before it is killed
GAPS = 32  # recent gaps between tokens the progress bound looks at


class Lost(NamedTuple):
    rank: int
    host: str
    why: str


def without(text, lost):
    """The layout `text` (`--ratios` syntax) without the ranks in `lost`: each stage keeps its surviving ranks and
    their ratios; a stage left with none goes, and then no stage keeps a pinned layer count (the layers are split
    again by the ratios). A stage left with idle ranks only gives them ratio 1."""
    layout = parse_layout(text, _count(text), "the layout")
    stages, rank = [], 0
    for spec in layout.stages:
        kept = []
        for speed in spec.speeds:
            if rank not in lost:
                kept.append(speed)
            rank += 1
        if kept:
            if not any(kept):
                kept = [Fraction(1)] * len(kept)
            stages.append((kept, spec.n_layers))
    pinned = len(stages) == len(layout.stages)
    parts = [":".join(f"{float(s):g}" for s in kept) + (f"@{layers}" if pinned and layers else "")
             for kept, layers in stages]
    return "*".join(parts)


def _count(text):
    return sum(len(part.split("@")[0].split(":")) for part in text.split("*"))


def probe(host, timeout):
    """Does `host` answer on its ssh port? A refusal is an answer (the host is up); silence or no route is not."""
    try:
        with socket.create_connection((host, 22), timeout=timeout):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def is_local(host):
    """Is `host` this machine (a name of it, or an address one of its interfaces holds)? A name that does not
    resolve now is not (and is asked again next time: a resolver's hiccup is not kept)."""
    from .launch import LOCAL
    if host in LOCAL:
        return True
    try:
        return _holds_address(host)
    except (socket.gaierror, UnicodeError):
        return False


@functools.lru_cache(maxsize=None)
def _holds_address(host):
    """Whether an interface here holds an address of `host`, resolved once (the supervisor asks while a job is
    stalled, and a resolver can take seconds); a failure to resolve raises, and is not kept."""
    for family, kind, _, _, addr in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM):
        with socket.socket(family, kind) as s:
            try:
                s.bind((addr[0], 0))
                return True
            except OSError:
                continue
    return False


def process_state(pid):
    """A process's state letter on this machine (R, S, T for stopped, Z...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def signal_pids(pids, signum):
    """`signum` to each of `pids` that is still there."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def die_with_parent():
    """In the child, before exec: SIGTERM to it when the supervisor dies (even by kill -9), so that mpirun takes
    the job down instead of generating on alone (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Job:
    """One mpirun of the generation, with its journal pipe. Its stdout carries mpirun's own messages (its "BAD
    TERMINATION" banner, dropped) and what rank 0 says outside the journal (--help); its stderr the ranks'
    messages, passed on, except the watchers' lines (spmd.watch) naming a rank that died, which are kept."""

    def __init__(self, cmd, env, fifo, requests=None, wake=None):
        self.fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a reader, and a writer so that it never reads EOF
        # serving (spmd.front): the requests pipe, what is still to be written to it, and the front's wake-up pipe
        self.out_fd = os.open(requests, os.O_RDWR | os.O_NONBLOCK) if requests else None
        self.outgoing, self.wake = b"", wake
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True, preexec_fn=die_with_parent)
        self.pipes = {p.fileno(): [p, b""] for p in (self.proc.stdout, self.proc.stderr)}
        for fd in self.pipes:
            os.set_blocking(fd, False)
        self.lines = b""
        self.died = {}  # rank -> signal, from the watchers' lines
        self.held = []  # stderr lines that may be a death's aftermath (AFTERMATH)
        self.blanks = 0  # blank lines on stdout not yet said
        self.ending = False  # the supervisor is taking it down
        self.interrupted = None  # when the user's stop was passed on

    def send(self, data):
        """Serving: bytes for the requests pipe, written as the job reads them (see `read`)."""
        self.outgoing += data

    def read(self, timeout):
        """The complete journal lines that came within `timeout` seconds (mpirun's output handled meanwhile, and
        what `send` was given written as the pipe takes it); a request coming to the front ends the wait."""
        readers = [self.fd, *self.pipes] + ([self.wake] if self.wake is not None else [])
        ready, writable, _ = select.select(readers, [self.out_fd] if self.outgoing else [], [], timeout)
        if writable:
            try:
                self.outgoing = self.outgoing[os.write(self.out_fd, self.outgoing):]
            except BlockingIOError:
                pass
        lines = []
        if self.fd in ready:
            self.lines += os.read(self.fd, 1 << 20)
            *lines, self.lines = self.lines.split(b"\n")
        for fd in self.pipes:
            if fd in ready:
                self._output(fd, os.read(fd, 1 << 16))
        return lines

    def drain(self):
        """After mpirun has ended: the rest of its output."""
        for fd, (pipe, rest) in self.pipes.items():
            data = b""
            try:
                while chunk := os.read(fd, 1 << 16):
                    data += chunk
            except BlockingIOError:  # a process of the job still holds it open
                pass
            self._output(fd, data + (b"\n" if rest and not data.endswith(b"\n") else b""))
        if not self.died:
            for line in self.held:
                print(line, file=sys.stderr, flush=True)
        self.held = []

    def _output(self, fd, data):
        pipe, rest = self.pipes[fd]
        *lines, self.pipes[fd][1] = (rest + data).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            died = DIED.fullmatch(line.strip())
            if died is not None:
                self.died[int(died.group(1))] = int(died.group(3))
            elif pipe is self.proc.stderr:
                line = ABORTED.sub("", line)
                if not line.strip() and raw.strip():
                    continue
                aftermath = AFTERMATH.search(line)
                if aftermath is not None:
                    self.held.append(line[aftermath.start():])
                    line = line[:aftermath.start()]
                if line.strip() or aftermath is None:
                    print(line, file=sys.stderr, flush=True)
            elif BANNER_LINE.match(line):
                self.blanks = 0
            elif not line.strip():  # said only between lines of rank 0's own (--help's paragraphs), not the banner's
                self.blanks += 1
            else:  # rank 0's own (--help)
                write_stdout("\n" * self.blanks + line + "\n")
                self.blanks = 0

    def signal(self, signum):
        try:
            self.proc.send_signal(signum)
        except ProcessLookupError:
            pass

    def kill(self, local_pids):
        """At once: mpirun and what it started here (its process group), and the ranks here."""
        self.ending = True
        signal_pids(local_pids, signal.SIGKILL)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def end(self, local_pids):
        """Take the job down: SIGINT to mpirun (it passes it on: the ranks stop as on Ctrl-C; a SIGTERM would be a
        rank's machine going down), SIGKILL after TERM_GRACE_S, and SIGKILL to any of its ranks on this machine
        still there (a stopped one, say)."""
        self.ending = True
        self.signal(signal.SIGINT)
        try:
            self.proc.wait(TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        signal_pids([p for p in local_pids if process_state(p) not in (None, "Z")], signal.SIGKILL)

    def close(self):
        os.close(self.fd)
        if self.out_fd is not None:
            os.close(self.out_fd)
        self.proc.stdout.close()
        self.proc.stderr.close()


class Progress:
    """Whether a running job is overdue: no token for `timeout` seconds plus twice the slowest of the recent gaps
    between tokens, plus, while a prefill is pending, three times what its tokens took at the prefill speed seen
    (unbounded before one was seen, in this job or one before it: there the supervisor looks, every `timeout`
    seconds of quiet, for a rank stopped or gone on this machine and a host that does not answer; a rank stopped
    on another host is bounded by the ranks' own --wait-timeout)."""

    def __init__(self, timeout, prefill_s=None):
        self.timeout, self.gaps = timeout, deque(maxlen=GAPS)
        self.last = self.last_token = time.monotonic()
        self.prefill_s = prefill_s  # seconds a prompt token took in the last prefills seen
        self.pending = 0  # prompt tokens sent whose sequences have had no token since
        self._prefill = None  # [since when prompt tokens have been pending, how many were sent since]

    def saw(self, now, token, prefill):
        """An event at `now`: `token` whether it was a token, `prefill` the prompt tokens pending after it (tokens
        of other sequences may come while one's prefill is pending: a pipeline holds several steps)."""
        if token:
            if self._prefill is None:
                self.gaps.append(now - self.last_token)  # (not a gap that a prefill's time is in)
            self.last_token = now
        if prefill > self.pending:
            self._prefill = self._prefill or [now, 0]
            self._prefill[1] += prefill - self.pending
        elif not prefill and self._prefill is not None:  # every prefill sent has had its token
            if now > self._prefill[0]:  # (not where a prefill and its token came in one read: no time seen)
                self.prefill_s = (now - self._prefill[0]) / self._prefill[1]
            self._prefill = None
        self.pending = prefill
        self.last = now

    def idle(self, now):
        """Nothing was asked of the job (an idle server): no token is due."""
        self.last = self.last_token = now
        self.pending, self._prefill = 0, None

    def overdue(self, now):
        bound = self.timeout + 2 * max(self.gaps, default=0.0)
        if self.pending:
            bound += float("inf") if self.prefill_s is None else 3 * self.prefill_s * self.pending
        return now - self.last if now - self.last > bound else None


class Supervisor:
    """`run()` -> exit status. `hosts`: [(host, slots)] of the hostfile (None: every rank on this machine)."""

    def __init__(self, mpirun, hosts, n_ranks, run_args, progress_timeout=10.0, max_recoveries=3,
                 probe_timeout=2.0, env=None, serve=None):
        self.mpirun, self.run_args = mpirun, list(run_args)
        self.serve, self.front = serve, None  # spmd.serve: launch.server_flags' answer; its spmd.front
        self.progress_timeout, self.max_recoveries, self.probe_timeout = progress_timeout, max_recoveries, probe_timeout
        self.env = dict(os.environ if env is None else env, SPMD_WATCH="1")  # each rank's watcher: spmd.watch
        per_rank = [h for h, slots in hosts for _ in range(slots)] if hosts else ["localhost"]
        self.rank_hosts = [per_rank[r % len(per_rank)] for r in range(n_ranks)]  # MPICH's order: fill, then wrap
        self.hostfile = hosts is not None
        self.planned = flag_value(self.run_args, "--plan")  # --plan: a relaunch plans again, on the survivors
        self.profile_ranks = list(range(n_ranks))  # each rank's index in a saved profile (--plan FILE)
        self.record, self.recoveries, self.job = Record(serving=serve is not None), [], None
        self.prefill_s = None  # what a prompt token took in the last prefill seen, kept across relaunches
        self.stopping = None  # the signal the user stopped the supervisor with
        self.forced = False  # a second signal: the job was killed
        self.dir = None

    # ---- the loop -------------------------------------------------------------------------------------------------
    def run(self):
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        base = runtime_dir() or tempfile.gettempdir()
        remove_stale_dirs(base)
        self.dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=base)
        try:
            if self.serve is not None:
                from .front import Front
                try:
                    self.front = Front(*self.serve, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                                       recovers=self.max_recoveries > 0)
                except UserError as e:
                    return self._fail(str(e), 1)
                self.front.recoveries = self.recoveries
            return self._run()
        except UserError as e:  # stdout cannot be written as the job's last lines are (the job is over)
            return self._fail(str(e), 1)
        finally:
            if self.front is not None:
                self.front.close()
            remove_dir(self.dir)
            for s, handler in previous.items():  # (last: the previous handler may raise)
                signal.signal(s, handler)

    def _on_signal(self, signum, _frame):
        """The user stops the run: the job stops as spmd.run does on Ctrl-C (a server ends the answers under way)
        and is not relaunched. A second signal takes it down at once."""
        again, self.stopping = self.stopping is not None, signum
        if self.front is not None:
            self.front.inbox.close()  # new requests are answered 503
        if self.job is None:
            return  # the loop sees `stopping` before it starts one
        if again:
            self.forced = True
            if self.job.proc.poll() is None:  # (a job that has ended: its process ids may be another's by now)
                self.job.kill(self._local_pids())
            return
        # else the loop passes it on once the ranks have started (see `_interrupt`); a job that has ended (a failure
        # being handled) gets nothing: its process ids may be another's, and the loop relaunches none
        if self.record.ranks and self.job.proc.poll() is None:
            self._interrupt(self.job)

    def _interrupt(self, job):
        """The user's stop, passed on to a job whose ranks have started (one still importing would print a
        traceback)."""
        job.interrupted = time.monotonic()
        # a stopped rank would hold the others until their grace runs out
        signal_pids([p for p in self._local_pids() if process_state(p) in ("T", "t")], signal.SIGCONT)
        job.signal(signal.SIGINT)

    def _stopped(self, status):
        """The exit status of a run its user stopped: a signal's (a run, or a server stopped at once), else, for a
        server, 0 unless its job failed otherwise."""
        if self.front is None or self.forced:
            return 128 + self.stopping
        return 0 if status in (None, 0, 128 + signal.SIGINT, 128 + signal.SIGTERM) else status

    def _run(self):
        resume, timing = None, None
        while True:
            if self.stopping is not None:  # before the first job, or while a failure was being handled
                return self._stopped(None)
            status, failure = self._attempt(resume, timing)
            if failure is None:
                return status
            if self.stopping is not None:
                return self._stopped(status)
            lost, why, last_token, detected = failure
            if any(r.rank == 0 for r in lost):
                r0 = next(r for r in lost if r.rank == 0)
                ends = "it drives every sequence, so the server" if self.front else \
                    "it is where the run's output goes, so the run"
                return self._fail(f"rank 0 ({r0.host}) {r0.why}: {ends} ends here", status)
            what = describe(lost, why)
            if not self.record.started:
                return self._fail(f"{what} while the job was starting (nothing generated yet): not relaunched",
                                  status)
            if len(self.recoveries) >= self.max_recoveries:
                n = self.max_recoveries
                limit = f"after {n} recover{'ies' if n > 1 else 'y'} (--max-recoveries)" if n else "(--no-recover)"
                return self._fail(f"{what}: giving up {limit}", status)
            resume, timing = self._replan(lost, why, round(detected - last_token, 3)), (detected, last_token)

    def _fail(self, message, status):
        print(f"error: {message}", file=sys.stderr, flush=True)
        return status if status not in (0, None) else 1

    def _command(self, fifo, resume):
        cmd = [self.mpirun]
        if self.hostfile:
            path = os.path.join(self.dir, "hostfile")
            with open(path, "w") as f:
                f.write(hostfile_text(self.rank_hosts))
            cmd += ["-f", path]
        module = "spmd.run" if self.front is None else "spmd.serve"
        cmd += ["-n", str(len(self.rank_hosts)), sys.executable, "-m", module, *self.run_args, "--journal", fifo]
        if self.front is not None:
            cmd += ["--requests", os.path.join(self.dir, "requests")]
        if resume is not None:
            path = os.path.join(self.dir, "resume.json")
            with open(path, "w") as f:
                json.dump(resume, f)
            cmd += ["--resume", path]
        return cmd

    def _attempt(self, resume, timing):
        """One job until it ends: (exit status, None) when the run is over, or (status, (lost ranks, why, when the
        last token came, when the failure was seen)) when it failed in a way a relaunch may recover from. `timing`:
        (when the failure before was detected, when its last token came), for the recovery's figures."""
        fifo, requests = os.path.join(self.dir, "journal"), os.path.join(self.dir, "requests")
        for path in (fifo, requests) if self.front is not None else (fifo,):
            # new ones each launch: a process of the job before that lingers (a rank 0 stopped and then let go)
            # holds the old ones, and neither writes into this job's journal nor reads its requests
            if os.path.lexists(path):
                os.unlink(path)
            os.mkfifo(path, 0o600)
        record, front = self.record, self.front
        record.relaunch()
        shm_before = shm.names()
        self.job = job = Job(self._command(fifo, resume), self.env, fifo, *(
            (requests, front.wake) if front is not None else ()))
        progress, ready_at, died_at = Progress(self.progress_timeout, self.prefill_s), None, None
        started = checked = time.monotonic()  # checked: when the ranks and hosts were last looked at while quiet
        try:
            while job.proc.poll() is None:
                lines, now = job.read(0.05), time.monotonic()
                if self.stopping is not None and job.interrupted is None and (record.ranks or now - started > START_S):
                    self._interrupt(job)  # the user's signal came while the ranks were starting
                if job.interrupted is not None and now - job.interrupted > STOP_S:
                    job.kill(self._local_pids())  # the stop passed on did not end it (a rank died meanwhile, say)
                for line in lines:
                    tokens = record.tokens
                    try:
                        reading = self._apply(line)
                    except UserError as e:  # stdout cannot be written (a full disk)
                        job.end(self._local_pids())
                        return self._fail(str(e), 1), None
                    if not reading:  # nobody reads stdout any more
                        job.end(self._local_pids())
                        return 0, None
                    progress.saw(now, record.tokens != tokens, record.prefill)
                    if record.ready and ready_at is None:
                        ready_at = now
                        if self.recoveries and self.recoveries[-1]["ratios_after"] is None:  # planned again
                            self.recoveries[-1]["ratios_after"] = record.ratios
                    if timing is not None and (record.tokens != tokens or  # the first token after a recovery,
                                               ready_at is not None and front is not None and not front.busy):
                        detected, last_token = timing  # (or an idle server ready: no request waits for it)
                        self.recoveries[-1].update(relaunch_s=round(ready_at - detected, 3),
                                                   stall_s=round(now - last_token, 3))
                        timing = None
                if front is not None:
                    job.send(front.lines(record.ready))
                busy = front.busy if front is not None else not record.done
                if front is not None and not busy:  # an idle server makes no tokens: the clock starts with work
                    progress.idle(now)
                if (busy or not record.ready) and self.stopping is None:
                    waited = progress.overdue(now) if record.ready else None
                    if waited is None and min(now - progress.last, now - checked) > self.progress_timeout:
                        # quiet for long within the bound (a first prefill has none, nor a load): is a rank or a
                        # host gone?
                        checked = now
                        if self._stopped_or_gone() or self._silent_hosts():
                            waited = now - progress.last
                    if waited is not None:
                        return 1, self._stalled(job, progress, waited, now)
                elif record.done and front is None and self.stopping is None and min(
                        now - progress.last, now - checked) > self.progress_timeout:
                    # the text is complete and mpirun has not ended: it waits for a rank or host lost as the job
                    # ended (a frozen rank, or a remote rank's proxy whose link went down)
                    checked = now
                    gone = self._stopped_or_gone()
                    lost = self._lost(gone)  # (with the ranks of the hosts that do not answer: probed once)
                    if lost:
                        signal_pids([self.record.ranks[rank][1] for rank in gone], signal.SIGKILL)
                        job.end(self._local_pids())
                        print(f"note: {describe(lost, '')} after the text was complete", file=sys.stderr, flush=True)
                        return self._success(), None
                died_at = self._death_noticed(job, died_at, now)
                if died_at is not None and now - died_at > DEATH_GRACE_S:
                    return 1, self._stalled(job, progress, None, now)
            job.drain()
            for line in job.read(0) + [job.lines]:  # the last lines; one cut short by a kill is dropped
                self._apply(line)
        finally:
            job.close()
            self._remove_socket()
            shm.clean_up_after_job(shm_before)  # (what a killed rank of it left here)
            if front is not None:
                front.lost()
            self.prefill_s = progress.prefill_s
        return self._ended(job, progress.last_token)

    def _death_noticed(self, job, died_at, now):
        """When a watcher's line first said a rank died, while mpirun has still to end the job (it does so by itself,
        but a loaded machine's mpirun took more than 10 s); None while no rank died, or the text was complete or the
        user stopped the run (mpirun's end says those)."""
        if not job.died or self.record.done or self.stopping is not None:
            return None
        return now if died_at is None else died_at

    def _stalled(self, job, progress, waited, detected):
        """A job that stopped making progress for `waited` seconds (None: a rank of which died, and mpirun did not end
        it): taken down (the ranks found stopped first: they are lost, and would hold mpirun's own end back), and the
        failure for `_run`. After a death only the watchers' ranks and stopped ones are lost: mpirun's teardown may
        have ended healthy local ranks already."""
        stalled = self._stopped_or_gone()
        if waited is None:
            stalled = {rank: why for rank, why in stalled.items() if why == "stopped"}
        signal_pids([self.record.ranks[rank][1] for rank in stalled], signal.SIGKILL)
        job.end(self._local_pids())
        job.drain()  # a watcher's line said before the stall was seen names the signal of a rank that died
        why = {**stalled, **self._signalled(job.died)}
        why.update({r: w for r, w in stalled.items() if w == "stopped"})  # not the SIGKILL given above
        when = ("" if waited is None else f"no token for {waited:.1f} s" if self.record.ready
                else f"no progress while loading for {waited:.1f} s")
        return self._lost(why), when, progress.last_token, detected

    def _remove_socket(self):
        """The control socket of a job's rank 0 that did not end cleanly (killed by mpirun after another rank's
        death, say): removed, as rank 0 would have done."""
        if not self.record.ranks:
            return
        from .control import default_path, remove_if_stale
        pid = self.record.ranks[0][1]
        path = flag_value(self.run_args, "--control-socket") or default_path(pid)
        if path.lower() != "none" and process_state(pid) in (None, "Z"):
            remove_if_stale(path)

    def _apply(self, line):
        """One journal line: its stdout text printed (serving: its event to the front). False once nobody reads
        stdout."""
        try:
            event = json.loads(line)
            text = self.record.apply(event)
        except (ValueError, KeyError, TypeError, IndexError):  # a line cut short (a killed job) or not ours
            return True
        if self.front is not None:
            if event["ev"] == "ready":
                self.front.ready(event, len(self.record.ranks))
            else:
                self.front.apply(event)
        return write_stdout(text) if text else True

    def _ended(self, job, last_token):
        """After mpirun has ended by itself: over (status, None), or recoverable (status, (lost, why, last))."""
        record, status = self.record, job.proc.returncode
        status = 128 - status if status < 0 else status
        if self.stopping is not None:
            return self._stopped(status), None
        if job.proc.returncode < 0 and not job.ending:  # mpirun itself was killed: what it started here goes too
            job.kill(self._local_pids())
            print(f"error: mpirun ended by signal {-job.proc.returncode} ({signal.Signals(-job.proc.returncode).name})"
                  ": the job is over (not relaunched: no rank was lost)", file=sys.stderr, flush=True)
            return status, None
        if status == 0 and (record.result is not None or record.done or self.front is not None):
            return self._success(), None
        lost = self._lost(self._signalled(job.died))
        if not lost and status == signal.SIGKILL and not record.done:  # (mpirun's status for a process killed)
            print("error: the job ended with a process killed (status 9) and no rank's watcher said which rank died "
                  "(a watcher process itself killed?): not relaunched, as the lost rank is not known",
                  file=sys.stderr, flush=True)
            return status, None
        if not lost and status - 128 in (signal.SIGINT, signal.SIGTERM) and not record.done:
            print(f"error: the job was stopped by {signal.Signals(status - 128).name} sent to rank 0 or mpirun, not to "
                  "this launcher: not relaunched", file=sys.stderr, flush=True)
            return status, None
        if not lost:
            return status, None  # it ended by itself with an error it has said
        if record.done:  # the text was complete: only the summary line is lost
            print(f"note: {describe(lost, '')} after the text was complete", file=sys.stderr, flush=True)
            return self._success(), None
        return status, (lost, "", last_token, time.monotonic())

    def _success(self):
        if self.record.result is not None:
            write_stdout(json.dumps(dict(self.record.result, recoveries=self.recoveries)) + "\n")
        elif self.recoveries and self.front is None:  # a server's summary line says it
            print(f"[spmd] {recoveries_text(self.recoveries)}", file=sys.stderr, flush=True)
        return 0

    # ---- who was lost ---------------------------------------------------------------------------------------------
    def _local_pids(self):
        return [pid for rank, (_host, pid) in enumerate(self.record.ranks) if is_local(self.rank_hosts[rank])]

    def _signalled(self, died):
        """The ranks the watchers' lines ({rank: signal}) said were killed: {rank: why}."""
        return {rank: f"died (signal {signum})" for rank, signum in died.items() if rank < len(self.rank_hosts)}

    def _stopped_or_gone(self):
        """The ranks on this machine stopped or gone (before a job that stopped making progress is ended): {rank:
        why}."""
        lost = {}
        for rank, (_host, pid) in enumerate(self.record.ranks):
            if is_local(self.rank_hosts[rank]):
                state = process_state(pid)
                if state in (None, "Z", "T", "t"):
                    lost[rank] = "stopped" if state in ("T", "t") else "died"
        return lost

    def _lost(self, why):
        """The lost ranks, in rank order: those of `why` ({rank: why}) and every rank of a host that does not answer
        (probed at once, each within probe_timeout)."""
        lost = {rank: Lost(rank, self.rank_hosts[rank], text) for rank, text in why.items()}
        silent = self._silent_hosts()
        for rank, host in enumerate(self.rank_hosts):
            if host in silent:
                lost.setdefault(rank, Lost(rank, host, "is unreachable (its host does not answer)"))
        return sorted(lost.values())

    def _silent_hosts(self):
        """The other machines that do not answer on their ssh port (probed at once, each within probe_timeout)."""
        remote = sorted({h for h in self.rank_hosts if not is_local(h)})
        answers = {}

        def ask(host):
            answers[host] = probe(host, self.probe_timeout)
        threads = [threading.Thread(target=ask, args=(h,), daemon=True) for h in remote]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.probe_timeout + 1)
        return {h for h in remote if not answers.get(h, False)}

    # ---- the relaunch ---------------------------------------------------------------------------------------------
    def _replan(self, lost, why, detect_s):
        """The resume file's contents for a job on the survivors; the recovery recorded and said in one line."""
        record = self.record
        gone = {r.rank for r in lost}
        before = record.ratios
        after = None if self.planned else without(before, gone) if gone else before
        self.run_args = args_without(self.run_args, gone, len(self.rank_hosts))
        self.rank_hosts = [h for r, h in enumerate(self.rank_hosts) if r not in gone]
        self.profile_ranks = [p for r, p in enumerate(self.profile_ranks) if r not in gone]
        if after is not None:
            record.ratios = after  # the relaunched job's, should it fail before it says so itself
        n = len(self.rank_hosts)
        what = describe(lost, why)
        front = self.front
        self.recoveries.append({
            "after_tokens": record.tokens if front else sum(len(s["tokens"]) for s in record.sequences.values()),
            "lost": [r._asdict() for r in lost], "why": what, "ratios_before": before, "ratios_after": after,
            "ranks_after": n, "detect_s": detect_s, "tokens_replayed":
                sum(len(r.tokens) for r in front.requests.values()) if front else record.unfinished_tokens})
        layout = f"--ratios {after}" if after else f"planned again (--plan {self.planned})"
        print(f"[spmd] {what}; going on with {n} rank{'s' * (n > 1)}, {layout} (recovery "
              f"{len(self.recoveries)} of at most {self.max_recoveries})", file=sys.stderr, flush=True)
        return record.resume(after, self.profile_ranks if self.planned not in (None, "auto") else None)


def remove_stale_dirs(parent):
    """The folders (journal and requests pipes, resume file) of this user's supervisors that were killed with -9."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(DIR_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(DIR_PREFIX):].split("-")[0]
        path = os.path.join(parent, name)
        try:
            if pid.isdigit() and os.lstat(path).st_uid == os.getuid() and process_state(int(pid)) is None:
                remove_dir(path)
        except OSError:
            pass


def remove_dir(path):
    """A supervisor's folder and the files in it (pipes, hostfile, resume file)."""
    for entry in os.listdir(path):
        os.unlink(os.path.join(path, entry))
    os.rmdir(path)


def args_without(args, lost, n_ranks):
    """spmd.run's arguments for the job without the ranks in `lost` (of n_ranks): a flag given one value per rank
    (--threads 4,2,2) loses the lost ranks' values."""
    def drop(value):
        parts = value.split(",")
        return ",".join(p for r, p in enumerate(parts) if r not in lost) if len(parts) == n_ranks else value
    out, args = [], list(args)
    for i, a in enumerate(args):
        name, eq, value = a.partition("=")
        if eq and name in PER_RANK_FLAGS:
            a = f"{name}={drop(value)}"
        elif i > 0 and args[i - 1] in PER_RANK_FLAGS:
            a = drop(a)
        out.append(a)
    return out


def flag_value(args, name):
    """The value of flag `name` in spmd.run's arguments (--name VALUE or --name=VALUE), or None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.partition("=")[2]
    return value


def recoveries_text(recoveries):
    """'2 recoveries, 13.1 s stalled in all'."""
    n, stalled = len(recoveries), sum(r.get("stall_s", 0) for r in recoveries)
    return f"{n} recover{'ies' if n > 1 else 'y'}, {stalled:.1f} s stalled in all"


def describe(lost, why):
    """'rank 2 (laptop) died (signal 9)', with `why` (a stall) in brackets, or `why` alone when no rank is known."""
    names = ", ".join(f"rank {r.rank} ({r.host}) {r.why}" for r in lost)
    return f"{names} ({why})" if names and why else names or why


def hostfile_text(rank_hosts):
    """A hostfile that places ranks on `rank_hosts` in order (runs of one host become HOST:COUNT)."""
    lines = []
    for host in rank_hosts:
        if lines and lines[-1][0] == host:
            lines[-1][1] += 1
        else:
            lines.append([host, 1])
    return "".join(f"{h}:{c}\n" for h, c in lines)

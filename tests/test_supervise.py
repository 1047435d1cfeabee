"""Surviving a rank's death (spmd.supervise, run by spmd.launch): a rank killed or stopped mid-generation, at several
tokens and layouts; the run goes on on the survivors and its tokens and text equal an uninterrupted run's (plain
mpirun, no supervisor). Also the pure parts: the layout without the lost ranks, the hostfile, the journal."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spmd.errors import UserError
from spmd.journal import Journal, Record, read_resume
from spmd.supervise import Progress, args_without, hostfile_text, without
from spmd.synth import Shape, write_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = Shape(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn=128, vocab=512, context=64)
MPIRUN = shutil.which("mpirun")
STEPS = 40


@pytest.mark.parametrize("layout, lost, expected", [
    ("2:3:3", {2}, "2:3"),
    ("2:3:3", {1}, "2:3"),
    ("1:1@2*2:3@2", {3}, "1:1@2*2@2"),  # a stage that keeps a rank keeps its layers
    ("1@1*1@2*1@1", {1}, "1*1"),  # a stage gone: the layers are split again by the ratios
    ("1:1@2*1:1@2", {2, 3}, "1:1"),
    ("2:0:3", {2}, "2:0"),
    ("1:1@2*0:0:1@2", {4}, "1:1@2*1:1@2"),  # idle ranks left alone in a stage take work
    ("0.5:1.5", {1}, "0.5"),
])
def test_the_layout_without_the_lost_ranks(layout, lost, expected):
    assert without(layout, lost) == expected


def test_per_rank_flags_lose_the_lost_ranks_values():
    args = ["--model", "m.gguf", "--threads", "4,2,2,1", "--memory-limit=1G,2G,3G,4G", "--backend", "cpu",
            "--prompt", "4,2,2,1", "--gpu", "0,1"]
    assert args_without(args, {1, 3}, 4) == ["--model", "m.gguf", "--threads", "4,2", "--memory-limit=1G,3G",
                                             "--backend", "cpu", "--prompt", "4,2,2,1", "--gpu", "0,1"]


def test_a_hostfile_in_rank_order():
    assert hostfile_text(["a", "a", "b", "a"]) == "a:2\nb:1\na:1\n"


class Seq:  # what Journal.token reads of a driver's sequence
    def __init__(self, index, finish=None):
        self.index, self.finish = index, finish
        self.sampler = type("S", (), {"state": None})()


def test_the_journal_carries_text_with_its_token_and_drops_a_line_cut_short(tmp_path):
    fifo = tmp_path / "journal"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    journal = Journal(str(fifo))
    journal.event("ranks", ranks=[["h", 1], ["h", 2]])
    ready = time.time() - 10
    journal.event("ready", ratios="1:1", prompts=[[1, 5], [2]], at=ready)
    journal.emit("Hello")
    since = {"admitted": ready + 0.5, "first": ready + 0.75}
    journal.token(Seq(0), 7, since=since)
    journal.emit(" world")
    figures = {"queued_ms": 0.1, "prefill_ms": 2.5, "decode_tokens_per_s": 100.0, "ms_per_token": 10.0}
    journal.token(Seq(0, "length"), 9, figures)
    journal.token(Seq(1), 3, since=since)  # the second sequence has begun
    data = os.read(reader, 1 << 16) + b'{"ev":"token","seq":0,"tok'  # a job killed in the middle of a line
    record, printed = Record(), []
    *lines, rest = data.split(b"\n")
    for line in lines:
        printed.append(record.apply(json.loads(line)))
    with pytest.raises(ValueError):  # the supervisor drops it
        json.loads(rest)
    assert "".join(printed) == "Hello world"
    assert record.ranks == [("h", 1), ("h", 2)] and record.ratios == "1:1"
    ended = {"tokens": [7, 9], "finish": "length", "rng": None, "figures": figures, "since": None}
    begun = {"tokens": [3], "finish": None, "rng": None, "figures": None, "since": since}
    assert record.sequences == {0: ended, 1: begun}
    resume = record.resume("1")
    assert resume.pop("began") == ready  # when the job was ready (rank 0's clock)
    assert resume == {"version": 1, "ratios": "1", "ranks": None, "sequences": [
        {"seq": 0, "prompt": [1, 5], **ended}, {"seq": 1, "prompt": [2], **begun}]}
    path = tmp_path / "resume.json"
    path.write_text(json.dumps(record.resume("1")))
    assert read_resume(path)["sequences"][0]["figures"] == figures
    assert read_resume(path)["sequences"][1]["since"] == since
    os.close(reader)


def test_a_second_loss_before_the_relaunch_has_loaded_starts_from_its_layout(tmp_path):
    """Rank 1 of the relaunched job is lost while it loads (before it says its layout): the next layout is made from
    the relaunched job's, not from the first's."""
    from spmd.supervise import Lost, Supervisor
    sup = Supervisor("mpirun", None, 3, ["--model", "m.gguf", "--threads", "1,2,3"], max_recoveries=3)
    sup.record.apply({"ev": "ready", "ratios": "1:1:1", "prompts": [[1, 2]]})
    first = sup._replan([Lost(2, "localhost", "died (signal 9)")], "", 0.1)
    sup.record.relaunch()  # the relaunched job starts; it is lost before its "ready"
    second = sup._replan([Lost(1, "localhost", "died (signal 9)")], "", 0.1)
    assert (first["ratios"], second["ratios"]) == ("1:1", "1")
    assert sup.run_args == ["--model", "m.gguf", "--threads", "1"] and sup.rank_hosts == ["localhost"]
    assert [r["ratios_before"] for r in sup.recoveries] == ["1:1:1", "1:1"]


@pytest.mark.parametrize("content", ["", "[]", '{"version": 2, "ratios": "1", "sequences": []}',
                                     '{"version": 1, "ratios": "1", "sequences": [{"seq": 0, "prompt": [1], '
                                     '"tokens": ["a"], "finish": null, "rng": null}]}',
                                     '{"version": 1, "ratios": "1", "sequences": [], "began": -1}',
                                     '{"version": 1, "ratios": "1", "sequences": [{"seq": 0, "prompt": [1], '
                                     '"tokens": [2], "finish": "eos", "rng": null, "figures": {"queued_ms": 1}}]}',
                                     '{"version": 1, "ratios": "1", "sequences": [{"seq": 0, "prompt": [1], '
                                     '"tokens": [2], "finish": null, "rng": null, "since": {"admitted": "x", '
                                     '"first": 1}}]}',
                                     '{"version": 1, "ratios": "1", "sequences": [{"seq": 0, "prompt": [1], '  # first
                                     '"tokens": [2], "finish": null, "rng": null, "since": {"admitted": 2, '  # before
                                     '"first": 1}}]}',  # its admission
                                     '{"version": 1, "ratios": "1", "sequences": [{"seq": 0, "prompt": [1], '  # ended
                                     '"tokens": [2], "finish": "eos", "rng": null, "since": {"admitted": 1, '
                                     '"first": 2}}]}',
                                     '{"version": 1, "ratios": "1", "sequences": [{"seq": 0, "prompt": [1], '  # no
                                     '"tokens": [], "finish": null, "rng": null, "since": {"admitted": 1, '  # token
                                     '"first": 2}}]}',
                                     '{"version": 1, "ratios": "1", "began": 5, "sequences": [{"seq": 0, "prompt": '
                                     '[1], "tokens": [2], "finish": null, "rng": null, "since": {"admitted": 1, '
                                     '"first": 2}}]}',  # admitted before the job began
                                     "[" * 100_000 + "]" * 100_000])
def test_a_bad_resume_file_is_refused(tmp_path, content):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(UserError, match="not a resume file"):
        read_resume(path)


def test_a_rank_that_died_ends_the_job_when_mpirun_does_not(tmp_path, capsys):
    """A watcher's line says rank 1 died but mpirun goes on (on a loaded machine it took more than the progress
    timeout to end such a job): the supervisor takes the job down itself, soon, and names the rank and its signal."""
    from spmd.supervise import DEATH_GRACE_S, Supervisor
    rank1 = subprocess.Popen(["sleep", "60"])
    fake = tmp_path / "mpirun"  # it loads, makes a token, reports rank 1's death, and does not end
    fake.write_text(f"""#!{sys.executable}
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from spmd.journal import Journal
journal = Journal(sys.argv[sys.argv.index("--journal") + 1])
journal.event("ranks", ranks=[["localhost", os.getpid()], ["localhost", {rank1.pid}]])
journal.event("ready", ratios="1:1", prompts=[[1, 5]])
journal.event("token", seq=0, token=7, end=None, rng=None, out="Hi")
print("spmd: rank 1 (localhost) died (signal 9)", file=sys.stderr, flush=True)
time.sleep(60)
""")
    fake.chmod(0o755)
    sup = Supervisor(str(fake), None, 2, ["--model", "m.gguf"], progress_timeout=30.0, max_recoveries=0)
    start = time.monotonic()
    try:
        status = sup.run()
    finally:
        rank1.kill()
        rank1.wait()
    assert status != 0 and time.monotonic() - start < DEATH_GRACE_S + 5
    assert sup.job.proc.returncode is not None  # taken down
    out, err = capsys.readouterr()
    assert out == "Hi" and err.splitlines()[-1] == "error: rank 1 (localhost) died (signal 9): giving up (--no-recover)"


@pytest.mark.parametrize("died", [True, False])
def test_a_deaths_aftermath_on_stderr_is_not_said(tmp_path, capsys, died):
    """After a rank's death MPICH's process manager (one proxy a host) and rank 0's failed MPI call say so in lines
    of their own: the supervisor's one line says it instead. Where no rank died, they are said."""
    from spmd.supervise import Supervisor
    fake = tmp_path / "mpirun"
    fake.write_text(f"""#!{sys.executable}
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from spmd.journal import Journal
journal = Journal(sys.argv[sys.argv.index("--journal") + 1])
journal.event("ranks", ranks=[["localhost", os.getpid()], ["localhost", 99999999]])
journal.event("ready", ratios="1:1", prompts=[[1, 5]])
journal.event("token", seq=0, token=7, end=None, rng=None, out="Hi")
print("error: rank 0 (vm): an MPI call failed (Other MPI error): a rank has died or its host is gone",
      file=sys.stderr, flush=True)
print("[mpiexec@vm] HYDU_sock_write (lib/utils/sock.c:250): write error (Bad file descriptor)", file=sys.stderr)
print("a rank's own line", file=sys.stderr)
if {died}:
    print("spmd: rank 1 (localhost) died (signal 9)", file=sys.stderr, flush=True)
sys.exit(1)
""")
    fake.chmod(0o755)
    sup = Supervisor(str(fake), None, 2, ["--model", "m.gguf"], progress_timeout=30.0, max_recoveries=0)
    assert sup.run() != 0
    err = capsys.readouterr().err.splitlines()
    assert "a rank's own line" in err
    aftermath = [line for line in err if "[mpiexec@vm]" in line or "an MPI call failed" in line]
    assert len(aftermath) == (0 if died else 2), err


def test_mpirun_killed_is_one_line(tmp_path, capsys):
    """mpirun itself killed (-9): one line saying so, not silence, and what it started here is ended."""
    from spmd.supervise import Supervisor
    fake = tmp_path / "mpirun"
    fake.write_text(f"""#!{sys.executable}
import os, signal, subprocess, sys
sys.path.insert(0, {str(ROOT)!r})
from spmd.journal import Journal
child = subprocess.Popen(["sleep", "60"])  # a rank it started
journal = Journal(sys.argv[sys.argv.index("--journal") + 1])
journal.event("ranks", ranks=[["localhost", child.pid]])
journal.event("ready", ratios="1", prompts=[[1, 5]])
os.kill(os.getpid(), signal.SIGKILL)
""")
    fake.chmod(0o755)
    sup = Supervisor(str(fake), None, 1, ["--model", "m.gguf"], progress_timeout=30.0, max_recoveries=1)
    assert sup.run() == 128 + signal.SIGKILL
    assert capsys.readouterr().err.splitlines()[-1] == \
        "error: mpirun ended by signal 9 (SIGKILL): the job is over (not relaunched: no rank was lost)"
    from spmd.supervise import process_state
    pid, deadline = sup.record.ranks[0][1], time.monotonic() + 10  # (SIGKILL takes effect as the machine gets to it)
    while process_state(pid) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_state(pid) in (None, "Z")


def test_ranks_the_teardown_ended_after_a_death_are_not_lost(tmp_path, capsys):
    """mpirun's teardown after rank 1's death has already ended rank 0 (healthy) when the supervisor takes the job
    down: only rank 1 is lost, and the job is relaunched on one rank rather than given up as "rank 0 died"."""
    from spmd.supervise import Supervisor
    rank0, rank1 = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    fake, relaunched = tmp_path / "mpirun", tmp_path / "relaunched"
    fake.write_text(f"""#!{sys.executable}
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
if "--resume" in sys.argv:  # the relaunch: says how it was called, and fails
    open({str(relaunched)!r}, "w").write(" ".join(sys.argv[1:]))
    sys.exit(3)
from spmd.journal import Journal
journal = Journal(sys.argv[sys.argv.index("--journal") + 1])
journal.event("ranks", ranks=[["localhost", {rank0.pid}], ["localhost", {rank1.pid}]])
journal.event("ready", ratios="1:1", prompts=[[1, 5]])
journal.event("token", seq=0, token=7, end=None, rng=None, out="Hi")
os.kill({rank1.pid}, 9)
print("spmd: rank 1 (localhost) died (signal 9)", file=sys.stderr, flush=True)
time.sleep(0.3)
os.kill({rank0.pid}, 9)  # the teardown ends rank 0, whose watcher says nothing, and mpirun is slow to end
time.sleep(60)
""")
    fake.chmod(0o755)
    sup = Supervisor(str(fake), None, 2, ["--model", "m.gguf"], progress_timeout=30.0, max_recoveries=1)
    try:
        status = sup.run()
    finally:
        for p in (rank0, rank1):
            p.kill()
            p.wait()
    assert status == 3
    assert relaunched.read_text().split()[:2] == ["-n", "1"]
    err = capsys.readouterr().err
    assert "rank 1 (localhost) died (signal 9)" in err and "rank 0" not in err


def test_a_stop_that_does_not_end_the_job_kills_it(tmp_path, monkeypatch):
    """The user's Ctrl-C is passed on to mpirun, which does not end (it ignores SIGINT here; a rank dying meanwhile
    did that): the supervisor kills the job after STOP_S, and exits as a stopped run does, no relaunch."""
    import threading

    from spmd import supervise
    monkeypatch.setattr(supervise, "STOP_S", 1.0)
    fake, relaunched = tmp_path / "mpirun", tmp_path / "relaunched"
    fake.write_text(f"""#!{sys.executable}
import os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
if "--resume" in sys.argv:
    open({str(relaunched)!r}, "w").write("yes")
signal.signal(signal.SIGINT, signal.SIG_IGN)
from spmd.journal import Journal
journal = Journal(sys.argv[sys.argv.index("--journal") + 1])
journal.event("ranks", ranks=[["localhost", os.getpid()]])
journal.event("ready", ratios="1", prompts=[[1, 5]])
time.sleep(60)
""")
    fake.chmod(0o755)
    sup = supervise.Supervisor(str(fake), None, 1, ["--model", "m.gguf"], progress_timeout=30.0, max_recoveries=1)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    try:
        status = sup.run()
    finally:
        timer.cancel()
    assert status == 128 + signal.SIGINT and time.monotonic() - start < 1.0 + 1.0 + 5
    assert sup.job.proc.returncode is not None and not relaunched.exists()


# ---- whole runs ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", SHAPE, qtype="Q8_0", seed=3)


def reference(model, ranks, layout, *extra):
    """The uninterrupted run's result, by plain mpirun (no supervisor, no journal)."""
    p = subprocess.run([MPIRUN, "-n", str(ranks), sys.executable, "-m", "spmd.run", "--model", model,
                        "--ratios", layout, "--steps", str(STEPS), "--output", "json", *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def supervised(model, ranks, layout, signals, *extra, launch=(), timeout=180):
    env = dict(os.environ, SPMD_TEST_SIGNAL=signals)
    steps = [] if "--steps" in extra else ["--steps", str(STEPS)]  # (an option given twice is refused)
    return subprocess.run([sys.executable, "-m", "spmd.launch", "-n", str(ranks), *launch, "--", "--model", model,
                           "--ratios", layout, *steps, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def kills(tmp_path, *entries):
    """SPMD_TEST_SIGNAL for rank:step:SIG entries, each once (a relaunch does not repeat it)."""
    return ",".join(f"{e}:{tmp_path / f'once{i}'}" for i, e in enumerate(entries))


@pytest.mark.parametrize("ranks, layout, signals, after", [
    (3, "2:3:3", ["2:3:KILL"], "2:3"),  # tensor parallel, early
    (3, "2:3:3", ["1:25:KILL"], "2:3"),  # late
    (3, "1*1*1", ["1:12:KILL"], "1*1"),  # pipeline: a whole stage lost
    (4, "1:1@2*1:1@2", ["3:10:KILL"], "1:1@2*1@2"),  # hybrid
    (4, "1:1@2*1:1@2", ["2:6:KILL", "1:20:KILL"], "1@2*1@2"),  # two failures in one run
    (3, "2:3:3", ["2:8:STOP"], "2:3"),  # a frozen rank: no progress, then it is found stopped
    (3, "2:3:3", ["2:1:STOP"], "2:3"),  # frozen in the first prefill (no prefill speed seen: no bound on it)
    (3, "2:3:3", ["2:6:TERM"], "2:3"),  # its machine shutting down (it used to stop cleanly and end the run)
])
def test_a_lost_rank_is_recovered_from_and_the_text_is_unchanged(model, tmp_path, ranks, layout, signals, after):
    from mpi_models import no_new_shm_files, shm_files
    want = reference(model, ranks, layout, "--prompt", "Hello")
    before = shm_files()
    stop = "STOP" in signals[0]  # found by the stall bound; a death is seen by mpirun, however slow the machine
    p = supervised(model, ranks, layout, kills(tmp_path, *signals), "--prompt", "Hello", "--output", "json",
                   launch=("--progress-timeout", "1" if stop else "20"))
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["tokens"] == want["tokens"] and got["text"] == want["text"]
    recoveries = got["recoveries"]
    assert len(recoveries) == len(signals) and recoveries[-1]["ratios_after"] == after
    first = recoveries[0]
    rank = int(signals[0].split(":")[0])
    signum = signal.Signals["SIG" + signals[0].split(":")[2]].value
    assert first["lost"] == [{"rank": rank, "host": "localhost",
                              "why": "stopped" if stop else f"died (signal {signum})"}]
    assert first["stall_s"] > 0 and first["relaunch_s"] > 0
    notices = [line for line in p.stderr.splitlines() if line.startswith("[spmd] rank")]
    assert len(notices) == len(signals)
    assert "BAD TERMINATION" not in p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr  # a second signal found
    # the wake-up pipe of rank 0's socket closed (BrokenPipeError), or the interpreter's end raced the abort
    assert no_new_shm_files(before)  # (a killed rank's job left its file: the supervisor's janitor)


@pytest.mark.parametrize("output", ["text", "json"])
def test_a_rank_lost_as_the_job_ends_does_not_hold_the_finished_run(model, tmp_path, output):
    """A rank that froze once its work was done (or a host whose link went down as the job ended: mpirun then waits
    for its proxy for ever): the text (or the JSON result) is complete, so the supervisor ends the job once the rank
    is found and the run succeeds, saying so; nothing of the job is left. (A JSON result was taken for a run not
    yet done: relaunched for nothing, or given up on.)"""
    from mpi_models import no_new_shm_files, shm_files
    want = subprocess.run([MPIRUN, "-n", "3", sys.executable, "-m", "spmd.run", "--model", model, "--ratios",
                           "1:1:1", "--steps", str(STEPS), "--prompt", "Hello", "--output", output], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    before = shm_files()
    p = supervised(model, 3, "1:1:1", kills(tmp_path, "2:exit:STOP"), "--prompt", "Hello", "--output", output,
                   launch=("--progress-timeout", "1"), timeout=120)
    if output == "json":
        got, wanted = json.loads(p.stdout), json.loads(want.stdout)
        assert got["tokens"] == wanted["tokens"] and got["recoveries"] == [], p.stderr
    else:
        assert p.stdout == want.stdout, p.stderr
    assert p.returncode == 0, p.stderr
    assert "note: rank 2 (localhost) stopped after the text was complete\n" in p.stderr
    assert "Traceback" not in p.stderr and no_new_shm_files(before)


@pytest.mark.parametrize("output", ["text", "json"])
def test_a_supervised_run_whose_stdout_cannot_be_written_is_one_line(model, output):
    """stdout on a full disk (/dev/full): one line and exit 1, as spmd.run alone says it, where the supervisor's
    writes ended in a traceback."""
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "spmd.launch", "-n", "2", "--", "--model", model, "--ratios", "1:1",
                            "--steps", "8", "--prompt", "Hello", "--output", output], cwd=ROOT, stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=180)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert [line for line in p.stderr.splitlines() if line.startswith("error:")] == [
        "error: cannot write the output: No space left on device"], p.stderr


def test_text_streams_on_without_a_gap_or_a_repeat(model, tmp_path):
    want = subprocess.run([MPIRUN, "-n", "3", sys.executable, "-m", "spmd.run", "--model", model, "--ratios",
                           "1:1:1", "--steps", str(STEPS), "--prompt", "Hello"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    p = supervised(model, 3, "1:1:1", kills(tmp_path, "2:15:KILL"), "--prompt", "Hello")
    assert p.returncode == 0, p.stderr
    assert p.stdout == want.stdout
    assert "[spmd] rank 2 (localhost) died (signal 9); going on with 2 ranks, --ratios 1:1" in p.stderr


def test_several_sequences_and_a_seeded_sampler_go_on_as_if_nothing_happened(model, tmp_path):
    extra = ("--prompt", "Hello", "--prompt", "Once upon", "--prompt", "x", "--sequences", "2",
             "--temperature", "0.9", "--seed", "11")
    want = reference(model, 3, "1:1:1", *extra)
    p = supervised(model, 3, "1:1:1", kills(tmp_path, "1:30:KILL"), *extra, "--output", "json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert [s["tokens"] for s in got["sequences"]] == [s["tokens"] for s in want["sequences"]]
    assert [s["text"] for s in got["sequences"]] == [s["text"] for s in want["sequences"]]
    assert len(got["recoveries"]) == 1 and got["recoveries"][0]["tokens_replayed"] > 0


def test_a_recovered_runs_figures_are_the_whole_runs(model, tmp_path):
    """One sequence at a time, planned (--plan auto), a rank killed as the second sequence runs: the first keeps the
    figures of the job that ran it (the relaunch replays it as ended: it ended with a KeyError where --plan reads
    them); the second keeps its admission and first token, so its decode time spans the wait for the lost rank (its
    figures were the relaunch's alone, and none where the replay's prefill sampled its last token); and the run's
    time and rate cover both jobs, that wait included. (The plan may leave the killed rank idle, and rank 0 then
    goes on generating until the job is taken down: it is slowed from the kill's step on, so that the loss lands
    in the second sequence.)"""
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "spmd.launch", "-n", "3", "--", "--model", model, "--plan", "auto",
                        "--steps", str(STEPS), "--prompt", "Hello", "--prompt", "Once upon", "--prompt", "x",
                        "--sequences", "1", "--output", "json"], cwd=ROOT, capture_output=True, text=True,
                       timeout=180, env=dict(os.environ, SPMD_TEST_SIGNAL=kills(tmp_path, "1:50:KILL"),
                                             SPMD_TEST_SLOW="0:500@50"))
    took = time.monotonic() - t
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    (recovery,) = got["recoveries"]
    assert recovery["tokens_replayed"] < sum(len(s["tokens"]) for s in got["sequences"][:2])  # the first had ended
    for s in got["sequences"]:
        assert all(isinstance(s[k], (int, float)) and s[k] >= 0 for k in ("queued_ms", "prefill_ms")), s
        assert s["ms_per_token"] > 0 and s["decode_tokens_per_s"] > 0, s
    ended = recovery["after_tokens"] - recovery["tokens_replayed"]  # the tokens of the sequences ended before it
    counts = [len(s["tokens"]) for s in got["sequences"]]
    killed = next(i for i in range(len(counts)) if sum(counts[:i + 1]) > ended)  # (they run in order, one at a time)
    assert killed == 1 and ended == counts[0] and recovery["tokens_replayed"] > 0
    s = got["sequences"][killed]
    decode_s = (len(s["tokens"]) - 1) / s["decode_tokens_per_s"]  # at most its decodes' time (an EOS is one more)
    assert decode_s > recovery["stall_s"] / 2, (s, recovery)  # (the supervisor's clock reads the tokens' arrivals)
    assert recovery["stall_s"] < got["elapsed_s"] < took
    assert got["tokens_per_s"] == pytest.approx(got["tokens_generated"] / got["elapsed_s"], rel=1e-3)
    assert got["planner"]["measured_ms_per_token"] > 0


def test_a_planned_run_is_planned_again_on_the_survivors(model, tmp_path):
    """--plan PROFILE: the relaunch plans again from the saved profile's surviving ranks (not the old layout less the
    lost rank), and the text is unchanged. (Every rank's compute is made rank 0's, 1000 times slower, a cluster of
    equal slow machines, so that the plan gives every rank work, the lost one included: this machine's measured
    profile of the tiny model leaves ranks idle, and 3 ranks on 2 cores measure one of them slower by chance.)"""
    profile = tmp_path / "profile.json"
    p = subprocess.run([MPIRUN, "-n", "3", sys.executable, "-m", "spmd.profile", "--model", model, "--out", profile],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    measured = json.loads(profile.read_text())
    slow = [{k: v * 1000 if k.endswith("_ms") else v for k, v in point.items()}
            for point in measured["ranks"][0]["compute"]]
    for rank in measured["ranks"]:
        rank["compute"] = slow
    profile.write_text(json.dumps(measured))
    want = reference(model, 3, "1:1:1", "--prompt", "Hello")
    p = subprocess.run([sys.executable, "-m", "spmd.launch", "-n", "3", "--", "--model", model, "--plan", profile,
                        "--steps", str(STEPS), "--prompt", "Hello", "--output", "json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, SPMD_TEST_SIGNAL=kills(tmp_path, "2:12:KILL")))
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["tokens"] == want["tokens"]
    (recovery,) = got["recoveries"]
    assert recovery["ratios_after"] == got["ratios"] and len(got["plan"]) == 2
    before = [v.split("@")[0] for v in recovery["ratios_before"].replace("*", ":").split(":")]
    assert len(before) == 3 and float(before[2]) > 0, recovery  # the lost rank held work
    assert f"going on with 2 ranks, planned again (--plan {profile})" in p.stderr
    assert len([line for line in p.stderr.splitlines() if line.startswith(f"plan ({profile}): --ratios")]) == 2


def test_rank_0_lost_ends_the_run_with_one_line(model, tmp_path):
    p = supervised(model, 3, "1:1:1", kills(tmp_path, "0:10:KILL"), "--prompt", "Hello")
    assert p.returncode != 0
    assert p.stderr.splitlines()[-1] == ("error: rank 0 (localhost) died (signal 9): it is where the run's output "
                                         "goes, so the run ends here")
    assert "Traceback" not in p.stderr and "BAD TERMINATION" not in p.stdout


def test_rank_0_told_to_stop_ends_the_run_with_one_line(model, tmp_path):
    """SIGTERM to rank 0 itself (not to the launcher): it stops the job as Ctrl-C would; the supervisor says so in
    one line, and MPICH's abort line is not passed on."""
    p = supervised(model, 3, "1:1:1", kills(tmp_path, "0:10:TERM"), "--prompt", "Hello")
    assert p.returncode == 128 + signal.SIGTERM
    assert p.stderr.splitlines()[-1] == ("error: the job was stopped by SIGTERM sent to rank 0 or mpirun, not to "
                                         "this launcher: not relaunched")
    assert "Abort(" not in p.stderr and "Traceback" not in p.stderr


def test_no_recover_names_the_rank_and_keeps_stdout_clean(model, tmp_path):
    p = supervised(model, 3, "1:1:1", kills(tmp_path, "2:10:KILL"), "--prompt", "Hello", "--output", "json",
                   launch=("--no-recover",))
    assert p.returncode != 0 and p.stdout == ""
    assert p.stderr.splitlines()[-1] == "error: rank 2 (localhost) died (signal 9): giving up (--no-recover)"


@pytest.mark.parametrize("rank", [2, 0])
def test_a_killed_watcher_ends_the_run_with_one_line(model, tmp_path, rank):
    """A rank's watcher (its parent process, spmd.watch) killed takes its rank with it and says nothing: mpirun ends
    with status 9 and no line names a rank. One line says so (it used to end silently, the text cut short)."""
    p = supervised(model, 3, "1:1:1", kills(tmp_path, f"{rank}:10:WATCHER_KILL"), "--prompt", "Hello")
    assert p.returncode == 9, p.stderr
    assert p.stderr.splitlines()[-1].startswith("error: the job ended with a process killed (status 9) and no "
                                                "rank's watcher said which rank died"), p.stderr
    assert "Traceback" not in p.stderr and "BAD TERMINATION" not in p.stdout


def test_a_users_mistake_is_not_relaunched(model):
    p = supervised(model, 2, "1:1", "", "--steps", "0")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == "error: --steps must be at least 1 (got 0)"
    assert "[spmd]" not in p.stderr


def test_ctrl_c_stops_a_supervised_run_without_a_relaunch(model, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "spmd.launch", "-n", "2", "--", "--model", model, "--steps",
                             "10000", "--prompt", "Hello"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, SPMD_TEST_SLOW="0:1000"))
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "going on with" not in err


@pytest.mark.parametrize("after", [0.3, 1.5, 4.0])  # starting up, the job loading, generating
def test_ctrl_c_at_any_moment_stops_without_a_relaunch(model, tmp_path, after):
    proc = subprocess.Popen([sys.executable, "-m", "spmd.launch", "-n", "2", "--", "--model", model, "--steps",
                             "10000", "--prompt", "Hello"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, SPMD_TEST_SLOW="0:1000"))
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "going on with" not in err and "Traceback" not in err


def test_the_job_ends_with_its_supervisor(model, tmp_path):
    """kill -9 of spmd.launch itself while rank 0 is slow to write (a long prefill, a slow machine): mpirun and the
    ranks do not go on alone (they did, until their next write into the closed pipe)."""
    if shutil.which("pgrep") is None:
        pytest.skip("no pgrep")
    mark = tmp_path / "mark.gguf"
    shutil.copyfile(model, mark)  # a path no other test's ranks have in their command lines
    pgrep = lambda: subprocess.run(["pgrep", "-f", str(mark)], capture_output=True, text=True).stdout.split()  # noqa
    proc = subprocess.Popen([sys.executable, "-m", "spmd.launch", "-n", "2", "--", "--model", str(mark), "--steps",
                             "10000", "--prompt", "Hello", "--control-socket", "none"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, SPMD_TEST_SLOW="0:1000"))
    for _ in range(100):  # mpirun and both ranks started
        if len(pgrep()) >= 3:
            break
        time.sleep(0.2)
    time.sleep(2)
    proc.kill()
    proc.wait()
    for _ in range(25):
        left = pgrep()
        if not left:
            break
        time.sleep(0.2)
    subprocess.run(["pkill", "-9", "-f", str(mark)])
    assert left == [], "processes of the job left running"


def test_a_rank_lost_during_a_migration(model, tmp_path):
    """Rank 2 dies while the ranks re-partition: the migration is not applied, its client hears so, and the run goes
    on from the layout before it, without rank 2."""
    want = reference(model, 3, "1:1:1", "--prompt", "Hello")
    socket_path = tmp_path / "ctl.sock"
    env = dict(os.environ, SPMD_TEST_SIGNAL=kills(tmp_path, "2:replan:KILL"), SPMD_TEST_SLOW="0:100")
    proc = subprocess.Popen([sys.executable, "-m", "spmd.launch", "-n", "3", "--", "--model", model, "--ratios",
                             "1:1:1", "--steps", str(STEPS), "--prompt", "Hello", "--output", "json",
                             "--control-socket", socket_path], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 30
    while not socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    migrate = subprocess.run([sys.executable, "-m", "spmd.migrate", "--socket", socket_path, "--timeout", "30",
                              "ratios", "1:2:1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    out, err = proc.communicate(timeout=120)
    assert migrate.returncode != 0 and "Traceback" not in migrate.stderr
    assert proc.returncode == 0, err
    got = json.loads(out)
    assert got["tokens"] == want["tokens"]
    assert [r["ratios_after"] for r in got["recoveries"]] == ["1:1"] and got["migrations"] == []


def test_a_watchers_signal_goes_on_to_its_rank_and_is_dropped_once_the_rank_is_gone():
    """spmd.watch's parent passes each signal on to its rank; one that comes after the rank has ended (a job taken
    down sends more than one) has no one to go to and is dropped, where it was a traceback on the rank's stderr."""
    from spmd.watch import passer
    live = subprocess.Popen(["sleep", "30"])
    passer(live.pid)(signal.SIGTERM, None)
    assert live.wait(timeout=10) == -signal.SIGTERM
    gone = subprocess.Popen(["true"])
    gone.wait()  # ended and reaped: no such process any more
    passer(gone.pid)(signal.SIGINT, None)


def test_a_prefill_pending_behind_other_sequences_tokens_keeps_its_allowance():
    """A pipeline holds several steps: while one sequence's long prefill is out, tokens of others come. The prefill
    keeps its allowance (3x its tokens at the prefill speed seen) until its own sequence has a token; it was dropped
    at the first token of any sequence, and a slow prefill then read as a stall."""
    record = Record()
    record.apply({"ev": "prefill", "seqs": [[0, 4], [1, 6]]})
    assert record.prefill == 10
    record.apply({"ev": "token", "seq": 0, "token": 5, "end": None, "rng": None, "out": ""})
    assert record.prefill == 6
    record.apply({"ev": "prefill", "seqs": [[2, 1000]]})
    record.apply({"ev": "token", "seq": 1, "token": 5, "end": None, "rng": None, "out": ""})
    assert record.prefill == 1000

    progress = Progress(timeout=1.0, prefill_s=0.01)  # a prompt token took 10 ms before
    t = progress.last
    progress.saw(t, False, 1000)  # sequence 2's prefill goes out
    for k in range(1, 6):  # tokens of other sequences, 0.1 s apart, while it is pending
        progress.saw(t + 0.1 * k, True, 1000)
    allowance = 1.0 + 3 * 0.01 * 1000  # the timeout and 3x the prefill's time (no gap seen outside a prefill)
    assert progress.overdue(t + 0.5 + allowance - 0.5) is None
    assert progress.overdue(t + 0.5 + allowance + 0.5) is not None
    progress.saw(t + 2.5, True, 0)  # its token: the prefill took 2.5 s for 1000 tokens
    assert progress.prefill_s == pytest.approx(2.5 / 1000)
    assert progress.overdue(t + 2.5 + 1.0 - 0.5) is None
    assert progress.overdue(t + 2.5 + 1.0 + 0.5) is not None  # no prefill pending: no allowance

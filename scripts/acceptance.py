"""The acceptance run: six scenarios on one model, checked against each other, written up as a report.

    scripts/run_acceptance.sh MODEL [--scenarios 1,3,5] [--out DIR] [--steps N] [--prompt TEXT] [--seed S]
                                    [--ranks 3] [--ratios 2:3:3]

MODEL is a GGUF file; `synth:tinyllama` (a random TinyLlama-1.1B-shaped Q4_0 model, `synth:tinyllama:Q8_0` for
another type) or `synth:tiny` (a few hundred kB) writes one from `--seed` first; a llama2.c checkpoint (`.bin`) is
converted first, with the tokenizer of `--llama2c-tokenizer` (default: `tok<vocab>.bin` beside it).

| scenario | ranks | backend | live migrations |
|---|---|---|---|
| 1 | 1 | cpu | |
| 2 | 1 | vulkan | |
| 3 | `--ranks`, `--ratios` | cpu | |
| 4 | `--ranks`, `--ratios` | vulkan (and with `--mixed`, a second run cpu,vulkan,vulkan) | |
| 5 | `--ranks`, `--ratios` | cpu | a fixed schedule through the control socket |
| 6 | `--ranks`, `--ratios` | vulkan | the same schedule |

Every scenario runs greedy (temperature 0) on the same prompt and steps, so all must produce scenario 1's tokens.
Writes OUT/report.md, OUT/report.json and OUT/*.png; exits 1 when a check fails, 2 on a usage error.
"""
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spmd.plan import FFN_BLOCK, apportion, parse_ratios  # noqa: E402

VENV = os.environ.get("SPMD_VENV", ".venv")
PY, MPIRUN = f"{VENV}/bin/python", f"{VENV}/bin/mpirun"  # relative to ROOT, where every command runs
ENV = {**os.environ, "PATH": f"{ROOT / VENV / 'bin'}:{os.environ.get('PATH', '')}"}
RANK_KEYS = ("rank", "host", "backend", "share", "compute_ms", "sync_ms", "bytes_sent", "bytes_per_token",
             "weights_bytes", "peak_rss_bytes")


@dataclass(frozen=True)
class Scenario:
    id: int
    title: str
    multi: bool  # --ranks ranks with --ratios, else one rank
    gpu: bool  # --backend vulkan, else cpu
    migrate: bool  # live migrations during generation


SCENARIOS = {s.id: s for s in (
    Scenario(1, "CPU, single rank", False, False, False),
    Scenario(2, "GPU (Vulkan), single rank", False, True, False),
    Scenario(3, "CPU, non-uniform static", True, False, False),
    Scenario(4, "GPU (Vulkan), non-uniform static", True, True, False),
    Scenario(5, "CPU, non-uniform with live migrations", True, False, True),
    Scenario(6, "GPU (Vulkan), non-uniform with live migrations", True, True, True),
)}


@dataclass
class Setup:
    model: str
    model_origin: str
    prompt: str
    steps: int
    seed: int
    ranks: int
    ratios: str
    allreduce: str
    out: str
    timeout: int
    mixed: bool
    migrate_weights: str = "file"  # spmd.run --migrate-weights of the migration scenarios
    notes: tuple = ()  # free text for the report
    scenario_args: dict = field(default_factory=dict)  # test hook: scenario id -> extra spmd.run flags


# ---- running --------------------------------------------------------------------------------------------------
def spmd_argv(setup: Setup, sc: Scenario, backend=None) -> list:
    """The command line of one scenario's run, relative to the repository root."""
    backend = backend or ("vulkan" if sc.gpu else "cpu")
    argv = [PY, "-m", "spmd.run", "--model", setup.model, "--prompt", setup.prompt, "--steps", str(setup.steps),
            "--seed", str(setup.seed), "--backend", backend, "--output", "json"]
    if sc.multi:
        argv = [MPIRUN, "-n", str(setup.ranks)] + argv + ["--ratios", setup.ratios, "--allreduce", setup.allreduce]
    if sc.migrate:
        argv += ["--migrate-weights", setup.migrate_weights]
    return argv + list(setup.scenario_args.get(sc.id, ()))


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


def start(argv, workdir: Path, name: str):
    """Start a command with stdout/stderr to files (no pipe to fill); its own session, so a timeout ends it all."""
    out, err = open(workdir / f"{name}.stdout", "w+"), open(workdir / f"{name}.stderr", "w+")
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=out, stderr=err, text=True, start_new_session=True)
    return proc, out, err


def finish(proc, out, err, t0, timeout, load0) -> dict:
    try:
        rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        end_group(proc)
        rc = None
    wall = time.perf_counter() - t0
    out.seek(0), err.seek(0)
    stdout, stderr = out.read(), err.read()
    out.close(), err.close()
    record = dict(returncode=rc, wall_s=round(wall, 2), load_avg=[load0, round(os.getloadavg()[0], 2)],
                  stderr_tail=stderr[-4000:], result=parse_result(stdout))
    if rc is None:
        record["error"] = f"timed out after {timeout} s"
    elif rc != 0:
        record["error"] = f"exit {rc}: {one_line(stderr)}"
    elif record["result"] is None:
        record["error"] = "exit 0 but no JSON result on stdout"
    return record


def end_group(proc):
    """End a run we started (its mpirun and every rank: the session `start` gave it), and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_plain(argv, workdir: Path, name: str, timeout: int) -> dict:
    t0, load0 = time.perf_counter(), round(os.getloadavg()[0], 2)
    proc, out, err = start(argv, workdir, name)
    try:
        return finish(proc, out, err, t0, timeout, load0)
    except BaseException:  # Ctrl-C: its own session would not see it
        end_group(proc)
        raise


# ---- live migrations ------------------------------------------------------------------------------------------
def positions(n_prompt: int, steps: int, count: int) -> list:
    """`count` distinct positions from 30% to 75% of the generation's token boundaries (n_prompt ..
    n_prompt + steps - 2): the first stretch lets the client connect, and a boundary is left for a last status."""
    span = steps - 1
    at = []
    for k in range(count):
        p = n_prompt + max(1, round(span * (0.3 + 0.15 * k)))
        at.append(max(p, at[-1] + 1) if at else p)
    return at


def migration_schedule(cfg, ratios: str, n_ranks: int, n_prompt: int, steps: int) -> list:
    """The fixed schedule: kind 1 (KV-head groups), kind 2 (FFN blocks), kind 3 (both), then new ratios, each at its
    own position. Moves are chosen on the plan the earlier moves leave (most-loaded rank to least-loaded)."""
    parsed = parse_ratios(ratios, n_ranks)
    kv = apportion(cfg.n_kv_heads, parsed)
    blocks = apportion(-(-cfg.ffn_dim // FFN_BLOCK), parsed)
    total_blocks = sum(blocks)

    def most(counts, floor=1):
        return max((c, r) for r, c in enumerate(counts) if c >= floor)[1]

    def least(counts, other):
        return min((c, r) for r, c in enumerate(counts) if r != other)[1]

    at = positions(n_prompt, steps, 4)
    cmds = []
    a = most(kv)
    b = least(kv, a)
    cmds.append(dict(at=at[0], args=["move", "--kind", "1", "--from", str(a), "--to", str(b), "--heads", "1"]))
    kv[a], kv[b] = kv[a] - 1, kv[b] + 1
    a = most(blocks, 2)
    b = least(blocks, a)
    n = max(1, min(blocks[a] - 1, total_blocks // (4 * n_ranks)))
    cmds.append(dict(at=at[1], args=["move", "--kind", "2", "--from", str(a), "--to", str(b),
                                     "--ffn-blocks", str(n)]))
    blocks[a], blocks[b] = blocks[a] - n, blocks[b] + n
    a = max((kv[r], blocks[r], r) for r in range(n_ranks) if kv[r] >= 1 and blocks[r] >= 2)[2]
    b = least(blocks, a)
    n = max(1, blocks[a] // 4)
    cmds.append(dict(at=at[2], args=["move", "--kind", "3", "--from", str(a), "--to", str(b), "--heads", "1",
                                     "--ffn-blocks", str(n)]))
    new = ":".join(reversed(ratios.split(":")))
    if new == ratios:
        new = ":".join(str(r + 1) for r in range(n_ranks))
    cmds.append(dict(at=at[3], args=["ratios", new]))
    for c in cmds:
        c["args"] += ["--at", str(c["at"])]
    return cmds


def request_of(args) -> dict:
    """The control socket's request line for a schedule entry given in `spmd.migrate`'s words."""
    if args[0] == "status":
        return {"cmd": "status"}
    flags = dict(zip(args[1::2], args[2::2])) if args[0] == "move" else {"--at": args[args.index("--at") + 1]}
    req = {"cmd": "migrate"}
    if args[0] == "ratios":
        req["ratios"] = args[1]
    else:
        req.update(kind=int(flags["--kind"]), **{"from": int(flags["--from"]), "to": int(flags["--to"])})
        req.update({k: int(flags[f]) for k, f in (("kv_groups", "--heads"), ("ffn_blocks", "--ffn-blocks"))
                    if f in flags})
    return {**req, "mode": "at", "at": int(flags["--at"])}


class ControlClient:
    """One connection to the control socket, kept for the whole schedule: each command is sent the moment the
    previous one is answered (a migration is answered once applied, and only one may wait at a time), so a fast run
    does not pass a position before its command arrives, as it could while a new client process starts up."""

    def __init__(self, sock: str, proc, deadline: float):
        """Connect as soon as the run opens the socket (it starts generating at once)."""
        import socket
        self.sock_path = sock
        while True:
            self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.conn.connect(sock)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.conn.close()
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise
                time.sleep(0.002)
        self.conn.settimeout(max(1.0, deadline - time.perf_counter()))
        self.stream = self.conn.makefile("rwb")

    def ask(self, args) -> dict:
        req = request_of(args)
        t0 = time.perf_counter()
        try:
            self.stream.write((json.dumps(req) + "\n").encode())
            self.stream.flush()
            line = self.stream.readline()
            reply = json.loads(line) if line else {"ok": False, "error": "the run closed the control socket"}
        except (OSError, ValueError) as e:
            reply = {"ok": False, "error": f"control socket: {e}"}
        return dict(command=shlex.join([PY, "-m", "spmd.migrate", "--socket", self.sock_path, *args]), request=req,
                    reply=reply, round_trip_ms=round((time.perf_counter() - t0) * 1e3, 1))

    def close(self):
        self.stream.close()
        self.conn.close()


def cli_status(sock: str):
    """`python -m spmd.migrate --socket S status --json`, started in the background (answered at a boundary)."""
    argv = [PY, "-m", "spmd.migrate", "--socket", sock, "status", "--json"]
    return argv, subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)


def drive(sock: str, proc, schedule, deadline: float) -> list:
    """Over one connection, opened the moment the socket appears: the schedule (each entry is answered once applied
    at its position) and a `status`; meanwhile a `status` through the `spmd.migrate` client. Records in order."""
    try:
        client = ControlClient(sock, proc, deadline)
    except OSError as e:
        return [dict(command="connect", request=None, reply={"ok": False, "error": f"cannot connect: {e}"})]
    cli = cli_status(sock) if (ROOT / "spmd" / "migrate.py").exists() else None
    sent = []
    try:
        for c in schedule:
            sent.append(dict(client.ask(c["args"]), at=c["at"]))
            if not sent[-1]["reply"].get("ok"):
                break
        sent.append(client.ask(["status"]))
    finally:
        client.close()
    if cli is not None:
        argv, p = cli
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.perf_counter()))
            reply = parse_result(out) or {"ok": False, "error": f"exit {p.returncode}: {one_line(err or out)}"}
        except subprocess.TimeoutExpired:
            p.kill()
            out, reply = None, {"ok": False, "error": "no reply"}
        sent.insert(0, dict(command=shlex.join(argv), request=None, reply=reply, via="spmd.migrate"))
    return sent


def too_late(sent) -> bool:
    """A command arrived after its position had passed (a fast run outran the client)."""
    return any("has passed" in str(m["reply"].get("error", "")) for m in sent if "at" in m)


ATTEMPTS = 3  # runs of a migration scenario when its first command arrives too late


def run_migrating(argv, schedule, workdir: Path, name: str, timeout: int) -> dict:
    """Run with a control socket, drive the schedule through it, then wait for the run to end."""
    sock = str(workdir / f"{name}.sock")  # in our private temporary folder
    if len(os.fsencode(sock)) > 100:  # a Unix socket's path has at most 107 bytes
        sock = os.path.join(tempfile.mkdtemp(prefix="spmd-acc-", dir="/tmp"), f"{name}.sock")
    argv = argv + ["--control-socket", sock]
    for attempt in range(1, ATTEMPTS + 1):
        t0, load0 = time.perf_counter(), round(os.getloadavg()[0], 2)
        proc, out, err = start(argv, workdir, name)
        try:
            sent = drive(sock, proc, schedule, t0 + timeout)
            record = finish(proc, out, err, t0, timeout, load0)
        except BaseException:
            end_group(proc)
            raise
        if not too_late(sent):
            break
    record.update(argv=argv, migrations=sent, schedule=schedule, attempts=attempt)
    if not sent and "error" not in record:
        record["error"] = "the control socket never appeared"
    return record


# ---- models ---------------------------------------------------------------------------------------------------
def resolve_model(spec: str, seed: int, model_dir: Path, llama2c_tokenizer) -> tuple:
    """(GGUF path, how it was made)."""
    from spmd import synth
    if spec.startswith("synth:"):
        parts = spec.split(":")
        shapes = {"tinyllama": synth.TINYLLAMA,
                  "tiny": synth.Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn=256, vocab=512, context=128)}
        if parts[1] not in shapes:
            raise click.UsageError(f"{spec}: expected synth:tinyllama[:QTYPE] or synth:tiny[:QTYPE]")
        qtype = parts[2] if len(parts) > 2 else "Q4_0"
        path = model_dir / f"synth-{parts[1]}-{qtype}-seed{seed}.gguf"
        if not path.exists():  # the same shape, type and seed always give the same file
            model_dir.mkdir(parents=True, exist_ok=True)
            synth.write_model(str(path) + ".part", shapes[parts[1]], qtype=qtype, seed=seed)
            os.replace(str(path) + ".part", path)
        return str(path), (f"generated: spmd.synth.write_model(path, spmd.synth.{parts[1].upper()}, "
                           f"qtype={qtype!r}, seed={seed})")
    path = Path(spec).resolve()
    if not path.is_file():
        raise click.UsageError(f"model not found: {spec}")
    if path.suffix != ".bin":
        return str(path), "given"
    return convert_llama2c(path, model_dir, llama2c_tokenizer)


def convert_llama2c(path: Path, model_dir: Path, tokenizer) -> tuple:
    import struct
    vocab = abs(struct.unpack("<7i", path.read_bytes()[:28])[5])
    tok = Path(tokenizer).resolve() if tokenizer else path.parent / f"tok{vocab}.bin"
    if not tok.is_file():
        raise click.UsageError(f"{path} is a llama2.c checkpoint: give its tokenizer with --llama2c-tokenizer")
    model_dir.mkdir(parents=True, exist_ok=True)
    out = model_dir / (path.stem + ".gguf")
    argv = [PY, "-m", "spmd.convert", "llama2c", str(path), str(tok), str(out)]
    p = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if p.returncode != 0:
        raise click.ClickException(f"conversion failed: {one_line(p.stderr or p.stdout)}")
    return str(out), "converted: " + shlex.join(argv)


def model_info(path: str, origin: str, prompt: str) -> dict:
    from spmd.config import read_config
    from spmd.gguf_file import GGUFFile
    from spmd.tokenizer import load_tokenizer
    f = GGUFFile(path)
    cfg = read_config(f)
    types = sorted({t.qtype.name for t in f.tensors.values() if len(t.shape) == 2})
    n_prompt = len(load_tokenizer(f, None).encode(prompt))
    return dict(path=path, origin=origin, bytes=os.path.getsize(path), name=f.meta("general.name"),
                matrix_types=types, config=asdict(cfg), n_prompt=n_prompt)


# ---- the machine ----------------------------------------------------------------------------------------------
def first_line(argv) -> str:
    try:
        p = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=30)
        return (p.stdout.strip().splitlines() or [""])[0]
    except (OSError, subprocess.SubprocessError):
        return ""


def vulkan_devices() -> list:
    """[(deviceName, deviceType)] from `vulkaninfo --summary`, when it is installed."""
    if not shutil.which("vulkaninfo"):
        return []
    try:
        p = subprocess.run(["vulkaninfo", "--summary"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    names = [ln.split("=", 1)[1].strip() for ln in p.stdout.splitlines() if ln.strip().startswith("deviceName")]
    kinds = [ln.split("=", 1)[1].strip() for ln in p.stdout.splitlines() if ln.strip().startswith("deviceType")]
    return list(zip(names, kinds))


def machine_info() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = next((int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    dirty = first_line(["git", "status", "--porcelain", "--untracked-files=no"])
    return dict(host=platform.node(), os=platform.platform(), cpu=cpu, cores=os.cpu_count(), memory_bytes=mem,
                python=platform.python_version(), mpi=" ".join(first_line([f"{VENV}/bin/mpichversion"]).split()) or "?",
                vulkan_devices=[dict(name=n, type=t) for n, t in vulkan_devices()],
                commit=first_line(["git", "rev-parse", "--short", "HEAD"]) + (" (with local changes)" * bool(dirty)),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))


def is_lavapipe(description: str) -> bool:
    return "llvmpipe" in description.lower() or "lavapipe" in description.lower()


# ---- checks ---------------------------------------------------------------------------------------------------
def expected_backends(run) -> list:
    names = run["backend"].split(",")
    return names * run["n_ranks"] if len(names) == 1 else names


def check_run(run, setup: Setup, model: dict, reference) -> list:
    """[(check, ok, reason)] for one run."""
    if "error" in run:
        return [("ran", False, run["error"])]
    r = run["result"]
    out = [("ran", True, f"exit 0 in {run['wall_s']:.1f} s")]
    want = min(setup.steps, model["config"]["context"] - len(r["prompt_tokens"]))
    n = len(r["tokens"])
    out.append(("tokens", n == want or 0 < n < want,
                f"{n} of {want} tokens" + (" (stopped at end of sequence)" if 0 < n < want else "")))
    got = [s.get("backend", "") for s in r["ranks"]]
    bad = [f"rank {i}: {g!r}" for i, (g, w) in enumerate(zip(got, expected_backends(run))) if not g.startswith(w)]
    out.append(("backend", not bad, "; ".join(bad) or ", ".join(sorted(set(got)))))
    out.append(("per-rank stats",) + rank_stats_ok(r, run["n_ranks"]))
    if reference is not run:
        out.append(("same tokens as scenario 1",) + same_tokens(r["tokens"], reference))
    if run.get("schedule") is not None:
        out.append(("migrations applied",) + migrations_ok(run))
        out.append(("status answered",) + statuses_ok(run))
    return out


def same_tokens(tokens, reference) -> tuple:
    """Whether a run's tokens are scenario 1's; token i > 0 comes from the pass at position n_prompt + i - 1."""
    if reference is None:
        return True, "not compared: scenario 1 is not part of this invocation"
    if "error" in reference:
        return False, "scenario 1 failed, so there is nothing to compare with"
    ref = reference["result"]["tokens"]
    at = next((i for i, (a, b) in enumerate(zip(ref, tokens)) if a != b), None)
    if at is not None:
        pos = len(reference["result"]["prompt_tokens"]) + at - 1
        where = "the prefill" if at == 0 else f"the pass at position {pos}"
        return False, f"token {at} (from {where}) differs: {tokens[at]} against scenario 1's {ref[at]}"
    if len(ref) != len(tokens):
        return False, f"{len(tokens)} tokens against scenario 1's {len(ref)}"
    return True, f"all {len(tokens)} tokens equal"


def rank_stats_ok(r, n_ranks) -> tuple:
    ranks = r.get("ranks") or []
    if len(ranks) != n_ranks:
        return False, f"{len(ranks)} rank records for {n_ranks} ranks"
    for s in ranks:
        missing = [k for k in RANK_KEYS if k not in s]
        if missing:
            return False, f"rank {s.get('rank')}: missing {', '.join(missing)}"
        if not (s["compute_ms"] > 0 and s["weights_bytes"] > 0 and s["peak_rss_bytes"] > 0):
            return False, f"rank {s['rank']}: compute, weights or memory figure is zero"
        if n_ranks > 1 and not s["bytes_sent"] > 0:
            return False, f"rank {s['rank']}: sent nothing in a {n_ranks}-rank run"
    return True, f"{n_ranks} rank record{'s' * (n_ranks > 1)} with compute, sync, bytes and memory"


def migrations_ok(run) -> tuple:
    moves = [m for m in run["migrations"] if "at" in m]
    failed = [f"{m['request']}: {m['reply'].get('error', 'not ok')}" for m in moves if not m["reply"].get("ok")]
    if failed:
        return False, "; ".join(failed)
    if len(moves) != len(run["schedule"]):
        return False, f"{len(moves)} of {len(run['schedule'])} commands sent"
    late = [f"asked for {m['at']}, applied at {m['reply'].get('applied_at')}" for m in moves
            if m["reply"].get("applied_at") != m["at"]]
    if late:
        return False, "; ".join(late)
    epochs = [m["reply"].get("epoch") for m in moves]
    if None in epochs or any(b <= a for a, b in zip([0] + epochs, epochs)):
        return False, f"plan epochs did not advance: {epochs}"
    final = run["result"].get("plan_epoch")
    if final != epochs[-1]:
        return False, f"the run ended at plan epoch {final}, not the last command's {epochs[-1]}"
    return True, f"{len(moves)} of {len(moves)} applied at their positions; plan epochs {epochs}"


def statuses_ok(run) -> tuple:
    """The status replies; the client's may miss a run so short that it ended before the client started up."""
    statuses = [m for m in run["migrations"] if "at" not in m]
    missed = [m for m in statuses if m.get("via") and any(e in str(m["reply"].get("error")) for e in NEVER_CONNECTED)]
    bad = [f"{m['command'].split(' --socket ')[0]} status: {m['reply'].get('error', 'not ok')}"
           for m in statuses if not m["reply"].get("ok") and m not in missed]
    if not any(m.get("via") == "spmd.migrate" for m in statuses):
        bad.append("the spmd.migrate client was not exercised (no spmd/migrate.py)")
    answered = sum(bool(m["reply"].get("ok")) for m in statuses)
    note = (" (the spmd.migrate client's started after this short run had ended)" if missed else
            ", one through the spmd.migrate client")
    return not bad, "; ".join(bad) or f"{answered} status replies{note}"


NEVER_CONNECTED = ("No such file or directory", "Connection refused")


def all_checks(runs, setup, model) -> list:
    reference = next((r for r in runs if r["id"] == "1"), None)
    return [dict(run=run["id"], check=check, ok=bool(ok), reason=reason)
            for run in runs for check, ok, reason in check_run(run, setup, model, reference)]


# ---- report ---------------------------------------------------------------------------------------------------
def label(run) -> str:
    return f"{run['id']}: {run['n_ranks']}x {run['backend']}"


def charts(runs, out: Path) -> dict:
    """PNGs of the runs that produced a result: {name: file name}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in runs if r.get("result")]
    if not done:
        return {}
    files = {}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [label(r) for r in done]
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode tokens/s"),
                           (axes[1], "prompt_tokens_per_s", "prompt (prefill) tokens/s")):
        values = [r["result"].get(key) or 0 for r in done]
        bars = ax.barh(names, values, color=["tab:green" if "vulkan" in r["backend"] else "tab:blue" for r in done])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.invert_yaxis()
        ax.tick_params(labelsize=7)
    files["speed"] = save(fig, out / "speed.png")
    per_rank = [(f"{r['id']}/r{s['rank']}", s) for r in done for s in r["result"]["ranks"]]
    xs = range(len(per_rank))
    fig, ax = plt.subplots(figsize=(9, 3.2))
    compute = [s["compute_ms"] / 1e3 for _, s in per_rank]
    sync = [s["sync_ms"] / 1e3 for _, s in per_rank]
    ax.bar(xs, compute, label="compute", color="tab:blue")
    ax.bar(xs, sync, bottom=compute, label="sync (waiting in collectives)", color="tab:orange")
    ax.set_xticks(list(xs), [n for n, _ in per_rank], rotation=60, fontsize=7)
    ax.set_ylabel("seconds (generation)", fontsize=8)
    ax.set_title("per rank: compute vs sync, scenario/rank", fontsize=9)
    ax.legend(fontsize=7)
    files["rank_time"] = save(fig, out / "rank_time.png")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar(xs, [s["bytes_sent"] / 1e6 for _, s in per_rank], color="tab:purple")
    axes[0].set_title("bytes sent per rank (MB, whole run)", fontsize=9)
    axes[1].bar(xs, [s["peak_rss_bytes"] / 2**20 for _, s in per_rank], label="peak RSS", color="tab:gray")
    axes[1].bar(xs, [s["weights_bytes"] / 2**20 for _, s in per_rank], label="weights held", color="tab:red")
    axes[1].set_title("memory per rank (MiB)", fontsize=9)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(list(xs), [n for n, _ in per_rank], rotation=60, fontsize=7)
    files["rank_bytes"] = save(fig, out / "rank_bytes.png")
    return files


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path.name


def table(headers, rows) -> str:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def mib(b):
    return f"{b / 2**20:.0f}" if b >= 10 * 2**20 else f"{b / 2**20:.2f}"


def vulkan_summary(machine, runs) -> str:
    seen = sorted({s["backend"] for r in runs if r.get("result") for s in r["result"]["ranks"]
                   if s["backend"].startswith("vulkan")})
    listed = [f"{d['name']} ({d['type']})" for d in machine["vulkan_devices"]]
    where = seen or listed
    if not where:
        return "none found (no Vulkan run succeeded and vulkaninfo lists no device)"
    soft = all(is_lavapipe(d) for d in where)
    return "; ".join(where) + (" — lavapipe, Mesa's Vulkan driver that runs on the CPU: this machine has no GPU, so "
                               "the GPU scenarios exercise the Vulkan code path at CPU speed" if soft else
                               " — a real GPU")


def setup_section(setup: Setup, machine, model, runs) -> list:
    c = model["config"]
    shape = (f"{c['arch']}, dim {c['dim']}, {c['n_layers']} layers, {c['n_heads']} heads / {c['n_kv_heads']} KV "
             f"heads, FFN {c['ffn_dim']}, vocab {c['vocab']}, context {c['context']}; matrices "
             f"{', '.join(model['matrix_types'])}")
    rows = [("date", machine["date"]), ("machine", f"{machine['host']}: {machine['os']}"),
            ("CPU", f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_bytes'] / 2**30:.1f} GiB memory"),
            ("Vulkan device", vulkan_summary(machine, runs)),
            ("Python / MPI", f"{machine['python']} / {machine['mpi']}"),
            ("commit", machine["commit"]),
            ("model file", f"`{model['path']}` ({model['bytes'] / 1e6:.1f} MB), {model['name']}"),
            ("model made", model["origin"]), ("model shape", shape),
            ("prompt", f"{setup.prompt!r} ({model['n_prompt']} tokens with BOS)"),
            ("steps / seed", f"{setup.steps} / {setup.seed} (greedy: temperature 0)"),
            ("multi-rank runs", f"{setup.ranks} ranks on this machine, ratios {setup.ratios}, allreduce "
                                f"{setup.allreduce}")]
    return ["## Setup", "", table(["", ""], rows), "",
            "Commands run from the repository root (`.venv/` is the set-up's virtual environment).", ""]


def summary_section(runs, checks, files) -> list:
    failed = {c["run"] for c in checks if not c["ok"]}
    rows = []
    for r in runs:
        res = r.get("result") or {}
        rows.append((r["id"], r["title"], r["n_ranks"], r["backend"], len(res.get("tokens", [])) if res else "-",
                     fmt(res.get("prefill_ms"), ".0f"), fmt(res.get("prompt_tokens_per_s")),
                     fmt(res.get("decode_tokens_per_s"), ".2f"), fmt(res.get("ms_per_token")),
                     "FAIL" if r["id"] in failed else "pass"))
    out = ["## Summary", "", table(["run", "scenario", "ranks", "backend", "tokens", "prefill ms", "prompt tok/s",
                                    "decode tok/s", "ms/token", "checks"], rows), ""]
    out += [f"![{name}]({f})" for name, f in files.items()] + [""]
    return out


def headlines(runs) -> list:
    """Ratios of decode speed between the scenarios that ran, and what the migrations cost."""
    tps = {r["id"]: r["result"]["decode_tokens_per_s"] for r in runs if r.get("result")}
    out = []
    for a, b, what in (("3", "1", "CPU, 3 ranks against 1"), ("4", "2", "Vulkan, 3 ranks against 1"),
                       ("2", "1", "one rank, Vulkan against CPU"), ("4", "3", "3 ranks, Vulkan against CPU"),
                       ("5", "3", "CPU, 3 ranks with migrations against without"),
                       ("6", "4", "Vulkan, 3 ranks with migrations against without")):
        if tps.get(a) and tps.get(b):
            out.append(f"{what}: {tps[a]:.2f} / {tps[b]:.2f} decode tok/s = {tps[a] / tps[b]:.2f}x")
            run = next(r for r in runs if r["id"] == a)
            if run["result"].get("migrations"):
                bare = without_migrations(run["result"], run["steps"])[0]
                out[-1] += f" ({fmt(bare, '.2f')} tok/s, {fmt(bare / tps[b], '.2f')}x, without the re-partitions' time)"
    for r in runs:
        moves = (r.get("result") or {}).get("migrations") or []
        if moves:
            ms = [m["ms"] for m in moves]
            out.append(f"run {r['id']}: {len(moves)} re-partitions took {min(ms):.0f} to {max(ms):.0f} ms each "
                       f"(mean {sum(ms) / len(ms):.0f} ms) and moved {sum(m['bytes_moved'] for m in moves):,} bytes "
                       "between ranks in all")
    return ["## Headlines", ""] + [f"- {line}" for line in out] + [""] if out else []


def checks_section(checks) -> list:
    rows = [(c["run"], c["check"], "pass" if c["ok"] else "**FAIL**", c["reason"]) for c in checks]
    return ["## Checks", "", table(["run", "check", "result", "reason"], rows), ""]


def without_migrations(res, steps) -> tuple:
    """(decode tok/s, ms/token) with the re-partitions' time taken out. The decode passes are the tokens after the
    first, or all of them when the run ended at an end-of-sequence token (the pass that sampled it counts)."""
    n = len(res["tokens"]) - 1 + (len(res["tokens"]) < steps)
    decode_ms = res["ms_per_token"] * n - sum(m["ms"] for m in res["migrations"])
    return (n * 1e3 / decode_ms, decode_ms / n) if n and decode_ms > 0 else (None, None)


def run_section(r) -> list:
    out = [f"### {r['id']}. {r['title']}", "", "```", shlex.join(r["argv"]), "```", ""]
    out += [n + "\n" for n in r.get("notes", [])]
    if r.get("attempts", 1) > 1:
        out += [f"Attempt {r['attempts']}: in the attempt{'s' * (r['attempts'] > 2)} before it a command reached the "
                "run after its position had passed (the run generates from the moment it opens its socket, and "
                "each command can only be sent once the one before it is applied).", ""]
    if "error" in r:
        out += [f"**Did not complete:** {r['error']}", ""]
    if r.get("migrations"):
        argv = r["argv"]
        out += migration_lines(r["migrations"], argv[argv.index("--migrate-weights") + 1]
                               if "--migrate-weights" in argv else "file")
    res = r.get("result")
    if not res:
        return out
    out += ["Output (greedy):", "", "```", res["text"], "```", ""]
    if res.get("migrations"):
        spent, (tps, ms) = sum(m["ms"] for m in res["migrations"]), without_migrations(res, r["steps"])
        out += [f"The decode figures include the {len(res['migrations'])} re-partitions ({spent:.0f} ms in all); "
                f"without them: {fmt(tps, '.2f')} tok/s, {fmt(ms)} ms/token.", ""]
    out += [table(["prefill", "prompt tok/s", "decode tok/s", "ms/token", "model load s", "wall s",
                   "load average before / after"],
                  [(f"{res['prompt_tokens'].__len__()} tokens in {res['prefill_ms']:.0f} ms",
                    fmt(res["prompt_tokens_per_s"]), fmt(res["decode_tokens_per_s"], ".2f"),
                    fmt(res["ms_per_token"]), fmt(res["load_s"]), fmt(r["wall_s"]),
                    " / ".join(map(str, r["load_avg"])))]), ""]
    rows = [(s["rank"], s["host"], s["backend"],
             f"{s['share']['heads']} / {s['share']['kv_heads']} / {s['share']['ffn_columns']} / "
             f"{s['share']['vocab_rows']}",
             f"{s['compute_ms']:.0f}", f"{s['sync_ms']:.0f}", f"{s['bytes_sent'] / 1e6:.2f}",
             s["bytes_per_token"], mib(s["weights_bytes"]), mib(s["peak_rss_bytes"])) for s in res["ranks"]]
    out += [table(["rank", "host", "backend", "heads / KV / FFN cols / vocab rows (at the end)", "compute ms",
                   "sync ms", "sent MB", "bytes/token", "weights MiB", "peak RSS MiB"], rows), ""]
    if r.get("schedule") is not None and res.get("plan_epoch") is not None:
        out += [f"Plan epoch at the end: {res['plan_epoch']}.", ""]
    return out


def shares(plan) -> str:
    return "; ".join(f"r{p['rank']} {p['kv_heads']} KV / {p['ffn_columns']} FFN / {p['vocab_rows']} vocab"
                     for p in plan or [])


def brief(reply) -> str:
    """A reply without its bulky plan and per-rank lists (those are in report.json)."""
    return json.dumps({k: v for k, v in reply.items() if k not in ("plan", "ranks")})


def migration_lines(sent, weights_from) -> list:
    rows = []
    for m in sent:
        rep = m["reply"]
        after = shares(rep.get("plan") or rep.get("ranks")) if rep.get("ok") else rep.get("error", "")
        rows.append((m.get("at", "-"), "`" + " ".join(m["command"].split(" --socket ")[1].split()[1:]) + "`",
                     "ok" if rep.get("ok") else "**failed**", rep.get("epoch", "-"),
                     rep.get("applied_at", rep.get("position", "-")), fmt(rep.get("bytes_moved"), ",") if
                     rep.get("bytes_moved") is not None else "-", fmt(rep.get("ms")), after))
    out = ["Control commands. As soon as the run opened its socket, a `status` went through the `spmd.migrate` "
           "client (started in the background; answered at the token boundary it reached, listed first), and over "
           "one connection the migrations went, each sent once the one before it was applied (each applies at the "
           "token boundary before its `--at` position), then a last `status`. The exact command lines and the "
           "replies follow the table. `bytes moved` counts what crossed between ranks: " + (
               "with `--migrate-weights file` each rank reads the weights it takes on from its own copy of the "
               "model, so only KV-cache rows travel." if weights_from == "file" else
               "with `--migrate-weights peer` the moved weights travel from the rank that held them, with the "
               "KV-cache rows."), "",
           table(["--at", "command (after `--socket S`)", "reply", "epoch", "applied at / position", "bytes moved",
                  "ms", "split after (per rank)"], rows), "", "<details><summary>commands and replies</summary>",
           "", "```"]
    for m in sent:
        out += ["$ " + m["command"] + ("" if m.get("via") else "   # sent as " + json.dumps(m["request"])),
                brief(m["reply"])]
    return out + ["```", "", "</details>", ""]


def write_report(out: Path, setup, machine, model, runs, checks) -> Path:
    files = charts(runs, out)
    passed = all(c["ok"] for c in checks)
    md = [f"# Acceptance report: {Path(model['path']).name}", "",
          f"**{'PASS' if passed else 'FAIL'}**: {sum(c['ok'] for c in checks)} of {len(checks)} checks passed "
          f"over {len(runs)} run{'s' * (len(runs) != 1)}.", "",
          "Made by `scripts/run_acceptance.sh` (`scripts/acceptance.py`); every figure below is also in "
          "`report.json`.", ""]
    md += setup_section(setup, machine, model, runs) + summary_section(runs, checks, files) + headlines(runs)
    md += checks_section(checks)
    if setup.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in setup.notes] + [""]
    md += ["## Scenarios", ""]
    for r in runs:
        md += run_section(r)
    (out / "report.md").write_text("\n".join(md))
    everything = dict(passed=passed, setup=asdict(setup), machine=machine, model=model, runs=runs, checks=checks,
                      charts=files)
    (out / "report.json").write_text(json.dumps(everything, indent=1))
    return out / "report.md"


# ---- the run --------------------------------------------------------------------------------------------------
def log(msg):
    print(f"[acceptance] {msg}", file=sys.stderr, flush=True)


def run_scenario(sc: Scenario, setup: Setup, model: dict, workdir: Path) -> list:
    n = setup.ranks if sc.multi else 1
    variants = [("vulkan" if sc.gpu else "cpu", str(sc.id), sc.title)]
    if sc.id == 4 and setup.mixed:
        variants.append((",".join(["cpu"] + ["vulkan"] * (n - 1)), "4m", sc.title + ", mixed backends"))
    runs = []
    for backend, rid, title in variants:
        argv = spmd_argv(setup, sc, backend)
        log(f"run {rid}: {title}: {shlex.join(argv)}")
        run = dict(id=rid, scenario=sc.id, title=title, n_ranks=n, backend=backend, steps=setup.steps, argv=argv)
        if rid == "4m":
            run["notes"] = ["The same static split with rank 0 on the CPU backend and the others on Vulkan."]
        if not sc.migrate:
            run.update(run_plain(argv, workdir, f"run{rid}", setup.timeout))
        elif not (ROOT / "spmd" / "control.py").exists():
            run.update(error="live migration is not available in this tree (no spmd/control.py)", migrations=[],
                       schedule=[], result=None, wall_s=0)
        else:
            try:
                schedule = migration_schedule(SimpleConfig(model["config"]), setup.ratios, n, model["n_prompt"],
                                              setup.steps)
            except ValueError:  # no rank has the units a move needs
                schedule = None
            if schedule is None:
                run.update(error="no migration schedule fits this model and split (a kind-3 move needs a rank with "
                                 "a KV head and two FFN blocks)", migrations=[], schedule=[], result=None, wall_s=0)
            else:
                run.update(run_migrating(argv, schedule, workdir, f"run{rid}", setup.timeout))
        res = run.get("result")
        log(f"run {rid}: " + (run["error"] if "error" in run else
                              f"{len(res['tokens'])} tokens, decode {fmt(res['decode_tokens_per_s'], '.2f')} tok/s, "
                              f"{run['wall_s']:.1f} s"))
        runs.append(run)
    return runs


class SimpleConfig:
    def __init__(self, d):
        self.__dict__.update(d)


def parse_scenarios(text) -> list:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected scenario numbers 1-6 separated by commas") from None
    if not ids or any(i not in SCENARIOS for i in ids):
        raise click.BadParameter(f"{text!r}: expected scenario numbers 1-6 separated by commas")
    return sorted(set(ids))


def parse_scenario_args(items) -> dict:
    out = {}
    for item in items:
        sid, _, args = item.partition("=")
        out[int(sid)] = shlex.split(args)
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("model")
@click.option("--scenarios", default="1,2,3,4,5,6", show_default=True, help="Which to run, e.g. 1,3,5.")
@click.option("--out", default="acceptance-out", show_default=True, help="Report folder (relative to the cwd).")
@click.option("--steps", default=32, show_default=True, type=click.IntRange(min=2), help="Tokens to generate.")
@click.option("--prompt", default="Once upon a time", show_default=True)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of a generated model, and the runs' --seed (greedy runs do not sample).")
@click.option("--ranks", default=3, show_default=True, type=click.IntRange(min=2), help="Ranks of scenarios 3-6.")
@click.option("--ratios", default=None, help="Ratios of scenarios 3-6 [default: 2:3:3, or 2:3:...:3].")
@click.option("--allreduce", default="star", show_default=True, type=click.Choice(["star", "ring", "mpi"]))
@click.option("--mixed", is_flag=True, help="Scenario 4 also runs cpu,vulkan,... (rank 0 on the CPU).")
@click.option("--migrate-weights", default="file", show_default=True, type=click.Choice(["file", "peer"]),
              help="Where scenarios 5 and 6 take moved weights from (spmd.run --migrate-weights).")
@click.option("--timeout", default=1800, show_default=True, help="Seconds a run may take before it is killed.")
@click.option("--model-dir", default=None, help="Where generated and converted models go [default: a folder in /tmp].")
@click.option("--llama2c-tokenizer", default=None, help="The tokenizer of a llama2.c checkpoint MODEL.")
@click.option("--note", "notes", multiple=True, help="A line for the report's notes (repeatable).")
@click.option("--rerender", is_flag=True, help="MODEL is a report.json: check it again and rewrite its report, "
                                             "in --out or beside it, without running anything.")
@click.option("--scenario-args", multiple=True, hidden=True, help="Test hook: ID=FLAGS appended to a run's flags.")
def main(model, scenarios, out, steps, prompt, seed, ranks, ratios, allreduce, mixed, migrate_weights, timeout,
         model_dir, llama2c_tokenizer, notes, rerender, scenario_args):
    """Run the acceptance scenarios on MODEL and write OUT/report.md, report.json and charts; exit 1 when a check
    fails.

    MODEL: a GGUF file; synth:tinyllama[:QTYPE] or synth:tiny[:QTYPE] (a random model written from --seed);
    or a llama2.c checkpoint (.bin), converted first. Scenarios: 1 CPU, 2 Vulkan (one rank each); 3 CPU,
    4 Vulkan (--ranks, --ratios); 5 CPU, 6 Vulkan, the same with live migrations during generation.
    """
    from spmd.errors import UserError
    if rerender:
        saved = json.loads(Path(model).read_text())
        where = Path(model).resolve().parent if out == "acceptance-out" else Path(out).resolve()
        where.mkdir(parents=True, exist_ok=True)
        setup = Setup(**{**saved["setup"], "notes": tuple(saved["setup"]["notes"]) + notes})
        return conclude(where, setup, saved["machine"], saved["model"], saved["runs"])  # exits
    ids = parse_scenarios(scenarios)
    ratios = ratios or ":".join(["2"] + ["3"] * (ranks - 1))
    try:
        parse_ratios(ratios, ranks)
    except UserError as e:
        raise click.BadParameter(str(e), param_hint="--ratios") from None
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(model_dir).resolve() if model_dir else Path(tempfile.gettempdir()) / "spmd-acceptance-models"
    path, origin = resolve_model(model, seed, model_dir, llama2c_tokenizer)
    setup = Setup(path, origin, prompt, steps, seed, ranks, ratios, allreduce, str(out), timeout, mixed,
                  migrate_weights, notes, parse_scenario_args(scenario_args))
    info = model_info(path, origin, prompt)
    machine = machine_info()
    runs = []
    with tempfile.TemporaryDirectory(prefix="spmd-acceptance-") as work:
        for sid in ids:
            runs += run_scenario(SCENARIOS[sid], setup, info, Path(work))
    conclude(out, setup, machine, info, runs)


def conclude(out: Path, setup: Setup, machine, info, runs):
    """Check, write the report, say what failed, and exit 1 if anything did."""
    checks = all_checks(runs, setup, info)
    report = write_report(out, setup, machine, info, runs, checks)
    failed = [c for c in checks if not c["ok"]]
    for c in failed:
        log(f"FAIL run {c['run']}: {c['check']}: {c['reason']}")
    log(f"{'FAIL' if failed else 'PASS'}: {len(checks) - len(failed)} of {len(checks)} checks; report: {report}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(prog_name="scripts/run_acceptance.sh")

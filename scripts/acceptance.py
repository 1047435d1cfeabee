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
The checks and OUT/report.md, OUT/report.json and OUT/*.png come from `scripts/acceptance_report.py`; exits 1 when a
check fails, 2 on a usage error.
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

from acceptance_report import all_checks, fmt, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spmd.plan import FFN_BLOCK, apportion, parse_layout  # noqa: E402

VENV = os.environ.get("SPMD_VENV", ".venv")
PY, MPIRUN = f"{VENV}/bin/python", f"{VENV}/bin/mpirun"  # relative to ROOT, where every command runs
ENV = {**os.environ, "PATH": f"{ROOT / VENV / 'bin'}:{os.environ.get('PATH', '')}"}


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
def positions(n_prompt: int, steps: int, count: int) -> list:
    """`count` distinct positions from 30% to 75% of the generation's token boundaries (n_prompt ..
    n_prompt + steps - 2), a stretch of tokens apart, with a boundary left after them for a last status."""
    span = steps - 1
    at = []
    for k in range(count):
        p = n_prompt + max(1, round(span * (0.3 + 0.15 * k)))
        at.append(max(p, at[-1] + 1) if at else p)
    return at


def migration_schedule(config: dict, ratios: str, n_ranks: int, n_prompt: int, steps: int) -> list:
    """The fixed schedule: kind 1 (KV-head groups), kind 2 (FFN blocks), kind 3 (both), then new ratios, each at its
    own position. Moves are chosen on the plan the earlier moves leave (most-loaded rank to least-loaded); a
    ValueError when no rank has the units a move needs."""
    parsed = parse_layout(ratios, n_ranks)[0].speeds  # one stage
    kv = apportion(config["n_kv_heads"], parsed)
    blocks = apportion(-(-config["ffn_dim"] // FFN_BLOCK), parsed)
    total_blocks = sum(blocks)

    def most(counts, floor=1):
        return max((c, r) for r, c in enumerate(counts) if c >= floor)[1]

    def least(counts, other):
        return min((c, r) for r, c in enumerate(counts) if r != other)[1]

    def move(kind, a, b, heads=0, n_blocks=0):
        kv[a], kv[b] = kv[a] - heads, kv[b] + heads
        blocks[a], blocks[b] = blocks[a] - n_blocks, blocks[b] + n_blocks
        return (["move", "--kind", str(kind), "--from", str(a), "--to", str(b)] + ["--heads", str(heads)] * bool(heads)
                + ["--ffn-blocks", str(n_blocks)] * bool(n_blocks))

    a = most(kv)
    cmds = [move(1, a, least(kv, a), heads=1)]
    a = most(blocks, 2)
    cmds.append(move(2, a, least(blocks, a), n_blocks=max(1, min(blocks[a] - 1, total_blocks // (4 * n_ranks)))))
    a = max((kv[r], blocks[r], r) for r in range(n_ranks) if kv[r] >= 1 and blocks[r] >= 2)[2]
    cmds.append(move(3, a, least(blocks, a), heads=1, n_blocks=max(1, blocks[a] // 4)))
    new = ":".join(reversed(ratios.split(":")))
    cmds.append(["ratios", new if new != ratios else ":".join(str(r + 1) for r in range(n_ranks))])
    return [dict(at=p, args=args + ["--at", str(p)]) for p, args in zip(positions(n_prompt, steps, 4), cmds)]


MIGRATE_FIELDS = {"--kind": "kind", "--from": "from", "--to": "to", "--heads": "kv_groups",
                  "--ffn-blocks": "ffn_blocks"}  # spmd.migrate's flags -> the request's fields


def request_of(args) -> dict:
    """The control socket's request line for a schedule entry given in `spmd.migrate`'s words."""
    if args[0] == "status":
        return {"cmd": "status"}
    req, flags = {"cmd": "migrate"}, args[1:]
    if args[0] == "ratios":
        req["ratios"], flags = args[1], args[2:]
    flags = dict(zip(flags[::2], flags[1::2]))
    req.update({MIGRATE_FIELDS[f]: int(v) for f, v in flags.items() if f in MIGRATE_FIELDS})
    return {**req, "mode": "at", "at": int(flags["--at"])}


class ControlClient:
    """One connection to the control socket, kept for the whole schedule: a migration is answered once applied and
    only one may wait at a time, so each command is sent the moment the one before it is answered (a new client
    process for each would take longer to start than a fast run takes to pass the next position)."""

    def __init__(self, sock: str, proc, deadline: float):
        """Connect as soon as the run opens the socket (before it loads its weights)."""
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


def drive(sock: str, proc, schedule, deadline: float) -> list:
    """A run's control commands, recorded in order. Over one connection, opened the moment the socket appears (so
    the first command waits in the run before generation starts): the schedule, each entry answered once applied
    at its position, then a `status`. Meanwhile, listed first, a `status` through the `spmd.migrate` client."""
    try:
        client = ControlClient(sock, proc, deadline)
    except OSError as e:
        return [dict(command="connect", request=None, reply={"ok": False, "error": f"cannot connect: {e}"})]
    argv = [PY, "-m", "spmd.migrate", "--socket", sock, "status", "--json"]  # answered at a boundary
    cli = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = []
    try:
        for c in schedule:
            sent.append(dict(client.ask(c["args"]), at=c["at"]))
            if not sent[-1]["reply"].get("ok"):
                break
        sent.append(client.ask(["status"]))
    finally:
        client.close()
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


def run_migrating(argv, setup: Setup, model: dict, n_ranks: int, workdir: Path, name: str) -> dict:
    """Run with a control socket and drive the schedule through it (again, up to ATTEMPTS runs in all, while a
    command arrives after its position)."""
    try:
        schedule = migration_schedule(model["config"], setup.ratios, n_ranks, model["n_prompt"], setup.steps)
    except ValueError:  # no rank has the units a move needs
        return dict(error="no migration schedule fits this model and split (a kind-3 move needs a rank with a KV "
                          "head and two FFN blocks)", migrations=[], schedule=[], result=None, wall_s=0)
    sock = str(workdir / f"{name}.sock")  # in our private temporary folder
    if len(os.fsencode(sock)) > 100:  # a Unix socket's path has at most 107 bytes
        sock = os.path.join(tempfile.mkdtemp(prefix="spmd-acc-", dir="/tmp"), f"{name}.sock")
    argv = argv + ["--control-socket", sock]
    for attempt in range(1, ATTEMPTS + 1):
        record = run_job(argv, workdir, name, setup.timeout, lambda proc, end: drive(sock, proc, schedule, end))
        if not too_late(record["migrations"]):
            break
    return dict(record, argv=argv, schedule=schedule, attempts=attempt)


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
    if path.is_dir():
        raise click.UsageError(f"{spec} is a directory: give a GGUF file, a llama2.c .bin or synth:tinyllama")
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
        if sc.migrate:
            run.update(run_migrating(argv, setup, model, n, workdir, f"run{rid}"))
        else:
            run.update(run_job(argv, workdir, f"run{rid}", setup.timeout))
        res = run.get("result")
        log(f"run {rid}: " + (run["error"] if "error" in run else
                              f"{len(res['tokens'])} tokens, decode {fmt(res['decode_tokens_per_s'], '.2f')} tok/s, "
                              f"{run['wall_s']:.1f} s"))
        runs.append(run)
    return runs


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
        conclude(where, setup, saved["machine"], saved["model"], saved["runs"])  # exits
    ids = parse_scenarios(scenarios)
    ratios = ratios or ":".join(["2"] + ["3"] * (ranks - 1))
    try:
        parse_layout(ratios, ranks)
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
    """Check, write the report, say what failed, and exit: 1 if anything did, else 0."""
    checks = all_checks(runs, setup, info)
    report = write_report(out, setup, machine, info, runs, checks)
    failed = [c for c in checks if not c["ok"]]
    for c in failed:
        log(f"FAIL run {c['run']}: {c['check']}: {c['reason']}")
    log(f"{'FAIL' if failed else 'PASS'}: {len(checks) - len(failed)} of {len(checks)} checks; report: {report}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(prog_name="scripts/run_acceptance.sh")

"""The acceptance run: ten scenarios on one model, checked against each other, written up as a report.

    scripts/run_acceptance.sh MODEL [--scenarios 1,3,5] [--out DIR] [--steps N] [--prompt TEXT] [--seed S]
                                    [--ranks 3] [--ratios 2:3:3] [--pipeline 1*1*1]

MODEL is a GGUF file; `synth:tinyllama` (a random TinyLlama-1.1B-shaped Q4_0 model, `synth:tinyllama:Q8_0` for
another type) or `synth:tiny` (a few hundred kB) writes one from `--seed` first; a llama2.c checkpoint (`.bin`) is
converted first, with the tokenizer of `--llama2c-tokenizer` (default: `tok<vocab>.bin` beside it).

| scenario | ranks | backend | live migrations |
|---|---|---|---|
| 1 | 1 | cpu | |
| 2 | 1 | vulkan | |
| 3 | `--ranks`, `--ratios` | cpu | |
| 4 | `--ranks`, `--ratios` | vulkan (and with `--mixed`, a second run cpu,vulkan,vulkan) | |
| 5 | `--ranks`, `--ratios` | cpu | kind 1, 2, 3 moves and new ratios (`acceptance_schedules.unit_schedule`) |
| 6 | `--ranks`, `--ratios` | vulkan | the same schedule |
| 7 | `--ranks`, pipeline stages `--pipeline` | cpu | |
| 8 | `--ranks`, `--pipeline` | vulkan (and with `--mixed`, a second run cpu,vulkan,vulkan) | |
| 9 | `--ranks`, `--pipeline` | cpu | layers carried through the stages and back, new stages, a move in one |
| 10 | `--ranks`, `--pipeline` | vulkan | the same schedule |

Every scenario runs greedy (temperature 0) on the same prompt and steps, so all must produce scenario 1's tokens.
`acceptance_runs.py` runs a job and drives its control socket, `acceptance_schedules.py` makes the migration
schedules, `acceptance_checks.py` judges the runs, and `acceptance_report.py` (with `acceptance_charts.py`) writes
OUT/report.md, OUT/report.json and OUT/*.png. Exits 1 when a check fails, 2 on a usage error.
"""
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # spmd from this checkout
from acceptance_checks import all_checks  # noqa: E402
from acceptance_report import fmt, write_report  # noqa: E402
from acceptance_runs import BIN, ENV, MPIRUN, PY, ROOT, one_line, run_job, run_migrating  # noqa: E402
from acceptance_schedules import layer_schedule, unit_schedule  # noqa: E402
from spmd.choices import ALLREDUCES, WEIGHT_SOURCES  # noqa: E402
from spmd.plan import parse_layout  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    id: int
    title: str
    split: str  # "one": one rank; "tensor": --ranks with --ratios (one stage); "pipeline": --ranks with --pipeline
    gpu: bool  # --backend vulkan, else cpu
    migrate: bool  # live migrations during generation

    @property
    def multi(self) -> bool:
        return self.split != "one"


SCENARIOS = {s.id: s for s in (
    Scenario(1, "CPU, single rank", "one", False, False),
    Scenario(2, "GPU (Vulkan), single rank", "one", True, False),
    Scenario(3, "CPU, non-uniform static", "tensor", False, False),
    Scenario(4, "GPU (Vulkan), non-uniform static", "tensor", True, False),
    Scenario(5, "CPU, non-uniform with live migrations", "tensor", False, True),
    Scenario(6, "GPU (Vulkan), non-uniform with live migrations", "tensor", True, True),
    Scenario(7, "CPU, pipeline stages static", "pipeline", False, False),
    Scenario(8, "GPU (Vulkan), pipeline stages static", "pipeline", True, False),
    Scenario(9, "CPU, pipeline stages with live layer moves", "pipeline", False, True),
    Scenario(10, "GPU (Vulkan), pipeline stages with live layer moves", "pipeline", True, True),
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
    pipeline: str = None  # the layout of scenarios 7-10 (None in a report.json made before they existed)


# ---- the runs -------------------------------------------------------------------------------------------------
def spmd_argv(setup: Setup, sc: Scenario, backend=None) -> list:
    """The command line of one scenario's run, relative to the repository root."""
    backend = backend or ("vulkan" if sc.gpu else "cpu")
    argv = [PY, "-m", "spmd.run", "--model", setup.model, "--prompt", setup.prompt, "--steps", str(setup.steps),
            "--seed", str(setup.seed), "--backend", backend, "--output", "json"]
    if sc.multi:
        argv = [MPIRUN, "-n", str(setup.ranks)] + argv + ["--ratios", layout_of(sc, setup), "--allreduce",
                                                          setup.allreduce]
    if sc.migrate:
        argv += ["--migrate-weights", setup.migrate_weights]
    return argv + list(setup.scenario_args.get(sc.id, ()))


def layout_of(sc: Scenario, setup: Setup):
    """The --ratios of a scenario's runs (None: one rank)."""
    return {"one": None, "tensor": setup.ratios, "pipeline": setup.pipeline}[sc.split]


def schedule_of(sc: Scenario, setup: Setup, model: dict):
    """The scenario's migration schedule, or the one-line reason why none fits the model and layout."""
    make = layer_schedule if sc.split == "pipeline" else unit_schedule
    try:
        return make(model["config"], layout_of(sc, setup), setup.ranks, model["n_prompt"], setup.steps)
    except ValueError as e:
        why = ("" if sc.split == "pipeline" else
               " (a kind-3 move needs a rank with a KV head and two FFN blocks, and the moves distinct positions)")
        return f"no migration schedule fits this model and layout{why}: {e}"


# ---- models ---------------------------------------------------------------------------------------------------
def resolve_model(spec: str, seed: int, model_dir: Path, llama2c_tokenizer) -> tuple:
    """(GGUF path, how it was made)."""
    from spmd import synth
    if spec.startswith("synth:"):
        parts = spec.split(":")
        shapes = {"tinyllama": synth.TINYLLAMA,
                  "tiny": synth.Shape(dim=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn=256, vocab=512, context=128)}
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
                python=platform.python_version(),
                mpi=" ".join(first_line([str(BIN / "mpichversion")]).split()) or "?",
                vulkan_devices=[dict(name=n, type=t) for n, t in vulkan_devices()],
                commit=first_line(["git", "rev-parse", "--short", "HEAD"]) + (" (with local changes)" * bool(dirty)),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))


# ---- the run --------------------------------------------------------------------------------------------------
def log(msg):
    print(f"[acceptance] {msg}", file=sys.stderr, flush=True)


def run_scenario(sc: Scenario, setup: Setup, model: dict, workdir: Path) -> list:
    n = setup.ranks if sc.multi else 1
    variants = [("vulkan" if sc.gpu else "cpu", str(sc.id), sc.title)]
    if sc.gpu and sc.multi and not sc.migrate and setup.mixed:
        variants.append((",".join(["cpu"] + ["vulkan"] * (n - 1)), f"{sc.id}m", sc.title + ", mixed backends"))
    runs = []
    for backend, rid, title in variants:
        argv = spmd_argv(setup, sc, backend)
        log(f"run {rid}: {title}: {shlex.join(argv)}")
        run = dict(id=rid, scenario=sc.id, title=title, n_ranks=n, backend=backend, steps=setup.steps, argv=argv,
                   layout=layout_of(sc, setup))
        if rid.endswith("m"):
            run["notes"] = [f"The same static {'layout' if sc.split == 'pipeline' else 'split'} with rank 0 on the "
                            "CPU backend and the others on Vulkan."]
        schedule = schedule_of(sc, setup, model) if sc.migrate else None
        if isinstance(schedule, str):  # none fits: the scenario fails with the reason
            run.update(error=schedule, migrations=[], schedule=[], result=None, wall_s=0)
        elif sc.migrate:
            run.update(run_migrating(argv, schedule, workdir, f"run{rid}", setup.timeout))
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
        ids = None
    if not ids or any(i not in SCENARIOS for i in ids):
        raise click.BadParameter(f"{text!r}: expected scenario numbers 1-{len(SCENARIOS)} separated by commas")
    return sorted(set(ids))


def parse_scenario_args(items) -> dict:
    out = {}
    for item in items:
        sid, _, args = item.partition("=")
        out[int(sid)] = shlex.split(args)
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("model")
@click.option("--scenarios", default=",".join(map(str, SCENARIOS)), show_default=True,
              help="Which to run, e.g. 1,3,5,7,9.")
@click.option("--out", default="acceptance-out", show_default=True, help="Report folder (relative to the cwd).")
@click.option("--steps", default=32, show_default=True, type=click.IntRange(min=2), help="Tokens to generate.")
@click.option("--prompt", default="Once upon a time", show_default=True)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of a generated model, and the runs' --seed (greedy runs do not sample).")
@click.option("--ranks", default=3, show_default=True, type=click.IntRange(min=2), help="Ranks of scenarios 3-10.")
@click.option("--ratios", default=None, help="Ratios of scenarios 3-6, one stage [default: 2:3:3, or 2:3:...:3].")
@click.option("--pipeline", default=None, help="Layout of scenarios 7-10, at least two stages (`*` between stages, "
              "`:` between the ranks of one, `@N` a stage's layers) [default: 1*1*1, or 1*...*1].")
@click.option("--allreduce", default="star", show_default=True, type=click.Choice(ALLREDUCES))
@click.option("--mixed", is_flag=True, help="Scenarios 4 and 8 also run cpu,vulkan,... (rank 0 on the CPU).")
@click.option("--migrate-weights", default="file", show_default=True, type=click.Choice(WEIGHT_SOURCES),
              help="Where scenarios 5, 6, 9, 10 take moved weights from (spmd.run --migrate-weights).")
@click.option("--timeout", default=1800, show_default=True, help="Seconds a run may take before it is killed.")
@click.option("--model-dir", default=None, help="Where generated and converted models go [default: a folder in /tmp].")
@click.option("--llama2c-tokenizer", default=None, help="The tokenizer of a llama2.c checkpoint MODEL.")
@click.option("--note", "notes", multiple=True, help="A line for the report's notes (repeatable).")
@click.option("--rerender", is_flag=True, help="MODEL is a report.json: check it again and rewrite its report, "
              "in --out or beside it, without running anything.")
@click.option("--scenario-args", multiple=True, hidden=True, help="Test hook: ID=FLAGS appended to a run's flags.")
def main(model, scenarios, out, steps, prompt, seed, ranks, ratios, pipeline, allreduce, mixed, migrate_weights,
         timeout, model_dir, llama2c_tokenizer, notes, rerender, scenario_args):
    """Run the acceptance scenarios on MODEL and write OUT/report.md, report.json and charts; exit 1 when a check
    fails.

    MODEL: a GGUF file; synth:tinyllama[:QTYPE] or synth:tiny[:QTYPE] (a random model written from --seed);
    or a llama2.c checkpoint (.bin), converted first. Scenarios: 1 CPU, 2 Vulkan (one rank each); 3 CPU,
    4 Vulkan (--ranks, --ratios); 5 CPU, 6 Vulkan, the same with live migrations during generation; 7 CPU,
    8 Vulkan in pipeline stages (--ranks, --pipeline); 9 CPU, 10 Vulkan, the same with live layer moves.
    """
    if rerender:
        saved = json.loads(Path(model).read_text())
        where = Path(model).resolve().parent if out == "acceptance-out" else Path(out).resolve()
        where.mkdir(parents=True, exist_ok=True)
        setup = Setup(**{**saved["setup"], "notes": tuple(saved["setup"]["notes"]) + notes})
        conclude(where, setup, saved["machine"], saved["model"], saved["runs"])  # exits
    ids = parse_scenarios(scenarios)
    ratios = check_layout(ratios or ":".join(["2"] + ["3"] * (ranks - 1)), ranks, "--ratios", 1)
    pipeline = check_layout(pipeline or "*".join(["1"] * ranks), ranks, "--pipeline", 2)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(model_dir).resolve() if model_dir else Path(tempfile.gettempdir()) / "spmd-acceptance-models"
    path, origin = resolve_model(model, seed, model_dir, llama2c_tokenizer)
    setup = Setup(path, origin, prompt, steps, seed, ranks, ratios, allreduce, str(out), timeout, mixed,
                  migrate_weights, notes, parse_scenario_args(scenario_args), pipeline)
    info = model_info(path, origin, prompt)
    machine = machine_info()
    runs = []
    with tempfile.TemporaryDirectory(prefix="spmd-acceptance-") as work:
        for sid in ids:
            runs += run_scenario(SCENARIOS[sid], setup, info, Path(work))
    conclude(out, setup, machine, info, runs)


def check_layout(text, ranks, flag, stages) -> str:
    """`text` when it is a layout for `ranks` ranks with exactly one stage (`stages` 1) or at least two (2)."""
    from spmd.errors import UserError
    try:
        n = len(parse_layout(text, ranks))
    except UserError as e:
        raise click.BadParameter(str(e), param_hint=flag) from None
    if (n == 1) != (stages == 1):
        raise click.BadParameter(f"{text!r} has {n} stage{'s' * (n != 1)}: expected "
                                 + ("one (the pipeline scenarios use --pipeline)" if stages == 1 else
                                    "two or more (stages separated by '*')"), param_hint=flag)
    return text


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

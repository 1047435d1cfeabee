"""`python -m spmd.run`: the command every rank runs. Rank 0 streams the text to stdout and one summary line to
stderr (or prints one JSON object with --output json); every other rank stays quiet unless something is wrong."""
from . import needs  # (first: one line, not a traceback, where this Python lacks the set-up)
import contextlib
import json
import math
import os
import signal
import sys
import time
import traceback

import click

from .choices import ACTIVATIONS, ALLREDUCES, KV_CACHES, WEIGHT_SOURCES
from .errors import UserError, click_error_line, nonempty, refuse_repeats


def finite(_ctx, param, value):
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", param=param)
    return value


def wait_s(ctx, param, value):
    """--wait-timeout: 0 (for ever), or a second at least (a shorter one fires between any two steps)."""
    value = finite(ctx, param, value)
    if 0 < value < 1:
        raise click.BadParameter(f"{value} is below a second: give 0 (wait for ever) or at least 1", param=param)
    return value


def comma_list(_ctx, _param, text):
    """A per-rank flag's value without blanks around its commas, as the summary and JSON result echo it."""
    return text if text is None else ",".join(part.strip() for part in text.split(","))


def split_ints(_ctx, _param, text):
    if text is None:
        return None
    parts = [t.strip() for t in text.split(",")]
    if not all(t.isascii() and t.isdigit() for t in parts):  # (no empty item, sign or other script's digits)
        raise click.BadParameter(f"{text!r}: expected token ids (integers from 0) separated by commas")
    return tuple(int(t) for t in parts)


CLUSTER_OPTIONS = [  # the flags spmd.run and spmd.serve share: the model, and how the cluster runs it
    click.option("--model", "-m", default=None, metavar="FILE.gguf",
                 help="GGUF model file (the same path on every host). Default: the small model that ships with "
                      "spmd (spmd/embedded.gguf, trained on Python's documentation)."),
    click.option("--ratios", default=None, metavar="LAYOUT",
                 help="Each rank's relative speed, one number per rank: 2:3:3 (one stage, tensor parallel). '*' "
                      "separates pipeline stages of consecutive ranks, '@N' pins a stage's layer count: 1*1*1, "
                      "1:1*2:3, 1:1@10*1:1@12; 0 leaves a rank (never rank 0) idle: 2:0:3. Default: equal, one stage "
                      "(ranks each on a GPU of its own on one host: a stage each, 1*1, where that fits memory)."),
    click.option("--plan", default=None, metavar="auto|PROFILE.json",
                 help="Instead of --ratios: the planner chooses the layout (ranks left idle, stages, shares) from the "
                      "cluster measured at start-up (auto, a few seconds) or a saved profile (python -m spmd.profile); "
                      "for the least ms per token with one sequence, the most tokens/s with several."),
    click.option("--rebalance", is_flag=True,
                 help="Keep the split balanced while it runs: every rank's measured compute corrects the cluster's "
                      "profile (measured at start-up unless --plan FILE gives one), and a re-plan predicted at least "
                      "10% faster, worth its cost, is applied as a live migration; each move is logged on stderr."),
    click.option("--allreduce", default="star", show_default=True, type=click.Choice(ALLREDUCES),
                 help="How a stage's ranks add up their partial sums. star: reduce to the stage's first rank + "
                      "broadcast; ring: weighted reduce-scatter + allgather; mpi: the MPI library's Allreduce."),
    click.option("--backend", default="cpu", show_default=True, metavar="NAME[,NAME...]", callback=comma_list,
                 help="cpu: numba kernels on quantised weights; vulkan: GLSL compute shaders on a GPU (or lavapipe); "
                      "numpy: the readable reference. One for every rank, or one per rank: cpu,vulkan,vulkan."),
    click.option("--activations", default="f32", show_default=True, type=click.Choice(ACTIVATIONS),
                 help="The arithmetic on quantised weights. f32: float32 activations, the reference's products to "
                      "within float rounding. int8: each 32 activations quantised to 8 bits as llama.cpp does "
                      "(on the cpu backend prompts 2-3x faster, decode about the same; on a GPU faster decode for the "
                      "larger models, and prompts on its matrix units for every quantised type but Q2_K; results "
                      "move by about 0.5%, as llama.cpp's do; the numpy backend keeps float32); the cpu "
                      "backend's partial sums add up exactly, so its text still does not change with the layout "
                      "(README)."),
    click.option("--kv-cache", default="f32", show_default=True, type=click.Choice(KV_CACHES),
                 help="What the KV caches keep keys and values in. f16: half the memory of f32 (a sequence's "
                      "context costs half as much on every rank, as llama.cpp's default cache), each key and value "
                      "rounded to float16 as it is stored."),
    click.option("--gpu", default=None, metavar="N[,N...]", callback=comma_list,
                 help="Vulkan device index on each rank's host, one for all or one per rank. "
                      "Default: the rank's index among the ranks on its host, wrapping round where the host has "
                      "fewer devices (two ranks then share one)."),
    click.option("--threads", default=None, metavar="N[,N...]", callback=comma_list,
                 help="Kernel threads of each rank, one for all or one per rank, at most the cores it may run on "
                      "(with Open MPI: mpirun --bind-to none). Default: those cores divided among the host's ranks "
                      "(give 1 where hosts share cores, as simulated hosts do)."),
    click.option("--memory-limit", default=None, metavar="SIZE[,SIZE...]", callback=comma_list,
                 help="The most memory each rank's weights, KV caches and activations may take: 2G, 512M, 1.5GiB "
                      "(powers of 1024), one for all or one per rank (none: no limit for that rank); the runtime "
                      "adds about 200-250 MiB. A share that does not fit streams: what fits stays resident, the rest "
                      "is read half a layer at a time, ahead of use, from a spill file in $TMPDIR (default /var/tmp; "
                      "on a disk: it takes the streamed bytes). On a vulkan rank: what it holds on its GPU.",
                 ),
    click.option("--tokenizer", default=None, metavar="FILE.model",
                 help="A sentencepiece .model to use instead of the vocabulary in the GGUF."),
    click.option("--control-socket", default=None, metavar="PATH", callback=nonempty,
                 help="Unix socket on rank 0 for live migrations (python -m spmd.migrate). "
                      "Default: $XDG_RUNTIME_DIR/spmd/control-PID.sock or /tmp/spmd-UID/control-PID.sock; none: off."),
    click.option("--migrate-weights", default="file", show_default=True, type=click.Choice(WEIGHT_SOURCES),
                 help="Where a migration's moved weights come from: file: each rank reads them from its own model "
                      "file; peer: the rank that held them reads and sends them."),
    click.option("--wait-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0), callback=wait_s,
                 metavar="S", help="Seconds a rank waits for the next step, or for the others in one exchange, "
                                   "before the job gives up with one line (a rank stopped, a host gone); 0 waits for "
                                   "ever."),
]


PER_RANK_FLAGS = ("--backend", "--gpu", "--threads", "--memory-limit")  # one value for all, or one per rank


def cluster_options(command):
    """Decorate a click command with CLUSTER_OPTIONS."""
    for option in reversed(CLUSTER_OPTIONS):
        command = option(command)
    return command


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--prompt", "-p", multiple=True, metavar="TEXT",
              help="Text to continue; BOS is added as the model says. Repeat it for several sequences.")
@click.option("--prompt-ids", default=None, metavar="IDS", callback=split_ints,
              help="Comma-separated token ids to use as the prompt instead of --prompt.")
@click.option("--prompts-file", default=None, metavar="FILE", callback=nonempty,
              help="More prompts, one a line (blank lines skipped); FILE.jsonl: one JSON object a line with "
                   "\"prompt\" (or \"prompt_ids\") and optional \"steps\", \"temperature\", \"top_k\", "
                   "\"top_p\", \"seed\".")
@click.option("--sequences", default=None, type=click.IntRange(min=1), metavar="K",
              help="The most sequences in flight at once: pipeline stages work on different ones, and a stage "
                   "decodes the ones it holds as one batch. Default: the number of pipeline stages (with --plan: "
                   "every prompt).")
@click.option("--steps", "-n", default=64, show_default=True, type=int, help="Most tokens to generate.")
@click.option("--temperature", "-t", default=0.0, show_default=True, type=click.FloatRange(min=0),
              callback=finite, help="0 is greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 keeps all tokens.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1),
              callback=finite, help="Nucleus sampling mass (0: the most probable token alone).")
@click.option("--seed", default=None, type=click.IntRange(min=0), help="Sampling seed (default: random).")
@click.option("--output", default="text", show_default=True, type=click.Choice(["text", "json"]),
              help="text: stream to stdout and a summary line on stderr; json: one object on stdout.")
@click.option("--journal", default=None, hidden=True, help="spmd.supervise's pipe (spmd.journal), instead of stdout.")
@click.option("--resume", default=None, hidden=True, help="spmd.supervise's resume file: go on from there.")
@cluster_options
def cli(**kw):
    """Generate text with a GGUF model split across MPI ranks: non-uniform tensor parallelism, pipeline stages, or both.

    Run it on every rank: mpirun -hostfile hostfiles/localhost.txt -n 3 python -m spmd.run --model m.gguf
    """
    return kw


def parse_args(argv, is_root, command=cli, prog="python -m spmd.run"):
    """The options dict, or an exit code when click handled it (--help, a bad flag: one line, "error: ..."). Only
    rank 0 prints."""
    quiet = contextlib.ExitStack()
    if not is_root:
        devnull = quiet.enter_context(open(os.devnull, "w"))
        quiet.enter_context(contextlib.redirect_stdout(devnull))
        quiet.enter_context(contextlib.redirect_stderr(devnull))
    refuse_repeats(command)
    with quiet:
        try:
            return command.main(args=argv, prog_name=prog, standalone_mode=False)
        except click.ClickException as e:
            click.echo(click_error_line(e, prog), err=True)
            return e.exit_code
        except click.exceptions.Abort:
            return 1


def summary(r):
    """The one line on stderr after a text-mode run."""
    staged = len(r["stages"]) > 1

    def where(s):
        if s["stage"] is None:
            return " idle"
        first, stop = s["share"]["layers"]
        return f" stage {s['stage']} layers {first}-{stop - 1}" if staged else ""
    ranks = "; ".join(f"rank {s['rank']} ({s['host']}){where(s)} compute {s['compute_ms']:.0f} ms sync "
                      f"{s['sync_ms']:.0f} ms sent {s['bytes_sent'] / 1e6:.2f} MB rss "
                      f"{s['peak_rss_bytes'] / 2**20:.0f} MiB" for s in r["ranks"])
    int8 = ", int8 activations" if r["activations"] == "int8" else ""
    setup = f"{r['n_ranks']} rank(s) {r['allreduce']} {r['ratios']}, {r['backend']}{int8}; {ranks}"
    if "sequences" in r:
        rate = f"{r['tokens_per_s']:.2f} tok/s in all" if r["tokens_per_s"] else "-"
        return (f"[spmd] {len(r['sequences'])} sequences, {r['tokens_generated']} tokens in {r['elapsed_s']:.2f} s "
                f"({rate}), at most {r['sequences_in_flight']} in flight; {setup}")
    decode = (f"decode {r['decode_tokens_per_s']:.2f} tok/s ({r['ms_per_token']:.1f} ms/token)"
              if r["decode_tokens_per_s"] else "decode -")
    prefill = f"{r['prefill_ms']:.0f} ms" if r["prefill_ms"] is not None else "-"
    return f"[spmd] {len(r['tokens'])} tokens, {decode}, prefill {len(r['prompt_tokens'])} tokens in {prefill}; {setup}"


_mid_line = [False]  # the text streamed to stdout ends mid-line (where `root_log` starts a note on a new line)


def write_stdout(piece):
    """Stream a piece of text; False once the reader has gone (`| head`), after which stdout is silenced. A stdout
    that cannot be written (a full disk, /dev/full) is a UserError."""
    try:
        sys.stdout.write(piece)
        sys.stdout.flush()
        if piece:
            _mid_line[0] = not piece.endswith("\n")
        return True
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error when Python flushes at exit
        if isinstance(e, BrokenPipeError):
            return False
        raise UserError(f"cannot write the output: {e.strerror or e}") from None


def main(argv=None):
    """Ctrl-C, or a SIGTERM (mpirun passes both on to every rank) or a SIGHUP (a terminal closed), stops without a
    traceback, with the shell's exit status for the signal (130, 143, 129); under way, every rank stops together and
    rank 0's control socket file is removed."""
    needs.interruptible()
    try:
        watched()
        run(argv)
    except KeyboardInterrupt:  # before the engine started (importing, parsing): nothing to clean up
        sys.exit(signal_status())


def watched():
    """Supervised, a watcher process says which rank died (spmd.watch). A SIGTERM or SIGHUP stops the rank as
    Ctrl-C does, except a supervised rank other than 0, which dies of it (`term_is_loss`)."""
    from .watch import fork_rank
    fork_rank()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL if term_is_loss() else interrupt)


def term_is_loss():
    """Supervised, a rank other than 0: a SIGTERM is its machine going down (the supervisor ends a job with SIGINT),
    so the rank dies of it and the supervisor goes on without it."""
    return os.environ.get("SPMD_WATCH") == "1" and os.environ.get("PMI_RANK", "0") != "0"


_signals = []  # the signal that stopped the run: SIGTERM is raised as a KeyboardInterrupt too


def interrupt(signum, _frame):
    _signals.append(signum)
    raise KeyboardInterrupt


def signal_status():
    return 128 + (_signals[0] if _signals else signal.SIGINT)


def flags_agreed(comm, kw, prog="python -m spmd.run"):
    """Every rank runs the same command (`prog`) and parsed the same flags, unless started differently (mpirun's
    "A : B" form): all go on (returns the options), or all stop (exits). The first collective of every command, so
    that a rank running another one is found before their collectives differ."""
    progs, outcomes = zip(*comm.allgather((prog, "run" if isinstance(kw, dict) else kw)))
    other = next((rank for rank, theirs in enumerate(progs) if theirs != prog), None)
    if other is not None:
        if comm.is_root:
            print(f"error: rank {other} runs another program than rank 0 ({progs[other]}, not {prog}): every rank "
                  "must run the same command", file=sys.stderr)
        sys.exit(1)
    if any(o != "run" for o in outcomes):
        bad = next((rank for rank, o in enumerate(outcomes) if o not in ("run", 0)), None)
        if comm.is_root and isinstance(kw, dict) and bad is not None:
            print(f"error: rank {bad}: invalid command-line flags", file=sys.stderr)
        sys.exit(0 if bad is None else 1)
    comm.wait_timeout_s = kw.get("wait_timeout", comm.wait_timeout_s)  # (set-up's waits: Comm.arrive)
    return kw


def imports_agreed(comm, modules):
    """Import `modules` (names under spmd) on every rank; a module missing or broken on one host: every rank
    hears of it and stops (exits), instead of waiting for it."""
    import importlib
    try:
        for name in modules:
            importlib.import_module(f"spmd.{name}")
        broken = None
    except ImportError as e:
        broken = f"cannot import {e.name or 'a module'} ({e}): install the set-up on every host (scripts/setup.sh)"
    except Exception as e:  # noqa: BLE001 - a module broken on one host fails there however it fails
        broken = (f"a module failed to import ({type(e).__name__}: {e}): install the set-up on every host "
                  "(scripts/setup.sh)")
    broken = comm.first_error(broken)
    if broken is not None:
        if comm.is_root:
            print(f"error: {broken}", file=sys.stderr)
        sys.exit(1)


def guarded(comm, log, work):
    """`work()` on every rank: a UserError is one line on rank 0 and exit 1 everywhere; Ctrl-C stops every rank
    together; an MPI call that fails (a rank is gone) is one line; a bug shows its traceback and takes every rank
    down instead of hanging. Returns what work returns."""
    try:
        return work()
    except UserError as e:
        log(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        stop(comm)
    except Exception as e:  # a bug, not a user mistake: show it, and take every rank down instead of hanging
        if interrupted(e):
            stop(comm)
        failed = comm.failed_call(e)
        if failed is not None:  # another rank is gone: its watcher (supervised) or mpirun says which
            comm.give_up(f"an MPI call failed ({failed}): a rank has died or its host is gone")
            os._exit(1)
        traceback.print_exc()
        sys.stderr.flush()
        comm.abort(1)
        os._exit(1)  # MPI_Abort does not return; where it does, nothing may go on with no result


def stop(comm):
    """Ctrl-C or SIGTERM: one rank just stops; several must all stop, wherever each one is. Rank 0 (removing its
    socket file) aborts first: where the signal reached it too (mpirun passes it on to every rank) it is doing so
    already; where it reached only this rank, rank 0 is asked to stop as if it had, and within a second or two it
    does (unless it is stuck in a step: then this rank takes the job down)."""
    if comm.size > 1:
        if not comm.is_root:
            time.sleep(0.5)
            comm.ask_root_to_stop(_signals[0] if _signals else signal.SIGINT, wait_s=0.5)
            time.sleep(2.5)
        comm.abort(signal_status())
        os._exit(signal_status())  # where MPI_Abort returns: no interpreter teardown racing the job's end
    sys.exit(signal_status())


def interrupted(e) -> bool:
    """Whether `e` comes of a Ctrl-C or SIGTERM: a signal that arrives while a compiled (numba) function runs
    raises its KeyboardInterrupt as the function returns, which Python reports as a SystemError caused by it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def supervised(comm, log, path):
    """--journal (spmd.supervise starts the job with it): rank 0's journal (None elsewhere, or unsupervised), after
    every rank's host and process id went into it."""
    if path is None:
        return None
    from .comm import host_name
    from .journal import Journal
    from .rank import agree
    journal = guarded(comm, log, lambda: agree(comm, lambda: Journal(path) if comm.is_root else None))
    ranks = comm.gather((host_name(), os.getpid()))
    if comm.is_root:
        journal.event("ranks", ranks=ranks)
    return journal


EMBEDDED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded.gguf")


def model_or_embedded(kw):
    """--model, or the embedded model where it is omitted: the note to log once the engine is up (a flag's error
    then comes alone; a job resumed after a recovery does not say it again), else None."""
    if kw["model"] is None:
        kw["model"] = EMBEDDED_MODEL
        return None if kw.get("resume") else f"note: no --model given: using the embedded model {EMBEDDED_MODEL}"
    return None


def root_log(comm):
    """Rank 0's notes on stderr (nothing elsewhere). Where stdout and stderr are both a terminal, a note that comes
    while the text is mid-line (a rebalance, a migration) starts on a line of its own, and the text goes on below."""
    def log(msg):
        if _mid_line[0] and sys.stdout.isatty() and sys.stderr.isatty():
            msg, _mid_line[0] = "\n" + msg, False
        print(msg, file=sys.stderr, flush=True)
    return log if comm.is_root else (lambda msg: None)


def stdout_to_rank_0(comm):
    """stdout is rank 0's (the text, the JSON result): on any other rank, what anything prints there (a library's
    stray terminal escape, seen on an H100 host, landed inside rank 0's JSON line) goes to stderr instead."""
    if not comm.is_root:
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def run(argv):
    from . import comm as C  # initialises MPI
    comm = C.Comm()
    stdout_to_rank_0(comm)
    kw = flags_agreed(comm, parse_args(argv, comm.is_root))
    imports_agreed(comm, ("engine", "prompts"))
    from .engine import Engine, RunOptions
    from .prompts import PromptSpec
    log = root_log(comm)
    note = model_or_embedded(kw)
    text_out = kw.pop("output") == "text"
    prompt_ids, texts = kw.pop("prompt_ids"), kw.pop("prompt")
    if prompt_ids is not None and texts:
        if comm.is_root:
            print("error: give --prompt or --prompt-ids, not both", file=sys.stderr)
        sys.exit(1)
    prompts = tuple(PromptSpec(text=t, where="the prompt" if len(texts) == 1 else f"--prompt {i + 1}")
                    for i, t in enumerate(texts))
    if prompt_ids is not None:
        prompts = (PromptSpec(ids=prompt_ids, where="--prompt-ids"),)
    from .control import default_path
    root_pid = comm.bcast(os.getpid())  # only rank 0 listens; the default path names its pid
    socket_path = kw.pop("control_socket") or default_path(root_pid)
    journal = supervised(comm, log, kw.pop("journal"))
    opts = RunOptions(**kw, prompts=prompts,
                      control_socket=None if socket_path.lower() == "none" else socket_path)
    engine = guarded(comm, log, lambda: Engine(opts, comm, log=log, journal=journal))
    if note:
        log(note)
    if journal:
        journal.event("ready", ratios=engine.state.plan.text(), prompts=[w.ids.tolist() for w in engine.state.work],
                      at=time.time())
    emit = (journal.emit if journal else write_stdout) if text_out and comm.is_root else None
    result = guarded(comm, log, lambda: engine.run(emit))
    if comm.is_root:
        if text_out:
            if "sequences" not in result:  # several sequences end their lines themselves
                emit("\n")
            if journal:
                journal.event("done", text=journal.take())
            log(summary(result))
        elif journal:
            journal.event("result", result=result)
        else:
            try:
                write_stdout(json.dumps(result) + "\n")  # (a reader gone: nobody to tell)
            except UserError as e:
                log(f"error: {e}")
                sys.exit(1)
    comm.test_signal("exit")


if __name__ == "__main__":
    main()

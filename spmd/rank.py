"""Every rank's set-up and state: the flags checked, errors agreed on, the file, config, plan, backend, model and
communicator; `swap` is the one place the plan and model change. Rank 0 also holds the tokenizer, the prompt and
the control socket's listener."""
import os
import resource
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from . import comm as C
from .backends import BACKENDS, get_backend
from .config import read_config
from .errors import UserError
from .gguf_file import GGUFFile
from .plan import make_plan, parse_layout
from .tokenizer import load_tokenizer
from .weights import load_shard

WEIGHT_SOURCES = ("file", "peer")


@dataclass(frozen=True)
class RunOptions:
    model: str
    prompt: str = ""
    steps: int = 64
    ratios: str = None  # the layout: "2:3:3", "1*1*1", "1:1@10*2:3" (spmd.plan)
    allreduce: str = "star"
    backend: str = "cpu"  # one name for every rank, or one per rank: "cpu,vulkan,vulkan"
    gpu: str = None  # Vulkan device index on the rank's host: one for every rank, or one per rank (None: local rank)
    threads: str = None  # kernel threads: one for every rank, or one per rank (None: the host's cores / its ranks)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = None
    tokenizer: str = None  # a sentencepiece .model instead of the GGUF's vocabulary
    prompt_tokens: tuple = None  # token ids instead of a prompt text (tests)
    control_socket: str = None  # rank 0 listens here for live migrations (None: no socket)
    migrate_weights: str = "file"  # a migration's weights: "file" (each rank reads its own) or "peer" (sent)


def agree(comm, step):
    """Run `step()` on every rank; if it raised a UserError on any rank, raise the first one everywhere."""
    error, value = None, None
    try:
        value = step()
    except UserError as e:
        error = str(e)
    except MemoryError:
        error = "out of memory"
    first = comm.first_error(error)
    if first is not None:
        raise UserError(first)
    return value


def known_vocab(tokenizer, cfg) -> int:
    """Ids below this are known to both the tokenizer and the model (a padded classifier has extra rows)."""
    return min(tokenizer.vocab_size, cfg.vocab)


def per_rank(flag, text, comm, what):
    """This rank's entry of a flag given once for every rank ("cpu") or once per rank ("cpu,vulkan,vulkan")."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, comm.size):
        raise UserError(f"{flag} {text!r} names {len(parts)} {what} for {comm.size} rank{'s' * (comm.size != 1)}: "
                        "give one for every rank, or one per rank")
    return parts[0 if len(parts) == 1 else comm.rank]


def per_rank_choice(opts, comm):
    """This rank's backend name, GPU index and kernel threads from --backend/--gpu/--threads. By default a rank
    takes the GPU of its index among the ranks on its host (wrapping around the host's GPUs: the last value
    returned), and the host's cores divided among those ranks."""
    local_index, local_count = comm.on_this_machine()  # a collective: before any check that could stop a rank
    for name in opts.backend.split(","):
        if name.strip() not in BACKENDS:
            raise UserError(f"--backend {name.strip()!r}: choose one of {', '.join(BACKENDS)}")
    backend = per_rank("--backend", opts.backend, comm, "backends")
    numbers = {}
    for flag, text in (("--gpu", opts.gpu), ("--threads", opts.threads)):
        if text is not None:
            entry = per_rank(flag, text, comm, "values")
            if not all(p.strip().isdigit() for p in str(text).split(",")):
                raise UserError(f"{flag} {text!r}: expected a whole number, or one per rank, separated by commas")
            numbers[flag] = int(entry)
    if numbers.get("--threads") == 0:
        raise UserError("--threads must be at least 1")
    gpu = numbers.get("--gpu", local_index)
    threads = numbers.get("--threads") or max(1, len(os.sched_getaffinity(0)) // local_count)
    return backend, gpu, threads, "--gpu" not in numbers


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes():
    """This process's resident memory now (0 where /proc is not there to tell)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class RankState:
    """Set-up (collective: every rank constructs one, and a user's mistake on any rank is one UserError on all)."""

    def __init__(self, opts: RunOptions, comm: C.Comm, log=print):
        self.opts, self.comm, self.log = opts, comm, log
        if opts.steps < 1:
            raise UserError(f"--steps must be at least 1 (got {opts.steps})")
        if opts.allreduce not in C.ALGORITHMS:
            raise UserError(f"--allreduce {opts.allreduce!r}: choose one of {', '.join(C.ALGORITHMS)}")
        if opts.migrate_weights not in WEIGHT_SOURCES:
            raise UserError(f"--migrate-weights {opts.migrate_weights!r}: choose one of {', '.join(WEIGHT_SOURCES)}")
        self.backend_name, self.gpu, self.threads, self.gpu_wraps = per_rank_choice(opts, comm)
        self.file, self.cfg, plan = agree(comm, self._read_header)
        comm.algorithm = opts.allreduce
        self._check_same_as_rank_0(plan)
        self.plan, self.model, self.backend = None, None, None
        self.tokenizer, self.prompt = agree(comm, self._tokenize if comm.is_root else lambda: (None, None))
        n_prompt, steps = comm.bcast((len(self.prompt), opts.steps) if comm.is_root else None)
        self.steps = min(steps, self.cfg.context - n_prompt)
        self.max_seq = n_prompt + self.steps  # the KV cache holds this many positions
        if comm.is_root and self.steps < opts.steps:
            log(f"note: --steps {opts.steps} would pass the model's context of {self.cfg.context}; "
                f"generating {self.steps}")
        # Ranks on one machine share its cores (self.threads each); a rank's kernel threads spinning on a core another
        # rank needs stall both. numpy's BLAS only serves the small attention products: its thread pool, left
        # spinning after each, would take cores from the kernels (prefill ran 3x slower with it).
        threadpool_limits(1, user_api="blas")
        # the socket opens before the weights load, so a user (or a script) can queue a migration meanwhile
        self.plan = plan
        self.control = agree(comm, self._open_control if comm.is_root else lambda: None)
        try:
            self.backend = agree(comm, lambda: get_backend(self.backend_name, threads=self.threads, device=self.gpu,
                                                           wrap=self.gpu_wraps))
            self.backend.warmup()
            t, rss = time.perf_counter(), rss_bytes()
            self.swap(plan, agree(comm, lambda: self.build_model(plan[comm.rank])))
            self.load_s = time.perf_counter() - t
            self.load_rss_bytes = max(0, rss_bytes() - rss)  # measured: what loading this rank's share added
        except BaseException:
            if self.control is not None:
                self.control.close()
            raise

    @property
    def share(self):
        return self.plan[self.comm.rank]

    @property
    def stage(self):
        return self.plan.stage_of(self.comm.rank)

    def swap(self, plan, model):
        """Every rank at once: switch to `plan` (the stage communicator follows) and `model` (the old one closed)."""
        old, self.model = self.model, model
        if old is not None and old is not model:
            old.close()
        self.plan = plan
        self.comm.set_plan(plan)

    def build_model(self, share, read=None, keep=()):
        """A model for `share`: its weights read from the file (or by `read`, keeping the old model's matrices
        of the plan units in `keep`)."""
        weights = load_shard(self.file, self.cfg, share, self.backend, read=read, keep=keep,
                             old=self.model.w if keep else None,
                             notice=self.log if self.comm.is_root else (lambda _msg: None))
        return self.backend.make_model(self.cfg, weights, share, self.max_seq)

    def _read_header(self):
        f = GGUFFile(self.opts.model)
        cfg = read_config(f)
        return f, cfg, make_plan(parse_layout(self.opts.ratios, self.comm.size), cfg)

    def _check_same_as_rank_0(self, plan):
        """A rank started with another model file (a stale copy on one host) or other flags would fail in the
        middle of a step: refuse at set-up, naming what differs."""
        mine = {"model (its header)": self.cfg, "model file size": os.path.getsize(self.opts.model),
                "--ratios": plan, "--allreduce": self.opts.allreduce, "--backend": self.opts.backend,
                "--gpu": self.opts.gpu, "--threads": self.opts.threads, "--migrate-weights": self.opts.migrate_weights}
        everyone = self.comm.allgather(mine)
        for rank, theirs in enumerate(everyone):
            for what in mine:
                if theirs[what] != everyone[0][what]:
                    raise UserError(f"rank {rank} differs from rank 0 in its {what}: every rank must run the same "
                                    "model file and flags")

    def _tokenize(self):
        tok = load_tokenizer(self.file, self.opts.tokenizer)
        if tok.vocab_size > self.cfg.vocab:
            raise UserError(f"the tokenizer has {tok.vocab_size} pieces but the model's vocabulary is "
                            f"{self.cfg.vocab}: they do not belong together")
        ids = list(self.opts.prompt_tokens) if self.opts.prompt_tokens is not None else tok.encode(self.opts.prompt)
        if not ids:
            raise UserError("the prompt is empty" + ("" if self.opts.prompt_tokens is not None else
                                                     " and this model adds no BOS token to start from: give --prompt"))
        if len(ids) >= self.cfg.context:
            raise UserError(f"the prompt is {len(ids)} tokens long; the model's context is {self.cfg.context}, "
                            "which leaves no room to generate")
        vocab = known_vocab(tok, self.cfg)
        if max(ids) >= vocab or min(ids) < 0:
            raise UserError(f"prompt token ids must be in 0..{vocab - 1}")
        return tok, np.array(ids, dtype=np.int64)

    def _open_control(self):
        """Rank 0: the control socket's listener (None without one). It validates requests against self.plan."""
        if self.opts.control_socket is None:
            return None
        from .control import Listener, make_private_dir, remove_stale, socket_dir
        path = self.opts.control_socket
        if os.path.dirname(os.path.abspath(path)) == socket_dir():
            make_private_dir(socket_dir())
            remove_stale(socket_dir())
        first = len(self.prompt)  # token boundaries: positions first..last (none after the last sampled token)
        listener = Listener(path, self, first, first + self.steps - 2)
        self.log(f"control socket: {path}")
        return listener

"""Every rank's set-up and state: the flags checked, errors agreed on, the file, config, plan, backend, model and
communicator; `swap` is the one place the plan and model change. Every rank knows each sequence's need (its prompt
and steps: the KV-cache positions it takes) and the sequence slots; rank 0 also holds the tokenizer, the prompts
and the control socket's listener."""
import os
import resource
import time
from dataclasses import dataclass, replace

import numpy as np
from threadpoolctl import threadpool_limits

from . import comm as C
from .backends import BACKENDS, get_backend
from .choices import ACTIVATIONS, ALLREDUCES, KV_CACHES, WEIGHT_SOURCES
from .config import read_config
from .errors import UserError, human_size, is_whole_number, parse_size
from .gguf_file import GGUFFile
from .journal import read_resume
from .model import PREFILL_TOKENS, kv_bytes_per_position, pass_bytes
from .plan import make_plan, parse_layout
from .prompts import PromptSpec, Work, read_prompts_file
from .quants import FLOATS
from .sampling import Sampler
from .shm import remove_stale
from .tokenizer import load_tokenizer
from .stream import DeviceWindow, Window, choose, device_copies, in_memory
from .weights import HALF, UNIT_KIND, half_bytes, load_shard, share_bytes


@dataclass(frozen=True)
class RunOptions:
    model: str
    prompts: tuple = ()  # PromptSpec each (spmd.prompts), then those of prompts_file; none at all: one empty prompt
    prompts_file: str = None
    sequences: int = None  # the most in flight at once (None: the number of pipeline stages)
    steps: int = 64
    ratios: str = None  # the layout: "2:3:3", "1*1*1", "1:1@10*2:3" (spmd.plan)
    plan: str = None  # instead of ratios: "auto" (measure the cluster now) or a saved profile's path (spmd.planner)
    rebalance: bool = False  # re-plan while running when the measured figures predict a gain (spmd.rebalance)
    allreduce: str = "star"
    backend: str = "cpu"  # one name for every rank, or one per rank: "cpu,vulkan,vulkan"
    activations: str = "f32"  # "f32", or "int8" (8-bit activations; the cpu backend's partial sums exact)
    kv_cache: str = "f32"  # what the KV caches keep keys and values in: "f32", or "f16" (half the memory)
    gpu: str = None  # Vulkan device index on the rank's host: one for every rank, or one per rank (None: local rank)
    threads: str = None  # kernel threads: one for every rank, or one per rank (None: the host's cores / its ranks)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = None
    tokenizer: str = None  # a sentencepiece .model instead of the GGUF's vocabulary
    control_socket: str = None  # rank 0 listens here for live migrations (None: no socket)
    migrate_weights: str = "file"  # a migration's weights: "file" (each rank reads its own) or "peer" (sent)
    wait_timeout: float = 600.0  # seconds without a step record before every rank gives up (0: never)
    context: int = None  # spmd.serve: no prompts up front; a sequence takes up to this many positions (0: default)
    resume: str = None  # spmd.supervise's resume file: the layout, and each sequence's tokens so far, to go on from
    memory_limit: str = None  # bytes a rank's weights, KV caches and activations may take: one for every rank, or
    # one per rank ("2G,8G,8G"); a share that does not fit streams the rest (spmd.stream)


DEFAULT_SERVE_CONTEXT = 4096  # spmd.serve's positions per sequence unless --ctx-size says (or the model has fewer)


def agree(comm, step):
    """Run `step()` on every rank; if it raised a UserError on any rank, raise the first one everywhere. A bug (any
    other exception) on one rank is raised there as it is, and as a RuntimeError naming it on the others, so no rank
    waits for one that left."""
    error, value, bug = None, None, None
    try:
        value = step()
    except UserError as e:
        error = str(e)
    except MemoryError:
        error = "out of memory"
    except Exception as e:  # noqa: BLE001 - shared below, then raised as it is
        error, bug = f"a bug: {type(e).__name__}: {e}", e
    first = comm.first_error(error)
    if bug is not None:
        raise bug
    if first is not None:
        raise (RuntimeError if "a bug: " in first else UserError)(first)
    return value


def known_vocab(tokenizer, cfg) -> int:
    """Ids below this are known to both the tokenizer and the model (a padded classifier has extra rows)."""
    return min(tokenizer.vocab_size, cfg.vocab)


def per_rank(flag, text, comm, what):
    """This rank's entry of a flag given once for every rank ("cpu") or once per rank ("cpu,vulkan,vulkan")."""
    return every_ranks(flag, text, comm.size, what)[comm.rank]


def every_ranks(flag, text, n_ranks, what) -> list:
    """Each of `n_ranks` ranks' entry of such a flag."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, n_ranks):
        raise UserError(f"{flag} {text!r} names {len(parts)} {what} for {n_ranks} rank{'s' * (n_ranks != 1)}: "
                        "give one for all ranks, or one per rank")
    return parts * n_ranks if len(parts) == 1 else parts


def per_rank_choice(opts, comm):
    """This rank's backend name, GPU index and kernel threads from --backend/--gpu/--threads, whether its GPU
    wraps around, and a note for rank 0 or None (`cores_note`). By default a rank takes the GPU of its index among
    the ranks on its host (wrapping around the host's GPUs), and the cores it may run on divided among those
    ranks."""
    local_index, local_count = comm.on_this_machine()  # a collective: before any check that could stop a rank
    if local_index == 0:
        remove_stale()  # MPICH's files an earlier job left behind (spmd.shm)
    for name in opts.backend.split(","):
        if name.strip() not in BACKENDS:
            raise UserError(f"--backend {name.strip()!r}: choose one of {', '.join(BACKENDS)}")
    backend = per_rank("--backend", opts.backend, comm, "backends")
    numbers = {}
    for flag, text in (("--gpu", opts.gpu), ("--threads", opts.threads)):
        if text is not None:
            entry = per_rank(flag, text, comm, "values")
            if not all(is_whole_number(p.strip()) for p in str(text).split(",")):
                raise UserError(f"{flag} {text!r}: expected a whole number, or one per rank, separated by commas")
            numbers[flag] = int(entry)
    if numbers.get("--threads") == 0:
        raise UserError("--threads must be at least 1")
    gpu = numbers.get("--gpu", local_index)
    cores = len(os.sched_getaffinity(0))
    threads = numbers.get("--threads") or max(1, cores // local_count)
    note = cores_note(backend, numbers.get("--threads"), cores, os.cpu_count() or cores, local_count)
    return backend, gpu, min(threads, cores), "--gpu" not in numbers, note


def cores_note(backend, asked, cores, host_cores, local_count):
    """A note where a cpu rank may run on fewer cores than its --threads, or (without --threads) than its share
    of the host's: its CPU affinity, which an MPI launcher may have set (Open MPI's mpirun binds each rank to one
    core where it starts two ranks or fewer, and a rank's 15 kernel threads then share that core); else None."""
    if backend != "cpu" or cores >= (asked or host_cores // local_count):
        return None
    threads = f"{cores} kernel thread{'s' * (cores != 1)}"
    if cores >= host_cores:
        return f"note: --threads {asked}, but the host has {host_cores} cores: {threads}"
    start = f"--threads {asked}, but this rank" if asked else "this rank"
    return (f"note: {start} may run on only {cores} of the host's {host_cores} cores (its CPU affinity, which a "
            f"launcher's binding sets: Open MPI's mpirun binds ranks to cores unless given --bind-to none): {threads}")


def open_model(path):
    """(the memory-mapped GGUF file, its ModelConfig)."""
    f = GGUFFile(path)
    return f, read_config(f)


def make_backend(comm, name, threads, gpu, wraps, activations="f32"):
    """Every rank: its backend (errors agreed on). The cpu backend compiles each weight type's kernels (or loads
    them from numba's cache) as the first matrix of that type is loaded, so the first token is not slower."""
    # Ranks on one machine share its cores (threads each); a rank's kernel threads spinning on a core another rank
    # needs stall both. numpy's BLAS only serves the small attention products: its thread pool, left spinning after
    # each, would take cores from the kernels (prefill ran 3x slower with it).
    threadpool_limits(1, user_api="blas")
    return agree(comm, lambda: get_backend(name, threads=threads, device=gpu, wrap=wraps, activations=activations))


def gpu_stages(gpus, n_layers):
    """The default layout where every rank computes on a GPU of its own, all on one host (`gpus`: each rank's
    (host, GPU index or None: the CPU)): a pipeline stage each, '1*1', as tensor parallelism across a host's GPUs
    pays a round trip through host memory at every allreduce, two a layer, and stages hand on one hidden state a
    token (README: "A host with several GPUs"); None otherwise (equal shares, one stage)."""
    hosts, indices = {h for h, _ in gpus}, [g for _, g in gpus]
    if len(gpus) > 1 and len(hosts) == 1 and None not in indices and len(set(indices)) == len(gpus) <= n_layers:
        return "*".join("1" * len(gpus))
    return None


def proc_bytes(path, field):
    """A "Field:  N kB" line of a /proc file in bytes, or None where /proc does not tell."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes():
    """This process's peak resident memory: VmHWM, its memory's own high-water mark. (getrusage's ru_maxrss survives
    exec: a process started by fork and exec from a large parent, as subprocess does with a preexec_fn, reports
    the parent's size.)"""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes():
    """The memory this host can give without swapping (MemAvailable), or None where /proc does not tell."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def model_identity(file, cfg) -> dict:
    """What tells a model file from another (a stale copy on one host): its header, size and sampled contents."""
    return {"model (its header)": cfg, "model file size": file.nbytes,
            "model file's contents (sampled)": file.fingerprint()}


def check_same(comm, mine, command):
    """Every rank: `mine` ({what: value}) against rank 0's; the first that differs is a UserError, the same line on
    every rank (a rank started with another model file or flags would fail in the middle of a collective)."""
    everyone = comm.allgather(mine)
    for rank, theirs in enumerate(everyone):
        if not isinstance(theirs, dict) or set(theirs) != set(mine):
            raise UserError(f"rank {rank} runs another program than rank 0: every rank must run the same command "
                            f"({command} with the same flags)")
        for what in mine:
            if theirs[what] != everyone[0][what]:
                raise UserError(f"rank {rank} differs from rank 0 in its {what}: every rank must run the same "
                                "model file and flags")


def rss_bytes():
    """This process's resident memory now (0 where /proc is not there to tell)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def check_options(opts: RunOptions):
    """Refuse, in one line, a flag value no layout can serve (every rank reaches the same answer alone)."""
    if opts.steps < 1:
        raise UserError(f"--steps must be at least 1 (got {opts.steps})")
    if opts.sequences is not None and opts.sequences < 1:
        raise UserError(f"--sequences must be at least 1 (got {opts.sequences})")
    if opts.allreduce not in ALLREDUCES:
        raise UserError(f"--allreduce {opts.allreduce!r}: choose one of {', '.join(ALLREDUCES)}")
    if opts.migrate_weights not in WEIGHT_SOURCES:
        raise UserError(f"--migrate-weights {opts.migrate_weights!r}: choose one of {', '.join(WEIGHT_SOURCES)}")
    if opts.activations not in ACTIVATIONS:
        raise UserError(f"--activations {opts.activations!r}: choose {' or '.join(ACTIVATIONS)}")
    if opts.kv_cache not in KV_CACHES:
        raise UserError(f"--kv-cache {opts.kv_cache!r}: choose {' or '.join(KV_CACHES)}")
    if opts.plan is not None and opts.ratios is not None:
        raise UserError("give --ratios or --plan, not both")
    if opts.plan is not None and not opts.plan.strip():
        raise UserError("--plan needs auto or a profile's path (python -m spmd.profile --out FILE)")


class RankState:
    """Set-up (collective: every rank constructs one, and a user's mistake on any rank is one UserError on all)."""

    def __init__(self, opts: RunOptions, comm: C.Comm, log=print):
        self.comm, self.log, self.resume = comm, log, None
        if opts.resume is not None:  # a relaunch (spmd.supervise): its layout replaces --ratios or --plan
            self.resume = agree(comm, lambda: read_resume(opts.resume) if comm.is_root else None)
            layout = comm.bcast(self.resume["ratios"] if comm.is_root else None)
            if layout is not None:  # else planned again (--plan), on the survivors
                opts = replace(opts, ratios=layout, plan=None)
        self.opts = opts
        check_options(opts)
        self.backend_name, self.gpu, self.threads, self.gpu_wraps, threads_note = agree(
            comm, lambda: per_rank_choice(opts, comm))
        self.memory_limit = agree(comm, self._memory_limit)
        self.file, self.cfg = agree(comm, self._read_header)
        comm.algorithm = opts.allreduce
        comm.partial_dtype = np.float64 if opts.activations == "int8" else np.float32  # exact sums travel as float64
        plan = None if opts.plan else agree(comm, lambda: make_plan(parse_layout(opts.ratios, comm.size), self.cfg))
        self._check_same_as_rank_0(plan)
        self.plan, self.model, self.backend, self.planned = None, None, None, None
        self.tokenizer, self.work = agree(comm, self._tokenize if comm.is_root else lambda: (None, None))
        if opts.resume is not None:
            agree(comm, self._check_resume if comm.is_root else lambda: None)
        if opts.context is not None:  # serving: every slot may come to hold a sequence of the whole context
            self.context = agree(comm, self._serving_context)
            self.needs = [self.context] * (opts.sequences or 1)
        else:
            self.needs = comm.bcast([len(w.ids) + w.steps for w in self.work] if comm.is_root else None)
        self.n_known = comm.bcast(known_vocab(self.tokenizer, self.cfg) if comm.is_root else None)  # ids sampled
        self.max_seq = max(self.needs)  # the longest sequence's KV-cache positions
        self.backend = make_backend(comm, self.backend_name, self.threads, self.gpu, self.gpu_wraps, opts.activations)
        profile = self._profile() if opts.plan or opts.rebalance else None  # rank 0's; None elsewhere
        plan_lines = []  # rank 0's lines on the planner's choice, said once the layout's memory is checked
        stages = gpu_stages(comm.allgather((C.host_name(), self.backend.gpu())), self.cfg.n_layers) \
            if plan is not None and opts.ratios is None else None
        if stages is not None:  # (no --ratios or --plan: the default layout, where it fits; else one stage)
            staged = make_plan(parse_layout(stages, comm.size), self.cfg)
            self.n_slots = self.in_flight(staged)  # (the memory checks count its sequences)
            if self._fits(staged):
                plan = staged
                plan_lines.append(f"note: every rank on a GPU of its own on one host: a pipeline stage each "
                                  f"(--ratios '{stages}'), as tensor parallelism across GPUs pays a round trip "
                                  "through host memory at every allreduce; --ratios chooses another layout")
        plan = plan or self._planned(profile, plan_lines.append)
        self.n_slots = self.in_flight(plan)
        comm.set_slots(self.n_slots)
        self.rebalancer = None
        if opts.rebalance and comm.is_root:
            from .rebalance import Rebalancer
            self.rebalancer = Rebalancer(profile, "throughput" if self.n_slots > 1 else "latency", self.n_slots,
                                         self.max_seq, opts.allreduce)
        self._check_fit(plan)
        if comm.is_root:
            for line in plan_lines:
                self.log(line)
            self._say_layout_notes(plan)
        # the socket opens before the weights load, so a user (or a script) can queue a migration meanwhile
        self.plan = plan
        self.control = agree(comm, self._open_control if comm.is_root else lambda: None)
        if self.control is not None:
            comm.before_abort = self.control.close  # (a set-up that stalls from here on: Comm.arrive)
        try:
            comm.test_signal("load")
            t, rss = time.perf_counter(), rss_bytes()
            notes = [threads_note] if threads_note else []  # and what loading says on this rank (a backend holding a
            # slice as F32, ...): said together, in a collective every rank reaches (spmd.profile on some ranks,
            # an MPMD typo, must not leave rank 0 waiting in one of its own)
            self.swap(plan, agree(comm, lambda: self.build_model(plan[comm.rank], notice=notes.append)))
            self._say_notes(notes)
            self.load_s = time.perf_counter() - t
            self.load_rss_bytes = max(0, rss_bytes() - rss)  # measured: what loading this rank's share added
        except BaseException:
            if self.control is not None:
                self.control.close()
            raise

    def _say_layout_notes(self, plan):
        """Rank 0: what a user should know of `plan` with these options (idle ranks; a --gpu no rank uses; where
        int8 activations cannot keep the text the same across layouts, or have nothing to act on)."""
        if plan.idle:
            ranks = ", ".join(map(str, plan.idle))
            self.log(f"note: rank{'s' * (len(plan.idle) > 1)} {ranks} idle (ratio 0): holding no weights, in no stage")
        names = every_ranks("--backend", self.opts.backend, self.comm.size, "backends")
        if self.opts.gpu is not None and "vulkan" not in names:
            self.log(f"note: --gpu {self.opts.gpu} chooses a vulkan rank's GPU, and no rank runs the vulkan backend "
                     f"(--backend {self.opts.backend})")
        if self.opts.activations != "int8":
            return
        outputs = self.cfg.group * self.cfg.head_dim  # a KV group's attention outputs: wo's columns a rank takes
        if outputs % 32 and any(len(s.ranks) > 1 for s in plan.stages):
            self.log(f"note: --activations int8 with KV groups of {outputs} attention outputs: ranks split 32-element "
                     "activation blocks between them, so the text can change with the layout (groups of a multiple "
                     "of 32 keep it the same)")
        if all(len(t.shape) < 2 or t.qtype in FLOATS for t in self.file.tensors.values()):
            self.log("note: --activations int8: the model holds no quantised matrix, and float matrices keep float32 "
                     "activations")
        numpy_ranks = [r for r, name in enumerate(names) if name == "numpy"]
        if numpy_ranks:
            ranks = "every rank" if len(numpy_ranks) == self.comm.size else \
                f"rank{'s' * (len(numpy_ranks) > 1)} {', '.join(map(str, numpy_ranks))}"
            self.log(f"note: --activations int8: the numpy backend ({ranks}) keeps float32 activations, the "
                     "reference's products")

    @property
    def activations(self):
        """The activations the result names: --activations, but f32 where every rank runs the numpy backend (the
        reference keeps float32: see _say_layout_notes, which also says where int8 changes nothing)."""
        names = every_ranks("--backend", self.opts.backend, self.comm.size, "backends")
        return "f32" if all(name == "numpy" for name in names) else self.opts.activations

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

    def build_model(self, share, read=None, keep=(), notice=None):
        """A model for `share`: its weights read from the file (or by `read`, keeping the old model's matrices
        of the plan units in `keep`), the halves that do not fit --memory-limit spilled to a window. `notice`
        gets what loading says (default: rank 0 says it, others not)."""
        notice = notice or (self.log if self.comm.is_root else (lambda _msg: None))
        window, budget = self._window(share) if self.memory_limit is not None and not share.is_empty else (None, 0)
        if window is not None and in_memory(window.folder):
            self.file.notice_once(notice, "spill in memory", f"note: the spill file for streamed weights is in "
                                  f"memory ({window.folder} is a RAM disk): set TMPDIR to a folder on a disk")
        try:
            weights = load_shard(self.file, self.cfg, share, self.backend, read=read, keep=keep,
                                 old=self.model.w if keep else None, notice=notice, window=window)
            if window is not None:  # what the resident halves leave of the budget
                classifier = weights.output.nbytes if weights.output is not None else 0
                window.start(budget - (weights.nbytes - window.held_bytes - classifier))
            return self.backend.make_model(self.cfg, weights, share, self.max_seq, self.n_slots, self.opts.kv_cache)
        except BaseException:
            if window is not None:
                window.close()
            raise

    def _memory_limit(self):
        """This rank's --memory-limit in bytes, or None."""
        if self.opts.memory_limit is None:
            return None
        for text in str(self.opts.memory_limit).split(","):
            if not text.strip():
                raise UserError(f"--memory-limit {self.opts.memory_limit!r}: an empty size (one for every rank, or "
                                "one per rank, separated by commas)")
            if text.strip().lower() != "none":
                parse_size(text, "--memory-limit")
        entry = per_rank("--memory-limit", self.opts.memory_limit, self.comm, "sizes")
        if entry.lower() == "none":
            return None
        return parse_size(entry, "--memory-limit")

    def kv_need(self, share):
        """The bytes of this rank's KV caches for `share` with every slot at its sequence's full length (Vulkan:
        its pool, slots x the longest sequence)."""
        if self.backend_name == "vulkan":
            worst = self.n_slots * self.max_seq
        else:
            worst = sum(sorted(self.needs, reverse=True)[:self.n_slots])
        return self.kv_bytes_per_position(share) * worst

    def memory_needs(self, share):
        """(what --memory-limit keeps for `share` beside its layers' halves: {"KV caches": at their full length,
        "activations": the largest pass's, "classifier rows", "norms and RoPE tables"}; {(layer, half): bytes
        held})."""
        sizes, classifier = half_bytes(self.file, self.cfg, share, self.backend)
        fixed = {"KV caches": self.kv_need(share), **self._passes_and_tables(share, self.n_slots),
                 "classifier rows": classifier, "token_embd on the device": self._embedding_copy(share)}
        return fixed, sizes

    def _embedding_copy(self, share):
        """The bytes of the token_embd copy a vulkan model holding the whole model keeps for its chained decode
        (VulkanModel.embedding; none where the classifier is token_embd itself)."""
        cfg, info = self.cfg, self.file.info("token_embd.weight")
        whole = len(share.layer_ids) == cfg.n_layers and share.n_vocab == cfg.vocab
        if not (whole and getattr(self.backend, "ahead", 0)) or cfg.tied_output or not self.backend.embeds(info.qtype):
            return 0
        return self.backend.held_bytes(self.backend.holds(info.qtype), cfg.vocab, cfg.dim)

    def _passes_and_tables(self, share, slots):
        """What --memory-limit keeps for `share` besides weights and KV caches: {"activations": the largest pass's
        (of `slots` sequences in flight), "norms and RoPE tables"}."""
        cfg = self.cfg
        rows = min(self.max_seq * slots, max(self.max_seq, PREFILL_TOKENS))  # the largest pass
        widened = self.opts.kv_cache == "f16" and self.backend.widens_f16_cache(cfg.head_dim)
        return {"activations": pass_bytes(cfg, share, rows, self.max_seq, widened, self.opts.activations == "int8"),
                "norms and RoPE tables": 4 * len(share.layer_ids) * (2 * cfg.dim + 2 * cfg.head_dim)
                + 4 * self.max_seq * cfg.rope_dim}

    @staticmethod
    def floor_bytes(parts, sizes):
        """The smallest --memory-limit that works for memory_needs' answer: what it keeps, and a window of its
        largest half."""
        return sum(parts.values()) + max(sizes.values(), default=0)

    def _need_text(self, parts, sizes):
        """'1193472 bytes (1.1 MiB: KV caches ..., activations ..., ..., a weight window of half a layer ...)'."""
        floor = self.floor_bytes(parts, sizes)
        seqs = f"{self.n_slots} sequence{'s' * (self.n_slots > 1)} of {self.max_seq} positions"
        kept = ", ".join(f"{what} {human_size(n)}" + (f" for {seqs}" if what == "KV caches" else "")
                         for what, n in parts.items() if n)
        return (f"{floor} bytes ({human_size(floor)}: {kept}, and a weight window of half a layer, "
                f"{human_size(max(sizes.values(), default=0))})")

    def _limit_text(self, parts, sizes):
        """--memory-limit as a person reads it, or in bytes where it rounds to what the share needs."""
        shown = human_size(self.memory_limit)
        return f"{self.memory_limit} bytes" if shown == human_size(self.floor_bytes(parts, sizes)) else shown

    def _fits(self, plan):
        """Whether `plan` passes the memory checks on every rank, with `n_slots` sequences in flight (the same
        answer on every rank)."""
        try:
            self._check_fit(plan)
        except UserError:
            return False
        return True

    def _check_fit(self, plan):
        """Refuse `plan` where it does not fit memory (collective: the same UserError on every rank)."""
        agree(self.comm, lambda: self._check_memory(plan))
        agree(self.comm, lambda: self._check_limits(plan))

    def _check_limits(self, plan):
        """Every rank: refuse up front, naming every rank that is short, a --memory-limit below what a rank's share
        needs with a window of one half (the same line on every rank)."""
        short = None
        if self.memory_limit is not None and not plan[self.comm.rank].is_empty:  # (an idle rank holds nothing)
            parts, sizes = self.memory_needs(plan[self.comm.rank])
            if self.floor_bytes(parts, sizes) > self.memory_limit:
                short = f"rank {self.comm.rank} has {self._limit_text(parts, sizes)} and needs " + \
                    self._need_text(parts, sizes)
        lines = [line for line in self.comm.allgather(short) if line]
        if lines:
            raise UserError(f"--memory-limit is below what {'a rank needs' if len(lines) == 1 else 'ranks need'}: "
                            f"{'; '.join(lines)}: give at least that, {self._shorter()}, or more ranks")

    def _shorter(self):
        """The flags that make this job's sequences fewer or shorter."""
        return "fewer --sequences or a smaller --ctx-size" if self.opts.context is not None else \
            "fewer --sequences or --steps"

    def memory_figures(self):
        """This rank's need: the limit above which nothing streams, and the smallest that works (a window of the
        largest half); {} where the rank holds nothing (idle)."""
        if self.share.is_empty:
            return {}
        parts, sizes = self.memory_needs(self.share)
        return {"memory_need_bytes": sum(parts.values()) + sum(sizes.values()),
                "memory_floor_bytes": self.floor_bytes(parts, sizes)}

    def _window(self, share):
        """(the spmd.stream Window of the halves of `share` that do not fit --memory-limit, or None; the bytes
        for the halves, resident and window), or a UserError when not even the smallest window fits."""
        limit = self.memory_limit
        parts, sizes = self.memory_needs(share)
        fixed = sum(parts.values())
        # two slots where the device copies the halves itself and the limit allows (one is copied while the other
        # computes: 4-19% faster on an H200; with the host's slower copies, as often slower as faster)
        slots = 2 if self.backend_name == "vulkan" and device_copies(self.backend.dev) else 1
        chosen = choose(sizes, limit - fixed, slots) if sizes else ([], 0)
        if chosen is None:
            raise UserError(f"--memory-limit {self._limit_text(parts, sizes)} is below what this share needs: "
                            f"{self._need_text(parts, sizes)}: give more, or more ranks")
        streamed, _ = chosen
        if not streamed:
            return None, 0
        if self.backend_name == "vulkan":
            return DeviceWindow(streamed, self.backend.dev), limit - fixed
        return Window(streamed), limit - fixed

    def _say_notes(self, notes):
        """Every rank: what loading said, said once on rank 0 (with the ranks it came from where rank 0's own
        load did not say it: a backend of their own, a layer range of their own)."""
        everyone = self.comm.gather(notes)
        if not self.comm.is_root:
            return
        said = {}
        for rank, rank_notes in enumerate(everyone):
            for note in rank_notes:
                said.setdefault(note, []).append(rank)
        for note, ranks in said.items():
            where = "" if 0 in ranks else f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}: "
            self.log(where + note)

    def kv_bytes_per_position(self, share=None):
        """KV-cache bytes one position of one sequence takes on this rank."""
        share = share or self.share
        return kv_bytes_per_position(self.cfg, len(share.layer_ids), share.n_kv, self.opts.kv_cache)

    def _check_memory(self, plan):
        """Refuse up front sequences whose KV caches, at their full length, cannot fit beside the weights in the
        memory of some rank's host (the host's ranks together; the Vulkan pool is slots x the longest sequence)."""
        per_position = self.kv_bytes_per_position(plan[self.comm.rank])
        kv = self.kv_need(plan[self.comm.rank])
        weights = share_bytes(self.file, self.cfg, plan[self.comm.rank], self.backend.holds)
        if self.memory_limit is not None:  # what does not fit streams
            weights = min(weights, max(0, self.memory_limit - kv))
        everyone = self.comm.allgather((C.host_name(), kv, weights, available_bytes()))
        mine = [e for e in everyone if e[0] == everyone[self.comm.rank][0]]
        need = sum(e[1] + e[2] for e in mine)
        known = [e[3] for e in mine if e[3] is not None]
        free = min(known) if known else None
        gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
        host_weights = sum(e[2] for e in mine)
        if free is not None and host_weights > free:  # the weights alone: no fewer sequences help
            fix = (f"give the host's ranks --memory-limit sizes that add up to less than {gib(free)}"
                   if self.memory_limit is not None else "give --memory-limit (a rank streams what does not fit "
                   "from disk)")
            raise UserError(f"the weights of host {everyone[self.comm.rank][0]}'s rank{'s' * (len(mine) > 1)} need "
                            f"{gib(host_weights)}{self._widened()} but it has {gib(free)} available: {fix}, or more "
                            "ranks or hosts")
        if free is not None and need > free:
            seqs = f"{self.n_slots} sequence{'s' * (self.n_slots > 1)}"
            raise UserError(f"--sequences {self.n_slots}: the KV caches of {seqs} of up to {self.max_seq} positions "
                            f"need {gib(kv)} on rank {self.comm.rank} ({gib(per_position * self.max_seq)} for the "
                            f"longest), and with the weights its host {everyone[self.comm.rank][0]} needs "
                            f"{gib(need)} but has {gib(free)} available: give fewer --sequences or "
                            f"{'a smaller --ctx-size' if self.opts.context is not None else '--steps'}"
                            f"{', or --kv-cache f16' if self.opts.kv_cache == 'f32' else ''}")

    def room_to_move(self, plan, keep):
        """Every rank, before a re-partition to `plan`: None, or why a host or a GPU has not the memory for it (the
        same line on every rank). A rank whose share changes builds its new model while the old one is live (kept
        until every rank has built its own): its new KV caches, activations and weights, but the matrices of the
        kinds in `keep` in layers both shares hold (shared); at most its --memory-limit. A GPU rank builds it in its
        GPU's memory (what is free there beside what this process holds), any other in its host's (MemAvailable,
        shared by the host's ranks)."""
        old, new = self.share, plan[self.comm.rank]
        need, error = 0, None
        try:
            if new != old and not new.is_empty:
                parts, sizes = self.memory_needs(new)
                kind = {HALF[unit]: UNIT_KIND[unit] for unit in HALF}  # a layer's half -> the plan unit it holds
                need = sum(n for (layer, half), n in sizes.items()
                           if not (layer in old.layer_ids and kind[half] in keep))
                need += sum(n for what, n in parts.items() if not (what == "classifier rows" and "vocab" in keep))
                if self.memory_limit is not None:
                    need = min(need, self.memory_limit)
        except Exception as e:  # noqa: BLE001 - a bug: said in the reply, and no rank waits for this one
            error = f"the memory a move needs could not be worked out ({type(e).__name__}: {e})"
        error = self.comm.first_error(error)  # (names the rank, as every agreed error)
        if error is not None:
            return error
        device = self.backend.device_memory_bytes()
        everyone = self.comm.allgather((C.host_name(), need, available_bytes() if device is None else None, device))
        for rank, (_, more, _, free) in enumerate(everyone):
            if free is not None and more > free:
                return (f"rank {rank}'s GPU has {human_size(free)} free, and the rank would need {human_size(more)} "
                        "more there while the move is made (it holds its old share and its new one until every "
                        "rank has its new one): move less at a time")
        for host in dict.fromkeys(e[0] for e in everyone if e[3] is None):
            mine = [(rank, e) for rank, e in enumerate(everyone) if e[0] == host and e[3] is None]
            more = sum(e[1] for _, e in mine)
            known = [e[2] for _, e in mine if e[2] is not None]
            if known and more > min(known):
                ranks = [str(rank) for rank, e in mine if e[1]]
                return (f"host {host} has {human_size(min(known))} available, and rank{'s' * (len(ranks) > 1)} "
                        f"{', '.join(ranks)} would need {human_size(more)} more while the move is made (a "
                        "rank holds its old share and its new one until every rank has its new one): move less at "
                        "a time")
        return None

    def _widened(self):
        """' (its IQ2_XXS matrices held as F32: the cpu backend has no kernels for them)', or '' where this rank's
        backend holds every matrix type of the file as it is."""
        types = sorted({info.qtype.name for info in self.file.tensors.values() if len(info.shape) == 2
                        and info.qtype not in FLOATS and self.backend.holds(info.qtype) != info.qtype})
        if not types:
            return ""
        return (f" (its {', '.join(types)} matrices held as F32, several times their size in the file: the "
                f"{self.backend.name} backend has no kernels for them)")

    def _read_header(self):
        return open_model(self.opts.model)

    def _serving_context(self):
        """spmd.serve's positions per sequence: --ctx-size, else the model's context up to DEFAULT_SERVE_CONTEXT."""
        n = self.opts.context or min(self.cfg.context, DEFAULT_SERVE_CONTEXT)
        if n < 2:
            raise UserError(f"--ctx-size must be at least 2 (got {n})")
        if n > self.cfg.context:
            raise UserError(f"--ctx-size {n} is beyond the model's context of {self.cfg.context}")
        return n

    def in_flight(self, plan=None):
        """The most sequences in flight: --sequences, else one a stage of `plan`, or, planned (--plan: the
        planner's K), every prompt; never more than the prompts."""
        default = len(self.needs) if self.opts.plan else len(plan.stages)
        return min(self.opts.sequences or default, len(self.needs))

    def _profile(self):
        """The cluster's profile on rank 0 (None elsewhere): measured now (`spmd.profile`: --plan auto, or for
        --rebalance without --plan) or read from --plan FILE; a saved one must be of this job."""
        from . import cluster
        from .comm import host_name
        from .executor import slowdown
        from .profile import measure, model_bytes
        opts, comm = self.opts, self.comm
        t = time.perf_counter()
        measured = opts.plan in (None, "auto")
        data = measure(comm, self.file, self.cfg, self.backend, self.threads,
                       slow=slowdown(comm)) if measured else None
        hosts = comm.gather(host_name())

        def load():
            profile = cluster.load_profile(data if measured else opts.plan)
            survivors = self.resume and self.resume["ranks"]
            if survivors is not None and not measured:  # a relaunch on some of the profiled ranks
                if len(survivors) != comm.size or len(set(survivors)) != comm.size \
                        or not all(0 <= r < len(profile.ranks) for r in survivors):
                    raise UserError(f"--resume {opts.resume}: its ranks {survivors} are not {comm.size} of "
                                    f"{profile.source}'s {len(profile.ranks)}")
                profile = profile.subset(survivors)
            note = cluster.check_matches(profile, self.cfg, model_bytes(self.file, self.cfg), hosts)
            if note:
                self.log(note)
            return profile.with_kv_cache(opts.kv_cache)
        profile = agree(comm, load if comm.is_root else lambda: None)
        self.profile_s = time.perf_counter() - t
        return profile

    def _planned(self, profile, say):
        """--plan: rank 0 plans from the profile for the run's sequences (throughput with several, else latency;
        the longest sequence's context; within each rank's --memory-limit where a layout can be) and every rank
        makes that layout's plan. Rank 0 keeps the choice (`planned`) for the result, and gives what it has to say
        of it to `say`."""
        from . import planner
        opts, comm = self.opts, self.comm

        # the planner's memory model holds weights and KV caches: the rest of a limit's keep is taken off first, at
        # its most (the whole model's share), so that a rank it plans to stream still has its window
        whole = make_plan(parse_layout("1", 1), self.cfg)[0]
        limits = comm.gather(None if self.memory_limit is None else
                             self.memory_limit - sum(self._passes_and_tables(whole, self.in_flight()).values()))

        def decide():
            k = self.in_flight()
            objective = "throughput" if k > 1 else "latency"
            try:
                found, note = planner.plan_within_limits(profile, limits, objective, sequences=k,
                                                         context=self.max_seq, allreduce=opts.allreduce)
            except planner.TooLong as e:  # (the planner's own flags are not this job's)
                raise UserError(f"{e} ({self._shorter()})") from None
            if note:
                say(note)
            return found
        chosen = agree(comm, decide if comm.is_root else lambda: None)
        text = comm.bcast(chosen.text if comm.is_root else None)
        plan = make_plan(parse_layout(text, comm.size, "the planner's layout"), self.cfg)
        if comm.is_root:
            self.planned = {"profile": opts.plan, "seconds": round(self.profile_s, 3),
                            "objective": "throughput" if chosen.sequences > 1 else "latency",
                            "sequences": chosen.sequences, "ratios": text,
                            "predicted_ms_per_token": round(chosen.ms_per_token, 3),
                            "predicted_tokens_per_s": round(chosen.tokens_per_s, 2)}
            say(f"plan ({'measured now' if opts.plan == 'auto' else opts.plan}): --ratios '{text}', "
                f"predicted {chosen.ms_per_token:.2f} ms per token")
        return plan

    def _check_same_as_rank_0(self, plan):
        """A rank started with another model file (a stale copy on one host) or other flags would fail in the
        middle of a step: refuse at set-up, naming what differs."""
        mine = {**model_identity(self.file, self.cfg), "--ratios": plan, "--plan": self.opts.plan,
                "--rebalance": self.opts.rebalance, "--allreduce": self.opts.allreduce, "--backend": self.opts.backend,
                "--gpu": self.opts.gpu, "--threads": self.opts.threads, "--migrate-weights": self.opts.migrate_weights,
                "--activations": self.opts.activations, "--kv-cache": self.opts.kv_cache}
        check_same(self.comm, mine, "python -m spmd.run")

    def _tokenize(self):
        """Rank 0: the tokenizer and every sequence's Work, in input order."""
        opts = self.opts
        tok = load_tokenizer(self.file, opts.tokenizer)
        if tok.vocab_size > self.cfg.vocab:
            raise UserError(f"the tokenizer has {tok.vocab_size} pieces but the model's vocabulary is "
                            f"{self.cfg.vocab}: they do not belong together" if opts.tokenizer is not None else
                            f"{opts.model}: its vocabulary (tokenizer.ggml.tokens) has {tok.vocab_size} tokens but "
                            f"token_embd.weight has {self.cfg.vocab} rows: the file is inconsistent")
        if opts.context is not None:  # serving: the prompts come later, through the server
            return tok, []
        specs = list(opts.prompts) + (read_prompts_file(opts.prompts_file) if opts.prompts_file is not None else [])
        work, capped = [], []
        for index, spec in enumerate(specs or [PromptSpec()]):
            ids = self._prompt_ids(tok, spec)
            steps = spec.setting("steps", opts)
            if steps < 1:
                raise UserError(f"{spec.where}: steps must be at least 1 (got {steps})")
            if steps > self.cfg.context - len(ids):
                capped.append(spec.where)
            work.append(Work(index, ids, min(steps, self.cfg.context - len(ids)), spec))
        if capped:
            more = f" and {len(capped) - 1} more" if len(capped) > 1 else ""
            steps = "its steps" if opts.prompts_file is not None else "--steps"  # (a line of the file may set them)
            self.log(f"note: {capped[0]}{more}: the prompt's tokens and {steps} would pass the model's context of "
                     f"{self.cfg.context} positions; generating up to it")
        return tok, work

    def _check_resume(self):
        """Rank 0 of a relaunch: each sequence of the resume file is one of this run's prompts, with fewer tokens
        than its steps unless it ended, tokens the model knows, and a sampler state that restores."""
        by_index = {w.index: w for w in self.work}
        vocab = known_vocab(self.tokenizer, self.cfg)
        for index, entry in self.resume["sequences"].items():
            work, tokens = by_index.get(index), entry["tokens"]
            where = f"--resume {self.opts.resume}: sequence {index}"
            if work is None or entry["prompt"] != work.ids.tolist():
                raise UserError(f"{where} is not one of this run's prompts (the run's flags must be the same)")
            if len(tokens) > work.steps or (entry["finish"] is None and len(tokens) == work.steps) \
                    or any(not 0 <= t < vocab for t in tokens):
                raise UserError(f"{where}: its tokens do not fit this run's steps and vocabulary")
            try:
                Sampler(1.0).restore(entry["rng"])
            except (ValueError, TypeError, KeyError):
                raise UserError(f"{where}: its sampler state is not one numpy restores") from None

    def _prompt_ids(self, tok, spec):
        try:
            spec.text.encode("utf-8")
        except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 (Python keeps them as surrogates)
            raise UserError(f"{spec.where} is not UTF-8 text") from None
        if spec.ids is not None:
            ids = list(spec.ids)
        else:
            beyond = tok.bytes_beyond(spec.text, self.cfg.context)
            if beyond is not None:  # (refused before tokenizing: megabytes take long)
                raise UserError(f"{spec.where} is {beyond} bytes long, more than any {self.cfg.context} tokens hold; "
                                f"the model's context is {self.cfg.context}, which leaves no room to generate")
            ids = tok.encode(spec.text)
        if not ids:
            raise UserError(f"{spec.where} is empty" + ("" if spec.ids is not None else
                                                        " and this model adds no BOS token to start from"))
        if len(ids) >= self.cfg.context:
            raise UserError(f"{spec.where} is {len(ids)} tokens long; the model's context is {self.cfg.context}, "
                            "which leaves no room to generate")
        vocab = known_vocab(tok, self.cfg)
        if max(ids) >= vocab or min(ids) < 0:
            raise UserError(f"{spec.where}: token ids must be in 0..{vocab - 1}")
        return np.array(ids, dtype=np.int64)

    def _open_control(self):
        """Rank 0: the control socket's listener (None without one). It validates requests against self.plan."""
        if self.opts.control_socket is None:
            return None
        from .control import Listener, make_private_dir, remove_stale, socket_dir
        path = self.opts.control_socket
        if os.path.dirname(os.path.abspath(path)) == socket_dir():
            make_private_dir(socket_dir())
            remove_stale(socket_dir())
        if self.opts.context is not None:  # serving: a boundary counts the tokens generated so far, without end
            first, last = 0, None
        elif len(self.work) == 1:  # token boundaries: positions first..last (none after the last sampled token)
            first, last = len(self.work[0].ids), len(self.work[0].ids) + self.work[0].steps - 2
        else:  # several sequences: a boundary counts the tokens generated by all of them so far
            first, last = 1, sum(w.steps for w in self.work) - 1
        listener = Listener(path, self, first, last)
        self.log(f"control socket: {path}")
        return listener

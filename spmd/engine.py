"""One generation, run the same way on every rank: set up (agreeing on errors), then rank 0 drives each step
with one control message. Rank 0 tokenizes, samples, streams the text and assembles the result."""
import collections
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
from .model import Model
from .plan import format_ratios, make_plan, parse_ratios
from .repartition import WEIGHT_SOURCES, Repartition
from .sampling import Sampler
from .tokenizer import load_tokenizer
from .weights import load_shard


@dataclass(frozen=True)
class RunOptions:
    model: str
    prompt: str = ""
    steps: int = 64
    ratios: str = None
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


RECENT_STEPS = 16  # the control socket's `status` reports compute and sync time over this many decode steps


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


class Engine:
    def __init__(self, opts: RunOptions, comm: C.Comm, log=print):
        self.opts, self.comm, self.log = opts, comm, log
        if opts.steps < 1:
            raise UserError(f"--steps must be at least 1 (got {opts.steps})")
        if opts.allreduce not in C.ALGORITHMS:
            raise UserError(f"--allreduce {opts.allreduce!r}: choose one of {', '.join(C.ALGORITHMS)}")
        if opts.migrate_weights not in WEIGHT_SOURCES:
            raise UserError(f"--migrate-weights {opts.migrate_weights!r}: choose one of {', '.join(WEIGHT_SOURCES)}")
        self.backend_name, self.gpu, self.threads, self.gpu_wraps = per_rank_choice(opts, comm)
        self.file, self.cfg, self.ratios, self.plan = agree(comm, self._read_header)
        comm.algorithm, comm.ratios = opts.allreduce, self.ratios
        self._check_same_as_rank_0()
        self.share = self.plan[comm.rank]
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
        self.control = agree(comm, self._open_control if comm.is_root else lambda: None)
        t = time.perf_counter()
        try:
            self.model = agree(comm, self._load)
        except BaseException:
            if self.control is not None:
                self.control.close()
            raise
        self.load_s = time.perf_counter() - t
        self._vocab_counts = [s.n_vocab for s in self.plan]
        self._logits = np.empty(self.cfg.vocab, dtype=np.float32) if comm.is_root else None
        self._decode_steps, self._decode_bytes = 0, 0
        self._recent = collections.deque(maxlen=RECENT_STEPS)  # (compute s, sync s) of the last decode steps
        self.epoch, self.migrations = 0, []  # the plan's epoch: how many re-partitions it has been through

    def _read_header(self):
        f = GGUFFile(self.opts.model)
        cfg = read_config(f)
        ratios = parse_ratios(self.opts.ratios, self.comm.size)
        plan = make_plan(ratios, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab)
        return f, cfg, ratios, plan

    def _check_same_as_rank_0(self):
        """A rank started with another model file (a stale copy on one host) or other flags would fail in the
        middle of a step: refuse at set-up, naming what differs."""
        mine = {"model (its header)": self.cfg, "model file size": os.path.getsize(self.opts.model),
                "--ratios": self.ratios, "--allreduce": self.opts.allreduce, "--backend": self.opts.backend,
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

    def _load(self):
        self.backend = backend = get_backend(self.backend_name, threads=self.threads, device=self.gpu,
                                             wrap=self.gpu_wraps)
        weights = load_shard(self.file, self.cfg, self.share, backend,
                             notice=self.log if self.comm.is_root else (lambda _msg: None))
        if hasattr(backend, "warmup"):
            backend.warmup()
        make_model = getattr(backend, "make_model", Model)
        return make_model(self.cfg, weights, self.share, self.max_seq)

    def _open_control(self):
        """Rank 0: the control socket's listener (None without one)."""
        if self.opts.control_socket is None:
            return None
        from .control import Listener, make_private_dir, socket_dir
        path = self.opts.control_socket
        if os.path.dirname(os.path.abspath(path)) == socket_dir():
            make_private_dir(socket_dir())
        first = len(self.prompt)  # token boundaries: positions first..last (none after the last sampled token)
        listener = Listener(path, self.plan, self.ratios, first, first + self.steps - 2)
        self.log(f"control socket: {path}")
        return listener

    # ---- the step loop --------------------------------------------------------------------------------------
    def forward(self, tokens, pos):
        """Every rank: one pass; returns the full logits on rank 0 (None elsewhere)."""
        sent, sync, t = self.comm.bytes_sent, self.comm.sync_s, time.perf_counter()
        local = self.model.forward(tokens, pos, self.comm.allreduce if self.comm.size > 1 else None)
        logits = self.comm.gather_logits(local, self._vocab_counts, self._logits)
        if len(tokens) == 1:  # a decode step: its traffic is the per-token figure
            self._decode_steps += 1
            self._decode_bytes += self.comm.bytes_sent - sent
            synced = self.comm.sync_s - sync
            self._recent.append((time.perf_counter() - t - synced, synced))
        return logits

    def run(self, emit=None):
        """Generate; on rank 0 returns the result dict, elsewhere None. Rank 0 streams the text to `emit(piece)`,
        which returns False once nobody reads any more (a closed pipe): generation then stops early."""
        self.comm.barrier()
        start_sync = self.comm.sync_s
        t0 = time.perf_counter()
        try:
            result = self._root_loop(emit) if self.comm.is_root else self._worker_loop()
        finally:
            if self.control is not None:
                self.control.close(self._pos)
        total = time.perf_counter() - t0
        sync = self.comm.sync_s - start_sync
        stats = dict(rank=self.comm.rank, host=C.host_name(), backend=self.backend.description,
                     share=self.share.describe(),
                     compute_ms=round((total - sync) * 1e3, 3), sync_ms=round(sync * 1e3, 3),
                     bytes_sent=int(self.comm.bytes_sent),
                     bytes_per_token=self._decode_bytes // max(self._decode_steps, 1),
                     weights_bytes=int(self.model.w.nbytes), peak_rss_bytes=int(peak_rss_bytes()))
        ranks = self.comm.gather(stats)
        if result is not None:
            result["ranks"] = ranks
            result.update(plan_epoch=self.epoch, plan=[s.layout() for s in self.plan], migrations=self.migrations)
        return result

    def _worker_loop(self):
        while True:
            op, a, b, _ = self.comm.control()
            if op == C.OP_STOP:
                return None
            if op == C.OP_PREFILL:
                tokens = self.comm.broadcast_tokens(np.empty(a, dtype=np.int64))
                self.forward(tokens, 0)
            elif op == C.OP_DECODE:
                self.forward(np.array([a], dtype=np.int64), b)
            elif op == C.OP_REPLAN:
                self._replan(a, b)
            elif op == C.OP_STATUS:
                self.comm.gather(self._recent_stats())

    def _root_loop(self, emit):
        emit = emit or (lambda _piece: True)
        sampler = Sampler(self.opts.temperature, self.opts.top_k, self.opts.top_p, self.opts.seed)
        stream = self.tokenizer.stream()
        shown = "".join(stream.push(t) for t in self.prompt.tolist())  # so the first word keeps its space
        reading = emit(shown)
        pieces = []
        vocab = known_vocab(self.tokenizer, self.cfg)  # a padded classifier's extra rows are never sampled

        def sample(logits):
            return sampler(logits[:vocab])
        t0 = time.perf_counter()
        self.comm.control(C.OP_PREFILL, len(self.prompt))
        self.comm.broadcast_tokens(self.prompt)
        token = sample(self.forward(self.prompt, 0))
        prefill_s = time.perf_counter() - t0
        tokens, pos, t1 = [], len(self.prompt), time.perf_counter()
        while reading and token not in self.tokenizer.eos_ids:
            tokens.append(token)
            pieces.append(stream.push(token))
            reading = emit(pieces[-1])
            if not reading or len(tokens) == self.steps:
                break
            self._pos = pos
            if self.control is not None:
                self._between_tokens(pos)
            self.comm.control(C.OP_DECODE, token, pos)
            token = sample(self.forward(np.array([token], dtype=np.int64), pos))
            pos += 1
        self._pos = pos
        self.comm.control(C.OP_STOP)
        pieces.append(stream.flush())
        emit(pieces[-1])
        decode_s = time.perf_counter() - t1
        n_decoded = pos - len(self.prompt)  # forward passes after the prefill
        return dict(
            prompt_tokens=self.prompt.tolist(), tokens=tokens, text="".join(pieces),
            prefill_ms=round(prefill_s * 1e3, 3), prompt_tokens_per_s=round(len(self.prompt) / prefill_s, 3),
            decode_tokens_per_s=round(n_decoded / decode_s, 3) if n_decoded else None,
            ms_per_token=round(decode_s * 1e3 / n_decoded, 3) if n_decoded else None,
            load_s=round(self.load_s, 3), n_ranks=self.comm.size, allreduce=self.comm.algorithm,
            ratios=format_ratios(self.ratios), backend=self.opts.backend,
        )

    # ---- live re-partition (rank 0 is told by the control socket) ---------------------------------------------
    _pos = None  # rank 0: the position of the token boundary it is at, or where generation stopped

    def _between_tokens(self, pos):
        """Rank 0 at the token boundary before position `pos`: apply what the control socket has due now."""
        due = self.control.poll(pos)
        for request in due:
            if request.cmd == "migrate":
                self.comm.control(C.OP_REPLAN, request.epoch, pos)
                t = time.perf_counter()
                error, ranks = self._replan(request.epoch, pos, request.plan, request.ratios)
                ms = round((time.perf_counter() - t) * 1e3, 3)
                if error is not None:
                    self.control.finish(request, {"ok": False, "error": f"the migration failed and the plan is "
                                                                        f"unchanged: {error}", "applied_at": None})
                    continue
                moved = sum(r["weights_bytes_sent"] + r["cache_bytes_sent"] for r in ranks)
                summary = dict(epoch=self.epoch, applied_at=pos, bytes_moved=moved, ms=ms)
                self.migrations.append(summary)
                self.control.finish(request, {"ok": True, **summary, "ratios": format_ratios(self.ratios),
                                              "plan": [s.layout() for s in self.plan], "ranks": ranks},
                                    self.plan, self.ratios, self.epoch)
        statuses = [r for r in due if r.cmd == "status"]
        if statuses:
            self.comm.control(C.OP_STATUS)
            reply = dict(ok=True, position=pos, epoch=self.epoch, ratios=format_ratios(self.ratios),
                         n_layers=self.cfg.n_layers, ranks=self.comm.gather(self._recent_stats()))
            for r in statuses:
                self.control.finish(r, reply)

    def _replan(self, epoch, pos, plan=None, ratios=None):
        """Every rank: take rank 0's new plan and re-partition to it at position `pos`. Returns (the agreed error
        or None, and on rank 0 every rank's figures)."""
        plan, ratios = self.comm.bcast((plan, ratios))
        error, stats = Repartition(self, plan, pos, self.opts.migrate_weights).run()
        if error is None:
            self.plan, self.share, self.ratios, self.epoch = plan, plan[self.comm.rank], ratios, epoch
            self._vocab_counts = [s.n_vocab for s in plan]
            self.comm.set_ratios(ratios)
        return error, self.comm.gather(stats)

    def _recent_stats(self):
        """This rank's share and its mean compute and sync time per decode step over the last steps."""
        n = len(self._recent)
        compute, sync = (sum(c for c, _ in self._recent), sum(s for _, s in self._recent)) if n else (0.0, 0.0)
        return {**self.share.layout(), "layers": [0, self.cfg.n_layers], "host": C.host_name(),
                "compute_ms": round(compute * 1e3 / max(n, 1), 3), "sync_ms": round(sync * 1e3 / max(n, 1), 3),
                "steps": n}

"""The transformer on one rank's shards, on a Vulkan device: `spmd.model.Model`'s math as recorded command buffers.

A pass of n token rows through the rank's stage (its layers, `stage_schedule`; x: the residual stream, on the device
throughout), per layer, with a barrier after each line:
    xn        = RMSNorm(x) * attn_norm                                  rmsnorm_f32
    q, k, v   = xn @ wq/wk/wv.T (+ biases)                              3 dispatches, no barrier between them
    q, k      = RMSNorm of each head (qwen3)                            headnorm_f32, in place
    att       = attention(rope(q), rope(k) -> cache, v -> cache)        1 dispatch (rope and cache store fused); 2
                                                                        over ATTENTION_STORE rows: store, attend;
                                                                        2 for a decode step over long caches
                                                                        (SPLIT_FROM): splits (storing), combine
    x        += att @ wo.T                                              the partial sum: allreduced with the stage
    xn        = RMSNorm(x) * ffn_norm
    h         = silu(xn @ w1.T) * (xn @ w3.T)                           1 dispatch: gate and up rows side by side
    x        += h @ w2.T                                                the partial sum: allreduced with the stage
x comes in from the host (the embeddings, or the previous stage's hidden state) through `io`, or a prompt's rows
are embedded on the device where the one rank holds token_embd there (`embed`, kernels/embed_<w>); at the end either
logits = (RMSNorm(x[rows]) * output_norm) @ output.T of each segment's last row (the head) or x goes back to the
host through `io`.

The rows are the stacked segments of the pass (`spmd.model.Segment`: consecutive tokens of one sequence): the
products run once over all of them; the attention kernel reads, per row, a table the host writes before each
submit (`_put_rows`): its position, its segment's first position and first row in the pass, and its slot's first
row in the cache. In a pass of up to ATTENTION_STORE rows, keys before the segment come from the slot's cache and
those of the segment from this pass (rotated again by each row that reads them); a larger pass stores every row's
key and value first, then attends with every key from the cache.

The KV cache is a fixed pool on the device, allocated up front: per layer one buffer for K and one for V of
(slots, kv, max_seq, head_dim) float32 (--kv-cache f16: float16, kernels/attention_kv16), every slot max_seq
positions long (the CPU's caches are per-sequence arrays of the sequence's need). `open(slot, need)` makes a
slot's region valid without clearing it: every position is written (by a pass, or `cache_put`) before a later
pass reads it. A layer's buffer must fit the device's maxStorageBufferRange (128 MiB on lavapipe, 4 GiB on
NVIDIA).

A one-rank stage's one-token decode fuses RMSNorm away: each product that adds into x (wo, w2) also writes
xg = x * (the next norm's weight) and one partial sum of x^2 per workgroup; the products that read xg add the
partial sums up and scale their result by rsqrt(mean + eps). That leaves 5 barriers a layer (and one a token before
the first layer: kernels/prenorm_f32 makes its xg and sums from the host's x); the stage's last w2 writes xg only for
the head. A chained greedy decode (`ahead`, of one or several sequences) records a decode step's work after a first
step that embeds the tokens on the device (kernels/embed_<w>; one row: with the same sums in the same order as
prenorm_f32) and ends each step with kernels/argmax_f32, whose choices the next step's command buffer embeds.

With one rank in the stage (allreduce None) a decode step is one command buffer, one submit; any other pass (a
prompt; not while profiling) is cut after half-layers 1, 2, 4, 8, ... and each part is submitted as soon as it is
recorded, only the last waited for, so that the GPU works while the host records the rest (a 128-token TinyLlama
prompt: 2-4 ms of recording against 11 ms on an H200's GPU; 0.48x -> 0.56x llama.cpp CUDA's prompt speed). With
several, each half-layer ends by writing its partial sum to host memory (`delta`); the host allreduces it in place
and the next command buffer starts with x += delta. With weights streamed (--memory-limit, spmd.stream's
DeviceWindow) each streamed half-layer is a command buffer of its own, run while the window holds its matrices
in their slot.
Decode steps (one token of each of up to KEPT_ROWS sequences) keep their command buffers, recorded once per
(multi-rank, head, rows, split: whether its caches are long); any other pass (a prompt, or prompts and decode
tokens mixed) records a one-off set over activations kept for such passes of up to KEPT_PASS_ROWS rows
(`_pass_acts`).
"""
import struct
from typing import NamedTuple

import numpy as np

from ..errors import UserError
from ..model import KV_DTYPES, Rope, check_pass, check_slot, last_rows, segment_rows, stage_schedule
from .vk_runtime import MIB, Buffer, Recording, env_tuple
from .vulkan import FLOATS, pad

ATTENTION_PUSH = "<8IfIIIII"  # group, qkv_stride, k_off, v_off, o_stride, max_seq, rope_dim, neox, scale, mode,
# splits, split_keys, n, round (kernels/attention_io.glsl)
NORM_PUSH = "<4If"  # dim, x_stride, x_off, y_stride, eps
HEADNORM_PUSH = "<3If"  # head_dim, qkv_stride, heads, eps (kernels/headnorm_f32.comp)
KEPT_ROWS = 64  # decode steps of up to this many sequences keep their recorded command buffers
# Passes of more rows store their keys and values, then attend (kernels/attention_f32 modes 1, 2): 312 -> 51 us a
# layer for a 128-token TinyLlama prompt on an H200; a decode step of up to 8 sequences keeps one dispatch (not
# measured either way near 8 rows: the same bound as matvec_rows on a GPU)
ATTENTION_STORE = 8
# ... and attend in blocks of this many rows (kernels/attention_block.glsl; its BQ), where the device has subgroup
# quad operations (SPMD_VK_ATTENTION_BLOCKS=0: a row at a time, attention_f32's mode 2)
BLOCK_ROWS = 32
# ... only where the pass's segments average this many rows: a block takes its segments one after another, all its
# threads over each one's keys, so decode steps of 9-64 sequences (one row a segment) ran 3-10x slower in blocks
# than a row at a time (lavapipe, 12 sequences at position 100 and 32 at 480)
BLOCK_SEGMENT_ROWS = 8
BLOCK_SHARED = 32768  # its key and value tiles' bytes (TK = 4096 / head_dim keys of head_dim floats, twice)
# A decode step whose longest sequence has SPLIT_FROM positions or more attends in splits of the backend's
# split_keys keys (spmd.backends.vulkan.SPLIT_KEYS), one workgroup each, whose partial softmaxes a last dispatch
# combines (modes 3 and 4): one workgroup a query head had left most of the GPU idle (TinyLlama on an H200 at 2048
# positions: 2.44 ms a token, 0.42x llama.cpp CUDA's decode). Below it one dispatch (mode 0) costs less than two.
SPLIT_FROM = 512
KEPT_PASS_ROWS = 512  # activations of other passes up to this many rows stay allocated between passes
ARGMAX_WG = 1024  # kernels/argmax_f32's threads (one workgroup), or the device's most


def free_pass(acts, recs):
    """Free a pass's recorded command buffers and its Activations."""
    for rec in recs:
        rec.free()
    acts.free()


def runs(rows):
    """[(index, first row, count)]: ascending rows as runs of consecutive ones (one dispatch each)."""
    out = []
    for at, row in enumerate(rows):
        if out and out[-1][1] + out[-1][2] == row:
            out[-1][2] += 1
        else:
            out.append([at, row, 1])
    return out


class Tokens(NamedTuple):
    """A first stage's input left as token ids (`VulkanModel.embed`): `forward` embeds them on the device."""
    ids: np.ndarray
    dim: int

    @property
    def shape(self):
        return (len(self.ids), self.dim)


class Activations:
    """The device buffers of a pass of up to `rows` token rows (each padded to 32 floats, zero-filled); `n`: the
    rows of the pass they serve now (`use`). The (n, ...) shapes below are at n = rows."""

    def __init__(self, m, n, scored=0, fused=False, split=False, chained=False):
        """scored: rows the head turns into logits (0: no head). fused: one-rank one-token decode, where each
        product that updates x also writes the next RMSNorm's input and its partial sums of squares (xg, ss), so
        RMSNorm needs no pass of its own (`_first_norm` does the first layer's). split: a decode step over long caches,
        whose attention goes in splits (SPLIT_FROM) with their partial softmaxes in `part`. chained: a chained
        decode's (`VulkanModel.ahead`), whose logits stay on the device for kernels/argmax_f32."""
        dev = m.dev
        self.n, self.rows, self.scored, self.fused = n, n, scored, fused  # rows: what the buffers hold (n or more)
        self.segments = n  # segments of the pass being recorded (forward sets it; a decode step: one a row)
        self.split = split
        self.x = Buffer(dev, n * m.dp * 4)  # (n, dp) residual stream
        # (n, dp) the host's windows on x: `io` the input written in (x itself where mappable), `out` the hidden state
        # read out (x itself where the host reads it through its caches: reading a GPU's memory over PCIe, uncached,
        # took about 0.5 ms for a TinyLlama row on an H100)
        self.io = self.x if self.x.view is not None else Buffer(dev, n * m.dp * 4, "host")
        self.out = self.io if self.io is not self.x or self.x.cached else Buffer(dev, n * m.dp * 4, "host")
        # (n, 4) uint32 the attention kernel's row table, written before each submit: in device memory where the
        # host can map it (read by every attention workgroup: a read over PCIe from host memory cost ~2 us each
        # on an H200)
        self.table = Buffer(dev, n * 16, "device" if dev.direct else "host")
        self.xn = Buffer(dev, n * m.dp * 4)  # (n, dp) RMSNorm(x) * weight
        self.qkv = Buffer(dev, n * m.qkv_stride * 4)  # (n, [q | k | v])
        self.att = Buffer(dev, n * m.att_stride * 4)  # (n, heads * head_dim) attention output
        self.h = Buffer(dev, n * m.ffn_stride * 4)  # (n, n_ffn) silu(gate) * up
        self.delta = Buffer(dev, n * m.dp * 4, "host")  # (n, dp) a partial sum, allreduced by the host
        self.buffers = [self.x, self.table, self.xn, self.qkv, self.att, self.h, self.delta]
        if m.apart:  # (n, n_ffn) up, where a layer's gate and up are products of different types
            self.up = Buffer(dev, n * m.ffn_stride * 4)
            self.buffers.append(self.up)
        self.ids = None  # (n,) uint32 token ids that a prompt pass embeds on the device (`VulkanModel.embed`)
        if m.embedding is not None and not chained:
            self.ids = Buffer(dev, n * 4)
            self.buffers.append(self.ids)
        if split:  # (n, heads, splits, head_dim + 2): each split's m, l and sums (kernels/attention_main.glsl)
            self.part = Buffer(dev, n * m.nh * m.splits * (m.cfg.head_dim + 2) * 4)
            self.buffers.append(self.part)
        if scored:
            self.logits = Buffer(dev, scored * m.nv * 4, "device" if chained else "host")  # (scored, nv)
            self.buffers.append(self.logits)
        if scored and not fused:  # (scored, norm_stride) the scored rows' RMSNorm, rows at aligned offsets
            self.xh = Buffer(dev, scored * m.norm_stride * 4)
            self.buffers.append(self.xh)
        if fused:
            self.ss_count = -(-m.cfg.dim // m.backend.matvec_nr)  # workgroups of the matvec that writes x (never wide)
            self.xg = Buffer(dev, n * m.dp * 4)  # (n, dp) x * the next RMSNorm's weight
            self.ss = Buffer(dev, self.ss_count * 4)  # partial sums of x^2
            self.buffers += [self.xg, self.ss]
        # --activations int8: a product's input rounded to 8 bits (VulkanModel._int8); fused, a second set for
        # the RMSNorm inputs that wo and w2 round as they finish them (matvec's QUANTIZE, with a count per block)
        # while gate and up round theirs into the first
        self.int8 = self.int8_norm = self.counts = None
        if m.int8:
            widest = max(m.dp, m.att_stride, m.ffn_stride)
            self.int8 = m.backend.int8_input(n, widest)
            self.buffers += [self.int8.rounded, self.int8.q, self.int8.d]
            if fused:
                self.int8_norm = m.backend.int8_input(1, m.dp)
                self.counts = Buffer(dev, widest // 32 * 4)
                self.buffers += [self.int8_norm.rounded, self.int8_norm.q, self.int8_norm.d, self.counts]
        if self.io is not self.x:
            self.buffers.append(self.io)
        if self.out is not self.io:
            self.buffers.append(self.out)
        dev.zero(self.buffers)

    def use(self, n):
        """Serve a pass of n <= rows rows from now on."""
        assert n <= self.rows
        self.n = n
        return self

    def free(self):
        for b in self.buffers:
            b.free()


class VulkanModel:
    """`spmd.model.Model`'s interface (open / free / slots, embed, forward over segments, cache_take / cache_put,
    close) on a Vulkan device; sequences in slots 0..slots-1 of up to max_seq positions each."""

    def __init__(self, backend, cfg, weights, share, max_seq, slots=1, kv_cache="f32"):
        self.backend, self.dev = backend, backend.dev
        self.cfg, self.w, self.share, self.max_seq, self.n_slots = cfg, weights, share, max_seq, slots
        hd, layers = cfg.head_dim, share.layer_ids
        self.schedule = stage_schedule(layers)
        self.nh, self.nkv, self.nf, self.nv = share.n_heads, share.n_kv, share.n_ffn, share.n_vocab
        if hd % 4:
            raise UserError(f"vulkan backend: head size {hd} is not a multiple of 4; use --backend cpu")
        self.slot_rows = self.nkv * max_seq  # cache rows (one position of one KV head) of a slot in a layer
        self.kv_dtype = np.dtype(KV_DTYPES[kv_cache])  # float32, or float16 (kernels/attention_kv16)
        layer_cache = slots * self.slot_rows * hd * self.kv_dtype.itemsize  # (slots, kv, max_seq, hd) a layer
        if layer_cache > self.dev.max_range:
            raise UserError(f"vulkan backend: a layer's KV cache of {slots} sequences (--sequences) x {max_seq} "
                            f"positions (the context: prompt and steps) x {self.nkv} KV heads is "
                            f"{layer_cache / MIB:.0f} MiB, over the device's maxStorageBufferRange of "
                            f"{self.dev.max_range / MIB:.0f} MiB: lower --sequences or --steps, or give --kv-cache f16")
        # --activations int8 where some product has a quantised matrix (float ones read float activations: a model
        # of F16 or F32 matrices then rounds nothing)
        self.int8 = backend.int8 and any(lin.type not in FLOATS for lin in weights.linears())
        # whether some layer's gate and up cannot go in one product (types that differ: kernels/swiglu_f32 then)
        self.apart = any(not weights.layer(i).w1.pairs_with(weights.layer(i).w3) for i in layers)
        self.dp = pad(cfg.dim)
        self.qkv_width = (self.nh + 2 * self.nkv) * hd
        self.qkv_stride, self.att_stride, self.ffn_stride = pad(self.qkv_width), pad(self.nh * hd), pad(self.nf)
        self._own = []  # every buffer this model allocated
        self.norm_stride = pad(cfg.dim, 64)  # 256-byte rows: any storage-buffer offset alignment
        # rows 2i, 2i+1: the attention and FFN norms of the stage's i-th layer; then output_norm with the head
        self.n_norms = 2 * len(layers) + (weights.output_norm is not None)
        norms = np.zeros((self.n_norms, self.norm_stride), np.float32)
        for i, layer in enumerate(layers):
            lw = weights.layer(layer)
            norms[2 * i, :cfg.dim], norms[2 * i + 1, :cfg.dim] = lw.attn_norm, lw.ffn_norm
        if weights.output_norm is not None:
            norms[-1, :cfg.dim] = weights.output_norm
        self.norms = self._const(norms)
        self.qk_norms = None  # qwen3: per layer of the stage its q then k norm weights (headnorm_f32), aligned rows
        if cfg.qk_norm:
            self.qk_stride = pad(2 * hd, 64)
            qk = np.zeros((len(layers), self.qk_stride), np.float32)
            for i, layer in enumerate(layers):
                qk[i, :hd], qk[i, hd:2 * hd] = weights.layer(layer).q_norm, weights.layer(layer).k_norm
            self.qk_norms = self._const(qk)
            self._headnorm = self.dev.pipeline("headnorm_f32", 2, struct.calcsize(HEADNORM_PUSH), (min(hd, 64),))
        self.bias = None
        if cfg.qkv_bias and self.qkv_width:
            self.bias = self._const(np.stack([np.concatenate([weights.layer(i).bq, weights.layer(i).bk,
                                                              weights.layer(i).bv]) for i in layers]))
        rope = Rope(cfg, max_seq, weights.rope_factors)
        self.rope = self._const(np.concatenate([rope.cos.reshape(-1), rope.sin.reshape(-1)]))
        self.kcache = [self._buffer(layer_cache) for _ in layers]
        self.vcache = [self._buffer(layer_cache) for _ in layers]
        self.dev.zero(self.kcache + self.vcache)
        self._open = {}  # slot -> need: the open sequence slots
        self._decode = {}  # (multi-rank, head, rows, split) -> (Activations, [Recording]): decode steps
        self._pass = None  # the Activations of other passes (_pass_acts)
        self._timed = None  # the last pass's recordings, where it was a decode step (their timestamps: gpu_seconds)
        self._chains = {}  # (rows, split, n_known) -> (Activations, [the one Recording of a step], chain buffer)
        wg = max(backend.attention_wg, -(-hd // 16))  # (kernels/attention_main.glsl: KC threads score a key)
        ks = max(1, wg // (hd // 4))  # threads sum the values 4 dims at a time, keys split ks ways
        kernel = "attention_kv16" if self.kv_dtype == np.float16 else "attention_f32"
        self.splits = -(-max_seq // backend.split_keys)  # a split decode step's: enough for the longest sequence
        self._attention = self.dev.pipeline(kernel, 10, struct.calcsize(ATTENTION_PUSH),
                                            (wg, hd, ks, -(-(hd // 4) * ks // wg), backend.attention_unroll))
        self._attention_block = None
        blocks = self.dev.quads and self.dev.shared_bytes >= BLOCK_SHARED and hd <= 256  # (a thread holds hd / 2)
        if blocks and env_tuple("SPMD_VK_ATTENTION_BLOCKS", (1,))[0]:
            self._attention_block = self.dev.pipeline(kernel.replace("attention", "attention_block"), 10,
                                                      struct.calcsize(ATTENTION_PUSH), (4 * BLOCK_ROWS, hd))
        self.profile = False  # bench: timestamps after every step of each pass (last_profile)
        self._add = self.dev.pipeline("add_f32", 2, 4)
        self._swiglu = self.dev.pipeline("swiglu_f32", 2, 4) if self.apart else None
        self._rmsnorm = self.dev.pipeline("rmsnorm_f32", 3, struct.calcsize(NORM_PUSH), (backend.norm_wg,))
        self._prenorm = self.dev.pipeline("prenorm_f32", 7, 16, (backend.norm_wg,))  # (`_first_norm`)
        self.embedding = self._embedding()  # token_embd on the device for `ahead`, or None

    def _buffer(self, nbytes, where="device"):
        b = Buffer(self.dev, nbytes, where)
        self._own.append(b)
        return b

    def _const(self, array):
        b = self._buffer(array.nbytes)
        b.write(np.ascontiguousarray(array, np.float32))
        return b

    def _norm(self, row):
        return (self.norms, row * self.norm_stride * 4, self.dp * 4)

    def _row(self, layer, half):
        """The norm row of a half-layer (absolute layer index); the stage's end is the output norm's row."""
        return 2 * (layer - self.share.layers[0]) + half

    # ---- recording --------------------------------------------------------------------------------------------
    def _record(self, a, multi, head, scored, timestamps=False, early=False, recs=None, into=None, embed=False):
        """The command buffers of one pass over a's n rows: one; or, several ranks in the stage, one per half-layer
        plus the end; or, weights streamed, each streamed half alone in one (its `key` names it, for
        `DeviceWindow.hold`) and the rest between them. scored: the rows the head turns into logits (ascending).
        recs: the list they go into (the caller's, which frees what is in it however recording ends), else a new
        one.
        early (one rank, nothing streamed; the pass's input in place): the pass is cut after half-layers 1, 2, 4,
        8, ... and each part but the last is submitted as soon as it is recorded, so that the GPU works while the
        host records the rest (the caller runs the last, which waits for all).
        into (a one-rank pass, nothing streamed): the caller's begun Recording, last in recs, which the pass goes
        into and which stays open (a barrier after the head) for what the caller records next.
        embed: x's rows are token_embd's rows a.ids, embedded first (`embedding`; else x comes in through io)."""
        profile = timestamps and self.profile
        recs = [] if recs is None else recs
        if into is None:
            recs.append(Recording(self.dev, timestamps, profile))
        if embed:
            part = self.embedding.parts[0]
            self._first_norm(recs[-1], a, self._embed_pipe(), part.w, part.d or self.backend.dummy, a.ids)
        elif a.io is not a.x and into is None:
            self.dev.copy(recs[-1], a.io, a.x, a.n * self.dp * 4)
            recs[-1].barrier(after_copy=True)
        if a.fused and into is None:  # the first layer's RMSNorm input and sum of squares from x
            self._first_norm(recs[-1], a, self._prenorm, self.backend.dummy, self.backend.dummy, self.backend.dummy)
        if a.int8_norm is not None:  # that input rounded for q, k, v
            self.backend.quantize(recs[-1], a.xg, self.dp, 1, a.int8_norm)
        halves = {"attention": self._attention_half, "ffn": self._ffn_half}
        streamed = self.w.window.index if self.w.window is not None else {}
        recs[-1].key = None

        def cut(**barrier):
            recs[-1].barrier(**barrier)
            recs[-1].end()
            if early:
                recs[-1].submit(fence=False)
            recs.append(Recording(self.dev, timestamps, profile))
            recs[-1].key = None

        for i, (layer, half) in enumerate(self.schedule):
            if (layer, half) in streamed:  # alone in its command buffer: run while its slot holds it
                recs[-1].key = (layer, half)
                recs[-1].barrier(after_copy=True)  # (after a staging buffer's copy into its slot, where there is one)
            halves[half](recs[-1], layer, a, multi)
            if multi or (layer, half) in streamed or self.schedule[(i + 1) % len(self.schedule)] in streamed:
                cut(to_host=multi)
            elif early and i + 1 < len(self.schedule) and (i + 1) & i == 0:  # after half-layers 1, 2, 4, 8, ...
                cut()
            if multi:
                recs[-1].dispatch(self._add, [(a.x, 0, a.x.nbytes), (a.delta, 0, a.delta.nbytes)],
                                  struct.pack("<I", a.n * self.dp), (-(-a.n * self.dp // 256), 1, 1))
                recs[-1].barrier()
                recs[-1].mark("add")
        if head:
            self._classifier(recs[-1], a, scored)
        elif a.out is not a.x:  # the hidden state back to the host
            recs[-1].barrier(to_copy=True)
            self.dev.copy(recs[-1], a.x, a.out, a.n * self.dp * 4)
        if into is not None:
            into.barrier(after_copy=True)
            into.mark("classifier")
            return recs
        recs[-1].barrier(to_host=True)
        recs[-1].mark("classifier" if head else "hidden state out")
        recs[-1].end()
        return recs

    def _first_norm(self, rec, a, pipe, w, d, chain):
        """A decode step's input step (kernels/embed_main.glsl, a workgroup a row), then a barrier: embed_<w> (w, d
        the embedding's buffers) writes x's rows from token_embd's rows chain[0..n); fused (one row), it and
        prenorm_f32 (x from the host) write xg = x * the first layer's norm weight and ss = the sum of x^2."""
        first, dummy = self._row(self.share.layers[0], 0), self.backend.dummy
        xg, ss = (a.xg, a.ss) if a.fused else (dummy, dummy)
        rec.dispatch(pipe, [(b, 0, b.nbytes) for b in (w, d, chain, a.x)] + [self._norm(first)]
                     + [(b, 0, b.nbytes) for b in (xg, ss)],
                     struct.pack("<4I", self.dp // 32, self.cfg.dim, a.ss_count if a.fused else 0, self.dp),
                     (a.n, 1, 1))
        rec.barrier()
        rec.mark("input")

    def _classifier(self, rec, a, scored):
        """logits[s] = (RMSNorm(x[scored[s]]) * output_norm) @ output.T, where this rank holds classifier rows:
        the scored rows' norms gathered into xh (a dispatch per run of consecutive rows, bound at its 256-byte
        aligned row), then one product over them all."""
        out = self.w.output
        if self.nv and a.fused:  # (int8: the stage's last w2 rounded xg)
            out.dispatch(rec, a.xg, self.dp, 0, a.logits, self.nv, 0, 1, norm=self._fused_norm(a), int8=a.int8_norm,
                         wide=True)
        elif self.nv:
            stride = self.norm_stride
            for at, row, count in runs(scored):
                self._rmsnorm_rows(rec, a, self.n_norms - 1, row, count, (a.xh, at * stride * 4, count * stride * 4),
                                   stride)
            rec.barrier()
            rec.mark("rmsnorm")
            int8 = self._int8(rec, a, a.xh, stride, self.cfg.dim, len(scored), (out,))
            out.dispatch(rec, a.xh, stride, 0, a.logits, self.nv, 0, len(scored), int8=int8, wide=True)

    def _int8(self, rec, a, x, x_stride, width, rows, lins):
        """--activations int8: the first `width` floats of x's `rows` rows rounded to 8 bits a block for the
        products `lins` that read them (an Int8Input the dispatches take, after a barrier); None without int8, or
        where every one of them is a float matrix (which keeps float activations, as on the cpu backend)."""
        if a.int8 is None or not width or all(lin.type in FLOATS for lin in lins):
            return None
        into = a.int8._replace(stride=pad(width))
        self.backend.quantize(rec, x, x_stride, rows, into)
        return into

    def _attention_rounds(self, a, lw):
        """A fused int8 decode: the Int8Input that the attention kernel rounds its output into for wo (modes 0 and 4,
        kernels/attention_main.glsl `round_head`); None where wo needs no rounded input or a head is not whole
        blocks (a rounding pass then)."""
        if a.int8_norm is None or not self.nh or self.cfg.head_dim % 32 or lw.wo.type in FLOATS:
            return None
        return a.int8._replace(stride=self.att_stride)

    def _rounds(self, a, into):
        """The `quantize` of a fused decode product with int8 activations: (into, counts), else None."""
        return (into, a.counts) if a.int8_norm is not None else None

    def _fused_norm(self, a):
        return (a.ss, a.ss_count, self.cfg.norm_eps, self.cfg.dim) if a.fused else None

    def _produce(self, a, row):
        """The binding for a product that updates x to also write RMSNorm `row`'s input (fused decode; none after
        the stage's last layer where the rank holds no output norm)."""
        return (a.ss, self._norm(row), a.xg) if a.fused and row < self.n_norms else None

    def _rmsnorm_rows(self, rec, a, row, first, count, y, y_stride):
        """y (a binding, rows y_stride floats apart) = RMSNorm(a.x rows first..first+count-1) * norm weight `row`."""
        push = struct.pack(NORM_PUSH, self.cfg.dim, self.dp, first * self.dp, y_stride, self.cfg.norm_eps)
        rec.dispatch(self._rmsnorm, [(a.x, 0, a.x.nbytes), self._norm(row), y], push, (count, 1, 1))

    def _norm_step(self, rec, a, row):
        """a.xn = RMSNorm(a.x) * norm weight `row`, then a barrier."""
        self._rmsnorm_rows(rec, a, row, 0, a.n, (a.xn, 0, a.xn.nbytes), self.dp)
        rec.barrier()
        rec.mark("rmsnorm")

    def _attention_half(self, rec, layer, a, multi):
        cfg, lw, n, hd = self.cfg, self.w.layer(layer), a.n, self.cfg.head_dim
        li = layer - self.share.layers[0]
        rounded = self._attention_rounds(a, lw)
        if self.nh:
            if not a.fused:
                self._norm_step(rec, a, self._row(layer, 0))
            x = a.xg if a.fused else a.xn
            int8 = a.int8_norm or self._int8(rec, a, x, self.dp, cfg.dim, n, (lw.wq, lw.wk, lw.wv))
            for lin, off in ((lw.wq, 0), (lw.wk, self.nh * hd), (lw.wv, (self.nh + self.nkv) * hd)):
                lin.dispatch(rec, x, self.dp, 0, a.qkv, self.qkv_stride, off, n, bias=self.bias,
                             bias_off=li * self.qkv_width + off, norm=self._fused_norm(a), int8=int8, wide=True)
            rec.barrier()
            rec.mark("q k v")
            if self.qk_norms is not None:  # qwen3: each q and k head RMS-normalised in place
                push = struct.pack(HEADNORM_PUSH, hd, self.qkv_stride, self.nh, cfg.norm_eps)
                rows = (self.qk_norms, li * self.qk_stride * 4, 2 * hd * 4)
                rec.dispatch(self._headnorm, [(a.qkv, 0, a.qkv.nbytes), rows], push, (self.nh + self.nkv, n, 1))
                rec.barrier()
                rec.mark("q k norms")
            part = a.part if a.split else a.att  # (only modes 3 and 4 use binding 6: att stands in for it)
            bufs = [(b, 0, b.nbytes) for b in (a.table, a.qkv, self.rope, self.kcache[li], self.vcache[li], a.att,
                                               part, *((rounded.q, rounded.d, rounded.rounded) if rounded else
                                                       (a.att,) * 3))]
            # up to ATTENTION_STORE rows store and attend in one dispatch; more store every key first, then attend
            # (in blocks of rows where the device can); a decode step over long caches attends in splits (storing),
            # then combines them
            modes = (3, 4) if a.split else (0,) if a.n <= ATTENTION_STORE else (1, 2)
            for mode in modes:
                push = struct.pack(ATTENTION_PUSH, cfg.group, self.qkv_stride, self.nh * hd, (self.nh + self.nkv) * hd,
                                   self.att_stride, self.max_seq, cfg.rope_dim, int(cfg.rope_neox),
                                   float(1.0 / np.sqrt(hd)), mode, self.splits, self.backend.split_keys, n,
                                   int(rounded is not None and mode in (0, 4)))
                if mode == 2 and self._attention_block is not None and a.n >= BLOCK_SEGMENT_ROWS * a.segments:
                    rec.dispatch(self._attention_block, bufs, push, (self.nh, -(-n // BLOCK_ROWS), 1))
                else:
                    heads = self.nkv if mode == 1 else self.nh  # (mode 1: a workgroup per KV head stores)
                    rec.dispatch(self._attention, bufs, push, (heads, n, self.splits if mode == 3 else 1))
                rec.barrier()
            rec.mark("attention")
        int8 = rounded or self._int8(rec, a, a.att, self.att_stride, self.nh * hd, n, (lw.wo,))
        if multi:  # the partial sum (zeros when this rank holds no heads)
            lw.wo.dispatch(rec, a.att, self.att_stride, 0, a.delta, self.dp, 0, n, int8=int8)
        elif self.nh:
            produce = self._produce(a, self._row(layer, 1))
            lw.wo.dispatch(rec, a.att, self.att_stride, 0, a.x, self.dp, 0, n, accum=True, produce=produce,
                           int8=int8, quantize=self._rounds(a, a.int8_norm) if produce else None)
            rec.barrier()
            rec.mark("wo")

    def _ffn_half(self, rec, layer, a, multi):
        lw, n = self.w.layer(layer), a.n
        rounded = None  # h rounded to 8 bits for w2 by the product that finished it
        if self.nf:
            if not a.fused:
                self._norm_step(rec, a, self._row(layer, 1))
            x = a.xg if a.fused else a.xn
            int8 = a.int8_norm or self._int8(rec, a, x, self.dp, self.cfg.dim, n, (lw.w1, lw.w3))
            if lw.w1.pairs_with(lw.w3):
                lw.w1.dispatch(rec, x, self.dp, 0, a.h, self.ffn_stride, 0, n, pair=lw.w3, norm=self._fused_norm(a),
                               int8=int8, quantize=self._rounds(a, a.int8))  # silu(gate) * up
                if a.int8_norm is not None:
                    rounded = a.int8._replace(stride=self.ffn_stride)  # (gate and up rounded h as they finished it)
            else:  # up, then gate, then silu(gate) * up
                for lin, into in ((lw.w3, a.up), (lw.w1, a.h)):
                    lin.dispatch(rec, x, self.dp, 0, into, self.ffn_stride, 0, n, norm=self._fused_norm(a), int8=int8)
                rec.barrier()
                rec.dispatch(self._swiglu, [(a.h, 0, a.h.nbytes), (a.up, 0, a.up.nbytes)],
                             struct.pack("<I", n * self.ffn_stride), (-(-n * self.ffn_stride // 256), 1, 1))
            rec.barrier()
            rec.mark("gate up")
        int8 = rounded or self._int8(rec, a, a.h, self.ffn_stride, self.nf, n, (lw.w2,))
        if multi:
            lw.w2.dispatch(rec, a.h, self.ffn_stride, 0, a.delta, self.dp, 0, n, int8=int8)
        elif self.nf:
            produce = self._produce(a, self._row(layer, 2))
            lw.w2.dispatch(rec, a.h, self.ffn_stride, 0, a.x, self.dp, 0, n, accum=True, produce=produce,
                           int8=int8, quantize=self._rounds(a, a.int8_norm) if produce else None)
            rec.barrier()
            rec.mark("down")

    # ---- sequence slots -----------------------------------------------------------------------------------------
    def open(self, slot, need):
        """Slot `slot` holds a sequence of up to `need` positions (at most max_seq) from now; its region of the
        pool is not cleared (see the module's docstring)."""
        if not 0 <= slot < self.n_slots or not 0 < need <= self.max_seq:
            raise ValueError(f"slot {slot} of {need} positions: this model has slots 0..{self.n_slots - 1} of at "
                             f"most {self.max_seq}")
        self._open[slot] = need

    def free(self, slot):
        self._open.pop(slot, None)

    @property
    def slots(self) -> dict:
        """{slot: need} of the open slots."""
        return dict(self._open)

    # ---- running ----------------------------------------------------------------------------------------------
    def embed(self, tokens):
        """(n,) token ids -> the first stage's input: (n, dim) float32; or, where token_embd is on the device
        (`embedding`), the ids as `Tokens`, which a prompt pass embeds on the device (kernels/embed_<w>: the same
        floats as the host's lookup; a decode step looks them up on the host, `forward`)."""
        if self.embedding is None:
            return self.w.embed(tokens)
        return Tokens(np.asarray(tokens, np.int64).reshape(-1), self.cfg.dim)

    def forward(self, x, segments, allreduce, head):
        """x (n, dim) float32, the hidden state entering this stage, the segments' rows stacked -> with `head`,
        this rank's logits slices (len(segments), n_vocab_local) of each segment's last token; else (n, dim) float32
        after the stage's layers. allreduce: sums a float32 array over the stage's ranks in place, or None when
        the stage has one rank."""
        self._check(x, segments)
        self._timed = None
        n, multi = x.shape[0], allreduce is not None
        kept = len(segments) == n <= KEPT_ROWS  # a decode step: one token of each sequence
        tokens = x.ids if isinstance(x, Tokens) else None
        if tokens is not None and (kept or multi):  # (a kept step's input goes in through io)
            x, tokens = self.w.embed(tokens), None
        # parts queued as they are recorded (`_record`; not while profiling, whose timestamps would overlap)
        early = not kept and not multi and self.w.window is None and not self.profile
        if kept:
            split = self.splits > 1 and max(seg.pos for seg in segments) + 1 >= SPLIT_FROM
            if (multi, head, n, split) not in self._decode:
                acts = Activations(self, n, n if head else 0, fused=n == 1 and not multi and self.dev.direct,
                                   split=split)
                recs = self._record(acts, multi, head, range(n), timestamps=True)
                self._decode[multi, head, n, split] = (acts, recs)
            acts, recs = self._decode[multi, head, n, split]
        else:
            acts, recs = self._pass_acts(n, len(segments) if head else 0), []
            acts.segments = len(segments)
        try:
            if tokens is None:
                self._put_input(acts, x)
            else:
                acts.ids.array(np.uint32, (n,))[:] = tokens
            self._put_rows(acts, segments)
            if not kept:
                self._record(acts, multi, head, last_rows(segments), timestamps=self.profile, early=early, recs=recs,
                             embed=tokens is not None)
            delta = acts.delta.array(np.float32, (n, self.dp))
            # the device copies streamed halves in itself (the window holds them in host memory): one rank queues
            # the pass's command buffers without waiting between them
            queued = not (multi or self.profile) and self.w.window is not None and self.w.window.host is not None
            for i, rec in enumerate(recs[-1:] if early else recs):
                go = (lambda: rec.submit(fence=False)) if queued and i < len(recs) - 1 else rec.run  # noqa: E731
                if rec.key is not None:  # a streamed half: in its slot of the window while it runs
                    with self.w.window.hold(rec.key):
                        go()
                else:
                    go()
                if multi and i < len(recs) - 1:
                    self._allreduce(allreduce, delta)
            self._timed = recs if kept else None
            if self.profile:
                self.last_profile = [item for rec in recs for item in rec.profile()]
            if head:
                return acts.logits.array(np.float32, (len(segments), self.nv)).copy()
            return acts.out.array(np.float32, (n, self.dp))[:, :self.cfg.dim].copy()
        except BaseException:  # (recording failed, or a Ctrl-C while waiting): nothing may still run when its
            # buffers go
            self.dev.idle()
            raise
        finally:
            if not kept:
                for rec in recs:
                    rec.free()
                if acts is not self._pass:
                    acts.free()

    # ---- chained greedy decode ---------------------------------------------------------------------------------
    def ahead_tokens(self, rows=1):
        """The tokens `ahead` chains at most for decode steps of `rows` sequences (the backend's, SPMD_VK_AHEAD),
        or 0 where it cannot run: it needs the whole model here (the caller knows whether this is the only rank),
        a device whose memory the host maps, no streamed weights, a token_embd of a type kernels/embed_<w> reads,
        and a step whose command buffers are kept (KEPT_ROWS): `_embedding`."""
        return self.backend.ahead if self.embedding is not None and rows <= KEPT_ROWS else 0

    def _embedding(self):
        """token_embd as one VulkanLinear (the classifier itself where they are one tensor), loaded with the model
        (`RankState.memory_needs` counts it), where a chained decode can run: the whole model here (the caller
        knows whether this is the only rank), a device whose memory the host maps, no streamed weights, a type it
        embeds (`VulkanBackend.embeds`), one buffer (within maxStorageBufferRange). Else None."""
        name, f = "token_embd.weight", self.w.file
        whole = len(self.share.layer_ids) == self.cfg.n_layers and self.nv == self.cfg.vocab
        if not (self.backend.ahead and whole and self.dev.direct and self.w.window is None
                and self.backend.embeds(f.info(name).qtype)):
            return None
        emb = self.w.output if self.cfg.tied_output else self.backend.linear(f.rows(name, 0, self.cfg.vocab))
        if len(emb.parts) == 1:
            return emb
        if emb is not self.w.output:
            emb.free()
        return None

    def ahead(self, tokens, segments, k, n_known):
        """Greedy decode of sequences (`tokens[i]` at segments[i].pos of slot segments[i].slot, one-token segments) for
        up to k <= `ahead_tokens(len(segments))` tokens without the host in the loop: a step's command buffer embeds
        the tokens on the device (kernels/embed_*), runs the decode step, and picks each row's next token
        (kernels/argmax_f32 over ids 0..n_known-1), which the next step embeds; the one buffer is submitted k times
        and the last waited for. Returns (tokens, finite): per chained step a list of each sequence's token, and
        whether its logits were finite; k steps, or fewer where the chain reaches the position from which a decode
        step attends in splits (SPLIT_FROM), so that every step runs the attention a step a token would: the same
        bits. A slot's positions after the caller's last used token hold keys it never reads."""
        n = len(segments)
        if not 1 <= k <= self.backend.ahead or not 1 <= n <= KEPT_ROWS or any(seg.n != 1 for seg in segments):
            raise ValueError(f"ahead: {k} tokens of {segments} (1..{self.backend.ahead} from 1..{KEPT_ROWS} "
                             "one-token segments)")
        self._check(np.zeros((n, self.cfg.dim), np.float32), segments)  # (each slot open, once)
        for seg in segments:
            check_slot(self._open, seg.slot, seg.pos + k)
        self._timed = None
        last = max(seg.pos for seg in segments)
        split = self.splits > 1 and last + 1 >= SPLIT_FROM  # (as `forward` decides for a decode step)
        if self.splits > 1 and not split:
            k = min(k, SPLIT_FROM - 1 - last)
        if (n, split, n_known) not in self._chains:
            self._chains[n, split, n_known] = self._record_chain(n, split, n_known)
        acts, recs, chain = self._chains[n, split, n_known]
        words = chain.array(np.uint32, (2 * n + 2 * n * self.backend.ahead,))
        try:
            self._put_rows(acts, segments)
            words[:n], words[n:2 * n] = tokens, 0  # each row's token, and its count of steps taken
            for _ in range(k - 1):
                recs[0].submit(fence=False)
            recs[0].run()
            out = words[2 * n:2 * n + 2 * n * k].reshape(k, n, 2).copy()
        except BaseException:
            self.dev.idle()
            raise
        self._timed = recs * k  # (the last step's GPU time, k times: every step runs the same work)
        return out[:, :, 0].astype(int).tolist(), (out[:, :, 1] != 0).tolist()

    def _embed_pipe(self):
        return self.dev.pipeline(f"embed_{self.embedding.type}", 7, 16, (self.backend.norm_wg,))

    def _record_chain(self, n, split, n_known):
        """The Activations and the command buffer (in a list, for free_pass) of a chained decode of n sequences
        (`ahead`): one step, submitted once a token; and the chain buffer the steps pass the tokens in (each row's
        token, its count of steps taken, then each step's tokens and finite flags)."""
        acts = Activations(self, n, n, fused=n == 1, split=split, chained=True)
        chain = Buffer(self.dev, (2 * n + 2 * n * self.backend.ahead) * 4, "device")
        acts.buffers.append(chain)
        part = self.embedding.parts[0]  # (one: `_embedding`)
        embed = self._embed_pipe()
        argmax = self.dev.pipeline("argmax_f32", 3, 16, (min(ARGMAX_WG, self.dev.max_threads),))
        rec = Recording(self.dev, True, self.profile, queued_again=True)
        recs = [rec]
        try:
            self._first_norm(rec, acts, embed, part.w, part.d or self.backend.dummy, chain)
            self._record(acts, False, True, range(n), timestamps=True, recs=recs, into=rec)
            rec.dispatch(argmax, [(b, 0, b.nbytes) for b in (acts.logits, chain, acts.table)],
                         struct.pack("<4I", min(n_known, self.nv), self.backend.ahead, n, self.nv), (n, 1, 1))
            rec.barrier()  # its tokens, counts and row table, for the next step
            rec.barrier(to_host=True)
            rec.mark("argmax")
            rec.end()
        except BaseException:
            free_pass(acts, recs)
            raise
        return acts, recs, chain

    def gpu_seconds(self):
        """GPU time of the last pass where it was a decode step (its timestamps), else None; read only when asked
        (scripts/bench_vulkan.py): reading the query results at every step took 90 us a token on lavapipe."""
        if not self._timed:
            return None
        times = [rec.gpu_seconds() for rec in self._timed]
        return None if None in times else sum(times)

    def _pass_acts(self, n, scored):
        """The activations of a pass that is not a kept decode step (a prompt): for up to KEPT_PASS_ROWS rows one
        set, kept and grown to the largest such pass so far (allocating and zeroing them for each prompt cost 4 ms
        of a 30 ms 128-token prompt on an H200), its rows past n not read; a larger pass gets its own (the caller
        frees it: `_pass` is not it)."""
        if n > KEPT_PASS_ROWS:
            return Activations(self, n, scored)
        a = self._pass
        if a is None or a.rows < n or a.scored < scored:
            rows, most = (n, scored) if a is None else (max(n, a.rows), max(scored, a.scored))
            if a is not None:
                a.free()
            a = self._pass = Activations(self, rows, most)
        return a.use(n)

    def _check(self, x, segments):
        """`check_pass`, and what the attention kernel needs besides: no empty segment, a slot once a pass (it
        would read keys of the slot that it is writing)."""
        seen = set()
        for seg in segments:
            if seg.n < 1:
                raise ValueError(f"vulkan backend: {seg} holds no tokens")
            if seg.slot in seen:
                raise ValueError(f"vulkan backend: slot {seg.slot} twice in one pass")
            seen.add(seg.slot)
        check_pass(x, segments, self._open)

    def _put_input(self, acts, x):
        """x (n, dim) into the device's residual stream (through io)."""
        acts.io.array(np.float32, (acts.n, self.dp))[:, :self.cfg.dim] = x

    def _put_rows(self, acts, segments):
        """The attention kernel's row table (n, 4): each row's position, its segment's first position and first
        row in the pass, and its slot's first row in the cache."""
        acts.table.array(np.uint32, (acts.n, 4))[:] = [
            (seg.pos + i, seg.pos, first, seg.slot * self.slot_rows)
            for first, seg in segment_rows(segments) for i in range(seg.n)]

    def _allreduce(self, allreduce, delta):
        """delta (n, dp) mapped memory; the sum runs over (n, dim) as the numpy model's does."""
        if self.dp == self.cfg.dim:
            allreduce(delta)
        else:
            part = np.ascontiguousarray(delta[:, :self.cfg.dim])
            delta[:, :self.cfg.dim] = allreduce(part)

    # ---- the KV cache, for moving heads and layers between ranks ----------------------------------------------
    def _head_offset(self, slot, at):
        """Byte offset of position 0 of the rank's `at`-th KV head of `slot` in a layer's cache buffer."""
        return (slot * self.slot_rows + at * self.max_seq) * self.cfg.head_dim * self.kv_dtype.itemsize

    def cache_take(self, slot, T) -> dict:
        """{(layer, kv head): (k, v) each (T, hd) of the cache's dtype}: copies of positions 0..T-1 of every head
        held."""
        check_slot(self._open, slot, T)
        out = {}
        for li, layer in enumerate(self.share.layer_ids):
            for at, j in enumerate(self.share.kv):
                out[layer, j] = tuple(self._read_head(c[li], slot, at, T) for c in (self.kcache, self.vcache))
        return out

    def _read_head(self, cache, slot, at, T):
        """(T, hd) of the cache's dtype: positions 0..T-1 of the rank's `at`-th KV head of `slot` in one layer's
        cache."""
        hd, dtype = self.cfg.head_dim, self.kv_dtype
        if T == 0:
            return np.zeros((0, hd), dtype)
        return self.dev.read(cache, self._head_offset(slot, at), T * hd * dtype.itemsize).view(dtype).reshape(T, hd)

    def cache_put(self, slot, pieces):
        """Write what `cache_take` gives back into positions 0..T-1 (the layers and heads this rank holds)."""
        layers, kv = self.share.layer_ids, self.share.kv
        for (layer, j), (k, v) in pieces.items():
            if layer not in layers or j not in kv:
                continue
            check_slot(self._open, slot, k.shape[0])
            li, at = layer - layers.start, kv.index(j)
            for caches, src in ((self.kcache, k), (self.vcache, v)):
                caches[li].write(np.ascontiguousarray(src, self.kv_dtype), offset=self._head_offset(slot, at))

    def close(self):
        """Free the device memory of this model and of its weights (called when a model is replaced); a weight
        window stops its loader first."""
        if self.w.window is not None:
            self.w.window.close()
        for acts, recs, *_ in [*self._decode.values(), *self._chains.values()]:
            free_pass(acts, recs)
        self._decode, self._chains = {}, {}
        if self.embedding is not None and self.embedding is not self.w.output:
            self.embedding.free()
        self.embedding = None
        if self._pass is not None:
            self._pass.free()
            self._pass = None
        for b in self._own:
            b.free()
        self._own = []
        for lin in self.w.linears():
            lin.free()

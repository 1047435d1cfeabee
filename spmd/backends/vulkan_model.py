"""The transformer on one rank's shards, on a Vulkan device: `spmd.model.Model`'s math as recorded command buffers.

A pass of n tokens through the rank's stage (its layers, `stage_schedule`; x: the residual stream, on the device
throughout), per layer, with a barrier after each line:
    xn        = RMSNorm(x) * attn_norm                                  rmsnorm_f32
    q, k, v   = xn @ wq/wk/wv.T (+ biases)                              3 dispatches, no barrier between them
    att       = attention(rope(q), rope(k) -> cache, v -> cache)        1 dispatch (rope and cache store fused)
    x        += att @ wo.T                                              the partial sum: allreduced with the stage
    xn        = RMSNorm(x) * ffn_norm
    h         = silu(xn @ w1.T) * (xn @ w3.T)                           1 dispatch: gate and up rows side by side
    x        += h @ w2.T                                                the partial sum: allreduced with the stage
x comes in from the host (the embeddings, or the previous stage's hidden state) through `io`; at the end either
logits = (RMSNorm(x[-1]) * output_norm) @ output.T (the head) or x goes back to the host through `io`.

A one-rank stage's decode fuses RMSNorm away: each product that adds into x (wo, w2) also writes xg = x * (the next
norm's weight) and one partial sum of x^2 per workgroup; the products that read xg add the partial sums up and
scale their result by rsqrt(mean + eps). That leaves 5 barriers a layer (the host writes the first layer's xg with
the input); the stage's last w2 writes xg only for the head.

With one rank in the stage (allreduce None) the whole pass is one command buffer, one submit per token. With
several, each half-layer ends by writing its partial sum to host memory (`delta`); the host allreduces it in place
and the next command buffer starts with x += delta. Decode's command buffers are recorded once per model and
(multi-rank, head) combination: the position is read by the kernels from a small host-written buffer; a prompt of
n tokens records a one-off set.
"""
import struct

import numpy as np

from ..errors import UserError
from ..model import Rope, stage_schedule
from .vk_runtime import Buffer, Recording
from .vulkan import pad

ATTENTION_PUSH = "<8If"  # group, qkv_stride, k_off, v_off, o_stride, max_seq, rope_dim, neox, scale
NORM_PUSH = "<4If"  # dim, x_stride, x_off, y_stride, eps


class Activations:
    """The device buffers of one pass of n tokens (rows padded to 32 floats, zero-filled)."""

    def __init__(self, m, n, fused=False):
        """fused: one-rank decode, where each product that updates x also writes the next RMSNorm's input and its
        partial sums of squares (xg, ss), so RMSNorm needs no pass of its own (the host does the first layer's)."""
        dev = m.dev
        self.n, self.fused = n, fused
        self.x = Buffer(dev, n * m.dp * 4)  # (n, dp) residual stream
        # (n, dp) the host's window on x: the input written in, the hidden state read out (x itself where mappable)
        self.io = self.x if self.x.view is not None else Buffer(dev, n * m.dp * 4, "host")
        self.xn = Buffer(dev, n * m.dp * 4)  # (n, dp) RMSNorm(x) * weight
        self.qkv = Buffer(dev, n * m.qkv_stride * 4)  # (n, [q | k | v])
        self.att = Buffer(dev, n * m.att_stride * 4)  # (n, heads * head_dim) attention output
        self.h = Buffer(dev, n * m.ffn_stride * 4)  # (n, n_ffn) silu(gate) * up
        self.delta = Buffer(dev, n * m.dp * 4, "host")  # (n, dp) a partial sum, allreduced by the host
        self.buffers = [self.x, self.xn, self.qkv, self.att, self.h, self.delta]
        if fused:
            self.ss_count = -(-m.cfg.dim // 4)  # workgroups of the matvec that writes x (4 rows each)
            self.xg = Buffer(dev, n * m.dp * 4)  # (n, dp) x * the next RMSNorm's weight
            self.ss = Buffer(dev, self.ss_count * 4)  # partial sums of x^2
            self.buffers += [self.xg, self.ss]
        if self.io is not self.x:
            self.buffers.append(self.io)
        dev.zero(self.buffers)

    def free(self):
        for b in self.buffers:
            b.free()


class VulkanModel:
    def __init__(self, backend, cfg, weights, share, max_seq, slots=1):
        if slots != 1:
            raise ValueError("vulkan backend: one sequence slot only")
        self.backend, self.dev = backend, backend.dev
        self.cfg, self.w, self.share, self.max_seq = cfg, weights, share, max_seq
        hd, layers = cfg.head_dim, share.layer_ids
        self.nh, self.nkv, self.nf, self.nv = share.n_heads, share.n_kv, share.n_ffn, share.n_vocab
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
        self.bias = None
        if cfg.qkv_bias and self.qkv_width:
            self.bias = self._const(np.stack([np.concatenate([weights.layer(i).bq, weights.layer(i).bk,
                                                              weights.layer(i).bv]) for i in layers]))
        rope = Rope(cfg, max_seq, weights.rope_factors)
        self.rope = self._const(np.concatenate([rope.cos.reshape(-1), rope.sin.reshape(-1)]))
        layer_cache = self.nkv * max_seq * hd * 4  # (kv, max_seq, hd) float32 per layer of the stage
        self.kcache = [self._buffer(layer_cache) for _ in layers]
        self.vcache = [self._buffer(layer_cache) for _ in layers]
        # uint pos, written before each submit: in device memory where the host can map it (read by every
        # attention workgroup: a read over PCIe from host memory cost ~2 us each on an H200)
        self.params = self._buffer(16, "device" if self.dev.direct else "host")
        self.pos = self.params.array(np.uint32, (4,))
        self.logits = self._buffer(max(self.nv, 1) * 4, "host")
        self.dev.zero(self.kcache + self.vcache)
        self._decode = {}  # (multi-rank, head) -> (Activations, [Recording])
        self.gpu_s = None  # GPU time of the last pass (timestamps), where the device has them
        if hd % 4:
            raise UserError(f"vulkan backend: head size {hd} is not a multiple of 4; use --backend cpu")
        wg = backend.attention_wg
        ks = max(1, wg // (hd // 4))  # threads sum the values 4 dims at a time, keys split ks ways
        self._attention = self.dev.pipeline("attention_f32", 6, struct.calcsize(ATTENTION_PUSH),
                                            (wg, hd, ks, -(-(hd // 4) * ks // wg)))
        self.profile = False  # bench: timestamps after every step of the decode command buffers
        self._add = self.dev.pipeline("add_f32", 2, 4)
        self._rmsnorm = self.dev.pipeline("rmsnorm_f32", 3, struct.calcsize(NORM_PUSH), (backend.norm_wg,))

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
    def _record(self, a, multi, head, timestamps=False):
        """The command buffers of one pass over a's n tokens: one, or one per half-layer plus the end."""
        profile = timestamps and self.profile
        recs = [Recording(self.dev, timestamps, profile)]
        if a.io is not a.x:
            self.dev.copy(recs[0], a.io, a.x, a.x.nbytes)
            recs[0].barrier()
        halves = {"attention": self._attention_half, "ffn": self._ffn_half}
        for layer, half in stage_schedule(self.share.layer_ids):
            halves[half](recs[-1], layer, a, multi)
            if multi:
                recs[-1].barrier(to_host=True)
                recs[-1].end()
                recs.append(Recording(self.dev, timestamps, profile))
                recs[-1].dispatch(self._add, [(a.x, 0, a.x.nbytes), (a.delta, 0, a.delta.nbytes)],
                                  struct.pack("<I", a.n * self.dp), (-(-a.n * self.dp // 256), 1, 1))
                recs[-1].barrier()
                recs[-1].mark("add")
        if head:
            self._classifier(recs[-1], a)
        elif a.io is not a.x:  # the hidden state back to the host
            recs[-1].barrier(to_copy=True)
            self.dev.copy(recs[-1], a.x, a.io, a.x.nbytes)
        recs[-1].barrier(to_host=True)
        recs[-1].mark("classifier" if head else "hidden state out")
        recs[-1].end()
        return recs

    def _classifier(self, rec, a):
        """logits = (RMSNorm(x[-1]) * output_norm) @ output.T, where this rank holds classifier rows."""
        if self.nv and a.fused:
            self.w.output.dispatch(rec, a.xg, self.dp, 0, self.logits, self.nv, 0, 1, norm=self._fused_norm(a))
        elif self.nv:  # the last token only
            self._norm_step(rec, a, self.n_norms - 1, 1, (a.n - 1) * self.dp)
            self.w.output.dispatch(rec, a.xn, self.dp, 0, self.logits, self.nv, 0, 1)

    def _fused_norm(self, a):
        return (a.ss, a.ss_count, self.cfg.norm_eps, self.cfg.dim) if a.fused else None

    def _produce(self, a, row):
        """The binding for a product that updates x to also write RMSNorm `row`'s input (fused decode; none after
        the stage's last layer where the rank holds no output norm)."""
        return (a.ss, self._norm(row), a.xg) if a.fused and row < self.n_norms else None

    def _norm_step(self, rec, a, row, n, x_off=0):
        """a.xn[:n] = RMSNorm(a.x rows from x_off) * norm weight `row`, then a barrier."""
        push = struct.pack(NORM_PUSH, self.cfg.dim, self.dp, x_off, self.dp, self.cfg.norm_eps)
        rec.dispatch(self._rmsnorm, [(a.x, 0, a.x.nbytes), self._norm(row), (a.xn, 0, a.xn.nbytes)], push,
                     (n, 1, 1))
        rec.barrier()
        rec.mark("rmsnorm")

    def _attention_half(self, rec, layer, a, multi):
        cfg, lw, n, hd = self.cfg, self.w.layer(layer), a.n, self.cfg.head_dim
        li = layer - self.share.layers[0]
        if self.nh:
            if not a.fused:
                self._norm_step(rec, a, self._row(layer, 0), n)
            for lin, off in ((lw.wq, 0), (lw.wk, self.nh * hd), (lw.wv, (self.nh + self.nkv) * hd)):
                lin.dispatch(rec, a.xg if a.fused else a.xn, self.dp, 0, a.qkv, self.qkv_stride, off, n,
                             bias=self.bias, bias_off=li * self.qkv_width + off, norm=self._fused_norm(a))
            rec.barrier()
            rec.mark("q k v")
            push = struct.pack(ATTENTION_PUSH, cfg.group, self.qkv_stride, self.nh * hd, (self.nh + self.nkv) * hd,
                               self.att_stride, self.max_seq, cfg.rope_dim, int(cfg.rope_neox),
                               float(1.0 / np.sqrt(hd)))
            bufs = [self.params, a.qkv, self.rope, self.kcache[li], self.vcache[li], a.att]
            rec.dispatch(self._attention, [(b, 0, b.nbytes) for b in bufs], push, (self.nh, n, 1))
            rec.barrier()
            rec.mark("attention")
        if multi:  # the partial sum (zeros when this rank holds no heads)
            lw.wo.dispatch(rec, a.att, self.att_stride, 0, a.delta, self.dp, 0, n)
        elif self.nh:
            lw.wo.dispatch(rec, a.att, self.att_stride, 0, a.x, self.dp, 0, n, accum=True,
                           produce=self._produce(a, self._row(layer, 1)))
            rec.barrier()
            rec.mark("wo")

    def _ffn_half(self, rec, layer, a, multi):
        lw, n = self.w.layer(layer), a.n
        if self.nf:
            if not a.fused:
                self._norm_step(rec, a, self._row(layer, 1), n)
            lw.w1.dispatch(rec, a.xg if a.fused else a.xn, self.dp, 0, a.h, self.ffn_stride, 0, n, pair=lw.w3,
                           norm=self._fused_norm(a))  # silu(gate) * up
            rec.barrier()
            rec.mark("gate up")
        if multi:
            lw.w2.dispatch(rec, a.h, self.ffn_stride, 0, a.delta, self.dp, 0, n)
        elif self.nf:
            lw.w2.dispatch(rec, a.h, self.ffn_stride, 0, a.x, self.dp, 0, n, accum=True,
                           produce=self._produce(a, self._row(layer, 2)))
            rec.barrier()
            rec.mark("down")

    # ---- running ----------------------------------------------------------------------------------------------
    def embed(self, tokens):
        """(n,) token ids -> (n, dim) float32: the first stage's input."""
        return self.w.embed(tokens)

    def forward(self, x, pos, allreduce, head, slot=0):
        """x (n, dim) float32, the hidden state entering this stage at positions pos..pos+n-1 -> with `head`,
        this rank's logits slice (n_vocab_local,) of the last token; else (n, dim) float32 after the stage's layers.
        allreduce: sums a float32 array over the stage's ranks in place, or None when the stage has one rank."""
        n, multi = x.shape[0], allreduce is not None
        if slot != 0:
            raise ValueError(f"vulkan backend: sequence slot {slot}: only slot 0 exists")
        if pos + n > self.max_seq:
            raise ValueError(f"positions {pos}..{pos + n - 1} pass the cache of {self.max_seq}")
        if n == 1:
            if (multi, head) not in self._decode:
                acts = Activations(self, 1, fused=not multi and self.dev.direct)
                self._decode[multi, head] = (acts, self._record(acts, multi, head, timestamps=True))
            acts, recs = self._decode[multi, head]
        else:
            acts = Activations(self, n)
            recs = self._record(acts, multi, head)
        try:
            self._put_input(acts, x)
            self.pos[0] = pos
            delta = acts.delta.array(np.float32, (n, self.dp))
            for i, rec in enumerate(recs):
                rec.run()
                if i < len(recs) - 1:
                    self._allreduce(allreduce, delta)
            times = [rec.gpu_seconds() for rec in recs]
            self.gpu_s = sum(times) if None not in times else None
            if self.profile and n == 1:
                self.last_profile = [item for rec in recs for item in rec.profile()]
            if head:
                return self.logits.array(np.float32, (self.nv,)).copy()
            return acts.io.array(np.float32, (n, self.dp))[:, :self.cfg.dim].copy()
        finally:
            if n > 1:
                for rec in recs:
                    rec.free()
                acts.free()

    def _put_input(self, acts, x):
        """x (n, dim) into the device's residual stream (through io); fused decode: also the first layer's xg."""
        acts.io.array(np.float32, (acts.n, self.dp))[:, :self.cfg.dim] = x
        if acts.fused:  # the first layer's RMSNorm input, as the products write it for the layers after
            first = self.w.layer(self.share.layers[0])
            acts.xg.array(np.float32, (self.dp,))[:self.cfg.dim] = x[0] * first.attn_norm
            ss = acts.ss.array(np.float32, (acts.ss_count,))
            ss[:] = 0.0
            ss[0] = np.dot(x[0].astype(np.float64), x[0])

    def _allreduce(self, allreduce, delta):
        """delta (n, dp) mapped memory; the sum runs over (n, dim) as the numpy model's does."""
        if self.dp == self.cfg.dim:
            allreduce(delta)
        else:
            part = np.ascontiguousarray(delta[:, :self.cfg.dim])
            delta[:, :self.cfg.dim] = allreduce(part)

    # ---- the KV cache, for moving heads and layers between ranks ----------------------------------------------
    def cache_take(self, slot, T) -> dict:
        """{(layer, kv head): (k, v) each float32 (T, hd)}: copies of positions 0..T-1 of every head held."""
        out = {}
        if slot != 0 or T > self.max_seq:
            raise ValueError(f"vulkan backend: slot {slot}, {T} positions: only slot 0, {self.max_seq} positions")
        for li, layer in enumerate(self.share.layer_ids):
            for at, j in enumerate(self.share.kv):
                out[layer, j] = tuple(self._read_head(c[li], at, T) for c in (self.kcache, self.vcache))
        return out

    def _read_head(self, cache, at, T):
        """(T, hd) float32: positions 0..T-1 of the rank's `at`-th KV head in one layer's cache."""
        hd = self.cfg.head_dim
        if T == 0:
            return np.zeros((0, hd), np.float32)
        return self.dev.read(cache, at * self.max_seq * hd * 4, T * hd * 4).view(np.float32).reshape(T, hd)

    def cache_put(self, slot, pieces):
        """Write what `cache_take` gives back into positions 0..T-1 (the layers and heads this rank holds)."""
        hd, layers, kv = self.cfg.head_dim, self.share.layer_ids, self.share.kv
        for (layer, j), (k, v) in pieces.items():
            if layer not in layers or j not in kv:
                continue
            if slot != 0 or k.shape[0] > self.max_seq:
                raise ValueError(f"vulkan backend: slot {slot}, {k.shape[0]} positions: only slot 0, "
                                 f"{self.max_seq} positions")
            li, at = layer - layers.start, kv.index(j)
            for caches, src in ((self.kcache, k), (self.vcache, v)):
                caches[li].write(np.ascontiguousarray(src, np.float32), offset=at * self.max_seq * hd * 4)

    def close(self):
        """Free the device memory of this model and of its weights (called when a model is replaced)."""
        for acts, recs in self._decode.values():
            for rec in recs:
                rec.free()
            acts.free()
        self._decode = {}
        for b in self._own:
            b.free()
        self._own = []
        for lin in self.w.linears():
            lin.free()

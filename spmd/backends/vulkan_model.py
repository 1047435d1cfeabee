"""The transformer on one rank's shards, on a Vulkan device: `spmd.model.Model`'s math as recorded command buffers.

One pass of n tokens is, per layer (x: the residual stream, on the device throughout), with a barrier after each
line:
    xn        = RMSNorm(x) * attn_norm                                  rmsnorm_f32
    q, k, v   = xn @ wq/wk/wv.T (+ biases)                              3 dispatches, no barrier between them
    att       = attention(rope(q), rope(k) -> cache, v -> cache)        1 dispatch (rope and cache store fused)
    x        += att @ wo.T                                              the partial sum: allreduced with ranks
    xn        = RMSNorm(x) * ffn_norm
    h         = silu(xn @ w1.T) * (xn @ w3.T)                           1 dispatch: gate and up rows side by side
    x        += h @ w2.T                                                the partial sum: allreduced with ranks
and at the end logits = (RMSNorm(x[-1]) * output_norm) @ output.T.

One-rank decode fuses RMSNorm away: each product that adds into x (wo, w2) also writes xg = x * (the next norm's
weight) and one partial sum of x^2 per workgroup; the products that read xg add the partial sums up and scale their
result by rsqrt(mean + eps). That leaves 5 barriers a layer (the host writes layer 0's xg with the embedding).

With one rank (allreduce None) the whole pass is one command buffer, one submit per token. With several, each
half-layer ends by writing its partial sum to host memory (`delta`); the host allreduces it in place and the next
command buffer starts with x += delta. Decode's command buffers are recorded once per model: the position is read
by the kernels from a small host-written buffer; a prompt of n tokens records a one-off set.
"""
import struct

import numpy as np

from ..errors import UserError
from ..model import Rope
from .vk_runtime import Buffer, Recording
from .vulkan import pad

ATTENTION_PUSH = "<8If"  # group, qkv_stride, k_off, v_off, o_stride, max_seq, rope_dim, neox, scale
NORM_PUSH = "<4If"  # dim, x_stride, x_off, y_stride, eps


class Activations:
    """The device buffers of one pass of n tokens (rows padded to 32 floats, zero-filled)."""

    def __init__(self, m, n, fused=False):
        """fused: one-rank decode, where each product that updates x also writes the next RMSNorm's input and its
        partial sums of squares (xg, ss), so RMSNorm needs no pass of its own (the host does layer 0's)."""
        dev = m.dev
        self.n, self.fused = n, fused
        self.x = Buffer(dev, n * m.dp * 4)  # (n, dp) residual stream
        self.emb = self.x if self.x.view is not None else Buffer(dev, n * m.dp * 4, "host")  # embeddings in
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
        if self.emb is not self.x:
            self.buffers.append(self.emb)
        dev.zero(self.buffers)

    def free(self):
        for b in self.buffers:
            b.free()


class VulkanModel:
    def __init__(self, backend, cfg, weights, share, max_seq):
        self.backend, self.dev = backend, backend.dev
        self.cfg, self.w, self.share, self.max_seq = cfg, weights, share, max_seq
        hd = cfg.head_dim
        self.nh, self.nkv, self.nf, self.nv = share.n_heads, share.n_kv, share.n_ffn, share.n_vocab
        self.dp = pad(cfg.dim)
        self.qkv_width = (self.nh + 2 * self.nkv) * hd
        self.qkv_stride, self.att_stride, self.ffn_stride = pad(self.qkv_width), pad(self.nh * hd), pad(self.nf)
        self._own = []  # every buffer this model allocated
        self.norm_stride = pad(cfg.dim, 64)  # 256-byte rows: any storage-buffer offset alignment
        norms = np.zeros((2 * cfg.n_layers + 1, self.norm_stride), np.float32)
        for i, lw in enumerate(weights.layers):
            norms[2 * i, :cfg.dim], norms[2 * i + 1, :cfg.dim] = lw.attn_norm, lw.ffn_norm
        norms[-1, :cfg.dim] = weights.output_norm
        self.norms = self._const(norms)
        self.bias = None
        if cfg.qkv_bias and self.qkv_width:
            self.bias = self._const(np.stack([np.concatenate([lw.bq, lw.bk, lw.bv]) for lw in weights.layers]))
        rope = Rope(cfg, max_seq, weights.rope_factors)
        self.rope = self._const(np.concatenate([rope.cos.reshape(-1), rope.sin.reshape(-1)]))
        layer_cache = self.nkv * max_seq * hd * 4  # (kv, max_seq, hd) float32 per layer
        self.kcache = [self._buffer(layer_cache) for _ in range(cfg.n_layers)]
        self.vcache = [self._buffer(layer_cache) for _ in range(cfg.n_layers)]
        # uint pos, written before each submit: in device memory where the host can map it (read by every
        # attention workgroup: a read over PCIe from host memory cost ~2 us each on an H200)
        self.params = self._buffer(16, "device" if self.dev.direct else "host")
        self.pos = self.params.array(np.uint32, (4,))
        self.logits = self._buffer(max(self.nv, 1) * 4, "host")
        self.dev.zero(self.kcache + self.vcache)
        self._decode = {}  # multi-rank or not -> (Activations, [Recording])
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

    # ---- recording --------------------------------------------------------------------------------------------
    def _record(self, a, multi, timestamps=False):
        """The command buffers of one pass over a's n tokens: one, or one per half-layer plus the classifier."""
        profile = timestamps and self.profile
        recs = [Recording(self.dev, timestamps, profile)]
        if a.emb is not a.x:
            self.dev.copy(recs[0], a.emb, a.x, a.x.nbytes)
            recs[0].barrier()
        for layer in range(self.cfg.n_layers):
            for half in (self._attention_half, self._ffn_half):
                half(recs[-1], layer, a, multi)
                if multi:
                    recs[-1].barrier(to_host=True)
                    recs[-1].end()
                    recs.append(Recording(self.dev, timestamps, profile))
                    recs[-1].dispatch(self._add, [(a.x, 0, a.x.nbytes), (a.delta, 0, a.delta.nbytes)],
                                      struct.pack("<I", a.n * self.dp), (-(-a.n * self.dp // 256), 1, 1))
                    recs[-1].barrier()
                    recs[-1].mark("add")
        if self.nv and a.fused:
            self.w.output.dispatch(recs[-1], a.xg, self.dp, 0, self.logits, self.nv, 0, 1, norm=self._fused_norm(a))
        elif self.nv:  # the last token only
            self._norm_step(recs[-1], a, 2 * self.cfg.n_layers, 1, (a.n - 1) * self.dp)
            self.w.output.dispatch(recs[-1], a.xn, self.dp, 0, self.logits, self.nv, 0, 1)
        recs[-1].barrier(to_host=True)
        recs[-1].mark("classifier")
        recs[-1].end()
        return recs

    def _fused_norm(self, a):
        return (a.ss, a.ss_count, self.cfg.norm_eps, self.cfg.dim) if a.fused else None

    def _produce(self, a, row):
        """The binding for a product that updates x to also write RMSNorm `row`'s input (fused decode)."""
        return (a.ss, self._norm(row), a.xg) if a.fused else None

    def _norm_step(self, rec, a, row, n, x_off=0):
        """a.xn[:n] = RMSNorm(a.x rows from x_off) * norm weight `row`, then a barrier."""
        push = struct.pack(NORM_PUSH, self.cfg.dim, self.dp, x_off, self.dp, self.cfg.norm_eps)
        rec.dispatch(self._rmsnorm, [(a.x, 0, a.x.nbytes), self._norm(row), (a.xn, 0, a.xn.nbytes)], push,
                     (n, 1, 1))
        rec.barrier()
        rec.mark("rmsnorm")

    def _attention_half(self, rec, layer, a, multi):
        cfg, lw, n, hd = self.cfg, self.w.layers[layer], a.n, self.cfg.head_dim
        if self.nh:
            if not a.fused:
                self._norm_step(rec, a, 2 * layer, n)
            for lin, off in ((lw.wq, 0), (lw.wk, self.nh * hd), (lw.wv, (self.nh + self.nkv) * hd)):
                lin.dispatch(rec, a.xg if a.fused else a.xn, self.dp, 0, a.qkv, self.qkv_stride, off, n,
                             bias=self.bias, bias_off=layer * self.qkv_width + off, norm=self._fused_norm(a))
            rec.barrier()
            rec.mark("q k v")
            push = struct.pack(ATTENTION_PUSH, cfg.group, self.qkv_stride, self.nh * hd, (self.nh + self.nkv) * hd,
                               self.att_stride, self.max_seq, cfg.rope_dim, int(cfg.rope_neox),
                               float(1.0 / np.sqrt(hd)))
            bufs = [self.params, a.qkv, self.rope, self.kcache[layer], self.vcache[layer], a.att]
            rec.dispatch(self._attention, [(b, 0, b.nbytes) for b in bufs], push, (self.nh, n, 1))
            rec.barrier()
            rec.mark("attention")
        if multi:  # the partial sum (zeros when this rank holds no heads)
            lw.wo.dispatch(rec, a.att, self.att_stride, 0, a.delta, self.dp, 0, n)
        elif self.nh:
            lw.wo.dispatch(rec, a.att, self.att_stride, 0, a.x, self.dp, 0, n, accum=True,
                           produce=self._produce(a, 2 * layer + 1))
            rec.barrier()
            rec.mark("wo")

    def _ffn_half(self, rec, layer, a, multi):
        lw, n = self.w.layers[layer], a.n
        if self.nf:
            if not a.fused:
                self._norm_step(rec, a, 2 * layer + 1, n)
            lw.w1.dispatch(rec, a.xg if a.fused else a.xn, self.dp, 0, a.h, self.ffn_stride, 0, n, pair=lw.w3,
                           norm=self._fused_norm(a))  # silu(gate) * up
            rec.barrier()
            rec.mark("gate up")
        if multi:
            lw.w2.dispatch(rec, a.h, self.ffn_stride, 0, a.delta, self.dp, 0, n)
        elif self.nf:
            lw.w2.dispatch(rec, a.h, self.ffn_stride, 0, a.x, self.dp, 0, n, accum=True,
                           produce=self._produce(a, 2 * layer + 2))
            rec.barrier()
            rec.mark("down")

    # ---- running ----------------------------------------------------------------------------------------------
    def forward(self, tokens, pos, allreduce):
        """tokens (n,) at positions pos..pos+n-1 -> this rank's logits (n_vocab_local,) for the last token.
        allreduce: sums a float32 array over the ranks in place, or None when the job has one rank."""
        n, multi = len(tokens), allreduce is not None
        if pos + n > self.max_seq:
            raise ValueError(f"positions {pos}..{pos + n - 1} pass the cache of {self.max_seq}")
        if n == 1:
            if multi not in self._decode:
                acts = Activations(self, 1, fused=not multi and self.dev.direct)
                self._decode[multi] = (acts, self._record(acts, multi, timestamps=True))
            acts, recs = self._decode[multi]
        else:
            acts = Activations(self, n)
            recs = self._record(acts, multi)
        try:
            emb = acts.emb.array(np.float32, (n, self.dp))
            emb[:, :self.cfg.dim] = x = self.w.embed(tokens)
            if acts.fused:  # layer 0's RMSNorm input, as the products write it for the layers after
                acts.xg.array(np.float32, (self.dp,))[:self.cfg.dim] = x[0] * self.w.layers[0].attn_norm
                ss = acts.ss.array(np.float32, (acts.ss_count,))
                ss[:] = 0.0
                ss[0] = np.dot(x[0].astype(np.float64), x[0])
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
            return self.logits.array(np.float32, (self.nv,)).copy()
        finally:
            if n > 1:
                for rec in recs:
                    rec.free()
                acts.free()

    def _allreduce(self, allreduce, delta):
        """delta (n, dp) mapped memory; the sum runs over (n, dim) as the numpy model's does."""
        if self.dp == self.cfg.dim:
            allreduce(delta)
        else:
            part = np.ascontiguousarray(delta[:, :self.cfg.dim])
            delta[:, :self.cfg.dim] = allreduce(part)

    # ---- the KV cache, for moving heads between ranks ---------------------------------------------------------
    def read_cache(self, T):
        """-> (k, v), each float32 (n_layers, n_kv_local, T, head_dim): positions 0..T-1."""
        shape = (self.nkv, self.max_seq, self.cfg.head_dim)
        out = []
        for caches in (self.kcache, self.vcache):
            layers = [self.dev.read(c, 0, c.nbytes).view(np.float32)[:int(np.prod(shape))].reshape(shape)[:, :T]
                      for c in caches]
            out.append(np.ascontiguousarray(np.stack(layers)) if layers else
                       np.zeros((0, self.nkv, T, self.cfg.head_dim), np.float32))
        return out[0], out[1]

    def write_cache(self, k, v):
        """Fill positions 0..k.shape[2]-1 from arrays shaped as read_cache gives them."""
        hd, T = self.cfg.head_dim, k.shape[2]
        for caches, src in ((self.kcache, k), (self.vcache, v)):
            for layer, c in enumerate(caches):
                for h in range(self.nkv):
                    c.write(np.ascontiguousarray(src[layer, h], np.float32), offset=h * self.max_seq * hd * 4)
        assert T <= self.max_seq

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
        names = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
        for lin in [self.w.output] + [getattr(lw, nm) for lw in self.w.layers for nm in names]:
            lin.free()

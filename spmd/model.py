"""The transformer on one rank's shards: its stage's layers, and the head where it holds classifier rows. Knows
nothing of MPI: the two partial sums per layer go through the `allreduce` callable it is given (the stage's), and
it returns the hidden state for the next stage or this rank's slice of the logits.

Shapes: n = tokens in this pass (the prompt, or 1 when decoding), h = local query heads, kv = local KV heads,
hd = head_dim, T = positions in the cache so far.
"""
import numpy as np


def rmsnorm(x, weight, eps):
    """x (n, dim) -> (n, dim)"""
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * weight


def silu(x):
    return x / (1.0 + np.exp(-x))


HALVES = ("attention", "ffn")


def stage_schedule(layers):
    """The order of a stage's work, the same for every backend: [(layer, half)], each half ending in a partial sum
    that is allreduced across the stage's ranks and added to the residual stream."""
    return [(layer, half) for layer in layers for half in HALVES]


class Rope:
    """Rotary position embedding tables for every position, built once."""

    def __init__(self, cfg, max_seq, factors=None):
        inv = cfg.rope_inv_freq(factors)  # (rope_dim/2,)
        angles = np.outer(np.arange(max_seq) / cfg.rope_linear_factor, inv)  # (max_seq, rope_dim/2)
        self.cos = np.cos(angles).astype(np.float32)
        self.sin = np.sin(angles).astype(np.float32)
        self.dim, self.neox = cfg.rope_dim, cfg.rope_neox

    def __call__(self, x, pos):
        """x (n, heads, hd), rotated in place for positions pos..pos+n-1."""
        n = x.shape[0]
        cos, sin = self.cos[pos:pos + n, None, :], self.sin[pos:pos + n, None, :]  # (n, 1, rope_dim/2)
        if self.neox:  # pairs (i, i + rope_dim/2)
            a, b = x[..., :self.dim // 2], x[..., self.dim // 2:self.dim]
        else:  # interleaved pairs (2i, 2i+1)
            a, b = x[..., 0:self.dim:2], x[..., 1:self.dim:2]
        a2 = a * cos - b * sin
        b[...] = a * sin + b * cos
        a[...] = a2


class KVCache:
    """Keys and values of this rank's KV heads in its layers, one cache per sequence slot."""

    def __init__(self, layers: range, kv: tuple, slots: int, max_seq: int, head_dim: int):
        self.layers, self.kv = layers, tuple(kv)  # absolute layer indices; global KV-head indices, in local order
        shape = (slots, len(layers), len(kv), max_seq, head_dim)
        self.k = np.zeros(shape, dtype=np.float32)  # (slots, layers_local, kv_local, max_seq, hd)
        self.v = np.zeros(shape, dtype=np.float32)

    def layer(self, slot, layer):
        """(k, v) of an absolute layer, each (kv_local, max_seq, hd), views to write into."""
        i = layer - self.layers.start
        return self.k[slot, i], self.v[slot, i]

    def take(self, slot, T) -> dict:
        """{(layer, kv head): (k, v) each (T, hd)}: copies of positions 0..T-1 of every head held."""
        return {(layer, j): (self.k[slot, li, at, :T].copy(), self.v[slot, li, at, :T].copy())
                for li, layer in enumerate(self.layers) for at, j in enumerate(self.kv)}

    def put(self, slot, pieces: dict):
        """Write what `take` gives (for heads and layers this cache holds) back into positions 0..T-1."""
        for (layer, j), (k, v) in pieces.items():
            li, at = layer - self.layers.start, self.kv.index(j)
            self.k[slot, li, at, :k.shape[0]] = k
            self.v[slot, li, at, :v.shape[0]] = v


class Model:
    """One rank's part of the transformer: its stage's layers on its shards, and the head where it holds
    classifier rows. The backends' models (spmd.backends.vulkan_model) keep this interface."""

    def __init__(self, cfg, weights, share, max_seq, slots=1):
        self.cfg, self.w, self.share = cfg, weights, share
        self.max_seq = max_seq
        self.rope = Rope(cfg, max_seq, weights.rope_factors)
        self.cache = KVCache(share.layer_ids, share.kv, slots, max_seq, cfg.head_dim)
        self.scale = np.float32(1.0 / np.sqrt(cfg.head_dim))
        self._decode_buffers = self._buffers(1)  # reused by every decode step

    def _buffers(self, n):
        cfg, s = self.cfg, self.share
        f32 = np.float32
        return dict(
            q=np.empty((n, s.n_heads * cfg.head_dim), f32), k=np.empty((n, s.n_kv * cfg.head_dim), f32),
            v=np.empty((n, s.n_kv * cfg.head_dim), f32), proj=np.empty((n, cfg.dim), f32),
            gate=np.empty((n, s.n_ffn), f32), up=np.empty((n, s.n_ffn), f32),
            logits=np.empty((1, s.n_vocab), f32),
        )

    def embed(self, tokens):
        """(n,) token ids -> (n, dim) float32: the first stage's input."""
        return self.w.embed(tokens)

    def forward(self, x, pos, allreduce, head, slot=0):
        """x (n, dim) float32, the hidden state entering this stage at positions pos..pos+n-1 (updated in place)
        -> with `head`, this rank's logits slice (n_vocab_local,) of the last token; else x after the stage's
        layers. allreduce: sums a float32 array over the stage's ranks in place, None when the stage has one."""
        x = self.layers(x, pos, allreduce, slot)
        return self.head(x) if head else x

    def layers(self, x, pos, allreduce, slot=0):
        """x (n, dim) through this rank's layers, two partial sums a layer (`stage_schedule`)."""
        buf = self._decode_buffers if x.shape[0] == 1 else self._buffers(x.shape[0])
        for layer, half in stage_schedule(self.share.layer_ids):
            lw = self.w.layer(layer)
            if half == "attention":
                partial = self._attention(layer, lw, rmsnorm(x, lw.attn_norm, self.cfg.norm_eps), pos, buf, slot)
            else:
                partial = self._ffn(lw, rmsnorm(x, lw.ffn_norm, self.cfg.norm_eps), buf)
            x += allreduce(partial) if allreduce is not None else partial
        return x

    def head(self, x):
        """x (n, dim) -> this rank's logits slice (n_vocab_local,) of the last token (empty without classifier rows)."""
        if self.w.output is None:
            return np.empty(0, np.float32)
        last = rmsnorm(x[-1:], self.w.output_norm, self.cfg.norm_eps)  # (1, dim)
        return self.w.output(last, out=self._decode_buffers["logits"])[0]

    def cache_take(self, slot, T) -> dict:
        return self.cache.take(slot, T)

    def cache_put(self, slot, pieces):
        self.cache.put(slot, pieces)

    def close(self):
        """Nothing to free: the arrays go with the object (the Vulkan model frees device memory here)."""

    def _attention(self, layer, lw, xn, pos, buf, slot):
        """xn (n, dim) -> (n, dim) this rank's partial sum of the attention output."""
        cfg, n = self.cfg, xn.shape[0]
        hd, n_kv, group = cfg.head_dim, self.share.n_kv, cfg.group
        q, k, v = lw.wq(xn, out=buf["q"]), lw.wk(xn, out=buf["k"]), lw.wv(xn, out=buf["v"])
        if lw.bq is not None:
            q += lw.bq
            k += lw.bk
            v += lw.bv
        q, k, v = q.reshape(n, n_kv * group, hd), k.reshape(n, n_kv, hd), v.reshape(n, n_kv, hd)
        self.rope(q, pos)
        self.rope(k, pos)
        ck, cv = self.cache.layer(slot, layer)  # (kv, max_seq, hd)
        ck[:, pos:pos + n] = k.transpose(1, 0, 2)
        cv[:, pos:pos + n] = v.transpose(1, 0, 2)
        T = pos + n
        # (kv, group*n, hd): each KV head's query heads, all positions
        qg = q.reshape(n, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * n, hd)
        scores = np.matmul(qg, ck[:, :T].transpose(0, 2, 1)) * self.scale  # (kv, group*n, T)
        if n > 1:  # causal: query i (position pos+i) sees keys 0..pos+i
            future = np.arange(T)[None, :] > (pos + np.arange(n))[:, None]  # (n, T)
            scores.reshape(n_kv, group, n, T)[:, :, future] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = np.matmul(scores, cv[:, :T])  # (kv, group*n, hd)
        out = out.reshape(n_kv, group, n, hd).transpose(2, 0, 1, 3).reshape(n, n_kv * group * hd)
        return lw.wo(np.ascontiguousarray(out), out=buf["proj"])

    def _ffn(self, lw, xn, buf):
        """xn (n, dim) -> (n, dim) this rank's partial sum of the SwiGLU FFN output."""
        gate, up = lw.w1(xn, out=buf["gate"]), lw.w3(xn, out=buf["up"])
        return lw.w2(silu(gate) * up, out=buf["proj"])

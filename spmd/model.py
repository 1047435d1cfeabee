"""The transformer on one rank's shards. Knows nothing of MPI: the two partial sums per layer go through the
`allreduce` callable it is given, and it returns this rank's slice of the logits.

Shapes: n = tokens in this pass (the prompt, or 1 when decoding), h = local query heads, kv = local KV heads,
hd = head_dim, T = positions in the cache so far.
"""
import numpy as np


def rmsnorm(x, weight, eps):
    """x (n, dim) -> (n, dim)"""
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * weight


def silu(x):
    return x / (1.0 + np.exp(-x))


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
    """Keys and values of this rank's KV heads only."""

    def __init__(self, n_layers, n_kv, max_seq, head_dim):
        self.k = np.zeros((n_layers, n_kv, max_seq, head_dim), dtype=np.float32)
        self.v = np.zeros((n_layers, n_kv, max_seq, head_dim), dtype=np.float32)


class Model:
    def __init__(self, cfg, weights, share, max_seq):
        self.cfg, self.w, self.share = cfg, weights, share
        self.max_seq = max_seq
        self.rope = Rope(cfg, max_seq, weights.rope_factors)
        self.cache = KVCache(cfg.n_layers, share.n_kv, max_seq, cfg.head_dim)
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

    def forward(self, tokens, pos, allreduce):
        """tokens (n,) at positions pos..pos+n-1 -> this rank's logits (n_vocab_local,) for the last token.
        allreduce: sums a float32 array over the ranks in place and returns it; None when the job has one rank."""
        n = len(tokens)
        if allreduce is None:  # one rank: its partial sums are the sums
            def allreduce(x):
                return x
        buf = self._decode_buffers if n == 1 else self._buffers(n)
        x = self.w.embed(tokens)  # (n, dim) residual stream, identical on every rank
        for layer, lw in enumerate(self.w.layers):
            x += allreduce(self._attention(layer, lw, rmsnorm(x, lw.attn_norm, self.cfg.norm_eps), pos, buf))
            x += allreduce(self._ffn(lw, rmsnorm(x, lw.ffn_norm, self.cfg.norm_eps), buf))
        last = rmsnorm(x[-1:], self.w.output_norm, self.cfg.norm_eps)  # (1, dim)
        return self.w.output(last, out=buf["logits"])[0]

    def read_cache(self, T):
        """-> (k, v), each float32 (n_layers, n_kv_local, T, head_dim): positions 0..T-1 of the local cache."""
        return self.cache.k[:, :, :T].copy(), self.cache.v[:, :, :T].copy()

    def write_cache(self, k, v):
        """Fill positions 0..k.shape[2]-1 from arrays shaped as read_cache gives them."""
        self.cache.k[:, :, :k.shape[2]] = k
        self.cache.v[:, :, :v.shape[2]] = v

    def close(self):
        """Nothing to free: the arrays go with the object (the Vulkan model frees device memory here)."""

    def _attention(self, layer, lw, xn, pos, buf):
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
        ck, cv = self.cache.k[layer], self.cache.v[layer]  # (kv, max_seq, hd)
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

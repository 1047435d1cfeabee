"""The transformer on one rank's shards: its stage's layers, and the head where it holds classifier rows. Knows
nothing of MPI: the two partial sums per layer go through the `allreduce` callable it is given (the stage's), and
it returns the hidden state for the next stage or this rank's slice of the logits.

A pass runs one or more **segments** at once: each is a run of consecutive tokens of one sequence (its slot, the
position of its first token, how many); a prompt is one segment of its n tokens, a batched decode step K segments
of one token each. Their rows are stacked, so every matrix product reads the weights once for all of them;
attention runs per segment, on that sequence's own KV cache.

Shapes: n = rows in this pass (tokens of every segment), h = local query heads, kv = local KV heads,
hd = head_dim, T = positions in a sequence's cache so far.
"""
from typing import NamedTuple

import numpy as np

from .choices import KV_CACHES


def rmsnorm(x, weight, eps):
    """x (n, dim) -> (n, dim)"""
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * weight


def silu_mul(gate, up):
    """silu(gate) * up, in gate's memory: gate / (1 + exp(-gate)) * up, with one temporary. exp overflows to inf for
    a gate below about -88, where silu's value 0 is what gate / inf gives: not worth a warning."""
    e = np.negative(gate)
    with np.errstate(over="ignore"):
        np.exp(e, out=e)
    e += 1.0
    np.divide(gate, e, out=gate)
    gate *= up
    return gate


HALVES = ("attention", "ffn")
PREFILL_TOKENS = 512  # prompt tokens one batch takes beyond its first prompt (which always goes in whole: the driver)
ATTEND_ROWS = 128  # a segment's query rows that attend at once (their scores: heads x ATTEND_ROWS x positions)


class Segment(NamedTuple):
    """Consecutive tokens of one sequence in a pass: its KV-cache slot, the position of its first token, how many."""
    slot: int
    pos: int
    n: int


def segment_rows(segments):
    """[(first row, segment)] of the segments stacked in a pass."""
    out, at = [], 0
    for seg in segments:
        out.append((at, seg))
        at += seg.n
    return out


def check_slot(open_slots, slot, stop):
    """Positions 0..stop-1 of `slot` may be used: the slot is open ({slot: need}) and they are within its need."""
    if slot not in open_slots:
        raise ValueError(f"slot {slot} is not open")
    if stop > open_slots[slot]:
        raise ValueError(f"slot {slot}: position {stop - 1} passes its cache of {open_slots[slot]}")


def check_pass(x, segments, open_slots):
    """A pass's rows (n, dim) are the segments' tokens, each in an open slot and within its need."""
    if x.shape[0] != sum(seg.n for seg in segments):
        raise ValueError(f"{x.shape[0]} rows for segments of {sum(seg.n for seg in segments)} tokens")
    for seg in segments:
        check_slot(open_slots, seg.slot, seg.pos + seg.n)


def last_rows(segments):
    """The row of each segment's last token in a pass: the rows the head turns into logits."""
    return np.cumsum([seg.n for seg in segments]) - 1


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

    def at(self, positions):
        """(cos, sin) of the positions, each (n, 1, rope_dim/2): what a pass's every layer rotates with."""
        return self.cos[positions, None, :], self.sin[positions, None, :]

    def __call__(self, x, tables):
        """x (n, heads, hd), rotated in place: row i for the position of row i of `tables` (from `at`)."""
        cos, sin = tables
        if self.neox:  # pairs (i, i + rope_dim/2)
            a, b = x[..., :self.dim // 2], x[..., self.dim // 2:self.dim]
        else:  # interleaved pairs (2i, 2i+1)
            a, b = x[..., 0:self.dim:2], x[..., 1:self.dim:2]
        a2 = a * cos - b * sin
        b[...] = a * sin + b * cos
        a[...] = a2


KV_DTYPES = dict(zip(KV_CACHES, (np.float32, np.float16)))  # --kv-cache: numpy's type of each


def kv_bytes_per_position(cfg, n_layers=1, n_kv=1, kv_cache="f32") -> int:
    """KV-cache bytes of one position of one sequence in `n_layers` layers of `n_kv` KV heads (keys and values in
    --kv-cache's type, as KVCache holds them)."""
    return 2 * n_layers * n_kv * cfg.head_dim * np.dtype(KV_DTYPES[kv_cache]).itemsize


def pass_bytes(cfg, share, rows, T, widened_cache=False, int8=False) -> int:
    """The most a pass of `rows` rows, attending over up to T positions, holds on `share` beside the weights and
    the KV cache (the budget --memory-limit keeps for it): per row the hidden state, its norm, q, k, v, the
    projection, gate and up (float32), and the attention scores of every local head for ATTEND_ROWS of them with
    their softmax's temporary; widened_cache: and the float32 copy of a layer's keys and values that this model's
    prompt attention makes of a float16 cache (`Model._attend_rows`; `Backend.widens_f16_cache`); int8
    (--activations int8): and a product's input rounded to 8 bits, as the Vulkan model keeps it (rounded floats,
    integers and a scale and sum a block: 5.25 bytes an element of the widest input; the cpu backend's is less)."""
    per_row = 3 * cfg.dim + (share.n_heads + 2 * share.n_kv) * cfg.head_dim + 2 * share.n_ffn
    widened = 2 * share.n_kv * T * cfg.head_dim if widened_cache else 0
    rounded = rows * 21 * max(cfg.dim, share.n_heads * cfg.head_dim, share.n_ffn) // 16 if int8 else 0
    return 4 * (rows * per_row + min(rows, ATTEND_ROWS) * 2 * share.n_heads * T + widened) + rounded


class KVCache:
    """Keys and values of this rank's KV heads in its layers, one cache per open sequence slot, each sized to its
    sequence's need (prompt + steps) when the slot opens and freed when it closes. dtype: float32, or float16
    (--kv-cache f16: a key or value is rounded to float16 as it is stored, and read back as that value exactly)."""

    def __init__(self, layers: range, kv: tuple, head_dim: int, dtype=np.float32):
        self.layers, self.kv, self.hd = layers, tuple(kv), head_dim  # absolute layers; global KV heads, local order
        self.dtype = dtype
        self.k, self.v = {}, {}  # slot -> (layers_local, kv_local, need, hd) of dtype

    def open(self, slot, need):
        shape = (len(self.layers), len(self.kv), need, self.hd)
        self.k[slot], self.v[slot] = np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)

    def free(self, slot):
        self.k.pop(slot, None)
        self.v.pop(slot, None)

    @property
    def slots(self) -> dict:
        """{slot: need} of the open slots."""
        return {slot: k.shape[2] for slot, k in self.k.items()}

    def layer(self, slot, layer):
        """(k, v) of an absolute layer, each (kv_local, need, hd), views to write into."""
        i = layer - self.layers.start
        return self.k[slot][i], self.v[slot][i]

    def store(self, slot, layer, pos, k, v):
        """A segment's k, v (n, kv_local, hd) into positions pos..pos+n-1 of an absolute layer's caches (rounded to
        the cache's type) -> that layer's (k, v) caches, as `layer` gives them."""
        ck, cv = self.layer(slot, layer)
        ck[:, pos:pos + k.shape[0]] = k.transpose(1, 0, 2)
        cv[:, pos:pos + v.shape[0]] = v.transpose(1, 0, 2)
        return ck, cv

    def take(self, slot, T) -> dict:
        """{(layer, kv head): (k, v) each (T, hd) of the cache's dtype}: copies of positions 0..T-1 of every head
        held."""
        k, v = self.k[slot], self.v[slot]
        return {(layer, j): (k[li, at, :T].copy(), v[li, at, :T].copy())
                for li, layer in enumerate(self.layers) for at, j in enumerate(self.kv)}

    def put(self, slot, pieces: dict):
        """Write what `take` gives (for heads and layers this cache holds) back into positions 0..T-1."""
        for (layer, j), (k, v) in pieces.items():
            li, at = layer - self.layers.start, self.kv.index(j)
            self.k[slot][li, at, :k.shape[0]] = k
            self.v[slot][li, at, :v.shape[0]] = v


class Model:
    """One rank's part of the transformer: its stage's layers on its shards, and the head where it holds
    classifier rows. The backends' models (spmd.backends.vulkan_model) keep this interface:

        open(slot, need) / free(slot) / slots    a sequence's KV cache for `need` positions; {slot: need} open
        embed(tokens) -> (n, dim)                the first stage's input (vulkan: or the ids, embedded in the pass)
        forward(x, segments, allreduce, head)    the stage's layers over stacked segments, then the head
        cache_take(slot, T) / cache_put(slot, pieces)   KV-cache rows of (layer, KV head) pairs, for moves
        ahead_tokens(rows) -> k                  how many steps `ahead` chains at most (0: it has none)
        ahead(tokens, segments, k, n_known)      a one-rank greedy decode of k steps on the device (vulkan)
        close()
    """

    def __init__(self, cfg, weights, share, max_seq, slots=1, partial_dtype=np.float32, kv_cache="f32"):
        self.cfg, self.w, self.share = cfg, weights, share
        self.partial_dtype = partial_dtype  # of the partial sums: float64 where the products sum exactly (cpu int8)
        self.max_seq = max_seq  # the longest sequence any slot may hold (the RoPE tables' length)
        self.n_slots = slots  # slots 0..slots-1 may be open
        self.rope = Rope(cfg, max_seq, weights.rope_factors)
        self.cache = KVCache(share.layer_ids, share.kv, cfg.head_dim, KV_DTYPES[kv_cache])
        self.scale = np.float32(1.0 / np.sqrt(cfg.head_dim))
        self._kept_buffers = {}  # rows -> buffers, for passes of up to KEEP_ROWS rows (decode steps, batched)

    KEEP_ROWS = 64

    def _buffers(self, n):
        if n in self._kept_buffers:
            return self._kept_buffers[n]
        cfg, s = self.cfg, self.share
        f32 = np.float32
        buf = dict(
            q=np.empty((n, s.n_heads * cfg.head_dim), f32), k=np.empty((n, s.n_kv * cfg.head_dim), f32),
            v=np.empty((n, s.n_kv * cfg.head_dim), f32), proj=np.empty((n, cfg.dim), self.partial_dtype),
            gate=np.empty((n, s.n_ffn), f32), up=np.empty((n, s.n_ffn), f32),
        )
        if n <= self.KEEP_ROWS:
            self._kept_buffers[n] = buf
        return buf

    # ---- sequence slots -----------------------------------------------------------------------------------------
    def open(self, slot, need):
        """A KV cache for `slot` of `need` positions (at most max_seq), zeroed; replaces the slot's old one."""
        if not 0 <= slot < self.n_slots or not 0 < need <= self.max_seq:
            raise ValueError(f"slot {slot} of {need} positions: this model has slots 0..{self.n_slots - 1} of at "
                             f"most {self.max_seq}")
        self.cache.open(slot, need)

    def free(self, slot):
        self.cache.free(slot)

    @property
    def slots(self) -> dict:
        return self.cache.slots

    def ahead_tokens(self, rows=1) -> int:
        return 0  # (the host's models gain nothing from chaining: they pick each token where they compute it)

    def embed(self, tokens):
        """(n,) token ids -> (n, dim) float32: the first stage's input."""
        return self.w.embed(tokens)

    def forward(self, x, segments, allreduce, head):
        """x (n, dim) float32, the hidden state entering this stage, the segments' rows stacked (updated in place)
        -> with `head`, this rank's logits slices (len(segments), n_vocab_local) of each segment's last token; else
        x after the stage's layers. allreduce: sums a float32 array over the stage's ranks in place, None when the
        stage has one."""
        check_pass(x, segments, self.cache.slots)
        x = self.layers(x, segments, allreduce)
        return self.head(x[last_rows(segments)]) if head else x

    def layers(self, x, segments, allreduce):
        """x (n, dim) through this rank's layers, two partial sums a layer (`stage_schedule`)."""
        buf = self._buffers(x.shape[0])
        rope = self.rope.at(np.concatenate([np.arange(seg.pos, seg.pos + seg.n) for seg in segments]))
        for layer, half in stage_schedule(self.share.layer_ids):
            lw = self.w.layer(layer)
            with self.w.hold(layer, half):  # a streamed half: in the window until its partial sum is made
                partial = self._half(layer, half, lw, x, segments, rope, buf)
            x += allreduce(partial) if allreduce is not None else partial
        return x

    def _half(self, layer, half, lw, x, segments, rope, buf):
        """This rank's partial sum of one half of a layer (its RMSNorm, then `_attention` or `_ffn`) for x (n, dim)."""
        if half == "attention":
            return self._attention(layer, lw, self._norm(x, lw.attn_norm), segments, rope, buf)
        return self._ffn(lw, self._norm(x, lw.ffn_norm), buf)

    def head(self, x):
        """x (m, dim), the rows to score -> this rank's logits slices (m, n_vocab_local) (no columns without
        classifier rows)."""
        if self.w.output is None:
            return np.empty((x.shape[0], 0), np.float32)
        return self.w.output(self._norm(x, self.w.output_norm))

    def cache_take(self, slot, T) -> dict:
        return self.cache.take(slot, T)

    def cache_put(self, slot, pieces):
        self.cache.put(slot, pieces)

    def close(self):
        """The arrays go with the object; a weight window stops its loader (the Vulkan model frees device memory)."""
        if self.w.window is not None:
            self.w.window.close()

    def _attention(self, layer, lw, xn, segments, rope, buf):
        """xn (n, dim) -> (n, dim) this rank's partial sum of the attention output."""
        cfg, n = self.cfg, xn.shape[0]
        hd, n_kv, group = cfg.head_dim, self.share.n_kv, cfg.group
        q, k, v = self._products((lw.wq, lw.wk, lw.wv), xn, (buf["q"], buf["k"], buf["v"]))
        if lw.bq is not None:
            q += lw.bq
            k += lw.bk
            v += lw.bv
        q, k, v = q.reshape(n, n_kv * group, hd), k.reshape(n, n_kv, hd), v.reshape(n, n_kv, hd)
        if lw.q_norm is not None:  # qwen3: each head's vector normalised before the rotation
            q[...] = self._norm(q, lw.q_norm)
            k[...] = self._norm(k, lw.k_norm)
        self._rotate(q, rope)
        self._rotate(k, rope)
        out = np.empty((n, n_kv * group * hd), np.float32)
        for row, seg in segment_rows(segments):
            rows = slice(row, row + seg.n)
            self._attend(layer, seg, q[rows], k[rows], v[rows], out[rows])
        return lw.wo(out, out=buf["proj"])

    # ---- the work between the products (the cpu backend's CpuModel does these in numba) ---------------------------
    def _products(self, linears, x, outs):
        """outs[m] = linears[m](x): products that share their input (the cpu backend's run in one call)."""
        return [lin(x, out=out) for lin, out in zip(linears, outs)]

    def _norm(self, x, weight):
        return rmsnorm(x, weight, self.cfg.norm_eps)

    def _rotate(self, x, tables):
        self.rope(x, tables)

    def _swiglu(self, linears, x, outs):
        """silu(x @ gate.T) * (x @ up.T) (linears: gate, up; into outs[0], the cpu backend's in one call)."""
        gate, up = self._products(linears, x, outs)
        return silu_mul(gate, up)

    def _attend(self, layer, seg, q, k, v, out):
        """One segment: its k, v into its slot's cache, then causal attention into out (seg.n, heads * hd), its
        query rows ATTEND_ROWS at a time (a long prompt's scores would otherwise take heads x n x T floats)."""
        n, pos = seg.n, seg.pos
        ck, cv = self.cache.store(seg.slot, layer, pos, k, v)  # (kv, need, hd)
        for first in range(0, n, ATTEND_ROWS):
            rows = slice(first, min(n, first + ATTEND_ROWS))
            out[rows] = self._attend_rows(q[rows], pos + first, ck, cv)

    def _attend_rows(self, q, pos, ck, cv):
        """Query rows q (m, heads, hd) at positions pos.. over the cache's keys 0..pos+m-1 -> (m, heads * hd)."""
        m, (n_kv, group, hd) = q.shape[0], (self.share.n_kv, self.cfg.group, self.cfg.head_dim)
        T = pos + m
        ck, cv = ck[:, :T].astype(np.float32, copy=False), cv[:, :T].astype(np.float32, copy=False)  # (f16: exactly)
        # (kv, group*m, hd): each KV head's query heads, all rows
        qg = q.reshape(m, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * m, hd)
        scores = np.matmul(qg, ck.transpose(0, 2, 1)) * self.scale  # (kv, group*m, T)
        if m > 1:  # causal: query i (position pos+i) sees keys 0..pos+i
            future = np.arange(T)[None, :] > (pos + np.arange(m))[:, None]  # (m, T)
            scores.reshape(n_kv, group, m, T)[:, :, future] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = np.matmul(scores, cv)  # (kv, group*m, hd)
        return out.reshape(n_kv, group, m, hd).transpose(2, 0, 1, 3).reshape(m, n_kv * group * hd)

    def _ffn(self, lw, xn, buf):
        """xn (n, dim) -> (n, dim) this rank's partial sum of the SwiGLU FFN output."""
        return lw.w2(self._swiglu((lw.w1, lw.w3), xn, (buf["gate"], buf["up"])), out=buf["proj"])

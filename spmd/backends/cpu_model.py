"""The cpu backend's model: spmd.model.Model with the work between the matrix products in numba.

A decode token on the TinyLlama shape made about 60 numpy calls a layer besides its 7 matrix products (RMSNorm
alone 7, attention about 20), 4-5 ms of a 25 ms token on the 2-core test machine. Here each is one call or a few:

    _rmsnorm(x, w, eps, out)          the sum of squares in 16 float32 lanes, then x * r * w as the reference does
    _rotate(x, cos, sin, neox)        RoPE in place, the reference's arithmetic (bit-identical to it)
    _silu_finish(gate, e, up)         gate / (1 + e) * up into gate, e = exp(-gate) from numpy (vectorised)
    decode attention of a segment of one token (`_attend`): `_scores` writes its k, v into the cache and the
    scaled dot products of every local head with keys 0..pos less each head's maximum; numpy's exp (vectorised)
    takes them in place; `_values` sums each head's p_t * v_t in 16-float lanes and divides by the sum of p.
    From PARALLEL_SCORES scores on (32 heads: 32 positions) the heads are split over the rank's threads.

A prompt's attention (several rows a segment) stays numpy's batched matmul, which is faster there. Each function
gives the same bits for a head or a row whatever else the pass holds (its rank's other heads, other segments), as
the reference does: results do not change with the rank count. The dot products are explicit 16-lane vectors
summed in a fixed tree (`spmd.backends.cpu._hsum`), so the bits do not depend on the CPU either.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..model import Model
from .cpu import F32, _Arg, _fma, _hsum, _load, _vec, products

LANES = 16
PARALLEL_SCORES = 1024  # a token's attention splits its heads over the rank's threads from this many scores


@intrinsic
def _dot(typingctx, a, ia, b_, ib, vectors):
    """a[ia, :16 * vectors] . b[ib, :16 * vectors] (2-D float32 arrays with contiguous rows): 16 lanes of fused
    multiply-adds, then their sum in a fixed tree."""

    def codegen(context, b, sig, args):
        pa = _Arg(context, b, sig.args[0], args[0]).row(args[1])
        pb = _Arg(context, b, sig.args[2], args[2]).row(args[3])
        acc = cgutils.alloca_once_value(b, ir.Constant(_vec(F32, LANES), None))
        with cgutils.for_range(b, args[4]) as loop:
            at = b.mul(loop.index, ir.Constant(loop.index.type, 4 * LANES))
            b.store(_fma(b, _load(b, pa, at, _vec(F32, LANES)), _load(b, pb, at, _vec(F32, LANES)), b.load(acc)), acc)
        return _hsum(b, b.load(acc))

    return types.float32(a, ia, b_, ib, vectors), codegen


def _make_weighted(nv):
    """Intrinsic weighted(p, n, v, out, first): out[first:first + 16 * nv] = sum over t < n of p[t] * v[t, first:..]
    (p 1-D, v 2-D with contiguous rows, out 1-D; float32), the nv vectors' sums held in registers across t."""

    @intrinsic
    def weighted(typingctx, p, n, v, out, first):
        def codegen(context, b, sig, args):
            pp = b.bitcast(context.make_array(sig.args[0])(context, b, args[0]).data, F32.as_pointer())
            V = _Arg(context, b, sig.args[2], args[2])
            po = b.bitcast(context.make_array(sig.args[3])(context, b, args[3]).data, ir.IntType(8).as_pointer())
            c = lambda k: ir.Constant(args[4].type, k)  # noqa: E731
            at = b.mul(args[4], c(4))  # the first element's byte offset in a row of v and in out
            accs = [cgutils.alloca_once_value(b, ir.Constant(_vec(F32, LANES), None)) for _ in range(nv)]
            with cgutils.for_range(b, args[1]) as loop:
                pt = b.load(b.gep(pp, [loop.index]))
                ps = b.insert_element(ir.Constant(_vec(F32, LANES), ir.Undefined), pt, ir.Constant(ir.IntType(32), 0))
                ps = b.shuffle_vector(ps, ps, ir.Constant(_vec(ir.IntType(32), LANES), None))
                row = V.row(loop.index)
                for k, acc in enumerate(accs):
                    vk = _load(b, row, b.add(at, c(4 * LANES * k)), _vec(F32, LANES))
                    b.store(_fma(b, ps, vk, b.load(acc)), acc)
            for k, acc in enumerate(accs):
                dst = b.bitcast(b.gep(po, [b.add(at, c(4 * LANES * k))]), _vec(F32, LANES).as_pointer())
                b.store(b.load(acc), dst, align=1)
            return context.get_dummy_value()

        return types.void(p, n, v, out, first), codegen

    return weighted


_weighted4, _weighted1 = _make_weighted(4), _make_weighted(1)


@njit(cache=True, nogil=True, error_model="numpy")
def _rmsnorm(x, w, eps, out):
    """out (n, dim) = x * (1 / sqrt(mean(x * x) + eps)) * w, in float32 as spmd.model.rmsnorm."""
    n, dim = x.shape
    whole = dim // LANES
    for i in range(n):
        ss = _dot(x, i, x, i, whole)
        for j in range(whole * LANES, dim):
            ss += x[i, j] * x[i, j]
        r = np.float32(1.0) / np.sqrt(ss / np.float32(dim) + eps)
        for j in range(dim):
            out[i, j] = x[i, j] * r * w[j]
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _rotate(x, cos, sin, neox):
    """x (n, heads, hd) rotated in place: row i by cos[i], sin[i] (rope_dim / 2 each), as spmd.model.Rope."""
    n, heads, _ = x.shape
    half = cos.shape[1]
    for i in range(n):
        for h in range(heads):
            for j in range(half):
                ia, ib = (j, j + half) if neox else (2 * j, 2 * j + 1)
                a, b = x[i, h, ia], x[i, h, ib]
                x[i, h, ia] = a * cos[i, j] - b * sin[i, j]
                x[i, h, ib] = a * sin[i, j] + b * cos[i, j]


@njit(cache=True, nogil=True, error_model="numpy")
def _silu_finish(gate, e, up):
    """gate = gate / (1 + e) * up, e = exp(-gate) (numpy's, vectorised: numba's exp is scalar)."""
    g, ev, u = gate.reshape(-1), e.reshape(-1), up.reshape(-1)
    for j in range(g.size):
        g[j] = g[j] / (np.float32(1.0) + ev[j]) * u[j]
    return gate


@njit(cache=True, nogil=True, error_model="numpy")
def _head_scores(q, ck, pos, scale, s, h0, h1):
    """Heads h0..h1-1 of q (heads, hd) at position pos: s[h] (pos + 1,) = the scaled dot products with keys 0..pos
    of its KV head in ck (kv, need, hd), less their maximum."""
    heads, hd = q.shape
    group = heads // ck.shape[0]
    for h in range(h0, h1):
        keys = ck[h // group]
        top = np.float32(-np.inf)
        for t in range(pos + 1):
            d = _dot(q, h, keys, t, hd // LANES) * scale
            s[h, t] = d
            top = max(top, d)
        for t in range(pos + 1):
            s[h, t] -= top


@njit(cache=True, nogil=True, error_model="numpy")
def _head_values(p, cv, out, h0, h1):
    """Heads h0..h1-1: out[h * hd:(h + 1) * hd] = the sum over t of p[h, t] * v_t, divided by the sum of p[h] (p:
    exp of the scores)."""
    heads, n = p.shape
    n_kv, _, hd = cv.shape
    group = heads // n_kv
    for h in range(h0, h1):
        values = cv[h // group]
        sums = np.zeros(4, np.float32)  # four running sums (one would wait on each add)
        for t in range(n - n % 4):
            sums[t % 4] += p[h, t]
        total = (sums[0] + sums[1]) + (sums[2] + sums[3])
        for t in range(n - n % 4, n):
            total += p[h, t]
        o = out[h * hd:(h + 1) * hd]
        for first in range(0, hd - hd % 64, 64):
            _weighted4(p[h], n, values, o, first)
        for first in range(hd - hd % 64, hd, LANES):
            _weighted1(p[h], n, values, o, first)
        for j in range(hd):
            o[j] /= total


@njit(cache=True, nogil=True, error_model="numpy")
def _scores(q, k, v, ck, cv, pos, scale):
    """One token at position pos: k, v (kv, hd) into the caches (kv, need, hd) at pos; -> s (heads, pos + 1), each
    head's scores (`_head_scores`). q (heads, hd)."""
    ck[:, pos] = k
    cv[:, pos] = v
    s = np.empty((q.shape[0], pos + 1), np.float32)
    _head_scores(q, ck, pos, scale, s, 0, q.shape[0])
    return s


@njit(cache=True, nogil=True, error_model="numpy")
def _values(p, cv, out):
    """out (heads * hd,): every head's `_head_values`."""
    _head_values(p, cv, out, 0, p.shape[0])


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _scores_parallel(q, k, v, ck, cv, pos, scale, parts):
    """`_scores` with the heads in `parts` ranges on numba's threads."""
    ck[:, pos] = k
    cv[:, pos] = v
    heads = q.shape[0]
    s = np.empty((heads, pos + 1), np.float32)
    for j in prange(parts):
        _head_scores(q, ck, pos, scale, s, j * heads // parts, (j + 1) * heads // parts)
    return s


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _values_parallel(p, cv, out, parts):
    """`_values` with the heads in `parts` ranges on numba's threads."""
    heads = p.shape[0]
    for j in prange(parts):
        _head_values(p, cv, out, j * heads // parts, (j + 1) * heads // parts)


class CpuModel(Model):
    """Model with its RMSNorm, RoPE, SiLU and one-token attention as numba functions (the module's docstring).
    threads: the rank's (its backend's); a token's attention from PARALLEL_SCORES scores on splits its heads over
    them."""

    def __init__(self, *args, threads=1, **kw):
        super().__init__(*args, **kw)
        self.threads = threads
        self._compile()

    def _compile(self):
        """Compile the functions for the argument types they get (or load them from numba's cache) at load, so that
        the first tokens do not wait for it."""
        f32 = np.float32
        x, cache = np.ones((1, LANES), f32), np.zeros((1, 1, LANES), f32)
        _rmsnorm(x, x[0], f32(1.0), x.copy())
        _rotate(np.zeros((1, 1, 2), f32), x[:, :1].copy(), x[:, :1].copy(), self.rope.neox)
        _silu_finish(x.copy(), x.copy(), x)
        out = np.zeros(LANES, f32)
        _values(_scores(x, x, x, cache, cache.copy(), 0, self.scale), cache, out)  # (0 / 0: NaN, no error)
        if self.threads > 1:
            _values_parallel(_scores_parallel(x, x, x, cache, cache.copy(), 0, self.scale, 1), cache, out, 1)

    def _products(self, linears, x, outs):
        return products(linears, x, outs)

    def _norm(self, x, weight):
        x = np.ascontiguousarray(x)  # (the dot products read whole rows)
        out = np.empty(x.shape, np.float32)
        _rmsnorm(x.reshape(-1, x.shape[-1]), weight, np.float32(self.cfg.norm_eps), out.reshape(-1, x.shape[-1]))
        return out

    def _rotate(self, x, tables):
        cos, sin = tables
        _rotate(x, cos[:, 0], sin[:, 0], self.rope.neox)

    def _silu_mul(self, gate, up):
        e = np.negative(gate)
        with np.errstate(over="ignore"):  # exp(-gate) = inf gives silu's 0, as the reference
            np.exp(e, out=e)
        return _silu_finish(gate, e, up)

    def _attend(self, layer, seg, q, k, v, out):
        if seg.n > 1 or self.cfg.head_dim % LANES or not self.share.n_kv:  # a prompt (or no heads here): numpy's
            return super()._attend(layer, seg, q, k, v, out)
        ck, cv = self.cache.layer(seg.slot, layer)
        parts = min(self.threads, q.shape[1])
        if parts > 1 and q.shape[1] * (seg.pos + 1) >= PARALLEL_SCORES:
            s = _scores_parallel(q[0], k[0], v[0], ck, cv, seg.pos, self.scale, parts)
            np.exp(s, out=s)
            _values_parallel(s, cv, out[0], parts)
        else:
            s = _scores(q[0], k[0], v[0], ck, cv, seg.pos, self.scale)
            np.exp(s, out=s)
            _values(s, cv, out[0])

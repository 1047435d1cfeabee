"""The cpu backend's model: spmd.model.Model with the work between the matrix products in numba.

A decode token on the TinyLlama shape made about 60 numpy calls a layer besides its 7 matrix products (RMSNorm
alone 7, attention about 20), 4-5 ms of a 25 ms token on the 2-core test machine. Here each is one call or a few:

    _rmsnorm(x, w, eps, out)          the sum of squares in 16 float32 lanes, then x * r * w as the reference does
    _rotate(x, cos, sin, neox)        RoPE in place, the reference's arithmetic (bit-identical to it)
    _silu(gate, up)                   gate / (1 + exp(-gate)) * up into gate (`_exps`)
    swiglu(lins, x, outs)             gate and up (`cpu.products`'s kernels) and their SiLU in one call: each thread
                                      takes its rows of gate, then of up, then their SiLU while they are in cache
                                      (one pass and one call less a layer: a decode token 2-4% faster on 16 cores)
    decode attention of a segment of one token (`_attend`): its k, v go into the cache (`_store_token`), then one call,
    `_attend_one` (`_head_attend` over its heads): `_head_scores`, the scaled dot products of every local head
    with keys 0..pos less each head's maximum (16 dot products a call, their lane sums reduced together: 4 heads of
    a KV head x 4 keys, each key read once for them, or 2 x 8, or 1 x 16); `_exps` takes them in place;
    `_head_values` sums each head's p_t * v_t in 16-float lanes, four heads of a KV head at a time, and divides by
    the sum of p.
    From PARALLEL_SCORES scores on (32 heads: 32 positions) the heads are split over the rank's threads.
    With --kv-cache f16 the caches hold float16 (its bits as int16 here) and these functions widen each key and
    value as they read it (`_lanes`): the same values the reference reads from its float16 cache.

A pass of one token (a decode step of one sequence) runs each half of a layer as one compiled call
(`CpuModel._half`): `_attention_step` (RMSNorm, q, k, v, their biases or head norms, RoPE, the cache store,
attention, wo) and `_ffn_step` (RMSNorm, swiglu's kernel, w2), calling the same functions in the same order as the
calls one at a time, so the same bits, without the Python between them (about 25 calls and numpy operations a layer):
TinyLlama-shaped Q4_0 tokens in turn in one process took 0.93-0.97 of the time on the 2-core test machine and
0.81-0.92 on a 16-core Xeon at 8 and 16 threads (2026-12-04). Each (layer, half) keeps its compiled entry point
(`_step`, at load: 3-4 s a function and type mix the first time, then numba's cache); a half it cannot take goes
Model's way.

A prompt's rows (several a segment) attend with the same functions, a row at a time, on the rank's threads
(`_rows_attend`, `_head_attend` for each row): each row's bits are a one-token step's at its position,
so on the cpu backend a prompt's logits are the same in one pass, in parts or a token at a time (numpy's batched
matmul, used before, moved them by up to 0.24 with int8 activations, and took 10% longer on a 128-token prompt).
Each function gives the same bits for a head or a row whatever else the pass holds (its rank's other heads, other
segments), as the reference does: results do not change with the rank count. The dot products are explicit 16-lane
vectors summed in a fixed tree (`spmd.backends.cpu._hsum`), so the bits do not depend on the CPU either; so is
exp (`_exp16`, fused multiply-adds: the same bits with AVX-512, without it, and on an Intel Xeon as on the test
machine's AMD EPYC). numpy's exp, used before, is numpy's to implement per CPU and version, and cost a call of its
own and a fork-join more a layer: attention and SiLU now take 0.45-0.6 ms less of a TinyLlama decode token on the
2-core test machine.
"""
import numpy as np
from llvmlite import ir
import numba
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..model import Model, Segment, stage_schedule
from ..weights import half_fields
from .cpu import (_ENTRIES, F16, F32, I32, CpuLinear, _Arg, _block_count, _blocks, _broadcast, _finish, _fma, _hmax,
                  _hsum, _linear_parallel, _linear_serial, _linears_parallel, _linears_serial, _prepare, _row_block,
                  _shuffle, _splat, _to_f32, _vec, _writable, fusable, on_threads, products, typed_entry)

LANES = 16
PARALLEL_SCORES = 1024  # a token's attention splits its heads over the rank's threads from this many scores


def _lanes(b, row, at, dtype):
    """16 floats of a row from element `at` on: float32, or float16 bits held as int16 (a --kv-cache f16 cache's
    keys and values), widened exactly."""
    if dtype not in (types.float32, types.int16):
        raise TypeError(f"attention rows of {dtype}: float32, or float16 bits as int16")
    return _to_f32(b, row, b.mul(at, ir.Constant(at.type, dtype.bitwidth // 8)), dtype)


def kernel_view(cache):
    """A KV cache as the attention functions take it: float32, or a float16 one's bits as int16 (numba has no
    float16)."""
    return cache.view(np.int16) if cache.dtype == np.float16 else cache


EXP_LOW, EXP_HIGH = -103.97207708, 88.72283935  # exp underflows to 0 below, overflows to inf above (float32)
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _exp16(b, x):
    """exp of 16 float32 lanes, the same bits on every CPU (fused multiply-adds, no table): x = n ln 2 + r with n
    = floor(x log2(e) + 1/2), exp(r) by Cephes' polynomial, times 2^n in two factors (2^(n/2) each, so that
    results down to the subnormals are reached); within 1.01 units in the last place of float32 (just over one
    where n changes, x / ln 2 near k + 1/2), a subnormal step below the normal range (tests/test_cpu_model.py
    measures it); NaN stays NaN, -inf gives 0, +inf inf."""
    v = _vec(F32, LANES)
    c = lambda value: _splat(F32, value, LANES)  # noqa: E731
    nan = b.fcmp_unordered("uno", x, x)
    xs = b.select(nan, c(0.0), x)
    low, high = b.fcmp_ordered("<", xs, c(EXP_LOW)), b.fcmp_ordered(">", xs, c(EXP_HIGH))
    xc = b.select(low, c(EXP_LOW), b.select(high, c(EXP_HIGH), xs))
    floor = cgutils.get_or_insert_function(b.module, ir.FunctionType(v, [v]), "llvm.floor.v16f32")
    n = b.call(floor, [_fma(b, xc, c(1.4426950408889634), c(0.5))])
    r = _fma(b, n, c(-0.693359375), xc)  # ln 2 in two parts: n times the first is exact
    r = _fma(b, n, c(2.12194440e-4), r)
    poly = c(EXP_POLY[0])
    for k in EXP_POLY[1:]:
        poly = _fma(b, poly, r, c(k))
    y = b.fadd(_fma(b, poly, b.fmul(r, r), r), c(1.0))
    ni = b.fptosi(n, _vec(I32, LANES))
    half = b.ashr(ni, _splat(I32, 1, LANES))
    power = lambda k: b.bitcast(b.shl(b.add(k, _splat(I32, 127, LANES)), _splat(I32, 23, LANES)), v)  # noqa: E731
    out = b.fmul(b.fmul(y, power(half)), power(b.sub(ni, half)))
    out = b.select(low, c(0.0), b.select(high, c(float("inf")), out))
    return b.select(nan, x, out)


@intrinsic
def _exps(typingctx, a, n):
    """a[:n] = exp(a[:n]) in place (a: 1-D contiguous float32), 16 at a time (`_exp16`; the last few through a
    vector of their own): an element's result does not depend on where it is."""

    def codegen(context, b, sig, args):
        base = b.bitcast(context.make_array(sig.args[0])(context, b, args[0]).data, F32.as_pointer())
        count = context.cast(b, args[1], sig.args[1], types.intp)
        sixteen = ir.Constant(count.type, LANES)
        whole = b.sdiv(count, sixteen)
        with cgutils.for_range(b, whole) as loop:
            at = b.bitcast(b.gep(base, [b.mul(loop.index, sixteen)]), _vec(F32, LANES).as_pointer())
            b.store(_exp16(b, b.load(at, align=4)), at, align=4)
        done = b.mul(whole, sixteen)
        rest = b.sub(count, done)
        tail = cgutils.alloca_once_value(b, ir.Constant(_vec(F32, LANES), None))
        lanes = b.bitcast(tail, F32.as_pointer())
        with cgutils.for_range(b, rest) as loop:
            b.store(b.load(b.gep(base, [b.add(done, loop.index)])), b.gep(lanes, [loop.index]))
        b.store(_exp16(b, b.load(tail)), tail)
        with cgutils.for_range(b, rest) as loop:
            b.store(b.load(b.gep(lanes, [loop.index])), b.gep(base, [b.add(done, loop.index)]))
        return context.get_dummy_value()

    return types.void(a, n), codegen


@intrinsic
def _dot(typingctx, a, ia, b_, ib, vectors):
    """a[ia, :16 * vectors] . b[ib, :16 * vectors] (2-D arrays with contiguous rows: a float32, b float32 or
    float16 bits (`_lanes`)): 16 lanes of fused multiply-adds, then their sum in a fixed tree."""

    def codegen(context, b, sig, args):
        pa = _Arg(context, b, sig.args[0], args[0]).row(args[1])
        pb = _Arg(context, b, sig.args[2], args[2]).row(args[3])
        acc = cgutils.alloca_once_value(b, ir.Constant(_vec(F32, LANES), None))
        with cgutils.for_range(b, args[4]) as loop:
            at = b.mul(loop.index, ir.Constant(loop.index.type, LANES))
            wv = _lanes(b, pb, at, sig.args[2].dtype)
            b.store(_fma(b, _lanes(b, pa, at, sig.args[0].dtype), wv, b.load(acc)), acc)
        return _hsum(b, b.load(acc))

    return types.float32(a, ia, b_, ib, vectors), codegen


def _make_dots(nh):
    """Intrinsic dots(a, ia, b, ib, vectors, scale, s, tops): for the nh heads ia..ia + nh - 1 (rows of a) and the
    16 / nh keys ib.. (rows of b; 2-D arrays with contiguous rows, as `_dot`'s), s[ia + j, ib + k] = (a[ia + j] .
    b[ib + k]) * scale over 16 * vectors elements, each dot product as `_dot` makes it, bit for bit, their 16 lane
    sums reduced together (`_hsums`); tops[j] becomes the larger of itself and head j's new scores (where one is
    NaN, any of them: the head's output is NaN anyway). Each key's vectors are loaded (and widened) once for the nh
    heads."""
    nk = LANES // nh

    @intrinsic
    def dots(typingctx, a, ia, b_, ib, vectors, scale, s, tops):
        def codegen(context, b, sig, args):
            A, B = _Arg(context, b, sig.args[0], args[0]), _Arg(context, b, sig.args[2], args[2])
            heads = [A.row(b.add(args[1], ir.Constant(args[1].type, j))) for j in range(nh)]
            keys = [B.row(b.add(args[3], ir.Constant(args[3].type, k))) for k in range(nk)]
            accs = [[cgutils.alloca_once_value(b, ir.Constant(_vec(F32, LANES), None)) for _ in range(nk)]
                    for _ in range(nh)]
            with cgutils.for_range(b, args[4]) as loop:
                at = b.mul(loop.index, ir.Constant(loop.index.type, LANES))
                qs = [_lanes(b, row, at, sig.args[0].dtype) for row in heads]
                for k, key in enumerate(keys):
                    kv = _lanes(b, key, at, sig.args[2].dtype)
                    for j in range(nh):
                        b.store(_fma(b, qs[j], kv, b.load(accs[j][k])), accs[j][k])
            sums = b.fmul(_hsums(b, [b.load(acc) for row in accs for acc in row]), _broadcast(b, args[5], LANES))
            S, tops = _Arg(context, b, sig.args[6], args[6]), context.make_array(sig.args[7])(context, b, args[7])
            top_at = b.bitcast(tops.data, F32.as_pointer())
            for j in range(nh):
                part = _shuffle(b, sums, range(j * nk, (j + 1) * nk))  # head j's scores of the nk keys
                row = S.row(b.add(args[1], ir.Constant(args[1].type, j)))
                dst = b.gep(row, [b.mul(args[3], ir.Constant(args[3].type, 4))])
                b.store(part, b.bitcast(dst, _vec(F32, nk).as_pointer()), align=1)
                old, new = b.load(b.gep(top_at, [ir.Constant(I32, j)])), _hmax(b, part)
                b.store(b.select(b.fcmp_ordered(">", new, old), new, old), b.gep(top_at, [ir.Constant(I32, j)]))
            return context.get_dummy_value()

        return types.void(a, ia, b_, ib, vectors, scale, s, tops), codegen

    return dots


# heads a pass over the keys scores at once (a KV head's query heads: each key read for all of them), by how many
# of its heads are left: 4 x 4 keys, 2 x 8, 1 x 16 (each 16 dot products, one `_hsums`)
_dots4, _dots2, _dots1 = _make_dots(4), _make_dots(2), _make_dots(1)


def _hsums(b, vs):
    """16 vectors of 16 floats -> one whose lane j is `_hsum(vs[j])`, the same additions in the same tree, done for
    all of them together: at each level, pairs of vectors are merged so that one add takes both halves' steps."""
    w = LANES  # lanes a vector holds of each of its keys
    while len(vs) > 1:
        w //= 2
        keys = LANES // (2 * w)  # of each vector before the merge
        lo = [k * 2 * w + lane for k in range(keys) for lane in range(w)]
        hi = [i + w for i in lo]
        merged = []
        for x, y in zip(vs[0::2], vs[1::2]):
            pick = lambda idx: b.shuffle_vector(  # noqa: E731
                x, y, ir.Constant(_vec(ir.IntType(32), LANES), idx + [i + LANES for i in idx]))
            merged.append(b.fadd(pick(lo), pick(hi)))
        vs = merged
    return vs[0]


def _make_weighted(nh, nv):
    """Intrinsic weighted(p, h, n, v, out, first, hd): for the nh heads h..h + nh - 1 (rows of p, 2-D), out[(h +
    j) * hd + first:... + 16 * nv] = sum over t < n of p[h + j, t] * v[t, first:...] (v 2-D with contiguous rows,
    float32 or float16 bits (`_lanes`); out 1-D; float32): each row of v read once for the nh heads, every sum held
    in registers across t."""

    @intrinsic
    def weighted(typingctx, p, h, n, v, out, first, hd):
        def codegen(context, b, sig, args):
            P, V = _Arg(context, b, sig.args[0], args[0]), _Arg(context, b, sig.args[3], args[3])
            prows = [b.bitcast(P.row(b.add(args[1], ir.Constant(args[1].type, j))), F32.as_pointer())
                     for j in range(nh)]
            po = b.bitcast(context.make_array(sig.args[4])(context, b, args[4]).data, ir.IntType(8).as_pointer())
            c = lambda k: ir.Constant(args[5].type, k)  # noqa: E731
            accs = [[cgutils.alloca_once_value(b, ir.Constant(_vec(F32, LANES), None)) for _ in range(nv)]
                    for _ in range(nh)]
            with cgutils.for_range(b, args[2]) as loop:
                row = V.row(loop.index)
                vks = [_lanes(b, row, b.add(args[5], c(LANES * k)), sig.args[3].dtype) for k in range(nv)]
                for prow, head in zip(prows, accs):
                    ps = _broadcast(b, b.load(b.gep(prow, [loop.index])), LANES)
                    for vk, acc in zip(vks, head):
                        b.store(_fma(b, ps, vk, b.load(acc)), acc)
            for j, head in enumerate(accs):
                base = b.mul(b.add(b.mul(b.add(args[1], c(j)), args[6]), args[5]), c(4))  # ((h + j) hd + first) 4
                for k, acc in enumerate(head):
                    dst = b.bitcast(b.gep(po, [b.add(base, c(4 * LANES * k))]), _vec(F32, LANES).as_pointer())
                    b.store(b.load(acc), dst, align=1)
            return context.get_dummy_value()

        return types.void(p, h, n, v, out, first, hd), codegen

    return weighted


_weighted44, _weighted14, _weighted41, _weighted11 = (
    _make_weighted(nh, nv) for nh, nv in ((4, 4), (1, 4), (4, 1), (1, 1)))


@intrinsic
def _as_cached(typingctx, x, cache):
    """A float32 as `cache` (a KV cache, `kernel_view`) holds it: itself, or rounded to float16 (to nearest, ties to
    even, as numpy's astype) as its bits."""
    if x != types.float32 or cache.dtype not in (types.float32, types.int16):
        raise TypeError(f"a {x} into a cache of {cache.dtype}: float32 into float32, or float16 bits as int16")
    if cache.dtype == types.float32:
        return types.float32(x, cache), lambda context, b, sig, args: args[0]
    return types.int16(x, cache), lambda context, b, sig, args: b.bitcast(b.fptrunc(args[0], F16), ir.IntType(16))


@njit(cache=True, nogil=True, error_model="numpy")
def _store_token(k, v, ck, cv, pos):
    """A token's k, v (kv, hd) float32 into position pos of its layer's caches ck, cv (kv, need, hd; `kernel_view`):
    what KVCache.store does, in one call."""
    for h in range(k.shape[0]):
        for j in range(k.shape[1]):
            ck[h, pos, j] = _as_cached(k[h, j], ck)
            cv[h, pos, j] = _as_cached(v[h, j], cv)


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
def _silu(gate, up):
    """gate = gate / (1 + exp(-gate)) * up (`_silu_rows` of every column)."""
    g = gate.reshape(-1, gate.shape[-1])
    _silu_rows(g, up.reshape(g.shape), 0, g.shape[1])
    return gate


@njit(cache=True, nogil=True, error_model="numpy")
def _silu_rows(gate, up, c0, c1):
    """Columns c0..c1-1 of gate (n, cols) = gate / (1 + exp(-gate)) * up (`_exps`: an element's bits do not depend
    on the others; exp(-gate) = inf gives silu's 0)."""
    e = np.empty(c1 - c0, np.float32)
    for i in range(gate.shape[0]):
        for j in range(c1 - c0):
            e[j] = -gate[i, c0 + j]
        _exps(e, c1 - c0)
        for j in range(c1 - c0):
            gate[i, c0 + j] = gate[i, c0 + j] / (np.float32(1.0) + e[j]) * up[i, c0 + j]


@njit(cache=True, nogil=True)
def _swiglu_part(kind, w0, wh0, wd0, ws0, w1, wh1, wd1, ws1, xs, xq, y0, y1, j, parts):
    """Part j of `parts` (a thread's): its row blocks of gate, then of up (one stream at a time: alternating the
    two matrices every block measured 15% slower), then their SiLU."""
    blocks = _block_count(y0)
    b0, b1 = j * blocks // parts, (j + 1) * blocks // parts
    for blk in range(b0, b1):
        r0, r1 = _blocks(y0, blk)
        _row_block(kind, w0, wh0, wd0, ws0, xs, xq, y0, r0, r1)
    for blk in range(b0, b1):
        r0, r1 = _blocks(y0, blk)
        _row_block(kind, w1, wh1, wd1, ws1, xs, xq, y1, r0, r1)
    if b1 > b0:
        _silu_rows(y0, y1, _blocks(y0, b0)[0], _blocks(y0, b1 - 1)[1])


@njit(parallel=True, cache=True, nogil=True)
def _swiglu_parallel(kind, w0, wh0, wd0, ws0, w1, wh1, wd1, ws1, x, xs, xq, y0, y1, parts):
    """y0 = silu(x @ W0.T) * (x @ W1.T) (gate and up, y1 left holding up): each of `parts` (the threads) computes
    its rows of gate and up as `_linear_parallel` does, then their SiLU as `_silu` does, while they are in cache;
    one fork-join."""
    _prepare(kind, x, xs, xq)
    for j in prange(parts):
        _swiglu_part(kind, w0, wh0, wd0, ws0, w1, wh1, wd1, ws1, xs, xq, y0, y1, j, parts)
    _finish(xs, xq, y0)


@njit(cache=True, nogil=True)
def _swiglu_serial(kind, w0, wh0, wd0, ws0, w1, wh1, wd1, ws1, x, xs, xq, y0, y1, parts):
    _prepare(kind, x, xs, xq)
    _swiglu_part(kind, w0, wh0, wd0, ws0, w1, wh1, wd1, ws1, xs, xq, y0, y1, 0, 1)
    _finish(xs, xq, y0)


SWIGLU = (_swiglu_serial, _swiglu_parallel)


def swiglu(lins, x, outs, compile_only=False):
    """silu(x @ gate.T) * (x @ up.T) into outs[0] (lins: gate, up; outs[1] gets up): for one row (a decode step)
    one `_swiglu_*` call where `products` would fuse the two (a CpuLinear of one type and width each), else
    `products`, then `_silu` (a 64-token prompt took 4-15% longer the fused way on 2 cores: `products` shares out
    blocks of 16 rows of both matrices, a better balance for long rows of work). compile_only: compile (or load)
    the fused kernel for these matrices' types now, run nothing."""
    gate, up = lins
    x = np.ascontiguousarray(x, dtype=np.float32)
    if (x.shape[0] == 1 and fusable(gate, x, outs[0]) and fusable(up, x, outs[1])
            and (gate.qtype, gate.int8, gate.rows) == (up.qtype, up.int8, up.rows)):
        xs, xq, _ = gate._one
        parallel = on_threads((gate, up))
        args = (*gate.arrays, *up.arrays, x, xs, xq, *outs, gate.threads)
        kernel = typed_entry(SWIGLU, parallel, gate, args, both=False)  # (CpuModel._compile asks)
        if not compile_only:
            kernel(int(gate.qtype), *args)
        return outs[0]
    if compile_only:
        return None
    g, u = products(lins, x, outs)
    return _silu(g, u)


@njit(cache=True, nogil=True, error_model="numpy")
def _head_scores(q, ck, pos, scale, s, h0, h1):
    """Heads h0..h1-1 of q (heads, hd) at position pos: s[h] (pos + 1,) = the scaled dot products with keys 0..pos
    of its KV head in ck (kv, need, hd), less their maximum: up to 4 heads of one KV head together (`_dots4`, `_dots2`,
    `_dots1`: 16 dot products a call, each key's vectors read once for those heads), the keys left one by one
    (`_dot`); every score the same bits whichever heads went with it."""
    heads, hd = q.shape
    group = heads // ck.shape[0]
    tops = np.empty(4, np.float32)
    h = h0
    while h < h1:
        keys = ck[h // group]
        left = min(h1, (h // group + 1) * group) - h  # this KV head's query heads from h on
        nh = 4 if left >= 4 else 2 if left >= 2 else 1
        step = LANES // nh  # keys a call
        tops[:] = -np.inf
        for t in range(0, (pos + 1) // step * step, step):
            if nh == 4:
                _dots4(q, h, keys, t, hd // LANES, scale, s, tops)
            elif nh == 2:
                _dots2(q, h, keys, t, hd // LANES, scale, s, tops)
            else:
                _dots1(q, h, keys, t, hd // LANES, scale, s, tops)
        for j in range(nh):
            top = tops[j]
            for t in range((pos + 1) // step * step, pos + 1):
                s[h + j, t] = _dot(q, h + j, keys, t, hd // LANES) * scale
                top = max(top, s[h + j, t])
            for t in range(pos + 1):
                s[h + j, t] -= top
        h += nh


@njit(cache=True, nogil=True, error_model="numpy")
def _head_values(p, cv, out, h0, h1):
    """Heads h0..h1-1: out[h * hd:(h + 1) * hd] = the sum over t of p[h, t] * v_t, divided by the sum of p[h] (p:
    exp of the scores). Heads of one KV head go four at a time (`_make_weighted`: each value read once for them)."""
    heads, n = p.shape
    n_kv, _, hd = cv.shape
    group = heads // n_kv
    h = h0
    while h < h1:
        values = cv[h // group]
        end = min(h1, (h // group + 1) * group)  # this KV head's query heads within h0..h1
        while h + 4 <= end:
            for first in range(0, hd - hd % 64, 64):
                _weighted44(p, h, n, values, out, first, hd)
            for first in range(hd - hd % 64, hd, LANES):
                _weighted41(p, h, n, values, out, first, hd)
            h += 4
        while h < end:
            for first in range(0, hd - hd % 64, 64):
                _weighted14(p, h, n, values, out, first, hd)
            for first in range(hd - hd % 64, hd, LANES):
                _weighted11(p, h, n, values, out, first, hd)
            h += 1
    for h in range(h0, h1):
        sums = np.zeros(4, np.float32)  # four running sums (one would wait on each add)
        for t in range(n - n % 4):
            sums[t % 4] += p[h, t]
        total = (sums[0] + sums[1]) + (sums[2] + sums[3])
        for t in range(n - n % 4, n):
            total += p[h, t]
        for j in range(h * hd, (h + 1) * hd):
            out[j] /= total


@njit(cache=True, nogil=True, error_model="numpy")
def _head_attend(q, ck, cv, pos, scale, s, out, h0, h1):
    """Heads h0..h1-1 of q (heads, hd) at position pos over keys and values 0..pos of ck, cv (kv, need, hd): their
    scores into s (heads, >= pos + 1: `_head_scores`), exp (`_exps`), then `_head_values` into out."""
    _head_scores(q, ck, pos, scale, s, h0, h1)
    for h in range(h0, h1):
        _exps(s[h], pos + 1)
    _head_values(s[:, :pos + 1], cv, out, h0, h1)


@njit(cache=True, nogil=True, error_model="numpy")
def _attend_one(q, ck, cv, pos, scale, out):
    """One token at position pos, its keys and values in ck, cv up to pos -> out (heads * hd,): every head's
    `_head_attend`."""
    _head_attend(q, ck, cv, pos, scale, np.empty((q.shape[0], pos + 1), np.float32), out, 0, q.shape[0])


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _attend_parallel(q, ck, cv, pos, scale, out, parts):
    """`_attend_one` with the heads in `parts` ranges on numba's threads."""
    heads = q.shape[0]
    s = np.empty((heads, pos + 1), np.float32)
    for j in prange(parts):
        _head_attend(q, ck, cv, pos, scale, s, out, j * heads // parts, (j + 1) * heads // parts)


@njit(cache=True, nogil=True, error_model="numpy")
def _rows_attend(q, ck, cv, pos, scale, s, out, j=0, parts=1):
    """A prompt's query rows q (m, heads, hd) at positions pos, pos + 1, ... -> out (m, heads * hd): row i over
    keys 0..pos + i as a one-token step at that position attends (`_head_attend`, s[i] its scores, s (m, heads,
    >= pos + m)), for rows j, j + parts, ... (all by default)."""
    m, heads = q.shape[0], q.shape[1]
    for i in range(j, m, parts):
        _head_attend(q[i], ck, cv, pos + i, scale, s[i], out[i], 0, heads)


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _rows_attend_parallel(q, ck, cv, pos, scale, s, out, parts):
    """`_rows_attend` with rows i, i + parts, ... on thread i."""
    for j in prange(parts):
        _rows_attend(q, ck, cv, pos, scale, s, out, j, parts)


# ---- a decode step's half in one call -----------------------------------------------------------------------------
@njit(cache=True, nogil=True, error_model="numpy")
def _attention_step(x, g, eps, xn, ka, a, sa, ya, pa, kb, b, sb, yb, pb, second, biases, biased, norms, normed, q, k,
                    v, hd, cos, sin, neox, ck, cv, pos, scale, parts, out, ko, o, so, y, po):
    """A one-token decode step's attention half, as Model._half, `CpuModel._attend` and the CpuLinears do it one
    call at a time (the same functions, so the same bits): RMSNorm into xn; q, k, v in one or two groups of one type
    (a, b: their arrays, w, wh, wd, ws in turn, for `cpu._linears_*`; s: the group's scratch, y: its results, p: on
    the threads; second: whether there is b); the biases (qwen2) or each head's RMSNorm (qwen3); RoPE; k and v into
    the caches at pos; attention (on `parts` threads where more than one) into out; wo into y (float64 with
    --activations int8: the exact sums). The flags and kinds are compile-time constants (`_step_entry`)."""
    _rmsnorm(x, g, eps, xn)
    if pa:  # (the kernels are called here with their arrays one by one: a kind passed on through another function,
        # or with the arrays as *a, is typed as no constant)
        _linears_parallel(ka, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7],
                          a[8], a[9], a[10], a[11], xn, sa[0], sa[1], ya[0], ya[1], ya[2])
    else:
        _linears_serial(ka, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7],
                        a[8], a[9], a[10], a[11], xn, sa[0], sa[1], ya[0], ya[1], ya[2])
    if second and pb:
        _linears_parallel(kb, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                          b[8], b[9], b[10], b[11], xn, sb[0], sb[1], yb[0], yb[1], yb[2])
    elif second:
        _linears_serial(kb, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                        b[8], b[9], b[10], b[11], xn, sb[0], sb[1], yb[0], yb[1], yb[2])
    if biased:  # (float32 adds, as numpy's)
        for j in range(q.shape[1]):
            q[0, j] += biases[0][j]
        for j in range(k.shape[1]):
            k[0, j] += biases[1][j]
            v[0, j] += biases[2][j]
    heads, kv = q.shape[1] // hd, k.shape[1] // hd
    q2, k2 = q.reshape(heads, hd), k.reshape(kv, hd)
    if normed:
        _rmsnorm(q2, norms[0], eps, q2)
        _rmsnorm(k2, norms[1], eps, k2)
    _rotate(q.reshape(1, heads, hd), cos, sin, neox)
    _rotate(k.reshape(1, kv, hd), cos, sin, neox)
    _store_token(k2, v.reshape(kv, hd), ck, cv, pos)
    if parts > 1:
        _attend_parallel(q2, ck, cv, pos, scale, out[0], parts)
    else:
        _attend_one(q2, ck, cv, pos, scale, out[0])
    if po:
        _linear_parallel(ko, o[0], o[1], o[2], o[3], out, so[0], so[1], y)
    else:
        _linear_serial(ko, o[0], o[1], o[2], o[3], out, so[0], so[1], y)


@njit(cache=True, nogil=True, error_model="numpy")
def _ffn_step(x, g, eps, xn, kg, gu, s, gate, up, parts, pg, kd, d, sd, y, pd):
    """A one-token decode step's FFN half, as Model._half, `swiglu` and w2's CpuLinear do it: RMSNorm into xn, gate
    and up and their SiLU into gate (gu: both matrices' arrays; on `parts` threads where pg), w2 into y."""
    _rmsnorm(x, g, eps, xn)
    if pg:
        _swiglu_parallel(kg, gu[0], gu[1], gu[2], gu[3], gu[4], gu[5], gu[6], gu[7], xn, s[0], s[1], gate, up, parts)
    else:
        _swiglu_serial(kg, gu[0], gu[1], gu[2], gu[3], gu[4], gu[5], gu[6], gu[7], xn, s[0], s[1], gate, up, parts)
    if pd:
        _linear_parallel(kd, d[0], d[1], d[2], d[3], gate, sd[0], sd[1], y)
    else:
        _linear_serial(kd, d[0], d[1], d[2], d[3], gate, sd[0], sd[1], y)


# the architectures whose halves `_attention_step` and `_ffn_step` do as Model does (another one: Model's way, until
# they do its arithmetic too and test_a_decode_steps_halves_in_one_call_give_the_bits_of_the_calls_one_by_one runs it)
ONE_CALL_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def _step_entry(fn, args, constants):
    """fn's entry point for arguments of these types, the parameters named in `constants` (the kernels' kinds and
    the flags) as compile-time constants (`cpu._entry`'s way and cache: compiled, or loaded from numba's cache,
    once per process)."""
    names = fn.py_func.__code__.co_varnames[:fn.py_func.__code__.co_argcount]

    def typed(a):
        ty = numba.typeof(a)
        return types.Tuple([_writable(t) for t in ty]) if isinstance(ty, types.BaseTuple) else _writable(ty)
    sig = tuple(types.literal(a) if name in constants else typed(a) for name, a in zip(names, args))
    if (fn, sig) not in _ENTRIES:
        _ENTRIES[fn, sig] = fn.compile(sig)
    return _ENTRIES[fn, sig]


class CpuModel(Model):
    """Model with its RMSNorm, RoPE, SiLU and attention as numba functions (the module's docstring).
    threads: the rank's (its backend's); a token's attention from PARALLEL_SCORES scores on splits its heads over
    them."""

    def __init__(self, *args, threads=1, **kw):
        super().__init__(*args, **kw)
        self.threads = threads
        self._xn = np.empty((1, self.cfg.dim), np.float32)  # a decode step's RMSNorm output (`_half`)
        self._att = np.empty((1, self.share.n_heads * self.cfg.head_dim), np.float32)  # its attention output
        self._one_call = {}  # (layer, half) -> `_step` (None: Model's way)
        self._compile()

    def _compile(self):
        """Compile the functions for the argument types they get (or load them from numba's cache) at load, so that
        the first tokens do not wait for it."""
        f32 = np.float32
        x, cache = np.ones((1, LANES), f32), kernel_view(np.zeros((1, 1, LANES), self.cache.dtype))
        _rmsnorm(x, x[0], f32(1.0), x.copy())
        _rotate(np.zeros((1, 1, 2), f32), x[:, :1].copy(), x[:, :1].copy(), self.rope.neox)
        _silu(x.copy(), x)
        out = np.zeros(LANES, f32)
        _store_token(x, x, cache, cache.copy(), 0)
        _attend_one(x, cache, cache, 0, self.scale, out)  # (0 / 0: NaN, no error)
        s, row = np.zeros((1, 1, 1), f32), x.reshape(1, 1, LANES)
        _rows_attend(row, cache, cache, 0, self.scale, s, out.reshape(1, LANES))
        if self.threads > 1:
            _attend_parallel(x, cache, cache, 0, self.scale, out, 1)
            _rows_attend_parallel(row, cache, cache, 0, self.scale, s, out.reshape(1, LANES), 1)
        for lw in self.w.layers:  # the FFN's gate and up with their SiLU, for each pair of types it holds
            gate, up = lw.w1, lw.w3
            if getattr(gate, "cols", 0) and getattr(up, "rows", 0):
                swiglu((gate, up), np.zeros((1, gate.cols), f32),
                       (np.empty((1, gate.rows), f32), np.empty((1, up.rows), f32)), compile_only=True)
        for layer, half in stage_schedule(self.share.layer_ids):  # a decode step's halves, one call each (a
            lw = self.w.layer(layer)  # streamed half's arrays come with the window's start: at its first step)
            if all(getattr(getattr(lw, field), "arrays", None) is not None for field in half_fields(half)):
                self._one_call[layer, half] = self._step(layer, half, lw)

    def close(self):
        """Also drop the halves' calls: their argument functions refer back to this model, a cycle that kept every
        model a migration replaced until Python's occasional full collection (a rank grew by its weights a move)."""
        self._one_call.clear()
        super().close()

    def _half(self, layer, half, lw, x, segments, rope, buf):
        """A decode step of one token: the half in one compiled call (`_attention_step`, `_ffn_step`) where its
        matrices allow, the same functions in the same order as Model's calls one at a time, without Python between
        them (TinyLlama Q4_0 tokens 3-7% faster on 2 cores, 8-19% on 16); otherwise Model's way."""
        if x.shape[0] == 1 and x.dtype == np.float32 and x.flags.c_contiguous:
            if (layer, half) not in self._one_call:
                self._one_call[layer, half] = self._step(layer, half, lw)
            step = self._one_call[layer, half]
            if step is not None:
                entry, args = step
                entry(*args(lw, x, segments[0], buf))
                return buf["proj"]
        return super()._half(layer, half, lw, x, segments, rope, buf)

    def _step(self, layer, half, lw):
        """(entry point, args(lw, x, segment, buf)) of a half's one call, compiled (or loaded from numba's cache)
        now; None where the half cannot take it: no heads or FFN rows here, a slice that cut blocks, head_dim not
        whole 16-lanes, q, k, v of three types, a float wo / w2 where the partial sums are exact (int8), or an
        architecture not in ONE_CALL_ARCHITECTURES."""
        cfg, share = self.cfg, self.share
        if cfg.arch not in ONE_CALL_ARCHITECTURES:
            return None
        exact = self.partial_dtype == np.float64
        eps = np.float32(cfg.norm_eps)

        def whole(lin, cols):
            return isinstance(lin, CpuLinear) and lin.spread is None and lin.rows > 0 and lin.cols == cols

        def arrays(lins):
            return tuple(a for lin in lins for a in lin.arrays)

        if half == "attention":
            hd = cfg.head_dim
            qkv = (("wq", "q"), ("wk", "k"), ("wv", "v"))
            if (not share.n_kv or hd % LANES or not all(whole(getattr(lw, w), cfg.dim) for w, _ in qkv)
                    or not whole(lw.wo, share.n_heads * hd) or lw.wo.int8 != exact):
                return None
            kind = lambda w: (getattr(lw, w).qtype, getattr(lw, w).int8)  # noqa: E731
            ga = [(w, y) for w, y in qkv if kind(w) == kind("wq")]
            gb = [(w, y) for w, y in qkv if kind(w) != kind("wq")]
            if len({kind(w) for w, _ in gb}) > 1:
                return None
            none = np.empty((1, 0), np.float32)

            def group(lw, buf, names):  # (kind, arrays, scratch, results, parallel) of one `_linears_*` call
                lins = [getattr(lw, w) for w, _ in names]
                padded = (lins + lins[-1:] * 2)[:3]
                ys = tuple(([buf[y] for _, y in names] + [none, none])[:3])
                return int(lins[0].qtype), arrays(padded), lins[0]._one[:2], ys, on_threads(lins)

            def args(lw, x, seg, buf, caches=None):
                a = group(lw, buf, ga)
                b = group(lw, buf, gb) if gb else a[:3] + ((none, none, none), False)
                ck, cv = caches or [kernel_view(c) for c in self.cache.layer(seg.slot, layer)]
                parts = min(self.threads, share.n_heads)
                if share.n_heads * (seg.pos + 1) < PARALLEL_SCORES:
                    parts = 1
                biases = (lw.bq, lw.bk, lw.bv) if lw.bq is not None else (none[0],) * 3
                norms = (lw.q_norm, lw.k_norm) if lw.q_norm is not None else (none[0],) * 2
                wo = lw.wo
                return (x, lw.attn_norm, eps, self._xn, *a, *b, bool(gb), biases, lw.bq is not None, norms,
                        lw.q_norm is not None, buf["q"], buf["k"], buf["v"], hd, self.rope.cos[seg.pos:seg.pos + 1],
                        self.rope.sin[seg.pos:seg.pos + 1], self.rope.neox, ck, cv, seg.pos, self.scale, parts,
                        self._att, int(wo.qtype), wo.arrays, wo._one[:2], buf["proj"], on_threads((wo,)))

            fn, constants = _attention_step, ("ka", "pa", "kb", "pb", "second", "biased", "normed", "ko", "po")
            dummy = kernel_view(np.zeros((1, 1, hd), self.cache.dtype))
            typed = args(lw, self._xn, Segment(0, 0, 1), self._buffers(1), (dummy, dummy))
        else:
            gate, up, down = lw.w1, lw.w3, lw.w2
            if (not whole(gate, cfg.dim) or not whole(up, cfg.dim) or not whole(down, gate.rows)
                    or (gate.qtype, gate.int8, gate.rows) != (up.qtype, up.int8, up.rows) or down.int8 != exact):
                return None

            def args(lw, x, seg, buf):
                gate, up, down = lw.w1, lw.w3, lw.w2
                return (x, lw.ffn_norm, eps, self._xn, int(gate.qtype), arrays((gate, up)), gate._one[:2],
                        buf["gate"], buf["up"], gate.threads, on_threads((gate, up)), int(down.qtype), down.arrays,
                        down._one[:2], buf["proj"], on_threads((down,)))

            fn, constants = _ffn_step, ("kg", "pg", "kd", "pd")
            typed = args(lw, self._xn, Segment(0, 0, 1), self._buffers(1))
        return _step_entry(fn, typed, constants), args

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

    def _swiglu(self, linears, x, outs):
        return swiglu(linears, x, outs)

    def _attend_rows(self, q, pos, ck, cv):
        """A prompt's rows (Model._attend, ATTEND_ROWS at a time), each as a one-token step attends: the same bits
        as that step, whether the prompt came in one pass or a token at a time."""
        if self.cfg.head_dim % LANES:
            return super()._attend_rows(q, pos, ck, cv)
        m, heads = q.shape[0], q.shape[1]
        parts = min(self.threads, m)
        s = np.empty((m, heads, pos + m), np.float32)
        out = np.empty((m, heads * self.cfg.head_dim), np.float32)
        ck, cv = kernel_view(ck), kernel_view(cv)
        if parts > 1:  # (one thread: no parallel region, which ranks sharing cores wait on)
            _rows_attend_parallel(q, ck, cv, pos, self.scale, s, out, parts)
        else:
            _rows_attend(q, ck, cv, pos, self.scale, s, out)
        return out

    def _attend(self, layer, seg, q, k, v, out):
        if seg.n > 1 or self.cfg.head_dim % LANES or not self.share.n_kv:  # a prompt (`_attend_rows`), or no heads
            return super()._attend(layer, seg, q, k, v, out)
        ck, cv = (kernel_view(c) for c in self.cache.layer(seg.slot, layer))
        _store_token(k[0], v[0], ck, cv, seg.pos)
        parts = min(self.threads, q.shape[1])
        if parts > 1 and q.shape[1] * (seg.pos + 1) >= PARALLEL_SCORES:
            _attend_parallel(q[0], ck, cv, seg.pos, self.scale, out[0], parts)
        else:
            _attend_one(q[0], ck, cv, seg.pos, self.scale, out[0])

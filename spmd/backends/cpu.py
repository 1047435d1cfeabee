"""The fast CPU backend: weights stay quantised in memory, numba kernels with explicit SIMD, prange over rows.

The inner loops are LLVM vector IR written through numba intrinsics (`_make_dot`): plain numba loops widen small
integers to int64 and did not vectorise (0.5-3 GB/s on Q4_0, measured); these decode (n = 1) at 25-45 GB/s of
weights on the 2-core test machine, memory-bound with both cores (17-30 GB/s on one core).

Activations stay float32 for every weight type: the weights are converted to float32 in registers and the products
are summed in float32 with fused multiply-adds, so the output is the float product to within float32 rounding, and a
tiny change in the activations (another order of a partial sum across ranks) makes a tiny change in the output.
(Quantising the activations to int8 per block and using integer dot products, as llama.cpp does, made the output
jump wherever such a change moved an activation across an int8 rounding boundary: after 22 layers the logits at 1
and 2 ranks differed by ~0.05 and greedy tokens changed with the rank count. Those kernels were removed: measured in
one process against them on the TinyLlama shapes, these decode at about their GB/s from memory (0.93-1.27 of it with
both cores, 0.75-1.35 on one, a noisy machine), but from cache they were ~1.6x faster on Q4_0 and ~1.3x on Q8_0 (one
vpdpbusd per 64 products), so where memory is faster per core the gap shows; prompts (n = 64) run at 0.7-1.0 of
their speed, bound by one fused multiply-add per 16 products.)

Layouts, made once at load (`_REPACK`); cols are padded with zeros to a multiple of 128 (Q4_0, Q8_0) or 64 (floats):
  Q4_0  w  uint8   (rows, cols/2)    per 128-element group, 64 bytes = 16 little-endian dwords: nibble v (bits
                                     4v..4v+3) of dword l is element 8l + v, unsigned 0..15 (value = nibble - 8);
                                     that is, byte e holds element 2e (low nibble) and 2e + 1 (high nibble)
  Q8_0  w  int8    (rows, cols)      per 128-element group, byte 16v + l is element 8l + v
        wd uint16  (rows, cols/32)   float16 bits of one scale per 32-element block (Q4_0 and Q8_0)
  F32 / F16 / BF16   w float32 / int16 / uint16 (rows, cols): numba has no float16, so F16 keeps its bits as
                     int16, which also tells its kernel apart from BF16's uint16

Quantised kernels: lane l (of 16) of a 128-element group owns elements 8l..8l+7, all in block l // 4. For v = 0..7
the kernel turns element 8l + v of every lane into its integer as float32 (Q4_0: a shift puts nibble v of each dword
in the low 4 bits and vpermps looks it up in the 16-entry table -8..7; Q8_0: 16 bytes sign-extended and converted)
and fused-multiply-adds it with x[8l + v] into the lane's sum s (v = 0 multiplies); then acc += the lane's block
scale * s, one more fused multiply-add. Each of these rounds once, as a float dot product does. The activations are
copied once per call into the same transposed order (scratch (n, padded cols) float32), so x[8l + v] of the 16 lanes
is one load. Float kernels convert 16 weights at a time to float32 and fused-multiply-add them, in 2 accumulators.

The kernels work on tiles of 2 weight rows x 4 activation rows (x 8 for quantised weights where AVX-512 has the
registers, x 2 for a pair left over), so a prompt's or a batched decode step's weight loads and conversions serve
several activation rows; the activation row left over (decode's one) goes past 4 weight rows at a time, or 8 for
Q4_0 rows of over LONG = 4096 elements, whose activations (4 bytes an element against the weights' 0.56) then no
longer stay in L1 beside the weights (8 measured 17-29% faster than 4 on one core at 2048 x 5632; for Q8_0 and
shorter rows, as fast or slower). prange runs over blocks of 16 weight rows, whose weights stay in cache while
every activation tile goes past them. Each weight row is prefetched at the same place in the next tile's rows (rows
are contiguous: nw rows ahead), which is where the kernel goes next.

Every (weight row, activation row) dot product runs the same instructions in the same order whatever the tile, the
row range held, the thread partition or the batch size, so results are bit-identical across those (the tests hold
this). No fast-math: llvm.fma rounds once on any CPU (an instruction where there is one), so the results do not
depend on the CPU either: without AVX-512, or with SPMD_CPU_GENERIC=1, Q4_0 nibbles are converted with plain LLVM
vector code (mask, integer to float, minus 8) to the same exact values as vpermps's table.
"""
import os

import numba
import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic, overload

from ..quants import QTensor, quantize
from . import Backend, prepare_call

# vpermps (AVX-512F) turns Q4_0 nibbles into floats where numba compiles for it (the host's features, or
# NUMBA_CPU_FEATURES); SPMD_CPU_GENERIC=1 forces the portable LLVM vector code every other CPU gets (same results;
# numba's cache does not see this switch, so use a fresh NUMBA_CACHE_DIR).
_FEATURES = numba.config.CPU_FEATURES if numba.config.CPU_FEATURES is not None else get_host_cpu_features()
AVX512 = "+avx512f" in _FEATURES.split(",") and not os.environ.get("SPMD_CPU_GENERIC")
GROUP = 128  # quantised kernels: elements per loop step (4 blocks, 16 lanes of 8)
CHUNK = 64  # float kernels: elements per loop step
ROW_BLOCK = 16  # weight rows per parallel work item; activation rows go through 4 at a time
LONG = 4096  # Q4_0 rows longer than this go 8 at a time past a leftover activation row (see the docstring)
SMALL = 1 << 17  # weights below this many bytes run on one thread (a fork-join costs more than it saves)

# ---- LLVM IR helpers ------------------------------------------------------------------------------------------
I8, I16, I32, F16, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.HalfType(), ir.FloatType()


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(t, value, n):
    return ir.Constant(_vec(t, n), [ir.Constant(t, value)] * n)


def _shuffle(b, v, idx):
    idx = list(idx)
    return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(_vec(I32, len(idx)), idx))


def _load(b, base, offset, ty):
    return b.load(b.bitcast(b.gep(base, [offset]), ty.as_pointer()), align=1)


def _prefetch(b, base, offset):
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer()] + [I32] * 3),
                                        "llvm.prefetch.p0")
    b.call(fn, [b.gep(base, [offset]), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def _hsum(b, v):
    """Sum of 16 float lanes in a fixed tree order."""
    n = 16
    while n > 1:
        n //= 2
        v = b.fadd(_shuffle(b, v, range(n)), _shuffle(b, v, range(n, 2 * n)))
    return b.extract_element(v, ir.Constant(I32, 0))


def _fma(b, x, y, acc):
    """x * y + acc rounded once: llvm.fma is exact everywhere (an instruction where the CPU has FMA)."""
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(x.type, [x.type] * 3), "llvm.fma.v16f32")
    return b.call(fn, [x, y, acc])


def _to_f32(b, ptr, offset, dtype):
    """16 weights of a float type at byte `offset` -> 16 x float."""
    if dtype == types.float32:
        return _load(b, ptr, offset, _vec(F32, 16))
    if dtype == types.int16:  # float16 bits
        return b.fpext(_load(b, ptr, offset, _vec(F16, 16)), _vec(F32, 16))
    bits = b.shl(b.zext(_load(b, ptr, offset, _vec(I16, 16)), _vec(I32, 16)), _splat(I32, 16, 16))  # bfloat16
    return b.bitcast(bits, _vec(F32, 16))


_NIBBLE_VALUES = ir.Constant(_vec(F32, 16), [ir.Constant(F32, float(n - 8)) for n in range(16)])


def _nibbles_to_f32(b, dw, v):
    """Nibble v of each of the 16 dwords dw, minus 8, as 16 x float (exact)."""
    idx = b.lshr(dw, _splat(I32, 4 * v, 16)) if v else dw
    if AVX512:  # vpermps: the table entry at the low 4 bits of each index
        fnty = ir.FunctionType(_vec(F32, 16), [_vec(F32, 16), _vec(I32, 16)])
        fn = cgutils.get_or_insert_function(b.module, fnty, "llvm.x86.avx512.permvar.sf.512")
        return b.call(fn, [_NIBBLE_VALUES, idx])
    return b.fsub(b.uitofp(b.and_(idx, _splat(I32, 15, 16)), _vec(F32, 16)), _splat(F32, 8.0, 16))


class _Arg:
    """A 2-D array argument seen from IR: byte pointer to row i, and the row length."""

    def __init__(self, context, b, ty, value):
        a = context.make_array(ty)(context, b, value)
        self.b, self.data = b, b.bitcast(a.data, I8.as_pointer())
        self.stride = cgutils.unpack_tuple(b, a.strides)[0]
        self.cols = cgutils.unpack_tuple(b, a.shape)[1]

    def row(self, i):
        return self.b.gep(self.data, [self.b.mul(i, self.stride)])


# ---- the kernels' loop steps ----------------------------------------------------------------------------------
def _quantised_step(b, g, pws, pds, pxs, dtype, accs, ahead):
    """One 128-element group of every (Q4_0 / Q8_0 weight row j, activation row k) pair into accs[j][k][0]: lane l
    sums weight integer times x over elements 8l..8l+7 (v = 0..7), then adds its block's scale times that sum."""
    c = lambda v: ir.Constant(g.type, v)  # noqa: E731
    nbytes = GROUP // 2 if dtype == types.uint8 else GROUP
    base = b.mul(g, c(nbytes))
    weights, scales = [], []
    for pw, pd in zip(pws, pds):
        for line in range(nbytes // 64):
            _prefetch(b, pw, b.add(base, b.add(ahead, c(64 * line))))
        sd = b.fpext(_load(b, pd, b.mul(g, c(8)), _vec(F16, 4)), _vec(F32, 4))  # the group's 4 block scales
        scales.append(_shuffle(b, sd, [lane // 4 for lane in range(16)]))
        if dtype == types.uint8:  # Q4_0: nibble v of dword l
            weights.append(lambda v, dw=_load(b, pw, base, _vec(I32, 16)): _nibbles_to_f32(b, dw, v))
        else:  # Q8_0: byte l of the 16 at 16v
            weights.append(lambda v, pw=pw: b.sitofp(_load(b, pw, b.add(base, c(16 * v)), _vec(I8, 16)),
                                                     _vec(F32, 16)))
    sums = [[None] * len(pxs) for _ in pws]
    for v in range(GROUP // 16):
        ws = [weight(v) for weight in weights]
        for k, xs in enumerate(pxs):
            xv = _load(b, xs, b.add(b.mul(g, c(GROUP * 4)), c(64 * v)), _vec(F32, 16))
            for j, wv in enumerate(ws):
                sums[j][k] = b.fmul(wv, xv) if v == 0 else _fma(b, wv, xv, sums[j][k])
    for j, scale in enumerate(scales):
        for k in range(len(pxs)):
            acc = accs[j][k][0]
            b.store(_fma(b, scale, sums[j][k], b.load(acc)), acc)


def _float_step(b, g, pws, pds, pxs, dtype, accs, ahead):
    """One 64-element chunk of every (float weight row j, activation row k) pair: its 16-element vector v goes into
    accs[j][k][v % 2] with one fused multiply-add."""
    c = lambda v: ir.Constant(g.type, v)  # noqa: E731
    size = {types.float32: 4}.get(dtype, 2)
    base = b.mul(g, c(CHUNK * size))
    for pw in pws:
        for line in range(size):
            _prefetch(b, pw, b.add(base, b.add(ahead, c(64 * line))))
    for v in range(CHUNK // 16):
        ws = [_to_f32(b, pw, b.add(base, c(16 * size * v)), dtype) for pw in pws]
        for k, xs in enumerate(pxs):
            xv = _load(b, xs, b.add(b.mul(g, c(CHUNK * 4)), c(64 * v)), _vec(F32, 16))
            for j, wv in enumerate(ws):
                acc = accs[j][k][v % 2]
                b.store(_fma(b, wv, xv, b.load(acc)), acc)


def _make_dot(nw, nx):
    """Intrinsic dot(w, wd, r0, xs, i0, y): y[i0 + k, r0 + j] = weight row r0 + j . activation row i0 + k for j < nw,
    k < nx (xs: the prepared activations). Each pair gets the same instructions in the same order whatever nw, nx."""

    @intrinsic
    def dot(typingctx, w, wd, r0, xs, i0, y):
        if w.dtype not in (types.uint8, types.int8, types.float32, types.int16, types.uint16):
            return None
        quantised = w.dtype in (types.uint8, types.int8)
        step, size, naccs = (_quantised_step, GROUP, 1) if quantised else (_float_step, CHUNK, 2)

        def codegen(context, b, sig, args):
            W, D, X, Y = (_Arg(context, b, sig.args[k], args[k]) for k in (0, 1, 3, 5))
            r0, i0 = args[2], args[4]
            c = lambda v: ir.Constant(r0.type, v)  # noqa: E731
            wrows = [b.add(r0, c(j)) for j in range(nw)]
            xrows = [b.add(i0, c(k)) for k in range(nx)]
            zero = ir.Constant(_vec(F32, 16), None)
            accs = [[[cgutils.alloca_once_value(b, zero) for _ in range(naccs)] for _ in xrows] for _ in wrows]
            ahead = b.mul(W.stride, c(nw))  # the same place in the next tile's rows
            with cgutils.for_range(b, b.udiv(X.cols, c(size))) as loop:
                step(b, loop.index, [W.row(r) for r in wrows], [D.row(r) for r in wrows], [X.row(i) for i in xrows],
                     w.dtype, accs, ahead)
            for r, acc_j in zip(wrows, accs):
                for i, acc in zip(xrows, acc_j):
                    total = b.load(acc[0]) if naccs == 1 else b.fadd(b.load(acc[0]), b.load(acc[1]))
                    b.store(_hsum(b, total), b.bitcast(b.gep(Y.row(i), [b.mul(r, c(4))]), F32.as_pointer()))
            return context.get_dummy_value()

        return types.void(w, wd, r0, xs, i0, y), codegen

    return dot


_dot11, _dot21, _dot41, _dot81, _dot12, _dot22, _dot14, _dot24, _dot18, _dot28 = (
    _make_dot(nw, nx) for nw, nx in ((1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (1, 4), (2, 4), (1, 8), (2, 8)))


# ---- the kernels ----------------------------------------------------------------------------------------------
def _prepare(w, x, xs):
    """Activations x (n, cols) -> the kernels' order in scratch xs (n, padded cols); the padding stays zero."""


@overload(_prepare)
def _prepare_impl(w, x, xs):
    if w.dtype in (types.uint8, types.int8):
        def transpose(w, x, xs):  # per group, element 8l + v to 16v + l
            for i in range(x.shape[0]):
                for e in range(0, x.shape[1], 8):
                    at = e - e % GROUP + (e % GROUP) // 8
                    for v in range(8):
                        xs[i, at + 16 * v] = x[i, e + v]
        return transpose

    def copy(w, x, xs):
        for i in range(x.shape[0]):
            for e in range(x.shape[1]):
                xs[i, e] = x[i, e]
    return copy


@njit(cache=True)
def _row_block(w, wd, xs, y, r0, r1):
    """y[:, r0:r1] from prepared activations: in tiles of 2 weight rows x 8 activation rows (quantised weights
    with AVX-512's 32 registers), x 4, x 2, then 4 (or 8) x 1."""
    n = y.shape[0]
    eight = 2 * w.shape[1] == xs.shape[1] and xs.shape[1] > LONG  # Q4_0 (2 elements a byte), long rows
    wide = AVX512 and wd.shape[1] > 1  # quantised (floats have no scales): one accumulator a pair
    i = 0
    while wide and i + 8 <= n:
        for r in range(r0, r1 - 1, 2):
            _dot28(w, wd, r, xs, i, y)
        if (r1 - r0) % 2:
            _dot18(w, wd, r1 - 1, xs, i, y)
        i += 8
    while i + 4 <= n:
        for r in range(r0, r1 - 1, 2):
            _dot24(w, wd, r, xs, i, y)
        if (r1 - r0) % 2:
            _dot14(w, wd, r1 - 1, xs, i, y)
        i += 4
    if i + 2 <= n:
        for r in range(r0, r1 - 1, 2):
            _dot22(w, wd, r, xs, i, y)
        if (r1 - r0) % 2:
            _dot12(w, wd, r1 - 1, xs, i, y)
        i += 2
    for i in range(i, n):
        r = r0
        while eight and r + 8 <= r1:
            _dot81(w, wd, r, xs, i, y)
            r += 8
        while r + 4 <= r1:
            _dot41(w, wd, r, xs, i, y)
            r += 4
        if r + 2 <= r1:
            _dot21(w, wd, r, xs, i, y)
            r += 2
        if r < r1:
            _dot11(w, wd, r, xs, i, y)


@njit(parallel=True, cache=True)
def _linear_parallel(w, wd, x, xs, y):
    """y (n, rows) = x (n, cols) @ W.T; xs: scratch (n, padded cols) float32."""
    _prepare(w, x, xs)
    rows = y.shape[1]
    for blk in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        _row_block(w, wd, xs, y, blk * ROW_BLOCK, min(rows, (blk + 1) * ROW_BLOCK))


@njit(cache=True)
def _linear_serial(w, wd, x, xs, y):
    _prepare(w, x, xs)
    rows = y.shape[1]
    for r0 in range(0, rows, ROW_BLOCK):
        _row_block(w, wd, xs, y, r0, min(rows, r0 + ROW_BLOCK))


# ---- load-time repacking --------------------------------------------------------------------------------------
def _pad(n, unit):
    return -(-n // unit) * unit


def _scales(blocks, rows, nb, padded_cols):
    wd = np.zeros((rows, padded_cols // 32), np.uint16)
    wd[:, :nb] = blocks[:, :, :2].copy().view(np.uint16)[:, :, 0]
    return wd


def _repack_q4(qt):
    rows, nb, cp = qt.rows, qt.cols // 32, _pad(qt.cols, GROUP)
    blocks = qt.data.reshape(rows, nb, 18)
    q = np.full((rows, cp // 32, 32), 8, np.uint8)  # nibbles by element (stored: byte j = elements j, 16 + j)
    q[:, :nb, :16], q[:, :nb, 16:] = blocks[:, :, 2:] & 15, blocks[:, :, 2:] >> 4  # pad = value 0
    q = q.reshape(rows, cp)
    return q[:, 0::2] | (q[:, 1::2] << 4), _scales(blocks, rows, nb, cp)


def _repack_q8(qt):
    rows, nb, cp = qt.rows, qt.cols // 32, _pad(qt.cols, GROUP)
    blocks = qt.data.reshape(rows, nb, 34)
    q = np.zeros((rows, cp), np.int8)
    q[:, :qt.cols] = blocks[:, :, 2:].view(np.int8).reshape(rows, qt.cols)
    q = q.reshape(rows, cp // GROUP, 16, 8).transpose(0, 1, 3, 2)  # per group, element 8l + v to 16v + l
    return np.ascontiguousarray(q).reshape(rows, cp), _scales(blocks, rows, nb, cp)


def _repack_float(dtype):
    def repack(qt):
        w = np.zeros((qt.rows, _pad(qt.cols, CHUNK)), dtype)
        w[:, :qt.cols] = qt.data.view(dtype)  # the same bits
        return w, _NO_SCALES
    return repack


_NO_SCALES = np.zeros((1, 1), np.uint16)
_REPACK = {T.Q4_0: _repack_q4, T.Q8_0: _repack_q8, T.F32: _repack_float(np.float32),
           T.F16: _repack_float(np.int16), T.BF16: _repack_float(np.uint16)}
QUANTISED = (T.Q4_0, T.Q8_0)


class CpuLinear:
    def __init__(self, w: QTensor, threads: int):
        if w.qtype not in _REPACK:
            raise ValueError(f"cpu backend: no kernel for {w.qtype.name}")
        self.qtype, self.rows, self.cols = w.qtype, w.rows, w.cols
        self.w, self.wd = _REPACK[w.qtype](w)  # (rows, padded cols [/2]), (rows, padded cols / 32) or dummy
        self.nbytes = self.w.nbytes + (self.wd.nbytes if w.qtype in QUANTISED else 0)
        self._kernel = _linear_parallel if threads > 1 and self.nbytes >= SMALL else _linear_serial
        self._one = self._scratch(1)  # the decode path's scratch, reused every call

    def _scratch(self, n):
        return np.zeros((n, _pad(self.cols, GROUP if self.qtype in QUANTISED else CHUNK)), np.float32)

    def __call__(self, x: np.ndarray, out: np.ndarray = None) -> np.ndarray:
        x, out, done = prepare_call(self, x, out)
        if done:
            return out
        n = x.shape[0]
        y = out if out.dtype == np.float32 and out.flags.c_contiguous else np.empty((n, self.rows), np.float32)
        self._kernel(self.w, self.wd, x, self._one if n == 1 else self._scratch(n), y)
        if y is not out:
            out[...] = y
        return out


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, threads: int = None):
        """threads: 1 runs every kernel on the calling thread (for ranks that share a machine's cores); otherwise
        large matrices use numba's thread pool (numba.set_num_threads / NUMBA_NUM_THREADS set its size)."""
        self.threads = min(threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
        if self.threads > 1:
            numba.set_num_threads(self.threads)
        self.description = f"cpu (numba, {self.threads} thread{'s' * (self.threads != 1)})"

    def linear(self, w: QTensor) -> CpuLinear:
        return CpuLinear(w, self.threads)

    def warmup(self):
        """Compile (or load from numba's cache) every kernel, so that the first token is not slower."""
        kernels = (_linear_serial, _linear_parallel) if self.threads > 1 else (_linear_serial,)
        for qtype in _REPACK:
            lin = CpuLinear(quantize(np.ones((2, 32), np.float32), qtype), self.threads)
            for kernel in kernels:
                kernel(lin.w, lin.wd, np.ones((1, 32), np.float32), lin._scratch(1), np.empty((1, 2), np.float32))

"""The fast CPU backend: weights stay quantised in memory, numba kernels with explicit SIMD, prange over rows.

The inner loops are LLVM vector IR written through numba intrinsics (`_make_dot`): plain numba loops widen small
integers to int64 and did not vectorise (0.5-3 GB/s on Q4_0, measured); these read memory-bound, 30-40 GB/s.

Layouts, made once at load (`_REPACK`); cols are padded with zeros to a multiple of 128 (Q4_0, Q8_0) or 64 (floats):
  Q4_0  w  uint8   (rows, cols/2)    per 128-element group, 64 bytes: byte e holds element e (low nibble) and
                                     element 64+e (high nibble), unsigned 0..15 (value = nibble - 8)
  Q8_0  w  int8    (rows, cols)      as stored
        wd uint16  (rows, cols/32)   float16 bits of one scale per 32-element block (Q4_0 and Q8_0)
  F32 / F16 / BF16   w float32 / int16 / uint16 (rows, cols): numba has no float16, so F16 keeps its bits as
                     int16, which also tells its kernel apart from BF16's uint16

Quantised kernels (Q8_0 activations x Q4_0 or Q8_0 weights, as llama.cpp does): each activation row is quantised
per 32-block to int8 (xq, (n, cols)) with the block's scale repeated per 4 elements (xd, (n, cols/4)). A weight
byte vector (64 unsigned bytes; Q8_0 flipped to offset-binary w + 128) times 64 activation bytes gives 16 int32
lanes of 4 products each (one `vpdpbusd` where the CPU has AVX512-VNNI, else plain LLVM vector code with the same
exact integer result), starting from xo (n, cols/4) = -offset * (sum of the 4 activations), so the unsigned offset
cancels exactly. Each lane is converted to float and fused-multiply-added with weight scale * activation scale.
Float kernels convert 16 weights at a time to float32 and fused-multiply-add them. The kernels work on tiles of
2 weight rows x 4 activation rows (2 x 1 for decode), so a prompt's weight loads serve 4 activation rows; prange
runs over blocks of 16 weight rows, whose weights stay in cache while every activation tile goes past them.
Weights are prefetched 4 KB ahead.

Every (weight row, activation row) dot product runs the same instructions in the same order whatever the tile, the
row range held, the thread partition or the batch size, so results are bit-identical across those (the tests hold
this). No fast-math: llvm.fma rounds once on any CPU (an instruction where there is one), so the float results do
not depend on the CPU either, and the int8 products are exact.
Accuracy of the quantised path: each activation moves at most 1/254 of its 32-block's absolute maximum; against
the float reference the output's relative RMS error is about 0.55% for Gaussian activations (0.9% heavy-tailed),
its largest error about 0.6-0.9% of the largest output (the tests hold the exact bound and these figures).
"""
import os

import llvmlite.binding as llb
import numba
import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..quants import QTensor, quantize

# One vpdpbusd per 64 byte pairs where the CPU has AVX512-VNNI; SPMD_CPU_GENERIC=1 forces the portable LLVM vector
# code every other CPU gets (same results; numba's cache does not see this switch, so use a fresh NUMBA_CACHE_DIR).
VNNI = "avx512vnni" in llb.get_host_cpu_features().flatten() and not os.environ.get("SPMD_CPU_GENERIC")
GROUP = 128  # quantised kernels: elements per loop step (4 blocks)
CHUNK = 64  # float kernels: elements per loop step
ROW_BLOCK = 16  # weight rows per parallel work item; activation rows go through 4 at a time
PREFETCH = 4096  # bytes ahead in the weight stream
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


def _dpbusd(b, acc, u8, s8):
    """acc (16 x i32) + sums of 4 adjacent products of unsigned bytes u8 and signed bytes s8 (64 x i8 each)."""
    if VNNI:
        fnty = ir.FunctionType(_vec(I32, 16), [_vec(I32, 16)] * 3)
        fn = cgutils.get_or_insert_function(b.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
        return b.call(fn, [acc, b.bitcast(u8, _vec(I32, 16)), b.bitcast(s8, _vec(I32, 16))])
    p = b.sext(b.mul(b.zext(u8, _vec(I16, 64)), b.sext(s8, _vec(I16, 64))), _vec(I32, 64))  # |p| <= 255 * 128
    p = b.add(_shuffle(b, p, range(0, 64, 2)), _shuffle(b, p, range(1, 64, 2)))
    return b.add(acc, b.add(_shuffle(b, p, range(0, 32, 2)), _shuffle(b, p, range(1, 32, 2))))


def _to_f32(b, ptr, offset, dtype):
    """16 weights of a float type at byte `offset` -> 16 x float."""
    if dtype == types.float32:
        return _load(b, ptr, offset, _vec(F32, 16))
    if dtype == types.int16:  # float16 bits
        return b.fpext(_load(b, ptr, offset, _vec(F16, 16)), _vec(F32, 16))
    bits = b.shl(b.zext(_load(b, ptr, offset, _vec(I16, 16)), _vec(I32, 16)), _splat(I32, 16, 16))  # bfloat16
    return b.bitcast(bits, _vec(F32, 16))


class _Arg:
    """A 2-D array argument seen from IR: byte pointer to row i, and the row length."""

    def __init__(self, context, b, ty, value):
        a = context.make_array(ty)(context, b, value)
        self.b, self.data = b, b.bitcast(a.data, I8.as_pointer())
        self.stride = cgutils.unpack_tuple(b, a.strides)[0]
        self.cols = cgutils.unpack_tuple(b, a.shape)[1]

    def row(self, i):
        return self.b.gep(self.data, [self.b.mul(i, self.stride)])


def _fma(b, x, y, acc):
    """x * y + acc rounded once: llvm.fma is exact everywhere (an instruction where the CPU has FMA)."""
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(x.type, [x.type] * 3), "llvm.fma.v16f32")
    return b.call(fn, [x, y, acc])


def _quantised_step(b, g, pws, pds, pxs, dtype, accs):
    """One 128-element group of every (weight row j, activation row k) pair into accs[j][k][half]."""
    c = lambda v: ir.Constant(g.type, v)  # noqa: E731
    halves, scales = [], []
    for pw, pd in zip(pws, pds):
        if dtype == types.uint8:  # Q4_0: low nibbles are elements 0..63, high nibbles 64..127
            _prefetch(b, pw, b.add(b.mul(g, c(64)), c(PREFETCH)))
            v = _load(b, pw, b.mul(g, c(64)), _vec(I8, 64))
            halves.append([b.and_(v, _splat(I8, 15, 64)), b.lshr(v, _splat(I8, 4, 64))])
        else:  # Q8_0, flipped to offset binary: w + 128
            for h in range(2):
                _prefetch(b, pw, b.add(b.mul(g, c(128)), c(PREFETCH + 64 * h)))
            halves.append([b.xor(_load(b, pw, b.add(b.mul(g, c(128)), c(64 * h)), _vec(I8, 64)),
                                 _splat(I8, 0x80, 64)) for h in range(2)])
        sw = b.fpext(_load(b, pd, b.mul(g, c(8)), _vec(F16, 4)), _vec(F32, 4))  # the 4 blocks' weight scales
        scales.append([_shuffle(b, sw, [2 * h] * 8 + [2 * h + 1] * 8) for h in range(2)])  # 16 lanes of 4 each
    for k, (xq, xo, xd) in enumerate(pxs):
        for h in range(2):  # 64 elements = 2 blocks = 16 lanes of 4
            off = b.add(b.mul(g, c(128)), c(64 * h))
            q, o, d = (_load(b, p, off, t) for p, t in ((xq, _vec(I8, 64)), (xo, _vec(I32, 16)), (xd, _vec(F32, 16))))
            for j in range(len(pws)):
                isum = _dpbusd(b, o, halves[j][h], q)
                acc = accs[j][k][h]
                b.store(_fma(b, b.sitofp(isum, _vec(F32, 16)), b.fmul(scales[j][h], d), b.load(acc)), acc)


def _float_step(b, g, pws, pxs, dtype, accs):
    """One 64-element chunk of every (weight row j, activation row k) pair into accs[j][k][0 or 1]."""
    c = lambda v: ir.Constant(g.type, v)  # noqa: E731
    size = {types.float32: 4}.get(dtype, 2)
    ws = []
    for pw in pws:
        for line in range(size):
            _prefetch(b, pw, b.add(b.mul(g, c(CHUNK * size)), c(PREFETCH + 64 * line)))
        ws.append([_to_f32(b, pw, b.add(b.mul(g, c(CHUNK * size)), c(16 * size * v)), dtype) for v in range(4)])
    for k, (xf,) in enumerate(pxs):
        for v in range(4):
            xv = _load(b, xf, b.add(b.mul(g, c(CHUNK * 4)), c(64 * v)), _vec(F32, 16))
            for j in range(len(pws)):
                acc = accs[j][k][v % 2]
                b.store(_fma(b, ws[j][v], xv, b.load(acc)), acc)


def _make_dot(nw, nx):
    """Intrinsic dot(w, wd, r0, x, xo, xd, i0, y): y[i0 + k, r0 + j] = weight row r0 + j . activation row i0 + k
    for j < nw, k < nx. Each pair gets the same instructions in the same order whatever nw and nx are."""

    @intrinsic
    def dot(typingctx, w, wd, r0, x, xo, xd, i0, y):
        if w.dtype not in (types.uint8, types.int8, types.float32, types.int16, types.uint16):
            return None
        quantised = w.dtype in (types.uint8, types.int8)

        def codegen(context, b, sig, args):
            W, D, X, XO, XD, Y = (_Arg(context, b, sig.args[k], args[k]) for k in (0, 1, 3, 4, 5, 7))
            r0, i0 = args[2], args[6]
            c = lambda v: ir.Constant(r0.type, v)  # noqa: E731
            wrows = [b.add(r0, c(j)) for j in range(nw)]
            xrows = [b.add(i0, c(k)) for k in range(nx)]
            pxs = [(X.row(i), XO.row(i), XD.row(i)) if quantised else (X.row(i),) for i in xrows]
            zero = ir.Constant(_vec(F32, 16), None)
            accs = [[[cgutils.alloca_once_value(b, zero) for _ in range(2)] for _ in xrows] for _ in wrows]
            steps = b.udiv(X.cols, c(GROUP if quantised else CHUNK))
            with cgutils.for_range(b, steps) as loop:
                if quantised:
                    _quantised_step(b, loop.index, [W.row(r) for r in wrows], [D.row(r) for r in wrows], pxs,
                                    w.dtype, accs)
                else:
                    _float_step(b, loop.index, [W.row(r) for r in wrows], pxs, w.dtype, accs)
            for r, acc_j in zip(wrows, accs):
                for i, (a0, a1) in zip(xrows, acc_j):
                    p = b.bitcast(b.gep(Y.row(i), [b.mul(r, c(4))]), F32.as_pointer())
                    b.store(_hsum(b, b.fadd(b.load(a0), b.load(a1))), p)
            return context.get_dummy_value()

        return types.void(w, wd, r0, x, xo, xd, i0, y), codegen

    return dot


_dot11, _dot21, _dot14, _dot24 = _make_dot(1, 1), _make_dot(2, 1), _make_dot(1, 4), _make_dot(2, 4)


# ---- activations ----------------------------------------------------------------------------------------------
@njit(cache=True)
def _quantise_row(x, xq, xo, xd, offset):
    """x (cols,) -> xq int8 (cols,) per 32-block, and per 4 elements: xd the block's scale, xo -offset * their sum."""
    for blk in range(x.size // 32):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[blk * 32 + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        for j in range(blk * 8, blk * 8 + 8):
            s = 0
            for e in range(4 * j, 4 * j + 4):
                q = np.int32(np.rint(x[e] * inv))
                xq[e] = q
                s += q
            xo[j] = -offset * s
            xd[j] = d


def _prepare(w, x, xq, xo, xd):
    """Activations (n, cols) -> the kernel's input in the scratch arrays (padding stays zero)."""


@overload(_prepare)
def _prepare_impl(w, x, xq, xo, xd):
    if w.dtype in (types.uint8, types.int8):
        offset = 8 if w.dtype == types.uint8 else 128

        def quantise(w, x, xq, xo, xd):
            for i in range(x.shape[0]):
                _quantise_row(x[i], xq[i], xo[i], xd[i], offset)
        return quantise

    def copy(w, x, xq, xo, xd):
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                xq[i, j] = x[i, j]
    return copy


@njit(cache=True)
def _row_block(w, wd, xq, xo, xd, y, r0, r1):
    """y[:, r0:r1] from prepared activations, in tiles of 2 weight rows x 4 activation rows."""
    n = y.shape[0]
    for i in range(0, n - n % 4, 4):
        for r in range(r0, r1 - 1, 2):
            _dot24(w, wd, r, xq, xo, xd, i, y)
        if (r1 - r0) % 2:
            _dot14(w, wd, r1 - 1, xq, xo, xd, i, y)
    for i in range(n - n % 4, n):
        for r in range(r0, r1 - 1, 2):
            _dot21(w, wd, r, xq, xo, xd, i, y)
        if (r1 - r0) % 2:
            _dot11(w, wd, r1 - 1, xq, xo, xd, i, y)


@njit(parallel=True, cache=True)
def _linear_parallel(w, wd, x, xq, xo, xd, y):
    """y (n, rows) = x (n, cols) @ W.T; xq/xo/xd: scratch (see _prepare)."""
    _prepare(w, x, xq, xo, xd)
    rows = y.shape[1]
    for blk in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        _row_block(w, wd, xq, xo, xd, y, blk * ROW_BLOCK, min(rows, (blk + 1) * ROW_BLOCK))


@njit(cache=True)
def _linear_serial(w, wd, x, xq, xo, xd, y):
    _prepare(w, x, xq, xo, xd)
    rows = y.shape[1]
    for r0 in range(0, rows, ROW_BLOCK):
        _row_block(w, wd, xq, xo, xd, y, r0, min(rows, r0 + ROW_BLOCK))


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
    q = np.full((rows, cp // 32, 32), 8, np.uint8)  # nibbles by element, pad = value 0
    q[:, :nb, :16], q[:, :nb, 16:] = blocks[:, :, 2:] & 15, blocks[:, :, 2:] >> 4
    q = q.reshape(rows, cp // GROUP, 2, 64)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(rows, cp // 2), _scales(blocks, rows, nb, cp)


def _repack_q8(qt):
    rows, nb, cp = qt.rows, qt.cols // 32, _pad(qt.cols, GROUP)
    blocks = qt.data.reshape(rows, nb, 34)
    q = np.zeros((rows, cp), np.int8)
    q[:, :qt.cols] = blocks[:, :, 2:].view(np.int8).reshape(rows, qt.cols)
    return q, _scales(blocks, rows, nb, cp)


def _repack_float(dtype):
    def repack(qt):
        w = np.zeros((qt.rows, _pad(qt.cols, CHUNK)), dtype)
        w[:, :qt.cols] = qt.data.view(dtype)  # the same bits
        return w, _NO_SCALES
    return repack


_NO_SCALES = np.zeros((1, 1), np.uint16)
_NO_I32, _NO_F32 = np.zeros((1, 1), np.int32), np.zeros((1, 1), np.float32)
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
        cp = _pad(self.cols, GROUP if self.qtype in QUANTISED else CHUNK)
        if self.qtype in QUANTISED:
            return np.zeros((n, cp), np.int8), np.zeros((n, cp // 4), np.int32), np.zeros((n, cp // 4), np.float32)
        return np.zeros((n, cp), np.float32), _NO_I32, _NO_F32

    def __call__(self, x: np.ndarray, out: np.ndarray = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # (n, cols); no copy when it already is
        n = x.shape[0]
        if out is None:
            out = np.empty((n, self.rows), np.float32)
        if x.shape != (n, self.cols) or out.shape != (n, self.rows):  # the kernels do not check bounds
            raise ValueError(f"linear {self.rows}x{self.cols}: x {x.shape}, out {out.shape}")
        if self.rows == 0 or n == 0:
            return out
        if self.cols == 0:
            out[...] = 0.0
            return out
        y = out if out.dtype == np.float32 and out.flags.c_contiguous else np.empty((n, self.rows), np.float32)
        self._kernel(self.w, self.wd, x, *(self._one if n == 1 else self._scratch(n)), y)
        if y is not out:
            out[...] = y
        return out


class CpuBackend:
    name = "cpu"

    def __init__(self, threads: int = None):
        """threads: 1 runs every kernel on the calling thread (for ranks that share a machine's cores); otherwise
        large matrices use numba's thread pool (numba.set_num_threads / NUMBA_NUM_THREADS set its size)."""
        self.threads = min(threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
        if self.threads > 1:
            numba.set_num_threads(self.threads)

    def linear(self, w: QTensor) -> CpuLinear:
        return CpuLinear(w, self.threads)

    def warmup(self):
        """Compile (or load from numba's cache) every kernel, so that the first token is not slower."""
        kernels = (_linear_serial, _linear_parallel) if self.threads > 1 else (_linear_serial,)
        for qtype in _REPACK:
            lin = CpuLinear(quantize(np.ones((2, 32), np.float32), qtype), self.threads)
            for kernel in kernels:
                kernel(lin.w, lin.wd, np.ones((1, 32), np.float32), *lin._scratch(1), np.empty((1, 2), np.float32))

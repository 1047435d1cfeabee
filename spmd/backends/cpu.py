"""The fast CPU backend: weights stay quantised in memory, numba kernels with explicit SIMD, prange over rows.

The inner loops are LLVM vector IR written through numba intrinsics (`_make_dot`): plain numba loops widen small
integers to int64 and did not vectorise (0.5-3 GB/s on Q4_0, measured); these decode (n = 1) at 20-35 GB/s of
weights on the 2-core test machine (Q4_0 about 16 GB/s a core: its conversion binds, not memory).

By default (--activations f32) activations stay float32 for every weight type: the weights are converted to
float32 in registers and the products are summed in float32 with fused multiply-adds, so the output is the float
product to within float32 rounding, and a tiny change in the activations (another order of a partial sum across
ranks) makes a tiny change in the output.

--activations int8 (every quantised type but Q2_K: `INT8`; F32, F16, BF16 and Q2_K keep float activations) does what
llama.cpp does: each 32 activations become int8 with d_x = amax / 127 (`_prepare_int8`), and vpdpbusd sums 64 byte
products at once (`_int8_step`; plain LLVM integer code where the CPU lacks it, the same integers): eight of them
give each of 16 lanes the integer dot product of its 32 elements, a block or sub-block with one scale (Q6_K: four,
for its 16-element sub-blocks), so the float work (a conversion, the lane's d_w * d_x, a multiply-add) comes once
per scale. That alone would make the output jump wherever another order of a partial sum moved an activation across
an int8 rounding boundary (after 22 layers the logits at 1 and 2 ranks differed by ~0.05 and greedy tokens changed
with the rank count: why such kernels were once removed). So the products that are split by columns across ranks,
whose partial sums the stage adds up (wo and w2: the model asks for a float64 result), are summed exactly: each
lane's products are exact in int32, times d_w * d_x * 2^FIXED in float32 (K-quants: d_w = d * sc; Q4_K and Q5_K add
the lane's min term, dmin * m times the sum of its activations times d_x * 2^FIXED; Q4_1 and Q5_1 their block's m),
cut to an integer and summed in int64, then scaled back, exact in float64 below 2^25 in value. Those partial sums
add up to the same bits in any order and at any split (the allreduce sums float64 in int8 runs), so every rank
count, ratio and stage layout gives the same bits (a float matrix (F16, BF16, F32) sums in float32 as with
--activations f32: its partial sums are not exact). Products split by rows (q, k, v, gate, up, the classifier) need
no such care (a row is computed whole, in one order) and fused-multiply-add each lane's product into a float32 sum
(the fast sums). Lanes of 16 elements (the first version had lanes of 8: twice the float work) made a 64-token
prompt 1.3-1.4x faster end to end (TinyLlama shape, 2 cores: Q4_0 119 -> 159 tok/s, Q4_K_M 99 -> 142); lanes of 32
then made the exact sums 1.3-1.55x faster for prompts and 1.4x for decode (per matrix, against lanes of 16), within
0.9-1.2x of the fast sums' time.

Layouts, made once at load (`_repack_quantised`, `_repack_float`) from the file's blocks (`spmd.quants.unpack`);
four arrays a matrix (w, wh, wd, ws; a type without one gets a 1x1 dummy), rows padded with zeros to a multiple of
128 elements (K-quants: 256) or 64 (floats). `FORMATS` says what each quantised type has:
  w   4-bit types   uint8 (rows, cols/2): per 128-element group, 64 bytes = 16 little-endian dwords: nibble v (bits
                    4v..4v+3) of dword l is element 8l + v; that is, byte e holds elements 2e (low) and 2e + 1 (high);
                    Q2_K and Q3_K too, their 2- and 3-bit integers in nibbles
      Q8_0          int8 (rows, cols): per 128-element group, byte 16v + l is element 8l + v
  wh  Q5_*, Q5_K    uint8 (rows, cols/8): bit v of byte 16g + l is the 5th bit of element 8l + v of group g
      Q6_K          uint16 (rows, cols/8): bits 2v..2v+1 of word 16g + l are the top two bits of that element
  wd  32-element    float16 bits: per group its 4 blocks' d, then (Q4_1, Q5_1) their 4 m
      K-quants      float16 bits: per 256-element super-block its d, then (Q4_K, Q5_K, Q2_K) minus its dmin
  ws  K-quants      uint8 (rows, cols/16): per group its 4 sub-blocks' 6-bit scales then their 6-bit mins (Q4_K,
                    Q5_K), or its 8 int8 scales of 16 elements each (Q6_K, Q3_K); Q2_K (rows, cols/8): its 8
                    sub-blocks' 4-bit scales, then their 4-bit mins
  F32 / F16 / BF16  w float32 / int16 / uint16 (rows, cols): numba has no float16, so F16 keeps its bits as int16
The quantised types' four arrays then hold their rows in quads (`_interleave`, QUAD = 4; rows padded with zeros to
a multiple of 4): array row k holds rows 4k..4k+3 unit by unit, the four rows' units of group 0, then of group 1, ...
(a unit: what one row has of that array per 128-element group; wd of a K-quant, per super-block). A tile of 4 weight
rows then reads one contiguous stream instead of four short ones: decode measured 1.1-1.9x faster from memory on
the 2-core test machine (8-row interleaves with 8-row tiles, tried too, were 0.9-1.2x slower than 4).
With --activations int8, INT8's types are repacked for vpdpbusd instead (`_repack_int8`: the same bytes per
element, in quads whose unit is a group of 16 lanes, rows padded to a multiple of 512 elements, Q6_K 256). An element is
(integer - offset) * scale [+ min]: the integer is the nibble, with the high bits above it where the type has them;
the scale is d (times the sub-block's scale for K-quants), the min dmin times its m (K) or m.
Memory: the file's bytes (Q4_K 148 for 144, Q5_K 180 for 176: their packed 6-bit scales held as bytes), with
either activations, but for the padding (`held_bytes`; with int8, a row of 2816 columns holds 3072); Q2_K 164 for
84 (nibbles, and its 4-bit scales and mins as bytes), Q3_K 146 for 110 (nibbles, its 6-bit scales as bytes).
IQ4_NL is held as Q4_0 is, its nibbles indices into the file's table (`Format.table`: vpermps's table is its values;
without AVX-512, a select per entry), with either activations: the 8-bit kernels look each nibble up as its value +
128, an unsigned byte for vpdpbusd (`_table_bytes`: vpshufb; without AVX-512BW a select per entry), offset 128 as
Q8_0's.

Quantised kernels: lane l (of 16) of a 128-element group owns elements 8l..8l+7, all in sub-block l // 4 (Q6_K, Q2_K:
l // 2). For v = 0..7 the kernel turns element 8l + v of every lane into its integer as float32 (4-bit types: a shift
puts nibble v of each dword in the low 4 bits and vpermps looks it up in the 16-entry table of nibble minus offset,
IQ4_NL's of its table's values; with high bits, shifts, masks and an or, then a conversion; Q8_0: 16 bytes
sign-extended and converted) and fused-multiply-adds it with x[8l + v] into the lane's sum s (v = 0 multiplies); then
acc += the lane's scale * s, and for types with mins acc += the lane's min * (the sum of its 8 activations), one
fused multiply-add each. Each of these rounds once, as a float dot product does. The activations are copied once per
call into the same transposed order (scratch (n, padded cols) float32), so x[8l + v] of the 16 lanes is one load,
with their sums by 8 beside them. Float kernels convert 16 weights at a time to float32 and fused-multiply-add them,
in 2 accumulators. A kernel is compiled per type (its GGML number a compile-time constant, `_entry`), on first use.

The kernels work on tiles of 2 weight rows x 4 activation rows (x 8 for quantised weights where AVX-512 has the
registers, x 2 for a pair left over), so a prompt's or a batched decode step's weight loads and conversions serve
several activation rows; the activation row left over (decode's one) goes past 4 weight rows (a quad) at a time.
prange runs over blocks of 16 weight rows, whose weights stay in cache while every activation tile goes past them.
A tile of 8 activation rows goes past them in chunks of 512 columns (CHUNK_GROUPS), so that its activations stay in
the L1 cache (8 x 2048 floats do not): each pair's 16 lane sums are carried from chunk to chunk in a scratch array,
the same arithmetic in the same order (TinyLlama Q4_0, a 128-token prompt's pass: 17-21% faster).
The float-activation kernels prefetch a quantised quad's stream 8 groups ahead, and a float row at the same place in
the next tile's rows (nw rows ahead), which is where it goes next; the 8-bit ones leave it to the CPU (streaming a
matrix against a plain read of as many bytes in the same process: 0.86-0.92 of its speed without, 0.72-0.86 with).

Every (weight row, activation row) dot product runs the same instructions in the same order whatever the tile, the
row range held, the thread partition or the batch size, so results are bit-identical across those (the tests hold
this). No fast-math: llvm.fma rounds once on any CPU (an instruction where there is one), so the results do not
depend on the CPU either: without AVX-512, or with SPMD_CPU_GENERIC=1, nibbles are converted with plain LLVM
vector code (mask, minus the offset, integer to float; IQ4_NL a select per table entry) to the same exact values
as vpermps's table.
"""
import mmap
import os
from dataclasses import dataclass

import numba
import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic, overload

from ..quants import IQ4_NL_VALUES, SUPER, QTensor, held_type, unpack
from ..stream import HUGE  # bytes of a transparent huge page (x86-64; arm64 with 4 KiB pages)
from . import Backend, prepare_call
from .kernel_cache import kernel_cache_dir

numba.config.CACHE_DIR = kernel_cache_dir() or numba.config.CACHE_DIR  # before the first @njit(cache=True)

# vpermps (AVX-512F) turns Q4_0 nibbles into floats where numba compiles for it (the host's features, or
# NUMBA_CPU_FEATURES); SPMD_CPU_GENERIC=1 forces the portable LLVM vector code every other CPU gets (same results).
_FEATURES = numba.config.CPU_FEATURES if numba.config.CPU_FEATURES is not None else get_host_cpu_features()
AVX512 = "+avx512f" in _FEATURES.split(",") and not os.environ.get("SPMD_CPU_GENERIC")
VNNI = AVX512 and "+avx512vnni" in _FEATURES.split(",")  # vpdpbusd: 64 byte products summed into 16 int32
BW = AVX512 and "+avx512bw" in _FEATURES.split(",")  # vpshufb on 64 bytes: IQ4_NL's table with 8-bit activations
GROUP = 128  # quantised kernels: elements per loop step (4 blocks, 16 lanes of 8)
CHUNK = 64  # float kernels: elements per loop step
CHUNK_GROUPS = 4  # a prompt's quantised products with float activations: groups a step of 8 activation rows
# covers (8 x 512 float32: 16 KiB, held in the L1 cache while the row block's weights go past them)
ROW_BLOCK = 16  # weight rows per parallel work item; activation rows go through 4 at a time
QUAD = 4  # quantised weights: rows interleaved in fours, so that the kernels' tiles read one stream (docstring)
SMALL = 1 << 17  # weights below this many bytes run on one thread (a fork-join costs more than it saves)
# --activations int8: the types with 8-bit kernels, and the offset they store their integers with
# (IQ4_NL: its nibbles, each looked up as its table value + 128 in the kernel, `_table_bytes`)
INT8 = {T.Q4_0: 8, T.Q4_1: 0, T.Q5_0: 16, T.Q5_1: 0, T.Q8_0: 128, T.Q4_K: 0, T.Q5_K: 0, T.Q6_K: 32, T.Q3_K: 4,
        T.IQ4_NL: 128}
FIXED = 28  # int8 exact sums: each lane's product is cut to a multiple of 2^-FIXED and summed as an integer
LIMIT = 2.0 ** 22  # int8 exact sums: activations past this (or NaN) make the row NaN: a lane's value, up to 2^19
# (32 products of 127 x 128) times d_w * d_x * 2^FIXED, d_x up to LIMIT / 127, stays under 2^63 for |d_w| < 2

# ---- LLVM IR helpers ------------------------------------------------------------------------------------------
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F16, F32, F64 = ir.HalfType(), ir.FloatType(), ir.DoubleType()


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


def _fence(b):
    """An empty asm statement that clobbers memory: the compiler keeps the loads before it ahead of those after it
    (the CPU still runs them out of order). The 8-bit exact sums load a weight row's bytes of a group, then the next
    row's: left to itself LLVM interleaved the four rows' loads there (not in the fast sums, whose registers are
    fewer), and from memory the exact sums then streamed at 0.55-0.6 of the fast sums' speed (Q8_0, one thread of
    the 2-core test machine, the same matrices: 1000 against 550-600 us; from the cache as fast), with a fence
    between rows at 0.9-1.0 (Q4_K 0.80-0.86 -> 0.95; Q4_0 within the noise). The fast sums keep the compiler's order (a
    fence made Q4_K's 5-10% slower)."""
    fn = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", side_effect=True)
    b.call(fn, [])


def _hsum(b, v):
    """Sum of a vector's lanes in a fixed tree order (floats: 16 lanes; integers, exact: 8 int64)."""
    add = b.add if isinstance(v.type.element, ir.IntType) else b.fadd
    n = v.type.count
    while n > 1:
        n //= 2
        v = add(_shuffle(b, v, range(n)), _shuffle(b, v, range(n, 2 * n)))
    return b.extract_element(v, ir.Constant(I32, 0))


def _hmax(b, v):
    """The largest of a float vector's lanes (where one is NaN: any of them), in a tree: max is exact, so any order
    gives the same value."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo, hi = _shuffle(b, v, range(n)), _shuffle(b, v, range(n, 2 * n))
        v = b.select(b.fcmp_ordered(">", lo, hi), lo, hi)
    return b.extract_element(v, ir.Constant(I32, 0))


def _broadcast(b, value, n):
    """A scalar in all n lanes of a vector."""
    v = b.insert_element(ir.Constant(_vec(value.type, n), ir.Undefined), value, ir.Constant(I32, 0))
    return b.shuffle_vector(v, v, ir.Constant(_vec(I32, n), None))


def _dpbusd(b, acc, u, s):
    """acc (16 x int32) + in each lane the sum of its 4 unsigned bytes of u times the 4 signed bytes of s (exact)."""
    if VNNI:
        fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(_vec(I32, 16), [_vec(I32, 16)] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return b.call(fn, [acc, u, s])
    unsigned = b.zext(b.bitcast(u, _vec(I8, 64)), _vec(I32, 64))
    products = b.mul(unsigned, b.sext(b.bitcast(s, _vec(I8, 64)), _vec(I32, 64)))
    for k in range(4):
        acc = b.add(acc, _shuffle(b, products, range(k, 64, 4)))
    return acc


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


def _nibbles_to_f32(b, dw, v, fmt):
    """Nibble v of each of the 16 dwords dw, minus the offset (or through the type's table), as 16 x float
    (exact)."""
    idx = b.lshr(dw, _splat(I32, 4 * v, 16)) if v else dw
    values = fmt.table or tuple(n - fmt.offset for n in range(16))
    if AVX512:  # vpermps: the table entry at the low 4 bits of each index
        fnty = ir.FunctionType(_vec(F32, 16), [_vec(F32, 16), _vec(I32, 16)])
        fn = cgutils.get_or_insert_function(b.module, fnty, "llvm.x86.avx512.permvar.sf.512")
        table = ir.Constant(_vec(F32, 16), [ir.Constant(F32, float(value)) for value in values])
        return b.call(fn, [table, idx])
    nibble = b.and_(idx, _splat(I32, 15, 16))
    if fmt.table is None:
        return b.sitofp(b.sub(nibble, _splat(I32, fmt.offset, 16)), _vec(F32, 16))
    return _selected(b, nibble, [float(value) for value in values], F32)  # a table (IQ4_NL)


def _selected(b, idx, values, ty):
    """values[i] for each lane i of the integer vector idx (0..15), as lanes of type `ty`: a select per entry, where
    the CPU has no table instruction (vpermps, vpshufb) for it."""
    count = idx.type.count
    out = _splat(ty, values[0], count)
    for n, value in enumerate(values[1:], 1):
        out = b.select(b.icmp_unsigned("==", idx, _splat(idx.type.element, n, count)), _splat(ty, value, count), out)
    return out


def _table_bytes(b, nibbles, table):
    """Each byte of `nibbles` (16 x int32, every byte 0..15) -> its table value + 128 (unsigned, for vpdpbusd):
    vpshufb, whose 16-byte table (in each 128-bit lane) is the values + 128, where the CPU has AVX-512BW; else a
    select per entry (the same bytes)."""
    idx, values = b.bitcast(nibbles, _vec(I8, 64)), [(v + 128) & 255 for v in table]
    if BW:
        fnty = ir.FunctionType(_vec(I8, 64), [_vec(I8, 64)] * 2)
        fn = cgutils.get_or_insert_function(b.module, fnty, "llvm.x86.avx512.pshuf.b.512")
        out = b.call(fn, [ir.Constant(_vec(I8, 64), [ir.Constant(I8, v) for v in values] * 4), idx])
    else:
        out = _selected(b, idx, values, I8)
    return b.bitcast(out, _vec(I32, 16))


def _ints_to_f32(b, dw, hw, v, fmt):
    """Element 8l + v of the 16 lanes with high bits (Q5_*, Q6_K): nibble v of dword l, plus field v of the lane's
    high-bit word hw (zero-extended) shifted up by 4, minus the offset, as 16 x float (exact)."""
    lo = b.and_(b.lshr(dw, _splat(I32, 4 * v, 16)) if v else dw, _splat(I32, 15, 16))
    hi = b.and_(b.lshr(hw, _splat(I32, fmt.high * v, 16)) if v else hw, _splat(I32, (1 << fmt.high) - 1, 16))
    q = b.or_(lo, b.shl(hi, _splat(I32, 4, 16)))
    return b.sitofp(b.sub(q, _splat(I32, fmt.offset, 16)) if fmt.offset else q, _vec(F32, 16))


class _Arg:
    """A 2-D array argument seen from IR: byte pointer to row i, and the row length."""

    def __init__(self, context, b, ty, value):
        a = context.make_array(ty)(context, b, value)
        self.b, self.data = b, b.bitcast(a.data, I8.as_pointer())
        self.stride = cgutils.unpack_tuple(b, a.strides)[0]
        self.cols = cgutils.unpack_tuple(b, a.shape)[1]

    def row(self, i):
        return self.b.gep(self.data, [self.b.mul(i, self.stride)])

    def quad_row(self, i, unit):
        """Row i of an array held in quads of rows (`_interleave`): its first unit of `unit` bytes."""
        b, c = self.b, lambda v: ir.Constant(i.type, v)  # noqa: E731
        return b.gep(self.data, [b.add(b.mul(b.udiv(i, c(QUAD)), self.stride), b.mul(b.urem(i, c(QUAD)), c(unit)))])


# ---- the kernels' loop steps ----------------------------------------------------------------------------------
def _group_scales(b, g, pd, ps, fmt):
    """The 16 lanes' scales of group g of one weight row, and their mins (or None): 16 x float each."""
    c = lambda v: ir.Constant(g.type, v)  # noqa: E731
    k = 2 if fmt.mins else 1
    lanes = lambda v, first, per: _shuffle(b, v, [first + lane // per for lane in range(16)])  # noqa: E731
    if fmt.per_d == 32:  # the group's 4 d (and then 4 dmin)
        sd = b.fpext(_load(b, pd, b.mul(g, c(QUAD * 8 * k)), _vec(F16, 4 * k)), _vec(F32, 4 * k))
        return lanes(sd, 0, 4), (lanes(sd, 4, 4) if fmt.mins else None)
    dd = b.fpext(_load(b, pd, b.mul(b.lshr(g, c(1)), c(QUAD * 2 * k)), _vec(F16, k)), _vec(F32, k))  # d (, dmin)
    n = GROUP // fmt.sub  # the group's sub-blocks: their n sc, then (types with mins) their n m
    sub = _load(b, ps, b.mul(g, c(QUAD * n * k)), _vec(I8, n * k))  # Q4_K, Q5_K: 4 and 4; Q6_K: 8; Q2_K: 8 and 8
    sub = (b.sitofp if fmt.signed_sub else b.uitofp)(sub, _vec(F32, n * k))
    prod = b.fmul(sub, _shuffle(b, dd, [j // n for j in range(n * k)]))
    return lanes(prod, 0, 16 // n), (lanes(prod, n, 16 // n) if fmt.mins else None)


def _quantised_step(b, g, wrows, pxs, pxqs, fmt, accs, ahead):
    """One 128-element group of every (quantised weight row j, activation row k) pair into accs[j][k][0]: lane l
    sums weight integer times x over elements 8l..8l+7 (v = 0..7), then adds its sub-block's scale times that sum
    (and, for types with mins, its sub-block's min times the sum of those x)."""
    c = lambda v: ir.Constant(g.type, v)  # noqa: E731
    nbytes = fmt.units[0]
    base = b.mul(g, c(QUAD * nbytes))
    weights, scales = [], []
    for pw, ph, pd, ps in wrows:
        for line in range(nbytes // 64):
            _prefetch(b, pw, b.add(base, b.add(ahead, c(64 * line))))
        scales.append(_group_scales(b, g, pd, ps, fmt))
        if fmt.high < 0:  # Q8_0: byte l of the 16 at 16v
            weights.append(lambda v, pw=pw: b.sitofp(_load(b, pw, b.add(base, c(16 * v)), _vec(I8, 16)),
                                                     _vec(F32, 16)))
        elif fmt.high == 0:  # nibble v of dword l
            weights.append(lambda v, dw=_load(b, pw, base, _vec(I32, 16)): _nibbles_to_f32(b, dw, v, fmt))
        else:  # and field v of the lane's high-bit word
            width = ir.IntType(8 * fmt.high)
            hw = b.zext(_load(b, ph, b.mul(g, c(QUAD * 16 * fmt.high)), _vec(width, 16)), _vec(I32, 16))
            weights.append(lambda v, dw=_load(b, pw, base, _vec(I32, 16)), hw=hw: _ints_to_f32(b, dw, hw, v, fmt))
    sums = [[None] * len(pxs) for _ in wrows]
    for v in range(GROUP // 16):
        ws = [weight(v) for weight in weights]
        for k, xs in enumerate(pxs):
            xv = _load(b, xs, b.add(b.mul(g, c(GROUP * 4)), c(64 * v)), _vec(F32, 16))
            for j, wv in enumerate(ws):
                sums[j][k] = b.fmul(wv, xv) if v == 0 else _fma(b, wv, xv, sums[j][k])
    xsums = [_load(b, xq, b.mul(g, c(64)), _vec(F32, 16)) for xq in pxqs] if fmt.mins else None
    for j, (scale, mins) in enumerate(scales):
        for k in range(len(pxs)):
            acc = accs[j][k][0]
            total = _fma(b, scale, sums[j][k], b.load(acc))
            b.store(_fma(b, mins, xsums[k], total) if fmt.mins else total, acc)


def _float_step(b, g, wrows, pxs, _pxqs, dtype, accs, ahead):
    """One 64-element chunk of every (float weight row j, activation row k) pair: its 16-element vector v goes into
    accs[j][k][v % 2] with one fused multiply-add."""
    c = lambda v: ir.Constant(g.type, v)  # noqa: E731
    size = {types.float32: 4}.get(dtype, 2)
    base = b.mul(g, c(CHUNK * size))
    pws = [row[0] for row in wrows]
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


def _lane_scales(b, g, pd, ps, fmt):
    """With 8-bit activations: the 16 lanes' scales of group g of one weight row (K-quants: d times the sub-block's
    sc), and their mins (dmin times m; or None): 16 x float each (`_repack_int8`)."""
    c = lambda v: ir.Constant(g.type, v)  # noqa: E731
    lanes = lambda v, idx: _shuffle(b, v, [idx(lane) for lane in range(16)])  # noqa: E731
    units = fmt.int8_units
    if fmt.per_d == 32:  # the group's 16 d, a lane's block's (and its m: wd holds 4 d, then their 4 m, 4 times)
        dd = b.fpext(_load(b, pd, b.mul(g, c(QUAD * units[2])), _vec(F16, 32 if fmt.mins else 16)),
                     _vec(F32, 32 if fmt.mins else 16))
        if not fmt.mins:
            return dd, None
        return (lanes(dd, lambda i: 8 * (i // 4) + i % 4), lanes(dd, lambda i: 8 * (i // 4) + i % 4 + 4))
    k, supers = 2 if fmt.mins else 1, fmt.group8 // SUPER
    n_sub = units[3] - 2 * k * supers  # ws: the sub-blocks' sc (and m) bytes, then the float16 d (and dmin)
    at = b.mul(g, c(QUAD * units[3]))
    dd = b.fpext(_load(b, ps, b.add(at, c(n_sub)), _vec(F16, k * supers)), _vec(F32, k * supers))
    sub = _load(b, ps, at, _vec(I8, n_sub))  # Q4_K: 4 sc, 4 m, ... (32); Q6_K: 16 sc
    sub = (b.sitofp if fmt.signed_sub else b.uitofp)(sub, _vec(F32, n_sub))
    if not fmt.mins:  # Q6_K: one super-block
        return b.fmul(sub, lanes(dd, lambda i: 0)), None
    sc = lanes(sub, lambda i: 8 * (i // 4) + i % 4)  # lane i: sub-block i, of super-block i // 8
    m = lanes(sub, lambda i: 8 * (i // 4) + i % 4 + 4)
    return b.fmul(sc, lanes(dd, lambda i: 2 * (i // 8))), b.fmul(m, lanes(dd, lambda i: 2 * (i // 8) + 1))


def _int8_weights(b, g, base, fmt, pw, ph, pd, ps):
    """`_int8_step`'s weight side: a weight row's chunks of group g (8-bit integers in int32 x 16 vectors; `base`:
    the group's offset in the row's stream), its lanes' scales and mins (no software prefetch: decode streams faster
    without, module docstring)."""
    c = lambda v: ir.Constant(g.type, v)  # noqa: E731
    units, lane = fmt.int8_units, fmt.lane8
    dw, mw = _lane_scales(b, g, pd, ps, fmt)  # lane l: its block's d (K: d times sc), and min (or None)
    if fmt.high < 0:  # Q8_0, a byte each: chunk c in the group's c-th 64 bytes
        chunks = [_load(b, pw, b.add(base, c(64 * k)), _vec(I32, 16)) for k in range(lane // 4)]
    else:  # nibbles: chunks 2h, 2h + 1 low and high of the h-th 64 bytes
        mask, four = _splat(I32, 0x0F0F0F0F, 16), _splat(I32, 4, 16)
        chunks = []
        for h in range(lane // 8):
            v = _load(b, pw, b.add(base, c(64 * h)), _vec(I32, 16))
            chunks += [b.and_(v, mask), b.and_(b.lshr(v, four), mask)]
        if fmt.table is not None:  # IQ4_NL: each nibble its table value + 128
            chunks = [_table_bytes(b, chunk, fmt.table) for chunk in chunks]
    if fmt.high > 0:  # Q5_*: bit c, Q6_K: bits 2c..2c+1 of the plane's bytes, moved to bit 4 (and 5)
        plane = _load(b, ph, b.mul(g, c(QUAD * units[1])), _vec(I32, 16))
        top = _splat(I32, 0x10101010 if fmt.high == 1 else 0x30303030, 16)
        for i, chunk in enumerate(chunks):
            move = 4 - fmt.high * i  # bits to move up (down where negative)
            bits = b.shl(plane, _splat(I32, move, 16)) if move >= 0 else b.lshr(plane, _splat(I32, -move, 16))
            chunks[i] = b.or_(chunk, b.and_(bits, top))
    return chunks, dw, mw


def _int8_activations(b, g, fmt, px):
    """`_int8_step`'s activation side: an activation row's chunks of group g, its lanes' start (the correction, or
    zero for types with mins), their sums as floats (types with mins; else None) and their d_x."""
    c = lambda v: ir.Constant(g.type, v)  # noqa: E731
    lane = fmt.lane8
    at = b.mul(g, c(fmt.x8))
    xc = [_load(b, px, b.add(at, c(64 * i)), _vec(I32, 16)) for i in range(lane // 4)]
    correction = _load(b, px, b.add(at, c(16 * lane)), _vec(I32, 16))  # types with mins: the lanes' sums
    dx = _load(b, px, b.add(at, c(16 * lane + 64)), _vec(F32, 16))
    start = ir.Constant(_vec(I32, 16), None) if fmt.mins else correction
    return xc, start, (b.sitofp(correction, _vec(F32, 16)) if fmt.mins else None), dx


def _int8_pair(b, fmt, exact, weights, xside, acc):
    """`_int8_step`'s products of one (weight row, activation row) pair's group, added into its sum `acc`."""
    (chunks, dw, mw), (xc, start, sums, dx) = weights, xside
    total = start
    for chunk, xv in zip(chunks, xc):
        total = _dpbusd(b, total, chunk, xv)
    lanes = b.sitofp(total, _vec(F32, 16))
    if exact:  # the lane's product (plus its min term), cut once
        value = b.fmul(lanes, b.fmul(dw, dx))
        if fmt.mins:
            value = b.fadd(value, b.fmul(sums, b.fmul(mw, dx)))
        cut = b.fptosi(value, _vec(I64, 16))
        b.store(b.add(b.load(acc), b.add(_shuffle(b, cut, range(8)), _shuffle(b, cut, range(8, 16)))), acc)
    else:
        total = _fma(b, lanes, b.fmul(dw, dx), b.load(acc))
        b.store(_fma(b, sums, b.fmul(mw, dx), total) if fmt.mins else total, acc)


def _int8_step(b, g, wrows, pxs, _pxqs, spec, accs, _ahead):
    """One group (16 lanes of L = `Format.lane8` elements) of every (weight row j, activation row k) pair with 8-bit
    activations (--activations int8; layouts in `_repack_int8`, `_prepare_int8`): lane l's L products, exact in
    int32 (L / 4 vpdpbusd, from the activations' lane correction), then times the lane's d_w * d_x. Fast sums (a
    float32 result) fused-multiply-add that into the lane's float sum; exact sums (a float64 result) cut it to an
    integer number of 2^-FIXED and add it to an int64 sum, so the result does not depend on how the columns were
    split. Types with mins (Q4_1, Q5_1, Q4_K, Q5_K) add the lane's min times the sum of its activations (prepared
    where the others have their correction): a second fused multiply-add, or in the exact sums added to the lane's
    product before the cut.
    Order: with one activation row (decode) the exact sums, and Q8_0's fast sums, load a weight row and use it before
    the next row's loads (the four rows' loads first had held 32 registers of Q8_0 weights and spilled; a Q8_0,
    Q4_0 or Q4_K decode product's exact sums 0.76-0.92 of the time, paired runs on the 2-core test machine; Q8_0's
    fast sums 0.87-0.93; a whole token 0.96-1.02 in three paired runs, within the noise of a memory-bound token
    there; Q4_0's and Q4_K's fast sums 1.0 and 1.17 that way: they keep the rows' loads first)."""
    fmt, exact = spec
    base = b.mul(g, ir.Constant(g.type, QUAD * fmt.int8_units[0]))
    one_by_one = len(pxs) == 1 and (exact or fmt.high < 0)  # one activation row: each weight row loaded, then used
    first = _int8_activations(b, g, fmt, pxs[0]) if one_by_one else None
    weights = []
    for j, wrow in enumerate(wrows):
        weights.append(_int8_weights(b, g, base, fmt, *wrow))
        if one_by_one:
            _int8_pair(b, fmt, exact, weights[-1], first, accs[j][0][0])
        if exact:
            _fence(b)  # this row's loads before the next row's (`_fence`)
    if not one_by_one:  # the rows' loads first, then each activation row past them
        for k, px in enumerate(pxs):
            xside = _int8_activations(b, g, fmt, px)
            for j, w in enumerate(weights):
                _int8_pair(b, fmt, exact, w, xside, accs[j][k][0])


def _make_dot(nw, nx, chunked=False):
    """Intrinsic dot(kind, w, wh, wd, ws, r0, xs, xq, i0, y): y[i0 + k, r0 + j] = weight row r0 + j . activation
    row i0 + k for j < nw, k < nx (kind: the GGML type number, a compile-time constant; xs, xq: the prepared
    activations and their sums, or with uint8 xs, the 8-bit activations, xq unused). Each pair gets the same
    instructions in the same order whatever nw, nx.
    chunked (quantised weights, float activations): dot(..., y, g0, g1, carry, cr, last) runs groups g0..g1-1 only,
    each pair's 16-lane sum starting from carry row cr + 8j + k and, unless `last`, stored back there (`last`: its
    lanes summed into y as the whole dot would): the same arithmetic in the same order, in parts whose activations
    stay in the L1 cache (`_chunked_tiles`)."""

    @intrinsic
    def dot(typingctx, kind, w, wh, wd, ws, r0, xs, xq, i0, y):
        if not isinstance(kind, types.IntegerLiteral):
            return None
        return types.void(kind, w, wh, wd, ws, r0, xs, xq, i0, y), _dot_codegen(kind, w, xs, y, nw, nx)

    @intrinsic
    def dot_chunk(typingctx, kind, w, wh, wd, ws, r0, xs, xq, i0, y, g0, g1, carry, cr, last):
        if not isinstance(kind, types.IntegerLiteral):
            return None
        return (types.void(kind, w, wh, wd, ws, r0, xs, xq, i0, y, g0, g1, carry, cr, last),
                _dot_codegen(kind, w, xs, y, nw, nx, chunked=True))

    return dot_chunk if chunked else dot


def _dot_codegen(kind, w, xs, y, nw, nx, chunked=False):
    """`_make_dot`'s code for one type and tile."""
    fmt = FORMATS.get(T(kind.literal_value))
    int8, exact = xs.dtype == types.uint8, y.dtype == types.float64
    step, size, naccs, spec = (_quantised_step, GROUP, 1, fmt) if fmt else (_float_step, CHUNK, 2, w.dtype)
    if int8:
        step, size, spec = _int8_step, fmt.x8, (fmt, exact)
    if chunked and not (fmt and not int8 and not exact):  # (typed where `_row_block` never calls it)
        return lambda context, b, sig, args: context.get_dummy_value()
    zero = ir.Constant(_vec(I64, 8) if exact else _vec(F32, 16), None)

    def codegen(context, b, sig, args):
        W, H, D, S, X, Q, Y = (_Arg(context, b, sig.args[k], args[k]) for k in (1, 2, 3, 4, 6, 7, 9))
        r0, i0 = args[5], args[8]
        c = lambda v: ir.Constant(r0.type, v)  # noqa: E731
        wrows = [b.add(r0, c(j)) for j in range(nw)]
        xrows = [b.add(i0, c(k)) for k in range(nx)]
        accs = [[[cgutils.alloca_once_value(b, zero) for _ in range(naccs)] for _ in xrows] for _ in wrows]
        if chunked:  # each pair's lanes so far
            g0, g1, cr, last = args[10], args[11], args[13], args[14]
            C = _Arg(context, b, sig.args[12], args[12])
            carried = [[b.bitcast(C.row(b.add(cr, c(8 * j + k))), zero.type.as_pointer()) for k in range(nx)]
                       for j in range(nw)]
            for j in range(nw):
                for k in range(nx):
                    b.store(b.load(carried[j][k], align=4), accs[j][k][0])  # (numpy's rows: 4-byte aligned)
        if fmt:  # rows in quads: 8 groups further along the quad's stream (the 8-bit step does not prefetch)
            units = fmt.int8_units if int8 else fmt.units
            ahead = c(8 * QUAD * fmt.units[0])
            rows = [tuple(A.quad_row(r, unit) for A, unit in zip((W, H, D, S), units)) for r in wrows]
        else:  # the same place in the next tile's rows
            ahead = b.mul(W.stride, c(nw))
            rows = [(W.row(r), H.row(r), D.row(r), S.row(r)) for r in wrows]
        xs_rows, xq_rows = [X.row(i) for i in xrows], [Q.row(i) for i in xrows]
        if chunked:
            with cgutils.for_range_slice(b, g0, g1, c(1)) as (index, _):
                step(b, index, rows, xs_rows, xq_rows, spec, accs, ahead)
        else:
            with cgutils.for_range(b, b.udiv(X.cols, c(size))) as loop:
                step(b, loop.index, rows, xs_rows, xq_rows, spec, accs, ahead)

        def store_y():
            for r, acc_j in zip(wrows, accs):
                for i, acc in zip(xrows, acc_j):
                    total = b.load(acc[0]) if naccs == 1 else b.fadd(b.load(acc[0]), b.load(acc[1]))
                    if exact:  # the integer sum, scaled back (exact below 2^53 units)
                        total = b.fmul(b.sitofp(_hsum(b, total), F64), ir.Constant(F64, 2.0 ** -FIXED))
                        b.store(total, b.bitcast(b.gep(Y.row(i), [b.mul(r, c(8))]), F64.as_pointer()))
                        continue
                    total = _hsum(b, total)
                    if int8:
                        total = b.fmul(total, ir.Constant(F32, 2.0 ** -FIXED))
                    b.store(total, b.bitcast(b.gep(Y.row(i), [b.mul(r, c(4))]), F32.as_pointer()))

        if chunked:
            with b.if_else(b.icmp_unsigned("!=", last, ir.Constant(last.type, 0))) as (then, otherwise):
                with then:
                    store_y()
                with otherwise:
                    for j in range(nw):
                        for k in range(nx):
                            b.store(b.load(accs[j][k][0]), carried[j][k], align=4)
        else:
            store_y()
        return context.get_dummy_value()

    return codegen


_dot11, _dot21, _dot41, _dot12, _dot22, _dot14, _dot24, _dot18, _dot28 = (
    _make_dot(nw, nx) for nw, nx in ((1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4), (2, 4), (1, 8), (2, 8)))
_chunk18, _chunk28 = _make_dot(1, 8, chunked=True), _make_dot(2, 8, chunked=True)


# ---- the kernels ----------------------------------------------------------------------------------------------
def _prepare(kind, x, xs, xq):
    """Activations x (n, cols) -> the kernels' order in scratch xs (n, padded cols), and for types with mins the sum
    of each lane's 8 in xq (n, padded cols / 8); the padding stays zero."""


def _quantised(kind):
    """Whether `kind` (a compile-time constant) is a quantised type."""


def _float_input(xs):
    """Whether the prepared activations `xs` are floats (not --activations int8's bytes): known at compile time."""


def _finish(xs, xq, y):
    """8-bit activations: the rows `_prepare_int8` marked in xq (a NaN, or an activation past LIMIT, whose lanes
    could pass 2^63 units) become NaN, for the engine to report."""


@overload(_finish)
def _finish_impl(xs, xq, y):
    if xs.dtype != types.uint8:
        return lambda xs, xq, y: None

    def mark(xs, xq, y):
        for i in range(y.shape[0]):
            if xq[i, 0] != 0:
                y[i, :] = np.nan
    return mark


@overload(_prepare)
def _prepare_impl(kind, x, xs, xq):
    if not isinstance(kind, types.IntegerLiteral):
        return None
    fmt = FORMATS.get(T(kind.literal_value))
    if xs.dtype == types.uint8:
        return _prepare_int8(INT8[T(kind.literal_value)], fmt)
    if fmt is None:
        def copy(kind, x, xs, xq):
            for i in range(x.shape[0]):
                for e in range(x.shape[1]):
                    xs[i, e] = x[i, e]
        return copy
    sums = fmt.mins

    def transpose(kind, x, xs, xq):  # per group, element 8l + v to 16v + l
        for i in range(x.shape[0]):
            for e in range(0, x.shape[1], 8):
                at = e - e % GROUP + (e % GROUP) // 8
                total = np.float32(0.0)
                for v in range(8):
                    xs[i, at + 16 * v] = x[i, e + v]
                    total += x[i, e + v]
                if sums:
                    xq[i, e // 8] = total
    return transpose


@intrinsic
def _block_amax(typingctx, x, i, e0):
    """max |x[i, e0:e0 + 32]| (a 2-D float32 array with contiguous rows), +inf where one of them is NaN or past
    LIMIT."""

    def codegen(context, b, sig, args):
        px = _Arg(context, b, sig.args[0], args[0]).row(args[1])
        at = b.mul(args[2], ir.Constant(args[2].type, 4))
        fabs = cgutils.get_or_insert_function(b.module, ir.FunctionType(_vec(F32, 16), [_vec(F32, 16)]),
                                              "llvm.fabs.v16f32")
        halves = [b.call(fabs, [_load(b, px, b.add(at, ir.Constant(at.type, 64 * h)), _vec(F32, 16))])
                  for h in range(2)]
        bad = [b.fcmp_unordered(">", a, _splat(F32, LIMIT, 16)) for a in halves]  # NaN, or past LIMIT
        bad = b.icmp_unsigned("!=", b.bitcast(b.or_(*bad), ir.IntType(16)), ir.Constant(ir.IntType(16), 0))
        top = _hmax(b, b.select(b.fcmp_ordered(">", halves[0], halves[1]), halves[0], halves[1]))
        return b.select(bad, ir.Constant(F32, float("inf")), top)

    return types.float32(x, i, e0), codegen


def _make_q8_block(lane):
    """Intrinsic q8_block(x, i, e0, inverse, xs, at, sums_at, factor): the 32 activations x[i, e0:e0 + 32] as
    rint(x * inverse) in 8 bits into row i of xs (uint8) in `_prepare_int8`'s order for lanes of `lane` elements:
    element lane * j + 4c + k at byte at + 4j + 64c + k, and each lane's factor * (the sum of its integers) as int32
    at sums_at + 4j."""

    @intrinsic
    def q8_block(typingctx, x, i, e0, inverse, xs, at, sums_at, factor):
        def codegen(context, b, sig, args):
            x_, i_, e0_, inverse_, xs_, at_, sums_at_, factor_ = args
            c = lambda v: ir.Constant(at_.type, v)  # noqa: E731
            px = _Arg(context, b, sig.args[0], x_).row(i_)
            po = _Arg(context, b, sig.args[4], xs_).row(i_)
            rint = cgutils.get_or_insert_function(b.module, ir.FunctionType(_vec(F32, 16), [_vec(F32, 16)]),
                                                  "llvm.rint.v16f32")
            scale = _broadcast(b, inverse_, 16)
            ints = [b.fptosi(b.call(rint, [b.fmul(_load(b, px, b.mul(b.add(e0_, c(16 * h)), c(4)), _vec(F32, 16)),
                                                  scale)]), _vec(I32, 16)) for h in range(2)]
            q = b.shuffle_vector(ints[0], ints[1], ir.Constant(_vec(I32, 32), list(range(32))))
            words = b.bitcast(b.trunc(q, _vec(I8, 32)), _vec(I32, 8))  # word w: elements 4w..4w+3
            for j in range(32 // lane):
                for ch in range(lane // 4):
                    dst = b.bitcast(b.gep(po, [b.add(at_, c(4 * j + 64 * ch))]), I32.as_pointer())
                    b.store(b.extract_element(words, ir.Constant(I32, lane // 4 * j + ch)), dst, align=1)
                total = _hsum(b, _shuffle(b, q, range(lane * j, lane * j + lane)))  # integers: exact
                dst = b.bitcast(b.gep(po, [b.add(sums_at_, c(4 * j))]), I32.as_pointer())
                b.store(b.mul(total, b.trunc(factor_, I32)), dst, align=1)
            return context.get_dummy_value()

        return types.void(x, i, e0, inverse, xs, at, sums_at, factor), codegen

    return q8_block


_Q8_BLOCK = {lane: _make_q8_block(lane) for lane in (16, 32)}


def _prepare_int8(offset, fmt):
    """x (n, cols) -> per row of xs (n, padded cols / G * X) uint8 (G = 16 lane elements a group, X = 16 lane + 128
    bytes: `Format.group8`, `Format.x8`), per group g: the 8-bit activations (int8) at Xg + 64c + 4l + k for element
    lane * l + 4c + k (lane l, chunk c, as the weights' `_repack_int8`), then lane l's correction -offset * (the sum
    of its integers) as int32 at Xg + 16 lane + 4l (types with mins: the sum itself, for the min term), then d_x
    2^FIXED of its block as float32 at Xg + 16 lane + 64 + 4l. Per 32-element block d_x = amax / 127 and q = rint(x
    / d_x), as llama.cpp's Q8_0, in vectors (`_block_amax`, `_make_q8_block`) for every block within x's columns.
    xq[i, 0]: 1 where row i has a NaN or an activation past LIMIT (`_finish`)."""
    scale = np.float32(2.0 ** FIXED)
    factor = 1 if fmt.mins else -offset
    lane, size, per = fmt.lane8, fmt.x8, 32 // fmt.lane8  # a lane's elements, a group's bytes, lanes a block
    q8_block = _Q8_BLOCK[lane]

    def quantise(kind, x, xs, xq):
        n, cols = x.shape
        for i in range(n):
            q8, q32, f32 = xs[i].view(np.int8), xs[i].view(np.int32), xs[i].view(np.float32)
            bad = False
            for blk in range(xs.shape[1] // size * lane // 2):
                g, first = blk // (lane // 2), per * (blk % (lane // 2))
                whole = 32 * blk + 32 <= cols  # else the last columns' block, cut short, or the padding's
                if whole:
                    amax = _block_amax(x, i, 32 * blk)
                    bad |= not amax <= LIMIT
                else:
                    amax = np.float32(0.0)
                    for e in range(32 * blk, min(cols, 32 * blk + 32)):
                        a = abs(x[i, e])
                        bad |= not a <= LIMIT
                        amax = max(amax, a)
                d = amax / np.float32(127.0)
                inverse = np.float32(1.0) / d if d > 0 else np.float32(0.0)
                if whole:
                    q8_block(x, i, 32 * blk, inverse, xs, size * g + 4 * first, size * g + 16 * lane + 4 * first,
                             factor)
                else:
                    for ln in range(first, first + per):
                        total = 0
                        for c in range(lane // 4):
                            for k in range(4):
                                e = 16 * lane * g + lane * ln + 4 * c + k
                                q = int(np.rint(x[i, e] * inverse)) if e < cols else 0
                                q8[size * g + 64 * c + 4 * ln + k] = q
                                total += q
                        q32[size // 4 * g + 4 * lane + ln] = factor * total
                for ln in range(first, first + per):
                    f32[size // 4 * g + 4 * lane + 16 + ln] = d * scale
            xq[i, 0] = bad
    return quantise


@overload(_quantised)
def _quantised_impl(kind):
    if not isinstance(kind, types.IntegerLiteral):
        return None
    answer = T(kind.literal_value) in FORMATS
    return lambda kind: answer


@overload(_float_input)
def _float_input_impl(xs):
    answer = xs.dtype == types.float32
    return lambda xs: answer


@njit(cache=True)
def _chunked_tiles(kind, w, wh, wd, ws, xs, xq, y, r0, r1):
    """y[:i, r0:r1] for the first i = 8k activation rows, in tiles of 8 that go past the rows in chunks of the
    columns (CHUNK_GROUPS groups: their activations stay in the L1 cache), each pair's lanes carried between them.
    Returns i."""
    groups = xs.shape[1] // GROUP
    carry = np.empty(((r1 - r0) * 8, 16), np.float32)  # row 8 (r - r0) + k: pair (r, i + k)'s 16 lane sums
    i = 0
    while i + 8 <= y.shape[0]:
        carry[:] = 0.0
        for g0 in range(0, groups, CHUNK_GROUPS):
            g1 = min(groups, g0 + CHUNK_GROUPS)
            last = 1 if g1 == groups else 0
            for r in range(r0, r1 - 1, 2):
                _chunk28(kind, w, wh, wd, ws, r, xs, xq, i, y, g0, g1, carry, (r - r0) * 8, last)
            if (r1 - r0) % 2:
                _chunk18(kind, w, wh, wd, ws, r1 - 1, xs, xq, i, y, g0, g1, carry, (r1 - 1 - r0) * 8, last)
        i += 8
    return i


@njit(cache=True)
def _row_block(kind, w, wh, wd, ws, xs, xq, y, r0, r1):
    """y[:, r0:r1] from prepared activations: in tiles of 2 weight rows x 8 activation rows (quantised weights
    with AVX-512's 32 registers), x 4, x 2, then 4 (or 8) x 1."""
    n = y.shape[0]
    wide = AVX512 and _quantised(kind)  # one accumulator a pair
    i = 0
    if wide and _float_input(xs) and xs.shape[1] > CHUNK_GROUPS * GROUP and n >= 8:
        i = _chunked_tiles(kind, w, wh, wd, ws, xs, xq, y, r0, r1)
    while wide and i + 8 <= n:
        for r in range(r0, r1 - 1, 2):
            _dot28(kind, w, wh, wd, ws, r, xs, xq, i, y)
        if (r1 - r0) % 2:
            _dot18(kind, w, wh, wd, ws, r1 - 1, xs, xq, i, y)
        i += 8
    while i + 4 <= n:
        for r in range(r0, r1 - 1, 2):
            _dot24(kind, w, wh, wd, ws, r, xs, xq, i, y)
        if (r1 - r0) % 2:
            _dot14(kind, w, wh, wd, ws, r1 - 1, xs, xq, i, y)
        i += 4
    if i + 2 <= n:
        for r in range(r0, r1 - 1, 2):
            _dot22(kind, w, wh, wd, ws, r, xs, xq, i, y)
        if (r1 - r0) % 2:
            _dot12(kind, w, wh, wd, ws, r1 - 1, xs, xq, i, y)
        i += 2
    for i in range(i, n):
        r = r0
        while r + 4 <= r1:
            _dot41(kind, w, wh, wd, ws, r, xs, xq, i, y)
            r += 4
        if r + 2 <= r1:
            _dot21(kind, w, wh, wd, ws, r, xs, xq, i, y)
            r += 2
        if r < r1:
            _dot11(kind, w, wh, wd, ws, r, xs, xq, i, y)


@njit(parallel=True, cache=True, nogil=True)
def _linear_parallel(kind, w, wh, wd, ws, x, xs, xq, y):
    """y (n, rows) = x (n, cols) @ W.T; xs, xq: scratch (`CpuLinear._scratch`)."""
    _prepare(kind, x, xs, xq)
    for blk in prange(_block_count(y)):
        r0, r1 = _blocks(y, blk)
        _row_block(kind, w, wh, wd, ws, xs, xq, y, r0, r1)
    _finish(xs, xq, y)


@njit(cache=True, nogil=True)
def _linear_serial(kind, w, wh, wd, ws, x, xs, xq, y):
    _prepare(kind, x, xs, xq)
    for blk in range(_block_count(y)):
        r0, r1 = _blocks(y, blk)
        _row_block(kind, w, wh, wd, ws, xs, xq, y, r0, r1)
    _finish(xs, xq, y)


@njit(cache=True)
def _block_count(y):
    """Work items (ROW_BLOCK rows each) of y (n, rows)."""
    return (y.shape[1] + ROW_BLOCK - 1) // ROW_BLOCK


@njit(cache=True)
def _blocks(y, blk):
    """Work item blk's rows of y (n, rows): (r0, r1)."""
    return blk * ROW_BLOCK, min(y.shape[1], (blk + 1) * ROW_BLOCK)


@njit(parallel=True, cache=True, nogil=True)
def _linears_parallel(kind, w0, wh0, wd0, ws0, w1, wh1, wd1, ws1, w2, wh2, wd2, ws2, x, xs, xq, y0, y1, y2):
    """y_m = x @ W_m.T for three matrices of one type and width (q, k, v; gate, up and an empty third): the
    activations prepared once and one fork-join for all; each row as `_linear_parallel` computes it. (A parallel
    region takes no tuples of arrays: hence the arguments one by one.)"""
    _prepare(kind, x, xs, xq)
    n0, n1, n2 = _block_count(y0), _block_count(y1), _block_count(y2)
    for blk in prange(n0 + n1 + n2):
        if blk < n0:
            r0, r1 = _blocks(y0, blk)
            _row_block(kind, w0, wh0, wd0, ws0, xs, xq, y0, r0, r1)
        elif blk < n0 + n1:
            r0, r1 = _blocks(y1, blk - n0)
            _row_block(kind, w1, wh1, wd1, ws1, xs, xq, y1, r0, r1)
        else:
            r0, r1 = _blocks(y2, blk - n0 - n1)
            _row_block(kind, w2, wh2, wd2, ws2, xs, xq, y2, r0, r1)
    for y in (y0, y1, y2):
        _finish(xs, xq, y)


@njit(cache=True, nogil=True)
def _linears_serial(kind, w0, wh0, wd0, ws0, w1, wh1, wd1, ws1, w2, wh2, wd2, ws2, x, xs, xq, y0, y1, y2):
    _prepare(kind, x, xs, xq)
    for blk in range(_block_count(y0)):
        r0, r1 = _blocks(y0, blk)
        _row_block(kind, w0, wh0, wd0, ws0, xs, xq, y0, r0, r1)
    for blk in range(_block_count(y1)):
        r0, r1 = _blocks(y1, blk)
        _row_block(kind, w1, wh1, wd1, ws1, xs, xq, y1, r0, r1)
    for blk in range(_block_count(y2)):
        r0, r1 = _blocks(y2, blk)
        _row_block(kind, w2, wh2, wd2, ws2, xs, xq, y2, r0, r1)
    for y in (y0, y1, y2):
        _finish(xs, xq, y)


_ENTRIES = {}  # (kernel, argument types) -> the compiled kernel's entry point


def _entry(kernels, parallel, kind, args, both=True):
    """Of `kernels` (one thread, thread pool), the one `parallel` asks for, compiled for `kind` (as a constant) and
    these arguments' types: its entry point, which calls it in microseconds (the dispatcher, asked with a Python int
    for a literal, retypes the call: ~20 ms). The first time a type is seen both are compiled (or loaded from
    numba's cache), so a later matrix of another size (a live migration's) never waits for a compiler; with
    both=False only the one asked for (its caller compiles again as a model loads: cpu_model.swiglu's). Read-only
    arrays (a weight window's spilled matrices) are typed as writable ones: the same compiled kernel, found in
    numba's cache, not compiled again under a memory cap."""
    sig = (types.IntegerLiteral(int(kind)), *(_writable(numba.typeof(a)) for a in args))
    kernel = kernels[1 if parallel else 0]
    if (kernel, sig) not in _ENTRIES:
        for k in kernels if both else (kernel,):
            _ENTRIES[k, sig] = k.compile(sig)
    return _ENTRIES[kernel, sig]


def _writable(ty):
    return ty.copy(readonly=False) if isinstance(ty, types.Array) and not ty.mutable else ty


_BY_TYPE = {}  # (kernels, type, int8, parallel) -> `_entry`'s entry point, for calls that skip typing their arguments


def typed_entry(kernels, parallel, lin, args, both=True):
    """`_entry` for a call whose arguments' types follow from `lin`'s type and activations alone (arrays of its
    dtypes, float32 activations and results: `products`' `_linears_*`, cpu_model.swiglu's `_swiglu_*`): found by
    those, without numba.typeof on each argument (~100 us a call). An entry point does not check its arguments."""
    key = kernels, lin.qtype, lin.int8, parallel
    if key not in _BY_TYPE:
        _BY_TYPE[key] = _entry(kernels, parallel, lin.qtype, args, both)
    return _BY_TYPE[key]


LINEAR, LINEARS = (_linear_serial, _linear_parallel), (_linears_serial, _linears_parallel)


# ---- load-time repacking --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Format:
    """How the kernels hold a quantised type (see the module docstring)."""
    offset: int = 0  # taken off the stored unsigned integer
    high: int = 0  # bits above the nibble (Q5_*: 1, Q6_K: 2); -1: int8 (Q8_0)
    per_d: int = 32  # elements per float16 d (and dmin)
    mins: bool = False  # a dmin beside each d (K-quants: times an 8-bit m per sub-block)
    signed_sub: bool = False  # K-quants' 8-bit sub-block scales: int8 (Q6_K) or uint8
    sub: int = 32  # K-quants: elements per sub-block scale (Q4_K, Q5_K 32; Q6_K, Q2_K 16)
    table: tuple = None  # each nibble's value (IQ4_NL), in place of the nibble less the offset

    @property
    def units(self):
        """Bytes a row of each array (w, wh, wd, ws) holds per unit of the quad interleave: a 128-element group;
        for wd of a K-quant, a super-block."""
        k = 1 + self.mins
        return (GROUP if self.high < 0 else GROUP // 2, 16 * max(self.high, 0), (8 if self.per_d == 32 else 2) * k,
                0 if self.per_d == 32 else GROUP // self.sub * k)

    @property
    def lane8(self):
        """8-bit activations: elements a lane of the kernels owns, those of one scale: a 32-element block (Q4_0,
        Q8_0) or sub-block (Q4_K), or Q6_K's 16-element sub-block."""
        return self.sub

    @property
    def group8(self):
        """8-bit activations: elements of a loop step (16 lanes), the unit of `_repack_int8`'s layouts."""
        return 16 * self.lane8

    @property
    def x8(self):
        """8-bit activations: bytes of a group's prepared activations (`_prepare_int8`)."""
        return 16 * self.lane8 + 128

    @property
    def int8_units(self):
        """`units` for the 8-bit activations' layouts (`_repack_int8`), whose unit is a group of `group8` elements."""
        w, wh, wd, ws = self.units
        f = self.group8 // GROUP
        if self.per_d == 32:
            return f * w, f * wh, f * wd, f * ws
        return f * w, f * wh, 0, f * ws + wd * self.group8 // SUPER  # K-quants: d (, dmin) after the sc in ws


FORMATS = {T.Q8_0: Format(high=-1), T.Q4_0: Format(offset=8), T.Q4_1: Format(mins=True),
           T.Q5_0: Format(offset=16, high=1), T.Q5_1: Format(high=1, mins=True),
           T.Q4_K: Format(per_d=SUPER, mins=True), T.Q5_K: Format(high=1, per_d=SUPER, mins=True),
           T.Q6_K: Format(offset=32, high=2, per_d=SUPER, signed_sub=True, sub=16),
           T.Q2_K: Format(per_d=SUPER, mins=True, sub=16),  # (2-bit integers held as nibbles)
           T.Q3_K: Format(offset=4, per_d=SUPER, signed_sub=True, sub=16),  # (3-bit integers held as nibbles)
           T.IQ4_NL: Format(table=tuple(int(v) for v in IQ4_NL_VALUES))}  # (its nibbles: indices into the table)
FLOATS = {T.F32: np.float32, T.F16: np.int16, T.BF16: np.uint16}  # numba has no float16: F16 keeps its bits as int16


def _pad(n, unit):
    return -(-n // unit) * unit


def _padded(a, cols, fill=0):
    """`a` (rows, n) with columns up to `cols`, the new ones `fill`; `a` itself where n is `cols` (callers only read
    it)."""
    if a.shape[1] == cols:
        return a
    out = np.full((a.shape[0], cols), fill, a.dtype)
    out[:, :a.shape[1]] = a
    return out


def _f16_bits(a):
    return np.ascontiguousarray(a.astype(np.float16)).view(np.uint16)


REPACK_ROWS = 1 << 22  # elements repacked at once: the temporaries of a big matrix's repacking stay tens of MB


def huge_bytes(nbytes):
    """A uint8 array of nbytes in anonymous memory whose whole HUGE-byte runs the kernel is asked (madvise) to back
    with transparent huge pages, where it does so only when asked (`enabled` = madvise, as on Debian); np.empty's
    below HUGE. The tail past the last whole run stays on small pages: nothing is held beyond the bytes used."""
    if nbytes < HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(nbytes, np.uint8)
    # private: a shared anonymous mapping is shmem, whose huge pages follow another setting (usually off)
    mapping = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # (unmapped with its last view)
    raw = np.frombuffer(mapping, np.uint8)
    at = -raw.ctypes.data % HUGE
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, at, nbytes // HUGE * HUGE)
    except OSError:  # (huge pages off in this kernel)
        pass
    return raw[at:at + nbytes]


def settle(lins):
    """The arrays of a half's CpuLinears (a layer's attention or FFN, or the classifier) moved into one
    `huge_bytes`, each aligned to 64 bytes, one at a time (an original is freed as its copy is made): a decode
    token streams every weight once, and on 4 KiB pages each page costs a TLB miss and stops the hardware
    prefetcher; a half's arrays together leave one tail on small pages where each array would leave its own, as
    numpy's allocations do (35-45% of a TinyLlama model). TinyLlama Q4_0 int8, tokens in turn against numpy's
    pages: 0.93-1.01 of the time on 2 cores, 0.98-1.00 on 16. The half's arrays then go together (a migration or a
    stream window replaces a whole half)."""
    lins = [lin for lin in lins if isinstance(lin, CpuLinear) and lin.arrays is not None]
    arena = huge_bytes(sum(_pad(a.nbytes, 64) for lin in lins for a in lin.arrays if a is not _NONE))
    at = 0
    for lin in lins:
        moved = []
        for a in lin.arrays:
            if a is not _NONE:
                b = arena[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
                b[...] = a
                at += _pad(a.nbytes, 64)
                a = b
            moved.append(a)
        lin.arrays = tuple(moved)


def _repack(qt, int8=False):
    """QTensor -> (w, wh, wd, ws) in the kernels' layouts (int8: for 8-bit activations), repacked a band of rows at
    a time."""
    one, q = (_repack_quantised, QUAD) if qt.qtype in FORMATS else (_repack_float, 1)  # q: rows an array row holds
    if int8:
        one = _repack_int8
    band = max(1, REPACK_ROWS // max(qt.cols, 1) // QUAD) * QUAD
    if qt.rows <= band:
        return one(qt)
    out = None
    for r in range(0, qt.rows, band):
        part = one(QTensor(qt.qtype, min(band, qt.rows - r), qt.cols, qt.data[r:r + band], qt.keep))
        if out is None:
            out = tuple(a if a is _NONE else np.empty((-(-qt.rows // q), *a.shape[1:]), a.dtype) for a in part)
        for whole, a in zip(out, part):
            if a is not _NONE:
                whole[r // q:r // q + a.shape[0]] = a
    return out


def _repack_quantised(qt):
    """QTensor -> (w, wh, wd, ws) in the kernels' layouts (module docstring)."""
    fmt, u = FORMATS[qt.qtype], unpack(qt)
    rows, cp = qt.rows, padded_cols(qt.qtype, qt.cols)
    arrays = _rows_quantised(u, fmt, rows, cp)
    return tuple(a if a is _NONE else _interleave(a, unit) for a, unit in zip(arrays, fmt.units))


def _repack_int8(qt):
    """QTensor (INT8's types) -> (w, wh, wd, ws) for 8-bit activations, in quads of rows with a group of 16 lanes as the
    unit (`Format.int8_units`), as many bytes per element as for float activations. Lane l of a group owns its
    elements Ll..Ll+L-1 (L = `Format.lane8`: 32, Q6_K 16), in chunks c of 4 (Ll + 4c + k, k = 0..3), each its
    integer plus INT8[type] (unsigned, for vpdpbusd). w: Q8_0, byte 64c + 4l + k; the 4-bit types, chunks 2h and 2h
    + 1 in the low and high nibbles of byte 64h + 4l + k. The bits above the nibble go in wh, 64 bytes a group: Q5_*'s
    fifth bit of chunk c is bit c of byte 4l + k, Q6_K's top two bits 2c..2c+1. wd holds what it does for float
    activations (per 128 elements: its blocks' d; Q4_1, Q5_1: then their m). K-quants have one stream of scales, ws,
    per group: its sub-blocks' sc as for float activations (Q4_K, Q5_K: 4 sc, 4 m, 4 sc, 4 m, ...; Q6_K: 16 sc),
    then its super-blocks' float16 d (Q4_K, Q5_K: d, minus dmin, each); their wd is empty (a third stream per quad
    had made the exact sums 8-16% slower on Q4_K)."""
    u, fmt = unpack(qt), FORMATS[qt.qtype]
    rows, cp, lane = qt.rows, padded_cols(qt.qtype, qt.cols, int8=True), fmt.lane8
    if fmt.table is not None:  # IQ4_NL: the values back to their nibbles (the kernel looks them up); padding: d = 0
        q = _table_nibbles(fmt.table, _padded(u.q, cp))
    else:
        q = _padded(u.q, cp) + INT8[qt.qtype]
    q = q.astype(np.uint8).reshape(rows, cp // fmt.group8, 16, lane // 4, 4)
    wh = _NONE  # q: g l c k
    if fmt.high < 0:  # Q8_0
        w = q.transpose(0, 1, 3, 2, 4)
    else:
        w = np.stack([(q[:, :, :, 2 * h] & 15) | ((q[:, :, :, 2 * h + 1] & 15) << 4) for h in range(lane // 8)],
                     axis=2)
    if fmt.high > 0:  # Q5_*: bit c of byte 4l + k is chunk c's; Q6_K: bits 2c..2c+1
        top = q >> 4
        wh = sum(top[:, :, :, c] << (fmt.high * c) for c in range(lane // 4)).astype(np.uint8)
    groups, units = cp // fmt.group8, fmt.int8_units
    arrays = [a if a is _NONE else np.ascontiguousarray(a).reshape(rows, groups * unit)
              for a, unit in zip((w, wh), units)]
    wd, ws = _scales(u, fmt, rows, cp)
    if fmt.per_d == SUPER:  # one stream of scales: per group its sub-blocks' sc (and m), then its d (and dmin)
        per = lambda a: a.reshape(rows, groups, a.shape[1] // max(groups, 1))  # noqa: E731  (a group's bytes)
        merged = np.concatenate([per(ws), per(wd.view(np.uint8))], axis=2)
        wd, ws = _NONE, merged.reshape(rows, groups * merged.shape[2])
    arrays += [wd, ws]
    return tuple(a if a is _NONE else _interleave(a, unit) for a, unit in zip(arrays, units))


def _interleave(a, unit):
    """(rows, n) -> (rows / QUAD, QUAD * n), rows padded with zeros to a multiple of QUAD: each row's units of `unit`
    bytes in turn, the QUAD rows' unit 0, then their unit 1, ..."""
    a = np.concatenate([a, np.zeros((-a.shape[0] % QUAD, a.shape[1]), a.dtype)])
    per = unit // a.itemsize
    quads = a.reshape(a.shape[0] // QUAD, QUAD, a.shape[1] // per, per).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(quads).reshape(a.shape[0] // QUAD, QUAD * a.shape[1])


def _rows_quantised(u, fmt, rows, cp):
    """The file's numbers `u` -> (w, wh, wd, ws), a row each row, before the interleave."""
    groups = cp // GROUP
    if fmt.high < 0:  # Q8_0: per group, element 8l + v to 16v + l
        q = _padded(u.q, cp).astype(np.int8).reshape(rows, groups, 16, 8).transpose(0, 1, 3, 2)
        w, wh = np.ascontiguousarray(q).reshape(rows, cp), _NONE
    else:
        if fmt.table is not None:  # the values back to their nibbles; padding: d = 0
            q = _table_nibbles(fmt.table, _padded(u.q, cp))
        else:
            q = _padded((u.q + u.offset).astype(np.uint8), cp, fill=u.offset)  # the padding's value is 0
        w = (q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)
        wh = _NONE
        if fmt.high:  # the bits above the nibbles
            lanes = (q >> 4).reshape(rows, cp // 8, 8).astype(np.uint16) << (fmt.high * np.arange(8, dtype=np.uint16))
            wh = lanes.sum(axis=2, dtype=np.uint16).astype(np.uint8 if fmt.high == 1 else np.uint16)
    return (w, wh) + _scales(u, fmt, rows, cp)


def _table_nibbles(table, q):
    """The nibble whose entry in `table` (IQ4_NL's: 16 distinct integers within int8) is each integer of q, by a
    lookup on the integers' low bytes (a search of the table took 35 ns an element: 20 s for TinyLlama)."""
    nibble = np.zeros(256, np.uint8)
    nibble[np.array(table) & 255] = np.arange(16)
    return nibble[q.astype(np.uint8)]


def _scales(u, fmt, rows, cp):
    """The file's numbers `u` -> (wd, ws), a row each row, before the interleave."""
    n_d, groups = cp // fmt.per_d, cp // GROUP
    parts = [_padded(u.d, n_d)] + ([_padded(u.dmin, n_d)] if fmt.mins else [])
    if fmt.per_d == 32:  # per group: its 4 d, then its 4 dmin
        wd = np.stack([p.reshape(rows, groups, 4) for p in parts], axis=2).reshape(rows, n_d * len(parts))
        return _f16_bits(wd), _NONE
    wd = np.stack(parts, axis=2).reshape(rows, n_d * len(parts))  # per super-block: d (, dmin)
    sc = _padded(u.sc, cp // u.sub)  # (8-bit activations pad Q4_K to 512 elements)
    if fmt.mins:  # per group: the sc, then the m, of its sub-blocks (Q4_K 4, Q2_K 8)
        m, n = _padded(u.m, cp // u.sub), GROUP // u.sub
        ws = np.stack([sc.reshape(rows, groups, n), m.reshape(rows, groups, n)], axis=2).reshape(rows, 2 * groups * n)
    else:
        ws = sc
    return _f16_bits(wd), ws.astype(np.int8 if fmt.signed_sub else np.uint8).view(np.uint8)


def _repack_float(qt):
    w = np.zeros((qt.rows, padded_cols(qt.qtype, qt.cols)), FLOATS[qt.qtype])
    w[:, :qt.cols] = qt.data.view(FLOATS[qt.qtype])  # the same bits
    return w, _NONE, _NONE, _NONE


_NONE = np.zeros((1, 1), np.uint8)  # an array a type does not have


def padded_cols(qtype, cols, int8=False):
    """The kernels' row length: quantised types by whole 128-element groups (K-quants: 256; with 8-bit activations,
    int8 and qtype in INT8, groups of 16 lanes: 512, Q6_K 256), floats by 64-element chunks."""
    if int8:
        return _pad(cols, FORMATS[qtype].group8)
    return _pad(cols, CHUNK if qtype in FLOATS else GROUP if FORMATS[qtype].per_d == 32 else SUPER)


def held_bytes(qtype, rows, cols, int8=False) -> int:
    """The bytes a CpuLinear holds for a (rows, cols) matrix of `qtype`: its repacked arrays (w, wh, wd, ws), with
    float or (int8, for INT8's types) 8-bit activations."""
    int8 = int8 and qtype in INT8
    cp = padded_cols(qtype, cols, int8)
    if qtype in FLOATS:
        return rows * cp * np.dtype(FLOATS[qtype]).itemsize
    fmt = FORMATS[qtype]
    if int8:
        return _pad(rows, QUAD) * cp // fmt.group8 * sum(fmt.int8_units)
    w, wh, wd, ws = fmt.units  # bytes a row per group (wd: per d)
    return _pad(rows, QUAD) * (cp // GROUP * (w + wh + ws) + cp // max(fmt.per_d, GROUP) * wd)


class CpuLinear:
    def __init__(self, w: QTensor, threads: int, int8=False):
        if w.qtype not in FORMATS and w.qtype not in FLOATS:
            raise ValueError(f"cpu backend: no kernel for {w.qtype.name}")
        self.qtype, self.rows, self.cols, self.stored = w.qtype, w.rows, w.width, w.cols
        self.int8 = int8 and w.qtype in INT8  # 8-bit activations (--activations int8)
        self.arrays = _repack(w, self.int8)  # w, wh, wd, ws: what the kernel reads (spmd.stream swaps them)
        self.nbytes = sum(a.nbytes for a in self.arrays if a is not _NONE)
        # a slice that cut through quant blocks: where its columns are among the stored ones (the rest get zeros)
        self.spread = None if w.keep is None else np.concatenate([np.arange(a, b) for a, b in w.keep])
        self._one = self._scratch(1)  # the decode path's scratch, reused every call
        x, y = np.zeros((1, self.stored), np.float32), np.zeros((1, self.rows), np.float32)
        self.threads = threads
        parallel = on_threads((self,))
        self._kernel = _entry(LINEAR, parallel, self.qtype, (*self.arrays, x, *self._one[:2], y))
        # a float64 result: the exact sums (a partial sum the stage adds up: spmd.model)
        exact = (*self.arrays, x, *self._one[:2], y.astype(np.float64))
        self._exact = _entry(LINEAR, parallel, self.qtype, exact) if self.int8 else None
        three = (*(self.arrays * 3), x, *self._one[:2], y, y, np.empty((1, 0), np.float32))
        typed_entry(LINEARS, parallel, self, three)  # `products` of this type: compiled (or loaded) now, both kinds

    def _scratch(self, n):
        """(xs, xq, wide): the prepared activations ((n, padded cols) float32, or with int8 uint8, `_prepare_int8`),
        the sums of each 8 of them (types with mins; with int8 each row's NaN mark), and the activations spread over
        the stored columns (slices that cut through blocks)."""
        cols = padded_cols(self.qtype, self.stored, self.int8)
        sums = self.qtype in FORMATS and FORMATS[self.qtype].mins
        wide = np.zeros((n, self.stored), np.float32) if self.spread is not None else None
        if self.int8:  # x8 bytes a group, and a row's mark (`_prepare_int8`)
            fmt = FORMATS[self.qtype]
            return np.zeros((n, fmt.x8 * cols // fmt.group8), np.uint8), np.zeros((n, 1), np.float32), wide
        return np.zeros((n, cols), np.float32), np.zeros((n, cols // 8) if sums else (1, 1), np.float32), wide

    def __call__(self, x: np.ndarray, out: np.ndarray = None) -> np.ndarray:
        x, out, done = prepare_call(self, x, out)
        if done:
            return out
        n = x.shape[0]
        dtype = np.float64 if self.int8 and out.dtype == np.float64 else np.float32  # float64: exact sums
        y = out if out.dtype == dtype and out.flags.c_contiguous else np.empty((n, self.rows), dtype)
        xs, xq, wide = self._one if n == 1 else self._scratch(n)
        if wide is not None:
            wide[:, self.spread] = x
            x = wide
        (self._exact if dtype == np.float64 else self._kernel)(int(self.qtype), *self.arrays, x, xs, xq, y)
        if y is not out:
            out[...] = y
        return out


def products(lins, x, outs):
    """[lins[m](x, out=outs[m])] for products that share their input (q, k, v; gate, up). Those that are CpuLinears
    of one type and width (no cut blocks) with contiguous float32 results go in one kernel call (a Q4_K_M file's q
    and k where its v is Q6_K): the activations prepared once and all their rows in one fork-join
    (`_linears_parallel`: about 1 ms of a 22 ms decode token on the TinyLlama shape, 2 cores), each row the same
    bits as from its own call; the others one call each."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    results, alike = list(outs), {}
    for m, (lin, out) in enumerate(zip(lins, outs)):
        if fusable(lin, x, out):
            alike.setdefault((lin.qtype, lin.int8), []).append(m)
        else:
            results[m] = lin(x, out=out)
    for group in alike.values():
        for at in range(0, len(group), 3):
            _fused([(lins[m], outs[m]) for m in group[at:at + 3]], x)
    return results


def on_threads(lins) -> bool:
    """Whether one kernel call of these CpuLinears (one alone, or those `products` or swiglu fuses) runs on the
    thread pool: where the rank has threads and the call reads SMALL bytes or more."""
    return lins[0].threads > 1 and sum(lin.nbytes for lin in lins) >= SMALL


def fusable(lin, x, out) -> bool:
    """Whether `lin` (x) may go into one kernel call with others of its type and width: a CpuLinear (no cut
    blocks) of x (n >= 1, contiguous float32) with a contiguous float32 result."""
    n = x.shape[0]
    return (isinstance(lin, CpuLinear) and out is not None and n > 0 and lin.cols > 0 and lin.rows > 0
            and x.shape == (n, lin.cols) and lin.spread is None and out.dtype == np.float32
            and out.flags.c_contiguous and out.shape == (n, lin.rows))


def _fused(pairs, x):
    """One to three (CpuLinear, out) of one type and width through `_linears_*` (an empty third where two; one goes
    alone)."""
    (first, out), n = pairs[0], x.shape[0]
    if len(pairs) == 1:
        first(x, out=out)
        return
    xs, xq, _ = first._one if n == 1 else first._scratch(n)
    lins = [lin for lin, _ in pairs]
    parallel = on_threads(lins)
    ys = (*(out for _, out in pairs), np.empty((n, 0), np.float32))[:3]
    args = (*(a for lin in (*lins, lins[-1])[:3] for a in lin.arrays), x, xs, xq, *ys)
    typed_entry(LINEARS, parallel, first, args)(int(first.qtype), *args)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, threads: int = None, activations="f32"):
        """threads: 1 runs every kernel on the calling thread (for ranks that share a machine's cores); otherwise
        large matrices use numba's thread pool (numba.set_num_threads / NUMBA_NUM_THREADS set its size).
        activations: "int8" quantises them to 8 bits for the INT8 types' products (the docstring)."""
        self.threads = min(threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
        if self.threads > 1:
            numba.set_num_threads(self.threads)
        self.int8 = activations == "int8"
        self.partial_dtype = np.float64 if self.int8 else np.float32
        self.description = f"cpu (numba, {self.threads} thread{'s' * (self.threads != 1)}{', int8' * self.int8})"

    def widens_f16_cache(self, head_dim):
        from .cpu_model import LANES
        return head_dim % LANES != 0  # (else CpuModel widens each key and value as it reads it)

    def linear(self, w: QTensor, resident=True) -> CpuLinear:
        return CpuLinear(w, self.threads, self.int8)

    def settle(self, lins):
        settle(lins)

    def holds(self, qtype):
        return held_type(qtype, lambda t: t in FORMATS or t in FLOATS)

    def lacks(self, w):
        return None if self.holds(w.qtype) == w.qtype else f"a kernel for {w.qtype.name} weights"

    def held_bytes(self, qtype, rows, cols, keep=None) -> int:
        return held_bytes(qtype, rows, cols, self.int8)  # a cut slice keeps the whole blocks around it

    def make_model(self, cfg, weights, share, max_seq, slots=1, kv_cache="f32"):
        from .cpu_model import CpuModel
        return CpuModel(cfg, weights, share, max_seq, slots, self.partial_dtype, kv_cache, threads=self.threads)

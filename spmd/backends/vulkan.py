"""The Vulkan backend: weights resident in device memory in their quantised form, GLSL compute kernels
(`kernels/`), and a model (`vulkan_model.py`) whose work between two allreduces is one recorded command buffer.

Weight layout on the device (made at load, `_repack`): a matrix is row-major 32-element blocks, the columns padded
with zeros to a multiple of 32. Q4_0 and Q8_0 keep GGUF's block bytes (16 bytes of nibbles, 32 int8) with the 2-byte
fp16 scales moved to a second buffer (one per block), so every load is 16-byte aligned (IQ4_NL as Q4_0: its nibbles
index the file's table); F32, F16 and BF16 keep their bits. The other kept types are repacked (`_repack_words`) to
16 bytes of low nibbles per block and a few uint32 words per block in the second buffer: float32 scale and min
(Q4_1, and Q4_K sliced through its super-blocks: "q4m", 6 bits a weight), plus the fifth bits (Q5_0, Q5_1, and Q5_K
sliced through its super-blocks: "q5m", 7 bits for Q5_K's 5.5), or Q6_K's two half-block int8 scales, its
super-block's d and top bits ("q6", 7 bits for its 6.56). Q3_K and Q2_K ("q3", "q2") hold a 32-element block in one
16-byte word: its 2-bit fields (and Q3_K's third bits) and its halves' scales (4 bits a weight for their 3.44 and
2.625). A K-quant's d * sc is exact in float32, so the numbers stay the file's, and a slice that cuts its
super-blocks (QTensor.keep) keeps just its own 32-element blocks. Q4_K kept whole ("q4k", `kind`) keeps q4m's
nibbles and, as its scales, each super-block's fp16 d and dmin and its 6-bit scales and mins a byte each: 4.625 bits
a weight against the file's 4.5; its kernels make a block's float scale and min where they use it (on an H200 a
float32 prompt 0.97x q4m's, an int8 one 1.04x, decode 0.96-0.97x: docs/performance.md). Q5_K kept whole ("q5k")
does the same beside q5m's fifth bits: 5.625 bits a weight against the file's 5.5 (q5m: 7).
A matrix larger than the device's maxStorageBufferRange (128 MiB on lavapipe) is held as row chunks, one buffer
and one dispatch each.

Kernels (see kernels/README.md): `matvec_<w>_f32` (decode) and `matmul_<w>_f32` (a prompt, 8 tokens a workgroup),
or `coopmat_<w>_f32` (a prompt on the matrix units, where the device has cooperative matrices), with a bias, a
residual add, and (gate and up in one pass) SiLU-multiply fused in; `rmsnorm_f32`; `headnorm_f32` (qwen3's q and
k norms); `attention_f32` with RoPE and the KV-cache store fused in; `add_f32` for the allreduced sums;
`swiglu_f32` where gate and up differ in type. With --activations int8, `quantize_f32` rounds a product's input to
8 bits a block (a one-rank, one-token decode rounds inside the products, flag QUANTIZE, and the attention kernel, all
but the first layer's input), and the quantised products sum 8-bit integer products: `matvec_<w>_i8` in decode,
`coopmat_<w>_i8` in a prompt where the device's matrix units take 8-bit integers.

Activations are float32 buffers whose rows are padded to a multiple of 32 floats (the padding stays zero).
"""
import struct
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import UserError
from .. import quants
from ..quants import QTensor, unpack
from . import Backend, prepare_call
from .vk_runtime import Buffer, Device, Recording, env_tuple

# weight type -> its kernels' name (kernels/<name>.glsl): 4-bit with a min, 5-bit and the K-quants are repacked
# (_repack)
TYPES = {T.F32: "f32", T.F16: "f16", T.BF16: "bf16", T.Q8_0: "q8_0", T.Q4_0: "q4_0", T.Q4_1: "q4m", T.Q4_K: "q4m",
         T.Q5_0: "q5m", T.Q5_1: "q5m", T.Q5_K: "q5m", T.Q6_K: "q6", T.Q3_K: "q3",
         T.Q2_K: "q2", T.IQ4_NL: "iq4nl"}  # (`kind`: WHOLE's where kept whole)
WHOLE = {T.Q4_K: "q4k", T.Q5_K: "q5k"}  # a K-quant kept whole: kernels with the file's super-block scales
# uvec4s a block
UV = {"f32": 8, "f16": 4, "bf16": 4, "q8_0": 2, "q4_0": 1, "q4m": 1, "q4k": 1, "q5m": 1, "q5k": 1, "q6": 1,
      "q3": 1, "q2": 1, "iq4nl": 1}
# kernels that take float activations under --activations int8 too: float weights, and Q2_K's (as on the cpu backend)
FLOATS = tuple(TYPES[t] for t in quants.FLOATS) + ("q2",)
# kernels of 8-bit activations: matvec_<w>_i8 (every quantised type), coopmat_<w>_i8 where the device has 8-bit
# matrix units
INT8 = ("q4_0", "q8_0", "q4m", "q4k", "q5m", "q5k", "q6", "q3", "iq4nl")
WORDS = ("q4m", "q4k", "q5m", "q5k", "q6", "q3", "q2")  # repacked from unpack's numbers (_repack_words)
# a block's scales, in their own buffer (q4k: 20 bytes a super-block of 8 blocks, q5k 52)
SCALE_BYTES = {"q4_0": 2, "q8_0": 2, "iq4nl": 2, "q4m": 8, "q4k": 2.5, "q5m": 12, "q5k": 6.5, "q6": 12}
# rows, nb, x_stride, x_off, y_stride, y_off, n, groups, bias_off, flags, ss_count, inv_dim, eps
MATVEC_PUSH = "<11I2f"
PUSH_BYTES = struct.calcsize(MATVEC_PUSH)
ACCUM, BIAS, NORM, PRODUCE, QUANTIZE = 1, 2, 4, 8, 16  # flags (kernels/matmul_io.glsl)
MATVEC_BINDINGS, MATMUL_BINDINGS = 15, 10  # (matmul_io.glsl: 10 is the _i8 kernels' xd, matvec's 11-14 QUANTIZE's)
# A coopmat workgroup stages its 64 rows' weights (a quantised type's integers, or fp16 pairs) once for all its
# tokens, which is much of its time: 64 tokens a workgroup beat 32 where that still gives this many workgroups, and lose
# where fewer leave much of the GPU idle. H200 (132 SMs), 128 tokens, one product timed alone: TinyLlama's wo, 64
# workgroups of 64 tokens, 57 us against 39 with 32 tokens; its q/k/v, 80 of 64: 57 against 76; Llama-2-7B's wo,
# 128 of 64: 108 against 145, and its w2 288 against 460 (the workgroups run in waves of about one an SM)
COOP_WIDE = 72
# With 64 tokens, a subgroup's 16 tokens x 64 rows (TG = 1) or 32 x 32 (TG = 2, fewer fragment loads a product, more
# registers): TG = 2 for gate and up (H200, 128-token prompt: Llama-2-7B 369 us against 404, TinyLlama 125 against
# 140; 512 tokens: 367 against 411) and where a product has at most COOP_FEW workgroups (128: Llama-2-7B's q k v 270
# against 289 and wo 106 against 112; TinyLlama's q k v 54 against 76); TG = 1 with more (256 workgroups of
# TinyLlama at 512 tokens: q k v 118 against 89, wo 107 against 59, w2 281 against 150)
COOP_FEW = 160
# kernels/coopmat_main.glsl's BR (its workgroup size is its own: 4 subgroups of 32, or 8 with KSPLIT)
COOP_ROWS = 64


def coop_tile(rows, n, pair, fixed_tokens=0):
    """(tokens, fragments of 16 tokens a subgroup holds) for a coopmat product (kernels/coopmat_main.glsl's BT and
    TG): 64 tokens where that still makes COOP_WIDE workgroups, else 32 (fixed_tokens: SPMD_VK_COOP_TOKENS); TG 2
    with 64 tokens for a pair or at most COOP_FEW workgroups."""
    groups = -(-rows // COOP_ROWS)
    tokens = fixed_tokens or (64 if groups * -(-n // 64) >= COOP_WIDE else 32)
    few = groups * -(-n // tokens) <= COOP_FEW
    return tokens, 2 if tokens == 64 and (pair or few) else 1


# a `wide` product's rows from which matvec takes SPMD_VK_MATVEC's third number of rows a workgroup (8 on a GPU).
# H100, 2026-12-06, 8 rows for q, k, v and the classifier at every size: Llama-2-7B decode 1% faster in Q4_0 and
# 3.5% in Q8_0, TinyLlama's 5% slower (q 2048 rows, k and v 256: too few workgroups to hide the latency)
MATVEC_WIDE_ROWS = 4096
AHEAD_TOKENS = 8  # a chained greedy decode's tokens a wait (SPMD_VK_AHEAD; one command buffer submitted that often)
SPLIT_KEYS = 256  # keys a workgroup attends in a decode step over long caches (vulkan_model.SPLIT_FROM; at most the
# attention kernel's chunk of 256), SPMD_VK_SPLIT_KEYS to try others
_DEVICES = {}  # one Device per GPU index, shared by every backend and model of the process


def pad(n, unit=32):
    return -(-n // unit) * unit


def whole(b):
    """A binding: a Buffer (all of it) or (Buffer, byte offset, byte range) as it is."""
    return b if isinstance(b, tuple) else (b, 0, b.nbytes)


def kind(qtype, whole=True):
    """The kernels (kernels/<kind>.glsl) for weights of `qtype`: TYPES', but Q4_K and Q5_K kept whole (not `whole`:
    a slice that cuts their super-blocks, QTensor.keep) are WHOLE's."""
    return WHOLE[qtype] if qtype in WHOLE and whole else TYPES[qtype]


def _cut_within_blocks(qtype, keep) -> bool:
    """Whether a slice (QTensor.keep) cuts blocks the kernels cannot take apart: a type not repacked in 32-element
    blocks, or a cut inside one (such a slice is held as F32)."""
    return keep is not None and (TYPES[qtype] not in WORDS or any(a % 32 or b % 32 for a, b in keep))


def _nibbles(blocks):
    """(rows, nb, 32) unsigned integers -> 16 bytes a block of their low nibbles (rows, nb * 16): element e in the
    low nibble of byte e, element 16 + e in its high one."""
    rows, nb, _ = blocks.shape
    return ((blocks[:, :, :16] & 15) | ((blocks[:, :, 16:] & 15) << 4)).astype(np.uint8).reshape(rows, nb * 16)


def _bit_words(bits):
    """(rows, blocks, 32) single bits -> (rows, blocks) uint32: bit e is element e's (Q5's fifth bits, Q3_K's
    third)."""
    return (bits << np.arange(32, dtype=np.uint32)).sum(axis=2, dtype=np.uint32)


def _repack_words(w: QTensor, rows, nb):
    """q4m / q5m / q6 / q4k / q5k (kernels/q4m.glsl ...): (16 bytes of nibbles per block (rows, nb * 16), uint32
    words (rows, words a row): a block's float32 scale and min, then its high bits; q6: its halves' int8 scales and
    its d in one word, then its top bits; q4k: a super-block's d and dmin, its 8 scales and 8 mins a byte each; q5k:
    d and dmin, the scales and mins a byte each, block j's two in half-word j, then each block's fifth bits); q3: (a
    block's 16 bytes (rows, nb * 16), None): its integers' low and third bits and its halves' scales, q3.glsl; q2:
    the same of its integers, d and dmin, its halves' scales and mins, q2.glsl. A slice that cut K-quant
    super-blocks (w.keep, at 32-element blocks) keeps only its own blocks."""
    u = unpack(w)
    stored = pad(w.cols)  # the stored columns (with w.keep, the blocks around its own)
    q = (u.q + u.offset).astype(np.uint32)  # the stored unsigned integers (padding: 0, as its activations)
    name = kind(w.qtype, w.keep is None)
    if name in ("q4k", "q5k"):  # a super-block's d and dmin as the file has them, sc and m as bytes
        heads = np.ascontiguousarray(w.data.reshape(rows, nb // 8, quants.row_bytes(w.qtype, 256))[:, :, :4])
        sc, m = (a.reshape(rows, nb // 8, 8).astype(np.uint8) for a in (u.sc, u.m))
        blocks = q.reshape(rows, nb, 32)
        if name == "q4k":  # the 8 sc, then the 8 m
            words = np.concatenate([heads, sc, m], axis=2).view(np.uint32)
        else:  # sc_j, m_j pairs, then each block's fifth bits (bit e: element e)
            pairs = np.stack([sc, m], axis=3).reshape(rows, nb // 8, 16)
            fifth = _bit_words(blocks >> 4)
            words = np.concatenate([np.concatenate([heads, pairs], axis=2).view(np.uint32),
                                    fifth.reshape(rows, nb // 8, 8)], axis=2)
        return _nibbles(blocks), words.reshape(rows, nb // 8 * round(8 * SCALE_BYTES[name] / 4))
    per_sub = lambda a: a.repeat(u.super // u.sub, axis=1)  # noqa: E731
    f16_bits = lambda a: a.astype(np.float16).view(np.uint16).astype(np.uint32)  # noqa: E731
    kept = None if w.keep is None else np.concatenate([np.arange(a // 32, b // 32) for a, b in w.keep])

    def by_block(values, k=1, dtype=np.uint32):
        """(rows, w.cols / k) numbers, one per k stored columns -> (rows, nb, 32 / k): those of the kept 32-element
        blocks (the padding's 0)."""
        out = np.zeros((rows, stored // k), dtype)
        out[:, :values.shape[1]] = values
        out = out.reshape(rows, stored // 32, 32 // k)
        return out if kept is None else out[:, kept]

    blocks = by_block(q)
    if name in ("q6", "q3", "q2"):  # 2-bit fields of 16-element halves (element e at 2 (e % 16) of word e / 16):
        # q6's top bits, q3's low ones, q2's integers; a word of the halves' scales (kernels/half_scales.glsl, q2.glsl)
        two = blocks >> 4 if name == "q6" else blocks & 3
        fields = (two.reshape(rows, nb, 2, 16) << (2 * np.arange(16, dtype=np.uint32))).sum(axis=3, dtype=np.uint32)
        if name == "q2":  # per half its sc | m << 4 (a byte); the super-block's d and (minus) dmin in a word
            halves = by_block(u.sc | u.m << 4, 16)
            d_dmin = by_block((f16_bits(u.d) | f16_bits(u.dmin) << 16).repeat(u.super // 32, axis=1), 32)
            words = np.concatenate([fields, d_dmin, halves[:, :, :1] | halves[:, :, 1:] << 8], axis=2)
            return np.ascontiguousarray(words).view(np.uint8).reshape(rows, nb * 16), None
        halves = by_block(u.sc.astype(np.int8).view(np.uint8) | f16_bits(per_sub(u.d)) << 16, 16)  # sc, d above
        first = halves[:, :, :1] | (halves[:, :, 1:] & 255) << 8  # (d: the same super-block's in both)
        if name == "q6":
            return _nibbles(blocks), np.concatenate([first, fields], axis=2).reshape(rows, nb * 3)
        # a block's uvec4 (kernels/q3.glsl): the low bits' fields, the third bits, the scales' word
        words = np.concatenate([fields, _bit_words(blocks >> 2)[:, :, None], first], axis=2)
        return np.ascontiguousarray(words).view(np.uint8).reshape(rows, nb * 16), None
    scale = by_block(per_sub(u.d) * (1 if u.sc is None else u.sc), 32, np.float32)  # a block's, exact in float32
    low = by_block(per_sub(u.dmin) * (1 if u.m is None else u.m), 32, np.float32) if u.dmin is not None else 0 * scale
    low -= u.offset * scale  # the min: dmin * m (K-quants, sign included), m (_1); the stored integers are
    # unsigned: Q5_0's is -16 s
    words = [scale.view(np.uint32), low.view(np.uint32)]
    if name == "q5m":
        words.append(_bit_words(blocks >> 4)[:, :, None])
    return _nibbles(blocks), np.concatenate(words, axis=2).reshape(rows, nb * len(words))


def _repack(w: QTensor):
    """QTensor -> (blocks uint8 (rows, nb * 16 * UV), per-block scales (fp16 uint16 (rows, nb), or the uint32 words
    of _repack_words) or None)."""
    rows, nb = w.rows, pad(w.width) // 32
    name = kind(w.qtype, w.keep is None)
    if name in WORDS:
        return _repack_words(w, rows, nb)
    if name in ("q4_0", "q8_0", "iq4nl"):
        size = 34 if name == "q8_0" else 18
        b = w.data.reshape(rows, nb, size)
        quants = np.ascontiguousarray(b[:, :, 2:]).reshape(rows, nb * (size - 2))
        return quants, np.ascontiguousarray(b[:, :, :2]).view(np.uint16).reshape(rows, nb)
    dtype = np.float32 if name == "f32" else np.uint16
    out = np.zeros((rows, nb * 32), dtype)
    out[:, :w.cols] = w.data.view(dtype) if w.data.dtype != dtype else w.data
    return out.view(np.uint8), None


def stored_bytes(name, cols) -> tuple:
    """(block bytes, scale bytes) of one row of a matrix of `cols` columns as `_repack` stores it for kernels
    `name` (`kind`'s values)."""
    nb = pad(cols) // 32
    return nb * 16 * UV[name], int(nb * SCALE_BYTES.get(name, 0))  # (q4k, q5k: nb a multiple of 8)


def chunk_rows(dev, name, cols) -> int:
    """Rows of a matrix in one buffer: a buffer's binding stays within maxStorageBufferRange."""
    block, scale = stored_bytes(name, cols)
    return max(1, min(dev.max_range // max(block, 1), dev.max_range // max(scale, 1)))


def part_bytes(block, scale) -> int:
    """What a Part of these bytes holds on the device (Buffer sizes: at least 16 bytes, scales in whole words);
    0 for an empty matrix (its buffers of 16 bytes, which its dispatches bind, are not weights)."""
    if block == 0:
        return 0
    return max(block, 16) + (max(pad(scale, 4), 16) if scale else 0)


class Part:
    """Rows row0..row0+rows-1 of a matrix in one buffer (and its scales): its own buffers, or (`Part.bound`) byte
    ranges of a streaming window's slot."""

    def __init__(self, dev, row0, blocks, scales):
        self.row0, self.rows = row0, blocks.shape[0]
        self.w = Buffer(dev, blocks.nbytes)
        self.w.write(blocks)
        self.d = None
        if scales is not None:
            self.d = Buffer(dev, pad(scales.nbytes, 4))
            self.d.write(scales)
        self.owned = True

    @classmethod
    def bound(cls, row0, rows, slot, block_at, block_bytes, scale_at=None, scale_bytes=0):
        part = cls.__new__(cls)
        part.row0, part.rows, part.owned = row0, rows, False
        part.w = (slot, block_at, max(block_bytes, 16))
        part.d = (slot, scale_at, max(pad(scale_bytes, 4), 16)) if scale_at is not None else None
        return part

    def free(self):
        if self.owned:
            self.w.free()
            if self.d is not None:
                self.d.free()


class Int8Input(NamedTuple):
    """A pass's activations rounded to 8 bits by kernels/quantize_f32 (--activations int8), as bindings: the rounded
    floats (rows `stride` floats apart), the 8-bit integers and the blocks' scales."""
    rounded: tuple
    stride: int
    q: tuple
    d: tuple


class VulkanLinear:
    """A weight matrix in device memory; `__call__` runs one product (kernel tests, one-off uses). Resident, it
    holds its own buffers; streamed (`resident=False`, spmd.stream.DeviceWindow), it keeps its repacked `arrays`
    on the host for the window to spill, and `bind` places them in a slot of the window."""

    def __init__(self, backend, w: QTensor, resident=True):
        lacks = backend.lacks(w)
        if lacks:
            raise ValueError(f"vulkan backend: lacks {lacks}")
        self.backend, self.dev = backend, backend.dev
        self.qtype, self.type, self.rows, self.cols = w.qtype, kind(w.qtype, w.keep is None), w.rows, w.width
        self.nb = pad(self.cols) // 32
        blocks, scales = _repack(w)
        chunk = chunk_rows(self.dev, self.type, self.cols)
        pieces = [(r0, blocks[r0:r0 + chunk], None if scales is None else scales[r0:r0 + chunk])
                  for r0 in range(0, self.rows, chunk)]
        self.nbytes = sum(part_bytes(b.nbytes, 0 if d is None else d.nbytes) for _, b, d in pieces)
        self.parts, self.bindings, self.arrays, self.offsets = [], [], None, None
        if resident:
            self.parts = [Part(self.dev, r0, b, d) for r0, b, d in pieces]
            self._bind_parts()
        else:
            self.arrays = tuple(a for _, b, d in pieces for a in (b, d) if a is not None)
        self._io = None  # (n, x buffer, y buffer, recording) of the last call

    def pairs_with(self, other) -> bool:
        """Whether one product can take this matrix and `other` as SwiGLU's gate and up (`dispatch`'s pair): the
        same kernel type and shape. Most files give ffn_gate and ffn_up one type; a per-tensor mix need not."""
        return (self.type, self.rows, self.cols) == (other.type, other.rows, other.cols)

    def bind(self, slot, offsets):
        """Streamed: the arrays live in `slot` at `offsets` (one per array, in `arrays`' order) from now on."""
        self.offsets = list(offsets)
        arrays, self.parts = iter(zip(self.arrays, self.offsets)), []
        chunk = chunk_rows(self.dev, self.type, self.cols)
        for r0 in range(0, self.rows, chunk):
            block, at = next(arrays)
            scale, scale_at = next(arrays) if self.type in SCALE_BYTES else (None, None)
            self.parts.append(Part.bound(r0, block.shape[0], slot, at, block.nbytes, scale_at,
                                         0 if scale is None else scale.nbytes))
        self._bind_parts()

    def _bind_parts(self):
        """Each part's weights and scales as bindings (a product's 0-1, or 5-6 for the pair's), made once."""
        self.bindings = [(whole(p.w), whole(p.d or self.backend.dummy)) for p in self.parts]

    def dispatch(self, rec, x, x_stride, x_off, y, y_stride, y_off, n, pair=None, bias=None, bias_off=0,
                 accum=False, norm=None, produce=None, int8=None, quantize=None, wide=False):
        """Record y[tok, y_off + row] (+)= W[row] . x[tok] for n tokens (x, y, bias: Buffers or bindings).
        pair: a VulkanLinear that `pairs_with` this one; then y = silu(W x) * (pair x) (SwiGLU's gate and up).
        norm: (ss buffer, count, eps, dim): x is RMSNorm's input times its weight; scale by the producer's sums.
        produce (decode): (ss buffer, next norm weight binding, xg buffer): write xg = y * g and ss partials.
        int8 (--activations int8): x's rows as kernels/quantize_f32 wrote them, an `Int8Input`: a quantised
        matrix reads them (the 8-bit kernel where its type has one, else the rounded floats) instead of x.
        quantize (one-token decode with int8): (Int8Input, counts buffer): also round what this product finishes
        (xg where it produces, else y) into the Int8Input for the next product (flag QUANTIZE).
        wide: the caller queues other products beside this one with no barrier between them (q, k, v), or it is
        the classifier: matvec then takes `matvec_wide` rows a workgroup where it neither pairs nor produces (the
        sums of squares are counted per `matvec_nr` rows) and has MATVEC_WIDE_ROWS rows or more."""
        b, tg, suffix, x_bind = self.backend, 1, "f32", None
        if n <= b.matvec_rows:
            wide = wide and pair is None and produce is None and self.rows >= MATVEC_WIDE_ROWS
            nr = b.matvec_wide if wide else b.matvec_nr
            kernel, wg, nt = "matvec", b.matvec_wg, 1  # (nr, nt: kernels/matmul_io.glsl's NR, NT)
        elif self.dev.coop and self.type != "f32" and norm is None and self.nb > 0:
            # (an empty matrix, a rank's zero partial sum, keeps matmul, which reads nothing)
            nt, tg = coop_tile(self.rows, n, pair is not None, b.coop_tokens)
            kernel, wg, nr = "coopmat", 0, COOP_ROWS  # (wg: unread, the kernel sets its own size)
        else:
            kernel, wg, nr, nt = "matmul", b.matmul_wg, 2, 8
        assert kernel == "coopmat" or wg >= nr * nt
        if int8 is not None and self.type not in FLOATS:
            x, x_stride, x_off = int8.rounded, int8.stride, 0
            if self.type in INT8 and (kernel == "matvec" or self.dev.coop_int8):
                suffix, x, x_bind = "i8", int8.q, int8.d
        assert produce is None or (kernel == "matvec" and len(self.parts) == 1)
        assert quantize is None or (kernel == "matvec" and n == 1 and len(self.parts) == 1 and y_off % 32 == 0)
        bindings = MATVEC_BINDINGS if kernel == "matvec" else MATMUL_BINDINGS + (x_bind is not None)
        pipe = self.dev.pipeline(f"{kernel}_{self.type}_{suffix}", bindings, PUSH_BYTES,
                                 (wg, int(pair is not None), b.unroll if kernel == "matvec" else 1,
                                  nr if kernel == "matvec" else nt, tg))
        flags = (ACCUM if accum else 0) | (BIAS if bias is not None else 0)
        flags |= (NORM if norm is not None else 0) | (PRODUCE if produce is not None else 0)
        flags |= QUANTIZE if quantize is not None else 0
        ss_buf, count, eps, dim = norm if norm is not None else (None, 0, 0.0, 1)
        dummy = whole(b.dummy)
        gnext = xg = dummy
        if produce is not None:
            ss_buf, gnext, xg = produce
        x, y = whole(x), whole(y)
        shared = [x, dummy if bias is None else whole(bias), y]  # (bindings 2-4)
        tail = [dummy if ss_buf is None else whole(ss_buf), whole(gnext), whole(xg)]  # (7-9)
        if kernel == "matvec":
            out, counts = quantize if quantize is not None else (None, None)
            tail += [whole(x_bind or dummy)] + ([whole(out.q), whole(out.d), whole(out.rounded), whole(counts)]
                                                if out else [dummy] * 4)
        elif x_bind is not None:
            tail.append(whole(x_bind))
        for i, part in enumerate(self.parts):
            groups = -(-part.rows // nr)
            gx = min(groups, self.dev.max_groups)
            push = struct.pack(MATVEC_PUSH, part.rows, self.nb, x_stride, x_off, y_stride, y_off + part.row0, n,
                               groups, bias_off + part.row0, flags, count, 1.0 / dim, eps)
            own = self.bindings[i]
            other = pair.bindings[i] if pair is not None else own
            rec.dispatch(pipe, [*own, *shared, *other, *tail], push,
                         (gx, -(-n // nt), -(-groups // gx)))

    def __call__(self, x: np.ndarray, out: np.ndarray = None) -> np.ndarray:
        x, out, done = prepare_call(self, x, out)
        if done:
            return out
        n = x.shape[0]
        if self._io is None or self._io[0] != n:
            self._free_io()
            xb, yb = Buffer(self.dev, n * self.nb * 128, "host"), Buffer(self.dev, n * self.rows * 4, "host")
            rec = Recording(self.dev)
            int8 = self.backend.int8_input(n, self.nb * 32) if self.backend.int8 and self.type not in FLOATS else None
            if int8 is not None:
                self.backend.quantize(rec, xb, self.nb * 32, n, int8)
            self.dispatch(rec, xb, self.nb * 32, 0, yb, self.rows, 0, n, int8=int8)
            rec.barrier(to_host=True)
            rec.end()
            self._io = (n, xb, yb, rec, int8)
        _, xb, yb, rec, _ = self._io
        xs = xb.array(np.float32, (n, self.nb * 32))
        xs[:, :self.cols] = x
        xs[:, self.cols:] = 0.0
        rec.run()
        out[...] = yb.array(np.float32, (n, self.rows))
        return out

    def _free_io(self):
        if self._io is not None:
            _, xb, yb, rec, int8 = self._io
            rec.free()
            for buf in (xb, yb) + ((int8.rounded, int8.q, int8.d) if int8 is not None else ()):
                buf.free()
            self._io = None

    def free(self):
        self._free_io()
        for p in self.parts:
            p.free()
        self.parts, self.bindings = [], []


class VulkanBackend(Backend):
    model_owns_weights = True
    name = "vulkan"

    def widens_f16_cache(self, head_dim):
        return False  # (the attention kernels read float16 as it is)

    def holds(self, qtype):
        return quants.held_type(qtype, TYPES.__contains__)

    def lacks(self, w):
        """The repacked types (per-block scales) take slices that cut K-quant super-blocks at 32-element blocks;
        a cut through a 32-element block, or a type without a kernel, is held as F32."""
        if self.holds(w.qtype) != w.qtype:
            return f"a kernel for {w.qtype.name} weights"
        if _cut_within_blocks(w.qtype, w.keep):
            return f"{w.qtype.name} slices that cut through its 32-element blocks"
        return None

    def __init__(self, device: int = None, wrap: bool = False, activations="f32"):
        index = device or 0
        if index not in _DEVICES:
            _DEVICES[index] = Device(index, wrap)
        self.dev = _DEVICES[index]
        self.dev.check_index(index, wrap)
        self.int8 = activations == "int8"  # quantised products read 8-bit activations (VulkanModel._int8)
        self.description = f"vulkan ({self.dev.name}{', int8' * self.int8})"
        if self.int8 and not self.dev.int_dot:
            raise UserError(f"--activations int8: the Vulkan device {self.dev.name} lacks 8-bit integer dot "
                            f"products ({Device.INT_DOT}): use --activations f32")
        # threads per workgroup of the kernels (specialisation constants), e.g. SPMD_VK_MATVEC=128 to try others
        # (GPU: 64 measured 4-8% faster than 32 and 128 on an H200 at TinyLlama's shapes; lavapipe: 16 of 16-64)
        # and weight rows per matvec workgroup, and for a `wide` product: SPMD_VK_MATVEC=64,4,8, a number left out
        # keeping its default (H100, Llama-2-7B shapes, a barrier after each: 8 rows read 4096 x 4096 in 9.9 us
        # against 9.1, 12288 x 4096 in 16.6 against 20.5; 8 rows for every product made a 7B Q4_0 decode 4% slower)
        default = (16, 4, 4) if self.dev.is_cpu else (64, 4, 8)
        matvec = env_tuple("SPMD_VK_MATVEC", default)
        self.matvec_wg, self.matvec_nr, self.matvec_wide = (matvec + default[len(matvec):])[:3]
        if len(matvec) > 3 or not {self.matvec_nr, self.matvec_wide} <= {1, 2, 4, 8, 16, 32} or \
                self.matvec_wg < max(self.matvec_nr, self.matvec_wide):
            raise UserError(f"SPMD_VK_MATVEC={','.join(map(str, matvec))}: give threads and rows per workgroup "
                            f"(and for wide products), rows 1, 2, 4, 8, 16 or 32 and at most the threads "
                            f"(or leave it unset)")
        self.matmul_wg = env_tuple("SPMD_VK_MATMUL", (64,))[0]
        self.unroll = env_tuple("SPMD_VK_UNROLL", (1,))[0]  # blocks of a row a decode thread loads at once
        # passes of up to this many token rows (decode of several sequences) run the matrix-vector kernel, one
        # workgroup row per token, reading the weights once a token: on a GPU the 8-token matmul tile costs about as
        # much as 8 of them (H200, Llama-2-7B Q4_0: 2 sequences decoded 3.6x slower than 1); lavapipe keeps matmul
        self.matvec_rows = env_tuple("SPMD_VK_MATVEC_ROWS", (1,) if self.dev.is_cpu else (8,))[0]
        self.split_keys = env_tuple("SPMD_VK_SPLIT_KEYS", (SPLIT_KEYS,))[0]  # a long decode's keys per workgroup
        if not 1 <= self.split_keys <= 256:  # at most the attention kernel's chunk (CH)
            raise UserError(f"SPMD_VK_SPLIT_KEYS={self.split_keys}: give 1 to 256 (or leave it unset)")
        self.coop_tokens = env_tuple("SPMD_VK_COOP_TOKENS", (0,))[0]  # coopmat's tokens (0: by COOP_WIDE)
        if self.coop_tokens not in (0, 16, 32, 64):  # BT: whole fragments of 16 tokens over 4 subgroups
            raise UserError(f"SPMD_VK_COOP_TOKENS={self.coop_tokens}: give 16, 32 or 64 (or leave it unset)")
        self.norm_wg = 64 if self.dev.is_cpu else 256
        # the attention kernel's threads a workgroup: at most 256 (its shared memory grows with them: at 256 and a
        # head_dim of 256, 15 KB of the 16 KB a Vulkan device may have) and the device's most
        most = min(256, self.dev.max_threads)
        self.attention_wg = env_tuple("SPMD_VK_ATTENTION", (min(16, most),) if self.dev.is_cpu else (most,))[0]
        if not 1 <= self.attention_wg <= most:
            raise UserError(f"SPMD_VK_ATTENTION={self.attention_wg}: give 1 to {most} threads (or leave it unset)")
        # values an attention thread loads before summing them (kernels/attention_main.glsl VU)
        self.attention_unroll = env_tuple("SPMD_VK_ATTENTION_UNROLL", (8,))[0]
        if not 1 <= self.attention_unroll <= 32:
            raise UserError(f"SPMD_VK_ATTENTION_UNROLL={self.attention_unroll}: give 1 to 32 (or leave it unset)")
        # a one-rank greedy decode's tokens chained on the device a submit (vulkan_model's `ahead`; 0: none)
        self.ahead = env_tuple("SPMD_VK_AHEAD", (AHEAD_TOKENS,))[0]
        if not 0 <= self.ahead <= 64:
            raise UserError(f"SPMD_VK_AHEAD={self.ahead}: give 0 (off) to 64 (or leave it unset)")
        self.dummy = Buffer(self.dev, 64)

    def int8_input(self, n, stride):
        """Buffers for n rows of `stride` (a multiple of 32) activations rounded to 8 bits (the caller frees
        them)."""
        return Int8Input(Buffer(self.dev, n * stride * 4), stride, Buffer(self.dev, n * stride),
                         Buffer(self.dev, n * stride // 32 * 8))

    def quantize(self, rec, x, x_stride, n, into):
        """Record `into` (an Int8Input) = the first into.stride floats of x's n rows (x_stride apart) rounded to 8
        bits a block (kernels/quantize_f32), then a barrier."""
        pipe = self.dev.pipeline("quantize_f32", 4, 12, (64,))  # (64: a multiple of a block's 8 threads)
        nb = into.stride // 32
        rec.dispatch(pipe, [whole(b) for b in (x, into.q, into.d, into.rounded)], struct.pack("<3I", nb, x_stride, 0),
                     (-(-nb * 8 // 64), n, 1))
        rec.barrier()
        rec.mark("int8")

    def linear(self, w: QTensor, resident=True) -> VulkanLinear:
        return VulkanLinear(self, w, resident)

    def embeds(self, qtype) -> bool:
        """Whether a token_embd of the file's `qtype` can be looked up on the device (kernels/embed_<w>) to the
        host's numbers: held with the file's numbers (a type dequantised at load is not; a native type without a
        kernel is held as F32, which has one)."""
        return qtype in quants.NATIVE

    def held_bytes(self, qtype, rows, cols, keep=None):
        """What a VulkanLinear of a (rows, cols) matrix of `qtype` holds on the device (a type without a kernel, or
        a slice that cuts its 32-element blocks: as F32); a slice that cuts super-blocks holds its own columns'
        blocks."""
        name = "f32" if qtype not in TYPES or _cut_within_blocks(qtype, keep) else kind(qtype, keep is None)
        cols = cols if keep is None else sum(b - a for a, b in keep)
        block, scale = stored_bytes(name, cols)
        chunk = chunk_rows(self.dev, name, cols)
        return sum(part_bytes(block * n, scale * n) for n in (min(chunk, rows - r0) for r0 in range(0, rows, chunk)))

    def gpu(self):
        return None if self.dev.is_cpu else self.dev.index

    def device_memory_bytes(self):
        """The device's main memory heap, less what this process holds there (None for lavapipe: host memory)."""
        if self.dev.is_cpu:
            return None
        heap = self.dev.main_heap
        return self.dev.heap_size[heap] - self.dev.heap_used[heap]

    def make_model(self, cfg, weights, share, max_seq, slots=1, kv_cache="f32"):
        from .vulkan_model import VulkanModel
        return VulkanModel(self, cfg, weights, share, max_seq, slots, kv_cache)

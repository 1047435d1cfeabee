"""Weight types as a table, and the readable numpy dequantisation of the ones we keep as they are.

A 2-D weight is a `QTensor`: `rows` output rows of `cols` inputs each, stored the way the GGUF file stores it
(row-major; a quantised row is cols / block elements blocks of block bytes). The block layouts, in llama.cpp's
terms (f16: a float16; q: a row's integer, nibble `lo` plus high bits `hi`):

  Q8_0  (34 B / 32)   f16 d, 32 int8                                   d * q
  Q4_0  (18 B / 32)   f16 d, 16 bytes: low nibbles are elements 0..15,  d * (q - 8)
                      high nibbles 16..31
  Q4_1  (20 B / 32)   f16 d, f16 m, 16 bytes as Q4_0                     d * q + m
  Q5_0  (22 B / 32)   f16 d, uint32 hi (bit e: element e), 16 bytes      d * (q - 16)
  Q5_1  (24 B / 32)   f16 d, f16 m, uint32 hi, 16 bytes                  d * q + m
  Q4_K  (144 B / 256) f16 d, f16 dmin, 12 bytes of eight 6-bit (sc, m) pairs, one per 32 elements; 128 bytes:
                      byte 32c + i holds element i of sub-block 2c (low nibble) and of 2c + 1 (high)
                                                                       d * sc * q - dmin * m
  Q5_K  (176 B / 256) f16 d, f16 dmin, 12 bytes of (sc, m), 32 bytes hi (bit j of byte i: element i of
                      sub-block j), 128 bytes as Q4_K                  d * sc * q - dmin * m
  Q6_K  (210 B / 256) 128 bytes lo, 64 bytes hi (2 bits each), 16 int8 sc (one per 16 elements), f16 d: element
                      128h + 32k + i is lo: byte 64h + 32(k % 2) + i, nibble k // 2; hi: byte 32h + i, bits 2k..2k+1
                                                                       d * sc * (q - 32)
  Q2_K  (84 B / 256)  16 bytes: sixteen (sc, m) nibble pairs (low: sc), one per 16 elements; 64 bytes q (2 bits
                      each, laid out as Q3_K's lo below); f16 d, f16 dmin   d * sc * q - dmin * m
  Q3_K  (110 B / 256) 32 bytes hi, 64 bytes lo (2 bits each), 12 bytes of sixteen 6-bit sc (one per 16 elements,
                      stored plus 32), f16 d: element 128h + 32k + i is lo: byte 32h + i, bits 2k..2k+1; hi: byte i,
                      bit 4h + k, set for q >= 0; sc s: nibble s // 8 of byte s % 8, top bits 2(s // 4).. of byte
                      8 + s % 4                                        d * sc * (q - 4)
  IQ4_NL (18 B / 32)  f16 d, 16 bytes as Q4_0, each nibble an index into IQ4_NL_VALUES    d * value
"""
import functools
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gguf_quants

# Types the cpu backend computes with as stored (Vulkan: those of its TYPES); the reader keeps these as stored, and
# dequantises any other type to F32 at load.
NATIVE = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
          T.IQ4_NL)
FLOATS = (T.F32, T.F16, T.BF16)  # float matrices: float activations under --activations int8 too
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int16)
K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)  # 256-element super-blocks
# byte offsets of each block's float16 fields (d, then m or dmin where the type has one)
F16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q4_K: (0, 2),
              T.Q5_K: (0, 2), T.Q6_K: (208,), T.Q2_K: (80, 82), T.Q3_K: (108,), T.IQ4_NL: (0,)}
BLOCK = 32  # elements per block of the 32-element quant types, and the unit FFN columns are split in
SUPER = 256  # elements per K-quant super-block


def block_size(qtype) -> int:
    """Elements per block (1 for plain float types)."""
    return GGML_QUANT_SIZES[qtype][0]


def held_type(qtype, computes=NATIVE.__contains__):
    """The type a backend with kernels for the types `computes` names (by default the cpu backend's) holds a file's
    `qtype` weights in: the file's where it has its kernels, else F32 (dequantised)."""
    return qtype if qtype in NATIVE and computes(qtype) else T.F32


def row_bytes(qtype, cols: int) -> int:
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    return cols // elems * nbytes


@dataclass
class QTensor:
    qtype: T
    rows: int
    cols: int  # as stored
    data: np.ndarray  # F32: float32 (rows, cols); F16: float16; BF16: uint16; quantised: uint8 (rows, row_bytes)
    # [(start, stop)] of the stored columns that are the matrix's, in order, or None for all: a column slice that
    # cuts through quant blocks keeps the whole blocks around it (its numbers stay exactly the file's)
    keep: tuple = None

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def width(self) -> int:
        """The matrix's columns (its inputs)."""
        return self.cols if self.keep is None else sum(b - a for a, b in self.keep)


def from_float(w: np.ndarray) -> QTensor:
    w = np.ascontiguousarray(w, dtype=np.float32)
    return QTensor(T.F32, w.shape[0], w.shape[1], w)


def quantize(w: np.ndarray, qtype) -> QTensor:
    """Float (rows, cols) -> QTensor of `qtype` (through gguf's reference quantiser)."""
    w = np.asarray(w, dtype=np.float32)
    if qtype == T.F32:
        return from_float(w)
    if qtype == T.F16:
        return QTensor(qtype, *w.shape, w.astype(np.float16))
    if qtype == T.IQ4_NL:
        data = _quantize_iq4_nl(w)
    else:
        data = _quantize_k(w, qtype) if qtype in K_QUANTS else gguf_quants.quantize(w, qtype)
    if qtype == T.BF16:
        data = data.view(np.uint16)
    return QTensor(qtype, w.shape[0], w.shape[1], np.ascontiguousarray(data))


def _quantize_k(w, qtype) -> np.ndarray:
    """A plain K-quant quantiser (gguf has none): each sub-block's range mapped onto its integers, the sub-block
    scales (and mins) onto 6 / 8 bits of the super-block's d (and dmin). Not llama.cpp's search for the best
    scales, so a little less precise, but the blocks it writes are what llama.cpp reads."""
    rows, cols = w.shape
    if cols % SUPER:
        raise ValueError(f"{qtype.name} needs rows of whole {SUPER}-element super-blocks, not {cols}")
    x = w.reshape(-1, SUPER).astype(np.float32)
    f16 = lambda a: a.astype(np.float16)  # noqa: E731
    if qtype == T.Q2_K:  # each sub-block's range onto 0..3, its minimum (or 0) the min
        sub = x.reshape(-1, 16, 16)
        low = np.minimum(sub.min(axis=2), 0)
        scale = (sub.max(axis=2) - low) / 3
        d, dmin = f16(scale.max(axis=1) / 15), f16(-low.min(axis=1) / 15)
        sc = np.clip(np.round(scale / np.maximum(d.astype(np.float32), 1e-30)[:, None]), 0, 15)
        m = np.clip(np.round(-low / np.maximum(dmin.astype(np.float32), 1e-30)[:, None]), 0, 15)
        step = d.astype(np.float32)[:, None] * sc
        offset = dmin.astype(np.float32)[:, None] * m
        q = np.clip(np.round((sub + offset[..., None]) / np.where(step > 0, step, 1)[..., None]), 0, 3)
        parts = [(sc.astype(np.uint8) | (m.astype(np.uint8) << 4)), _pack_2bit(q), d[:, None].view(np.uint8),
                 dmin[:, None].view(np.uint8)]
        return np.concatenate(parts, axis=1).reshape(rows, -1)
    if qtype == T.Q3_K:  # each sub-block's extreme onto -4, the scale's sign following it
        sub = x.reshape(-1, 16, 16)
        peak = np.take_along_axis(sub, np.abs(sub).argmax(axis=2)[..., None], axis=2)[..., 0]
        d = f16(np.abs(peak).max(axis=1) / (4 * 31))
        sc = np.clip(np.round(-peak / 4 / np.maximum(d.astype(np.float32), 1e-30)[:, None]), -32, 31)
        step = d.astype(np.float32)[:, None] * sc
        q = np.clip(np.round(sub / np.where(step != 0, step, 1)[..., None]), -4, 3)
        return _pack_q3_k((q + 4).reshape(-1, SUPER), sc, d).reshape(rows, -1)
    if qtype == T.Q6_K:
        sub = x.reshape(-1, 16, 16)
        amax = np.abs(sub).max(axis=2)  # (n, 16)
        d = f16(amax.max(axis=1) / (31 * 127))
        sc = np.clip(np.round(amax / 31 / np.maximum(d.astype(np.float32), 1e-30)[:, None]), 0, 127)
        step = d.astype(np.float32)[:, None] * sc
        q = np.clip(np.round(sub / np.where(step > 0, step, 1)[..., None]), -32, 31).astype(np.int16) + 32
        return _pack_q6_k(q.reshape(-1, SUPER), sc, d).reshape(rows, -1)
    top = 15 if qtype == T.Q4_K else 31
    sub = x.reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=2), 0)  # (n, 8): what m undoes
    scale = (sub.max(axis=2) - low) / top
    d, dmin = f16(scale.max(axis=1) / 63), f16(-low.min(axis=1) / 63)
    sc = np.clip(np.round(scale / np.maximum(d.astype(np.float32), 1e-30)[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.round(-low / np.maximum(dmin.astype(np.float32), 1e-30)[:, None]), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.round((sub + offset[..., None]) / np.where(step > 0, step, 1)[..., None])
    q = np.clip(q, 0, top).astype(np.uint8)  # (n, 8, 32)
    packed = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)
    qs = (q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)  # byte 32c + i: sub-blocks 2c and 2c + 1
    parts = [d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), packed]
    if qtype == T.Q5_K:  # bit j of byte i: element i of sub-block j
        parts.append(np.bitwise_or.reduce((q >> 4) << np.arange(8, dtype=np.uint8)[:, None], axis=1))
    return np.concatenate(parts + [qs.reshape(-1, 128)], axis=1).reshape(rows, -1)


def _quantize_iq4_nl(w) -> np.ndarray:
    """IQ4_NL blocks: each block's extreme onto the table's -127, every element to its nearest value there."""
    x = w.reshape(-1, BLOCK).astype(np.float32)
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    d = (-peak / 127).astype(np.float16)
    ratio = x / np.where(d != 0, d, 1).astype(np.float32)
    idx = np.abs(ratio[..., None] - IQ4_NL_VALUES).argmin(axis=2).astype(np.uint8)
    qs = idx[:, :16] | (idx[:, 16:] << 4)
    return np.concatenate([d.view(np.uint8), qs], axis=1).reshape(w.shape[0], -1)


def _pack_q6_k(q, sc, d) -> np.ndarray:
    """Q6_K blocks (n, 210) from each super-block's 256 stored integers q (0..63), 16 sub-block scales sc and d."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)  # (half h, k, i): element 128h + 32k + i
    ql = (q[:, :, 0:2] & 15) | ((q[:, :, 2:4] & 15) << 4)  # byte 64h + 32(k % 2) + i, nibble k // 2
    qh = _pack_2bit(q >> 4)
    return np.concatenate([ql.reshape(-1, 128), qh, sc.astype(np.int8).view(np.uint8),
                           d.astype(np.float16)[:, None].view(np.uint8)], axis=1)


def _pack_2bit(q) -> np.ndarray:
    """Q2_K's q, Q3_K's low and Q6_K's high bits (n, 64) from each super-block's 256 2-bit integers: element
    128h + 32k + i in bits 2k..2k+1 of byte 32h + i (`_two_bits` reads them)."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return np.bitwise_or.reduce(q << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=2).reshape(-1, 64)


def _pack_q3_k(q, sc, d) -> np.ndarray:
    """Q3_K blocks (n, 110) from each super-block's 256 stored integers q (0..7), 16 sub-block scales sc (-32..31)
    and d."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)  # (half h, k, i): element 128h + 32k + i
    hi = np.bitwise_or.reduce((q >> 2).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    lo = _pack_2bit(q & 3)
    s = (sc.astype(np.int16) + 32).astype(np.uint8)  # (n, 16)
    nibbles = (s[:, :8] & 15) | ((s[:, 8:] & 15) << 4)
    tops = np.bitwise_or.reduce((s >> 4).reshape(-1, 4, 4) << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=1)
    return np.concatenate([hi, lo, nibbles, tops, d.astype(np.float16)[:, None].view(np.uint8)],
                          axis=1)


def _blocks(qt: QTensor) -> np.ndarray:
    elems, nbytes = GGML_QUANT_SIZES[qt.qtype]
    return qt.data.reshape(qt.rows, qt.cols // elems, nbytes)  # (rows, n_blocks, block bytes)


def _f16(b, at):
    """The float16 at byte `at` of each block, as float32 (..., 1)."""
    return b[..., at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs):
    """16 bytes a block (..., 16) -> the 32 nibbles in element order: the low ones, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(hi, n):
    """uint32 (..., 1) -> its n low bits (..., n), bit e at e."""
    return ((hi.astype(np.uint32) >> np.arange(n, dtype=np.uint32)) & 1).astype(np.uint8)


def _two_bits(planes):
    """(rows, blocks, 64) bytes of 2-bit fields -> (rows, blocks, 2, 4, 32): bits 2k..2k+1 of byte 32h + i are
    element (h, k, i) (Q2_K's integers, Q3_K's low bits, Q6_K's high bits; `_pack_2bit` writes them)."""
    return (planes.reshape(*planes.shape[:2], 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3


def k_scales(packed):
    """Q4_K / Q5_K: the 12 bytes of scales (..., 12) -> (sc, m), each (..., 8) uint8 of 6 bits. Sub-blocks 0..3
    keep theirs in the low 6 bits of bytes j (sc) and 4 + j (m); 4..7 in the nibbles of byte 8 + j (sc low, m low)
    with the two top bits in the top bits of bytes j - 4 (sc) and j (m)."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, m


@dataclass
class Unpacked:
    """A quantised QTensor's numbers taken apart: element (r, e) is
    d[r, e // super] * sc[r, e // sub] * q[r, e] + dmin[r, e // super] * m[r, e // sub]
    where sc and m are 1 when None, and the dmin term 0 when dmin is None."""
    q: np.ndarray  # int16 (rows, cols): the element's integer, its offset taken off (Q4_0: nibble - 8)
    offset: int  # what was taken off the stored unsigned integer
    super: int  # elements per d (and dmin)
    sub: int  # elements per sc (and m)
    d: np.ndarray  # float32 (rows, cols / super), from float16
    sc: np.ndarray = None  # int16 (rows, cols / sub)
    dmin: np.ndarray = None  # float32 (rows, cols / super), its sign included (K-quants: minus the file's dmin)
    m: np.ndarray = None  # int16 (rows, cols / sub)


def unpack(qt: QTensor) -> Unpacked:
    """A quantised QTensor's stored columns taken apart (the one decoder of the block layouts above: dequantize and
    the backends' repacking read the numbers through it). The _1 types' own min m goes to `dmin` (it is a float per
    block, as a K-quant's dmin is), their `m` staying None."""
    t, b = qt.qtype, _blocks(qt)
    rows = qt.rows
    i16 = lambda a, per=1: a.astype(np.int16).reshape(rows, qt.cols // per)  # noqa: E731  (per: elements each)
    if t == T.Q8_0:
        return Unpacked(i16(b[..., 2:].view(np.int8)), 0, 32, 32, _f16(b, 0)[..., 0])
    if t in (T.Q4_0, T.Q4_1):
        q, offset = _nibbles(b[..., -16:]), (8 if t == T.Q4_0 else 0)
    elif t in (T.Q5_0, T.Q5_1):
        at = 2 if t == T.Q5_0 else 4
        q = _nibbles(b[..., -16:]) | (_bits(b[..., at:at + 4].copy().view(np.uint32), 32) << 4)
        offset = 16 if t == T.Q5_0 else 0
    if t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        low = _f16(b, 2)[..., 0] if t in (T.Q4_1, T.Q5_1) else None
        return Unpacked(i16(q) - offset, offset, 32, 32, _f16(b, 0)[..., 0], dmin=low)
    if t in (T.Q4_K, T.Q5_K):
        sc, m = k_scales(b[..., 4:16])  # (rows, n, 8)
        qs = b[..., -128:].reshape(*b.shape[:2], 4, 1, 32)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(*b.shape[:2], 8, 32)
        if t == T.Q5_K:  # bit j of byte i: element i of sub-block j
            q = q | (((b[..., 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1).transpose(0, 1, 3, 2) << 4)
        return Unpacked(i16(q), 0, SUPER, 32, _f16(b, 0)[..., 0], i16(sc, 32), -_f16(b, 2)[..., 0], i16(m, 32))
    if t == T.Q6_K:
        lo = b[..., :128].reshape(*b.shape[:2], 2, 2, 1, 32)  # (half, byte group k % 2, 1, i)
        lo = np.concatenate([lo & 0x0F, lo >> 4], axis=4)  # (half, k % 2, k // 2, i)
        lo = lo.transpose(0, 1, 2, 4, 3, 5).reshape(*b.shape[:2], 2, 4, 32)  # (half, k, i)
        hi = _two_bits(b[..., 128:192])
        return Unpacked(i16(lo | (hi << 4)) - 32, 32, SUPER, 16, _f16(b, 208)[..., 0],
                        i16(b[..., 192:208].view(np.int8), 16))
    if t == T.Q2_K:
        q = _two_bits(b[..., 16:80])
        sc, m = b[..., :16] & 15, b[..., :16] >> 4
        return Unpacked(i16(q), 0, SUPER, 16, _f16(b, 80)[..., 0], i16(sc, 16), -_f16(b, 82)[..., 0], i16(m, 16))
    if t == T.Q3_K:
        lo = _two_bits(b[..., 32:96])
        hi = ((b[..., None, 0:32] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(lo.shape)  # (h, k, i)
        nib = np.concatenate([b[..., 96:104] & 15, b[..., 96:104] >> 4], axis=-1)  # sc s: nibble s // 8 of s % 8
        top = ((b[..., 104:108, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3).transpose(0, 1, 3, 2)
        sc = i16(nib | (top.reshape(nib.shape) << 4), 16) - 32
        return Unpacked(i16(lo | (hi << 2)) - 4, 4, SUPER, 16, _f16(b, 108)[..., 0], sc)
    if t == T.IQ4_NL:  # (offset 0: its integers are a table's values, not a stored integer less an offset)
        return Unpacked(i16(IQ4_NL_VALUES[_nibbles(b[..., 2:])]), 0, 32, 32, _f16(b, 0)[..., 0])
    raise ValueError(f"no native dequantisation for {t.name}")


def dequantize(qt: QTensor) -> np.ndarray:
    """QTensor -> float32 (rows, width), vectorised, no Python loop over blocks."""
    dense = _dequantize_stored(qt)
    return dense if qt.keep is None else np.concatenate([dense[:, a:b] for a, b in qt.keep], axis=1)


def _dequantize_stored(qt: QTensor) -> np.ndarray:
    if qt.qtype == T.F32:
        return qt.data
    if qt.qtype == T.F16:
        return qt.data.astype(np.float32)
    if qt.qtype == T.BF16:
        return (qt.data.astype(np.uint32) << 16).view(np.float32)
    u = unpack(qt)
    per_sub = lambda a: a.repeat(u.super // u.sub, axis=1)  # noqa: E731  (rows, cols / super) -> per sub-block
    scale = per_sub(u.d) if u.sc is None else per_sub(u.d) * u.sc
    values = scale[..., None] * u.q.reshape(qt.rows, qt.cols // u.sub, u.sub)
    if u.dmin is not None:
        low = per_sub(u.dmin) if u.m is None else per_sub(u.dmin) * u.m
        values = values + low[..., None]
    return values.astype(np.float32, copy=False).reshape(qt.rows, qt.cols)


@functools.lru_cache(maxsize=None)
def readable(qtype) -> bool:
    """Whether spmd can read weights of `qtype`: kept as they are, or dequantised at load by gguf's code (which has
    no dequantisation for some types: Q8_K, Q8_1, the integer types, ...)."""
    if qtype in NATIVE:
        return True
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    try:
        gguf_quants.dequantize(np.zeros((1, nbytes), np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def dequantize_any(raw: np.ndarray, qtype, rows: int, cols: int) -> np.ndarray:
    """Raw bytes of any GGUF type -> float32 (rows, cols); gguf's own code for the types we do not keep."""
    if qtype in NATIVE:
        return dequantize(as_qtensor(raw, qtype, rows, cols))
    if rows == 0 or cols == 0:  # a rank that holds no heads or FFN columns
        return np.zeros((rows, cols), np.float32)
    with np.errstate(all="ignore"):  # garbage blocks give inf / nan, which the engine's checks report in one line
        return gguf_quants.dequantize(raw.reshape(rows, -1), qtype).astype(np.float32).reshape(rows, cols)


def as_qtensor(raw: np.ndarray, qtype, rows: int, cols: int) -> QTensor:
    """View raw little-endian bytes (rows, row_bytes) as a QTensor of a native type."""
    raw = raw.reshape(rows, row_bytes(qtype, cols))
    dtype = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}.get(qtype)
    data = raw.view(dtype) if dtype is not None else raw
    return QTensor(qtype, rows, cols, data)

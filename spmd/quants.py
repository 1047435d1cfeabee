"""Weight types as a table, and the readable numpy dequantisation of the ones we keep as they are.

A 2-D weight is a `QTensor`: `rows` output rows of `cols` inputs each, stored the way the GGUF file stores it
(row-major; a quantised row is `cols // 32` blocks). Q8_0 block: fp16 scale + 32 int8. Q4_0 block: fp16 scale +
16 bytes, low nibbles are elements 0..15 and high nibbles 16..31, value = (nibble - 8) * scale.
"""
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gguf_quants

# Types the engine computes with as stored; any other type is dequantised to F32 at load.
NATIVE = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0)
BLOCK = 32  # elements per quant block of Q8_0 / Q4_0, and the unit FFN columns are split in


def block_size(qtype) -> int:
    """Elements per block (1 for plain float types)."""
    return GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype, cols: int) -> int:
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    return cols // elems * nbytes


@dataclass
class QTensor:
    qtype: T
    rows: int
    cols: int
    data: np.ndarray  # F32: float32 (rows, cols); F16: float16; BF16: uint16; Q8_0/Q4_0: uint8 (rows, row_bytes)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


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
    data = gguf_quants.quantize(w, qtype)
    if qtype == T.BF16:
        data = data.view(np.uint16)
    return QTensor(qtype, w.shape[0], w.shape[1], np.ascontiguousarray(data))


def _blocks(qt: QTensor, block_bytes: int) -> np.ndarray:
    return qt.data.reshape(qt.rows, qt.cols // BLOCK, block_bytes)  # (rows, n_blocks, block_bytes)


def dequantize(qt: QTensor) -> np.ndarray:
    """QTensor -> float32 (rows, cols), vectorised, no Python loop over blocks."""
    if qt.qtype == T.F32:
        return qt.data
    if qt.qtype == T.F16:
        return qt.data.astype(np.float32)
    if qt.qtype == T.BF16:
        return (qt.data.astype(np.uint32) << 16).view(np.float32)
    if qt.qtype == T.Q8_0:
        b = _blocks(qt, 34)
        scale = b[:, :, :2].copy().view(np.float16).astype(np.float32)  # (rows, n_blocks, 1)
        q = b[:, :, 2:].view(np.int8).astype(np.float32)  # (rows, n_blocks, 32)
        return (q * scale).reshape(qt.rows, qt.cols)
    if qt.qtype == T.Q4_0:
        b = _blocks(qt, 18)
        scale = b[:, :, :2].copy().view(np.float16).astype(np.float32)
        nib = b[:, :, 2:]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=2).astype(np.float32) - 8.0  # (rows, n_blocks, 32)
        return (q * scale).reshape(qt.rows, qt.cols)
    raise ValueError(f"no native dequantisation for {qt.qtype.name}")


def dequantize_any(raw: np.ndarray, qtype, rows: int, cols: int) -> np.ndarray:
    """Raw bytes of any GGUF type -> float32 (rows, cols); gguf's own code for the types we do not keep."""
    if qtype in NATIVE:
        return dequantize(as_qtensor(raw, qtype, rows, cols))
    if rows == 0 or cols == 0:  # a rank that holds no heads or FFN columns
        return np.zeros((rows, cols), np.float32)
    return gguf_quants.dequantize(raw.reshape(rows, -1), qtype).astype(np.float32).reshape(rows, cols)


def as_qtensor(raw: np.ndarray, qtype, rows: int, cols: int) -> QTensor:
    """View raw little-endian bytes (rows, row_bytes) as a QTensor of a native type."""
    raw = raw.reshape(rows, row_bytes(qtype, cols))
    dtype = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}.get(qtype)
    data = raw.view(dtype) if dtype is not None else raw
    return QTensor(qtype, rows, cols, data)

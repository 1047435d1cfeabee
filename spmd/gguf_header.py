"""A lean reader of a GGUF file's header: metadata and tensor table, straight from the mapped bytes.

Scalars are read at once; an array (a vocabulary, its merges) is only located, and decoded when `value(key)` asks
for it. The `gguf` package's own reader builds numpy objects for every string of every array: for a Llama 3
vocabulary (128k tokens, 280k merges) that took 9 s and 600 MiB on each rank, though only rank 0 reads the
vocabulary. Layout (little-endian): magic "GGUF", version u32 (2 or 3), tensor count u64, metadata count u64;
metadata (key string, type u32, value); tensor infos (name string, n_dims u32, dims u64 each, type u32, offset u64);
padding to `general.alignment` (32); tensor data. A string is a u64 length and UTF-8 bytes.
"""
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGUF_MAGIC, GGUFValueType as V

SCALARS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
DTYPES = {t: np.dtype(f) for t, f in SCALARS.items()}


class HeaderError(ValueError):
    pass


@dataclass(frozen=True)
class ArrayRef:
    """Where an array value lies, to decode it when asked."""
    item_type: V
    count: int
    offset: int  # of its first item


@dataclass(frozen=True)
class RawTensor:
    name: str
    ggml_type: int
    dims: tuple  # GGML order: dims[0] is the row length
    offset: int  # from the start of the data section


class GGUFHeader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0
        if len(buf) < 4 or self._u32() != GGUF_MAGIC:
            raise HeaderError("no GGUF magic at the start")
        if len(buf) < 24:
            raise HeaderError(f"the file ends within its header ({len(buf)} bytes): it is truncated")
        version = self._u32()
        if version not in (2, 3):
            raise HeaderError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._u64(), self._u64()
        if n_tensors > len(buf) or n_kv > len(buf):
            raise HeaderError(f"{n_tensors} tensors and {n_kv} metadata entries cannot fit in its {len(buf)} bytes: "
                              "it is truncated or damaged")
        self.fields = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(V(self._u32()))
        self.tensors = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= 1 << 20 \
                or alignment & (alignment - 1):
            raise HeaderError(f"general.alignment is {alignment!r:.40}; it must be a power of two from 1 to 1048576")
        self.alignment = alignment
        self.data_offset = -(-self.pos // alignment) * alignment

    def value(self, key, default=None):
        """A metadata value as plain Python (arrays as lists), or `default`."""
        v = self.fields.get(key, default)
        return self._decode_array(v) if isinstance(v, ArrayRef) else v

    # ---- reading ------------------------------------------------------------------------------------------------
    def _unpack(self, fmt, size):
        if self.pos + size > len(self.buf):
            raise HeaderError("the header runs past the end of the file")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def _u32(self):
        return self._unpack("<I", 4)

    def _u64(self):
        return self._unpack("<Q", 8)

    def _string(self):
        n = self._u64()
        if self.pos + n > len(self.buf):
            raise HeaderError("a string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def _value(self, vtype):
        if vtype in SCALARS:
            return self._unpack(SCALARS[vtype], DTYPES[vtype].itemsize)
        if vtype == V.STRING:
            return self._string()
        if vtype == V.ARRAY:
            item_type, count = V(self._u32()), self._u64()
            ref = ArrayRef(item_type, count, self.pos)
            self._skip_array(ref)
            return ref
        raise HeaderError(f"unknown metadata type {vtype}")

    def _skip_array(self, ref):
        if ref.item_type == V.STRING:  # walk the lengths without decoding
            for _ in range(ref.count):
                if self.pos + 8 > len(self.buf):
                    raise HeaderError("a string array runs past the end of the file")
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
                if self.pos > len(self.buf):
                    raise HeaderError("a string array runs past the end of the file")
        elif ref.item_type in DTYPES:
            self.pos += ref.count * DTYPES[ref.item_type].itemsize
        else:  # nested arrays: rare, read item by item
            for _ in range(ref.count):
                self._value(ref.item_type)
        if self.pos > len(self.buf):
            raise HeaderError("an array runs past the end of the file")

    def _decode_array(self, ref):
        if ref.item_type in DTYPES:
            return np.frombuffer(self.buf, DTYPES[ref.item_type], ref.count, ref.offset).tolist()
        saved, self.pos = self.pos, ref.offset
        try:
            items = [self._value(ref.item_type) for _ in range(ref.count)]
            return [self._decode_array(v) if isinstance(v, ArrayRef) else v for v in items]
        finally:
            self.pos = saved

    def _tensor_info(self):
        name = self._string()
        n_dims = self._u32()
        if n_dims > 4:
            raise HeaderError(f"tensor {name!r} has {n_dims} dimensions")
        dims = tuple(self._u64() for _ in range(n_dims))
        return RawTensor(name, self._u32(), dims, self._u64())

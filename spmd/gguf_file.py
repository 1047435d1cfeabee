"""Open a GGUF file memory-mapped and read only the slices this rank keeps.

The header is parsed by `gguf_header` (arrays such as the vocabulary only when asked for). Tensor bytes are read
through a read-only mapping: a slice is copied out and the pages it touched are handed back to the kernel
(MADV_DONTNEED), so a rank's resident memory holds its own share and not the file.

A model split into several files (llama.cpp's gguf-split: NAME-00001-of-00003.gguf ..., the way large models are
published) is opened from its first file: the others are found by their names, each mapped as a `Shard`; the
metadata is the first's, and each tensor says which shard holds it.
"""
import hashlib
import mmap
import os
import re
import socket
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from .errors import UserError, regular_file
from .gguf_header import GGUFHeader, HeaderError
from .quants import (NATIVE, QTensor, as_qtensor, block_size, dequantize, dequantize_any, from_float,
                     row_bytes)

PAGE = mmap.PAGESIZE
FINGERPRINT_SAMPLE = 4096  # bytes hashed at each of three places of every tensor


SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")  # gguf-split's file names


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: T
    shape: tuple  # numpy order: (rows, cols) for a matrix, (n,) for a vector
    offset: int  # absolute byte offset in its shard's file
    nbytes: int
    shard: int = 0  # which file of a split model holds it (GGUFFile.shards)


class Shard:
    """One file of the model, memory-mapped, with its parsed header."""

    def __init__(self, path):
        self.path = path
        if os.path.isdir(path):
            raise UserError(f"--model {path} is a directory, not a GGUF file")
        regular_file(path, "model file")
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                self.identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else b""
        except OSError as e:
            raise UserError(f"cannot read model file {path}: {e.strerror}") from None
        try:
            self.header = GGUFHeader(self.mm)
        except (ValueError, struct.error) as e:  # HeaderError is a ValueError
            raise self.invalid(e) from None
        self.bytes = None  # (set once the header is checked: GGUFFile)

    def invalid(self, e) -> UserError:
        from .convert import looks_like_llama2c  # (here: the converter and click, 14 ms, only on this error)
        hint = (f"; it is a llama2.c checkpoint: python -m spmd.convert llama2c {self.path} TOKENIZER.bin OUT.gguf "
                "makes a GGUF of it" if looks_like_llama2c(self.path) else "")
        return UserError(f"{self.path} is not a valid GGUF file ({e}){hint}")

    def changed(self) -> bool:
        """Whether this file was written since it was opened (see GGUFFile.changed)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        now = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return now[:2] == self.identity[:2] and now != self.identity

    def close(self):
        self.bytes = None
        self.mm.close()


def check_no_overlap(infos):
    """A HeaderError where two of one file's tensors share bytes (a corrupt offset)."""
    ordered = sorted((info for info in infos if info.nbytes), key=lambda info: info.offset)
    for before, after in zip(ordered, ordered[1:]):
        if after.offset < before.offset + before.nbytes:
            raise HeaderError(f"tensors {before.name} and {after.name} overlap in the file (a corrupt offset)")


def split_paths(path, header) -> list:
    """The files of the model whose first file is `path` (with `header`): [path] unless it is split (split.count),
    then every part's path by gguf-split's naming."""
    count, no = header.value("split.count", 0), header.value("split.no", 0)
    if not isinstance(count, int) or count <= 1:
        return [path]
    name = SPLIT_NAME.match(path)
    if no != 0:
        first = f" ({name['stem']}-00001-of-{count:05d}.gguf)" if name else ""
        raise UserError(f"{path} is part {no + 1} of a model split into {count} files: give the first{first}")
    if name is None or int(name["count"]) != count:
        raise UserError(f"{path} is the first of a model split into {count} files, but its name is not "
                        f"NAME-00001-of-{count:05d}.gguf, by which the others are found: rename them as "
                        "llama-gguf-split wrote them, or merge them (llama-gguf-split --merge)")
    return [f"{name['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def column_cover(spans, block) -> tuple:
    """A column slice of several [start, stop) spans as `col_ranges` holds it: ([first, end) of the whole quant
    blocks (of `block` elements) around each span, its QTensor's `keep` (where the span's columns lie among the held
    ones; None where no span cuts a block), the columns held)."""
    covers, keep, at = [], [], 0
    for a, b in (s for s in spans if s[1] > s[0]):
        first, end = a // block * block, -(-b // block) * block
        covers.append((first, end))
        keep.append((at + a - first, at + b - first))
        at += end - first
    return covers, tuple(keep) if sum(b - a for a, b in keep) != at else None, at


class GGUFFile:
    def __init__(self, path):
        self.path = str(path)
        self.shards = [Shard(self.path)]
        self._header = self.shards[0].header  # the metadata: a split model's first file has it all
        try:
            parts = split_paths(self.path, self._header)
            for part in parts[1:]:
                if not os.path.exists(part):
                    raise UserError(f"{self.path} is the first of a model split into {len(parts)} files, and {part} "
                                    "is missing")
                self.shards.append(Shard(part))
                no = self.shards[-1].header.value("split.no")
                if no != len(self.shards) - 1:
                    said = f"part {no + 1}" if isinstance(no, int) else "no part (no split.no)"
                    raise UserError(f"{part} holds {said} of a split model, not part {len(self.shards)} of "
                                    f"{self.path}'s")
            self.tensors = {}
            for i, shard in enumerate(self.shards):
                try:
                    for t in shard.header.tensors:
                        if t.name in self.tensors:
                            raise HeaderError(f"tensor {t.name} appears more than once")
                        self.tensors[t.name] = self._tensor_info(t, i)
                    check_no_overlap([info for info in self.tensors.values() if info.shard == i])
                except (ValueError, struct.error) as e:  # HeaderError is a ValueError
                    raise shard.invalid(e) from None
        except BaseException:
            self.close()
            raise
        for shard in self.shards:
            shard.mm.madvise(mmap.MADV_DONTNEED, 0, shard.header.data_offset // PAGE * PAGE)  # the parsed header
            shard.bytes = np.frombuffer(shard.mm, dtype=np.uint8)
        self._noticed = set()  # notices already given

    def _tensor_info(self, t, i) -> TensorInfo:
        try:
            qtype = T(t.ggml_type)
        except ValueError:
            raise HeaderError(f"tensor {t.name!r} has unknown type {t.ggml_type}") from None
        shape = tuple(reversed(t.dims))
        block, nbytes = GGML_QUANT_SIZES[qtype]
        if shape and shape[-1] % block:
            raise HeaderError(f"tensor {t.name!r} rows of {shape[-1]} are not whole {qtype.name} blocks")
        shard = self.shards[i]
        if t.offset % shard.header.alignment:
            raise HeaderError(f"tensor {t.name}'s data does not start on the file's alignment of "
                              f"{shard.header.alignment} bytes (offset {t.offset})")
        info = TensorInfo(t.name, qtype, shape, shard.header.data_offset + t.offset,
                          int(np.prod(shape, dtype=np.int64)) // block * nbytes, i)
        if info.offset + info.nbytes > len(shard.mm):
            raise HeaderError(f"truncated: tensor {t.name} ends past the end of the file")
        return info

    @property
    def nbytes(self) -> int:
        """The model's size on disk: every file of it."""
        return sum(len(shard.mm) for shard in self.shards)

    # ---- metadata -------------------------------------------------------------------------------------------
    def meta(self, key, default=None):
        """A metadata value as plain Python (str, int, float, bool, list); `default` when absent."""
        return self._header.value(key, default)

    def keys(self):
        return list(self._header.fields)

    # ---- tensors --------------------------------------------------------------------------------------------
    def info(self, name) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise UserError(f"{self.path} has no tensor {name!r}") from None

    def has(self, name) -> bool:
        return name in self.tensors

    def _raw(self, info: TensorInfo) -> np.ndarray:
        """A tensor's bytes in the mapping; refused once the file was written since it was opened (see changed)."""
        shard = self.shards[info.shard]
        if shard.changed():
            raise UserError(f"the model file {shard.path} on {socket.gethostname()} was written while in use "
                            "(truncated or overwritten)")
        return shard.bytes[info.offset: info.offset + info.nbytes]

    def _release(self, info: TensorInfo):
        """Drop the mapped pages of a tensor from this process's resident set (the page cache keeps them)."""
        start = info.offset // PAGE * PAGE
        self.shards[info.shard].mm.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def vector(self, name) -> np.ndarray:
        """A 1-D tensor (norm weight, bias) as float32."""
        info = self.info(name)
        n = int(np.prod(info.shape))
        out = dequantize_any(self._raw(info), info.qtype, 1, n).reshape(n).copy()
        self._release(info)
        return out

    def _matrix(self, name):
        """(info, raw bytes as (rows, row_bytes)) of a matrix, still in the mapping."""
        info = self.info(name)
        n_rows, cols = info.shape
        return info, self._raw(info).reshape(n_rows, row_bytes(info.qtype, cols))

    def rows(self, name, start, stop, notice=print) -> QTensor:
        """Rows [start, stop) of a matrix, copied; a type we do not keep is dequantised (with one notice)."""
        return self.row_ranges(name, [(start, stop)], notice)

    def cols(self, name, start, stop, notice=print) -> QTensor:
        """Columns [start, stop) of a matrix, copied (see col_ranges)."""
        return self.col_ranges(name, [(start, stop)], notice)

    def row_ranges(self, name, spans, notice=print) -> QTensor:
        """The rows of several [start, stop) ranges of a matrix, in that order, as one copied matrix."""
        info, raw = self._matrix(name)
        spans = list(spans) or [(0, 0)]
        part = raw[spans[0][0]:spans[0][1]] if len(spans) == 1 else np.concatenate([raw[a:b] for a, b in spans])
        qt = self._keep(info, part, part.shape[0], info.shape[1], notice)
        self._release(info)
        return qt

    def col_ranges(self, name, spans, notice=print) -> QTensor:
        """The columns of several [start, stop) ranges of a matrix, in that order, as one copied matrix. A range
        that cuts through quant blocks takes the whole blocks around it, and the QTensor's `keep` says which of
        their columns are the range's."""
        info, raw = self._matrix(name)
        n_rows, cols = info.shape
        bs = block_size(info.qtype)
        per_block = raw.shape[1] // (cols // bs) if cols else 0
        covers, keep, at = column_cover(spans, bs)
        parts = [raw[:, :0]] + [raw[:, first // bs * per_block: end // bs * per_block] for first, end in covers]
        part = parts[-1] if len(parts) == 2 else np.concatenate(parts, axis=1)
        qt = self._keep(info, part, n_rows, at, notice)
        if keep is not None:
            qt.keep = keep
            if block_size(qt.qtype) != bs:  # dequantised at load: floats have no blocks to keep whole
                qt = from_float(dequantize(qt))
        self._release(info)
        return qt

    def lookup(self, name, ids) -> np.ndarray:
        """Rows `ids` of a matrix as float32 (n, cols) (an embedding lookup): the matrix itself stays on disk."""
        info, raw = self._matrix(name)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return dequantize_any(raw[ids], info.qtype, len(ids), info.shape[1])

    def _keep(self, info, raw, rows, cols, notice) -> QTensor:
        """Raw bytes (rows, ...) -> an owned QTensor: the native types copied as they are, others dequantised."""
        if info.qtype in NATIVE:  # a copy: a view would keep the file's pages resident after _release
            return as_qtensor(raw.copy(), info.qtype, rows, cols)
        self.notice_once(notice, info.qtype,
                         f"note: the file holds {info.qtype.name} weights; dequantising them to F32 at load")
        return from_float(dequantize_any(raw, info.qtype, rows, cols))

    def changed(self) -> bool:
        """Whether the file mapped here was written since it was opened (truncated or overwritten in place: reading
        its pages then gives other weights, or a SIGBUS). A file replaced by another (a rename) is not: the mapping
        still holds the old one."""
        return any(shard.changed() for shard in self.shards)

    def fingerprint(self, sample=FINGERPRINT_SAMPLE) -> str:
        """A hash of the header and tensor index, and of `sample` bytes at the start, middle and end of every
        tensor: two files of the same shape and size (another seed, a stale copy) differ in it, and it reads a few
        MB of a multi-GB file."""
        h = hashlib.sha256()
        for shard in self.shards:
            h.update(shard.bytes[:shard.header.data_offset].tobytes())
        for info in self.tensors.values():
            data = self.shards[info.shard].bytes
            for at in (0, info.nbytes // 2, max(0, info.nbytes - sample)):
                start = info.offset + min(at, max(0, info.nbytes - sample))
                h.update(data[start:start + min(sample, info.nbytes)].tobytes())
            self._release(info)
        return h.hexdigest()

    def notice_once(self, notice, key, message):
        """`notice(message)` the first time `key` is seen for this file."""
        if key not in self._noticed:
            self._noticed.add(key)
            notice(message)

    def close(self):
        for shard in self.shards:
            shard.close()

"""A live re-partition, run by every rank at the same token boundary after rank 0 broadcast the new plan.

Each rank works out the difference between the old and the new plan (`plan.diff`) and moves only what changes:

  1. outgoing: for every rank it hands units to, the KV cache rows of the moved KV heads (positions 0..pos-1) and,
     with `--migrate-weights peer`, the weight slices of every moved unit, read from its own mapped file;
  2. errors in step 1 are agreed on (no rank waits for a message that will not come), then the messages travel by
     MPI point-to-point, every send posted before any receive;
  3. a rank whose share changed builds its new weights (matrices of unchanged kinds are kept as they are; the
     changed ones are read from its own file, or, in peer mode, assembled from its kept slices and the received
     ones) and its new model, and writes the KV cache into it; a rank whose share did not change keeps its model;
  4. errors in step 3 (out of memory, ...) are agreed on: then every rank keeps the old plan and model;
  5. every rank switches to the new plan, and rank 0 gathers what each rank moved and how long it took.
"""
import time
from dataclasses import replace

import numpy as np
from gguf import GGMLQuantizationType as T

from .model import Model
from .plan import diff
from .quants import QTensor, dequantize, from_float
from .weights import LAYER_TENSORS, ROWS, VECTOR, classifier_name, element_spans, file_reader, load_shard

WEIGHT_SOURCES = ("file", "peer")


def changed_kinds(old, new) -> set:
    """The plan units ("kv", "ffn", "vocab") whose holding differs between two shares of one rank."""
    out = set()
    if old.kv != new.kv:
        out.add("kv")
    if old.ffn_blocks != new.ffn_blocks:
        out.add("ffn")
    if (old.vocab_start, old.n_vocab) != (new.vocab_start, new.n_vocab):
        out.add("vocab")
    return out


def moved_share(template, moves, src, dst):
    """A pseudo-share holding exactly the units that go from `src` to `dst` (its element spans name the slices)."""
    mine = [(unit, i) for unit, i, a, b in moves if (a, b) == (src, dst)]
    kv = tuple(i for unit, i in mine if unit == "kv")
    blocks = tuple(i for unit, i in mine if unit == "ffn")
    rows = [i for unit, i in mine if unit == "vocab"]  # contiguous: old range of src within new range of dst
    return replace(template, rank=src, kv=kv, ffn_blocks=blocks, vocab_start=rows[0] if rows else 0,
                   n_vocab=len(rows))


def weight_slices(cfg, share) -> list:
    """[(tensor name, slicing, (start, stop))] of every weight slice a (pseudo-)share holds, in a fixed order."""
    out = []
    for i in range(cfg.n_layers):
        for field, (name, slicing, unit) in LAYER_TENSORS.items():
            if slicing == VECTOR and not cfg.qkv_bias:
                continue
            out += [(f"blk.{i}.{name}", slicing, span) for span in element_spans(cfg, share, unit)]
    out += [(classifier_name(cfg), ROWS, span) for span in element_spans(cfg, share, "vocab")]
    return out


# ---- packing ----------------------------------------------------------------------------------------------------
def pack(pieces):
    """[(key, QTensor or ndarray)] -> (meta, one uint8 buffer): what a message carries."""
    meta, arrays = [], []
    for key, value in pieces:
        q = (int(value.qtype), value.rows, value.cols) if isinstance(value, QTensor) else None
        data = np.ascontiguousarray(value.data if q else value)
        meta.append((key, q, data.dtype.str, data.shape))
        arrays.append(data.reshape(-1).view(np.uint8))
    return meta, (np.concatenate(arrays) if arrays else np.empty(0, np.uint8))


def unpack(meta, buf) -> dict:
    """The inverse of `pack`: {key: QTensor or ndarray}, each an owned copy."""
    out, at = {}, 0
    for key, q, dtype, shape in meta:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        data = buf[at:at + n].view(dtype).reshape(shape).copy()
        out[key] = QTensor(T(q[0]), q[1], q[2], data) if q else data
        at += n
    return out


def concat(parts, slicing):
    """Slices of one tensor in index order -> one QTensor (or vector); mixed types meet in float32."""
    if slicing == VECTOR:
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
    if len(parts) == 1:
        return parts[0]
    axis = 0 if slicing == ROWS else 1
    if len({p.qtype for p in parts}) == 1:
        data = np.concatenate([p.data for p in parts], axis=axis)
        rows = sum(p.rows for p in parts) if axis == 0 else parts[0].rows
        cols = parts[0].cols if axis == 0 else sum(p.cols for p in parts)
        return QTensor(parts[0].qtype, rows, cols, data)
    return from_float(np.concatenate([dequantize(p) for p in parts], axis=axis))


def assembling_reader(read_file, received):
    """read(name, slicing, spans): the received slices where there are some, the rest from the file."""
    by_tensor = {}
    for (name, slicing, span), value in received.items():
        by_tensor.setdefault((name, slicing), []).append((span, value))

    def read(name, slicing, spans):
        got = sorted(by_tensor.get((name, slicing), []), key=lambda sv: sv[0])
        parts = []
        for a, b in spans:
            at = a
            for (ra, rb), value in got:
                if a <= ra and rb <= b:
                    if ra > at:
                        parts.append(read_file(name, slicing, [(at, ra)]))
                    parts.append(value)
                    at = rb
            if at < b:
                parts.append(read_file(name, slicing, [(at, b)]))
        return concat(parts, slicing) if parts else read_file(name, slicing, [])
    return read


# ---- the collective ---------------------------------------------------------------------------------------------
class Repartition:
    """One re-partition on one rank; `run()` is collective."""

    def __init__(self, engine, new_plan, pos, weights_from="file"):
        self.engine, self.comm, self.pos = engine, engine.comm, pos
        self.new_plan, self.old_plan = new_plan, engine.plan
        self.rank = self.comm.rank
        self.old, self.new = self.old_plan[self.rank], new_plan[self.rank]
        self.peer = weights_from == "peer"
        self.moves = diff(self.old_plan, new_plan)
        self.stats = dict(rank=self.rank, changed=self.old != self.new, weights_bytes_sent=0, cache_bytes_sent=0,
                          bytes_received=0, file_bytes_read=0)

    def _pairs(self, side):
        """The ranks this rank sends to (side 2) or receives from (side 3): those it hands units to / takes from,
        where a message is needed (KV heads always carry their cache; other units only in peer mode)."""
        other = 3 if side == 2 else 2
        return sorted({m[other] for m in self.moves if m[side] == self.rank and (m[0] == "kv" or self.peer)})

    def _outgoing(self):
        out = {}
        cache = None
        read = file_reader(self.engine.file, notice=lambda _m: None)
        for dst in self._pairs(2):
            units = moved_share(self.old, self.moves, self.rank, dst)
            pieces = []
            if units.kv:
                if cache is None:
                    cache = self.engine.model.read_cache(self.pos)  # (k, v) (n_layers, n_kv_local, T, head_dim)
                idx = [self.old.kv.index(j) for j in units.kv]
                for j, at in zip(units.kv, idx):
                    pieces.append((("cache", j), np.stack([cache[0][:, at], cache[1][:, at]])))
            n_cache = sum(p[1].nbytes for p in pieces)
            if self.peer:
                pieces += [(s, read(*s[:2], [s[2]])) for s in weight_slices(self.engine.cfg, units)]
            meta, buf = pack(pieces)
            self.stats["cache_bytes_sent"] += n_cache
            self.stats["weights_bytes_sent"] += buf.nbytes - n_cache
            out[dst] = (meta, buf)
        return out

    def run(self):
        """Every rank: move, build, agree, switch. Returns (error or None, this rank's stats)."""
        t0 = time.perf_counter()
        outgoing, error = None, None
        try:
            outgoing = self._outgoing()
        except Exception as e:  # noqa: BLE001 - agreed on below, so that no rank waits for a message
            error = _describe(e)
        error = self.comm.first_error(error)
        if error is not None:
            return error, self._done(t0)
        messages = self.comm.exchange(outgoing, self._pairs(3))
        self.stats["bytes_received"] = sum(buf.nbytes for _, buf in messages.values())
        model = None
        try:
            received = {}
            for meta, buf in messages.values():
                received.update(unpack(meta, buf))
            model = build(self, received) if self.stats["changed"] else self.engine.model
        except Exception as e:  # noqa: BLE001 - out of memory, a backend that refuses: keep the old plan
            error = _describe(e)
        error = self.comm.first_error(error)
        if error is not None:
            if model is not None and model is not self.engine.model and hasattr(model, "close"):
                model.close()
            return error, self._done(t0)
        old_model, self.engine.model = self.engine.model, model
        if model is not old_model and hasattr(old_model, "close"):
            old_model.close()
        return None, self._done(t0)

    def _done(self, t0):
        self.stats["ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        return self.stats


def build(rp, received):
    """A changed rank's new model: weights of unchanged kinds kept, changed ones read (or assembled), the KV cache
    of kept heads copied and of received heads written."""
    eng, new, old = rp.engine, rp.new, rp.old
    counted = file_reader(eng.file, notice=lambda _m: None)

    def read_file(name, slicing, spans):
        value = counted(name, slicing, spans)
        rp.stats["file_bytes_read"] += value.nbytes
        return value
    weights_in = {k: v for k, v in received.items() if k[0] != "cache"}
    read = assembling_reader(read_file, weights_in) if rp.peer else read_file
    # matrices of unchanged kinds are kept as they are, unless the backend's model owns (and frees) its matrices
    reuse = not hasattr(eng.backend, "make_model")
    keep = {"kv", "ffn", "vocab"} - changed_kinds(old, new) if reuse else set()
    weights = load_shard(eng.file, eng.cfg, new, eng.backend, read=read, old=eng.model.w, keep=keep)
    k_old, v_old = eng.model.read_cache(rp.pos)  # (n_layers, n_kv_old, T, head_dim)
    L, _, T_, hd = k_old.shape
    k = np.empty((L, new.n_kv, T_, hd), np.float32)
    v = np.empty_like(k)
    for at, j in enumerate(new.kv):
        if j in old.kv:
            k[:, at], v[:, at] = k_old[:, old.kv.index(j)], v_old[:, old.kv.index(j)]
        else:
            k[:, at], v[:, at] = received[("cache", j)]
    model = getattr(eng.backend, "make_model", Model)(eng.cfg, weights, new, eng.max_seq)
    model.write_cache(k, v)
    return model


def _describe(e) -> str:
    if isinstance(e, MemoryError):
        return "out of memory"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__

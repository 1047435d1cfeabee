"""A live re-partition, run by every rank at the same token boundary after rank 0 broadcast the new plan.

Each rank works out the difference between the old and the new plan (`replan.diff`: KV-head groups and FFN blocks
layer by layer, and classifier rows) and moves only what changes, whatever made the change (a head or FFN move
inside a stage, layers moved between stages, a whole new layout):

  0. every host must have the memory for what its changed ranks build while their old models are live
     (`RankState.room_to_move`); else every rank keeps the old plan;
  1. outgoing: for every rank it hands units to, the KV cache rows of the moved (layer, KV head) pairs of every open
     sequence slot (the positions each has filled) and, with `--migrate-weights peer`, the weight slices of every
     moved unit, read from its own file;
  2. errors in step 1 are agreed on (no rank waits for a message that will not come), then the messages travel by
     MPI point-to-point, every send posted before any receive;
  3. a rank whose share changed builds its new weights (matrices of unchanged kinds are kept as they are; the
     changed ones are read from its own file, or, in peer mode, assembled from its kept slices and the received
     ones) and its new model, and writes the KV cache into it; a rank whose share did not change keeps its model;
  4. errors in step 3 (out of memory, ...) are agreed on: then every rank keeps the old plan and model;
  5. `run` returns the new model (the old one where the rank's share did not change); the caller switches every
     rank to the new plan and model (`RankState.swap`: the stage communicators follow), and rank 0 gathers what
     each rank moved and how long it took.
"""
import time
from dataclasses import replace

import numpy as np
from gguf import GGMLQuantizationType as T

from .errors import UserError
from .plan import ranges
from .quants import QTensor, dequantize, from_float
from .replan import diff
from .weights import LAYER_TENSORS, ROWS, UNIT_KIND, VECTOR, classifier_name, element_spans, file_reader


def changed_kinds(old, new) -> set:
    """The plan units ("kv", "ffn", "vocab") whose holding differs between two shares of one rank (in the layers
    both hold: a layer new to the rank is read whole anyway)."""
    out = set()
    if old.kv != new.kv:
        out.add("kv")
    if old.ffn_blocks != new.ffn_blocks:
        out.add("ffn")
    if (old.vocab_start, old.n_vocab) != (new.vocab_start, new.n_vocab):
        out.add("vocab")
    return out


def weight_slices(cfg, template, units) -> list:
    """[(tensor name, slicing, (start, stop))] of the weights of `units` [(unit, layer, index)], in a fixed order;
    `template` is any share (for the head group and FFN width)."""
    out = []
    layers = sorted({layer for unit, layer, _ in units if unit != "vocab"})
    for layer in layers:
        kv = tuple(sorted(i for unit, lay, i in units if unit == "kv" and lay == layer))
        blocks = tuple(sorted(i for unit, lay, i in units if unit == "ffn" and lay == layer))
        share = replace(template, kv=kv, ffn_blocks=blocks)
        for field, (name, slicing, unit) in LAYER_TENSORS.items():
            if slicing == VECTOR and not cfg.qkv_bias:
                continue
            out += [(f"blk.{layer}.{name}", slicing, span) for span in element_spans(cfg, share, unit)]
    rows = sorted(i for unit, _, i in units if unit == "vocab")
    out += [(classifier_name(cfg), ROWS, span) for span in ranges(rows)]
    return out


# ---- packing ----------------------------------------------------------------------------------------------------
def pack(pieces):
    """[(key, QTensor or ndarray)] -> (meta, one uint8 buffer): what a message carries."""
    meta, arrays = [], []
    for key, value in pieces:
        q = (int(value.qtype), value.rows, value.cols, value.keep) if isinstance(value, QTensor) else None
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
        out[key] = QTensor(T(q[0]), q[1], q[2], data, q[3] and tuple(map(tuple, q[3]))) if q else data
        at += n
    return out


def concat(parts, slicing):
    """Slices of one tensor in index order -> one QTensor (or vector); mixed types meet in float32."""
    if slicing == VECTOR:
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
    if len(parts) == 1:
        return parts[0]
    axis = 0 if slicing == ROWS else 1
    if len({p.qtype for p in parts}) == 1 and (axis == 1 or all(p.keep is None for p in parts)):
        data = np.concatenate([p.data for p in parts], axis=axis)
        if axis == 0:
            return QTensor(parts[0].qtype, sum(p.rows for p in parts), parts[0].cols, data)
        keep, at = [], 0
        for p in parts:
            keep += [(at + a, at + b) for a, b in (p.keep or [(0, p.cols)])]
            at += p.cols
        whole = sum(b - a for a, b in keep) == at
        return QTensor(parts[0].qtype, parts[0].rows, at, data, None if whole else tuple(keep))
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

    def __init__(self, state, new_plan, filled):
        self.state, self.comm = state, state.comm
        self.filled = filled  # {slot: positions filled} of every open sequence slot
        self.new_plan, self.old_plan = new_plan, state.plan
        self.rank = self.comm.rank
        self.old, self.new = self.old_plan[self.rank], new_plan[self.rank]
        self.peer = state.opts.migrate_weights == "peer"
        self.moves = diff(self.old_plan, new_plan)  # (unit, layer, index, from, to)
        self.stats = dict(rank=self.rank, changed=self.old != self.new, weights_bytes_sent=0, cache_bytes_sent=0,
                          bytes_received=0, file_bytes_read=0)
        # matrices of unchanged kinds are kept as they are, unless the backend's model owns (and frees) its matrices
        # or the new model may stream them (--memory-limit: a spilled matrix holds no arrays, and the old model is
        # live)
        owned = state.backend.model_owns_weights or state.memory_limit is not None
        self.keep = set() if owned else set(UNIT_KIND.values()) - changed_kinds(self.old, self.new)

    def _pairs(self, side):
        """The ranks this rank sends to (side 3) or receives from (side 4): those it hands units to / takes from,
        where a message is needed (KV heads always carry their cache; other units only in peer mode)."""
        other = 4 if side == 3 else 3
        return sorted({m[other] for m in self.moves if m[side] == self.rank and (m[0] == "kv" or self.peer)})

    def _outgoing(self):
        out = {}
        cache = None
        read = file_reader(self.state.file, notice=lambda _m: None)
        for dst in self._pairs(3):
            units = [m[:3] for m in self.moves if (m[3], m[4]) == (self.rank, dst)]
            pieces = []
            for unit, layer, j in units:
                if unit == "kv":
                    if cache is None:  # {slot: {(layer, kv): (k, v) each (T, hd)}}
                        cache = {slot: self.state.model.cache_take(slot, T) for slot, T in self.filled.items()}
                    pieces += [(("cache", slot, layer, j), np.stack(cache[slot][(layer, j)])) for slot in cache]
            n_cache = sum(p[1].nbytes for p in pieces)
            if self.peer:
                pieces += [(s, read(*s[:2], [s[2]])) for s in weight_slices(self.state.cfg, self.old, units)]
            meta, buf = pack(pieces)
            self.stats["cache_bytes_sent"] += n_cache
            self.stats["weights_bytes_sent"] += buf.nbytes - n_cache
            out[dst] = (meta, buf)
        return out

    def run(self):
        """Every rank: move, build, agree. Returns (error or None, this rank's stats, the new model or None)."""
        t0 = time.perf_counter()
        error = self.state.room_to_move(self.new_plan, self.keep)
        if error is not None:
            return error, self._done(t0), None
        outgoing = None
        try:
            outgoing = self._outgoing()
        except Exception as e:  # noqa: BLE001 - agreed on below, so that no rank waits for a message
            error = _describe(e)
        error = self.comm.first_error(error)
        if error is not None:
            return error, self._done(t0), None
        messages = self.comm.exchange(outgoing, self._pairs(4))
        self.stats["bytes_received"] = sum(buf.nbytes for _, buf in messages.values())
        model = None
        try:
            received = {}
            for meta, buf in messages.values():
                received.update(unpack(meta, buf))
            model = build(self, received) if self.stats["changed"] else self.state.model
        except Exception as e:  # noqa: BLE001 - out of memory, a backend that refuses: keep the old plan
            error = _describe(e)
        error = self.comm.first_error(error)
        if error is not None:
            if model is not None and model is not self.state.model:
                model.close()
            return error, self._done(t0), None
        return None, self._done(t0), model

    def _done(self, t0):
        self.stats["ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        return self.stats


def build(rp, received):
    """A changed rank's new model: weights of unchanged kinds kept in the layers it keeps, the rest read (or
    assembled), the KV cache of kept (layer, head) pairs copied and of received ones written."""
    state, new = rp.state, rp.new
    counted = file_reader(state.file, notice=lambda _m: None)

    def read_file(name, slicing, spans):
        value = counted(name, slicing, spans)
        rp.stats["file_bytes_read"] += value.nbytes
        return value
    weights_in = {k: v for k, v in received.items() if k[0] != "cache"}
    read = assembling_reader(read_file, weights_in) if rp.peer else read_file
    model = state.build_model(new, read=read, keep=rp.keep)
    for slot, need in state.model.slots.items():
        model.open(slot, need)
    for slot, filled in rp.filled.items():
        kept = state.model.cache_take(slot, filled)
        model.cache_put(slot, {key: kept[key] if key in kept else tuple(received[("cache", slot, *key)])
                               for key in ((layer, j) for layer in new.layer_ids for j in new.kv)})
    return model


def _describe(e) -> str:
    """A rank's failure as the reply says it (Comm.first_error names the rank): a user's error as its own line,
    anything else with its type."""
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, UserError):
        return str(e)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__

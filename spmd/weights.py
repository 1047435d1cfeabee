"""Read this rank's slices of every weight from the GGUF file and hand them to the backend.

Slicing (the only place that knows it):
  attn_q / attn_k / attn_v, their biases   rows of the rank's heads          (out features)
  attn_output                              columns of the rank's heads       (in features)  -> partial sum
  ffn_gate / ffn_up                        rows of the rank's FFN columns    (out features)
  ffn_down                                 columns of the rank's FFN columns (in features)  -> partial sum
  output (or token_embd when tied)         rows of the rank's vocabulary slice (the last stage's ranks only)
  norms                                    replicated in the rank's layers (output_norm: with the classifier)
  token_embd                               not loaded: each token's row is read from the memory-mapped file

Only the layers of the rank's stage are read: memory follows the plan.

A rank's heads and FFN columns may be several ranges (after a live move); a slice is their concatenation, in
index order, the same order in every matrix of a layer and in the KV cache.
"""
import contextlib
from dataclasses import dataclass

import numpy as np

from .gguf_file import column_cover
from .model import HALVES
from .plan import Share, scale_ranges
from .quants import block_size, dequantize, from_float, held_type, row_bytes

ROWS, COLS, VECTOR = 0, 1, 2  # how a tensor is sliced
# field of LayerWeights -> (GGUF name in the block, slicing, element unit); "heads": query heads (head_dim rows each,
# `group` per KV head), "kv": KV heads, "ffn": FFN columns
LAYER_TENSORS = {
    "wq": ("attn_q.weight", ROWS, "heads"), "wk": ("attn_k.weight", ROWS, "kv"), "wv": ("attn_v.weight", ROWS, "kv"),
    "bq": ("attn_q.bias", VECTOR, "heads"), "bk": ("attn_k.bias", VECTOR, "kv"), "bv": ("attn_v.bias", VECTOR, "kv"),
    "wo": ("attn_output.weight", COLS, "heads"),
    "w1": ("ffn_gate.weight", ROWS, "ffn"), "w3": ("ffn_up.weight", ROWS, "ffn"),
    "w2": ("ffn_down.weight", COLS, "ffn"),
}
UNIT_KIND = {"heads": "kv", "kv": "kv", "ffn": "ffn", "vocab": "vocab"}  # element unit -> plan unit that moves it
HALF = {"heads": "attention", "kv": "attention", "ffn": "ffn"}  # element unit -> the half of a layer that uses it


def half_fields(half) -> list:
    """The LayerWeights fields of a half's matrices ("attention": wq, wk, wv, wo; "ffn": w1, w3, w2)."""
    return [field for field, (_, slicing, unit) in LAYER_TENSORS.items() if slicing != VECTOR and HALF[unit] == half]


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (dim,)
    wq: object  # Linear (n_heads_local * head_dim, dim)
    wk: object  # Linear (n_kv_local * head_dim, dim)
    wv: object  # Linear (n_kv_local * head_dim, dim)
    bq: np.ndarray  # (n_heads_local * head_dim,) or None
    bk: np.ndarray  # (n_kv_local * head_dim,) or None
    bv: np.ndarray  # (n_kv_local * head_dim,) or None
    wo: object  # Linear (dim, n_heads_local * head_dim)
    ffn_norm: np.ndarray  # (dim,)
    w1: object  # Linear (n_ffn_local, dim)    gate
    w3: object  # Linear (n_ffn_local, dim)    up
    w2: object  # Linear (dim, n_ffn_local)    down
    q_norm: np.ndarray = None  # (head_dim,) qwen3's per-head RMSNorm weights of q and k, or None
    k_norm: np.ndarray = None


@dataclass
class ShardWeights:
    first: int  # the absolute index of layers[0]
    layers: list  # LayerWeights of the rank's layers first, first+1, ...
    output_norm: np.ndarray  # (dim,), or None where the rank holds no classifier rows
    output: object  # Linear (n_vocab_local, dim), or None where the rank holds no classifier rows
    rope_factors: np.ndarray  # (rope_dim / 2,) Llama 3 frequency divisors, or None
    file: object  # the GGUFFile, kept open for embedding lookups
    window: object = None  # spmd.stream.Window of the streamed halves (--memory-limit), or None

    def layer(self, i) -> LayerWeights:
        """The weights of absolute layer i."""
        return self.layers[i - self.first]

    def hold(self, i, half):
        """A context in which half ("attention" or "ffn") of absolute layer i has its matrices (streamed halves
        wait for the window; the others are always there)."""
        return self.window.hold((i, half)) if self.window is not None else contextlib.nullcontext()

    def embed(self, tokens) -> np.ndarray:
        """(n,) token ids -> (n, dim) float32 rows of token_embd, read from the mapped file."""
        return self.file.lookup("token_embd.weight", [int(t) for t in tokens])

    def linears(self) -> list:
        names = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
        return [self.output] * (self.output is not None) + [getattr(lw, n) for lw in self.layers for n in names]

    @property
    def nbytes(self) -> int:
        return sum(lin.nbytes for lin in self.linears())


def classifier_name(cfg) -> str:
    return "token_embd.weight" if cfg.tied_output else "output.weight"


def element_spans(cfg, share: Share, unit) -> list:
    """The [start, stop) ranges of a tensor's sliced axis that `share` holds, for an element unit."""
    if unit == "heads":
        return scale_ranges(share.kv_ranges, share.group * cfg.head_dim)
    if unit == "kv":
        return scale_ranges(share.kv_ranges, cfg.head_dim)
    if unit == "ffn":
        return share.ffn_ranges
    return [(share.vocab_start, share.vocab_start + share.n_vocab)] if share.n_vocab else []


def share_bytes(f, cfg, share: Share, holds=held_type) -> int:
    """The bytes of `share`'s weight slices in the types `holds` names for the file's (a backend's `holds`; by
    default the cpu backend's), before a backend's padding or repacking (`half_bytes` counts those)."""
    total = 0
    matrices = [(f"blk.{i}.{name}", slicing, unit) for i in share.layer_ids
                for name, slicing, unit in LAYER_TENSORS.values() if slicing != VECTOR]
    if share.n_vocab:
        matrices.append((classifier_name(cfg), ROWS, "vocab"))
    for name, slicing, unit in matrices:
        info = f.info(name)
        held = sum(b - a for a, b in element_spans(cfg, share, unit))
        nbytes = info.shape[0] * row_bytes(holds(info.qtype), info.shape[1])
        total += nbytes * held // info.shape[slicing]
    return total


def half_bytes(f, cfg, share: Share, backend) -> tuple:
    """What `backend` will hold of `share`'s matrices: ({(layer, half): bytes} in the order the stage runs them,
    and the bytes of the classifier rows)."""
    def held(name, slicing, unit):
        info = f.info(name)
        qtype = backend.holds(info.qtype)
        rows, cols = info.shape
        spans, keep = element_spans(cfg, share, unit), None
        if slicing == ROWS:
            rows = sum(b - a for a, b in spans)
        else:  # a column slice keeps whole quant blocks (GGUFFile.col_ranges); one that cuts them says which
            _, keep, cols = column_cover(spans, block_size(qtype))
        return backend.held_bytes(qtype, rows, cols, keep)

    sizes = {(i, half): 0 for i in share.layer_ids for half in HALVES}
    for i in share.layer_ids:
        for name, slicing, unit in LAYER_TENSORS.values():
            if slicing != VECTOR:
                sizes[i, HALF[unit]] += held(f"blk.{i}.{name}", slicing, unit)
    classifier = held(classifier_name(cfg), ROWS, "vocab") if share.n_vocab else 0
    return sizes, classifier


def file_reader(f, notice=print):
    """read(name, slicing, spans) -> QTensor (a matrix's rows or columns) or float32 vector, from the mapped file."""
    def read(name, slicing, spans):
        if slicing == ROWS:
            return f.row_ranges(name, spans, notice=notice)
        if slicing == COLS:
            return f.col_ranges(name, spans, notice=notice)
        v = f.vector(name)
        return np.concatenate([v[a:b] for a, b in spans]) if spans else v[:0].copy()
    return read


def load_shard(f, cfg, share: Share, backend, notice=print, read=None, old=None, keep=(), window=None) -> ShardWeights:
    """This rank's weights for `share`: its layers' slices, and the classifier rows where it holds some. `read`
    (default: the file) supplies the slices; with `old` weights, the matrices of the plan units in `keep` ("kv",
    "ffn", "vocab") are taken from `old` as they are in the layers it holds, instead of being read again. With a
    `window` (spmd.stream), the halves it streams are spilled to it as each layer is read."""
    read = read or file_reader(f, notice)
    held = range(old.first, old.first + len(old.layers)) if old is not None else range(0)

    def get(field, i):
        name, slicing, unit = LAYER_TENSORS[field]
        if i in held and UNIT_KIND[unit] in keep:
            return getattr(old.layer(i), field)
        if slicing == VECTOR:
            return read(f"blk.{i}.{name}", VECTOR, element_spans(cfg, share, unit)) if cfg.qkv_bias else None
        streamed = window is not None and (i, HALF[unit]) in window.index
        return backend.linear(fit(read(f"blk.{i}.{name}", slicing, element_spans(cfg, share, unit))), not streamed)

    def fit(qt):
        """The slice as the backend computes with it: F32 where it lacks a kernel for its type or its cut."""
        lacks = backend.lacks(qt)
        if lacks is None:
            return qt
        f.notice_once(notice, ("backend", lacks), f"note: the {backend.name} backend lacks {lacks}; it holds them "
                      "as F32 (4 bytes a weight)")
        return from_float(dequantize(qt))

    qk = lambda i, n: f.vector(f"blk.{i}.attn_{n}_norm.weight") if cfg.qk_norm else None  # noqa: E731
    layers = []
    for i in share.layer_ids:
        layers.append(LayerWeights(attn_norm=f.vector(f"blk.{i}.attn_norm.weight"),
                                   ffn_norm=f.vector(f"blk.{i}.ffn_norm.weight"), q_norm=qk(i, "q"),
                                   k_norm=qk(i, "k"), **{field: get(field, i) for field in LAYER_TENSORS}))
        for half in HALVES:
            fields = half_fields(half)
            lins = [getattr(layers[-1], field) for field in fields]
            if window is not None and (i, half) in window.index:
                window.spill((i, half), lins)
            else:  # (those kept from `old` were settled when made)
                backend.settle([lin for lin, field in zip(lins, fields)
                                if i not in held or lin is not getattr(old.layer(i), field)])
    output = output_norm = None
    if share.n_vocab and old is not None and old.output is not None and "vocab" in keep:
        output, output_norm = old.output, old.output_norm
    elif share.n_vocab:
        output = backend.linear(fit(read(classifier_name(cfg), ROWS, element_spans(cfg, share, "vocab"))))
        backend.settle([output])
        output_norm = f.vector("output_norm.weight")
    return ShardWeights(
        first=share.layers[0], layers=layers, output_norm=output_norm, output=output,
        rope_factors=f.vector("rope_freqs.weight") if f.has("rope_freqs.weight") else None, file=f, window=window)

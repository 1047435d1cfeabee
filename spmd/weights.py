"""Read this rank's slices of every weight from the GGUF file and hand them to the backend.

Slicing (the only place that knows it):
  attn_q / attn_k / attn_v, their biases   rows of the rank's heads          (out features)
  attn_output                              columns of the rank's heads       (in features)  -> partial sum
  ffn_gate / ffn_up                        rows of the rank's FFN columns    (out features)
  ffn_down                                 columns of the rank's FFN columns (in features)  -> partial sum
  output (or token_embd when tied)         rows of the rank's vocabulary slice
  norms                                    replicated
  token_embd                               not loaded: each token's row is read from the file when it is needed
"""
from dataclasses import dataclass

import numpy as np

from .plan import Share


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


@dataclass
class ShardWeights:
    layers: list
    output_norm: np.ndarray  # (dim,)
    output: object  # Linear (n_vocab_local, dim)
    rope_factors: np.ndarray  # (rope_dim / 2,) Llama 3 frequency divisors, or None
    file: object  # the GGUFFile, kept open for embedding lookups

    def embed(self, tokens) -> np.ndarray:
        """(n,) token ids -> (n, dim) float32 rows of token_embd, read from the mapped file."""
        return np.stack([self.file.row("token_embd.weight", int(t)) for t in tokens])

    @property
    def nbytes(self) -> int:
        names = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
        linears = [self.output] + [getattr(lw, n) for lw in self.layers for n in names]
        return sum(lin.nbytes for lin in linears)


def load_shard(f, cfg, share: Share, backend, notice=print) -> ShardWeights:
    hd = cfg.head_dim
    q = (share.head_start * hd, (share.head_start + share.n_heads) * hd)
    kv = (share.kv_start * hd, (share.kv_start + share.n_kv) * hd)
    ffn = (share.ffn_start, share.ffn_start + share.n_ffn)

    def rows(name, span):
        return backend.linear(f.rows(name, *span, notice=notice))

    def cols(name, span):
        return backend.linear(f.cols(name, *span, notice=notice))

    def bias(name, span):
        return f.vector(name)[span[0]:span[1]].copy() if cfg.qkv_bias else None

    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=f.vector(p + "attn_norm.weight"),
            wq=rows(p + "attn_q.weight", q), wk=rows(p + "attn_k.weight", kv), wv=rows(p + "attn_v.weight", kv),
            bq=bias(p + "attn_q.bias", q), bk=bias(p + "attn_k.bias", kv), bv=bias(p + "attn_v.bias", kv),
            wo=cols(p + "attn_output.weight", q),
            ffn_norm=f.vector(p + "ffn_norm.weight"),
            w1=rows(p + "ffn_gate.weight", ffn), w3=rows(p + "ffn_up.weight", ffn),
            w2=cols(p + "ffn_down.weight", ffn),
        ))
    classifier = "token_embd.weight" if cfg.tied_output else "output.weight"
    vocab = (share.vocab_start, share.vocab_start + share.n_vocab)
    return ShardWeights(
        layers=layers,
        output_norm=f.vector("output_norm.weight"),
        output=rows(classifier, vocab),
        rope_factors=f.vector("rope_freqs.weight") if f.has("rope_freqs.weight") else None,
        file=f,
    )

"""An independent reference: the whole model in plain numpy, float64, one process, from a GGUF file.

Written from the architectures' definitions, not from the engine: every weight is dequantised with
`gguf.quants.dequantize` (any type) and widened to float64; the sequence runs causally in one pass.
- llama: RMSNorm (eps from the file), GQA attention with RoPE on interleaved pairs (2i, 2i+1) -- GGUF's llama
  layout, whose attn_q / attn_k rows llama.cpp's converter permuted from Hugging Face's rotate-halves order --,
  SwiGLU FFN, final RMSNorm, classifier output.weight or (tied) token_embd.
- qwen2: the same plus q/k/v biases, and NEOX RoPE (pairs (i, i + head_dim/2), no permutation).
- qwen3: NEOX RoPE, no biases; each head's q and k RMS-normalised (attn_q_norm / attn_k_norm) before the rotation;
  a head's size from attention.key_length where given (it need not be dim / n_heads).
- `rope_freqs.weight`, when present, divides each rotation frequency (Llama 3.1 scaling as llama.cpp stores it).
"""
from dataclasses import dataclass

import numpy as np
from gguf import GGUFReader
from gguf import quants as gguf_quants


@dataclass
class RefModel:
    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    theta: float
    w: dict  # GGUF name -> float64 array, numpy shape (out, in) / (n,)


def read_gguf(path):
    """(metadata dict, {name: float32 array in numpy shape}) with every tensor dequantised."""
    reader = GGUFReader(str(path), "r")
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        tensors[t.name] = gguf_quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
    return meta, tensors


def load(path) -> RefModel:
    meta, tensors = read_gguf(path)
    arch = meta["general.architecture"]
    n_heads = meta[f"{arch}.attention.head_count"]
    return RefModel(arch=arch, n_layers=meta[f"{arch}.block_count"], n_heads=n_heads,
                    n_kv_heads=meta[f"{arch}.attention.head_count_kv"],
                    head_dim=meta.get(f"{arch}.attention.key_length", meta[f"{arch}.embedding_length"] // n_heads),
                    eps=meta[f"{arch}.attention.layer_norm_rms_epsilon"],
                    theta=meta.get(f"{arch}.rope.freq_base", 10000.0),
                    w={k: v.astype(np.float64) for k, v in tensors.items()})


def rmsnorm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x, m: RefModel):
    """x: (seq, heads, head_dim) at positions 0..seq-1, rotated in place of a copy."""
    seq, half = x.shape[0], m.head_dim // 2
    freqs = m.theta ** (-np.arange(0, m.head_dim, 2, dtype=np.float64) / m.head_dim)  # (half,)
    if "rope_freqs.weight" in m.w:
        freqs = freqs / m.w["rope_freqs.weight"]
    angle = np.arange(seq, dtype=np.float64)[:, None] * freqs[None, :]  # (seq, half)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]  # (seq, 1, half)
    if m.arch in ("qwen2", "qwen3"):  # NEOX: element i pairs with i + half
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]  # interleaved: element 2i pairs with 2i + 1
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def attention(h, m: RefModel, b: str):
    seq, hd = h.shape[0], m.head_dim
    q, k, v = (h @ m.w[b + f"attn_{n}.weight"].T for n in "qkv")
    if m.arch == "qwen2":
        q, k, v = q + m.w[b + "attn_q.bias"], k + m.w[b + "attn_k.bias"], v + m.w[b + "attn_v.bias"]
    q, k = q.reshape(seq, m.n_heads, hd), k.reshape(seq, m.n_kv_heads, hd)
    if m.arch == "qwen3":
        q, k = rmsnorm(q, m.w[b + "attn_q_norm.weight"], m.eps), rmsnorm(k, m.w[b + "attn_k_norm.weight"], m.eps)
    q, k = rope(q, m), rope(k, m)  # (seq, n_heads, hd), (seq, n_kv_heads, hd)
    v = v.reshape(seq, m.n_kv_heads, hd)
    group = m.n_heads // m.n_kv_heads  # query head i reads kv head i // group
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # (seq, n_heads, hd)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)  # (n_heads, seq, seq)
    scores = np.where(np.tril(np.ones((seq, seq), dtype=bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", p, v).reshape(seq, m.n_heads * hd)
    return out @ m.w[b + "attn_output.weight"].T


def ffn(h, m: RefModel, b: str):
    gate, up = h @ m.w[b + "ffn_gate.weight"].T, h @ m.w[b + "ffn_up.weight"].T
    return (gate / (1.0 + np.exp(-gate)) * up) @ m.w[b + "ffn_down.weight"].T


def forward(m: RefModel, tokens) -> np.ndarray:
    """Logits (n_tokens, vocab), float64, for the sequence `tokens` starting at position 0."""
    x = m.w["token_embd.weight"][np.asarray(tokens)]  # (seq, dim)
    for i in range(m.n_layers):
        b = f"blk.{i}."
        x = x + attention(rmsnorm(x, m.w[b + "attn_norm.weight"], m.eps), m, b)
        x = x + ffn(rmsnorm(x, m.w[b + "ffn_norm.weight"], m.eps), m, b)
    x = rmsnorm(x, m.w["output_norm.weight"], m.eps)
    return x @ m.w.get("output.weight", m.w["token_embd.weight"]).T


def logits_for(gguf_path, tokens) -> np.ndarray:
    return forward(load(gguf_path), tokens)


def greedy(gguf_path, prompt_tokens, steps) -> list:
    """The `steps` tokens greedy decoding appends to the prompt (the prompt itself not included)."""
    m, seq = load(gguf_path), list(prompt_tokens)
    for _ in range(steps):
        seq.append(int(np.argmax(forward(m, seq)[-1])))
    return seq[len(prompt_tokens):]

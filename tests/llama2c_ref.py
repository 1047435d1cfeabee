"""A plain numpy transcription of llama2.c's run.c: the independent reference the engine is tested against.

One token at a time, float32 throughout, in run.c's order of operations. Weights are read with
`spmd.convert.read_llama2c` (llama2.c's names, every matrix (out, in)); `config` is its config dict.
"""
import re
from dataclasses import dataclass

import numpy as np

from spmd.convert import read_llama2c

BOS = 1
f32 = np.float32


@dataclass
class RunState:
    key_cache: np.ndarray  # (n_layers, seq_len, kv_dim)
    value_cache: np.ndarray  # (n_layers, seq_len, kv_dim)


def new_state(config) -> RunState:
    kv_dim = config["dim"] * config["n_kv_heads"] // config["n_heads"]
    shape = (config["n_layers"], config["seq_len"], kv_dim)
    return RunState(np.zeros(shape, f32), np.zeros(shape, f32))


def rmsnorm(x, weight):
    ss = np.sum(x * x, dtype=f32) / f32(x.size) + f32(1e-5)
    return weight * (f32(1.0) / np.sqrt(ss) * x)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum(dtype=f32)


def rope(q, k, pos, head_size, kv_dim):
    """run.c's RoPE: rotate each interleaved pair (i, i + 1) of q, and of k where i < kv_dim, in place."""
    for i in range(0, q.size, 2):
        head_dim = i % head_size
        freq = f32(1.0) / f32(10000.0) ** f32(head_dim / head_size)
        val = f32(pos) * freq
        fcr, fci = np.cos(val), np.sin(val)
        for vec in (q, k) if i < kv_dim else (q,):
            v0, v1 = vec[i], vec[i + 1]
            vec[i] = v0 * fcr - v1 * fci
            vec[i + 1] = v0 * fci + v1 * fcr


def attention(q, key_cache, value_cache, pos, n_heads, kv_mul, head_size):
    """Multi-query attention of q (dim,) over the cached positions 0..pos of one layer -> (dim,)."""
    xb = np.zeros(q.size, f32)
    for h in range(n_heads):
        qh = q[h * head_size:(h + 1) * head_size]
        kv = slice((h // kv_mul) * head_size, (h // kv_mul + 1) * head_size)
        att = key_cache[:pos + 1, kv] @ qh / np.sqrt(f32(head_size))  # (pos + 1,)
        att = softmax(att)
        xb[h * head_size:(h + 1) * head_size] = att @ value_cache[:pos + 1, kv]
    return xb


def forward(weights, config, token, pos, state):
    """run.c's forward(): the logits (vocab,) for `token` at position `pos`, filling the KV cache at `pos`."""
    w, dim, n_heads = weights, config["dim"], config["n_heads"]
    head_size = dim // n_heads
    kv_dim = dim * config["n_kv_heads"] // n_heads
    kv_mul = n_heads // config["n_kv_heads"]
    x = w["token_embedding"][token].copy()  # (dim,)
    for layer in range(config["n_layers"]):
        xb = rmsnorm(x, w["rms_att"][layer])
        q = w["wq"][layer] @ xb  # (dim,)
        k = w["wk"][layer] @ xb  # (kv_dim,)
        v = w["wv"][layer] @ xb  # (kv_dim,)
        rope(q, k, pos, head_size, kv_dim)
        state.key_cache[layer, pos] = k
        state.value_cache[layer, pos] = v
        xb = attention(q, state.key_cache[layer], state.value_cache[layer], pos, n_heads, kv_mul, head_size)
        x = x + w["wo"][layer] @ xb
        xb = rmsnorm(x, w["rms_ffn"][layer])
        hb = w["w1"][layer] @ xb  # (hidden_dim,)
        hb2 = w["w3"][layer] @ xb
        hb = hb * (f32(1.0) / (f32(1.0) + np.exp(-hb))) * hb2
        x = x + w["w2"][layer] @ hb
    x = rmsnorm(x, w["rms_final"])
    return w.get("wcls", w["token_embedding"]) @ x  # (vocab,)


def generate_greedy(checkpoint_path, steps) -> list:
    """run.c's generate() from BOS at temperature 0: up to `steps` tokens, stopping before a BOS."""
    config, weights = read_llama2c(checkpoint_path)
    state = new_state(config)
    token, out = BOS, []
    for pos in range(min(steps, config["seq_len"])):
        token = int(np.argmax(forward(weights, config, token, pos, state)))
        if token == BOS:
            break
        out.append(token)
    return out


def decode_llama2c(tokens, vocab) -> str:
    """run.c's decode() over `tokens` generated after BOS: the leading space after BOS is dropped, <0xNN> -> byte."""
    text, prev = b"", BOS
    for token in tokens:
        piece = vocab[token]
        if prev == BOS and piece.startswith(b" "):
            piece = piece[1:]
        byte = re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", piece)
        text += bytes([int(byte[1], 16)]) if byte else piece
        prev = token
    return text.decode("utf-8", errors="replace")

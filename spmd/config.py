"""The model's hyper-parameters, read once from the GGUF header; derived fields computed here and nowhere else."""
import math
import re
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .plan import FFN_BLOCK
from .quants import K_QUANTS, SUPER, readable

ARCHITECTURES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab: int
    context: int
    norm_eps: float
    rope_theta: float
    rope_dim: int  # leading dims of each head that are rotated
    rope_neox: bool  # rotate halves (qwen2) instead of interleaved pairs (llama)
    rope_linear_factor: float  # positions divided by this ("linear" rope scaling); 1 for none
    qkv_bias: bool
    tied_output: bool  # no output.weight: the classifier is token_embd
    qk_norm: bool = False  # qwen3: each head's q and k RMS-normalised (attn_q_norm / attn_k_norm, head_dim each)
    ffn_unit: int = 1  # FFN blocks the split keeps together: a K-quant ffn_down's super-block (ffn_unit)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def rope_inv_freq(self, factors=None) -> np.ndarray:
        """(rope_dim/2,) rotation frequencies; `factors` (rope_freqs.weight, Llama 3 scaling) divide them."""
        inv = 1.0 / self.rope_theta ** (np.arange(0, self.rope_dim, 2, dtype=np.float64) / self.rope_dim)
        if factors is not None:
            inv = inv / np.asarray(factors, dtype=np.float64)
        return inv


def read_config(f) -> ModelConfig:
    """ModelConfig from an open GGUFFile; refuses architectures we do not run."""
    arch = f.meta("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{f.path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")

    def meta(key, kind, default=None):
        """A metadata value of the architecture: a whole number, or a finite number > 0; missing: `default`."""
        value = f.meta(f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"{f.path}: metadata {arch}.{key} is missing")
        whole = isinstance(value, int) and not isinstance(value, bool)
        if kind is int and not whole:
            raise UserError(f"{f.path}: metadata {arch}.{key} is {value!r:.40}; it must be a whole number")
        if kind is float and not ((whole or isinstance(value, float)) and math.isfinite(value) and value > 0):
            raise UserError(f"{f.path}: metadata {arch}.{key} is {value!r:.40}; it must be a finite number above 0")
        return kind(value)

    experts = f.meta(f"{arch}.expert_count", 0)
    if experts or f.has("blk.0.ffn_gate_exps.weight"):
        raise UserError(f"{f.path}: a mixture-of-experts model ({arch}.expert_count {experts}, as Mixtral's) is not "
                        "supported: spmd runs dense Llama-family models")
    dim, n_heads = meta("embedding_length", int), meta("attention.head_count", int)
    n_layers = meta("block_count", int)
    if n_layers > len(f.tensors) // 9:  # a layer has nine tensors at least
        raise UserError(f"{f.path}: metadata {arch}.block_count is {n_layers}, but the file holds only "
                        f"{len(f.tensors)} tensors")
    n_kv_heads = meta("attention.head_count_kv", int, n_heads)
    head_dim = meta("attention.key_length", int, dim // max(n_heads, 1))
    embd = f.info("token_embd.weight")
    if f.meta(f"{arch}.attention.sliding_window"):
        raise UserError(f"{f.path}: sliding-window attention is not supported")
    scaling = f.meta(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UserError(f"{f.path}: RoPE scaling {scaling!r} is not supported (supported: none, linear, llama3)")
    cfg = ModelConfig(
        arch=arch, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, ffn_dim=meta("feed_forward_length", int), vocab=embd.shape[0],
        context=meta("context_length", int),
        norm_eps=meta("attention.layer_norm_rms_epsilon", float, 1e-5),
        rope_theta=meta("rope.freq_base", float, 10000.0),
        rope_dim=meta("rope.dimension_count", int, head_dim),
        rope_neox=arch in ("qwen2", "qwen3"),
        rope_linear_factor=meta("rope.scaling.factor", float, 1.0) if scaling == "linear" else 1.0,
        qkv_bias=f.has("blk.0.attn_q.bias"),
        tied_output=not f.has("output.weight"),
        qk_norm=arch == "qwen3",
        ffn_unit=ffn_unit([f.info(f"blk.{i}.ffn_down.weight").qtype for i in range(n_layers)
                           if f.has(f"blk.{i}.ffn_down.weight")]),
    )
    sizes = dict(embedding_length=dim, block_count=cfg.n_layers, head_count=n_heads, head_count_kv=n_kv_heads,
                 key_length=head_dim, feed_forward_length=cfg.ffn_dim, context_length=cfg.context)
    for key, value in sizes.items():
        if value < 1:
            raise UserError(f"{f.path}: metadata {arch}.{key} is {value}; it must be at least 1")
    vocab_size = f.meta(f"{arch}.vocab_size")
    if vocab_size is not None and vocab_size != cfg.vocab:
        raise UserError(f"{f.path}: metadata {arch}.vocab_size is {vocab_size!r:.40}, but token_embd.weight has "
                        f"{cfg.vocab} rows")
    if n_heads % n_kv_heads or cfg.rope_dim % 2 or not 2 <= cfg.rope_dim <= head_dim:
        raise UserError(f"{f.path}: inconsistent attention metadata (heads {n_heads}, kv heads {n_kv_heads}, "
                        f"head size {head_dim}, rotated dims {cfg.rope_dim})")
    check_tensors(f, cfg)
    return cfg


def ffn_unit(down_types) -> int:
    """FFN blocks a split keeps together, from the types of the layers' ffn_down matrices (split by columns): a
    K-quant's 256-column super-block (8 blocks), so that a slice does not cut one (spmd.plan.ffn_counts)."""
    return SUPER // FFN_BLOCK if any(t in K_QUANTS for t in down_types) else 1


def expected_shapes(cfg: ModelConfig) -> dict:
    """Every tensor the engine reads, with its numpy shape as the metadata implies it."""
    d, q, kv = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"token_embd.weight": (cfg.vocab, d), "output_norm.weight": (d,)}
    if not cfg.tied_output:
        shapes["output.weight"] = (cfg.vocab, d)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (d,), p + "attn_q.weight": (q, d), p + "attn_k.weight": (kv, d),
                       p + "attn_v.weight": (kv, d), p + "attn_output.weight": (d, q), p + "ffn_norm.weight": (d,),
                       p + "ffn_gate.weight": (cfg.ffn_dim, d), p + "ffn_up.weight": (cfg.ffn_dim, d),
                       p + "ffn_down.weight": (d, cfg.ffn_dim)})
        if cfg.qkv_bias:
            shapes.update({p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)})
        if cfg.qk_norm:
            shapes.update({p + "attn_q_norm.weight": (cfg.head_dim,), p + "attn_k_norm.weight": (cfg.head_dim,)})
    return shapes


def check_tensors(f, cfg: ModelConfig):
    """Refuse a file whose tensors disagree with its metadata, before anything is loaded."""
    shapes = expected_shapes(cfg)
    layer_of = ((name, re.match(r"blk\.(\d+)\.", name)) for name in f.tensors)
    beyond = next((name for name, m in layer_of if m and int(m.group(1)) >= cfg.n_layers), None)
    if beyond is not None:  # the metadata's layer count is short: the layers past it would be left out
        raise UserError(f"{f.path}: tensor {beyond} is of a layer beyond the metadata's block_count "
                        f"({cfg.n_layers})")
    if f.has("rope_freqs.weight"):
        shapes["rope_freqs.weight"] = (cfg.rope_dim // 2,)
    for name, shape in shapes.items():
        if not readable(f.info(name).qtype):
            raise UserError(f"{f.path}: tensor {name} is in {f.info(name).qtype.name}, a type spmd cannot read")
        if f.info(name).shape != shape:
            raise UserError(f"{f.path}: tensor {name} has shape {f.info(name).shape} but the metadata implies {shape}")

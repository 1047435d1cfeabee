"""Random-weight GGUF models from fixed seeds: the test models and the decode benchmark's TinyLlama stand-in.

A model is a `Shape` (the architecture's numbers), a weight type and a seed; the same three always give a
byte-identical file. Every tensor draws from its own generator, `default_rng([seed, crc32(name)])`, so a tensor's
values do not depend on the order or size of the others.

The file types are llama.cpp's (`FILE_TYPES`): one type for the matrices, and in the _M mixes Q6_K for the
classifier and for attn_v / ffn_down in some layers (`more_bits`); a K-quant tensor whose rows are not whole
256-element super-blocks takes llama.cpp's fallback type (`FALLBACK`). Two ways to fill a quantised tensor:
- exact (every type; Q8_0 / Q4_0 only up to EXACT_UP_TO weights): draw the float32 weights of `random_weights` and
  quantise them with `spmd.quants.quantize`, so the file holds exactly `quantize(random_weights(...)[name])`;
- direct (large Q8_0 / Q4_0 models): draw random int8 / nibbles and random fp16 block scales of the same standard
  deviation, one tensor at a time, straight into the file; TinyLlama in Q4_0 (~620 MB) writes in seconds.

Layout follows llama.cpp's converter: matrices are (out, in) in numpy order; llama's attn_q / attn_k rows are in
GGUF's interleaved-pair RoPE order (random weights are defined in that layout, the HF model un-permutes them);
Llama-3 rope scaling is a `rope_freqs.weight` tensor of per-frequency divisors.
"""
import collections
import concurrent.futures
import itertools
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, LlamaFileType, TokenType

from .quants import BLOCK, SUPER, block_size, quantize, row_bytes

EXACT_UP_TO = 1 << 24  # weights; bigger models get random quant blocks written directly
MAKING_BYTES = 1 << 29  # write_model: the float32 bytes of the tensors made ahead at once (each takes a few times that)
RMS_EPS = {"llama": 1e-5, "qwen2": 1e-6, "qwen3": 1e-6}
# The file types synth writes, as llama.cpp's quantiser makes them: (its file type, the matrices' type, the type of
# those that get more bits: the classifier, and attn_v and ffn_down in the layers of `more_bits`)
FILE_TYPES = {"F32": (LlamaFileType.ALL_F32, T.F32, None), "F16": (LlamaFileType.MOSTLY_F16, T.F16, None),
              "BF16": (LlamaFileType.MOSTLY_BF16, T.BF16, None), "Q8_0": (LlamaFileType.MOSTLY_Q8_0, T.Q8_0, None),
              "Q4_0": (LlamaFileType.MOSTLY_Q4_0, T.Q4_0, None), "Q4_1": (LlamaFileType.MOSTLY_Q4_1, T.Q4_1, None),
              "Q5_0": (LlamaFileType.MOSTLY_Q5_0, T.Q5_0, None), "Q5_1": (LlamaFileType.MOSTLY_Q5_1, T.Q5_1, None),
              "IQ4_NL": (LlamaFileType.MOSTLY_IQ4_NL, T.IQ4_NL, None),
              "Q2_K": (LlamaFileType.MOSTLY_Q2_K, T.Q2_K, T.Q3_K),
              "Q3_K_M": (LlamaFileType.MOSTLY_Q3_K_M, T.Q3_K, T.Q4_K),
              "Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K, T.Q6_K),
              "Q5_K_M": (LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K, T.Q6_K),
              "Q6_K": (LlamaFileType.MOSTLY_Q6_K, T.Q6_K, None)}
# llama.cpp's, for rows not of whole super-blocks
FALLBACK = {T.Q2_K: T.IQ4_NL, T.Q3_K: T.IQ4_NL, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
# Standard deviation of a matrix is GAIN / sqrt(fan_in): q.k scores of std ~1, layers that move the residual as
# much as the embedding does, and classifier logits of std ~2 so greedy steps are rarely near-ties.
# Embeddings N(0, 1): each token stands out in the residual stream; N(0, 1/dim) when tied (the classifier's logits
# then have std ~1 and the current token's own logit is not far ahead of the rest).
GAIN = {"output": 2.0}
EMBD_STD, NORM_STD, BIAS_STD = 1.0, 0.1, 0.2
# Standard deviation of the integer part of a random block: uniform int8 in [-127, 127], nibbles in [1, 15] (-7..7).
Q_STD = {T.Q8_0: math.sqrt((255 ** 2 - 1) / 12), T.Q4_0: math.sqrt((15 ** 2 - 1) / 12)}


@dataclass(frozen=True)
class Shape:
    arch: str = "llama"  # "llama" | "qwen2" | "qwen3"
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn: int = 128
    vocab: int = 512
    context: int = 256
    rope_theta: float = 10000.0
    tied: bool = False  # no output.weight: the classifier is token_embd
    # llama3-style: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = field(default=None, hash=False)
    key_length: int | None = None  # each head's size where it is not dim / n_heads (qwen3)

    @property
    def head_dim(self) -> int:
        return self.key_length or self.dim // self.n_heads

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(s.shape)) for s in tensor_plan(self))


TINYLLAMA = Shape(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn=5632, vocab=32000, context=2048)
LLAMA2_7B = Shape(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn=11008, vocab=32000, context=4096)


class TensorSpec(NamedTuple):
    name: str
    shape: tuple  # numpy order: (out, in) for a matrix, (n,) for a vector
    kind: str  # "embd" | "matrix" | "norm" | "bias" | "rope_freqs"


def tensor_plan(shape: Shape) -> list:
    """The model's tensors in file order (llama.cpp's: rope_freqs, token_embd, blocks, output_norm, output)."""
    d, q, kv = shape.dim, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    plan = []
    if shape.rope_scaling:
        plan.append(TensorSpec("rope_freqs.weight", (shape.head_dim // 2,), "rope_freqs"))
    plan.append(TensorSpec("token_embd.weight", (shape.vocab, d), "embd"))
    for i in range(shape.n_layers):
        b = f"blk.{i}."
        plan += [TensorSpec(b + "attn_norm.weight", (d,), "norm"),
                 TensorSpec(b + "attn_q.weight", (q, d), "matrix"),
                 TensorSpec(b + "attn_k.weight", (kv, d), "matrix"),
                 TensorSpec(b + "attn_v.weight", (kv, d), "matrix")]
        if shape.arch == "qwen2":
            plan += [TensorSpec(b + "attn_q.bias", (q,), "bias"), TensorSpec(b + "attn_k.bias", (kv,), "bias"),
                     TensorSpec(b + "attn_v.bias", (kv,), "bias")]
        if shape.arch == "qwen3":
            plan += [TensorSpec(b + "attn_q_norm.weight", (shape.head_dim,), "norm"),
                     TensorSpec(b + "attn_k_norm.weight", (shape.head_dim,), "norm")]
        plan += [TensorSpec(b + "attn_output.weight", (d, q), "matrix"),
                 TensorSpec(b + "ffn_norm.weight", (d,), "norm"),
                 TensorSpec(b + "ffn_gate.weight", (shape.ffn, d), "matrix"),
                 TensorSpec(b + "ffn_up.weight", (shape.ffn, d), "matrix"),
                 TensorSpec(b + "ffn_down.weight", (d, shape.ffn), "matrix")]
    plan.append(TensorSpec("output_norm.weight", (d,), "norm"))
    if not shape.tied:
        plan.append(TensorSpec("output.weight", (shape.vocab, d), "matrix"))
    return plan


def llama3_rope_factors(head_dim, theta, factor, low_freq_factor, high_freq_factor,
                        original_max_position_embeddings) -> np.ndarray:
    """Llama 3.1's rule as llama.cpp stores it: (head_dim/2,) float32 divisors of the rotation frequencies.

    Wavelength 2*pi/freq below original/high_freq_factor: 1; above original/low_freq_factor: `factor`; between:
    1 / ((1 - s) / factor + s) with s = (original / wavelength - low_freq_factor) / (high - low).
    """
    freqs = float(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < original_max_position_embeddings / high_freq_factor, 1.0,
                   np.where(wavelen > original_max_position_embeddings / low_freq_factor, factor, medium))
    return out.astype(np.float32)


# ---- weights --------------------------------------------------------------------------------------------------
def _rng(seed, name) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _std(spec: TensorSpec, tied: bool) -> float:
    if spec.kind == "embd":  # a tied classifier needs small embeddings, or each token predicts itself
        return EMBD_STD / math.sqrt(spec.shape[1]) if tied else EMBD_STD
    return GAIN.get(spec.name.split(".")[-2], 1.0) / math.sqrt(spec.shape[1])


def _float_tensor(spec: TensorSpec, shape: Shape, seed) -> np.ndarray:
    if spec.kind == "rope_freqs":
        return llama3_rope_factors(shape.head_dim, shape.rope_theta, **shape.rope_scaling)
    z = _rng(seed, spec.name).standard_normal(spec.shape, dtype=np.float32)
    if spec.kind == "norm":
        return (1.0 + NORM_STD * z).astype(np.float32)
    if spec.kind == "bias":
        return (BIAS_STD * z).astype(np.float32)
    return (np.float32(_std(spec, shape.tied)) * z).astype(np.float32)


def random_weights(shape: Shape, seed=0) -> dict:
    """{GGUF tensor name: float32 array (numpy shape (out, in) / (n,))}: the F32 file's exact contents."""
    return {s.name: _float_tensor(s, shape, seed) for s in tensor_plan(shape)}


def _random_blocks(spec: TensorSpec, qtype, seed, tied) -> np.ndarray:
    """Random Q8_0 / Q4_0 blocks of the tensor's standard deviation, as uint8 (rows, row_bytes)."""
    rows, cols = spec.shape
    rng = _rng(seed, spec.name)
    n_blocks = rows * cols // BLOCK
    base = _std(spec, tied) / Q_STD[qtype]
    scales = (rng.uniform(0.75, 1.25, size=(n_blocks, 1)) * base).astype(np.float16)
    if qtype == T.Q8_0:
        quants = rng.integers(-127, 128, size=(n_blocks, BLOCK), dtype=np.int8).view(np.uint8)
    else:
        nib = rng.integers(1, 16, size=(n_blocks, BLOCK), dtype=np.uint8)  # value = nibble - 8, in -7..7
        quants = nib[:, :BLOCK // 2] | (nib[:, BLOCK // 2:] << 4)
    return np.concatenate([scales.view(np.uint8), quants], axis=1).reshape(rows, row_bytes(qtype, cols))


def more_bits(layer, n_layers) -> bool:
    """llama.cpp's layers whose attn_v and ffn_down get more bits in a _M file: the first and last eighth, and
    every third between."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def _stored_type(spec: TensorSpec, kind, shape: Shape, mix=None):
    if len(spec.shape) == 1:
        return T.F32
    _, t, more = FILE_TYPES[kind]
    parts = spec.name.split(".")
    if mix and parts[0] == "blk" and parts[2] in mix:
        t, more = T[mix[parts[2]]], None
    classifier = spec.name == "output.weight" or (shape.tied and spec.kind == "embd")
    if more is not None and (classifier or (parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down")
                                            and more_bits(int(parts[1]), shape.n_layers))):
        t = more
    return FALLBACK[t] if t in FALLBACK and spec.shape[1] % SUPER else t


def _stored_data(spec: TensorSpec, t, shape: Shape, seed, exact) -> np.ndarray:
    if t in (T.Q8_0, T.Q4_0) and not exact:
        return _random_blocks(spec, t, seed, shape.tied)
    w = _float_tensor(spec, shape, seed)
    return w if t == T.F32 else quantize(w, t).data


# ---- file -----------------------------------------------------------------------------------------------------
def _check(shape: Shape, kind):
    if shape.arch not in RMS_EPS:
        raise ValueError(f"unknown arch {shape.arch!r}; expected one of {sorted(RMS_EPS)}")
    if kind not in FILE_TYPES:
        raise ValueError(f"unsupported file type {kind}; expected one of {list(FILE_TYPES)}")
    qtype = FILE_TYPES[kind][1]
    if (shape.key_length is None and shape.dim % shape.n_heads) or shape.n_heads % shape.n_kv_heads or \
            shape.head_dim % 2:
        raise ValueError(f"inconsistent heads: dim {shape.dim}, n_heads {shape.n_heads}, n_kv {shape.n_kv_heads}")
    if block_size(qtype) > 1 and (shape.dim % BLOCK or shape.ffn % BLOCK):
        raise ValueError(f"{qtype.name} needs dim and ffn to be multiples of {BLOCK}")


def write_model(path, shape: Shape, qtype="F32", seed=0, exact=None, chat_template=None, mix=None, split=0):
    """Write a random `shape` model to `path` (matrices in `qtype`, a type or a FILE_TYPES name such as "Q4_K_M";
    norms/biases F32), with `chat_template` (Jinja text) where given; returns `path`.

    mix: {a layer tensor's role: a type name} ({"ffn_up": "Q4_0"}): that role's matrices in every layer in that type
    instead (the per-tensor mixes some published files have).
    split: at most that many tensors a file, as llama.cpp's gguf-split writes a large model (NAME-00001-of-0000N.gguf,
    ...; the first file's path is returned); 0: one file.

    exact: quantised types from quantising `random_weights` (True) or from random blocks (False);
    None picks exact for models up to EXACT_UP_TO weights.
    """
    kind = qtype if isinstance(qtype, str) else T(qtype).name
    _check(shape, kind)
    if exact is None:
        exact = shape.n_params <= EXACT_UP_TO
    plan = tensor_plan(shape)
    writer = GGUFWriter(str(path), shape.arch, split_max_tensors=split)
    _add_metadata(writer, shape, kind, seed)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for spec in plan:
        t = _stored_type(spec, kind, shape, mix)
        rows = spec.shape[0] if len(spec.shape) == 2 else 1
        nbytes = rows * row_bytes(t, spec.shape[-1])
        if block_size(t) > 1:
            writer.add_tensor_info(spec.name, (rows, row_bytes(t, spec.shape[-1])), np.uint8, nbytes, raw_dtype=t)
        else:
            dtype = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}[t]
            writer.add_tensor_info(spec.name, spec.shape, dtype, nbytes, raw_dtype=t)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        def made(spec):
            return np.ascontiguousarray(_stored_data(spec, _stored_type(spec, kind, shape, mix), shape, seed, exact))
        for data in _in_order(made, plan, lambda spec: 4 * math.prod(spec.shape)):
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return writer.format_shard_names(Path(path))[0] if split else path


def _in_order(make, items, size, budget=MAKING_BYTES):
    """make(item) for each of `items`, yielded in order, made ahead on threads (numpy's random numbers and array
    arithmetic run outside the GIL) while the items being made take at most `budget` bytes by `size` (one at a
    time where one alone is larger)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(2, os.cpu_count() or 1)))
    try:
        ahead, held = collections.deque(), 0
        for item in items:
            while ahead and held + size(item) > budget:
                held -= ahead[0][1]
                yield ahead.popleft()[0].result()
            ahead.append((pool.submit(make, item), size(item)))
            held += size(item)
        while ahead:
            yield ahead.popleft()[0].result()
    finally:  # (an error, or the writer stopping: what has not started is dropped)
        pool.shutdown(cancel_futures=True)


def _add_metadata(w: GGUFWriter, shape: Shape, kind, seed):
    w.add_name(f"synth-{shape.arch}-d{shape.dim}-L{shape.n_layers}-{kind}-seed{seed}")
    w.add_file_type(FILE_TYPES[kind][0])
    if block_size(FILE_TYPES[kind][1]) > 1:
        w.add_quantization_version(2)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.dim)
    w.add_block_count(shape.n_layers)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.n_heads)
    w.add_head_count_kv(shape.n_kv_heads)
    w.add_layer_norm_rms_eps(RMS_EPS[shape.arch])
    w.add_rope_freq_base(shape.rope_theta)
    w.add_rope_dimension_count(shape.head_dim)
    if shape.key_length is not None:
        w.add_key_length(shape.key_length)
        w.add_value_length(shape.key_length)
    w.add_vocab_size(shape.vocab)
    if shape.arch == "llama":
        tokens, scores, types = llama_vocab(shape.vocab)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
    else:
        tokens, types, merges = gpt2_vocab(shape.vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        eos = tokens.index("<|endoftext|>")
        w.add_eos_token_id(eos)
        w.add_bos_token_id(eos)  # as Qwen2's converted GGUFs have it; never added (add_bos_token false)
        w.add_pad_token_id(eos)
        w.add_add_bos_token(False)


# ---- vocabularies ---------------------------------------------------------------------------------------------
LLAMA_PIECES = (
    "▁▁ ▁t er in ▁a en on ▁th es ▁▁▁▁ ▁s ▁d at or an ▁c is re it ▁the ar le ▁w ▁p ou al ▁f ▁m ed ▁o ▁b om ion "
    "ing ic as el ent ▁in ▁h nd et ▁l ▁n st ▁to ch ▁I ro il ▁of de ct ▁( am ▁C ▁de ▁S ▁u ▁A ▁e ▁and ▁T ol ▁v "
    "im ot ad ut ▁g em ur id ▁re ig ▁be ow ▁is ly he ▁he ▁that ▁for ▁it ▁you ▁was ▁on ▁with ▁as ▁are ▁this "
    "▁at ▁by ▁not ▁from ▁have ▁or ▁an ▁but ▁they ▁his ▁we ▁can ▁all ▁one ▁will ▁there ▁so ▁what ▁about "
    "▁which ▁when ▁their ▁if ▁more ▁time ▁would ▁been ▁Hello ▁world ▁The ▁cat ▁dog ▁sat ▁mat ▁quick ▁brown "
    "▁fox ▁jump ▁over ▁lazy ing ▁Once ▁upon ▁day ▁story"
).split() + ["▁"] + list("etaoinsrhldcumfpgwybvkxjqzETAOINSRHLDCUMFPGWYBVKXJQZ0123456789,.'-:;!?()\"/")


def _filler_pieces():
    """'▁ab', 'ab', '▁abc', 'abc', ...: unique pieces in a fixed order, as many as asked for."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for n in itertools.count(2):
        combos = ["".join(c) for c in itertools.product(letters, repeat=n)]
        yield from ("▁" + c for c in combos)
        yield from combos


def llama_vocab(n: int):
    """Sentencepiece-style vocab of n tokens -> (tokens, scores, types), in Llama 2's id order."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    if n <= len(tokens):
        raise ValueError(f"a llama vocab needs more than {len(tokens)} tokens, got {n}")
    pieces = list(dict.fromkeys(LLAMA_PIECES))[: n - len(tokens)]
    seen = set(pieces)
    fill = (p for p in _filler_pieces() if p not in seen)
    pieces += list(itertools.islice(fill, n - len(tokens) - len(pieces)))
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    return tokens + pieces, scores, [int(t) for t in types] + [int(TokenType.NORMAL)] * len(pieces)


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map, in its order (printable bytes first, then the rest). Written apart
    from spmd.tokenizer's on purpose: the test vocabularies this module writes must not share the reader's mistakes
    (tests/test_tokenizer.py holds the two to each other and to GPT-2's known stand-ins)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 printable bytes come first
    return dict(zip(bs, map(chr, cs)))


GPT2_MERGES = (
    "Ġ t|Ġ a|h e|i n|r e|o n|Ġt he|e r|Ġ s|a t|Ġ w|Ġ o|e n|Ġ c|i t|i s|a n|o r|e s|Ġ b|e d|Ġ f|in g|Ġ p|o u|"
    "Ġa n|a l|a r|Ġt o|Ġ m|Ġo f|Ġ in|Ġ d|Ġ h|Ġan d|i c|a s|l e|Ġt h|i on|o m|l l|en t|Ġ n|Ġ l|s t|Ġ re|v e|Ġ e|"
    "r o|l y|Ġb e|Ġ g|Ġ T|c t|Ġ S|i d|o t|Ġ I|u t|e t|Ġ A|Ġ i|Ġi s|Ġo n|i m|a m|o w|a y|a d|s e|Ġth at|Ġ C|i g|"
    "Ġf or|a c|Ġ y|v er|u r|Ġ u|l d|Ġs t|Ġ M|' s|Ġ he|Ġi t|at ion|it h|i r|c e|Ġy ou|i l|Ġ B|Ġw h|o l|Ġ P|"
    "Ġw ith|Ġ 1|t er|c h|Ġa s|Ġw e|Ġ (|n d|i ll|Ġ D|i f|Ġ 2|a g|er s|k e|Ġ \"|Ġ H|e m|Ġc on|Ġ W|Ġ R|he r|"
    "Ġw as|Ġ r|o d|Ġ F|u l|at e|Ġa t|r i|p p|o re|ĠT he|Ġs e|u s|Ġp ro|Ġh a|u m|Ġa re|Ġd e|a in|an d|Ġo r|"
    "ig h|es t|is t|a b|r om|Ġ N|t h|Ġc om|Ġ G|u n|o p|0 0|Ġ L|Ġn ot|es s|Ġe x|Ġ v|re s|Ġ E|e w|it y|an t|"
    "Ġb y|e l|o s|or t|o c|q u|Ġf rom|a ve|Ġh ave|Ġs u|i ve|ou ld|Ġs h|Ġth is|n t|r a|p e|igh t|ar t|m ent|Ċ Ċ"
).split("|")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def gpt2_vocab(n: int):
    """Byte-level BPE vocab of n tokens -> (tokens, types, merges): 256 byte characters, merge results in rank
    order, Qwen2's special tokens, then [PAD<id>] (unused) up to n, as llama.cpp's converter pads."""
    tokens = list(bytes_to_unicode().values())
    merges = GPT2_MERGES[: max(0, n - len(tokens) - len(SPECIALS))]
    known = set(tokens)
    for m in merges:
        a, b = m.split(" ")
        if a not in known or b not in known or a + b in known:
            raise AssertionError(f"bad merge {m!r}")  # the table above is wrong
        known.add(a + b)
        tokens.append(a + b)
    if n < len(tokens) + len(SPECIALS):
        raise ValueError(f"a gpt2 vocab needs at least {len(tokens) + len(SPECIALS)} tokens, got {n}")
    types = [int(TokenType.NORMAL)] * len(tokens) + [int(TokenType.CONTROL)] * len(SPECIALS)
    tokens += SPECIALS
    types += [int(TokenType.UNUSED)] * (n - len(tokens))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n)]
    return tokens, types, merges

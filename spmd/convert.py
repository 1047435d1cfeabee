"""Convert other model formats to GGUF: `python -m spmd.convert llama2c CHECKPOINT.bin TOKENIZER.bin OUT.gguf`.

llama2.c checkpoint (legacy version 0): a header of 7 int32 `dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len` (a negative vocab_size means the classifier is not shared and `wcls` follows at the end), then
float32 arrays in `_layout` order, then freq_cis_real and freq_cis_imag (seq_len, head_size / 2) each (optional
here: run.c never reads them), then wcls (vocab, dim) when not shared. Every matrix is (out, in) row-major, as GGUF
keeps it, and llama2.c's RoPE rotates interleaved pairs as GGUF's llama arch does, so no Q/K permutation is needed.

llama2.c tokenizer: int32 max_token_length, then per token: float32 score, int32 length, `length` bytes. The
sentencepiece .model it is exported from (llama2.c's tokenizer.py) does as well: its pieces, scores and token types.
"""
from . import needs  # (first: one line, not a traceback, where this Python lacks the set-up)
import os
import re
import struct
from pathlib import Path

import click
import numpy as np
import sentencepiece as spm
from gguf import GGMLQuantizationType as T, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

from .errors import UserError, click_main, regular_file
from .tokenizer import sp_token_type

HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
HEADER_BYTES = 4 * len(HEADER)
BLOCK = 32  # a matrix is stored as --outtype only when its rows (inputs) are whole blocks of this many
BYTE_TOKEN = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
SPACE = "\u2581".encode()  # sentencepiece's visible space, as GGUF vocabularies spell it

OUTTYPES = {
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}

# llama2.c's array names -> GGUF's per layer (blk.N.<name>.weight; the whole model's: `gguf_tensors`).
LAYER_NAMES = {"rms_att": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
               "rms_ffn": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}


# ---- reading llama2.c files ----------------------------------------------------------------------------------
def _layout(c) -> list:
    """The arrays that always follow the header, in file order, with their shapes."""
    L, dim, hidden, vocab = c["n_layers"], c["dim"], c["hidden_dim"], c["vocab_size"]
    kv_dim = dim * c["n_kv_heads"] // c["n_heads"]
    return [
        ("token_embedding", (vocab, dim)),
        ("rms_att", (L, dim)),
        ("wq", (L, dim, dim)),
        ("wk", (L, kv_dim, dim)),
        ("wv", (L, kv_dim, dim)),
        ("wo", (L, dim, dim)),
        ("rms_ffn", (L, dim)),
        ("w1", (L, hidden, dim)),
        ("w2", (L, dim, hidden)),
        ("w3", (L, hidden, dim)),
        ("rms_final", (dim,)),
    ]


def _read_header(path) -> dict:
    regular_file(path, "checkpoint")
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise UserError(f"{path} is too short for a llama2.c header ({len(raw)} bytes)")
    c = dict(zip(HEADER, struct.unpack("<7i", raw)))
    c["shared_classifier"] = c["vocab_size"] > 0
    c["vocab_size"] = abs(c["vocab_size"])
    _check_header(path, c)
    return c


def _check_header(path, c):
    bad = [k for k in HEADER if c[k] <= 0]
    if bad:
        raise UserError(f"{path} is not a llama2.c checkpoint: non-positive {', '.join(bad)} in its header")
    if c["dim"] % c["n_heads"] or c["n_heads"] % c["n_kv_heads"] or (c["dim"] // c["n_heads"]) % 2:
        raise UserError(f"{path} is not a llama2.c checkpoint: inconsistent header (dim {c['dim']}, "
                        f"{c['n_heads']} heads, {c['n_kv_heads']} KV heads)")


def looks_like_llama2c(path) -> bool:
    """Whether `path` holds a llama2.c checkpoint (a consistent header and at least the bytes its arrays need):
    spmd.gguf_file's hint where a --model is not GGUF."""
    try:
        c = _read_header(path)
    except UserError:
        return False
    return os.path.getsize(path) >= HEADER_BYTES + 4 * sum(int(np.prod(shape)) for _, shape in _layout(c))


def read_llama2c(path):
    """(config, arrays) of a llama2.c checkpoint; the arrays are float32 views of the file, keyed by llama2.c's
    names (plus `wcls` when the classifier is not shared). Raises UserError on a bad file."""
    path = str(path)
    c = _read_header(path)
    layout = _layout(c)
    n_cls = 0 if c["shared_classifier"] else c["vocab_size"] * c["dim"]
    n_weights = sum(int(np.prod(shape)) for _, shape in layout) + n_cls
    n_freq = c["seq_len"] * c["dim"] // c["n_heads"]  # real and imag, (seq_len, head_size / 2) each
    expected = [HEADER_BYTES + 4 * (n_weights + extra) for extra in (n_freq, 0)]
    size = os.path.getsize(path)
    if size not in expected:
        raise UserError(f"{path} is {size} bytes but its header implies {expected[0]} "
                        f"(or {expected[1]} without freq_cis)")
    data = np.memmap(path, dtype="<f4", mode="r", offset=HEADER_BYTES)
    arrays, at = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        arrays[name] = data[at:at + n].reshape(shape)
        at += n
    if n_cls:
        arrays["wcls"] = data[data.size - n_cls:].reshape(c["vocab_size"], c["dim"])  # last, after any freq_cis
    return c, arrays


def read_tokenizer(path, vocab_size):
    """(pieces as bytes, scores, token types) of TOKENIZER, which must hold exactly `vocab_size` tokens: a llama2.c
    tokenizer.bin, or a sentencepiece .model."""
    path = regular_file(str(path), "tokenizer")
    raw = Path(path).read_bytes()
    if not raw:  # (sentencepiece would log several lines of its own before it fails)
        raise UserError(f"tokenizer {path} is empty")
    try:
        sp = spm.SentencePieceProcessor(model_proto=raw)
    except RuntimeError:  # (not a sentencepiece model: no line on stderr either)
        pieces, scores = _llama2c_tokens(raw, path, vocab_size)
        return pieces, scores, [token_type(i, p) for i, p in enumerate(pieces)]
    n = sp.get_piece_size()
    if n != vocab_size:
        raise UserError(f"{path} is a sentencepiece model of {n} tokens but the checkpoint's vocabulary has "
                        f"{vocab_size}")
    if (sp.unk_id(), sp.bos_id(), sp.eos_id()) != (0, 1, 2):
        raise UserError(f"{path}: a llama2.c model has <unk>, <s> and </s> at ids 0, 1 and 2; this sentencepiece "
                        f"model has them at {sp.unk_id()}, {sp.bos_id()} and {sp.eos_id()}")
    pieces = [sp.id_to_piece(i).encode().replace(SPACE, b" ") for i in range(n)]
    return pieces, [sp.get_score(i) for i in range(n)], [sp_token_type(sp, i) for i in range(n)]


def read_llama2c_tokenizer(path, vocab_size):
    """(pieces as bytes, scores) of a llama2.c tokenizer file that must hold exactly `vocab_size` tokens."""
    path = regular_file(str(path), "tokenizer")
    return _llama2c_tokens(Path(path).read_bytes(), path, vocab_size)


def _llama2c_tokens(raw, path, vocab_size):
    at, pieces, scores = 4, [], []  # skip max_token_length
    while at < len(raw) and len(pieces) <= vocab_size:
        if at + 8 > len(raw):
            raise UserError(f"{path} is truncated in token {len(pieces)}")
        score, length = struct.unpack_from("<fi", raw, at)
        if length < 0:
            raise UserError(f"{path} is not a llama2.c tokenizer: token {len(pieces)} has length {length}")
        if at + 8 + length > len(raw):
            raise UserError(f"{path} is truncated in token {len(pieces)}")
        pieces.append(raw[at + 8:at + 8 + length])
        scores.append(score)
        at += 8 + length
    if len(pieces) != vocab_size:
        count = f"more than {vocab_size}" if len(pieces) > vocab_size else str(len(pieces))
        raise UserError(f"{path} holds {count} tokens but the checkpoint's vocabulary has {vocab_size}")
    return pieces, scores


# ---- writing GGUF --------------------------------------------------------------------------------------------
def gguf_tensors(c, arrays):
    """(GGUF name, float32 array) for every tensor to write, in GGUF's usual order."""
    yield "token_embd.weight", arrays["token_embedding"]
    for layer in range(c["n_layers"]):
        for src, dst in LAYER_NAMES.items():
            yield f"blk.{layer}.{dst}.weight", arrays[src][layer]
    yield "output_norm.weight", arrays["rms_final"]
    if "wcls" in arrays:
        yield "output.weight", arrays["wcls"]


def encode(a, qtype):
    """(data, type) to store: matrices whose rows are whole blocks of 32 take `qtype`, the rest stay F32."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 1 or a.shape[-1] % BLOCK:
        return a, T.F32
    return quantize(a, qtype), qtype


def token_type(i, piece) -> TokenType:
    if i == 0:
        return TokenType.UNKNOWN
    if i in (1, 2):
        return TokenType.CONTROL
    return TokenType.BYTE if BYTE_TOKEN.fullmatch(piece) else TokenType.NORMAL


def add_model_metadata(w, name, c, file_type):
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_context_length(c["seq_len"])
    w.add_embedding_length(c["dim"])
    w.add_block_count(c["n_layers"])
    w.add_feed_forward_length(c["hidden_dim"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(c["dim"] // c["n_heads"])


def add_vocab(w, pieces, scores, types):
    w.add_tokenizer_model("llama")
    w.add_token_list([p.replace(b" ", SPACE) for p in pieces])
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)


def write_gguf(path, name, c, arrays, vocab, outtype="f32"):
    """Write to a temporary name beside `path`, then rename: a failed write leaves no partial file behind."""
    qtype, file_type = OUTTYPES[outtype]
    part = f"{path}.part-{os.getpid()}"
    try:
        w = GGUFWriter(part, "llama")
        add_model_metadata(w, name, c, file_type)
        add_vocab(w, *vocab)
        for tensor_name, a in gguf_tensors(c, arrays):
            data, dtype = encode(a, qtype)
            w.add_tensor(tensor_name, data, raw_dtype=dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.unlink(part)


# ---- command line --------------------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Convert model files to GGUF."""


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("tokenizer", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--outtype", type=click.Choice(list(OUTTYPES)), default="f32", show_default=True,
              help="type of the matrices whose inputs are a multiple of 32; norms and the rest stay f32")
def llama2c(checkpoint, tokenizer, out, outtype):
    """Convert a llama2.c CHECKPOINT and its TOKENIZER (tokenizer.bin, or the sentencepiece .model it was exported
    from) to OUT (GGUF, arch llama)."""
    if not out.strip() or os.path.isdir(out):
        raise click.ClickException(f"OUT {out!r} must name a file to write")
    if os.path.lexists(out) and not os.path.isfile(out):  # written by a rename, which would replace a device
        raise click.ClickException(f"OUT {out} exists and is not a regular file (a device, a FIFO): name a file")
    for source in (checkpoint, tokenizer):
        if os.path.exists(out) and os.path.exists(source) and os.path.samefile(out, source):
            raise click.ClickException(f"{out} is also an input: writing it would destroy {source}")
    try:
        c, arrays = read_llama2c(checkpoint)
        write_gguf(out, Path(checkpoint).stem, c, arrays, read_tokenizer(tokenizer, c["vocab_size"]), outtype)
    except UserError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        where = out if str(e.filename or "").startswith(f"{out}.part-") else (e.filename or out)  # (its temporary)
        raise click.ClickException(f"{where}: {e.strerror or e}") from None
    click.echo(f"wrote {out}: {c['n_layers']} layers, dim {c['dim']}, vocab {c['vocab_size']}, {outtype}")


def main():
    needs.interruptible()  # (a Ctrl-C mid-write removes the part written)
    click_main(cli, "python -m spmd.convert")


if __name__ == "__main__":
    main()

"""The llama2.c -> GGUF converter, the numpy transcription of run.c it is checked with, and the engine against both.

Tests on the real checkpoint (../shared/models/aidreams260K.bin) skip when it is absent; the format and error
tests write small synthetic checkpoints and always run.
"""
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader, GGMLQuantizationType as T
from gguf.quants import dequantize

from llama2c_ref import BOS, decode_llama2c, generate_greedy
from spmd.convert import cli, read_llama2c, read_llama2c_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
STEPS = 40
LAYER_NAMES = {"attn_norm": "rms_att", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
               "ffn_norm": "rms_ffn", "ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}


# ---- helpers -------------------------------------------------------------------------------------------------
def convert(*args):
    """Run the CLI in-process: (exit code, everything it printed, the exception it ended with)."""
    result = CliRunner().invoke(cli, ["llama2c", *map(str, args)])
    return result.exit_code, result.output, result.exception


def write_checkpoint(path, dim=64, hidden=96, layers=2, heads=4, kv_heads=2, vocab=40, seq_len=16,
                     shared=True, with_freq=True, seed=0):
    """A random llama2.c checkpoint; returns its arrays by llama2.c's names."""
    rng = np.random.default_rng(seed)
    kv_dim, head_size = dim * kv_heads // heads, dim // heads
    shapes = [("token_embedding", (vocab, dim)), ("rms_att", (layers, dim)), ("wq", (layers, dim, dim)),
              ("wk", (layers, kv_dim, dim)), ("wv", (layers, kv_dim, dim)), ("wo", (layers, dim, dim)),
              ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
              ("w3", (layers, hidden, dim)), ("rms_final", (dim,))]
    if with_freq:
        shapes += [("freq_cis_real", (seq_len, head_size // 2)), ("freq_cis_imag", (seq_len, head_size // 2))]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes}
    header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq_len)
    Path(path).write_bytes(header + b"".join(a.tobytes() for a in arrays.values()))
    return arrays


def write_tokenizer(path, pieces):
    body = b"".join(struct.pack("<fi", -i, len(p)) + p for i, p in enumerate(pieces))
    Path(path).write_bytes(struct.pack("<i", max(map(len, pieces))) + body)


def synthetic_pieces(n):
    return [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f" t{i}".encode() for i in range(3, n)]


def expected_tensors(arrays, n_layers):
    """GGUF name -> the checkpoint array it must hold."""
    out = {"token_embd.weight": arrays["token_embedding"], "output_norm.weight": arrays["rms_final"]}
    if "wcls" in arrays:
        out["output.weight"] = arrays["wcls"]
    for layer in range(n_layers):
        for gguf_name, name in LAYER_NAMES.items():
            out[f"blk.{layer}.{gguf_name}.weight"] = arrays[name][layer]
    return out


def gguf_tensors(path):
    """GGUF name -> (type, values as float32 in numpy order)."""
    return {t.name: (t.tensor_type, dequantize(t.data, t.tensor_type)) for t in GGUFReader(path).tensors}


def meta(reader, key):
    return reader.fields[key].contents()


# ---- fixtures on the real checkpoint -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint():
    path = MODELS / "aidreams260K.bin"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return MODELS / "tok512.bin"


@pytest.fixture(scope="module")
def reference_tokens(checkpoint):
    return generate_greedy(checkpoint, STEPS)


@pytest.fixture(scope="module")
def converted(checkpoint, tokenizer, tmp_path_factory):
    """outtype -> path of the checkpoint converted by the CLI, made on first use."""
    paths = {}

    def get(outtype):
        if outtype not in paths:
            paths[outtype] = tmp_path_factory.mktemp(outtype) / "aidreams260K.gguf"
            code, output, _ = convert("--outtype", outtype, checkpoint, tokenizer, paths[outtype])
            assert code == 0, output
        return paths[outtype]
    return get


# ---- the reference -------------------------------------------------------------------------------------------
def test_reference_writes_echoes_of(checkpoint, tokenizer, reference_tokens):
    vocab, _ = read_llama2c_tokenizer(tokenizer, 512)
    assert len(reference_tokens) == STEPS
    # The first token is ' "': decode drops its space after BOS, so the text opens with a quote mark.
    assert decode_llama2c(reference_tokens, vocab).startswith('"Echoes of')


# ---- reading llama2.c files ----------------------------------------------------------------------------------
def test_read_llama2c_header_and_arrays(checkpoint):
    config, arrays = read_llama2c(checkpoint)
    assert config == dict(dim=64, hidden_dim=172, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=512,
                          seq_len=128, shared_classifier=True)
    assert arrays["w2"].shape == (4, 64, 172) and "wcls" not in arrays
    raw = np.fromfile(checkpoint, dtype="<f4", offset=28)
    np.testing.assert_array_equal(arrays["token_embedding"][0], raw[:64])
    freq = 128 * 16  # freq_cis_real and _imag follow rms_final: (seq_len, head_size / 2) each
    np.testing.assert_array_equal(arrays["rms_final"], raw[-freq - 64:-freq])


@pytest.mark.parametrize("with_freq", [True, False])
def test_read_unshared_classifier(tmp_path, with_freq):
    written = write_checkpoint(tmp_path / "m.bin", shared=False, with_freq=with_freq)
    config, arrays = read_llama2c(tmp_path / "m.bin")
    assert config["vocab_size"] == 40 and not config["shared_classifier"]
    for name in ("token_embedding", "wk", "w2", "rms_final", "wcls"):
        np.testing.assert_array_equal(arrays[name], written[name])


def test_read_tokenizer(tokenizer):
    pieces, scores = read_llama2c_tokenizer(tokenizer, 512)
    assert pieces[:3] == [b"<unk>", b"\n<s>\n", b"\n</s>\n"] and pieces[3] == b"<0x00>" and pieces[258] == b"<0xFF>"
    assert pieces[262] == b" a" and scores[262] == -3.0


# ---- the GGUF it writes --------------------------------------------------------------------------------------
def test_gguf_metadata(converted):
    reader = GGUFReader(converted("f32"))
    expected = {
        "general.architecture": "llama", "general.name": "aidreams260K", "general.file_type": 0,
        "llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 4,
        "llama.feed_forward_length": 172, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 4,
        "llama.rope.freq_base": 10000.0, "llama.rope.dimension_count": 16,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
    }
    assert {key: meta(reader, key) for key in expected} == expected
    assert meta(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)


def test_gguf_f32_tensors_equal_checkpoint(checkpoint, converted):
    config, arrays = read_llama2c(checkpoint)
    got = gguf_tensors(converted("f32"))
    want = expected_tensors(arrays, config["n_layers"])
    assert got.keys() == want.keys()  # no output.weight: the classifier is shared
    for name, (qtype, values) in got.items():
        assert qtype == T.F32, name
        np.testing.assert_array_equal(values, want[name], err_msg=name)


@pytest.mark.parametrize("outtype, qtype, file_type, error", [
    ("f16", T.F16, 1, 1e-3), ("q8_0", T.Q8_0, 7, 0.6 / 127), ("q4_0", T.Q4_0, 2, 1.1 / 8)])
def test_gguf_quantised_tensors(checkpoint, converted, outtype, qtype, file_type, error):
    """Matrices whose inputs are a multiple of 32 take `outtype`, within `error` times their block's largest value;
    ffn_down (172 inputs) and the norms stay F32."""
    config, arrays = read_llama2c(checkpoint)
    path = converted(outtype)
    assert meta(GGUFReader(path), "general.file_type") == file_type
    want = expected_tensors(arrays, config["n_layers"])
    for name, (got_type, values) in gguf_tensors(path).items():
        w = want[name]
        if w.ndim == 1 or "ffn_down" in name:
            assert got_type == T.F32, name
            np.testing.assert_array_equal(values, w, err_msg=name)
            continue
        assert got_type == qtype and values.shape == w.shape, name
        block_max = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
        assert np.all(np.abs(values - w).reshape(-1, 32) <= block_max * error + 1e-7), name


def test_gguf_vocab_round_trips(tokenizer, converted):
    pieces, scores = read_llama2c_tokenizer(tokenizer, 512)
    reader = GGUFReader(converted("f32"))
    tokens = meta(reader, "tokenizer.ggml.tokens")
    assert not any(" " in t for t in tokens) and tokens[262] == "\u2581a"
    assert [t.replace("\u2581", " ").encode() for t in tokens] == pieces
    assert meta(reader, "tokenizer.ggml.scores") == scores
    assert meta(reader, "tokenizer.ggml.token_type") == [2, 3, 3] + [6] * 256 + [1] * 253


def test_unshared_classifier_becomes_output_weight(tmp_path):
    written = write_checkpoint(tmp_path / "m.bin", shared=False, with_freq=False)
    write_tokenizer(tmp_path / "tok.bin", synthetic_pieces(40))
    code, output, _ = convert(tmp_path / "m.bin", tmp_path / "tok.bin", tmp_path / "m.gguf")
    assert code == 0, output
    got = gguf_tensors(tmp_path / "m.gguf")
    assert got.keys() == expected_tensors(written, 2).keys()
    np.testing.assert_array_equal(got["output.weight"][1], written["wcls"])
    np.testing.assert_array_equal(got["blk.1.attn_k.weight"][1], written["wk"][1])  # (kv_dim, dim): GQA


def test_a_sentencepiece_model_as_the_tokenizer(tmp_path):
    """The .model llama2.c's tokenizer.bin is exported from: its pieces, scores and types, encoded as sentencepiece
    encodes (it was "truncated in token 1")."""
    import sentencepiece as spm

    from spmd.gguf_file import GGUFFile
    from spmd.tokenizer import load_tokenizer
    lines = [f"the cat {w} sat on the mat {i}" for i, w in enumerate(["big", "red", "little", "happy"] * 50)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "t"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "t.model"))
    write_checkpoint(tmp_path / "m.bin", vocab=300)
    code, output, _ = convert(tmp_path / "m.bin", tmp_path / "t.model", tmp_path / "m.gguf")
    assert code == 0, output
    reader = GGUFReader(tmp_path / "m.gguf")
    assert meta(reader, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(300)]
    assert meta(reader, "tokenizer.ggml.scores") == pytest.approx([sp.get_score(i) for i in range(300)])
    assert meta(reader, "tokenizer.ggml.token_type") == [2, 3, 3] + [6] * 256 + [1] * 41  # unk, bos, eos, bytes
    tok = load_tokenizer(GGUFFile(tmp_path / "m.gguf"))
    for text in ["the big cat sat", "a mat 7, zebra é!"]:
        assert tok.encode(text) == [1] + sp.encode(text)
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    if (MODELS / "llama2-tokenizer.model").is_file():
        code, output, _ = convert(tmp_path / "m.bin", MODELS / "llama2-tokenizer.model", tmp_path / "n.gguf")
        assert code != 0 and output.count("\n") == 1
        assert "is a sentencepiece model of 32000 tokens but the checkpoint's vocabulary has 300" in output


# ---- bad input: one line, no traceback -----------------------------------------------------------------------
def truncated(tmp_path):
    write_checkpoint(tmp_path / "m.bin")
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "m.bin").write_bytes(data[:-100])


def garbage(tmp_path):
    (tmp_path / "m.bin").write_bytes(np.random.default_rng(1).bytes(5000))


def short_header(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"\x01\x00\x00\x00" * 3)


def inconsistent_header(tmp_path):
    write_checkpoint(tmp_path / "m.bin", heads=5, kv_heads=5)  # dim 64 does not split into 5 heads


def missing_checkpoint(tmp_path):
    (tmp_path / "m.bin").unlink()


def fewer_tokens(tmp_path):
    write_tokenizer(tmp_path / "tok.bin", synthetic_pieces(39))


def more_tokens(tmp_path):
    write_tokenizer(tmp_path / "tok.bin", synthetic_pieces(41))


def truncated_tokenizer(tmp_path):
    (tmp_path / "tok.bin").write_bytes((tmp_path / "tok.bin").read_bytes()[:-3])


def empty_tokenizer(tmp_path):
    (tmp_path / "tok.bin").write_bytes(b"")  # (sentencepiece logged three lines of its own before the error, once)


@pytest.mark.parametrize("spoil, message", [
    (empty_tokenizer, "tok.bin is empty"), (truncated, "header implies"), (garbage, "not a llama2.c checkpoint"),
    (short_header, "too short"),
    (inconsistent_header, "inconsistent header"), (missing_checkpoint, "not found"),
    (fewer_tokens, "holds 39 tokens"), (more_tokens, "more than 40"), (truncated_tokenizer, "truncated in token 39")])
def test_bad_input_is_one_line_error(tmp_path, spoil, message):
    write_checkpoint(tmp_path / "m.bin")
    write_tokenizer(tmp_path / "tok.bin", synthetic_pieces(40))
    spoil(tmp_path)
    code, output, exception = convert(tmp_path / "m.bin", tmp_path / "tok.bin", tmp_path / "m.gguf")
    assert code != 0 and isinstance(exception, SystemExit)
    assert output.startswith("Error: ") and output.count("\n") == 1 and "Traceback" not in output
    assert message in output
    assert not (tmp_path / "m.gguf").exists()


def fifo_checkpoint(tmp_path):
    (tmp_path / "m.bin").unlink()
    os.mkfifo(tmp_path / "m.bin")


def fifo_tokenizer(tmp_path):
    (tmp_path / "tok.bin").unlink()
    os.mkfifo(tmp_path / "tok.bin")


@pytest.mark.parametrize("spoil, message", [(fifo_checkpoint, "checkpoint .*m.bin is not a regular file"),
                                            (fifo_tokenizer, "tokenizer .*tok.bin is not a regular file")])
def test_an_input_that_is_no_file_is_named_so(tmp_path, spoil, message):
    """A FIFO was reported as "not found" (and read from, it would hang)."""
    import re
    write_checkpoint(tmp_path / "m.bin")
    write_tokenizer(tmp_path / "tok.bin", synthetic_pieces(40))
    spoil(tmp_path)
    code, output, _ = convert(tmp_path / "m.bin", tmp_path / "tok.bin", tmp_path / "m.gguf")
    assert code != 0 and output.count("\n") == 1 and re.search(message, output), output


def test_an_output_that_is_a_device_or_fifo_is_refused(tmp_path):
    """A rename over /dev/full (as root) replaced the device with the model file."""
    write_checkpoint(tmp_path / "m.bin")
    write_tokenizer(tmp_path / "tok.bin", synthetic_pieces(40))
    os.mkfifo(tmp_path / "out")
    code, output, _ = convert(tmp_path / "m.bin", tmp_path / "tok.bin", tmp_path / "out")
    assert code != 0 and "exists and is not a regular file" in output and output.count("\n") == 1
    assert stat.S_ISFIFO(os.stat(tmp_path / "out").st_mode)  # still the FIFO


@pytest.mark.parametrize("victim", ["m.bin", "tok.bin"])
def test_an_output_that_is_also_an_input_is_refused_untouched(tmp_path, victim):
    write_checkpoint(tmp_path / "m.bin")
    write_tokenizer(tmp_path / "tok.bin", synthetic_pieces(40))
    before = (tmp_path / victim).read_bytes()
    code, output, _ = convert(tmp_path / "m.bin", tmp_path / "tok.bin", tmp_path / victim)
    assert code != 0 and "is also an input" in output and output.count("\n") == 1
    assert (tmp_path / victim).read_bytes() == before


def test_an_empty_output_name_is_one_line(tmp_path):
    write_checkpoint(tmp_path / "m.bin")
    write_tokenizer(tmp_path / "tok.bin", synthetic_pieces(40))
    code, output, _ = convert(tmp_path / "m.bin", tmp_path / "tok.bin", "")
    assert code != 0 and output == "Error: OUT '' must name a file to write\n"


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    """The disk fills up half way: one line, and neither OUT nor a partial file is left."""
    import errno

    from gguf import GGUFWriter

    def full(_self, *_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
    write_checkpoint(tmp_path / "m.bin")
    write_tokenizer(tmp_path / "tok.bin", synthetic_pieces(40))
    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", full)
    code, output, _ = convert(tmp_path / "m.bin", tmp_path / "tok.bin", tmp_path / "m.gguf")
    assert code != 0 and "No space left on device" in output and output.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "tok.bin"]


def test_mismatched_real_tokenizer(tmp_path, tokenizer):
    write_checkpoint(tmp_path / "m.bin")
    code, output, _ = convert(tmp_path / "m.bin", tokenizer, tmp_path / "m.gguf")
    assert code != 0 and output.count("\n") == 1 and "more than 40 tokens" in output


# ---- the engine against the reference ------------------------------------------------------------------------
def launcher(ranks):
    return [] if ranks == 1 else ["mpirun", "-n", str(ranks)]


def run_engine(model, steps, prefix=(), extra=()):
    """The engine's JSON answer for a greedy run of `steps` tokens from BOS, started with `prefix` (e.g. mpirun)."""
    cmd = [*prefix, sys.executable, "-m", "spmd.run", "--model", str(model), "--temperature", "0",
           "--steps", str(steps), "--output", "json", "--prompt", "", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("ranks, extra", [(1, ()), (2, ("--ratios", "1:3")),
                                          (3, ("--ratios", "2:3:3", "--allreduce", "ring")),
                                          (4, ("--allreduce", "mpi"))])
def test_engine_matches_llama2c_reference(converted, reference_tokens, ranks, extra):
    if ranks > 1 and shutil.which("mpirun") is None:
        pytest.skip("mpirun is not on PATH")
    answer = run_engine(converted("f32"), STEPS, launcher(ranks), extra)
    assert answer["prompt_tokens"] == [BOS]
    assert answer["tokens"] == reference_tokens

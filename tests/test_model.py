"""Numerical truth on one rank: the engine's logits against tests/reference.py (an independent numpy
transcription), and its greedy tokens against golden files recorded from Hugging Face transformers."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

import reference
from spmd.backends import get_backend
from spmd.comm import Comm
from spmd.engine import Engine, RunOptions
from spmd.errors import UserError
from spmd.prompts import PromptSpec
from spmd.synth import Shape, write_model

GOLDEN = {p.stem: json.loads(p.read_text()) for p in sorted((Path(__file__).parent / "golden").glob("*.json"))}


def golden_model(tmp_path, case):
    g = GOLDEN[case]
    shape = Shape(**g["shape"])
    return write_model(tmp_path / f"{case}.gguf", shape, qtype=g["qtype"], seed=g["seed"]), g


def engine(path, prompt, backend="cpu", steps=4, **kw):
    opts = RunOptions(model=str(path), prompts=(PromptSpec(ids=tuple(prompt)),), steps=steps, backend=backend, **kw)
    return Engine(opts, Comm(comm=MPI.COMM_SELF), log=lambda _m: None)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("case", [c for c in GOLDEN if c.endswith("f32")])
def test_logits_match_reference_f32(tmp_path, case, backend):
    path, g = golden_model(tmp_path, case)
    tokens = g["prompt"] + g["tokens"][:8]
    expected = reference.logits_for(path, tokens)  # (n, vocab) every position
    e = engine(path, tokens, backend=backend)
    # the whole sequence in one batched pass, then the same positions one token at a time from a fresh cache
    np.testing.assert_allclose(e.executor.forward(np.array(tokens), 0), expected[-1], rtol=0, atol=1e-4)
    e = engine(path, tokens, backend=backend)
    e.executor.forward(np.array(tokens[:5]), 0)
    for pos in range(5, len(tokens)):
        got = e.executor.forward(np.array(tokens[pos:pos + 1]), pos)
        np.testing.assert_allclose(got, expected[pos], rtol=0, atol=1e-4)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M"])
def test_int8_activations_stay_near_the_reference(tmp_path, qtype):
    """--activations int8 moves the logits by about llama.cpp's 8-bit activations' error (1e-3..1e-1 here, against
    the reference's float arithmetic), and a prompt in one pass gives what the same tokens one at a time give."""
    dim = 256 if qtype.endswith("_K_M") else 128  # rows of 256: Q4_K, Q5_K (and Q6_K), not their fallbacks
    shape = Shape(dim=dim, n_layers=3, n_heads=4, n_kv_heads=2, ffn=2 * dim, vocab=512, context=64)
    path = write_model(tmp_path / f"{qtype}.gguf", shape, qtype, seed=5)
    tokens = [1, 5, 9, 200, 37, 411, 8, 99]
    expected = reference.logits_for(path, tokens)
    got = engine(path, tokens, activations="int8").executor.forward(np.array(tokens), 0)
    moved = np.abs(got - expected[-1]).max()
    assert 1e-4 < moved < 0.05 * np.abs(expected[-1]).max()
    e = engine(path, tokens, activations="int8")
    e.executor.forward(np.array(tokens[:5]), 0)
    for pos in range(5, len(tokens)):
        one = e.executor.forward(np.array(tokens[pos:pos + 1]), pos)
    np.testing.assert_allclose(one, got, rtol=0, atol=1e-4)
    with pytest.raises(UserError, match="--activations 'int4': choose f32 or int8"):
        engine(path, tokens, activations="int4")


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q4_1", "Q5_1", "Q3_K_M", "IQ4_NL"])
def test_logits_of_quantised_files_match_reference(tmp_path, qtype, backend):
    """The types kept as they are (K-quants and their fallbacks, IQ4_NL; rows of 256 and of 96) against the
    reference, which dequantises every weight with the gguf package."""
    for dim in (256, 96):
        shape = Shape(dim=dim, n_layers=3, n_heads=4, n_kv_heads=2, ffn=2 * dim, vocab=512, context=64)
        path = write_model(tmp_path / f"{qtype}-{dim}.gguf", shape, qtype, seed=5)
        tokens = [1, 5, 9, 200, 37, 411]
        expected = reference.logits_for(path, tokens)
        got = engine(path, tokens, backend=backend).executor.forward(np.array(tokens), 0)
        np.testing.assert_allclose(got, expected[-1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("case", list(GOLDEN))
def test_greedy_tokens_match_transformers(tmp_path, case, backend):
    path, g = golden_model(tmp_path, case)
    result = engine(path, g["prompt"], backend=backend, steps=len(g["tokens"])).run()
    assert result["tokens"] == g["tokens"]


def test_llama3_rope_scaling_changes_the_output(tmp_path):
    """The rope_freqs factors are used: the same weights without them give other logits."""
    path, g = golden_model(tmp_path, "llama3_rope_f32")
    plain = write_model(tmp_path / "plain.gguf", Shape(**{**g["shape"], "rope_scaling": None}), "F32", g["seed"])
    scaled_logits = engine(path, g["prompt"]).executor.forward(np.array(g["prompt"]), 0)
    plain_logits = engine(plain, g["prompt"]).executor.forward(np.array(g["prompt"]), 0)
    assert np.abs(scaled_logits - plain_logits).max() > 1e-2
    np.testing.assert_allclose(scaled_logits, reference.logits_for(path, g["prompt"])[-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["llama_q4_0", "llama_q8_0", "llama_gqa_f32", "qwen2_tied_f32", "qwen3_f32"])
@pytest.mark.parametrize("activations, kv_cache", [("f32", "f32"), ("int8", "f16")])
def test_the_cpu_backends_prompt_in_one_pass_is_token_by_token_to_the_bit(tmp_path, case, activations, kv_cache):
    """On the cpu backend every row of a pass is computed as it would be alone (the products, the norms, and a
    prompt row's attention as a one-token step's: CpuModel._attend_rows), so a prompt's last logits are the same
    bits in one pass, in two, or a token at a time (before, int8 moved them by up to 0.24)."""
    path, g = golden_model(tmp_path, case)
    prompt = np.array(g["prompt"] + g["tokens"])[:19]
    kw = dict(activations=activations, kv_cache=kv_cache)
    batched = engine(path, prompt, **kw).executor.forward(prompt, 0).copy()
    e = engine(path, prompt, **kw)
    e.executor.forward(prompt[:7], 0)
    halves = e.executor.forward(prompt[7:], 7).copy()
    e = engine(path, prompt, **kw)
    for pos in range(len(prompt)):
        one = e.executor.forward(prompt[pos:pos + 1], pos)
    assert np.array_equal(batched, one) and np.array_equal(batched, halves)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_a_long_prompt_attends_a_few_rows_at_a_time_with_the_references_logits(tmp_path, monkeypatch, rows, backend):
    """Queries in blocks of ATTEND_ROWS (here 1, 3 or 7 of a 23-token prompt: blocks that end inside it) give
    every position the reference's logits, as one block does; on the cpu backend the same bits as a token at a
    time."""
    import spmd.model
    path, g = golden_model(tmp_path, "llama_gqa_f32")  # grouped queries: 2 query heads a KV head
    tokens = (g["prompt"] + g["tokens"])[:23]
    expected = reference.logits_for(path, tokens)
    monkeypatch.setattr(spmd.model, "ATTEND_ROWS", rows)
    got = engine(path, tokens, backend=backend).executor.forward(np.array(tokens), 0)
    np.testing.assert_allclose(got, expected[-1], rtol=0, atol=1e-4)
    if backend == "cpu":
        e = engine(path, tokens)
        for pos in range(len(tokens)):
            one = e.executor.forward(np.array(tokens[pos:pos + 1]), pos)
        assert np.array_equal(got, one)


def test_other_weight_types_are_dequantised_at_load_with_one_notice(tmp_path, monkeypatch):
    """A type the engine does not keep (IQ4_XS, ...; here Q5_0 taken off the kept list, as synth cannot write
    those) is read as F32, said once."""
    from spmd import gguf_file
    monkeypatch.setattr(gguf_file, "NATIVE", tuple(t for t in gguf_file.NATIVE if t.name != "Q5_0"))
    path = write_model(tmp_path / "q5.gguf", Shape(dim=64, ffn=128), qtype="Q5_0", seed=1)
    notices = []
    opts = RunOptions(model=str(path), prompts=(PromptSpec(ids=(1, 5, 9)),), steps=2)
    e = Engine(opts, Comm(comm=MPI.COMM_SELF), log=notices.append)
    assert notices == ["note: the file holds Q5_0 weights; dequantising them to F32 at load"]
    np.testing.assert_allclose(e.executor.forward(np.array([1, 5, 9]), 0), reference.logits_for(path, [1, 5, 9])[-1],
                               rtol=0, atol=1e-4)


def resident_bytes_of(path):
    """Resident bytes of this process's mappings of `path` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_the_file_is_not_kept_resident_after_loading(tmp_path):
    path = write_model(tmp_path / "m.gguf", Shape(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn=1536,
                                                  vocab=2048), qtype="Q4_0", seed=0)
    e = engine(path, [1, 2, 3])
    size = path.stat().st_size
    assert e.state.model.w.nbytes > 0.8 * size  # the weights were copied out...
    assert resident_bytes_of(path) < 0.1 * size  # ...and the mapping's pages handed back


@pytest.mark.parametrize("qtype, shape, spans", [
    ("Q8_0", Shape(dim=64, n_heads=4, n_kv_heads=4, ffn=128), [[(16, 48)], [(0, 16), (48, 64)], [(32, 64)]]),
    ("IQ4_NL", Shape(dim=64, n_heads=4, n_kv_heads=4, ffn=128), [[(16, 48)], [(0, 16), (48, 64)], [(32, 64)]]),
    ("Q4_K_M", Shape(dim=256, n_heads=4, n_kv_heads=4, ffn=256), [[(64, 128)], [(0, 64), (192, 256)], [(64, 256)]]),
    ("Q3_K_M", Shape(dim=256, n_heads=4, n_kv_heads=4, ffn=256), [[(64, 128)], [(0, 64), (192, 256)], [(64, 256)]]),
])
def test_column_slices_through_quant_blocks_keep_the_blocks_whole(tmp_path, qtype, shape, spans):
    """A rank's heads may cut through quant blocks (head_dim 16 in Q8_0's 32, 64 in Q4_K's 256): its slice holds
    the whole blocks around them in the file's type, and `keep` names its columns; the numbers stay the file's,
    every backend computes with them."""
    from spmd.gguf_file import GGUFFile
    from spmd.quants import dequantize
    path = write_model(tmp_path / "m.gguf", shape, qtype, seed=2)
    f, notices = GGUFFile(path), []
    whole = dequantize(f.rows("blk.0.attn_output.weight", 0, shape.dim, notice=notices.append))
    x = np.random.default_rng(0).standard_normal((3, shape.dim)).astype(np.float32)
    for ranges in spans:
        part = f.col_ranges("blk.0.attn_output.weight", ranges, notice=notices.append)
        expected = np.concatenate([whole[:, a:b] for a, b in ranges], axis=1)
        stored = f.info("blk.0.attn_output.weight").qtype
        assert part.qtype == stored
        assert (part.keep is None) == (ranges == [(32, 64)])  # only the last cuts nothing
        assert part.width == expected.shape[1]
        np.testing.assert_array_equal(dequantize(part), expected)
        lins = [get_backend(backend).linear(part) for backend in ("numpy", "cpu")]
        for lin in lins:
            np.testing.assert_allclose(lin(x[:, :part.width]), x[:, :part.width] @ expected.T, rtol=1e-5, atol=1e-5)
    assert notices == []


def test_a_model_file_written_during_the_run_stops_it_with_one_error(tmp_path):
    """The file is truncated in place after the third token: generation stops before reading from it again, with
    a UserError naming the file (it used to end in a SIGBUS, or go on with other weights)."""
    path = write_model(tmp_path / "m.gguf", Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=128, vocab=512,
                                                  context=64), "F32", 3)
    e = engine(path, [1, 5, 9], steps=20)
    shown = []

    def emit(piece):
        shown.append(piece)
        if len(shown) == 4:  # the prompt's text, then 3 tokens
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        return True
    with pytest.raises(UserError, match=r"m.gguf on rank 0 \(.*\) was written during the run"):
        e.run(emit)
    assert len(shown) < 8


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_the_memory_accounting_knows_whose_prompt_attention_copies_a_float16_cache(tmp_path, backend):
    """Backend.widens_f16_cache (what --memory-limit counts, `pass_bytes`) says what the model's prompt attention
    does: the numpy model reads a float16 cache through a float32 copy of its keys and values, the cpu model (heads
    of whole 16-lanes) widens each as it reads it. Measured with tracemalloc, which sees numpy's allocations."""
    import tracemalloc
    path, g = golden_model(tmp_path, "llama_gqa_f32")  # head_dim 16
    e = engine(path, g["prompt"], backend=backend, kv_cache="f16")
    model, cfg = e.state.model, e.state.cfg
    rng = np.random.default_rng(0)
    T, m = 4000, 2
    ck, cv = (rng.standard_normal((cfg.n_kv_heads, T, cfg.head_dim)).astype(np.float16) for _ in range(2))
    q = rng.standard_normal((m, cfg.n_heads, cfg.head_dim)).astype(np.float32)
    model._attend_rows(q, T - m, ck, cv)  # (compiled, scratch made)
    tracemalloc.start()
    out = model._attend_rows(q, T - m, ck, cv)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    copy = 2 * ck.size * 4  # float32 keys and values
    assert (peak >= copy) == e.state.backend.widens_f16_cache(cfg.head_dim) == (backend == "numpy")
    assert peak < copy + 4 * m * cfg.n_heads * T * 4 + out.nbytes * 2  # (the scores, their temporaries, out)

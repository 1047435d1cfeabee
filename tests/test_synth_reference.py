"""spmd.synth's files (deterministic, the expected layout, exact quantisation) and tests/reference.py against the
golden tokens that scripts/make_golden.py recorded from Hugging Face transformers (no torch needed here)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import reference
from spmd.gguf_file import GGUFFile
from spmd.quants import dequantize, quantize
from spmd.synth import Shape, llama3_rope_factors, random_weights, tensor_plan, write_model

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.json"))
QWEN2 = Shape(arch="qwen2", tied=True, rope_theta=1000000.0)
SCALED = Shape(rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64})


@pytest.mark.parametrize("shape,qtype,exact", [(Shape(), "F32", None), (QWEN2, "Q4_0", None),
                                               (Shape(), "Q8_0", False)])
def test_same_seed_same_bytes(tmp_path, shape, qtype, exact):
    a, b, c = (write_model(tmp_path / f"{n}.gguf", shape, qtype, seed, exact=exact)
               for n, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_llama_layout_and_metadata(tmp_path):
    f = GGUFFile(write_model(tmp_path / "m.gguf", SCALED, "F32", 0))
    assert f.meta("general.architecture") == "llama"
    expect = {"context_length": 256, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
              "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16}
    assert {k: f.meta(f"llama.{k}") for k in expect} == expect
    assert f.meta("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert f.meta("llama.rope.freq_base") == 10000.0
    assert f.info("token_embd.weight").shape == (512, 64)
    assert f.info("output.weight").shape == (512, 64)
    assert f.info("blk.1.attn_k.weight").shape == (32, 64)  # n_kv_heads * head_dim rows
    assert f.info("blk.1.ffn_down.weight").shape == (64, 128)
    assert f.info("rope_freqs.weight").shape == (8,)
    assert not f.has("blk.0.attn_q.bias")
    factors = llama3_rope_factors(16, 10000.0, **SCALED.rope_scaling)
    np.testing.assert_array_equal(f.vector("rope_freqs.weight"), factors)
    tokens, types = f.meta("tokenizer.ggml.tokens"), f.meta("tokenizer.ggml.token_type")
    assert f.meta("tokenizer.ggml.model") == "llama" and len(tokens) == 512 == len(set(tokens))
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and tokens[258] == "<0xFF>"
    assert types[:4] == [2, 3, 3, 6] and set(types[3:259]) == {6} and set(types[259:]) == {1}
    assert {"▁the", "▁t", "he", "e", "▁"} <= set(tokens)
    scores = f.meta("tokenizer.ggml.scores")[259:]
    assert all(x > y for x, y in zip(scores, scores[1:]))
    assert (f.meta("tokenizer.ggml.bos_token_id"), f.meta("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert f.meta("tokenizer.ggml.add_bos_token") is True


def test_qwen2_layout_and_vocab(tmp_path):
    f = GGUFFile(write_model(tmp_path / "m.gguf", QWEN2, "F32", 0))
    assert f.meta("general.architecture") == "qwen2"
    assert f.meta("qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert f.meta("qwen2.rope.freq_base") == 1000000.0
    assert not f.has("output.weight") and not f.has("rope_freqs.weight")
    assert f.info("blk.0.attn_k.bias").shape == (32,) and f.info("blk.0.attn_q.bias").shape == (64,)
    tokens, types = f.meta("tokenizer.ggml.tokens"), f.meta("tokenizer.ggml.token_type")
    merges = f.meta("tokenizer.ggml.merges")
    assert f.meta("tokenizer.ggml.model") == "gpt2" and f.meta("tokenizer.ggml.pre") == "qwen2"
    assert len(tokens) == 512 == len(set(tokens)) and tokens[0] == "!" and "Ġ" in tokens[:256]
    assert tokens[256:256 + len(merges)] == [m.replace(" ", "") for m in merges]  # each merge result, in rank order
    eos = f.meta("tokenizer.ggml.eos_token_id")
    assert tokens[eos:eos + 3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[eos:eos + 3] == [3] * 3
    assert f.meta("tokenizer.ggml.add_bos_token") is False


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
def test_stored_tensors_are_the_quantised_random_weights(tmp_path, qtype):
    shape = Shape(arch="qwen2")
    weights = random_weights(shape, seed=5)
    assert list(weights) == [s.name for s in tensor_plan(shape)]
    f = GGUFFile(write_model(tmp_path / "m.gguf", shape, qtype, 5))
    assert set(f.tensors) == set(weights)
    for name, w in weights.items():
        assert w.dtype == np.float32 and f.info(name).shape == w.shape
        if w.ndim == 1:
            assert f.info(name).qtype == T.F32
            np.testing.assert_array_equal(f.vector(name), w)
        else:
            stored, expect = f.rows(name, 0, w.shape[0]), quantize(w, T[qtype])
            assert stored.qtype == T[qtype]
            np.testing.assert_array_equal(stored.data, expect.data)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_random_blocks_have_the_float_weights_spread(tmp_path, qtype):
    shape = Shape(dim=128, ffn=256)
    weights = random_weights(shape, 0)
    f = GGUFFile(write_model(tmp_path / "m.gguf", shape, qtype, 0, exact=False))
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output.weight"):
        got = dequantize(f.rows(name, 0, f.info(name).shape[0]))
        assert got.std() == pytest.approx(weights[name].std(), rel=0.1)
        assert abs(got.mean()) < 0.05 * got.std()
    np.testing.assert_array_equal(f.vector("blk.0.ffn_norm.weight"), weights["blk.0.ffn_norm.weight"])


def test_llama3_rope_factors_follow_llama31():
    # head_dim 6, theta 1e4: wavelengths 2*pi * 1e4^(0, 1/3, 2/3) = 6.28, 135.4, 2916.4
    np.testing.assert_array_equal(llama3_rope_factors(6, 10000.0, 8.0, 1.0, 4.0, 2048), [1.0, 1.0, 8.0])
    # original 8192: high-frequency bound 8192/4 = 2048 < 2916.4 < 8192 = low-frequency bound: smoothed,
    # s = (8192 / 2916.396 - 1) / 3 = 0.602982, divisor 1 / ((1 - s) / 8 + s) = 1.532310
    got = llama3_rope_factors(6, 10000.0, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(got, [1.0, 1.0, 1.532310], rtol=1e-6)
    # Llama 3.1 8B (head_dim 128, theta 5e5): 29 untouched, 29 divided by 8, 6 smoothed, rising, in between
    got = llama3_rope_factors(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    assert got.dtype == np.float32 and got.shape == (64,)
    assert (got[:29] == 1).all() and (got[35:] == 8).all()
    assert (np.diff(got[28:36]) > 0).all()
    s = (8192 / (2 * math.pi * 500000.0 ** (58 / 128)) - 1) / 3  # i = 29
    assert got[29] == pytest.approx(1 / ((1 - s) / 8 + s), rel=1e-6)


@pytest.mark.parametrize("golden", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_reference_greedy_equals_transformers(tmp_path, golden):
    case = json.loads(golden.read_text())
    path = write_model(tmp_path / "m.gguf", Shape(**case["shape"]), case["qtype"], case["seed"])
    assert reference.greedy(path, case["prompt"], len(case["tokens"])) == case["tokens"]


def test_golden_cases_exist():
    names = {p.stem for p in GOLDEN}
    assert {"llama_gqa_f32", "llama3_rope_f32", "qwen2_tied_f32", "llama_q8_0", "llama_q4_0"} <= names


def test_tensors_made_ahead_come_in_order_within_the_byte_budget():
    """write_model makes tensors ahead on threads: they come back in order, the ones being made at once never take
    more than the budget (one alone may), and a tensor that fails raises where it is written."""
    import threading
    from spmd import synth
    lock, making, most = threading.Lock(), [0], [0]

    def make(n):
        with lock:
            making[0] += n
            most[0] = max(most[0], making[0])
        threading.Event().wait(0.01)
        with lock:
            making[0] -= n
        if n == 13:
            raise ValueError("tensor 13")
        return n * 10
    sizes = [5, 3, 9, 2, 2, 7, 1, 4]
    assert list(synth._in_order(make, sizes, lambda n: n, budget=10)) == [n * 10 for n in sizes]
    assert 2 <= most[0] <= 10  # made ahead, within the budget
    assert list(synth._in_order(make, [30, 1], lambda n: n, budget=10)) == [300, 10]  # larger than the budget
    with pytest.raises(ValueError, match="tensor 13"):
        list(synth._in_order(make, [1, 13, 2], lambda n: n, budget=10))

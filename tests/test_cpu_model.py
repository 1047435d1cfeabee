"""The cpu backend's numba steps between the matrix products (spmd.backends.cpu_model) against plain numpy written
here: RMSNorm, RoPE (the same bits as spmd.model's), SiLU, and one-token attention on odd head sizes, group sizes
and positions, with each head's bits independent of the other heads a rank holds."""
import hashlib
import warnings

import numpy as np
import pytest
from numba import njit

from spmd.backends import cpu_model
from spmd.model import Rope


def softmax_attention(q, ck, cv, pos, scale):
    """q (heads, hd) at position pos over keys 0..pos of ck, cv (kv, need, hd), in float64 -> (heads * hd,)."""
    heads, hd = q.shape
    group = heads // ck.shape[0]
    out = np.empty((heads, hd))
    for h in range(heads):
        keys, values = ck[h // group, :pos + 1].astype(np.float64), cv[h // group, :pos + 1].astype(np.float64)
        s = keys @ q[h].astype(np.float64) * float(scale)
        p = np.exp(s - s.max())
        out[h] = p @ values / p.sum()
    return out.reshape(-1)


def attend(q, k, v, ck, cv, pos, scale, parts=1):
    """What CpuModel._attend does for a one-token segment, on these arrays (parts > 1: its heads in that many
    ranges on numba's threads; float16 caches: --kv-cache f16)."""
    out = np.empty(q.size, np.float32)
    ck, cv = cpu_model.kernel_view(ck), cpu_model.kernel_view(cv)
    cpu_model._store_token(k, v, ck, cv, pos)
    if parts > 1:
        cpu_model._attend_parallel(q, ck, cv, pos, scale, out, parts)
    else:
        cpu_model._attend_one(q, ck, cv, pos, scale, out)
    return out


@njit
def exps(a):
    cpu_model._exps(a, a.size)
    return a


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_tokens_keys_go_into_the_cache_as_numpy_rounds_them(dtype):
    """`_store_token` writes position pos of every KV head, rounded to float16 as numpy's astype rounds (ties to
    even, subnormals, overflow to inf), and nothing else."""
    rng = np.random.default_rng(1)
    half = np.float32(2.0 ** -11)  # halfway between 1 and the next float16
    special = [1 + half, 1 + 3 * half, 65519.0, 65520.0, 1e6, -1e6, 3e-6, 6e-8, 2e-8, 1e-30, -0.0, np.inf, -np.inf]
    k = np.concatenate([special, rng.standard_normal(64 - len(special)) * 10]).astype(np.float32).reshape(2, 32)
    v = rng.standard_normal((2, 32)).astype(np.float32) * 1e-5
    ck, cv = np.full((2, 5, 32), 7, dtype), np.full((2, 5, 32), 7, dtype)
    cpu_model._store_token(k, v, cpu_model.kernel_view(ck), cpu_model.kernel_view(cv), 3)
    with np.errstate(over="ignore"):
        assert np.array_equal(ck[:, 3], k.astype(dtype)) and np.array_equal(cv[:, 3], v.astype(dtype))
    assert (np.delete(ck, 3, axis=1) == 7).all() and (np.delete(cv, 3, axis=1) == 7).all()
    nan = np.full((2, 32), np.nan, np.float32)
    cpu_model._store_token(nan, nan, cpu_model.kernel_view(ck), cpu_model.kernel_view(cv), 0)
    assert np.isnan(ck[:, 0]).all() and np.isnan(cv[:, 0]).all()


def test_exp_is_within_an_ulp_everywhere_and_the_same_wherever_an_element_is():
    """`_exps` (the attention's and SiLU's exp) against float64 numpy over float32's whole range: within 1.01 units
    in the last place where the result is normal (the worst three inputs a review found, where n changes, among
    them), a subnormal step below; 0 below the range and for -inf, inf above it, NaN for NaN, without a warning; an
    element's result the same at any place in an array of any length (the vectors and the last few alike)."""
    worst = [26.690403, -71.03603, -5.8737726]
    x = np.concatenate([np.linspace(-110, 95, 300_001), worst, [-np.inf, np.inf, np.nan, 0.0, -0.0, 1e-30, -1e-30]])
    x = x.astype(np.float32)
    got = exps(x.copy())
    with np.errstate(over="ignore"):
        ref = np.exp(x.astype(np.float64))
    normal = (ref >= np.finfo(np.float32).tiny) & (ref <= np.finfo(np.float32).max)
    ulps = np.abs(got[normal] - ref[normal]) / np.spacing(ref[normal].astype(np.float32))
    assert ulps.max() <= 1.01, ulps.max()
    small = (ref > 0) & (ref < np.finfo(np.float32).tiny)
    assert np.abs(got[small] - ref[small]).max() <= 2.0 ** -149  # (the smallest subnormal: rounded twice)
    assert (got[ref == 0] == 0).all() and (got[ref > np.finfo(np.float32).max] == np.inf).all()
    assert np.isnan(got[-5]) and got[-7] == 0 and got[-6] == np.inf and (got[-4:] == 1).all()
    rng = np.random.default_rng(0)
    for n in (1, 15, 16, 17, 40):
        at = rng.integers(0, x.size - n)
        assert np.array_equal(exps(x[at:at + n].copy()), got[at:at + n], equal_nan=True)


def test_exp_gives_the_bits_it_gave_on_other_cpus():
    """The same bits on every CPU (the point of an exp of our own: a head's or a row's bits must not depend on the
    rank's host): these 400 006 results hashed to this value on the test machine's AMD EPYC with AVX-512 and
    without it (SPMD_CPU_GENERIC=1), and on an H200 host's Intel Xeon with AVX-512 and with AVX2 only (2026-12-04)."""
    x = np.concatenate([np.linspace(-110, 95, 300_001), [-np.inf, np.inf, np.nan, 0.0, 1e-30]]).astype(np.float32)
    x = np.concatenate([x, (np.random.default_rng(0).standard_normal(100_000) * 30).astype(np.float32)])
    assert hashlib.sha256(exps(x).tobytes()).hexdigest()[:16] == "22ac151bb791dcfb"


@pytest.mark.parametrize("dim", [16, 20, 2048, 4100])
def test_rmsnorm_is_the_references_within_rounding_and_each_row_its_own(dim):
    rng = np.random.default_rng(dim)
    x = (rng.standard_normal((3, dim)) * [[1.0], [1e-3], [30.0]]).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    got = cpu_model._rmsnorm(x, w, np.float32(1e-5), np.empty_like(x))
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
    assert np.array_equal(cpu_model._rmsnorm(x[1:2].copy(), w, np.float32(1e-5), np.empty_like(x[1:2])), got[1:2])


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("hd, rope_dim", [(16, 16), (64, 64), (80, 32)])
def test_rotation_is_the_references_bit_for_bit(neox, hd, rope_dim):
    rng = np.random.default_rng(hd + rope_dim)
    rope = Rope.__new__(Rope)
    angles = np.outer(np.arange(50), rng.uniform(0.01, 1.0, rope_dim // 2))
    rope.cos, rope.sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    rope.dim, rope.neox = rope_dim, neox
    positions = np.array([0, 7, 49])
    x = rng.standard_normal((3, 5, hd)).astype(np.float32)
    expected, got = x.copy(), x.copy()
    rope(expected, rope.at(positions))
    cos, sin = rope.at(positions)
    cpu_model._rotate(got, cos[:, 0], sin[:, 0], neox)
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, x)


def test_silu_is_the_references_and_a_very_negative_gate_gives_zero_quietly():
    rng = np.random.default_rng(3)
    gate = np.concatenate([rng.standard_normal(1000) * 5, [-100.0, -1e30, 100.0, 0.0]]).astype(np.float32)[None]
    up = rng.standard_normal(gate.shape).astype(np.float32)
    with np.errstate(over="ignore"):
        expected = gate.astype(np.float64) / (1 + np.exp(-gate.astype(np.float64))) * up
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cpu_model._silu(gate.copy(), up)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-30)
    assert got[0, -4] == 0.0 and got[0, -3] == 0.0


@pytest.mark.parametrize("hd", [16, 48, 64, 80, 128])
@pytest.mark.parametrize("heads, kv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("pos", [0, 1, 37, 300])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_one_token_attention_is_softmax_attention_and_heads_are_independent(hd, heads, kv, pos, dtype):
    rng = np.random.default_rng(hd * 1000 + heads * 10 + pos)
    need = pos + 3
    ck = rng.standard_normal((kv, need, hd)).astype(dtype)
    cv = rng.standard_normal((kv, need, hd)).astype(dtype)
    q = (rng.standard_normal((heads, hd)) * 2).astype(np.float32)
    k, v = rng.standard_normal((kv, hd)).astype(np.float32), rng.standard_normal((kv, hd)).astype(np.float32)
    scale = np.float32(1 / np.sqrt(hd))
    got = attend(q, k, v, ck, cv, pos, scale)
    # the token's k, v went into the cache (rounded to its type)
    assert np.array_equal(ck[:, pos], k.astype(dtype)) and np.array_equal(cv[:, pos], v.astype(dtype))
    np.testing.assert_allclose(got, softmax_attention(q, ck, cv, pos, scale), rtol=0, atol=2e-6)
    if dtype == np.float16:  # each key and value widened exactly: the float32 kernels' bits on the same values
        wide_k, wide_v = ck.astype(np.float32), cv.astype(np.float32)
        assert np.array_equal(attend(q, wide_k[:, pos], wide_v[:, pos], wide_k, wide_v, pos, scale), got)
    # the last KV head's query heads alone (what a rank holding only that head computes): the same bits
    group = heads // kv
    alone = attend(q[-group:].copy(), k[-1:].copy(), v[-1:].copy(), ck[-1:].copy(), cv[-1:].copy(), pos, scale)
    assert np.array_equal(alone, got[-group * hd:])
    for parts in (2, 3):  # the heads split over threads (long sequences): the same bits
        assert np.array_equal(attend(q, k, v, ck, cv, pos, scale, parts), got)
    h = heads - 1  # one query head alone (no group to share its values' reads with): the same bits
    one = attend(q[h:].copy(), k[-1:].copy(), v[-1:].copy(), ck[-1:].copy(), cv[-1:].copy(), pos, scale)
    assert np.array_equal(one, got[h * hd:])


@pytest.mark.parametrize("hd, heads, kv", [(16, 4, 4), (64, 8, 2), (80, 6, 1)])
@pytest.mark.parametrize("pos, m", [(0, 1), (0, 37), (5, 20)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_prompts_attention_is_each_rows_one_token_attention_to_the_bit(hd, heads, kv, pos, m, dtype):
    """A prompt's rows (CpuModel._attend_rows: `_rows_attend`) at positions pos.. give
    what a one-token step at each row's position gives, bit for bit, on any number of threads: the same text
    whether a prompt comes in one pass or a token at a time."""
    rng = np.random.default_rng(hd + 10 * heads + 100 * pos + m)
    need = pos + m + 2
    ck = rng.standard_normal((kv, need, hd)).astype(dtype)
    cv = rng.standard_normal((kv, need, hd)).astype(dtype)
    q = (rng.standard_normal((m, heads, hd)) * 2).astype(np.float32)
    scale = np.float32(1 / np.sqrt(hd))
    rows = []
    for i in range(m):  # the one-token path, with row i's key and value as the step would store them
        ck1, cv1 = ck.copy(), cv.copy()
        rows.append(attend(q[i], ck[:, pos + i].astype(np.float32), cv[:, pos + i].astype(np.float32), ck1, cv1,
                           pos + i, scale))
    for parts in (1, 2, 3):  # (1: the serial functions CpuModel calls with one thread)
        s = np.empty((m, heads, pos + m), np.float32)
        out = np.empty((m, heads * hd), np.float32)
        ck16, cv16 = cpu_model.kernel_view(ck), cpu_model.kernel_view(cv)
        if parts == 1:
            cpu_model._rows_attend(q, ck16, cv16, pos, scale, s, out)
        else:
            cpu_model._rows_attend_parallel(q, ck16, cv16, pos, scale, s, out, parts)
        assert np.array_equal(out, np.array(rows))
    for i in range(m):
        np.testing.assert_allclose(out[i], softmax_attention(q[i], ck, cv, pos + i, scale), rtol=0, atol=2e-6)


# ---- a decode step's half in one call (CpuModel._half) ------------------------------------------------------------
@pytest.mark.parametrize("arch, qtype, activations, kv_cache", [
    ("llama", "Q4_0", "f32", "f32"), ("llama", "Q4_0", "int8", "f16"),
    ("llama", "Q4_K_M", "int8", "f32"),  # q and k Q4_K, v Q6_K in some layers: two groups of products
    ("qwen2", "Q8_0", "f32", "f16"),  # q, k, v biases
    ("qwen3", "Q4_K_M", "f32", "f32"),  # each head's RMSNorm of q and k
    ("llama", "F16", "int8", "f32"),  # a float wo and w2 with exact partial sums: Model's way
])
def test_a_decode_steps_halves_in_one_call_give_the_bits_of_the_calls_one_by_one(
        arch, qtype, activations, kv_cache, tmp_path, monkeypatch):
    """With one token a pass, CpuModel runs each half of a layer as one compiled call (`_attention_step`,
    `_ffn_step`); its logits equal those of Model's calls one at a time (CpuModel._half switched off) bit for bit,
    across the position from which a token's attention splits its heads over two threads, and every half that can
    takes it (F16 matrices with int8's exact partial sums cannot: Model's way for all)."""
    from spmd.backends.cpu import CpuBackend
    from spmd.config import read_config
    from spmd.gguf_file import GGUFFile
    from spmd.model import Model, Segment
    from spmd.plan import make_plan, parse_layout
    from spmd.synth import Shape, write_model
    from spmd.weights import load_shard
    shape = Shape(arch=arch, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn=512, vocab=300, context=192,
                  key_length=64 if arch == "qwen3" else None)
    f = GGUFFile(str(write_model(tmp_path / "m.gguf", shape, qtype, 5)))
    cfg = read_config(f)
    share = make_plan(parse_layout(None, 1), cfg)[0]
    backend = CpuBackend(2, activations=activations)
    model = backend.make_model(cfg, load_shard(f, cfg, share, backend, notice=lambda _m: None), share, 192,
                               kv_cache=kv_cache)
    first = cpu_model.PARALLEL_SCORES // share.n_heads - 1  # the first position whose attention splits the heads
    prompt = np.arange(3, first - 1)

    def logits():
        model.open(0, 192)
        model.forward(model.embed(prompt), [Segment(0, 0, len(prompt))], None, head=True)
        return [model.forward(model.embed(np.array([7 + i])), [Segment(0, len(prompt) + i, 1)], None, head=True)
                for i in range(4)]  # positions first - 2 .. first + 1

    one_call = logits()
    steps = list(model._one_call.values())
    assert len(steps) == 2 * cfg.n_layers
    assert all(step is None for step in steps) if qtype == "F16" else all(step is not None for step in steps)
    monkeypatch.setattr(cpu_model.CpuModel, "_half", Model._half)
    for got, want in zip(one_call, logits()):
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_a_closed_model_goes_without_a_garbage_collection(tmp_path):
    """A migration closes the model it replaces: its memory must go when the last reference does, not at Python's
    next full collection (a cycle through the halves' one-call functions kept every replaced model, so a rank grew by
    its weights with each move)."""
    import gc
    import weakref

    from spmd.backends.cpu import CpuBackend
    from spmd.config import read_config
    from spmd.gguf_file import GGUFFile
    from spmd.model import Segment
    from spmd.plan import make_plan, parse_layout
    from spmd.synth import Shape, write_model
    from spmd.weights import load_shard
    f = GGUFFile(str(write_model(tmp_path / "m.gguf", Shape(dim=64, n_layers=2, ffn=128, vocab=300), "Q8_0", 5)))
    cfg = read_config(f)
    share = make_plan(parse_layout(None, 1), cfg)[0]
    backend = CpuBackend(1)
    model = backend.make_model(cfg, load_shard(f, cfg, share, backend, notice=lambda _m: None), share, 16)
    model.open(0, 16)
    model.forward(model.embed(np.array([3])), [Segment(0, 0, 1)], None, head=True)
    assert any(step is not None for step in model._one_call.values())  # (the one-call halves ran)
    gone = weakref.ref(model)
    gc.disable()
    try:
        model.close()
        del model
        assert gone() is None
    finally:
        gc.enable()

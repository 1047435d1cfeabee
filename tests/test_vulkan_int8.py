"""--activations int8 on the Vulkan backend: every product of a quantised matrix reads its input rounded to 8 bits a
32-element block as the cpu backend rounds it (kernels/quantize.glsl); decode products sum 8-bit integer products
(matvec_*_i8), and so do Q4_0, Q8_0, Q4_1 and Q4_K prompt products on 8-bit matrix units (coopmat_*_i8); the other
prompt products read the rounded floats; a one-token
decode rounds each product's result inside that product (flag QUANTIZE) instead of in a pass of its own.

The products are held to tests/test_backends.int8_reference (the transcription of what the cpu backend computes)
within float32 summation (1e-5 of sum |x||w|, as in tests/test_vulkan.py) plus the reference's own cuts to 2^-28;
the rounding itself to the bit."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from spmd.backends import cpu, get_backend, vulkan, vulkan_model
from spmd.backends.vk_runtime import Buffer, Recording
from spmd.config import read_config
from spmd.errors import UserError
from spmd.gguf_file import GGUFFile
from spmd.model import Segment
from spmd.quants import dequantize
from spmd.weights import load_shard
from test_backends import INT8_TYPES, activations, int8_lane, int8_reference, random_qtensor
from test_vulkan import PROMPT, BACKEND, NumpyBackend, _whole, models, tolerance  # noqa: F401 (models: a fixture)


def _backend8():
    if isinstance(BACKEND, str):
        return BACKEND
    try:
        return get_backend("vulkan", activations="int8")
    except UserError as e:
        return str(e)


BACKEND8 = _backend8()
needs_int8 = pytest.mark.skipif(isinstance(BACKEND8, str), reason=f"no Vulkan int8: {BACKEND8}")


def rounded(x):
    """The cpu backend's 8-bit activations, transcribed: (q (n, cols) int, d (n, cols / 32) float32)."""
    f32 = np.float32
    xb = x.reshape(x.shape[0], -1, 32)
    d = (np.abs(xb).max(axis=2) / f32(127)).astype(f32)
    with np.errstate(divide="ignore"):
        inverse = np.where(d > 0, f32(1) / d, f32(0)).astype(f32)
    return np.rint(xb * inverse[..., None]).reshape(x.shape).astype(np.int64), d


def read(buf, dtype, shape):
    return BACKEND8.dev.read(buf, 0, int(np.prod(shape)) * np.dtype(dtype).itemsize).view(dtype).reshape(shape)


def quantized(into, n, cols):
    """What an Int8Input holds for n rows of cols: (q, d, the sum of q per block, the rounded floats)."""
    q = read(into.q, np.int8, (n, cols)).astype(np.int64)
    dd = read(into.d, np.float32, (n, cols // 32, 2))
    return q, dd[..., 0], dd[..., 1], read(into.rounded, np.float32, (n, cols))


def _bound(w, x):
    """The transcription's tolerance: float32 summation plus its own cuts to 2^-FIXED."""
    cuts = w.cols / int8_lane(w.qtype) * 2.0 ** -cpu.FIXED
    return 1e-5 * (np.abs(x) @ np.abs(dequantize(w)).T.astype(np.float64)) + cuts


@needs_int8
@pytest.mark.parametrize("n, matvec_rows", [(1, 1), (3, 8), (13, 8)], ids=["one", "matvec-3", "prompt-13"])
@pytest.mark.parametrize("shape", ((37, 96), (300, 544), (20, 4160)), ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("qtype", INT8_TYPES + (T.IQ4_NL, T.F16), ids=lambda t: t.name)
def test_products_are_the_transcription(qtype, shape, n, matvec_rows, monkeypatch):
    """Each quantised type against the transcription (F16 keeps float activations, as on the cpu backend; IQ4_NL's
    table values are the integers, as the cpu backend's 8-bit kernels look them up), through the 8-bit kernels where the
    matrix-vector kernel runs."""
    monkeypatch.setattr(BACKEND8, "matvec_rows", matvec_rows)
    rng = np.random.default_rng(21)
    w = random_qtensor(qtype, *shape, rng)
    x = activations(n, w.cols, rng)
    got = BACKEND8.linear(w)(x)
    if qtype == T.F16:
        assert np.all(np.abs(got - NumpyBackend().linear(w)(x)) <= tolerance(w, x))
        return
    assert np.all(np.abs(got - int8_reference(w, x)) <= _bound(w, x))
    kernels = {key[0] for key in BACKEND8.dev._pipelines}
    if n <= matvec_rows:
        assert f"matvec_{vulkan.kind(qtype)}_i8" in kernels


needs_matrix_units8 = pytest.mark.skipif(isinstance(BACKEND8, str) or not BACKEND8.dev.coop_int8,
                                         reason="the device has no 8-bit matrix units (coopmat_*_i8)")


@needs_int8
@needs_matrix_units8
@pytest.mark.parametrize("units", ["int8", "fp16"])
@pytest.mark.parametrize("tokens,few", [(16, 0), (32, 0), (64, 0), (64, 10 ** 6)])
@pytest.mark.parametrize("qtype", INT8_TYPES + (T.IQ4_NL,), ids=lambda t: t.name)
def test_matrix_unit_products_are_the_transcription(qtype, tokens, few, units, monkeypatch):
    """The prompt's 8-bit products on the matrix units against the transcription, with tiles of each token count,
    either split of a 64-token tile among the subgroups, and a partial tile of rows and of tokens; and where a
    device's matrix units lacked 8-bit products (units fp16), the fp16 kernels on the rounded floats."""
    monkeypatch.setattr(BACKEND8, "coop_tokens", tokens)
    monkeypatch.setattr(vulkan, "COOP_FEW", few)
    monkeypatch.setattr(BACKEND8.dev, "coop_int8", units == "int8")
    rng = np.random.default_rng(22)
    w = random_qtensor(qtype, 130, 544, rng)
    x = activations(tokens + 7, w.cols, rng)
    lin = BACKEND8.linear(w)
    assert np.all(np.abs(lin(x) - int8_reference(w, x)) <= _bound(w, x))
    split = 2 if tokens == 64 and few else 1
    kernel = f"coopmat_{lin.type}_{'i8' if units == 'int8' else 'f32'}"
    assert any(key[0] == kernel and key[3][3:] == (tokens, split) for key in BACKEND8.dev._pipelines)
    lin.free()


@needs_int8
@needs_matrix_units8
@pytest.mark.parametrize("tokens", [16, 32, 64])
@pytest.mark.parametrize("qtype", (T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q3_K, T.IQ4_NL), ids=lambda t: t.name)
def test_matrix_unit_gate_and_up_are_the_transcription(qtype, tokens, monkeypatch):
    """Gate and up in one 8-bit pass on the matrix units (two blocks a step where the subgroups hold 16 tokens each,
    with tiles of 16 and 32 tokens; four with 64, 32 x 32 a subgroup), with SiLU-multiply, against silu(gate) * up
    of the transcription."""
    monkeypatch.setattr(BACKEND8, "coop_tokens", tokens)
    rng = np.random.default_rng(23)
    n, w1, w3 = tokens + 5, random_qtensor(qtype, 70, 288, rng), random_qtensor(qtype, 70, 288, rng)
    lin1, lin3, dev = BACKEND8.linear(w1), BACKEND8.linear(w3), BACKEND8.dev
    x = activations(n, w1.cols, rng)
    xb, yb = Buffer(dev, x.nbytes), Buffer(dev, n * w1.rows * 4)
    xb.write(x)
    into = BACKEND8.int8_input(n, w1.cols)
    rec = Recording(dev)
    BACKEND8.quantize(rec, xb, w1.cols, n, into)
    lin1.dispatch(rec, xb, w1.cols, 0, yb, w1.rows, 0, n, pair=lin3, int8=into)
    rec.barrier(to_host=True)
    rec.end()
    rec.run()
    got = read(yb, np.float32, (n, w1.rows))
    rec.free()
    for buf in (xb, yb, into.rounded, into.q, into.d):
        buf.free()
    lin1.free()
    lin3.free()
    gate, up = int8_reference(w1, x), int8_reference(w3, x)
    with np.errstate(over="ignore"):
        expect = gate / (1 + np.exp(-gate)) * up
    tol = _bound(w1, x) * (1 + np.abs(up)) + _bound(w3, x) * np.abs(gate / (1 + np.exp(-gate))) + 1e-6 * np.abs(expect)
    assert np.all(np.abs(got - expect) <= tol)
    assert any(key[0] == f"coopmat_{lin1.type}_i8" and key[3][1] == 1 for key in dev._pipelines)


@needs_int8
@pytest.mark.parametrize("skew", [0, -7, 7])
def test_the_rounding_is_the_cpus_to_the_bit(skew, monkeypatch):
    """kernels/quantize_f32 against the transcription: the integers, d, their sum and the rounded floats, on
    blocks of every scale (one all zero, one 1e4 times larger, tiny ones); a block with a NaN, an infinity or a
    value over 2^22 gets d = NaN, and the others keep theirs. skew: the divisions' float estimates made that many
    units off (ESTIMATE_SKEW), as a GPU's inexact division would leave them: the integer correction brings them
    back (on lavapipe, whose division is exact, it would otherwise never run)."""
    pipeline = BACKEND8.dev.pipeline
    monkeypatch.setattr(BACKEND8.dev, "pipeline", lambda kernel, *args: pipeline(
        kernel, *args[:2], args[2] + (0,) * (5 - len(args[2])) + (skew % 2**32,)) if kernel == "quantize_f32"
        else pipeline(kernel, *args))
    rng = np.random.default_rng(22)
    n, cols = 64, 1024
    x = (activations(n, cols, rng) * 10.0 ** rng.uniform(-20, 2, (n, cols // 32)).repeat(32, axis=1)).astype(np.float32)
    x[2, 64:96] = 3.0  # one value a block
    # a largest value whose 1 / d lies just past a midpoint of two floats (1024.0001, not 1024: a float64 Newton step
    # rounded it the wrong way), and an x that then rounds to 101, not 100
    x[1, :32] = rng.uniform(-0.09, 0.09, 32)
    x[1, 0], x[1, 1] = np.float32(127 * 2.0 ** -10 * (1 - 2.0 ** -24)), np.float32(100.5 / 1024)
    bad = {(3, 100): np.nan, (3, 300): np.inf, (4, 900): 5e6}
    for (i, j), v in bad.items():
        x[i, j] = v
    xb, into = Buffer(BACKEND8.dev, x.nbytes), BACKEND8.int8_input(n, cols)
    xb.write(x)
    rec = Recording(BACKEND8.dev)
    BACKEND8.quantize(rec, xb, cols, n, into)
    rec.barrier(to_host=True)
    rec.end()
    rec.run()
    q, d, qsum, floats = quantized(into, n, cols)
    want_q, want_d = rounded(np.where(np.isfinite(x), x, 0.0).astype(np.float32))
    assert want_q[1, 1] == 101
    broken = ~(np.abs(x) <= 2.0 ** 22).reshape(n, -1, 32).all(axis=2)  # (NaN compares false)
    assert broken.sum() == len(bad)
    assert np.isnan(d[broken]).all() and not np.isnan(d[~broken]).any()
    good = np.repeat(~broken, 32, axis=1)
    np.testing.assert_array_equal(q[good], want_q[good])
    np.testing.assert_array_equal(d[~broken], want_d[~broken])
    sums = want_q.reshape(n, -1, 32).sum(axis=2)
    np.testing.assert_array_equal(qsum[~broken], sums[~broken])
    np.testing.assert_array_equal(floats[good], (want_q * np.repeat(want_d, 32, axis=1)).astype(np.float32)[good])
    for b in (xb, into.rounded, into.q, into.d):
        b.free()
    rec.free()


@needs_int8
@pytest.mark.parametrize("rows", [96, 100], ids=["whole-blocks", "a-part-block"])
@pytest.mark.parametrize("kind", ["produce", "pair", "bad"])
def test_a_product_rounds_what_it_finishes_as_the_rounding_pass_does(kind, rows):
    """Flag QUANTIZE: the workgroup that finishes a 32-row block last rounds it; the result is quantize_f32's of
    what the product wrote (xg where it produces, y for gate and up) to the bit, also the second time the same
    recording runs (the counts went back to 0). bad: y += the product over a y holding a NaN (sign bit set) in the
    first block and a value under -2^22 in the second, whose scales are then NaN, as the pass makes them."""
    rng = np.random.default_rng(23)
    cols = 256
    w = random_qtensor(T.Q8_0, rows, cols, rng)
    lin = BACKEND8.linear(w)
    pair = BACKEND8.linear(random_qtensor(T.Q8_0, rows, cols, rng)) if kind == "pair" else None
    dev, width = BACKEND8.dev, vulkan.pad(rows)
    x, y, xg = Buffer(dev, cols * 4), Buffer(dev, width * 4), Buffer(dev, width * 4)
    ss, g, counts = Buffer(dev, 4 * width), Buffer(dev, width * 4), Buffer(dev, width)
    fused, again = BACKEND8.int8_input(1, width), BACKEND8.int8_input(1, width)
    dev.zero([y, xg, ss, counts, fused.rounded, fused.q, fused.d])
    g.write(rng.standard_normal(width).astype(np.float32))
    for trial in range(2):
        x.write(rng.standard_normal(cols).astype(np.float32))
        if kind == "bad":
            bad = np.zeros(width, np.float32)
            bad[[3, 40]] = np.uint32(0xFFC00000).view(np.float32), -5e6  # a NaN with the sign bit, -(over 2^22)
            y.write(bad)
        rec = Recording(dev)
        produce = (ss, g, xg) if kind == "produce" else None
        lin.dispatch(rec, x, cols, 0, y, width, 0, 1, pair=pair, produce=produce, quantize=(fused, counts),
                     accum=kind == "bad")
        rec.barrier()
        BACKEND8.quantize(rec, xg if kind == "produce" else y, width, 1, again)
        rec.barrier(to_host=True)
        rec.end()
        rec.run()
        rec.free()
        for a, b in zip(quantized(fused, 1, width), quantized(again, 1, width)):
            np.testing.assert_array_equal(a, b)
        assert not read(counts, np.uint32, (width // 32,)).any()
        assert np.nanmax(np.abs(quantized(fused, 1, width)[3])) > 0
        scales = quantized(fused, 1, width)[1][0]
        assert np.isnan(scales[:2]).all() == (kind == "bad") and not np.isnan(scales[2:]).any()
    for b in (x, y, xg, ss, g, counts, fused.rounded, fused.q, fused.d, again.rounded, again.q, again.d):
        b.free()
    lin.free()


def _int8_model(path, name):
    """The whole model of `path` on the vulkan or cpu backend with int8 activations, slot 0 open."""
    f = GGUFFile(path)
    cfg = read_config(f)
    share = _whole(cfg)
    backend = BACKEND8 if name == "vulkan" else get_backend("cpu", threads=1, activations="int8")
    model = backend.make_model(cfg, load_shard(f, cfg, share, backend), share, 64)
    model.open(0, 64)
    return model


def _logits(model, tokens, pos):
    return model.forward(model.embed(np.array(tokens)), [Segment(0, pos, len(tokens))], None, head=True)[0]


@needs_int8
@pytest.mark.parametrize("case", ["Q8_0", "Q4_0", "Q4_K_M", "Q3_K_M", "q2_k"])
def test_logits_follow_the_cpu_backends_with_int8(models, case):  # noqa: F811 (the fixture)
    """The test models' logits (q2_k: llama.cpp's file, tests/kquant, whose Q2_K matrices take float activations on
    both backends) against the cpu backend's --activations int8: prompts of 1 to 13 tokens in one pass,
    then 8 decode steps after the first 8 (the rounding inside the products). Two engines' activations that differ
    in their last bit (float32 sums in another order) can round to integers one apart, which moves the logits by
    about as much as int8 activations move them from float32 ones (0.05-0.1 here), and that pass's later ones with
    it: so most passes, not all, must agree to float32 summation (on lavapipe 21, 19 and 17 of 21), and every one
    to within int8's own noise."""
    path = models[case] if case in models else Path(__file__).parent / "kquant" / f"{case}.gguf"
    cpu8, dev8 = _int8_model(path, "cpu"), _int8_model(path, "vulkan")
    diffs = [np.abs(_logits(dev8, PROMPT[:n], 0) - _logits(cpu8, PROMPT[:n], 0)).max() for n in range(1, 14)]
    token, pos = int(np.argmax(_logits(cpu8, PROMPT[:8], 0))), 8
    _logits(dev8, PROMPT[:8], 0)
    for _ in range(8):
        want = _logits(cpu8, [token], pos)
        diffs.append(np.abs(_logits(dev8, [token], pos) - want).max())
        token, pos = int(np.argmax(want)), pos + 1
    assert sum(d <= 1e-4 for d in diffs) >= 2 * len(diffs) // 3, diffs
    assert max(diffs) < 0.5, diffs
    assert dev8._decode and all(acts.int8_norm is not None for acts, _ in dev8._decode.values())  # fused
    dev8.close()


def test_a_device_without_integer_dot_products_refuses_int8(monkeypatch):
    if isinstance(BACKEND, str):
        pytest.skip(BACKEND)
    monkeypatch.setattr(BACKEND.dev, "int_dot", False)
    with pytest.raises(UserError, match="--activations int8: the Vulkan device .* lacks 8-bit integer dot products"):
        get_backend("vulkan", activations="int8")


def _huge_first_heads(path, folder):
    """A copy of the qwen3 test model (Q8_0; 4 query heads of 64, 2 KV heads) whose first layer's KV head 0 has the
    largest values a Q8_0 block holds (127 x 65504 a weight), so that its two query heads' outputs pass 2^22 while
    q, k and v's inputs do not, and whose wo reads those heads' columns with scale 0: where the rounding gives their
    blocks a NaN scale, as the pass does, every logit is NaN; a finite scale would leave them finite."""
    path = shutil.copy(path, folder / "huge.gguf")
    f = GGUFFile(path)
    v, wo = f.info("blk.0.attn_v.weight"), f.info("blk.0.attn_output.weight")
    assert v.qtype == wo.qtype == T.Q8_0 and v.shape == (128, 128) and wo.shape == (128, 256)
    blocks = np.memmap(path, np.uint8, "r+", offset=v.offset, shape=(128, 4, 34))
    blocks[:64, :, :2] = np.array([65504], np.float16).view(np.uint8)
    blocks[:64, :, 2:] = 127
    blocks.flush()
    blocks = np.memmap(path, np.uint8, "r+", offset=wo.offset, shape=(128, 8, 34))
    blocks[:, :4, :2] = 0  # (columns 0..127: query heads 0 and 1)
    blocks.flush()
    del blocks
    return path


@needs_int8
@pytest.mark.parametrize("case", ["Q4_0", "qwen3", "Q4_K_M", "qwen3-huge"])
@pytest.mark.parametrize("split", [False, True], ids=["one-dispatch", "in-splits"])
def test_the_attention_rounds_its_output_as_the_rounding_pass_does(models, split, case, monkeypatch,  # noqa: F811
                                                                   tmp_path):
    """A fused int8 decode: the attention kernel rounds each head's output for wo (`round_head`, in mode 0, or in
    mode 4 where the keys go in splits) instead of a rounding pass after it. The logits of 8 decode steps are those
    of the same model with the pass, to the bit, and the pass runs once a layer less a step. Heads of one block
    (Q4_0: 32 wide) and of two (qwen3, Q4_K_M: 64), read by the 8-bit kernels (Q4_0, qwen3's Q8_0, Q4_K_M's Q4_K) as
    integers and scales, or (Q4_K_M's Q6_K) as the rounded floats; and heads whose outputs pass 2^22
    (`_huge_first_heads`, 16 decode steps from position 0: NaN both ways; a bad block not caught fails it)."""
    path = _huge_first_heads(models["qwen3"], tmp_path) if case == "qwen3-huge" else models[case]
    if split:  # splits of 4 keys from position 10 on
        monkeypatch.setattr(BACKEND8, "split_keys", 4)
        monkeypatch.setattr(vulkan_model, "SPLIT_FROM", 10)
    passes, quantize = [], BACKEND8.quantize
    monkeypatch.setattr(BACKEND8, "quantize", lambda *args: passes.append(1) or quantize(*args))
    runs = []
    for attention_rounds in (True, False):
        model = _int8_model(path, "vulkan")
        if not attention_rounds:
            model._attention_rounds = lambda a, lw: None
        huge = case == "qwen3-huge"  # (a prompt pass would round its NaN into the caches before any decode step)
        token, logits = 1, [] if huge else [_logits(model, PROMPT[:8], 0)]
        before = len(passes)
        for pos in range(0 if huge else 8, 16):
            logits.append(_logits(model, [token], pos))
            token = int(np.argmax(logits[-1]))
        recorded = [acts.split for acts, _ in model._decode.values()]
        runs.append((logits, len(passes) - before))
        model.close()
    assert split in recorded
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(a, b)
    assert np.isnan(runs[0][0][-1]).all() == (case == "qwen3-huge")
    layers = read_config(GGUFFile(path)).n_layers
    assert runs[1][1] - runs[0][1] == layers * len(recorded), (runs[0][1], runs[1][1], recorded)


@needs_int8
def test_a_model_of_float_matrices_rounds_nothing(models, monkeypatch):  # noqa: F811 (the fixture)
    """F16 matrices read float activations: with --activations int8 such a model records no rounding (no pass, no
    rounding inside the products) and gives the float backend's logits, to the bit."""
    passes, quantize = [], BACKEND8.quantize
    monkeypatch.setattr(BACKEND8, "quantize", lambda *args: passes.append(1) or quantize(*args))
    f = GGUFFile(models["F16"])
    cfg = read_config(f)
    share = _whole(cfg)
    runs = []
    for backend in (BACKEND8, BACKEND):
        model = backend.make_model(cfg, load_shard(f, cfg, share, backend), share, 64)
        model.open(0, 64)
        logits, token = [_logits(model, PROMPT[:8], 0)], 1
        for pos in range(8, 12):
            logits.append(_logits(model, [token], pos))
            token = int(np.argmax(logits[-1]))
        runs.append(logits)
        assert all(acts.int8 is None and acts.int8_norm is None for acts, _ in model._decode.values())
        model.close()
    assert not passes
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)

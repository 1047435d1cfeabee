"""The Vulkan backend: compiled kernels up to date with their sources, each kernel against the numpy reference, the
model on the device against spmd.model.Model and tests/reference.py (batched prefill with the rmsnorm kernel, decode
with RMSNorm fused into the products, one command buffer per half-layer with an allreduce, pipeline stages handing
the hidden state on), several sequences in one pass (prompts and decode tokens of different slots stacked), the KV
cache taken and put back per slot, and the one-line errors.

Tolerances: a product is within 1e-5 * sum_k |x_k| |w_k| of the reference (float32 summation in another order;
quantised weights are dequantised exactly, activations stay float32); logits within 1e-4 absolute of the float64
reference, as the cpu backend's are. Runs on any Vulkan device; CI uses Mesa's lavapipe on the CPU."""
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mpi4py import MPI

import reference
from spmd.backends import get_backend, vulkan, vulkan_model
from spmd.backends.numpy_ref import NumpyBackend
from spmd.comm import Comm
from spmd.engine import Engine, RunOptions
from spmd.executor import Executor
from spmd.errors import UserError
from spmd.gguf_file import GGUFFile
from spmd.model import Model, Segment
from spmd.plan import make_plan, parse_layout
from spmd.prompts import PromptSpec
from spmd.synth import Shape, write_model
from spmd.weights import load_shard
from test_backends import activations, random_qtensor

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
         T.IQ4_NL)
NAMES = [t.name for t in TYPES]
PROMPT = (1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100)
LLAMA = Shape(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn=256, vocab=512, context=64)  # GQA
QWEN2 = Shape(arch="qwen2", dim=128, n_layers=2, n_heads=4, n_kv_heads=1, ffn=256, vocab=512, context=64)
# per-head q/k norms, heads of 64: q is 256 wide where dim is 128
QWEN3 = Shape(arch="qwen3", dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn=256, vocab=512, context=64, key_length=64)
K_LLAMA = Shape(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn=512, vocab=512, context=64)  # rows of 256


def _backend():
    try:
        return get_backend("vulkan")
    except UserError as e:  # no loader or no device: say which
        return str(e)


BACKEND = _backend()
needs_device = pytest.mark.skipif(isinstance(BACKEND, str), reason=f"no Vulkan: {BACKEND}")


def tolerance(w, x):
    aw = np.abs(NumpyBackend().linear(w).w).astype(np.float64)
    return 1e-5 * (np.abs(x) @ aw.T) + 1e-30


# ---- the compiled kernels -------------------------------------------------------------------------------------
def source_hash(comp: Path) -> str:
    """What scripts/build_kernels.sh writes to kernels/MANIFEST for comp's .spv."""
    includes = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(KERNELS.glob("*.glsl"),
                                                                      key=lambda p: p.name.encode()))).hexdigest()
    own = hashlib.sha256(comp.read_bytes()).hexdigest()
    return hashlib.sha256(f"{own}\n{includes}\n".encode()).hexdigest()


def test_every_spv_is_built_from_its_current_source():
    manifest = dict(line.split() for line in (KERNELS / "MANIFEST").read_text().splitlines())
    sources = sorted(KERNELS.glob("*.comp"))
    assert {c.with_suffix(".spv").name for c in sources} == set(manifest), "bash scripts/build_kernels.sh"
    for comp in sources:
        assert comp.with_suffix(".spv").exists(), f"{comp.name} has no .spv: bash scripts/build_kernels.sh"
        assert manifest[comp.with_suffix(".spv").name] == source_hash(comp), \
            f"{comp.with_suffix('.spv').name} is older than its source: bash scripts/build_kernels.sh"


def test_no_spv_is_older_than_its_source_by_mtime():
    """Meaningful only where the files were not all written at once (a fresh clone or copy stamps them together)."""
    files = list(KERNELS.glob("*.comp")) + list(KERNELS.glob("*.glsl")) + list(KERNELS.glob("*.spv"))
    times = [f.stat().st_mtime for f in files]
    if max(times) - min(times) < 60:
        pytest.skip("kernel files all written within a minute of each other (a checkout): mtimes say nothing")
    newest_include = max(f.stat().st_mtime for f in KERNELS.glob("*.glsl"))
    for comp in KERNELS.glob("*.comp"):
        spv = comp.with_suffix(".spv")
        assert spv.stat().st_mtime + 2 >= max(comp.stat().st_mtime, newest_include), \
            f"{spv.name} is older than its sources: bash scripts/build_kernels.sh"


# ---- kernels against the reference ----------------------------------------------------------------------------
SHAPES = ((1, 32), (37, 96), (300, 544), (5, 4160), (0, 64))  # one block; odd rows; cols % 128; long; none


@needs_device
@pytest.mark.parametrize("n, matvec_rows", [(1, 1), (11, 1), (3, 8), (11, 16)],
                         ids=["matvec", "matmul", "matvec-3-rows", "matvec-11-rows"])  # matmul: a tile of 8 and a part
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("qtype", TYPES, ids=NAMES)
def test_product_matches_reference(qtype, shape, n, matvec_rows, monkeypatch):
    """Decode's matrix-vector kernel (one token, or a workgroup row per token for a few: several sequences on a
    GPU) and the prompt's 8-token tiles."""
    monkeypatch.setattr(BACKEND, "matvec_rows", matvec_rows)
    rng = np.random.default_rng(1)
    w = random_qtensor(qtype, *shape, rng)  # K-quants: columns rounded up to whole super-blocks
    x = activations(n, w.cols, rng)
    lin = BACKEND.linear(w)
    assert (lin.rows, lin.cols) == (w.rows, w.cols) and lin.nbytes >= w.nbytes - 2 * w.rows * w.cols // 32
    got = lin(x)
    assert got.shape == (n, w.rows) and got.dtype == np.float32
    assert np.all(np.abs(got - NumpyBackend().linear(w)(x)) <= tolerance(w, x))
    out = np.full((n, w.rows), np.nan, np.float32)
    assert lin(x, out=out) is out and np.array_equal(out, got)
    lin.free()


@needs_device
def test_columns_not_a_multiple_of_32_and_no_columns():
    rng = np.random.default_rng(2)
    w = random_qtensor(T.F32, 9, 48, rng)  # a column slice through quant blocks, dequantised to F32
    x = activations(3, 48, rng)
    np.testing.assert_allclose(BACKEND.linear(w)(x), NumpyBackend().linear(w)(x), rtol=1e-5, atol=1e-5)
    from spmd.quants import QTensor
    empty = BACKEND.linear(QTensor(T.Q8_0, 3, 0, np.zeros((3, 0), np.uint8)))
    assert not empty(np.zeros((2, 0), np.float32)).any()


@needs_device
@pytest.mark.parametrize("qtype", (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K), ids=lambda t: t.name)
def test_slices_that_cut_super_blocks_stay_quantised(qtype):
    """A rank's columns that cut K-quant super-blocks (QTensor.keep, at 32-element blocks) keep their own blocks
    on the device, repacked like the rest; a cut through a 32-element block is what the backend lacks."""
    from spmd.quants import QTensor
    rng = np.random.default_rng(5)
    w = random_qtensor(qtype, 9, 768, rng)
    for keep in (((64, 128),), ((0, 64), (448, 512), (544, 768))):
        part = QTensor(qtype, w.rows, w.cols, w.data, keep)
        assert BACKEND.lacks(part) is None
        x = activations(3, part.width, rng)
        lin = BACKEND.linear(part)
        assert lin.nbytes <= 8 / 32 * 4 * part.rows * part.width  # 8 bits a weight at most: not widened to F32
        if qtype in (T.Q2_K, T.Q3_K):  # a 32-element block in one 16-byte word: 4 bits a weight
            assert lin.nbytes == part.rows * part.width // 2
        assert np.all(np.abs(lin(x) - NumpyBackend().linear(part)(x)) <= tolerance(part, x))
        lin.free()
    q8 = random_qtensor(T.Q8_0, 2, 64, rng)
    assert "cut through" in BACKEND.lacks(QTensor(T.Q8_0, 2, 64, q8.data, ((16, 48),)))


@needs_device
@pytest.mark.parametrize("qtype, names, words", [(T.Q4_K, ("q4k", "q4m"), 2), (T.Q5_K, ("q5k", "q5m"), 3)],
                         ids=lambda v: v.name if isinstance(v, T) else "")
def test_a_whole_k_quant_matrix_is_held_near_its_files_bytes_and_computes_as_its_cut_slices(qtype, names, words):
    """Q4_K and Q5_K kept whole (q4k, q5k) hold the file's super-block bytes but for 4 (the file's 12 bytes of 6-bit
    scales and mins held as 16): Q4_K 148 a 256-element super-block for 144 (nibbles, d and dmin, scales and mins),
    Q5_K 180 for 176 (and 32 bytes of fifth bits). Their products equal, bit for bit, those of the same matrix held
    as a slice of all its columns (q4m, q5m: float32 words a block, the scale, the min, and Q5_K's fifth bits)."""
    from gguf import GGML_QUANT_SIZES

    from spmd.quants import QTensor
    rng = np.random.default_rng(6)
    w = random_qtensor(qtype, 37, 768, rng)
    whole, cut = BACKEND.linear(w), BACKEND.linear(QTensor(qtype, w.rows, w.cols, w.data, ((0, w.cols),)))
    assert (whole.type, cut.type) == names
    file_bytes = GGML_QUANT_SIZES[qtype][1]  # a super-block's
    assert whole.nbytes == 37 * 768 // 256 * (file_bytes + 4) == BACKEND.held_bytes(qtype, 37, 768)
    assert cut.nbytes == 37 * 768 // 32 * (16 + 4 * words)  # nibbles, and the words of a block
    for n in (1, 11):  # decode's and a prompt's kernels
        x = activations(n, w.cols, rng)
        assert np.array_equal(whole(x), cut(x))
    whole.free()
    cut.free()


@needs_device
@pytest.mark.parametrize("qtype", (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K), ids=lambda t: t.name)
def test_k_quant_scales_below_float16s_normal_range_are_widened_exactly(qtype):
    """Every super-block's d (and dmin) below float16's smallest normal number (6.1e-5, as in many real files): the
    kernels that widen them on the device (q4k, q5k, q6, q3, q2) keep them, as the host does, where a flush to zero
    would lose those blocks."""
    from gguf import GGML_QUANT_SIZES

    from spmd.quants import F16_FIELDS
    rng = np.random.default_rng(8)
    w = random_qtensor(qtype, 21, 512, rng)
    blocks = w.data.reshape(w.rows, -1, GGML_QUANT_SIZES[qtype][1])
    for at in F16_FIELDS[qtype]:  # float16 bits 0x0001..0x03ff, either sign: subnormal
        shape = blocks.shape[:2] + (1,)
        bits = rng.integers(1, 1024, shape, dtype=np.uint16) | rng.choice([0, 0x8000], shape)
        blocks[:, :, at:at + 2] = bits.astype(np.uint16).view(np.uint8)
    lin = BACKEND.linear(w)
    for n in (1, 11):
        x = activations(n, w.cols, rng)
        got, want = lin(x), NumpyBackend().linear(w)(x)
        assert np.abs(want).max() > 0 and np.all(np.abs(got - want) <= tolerance(w, x))
    lin.free()


@needs_device
@pytest.mark.parametrize("qtype", (T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K), ids=lambda t: t.name)
def test_a_matrix_over_the_storage_buffer_range_is_split_into_row_chunks(monkeypatch, qtype):
    rng = np.random.default_rng(3)
    w = random_qtensor(qtype, 100, 256, rng)
    monkeypatch.setattr(BACKEND.dev, "max_range", 30 * 8 * 16)  # 30 rows of 8 blocks (their scales take less)
    lin = BACKEND.linear(w)
    assert len(lin.parts) == 4
    x = activations(2, 256, rng)
    assert np.all(np.abs(lin(x) - NumpyBackend().linear(w)(x)) <= tolerance(w, x))


def _run_pair(n, rng, bias=False, accum=False, qtype=T.Q4_0):
    """silu(W1 x) * (W3 x) in one pass (gate and up rows side by side), with a bias and an add into y."""
    from spmd.backends.vk_runtime import Buffer, Recording
    from spmd.backends.vulkan import pad
    w1, w3 = random_qtensor(qtype, 70, 160, rng), random_qtensor(qtype, 70, 160, rng)
    rows, cols = w1.rows, w1.cols  # (160 rounded up to the type's blocks)
    lin1, lin3, dev = BACKEND.linear(w1), BACKEND.linear(w3), BACKEND.dev
    x = rng.standard_normal((n, cols)).astype(np.float32)
    b, y0 = rng.standard_normal(rows).astype(np.float32), rng.standard_normal((n, rows)).astype(np.float32)
    xb, bb, yb = Buffer(dev, n * pad(cols) * 4), Buffer(dev, rows * 4), Buffer(dev, n * rows * 4)
    dev.zero([xb, bb, yb])
    xb.write(np.pad(x, ((0, 0), (0, pad(cols) - cols))))
    bb.write(b)
    yb.write(y0)
    rec = Recording(dev)
    lin1.dispatch(rec, xb, pad(cols), 0, yb, rows, 0, n, pair=lin3, bias=bb if bias else None, accum=accum)
    rec.barrier(to_host=True)
    rec.end()
    rec.run()
    got = dev.read(yb, 0, n * rows * 4).view(np.float32).reshape(n, rows)
    rec.free()
    for buf in (xb, bb, yb):
        buf.free()
    gate, up = NumpyBackend().linear(w1)(x).astype(np.float64), NumpyBackend().linear(w3)(x).astype(np.float64)
    with np.errstate(over="ignore"):  # exp(-gate) of a large negative gate: inf, and the product 0, as wanted
        expect = gate / (1 + np.exp(-gate)) * up + (b if bias else 0) + (y0 if accum else 0)
    tol = 1e-5 * (np.abs(x) @ (np.abs(NumpyBackend().linear(w1).w) + np.abs(NumpyBackend().linear(w3).w)).T)
    return got, expect, tol * (1 + np.abs(up) + np.abs(gate)) + 1e-6 * np.abs(expect)


@needs_device
@pytest.mark.parametrize("n", [1, 9])
@pytest.mark.parametrize("bias,accum", [(True, False), (False, True)], ids=["bias", "add"])
def test_gate_and_up_in_one_pass_with_silu(bias, accum, n):
    """SwiGLU's SiLU-multiply fused into the product of ffn_gate and ffn_up; a bias and the residual add."""
    got, expect, tol = _run_pair(n, np.random.default_rng(4), bias, accum)
    assert np.all(np.abs(got - expect) <= tol)


@needs_device
@pytest.mark.parametrize("nr", [1, 8, 16])
def test_matvec_rows_per_workgroup_change_no_bit(nr, monkeypatch):
    """The matrix-vector kernel's weight rows per workgroup (NR, SPMD_VK_MATVEC's second number): each thread sums
    the same blocks of its rows whatever NR is, so a product (37 rows: the last workgroup's cut short) and gate with
    up (SiLU-multiply) are the same bits as at NR 4."""
    def product(qtype, rows_per_group):
        monkeypatch.setattr(BACKEND, "matvec_nr", rows_per_group)
        rng = np.random.default_rng(5)
        w = random_qtensor(qtype, 37, 96, rng)
        lin = BACKEND.linear(w)  # (a linear records its dispatch once: one per NR)
        got = lin(activations(1, w.cols, rng))
        lin.free()
        return got

    for qtype in (T.Q4_0, T.Q8_0, T.Q4_K):
        assert np.array_equal(product(qtype, nr), product(qtype, 4))
    monkeypatch.setattr(BACKEND, "matvec_nr", nr)
    got = _run_pair(1, np.random.default_rng(4))[0]
    monkeypatch.setattr(BACKEND, "matvec_nr", 4)
    assert np.array_equal(got, _run_pair(1, np.random.default_rng(4))[0])


@needs_device
@pytest.mark.parametrize("case,activations", [("Q4_0", "f32"), ("Q4_K_M", "f32"), ("Q4_0", "int8")])
def test_a_decode_at_other_matvec_rows_gives_the_same_tokens(models, case, activations, monkeypatch):
    """One-rank decode's products also write the next RMSNorm's sums of squares a workgroup each (the reader adds
    up one per NR rows) and, with int8, round each 32-row block once its last workgroup is done: at NR 2 and 16,
    and at 4 with 8 for the wide products (q, k, v, the classifier), the tokens are the reference's (int8: those
    at NR 4)."""
    want = engine(models[case], "numpy" if activations == "f32" else "vulkan", activations=activations).run()
    monkeypatch.setattr(vulkan, "MATVEC_WIDE_ROWS", 1)  # (the test model's matrices are narrower than a GPU's rule)
    for rows in ("2,2", "16,16", "4,8"):
        monkeypatch.setenv("SPMD_VK_MATVEC", f"16,{rows}")
        assert engine(models[case], "vulkan", activations=activations).run()["tokens"] == want["tokens"]


needs_matrix_units = pytest.mark.skipif(isinstance(BACKEND, str) or not BACKEND.dev.coop,
                                        reason="the device has no cooperative matrices (coopmat kernels)")


@needs_matrix_units
@pytest.mark.parametrize("tokens,few", [(16, 0), (32, 0), (64, 0), (64, 10 ** 6)])
@pytest.mark.parametrize("qtype", TYPES[1:], ids=NAMES[1:])  # F32 keeps the float32 kernel
def test_matrix_unit_products_match_reference(qtype, tokens, few, monkeypatch):
    """The prompt's products on the matrix units (a quantised type's integers or fp16 pairs, float32 sums) within the
    float32 tolerance, with tiles of each token count, either split of a 64-token tile among the subgroups (COOP_FEW
    0: 16 tokens x 64 rows each, 10^6: 32 x 32), a partial tile of rows and of tokens, and gate and up of the type
    in one pass (always 32 x 32 at 64 tokens)."""
    monkeypatch.setattr(BACKEND, "coop_tokens", tokens)
    monkeypatch.setattr(vulkan, "COOP_FEW", few)
    rng = np.random.default_rng(5)
    w = random_qtensor(qtype, 130, 544, rng)
    x = activations(tokens + 7, w.cols, rng)
    lin = BACKEND.linear(w)
    assert np.all(np.abs(lin(x) - NumpyBackend().linear(w)(x)) <= tolerance(w, x))
    split = 2 if tokens == 64 and few else 1
    assert any(key[0] == f"coopmat_{lin.type}_f32" and key[3][3:] == (tokens, split) for key in BACKEND.dev._pipelines)
    lin.free()
    got, expect, tol = _run_pair(tokens + 3, rng, bias=True, qtype=qtype)
    assert np.all(np.abs(got - expect) <= tol)


def test_matrix_unit_tiles_follow_the_workgroup_counts():
    """coop_tile: 64 tokens where that makes COOP_WIDE workgroups of 64 rows, else 32; with 64, two fragments of 16
    tokens a subgroup for a pair or at most COOP_FEW workgroups, else one."""
    from spmd.backends.vulkan import COOP_FEW, COOP_WIDE, coop_tile
    assert 64 * 2 >= COOP_WIDE and 64 * 2 <= COOP_FEW < 32 * 8
    assert coop_tile(4096, 128, False) == (64, 2)  # 64 x 2 workgroups
    assert coop_tile(2048, 512, False) == (64, 1)  # 32 x 8
    assert coop_tile(2048, 512, True) == (64, 2)  # a pair
    assert 32 * 2 < COOP_WIDE and coop_tile(2048, 128, True) == (32, 1)  # 32 x 2 at 64 tokens: too few
    assert coop_tile(4096, 128, False, fixed_tokens=32) == (32, 1)


@needs_device
def test_a_matrix_unit_tile_that_does_not_exist_is_refused(monkeypatch):
    monkeypatch.setenv("SPMD_VK_COOP_TOKENS", "48")
    with pytest.raises(UserError, match="SPMD_VK_COOP_TOKENS=48: give 16, 32 or 64"):
        get_backend("vulkan", threads=None, device=None)


@pytest.mark.parametrize("name, value, message", [
    ("SPMD_VK_SPLIT_KEYS", "512", "SPMD_VK_SPLIT_KEYS=512: give 1 to 256"),
    ("SPMD_VK_ATTENTION", "0", "SPMD_VK_ATTENTION=0: give 1 to"),
    ("SPMD_VK_ATTENTION", "512", "SPMD_VK_ATTENTION=512: give 1 to"),
    ("SPMD_VK_MATVEC", "64x", "SPMD_VK_MATVEC=64x: expected whole numbers"),
    ("SPMD_VK_MATVEC", "64,3", "SPMD_VK_MATVEC=64,3: give threads and rows per workgroup"),
    ("SPMD_VK_MATVEC", "4,8", "SPMD_VK_MATVEC=4,8: give threads and rows per workgroup"),
    ("SPMD_VK_MATVEC", "64,4,12", "SPMD_VK_MATVEC=64,4,12: give threads and rows per workgroup"),
    ("SPMD_VK_MATVEC", "64,4,8,8", "SPMD_VK_MATVEC=64,4,8,8: give threads and rows per workgroup"),
])
def test_a_tuning_knob_out_of_range_or_not_a_number_is_one_error(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=message):
        get_backend("vulkan", threads=None, device=None)


@needs_device
def test_descriptor_sets_are_kept_per_bindings_and_go_with_their_buffers():
    """A dispatch over the same pipeline and bindings reuses its set in a later recording; freeing a buffer frees
    the sets that bind it (their pool can give them again), and no others."""
    from spmd.backends.vk_runtime import Buffer, Recording
    dev = BACKEND.dev
    pipe = dev.pipeline("add_f32", 2, 4)
    a, b, c = Buffer(dev, 1024), Buffer(dev, 1024), Buffer(dev, 1024)
    sets = dev.sets
    before = len(sets.sets)
    first = sets.get(pipe, [(a, 0, 1024), (b, 0, 1024)])
    for _ in range(2):
        rec = Recording(dev)
        rec.dispatch(pipe, [(a, 0, 1024), (b, 0, 1024)], bytes(4), (1, 1, 1))
        rec.dispatch(pipe, [(a, 0, 512), (c, 0, 1024)], bytes(4), (1, 1, 1))
        rec.end()
        rec.free()
    assert sets.get(pipe, [(a, 0, 1024), (b, 0, 1024)])[0] == first[0] and len(sets.sets) == before + 2
    left = sum(pool.left for pool in sets.pools)
    c.free()
    assert len(sets.sets) == before + 1 and sum(pool.left for pool in sets.pools) == left + 1
    a.free()
    b.free()
    assert len(sets.sets) == before and b.key not in sets.by_buffer


# ---- the model on the device ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vulkan-models")
    paths = {q: write_model(folder / f"llama-{q}.gguf", LLAMA, qtype=q, seed=7) for q in ("F32", "Q8_0", "Q4_0",
                                                                                          "F16")}
    paths["qwen2"] = write_model(folder / "qwen2.gguf", QWEN2, qtype="Q8_0", seed=3)
    paths["qwen3"] = write_model(folder / "qwen3.gguf", QWEN3, qtype="Q8_0", seed=5)
    for q in ("Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "IQ4_NL"):  # Q4_K / Q5_K with Q6_K where more bits go; Q3_K
        # with Q4_K; Q2_K with Q3_K; IQ4_NL
        paths[q] = write_model(folder / f"llama-{q}.gguf", K_LLAMA, qtype=q, seed=7)
    return paths


def engine(path, backend, **kw):
    opts = RunOptions(model=str(path), prompts=(PromptSpec(ids=PROMPT),), steps=12, backend=backend, **kw)
    return Engine(opts, Comm(comm=MPI.COMM_SELF), log=lambda _m: None)


@needs_device
@pytest.mark.parametrize("case", ["F32", "Q8_0", "Q4_0", "F16", "qwen2", "qwen3", "Q4_K_M", "Q5_K_M", "Q3_K_M",
                                  "Q2_K", "IQ4_NL"])
def test_greedy_tokens_equal_numpy_reference(models, case):
    expected = engine(models[case], "numpy").run()["tokens"]
    result = engine(models[case], "vulkan").run()
    assert result["tokens"] == expected and len(expected) == 12
    assert "vulkan (" in result["ranks"][0].get("backend", "vulkan (")


@needs_device
@pytest.mark.parametrize("activations", ["f32", "int8"])
@pytest.mark.parametrize("gate, up", [("Q8_0", "Q4_0"), ("Q4_K", "Q6_K"), ("F32", "Q4_K")])
def test_a_gate_and_up_of_different_types_give_the_reference_tokens(tmp_path, gate, up, activations):
    """ffn_gate and ffn_up of different types (per-tensor mixes) cannot share one product, which read up's bytes as
    gate's type (wrong tokens, or logits that were not finite): each has its own, then kernels/swiglu_f32. Prompt
    pass, decode steps and the fused one-token decode of int8 all go through it."""
    path = write_model(tmp_path / "mix.gguf", K_LLAMA, qtype="Q8_0", seed=82, mix={"ffn_gate": gate, "ffn_up": up})
    types = {n.split(".")[-2]: info.qtype.name for n, info in GGUFFile(path).tensors.items() if n.startswith("blk.0")}
    assert (types["ffn_gate"], types["ffn_up"]) == (gate, up)
    expected = engine(path, "numpy").run()["tokens"]
    assert engine(path, "vulkan", activations=activations).run()["tokens"] == expected and len(expected) == 12


KQUANT = sorted((Path(__file__).parent / "kquant").glob("*.gguf"))  # llama.cpp's own files (test_kquant)


@needs_device
@pytest.mark.parametrize("path", KQUANT, ids=[f.stem for f in KQUANT])
def test_llama_cpp_k_quant_files_are_held_as_stored_and_give_the_reference_tokens(path):
    """Every matrix type of llama.cpp's K-quant files is held as the file has it (Q2_K, Q3_K and IQ4_NL included:
    kernels of their own); greedy tokens equal tests/reference.py's."""
    f = GGUFFile(path)
    types = {info.qtype for info in f.tensors.values() if len(info.shape) == 2}
    f.close()
    assert {t: BACKEND.holds(t) for t in types} == {t: t for t in types}
    assert engine(path, "vulkan").run()["tokens"] == reference.greedy(path, list(PROMPT), 12)


def logits(e, tokens, pos):
    """An engine's full logits after one pass over `tokens` at `pos` (one rank: its executor's forward step)."""
    return e.executor.forward(np.array(tokens, dtype=np.int64), pos)


@needs_device
@pytest.mark.parametrize("case", ["F32", "qwen2", "qwen3"])
def test_logits_match_reference_batched_and_step_by_step(models, case):
    tokens = list(PROMPT) + [5, 9, 200]
    expected = reference.logits_for(models[case], tokens)
    e = engine(models[case], "vulkan")
    np.testing.assert_allclose(logits(e, tokens, 0), expected[-1], rtol=0, atol=1e-4)
    e = engine(models[case], "vulkan")
    logits(e, tokens[:5], 0)
    for pos in range(5, len(tokens)):
        np.testing.assert_allclose(logits(e, tokens[pos:pos + 1], pos), expected[pos], rtol=0, atol=1e-4)


@needs_device
@pytest.mark.parametrize("kv_cache,threads", [("f32", None), ("f16", None), ("f32", "4")])
def test_a_decode_step_s_attention_gives_the_same_bits_at_every_value_unroll(models, monkeypatch, kv_cache, threads):
    """A decode step's value sum loads VU values a thread at once (SPMD_VK_ATTENTION_UNROLL), its first VU while
    the keys are scored: at VU 1 (always loaded early), 3 and 8 each step's logits are the same bits (the sum goes
    in the same order) and, with a float32 cache, near the reference's; also with a float16 cache, and with 4
    threads a workgroup (a thread then sums two pairs of dimensions and splits, the first loaded early)."""
    tokens = list(PROMPT) + [5, 9, 200, 7, 31, 90, 4, 2, 8, 100, 300, 11]  # (the engine's cache: 25)
    if threads:
        monkeypatch.setenv("SPMD_VK_ATTENTION", threads)
    got = []
    for vu in (1, 3, 8):
        monkeypatch.setenv("SPMD_VK_ATTENTION_UNROLL", str(vu))
        e = engine(models["F32"], "vulkan", kv_cache=kv_cache)
        logits(e, tokens[:5], 0)
        got.append([logits(e, tokens[pos:pos + 1], pos) for pos in range(5, len(tokens))])
    if kv_cache == "f32":
        expected = reference.logits_for(models["F32"], tokens)
        for pos, step_logits in enumerate(got[0], 5):
            np.testing.assert_allclose(step_logits, expected[pos], rtol=0, atol=1e-4)
    assert all(np.array_equal(a, b) for other in got[1:] for a, b in zip(got[0], other))


def _shard_models(path, share_of, cfg_change=None, max_seq=None, slots=1, kv_cache="f32"):
    """(numpy Model, VulkanModel) of the same shard, slot 0 open for max_seq positions in both."""
    f = GGUFFile(path)
    from spmd.config import read_config
    cfg = read_config(f)
    if cfg_change:
        cfg = dataclasses.replace(cfg, **cfg_change)
    share = share_of(cfg)
    max_seq = max_seq or cfg.context
    ref = Model(cfg, load_shard(f, cfg, share, NumpyBackend()), share, max_seq, slots, kv_cache=kv_cache)
    dev = BACKEND.make_model(cfg, load_shard(f, cfg, share, BACKEND), share, max_seq, slots, kv_cache)
    for m in (ref, dev):
        m.open(0, max_seq)
    return ref, dev, cfg


def _whole(cfg):
    return make_plan(parse_layout(None, 1), cfg)[0]


def step(stages, segments, allreduce=None):
    """One pass of segments [(slot, pos, tokens)], their rows stacked, through the stages in turn (each one's
    hidden state is the next one's input; a whole model is one stage) -> logits (len(segments), n_vocab)."""
    x = stages[0].embed(np.concatenate([np.array(tokens) for _, _, tokens in segments]))
    segs = [Segment(slot, pos, len(tokens)) for slot, pos, tokens in segments]
    for m in stages[:-1]:
        x = m.forward(x, segs, allreduce, head=False)
        assert x.shape == (sum(seg.n for seg in segs), m.cfg.dim) and x.dtype == np.float32
    return stages[-1].forward(x, segs, allreduce, head=True)


def run(m, tokens, pos, allreduce=None):
    """A whole-model pass of one sequence in slot 0 -> logits (1, n_vocab)."""
    return step([m], [(0, pos, tokens)], allreduce)


@needs_device
@pytest.mark.parametrize("neox", [False, True], ids=["interleaved", "neox"])
def test_attention_over_a_long_cache_with_partial_rope(tmp_path, neox):
    """A cache written through cache_put (300 positions: two chunks of the kernel's 256 keys), then 3 tokens;
    half of each head rotated (rope_dim < head_dim), GQA; every layer against spmd.model.Model."""
    path = write_model(tmp_path / "m.gguf", Shape(dim=128, n_heads=4, n_kv_heads=2, ffn=128, context=512), "F32", 5)
    ref, dev, cfg = _shard_models(path, _whole, {"rope_dim": 16, "rope_neox": neox})
    rng = np.random.default_rng(6)
    pieces = {(layer, j): tuple(rng.standard_normal((300, cfg.head_dim)).astype(np.float32) for _ in "kv")
              for layer in range(cfg.n_layers) for j in range(2)}
    for m in (ref, dev):
        m.cache_put(0, pieces)
    tokens = [3, 4, 5]
    np.testing.assert_allclose(run(dev, tokens, 300), run(ref, tokens, 300), rtol=0, atol=1e-4)
    got, want = dev.cache_take(0, 303), ref.cache_take(0, 303)
    assert set(got) == set(want) == set(pieces)
    for key, (k, v) in got.items():
        assert k.shape == v.shape == (303, cfg.head_dim)
        np.testing.assert_allclose(k, want[key][0], rtol=0, atol=1e-4)
        np.testing.assert_allclose(v, want[key][1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(run(dev, [7], 303), run(ref, [7], 303), rtol=0, atol=1e-4)
    dev.close()


@needs_device
@pytest.mark.parametrize("multi", [False, True], ids=["one-buffer", "half-layers"])
@pytest.mark.parametrize("kv_cache", ["f32", "f16"])
def test_decode_steps_over_long_caches_attend_in_splits(tmp_path, kv_cache, multi):
    """Decode steps of three sequences at 700, 40 and 300 positions (caches written through cache_put), and of one
    alone: from SPLIT_FROM positions on their attention runs in splits of split_keys keys (256: 3 of 4 splits live for
    the longest, 1 for the shortest) combined by a last dispatch; every step's logits against spmd.model.Model, and a
    step under SPLIT_FROM keeps the one-dispatch recording."""
    path = write_model(tmp_path / "m.gguf", Shape(dim=128, n_heads=4, n_kv_heads=2, ffn=128, context=1024), "Q8_0", 5)
    ref, dev, cfg = _shard_models(path, _whole, slots=3, kv_cache=kv_cache)
    assert (dev.splits - 1) * BACKEND.split_keys < cfg.context <= dev.splits * BACKEND.split_keys  # enough for all
    rng = np.random.default_rng(6)
    filled = {0: 700, 1: 40, 2: 300}
    for slot, n in filled.items():
        pieces = {(layer, j): tuple(rng.standard_normal((n, cfg.head_dim)).astype(np.float32) for _ in "kv")
                  for layer in range(cfg.n_layers) for j in range(2)}
        for m in (ref, dev):
            m.open(slot, cfg.context)
            m.cache_put(slot, pieces)
    allreduce = (lambda a: a) if multi else None  # one rank: the sum over the stage is the identity
    for step_no in range(3):  # three steps: the recorded command buffers replayed
        segments = [(slot, n + step_no, [3 + slot + step_no]) for slot, n in filled.items()]
        np.testing.assert_allclose(step([dev], segments, allreduce), step([ref], segments, allreduce), rtol=0,
                                   atol=1e-4)
    np.testing.assert_allclose(run(dev, [9], 703, allreduce), run(ref, [9], 703, allreduce), rtol=0, atol=1e-4)
    short = [(1, 43, [5])]  # one sequence under SPLIT_FROM: one dispatch
    np.testing.assert_allclose(step([dev], short, allreduce), step([ref], short, allreduce), rtol=0, atol=1e-4)
    assert set(dev._decode) == {(multi, True, 3, True), (multi, True, 1, True), (multi, True, 1, False)}
    dev.close()


@needs_device
def test_half_layer_command_buffers_with_an_allreduce(models):
    """The multi-rank recording (one command buffer per half-layer, partial sums through host memory) gives the
    single-rank one's logits when the allreduce is the identity; it is called twice per layer."""
    ref, dev, cfg = _shard_models(models["Q8_0"], _whole)
    calls = []

    def identity(a):
        calls.append(a.shape)
        return a
    one = run(dev, PROMPT, 0)
    dev2 = BACKEND.make_model(cfg, dev.w, dev.share, dev.max_seq)
    dev2.open(0, dev.max_seq)
    many = run(dev2, PROMPT, 0, identity)
    assert calls == [(len(PROMPT), cfg.dim)] * (2 * cfg.n_layers)
    np.testing.assert_allclose(many, one, rtol=0, atol=1e-5)
    for pos, t in enumerate((5, 6, 7), start=len(PROMPT)):
        np.testing.assert_allclose(run(dev2, [t], pos, identity), run(dev, [t], pos), rtol=0, atol=1e-5)
    np.testing.assert_allclose(one, run(ref, PROMPT, 0), rtol=0, atol=1e-4)
    dev.close()


@needs_device
@pytest.mark.parametrize("memory", ["mapped", "staged", "uncached"])
@pytest.mark.parametrize("multi", [False, True], ids=["one-buffer", "half-layers"])
def test_pipeline_stages_in_turn_equal_the_whole_model(tmp_path, monkeypatch, multi, memory):
    """Three one-rank stages of a 5-layer model (the first and middle without the head: the hidden state comes back
    to the host, through a copy into host memory where the device's memory cannot be mapped, or is mapped but not
    through the host's caches, as a GPU's; lavapipe's is); a prompt, then decode steps (the fused one-buffer decode
    ends the first stages without the output norm). Each stage's cache holds its layers."""
    direct = memory != "staged"
    if not direct:
        monkeypatch.setattr(BACKEND.dev, "direct", False)
    if memory == "uncached":
        from spmd.backends.vk_runtime import vk
        monkeypatch.setattr(BACKEND.dev, "type_flags", [f & ~vk.VK_MEMORY_PROPERTY_HOST_CACHED_BIT
                                                        for f in BACKEND.dev.type_flags])
    path = write_model(tmp_path / "m.gguf", Shape(**{**LLAMA.__dict__, "n_layers": 5}), "Q4_0", 7)
    ref = _shard_models(path, _whole)[0]
    stages = [_shard_models(path, lambda cfg, r=r: make_plan(parse_layout("1*2*1", 3), cfg)[r])[1] for r in range(3)]
    assert [m.share.layers for m in stages] == [(0, 1), (1, 4), (4, 5)] and stages[0].w.output is None
    allreduce = (lambda a: a) if multi else None  # one rank per stage: the sum over the stage is the identity
    np.testing.assert_allclose(step(stages, [(0, 0, PROMPT)], allreduce), run(ref, PROMPT, 0), rtol=0, atol=1e-4)
    for pos, t in enumerate((5, 6, 7), start=len(PROMPT)):
        np.testing.assert_allclose(step(stages, [(0, pos, [t])], allreduce), run(ref, [t], pos), rtol=0, atol=1e-4)
    acts, recs = stages[0]._decode[multi, False, 1, False]  # the one-token decode recording without the head
    # (x is read where it is only when the host reads it through its caches: a GPU's mapped memory is not)
    assert (acts.io is acts.x) == direct and (acts.out is acts.x) == (memory == "mapped" and acts.x.cached)
    assert acts.fused == (direct and not multi)
    assert len(recs) == (1 if not multi else 2 * 1 + 1)
    assert set(stages[1].cache_take(0, 4)) == {(layer, j) for layer in (1, 2, 3) for j in (0, 1)}
    whole = ref.cache_take(0, len(PROMPT) + 3)
    for m in stages:
        for key, (k, v) in m.cache_take(0, len(PROMPT) + 3).items():
            np.testing.assert_allclose(k, whole[key][0], rtol=0, atol=1e-4)
            np.testing.assert_allclose(v, whole[key][1], rtol=0, atol=1e-4)
        m.close()


# passes of several sequences, each a list of segments (slot, pos, tokens): two prompts in slots 2 and 0, then a
# prompt in slot 1 stacked with decode tokens of the others, then decode steps of the three in unsorted slot order
PASSES = [
    [(2, 0, (5, 9, 200, 33, 7, 41, 88, 3, 11)), (0, 0, (1, 72, 101, 108, 108))],
    [(2, 9, (17,)), (1, 0, (4, 8, 15, 16)), (0, 5, (23,))],
    [(2, 10, (42,)), (0, 6, (99,)), (1, 4, (31,))],
    [(1, 5, (2,)), (2, 11, (64,)), (0, 7, (128,))],
]
NEED = 16  # positions each sequence of PASSES may hold
FILLED = {0: 8, 1: 6, 2: 12}  # slot -> positions PASSES writes


def _open_slots(models, slots=3):
    for m in models:
        for slot in range(slots):
            m.open(slot, NEED)


def _one_at_a_time(stages, allreduce):
    """PASSES with each segment a pass of its own: the logits of each pass, stacked."""
    return [np.concatenate([step(stages, [seg], allreduce) for seg in segments]) for segments in PASSES]


def _same_caches(a, b, filled=FILLED):
    """The caches of models (or stages) a equal b's: positions 0..n-1 of each slot of filled {slot: n}."""
    for slot, n in filled.items():
        want = {key: kv for m in b for key, kv in m.cache_take(slot, n).items()}
        got = {key: kv for m in a for key, kv in m.cache_take(slot, n).items()}
        assert set(got) == set(want)
        for key, (k, v) in got.items():
            np.testing.assert_allclose(k, want[key][0], rtol=0, atol=1e-4)
            np.testing.assert_allclose(v, want[key][1], rtol=0, atol=1e-4)


@needs_device
@pytest.mark.parametrize("kv_cache", ["f32", "f16"])
@pytest.mark.parametrize("heads", [8, 4, 2], ids=["head_dim-32", "head_dim-64", "head_dim-128"])
@pytest.mark.parametrize("blocks", [1, 0], ids=["in-blocks", "a-row-at-a-time"])
def test_long_prompts_of_several_sequences_in_one_pass(tmp_path, heads, kv_cache, blocks, monkeypatch):
    """A prompt's keys stored first, then attended from the cache (attention_f32 mode 1, then
    attention_block: BLOCK_ROWS rows a workgroup, or a row at a time, mode 2): a 30-token prompt, then in one pass
    19 tokens of another sequence and 40 more of the first after its 30 in the cache, then 3 segments of 7, 5 and
    30 rows (the first 32-row block holds pieces of all three); head_dim 32, 64 and 128, float32 and float16
    caches. Logits and caches against spmd.model.Model."""
    monkeypatch.setenv("SPMD_VK_ATTENTION_BLOCKS", str(blocks))
    shape = Shape(dim=256, n_heads=heads, n_kv_heads=max(1, heads // 2), ffn=128, vocab=300, context=128)
    path = write_model(tmp_path / "m.gguf", shape, "F32", 3)
    ref, dev, cfg = _shard_models(path, _whole, slots=3, kv_cache=kv_cache)
    assert cfg.head_dim == 256 // heads
    assert (dev._attention_block is not None) == bool(blocks and dev.dev.quads)
    rng = np.random.default_rng(8)
    for m in (ref, dev):
        m.open(1, 128)
        m.open(2, 128)
    first, other, more, a, b, c = (tuple(int(t) for t in rng.integers(1, 300, n)) for n in (30, 19, 40, 7, 5, 30))
    tol = 1e-4 if kv_cache == "f32" else 1e-3  # (float16: the products' rounding can flip a key's float16 rounding)
    for segments in ([(0, 0, first)], [(1, 0, other), (0, 30, more)], [(2, 0, a), (1, 19, b), (0, 70, c)]):
        np.testing.assert_allclose(step([dev], segments), step([ref], segments), rtol=0, atol=tol)
    if kv_cache == "f32":  # (test_a_float16_kv_cache_equals_the_reference_with_one checks float16 caches)
        _same_caches([dev], [ref], {0: 100, 1: 24, 2: 7})
    dev.close()


@needs_device
@pytest.mark.parametrize("threads", [None, 2, 4], ids=["default-threads", "2-threads", "4-threads"])
def test_decode_steps_with_a_head_size_that_is_no_multiple_of_16(tmp_path, threads, monkeypatch):
    """head_dim 40: the decode attention scores a cached key with KC = 3 threads (head_dim / 16, rounded up), the
    first of them taking 4 of the key's 10 vec4 and the others 3; also with 2 threads a workgroup asked
    (SPMD_VK_ATTENTION: the model takes the 3 a key needs) and 4. 30 decode steps after a 5-token prompt, logits
    against spmd.model.Model."""
    if threads:
        monkeypatch.setattr(BACKEND, "attention_wg", threads)
    shape = Shape(dim=240, n_heads=6, n_kv_heads=3, ffn=128, vocab=300, context=64)
    path = write_model(tmp_path / "m.gguf", shape, "F32", 5)
    ref, dev, cfg = _shard_models(path, _whole)
    assert cfg.head_dim == 40
    if threads:  # the kernel's threads a workgroup: at least the 3 a key needs
        [spec] = [key[3] for key, pipe in dev.dev._pipelines.items() if pipe is dev._attention]
        assert spec[:2] == (max(threads, 3), 40)
    rng = np.random.default_rng(12)
    tokens = [int(t) for t in rng.integers(1, 300, 35)]
    np.testing.assert_allclose(step([dev], [(0, 0, tokens[:5])]), step([ref], [(0, 0, tokens[:5])]), rtol=0, atol=1e-4)
    for pos in range(5, 35):
        np.testing.assert_allclose(step([dev], [(0, pos, (tokens[pos],))]), step([ref], [(0, pos, (tokens[pos],))]),
                                   rtol=0, atol=1e-4)
    dev.close()


@needs_device
def test_prompt_activations_are_kept_up_to_a_size(monkeypatch, models):
    """A prompt's activations stay for the next prompt (grown to the largest so far), except a pass over
    KEPT_PASS_ROWS rows, whose own are freed after it: device memory goes back to what it was."""
    import spmd.backends.vulkan_model as vulkan_model
    monkeypatch.setattr(vulkan_model, "KEPT_PASS_ROWS", 12)
    ref, dev, cfg = _shard_models(models["Q8_0"], _whole)
    heap = dev.dev.heap_used[:]
    for tokens, kept_rows in ((PROMPT[:9], 9), (PROMPT[:11], 11), (PROMPT[:10], 11)):
        np.testing.assert_allclose(run(dev, tokens, 0), run(ref, tokens, 0), rtol=0, atol=1e-4)
        assert dev._pass.rows == kept_rows
    kept = dev.dev.heap_used[:]
    np.testing.assert_allclose(run(dev, PROMPT, 0), run(ref, PROMPT, 0), rtol=0, atol=1e-4)  # 13 rows
    assert dev._pass.rows == 11 and dev.dev.heap_used == kept and kept != heap
    dev.close()


@needs_device
def test_attention_in_blocks_only_for_passes_of_long_segments(monkeypatch, models):
    """attention_block for a prompt; a row at a time (mode 2) for a decode step of 12 sequences (12 one-row
    segments: in blocks it ran 3-10x slower) and for a pass whose segments average under BLOCK_SEGMENT_ROWS rows."""
    from spmd.backends.vk_runtime import Recording
    ref, dev, cfg = _shard_models(models["Q8_0"], _whole, slots=12)
    if dev._attention_block is None:
        pytest.skip("no subgroup quads: no attention blocks")
    used, real = [], Recording.dispatch

    def dispatch(rec, pipe, *args, **kw):
        used.append(pipe)
        return real(rec, pipe, *args, **kw)

    monkeypatch.setattr(Recording, "dispatch", dispatch)
    for slot in range(1, 12):
        dev.open(slot, 32)
    passes = [[(0, 0, PROMPT)],  # 13 rows, one segment
              [(slot, 0, (slot + 3,)) for slot in range(1, 12)] + [(0, len(PROMPT), (9,))],  # 12 one-row segments
              [(slot, 1, (5, 6)) for slot in range(1, 10)]]  # 18 rows, 9 segments of 2
    for segments, blocks in zip(passes, (True, False, False)):
        used.clear()
        step([dev], segments)
        assert (dev._attention_block in used) == blocks
        assert dev._attention in used
    dev.close()


@needs_device
def test_gpu_time_of_a_decode_step_is_read_when_asked(models):
    """gpu_seconds: the last decode step's GPU time from its timestamps (positive, and less than the step's wall
    time), None after a prompt pass (its recordings are gone) and before any pass; after a chained decode of k
    steps, k times its last step's (one command buffer: its timestamps are the last run's)."""
    ref, dev, cfg = _shard_models(models["Q8_0"], _whole)
    assert dev.gpu_seconds() is None
    run(dev, PROMPT, 0)
    assert dev.gpu_seconds() is None
    t = time.perf_counter()
    run(dev, (7,), len(PROMPT))
    wall = time.perf_counter() - t
    if dev.dev.timestamp_period:
        assert 0 < dev.gpu_seconds() < wall
        dev.ahead([7], [Segment(0, len(PROMPT) + 1, 1)], 1, cfg.vocab)  # (recording)
        dev.ahead([7], [Segment(0, len(PROMPT) + 1, 1)], 3, cfg.vocab)
        last = dev._chains[1, False, cfg.vocab][1][0].gpu_seconds()
        assert 0 < dev.gpu_seconds() == 3 * last  # (an estimate: not bounded by the chain's wall time)
    dev.close()


@needs_device
def test_a_prompt_is_queued_in_parts_as_it_is_recorded(monkeypatch, models):
    """One rank's prompt pass goes to the device in parts, cut after half-layers 1, 2, 4, 8, ..., each queued as
    soon as it is recorded and only the last waited for (the GPU works while the host records the rest); a decode
    step stays one buffer. Both equal the reference."""
    from spmd.backends.vk_runtime import Recording
    fences, real = [], Recording.submit
    monkeypatch.setattr(Recording, "submit", lambda self, fence=True: (fences.append(fence), real(self, fence))[1])
    ref, dev, cfg = _shard_models(models["Q8_0"], _whole)
    halves = 2 * cfg.n_layers
    cuts = [k for k in (2 ** j for j in range(halves)) if k < halves]
    assert cuts  # (a model of more than one half-layer)
    for _ in range(2):  # (the first pass also zeroes the activations it makes: other submits)
        fences.clear()
        np.testing.assert_allclose(run(dev, PROMPT, 0), run(ref, PROMPT, 0), rtol=0, atol=1e-4)
    assert fences == [False] * len(cuts) + [True]
    for pos in range(len(PROMPT), len(PROMPT) + 2):  # the second step replays the kept recording
        fences.clear()
        np.testing.assert_allclose(run(dev, [7], pos), run(ref, [7], pos), rtol=0, atol=1e-4)
    assert fences == [True]
    dev.close()


@needs_device
@pytest.mark.parametrize("case", ["F32", "Q4_0", "Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "IQ4_NL"])
def test_a_prompt_embedded_on_the_device_gives_the_hosts_bits(models, case):
    """Where the one rank holds token_embd on the device, `embed` leaves a prompt's ids (Tokens) and the pass embeds
    them (kernels/embed_<w>): the logits and caches are those of the same pass from the host's lookup, bit for bit,
    for prompts of several sequences; a decode step's ids are looked up on the host."""
    _, dev, cfg = _shard_models(models[case], _whole, slots=3)
    _, host, _ = _shard_models(models[case], _whole, slots=3)
    assert dev.embedding is not None
    _open_slots([dev, host])
    for segments in PASSES:
        ids = np.concatenate([np.array(tokens) for _, _, tokens in segments])
        segs = [Segment(slot, pos, len(tokens)) for slot, pos, tokens in segments]
        x = dev.embed(ids)
        assert isinstance(x, vulkan_model.Tokens) and x.shape == (len(ids), cfg.dim)
        got = dev.forward(x, segs, None, head=True)
        want = host.forward(host.w.embed(ids), segs, None, head=True)
        np.testing.assert_array_equal(got, want)
    for slot, n in FILLED.items():
        for key, (k, v) in dev.cache_take(slot, n).items():
            np.testing.assert_array_equal(k, host.cache_take(slot, n)[key][0])
            np.testing.assert_array_equal(v, host.cache_take(slot, n)[key][1])
    dev.close()
    host.close()


@needs_device
def test_a_prompt_that_fails_after_parts_were_queued_leaves_the_device_usable(monkeypatch, models):
    """An error while the rest is recorded (here the second FFN half, after two parts were queued): the parts are
    waited for and freed, the error goes up, and the next pass runs and equals the reference."""
    ref, dev, cfg = _shard_models(models["Q8_0"], _whole)
    run(dev, PROMPT, 0)
    real, calls = dev._ffn_half, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(*args)
    monkeypatch.setattr(dev, "_ffn_half", failing)
    with pytest.raises(RuntimeError, match="injected"):
        run(dev, PROMPT, 0)
    monkeypatch.setattr(dev, "_ffn_half", real)
    np.testing.assert_allclose(run(dev, PROMPT, 0), run(ref, PROMPT, 0), rtol=0, atol=1e-4)
    dev.close()


@needs_device
@pytest.mark.parametrize("matvec_rows", [1, 8], ids=["matmul", "matvec"])  # lavapipe's choice and a GPU's
@pytest.mark.parametrize("multi", [False, True], ids=["one-buffer", "half-layers"])
def test_several_sequences_in_one_pass(models, multi, matvec_rows, monkeypatch):
    """Prompts and decode tokens of three slots stacked in each pass, against spmd.model.Model doing the same and
    against the same segments run one at a time on the device; the batched decode steps reuse one recording."""
    monkeypatch.setattr(BACKEND, "matvec_rows", matvec_rows)
    ref, dev, cfg = _shard_models(models["Q8_0"], _whole, slots=3)
    single = BACKEND.make_model(cfg, dev.w, dev.share, dev.max_seq, slots=3)
    _open_slots([ref, dev, single])
    allreduce = (lambda a: a) if multi else None  # one rank: the sum over the stage is the identity
    alone = _one_at_a_time([single], allreduce)
    for segments, expect in zip(PASSES, alone):
        got = step([dev], segments, allreduce)
        assert got.shape == (len(segments), cfg.vocab)
        np.testing.assert_allclose(got, step([ref], segments, allreduce), rtol=0, atol=1e-4)
        np.testing.assert_allclose(got, expect, rtol=0, atol=1e-4)
    assert set(dev._decode) == {(multi, True, 3, False)}  # the prompts and the mixed pass were one-off recordings
    _same_caches([dev], [ref])
    _same_caches([single], [ref])
    assert dev.slots == {0: NEED, 1: NEED, 2: NEED}
    single.close()
    dev.close()


@needs_device
@pytest.mark.parametrize("matvec_rows", [1, 8], ids=["matmul", "matvec"])
def test_a_float16_kv_cache_equals_the_reference_with_one(models, matvec_rows, monkeypatch):
    """--kv-cache f16 (kernels/attention_kv16): PASSES (the first over ATTENTION_STORE rows: attention modes 1 and
    2; then prompts and decode tokens of three sequences in mode 0, where a pass's own keys and values come from
    the qkv buffer, rounded as the cache rounds them) against spmd.model.Model with a float16 cache; the cache
    holds float16, half the bytes, and greedy tokens of a whole run equal the reference's."""
    monkeypatch.setattr(BACKEND, "matvec_rows", matvec_rows)
    # mode 2 for the prompt's rows, whose sums are in mode 0's order (attention_block's are not: the long prompt
    # tests hold it to the reference)
    monkeypatch.setenv("SPMD_VK_ATTENTION_BLOCKS", "0")
    ref, dev, cfg = _shard_models(models["Q8_0"], _whole, slots=3, kv_cache="f16")
    wide = _shard_models(models["Q8_0"], _whole, slots=3)[1]
    _open_slots([ref, dev, wide])
    moved, passes = 0.0, []
    for segments in PASSES:
        got, want = step([dev], segments), step([ref], segments)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)  # (the float32 products' rounding can flip a
        moved = max(moved, float(np.abs(got - step([wide], segments)).max()))  # key's float16 rounding)
        passes.append(got)
    assert moved > 1e-4  # the float16 cache did change the numbers
    # mode 0 reads its pass's own keys and values from the qkv buffer, rounded as the cache holds them: the same
    # logits as with every key and value read back from the cache (modes 1 and 2 for every pass)
    monkeypatch.setattr(vulkan_model, "ATTENTION_STORE", 0)
    stored = _shard_models(models["Q8_0"], _whole, slots=3, kv_cache="f16")[1]
    _open_slots([stored])
    for segments, got in zip(PASSES, passes):
        np.testing.assert_allclose(step([stored], segments), got, rtol=0, atol=1e-5)
    stored.close()
    for slot, n in FILLED.items():
        want = ref.cache_take(slot, n)
        for key, (k, v) in dev.cache_take(slot, n).items():
            assert k.dtype == v.dtype == np.float16
            for got_kv, want_kv in ((k, want[key][0]), (v, want[key][1])):  # within a float16 rounding step of
                scale = np.abs(want_kv).astype(np.float32).max()  # the largest (float32 products' errors differ)
                np.testing.assert_allclose(got_kv, want_kv, rtol=2 ** -10, atol=2 ** -10 * scale)
    assert 2 * dev.kcache[0].nbytes == wide.kcache[0].nbytes
    for m in (dev, wide):
        m.close()
    expected = engine(models["Q4_K_M"], "numpy", kv_cache="f16").run()["tokens"]
    result = engine(models["Q4_K_M"], "vulkan", kv_cache="f16").run()
    assert result["tokens"] == expected
    assert result["ranks"][0]["kv_bytes_per_position"] == engine(models["Q4_K_M"], "vulkan").run()["ranks"][0][
        "kv_bytes_per_position"] // 2


@needs_device
@pytest.mark.parametrize("multi", [False, True], ids=["one-buffer", "half-layers"])
def test_pipeline_stages_with_several_sequences(tmp_path, multi):
    """PASSES through three one-rank stages (the hidden state of every segment's rows handed on) equal the whole
    numpy model, and each stage's slots hold its layers' part of the whole model's caches."""
    path = write_model(tmp_path / "m.gguf", Shape(**{**LLAMA.__dict__, "n_layers": 5}), "Q4_0", 7)
    ref = _shard_models(path, _whole, slots=3)[0]
    stages = [_shard_models(path, lambda cfg, r=r: make_plan(parse_layout("1*2*1", 3), cfg)[r], slots=3)[1]
              for r in range(3)]
    _open_slots([ref] + stages)
    allreduce = (lambda a: a) if multi else None
    for segments in PASSES:
        np.testing.assert_allclose(step(stages, segments, allreduce), step([ref], segments, allreduce), rtol=0,
                                   atol=1e-4)
    _same_caches(stages, [ref])
    for m in stages:
        m.close()


@needs_device
def test_cache_of_one_slot_moves_while_another_holds_a_sequence(models):
    """Slot 1's cache taken from one model and put into another whose slot 0 holds another sequence: slot 0 is
    untouched and a decode step of both continues as the numpy model's; closed slots and positions past a slot's
    need are refused."""
    a, b = [1, 72, 101, 108, 108, 111], [5, 9, 200, 33]
    ref, dev, cfg = _shard_models(models["F32"], _whole, slots=2)
    other = BACKEND.make_model(cfg, dev.w, dev.share, dev.max_seq, slots=2)
    for m in (ref, dev, other):
        m.open(0, NEED)
    for m in (ref, dev):
        m.open(1, NEED)
        step([m], [(0, 0, a), (1, 0, b)])
    step([other], [(0, 0, a)])
    other.open(1, NEED)
    other.cache_put(1, dev.cache_take(1, len(b)))
    _same_caches([other], [ref], {0: len(a), 1: len(b)})
    want = step([ref], [(1, len(b), [7]), (0, len(a), [8])])
    np.testing.assert_allclose(step([other], [(1, len(b), [7]), (0, len(a), [8])]), want, rtol=0, atol=1e-4)
    assert other.slots == {0: NEED, 1: NEED}

    other.free(1)
    assert other.slots == {0: NEED}
    with pytest.raises(ValueError, match="slot 1 is not open"):
        step([other], [(1, 5, [3])])
    with pytest.raises(ValueError, match="slot 1 is not open"):
        other.cache_take(1, 2)
    other.open(1, 4)
    with pytest.raises(ValueError, match="slot 1: position 4 passes its cache of 4"):
        step([other], [(0, len(a) + 1, [3]), (1, 3, [3, 4])])
    with pytest.raises(ValueError, match="slot 0: position 16 passes its cache of 16"):
        other.cache_take(0, NEED + 1)
    with pytest.raises(ValueError, match="slot 0 twice"):
        step([other], [(0, 7, [3]), (0, 8, [4])])
    for slot, need in ((2, 4), (-1, 4), (0, 0), (0, dev.max_seq + 1)):
        with pytest.raises(ValueError, match="this model has slots 0..1"):
            other.open(slot, need)
    other.close()
    dev.close()


@needs_device
def test_a_cache_over_the_storage_buffer_range_is_refused(monkeypatch, models):
    """A layer's cache for every slot is one buffer: past maxStorageBufferRange, a one-line error names the
    limit, --sequences and the context."""
    f = GGUFFile(models["Q8_0"])
    from spmd.config import read_config
    cfg = read_config(f)
    share = _whole(cfg)
    fits, over = load_shard(f, cfg, share, BACKEND), load_shard(f, cfg, share, BACKEND)
    assert 2 * 64 * cfg.head_dim * 4 == 1 << 14  # a sequence of 64 positions, 2 KV heads: 16 KiB a layer
    monkeypatch.setattr(BACKEND.dev, "max_range", 1 << 20)
    BACKEND.make_model(cfg, fits, share, 64, slots=64).close()
    with pytest.raises(UserError, match=r"128 sequences \(--sequences\) x 64 positions \(the context.* is 2 MiB, "
                                        r"over the device's maxStorageBufferRange of 1 MiB: lower --sequences") as e:
        BACKEND.make_model(cfg, over, share, 64, slots=128)
    assert "\n" not in str(e.value)
    for lin in over.linears():
        lin.free()


@needs_device
def test_a_new_share_after_repartition_rebuilds_buffers_and_frees_the_old(models):
    """Ranks 0 and 1 of 2 (other widths of every matrix), built after one another on one device; close() gives
    the device memory back; the cache moves through cache_take / cache_put."""
    dev_mem = BACKEND.dev
    before = list(dev_mem.heap_used)
    plan = None

    def share(rank):
        def of(cfg):
            nonlocal plan
            plan = make_plan(parse_layout("1:3", 2), cfg)
            return plan[rank]
        return of
    ref0, dev0, _ = _shard_models(models["Q4_0"], share(0))
    a = run(dev0, PROMPT, 0, lambda x: x)
    np.testing.assert_allclose(a, run(ref0, PROMPT, 0, lambda x: x), rtol=0, atol=1e-4)
    cache = dev0.cache_take(0, len(PROMPT))
    dev0.close()
    assert dev_mem.heap_used == before
    ref1, dev1, _ = _shard_models(models["Q4_0"], share(1))
    assert dev1.nf != dev0.nf and dev1.nv != dev0.nv
    dev1.cache_put(0, cache)  # heads rank 1 does not hold are left out
    b = run(dev1, PROMPT, 0, lambda x: x)
    np.testing.assert_allclose(b, run(ref1, PROMPT, 0, lambda x: x), rtol=0, atol=1e-4)
    dev1.close()
    assert {j for _, j in cache} == set(plan[0].kv)


@needs_device
def test_a_device_whose_memory_the_host_cannot_map(monkeypatch, models):
    """Discrete GPUs without a host-visible window on all their memory: weights, the cache and the embeddings go
    through staging copies, and decode runs RMSNorm as a pass of its own; same tokens."""
    expected = engine(models["Q8_0"], "numpy").run()["tokens"]
    monkeypatch.setattr(BACKEND.dev, "direct", False)
    e = engine(models["Q8_0"], "vulkan")
    model = e.state.model
    assert model.kcache[0].view is None and model.w.layers[0].wq.parts[0].w.view is None
    assert e.run()["tokens"] == expected
    cache = model.cache_take(0, 4)
    model.cache_put(0, {key: (k, v[::-1].copy()) for key, (k, v) in cache.items()})
    for key, (k, v) in model.cache_take(0, 4).items():
        np.testing.assert_array_equal(k, cache[key][0])
        np.testing.assert_array_equal(v, cache[key][1][::-1])
    model.close()


@needs_device
def test_the_kernel_statistics_script_reports_them_or_says_why_not():
    """scripts/vk_kernel_stats.py: a kernel that does not exist is one line; a kernel's statistics where the driver
    gives them, else one line naming the extension the device lacks (lavapipe)."""
    from spmd.backends.vk_runtime import KERNELS
    script = [sys.executable, str(Path(__file__).parents[1] / "scripts" / "vk_kernel_stats.py")]
    bad = subprocess.run(script + ["nosuch:1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.splitlines() == [f"nosuch:1: no kernel {KERNELS}/nosuch.spv"]
    got = subprocess.run(script + ["matvec_q4_0_f32:16,0,1,4"], capture_output=True, text=True, timeout=120)
    if got.returncode == 0:
        line = next(x for x in got.stdout.splitlines() if "matvec_q4_0_f32:16,0,1,4" in x)
        assert re.search(r"[A-Za-z][^;]* -?[0-9]", line.split("16,0,1,4", 1)[1])  # a statistic and its value
    else:
        assert got.returncode == 1 and len(got.stderr.splitlines()) == 1
        assert got.stderr.strip().endswith("(it lacks VK_KHR_pipeline_executable_properties)")


# ---- errors ---------------------------------------------------------------------------------------------------
def test_no_loader_names_the_package_to_install(monkeypatch):
    import builtins

    from spmd.backends import vk_runtime
    real = builtins.__import__

    def no_libvulkan(name, *a, **kw):
        if name == "vulkan":
            raise OSError("cannot load library 'libvulkan.so.1'")
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_libvulkan)
    with pytest.raises(UserError, match=r"apt-get install libvulkan1 mesa-vulkan-drivers") as e:
        vk_runtime._import_vulkan()
    assert "\n" not in str(e.value)


@needs_device
def test_no_device_names_the_driver_to_install(monkeypatch):
    import vulkan

    from spmd.backends import vk_runtime
    monkeypatch.setattr(vulkan, "vkEnumeratePhysicalDevices", lambda _instance: [])
    for name in vk_runtime.DRIVER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match=r"^no Vulkan device found: apt-get install .*mesa-vulkan-drivers"):
        vk_runtime.Device(0)


def test_a_driver_list_that_finds_nothing_is_named(tmp_path):
    """VK_DRIVER_FILES naming a file that is not a driver: the loader finds no device, and installing packages
    would not help."""
    env = {name: value for name, value in os.environ.items() if name != "VK_ICD_FILENAMES"}
    env["VK_DRIVER_FILES"] = str(tmp_path / "none.json")
    run = subprocess.run([sys.executable, "-m", "spmd.run", "--backend", "vulkan", "--steps", "2", "--prompt", "a",
                          "--control-socket", "none"], capture_output=True, text=True, env=env, timeout=120)
    if "libvulkan.so.1" in run.stderr:
        pytest.skip("no Vulkan loader")
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == (f"error: no Vulkan device found: VK_DRIVER_FILES={tmp_path / 'none.json'} names no "
                          "driver that works here (unset it to let the loader search)\n")


@needs_device
def test_a_missing_spv_names_the_build_script(monkeypatch, tmp_path):
    from spmd.backends import vk_runtime
    monkeypatch.setattr(vk_runtime, "KERNELS", tmp_path)
    with pytest.raises(UserError, match=r"matvec_q4_0_f32.spv is missing: bash scripts/build_kernels.sh"):
        BACKEND.dev.pipeline("matvec_q4_0_f32", 6, 48, (64, 0))


@needs_device
def test_too_little_device_memory_says_how_much_and_what_to_do(monkeypatch, models):
    dev = BACKEND.dev
    monkeypatch.setattr(dev, "heap_size", [used + (1 << 16) for used in dev.heap_used])
    with pytest.raises(UserError, match=r"need \d+ MiB or more of device memory .* MiB free .*lower this rank's "
                                        r"ratio") as e:
        engine(models["Q8_0"], "vulkan")
    assert "\n" not in str(e.value)


@needs_device
def test_description_names_the_device_and_a_wrapping_index_picks_one():
    assert BACKEND.description == f"vulkan ({BACKEND.dev.name})"
    assert get_backend("vulkan", device=64, wrap=True).dev.name  # 64 % count: the default per-rank choice
    with pytest.raises(UserError, match="--gpu 64: this host has"):
        get_backend("vulkan", device=64)  # an index the user gave
    assert get_backend("cpu", threads=1).description == "cpu (numba, 1 thread)"
    assert json.dumps(get_backend("numpy").description)


# ---- a greedy decode chained on the device (VulkanModel.ahead) ------------------------------------------------
def _chains(monkeypatch, chain_s=1e9, segments=None):
    """The k of every chained decode (`VulkanModel.ahead`) run from now on (and its segments into the list
    `segments` where given), with the driver's time a chain may take (CHAIN_S) set to `chain_s` (default: any, so
    that the chains' lengths do not depend on the machine's speed)."""
    from spmd import driver
    monkeypatch.setattr(driver, "CHAIN_S", chain_s)
    calls, real, segments = [], vulkan_model.VulkanModel.ahead, [] if segments is None else segments
    monkeypatch.setattr(vulkan_model.VulkanModel, "ahead", lambda self, tokens, segs, k, n_known: (
        calls.append(k), segments.append(segs), real(self, tokens, segs, k, n_known))[2])
    return calls


@needs_device
@pytest.mark.parametrize("case,activations", [("F32", "f32"), ("Q8_0", "f32"), ("Q4_0", "f32"), ("F16", "f32"),
                                              ("qwen2", "f32"), ("qwen3", "f32"), ("Q4_K_M", "f32"),
                                              ("Q5_K_M", "f32"), ("Q4_0", "int8"), ("qwen3", "int8")])
def test_a_greedy_decode_chained_on_the_device_gives_the_tokens_of_a_step_a_token(models, case, activations,
                                                                                  monkeypatch):
    """One rank, greedy: the decode runs in chains (the token embedded, the model, the argmax, the next token's
    embedding, all on the device): one token first (how long a token takes is not known yet), then chains of
    SPMD_VK_AHEAD tokens, then what the sequence has left; its tokens are those of one step a token
    (SPMD_VK_AHEAD=0) and the numpy reference's."""
    monkeypatch.setenv("SPMD_VK_AHEAD", "0")
    calls = _chains(monkeypatch)
    plain = engine(models[case], "vulkan", activations=activations).run()["tokens"]
    assert calls == [] and len(plain) == 12
    if activations == "f32":
        assert plain == engine(models[case], "numpy").run()["tokens"]
    for most in (8, 5):
        monkeypatch.setenv("SPMD_VK_AHEAD", str(most))
        assert engine(models[case], "vulkan", activations=activations).run()["tokens"] == plain
        left = len(plain) - 2  # (the first token comes from the prompt's logits, the second from a chain of 1)
        assert calls == [1] + [min(most, left - done) for done in range(0, left, most)]
        calls.clear()


@needs_device
def test_a_sampled_decode_is_not_chained(models, monkeypatch):
    """Sampling (temperature > 0) needs the logits on the host: a step a token, as before."""
    calls = _chains(monkeypatch)
    sampled = dict(temperature=0.8, seed=3)
    assert engine(models["Q8_0"], "vulkan", **sampled).run()["tokens"] == \
        engine(models["Q8_0"], "numpy", **sampled).run()["tokens"]
    assert calls == []


@needs_device
def test_non_finite_logits_in_a_chain_stop_generation_at_the_same_position(models, tmp_path, monkeypatch):
    """A token whose embedding row is NaN makes the logits after it NaN: chained or not, generation stops with the
    same one-line error naming that position (the chain's argmax says which of its tokens' logits were not
    finite), and the tokens before it were the same."""
    monkeypatch.setenv("SPMD_VK_AHEAD", "0")
    plain = engine(models["F32"], "vulkan").run()["tokens"]
    at = next(i for i, t in enumerate(plain) if i >= 3 and t not in PROMPT and t not in plain[:i])
    f = GGUFFile(models["F32"])
    info, dim = f.info("token_embd.weight"), f.info("token_embd.weight").shape[1]
    data = bytearray(Path(models["F32"]).read_bytes())
    start = info.offset + plain[at] * dim * 4
    data[start:start + dim * 4] = np.full(dim, np.nan, np.float32).tobytes()
    path = tmp_path / "nan-row.gguf"
    path.write_bytes(bytes(data))
    position = len(PROMPT) + at  # where the NaN row is the input
    calls = _chains(monkeypatch)
    for most in ("0", "8"):
        monkeypatch.setenv("SPMD_VK_AHEAD", most)
        with pytest.raises(UserError, match=f"logits for sequence 0 at position {position} are not finite .*: its "
                           "weights or metadata hold invalid values; or a prompt's activations passed float16's "
                           r"largest \(65504\) on a GPU's matrix units: SPMD_VK_COOP=0 keeps them in float32$"):
            engine(path, "vulkan").run()
    assert calls[0] == 1 and max(calls) == 8


def _argmax(values, n, at=0):
    """kernels/argmax_f32 over each row of `values` (ids 0..n-1) as step `at` of a chain of 2 steps (each row's
    count of steps taken set to `at`): per row (its next token, its token of the step, its finite flag), and the row
    table after it (row r at position 9 + r before)."""
    import struct
    from spmd.backends.vk_runtime import Buffer, Recording
    dev, values = BACKEND.dev, np.atleast_2d(np.asarray(values, np.float32))
    rows_n, size = values.shape
    logits, chain = Buffer(dev, values.nbytes, "host"), Buffer(dev, 4 * rows_n * 6, "host")
    rows = Buffer(dev, 16 * rows_n, "host")
    logits.write(values)
    chain.write(np.r_[np.zeros(rows_n, np.uint32), np.full(rows_n, at, np.uint32), np.zeros(rows_n * 4, np.uint32)])
    rows.write(np.array([[9 + r, 9 + r, r, 40] for r in range(rows_n)], np.uint32))
    rec = Recording(dev)
    rec.dispatch(dev.pipeline("argmax_f32", 3, 16, (vulkan_model.ARGMAX_WG,)),
                 [(b, 0, b.nbytes) for b in (logits, chain, rows)], struct.pack("<4I", n, 2, rows_n, size),
                 (rows_n, 1, 1))
    rec.barrier(to_host=True)
    rec.end()
    rec.run()
    words = chain.array(np.uint32, (rows_n * 6,)).copy()
    steps = words[2 * rows_n:].reshape(2, rows_n, 2)
    kept = steps[at].tolist() if at < 2 else [(None, None)] * rows_n  # (a step past the chain's 2 keeps none)
    out = [(int(words[r]), *kept[r]) for r in range(rows_n)], rows.array(np.uint32, (rows_n, 4)).copy()
    assert not steps[[s for s in range(2) if s != at]].any()  # (the other steps' words untouched)
    assert words[rows_n:2 * rows_n].tolist() == [at + 1] * rows_n  # (each row's count moved on)
    rec.free()
    for b in (logits, chain, rows):
        b.free()
    return out


@needs_device
def test_the_device_argmax_picks_as_the_greedy_sampler_does():
    """Per row, the first of equal maxima among ids below n (spmd.sampling's greedy rule), a flag for non-finite
    logits as the step path has it, and the row's place in the row table moved on one position."""
    from spmd.sampling import Sampler
    rng = np.random.default_rng(4)
    greedy = Sampler()
    for size, n, ties, rows_n in ((50000, 50000, True, 1), (50000, 50000, False, 3), (3000, 2999, True, 2),
                                  (7, 7, True, 1), (1, 1, False, 2)):
        values = rng.standard_normal((rows_n, size)).astype(np.float32)
        if ties:
            values[0, [n // 2, n - 1]] = 9.0  # equal maxima: the lower id wins
        values[:, n:] = 20.0  # beyond n: never chosen
        picks = [greedy.pick(v[:n], np.arange(n)) for v in values]
        for at in (0, 1, 2):
            out, rows = _argmax(values, n, at)
            assert out == [(t, t, 1) if at < 2 else (t, None, None) for t in picks]
            assert rows.tolist() == [[10 + r, 10 + r, r, 40] for r in range(rows_n)]
    cases = ((np.nan, 5, 0), (np.inf, 7, 0), (-np.inf, 99, 1), (-np.inf, slice(None), 0), (np.nan, 150, 1),
             (0.0, 0, 1))  # (150: past n, not looked at)
    values = np.zeros((len(cases), 200), np.float32)
    for row, (bad, where, _) in zip(values, cases):
        row[where] = bad
    out, _ = _argmax(values, 100)
    # the step path: the greedy candidate (np.argmax: the first NaN where there is one) must be finite
    assert [finite for _, _, finite in out] == [ok for _, _, ok in cases] == \
        [int(np.isfinite(v[:100][np.argmax(v[:100])])) for v in values]


@needs_device
def test_a_chain_past_its_slot_is_refused(models):
    ref, dev, cfg = _shard_models(models["Q8_0"], _whole, max_seq=20)
    run(dev, PROMPT, 0)
    with pytest.raises(ValueError):
        dev.ahead([5], [Segment(0, len(PROMPT), 1)], 8, cfg.vocab)  # positions 13..20: past the 20 open
    with pytest.raises(ValueError):  # slot 1 is not open
        dev.ahead([5, 6], [Segment(0, len(PROMPT), 1), Segment(1, 3, 1)], 2, cfg.vocab)
    assert dev.ahead([5], [Segment(0, len(PROMPT), 1)], 7, cfg.vocab)[1] == [[True]] * 7
    dev.close()


@needs_device
@pytest.mark.parametrize("case,activations", [("F32", "f32"), ("Q4_0", "f32"), ("Q4_0", "int8"), ("qwen3", "f32"),
                                              ("Q4_K_M", "f32"), ("Q5_K_M", "f32"), ("Q5_K_M", "int8"),
                                              ("Q6_K", "f32"), ("Q4_1", "f32"), ("Q5_0", "f32"), ("Q5_1", "f32"),
                                              ("BF16", "f32"), ("Q3_K_M", "f32"), ("Q3_K_M", "int8"),
                                              ("Q2_K", "f32"), ("IQ4_NL", "f32"), ("IQ4_NL", "int8")])
def test_a_chained_token_has_the_logits_of_a_step_to_the_bit(models, case, activations, monkeypatch, tmp_path):
    """The chain's input step (the embedding row dequantised on the device, kernels/embed_<w> for every type kept
    as it is, the first RMSNorm's input and sum of squares) makes the same bits as the host's lookup and
    kernels/prenorm_f32: the logits of a chain's last token equal, bit for bit, those of the same token decoded a
    step at a time."""
    monkeypatch.setattr(BACKEND, "int8", activations == "int8")
    path = models.get(case)
    if path is None:  # a file of one type, its token_embd too
        path = write_model(tmp_path / f"{case}.gguf", K_LLAMA if case == "Q6_K" else LLAMA, qtype=case, seed=7)
        assert GGUFFile(path).info("token_embd.weight").qtype.name == case
    ref, dev, cfg = _shard_models(path, _whole)
    token = int(np.argmax(run(dev, PROMPT, 0)[0]))
    first, pos = token, len(PROMPT)
    for i in range(5):
        logits = run(dev, (token,), pos + i)[0]
        token = int(np.argmax(logits))
    ref, chained, _ = _shard_models(path, _whole)
    run(chained, PROMPT, 0)
    tokens, finite = chained.ahead([first], [Segment(0, pos, 1)], 5, cfg.vocab)
    assert tokens[-1] == [token] and finite == [[True]] * 5
    acts = chained._chains[1, False, cfg.vocab][0]
    last = chained.dev.read(acts.logits, 0, cfg.vocab * 4).view(np.float32)
    assert np.array_equal(last, logits)
    dev.close()
    chained.close()


@needs_device
def test_an_embedding_over_the_storage_buffer_range_is_not_chained(models, monkeypatch):
    """token_embd in row chunks (over maxStorageBufferRange) has no one buffer for kernels/embed_<w> to read: the
    model offers no chained decode, and keeps no copy of it."""
    monkeypatch.setattr(BACKEND.dev, "max_range", 40000)  # token_embd (and output): 64 KiB; the rest fits
    ref, dev, cfg = _shard_models(models["Q8_0"], _whole)
    assert len(dev.w.output.parts) > 1 and dev.ahead_tokens() == 0 and dev.embedding is None
    monkeypatch.undo()
    ref, whole, cfg = _shard_models(models["Q8_0"], _whole)
    assert whole.ahead_tokens() == vulkan.AHEAD_TOKENS and len(whole.embedding.parts) == 1
    dev.close()
    whole.close()


@needs_device
def test_a_chain_stops_where_the_attention_starts_to_split(models, monkeypatch):
    """A decode step from SPLIT_FROM - 1 on attends in splits: a chain that would cross it gives back only the
    tokens before it, and the next chain runs split, so every token's logits are a step a token's to the bit."""
    monkeypatch.setattr(vulkan_model, "SPLIT_FROM", 17)
    monkeypatch.setattr(BACKEND, "split_keys", 8)
    steps = []
    ref, dev, cfg = _shard_models(models["Q8_0"], _whole)
    token = first = int(np.argmax(run(dev, PROMPT, 0)[0]))
    for pos in range(13, 21):
        logits = run(dev, (token,), pos)[0]
        token = int(np.argmax(logits))
        steps.append(token)
    ref, chained, _ = _shard_models(models["Q8_0"], _whole)
    assert chained.splits > 1
    run(chained, PROMPT, 0)
    got, done, token = [], 0, first
    while done < 8:
        tokens, _ = chained.ahead([token], [Segment(0, 13 + done, 1)], 8 - done, cfg.vocab)
        got.append([t for t, in tokens])
        done, token = done + len(tokens), tokens[-1][0]
    assert [len(t) for t in got] == [3, 5]  # positions 13-15, then 16-20 in splits
    assert sum(got, []) == steps
    last = chained.dev.read(chained._chains[1, True, cfg.vocab][0].logits, 0, cfg.vocab * 4).view(np.float32)
    assert np.array_equal(last, logits)
    dev.close()
    chained.close()


@needs_device
def test_eos_or_a_one_token_prompt_in_a_chained_decode(models, monkeypatch, tmp_path):
    """EOS inside a chain ends the sequence there, as a step a token would (the tokens after it are dropped); a
    one-token prompt is a prefill, not a chain (its first token comes from it alone)."""
    monkeypatch.setenv("SPMD_VK_AHEAD", "0")
    plain = engine(models["Q4_0"], "vulkan").run()
    eos = plain["tokens"][5]
    assert eos not in plain["tokens"][:5]
    results = []
    for most in ("0", "8"):
        monkeypatch.setenv("SPMD_VK_AHEAD", most)
        e = engine(models["Q4_0"], "vulkan")
        e.state.tokenizer.eos_ids = {eos}
        results.append(e.run())
    assert [r["tokens"] for r in results] == [plain["tokens"][:5]] * 2
    assert [r["finish"] for r in results] == ["eos", "eos"]
    calls = _chains(monkeypatch)
    opts = RunOptions(model=str(models["Q4_0"]), prompts=(PromptSpec(ids=(1,)),), steps=12, backend="vulkan")
    one = Engine(opts, Comm(comm=MPI.COMM_SELF), log=lambda _m: None).run()
    monkeypatch.setenv("SPMD_VK_AHEAD", "0")
    assert one["tokens"] == Engine(opts, Comm(comm=MPI.COMM_SELF), log=lambda _m: None).run()["tokens"]
    assert calls == [8, 3]  # the prefill alone (a pass of one token, timed as one), then 11 tokens chained


@needs_device
def test_the_embedding_copy_is_counted_in_what_a_rank_keeps(models):
    """--memory-limit's accounting (RankState.memory_needs) counts the token_embd copy a one-rank vulkan model
    keeps for its chained decode, with the bytes it holds; the cpu backend keeps none."""
    e = engine(models["Q4_0"], "vulkan")
    parts, _ = e.state.memory_needs(e.state.share)
    held = e.state.model.embedding.nbytes
    assert parts["token_embd on the device"] == held > 0
    e = engine(models["Q4_0"], "cpu")
    assert e.state.memory_needs(e.state.share)[0]["token_embd on the device"] == 0


@needs_device
def test_a_chain_takes_as_many_tokens_as_fit_in_its_time(models, monkeypatch):
    """The driver sizes each chain by the last decode's time a token (Executor.last_decode_s) so that its text
    streams at least every CHAIN_S: with no time to spare a token a chain (a slow GPU), with a chain's time of
    3.5 tokens 3 a chain; the tokens are the same."""
    from spmd import driver
    plain = engine(models["Q8_0"], "vulkan").run()["tokens"]
    calls = _chains(monkeypatch, chain_s=0.0)
    assert engine(models["Q8_0"], "vulkan").run()["tokens"] == plain and calls == [1] * 11
    calls.clear()
    monkeypatch.setattr(driver, "CHAIN_S", 3.5)
    monkeypatch.setattr(Executor, "last_decode_s", property(lambda self: 1.0 if self._recent else None))
    assert engine(models["Q8_0"], "vulkan").run()["tokens"] == plain and calls == [1, 3, 3, 3, 1]


def _several(path, monkeypatch, most, prompts, eos=None):
    """The sequences of a vulkan run of `prompts` (12 steps unless they say, 3 in flight), SPMD_VK_AHEAD=most,
    with the tokenizer's EOS ids `eos` where given."""
    monkeypatch.setenv("SPMD_VK_AHEAD", str(most))
    opts = RunOptions(model=str(path), prompts=prompts, steps=12, backend="vulkan", sequences=3)
    e = Engine(opts, Comm(comm=MPI.COMM_SELF), log=lambda _m: None)
    if eos is not None:
        e.state.tokenizer.eos_ids = eos
    return e.run()


@needs_device
def test_several_sequences_decode_chained_as_a_step_a_token(models, monkeypatch):
    """Several greedy sequences in flight decode in chains of steps of all of them (each row embedded, decoded and
    chosen on the device): the same tokens as a step at a time, each sequence ending where it would (its own steps,
    EOS), the others going on; a sampled sequence among them keeps the batch a step at a time."""
    prompts = (PromptSpec(ids=PROMPT), PromptSpec(ids=PROMPT[:5], steps=7), PromptSpec(ids=PROMPT[3:]))
    plain = [s["tokens"] for s in _several(models["Q8_0"], monkeypatch, 0, prompts)["sequences"]]
    assert [len(t) for t in plain] == [12, 7, 12]
    calls = _chains(monkeypatch)
    got = _several(models["Q8_0"], monkeypatch, 8, prompts)
    assert [s["tokens"] for s in got["sequences"]] == plain and calls and max(calls) > 1
    assert sum(calls) < sum(len(t) for t in plain)  # (chains of the three rows, not one a sequence)
    # EOS: the second sequence's 4th token ends it there, in the step at its position 5 + 3 - 1 = 7, when the
    # others are at 15 and 12: the chain's later steps are dropped (a step of its own would have had two rows), and
    # the next chain starts from there
    segs = []
    calls = _chains(monkeypatch, segments=segs)
    ended = _several(models["Q8_0"], monkeypatch, 8, prompts, eos={plain[1][3]})["sequences"]
    assert ended[1]["tokens"] == plain[1][:3] and ended[1]["finish"] == "eos"
    after = next(i for i, s in enumerate(segs) if len(s) == 2)
    assert any(seg.pos <= 7 < seg.pos + calls[after - 1] for seg in segs[after - 1] if seg.pos < 13)
    assert [seg.pos for seg in segs[after]] == [16, 13]
    stepped = _several(models["Q8_0"], monkeypatch, 0, prompts, eos={plain[1][3]})["sequences"]
    assert [(s["tokens"], s["finish"]) for s in ended] == [(s["tokens"], s["finish"]) for s in stepped]
    for seq, tokens in zip(ended, plain):  # the others: up to their own first EOS, if any
        cut = tokens.index(plain[1][3]) if plain[1][3] in tokens else len(tokens)
        assert seq["tokens"] == tokens[:cut]
    calls.clear()
    mixed = prompts[:2] + (PromptSpec(ids=PROMPT[3:], temperature=0.7, seed=1),)
    sampled = _several(models["Q8_0"], monkeypatch, 0, mixed)["sequences"]
    assert [s["tokens"] for s in _several(models["Q8_0"], monkeypatch, 8, mixed)["sequences"]] == \
        [s["tokens"] for s in sampled]
    assert calls == []  # (every step holds the sampled one until it ends, and it ends last)


@needs_device
@pytest.mark.parametrize("case", ["Q4_0", "qwen3"])
def test_a_chained_step_of_two_sequences_has_their_logits_to_the_bit(models, case):
    """Two sequences at different positions chained together: each row's logits after 4 steps equal, bit for bit,
    those of the same rows decoded a step at a time (several rows: the RMSNorm passes, not the fused decode)."""
    ref, dev, cfg = _shard_models(models[case], _whole, slots=2)
    _, chained, _ = _shard_models(models[case], _whole, slots=2)
    prompts = [(0, 0, PROMPT), (1, 0, PROMPT[:6])]
    for m in (dev, chained):
        m.open(1, cfg.context)
        first = [int(np.argmax(row)) for row in step([m], prompts)]
    tokens = list(first)
    for i in range(4):
        logits = step([dev], [(0, len(PROMPT) + i, (tokens[0],)), (1, 6 + i, (tokens[1],))])
        tokens = [int(np.argmax(row)) for row in logits]
    got, finite = chained.ahead(first, [Segment(0, len(PROMPT), 1), Segment(1, 6, 1)], 4, cfg.vocab)
    assert got[-1] == tokens and finite == [[True, True]] * 4
    last = chained.dev.read(chained._chains[2, False, cfg.vocab][0].logits, 0, 2 * cfg.vocab * 4)
    assert np.array_equal(last.view(np.float32).reshape(2, -1), logits)
    dev.close()
    chained.close()


def test_the_devices_memory_is_its_largest_device_local_heap_not_the_hosts(monkeypatch):
    """A 24 GiB GPU on a host of 64 GiB (the host's memory, a heap the GPU can use, is the larger): what a Vulkan
    rank reports as its device's memory (the planner and --memory-limit's checks) is the GPU's heap; the host's
    stays the window's host pool's ("pool" memory: host-visible, not device-local)."""
    from types import SimpleNamespace

    from spmd.backends import vk_runtime
    vk = vk_runtime.vk
    dl, hv, hc = (vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT,
                  vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT)
    types = [SimpleNamespace(propertyFlags=f, heapIndex=h) for f, h in ((dl, 0), (hv | hc, 1), (dl | hv | hc, 0))]
    heaps = [SimpleNamespace(size=24 << 30), SimpleNamespace(size=64 << 30)]
    monkeypatch.setattr(vk, "vkGetPhysicalDeviceMemoryProperties", lambda physical: SimpleNamespace(
        memoryTypeCount=3, memoryTypes=types, memoryHeapCount=2, memoryHeaps=heaps))
    dev = vk_runtime.Device.__new__(vk_runtime.Device)
    dev.physical = None
    dev._memory_types()
    dev.heap_used[0] = 4 << 30
    backend = vulkan.VulkanBackend.__new__(vulkan.VulkanBackend)
    backend.dev = SimpleNamespace(is_cpu=False, main_heap=dev.main_heap, heap_size=dev.heap_size,
                                  heap_used=dev.heap_used)
    assert backend.device_memory_bytes() == 20 << 30
    assert dev.memory_type(0b111, "pool") == 1 and dev.memory_type(0b111, "device") == 2  # (direct: mapped)

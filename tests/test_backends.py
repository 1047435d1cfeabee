"""Backends: numpy reference against gguf's dequantisation, cpu kernels against the reference (within float32
rounding, for every type), `out=`, and the bit-exact invariances the multi-rank engine relies on."""
import os
import subprocess
import sys
import time
import tracemalloc

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gguf_quants

from spmd.backends import cpu, get_backend
from spmd.backends.cpu import CpuBackend
from spmd.backends.numpy_ref import NumpyBackend
from spmd.errors import UserError
from spmd.quants import F16_FIELDS, QTensor, block_size, dequantize, quantize, row_bytes, unpack

TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
         T.IQ4_NL)
QUANTISED = TYPES[3:]
NAMES = [t.name for t in TYPES]
SHAPES = ((1, 32), (37, 96), (300, 544), (20, 4160), (0, 64))  # one block; odd rows; cols % 128 != 0; long; none
# float16 scales: normal, negative, subnormal (2^-20, -2^-24), zero
SCALES = np.array([0.01, -0.02, 0.5, -1.0, 2.0 ** -20, -(2.0 ** -24), 0.0, 1e-3], np.float16)


def whole_blocks(qtype, cols):
    """`cols` rounded up to the type's block (K-quants: 256): the test shapes made valid for every type."""
    return -(-cols // block_size(qtype)) * block_size(qtype)


def random_qtensor(qtype, rows, cols, rng, raw=True) -> QTensor:
    """Random weights, `cols` rounded up to whole blocks; quantised types as raw blocks (every byte value, float16
    scales and mins from SCALES)."""
    cols = whole_blocks(qtype, cols)
    if block_size(qtype) > 1 and raw:
        elems, size = GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, (rows, cols // elems, size), dtype=np.uint8)
        for at in F16_FIELDS[qtype]:
            data[:, :, at:at + 2] = rng.choice(SCALES, (rows, cols // elems, 1)).view(np.uint8)
        return QTensor(qtype, rows, cols, data.reshape(rows, row_bytes(qtype, cols)))
    return quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)


def activations(n, cols, rng):
    x = rng.standard_normal((n, cols)).astype(np.float32)
    if cols >= 64:
        x[0, 32:64] = 0.0  # an all-zero block (activation scale 0)
        x[-1, :32] *= 1e4
    return x


def tolerance(w, x):
    """Per-element bound on |cpu - reference| for every type: float32 summation order (activations stay float32,
    quantised weights are converted exactly)."""
    aw = np.abs(NumpyBackend().linear(w).w).astype(np.float64)  # (rows, cols) dequantised
    return 1e-5 * (np.abs(x) @ aw.T) + 1e-30


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


# ---- the interface --------------------------------------------------------------------------------------------
def test_get_backend_by_name():
    assert get_backend("numpy").name == "numpy" and get_backend("cpu").name == "cpu"
    with pytest.raises(UserError) as e:
        get_backend("tpu")
    assert "tpu" in str(e.value) and "\n" not in str(e.value)


# ---- numpy reference against gguf -----------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", TYPES[1:], ids=NAMES[1:])
def test_dequantize_matches_gguf(qtype):
    rng = np.random.default_rng(1)
    rows, cols = 23, 256
    if qtype in QUANTISED:
        w = random_qtensor(qtype, rows, cols, rng)
    else:  # every bit pattern except inf/nan: subnormals, negatives, both zeros
        raw = rng.integers(0, 1 << 16, (rows, cols), dtype=np.uint16)
        exp_mask = 0x7C00 if qtype == T.F16 else 0x7F80
        raw[(raw & exp_mask) == exp_mask] &= 0x83FF if qtype == T.F16 else 0x807F
        raw[0, :4] = [0x0000, 0x8000, 0x0001, 0x8001]
        w = QTensor(qtype, rows, cols, raw.view(np.float16) if qtype == T.F16 else raw)
    ours = dequantize(w)
    theirs = gguf_quants.dequantize(w.data.view(np.uint8), qtype).reshape(rows, cols)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(bits(ours), bits(theirs.astype(np.float32)))


@pytest.mark.parametrize("qtype", [T.Q3_K, T.IQ4_NL], ids=["Q3_K", "IQ4_NL"])
def test_quantize_writes_blocks_gguf_reads_as_spmd_does(qtype):
    """quantize writes blocks of Q3_K and IQ4_NL (synth's Q3_K_M and IQ4_NL files) that gguf reads back as spmd
    does, within the error of 3 and 4 bits."""
    rng = np.random.default_rng(3)
    rows, cols = 37, 512
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    q = quantize(w, qtype)
    back = gguf_quants.dequantize(q.data, qtype).astype(np.float32)
    np.testing.assert_array_equal(bits(back), bits(dequantize(q)))
    assert np.abs(back - w).mean() < (0.2 if qtype == T.Q3_K else 0.1) * np.abs(w).mean()


@pytest.mark.parametrize("qtype", TYPES, ids=NAMES)
def test_numpy_reference_is_the_gguf_product(qtype):
    rng = np.random.default_rng(2)
    w = random_qtensor(qtype, 40, 128, rng)
    x = activations(3, w.cols, rng)
    w_gguf = gguf_quants.dequantize(w.data.view(np.uint8), qtype).reshape(40, w.cols).astype(np.float32)
    np.testing.assert_allclose(NumpyBackend().linear(w)(x), x @ w_gguf.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", [NumpyBackend(), CpuBackend(), CpuBackend(activations="int8")],
                         ids=["numpy", "cpu", "cpu int8"])
@pytest.mark.parametrize("qtype", TYPES, ids=NAMES)
def test_empty_shard_gives_zeros(backend, qtype):
    rng = np.random.default_rng(3)
    no_rows = backend.linear(random_qtensor(qtype, 0, 64, rng))
    assert no_rows(activations(2, no_rows.cols, rng)).shape == (2, 0)
    no_cols = backend.linear(QTensor(qtype, 3, 0, np.zeros((3, 0), random_qtensor(qtype, 1, 32, rng).data.dtype)))
    out = np.full((2, 3), np.nan, np.float32)
    assert no_cols(np.zeros((2, 0), np.float32), out=out) is out and not out.any()


# ---- cpu kernels against the reference ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("qtype", TYPES, ids=NAMES)
def test_cpu_matches_reference(qtype, shape, n):
    rng = np.random.default_rng(4)
    w = random_qtensor(qtype, *shape, rng)
    x = activations(n, w.cols, rng)
    ref = NumpyBackend().linear(w)(x)
    lin = CpuBackend().linear(w)
    assert (lin.rows, lin.cols) == (w.rows, w.cols) and lin.nbytes >= w.nbytes  # more only by padding
    got = lin(x)
    assert got.shape == (n, w.rows) and got.dtype == np.float32
    assert np.all(np.abs(got - ref) <= tolerance(w, x))


@pytest.mark.parametrize("qtype", QUANTISED, ids=NAMES[3:])
def test_cpu_holds_about_the_file_bytes(qtype):
    """Kept quantised, not widened: rows of whole groups take the file's bytes, Q4_K / Q5_K 3% more at most (their
    6-bit scales held as bytes); Q2_K's and Q3_K's integers are held as nibbles (each 256 weights: 128 bytes, a byte
    for each of the 16 sub-block scales and Q2_K's 16 mins, and the float16 d and dmin: Q2_K 164 for the file's 84,
    Q3_K 146 for 110)."""
    w = random_qtensor(qtype, 8, 4096, np.random.default_rng(9))
    nibbles = {T.Q2_K: 128 + 16 + 16 + 4, T.Q3_K: 128 + 16 + 2}
    held = CpuBackend().linear(w).nbytes
    if qtype in nibbles:
        assert held == 8 * 4096 // 256 * nibbles[qtype]
    else:
        assert w.nbytes <= held <= 1.03 * w.nbytes


@pytest.mark.parametrize("qtype", QUANTISED, ids=NAMES[3:])
def test_quantised_weights_keep_float_activations(qtype):
    """Gaussian data: the error against the reference is float32 rounding (relative RMS ~3e-7), and activations
    moved by ~1e-5 (relative) move the output by no more than the weights times that move: no int8 rounding of
    the activations, whose steps (1/254 of a block's largest activation) made multi-rank output differ."""
    rng = np.random.default_rng(5)
    w = quantize(rng.standard_normal((512, 2048)).astype(np.float32), qtype)
    x = rng.standard_normal((4, 2048)).astype(np.float32)
    lin = CpuBackend().linear(w)
    ref, got = NumpyBackend().linear(w)(x), lin(x)
    err = got - ref
    assert np.sqrt(np.mean(err ** 2)) < 1e-6 * np.sqrt(np.mean(ref ** 2))
    assert np.abs(err).max() < 2e-6 * np.abs(ref).max()
    x2 = (x * (1 + 1e-5 * rng.standard_normal(x.shape))).astype(np.float32)
    aw = np.abs(NumpyBackend().linear(w).w).astype(np.float64)
    moved = np.abs(x2 - x).astype(np.float64) @ aw.T
    assert np.all(np.abs(lin(x2).astype(np.float64) - got) <= moved + 1e-6 * (np.abs(x) @ aw.T))


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("qtype", TYPES, ids=NAMES)
def test_out_is_filled_without_allocating(qtype, n):
    rng = np.random.default_rng(6)
    w = random_qtensor(qtype, 1024, 1024, rng)
    lin = CpuBackend().linear(w)
    x = activations(n, 1024, rng)
    expect = lin(x)
    out = np.full((n, 1024), np.nan, np.float32)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        got = lin(x, out=out)
        grew = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert got is out
    np.testing.assert_array_equal(bits(out), bits(expect))
    if n == 1:  # the decode path reuses its scratch: no array is allocated (a few hundred bytes of call overhead)
        assert grew < 2048, grew


# ---- the invariances the engine relies on ---------------------------------------------------------------------
@pytest.fixture(params=["serial", "parallel"])
def kernel_backend(request, monkeypatch):
    """The one-thread kernel, or the thread-pool kernel forced onto these small matrices."""
    if request.param == "serial":
        return CpuBackend(threads=1)
    monkeypatch.setattr(cpu, "SMALL", 0)
    return CpuBackend(threads=2)


@pytest.mark.parametrize("cols", [544, 4160], ids=["short", "long"])  # long: x no longer in L1 beside the rows
@pytest.mark.parametrize("qtype", TYPES, ids=NAMES)
def test_row_slices_are_bit_identical(qtype, cols, kernel_backend):
    """A row's result does not depend on which rows the Linear holds, how threads split them, or the batch."""
    rng = np.random.default_rng(7)
    rows = 101
    w = random_qtensor(qtype, rows, cols, rng)
    x = activations(15, w.cols, rng)
    full = CpuBackend(threads=1).linear(w)(x)
    for a, b in ((50, 60), (1, 2), (33, 97), (100, 101), (0, 101)):
        part = kernel_backend.linear(QTensor(qtype, b - a, w.cols, w.data[a:b].copy()))
        np.testing.assert_array_equal(bits(part(x)), bits(full[:, a:b]))
        for i in (0, 4, 9, 13, 14):  # a batch of 15 (8 + 4 + 2 + 1 rows through different tiles) against one row
            np.testing.assert_array_equal(bits(part(x[i:i + 1])), bits(full[i:i + 1, a:b]))
        for n in (2, 3, 6):  # smaller batches: other tiles for the same rows
            np.testing.assert_array_equal(bits(part(x[:n])), bits(full[:n, a:b]))
    if kernel_backend.threads > 1:
        lin = kernel_backend.linear(w)
        numba.set_num_threads(1)
        try:
            one_thread = lin(x)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        np.testing.assert_array_equal(bits(one_thread), bits(full))


def test_quantised_rows_are_held_in_quads():
    """`_interleave`: array row k holds rows 4k..4k+3 unit by unit (their unit 0, then their unit 1, ...); a last
    quad short of rows is filled with zeros."""
    rows, units, unit = 6, 3, 2  # 6 rows of 3 units of 2 bytes
    a = np.arange(1, rows * units * unit + 1, dtype=np.uint8).reshape(rows, units * unit)
    got = cpu._interleave(a, unit)
    expect = np.zeros((2, 4 * units * unit), np.uint8)
    for r in range(rows):
        for u in range(units):
            at = (4 * u + r % 4) * unit
            expect[r // 4, at:at + unit] = a[r, u * unit:(u + 1) * unit]
    np.testing.assert_array_equal(got, expect)


GENERIC_SCRIPT = """
import sys, numpy as np
from gguf import GGMLQuantizationType as T
from spmd.backends import cpu
from spmd.quants import QTensor
assert not cpu.AVX512 and not cpu.VNNI
for name in sys.argv[2:]:
    w, x = np.load(sys.argv[1] + name + ".w.npy"), np.load(sys.argv[1] + name + ".x.npy")
    lin = cpu.CpuBackend(threads=1).linear(QTensor(T[name], w.shape[0], x.shape[1], w))
    np.save(sys.argv[1] + name + ".y.npy", lin(x))
    if T[name] in cpu.INT8:
        lin = cpu.CpuBackend(threads=1, activations="int8").linear(QTensor(T[name], w.shape[0], x.shape[1], w))
        np.save(sys.argv[1] + name + ".fast.npy", lin(x))
        np.save(sys.argv[1] + name + ".exact.npy", lin(x, out=np.empty((x.shape[0], w.shape[0]))))
"""


@pytest.mark.skipif(not cpu.AVX512, reason="no AVX-512 (or SPMD_CPU_GENERIC): the portable kernel is in use")
def test_portable_kernel_is_bit_identical(tmp_path):
    """SPMD_CPU_GENERIC=1 (in a fresh numba cache) gives the plain-LLVM nibble conversion other CPUs get: same bits
    for the 4-bit types that have a vpermps table (IQ4_NL's: a select per entry there; Q8_0 runs the same code either
    way, checked here too)."""
    rng = np.random.default_rng(8)
    names, expect = [], {}
    for qtype in (T.Q4_0, T.Q4_1, T.Q5_1, T.Q4_K, T.Q8_0, T.Q6_K, T.IQ4_NL):
        w = random_qtensor(qtype, 37, 544, rng)
        x = activations(5, w.cols, rng)
        np.save(tmp_path / f"{qtype.name}.w.npy", w.data)
        np.save(tmp_path / f"{qtype.name}.x.npy", x)
        expect[qtype.name + ".y"] = CpuBackend(threads=1).linear(w)(x)
        if qtype in cpu.INT8:  # and the 8-bit kernels without vpdpbusd: plain LLVM integer products
            lin = CpuBackend(threads=1, activations="int8").linear(w)
            expect[qtype.name + ".fast"] = lin(x)
            expect[qtype.name + ".exact"] = lin(x, out=np.empty((x.shape[0], w.rows)))
        names.append(qtype.name)
    env = dict(os.environ, SPMD_CPU_GENERIC="1", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", GENERIC_SCRIPT, str(tmp_path) + "/", *names], env=env, cwd=root,
                   check=True)
    for name, want in expect.items():
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy").view(np.uint8), want.view(np.uint8), name)


def test_the_kernels_cache_follows_both_kernel_files(tmp_path, monkeypatch):
    """numba finds a cached function by its own file's time stamp alone, and cpu_model's kernels are generated with
    cpu.py's code generators: the cache directory is named by both files (and SPMD_CPU_GENERIC), so a change to
    either compiles anew where it had loaded stale machine code; another version's directory goes once it has not
    been used for KEEP_DAYS. (The staleness itself was measured by hand: see spmd/backends/kernel_cache.py.)"""
    from spmd.backends import cpu_model, kernel_cache
    sources = [tmp_path / "cpu.py", tmp_path / "cpu_model.py"]
    for f in sources:
        f.write_text("x = 1\n")
    base = tmp_path / "cache"
    first = kernel_cache.kernel_cache_dir(str(base), sources)
    assert kernel_cache.kernel_cache_dir(str(base), sources) == first and os.path.isdir(first)
    sources[0].write_text("x = 2\n")  # the kernels changed, their callers' file did not
    second = kernel_cache.kernel_cache_dir(str(base), sources)
    assert second != first and os.path.isdir(first)  # a version in use (another checkout's) keeps its own
    with monkeypatch.context() as m:
        m.setenv("SPMD_CPU_GENERIC", "1" if not os.environ.get("SPMD_CPU_GENERIC") else "")
        assert kernel_cache.kernel_cache_dir(str(base), sources) not in (first, second)
    long_ago = time.time() - (kernel_cache.KEEP_DAYS + 1) * 86400
    os.utime(first, (long_ago, long_ago))
    assert kernel_cache.kernel_cache_dir(str(base), sources) == second and not os.path.exists(first)
    blocked = tmp_path / "a-file"  # a place that cannot hold a directory: the user's cache folder instead
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    fallback = kernel_cache.kernel_cache_dir(str(blocked / "cache"), sources)
    assert fallback == str(tmp_path / "xdg" / "spmd" / os.path.basename(second))
    # this process's kernels and steps are cached in the directory named by the real files (numba's own attribute)
    here = numba.config.CACHE_DIR
    assert os.path.basename(here).startswith("kernels-") and here == kernel_cache.kernel_cache_dir(
        os.path.dirname(here))
    for dispatcher in (cpu._row_block, cpu_model._attention_step, cpu_model._ffn_step):
        assert dispatcher._cache._cache_path.startswith(here + os.sep)


@pytest.mark.parametrize("mode", ["f32", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_products_sharing_their_input_give_each_ones_bits(mode, threads, monkeypatch):
    """`cpu.products` (q, k, v; gate, up in one kernel call): each result the bits of its own call, for three or two
    matrices of one type, one or several rows, matrices big enough to split over threads; mixed types (a Q4_K_M
    file's Q6_K v) and a cut slice go one call each, with the same results."""
    rng = np.random.default_rng(15)
    backend = CpuBackend(threads, activations=mode)
    fused, run = [], cpu._fused
    monkeypatch.setattr(cpu, "_fused", lambda pairs, x: fused.append(len(pairs)) or run(pairs, x))
    for types, rows in (((T.Q4_0,) * 3, (600, 37, 64)), ((T.Q4_K,) * 2, (700, 129)), ((T.Q8_0,) * 3, (16, 1, 2)),
                        ((T.Q4_K, T.Q4_K, T.Q6_K), (64, 32, 32)), ((T.F16,) * 2, (33, 40))):
        lins = [backend.linear(random_qtensor(t, r, 512, rng)) for t, r in zip(types, rows)]
        for n in (1, 5):
            x = activations(n, 512, rng)
            outs = [np.full((n, lin.rows), np.nan, np.float32) for lin in lins]
            fused.clear()
            got = cpu.products(lins, x, outs)
            assert all(g is o for g, o in zip(got, outs))
            assert fused == ([2, 1] if types[2:] == (T.Q6_K,) else [len(lins)])  # (a Q6_K v goes alone)
            for lin, out in zip(lins, outs):
                np.testing.assert_array_equal(bits(out), bits(lin(x)))
    cut = QTensor(T.Q4_0, 20, 128, random_qtensor(T.Q4_0, 20, 128, rng).data, keep=((0, 40), (64, 120)))
    lins = [backend.linear(cut), backend.linear(cut)]
    x = activations(3, 96, rng)
    fused.clear()
    outs = cpu.products(lins, x, [np.empty((3, 20), np.float32), np.empty((3, 20), np.float32)])
    assert fused == []
    np.testing.assert_array_equal(bits(outs[1]), bits(lins[1](x)))


@pytest.mark.parametrize("mode", ["f32", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_gate_up_and_silu_in_one_call_give_the_bits_of_the_products_then_silu(mode, threads, monkeypatch):
    """`cpu_model.swiglu` (the FFN's gate and up, then SiLU, in one kernel call: each row block's SiLU while its rows
    are in cache; a decode step's one row) gives the bits of `products` followed by `_silu`, and a bad activation
    (NaN with int8) a NaN row; several rows, a gate and up of two types, or cut slices take that way instead."""
    from spmd.backends import cpu_model
    rng = np.random.default_rng(16)
    backend = CpuBackend(threads, activations=mode)
    calls, products = [], cpu_model.products
    monkeypatch.setattr(cpu_model, "products", lambda *a: calls.append("products") or products(*a))
    cut = [QTensor(T.Q4_0, 20, 128, random_qtensor(T.Q4_0, 20, 128, rng).data, keep=((0, 40), (64, 120)))
           for _ in range(2)]
    for types, rows, cols in (((T.Q4_0, T.Q4_0), 600, 512), ((T.Q4_K, T.Q4_K), 129, 256), ((T.F16, T.F16), 33, 512),
                              ((T.Q4_K, T.Q6_K), 64, 512), (None, 20, 96)):
        if types is None:
            gate, up = (backend.linear(w) for w in cut)
        else:
            gate, up = (backend.linear(random_qtensor(t, rows, cols, rng)) for t in types)
        for n in (1, 5):
            fused = types is not None and types[0] == types[1] and n == 1
            x = activations(n, cols, rng)
            if mode == "int8":
                x[n // 2, 7] = np.nan
            want = cpu_model._silu(*products((gate, up), x, [np.empty((n, rows), np.float32) for _ in "gu"]))
            calls.clear()
            out = [np.full((n, rows), np.nan, np.float32) for _ in "gu"]
            got = cpu_model.swiglu((gate, up), x, out)
            assert got is out[0]
            assert calls == ([] if fused else ["products"])
            np.testing.assert_array_equal(bits(got), bits(want))
            assert np.isnan(got).any(axis=1).tolist() == [mode == "int8" and i == n // 2 for i in range(n)]


def vm_flags(address):
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps), or None."""
    start = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(h, 16) for h in head.split("-"))
                start = lo <= address < hi
            elif head == "VmFlags:" and start:
                return line.split()[1:]
    return None


@pytest.mark.parametrize("mode", ["f32", "int8"])
def test_settling_a_half_puts_its_arrays_together_on_huge_pages_with_the_same_bits(mode, tmp_path):
    """`CpuBackend.settle` (load_shard calls it for each resident half and the classifier) moves the half's arrays
    into one mapping, in turn, each at a 64-byte boundary, with the same bytes, and its products give the same bits;
    the mapping's whole 2 MiB runs are marked for transparent huge pages (VmFlags `hg`) where the kernel has them.
    A loaded model's halves then hold one mapping each; a half kept from an old shard is not moved again."""
    from spmd.config import read_config
    from spmd.gguf_file import GGUFFile
    from spmd.plan import make_plan, parse_layout
    from spmd.synth import Shape, write_model
    from spmd.weights import load_shard
    rng = np.random.default_rng(18)
    backend = CpuBackend(2, activations=mode)
    lins = [backend.linear(random_qtensor(t, r, c, rng)) for t, r, c in
            ((T.Q4_0, 2048, 2048), (T.Q6_K, 300, 512), (T.Q8_0, 1024, 1024), (T.F16, 40, 96))]
    before = [tuple(a.copy() for a in lin.arrays) for lin in lins]
    xs = [activations(3, lin.cols, rng) for lin in lins]
    want = [lin(x) for lin, x in zip(lins, xs)]
    backend.settle(lins)
    moved = [a for lin in lins for a in lin.arrays if a is not cpu._NONE]  # (a type's absent array: shared)
    base = moved[0].base
    while base.base is not None and isinstance(base.base, np.ndarray):
        base = base.base
    first = moved[0].ctypes.data
    at = first
    for a in moved:
        assert np.shares_memory(a, base) and a.ctypes.data == at and a.ctypes.data % 64 == 0
        at += -(-a.nbytes // 64) * 64
    for lin, old in zip(lins, before):
        for a, b in zip(lin.arrays, old):
            np.testing.assert_array_equal(a, b)
    for lin, x, w in zip(lins, xs, want):
        np.testing.assert_array_equal(bits(lin(x)), bits(w))
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(thp) and "[never]" not in open(thp).read():
        run = -(-first // cpu.HUGE) * cpu.HUGE  # the first whole 2 MiB run
        assert run + cpu.HUGE <= at and "hg" in vm_flags(run)
    shape = Shape(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn=512, vocab=300, context=64)
    f = GGUFFile(str(write_model(tmp_path / "m.gguf", shape, "Q4_0", 3)))
    cfg = read_config(f)
    share = make_plan(parse_layout(None, 1), cfg)[0]
    weights = load_shard(f, cfg, share, backend, notice=lambda _m: None)
    for lw in weights.layers:
        for fields in (("wq", "wk", "wv", "wo"), ("w1", "w3", "w2")):
            arrays = [a for field in fields for a in getattr(lw, field).arrays if a is not cpu._NONE]
            bound = [(a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays]
            assert max(hi for _, hi in bound) - min(lo for lo, _ in bound) < sum(a.nbytes + 64 for a in arrays)
    again = load_shard(f, cfg, share, backend, notice=lambda _m: None, old=weights, keep=("ffn",))
    for old, new in zip(weights.layers, again.layers):
        assert new.w1 is old.w1 and all(a is b for a, b in zip(new.w1.arrays, old.w1.arrays))
        assert new.wq is not old.wq


# ---- 8-bit activations (--activations int8) -------------------------------------------------------------------
INT8_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
CPU_INT8 = INT8_TYPES + (T.IQ4_NL,)  # (the cpu backend has 8-bit IQ4_NL kernels: a table lookup a nibble)


def int8_lane(qtype):
    """Elements a lane of the 8-bit kernels owns: a 32-element block, or Q3_K's and Q6_K's 16-element sub-block."""
    return 16 if qtype in (T.Q3_K, T.Q6_K) else 32


def int8_reference(w, x):
    """What --activations int8 computes, transcribed with whole-array numpy (no lanes, no tiles): per 32-element
    block of x, d = max |x| / 127 and q = rint(x * (1 / d)) in float32; per lane (a block, or 16 elements of
    one), the integer sum of the weights' integers times q, times d_w * d * 2^FIXED in float32 (K-quants: d_w = the
    super-block's d times the sub-block's sc; with mins, plus the sum of the lane's q times its min (K-quants: dmin
    * m of the sub-block; Q4_1, Q5_1: the block's m) times d * 2^FIXED), cut toward zero; all of those summed as
    integers, times 2^-FIXED, as float64 (FIXED = 28: exact below 2^25)."""
    u, (n, cols), lane = unpack(w), x.shape, int8_lane(w.qtype)
    f32, per = np.float32, 32 // lane  # lanes a block
    xb = x.reshape(n, cols // 32, 32)
    d = (np.abs(xb).max(axis=2) / f32(127)).astype(f32)
    with np.errstate(divide="ignore"):
        inverse = np.where(d > 0, f32(1) / d, f32(0)).astype(f32)
    q = np.rint(xb * inverse[..., None]).astype(np.int64).reshape(n, cols // 32, per, lane)
    products = np.einsum("rbjk,nbjk->nrbj", u.q.astype(np.int64).reshape(w.rows, cols // 32, per, lane), q)
    dx = (d * f32(2.0 ** cpu.FIXED))[:, None, :, None]  # (n, 1, blocks, 1)

    def per_lane(a, every):  # a value per `every` elements -> per lane, (rows, blocks, lanes a block)
        return np.repeat(a.astype(f32), every // lane, axis=1).reshape(w.rows, cols // 32, per)
    dw = per_lane(u.d, u.super)
    terms = [(products, dw if u.sc is None else (per_lane(u.sc, u.sub) * dw).astype(f32))]
    if u.dmin is not None:  # mins: the _1 types' m, K-quants' dmin * m
        mins = per_lane(u.dmin, u.super)
        mins = mins if u.m is None else (per_lane(u.m, u.sub) * mins).astype(f32)
        terms.append((np.broadcast_to(q.sum(axis=3)[:, None], products.shape), mins))
    lanes = sum((value.astype(f32) * (scale[None] * dx).astype(f32)).astype(f32) for value, scale in terms)
    return np.trunc(lanes.astype(f32)).astype(np.int64).sum(axis=(2, 3)) * 2.0 ** -cpu.FIXED


@pytest.mark.parametrize("shape", SHAPES[:4], ids=[f"{r}x{c}" for r, c in SHAPES[:4]])
@pytest.mark.parametrize("qtype", CPU_INT8, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 3, 13])
def test_int8_exact_sums_are_the_transcription(qtype, shape, n):
    """A float64 result: the exact sums, the very bits of the transcription (raw blocks: every byte, float16
    scales subnormal and zero, an all-zero activation block, one 1e4 times larger); a float32 result: the fast
    sums, the same within float32 rounding and the exact sums' cuts."""
    rng = np.random.default_rng(11)
    w = random_qtensor(qtype, *shape, rng)
    x = activations(n, w.cols, rng)
    want = int8_reference(w, x)
    for threads in (1, 2):
        lin = CpuBackend(threads, activations="int8").linear(w)
        np.testing.assert_array_equal(lin(x, out=np.empty((n, w.rows))), want)
        cuts = w.cols / int8_lane(qtype) * 2.0 ** -cpu.FIXED  # the exact sums' lanes each cut by under 2^-FIXED
        bound = 1e-5 * (np.abs(x) @ np.abs(dequantize(w)).T.astype(np.float64)) + cuts
        assert np.all(np.abs(lin(x) - want) <= bound)


@pytest.mark.parametrize("qtype", CPU_INT8, ids=lambda t: t.name)
def test_int8_column_splits_add_up_to_the_same_bits(qtype):
    """Split by columns at any blocks (as ranks hold heads and FFN blocks), the exact partial sums add up, in any
    order, to the unsplit product's bits: what keeps int8 text the same at every layout. (The raw blocks' weights
    reach 8192 (Q6_K): x is scaled so that the sums stay within the exact range, 2^25.)"""
    rng = np.random.default_rng(12)
    w = random_qtensor(qtype, 45, 800, rng)
    x = activations(6, w.cols, rng) / 100
    assert np.abs(int8_reference(w, x)).max() < 2 ** 25
    backend = CpuBackend(2, activations="int8")
    whole = backend.linear(w)(x, out=np.empty((6, 45)))
    block, size = GGML_QUANT_SIZES[qtype]
    for cuts in ((0, 32, 800), (0, 96, 544, 800), (0, 160, 192, 224, 800)):
        cuts = sorted({min(whole_blocks(qtype, c), w.cols) for c in cuts})  # K-quants: whole super-blocks
        parts = [backend.linear(QTensor(qtype, 45, b - a, w.data[:, a // block * size:b // block * size].copy()))(
            x[:, a:b], out=np.empty((6, 45))) for a, b in zip(cuts, cuts[1:])]
        np.testing.assert_array_equal(sum(parts), whole)
        np.testing.assert_array_equal(sum(reversed(parts)), whole)


@pytest.mark.parametrize("qtype", CPU_INT8, ids=lambda t: t.name)
def test_int8_rows_are_bit_identical_in_any_tile(qtype):
    """As with float activations: a row's fast and exact results do not depend on the rows held or the batch."""
    rng = np.random.default_rng(13)
    w = random_qtensor(qtype, 101, 544, rng)
    x = activations(15, w.cols, rng)
    backend = CpuBackend(2, activations="int8")
    full = backend.linear(w)
    for a, b in ((50, 60), (1, 2), (33, 97)):
        part = backend.linear(QTensor(qtype, b - a, w.cols, w.data[a:b].copy()))
        for rows in (slice(0, 15), slice(4, 5), slice(0, 3), slice(9, 15)):
            np.testing.assert_array_equal(bits(part(x[rows])), bits(full(x[rows])[:, a:b]))
            exact = part(x[rows], out=np.empty((rows.stop - rows.start, b - a)))
            np.testing.assert_array_equal(exact, full(x[rows], out=np.empty((rows.stop - rows.start, 101)))[:, a:b])


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
def test_int8_activations_too_large_give_nan(bad):
    """A NaN, an infinity, or an activation past cpu.LIMIT (its lanes could pass 2^63 units) makes its row's result
    NaN, for the engine to report, instead of wrapped integers; the other rows keep theirs."""
    rng = np.random.default_rng(14)
    w = random_qtensor(T.Q4_0, 8, 256, rng)
    x = activations(2, 256, rng)
    lin = CpuBackend(1, activations="int8").linear(w)
    good = lin(x), lin(x, out=np.empty((2, 8)))
    x[1, 100] = bad
    for got, want in zip((lin(x), lin(x, out=np.empty((2, 8)))), good):
        assert np.isnan(got[1]).all() and np.array_equal(got[0], want[0])

"""Matrix-product speed of the cpu backend against the numpy reference, in one process, best of a few repeats.

    python scripts/bench_kernels.py [--types Q4_0,Q8_0,Q4_K,Q6_K,F16,F32] [--shapes 5632x2048,...] [--n 1,64]
                                    [--repeats 3]
                                    [--peer OTHER_CPU.py]

Each case cycles through enough copies of the weights (at least 96 MB) that they come from memory, not the 32 MB L3,
as a whole model's weights would. GB/s is the weight bytes of the GGUF type read per second (the numpy reference
holds float32, 4 bytes a weight, but is charged the same bytes, so "cpu x" is the speedup). For n > 1,
"n matvecs / this" is how much faster the batch runs than n separate n = 1 calls.

--peer times another version of spmd/backends/cpu.py in the same process, on the same data, each repeat timing the
two in turn (say an older revision: git show REV:spmd/backends/cpu.py > /tmp/old_cpu.py); "cpu/peer" is this
version's speed as a fraction of the peer's. The machine's load moves both timings; compare this ratio, and run it
more than once.
"""
import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spmd.backends.cpu import CpuBackend  # noqa: E402
from spmd.backends.numpy_ref import NumpyBackend  # noqa: E402
from spmd.quants import F16_FIELDS, QTensor, row_bytes  # noqa: E402

SHAPES = ((2048, 2048), (256, 2048), (5632, 2048), (2048, 5632), (32000, 2048))  # TinyLlama: q/o, k/v, ffn, vocab
COLD_BYTES = 96e6


def random_weights(qtype, rows, cols, rng) -> QTensor:
    """Random data in the type's layout, made directly (quantising 65M floats would take longer than timing)."""
    if qtype in F16_FIELDS:
        elems, size = GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, (rows, cols // elems, size), dtype=np.uint8)
        for at in F16_FIELDS[qtype]:
            scale = (rng.random((rows, cols // elems, 1), dtype=np.float32) * 0.01).astype(np.float16)
            data[:, :, at:at + 2] = scale.view(np.uint8)
        return QTensor(qtype, rows, cols, data.reshape(rows, row_bytes(qtype, cols)))
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    data = {T.F32: w, T.F16: w.astype(np.float16), T.BF16: (w.view(np.uint32) >> 16).astype(np.uint16)}[qtype]
    return QTensor(qtype, rows, cols, data)


def best_ms(variants, x, out, repeats):
    """Best time per call (ms) of each list of linears, the lists timed in turn every repeat."""
    for linears in variants:
        for lin in linears[:2]:
            lin(x, out=out)
    best = [float("inf")] * len(variants)
    for _ in range(repeats):
        for v, linears in enumerate(variants):
            t = time.perf_counter()
            for lin in linears:
                lin(x, out=out)
            best[v] = min(best[v], (time.perf_counter() - t) / len(linears))
    return [b * 1e3 for b in best]


def copies(backend, w):
    """Linears of the same weights, enough copies that they come from memory."""
    linears = [backend.linear(w)]
    for _ in range(int(COLD_BYTES // linears[0].nbytes)):
        linears.append(backend.linear(QTensor(w.qtype, w.rows, w.cols, w.data.copy())))
    return linears


def load_peer(path):
    """Another version of spmd/backends/cpu.py, as a module of the same package (its relative imports work)."""
    spec = importlib.util.spec_from_file_location("spmd.backends._peer_cpu", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def bench(qtype, rows, cols, ns, repeats, rng, peer):
    w = random_weights(qtype, rows, cols, rng)
    wbytes = w.nbytes
    cpu = [copies(CpuBackend(), w)] + ([copies(peer.CpuBackend(), w)] if peer else [])
    ref = copies(NumpyBackend(), w)
    t_one = None
    for n in ns:
        x = rng.standard_normal((n, cols), dtype=np.float32)
        out = np.empty((n, rows), np.float32)
        t_cpu = best_ms(cpu, x, out, repeats)
        t_ref = best_ms([ref], x, out, max(1, repeats // 2) if n > 1 else repeats)[0]
        t_one = t_cpu if n == 1 else t_one
        gb = lambda ms: wbytes / ms / 1e6  # noqa: E731
        line = f"{qtype.name:5} {rows:>5}x{cols:<5} n={n:<3} cpu {t_cpu[0]:8.3f} ms {gb(t_cpu[0]):6.1f} GB/s | "
        if peer:
            line += f"peer {t_cpu[1]:8.3f} ms {gb(t_cpu[1]):6.1f} GB/s, cpu/peer {t_cpu[1] / t_cpu[0]:4.2f} | "
        line += f"numpy {t_ref:8.3f} ms {gb(t_ref):6.1f} GB/s | cpu x{t_ref / t_cpu[0]:6.1f}"
        if n > 1 and t_one:
            line += f" | {n} matvecs / this x{n * t_one[0] / t_cpu[0]:4.1f}"
        print(line, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_K,Q6_K,F16,F32")
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES))
    ap.add_argument("--n", default="1,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer", help="another version of spmd/backends/cpu.py to time alongside")
    a = ap.parse_args()
    unknown = [t for t in a.types.split(",") if t not in T.__members__]
    if unknown:
        ap.error(f"--types: {unknown[0]!r} is not a GGUF type (Q4_0, Q8_0, Q4_K, Q6_K, F16, F32, ...)")
    try:
        shapes = [tuple(map(int, shape.split("x"))) for shape in a.shapes.split(",")]
        ns = [int(n) for n in a.n.split(",")]
    except ValueError:
        ap.error("--shapes takes ROWSxCOLS,... and --n whole numbers, separated by commas")
    rng = np.random.default_rng(0)
    peer = load_peer(a.peer) if a.peer else None
    for name in a.types.split(","):
        for rows, cols in shapes:
            bench(T[name], rows, cols, ns, a.repeats, rng, peer)


if __name__ == "__main__":
    main()

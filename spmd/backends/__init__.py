"""Backends: where a rank's matrix products run, behind one small interface (`Backend`):

    backend = get_backend(name, threads, device, wrap, activations)  # "numpy" (readable reference), "cpu" (numba)
                                         # or "vulkan" (GPU kernels); threads: cores this rank may use (None: all);
                                         # device: the Vulkan device index on this host (None: 0);
                                         # wrap: an index past the last device wraps around instead of failing;
                                         # activations: "f32" or "int8" (cpu, vulkan: 8-bit kernels)
    backend.description                  # e.g. "cpu (numba, 2 threads)", "vulkan (NVIDIA H100 80GB HBM3)"
    lin = backend.linear(w, resident)    # w: QTensor (rows, cols), ownership passes; may be repacked;
                                         # resident=False: a streamed half's (Vulkan: no device memory of its
                                         # own, see spmd.stream.DeviceWindow)
    lin.rows, lin.cols, lin.nbytes       # nbytes: resident bytes of the weights as kept
    lin.arrays                           # the arrays its products read (cpu, numpy; Vulkan: a streamed one's
                                         # repacked arrays): spmd.stream moves them to its spill file
    backend.settle(lins)                 # a resident half's linears, all made: their arrays placed for speed (cpu:
                                         # together on huge pages; the others: as they are)
    backend.held_bytes(qtype, rows, cols, keep)   # bytes lin.nbytes will be for such a matrix; keep: a slice
                                         # that cuts quant blocks, its QTensor.keep, else None
    y = lin(x, out=None)                 # x: float32 (n, cols) -> float32 (n, rows) = x @ W.T, into `out` if given
                                         # (a float64 out: the cpu int8 kernels' exact sums)
    backend.partial_dtype                # the dtype its model's partial sums have (float32; cpu int8: float64)
    model = backend.make_model(cfg, weights, share, max_seq, slots, kv_cache)   # spmd.model.Model, or the
                                         # backend's own (Vulkan); sequences of up to max_seq positions in slots
                                         # 0..slots-1; kv_cache: "f32" or "f16", the type keys and values are kept in
    backend.model_owns_weights           # True where the model frees its matrices on close(): a re-partition
                                         # then reads every matrix again instead of keeping unchanged ones
    backend.holds(qtype)                 # the type it holds a file's qtype matrices in (spmd.quants.held_type)
    backend.lacks(w)                     # None where it computes with QTensor w as it is, else what it lacks
                                         # ("a kernel for IQ4_XS weights"): spmd.weights then hands it w as F32
"""
import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import UserError

BACKENDS = ("numpy", "cpu", "vulkan")


class Backend:
    name = description = None
    model_owns_weights = False
    partial_dtype = np.float32  # the partial sums its model hands the stage's allreduce (cpu int8: float64, exact)

    def lacks(self, w):
        """None: every type spmd.quants keeps, and slices that cut through quant blocks (QTensor.keep)."""
        return None

    def holds(self, qtype):
        """The type it holds a file's `qtype` matrices in (the numpy backend: float32, dequantised as it computes)."""
        return T.F32

    def linear(self, w, resident=True):
        raise NotImplementedError

    def settle(self, lins):
        """A resident half's linears, all made: nothing to do here (the cpu backend moves their arrays)."""

    def held_bytes(self, qtype, rows, cols, keep=None):
        """What a linear of a (rows, cols) matrix of `qtype` holds (the numpy backend's float32 of its own columns)."""
        return 4 * rows * (cols if keep is None else sum(b - a for a, b in keep))

    def widens_f16_cache(self, head_dim) -> bool:
        """Whether its model's prompt attention reads a layer's float16 keys and values through a float32 copy
        (spmd.model's `_attend_rows`: what --memory-limit's accounting counts, `pass_bytes`)."""
        return True

    def make_model(self, cfg, weights, share, max_seq, slots=1, kv_cache="f32"):
        from ..model import Model
        return Model(cfg, weights, share, max_seq, slots, self.partial_dtype, kv_cache)

    def device_memory_bytes(self):
        """Memory of the device the backend computes on where it is not the host's (a GPU's), else None."""
        return None

    def gpu(self):
        """Which of its host's GPUs it computes on (an index), or None where it computes on the CPU."""
        return None


def get_backend(name: str, threads: int = None, device: int = None, wrap: bool = False, activations="f32"):
    if name == "numpy":
        from .numpy_ref import NumpyBackend
        return NumpyBackend()
    if name == "cpu":
        from .cpu import CpuBackend
        return CpuBackend(threads, activations)
    if name == "vulkan":
        from .vulkan import VulkanBackend
        return VulkanBackend(device, wrap, activations)
    raise UserError(f"unknown backend {name!r} (choose one of: {', '.join(BACKENDS)})")


def prepare_call(lin, x, out):
    """The checks and trivial cases every kernel backend's `lin(x, out)` shares: returns (x as contiguous float32,
    out, done), done when nothing is left to compute (no rows, no tokens, or no columns: zeros)."""
    x = np.ascontiguousarray(x, dtype=np.float32)  # (n, cols); no copy when it already is
    n = x.shape[0]
    if out is None:
        out = np.empty((n, lin.rows), np.float32)
    if x.shape != (n, lin.cols) or out.shape != (n, lin.rows):  # the kernels do not check bounds
        raise ValueError(f"linear {lin.rows}x{lin.cols}: x {x.shape}, out {out.shape}")
    if lin.cols == 0:
        out[...] = 0.0
    return x, out, lin.rows == 0 or n == 0 or lin.cols == 0

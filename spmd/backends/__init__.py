"""Backends: where a rank's matrix products run. The model code calls exactly this interface:

    backend = get_backend(name, threads) # "numpy" (readable reference) or "cpu" (fast numba kernels);
                                         # threads: cores this rank may use (None: all)
    lin = backend.linear(w)              # w: QTensor (rows, cols), ownership passes; may be repacked
    lin.rows, lin.cols, lin.nbytes       # nbytes: resident bytes of the weights as kept
    y = lin(x, out=None)                 # x: float32 (n, cols) -> float32 (n, rows) = x @ W.T, into `out` if given
"""
from ..errors import UserError

BACKENDS = ("numpy", "cpu", "vulkan")


def get_backend(name: str, threads: int = None, device: int = None):
    if name == "numpy":
        from .numpy_ref import NumpyBackend
        return NumpyBackend()
    if name == "cpu":
        from .cpu import CpuBackend
        return CpuBackend(threads)
    raise UserError(f"unknown backend {name!r} (choose one of: {', '.join(BACKENDS)})")

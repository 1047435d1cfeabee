"""The readable reference backend: dequantise to float32 at load, then `x @ W.T`."""
import numpy as np

from ..quants import QTensor, dequantize
from . import Backend


class NumpyLinear:
    def __init__(self, w: QTensor):
        self.rows, self.cols = w.rows, w.width
        # (rows, cols); 0 rows or 0 cols when a rank holds no heads
        self.arrays = (np.ascontiguousarray(dequantize(w), np.float32),)
        self.nbytes = self.arrays[0].nbytes

    @property
    def w(self) -> np.ndarray:
        """The float32 matrix (rows, cols)."""
        return self.arrays[0]

    def __call__(self, x: np.ndarray, out: np.ndarray = None) -> np.ndarray:
        """x: float32 (n, cols) -> float32 (n, rows), written into `out` when given."""
        if out is None:
            out = np.empty((x.shape[0], self.rows), dtype=np.float32)
        return np.matmul(x, self.w.T, out=out)  # an empty shard (0 cols) gives zeros


class NumpyBackend(Backend):
    name = "numpy"
    description = "numpy (reference)"

    def linear(self, w: QTensor, resident=True) -> NumpyLinear:
        return NumpyLinear(w)

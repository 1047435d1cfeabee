"""SPMD inference: non-uniform tensor-parallel Llama/Qwen2 generation over MPI from GGUF files."""
import os

# The matrix kernels (numba) own this rank's cores. numpy's BLAS only serves the small attention products, and its
# thread pool, left to spin after each one, would take cores from the kernels (prefill ran 3x slower with it).
# Set before numpy is first imported; a value the user exported wins.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

__version__ = "0.1.0"

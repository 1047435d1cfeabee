"""SPMD inference: non-uniform tensor-parallel Llama/Qwen2 generation over MPI from GGUF files."""

__version__ = "0.1.0"

"""Write tests/kquant/*.gguf: small K-quant files made by llama.cpp's own quantiser, as people download them.

Each is a random F32 model from spmd.synth, quantised by `llama-quantize` (scripts/build_llama_cpp.sh builds it, or
$LLAMA_QUANTIZE) into one of llama.cpp's file types: Q4_K_M and Q5_K_M (Q6_K where more bits go), Q6_K, a
Q4_K_M whose rows of 96 are not whole 256-element super-blocks (llama.cpp's fallback types), Q3_K_M, IQ4_NL, and
Q2_K (with Q3_K where more bits go). tests/test_kquant.py checks spmd's greedy tokens on them against
tests/reference.py, which dequantises with the gguf package.

    python scripts/make_kquant_files.py [--out tests/kquant]

The files are committed (about 3 MB); this script is how they were made, not part of the tests.
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spmd.synth import Shape, write_model  # noqa: E402

K_SHAPE = Shape(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn=512, vocab=512, context=64)
ODD_SHAPE = Shape(dim=96, n_layers=2, n_heads=4, n_kv_heads=2, ffn=160, vocab=512, context=64)
# file name -> (shape, seed, llama-quantize's type)
FILES = {"q4_k_m": (K_SHAPE, 11, "Q4_K_M"), "q5_k_m": (K_SHAPE, 12, "Q5_K_M"), "q6_k": (K_SHAPE, 13, "Q6_K"),
         "q4_k_m_rows96": (ODD_SHAPE, 14, "Q4_K_M"), "q3_k_m": (K_SHAPE, 15, "Q3_K_M"),
         "iq4_nl": (K_SHAPE, 16, "IQ4_NL"), "q2_k": (K_SHAPE, 17, "Q2_K")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "kquant"))
    a = ap.parse_args()
    quantizer = os.environ.get("LLAMA_QUANTIZE") or str(ROOT / "bench-out" / "llama.cpp" / "bin" / "llama-quantize")
    if not os.access(quantizer, os.X_OK):
        raise SystemExit(f"no llama-quantize at {quantizer}: run scripts/build_llama_cpp.sh or set LLAMA_QUANTIZE")
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (shape, seed, ftype) in FILES.items():
            f32 = write_model(Path(tmp) / f"{name}-f32.gguf", shape, "F32", seed=seed)
            out = Path(a.out) / f"{name}.gguf"
            subprocess.run([quantizer, str(f32), str(out), ftype], check=True, capture_output=True)
            print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB): {ftype} of a random {shape.dim}-wide model")


if __name__ == "__main__":
    main()

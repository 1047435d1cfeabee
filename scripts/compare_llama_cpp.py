"""Greedy tokens of spmd against llama.cpp (through llama-cpp-python) on the same GGUF file.

    python scripts/compare_llama_cpp.py MODEL.gguf [--steps 48] [--prompt-ids 1,2,3] [--ranks 1]

llama.cpp runs with an f32 KV cache, so on F32/F16 weights both compute the same float answer and should agree
token for token. On Q4_0/Q8_0 weights llama.cpp quantises the activations to 8 bits, which moves its logits by
~1e-2, so its tokens part from the exact answer (and ours) wherever the margin is that small. Its default f16 KV
cache does the same, later."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GGML_TYPE_F32 = 0


def spmd_greedy(model, prompt, steps, ranks):
    cmd = [sys.executable, "-m", "spmd.run", "--model", model, "--prompt-ids", ",".join(map(str, prompt)),
           "--steps", str(steps), "--output", "json"]
    if ranks > 1:
        cmd = [shutil.which("mpirun"), "-n", str(ranks)] + cmd
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise click.ClickException(p.stderr.strip().splitlines()[-1])
    return json.loads(p.stdout)["tokens"]


def llama_cpp_greedy(model, prompt, steps):
    from llama_cpp import Llama
    llm = Llama(model_path=model, n_ctx=len(prompt) + steps + 8, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # the last token's
    llm.eval(prompt)
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        llm.eval(tokens[-1:])
    return tokens


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--steps", default=48, show_default=True)
@click.option("--prompt-ids", default="1", show_default=True, help="Comma-separated prompt token ids.")
@click.option("--ranks", default=1, show_default=True, help="Run spmd on this many ranks (through mpirun).")
def main(model, steps, prompt_ids, ranks):
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise click.ClickException("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
    prompt = [int(t) for t in prompt_ids.split(",")]
    ours, theirs = spmd_greedy(model, prompt, steps, ranks), llama_cpp_greedy(model, prompt, steps)
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    print(f"{model}: the first {agree} of {len(ours)} greedy tokens are equal (spmd {ranks} rank(s) vs llama.cpp)")
    if agree < len(ours):
        print(f"  from token {agree}: spmd {ours[agree:agree + 6]}, llama.cpp {theirs[agree:agree + 6]}")


if __name__ == "__main__":
    main()

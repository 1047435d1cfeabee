"""A GPU short of memory beside the CPU's cores: two ranks of one host, a vulkan rank and a cpu rank as two pipeline
stages, against llama.cpp's partial offload on the same file (`-ngl G`: G layers on the GPU, the others and the
classifier on the CPU's threads), in turns, on a random-weight model of TinyLlama-1.1B's shape.

    python scripts/bench_hybrid.py [--gpu-layers 21,19,17] [--qtype Q4_0] [--steps 256] [--prompt 128]
                                   [--threads N] [--rounds 2] [--model FILE]

For each G spmd runs two layouts: `--backend vulkan,cpu --ratios 1@G*1@R` (llama.cpp's split: the GPU G layers, the
cpu rank the other R and the classifier), and `--backend cpu,vulkan`, the cpu rank first with the fewest layers
that leave the GPU its layers and the classifier within the bytes of llama.cpp's G layers. The cpu rank and
llama.cpp take --threads (default: the host's cores less two). A last row compares the GPU alone (one vulkan rank)
with `-ngl 99`. Decode follows a --prompt-token prompt (llama.cpp's at that depth); the figures are the medians of
the rounds. llama.cpp: a GPU build, $LLAMA_BENCH or bash scripts/build_llama_cpp.sh --cuda's, with -fa 1 (its
float16 KV cache; spmd's is float16 too). Every spmd run's tokens must equal the first's.
"""
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (CUDA_BENCH, model_vocab, random_prompt, run_llama_bench, run_spmd,  # noqa: E402
                          temporary_folder, write_random_model)


def byte_counts(model):
    """(bytes of each layer, in order; bytes of the classifier; bytes of token_embd where it is another tensor) of
    a GGUF file."""
    from spmd.gguf_file import GGUFFile
    f = GGUFFile(model)
    try:
        layers = {}
        for name, t in f.tensors.items():
            m = re.match(r"blk\.(\d+)\.", name)
            if m:
                layers[int(m[1])] = layers.get(int(m[1]), 0) + t.nbytes
        tied = not f.has("output.weight")
        head = f.info("token_embd.weight" if tied else "output.weight").nbytes
        return [layers[i] for i in sorted(layers)], head, 0 if tied else f.info("token_embd.weight").nbytes
    finally:
        f.close()


def cpu_first(layers, head, gpu_layers):
    """The cpu rank's layers in the cpu-first layout: the fewest whose GPU share (the other layers and the
    classifier) fits within the bytes of llama.cpp's `gpu_layers` (its last ones), or None if none does."""
    budget = sum(layers[len(layers) - gpu_layers:])
    for cpu in range(1, len(layers)):
        if sum(layers[cpu:]) + head <= budget:
            return cpu
    return None


def main():
    import click

    from spmd.synth import FILE_TYPES, TINYLLAMA

    @click.command()
    @click.option("--gpu-layers", default="21,19,17", show_default=True,
                  help="llama.cpp's -ngl values: the GPU's layers in the split that copies llama.cpp's")
    @click.option("--qtype", default="Q4_0", type=click.Choice(list(FILE_TYPES)), show_default=True)
    @click.option("--steps", default=256, show_default=True)
    @click.option("--prompt", "prompt_len", default=128, show_default=True)
    @click.option("--threads", default=max(1, (os.cpu_count() or 2) - 2), show_default=True,
                  help="the cpu rank's threads, and llama.cpp's")
    @click.option("--rounds", default=2, show_default=True)
    @click.option("--model", default=None, help="Use this GGUF instead of writing a random TinyLlama-shaped one.")
    def cli(gpu_layers, qtype, steps, prompt_len, threads, rounds, model):
        if model is None:
            model = os.path.join(temporary_folder("spmd-bench-"), f"tinyllama-random-{qtype}.gguf")
            write_random_model(model, TINYLLAMA, qtype)
        layers, head, embedding = byte_counts(model)
        n = len(layers)
        prompt = random_prompt(prompt_len, model_vocab(model))
        binary = os.environ.get("LLAMA_BENCH") or str(CUDA_BENCH)
        binary = binary if os.access(binary, os.X_OK) else None
        runs = []  # (-ngl of the row, name, spmd's (backend, threads, ratios), -ngl to run beside it, GPU bytes)
        for g in (int(x) for x in gpu_layers.split(",")):
            if not 0 < g < n:
                raise SystemExit(f"--gpu-layers {g}: the model has {n} layers (give 1..{n - 1})")
            runs.append((g, f"vulkan,cpu 1@{g}*1@{n - g}", ("vulkan,cpu", f"1,{threads}", f"1@{g}*1@{n - g}"), g,
                         sum(layers[:g])))
            c = cpu_first(layers, head, g)
            if c is not None:
                runs.append((g, f"cpu,vulkan 1@{c}*1@{n - c}", ("cpu,vulkan", f"{threads},1", f"1@{c}*1@{n - c}"),
                             None, sum(layers[c:]) + head))
        runs.append((99, "vulkan (one rank)", ("vulkan", "1", None), 99, sum(layers) + head + embedding))  # (a
        # whole model's vulkan rank keeps a copy of token_embd for its chained decode: spmd.backends.vulkan_model)
        figures, first = {}, None  # name -> [(decode, prompt)]; the first run's tokens
        for r in range(rounds):
            for row, name, (backend, rank_threads, ratios), ngl, _ in runs:
                ranks = 1 if ratios is None else 2
                out = run_spmd(model, ranks, steps, prompt, ratios=ratios, threads=rank_threads, backend=backend)
                first = out["tokens"] if first is None else first
                if out["tokens"] != first:
                    raise SystemExit(f"{name}: its tokens differ from the first run's")
                figures.setdefault(name, []).append((out["decode_tokens_per_s"], out["prompt_tokens_per_s"]))
                print(f"round {r + 1} spmd {name}: decode {out['decode_tokens_per_s']:.1f} tok/s, prompt "
                      f"{out['prompt_tokens_per_s']:.1f}", flush=True)
                if ngl is not None and binary:
                    peer = run_llama_bench(binary, model, steps, prompt_len, threads, ("-ngl", str(ngl), "-fa", "1"))
                    pair = (peer["decode_tokens_per_s"], peer["prompt_tokens_per_s"])
                    figures.setdefault(f"-ngl {ngl}", []).append(pair)
                    print(f"round {r + 1} llama.cpp -ngl {ngl}: decode {peer['decode_tokens_per_s']:.1f} tok/s, "
                          f"prompt {peer['prompt_tokens_per_s']:.1f}", flush=True)
        med = lambda name, i: statistics.median(x[i] for x in figures[name]) if name in figures else None  # noqa
        shown = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}"  # noqa: E731
        print(f"\n{qtype}, {n} layers, {prompt_len}-token prompt, {steps} steps, {threads} cpu threads, medians of "
              f"{rounds} rounds; llama.cpp: {binary or 'not run (no GPU build: $LLAMA_BENCH)'}")
        print("| -ngl | llama.cpp decode tok/s (prompt) | spmd layout | its GPU MB / llama.cpp's | decode tok/s "
              "(prompt) | decode ratio | prompt ratio |")
        print("|---|---|---|---|---|---|---|")
        for row, name, _, _, gpu_bytes in runs:
            peer = f"-ngl {row}"
            theirs = sum(layers[n - row:]) if row < n else sum(layers) + head  # (-ngl 99: the classifier too)
            print(f"| {row} | {shown(med(peer, 0))} ({shown(med(peer, 1))}) | {name} | {gpu_bytes / 1e6:.1f} / "
                  f"{theirs / 1e6:.1f} | {shown(med(name, 0))} ({shown(med(name, 1))}) | "
                  f"{ratio(med(name, 0), med(peer, 0))} | {ratio(med(name, 1), med(peer, 1))} |")

    cli()


if __name__ == "__main__":
    main()

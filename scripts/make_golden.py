"""Write tests/golden/<case>.json: Hugging Face's greedy tokens for each synthetic model.

For each case: write the model with spmd.synth, load its (dequantised) weights from the GGUF file into the matching
transformers model (float32, eager attention; llama's attn_q / attn_k rows un-permuted back to HF's rotate-halves
layout), run greedy `generate`, check the top-1 / top-2 logit margin of every step, check that tests/reference.py
gives the same logits (to LOGIT_TOL) and the same greedy tokens, and write the JSON.

    python scripts/make_golden.py [--out tests/golden] [case ...]

torch and transformers are imported here only; the package and the tests never need them.
"""
import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import reference  # noqa: E402  (tests/reference.py)
from spmd.synth import Shape, write_model  # noqa: E402

STEPS = 24
MIN_MARGIN = 1e-3  # top-1 minus top-2 logit at every greedy step
LOGIT_TOL = 1e-4  # max |HF - reference| over all logits, relative to max(1, max |logit|)
LLAMA_PROMPT = [1, 300, 301, 302, 303, 17, 45, 99, 120, 200, 250]  # BOS + 10 fixed ids
QWEN2_PROMPT = [300, 301, 302, 303, 17, 45, 99, 120, 200, 250, 260]  # no BOS for qwen2
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}  # small, so the scaling bends the frequencies we use
QUANT_SHAPE = Shape(dim=128, n_heads=4, n_kv_heads=2, ffn=256)  # head_dim 32: whole quant blocks per head

# case -> (shape, qtype, seed, prompt); seeds picked for comfortable margins and varied tokens
CASES = {
    "llama_gqa_f32": (Shape(), "F32", 2, LLAMA_PROMPT),
    "llama3_rope_f32": (Shape(rope_scaling=LLAMA3_SCALING), "F32", 0, LLAMA_PROMPT),
    "qwen2_tied_f32": (Shape(arch="qwen2", tied=True, rope_theta=1000000.0), "F32", 7, QWEN2_PROMPT),
    "llama_q8_0": (QUANT_SHAPE, "Q8_0", 0, LLAMA_PROMPT),
    "llama_q4_0": (QUANT_SHAPE, "Q4_0", 8, LLAMA_PROMPT),
    # qwen3: per-head q/k norms, heads of 32 (4 x 32 = 128 wide where dim is 64), untied classifier
    "qwen3_f32": (Shape(arch="qwen3", rope_theta=1000000.0, key_length=32), "F32", 1, QWEN2_PROMPT),
}


def unpermute(w, n_head):
    """GGUF's interleaved-pair rows -> HF's rotate-halves rows (inverse of llama.cpp's converter permute)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_model(gguf_path, shape: Shape):
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    _, t = reference.read_gguf(gguf_path)  # every tensor dequantised to float32
    rope = {"rope_type": "default", "rope_theta": shape.rope_theta}
    if shape.rope_scaling:
        rope = {**rope, "rope_type": "llama3", **shape.rope_scaling}
    common = dict(vocab_size=shape.vocab, hidden_size=shape.dim, intermediate_size=shape.ffn,
                  num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                  num_key_value_heads=shape.n_kv_heads, max_position_embeddings=shape.context,
                  tie_word_embeddings=shape.tied, rope_parameters=rope)
    if shape.arch == "llama":
        config, cls = LlamaConfig(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **common), LlamaForCausalLM
    elif shape.arch == "qwen2":
        config, cls = Qwen2Config(rms_norm_eps=1e-6, use_sliding_window=False, **common), Qwen2ForCausalLM
    else:
        config, cls = Qwen3Config(rms_norm_eps=1e-6, use_sliding_window=False, head_dim=shape.head_dim,
                                  attention_bias=False, **common), Qwen3ForCausalLM
    config._attn_implementation = "eager"
    model = cls(config).to(torch.float32).eval()

    sd = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"],
          "lm_head.weight": t["token_embd.weight"] if shape.tied else t["output.weight"]}
    for i in range(shape.n_layers):
        g, h = f"blk.{i}.", f"model.layers.{i}."
        q, k = t[g + "attn_q.weight"], t[g + "attn_k.weight"]
        if shape.arch == "llama":
            q, k = unpermute(q, shape.n_heads), unpermute(k, shape.n_kv_heads)
        sd.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                   h + "self_attn.v_proj.weight": t[g + "attn_v.weight"],
                   h + "self_attn.o_proj.weight": t[g + "attn_output.weight"],
                   h + "mlp.gate_proj.weight": t[g + "ffn_gate.weight"],
                   h + "mlp.up_proj.weight": t[g + "ffn_up.weight"],
                   h + "mlp.down_proj.weight": t[g + "ffn_down.weight"],
                   h + "input_layernorm.weight": t[g + "attn_norm.weight"],
                   h + "post_attention_layernorm.weight": t[g + "ffn_norm.weight"]})
        if shape.arch == "qwen2":
            sd.update({h + f"self_attn.{n}_proj.bias": t[g + f"attn_{n}.bias"] for n in "qkv"})
        if shape.arch == "qwen3":
            sd.update({h + f"self_attn.{n}_norm.weight": t[g + f"attn_{n}_norm.weight"] for n in "qk"})
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                                                strict=False)
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if shape.tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def hf_greedy(model, prompt):
    """(new tokens, per-step top-1 minus top-2 logit)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, min_new_tokens=0, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    margins = [float(np.diff(np.sort(step[0].double().numpy())[-2:])[0]) for step in out.logits]
    return tokens, margins


def make_case(name, shape, qtype, seed, prompt, workdir, out_dir):
    import torch

    path = write_model(Path(workdir) / f"{name}.gguf", shape, qtype, seed)
    model = hf_model(path, shape)
    tokens, margins = hf_greedy(model, prompt)
    seq = prompt + tokens
    with torch.no_grad():
        hf_logits = model(torch.tensor([seq])).logits[0].double().numpy()
    ref_logits = reference.logits_for(path, seq)
    diff = float(np.abs(hf_logits - ref_logits).max())
    scale = max(1.0, float(np.abs(ref_logits).max()))
    ref_tokens = reference.greedy(path, prompt, STEPS)
    print(f"{name:18s} {qtype:5s} seed {seed}: min margin {min(margins):.4f}, reference vs HF max |dlogit| "
          f"{diff:.2e} (max |logit| {scale:.1f}), greedy tokens {'equal' if ref_tokens == tokens else 'DIFFER'}, "
          f"{len(set(tokens))} distinct")
    problems = []
    if min(margins) <= MIN_MARGIN:
        problems.append(f"min margin {min(margins):.2e} <= {MIN_MARGIN}: pick another seed")
    if diff > LOGIT_TOL * scale:
        problems.append(f"reference logits differ from HF by {diff:.2e}")
    eos = reference.read_gguf(path)[0]["tokenizer.ggml.eos_token_id"]
    if eos in tokens:
        problems.append(f"generates end-of-sequence ({eos}), where an engine would stop: pick another seed")
    if ref_tokens != tokens:
        problems.append(f"reference greedy {ref_tokens} != HF {tokens}")
    if problems:
        raise SystemExit(f"{name}: " + "; ".join(problems))
    golden = {"case": name, "shape": asdict(shape), "qtype": qtype, "seed": seed, "prompt": prompt,
              "tokens": tokens, "min_margin": min(margins), "reference_max_abs_logit_diff": diff,
              "generator": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
                           "float32, eager attention, greedy generate"}
    lines = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in golden.items())  # a key per line
    (out_dir / f"{name}.json").write_text("{\n" + lines + "\n}\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    ap.add_argument("cases", nargs="*", help=f"some of {', '.join(CASES)} (default: all)")
    args = ap.parse_args(argv)
    unknown = set(args.cases) - set(CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}")
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.cases or CASES:
            make_case(name, *CASES[name], workdir, args.out)
    print(f"reference.py agrees with transformers on every case; wrote {args.out}")


if __name__ == "__main__":
    main()

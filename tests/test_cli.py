"""The command line as a user meets it: output formats, and one clear line for every mistake, on 1 and 3 ranks,
with every rank exiting non-zero promptly (no hang, no traceback)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from mpi_models import no_new_shm_files, patch_meta, rank_pid, shm_files
from spmd.synth import Shape, write_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=128, vocab=512, context=32)
MPIRUN = shutil.which("mpirun")
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "models" / "llama2-tokenizer.model"
HOUSEHOLD = ROOT / "tests" / "profiles" / "household.json"  # a saved profile of 4 ranks and another model


def run(args, ranks=1, timeout=90):
    cmd = [sys.executable, "-m", "spmd.run", *(a if isinstance(a, bytes) else str(a) for a in args)]
    if ranks > 1:
        cmd = [MPIRUN, "-n", str(ranks), *cmd]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", SHAPE, qtype="Q8_0", seed=1)


def test_json_output(model):
    p = run(["--model", model, "--prompt", "Hello world", "--steps", 5, "--output", "json"])
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["prompt_tokens"][0] == 1 and len(r["tokens"]) == 5
    assert set(r) >= {"text", "prefill_ms", "decode_tokens_per_s", "ms_per_token", "ranks"}
    assert set(r["ranks"][0]["share"]) == {"layers", "heads", "kv_heads", "ffn_columns", "vocab_rows"}
    rank0 = r["ranks"][0]
    assert rank0["share"]["layers"] == [0, 2] and rank0["stage"] == 0
    assert r["stages"] == [{"stage": 0, "layers": [0, 2], "ranks": [0], "compute_ms": rank0["compute_ms"],
                            "sync_ms": rank0["sync_ms"]}]


def test_text_output_streams_then_summarises(model):
    p = run(["--model", model, "--prompt", "Hello", "--steps", 4, "--output", "json"])
    text = json.loads(p.stdout)["text"]
    p = run(["--model", model, "--prompt", "Hello", "--steps", 4])
    assert p.returncode == 0, p.stderr
    assert p.stdout == "Hello" + text + "\n"  # the prompt, then the continuation
    lines = p.stderr.splitlines()  # the control socket at start-up, the summary at the end
    assert len(lines) == 2 and lines[0].startswith("control socket: ") and lines[0].endswith(".sock")
    assert lines[1].startswith("[spmd] 4 tokens, decode ") and ", cpu; rank 0 " in lines[1]


def test_the_result_says_the_activations(model):
    """--activations int8 shows in the summary line and in the JSON result."""
    p = run(["--model", model, "--prompt", "Hello", "--steps", 2, "--activations", "int8"])
    assert p.returncode == 0, p.stderr
    assert ", cpu, int8 activations; rank 0 " in p.stderr.splitlines()[-1]
    assert "no quantised matrix" not in p.stderr
    for activations in ("f32", "int8"):
        p = run(["--model", model, "--prompt", "Hello", "--steps", 2, "--activations", activations, "--output", "json"])
        assert json.loads(p.stdout)["activations"] == activations


def test_per_rank_flags_are_echoed_without_blanks(model):
    """Blanks around a per-rank flag's commas are not part of the names: the summary and the result say "cpu"."""
    p = run(["--model", model, "--prompt", "Hello", "--steps", 2, "--backend", " cpu ", "--threads", "1 "])
    assert p.returncode == 0 and ", cpu; rank 0 " in p.stderr.splitlines()[-1], p.stderr
    p = run(["--model", model, "--steps", 2, "--backend", "cpu ", "--output", "json"])
    assert json.loads(p.stdout)["backend"] == "cpu"


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_model_split_into_files_runs_from_its_first(tmp_path, ranks):
    """llama.cpp's gguf-split files: --model names the first, and the text is the whole file's."""
    if ranks > 1 and MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    whole = write_model(tmp_path / "whole.gguf", SHAPE, qtype="Q8_0", seed=1)
    first = write_model(tmp_path / "m.gguf", SHAPE, qtype="Q8_0", seed=1, split=8)
    texts = []
    for path in (whole, first):
        p = run(["--model", path, "--prompt", "Hello", "--steps", 6, "--output", "json", "--ratios",
                 "1*1" if ranks > 1 else "1"], ranks=ranks)
        assert p.returncode == 0, p.stderr
        texts.append(json.loads(p.stdout)["tokens"])
    assert texts[0] == texts[1] and len(texts[0]) == 6


def test_a_gpu_that_no_rank_uses_is_noted(model):
    p = run(["--model", model, "--prompt", "Hello", "--steps", 2, "--gpu", 1])
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("note: --gpu 1 chooses a vulkan rank's GPU, and no rank runs the vulkan backend "
                          "(--backend cpu)") == 1


def test_int8_on_a_model_of_float_matrices_says_it_changes_nothing(tmp_path):
    floats = write_model(tmp_path / "f16.gguf", SHAPE, qtype="F16", seed=1)
    p = run(["--model", floats, "--prompt", "Hello", "--steps", 2, "--activations", "int8"])
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("note: --activations int8: the model holds no quantised matrix") == 1


@pytest.mark.parametrize("ranks, backend, said", [(1, "numpy", "every rank"), (3, "cpu,numpy,numpy", "ranks 1, 2")])
def test_int8_on_the_numpy_backend_says_it_keeps_float32(model, ranks, backend, said):
    """The numpy reference has no 8-bit products: its ranks' text is float32's, which a note says (the result only
    said int8)."""
    if ranks > 1 and MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    p = run(["--model", model, "--prompt", "Hello", "--steps", 2, "--activations", "int8", "--backend", backend,
             "--threads", 1], ranks=ranks)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count(f"note: --activations int8: the numpy backend ({said}) keeps float32 activations") == 1
    summary = p.stderr.splitlines()[-1]  # every rank numpy: float32 is what ran; else int8 where it runs
    assert summary.startswith("[spmd]") and ("int8 activations" in summary) == (said != "every rank"), summary


def test_several_prompts_from_flags_and_a_file(model, tmp_path):
    """Repeated --prompt and a JSON Lines file with settings per prompt: JSON gives every sequence in input order,
    each equal to its prompt run alone with the same settings; text labels each sequence as it ends."""
    lines = ['{"prompt": "Once", "steps": 3}', '{"prompt": "A dog", "temperature": 0.9, "seed": 4}',
             '{"prompt_ids": [1, 7, 8, 9], "steps": 2}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n\n")
    args = ["--model", model, "--steps", 5, "--sequences", 2, "--prompt", "Hello", "--prompt", "Hi there",
            "--prompts-file", tmp_path / "p.jsonl"]
    p = run(args + ["--output", "json"])
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    alone = [["--prompt", "Hello"], ["--prompt", "Hi there"], ["--prompt", "Once", "--steps", 3],
             ["--prompt", "A dog", "--temperature", 0.9, "--seed", 4], ["--prompt-ids", "1,7,8,9", "--steps", 2]]
    want = [json.loads(run(["--model", model, *([] if "--steps" in a else ["--steps", 5]), "--output", "json",
                            *a]).stdout) for a in alone]
    assert [s["index"] for s in r["sequences"]] == [0, 1, 2, 3, 4]
    assert [s["tokens"] for s in r["sequences"]] == [w["tokens"] for w in want]
    assert [s["text"] for s in r["sequences"]] == [w["text"] for w in want]
    assert r["sequences_in_flight"] == 2 and r["tokens_generated"] == sum(len(w["tokens"]) for w in want)
    p = run(args)
    assert p.returncode == 0, p.stderr
    shown = ["Hello", "Hi there", "Once", "A dog", "\x04\x05\x06"]  # ids 7, 8, 9 are the bytes 4, 5, 6
    for i, w in enumerate(want):  # each in the order they end, its lines whole
        assert f"[{i}] {shown[i]}{w['text']}\n" in p.stdout, (i, p.stdout)
    assert p.stderr.splitlines()[-1].startswith("[spmd] 5 sequences, ")


def test_help_documents_every_flag():
    p = run(["--help"])
    assert p.returncode == 0
    for flag in ("--model", "--prompt", "--prompt-ids", "--steps", "--ratios", "--allreduce", "--backend",
                 "--gpu", "--threads", "--temperature", "--top-k", "--top-p", "--seed", "--tokenizer", "--output",
                 "--control-socket", "--migrate-weights", "--prompts-file", "--sequences", "--wait-timeout"):
        assert flag in p.stdout


def test_sampling_is_reproducible_with_a_seed(model):
    args = ["--model", model, "--prompt", "Hi", "--steps", 8, "--output", "json", "--temperature", 0.8,
            "--top-k", 40, "--top-p", 0.9, "--seed", 5]
    assert json.loads(run(args).stdout)["tokens"] == json.loads(run(args).stdout)["tokens"]


def write_garbage(path):
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    return path


NAN = 0x7FC00000  # float32 bits


def nan_tensor(model, path, name, bits=None):
    """A copy of `model` whose F32 tensor `name` is all NaN (or all the float of `bits`)."""
    from spmd.gguf_file import GGUFFile
    info = GGUFFile(str(model)).info(name)
    data = bytearray(Path(model).read_bytes())
    data[info.offset:info.offset + info.nbytes] = (bits or NAN).to_bytes(4, "little") * (info.nbytes // 4)
    path.write_bytes(bytes(data))
    return path


def fifo(result, path):
    os.mkfifo(path)
    return result


def write_bytes(path, data):
    path.write_bytes(data)
    return path


def write_text(model, path, text):
    """Write a prompts file beside the test's files; the model is the usual one."""
    path.write_text(text)
    return model


def write_other_arch(path):
    w = GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), "float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_moe(path):
    """The start of a Mixtral-style file: architecture llama with experts."""
    w = GGUFWriter(str(path), "llama")
    w.add_expert_count(4)
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((4, 8, 8), "float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def one_token_more(model, path):
    """A copy of `model` whose vocabulary lists one token more than token_embd.weight has rows: 32 bytes more in the
    header (a 16-byte token, its score and type), so the tensors' aligned offsets still hold."""
    import struct
    data = bytearray(model.read_bytes())

    def array(key):  # (where the count is, where the items start)
        at = data.index(key.encode()) + len(key) + 8  # (the value's type, the items' type)
        return at, at + 8
    count_at, at = array("tokenizer.ggml.tokens")
    n = struct.unpack_from("<Q", data, count_at)[0]
    for _ in range(n):
        at += 8 + struct.unpack_from("<Q", data, at)[0]
    data[at:at] = struct.pack("<Q", 16) + b"sixteen-byte-tok"
    for key, item in (("tokenizer.ggml.scores", b"\0\0\0\0"), ("tokenizer.ggml.token_type", struct.pack("<i", 1))):
        count_at, at = array(key)
        data[at + 4 * n:at + 4 * n] = item
        data[count_at:count_at + 8] = struct.pack("<Q", n + 1)
    count_at, _ = array("tokenizer.ggml.tokens")
    data[count_at:count_at + 8] = struct.pack("<Q", n + 1)
    path.write_bytes(bytes(data))
    return path


def truncate(model, path):
    data = Path(model).read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


CASES = {
    "missing file": (lambda m, d: d / "nope.gguf", [], "model file not found"),
    "not gguf": (lambda m, d: write_garbage(d / "bad.gguf"), [], "is not a valid GGUF file"),
    "truncated": (lambda m, d: truncate(m, d / "half.gguf"), [], "not a valid GGUF file|truncated"),
    "unknown arch": (lambda m, d: write_other_arch(d / "mamba.gguf"), [], "architecture 'mamba' is not supported"),
    "mixture of experts": (lambda m, d: write_moe(d / "moe.gguf"), [],
                           r"moe.gguf: a mixture-of-experts model \(llama.expert_count 4, as Mixtral's\) is not "
                           "supported"),
    "ratio count": (lambda m, d: m, ["--ratios", "1:2:3:4:5"], "has 5 values but the job has"),
    "zero ratio": (lambda m, d: m, ["--ratios", "0"], "rank 0 cannot be idle"),
    "long prompt": (lambda m, d: m, ["--prompt", "word " * 60], "the model's context is 32"),
    "megabytes of prompt": (lambda m, d: write_text(m, d / "big.txt", "x" * 3_000_000),
                            ["--prompts-file", "{tmp}/big.txt"],
                            r"big.txt line 1 is 3000000 bytes long, more than any 32 tokens hold; the model's "
                            "context is 32"),
    "bad token id": (lambda m, d: m, ["--prompt-ids", "1,99999"], "--prompt-ids: token ids must be in 0..511"),
    "empty token id": (lambda m, d: m, ["--prompt-ids", "1,,2"], "'1,,2': expected token ids"),
    "token ids by spaces": (lambda m, d: m, ["--prompt-ids", "1 2"], "'1 2': expected token ids"),
    "empty prompts file name": (lambda m, d: m, ["--prompts-file", ""], "--prompts-file.*the name is empty"),
    "empty socket name": (lambda m, d: m, ["--control-socket", " "], "--control-socket.*the name is empty"),
    "no prompts file": (lambda m, d: m, ["--prompts-file", "{tmp}/none.txt"], "--prompts-file not found: .*none.txt"),
    "blank prompts file": (lambda m, d: write_text(m, d / "p.txt", "\n \n"), ["--prompts-file", "{tmp}/p.txt"],
                           "p.txt holds no prompt"),
    "bad JSON line": (lambda m, d: write_text(m, d / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "temp": 1}\n'),
                      ["--prompts-file", "{tmp}/p.jsonl"], "p.jsonl line 2: unknown field 'temp'"),
    "bad steps in JSON": (lambda m, d: write_text(m, d / "p.jsonl", '{"prompt": "a", "steps": 0}'),
                          ["--prompts-file", "{tmp}/p.jsonl"], 'p.jsonl line 1: "steps" must be a whole number'),
    "long prompt in a file": (lambda m, d: write_text(m, d / "p.txt", "ok\n" + "word " * 60),
                              ["--prompts-file", "{tmp}/p.txt"], "p.txt line 2 is .* the model's context is 32"),
    "zero sequences": (lambda m, d: m, ["--sequences", "0"], "Invalid value for '--sequences'"),
    "wait timeout below a second": (lambda m, d: m, ["--wait-timeout", "1e-9"],  # fired between steps, then exit 0
                                    "1e-09 is below a second: give 0 .wait for ever. or at least 1"),
    "non-ASCII digit": (lambda m, d: m, ["--threads", "\u00b2"], "--threads '\u00b2': expected a whole number"),
    "prompt not UTF-8": (lambda m, d: m, ["--prompt", b"caf\xff"], "the prompt is not UTF-8 text"),
    "tokenizer a FIFO": (lambda m, d: fifo(m, d / "tok"), ["--tokenizer", "{tmp}/tok"], "tok is not a regular file"),
    "tokenizer a device": (lambda m, d: m, ["--tokenizer", "/dev/zero"], "/dev/zero is not a regular file"),
    "model a FIFO": (lambda m, d: fifo(d / "m.gguf", d / "m.gguf"), [], "m.gguf is not a regular file"),
    "size of the wrong type": (lambda m, d: patch_meta(m, d / "t.gguf", "llama.embedding_length", 6, 64),
                               [], "embedding_length is .*; it must be a whole number"),
    "fewer blocks than layers": (lambda m, d: patch_meta(m, d / "b.gguf", "llama.block_count", 4, SHAPE.n_layers - 1),
                                 [], f"tensor blk.{SHAPE.n_layers - 1}.* is of a layer beyond the metadata's "
                                     rf"block_count \({SHAPE.n_layers - 1}\)"),
    "a tensor twice": (lambda m, d: write_bytes(d / "twice.gguf", m.read_bytes().replace(
        b"blk.1.attn_norm.weight", b"blk.0.attn_norm.weight", 1)), [], "tensor blk.0.attn_norm.weight appears more "
                                                                       "than once"),
    "BOS id a float": (lambda m, d: patch_meta(m, d / "o.gguf", "tokenizer.ggml.bos_token_id", 6, 0x3F800000),
                       [], r"tokenizer.ggml.bos_token_id must be a token id in 0..\d+, not 1.0"),
    "memory limit past any machine": (lambda m, d: m, ["--memory-limit", "9" * 400],
                                      "--memory-limit .*: beyond any machine's memory"),
    "NaN epsilon": (lambda m, d: patch_meta(m, d / "e.gguf", "llama.attention.layer_norm_rms_epsilon", 6, NAN),
                    [], "layer_norm_rms_epsilon is nan; it must be a finite number above 0"),
    "zero RoPE base": (lambda m, d: patch_meta(m, d / "r.gguf", "llama.rope.freq_base", 6, 0),
                       [], "rope.freq_base is 0.0; it must be a finite number above 0"),
    "NaN weights": (lambda m, d: nan_tensor(m, d / "n.gguf", "output_norm.weight"), [],
                    "logits for sequence 0 at position .* are not finite"),
    "infinite weights, numpy": (lambda m, d: nan_tensor(m, d / "n.gguf", "blk.0.attn_norm.weight", 0x7F800000),
                                ["--backend", "numpy"], "logits for sequence 0 at position .* are not finite"),  # (no
    # numpy warnings before it)
    "cache beyond memory": (lambda m, d: write_model(d / "huge.gguf", Shape(**{**SHAPE.__dict__, "context": 2**28})),
                            ["--steps", str(2**28 - 8), "--sequences", "2", "--prompt", "a", "--prompt", "b"],
                            "--sequences 2: the KV caches of 2 sequences of up to .* positions need .* GiB on rank"),
    "bad flag value": (lambda m, d: m, ["--allreduce", "tree"], "Invalid value for '--allreduce'"),
    "bad activations": (lambda m, d: m, ["--activations", "int4"], "Invalid value for '--activations'"),
    "bad kv cache": (lambda m, d: m, ["--kv-cache", "f8"], "Invalid value for '--kv-cache'"),
    "unknown backend": (lambda m, d: m, ["--backend", "cpu,tpu"], "--backend|'tpu'"),
    "backend count": (lambda m, d: m, ["--backend", "cpu,cpu,cpu,cpu,cpu"], "names 5 backends for"),
    "bad gpu": (lambda m, d: m, ["--gpu", "first"], "--gpu 'first': expected a whole number"),
    "no such gpu": (lambda m, d: m, ["--backend", "vulkan", "--gpu", "64"], "--gpu 64: this host has 1 Vulkan device"),
    "zero threads": (lambda m, d: m, ["--threads", "0"], "--threads must be at least 1"),
    "thread count": (lambda m, d: m, ["--threads", "1,1,1,1,1"], "--threads '1,1,1,1,1' names 5 values for"),
    "zero threads on one rank": (lambda m, d: m, ["--threads", "1,1,0"],  # (it hung: that rank alone stopped)
                                 "error: rank 2: --threads must be at least 1|names 3 values for 1 rank"),
    "no tokenizer file": (lambda m, d: m, ["--tokenizer", "/nonexistent.model"], "/nonexistent.model"),
    "empty tokenizer": (lambda m, d: write_text(m, d / "e.model", ""), ["--tokenizer", "{tmp}/e.model"],
                        "the file is empty"),
    "a directory": (lambda m, d: d, [], "is a directory, not a GGUF file"),
    "an empty model name": (lambda m, d: "", [], "model file: the name is empty"),
    "a header cut short": (lambda m, d: write_bytes(d / "short.gguf", b"GGUF\x03\x00\x00\x00"), [],
                           r"the file ends within its header \(8 bytes\): it is truncated"),
    "an empty memory limit": (lambda m, d: m, ["--memory-limit", "1G,"], "--memory-limit '1G,': an empty size"),
    "negative seed": (lambda m, d: m, ["--seed", "-1"], "Invalid value for '--seed'"),
    "nan temperature": (lambda m, d: m, ["--temperature", "nan"], "nan is not a finite number"),
    "huge ratio": (lambda m, d: m, ["--ratios", "1e100000000"], "--ratios '1e100000000': "),
    "stage count": (lambda m, d: m, ["--ratios", "1*1*1*1*1"], "has 5 values but the job has"),
    "more stages than layers": (lambda m, d: m, ["--ratios", "1*1*1"],  # at 1 rank: the count is wrong first
                                "makes 3 stages but the model has 2 layers|has 3 values but the job has 1 rank$"),
    "@N that do not add up": (lambda m, d: m, ["--ratios", "1:1@1*1@3"],
                              "the @N counts add up to 4 layers but the model has 2|has 3 values but the job has 1"),
    "bad @N": (lambda m, d: m, ["--ratios", "1@x"], r"--ratios '1@x': @x must be a whole number of layers"),
    "both prompts": (lambda m, d: m, ["--prompt", "Hi", "--prompt-ids", "1,2"], "not both"),
    "inconsistent file": (lambda m, d: patch_meta(m, d / "ffn.gguf", "llama.feed_forward_length", 4, 100),
                          [], "tensor blk.0.ffn_gate.weight has shape .128, 64. but the metadata implies .100, 64."),
    "zero kv heads": (lambda m, d: patch_meta(m, d / "kv0.gguf", "llama.attention.head_count_kv", 4, 0),
                      [], "head_count_kv is 0; it must be at least 1"),
    "huge block count": (lambda m, d: patch_meta(m, d / "n.gguf", "llama.block_count", 4, 2**32 - 1),  # hung
                         [], "block_count is 4294967295, but the file holds only 21 tensors"),
    "no rotated dims": (lambda m, d: patch_meta(m, d / "rd.gguf", "llama.rope.dimension_count", 4, 0),
                        [], r"inconsistent attention metadata .*rotated dims 0"),
    "vocab size that disagrees": (lambda m, d: patch_meta(m, d / "v.gguf", "llama.vocab_size", 4, 7),
                                  [], "vocab_size is 7, but token_embd.weight has 512 rows"),
    "more tokens than embeddings": (lambda m, d: one_token_more(m, d / "t.gguf"), [],
                                    r"t.gguf: its vocabulary \(tokenizer.ggml.tokens\) has 513 tokens but "
                                    "token_embd.weight has 512 rows"),
    "foreign tokenizer": (lambda m, d: m, ["--tokenizer", LLAMA2_TOKENIZER], "has 32000 pieces but the model's"),
    "plan and ratios": (lambda m, d: m, ["--plan", "auto", "--ratios", "1"], "give --ratios or --plan, not both"),
    "no profile": (lambda m, d: m, ["--plan", "{tmp}/none.json"], "profile not found: .*none.json"),
    "bad profile": (lambda m, d: write_text(m, d / "p.json", '{"format": "spmd-profile"}'),
                    ["--plan", "{tmp}/p.json"], "profile .*p.json: version is missing"),
    "bad memory limit": (lambda m, d: m, ["--memory-limit", "2X"], "--memory-limit '2X': expected a size"),
    "memory limit count": (lambda m, d: m, ["--memory-limit", "1G,1G,1G,1G,1G"], "--memory-limit .* names 5 sizes"),
    "memory limit too small": (lambda m, d: m, ["--memory-limit", "10K"],
                               r"--memory-limit is below what (a rank needs|ranks need): rank 0 has 10.0 KiB and "
                               r"needs \d+ bytes .*KV caches .* weight window"),
    "memory limit too small on vulkan": (lambda m, d: m, ["--backend", "vulkan", "--memory-limit", "10K"],
                                         r"--memory-limit is below what (a rank needs|ranks need): rank 0 has "
                                         r"10.0 KiB and needs \d+ bytes .*KV caches .* weight window"),
    "memory limit too small for any plan": (lambda m, d: m, ["--plan", "auto", "--memory-limit", "10K"],
                                            "--memory-limit is below what (a rank needs|ranks need)"),
    "another job's profile": (lambda m, d: m, ["--plan", str(HOUSEHOLD)],
                              "household.json was measured on (4 ranks but the job has|another model)"),
}


@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_every_rank_exits(model, tmp_path, case, ranks):
    if ranks > 1 and MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    make, extra, message = CASES[case]
    if LLAMA2_TOKENIZER in extra and not LLAMA2_TOKENIZER.exists():
        pytest.skip(f"{LLAMA2_TOKENIZER} is absent")
    extra = [a.replace("{tmp}", str(tmp_path)) if isinstance(a, str) else a for a in extra]
    steps = [] if "--steps" in extra else ["--steps", "4"]  # (within the model's context: no note of it)
    p = run(["--model", make(model, tmp_path), *steps, *extra], ranks=ranks, timeout=60)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr + p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("control socket: ")]
    errors = [ln for ln in lines if "rror" in ln]  # (a job that started said where its control socket is)
    assert lines == errors and len(errors) == 1, p.stderr  # once, from rank 0 only, and nothing before it
    assert re.search(message, errors[0]), errors[0]


def test_a_limit_just_short_of_the_need_is_told_in_bytes(model):
    """A limit a byte below a share's need rounds to the same KiB: the refusal then says it in bytes, so the two
    figures differ."""
    args = ["--model", model, "--steps", "4", "--memory-limit"]
    need = int(re.search(r"needs (\d+) bytes", run([*args, "10K"]).stderr).group(1))
    p = run([*args, str(need - 1)])
    assert p.returncode == 1 and f"rank 0 has {need - 1} bytes and needs {need} bytes (" in p.stderr, p.stderr
    assert run([*args, str(need)]).returncode == 0


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not on PATH")
def test_an_idle_ranks_memory_limit_asks_nothing_of_it(model):
    """An idle rank holds nothing: any --memory-limit of its own does (it was asked for activations and tables)."""
    p = run(["--model", model, "--steps", "4", "--ratios", "1:0", "--memory-limit", "100M,1K", "--output", "json"],
            ranks=2)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ranks"][1]["stage"] is None


@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("flags, line", [
    (["--activations", "int4"], "error: Invalid value for '--activations': 'int4' is not one of 'f32', 'int8'. "
                                "(see python -m spmd.run --help)"),
    (["--bogus"], "error: No such option '--bogus'"),
    (["--ratios"], "error: Option '--ratios' requires an argument. (see python -m spmd.run --help)"),
    (["--prompt-ids", "1,2", "--model", "m.gguf", "--prompt-ids=3"],  # (click alone runs on 3)
     "error: option --prompt-ids is given more than once (see python -m spmd.run --help)"),
    (["-n", "4", "--steps", "5"], "error: option --steps is given more than once")])
def test_a_bad_flag_is_one_line_on_stderr(flags, line, ranks):
    """A flag click refuses: one line (not click's usage block of three) from rank 0 alone, nothing on stdout."""
    if ranks > 1 and MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    p = run(flags, ranks=ranks, timeout=60)
    assert p.returncode != 0 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(line), p.stderr


@pytest.mark.parametrize("module", ["launch", "chat", "convert", "migrate", "plan", "profile", "serve"])
def test_every_command_says_a_bad_flag_in_one_line(module):
    p = subprocess.run([sys.executable, "-m", f"spmd.{module}", "--bogus"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode in (1, 2) and p.stdout == ""  # (2: click's; 1: the MPI commands, which agree on it first)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: No such option '--bogus'"), p.stderr
    assert p.stderr.endswith(f"(see python -m spmd.{module} --help)\n")


@pytest.mark.parametrize("module, flags", [("plan", ["--sequences", "2", "--sequences", "3"]),
                                           ("launch", ["--timeout", "5", "--timeout", "6"]),
                                           ("serve", ["--port", "1", "--port", "2"]),
                                           ("migrate", ["move", "--from", "1", "--from", "2"]),  # (a subcommand's)
                                           ("convert", ["llama2c", "--outtype", "f16", "--outtype", "q8_0"])])
def test_every_command_refuses_an_option_given_twice(module, flags):
    """click keeps the last value of an option given twice and says nothing; these are the commands' own options."""
    p = subprocess.run([sys.executable, "-m", f"spmd.{module}", *flags], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode in (1, 2) and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"error: option {flags[-2]} is given more than once")


@pytest.mark.parametrize("module, flags", [("serve", ["--alias", ""]), ("migrate", ["--socket", "", "status"]),
                                           ("run", ["--prompts-file", ""]), ("launch", ["--hostfile", ""])])
def test_an_empty_name_is_refused_not_taken_as_not_given(module, flags):
    """"" (an unset shell variable) for a name: one line, where it ran on as if the flag were not there (the
    default socket, no prompts file, the file's name as the model's id, every rank on this machine)."""
    p = subprocess.run([sys.executable, "-m", f"spmd.{module}", *flags], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode in (1, 2) and p.stdout == ""
    assert p.stderr.count("\n") == 1 and re.search(f"'{flags[0]}'( / '-.')?: the name is empty", p.stderr), p.stderr


def test_a_commands_own_refusal_is_one_error_line_as_spmd_runs(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("nosuchhost.invalid\n")
    p = subprocess.run([sys.executable, "-m", "spmd.launch", "--hostfile", str(hosts), "-n", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == f"error: {hosts} line 1: host 'nosuchhost.invalid' does not resolve\n", p.stderr


@pytest.mark.parametrize("module", ["run", "serve", "chat", "launch", "convert", "migrate", "plan", "profile"])
def test_a_python_without_the_set_up_is_one_line(module):
    """Run by a Python that lacks the set-up's packages (here the venv's own with its site-packages off: python -S),
    each command says what it lacks in one line, not a traceback (spmd.needs)."""
    p = subprocess.run([sys.executable, "-S", "-m", f"spmd.{module}", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: this Python ("), p.stderr
    assert "lacks numpy, click, mpi4py" in p.stderr and "scripts/setup.sh" in p.stderr


def test_the_set_ups_check_names_every_dependency():
    """spmd.needs checks what pyproject.toml installs (a dependency it missed gave a traceback from its import)."""
    import re
    import tomllib
    from spmd.needs import IMPORTS
    with open(ROOT / "pyproject.toml", "rb") as f:
        listed = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in tomllib.load(f)["project"]["dependencies"]}
    assert listed - {"mpich", "vulkan"} == set(IMPORTS)


@pytest.mark.parametrize("ranks, raised, line", [
    (3, 'ImportError("not installed")', "error: rank 2: cannot import a module (not installed): install the set-up "
                                        "on every host (scripts/setup.sh)"),
    (2, 'RuntimeError("half installed")', "error: rank 1: a module failed to import (RuntimeError: half installed): "
                                          "install the set-up on every host (scripts/setup.sh)")])
def test_a_module_broken_on_one_rank_stops_every_rank(model, tmp_path, ranks, raised, line):
    """One host's Python cannot import sentencepiece (missing, or failing otherwise): one line on rank 0 naming
    that rank, and every rank exits at once (it used to print a traceback and leave the others waiting for ever;
    an error other than ImportError hung them)."""
    if MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    (tmp_path / "sentencepiece.py").write_text(f"raise {raised}\n")
    job = [sys.executable, "-m", "spmd.run", "--model", str(model), "--steps", "2", "--control-socket", "none"]
    p = subprocess.run([MPIRUN, "-n", str(ranks - 1), *job, ":", "-n", "1", "env", f"PYTHONPATH={tmp_path}", *job],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [line]


def test_another_program_on_one_rank_is_one_line(model):
    """spmd.run on rank 0 and spmd.profile on the others (a typo in an MPMD line): one line, no traceback (three
    tracebacks before)."""
    if MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    p = subprocess.run([MPIRUN, "-n", "1", sys.executable, "-m", "spmd.run", "--model", str(model), "--steps", "2",
                        ":", "-n", "2", sys.executable, "-m", "spmd.profile", "--model", str(model)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "error: rank 1 runs another program than rank 0" in p.stderr


def test_sentencepiece_tokenizer_file(tmp_path):
    if not LLAMA2_TOKENIZER.exists():
        pytest.skip(f"{LLAMA2_TOKENIZER} is absent")
    import sentencepiece as spm
    model = write_model(tmp_path / "v32k.gguf", Shape(dim=64, n_heads=4, n_kv_heads=2, ffn=128, vocab=32000,
                                                      context=64), qtype="F32", seed=0)
    text = "Hello world, ünïcode!"
    p = run(["--model", model, "--tokenizer", LLAMA2_TOKENIZER, "--prompt", text, "--steps", 3, "--output", "json"])
    assert p.returncode == 0, p.stderr
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    r = json.loads(p.stdout)
    assert r["prompt_tokens"] == [sp.bos_id()] + sp.encode(text)
    assert r["text"] == sp.decode(r["prompt_tokens"][1:] + r["tokens"])[len(text):]


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_reader_that_leaves_early_stops_generation_cleanly(tmp_path, ranks):
    """`... | head -c 8`: no traceback, no hang. One rank stops generating, exits 0 and still prints its summary.
    Under mpirun, rank 0 writes into mpirun's pipe, so mpirun takes the SIGPIPE (as `yes | head` does) and ends
    the ranks: it must leave none behind."""
    if ranks > 1 and MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    model = write_model(tmp_path / "long.gguf", Shape(dim=64, n_heads=4, n_kv_heads=2, ffn=128, vocab=512,
                                                      context=4096), qtype="F32", seed=3)
    cmd = [sys.executable, "-m", "spmd.run", "--model", str(model), "--prompt", "Hello", "--steps", "4000"]
    if ranks > 1:
        cmd = [MPIRUN, "-n", str(ranks), *cmd]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert len(p.stdout.read(8)) == 8
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert "Traceback" not in err
    if ranks == 1:
        assert p.returncode == 0, err
        summary = err.splitlines()[-1]
        assert summary.startswith("[spmd] ") and int(summary.split()[1]) < 4000  # it stopped early
    else:
        assert p.returncode in (0, -signal.SIGPIPE), err
        if shutil.which("pgrep") is None:
            return
        for _ in range(50):  # mpirun ends its ranks within moments
            left = subprocess.run(["pgrep", "-f", str(model)], capture_output=True, text=True).stdout
            if not left:
                break
            time.sleep(0.2)
        assert left == "", f"ranks left running: {left}"


@pytest.mark.parametrize("output", ["text", "json"])
def test_an_output_that_cannot_be_written_is_one_line(model, output):
    """stdout on a full disk (/dev/full) was an OSError traceback and an MPI_Abort; a JSON result into a pipe
    closed early was a BrokenPipeError traceback. Now: one line and exit 1; nothing said and exit 0."""
    args = ["--model", model, "--prompt", "a", "--prompt", "b", "--steps", 4, "--output", output]
    cmd = [sys.executable, "-m", "spmd.run", *map(str, args)]
    with open("/dev/full", "w") as full:
        p = subprocess.run(cmd, cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "error: cannot write the output: No space left on device"
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # (before the result comes)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "Traceback" not in err and "rror" not in err, err


def test_a_top_k_past_any_vocabulary_keeps_them_all(model):
    """--top-k 2^63 did not fit the step record (an OverflowError traceback): it samples as any top-k past the
    vocabulary does."""
    texts = []
    for k in (2**63, 2**31 - 1):
        p = run(["--model", model, "--prompt", "a", "--steps", 6, "--temperature", 1, "--seed", 3, "--top-k", k,
                 "--output", "json"])
        assert p.returncode == 0, p.stderr
        texts.append(json.loads(p.stdout)["tokens"])
    assert texts[0] == texts[1]


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_model_file_written_on_another_rank_stops_every_rank(tmp_path, ranks):
    """The last rank reads its own copy of the model (another host's file), which is truncated mid-generation:
    that rank reads nothing more from it (it used to end in a SIGBUS there), and rank 0 says why in one line."""
    if MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    model = write_model(tmp_path / "long.gguf", Shape(dim=64, n_heads=4, n_kv_heads=2, ffn=128, vocab=512,
                                                      context=4096), qtype="F32", seed=3)
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(model, copy)
    job = [sys.executable, "-m", "spmd.run", "--prompt", "Hello", "--steps", "4000", "--threads", "1",
           "--control-socket", "none"]
    p = subprocess.Popen([MPIRUN, "-n", str(ranks - 1), *job, "--model", str(model), ":", "-n", "1", *job,
                          "--model", str(copy)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert len(p.stdout.read(8)) == 8  # generating
    with open(copy, "r+b") as f:
        f.truncate(os.path.getsize(copy) // 2)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith(f"error: the model file {copy} on rank {ranks - 1} (")
    assert err.strip().endswith("was written during the run (truncated or overwritten); generation stopped")
    assert "Traceback" not in err and "Bus error" not in err and len(out) < 4000


@pytest.mark.parametrize("ranks, sig", [(1, signal.SIGINT), (1, signal.SIGTERM), (1, signal.SIGHUP),
                                        (3, signal.SIGINT), (3, signal.SIGTERM)],
                         ids=["1-SIGINT", "1-SIGTERM", "1-SIGHUP", "3-SIGINT", "3-SIGTERM"])
def test_a_signal_stops_every_rank_and_removes_the_socket(tmp_path, ranks, sig):
    """Ctrl-C or a SIGTERM to mpirun (it passes them on to every rank) mid-generation: no traceback, a non-zero
    exit, and the control socket file gone."""
    if ranks > 1 and MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    model = write_model(tmp_path / "long.gguf", Shape(dim=64, n_heads=4, n_kv_heads=2, ffn=128, vocab=512,
                                                      context=4096), qtype="F32", seed=3)
    sock = tmp_path / "c.sock"
    cmd = [sys.executable, "-m", "spmd.run", "--model", str(model), "--prompt", "Hello", "--steps", "4000",
           "--threads", "1", "--control-socket", str(sock)]
    if ranks > 1:
        cmd = [MPIRUN, "-n", str(ranks), *cmd]
    before = shm_files()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert len(p.stdout.read(8)) == 8  # generating
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig or ranks > 1 and p.returncode != 0  # mpirun reports in its own way
    assert "Traceback" not in err, err
    assert "UCX" not in out + err  # (a SIGHUP was UCX's debug signal: it went on, with debug lines in the text)
    assert not sock.exists() and no_new_shm_files(before)  # (an abort left MPICH's file: its janitor, spmd.shm)


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not on PATH")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_one_rank_alone_stops_the_job_as_rank_0s_would(tmp_path, sig):
    """A SIGTERM or Ctrl-C that reaches one rank other than 0 (its host shutting down, a kill by hand): rank 0 is
    asked to stop as if it had got it, so the job ends within seconds, says which rank, and removes the control
    socket file (rank 0 was taken down by the other's abort before it could)."""
    model = write_model(tmp_path / "long.gguf", Shape(dim=64, n_heads=4, n_kv_heads=2, ffn=128, vocab=512,
                                                      context=4096), qtype="F32", seed=3)
    sock = tmp_path / "c.sock"
    before = shm_files()
    p = subprocess.Popen([MPIRUN, "-n", "3", sys.executable, "-m", "spmd.run", "--model", str(model), "--prompt",
                          "Hello", "--steps", "4000", "--threads", "1", "--control-socket", str(sock)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert len(p.stdout.read(8)) == 8  # generating
    os.kill(rank_pid(str(model), 2), sig)
    t = time.monotonic()
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and time.monotonic() - t < 15
    assert "Traceback" not in err, err
    assert f"note: rank 2 was stopped ({signal.Signals(sig).name}): stopping the job" in err, err
    assert not sock.exists() and no_new_shm_files(before)


@pytest.mark.parametrize("sig, status", [(None, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_a_compiled_function_stops_like_any_other(monkeypatch, capsys, sig, status):
    """A Ctrl-C or SIGTERM that lands inside a numba call comes back as a SystemError caused by the
    KeyboardInterrupt (seen once in 30 runs of the SIGTERM test above under load: exit 1 and a traceback); it
    stops with the signal's status and no traceback, as one anywhere else does."""
    from mpi4py import MPI

    from spmd import run
    from spmd.comm import Comm

    monkeypatch.setattr(run, "_signals", [])

    def abort(_comm, code):  # the path of a bug (it would end pytest too)
        raise AssertionError(f"taken for a bug: MPI_Abort({code})")

    monkeypatch.setattr(Comm, "abort", abort)

    def work():
        try:
            if sig is None:
                raise KeyboardInterrupt
            run.interrupt(sig, None)  # what the SIGTERM handler does
        except KeyboardInterrupt as e:
            raise SystemError("CPUDispatcher(<function f>) returned a result with an exception set") from e

    with pytest.raises(SystemExit) as stopped:
        run.guarded(Comm(comm=MPI.COMM_SELF), print, work)
    assert stopped.value.code == status
    assert "Traceback" not in capsys.readouterr().err


def test_stale_mpich_shared_memory_is_removed_at_start(tmp_path):
    """MPICH's /dev/shm files left by a job that ended abnormally: a job's start removes this user's old ones that
    no process maps, and old topology files; a new one (a job starting) and a mapped one (a job running) stay."""
    import mmap

    from spmd.shm import AGE_S, remove_stale
    old, new, mapped = (tmp_path / f"mpich_shm_{name}_0" for name in ("old", "new", "mapped"))
    for path in (old, new, mapped):
        path.write_bytes(b"\0" * 4096)
    (tmp_path / "other").write_bytes(b"x")
    past = time.time() - AGE_S - 10
    for path in (old, mapped, tmp_path / "other"):
        os.utime(path, (past, past))
    topology = tmp_path / "tmp"  # MPI_Init's topology files: an old one is an aborted job's
    topology.mkdir()
    for name in ("old", "new"):
        (topology / f"hydra_hwloc_xmlfile_{name}").write_text("<topology/>")
    os.utime(topology / "hydra_hwloc_xmlfile_old", (past, past))
    with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        assert remove_stale(str(tmp_path), (str(topology), "hydra_hwloc_xmlfile_")) == \
            [old.name, "hydra_hwloc_xmlfile_old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([new.name, mapped.name, "other", "tmp"])
    assert [p.name for p in topology.iterdir()] == ["hydra_hwloc_xmlfile_new"]


def assert_rank_0_gives_up(model, tmp_path, ranks, flags, stop_at, ending):
    """A job of `ranks` with --wait-timeout 2 and SPMD_TEST_SIGNAL `stop_at` (a rank SIGSTOPs itself): it ends
    non-zero within 45 s with one error line, rank 0's, that ends with `ending`, and leaves neither the control
    socket's file nor MPICH's shared memory behind."""
    if MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    t, before, sock = time.monotonic(), shm_files(), tmp_path / "c.sock"
    p = subprocess.run([MPIRUN, "-n", str(ranks), sys.executable, "-m", "spmd.run", "--model", str(model), *flags,
                        "--wait-timeout", "2", "--control-socket", str(sock)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SPMD_TEST_SIGNAL": stop_at})
    assert p.returncode != 0 and time.monotonic() - t < 45
    errors = [line for line in p.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0 (") and errors[0].endswith(ending), p.stderr
    assert not sock.exists() and no_new_shm_files(before)


@pytest.mark.parametrize("stopped", [1, 2])
def test_a_stopped_rank_ends_the_job_after_the_wait_timeout(model, stopped, tmp_path):
    """A rank frozen mid-generation (SIGSTOP, the test hook SPMD_TEST_SIGNAL): the others no longer wait for ever;
    after --wait-timeout rank 0 says so in one line and every rank is taken down, leaving neither the control
    socket's file nor MPICH's shared memory behind."""
    assert_rank_0_gives_up(model, tmp_path, 3, ["--steps", "25", "--ratios", "1*1:1"], f"{stopped}:4:STOP",
                           "no step for over 2 s: another rank has stopped or its host is gone (--wait-timeout)")


def test_a_rank_stopped_while_the_job_sets_up_ends_it_after_the_wait_timeout(model, tmp_path):
    """A rank frozen as it starts to load (SIGSTOP, SPMD_TEST_SIGNAL's "load"): the others, waiting for it in the
    set-up's next collective, give up after --wait-timeout with one line from rank 0, leaving no socket file and no
    shared memory behind (they had waited for ever in MPI's own spin)."""
    assert_rank_0_gives_up(model, tmp_path, 2, ["--steps", "4"], "1:load:STOP",
                           "waited 2 s for the other ranks while setting up: a rank has stopped or its host is gone "
                           "(--wait-timeout)")


def test_a_rank_stopped_as_the_text_ends_does_not_hold_the_others_in_the_last_collective(model, tmp_path):
    """A rank frozen at the STOP step record (SPMD_TEST_SIGNAL's "stop"): the others go on into the run's last
    collectives (the agreed error, the per-rank figures), which MPI waits in, in C. The watchdog bounds that wait
    too: after --wait-timeout rank 0 says so in one line and every rank is taken down (they had waited for ever)."""
    assert_rank_0_gives_up(model, tmp_path, 3, ["--steps", "4"], "2:stop:STOP",
                           "waited over 2 s inside a collective: another rank has stopped or its host is gone "
                           "(--wait-timeout)")


def test_ctrl_c_ends_a_job_whose_rank_stopped_while_it_set_up(model):
    """Ctrl-C (SIGINT to the job's process group, as a terminal sends it) while rank 0 waits for a frozen rank in
    the set-up: the job ends at once, not after --wait-timeout."""
    if MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    p = subprocess.Popen([MPIRUN, "-n", "2", sys.executable, "-m", "spmd.run", "--model", str(model), "--steps", "4",
                          "--wait-timeout", "300", "--control-socket", "none"], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "SPMD_TEST_SIGNAL": "1:load:STOP"},
                         start_new_session=True)
    try:
        time.sleep(8)  # (rank 1 stopped as it began to load; rank 0 loaded and waits)
        assert p.poll() is None
        t = time.monotonic()
        os.killpg(p.pid, signal.SIGINT)
        p.wait(30)
        assert p.returncode != 0 and time.monotonic() - t < 20
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        subprocess.run(["pkill", "-KILL", "-f", f"spmd.run --model {model}"])


def test_ranks_waiting_for_a_stopped_rank_do_not_spin(model):
    """While rank 1 is frozen (in the middle of a step: the others wait in an allreduce), the other ranks wait for it
    without holding a core each: they nap between tests of their MPI requests."""
    if MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    tick = os.sysconf("SC_CLK_TCK")

    def stat(pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], (int(fields[11]) + int(fields[12])) / tick  # state, CPU seconds

    p = subprocess.Popen([MPIRUN, "-n", "3", sys.executable, "-m", "spmd.run", "--model", str(model), "--steps",
                          "25", "--ratios", "1:1:1", "--wait-timeout", "20", "--control-socket", "none",
                          "--threads", "1"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "SPMD_TEST_SIGNAL": "1:4:STOP"}, start_new_session=True)
    try:
        deadline, ranks = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            ranks = [int(x) for x in subprocess.run(["pgrep", "-f", f"python -m spmd.run --model {model}"],
                                                    capture_output=True, text=True).stdout.split() if int(x) != p.pid]
            states = {pid: stat(pid)[0] for pid in ranks if os.path.exists(f"/proc/{pid}")}
            if "T" in states.values():
                break
            time.sleep(0.2)
        waiting = [pid for pid, state in states.items() if state != "T"]
        assert len(waiting) == 2, states
        time.sleep(1.0)  # past the first 50 ms of testing the requests
        before = {pid: stat(pid)[1] for pid in waiting}
        time.sleep(3.0)
        used = {pid: stat(pid)[1] - before[pid] for pid in waiting}
        assert all(seconds < 0.3 * 3.0 for seconds in used.values()), used  # spinning would be about 3 s each
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or MPIRUN is None, reason="needs two cores and mpirun")
def test_a_rank_bound_to_fewer_cores_than_its_threads_says_so(model):
    """A launcher's binding (here the job's CPU affinity set to one core, as Open MPI's mpirun sets each rank's)
    leaves a rank fewer cores than --threads gives it, or than its share of the host's: a note says which rank and
    how many it runs with; the text does not change, and a rank with the cores it was given says nothing; --threads
    above the host's cores gets a note of its own."""
    one_core = lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # noqa: E731
    job = [sys.executable, "-m", "spmd.run", "--model", str(model), "--prompt", "Hello", "--steps", "4",
           "--control-socket", "none"]
    host = os.cpu_count()

    def go(*flags, ranks=2, bound=True):
        p = subprocess.run([MPIRUN, "-n", str(ranks), *job, *flags], cwd=ROOT, capture_output=True, text=True,
                           timeout=90, preexec_fn=one_core if bound else None)
        assert p.returncode == 0, p.stderr
        return p.stdout, [line for line in p.stderr.splitlines() if "kernel thread" in line]

    why = ("(its CPU affinity, which a launcher's binding sets: Open MPI's mpirun binds ranks to cores unless given "
           "--bind-to none): 1 kernel thread")
    free, notes = go("--threads", "1", bound=False)
    assert notes == []
    text, notes = go("--threads", "1,2")
    assert text == free
    assert notes == [f"rank 1: note: --threads 2, but this rank may run on only 1 of the host's {host} cores {why}"]
    assert go("--threads", "1")[1] == []  # as many cores as threads: nothing to say
    _, notes = go(ranks=1)  # no --threads: one rank's share of the host is all its cores
    assert notes == [f"note: this rank may run on only 1 of the host's {host} cores {why}"]
    text, notes = go("--threads", str(host + 1), ranks=1, bound=False)  # more than the host has
    assert notes == [f"note: --threads {host + 1}, but the host has {host} cores: {host} kernel threads"]


@pytest.mark.parametrize("ranks", [1, 2])
def test_an_mpi_call_that_fails_is_one_line_not_a_bug(ranks):
    """A rank's MPI call fails (a peer has died: seen in a pipeline's gather of candidates): one line naming the
    rank, after a moment for the dead rank's watcher to say which it was; no traceback, every rank exits."""
    if ranks > 1 and MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    code = ("from spmd import comm as C\nfrom spmd.run import guarded\nc = C.Comm()\n"
            "def work():\n    if c.rank:\n        c.barrier()\n    raise C.MPI.Exception(C.MPI.ERR_OTHER)\n"
            "guarded(c, print, work)")
    cmd = [sys.executable, "-c", code]
    p = subprocess.run([MPIRUN, "-n", str(ranks), *cmd] if ranks > 1 else cmd, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    said = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].startswith("error: rank 0 (") and \
        "an MPI call failed (" in said[0] and said[0].endswith("a rank has died or its host is gone"), p.stderr


def test_stdout_is_rank_0s():
    """What another rank prints on stdout (a library's stray terminal escape landed inside rank 0's JSON line on an
    H100 host) goes to stderr: stdout holds rank 0's output alone."""
    if MPIRUN is None:
        pytest.skip("mpirun not on PATH")
    code = ("from spmd import comm as C\nfrom spmd.run import stdout_to_rank_0\nc = C.Comm()\nstdout_to_rank_0(c)\n"
            "print(f'rank {c.rank}', flush=True)\nc.barrier()")
    p = subprocess.run([MPIRUN, "-n", "3", sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "rank 0\n" and sorted(p.stderr) == sorted("rank 1\nrank 2\n")  # (the two may interleave)


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipes"])
def test_a_note_that_comes_mid_line_starts_a_line_of_its_own_on_a_terminal(terminal):
    """Rank 0's notes (a rebalance, a migration) go to stderr while the text streams to stdout: on a terminal that
    both share, a note that comes mid-line starts on a new line and the text goes on below it; piped, neither
    stream gets a byte it did not have."""
    import pty
    code = ("import types; from spmd.run import root_log, write_stdout\n"
            "log = root_log(types.SimpleNamespace(is_root=True))\n"
            "write_stdout('Once upon'); log('note: moved'); write_stdout(' a time\\n'); log('note: done')\n")
    if not terminal:
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert (p.returncode, p.stdout, p.stderr) == (0, "Once upon a time\n", "note: moved\nnote: done\n")
        return
    main, side = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=side, stderr=side)
    os.close(side)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # (EIO: the child closed the terminal)
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert proc.wait(60) == 0
    assert seen.decode() == "Once upon\r\nnote: moved\r\n a time\r\nnote: done\r\n"


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_a_rank_that_ends_before_mpi_starts_ends_the_job_within_the_start_wait(model):
    """MPI's start waits for every rank of the job, holding the interpreter: where one ended before its own start
    (here a stand-in for a host without the set-up), rank 0 waited for ever. Now the start's wait
    (SPMD_START_WAIT_S) ends it with one line, and nothing is left in /dev/shm."""
    from spmd.comm import START_FAILED
    before, start = shm_files(), time.monotonic()
    p = subprocess.run([MPIRUN, "-n", "1", sys.executable, "-m", "spmd.run", "--model", str(model), "--steps", "3",
                        ":", "-n", "1", sys.executable, "-c", "import sys; sys.exit('error: no set-up here')"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SPMD_START_WAIT_S": "3"})
    assert p.returncode != 0 and time.monotonic() - start < 60, p.stderr
    errors = {line for line in p.stderr.splitlines() if line.startswith("error:")}
    assert errors == {"error: no set-up here", START_FAILED.format(seconds=3).strip()}, p.stderr
    assert "Traceback" not in p.stderr
    assert no_new_shm_files(before)


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_ctrl_c_while_mpi_starts_ends_the_job(model):
    """A Ctrl-C that comes while rank 0 is in MPI's start, waiting for a rank that has not started (no Python
    handler runs there), ends the job at once, not after the start's wait, and without a traceback. The other rank
    stands in for one that the Ctrl-C reached before its start: it exits 1 (as a KeyboardInterrupt's traceback
    did), which mpirun does not take for a failure of the job, and rank 0 waited for ever. MPI's shared-memory
    file, which rank 0's start had made, is removed."""
    before = shm_files()
    stand_in = "import signal, os, time; signal.signal(signal.SIGINT, lambda *_: os._exit(1)); time.sleep(60)"
    proc = subprocess.Popen([MPIRUN, "-n", "1", sys.executable, "-m", "spmd.run", "--model", str(model), "--steps",
                             "3", ":", "-n", "1", sys.executable, "-c", stand_in], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "SPMD_START_WAIT_S": "100"})
    try:
        pid = rank_pid("spmd.run", 0)
        deadline = time.monotonic() + 60
        while "libmpi" not in Path(f"/proc/{pid}/maps").read_text():  # (loaded: in MPI's start, for good)
            assert time.monotonic() < deadline, "rank 0 did not reach MPI's start"
            time.sleep(0.05)
        time.sleep(1.0)  # (in MPI_Init's wait, past mpi4py's own Python code around it)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert no_new_shm_files(before)


def test_steps_past_the_context_from_a_prompts_file_are_said_to_be_its_own(model, tmp_path):
    """A line of --prompts-file whose steps pass the model's context is capped, and the note says "its steps"
    (the line's, or --steps for the others), not --steps alone."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "Once", "steps": 100000}\n')
    p = run(["--model", model, "--prompts-file", tmp_path / "p.jsonl", "--output", "json"])
    assert p.returncode == 0, p.stderr
    assert (f"note: {tmp_path / 'p.jsonl'} line 1: the prompt's tokens and its steps would pass the model's context "
            f"of {SHAPE.context} positions; generating up to it") in p.stderr, p.stderr

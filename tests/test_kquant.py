"""K-quant files made by llama.cpp's own quantiser (tests/kquant, scripts/make_kquant_files.py): spmd holds them with
the file's numbers (as they are) and its greedy tokens equal tests/reference.py's, which dequantises every weight
with the gguf package; at several ranks, layouts and stages they equal one rank's."""
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import reference
from mpi_models import UNEQUAL, WORLD, generate, one_rank_tokens
from spmd.gguf_file import GGUFFile
from spmd.quants import K_QUANTS, NATIVE

FILES = sorted((Path(__file__).parent / "kquant").glob("*.gguf"))
PROMPT = (1, 72, 101, 108, 108, 111, 44, 32)
STEPS = 12


def test_the_files_are_there():
    assert {f.stem for f in FILES} >= {"q4_k_m", "q5_k_m", "q6_k", "q4_k_m_rows96", "q3_k_m", "iq4_nl", "q2_k"}


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_llama_cpp_files_are_held_with_their_numbers_and_give_the_reference_tokens(path):
    f = GGUFFile(path)
    types = {info.qtype for info in f.tensors.values() if len(info.shape) == 2}
    f.close()
    named = {"q3_k_m": {T.Q3_K}, "iq4_nl": {T.IQ4_NL}, "q2_k": {T.Q2_K, T.Q3_K}}.get(path.stem, set())
    assert types & named == named  # the types the file is named after (Q2_K's llama.cpp gives Q3_K where it matters)
    assert types <= set(NATIVE)  # nothing for the engine to dequantise at load
    if "rows96" not in path.stem and path.stem != "iq4_nl":
        assert types & set(K_QUANTS)
    got = one_rank_tokens(model=str(path), prompt_tokens=PROMPT, steps=STEPS)
    assert got == reference.greedy(path, list(PROMPT), STEPS)


def tensor_type_at(data, name):
    """The byte offset of a tensor's type in a GGUF file's tensor index."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    return at + 4 + 8 * struct.unpack_from("<I", data, at)[0]


def test_a_type_spmd_cannot_read_is_one_line(tmp_path):
    """gguf's code dequantises the types the engine does not keep, but not all of them (Q8_K, Q8_1, integers):
    such a file is refused at start-up with one line naming the tensor and its type. (The file's last tensor
    becomes Q8_K, the file growing by what that type takes more: a tensor that overlapped the next one would be
    refused as a corrupt file first.)"""
    from gguf import GGML_QUANT_SIZES
    path = Path(__file__).parent / "kquant" / "q4_k_m.gguf"
    f = GGUFFile(path)
    last = max(f.tensors.values(), key=lambda info: info.offset)
    f.close()
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, tensor_type_at(data, last.name), int(T.Q8_K))
    block, size = GGML_QUANT_SIZES[T.Q8_K]
    data += bytes(last.offset + int(np.prod(last.shape)) // block * size - len(data))
    bad = tmp_path / "q8_k.gguf"
    bad.write_bytes(data)
    p = subprocess.run([sys.executable, "-m", "spmd.run", "--model", str(bad), "--prompt", "Hi", "--steps", "2"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines()[-1] == f"error: {bad}: tensor {last.name} is in Q8_K, a type " \
        "spmd cannot read"
    assert "Traceback" not in p.stderr


def test_a_float_slice_of_a_type_read_as_floats_holds_only_its_columns(tmp_path):
    """A type dequantised at load (here Q4_K taken off the kept list) is floats: a column slice that cut its
    super-blocks holds just its own columns, not the blocks around them."""
    from spmd import gguf_file
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_file, "NATIVE", tuple(t for t in NATIVE if t != T.Q4_K))
        f = GGUFFile(Path(__file__).parent / "kquant" / "q4_k_m.gguf")
        part = f.col_ranges("blk.0.attn_output.weight", [(64, 128)], notice=lambda _m: None)
        whole = f.rows("blk.0.attn_output.weight", 0, 256, notice=lambda _m: None)
        f.close()
    assert part.qtype == T.F32 and part.keep is None and part.data.shape == (256, 64)
    assert np.array_equal(part.data, whole.data[:, 64:128])


@pytest.mark.mpi
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_llama_cpp_files_give_the_same_tokens_at_any_layout(path):
    expected = one_rank_tokens(model=str(path), prompt_tokens=PROMPT, steps=STEPS)
    stages = {2: "1*1", 3: "1:1*1", 4: "1:1*1:1"}  # two layers: two stages at most
    layouts = [None, UNEQUAL[WORLD.size]] + ([stages[WORLD.size]] if WORLD.size > 1 else [])
    for ratios in layouts:
        result = generate(WORLD, model=str(path), prompt_tokens=PROMPT, steps=STEPS, ratios=ratios)
        if WORLD.rank == 0:
            assert result["tokens"] == expected, ratios

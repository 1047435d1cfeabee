"""K-quant files made by llama.cpp's own quantiser (tests/kquant, scripts/make_kquant_files.py): spmd reads them as
they are (no type dequantised at load) and its greedy tokens equal tests/reference.py's, which dequantises every
weight with the gguf package; at several ranks, layouts and stages they equal one rank's."""
from pathlib import Path

import pytest

import reference
from mpi_models import UNEQUAL, WORLD, generate, one_rank_tokens
from spmd.gguf_file import GGUFFile
from spmd.quants import K_QUANTS, NATIVE

FILES = sorted((Path(__file__).parent / "kquant").glob("*.gguf"))
PROMPT = (1, 72, 101, 108, 108, 111, 44, 32)
STEPS = 12


def test_the_files_are_there():
    assert {f.stem for f in FILES} >= {"q4_k_m", "q5_k_m", "q6_k", "q4_k_m_rows96"}


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_llama_cpp_files_are_kept_as_they_are_and_give_the_reference_tokens(path):
    f = GGUFFile(path)
    types = {info.qtype for info in f.tensors.values() if len(info.shape) == 2}
    f.close()
    assert types <= set(NATIVE)  # nothing for the engine to dequantise at load
    if "rows96" not in path.stem:
        assert types & set(K_QUANTS)
    got = one_rank_tokens(model=str(path), prompt_tokens=PROMPT, steps=STEPS)
    assert got == reference.greedy(path, list(PROMPT), STEPS)


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

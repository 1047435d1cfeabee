"""Multi-rank generation: greedy tokens at any rank count, ratios and allreduce equal those of one rank.

Run with: mpirun -n 3 python -m pytest --with-mpi tests/test_engine_mpi.py (passes at any -n)."""
import os

import numba
import numpy as np
import pytest

from mpi_models import MPI, PROMPT, SHAPE, UNEQUAL, WORLD, generate, one_rank_tokens, shared_models
from spmd.comm import Comm
from spmd.engine import Engine, RunOptions
from spmd.prompts import PromptSpec
from spmd.synth import Shape


# K-quant files as llama.cpp's quantiser lays them out: rows of 256 (Q4_K / Q5_K, Q6_K where more bits go), and
# with rows of 96 its fallbacks (Q5_0, Q5_1, Q8_0); a head's 64 columns cut Q4_K's 256-column super-blocks
K_SHAPE = Shape(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn=768, vocab=512, context=64)
K_MODELS = {"Q4_K_M": (K_SHAPE, "Q4_K_M", 7), "Q5_K_M": (K_SHAPE, "Q5_K_M", 7), "Q6_K": (K_SHAPE, "Q6_K", 7),
            "Q5_K_M rows of 96": (Shape(**{**SHAPE.__dict__, "dim": 96, "ffn": 160, "n_layers": 4}), "Q5_K_M", 7),
            # qwen3 (per-head q/k norms) with heads of 128: q is 512 wide where dim is 256
            "qwen3 Q4_K_M": (Shape(**{**K_SHAPE.__dict__, "arch": "qwen3", "key_length": 128}), "Q4_K_M", 7),
            "Q3_K_M": (K_SHAPE, "Q3_K_M", 7), "IQ4_NL": (K_SHAPE, "IQ4_NL", 7)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    one_kv_head = Shape(**{**SHAPE.__dict__, "n_kv_heads": 1})
    yield from shared_models(tmp_path_factory, "spmd-test-", {
        "Q5_0 one kv head": (one_kv_head, "Q5_0", 7), "Q5_1": (SHAPE, "Q5_1", 7), "Q4_1": (SHAPE, "Q4_1", 7),
        "F32 seed 2": (SHAPE, "F32", 2), **K_MODELS})


@pytest.mark.mpi
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("allreduce", ["star", "ring", "mpi"])
@pytest.mark.parametrize("unequal", [False, True], ids=["equal", "unequal"])
def test_tokens_equal_single_rank(models, qtype, allreduce, unequal):
    expected = one_rank_tokens(model=models[qtype])
    ratios = UNEQUAL[WORLD.size] if unequal else None
    result = generate(WORLD, model=models[qtype], allreduce=allreduce, ratios=ratios)
    if WORLD.rank == 0:
        assert len(result["tokens"]) == 12
        assert result["tokens"] == expected
        assert [r["rank"] for r in result["ranks"]] == list(range(WORLD.size))
    else:
        assert result is None


@pytest.mark.mpi
@pytest.mark.parametrize("name", K_MODELS)
def test_k_quant_files_give_the_same_tokens_at_any_layout(models, name):
    """Kept as the file has them (kernels per type), the tokens
    do not change with the ranks, ratios or stages, and match the numpy reference backend's (float32 weights
    dequantised from the file)."""
    expected = one_rank_tokens(model=models[name], backend="numpy")
    layouts = [None, UNEQUAL[WORLD.size]] + (["*".join("1" * WORLD.size)] if WORLD.size > 1 else [])
    for ratios in layouts:
        result = generate(WORLD, model=models[name], ratios=ratios)
        if WORLD.rank == 0:
            assert result["tokens"] == expected, ratios


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["Q4_K_M", "Q3_K_M"])
def test_k_quant_weights_are_held_at_about_the_files_bytes(models, name):
    """Each rank holds its share in the file's types, not as floats: the cpu backend's layouts add 3% at most (Q4_K:
    148 bytes for 144); Q3_K's 3-bit integers are held as nibbles, beside its 16 sub-block scales (a byte each) and
    d: 146 bytes a super-block for 110. Ranks that split a column-split matrix (attn_output, ffn_down) inside a
    super-block both hold it: at most one super-block a row more for each boundary between ranks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
    from spmd.gguf_file import GGUFFile
    f = GGUFFile(models[name])
    as_held = {T.Q3_K: (256 // 2 + 16 + 2) / GGML_QUANT_SIZES[T.Q3_K][1]}
    matrices = sum(i.nbytes * as_held.get(i.qtype, 1) for n, i in f.tensors.items()
                   if len(i.shape) == 2 and n != "token_embd.weight")
    super_rows = sum(i.shape[0] * GGML_QUANT_SIZES[i.qtype][1] * as_held.get(i.qtype, 1) for n, i in f.tensors.items()
                     if n.endswith(("attn_output.weight", "ffn_down.weight")))
    f.close()
    alone = generate(MPI.COMM_SELF, model=models[name], steps=1)["ranks"][0]["weights_bytes"]
    result = generate(WORLD, model=models[name], ratios=UNEQUAL[WORLD.size], steps=1)
    if WORLD.rank == 0:
        assert matrices <= alone <= 1.03 * matrices
        held = sum(r["weights_bytes"] for r in result["ranks"])
        assert matrices <= held <= 1.03 * (matrices + (WORLD.size - 1) * super_rows), (held, matrices)


@pytest.mark.mpi
def test_numpy_reference_backend_equals_cpu_backend(models):
    expected = one_rank_tokens(model=models["F32"])
    result = generate(WORLD, model=models["F32"], backend="numpy", ratios=UNEQUAL[WORLD.size])
    if WORLD.rank == 0:
        assert result["tokens"] == expected


@pytest.mark.mpi
def test_each_rank_its_own_backend(models):
    expected = one_rank_tokens(model=models["Q8_0"])
    backends = ",".join("numpy" if r % 2 else "cpu" for r in range(WORLD.size))
    threads = ",".join(str(1 + r // 2 % 2) for r in range(WORLD.size))  # 1, 1, 2, 2: each rank its own count
    result = generate(WORLD, model=models["Q8_0"], backend=backends, ratios=UNEQUAL[WORLD.size], threads=threads)
    if WORLD.rank == 0:
        assert result["tokens"] == expected
        assert [r["backend"].split()[0] for r in result["ranks"]] == backends.split(",")
        for r, t in zip(result["ranks"], threads.split(",")):
            if r["backend"].startswith("cpu"):  # numba's pool caps the count at the machine's cores
                assert f"{min(int(t), numba.config.NUMBA_NUM_THREADS)} thread" in r["backend"]


@pytest.mark.mpi
def test_ranks_report_their_share_and_traffic(models):
    result = generate(WORLD, model=models["Q4_0"], ratios=UNEQUAL[WORLD.size], allreduce="ring")
    if WORLD.rank == 0:
        shares = [r["share"] for r in result["ranks"]]
        assert sum(s["kv_heads"] for s in shares) == SHAPE.n_kv_heads
        assert sum(s["ffn_columns"] for s in shares) == SHAPE.ffn
        assert sum(s["vocab_rows"] for s in shares) == SHAPE.vocab
        for r in result["ranks"]:
            assert r["peak_rss_bytes"] > 0 and r["compute_ms"] > 0
            assert (r["bytes_sent"] > 0) == (WORLD.size > 1)
        if WORLD.size > 1:  # ring: rank r sends (n - c_r) + (n - c_r+1) floats per allreduce, 2 per layer
            from spmd.plan import chunk_counts, parse_layout
            c = chunk_counts(SHAPE.dim, parse_layout(UNEQUAL[WORLD.size], WORLD.size)[0].speeds)
            for r, stats in enumerate(result["ranks"]):
                per_allreduce = 4 * (2 * SHAPE.dim - c[r] - c[(r + 1) % WORLD.size])
                logits = 0 if r == 0 or not stats["share"]["vocab_rows"] else 8  # greedy: its best logit and id
                assert stats["bytes_per_token"] == 2 * SHAPE.n_layers * per_allreduce + logits

    # weights held follow the share: every matrix is split, none is replicated (the numpy backend keeps exact
    # shapes; the cpu backend pads each slice's rows to its vector width)
    result = generate(WORLD, model=models["Q4_0"], ratios=UNEQUAL[WORLD.size], backend="numpy")
    if WORLD.rank == 0:
        total = sum(r["weights_bytes"] for r in result["ranks"])
        alone = generate(MPI.COMM_SELF, model=models["Q4_0"], backend="numpy")["ranks"][0]["weights_bytes"]
        assert total == alone


@pytest.mark.mpi
def test_bad_ratios_fail_on_every_rank_with_one_message(models):
    from spmd.errors import UserError
    with pytest.raises(UserError, match=f"has {WORLD.size + 1} values but the job has {WORLD.size} ranks?$"):
        generate(WORLD, model=models["F32"], ratios=":".join(["1"] * (WORLD.size + 1)))


@pytest.mark.mpi
def test_a_missing_file_on_one_rank_is_reported_by_every_rank(models):
    from spmd.errors import UserError
    path = models["F32"] if WORLD.rank == 0 else "/nonexistent/model.gguf"
    if WORLD.size == 1:
        pytest.skip("needs a second rank")
    with pytest.raises(UserError, match="rank 1: model file not found: /nonexistent/model.gguf"):
        generate(WORLD, model=path)


@pytest.mark.mpi
def test_a_bug_on_one_rank_stops_every_rank_instead_of_a_hang():
    """An exception that is not the user's (a bug) raised on the last rank only, inside a step every rank agrees on:
    that rank raises it as it is, the others a RuntimeError naming it, where they used to wait for it forever."""
    from spmd.rank import agree

    def step():
        if WORLD.rank == WORLD.size - 1:
            raise ValueError("an empty share")
        return WORLD.rank

    last = WORLD.rank == WORLD.size - 1
    prefix = "" if last or WORLD.size == 1 else f"rank {WORLD.size - 1}: a bug: ValueError: "
    with pytest.raises(ValueError if last else RuntimeError, match=f"^{prefix}an empty share$"):
        agree(Comm(comm=WORLD), step)
    assert agree(Comm(comm=WORLD), lambda: WORLD.rank) == WORLD.rank  # and every rank goes on together


@pytest.mark.mpi
@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_logits_match_across_ranks(models, layout):
    """The rank-0 logits after the prompt agree with one rank's to float32 rounding, not just the argmax."""
    def logits(comm, ratios=None):
        opts = RunOptions(model=models["F32"], prompts=(PromptSpec(ids=PROMPT),), steps=1, ratios=ratios,
                          allreduce="ring")
        engine = Engine(opts, Comm(comm=comm), log=lambda _m: None)
        return engine.executor.forward(np.array(PROMPT, dtype=np.int64), 0)
    alone = logits(MPI.COMM_SELF) if WORLD.rank == 0 else None
    stages = "*".join(["1:1"] + ["1"] * (WORLD.size - 2)) if WORLD.size > 2 else "*".join(["1"] * WORLD.size)
    together = logits(WORLD, stages if layout == "pp" and SHAPE.n_layers >= WORLD.size - 1 else None)
    if WORLD.rank == 0:
        np.testing.assert_allclose(together, alone, rtol=0, atol=1e-4)


@pytest.mark.mpi
@pytest.mark.parametrize("qtype, allreduce", [  # Q4_K_M, Q5_K_M: Q4_K, Q5_K and Q6_K (rows of 256)
    *((q, a) for q in ("Q4_0", "Q8_0", "Q4_K_M") for a in ("star", "ring", "mpi")),
    ("Q5_K_M", "ring"), ("Q5_0 one kv head", "star"), ("Q5_1", "mpi"), ("Q4_1", "star"), ("IQ4_NL", "ring")])
def test_int8_activations_give_the_same_bits_at_any_layout(models, qtype, allreduce):
    """--activations int8: the column-split products' partial sums are exact (float64 integers of 2^-28), so rank
    0's logits after the prompt are the very same bits as one rank's at unequal ratios and across stages, and the
    greedy tokens after them are the same. (This needs each rank's columns to start and end on a 32-element block,
    as heads of 32, 64 or 128 do: an activation block cut by a split would be quantised by its part's maximum.)"""
    def logits(comm, ratios=None, activations="int8"):
        opts = RunOptions(model=models[qtype], prompts=(PromptSpec(ids=PROMPT),), steps=1, ratios=ratios,
                          allreduce=allreduce, activations=activations)
        engine = Engine(opts, Comm(comm=comm), log=lambda _m: None)
        return engine.executor.forward(np.array(PROMPT, dtype=np.int64), 0)
    alone = logits(MPI.COMM_SELF) if WORLD.rank == 0 else None
    if WORLD.rank == 0:  # 8-bit activations did run: the logits moved, by about llama.cpp's 1e-2
        moved = np.abs(alone - logits(MPI.COMM_SELF, activations="f32")).max()
        assert 1e-4 < moved < 0.1 * np.abs(alone).max()
    hybrid = ":".join(str(r + 1) for r in range(WORLD.size - 1)) + "*1" if WORLD.size > 1 else None  # 2 stages
    for ratios in (UNEQUAL[WORLD.size], hybrid):
        together = logits(WORLD, ratios)
        if WORLD.rank == 0:
            np.testing.assert_array_equal(together.view(np.uint32), alone.view(np.uint32), err_msg=str(ratios))
    expected = one_rank_tokens(model=models[qtype], activations="int8")
    result = generate(WORLD, model=models[qtype], ratios=UNEQUAL[WORLD.size], allreduce=allreduce,
                      activations="int8")
    if WORLD.rank == 0:
        assert result["tokens"] == expected


@pytest.mark.mpi
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K_M"])
def test_a_float16_kv_cache_gives_the_references_tokens_at_any_layout(models, qtype):
    """--kv-cache f16: the cpu backend's decode attention reads float16 keys and values (the numba kernels widen
    them) and gives the tokens of the numpy reference with a float16 cache, at one rank and at unequal ratios and
    across stages; each rank's KV cache takes 2 bytes a value."""
    model = models[qtype]
    expected = one_rank_tokens(model=model, backend="numpy", kv_cache="f16")
    if WORLD.rank == 0:  # the float16 cache did change the numbers (the prompt's keys are read back from it)
        def logits(kv_cache):
            opts = RunOptions(model=model, prompts=(PromptSpec(ids=PROMPT),), steps=1, kv_cache=kv_cache)
            engine = Engine(opts, Comm(comm=MPI.COMM_SELF), log=lambda _m: None)
            return engine.executor.forward(np.array(PROMPT, dtype=np.int64), 0)
        assert 0 < np.abs(logits("f16") - logits("f32")).max() < 1e-2
    hybrid = ":".join(str(r + 1) for r in range(WORLD.size - 1)) + "*1" if WORLD.size > 1 else None  # 2 stages
    for ratios in (None, UNEQUAL[WORLD.size], hybrid):
        result = generate(WORLD, model=model, ratios=ratios, kv_cache="f16")
        if WORLD.rank == 0:
            assert result["tokens"] == expected, ratios
            assert result["kv_cache"] == "f16"
            head_dim = SHAPE.dim // SHAPE.n_heads if qtype == "Q4_0" else K_SHAPE.dim // K_SHAPE.n_heads
            for r in result["ranks"]:
                first, end = r["share"]["layers"]
                assert r["kv_bytes_per_position"] == 2 * (end - first) * r["share"]["kv_heads"] * head_dim * 2


@pytest.mark.mpi
@pytest.mark.parametrize("qtype", ["Q5_K_M rows of 96", "Q4_0"])
def test_int8_says_where_heads_cut_its_blocks(models, qtype):
    """Heads of 24 (KV groups of 48 attention outputs) split 32-element activation blocks between the ranks of a
    stage: int8's text can then change with the layout, and rank 0 says so once; heads of 32 do not."""
    lines = []
    opts = RunOptions(model=models[qtype], prompts=(PromptSpec(ids=PROMPT),), steps=1, activations="int8")
    Engine(opts, Comm(comm=WORLD), log=lines.append)
    said = [line for line in lines if "--activations int8 with KV groups" in line]
    assert len(said) == (1 if WORLD.rank == 0 and WORLD.size > 1 and qtype != "Q4_0" else 0)


@pytest.mark.mpi
def test_seeded_sampling_equals_single_rank(models):
    kw = dict(model=models["Q8_0"], temperature=0.9, top_k=50, top_p=0.95, seed=11)
    expected = one_rank_tokens(**kw)
    result = generate(WORLD, ratios=UNEQUAL[WORLD.size], allreduce="ring", **kw)
    if WORLD.rank == 0:
        assert result["tokens"] == expected


@pytest.mark.mpi
def test_a_dequantised_type_on_ranks_that_hold_no_heads(models):
    """Q5_0 is dequantised at load; with one KV head, every rank but one holds an empty attention slice."""
    expected = one_rank_tokens(model=models["Q5_0 one kv head"])
    result = generate(WORLD, model=models["Q5_0 one kv head"], ratios=UNEQUAL[WORLD.size])
    if WORLD.rank == 0:
        assert sum(r["share"]["heads"] == 0 for r in result["ranks"]) == WORLD.size - 1
        assert result["tokens"] == expected


@pytest.mark.mpi
def test_a_rank_with_another_model_file_is_refused_at_set_up(models):
    from spmd.errors import UserError
    if WORLD.size == 1:
        pytest.skip("needs a second rank")
    path = models["F32"] if WORLD.rank != 1 else models["Q8_0"]  # same header, another file: a stale copy
    with pytest.raises(UserError, match="rank 1 differs from rank 0 in its model file size"):
        generate(WORLD, model=path)
    # the same shape, type and size, other weights (another seed): only the contents tell them apart
    path = models["F32"] if WORLD.rank != WORLD.size - 1 else models["F32 seed 2"]
    assert os.path.getsize(models["F32"]) == os.path.getsize(models["F32 seed 2"])
    with pytest.raises(UserError, match=f"rank {WORLD.size - 1} differs from rank 0 in its model file's contents"):
        generate(WORLD, model=path)


@pytest.mark.mpi
def test_random_ratios_keep_the_tokens(models):
    """Splits drawn at random (seeded, the same on every rank), down to ranks with almost nothing."""
    expected = one_rank_tokens(model=models["Q4_0"])
    rng = np.random.default_rng(WORLD.size)
    for _ in range(3):
        ratios = ":".join(f"{r:.3f}" for r in rng.uniform(0.05, 1.0, WORLD.size))
        result = generate(WORLD, model=models["Q4_0"], ratios=ratios, allreduce=str(rng.choice(["star", "ring"])))
        if WORLD.rank == 0:
            assert result["tokens"] == expected, ratios

"""What the multi-rank tests share: tiny models that rank 0 writes once into a folder every rank reads, a job's
generation on a communicator, the tokens one rank alone produces (to compare a job with), the pid of a rank of a job
run as a subprocess, and MPICH's shared-memory files."""
import os
import shutil
import time
from pathlib import Path

import pytest

from spmd.comm import Comm
from spmd.engine import Engine, RunOptions
from spmd.prompts import PromptSpec
from spmd.shm import JANITOR_WAIT_S
from spmd.synth import Shape, write_model

MPI = pytest.importorskip("mpi4py.MPI")
WORLD = MPI.COMM_WORLD
UNEQUAL = {1: "1", 2: "1:3", 3: "2:3:3", 4: "1:2:3:2"}
PROMPT = (1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100)
# dims that are whole quant blocks per head and per FFN block, so Q4_0 slices need no dequantising
SHAPE = Shape(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn=256, vocab=512, context=64)
QTYPES = ("F32", "Q8_0", "Q4_0")

_one_rank = {}  # one_rank_tokens' answers, while the models they came from exist


def shared_models(tmp_path_factory, prefix, extra=None):
    """The body of a module fixture: yields {name: path} of SHAPE in each of QTYPES (seed 7) and of the models in
    `extra` ({name: (shape, qtype, seed)}), written by rank 0 into a new folder of pytest's (rank 0's) temporary
    tree; removes it at the end (pytest removes what a killed run leaves, three runs later)."""
    specs = {**{q: (SHAPE, q, 7) for q in QTYPES}, **(extra or {})}
    folder = WORLD.bcast(str(tmp_path_factory.mktemp(prefix)) if WORLD.rank == 0 else None)
    paths = {name: os.path.join(folder, f"model-{i}.gguf") for i, name in enumerate(specs)}
    if WORLD.rank == 0:
        for name, (shape, qtype, seed) in specs.items():
            write_model(paths[name], shape, qtype=qtype, seed=seed)
    WORLD.Barrier()
    yield paths
    WORLD.Barrier()
    _one_rank.clear()
    if WORLD.rank == 0:
        shutil.rmtree(folder)


def generate(comm, log=lambda _m: None, **kw):
    """A run of PROMPT (12 steps unless `steps` is given) on `comm`, its lines to `log` (quiet by default): the
    result on rank 0, None elsewhere."""
    kw = {"prompt_tokens": PROMPT, **kw}
    opts = RunOptions(**{"prompts": (PromptSpec(ids=tuple(kw.pop("prompt_tokens"))),), "steps": 12, **kw})
    return Engine(opts, Comm(comm=comm), log=log).run()


def one_rank_tokens(**kw):
    """The tokens one rank alone produces with `generate`'s options, computed on rank 0 (once for each set of
    options) and shared with every rank."""
    key = tuple(sorted(kw.items()))
    if key not in _one_rank:
        tokens = generate(MPI.COMM_SELF, **kw)["tokens"] if WORLD.rank == 0 else None
        _one_rank[key] = WORLD.bcast(tokens)
    return _one_rank[key]


def patch_meta(model, path, key, type_id, bits):
    """A copy of `model` whose 4-byte metadata `key` has GGUF type `type_id` (4 uint32, 6 float32) and these bits
    (the 4 bytes of type, then the value, after the key)."""
    with open(model, "rb") as f:
        data = bytearray(f.read())
    at = data.index(key.encode()) + len(key)
    data[at:at + 4] = type_id.to_bytes(4, "little")
    data[at + 4:at + 8] = int(bits).to_bytes(4, "little")
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


def rank_pid(marker, rank, timeout_s=30):
    """The pid of MPI rank `rank` (a process whose command line holds `marker`, an spmd command)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                env = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if marker.encode() in cmdline and f"PMI_RANK={rank}".encode() in env:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} running {marker}")


def shm_files():
    return {n for n in os.listdir("/dev/shm") if n.startswith("mpich_shm_")} if os.path.isdir("/dev/shm") else set()


def no_new_shm_files(before, wait_s=JANITOR_WAIT_S + 5):
    """Whether MPICH's files that came since `before` are all gone within `wait_s`: by default as long as an abort's
    janitor waits for the job's processes to end, and a little more (a loaded machine ends them slowly)."""
    deadline = time.monotonic() + wait_s
    while shm_files() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    return not shm_files() - before

"""--memory-limit under a real memory cap: a model larger than the cap runs in a memory cgroup (v1 or v2) that the
kernel enforces (it kills the job past it), with the same greedy tokens as an uncapped run, and each run's peak
resident set stays within its limit plus the runtime's own (measured in the same test on a one-layer model, at
most RUNTIME) and a 32 MiB margin, whatever the layer count.

Skipped where this process may not make a memory cgroup (not root, no memory controller: scripts/memory_cap.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spmd.synth import Shape, write_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from memory_cap import CapUnavailable, MemoryCap  # noqa: E402
MIB = 1 << 20
CAP = 450 * MIB  # the cgroup's limit: below the 602 MB model
LIMIT = 64 * MIB  # --memory-limit
RUNTIME = 256 * MIB  # the interpreter, numpy, numba's compiled kernels, MPI: about 195 MiB measured
WIDE = Shape(dim=1024, n_layers=44, n_heads=8, n_kv_heads=8, ffn=2816, vocab=512, context=64)  # Q8_0: 602 MB


def run(model, *flags, cap=None):
    cmd = [sys.executable, "-m", "spmd.run", "--model", model, "--prompt-ids", "1,5,6,7", "--steps", "4",
           "--output", "json", *flags]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       preexec_fn=cap.enter if cap else None)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cap")
    wide = write_model(folder / "wide.gguf", WIDE, qtype="Q8_0", seed=4)
    half = write_model(folder / "half.gguf", Shape(**{**WIDE.__dict__, "n_layers": 22}), qtype="Q8_0", seed=4)
    one = write_model(folder / "one.gguf", Shape(**{**WIDE.__dict__, "n_layers": 1}), qtype="Q8_0", seed=4)
    return str(wide), str(half), str(one)


def test_a_model_larger_than_a_real_cap_streams_with_the_same_tokens(models):
    wide, half, one = models
    assert os.path.getsize(wide) > CAP
    expected = run(wide)  # uncapped, everything resident
    alone = run(one)["ranks"][0]  # the runtime's own memory, measured now: a one-layer model's peak less its weights
    runtime = alone["peak_rss_bytes"] - alone["weights_bytes"]
    assert runtime <= RUNTIME, runtime / MIB
    try:
        cap = MemoryCap(CAP)
    except CapUnavailable as e:
        pytest.skip(str(e))
    try:  # the cgroup goes whatever happens
        capped = run(wide, "--memory-limit", str(LIMIT), cap=cap)  # a kill past the cap fails run's exit check
        shorter = run(half, "--memory-limit", str(LIMIT), cap=cap)
    finally:
        cap.remove()
    assert capped["tokens"] == expected["tokens"]
    r, s = capped["ranks"][0], shorter["ranks"][0]
    assert r["streamed_halves"] > 0 and r["resident_weights_bytes"] < LIMIT
    assert r["peak_rss_bytes"] <= LIMIT + runtime + 32 * MIB, (r["peak_rss_bytes"] / MIB, runtime / MIB, r)
    assert expected["ranks"][0]["peak_rss_bytes"] > CAP  # the same run without a limit would not fit the cap
    # independent of the layer count: half the layers, the same limit, about the same peak
    assert abs(r["peak_rss_bytes"] - s["peak_rss_bytes"]) <= 32 * MIB, (r["peak_rss_bytes"], s["peak_rss_bytes"])


def test_peak_memory_is_the_jobs_own_not_its_parents(models):
    """A job started by fork and exec (subprocess with a preexec_fn, as under a cap) from a parent holding 400 MiB
    reports its own peak: getrusage's ru_maxrss keeps the parent's size across exec, VmHWM does not."""
    import numpy as np
    _, _, one = models
    held = np.ones(400 * MIB // 8)  # touched: 400 MiB resident in this process
    r = run(one, cap=type("NoCap", (), {"enter": staticmethod(lambda: None)})())["ranks"][0]
    assert held[-1] == 1.0
    assert r["peak_rss_bytes"] < 400 * MIB, r["peak_rss_bytes"] / MIB

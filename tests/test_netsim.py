"""A host's link taken down mid-generation, on simulated hosts (scripts/netsim.sh: network namespaces on a bridge,
each rank's traffic crossing a virtual link): the supervisor sees no progress, finds the host silent on its ssh
port, and goes on without it; the text equals an uninterrupted run's; the rank cut off ends itself after its
--wait-timeout. Needs root and iproute2: skipped otherwise,
and where the simulated hosts are up already (someone's own)."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spmd.synth import Shape, write_model

ROOT = Path(__file__).resolve().parents[1]
NETSIM = ROOT / "scripts" / "netsim.sh"
SHAPE = Shape(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn=128, vocab=512, context=64)
STEPS = 60  # (the context holds 64 positions)
WAIT_S = 15  # the ranks' --wait-timeout: the cut-off rank gives up after WAIT_S + 5 s without a step record

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None,
                                reason="simulated hosts need root, iproute2 and unshare")


def ranks_on(host):
    """The rank processes (spmd.run) in a simulated host's namespace."""
    def is_rank(pid):
        try:
            return b"spmd.run" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # (ended meanwhile)
            return False
    pids = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True).stdout.split()
    return [pid for pid in pids if is_rank(pid)]


def netsim(*args, check=True):
    return subprocess.run(["bash", str(NETSIM), *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=check, env=dict(os.environ, PYTHON=sys.executable))


@pytest.fixture
def hosts():
    if subprocess.run(["ip", "link", "show", "spmd-br0"], capture_output=True).returncode == 0:
        pytest.skip("the simulated hosts are up already (scripts/netsim.sh down frees them)")
    up = netsim("up", "3", check=False)
    if up.returncode != 0:
        netsim("down", check=False)
        pytest.skip(f"cannot bring simulated hosts up here: {up.stderr.strip()[-200:]}")
    try:
        yield
    finally:
        subprocess.run(["ip", "link", "set", "spmd-v2", "up"], capture_output=True)
        pids = subprocess.run(["ip", "netns", "pids", "spmd-h2"], capture_output=True, text=True).stdout.split()
        for pid in pids:  # the cut-off rank and its proxy: orphans of the job that was taken down
            subprocess.run(["kill", "-9", pid], capture_output=True)
        netsim("down", check=False)


def test_a_host_whose_link_goes_down_is_lost_and_the_run_goes_on(hosts, tmp_path):
    model = str(write_model(tmp_path / "tiny.gguf", SHAPE, qtype="Q8_0", seed=3))
    args = ["--model", model, "--ratios", "1:1:1", "--steps", str(STEPS), "--prompt-ids", "1,5,9",
            "--wait-timeout", str(WAIT_S)]
    want = subprocess.run([shutil.which("mpirun"), "-n", "3", sys.executable, "-m", "spmd.run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert want.returncode == 0, want.stderr
    env = dict(os.environ, SPMD_TEST_SLOW="0:100", PYTHON=sys.executable)  # about 0.3 s a token
    proc = subprocess.Popen(["bash", str(NETSIM), "launch", "--", "--progress-timeout", "2", "--", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=env)
    try:
        first = proc.stdout.read(8)  # generation is under way (unbuffered: communicate() reads on from here)
        assert first, proc.stderr.read()
        # cut at once: at 100x a tiny model's compute is 25-300 ms a token by machine, and the text must not end first
        subprocess.run(["ip", "link", "set", "spmd-v2", "down"], check=True)  # host 2's cable pulled
        cut = time.monotonic()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = (first + out).decode(), err.decode()
    assert proc.returncode == 0, err
    assert out == want.stdout
    assert "[spmd] rank 2 (10.213.0.3) is unreachable (its host does not answer) (no token for" in err
    assert "going on with 2 ranks, --ratios 1:1 (recovery 1 of at most 3)" in err
    assert "Abort(" not in err and "Traceback" not in err
    while ranks_on("spmd-h2") and time.monotonic() - cut < WAIT_S + 30:  # (its MPI_Abort cannot reach mpirun)
        time.sleep(0.5)
    assert not ranks_on("spmd-h2")

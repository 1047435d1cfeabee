"""The built package carries the compiled Vulkan kernels, and vk_runtime finds them where a wheel puts them.

A wheel is what setuptools' build_py lays out, zipped; build_py runs offline with the venv's setuptools (a wheel
itself needs the `wheel` package or a newer setuptools), in a copy of the sources so that nothing is written here.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"


def build_py(tmp_path) -> Path:
    src, lib = tmp_path / "src", tmp_path / "lib"
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, src)
    for name in ("spmd", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "-d", str(lib)],
                   cwd=src, check=True, capture_output=True)
    return lib


def test_the_built_package_carries_every_kernel_and_vk_runtime_finds_them(tmp_path):
    spv = sorted(p.name for p in KERNELS.glob("*.spv"))
    assert spv, "no kernels/*.spv: bash scripts/build_kernels.sh"
    lib = build_py(tmp_path)
    built = lib / "spmd" / "kernels"
    assert sorted(p.name for p in built.glob("*.spv")) == spv
    assert all((built / name).read_bytes() == (KERNELS / name).read_bytes() for name in spv)
    assert (built / "MANIFEST").read_text() == (KERNELS / "MANIFEST").read_text()
    where = "from spmd.backends import vk_runtime; print(vk_runtime.KERNELS)"
    found = subprocess.run([sys.executable, "-c", where], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(lib)},
                           check=True, capture_output=True, text=True)
    assert Path(found.stdout.strip()) == built.resolve()


def test_a_checkout_finds_the_top_level_kernels():
    from spmd.backends import vk_runtime
    assert vk_runtime.KERNELS == KERNELS

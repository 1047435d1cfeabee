"""Where numba caches the cpu backend's kernels: a directory named by a hash of their sources.

numba keys a cached function by its own file's time stamp and bytecode alone. cpu_model.py's kernels are generated
with cpu.py's code generators (`_hsum`, `_fma`, `_Arg`, ...), so after a change to cpu.py only (or to
SPMD_CPU_GENERIC) a warm cache gave them back as compiled from the old code: measured, the same sources with `_hsum`
changed gave other logits from a warm cache than from a fresh one (calls of cpu.py's compiled functions stayed
current). A directory per version of both files makes every change compile anew. cpu.py sets it before its first
`@njit(cache=True)`.
"""
import glob
import hashlib
import os
import shutil
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = (os.path.join(HERE, "cpu.py"), os.path.join(HERE, "cpu_model.py"))
KEEP_DAYS = 7  # another version's directory unused this long is removed


def kernel_cache_dir(base=None, sources=SOURCES):
    """The directory kernels-<hash of `sources` and SPMD_CPU_GENERIC> under `base`, $NUMBA_CACHE_DIR, or this
    package's __pycache__; where that cannot hold it, under $XDG_CACHE_HOME/spmd (~/.cache/spmd). Made if need be
    and marked used now. None where neither place is writable (numba then caches as it would: its own places, not
    named by the sources)."""
    digest = hashlib.sha256(os.environ.get("SPMD_CPU_GENERIC", "").encode())
    for path in sources:
        with open(path, "rb") as f:
            digest.update(f.read())
    name = "kernels-" + digest.hexdigest()[:16]
    places = [base or os.environ.get("NUMBA_CACHE_DIR") or os.path.join(HERE, "__pycache__")]
    home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    if os.path.isabs(home):
        places.append(os.path.join(home, "spmd"))
    for place in places:
        path = os.path.join(place, name)
        try:
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK):
                continue
            os.utime(path)  # a directory's time is its last use
        except OSError:
            continue
        prune(place, path)
        return path
    return None


def prune(place, keep):
    """Remove the other versions' directories in `place` that have not been used for KEEP_DAYS (a version in use,
    say another checkout's, keeps its own)."""
    unused_since = time.time() - KEEP_DAYS * 86400
    for other in glob.glob(os.path.join(place, "kernels-*")):
        try:
            if other != keep and os.path.getmtime(other) < unused_since:
                shutil.rmtree(other, ignore_errors=True)
        except OSError:
            pass

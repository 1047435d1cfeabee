"""A memory cgroup the kernel enforces, for tests and benchmarks of --memory-limit: processes started with
`cap.enter` as their preexec_fn run in a child of this process's memory cgroup (v1 or v2) limited to `limit` bytes,
page cache included, and are killed past it.

    cap = MemoryCap(450 << 20)       # CapUnavailable where none can be made (not root, no memory controller)
    subprocess.run(cmd, preexec_fn=cap.enter)
    cap.remove()
"""
import os
from pathlib import Path


class CapUnavailable(Exception):
    pass


def own_memory_cgroup():
    """(the folder of this process's memory cgroup, its version) or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if folder.is_dir():
                return folder, 1
    for line in lines:
        if line.startswith("0::"):
            folder = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            try:
                if "memory" in (folder / "cgroup.controllers").read_text().split():
                    return folder, 2
            except OSError:
                pass
    return None


class MemoryCap:
    """A child memory cgroup of `limit` bytes."""

    count = 0

    def __init__(self, limit):
        found = own_memory_cgroup()
        if found is None:
            raise CapUnavailable("no memory cgroup to make a capped one under")
        parent, self.version = found
        MemoryCap.count += 1
        self.folder = parent / f"spmd-cap-{os.getpid()}-{MemoryCap.count}"
        try:
            self.folder.mkdir()
            (self.folder / ("memory.limit_in_bytes" if self.version == 1 else "memory.max")).write_text(str(limit))
        except OSError as e:
            self.remove()
            raise CapUnavailable(f"cannot make a memory cgroup in {parent}: {e.strerror}") from None

    def enter(self):
        """preexec_fn: the child process joins the cgroup before it runs anything."""
        (self.folder / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self):
        try:
            self.folder.rmdir()
        except OSError:
            pass

"""MPICH's shared-memory files (/dev/shm/mpich_shm_*): MPI_Finalize removes a job's own, MPI_Abort does not. A job that
ends by an abort (Ctrl-C or SIGTERM on several ranks, --wait-timeout, a bug) leaves a file of a few MB per host in
memory. Four things keep /dev/shm clean: an aborting rank starts a janitor (`clean_up_after_abort`), a process of its
own that removes the files this rank maps once no process maps them any more; so does the watcher of a rank's MPI
start where the rank dies in it (spmd.comm's `starting`); a supervisor starts one for the files of each job it ran,
on its own host, once the job has ended (`clean_up_after_job`); and a job's start removes what an abort had no chance
to clean (a rank killed, mpirun taken down: `remove_stale`), and with it the machine's topology file that MPI_Init
writes for the job's ranks of a host (/tmp/hydra_hwloc_xmlfile_*, 5 KB) and only MPI_Finalize removes. Standard
library only: the janitor starts a fresh interpreter on this module (`python -m spmd.shm PATH ...`)."""
import os
import subprocess
import sys
import time

FOLDER, PREFIX, AGE_S = "/dev/shm", "mpich_shm_", 60.0
TOPOLOGY = ("/tmp", "hydra_hwloc_xmlfile_")  # (where MPICH's hwloc writes it, as built in: not TMPDIR)
JANITOR_WAIT_S, JANITOR_LOOK_S = 30.0, 0.2  # how long the janitor waits for the job's processes to end; how often


def mapped_names(pids=None, skip=()):
    """The names of MPICH's files that processes (`pids`, default all readable ones but those in `skip`) map."""
    names = set()
    for pid in pids if pids is not None else (p for p in os.listdir("/proc") if p.isdigit()):
        if str(pid) in skip:
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                names.update(line.rsplit("/", 1)[-1].strip() for line in f if PREFIX in line)
        except OSError:  # gone, or another user's
            continue
    return names


def remove_stale(folder=FOLDER, topology=TOPOLOGY, now=None):
    """The files of a job that ended abnormally: this user's, older than a minute (a job starting now may not have
    mapped or read its own yet), its shared memory mapped by no process. Run by one rank on each host as a job
    starts; returns the names removed."""
    now = time.time() if now is None else now
    removed = _remove_old(folder, PREFIX, now, mapped_names)
    return removed + _remove_old(*topology, now, set)  # (read once, as a job starts)


def _remove_old(folder, prefix, now, in_use):
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix)]
    except OSError:
        return []
    if not names:
        return []
    used, removed = in_use(), []
    for name in names:
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
            if name not in used and st.st_uid == os.getuid() and now - st.st_mtime > AGE_S:
                os.unlink(path)
                removed.append(name)
        except OSError:
            pass
    return removed


def clean_up_after_abort():
    """Before this rank calls MPI_Abort: a janitor process, in a session of its own (mpirun's teardown does not
    reach it), removes the files this rank maps once no process maps them (JANITOR_WAIT_S at most). Never fails."""
    try:
        start_janitor(mapped_names([os.getpid()]))
    except Exception:  # an abort goes on whatever happens here
        pass


def names(folder=FOLDER) -> set:
    """MPICH's files here now."""
    try:
        return {n for n in os.listdir(folder) if n.startswith(PREFIX)}
    except OSError:
        return set()


def clean_up_after_job(before, folder=FOLDER):
    """A supervisor (spmd.supervise), once a job it ran has ended, whatever ended it: a janitor for the files that
    appeared here while it ran (`before`: `names()` as it started), which a killed rank left (a file younger than
    `remove_stale`'s minute would stay until a later job's start). Never fails."""
    try:
        start_janitor(names(folder) - set(before), folder)
    except Exception:
        pass


def start_janitor(found, folder=FOLDER):
    """A process of its own session (mpirun's teardown does not reach it) that removes the files `found` (names in
    `folder`) once no process maps them (`janitor`)."""
    if found:
        subprocess.Popen([sys.executable, "-m", "spmd.shm", *(os.path.join(folder, n) for n in sorted(found))],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)


def janitor(paths, wait_s=JANITOR_WAIT_S):
    """Remove `paths` once no other process maps them; give up after `wait_s` (the next job's start removes them)."""
    names = {os.path.basename(p): p for p in paths}
    deadline = time.monotonic() + wait_s
    while names and time.monotonic() < deadline:
        mapped = mapped_names(skip=(str(os.getpid()),))
        for name in [n for n in names if n not in mapped]:
            try:
                os.unlink(names.pop(name))
            except OSError:
                pass
        time.sleep(JANITOR_LOOK_S)


if __name__ == "__main__":
    janitor(sys.argv[1:])

"""A rank's watcher, for a supervised job (spmd.supervise sets SPMD_WATCH=1): before MPI starts, the rank's process
forks; the child goes on as the rank, the parent only waits for it. When the child is killed by a signal (kill -9,
the OOM killer, a crash) the parent says so in one line on stderr, which mpirun passes on from any host:

    spmd: rank 2 (laptop) died (signal 9)

That is how the supervisor knows which rank died: mpirun's own banner names whichever process it saw end first,
often one it killed itself while taking the job down. The child dies with its parent (PR_SET_PDEATHSIG), so a job
taken down (mpirun kills the processes it started: the parents) leaves no rank behind; a watcher killed itself
(SIGKILL: it passes every other signal on) takes its rank with it and names nobody, which the supervisor says. A
signal the parent gets (Ctrl-C, SIGTERM passed on by mpirun) goes on to the child, which has a process group of
its own so that a signal mpirun sends the group comes once (twice, a Ctrl-C is a server's "stop at once"). Pure
standard library: nothing is imported before the fork that the parent does not need. It also says what mpirun's
environment tells before MPI starts (`under_mpirun`, `first_rank`: spmd.comm's start, spmd.chat)."""
import ctypes
import os
import signal
import socket
import sys

DIED = "spmd: rank {rank} ({host}) died (signal {signal})"
PR_SET_PDEATHSIG = 1


def under_mpirun():
    """Before MPI starts: whether this process is one of several that mpirun started (MPICH's or Open MPI's)."""
    size = os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "1"
    return size.isdigit() and int(size) > 1


def first_rank():
    """Before MPI starts: whether this process is rank 0 of its job (or alone)."""
    return os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0"


def passer(child):
    """The parent's handler: a signal goes on to the child. One that comes after the child has ended (a job taken
    down sends more than one) has no one to go to: it is dropped, not a traceback on the rank's stderr."""
    def pass_on(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass
    return pass_on


def fork_rank():
    """In the child (the rank) return; in the parent wait, report, and exit with the child's status."""
    if os.environ.get("SPMD_WATCH") != "1":
        return
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # not Linux: the rank is not tied to its watcher
            pass
        if os.getppid() != parent:  # the parent died before the tie was made
            os._exit(1)
        os.setpgid(0, 0)  # mpirun's proxy signals its process group: the parent passes each signal on, once
        return
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, passer(child))
    try:
        _, status = os.waitpid(child, 0)  # retried by Python after a signal's handler has run
    except ChildProcessError:
        os._exit(1)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        print(DIED.format(rank=os.environ.get("PMI_RANK", "?"), host=socket.gethostname(), signal=signum),
              file=sys.stderr, flush=True)
        os._exit(128 + signum)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)

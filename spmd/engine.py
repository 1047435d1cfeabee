"""One generation, run the same way on every rank: every rank's set-up (`spmd.rank`), then rank 0's driver
(`spmd.driver`) issues step records that every rank's executor (`spmd.executor`) runs."""
import threading
import time

from .driver import Driver
from .errors import UserError
from .executor import Executor
from .rank import RankState, RunOptions  # noqa: F401 - RunOptions is part of this module's interface


class Engine:
    def __init__(self, opts, comm, log=print, journal=None):
        self.comm = comm
        self.state = RankState(opts, comm, log)
        self.executor = Executor(self.state)
        self.driver = Driver(self.state, self.executor, journal) if comm.is_root else None

    @property
    def control(self):
        return self.state.control

    def run(self, emit=None, inbox=None):
        """Generate; on rank 0 returns the result dict, elsewhere None. Rank 0 streams the text to `emit(piece)`,
        which returns False once nobody reads any more (a closed pipe): generation then stops early. With an
        `inbox` (spmd.serve) rank 0 generates what comes into it until it is closed."""
        comm, state = self.comm, self.state
        comm.barrier()
        comm.setting_up = False  # from here the watchdog bounds the waits
        start_sync, t0 = comm.sync_s, time.perf_counter()
        done = threading.Event()
        if comm.size > 1 and state.opts.wait_timeout > 0:
            threading.Thread(target=watch, args=(comm, state.opts.wait_timeout, done), name="spmd-watchdog",
                             daemon=True).start()
        try:
            if not comm.is_root:
                result = self.executor.serve()
            else:
                result = self.driver.serve(inbox) if inbox is not None else self.driver.run(emit)
        finally:
            done.set()
            if state.control is not None:
                state.control.close(self.driver.pos)
        error = comm.first_error(self.driver.error if comm.is_root else None)
        if error is not None:
            raise UserError(error)
        stats = self.executor.rank_stats(time.perf_counter() - t0, comm.sync_s - start_sync)
        ranks = comm.gather(stats)
        return self.driver.finish(result, ranks) if comm.is_root else None


def watch(comm, timeout_s, done):
    """Every rank, while it generates: when no step record has come for `timeout_s` seconds (rank 0 a little
    sooner, so that it is the one to say so), a rank has stopped or its host has gone: `comm.give_up` (one line,
    rank 0's control socket file removed, every rank taken down) instead of waiting for ever. Rank 0's also looks
    each second whether a rank that a signal stopped asks it to stop the job (`Comm.stop_asked`)."""
    limit = timeout_s + (0 if comm.is_root else 5)
    comm.last_step_at = time.monotonic()
    while not done.wait(min(1.0, timeout_s / 4)):
        if comm.is_root:
            comm.stop_asked()  # another rank was stopped by a signal
        waited = time.monotonic() - comm.last_step_at
        if waited > limit:
            comm.give_up(f"no step for {waited:.0f} s: another rank has stopped or its host is gone (--wait-timeout)")

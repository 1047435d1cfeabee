"""One generation, run the same way on every rank: every rank's set-up (`spmd.rank`), then rank 0's driver
(`spmd.driver`) issues step records that every rank's executor (`spmd.executor`) runs."""
import time

from .driver import Driver
from .errors import UserError
from .executor import Executor
from .rank import RankState, RunOptions  # noqa: F401 - RunOptions is part of this module's interface


class Engine:
    def __init__(self, opts, comm, log=print, journal=None):
        self.comm = comm
        comm.wait_timeout_s = opts.wait_timeout  # (the watchdog's; set as the flags were read, here for the API's)
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
        comm.setting_up = False  # from here the watchdog bounds the time between step records (`Comm.overdue`)
        start_sync, t0 = comm.sync_s, time.perf_counter()
        comm.last_step_at, comm.generating = time.monotonic(), True
        comm.start_watchdog()
        try:
            if not comm.is_root:
                result = self.executor.serve()
            else:
                result = self.driver.serve(inbox) if inbox is not None else self.driver.run(emit)
        finally:
            comm.generating = False
            if state.control is not None:
                state.control.close(self.driver.pos)
        error = comm.first_error(self.driver.error if comm.is_root else None)
        if error is not None:
            raise UserError(error)
        stats = self.executor.rank_stats(time.perf_counter() - t0, comm.sync_s - start_sync)
        ranks = comm.gather(stats)
        return self.driver.finish(result, ranks) if comm.is_root else None

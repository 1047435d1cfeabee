"""One generation, run the same way on every rank: every rank's set-up (`spmd.rank`), then rank 0's driver
(`spmd.driver`) issues step records that every rank's executor (`spmd.executor`) runs."""
import time

from .driver import Driver
from .errors import UserError
from .executor import Executor
from .rank import RankState, RunOptions  # noqa: F401 - RunOptions is part of this module's interface


class Engine:
    def __init__(self, opts, comm, log=print):
        self.comm = comm
        self.state = RankState(opts, comm, log)
        self.executor = Executor(self.state)
        self.driver = Driver(self.state, self.executor) if comm.is_root else None

    @property
    def control(self):
        return self.state.control

    def run(self, emit=None):
        """Generate; on rank 0 returns the result dict, elsewhere None. Rank 0 streams the text to `emit(piece)`,
        which returns False once nobody reads any more (a closed pipe): generation then stops early."""
        comm, state = self.comm, self.state
        comm.barrier()
        start_sync, t0 = comm.sync_s, time.perf_counter()
        try:
            result = self.driver.run(emit) if comm.is_root else self.executor.serve()
        finally:
            if state.control is not None:
                state.control.close(self.driver.pos)
        error = comm.first_error(self.driver.error if comm.is_root else None)
        if error is not None:
            raise UserError(error)
        stats = self.executor.rank_stats(time.perf_counter() - t0, comm.sync_s - start_sync)
        ranks = comm.gather(stats)
        return self.driver.finish(result, ranks) if comm.is_root else None

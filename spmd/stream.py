"""Weight streaming (--memory-limit): a rank whose share of the weights does not fit its limit keeps what fits
resident and streams the rest, half a layer at a time (a layer's attention matrices, or its FFN matrices),
through a window of memory.

    streamed, window_bytes = choose(sizes, budget)  # which halves stream, evenly spread (pure)
    window = Window(streamed, folder)               # at load:
    window.spill(key, linears)                      #   a streamed half's arrays go to the spill file
    window.start(window_bytes)                      #   mapped; the loader thread starts
    with window.hold(key): ...                      # the compute thread, around a half's products
    figures(window), window.close()                 # figures(None): a rank's zeros where nothing streams

At load each streamed half is built as every other (read from the GGUF, repacked for the backend's kernels), then
its linears' arrays (`lin.arrays`) are written to a spill file and dropped: repacking takes far longer than
reading (250 MB/s against GB/s), so it is done once. The spill file is unnamed (O_TMPFILE): it is gone with the
process however that ends, and takes disk space equal to the streamed bytes (each half starts at a 2 MiB boundary,
`HUGE`; the gaps are holes). Once all are spilled, the file is memory-mapped and the streamed linears' arrays
become views of the mapping, for good: the kernels read the weights where the kernel's page cache holds them, with
no copy.

What makes it a window is which of those pages are in the process's memory. A loader thread brings the streamed
halves in, in the order the stage runs them and round again, as far ahead as the window's bytes allow (more small
halves than large ones: the prefetch depth follows the sizes): madvise(MADV_POPULATE_READ) reads a half from the
disk where it is not cached and maps it (through ctypes, which lets go of the GIL, as the cpu kernels do). The
compute thread `hold`s each half in turn: it waits until the loader has brought it in (the time is counted; where
the loader is idle and nothing is held, as between any two halves at the smallest window, it brings the half in
itself, sparing two hand-offs between the threads: `INLINE`), computes, and drops the half's pages from the
process (MADV_DONTNEED; the page cache keeps them while the host has room) before its allreduce, so the loader
goes on while the stage's ranks add up their partial sums. A half asked for out of turn (an error left a pass half
done) restarts the loader from it; its pages would fault in by themselves anyway, so the numbers never depend on
the window.
"""
import ctypes
import errno
import fcntl
import mmap
import os
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from .errors import UserError

ALIGN = 64  # bytes: every array in the spill file starts at a multiple of this (every half at one of HUGE)
DEVICE_ALIGN = 256  # bytes: every array in a device slot starts at a multiple of this (DeviceWindow)
POOL_SPARE = 1 << 30  # DeviceWindow: host memory left over before it holds the streamed halves itself
TURN_WAIT_S = 120.0  # DeviceWindow: how long a rank waits for its host's other ranks to take that memory
COPY_THREADS, COPY_PIECE = 4, 1 << 20  # DeviceWindow's copies into mapped device memory: threads, bytes a piece
# (pieces of 4 MiB left the threads uneven on a half's 9 arrays: a TinyLlama token streaming 520 MiB into an H200
# took 46.0-74.2 ms with them, 39.8-52.8 with 1 MiB, in either order on two hosts)
PAGE = mmap.PAGESIZE
# Every half starts at a multiple of HUGE in the spill file, written in one pwritev: the page cache then holds it in
# folios of up to HUGE bytes where the file system makes large folios (ext4 on Linux 6.18, xfs), and populating a
# half maps them whole: 2-3 ns a 4 KiB page against 70 where the arrays were written one by one behind Python's
# buffered writes (TinyLlama streaming 508 MB a token from cached pages on 2 cores: 10.9 ms a token of populating).
# The gaps between halves are holes: no disk; a half is dropped through the gap after it (`_span`), so that no page
# of a gap that read-around brought in stays mapped. (Also the cpu backend's transparent huge page: its arena.)
HUGE = 2 << 20
MADV_POPULATE_READ = 22  # Linux 5.14: fault the pages in (reading them from the disk where needed), synchronously
# TAIL: after a half's last whole HUGE run its bytes sit in smaller folios, mapped a 4 KiB page at a time, which
# MADV_POPULATE_READ does at about 200 ns a page; a read fault maps the pages around it (the kernel's
# fault_around_bytes, 64 KiB by default), so one read every FAULT_AROUND bytes maps them 4 times faster. Populating a
# TinyLlama attention / FFN half (5.1 / 18.6 MiB, cached pages, 2 cores): 52.6 / 39.8 us the one way, 19.2 / 23.1
# the other (zeros written up to the next HUGE boundary made it one more 2 MiB folio: 5.6 / 13.6 us, but a half read
# back from the disk then read the zeros too, up to 18% more bytes).
# Only where the page cache holds the whole tail (`_cached`): a read that must go to the disk and fails would kill the
# process (SIGBUS), where MADV_POPULATE_READ returns the error; from the disk the reading dwarfs the mapping anyway.
FAULT_AROUND = 64 << 10
_byte = ctypes.create_string_buffer(1)  # where those reads go
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
CACHESTAT = 451  # Linux 6.5's cachestat(2), the same number on every architecture: pages of a file range cached
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
_libc.syscall.restype = ctypes.c_long


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def _cached(fd, offset, size) -> bool:
    """Whether the page cache holds every page of the file's bytes from `offset` (a page boundary) on, `size` of
    them; False where the kernel cannot say (before 6.5). (cachestat counts by folio: a few us for a half's tail,
    where mincore's page by page took 24.)"""
    stat = _Stat()
    return size == 0 or (_libc.syscall(CACHESTAT, fd, ctypes.byref(_Range(offset, size)), ctypes.byref(stat), 0) == 0
                         and stat.cache == -(-size // PAGE))


def _write(fd, pieces, offset):
    """All of `pieces` (buffers) written at `offset`, in as few pwritev calls as the kernel takes."""
    views = [memoryview(p) for p in pieces if len(p)]  # (bytes, and 1-D uint8 arrays)
    while views:
        done = os.pwritev(fd, views[:1024], offset)  # (IOV_MAX)
        if done == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        offset += done
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


def spill_folder() -> str:
    """Where spill files go: $TMPDIR where set, else /var/tmp (on a disk on every Linux, where /tmp may be a RAM
    disk: Debian 13 mounts one there), else the system's temporary folder."""
    if os.environ.get("TMPDIR"):
        return os.environ["TMPDIR"]
    return "/var/tmp" if os.access("/var/tmp", os.W_OK) else tempfile.gettempdir()


def disk_read_speed(folder, size=64 * 2**20, block=16 * 2**20) -> float:
    """Bytes/s reading back `size` bytes written to a file in `folder` (where spill files go) once they are on the
    disk and out of the page cache: what a streamed half costs when the cache does not hold it (on a virtual
    machine the host's own cache may still serve it, as it would the spill file)."""
    with tempfile.TemporaryFile(dir=folder) as f:
        chunk = os.urandom(block)
        for _ in range(max(1, size // block)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # needs no root
        buf, done, t = bytearray(block), 0, time.perf_counter()
        while (n := os.preadv(f.fileno(), [buf], done)) > 0:
            done += n
        return done / max(time.perf_counter() - t, 1e-9)


def in_memory(folder) -> bool:
    """Whether `folder` is on a RAM disk (tmpfs, ramfs): a spill file there takes memory, not disk space."""
    path, fstype, best = os.path.realpath(folder), "", -1
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                mount = fields[1].replace("\\040", " ") if len(fields) > 2 else ""
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if mount and inside and len(mount) > best:
                    fstype, best = fields[2], len(mount)
    except OSError:
        return False
    return fstype in ("tmpfs", "ramfs")


def choose(sizes: dict, budget: int, slots: int = 1):
    """sizes: {(layer, half): bytes held} in the order the stage runs them; budget: bytes for them all, resident
    and window. -> (the halves to stream, in that order; the window's bytes): ([], 0) when everything fits; None
    when not even a window of the largest half fits. The fewest bytes stream that leave room for a window of
    `slots` of the largest streamed half (else, where no choice leaves that much, of one), and the window gets all
    the resident halves leave (so it holds more than one half, and the loader reads one while another computes,
    wherever the budget allows). With one slot a larger budget never streams more; with two it may, where it
    first leaves room for two (a Vulkan rank's: its copies then run beside the streamed halves' products).
    FFN halves (the largest) stream first, then attention halves, each kind evenly spread over the layers so that
    the loader reads while resident halves compute."""
    total = sum(sizes.values())
    if total <= budget:
        return [], 0
    kinds = [[k for k in sizes if k[1] == half and sizes[k]] for half in ("ffn", "attention")]  # none empty
    candidates, streamed = [], []
    for keys in kinds:
        for n in range(1, len(keys) + 1):
            candidates.append(set(streamed) | {keys[(2 * j + 1) * len(keys) // (2 * n)] for j in range(n)})
        streamed += keys
    for room in range(slots, 0, -1):
        fits = [c for c in candidates
                if total - sum(sizes[k] for k in c) + room * max(sizes[k] for k in c) <= budget]
        if fits:
            chosen = min(fits, key=lambda c: sum(sizes[k] for k in c))  # the first of the fewest bytes
            return [k for k in sizes if k in chosen], budget - total + sum(sizes[k] for k in chosen)
    return None


def figures(window) -> dict:
    """A window's figures for the result and `status`: zeros where there is none (a rank that streams nothing).
    stream_copies_by: "host" where the host brings the halves in (the loader thread, or the compute thread's
    staged copies), "device" where a GPU copies them from host memory itself (its wait is then GPU time, in the
    token's, not stream_wait_s), "" where nothing streams."""
    if window is None:
        return dict(streamed_halves=0, streamed_weights_bytes=0, window_bytes=0, streamed_bytes=0, stream_wait_s=0.0,
                    stream_read_s=0.0, stream_copies_by="")
    return dict(streamed_halves=len(window.order), streamed_weights_bytes=window.held_bytes,
                window_bytes=window.window_bytes, streamed_bytes=window.streamed_bytes,
                stream_wait_s=round(window.wait_s, 6), stream_read_s=round(window.read_s, 6),
                stream_copies_by=window.copies_by)


class Window:
    INLINE = True  # the compute thread brings a half in itself where the loader is idle and nothing is held

    def __init__(self, order, folder=None):
        self.order = list(order)  # the streamed halves, (layer, half), in the order the stage runs them
        self.index = {key: i for i, key in enumerate(self.order)}
        self.folder = folder or spill_folder()
        try:
            self.file = tempfile.TemporaryFile(dir=self.folder)
        except OSError as e:
            raise UserError(f"cannot make the spill file for streamed weights in {self.folder}: {e.strerror}") \
                from None
        self.parts = {}  # key -> (offset in the file, bytes, [(linear, [(dtype, shape, offset in the file)])])
        self.spilled = 0  # the file's length so far (the next half starts there, a multiple of HUGE)
        self.held_bytes = 0  # the spilled linears' nbytes: what they would hold resident
        self.window_bytes, self.map, self.base = 0, None, 0
        self.cond = threading.Condition()
        self.held = deque()  # keys brought in and not yet dropped, in the order they came
        self.in_bytes = 0  # their bytes
        self.next = 0  # the loader's next index in `order`
        self.loading = False  # the loader is bringing a half in
        self.generation = 0  # a restart's count: a half brought in before it is not counted as held
        self.closed, self.error = False, None
        self.streamed_bytes, self.wait_s, self.read_s = 0, 0.0, 0.0
        self.thread = None

    @property
    def copies_by(self) -> str:
        """Who brings the streamed halves in (`figures`' stream_copies_by): here the host."""
        return "host"

    # ---- at load --------------------------------------------------------------------------------------------------
    def spill(self, key, linears):
        """Write the half's arrays to the spill file, from a HUGE boundary and in one write (`_write`); its linears
        hold none until `start`."""
        layout, pieces, end = [], [], 0  # end: bytes from the half's start
        self.held_bytes += sum(lin.nbytes for lin in linears)
        for lin in linears:
            arrays = []
            for a in lin.arrays:
                pieces += [bytes(-end % ALIGN), np.ascontiguousarray(a).reshape(-1).view(np.uint8)]
                end += -end % ALIGN
                arrays.append((a.dtype, a.shape, self.spilled + end))
                end += a.nbytes
            layout.append((lin, arrays))
        pieces.append(bytes(-end % PAGE))
        try:
            _write(self.file.fileno(), pieces, self.spilled)
        except OSError as e:
            raise UserError(f"cannot write the spill file for streamed weights in {self.folder}: {e.strerror} "
                            f"(it takes as much disk as the halves streamed; set TMPDIR elsewhere)") from None
        for lin, _ in layout:
            lin.arrays = None
        self.parts[key] = (self.spilled, end, layout)
        self.spilled += end + -end % HUGE

    @property
    def largest(self) -> int:
        return max(size for _, size, _ in self.parts.values())

    def start(self, window_bytes):
        """Map the spill file, give the streamed linears their arrays in it, start the loader."""
        self._map(window_bytes)
        self._launch()

    def _map(self, window_bytes):
        if set(self.parts) != set(self.order):
            raise RuntimeError("a streamed half was not spilled")
        self.window_bytes = max(window_bytes, self.largest)
        os.ftruncate(self.file.fileno(), self.spilled)  # (the gap after the last half: a hole, as between halves)
        self.map = mmap.mmap(self.file.fileno(), self.spilled, access=mmap.ACCESS_READ)
        whole = np.frombuffer(self.map, np.uint8)
        self.base = whole.ctypes.data
        for _, _, layout in self.parts.values():
            for lin, arrays in layout:
                lin.arrays = tuple(whole[off:off + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize]
                                   .view(dtype).reshape(shape) for dtype, shape, off in arrays)
        self._advise(0, self.spilled, mmap.MADV_DONTNEED)

    def _launch(self):
        self.thread = threading.Thread(target=self._load, name="spmd-stream", daemon=True)
        self.thread.start()

    def _advise(self, offset, size, advice):
        if _libc.madvise(self.base + offset, size, advice) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    # ---- the loader thread ----------------------------------------------------------------------------------------
    def _load(self):
        while True:
            with self.cond:
                while not self.closed and (self.loading or not self._room(self.order[self.next])):
                    self.cond.wait()
                if self.closed:
                    return
                key, self.loading, generation = self.order[self.next], True, self.generation
            self._bring(key, generation)

    def _bring(self, key, generation):
        """Bring `key` in (the loader, or the compute thread: `_acquire`), `loading` set by the caller; then count
        it held, unless a restart came meanwhile."""
        size = self.parts[key][1]
        t = time.perf_counter()
        error = None
        try:
            self._bring_in(key)
        except OSError as e:
            error = f"cannot read the spill file for streamed weights: {e.strerror}"
        except Exception as e:  # (a bug: said, where a loader that died would leave the compute thread waiting)
            error = f"bringing a streamed half in failed: {type(e).__name__}: {e}"
        with self.cond:
            self.loading = False
            if error is not None:
                self.error, self.closed = error, True
            elif generation == self.generation:
                self.held.append(key)
                self.in_bytes += size
                self.next = (self.next + 1) % len(self.order)
                self.streamed_bytes += size
                self.read_s += time.perf_counter() - t
            self.cond.notify_all()

    def _room(self, key) -> bool:
        """Whether the loader may bring `key` in now (the lock held): the window has room for it beside the halves
        held, or none is held."""
        return not self.held or self.in_bytes + self.parts[key][1] <= self.window_bytes

    def _bring_in(self, key):
        """The half's pages read (where the page cache lacks them) and mapped."""
        self._populate(*self.parts[key][:2])

    def _drop(self, key):
        """The half's pages out of the process (the lock held)."""
        self._advise(*self._span(key), mmap.MADV_DONTNEED)

    def _span(self, key):
        """(offset, bytes) of the half and the gap after it, up to the next half's HUGE boundary."""
        offset, size, _ = self.parts[key]
        return offset, size + -size % HUGE

    def _populate(self, offset, size):
        """Pages of the mapping read (where the page cache lacks them) and mapped: the half's whole HUGE runs with
        MADV_POPULATE_READ, the rest (its last, partial run) by reading a byte every FAULT_AROUND bytes where the
        page cache holds it (`TAIL`). Without MADV_POPULATE_READ (Linux before 5.14): read ahead, then touch a byte a
        page."""
        whole = size // HUGE * HUGE
        cached = _cached(self.file.fileno(), offset + whole, size - whole)
        try:
            self._advise(offset, whole if cached else size, MADV_POPULATE_READ)
        except OSError as e:
            if e.errno != errno.EINVAL:  # an older kernel
                raise
            self._advise(offset, size, mmap.MADV_WILLNEED)
            np.frombuffer(self.map, np.uint8, size, offset)[::PAGE].sum()
            return
        if cached:
            for at in range(self.base + offset + whole, self.base + offset + size, FAULT_AROUND):
                ctypes.memmove(_byte, at, 1)  # (a foreign call: the GIL let go meanwhile)

    # ---- the compute thread ---------------------------------------------------------------------------------------
    @contextmanager
    def hold(self, key):
        """The half `key` brought in for the block's length, dropped from the process after."""
        if key not in self.index:
            yield
            return
        self._acquire(key)
        try:
            self._ready(key)
            yield
        finally:
            with self.cond:
                self._drop(key)
                if self.held and self.held[0] == key:
                    self.held.popleft()
                    self.in_bytes -= self.parts[key][1]
                self.cond.notify_all()

    def _ready(self, key):
        """The compute thread, with `key` brought in: what is left to do before it computes (nothing here)."""

    def _restart(self):
        """Out of turn (the lock held, the loader idle): every half held dropped."""
        for k in self.held:
            self._drop(k)
        self.held.clear()

    def _acquire(self, key):
        t = time.perf_counter()
        with self.cond:
            if not self._coming(key):  # out of turn: start again from `key`
                self.generation += 1
                while self.loading:
                    self.cond.wait()
                self._restart()
                self.in_bytes, self.next = 0, self.index[key]
                self.cond.notify_all()
            inline = self.INLINE and not self.held and not self.loading and not self.closed
            if inline:
                self.loading, generation = True, self.generation
        if inline:  # the loader idle and nothing held: bring it in here, without two hand-offs between threads
            self._bring(key, generation)
        with self.cond:
            while not self.held and not self.closed:
                self.cond.wait()
            if self.error is not None:
                raise RuntimeError(self.error)
            if self.closed:
                raise RuntimeError("the weight window is closed")
            self.wait_s += time.perf_counter() - t

    def _coming(self, key) -> bool:
        """Whether `key` is the next half the compute thread gets without a restart."""
        return self.held[0] == key if self.held else self.order[self.next] == key

    # ---- the end -----------------------------------------------------------------------------------------------------
    def close(self):
        """Stop the loader and unmap; the streamed linears are left without arrays."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
        for _, _, layout in self.parts.values():
            for lin, _ in layout:
                lin.arrays = None
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view of it is still alive somewhere: the mapping goes with the last one
                pass
        try:
            self.file.close()
        except OSError:  # the write that failed (disk full) is still buffered: the unnamed file goes anyway
            pass


def device_copies(dev) -> bool:
    """Whether the device can copy streamed halves from host memory itself (`halves_on_host`, memory allowing): a
    GPU with memory of its own (not lavapipe, nor one that shares the host's: its host-visible memory is a heap
    apart from its main one) and timeline semaphores (Vulkan 1.2), which order its copy queue's work and its
    compute queue's."""
    return not dev.is_cpu and dev.timeline and _pool_heap(dev) != dev.main_heap


def _pool_heap(dev) -> int:
    """The memory heap of the device's "pool" buffers (vk_runtime.Buffer): where `host` would be."""
    return dev.heap_of[dev.memory_type((1 << len(dev.type_flags)) - 1, "pool")]


def halves_on_host(dev, nbytes) -> bool:
    """Whether a DeviceWindow holds its streamed halves (nbytes as its slots hold them) in the host's memory, the
    device copying each into its slot: `device_copies`, with room in that heap and that memory to spare on the
    host (asked in the rank's `host_turn`, after the host's ranks before it took theirs)."""
    from .rank import available_bytes
    if not device_copies(dev):
        return False
    heap = _pool_heap(dev)
    return (dev.heap_size[heap] - dev.heap_used[heap] >= nbytes
            and (available_bytes() or 0) >= nbytes + POOL_SPARE)


@contextmanager
def host_turn(folder, wait_s=TURN_WAIT_S):
    """The ranks of one host, one at a time (an flock on the spill folder, held by an open descriptor: nothing is
    left behind however the process ends): each decides whether the host holds its streamed halves once the ranks
    before it have taken their memory, so that MemAvailable counts them. -> whether this rank has its turn (False
    after wait_s: another holds it that long; True without a lock where the folder cannot be opened to read)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield True
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                turn = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    turn = False
                    break
                time.sleep(0.02)
        yield turn
    finally:
        os.close(fd)  # (the lock goes with it)


class DeviceWindow(Window):
    """A Vulkan rank's window: the streamed halves' matrices, repacked for its kernels, are spilled as on the cpu,
    and on the device they live in `slots`: buffers of the largest half each, as many as the window's bytes hold
    (at most one per streamed half). The j-th streamed half in running order has slot j % len(slots) for good, so
    the command buffers recorded once bind it.
    On a GPU with memory of its own whose host has the memory to spare (`halves_on_host`), the streamed halves are
    held in the host's memory as a Vulkan buffer (`host`, written once at start from the spill file) and the
    device's copy queue (its copy engines, where it has them: `Device.copy_commands`) brings each into its slot:
    `hold` queues the copy of the half that uses the slot next as soon as the half's products are queued, to start
    once they are done (timeline semaphores order the two queues), so that it runs while the halves between the two
    compute, and the half's products wait for their own copy. No host thread copies, and the copy runs at the bus's
    DMA speed (an H200's host: 50 GB/s, where its writes reach 17-24). Otherwise (a device without timeline
    semaphores; lavapipe, say, whose "device" memory is the host's, which --memory-limit caps; or a host buffer the
    driver refused) the loader brings a half in once its slot is free (the half before it in that slot has run),
    copying it from the spill file's mapping into its slot: on the loader thread, in pieces on COPY_THREADS threads,
    where the host maps device memory (resizable BAR, unified memory, lavapipe: one thread's writes into an H200's
    memory reach ~10 GB/s, four ~26); else on the compute thread through a staging buffer just before the half runs
    (the device's queue is the compute thread's). The host drops the pages at once: they are only passing
    through.
    Within a slot the halves of its sequence sit at its start and its end in turn (`span`): where a slot has one
    half's room (the smallest window), an attention half and the FFN half after it then share only part of it, and
    each half's copy goes in two pieces, the bytes it shares with the half before it in the slot and the rest, each
    waiting only for the products of the halves that hold its bytes: the part of the next half that the half
    computing does not hold is copied while it computes (a cut wherever any of the slot's halves begins or ends
    would cost more copies, 11-15 us each on an H100, where a file's layers differ in size)."""

    INLINE = False  # (a slot's user is claimed by the loader alone: `_room`)

    def __init__(self, order, dev, folder=None):
        super().__init__(order, folder)
        self.dev, self.slots, self.slot_of, self.user = dev, [], {}, []  # slot_of: key -> its slot's index
        self.copiers = ThreadPoolExecutor(COPY_THREADS, "spmd-copy") if dev.direct else None
        self.host, self.copies = None, {}  # the halves in host memory, and each one's copy to its slot: pieces
        # (a command buffer of the copy queue, [the halves of the slot that hold any of its bytes])
        self.in_slot, self.ready = [], []  # per slot: the half whose copy was queued last, dev.copied's value once
        # it is there
        self.span = {}  # key -> (first byte, end) of the half in its slot
        self.done_at = {}  # key -> dev.computed's value once the products of its last hold are done
        self.next_in_slot = {}  # key -> the half that uses its slot after it in running order (itself: a slot each)

    def start(self, window_bytes):
        """Map the spill file, make the slots, bind each streamed linear to its slot; then the halves into host
        memory (`_fill_host`), or the loader started."""
        from .backends.vk_runtime import Buffer
        self._map(window_bytes)
        places = {key: self._device_layout(layout) for key, (_, _, layout) in self.parts.items()}
        slot_bytes = max(max(size for _, size in places.values()), 16)
        count = max(1, min(len(self.order), self.window_bytes // slot_bytes))
        self.window_bytes = count * slot_bytes
        self.slots = [Buffer(self.dev, slot_bytes, copy_queue=True) for _ in range(count)]
        self.user = [None] * count
        for j, key in enumerate(self.order):
            self.slot_of[key] = j % count
            # (after the last round of the slots, the first half in this slot: its index is the slot's)
            self.next_in_slot[key] = self.order[j + count if j + count < len(self.order) else j % count]
            size = max(places[key][1], 4)
            first = 0 if j // count % 2 == 0 else (slot_bytes - size) // DEVICE_ALIGN * DEVICE_ALIGN
            self.span[key] = (first, first + size)
            for (lin, _), at in zip(self.parts[key][2], places[key][0]):
                lin.bind(self.slots[j % count], [first + a for a in at])
        with host_turn(self.folder) as turn:  # (without a turn, the host's copies: they take no memory)
            if turn and halves_on_host(self.dev, sum(size for _, size in places.values())):
                try:
                    self._fill_host(places)
                    return
                except UserError:  # the driver refused the buffer (Buffer's out-of-memory): the host's copies
                    self._free_host()
        self._launch()

    def _fill_host(self, places):
        """Every streamed half into `host`, each laid out as in its slot, and its copy into the slot recorded."""
        from .backends.vk_runtime import Buffer
        at, where = 0, {}
        for key in self.order:
            where[key] = at
            at += -(-places[key][1] // DEVICE_ALIGN) * DEVICE_ALIGN
        self.host = Buffer(self.dev, at, "pool", copy_queue=True)
        count = len(self.slots)  # (the semaphores' values now, not 0: a wait must stay within 2^31 of them)
        self.in_slot, self.ready = [None] * count, [self.dev.copied_value] * count
        self.done_at = {key: self.dev.computed_value for key in self.order}
        halves_of = [[k for k in self.order if self.slot_of[k] == slot] for slot in range(count)]  # per slot
        for key in self.order:
            first, end = self.span[key]
            for lin, _ in self.parts[key][2]:
                for array, start in zip(lin.arrays, lin.offsets):
                    self.host.write(array, where[key] + start - first)
            self._advise(*self._span(key), mmap.MADV_DONTNEED)
            mates = halves_of[self.slot_of[key]]
            before = mates[mates.index(key) - 1]  # (round the running order) whose bytes it shares comes last
            cuts = sorted({at for at in self.span[before] if first < at < end} | {first, end})
            self.copies[key] = [(self.dev.copy_commands(self.host, self.slots[self.slot_of[key]], hi - lo,
                                                        where[key] + lo - first, lo),
                                 [k for k in mates if self.span[k][0] < hi and lo < self.span[k][1]])
                                for lo, hi in zip(cuts, cuts[1:])]

    @property
    def copies_by(self) -> str:
        return "device" if self.host is not None else "host"

    def _queue_copy(self, key):
        """The half's copy into its slot on the device's copy queue, a piece at a time, each to start once the
        products of the halves that last held its bytes are done (the pieces free first go first)."""
        slot = self.slot_of[key]
        self.in_slot[slot] = None  # (until it is queued: an interrupt in between leaves the slot unknown)
        waits = [(max(self.done_at[k] for k in holders), cmd) for cmd, holders in self.copies[key]]
        for after, cmd in sorted(waits, key=lambda wait: wait[0]):
            self.ready[slot] = self.dev.queue_copy(cmd, after=after)
        self.in_slot[slot] = key
        self.streamed_bytes += self.parts[key][1]

    @contextmanager
    def hold(self, key):
        """With the halves in host memory: the compute queue's submissions in the block (the half's products) wait
        for its copy (queued now if its slot does not hold it: the first time, or out of turn); after the block,
        the copy of the half that uses its slot next is queued, to start once they are done."""
        if self.host is None or key not in self.index:
            with super().hold(key):
                yield
            return
        slot = self.slot_of[key]
        if self.in_slot[slot] != key:
            self._queue_copy(key)
        try:
            self.dev.gate = self.ready[slot]
            yield
        finally:
            self.dev.gate = 0
            # (whether or not the block queued its products: a signal after all of the compute queue's work)
            self.done_at[key] = self.dev.signal_computed()
        if self.next_in_slot[key] != key:
            self._queue_copy(self.next_in_slot[key])

    @staticmethod
    def _device_layout(layout) -> tuple:
        """([each linear's arrays' offsets in its slot (at multiples of DEVICE_ALIGN: any storage-buffer offset
        alignment), in the order its `bind` takes them], the bytes the half takes in a slot)."""
        out, at = [], 0
        for lin, arrays in layout:
            mine = []
            for dtype, shape, _ in arrays:
                at = -(-at // DEVICE_ALIGN) * DEVICE_ALIGN
                mine.append(at)
                at += -(-max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 16) // 4) * 4  # as Part.bound
            out.append(mine)
        return out, at

    def _room(self, key) -> bool:
        if self.user[self.slot_of[key]] is not None:
            return False
        self.user[self.slot_of[key]] = key  # the loader brings it in next
        return True

    def _bring_in(self, key):
        if self.dev.direct:
            self._copy(key)  # its reads bring the pages in
        else:
            self._populate(*self.parts[key][:2])

    def _ready(self, key):
        if not self.dev.direct:
            self._copy(key)

    def _copy(self, key):
        """The half's arrays from the spill file's mapping into its slot (in pieces on COPY_THREADS threads where
        the host maps device memory, else through a staging buffer), then those pages out of the process."""
        layout = self.parts[key][2]
        slot = self.slots[self.slot_of[key]]
        pieces = [(raw[at:at + COPY_PIECE], start + at) for lin, _ in layout
                  for array, start in zip(lin.arrays, lin.offsets)
                  for raw in (array.reshape(-1).view(np.uint8),) for at in range(0, raw.size, COPY_PIECE)]
        if self.copiers is not None:
            list(self.copiers.map(lambda piece: slot.write(*piece), pieces))
        else:
            for piece in pieces:
                slot.write(*piece)
        self._advise(*self._span(key), mmap.MADV_DONTNEED)

    def _drop(self, key):
        super()._drop(key)
        if self.user[self.slot_of[key]] == key:
            self.user[self.slot_of[key]] = None

    def _restart(self):
        super()._restart()
        self.user = [None] * len(self.slots)  # a half the loader brought in for nothing included

    def _free_host(self):
        if self.copies:
            self.dev.idle()  # (a copy queued for nothing, after an error)
        for pieces in self.copies.values():
            for cmd, _ in pieces:
                self.dev.free_copy(cmd)
        self.copies = {}
        if self.host is not None:
            self.host.free()
        self.host = None

    def close(self):
        super().close()
        if self.copiers is not None:
            self.copiers.shutdown()
        self._free_host()
        for buf in self.slots:
            buf.free()
        self.slots = []

"""Weight streaming's parts on one process: which halves stream (`choose`), the window (spill, bring in, drop),
the size flag, and the cpu and vulkan backends' bytes held (what the choice is made from); the Vulkan window's
device slots."""
import os
import threading
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from spmd.errors import UserError, human_size, parse_size
from spmd.quants import QTensor, dequantize, from_float
from spmd.stream import Window, choose, figures


def layer_sizes(n_layers, attention, ffn):
    return {(i, half): size for i in range(n_layers) for half, size in (("attention", attention), ("ffn", ffn))}


# ---- choose -----------------------------------------------------------------------------------------------------
def test_everything_fits_streams_nothing():
    sizes = layer_sizes(4, 10, 30)
    assert choose(sizes, 160) == ([], 0)


def test_the_fewest_ffn_halves_stream_evenly_spread_and_the_window_takes_the_rest():
    sizes = layer_sizes(8, 10, 30)  # 320 in all
    streamed, window = choose(sizes, 270)
    # k FFN halves streamed leave 320 - 30k resident beside a window of at least 30: k = 3 is the fewest for 270
    assert all(half == "ffn" for _, half in streamed)
    layers = [i for i, _ in streamed]
    assert len(layers) == 3
    gaps = np.diff(layers + [layers[0] + 8])  # round the cycle: evenly spread, gaps of 8 / 3 -> 2 or 3
    assert set(gaps) <= {2, 3}, layers
    assert streamed == sorted(streamed)  # in the order the stage runs them
    assert window == 270 - (320 - 3 * 30) == 40  # more than one half: the loader reads ahead


def test_attention_halves_stream_once_every_ffn_half_does():
    sizes = layer_sizes(4, 10, 30)  # 160
    assert {half for half, in [(h,) for _, h in choose(sizes, 90)[0]]} == {"ffn"}  # 40 resident + 30 fit 90
    streamed, window = choose(sizes, 60)  # every FFN half: 40 + 30 > 60; then attention halves
    assert {half for _, half in streamed} == {"ffn", "attention"}
    resident = 160 - sum(sizes[k] for k in streamed)
    assert resident + 30 <= 60 and window == 60 - resident


def test_a_window_of_the_largest_half_at_least_and_none_below():
    sizes = layer_sizes(3, 10, 30)
    streamed, window = choose(sizes, 45)
    assert len(streamed) == 5 and window == 45 - 10  # one attention half (10) stays resident
    assert choose(sizes, 30) == (list(sizes), 30)  # everything through a window of the largest half
    assert choose(sizes, 29) is None  # below it


def test_two_slots_where_the_budget_leaves_room_for_them_else_one():
    sizes = layer_sizes(8, 10, 30)  # 320 in all
    streamed, window = choose(sizes, 270, slots=2)
    # k FFN halves streamed leave 320 - 30k resident beside two of 30: 320 - 30k + 60 <= 270 first at k = 4
    assert len(streamed) == 4 and all(half == "ffn" for _, half in streamed)
    assert window == 270 - (320 - 4 * 30) == 70
    sizes = layer_sizes(3, 10, 30)  # 120: two of 30 beside anything resident never fit 45
    assert choose(sizes, 45, slots=2) == choose(sizes, 45)
    assert choose(sizes, 29, slots=2) is None


def test_a_larger_budget_never_streams_more():
    rng = np.random.default_rng(5)
    for _ in range(20):
        sizes = {(i, h): int(rng.integers(0, 50)) for i in range(int(rng.integers(1, 9))) for h in ("attention", "ffn")}
        before = None
        for budget in range(max(sizes.values()), sum(sizes.values()) + 2):
            streamed = sum(sizes[k] for k in choose(sizes, budget)[0])
            assert before is None or streamed <= before, (sizes, budget)
            before = streamed


# ---- the window -------------------------------------------------------------------------------------------------
class FakeLinear:
    """What the window needs of a backend's linear: the arrays its products read, and their bytes."""

    def __init__(self, rng, shapes):
        self.arrays = tuple(rng.integers(0, 255, s, dtype=np.uint8).view(np.float32) if len(s) == 2 and s[1] % 4 == 0
                            else rng.integers(0, 255, s, dtype=np.uint8) for s in shapes)
        self.nbytes = sum(a.nbytes for a in self.arrays)


def make_halves(n_layers, rows, rng):
    halves = {}
    for i in range(n_layers):
        for half in ("attention", "ffn"):
            halves[i, half] = [FakeLinear(rng, [(rows, 256), (rows, 13), (1, 1)]) for _ in range(2 + (half == "ffn"))]
    return halves


def same(a, b):
    """The same dtype, shape and bits (random float32 bits include NaNs)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_window_gives_every_half_its_arrays_in_turn_and_leaves_no_file(tmp_path):
    rng = np.random.default_rng(0)
    halves = make_halves(5, 300, rng)
    copies = {k: [[a.copy() for a in lin.arrays] for lin in lins] for k, lins in halves.items()}
    order = [k for k in halves if k[0] % 2 == 1 or k[1] == "ffn"]
    w = Window(order, tmp_path)
    for k in order:
        w.spill(k, halves[k])
        assert all(lin.arrays is None for lin in halves[k])
    assert os.listdir(tmp_path) == []  # the spill file has no name
    w.start(2 * w.largest)
    for _ in range(3):  # round the cycle
        for k in halves:
            with w.hold(k):
                for lin, expected in zip(halves[k], copies[k]):
                    assert all(same(a, e) for a, e in zip(lin.arrays, expected))
    fig = figures(w)
    assert fig["streamed_halves"] == len(order) and fig["stream_copies_by"] == "host"
    assert figures(None)["stream_copies_by"] == "" and figures(None)["streamed_bytes"] == 0
    assert fig["streamed_bytes"] >= 3 * sum(w.parts[k][1] for k in order)
    # out of turn (a pass that stopped half way): the loader starts again from the half asked for
    for k in [order[3], order[0], order[0], order[5]]:
        with w.hold(k):
            assert same(halves[k][0].arrays[0], copies[k][0][0])
    w.close()
    assert all(lin.arrays is None for k in order for lin in halves[k])
    assert os.listdir(tmp_path) == []


def bounded(compute, timeout_s=60):
    """Run `compute` on a thread of its own, so that a wait that never ends fails the test rather than hanging it:
    (the thread's ident, the exception it raised or None)."""
    raised = []

    def run():
        try:
            compute()
        except Exception as e:
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"still waiting after {timeout_s} s"
    return thread.ident, (raised or [None])[0]


def test_the_compute_thread_brings_a_half_in_itself_where_the_loader_is_idle(tmp_path):
    """Where nothing is held and the loader is not bringing a half in (as between any two halves at the smallest
    window), `hold` brings the half in on the compute thread. With the loader never started, every half, round the
    cycle and out of turn, is then brought in by this thread alone, and its wait and read are counted."""
    class NoLoader(Window):
        def _launch(self):
            self.by = []

        def _bring_in(self, key):
            self.by.append(threading.get_ident())
            super()._bring_in(key)

    rng = np.random.default_rng(2)
    halves = make_halves(3, 200, rng)
    copies = {k: [[a.copy() for a in lin.arrays] for lin in lins] for k, lins in halves.items()}
    order = list(halves)
    w = NoLoader(order, tmp_path)
    for k in order:
        w.spill(k, halves[k])
    w.start(w.largest)
    asked = order + order + [order[4], order[1], order[1]]  # (the last two out of turn)
    right = []

    def compute():
        for k in asked:
            with w.hold(k):
                right.append(all(same(a, e) for lin, c in zip(halves[k], copies[k]) for a, e in zip(lin.arrays, c)))

    ident, error = bounded(compute)
    assert error is None and right == [True] * len(asked) and w.by == [ident] * len(asked)
    assert w.wait_s >= w.read_s > 0 and w.streamed_bytes == sum(w.parts[k][1] for k in asked)
    w.close()


def test_a_half_that_cannot_be_brought_in_ends_the_hold_with_the_reason(tmp_path):
    """Whichever thread brings the half in, an error there (here not an OSError) reaches the compute thread."""
    class Failing(Window):
        def _bring_in(self, key):
            raise ValueError("no such page")

    halves = make_halves(2, 100, np.random.default_rng(3))
    w = Failing(list(halves), tmp_path)
    for k, lins in halves.items():
        w.spill(k, lins)
    w.start(w.largest)

    def compute():
        with w.hold(next(iter(halves))):
            pass

    _, error = bounded(compute)
    assert isinstance(error, RuntimeError) and "ValueError: no such page" in str(error)
    w.close()


def test_window_pages_leave_the_process(tmp_path):
    """The loader brings the first halves in ahead of use (the resident set grows by the window without this
    thread touching them); cycling through 48 MiB of streamed halves with a window of 2 of them (8 MiB) leaves the
    resident set within the window (and a margin for the interpreter), not the 48 MiB."""
    rng = np.random.default_rng(1)
    mib = 1 << 20
    halves = {(i, h): [FakeLinear(rng, [(4 * mib // 256, 256)])] for i in range(6) for h in ("attention", "ffn")}
    w = Window(list(halves), tmp_path)
    for k, lins in halves.items():
        w.spill(k, lins)
    before = rss()
    w.start(2 * w.largest)
    import time
    for _ in range(200):  # the loader brings the first two halves in ahead of use, untouched by this thread
        if w.in_bytes == 2 * w.largest:
            break
        time.sleep(0.01)
    assert w.in_bytes == 2 * w.largest and rss() - before >= 0.9 * w.in_bytes, (rss() - before) / mib
    top = before
    for _ in range(2):
        for k in halves:
            with w.hold(k):
                assert halves[k][0].arrays[0].view(np.uint8).sum() >= 0  # read every page
                top = max(top, rss())
    w.close()
    assert top - before <= 8 * mib + 4 * mib, (top - before) / mib


def pmd_mapped(address):
    """Bytes of the mapping holding `address` that the process maps in 2 MiB pages (FilePmdMapped in smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "FilePmdMapped:":
                return int(line.split()[1]) * 1024
    return 0


def test_a_half_is_mapped_in_2_mib_pages_where_the_file_system_makes_them(tmp_path):
    """Each half goes to the spill file from a 2 MiB boundary in one write, so that where the file system keeps a
    file's pages in 2 MiB folios (a probe file written in one go says whether it does), the loader maps the half's
    whole 2 MiB runs as such: populating then costs a few ns a 4 KiB page instead of 70."""
    import mmap
    from spmd import stream
    mib = 1 << 20
    with open(tmp_path / "probe", "w+b") as f:
        f.write(bytes(8 * mib))
        f.flush()
        with mmap.mmap(f.fileno(), 8 * mib, access=mmap.ACCESS_READ) as m:
            base = np.frombuffer(m, np.uint8).ctypes.data
            stream._libc.madvise(base, 8 * mib, stream.MADV_POPULATE_READ)
            probe = pmd_mapped(base)
            del base
    if probe == 0:
        pytest.skip("the spill folder's file system keeps no 2 MiB folios here (or no MADV_POPULATE_READ)")
    rng = np.random.default_rng(3)
    halves = {(i, "ffn"): [FakeLinear(rng, [(3 * mib + 100 + i,), (mib + 7,)]) for _ in range(2)] for i in range(3)}
    w = Window(list(halves), tmp_path)
    for k, lins in halves.items():
        w.spill(k, lins)
    assert all(offset % stream.HUGE == 0 for offset, _, _ in w.parts.values())
    w.start(w.largest)
    if w.base % stream.HUGE:
        w.close()
        pytest.skip("the kernel put the spill file's mapping off a 2 MiB boundary")
    for k in halves:
        with w.hold(k):
            offset, size, _ = w.parts[k]
            assert pmd_mapped(w.base) >= size // stream.HUGE * stream.HUGE, (k, pmd_mapped(w.base), size)
    w.close()


def present_pages(address, nbytes):
    """How many of the pages from `address` on, `nbytes` of them, the process maps now (/proc/self/pagemap's bit 63,
    one 8-byte entry a page)."""
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // page * 8)
        entries = np.frombuffer(f.read(-(-nbytes // page) * 8), np.uint64)
    return int(np.count_nonzero(entries >> np.uint64(63)))


@pytest.mark.parametrize("evicted", [False, True])
def test_the_loader_maps_every_page_of_a_half_its_tail_too(tmp_path, evicted):
    """A half's last, partial 2 MiB run is mapped by a read every FAULT_AROUND bytes where the page cache holds it,
    else with MADV_POPULATE_READ (the spill file's pages evicted first): once the loader has brought a half in,
    every page of it is mapped either way, wherever in a 2 MiB run its end falls. (The kernel's fault_around_bytes
    at its default, 64 KiB, or more.)"""
    from spmd import stream
    mib, page = 1 << 20, stream.PAGE
    rng = np.random.default_rng(5)
    sizes = [(3 * mib + 100,), (mib // 2 + 7,), (2 * mib,), (5 * page + 1,)]  # tails of 1 MiB, 0.5 MiB, none, 5 pages
    halves = {(i, "ffn"): [FakeLinear(rng, [shape])] for i, shape in enumerate(sizes)}
    order = list(halves)
    w = Window(order, tmp_path)
    for k, lins in halves.items():
        w.spill(k, lins)
    if evicted:
        os.fsync(w.file.fileno())
        os.posix_fadvise(w.file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    w.start(w.largest)
    try:
        for k in order:
            with w.hold(k):  # (brought in by the loader, untouched by this thread)
                offset, size, _ = w.parts[k]
                assert present_pages(w.base + offset, size) == -(-size // page), (k, size)
    finally:
        w.close()


def test_cached_says_whether_the_page_cache_holds_every_page_of_a_range(tmp_path):
    """`_cached` (cachestat): a range written is cached; after its pages are dropped it is not, nor with one page of
    it read back; read whole, it is again. An empty range is."""
    from spmd import stream
    page = stream.PAGE
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwritev(fd, [bytes(8 * page)], 0)
        if not stream._cached(fd, 0, 8 * page):
            pytest.skip("no cachestat here (Linux before 6.5): tails are populated as the rest is")
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not stream._cached(fd, 2 * page, 3 * page + 1)
        os.pread(fd, page, 3 * page)
        assert stream._cached(fd, 3 * page, page) and not stream._cached(fd, 2 * page, 3 * page)
        os.pread(fd, 8 * page, 0)
        assert stream._cached(fd, 2 * page, 3 * page + 1) and stream._cached(fd, 5 * page, 0)
    finally:
        os.close(fd)


def test_window_refuses_a_folder_it_cannot_write(tmp_path):
    with pytest.raises(UserError, match="spill file"):
        Window([(0, "ffn")], tmp_path / "missing")


# ---- --memory-limit's sizes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [("2G", 2 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29),
                                            ("300000", 300000), ("64k", 64 << 10), ("2gb", 2 << 30),
                                            (" 1T ", 1 << 40), ("300B", 300), ("1KIB", 1024)])
def test_sizes(text, expected):
    assert parse_size(text, "--memory-limit") == expected


@pytest.mark.parametrize("text", ["", "G", "2X", "-1G", "1.2.3M", "²G", "1e9", "nan", "4i", "4iB", "GiB", "iB"])
def test_bad_sizes_are_one_clear_error(text):
    with pytest.raises(UserError, match="--memory-limit .*expected a size"):
        parse_size(text, "--memory-limit")


# ---- the cpu backend's bytes held ----------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K,
                                   T.Q6_K, T.Q2_K, T.Q3_K, T.IQ4_NL])
@pytest.mark.parametrize("rows, cols", [(3, 256), (17, 768), (5, 1280)])
@pytest.mark.parametrize("activations", ["f32", "int8"])
def test_cpu_held_bytes_is_what_a_linear_holds(qtype, rows, cols, activations):
    from test_backends import random_qtensor

    from spmd.backends.cpu import CpuBackend
    backend = CpuBackend(1, activations)
    w = random_qtensor(qtype, rows, cols, np.random.default_rng(2))
    assert backend.held_bytes(qtype, rows, cols) == backend.linear(w).nbytes


def vulkan_backend():
    from spmd.backends import get_backend
    try:
        return get_backend("vulkan")
    except UserError as e:
        pytest.skip(f"no Vulkan: {e}")


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K])
@pytest.mark.parametrize("rows, cols", [(3, 256), (17, 768), (0, 256), (5, 0)])
def test_vulkan_held_bytes_is_what_a_linear_holds(qtype, rows, cols):
    from test_backends import random_qtensor
    backend = vulkan_backend()
    w = random_qtensor(qtype, rows, cols, np.random.default_rng(2))
    lin = backend.linear(w)
    assert backend.held_bytes(qtype, rows, cols) == lin.nbytes == backend.linear(w, resident=False).nbytes
    assert lin.nbytes == (0 if rows * cols == 0 else sum(
        max(p.w.nbytes, 16) + (p.d.nbytes if p.d is not None else 0) for p in lin.parts))
    lin.free()


@pytest.mark.parametrize("name", ["numpy", "cpu", "vulkan"])
@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0])
@pytest.mark.parametrize("keep", [((32, 96), (256, 512), (608, 640)), ((8, 40), (256, 300))], ids=["blocks", "cut"])
def test_held_bytes_of_a_slice_that_cuts_quant_blocks_is_what_its_linear_holds(name, qtype, keep):
    """A column slice that cuts quant blocks (QTensor.keep: the blocks around its own columns) is priced by what
    the backend keeps: numpy its own columns as float32; Vulkan a K-quant's own 32-element blocks (Q4_K there as
    q4m, not q4k), and float32 of its own columns for a cut inside 32-element blocks or of a type kept whole
    (Q4_0); cpu the blocks around them."""
    from test_backends import random_qtensor

    from spmd.backends import get_backend
    backend = vulkan_backend() if name == "vulkan" else get_backend(name, 1)
    whole = random_qtensor(qtype, 5, 768, np.random.default_rng(4))
    w = QTensor(qtype, 5, 768, whole.data, keep)
    lin = backend.linear(w if backend.lacks(w) is None else from_float(dequantize(w)))  # as spmd.weights does
    assert backend.held_bytes(qtype, 5, 768, keep) == lin.nbytes
    if name == "vulkan":
        lin.free()


@pytest.mark.parametrize("direct, on_host, refused", [(True, False, False), (False, False, False),
                                                      (True, True, False), (True, True, True)],
                         ids=["mapped", "staged", "host", "host refused"])
def test_device_window_runs_each_streamed_half_from_its_slot(tmp_path, monkeypatch, direct, on_host, refused):
    """Five halves of Vulkan linears (K-quants with their word scales, Q8_0, F32) streamed through two slots (the
    fifth wraps round onto the first's slot): every product equals the resident linear's, bit for bit, over three
    cycles and out of turn; the slots are the window's only device memory for them. Staged: as on a GPU whose
    memory the host cannot map (lavapipe's can), the compute thread copies each half in through a staging buffer.
    Host: as on a GPU whose host has memory to spare, the halves are held in host memory and the device copies
    each into its slot (lavapipe's "device" memory being the host's, it does not do so by itself); refused: the
    driver refuses that host buffer, and the host's copies take over."""
    from test_backends import random_qtensor

    from spmd import stream
    from spmd.stream import DeviceWindow
    backend = vulkan_backend()
    monkeypatch.setattr(backend.dev, "direct", direct if backend.dev.direct else False)
    monkeypatch.setattr(stream, "halves_on_host", lambda dev, nbytes: on_host)
    if refused:
        def refuse(self, places):
            raise UserError("the weights need more device memory")
        monkeypatch.setattr(DeviceWindow, "_fill_host", refuse)
        on_host = False
    rng = np.random.default_rng(4)
    types = [T.Q4_K, T.Q8_0, T.F32, T.Q6_K, T.Q5_0]
    tensors = {(i, "ffn"): [random_qtensor(q, r, 256, rng) for r in (40, 24)] for i, q in enumerate(types)}
    x = rng.standard_normal((3, 256)).astype(np.float32)
    expected = {}
    for k, ws in tensors.items():
        resident = [backend.linear(w) for w in ws]
        expected[k] = [lin(x) for lin in resident]
        for lin in resident:
            lin.free()
    w = DeviceWindow(list(tensors), backend.dev, tmp_path)
    halves = {k: [backend.linear(q, resident=False) for q in ws] for k, ws in tensors.items()}
    assert all(lin.parts == [] for lins in halves.values() for lin in lins)  # no device memory of their own
    for k, lins in halves.items():
        w.spill(k, lins)
    used = backend.dev.heap_used[:]
    w.start(2 * w.largest + 4096)
    host = w.host.size if on_host else 0  # (lavapipe: one heap)
    assert (w.host is not None) == on_host and (w.thread is None) == on_host  # (no loader thread)
    assert figures(w)["stream_copies_by"] == ("device" if on_host else "host")
    assert len(w.slots) == 2 and sum(backend.dev.heap_used) - sum(used) == sum(s.size for s in w.slots) + host
    assert all((s.view is not None) == backend.dev.direct for s in w.slots)
    for k in 3 * list(tensors) + [(3, "ffn"), (0, "ffn"), (0, "ffn"), (4, "ffn")]:
        with w.hold(k):
            assert all(same(lin(x), e) for lin, e in zip(halves[k], expected[k])), k
    w.close()
    for lins in halves.values():
        for lin in lins:
            lin.free()


@pytest.mark.parametrize("slots", [1, 2, 3, 5])
def test_host_memory_halves_are_copied_ahead_on_the_copy_queue(tmp_path, monkeypatch, slots):
    """With the halves in host memory, `hold` queues each half's copy into its slot as soon as the products of the
    half before it in that slot are queued (then the device copies it while the halves between compute), the
    products wait for their own copy, and a half whose slot does not hold it (the first time, out of turn) has
    its copy queued on the spot. Products against the resident linears', bit for bit, over three rounds and out of
    turn, each half's command buffer queued without waiting (as a one-rank pass queues them) and waited for at the
    end of each round; the copies queued are counted against the slots' sequence worked out here by hand. The
    halves of a slot's sequence sit at its start and its end in turn, and a copy goes in pieces that tile the half,
    each waiting for the products of every half of the slot that holds any of its bytes and for no others: with one
    slot, part of a half is copied before the products of the half before it are done."""
    from test_backends import random_qtensor

    from spmd import stream
    from spmd.backends.vk_runtime import Buffer, Recording
    from spmd.stream import DeviceWindow
    backend = vulkan_backend()
    monkeypatch.setattr(stream, "halves_on_host", lambda dev, nbytes: True)
    rng = np.random.default_rng(5)
    types = [T.Q4_K, T.Q8_0, T.F32, T.Q6_K, T.Q5_0]
    tensors = {(i, "ffn"): random_qtensor(q, 40, 256, rng) for i, q in enumerate(types)}
    keys = list(tensors)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    expected = {}
    for k, wt in tensors.items():
        resident = backend.linear(wt)
        expected[k] = resident(x)
        resident.free()
    w = DeviceWindow(keys, backend.dev, tmp_path)
    halves = {k: backend.linear(wt, resident=False) for k, wt in tensors.items()}
    for k, lin in halves.items():
        w.spill(k, [lin])
    base = backend.dev.computed_value  # (the device's semaphores count on from earlier tests)
    w.start(slots * w.largest + 4096)
    assert len(w.slots) == slots and w.host is not None
    # each half writes its own rows of the result, so that a round's products can all be queued before any is read
    xb, yb = Buffer(backend.dev, 256 * 4, "host"), Buffer(backend.dev, 5 * 40 * 4, "host")
    xb.array(np.float32, (1, 256))[:] = x
    recs = {}
    for i, (k, lin) in enumerate(halves.items()):  # (as VulkanModel._record)
        rec = recs[k] = Recording(backend.dev)
        rec.barrier(after_copy=True)
        lin.dispatch(rec, xb, 256, 0, yb, 200, 40 * i, 1)
        rec.barrier(to_host=True)
        rec.end()
    dev, log = backend.dev, []  # ("copy", key, piece, after, value), ("products", key, gate), ("computed", value)
    cmds = {c: (k, i) for k, pieces in w.copies.items() for i, (c, _) in enumerate(pieces)}

    def queue_copy(cmd, after, queue=dev.queue_copy):
        value = queue(cmd, after)
        log.append(("copy", *cmds[cmd], after, value))
        return value

    def signal_computed(signal=dev.signal_computed):
        log.append(("computed", signal()))
        return log[-1][1]

    monkeypatch.setattr(dev, "queue_copy", queue_copy)
    monkeypatch.setattr(dev, "signal_computed", signal_computed)
    rounds = [keys, keys, keys, [keys[3], keys[0], keys[0], keys[4]]]
    for turns in rounds:
        for i, k in enumerate(turns):
            with w.hold(k):
                log.append(("products", k, dev.gate))
                recs[k].submit(fence=k in turns[i + 1:] or i == len(turns) - 1)  # (waited before it goes again)
                if k in turns[i + 1:]:
                    recs[k].wait()
        recs[turns[-1]].wait()
        got = yb.array(np.float32, (5, 40))
        for k in turns:
            assert same(got[keys.index(k)][None], expected[k]), k
    # where each half sits: the i-th of its slot's sequence at the slot's start where i is even, else ending within
    # the last 256 bytes (its arrays' alignment) of the slot
    for j, k in enumerate(keys):
        first, end = w.span[k]
        slot_bytes = w.window_bytes // slots  # (the buffers' own sizes are the driver's, which may round up)
        at_end = slot_bytes - 256 < end <= slot_bytes and first % 256 == 0
        assert first == 0 if j // slots % 2 == 0 else at_end, (k, w.span[k])
        assert halves[k].offsets[0] == first
    mates = {k: [m for m in keys if keys.index(m) % slots == keys.index(k) % slots] for k in keys}
    # a half's pieces: its bytes cut where the half before it in its slot begins or ends
    before = {k: mates[k][mates[k].index(k) - 1] for k in keys}
    cuts = {k: sorted({b for b in w.span[before[k]] if w.span[k][0] < b < w.span[k][1]} | set(w.span[k]))
            for k in keys}
    # the semaphores' values from the log: each piece waits for the products of every half of its slot that holds
    # any of its bytes (the value signalled after each one's last products), the pieces of a copy go in the order
    # of those values, and each half's products wait for its last piece, the latest copy into their slot
    freed, holds, copied, current, queued, earlier = {}, {}, {}, None, [], 0
    for entry in log:
        if entry[0] == "copy":
            _, k, piece, after, value = entry
            lo, hi = cuts[k][piece], cuts[k][piece + 1]
            holders = [m for m in mates[k] if w.span[m][0] < hi and lo < w.span[m][1]]
            assert after == max(freed.get(m, base) for m in holders) and value > max(copied.values(), default=0)
            if queued and queued[-1][0] == k and len(queued[-1][1]) < len(cuts[k]) - 1:  # the copy's next piece
                assert after >= queued[-1][2] and piece not in queued[-1][1]
                queued[-1][1].add(piece)
                queued[-1][2] = after
            else:
                queued.append([k, {piece}, after])
            earlier += current is not None and after < freed.get(current, base)  # ahead of the last products
            holds[keys.index(k) % slots], copied[k] = k, value
        elif entry[0] == "products":
            _, current, gate = entry
            assert holds[keys.index(current) % slots] == current and gate == copied[current], entry
        else:
            freed[current] = entry[1]
    assert all(len(pieces) == len(cuts[k]) - 1 for k, pieces, _ in queued)  # (every piece, once a copy)
    if slots == 1:
        assert earlier > 0
    queued = [k for k, _, _ in queued]
    # the slots' sequence by hand: a half j in slot j % slots; after its products, the next half in running order
    # with that slot is queued; a hold whose slot holds another queues its own first
    in_slot, expect = [None] * slots, []
    for k in [k for turns in rounds for k in turns]:
        j = keys.index(k)
        if in_slot[j % slots] != k:
            expect.append(k)
            in_slot[j % slots] = k
        after = [keys[(j + i) % 5] for i in range(1, 6) if (j + i) % 5 % slots == j % slots][0]
        if after != k:
            expect.append(after)
            in_slot[j % slots] = after
    assert queued == expect
    if slots == 5:
        assert queued == keys  # (a slot each: every half copied once)
    if slots == 1:
        # (each hold queues the next; the first queues itself, and so does each of the last round's, out of turn)
        assert len(queued) == 1 + 3 * 5 + 2 * 4
    w.close()
    for buf in (xb, yb):
        buf.free()
    for r in recs.values():
        r.free()
    for lin in halves.values():
        lin.free()


def test_the_ranks_of_a_host_take_turns_to_decide_on_host_memory(tmp_path):
    """host_turn: while one holds the spill folder's turn, another (a second descriptor: as another process) waits
    for it, and goes on without it after its wait; once it is given back, the next has it at once."""
    from spmd.stream import host_turn
    with host_turn(str(tmp_path)) as first:
        t = time.perf_counter()
        with host_turn(str(tmp_path), wait_s=0.2) as second:
            waited = time.perf_counter() - t
        assert first and not second and waited >= 0.2
    t = time.perf_counter()
    with host_turn(str(tmp_path), wait_s=5) as third:
        assert third and time.perf_counter() - t < 1
    with host_turn(str(tmp_path / "missing")) as unlocked:  # (nothing to lock: as before, each rank alone)
        assert unlocked


@pytest.mark.parametrize("case, expected", [("gpu", True), ("unified", False), ("lavapipe", False),
                                            ("no timeline", False), ("heap too small", False), ("host short", False)])
def test_halves_go_to_host_memory_only_on_a_gpu_with_its_own_memory_and_a_host_with_room(monkeypatch, case, expected):
    """A discrete GPU (24 GiB of its own, a host heap of 32 GiB apart, timeline semaphores) whose host has 40 GiB
    available takes 8 GiB of streamed halves into host memory; not a GPU whose host-visible memory is its main heap
    (unified memory), not lavapipe, not a device without timeline semaphores, not where the host heap or the host's
    available memory lacks the bytes and a spare GiB (such a GPU can still copy them: `device_copies`, which gives a
    Vulkan rank two slots)."""
    from types import SimpleNamespace

    from spmd import rank, stream
    from spmd.backends import vk_runtime
    vk = vk_runtime.vk
    dl, hv, hc = (vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT,
                  vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT)
    flags = ((dl, 0), (dl | hv | hc, 0)) if case == "unified" else ((dl, 0), (hv | hc, 1))
    types = [SimpleNamespace(propertyFlags=f, heapIndex=h) for f, h in flags]
    heaps = [SimpleNamespace(size=24 << 30), SimpleNamespace(size=(4 if case == "heap too small" else 32) << 30)]
    monkeypatch.setattr(vk, "vkGetPhysicalDeviceMemoryProperties", lambda physical: SimpleNamespace(
        memoryTypeCount=2, memoryTypes=types, memoryHeapCount=2, memoryHeaps=heaps))
    monkeypatch.setattr(rank, "available_bytes", lambda: (8 << 30 if case == "host short" else 40 << 30))
    dev = vk_runtime.Device.__new__(vk_runtime.Device)
    dev.physical, dev.is_cpu, dev.timeline = None, case == "lavapipe", case != "no timeline"
    dev._memory_types()
    assert stream.halves_on_host(dev, 8 << 30) == expected
    assert stream.device_copies(dev) == (case in ("gpu", "heap too small", "host short"))


def test_cpu_repacks_a_big_matrix_in_bands_with_the_same_result(monkeypatch):
    from test_backends import random_qtensor

    import spmd.backends.cpu as cpu
    for qtype in (T.Q4_0, T.Q6_K, T.F16):
        w = random_qtensor(qtype, 37, 512, np.random.default_rng(3))
        whole = cpu._repack(w)
        monkeypatch.setattr(cpu, "REPACK_ROWS", 512 * 5)  # bands of 5 rows, the last of 2
        banded = cpu._repack(w)
        monkeypatch.undo()
        assert all(same(a, b) for a, b in zip(whole, banded))


def test_human_sizes():
    assert [human_size(n) for n in (812, 10 << 10, 59036160, 3 << 29, 5 << 40)] == \
        ["812 B", "10.0 KiB", "56.3 MiB", "1.5 GiB", "5120.0 GiB"]


# ---- where the spill file goes --------------------------------------------------------------------------------------
def test_spill_folder_is_tmpdir_else_var_tmp(monkeypatch, tmp_path):
    from spmd.stream import spill_folder
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert spill_folder() == str(tmp_path)
    monkeypatch.delenv("TMPDIR")
    assert spill_folder() == ("/var/tmp" if os.access("/var/tmp", os.W_OK) else __import__("tempfile").gettempdir())


def mount_type(path):
    """The file system type of the mount holding `path`, read independently of spmd.stream (df's answer)."""
    import subprocess
    p = subprocess.run(["df", "--output=fstype", path], capture_output=True, text=True)
    return p.stdout.split()[-1] if p.returncode == 0 else None


@pytest.mark.parametrize("folder", ["/dev/shm", "/", "/var/tmp"])
def test_a_ram_disk_is_told_apart(folder):
    from spmd.stream import in_memory
    if not os.path.isdir(folder) or mount_type(folder) is None:
        pytest.skip(f"{folder} or df is absent")
    assert in_memory(folder) == (mount_type(folder) in ("tmpfs", "ramfs"))


def test_a_spill_file_that_cannot_be_written_is_one_error(tmp_path):
    import resource
    import signal
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    w = Window([(0, "ffn")], tmp_path)
    lin = FakeLinear(np.random.default_rng(4), [(20, 250)])  # 5000 bytes, past what the file may hold
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(UserError, match=f"^cannot write the spill file for streamed weights in {tmp_path}: "
                                            "File too large"):
            w.spill((0, "ffn"), [lin])
        w.close()  # after a failed write, closing must not raise
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def test_a_half_written_a_few_bytes_at_a_time_is_whole(tmp_path, monkeypatch):
    """The spill file's writes go on where a pwritev wrote only part of its buffers (7 bytes a call here), and one
    that writes nothing is a full disk, not a loop."""
    from spmd import stream
    pwritev = os.pwritev
    monkeypatch.setattr(stream.os, "pwritev", lambda fd, views, at: pwritev(fd, [bytes(views[0][:7])], at))
    halves = make_halves(2, 5, np.random.default_rng(5))
    copies = {k: [[a.copy() for a in lin.arrays] for lin in lins] for k, lins in halves.items()}
    w = Window(list(halves), tmp_path)
    for k, lins in halves.items():
        w.spill(k, lins)
    w.start(w.largest)
    for k in halves:
        with w.hold(k):
            for lin, expected in zip(halves[k], copies[k]):
                assert all(same(a, e) for a, e in zip(lin.arrays, expected))
    w.close()
    monkeypatch.setattr(stream.os, "pwritev", lambda fd, views, at: 0)
    w = Window([(0, "ffn")], tmp_path)
    with pytest.raises(UserError, match="cannot write the spill file .*No space left on device"):
        w.spill((0, "ffn"), make_halves(1, 5, np.random.default_rng(6))[0, "ffn"])
    w.close()


def test_a_spill_file_on_a_ram_disk_is_said_once(tmp_path):
    import json
    import subprocess
    import sys

    from spmd.stream import in_memory
    from spmd.synth import Shape, write_model
    if not os.path.isdir("/dev/shm") or not in_memory("/dev/shm"):
        pytest.skip("no RAM disk at /dev/shm")
    model = write_model(tmp_path / "m.gguf", Shape(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn=128, vocab=512,
                                                   context=32), qtype="Q8_0", seed=1)
    cmd = [sys.executable, "-m", "spmd.run", "--model", str(model), "--prompt-ids", "1,2,3", "--steps", "3",
           "--output", "json", "--control-socket", "none"]
    free = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    limit = str(free["ranks"][0]["memory_floor_bytes"])
    p = subprocess.run(cmd + ["--memory-limit", limit], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": "/dev/shm"})
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("note: the spill file for streamed weights is in memory (/dev/shm is a RAM disk)") == 1
    assert json.loads(p.stdout)["tokens"] == free["tokens"]


@pytest.mark.parametrize("limit", [None, "1G"])
def test_weights_beyond_the_hosts_memory_say_which_types_are_widened_and_what_to_give(monkeypatch, tmp_path, limit):
    """Weights that do not fit the host's available memory: the refusal names the file's types the backend holds as
    F32 (several times the file's bytes: why a file that fits does not), and asks for --memory-limit, or, given
    one over what the host has, for sizes within it."""
    from mpi4py import MPI

    from spmd import rank
    from spmd.comm import Comm
    from spmd.engine import Engine, RunOptions
    from spmd.prompts import PromptSpec
    from spmd.synth import Shape, write_model
    path = write_model(tmp_path / "m.gguf", Shape(dim=64, n_layers=2, ffn=128, vocab=300), "Q8_0", 1)
    monkeypatch.setattr(rank, "available_bytes", lambda: 4096)
    opts = RunOptions(model=str(path), prompts=(PromptSpec(ids=(1, 2)),), steps=2, backend="numpy",
                      memory_limit=limit)
    with pytest.raises(UserError) as e:
        Engine(opts, Comm(comm=MPI.COMM_SELF), log=lambda _m: None)
    said = str(e.value)
    assert said.startswith("the weights of host ") and " (its Q8_0 matrices held as F32, several times their size " \
        "in the file: the numpy backend has no kernels for them) but it has 0.0 GiB available: " in said, said
    assert ("give the host's ranks --memory-limit sizes that add up to less than 0.0 GiB" if limit else
            "give --memory-limit (a rank streams") in said

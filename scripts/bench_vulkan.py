"""Decode and prompt speed of the Vulkan backend on one rank, for a TinyLlama-1.1B-shaped random model.

    python scripts/bench_vulkan.py                       # Q4_0 and Q8_0 on Vulkan device 0
    python scripts/bench_vulkan.py --peak-tbs 2.0        # the GPU's memory bandwidth, when its name does not say
    python scripts/bench_vulkan.py --cpu                 # also the cpu backend on the same files: the ratio
    python scripts/bench_vulkan.py --llama-bench auto    # beside llama.cpp CUDA on the same files (built here
                                                         # once by scripts/build_llama_cpp.sh --cuda)
    python scripts/bench_vulkan.py --shape llama2-7b --ffn-steps --activations f32,int8   # what each epilogue of
                                                         # the FFN's decode steps costs (ffn_steps)
    python scripts/bench_vulkan.py --against HEAD        # this tree beside a git revision's, run in turn
    python scripts/bench_vulkan.py --against HEAD,../v1,../v2   # and beside trees in folders (variants)

Reports per weight type: prompt tokens/s (one batched pass), decode tokens/s, GPU time per decode token (timestamp
queries around the command buffer), the time per token spent outside the GPU (wall minus GPU: Python, submit, wait,
embedding upload, logits read-back), the weights read per token and the bandwidth that makes, as a fraction of the
device's memory bandwidth (H100 SXM 3.35 TB/s, H100 PCIe 2.0 TB/s, H200 4.8 TB/s; from the device name or
--peak-tbs). On a CPU Vulkan device (Mesa's lavapipe) the cpu backend runs on the same files in the same run by
default, and the script prints lavapipe's speed as a fraction of it.
"""
import argparse
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import CUDA_BENCH  # noqa: E402
from bench_gpus import llama  # noqa: E402
from spmd.backends import get_backend  # noqa: E402
from spmd.choices import KV_CACHES  # noqa: E402
from spmd.config import read_config  # noqa: E402
from spmd.gguf_file import GGUFFile  # noqa: E402
from spmd.model import Segment  # noqa: E402
from spmd.plan import make_plan, parse_layout  # noqa: E402
from spmd.synth import LLAMA2_7B, TINYLLAMA, Shape, write_model  # noqa: E402
from spmd.weights import load_shard  # noqa: E402

WARM_S = 1.0  # the GPU is kept busy this long before a figure is timed (an H200 idles at 345 MHz, not 1980: in
# --kernels, a product measured right after seconds of repacking on the CPU read 5.7x slower, and so did the next;
# a second model's prompt in one run read 3x slower after 0.3 s of warm-up, as fast as the first after 1 s)
PEAK_TBS = (("H100 PCIE", 2.0), ("H100", 3.35), ("H200", 4.8), ("A100", 2.0))
ROOT = Path(__file__).resolve().parents[1]


def peak_for(name, given):
    if given:
        return given
    upper = name.upper()
    return next((tbs for key, tbs in PEAK_TBS if key in upper), None)


def build(path, backend_name, device, max_seq, kv_cache="f32", activations="f32"):
    backend = get_backend(backend_name, threads=None, device=device, activations=activations)
    f = GGUFFile(str(path))
    cfg = read_config(f)
    share = make_plan(parse_layout(None, 1), cfg)[0]
    t = time.perf_counter()
    weights = load_shard(f, cfg, share, backend, notice=lambda _m: None)
    model = backend.make_model(cfg, weights, share, max_seq, kv_cache=kv_cache)
    model.open(0, max_seq)
    return backend, model, time.perf_counter() - t


def step(model, tokens, pos):
    """One pass of `tokens` at `pos` through the whole model (one rank: every layer and the head) -> logits."""
    return model.forward(model.embed(tokens), [Segment(0, pos, len(tokens))], None, head=True)[0]


def measure(model, n_prompt, steps, repeats=3):
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, model.cfg.vocab, n_prompt)
    busy = time.perf_counter() + WARM_S  # warm-up: pipelines, first-use costs, and the GPU's clock (WARM_S)
    while time.perf_counter() < busy:
        step(model, prompt, 0)
    prefill, host = [], []  # host: the prompt's wall time less the host's wait for the GPU at its end
    dev = getattr(model, "dev", None)  # (a Vulkan model's device: Device.waited_s)
    for _ in range(repeats):
        waited, t = dev.waited_s if dev else 0.0, time.perf_counter()
        logits = step(model, prompt, 0)
        prefill.append(time.perf_counter() - t)
        host.append(prefill[-1] - (dev.waited_s - waited if dev else 0.0))
    profile = getattr(model, "profile", False)  # (the cpu backend's model, compared on lavapipe, has none)
    if profile:
        show_profile(model.last_profile, f"the {n_prompt}-token prompt")
    first = token = int(np.argmax(logits))
    walls, gpus, parts, greedy = [], [], [], []
    for i in range(steps):  # `step`, timed in its parts: the embedding, the pass, the greedy choice
        t0 = time.perf_counter()
        x = model.embed(np.array([token]))
        t1 = time.perf_counter()
        logits = model.forward(x, [Segment(0, n_prompt + i, 1)], None, head=True)[0]
        t2 = time.perf_counter()
        token = int(np.argmax(logits))  # greedy, as generation does
        t3 = time.perf_counter()
        greedy.append(token)
        walls.append(t3 - t0)
        parts.append((t1 - t0, t2 - t1, t3 - t2))
        gpus.append(model.gpu_seconds() if hasattr(model, "gpu_seconds") else None)  # (not timed: read after)
    warm = max(1, steps // 8)  # the first steps record the decode command buffer
    walls = np.array(walls[warm:])
    gpus = None if None in gpus else np.array(gpus[warm:])
    if profile and gpus is not None:
        embed, forward, choice = np.median(np.array(parts[warm:]), axis=0)
        print(f"  host time of a decode token (medians): embedding {1e6 * embed:.0f} us, the pass less its GPU time "
              f"{1e6 * (forward - np.median(gpus)):.0f} us (its input and row table, submit, the fence poll, the "
              f"logits copy), argmax {1e6 * choice:.0f} us", flush=True)
    r = dict(prompt_tps=n_prompt / np.median(prefill), prompt_host_ms=1e3 * np.median(host),
             decode_tps=1.0 / np.median(walls),
             ms_per_token=1e3 * np.median(walls), gpu_ms=None if gpus is None else 1e3 * np.median(gpus),
             outside_ms=None if gpus is None else 1e3 * np.median(walls - gpus), chained=False)
    most = getattr(model, "ahead_tokens", lambda: 0)()
    if most:  # as generation decodes greedily on one rank: chains of `most` tokens on the device (`ahead`)
        r.update(step_tps=r["decode_tps"], chained=True, **chained(model, first, n_prompt, steps, most, greedy))
    return r


def chained(model, token, pos, steps, most, greedy):
    """Decode `steps` tokens from `token` at `pos` in chains (VulkanModel.ahead) after one chain that records its
    command buffer; the figures per token, and whether its tokens are the step-a-token loop's (`greedy`). A chain's
    GPU time is its last step's times its steps (one buffer: its timestamps are the last run's), a little above the
    mean where the cache grows along the chain."""
    model.ahead([token], [Segment(0, pos, 1)], min(most, steps), model.cfg.vocab)  # (recording)
    got, gpu, t = [], 0.0, time.perf_counter()
    while len(got) < steps:
        k = min(most, steps - len(got))
        tokens, _ = model.ahead([got[-1] if got else token], [Segment(0, pos + len(got), 1)], k, model.cfg.vocab)
        got += [row[0] for row in tokens]
        gpu += model.gpu_seconds() or 0.0
    wall = (time.perf_counter() - t) / steps
    if got != greedy:
        print(f"  WARNING: chained greedy tokens differ from the step-a-token loop's: {got} against {greedy}")
    return dict(decode_tps=1.0 / wall, ms_per_token=1e3 * wall, gpu_ms=1e3 * gpu / steps if gpu else None,
                outside_ms=1e3 * (wall - gpu / steps) if gpu else None, chain=most)


def check(args):
    """Correct first: greedy tokens and logits of a tiny model on the device against the numpy reference."""
    shape = Shape(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn=256, vocab=512, context=64)
    for qtype in ("F32", "Q8_0", "Q4_0"):
        path = Path(args.dir) / f"bench-vulkan-check-{qtype}.gguf"
        write_model(path, shape, qtype=qtype, seed=7)
        runs = []
        for name in ("numpy", "vulkan"):
            _, model, _ = build(path, name, args.device, 40)
            logits = step(model, np.arange(1, 14), 0)
            tokens = [int(np.argmax(logits))]
            for pos in range(13, 24):
                tokens.append(int(np.argmax(step(model, np.array(tokens[-1:]), pos))))
            runs.append((logits, tokens))
            getattr(model, "close", lambda: None)()
        err = np.abs(runs[0][0] - runs[1][0]).max()
        same = runs[0][1] == runs[1][1]
        print(f"check {qtype}: max |logit difference| {err:.2e}, greedy tokens {'equal' if same else 'DIFFER'}")
        if err > 1e-3 or not same:
            sys.exit(1)


def gpu_seconds(rec, warm_s, runs=1):
    """The least GPU time of `runs` runs of a recording (timestamps on), after running it for warm_s seconds
    (WARM_S: the GPU's clock)."""
    busy = time.perf_counter() + warm_s
    while time.perf_counter() < busy:
        rec.run()
    times = []
    for _ in range(runs):
        rec.run()
        times.append(rec.gpu_seconds())
    return min(times)


def random_linear(backend, qtype, rows, cols, rng):
    """A matrix of random weights of GGUF type `qtype` on the device, each block's float16 scale (and min) small and
    finite."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    from spmd.quants import F16_FIELDS, QTensor, row_bytes
    data = rng.integers(0, 256, (rows, row_bytes(T[qtype], cols)), dtype=np.uint8)
    for at in F16_FIELDS.get(T[qtype], ()):
        blocks = data.reshape(rows, -1, GGML_QUANT_SIZES[T[qtype]][1])
        blocks[:, :, at:at + 2] = np.array([0.01], np.float16).view(np.uint8)
    return backend.linear(QTensor(T[qtype], rows, cols, data))


def kernels(args):
    """One product at a time: GPU time per dispatch of a row of products on random weights, with and without a
    barrier between them, and the bandwidth that makes (steady state, no Python in the way); with int8 activations
    also the rounding of x to 8 bits (kernels/quantize_f32) alone, which each product's input takes once."""
    from spmd.backends.vk_runtime import Buffer, Recording
    backend = get_backend("vulkan", device=args.device, activations="int8" if "int8" in args.activations else "f32")
    rng = np.random.default_rng(0)

    def timed(record):
        out = []
        for barriers in (True, False):
            rec = Recording(backend.dev, timestamps=True)
            for _ in range(20):
                record(rec)
                if barriers:
                    rec.barrier()
            rec.end()
            # (warmed once a matrix: the CPU's repacking idles the GPU)
            out.append(gpu_seconds(rec, WARM_S * barriers) / 20)
            rec.free()
        return out

    for qtype in args.qtypes.split(","):
        for rows, cols in ((2048, 2048), (5632, 2048), (2048, 5632), (32000, 2048), (4096, 4096), (12288, 4096),
                           (4096, 11008), (65536, 4096)):
            lin = random_linear(backend, qtype, rows, cols, rng)
            x, y = Buffer(backend.dev, cols * 4), Buffer(backend.dev, rows * 4)
            backend.dev.zero([x, y])
            int8 = backend.int8_input(1, cols) if backend.int8 else None
            if int8 is not None:
                backend.dev.zero([int8.rounded, int8.q, int8.d])
            for activations in args.activations.split(","):
                given = int8 if activations == "int8" else None
                t = timed(lambda rec: lin.dispatch(rec, x, cols, 0, y, rows, 0, 1, int8=given))
                print(f"kernel {qtype} {rows}x{cols} ({lin.nbytes / 1e6:.1f} MB) {activations}: with a barrier after "
                      f"each {1e6 * t[0]:7.1f} us {lin.nbytes / t[0] / 1e9:6.0f} GB/s; without {1e6 * t[1]:7.1f} us "
                      f"{lin.nbytes / t[1] / 1e9:6.0f} GB/s", flush=True)
            if int8 is not None:
                t = timed(lambda rec: backend.quantize(rec, x, cols, 1, int8))  # (its own barrier: one only)
                print(f"kernel quantize_f32 of {cols} activations: {1e6 * t[0]:.1f} us", flush=True)
                for buf in (int8.rounded, int8.q, int8.d):
                    buf.free()
            lin.free()
            x.free()
            y.free()


PAST_L2 = 256e6  # bytes of distinct matrices in turn that no GPU's last-level cache holds (H100 50 MB, H200 60)


def ffn_steps(args, shape):
    """The FFN's two decode steps as a decode runs them, each epilogue added in turn, so that what it costs shows:
    gate alone, gate and up paired, + NORM (the RMSNorm's scale from the producer's partial sums), + QUANTIZE (int8:
    rounding what it finished for w2); w2 alone, + ACCUM and PRODUCE (the residual add, the next RMSNorm's input and
    sums), + QUANTIZE. Random weights, enough distinct copies in turn that their bytes pass the GPU's cache (as a
    decode's layers do: one matrix alone would stay in it), a barrier after each."""
    from spmd.backends.vk_runtime import Buffer, Recording
    backend = get_backend("vulkan", device=args.device, activations="int8" if "int8" in args.activations else "f32")
    dev, rng, dim, ffn = backend.dev, np.random.default_rng(0), shape.dim, shape.ffn
    x, h, y, xg, g = (Buffer(dev, n * 4) for n in (dim, ffn, dim, dim, dim))
    ss, counts = Buffer(dev, -(-dim // backend.matvec_nr) * 4), Buffer(dev, -(-ffn // 32) * 4)
    rounded = [backend.int8_input(1, n) for n in (dim, ffn)] if backend.int8 else []
    keep = [x, h, y, xg, g, ss, counts] + [b for r in rounded for b in (r.rounded, r.q, r.d)]
    dev.zero(keep)
    norm = (ss, -(-dim // backend.matvec_nr), 1e-5, dim)
    for qtype in args.qtypes.split(","):
        first = random_linear(backend, qtype, ffn, dim, rng)
        k = int(min(32, max(2, -(-PAST_L2 // (3 * first.nbytes)))))
        gate = [first] + [random_linear(backend, qtype, ffn, dim, rng) for _ in range(k - 1)]
        up = [random_linear(backend, qtype, ffn, dim, rng) for _ in range(k)]
        down = [random_linear(backend, qtype, dim, ffn, rng) for _ in range(k)]
        for activations in args.activations.split(","):
            i8 = activations == "int8"
            xq, hq = (rounded[0], rounded[1]) if i8 else (None, None)
            produce = (ss, (g, 0, g.nbytes), xg)
            steps = (("gate", gate, x, h, dict()),
                     ("gate and up", gate, x, h, dict(pair=True)),
                     ("gate and up + NORM", gate, x, h, dict(pair=True, norm=norm)),
                     ("gate and up + NORM + QUANTIZE", gate, x, h, dict(pair=True, norm=norm, quantize=(hq, counts))),
                     ("w2", down, h, y, dict()),
                     ("w2 + ACCUM, PRODUCE", down, h, y, dict(accum=True, produce=produce)),
                     ("w2 + ACCUM, PRODUCE + QUANTIZE", down, h, y,
                      dict(accum=True, produce=produce, quantize=(xq, counts))))
            for name, mats, src, dst, kw in steps:
                if "quantize" in kw and not i8:
                    continue
                src_int8 = (hq if src is h else xq) if i8 else None
                rec = Recording(dev, timestamps=True)
                for i, lin in enumerate(mats):
                    extra = dict(kw, pair=up[i]) if kw.get("pair") else kw
                    lin.dispatch(rec, src, lin.cols, 0, dst, lin.rows, 0, 1, int8=src_int8, **extra)
                    rec.barrier()
                rec.end()
                t = gpu_seconds(rec, WARM_S, runs=3) / k
                rec.free()
                nbytes = mats[0].nbytes * (2 if kw.get("pair") else 1)
                print(f"ffn step {qtype} {activations:4} {name:32} {1e6 * t:7.1f} us {nbytes / t / 1e9:6.0f} GB/s "
                      f"({k} matrices in turn)", flush=True)
        for lin in gate + up + down:
            lin.free()
    for buf in keep:
        buf.free()


def floor(args):
    """What a decode's dependent step costs before its work: GPU time a dispatch of a chain of dispatches that do
    nothing (kernels/add_f32 over no elements), with a barrier after each as a decode's steps have and without, at
    1 to 4096 workgroups (H100, 2026-12-06: 2.4-2.6 us with the barrier up to 1024, 4.3 at 4096; 0.2-0.8 without)."""
    from spmd.backends.vk_runtime import Buffer, Recording
    dev = get_backend("vulkan", device=args.device).dev
    pipe, y = dev.pipeline("add_f32", 2, 4), Buffer(dev, 1024)
    chain = 200
    for groups in (1, 132, 1024, 4096):
        for barrier in (True, False):
            rec = Recording(dev, timestamps=True)
            for _ in range(chain):
                rec.dispatch(pipe, [(y, 0, y.nbytes), (y, 0, y.nbytes)], struct.pack("<I", 0), (groups, 1, 1))
                if barrier:
                    rec.barrier()
            rec.end()
            t = gpu_seconds(rec, WARM_S, runs=5) / chain
            rec.free()
            print(f"floor: {groups:4} workgroups, {'a barrier after each' if barrier else 'no barriers':20} "
                  f"{1e6 * t:6.2f} us a dispatch", flush=True)
    y.free()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qtypes", default="Q4_0,Q8_0",
                    help="file types (Q4_K_M: Q4_K with Q6_K where it gives more bits); with --kernels, weight types")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (one batched pass)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed")
    ap.add_argument("--device", type=int, default=0, help="Vulkan device index")
    ap.add_argument("--kv-cache", choices=KV_CACHES, default="f32",
                    help="spmd's --kv-cache (llama.cpp keeps float16, its default)")
    ap.add_argument("--activations", default="f32",
                    help="spmd's --activations on Vulkan: f32, int8, or f32,int8 (both, each a row)")
    ap.add_argument("--peak-tbs", type=float, default=None, help="the device's memory bandwidth in TB/s")
    ap.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=None,
                    help="also run --backend cpu on the same files (default: when the Vulkan device is a CPU)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="measurements of each model (in turns with the cpu backend's when comparing), the best "
                         "kept: a slow spell of a shared machine or of the GPU's clock only ever slows one down")
    ap.add_argument("--small", action="store_true", help="a model 1/4 of TinyLlama's width (quick checks)")
    ap.add_argument("--shape", choices=("tinyllama", "llama2-7b"), default="tinyllama",
                    help="the model's shape: TinyLlama-1.1B, or Llama-2-7B (where the GPU is less latency-bound)")
    ap.add_argument("--dir", default=os.environ.get("SPMD_BENCH_DIR", tempfile.gettempdir()))
    ap.add_argument("--profile", action="store_true",
                    help="GPU time of each step of a prompt pass and of a decode token, and the host's time of a "
                         "decode token in parts (embedding, the pass less its GPU time, argmax)")
    ap.add_argument("--kernels", action="store_true", help="only time single products (steady state)")
    ap.add_argument("--ffn-steps", action="store_true",
                    help="only time the FFN's decode steps of --shape as a decode runs them, each epilogue added "
                         "in turn")
    ap.add_argument("--floor", action="store_true",
                    help="only time chains of dispatches that do nothing: a decode step's cost before its work")
    ap.add_argument("--check", action="store_true", help="first compare a tiny model with the numpy reference")
    ap.add_argument("--against", metavar="REV[,REV...]", default=None,
                    help="also measure git revision REV's tree (its spmd, kernels, scripts), or the tree in folder "
                         "REV, in turns with this one, --rounds runs each, and print this tree's ratio to each")
    ap.add_argument("--llama-bench", default=None,
                    help="llama.cpp's llama-bench with CUDA, run on the same files; auto: build it here once "
                         "(scripts/build_llama_cpp.sh --cuda) or use the one built before")
    args = ap.parse_args()
    if args.against and (args.kernels or args.ffn_steps or args.floor):
        sys.exit("--against compares the table's rows, which --kernels, --ffn-steps and --floor do not print")
    if args.llama_bench == "auto":
        args.llama_bench = str(CUDA_BENCH)
        if not CUDA_BENCH.exists():
            subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_cpp.sh"), "--cuda"], check=True)
    if args.llama_bench and not os.access(args.llama_bench, os.X_OK):
        sys.exit(f"--llama-bench {args.llama_bench}: no such program")
    if args.against:
        against(args, sys.argv[1:])
        return
    if args.check:
        check(args)
    if args.kernels:
        kernels(args)
        return
    if args.floor:
        floor(args)
        return
    shape = {"tinyllama": TINYLLAMA, "llama2-7b": LLAMA2_7B}[args.shape]
    name = args.shape
    if args.small:
        shape, name = Shape(**{**shape.__dict__, "dim": shape.dim // 4, "ffn": shape.ffn // 4}), name + "-small"
    if args.ffn_steps:
        ffn_steps(args, shape)
        return
    rows = []
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    for qtype in args.qtypes.split(","):
        path = Path(args.dir) / f"bench-vulkan-{name}-{qtype}.gguf"
        if not path.exists():
            write_model(path, shape, qtype=qtype, seed=0)
        for activations in args.activations.split(","):
            rows += bench_type(args, qtype, path, activations)
    print(f"\n{args.shape} shape{' (1/4 width)' if args.small else ''}, {args.prompt}-token prompt, "
          f"{args.steps} decode steps, one rank, KV cache {args.kv_cache}")
    print(f"{'type':5} {'backend':52} {'prompt tok/s':>12} {'decode tok/s':>12} {'ms/token':>9} {'GPU ms':>7} "
          f"{'outside':>7} {'weights MB':>10} {'GB/s (GPU)':>10} {'roofline':>8}")
    for r in rows:
        print(table_row(r))
    if args.llama_bench:
        compare_llama_cpp(args, rows)


def table_row(r):
    """A row of the table the run ends with (`TABLE_ROW` reads its first columns back: --against)."""
    return (f"{r['qtype']:5} {r['backend'][:52]:52} {r['prompt_tps']:12.1f} {r['decode_tps']:12.1f} "
            f"{r['ms_per_token']:9.3f} {shown(r.get('gpu_ms'), '7.3f')} {shown(r.get('outside_ms'), '7.3f')} "
            f"{r['weights_mb']:10.1f} {shown(r.get('gbs_gpu'), '10.1f')} {shown(r.get('roofline_gpu'), '8.0%')}")


# a table row's type, backend, prompt and decode tok/s (the format since 2026-12-02: older revisions' too)
TABLE_ROW = re.compile(r"^(\S+) +((?:vulkan|cpu)\b.*?) +(\d+\.\d) +(\d+\.\d) +\d+\.\d{3} ")


def against(args, argv):
    """--against REV[,REV...]: the same measurement (argv, less --against and --rounds) of each git revision's tree
    (its spmd, kernels and scripts, exported to a temporary folder) or the tree in folder REV, and of this tree, one
    run of each in turn, --rounds times, so that a device's clock and a machine's load fall on all alike (several
    variants measured in one lease); per table row and tree, every run's decode and prompt tok/s, and this tree's
    best over that tree's best. --llama-bench runs once, beside this tree's last run."""
    skip = {"--against", "--rounds", "--llama-bench"}
    rest = [a for i, a in enumerate(argv)
            if a.split("=")[0] not in skip and (i == 0 or argv[i - 1] not in skip)] + ["--rounds", "1"]
    this = "this tree"  # (its name among the trees)
    runs = {}  # (type, backend) -> {tree's name: [(prompt, decode), ...]}
    with tempfile.TemporaryDirectory() as tmp:
        trees = [(rev, exported(rev, Path(tmp) / str(i))) for i, rev in enumerate(args.against.split(","))]
        trees.append((this, ROOT))
        llama = []  # llama.cpp's lines: run once, beside this tree's last run
        for round_ in range(args.rounds):
            for name, tree in trees:
                last = name == this and round_ == args.rounds - 1 and args.llama_bench
                done = subprocess.run([sys.executable, str(tree / "scripts" / "bench_vulkan.py"), *rest]
                                      + (["--llama-bench", os.path.abspath(args.llama_bench)] if last else []),
                                      cwd=tree, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"--against: {name}'s run failed:\n"
                             + "\n".join((done.stdout + done.stderr).splitlines()[-12:]))
                for m in filter(None, map(TABLE_ROW.match, done.stdout.splitlines())):
                    got = runs.setdefault((m[1], m[2].strip()), {n: [] for n, _ in trees})
                    got[name].append((float(m[3]), float(m[4])))
                if last:
                    lines = done.stdout.splitlines()
                    llama = next((lines[i:] for i, line in enumerate(lines) if line.startswith("llama.cpp CUDA")), [])
    if not runs:
        sys.exit("--against: the runs printed no table rows")
    print(f"\n{len(trees)} trees, {args.rounds} run(s) of each in turn: decode, then prompt tok/s (this tree's best "
          f"over each tree's best):")
    for (qtype, backend), got in runs.items():
        print(f"{qtype:5} {backend}")
        for name, _ in trees:
            line = [f"  {name[:40]:40}"]
            for what, col in (("decode", 1), ("prompt", 0)):
                mine, theirs = ([f[col] for f in got[k]] for k in (this, name))
                ratio = f" ({max(mine) / max(theirs):.3f}x)" if mine and theirs and name != this else ""
                line.append(f"{what} {' / '.join(map(str, theirs)) or '-'}{ratio}")
            print("  ".join(line), flush=True)
    if llama:
        print("\n" + "\n".join(llama) + "\n(spmd: this tree's last run)")


def exported(rev, folder):
    """The tree to measure for --against's REV: folder REV where it holds one (a device's copy of the checkout may
    travel without .git), else git revision REV's spmd, kernels and scripts, exported into `folder`."""
    if (Path(rev) / "scripts" / "bench_vulkan.py").is_file():
        return Path(rev).resolve()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "spmd", "kernels", "scripts"],
                             capture_output=True)
    if archive.returncode:
        sys.exit(f"--against {rev}: {archive.stderr.decode().strip() or 'git archive failed'}")
    folder.mkdir()
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return folder


def compare_llama_cpp(args, rows):
    """llama-bench (CUDA) on each Vulkan row's file, and spmd's ratio."""
    print(f"\nllama.cpp CUDA ({args.llama_bench}: -ngl 99 -fa 1, pp{args.prompt}, tg{args.steps} at depth "
          f"{args.prompt}) on the same files, and spmd's ratio:")
    done = {}  # path -> llama.cpp's figures (once a file, whatever spmd's rows on it)
    for r in rows:
        if r["backend"].startswith("vulkan"):
            if r["path"] not in done:
                done[r["path"]] = llama(args.llama_bench, r["path"], "none", args.prompt, args.steps, depth=args.prompt)
            got = done[r["path"]]
            if got is None:
                print(f"{r['qtype']:5} llama-bench failed")
                continue
            print(f"{r['qtype']:5} {r['activations']:4} prompt {got[0]:9.1f} tok/s "
                  f"(spmd {r['prompt_tps'] / got[0]:.2f}x), decode "
                  f"{got[1]:7.1f} tok/s (spmd {r['decode_tps'] / got[1]:.2f}x)", flush=True)


def best(a, b):
    """The faster of two measurements of the same model (a shared machine's load, or a GPU's clock, only ever slows
    one down): the one with the faster decode, with the faster prompt of the two."""
    if b is None:
        return a
    kept = a if a["decode_tps"] >= b["decode_tps"] else b
    prompt = a if a["prompt_tps"] >= b["prompt_tps"] else b
    return {**kept, "prompt_tps": prompt["prompt_tps"], "prompt_host_ms": prompt["prompt_host_ms"]}


def bench_type(args, qtype, path, activations):
    """Rows for one weight type: Vulkan, and the cpu backend on the same file when comparing (both models loaded,
    measured in turns), both with `activations`: the best of `rounds` measurements each."""
    max_seq = args.prompt + args.steps + 1
    backend, model, load_s = build(path, "vulkan", args.device, max_seq, args.kv_cache, activations)
    dev = backend.dev
    peak = peak_for(dev.name, args.peak_tbs)
    run_cpu = dev.is_cpu if args.cpu is None else args.cpu
    cpu = build(path, "cpu", None, max_seq, args.kv_cache, activations) if run_cpu else None
    model.profile = args.profile
    r = c = None
    for _ in range(args.rounds):
        r = best(measure(model, args.prompt, args.steps), r)
        if args.profile:
            show_profile(model.last_profile)
        if run_cpu:
            c = best(measure(cpu[1], args.prompt, args.steps), c)
    nbytes = model.w.nbytes
    r.update(qtype=qtype, backend=backend.description, activations=activations, load_s=load_s,
             weights_mb=nbytes / 1e6, path=path,
             gbs_gpu=None if r["gpu_ms"] is None else nbytes / r["gpu_ms"] / 1e6,
             gbs_wall=nbytes / r["ms_per_token"] / 1e6)
    r["roofline_gpu"] = None if peak is None or r["gbs_gpu"] is None else r["gbs_gpu"] / (peak * 1e3)
    r["roofline_wall"] = None if peak is None else r["gbs_wall"] / (peak * 1e3)
    model.close()
    print_row(r, peak)
    if not run_cpu:
        return [r]
    c.update(qtype=qtype, backend=cpu[0].description, activations=activations, load_s=cpu[2],
             weights_mb=cpu[1].w.nbytes / 1e6,
             gbs_wall=cpu[1].w.nbytes / c["ms_per_token"] / 1e6)
    print(f"{qtype}: {backend.description} / {cpu[0].description}: decode {r['decode_tps'] / c['decode_tps']:.2f}x, "
          f"prompt {r['prompt_tps'] / c['prompt_tps']:.2f}x (the ratio of tokens/s, same file, same run)", flush=True)
    return [r, c]


def show_profile(profile, what="the last decode token"):
    """GPU time of one pass by step (timestamps after each barrier)."""
    total, count = {}, {}
    for label, seconds in profile:
        total[label] = total.get(label, 0.0) + seconds
        count[label] = count.get(label, 0) + 1
    whole = sum(total.values())
    print(f"  GPU time of {what} by step: " + ", ".join(
        f"{k} {1e3 * v:.3f} ms ({count[k]}x, {1e6 * v / count[k]:.1f} us each)" for k, v in total.items())
        + f"; total {1e3 * whole:.3f} ms", flush=True)


def shown(value, spec):
    """A figure as the tables print it; '-' where there is none (no timestamps, no known peak)."""
    return "-" if value is None else format(value, spec)


def print_row(r, peak):
    how = f"chained on the device, {r['chain']} a wait; a step a token {r['step_tps']:.1f} tok/s" if r["chained"] \
        else "a step a token"
    outside = r["outside_ms"]  # (chained, the GPU works on the next tokens while the host waits: it can be < 0)
    outside = "-" if outside is None else "overlapped" if outside < 0 else f"{outside:.3f} ms"
    print(f"{r['qtype']} {r['backend']}: prompt {r['prompt_tps']:.1f} tok/s ({r['prompt_host_ms']:.2f} ms of it "
          f"the host's besides waiting for the GPU: embedding, recording, submits), decode {r['decode_tps']:.1f} tok/s "
          f"({how}; {r['ms_per_token']:.3f} ms/token; GPU {shown(r['gpu_ms'], '.3f')} ms, outside {outside}), "
          f"{r['weights_mb']:.0f} MB/token, {r['gbs_wall']:.1f} GB/s wall, GPU {shown(r['gbs_gpu'], '.1f')} GB/s, "
          f"peak {shown(peak, '.2f')} TB/s, roofline (GPU time) {shown(r['roofline_gpu'], '.0%')}, (wall) "
          f"{shown(r['roofline_wall'], '.0%')}, load {r['load_s']:.1f}s", flush=True)


if __name__ == "__main__":
    main()

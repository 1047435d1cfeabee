"""What the Vulkan driver made of kernels: registers a thread, binary size, shared memory, as the driver reports
them (VK_KHR_pipeline_executable_properties: NVIDIA's driver does, lavapipe does not).

    python scripts/vk_kernel_stats.py                                   # the decode's products, Q4_0 and Q8_0
    python scripts/vk_kernel_stats.py matvec_q4_0_f32:64,1,1,4 attention_f32:256,128,8,1,8

A kernel is kernels/NAME.spv, with its specialisation constants 0, 1, 2, ... after a colon, as spmd/backends gives
them (matvec: threads, pair, blocks a row loaded at once, rows a workgroup; attention: threads, head size, key
splits, pairs a thread, values loaded at once). The device is set up as a run's is (the integer dot products and
matrix units where it has them). Registers bound how many workgroups an SM keeps (NVIDIA: 65536 registers an SM).
On an H100 (2026-12-06, read by this script's first form) the Q4_0 decode product took 60 registers at 4 rows, 80 at
8 and 92 paired (gate and up); with 8-bit activations 40, 64 and 56.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spmd.backends import vk_runtime  # noqa: E402
from spmd.backends.vk_runtime import KERNELS, Device, _text  # noqa: E402
from spmd.errors import UserError  # noqa: E402

DEFAULT = ("matvec_q4_0_f32:64,0,1,4", "matvec_q4_0_f32:64,0,1,8", "matvec_q4_0_f32:64,1,1,4",
           "matvec_q4_0_i8:64,0,1,4", "matvec_q4_0_i8:64,0,1,8", "matvec_q4_0_i8:64,1,1,4",
           "matvec_q8_0_f32:64,0,1,4", "matvec_q8_0_f32:64,1,1,4")
BINDINGS, PUSH_BYTES = 16, 128  # at least every kernel's (a layout may declare more than a kernel uses)


def parse(arg):
    name, _, spec = arg.partition(":")
    if not (KERNELS / f"{name}.spv").exists():
        raise UserError(f"{arg}: no kernel {KERNELS / name}.spv")
    try:
        values = tuple(int(v) for v in spec.split(",")) if spec else ()
    except ValueError:
        values = (-1,)
    if not all(0 <= v < 2 ** 32 for v in values):
        raise UserError(f"{arg}: give the specialisation constants as numbers from 0 to 2^32 - 1, e.g. "
                        "matvec_q4_0_f32:64,0,1,4")
    return name, values


def statistics(dev, name, spec):
    """[(statistic, value)] of kernel `name` at `spec`, from each of the driver's executables of its pipeline."""
    vk, device = vk_runtime.vk, dev.device
    pipeline = dev.pipeline(name, BINDINGS, PUSH_BYTES, spec).handle
    executables = vk.vkGetDeviceProcAddr(device, "vkGetPipelineExecutablePropertiesKHR")
    stats = vk.vkGetDeviceProcAddr(device, "vkGetPipelineExecutableStatisticsKHR")
    value = {vk.VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_BOOL32_KHR: lambda v: v.b32,
             vk.VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_INT64_KHR: lambda v: v.i64,
             vk.VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_UINT64_KHR: lambda v: v.u64,
             vk.VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_FLOAT64_KHR: lambda v: v.f64}
    return [(_text(s.name), value[s.format](s.value))
            for i, _ in enumerate(executables(device, vk.VkPipelineInfoKHR(pipeline=pipeline)))
            for s in stats(device, vk.VkPipelineExecutableInfoKHR(pipeline=pipeline, executableIndex=i))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kernels", nargs="*", default=DEFAULT, help="NAME[:SPEC,...] (default: the decode's products)")
    ap.add_argument("--device", type=int, default=0, help="Vulkan device index (spmd's order: GPUs first)")
    args = ap.parse_args()
    try:
        kernels = [parse(k) for k in args.kernels]
        dev = Device(args.device, statistics=True)
    except UserError as e:
        sys.exit(str(e))
    try:
        print(f"{dev.name}:")
        for name, spec in kernels:
            found = statistics(dev, name, spec)
            print(f"  {name}:{','.join(map(str, spec))}  " + "; ".join(f"{k} {v}" for k, v in found))
    finally:
        dev.close()


if __name__ == "__main__":
    main()

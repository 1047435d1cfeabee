"""What the Vulkan driver made of kernels: registers a thread, binary size, shared memory, as the driver reports
them (VK_KHR_pipeline_executable_properties: NVIDIA's driver does, lavapipe does not).

    python scripts/vk_kernel_stats.py                                   # the decode's products, Q4_0 and Q8_0
    python scripts/vk_kernel_stats.py matvec_q4_0_f32:64,1,1,4 attention_f32:256,128

A kernel is kernels/NAME.spv, with its specialisation constants 0, 1, 2, ... after a colon (spmd/backends/vulkan.py
gives each kernel's: matvec's are threads, pair, blocks loaded at once, rows a workgroup). Registers bind how many
workgroups an SM keeps (NVIDIA: 65536 a multiprocessor): on an H100 (2026-12-06) the Q4_0 decode product took 60 at
4 rows, 80 at 8, 92 paired (gate and up); its 8-bit-activation form 40, 64 and 56.
"""
import argparse
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spmd.backends import vk_runtime  # noqa: E402
from spmd.backends.vk_runtime import KERNELS, Device, _text  # noqa: E402
from spmd.errors import UserError  # noqa: E402

EXTENSION = "VK_KHR_pipeline_executable_properties"
DEFAULT = ("matvec_q4_0_f32:64,0,1,4", "matvec_q4_0_f32:64,0,1,8", "matvec_q4_0_f32:64,1,1,4",
           "matvec_q4_0_i8:64,0,1,4", "matvec_q8_0_f32:64,0,1,4", "matvec_q8_0_f32:64,1,1,4")
BINDINGS, PUSH_BYTES = 16, 128  # at least every kernel's (a layout may declare more than a kernel uses)


def parse(arg):
    name, _, spec = arg.partition(":")
    if not (KERNELS / f"{name}.spv").exists():
        raise UserError(f"{arg}: no kernel {KERNELS / name}.spv")
    try:
        return name, tuple(int(v) for v in spec.split(",")) if spec else ()
    except ValueError:
        raise UserError(f"{arg}: give the specialisation constants as numbers, e.g. matvec_q4_0_f32:64,0,1,4") \
            from None


def statistics(vk, device, layout, name, spec):
    """[(statistic, value)] of kernel `name` at `spec`, from each of the driver's executables of its pipeline."""
    code = (KERNELS / f"{name}.spv").read_bytes()
    module = vk.vkCreateShaderModule(device, vk.VkShaderModuleCreateInfo(codeSize=len(code), pCode=code), None)
    data = vk.ffi.new("char[]", struct.pack(f"<{len(spec)}I", *spec))
    entries = [vk.VkSpecializationMapEntry(constantID=i, offset=4 * i, size=4) for i in range(len(spec))]
    stage = vk.VkPipelineShaderStageCreateInfo(
        stage=vk.VK_SHADER_STAGE_COMPUTE_BIT, module=module, pName="main",
        pSpecializationInfo=vk.VkSpecializationInfo(mapEntryCount=len(spec), pMapEntries=entries or None,
                                                    dataSize=4 * len(spec), pData=data))
    pipeline = vk.vkCreateComputePipelines(device, vk.VK_NULL_HANDLE, 1, [vk.VkComputePipelineCreateInfo(
        flags=vk.VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR, stage=stage, layout=layout)], None)[0]
    executables = vk.vkGetDeviceProcAddr(device, "vkGetPipelineExecutablePropertiesKHR")
    stats = vk.vkGetDeviceProcAddr(device, "vkGetPipelineExecutableStatisticsKHR")
    out = []
    for i, _ in enumerate(executables(device, vk.VkPipelineInfoKHR(pipeline=pipeline))):
        for s in stats(device, vk.VkPipelineExecutableInfoKHR(pipeline=pipeline, executableIndex=i)):
            value = {vk.VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_BOOL32_KHR: s.value.b32,
                     vk.VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_INT64_KHR: s.value.i64,
                     vk.VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_UINT64_KHR: s.value.u64,
                     vk.VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_FLOAT64_KHR: s.value.f64}[s.format]
            out.append((_text(s.name), value))
    vk.vkDestroyPipeline(device, pipeline, None)
    vk.vkDestroyShaderModule(device, module, None)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kernels", nargs="*", default=DEFAULT, help="NAME[:SPEC,...] (default: the decode's products)")
    ap.add_argument("--device", type=int, default=0, help="Vulkan device index (spmd's order: GPUs first)")
    args = ap.parse_args()
    try:
        kernels = [parse(k) for k in args.kernels]
        dev = Device(args.device)
    except UserError as e:
        sys.exit(str(e))
    vk = vk_runtime.vk  # (the bindings, imported by the Device)
    if EXTENSION not in {_text(e.extensionName) for e in vk.vkEnumerateDeviceExtensionProperties(dev.physical, None)}:
        sys.exit(f"{dev.name} does not report what its driver made of kernels (it lacks {EXTENSION})")
    # a device of its own with the extension on (spmd's Device does not ask for it)
    queue = vk.VkDeviceQueueCreateInfo(queueFamilyIndex=dev.family, queueCount=1, pQueuePriorities=[1.0])
    device = vk.vkCreateDevice(dev.physical, vk.VkDeviceCreateInfo(
        pNext=vk.VkPhysicalDevicePipelineExecutablePropertiesFeaturesKHR(pipelineExecutableInfo=vk.VK_TRUE),
        queueCreateInfoCount=1, pQueueCreateInfos=[queue], enabledExtensionCount=1,
        ppEnabledExtensionNames=[EXTENSION]), None)
    bindings = [vk.VkDescriptorSetLayoutBinding(binding=i, descriptorType=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                                descriptorCount=1, stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT)
                for i in range(BINDINGS)]
    set_layout = vk.vkCreateDescriptorSetLayout(device, vk.VkDescriptorSetLayoutCreateInfo(
        bindingCount=BINDINGS, pBindings=bindings), None)
    layout = vk.vkCreatePipelineLayout(device, vk.VkPipelineLayoutCreateInfo(
        setLayoutCount=1, pSetLayouts=[set_layout], pushConstantRangeCount=1, pPushConstantRanges=[
            vk.VkPushConstantRange(stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT, offset=0, size=PUSH_BYTES)]), None)
    print(f"{dev.name}:")
    for name, spec in kernels:
        found = statistics(vk, device, layout, name, spec)
        print(f"  {name}:{','.join(map(str, spec))}  " + "; ".join(f"{k} {v}" for k, v in found))
    vk.vkDestroyPipelineLayout(device, layout, None)
    vk.vkDestroyDescriptorSetLayout(device, set_layout, None)
    vk.vkDestroyDevice(device, None)
    dev.close()


if __name__ == "__main__":
    main()

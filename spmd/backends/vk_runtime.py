"""The raw Vulkan plumbing of the Vulkan backend: one device, its compute queue and a copy queue (the copy engines'
where it has them: a streamed window's copies, ordered against the compute queue by two timeline semaphores),
buffers, compute pipelines made from `kernels/*.spv` with specialisation constants, and command buffers recorded
once and submitted many times.

Every failure a user can fix (no loader, no device, too little memory, a missing .spv) is a one-line UserError
that names the fix. Nothing here knows about transformers: see `vulkan.py`.
"""
import math
import os
import struct
import time
from pathlib import Path

import numpy as np

from ..errors import UserError


def _kernels_dir() -> Path:
    """spmd/kernels/ in an installed wheel (pyproject.toml maps the top-level kernels/ there); the top-level
    kernels/ in a checkout or an editable install."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "kernels"
    return installed if installed.is_dir() else package.parent / "kernels"


KERNELS = _kernels_dir()
INSTALL = "apt-get install libvulkan1 mesa-vulkan-drivers"
DRIVER_VARIABLES = ("VK_DRIVER_FILES", "VK_ICD_FILENAMES")  # the loader's list of drivers, where a user set one
MIB = 1 << 20


def _import_vulkan():
    try:
        import vulkan
    except OSError:  # the cffi bindings load libvulkan.so.1 at import
        raise UserError(f"the Vulkan loader (libvulkan.so.1) is not installed: {INSTALL} "
                        "(or your GPU vendor's driver)") from None
    except ImportError:
        raise UserError("the Python package 'vulkan' is missing: pip install vulkan") from None
    return vulkan


vk = None  # the bindings, imported by the first Device


def _text(value):
    """A fixed-size char array of a Vulkan struct (a name) as str: the bindings give one or the other."""
    return value if isinstance(value, str) else vk.ffi.string(value).decode()


def _check(result, what):
    if result != 0:
        raise RuntimeError(f"Vulkan: {what} failed ({result})")


class Buffer:
    """A storage buffer with its own memory. `view` is a numpy uint8 view of its mapping when host-visible."""

    def __init__(self, dev, nbytes, where="device", copy_queue=False):
        """where: "device" (weights, activations: device-local, host-visible when the device offers it),
        "host" (the host reads what the GPU wrote: host-cached memory where there is such), "pool" (the host's
        memory, which the GPU's copies read: spmd.stream.DeviceWindow's streamed weights). copy_queue: the device's
        copy queue (`Device.copy_commands`) reads or writes it too."""
        self.dev, self.nbytes = dev, max(int(nbytes), 16)
        usage = (vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT
                 | vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT)
        sharing = dict(sharingMode=vk.VK_SHARING_MODE_EXCLUSIVE)
        if copy_queue and dev.copy_family is not None:  # (used by two queue families, without ownership transfers)
            sharing = dict(sharingMode=vk.VK_SHARING_MODE_CONCURRENT, queueFamilyIndexCount=2,
                           pQueueFamilyIndices=[dev.family, dev.copy_family])
        self.handle = vk.vkCreateBuffer(dev.device, vk.VkBufferCreateInfo(size=self.nbytes, usage=usage, **sharing),
                                        None)
        req = vk.vkGetBufferMemoryRequirements(dev.device, self.handle)
        type_index = dev.memory_type(req.memoryTypeBits, where)
        heap = dev.heap_of[type_index]
        if dev.heap_used[heap] + req.size > dev.heap_size[heap]:
            vk.vkDestroyBuffer(dev.device, self.handle, None)
            dev.out_of_memory(req.size, heap)
        try:
            self.memory = vk.vkAllocateMemory(dev.device, vk.VkMemoryAllocateInfo(
                allocationSize=req.size, memoryTypeIndex=type_index), None)
        except (vk.VkErrorOutOfDeviceMemory, vk.VkErrorOutOfHostMemory):
            vk.vkDestroyBuffer(dev.device, self.handle, None)
            dev.out_of_memory(req.size, heap)
        self.size, self.heap = req.size, heap
        dev.heap_used[heap] += req.size
        vk.vkBindBufferMemory(dev.device, self.handle, self.memory, 0)
        self.key = int(vk.ffi.cast("uintptr_t", self.handle))  # names it in DescriptorSets
        self.view = None
        # whether the host reads it through its caches (host memory, lavapipe's); else each read of a GPU's own
        # memory crosses the bus uncached
        self.cached = bool(dev.type_flags[type_index] & vk.VK_MEMORY_PROPERTY_HOST_CACHED_BIT)
        if dev.type_flags[type_index] & vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT and (where != "device" or dev.direct):
            mapped = vk.vkMapMemory(dev.device, self.memory, 0, self.nbytes, 0)
            self.view = np.frombuffer(mapped, np.uint8)

    def array(self, dtype, shape, offset=0):
        """A numpy view of the mapped memory (host-visible buffers only)."""
        count = math.prod(shape)  # numpy's prod costs 3 us, six times a decode step
        return self.view[offset:offset + count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def write(self, data, offset=0):
        """Copy bytes of `data` in at `offset`: straight into the mapping, or through a staging buffer."""
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if raw.size == 0:
            return
        if self.view is not None:
            self.view[offset:offset + raw.size] = raw
        else:
            self.dev.staged_copy(raw, self, offset)

    def free(self):
        if self.handle is not None:
            self.dev.sets.forget(self)
            if self.view is not None:
                self.view = None
                vk.vkUnmapMemory(self.dev.device, self.memory)
            vk.vkDestroyBuffer(self.dev.device, self.handle, None)
            vk.vkFreeMemory(self.dev.device, self.memory, None)
            self.dev.heap_used[self.heap] -= self.size
            self.handle = None


class Pipeline:
    def __init__(self, dev, kernel, n_bindings, push_bytes, spec):
        path = KERNELS / f"{kernel}.spv"
        if not path.exists():
            raise UserError(f"the Vulkan kernel {path} is missing: bash scripts/build_kernels.sh (needs glslc)")
        code = path.read_bytes()
        self.n_bindings, self.push_bytes = n_bindings, push_bytes
        d = dev.device
        module = vk.vkCreateShaderModule(d, vk.VkShaderModuleCreateInfo(codeSize=len(code), pCode=code), None)
        bindings = [vk.VkDescriptorSetLayoutBinding(binding=i, descriptorType=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                                    descriptorCount=1, stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT)
                    for i in range(n_bindings)]
        self.set_layout = vk.vkCreateDescriptorSetLayout(d, vk.VkDescriptorSetLayoutCreateInfo(
            bindingCount=n_bindings, pBindings=bindings), None)
        self.set_layouts = vk.ffi.new("VkDescriptorSetLayout[1]", [self.set_layout])  # vk_sets allocates with it
        ranges = [vk.VkPushConstantRange(stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT, offset=0, size=push_bytes)]
        self.layout = vk.vkCreatePipelineLayout(d, vk.VkPipelineLayoutCreateInfo(
            setLayoutCount=1, pSetLayouts=[self.set_layout], pushConstantRangeCount=1 if push_bytes else 0,
            pPushConstantRanges=ranges if push_bytes else None), None)
        values = struct.pack(f"<{len(spec)}I", *spec)  # constant_id i = spec[i], all 32-bit
        self._spec_data = vk.ffi.new("char[]", values)
        entries = [vk.VkSpecializationMapEntry(constantID=i, offset=4 * i, size=4) for i in range(len(spec))]
        info = vk.VkSpecializationInfo(mapEntryCount=len(spec), pMapEntries=entries, dataSize=len(values),
                                       pData=self._spec_data)
        stage = vk.VkPipelineShaderStageCreateInfo(stage=vk.VK_SHADER_STAGE_COMPUTE_BIT, module=module,
                                                   pName="main", pSpecializationInfo=info)
        flags = vk.VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR if dev.statistics else 0
        self.handle = vk.vkCreateComputePipelines(d, vk.VK_NULL_HANDLE, 1, [vk.VkComputePipelineCreateInfo(
            flags=flags, stage=stage, layout=self.layout)], None)[0]
        vk.vkDestroyShaderModule(d, module, None)


class Device:
    """One Vulkan physical device, its compute queue and pools. Devices are in a stable order, GPUs first; `index`
    picks one (None: 0); with `wrap`, an index past the last device wraps around (the default per-rank choice, so
    that several ranks on a host with one GPU share it), otherwise it is refused. With `statistics` its pipelines
    keep what the driver made of each kernel (`STATISTICS`, for scripts/vk_kernel_stats.py)."""

    STATISTICS = "VK_KHR_pipeline_executable_properties"

    def __init__(self, index=None, wrap=False, statistics=False):
        global vk
        vk = _import_vulkan()
        app = vk.VkApplicationInfo(pApplicationName="spmd", applicationVersion=0, pEngineName="spmd",
                                   engineVersion=0, apiVersion=vk.VK_MAKE_VERSION(1, 2, 0))
        try:
            self.instance = vk.vkCreateInstance(vk.VkInstanceCreateInfo(pApplicationInfo=app), None)
            physical = vk.vkEnumeratePhysicalDevices(self.instance)
        except (vk.VkErrorIncompatibleDriver, vk.VkErrorInitializationFailed):
            physical = []
        devices = self._ordered(physical)
        if not devices:
            chosen = [f"{name}={os.environ[name]}" for name in DRIVER_VARIABLES if os.environ.get(name)]
            if chosen:
                raise UserError(f"no Vulkan device found: {' and '.join(chosen)} names no driver that works "
                                "here (unset it to let the loader search)")
            raise UserError(f"no Vulkan device found: {INSTALL} for the CPU (lavapipe), or install your GPU "
                            "vendor's Vulkan driver")
        self.count = len(devices)
        index = index or 0
        self.check_index(index, wrap)
        self.index = index % len(devices)  # (wrapped: ranks sharing a GPU have the same)
        self.physical = devices[self.index]
        props = vk.vkGetPhysicalDeviceProperties(self.physical)
        self.name = _text(props.deviceName)
        self.is_cpu = props.deviceType == vk.VK_PHYSICAL_DEVICE_TYPE_CPU
        self.vendor = props.vendorID
        limits = props.limits
        self.max_range = int(limits.maxStorageBufferRange)
        self.offset_align = int(limits.minStorageBufferOffsetAlignment)
        self.max_groups = int(limits.maxComputeWorkGroupCount[0])
        self.timestamp_period = float(limits.timestampPeriod)  # ns per tick
        self.shared_bytes = int(limits.maxComputeSharedMemorySize)
        self.max_threads = int(limits.maxComputeWorkGroupInvocations)
        self._check_subgroups()
        self._memory_types()
        families = vk.vkGetPhysicalDeviceQueueFamilyProperties(self.physical)
        self.family = next(i for i, f in enumerate(families) if f.queueFlags & vk.VK_QUEUE_COMPUTE_BIT)
        self.timestamps = families[self.family].timestampValidBits > 0
        self.timeline = self._timeline(props)
        self.copy_family = self._copy_family(families) if self.timeline else None
        queue_infos = [vk.VkDeviceQueueCreateInfo(queueFamilyIndex=family, queueCount=1, pQueuePriorities=[1.0])
                       for family in (self.family, self.copy_family) if family is not None]
        extensions, features, self.coop_int8 = self._coop_matrix()
        self.coop = bool(extensions)
        self.int_dot = self._integer_dot()
        if self.int_dot:  # (--activations int8's kernels)
            extensions = extensions + [self.INT_DOT]
            features = vk.VkPhysicalDeviceShaderIntegerDotProductFeatures(shaderIntegerDotProduct=vk.VK_TRUE,
                                                                          pNext=features)
        if self.timeline:
            features = vk.VkPhysicalDeviceTimelineSemaphoreFeatures(timelineSemaphore=vk.VK_TRUE, pNext=features)
        self.statistics = statistics
        if statistics:
            if not self._offers(self.STATISTICS):
                raise UserError(f"{self.name} does not report what its driver made of kernels (it lacks "
                                f"{self.STATISTICS})")
            extensions = extensions + [self.STATISTICS]
            features = vk.VkPhysicalDevicePipelineExecutablePropertiesFeaturesKHR(pipelineExecutableInfo=vk.VK_TRUE,
                                                                                  pNext=features)
        self.device = vk.vkCreateDevice(self.physical, vk.VkDeviceCreateInfo(
            pNext=features, queueCreateInfoCount=len(queue_infos), pQueueCreateInfos=queue_infos,
            enabledExtensionCount=len(extensions), ppEnabledExtensionNames=extensions or None), None)
        self.queue = vk.vkGetDeviceQueue(self.device, self.family, 0)
        self.pool = self._command_pool(self.family)
        self.fence = vk.vkCreateFence(self.device, vk.VkFenceCreateInfo(), None)
        # the copy queue (`copy_commands`, `queue_copy`): the copy engines' own where the device has a queue family
        # of them, else the compute queue itself; two timeline semaphores order the two queues' work
        self.copy_queue, self.copy_pool = self.queue, self.pool
        if self.copy_family is not None:
            self.copy_queue = vk.vkGetDeviceQueue(self.device, self.copy_family, 0)
            self.copy_pool = self._command_pool(self.copy_family)
        self.copied = self.computed = None  # timeline semaphores: copies done, compute queue's work done
        self.copied_value = self.computed_value = 0  # the last value queued to signal each
        self.gate = 0  # compute submissions wait until `copied` reaches this (spmd.stream.DeviceWindow.hold)
        if self.timeline:
            self.copied, self.computed = (vk.vkCreateSemaphore(self.device, vk.VkSemaphoreCreateInfo(
                pNext=vk.VkSemaphoreTypeCreateInfo(semaphoreType=vk.VK_SEMAPHORE_TYPE_TIMELINE, initialValue=0)),
                None) for _ in range(2))
        self.spare = []  # command buffers of freed Recordings, begun again by the next ones (the pool resets them)
        self._pipelines = {}
        self.waited_s = 0.0  # seconds the host has waited for the GPU (`Recording.wait`; benchmarks read it)
        self._staging = None
        from .vk_sets import DescriptorSets  # it uses _check, so not at the top
        self.sets = DescriptorSets(self, vk)

    def check_index(self, index, wrap):
        """An index the user gave (not wrapping) must name one of this host's devices."""
        if index >= self.count and not wrap:
            raise UserError(f"--gpu {index}: this host has {self.count} Vulkan device{'s' * (self.count != 1)}, "
                            "numbered from 0")

    @staticmethod
    def _ordered(physical):
        """GPUs first (discrete, integrated, virtual) in enumeration order; CPU devices only if there is no GPU."""
        rank = {vk.VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: 0, vk.VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: 1,
                vk.VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: 2}
        typed = [(rank.get(vk.vkGetPhysicalDeviceProperties(p).deviceType, 3), i, p) for i, p in enumerate(physical)]
        gpus = [t for t in typed if t[0] < 3]
        return [p for _, _, p in sorted(gpus or typed, key=lambda t: (t[0], t[1]))]

    def _check_subgroups(self):
        sub = vk.VkPhysicalDeviceSubgroupProperties()
        vk.vkGetPhysicalDeviceProperties2(self.physical, vk.VkPhysicalDeviceProperties2(pNext=sub))
        self.subgroup_size = int(sub.subgroupSize)
        need = vk.VK_SUBGROUP_FEATURE_BASIC_BIT | vk.VK_SUBGROUP_FEATURE_ARITHMETIC_BIT
        if (sub.supportedOperations & need) != need or not sub.supportedStages & vk.VK_SHADER_STAGE_COMPUTE_BIT:
            raise UserError(f"the Vulkan device {self.name} lacks subgroup arithmetic in compute shaders "
                            "(Vulkan 1.1): use --backend cpu on this machine")
        # quad operations (kernels/attention_block.glsl; without them a prompt attends a row at a time)
        self.quads = bool(sub.supportedOperations & vk.VK_SUBGROUP_FEATURE_QUAD_BIT) and self.subgroup_size >= 4

    def _timeline(self, props):
        """Whether the device has timeline semaphores (Vulkan 1.2), which order the copy queue's work and the
        compute queue's (`queue_copy`); without them a streamed window's halves are copied by the host."""
        if vk.VK_VERSION_MINOR(props.apiVersion) < 2 and vk.VK_VERSION_MAJOR(props.apiVersion) == 1:
            return False
        found = vk.VkPhysicalDeviceTimelineSemaphoreFeatures()
        vk.vkGetPhysicalDeviceFeatures2(self.physical, vk.VkPhysicalDeviceFeatures2(pNext=found))
        return bool(found.timelineSemaphore)

    @staticmethod
    def _copy_family(families):
        """A queue family of transfers only (a GPU's copy engines, which run beside its compute), or None (then the
        copies go on the compute queue); SPMD_VK_COPY_QUEUE=0 declines it."""
        if env_tuple("SPMD_VK_COPY_QUEUE", (1,))[0] == 0:
            return None
        busy = vk.VK_QUEUE_COMPUTE_BIT | vk.VK_QUEUE_GRAPHICS_BIT
        return next((i for i, f in enumerate(families)
                     if f.queueFlags & vk.VK_QUEUE_TRANSFER_BIT and not f.queueFlags & busy and f.queueCount), None)

    def _command_pool(self, family):
        return vk.vkCreateCommandPool(self.device, vk.VkCommandPoolCreateInfo(
            flags=vk.VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT, queueFamilyIndex=family), None)

    def _offers(self, *extensions):
        """Whether the physical device offers every one of these device extensions."""
        have = {_text(e.extensionName) for e in vk.vkEnumerateDeviceExtensionProperties(self.physical, None)}
        return all(e in have for e in extensions)

    INT_DOT = "VK_KHR_shader_integer_dot_product"

    def _integer_dot(self):
        """Whether the device has packed 4 x 8-bit integer dot products in shaders (--activations int8's kernels,
        kernels/int8.glsl: Vulkan 1.3 drivers have them, lavapipe's emulated)."""
        if not self._offers(self.INT_DOT):
            return False
        found = vk.VkPhysicalDeviceShaderIntegerDotProductFeatures()
        vk.vkGetPhysicalDeviceFeatures2(self.physical, vk.VkPhysicalDeviceFeatures2(pNext=found))
        return bool(found.shaderIntegerDotProduct)

    COOP_EXTENSIONS = ("VK_NV_cooperative_matrix", "VK_KHR_shader_float16_int8", "VK_KHR_vulkan_memory_model")

    def _coop_matrix(self):
        """(extensions, features to enable, int8) for the prompt's products on the matrix units (kernels/coopmat_*):
        GL_NV_cooperative_matrix with fp16 16x8x16 products summed in float32 by a subgroup of 32 (the kernels'
        4 subgroups of a workgroup of 128, or 8 of 256 where they split a step's blocks: KSPLIT), fp16 arithmetic
        and the Vulkan memory model; ([], None, False) where the device lacks any of it, or SPMD_VK_COOP=0. int8:
        the device also has 8-bit 16x8x32 products summed in int32 and 8-bit shader arithmetic (coopmat_*_i8, with
        --activations int8, which itself needs the integer dot products of matvec_*_i8: VulkanBackend refuses it
        without them)."""
        if self.is_cpu or env_tuple("SPMD_VK_COOP", (1,))[0] == 0 or self.subgroup_size != 32 \
                or self.max_threads < 256:
            return [], None, False
        if not self._offers(*self.COOP_EXTENSIONS):
            return [], None, False
        memory = vk.VkPhysicalDeviceVulkanMemoryModelFeatures()
        half = vk.VkPhysicalDeviceShaderFloat16Int8Features(pNext=memory)
        coop = vk.VkPhysicalDeviceCooperativeMatrixFeaturesNV(pNext=half)
        vk.vkGetPhysicalDeviceFeatures2(self.physical, vk.VkPhysicalDeviceFeatures2(pNext=coop))
        if not (coop.cooperativeMatrix and half.shaderFloat16 and memory.vulkanMemoryModel):
            return [], None, False
        shapes = vk.vkGetInstanceProcAddr(self.instance, "vkGetPhysicalDeviceCooperativeMatrixPropertiesNV")
        f16, f32 = vk.VK_COMPONENT_TYPE_FLOAT16_KHR, vk.VK_COMPONENT_TYPE_FLOAT32_KHR  # the NV names alias these
        s8, s32 = vk.VK_COMPONENT_TYPE_SINT8_KHR, vk.VK_COMPONENT_TYPE_SINT32_KHR
        offered = {(m.MSize, m.NSize, m.KSize, m.AType, m.BType, m.CType, m.DType, m.scope)
                   for m in shapes(self.physical)}
        if (16, 8, 16, f16, f16, f32, f32, vk.VK_SCOPE_SUBGROUP_KHR) not in offered:
            return [], None, False
        int8 = bool(half.shaderInt8) and (16, 8, 32, s8, s8, s32, s32, vk.VK_SCOPE_SUBGROUP_KHR) in offered
        enable = vk.VkPhysicalDeviceCooperativeMatrixFeaturesNV(cooperativeMatrix=vk.VK_TRUE, pNext=(
            vk.VkPhysicalDeviceShaderFloat16Int8Features(shaderFloat16=vk.VK_TRUE, shaderInt8=int8, pNext=(
                vk.VkPhysicalDeviceVulkanMemoryModelFeatures(vulkanMemoryModel=vk.VK_TRUE)))))
        return list(self.COOP_EXTENSIONS), enable, int8

    def _memory_types(self):
        mem = vk.vkGetPhysicalDeviceMemoryProperties(self.physical)
        self.type_flags = [mem.memoryTypes[i].propertyFlags for i in range(mem.memoryTypeCount)]
        self.heap_of = [mem.memoryTypes[i].heapIndex for i in range(mem.memoryTypeCount)]
        self.heap_size = [int(mem.memoryHeaps[i].size) for i in range(mem.memoryHeapCount)]
        self.heap_used = [0] * mem.memoryHeapCount
        dl, hv = vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT
        local = [i for i, f in enumerate(self.type_flags) if f & dl]
        biggest = max((self.heap_size[self.heap_of[i]] for i in local), default=0)
        # the device's own memory: its largest device-local heap (a host's RAM may be larger than a GPU's)
        self.main_heap = max((self.heap_of[i] for i in local), key=lambda h: self.heap_size[h], default=0)
        # device memory the host can write straight into (resizable BAR, unified memory, lavapipe), when its heap
        # is the device's main one; else device-local memory filled through a staging buffer
        mapped = [i for i in local if self.type_flags[i] & hv and self.heap_size[self.heap_of[i]] >= biggest / 2]
        self.direct = bool(mapped)

    def memory_type(self, bits, where):
        dl, hv = vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT
        hc, cached = vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT, vk.VK_MEMORY_PROPERTY_HOST_CACHED_BIT
        if where == "pool":  # host-visible and not the device's own memory, where there is such
            for i, f in enumerate(self.type_flags):
                if bits & (1 << i) and f & (hv | hc) == hv | hc and not f & dl:
                    return i
        if where == "device":
            wants = [dl | hv, dl] if self.direct else [dl, dl | hv]
        elif where == "host":
            wants = [hv | hc | cached, hv | hc]
        else:  # "staging", "pool"
            wants = [hv | hc]
        for want in wants:
            for i, f in enumerate(self.type_flags):
                if bits & (1 << i) and f & want == want:
                    if where == "device" and want == dl and not self.direct and f & hv:
                        continue  # a small host-visible window of device memory: keep it for the host
                    return i
        for i in range(len(self.type_flags)):
            if bits & (1 << i):
                return i
        raise RuntimeError("Vulkan: no memory type for a buffer")

    def out_of_memory(self, nbytes, heap):
        free = (self.heap_size[heap] - self.heap_used[heap]) / MIB
        raise UserError(f"the weights need {(self.heap_used[heap] + nbytes) / MIB:.0f} MiB or more of device "
                        f"memory on {self.name}, which has {free:.0f} MiB free of {self.heap_size[heap] / MIB:.0f}; "
                        "lower this rank's ratio (--ratios)")

    def staged_copy(self, raw, dst, offset):
        """Bytes into a buffer the host cannot map: through a host-visible staging buffer, in pieces."""
        piece = 64 * MIB
        if self._staging is None:
            self._staging = Buffer(self, piece, "staging")
        for start in range(0, raw.size, piece):
            part = raw[start:start + piece]
            self._staging.view[:part.size] = part
            rec = Recording(self)
            region = vk.VkBufferCopy(srcOffset=0, dstOffset=offset + start, size=part.size)
            vk.vkCmdCopyBuffer(rec.cmd, self._staging.handle, dst.handle, 1, [region])
            rec.end()
            rec.run()
            rec.free()

    def zero(self, buffers):
        """Fill buffers with zeros (activation padding must read as zero)."""
        rec = Recording(self)
        for b in buffers:
            vk.vkCmdFillBuffer(rec.cmd, b.handle, 0, b.nbytes // 4 * 4, 0)
        rec.barrier(after_copy=True)
        rec.end()
        rec.run()
        rec.free()

    def read(self, buf, offset, nbytes):
        """Bytes of a buffer as a fresh uint8 array: from its mapping where the host reads it through its caches,
        else through a host buffer (a GPU's memory read over PCIe uncached is slow)."""
        if buf.view is not None and buf.cached:
            return buf.view[offset:offset + nbytes].copy()
        host = Buffer(self, nbytes, "host")
        rec = Recording(self)
        try:
            self.copy(rec, buf, host, nbytes, src_offset=offset)
            rec.barrier(to_host=True)
            rec.end()
            rec.run()
            return host.view[:nbytes].copy()
        finally:
            rec.free()
            host.free()

    def copy(self, rec, src, dst, nbytes, src_offset=0, dst_offset=0):
        """Record a copy of nbytes of src (from src_offset) into dst (at dst_offset)."""
        region = vk.VkBufferCopy(srcOffset=src_offset, dstOffset=dst_offset, size=nbytes)
        vk.vkCmdCopyBuffer(rec.cmd, src.handle, dst.handle, 1, [region])

    def copy_commands(self, src, dst, nbytes, src_offset=0, dst_offset=0):
        """A command buffer for the copy queue (`queue_copy`) of one copy, after the copies queued before it on that
        queue (which may write the same bytes); `free_copy` frees it."""
        cmd = vk.vkAllocateCommandBuffers(self.device, vk.VkCommandBufferAllocateInfo(
            commandPool=self.copy_pool, level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY, commandBufferCount=1))[0]
        vk.vkBeginCommandBuffer(cmd, vk.VkCommandBufferBeginInfo(
            flags=vk.VK_COMMAND_BUFFER_USAGE_SIMULTANEOUS_USE_BIT))
        transfer = vk.VK_PIPELINE_STAGE_TRANSFER_BIT
        vk.vkCmdPipelineBarrier(cmd, transfer, transfer, 0, 1, [vk.VkMemoryBarrier(
            srcAccessMask=vk.VK_ACCESS_TRANSFER_WRITE_BIT, dstAccessMask=vk.VK_ACCESS_TRANSFER_WRITE_BIT)], 0, None,
            0, None)
        vk.vkCmdCopyBuffer(cmd, src.handle, dst.handle, 1, [vk.VkBufferCopy(
            srcOffset=src_offset, dstOffset=dst_offset, size=nbytes)])
        vk.vkEndCommandBuffer(cmd)
        return cmd

    def free_copy(self, cmd):
        vk.vkFreeCommandBuffers(self.device, self.copy_pool, 1, [cmd])

    def queue_copy(self, cmd, after):
        """Queue a `copy_commands` buffer on the copy queue, to start once `computed` reaches `after` (the compute
        queue's work that reads what it overwrites is done) -> the value `copied` reaches when it is done."""
        self.copied_value += 1
        self._queue(self.copy_queue, cmd, (self.computed, after, vk.VK_PIPELINE_STAGE_TRANSFER_BIT),
                    (self.copied, self.copied_value))
        return self.copied_value

    def signal_computed(self):
        """-> the value `computed` reaches once everything queued on the compute queue so far is done (an empty
        submission that signals it)."""
        self.computed_value += 1
        self._queue(self.queue, None, None, (self.computed, self.computed_value))
        return self.computed_value

    def _queue(self, queue, cmd, wait, signal, fence=None):
        """vkQueueSubmit of one command buffer (or none) with a timeline semaphore's wait (semaphore, value, stage)
        and signal (semaphore, value), either None."""
        ffi = vk.ffi
        timeline = {"sType": vk.VK_STRUCTURE_TYPE_TIMELINE_SEMAPHORE_SUBMIT_INFO}
        info = {"sType": vk.VK_STRUCTURE_TYPE_SUBMIT_INFO}
        keep = []  # (cffi's arrays live while they are referenced)
        if cmd is not None:
            keep.append(ffi.new("VkCommandBuffer[1]", [cmd]))
            info.update(commandBufferCount=1, pCommandBuffers=keep[-1])
        if wait is not None:
            keep += [ffi.new("VkSemaphore[1]", [wait[0]]), ffi.new("uint64_t[1]", [wait[1]]),
                     ffi.new("VkPipelineStageFlags[1]", [wait[2]])]
            info.update(waitSemaphoreCount=1, pWaitSemaphores=keep[-3], pWaitDstStageMask=keep[-1])
            timeline.update(waitSemaphoreValueCount=1, pWaitSemaphoreValues=keep[-2])
        if signal is not None:
            keep += [ffi.new("VkSemaphore[1]", [signal[0]]), ffi.new("uint64_t[1]", [signal[1]])]
            info.update(signalSemaphoreCount=1, pSignalSemaphores=keep[-2])
            timeline.update(signalSemaphoreValueCount=1, pSignalSemaphoreValues=keep[-1])
        keep.append(ffi.new("VkTimelineSemaphoreSubmitInfo*", timeline))
        info["pNext"] = keep[-1]
        _check(vk.lib.vkQueueSubmit(queue, 1, ffi.new("VkSubmitInfo*", info), fence or ffi.NULL), "vkQueueSubmit")

    def pipeline(self, kernel, n_bindings, push_bytes, spec=()):
        key = (kernel, n_bindings, push_bytes, tuple(spec))
        if key not in self._pipelines:
            self._pipelines[key] = Pipeline(self, kernel, n_bindings, push_bytes, spec)
        return self._pipelines[key]

    def idle(self):
        """Until the device has done everything queued; then the fence is reset (a wait cut short left it to be
        signalled)."""
        vk.vkDeviceWaitIdle(self.device)
        vk.vkResetFences(self.device, 1, [self.fence])

    def close(self):
        self.idle()
        if self._staging is not None:
            self._staging.free()
        self.sets.close()
        for p in self._pipelines.values():
            vk.vkDestroyPipeline(self.device, p.handle, None)
            vk.vkDestroyPipelineLayout(self.device, p.layout, None)
            vk.vkDestroyDescriptorSetLayout(self.device, p.set_layout, None)
        vk.vkDestroyFence(self.device, self.fence, None)
        for semaphore in (self.copied, self.computed):
            if semaphore is not None:
                vk.vkDestroySemaphore(self.device, semaphore, None)
        if self.copy_pool != self.pool:
            vk.vkDestroyCommandPool(self.device, self.copy_pool, None)
        vk.vkDestroyCommandPool(self.device, self.pool, None)
        vk.vkDestroyDevice(self.device, None)
        vk.vkDestroyInstance(self.instance, None)


_BARRIERS = {}  # "compute" / "after copy" / "host" / "copy" -> (source stage, destination stage, VkMemoryBarrier*):
# `Recording.barrier`
_BEGIN = {}  # queued_again -> VkCommandBufferBeginInfo*


class Recording:
    """One command buffer: dispatches (their sets from the device's vk_sets.DescriptorSets), barriers between
    dependent ones, optional timestamps around the whole. Record once, `run()` (submit and wait) as often as
    needed."""

    def __init__(self, dev, timestamps=False, profile=False, queued_again=False):
        """timestamps: time the whole buffer on the GPU (gpu_seconds: its last run); profile: also after every
        `mark(label)`. queued_again: the buffer may be submitted again before its last submission is done (a chained
        decode's steps)."""
        self.dev = dev
        if dev.spare:
            self.cmd = dev.spare.pop()
        else:
            self.cmd = vk.vkAllocateCommandBuffers(dev.device, vk.VkCommandBufferAllocateInfo(
                commandPool=dev.pool, level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY, commandBufferCount=1))[0]
        if queued_again not in _BEGIN:  # (the C function straight, its struct made once, as `barrier`'s)
            _BEGIN[queued_again] = vk.ffi.new("VkCommandBufferBeginInfo*", {
                "sType": vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                "flags": vk.VK_COMMAND_BUFFER_USAGE_SIMULTANEOUS_USE_BIT if queued_again else 0})
        _check(vk.lib.vkBeginCommandBuffer(self.cmd, _BEGIN[queued_again]), "vkBeginCommandBuffer")
        self.query_pool, self.labels, self._profile = None, [], profile
        if (timestamps or profile) and dev.timestamps:
            self._capacity = 4096 if profile else 2
            self.query_pool = vk.vkCreateQueryPool(dev.device, vk.VkQueryPoolCreateInfo(
                queryType=vk.VK_QUERY_TYPE_TIMESTAMP, queryCount=self._capacity), None)
            vk.vkCmdResetQueryPool(self.cmd, self.query_pool, 0, self._capacity)
            self._stamp("start", vk.VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT)
        self._submit, self._bound = None, None  # _bound: the pipeline the last dispatch bound

    def _stamp(self, label, stage):
        vk.vkCmdWriteTimestamp(self.cmd, stage, self.query_pool, len(self.labels))
        self.labels.append(label)

    def mark(self, label):
        """Profiling: the GPU time from the previous mark to here is booked to `label`."""
        if self._profile and self.query_pool is not None and len(self.labels) < self._capacity - 1:
            self._stamp(label, vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT)

    def dispatch(self, pipeline, buffers, push, groups):
        """buffers: one (Buffer, byte offset, byte range) per binding; push: bytes; groups: (x, y, z). The C
        functions straight: the bindings' Python wrappers cost tens of microseconds a dispatch."""
        assert len(buffers) == pipeline.n_bindings and len(push) == pipeline.push_bytes
        lib = vk.lib
        dset = self.dev.sets.get(pipeline, buffers)
        if pipeline is not self._bound:  # (a run of one kernel, as a prompt's norms and products, binds it once)
            lib.vkCmdBindPipeline(self.cmd, vk.VK_PIPELINE_BIND_POINT_COMPUTE, pipeline.handle)
            self._bound = pipeline
        lib.vkCmdBindDescriptorSets(self.cmd, vk.VK_PIPELINE_BIND_POINT_COMPUTE, pipeline.layout, 0, 1, dset, 0,
                                    vk.ffi.NULL)
        if push:
            lib.vkCmdPushConstants(self.cmd, pipeline.layout, vk.VK_SHADER_STAGE_COMPUTE_BIT, 0, len(push), push)
        lib.vkCmdDispatch(self.cmd, *groups)

    def barrier(self, to_host=False, to_copy=False, after_copy=False):
        """Writes of the dispatches before are visible to those after (to the host with to_host, to a buffer copy
        with to_copy); a plain barrier orders dispatches after dispatches only: after_copy also orders them after
        the copies and fills before it in the queue (a fill, an input's copy in, a staging buffer's copy). The C
        function straight, its barrier struct made once (`_BARRIERS`): the bindings' wrappers took about a third of
        the time of recording a prompt's pass."""
        kind = "copy" if to_copy else "host" if to_host else "after copy" if after_copy else "compute"
        if kind not in _BARRIERS:
            shader = (vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, vk.VK_ACCESS_SHADER_WRITE_BIT)
            both = (shader[0] | vk.VK_PIPELINE_STAGE_TRANSFER_BIT, shader[1] | vk.VK_ACCESS_TRANSFER_WRITE_BIT)
            reads = (vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT,
                     vk.VK_ACCESS_SHADER_READ_BIT | vk.VK_ACCESS_SHADER_WRITE_BIT)
            (src_stage, src_access), (dst_stage, dst_access) = {
                "copy": (both, (vk.VK_PIPELINE_STAGE_TRANSFER_BIT,
                                vk.VK_ACCESS_TRANSFER_READ_BIT | vk.VK_ACCESS_TRANSFER_WRITE_BIT)),
                "host": (both, (vk.VK_PIPELINE_STAGE_HOST_BIT, vk.VK_ACCESS_HOST_READ_BIT)),
                "after copy": (both, reads),
                "compute": (shader, reads)}[kind]
            mb = vk.ffi.new("VkMemoryBarrier*", {
                "sType": vk.VK_STRUCTURE_TYPE_MEMORY_BARRIER, "dstAccessMask": dst_access,
                "srcAccessMask": src_access})
            _BARRIERS[kind] = (src_stage, dst_stage, mb)
        src_stage, dst_stage, mb = _BARRIERS[kind]
        vk.lib.vkCmdPipelineBarrier(self.cmd, src_stage, dst_stage, 0, 1, mb, 0, vk.ffi.NULL, 0, vk.ffi.NULL)

    def end(self):
        if self.query_pool is not None:
            self._stamp("end", vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT)
        _check(vk.lib.vkEndCommandBuffer(self.cmd), "vkEndCommandBuffer")
        cmds = vk.ffi.new("VkCommandBuffer[1]", [self.cmd])
        info = {"sType": vk.VK_STRUCTURE_TYPE_SUBMIT_INFO, "commandBufferCount": 1, "pCommandBuffers": cmds}
        self._submit = (vk.ffi.new("VkSubmitInfo*", info), cmds)
        self._fences = vk.ffi.new("VkFence[1]", [self.dev.fence])

    def run(self):
        """Submit and wait (the hot path: the C functions straight, no per-call struct building)."""
        self.submit()
        self.wait()

    def submit(self, fence=True):
        """Queue the buffer behind those queued before it; with `fence`, the device's fence signals when it and
        everything queued before it are done (then `wait`). Without: a prompt's parts but the last, queued while the
        host records the rest, or a one-rank pass's command buffers where weights stream (each ends with a barrier
        that orders its dispatches before the dispatches queued after it). While the device's `gate` is set (a
        streamed half held, spmd.stream.DeviceWindow.hold), the buffer's dispatches wait for the copy queue's
        `copied` to reach it: the half's copy into its slot."""
        dev = self.dev
        if dev.gate:  # (a streamed half's: its products wait for its copy into its slot)
            dev._queue(dev.queue, self.cmd, (dev.copied, dev.gate, vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT), None,
                       dev.fence if fence else None)
            return
        _check(vk.lib.vkQueueSubmit(dev.queue, 1, self._submit[0], dev.fence if fence else vk.ffi.NULL),
               "vkQueueSubmit")

    def wait(self):
        """Until the buffer submitted with the fence is done."""
        dev, lib, t = self.dev, vk.lib, time.perf_counter()
        if dev.is_cpu:  # lavapipe: the CPU's cores do the work, so sleep in the driver
            _check(lib.vkWaitForFences(dev.device, 1, self._fences, 1, 3_600_000_000_000), "vkWaitForFences")
        else:  # a GPU: poll, which answers sooner than the driver's sleeping wait (tens of microseconds a token)
            while True:
                status = lib.vkGetFenceStatus(dev.device, dev.fence)
                if status == 0:
                    break
                if status != vk.VK_NOT_READY:
                    _check(status, "vkGetFenceStatus")
        _check(lib.vkResetFences(dev.device, 1, self._fences), "vkResetFences")
        dev.waited_s += time.perf_counter() - t

    def _times(self):
        n = len(self.labels)
        if getattr(self, "_query_data", None) is None or len(self._query_data) != n:
            self._query_data = vk.ffi.new("uint64_t[]", n)  # cffi parses a type string slowly: once
        _check(vk.lib.vkGetQueryPoolResults(self.dev.device, self.query_pool, 0, n, 8 * n, self._query_data, 8,
                                            vk.VK_QUERY_RESULT_64_BIT | vk.VK_QUERY_RESULT_WAIT_BIT),
               "vkGetQueryPoolResults")
        return self._query_data

    def gpu_seconds(self):
        """GPU time from the start of the buffer to its end in the last run (None without timestamps)."""
        if self.query_pool is None:
            return None
        t = self._times()
        return (t[len(self.labels) - 1] - t[0]) * self.dev.timestamp_period * 1e-9

    def profile(self):
        """[(label, seconds)] between consecutive marks of the last run."""
        if self.query_pool is None:
            return []
        t = [v * self.dev.timestamp_period * 1e-9 for v in self._times()]
        return [(label, b - a) for label, a, b in zip(self.labels[1:], t, t[1:])]

    def free(self):
        d = self.dev.device
        if self.cmd is not None:  # (every run of it is done: the next Recording begins it again)
            if self._submit is None:  # (recording stopped before its end: begun again, it must not be recording)
                _check(vk.lib.vkResetCommandBuffer(self.cmd, 0), "vkResetCommandBuffer")
            self.dev.spare.append(self.cmd)
            self.cmd = None
        if self.query_pool is not None:
            vk.vkDestroyQueryPool(d, self.query_pool, None)
            self.query_pool = None


def env_tuple(name, default):
    """Tuning knobs from the environment, e.g. SPMD_VK_MATVEC=64,4 (threads per workgroup, rows per workgroup)."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise UserError(f"{name}={value}: expected whole numbers, comma-separated (or leave it unset)") from None

"""The descriptor sets of a Vulkan device's dispatches (`vk_runtime.Device.sets`), one per (pipeline, bindings),
kept across recordings: a prompt pass records its hundreds of dispatches again over the same buffers, and writing
their sets was most of that (H200 host: 6.5 ms of a 128-token prompt's 30). A set goes when a buffer it binds is
freed (`forget`, from `Buffer.free`); every recording that used it has run by then (runs wait for the GPU)."""
from dataclasses import dataclass

from .vk_runtime import _check

OUT_OF_POOL_MEMORY, FRAGMENTED_POOL = -1000069000, -12  # VkResult: this pool cannot give another set
PER_POOL = 256  # sets a pool holds
PER_SET = 16  # bindings a set may have (a pool holds PER_SET * PER_POOL descriptors)


@dataclass
class Pool:
    handle: object
    left: int = PER_POOL  # sets it can still give, as far as we know


@dataclass
class Entry:
    dset: object  # VkDescriptorSet[1]
    pool: Pool


class DescriptorSets:
    def __init__(self, dev, vk):
        self.dev, self.vk = dev, vk
        self.sets = {}  # (Pipeline, (Buffer, offset, range)...) -> Entry
        self.by_buffer = {}  # Buffer.key -> {set key}
        self.pools = []

    def get(self, pipeline, buffers):
        """The set binding `buffers` ((Buffer, byte offset, byte range) each) for `pipeline`, as VkDescriptorSet[1]."""
        key = (pipeline, *buffers)  # (hashed and compared in C: Buffers by identity)
        entry = self.sets.get(key)
        if entry is None:
            assert len(buffers) <= PER_SET
            entry = self.sets[key] = self._allocate(pipeline)
            self._write(entry.dset, buffers)
            for b, _, _ in buffers:
                self.by_buffer.setdefault(b.key, set()).add(key)
        return entry.dset

    def _allocate(self, pipeline):
        vk, ffi = self.vk, self.vk.ffi
        dset = ffi.new("VkDescriptorSet[1]")
        for pool in [p for p in self.pools if p.left > 0] + [None]:
            if pool is None:  # every pool is full: a new one
                size = vk.VkDescriptorPoolSize(type=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                               descriptorCount=PER_SET * PER_POOL)
                pool = Pool(vk.vkCreateDescriptorPool(self.dev.device, vk.VkDescriptorPoolCreateInfo(
                    flags=vk.VK_DESCRIPTOR_POOL_CREATE_FREE_DESCRIPTOR_SET_BIT, maxSets=PER_POOL, poolSizeCount=1,
                    pPoolSizes=[size]), None))
                self.pools.append(pool)
            info = ffi.new("VkDescriptorSetAllocateInfo*", {
                "sType": vk.VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO, "descriptorPool": pool.handle,
                "descriptorSetCount": 1, "pSetLayouts": pipeline.set_layouts})
            result = vk.lib.vkAllocateDescriptorSets(self.dev.device, info, dset)
            if result == 0:
                pool.left -= 1
                return Entry(dset, pool)
            if result not in (OUT_OF_POOL_MEMORY, FRAGMENTED_POOL) or pool is self.pools[-1] and pool.left == PER_POOL:
                _check(result, "vkAllocateDescriptorSets")
            pool.left = 0  # full or fragmented: the others, or a new one

    def _write(self, dset, buffers):
        vk, ffi, n = self.vk, self.vk.ffi, len(buffers)
        infos = ffi.new("VkDescriptorBufferInfo[]", n)
        writes = ffi.new("VkWriteDescriptorSet[]", n)
        for i, (b, o, r) in enumerate(buffers):
            info, write = infos[i], writes[i]
            info.buffer, info.offset, info.range = b.handle, o, r
            write.sType, write.dstSet, write.dstBinding = vk.VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, dset[0], i
            write.descriptorCount, write.descriptorType = 1, vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER
            write.pBufferInfo = infos + i
        vk.lib.vkUpdateDescriptorSets(self.dev.device, n, writes, 0, ffi.NULL)

    def forget(self, buffer):
        """Free the sets that bind `buffer` (it is being freed)."""
        for key in self.by_buffer.pop(buffer.key, ()):
            entry = self.sets.pop(key)
            for other, _, _ in key[1:]:
                if other is not buffer:
                    self.by_buffer.get(other.key, set()).discard(key)
            _check(self.vk.lib.vkFreeDescriptorSets(self.dev.device, entry.pool.handle, 1, entry.dset),
                   "vkFreeDescriptorSets")
            entry.pool.left += 1

    def close(self):
        for pool in self.pools:
            self.vk.vkDestroyDescriptorPool(self.dev.device, pool.handle, None)
        self.pools, self.sets, self.by_buffer = [], {}, {}

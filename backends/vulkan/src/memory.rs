//! Device memory: large blocks (one `VkBuffer` bound to one `VkDeviceMemory` each) sub-allocated first-fit, so a
//! model's hundreds of tensors cost a handful of Vulkan allocations. Buffers bigger than a block get a block of
//! their own. Memory is the device-local type of the largest device-local heap; when that type is also host-visible
//! (lavapipe, integrated GPUs, resizable BAR) it is mapped and uploads/downloads are plain copies, otherwise they go
//! through a staging buffer (see `device.rs`).

use crate::vk_error;
use ash::vk;
use sd3_core::{BufferId, Error, Result};
use std::collections::HashMap;

/// Every sub-allocation starts at a multiple of this (and of `minStorageBufferOffsetAlignment`).
const MIN_ALIGN: u64 = 256;
const BLOCK_SIZE: u64 = 256 << 20;

pub struct Block {
    pub buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    pub size: u64,
    /// Host address of the block when its memory is host-visible.
    pub mapped: Option<*mut u8>,
    /// Free ranges (offset, size), sorted by offset.
    free: Vec<(u64, u64)>,
    dedicated: bool,
}

/// Where a buffer lives.
#[derive(Clone, Copy, Debug)]
pub struct Allocation {
    pub block: usize,
    pub offset: u64,
    pub size: u64,
}

pub struct Allocator {
    blocks: Vec<Option<Block>>,
    allocs: HashMap<u64, Allocation>,
    next_id: u64,
    memory_type: u32,
    pub host_visible: bool,
    heap_size: u64,
    max_allocation: u64,
    align: u64,
    pub bytes_in_use: u64,
    pub bytes_reserved: u64,
    /// Blocks emptied while work may still use them; destroyed by [`Allocator::release_retired`].
    retired: Vec<Block>,
}

// SAFETY: the mapped pointers are only dereferenced under the device's lock.
unsafe impl Send for Allocator {}

/// Index of a memory type with `required` flags, preferring ones with `preferred` too.
pub fn find_memory_type(
    props: &vk::PhysicalDeviceMemoryProperties,
    type_bits: u32,
    required: vk::MemoryPropertyFlags,
    preferred: vk::MemoryPropertyFlags,
) -> Option<u32> {
    let types = &props.memory_types[..props.memory_type_count as usize];
    let ok = |i: usize, f: vk::MemoryPropertyFlags| type_bits & (1 << i) != 0 && types[i].property_flags.contains(f);
    (0..types.len())
        .find(|&i| ok(i, required | preferred))
        .or_else(|| (0..types.len()).find(|&i| ok(i, required)))
        .map(|i| i as u32)
}

/// The memory type for tensors: (index, heap size, host-visible) of a device-local type on the biggest
/// device-local heap; of the types there, a host-visible+coherent one if `prefer_host_visible`, else one that is not
/// host-visible (where both exist). None when no device-local type can hold a storage buffer.
pub fn choose_tensor_memory(
    props: &vk::PhysicalDeviceMemoryProperties,
    type_bits: u32,
    prefer_host_visible: bool,
) -> Option<(u32, u64, bool)> {
    let heaps = &props.memory_heaps[..props.memory_heap_count as usize];
    let types = &props.memory_types[..props.memory_type_count as usize];
    let mut best: Option<(u32, u64, bool)> = None;
    for (i, t) in types.iter().enumerate() {
        if type_bits & (1 << i) == 0 || !t.property_flags.contains(vk::MemoryPropertyFlags::DEVICE_LOCAL) {
            continue;
        }
        let heap = heaps[t.heap_index as usize].size;
        let hv =
            t.property_flags.contains(vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT);
        let better = match best {
            None => true,
            Some((_, bh, bhv)) => heap > bh || (heap == bh && hv != bhv && hv == prefer_host_visible),
        };
        if better {
            best = Some((i as u32, heap, hv));
        }
    }
    best
}

impl Allocator {
    pub fn new(
        device: &ash::Device,
        props: &vk::PhysicalDeviceMemoryProperties,
        min_storage_align: u64,
        max_allocation: u64,
        prefer_host_visible: bool,
    ) -> Result<Allocator> {
        // The memory types a storage buffer may use.
        let probe = create_buffer(device, 1024)?;
        // SAFETY: `probe` is a valid buffer of this device, destroyed right after the query.
        let reqs = unsafe { device.get_buffer_memory_requirements(probe) };
        unsafe { device.destroy_buffer(probe, None) };
        let heaps = &props.memory_heaps[..props.memory_heap_count as usize];
        let types = &props.memory_types[..props.memory_type_count as usize];
        let best = choose_tensor_memory(props, reqs.memory_type_bits, prefer_host_visible);
        let (memory_type, heap_size, host_visible) = match best {
            Some(b) => b,
            None => {
                let hv = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
                let i = find_memory_type(props, reqs.memory_type_bits, hv, vk::MemoryPropertyFlags::empty())
                    .ok_or_else(|| Error::backend("vulkan", "no memory type can hold a storage buffer"))?;
                (i, heaps[types[i as usize].heap_index as usize].size, true)
            }
        };
        Ok(Allocator {
            blocks: Vec::new(),
            allocs: HashMap::new(),
            next_id: 1,
            memory_type,
            host_visible,
            heap_size,
            max_allocation,
            align: MIN_ALIGN.max(min_storage_align).max(reqs.alignment),
            bytes_in_use: 0,
            bytes_reserved: 0,
            retired: Vec::new(),
        })
    }

    pub fn get(&self, id: BufferId) -> Result<Allocation> {
        self.allocs
            .get(&id.0)
            .copied()
            .ok_or_else(|| Error::InvalidArgument(format!("vulkan: unknown buffer {}", id.0)))
    }

    pub fn block(&self, i: usize) -> &Block {
        self.blocks[i].as_ref().expect("allocations only point at live blocks")
    }

    pub fn alloc(&mut self, device: &ash::Device, bytes: usize) -> Result<BufferId> {
        let size = (bytes.max(1) as u64).div_ceil(self.align) * self.align;
        let found = self.blocks.iter_mut().enumerate().find_map(|(bi, b)| {
            let b = b.as_mut()?;
            let slot = b.free.iter().position(|&(_, s)| s >= size)?;
            let (off, s) = b.free[slot];
            if s == size {
                b.free.remove(slot);
            } else {
                b.free[slot] = (off + size, s - size);
            }
            Some(Allocation { block: bi, offset: off, size })
        });
        let a = match found {
            Some(a) => a,
            None => {
                let dedicated = size > BLOCK_SIZE;
                let block_size = if dedicated { size } else { BLOCK_SIZE.min(self.max_allocation) };
                if size > block_size || size > self.max_allocation {
                    return Err(self.oom(size, "larger than maxMemoryAllocationSize".into()));
                }
                let mut block = self.new_block(device, block_size, dedicated)?;
                if size < block_size {
                    block.free.push((size, block_size - size));
                }
                let bi = match self.blocks.iter().position(|b| b.is_none()) {
                    Some(i) => i,
                    None => {
                        self.blocks.push(None);
                        self.blocks.len() - 1
                    }
                };
                self.blocks[bi] = Some(block);
                Allocation { block: bi, offset: 0, size }
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        self.allocs.insert(id, a);
        self.bytes_in_use += size;
        Ok(BufferId(id))
    }

    fn oom(&self, requested: u64, detail: String) -> Error {
        Error::OutOfMemory {
            backend: "vulkan".into(),
            requested,
            available: self.heap_size.saturating_sub(self.bytes_reserved),
            detail,
        }
    }

    fn new_block(&mut self, device: &ash::Device, size: u64, dedicated: bool) -> Result<Block> {
        let buffer = create_buffer(device, size)?;
        // SAFETY: valid buffer; memory is allocated for it, bound, and freed with it on any error.
        unsafe {
            let reqs = device.get_buffer_memory_requirements(buffer);
            let info = vk::MemoryAllocateInfo::default().allocation_size(reqs.size).memory_type_index(self.memory_type);
            let memory = match device.allocate_memory(&info, None) {
                Ok(m) => m,
                Err(e) => {
                    device.destroy_buffer(buffer, None);
                    return Err(match e {
                        vk::Result::ERROR_OUT_OF_DEVICE_MEMORY | vk::Result::ERROR_OUT_OF_HOST_MEMORY => {
                            self.oom(size, format!("vkAllocateMemory of a {size}-byte block: {e}"))
                        }
                        e => vk_error("vkAllocateMemory", e),
                    });
                }
            };
            let cleanup = |e| {
                device.destroy_buffer(buffer, None);
                device.free_memory(memory, None);
                e
            };
            device.bind_buffer_memory(buffer, memory, 0).map_err(|e| cleanup(vk_error("vkBindBufferMemory", e)))?;
            let mapped = if self.host_visible {
                let p = device
                    .map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
                    .map_err(|e| cleanup(vk_error("vkMapMemory", e)))?;
                Some(p.cast::<u8>())
            } else {
                None
            };
            self.bytes_reserved += size;
            Ok(Block { buffer, memory, size, mapped, free: Vec::new(), dedicated })
        }
    }

    pub fn free(&mut self, id: BufferId) {
        let Some(a) = self.allocs.remove(&id.0) else { return };
        self.bytes_in_use -= a.size;
        let Some(b) = self.blocks[a.block].as_mut() else { return };
        if b.dedicated {
            let b = self.blocks[a.block].take().expect("checked above");
            self.bytes_reserved -= b.size;
            self.retired.push(b);
            return;
        }
        // Insert and merge with neighbours.
        let pos = b.free.partition_point(|&(o, _)| o < a.offset);
        b.free.insert(pos, (a.offset, a.size));
        if pos + 1 < b.free.len() && b.free[pos].0 + b.free[pos].1 == b.free[pos + 1].0 {
            b.free[pos].1 += b.free[pos + 1].1;
            b.free.remove(pos + 1);
        }
        if pos > 0 && b.free[pos - 1].0 + b.free[pos - 1].1 == b.free[pos].0 {
            b.free[pos - 1].1 += b.free[pos].1;
            b.free.remove(pos);
        }
    }

    /// Bytes of retired blocks waiting for the queue to go idle.
    pub fn retired_bytes(&self) -> u64 {
        self.retired.iter().map(|b| b.size).sum()
    }

    /// Destroy blocks retired while work was queued; call only when the queue is idle.
    pub fn release_retired(&mut self, device: &ash::Device) {
        for b in self.retired.drain(..) {
            destroy_block(device, b);
        }
    }

    pub fn block_count(&self) -> usize {
        self.blocks.iter().flatten().count()
    }

    pub fn destroy_all(&mut self, device: &ash::Device) {
        self.release_retired(device);
        for b in self.blocks.drain(..).flatten() {
            destroy_block(device, b);
        }
    }
}

fn destroy_block(device: &ash::Device, b: Block) {
    // SAFETY: the queue is idle; nothing uses the block any more.
    unsafe {
        device.destroy_buffer(b.buffer, None);
        device.free_memory(b.memory, None);
    }
}

pub fn create_buffer(device: &ash::Device, size: u64) -> Result<vk::Buffer> {
    let info = vk::BufferCreateInfo::default()
        .size(size)
        .usage(
            vk::BufferUsageFlags::STORAGE_BUFFER
                | vk::BufferUsageFlags::TRANSFER_SRC
                | vk::BufferUsageFlags::TRANSFER_DST,
        )
        .sharing_mode(vk::SharingMode::EXCLUSIVE);
    // SAFETY: valid create info.
    unsafe { device.create_buffer(&info, None) }.map_err(|e| vk_error("vkCreateBuffer", e))
}

/// A host-visible, coherent buffer mapped for its whole life: the parameter ring and the staging buffer.
pub struct HostBuffer {
    pub buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    pub size: u64,
    pub ptr: *mut u8,
}

// SAFETY: the mapping is only touched under the device's lock.
unsafe impl Send for HostBuffer {}

impl HostBuffer {
    /// A mapped buffer of `size` bytes in a host-visible, coherent memory type, preferring one with `preferred` too:
    /// `DEVICE_LOCAL` for data the shaders read (the parameter ring: in video memory behind the BAR where the device
    /// has such a type, instead of being read over the bus), `HOST_CACHED` for the staging buffer (read back by the
    /// host).
    pub fn new(
        device: &ash::Device,
        props: &vk::PhysicalDeviceMemoryProperties,
        size: u64,
        preferred: vk::MemoryPropertyFlags,
    ) -> Result<HostBuffer> {
        let buffer = create_buffer(device, size)?;
        // SAFETY: valid buffer; memory allocated, bound and mapped for it, released on error.
        unsafe {
            let reqs = device.get_buffer_memory_requirements(buffer);
            let hv = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
            let Some(ty) = find_memory_type(props, reqs.memory_type_bits, hv, preferred) else {
                device.destroy_buffer(buffer, None);
                return Err(Error::backend("vulkan", "no host-visible coherent memory type for a storage buffer"));
            };
            let info = vk::MemoryAllocateInfo::default().allocation_size(reqs.size).memory_type_index(ty);
            let memory = device.allocate_memory(&info, None).map_err(|e| {
                device.destroy_buffer(buffer, None);
                vk_error("vkAllocateMemory (host-visible)", e)
            })?;
            let done = device
                .bind_buffer_memory(buffer, memory, 0)
                .and_then(|_| device.map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()));
            match done {
                Ok(p) => Ok(HostBuffer { buffer, memory, size, ptr: p.cast() }),
                Err(e) => {
                    device.destroy_buffer(buffer, None);
                    device.free_memory(memory, None);
                    Err(vk_error("binding/mapping a host-visible buffer", e))
                }
            }
        }
    }

    pub fn destroy(&self, device: &ash::Device) {
        // SAFETY: called once, with the queue idle.
        unsafe {
            device.destroy_buffer(self.buffer, None);
            device.free_memory(self.memory, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vk::MemoryPropertyFlags as F;

    /// An NVIDIA discrete GPU's layout: the heaps the H200 reported (driver 580: 143771 MiB device-local, 96665 MiB
    /// host), with a plain and a host-visible (resizable BAR) device-local type as NVIDIA drivers list them.
    fn h200() -> vk::PhysicalDeviceMemoryProperties {
        let mut p =
            vk::PhysicalDeviceMemoryProperties { memory_heap_count: 2, memory_type_count: 4, ..Default::default() };
        p.memory_heaps[0] = vk::MemoryHeap { size: 143771 << 20, flags: vk::MemoryHeapFlags::DEVICE_LOCAL };
        p.memory_heaps[1] = vk::MemoryHeap { size: 96665 << 20, flags: vk::MemoryHeapFlags::empty() };
        let ty = |flags, heap_index| vk::MemoryType { property_flags: flags, heap_index };
        p.memory_types[0] = ty(F::empty(), 1);
        p.memory_types[1] = ty(F::DEVICE_LOCAL, 0);
        p.memory_types[2] = ty(F::HOST_VISIBLE | F::HOST_COHERENT, 1);
        p.memory_types[3] = ty(F::DEVICE_LOCAL | F::HOST_VISIBLE | F::HOST_COHERENT, 0);
        p
    }

    #[test]
    fn tensor_memory_on_the_device_heap_host_visible_only_when_asked() {
        let p = h200();
        assert_eq!(choose_tensor_memory(&p, 0b1111, false), Some((1, 143771 << 20, false)));
        assert_eq!(choose_tensor_memory(&p, 0b1111, true), Some((3, 143771 << 20, true)));
        // Only the host-visible device-local type allowed: it is used either way.
        assert_eq!(choose_tensor_memory(&p, 0b1000, false), Some((3, 143771 << 20, true)));
        // No device-local type allowed.
        assert_eq!(choose_tensor_memory(&p, 0b0101, false), None);
    }

    #[test]
    fn parameter_ring_in_video_memory_staging_in_host_memory() {
        let (p, hv) = (h200(), F::HOST_VISIBLE | F::HOST_COHERENT);
        assert_eq!(find_memory_type(&p, 0b1111, hv, F::DEVICE_LOCAL), Some(3));
        // No cached host type on this layout: the first host-visible one.
        assert_eq!(find_memory_type(&p, 0b1111, hv, F::HOST_CACHED), Some(2));
        assert_eq!(find_memory_type(&p, 0b0111, hv, F::DEVICE_LOCAL), Some(2));
    }
}

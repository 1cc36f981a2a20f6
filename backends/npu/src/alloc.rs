//! The device-memory allocator, as Paddle's `FLAGS_allocator_strategy` selects it.
//!
//! Two layers, as on a real card:
//! - [`DeviceMemory`]: the arena's address space as the driver hands it out (`aclrtMalloc` / `aclrtFree`):
//!   first-fit ranges, coalesced on free.
//! - [`Allocator`]: the framework's caching allocator on top, handing out blocks from *chunks* it got from the
//!   device. Free blocks are kept in a best-fit set ordered by `(size, offset)`; a block is split on allocation
//!   (the allocated piece taken from the end of the free block, the rest staying free, as Paddle's
//!   `AutoGrowthBestFitAllocator` does) and coalesced with free neighbours of the same chunk on free.
//!   Every request is padded by [`EXTRA_PADDING`] bytes and rounded up to [`ALIGNMENT`] (the NPU plugin's
//!   `device_extra_padding_size` and `device_min_chunk_size`).
//!
//! Strategies:
//! - `auto_growth`: no memory is reserved up front; a miss grows the pool by a chunk of exactly the request.
//!   Chunks stay cached when they become idle; only when growing fails are idle chunks released to the device
//!   and the growth retried once.
//! - `naive_best_fit`: [`NAIVE_RESERVE_FRACTION`] of the arena is reserved as one chunk at creation (Paddle's
//!   `fraction_of_gpu_memory_to_use`); a miss grows by a chunk taken from what is left; chunks are never released.

use crate::flags::AllocatorStrategy;
use sd3_core::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};

/// Every block starts at a multiple of this and has a size that is a multiple of it (bytes).
pub const ALIGNMENT: usize = 512;
/// Added to every request before alignment (bytes).
pub const EXTRA_PADDING: usize = 32;
/// Part of the arena `naive_best_fit` reserves at creation.
pub const NAIVE_RESERVE_FRACTION: f64 = 0.92;

pub fn align_up(n: usize, a: usize) -> usize {
    n.div_ceil(a) * a
}

/// Size of the block a request of `bytes` occupies.
pub fn block_size(bytes: usize) -> usize {
    align_up(bytes + EXTRA_PADDING, ALIGNMENT)
}

/// The arena address space as the device driver sees it: free ranges by offset, first fit, coalesced.
#[derive(Debug)]
pub struct DeviceMemory {
    capacity: usize,
    free: BTreeMap<usize, usize>,
}

impl DeviceMemory {
    pub fn new(capacity: usize) -> DeviceMemory {
        let capacity = capacity / ALIGNMENT * ALIGNMENT;
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        DeviceMemory { capacity, free }
    }

    pub fn alloc(&mut self, size: usize) -> Option<usize> {
        let (&off, &len) = self.free.iter().find(|(_, &len)| len >= size)?;
        self.free.remove(&off);
        if len > size {
            self.free.insert(off + size, len - size);
        }
        Some(off)
    }

    pub fn free(&mut self, mut off: usize, mut size: usize) {
        if let Some((&next, &next_len)) = self.free.range(off + size..).next() {
            if next == off + size {
                self.free.remove(&next);
                size += next_len;
            }
        }
        if let Some((&prev, &prev_len)) = self.free.range(..off).next_back() {
            if prev + prev_len == off {
                self.free.remove(&prev);
                off = prev;
                size += prev_len;
            }
        }
        self.free.insert(off, size);
    }

    pub fn free_bytes(&self) -> usize {
        self.free.values().sum()
    }

    pub fn largest_free(&self) -> usize {
        self.free.values().copied().max().unwrap_or(0)
    }
}

#[derive(Debug)]
struct Chunk {
    size: usize,
    /// Blocks of this chunk currently allocated.
    used_blocks: usize,
}

#[derive(Debug)]
struct Block {
    size: usize,
    /// Bytes the user asked for (0 when free).
    requested: usize,
    free: bool,
    /// Offset of the chunk holding the block: blocks never coalesce across chunks.
    chunk: usize,
}

/// A block handed out by [`Allocator::alloc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// Byte offset in the arena (a multiple of [`ALIGNMENT`]).
    pub offset: usize,
    /// Size of the block, padding included.
    pub size: usize,
}

/// Allocator figures, as `Device::stats` and `sd3 devices` report them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AllocStats {
    pub capacity: usize,
    /// Bytes held in chunks (obtained from the device).
    pub reserved: usize,
    /// Bytes in allocated blocks (padding and alignment included).
    pub in_use: usize,
    /// Bytes the users asked for.
    pub requested: usize,
    pub peak_in_use: usize,
    pub peak_reserved: usize,
    /// Free bytes inside chunks.
    pub free_in_chunks: usize,
    pub largest_free_block: usize,
    /// `1 - largest free block / free bytes in chunks` (0 when nothing is free): how scattered cached memory is.
    pub fragmentation: f64,
    pub chunks: usize,
    pub chunk_grows: u64,
    pub chunks_released: u64,
    pub allocs: u64,
    pub frees: u64,
    pub oom_errors: u64,
}

/// The caching best-fit allocator (see the module docs).
#[derive(Debug)]
pub struct Allocator {
    strategy: AllocatorStrategy,
    device: DeviceMemory,
    chunks: BTreeMap<usize, Chunk>,
    blocks: BTreeMap<usize, Block>,
    free_blocks: BTreeSet<(usize, usize)>,
    stats: AllocStats,
}

impl Allocator {
    pub fn new(strategy: AllocatorStrategy, capacity: usize) -> Allocator {
        let device = DeviceMemory::new(capacity);
        let mut a = Allocator {
            strategy,
            stats: AllocStats { capacity: device.capacity, ..AllocStats::default() },
            device,
            chunks: BTreeMap::new(),
            blocks: BTreeMap::new(),
            free_blocks: BTreeSet::new(),
        };
        if strategy == AllocatorStrategy::NaiveBestFit {
            let reserve = (a.device.capacity as f64 * NAIVE_RESERVE_FRACTION) as usize / ALIGNMENT * ALIGNMENT;
            if reserve > 0 {
                a.grow(reserve);
            }
        }
        a
    }

    pub fn strategy(&self) -> AllocatorStrategy {
        self.strategy
    }

    /// Allocate a block for `bytes` bytes, or an [`Error::OutOfMemory`] naming the strategy and the sizes.
    pub fn alloc(&mut self, bytes: usize) -> Result<Allocation> {
        let size = block_size(bytes);
        let mut released = 0;
        let found = match self.best_fit(size, bytes) {
            Some(a) => Some(a),
            None => {
                let mut grown = self.grow(size);
                if !grown && self.strategy == AllocatorStrategy::AutoGrowth {
                    released = self.release_idle_chunks();
                    grown = released > 0 && self.grow(size);
                }
                if grown {
                    self.best_fit(size, bytes)
                } else {
                    None
                }
            }
        };
        match found {
            Some(a) => {
                self.stats.allocs += 1;
                self.stats.in_use += a.size;
                self.stats.requested += bytes;
                self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
                Ok(a)
            }
            None => {
                self.stats.oom_errors += 1;
                Err(self.oom_error(bytes, size, released))
            }
        }
    }

    /// Return a block. Unknown or already free offsets are ignored.
    pub fn free(&mut self, offset: usize) {
        let Some(block) = self.blocks.get_mut(&offset) else { return };
        if block.free {
            return;
        }
        block.free = true;
        let (mut off, mut size, chunk) = (offset, block.size, block.chunk);
        self.stats.frees += 1;
        self.stats.in_use -= size;
        self.stats.requested -= std::mem::take(&mut block.requested);
        if let Some(c) = self.chunks.get_mut(&chunk) {
            c.used_blocks -= 1;
        }
        // Coalesce with the following block, then the preceding one, when free and in the same chunk.
        let next = self.blocks.range(off + 1..).next().map(|(&n, nb)| (n, nb.size, nb.free, nb.chunk));
        if let Some((next, next_size, next_free, next_chunk)) = next {
            if next == off + size && next_free && next_chunk == chunk {
                self.free_blocks.remove(&(next_size, next));
                size += next_size;
                self.blocks.remove(&next);
            }
        }
        let prev = self.blocks.range(..off).next_back().map(|(&p, pb)| (p, pb.size, pb.free, pb.chunk));
        if let Some((prev, prev_size, prev_free, prev_chunk)) = prev {
            if prev + prev_size == off && prev_free && prev_chunk == chunk {
                self.free_blocks.remove(&(prev_size, prev));
                self.blocks.remove(&off);
                off = prev;
                size += prev_size;
            }
        }
        let b = self.blocks.get_mut(&off).expect("coalesced block exists");
        b.size = size;
        self.free_blocks.insert((size, off));
    }

    /// Give every chunk with no allocated block back to the device; returns how many were released.
    pub fn release_idle_chunks(&mut self) -> usize {
        let idle: Vec<usize> = self.chunks.iter().filter(|(_, c)| c.used_blocks == 0).map(|(&o, _)| o).collect();
        for &off in &idle {
            let chunk = self.chunks.remove(&off).expect("idle chunk exists");
            // An idle chunk is one free block after coalescing.
            self.blocks.remove(&off);
            self.free_blocks.remove(&(chunk.size, off));
            self.device.free(off, chunk.size);
            self.stats.reserved -= chunk.size;
            self.stats.chunks_released += 1;
        }
        idle.len()
    }

    pub fn stats(&self) -> AllocStats {
        let mut s = self.stats.clone();
        s.chunks = self.chunks.len();
        s.free_in_chunks = self.free_blocks.iter().map(|&(size, _)| size).sum();
        s.largest_free_block = self.free_blocks.iter().next_back().map_or(0, |&(size, _)| size);
        s.fragmentation =
            if s.free_in_chunks == 0 { 0.0 } else { 1.0 - s.largest_free_block as f64 / s.free_in_chunks as f64 };
        s
    }

    /// Bytes a single allocation could still obtain, without releasing anything.
    pub fn largest_obtainable(&self) -> usize {
        let cached = self.free_blocks.iter().next_back().map_or(0, |&(size, _)| size);
        cached.max(self.device.largest_free()).saturating_sub(EXTRA_PADDING)
    }

    fn best_fit(&mut self, size: usize, requested: usize) -> Option<Allocation> {
        let &(bsize, boff) = self.free_blocks.range((size, 0)..).next()?;
        self.free_blocks.remove(&(bsize, boff));
        let chunk = self.blocks[&boff].chunk;
        let offset = if bsize > size {
            // Split: the allocated piece is the end of the block; the front stays free.
            let rest = bsize - size;
            self.blocks.get_mut(&boff).expect("free block exists").size = rest;
            self.free_blocks.insert((rest, boff));
            self.blocks.insert(boff + rest, Block { size, requested, free: false, chunk });
            boff + rest
        } else {
            let b = self.blocks.get_mut(&boff).expect("free block exists");
            b.free = false;
            b.requested = requested;
            boff
        };
        self.chunks.get_mut(&chunk).expect("block's chunk exists").used_blocks += 1;
        Some(Allocation { offset, size })
    }

    /// Get a chunk of `size` bytes from the device into the pool.
    fn grow(&mut self, size: usize) -> bool {
        let Some(off) = self.device.alloc(size) else { return false };
        self.chunks.insert(off, Chunk { size, used_blocks: 0 });
        self.blocks.insert(off, Block { size, requested: 0, free: true, chunk: off });
        self.free_blocks.insert((size, off));
        self.stats.reserved += size;
        self.stats.chunk_grows += 1;
        self.stats.peak_reserved = self.stats.peak_reserved.max(self.stats.reserved);
        true
    }

    fn oom_error(&self, requested: usize, size: usize, released: usize) -> Error {
        let s = self.stats();
        let available = s.free_in_chunks + self.device.free_bytes();
        let retry = match self.strategy {
            AllocatorStrategy::AutoGrowth => format!("; {released} idle chunk(s) released and the allocation retried"),
            AllocatorStrategy::NaiveBestFit => String::new(),
        };
        Error::OutOfMemory {
            backend: "npu".into(),
            requested: requested as u64,
            available: available as u64,
            detail: format!(
                "allocator_strategy={}: needs a {size}-byte block ({EXTRA_PADDING}-byte padding, {ALIGNMENT}-byte \
                 alignment); arena {} bytes, reserved {}, in use {}, largest free block {}, unreserved {} (largest \
                 range {}){retry}; raise SD3_NPU_ARENA_MB or the plugin option arena_mb",
                self.strategy.name(),
                s.capacity,
                s.reserved,
                s.in_use,
                s.largest_free_block,
                self.device.free_bytes(),
                self.device.largest_free(),
            ),
        }
    }
}

//! A caching device allocator: freed blocks go to a free list by size and are reused, so a denoising step
//! allocates nothing from the driver after the first one. All work runs on one in-order stream, so a block
//! freed by the host may be handed out again at once: earlier kernels using it finish before later ones start.

use cudarc::driver::{result, sys};
use sd3_core::{BufferId, Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Sizes are rounded up to this granularity (and to a power-of-two-ish class above 1 MiB), so blocks can be reused.
fn rounded(bytes: usize) -> usize {
    let b = bytes.max(1);
    if b <= 1 << 20 {
        b.div_ceil(512) * 512
    } else {
        // 1/8 steps between powers of two: at most 12.5% waste.
        let p = usize::BITS - 1 - b.leading_zeros();
        let step = 1usize << (p - 3);
        b.div_ceil(step) * step
    }
}

#[derive(Default)]
struct Pools {
    /// Live blocks: device address → rounded size.
    live: HashMap<u64, usize>,
    /// Cached free blocks by rounded size.
    free: BTreeMap<usize, Vec<u64>>,
    cached_bytes: usize,
    live_bytes: usize,
    peak_bytes: usize,
    driver_allocs: u64,
    /// Times an allocation failed and the whole cache went back to the driver before the retry.
    cache_releases: u64,
}

#[derive(Default)]
pub struct Allocator {
    pools: Mutex<Pools>,
}

impl Allocator {
    pub fn alloc(&self, bytes: usize) -> Result<BufferId> {
        let size = rounded(bytes);
        let mut p = self.pools.lock().unwrap();
        let reuse = p.free.get_mut(&size).and_then(|v| v.pop());
        let ptr = match reuse {
            Some(ptr) => {
                p.cached_bytes -= size;
                ptr
            }
            None => {
                let fresh = unsafe { result::malloc_sync(size) };
                match fresh {
                    Ok(ptr) => ptr,
                    Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => {
                        // Give the cache back to the driver and retry once.
                        Self::release_cached(&mut p);
                        p.cache_releases += 1;
                        unsafe { result::malloc_sync(size) }.map_err(|_| {
                            let (free, _total) = result::mem_get_info().unwrap_or((0, 0));
                            Error::OutOfMemory {
                                backend: "cuda".into(),
                                requested: bytes as u64,
                                available: free as u64,
                                detail: format!("{} bytes live in sd3 buffers", p.live_bytes),
                            }
                        })?
                    }
                    Err(e) => return Err(Error::backend("cuda", format!("cuMemAlloc({size}): {e}"))),
                }
            }
        };
        if reuse.is_none() {
            p.driver_allocs += 1;
        }
        p.live.insert(ptr, size);
        p.live_bytes += size;
        p.peak_bytes = p.peak_bytes.max(p.live_bytes);
        Ok(BufferId(ptr))
    }

    pub fn free(&self, buffer: BufferId) {
        let mut p = self.pools.lock().unwrap();
        if let Some(size) = p.live.remove(&buffer.0) {
            p.live_bytes -= size;
            p.cached_bytes += size;
            p.free.entry(size).or_default().push(buffer.0);
        }
    }

    /// Size in bytes of a live buffer, or an error naming the unknown handle.
    pub fn size_of(&self, buffer: BufferId) -> Result<usize> {
        self.pools
            .lock()
            .unwrap()
            .live
            .get(&buffer.0)
            .copied()
            .ok_or_else(|| Error::InvalidArgument(format!("unknown CUDA buffer {:#x}", buffer.0)))
    }

    fn release_cached(p: &mut Pools) {
        for (_, ptrs) in std::mem::take(&mut p.free) {
            for ptr in ptrs {
                let _ = unsafe { result::free_sync(ptr) };
            }
        }
        p.cached_bytes = 0;
    }

    pub fn stats(&self) -> Vec<String> {
        let p = self.pools.lock().unwrap();
        vec![
            format!("cuda.live_bytes={}", p.live_bytes),
            format!("cuda.cached_bytes={}", p.cached_bytes),
            format!("cuda.peak_bytes={}", p.peak_bytes),
            format!("cuda.driver_allocs={}", p.driver_allocs),
            format!("cuda.cache_releases={}", p.cache_releases),
        ]
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        let mut p = self.pools.lock().unwrap();
        Self::release_cached(&mut p);
        for (&ptr, _) in p.live.iter() {
            let _ = unsafe { result::free_sync(ptr) };
        }
    }
}

//! Host memory of the CPU device: 64-byte aligned buffers addressed by [`BufferId`]s.
//!
//! Buffers are reference counted so that an op in flight keeps its operands alive even if the owner frees them
//! meanwhile (the `Device` contract). Kernels get raw pointers; the device guarantees that what one op writes is
//! never read or written by anything else during that op (see `lib.rs`, aliasing).

use sd3_core::{BufferId, Error, Result};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Alignment of every buffer: a cache line, and enough for any SIMD load.
pub const ALIGN: usize = 64;

/// One aligned host allocation.
pub struct Buffer {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory; synchronisation of its contents is the device's job (ops are serialised,
// and within an op threads write disjoint elements).
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

impl Buffer {
    /// A zeroed buffer, or `None` when the allocation fails.
    pub fn new(len: usize) -> Option<Buffer> {
        let layout = Layout::from_size_align(len.max(1), ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Buffer { ptr, len })
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn check(&self, what: &str, offset: usize, bytes: usize) -> Result<()> {
        match offset.checked_add(bytes) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "cpu: {what} of {bytes} bytes at byte {offset} overflows a {}-byte buffer",
                self.len
            ))),
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { dealloc(self.ptr, Layout::from_size_align_unchecked(self.len.max(1), ALIGN)) }
    }
}

/// All live buffers of a device, with allocation statistics.
#[derive(Default)]
pub struct Memory {
    buffers: Mutex<HashMap<u64, Arc<Buffer>>>,
    next: AtomicU64,
    in_use: AtomicU64,
    peak: AtomicU64,
    allocs: AtomicU64,
}

impl Memory {
    pub fn alloc(&self, bytes: usize) -> Result<BufferId> {
        let buf = Buffer::new(bytes).ok_or_else(|| Error::OutOfMemory {
            backend: "cpu".into(),
            requested: bytes as u64,
            available: 0,
            detail: "host allocation failed".into(),
        })?;
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.buffers.lock().unwrap().insert(id, Arc::new(buf));
        let now = self.in_use.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        self.peak.fetch_max(now, Ordering::Relaxed);
        self.allocs.fetch_add(1, Ordering::Relaxed);
        Ok(BufferId(id))
    }

    pub fn free(&self, id: BufferId) {
        if let Some(b) = self.buffers.lock().unwrap().remove(&id.0) {
            self.in_use.fetch_sub(b.len as u64, Ordering::Relaxed);
        }
    }

    pub fn get(&self, id: BufferId) -> Result<Arc<Buffer>> {
        self.buffers
            .lock()
            .unwrap()
            .get(&id.0)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("cpu: unknown buffer {}", id.0)))
    }

    pub fn upload(&self, id: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        let b = self.get(id)?;
        b.check("upload", offset, data.len())?;
        // SAFETY: bounds checked above; `data` cannot alias device memory handed out as `&mut`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.ptr.add(offset), data.len()) };
        Ok(())
    }

    pub fn download(&self, id: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        let b = self.get(id)?;
        b.check("download", offset, out.len())?;
        // SAFETY: bounds checked above.
        unsafe { std::ptr::copy_nonoverlapping(b.ptr.add(offset), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    pub fn copy(&self, src: BufferId, src_offset: usize, dst: BufferId, dst_offset: usize, bytes: usize) -> Result<()> {
        let (s, d) = (self.get(src)?, self.get(dst)?);
        s.check("copy source", src_offset, bytes)?;
        d.check("copy destination", dst_offset, bytes)?;
        // SAFETY: both ranges are in bounds; `copy` (memmove) allows overlap within one buffer.
        unsafe { std::ptr::copy(s.ptr.add(src_offset), d.ptr.add(dst_offset), bytes) };
        Ok(())
    }

    pub fn stats(&self) -> Vec<String> {
        vec![
            format!("buffers_live={}", self.buffers.lock().unwrap().len()),
            format!("bytes_in_use={}", self.in_use.load(Ordering::Relaxed)),
            format!("bytes_peak={}", self.peak.load(Ordering::Relaxed)),
            format!("allocations={}", self.allocs.load(Ordering::Relaxed)),
        ]
    }
}

//! Device buffers behind opaque [`BufferId`]s, and the host transfers.
//!
//! An OpenCL runtime keeps a memory object alive while queued commands use it, so `free` may release a
//! buffer at once; transfers are blocking (the host slice is only borrowed).

use crate::cl_error;
use ocl::core::{self, CommandQueue, Context, Event, Mem, MemFlags};
use sd3_core::{BufferId, Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub struct Memory {
    buffers: Mutex<HashMap<u64, (Mem, usize)>>,
    next: AtomicU64,
    in_use: AtomicU64,
    /// Device global memory and the largest single allocation, from the device's info.
    capacity: u64,
    max_alloc: u64,
}

impl Memory {
    pub fn new(capacity: u64, max_alloc: u64) -> Memory {
        Memory { buffers: Mutex::default(), next: AtomicU64::new(0), in_use: AtomicU64::new(0), capacity, max_alloc }
    }

    pub fn bytes_in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }
    pub fn buffer_count(&self) -> usize {
        self.buffers.lock().unwrap().len()
    }

    fn out_of_memory(&self, bytes: usize, detail: String) -> Error {
        let available = self.capacity.saturating_sub(self.bytes_in_use());
        Error::OutOfMemory { backend: "opencl".into(), requested: bytes as u64, available, detail }
    }

    pub fn alloc(&self, context: &Context, bytes: usize) -> Result<BufferId> {
        if self.max_alloc > 0 && bytes as u64 > self.max_alloc {
            let detail = format!("the device's largest single allocation is {} bytes", self.max_alloc);
            return Err(self.out_of_memory(bytes, detail));
        }
        if self.capacity > 0 && self.bytes_in_use() + bytes as u64 > self.capacity {
            let detail = format!("{} of {} bytes already allocated", self.bytes_in_use(), self.capacity);
            return Err(self.out_of_memory(bytes, detail));
        }
        let mem = unsafe { core::create_buffer::<_, u8>(context, MemFlags::new().read_write(), bytes.max(1), None) }
            .map_err(|e| match cl_error("clCreateBuffer", e) {
                Error::OutOfMemory { detail, .. } => self.out_of_memory(bytes, detail),
                e => e,
            })?;
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.buffers.lock().unwrap().insert(id, (mem, bytes));
        self.in_use.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(BufferId(id))
    }

    pub fn free(&self, id: BufferId) {
        if let Some((_, bytes)) = self.buffers.lock().unwrap().remove(&id.0) {
            self.in_use.fetch_sub(bytes as u64, Ordering::Relaxed);
        }
    }

    /// The memory object of a buffer and its size in bytes.
    pub fn get(&self, id: BufferId) -> Result<(Mem, usize)> {
        self.buffers
            .lock()
            .unwrap()
            .get(&id.0)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("opencl: unknown buffer id {}", id.0)))
    }

    fn check_range(&self, id: BufferId, size: usize, offset: usize, len: usize, what: &str) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::InvalidArgument(format!(
                "opencl: {what} of {len} bytes at offset {offset} is outside buffer {} ({size} bytes)",
                id.0
            )));
        }
        Ok(())
    }

    pub fn upload(&self, queue: &CommandQueue, id: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        let (mem, size) = self.get(id)?;
        self.check_range(id, size, offset, data.len(), "upload")?;
        if data.is_empty() {
            return Ok(());
        }
        unsafe { core::enqueue_write_buffer(queue, &mem, true, offset, data, None::<&Event>, None::<&mut Event>) }
            .map_err(|e| cl_error("upload (clEnqueueWriteBuffer)", e))
    }

    pub fn download(&self, queue: &CommandQueue, id: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        let (mem, size) = self.get(id)?;
        self.check_range(id, size, offset, out.len(), "download")?;
        if out.is_empty() {
            return core::finish(queue).map_err(|e| cl_error("clFinish", e));
        }
        unsafe { core::enqueue_read_buffer(queue, &mem, true, offset, out, None::<&Event>, None::<&mut Event>) }
            .map_err(|e| cl_error("download (clEnqueueReadBuffer)", e))
    }

    pub fn copy(
        &self,
        queue: &CommandQueue,
        src: BufferId,
        so: usize,
        dst: BufferId,
        d_o: usize,
        n: usize,
    ) -> Result<()> {
        let (smem, ssize) = self.get(src)?;
        let (dmem, dsize) = self.get(dst)?;
        self.check_range(src, ssize, so, n, "copy source")?;
        self.check_range(dst, dsize, d_o, n, "copy destination")?;
        if n == 0 {
            return Ok(());
        }
        core::enqueue_copy_buffer::<u8, _, _, _>(queue, &smem, &dmem, so, d_o, n, None::<&Event>, None::<&mut Event>)
            .map_err(|e| cl_error("clEnqueueCopyBuffer", e))
    }
}

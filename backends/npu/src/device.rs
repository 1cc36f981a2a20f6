//! [`NpuDevice`]: the emulated NPU. Buffers live in the arena ([`crate::arena`]), handed out by the allocator
//! the flags choose ([`crate::alloc`]); ops run as kernels on arena memory ([`crate::kernels`]), with the flags
//! applied around them ([`crate::launch`]).
//!
//! The device is one in-order queue: every call takes the device lock and completes before returning, so
//! `synchronize` has nothing to wait for.

use crate::alloc::{AllocStats, Allocation, Allocator};
use crate::arena::{Arena, Mem};
use crate::config::NpuConfig;
use crate::kernels::Operand;
use crate::{check, launch};
use sd3_core::{BufferId, DType, Device, DeviceInfo, DeviceKind, Error, Layout, OpCall, Result, TensorDesc};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

pub(crate) struct BufferEntry {
    pub alloc: Allocation,
    pub bytes: usize,
    /// Bumped on every write, so that cached private-format copies of the buffer can tell they are stale.
    pub generation: u64,
}

/// A FRACTAL_NZ copy of a matmul weight view, kept while its source buffer is unchanged.
pub(crate) struct NzEntry {
    pub alloc: Allocation,
    pub generation: u64,
    /// Bytes of the logical (unpadded) matrix.
    pub logical_bytes: usize,
    /// Bytes of the fractal form, padded to 16×16 blocks.
    pub physical_bytes: usize,
}

pub(crate) type NzKey = (u64, Layout, DType);

/// Event counters reported by `stats()`.
#[derive(Default, Debug, Clone)]
pub struct Counters {
    pub ops: u64,
    pub uploads: u64,
    pub upload_bytes: u64,
    pub downloads: u64,
    pub download_bytes: u64,
    /// Non-contiguous operands materialised as contiguous copies (`FLAGS_use_stride_kernel=0`).
    pub contiguous_copies: u64,
    pub contiguous_copy_bytes: u64,
    /// Non-contiguous operands kernels read or wrote through their strides, without a copy.
    pub strided_operands: u64,
    pub nz_conversions: u64,
    pub nz_cache_hits: u64,
    pub nz_evictions: u64,
    /// NCHW → NC1HWC0 and back around convolutions.
    pub nc1hwc0_conversions: u64,
    pub nc1hwc0_peak_bytes: u64,
    pub nc1hwc0_padding_bytes: u64,
    pub affine_aclnn: u64,
    pub affine_legacy: u64,
    pub workspace_allocs: u64,
}

pub(crate) struct State {
    pub alloc: Allocator,
    pub buffers: HashMap<u64, BufferEntry>,
    next_id: u64,
    pub nz: HashMap<NzKey, NzEntry>,
    pub counters: Counters,
}

impl State {
    /// Allocate device memory; under memory pressure the cached FRACTAL_NZ copies are dropped and the
    /// allocation retried before an out-of-memory error is returned.
    pub fn alloc_block(&mut self, bytes: usize) -> Result<Allocation> {
        match self.alloc.alloc(bytes) {
            Err(Error::OutOfMemory { .. }) if !self.nz.is_empty() => {
                for (_, e) in self.nz.drain() {
                    self.alloc.free(e.alloc.offset);
                    self.counters.nz_evictions += 1;
                }
                self.alloc.alloc(bytes)
            }
            r => r,
        }
    }

    fn drop_nz_of(&mut self, buffer: u64) {
        let stale: Vec<NzKey> = self.nz.keys().filter(|k| k.0 == buffer).cloned().collect();
        for k in stale {
            let e = self.nz.remove(&k).expect("key listed");
            self.alloc.free(e.alloc.offset);
        }
    }

    fn entry(&self, b: BufferId) -> Result<&BufferEntry> {
        self.buffers.get(&b.0).ok_or_else(|| Error::InvalidArgument(format!("npu: unknown buffer {}", b.0)))
    }

    /// Check a byte range of a buffer and return its arena offset.
    fn range(&self, b: BufferId, offset: usize, len: usize, what: &str) -> Result<usize> {
        let e = self.entry(b)?;
        match offset.checked_add(len) {
            Some(end) if end <= e.bytes => Ok(e.alloc.offset + offset),
            _ => Err(Error::InvalidArgument(format!(
                "npu: {what} of {len} bytes at offset {offset} overflows buffer {} of {} bytes",
                b.0, e.bytes
            ))),
        }
    }
}

pub struct NpuDevice {
    config: NpuConfig,
    arena: Arena,
    state: Mutex<State>,
}

impl NpuDevice {
    pub fn new(config: NpuConfig) -> Result<NpuDevice> {
        let bytes = usize::try_from(config.arena_bytes)
            .map_err(|_| Error::InvalidArgument(format!("npu: arena of {} bytes", config.arena_bytes)))?;
        let state = State {
            alloc: Allocator::new(config.flags.allocator_strategy, bytes),
            buffers: HashMap::new(),
            next_id: 0,
            nz: HashMap::new(),
            counters: Counters::default(),
        };
        Ok(NpuDevice { arena: Arena::new(bytes)?, state: Mutex::new(state), config })
    }

    pub fn config(&self) -> &NpuConfig {
        &self.config
    }

    pub fn alloc_stats(&self) -> AllocStats {
        self.lock().alloc.stats()
    }

    pub fn counters(&self) -> Counters {
        self.lock().counters.clone()
    }

    /// Release idle allocator chunks now (they are otherwise released only when an allocation fails).
    pub fn release_idle_chunks(&self) -> usize {
        self.lock().alloc.release_idle_chunks()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters possibly stale but memory consistent: keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn arena(&self) -> &Arena {
        &self.arena
    }

    /// An operand over a buffer view, after checking the view lies inside the buffer.
    pub(crate) fn operand(&self, st: &State, t: &TensorDesc) -> Result<Operand> {
        let es = t.dtype.size_in_bytes();
        let span = t.layout.span_end() * es;
        let off = st.range(t.buffer, 0, span, "tensor view")?;
        Ok(Operand { mem: Mem { ptr: self.arena.ptr(off), dtype: t.dtype }, layout: t.layout.clone() })
    }

    /// A contiguous operand over a fresh workspace block, recorded in `ws` for release after the op.
    pub(crate) fn workspace(
        &self,
        st: &mut State,
        ws: &mut Vec<Allocation>,
        elems: usize,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Operand> {
        let a = st.alloc_block(elems * dtype.size_in_bytes())?;
        ws.push(a);
        st.counters.workspace_allocs += 1;
        Ok(Operand::contiguous(Mem { ptr: self.arena.ptr(a.offset), dtype }, shape))
    }
}

impl Device for NpuDevice {
    fn info(&self) -> DeviceInfo {
        let s = self.alloc_stats();
        let mut capabilities = self.config.flags.to_lines();
        capabilities.extend([
            format!("arena_mb={}", self.config.arena_bytes >> 20),
            "emulated=host".to_string(),
            "storage_formats=ND,FRACTAL_NZ,NC1HWC0".to_string(),
            format!("alignment={}", crate::alloc::ALIGNMENT),
            format!("extra_padding={}", crate::alloc::EXTRA_PADDING),
            format!("threads={}", crate::par::threads()),
        ]);
        DeviceInfo {
            name: "NPU stub (host-emulated)".to_string(),
            kind: DeviceKind::Npu,
            memory_bytes: s.capacity as u64,
            free_memory_bytes: (s.capacity - s.in_use) as u64,
            pci_id: None,
            dtypes: check::dtypes(),
            capabilities,
        }
    }

    fn alloc(&self, bytes: usize) -> Result<BufferId> {
        let mut st = self.lock();
        let alloc = st.alloc_block(bytes)?;
        st.next_id += 1;
        let id = st.next_id;
        st.buffers.insert(id, BufferEntry { alloc, bytes, generation: 0 });
        Ok(BufferId(id))
    }

    fn free(&self, buffer: BufferId) {
        let mut st = self.lock();
        if let Some(e) = st.buffers.remove(&buffer.0) {
            st.alloc.free(e.alloc.offset);
            st.drop_nz_of(buffer.0);
        }
    }

    fn upload(&self, buffer: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        let mut st = self.lock();
        let at = st.range(buffer, offset, data.len(), "upload")?;
        // SAFETY: the range is inside the buffer, hence the arena; host data never aliases the arena.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.arena.ptr(at).0, data.len()) };
        st.counters.uploads += 1;
        st.counters.upload_bytes += data.len() as u64;
        st.buffers.get_mut(&buffer.0).expect("checked").generation += 1;
        Ok(())
    }

    fn download(&self, buffer: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        let mut st = self.lock();
        let at = st.range(buffer, offset, out.len(), "download")?;
        // SAFETY: as in upload.
        unsafe { std::ptr::copy_nonoverlapping(self.arena.ptr(at).0, out.as_mut_ptr(), out.len()) };
        st.counters.downloads += 1;
        st.counters.download_bytes += out.len() as u64;
        Ok(())
    }

    fn copy_buffer(&self, src: BufferId, so: usize, dst: BufferId, d_o: usize, n: usize) -> Result<()> {
        let mut st = self.lock();
        let from = st.range(src, so, n, "copy source")?;
        let to = st.range(dst, d_o, n, "copy destination")?;
        // SAFETY: both ranges are inside the arena; `copy` allows overlap (same buffer).
        unsafe { std::ptr::copy(self.arena.ptr(from).0, self.arena.ptr(to).0, n) };
        st.buffers.get_mut(&dst.0).expect("checked").generation += 1;
        Ok(())
    }

    fn supports(&self, call: &OpCall) -> bool {
        check::check(call).is_ok()
    }

    fn execute(&self, call: &OpCall) -> Result<()> {
        check::check(call)?;
        let mut st = self.lock();
        let mut ws = Vec::new();
        let result = launch::launch(self, &mut st, call, &mut ws);
        for a in ws {
            st.alloc.free(a.offset);
        }
        st.counters.ops += 1;
        for t in call.outputs {
            if let Some(e) = st.buffers.get_mut(&t.buffer.0) {
                e.generation += 1;
            }
        }
        result
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn stats(&self) -> Vec<String> {
        let st = self.lock();
        let s = st.alloc.stats();
        let c = &st.counters;
        let nz_bytes: usize = st.nz.values().map(|e| e.physical_bytes).sum();
        let nz_logical: usize = st.nz.values().map(|e| e.logical_bytes).sum();
        let mut lines = self.config.flags.to_lines();
        lines.extend([
            format!("arena_bytes={}", s.capacity),
            format!("alloc.reserved_bytes={}", s.reserved),
            format!("alloc.in_use_bytes={}", s.in_use),
            format!("alloc.requested_bytes={}", s.requested),
            format!("alloc.peak_in_use_bytes={}", s.peak_in_use),
            format!("alloc.peak_reserved_bytes={}", s.peak_reserved),
            format!("alloc.free_in_chunks_bytes={}", s.free_in_chunks),
            format!("alloc.largest_free_block_bytes={}", s.largest_free_block),
            format!("alloc.fragmentation={:.4}", s.fragmentation),
            format!("alloc.chunks={}", s.chunks),
            format!("alloc.chunk_grows={}", s.chunk_grows),
            format!("alloc.chunks_released={}", s.chunks_released),
            format!("alloc.allocs={}", s.allocs),
            format!("alloc.frees={}", s.frees),
            format!("alloc.oom_errors={}", s.oom_errors),
            format!("ops={}", c.ops),
            format!("uploads={} ({} bytes)", c.uploads, c.upload_bytes),
            format!("downloads={} ({} bytes)", c.downloads, c.download_bytes),
            format!("contiguous_copies={}", c.contiguous_copies),
            format!("contiguous_copy_bytes={}", c.contiguous_copy_bytes),
            format!("strided_operands={}", c.strided_operands),
            format!("nz.conversions={}", c.nz_conversions),
            format!("nz.cache_hits={}", c.nz_cache_hits),
            format!("nz.evictions={}", c.nz_evictions),
            format!("nz.cached={}", st.nz.len()),
            format!("nz.cached_bytes={nz_bytes}"),
            format!("nz.padding_bytes={}", nz_bytes - nz_logical),
            format!("nc1hwc0.conversions={}", c.nc1hwc0_conversions),
            format!("nc1hwc0.peak_bytes={}", c.nc1hwc0_peak_bytes),
            format!("nc1hwc0.padding_bytes={}", c.nc1hwc0_padding_bytes),
            format!("affine.aclnn_muls_adds={}", c.affine_aclnn),
            format!("affine.legacy_fused={}", c.affine_legacy),
            format!("workspace_allocs={}", c.workspace_allocs),
        ]);
        lines
    }
}

//! Device timing markers (`Device::record_marker`, plugin ABI 1.1) as Vulkan timestamp queries, for
//! `sd3 --benchmark`. Each live marker owns one query of a fixed pool; its timestamp is written into the open
//! command buffer at the bottom of the pipe, i.e. once all work recorded before it has finished. Ticks are masked
//! to the queue's `timestampValidBits` and scaled by the device's `timestampPeriod`.

use crate::vk_error;
use ash::vk;
use sd3_core::{Error, MarkerId, Result};
use std::collections::HashMap;

/// Queries in the pool: markers alive at once (a generation with `--benchmark` holds a few).
pub const SLOTS: u32 = 256;

pub(crate) struct Markers {
    pool: vk::QueryPool,
    free: Vec<u32>,
    /// Marker id -> query index.
    live: HashMap<u64, u32>,
    next_id: u64,
    mask: u64,
    period_ns: f64,
}

impl Markers {
    pub fn new(d: &ash::Device, valid_bits: u32, period_ns: f32) -> Result<Markers> {
        let info = vk::QueryPoolCreateInfo::default().query_type(vk::QueryType::TIMESTAMP).query_count(SLOTS);
        // SAFETY: valid create info; destroyed in `destroy`.
        let pool = unsafe { d.create_query_pool(&info, None) }.map_err(|e| vk_error("vkCreateQueryPool", e))?;
        Ok(Markers {
            pool,
            free: (0..SLOTS).rev().collect(),
            live: HashMap::new(),
            next_id: 0,
            mask: if valid_bits >= 64 { u64::MAX } else { (1u64 << valid_bits) - 1 },
            period_ns: period_ns as f64,
        })
    }

    /// Write a timestamp into `cmd` (recording) after everything recorded before it.
    pub fn record(&mut self, d: &ash::Device, cmd: vk::CommandBuffer) -> Result<MarkerId> {
        let slot = self.free.pop().ok_or_else(|| {
            Error::backend("vulkan", format!("more than {SLOTS} timing markers alive at once (release_marker them)"))
        })?;
        // SAFETY: `cmd` is recording; the query is not in use (it was free).
        unsafe {
            d.cmd_reset_query_pool(cmd, self.pool, slot, 1);
            d.cmd_write_timestamp(cmd, vk::PipelineStageFlags::BOTTOM_OF_PIPE, self.pool, slot);
        }
        self.next_id += 1;
        self.live.insert(self.next_id, slot);
        Ok(MarkerId(self.next_id))
    }

    /// Seconds from `start` to `end`; both must have been submitted and completed (the caller flushed).
    pub fn elapsed(&self, d: &ash::Device, start: MarkerId, end: MarkerId) -> Result<f64> {
        let slot = |m: MarkerId| {
            self.live
                .get(&m.0)
                .copied()
                .ok_or_else(|| Error::InvalidArgument(format!("vulkan: marker {} is not live", m.0)))
        };
        let (a, b) = (slot(start)?, slot(end)?);
        let read = |q: u32| -> Result<u64> {
            let mut t = [0u64; 1];
            // SAFETY: the query was written by a completed submission; WAIT covers any remaining latency.
            unsafe {
                d.get_query_pool_results(
                    self.pool,
                    q,
                    &mut t,
                    vk::QueryResultFlags::TYPE_64 | vk::QueryResultFlags::WAIT,
                )
            }
            .map_err(|e| vk_error("vkGetQueryPoolResults (timing marker)", e))?;
            Ok(t[0] & self.mask)
        };
        let ticks = read(b)?.wrapping_sub(read(a)?) & self.mask;
        Ok(ticks as f64 * self.period_ns * 1e-9)
    }

    pub fn release(&mut self, marker: MarkerId) {
        if let Some(slot) = self.live.remove(&marker.0) {
            self.free.push(slot);
        }
    }

    pub fn live(&self) -> usize {
        self.live.len()
    }

    pub fn destroy(self, d: &ash::Device) {
        // SAFETY: the queue is idle (called from the device's drop after waiting).
        unsafe { d.destroy_query_pool(self.pool, None) };
    }
}

//! Device timing markers (`Device::record_marker`, plugin ABI 1.1) as CUDA events recorded on the device's
//! stream, for `sd3 --benchmark`.
//!
//! A released event goes back to a small pool and is recorded again by the next marker, so steady-state
//! benchmarking creates no event and allocates nothing; events beyond the pool are destroyed on release, and the
//! rest with the device.

use crate::device::drv;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use sd3_core::{Error, MarkerId, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Released events kept for reuse (a generation with `--benchmark` has at most a few live at once).
const POOL: usize = 16;

pub(crate) struct Markers {
    state: Mutex<State>,
}

struct State {
    next_id: u64,
    /// CUDA events created so far (the pool keeps this small).
    created: u64,
    live: HashMap<u64, CudaEvent>,
    pool: Vec<CudaEvent>,
}

impl Markers {
    pub(crate) fn new() -> Markers {
        Markers {
            state: Mutex::new(State {
                next_id: 0,
                created: 0,
                live: HashMap::with_capacity(POOL),
                pool: Vec::with_capacity(POOL),
            }),
        }
    }

    /// Record an event after all work queued on `stream` so far; never waits.
    pub(crate) fn record(&self, ctx: &Arc<CudaContext>, stream: &CudaStream) -> Result<MarkerId> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let event = match s.pool.pop() {
            Some(e) => e,
            // Timing enabled: cudarc's default (`None`) creates events with CU_EVENT_DISABLE_TIMING.
            None => {
                let e = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv)?;
                s.created += 1;
                e
            }
        };
        if let Err(e) = event.record(stream) {
            s.pool.push(event);
            return Err(drv(e));
        }
        s.next_id += 1;
        let id = s.next_id;
        s.live.insert(id, event);
        Ok(MarkerId(id))
    }

    /// Seconds between two recorded events; waits for both.
    pub(crate) fn elapsed(&self, start: MarkerId, end: MarkerId) -> Result<f64> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let event = |m: MarkerId| {
            s.live.get(&m.0).ok_or_else(|| Error::InvalidArgument(format!("cuda: marker {} is not live", m.0)))
        };
        let ms = event(start)?.elapsed_ms(event(end)?).map_err(drv)?;
        Ok(ms as f64 / 1e3)
    }

    /// `key=value` lines for the device's stats.
    pub(crate) fn stats(&self) -> Vec<String> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        vec![format!("marker_events_created={}", s.created), format!("markers_live={}", s.live.len())]
    }

    pub(crate) fn release(&self, marker: MarkerId) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(event) = s.live.remove(&marker.0) {
            if s.pool.len() < POOL {
                s.pool.push(event);
            }
        }
    }
}

//! Device timing markers (`Device::record_marker`, for `--benchmark`): each marker is a one-work-item empty
//! kernel queued with an event; on the in-order queue it ends after all work queued before it, so the time
//! between two markers is the difference of their `CL_PROFILING_COMMAND_END` timestamps. An empty kernel rather
//! than `clEnqueueMarkerWithWaitList`, because drivers disagree on whether marker commands carry timestamps.
//! The queue is created with profiling enabled (`SD3_OPENCL_QUEUE_PROFILING=0` creates it without, and then
//! there are no markers); only marker launches ask for events, so ordinary launches are unaffected.

use crate::cl_error;
use crate::device::OpenClDevice;
use crate::kernels::ProgramKind;
use crate::ops::Ctx;
use ocl::core::{self, Event, ProfilingInfo};
use sd3_core::{Error, MarkerId, Result};
use std::collections::HashMap;

/// Whether new queues get `CL_QUEUE_PROFILING_ENABLE` (see the module docs).
pub fn queue_profiling_wanted() -> bool {
    std::env::var("SD3_OPENCL_QUEUE_PROFILING").map_or(true, |v| v != "0")
}

/// Markers recorded and not yet released.
#[derive(Default)]
pub(crate) struct Markers {
    next: u64,
    events: HashMap<u64, Event>,
}

impl OpenClDevice {
    pub(crate) fn record_marker_event(&self) -> Result<Option<MarkerId>> {
        if !self.queue_profiling {
            return Ok(None);
        }
        let mut event = Event::null();
        {
            let mut cx = Ctx { dev: self, exec: self.lock_exec() };
            let kernel = cx.kernel(ProgramKind::Elementwise, "marker", "")?;
            unsafe {
                core::enqueue_kernel(
                    &self.queue,
                    &kernel,
                    1,
                    None,
                    &[1, 1, 1],
                    Some([1, 1, 1]),
                    None::<&Event>,
                    Some(&mut event),
                )
            }
            .map_err(|e| cl_error("queueing a timing marker", e))?;
        }
        let mut markers = self.markers.lock().unwrap_or_else(|p| p.into_inner());
        markers.next += 1;
        let id = markers.next;
        markers.events.insert(id, event);
        Ok(Some(MarkerId(id)))
    }

    pub(crate) fn marker_seconds(&self, start: MarkerId, end: MarkerId) -> Result<f64> {
        let (s, e) = {
            let markers = self.markers.lock().unwrap_or_else(|p| p.into_inner());
            let get = |m: MarkerId| {
                markers.events.get(&m.0).cloned().ok_or_else(|| {
                    Error::InvalidArgument(format!("opencl: timing marker {} is unknown or already released", m.0))
                })
            };
            (get(start)?, get(end)?)
        };
        core::wait_for_event(&e).map_err(|err| cl_error("waiting for a timing marker", err))?;
        let end_ns = |ev: &Event| -> Result<u64> {
            core::get_event_profiling_info(ev, ProfilingInfo::End)
                .and_then(|r| r.time())
                .map_err(|err| cl_error("reading a timing marker's timestamp", err))
        };
        let (t0, t1) = (end_ns(&s)?, end_ns(&e)?);
        if t1 < t0 {
            return Err(Error::InvalidArgument(format!(
                "opencl: timing marker {} ends before marker {} (was it recorded first?)",
                end.0, start.0
            )));
        }
        Ok((t1 - t0) as f64 * 1e-9)
    }

    pub(crate) fn release_marker_event(&self, marker: MarkerId) {
        self.markers.lock().unwrap_or_else(|p| p.into_inner()).events.remove(&marker.0);
    }
}

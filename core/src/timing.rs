//! [`DeviceTimer`]: device time between two points of a program, from the device's own timestamps
//! ([`Device::record_marker`]: CUDA events, OpenCL profiling events, Vulkan timestamp queries), for
//! `--benchmark`. The time is measured on the device's queue, so it includes any idle gap while the host was
//! slow to queue work. On a device without markers every figure is `None`.

use crate::{Device, MarkerId, Result};
use std::sync::Arc;

/// Device time from [`DeviceTimer::start`] to [`DeviceTimer::stop`]. Holds at most one marker, released by
/// `stop` or on drop.
pub struct DeviceTimer {
    start: Option<(Arc<dyn Device>, MarkerId)>,
}

impl DeviceTimer {
    /// Queue the start marker (no synchronisation). On a device without markers, a timer whose `stop` is `None`.
    pub fn start(device: &Arc<dyn Device>) -> Result<DeviceTimer> {
        Ok(DeviceTimer { start: device.record_marker()?.map(|m| (device.clone(), m)) })
    }

    /// A timer that records nothing and makes no device call (benchmarking off).
    pub fn disabled() -> DeviceTimer {
        DeviceTimer { start: None }
    }

    /// Start a timer if `enabled`, else [`DeviceTimer::disabled`].
    pub fn start_if(enabled: bool, device: &Arc<dyn Device>) -> Result<DeviceTimer> {
        if enabled {
            DeviceTimer::start(device)
        } else {
            Ok(DeviceTimer::disabled())
        }
    }

    /// Whether a start marker was recorded (so `stop` will give a figure).
    pub fn is_timing(&self) -> bool {
        self.start.is_some()
    }

    /// Queue the end marker and return the device seconds since the start; waits for the device to reach the end
    /// marker. `None` when the timer is disabled or the device has no markers.
    pub fn stop(mut self) -> Result<Option<f64>> {
        let Some((device, start)) = self.start.take() else { return Ok(None) };
        let result = match device.record_marker() {
            Ok(Some(end)) => {
                let seconds = device.marker_elapsed(start, end);
                device.release_marker(end);
                seconds.map(Some)
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        device.release_marker(start);
        result
    }
}

impl Drop for DeviceTimer {
    fn drop(&mut self) {
        if let Some((device, start)) = self.start.take() {
            device.release_marker(start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::ReferenceDevice;
    use crate::{BufferId, DType, DeviceInfo, Error, Layout, Op, OpCall, TensorDesc};
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// The reference device with a fake clock: every executed op takes 0.25 s of "device time", and markers
    /// read that clock.
    #[derive(Default)]
    struct Clocked {
        inner: ReferenceDevice,
        state: Mutex<ClockState>,
    }
    #[derive(Default)]
    struct ClockState {
        now: f64,
        next_id: u64,
        live: BTreeMap<u64, f64>,
        recorded: usize,
    }

    impl Device for Clocked {
        fn info(&self) -> DeviceInfo {
            self.inner.info()
        }
        fn alloc(&self, bytes: usize) -> Result<BufferId> {
            self.inner.alloc(bytes)
        }
        fn free(&self, b: BufferId) {
            self.inner.free(b)
        }
        fn upload(&self, b: BufferId, o: usize, d: &[u8]) -> Result<()> {
            self.inner.upload(b, o, d)
        }
        fn download(&self, b: BufferId, o: usize, d: &mut [u8]) -> Result<()> {
            self.inner.download(b, o, d)
        }
        fn copy_buffer(&self, s: BufferId, so: usize, d: BufferId, d_o: usize, n: usize) -> Result<()> {
            self.inner.copy_buffer(s, so, d, d_o, n)
        }
        fn supports(&self, call: &OpCall) -> bool {
            self.inner.supports(call)
        }
        fn execute(&self, call: &OpCall) -> Result<()> {
            self.state.lock().unwrap().now += 0.25;
            self.inner.execute(call)
        }
        fn synchronize(&self) -> Result<()> {
            Ok(())
        }
        fn record_marker(&self) -> Result<Option<MarkerId>> {
            let mut s = self.state.lock().unwrap();
            s.next_id += 1;
            let (id, now) = (s.next_id, s.now);
            s.live.insert(id, now);
            s.recorded += 1;
            Ok(Some(MarkerId(id)))
        }
        fn marker_elapsed(&self, start: MarkerId, end: MarkerId) -> Result<f64> {
            let s = self.state.lock().unwrap();
            let at = |m: MarkerId| s.live.get(&m.0).copied().ok_or_else(|| Error::msg(format!("no marker {m:?}")));
            Ok(at(end)? - at(start)?)
        }
        fn release_marker(&self, marker: MarkerId) {
            self.state.lock().unwrap().live.remove(&marker.0);
        }
    }

    fn fill(device: &dyn Device, n: usize) {
        let buffer = device.alloc(4).unwrap();
        let out = [TensorDesc { buffer, dtype: DType::F32, layout: Layout::contiguous(&[1]) }];
        for _ in 0..n {
            device.execute(&OpCall { op: Op::Fill { value: 1.0 }, inputs: &[], outputs: &out }).unwrap();
        }
        device.free(buffer);
    }

    #[test]
    fn timer_measures_device_time_between_markers_and_releases_them() {
        let clocked = Arc::new(Clocked::default());
        let device: Arc<dyn Device> = clocked.clone();
        let t = DeviceTimer::start(&device).unwrap();
        assert!(t.is_timing());
        fill(device.as_ref(), 3);
        assert_eq!(t.stop().unwrap(), Some(0.75));
        let s = clocked.state.lock().unwrap();
        assert_eq!(s.recorded, 2);
        assert!(s.live.is_empty(), "markers leaked: {:?}", s.live);
    }

    #[test]
    fn a_dropped_timer_releases_its_marker_and_a_disabled_one_records_nothing() {
        let clocked = Arc::new(Clocked::default());
        let device: Arc<dyn Device> = clocked.clone();
        drop(DeviceTimer::start(&device).unwrap());
        assert!(clocked.state.lock().unwrap().live.is_empty());

        let t = DeviceTimer::start_if(false, &device).unwrap();
        assert!(!t.is_timing());
        fill(device.as_ref(), 1);
        assert_eq!(t.stop().unwrap(), None);
        assert_eq!(clocked.state.lock().unwrap().recorded, 1, "only the dropped timer recorded a marker");
    }

    #[test]
    fn a_device_without_markers_gives_none() {
        let device: Arc<dyn Device> = Arc::new(ReferenceDevice::new());
        assert_eq!(device.record_marker().unwrap(), None);
        let t = DeviceTimer::start(&device).unwrap();
        assert!(!t.is_timing());
        fill(device.as_ref(), 2);
        assert_eq!(t.stop().unwrap(), None);
        assert!(device.marker_elapsed(MarkerId(1), MarkerId(2)).is_err());
    }
}

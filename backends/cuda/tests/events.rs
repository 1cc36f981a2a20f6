//! `--benchmark` timing markers as CUDA events: recorded on the device's stream, timing the work queued between
//! them, released and reused. Skips (with the reason) when no CUDA device is usable.

mod common;

use common::gpu;
use sd3_core::{DType, DeviceTimer, Result};
use std::time::Instant;

#[test]
fn markers_time_the_work_queued_between_them() -> Result<()> {
    let Some(b) = gpu() else { return Ok(()) };
    let device = b.device();
    let x = b.full(&[2048, 2048], DType::F32, 0.5)?;
    x.matmul(&x)?; // warm-up: cuBLAS handles, kernels
    b.synchronize()?;

    // Ten 2048² f32 products (~170 GFLOP) between two markers; the host returns long before the GPU finishes.
    let wall = Instant::now();
    let timer = DeviceTimer::start(device)?;
    assert!(timer.is_timing(), "the CUDA device has markers");
    for _ in 0..10 {
        x.matmul(&x)?;
    }
    let device_seconds = timer.stop()?.expect("a device figure");
    let wall_seconds = wall.elapsed().as_secs_f64();
    eprintln!("10 matmuls 2048² f32: device {device_seconds:.6} s, wall {wall_seconds:.6} s");
    assert!(device_seconds > 1e-4, "{device_seconds}");
    assert!(device_seconds <= wall_seconds, "device {device_seconds} s > wall {wall_seconds} s");

    // Nothing queued between two markers: (almost) no device time.
    let (a, c) = (device.record_marker()?.unwrap(), device.record_marker()?.unwrap());
    let empty = device.marker_elapsed(a, c)?;
    assert!((0.0..1e-3).contains(&empty), "{empty}");
    device.release_marker(a);
    device.release_marker(c);
    let e = device.marker_elapsed(a, c).unwrap_err().to_string();
    assert!(e.contains("is not live"), "{e}");

    // Released events are reused: a hundred timers in a row create no new event and leave none live.
    let stat = |key: &str| -> u64 {
        let line = device.stats().into_iter().find(|l| l.starts_with(&format!("{key}="))).unwrap();
        line[key.len() + 1..].parse().unwrap()
    };
    let created = stat("marker_events_created");
    assert!((2..=4).contains(&created), "{created}");
    for _ in 0..100 {
        let t = DeviceTimer::start(device)?;
        x.add(&x)?;
        assert!(t.stop()?.unwrap() >= 0.0);
    }
    assert_eq!(stat("marker_events_created"), created);
    assert_eq!(stat("markers_live"), 0);
    Ok(())
}

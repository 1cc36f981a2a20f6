//! The OpenCL device as a whole: enumeration, clear errors (invalid device, out of memory, kernel build
//! failure with its log), the on-disk program cache (including a corrupt entry), and the plugin loaded through
//! the C ABI, and timing markers. Skips, with the reason printed, only on a machine without an OpenCL platform.

mod common;

use sd3_backend_opencl::{OpenClDevice, OpenClProvider};
use sd3_core::{Backend, BackendProvider, DType, Device, Error};
use std::path::PathBuf;

fn provider() -> Option<OpenClProvider> {
    common::device()?;
    Some(OpenClProvider::new().unwrap())
}

#[test]
fn enumerates_devices_with_their_properties() {
    let Some(p) = provider() else { return };
    assert_eq!(p.name(), "opencl");
    assert!(p.device_count() >= 1);
    let info = common::device().unwrap().info();
    assert!(!info.name.is_empty());
    assert!(info.memory_bytes > 0, "{info:?}");
    for key in ["platform=", "driver=", "cl_khr_fp16="] {
        assert!(info.capabilities.iter().any(|c| c.starts_with(key)), "{key} missing in {:?}", info.capabilities);
    }
}

#[test]
fn invalid_device_index_is_a_clear_error() {
    let Some(p) = provider() else { return };
    sd3_core::testing::provider::invalid_device_index_is_a_clear_error(&p);
}

#[test]
fn allocation_beyond_the_device_is_out_of_memory() {
    let Some(dev) = common::device() else { return };
    let too_big = dev.cl_device().max_alloc as usize + 1;
    match dev.alloc(too_big) {
        Err(Error::OutOfMemory { requested, detail, .. }) => {
            assert_eq!(requested, too_big as u64);
            assert!(detail.contains("largest single allocation"), "{detail}");
        }
        other => panic!("expected out of memory, got {other:?}"),
    }
}

#[test]
fn kernel_build_failure_carries_the_build_log() {
    let Some(dev) = common::device() else { return };
    let src = "kernel void broken(global float *x) { x[0] = not_declared_anywhere; }";
    let err = dev.program("broken", src, "").expect_err("a broken kernel does not build").to_string();
    assert!(err.contains("build log") && err.contains("not_declared_anywhere"), "{err}");
}

#[test]
fn corrupt_cache_entry_is_rebuilt() {
    let Some(p) = provider() else { return };
    let dir = std::env::temp_dir().join(format!("sd3-opencl-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let src = "kernel void twice(global float *x) { x[get_global_id(0)] *= 2.0f; }";
    let open = || OpenClDevice::open_with_cache_dir(p.devices()[0].clone(), Some(dir.clone())).unwrap();
    let stat = |d: &OpenClDevice, key: &str| d.stats().into_iter().find(|l| l.starts_with(key)).unwrap();

    let first = open();
    first.program("twice", src, "").unwrap();
    assert_eq!(stat(&first, "opencl.programs_built"), "opencl.programs_built=1");
    let entries: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");

    // A fresh device loads the entry instead of compiling.
    let second = open();
    second.program("twice", src, "").unwrap();
    assert_eq!(stat(&second, "opencl.programs_loaded_from_cache"), "opencl.programs_loaded_from_cache=1");

    // Flip bytes in the middle: detected, rebuilt from source, and the entry rewritten.
    let mut bytes = std::fs::read(&entries[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 8].iter_mut().for_each(|b| *b ^= 0x5a);
    std::fs::write(&entries[0], &bytes).unwrap();
    let third = open();
    third.program("twice", src, "").unwrap();
    assert_eq!(stat(&third, "opencl.cache_entries_rebuilt"), "opencl.cache_entries_rebuilt=1");
    assert_eq!(stat(&third, "opencl.programs_built"), "opencl.programs_built=1");
    let fourth = open();
    fourth.program("twice", src, "").unwrap();
    assert_eq!(stat(&fourth, "opencl.programs_loaded_from_cache"), "opencl.programs_loaded_from_cache=1");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn runs_through_the_plugin_abi() {
    if provider().is_none() {
        return;
    }
    let ocl = sd3_core::testing::provider::runs_through_the_plugin_abi("opencl");
    // Timing markers cross the boundary too (ABI 1.1).
    let dev = ocl.device();
    let (a, b) = (dev.record_marker().unwrap().unwrap(), dev.record_marker().unwrap().unwrap());
    assert!(dev.marker_elapsed(a, b).unwrap() >= 0.0);
    dev.release_marker(a);
    dev.release_marker(b);
}

/// Device time between two markers around a matmul: positive, and not more than the wall time that encloses
/// both markers. A released marker is an error, not a crash.
#[test]
fn timing_markers_measure_queued_work() {
    let Some(dev) = common::device() else { return };
    let b = Backend::new("opencl", dev.clone());
    let x = b.from_f32(&vec![0.5f32; 384 * 384], &[384, 384], DType::F32).unwrap();
    let wall = std::time::Instant::now();
    let start = dev.record_marker().unwrap().expect("the queue has profiling enabled");
    let y = x.matmul(&x).unwrap();
    let end = dev.record_marker().unwrap().unwrap();
    let seconds = dev.marker_elapsed(start, end).unwrap();
    let enclosing = wall.elapsed().as_secs_f64();
    assert!(seconds > 0.0 && seconds <= enclosing + 1e-3, "device {seconds} s, wall {enclosing} s");
    drop(y);
    dev.release_marker(start);
    assert!(matches!(dev.marker_elapsed(start, end), Err(Error::InvalidArgument(_))));
    dev.release_marker(end);
    assert!(dev.stats().contains(&"opencl.queue_profiling=on".to_string()), "{:?}", dev.stats());
}

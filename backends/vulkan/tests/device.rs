//! The Vulkan device as a whole: enumeration and properties, clear errors (invalid device, out of memory,
//! views beyond `maxStorageBufferRange`), buffers larger than one binding, large grids, a group norm over
//! more elements than one workgroup can loop over on lavapipe, and the plugin loaded through the C ABI.
//! Skips, with the reason printed, only on a machine without a Vulkan loader or device.

mod common;

use sd3_backend_vulkan::VulkanProvider;
use sd3_core::plugin::PluginLibrary;
use sd3_core::reference::ReferenceDevice;
use sd3_core::{Backend, BackendProvider, BufferId, DType, Device, Error, Layout, Op, OpCall, TensorDesc};
use std::sync::Arc;

fn provider() -> Option<VulkanProvider> {
    common::device()?;
    Some(VulkanProvider::new().unwrap())
}

fn f32_desc(buffer: BufferId, layout: Layout) -> TensorDesc {
    TensorDesc { buffer, dtype: DType::F32, layout }
}

#[test]
fn enumerates_devices_with_their_properties() {
    let Some(p) = provider() else { return };
    assert_eq!(p.name(), "vulkan");
    assert!(p.device_count() >= 1);
    let info = common::device().unwrap().info();
    assert!(!info.name.is_empty());
    for key in [
        "vulkan_api=",
        "vendor_id=",
        "driver=",
        "memory_heaps=",
        "shaderFloat16=",
        "VK_KHR_cooperative_matrix=",
        "maxStorageBufferRange=",
        "maxComputeWorkGroupCount=",
    ] {
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
    match dev.alloc(1usize << 50) {
        Err(Error::OutOfMemory { requested, .. }) => assert!(requested >= 1 << 50),
        other => panic!("expected out of memory, got {other:?}"),
    }
}

/// A buffer larger than `maxStorageBufferRange`: views near its end are bound at their own span; a view
/// spanning more than one binding is refused with an error naming the limit.
#[test]
fn buffers_beyond_one_binding() {
    let Some(dev) = common::device() else { return };
    let max_range = dev.phys.limits.max_storage_buffer_range as usize;
    if max_range > 1 << 30 {
        eprintln!("SKIPPED: maxStorageBufferRange is {max_range} bytes; the test allocates more than that");
        return;
    }
    let elems = max_range / 4 + 4096;
    let big = dev.alloc(elems * 4).unwrap();
    let tail: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let start = elems - 1003;
    dev.upload(big, start * 4, &DType::F32.f32_to_bytes(&tail)).unwrap();
    let out = dev.alloc(1000 * 4).unwrap();
    let src = f32_desc(big, Layout { shape: vec![10, 100], strides: vec![100, 1], offset: start });
    let dst = f32_desc(out, Layout::contiguous(&[10, 100]));
    dev.execute(&OpCall { op: Op::Copy, inputs: std::slice::from_ref(&src), outputs: std::slice::from_ref(&dst) })
        .unwrap();
    let mut bytes = vec![0u8; 4000];
    dev.download(out, 0, &mut bytes).unwrap();
    assert_eq!(DType::F32.bytes_to_f32(&bytes), tail);
    // A view from the first to the last element cannot be bound.
    let whole = f32_desc(big, Layout { shape: vec![2], strides: vec![elems - 1], offset: 0 });
    let two = f32_desc(out, Layout::contiguous(&[2]));
    let err = dev
        .execute(&OpCall { op: Op::Copy, inputs: std::slice::from_ref(&whole), outputs: std::slice::from_ref(&two) })
        .unwrap_err();
    assert!(err.to_string().contains("maxStorageBufferRange"), "{err}");
    // ... so the device declines it, and the core runs it on the host: a tensor larger than one binding (the VAE's
    // activations at 1024² on lavapipe) still computes, with the fallback counted.
    let call = OpCall { op: Op::Copy, inputs: std::slice::from_ref(&whole), outputs: std::slice::from_ref(&two) };
    assert!(!dev.supports(&call));
    dev.free(big);
    dev.free(out);
    let vk = Backend::with_fallback("vulkan", dev.clone(), Arc::new(ReferenceDevice::new()), false);
    let x: Vec<f32> = (0..elems).map(|i| (i % 977) as f32 - 400.0).collect();
    let y = vk.from_f32(&x, &[elems], DType::F32).unwrap().affine(0.5, 1.0).unwrap().to_f32_vec().unwrap();
    assert!(y.iter().zip(&x).all(|(y, x)| *y == x * 0.5 + 1.0));
    assert_eq!(vk.fallback_counts().get("affine"), Some(&1), "{:?}", vk.fallback_counts());
}

/// More elements than one row of workgroups covers (65535 · 256).
#[test]
fn fill_and_affine_beyond_one_grid_row() {
    let Some(dev) = common::device() else { return };
    let n = 65535 * 256 + 1000;
    let buf = dev.alloc(n * 4).unwrap();
    let y = f32_desc(buf, Layout::contiguous(&[n]));
    dev.execute(&OpCall { op: Op::Fill { value: 1.5 }, inputs: &[], outputs: std::slice::from_ref(&y) }).unwrap();
    let out = dev.alloc(n * 4).unwrap();
    let z = f32_desc(out, Layout::contiguous(&[n]));
    let op = Op::Affine { mul: 2.0, add: 1.0 };
    dev.execute(&OpCall { op, inputs: std::slice::from_ref(&y), outputs: std::slice::from_ref(&z) }).unwrap();
    let mut bytes = vec![0u8; n * 4];
    dev.download(out, 0, &mut bytes).unwrap();
    let v = DType::F32.bytes_to_f32(&bytes);
    assert!(v.iter().all(|&x| x == 4.0), "first wrong element at {:?}", v.iter().position(|&x| x != 4.0));
    dev.free(buf);
    dev.free(out);
    // The batches' device time, from timestamp queries, where the queue has them.
    let stats = dev.stats();
    let gpu = stats.iter().find(|l| l.starts_with("vulkan.gpu_time_ms=")).expect("gpu time stat");
    if let Ok(ms) = gpu["vulkan.gpu_time_ms=".len()..].parse::<f64>() {
        assert!(ms > 0.0, "{gpu}");
    }
}

/// Groups of four million elements (as in the VAE's last group norms at 1024²) against the reference.
#[test]
fn group_norm_over_large_groups() {
    let Some(dev) = common::device() else { return };
    let vk = Backend::new("vulkan", dev.clone());
    let reference = Backend::new("reference", Arc::new(ReferenceDevice::new()));
    let shape = [1usize, 8, 1024, 1024];
    let n: usize = shape.iter().product();
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1009) as f32 / 500.0) - 1.0 + (i / (n / 2)) as f32).collect();
    let run = |b: &Backend| -> Vec<f32> {
        let x = b.from_f32(&x, &shape, DType::F32).unwrap();
        x.group_norm(2, None, None, 1e-6).unwrap().to_f32_vec().unwrap()
    };
    let (got, want) = (run(&vk), run(&reference));
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "max |diff| {worst}");
    assert!(vk.fallback_counts().is_empty());
}

/// A reduction dim longer than lavapipe's 65535 loop iterations per invocation would allow with per-element loops.
#[test]
fn matmul_with_long_k() {
    let Some(dev) = common::device() else { return };
    let vk = Backend::new("vulkan", dev.clone());
    let reference = Backend::new("reference", Arc::new(ReferenceDevice::new()));
    let (m, k, n) = (5usize, 70_001usize, 7usize);
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 997) as f32 / 498.0) - 1.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 17 % 991) as f32 / 495.0) - 1.0).collect();
    let run = |be: &Backend| -> Vec<f32> {
        let a = be.from_f32(&a, &[m, k], DType::F32).unwrap();
        let b = be.from_f32(&b, &[k, n], DType::F32).unwrap();
        a.matmul(&b).unwrap().to_f32_vec().unwrap()
    };
    let (got, want) = (run(&vk), run(&reference));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()), "element {i}: {g} vs {w}");
    }
    assert!(vk.fallback_counts().is_empty());
}

#[test]
fn runs_through_the_plugin_abi() {
    if provider().is_some() {
        let _ = sd3_core::testing::provider::runs_through_the_plugin_abi("vulkan");
    }
}

/// The staging path of devices whose memory is not host-visible (discrete GPUs), forced on this device:
/// uploads and downloads larger than the 32 MiB staging buffer, at odd offsets, and an op in between.
#[test]
fn uploads_and_downloads_through_staging() {
    let Some(p) = provider() else { return };
    let dev = p.open_with(0, true).unwrap();
    assert!(dev.stats().contains(&"vulkan.host_visible_memory=false".to_string()), "{:?}", dev.stats());
    let n = (40 << 20) / 4 + 3;
    let data: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 - 500.0).collect();
    let buf = dev.alloc(n * 4 + 8).unwrap();
    dev.upload(buf, 4, &DType::F32.f32_to_bytes(&data)).unwrap();
    let out = dev.alloc(n * 4).unwrap();
    let x = f32_desc(buf, Layout { shape: vec![n], strides: vec![1], offset: 1 });
    let y = f32_desc(out, Layout::contiguous(&[n]));
    let op = Op::Affine { mul: 0.5, add: 1.0 };
    dev.execute(&OpCall { op, inputs: std::slice::from_ref(&x), outputs: std::slice::from_ref(&y) }).unwrap();
    let mut bytes = vec![0u8; n * 4 - 2];
    dev.download(out, 2, &mut bytes).unwrap();
    let mut want = DType::F32.f32_to_bytes(&data.iter().map(|v| v * 0.5 + 1.0).collect::<Vec<_>>());
    want.drain(..2);
    want.truncate(n * 4 - 2);
    assert!(bytes == want, "staged round trip differs");
}

/// `--benchmark` timing markers from timestamp queries: ordered, non-negative, bracketing real work (a long matmul
/// takes measurable device time), released slots reused, unknown markers an error; and the same through the
/// plugin's C ABI (ABI 1.1 markers).
#[test]
fn timing_markers_from_timestamp_queries() {
    let Some(p) = provider() else { return };
    let dev: Arc<dyn Device> = Arc::new(p.open(0).unwrap());
    if dev.info().capabilities.iter().any(|c| c.ends_with("timestampValidBits=0")) {
        assert!(dev.record_marker().unwrap().is_none());
        return;
    }
    let check = |dev: Arc<dyn Device>| {
        let vk = Backend::new("vulkan", dev.clone());
        let a = vk.from_f32(&vec![0.5; 256 * 1024], &[256, 1024], DType::F32).unwrap();
        let b = vk.from_f32(&vec![0.25; 1024 * 256], &[1024, 256], DType::F32).unwrap();
        vk.synchronize().unwrap();
        let m0 = dev.record_marker().unwrap().expect("a device with timestamps records markers");
        let y = a.matmul(&b).unwrap();
        let m1 = dev.record_marker().unwrap().unwrap();
        let m2 = dev.record_marker().unwrap().unwrap();
        let work = dev.marker_elapsed(m0, m1).unwrap();
        assert!(work > 0.0 && work < 60.0, "matmul took {work} s of device time");
        let nothing = dev.marker_elapsed(m1, m2).unwrap();
        assert!((0.0..work).contains(&nothing), "{nothing} s between adjacent markers vs {work} s of matmul");
        assert_eq!(y.to_f32_vec().unwrap()[0], 0.5 * 0.25 * 1024.0);
        for m in [m0, m1, m2] {
            dev.release_marker(m);
        }
        assert!(dev.marker_elapsed(m0, m1).is_err(), "a released marker is not live");
        // Slots come back: more markers over time than the pool holds at once.
        for _ in 0..300 {
            let m = dev.record_marker().unwrap().unwrap();
            dev.release_marker(m);
        }
    };
    check(dev.clone());
    assert!(dev.stats().contains(&"vulkan.markers_live=0".to_string()), "{:?}", dev.stats());
    let lib = PluginLibrary::open(&sd3_core::testing::provider::plugin_path("vulkan")).unwrap();
    let plugin = lib.init("").unwrap();
    check(plugin.open_device(0).unwrap());
}

/// Freed dedicated blocks (buffers above the 256 MiB block size) are destroyed only once the queue is idle; with two
/// command buffers in flight and no host wait, a long run of large temporaries must still not pile up.
#[test]
fn freed_large_buffers_do_not_pile_up_without_waits() {
    let Some(dev) = common::device() else { return };
    let retired = |dev: &sd3_backend_vulkan::VulkanDevice| -> u64 {
        let s = dev.stats();
        let line = s.iter().find_map(|l| l.strip_prefix("vulkan.retired_bytes=")).expect("retired_bytes stat");
        line.parse().unwrap()
    };
    let small = dev.alloc(4096).unwrap();
    let y = f32_desc(small, Layout::contiguous(&[1024]));
    let fill = Op::Fill { value: 1.0 };
    let mut peak = 0;
    for _ in 0..8 {
        let big = dev.alloc(300 << 20).unwrap();
        let x = f32_desc(big, Layout::contiguous(&[1024]));
        for _ in 0..300 {
            dev.execute(&OpCall { op: fill, inputs: &[], outputs: std::slice::from_ref(&x) }).unwrap();
            dev.execute(&OpCall { op: Op::Copy, inputs: std::slice::from_ref(&x), outputs: std::slice::from_ref(&y) })
                .unwrap();
        }
        dev.free(big);
        peak = peak.max(retired(&dev));
    }
    assert!(peak <= (1 << 30) + (300 << 20), "{peak} bytes of freed blocks waiting");
    dev.synchronize().unwrap();
    assert_eq!(retired(&dev), 0);
    dev.free(small);
}

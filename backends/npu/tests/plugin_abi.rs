//! The NPU stub as the host sees it: `libsd3_backend_npu.so` loaded through the C ABI (`sd3_core::plugin`),
//! initialised with an options string, its ops checked against the reference device across the boundary.

use sd3_core::plugin::PluginLibrary;
use sd3_core::reference::ReferenceDevice;
use sd3_core::{Backend, BackendProvider, DType, DeviceKind, Op, Tensor};
use std::sync::Arc;

fn close(a: &Tensor, b: &Tensor) {
    let (x, y) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        assert!((p - q).abs() <= 5e-5 * (1.0 + q.abs()), "element {i}: {p} vs {q}");
    }
}

#[test]
fn loads_through_the_c_abi() {
    std::env::set_var("FLAGS_use_stride_kernel", "0");
    std::env::set_var("FLAGS_npu_scale_aclnn", "True");
    let path = sd3_core::testing::provider::plugin_path("npu");

    // A plugin option of the wrong type fails init with a message the host can show.
    let lib = PluginLibrary::open(&path).unwrap();
    assert_eq!(lib.name(), "npu");
    let err = lib.init("arena_mb=lots").err().expect("bad option rejected").to_string();
    assert!(err.contains("arena_mb=`lots`"), "{err}");

    let provider = PluginLibrary::open(&path).unwrap().init("arena_mb=64;some_other_backend_key=1").unwrap();
    assert_eq!(provider.device_count(), 1);
    let dev = provider.open_device(0).unwrap();
    let info = dev.info();
    assert_eq!(info.kind, DeviceKind::Npu);
    assert_eq!(info.memory_bytes, 64 << 20);
    for line in ["FLAGS_use_stride_kernel=0", "FLAGS_npu_scale_aclnn=1", "FLAGS_npu_storage_format=0"] {
        assert!(info.capabilities.iter().any(|c| c == line), "{line} not in {:?}", info.capabilities);
    }

    let npu = Backend::new("npu", dev.clone());
    let reff = Backend::new("reference", Arc::new(ReferenceDevice::new()));
    let a: Vec<f32> = (0..6 * 40).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let w: Vec<f32> = (0..40 * 9).map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0).collect();
    let run = |b: &Backend| {
        let x = b.from_f32(&a, &[6, 40], DType::F32).unwrap();
        let wt = b.from_f32(&w, &[9, 40], DType::F32).unwrap().transpose(0, 1).unwrap();
        let y = b.empty(&[6, 9], DType::F32).unwrap();
        b.run(Op::Matmul { bias: false, act: None }, &[&x, &wt], &[&y]).unwrap();
        let z = b.empty(&[6, 9], DType::F32).unwrap();
        b.run(Op::Affine { mul: 0.5, add: 0.25 }, &[&y], &[&z]).unwrap();
        z
    };
    close(&run(&npu), &run(&reff));
    let stats = dev.stats();
    assert!(stats.iter().any(|l| l == "contiguous_copies=1"), "the transposed weight was copied: {stats:?}");
    assert!(stats.iter().any(|l| l == "affine.aclnn_muls_adds=1"), "{stats:?}");

    // Out of memory crosses the boundary as an out-of-memory status with the plugin's message.
    let err = npu.empty(&[100 << 20], DType::U8).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("allocator_strategy=auto_growth") && msg.contains("104857600"), "{msg}");
}

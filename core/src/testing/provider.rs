//! Checks of a backend as a whole that every GPU backend's `tests/device.rs` runs the same way: a clear error for
//! a device index that does not exist, and the plugin library loaded through the C ABI (ops and an out-of-memory
//! error crossing the boundary). Like the rest of [`testing`](super), they panic on failure.

use crate::plugin::PluginLibrary;
use crate::reference::ReferenceDevice;
use crate::{Backend, BackendProvider, DType, Error, Tensor};
use std::path::PathBuf;
use std::sync::Arc;

/// Opening device `device_count() + 7` fails with [`Error::InvalidArgument`] saying there is no such device.
pub fn invalid_device_index_is_a_clear_error(provider: &dyn BackendProvider) {
    let index = provider.device_count() + 7;
    let err = provider.open_device(index).err().expect("opening a missing device fails");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains(&format!("no device {index}")), "{err}");
}

/// The plugin library of `backend` that cargo built with the running test: `target/<profile>/deps/` (fresh on
/// every `cargo test`), or the copy cargo uplifts beside it.
pub fn plugin_path(backend: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the test executable's folder");
    let name = crate::plugin::registry::plugin_file_name(backend);
    let beside = deps.parent().map(|d| d.join(&name));
    std::iter::once(deps.join(&name))
        .chain(beside)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found near {}", deps.display()))
}

/// Device 0 of `backend`'s plugin library, loaded and initialised (no options) through the C ABI: an f16 linear
/// layer with an f32 weight, GELU and a layer norm agree with the reference device (within 4e-3 relative, f16
/// storage), nothing falls back to the host, and an impossible allocation crosses as out of memory. Returns the
/// plugin's device, for the caller's own checks across the boundary.
pub fn runs_through_the_plugin_abi(backend: &str) -> Backend {
    let lib = PluginLibrary::open(&plugin_path(backend)).unwrap();
    assert_eq!(lib.name(), backend);
    let plugin = lib.init("").unwrap();
    let device = Backend::new(backend, plugin.open_device(0).unwrap());
    let reference = Backend::new("reference", Arc::new(ReferenceDevice::new()));
    let x: Vec<f32> = (0..5 * 24).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let w: Vec<f32> = (0..24 * 7).map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0).collect();
    let run = |b: &Backend| -> Vec<f32> {
        let x = b.from_f32(&x, &[5, 24], DType::F16).unwrap();
        let w = b.from_f32(&w, &[7, 24], DType::F32).unwrap();
        let y = x.linear(&w, None).unwrap().gelu_tanh().unwrap().layer_norm(None, None, 1e-6).unwrap();
        Tensor::to_f32_vec(&y).unwrap()
    };
    let (got, want) = (run(&device), run(&reference));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 4e-3 * (1.0 + w.abs()), "element {i}: {g} vs {w}");
    }
    assert!(device.fallback_counts().is_empty(), "{:?}", device.fallback_counts());
    let err = device.empty(&[1usize << 50], DType::U8).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err:?}");
    device
}

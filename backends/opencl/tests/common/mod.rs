//! Test harness: the OpenCL device under test, and `sd3_core::testing` (each op on this device and on the
//! reference device with identical buffers, whole output buffers compared) bound to it.

#![allow(dead_code, unused_imports)] // each test binary uses part of this module

use sd3_backend_opencl::{OpenClDevice, OpenClProvider};
pub use sd3_core::testing::{tol_for, Gen, Spec, Tol, EXACT};
use sd3_core::Op;
use std::sync::{Arc, OnceLock};

/// The OpenCL device under test (index `$SD3_OPENCL_DEVICE`, default 0), shared by the tests of a binary.
/// `None`, with the reason printed, only when the machine has no OpenCL platform or device.
pub fn device() -> Option<Arc<OpenClDevice>> {
    static DEV: OnceLock<Option<Arc<OpenClDevice>>> = OnceLock::new();
    DEV.get_or_init(|| {
        let provider = match OpenClProvider::new() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("SKIPPED: no OpenCL device: {e}");
                return None;
            }
        };
        let index = std::env::var("SD3_OPENCL_DEVICE").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        Some(Arc::new(provider.open(index).expect("opening the OpenCL device")))
    })
    .clone()
}

/// `sd3_core::testing::run_both` on this device.
pub fn run_both(op: Op, inputs: &[Spec], output: &Spec, seed: u64) -> Result<(Vec<f32>, Vec<f32>), sd3_core::Error> {
    sd3_core::testing::run_both(device().expect("device() checked by the caller").as_ref(), op, inputs, output, seed)
}

/// `sd3_core::testing::check` on this device.
pub fn check(what: &str, op: Op, inputs: &[Spec], output: &Spec, tol: Tol) {
    sd3_core::testing::check(device().expect("device() checked by the caller").as_ref(), what, op, inputs, output, tol)
}

//! The core's conformance suite (`sd3_core::conformance`) on the OpenCL device: every case must pass (the
//! matmul activation epilogues are declined; the core decomposes them). Skips, with the reason printed, only on a machine without an OpenCL platform.

mod common;

use sd3_core::Device;

#[test]
fn conformance_suite_passes() {
    let Some(dev) = common::device() else { return };
    let report = sd3_core::conformance::run(dev.as_ref(), &Default::default());
    let mut table = Vec::new();
    report.write_table(&mut table).unwrap();
    println!("{}", String::from_utf8_lossy(&table));
    println!("{}: {:?}", dev.info().name, dev.stats());
    assert!(report.all_passed(), "{}", report.summary());
    // Where the device has tensor cores, their kernels must have built (a failure would silently fall back).
    let stats = dev.stats();
    assert!(!stats.iter().any(|l| l.starts_with("opencl.mma=off")), "{stats:?}");
    // Likewise the f16-arithmetic kernels where the device reports cl_khr_fp16.
    assert!(!stats.iter().any(|l| l.starts_with("opencl.half_math=off (build failed")), "{stats:?}");
}

/// The suite's perf mode (SD3-sized shapes, device only). Ignored by default: it measures, it does not check.
/// `cargo test -p sd3-backend-opencl --test conformance -- --ignored --nocapture`
#[test]
#[ignore]
fn perf_table() {
    let Some(dev) = common::device() else { return };
    let options = sd3_core::conformance::Options { perf: true, ..Default::default() };
    let report = sd3_core::conformance::run(dev.as_ref(), &options);
    let mut table = Vec::new();
    report.write_table(&mut table).unwrap();
    println!("{}", String::from_utf8_lossy(&table));
    println!("{}: {:?}", dev.info().name, dev.stats());
}

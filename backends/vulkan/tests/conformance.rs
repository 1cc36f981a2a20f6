//! The core's conformance suite (`sd3_core::conformance`) on the Vulkan device: no case may fail (758 of 758 pass
//! on lavapipe; a device with cooperative matrices declines the f16 matmul activation epilogues, which the core
//! decomposes). Skips, with the reason printed, only on a machine without a Vulkan loader or device.

mod common;

#[test]
fn conformance_suite_passes() {
    let Some(dev) = common::device() else { return };
    let report = sd3_core::conformance::run(dev.as_ref(), &Default::default());
    let mut table = Vec::new();
    report.write_table(&mut table).unwrap();
    println!("{}", String::from_utf8_lossy(&table));
    assert!(report.all_passed(), "{}", report.summary());
}

//! The core's conformance suite (`sd3_core::conformance`) on the CPU device: every case must pass and nothing
//! may be declined. `SD3_CPU_SGEMM=0` runs it on the portable (non-AVX-512) paths.

use sd3_backend_cpu::CpuDevice;

#[test]
fn conformance_suite_passes() {
    let device = CpuDevice::new();
    let report = sd3_core::conformance::run(&device, &Default::default());
    let mut table = Vec::new();
    report.write_table(&mut table).unwrap();
    assert!(report.results.len() > 500, "only {} cases ran", report.results.len());
    assert!(report.all_passed(), "{}\n{}", report.summary(), String::from_utf8_lossy(&table));
}

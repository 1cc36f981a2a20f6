//! The conformance suite (`sd3_core::conformance`, what `sd3 conformance` runs) on the NPU stub, under the
//! seed's flag values and under the opposite of every flag. Every case must pass; none may be declined.

use sd3_backend_npu::{NpuConfig, NpuDevice, NpuFlags};
use sd3_core::conformance::{self, Options};

fn suite(flags: NpuFlags) {
    let dev = NpuDevice::new(NpuConfig::new(flags, 512 << 20)).unwrap();
    let report = conformance::run(&dev, &Options::default());
    let mut table = Vec::new();
    report.write_table(&mut table).unwrap();
    eprintln!("{flags:?}\n{}", String::from_utf8_lossy(&table));
    assert!(report.passed() > 100, "{}", report.summary());
    assert!(report.all_passed(), "{flags:?}: {}", report.summary());
    assert_eq!(report.unsupported(), 0, "{flags:?}: {}", report.summary());
}

#[test]
fn conformance_under_the_seeds_flags() {
    suite(NpuFlags::seed());
}

#[test]
fn conformance_under_the_opposite_flags() {
    suite(NpuFlags::seed_opposite());
}

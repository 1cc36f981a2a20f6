//! The conformance suite: every op × every float dtype a device claims × several shapes and layouts, compared
//! with the f64 [`ReferenceDevice`]. `docs/conformance.md` describes the method and the tolerances.
//!
//! A vendor runs it from their own tests:
//!
//! ```no_run
//! # fn device() -> std::sync::Arc<dyn sd3_core::Device> { unimplemented!() }
//! let report = sd3_core::conformance::run(device().as_ref(), &Default::default());
//! report.write_table(&mut std::io::stdout()).unwrap();
//! assert!(report.all_passed(), "{}", report.summary());
//! ```
//!
//! Each case runs on a device directly (no host fallback), so what the device declines is reported as
//! `unsupported`, not hidden.

pub mod cases;
pub mod compare;
pub mod perf;
pub mod report;
pub mod rng;
mod runner;
pub mod spec;

pub use cases::{all_cases, Case};
pub use report::{CaseResult, Failure, PerfResult, Report, Status};
pub use runner::{run_case, time_case};

use crate::reference::ReferenceDevice;
use crate::Device;
use std::time::Duration;

/// Bytes of sentinel after every output buffer.
pub const SENTINEL_BYTES: usize = 256;

/// What to run and how.
#[derive(Clone, Debug)]
pub struct Options {
    /// Run only cases whose op name (`matmul`, `unary.silu`, ...) contains this string.
    pub filter: Option<String>,
    /// Time the perf cases instead of checking the test cases.
    pub perf: bool,
    /// Base seed of the input generator (each case mixes in a hash of its id).
    pub seed: u64,
    /// Perf mode: the most timed runs per case...
    pub perf_max_runs: usize,
    /// ...and the time after which no further run starts (at least one timed run always happens).
    pub perf_budget: Duration,
    /// Print each case's id to stderr before running it, so a crash or hang can be traced to its case.
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            filter: None,
            perf: false,
            seed: 0x5D3_C0DE,
            perf_max_runs: 20,
            perf_budget: Duration::from_secs(1),
            verbose: false,
        }
    }
}

impl Options {
    fn selects(&self, case: &Case) -> bool {
        self.filter.as_deref().is_none_or(|f| case.name().contains(f))
    }
}

/// Run the suite (or, with `options.perf`, the timings) on `device` against a fresh reference device.
pub fn run(device: &dyn Device, options: &Options) -> Report {
    let dtypes = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| device.info())) {
        Ok(info) => (info.name, info.dtypes),
        Err(_) => ("(device panicked in info())".to_string(), Vec::new()),
    };
    let (name, dtypes) = dtypes;
    let cases = if options.perf { perf::perf_cases(&dtypes) } else { all_cases(&dtypes) };
    let mut report = run_cases(device, &cases, options);
    report.device = name;
    report
}

/// Run the given cases (filtered by `options.filter`).
pub fn run_cases(device: &dyn Device, cases: &[Case], options: &Options) -> Report {
    let reference = ReferenceDevice::new();
    let mut results = Vec::new();
    for case in cases.iter().filter(|c| options.selects(c)) {
        if options.verbose {
            eprintln!("conformance: {}", case.id());
        }
        results.push(if options.perf {
            time_case(device, case, options)
        } else {
            run_case(device, &reference, case, options.seed)
        });
    }
    Report { device: String::new(), perf_mode: options.perf, seed: options.seed, results }
}

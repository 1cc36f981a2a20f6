//! `sd3 conformance`: run the conformance suite (`sd3_core::conformance`) on one device, print the table,
//! optionally write the JSON report, and exit 1 on any failure.

use anyhow::Context;
use clap::Args;
use sd3_core::conformance::{self, Options};
use sd3_core::Device;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct ConformanceArgs {
    #[command(flatten)]
    pub backend: super::common::BackendArgs,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Time each op at SD3 sizes (median of repeated runs after a warm-up) instead of checking results.
    #[arg(long)]
    pub perf: bool,
    /// Run only the cases whose op name contains this (`matmul`, `attention`, `unary.silu`, ...).
    #[arg(long, value_name = "OP")]
    pub filter: Option<String>,
    /// Print each case to stderr before running it (to find the case that crashes or hangs a device).
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// Base seed of the random inputs.
    #[arg(long, default_value_t = Options::default().seed)]
    pub seed: u64,
}

pub fn run(args: ConformanceArgs) -> anyhow::Result<ExitCode> {
    let (label, device) = open_device(&args.backend)?;
    println!("conformance of backend `{label}`: {}", device.info().name);
    let options = Options {
        filter: args.filter.clone(),
        perf: args.perf,
        seed: args.seed,
        verbose: args.verbose,
        ..Options::default()
    };
    let report = conformance::run(device.as_ref(), &options);
    let mut out = std::io::stdout().lock();
    report.write_table(&mut out).context("writing the report to stdout")?;
    if !report.perf_mode {
        writeln!(out)
            .and_then(|_| report.write_op_summary(&mut out))
            .and_then(|_| writeln!(out, "{}", report.summary()))
            .context("writing the summary to stdout")?;
    }
    drop(out);
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json())
            .with_context(|| format!("writing the JSON report to {}", path.display()))?;
    }
    if report.results.is_empty() {
        match &args.filter {
            Some(f) => anyhow::bail!("no case matches --filter {f:?}"),
            None => anyhow::bail!("no case to run: the device lists no dtypes it computes in (DeviceInfo::dtypes)"),
        }
    }
    Ok(if report.all_passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The device under test, straight from its backend: no host fallback, so unsupported ops stay visible.
/// With a single `--plugin PATH` and no other `--backend`, the backend tested is that library's.
fn open_device(args: &super::common::BackendArgs) -> anyhow::Result<(String, Arc<dyn Device>)> {
    let mut req = args.request();
    let registry = sd3::runtime::discover(&req);
    if let ([path], "cpu") = (args.plugins.as_slice(), args.backend.as_str()) {
        req.backend = match (registry.from_library(path), registry.rejection_of(path)) {
            (Some(b), _) => b.name.clone(),
            (None, Some(r)) => anyhow::bail!("plugin {} was rejected: {}", path.display(), r.reason),
            (None, None) => anyhow::bail!("plugin {} was not loaded (is the path right?)", path.display()),
        };
    }
    let backend = sd3::runtime::open_backend_in(&registry, &req)?;
    Ok((backend.name().to_string(), backend.device().clone()))
}

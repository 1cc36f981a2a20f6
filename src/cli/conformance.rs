//! `sd3 conformance`: run the conformance suite (`sd3_core::conformance`) on one device, print the table,
//! optionally write the JSON report, and exit 1 on any failure.

use anyhow::Context;
use clap::Args;
use sd3_core::conformance::{self, Options};
use sd3_core::Device;
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
    /// Base seed of the random inputs.
    #[arg(long, default_value_t = Options::default().seed)]
    pub seed: u64,
}

pub fn run(args: ConformanceArgs) -> anyhow::Result<ExitCode> {
    let device = open_device(&args.backend)?;
    let options = Options { filter: args.filter.clone(), perf: args.perf, seed: args.seed, ..Options::default() };
    let report = conformance::run(device.as_ref(), &options);
    report.write_table(&mut std::io::stdout().lock()).context("writing the report to stdout")?;
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json())
            .with_context(|| format!("writing the JSON report to {}", path.display()))?;
    }
    if report.results.is_empty() {
        anyhow::bail!("no case matches --filter {:?}", args.filter.as_deref().unwrap_or(""));
    }
    Ok(if report.all_passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The device under test, straight from its backend: no host fallback, so unsupported ops stay visible.
fn open_device(args: &super::common::BackendArgs) -> anyhow::Result<Arc<dyn Device>> {
    if !args.plugins.is_empty() || !args.plugin_dirs.is_empty() {
        // TODO(conformance): open through the plugin registry once `sd3::runtime` lands on main.
        anyhow::bail!("--plugin / --plugin-dir: plugin loading is not available in this build yet");
    }
    // Referencing the CPU backend keeps its `inventory` registration in the binary.
    std::hint::black_box(sd3::cpu::cpu_device as fn() -> Arc<dyn Device>);
    let builtin = sd3_core::builtin_backends().find(|b| b.name == args.backend).with_context(|| {
        let names: Vec<&str> = sd3_core::builtin_backends().map(|b| b.name).collect();
        format!("no backend named `{}` (built in: {})", args.backend, names.join(", "))
    })?;
    let provider = (builtin.create)("").with_context(|| format!("creating backend `{}`", args.backend))?;
    let count = provider.device_count();
    if args.device >= count {
        anyhow::bail!("backend `{}` has {count} device(s); --device {} is out of range", args.backend, args.device);
    }
    provider.open_device(args.device).with_context(|| format!("opening device {} of `{}`", args.device, args.backend))
}

//! `sd3 conformance`.

use clap::Args;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ConformanceArgs {
    #[command(flatten)]
    pub backend: super::common::BackendArgs,
}

pub fn run(_args: ConformanceArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`sd3 conformance` is not implemented yet")
}

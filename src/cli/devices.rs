//! `sd3 devices`.

use clap::Args;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct DevicesArgs {
    #[command(flatten)]
    pub backend: super::common::BackendArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: DevicesArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`sd3 devices` is not implemented yet")
}

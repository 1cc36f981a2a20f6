//! Generation, the default action.

use clap::Args;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub backend: super::common::BackendArgs,
    #[arg(long)]
    pub prompt: Option<String>,
}

pub fn run(_args: GenerateArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("generation is not implemented yet")
}

//! Argument parsing and dispatch. Each subcommand lives in its own module with its own arguments.

pub mod common;
pub mod conformance;
pub mod devices;
pub mod generate;
pub mod train;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "sd3",
    version,
    about = "Stable Diffusion 3 on any accelerator",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Generation (the default action).
    #[command(flatten)]
    pub generate: generate::GenerateArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List every backend, its devices, and every plugin library found but rejected.
    Devices(devices::DevicesArgs),
    /// Check a backend against the reference semantics of every op.
    Conformance(conformance::ConformanceArgs),
    /// Fine-tune a LoRA on a few images of a subject (DreamBooth), as diffusers' train_dreambooth_lora_sd3.py.
    TrainLora(Box<train::TrainLoraArgs>),
    /// Fine-tune every parameter of the transformer on a few images of a subject (DreamBooth), as diffusers'
    /// train_dreambooth_sd3.py.
    TrainDreambooth(Box<train::DreamBoothArgs>),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Some(Command::Devices(a)) => devices::run(a),
        Some(Command::Conformance(a)) => conformance::run(a),
        Some(Command::TrainLora(a)) => train::run_lora(*a),
        Some(Command::TrainDreambooth(a)) => train::run_full(*a),
        None => generate::run(cli.generate),
    }
}

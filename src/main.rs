//! The `sd3` command line. Generation is the default action (`sd3 --backend cuda --prompt "…"`);
//! `sd3 devices` and `sd3 conformance` are subcommands.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! kproxy: a drop-in replacement for kube-proxy.

// The proxy runtime that consumes `Settings` is wired in by the integrator;
// until then most of the parsed configuration is not read.
#[allow(dead_code)]
mod cli;
#[allow(dead_code)]
mod config;

use std::process::ExitCode;

fn main() -> ExitCode {
    match config::load_settings(std::env::args_os()) {
        Ok(config::Command::Print(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok(config::Command::Run(_) | config::Command::Cleanup(_)) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kproxy: {err}");
            ExitCode::from(2)
        }
    }
}

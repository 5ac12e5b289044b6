//! kproxy: a drop-in replacement for kube-proxy.

mod backend;
mod cli;
mod config;
mod conntrack_setup;
mod dry_run;
mod logging;
mod run;
mod tools;

use std::process::ExitCode;

fn main() -> ExitCode {
    let command = match config::load_settings(std::env::args_os()) {
        Ok(command) => command,
        Err(err) => {
            eprintln!("kproxy: {err}");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        config::Command::Print(text) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        config::Command::Run(settings) => {
            logging::init(settings.log_format, settings.verbosity);
            run::run(*settings)
        }
        config::Command::Tool(settings, tool) => {
            // Tools report on stdout; logs (stderr) only when asked for with -v.
            if settings.verbosity > 0 {
                logging::init(settings.log_format, settings.verbosity);
            }
            return tools::main(*settings, tool);
        }
        config::Command::Cleanup(settings) => {
            logging::init(settings.log_format, settings.verbosity);
            backend::cleanup(&settings)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line naming the cause chain, as for config errors; some
            // causes (YAML parsers) format over several lines.
            let message = format!("{err:#}");
            let one_line: Vec<&str> = message
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("kproxy: {}", one_line.join(" "));
            ExitCode::from(1)
        }
    }
}

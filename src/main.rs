//! The `icl-embed` binary: parses the command line, runs the subcommand ([`cli`]), and prints an
//! error with its whole chain and exits with status 2 (a closed stdout ends quietly).

use std::process::ExitCode;

use clap::Parser;

mod cli;
#[cfg(feature = "serve")]
mod server;

fn main() -> ExitCode {
    match cli::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

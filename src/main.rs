//! The `dsrun` binary: parses the command line (`cli`) and reports errors; the work lives in
//! `dsrun-core`, the server and chat in this crate's library.

mod cli;

use clap::Parser;
use dsrun::error::Error;
use std::process::ExitCode;

fn main() -> ExitCode {
    quiet_mesa();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn,wgpu_hal=off")).format_timestamp(None).init();
    match cli::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`dsrun | head`) is the reader's choice, not an error worth a message.
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::FAILURE,
        // A rank other than 0 of a multi-process job: it served rank 0's steps to the end.
        Err(Error::Followed) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Mesa's drivers print "XDG_RUNTIME_DIR is invalid or not set" on every adapter query when
/// the variable is missing (containers, CI, ssh sessions); dsrun draws nothing on screen, so a
/// private directory stands in for it. Set while the process has one thread.
fn quiet_mesa() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("dsrun-xdg-runtime");
        if std::fs::create_dir_all(&dir).is_ok() {
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
}

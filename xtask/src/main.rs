//! `cargo xtask`: the project's workflows as typed subcommands.
//!
//! A dispatcher: it parses, fixes the working directory to the project root, and hands each
//! subcommand to its module. The work itself lives in the `crates/` libraries.

mod artifacts;
mod bench;
mod builds;
mod check;
mod check_macos;
mod codesign;
mod deps;
mod e2e;
mod flags;
mod guest_check;
mod image;
mod kernel;
mod nested_host;
mod progress;
mod pypi;
mod rootfs;
mod sdk;
mod verify;
mod vm;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            // As `main` returning the error would print it: the message and its causes.
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    artifacts::scrub_crate_env();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a terminal: a detached supervisor's stderr is its supervisor.log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = flags::Cli::parse();
    builds::init()?;
    // Everything works from the project root, except where there is no project tree: the bench's
    // inner run inside the nested host, and any run that builds nothing.
    if !builds::never() && !matches!(&cli.cmd, flags::Cmd::Bench(b) if !b.needs_project()) {
        std::env::set_current_dir(project_root())?;
    }
    let ok = |()| ExitCode::SUCCESS;
    match cli.cmd {
        flags::Cmd::Kernel(cmd) => cmd.run().map(ok),
        flags::Cmd::NestedHost(cmd) => cmd.run().map(ok),
        flags::Cmd::Rootfs(cmd) => cmd.run().map(ok),
        flags::Cmd::Image(cmd) => cmd.run().map(ok),
        flags::Cmd::Vm(cmd) => cmd.run(),
        flags::Cmd::E2e(cmd) => cmd.run().map(ok),
        flags::Cmd::E2eSummary(cmd) => cmd.run().map(ok),
        flags::Cmd::Test(cmd) => cmd.run().map(ok),
        flags::Cmd::Bench(cmd) => cmd.run().map(ok),
        flags::Cmd::Check(cmd) => cmd.run(),
        flags::Cmd::CheckMacos(cmd) => cmd.run().map(ok),
        flags::Cmd::Sdk(cmd) => cmd.run().map(ok),
        flags::Cmd::Verify(cmd) => cmd.run(),
        flags::Cmd::Codesign(cmd) => cmd.run().map(ok),
    }
}

/// A subcommand's exit code as the process's: 0-255 as is, anything else (a negative code from
/// a guest, say) as 1, so a failure never reads as success.
pub fn exit_code(code: i32) -> ExitCode {
    u8::try_from(code).map_or(ExitCode::FAILURE, ExitCode::from)
}

/// The workspace root: xtask lives one level below it.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_owned()
}

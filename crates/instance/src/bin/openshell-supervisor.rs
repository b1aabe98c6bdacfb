//! The supervisor of one detached gateway instance: `openshell-supervisor REQUEST.json`, started
//! only by `openshell_instance::supervise::detach` (for `vm run --detach` and the VM suites alike),
//! in its own session with its output in the instance's `supervisor.log`. A binary of its own
//! rather than a hidden xtask subcommand: the VM suites start the very program users get without
//! a developer tool in between, and what supervises a gateway carries no CLI of its own.

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Its stderr is supervisor.log: no colour escapes there.
        .with_ansi(false)
        .init();
    let mut args = std::env::args_os().skip(1);
    let (Some(path), None) = (args.next(), args.next()) else {
        eprintln!("usage: openshell-supervisor REQUEST.json (written by `cargo xtask vm run --detach`)");
        return ExitCode::from(2);
    };
    let code = openshell_instance::supervise::run_supervisor(std::path::Path::new(&path));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

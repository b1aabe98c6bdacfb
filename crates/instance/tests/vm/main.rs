//! VM suites: real VMs, booted through the library, on every backend this host can run.
//!
//! A libtest-mimic harness (`harness = false`), so nextest lists and runs each trial on its own.
//! Trials are named `<backend>::<trial>`. A trial that cannot run here (a backend the host cannot
//! run, artifacts not built) is reported ignored with the reason, never passed, and fails with that
//! reason if it is forced to run (`--run-ignored`). The artifacts come from `OPENSHELL_KERNEL` /
//! `OPENSHELL_ROOTFS` (set by `cargo xtask e2e`); with `OPENSHELL_E2E_REQUIRE=1` missing artifacts
//! fail the run instead, and `OPENSHELL_E2E_REQUIRE_BACKENDS=qemu,krun` makes a backend that cannot
//! run here a failure of each of its trials rather than an ignore.
//!
//! Every trial's VMMs are counted (see [`support::observe`]): a trial that expects a VM and
//! started none fails, and each outcome is recorded for `cargo xtask e2e`'s per-backend summary.

mod arch;
mod cli;
mod disk;
mod faults;
mod flood;
mod guest_check;
mod gvproxy;
mod image;
mod lifecycle;
mod nested;
mod profile;
mod provenance;
mod sandbox;
mod sdk;
mod stop;
mod support;
mod trials;
mod verify;

use libtest_mimic::{Arguments, Trial};

fn main() {
    if let Some(code) = support::supervisor_mode() {
        std::process::exit(code);
    }
    if let Some(code) = nested::exec_mode() {
        std::process::exit(code);
    }
    let mut args = Arguments::from_args();
    // One trial at a time per process: each trial points the VMM ledger (an environment variable
    // its child processes inherit) at its own file. nextest runs one trial per process anyway.
    args.test_threads = Some(1);
    let _records = support::Records::init();
    let mut all: Vec<Trial> = trials::all();
    all.sort_by(|a, b| a.name().cmp(b.name()));
    if all.is_empty() {
        eprintln!("no VM trials were defined: refusing to pass an empty run");
        std::process::exit(1);
    }
    libtest_mimic::run(&args, all).exit();
}

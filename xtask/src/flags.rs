//! The command line, typed in one place. `///` comments are the `--help` text.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "openshell-vm workflows: build the guest, boot it, test it")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Build the guest kernel from Debian's linux-source-6.1 (content-addressed; cached)
    Kernel(crate::kernel::KernelCmd),
    /// Bake the guest root directory: busybox, /etc basics, guest programs, manifest
    Rootfs(crate::rootfs::RootfsCmd),
    /// Run VMs
    Vm(crate::vm::VmCmd),
    /// Run the end-to-end suites against real VMs (nextest profile `e2e`)
    E2e(crate::e2e::E2eCmd),
    /// Everything CI runs: build the artifacts, then all unit tests and the VM suites
    Test(crate::e2e::TestCmd),
    /// Benchmarks that print figures (boot phases, time to mTLS SERVING, peak RSS)
    Bench(crate::bench::BenchCmd),
    /// Capability matrices: `--guest` boots a VM and checks what the guest kernel can do
    Check(crate::check::CheckCmd),
}

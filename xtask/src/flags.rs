//! The command line, typed in one place. `///` comments are the `--help` text.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "openshell-vm workflows: build the guest, boot it, test it")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

// Parsed once per process; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Cmd {
    /// Build the guest (or nested host) kernel from Debian's linux-source-6.1 (content-addressed; cached)
    Kernel(crate::kernel::KernelCmd),
    /// Build the nested host (L1 kernel with KVM, Debian root with passt) that runs the krun trials
    /// where libkrun cannot run directly
    NestedHost(crate::nested_host::NestedHostCmd),
    /// Bake the guest root directory: busybox, /etc basics, guest programs, manifest
    Rootfs(crate::rootfs::RootfsCmd),
    /// OCI images as roots: unpack an image into a verified root tree in the artifact store
    Image(crate::image::ImageCmd),
    /// Run VMs
    Vm(crate::vm::VmCmd),
    /// Run the end-to-end suites against real VMs (nextest profile `e2e`)
    E2e(crate::e2e::E2eCmd),
    /// The per-backend summary of the records of several `e2e --partition I/N` shards, as one run
    E2eSummary(crate::e2e::SummaryCmd),
    /// Everything CI runs: build the artifacts, then all unit tests and the VM suites
    Test(crate::e2e::TestCmd),
    /// Type-check and lint the workspace for aarch64-apple-darwin from Linux (clippy -D warnings;
    /// installs the target, zig and libclang it needs; links nothing)
    CheckMacos(crate::check_macos::CheckMacosCmd),
    /// Install the published OpenShell Python SDK (PyPI openshell) the suites judge the gateway with
    Sdk(crate::sdk::SdkCmd),
    /// Can this host boot the VM? One PASS/WARN/FAIL row per capability, the artifacts' provenance
    Check(crate::check::CheckCmd),
    /// Benchmarks that print figures (boot phases, time to mTLS SERVING, peak RSS)
    Bench(crate::bench::BenchCmd),
    /// Verify a running gateway: processes, 127.0.0.1-only forward, mTLS, health, digests, console
    Verify(crate::verify::VerifyCmd),
    /// macOS: sign the binaries that create VMs with the hypervisor entitlement and verify it
    /// (on Linux nothing needs signing)
    Codesign(crate::codesign::CodesignCmd),
}

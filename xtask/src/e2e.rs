//! `cargo xtask e2e --vm` and `cargo xtask test`: build what the VM suites need, then run the tests
//! through nextest with the artifacts handed over in the environment.

use anyhow::Context;
use openshell_artifacts::Store;
use xshell::{cmd, Shell};

#[derive(clap::Args)]
pub struct E2eCmd {
    /// Run the VM suites (boots real VMs on every backend this host can run)
    #[arg(long, required = true)]
    vm: bool,
    /// Extra arguments for nextest (e.g. a filter)
    #[arg(last = true)]
    nextest_args: Vec<String>,
}

#[derive(clap::Args)]
pub struct TestCmd {
    /// Extra arguments for nextest (e.g. a filter)
    #[arg(last = true)]
    nextest_args: Vec<String>,
}

/// Builds kernel, rootfs and `openshell-vmm`, and exports where they are.
fn prepare(sh: &Shell) -> anyhow::Result<()> {
    let store = Store::default_location();
    let kernel = crate::artifacts::ensure_kernel(sh, &store, openshell_artifacts::kernel::KernelRole::Guest)?;
    let rootfs = crate::artifacts::ensure_rootfs(sh, &store)?;
    crate::deps::ensure(sh, &[crate::deps::QEMU])?;
    cmd!(sh, "cargo build --quiet -p openshell-krun --bin openshell-vmm").quiet().run().context("building openshell-vmm failed")?;
    sh.set_var("OPENSHELL_KERNEL", &kernel.vmlinux);
    sh.set_var("OPENSHELL_ROOTFS", &rootfs.dir);
    sh.set_var("OPENSHELL_VMM", crate::project_root().join("target/debug/openshell-vmm"));
    // Where libkrun runs only nested, the krun trials run inside the nested host (L1).
    if openshell_vm::backend::krun_place(&openshell_vm::HostFacts::probe()) == openshell_vm::KrunPlace::NestedL1 {
        let (l1_kernel, l1_root) = crate::artifacts::ensure_nested_host(sh, &store)?;
        sh.set_var("OPENSHELL_NESTED_KERNEL", &l1_kernel.vmlinux);
        sh.set_var("OPENSHELL_NESTED_ROOT", &l1_root.dir);
    }
    // Artifacts are built: a VM trial that finds none is a failure now, not an ignore.
    sh.set_var("OPENSHELL_E2E_REQUIRE", "1");
    Ok(())
}

fn nextest_available(sh: &Shell) -> anyhow::Result<()> {
    cmd!(sh, "cargo nextest --version")
        .quiet()
        .ignore_stdout()
        .run()
        .context("cargo-nextest is missing; install it with: cargo install --locked cargo-nextest")
}

/// nextest shows ignored trials only as "skipped"; say which ones and why, so nothing that did not
/// run can be mistaken for something that passed.
fn report_ignored(sh: &Shell) -> anyhow::Result<()> {
    let list = cmd!(sh, "cargo test --quiet -p openshell-vm --test vm -- --list --ignored").read()?;
    for line in list.lines().filter_map(|l| l.strip_suffix(": test")) {
        eprintln!("ignored here: {line}");
    }
    Ok(())
}

/// Builds everything, names what will be ignored, then runs nextest's `e2e` profile on `scope`.
fn run_e2e(scope: &[&str], extra: Vec<String>) -> anyhow::Result<()> {
    let sh = Shell::new()?;
    nextest_available(&sh)?;
    prepare(&sh)?;
    report_ignored(&sh)?;
    cmd!(sh, "cargo nextest run --profile e2e {scope...} {extra...}").run().context("tests failed")?;
    Ok(())
}

impl E2eCmd {
    pub fn run(self) -> anyhow::Result<()> {
        run_e2e(&["-p", "openshell-vm", "--test", "vm"], self.nextest_args)
    }
}

impl TestCmd {
    pub fn run(self) -> anyhow::Result<()> {
        run_e2e(&["--workspace"], self.nextest_args)
    }
}

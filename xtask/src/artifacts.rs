//! Building what a VM needs, shared by the subcommands: the kernel, the guest programs, the rootfs.

use std::path::PathBuf;

use anyhow::Context;
use openshell_artifacts::kernel::{self, GuestKernel, KernelRole, KernelSpec};
use openshell_artifacts::nested_root::{self, NestedRootInputs};
use openshell_artifacts::rootfs::{self, GuestFile, RootfsBundle, RootfsInputs};
use openshell_artifacts::Store;
use xshell::{cmd, Shell};

use crate::{deps, progress};

pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Guest programs: (cargo package, binary name, path inside the guest).
const GUEST_PROGRAMS: &[(&str, &str, &str)] = &[
    ("openshell-guest", "openshell-init", "/sbin/openshell-init"),
    ("openshell-gateway", "openshell-gateway", "/usr/bin/openshell-gateway"),
    ("openshell-guest-check", "openshell-guest-check", openshell_guest::GUEST_CHECK_BIN),
];

/// Removes from this process's environment what Cargo sets for the crate it runs or tests:
/// `cargo xtask` runs xtask with xtask's `CARGO_MANIFEST_DIR` and `CARGO_PKG_*`, nextest runs a VM
/// suite (which runs xtask) with openshell-instance's, and a shell has none. They describe that crate,
/// not what xtask builds, yet a build script that reads one is rerun, and everything above it
/// rebuilt, whenever its value differs from the last build's: ring's reads `CARGO_MANIFEST_DIR`
/// and `CARGO_PKG_*`, so each change of caller rebuilt the guest programs (and the host's ring)
/// from scratch. Called once, first thing in `main`, before any thread or child exists.
pub fn scrub_crate_env() {
    const SET_FOR_CRATES: &[&str] = &[
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    let prefixes = ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_BIN_EXE_"];
    for (key, _) in std::env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        if SET_FOR_CRATES.contains(&k) || prefixes.iter().any(|p| k.starts_with(p)) {
            std::env::remove_var(k);
        }
    }
}

pub fn kernel_spec(role: KernelRole) -> anyhow::Result<KernelSpec> {
    Ok(KernelSpec::from_project(&crate::project_root().join("kernel"), role)?)
}

/// Every host package group a boot needs: the kernel's and the rootfs' build tools, and the
/// helpers the plan for `choice` and `net` names (QEMU, passt). `vm run` installs them all in one
/// round before it builds anything.
pub fn boot_packages(
    net: &openshell_vm::NetMode,
    choice: openshell_vm::VmmChoice,
    host: &openshell_vm::HostFacts,
) -> Vec<&'static [(&'static str, &'static str)]> {
    use openshell_vm::plan::{Need, Net};
    let mut groups = vec![deps::KERNEL, deps::ROOTFS];
    for need in openshell_vm::plan(host, choice, Net::of(net)).needs {
        match need {
            Need::Qemu => groups.push(deps::QEMU),
            Need::Passt => groups.push(deps::PASST),
            // `NetMode::resolve` found it already, or said how to install it; the VMM is built.
            Need::Gvproxy | Need::VmmBinary => {}
        }
    }
    groups
}

/// The `role` kernel for the current fragments, built (minutes, with progress) if the store lacks it.
pub fn ensure_kernel(sh: &Shell, store: &Store, role: KernelRole) -> anyhow::Result<GuestKernel> {
    deps::ensure(sh, &[deps::KERNEL])?;
    let spec = kernel_spec(role)?;
    if let Ok(k) = kernel::locate(store, &spec) {
        return Ok(k);
    }
    let mut progress = progress::BuildLines::new(
        format!("building the {role} kernel (about 5-10 min on 2 cores)"),
        format!("{role} kernel build"),
        200,
    );
    let built = kernel::build(store, &spec, &mut |line| progress.line(line));
    progress.finish();
    built.context("kernel build failed")
}

/// Builds the guest programs statically for the guest, in their own target dir so the host
/// build's flags and artifacts are left alone.
pub fn build_guest_programs(sh: &Shell) -> anyhow::Result<Vec<GuestFile>> {
    let target_dir = crate::project_root().join("target/guest");
    let mut sel: Vec<String> = Vec::new();
    for (pkg, bin, _) in GUEST_PROGRAMS {
        sel.extend(["-p".to_owned(), pkg.to_string(), "--bin".to_owned(), bin.to_string()]);
    }
    cmd!(sh, "cargo build --quiet --release --target {GUEST_TARGET} --target-dir {target_dir} {sel...}")
        .quiet()
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .run()
        .context("building the guest programs failed")?;
    Ok(guest_program_files())
}

/// Where the guest programs are once built (whether or not they are yet).
fn guest_program_files() -> Vec<GuestFile> {
    let release = crate::project_root().join("target/guest").join(GUEST_TARGET).join("release");
    GUEST_PROGRAMS
        .iter()
        .map(|(_, bin, dest)| GuestFile { source: release.join(bin), dest: dest.to_string(), mode: 0o755 })
        .collect()
}

/// The kernel `vm run` would boot, without building or installing anything: its `vmlinux`, or
/// what was looked for.
pub fn locate_kernel(store: &Store) -> Result<PathBuf, String> {
    let spec = kernel_spec(KernelRole::Guest)
        .map_err(|e| format!("cannot tell which kernel the current fragments need: {e:#}"))?;
    match kernel::locate(store, &spec) {
        Ok(k) => Ok(k.vmlinux),
        Err(_) => Err(format!(
            "no kernel built for the current fragments and {} (would be {})",
            spec.source_version,
            store.path(kernel::STORE_KIND, &spec.key()).display()
        )),
    }
}

/// The rootfs `vm run` would boot, without building: keyed by the guest programs as they are
/// now in `target/guest` (a `vm run` after a source change rebuilds them and bakes anew).
pub fn locate_rootfs(store: &Store) -> Result<PathBuf, String> {
    let inputs = RootfsInputs {
        busybox: PathBuf::from(rootfs::BUSYBOX),
        overlay: crate::project_root().join("rootfs"),
        programs: guest_program_files(),
    };
    if !inputs.busybox.is_file() {
        return Err(format!("{} is missing ({})", rootfs::BUSYBOX, rootfs::INSTALL_HINT));
    }
    if let Some(p) = inputs.programs.iter().find(|p| !p.source.is_file()) {
        return Err(format!("the guest programs are not built yet ({} missing)", p.source.display()));
    }
    let key = inputs.key().map_err(|e| e.to_string())?;
    store.get(rootfs::STORE_KIND, &key).ok_or_else(|| {
        format!(
            "no rootfs baked for the guest programs now in target/guest (would be {})",
            store.path(rootfs::STORE_KIND, &key).display()
        )
    })
}

pub fn rootfs_inputs(sh: &Shell) -> anyhow::Result<RootfsInputs> {
    deps::ensure(sh, &[deps::ROOTFS])?;
    Ok(RootfsInputs {
        busybox: PathBuf::from(rootfs::BUSYBOX),
        overlay: crate::project_root().join("rootfs"),
        programs: build_guest_programs(sh)?,
    })
}

pub fn ensure_rootfs(sh: &Shell, store: &Store) -> anyhow::Result<RootfsBundle> {
    let inputs = rootfs_inputs(sh)?;
    rootfs::bake(store, &inputs).context("rootfs bake failed")
}

/// The nested host (L1 of a nested boot): its kernel and its root, built if the store lacks them
/// (the kernel takes minutes; the root about a minute, from Debian's archive).
pub fn ensure_nested_host(sh: &Shell, store: &Store) -> anyhow::Result<(GuestKernel, RootfsBundle)> {
    deps::ensure(sh, &[deps::NESTED])?;
    let kernel = ensure_kernel(sh, store, KernelRole::NestedHost)?;
    let init = build_guest_programs(sh)?
        .into_iter()
        .find(|p| p.dest == "/sbin/openshell-init")
        .expect("openshell-init is a guest program");
    let inputs = NestedRootInputs::recipe(init.source);
    if let Ok(root) = nested_root::locate(store, &inputs) {
        return Ok((kernel, root));
    }
    let mut progress =
        progress::BuildLines::new("baking the nested root (Debian minbase + passt, about a minute)", "nested root", 20);
    let baked = nested_root::bake(store, &inputs, &mut |line| progress.line(line));
    progress.finish();
    Ok((kernel, baked.context("nested root bake failed")?))
}

/// The build step of a boot: what the plan for `choice` and `net` says the boot needs, installed
/// (QEMU, passt, in the one apt round of [`boot_packages`]) or built (`openshell-vmm`). Decides
/// nothing itself; the preflight then probes the host as this left it and refuses what is still missing.
pub fn ensure_vmm(sh: &Shell, choice: openshell_vm::VmmChoice, net: &openshell_vm::NetMode) -> anyhow::Result<()> {
    let host = openshell_vm::HostFacts::probe();
    deps::ensure(sh, &boot_packages(net, choice, &host))?;
    let plan = openshell_vm::plan(&host, choice, openshell_vm::plan::Net::of(net));
    if plan.needs.contains(&openshell_vm::plan::Need::VmmBinary) {
        build_vmm(sh)?;
    }
    Ok(())
}

/// Builds `openshell-vmm` where [`openshell_vm::host::vmm_binary`] finds it (beside xtask in
/// `target/debug/`), signed with the hypervisor entitlement on macOS, and returns that path: the
/// one place that builds it.
pub fn build_vmm(sh: &Shell) -> anyhow::Result<PathBuf> {
    cmd!(sh, "cargo build --quiet -p openshell-krun --bin openshell-vmm")
        .quiet()
        .run()
        .context("building openshell-vmm failed")?;
    let vmm = openshell_vm::host::vmm_binary();
    anyhow::ensure!(vmm.is_file(), "openshell-vmm was built, but {} does not exist", vmm.display());
    // A fresh link carries only the linker's ad hoc signature, without the entitlement.
    #[cfg(target_os = "macos")]
    openshell_krun::codesign::sign(&vmm).map_err(|e| anyhow::anyhow!("{e}; run `cargo xtask codesign`"))?;
    Ok(vmm)
}

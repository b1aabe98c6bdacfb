//! The arm64 guest: an `Image` cross-built from the same fragments (plus `arch-aarch64.config`) and a
//! root of arm64 busybox and init, booted by `qemu-system-aarch64 -M virt` under TCG. On an x86_64
//! host this is the only place the arm64 kernel boots before a Mac runs it; the trial proves the
//! whole exec contract on it (9p root and share, init, exit code back to the host).
//!
//! Its artifacts come from `OPENSHELL_KERNEL_AARCH64` / `OPENSHELL_ROOTFS_AARCH64`, set by
//! `cargo xtask e2e --vm`; it is a qemu trial (required with `--require-backend qemu`).

use libtest_mimic::{Failed, Trial};
use openshell_artifacts::Arch;
use openshell_vm::VmmChoice;

use crate::support::{self, Artifacts, TrialDir};

pub fn trials(required: &[String]) -> Vec<Trial> {
    let get = |k: &str| std::env::var_os(k).map(std::path::PathBuf::from).filter(|p| p.exists());
    let artifacts = match (get("OPENSHELL_KERNEL_AARCH64"), get("OPENSHELL_ROOTFS_AARCH64")) {
        (Some(kernel), Some(rootfs)) => Ok(Artifacts { kernel, rootfs }),
        _ => Err(
            "OPENSHELL_KERNEL_AARCH64/OPENSHELL_ROOTFS_AARCH64 not set to built artifacts; run `cargo xtask e2e --vm`"
                .to_owned(),
        ),
    };
    // The plan says whether this host boots an arm64 guest (QEMU's emulator for it installed).
    let plan = openshell_vm::plan_for(support::host(), VmmChoice::Auto, openshell_vm::plan::Net::None, Arch::Aarch64);
    let cannot = match (&artifacts, plan.backend) {
        (_, Err(why)) => Some(why),
        (Err(why), _) if !support::require() => Some(why.clone()),
        _ => None,
    };
    let must_run = required.iter().any(|b| b == "qemu");
    let name = "qemu::aarch64::exec_exit_code_and_arch".to_owned();
    let foreign = artifacts.clone();
    vec![
        crate::trials::trial(name, "qemu", cannot.clone(), must_run, move |dir| {
            exec_exit_code_and_arch(&artifacts.map_err(Failed::from)?, dir)
        }),
        // Boots nothing, but needs both arches' kernels as the store holds them: the host's
        // (x86_64, the only host arch that builds the other's here) and the arm64 one.
        crate::trials::trial(
            "qemu::aarch64::foreign_arch_kernel_is_refused_before_boot".to_owned(),
            "qemu",
            match Arch::host() {
                Arch::X86_64 => cannot,
                other => {
                    Some(format!("the host is {other}: this trial gives an x86_64 host's kernel to the arm64 guest"))
                }
            },
            must_run,
            move |dir| foreign_arch_kernel_is_refused(&foreign.map_err(Failed::from)?, &support::artifacts()?, dir),
        ),
    ]
}

/// Each arch's real kernel, from the store, given to the other arch's guest (`--vmm qemu`, the
/// host's arch and the arm64 one): refused before any VMM starts, with an error that names the
/// file and says which arch the kernel is for and which the guest needs; no console, no VMM log.
fn foreign_arch_kernel_is_refused(arm: &Artifacts, host: &Artifacts, dir: TrialDir) -> Result<(), Failed> {
    dir.expect_refusal_before_boot();
    let cases = [
        (
            "arm64 Image for the x86_64 guest",
            &arm.kernel,
            Arch::X86_64,
            &host.rootfs,
            "this is an arm64 kernel",
            "the x86_64 guest needs",
        ),
        (
            "x86_64 vmlinux for the arm64 guest",
            &host.kernel,
            Arch::Aarch64,
            &arm.rootfs,
            "this is an x86_64 kernel",
            "the arm64 guest needs",
        ),
    ];
    for (case, kernel, arch, rootfs, is, needs) in cases {
        let mut cfg = support::config(host, &dir, VmmChoice::Qemu, &["/bin/true"]);
        cfg.state_dir = dir.path().join(format!("state-{arch}"));
        (cfg.kernel, cfg.rootfs, cfg.arch) = (kernel.clone(), rootfs.clone(), arch);
        // The user's path: the preflight with verification required, then the launch.
        let msg =
            match openshell_instance::check::launch_checked(&cfg, openshell_instance::check::Verification::Required) {
                Ok((vm, _)) => {
                    drop(vm);
                    return Err(dir.fail(format!("{case}: the VM was started")));
                }
                Err(e) => e.to_string(),
            };
        println!("{case}: {msg}");
        let named = kernel.display().to_string();
        if let Some(w) = [named.as_str(), is, needs].iter().find(|w| !msg.contains(**w)) {
            return Err(dir.fail(format!("{case}: the error does not say {w:?}:\n{msg}")));
        }
        if let Some(f) = ["vmm.log", "console.log"].iter().find(|f| cfg.state_dir.join(f).exists()) {
            return Err(dir.fail(format!("{case}: {f} exists: a VMM was started before the refusal")));
        }
    }
    Ok(())
}

/// `uname -m` in the guest says aarch64 (the kernel that booted is the arm64 one, not a fallback)
/// and the command's exit code 7 comes back through the share.
fn exec_exit_code_and_arch(a: &Artifacts, dir: TrialDir) -> Result<(), Failed> {
    let mut cfg = support::config(a, &dir, VmmChoice::Auto, &["/bin/sh", "-c", "echo machine=$(uname -m); exit 7"]);
    cfg.arch = Arch::Aarch64;
    let started = std::time::Instant::now();
    let (code, console, dir) = support::run(&cfg, dir)?;
    support::note(format!("arm64 guest ran and exited in {:.2}s", started.elapsed().as_secs_f64()));
    let machine = console.lines().find_map(|l| l.trim().strip_prefix("machine=")).unwrap_or("(no machine= line)");
    match (code, machine) {
        (7, "aarch64") => Ok(()),
        _ => Err(dir.fail(format!("expected exit code 7 from an aarch64 guest, got {code} from machine {machine:?}"))),
    }
}

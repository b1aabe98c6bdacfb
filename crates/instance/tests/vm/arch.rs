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
    vec![crate::trials::trial(name, "qemu", cannot, must_run, move |dir| {
        exec_exit_code_and_arch(&artifacts.map_err(Failed::from)?, dir)
    })]
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

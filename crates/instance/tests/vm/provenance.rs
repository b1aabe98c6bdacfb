//! Provenance: a kernel or rootfs that no longer matches the sha256 recorded when it was built is
//! refused before any VMM starts, through the entry point `vm run` boots with
//! (`check::launch_checked`); `--allow-unverified` boots it with a warning.
//!
//! Each trial copies the real artifacts into its own directory and changes the copy; the shared
//! artifacts are never touched.

use std::path::PathBuf;

use libtest_mimic::Failed;
use openshell_artifacts::{sha256_file, Digest};
use openshell_instance::check::{self, Verification};
use openshell_instance::state::GatewayInstance;
use openshell_matrix::Status;
use openshell_vm::{VmConfig, VmError, VmmChoice};

use crate::support::{self, copy, processes_mentioning, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("provenance::tampered_rootfs_is_refused", tampered_rootfs_is_refused),
    ("provenance::tampered_kernel_is_refused", tampered_kernel_is_refused),
    ("provenance::allow_unverified_boots_with_a_warning", allow_unverified_boots_with_a_warning),
];

/// A copy of the rootfs with `/etc/hostname` changed; returns (copy, tampered file, recorded
/// digest, found digest), the digests computed here, independently of the code under test.
fn tampered_rootfs(a: &Artifacts, dir: &TrialDir) -> Result<(PathBuf, PathBuf, Digest, Digest), String> {
    let root = dir.path().join("rootfs");
    copy(&a.rootfs, &root)?;
    let file = root.join("etc/hostname");
    let recorded = sha256_file(&file).map_err(|e| e.to_string())?;
    std::fs::write(&file, "tampered\n").map_err(|e| e.to_string())?;
    let found = sha256_file(&file).map_err(|e| e.to_string())?;
    Ok((root, file, recorded, found))
}

/// The launch must fail with `Refused`, the message must carry every part, and nothing may have
/// started: no VMM log or console in the state directory, no process on the trial's paths.
fn expect_refused(cfg: &VmConfig, dir: TrialDir, parts: &[String]) -> Result<(), Failed> {
    let err = match check::launch_checked(cfg, Verification::Required) {
        Ok((vm, _)) => {
            drop(vm);
            return Err(dir.fail("a tampered artifact was booted"));
        }
        Err(e) => e,
    };
    let msg = err.to_string();
    if !matches!(err, VmError::Refused(_)) {
        return Err(dir.fail(format!("refused for another reason: {msg}")));
    }
    if let Some(missing) = parts.iter().find(|p| !msg.contains(p.as_str())) {
        return Err(dir.fail(format!("the refusal does not name {missing:?}:\n{msg}")));
    }
    for f in ["vmm.log", "console.log"] {
        if cfg.state_dir.join(f).exists() {
            return Err(dir.fail(format!("{f} exists: a VMM was started before the refusal")));
        }
    }
    let running = processes_mentioning(&dir.path().to_string_lossy());
    if !running.is_empty() {
        return Err(dir.fail(format!("processes were started: {running:?}")));
    }
    Ok(())
}

/// The default `vm run`: the gateway preset, on a rootfs with one file changed.
fn tampered_rootfs_is_refused(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    dir.expect_refusal_before_boot();
    let (root, file, recorded, found) = tampered_rootfs(a, &dir)?;
    let inst = GatewayInstance::new(&dir.path().join("gateways"), "trial").map_err(|e| e.to_string())?;
    inst.ensure_pki().map_err(|e| e.to_string())?;
    let cfg = inst
        .vm_config(a.kernel.clone(), root, ("unused", "unused"), &support::passt_forward(vmm, support::free_port()))
        .map_err(|e| e.to_string())?;
    expect_refused(&cfg, dir, &[file.display().to_string(), recorded.hex(), found.hex(), "--allow-unverified".into()])
}

/// `vm run --exec` on a kernel whose bytes changed after its provenance.json was written.
fn tampered_kernel_is_refused(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    dir.expect_refusal_before_boot();
    let kdir = dir.path().join("kernel");
    std::fs::create_dir_all(&kdir).map_err(|e| e.to_string())?;
    let src = a.kernel.parent().ok_or("kernel path has no directory")?;
    for f in ["vmlinux", "provenance.json"] {
        copy(&src.join(f), &kdir.join(f))?;
    }
    let vmlinux = kdir.join("vmlinux");
    let recorded = sha256_file(&vmlinux).map_err(|e| e.to_string())?;
    // One byte past the ELF header: still a plausible file, no longer the one that was built.
    let mut bytes = std::fs::read(&vmlinux).map_err(|e| e.to_string())?;
    bytes[4096] ^= 0xff;
    std::fs::write(&vmlinux, &bytes).map_err(|e| e.to_string())?;
    let found = Digest::of_bytes(&bytes);
    let mut cfg = support::config(a, &dir, vmm, &["/bin/true"]);
    cfg.kernel = vmlinux.clone();
    expect_refused(&cfg, dir, &[vmlinux.display().to_string(), recorded.hex(), found.hex()])
}

/// With `--allow-unverified` the same tampered rootfs boots, the guest sees the changed file, and
/// the preflight hands back the mismatch as a warning.
fn allow_unverified_boots_with_a_warning(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let (root, _, _, found) = tampered_rootfs(a, &dir)?;
    let mut cfg = support::config(a, &dir, vmm, &["/bin/cat", "/etc/hostname"]);
    cfg.rootfs = root;
    let (mut vm, pre) = match check::launch_checked(&cfg, Verification::AllowUnverified) {
        Ok(v) => v,
        Err(e) => return Err(dir.fail(format!("launch with --allow-unverified failed: {e}"))),
    };
    let code = vm.wait(None, Some(support::GUEST_TIMEOUT));
    drop(vm);
    let warned =
        pre.warnings().any(|r| r.id == "rootfs" && r.status == Status::Warn && r.reason.contains(&found.hex()));
    if !warned {
        return Err(dir.fail(format!("no rootfs warning in the preflight: {:?}", pre.matrix.rows)));
    }
    let console = std::fs::read_to_string(cfg.console_path()).unwrap_or_default();
    match code {
        Ok(openshell_vm::VmExit::Guest(0)) if console.contains("tampered") => Ok(()),
        Ok(c) => Err(dir.fail(format!("{c}; expected exit 0 and the tampered /etc/hostname on the console"))),
        Err(e) => Err(dir.fail(e.to_string())),
    }
}

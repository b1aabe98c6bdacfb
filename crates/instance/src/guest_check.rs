//! The guest capability matrix, as the host gets it: boot a VM (the exec preset) that runs
//! `openshell-guest-check`, wait for it, and read the matrix it wrote into the instance share.
//!
//! What is checked, and how, lives in the guest program (`crates/guest-check`). This module only
//! boots, waits and reads back; a guest checker that crashes, hangs or writes nothing is an error
//! (the caller's "checker failed", exit 2), never a matrix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use openshell_guest::{GUEST_CHECK_BIN, GUEST_CHECK_FILE, SHARE_MOUNT};
use openshell_matrix::Matrix;

use crate::check::Verification;
use openshell_vm::{VmConfig, VmError};

/// Boot plus every check under QEMU TCG takes well under a minute; past this the guest is stuck.
pub const TIMEOUT: Duration = Duration::from_secs(180);

/// The VM that runs the checker: the exec preset (1 vCPU, 512 MiB, no network; the checks build
/// their own networks in namespaces). Set `vmm` / `krun_vmm_binary` on it as for any VM.
pub fn config(kernel: PathBuf, rootfs: PathBuf, state_dir: PathBuf) -> VmConfig {
    let out = format!("{SHARE_MOUNT}/{GUEST_CHECK_FILE}");
    VmConfig::exec(kernel, rootfs, state_dir, vec![GUEST_CHECK_BIN.into(), "--out".into(), out])
}

/// Boots `cfg` (from [`config`]) after the preflight `vm run` passes (`verification` as for
/// `vm run`), waits for the checker and returns its matrix.
pub fn run(cfg: &VmConfig, verification: Verification) -> Result<Matrix, VmError> {
    if !cfg.rootfs.join(GUEST_CHECK_BIN.trim_start_matches('/')).is_file() {
        return Err(VmError::GuestCheck(format!(
            "{GUEST_CHECK_BIN} is not in the rootfs {}; rebake it with `cargo xtask rootfs`",
            cfg.rootfs.display()
        )));
    }
    let report = cfg.share_dir().join(GUEST_CHECK_FILE);
    // A matrix left by an earlier run in the same state dir must not pass for this one's.
    match std::fs::remove_file(&report) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(VmError::Io { path: report, source: e }),
        _ => {}
    }
    // Through the same checks as `vm run`: a kernel or rootfs that no longer matches its record
    // is refused (unless `verification` allows it), not booted and reported on.
    let (mut vm, _) = crate::check::launch_checked(cfg, verification)?;
    let exit = vm.wait(None, Some(TIMEOUT))?;
    drop(vm);
    let openshell_vm::VmExit::Guest(code) = exit else {
        return Err(VmError::GuestCheck(format!(
            "it did not finish: {exit}; console log: {}",
            cfg.console_path().display()
        )));
    };
    read_matrix(&report, code, &cfg.console_path())
}

/// The matrix the guest wrote, checked against the checker's exit code.
pub fn read_matrix(report: &Path, code: i32, console: &Path) -> Result<Matrix, VmError> {
    let text = std::fs::read_to_string(report).map_err(|e| {
        VmError::GuestCheck(format!(
            "it exited with {code} and wrote no matrix to {} ({e}); console log: {}",
            report.display(),
            console.display()
        ))
    })?;
    let matrix: Matrix = serde_json::from_str(&text).map_err(|e| {
        VmError::GuestCheck(format!(
            "its matrix {} is unreadable: {e}; console log: {}",
            report.display(),
            console.display()
        ))
    })?;
    if matrix.exit_code() != code {
        return Err(VmError::GuestCheck(format!(
            "it exited with {code} but its matrix says {}; console log: {}",
            matrix.exit_code(),
            console.display()
        )));
    }
    Ok(matrix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_matrix::Row;

    fn write(dir: &Path, m: &Matrix) -> PathBuf {
        let p = dir.join(GUEST_CHECK_FILE);
        std::fs::write(&p, m.to_json().to_string()).unwrap();
        p
    }

    #[test]
    fn matrix_round_trips_when_the_exit_code_agrees() {
        let t = tempfile::tempdir().unwrap();
        let mut m = Matrix::new("guest");
        m.push(Row::pass("netns", "ok"));
        m.push(Row::fail("landlock", "EOPNOTSUPP", "add landlock to CONFIG_LSM"));
        let p = write(t.path(), &m);
        assert_eq!(read_matrix(&p, 1, Path::new("c")).unwrap(), m);
    }

    #[test]
    fn missing_or_contradicted_matrix_is_a_checker_failure() {
        let t = tempfile::tempdir().unwrap();
        let e = read_matrix(&t.path().join("none.json"), 139, Path::new("console.log")).unwrap_err().to_string();
        assert!(e.contains("exited with 139") && e.contains("console.log"), "{e}");
        let mut m = Matrix::new("guest");
        m.push(Row::pass("netns", "ok"));
        let p = write(t.path(), &m);
        let e = read_matrix(&p, 2, Path::new("c")).unwrap_err().to_string();
        assert!(e.contains("exited with 2 but its matrix says 0"), "{e}");
        std::fs::write(&p, "not json").unwrap();
        assert!(read_matrix(&p, 0, Path::new("c")).is_err());
    }

    #[test]
    fn config_runs_the_checker_into_the_share() {
        let c = config("k".into(), "r".into(), "s".into());
        assert_eq!(c.exec.argv, [GUEST_CHECK_BIN, "--out", "/run/openshell/guest-check.json"]);
    }
}

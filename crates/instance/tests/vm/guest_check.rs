//! The guest capability matrix in a real VM: every required row passes with the project's
//! kernel, and the checker really can fail (run unprivileged, it cannot make namespaces).

use libtest_mimic::Failed;
use openshell_instance::check::Verification;
use openshell_instance::guest_check;
use openshell_matrix::{Matrix, Status};
use openshell_vm::VmmChoice;

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("guest::guest_capability_matrix_all_required_pass", all_required_pass),
    ("guest::unprivileged_guest_check_fails_netns_but_sandboxes_pass", unprivileged_fails_netns),
    ("guest::checker_that_writes_no_matrix_is_a_checker_failure", silent_checker_is_an_error),
];

fn all_required_pass(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let mut cfg = guest_check::config(a.kernel.clone(), a.rootfs.clone(), dir.path().join("state"));
    cfg.vmm = vmm;
    let matrix = match guest_check::run(&cfg, Verification::Required) {
        Ok(m) => m,
        Err(e) => return Err(dir.fail(format!("the guest checker did not run: {e}"))),
    };
    let missing: Vec<&str> =
        openshell_guest_check::row_ids().into_iter().filter(|id| matrix.row(id).is_none()).collect();
    if !missing.is_empty() {
        return Err(dir.fail(format!("the matrix lacks rows {missing:?}:\n{}", matrix.render())));
    }
    let blocking: Vec<String> =
        matrix.blocking().iter().map(|r| format!("  {}: {} (fix: {})", r.id, r.reason, r.fix)).collect();
    if !blocking.is_empty() {
        return Err(dir.fail(format!("required guest rows failed:\n{}", blocking.join("\n"))));
    }
    Ok(())
}

/// As `nobody` the network and cgroup rows must fail for lack of privilege (and say so, rather
/// than blame the kernel), while seccomp and landlock, which any process may use on itself, pass.
fn unprivileged_fails_netns(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let script = format!("{} --json", openshell_guest::GUEST_CHECK_BIN);
    let cfg = support::config(a, &dir, vmm, &["/bin/su", "-s", "/bin/sh", "nobody", "-c", &script]);
    let (code, console, dir) = support::run(&cfg, dir)?;
    let Some(matrix) = console.lines().find_map(|l| serde_json::from_str::<Matrix>(l.trim()).ok()) else {
        return Err(dir.fail(format!("no JSON matrix on the console (exit {code})")));
    };
    let row = |id: &str| matrix.row(id).cloned();
    let netns = row("netns");
    let netns_ok = netns.as_ref().is_some_and(|r| {
        r.status == Status::Fail && r.reason.contains("Operation not permitted") && r.fix.contains("as root")
    });
    let cgroup_ok = row("cgroup2-memory").is_some_and(|r| r.status == Status::Fail && r.fix.contains("as root"));
    let sandboxes_ok = ["seccomp", "landlock"].iter().all(|id| row(id).is_some_and(|r| r.status == Status::Pass));
    if code != 1 || !netns_ok || !cgroup_ok || !sandboxes_ok {
        return Err(dir.fail(format!(
            "expected exit 1, netns and cgroup rows FAIL asking for root, seccomp and landlock PASS; got exit {code}:\n{}",
            matrix.render()
        )));
    }
    Ok(())
}

/// A checker that exits 0 without writing its matrix must be an error (exit 2 for `check
/// --guest`), never an empty matrix that passes. The trial boots a copy of the rootfs whose
/// checker is replaced by a stub that says it ran and exits 0; the error must come from a guest
/// that really ran the stub and reported 0, not from a VM that never got there.
fn silent_checker_is_an_error(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let rootfs = dir.path().join("rootfs");
    let copied = std::process::Command::new("cp").arg("-a").arg(&a.rootfs).arg(&rootfs).status();
    if !copied.as_ref().is_ok_and(|s| s.success()) {
        return Err(dir.fail(format!("cannot copy the rootfs {} for this trial: {copied:?}", a.rootfs.display())));
    }
    let bin = rootfs.join(openshell_guest::GUEST_CHECK_BIN.trim_start_matches('/'));
    let stub = "#!/bin/sh\necho silent-checker-stub-ran\nexit 0\n";
    let replaced = std::fs::remove_file(&bin).and_then(|()| std::fs::write(&bin, stub)).and_then(|()| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))
    });
    if let Err(e) = replaced {
        return Err(dir.fail(format!("cannot replace {}: {e}", bin.display())));
    }
    let mut cfg = guest_check::config(a.kernel.clone(), rootfs, dir.path().join("state"));
    cfg.vmm = vmm;
    // The copy no longer matches its manifest, on purpose: boot it as `--allow-unverified` would.
    let result = guest_check::run(&cfg, Verification::AllowUnverified);
    let stub_ran = std::fs::read_to_string(cfg.console_path()).unwrap_or_default().contains("silent-checker-stub-ran");
    match result {
        Err(openshell_vm::VmError::GuestCheck(why))
            if why.contains("it exited with 0 and wrote no matrix") && stub_ran =>
        {
            Ok(())
        }
        Err(e) => Err(dir.fail(format!(
            "expected the stub to run, exit 0 and a 'wrote no matrix' failure; stub ran: {stub_ran}; got: {e}"
        ))),
        Ok(m) => Err(dir.fail(format!("a checker that wrote nothing produced a matrix:\n{}", m.render()))),
    }
}

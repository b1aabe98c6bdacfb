//! Least privilege for the VMM (`openshell_vm::sandbox`): what the running VMM and passt are
//! allowed, read from the kernel's own view of them (`/proc/<pid>/status`), and what the VMM's
//! credentials cannot open. QEMU: its uid, capabilities and seccomp mode; `openshell-vmm`: its
//! landlock confinement, probed with the VMM's own `--check-confinement` on the running VM's spec.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Instant;

use libtest_mimic::Failed;
use openshell_vm::sandbox::VMM_USER;
use openshell_vm::{NetMode, RunningVm, VmConfig, VmmChoice};

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[("sandbox::vmm_and_passt_run_unprivileged", vmm_and_passt_run_unprivileged)];

/// The guest writes into its share through the VMM, then sleeps while the host looks.
const PROOF: &str = "written-by-the-guest";

fn vmm_and_passt_run_unprivileged(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let script = format!("echo {PROOF} > /run/openshell/proof && exec /bin/sleep 600");
    let mut cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", &script]);
    cfg.net = NetMode::Passt;
    let vm = match boot_until_proof(&cfg) {
        Ok(vm) => vm,
        Err(e) => return Err(dir.fail(e)),
    };
    let checks = match vmm {
        VmmChoice::Krun => krun_is_confined(&cfg, &dir),
        VmmChoice::Qemu | VmmChoice::Auto => qemu_is_unprivileged(&vm, &cfg, &dir),
    }
    .and_then(|()| passt_is_nobody(&vm));
    drop(vm);
    checks.map_err(|e| dir.fail(e))
}

/// Boots `cfg` and waits until the guest's write reached the share (so the unprivileged VMM
/// serves it, both ways).
fn boot_until_proof(cfg: &VmConfig) -> Result<RunningVm, String> {
    let mut vm = support::launch(cfg).map_err(|e| format!("launch: {e}"))?;
    let proof = cfg.share_dir().join("proof");
    let deadline = Instant::now() + support::GUEST_TIMEOUT;
    while std::fs::read_to_string(&proof).unwrap_or_default().trim() != PROOF {
        if let Some(status) = vm.exited() {
            return Err(format!("the VMM exited ({status}) before the guest wrote {}", proof.display()));
        }
        if Instant::now() > deadline {
            return Err(format!("the guest did not write {} within {:?}", proof.display(), support::GUEST_TIMEOUT));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(vm)
}

/// `/proc/<pid>/status`'s `key:` line, its fields.
fn status(pid: u32, key: &str) -> Result<Vec<String>, String> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().map(str::to_owned).collect())
        .ok_or_else(|| format!("/proc/{pid}/status has no {key}:"))
}

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The uid and gid a helper that drops root runs as: [`VMM_USER`]'s when we are root, ours otherwise.
fn expected_ids() -> Result<(u32, u32), String> {
    if root() {
        return openshell_vm::sandbox::lookup_user(VMM_USER).ok_or_else(|| format!("no user {VMM_USER:?} here"));
    }
    Ok((nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw()))
}

fn ids_are(pid: u32, what: &str, uid: u32, gid: u32) -> Result<(), String> {
    let (uids, gids) = (status(pid, "Uid")?, status(pid, "Gid")?);
    let all = |ids: &[String], want: u32| ids.len() == 4 && ids.iter().all(|i| *i == want.to_string());
    if !all(&uids, uid) || !all(&gids, gid) {
        return Err(format!("{what} (pid {pid}) runs as Uid {uids:?} Gid {gids:?}, expected all {uid} and {gid}"));
    }
    Ok(())
}

fn qemu_is_unprivileged(vm: &RunningVm, cfg: &VmConfig, dir: &TrialDir) -> Result<(), String> {
    let pid = vm.pid();
    let (uid, gid) = expected_ids()?;
    ids_are(pid, "QEMU", uid, gid)?;
    let (caps, seccomp, groups) = (status(pid, "CapEff")?, status(pid, "Seccomp")?, status(pid, "Groups")?);
    // Seccomp 2: a filter is installed (QEMU's -sandbox); CapEff: no capability left.
    if caps != ["0000000000000000"] || seccomp != ["2"] {
        return Err(format!("QEMU (pid {pid}) has CapEff {caps:?} and Seccomp {seccomp:?}; expected no capabilities and a seccomp filter (2)"));
    }
    if root() && groups != [gid.to_string()] {
        return Err(format!("QEMU (pid {pid}) keeps supplementary groups {groups:?}; expected only {gid}"));
    }
    // It was given its files open, and names none of them by path.
    let argv = openshell_vm::procfs::argv(pid).ok_or("cannot read QEMU's command line")?;
    let by_path: Vec<&String> = argv
        .iter()
        .filter(|arg| [&cfg.kernel, &cfg.rootfs, &cfg.state_dir].iter().any(|p| arg.contains(&*p.to_string_lossy())))
        .collect();
    if !by_path.is_empty() {
        return Err(format!("QEMU's command line names host paths {by_path:?}; it should get its files as fds"));
    }
    if !root() {
        support::note("not root: QEMU runs as the caller, so there is no other uid to probe with");
        return Ok(());
    }
    // A file only root may read, in a directory anyone may enter: the VMM's uid cannot read it.
    let secret = dir.path().join("root-only");
    std::fs::write(&secret, "secret").map_err(|e| e.to_string())?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).map_err(|e| e.to_string())?;
    let read_as_vmm = |path: &Path| {
        std::process::Command::new("cat").arg(path).uid(uid).gid(gid).output().map_err(|e| format!("cat: {e}"))
    };
    // The probe itself works: a world-readable file reads.
    let control = read_as_vmm(Path::new("/etc/passwd"))?;
    if !control.status.success() {
        return Err(format!("the probe cannot read /etc/passwd as {uid}:{gid}: {control:?}"));
    }
    let denied = read_as_vmm(&secret)?;
    // Its own share, by path: out of reach too (only the fd it inherited leads there).
    let exec_json = cfg.share_dir().join(openshell_guest::EXEC_FILE);
    let own = read_as_vmm(&exec_json)?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).map_err(|e| e.to_string())?;
    let refused = |o: &std::process::Output| {
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Permission denied")
    };
    if !refused(&denied) || !refused(&own) {
        return Err(format!(
            "as QEMU's uid {uid}, reading {} gave {denied:?} and {} gave {own:?}; expected Permission denied for both",
            secret.display(),
            exec_json.display()
        ));
    }
    Ok(())
}

/// passt drops to `nobody` by itself when started as root.
fn passt_is_nobody(vm: &RunningVm) -> Result<(), String> {
    let pid = vm.passt_pid().ok_or("the VM has no passt")?;
    let (uid, gid) = expected_ids()?;
    ids_are(pid, "passt", uid, gid)
}

/// `openshell-vmm` says it is confined, and the same confinement (its own self-test on this VM's
/// spec) lets it open the kernel but not a file outside the spec, root or not.
fn krun_is_confined(cfg: &VmConfig, dir: &TrialDir) -> Result<(), String> {
    let log_path = cfg.state_dir.join("vmm.log");
    let log = std::fs::read_to_string(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    // Fully, or partially where the kernel's landlock is older than the rights named (6.1 has no
    // truncate right): the self-test below shows what the confinement does either way.
    if !log.lines().any(|l| l.starts_with("openshell-vmm: confined by landlock")) {
        return Err(format!("the VMM's log does not say it is confined: {}", support::tail(&log, 5)));
    }
    let (vmm, _) = support::plan(cfg).vmm_binary.ok_or("the plan names no openshell-vmm")?;
    let spec = cfg.state_dir.join("krun-spec.json");
    let outside = dir.path().join("outside-the-spec");
    std::fs::write(&outside, "secret").map_err(|e| e.to_string())?;
    let probe = |path: &Path| -> Result<(bool, String), String> {
        let out = std::process::Command::new(&vmm)
            .args(["--check-confinement".as_ref(), spec.as_os_str(), path.as_os_str()])
            .output()
            .map_err(|e| format!("{}: {e}", vmm.display()))?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    };
    // Control: what the VMM boots from opens under the confinement.
    let (kernel_opened, said) = probe(&cfg.kernel)?;
    if !kernel_opened {
        return Err(format!("confined as for its spec, the VMM cannot open its own kernel: {said}"));
    }
    for path in [outside.as_path(), Path::new("/etc/passwd")] {
        let (opened, said) = probe(path)?;
        if opened || !said.contains("Permission denied") {
            return Err(format!("confined as for its spec, the VMM opened {} ({said})", path.display()));
        }
    }
    Ok(())
}

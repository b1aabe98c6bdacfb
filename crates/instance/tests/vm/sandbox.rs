//! Least privilege for the VMM (`openshell_vm::sandbox`): what the running VMM and passt are
//! allowed, read from the kernel's own view of them (`/proc/<pid>/status`), and what the VMM's
//! credentials cannot open. Both VMMs: their uid, supplementary groups (exactly `/dev/kvm`'s when
//! they use KVM), capabilities and a command line naming no host path. QEMU: its seccomp mode;
//! `openshell-vmm`: its landlock confinement, probed with the VMM's own `--check-confinement` on
//! the running VMM. And the share the guest writes: the VMM's, with the PKI outside it root's.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Instant;

use libtest_mimic::Failed;
use openshell_vm::sandbox::VMM_USER;
use openshell_vm::{Backend, Net, RunningVm, VmConfig, VmmChoice};

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("sandbox::vmm_and_passt_run_unprivileged", vmm_and_passt_run_unprivileged),
    ("sandbox::gateway_share_is_the_vmms_and_the_pki_stays_roots", gateway_share_is_the_vmms_and_the_pki_stays_roots),
];

/// The guest writes into its share through the VMM, then sleeps while the host looks.
const PROOF: &str = "written-by-the-guest";

fn vmm_and_passt_run_unprivileged(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let script = format!("echo {PROOF} > /run/openshell/proof && exec /bin/sleep 600");
    let mut cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", &script]);
    cfg.net = Net::Passt;
    // A kernel on a filesystem that takes writes (the store may be a read-only mount, as in the
    // nested host): then only the VMM's confinement can refuse its write to the kernel.
    cfg.kernel = dir.path().join("vmlinux");
    if let Err(e) = std::fs::copy(&a.kernel, &cfg.kernel) {
        return Err(dir.fail(format!("copying the kernel: {e}")));
    }
    let vm = match boot_until_proof(&cfg) {
        Ok(vm) => vm,
        Err(e) => return Err(dir.fail(e)),
    };
    let checks = vmm_is_unprivileged(&vm, &cfg, &dir)
        .and_then(|()| match vm.backend {
            Backend::Krun => krun_is_confined(&vm, &cfg, &dir),
            Backend::Qemu { .. } => qemu_is_filtered(&vm),
        })
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

/// `/dev/kvm`'s group: the one supplementary group a VMM that uses KVM keeps.
fn kvm_gid() -> Result<u32, String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/dev/kvm").map(|m| m.gid()).map_err(|e| format!("/dev/kvm: {e}"))
}

/// Either VMM: [`VMM_USER`]'s ids when we are root, `/dev/kvm`'s group as its only supplementary
/// group when it uses KVM (none otherwise), no capability, its files given open (its command
/// line names none by path), and out of reach of what its uid could open by path.
fn vmm_is_unprivileged(vm: &RunningVm, cfg: &VmConfig, dir: &TrialDir) -> Result<(), String> {
    let pid = vm.pid();
    let (uid, gid) = expected_ids()?;
    ids_are(pid, "the VMM", uid, gid)?;
    let (caps, groups) = (status(pid, "CapEff")?, status(pid, "Groups")?);
    if caps != ["0000000000000000"] {
        return Err(format!("the VMM (pid {pid}) has CapEff {caps:?}; expected no capabilities"));
    }
    if root() {
        let want: Vec<String> = if vm.backend.uses_kvm() { vec![kvm_gid()?.to_string()] } else { Vec::new() };
        if groups != want {
            return Err(format!(
                "the VMM ({}, pid {pid}) has supplementary groups {groups:?}; expected exactly {want:?} ({})",
                vm.backend,
                if vm.backend.uses_kvm() { "/dev/kvm's, as it uses KVM" } else { "none, as it uses no KVM" }
            ));
        }
    }
    // It was given its files open, and names none of them by path.
    let argv = openshell_vm::procfs::argv(pid).ok_or("cannot read the VMM's command line")?;
    let by_path: Vec<&String> = argv
        .iter()
        .filter(|arg| [&cfg.kernel, &cfg.rootfs, &cfg.state_dir].iter().any(|p| arg.contains(&*p.to_string_lossy())))
        .collect();
    if !by_path.is_empty() {
        return Err(format!("the VMM's command line names host paths {by_path:?}; it should get its files as fds"));
    }
    if !root() {
        support::note("not root: the VMM runs as the caller, so there is no other uid to probe with");
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
            "as the VMM's uid {uid}, reading {} gave {denied:?} and {} gave {own:?}; expected Permission denied for both",
            secret.display(),
            exec_json.display()
        ));
    }
    Ok(())
}

/// QEMU's seccomp filter is installed (`Seccomp: 2`, its `-sandbox`).
fn qemu_is_filtered(vm: &RunningVm) -> Result<(), String> {
    let seccomp = status(vm.pid(), "Seccomp")?;
    if seccomp != ["2"] {
        return Err(format!("QEMU (pid {}) has Seccomp {seccomp:?}; expected a seccomp filter (2)", vm.pid()));
    }
    Ok(())
}

/// passt drops to `nobody` by itself when started as root.
fn passt_is_nobody(vm: &RunningVm) -> Result<(), String> {
    let pid = vm.passt_pid().ok_or("the VM has no passt")?;
    let (uid, gid) = expected_ids()?;
    ids_are(pid, "passt", uid, gid)
}

/// `openshell-vmm` says it is confined, and the same confinement (its own self-test, confined as
/// the running VMM is, with the files that VMM holds) lets it read its kernel and create a file in
/// its share, but not read a file outside its spec, write its kernel, write a file outside its
/// spec or create one there. The check runs as this process' uid (root here), which file modes
/// would let do all of it: what it is refused, landlock refuses.
fn krun_is_confined(vm: &RunningVm, cfg: &VmConfig, dir: &TrialDir) -> Result<(), String> {
    let log_path = cfg.state_dir.join("vmm.log");
    let log = std::fs::read_to_string(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    // Fully, or partially where the kernel's landlock is older than the rights named (6.1 has no
    // truncate right): the self-test below shows what the confinement does either way.
    if !log.lines().any(|l| l.starts_with("openshell-vmm: confined by landlock")) {
        return Err(format!("the VMM's log does not say it is confined: {}", support::tail(&log, 5)));
    }
    let (vmm, _) = support::plan(cfg).vmm_binary.ok_or("the plan names no openshell-vmm")?;
    let pid = vm.pid();
    let argv = openshell_vm::procfs::argv(pid).ok_or("cannot read the VMM's command line")?;
    // The VMM's files as its spec names them (its fds), which the check reaches as it does.
    let held = openshell_vm::backend::krun::KrunSpec::from_argv(&argv)?;
    let share = held
        .shares
        .iter()
        .find(|(tag, _)| tag == openshell_guest::SHARE_TAG)
        .map(|(_, dir)| dir.clone())
        .ok_or("the VMM's spec has no share")?;
    let outside = dir.path().join("outside-the-spec");
    std::fs::write(&outside, "secret").map_err(|e| e.to_string())?;
    let created_outside = dir.path().join("created-outside-the-spec");
    // Named in the VMM's terms for the check; removed here by its path on the host.
    let created_in_share = share.join("created-by-the-confinement-check");
    let created_in_share_here = cfg.share_dir().join("created-by-the-confinement-check");
    let kernel = held.kernel.display().to_string();
    let ops: Vec<(String, bool)> = vec![
        // Controls: what the VMM boots from reads, and what it serves the guest takes a new file.
        (format!("read:{kernel}"), true),
        (format!("create:{}", created_in_share.display()), true),
        (format!("read:{}", outside.display()), false),
        ("read:/etc/passwd".to_owned(), false),
        (format!("write:{kernel}"), false),
        (format!("write:{}", outside.display()), false),
        (format!("create:{}", created_outside.display()), false),
    ];
    let out = std::process::Command::new(&vmm)
        .arg("--check-confinement")
        .arg(pid.to_string())
        .args(ops.iter().map(|(op, _)| op))
        .output()
        .map_err(|e| format!("{}: {e}", vmm.display()))?;
    let _ = std::fs::remove_file(&created_in_share_here);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "the confinement check failed ({}): {said}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let lines: Vec<&str> = said.lines().collect();
    if lines.len() != ops.len() {
        return Err(format!("the confinement check answered {} of {} operations: {said}", lines.len(), ops.len()));
    }
    for ((op, allowed), line) in ops.iter().zip(&lines) {
        let ok = if *allowed { line.ends_with(": allowed") } else { line.contains(": denied: Permission denied") };
        if !ok {
            let want = if *allowed { "allowed" } else { "denied with Permission denied" };
            return Err(format!("confined as the running VMM, {op} was not {want}: {line}"));
        }
    }
    if created_outside.exists() {
        return Err(format!("the confinement check left {}", created_outside.display()));
    }
    Ok(())
}

/// The share the guest writes, during a gateway's boot: the VMM's user's, all of it (so the
/// unprivileged VMM can serve it), with the server key in it still 0600; the instance's PKI outside
/// it (`server/`, `mtls/`) stays ours, keys 0600.
fn gateway_share_is_the_vmms_and_the_pki_stays_roots(
    a: &Artifacts,
    vmm: VmmChoice,
    dir: TrialDir,
) -> Result<(), Failed> {
    crate::trials::with_gateway(a, vmm, dir, |_vm, _endpoint, inst, _digests| {
        use std::os::unix::fs::MetadataExt;
        let (vmm_uid, vmm_gid) = expected_ids()?;
        let (our_uid, our_gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
        let share = inst.vm_dir().join("share");
        let mut problems = Vec::new();
        let mut owned = |root: &Path, uid: u32, gid: u32, whose: &str| -> Result<usize, String> {
            let mut n = 0;
            for entry in walk(root)? {
                let m = std::fs::symlink_metadata(&entry).map_err(|e| format!("{}: {e}", entry.display()))?;
                n += 1;
                if (m.uid(), m.gid()) != (uid, gid) {
                    problems.push(format!("{} is {}:{}, not {whose} ({uid}:{gid})", entry.display(), m.uid(), m.gid()));
                }
            }
            Ok(n)
        };
        let in_share = owned(&share, vmm_uid, vmm_gid, "the VMM's")?;
        let pki = owned(&inst.mtls_dir(), our_uid, our_gid, "ours")?
            + owned(&inst.dir.join("server"), our_uid, our_gid, "ours")?;
        let keys = [
            share.join("tls").join(openshell_pki::SERVER_KEY_FILE),
            inst.dir.join("server").join(openshell_pki::SERVER_KEY_FILE),
            inst.mtls_dir().join(openshell_pki::CLIENT_KEY_FILE),
        ];
        for key in &keys {
            let mode = std::fs::metadata(key).map_err(|e| format!("{}: {e}", key.display()))?.mode() & 0o777;
            if mode != 0o600 {
                problems.push(format!("{} is mode {mode:o}, not 600", key.display()));
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        support::note(format!(
            "share: {in_share} entries {vmm_uid}:{vmm_gid}; PKI: {pki} entries {our_uid}:{our_gid}; keys 0600"
        ));
        if !root() {
            support::note("not root: the VMM runs as the caller, so the share and the PKI have the same owner");
        }
        Ok(())
    })
}

/// `root` and everything below it (symlinks not followed).
fn walk(root: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    let mut out = vec![root.to_owned()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        i += 1;
        let m = std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        if m.is_dir() {
            for e in std::fs::read_dir(&p).map_err(|e| format!("{}: {e}", p.display()))? {
                out.push(e.map_err(|e| format!("{}: {e}", p.display()))?.path());
            }
        }
    }
    Ok(out)
}

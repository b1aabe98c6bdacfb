//! `verify` against a real gateway: it passes on a healthy instance, names the forward when the
//! forward dies, and fails the digest row of a kernel or rootfs changed by one byte and booted
//! with `--allow-unverified` (where metadata.json and Info carry the records' digests, as with
//! `vm run`, so only the re-hash of what the VMM runs can tell). Each trial supervises its own instance the way `vm run` does (instance lock,
//! metadata.json with its pids and artifacts) under the trial's own gateways root, and its guard
//! stops the VM and passt on every path out, failure included.

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use openshell_instance::check::Verification;
use openshell_instance::state::{self, GatewayInstance};
use openshell_matrix::Status;
use openshell_vm::VmmChoice;

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("gateway::verify_passes_on_running_gateway", verify_passes_on_running_gateway),
    ("gateway::verify_fails_when_forward_is_closed", verify_fails_when_forward_is_closed),
    ("gateway::verify_fails_kernel_digest_of_tampered_kernel", verify_fails_kernel_digest_of_tampered_kernel),
    ("gateway::verify_fails_rootfs_digest_of_tampered_rootfs", verify_fails_rootfs_digest_of_tampered_rootfs),
];

/// The rows a gateway verification must have; a matrix missing one proves less than it says.
pub const ROWS: &[&str] = &[
    "supervisor",
    "vm-process",
    "passt-process",
    "forward-loopback-only",
    "tcp",
    "mtls-handshake",
    "client-cert-required",
    "health",
    "info",
    "kernel-digest",
    "rootfs-digest",
    "disks-attached",
    "data-disk-mounted",
    "data-disk-free",
    "console-clean",
    "no-stale-state",
];

/// The rows about a disk root's disks: "not applicable (share root)" and optional on a share root.
pub const DISK_ROWS: &[&str] = &["disks-attached", "data-disk-mounted", "data-disk-free"];

/// A gateway instance this trial supervises through the same library path as `vm run`
/// (`supervise::Request::boot`: lock, recovery, preflight, launch, readiness, metadata). Dropping it stops
/// the VM and passt and releases the lock.
struct Supervised {
    up: openshell_instance::supervise::Supervised,
    inst: GatewayInstance,
    port: u16,
}

fn supervise(a: &Artifacts, vmm: VmmChoice, dir: &TrialDir) -> Result<Supervised, String> {
    supervise_with(a, vmm, dir, Verification::Required)
}

fn supervise_with(
    a: &Artifacts,
    vmm: VmmChoice,
    dir: &TrialDir,
    verification: Verification,
) -> Result<Supervised, String> {
    support::with_free_port(|port| {
        let mut g = support::gateway(a, vmm, &dir.path().join("gateways"), port)?;
        // Where TrialDir::fail looks for the console; metadata.json records it for verify.
        std::fs::create_dir_all(dir.path().join("state")).map_err(|e| e.to_string())?;
        g.req.vm.console_log = Some(dir.path().join("state/console.log"));
        let up = g.boot_with(verification).map_err(|e| format!("boot: {e}"))?;
        Ok(Supervised { up, inst: g.inst, port })
    })
}

fn verify_passes_on_running_gateway(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let gw = match supervise(a, vmm, &dir) {
        Ok(gw) => gw,
        Err(e) => return Err(dir.fail(e)),
    };
    // The instance that became ready last is the one `cargo xtask verify` picks by default.
    let active = state::active(gw.inst.dir.parent().unwrap());
    let t = Instant::now();
    let matrix = openshell_instance::verify::verify(&gw.inst);
    let took = t.elapsed();
    drop(gw);
    let matrix = matrix.map_err(|e| format!("verify could not run: {e}"))?;
    let table = matrix.render();
    if active.as_deref() != Some("trial") {
        return Err(dir.fail(format!("active gateway is {active:?}, expected \"trial\"")));
    }
    let ids: Vec<&str> = matrix.rows.iter().map(|r| r.id.as_str()).collect();
    if ids != ROWS {
        return Err(dir.fail(format!("rows {ids:?}, expected {ROWS:?}\n{table}")));
    }
    if matrix.exit_code() != 0 || matrix.rows.iter().any(|r| r.status != Status::Pass) {
        return Err(dir.fail(format!("verify did not pass every row on a healthy gateway:\n{table}")));
    }
    // This gateway boots a share root: the disk rows say they do not apply, and count for nothing.
    let misjudged: Vec<&str> = matrix
        .rows
        .iter()
        .filter(|r| {
            let disk = DISK_ROWS.contains(&r.id.as_str());
            r.required == disk || (disk && r.reason != "not applicable (share root)")
        })
        .map(|r| r.id.as_str())
        .collect();
    if !misjudged.is_empty() {
        return Err(dir.fail(format!("rows {misjudged:?} misjudge a share root (disk rows: optional, not applicable; the rest required):\n{table}")));
    }
    println!("{table}verify took {} ms", took.as_millis());
    Ok(())
}

fn verify_fails_when_forward_is_closed(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let gw = match supervise(a, vmm, &dir) {
        Ok(gw) => gw,
        Err(e) => return Err(dir.fail(e)),
    };
    let result = close_forward_and_verify(&gw);
    drop(gw);
    let (before, after, took) = match result {
        Ok(r) => r,
        Err(e) => return Err(dir.fail(e)),
    };
    let table = after.render();
    if before.exit_code() != 0 {
        return Err(dir.fail(format!("verify failed before the forward was closed:\n{}", before.render())));
    }
    if after.exit_code() != openshell_matrix::EXIT_REQUIRED_FAILED {
        return Err(
            dir.fail(format!("verify exit code {} with the forward closed, want 1:\n{table}", after.exit_code()))
        );
    }
    let blocking: Vec<&str> = after.blocking().iter().map(|r| r.id.as_str()).collect();
    for must in ["forward-loopback-only", "tcp"] {
        if !blocking.contains(&must) || !table.contains(&format!("FAIL  {must}")) {
            return Err(dir.fail(format!("the {must} row does not fail with the forward closed:\n{table}")));
        }
    }
    // The VM itself is still up: verify must blame the forward, not everything.
    for fine in ["supervisor", "vm-process", "console-clean"] {
        if after.row(fine).map(|r| r.status) != Some(Status::Pass) {
            return Err(dir.fail(format!("row {fine} should still pass with only the forward closed:\n{table}")));
        }
    }
    if !after.row("forward-loopback-only").is_some_and(|r| r.reason.contains("nothing listens")) {
        return Err(dir.fail(format!("the forward row does not say nothing listens:\n{table}")));
    }
    println!("{table}verify took {} ms", took.as_millis());
    Ok(())
}

/// A hang guard for the killed passt's port to close, not the property.
const FORWARD_CLOSE_GUARD: Duration = Duration::from_secs(60);

/// Verifies, SIGKILLs the instance's passt (the forward's owner), waits for the port to stop
/// listening, and verifies again, timing the second run.
fn close_forward_and_verify(
    gw: &Supervised,
) -> Result<(openshell_matrix::Matrix, openshell_matrix::Matrix, Duration), String> {
    let before = openshell_instance::verify::verify(&gw.inst).map_err(|e| format!("verify could not run: {e}"))?;
    let passt = gw.up.vm.passt_pid().ok_or("the gateway VM has no passt")?;
    // The passt child our RunningVm started and has not reaped.
    let _ = openshell_vm::child::signal(passt, nix::sys::signal::Signal::SIGKILL);
    // The port closing is the property; how soon is the host's speed, so the bound is only a
    // hang guard.
    let deadline = Instant::now() + FORWARD_CLOSE_GUARD;
    while !support::tcp_listeners(gw.port).is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "port {} still listens {} s after passt {passt} was killed",
                gw.port,
                FORWARD_CLOSE_GUARD.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let after = openshell_instance::verify::verify(&gw.inst)
        .map_err(|e| format!("verify could not run with the forward closed: {e}"))?;
    Ok((before, after, t.elapsed()))
}

/// A copy of the kernel's store directory (vmlinux and its provenance.json) under the trial dir,
/// with one byte of vmlinux changed: the `L` of the `Linux version` banner, which only printk
/// reads, so the copy still boots. Returns the copy and (recorded, tampered) digests.
fn tampered_kernel(a: &Artifacts, dir: &TrialDir) -> Result<(std::path::PathBuf, String, String), String> {
    let copy = dir.path().join("kernel");
    std::fs::create_dir_all(&copy).map_err(|e| e.to_string())?;
    let provenance = a.kernel.parent().ok_or("kernel without a directory")?.join("provenance.json");
    std::fs::copy(&provenance, copy.join("provenance.json")).map_err(|e| format!("{}: {e}", provenance.display()))?;
    let mut bytes = std::fs::read(&a.kernel).map_err(|e| format!("{}: {e}", a.kernel.display()))?;
    let at = bytes.windows(15).position(|w| w == b"Linux version 6").ok_or("no `Linux version` banner in vmlinux")?;
    bytes[at] = b'l';
    let vmlinux = copy.join("vmlinux");
    std::fs::write(&vmlinux, &bytes).map_err(|e| e.to_string())?;
    let recorded = openshell_artifacts::sha256_file(&a.kernel).map_err(|e| e.to_string())?.hex();
    let tampered = openshell_artifacts::Digest::of_bytes(&bytes).hex();
    Ok((vmlinux, recorded, tampered))
}

/// A copy of the rootfs (modes, symlinks and manifest.json kept) with `/etc/hostname` changed.
fn tampered_rootfs(a: &Artifacts, dir: &TrialDir) -> Result<std::path::PathBuf, String> {
    let copy = dir.path().join("rootfs");
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(&a.rootfs)
        .arg(&copy)
        .output()
        .map_err(|e| format!("cp: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cp -a {} {}: {}",
            a.rootfs.display(),
            copy.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let hostname = copy.join("etc/hostname");
    let mut text = std::fs::read(&hostname).map_err(|e| format!("{}: {e}", hostname.display()))?;
    text.push(b'#');
    std::fs::write(&hostname, text).map_err(|e| e.to_string())?;
    Ok(copy)
}

/// Boots `a` unverified (a tampered artifact must still boot), verifies it, and expects exactly
/// the row `id` to fail, with `evidence` in its reason; every other row passes.
fn unverified_boot_fails_only(
    a: &Artifacts,
    vmm: VmmChoice,
    dir: TrialDir,
    id: &str,
    evidence: &[&str],
) -> Result<(), Failed> {
    let gw = match supervise_with(a, vmm, &dir, Verification::AllowUnverified) {
        Ok(gw) => gw,
        Err(e) => return Err(dir.fail(e)),
    };
    let matrix = openshell_instance::verify::verify(&gw.inst);
    drop(gw);
    let matrix = matrix.map_err(|e| format!("verify could not run: {e}"))?;
    let table = matrix.render();
    let blocking: Vec<&str> = matrix.blocking().iter().map(|r| r.id.as_str()).collect();
    if blocking != [id] || matrix.rows.iter().any(|r| r.id != id && r.status != Status::Pass) {
        return Err(dir.fail(format!("expected only {id} to fail:\n{table}")));
    }
    let reason = &matrix.row(id).unwrap().reason;
    if let Some(missing) = evidence.iter().find(|e| !reason.contains(*e)) {
        return Err(dir.fail(format!("the {id} row does not name {missing}:\n{table}")));
    }
    println!("{table}");
    Ok(())
}

fn verify_fails_kernel_digest_of_tampered_kernel(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let (vmlinux, recorded, tampered) = tampered_kernel(a, &dir)?;
    let copy = Artifacts { kernel: vmlinux, rootfs: a.rootfs.clone() };
    unverified_boot_fails_only(&copy, vmm, dir, "kernel-digest", &[&recorded, &tampered])
}

fn verify_fails_rootfs_digest_of_tampered_rootfs(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let rootfs = tampered_rootfs(a, &dir)?;
    let copy = Artifacts { kernel: a.kernel.clone(), rootfs };
    unverified_boot_fails_only(&copy, vmm, dir, "rootfs-digest", &["/etc/hostname"])
}

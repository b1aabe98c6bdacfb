//! `verify` against a real gateway: it passes on a healthy instance and names the forward when
//! the forward dies. Each trial supervises its own instance the way `vm run` does (instance lock,
//! metadata.json with its pids and artifacts) under the trial's own gateways root, and its guard
//! stops the VM and passt on every path out, failure included.

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use openshell_matrix::Status;
use openshell_vm::gateway::{self, GatewayInstance};
use openshell_vm::VmmChoice;

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("gateway::verify_passes_on_running_gateway", verify_passes_on_running_gateway),
    ("gateway::verify_fails_when_forward_is_closed", verify_fails_when_forward_is_closed),
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
    "console-clean",
    "no-stale-state",
];

/// A gateway instance this trial supervises through the same library path as `vm run`
/// (`supervise::boot`: lock, recovery, preflight, launch, readiness, metadata). Dropping it stops
/// the VM and passt and releases the lock.
struct Supervised {
    up: openshell_vm::supervise::Supervised,
    inst: GatewayInstance,
    port: u16,
}

fn supervise(a: &Artifacts, vmm: VmmChoice, dir: &TrialDir) -> Result<Supervised, String> {
    let port = support::free_port();
    let mut g = support::gateway(a, vmm, &dir.path().join("gateways"), port)?;
    // Where TrialDir::fail looks for the console; metadata.json records it for verify.
    std::fs::create_dir_all(dir.path().join("state")).map_err(|e| e.to_string())?;
    g.cfg.console_log = Some(dir.path().join("state/console.log"));
    let up = g.boot().map_err(|e| format!("boot: {e}"))?;
    let inst = g.inst;
    Ok(Supervised { up, inst, port })
}

fn verify_passes_on_running_gateway(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let gw = match supervise(a, vmm, &dir) {
        Ok(gw) => gw,
        Err(e) => return Err(dir.fail(e)),
    };
    // The instance that became ready last is the one `cargo xtask verify` picks by default.
    let active = gateway::active(gw.inst.dir.parent().unwrap());
    let t = Instant::now();
    let matrix = openshell_vm::verify::verify(&gw.inst);
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
    if matrix.exit_code() != 0 || matrix.rows.iter().any(|r| r.status != Status::Pass || !r.required) {
        return Err(dir.fail(format!("verify did not pass every required row on a healthy gateway:\n{table}")));
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
        return Err(dir.fail(format!("verify exit code {} with the forward closed, want 1:\n{table}", after.exit_code())));
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

/// Verifies, SIGKILLs the instance's passt (the forward's owner), waits for the port to stop
/// listening, and verifies again, timing the second run.
fn close_forward_and_verify(
    gw: &Supervised,
) -> Result<(openshell_matrix::Matrix, openshell_matrix::Matrix, Duration), String> {
    let before = openshell_vm::verify::verify(&gw.inst).map_err(|e| format!("verify could not run: {e}"))?;
    let passt = gw.up.vm.passt_pid().ok_or("the gateway VM has no passt")?;
    // SAFETY: kill(2) on the passt child our RunningVm started and has not reaped.
    unsafe { libc::kill(passt as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !support::tcp_listeners(gw.port).is_empty() {
        if Instant::now() > deadline {
            return Err(format!("port {} still listens 5 s after passt {passt} was killed", gw.port));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let after = openshell_vm::verify::verify(&gw.inst).map_err(|e| format!("verify could not run with the forward closed: {e}"))?;
    Ok((before, after, t.elapsed()))
}

//! Faults and bad input: a guest that crashes while it boots, artifacts that cannot boot, a
//! forward's port taken by someone else, racing supervisors, a damaged instance directory, a
//! guest that floods its console. Each trial ends with nothing of it running and no half-written
//! state, and asserts both.
//!
//! Each trial breaks its own copy of the artifacts; the shared artifacts are never touched.

use std::path::{Path, PathBuf};
use std::time::Instant;

use libtest_mimic::Failed;
use openshell_instance::check::{self, Verification};
use openshell_vm::{VmError, VmmChoice};

use crate::support::{self, copy, processes_mentioning, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("faults::init_that_exits_fails_fast_with_the_cause", init_that_exits_fails_fast_with_the_cause),
    ("faults::gateway_whose_init_cannot_run_fails_fast", gateway_whose_init_cannot_run_fails_fast),
    ("faults::bad_boot_artifacts_are_refused_before_boot", bad_boot_artifacts_are_refused_before_boot),
    ("faults::port_taken_before_the_forward_binds_is_detected", port_taken_before_the_forward_binds_is_detected),
    ("faults::console_flood_is_bounded", console_flood_is_bounded),
];

/// A copy of the rootfs whose `/sbin/openshell-init` is `init` (mode 0755): the guest kernel runs
/// it as PID 1. The file is replaced, not written through (it could be a link into the store).
fn rootfs_with_init(a: &Artifacts, dir: &TrialDir, init: &[u8]) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.path().join("rootfs");
    copy(&a.rootfs, &root)?;
    let path = root.join("sbin/openshell-init");
    std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(&path, init).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    Ok(root)
}

/// Nothing started on the trial's paths still runs (a VMM, passt, a supervisor).
fn nothing_left(dir: &Path) -> Result<(), String> {
    let left = processes_mentioning(&dir.to_string_lossy());
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("processes left running: {left:?}"))
    }
}

/// A guest whose init exits at once: the kernel panics ("Attempted to kill init!"), and the run
/// ends with that cause and the console's last lines, not a wait for a report that never comes.
/// The console's tail is in the error itself, so a temporary state directory gone by the time it
/// is read costs nothing.
fn init_that_exits_fails_fast_with_the_cause(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    // Its init is a shell script, not ours: the guest never reaches what counts as userspace.
    dir.expect_stop_before_userspace();
    let root = rootfs_with_init(a, &dir, b"#!/bin/sh\necho fault-trial-init-exits\nexit 3\n")?;
    let mut cfg = support::config(a, &dir, vmm, &["/bin/true"]);
    cfg.rootfs = root;
    let (mut vm, _) = match check::launch_checked(&cfg, Verification::AllowUnverified) {
        Ok(v) => v,
        Err(e) => return Err(dir.fail(format!("launch with --allow-unverified failed: {e}"))),
    };
    let vmm_pid = vm.pid();
    let result = vm.wait(None, Some(support::GUEST_TIMEOUT));
    let took = vm.started.elapsed();
    drop(vm);
    support::note(format!("init that exits: the run ended {:.2} s after the VMM started", took.as_secs_f64()));
    let msg = match result {
        Err(e @ VmError::GuestCrashed { .. }) => e.to_string(),
        Err(e) => return Err(dir.fail(format!("the run failed, but not as a crash: {e}"))),
        Ok(exit) => return Err(dir.fail(format!("the run ended as if the guest were fine: {exit}"))),
    };
    // The kernel's own cause, and the console's tail showing what the guest printed before it.
    for part in ["Attempted to kill init", "fault-trial-init-exits", &cfg.console_path().display().to_string()] {
        if !msg.contains(part) {
            return Err(dir.fail(format!("the error does not carry {part:?}:\n{msg}")));
        }
    }
    if support::process_exists(vmm_pid) {
        return Err(dir.fail(format!("the VMM (pid {vmm_pid}) still runs after the crash was reported")));
    }
    nothing_left(&dir.path()).map_err(|e| dir.fail(e))
}

/// A gateway instance (`vm run` with `--allow-unverified`) whose init is not a program the kernel
/// can run: the kernel panics ("Requested init … failed"), and the boot fails with that cause at
/// once rather than after the ready timeout. Nothing runs after, the instance lock is free and
/// its metadata names no process.
fn gateway_whose_init_cannot_run_fails_fast(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    dir.expect_stop_before_userspace();
    let root = rootfs_with_init(a, &dir, b"\x00\x01 not a program \x02\x03\n")?;
    let started = Instant::now();
    let result = support::with_free_port(|port| {
        let mut g = support::gateway(a, vmm, &dir.path().join("gateways"), port)?;
        g.req.rootfs = root.clone();
        match g.boot_with(Verification::AllowUnverified) {
            Ok(up) => Ok(Err(format!("the gateway came up on a rootfs whose init cannot run ({})", up.endpoint))),
            Err(e) => Ok(Ok((g, e))),
        }
    });
    let took = started.elapsed();
    let (g, err) = match result {
        Ok(Ok(v)) => v,
        Ok(Err(e)) | Err(e) => return Err(dir.fail(e)),
    };
    support::note(format!(
        "gateway whose init cannot run: boot failed after {:.2} s (ready timeout {} s)",
        took.as_secs_f64(),
        g.req.ready_timeout.as_secs()
    ));
    let msg = err.to_string();
    if !matches!(err, VmError::GuestCrashed { .. }) || !msg.contains("Requested init /sbin/openshell-init failed") {
        return Err(dir.fail(format!("expected the guest's crash as the cause, got: {msg}")));
    }
    if let Err(e) = nothing_left(&dir.path()) {
        return Err(dir.fail(e));
    }
    let status = g.inst.status();
    if status.running || !status.stale.is_empty() || status.vm_pid.is_some() {
        return Err(dir.fail(format!("the instance is left half-started: {status:?}")));
    }
    Ok(())
}

/// `vm run --exec … --allow-unverified` on a kernel cut in half, on a kernel that is not a kernel,
/// and on a rootfs without `/sbin/openshell-init`: each refused before any VMM starts, with an
/// error naming the file and what is wrong, and no VMM log, console or process left.
fn bad_boot_artifacts_are_refused_before_boot(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    dir.expect_refusal_before_boot();
    let kernel_copy = |name: &str, bytes: &[u8]| -> Result<PathBuf, String> {
        // With its provenance record beside it, so the preflight's digest check (a warning under
        // --allow-unverified) is what it would be for a damaged store entry.
        let kdir = dir.path().join(name);
        std::fs::create_dir_all(&kdir).map_err(|e| e.to_string())?;
        copy(&a.kernel.parent().ok_or("the kernel path has no directory")?.join("provenance.json"), &kdir)?;
        let path = kdir.join(a.kernel.file_name().ok_or("the kernel path has no file name")?);
        std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
        Ok(path)
    };
    let whole = std::fs::read(&a.kernel).map_err(|e| e.to_string())?;
    let truncated = kernel_copy("truncated", &whole[..whole.len() / 2])?;
    let not_elf = kernel_copy("not-elf", b"this is not a kernel\n")?;
    let no_init = dir.path().join("rootfs-without-init");
    copy(&a.rootfs, &no_init)?;
    std::fs::remove_file(no_init.join("sbin/openshell-init")).map_err(|e| e.to_string())?;
    // (case, kernel, rootfs, what the error must say besides the broken file's path)
    type Case<'a> = (&'a str, Option<&'a Path>, Option<&'a Path>, &'a [&'a str]);
    let cases: [Case; 3] = [
        ("truncated kernel", Some(&truncated), None, &["truncated", "cargo xtask kernel"]),
        ("non-ELF kernel", Some(&not_elf), None, &["not an ELF file", "cargo xtask kernel"]),
        ("rootfs without init", None, Some(&no_init), &["/sbin/openshell-init", "cargo xtask rootfs"]),
    ];
    for (case, kernel, rootfs, words) in cases {
        let state = dir.path().join(format!("state-{}", case.replace(' ', "-")));
        let mut cfg = support::config(a, &dir, vmm, &["/bin/true"]);
        cfg.state_dir = state.clone();
        if let Some(k) = kernel {
            cfg.kernel = k.to_owned();
        }
        if let Some(r) = rootfs {
            cfg.rootfs = r.to_owned();
        }
        let named = kernel.or(rootfs).expect("each case breaks one artifact").display().to_string();
        let msg = match check::launch_checked(&cfg, Verification::AllowUnverified) {
            Ok((vm, _)) => {
                drop(vm);
                return Err(dir.fail(format!("{case}: the VM was started")));
            }
            Err(e) => e.to_string(),
        };
        println!("{case}: {msg}");
        if let Some(w) = [named.as_str()].iter().chain(words).find(|w| !msg.contains(**w)) {
            return Err(dir.fail(format!("{case}: the error does not say {w:?}:\n{msg}")));
        }
        if let Some(f) = ["vmm.log", "console.log"].iter().find(|f| state.join(f).exists()) {
            return Err(dir.fail(format!("{case}: {f} exists: a VMM was started before the refusal")));
        }
    }
    nothing_left(&dir.path()).map_err(|e| e.into())
}

/// The forward's port taken by another process after the preflight found it free, before passt
/// binds it. No hook can hold a real launch between its port check and passt's bind, so this
/// takes the port first and starts the network the way `launch` does after its check
/// (`net::start`): passt cannot bind and exits, and the start must say the port is taken, not
/// report the other process's listener as the forward. passt is gone after, and the other
/// process still has its port.
fn port_taken_before_the_forward_binds_is_detected(a: &Artifacts, _: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let _ = a;
    dir.expect_refusal_before_boot();
    let theirs = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = theirs.local_addr().map_err(|e| e.to_string())?.port();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
    let ports = [openshell_vm::PortMap { host: port, guest: 8080 }];
    let started = Instant::now();
    let result =
        openshell_vm::net::start(openshell_vm::Net::Passt, None, &ports, openshell_vm::net::Attach::Qemu, &state);
    let took = started.elapsed();
    let passt_log = std::fs::read_to_string(state.join("passt.log")).unwrap_or_default();
    support::note(format!(
        "port taken before passt's bind: the start ended after {:.2} s; passt said: {}",
        took.as_secs_f64(),
        passt_log.lines().last().unwrap_or("(nothing)")
    ));
    match result {
        Err(e @ VmError::PortInUse(p)) if p == port => println!("refused: {e}"),
        Err(e) => return Err(dir.fail(format!("the start failed, but not naming port {port} as taken: {e}"))),
        Ok(_) => {
            return Err(dir.fail(format!("the forward was reported up on port {port}, which another process holds")))
        }
    }
    let passt = processes_mentioning(&format!("127.0.0.1/{port}:8080"));
    if !passt.is_empty() {
        return Err(dir.fail(format!("passt is left running: {passt:?}")));
    }
    // The port is still the other process's: a connection reaches its listener.
    let client = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    theirs.set_nonblocking(true).map_err(|e| e.to_string())?;
    let accepted = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        theirs.accept().is_ok()
    });
    drop(client);
    if !accepted {
        return Err(dir.fail(format!("the other process's listener on {port} no longer gets its connections")));
    }
    Ok(())
}

/// What the flooding guest prints. The emulated UART under TCG moves some hundred KiB/s, and
/// libkrun's virtio console inside the nested host far less, so 50 MiB would take minutes: the
/// trial lowers the cap instead, and prints what fills it, the kept end and as much again,
/// dropped. Without newlines: the tty hands each line to the console driver on its own, and under
/// libkrun inside the nested host each of those is an exit costing milliseconds (31-byte lines
/// moved 2 KiB/s there).
const FLOOD_CAP: u64 = 64 * 1024;
const FLOOD_BYTES: u64 = FLOOD_CAP + 2 * openshell_vm::console::KEEP_LAST as u64 + 64 * 1024;

/// A guest that prints past its console cap and the kept end: the log stays under the cap plus the kept end,
/// says it was truncated and how much it dropped, and still holds both the boot (init's lines)
/// and the guest's last line; the run's exit code is the guest's.
fn console_flood_is_bounded(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let script = format!("head -c {FLOOD_BYTES} /dev/zero | tr '\\0' x; echo; echo flood-finished");
    let mut cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", &script]);
    cfg.console_cap = FLOOD_CAP;
    let cap = cfg.console_cap;
    let started = Instant::now();
    let (code, console, dir) = support::run(&cfg, dir)?;
    let took = started.elapsed().as_secs_f64();
    let size = std::fs::metadata(cfg.console_path()).map_err(|e| e.to_string())?.len();
    support::note(format!(
        "console flood: {} KiB printed in {took:.1} s ({:.0} KiB/s through the UART); log {size} bytes (cap {cap})",
        FLOOD_BYTES >> 10,
        FLOOD_BYTES as f64 / 1024.0 / took
    ));
    let bound = cap + openshell_vm::console::KEEP_LAST as u64 + 1024;
    let checks = [
        (code == 0, format!("the guest's exit code is {code}, not 0")),
        (size <= bound, format!("the log is {size} bytes, over its bound {bound}")),
        (console.contains(&format!("{} {cap} bytes", openshell_vm::console::CAP_MARKER)), "no cap marker".into()),
        (console.contains("bytes of console output were dropped"), "no count of dropped bytes".into()),
        (console.contains("openshell-init: ["), "the boot's lines are gone".into()),
        // The workload's last line, then init's power-off lines.
        (support::tail(&console, 4).contains("flood-finished"), "the guest's last line is not at the end".into()),
    ];
    match checks.iter().find(|(ok, _)| !ok) {
        Some((_, why)) => Err(dir.fail(why.clone())),
        None => Ok(()),
    }
}

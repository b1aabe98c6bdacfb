//! Stopping what does not stop by itself: init SIGKILLs a workload that ignores SIGTERM once its
//! grace is over, init reaps the orphans it inherits, and `RunningVm::stop` SIGKILLs a VMM that
//! does not exit on SIGTERM within its grace. Each outcome is read from what the code reports (the
//! console, the guest's exit code, what `stop()` says it did), never from how long it took;
//! durations are printed.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use openshell_vm::{RunningVm, Stopped, VmmChoice};

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("stop::init_sigkills_a_workload_that_ignores_sigterm", init_sigkills_a_workload_that_ignores_sigterm),
    ("stop::init_reaps_orphans", init_reaps_orphans),
    ("stop::vmm_that_honours_sigterm_exits_on_it", vmm_that_honours_sigterm_exits_on_it),
    ("stop::vmm_that_ignores_sigterm_is_sigkilled", vmm_that_ignores_sigterm_is_sigkilled),
];

const STOPPING: &str = "stopping the workload (SIGTERM";
const KILLING: &str = "the workload ignored SIGTERM; SIGKILL";

/// The guest-clock stamp of init's first console line containing `what`.
fn init_stamp(console: &str, what: &str) -> Option<u64> {
    let line = console.lines().find(|l| l.starts_with("openshell-init: [") && l.contains(what))?;
    line.split_once('[')?.1.split_once("ms]")?.0.trim().parse().ok()
}

fn init_sigkills_a_workload_that_ignores_sigterm(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    // The workload (and the sleep it starts, which inherits SIG_IGN) ignores SIGTERM, then asks
    // PID 1 to stop: only init's SIGKILL after the grace can end it, and the guest then reports
    // 128 + SIGKILL.
    let script = "trap '' TERM; echo workload-ignores-term; kill -TERM 1; while :; do sleep 1; done";
    let cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", script]);
    let (code, console, dir) = support::run(&cfg, dir)?;
    let (term, kill) = (init_stamp(&console, STOPPING), init_stamp(&console, KILLING));
    let ordered = matches!((term, kill), (Some(t), Some(k)) if t <= k);
    if code != 128 + nix::sys::signal::Signal::SIGKILL as i32 || !console.contains("workload-ignores-term") || !ordered
    {
        return Err(dir.fail(format!(
            "expected init to SIGTERM, then SIGKILL the workload (exit 137); got exit {code}, \
             {STOPPING:?} at {term:?} ms, {KILLING:?} at {kill:?} ms"
        )));
    }
    println!("init: SIGTERM at {} ms, SIGKILL at {} ms (guest clock)", term.unwrap(), kill.unwrap());
    Ok(())
}

fn init_reaps_orphans(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    // A subshell starts a waiter in the background and exits: the waiter is orphaned, PID 1
    // inherits it, and once it is released and exits only init can reap it. Without that it stays
    // a zombie (its /proc entry remains, state Z) for as long as the guest runs. It waits for
    // /tmp/go rather than a fixed time, so a slow guest (nested, loaded) still sees it adopted.
    let script = r#"( sh -c 'while [ ! -e /tmp/go ]; do sleep 0.1; done' & echo $! > /tmp/orphan ); o=$(cat /tmp/orphan)
echo "orphan $o ppid $(sed -n 's/^PPid:[[:space:]]*//p' /proc/$o/status)"
touch /tmp/go
i=0; while [ -e /proc/$o ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /proc/$o ]; then echo "orphan left: $(grep ^State: /proc/$o/status)"; else echo "orphan reaped"; fi
echo "zombies: $(grep -l '^State:[[:space:]]*Z' /proc/[0-9]*/status 2>/dev/null | wc -l)""#;
    let cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", script]);
    let (code, console, dir) = support::run(&cfg, dir)?;
    let adopted = console.lines().any(|l| l.starts_with("orphan ") && l.ends_with(" ppid 1"));
    if code != 0 || !adopted || !console.contains("orphan reaped") || !console.contains("zombies: 0") {
        let said: Vec<&str> =
            console.lines().filter(|l| l.starts_with("orphan") || l.starts_with("zombies:")).collect();
        return Err(dir.fail(format!(
            "expected an orphan adopted by PID 1 and reaped, no zombie left; the guest said {said:?} (exit {code})"
        )));
    }
    Ok(())
}

/// Boots a guest that sleeps, and returns its VM once the guest runs the sleep.
fn boot_sleeper(a: &Artifacts, vmm: VmmChoice, dir: &TrialDir) -> Result<RunningVm, String> {
    let cfg = support::config(a, dir, vmm, &["/bin/sleep", "600"]);
    let vm = crate::support::launch(&cfg).map_err(|e| format!("launch: {e}"))?;
    let deadline = Instant::now() + support::GUEST_TIMEOUT;
    while !std::fs::read_to_string(cfg.console_path()).unwrap_or_default().contains("exec /bin/sleep") {
        if Instant::now() > deadline {
            return Err(format!("the guest never started /bin/sleep within {} s", support::GUEST_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(vm)
}

/// `stop()` on its own thread, so a stop that never returns fails the trial (after SIGKILLing
/// the VMM here) instead of wedging it. Returns what `stop()` said and how long it took.
fn stop_bounded(mut vm: RunningVm) -> Result<(Stopped, Duration), String> {
    let pid = vm.pid();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        let how = vm.stop();
        let _ = tx.send((how, t.elapsed()));
        drop(vm);
    });
    rx.recv_timeout(Duration::from_secs(60)).map_err(|_| {
        // The VMM this trial launched; stop() never reaped it.
        let _ = openshell_vm::child::signal(pid, nix::sys::signal::Signal::SIGKILL);
        format!("RunningVm::stop() did not return within 60 s (VMM pid {pid})")
    })
}

fn vmm_that_honours_sigterm_exits_on_it(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let vm = match boot_sleeper(a, vmm, &dir) {
        Ok(vm) => vm,
        Err(e) => return Err(dir.fail(e)),
    };
    let pid = vm.pid();
    let (how, took) = match stop_bounded(vm) {
        Ok(r) => r,
        Err(e) => return Err(dir.fail(e)),
    };
    if how != Stopped::OnSigterm || openshell_vm::procfs::process(pid).alive {
        return Err(dir.fail(format!(
            "stop() of a running VMM said {how:?} (want OnSigterm); pid {pid} alive afterwards: {}",
            openshell_vm::procfs::process(pid).alive
        )));
    }
    println!("stop(): {how:?} after {} ms", took.as_millis());
    Ok(())
}

fn vmm_that_ignores_sigterm_is_sigkilled(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let vm = match boot_sleeper(a, vmm, &dir) {
        Ok(vm) => vm,
        Err(e) => return Err(dir.fail(e)),
    };
    let pid = vm.pid();
    // A stopped process leaves SIGTERM pending: to stop() it is a VMM that ignores SIGTERM.
    // The VMM this trial launched and has not reaped.
    let _ = openshell_vm::child::signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stat_state(pid) != Some('T') {
        if Instant::now() > deadline {
            drop(vm);
            return Err(dir.fail(format!("VMM pid {pid} did not enter the stopped state after SIGSTOP")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (how, took) = match stop_bounded(vm) {
        Ok(r) => r,
        Err(e) => return Err(dir.fail(e)),
    };
    if how != Stopped::Killed || openshell_vm::procfs::process(pid).alive {
        return Err(dir.fail(format!(
            "stop() of a VMM that ignores SIGTERM said {how:?} (want Killed); pid {pid} alive afterwards: {}",
            openshell_vm::procfs::process(pid).alive
        )));
    }
    println!("stop(): {how:?} after {} ms", took.as_millis());
    Ok(())
}

/// The state letter of `/proc/<pid>/stat` (R, S, T, Z, …).
fn stat_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().next()?.chars().next()
}

//! Init's lifecycle duties (stop on SIGTERM, stale share state, guest addressing and DNS) and
//! the gateway supervisor's recovery after it was SIGKILLed.

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use openshell_instance::state::GatewayInstance;
use openshell_instance::supervise;
use openshell_vm::{Net, VmmChoice};

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("init::sigterm_to_init_stops_the_workload_and_powers_off", sigterm_to_init_stops_workload),
    ("init::stale_runtime_files_in_the_share_are_removed", stale_share_files_removed),
    ("net::static_address_with_dns_fallback", static_address_with_dns_fallback),
    ("net::dhcp_lease_from_the_network_backend", dhcp_lease_from_backend),
    ("gateway::supervisor_sigkill_then_recovery", supervisor_sigkill_then_recovery),
];

fn sigterm_to_init_stops_workload(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    // The workload asks PID 1 to stop; init must pass SIGTERM on to it (its trap answers with
    // exit 7), report that code and power off: not hang, not lose the code.
    let script = "trap 'echo workload-got-term; exit 7' TERM; kill -TERM 1; while :; do sleep 0.1; done";
    let cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", script]);
    let (code, console, dir) = support::run(&cfg, dir)?;
    if code != 7 || !console.contains("workload-got-term") || !console.contains("stopping the workload") {
        return Err(dir.fail(format!("expected the workload's trap to run and exit 7, got exit {code}")));
    }
    Ok(())
}

fn stale_share_files_removed(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", "echo share: $(ls -a /run/openshell | tr '\\n' ' ')"]);
    // What an earlier boot of this instance could have left in its share.
    let share = cfg.share_dir();
    std::fs::create_dir_all(&share).unwrap();
    for f in ["gateway.pid", "control.sock", ".exit-code.tmp"] {
        std::fs::write(share.join(f), "stale").unwrap();
    }
    let (code, console, dir) = support::run(&cfg, dir)?;
    let line = console.lines().find(|l| l.starts_with("share: ")).unwrap_or("").to_owned();
    if code != 0
        || ["gateway.pid", "control.sock", ".exit-code.tmp"].iter().any(|f| line.contains(f))
        || !line.contains("exec.json")
    {
        return Err(dir.fail(format!("stale files survived boot: {line:?} (exit {code})")));
    }
    Ok(())
}

const SHOW_NET: &str = "echo resolv: $(cat /etc/resolv.conf); echo addr: $(ip -4 -o addr show eth0)";

/// A name the host's own resolver answers (what apt needs on every machine this project builds
/// on); the guest must resolve it through passt's DNS forwarder, not merely have a nameserver line.
const RESOLVABLE: &str = "deb.debian.org";

fn static_address_with_dns_fallback(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    use std::net::ToSocketAddrs;
    let host_sees = (RESOLVABLE, 80).to_socket_addrs().map(|a| a.count()).unwrap_or(0);
    if host_sees == 0 {
        return Err(
            dir.fail(format!("the host itself cannot resolve {RESOLVABLE}, so the guest's DNS path cannot be shown"))
        );
    }
    let script = format!("{SHOW_NET}; nslookup {RESOLVABLE} && echo resolved-through-forwarder");
    let mut cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", &script]);
    cfg.net = Net::Passt;
    let (code, console, dir) = support::run(&cfg, dir)?;
    // No DHCP ran, so no nameserver came with the address: init fell back to passt's forwarder,
    // and a query sent there was answered.
    let ok = code == 0
        && console.contains("(static)")
        && console.contains("resolv: nameserver 192.0.2.1")
        && console.contains("inet 192.0.2.2/24")
        && console.contains("resolved-through-forwarder");
    if !ok {
        return Err(dir.fail(format!(
            "expected 192.0.2.2/24, nameserver 192.0.2.1 and {RESOLVABLE} resolved through it (exit {code})"
        )));
    }
    Ok(())
}

fn dhcp_lease_from_backend(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let mut cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", SHOW_NET]);
    cfg.net = Net::Passt;
    cfg.dhcp = true;
    let (code, console, dir) = support::run(&cfg, dir)?;
    let resolv = console.lines().find(|l| l.starts_with("resolv: ")).unwrap_or("");
    let ok = code == 0
        && console.contains("lease of 192.0.2.2 obtained")
        && console.contains("(dhcp)")
        && resolv.contains("nameserver ")
        && console.contains("inet 192.0.2.2/24");
    if !ok {
        return Err(
            dir.fail(format!("expected a DHCP lease of 192.0.2.2 with a nameserver, got {resolv:?} (exit {code})"))
        );
    }
    Ok(())
}

/// A SIGKILLed supervisor leaves a stale record. Two parts:
/// 1. The real supervisor is SIGKILLed: its VMM and passt die with it (PDEATHSIG), so recovery
///    finds them gone, clears the record, and the instance boots again on the same port.
/// 2. A record naming live processes: a real VMM and passt of ours (booted here, as a platform
///    without PDEATHSIG would leave them) are killed; a live process that is not ours is left alone.
fn supervisor_sigkill_then_recovery(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let root = dir.path().join("gateways");
    // The supervisor `vm run --detach` starts, started the one way it is started.
    let up = support::with_free_port(|port| {
        let up = support::gateway(a, vmm, &root, port)?.detach().map_err(|e| e.to_string())?;
        let meta = GatewayInstance::new(&root, "trial").unwrap().read_metadata();
        let pids = match meta.map(|m| (m.vm_pid, m.passt_pid)) {
            Some((Some(vm), Some(passt))) => vec![vm, passt],
            other => {
                let mut child = up.child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the supervisor came up without recording VMM and passt pids: {other:?}"));
            }
        };
        Ok((up.child, pids, port))
    });
    let (mut sup, pids, port) = match up {
        Ok(up) => up,
        Err(e) => return Err(dir.fail(e)),
    };
    // SIGKILL: no Drop, no cleanup, the lock released by the kernel, metadata left claiming pids.
    sup.kill().unwrap();
    sup.wait().unwrap();
    let inst = GatewayInstance::new(&root, "trial").unwrap();
    let stale = inst.read_metadata().map(|m| (m.vm_pid, m.passt_pid));
    if stale != Some((Some(pids[0]), Some(pids[1]))) {
        return Err(dir.fail(format!("metadata did not record the pids {pids:?}: {stale:?}")));
    }
    // PDEATHSIG takes the VMM and passt down with their supervisor (a hang guard: the status
    // check below is the property).
    let deadline = Instant::now() + Duration::from_secs(60);
    while pids.iter().any(|&p| support::process_exists(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Status only reads: it names the stale records and leaves them.
    let st = inst.status();
    let names = |pid: u32| st.stale.iter().any(|l| l.contains(&format!("pid {pid} recorded")));
    if st.running || !names(pids[0]) || !names(pids[1]) || inst.read_metadata().map(|m| m.vm_pid) != Some(Some(pids[0]))
    {
        return Err(
            dir.fail(format!("after SIGKILL, status must report the stale pids {pids:?} and change nothing: {st:?}"))
        );
    }
    // Recovery (what `vm stop` and the next `vm run` do) clears them by the recorded pids.
    let recovered = supervise::recover(&inst).unwrap_or_else(|e| vec![format!("recovery failed: {e}")]);
    let meta = inst.read_metadata().unwrap();
    let gone = |role: &str, pid: u32| recovered.iter().any(|l| l == &format!("{role} pid {pid} already gone"));
    if !gone("vm", pids[0]) || !gone("passt", pids[1]) || meta.vm_pid.is_some() || meta.passt_pid.is_some() {
        return Err(dir.fail(format!(
            "after SIGKILL: recovered={recovered:?}, metadata pids {:?}/{:?}",
            meta.vm_pid, meta.passt_pid
        )));
    }
    if !support::tcp_listeners(port).is_empty() {
        return Err(dir.fail(format!("port {port} still listens after recovery")));
    }
    // And the instance boots again on the same port.
    match support::gateway(a, vmm, &root, port).and_then(|g| g.boot().map_err(|e| e.to_string())) {
        Ok(up) => drop(up),
        Err(e) => return Err(dir.fail(format!("the instance did not boot again after recovery: {e}"))),
    }

    // Part 2: live leftovers. A real VMM and passt of ours, and a stranger under a recorded pid.
    let g = match support::gateway(a, vmm, &root, port) {
        Ok(g) => g,
        Err(e) => return Err(dir.fail(e)),
    };
    let mut leftover = match crate::support::launch(&g.cfg()) {
        Ok(vm) => vm,
        Err(e) => return Err(dir.fail(format!("cannot boot the leftover VM: {e}"))),
    };
    let (vm_pid, passt_pid) = (leftover.pid(), leftover.passt_pid().unwrap_or(0));
    let mut stranger = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let mut meta = inst.read_metadata().unwrap();
    meta.vm_pid = Some(vm_pid);
    meta.passt_pid = Some(passt_pid);
    meta.gvproxy_pid = Some(stranger.id());
    meta.supervisor_pid = Some(u32::MAX - 1);
    inst.write_metadata(&meta).unwrap();
    let alive = |p: u32| openshell_vm::procfs::process(p).alive;
    // Status reads: the live leftovers survive it.
    let _ = inst.status();
    if !alive(vm_pid) || !alive(passt_pid) {
        leftover.stop();
        let _ = stranger.kill();
        let _ = stranger.wait();
        return Err(dir.fail("vm status killed a leftover process; status must only read"));
    }
    let recovered = supervise::recover(&inst).unwrap_or_else(|e| vec![format!("recovery failed: {e}")]);
    let (vm_left, passt_left, stranger_alive) =
        (alive(vm_pid), alive(passt_pid), stranger.try_wait().unwrap().is_none());
    leftover.stop();
    let _ = stranger.kill();
    let _ = stranger.wait();
    let killed = |role: &str, pid: u32| recovered.iter().any(|l| l == &format!("killed leftover {role} pid {pid}"));
    let spared =
        recovered.iter().any(|l| l.starts_with(&format!("gvproxy pid {} now runs something else", stranger.id())));
    if !killed("vm", vm_pid) || !killed("passt", passt_pid) || vm_left || passt_left || !spared || !stranger_alive {
        return Err(dir.fail(format!(
            "recovery of live leftovers: recovered={recovered:?}; VMM alive {vm_left}, passt alive {passt_left}, stranger alive {stranger_alive}"
        )));
    }
    Ok(())
}

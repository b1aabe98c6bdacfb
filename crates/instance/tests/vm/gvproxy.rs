//! `--net gvproxy` against a real gvproxy (`$OPENSHELL_GVPROXY`: the host's, or Debian's fetched
//! into the store by `cargo xtask e2e`), on both backends (krun inside L1 where libkrun runs only
//! nested, with gvproxy shared in read-only): a DHCP lease from gvproxy's own DHCP server, a
//! gateway served over mTLS through gvproxy's forward and passing `verify`, and gvproxy killed
//! under a detached gateway failing the instance with gvproxy named as the cause.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use openshell_instance::check::Verification;
use openshell_matrix::Status;
use openshell_vm::{Net, VmmChoice};

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("gvproxy::exec_gets_its_lease_from_gvproxys_dhcp", exec_gets_its_lease_from_gvproxys_dhcp),
    (
        "gvproxy::gateway_serves_mtls_through_the_forward_and_verifies",
        gateway_serves_mtls_through_the_forward_and_verifies,
    ),
    (
        "gvproxy::gvproxy_killed_fails_the_instance_and_status_says_so",
        gvproxy_killed_fails_the_instance_and_status_says_so,
    ),
];

/// gvproxy's network (`net::gvproxy::GUEST`), as the guest must see it.
const GUEST_ADDR: &str = "192.168.127.2";
const GATEWAY_ADDR: &str = "192.168.127.1";

/// The gvproxy binary the trials run: `$OPENSHELL_GVPROXY`, set by `cargo xtask e2e`.
fn gvproxy() -> Result<PathBuf, String> {
    std::env::var_os("OPENSHELL_GVPROXY")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .ok_or_else(|| "OPENSHELL_GVPROXY is not set to a gvproxy binary; run `cargo xtask e2e --vm`".into())
}

/// The uid a live process runs as (`/proc/<pid>/status`'s real uid).
fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

/// `--exec` with DHCP: init's udhcpc gets gvproxy's static lease for the guest's MAC, with
/// gvproxy's gateway as the nameserver, and a name resolves through gvproxy's DNS.
fn exec_gets_its_lease_from_gvproxys_dhcp(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let script = "echo resolv: $(cat /etc/resolv.conf); echo addr: $(ip -4 -o addr show eth0); \
                  nslookup gateway.containers.internal && echo resolved-by-gvproxy";
    let mut cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", script]);
    cfg.net = Net::Gvproxy;
    cfg.gvproxy = Some(gvproxy()?);
    cfg.dhcp = true;
    let (code, console, dir) = support::run(&cfg, dir)?;
    let resolv = console.lines().find(|l| l.starts_with("resolv: ")).unwrap_or("").to_owned();
    let checks = [
        (code == 0, format!("the guest exited {code}")),
        (console.contains(&format!("lease of {GUEST_ADDR} obtained")), "no DHCP lease in init's log".into()),
        (console.contains("(dhcp)"), "the address is not marked as from DHCP".into()),
        (console.contains(&format!("inet {GUEST_ADDR}/24")), format!("eth0 does not carry {GUEST_ADDR}/24")),
        (resolv.contains(&format!("nameserver {GATEWAY_ADDR}")), format!("resolv.conf is {resolv:?}")),
        // gvproxy's own zone: only gvproxy's DNS answers this name.
        (console.contains("resolved-by-gvproxy"), "gateway.containers.internal did not resolve".into()),
    ];
    match checks.iter().find(|(ok, _)| !ok) {
        Some((_, why)) => Err(dir.fail(format!("{why}\n{}", support::tail(&console, 30)))),
        None => Ok(()),
    }
}

/// A gateway on `--net gvproxy` (booted as `vm run` boots it): SERVING over mTLS through
/// gvproxy's forward on 127.0.0.1 only, gvproxy running as nobody, and `verify` passing every
/// row with gvproxy as the instance's network helper.
fn gateway_serves_mtls_through_the_forward_and_verifies(
    a: &Artifacts,
    vmm: VmmChoice,
    dir: TrialDir,
) -> Result<(), Failed> {
    let binary = gvproxy()?;
    let booted = support::with_free_port(|port| {
        let mut g = support::gateway(a, vmm, &dir.path().join("gateways"), port)?;
        g.req.vm.net = Some(Net::Gvproxy);
        g.req.vm.gvproxy = Some(binary.clone());
        std::fs::create_dir_all(dir.path().join("state")).map_err(|e| e.to_string())?;
        g.req.vm.console_log = Some(dir.path().join("state/console.log"));
        let up = g.boot_with(Verification::Required).map_err(|e| format!("boot: {e}"))?;
        Ok((up, g.inst, port))
    });
    let (up, inst, port) = match booted {
        Ok(b) => b,
        Err(e) => return Err(dir.fail(e)),
    };
    let result = (|| -> Result<String, String> {
        let pid = up.vm.gvproxy_pid().ok_or("the VM records no gvproxy")?;
        let bundle = inst.client_bundle().map_err(|e| e.to_string())?;
        let health = health(&up.endpoint, &bundle)?;
        if health != openshell_gateway::ServingStatus::Serving {
            return Err(format!("health through gvproxy's forward says {health:?}"));
        }
        let listeners = support::tcp_listeners(port);
        if listeners.is_empty() || listeners.iter().any(|l| l != "127.0.0.1") {
            return Err(format!("port {port} listens on {listeners:?}, not on 127.0.0.1 only"));
        }
        if nix::unistd::geteuid().is_root() && uid_of(pid) != Some(65534) {
            return Err(format!("gvproxy pid {pid} runs as uid {:?}, not nobody", uid_of(pid)));
        }
        let matrix = openshell_instance::verify::verify(&inst).map_err(|e| format!("verify could not run: {e}"))?;
        let table = matrix.render();
        if matrix.exit_code() != 0 || matrix.rows.iter().any(|r| r.status != Status::Pass) {
            return Err(format!("verify did not pass every row:\n{table}"));
        }
        for row in ["gvproxy-process", "forward-loopback-only", "mtls-handshake", "health"] {
            if matrix.row(row).is_none() {
                return Err(format!("verify has no {row} row:\n{table}"));
            }
        }
        Ok(format!(
            "{table}gvproxy pid {pid} as uid {:?}; SERVING at {} after {:.1} s",
            uid_of(pid),
            up.endpoint,
            up.ready.as_secs_f64()
        ))
    })();
    drop(up);
    match result {
        Ok(report) => {
            println!("{report}");
            Ok(())
        }
        Err(e) => Err(dir.fail(e)),
    }
}

fn health(
    endpoint: &str,
    bundle: &openshell_gateway::ClientBundle,
) -> Result<openshell_gateway::ServingStatus, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let ch = openshell_gateway::connect(endpoint, bundle, "localhost").await.map_err(|e| e.to_string())?;
        openshell_gateway::health(&ch).await.map_err(|e| e.to_string())
    })
}

/// A detached gateway on `--net gvproxy` whose gvproxy is SIGKILLed: the supervisor stops the VM
/// and exits, nothing is left, and the instance's status names gvproxy and the signal.
fn gvproxy_killed_fails_the_instance_and_status_says_so(
    a: &Artifacts,
    vmm: VmmChoice,
    dir: TrialDir,
) -> Result<(), Failed> {
    let binary = gvproxy()?;
    let detached = support::with_free_port(|port| {
        let mut g = support::gateway(a, vmm, &dir.path().join("gateways"), port)?;
        g.req.vm.net = Some(Net::Gvproxy);
        g.req.vm.gvproxy = Some(binary.clone());
        let d = g.detach().map_err(|e| format!("detach: {e}"))?;
        Ok((d, g.inst))
    });
    let (mut d, inst) = match detached {
        Ok(v) => v,
        Err(e) => return Err(dir.fail(e)),
    };
    let result = (|| -> Result<String, String> {
        let m = inst.read_metadata().ok_or("no readable metadata.json")?;
        let (Some(gv), Some(vm)) = (m.gvproxy_pid, m.vm_pid) else {
            return Err(format!("metadata.json records no gvproxy and VMM pid: {m:?}"));
        };
        if m.passt_pid.is_some() {
            return Err(format!("a gvproxy instance records a passt pid: {m:?}"));
        }
        let killed = Instant::now();
        // A pid the instance's metadata names, of a live instance this trial started.
        openshell_vm::child::signal(gv, nix::sys::signal::Signal::SIGKILL).map_err(|e| format!("kill -9 {gv}: {e}"))?;
        // The hang guard: the supervisor stops the VM and exits within seconds.
        let deadline = killed + Duration::from_secs(60);
        let exit = loop {
            if let Some(status) = d.child.try_wait().map_err(|e| e.to_string())? {
                break status;
            }
            if Instant::now() > deadline {
                return Err("the supervisor still runs 60 s after gvproxy was killed".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = killed.elapsed();
        let left: Vec<u32> = [gv, vm].into_iter().filter(|p| support::process_exists(*p)).collect();
        if !left.is_empty() {
            return Err(format!("pids {left:?} (gvproxy {gv}, VMM {vm}) are still there"));
        }
        let status = inst.status();
        let failure = status.failure.ok_or_else(|| format!("status records no failure: {status:?}"))?;
        let said = failure.to_string();
        if status.running
            || failure.child != openshell_vm::Child::Gvproxy
            || !said.contains("gvproxy exited (signal 9)")
        {
            return Err(format!(
                "status does not say gvproxy was killed: running {}, failure {said:?}",
                status.running
            ));
        }
        let log =
            std::fs::read_to_string(inst.dir.join("supervisor.log")).map_err(|e| format!("supervisor.log: {e}"))?;
        if !log.contains("gvproxy exited (signal 9)") {
            return Err(format!("supervisor.log does not name gvproxy:\n{}", support::tail(&log, 20)));
        }
        Ok(format!(
            "kill -9 gvproxy → supervisor exited ({exit}) after {:.2} s; status: failed: {said}",
            took.as_secs_f64()
        ))
    })();
    // On every path out: nothing of the instance keeps running.
    let _ = inst.stop(Duration::from_secs(10));
    let _ = d.child.kill();
    let _ = d.child.wait();
    match result {
        Ok(report) => {
            println!("{report}");
            Ok(())
        }
        Err(e) => Err(dir.fail(e)),
    }
}

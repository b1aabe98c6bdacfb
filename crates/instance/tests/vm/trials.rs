//! The trials. Each boots its own VM with its own state directory.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use libtest_mimic::{Failed, Trial};
use openshell_vm::{VmConfig, VmmChoice};

use crate::nested::Route;
use crate::support::{self, Artifacts, TrialDir};
use openshell_instance::preset;
use openshell_instance::state::GatewayInstance;

pub type Body = fn(&Artifacts, VmmChoice, TrialDir) -> Result<(), Failed>;

/// Every group of trials; a new suite lives in its own module and adds its slice here.
const GROUPS: &[&[(&str, Body)]] = &[
    CONTRACT,
    crate::lifecycle::TRIALS,
    crate::provenance::TRIALS,
    crate::verify::TRIALS,
    crate::guest_check::TRIALS,
    crate::stop::TRIALS,
    crate::cli::TRIALS,
    crate::flood::TRIALS,
    crate::faults::TRIALS,
    crate::sandbox::TRIALS,
    crate::gvproxy::TRIALS,
    crate::sdk::TRIALS,
    crate::disk::TRIALS,
    crate::profile::TRIALS,
    crate::image::TRIALS,
];

/// The contract every backend honours.
const CONTRACT: &[(&str, Body)] = &[
    ("exec_true_exits_0", exec_true_exits_0),
    ("exec_false_exits_1", exec_false_exits_1),
    ("exec_exit_code_42_propagates", exec_exit_code_42_propagates),
    ("guest_sees_configured_vcpus_and_memory", guest_sees_configured_vcpus_and_memory),
    ("env_and_workdir_reach_guest", env_and_workdir_reach_guest),
    ("console_log_written", console_log_written),
    ("sigterm_to_supervisor_stops_guest_and_leaves_no_process", sigterm_stops_guest),
    ("missing_kernel_gives_clear_error", missing_kernel_gives_clear_error),
    ("net::port_forward_reaches_guest_service", port_forward_reaches_guest_service),
    ("net::forward_listens_on_loopback_only", forward_listens_on_loopback_only),
    ("net::port_in_use_is_reported_before_boot", port_in_use_is_reported_before_boot),
    ("gateway::gateway_boots_and_service_becomes_reachable", gateway_boots_and_service_becomes_reachable),
    ("gateway::client_without_certificate_is_rejected", client_without_certificate_is_rejected),
    ("gateway::client_with_foreign_ca_is_rejected", client_with_foreign_ca_is_rejected),
    ("gateway::warm_boot_reuses_pki", warm_boot_reuses_pki),
    ("gateway::two_instances_side_by_side", two_instances_side_by_side),
    ("gateway::stop_leaves_no_process_behind", stop_leaves_no_process_behind),
];

pub fn all() -> Vec<Trial> {
    let artifacts = support::artifacts();
    let required = support::required_backends();
    let mut trials = Vec::new();
    // The host's facts are probed once for every trial (`support::host`), and the plan decides.
    let host = support::host();
    let krun_place = openshell_vm::plan(host, VmmChoice::Krun, openshell_vm::Net::None).krun;
    for (backend, vmm, usable) in support::backends() {
        let must_run = required.iter().any(|b| b == backend);
        for &(name, body) in GROUPS.iter().copied().flatten() {
            let full = format!("{backend}::{name}");
            // Where libkrun runs only nested, each krun trial runs inside its own L1.
            let nested = match crate::nested::route(&full, &krun_place, &artifacts) {
                Some(Route::Nested(run)) => Some(trial(full.clone(), backend, None, must_run, move |dir| run.run(dir))),
                Some(Route::Cannot(why)) => Some(trial(full.clone(), backend, Some(why), must_run, |_| unreachable!())),
                // Ignored whether or not krun is required, and listed with its reason in the
                // summary: the CLI trials need a cargo-free xtask inside L1 (not built yet).
                Some(Route::NotNested(why)) => Some(trial(full.clone(), backend, Some(why), false, |_| unreachable!())),
                None => None,
            };
            if let Some(nested) = nested {
                trials.push(nested);
                continue;
            }
            let cannot = match (&usable, &artifacts) {
                (Err(why), _) => Some(why.clone()),
                (Ok(()), Err(why)) if !support::require() => Some(why.clone()),
                _ => None,
            };
            let artifacts = artifacts.clone();
            trials.push(trial(full, backend, cannot, must_run, move |dir| {
                body(&artifacts.map_err(Failed::from)?, vmm, dir)
            }));
        }
    }
    // The VM suites did not run at all (plain `cargo nextest run`): say so with a failure, not a
    // green run of ignored trials.
    if let (Err(why), false) = (&artifacts, support::require()) {
        let why = why.clone();
        trials.push(Trial::test("setup::vm_suites_ran", move || {
            Err(format!("every VM trial is ignored: {why}. `cargo xtask test` builds the artifacts and runs them")
                .into())
        }));
    }
    trials.push(krun_smoke_trial(host, &artifacts));
    trials.push(crate::nested::fault_trial());
    trials.extend(crate::arch::trials(&required));
    trials
}

/// On hosts where libkrun's guest cannot reach userspace, still prove the FFI wiring, kernel
/// loading and console: this trial runs wherever /dev/kvm opens, PVM included, and records how far
/// the guest got, so "never reaches userspace" stays a measurement.
fn krun_smoke_trial(host: &openshell_vm::HostFacts, artifacts: &Result<Artifacts, String>) -> Trial {
    let smoke = "krun::smoke_kernel_prints_first_line";
    let kvm_usable = host.kvm.usable();
    // The VMM drops to an unprivileged user with `/dev/kvm`'s group, as every VM does: on a host
    // whose /dev/kvm only root may open (this CI host's: 0600 root:root, no udev), libkrun cannot
    // run directly at all, so there is nothing to smoke-test; the krun trials run nested instead.
    let unprivileged = openshell_vm::sandbox::VmmUser::for_vmm(true).err().map(|e| e.to_string());
    let cannot = match (artifacts, kvm_usable, std::env::var_os("OPENSHELL_VMM")) {
        (_, false, _) => Some("no usable /dev/kvm".to_owned()),
        (_, true, _) if unprivileged.is_some() => unprivileged.clone(),
        (Ok(_), true, Some(_)) => None,
        (Err(why), _, _) => Some(why.clone()),
        (Ok(_), true, None) => {
            Some("OPENSHELL_VMM not set to the openshell-vmm binary; run `cargo xtask e2e --vm`".to_owned())
        }
    };
    let must_run = unprivileged.is_none()
        && (support::required_backends().iter().any(|b| b == "krun") || (support::require() && kvm_usable));
    let (a, pvm) = (artifacts.clone(), host.kvm.pvm());
    trial(smoke.to_owned(), "krun", cannot, must_run, move |dir| krun_smoke(&a.map_err(Failed::from)?, dir, pvm))
}

/// One trial of `backend`: run and observed (its VMMs counted, its record written); or, when it
/// `cannot` run here, a failure if the backend `must_run`, else ignored with the reason (and a
/// failure with that reason if forced to run with `--run-ignored`).
pub fn trial(
    name: String,
    backend: &'static str,
    cannot: Option<String>,
    must_run: bool,
    body: impl FnOnce(TrialDir) -> Result<(), Failed> + Send + 'static,
) -> Trial {
    match cannot {
        Some(why) if must_run => Trial::test(name.clone(), move || {
            support::observe(&name, backend, |_| {
                Err(format!("the {backend} backend is required here (--require-backend) but cannot run: {why}").into())
            })
        }),
        Some(why) => Trial::test(name, {
            let why = why.clone();
            move || Err(format!("not run: {why}").into())
        })
        .with_ignored_flag(true)
        .with_kind(why),
        None => Trial::test(name.clone(), move || support::observe(&name, backend, body)),
    }
}

fn expect_code(cfg: &VmConfig, dir: TrialDir, want: i32) -> Result<(), Failed> {
    let (code, _, dir) = support::run(cfg, dir)?;
    if code != want {
        return Err(dir.fail(format!("guest exit code {code}, expected {want}")));
    }
    Ok(())
}

fn exec_true_exits_0(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    expect_code(&support::config(a, &dir, vmm, &["/bin/true"]), dir, 0)
}

fn exec_false_exits_1(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    expect_code(&support::config(a, &dir, vmm, &["/bin/false"]), dir, 1)
}

fn exec_exit_code_42_propagates(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    expect_code(&support::config(a, &dir, vmm, &["/bin/sh", "-c", "exit 42"]), dir, 42)
}

fn guest_sees_configured_vcpus_and_memory(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let script = "echo cpus=$(grep -c ^processor /proc/cpuinfo) mem_kib=$(awk '/MemTotal/{print $2}' /proc/meminfo)";
    let mut cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", script]);
    cfg.vcpus = 2;
    cfg.mem_mib = 384;
    let (code, console, dir) = support::run(&cfg, dir)?;
    let line = console.lines().find(|l| l.starts_with("cpus=")).unwrap_or("").to_owned();
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)?.parse::<u64>().ok());
    match (code, field("cpus="), field("mem_kib=")) {
        // MemTotal is what the kernel keeps after its own reservations: below 384 MiB, above 300.
        (0, Some(2), Some(kib)) if (300 * 1024..=384 * 1024).contains(&kib) => Ok(()),
        _ => Err(dir.fail(format!("expected 2 vCPUs and ~384 MiB, guest said {line:?} (exit {code})"))),
    }
}

fn env_and_workdir_reach_guest(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let mut cfg =
        support::config(a, &dir, vmm, &["/bin/sh", "-c", "echo \"seen FOO=$FOO PWD=$(pwd) HOST=$(hostname)\""]);
    cfg.exec.env = vec![("FOO".into(), "bar baz".into())];
    cfg.exec.workdir = Some("/etc".into());
    let (code, console, dir) = support::run(&cfg, dir)?;
    if code != 0 || !console.contains("seen FOO=bar baz PWD=/etc HOST=gateway") {
        return Err(dir.fail(format!("env/workdir not seen in the guest (exit {code})")));
    }
    Ok(())
}

fn console_log_written(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let mut cfg = support::config(a, &dir, vmm, &["/bin/echo", "hello-from-the-guest"]);
    let custom = dir.path().join("custom-console.log");
    cfg.console_log = Some(custom.clone());
    let (code, _, dir) = support::run(&cfg, dir)?;
    let text = std::fs::read_to_string(&custom).unwrap_or_default();
    if code != 0 || !text.contains("hello-from-the-guest") || !text.contains("openshell-init: [") {
        return Err(dir.fail(format!("console log {} lacks the guest's output (exit {code})", custom.display())));
    }
    Ok(())
}

/// SIGTERM to the process that runs the VM (`vm run --exec`'s) asks the guest to stop: init
/// passes SIGTERM to the workload, whose trap answers with exit 7, reports that code through the
/// share and powers off. Exit 7 can only come from the guest (the host's own code would be 143).
fn sigterm_stops_guest(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let _ = a;
    let state = dir.path().join("state");
    let script = "trap 'echo workload-got-term; exit 7' TERM; echo workload-running; while :; do sleep 0.1; done";
    let mut sup = support::supervisor_command(&state, support::vmm_name(vmm), &["/bin/sh", "-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| dir_fail_now(&format!("cannot start supervisor: {e}")))?;
    let mut line = String::new();
    BufReader::new(sup.stdout.take().unwrap()).read_line(&mut line).ok();
    let Some(vmm_pid) = line.trim().strip_prefix("vmm-pid=").and_then(|p| p.parse::<u32>().ok()) else {
        let _ = sup.kill();
        return Err(dir.fail(format!("supervisor did not report a VMM pid: {line:?}")));
    };
    // Signal only once the workload runs (its trap is set), so this tests stopping a live guest.
    let console = state.join("console.log");
    let deadline = Instant::now() + support::GUEST_TIMEOUT;
    while !std::fs::read_to_string(&console).unwrap_or_default().contains("workload-running") {
        if Instant::now() > deadline {
            let _ = sup.kill();
            return Err(dir.fail("the guest never started its workload"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Our own child.
    let _ = openshell_vm::child::signal(sup.id(), nix::sys::signal::Signal::SIGTERM);
    // A hang guard: the guest's own stop takes its 5 s workload grace, on a host of any speed.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = sup.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = sup.kill();
            return Err(dir.fail("supervisor still running 120 s after SIGTERM"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let guest_side =
        ["stop requested by the host: stopping the workload", "workload-got-term", "exit-code=7; powering off"];
    let missing: Vec<&str> = guest_side.iter().copied().filter(|l| !text.contains(l)).collect();
    if status.code() != Some(7) || !missing.is_empty() {
        return Err(dir.fail(format!(
            "supervisor exited with {status} (expected 7, the workload's own code); console lacks {missing:?}"
        )));
    }
    if support::process_exists(vmm_pid) {
        return Err(dir.fail(format!("VMM pid {vmm_pid} still exists after the supervisor exited")));
    }
    Ok(())
}

fn dir_fail_now(msg: &str) -> Failed {
    msg.into()
}

fn missing_kernel_gives_clear_error(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    dir.expect_refusal_before_boot();
    let mut cfg = support::config(a, &dir, vmm, &["/bin/true"]);
    cfg.kernel = dir.path().join("no-such-vmlinux");
    match crate::support::launch(&cfg) {
        Ok(_) => Err(dir.fail("launch with a missing kernel succeeded")),
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("no-such-vmlinux") && msg.contains("cargo xtask kernel") {
                Ok(())
            } else {
                Err(dir.fail(format!("unhelpful error: {msg}")))
            }
        }
    }
}

/// libkrun boots our kernel and its first line reaches the serial console. Then the guest runs on
/// (up to [`SMOKE_WATCH`]) and the trial records how far it got: on nested PVM it must not reach
/// userspace (if it does, the krun trials are ignored here for a reason that is no longer true).
fn krun_smoke(a: &Artifacts, dir: TrialDir, pvm: bool) -> Result<(), Failed> {
    dir.expect_smoke();
    let cfg = support::config(a, &dir, VmmChoice::Krun, &["/bin/true"]);
    let mut vm = crate::support::launch(&cfg).map_err(|e| format!("launch: {e}"))?;
    // The kernel's first lines come on the serial console (earlyprintk, into vmm.log); init's on
    // hvc0 (the console log), read by the one judge of "reached userspace".
    let log = cfg.state_dir.join("vmm.log");
    let mut console = openshell_vm::launch::Tail::new(&cfg.console_path());
    let mut userspace = openshell_vm::timeline::UserspaceEvidence::default();
    let deadline = Instant::now() + SMOKE_WATCH;
    let mut first_line = None;
    let (text, ended, reached) = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if first_line.is_none() && text.contains("Linux version") {
            first_line = Some(vm.started.elapsed());
        }
        let reached = userspace.feed(&console.read_new());
        let ended = vm.exited();
        if ended.is_some() || reached || Instant::now() > deadline {
            break (text, ended, reached);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let at = vm.started.elapsed().as_secs_f64();
    let pid = vm.pid();
    vm.stop();
    let last = text.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("(nothing)").to_owned();
    let Some(first) = first_line else {
        return Err(dir.fail(format!("no `Linux version` line within {} s; vmm.log:\n{text}", SMOKE_WATCH.as_secs())));
    };
    let how = match ended {
        Some(status) => format!("the VMM ended ({status})"),
        None => "still running; stopped".to_owned(),
    };
    let guest = match (reached, pvm) {
        (true, _) => "the guest reached userspace",
        (false, true) => "the guest did not reach userspace (as expected on nested PVM)",
        (false, false) => "the guest did not reach userspace",
    };
    support::note(format!(
        "krun smoke: kernel started (first kernel line after {:.2} s); {guest}; at {at:.1} s {how}; last serial line: {last}",
        first.as_secs_f64()
    ));
    if support::process_exists(pid) {
        return Err(dir.fail(format!("VMM pid {pid} survived stop()")));
    }
    if pvm && reached {
        return Err(dir.fail(
            "libkrun's guest reached userspace on this nested PVM host: the krun trials are ignored here for a reason that no longer holds",
        ));
    }
    Ok(())
}

/// How long the smoke trial watches the guest after launch.
const SMOKE_WATCH: Duration = Duration::from_secs(20);

/// A guest httpd behind a passt forward: boots with `--net passt -p HOST:8080`, answers over HTTP.
fn boot_httpd(
    a: &Artifacts,
    vmm: VmmChoice,
    dir: &TrialDir,
) -> Result<(openshell_vm::RunningVm, u16, VmConfig), String> {
    let script =
        "mkdir -p /tmp/www && echo hello-from-guest-httpd > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www";
    support::with_free_port(|host| {
        let mut cfg = support::config(a, dir, vmm, &["/bin/sh", "-c", script]);
        cfg.net = openshell_vm::Net::Passt;
        cfg.ports = vec![openshell_vm::PortMap { host, guest: 8080 }];
        let vm = crate::support::launch(&cfg).map_err(|e| format!("launch: {e}"))?;
        Ok((vm, host, cfg))
    })
}

fn http_get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// Waits until the guest's httpd answers through the forward on 127.0.0.1:`port`.
fn wait_http(port: u16) -> bool {
    let deadline = Instant::now() + support::GUEST_TIMEOUT;
    while Instant::now() < deadline {
        if http_get(port).is_some_and(|b| b.contains("hello-from-guest-httpd")) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn port_forward_reaches_guest_service(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let (mut vm, port, _) = boot_httpd(a, vmm, &dir).map_err(|e| dir_fail_now(&e))?;
    if !wait_http(port) {
        drop(vm);
        return Err(dir.fail(format!("no HTTP answer through 127.0.0.1:{port}")));
    }
    let (vmm_pid, passt_pid) = (vm.pid(), vm.passt_pid());
    vm.stop();
    drop(vm);
    if support::process_exists(vmm_pid) || passt_pid.is_some_and(support::process_exists) {
        return Err(dir.fail("VMM or passt still running after stop"));
    }
    Ok(())
}

/// This host's address on its default route (not loopback), if it has one.
fn primary_address() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.254:9").ok()?; // no packet is sent: connect only picks the route
    Some(s.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

fn forward_listens_on_loopback_only(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let (vm, port, _) = boot_httpd(a, vmm, &dir).map_err(|e| dir_fail_now(&e))?;
    // A working forward first: the guest answers through 127.0.0.1.
    if !wait_http(port) {
        drop(vm);
        return Err(dir.fail(format!("no HTTP answer through 127.0.0.1:{port}")));
    }
    // Every listening socket on the forwarded port, from the kernel's own table.
    let listeners = support::tcp_listeners(port);
    // And from outside loopback, the same port must refuse.
    let outside = primary_address()
        .map(|ip| (ip, std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(1)).is_ok()));
    drop(vm);
    if listeners.is_empty() {
        return Err(dir.fail(format!("nothing listens on port {port}")));
    }
    if let Some(bad) = listeners.iter().find(|a| a.as_str() != "127.0.0.1") {
        return Err(dir.fail(format!("port {port} also listens on {bad}: {listeners:?}")));
    }
    if let Some((ip, true)) = outside {
        return Err(dir.fail(format!("the forward answered on {ip}:{port}, outside loopback")));
    }
    Ok(())
}

fn port_in_use_is_reported_before_boot(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    dir.expect_refusal_before_boot();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut cfg = support::config(a, &dir, vmm, &["/bin/true"]);
    cfg.net = openshell_vm::Net::Passt;
    cfg.ports = vec![openshell_vm::PortMap { host: port, guest: 8080 }];
    match crate::support::launch(&cfg) {
        Ok(_) => Err(dir.fail("launch succeeded although the host port was taken")),
        Err(e) if e.to_string().contains(&port.to_string()) && e.to_string().contains("in use") => {
            // Refused before boot: no console was even created.
            if cfg.console_path().exists() {
                return Err(dir.fail("a console log exists: the VM was started before the check"));
            }
            Ok(())
        }
        Err(e) => Err(dir.fail(format!("unhelpful error: {e}"))),
    }
}

/// Boots the gateway preset for an instance under the trial dir and waits for mTLS SERVING.
fn boot_gateway(
    a: &Artifacts,
    vmm: VmmChoice,
    dir: &TrialDir,
) -> Result<(openshell_vm::RunningVm, String, GatewayInstance, (String, String)), String> {
    let (support::GatewayTrial { inst, digests, .. }, mut vm, port) = support::with_free_port(|port| {
        let g = support::gateway(a, vmm, &dir.path().join("gateways"), port)?;
        let vm = crate::support::launch(&g.cfg()).map_err(|e| format!("launch: {e}"))?;
        Ok((g, vm, port))
    })?;
    let endpoint = format!("127.0.0.1:{port}");
    let bundle = inst.client_bundle().map_err(|e| e.to_string())?;
    preset::wait_ready(&mut vm, &endpoint, &bundle, support::GUEST_TIMEOUT, None).map_err(|e| e.to_string())?;
    Ok((vm, endpoint, inst, digests))
}

pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// A hang guard for each TLS step of a probe: a healthy guest answers in milliseconds, but a krun
/// guest two levels down on a loaded host has taken seconds.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// The instance's own client (its CA, its certificate, TLS 1.3), as a probe to alter.
pub(crate) fn own_client(inst: &GatewayInstance) -> Result<openshell_gateway::TlsProbe, String> {
    Ok(openshell_gateway::TlsProbe::with_bundle(&inst.client_bundle().map_err(|e| e.to_string())?, "localhost"))
}

/// `good` is served by `endpoint` over TLS 1.3: shown first in every refusal trial, so that a
/// refusal that follows is the server's verdict on that client, not a dead endpoint.
pub(crate) fn served(endpoint: &str, good: &openshell_gateway::TlsProbe) -> Result<(), String> {
    match openshell_gateway::probe(endpoint, good, PROBE_TIMEOUT).map_err(|e| e.to_string())? {
        openshell_gateway::TlsOutcome::Served { version: openshell_gateway::probe::ProtocolVersion::TLSv1_3 } => Ok(()),
        other => Err(format!("the instance's own client was not served by {endpoint}: {other}")),
    }
}

/// `p` is refused by the server at `endpoint` with exactly `alert`, sent after the client's
/// side of the handshake (TLS 1.3's client-certificate verdict).
fn refused_with(
    endpoint: &str,
    p: &openshell_gateway::TlsProbe,
    alert: openshell_gateway::probe::AlertDescription,
) -> Result<(), String> {
    match openshell_gateway::probe(endpoint, p, PROBE_TIMEOUT).map_err(|e| e.to_string())? {
        openshell_gateway::TlsOutcome::Refused { alert: got, after_handshake: true } if got == alert => Ok(()),
        other => {
            Err(format!("expected {endpoint} to refuse with the alert {alert:?} after the handshake, got: {other}"))
        }
    }
}

/// Runs `check` against a booted gateway, then stops the VM; a failure keeps the trial dir.
pub(crate) fn with_gateway(
    a: &Artifacts,
    vmm: VmmChoice,
    dir: TrialDir,
    check: impl FnOnce(&openshell_vm::RunningVm, &str, &GatewayInstance, &(String, String)) -> Result<(), String>,
) -> Result<(), Failed> {
    let (vm, endpoint, inst, digests) = match boot_gateway(a, vmm, &dir) {
        Ok(up) => up,
        Err(e) => return Err(dir.fail(e)),
    };
    let result = check(&vm, &endpoint, &inst, &digests);
    drop(vm);
    result.map_err(|e| dir.fail(e))
}

fn gateway_boots_and_service_becomes_reachable(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    with_gateway(a, vmm, dir, |vm, endpoint, inst, (kernel_sha, rootfs_sha)| {
        served(endpoint, &own_client(inst)?)?;
        let bundle = inst.client_bundle().map_err(|e| e.to_string())?;
        let info = block_on(async {
            let ch = openshell_gateway::connect(endpoint, &bundle, "localhost").await?;
            openshell_gateway::info(&ch).await
        })
        .map_err(|e| format!("Info failed: {e}"))?;
        // The guest's own facts: its vCPUs and the release of the kernel it runs.
        if info.vcpus != 1 || !info.kernel_release.starts_with("6.1") || info.boot_id.is_empty() {
            return Err(format!("unexpected Info: {info:?}"));
        }
        // Info's digests only echo what the host wrote into the share: this proves the share
        // reached the gateway, not what was booted. The VMM's own command line says that.
        if (&info.kernel_sha256, &info.rootfs_sha256) != (kernel_sha, rootfs_sha) {
            return Err(format!("Info does not echo the digests written into the share: {info:?}"));
        }
        let argv = openshell_vm::procfs::argv(vm.pid()).ok_or("cannot read the VMM's command line")?;
        let cwd = openshell_vm::procfs::cwd(vm.pid()).ok_or("cannot read the VMM's cwd")?;
        let booted =
            openshell_vm::backend::booted_artifacts(&argv, &cwd, &|fd| openshell_vm::procfs::fd_target(vm.pid(), fd))?;
        if (booted.kernel.as_path(), booted.rootfs.as_path()) != (a.kernel.as_path(), a.rootfs.as_path()) {
            return Err(format!(
                "the VMM runs {booted:?}, not {} and {}; argv {argv:?}",
                a.kernel.display(),
                a.rootfs.display()
            ));
        }
        Ok(())
    })
}

fn client_without_certificate_is_rejected(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    with_gateway(a, vmm, dir, |_, endpoint, inst, _| {
        let good = own_client(inst)?;
        served(endpoint, &good)?;
        let anonymous = openshell_gateway::TlsProbe { identity: None, ..good };
        refused_with(endpoint, &anonymous, openshell_gateway::probe::AlertDescription::CertificateRequired)
    })
}

fn client_with_foreign_ca_is_rejected(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    with_gateway(a, vmm, dir, |_, endpoint, inst, _| {
        let good = own_client(inst)?;
        served(endpoint, &good)?;
        // Trusts the real server, but presents a client certificate from another CA.
        let foreign = openshell_pki::Pki::generate("foreign").map_err(|e| e.to_string())?.client_bundle();
        let impostor = openshell_gateway::TlsProbe { identity: Some((foreign.cert_pem, foreign.key_pem)), ..good };
        refused_with(endpoint, &impostor, openshell_gateway::probe::AlertDescription::UnknownCA)
    })
}

fn warm_boot_reuses_pki(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let (vm, _, inst, _) = boot_gateway(a, vmm, &dir).map_err(|e| dir_fail_now(&e))?;
    let first = std::fs::read(inst.mtls_dir().join("tls.key")).unwrap();
    drop(vm);
    let (vm, _, inst, _) = boot_gateway(a, vmm, &dir).map_err(|e| dir_fail_now(&format!("warm boot: {e}")))?;
    drop(vm);
    let second = std::fs::read(inst.mtls_dir().join("tls.key")).unwrap();
    if first != second {
        return Err(dir.fail("the warm boot generated new client credentials"));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(inst.mtls_dir().join("tls.key")).unwrap().permissions().mode() & 0o777;
    let dmode = std::fs::metadata(&inst.dir).unwrap().permissions().mode() & 0o777;
    if mode != 0o600 || dmode != 0o700 {
        return Err(dir.fail(format!("key mode {mode:o}, instance dir mode {dmode:o}; want 600 and 700")));
    }
    Ok(())
}

fn two_instances_side_by_side(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let other = TrialDir::new("side-by-side-second");
    let (vm1, ep1, inst1, _) = boot_gateway(a, vmm, &dir).map_err(|e| dir_fail_now(&e))?;
    let (vm2, ep2, inst2, _) = boot_gateway(a, vmm, &other).map_err(|e| dir_fail_now(&format!("second: {e}")))?;
    let result = (|| {
        let (good1, good2) = (own_client(&inst1)?, own_client(&inst2)?);
        served(&ep1, &good1)?;
        served(&ep2, &good2)?;
        let mut ids = Vec::new();
        for (ep, inst) in [(&ep1, &inst1), (&ep2, &inst2)] {
            let bundle = inst.client_bundle().map_err(|e| e.to_string())?;
            let info = block_on(async {
                let ch = openshell_gateway::connect(ep, &bundle, "localhost").await?;
                openshell_gateway::info(&ch).await
            });
            ids.push(info.map_err(|e| format!("Info from {ep}: {e}"))?.boot_id);
        }
        if ids[0] == ids[1] || ids[0].is_empty() {
            return Err(format!("expected two distinct guests, boot ids {ids:?}"));
        }
        // Instance 1's client certificate, trusting instance 2's server: the handshake reaches
        // instance 2's client-certificate check, and that check must refuse it. Both instances
        // are named `trial` (in two roots), so both CAs are "openshell-trial CA": instance 2
        // finds an issuer of that name, and the signature check under its own key refuses the
        // certificate with DecryptError (a CA of another name gets UnknownCA, as above).
        let crossed = openshell_gateway::TlsProbe { server_ca_pem: good2.server_ca_pem.clone(), ..good1 };
        refused_with(&ep2, &crossed, openshell_gateway::probe::AlertDescription::DecryptError)
            .map_err(|e| format!("instance 1's certificate at instance 2: {e}"))
    })();
    drop((vm1, vm2));
    result.map_err(|e| dir.fail(e))
}

fn stop_leaves_no_process_behind(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let (mut vm, endpoint, _, _) = boot_gateway(a, vmm, &dir).map_err(|e| dir_fail_now(&e))?;
    let (vmm_pid, passt_pid) = (vm.pid(), vm.passt_pid());
    vm.stop();
    drop(vm);
    let left: Vec<u32> =
        [Some(vmm_pid), passt_pid].into_iter().flatten().filter(|&p| support::process_exists(p)).collect();
    if !left.is_empty() {
        return Err(dir.fail(format!("processes left after stop: {left:?}")));
    }
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    if !support::tcp_listeners(port).is_empty() {
        return Err(dir.fail(format!("port {port} still listens after stop")));
    }
    Ok(())
}

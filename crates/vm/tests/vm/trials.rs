//! The trials. Each boots its own VM with its own state directory.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use libtest_mimic::{Failed, Trial};
use openshell_vm::{VmConfig, VmmChoice};

use crate::support::{self, Artifacts, TrialDir};
use openshell_vm::gateway::{self, GatewayInstance};

pub type Body = fn(&Artifacts, VmmChoice, TrialDir) -> Result<(), Failed>;

/// Every group of trials; a new suite lives in its own module and adds its slice here.
const GROUPS: &[&[(&str, Body)]] =
    &[CONTRACT, crate::lifecycle::TRIALS, crate::provenance::TRIALS, crate::verify::TRIALS, crate::guest_check::TRIALS];

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
    let mut trials = Vec::new();
    for (backend, vmm, usable) in support::backends() {
        for &(name, body) in GROUPS.iter().copied().flatten() {
            let full = format!("{backend}::{name}");
            if let Some(nested) = crate::nested::route(&full, &artifacts) {
                trials.push(nested);
                continue;
            }
            let reason = match (&usable, &artifacts) {
                (Err(why), _) => Some(why.clone()),
                (Ok(()), Err(why)) if !support::require() => Some(why.clone()),
                _ => None,
            };
            trials.push(match reason {
                Some(why) => Trial::test(full, || Ok(())).with_ignored_flag(true).with_kind(why),
                None => {
                    let artifacts = artifacts.clone();
                    Trial::test(full.clone(), move || {
                        let a = artifacts.map_err(Failed::from)?;
                        body(&a, vmm, TrialDir::new(&full))
                    })
                }
            });
        }
    }
    // On hosts where libkrun's guest cannot reach userspace, still prove the FFI wiring, kernel
    // loading and console: this trial runs wherever /dev/kvm opens, PVM included.
    let host = openshell_vm::HostFacts::probe();
    let smoke = "krun::smoke_kernel_prints_first_line";
    trials.push(match (&artifacts, host.kvm_usable, std::env::var_os("OPENSHELL_VMM")) {
        (Ok(_), true, Some(_)) => {
            let a = artifacts.clone();
            Trial::test(smoke, move || krun_smoke(&a.map_err(Failed::from)?, TrialDir::new(smoke)))
        }
        (_, false, _) => Trial::test(smoke, || Ok(())).with_ignored_flag(true).with_kind("no usable /dev/kvm"),
        (Err(why), _, _) if !support::require() => Trial::test(smoke, || Ok(())).with_ignored_flag(true).with_kind(why.clone()),
        _ if !support::require() => Trial::test(smoke, || Ok(()))
            .with_ignored_flag(true)
            .with_kind("OPENSHELL_VMM not set to the openshell-vmm binary; run `cargo xtask e2e --vm`"),
        _ => Trial::test(smoke, || Err("artifacts or OPENSHELL_VMM missing with OPENSHELL_E2E_REQUIRE=1".into())),
    });
    trials
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
    let mut cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", "echo \"seen FOO=$FOO PWD=$(pwd) HOST=$(hostname)\""]);
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

fn sigterm_stops_guest(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let _ = a;
    let state = dir.path().join("state");
    let vmm_name = match vmm {
        VmmChoice::Krun => "krun",
        _ => "qemu",
    };
    let mut sup = support::supervisor_command(&state, vmm_name, &["/bin/sleep", "600"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| dir_fail_now(&format!("cannot start supervisor: {e}")))?;
    let mut line = String::new();
    BufReader::new(sup.stdout.take().unwrap()).read_line(&mut line).ok();
    let Some(vmm_pid) = line.trim().strip_prefix("vmm-pid=").and_then(|p| p.parse::<u32>().ok()) else {
        let _ = sup.kill();
        return Err(dir.fail(format!("supervisor did not report a VMM pid: {line:?}")));
    };
    // Signal only once the guest runs the command, so this tests stopping a live guest.
    let console = state.join("console.log");
    let deadline = Instant::now() + support::GUEST_TIMEOUT;
    while !std::fs::read_to_string(&console).unwrap_or_default().contains("exec /bin/sleep") {
        if Instant::now() > deadline {
            let _ = sup.kill();
            return Err(dir.fail("guest never started /bin/sleep"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(sup.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = sup.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = sup.kill();
            return Err(dir.fail("supervisor still running 15 s after SIGTERM"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.code() != Some(128 + libc::SIGTERM) {
        return Err(dir.fail(format!("supervisor exited with {status}, expected 143")));
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
    let mut cfg = support::config(a, &dir, vmm, &["/bin/true"]);
    cfg.kernel = dir.path().join("no-such-vmlinux");
    match openshell_vm::launch(&cfg) {
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

/// libkrun boots our kernel and its first line reaches the serial console; then the VMM is stopped.
fn krun_smoke(a: &Artifacts, dir: TrialDir) -> Result<(), Failed> {
    let mut cfg = support::config(a, &dir, VmmChoice::Krun, &["/bin/true"]);
    cfg.krun_vmm_binary = std::env::var_os("OPENSHELL_VMM").map(Into::into);
    let mut vm = openshell_vm::launch(&cfg).map_err(|e| format!("launch: {e}"))?;
    let log = cfg.state_dir.join("vmm.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("Linux version") {
            println!("krun: first kernel line after {:.2}s", vm.started.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() > deadline {
            drop(vm);
            return Err(dir.fail(format!("no `Linux version` line within 60 s; vmm.log:\n{text}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = vm.pid();
    vm.stop();
    if support::process_exists(pid) {
        return Err(dir.fail(format!("VMM pid {pid} survived stop()")));
    }
    Ok(())
}

/// A guest httpd behind a passt forward: boots with `--net passt -p HOST:8080`, answers over HTTP.
fn boot_httpd(a: &Artifacts, vmm: VmmChoice, dir: &TrialDir) -> Result<(openshell_vm::RunningVm, u16, VmConfig), String> {
    let script = "mkdir -p /tmp/www && echo hello-from-guest-httpd > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www";
    let mut cfg = support::config(a, dir, vmm, &["/bin/sh", "-c", script]);
    let host = support::free_port();
    cfg.net = openshell_vm::NetMode::Passt;
    cfg.ports = vec![openshell_vm::PortMap { host, guest: 8080 }];
    let vm = openshell_vm::launch(&cfg).map_err(|e| format!("launch: {e}"))?;
    Ok((vm, host, cfg))
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
    let outside = primary_address().map(|ip| (ip, std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(1)).is_ok()));
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
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut cfg = support::config(a, &dir, vmm, &["/bin/true"]);
    cfg.net = openshell_vm::NetMode::Passt;
    cfg.ports = vec![openshell_vm::PortMap { host: port, guest: 8080 }];
    match openshell_vm::launch(&cfg) {
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
    let port = support::free_port();
    let support::GatewayTrial { inst, cfg, digests } = support::gateway(a, vmm, &dir.path().join("gateways"), port)?;
    let mut vm = openshell_vm::launch(&cfg).map_err(|e| format!("launch: {e}"))?;
    let endpoint = format!("127.0.0.1:{port}");
    let bundle = inst.client_bundle().map_err(|e| e.to_string())?;
    gateway::wait_ready(&mut vm, &endpoint, &bundle, support::GUEST_TIMEOUT).map_err(|e| e.to_string())?;
    Ok((vm, endpoint, inst, digests))
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

fn gateway_boots_and_service_becomes_reachable(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let (vm, endpoint, inst, (kernel_sha, rootfs_sha)) = boot_gateway(a, vmm, &dir).map_err(|e| dir_fail_now(&e))?;
    let bundle = inst.client_bundle().unwrap();
    let info = block_on(async {
        let ch = openshell_gateway::connect(&endpoint, &bundle, "localhost").await?;
        openshell_gateway::info(&ch).await
    });
    drop(vm);
    let info = info.map_err(|e| dir_fail_now(&format!("Info failed: {e}")))?;
    if info.vcpus != 1 || !info.kernel_release.starts_with("6.1") || info.kernel_sha256 != kernel_sha || info.rootfs_sha256 != rootfs_sha {
        return Err(dir.fail(format!("unexpected Info: {info:?}")));
    }
    Ok(())
}

fn client_without_certificate_is_rejected(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let (vm, endpoint, inst, _) = boot_gateway(a, vmm, &dir).map_err(|e| dir_fail_now(&e))?;
    let ca = inst.client_bundle().unwrap().ca_pem;
    let r = block_on(openshell_gateway::health_without_client_cert(&endpoint, &ca, "localhost"));
    drop(vm);
    match r {
        Err(_) => Ok(()),
        Ok(s) => Err(dir.fail(format!("a client without a certificate got an answer: {s:?}"))),
    }
}

fn client_with_foreign_ca_is_rejected(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let (vm, endpoint, inst, _) = boot_gateway(a, vmm, &dir).map_err(|e| dir_fail_now(&e))?;
    let foreign = openshell_pki::Pki::generate("foreign").unwrap().client_bundle();
    // Trust the real server, but present a client certificate from another CA.
    let bundle = openshell_gateway::ClientBundle {
        ca_pem: inst.client_bundle().unwrap().ca_pem,
        cert_pem: foreign.cert_pem,
        key_pem: foreign.key_pem,
    };
    let r = block_on(async {
        let ch = openshell_gateway::connect(&endpoint, &bundle, "localhost").await?;
        openshell_gateway::health(&ch).await
    });
    drop(vm);
    match r {
        Err(_) => Ok(()),
        Ok(s) => Err(dir.fail(format!("a client with a foreign CA got an answer: {s:?}"))),
    }
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
    let boot_ids = block_on(async {
        let mut ids = Vec::new();
        for (ep, inst) in [(&ep1, &inst1), (&ep2, &inst2)] {
            let ch = openshell_gateway::connect(ep, &inst.client_bundle().unwrap(), "localhost").await?;
            ids.push(openshell_gateway::info(&ch).await?.boot_id);
        }
        Ok::<_, openshell_gateway::ClientError>(ids)
    });
    // Each instance's client bundle must be refused by the other instance.
    let crossed = block_on(async {
        let ch = openshell_gateway::connect(&ep2, &inst1.client_bundle().unwrap(), "localhost").await?;
        openshell_gateway::health(&ch).await
    });
    drop((vm1, vm2));
    let ids = boot_ids.map_err(|e| dir_fail_now(&format!("Info: {e}")))?;
    if ids[0] == ids[1] || ids[0].is_empty() {
        return Err(dir.fail(format!("expected two distinct guests, boot ids {ids:?}")));
    }
    if crossed.is_ok() {
        return Err(dir.fail("instance 2 accepted instance 1's client certificate"));
    }
    Ok(())
}

fn stop_leaves_no_process_behind(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let (mut vm, endpoint, _, _) = boot_gateway(a, vmm, &dir).map_err(|e| dir_fail_now(&e))?;
    let (vmm_pid, passt_pid) = (vm.pid(), vm.passt_pid());
    vm.stop();
    drop(vm);
    let left: Vec<u32> = [Some(vmm_pid), passt_pid].into_iter().flatten().filter(|&p| support::process_exists(p)).collect();
    if !left.is_empty() {
        return Err(dir.fail(format!("processes left after stop: {left:?}")));
    }
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    if !support::tcp_listeners(port).is_empty() {
        return Err(dir.fail(format!("port {port} still listens after stop")));
    }
    Ok(())
}

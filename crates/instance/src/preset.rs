//! The gateway preset: a VM whose workload is `openshell-gateway`, reachable from the host on
//! `127.0.0.1:30051` over mutual TLS, and the readiness check that says it is up. The instance's
//! files it is booted from are [`crate::state`]'s.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use openshell_vm::timeline;
use openshell_vm::{Net, Overrides, PortMap, RunningVm, VmConfig, VmError};

use crate::state::{copy_if_changed, io_err, pki_err, write_if_changed, GatewayInstance};

pub const GATEWAY_PORT: u16 = 30051;
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
const LISTENING_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often readiness probes before the gateway has said it listens: rarely, since such a probe
/// blocks the loop for its whole timeout and would delay noticing the line on a loaded host.
const BLIND_PROBE_EVERY: Duration = Duration::from_secs(5);
/// Inside the guest: where the share puts the server material.
const GUEST_TLS_DIR: &str = "/run/openshell/tls";

/// The gateway's guest memory unless asked otherwise. Measured (`cargo xtask bench memory`): the
/// guest touches ~40 MiB serving load, and the host pays only for what it touches, so 256 MiB is
/// ~6x headroom while capping a runaway guest at half of the 512 MiB an `--exec` VM gets.
pub const GATEWAY_MEM_MIB: u32 = 256;

/// Where the host reaches a gateway booted from `cfg`: `127.0.0.1` and the host port of the
/// forward to the guest's [`GATEWAY_PORT`] (the others forward to whatever else the guest serves).
pub fn endpoint(cfg: &VmConfig) -> Result<String, VmError> {
    match cfg.ports.iter().find(|p| p.guest == GATEWAY_PORT) {
        Some(p) => Ok(format!("127.0.0.1:{}", p.host)),
        None => Err(VmError::Invalid(format!(
            "no -p forward reaches the gateway's port {GATEWAY_PORT} in the guest (got {}): add -p HOST:{GATEWAY_PORT}",
            cfg.ports.iter().map(|p| format!("{}:{}", p.host, p.guest)).collect::<Vec<_>>().join(", ")
        ))),
    }
}

impl GatewayInstance {
    /// The gateway VM on network `net`: server material and artifact digests placed in the guest
    /// share. The gateway is reached through a forward, so it needs a network.
    pub fn vm_config(
        &self,
        kernel: PathBuf,
        rootfs: PathBuf,
        digests: (&str, &str),
        overrides: &Overrides,
    ) -> Result<VmConfig, VmError> {
        let argv = [
            openshell_guest::GATEWAY_BIN,
            "--listen",
            "0.0.0.0:30051",
            "--tls-dir",
            GUEST_TLS_DIR,
            "--kernel-digest-file",
            "/run/openshell/kernel.sha256",
            "--rootfs-digest-file",
            "/run/openshell/rootfs.sha256",
        ];
        let mut cfg = VmConfig::exec(kernel, rootfs, self.vm_dir(), argv.iter().map(|s| s.to_string()).collect());
        cfg.net = Net::default_for(openshell_vm::host::Os::host());
        cfg.mem_mib = GATEWAY_MEM_MIB;
        cfg.ports = vec![PortMap { host: GATEWAY_PORT, guest: GATEWAY_PORT }];
        cfg.update(overrides);
        if cfg.net == Net::None {
            return Err(VmError::Invalid("the gateway is reached through a port forward, so it needs a network: use --net passt or --net gvproxy".into()));
        }
        endpoint(&cfg)?;
        let share = cfg.share_dir();
        // Refuse to boot with broken material rather than let the guest fail obscurely.
        openshell_pki::load_server_material(&self.server_dir()).map_err(pki_err)?;
        let tls = share.join("tls");
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&tls).map_err(io_err(&tls))?;
        // The gateway reads the same file names the pki crate writes.
        let pki_dir = self.server_dir();
        // Unchanged files are left alone: a second `vm run` of a running name gets here before
        // its lock is refused, and the running guest must never read a file while it is being
        // rewritten with the same bytes.
        for f in [openshell_pki::SERVER_CA_FILE, openshell_pki::SERVER_CERT_FILE, openshell_pki::SERVER_KEY_FILE] {
            copy_if_changed(&pki_dir.join(f), &tls.join(f))?;
        }
        write_if_changed(&share.join("kernel.sha256"), digests.0.as_bytes())?;
        write_if_changed(&share.join("rootfs.sha256"), digests.1.as_bytes())?;
        Ok(cfg)
    }
}

/// Polls the gateway's mTLS health check through the forwarded port until it says SERVING.
/// Fails at once, with the kernel's cause, when the guest panics; with the console's last lines
/// if the VM dies or `timeout` passes; the caller's
/// `RunningVm` then stops the VM when dropped, so nothing is left running.
pub fn wait_ready(
    vm: &mut RunningVm,
    endpoint: &str,
    bundle: &openshell_gateway::ClientBundle,
    timeout: Duration,
    stop: Option<&openshell_vm::launch::StopSignals>,
) -> Result<Duration, VmError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io_err(Path::new("tokio")))?;
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no probe yet");
    let mut last_probe = Instant::now();
    let mut console = openshell_vm::launch::Tail::new(&vm.console);
    let mut seen = Vec::new();
    let mut listening = false;
    let mut crash = timeline::CrashWatch::default();
    loop {
        // A stop asked for during the boot (a restart's, where the supervisor listens) ends it now
        // rather than once it is ready, or after the whole ready timeout if it never will be.
        if let Some(signal) = stop.and_then(|s| s.take()) {
            return Err(VmError::StopRequested(signal));
        }
        // A guest that panicked is done whether or not its VMM has exited yet: say why at once.
        let new = console.read_new();
        if let Some(cause) = crash.feed(&new) {
            return Err(vm.crashed(cause));
        }
        if let Some(status) = vm.exited() {
            let text = fs::read_to_string(&vm.console).unwrap_or_default();
            if let Some(cause) = timeline::guest_crash(&text) {
                return Err(vm.crashed(cause));
            }
            return Err(not_ready(vm, &format!("the VM exited ({status}) before the gateway was ready")));
        }
        if let Some((helper, how)) = vm.net_ended() {
            return Err(not_ready(vm, &format!("{helper} exited ({how}) before the gateway was ready")));
        }
        // Probe once the gateway says it listens (seen on the console, a local file). Before
        // that, passt accepts on the host but the connection goes nowhere, and each such probe
        // would burn a whole attempt timeout. A slow fallback probe covers a gateway that never
        // prints the line.
        if !listening && !new.is_empty() {
            seen.extend(new);
            listening = timeline::gateway_listening(&String::from_utf8_lossy(&seen));
        }
        if listening || last_probe.elapsed() >= BLIND_PROBE_EVERY {
            last_probe = Instant::now();
            // Once it listens, a probe is a real handshake under a possibly slow (emulated,
            // loaded) guest: give it time rather than restart it from scratch every 500 ms.
            let bound = if listening { LISTENING_ATTEMPT_TIMEOUT } else { ATTEMPT_TIMEOUT };
            let attempt = rt.block_on(async {
                tokio::time::timeout(bound, async {
                    let t = Instant::now();
                    let ch = openshell_gateway::connect(endpoint, bundle, "localhost").await?;
                    let connected = t.elapsed();
                    let h = openshell_gateway::health(&ch).await;
                    tracing::debug!(
                        connect_ms = connected.as_millis() as u64,
                        health_ms = (t.elapsed() - connected).as_millis() as u64,
                        at_ms = vm.started.elapsed().as_millis() as u64,
                        "readiness probe"
                    );
                    h
                })
                .await
            });
            last = match attempt {
                Ok(Ok(openshell_gateway::ServingStatus::Serving)) => {
                    vm.userspace_shown("the guest's gateway answered mTLS health SERVING");
                    return Ok(vm.started.elapsed());
                }
                Ok(Ok(other)) => format!("health said {other:?}"),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} ms", bound.as_millis()),
            };
            tracing::debug!(elapsed_ms = vm.started.elapsed().as_millis() as u64, listening, %last, "gateway not ready yet");
        }
        if Instant::now() > deadline {
            return Err(not_ready(vm, &format!("not SERVING within {}s (last: {last})", timeout.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(if listening { 25 } else { 10 }));
    }
}

fn not_ready(vm: &RunningVm, why: &str) -> VmError {
    let console = fs::read_to_string(&vm.console).unwrap_or_default();
    let lines: Vec<&str> = console.lines().collect();
    let tail = lines[lines.len().saturating_sub(50)..].join("\n");
    let silent = if timeline::silent(&console) { format!("; {}", timeline::SILENT_GUEST) } else { String::new() };
    VmError::NotReady(format!("{why}{silent}\n--- console (last 50 lines) ---\n{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_without_a_network_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let inst = GatewayInstance::new(&t.path().join("gateways"), "t").unwrap();
        let none = Overrides { net: Some(Net::None), ..Overrides::default() };
        let err = inst.vm_config("/k".into(), "/r".into(), ("a", "b"), &none).unwrap_err().to_string();
        assert!(err.contains("--net passt or --net gvproxy"), "{err}");
    }

    #[test]
    fn every_forward_is_kept_and_the_endpoint_is_the_one_to_the_gateway_port() {
        let t = tempfile::tempdir().unwrap();
        let mut cfg = VmConfig::exec("/k".into(), "/r".into(), t.path().into(), vec!["/bin/true".into()]);
        cfg.ports = vec![PortMap { host: 8080, guest: 80 }, PortMap { host: 40051, guest: GATEWAY_PORT }];
        assert_eq!(endpoint(&cfg).unwrap(), "127.0.0.1:40051");
        let inst = GatewayInstance::new(&t.path().join("gateways"), "t").unwrap();
        let only_web = Overrides { ports: vec![PortMap { host: 8080, guest: 80 }], ..Overrides::default() };
        let err = inst.vm_config("/k".into(), "/r".into(), ("a", "b"), &only_web).unwrap_err().to_string();
        assert!(err.contains("8080:80") && err.contains("add -p HOST:30051"), "{err}");
    }
}

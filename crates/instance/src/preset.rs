//! The gateway preset: a VM whose workload is `openshell-gateway`, reachable from the host on
//! `127.0.0.1:30051` over mutual TLS, and the readiness check that says it is up. The instance's
//! files it is booted from are [`crate::state`]'s.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::Duration;

use openshell_vm::{Net, Overrides, PortMap, RunningVm, VmConfig, VmError};

use crate::state::{copy_if_changed, io_err, pki_err, write_if_changed, GatewayInstance};

pub const GATEWAY_PORT: u16 = 30051;
/// Inside the guest: where the share puts the server material.
const GUEST_TLS_DIR: &str = "/run/openshell/tls";

/// The gateway's guest memory unless asked otherwise. Measured (`cargo xtask bench memory`): the
/// guest touches ~40 MiB serving load, and the host pays only for what it touches, so 256 MiB is
/// ~6x headroom while capping a runaway guest at half of the 512 MiB an `--exec` VM gets.
pub const GATEWAY_MEM_MIB: u32 = 256;

/// Where the host reaches a gateway booted from `cfg`: `127.0.0.1` and the host port of the
/// forward to the guest's [`GATEWAY_PORT`] (the others forward to whatever else the guest serves).
pub fn endpoint(cfg: &VmConfig) -> Result<String, VmError> {
    crate::ready::host_endpoint(&cfg.ports, GATEWAY_PORT, "the gateway")
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

/// Waits for the gateway's mTLS health check through the forward at `endpoint` to say SERVING
/// ([`crate::ready::wait`] with the gateway's probe).
pub fn wait_ready(
    vm: &mut RunningVm,
    endpoint: &str,
    bundle: &openshell_gateway::ClientBundle,
    timeout: Duration,
    stop: Option<&openshell_vm::launch::StopSignals>,
) -> Result<Duration, VmError> {
    let probe = crate::ready::Probe::mtls_health(bundle.clone(), GATEWAY_PORT);
    crate::ready::wait(vm, &probe, endpoint, timeout, stop)
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

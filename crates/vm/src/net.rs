//! Guest networking: the port map and the passt process that carries the guest's NIC.
//!
//! passt gets one end of a socketpair (`--fd`) and the VMM the other (QEMU: `-netdev stream` on
//! that fd; libkrun: `krun_set_passt_fd`), so no socket path exists and passt's drop to `nobody`
//! as root cannot break it. Forwards bind `127.0.0.1` only: a bare port would listen on every
//! interface. The guest's address is fixed and handed to init on the kernel command line, so the
//! guest needs no DHCP round trip.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::VmError;

/// Address passt assigns the guest, its gateway (the host, through passt), and the prefix.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const PREFIX_LEN: u8 = 24;
/// The fd number the VMM and passt find their socket end at.
pub const CHILD_FD: i32 = 3;
pub const INSTALL_HINT: &str = "apt-get install -y passt";

/// `-p HOST:GUEST`: a TCP port on 127.0.0.1 forwarded to a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    pub host: u16,
    pub guest: u16,
}

impl FromStr for PortMap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| format!("bad port {p:?} in {s:?}: expected 1-65535"))
        };
        match s.split_once(':') {
            Some((h, g)) => Ok(PortMap { host: port(h)?, guest: port(g)? }),
            None => Ok(PortMap { host: port(s)?, guest: port(s)? }),
        }
    }
}

impl fmt::Display for PortMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.guest)
    }
}

/// How the guest is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetMode {
    #[default]
    None,
    Passt,
}

impl FromStr for NetMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(NetMode::None),
            "passt" => Ok(NetMode::Passt),
            _ => Err(format!("unknown network backend {s:?}: expected passt or none")),
        }
    }
}

/// Fails naming the first host port that something already listens on.
pub fn check_ports_free(ports: &[PortMap]) -> Result<(), VmError> {
    for p in ports {
        if TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, p.host)).is_err() {
            return Err(VmError::PortInUse(p.host));
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = ports.iter().find(|p| !seen.insert(p.host)) {
        return Err(VmError::Invalid(format!("host port {} is mapped twice", dup.host)));
    }
    Ok(())
}

/// The guest's network settings for its init, on the kernel command line (see
/// `openshell_guest::netconf`): the static address passt hands out, directly or as the fallback
/// when DHCP is asked for, and passt's DNS forwarder at the gateway address.
pub fn guest_cmdline_param(dhcp: bool) -> String {
    use openshell_guest::netconf::{Ipv4Config, DNS_PARAM, FALLBACK_PARAM, NET_PARAM};
    let addr = Ipv4Config { addr: GUEST_ADDR, prefix: PREFIX_LEN, gateway: Some(GATEWAY_ADDR) }.param();
    let net = if dhcp { format!("{NET_PARAM}=dhcp {FALLBACK_PARAM}={addr}") } else { format!("{NET_PARAM}={addr}") };
    format!("{net} {DNS_PARAM}={GATEWAY_ADDR}")
}

/// A running passt; stopped on drop.
#[derive(Debug)]
pub struct Passt {
    child: Option<Child>,
}

/// Starts passt with the forwards; returns it and the socket end the VMM must inherit.
pub fn start_passt(ports: &[PortMap], log: std::fs::File) -> Result<(Passt, OwnedFd), VmError> {
    let passt = which::which("passt")
        .map_err(|_| VmError::NoBackend(format!("passt is not installed; {INSTALL_HINT}")))?;
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array we own.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        return Err(VmError::Spawn { what: "passt socketpair".into(), source: std::io::Error::last_os_error() });
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    let (ours, vmm_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut cmd = Command::new(passt);
    cmd.args(["-f", "-q", "--fd", &CHILD_FD.to_string()])
        .args(["-a", &GUEST_ADDR.to_string(), "-n", &PREFIX_LEN.to_string(), "-g", &GATEWAY_ADDR.to_string()])
        .args(["-u", "none"])
        // DNS sent to the gateway address goes to the host's resolver; init points the guest's
        // resolv.conf there.
        .args(["--dns-forward", &GATEWAY_ADDR.to_string()]);
    if ports.is_empty() {
        cmd.args(["-t", "none"]);
    }
    for p in ports {
        cmd.arg("-t").arg(format!("127.0.0.1/{}:{}", p.host, p.guest));
    }
    let err = log.try_clone().map_err(|source| VmError::Spawn { what: "passt".into(), source })?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(err);
    inherit_as_child_fd(&mut cmd, ours.as_raw_fd());
    let child = cmd.spawn().map_err(|source| VmError::Spawn { what: "passt".into(), source })?;
    drop(ours);
    let mut passt = Passt { child: Some(child) };
    passt.wait_listening(ports)?;
    Ok((passt, vmm_end))
}

/// Makes `fd` appear as [`CHILD_FD`] in the child (dup2 clears close-on-exec), and ties the
/// child's life to ours.
pub fn inherit_as_child_fd(cmd: &mut Command, fd: i32) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec, so clear the flag explicitly then.
            let placed = if fd == CHILD_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, CHILD_FD) };
            if placed < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Passt {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until every forward listens (passt binds them after start), or passt dies.
    fn wait_listening(&mut self, ports: &[PortMap]) -> Result<(), VmError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let child = self.child.as_mut().expect("passt running");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(VmError::PasstDied(status.to_string()));
            }
            let bound = ports
                .iter()
                .all(|p| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, p.host)).is_err());
            if bound {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(VmError::PasstDied("its forwards did not listen within 5 s".into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether passt has exited (it does when the VM closes its end).
    pub fn exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_maps() {
        assert_eq!("30051:30051".parse::<PortMap>().unwrap(), PortMap { host: 30051, guest: 30051 });
        assert_eq!("8080".parse::<PortMap>().unwrap(), PortMap { host: 8080, guest: 8080 });
        assert_eq!("18080:80".parse::<PortMap>().unwrap(), PortMap { host: 18080, guest: 80 });
        for bad in ["", "0:80", "70000:1", "a:b", "1:2:3"] {
            assert!(bad.parse::<PortMap>().is_err(), "{bad}");
        }
    }

    #[test]
    fn port_in_use_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let err = check_ports_free(&[PortMap { host: port, guest: 1 }]).unwrap_err().to_string();
        assert!(err.contains(&port.to_string()), "{err}");
    }

    #[test]
    fn duplicate_host_port_is_rejected() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let p = PortMap { host: port, guest: 1 };
        assert!(check_ports_free(&[p, p]).is_err());
    }
}

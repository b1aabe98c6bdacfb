//! Guest networking: which user-mode network backend carries the guest's NIC (`--net`), the port
//! map (`-p HOST:GUEST`), the guest's static address on each backend, and the running host-side
//! process as one value ([`HostNet`]) that stops it when dropped.
//!
//! - `passt` ([`passt`], the Linux default): one end of a socketpair, inherited by the VMM.
//! - `gvproxy` ([`gvproxy`], the macOS default): unix sockets in the VM's state directory and an
//!   HTTP API that opens the forwards.
//! - `none`: no NIC at all.
//!
//! Forwards bind `127.0.0.1` only, whatever the backend: a bare port would listen on every
//! interface. The guest's address is fixed per backend and handed to init on the kernel command
//! line, so the guest needs no DHCP round trip. How a VMM attaches to the link is the backends'
//! business (`backend/`), not this module's.

pub mod gvproxy;
pub mod passt;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use gvproxy::Gvproxy;
pub use passt::{start_passt, Passt, INSTALL_HINT};

use crate::VmError;

/// `-p HOST:GUEST`: a TCP port on 127.0.0.1 forwarded to a guest port. HOST 0 asks for a free
/// port, picked once before the boot ([`assign_free_ports`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortMap {
    pub host: u16,
    pub guest: u16,
}

impl FromStr for PortMap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str, least: u16| {
            p.parse::<u16>().ok().filter(|&n| n >= least).ok_or_else(|| {
                format!(
                    "bad port {p:?} in {s:?}: expected {least}-65535{}",
                    if least == 0 { " (0: a free one)" } else { "" }
                )
            })
        };
        match s.split_once(':') {
            Some((h, g)) => Ok(PortMap { host: port(h, 0)?, guest: port(g, 1)? }),
            None => Ok(PortMap { host: port(s, 1)?, guest: port(s, 1)? }),
        }
    }
}

impl fmt::Display for PortMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.guest)
    }
}

/// The guest's static IPv4 settings on one backend's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNet {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

impl GuestNet {
    /// The guest's network settings for its init, on the kernel command line (see
    /// `openshell_guest::netconf`): this static address, directly or as the fallback when DHCP is
    /// asked for, and the gateway as the nameserver (passt forwards DNS sent there to the host's
    /// resolver; gvproxy answers DNS there itself).
    pub fn cmdline_param(&self, dhcp: bool) -> String {
        use openshell_guest::netconf::{Ipv4Config, DNS_PARAM, FALLBACK_PARAM, NET_PARAM};
        let addr = Ipv4Config { addr: self.addr, prefix: self.prefix, gateway: Some(self.gateway) }.param();
        let net =
            if dhcp { format!("{NET_PARAM}=dhcp {FALLBACK_PARAM}={addr}") } else { format!("{NET_PARAM}={addr}") };
        format!("{net} {DNS_PARAM}={}", self.gateway)
    }
}

/// The guest's network backend: what `--net` names, what the plan reads, what a boot starts. The
/// gvproxy binary is the plan's to find ([`crate::Plan::gvproxy`]), not part of the choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Net {
    #[default]
    None,
    Passt,
    Gvproxy,
}

impl FromStr for Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Net::None),
            "passt" => Ok(Net::Passt),
            "gvproxy" => Ok(Net::Gvproxy),
            _ => Err(format!("unknown network backend {s:?}: expected passt, gvproxy or none")),
        }
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Net::None => "none",
            Net::Passt => "passt",
            Net::Gvproxy => "gvproxy",
        })
    }
}

impl Net {
    /// The network when `--net` names none: passt on Linux, gvproxy on macOS.
    pub fn default_for(os: crate::host::Os) -> Net {
        match os {
            crate::host::Os::Linux => Net::Passt,
            crate::host::Os::MacOs => Net::Gvproxy,
        }
    }

    /// The guest's static address on this backend's network; `None` without a network.
    pub fn guest(&self) -> Option<GuestNet> {
        match self {
            Net::None => None,
            Net::Passt => Some(passt::GUEST),
            Net::Gvproxy => Some(gvproxy::GUEST),
        }
    }
}

/// Why a gvproxy boot has no gvproxy: where it was looked for and how to get one.
pub fn gvproxy_missing(macos: bool) -> String {
    format!(
        "gvproxy was not found on PATH or in {}{}; {}",
        gvproxy::SEARCH_DIRS.join(", "),
        if macos { "" } else { ", nor in the artifact store" },
        gvproxy::install_hint(macos)
    )
}

/// Gives every forward asking for host port 0 a free port of 127.0.0.1, each a different one:
/// the kernel picks them, and they are released for the network helper to bind moments later
/// (one taken in between fails that helper's start, as any port in use does).
pub fn assign_free_ports(ports: &mut [PortMap]) -> Result<(), VmError> {
    let mut held = Vec::new();
    for p in ports.iter_mut().filter(|p| p.host == 0) {
        let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| VmError::Invalid(format!("no free port on 127.0.0.1 for guest port {}: {e}", p.guest)))?;
        p.host = l.local_addr().map_err(|e| VmError::Invalid(format!("a free port's address: {e}")))?.port();
        held.push(l);
    }
    Ok(())
}

/// Fails naming the first host port that something already listens on.
/// A port mapped twice is refused first: that is the request's own error, whatever else holds
/// the port.
pub fn check_ports_free(ports: &[PortMap]) -> Result<(), VmError> {
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = ports.iter().find(|p| !seen.insert(p.host)) {
        return Err(VmError::Invalid(format!("host port {} is mapped twice", dup.host)));
    }
    for p in ports {
        if TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, p.host)).is_err() {
            return Err(VmError::PortInUse(p.host));
        }
    }
    Ok(())
}

/// Which VMM will attach to the link: passt serves both on its stream; gvproxy serves QEMU on its
/// stream socket and libkrun on a unixgram socket (vfkit protocol) on macOS, on its stream socket
/// elsewhere ([`gvproxy::protocol`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    Krun,
    Qemu,
}

/// How the VMM reaches the network backend, as the backends put it on the VMM's command line:
/// the one thing they need from here, so they never reach into passt's or gvproxy's modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// No NIC.
    None,
    /// A stream socket the VMM inherits at [`crate::child::CHILD_FD`]: passt's socketpair end, or
    /// a connection to gvproxy's `-listen-qemu` socket (same framing: a 4-byte big-endian length
    /// per frame). `mac`: the address the backend leases the guest's address by, when it does.
    Stream { mac: Option<[u8; 6]> },
    /// A unixgram socket speaking the vfkit protocol (gvproxy's `-listen-vfkit`, for libkrun).
    Unixgram { path: PathBuf, mac: [u8; 6] },
}

impl Link {
    /// What `mode` gives a VMM attaching as `attach`, with its sockets in `state_dir`.
    pub fn of(net: Net, attach: Attach, state_dir: &Path) -> Link {
        match net {
            Net::None => Link::None,
            Net::Passt => Link::Stream { mac: None },
            Net::Gvproxy => match gvproxy::protocol(attach) {
                gvproxy::Protocol::Qemu => Link::Stream { mac: Some(gvproxy::GUEST_MAC) },
                gvproxy::Protocol::Vfkit => {
                    Link::Unixgram { path: gvproxy::vfkit_socket(state_dir), mac: gvproxy::GUEST_MAC }
                }
            },
        }
    }
}

/// A running network backend; dropping it stops the process.
#[derive(Debug)]
pub enum HostNet {
    Passt(Passt),
    Gvproxy(Gvproxy),
}

impl HostNet {
    pub fn pid(&self) -> Option<u32> {
        match self {
            HostNet::Passt(p) => p.pid(),
            HostNet::Gvproxy(g) => g.pid(),
        }
    }

    /// Which helper this is, and how it ended once it has.
    pub fn ended(&mut self) -> Option<(crate::child::Child, crate::child::Ended)> {
        match self {
            HostNet::Passt(p) => p.ended().map(|how| (crate::child::Child::Passt, how)),
            HostNet::Gvproxy(g) => g.ended().map(|how| (crate::child::Child::Gvproxy, how)),
        }
    }
}

/// Starts the network backend `net` with `ports` forwarded (`gvproxy`: its binary, from the plan). Returns the running process and,
/// when the VMM reaches it through an inherited stream socket, that socket's VMM end (to be
/// placed at [`crate::child::CHILD_FD`]); libkrun connects to gvproxy's unixgram socket by path instead.
/// `passt.log` / `gvproxy.log` and gvproxy's sockets go in `state_dir`.
pub fn start(
    net: Net,
    gvproxy: Option<&Path>,
    ports: &[PortMap],
    attach: Attach,
    state_dir: &Path,
) -> Result<Option<(HostNet, Option<OwnedFd>)>, VmError> {
    let log = |name: &str| {
        let path = state_dir.join(name);
        std::fs::File::create(&path).map_err(|source| VmError::Io { path, source })
    };
    match net {
        Net::None => Ok(None),
        Net::Passt => {
            let (p, end) = start_passt(ports, log("passt.log")?)?;
            Ok(Some((HostNet::Passt(p), Some(end))))
        }
        Net::Gvproxy => {
            let binary = gvproxy.ok_or_else(|| VmError::NoNetwork(gvproxy_missing(cfg!(target_os = "macos"))))?;
            let (g, end) = gvproxy::start(binary, ports, attach, state_dir, log("gvproxy.log")?)?;
            Ok(Some((HostNet::Gvproxy(g), end)))
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
        for bad in ["", "80:0", "0", "70000:1", "a:b", "1:2:3"] {
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
    fn host_port_zero_gets_distinct_free_ports() {
        let mut ports: Vec<PortMap> = ["0:30051", "0:8080", "9000:80"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(ports[0], PortMap { host: 0, guest: 30051 });
        assign_free_ports(&mut ports).unwrap();
        assert!(ports[0].host != 0 && ports[1].host != 0 && ports[0].host != ports[1].host, "{ports:?}");
        assert_eq!((ports[1].guest, ports[2]), (8080, PortMap { host: 9000, guest: 80 }));
        check_ports_free(&ports[..2]).unwrap();
        let err = "8080:0".parse::<PortMap>().unwrap_err();
        assert!(err.contains("expected 1-65535"), "{err}");
        assert!("0".parse::<PortMap>().is_err(), "a bare 0 names no guest port");
    }

    #[test]
    fn duplicate_host_port_is_rejected() {
        // Held, so a port-in-use answer cannot pass for the duplicate's.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let p = PortMap { host: port, guest: 1 };
        let err = check_ports_free(&[p, PortMap { host: port, guest: 2 }]).unwrap_err().to_string();
        assert!(err.contains(&format!("host port {port} is mapped twice")), "{err}");
        drop(l);
    }

    #[test]
    fn parses_net_choices() {
        assert_eq!("gvproxy".parse::<Net>().unwrap(), Net::Gvproxy);
        assert_eq!("none".parse::<Net>().unwrap(), Net::None);
        let err = "slirp".parse::<Net>().unwrap_err();
        assert!(err.contains("passt, gvproxy or none"), "{err}");
    }

    #[test]
    fn each_backend_hands_init_its_own_guest_address() {
        assert_eq!(Net::None.guest(), None);
        assert_eq!(
            Net::Passt.guest().unwrap().cmdline_param(false),
            "openshell.net=192.0.2.2/24,192.0.2.1 openshell.dns=192.0.2.1"
        );
        assert_eq!(
            Net::Passt.guest().unwrap().cmdline_param(true),
            "openshell.net=dhcp openshell.net.fallback=192.0.2.2/24,192.0.2.1 openshell.dns=192.0.2.1"
        );
        assert_eq!(
            Net::Gvproxy.guest().unwrap().cmdline_param(false),
            "openshell.net=192.168.127.2/24,192.168.127.1 openshell.dns=192.168.127.1"
        );
    }

    #[test]
    fn a_missing_gvproxy_names_where_it_looked_and_the_install() {
        let mac = gvproxy_missing(true);
        assert!(mac.contains("brew install podman") && mac.contains("--gvproxy PATH"), "{mac}");
        let linux = gvproxy_missing(false);
        assert!(linux.contains("artifact store") && linux.contains("fetches Debian's gvproxy"), "{linux}");
    }
}

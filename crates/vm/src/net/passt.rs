//! passt: the Linux network backend.
//!
//! passt gets one end of a socketpair (`--fd`) and the VMM the other (QEMU: `-netdev stream` on
//! that fd; libkrun: `krun_set_passt_fd`), so no socket path exists and passt's drop to `nobody`
//! as root cannot break it.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{GuestNet, PortMap};
use crate::child::{inherit_as_child_fd, CHILD_FD};
use crate::VmError;

/// The address passt assigns the guest (`-a`), its gateway (the host, through passt) and prefix.
pub const GUEST: GuestNet =
    GuestNet { addr: Ipv4Addr::new(192, 0, 2, 2), prefix: 24, gateway: Ipv4Addr::new(192, 0, 2, 1) };
pub const INSTALL_HINT: &str = "apt-get install -y passt";

/// A running passt; stopped on drop.
#[derive(Debug)]
pub struct Passt {
    child: Option<Child>,
}

/// Starts passt with the forwards; returns it and the socket end the VMM must inherit.
pub fn start_passt(ports: &[PortMap], log: std::fs::File) -> Result<(Passt, OwnedFd), VmError> {
    let passt =
        which::which("passt").map_err(|_| VmError::NoBackend(format!("passt is not installed; {INSTALL_HINT}")))?;
    // std creates the pair close-on-exec on every OS (SOCK_CLOEXEC where it exists, FD_CLOEXEC on
    // macOS), so neither end leaks into another child; passt's end is dup'ed onto CHILD_FD below.
    let (ours, vmm_end) = std::os::unix::net::UnixStream::pair()
        .map(|(a, b)| (OwnedFd::from(a), OwnedFd::from(b)))
        .map_err(|source| VmError::Spawn { what: "passt socketpair".into(), source })?;
    let mut cmd = Command::new(passt);
    cmd.args(["-f", "-q", "--fd", &CHILD_FD.to_string()])
        .args(["-a", &GUEST.addr.to_string(), "-n", &GUEST.prefix.to_string(), "-g", &GUEST.gateway.to_string()])
        .args(["-u", "none"])
        // DNS sent to the gateway address goes to the host's resolver; init points the guest's
        // resolv.conf there.
        .args(["--dns-forward", &GUEST.gateway.to_string()]);
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

impl Passt {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until passt itself listens on every forward (it binds them after start), or passt
    /// dies. The port was free at the preflight, but another process can bind it before passt
    /// does: then passt exits ("Failed to bind any port"), and a listener on the port is not
    /// passt's, so "something listens" is not enough: the listening socket must be one of passt's
    /// own fds. Where passt's fds cannot be read (passt of another user), a listener is taken as
    /// passt's, as before.
    fn wait_listening(&mut self, ports: &[PortMap]) -> Result<(), VmError> {
        let deadline = Instant::now() + LISTEN_GUARD;
        let pid = self.pid().expect("passt running");
        loop {
            let listening: Vec<Listening> = ports.iter().map(|p| listening(pid, p.host)).collect();
            // A port someone else holds is the cause, whichever way passt's wait ends.
            let failed = |why: String| match ports.iter().zip(&listening).find(|(_, l)| **l == Listening::Other) {
                Some((p, _)) => VmError::PortInUse(p.host),
                None => VmError::PasstDied(why),
            };
            let child = self.child.as_mut().expect("passt running");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(failed(status.to_string()));
            }
            if listening.iter().all(|l| *l == Listening::Passt) {
                return Ok(());
            }
            if Instant::now() > deadline {
                // Dropping `self` stops passt: nothing of this launch is left.
                return Err(failed(format!("its forwards did not listen within {} s", LISTEN_GUARD.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// How passt ended, once it has (it does by itself when the VM closes its end); reaps it, so
    /// it does not linger as a zombie.
    pub fn ended(&mut self) -> Option<crate::child::Ended> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()).map(crate::child::Ended::of)
    }
}

/// Who listens on 127.0.0.1:`port` (see [`Passt::wait_listening`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listening {
    Nobody,
    Passt,
    Other,
}

fn listening(passt: u32, port: u16) -> Listening {
    if !std::path::Path::new("/proc/net/tcp").exists() {
        // No socket table to read: a port that cannot be bound is the only evidence (and the test
        // bind itself could, for an instant, be what makes passt's bind fail).
        let taken = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_err();
        return if taken { Listening::Passt } else { Listening::Nobody };
    }
    let listeners = crate::procfs::tcp_listeners(port);
    if listeners.is_empty() {
        return Listening::Nobody;
    }
    let held: Vec<Option<bool>> = listeners.iter().map(|l| crate::procfs::holds_socket(passt, l.inode)).collect();
    match (held.contains(&Some(true)), held.contains(&None)) {
        (true, _) => Listening::Passt,
        // passt's fds are not readable here: a listener is the best evidence there is.
        (false, true) => Listening::Passt,
        (false, false) => Listening::Other,
    }
}

/// A hang guard on passt binding its forwards: passt dying (a port taken, say) ends the wait at
/// once, so only a wedged passt meets it, however slowly the host runs it.
const LISTEN_GUARD: Duration = Duration::from_secs(60);

impl Drop for Passt {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

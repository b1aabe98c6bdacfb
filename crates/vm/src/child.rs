//! The processes a VM runs as (the VMM, passt, gvproxy): which one is which ([`Child`]), how one
//! ended ([`Ended`]), and what each does between fork and exec: inherit its end of a stream socket
//! at [`CHILD_FD`] and die with its parent. Low in the crate so that `launch`, `net` and the
//! backends all use it and none of them reaches up into another for it.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;

pub use openshell_krun::child::die_with_parent;

/// A process the supervisor owns for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Child {
    Vmm,
    Passt,
    Gvproxy,
}

impl std::fmt::Display for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Child::Vmm => "the VMM",
            Child::Passt => "passt",
            Child::Gvproxy => "gvproxy",
        })
    }
}

/// How a process ended: its own exit code, or the signal that killed it. In JSON, one key:
/// `{"exit_code": 1}` or `{"signal": 9}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ended {
    ExitCode(i32),
    Signal(i32),
}

impl Ended {
    pub fn of(status: std::process::ExitStatus) -> Ended {
        match (status.code(), status.signal()) {
            (Some(code), _) => Ended::ExitCode(code),
            (None, Some(signal)) => Ended::Signal(signal),
            // Neither code nor signal happens only for stopped/continued, which wait() never returns.
            (None, None) => Ended::ExitCode(-1),
        }
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::ExitCode(code) => write!(f, "exit code {code}"),
            Ended::Signal(signal) => write!(f, "signal {signal}"),
        }
    }
}

/// The fd number at which the VMM (and passt) find their end of a stream socket.
pub const CHILD_FD: i32 = 3;

/// Makes `fd` appear as [`CHILD_FD`] in the child (dup2 clears close-on-exec), and ties the
/// child's life to ours.
pub fn inherit_as_child_fd(cmd: &mut Command, fd: i32) {
    // SAFETY: only async-signal-safe calls (fcntl, dup2, prctl) between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec, so clear the flag explicitly then.
            let placed = if fd == CHILD_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, CHILD_FD) };
            if placed < 0 {
                return Err(std::io::Error::last_os_error());
            }
            die_with_parent()
        });
    }
}

/// Sends `signal` to `pid` (`None`: only asks whether it exists and may be signalled). For pids
/// this process owns or has verified: callers say why the pid is still theirs.
pub fn signal(pid: u32, signal: impl Into<Option<nix::sys::signal::Signal>>) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).map_err(std::io::Error::from)
}

//! The seccomp row: install a BPF filter (as a container runtime does for every container) that
//! makes getppid(2) fail with a chosen errno, then watch getppid fail that way while getpid still
//! works. Runs in its own forked child: a filter cannot be removed once installed.

use std::collections::BTreeMap;

use openshell_matrix::Row;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

use crate::kernel_fix;

pub use crate::ids::SECCOMP as ID;
/// Not an errno any kernel path returns, so seeing it proves the filter answered.
const MARK: u32 = 1234;

pub fn check() -> Vec<Row> {
    vec![run()]
}

fn run() -> Row {
    let filter = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_getppid, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(MARK),
        std::env::consts::ARCH.try_into().expect("x86_64 and aarch64 are seccompiler targets"),
    );
    let program: BpfProgram = match filter.and_then(TryInto::try_into) {
        Ok(p) => p,
        Err(e) => return Row::fail(ID, format!("compiling the filter: {e}"), "a bug in openshell-guest-check"),
    };
    if let Err(e) = seccompiler::apply_filter(&program) {
        return Row::fail(
            ID,
            format!("installing a seccomp filter: {e}"),
            kernel_fix("CONFIG_SECCOMP, CONFIG_SECCOMP_FILTER"),
        );
    }
    // SAFETY: raw syscalls without arguments.
    let (ppid, errno) = unsafe { (libc::syscall(libc::SYS_getppid), std::io::Error::last_os_error().raw_os_error()) };
    // SAFETY: as above.
    let pid = unsafe { libc::syscall(libc::SYS_getpid) };
    decide(ppid, errno, pid)
}

/// The row from what the filtered getppid and the unfiltered getpid returned.
pub fn decide(ppid: libc::c_long, errno: Option<i32>, pid: libc::c_long) -> Row {
    if ppid == -1 && errno == Some(MARK as i32) && pid > 0 {
        Row::pass(ID, format!("filter installed (SECCOMP_MODE_FILTER): getppid() failed with errno {MARK} as it says, getpid() still works"))
    } else {
        Row::fail(
            ID,
            format!("filter installed but getppid() returned {ppid} (errno {errno:?}), getpid() {pid}: the filter did not act"),
            kernel_fix("CONFIG_SECCOMP_FILTER"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_marked_errno_proves_the_filter() {
        assert_eq!(decide(-1, Some(MARK as i32), 7).status, openshell_matrix::Status::Pass);
        assert!(decide(1, Some(0), 7).blocks());
        assert!(decide(-1, Some(libc::EPERM), 7).blocks());
    }
}

//! The landlock row: restrict this process to reading one directory, then watch the kernel
//! enforce it — a file inside still opens, its sibling outside no longer does (EACCES). Runs in
//! its own forked child: a landlock domain cannot be left once entered.
//!
//! The two files live on tmpfs (/tmp). Not on the rootfs: under QEMU that is virtio-9p, which
//! gives each path walk a fresh inode, so a landlock rule (tied to an inode) never matches there
//! and even allowed paths are refused.
//!
//! Landlock needs both `CONFIG_SECURITY_LANDLOCK` and `landlock` in the active LSM list
//! (`CONFIG_LSM` or `lsm=` on the kernel command line); the errno of the ABI probe tells which
//! is missing.

use landlock::{path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI};
use openshell_matrix::Row;

use crate::kernel_fix;

pub use crate::ids::LANDLOCK as ID;
/// A directory on tmpfs with `allowed/file` and `denied/file`.
const SCRATCH: &str = "/tmp/openshell-guest-check-landlock";

pub fn check() -> Vec<Row> {
    vec![run()]
}

/// `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`: the ABI version, or errno.
fn abi_version() -> Result<i64, i32> {
    // SAFETY: the documented version query; no memory is passed.
    let v = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0usize, 1u32) };
    if v < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(v)
    }
}

/// Why landlock is unavailable, from the ABI probe's errno.
pub fn unavailable(errno: i32) -> Row {
    match errno {
        libc::EOPNOTSUPP => Row::fail(
            ID,
            "landlock is built in but not enabled at boot (EOPNOTSUPP)",
            "add landlock to CONFIG_LSM in kernel/k8s-networking.config, or lsm=landlock,… on the kernel command line",
        ),
        libc::ENOSYS => {
            Row::fail(ID, "landlock_create_ruleset: ENOSYS (not built)", kernel_fix("CONFIG_SECURITY_LANDLOCK"))
        }
        e => Row::fail(
            ID,
            format!("landlock_create_ruleset: {}", std::io::Error::from_raw_os_error(e)),
            kernel_fix("CONFIG_SECURITY_LANDLOCK"),
        ),
    }
}

fn run() -> Row {
    let abi = match abi_version() {
        Ok(v) => v,
        Err(errno) => return unavailable(errno),
    };
    let dir = std::path::Path::new(SCRATCH);
    let (allowed, denied) = (dir.join("allowed"), dir.join("denied"));
    let made = [&allowed, &denied]
        .iter()
        .try_for_each(|d| std::fs::create_dir_all(d).and_then(|()| std::fs::write(d.join("file"), "x")));
    if let Err(e) = made {
        return Row::fail(
            ID,
            format!("preparing {SCRATCH}: {e}"),
            "openshell-init mounts a tmpfs on /tmp; check the guest console",
        );
    }
    let v1 = ABI::V1;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(v1))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules([&allowed], AccessFs::from_read(v1))))
        .and_then(|r| r.restrict_self());
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return Row::fail(
                ID,
                format!("creating and entering a ruleset: {e}"),
                kernel_fix("CONFIG_SECURITY_LANDLOCK"),
            )
        }
    };
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Row::fail(
            ID,
            format!("ruleset status {:?} (ABI {abi})", status.ruleset),
            kernel_fix("CONFIG_SECURITY_LANDLOCK"),
        );
    }
    decide(abi, std::fs::File::open(allowed.join("file")).err(), std::fs::File::open(denied.join("file")).err())
}

/// The row from what opening the allowed and the denied file did under the ruleset.
pub fn decide(abi: i64, allowed: Option<std::io::Error>, denied: Option<std::io::Error>) -> Row {
    let fix = || kernel_fix("CONFIG_SECURITY_LANDLOCK");
    match (allowed, denied) {
        (None, Some(e)) if e.raw_os_error() == Some(libc::EACCES) => Row::pass(
            ID,
            format!("ABI v{abi}; in a ruleset allowing reads beneath {SCRATCH}/allowed only, allowed/file opens and denied/file is refused with EACCES"),
        ),
        (Some(e), _) => Row::fail(ID, format!("allowed/file, permitted by the ruleset, failed to open: {e}"), fix()),
        (None, None) => Row::fail(ID, "denied/file opened although the ruleset denies it: not enforced", fix()),
        (None, Some(e)) => Row::fail(ID, format!("denied/file failed with {e}, expected EACCES"), fix()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforcement_needs_allowed_open_and_denied_eacces() {
        let eacces = || Some(std::io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(decide(2, None, eacces()).status, openshell_matrix::Status::Pass);
        assert!(decide(2, None, None).reason.contains("not enforced"));
        assert!(decide(2, eacces(), eacces()).blocks());
        assert!(decide(2, None, Some(std::io::Error::from_raw_os_error(libc::ENOENT))).blocks());
    }

    #[test]
    fn lsm_list_and_missing_option_are_told_apart() {
        assert!(unavailable(libc::EOPNOTSUPP).fix.contains("CONFIG_LSM"));
        assert!(unavailable(libc::ENOSYS).fix.contains("CONFIG_SECURITY_LANDLOCK"));
    }
}

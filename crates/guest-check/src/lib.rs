//! What a Kubernetes CNI and the gateway need from the guest kernel, checked by doing it: network
//! namespaces, veth pairs, a bridge, bridge netfilter, nftables NAT, forwarding, a policy route,
//! conntrack, cgroup v2 controllers, seccomp and landlock. Each answer is a row of the shared
//! [`openshell_matrix`] model.
//!
//! Each group runs in its own forked child ([`isolate`]), so namespaces, filters and sandboxes it
//! creates die with it, and one crashing check cannot take the others down. This crate decides
//! from what the kernel did, never from reading its config; the unit tests cover the decisions,
//! the VM trial `guest::guest_capability_matrix_all_required_pass` covers the doing.

// The checks run only inside the Linux guest; the row ids compile everywhere (see `ids`).
#[cfg(target_os = "linux")]
pub mod cgroup;
pub mod ids;
#[cfg(target_os = "linux")]
pub mod isolate;
#[cfg(target_os = "linux")]
pub mod landlock;
#[cfg(target_os = "linux")]
pub mod net;
#[cfg(target_os = "linux")]
pub mod nft;
#[cfg(target_os = "linux")]
pub mod seccomp;
#[cfg(target_os = "linux")]
pub mod xtables;

#[cfg(target_os = "linux")]
use std::time::Duration;

#[cfg(target_os = "linux")]
use openshell_matrix::Matrix;

/// The fix for a missing kernel feature: the option(s) and where they go.
pub fn kernel_fix(options: &str) -> String {
    format!("enable {options} in kernel/k8s-networking.config (`cargo xtask check --guest` rebuilds the kernel)")
}

/// The fix for an operation the kernel refused: a permission error means the checker is not
/// root (the checks need CAP_SYS_ADMIN and CAP_NET_ADMIN), anything else a missing feature.
pub fn fix_for(e: &std::io::Error, options: &str) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            "run openshell-guest-check as root (it needs CAP_SYS_ADMIN and CAP_NET_ADMIN)".into()
        }
        _ => kernel_fix(options),
    }
}

pub use ids::row_ids;

/// One group of checks: runs in a forked child and returns its rows.
#[cfg(target_os = "linux")]
type Check = fn() -> Vec<openshell_matrix::Row>;

/// Runs every group, each in its own child process. Call from a single-threaded process.
#[cfg(target_os = "linux")]
pub fn run() -> Matrix {
    let mut m = Matrix::new("guest");
    // Generous: the guest may run under full software emulation (QEMU TCG).
    let groups: [(&[&str], Duration, Check); 4] = [
        (net::IDS, Duration::from_secs(60), net::check),
        (cgroup::IDS, Duration::from_secs(20), cgroup::check),
        (&[seccomp::ID], Duration::from_secs(20), seccomp::check),
        (&[landlock::ID], Duration::from_secs(20), landlock::check),
    ];
    for (ids, deadline, check) in groups {
        for row in isolate::in_child(ids, deadline, check) {
            m.push(row);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_errors_ask_for_root_others_for_the_kernel_option() {
        let e = |n| std::io::Error::from_raw_os_error(n);
        assert!(fix_for(&e(libc::EPERM), "CONFIG_NET_NS").contains("as root"));
        assert!(fix_for(&e(libc::EACCES), "CONFIG_CGROUPS").contains("as root"));
        assert!(fix_for(&e(libc::EINVAL), "CONFIG_NET_NS").contains("enable CONFIG_NET_NS in kernel/"));
    }

    #[test]
    fn row_ids_are_unique() {
        let ids = row_ids();
        let mut dedup = ids.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(ids.len(), dedup.len());
    }
}

//! What a Kubernetes CNI and the gateway need from the guest kernel, checked by doing it: network
//! namespaces, veth pairs, a bridge, bridge netfilter, nftables NAT, forwarding, a policy route,
//! conntrack, cgroup v2 controllers, seccomp and landlock. Each answer is a row of the shared
//! [`openshell_matrix`] model.
//!
//! Each group runs in its own forked child ([`isolate`]), so namespaces, filters and sandboxes it
//! creates die with it, and one crashing check cannot take the others down. This crate decides
//! from what the kernel did, never from reading its config; the unit tests cover the decisions,
//! the VM trial `guest::guest_capability_matrix_all_required_pass` covers the doing.

pub mod cgroup;
pub mod isolate;
pub mod landlock;
pub mod net;
pub mod nft;
pub mod seccomp;
pub mod xtables;

use std::time::Duration;

use openshell_matrix::Matrix;

/// The fix for a missing kernel feature: the option(s) and where they go.
pub fn kernel_fix(options: &str) -> String {
    format!("enable {options} in kernel/k8s-networking.config (`cargo xtask check --guest` rebuilds the kernel)")
}

/// Runs every group, each in its own child process. Call from a single-threaded process.
pub fn run() -> Matrix {
    let mut m = Matrix::new("guest");
    // Generous: the guest may run under full software emulation (QEMU TCG).
    let groups: [(&[&str], Duration, fn() -> Vec<openshell_matrix::Row>); 4] = [
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

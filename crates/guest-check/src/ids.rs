//! The ids of every row the checker reports, apart from the checks that produce them: the checks
//! are Linux-only (netlink, seccomp, landlock), while the host's VM suites, on Linux and macOS, ask
//! whether a matrix is complete.

/// The network rows, in table order.
pub mod net {
    pub const NETNS: &str = "netns";
    pub const VETH: &str = "veth";
    pub const BRIDGE: &str = "bridge";
    pub const BRIDGE_NF: &str = "bridge-nf-call-iptables";
    pub const IP_FORWARD: &str = "ip-forward";
    pub const NFT_MASQ: &str = "nftables-masquerade";
    pub const POLICY_ROUTE: &str = "policy-route";
    pub const NAT: &str = "nat";
    pub const CONNTRACK: &str = "conntrack";
    pub const IPTABLES_LEGACY: &str = "iptables-legacy";

    /// Every row this group reports, in table order.
    pub const IDS: &[&str] =
        &[NETNS, VETH, BRIDGE, BRIDGE_NF, IP_FORWARD, NFT_MASQ, POLICY_ROUTE, NAT, CONNTRACK, IPTABLES_LEGACY];
}

/// The cgroup v2 rows, in table order.
pub mod cgroup {
    pub const CPU: &str = "cgroup2-cpu";
    pub const MEMORY: &str = "cgroup2-memory";
    pub const PIDS: &str = "cgroup2-pids";
    pub const IDS: &[&str] = &[CPU, MEMORY, PIDS];
}

pub const SECCOMP: &str = "seccomp";
pub const LANDLOCK: &str = "landlock";

/// Every row the checker reports, in table order: a matrix missing one of these is incomplete.
pub fn row_ids() -> Vec<&'static str> {
    [net::IDS, cgroup::IDS, &[SECCOMP, LANDLOCK]].concat()
}

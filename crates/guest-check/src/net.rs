//! The network rows, proved by building what a CNI builds and sending a datagram through it.
//!
//! In three fresh network namespaces (the guest's own `eth0` is never touched):
//!
//! ```text
//!  client netns            router netns                          server netns
//!  vc1 198.18.1.2 ── veth ── vc0 ⊂ br0 198.18.1.1 │ vs0 198.18.2.1 ── veth ── vs1 198.18.2.2
//!  rule: from 198.18.1.2 lookup 100              ip_forward=1
//!  table 100: default via 198.18.1.1             nft: nat postrouting masquerade
//! ```
//!
//! The client has no route off its link except through its policy rule; the router forwards and
//! masquerades. A UDP datagram from the client must reach the server from 198.18.2.1 (NAT), and
//! the server's reply must find its way back to 198.18.1.2 (conntrack un-NATs it). Addresses are
//! from 198.18.0.0/15, the benchmarking range, and never leave these namespaces.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use futures_util::TryStreamExt;
use openshell_matrix::Row;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::rule::RuleAction;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::{fix_for, kernel_fix, nft, xtables};

pub use crate::ids::net::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const ROUTER_DOWN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const ROUTER_UP: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const SERVER_PORT: u16 = 9000;
const POLICY_TABLE: u32 = 100;
/// A lost datagram under TCG emulation shows up within a second; this leaves ample margin.
const DATAGRAM_TIMEOUT: Duration = Duration::from_secs(5);

/// Rows as they are decided; a failed step blocks the rows that depend on it.
struct Report {
    rows: Vec<Row>,
    blocker: Option<String>,
}

impl Report {
    fn pass(&mut self, id: &str, reason: impl Into<String>) {
        self.rows.push(Row::pass(id, reason));
    }

    fn fail(&mut self, id: &str, reason: impl Into<String>, fix: impl Into<String>) {
        self.blocker.get_or_insert_with(|| format!("the {id} row failed"));
        self.rows.push(Row::fail(id, reason, fix));
    }

    /// A step that is no row of its own failed: every row not yet decided says so.
    fn block(&mut self, why: String) -> Option<()> {
        self.blocker.get_or_insert(why);
        None
    }

    fn finish(mut self) -> Vec<Row> {
        let blocker = self.blocker.clone().unwrap_or_else(|| "an earlier step failed".into());
        let mut out = Vec::new();
        for id in IDS {
            match self.rows.iter().position(|r| r.id == *id) {
                Some(i) => out.push(self.rows.swap_remove(i)),
                None => out.push(Row::fail(id, format!("not tried: {blocker}"), "fix the first failing network row")),
            }
        }
        for r in &mut out {
            if r.id == IPTABLES_LEGACY {
                r.required = false;
            }
        }
        out
    }
}

pub fn check() -> Vec<Row> {
    let mut report = Report { rows: Vec::new(), blocker: None };
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => {
            let _ = rt.block_on(topology(&mut report));
        }
        Err(e) => {
            report.block(format!("cannot start the netlink runtime: {e}"));
        }
    }
    report.finish()
}

/// The three namespaces, and the one this process started in, held open by descriptor.
struct Namespaces {
    initial: OwnedFd,
    router: OwnedFd,
    client: OwnedFd,
    server: OwnedFd,
}

fn new_netns() -> std::io::Result<OwnedFd> {
    // SAFETY: unshare affects only this (single-threaded, forked) process.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
}

fn enter(ns: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: setns on a descriptor we own; it moves only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An rtnetlink handle bound to `ns` (a netlink socket belongs to the namespace it was made in).
fn handle_in(ns: &OwnedFd) -> std::io::Result<Handle> {
    enter(ns)?;
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link(h: &Handle, name: &str) -> Result<LinkMessage, rtnetlink::Error> {
    match h.link().get().match_name(name.to_owned()).execute().try_next().await? {
        Some(m) => Ok(m),
        None => Err(rtnetlink::Error::RequestFailed),
    }
}

async fn link_names(h: &Handle) -> Result<Vec<String>, rtnetlink::Error> {
    let links: Vec<LinkMessage> = h.link().get().execute().try_collect().await?;
    Ok(links
        .iter()
        .filter_map(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
        })
        .collect())
}

async fn up(h: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    h.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await
}

/// The errno inside a netlink error, for the reason text.
fn describe(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(c) => std::io::Error::from_raw_os_error(-c.get()).to_string(),
            None => e.to_string(),
        },
        other => other.to_string(),
    }
}

fn sysctl_set(path: &str, value: &str) -> std::io::Result<String> {
    std::fs::write(path, value)?;
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

/// A UDP socket bound to `addr` inside `ns`; it stays in that namespace whatever this thread does next.
fn udp_in(ns: &OwnedFd, addr: SocketAddrV4) -> std::io::Result<UdpSocket> {
    enter(ns)?;
    let s = UdpSocket::bind(addr)?;
    s.set_read_timeout(Some(DATAGRAM_TIMEOUT))?;
    Ok(s)
}

async fn topology(r: &mut Report) -> Option<()> {
    // netns
    let initial: OwnedFd = match std::fs::File::open("/proc/thread-self/ns/net") {
        Ok(f) => f.into(),
        Err(e) => return r.block(format!("cannot open this process's network namespace: {e}")),
    };
    let ns = match (new_netns(), new_netns(), new_netns()) {
        (Ok(router), Ok(client), Ok(server)) => Namespaces { initial, router, client, server },
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
            r.fail(NETNS, format!("unshare(CLONE_NEWNET): {e}"), fix_for(&e, "CONFIG_NET_NS"));
            return None;
        }
    };
    let handles = (handle_in(&ns.router), handle_in(&ns.client), handle_in(&ns.server));
    let (router, client, server) = match handles {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
            return r.block(format!("no rtnetlink socket in the new namespaces: {e}"));
        }
    };
    for h in [&router, &client, &server] {
        match link_names(h).await {
            Ok(names) if names == ["lo"] => {}
            Ok(names) => {
                r.fail(
                    NETNS,
                    format!("a new namespace already holds {names:?}, expected only lo"),
                    kernel_fix("CONFIG_NET_NS"),
                );
                return None;
            }
            Err(e) => return r.block(format!("listing links in a new namespace: {}", describe(&e))),
        }
    }
    r.pass(NETNS, "unshare(CLONE_NEWNET) made 3 fresh namespaces, each holding only lo");

    // veth: one pair per side, the far end moved into its own namespace by descriptor.
    for (a, b, far) in [("vc0", "vc1", &ns.client), ("vs0", "vs1", &ns.server)] {
        if let Err(e) = router.link().add(LinkVeth::new(a, b).build()).execute().await {
            r.fail(VETH, format!("creating veth pair {a}/{b}: {}", describe(&e)), kernel_fix("CONFIG_VETH"));
            return None;
        }
        let peer = link(&router, b).await.ok()?.header.index;
        let moved =
            router.link().set(LinkUnspec::new_with_index(peer).setns_by_fd(far.as_raw_fd()).build()).execute().await;
        if let Err(e) = moved {
            r.fail(
                VETH,
                format!("moving {b} into its namespace: {}", describe(&e)),
                kernel_fix("CONFIG_VETH, CONFIG_NET_NS"),
            );
            return None;
        }
    }
    let (vc1, vs1) = match (link(&client, "vc1").await, link(&server, "vs1").await) {
        (Ok(a), Ok(b)) => (a.header.index, b.header.index),
        _ => {
            r.fail(VETH, "the moved veth ends are not visible in their new namespaces", kernel_fix("CONFIG_VETH"));
            return None;
        }
    };
    r.pass(VETH, "created veth pairs vc0/vc1 and vs0/vs1, moved vc1 and vs1 into their own namespaces");

    // bridge
    if let Err(e) = router.link().add(LinkBridge::new("br0").build()).execute().await {
        r.fail(BRIDGE, format!("creating bridge br0: {}", describe(&e)), kernel_fix("CONFIG_BRIDGE"));
        return None;
    }
    let (br0, vc0, vs0) = match (link(&router, "br0").await, link(&router, "vc0").await, link(&router, "vs0").await) {
        (Ok(a), Ok(b), Ok(c)) => (a.header.index, b.header.index, c.header.index),
        _ => return r.block("br0, vc0 or vs0 vanished from the router namespace".into()),
    };
    if let Err(e) = router.link().set(LinkUnspec::new_with_index(vc0).controller(br0).build()).execute().await {
        r.fail(BRIDGE, format!("attaching vc0 to br0: {}", describe(&e)), kernel_fix("CONFIG_BRIDGE"));
        return None;
    }
    let master = link(&router, "vc0").await.ok().and_then(|l| {
        l.attributes.iter().find_map(|a| match a {
            LinkAttribute::Controller(i) => Some(*i),
            _ => None,
        })
    });
    if master != Some(br0) {
        r.fail(
            BRIDGE,
            format!("vc0's master is {master:?} after attaching it to br0 (ifindex {br0})"),
            kernel_fix("CONFIG_BRIDGE"),
        );
        return None;
    }
    r.pass(BRIDGE, format!("created br0 and attached vc0 to it (vc0's master is ifindex {br0})"));

    // Addresses and links up.
    let lo = |h: &Handle| {
        let h = h.clone();
        async move { link(&h, "lo").await.map(|l| l.header.index) }
    };
    let plumbing: Result<(), rtnetlink::Error> = async {
        for (h, idx, addr) in
            [(&router, br0, ROUTER_DOWN), (&router, vs0, ROUTER_UP), (&client, vc1, CLIENT), (&server, vs1, SERVER)]
        {
            h.address().add(idx, addr.into(), 24).execute().await?;
        }
        for (h, idx) in [(&router, vc0), (&router, br0), (&router, vs0), (&client, vc1), (&server, vs1)] {
            up(h, idx).await?;
        }
        for h in [&router, &client, &server] {
            up(h, lo(h).await?).await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = plumbing {
        return r.block(format!("addressing the test links failed: {}", describe(&e)));
    }

    // bridge-nf-call-iptables: per namespace on newer kernels, global (initial namespace only) on
    // older ones, where a fresh namespace has no /proc/sys/net/bridge at all.
    enter(&ns.router).ok()?;
    const BR_NF: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    match sysctl_set(BR_NF, "1") {
        Ok(v) if v == "1" => r.pass(BRIDGE_NF, "net.bridge.bridge-nf-call-iptables set to 1 and read back (router netns)"),
        Ok(v) => r.fail(BRIDGE_NF, format!("{BR_NF} reads {v:?} after writing 1"), kernel_fix("CONFIG_BRIDGE_NETFILTER")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match initial_ns_bridge_nf(&ns.initial) {
            Ok(()) => r.pass(
                BRIDGE_NF,
                "net.bridge.bridge-nf-call-iptables set to 1 and read back (global on this kernel: set in the initial netns)",
            ),
            Err(e) => r.fail(BRIDGE_NF, format!("{BR_NF}: {e}"), kernel_fix("CONFIG_BRIDGE_NETFILTER")),
        },
        Err(e) => r.fail(BRIDGE_NF, format!("{BR_NF}: {e}"), kernel_fix("CONFIG_BRIDGE_NETFILTER")),
    }

    // ip-forward (decided once a datagram has crossed the router)
    let forward = sysctl_set("/proc/sys/net/ipv4/ip_forward", "1");
    if !matches!(forward.as_deref(), Ok("1")) {
        r.fail(
            IP_FORWARD,
            format!("net.ipv4.ip_forward in the router netns: {forward:?} after writing 1"),
            kernel_fix("CONFIG_INET, CONFIG_SYSCTL"),
        );
        return None;
    }

    // nftables-masquerade
    if let Err(e) = nft::install_masquerade() {
        let fix = match &e {
            nft::NftError::Refused { step, .. } => kernel_fix(step.describe().1),
            _ => kernel_fix("CONFIG_NETFILTER_NETLINK, CONFIG_NF_TABLES"),
        };
        r.fail(NFT_MASQ, e.to_string(), fix);
        return None;
    }
    match nft::list_rules() {
        Ok(rules) if rules.iter().any(|exprs| exprs.iter().any(|x| x == "masq")) => r.pass(
            NFT_MASQ,
            format!(
                "table ip {}: a nat chain on postrouting with a masquerade rule, committed and listed back",
                nft::TABLE
            ),
        ),
        Ok(rules) => {
            r.fail(
                NFT_MASQ,
                format!("the committed chain lists {rules:?}, no masq expression"),
                kernel_fix("CONFIG_NFT_MASQ"),
            );
            return None;
        }
        Err(e) => return r.block(format!("listing the nftables rule back: {e}")),
    }

    // iptables-legacy (optional: a CNI may use iptables-nft instead)
    match (xtables::table_chains("filter"), xtables::table_chains("nat")) {
        (Ok(f), Ok(n)) => {
            r.pass(IPTABLES_LEGACY, format!("x_tables answered for filter ({}) and nat ({})", f.join(","), n.join(",")))
        }
        (f, n) => r.fail(
            IPTABLES_LEGACY,
            format!(
                "IPT_SO_GET_INFO: filter {:?}, nat {:?}",
                f.err().map(|e| e.to_string()),
                n.err().map(|e| e.to_string())
            ),
            kernel_fix("CONFIG_IP_NF_IPTABLES, CONFIG_IP_NF_FILTER, CONFIG_IP_NF_NAT"),
        ),
    }

    // policy-route: the client's only way off its link is table 100, reached by a source rule.
    let rule = client
        .rule()
        .add()
        .v4()
        .source_prefix(CLIENT, 32)
        .table_id(POLICY_TABLE)
        .priority(1000)
        .action(RuleAction::ToTable)
        .execute()
        .await;
    if let Err(e) = rule {
        r.fail(
            POLICY_ROUTE,
            format!("ip rule add from {CLIENT} lookup {POLICY_TABLE}: {}", describe(&e)),
            kernel_fix("CONFIG_IP_MULTIPLE_TABLES"),
        );
        return None;
    }
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(ROUTER_DOWN)
        .output_interface(vc1)
        .table_id(POLICY_TABLE)
        .build();
    if let Err(e) = client.route().add(route).execute().await {
        r.fail(
            POLICY_ROUTE,
            format!("ip route add default via {ROUTER_DOWN} table {POLICY_TABLE}: {}", describe(&e)),
            kernel_fix("CONFIG_IP_MULTIPLE_TABLES"),
        );
        return None;
    }

    // The datagram.
    let sockets =
        (udp_in(&ns.client, SocketAddrV4::new(CLIENT, 0)), udp_in(&ns.server, SocketAddrV4::new(SERVER, SERVER_PORT)));
    let (cs, ss) = match sockets {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => return r.block(format!("binding the test UDP sockets: {e}")),
    };
    if let Err(e) = cs.send_to(b"openshell-guest-check", SocketAddrV4::new(SERVER, SERVER_PORT)) {
        r.fail(
            POLICY_ROUTE,
            format!("sendto {SERVER} from {CLIENT}: {e} (the source rule to table {POLICY_TABLE} did not route it)"),
            kernel_fix("CONFIG_IP_MULTIPLE_TABLES"),
        );
        return None;
    }
    let mut buf = [0u8; 64];
    let from = match ss.recv_from(&mut buf) {
        Ok((_, from)) => from,
        Err(e) => {
            r.pass(
                POLICY_ROUTE,
                format!("rule 'from {CLIENT} lookup {POLICY_TABLE}' gave the client a route to {SERVER}"),
            );
            r.fail(
                IP_FORWARD,
                format!("ip_forward=1 in the router netns, but the datagram never reached {SERVER} ({e})"),
                kernel_fix("CONFIG_IP_ADVANCED_ROUTER; check the nftables and bridge rows"),
            );
            return None;
        }
    };
    r.pass(POLICY_ROUTE, format!("rule 'from {CLIENT} lookup {POLICY_TABLE}' carried the client's datagram (its main table has no route off-link)"));
    r.pass(
        IP_FORWARD,
        format!("ip_forward=1 in the router netns; a UDP datagram from {CLIENT} crossed br0 -> vs0 to {SERVER}"),
    );
    if from.ip() == std::net::IpAddr::V4(ROUTER_UP) {
        r.pass(NAT, format!("the server saw the datagram from {ROUTER_UP}: masqueraded from {CLIENT}"));
    } else {
        r.fail(
            NAT,
            format!("the server saw source {}, not the masqueraded {ROUTER_UP}", from.ip()),
            kernel_fix("CONFIG_NF_NAT, CONFIG_NFT_NAT, CONFIG_NFT_MASQ"),
        );
    }

    // conntrack: the reply goes to the router's address and must be mapped back to the client.
    if let Err(e) = ss.send_to(b"reply", from) {
        return r.block(format!("the server's reply could not be sent: {e}"));
    }
    let count = conntrack_count(&ns.router);
    match cs.recv_from(&mut buf) {
        Ok((_, src)) if src == SocketAddrV4::new(SERVER, SERVER_PORT).into() => r.pass(
            CONNTRACK,
            format!("the reply to {} came back to {CLIENT} through its conntrack entry (nf_conntrack_count={count} in the router netns)", from.ip()),
        ),
        Ok((_, src)) => r.fail(CONNTRACK, format!("the client got a reply from {src}, expected {SERVER}:{SERVER_PORT}"), kernel_fix("CONFIG_NF_CONNTRACK")),
        Err(e) => r.fail(
            CONNTRACK,
            format!("no reply reached {CLIENT} ({e}); nf_conntrack_count={count} in the router netns"),
            kernel_fix("CONFIG_NF_CONNTRACK"),
        ),
    }
    Some(())
}

/// Sets bridge-nf-call-iptables in the namespace this process started in, for kernels where the
/// switch exists only there (and applies to every namespace).
fn initial_ns_bridge_nf(initial: &OwnedFd) -> std::io::Result<()> {
    enter(initial)?;
    let v = sysctl_set("/proc/sys/net/bridge/bridge-nf-call-iptables", "1")?;
    if v != "1" {
        return Err(std::io::Error::other(format!("reads {v:?} after writing 1")));
    }
    Ok(())
}

fn conntrack_count(router: &OwnedFd) -> String {
    match enter(router).and_then(|()| std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")) {
        Ok(s) => s.trim().to_owned(),
        Err(e) => format!("unreadable: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undecided_rows_name_what_blocked_them_and_legacy_iptables_stays_optional() {
        let mut r = Report { rows: Vec::new(), blocker: None };
        r.pass(NETNS, "ok");
        r.fail(VETH, "EOPNOTSUPP", kernel_fix("CONFIG_VETH"));
        let rows = r.finish();
        assert_eq!(rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), IDS);
        assert!(rows[2].reason.contains("not tried: the veth row failed"), "{:?}", rows[2]);
        assert!(rows.iter().find(|r| r.id == IPTABLES_LEGACY).is_some_and(|r| !r.required));
    }
}

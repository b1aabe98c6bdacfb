//! How the guest's `eth0` gets its address, decided from the kernel command line, and what ends
//! up in `resolv.conf`. Pure parsing and rendering, so both sides of the contract are unit-tested
//! on the host; applying it (ioctls, udhcpc) is init's job.
//!
//! Kernel parameters (the host writes them, init reads them):
//! - `openshell.net=ADDR/PREFIX,GATEWAY`: a static address the host already knows (passt's `-a`),
//!   so no DHCP round trip sits on the boot path;
//! - `openshell.net=dhcp`: ask the network backend, falling back to
//!   `openshell.net.fallback=ADDR/PREFIX,GATEWAY` when no lease arrives;
//! - `openshell.dns=IP[,IP…]`: nameservers to use when none came with the address.

use std::net::Ipv4Addr;

pub const NET_PARAM: &str = "openshell.net";
pub const FALLBACK_PARAM: &str = "openshell.net.fallback";
pub const DNS_PARAM: &str = "openshell.dns";
/// `/etc/resolv.conf` in the (read-only) rootfs is a symlink to this tmpfs file.
pub const RESOLV_CONF: &str = "/run/resolv.conf";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Config {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

impl Ipv4Config {
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
        Ipv4Addr::from(bits)
    }

    /// The host's cmdline form: `ADDR/PREFIX,GATEWAY` (gateway optional).
    pub fn param(&self) -> String {
        match self.gateway {
            Some(gw) => format!("{}/{},{gw}", self.addr, self.prefix),
            None => format!("{}/{}", self.addr, self.prefix),
        }
    }
}

impl std::str::FromStr for Ipv4Config {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (cidr, gw) = match s.split_once(',') {
            Some((c, g)) => (c, Some(g.parse().map_err(|_| format!("bad gateway {g:?} in {s:?}"))?)),
            None => (s, None),
        };
        let (addr, prefix) = cidr.split_once('/').ok_or_else(|| format!("{s:?} lacks /PREFIX"))?;
        let addr = addr.parse().map_err(|_| format!("bad address {addr:?} in {s:?}"))?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(|| format!("bad prefix in {s:?}"))?;
        Ok(Ipv4Config { addr, prefix, gateway: gw })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetPlan {
    /// No network device was given to the guest.
    None,
    Static(Ipv4Config),
    Dhcp {
        fallback: Option<Ipv4Config>,
    },
}

/// The value of `key=` on a kernel command line.
pub fn cmdline_param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

pub fn plan(cmdline: &str) -> Result<NetPlan, String> {
    match cmdline_param(cmdline, NET_PARAM) {
        None => Ok(NetPlan::None),
        Some("dhcp") => {
            let fallback = cmdline_param(cmdline, FALLBACK_PARAM).map(str::parse).transpose()?;
            Ok(NetPlan::Dhcp { fallback })
        }
        Some(v) => v.parse().map(NetPlan::Static),
    }
}

pub fn dns_servers(cmdline: &str) -> Vec<Ipv4Addr> {
    cmdline_param(cmdline, DNS_PARAM).map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect()).unwrap_or_default()
}

/// A lease as busybox `udhcpc` hands it to its script (environment `ip`, `mask`, `router`,
/// `dns`); `None` when the lease lacks an address.
pub fn lease_from_env(get: impl Fn(&str) -> Option<String>) -> Option<(Ipv4Config, Vec<Ipv4Addr>)> {
    let addr = get("ip")?.parse().ok()?;
    let prefix = get("mask").and_then(|m| m.parse().ok()).unwrap_or(24);
    let gateway = get("router").and_then(|r| r.split_whitespace().next()?.parse().ok());
    let dns = get("dns").map(|d| d.split_whitespace().filter_map(|s| s.parse().ok()).collect()).unwrap_or_default();
    Some((Ipv4Config { addr, prefix, gateway }, dns))
}

/// Whether a resolv.conf names at least one nameserver.
pub fn has_nameserver(resolv_conf: &str) -> bool {
    resolv_conf.lines().any(|l| l.split_whitespace().next() == Some("nameserver"))
}

/// The nameservers to fall back on when the address came without any: what the host passed on
/// the command line, else the gateway (passt and gvproxy both answer DNS there).
pub fn fallback_dns(cmdline_dns: &[Ipv4Addr], gateway: Option<Ipv4Addr>) -> Vec<Ipv4Addr> {
    if cmdline_dns.is_empty() {
        gateway.into_iter().collect()
    } else {
        cmdline_dns.to_vec()
    }
}

pub fn render_resolv_conf(servers: &[Ipv4Addr]) -> String {
    servers.iter().map(|s| format!("nameserver {s}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_plan_round_trips() {
        let c: Ipv4Config = "192.0.2.2/24,192.0.2.1".parse().unwrap();
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(plan(&format!("quiet openshell.net={} x=1", c.param())).unwrap(), NetPlan::Static(c));
    }

    #[test]
    fn dhcp_plan_with_and_without_fallback() {
        assert_eq!(plan("openshell.net=dhcp").unwrap(), NetPlan::Dhcp { fallback: None });
        let p = plan("openshell.net=dhcp openshell.net.fallback=10.0.2.15/24,10.0.2.2").unwrap();
        let NetPlan::Dhcp { fallback: Some(f) } = p else { panic!("{p:?}") };
        assert_eq!((f.addr, f.gateway), (Ipv4Addr::new(10, 0, 2, 15), Some(Ipv4Addr::new(10, 0, 2, 2))));
    }

    #[test]
    fn no_param_means_no_network_and_bad_ones_are_named() {
        assert_eq!(plan("console=ttyS0").unwrap(), NetPlan::None);
        for bad in
            ["openshell.net=1.2.3.4", "openshell.net=1.2.3.4/33", "openshell.net=x/24", "openshell.net=1.2.3.4/24,nope"]
        {
            assert!(plan(bad).is_err(), "{bad}");
        }
        // The fallback key must not be read as the main key.
        assert_eq!(plan("openshell.net.fallback=1.2.3.4/24").unwrap(), NetPlan::None);
    }

    #[test]
    fn udhcpc_environment_becomes_a_lease() {
        let env = |k: &str| match k {
            "ip" => Some("192.0.2.2".to_owned()),
            "mask" => Some("24".to_owned()),
            "router" => Some("192.0.2.1 192.0.2.254".to_owned()),
            "dns" => Some("192.0.2.1 9.9.9.9".to_owned()),
            _ => None,
        };
        let (c, dns) = lease_from_env(env).unwrap();
        assert_eq!(c.param(), "192.0.2.2/24,192.0.2.1");
        assert_eq!(dns, [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(9, 9, 9, 9)]);
        assert!(lease_from_env(|_| None).is_none());
    }

    #[test]
    fn dns_falls_back_to_cmdline_then_gateway() {
        let gw = Some(Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(fallback_dns(&[], gw), [Ipv4Addr::new(192, 0, 2, 1)]);
        let cmd = dns_servers("openshell.dns=1.1.1.1,bad,8.8.8.8");
        assert_eq!(fallback_dns(&cmd, gw), [Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)]);
        assert!(!has_nameserver("# empty\nsearch lan\n"));
        assert!(has_nameserver(&render_resolv_conf(&cmd)));
    }
}

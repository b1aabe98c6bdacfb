//! Facts about the running guest that `Info` reports. Each reader degrades
//! to an empty or zero value rather than failing: a control plane that
//! cannot answer because /proc looks odd would hide the guest entirely.

use std::fs;
use std::path::Path;

pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Milliseconds since the guest kernel booted (not since the gateway started),
/// so the host can spot a guest reboot even if the gateway restarts too.
pub fn uptime_ms() -> u64 {
    fs::read_to_string("/proc/uptime").ok().and_then(|s| parse_uptime_ms(&s)).unwrap_or(0)
}

fn parse_uptime_ms(text: &str) -> Option<u64> {
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1000.0) as u64)
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map_or(String::new(), |u| u.release().to_string_lossy().into_owned())
}

pub fn vcpus() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(0)
}

pub fn memory_kib() -> u64 {
    fs::read_to_string("/proc/meminfo").ok().and_then(|s| parse_mem_total_kib(&s)).unwrap_or(0)
}

fn parse_mem_total_kib(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// This process's soft open-files limit (0 if it cannot be read).
pub fn open_files_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft)
}

/// The kernel's listen-queue losses since boot (TcpExt in /proc/net/netstat).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ListenQueue {
    pub overflows: u64,
    pub drops: u64,
}

pub fn listen_queue() -> ListenQueue {
    fs::read_to_string("/proc/net/netstat").ok().and_then(|s| parse_listen_queue(&s)).unwrap_or_default()
}

/// /proc/net/netstat holds pairs of lines, a header of names and a line of values, each starting
/// with the same `Prefix:`.
fn parse_listen_queue(text: &str) -> Option<ListenQueue> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let field = |name: &str| {
        let at = names.split_whitespace().position(|n| n == name)?;
        values.split_whitespace().nth(at)?.parse().ok()
    };
    Some(ListenQueue { overflows: field("ListenOverflows")?, drops: field("ListenDrops")? })
}

/// Reads a digest file as written by `sha256sum` or as a bare hex string;
/// the first token is the digest. Absent or unreadable gives "".
pub fn read_digest(path: Option<&Path>) -> String {
    path.and_then(|p| fs::read_to_string(p).ok())
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        assert_eq!(parse_uptime_ms("12.34 40.00\n"), Some(12_340));
        assert_eq!(parse_mem_total_kib("MemTotal:        2035104 kB\nMemFree: 1 kB\n"), Some(2_035_104));
        assert_eq!(parse_uptime_ms(""), None);
    }

    #[test]
    fn listen_queue_losses_are_read_by_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPReqQFullDrop\n\
                       TcpExt: 0 7 9 3\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_listen_queue(netstat), Some(ListenQueue { overflows: 7, drops: 9 }));
        assert_eq!(parse_listen_queue("IpExt: InNoRoutes\nIpExt: 0\n"), None);
    }

    #[test]
    fn digest_takes_first_token_and_tolerates_absence() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kernel.sha256");
        fs::write(&p, "abc123  vmlinux\n").unwrap();
        assert_eq!(read_digest(Some(&p)), "abc123");
        assert_eq!(read_digest(Some(&dir.path().join("missing"))), "");
        assert_eq!(read_digest(None), "");
    }

    // The values come from /proc and sysinfo(2): the Linux guest's (and a Linux host's) facts.
    #[cfg(target_os = "linux")]
    #[test]
    fn live_values_match_independent_sources() {
        let uname = std::process::Command::new("uname").arg("-r").output().unwrap();
        assert_eq!(kernel_release(), String::from_utf8_lossy(&uname.stdout).trim());
        let nproc = std::process::Command::new("nproc").output().unwrap();
        assert_eq!(vcpus().to_string(), String::from_utf8_lossy(&nproc.stdout).trim());
        // sysinfo(2) is where the kernel's MemTotal comes from.
        let si = nix::sys::sysinfo::sysinfo().unwrap();
        assert_eq!(memory_kib(), si.ram_total() / 1024);
    }
}

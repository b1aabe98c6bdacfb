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

/// One mount, as `/proc/self/mountinfo` and statvfs(2) show it (the `MountFact` of `Info`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
    pub read_write: bool,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// The mount at `mount_point` now (the topmost, when several are stacked there), with its size;
/// `None` when nothing is mounted there or mountinfo cannot be read.
pub fn mount_at(mount_point: &str) -> Option<Mount> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    #[allow(unused_mut)] // sized on Linux only
    let mut m = parse_mountinfo(&text, mount_point)?;
    // A failed statvfs leaves the sizes at 0, which the host reads as "unknown", not as full.
    // Linux only: the guest is Linux, and statvfs' field types differ on macOS, where this
    // library is built for its client side alone.
    #[cfg(target_os = "linux")]
    if let Ok(st) = nix::sys::statvfs::statvfs(mount_point) {
        let frsize = st.fragment_size();
        m.total_bytes = st.blocks() * frsize;
        m.free_bytes = st.blocks_available() * frsize;
    }
    Some(m)
}

/// The last `/proc/self/mountinfo` line for `mount_point` (mounted later, so on top):
/// `ID PARENT MAJ:MIN ROOT MOUNT_POINT MOUNT_OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTS`.
/// Read-write only when neither the mount's nor the superblock's options say `ro`.
fn parse_mountinfo(text: &str, mount_point: &str) -> Option<Mount> {
    text.lines().rev().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mut fields = mount.split(' ');
        let point = fields.nth(4)?;
        if unescape_octal(point) != mount_point {
            return None;
        }
        let mount_opts = fields.next()?;
        let mut fs = fs.split(' ');
        let (fs_type, source, super_opts) = (fs.next()?, fs.next()?, fs.next().unwrap_or_default());
        let ro = |opts: &str| opts.split(',').any(|o| o == "ro");
        Some(Mount {
            mount_point: mount_point.to_owned(),
            fs_type: fs_type.to_owned(),
            source: unescape_octal(source),
            read_write: !ro(mount_opts) && !ro(super_opts),
            ..Mount::default()
        })
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as `\NNN` (octal).
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code =
            b.get(i + 1..i + 4).and_then(|d| std::str::from_utf8(d).ok()).and_then(|d| u8::from_str_radix(d, 8).ok());
        match (b[i], code) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    fn mounts_are_read_from_mountinfo() {
        let text = "22 1 0:21 / / ro,relatime - ext4 /dev/vda ro\n\
                    30 22 254:16 / /.openshell-lower/run rw,nosuid,nodev,relatime - ext4 /dev/vdb rw,noinit_itable\n\
                    31 29 0:30 / / rw,relatime - overlay overlay rw,lowerdir=/,upperdir=/run/upper\n\
                    40 31 0:40 / /mnt/a\\040b rw shared:5 - 9p tag\\040x ro,trans=virtio\n";
        let root = parse_mountinfo(text, "/").unwrap();
        assert_eq!((root.fs_type.as_str(), root.source.as_str(), root.read_write), ("overlay", "overlay", true));
        let data = parse_mountinfo(text, "/.openshell-lower/run").unwrap();
        assert_eq!((data.fs_type.as_str(), data.source.as_str(), data.read_write), ("ext4", "/dev/vdb", true));
        // Optional fields, escaped spaces, and a superblock mounted read-only.
        let a = parse_mountinfo(text, "/mnt/a b").unwrap();
        assert_eq!((a.fs_type.as_str(), a.source.as_str(), a.read_write), ("9p", "tag x", false));
        assert_eq!(parse_mountinfo(text, "/nowhere"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_live_root_mount_has_a_size() {
        let root = mount_at("/").expect("/ is in /proc/self/mountinfo");
        assert!(!root.fs_type.is_empty() && root.total_bytes > 0 && root.free_bytes <= root.total_bytes, "{root:?}");
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

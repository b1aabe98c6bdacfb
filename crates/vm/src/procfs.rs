//! What `/proc` says about processes, listening TCP sockets and flock holders: the raw host facts
//! the verifier's probes are made of, and what stale-state recovery asks of a recorded pid. Parsing is split from reading so the parsers are unit-tested
//! on fixed text. Linux only, like the rest of the gateway's host side.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// A process as `/proc/<pid>` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessFact {
    pub pid: u32,
    /// False when there is no `/proc/<pid>` or the process is a zombie (it has exited).
    pub alive: bool,
    pub ppid: Option<u32>,
    /// The command line, arguments joined by spaces (empty when gone).
    pub cmdline: String,
}

impl ProcessFact {
    /// Whether this recorded pid is still ours: alive, and the program itself (the file name of
    /// its first argument) mentions one of `programs`, not merely some argument (an editor open on
    /// `passt.log` is not passt). The one rule for verify's rows and for recovery before it kills.
    pub fn program_is_any(&self, programs: &[&str]) -> bool {
        let argv0 = self.cmdline.split(' ').next().unwrap_or_default();
        let name = argv0.rsplit('/').next().unwrap_or_default();
        self.alive && !name.is_empty() && programs.iter().any(|p| name.contains(p))
    }
}

pub fn process(pid: u32) -> ProcessFact {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok();
    let parsed = stat.as_deref().and_then(parse_stat);
    let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).split('\0').filter(|a| !a.is_empty()).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    ProcessFact {
        pid,
        alive: parsed.is_some_and(|(state, _)| state != 'Z' && state != 'X'),
        ppid: parsed.map(|(_, ppid)| ppid),
        cmdline,
    }
}

/// The process's arguments, exactly as `/proc/<pid>/cmdline` holds them (NUL-separated, so an
/// argument with spaces stays one); `None` when it cannot be read.
pub fn argv(pid: u32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let raw = raw.strip_suffix(b"\0").unwrap_or(&raw);
    Some(raw.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
        .filter(|a: &Vec<String>| !a[0].is_empty())
}

/// The process's working directory (what its relative paths mean).
pub fn cwd(pid: u32) -> Option<std::path::PathBuf> {
    fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// What the process's fd `fd` is open on (`/proc/<pid>/fd/<fd>`), e.g. a file handed to the VMM.
pub fn fd_target(pid: u32, fd: i32) -> Option<std::path::PathBuf> {
    fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()
}

/// One descriptor a process holds: what it is open on and whether it can write through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFile {
    pub fd: i32,
    /// `/proc/<pid>/fd/<fd>`'s target (a path, `socket:[N]`, `pipe:[N]`; ` (deleted)` appended
    /// by the kernel when the file was unlinked).
    pub target: std::path::PathBuf,
    /// The access mode from `/proc/<pid>/fdinfo/<fd>`'s `flags` is `O_WRONLY` or `O_RDWR`.
    pub writable: bool,
}

/// Every descriptor of `pid` whose target and access mode could be read; `None` when its
/// `/proc/<pid>/fd` cannot be listed (another user's process, or it is gone).
pub fn open_files(pid: u32) -> Option<Vec<OpenFile>> {
    let dir = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let mut out: Vec<OpenFile> = dir
        .flatten()
        .filter_map(|e| {
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(e.path()).ok()?;
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
            Some(OpenFile { fd, target, writable: fdinfo_writable(&info)? })
        })
        .collect();
    out.sort_by_key(|f| f.fd);
    Some(out)
}

/// Whether fdinfo's `flags:` (octal open flags) has a writable access mode (`O_ACCMODE` bits 1
/// or 2); `None` without a parsable `flags:` line.
fn fdinfo_writable(fdinfo: &str) -> Option<bool> {
    let flags = fdinfo.lines().find_map(|l| l.strip_prefix("flags:"))?.trim();
    let flags = u32::from_str_radix(flags, 8).ok()?;
    Some(flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32)
}

/// Each thread of `pid` as "tid STATE in WCHAN" (`/proc/<pid>/task/*`): where a process that
/// does not die is blocked. Empty when `/proc/<pid>` cannot be read.
pub fn thread_states(pid: u32) -> Vec<String> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut tids: Vec<u32> = tasks.flatten().filter_map(|t| t.file_name().to_str()?.parse().ok()).collect();
    tids.sort_unstable();
    tids.into_iter()
        .map(|tid| {
            let dir = format!("/proc/{pid}/task/{tid}");
            let state = fs::read_to_string(format!("{dir}/stat")).ok().and_then(|s| parse_stat(&s)).map(|(c, _)| c);
            let wchan = fs::read_to_string(format!("{dir}/wchan")).unwrap_or_default();
            let wchan = if wchan.is_empty() || wchan == "0" { "-" } else { wchan.trim() };
            format!("{tid} {} in {wchan}", state.unwrap_or('?'))
        })
        .collect()
}

/// `(state, ppid)` from `/proc/<pid>/stat`. The command name is in parentheses and may itself
/// contain spaces or parentheses, so the fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// A listening TCP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpListenerFact {
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u64,
}

/// Every socket in LISTEN state on `port`, IPv4 and IPv6, in this network namespace.
pub fn tcp_listeners(port: u16) -> Vec<TcpListenerFact> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(file).unwrap_or_default();
        out.extend(parse_proc_net_tcp(&text).into_iter().filter(|l| l.port == port));
    }
    out
}

/// LISTEN rows of a `/proc/net/tcp` or `/proc/net/tcp6` table.
fn parse_proc_net_tcp(text: &str) -> Vec<TcpListenerFact> {
    const LISTEN: &str = "0A";
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        if cols.len() < 10 || cols[3] != LISTEN {
            continue;
        }
        let Some((addr, port)) = cols[1].split_once(':') else { continue };
        let (Some(addr), Ok(port), Ok(inode)) = (parse_hex_addr(addr), u16::from_str_radix(port, 16), cols[9].parse())
        else {
            continue;
        };
        out.push(TcpListenerFact { addr, port, inode });
    }
    out
}

/// The kernel prints each 32-bit word of the address as the number it is in host byte order, so
/// the bytes come back with `to_ne_bytes`.
fn parse_hex_addr(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<u32>> =
        (0..hex.len() / 8).map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()).collect();
    let bytes: Vec<u8> = words?.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?))),
        _ => None,
    }
}

/// Whether `pid` has the socket with this inode open. `None` when its fds cannot be read.
pub fn holds_socket(pid: u32, inode: u64) -> Option<bool> {
    let want = format!("socket:[{inode}]");
    let dir = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(dir.flatten().any(|e| fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == want.as_str())))
}

/// The process holding the socket with this inode open, searching every readable `/proc/<pid>`.
pub fn socket_owner(inode: u64) -> Option<u32> {
    let procs = fs::read_dir("/proc").ok()?;
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| holds_socket(pid, inode) == Some(true))
}

/// The pids holding a granted `flock` on `path`, from `/proc/locks` (matched by device and inode).
pub fn flock_holders(path: &Path) -> Vec<u32> {
    // rustix's stat keeps the dev_t in the type its major/minor take on each target (std's
    // `MetadataExt::dev` widens it to u64, while Apple's dev_t is an i32).
    let Ok(st) = rustix::fs::stat(path) else { return Vec::new() };
    let (major, minor) = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
    let text = fs::read_to_string("/proc/locks").unwrap_or_default();
    parse_proc_locks(&text, major, minor, st.st_ino)
}

fn parse_proc_locks(text: &str, major: u32, minor: u32, inode: u64) -> Vec<u32> {
    let want = format!("{major:02x}:{minor:02x}:{inode}");
    text.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF"; waiters carry a "->" column.
            if cols.len() < 6 || cols[1] != "FLOCK" || cols.contains(&"->") || !cols[5].eq_ignore_ascii_case(&want) {
                return None;
            }
            cols[4].parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_modes_from_fdinfo() {
        assert_eq!(fdinfo_writable("pos:\t0\nflags:\t0100000\nmnt_id:\t22\n"), Some(false));
        assert_eq!(fdinfo_writable("pos:\t0\nflags:\t02100002\n"), Some(true));
        assert_eq!(fdinfo_writable("flags:\t01\n"), Some(true));
        assert_eq!(fdinfo_writable("pos:\t0\n"), None);
    }

    /// This process's own descriptors, opened with known modes, read back through /proc.
    #[test]
    fn open_files_reads_targets_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        fs::write(&path, b"x").unwrap();
        let ro = fs::File::open(&path).unwrap();
        let rw = fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let files = open_files(std::process::id()).unwrap();
        let mode = |f: &fs::File| {
            use std::os::fd::AsRawFd;
            files.iter().find(|o| o.fd == f.as_raw_fd()).map(|o| (o.target.clone(), o.writable))
        };
        let path = path.canonicalize().unwrap();
        assert_eq!(mode(&ro), Some((path.clone(), false)));
        assert_eq!(mode(&rw), Some((path, true)));
    }

    #[test]
    fn program_is_stricter_than_any_argument() {
        let fact = |cmdline: &str, alive| ProcessFact { pid: 1, alive, ppid: Some(0), cmdline: cmdline.into() };
        let editor = fact("vim /var/log/passt.log", true);
        assert!(!editor.program_is_any(&["passt"]));
        assert!(fact("/usr/bin/passt -f -q --fd 3", true).program_is_any(&["passt"]));
        assert!(fact("/usr/bin/qemu-system-x86_64 -M microvm", true).program_is_any(crate::backend::VMM_PROGRAMS));
        assert!(!fact("/usr/bin/passt -f", false).program_is_any(&["passt"]), "a zombie runs nothing");
    }

    #[test]
    #[cfg_attr(
        not(target_os = "linux"),
        ignore = "reads /proc, which macOS lacks (procfs has no macOS implementation yet; README, macOS)"
    )]
    fn thread_states_name_every_thread_of_a_live_process() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let parked = std::thread::spawn(move || rx.recv());
        let states = thread_states(std::process::id());
        drop(tx);
        let _ = parked.join();
        assert!(states.len() >= 2, "this test's own threads: {states:?}");
        assert!(states.iter().all(|t| t.contains(" in ")), "{states:?}");
        assert!(thread_states(u32::MAX).is_empty());
    }

    #[test]
    fn stat_with_odd_command_names() {
        assert_eq!(parse_stat("42 (qemu-system-x86) S 7 42 42 0"), Some(('S', 7)));
        assert_eq!(parse_stat("42 (a b) c) Z 1 42"), Some(('Z', 1)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn listeners_v4_and_v6() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:7553 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17 1 0000000000000000 100 0 0 10 0
   2: 0100007F:7553 0100007F:C000 01 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0";
        let got = parse_proc_net_tcp(v4);
        assert_eq!(
            got,
            [
                TcpListenerFact { addr: "127.0.0.1".parse().unwrap(), port: 30035, inode: 4242 },
                TcpListenerFact { addr: "0.0.0.0".parse().unwrap(), port: 22, inode: 17 },
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:7553 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:7553 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 556 1 0000000000000000 100 0 0 10 0";
        let got = parse_proc_net_tcp(v6);
        assert_eq!(got[0].addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(got[1].addr, "::".parse::<IpAddr>().unwrap());
        assert_eq!(got[1].inode, 556);
    }

    #[test]
    fn flock_holder_by_device_and_inode() {
        let locks = "1: FLOCK  ADVISORY  WRITE 321 00:2d:77 0 EOF
1: -> FLOCK  ADVISORY  WRITE 999 00:2d:77 0 EOF
2: POSIX  ADVISORY  WRITE 5 00:2d:77 0 EOF
3: FLOCK  ADVISORY  WRITE 6 08:01:77 0 EOF";
        assert_eq!(parse_proc_locks(locks, 0, 0x2d, 77), [321]);
        assert_eq!(parse_proc_locks(locks, 0, 0x2d, 78), Vec::<u32>::new());
    }

    #[test]
    #[cfg_attr(
        not(target_os = "linux"),
        ignore = "reads /proc, which macOS lacks (procfs has no macOS implementation yet; README, macOS)"
    )]
    fn this_process_is_alive_and_has_a_parent() {
        let me = process(std::process::id());
        assert!(me.alive && me.ppid.is_some() && !me.cmdline.is_empty(), "{me:?}");
        let args: Vec<String> = std::env::args().collect();
        assert_eq!(argv(std::process::id()), Some(args));
        assert_eq!(cwd(std::process::id()), std::env::current_dir().ok());
    }

    #[test]
    #[cfg_attr(
        not(target_os = "linux"),
        ignore = "reads /proc, which macOS lacks (procfs has no macOS implementation yet; README, macOS)"
    )]
    fn argv_keeps_spaces_inside_an_argument() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep").arg0("a sleep").arg("60").spawn().unwrap();
        let pid = child.id();
        // Until it has exec'd, its argv is the test binary's (and empty while it execs).
        let mut got = argv(pid);
        for _ in 0..5000 {
            if got.as_ref().is_some_and(|a| a[0] == "a sleep") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            got = argv(pid);
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(got, Some(vec!["a sleep".to_owned(), "60".to_owned()]));
    }

    #[test]
    #[cfg_attr(
        not(target_os = "linux"),
        ignore = "reads /proc, which macOS lacks (procfs has no macOS implementation yet; README, macOS)"
    )]
    fn real_listener_is_found_with_its_owner() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = tcp_listeners(port);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(holds_socket(std::process::id(), found[0].inode), Some(true));
    }

    #[test]
    #[cfg_attr(
        not(target_os = "linux"),
        ignore = "reads /proc, which macOS lacks (procfs has no macOS implementation yet; README, macOS)"
    )]
    fn real_flock_holder_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let f = nix::fcntl::Flock::lock(fs::File::create(&path).unwrap(), nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .unwrap();
        assert_eq!(flock_holders(&path), [std::process::id()]);
        drop(f);
        assert!(flock_holders(&path).is_empty());
    }
}

//! PID 1 of the guest. Mounts the basics, configures the network, cleans what an earlier boot of
//! the same instance left in its share, runs the requested command as the workload, reaps every
//! child, stops the workload on SIGTERM/SIGINT/SIGPWR, writes the command's exit status back to
//! the share and powers off.
//!
//! Statically linked (built with `+crt-static`) so the rootfs needs no libc. Each step prints a
//! millisecond timestamp (since boot) so the host can read a boot timeline off the console.
//!
//! The same binary is busybox `udhcpc`'s lease script (`udhcpc -s /sbin/openshell-init`): run
//! with a udhcpc event as its first argument and not as PID 1, it applies the lease and exits.
// `unsafe` is allowed in this module only: PID 1's work is raw syscalls (mount, reboot, setsid, waitpid, signal masks) in the guest; each block carries its `SAFETY:`.
#![allow(unsafe_code)]

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use openshell_guest::netconf::{self, Ipv4Config, NetPlan};
use openshell_guest::{
    ifconfig, ExecRequest, GuestMount, DATA_DISK_ID, DATA_UPPER_DIR, DATA_WORK_DIR, EXEC_FILE, EXIT_CODE_FILE,
    LOWER_ROOT, MOUNTS_PARAM, ROOT_DISK, ROOT_DISK_DEV, ROOT_DISK_ID, ROOT_PARAM, SHARE_MOUNT, SHARE_TAG,
    SHARE_TRANSPORT_PARAM, STOP_REQUEST_FILE,
};

/// How long the workload gets between SIGTERM and SIGKILL once a stop is requested.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often init looks for the host's stop request in the share (a 9p/virtio-fs stat).
const STOP_POLL: Duration = Duration::from_millis(100);
/// Signals init waits on (blocked, then taken synchronously with `sigtimedwait`).
const WAITED: [libc::c_int; 5] = [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGPWR, libc::SIGALRM];
const ETH: &str = "eth0";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if std::process::id() != 1 {
        if let Some(event) = args.get(1) {
            std::process::exit(dhcp_script(event));
        }
        eprintln!("openshell-init: not PID 1; this is the guest's init (or udhcpc's script)");
        std::process::exit(2);
    }
    // Briefly, before /proc and devtmpfs: most boots that miss it get it here.
    let late = ensure_console("", Duration::from_secs(2));
    step("init started");
    // Blocked from the start, so a stop request that arrives while we boot is not lost.
    block_waited_signals();
    // /proc first: the command line says what the root is, and a disk root is switched into
    // before anything else is mounted.
    if let Err(e) = mount("proc", "/proc", "proc", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, "") {
        eprintln!("openshell-init: {e}");
    }
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let disk_root = netconf::cmdline_param(&cmdline, ROOT_PARAM) == Some(ROOT_DISK);
    if disk_root {
        if let Err(e) = enter_disk_root() {
            // Without its data disk the guest would run on a root that forgets what it writes,
            // which is not what was asked: say why and power off without an exit code (the host
            // then reports that, with this line in the console tail).
            eprintln!(
                "openshell-init: cannot set up the disk root: {e}. The data disk is the instance's data.ext4: check it on the host with `e2fsck -f data.ext4`, or start it afresh with `vm run --reset`"
            );
            power_off();
        }
    }
    mount_basics();
    // Again once devtmpfs is surely mounted, by the device the command line names too, in case the
    // console was not there at the start.
    if late && ensure_console(&cmdline, Duration::from_secs(10)) {
        step("init started (the kernel could not open a console; init opened it)");
    }
    set_hostname("gateway");
    set_clock(&cmdline);
    network_up(&cmdline);
    let code = match run_request(&cmdline) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("openshell-init: {e}");
            127
        }
    };
    report_exit(code);
    step(&format!("exit-code={code}; powering off"));
    if disk_root {
        leave_disk_root();
    }
    power_off();
}

// LOWER_ROOT (openshell_guest): where the root image stays mounted once the overlay is the root,
// with the data disk below it at `run` (DATA_DISK_MOUNT): what [`leave_disk_root`] pivots back
// to, to unmount the data disk.

/// The kernel mounted the root image read-only at `/` (`root=/dev/vda`). Checks that the device is
/// the root image (by its virtio serial), mounts the data disk at `/run` (journal replayed by the
/// kernel if the last boot did not unmount it), stacks overlayfs (lower: the image, upper and
/// work: the data disk) at `/tmp`, and pivots into it. The image stays mounted at [`LOWER_ROOT`]
/// and the data disk at `LOWER_ROOT/run`. `/run` and `/tmp` are only mount points here: the
/// basics mount fresh ones inside the overlay afterwards.
fn enter_disk_root() -> Result<(), String> {
    mount("sysfs", "/sys", "sysfs", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, "")?;
    let root_dev = ROOT_DISK_DEV.trim_start_matches("/dev/");
    match disk_serial(root_dev).as_deref() {
        Some(ROOT_DISK_ID) => {}
        other => {
            return Err(format!(
                "{ROOT_DISK_DEV} is not the root image (its serial is {other:?}, expected {ROOT_DISK_ID:?})"
            ))
        }
    }
    let data = find_disk(DATA_DISK_ID)
        .ok_or_else(|| format!("no virtio disk with serial {DATA_DISK_ID:?} (the data disk)"))?;
    // The kernel mounts devtmpfs at /dev after the root (DEVTMPFS_MOUNT); mount it if it did not.
    let dev = format!("/dev/{data}");
    if !std::path::Path::new(&dev).exists() {
        mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    }
    // noinit_itable: the host made the disk sparse with lazy inode tables, which read as zeros;
    // the kernel's background zeroing would only write them out.
    mount(&dev, "/run", "ext4", libc::MS_NOSUID | libc::MS_NODEV, "noinit_itable")
        .map_err(|e| format!("data disk {dev}: {e}"))?;
    for d in [DATA_UPPER_DIR, DATA_WORK_DIR] {
        fs::create_dir_all(format!("/run/{d}")).map_err(|e| format!("data disk: mkdir /run/{d}: {e}"))?;
    }
    let opts = format!("lowerdir=/,upperdir=/run/{DATA_UPPER_DIR},workdir=/run/{DATA_WORK_DIR}");
    mount("overlay", "/tmp", "overlay", 0, &opts)?;
    let put_old = format!("/tmp{LOWER_ROOT}");
    fs::create_dir_all(&put_old).map_err(|e| format!("mkdir {put_old}: {e}"))?;
    pivot_root("/tmp", &put_old)?;
    // What only served the switch; the overlay gets its own below.
    for m in ["proc", "sys", "dev"] {
        detach(&format!("{LOWER_ROOT}/{m}"));
    }
    step(&format!("root: overlay of {ROOT_DISK_DEV} (read-only) and data disk {dev}"));
    Ok(())
}

/// Before power-off on a disk root: stops every process left, pivots back onto the root image and
/// unmounts the overlay (with everything mounted in it) and then the data disk, so its ext4 is
/// clean and the next boot replays nothing. If the data disk stays busy it is remounted read-only
/// instead, which flushes its journal just the same.
fn leave_disk_root() {
    // SAFETY: kill/waitpid have no memory preconditions; -1 spares init itself.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        while libc::waitpid(-1, std::ptr::null_mut(), 0) > 0 {}
        libc::sync();
    }
    let lower_tmp = format!("{LOWER_ROOT}/tmp");
    if let Err(e) = pivot_root(LOWER_ROOT, &lower_tmp) {
        eprintln!("openshell-init: {e}; the data disk is left to the journal");
        return;
    }
    detach("/tmp");
    let data = cstr("/run");
    for attempt in 0..50 {
        // SAFETY: umount reads a NUL-terminated string we own.
        if unsafe { libc::umount(data.as_ptr()) } == 0 {
            step("data disk unmounted");
            return;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) || attempt == 49 {
            eprintln!("openshell-init: unmount the data disk: {e}; remounting it read-only");
            let _ = mount("", "/run", "", libc::MS_REMOUNT | libc::MS_RDONLY, "");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cstr(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).expect("no NUL in paths")
}

fn pivot_root(new_root: &str, put_old: &str) -> Result<(), String> {
    let (new, old) = (cstr(new_root), cstr(put_old));
    // SAFETY: pivot_root reads two NUL-terminated strings we own; chdir likewise.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, new.as_ptr(), old.as_ptr()) };
    if rc != 0 {
        return Err(format!("pivot_root {new_root} {put_old}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    unsafe { libc::chdir(c"/".as_ptr()) };
    Ok(())
}

/// Lazily unmounts `target` and everything below it (nothing is left using them).
fn detach(target: &str) {
    let t = cstr(target);
    // SAFETY: umount2 reads a NUL-terminated string we own.
    if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } != 0 {
        eprintln!("openshell-init: unmount {target}: {}", std::io::Error::last_os_error());
    }
}

/// The virtio serial of block device `name` (`vda`), as the kernel shows it.
fn disk_serial(name: &str) -> Option<String> {
    fs::read_to_string(format!("/sys/block/{name}/serial")).ok().map(|s| s.trim().to_owned())
}

/// The block device (`vdb`) whose virtio serial is `id`.
fn find_disk(id: &str) -> Option<String> {
    let mut names: Vec<String> =
        fs::read_dir("/sys/block").ok()?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names.into_iter().find(|n| disk_serial(n).as_deref() == Some(id))
}

fn uptime_ms() -> u128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u128 * 1000 + ts.tv_nsec as u128 / 1_000_000
}

fn step(what: &str) {
    // One write per line so it is not interleaved with the workload's output.
    let line = format!("openshell-init: [{:>6} ms] {what}\n", uptime_ms());
    let _ = std::io::stderr().write_all(line.as_bytes());
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> Result<(), String> {
    let _ = fs::create_dir_all(target);
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in mount arguments");
    let (src, tgt, fst, dat) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fst.as_ptr(), flags, dat.as_ptr().cast()) };
    if rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY) {
        Ok(())
    } else {
        Err(format!("mount {fstype} on {target}: {}", std::io::Error::last_os_error()))
    }
}

/// The kernel hands init `/dev/console` as its stdio, unless the console's driver was not up yet
/// when it tried ("Warning: unable to open an initial console.", seen with libkrun's hvc0 inside
/// the nested host under TCG: init's steps and the workload's output then went nowhere). Init
/// then opens the console itself: `/dev/console`, or the device the command line's last
/// `console=` names (with devtmpfs mounted, `/dev/hvc0` exists once its driver has probed), for up
/// to `wait`. Returns whether it had to; a boot that got its console is untouched.
///
/// Init's stdout is never closed by the time this runs: Rust's runtime opens `/dev/null` on any
/// of fds 0-2 that a process starts without, before `main`. So "no console" reads as "stdout is
/// not a terminal" (every console the kernel hands init is one), not as a closed descriptor.
fn ensure_console(cmdline: &str, wait: Duration) -> bool {
    // SAFETY: isatty on a descriptor number touches no memory of ours.
    if unsafe { libc::isatty(1) } == 1 {
        return false;
    }
    let named = cmdline
        .split_whitespace()
        .filter_map(|p| p.strip_prefix("console="))
        .next_back()
        .map(|c| format!("/dev/{}", c.split(',').next().unwrap_or(c)));
    let candidates: Vec<std::ffi::CString> = std::iter::once("/dev/console".to_owned())
        .chain(named)
        .filter_map(|p| std::ffi::CString::new(p).ok())
        .collect();
    let until = std::time::Instant::now() + wait;
    loop {
        for path in &candidates {
            // SAFETY: open reads a NUL-terminated string we own.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
            if fd >= 0 {
                for target in (0..3).filter(|&t| t != fd) {
                    // SAFETY: dup2 on descriptors, no memory.
                    unsafe { libc::dup2(fd, target) };
                }
                if fd > 2 {
                    // SAFETY: as above; fd is ours and now duplicated.
                    unsafe { libc::close(fd) };
                }
                return true;
            }
        }
        if std::time::Instant::now() >= until {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn mount_basics() {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    // Mounted already unless a disk root was switched into (where /proc is the overlay's own).
    let proc_flags =
        if std::path::Path::new("/proc/self").exists() { None } else { Some(nosuid_nodev | libc::MS_NOEXEC) };
    for (src, tgt, fs, flags, data) in [
        ("proc", "/proc", "proc", proc_flags.unwrap_or(0), ""),
        ("sysfs", "/sys", "sysfs", nosuid_nodev | libc::MS_NOEXEC, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_nodev | libc::MS_NOEXEC, ""),
    ] {
        if tgt == "/proc" && proc_flags.is_none() {
            continue;
        }
        if let Err(e) = mount(src, tgt, fs, flags, data) {
            eprintln!("openshell-init: {e}");
        }
    }
    step("filesystems mounted");
}

fn set_hostname(name: &str) {
    // SAFETY: sethostname reads `len` bytes from a live slice.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        eprintln!("openshell-init: cannot set the hostname: {}", std::io::Error::last_os_error());
    }
}

/// The host passes its wall clock: the guest has no RTC, and TLS needs a plausible date.
fn set_clock(cmdline: &str) {
    let Some(secs) = netconf::cmdline_param(cmdline, "openshell.time").and_then(|s| s.parse::<i64>().ok()) else {
        return;
    };
    let ts = libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: 0 };
    // SAFETY: clock_settime reads the timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        eprintln!("openshell-init: cannot set the clock: {}", std::io::Error::last_os_error());
    }
}

/// `lo` always; `eth0` as the command line says: the host's static address (fast path), or DHCP
/// from the network backend with a static fallback. Then a nameserver, whatever the source.
fn network_up(cmdline: &str) {
    if let Err(e) = ifconfig::link_up("lo") {
        eprintln!("openshell-init: {e}");
    }
    let plan = match netconf::plan(cmdline) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("openshell-init: {e}; eth0 left down");
            return;
        }
    };
    let configured = match plan {
        NetPlan::None => return,
        NetPlan::Static(c) => apply(&c).map(|()| (c, "static")),
        NetPlan::Dhcp { fallback } => match dhcp() {
            Some(c) => Ok((c, "dhcp")),
            None => match fallback {
                Some(c) => {
                    eprintln!("openshell-init: no DHCP lease; using the static fallback {}", c.param());
                    apply(&c).map(|()| (c, "static fallback"))
                }
                None => Err("no DHCP lease and no static fallback".to_owned()),
            },
        },
    };
    match configured {
        Ok((c, how)) => {
            if let Some(gw) = c.gateway {
                announce(gw);
            }
            ensure_nameserver(cmdline, c.gateway);
            step(&format!("network up: {ETH} {}/{} via {} ({how})", c.addr, c.prefix, opt(c.gateway)));
        }
        Err(e) => eprintln!("openshell-init: {ETH}: {e}"),
    }
}

/// Makes the guest send a frame at once. passt learns the guest's MAC address from the first
/// frame it sends; until then the SYNs of forwarded connections go out to the broadcast address,
/// the guest's TCP drops them, and the first client waits out SYN retransmits (seconds). A
/// datagram to the gateway's discard port makes the kernel ARP for it right away.
fn announce(gateway: Ipv4Addr) {
    let sent = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| s.send_to(&[], (gateway, 9)));
    if let Err(e) = sent {
        eprintln!("openshell-init: cannot announce eth0 to {gateway}: {e}");
    }
}

fn opt(ip: Option<Ipv4Addr>) -> String {
    ip.map_or_else(|| "-".into(), |i| i.to_string())
}

fn apply(c: &Ipv4Config) -> Result<(), String> {
    ifconfig::set_addr(ETH, c.addr, c.netmask()).map_err(|e| e.to_string())?;
    ifconfig::link_up(ETH).map_err(|e| e.to_string())?;
    if let Some(gw) = c.gateway {
        ifconfig::add_default_route(gw).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Runs busybox udhcpc once (3 tries, 1 s apart) with this binary as its script; the script
/// applies the lease. Returns what was applied.
fn dhcp() -> Option<Ipv4Config> {
    let _ = ifconfig::link_up(ETH);
    let status = unblocked(&mut Command::new("/sbin/udhcpc"))
        .args(["-i", ETH, "-f", "-q", "-n", "-t", "3", "-T", "1", "-s", "/sbin/openshell-init"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => fs::read_to_string(LEASE_FILE).ok()?.trim().parse().ok(),
        Ok(s) => {
            eprintln!("openshell-init: udhcpc got no lease ({s})");
            None
        }
        Err(e) => {
            eprintln!("openshell-init: cannot run /sbin/udhcpc: {e}");
            None
        }
    }
}

/// Where the lease script records what it applied, for init (PID 1) to read back.
const LEASE_FILE: &str = "/run/openshell-lease";

/// udhcpc's script: `deconfig` clears the address, `bound`/`renew` apply the lease from the
/// environment; other events need nothing.
fn dhcp_script(event: &str) -> i32 {
    let result = match event {
        "deconfig" => ifconfig::clear_addr(ETH).and_then(|()| ifconfig::link_up(ETH)).map_err(|e| e.to_string()),
        "bound" | "renew" => match netconf::lease_from_env(|k| std::env::var(k).ok()) {
            Some((c, dns)) => apply(&c).and_then(|()| {
                if !dns.is_empty() {
                    write_resolv_conf(&dns)?;
                }
                fs::write(LEASE_FILE, c.param()).map_err(|e| format!("{LEASE_FILE}: {e}"))
            }),
            None => Err("lease without an address".to_owned()),
        },
        _ => Ok(()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("openshell-init (udhcpc {event}): {e}");
            1
        }
    }
}

/// A guest with an address but no nameserver cannot resolve anything: fall back to what the
/// host passed, else the gateway.
fn ensure_nameserver(cmdline: &str, gateway: Option<Ipv4Addr>) {
    let current = fs::read_to_string(netconf::RESOLV_CONF).unwrap_or_default();
    if netconf::has_nameserver(&current) {
        return;
    }
    let servers = netconf::fallback_dns(&netconf::dns_servers(cmdline), gateway);
    if let Err(e) = write_resolv_conf(&servers) {
        eprintln!("openshell-init: {e}");
    }
}

fn write_resolv_conf(servers: &[Ipv4Addr]) -> Result<(), String> {
    fs::write(netconf::RESOLV_CONF, netconf::render_resolv_conf(servers))
        .map_err(|e| format!("{}: {e}", netconf::RESOLV_CONF))
}

/// The share outlives boots (warm boots reuse it): an exit code, pid file or socket from an
/// earlier boot must not be mistaken for this one's.
fn clean_stale_state() {
    let Ok(entries) = fs::read_dir(SHARE_MOUNT) else { return };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale =
            name == EXIT_CODE_FILE || name.ends_with(".pid") || name.ends_with(".sock") || name.ends_with(".tmp");
        if stale && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        step(&format!("removed {removed} stale runtime file(s) from the share"));
    }
}

fn run_request(cmdline: &str) -> Result<i32, String> {
    let (fstype, data) = match netconf::cmdline_param(cmdline, SHARE_TRANSPORT_PARAM) {
        Some("virtiofs") => ("virtiofs", String::new()),
        _ => ("9p", "trans=virtio,version=9p2000.L,msize=262144".to_owned()),
    };
    mount(SHARE_TAG, SHARE_MOUNT, fstype, libc::MS_NOSUID | libc::MS_NODEV, &data)?;
    clean_stale_state();
    let extra = GuestMount::parse(netconf::cmdline_param(cmdline, MOUNTS_PARAM).unwrap_or(""))?;
    for m in &extra {
        let ro = if m.read_only { libc::MS_RDONLY } else { 0 };
        mount(&m.tag, &m.path, fstype, libc::MS_NODEV | ro, &data)?;
    }
    if !extra.is_empty() {
        step(&format!("mounted {} extra share(s)", extra.len()));
    }
    let path = format!("{SHARE_MOUNT}/{EXEC_FILE}");
    let text = fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    let req: ExecRequest = serde_json::from_str(&text).map_err(|e| format!("parse {path}: {e}"))?;
    let (prog, args) = req.argv.split_first().ok_or("exec request has an empty argv")?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        // Its own process group, so a stop reaches everything the workload started.
        .process_group(0);
    match (&req.user, &req.workdir) {
        (None, Some(dir)) => {
            cmd.current_dir(dir);
        }
        (None, None) => {}
        (Some(u), workdir) => {
            // By hand rather than `Command::uid`/`gid`: std runs pre_exec closures after its setuid,
            // and its supplementary groups are unstable. Groups, then gid, then uid: once the uid is
            // dropped the others can no longer change. The working directory is entered after, as
            // the user (as runc does), so a directory the user may not enter fails the start.
            let (uid, gid, groups) = (u.uid, u.gid, u.groups.clone());
            let dir = workdir
                .as_deref()
                .map(|d| std::ffi::CString::new(d.as_bytes()).map_err(|_| format!("workdir {d:?} holds a NUL byte")))
                .transpose()?;
            // SAFETY: setgroups/setgid/setuid/chdir are async-signal-safe; `groups` and `dir` are
            // owned by the closure.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                        || dir.as_ref().is_some_and(|d| libc::chdir(d.as_ptr()) != 0)
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
    unblocked(&mut cmd);
    match &req.user {
        Some(u) => step(&format!("exec {prog} as {}:{}", u.uid, u.gid)),
        None => step(&format!("exec {prog}")),
    }
    let child = cmd.spawn().map_err(|e| {
        // The user's drop and the working directory fail inside the child, as the start does.
        let user = req.user.as_ref().map(|u| format!(" as {}:{}", u.uid, u.gid)).unwrap_or_default();
        let dir = req.workdir.as_ref().map(|d| format!(" in {d}")).unwrap_or_default();
        format!("cannot start {prog}{user}{dir}: {e}")
    })?;
    Ok(supervise(child.id() as libc::pid_t))
}

/// The signal mask survives exec: without this a child would start with init's waited signals
/// blocked, and a workload would never see SIGTERM.
fn unblocked(cmd: &mut Command) -> &mut Command {
    let empty = empty_set();
    // SAFETY: sigprocmask is async-signal-safe; the set was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        })
    }
}

fn empty_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        set
    }
}

fn waited_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in WAITED {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn block_waited_signals() {
    let set = waited_set();
    // SAFETY: sigprocmask reads the set we own.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// As PID 1 we inherit every orphan: reap them all, stop the workload's process group when asked
/// (SIGTERM, then SIGKILL after [`STOP_GRACE`]), and return the workload's exit status.
fn supervise(pid: libc::pid_t) -> i32 {
    let set = waited_set();
    let mut stopping = false;
    loop {
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes into the status we own.
            let reaped = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if reaped == pid {
                if libc::WIFEXITED(status) {
                    return libc::WEXITSTATUS(status);
                }
                if libc::WIFSIGNALED(status) {
                    return 128 + libc::WTERMSIG(status);
                }
            } else if reaped < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                return 127;
            } else if reaped <= 0 {
                break;
            }
        }
        let timeout = libc::timespec { tv_sec: 0, tv_nsec: STOP_POLL.as_nanos() as libc::c_long };
        // SAFETY: sigtimedwait reads the set and timeout we own; the siginfo out-parameter may be null.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        let stop = match sig {
            libc::SIGTERM | libc::SIGINT | libc::SIGPWR => Some(format!("signal {sig}")),
            // Between signals (or after a poll interval without one): has the host asked?
            _ if !stopping && stop_requested() => Some("stop requested by the host".to_owned()),
            _ => None,
        };
        match (stop, sig) {
            (Some(why), _) if !stopping => {
                stopping = true;
                step(&format!("{why}: stopping the workload (SIGTERM, SIGKILL after {}s)", STOP_GRACE.as_secs()));
                // SAFETY: kill/alarm have no memory preconditions.
                unsafe {
                    libc::kill(-pid, libc::SIGTERM);
                    libc::alarm(STOP_GRACE.as_secs() as libc::c_uint);
                }
            }
            (_, libc::SIGALRM) if stopping => {
                step("the workload ignored SIGTERM; SIGKILL");
                // SAFETY: as above.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            _ => {}
        }
    }
}

fn stop_requested() -> bool {
    std::path::Path::new(SHARE_MOUNT).join(STOP_REQUEST_FILE).exists()
}

fn report_exit(code: i32) {
    let tmp = format!("{SHARE_MOUNT}/.{EXIT_CODE_FILE}.tmp");
    let dest = format!("{SHARE_MOUNT}/{EXIT_CODE_FILE}");
    let written = fs::write(&tmp, format!("{code}\n")).and_then(|()| fs::rename(&tmp, &dest));
    if let Err(e) = written {
        eprintln!("openshell-init: cannot report exit code to {dest}: {e}");
    }
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

fn power_off() -> ! {
    // The kernel is booted with `reboot=t` under QEMU (-no-reboot turns the reset into an exit)
    // and libkrun's VMM exits on either request, so a restart request ends the VM everywhere.
    // SAFETY: reboot(2) as PID 1; it does not return on success.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

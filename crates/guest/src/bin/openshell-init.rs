//! PID 1 of the guest. Mounts the basics, mounts the per-instance share, runs the requested
//! command, reaps every child, writes the command's exit status back to the share and powers off.
//!
//! Statically linked (built with `+crt-static`) so the rootfs needs no libc. Each step prints a
//! millisecond timestamp (since boot) so the host can read a boot timeline off the console.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};

use openshell_guest::{ExecRequest, EXEC_FILE, EXIT_CODE_FILE, SHARE_MOUNT, SHARE_TAG, SHARE_TRANSPORT_PARAM};

fn main() {
    step("init started");
    mount_basics();
    set_hostname("gateway");
    set_clock();
    network_up();
    let code = match run_request() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("openshell-init: {e}");
            127
        }
    };
    report_exit(code);
    step(&format!("exit-code={code}; powering off"));
    power_off();
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
    let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
    let (src, tgt, fst, dat) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fst.as_ptr(), flags, dat.as_ptr().cast()) };
    if rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY) {
        Ok(())
    } else {
        Err(format!("mount {fstype} on {target}: {}", std::io::Error::last_os_error()))
    }
}

fn mount_basics() {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    for (src, tgt, fs, flags, data) in [
        ("proc", "/proc", "proc", nosuid_nodev | libc::MS_NOEXEC, ""),
        ("sysfs", "/sys", "sysfs", nosuid_nodev | libc::MS_NOEXEC, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_nodev | libc::MS_NOEXEC, ""),
    ] {
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
fn set_clock() {
    let Some(secs) = cmdline_param("openshell.time").and_then(|s| s.parse::<i64>().ok()) else { return };
    let ts = libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: 0 };
    // SAFETY: clock_settime reads the timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        eprintln!("openshell-init: cannot set the clock: {}", std::io::Error::last_os_error());
    }
}

/// `lo` always; `eth0` with the address the host chose (`openshell.net=ADDR/PREFIX,GATEWAY`), so
/// no DHCP round trip sits on the boot path.
fn network_up() {
    let ip = |args: &[&str]| match Command::new("/sbin/ip").args(args).status() {
        Ok(s) if s.success() => true,
        other => {
            eprintln!("openshell-init: ip {} failed: {other:?}", args.join(" "));
            false
        }
    };
    ip(&["link", "set", "lo", "up"]);
    let Some(net) = cmdline_param("openshell.net") else { return };
    let Some((addr, gw)) = net.split_once(',') else {
        eprintln!("openshell-init: bad openshell.net={net}");
        return;
    };
    if ip(&["addr", "add", addr, "dev", "eth0"]) && ip(&["link", "set", "eth0", "up"]) {
        ip(&["route", "add", "default", "via", gw]);
        step(&format!("network up: eth0 {addr} via {gw}"));
    }
}

fn cmdline_param(key: &str) -> Option<String> {
    let cmdline = fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
}

fn run_request() -> Result<i32, String> {
    let (fstype, data) = match cmdline_param(SHARE_TRANSPORT_PARAM).as_deref() {
        Some("virtiofs") => ("virtiofs", String::new()),
        _ => ("9p", "trans=virtio,version=9p2000.L,msize=262144".to_owned()),
    };
    mount(SHARE_TAG, SHARE_MOUNT, fstype, libc::MS_NOSUID | libc::MS_NODEV, &data)?;
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
        .stdin(Stdio::null());
    if let Some(dir) = &req.workdir {
        cmd.current_dir(dir);
    }
    step(&format!("exec {prog}"));
    let child = cmd.spawn().map_err(|e| format!("cannot start {prog}: {e}"))?;
    Ok(reap_until(child.id() as libc::pid_t))
}

/// As PID 1 we inherit every orphan: reap them all, and return when our command exits.
fn reap_until(pid: libc::pid_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes into the status we own.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        } else if reaped < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 127;
        }
    }
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

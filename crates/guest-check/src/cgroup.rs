//! cgroup v2 rows: enable each controller kubelet needs (cpu, memory, pids) for a child cgroup,
//! set the limits kubelet sets, move this process in, and watch the limits act: `pids.max=1`
//! must make fork(2) fail with EAGAIN, `memory.current` must count this process.
//!
//! init mounts cgroup2 at /sys/fs/cgroup. The child cgroup is removed again afterwards.

use std::path::Path;

use openshell_matrix::Row;

use crate::{fix_for, kernel_fix};

pub use crate::ids::cgroup::*;

const ROOT: &str = "/sys/fs/cgroup";
/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The controllers listed in a `cgroup.controllers` file.
pub fn parse_controllers(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

/// The kernel options behind a controller (and behind the files kubelet writes).
pub fn controller_options(controller: &str) -> &'static str {
    match controller {
        "cpu" => "CONFIG_CGROUP_SCHED, CONFIG_FAIR_GROUP_SCHED (cpu.weight), CONFIG_CFS_BANDWIDTH (cpu.max)",
        "memory" => "CONFIG_MEMCG",
        "pids" => "CONFIG_CGROUP_PIDS",
        _ => "CONFIG_CGROUPS",
    }
}

fn row_id(controller: &str) -> &'static str {
    match controller {
        "cpu" => CPU,
        "memory" => MEMORY,
        _ => PIDS,
    }
}

/// Writes an existing interface file (cgroupfs refuses to create files, with EACCES, so a
/// missing file is named as missing rather than as a permission problem).
fn write(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(dir.join(file)).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{file} does not exist in the child cgroup"),
        _ => format!("opening {file}: {e}"),
    })?;
    f.write_all(value.as_bytes()).map_err(|e| format!("writing {value:?} to {file}: {e}"))
}

fn read(dir: &Path, file: &str) -> Result<String, String> {
    std::fs::read_to_string(dir.join(file)).map(|s| s.trim().to_owned()).map_err(|e| format!("reading {file}: {e}"))
}

/// Writes `value` and expects to read it back unchanged.
fn set(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    write(dir, file, value)?;
    match read(dir, file)? {
        v if v == value => Ok(()),
        v => Err(format!("{file} reads {v:?} after writing {value:?}")),
    }
}

fn is_cgroup2(path: &str) -> bool {
    let c = std::ffi::CString::new(path).expect("no NUL");
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC }
}

pub fn check() -> Vec<Row> {
    let fail_all = |why: String, fix: String| IDS.iter().map(|id| Row::fail(id, why.clone(), fix.clone())).collect();
    if !is_cgroup2(ROOT) {
        return fail_all(
            format!("{ROOT} is not a cgroup2 mount (openshell-init mounts it at boot)"),
            kernel_fix("CONFIG_CGROUPS"),
        );
    }
    let root = Path::new(ROOT);
    let available = match read(root, "cgroup.controllers") {
        Ok(t) => parse_controllers(&t),
        Err(e) => return fail_all(e, kernel_fix("CONFIG_CGROUPS")),
    };
    let dir = root.join(format!("openshell-guest-check-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&dir) {
        return fail_all(format!("mkdir {}: {e}", dir.display()), fix_for(&e, "CONFIG_CGROUPS"));
    }
    let mut rows = Vec::new();
    let mut enabled = Vec::new();
    for c in ["cpu", "memory", "pids"] {
        if !available.contains(&c.to_owned()) {
            rows.push(Row::fail(
                row_id(c),
                format!("{c} is not in {ROOT}/cgroup.controllers ({})", available.join(" ")),
                kernel_fix(controller_options(c)),
            ));
        } else if let Err(e) = write(root, "cgroup.subtree_control", &format!("+{c}")) {
            rows.push(Row::fail(
                row_id(c),
                format!("enabling {c} for child cgroups: {e}"),
                kernel_fix(controller_options(c)),
            ));
        } else {
            enabled.push(c);
        }
    }
    let result = limits(&dir, &enabled, &mut rows);
    // Out again and gone, whatever happened: an empty cgroup is all rmdir needs.
    let _ = write(root, "cgroup.procs", "0");
    let _ = std::fs::remove_dir(&dir);
    if let Err(e) = result {
        for c in &enabled {
            if !rows.iter().any(|r| r.id == row_id(c)) {
                rows.push(Row::fail(row_id(c), e.clone(), kernel_fix("CONFIG_CGROUPS")));
            }
        }
    }
    IDS.iter().filter_map(|id| rows.iter().find(|r| r.id == *id).cloned()).collect()
}

/// The limits kubelet sets, then this process moved in to watch them act.
fn limits(dir: &Path, enabled: &[&str], rows: &mut Vec<Row>) -> Result<(), String> {
    let on = |c: &str| enabled.contains(&c);
    if on("cpu") {
        let weight = set(dir, "cpu.weight", "50").map_err(|e| (e, "CONFIG_FAIR_GROUP_SCHED"));
        if let Err((e, option)) =
            weight.and_then(|()| set(dir, "cpu.max", CPU_MAX).map_err(|e| (e, "CONFIG_CFS_BANDWIDTH")))
        {
            rows.push(Row::fail(CPU, e, kernel_fix(option)));
        }
    }
    if on("memory") {
        if let Err(e) = set(dir, "memory.max", "268435456") {
            rows.push(Row::fail(MEMORY, e, kernel_fix(controller_options("memory"))));
        }
    }
    write(dir, "cgroup.procs", "0").map_err(|e| format!("moving this process into the child cgroup: {e}"))?;
    if on("memory") && !rows.iter().any(|r| r.id == MEMORY) {
        match read(dir, "memory.current").map(|v| v.parse::<u64>()) {
            Ok(Ok(bytes)) if bytes > 0 => rows.push(Row::pass(
                MEMORY,
                format!("memory.max=256M accepted; memory.current counts this process ({} KiB)", bytes / 1024),
            )),
            other => rows.push(Row::fail(
                MEMORY,
                format!("memory.current after moving in: {other:?}"),
                kernel_fix(controller_options("memory")),
            )),
        }
    }
    if on("cpu") && !rows.iter().any(|r| r.id == CPU) {
        burn_cpu(CPU_BURN);
        rows.push(match read(dir, "cpu.stat") {
            Ok(stat) => cpu_row(&stat),
            Err(e) => Row::fail(CPU, e, kernel_fix(controller_options("cpu"))),
        });
    }
    if on("pids") {
        rows.push(match set(dir, "pids.max", "1") {
            Ok(()) => {
                let (pid, errno) = fork_once();
                let _ = write(dir, "pids.max", "max");
                pids_row(pid, errno)
            }
            Err(e) => Row::fail(PIDS, e, kernel_fix(controller_options("pids"))),
        });
    }
    Ok(())
}

/// 10 ms of CPU per 100 ms period: burning [`CPU_BURN`] of CPU inside it must be throttled.
const CPU_MAX: &str = "10000 100000";
/// Several periods' worth of quota, so the limit must act at least a few times (~0.3 s wall).
const CPU_BURN: std::time::Duration = std::time::Duration::from_millis(30);

/// Spins until this process has used `cpu` of CPU time (its own clock, not the wall).
fn burn_cpu(cpu: std::time::Duration) {
    let used = || {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    let until = used() + cpu;
    while used() < until {
        std::hint::spin_loop();
    }
}

/// The cpu row from the child cgroup's `cpu.stat` after burning CPU under [`CPU_MAX`]: the
/// scheduler must have throttled it (`nr_throttled`), or the bandwidth limit is not enforced.
pub fn cpu_row(stat: &str) -> Row {
    let field = |k: &str| stat.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.trim().parse::<u64>().ok());
    match (field("nr_throttled"), field("throttled_usec")) {
        (Some(n), Some(us)) if n > 0 => Row::pass(
            CPU,
            format!(
                "cpu.weight=50 accepted; under cpu.max=\"{CPU_MAX}\" {} ms of CPU were throttled {n} times ({} ms held back)",
                CPU_BURN.as_millis(),
                us / 1000
            ),
        ),
        (Some(_), Some(_)) => Row::fail(
            CPU,
            format!("burning {} ms of CPU under cpu.max=\"{CPU_MAX}\" was never throttled: the limit is not enforced", CPU_BURN.as_millis()),
            kernel_fix("CONFIG_CFS_BANDWIDTH"),
        ),
        _ => Row::fail(CPU, format!("cpu.stat has no throttling counters: {stat:?}"), kernel_fix("CONFIG_CFS_BANDWIDTH")),
    }
}

/// fork(2) once; a child that did start exits at once and is reaped. Returns fork's result and errno.
fn fork_once() -> (libc::pid_t, i32) {
    // SAFETY: the child only calls _exit; this process is single-threaded.
    let pid = unsafe { libc::fork() };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    if pid == 0 {
        // SAFETY: leaving the child at once.
        unsafe { libc::_exit(0) };
    }
    if pid > 0 {
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    (pid, errno)
}

/// The pids row from what fork(2) did under `pids.max=1` with this process already counted.
pub fn pids_row(fork_result: libc::pid_t, errno: i32) -> Row {
    if fork_result < 0 && errno == libc::EAGAIN {
        Row::pass(PIDS, "with pids.max=1 a fork inside the cgroup failed with EAGAIN, as the limit says")
    } else if fork_result < 0 {
        Row::fail(
            PIDS,
            format!("fork under pids.max=1 failed with {}, expected EAGAIN", std::io::Error::from_raw_os_error(errno)),
            kernel_fix(controller_options("pids")),
        )
    } else {
        Row::fail(
            PIDS,
            "fork succeeded inside a cgroup with pids.max=1: the limit is not enforced",
            kernel_fix(controller_options("pids")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controllers_are_whitespace_separated() {
        assert_eq!(parse_controllers("cpu memory pids\n"), ["cpu", "memory", "pids"]);
        assert!(parse_controllers("\n").is_empty());
    }

    #[test]
    fn pids_limit_is_judged_by_fork_result() {
        assert_eq!(pids_row(-1, libc::EAGAIN).status, openshell_matrix::Status::Pass);
        let r = pids_row(1234, 0);
        assert!(r.blocks() && r.reason.contains("not enforced") && r.fix.contains("CONFIG_CGROUP_PIDS"), "{r:?}");
        assert!(pids_row(-1, libc::ENOMEM).blocks());
    }

    #[test]
    fn cpu_row_passes_only_when_throttled() {
        let throttled =
            "usage_usec 31000\nuser_usec 31000\nsystem_usec 0\nnr_periods 4\nnr_throttled 3\nthrottled_usec 270000\n";
        let row = cpu_row(throttled);
        assert_eq!(row.status, openshell_matrix::Status::Pass, "{row:?}");
        assert!(row.reason.contains("throttled 3 times (270 ms held back)"), "{}", row.reason);
        let never = "usage_usec 31000\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n";
        assert!(cpu_row(never).blocks() && cpu_row(never).fix.contains("CONFIG_CFS_BANDWIDTH"));
        assert!(cpu_row("usage_usec 1\n").blocks(), "no counters: cpu.max is not there");
    }

    #[test]
    fn cpu_fix_names_the_options_behind_the_files_kubelet_writes() {
        let o = controller_options("cpu");
        assert!(o.contains("CONFIG_FAIR_GROUP_SCHED") && o.contains("CONFIG_CFS_BANDWIDTH"), "{o}");
    }
}

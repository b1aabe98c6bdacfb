//! What a process of ours does between fork and exec (or first thing in `main`) so that it never
//! outlives the process that started it: shared by `openshell-vmm` and by the runtime that starts
//! the VMM, passt and gvproxy (`openshell_vm::child`), so there is one rule, written once.

/// Die when the process that started us dies, so a SIGKILLed supervisor leaves no VMM, passt or
/// gvproxy behind. Linux only (`PR_SET_PDEATHSIG`); elsewhere a no-op: `Drop` handles orderly
/// exits and the instance's recovery cleans up after a crash. Async-signal-safe.
pub fn die_with_parent() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with constant arguments touches no memory; async-signal-safe.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where a process finds the files it holds open: `FD_DIR/N` is fd N. Here, low in the stack,
/// because both sides name files this way: the launcher writes such paths for the VMM it starts
/// (`openshell_vm::sandbox`), and `openshell-vmm --check-confinement` reads them back from a
/// running VMM's spec.
#[cfg(target_os = "linux")]
pub const FD_DIR: &str = "/proc/self/fd";
/// macOS has no `/proc`; opening `/dev/fd/N` there duplicates fd N.
#[cfg(not(target_os = "linux"))]
pub const FD_DIR: &str = "/dev/fd";

/// How a process names a file it holds open as `fd`: the kernel resolves it to that very file,
/// checking the file's own permissions and none of its path's.
pub fn fd_path(fd: std::os::fd::RawFd) -> String {
    format!("{FD_DIR}/{fd}")
}

/// The same for a directory, for a program that opens it with `O_NOFOLLOW` (libkrun's virtio-fs
/// opens its shared directory `O_PATH | O_NOFOLLOW`): on the bare fd path that would open the
/// magic link itself, not the directory; behind `/.` the link is an inner component, followed.
pub fn dir_fd_path(fd: std::os::fd::RawFd) -> String {
    format!("{FD_DIR}/{fd}/.")
}

/// The fd a [`fd_path`] or [`dir_fd_path`] names, `None` for any other path.
pub fn fd_of(path: &std::path::Path) -> Option<std::os::fd::RawFd> {
    let rest = path.strip_prefix(FD_DIR).ok()?;
    // `Path` drops a trailing `.` component, so `N/.` reads as `N`.
    let mut parts = rest.components();
    match (parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(n)), None) => n.to_str()?.parse().ok(),
        _ => None,
    }
}

/// `path` with the fd it names through [`FD_DIR`] replaced by `map(fd)`, whatever follows the
/// fd (`N`, `N/.`, `N/name`); any other path unchanged. How one process names, through fds of its
/// own, the files another one names through its fds.
pub fn refd(path: &std::path::Path, map: &dyn Fn(std::os::fd::RawFd) -> std::os::fd::RawFd) -> std::path::PathBuf {
    let s = path.to_string_lossy();
    let Some(rest) = s.strip_prefix(FD_DIR).and_then(|r| r.strip_prefix('/')) else { return path.to_owned() };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let (n, tail) = rest.split_at(digits);
    match n.parse() {
        Ok(fd) if tail.is_empty() || tail.starts_with('/') => format!("{FD_DIR}/{}{tail}", map(fd)).into(),
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn fd_paths_name_their_fd_and_nothing_else_does() {
        assert_eq!(fd_of(Path::new(&fd_path(10))), Some(10));
        assert_eq!(fd_of(Path::new(&dir_fd_path(11))), Some(11));
        assert!(dir_fd_path(11).ends_with("/11/."));
        for other in ["/store/vmlinux", "/proc/self/fd", "x/10", &format!("{FD_DIR}/10/etc")] {
            assert_eq!(fd_of(Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn refd_replaces_the_fd_and_keeps_what_follows() {
        let map = |fd| fd + 100;
        assert_eq!(refd(Path::new(&fd_path(10)), &map), Path::new(&fd_path(110)));
        assert_eq!(refd(Path::new(&dir_fd_path(12)), &map), Path::new(&dir_fd_path(112)));
        let below = format!("{FD_DIR}/12/./made-here");
        assert_eq!(refd(Path::new(&below), &map), Path::new(&format!("{FD_DIR}/112/./made-here")));
        for other in ["/store/vmlinux", &format!("{FD_DIR}/x"), &format!("{FD_DIR}/10x")] {
            assert_eq!(refd(Path::new(other), &map), Path::new(other), "{other}");
        }
    }
}

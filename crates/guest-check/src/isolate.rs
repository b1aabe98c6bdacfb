//! Runs one group of checks in a forked child process, so that what a check does to its own
//! process (new network namespaces, a seccomp filter, a landlock domain, a cgroup move) dies with
//! it, and so a check that crashes or hangs costs its own rows and nothing else.
//!
//! The child sends its rows back as JSON over a pipe. A child that dies, hangs past its deadline
//! or sends nothing parseable turns every row it owed into a FAIL that says so.
// `unsafe` is allowed in this module only: the checker probes the kernel with raw syscalls, which is what it exists to test; each block carries its `SAFETY:`.
#![allow(unsafe_code)]

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use openshell_matrix::Row;

/// Forks, runs `check` in the child and returns its rows; `ids` are the rows the group owes, used
/// when the child cannot report. Must be called while this process has a single thread.
pub fn in_child(ids: &[&str], deadline: Duration, check: fn() -> Vec<Row>) -> Vec<Row> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return owed(ids, &format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned here alone.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the caller guarantees a single-threaded process, so the child may allocate freely.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return owed(ids, &format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(read_end);
        let rows = check();
        let mut out = std::fs::File::from(write_end);
        let code = match serde_json::to_writer(&mut out, &rows) {
            Ok(()) => 0,
            Err(_) => 1,
        };
        drop(out);
        // SAFETY: _exit skips the parent's atexit handlers and stdio buffers, as a fork child should.
        unsafe { libc::_exit(code) };
    }
    drop(write_end);
    let (bytes, timed_out) = read_until(read_end, deadline);
    if timed_out {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = wait(pid);
    if timed_out {
        return owed(ids, &format!("the check did not finish within {} s and was killed", deadline.as_secs()));
    }
    match serde_json::from_slice::<Vec<Row>>(&bytes) {
        Ok(mut rows) => {
            // A row the child forgot is still owed: never let a check disappear from the matrix.
            for id in ids {
                if !rows.iter().any(|r| r.id == *id) {
                    rows.push(Row::fail(id, "the check process reported no result for this row", BUG_FIX));
                }
            }
            rows
        }
        Err(_) => owed(ids, &format!("the check process ended ({status}) without reporting")),
    }
}

const BUG_FIX: &str = "a bug in openshell-guest-check: see the guest console for its output";

fn owed(ids: &[&str], why: &str) -> Vec<Row> {
    ids.iter().map(|id| Row::fail(id, why.to_owned(), BUG_FIX)).collect()
}

/// Reads the pipe to EOF, giving up at the deadline.
fn read_until(fd: OwnedFd, deadline: Duration) -> (Vec<u8>, bool) {
    let end = Instant::now() + deadline;
    let mut file = std::fs::File::from(fd);
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (bytes, true);
        }
        let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&file), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll reads and writes the one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if n <= 0 {
            continue;
        }
        match file.read(&mut buf) {
            Ok(0) => return (bytes, false),
            Ok(k) => bytes.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (bytes, false),
        }
    }
}

/// Reaps the child and describes how it ended.
fn wait(pid: libc::pid_t) -> String {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes into the status we own.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return "not reaped".into();
        }
    }
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("exit {}", libc::WEXITSTATUS(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_back_from_the_child() {
        let rows = in_child(&["a"], Duration::from_secs(10), || vec![Row::pass("a", "done in the child")]);
        assert_eq!(rows, vec![Row::pass("a", "done in the child")]);
    }

    #[test]
    fn a_crashing_child_fails_every_owed_row() {
        let rows = in_child(&["a", "b"], Duration::from_secs(10), || {
            // SAFETY: deliberately dies the way a buggy check would.
            unsafe { libc::abort() }
        });
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.blocks() && r.reason.contains("signal 6")), "{rows:?}");
    }

    #[test]
    fn a_forgotten_row_is_still_reported() {
        let rows = in_child(&["a", "b"], Duration::from_secs(10), || vec![Row::pass("a", "ok")]);
        assert_eq!(rows[1].id, "b");
        assert!(rows[1].blocks());
    }

    #[test]
    fn a_hanging_child_is_killed_at_the_deadline() {
        let rows = in_child(&["a"], Duration::from_millis(300), || {
            std::thread::sleep(Duration::from_secs(30));
            vec![]
        });
        assert!(rows[0].reason.contains("did not finish"), "{rows:?}");
    }
}

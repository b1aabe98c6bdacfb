//! The guest console log, bounded. The VMM writes the console into a pipe we hand it (not into the
//! file): QEMU through an fdset, libkrun by reopening the pipe's `/proc/self/fd/N` as its console
//! output. A thread of ours copies the pipe into the file: the first [`VmConfig::console_cap`]
//! bytes as they come, then a line saying the cap was reached, and, when the VM ends, the last
//! [`KEEP_LAST`] bytes of what did not fit (where a late panic or the reason for an exit is). A
//! guest, or any local process the guest logs about (each refused handshake is a line), can then
//! no longer fill the host's disk through its console.
//!
//! The file only grows (append-only), so its readers (`Tail`: the streamed console, readiness,
//! the crash watch; `timeline`; `vm logs`) work unchanged. On macOS libkrun still writes its
//! console file itself, unbounded (see `backend::krun`).
//!
//! [`VmConfig::console_cap`]: crate::VmConfig::console_cap

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::thread::JoinHandle;

/// How much of what did not fit is kept, written when the VM ends.
pub const KEEP_LAST: usize = 64 * 1024;

/// The line written once the cap is reached (followed by the cap in bytes).
pub const CAP_MARKER: &str = "[openshell-vm: the console log reached its cap of";

/// Copies the pipe's read end `from` into `to`, bounded by `cap`, until every write end is
/// closed (the VMM exited). Runs on a thread of its own; join it to know the file is complete.
pub fn spawn_writer(from: OwnedFd, to: File, cap: u64) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("console-log".into()).spawn(move || {
        if let Err(e) = copy_bounded(File::from(from), to, cap) {
            tracing::warn!(error = %e, "writing the console log failed; the rest of the guest's output is lost");
        }
    })
}

fn copy_bounded(mut from: impl Read, mut to: impl Write, cap: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    let mut dropped = 0u64;
    let mut last: VecDeque<u8> = VecDeque::with_capacity(KEEP_LAST);
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let fits = (cap - written).min(n as u64) as usize;
        if fits > 0 {
            to.write_all(&buf[..fits])?;
            written += fits as u64;
            if written == cap {
                writeln!(
                    to,
                    "\n{CAP_MARKER} {cap} bytes; further guest output is dropped, except its last {} KiB, \
                     written below when the VM ends]",
                    KEEP_LAST / 1024
                )?;
            }
        }
        let rest = &buf[fits..n];
        dropped += rest.len() as u64;
        last.extend(rest);
        let excess = last.len().saturating_sub(KEEP_LAST);
        last.drain(..excess);
    }
    if dropped > 0 {
        let (a, b) = last.as_slices();
        writeln!(
            to,
            "\n[openshell-vm: {} bytes of console output were dropped over the cap; the last {} bytes follow]",
            dropped - last.len() as u64,
            last.len()
        )?;
        to.write_all(a)?;
        to.write_all(b)?;
    }
    to.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(input: &[u8], cap: u64) -> String {
        let mut out = Vec::new();
        copy_bounded(input, &mut out, cap).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn under_the_cap_the_log_is_the_output() {
        assert_eq!(copy(b"hello\nworld\n", 100), "hello\nworld\n");
        assert_eq!(copy(b"", 100), "");
    }

    #[test]
    fn over_the_cap_the_log_keeps_the_head_a_marker_and_the_end() {
        let mut input = b"boot line\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 1_000_000));
        input.extend(b"\nKernel panic - not syncing: the end\n");
        let log = copy(&input, 50);
        assert!(log.starts_with("boot line\n"), "{}", &log[..80]);
        assert!(log.contains(&format!("{CAP_MARKER} 50 bytes")), "no marker");
        assert!(log.ends_with("Kernel panic - not syncing: the end\n"), "the end is lost");
        assert!(log.len() < 50 + KEEP_LAST + 400, "{} bytes", log.len());
        let dropped = input.len() - 50 - KEEP_LAST;
        assert!(log.contains(&format!("{dropped} bytes of console output were dropped")), "{}", log.len());
    }
}

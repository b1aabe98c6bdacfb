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

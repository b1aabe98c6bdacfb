//! The runtime's one error type: every failure names what failed and, where there is one, the
//! next step. The lowest module of the crate, so every other module can return it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("guest kernel not found at {0}; build it with `cargo xtask kernel`")]
    KernelMissing(PathBuf),
    #[error(
        "the guest kernel {path} cannot boot: {why}; rebuild it with `cargo xtask kernel` (or point at a good one)"
    )]
    BadKernel { path: PathBuf, why: String },
    #[error("rootfs not usable at {0} (no /sbin/openshell-init); bake it with `cargo xtask rootfs`")]
    RootfsMissing(PathBuf),
    /// Making or reading a disk of a disk-root VM (`openshell_artifacts::disk`); the message says what to do.
    #[error("{0}")]
    Disk(String),
    #[error("invalid VM config: {0}")]
    Invalid(String),
    #[error("no VMM can run here: {0}")]
    NoBackend(String),
    #[error("no network backend: {0}")]
    NoNetwork(String),
    #[error("the krun VMM binary {0} is missing; build it with `cargo build -p openshell-krun --bin openshell-vmm`")]
    VmmBinaryMissing(PathBuf),
    #[error("cannot start {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("VM state I/O at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "host port {0} is already in use on 127.0.0.1; stop what listens there or map another port with -p HOST:GUEST"
    )]
    PortInUse(u16),
    #[error("passt exited before the VM could use it ({0}); see passt.log in the VM's state directory")]
    PasstDied(String),
    /// gvproxy failed to start, or refused a forward; the message carries its words.
    #[error("{0}")]
    Gvproxy(String),
    #[error("{0}")]
    Instance(String),
    /// The preflight's table: the same rows `cargo xtask check` shows, with their fixes.
    #[error("refusing to boot: a required check failed (the same rows as `cargo xtask check`)\n{0}")]
    Refused(String),
    #[error("the gateway did not become ready: {0}")]
    NotReady(String),
    /// A stop signal came while waiting for the gateway to be ready; the boot was abandoned.
    #[error("stopped by signal {0} before the gateway was ready")]
    StopRequested(i32),
    #[error("the guest was still running after {secs}s; console log: {console}")]
    Timeout { secs: u64, console: PathBuf },
    #[error("the guest capability checker did not report: {0}")]
    GuestCheck(String),
    #[error(
        "the guest ended without reporting an exit code (VMM {status}); console log {}, its last lines:\n{tail}",
        console.display()
    )]
    NoExitCode { status: String, console: PathBuf, tail: String },
    /// The guest kernel panicked (init missing, not executable, crashed or exited): the VMM was
    /// stopped at once rather than left to a timeout.
    #[error(
        "the guest crashed: {cause}; the VMM was stopped. Console log {}, its last lines:\n{tail}",
        console.display()
    )]
    GuestCrashed { cause: String, console: PathBuf, tail: String },
}

//! Starting a VMM process and supervising it.
//!
//! The VMM always runs in its own process (libkrun's `krun_start_enter` never returns, and QEMU is
//! a program anyway), in its own process group so a terminal's Ctrl-C reaches the supervisor
//! first, and with `PR_SET_PDEATHSIG` so it dies with its supervisor even on SIGKILL. The value
//! that owns it, [`RunningVm`], stops it on drop: SIGTERM, a grace period, then SIGKILL. While it
//! waits, it watches the network helper too: a VM whose passt/gvproxy died is unreachable, so it
//! is stopped and the run ends saying which helper died and how ([`VmExit::NetworkDied`]).

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openshell_guest::{EXEC_FILE, EXIT_CODE_FILE, STOP_REQUEST_FILE};

use crate::backend::{self, Backend};
pub use crate::child::{Child, Ended};
use crate::plan::Planned;
use crate::{VmConfig, VmError};

const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a SIGKILLed VMM may take to be reaped before [`RunningVm::stop`] gives up on it and
/// says what its threads are blocked in: a VMM stuck in the kernel (seen inside the nested host,
/// where the guest's KVM runs on emulated SVM) must not hang its caller, whose own deadline then
/// passes without a word.
const REAP_GRACE: Duration = Duration::from_secs(20);
/// How long a guest asked to stop (through the share) gets to stop its workload and power off
/// before the VMM itself is stopped: init's own SIGTERM→SIGKILL grace (5 s) plus its power-off.
const GUEST_STOP_GRACE: Duration = Duration::from_secs(10);

/// How long a VMM gets to exit after its network helper did, before the helper's death counts
/// as the cause (see [`RunningVm::wait`]).
const VMM_EXIT_AFTER_NET: Duration = Duration::from_millis(500);

/// How a guest run ended, and who says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest's init reported the workload's exit status through the share.
    Guest(i32),
    /// This process got `signal` and ended the run without the guest's exit status (`how` says
    /// what happened). The code is the host's own, 128 + signal.
    Stopped { signal: i32, how: HostStop },
    /// The VMM process was killed by `signal` from outside (not by us); the guest reported nothing.
    VmmKilled { signal: i32 },
    /// The network helper (passt or gvproxy) ended while the VM ran, so the guest could no longer
    /// be reached; the VMM was stopped.
    NetworkDied { helper: Child, how: Ended },
}

/// How a run that this process was asked to end ended without the guest's exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostStop {
    /// The guest was asked to stop and had not reported `waited` later, past its grace, so the
    /// VMM was stopped.
    GraceOver { waited: Duration },
    /// A second signal came `waited` after the guest was asked to stop, before it reported, so
    /// the VMM was stopped at once.
    SecondSignal { waited: Duration },
    /// The VMM exited by itself `waited` after the guest was asked to stop, with no exit status
    /// in the share.
    Unreported { waited: Duration },
    /// No guest was running to ask: the signal came during a restart's backoff or boot.
    NoGuest,
}

impl std::fmt::Display for HostStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostStop::GraceOver { waited } => write!(
                f,
                "the guest reported no exit code within {:.1}s of being asked to stop (its grace is {}s), so the VMM was stopped",
                waited.as_secs_f64(),
                GUEST_STOP_GRACE.as_secs()
            ),
            HostStop::SecondSignal { waited } => write!(
                f,
                "a second signal came {:.1}s after the guest was asked to stop, before it reported an exit code, so the VMM was stopped",
                waited.as_secs_f64()
            ),
            HostStop::Unreported { waited } => write!(
                f,
                "the VMM exited {:.1}s after the guest was asked to stop, without the guest's exit code",
                waited.as_secs_f64()
            ),
            HostStop::NoGuest => write!(f, "it came between boots (a restart's backoff or boot), so no guest was asked"),
        }
    }
}

impl VmExit {
    /// The process exit code a shell would report for this run.
    pub fn code(self) -> i32 {
        match self {
            VmExit::Guest(code) => code,
            VmExit::Stopped { signal, .. } | VmExit::VmmKilled { signal } => 128 + signal,
            VmExit::NetworkDied { how: Ended::Signal(signal), .. } => 128 + signal,
            // A helper that exited 0 still failed the run: the guest lost its network.
            VmExit::NetworkDied { how: Ended::ExitCode(code), .. } => code.max(1),
        }
    }

    /// The child whose death ended the run from outside, and how; `None` when the guest reported
    /// its own exit or the run was stopped on request.
    pub fn failure(self) -> Option<(Child, Ended)> {
        match self {
            VmExit::VmmKilled { signal } => Some((Child::Vmm, Ended::Signal(signal))),
            VmExit::NetworkDied { helper, how } => Some((helper, how)),
            VmExit::Guest(_) | VmExit::Stopped { .. } => None,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Guest(code) => write!(f, "the guest reported exit code {code}"),
            VmExit::Stopped { signal, how } => {
                write!(f, "stopped after signal {signal}: {how} (exit code {} is the host's)", 128 + signal)
            }
            VmExit::VmmKilled { signal } => {
                write!(
                    f,
                    "the VMM was killed by signal {signal}; the guest reported no exit code (exit code {})",
                    128 + signal
                )
            }
            VmExit::NetworkDied { helper, how } => {
                write!(f, "{helper} exited ({how}) while the VM ran, so the VM was stopped (exit code {})", self.code())
            }
        }
    }
}

/// A VMM process and the paths it writes.
#[derive(Debug)]
pub struct RunningVm {
    child: Option<std::process::Child>,
    pid: u32,
    pub backend: Backend,
    /// One line: which backend and why.
    pub backend_reason: String,
    pub console: PathBuf,
    share: PathBuf,
    pub started: Instant,
    /// passt or gvproxy, stopped after the VMM.
    net: Option<crate::net::HostNet>,
    /// The thread writing the VMM's console into its log (see [`crate::console`]); joined once
    /// the VMM has exited, so the log is complete when it is read.
    console_writer: Option<std::thread::JoinHandle<()>>,
    /// Records in the ledger when the guest reaches userspace (only with [`LEDGER_ENV`] set).
    userspace: Option<UserspaceWatch>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
    let path = path.to_owned();
    move |source| VmError::Io { path, source }
}

/// Boots a config with the backend its plan chose (the preflight's [`Planned`]) and returns once
/// the VMM process runs.
pub fn launch(planned: &Planned) -> Result<RunningVm, VmError> {
    let (cfg, plan) = (planned.cfg(), planned.plan());
    cfg.validate()?;
    let (backend, reason) = plan.backend()?;
    let reason = reason.to_owned();
    tracing::info!(%backend, %reason, "VMM chosen");
    if cfg.net != crate::Net::None {
        crate::net::check_ports_free(&cfg.ports)?;
    }
    let share = prepare_state(cfg)?;
    let attach = match backend {
        Backend::Krun => crate::net::Attach::Krun,
        Backend::Qemu { .. } => crate::net::Attach::Qemu,
    };
    let link = crate::net::Link::of(cfg.net, attach, &cfg.state_dir);
    // Both VMMs get their files open and run unprivileged (see `sandbox`); the files outlive the
    // spawn below.
    let user = crate::sandbox::VmmUser::for_vmm(backend.uses_kvm())?;
    if let Some(user) = &user {
        user.own_share(&share)?;
    }
    if let crate::Root::Disk { data_mib, .. } = &cfg.root {
        ensure_data_disk(cfg, *data_mib, backend, user.as_ref())?;
    }
    let mut files = crate::sandbox::Handover::open(cfg, user.as_ref())?;
    let mut cmd = match backend {
        Backend::Qemu { kvm } => {
            let qemu = plan.qemu.as_ref().ok_or_else(|| VmError::NoBackend("the plan names no QEMU".into()))?;
            backend::qemu::command(qemu, cfg, kvm, &link, &files.fds())
        }
        Backend::Krun => {
            let (vmm, built) =
                plan.vmm_binary.clone().ok_or_else(|| VmError::NoBackend("the plan names no VMM".into()))?;
            if !built || !vmm.is_file() {
                return Err(VmError::VmmBinaryMissing(vmm));
            }
            backend::krun::command(&vmm, cfg, &link, &files.fds())
        }
    };
    let vmm_log = cfg.state_dir.join("vmm.log");
    let log = File::create(&vmm_log).map_err(io_err(&vmm_log))?;
    let log2 = log.try_clone().map_err(io_err(&vmm_log))?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    // SAFETY: only async-signal-safe calls (setpgid, prctl) between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))?;
            crate::child::die_with_parent()
        });
    }
    let (net, vmm_net_end) =
        match crate::net::start(cfg.net, plan.gvproxy.as_deref(), &cfg.ports, attach, &cfg.state_dir)? {
            Some((net, end)) => (Some(net), end),
            None => (None, None),
        };
    if let Some(end) = &vmm_net_end {
        crate::child::inherit_as_child_fd(&mut cmd, std::os::fd::AsRawFd::as_raw_fd(end));
    }
    // After the network's dup2 (it places its fd at CHILD_FD, below the handed ones), and the
    // drop last: nothing before it needs root, and it re-arms the parent-death signal.
    files.give_to(&mut cmd);
    if let Some(user) = &user {
        user.drop_to(&mut cmd);
    }
    let started = Instant::now();
    let child = cmd.spawn().map_err(|source| VmError::Spawn { what: format!("{backend} VMM"), source })?;
    // The VMM holds its own copy now; ours must close so passt sees EOF when the VMM exits.
    drop(vmm_net_end);
    let console_log = files.take_console();
    // Closes our write end of the console pipe too: the writer sees EOF when the VMM exits.
    drop(files);
    let console_writer = match console_log {
        Some((pipe, file)) => Some(
            crate::console::spawn_writer(pipe, file, cfg.console_cap)
                .map_err(|source| VmError::Spawn { what: "the console log writer".into(), source })?,
        ),
        None => None,
    };
    tracing::debug!(pid = child.id(), ?cmd, "VMM started");
    let userspace = std::env::var_os(LEDGER_ENV).map(PathBuf::from).and_then(|ledger| {
        let fact = serde_json::json!({ "vmm_pid": child.id(), "backend": backend.kind(), "state_dir": cfg.state_dir });
        UserspaceWatch::start(ledger, fact, cfg.console_path(), share.join(EXIT_CODE_FILE))
    });
    Ok(RunningVm {
        pid: child.id(),
        child: Some(child),
        backend,
        backend_reason: reason,
        console: cfg.console_path(),
        share,
        started,
        net,
        console_writer,
        userspace,
    })
}

/// Where `launch` records the VMs it starts, when set: JSON lines, appended. Two facts per VM,
/// each with `vmm_pid`, `backend` and `state_dir`: `"event": "spawned"` once the VMM process runs,
/// and `"event": "userspace"` once its guest reached userspace ([`UserspaceWatch`], with the
/// `evidence`). The VM suites count a trial's boots from the second: a VMM that dies at once, or a
/// guest that never gets past its kernel, spawned but did not boot (a trial that passes without
/// booting proves nothing about a VM).
pub const LEDGER_ENV: &str = "OPENSHELL_VM_LEDGER";

fn record_in_ledger(path: &Path, mut fact: serde_json::Value, event: &str, evidence: Option<&str>) {
    fact["event"] = event.into();
    if let Some(evidence) = evidence {
        fact["evidence"] = evidence.into();
    }
    // One write of one line with O_APPEND, so lines from concurrent processes do not interleave.
    let written = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{fact}\n").as_bytes()));
    if let Err(e) = written {
        tracing::warn!(ledger = ?path, error = %e, "cannot record the VM in the ledger");
    }
}

/// How often the watch looks at the console and the share.
const USERSPACE_POLL: Duration = Duration::from_millis(50);

/// Watches one launched VM for proof that its guest reached userspace — init's first console line
/// ([`crate::timeline::UserspaceEvidence`]) or init's exit-code file in the share — and writes the
/// ledger's `userspace` fact the moment it appears, so a supervisor killed later still leaves it.
/// On its own thread because a VM is watched by different callers (`wait`, a readiness loop, a
/// trial's own polling) or by none; it ends at the evidence, or after one last look once the
/// [`RunningVm`] is dropped (its console then complete).
#[derive(Debug)]
struct UserspaceWatch {
    done: Arc<std::sync::atomic::AtomicBool>,
    /// Evidence a caller saw itself ([`RunningVm::userspace_shown`]).
    shown: Arc<std::sync::Mutex<Option<&'static str>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UserspaceWatch {
    fn start(ledger: PathBuf, fact: serde_json::Value, console: PathBuf, exit_file: PathBuf) -> Option<UserspaceWatch> {
        record_in_ledger(&ledger, fact.clone(), "spawned", None);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let finished = Arc::clone(&done);
        let shown = Arc::new(std::sync::Mutex::new(None));
        let shown_by_caller = Arc::clone(&shown);
        let thread = std::thread::Builder::new().name("userspace-watch".into()).spawn(move || {
            let mut tail = Tail::new(&console);
            let mut evidence = crate::timeline::UserspaceEvidence::default();
            loop {
                // Read before looking, so the look after `finish` is a whole one.
                let last = finished.load(Ordering::Acquire);
                let seen = if evidence.feed(&tail.read_new()) {
                    Some("init's first console line")
                } else if exit_file.exists() {
                    Some("init's exit-code file in the share")
                } else {
                    *shown_by_caller.lock().unwrap()
                };
                if let Some(how) = seen {
                    record_in_ledger(&ledger, fact, "userspace", Some(how));
                    return;
                }
                if last {
                    return;
                }
                std::thread::sleep(USERSPACE_POLL);
            }
        });
        match thread {
            Ok(t) => Some(UserspaceWatch { done, shown, thread: Some(t) }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the guest for userspace; the ledger will not count it");
                None
            }
        }
    }

    /// One last look (the VMM has gone, its console is complete), then the watch ends.
    fn finish(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The exit code the guest's init reported through `share`, once it has.
/// The data disk of a disk-root VM: made on its first boot (sparse ext4 of `data_mib` MiB), kept
/// afterwards whatever `data_mib` says now. libkrun opens it by its fd path, which checks the
/// file's mode, so under libkrun it is the VMM user's; QEMU takes it through an fdset.
fn ensure_data_disk(
    cfg: &VmConfig,
    data_mib: u64,
    backend: Backend,
    user: Option<&crate::sandbox::VmmUser>,
) -> Result<(), VmError> {
    let path = cfg.data_disk_path();
    if !path.exists() {
        openshell_artifacts::disk::create_data_disk(&path, data_mib)
            .map_err(|e| VmError::Disk(format!("cannot make the data disk {}: {e}", path.display())))?;
        tracing::info!(path = %path.display(), data_mib, "data disk made");
    }
    if let (Backend::Krun, Some(user)) = (backend, user) {
        std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid)).map_err(io_err(&path))?;
    }
    Ok(())
}

fn reported_code(share: &Path) -> Option<i32> {
    fs::read_to_string(share.join(EXIT_CODE_FILE)).ok().and_then(|s| s.trim().parse().ok())
}

/// Creates the state directory (0700) and the guest share with the exec request in it; clears what
/// an earlier run left (its exit code, its console).
fn prepare_state(cfg: &VmConfig) -> Result<PathBuf, VmError> {
    let share = cfg.share_dir();
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&share).map_err(io_err(&share))?;
    fs::set_permissions(&cfg.state_dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&cfg.state_dir))?;
    let _ = fs::remove_file(share.join(EXIT_CODE_FILE));
    let _ = fs::remove_file(share.join(STOP_REQUEST_FILE));
    let exec = share.join(EXEC_FILE);
    let tmp = share.join(format!(".{EXEC_FILE}.tmp"));
    let json = serde_json::to_vec(&cfg.exec).expect("exec request serializes");
    fs::write(&tmp, json).and_then(|()| fs::rename(&tmp, &exec)).map_err(io_err(&exec))?;
    let console = cfg.console_path();
    File::create(&console).map_err(io_err(&console))?;
    Ok(share)
}

impl RunningVm {
    /// Tells the ledger's watch that the caller saw the guest's userspace itself (`how`, e.g. its
    /// gateway answering over mTLS): a guest whose console stayed empty (seen with libkrun inside
    /// the nested host) has still reached userspace once a program of it answers.
    pub fn userspace_shown(&self, how: &'static str) {
        if let Some(watch) = &self.userspace {
            *watch.shown.lock().unwrap() = Some(how);
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The VMM's exit status, if it has exited (without reaping it twice); the console log is
    /// then complete.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if status.is_some() {
            self.console_complete();
        }
        status
    }

    /// Waits for the console writer to copy the last of the VMM's output (it ends at the pipe's
    /// EOF, once the VMM has exited). Call only when the VMM is gone.
    fn console_complete(&mut self) {
        if let Some(writer) = self.console_writer.take() {
            let _ = writer.join();
        }
    }

    /// Which network helper has ended, and how, once one has (reaping it).
    pub fn net_ended(&mut self) -> Option<(Child, Ended)> {
        self.net.as_mut().and_then(crate::net::HostNet::ended)
    }

    /// Stops the network helper (passt, gvproxy) now rather than on drop.
    pub fn stop_network(&mut self) {
        self.net.take();
    }

    /// The passt process carrying this VM's network, if any.
    pub fn passt_pid(&self) -> Option<u32> {
        self.net.as_ref().filter(|n| matches!(n, crate::net::HostNet::Passt(_))).and_then(crate::net::HostNet::pid)
    }

    /// The gvproxy process carrying this VM's network, if any.
    pub fn gvproxy_pid(&self) -> Option<u32> {
        self.net.as_ref().filter(|n| matches!(n, crate::net::HostNet::Gvproxy(_))).and_then(crate::net::HostNet::pid)
    }

    /// Waits for the guest to power off, copying the console to `sink` as it grows, and returns
    /// how it ended. SIGINT/SIGTERM to this process ask the guest to stop (its init stops the
    /// workload and reports its real status); a guest that does not finish within its grace, or a
    /// second signal, stops the VMM, and the result is then the host's own 128 + signal.
    /// With `timeout`, a guest still running when it expires is an error (and is stopped when the
    /// `RunningVm` is dropped).
    pub fn wait(&mut self, sink: Option<&mut dyn Write>, timeout: Option<Duration>) -> Result<VmExit, VmError> {
        self.wait_asked(sink, timeout, None)
    }

    /// [`Self::wait`], with `asked` a stop signal this process caught before it called this (its
    /// own handlers were up already): the guest is asked to stop at once, as if it came first thing.
    pub fn wait_asked(
        &mut self,
        mut sink: Option<&mut dyn Write>,
        timeout: Option<Duration>,
        asked: Option<i32>,
    ) -> Result<VmExit, VmError> {
        let deadline = timeout.map(|t| (t, Instant::now() + t));
        let signals = StopSignals::register();
        let mut console = Tail::new(&self.console);
        let mut crash = crate::timeline::CrashWatch::default();
        // (signal, when the guest was asked to stop, why the VMM was signalled if it was)
        let mut stopping: Option<(i32, Instant, Option<HostStop>)> = None;
        if let Some(sig) = asked {
            tracing::info!(signal = sig, "asking the guest to stop");
            self.request_guest_stop();
            stopping = Some((sig, Instant::now(), None));
        }
        let result = 'watch: loop {
            if let Some(cause) = crash.feed(&console.drain(&mut sink)) {
                break Err(self.crashed(cause));
            }
            let sig = signals.take().unwrap_or(0);
            match (&mut stopping, sig) {
                (None, 0) => {}
                (None, sig) => {
                    tracing::info!(signal = sig, "asking the guest to stop");
                    self.request_guest_stop();
                    stopping = Some((sig, Instant::now(), None));
                }
                (Some((_, asked, why @ None)), again) if again != 0 || asked.elapsed() > GUEST_STOP_GRACE => {
                    let waited = asked.elapsed();
                    let how =
                        if again != 0 { HostStop::SecondSignal { waited } } else { HostStop::GraceOver { waited } };
                    tracing::info!(%how, "stopping the VMM");
                    self.signal(nix::sys::signal::Signal::SIGTERM);
                    *why = Some(how);
                }
                _ => {}
            }
            // Looked at before the VMM: passt exits by itself once the VMM's end closes, so a helper
            // found dead while the VMM is still running (looked at after) died first. While
            // stopping on request, the helper going is part of the stop.
            let net_ended = if stopping.is_none() { self.net_ended() } else { None };
            let child = self.child.as_mut().expect("waited only once");
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    self.console_complete();
                    console.drain(&mut sink);
                    let stopped = stopping.map(|(signal, asked, why)| VmExit::Stopped {
                        signal,
                        how: why.unwrap_or(HostStop::Unreported { waited: asked.elapsed() }),
                    });
                    break self.exit_code(status, stopped);
                }
                Ok(None) if net_ended.is_some() => {
                    // A VMM shutting down closes its end of the link before it exits, and passt
                    // exits on that: give it a moment to show that it was the one ending. A guest
                    // that has reported its exit code is powering off, and its report stands
                    // however long its VMM then takes to go (500 ms was not always enough for an
                    // L1 QEMU on a loaded host: its run was reported as passt's death).
                    let reported = reported_code(&self.share).is_some();
                    let until = Instant::now() + if reported { STOP_GRACE } else { VMM_EXIT_AFTER_NET };
                    while Instant::now() < until {
                        if let Ok(Some(status)) = child.try_wait() {
                            self.child = None;
                            self.console_complete();
                            console.drain(&mut sink);
                            break 'watch self.exit_code(status, None);
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if let Some(code) = reported_code(&self.share) {
                        self.stop();
                        console.drain(&mut sink);
                        break Ok(VmExit::Guest(code));
                    }
                    let (helper, how) = net_ended.expect("matched");
                    tracing::warn!(%helper, %how, "the network helper ended while the VM ran; stopping the VMM");
                    self.stop();
                    console.drain(&mut sink);
                    break Ok(VmExit::NetworkDied { helper, how });
                }
                Ok(None) if deadline.is_some_and(|(_, d)| Instant::now() > d) => {
                    let secs = deadline.map_or(0, |(t, _)| t.as_secs());
                    break Err(VmError::Timeout { secs, console: self.console.clone() });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => break Err(io_err(&self.console)(e)),
            }
        };
        result
    }

    /// The guest's own report wins; without one, the code says who ended the run.
    /// `stopped`: what the run was if this process had been asked to end it.
    fn exit_code(&mut self, status: std::process::ExitStatus, stopped: Option<VmExit>) -> Result<VmExit, VmError> {
        if let Some(code) = reported_code(&self.share) {
            return Ok(VmExit::Guest(code));
        }
        match (stopped, status.signal()) {
            (Some(stopped), _) => Ok(stopped),
            (None, Some(signal)) => Ok(VmExit::VmmKilled { signal }),
            (None, None) => {
                let console = fs::read_to_string(&self.console).unwrap_or_default();
                match crate::timeline::guest_crash(&console) {
                    Some(cause) => Err(self.crashed(cause)),
                    None => Err(VmError::NoExitCode {
                        status: status.to_string(),
                        console: self.console.clone(),
                        tail: console_tail(&self.console),
                    }),
                }
            }
        }
    }

    /// The guest panicked (`cause`, its kernel's words): stops the VMM and its network now, and
    /// says why with the console's last lines.
    pub fn crashed(&mut self, cause: String) -> VmError {
        tracing::warn!(%cause, "the guest crashed; stopping the VMM");
        self.stop();
        self.net.take();
        VmError::GuestCrashed { cause, console: self.console.clone(), tail: console_tail(&self.console) }
    }

    /// Asks the guest's init to stop its workload (see [`STOP_REQUEST_FILE`]).
    fn request_guest_stop(&self) {
        let path = self.share.join(STOP_REQUEST_FILE);
        if let Err(e) = fs::write(&path, b"stop\n") {
            tracing::warn!(path = %path.display(), error = %e, "cannot ask the guest to stop; stopping the VMM");
            self.signal(nix::sys::signal::Signal::SIGTERM);
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        // A child we have not reaped, so the pid is still ours.
        let _ = crate::child::signal(self.pid, sig);
    }

    /// Stops the VMM: SIGTERM, then SIGKILL after a grace period. Idempotent. Says how it ended,
    /// so a caller (and the VM suites) can tell a VMM that honoured SIGTERM from one that had to
    /// be killed without timing it.
    pub fn stop(&mut self) -> Stopped {
        let how = self.stop_vmm();
        self.console_complete();
        how
    }

    fn stop_vmm(&mut self) -> Stopped {
        let Some(mut child) = self.child.take() else { return Stopped::AlreadyExited };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return Stopped::AlreadyExited;
        }
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return Stopped::OnSigterm;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let deadline = Instant::now() + REAP_GRACE;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return Stopped::Killed;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let threads = crate::procfs::thread_states(self.pid);
        tracing::error!(
            pid = self.pid,
            "the VMM was SIGKILLed but is still not gone after {} s; its threads: {}",
            REAP_GRACE.as_secs(),
            if threads.is_empty() { "(unreadable)".to_owned() } else { threads.join("; ") }
        );
        Stopped::Unreaped
    }
}

/// How [`RunningVm::stop`] ended the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It had exited already (or an earlier `stop` or `wait` saw it go).
    AlreadyExited,
    /// It exited on SIGTERM within the grace period.
    OnSigterm,
    /// It was still there when the grace period ran out, and was SIGKILLed.
    Killed,
    /// SIGKILLed, and still not reaped after [`REAP_GRACE`]: stuck in the kernel. What its
    /// threads were blocked in is logged; the process is left to the kernel.
    Unreaped,
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.stop();
        // passt exits by itself once the VMM's end closes; dropping it makes sure (and stops
        // gvproxy, which does not notice).
        self.net.take();
        if let Some(mut watch) = self.userspace.take() {
            watch.finish();
        }
    }
}

/// SIGINT and SIGTERM to this process, caught while the value lives (then the handlers go):
/// how a supervisor learns it should stop its VM instead of dying with it.
pub struct StopSignals {
    got: Arc<AtomicUsize>,
    ids: [Option<signal_hook::SigId>; 2],
}

impl StopSignals {
    pub fn register() -> StopSignals {
        let got = Arc::new(AtomicUsize::new(0));
        let ids = [libc::SIGINT, libc::SIGTERM]
            .map(|s| signal_hook::flag::register_usize(s, Arc::clone(&got), s as usize).ok());
        StopSignals { got, ids }
    }

    /// The signal that came since the last call, if any.
    pub fn take(&self) -> Option<i32> {
        Some(self.got.swap(0, Ordering::Relaxed) as i32).filter(|&s| s != 0)
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for id in self.ids.into_iter().flatten() {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// Follows a growing file from its start.
pub struct Tail {
    path: PathBuf,
    file: Option<File>,
    pos: u64,
}

impl Tail {
    pub fn new(path: &Path) -> Tail {
        Tail { path: path.to_owned(), file: None, pos: 0 }
    }

    /// What was appended since the last call (everything, the first time); empty while the file
    /// does not exist yet.
    pub fn read_new(&mut self) -> Vec<u8> {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let mut buf = Vec::new();
        if let Some(f) = self.file.as_mut() {
            if f.seek(SeekFrom::Start(self.pos)).is_ok() && f.read_to_end(&mut buf).is_ok() {
                self.pos += buf.len() as u64;
            }
        }
        buf
    }

    /// Reads what was appended, copies it to `sink` if there is one, and returns it.
    fn drain(&mut self, sink: &mut Option<&mut dyn Write>) -> Vec<u8> {
        let buf = self.read_new();
        if let (Some(sink), false) = (sink.as_mut(), buf.is_empty()) {
            let _ = sink.write_all(&buf);
            let _ = sink.flush();
        }
        buf
    }
}

/// How many console lines an error quotes.
pub const CONSOLE_TAIL_LINES: usize = 30;

/// The last [`CONSOLE_TAIL_LINES`] lines of the console at `path`, for an error to quote: the
/// file may be gone (a temporary state directory) by the time the message is read.
pub fn console_tail(path: &Path) -> String {
    let text = fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(ledger: &Path) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(ledger).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn events(ledger: &Path) -> Vec<String> {
        facts(ledger).iter().map(|f| f["event"].as_str().unwrap().to_owned()).collect()
    }

    /// A VMM that dies at once, before any guest line: spawned, never booted.
    #[test]
    fn a_guest_without_init_line_or_exit_file_is_spawned_not_booted() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, console) = (dir.path().join("ledger"), dir.path().join("console.log"));
        fs::write(&console, "Linux version 6.1\nKernel panic - not syncing: Attempted to kill init!\n").unwrap();
        let fact = serde_json::json!({ "vmm_pid": 1, "backend": "qemu" });
        let mut w = UserspaceWatch::start(ledger.clone(), fact, console, dir.path().join("exit-code")).unwrap();
        std::thread::sleep(USERSPACE_POLL * 3);
        w.finish();
        assert_eq!(events(&ledger), ["spawned"]);
    }

    #[test]
    fn init_line_or_exit_file_counts_as_userspace_once() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, console) = (dir.path().join("ledger"), dir.path().join("console.log"));
        let fact = serde_json::json!({ "vmm_pid": 2, "backend": "krun" });
        let mut w = UserspaceWatch::start(ledger.clone(), fact.clone(), console.clone(), dir.path().join("x")).unwrap();
        fs::write(&console, "Linux version 6.1\nopenshell-init: [   718 ms] init started\n").unwrap();
        // Written while the VM runs, not when it is dropped.
        let until = Instant::now() + Duration::from_secs(5);
        while events(&ledger).len() < 2 && Instant::now() < until {
            std::thread::sleep(USERSPACE_POLL);
        }
        assert_eq!(events(&ledger), ["spawned", "userspace"]);
        assert_eq!(facts(&ledger)[1]["evidence"], "init's first console line");
        w.finish();
        assert_eq!(events(&ledger).len(), 2, "one userspace fact per VM");
        // The exit-code file alone (a console the guest did not write, as with `quiet` QEMU
        // guests whose console is elsewhere) counts too, found by the last look.
        let exit = dir.path().join("exit-code");
        let mut w = UserspaceWatch::start(ledger.clone(), fact, dir.path().join("none"), exit.clone()).unwrap();
        fs::write(&exit, "0\n").unwrap();
        w.finish();
        assert_eq!(facts(&ledger)[3]["evidence"], "init's exit-code file in the share");
    }

    /// A guest whose console stayed empty still counts once a caller saw a program of it answer.
    #[test]
    fn a_caller_seeing_the_guest_answer_counts_as_userspace() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger");
        let fact = serde_json::json!({ "vmm_pid": 3, "backend": "krun" });
        let (console, exit) = (dir.path().join("empty-console"), dir.path().join("exit-code"));
        let mut w = UserspaceWatch::start(ledger.clone(), fact, console, exit).unwrap();
        *w.shown.lock().unwrap() = Some("the guest's gateway answered mTLS health SERVING");
        w.finish();
        assert_eq!(events(&ledger), ["spawned", "userspace"]);
        assert_eq!(facts(&ledger)[1]["evidence"], "the guest's gateway answered mTLS health SERVING");
    }

    /// Each way the host ends a run it was asked to end says what happened and the time it took,
    /// not a fixed "within 10s".
    #[test]
    fn a_host_stop_says_how_and_after_how_long() {
        let stopped = |how| VmExit::Stopped { signal: 2, how }.to_string();
        let grace = stopped(HostStop::GraceOver { waited: Duration::from_millis(10_040) });
        assert!(grace.contains("no exit code within 10.0s") && grace.contains("its grace is 10s"), "{grace}");
        let second = stopped(HostStop::SecondSignal { waited: Duration::from_millis(1_260) });
        assert!(second.contains("a second signal came 1.3s after"), "{second}");
        let unasked = stopped(HostStop::Unreported { waited: Duration::from_millis(400) });
        assert!(unasked.contains("the VMM exited 0.4s after"), "{unasked}");
        for s in [grace, second, unasked, stopped(HostStop::NoGuest)] {
            assert!(s.starts_with("stopped after signal 2: ") && s.ends_with("(exit code 130 is the host's)"), "{s}");
        }
        assert_eq!(VmExit::Stopped { signal: 15, how: HostStop::NoGuest }.code(), 143);
    }
}

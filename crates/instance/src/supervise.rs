//! Owning a gateway instance while it runs: take its lock, recover what a dead supervisor left,
//! launch the VM, wait for mTLS readiness, record the pids; then, in [`Supervised::wait`], notice
//! a child dying, record which one and how, and (with `--restart on-failure`) boot again. The
//! foreground `vm run`, the detached supervisor and the VM suites all go through [`boot`], so they
//! behave the same.
//!
//! Recovery never looks processes up by name: it signals only the pids this instance recorded, and
//! only while `/proc/<pid>/cmdline` still shows the program we started there (a recycled pid is
//! left alone).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::preset;
use crate::state::{self, GatewayInstance, Metadata};
use openshell_vm::launch::StopSignals;
use openshell_vm::procfs;
use openshell_vm::{HostStop, Overrides, RunningVm, VmConfig, VmError, VmExit};

/// A gateway VM that answered its mTLS health check. Dropping it stops the VM and passt and
/// releases the instance lock.
pub struct Supervised {
    pub vm: RunningVm,
    pub endpoint: String,
    /// VMM start → mTLS SERVING.
    pub ready: Duration,
    /// What recovery cleaned up before this boot (empty on a clean start).
    pub recovered: Vec<String>,
    /// The host checks this boot passed (with any warnings to show).
    pub preflight: crate::check::Preflight,
    inst: GatewayInstance,
    digests: (String, String),
    ready_timeout: Duration,
    /// SIGINT and SIGTERM, caught from the start of the boot until [`Self::wait`] takes them.
    signals: Option<StopSignals>,
    _lock: nix::fcntl::Flock<fs::File>,
}

/// `vm run --restart`: what the supervisor does when a child's death (passt, gvproxy, the VMM)
/// ends the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Restart {
    /// The first failure ends the instance.
    #[default]
    No,
    /// Boot again, at most `max` times over the supervisor's life, after `backoff`, doubled at
    /// each restart (a child that dies at once does not spin).
    OnFailure { max: u32, backoff: Duration },
}

impl Restart {
    /// `--restart on-failure`: 5 restarts, after 1, 2, 4, 8 and 16 s.
    pub const ON_FAILURE: Restart = Restart::OnFailure { max: 5, backoff: Duration::from_secs(1) };

    /// This policy with its first pause set to `first` (still doubled at each restart); `No`
    /// stays `No`. The one place a pause other than [`Self::ON_FAILURE`]'s is made: `vm run`'s
    /// hidden `--restart-backoff-ms`, which trials set to assert the order of events (a long
    /// pause to stop in, a short one to run out of restarts) rather than race the 1, 2 s of
    /// production.
    pub fn with_backoff(self, first: Duration) -> Restart {
        match self {
            Restart::OnFailure { max, .. } => Restart::OnFailure { max, backoff: first },
            Restart::No => Restart::No,
        }
    }
}

impl std::str::FromStr for Restart {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(Restart::No),
            "on-failure" => Ok(Restart::ON_FAILURE),
            _ => Err(format!("unknown restart policy {s:?}: expected no or on-failure")),
        }
    }
}

/// How long a gateway may take from its VMM starting to mTLS SERVING unless asked otherwise: a
/// hang guard, far above a boot here (seconds under TCG), not a figure anyone waits for.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything needed to boot and keep one gateway instance: what `vm run` (foreground or
/// `--detach`), the bench and the VM suites fill in, and what the supervisor binary reads from the
/// file [`detach`] writes. [`Request::boot`] is the one way a gateway boots.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Request {
    /// Where instances live (`$XDG_CONFIG_HOME/openshell/gateways`) and this one's name.
    pub root: PathBuf,
    pub name: String,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// The kernel's and the rootfs's recorded digests, as `metadata.json` records them.
    pub digests: (String, String),
    /// What the caller says about the VM on top of the gateway preset
    /// ([`GatewayInstance::vm_config`]): size, backend, network, forwards, environment, console.
    pub vm: Overrides,
    pub ready_timeout: Duration,
    pub verification: crate::check::Verification,
    pub restart: Restart,
}

impl Request {
    /// A request with the preset's values for everything the caller does not say.
    pub fn new(root: &Path, name: &str, kernel: PathBuf, rootfs: PathBuf, digests: (String, String)) -> Request {
        Request {
            root: root.to_owned(),
            name: name.to_owned(),
            kernel,
            rootfs,
            digests,
            vm: Overrides::default(),
            ready_timeout: READY_TIMEOUT,
            verification: crate::check::Verification::Required,
            restart: Restart::No,
        }
    }

    pub fn instance(&self) -> Result<GatewayInstance, VmError> {
        GatewayInstance::new(&self.root, &self.name)
    }

    /// The VM config of this gateway: the preset with the request's overrides applied.
    pub fn config(&self) -> Result<VmConfig, VmError> {
        self.instance()?.vm_config(
            self.kernel.clone(),
            self.rootfs.clone(),
            (&self.digests.0, &self.digests.1),
            &self.vm,
        )
    }

    /// Boots the instance (lock → recovery → preflight → launch → readiness) and returns it
    /// SERVING; [`Supervised::wait`] then supervises it under [`Self::restart`].
    pub fn boot(&self) -> Result<Supervised, VmError> {
        let inst = self.instance()?;
        let cfg = self.config()?;
        boot(&inst, cfg, (&self.digests.0, &self.digests.1), self.ready_timeout, self.verification)
    }
}

/// The supervisor program, `openshell-supervisor` (this crate's binary): `$OPENSHELL_SUPERVISOR`,
/// else beside the running program (`target/debug/`, where `cargo xtask` builds it).
pub fn supervisor_binary() -> PathBuf {
    std::env::var_os("OPENSHELL_SUPERVISOR")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok().and_then(|e| Some(e.parent()?.join("openshell-supervisor"))))
        .unwrap_or_else(|| PathBuf::from("openshell-supervisor"))
}

/// A supervisor started by [`detach`] that reported its gateway SERVING.
#[derive(Debug)]
pub struct Detached {
    /// The supervisor process (in its own session; it outlives the caller).
    pub child: std::process::Child,
    pub endpoint: String,
}

/// Starts `supervisor` (the `openshell-supervisor` binary) for `req` in a session of its own, its
/// output to `<instance>/supervisor.log`, and returns once the instance's metadata names it
/// (SERVING), or fails with its log when it exits first or does not get there within the ready
/// timeout + 30 s (then it is killed). The one way a supervisor is started.
pub fn detach(supervisor: &Path, req: &Request) -> Result<Detached, VmError> {
    let inst = req.instance()?;
    fs::create_dir_all(&inst.dir).map_err(|source| VmError::Io { path: inst.dir.clone(), source })?;
    // Until its supervisor holds the lock, a twin `vm run --detach` of the same name may be here
    // too: the request is renamed into place whole (a supervisor never reads half of one), and
    // the log is appended to, so the refused twin's words do not overwrite the winner's.
    let req_path = inst.dir.join("supervise.json");
    let tmp = inst.dir.join(format!(".supervise.json.{}.tmp", std::process::id()));
    let json = serde_json::to_vec_pretty(req).expect("the request serializes");
    fs::write(&tmp, json)
        .and_then(|()| fs::rename(&tmp, &req_path))
        .map_err(|source| VmError::Io { path: req_path.clone(), source })?;
    let log_path = inst.dir.join("supervisor.log");
    let log = fs::File::create(&log_path)
        .and_then(|_| fs::OpenOptions::new().append(true).open(&log_path))
        .map_err(|source| VmError::Io { path: log_path.clone(), source })?;
    let log2 = log.try_clone().map_err(|source| VmError::Io { path: log_path.clone(), source })?;
    let mut cmd = std::process::Command::new(supervisor);
    cmd.arg(&req_path).stdin(std::process::Stdio::null()).stdout(log).stderr(log2);
    // SAFETY: setsid is async-signal-safe; it detaches the supervisor from the caller's terminal.
    #[allow(unsafe_code)]
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| VmError::Spawn {
        what: format!("the supervisor {} (`cargo xtask vm run --detach` builds it)", supervisor.display()),
        source,
    })?;
    let deadline = std::time::Instant::now() + req.ready_timeout + Duration::from_secs(30);
    loop {
        let log = || fs::read_to_string(&log_path).unwrap_or_default();
        // The metadata is written the moment the gateway serves, the log lines right after it:
        // a caller that reads the log once this returns must find what a foreground run prints.
        if let Some(m) = inst.read_metadata().filter(|m| m.supervisor_pid == Some(child.id()) && m.vm_pid.is_some()) {
            if log().contains(&serving_line(&req.name, &m.endpoint)) {
                return Ok(Detached { child, endpoint: m.endpoint });
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Refused because a twin took the instance first: that, naming it, is the answer.
            inst.ensure_stopped()?;
            return Err(VmError::Instance(format!(
                "the gateway supervisor exited ({status}) before it was ready; its log ({}):\n{}",
                log_path.display(),
                log()
            )));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(VmError::Instance(format!(
                "the gateway was not ready within {}s; its log ({}):\n{}",
                (req.ready_timeout + Duration::from_secs(30)).as_secs(),
                log_path.display(),
                log()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The supervisor log's SERVING line, which [`detach`] waits for.
fn serving_line(name: &str, endpoint: &str) -> String {
    format!("gateway {name:?} SERVING over mTLS at {endpoint}")
}

/// The supervisor binary's body: reads the request at `path`, boots, supervises until the
/// instance ends, and returns the process exit code (the last run's, 128 + signal on a child's
/// death, 1 when it could not boot).
pub fn run_supervisor(path: &Path) -> i32 {
    let req: Request = match fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot read the supervise request {}: {e}", path.display());
            return 2;
        }
    };
    let _span = tracing::warn_span!("supervisor", name = %req.name).entered();
    let mut up = match req.boot() {
        Ok(up) => up,
        Err(e) => {
            tracing::error!("the gateway did not come up: {e}");
            return 1;
        }
    };
    // What a foreground `vm run` prints, for the log: the boot timeline and the SERVING line.
    let console = fs::read_to_string(&up.vm.console).unwrap_or_default();
    tracing::warn!(
        "vm: {} ({})\n{}",
        up.vm.backend,
        up.vm.backend_reason,
        openshell_vm::timeline::render(&console, up.ready)
    );
    tracing::warn!("{} after {:.2}s", serving_line(&req.name, &up.endpoint), up.ready.as_secs_f64());
    match up.wait(None, req.restart) {
        Ok(exit) => {
            tracing::warn!("vm: {exit} after {:.2}s", up.vm.started.elapsed().as_secs_f64());
            exit.code()
        }
        Err(e) => {
            tracing::error!("{e}");
            1
        }
    }
}

/// Boots `cfg` (from [`GatewayInstance::vm_config`]) as instance `inst` after the host checks
/// `vm run` makes (artifacts against their records, backend, ports), and returns once it is
/// SERVING. Fails if another supervisor holds the instance, or with the console's tail if the
/// gateway is not ready within `ready_timeout`; nothing is left running on failure.
fn boot(
    inst: &GatewayInstance,
    cfg: VmConfig,
    digests: (&str, &str),
    ready_timeout: Duration,
    verification: crate::check::Verification,
) -> Result<Supervised, VmError> {
    // Every line logged while this instance boots says which instance and which boot it is. At
    // WARN so the span is on whenever the warnings it frames are (the default filter is `warn`).
    let _span = tracing::warn_span!("gateway", name = %inst.name, boot = 1).entered();
    let lock = inst.lock()?;
    let recovered = clean_stale(inst)?;
    // After recovery: a leftover passt of a dead supervisor must not read as "port in use".
    let preflight = crate::check::preflight(cfg, verification)?;
    let digests = (digests.0.to_owned(), digests.1.to_owned());
    // Caught from here on: a Ctrl-C or `vm stop` during the boot ends it (the readiness wait says
    // StopRequested), and one that comes after SERVING but before `wait` listens is kept for it
    // instead of killing this process by the default action (a nested host was slow enough for
    // a Ctrl-C sent on "Ctrl-C stops it." to land there).
    let signals = StopSignals::register();
    let (vm, endpoint, ready) = start(inst, &preflight.planned, &digests, ready_timeout, Some(&signals))?;
    Ok(Supervised {
        vm,
        endpoint,
        ready,
        recovered,
        preflight,
        inst: inst.clone(),
        digests,
        ready_timeout,
        signals: Some(signals),
        _lock: lock,
    })
}

/// Launches the VM, waits for SERVING and records the instance's pids (clearing any failure of
/// an earlier boot). The caller holds the instance lock.
fn start(
    inst: &GatewayInstance,
    planned: &openshell_vm::Planned,
    digests: &(String, String),
    ready_timeout: Duration,
    stop: Option<&StopSignals>,
) -> Result<(RunningVm, String, Duration), VmError> {
    let cfg = planned.cfg();
    let endpoint = preset::endpoint(cfg)?;
    let mut vm = openshell_vm::launch(planned)?;
    let bundle = inst.client_bundle()?;
    let ready = preset::wait_ready(&mut vm, &endpoint, &bundle, ready_timeout, stop)?;
    inst.write_metadata(&Metadata {
        name: inst.name.clone(),
        endpoint: endpoint.clone(),
        gateway_endpoint: state::gateway_url(&endpoint),
        created_unix: state::now_unix(),
        vm_pid: Some(vm.pid()),
        kernel_sha256: digests.0.clone(),
        rootfs_sha256: digests.1.clone(),
        backend: vm.backend.to_string(),
        supervisor_pid: Some(std::process::id()),
        passt_pid: vm.passt_pid(),
        gvproxy_pid: vm.gvproxy_pid(),
        kernel_path: Some(cfg.kernel.clone()),
        // What the guest's root is: a disk root's image (its rootdisk.json names the rootfs).
        rootfs_dir: Some(match &cfg.root {
            openshell_vm::Root::Share => cfg.rootfs.clone(),
            openshell_vm::Root::Disk { image, .. } => image.clone(),
        }),
        console_log: Some(vm.console.clone()),
        failure: None,
        restarting: None,
        gave_up_after_restarts: None,
    })?;
    Ok((vm, endpoint, ready))
}

impl Supervised {
    /// Waits for the VM like [`RunningVm::wait`] (console to `sink`, SIGINT/SIGTERM stop it).
    /// When a child's death ends it (passt or gvproxy exiting, the VMM killed), stops what is left
    /// and records which child died, how and when in the instance's metadata, with its pids
    /// cleared (nothing of it runs), for `vm status`. Under [`Restart::OnFailure`] it then boots
    /// the instance again on the same port, logging each restart with its cause, until the
    /// restarts run out; the result is how the last run ended.
    pub fn wait(&mut self, sink: Option<&mut dyn std::io::Write>, restart: Restart) -> Result<VmExit, VmError> {
        // Covers the backoff and the reboot too, where `RunningVm::wait` does not listen: a
        // `vm stop` then ends the supervisor at once, cutting the pause or abandoning the boot.
        // The boot's own, so a signal that came since SERVING is seen first thing.
        let signals = self.signals.take().unwrap_or_else(StopSignals::register);
        self.wait_restarting(sink, restart, &signals)
    }

    fn wait_restarting(
        &mut self,
        mut sink: Option<&mut dyn std::io::Write>,
        restart: Restart,
        signals: &StopSignals,
    ) -> Result<VmExit, VmError> {
        let mut restarts = 0;
        loop {
            let _span = tracing::warn_span!("gateway", name = %self.inst.name, boot = restarts + 1).entered();
            // A signal that came since the boot's readiness wait last looked, before `RunningVm::wait`
            // listens: the guest is up, so it is asked to stop like any other.
            let asked = signals.take();
            let exit = self.vm.wait_asked(sink.as_mut().map(|s| &mut **s as &mut dyn std::io::Write), None, asked)?;
            let Some((child, how)) = exit.failure() else { return Ok(exit) };
            let failure = state::Failure { child, how, at_unix: state::now_unix() };
            self.vm.stop();
            self.vm.stop_network();
            let (max, backoff) = match restart {
                Restart::OnFailure { max, backoff } if restarts < max => (max, backoff),
                Restart::OnFailure { max, .. } => {
                    tracing::warn!("{failure}; gave up after {max} restarts");
                    self.record(failure, None, Some(max))?;
                    return Ok(exit);
                }
                Restart::No => {
                    self.record(failure, None, None)?;
                    return Ok(exit);
                }
            };
            restarts += 1;
            let pause = backoff * 2u32.saturating_pow(restarts - 1);
            let boot_at_unix = state::now_unix() + pause.as_secs();
            self.record(failure, Some(state::Restarting { attempt: restarts, max, boot_at_unix }), None)?;
            tracing::warn!("restart {restarts}/{max} after {failure}: booting again in {:.1}s", pause.as_secs_f64());
            let until = std::time::Instant::now() + pause;
            while std::time::Instant::now() < until {
                if let Some(signal) = signals.take() {
                    tracing::warn!("restart {restarts}/{max}: stopped by signal {signal} during the backoff");
                    return Ok(VmExit::Stopped { signal, how: HostStop::NoGuest });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let booted = start(&self.inst, &self.preflight.planned, &self.digests, self.ready_timeout, Some(signals));
            let (vm, endpoint, ready) = match booted {
                // `start` dropped the half-booted VM, which stops it and its network.
                Err(VmError::StopRequested(signal)) => {
                    tracing::warn!(
                        "restart {restarts}/{max}: stopped by signal {signal} during its boot, which was abandoned"
                    );
                    return Ok(VmExit::Stopped { signal, how: HostStop::NoGuest });
                }
                booted => booted?,
            };
            (self.vm, self.endpoint, self.ready) = (vm, endpoint, ready);
            tracing::warn!(
                "restart {restarts}/{max}: SERVING again at {} after {:.2}s",
                self.endpoint,
                ready.as_secs_f64()
            );
        }
    }

    /// Writes `failure` into the instance's metadata and clears the pids of its children (the
    /// supervisor stopped them all before calling this), and its own unless it stays for the
    /// `restarting` it schedules (a `vm stop` during the backoff finds it there; `vm status` says
    /// when it boots again).
    fn record(
        &self,
        failure: state::Failure,
        restarting: Option<state::Restarting>,
        gave_up_after_restarts: Option<u32>,
    ) -> Result<(), VmError> {
        let Some(mut meta) = self.inst.read_metadata() else { return Ok(()) };
        meta.failure = Some(failure);
        meta.restarting = restarting;
        meta.gave_up_after_restarts = gave_up_after_restarts;
        (meta.vm_pid, meta.passt_pid, meta.gvproxy_pid) = (None, None, None);
        if restarting.is_none() {
            meta.supervisor_pid = None;
        }
        self.inst.write_metadata(&meta)
    }
}

/// A supervisor that ends its instance (Ctrl-C, `vm stop`, the end of a bench boot) stops the VMM
/// and its network helper, then clears their pids from the metadata while it still holds the lock:
/// the next boot then finds nothing stale to recover, and recovery's reports stay for the
/// supervisors that died without this (SIGKILL, a crash).
impl Drop for Supervised {
    fn drop(&mut self) {
        self.vm.stop();
        self.vm.stop_network();
        let Some(mut meta) = self.inst.read_metadata() else { return };
        if (meta.vm_pid, meta.passt_pid, meta.gvproxy_pid, meta.supervisor_pid) != (None, None, None, None) {
            (meta.vm_pid, meta.passt_pid, meta.gvproxy_pid, meta.supervisor_pid) = (None, None, None, None);
            if let Err(e) = self.inst.write_metadata(&meta) {
                tracing::warn!("clearing the stopped instance's pids from its metadata: {e}");
            }
        }
    }
}

/// When no supervisor holds the instance but its metadata still names pids, the supervisor died
/// without cleaning up (SIGKILL, crash, power loss). Kills the recorded VMM and passt if they
/// still run our programs, and clears the pids so the instance reads as stopped. Returns what it
/// did, one line each; empty when there was nothing stale or a live supervisor holds the lock.
pub fn recover(inst: &GatewayInstance) -> Result<Vec<String>, VmError> {
    if inst.locked() {
        return Ok(Vec::new());
    }
    clean_stale(inst)
}

/// [`recover`] for a caller that holds the instance lock itself.
fn clean_stale(inst: &GatewayInstance) -> Result<Vec<String>, VmError> {
    let mut done = Vec::new();
    // A directory others can read holds the client key: put it back to 0700.
    use std::os::unix::fs::PermissionsExt;
    if let Some(mode) = fs::metadata(&inst.dir).ok().map(|m| m.permissions().mode() & 0o777).filter(|&m| m != 0o700) {
        fs::set_permissions(&inst.dir, fs::Permissions::from_mode(0o700))
            .map_err(|source| VmError::Io { path: inst.dir.clone(), source })?;
        done.push(format!("{} was mode {mode:o}; set back to 700", inst.dir.display()));
    }
    let mut meta = match inst.load_metadata() {
        Ok(Some(meta)) => meta,
        Ok(None) => return Ok(done),
        // Its pids are lost with it (the processes died with their supervisor, PR_SET_DEATHSIG):
        // keep the bytes for inspection and start afresh.
        Err(why) => {
            let aside = inst.dir.join("metadata.json.unreadable");
            fs::rename(inst.metadata_path(), &aside).map_err(|source| VmError::Io { path: aside.clone(), source })?;
            done.push(format!("{why}; moved it to {}", aside.display()));
            for line in &done {
                tracing::warn!(gateway = %inst.name, "recovered stale state: {line}");
            }
            return Ok(done);
        }
    };
    for (role, pid, progs) in recorded_children(&meta) {
        let Some(pid) = pid else { continue };
        let process = procfs::process(pid);
        if process.program_is_any(progs) {
            // A pid this instance recorded, verified just now to run our program.
            let _ = openshell_vm::child::signal(pid, nix::sys::signal::Signal::SIGKILL);
            wait_gone(pid);
            done.push(format!("killed leftover {role} pid {pid}"));
        } else if process.alive {
            done.push(format!("{role} pid {pid} now runs something else ({}); left alone", process.cmdline));
        } else {
            done.push(format!("{role} pid {pid} already gone"));
        }
    }
    if let Some(sup) = meta.supervisor_pid.filter(|&p| p != std::process::id()) {
        done.push(format!("supervisor pid {sup} is gone; cleared its stale record"));
    }
    if meta.vm_pid.is_some() || meta.passt_pid.is_some() || meta.gvproxy_pid.is_some() || meta.supervisor_pid.is_some()
    {
        meta.vm_pid = None;
        meta.passt_pid = None;
        meta.gvproxy_pid = None;
        meta.supervisor_pid = None;
        inst.write_metadata(&meta)?;
    }
    for line in &done {
        tracing::warn!(gateway = %inst.name, "recovered stale state: {line}");
    }
    Ok(done)
}

/// The processes an instance's metadata records under its supervisor, with the programs each must
/// run to be ours. The network helpers first: passt exits by itself once its VMM is gone, so
/// killing the VMM first would race it and report a helper that was alive as "already gone".
pub(crate) fn recorded_children(
    meta: &crate::state::Metadata,
) -> [(&'static str, Option<u32>, &'static [&'static str]); 3] {
    [
        ("passt", meta.passt_pid, &["passt"]),
        ("gvproxy", meta.gvproxy_pid, &["gvproxy"]),
        ("vm", meta.vm_pid, openshell_vm::backend::VMM_PROGRAMS),
    ]
}

fn wait_gone(pid: u32) {
    for _ in 0..100 {
        if fs::metadata(format!("/proc/{pid}")).is_err() {
            return;
        }
        // Our own child would stay a zombie until reaped; reap it if so.
        // WNOHANG on that one pid: harmless (ECHILD) when it is not our child.
        if let Ok(pid) = i32::try_from(pid) {
            let _ =
                nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn metadata(vm: Option<u32>, passt: Option<u32>, sup: Option<u32>) -> Metadata {
        Metadata {
            name: "t".into(),
            endpoint: "127.0.0.1:1".into(),
            gateway_endpoint: "https://127.0.0.1:1".into(),
            created_unix: 0,
            vm_pid: vm,
            kernel_sha256: String::new(),
            rootfs_sha256: String::new(),
            backend: "qemu (tcg)".into(),
            supervisor_pid: sup,
            passt_pid: passt,
            gvproxy_pid: None,
            kernel_path: None,
            rootfs_dir: None,
            console_log: None,
            failure: None,
            restarting: None,
            gave_up_after_restarts: None,
        }
    }

    /// A process whose argv[0] reads like passt, standing in for a leftover passt.
    fn fake(argv0: &str) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let child = Command::new("sleep").arg0(argv0).arg("60").stdout(Stdio::null()).spawn().unwrap();
        // Until it has exec'd, its cmdline is still the test binary's.
        while !procfs::process(child.id()).program_is_any(&[argv0]) {
            std::thread::sleep(Duration::from_millis(1));
        }
        child
    }

    #[test]
    fn restart_policies_parse() {
        assert_eq!("no".parse::<Restart>().unwrap(), Restart::No);
        assert_eq!("on-failure".parse::<Restart>().unwrap(), Restart::ON_FAILURE);
        let ms = Duration::from_millis(50);
        assert_eq!(Restart::ON_FAILURE.with_backoff(ms), Restart::OnFailure { max: 5, backoff: ms });
        assert_eq!(Restart::No.with_backoff(ms), Restart::No);
        let err = "always".parse::<Restart>().unwrap_err();
        assert!(err.contains("no or on-failure"), "{err}");
    }

    #[test]
    #[cfg_attr(
        not(target_os = "linux"),
        ignore = "stale-state recovery tells processes apart through /proc, which macOS lacks (docs/macos.md)"
    )]
    fn kills_recorded_leftovers_and_clears_the_record() {
        let tmp = tempfile::tempdir().unwrap();
        let inst = GatewayInstance::new(&tmp.path().join("gateways"), "t").unwrap();
        fs::create_dir_all(&inst.dir).unwrap();
        // Reaped by recovery itself (it is our child here), hence no wait().
        #[allow(clippy::zombie_processes)]
        let passt = fake("passt");
        // A supervisor pid that no longer exists.
        inst.write_metadata(&metadata(None, Some(passt.id()), Some(u32::MAX - 1))).unwrap();
        let done = recover(&inst).unwrap();
        assert!(done.iter().any(|l| l.contains("killed leftover passt")), "{done:?}");
        // Recovery reaped it too (it is our child here), so no /proc entry is left.
        assert!(fs::metadata(format!("/proc/{}", passt.id())).is_err(), "passt was not killed");
        let meta = inst.read_metadata().unwrap();
        assert_eq!((meta.vm_pid, meta.passt_pid, meta.supervisor_pid), (None, None, None));
        assert!(recover(&inst).unwrap().is_empty(), "a second recovery finds nothing stale");
    }

    #[test]
    #[cfg_attr(
        not(target_os = "linux"),
        ignore = "stale-state recovery tells processes apart through /proc, which macOS lacks (docs/macos.md)"
    )]
    fn never_kills_a_recycled_pid_running_something_else() {
        let tmp = tempfile::tempdir().unwrap();
        let inst = GatewayInstance::new(&tmp.path().join("gateways"), "t").unwrap();
        fs::create_dir_all(&inst.dir).unwrap();
        let mut other = fake("unrelated-daemon");
        inst.write_metadata(&metadata(Some(other.id()), None, None)).unwrap();
        let done = recover(&inst).unwrap();
        assert!(done.iter().any(|l| l.contains("now runs something else") && l.contains("left alone")), "{done:?}");
        assert!(other.try_wait().unwrap().is_none(), "an unrelated process was killed");
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    #[cfg_attr(
        not(target_os = "linux"),
        ignore = "stale-state recovery tells processes apart through /proc, which macOS lacks (docs/macos.md)"
    )]
    fn a_live_supervisor_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let inst = GatewayInstance::new(&tmp.path().join("gateways"), "t").unwrap();
        let mut sup = fake("xtask");
        let mut passt = fake("passt");
        // The lock is held by another open file description while the supervisor lives.
        let _lock = inst.lock().unwrap();
        inst.write_metadata(&metadata(None, Some(passt.id()), Some(sup.id()))).unwrap();
        assert!(recover(&inst).unwrap().is_empty());
        assert!(passt.try_wait().unwrap().is_none());
        for c in [&mut sup, &mut passt] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

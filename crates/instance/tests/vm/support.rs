//! What every VM trial needs: artifacts, a state dir kept on failure, a config, a supervisor
//! process for the trials that signal one, and the record of what each trial booted.

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libtest_mimic::Failed;
use openshell_vm::plan::Net;
use openshell_vm::{Backend, HostFacts, KrunPlace, Plan, VmConfig, VmmChoice};

/// Upper bound for one guest run under TCG; a trial that needs longer is broken, not slow.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
}

/// The artifacts, or the reason the VM trials cannot run.
pub fn artifacts() -> Result<Artifacts, String> {
    let get = |k: &str| std::env::var_os(k).map(PathBuf::from).filter(|p| p.exists());
    match (get("OPENSHELL_KERNEL"), get("OPENSHELL_ROOTFS")) {
        (Some(kernel), Some(rootfs)) => Ok(Artifacts { kernel, rootfs }),
        _ => Err("OPENSHELL_KERNEL/OPENSHELL_ROOTFS not set to built artifacts; run `cargo xtask e2e --vm`".into()),
    }
}

/// The debian profile's baked root directory and its root disk image (set by `cargo xtask e2e`).
pub const DEBIAN_ROOT_ENV: &str = "OPENSHELL_DEBIAN_ROOT";
pub const DEBIAN_ROOT_DISK_ENV: &str = "OPENSHELL_DEBIAN_ROOT_DISK";

pub fn require() -> bool {
    std::env::var("OPENSHELL_E2E_REQUIRE").is_ok_and(|v| v == "1")
}

/// Backends whose trials must run here (`OPENSHELL_E2E_REQUIRE_BACKENDS=qemu,krun`, set by
/// `cargo xtask test --require-backend …`): for them "cannot run on this host" is a failure.
pub fn required_backends() -> Vec<String> {
    let list = std::env::var("OPENSHELL_E2E_REQUIRE_BACKENDS").unwrap_or_default();
    list.split(',').map(str::trim).filter(|b| !b.is_empty()).map(str::to_owned).collect()
}

/// The host's facts, probed once for every trial of this process.
pub fn host() -> &'static HostFacts {
    static HOST: OnceLock<HostFacts> = OnceLock::new();
    HOST.get_or_init(HostFacts::probe)
}

/// The plan for booting `cfg` here, from the one probe.
pub fn plan(cfg: &VmConfig) -> Plan {
    openshell_vm::Plan::of(host(), cfg)
}

/// Launches `cfg` as the plan says (the trials that test the runtime below the instance layer).
pub fn launch(cfg: &VmConfig) -> Result<openshell_vm::RunningVm, openshell_vm::VmError> {
    openshell_vm::launch(&openshell_vm::Planned::new(host(), cfg.clone()))
}

/// Which backends can boot a guest to userspace here, and which cannot (with the reason): the
/// plan's answers, not a second reading of the facts. krun's nested case is routed by
/// `nested::route` before this answer is asked.
pub fn backends() -> Vec<(&'static str, VmmChoice, Result<(), String>)> {
    let krun = match openshell_vm::plan(host(), VmmChoice::Krun, Net::None).krun {
        KrunPlace::Direct => Ok(()),
        KrunPlace::NestedL1 => {
            Err("krun: libkrun runs only inside the nested host here (see docs/nested-hosts.md)".into())
        }
        KrunPlace::Nowhere(why) => Err(format!("krun: {why}")),
    };
    let qemu = match openshell_vm::plan(host(), VmmChoice::Qemu, Net::None).backend {
        Ok((Backend::Qemu { .. }, _)) => Ok(()),
        Ok(_) => unreachable!("qemu choice gives qemu"),
        Err(e) => Err(format!("qemu: {e}")),
    };
    vec![("krun", VmmChoice::Krun, krun), ("qemu", VmmChoice::Qemu, qemu)]
}

/// What a trial must do for its verdict to mean anything: boot a VM to guest userspace (the
/// default), be refused before any VMM starts, run a command that boots nothing by design
/// (`kernel --json`), start a VM whose guest by design stops before userspace (a broken init), or
/// be the krun smoke trial (a VMM started; userspace recorded, not required). [`observe`] checks
/// it against the ledger's facts: the VMMs the trial spawned and the guests that reached userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boots {
    Vm,
    RefusedBeforeBoot,
    NoVm,
    StopsBeforeUserspace,
    Smoke,
}

impl Boots {
    fn as_str(self) -> &'static str {
        match self {
            Boots::Vm => "vm",
            Boots::RefusedBeforeBoot => "refused-before-boot",
            Boots::NoVm => "no-vm",
            Boots::StopsBeforeUserspace => "stops-before-userspace",
            Boots::Smoke => "smoke",
        }
    }

    fn parse(s: &str) -> Option<Boots> {
        [Boots::Vm, Boots::RefusedBeforeBoot, Boots::NoVm, Boots::StopsBeforeUserspace, Boots::Smoke]
            .into_iter()
            .find(|b| b.as_str() == s)
    }
}

/// How `--vmm` (and the supervisor mode's environment) spells a trial's backend.
pub fn vmm_name(vmm: VmmChoice) -> &'static str {
    match vmm {
        VmmChoice::Krun => "krun",
        VmmChoice::Qemu | VmmChoice::Auto => "qemu",
    }
}

/// A trial's own state directory; kept (and named) when the trial fails.
pub struct TrialDir(Option<tempfile::TempDir>, Rc<Cell<Boots>>);

impl TrialDir {
    pub fn new(name: &str) -> TrialDir {
        let dir = tempfile::Builder::new().prefix(&format!("vm-{}-", name.replace("::", "-"))).tempdir().unwrap();
        TrialDir(Some(dir), Rc::new(Cell::new(Boots::Vm)))
    }

    pub fn path(&self) -> PathBuf {
        self.0.as_ref().unwrap().path().to_owned()
    }

    /// Declares that this trial passes only if it is refused before any VMM starts.
    pub fn expect_refusal_before_boot(&self) {
        self.1.set(Boots::RefusedBeforeBoot);
    }

    /// Declares that this trial runs only commands that boot nothing (and fails if one does).
    pub fn expect_no_vm(&self) {
        self.1.set(Boots::NoVm);
    }

    /// Declares that this trial starts a VMM whose guest must not reach userspace (a broken init).
    pub fn expect_stop_before_userspace(&self) {
        self.1.set(Boots::StopsBeforeUserspace);
    }

    /// Declares that this is the krun smoke trial: a VMM must start; whether its guest reached
    /// userspace is recorded for the summary's own line, not counted as a boot.
    pub fn expect_smoke(&self) {
        self.1.set(Boots::Smoke);
    }

    /// Wraps a failure with the console's tail and keeps the directory for inspection.
    pub fn fail(mut self, msg: impl Into<String>) -> Failed {
        let dir = self.0.take().unwrap().keep();
        let file_tail = |file: &str, n: usize| tail(&std::fs::read_to_string(dir.join(file)).unwrap_or_default(), n);
        // The VMM's own output says why a VMM died (an abort, a device error), which the guest's
        // console cannot; and a nested trial's directory vanishes with its L1, so both go here.
        // A panicking VMM prints a long backtrace after its message: keep the message.
        let vmm_log = std::fs::read_to_string(dir.join("state/vmm.log")).unwrap_or_default();
        let lines: Vec<&str> = vmm_log.lines().collect();
        let panics: Vec<String> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("panicked at"))
            .map(|(i, _)| lines[i..(i + 3).min(lines.len())].join("\n"))
            .collect();
        format!(
            "{}\nstate kept at {}\n--- console (last 30 lines) ---\n{}\n--- vmm.log (last 15 lines) ---\n{}{}",
            msg.into(),
            dir.display(),
            file_tail("state/console.log", 30),
            file_tail("state/vmm.log", 15),
            if panics.is_empty() { String::new() } else { format!("\n--- vmm.log panics ---\n{}", panics.join("\n")) }
        )
        .into()
    }

    /// Takes on what a run of this trial inside a nested L1 recorded under `records`: its VMMs (so
    /// they count here), what it expected to boot, and its notes.
    pub fn adopt_nested_records(&self, records: &std::path::Path) {
        adopt_ledgers(records);
        for entry in std::fs::read_dir(records).into_iter().flatten().flatten() {
            let Some(o) =
                std::fs::read(entry.path()).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            else {
                continue;
            };
            if let Some(expects) = o["expects"].as_str().and_then(Boots::parse) {
                self.1.set(expects);
            }
            for n in o["notes"].as_array().into_iter().flatten().filter_map(|n| n.as_str()) {
                note(format!("inside L1: {n}"));
            }
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A gateway instance `trial` under `root` with its PKI, and the request that boots it the way
/// `vm run` does (passt, 127.0.0.1:`port` → 30051, the digests the artifacts' own records hold, as
/// `vm run` writes them): what every gateway trial boots.
pub struct GatewayTrial {
    pub inst: openshell_instance::state::GatewayInstance,
    pub req: openshell_instance::supervise::Request,
    pub digests: (String, String),
}

pub fn gateway(a: &Artifacts, vmm: VmmChoice, root: &std::path::Path, port: u16) -> Result<GatewayTrial, String> {
    let inst = openshell_instance::state::GatewayInstance::new(root, "trial").map_err(|e| e.to_string())?;
    inst.ensure_pki().map_err(|e| e.to_string())?;
    // The records, not a re-hash: a tampered copy then boots as `vm run --allow-unverified`
    // boots it, and only `verify`'s re-hash can tell.
    let kernel_dir = a.kernel.parent().ok_or("the kernel path has no directory")?;
    let kernel_sha = openshell_artifacts::kernel::GuestKernel::open(kernel_dir)
        .map_err(|e| e.to_string())?
        .provenance
        .vmlinux_sha256
        .hex();
    let rootfs_sha =
        openshell_artifacts::rootfs::RootfsBundle::open(&a.rootfs).map_err(|e| e.to_string())?.digest().hex();
    let digests = (kernel_sha, rootfs_sha);
    let mut req =
        openshell_instance::supervise::Request::new(root, "trial", a.kernel.clone(), a.rootfs.clone(), digests.clone());
    req.vm = passt_forward(vmm, port);
    req.ready_timeout = GUEST_TIMEOUT;
    Ok(GatewayTrial { inst, req, digests })
}

/// A gateway trial's VM: `vmm`, passt, 127.0.0.1:`port` → the gateway's 30051.
pub fn passt_forward(vmm: VmmChoice, port: u16) -> openshell_vm::Overrides {
    openshell_vm::Overrides {
        vmm: Some(vmm),
        net: Some(openshell_vm::Net::Passt),
        ports: vec![openshell_vm::PortMap { host: port, guest: openshell_instance::preset::GATEWAY_PORT }],
        ..openshell_vm::Overrides::default()
    }
}

impl GatewayTrial {
    /// The gateway's VM config (for the trials that launch it below the instance layer).
    pub fn cfg(&self) -> VmConfig {
        self.req.config().expect("the trial's request makes a config")
    }

    /// Boots it the way `cargo xtask vm run` does (`supervise::Request::boot`).
    pub fn boot(&self) -> Result<openshell_instance::supervise::Supervised, openshell_vm::VmError> {
        self.req.boot()
    }

    /// [`Self::boot`], with `--allow-unverified` when `verification` says so.
    pub fn boot_with(
        &self,
        verification: openshell_instance::check::Verification,
    ) -> Result<openshell_instance::supervise::Supervised, openshell_vm::VmError> {
        let mut req = self.req.clone();
        req.verification = verification;
        req.boot()
    }

    /// Starts it under the `openshell-supervisor` binary, as `vm run --detach` does: cargo's
    /// build of it, or `$OPENSHELL_SUPERVISOR` (inside a nested host, its copy in L1's share).
    pub fn detach(&self) -> Result<openshell_instance::supervise::Detached, openshell_vm::VmError> {
        let supervisor = match std::env::var_os("OPENSHELL_SUPERVISOR") {
            Some(_) => openshell_instance::supervise::supervisor_binary(),
            None => PathBuf::from(env!("CARGO_BIN_EXE_openshell-supervisor")),
        };
        openshell_instance::supervise::detach(&supervisor, &self.req)
    }
}

pub fn config(a: &Artifacts, dir: &TrialDir, vmm: VmmChoice, argv: &[&str]) -> VmConfig {
    let mut cfg = VmConfig::exec(
        a.kernel.clone(),
        a.rootfs.clone(),
        dir.path().join("state"),
        argv.iter().map(|s| s.to_string()).collect(),
    );
    cfg.vmm = vmm;
    cfg
}

/// Boots `cfg`, waits for the guest, returns (exit code, console text).
pub fn run(cfg: &VmConfig, dir: TrialDir) -> Result<(i32, String, TrialDir), Failed> {
    match boot_to_exit(cfg) {
        Ok((code, console)) => Ok((code, console, dir)),
        Err(e) => Err(dir.fail(e)),
    }
}

/// [`run`] for a trial that goes on after the guest exits: (exit code, console text), or why
/// there is none (the VM is stopped by then).
pub fn boot_to_exit(cfg: &VmConfig) -> Result<(i32, String), String> {
    let mut vm = launch(cfg).map_err(|e| format!("launch failed: {e}"))?;
    let code = match vm.wait(None, Some(GUEST_TIMEOUT)).map_err(|e| e.to_string())? {
        openshell_vm::VmExit::Guest(c) => c,
        other => return Err(format!("the guest reported no exit code: {other}")),
    };
    Ok((code, std::fs::read_to_string(cfg.console_path()).unwrap_or_default()))
}

/// Whether a process with this pid exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    // Signal 0 only checks for existence and permission.
    openshell_vm::child::signal(pid, None).is_ok()
}

const SUPERVISE_ENV: &str = "OPENSHELL_E2E_SUPERVISE";

/// This test binary doubles as a supervisor process for the signal trials: with
/// `OPENSHELL_E2E_SUPERVISE=<state dir>` it boots the VM described by its arguments, prints
/// `vmm-pid=N` and returns the VM's exit code.
pub fn supervisor_mode() -> Option<i32> {
    let state = std::env::var_os(SUPERVISE_ENV)?;
    let a = artifacts().expect("artifacts are set for the supervisor");
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let vmm: VmmChoice = std::env::var("OPENSHELL_E2E_VMM").unwrap().parse().unwrap();
    let mut cfg = VmConfig::exec(a.kernel, a.rootfs, PathBuf::from(state), argv);
    cfg.vmm = vmm;
    let mut vm = launch(&cfg).expect("supervisor launch");
    println!("vmm-pid={}", vm.pid());
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    // The exit code says who reported it: the guest's own code, or 128+signal as the host's.
    Some(match vm.wait(None, Some(GUEST_TIMEOUT)) {
        Ok(openshell_vm::VmExit::Guest(code)) => code,
        Ok(other) => {
            eprintln!("supervisor: {other}");
            200
        }
        Err(e) => {
            eprintln!("supervisor: {e}");
            255
        }
    })
}

pub fn supervisor_command(state: &std::path::Path, vmm: &str, argv: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.env(SUPERVISE_ENV, state).env("OPENSHELL_E2E_VMM", vmm).args(argv);
    c
}

/// A port that was free a moment ago, below the kernel's ephemeral range (32768+), so a client
/// socket of any process on this host cannot take it in between; trials pick theirs at random.
/// The forward binds it later: boot through [`with_free_port`], which retries on a collision.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20000 + (h.finish() % 10000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Runs `boot` with a free port; when the boot is refused because the port was taken between the
/// pick and the preflight (another trial, another process), tries again with another (5 times).
pub fn with_free_port<T>(mut boot: impl FnMut(u16) -> Result<T, String>) -> Result<T, String> {
    let mut tries = 0;
    loop {
        let port = free_port();
        match boot(port) {
            Err(e) if tries < 5 && e.contains(&format!("{port}")) && e.contains("in use") => {
                eprintln!("port {port} was taken before the boot; trying another: {e}");
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Lines a trial adds to its record (e.g. how far a guest got), shown in xtask's summary.
static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records `line` for this trial's summary and prints it.
pub fn note(line: impl Into<String>) {
    let line = line.into();
    println!("{line}");
    NOTES.lock().unwrap().push(line);
}

/// Where the records of this run go: `OPENSHELL_E2E_RECORDS` (set by `cargo xtask e2e`, which
/// summarises them), or a directory of this process's own that lives as long as the value.
pub struct Records {
    _own: Option<tempfile::TempDir>,
}

const RECORDS_ENV: &str = "OPENSHELL_E2E_RECORDS";

impl Records {
    pub fn init() -> Records {
        if std::env::var_os(RECORDS_ENV).is_some() {
            return Records { _own: None };
        }
        let dir = tempfile::Builder::new().prefix("vm-records-").tempdir().expect("a temp dir for the VMM ledger");
        // Before any thread starts: the trials' child processes inherit it.
        std::env::set_var(RECORDS_ENV, dir.path());
        Records { _own: Some(dir) }
    }
}

/// Where this run's trial records go (see [`Records`]).
pub fn records_dir() -> PathBuf {
    PathBuf::from(std::env::var_os(RECORDS_ENV).expect("Records::init ran in main"))
}

/// Adds the VMMs recorded in the ledgers under `dir` (a nested run's, inside its L1) to this
/// trial's own ledger, so the VMs booted inside L1 count for the trial that ran them.
fn adopt_ledgers(dir: &std::path::Path) {
    let Some(own) = std::env::var_os(openshell_vm::LEDGER_ENV) else { return };
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    let lines: String = entries
        .filter(|e| e.path().extension().is_some_and(|x| x == "vmms"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect();
    use std::io::Write;
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&own)
        .and_then(|mut f| f.write_all(lines.as_bytes()));
    if let Err(e) = appended {
        eprintln!("cannot add the nested ledgers to {}: {e}", PathBuf::from(own).display());
    }
}

/// One attempt of one trial, read by `cargo xtask e2e` for the per-backend summary. Written twice:
/// `"status": "started"` before the body runs, then its outcome; a record still `started` at the
/// end is a trial that was killed (nextest's timeout, a crash of the process) and counts as failed.
#[derive(serde::Serialize)]
struct Outcome<'a> {
    trial: &'a str,
    backend: &'a str,
    /// nextest's attempt number (1 without nextest or retries); each attempt has its own record.
    attempt: u32,
    /// What the trial had to do (see [`Boots`]).
    expects: &'static str,
    /// VMM processes of `backend` the trial (and the processes it started) spawned.
    spawned: usize,
    /// Of those, the ones whose guest reached userspace (init's first line or its exit file).
    booted: usize,
    /// "started", "passed" or "failed".
    status: &'static str,
    /// The failure's first line, for the summary (e.g. of an attempt that was retried).
    failure: Option<String>,
    notes: Vec<String>,
}

/// nextest's attempt number for this test process (`NEXTEST_ATTEMPT`, 1-based); 1 otherwise.
fn attempt() -> u32 {
    std::env::var("NEXTEST_ATTEMPT").ok().and_then(|a| a.parse().ok()).unwrap_or(1)
}

/// How a trial whose VMMs all kept their guests out of userspace (by the ledger) is reported.
pub const NO_USERSPACE: &str = "got its guest to userspace (no init line on the console, no exit-code file)";

/// (spawned, booted) VMMs of `backend` in the ledger at `path`. Only this trial's backend counts:
/// a krun trial run inside a QEMU L1 VM started one VM of each.
fn ledger_counts(path: &std::path::Path, backend: &str) -> (usize, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let facts: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let count = |event: &str| facts.iter().filter(|f| f["backend"] == backend && f["event"] == event).count();
    (count("spawned"), count("userspace"))
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_owned(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".to_owned(),
    }
}

/// Runs a trial body with its VMMs counted: every VMM launched by this process or a child it
/// starts is recorded in the trial's own ledger (`openshell_vm::LEDGER_ENV`), spawned and, once its
/// guest reached userspace, booted. A trial that expects a VM and booted none, or expects none and
/// started one, fails whatever its body said; a body that panics fails with the panic's message.
/// The attempt's record is written before the body runs and again with its outcome.
pub fn observe(name: &str, backend: &str, body: impl FnOnce(TrialDir) -> Result<(), Failed>) -> Result<(), Failed> {
    let attempt = attempt();
    let stem = format!("{}.attempt-{attempt}", name.replace("::", "-"));
    let ledger = records_dir().join(format!("{stem}.vmms"));
    let _ = std::fs::remove_file(&ledger);
    // Trials run one at a time in this process (main sets one test thread), so this is the only
    // trial whose launches can land here; child processes inherit it.
    std::env::set_var(openshell_vm::LEDGER_ENV, &ledger);
    NOTES.lock().unwrap().clear();
    let dir = TrialDir::new(name);
    let expects = Rc::clone(&dir.1);
    let path = records_dir().join(format!("{stem}.outcome.json"));
    let write = |status: &'static str, spawned, booted, failure: Option<String>, notes| {
        let outcome = Outcome {
            trial: name,
            backend,
            attempt,
            expects: expects.get().as_str(),
            spawned,
            booted,
            status,
            failure,
            notes,
        };
        std::fs::write(&path, serde_json::to_vec(&outcome).unwrap()).expect("the trial record is writable");
    };
    write("started", 0, 0, None, Vec::new());
    let mut result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(dir))) {
        Ok(r) => r,
        Err(payload) => Err(format!("the trial panicked: {}", panic_message(payload.as_ref())).into()),
    };
    let (spawned, booted) = ledger_counts(&ledger, backend);
    result = match (result, expects.get(), spawned, booted) {
        (Ok(()), Boots::Vm, 0, _) => {
            Err("the trial passed without starting a VMM, so it proves nothing about a VM".into())
        }
        (Ok(()), Boots::Vm, n, 0) => {
            Err(format!("the trial passed, but none of its {n} VMM(s) {NO_USERSPACE}, so it proves nothing about a VM")
                .into())
        }
        (Ok(()), Boots::RefusedBeforeBoot | Boots::NoVm, n, _) if n > 0 => {
            Err(format!("the trial expects no VM ({}), but {n} VMM(s) were started", expects.get().as_str()).into())
        }
        (Ok(()), Boots::StopsBeforeUserspace | Boots::Smoke, 0, _) => {
            Err("the trial passed without starting a VMM".into())
        }
        (Ok(()), Boots::StopsBeforeUserspace, _, n) if n > 0 => {
            Err(format!("the trial's guest must stop before userspace, but {n} VMM(s) recorded a guest in userspace")
                .into())
        }
        (r, _, _, _) => r,
    };
    let failure =
        result.as_ref().err().map(|f| f.message().unwrap_or("failed").lines().next().unwrap_or("").to_owned());
    let status = if result.is_ok() { "passed" } else { "failed" };
    write(status, spawned, booted, failure, std::mem::take(&mut *NOTES.lock().unwrap()));
    result
}

/// Local IPv4/IPv6 addresses with a listening TCP socket on `port`, from /proc/net/tcp{,6}.
pub fn tcp_listeners(port: u16) -> Vec<String> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // st 0A = LISTEN
            if cols.len() < 4 || cols[3] != "0A" {
                continue;
            }
            let Some((addr, p)) = cols[1].split_once(':') else { continue };
            if u16::from_str_radix(p, 16).ok() != Some(port) {
                continue;
            }
            out.push(if v6 {
                format!("[{addr}]")
            } else {
                let n = u32::from_str_radix(addr, 16).unwrap_or(0);
                std::net::Ipv4Addr::from(n.swap_bytes()).to_string()
            });
        }
    }
    out
}

/// `cp -a`, so modes and the busybox symlinks survive and a rootfs manifest still describes the copy.
pub fn copy(from: &std::path::Path, to: &std::path::Path) -> Result<(), String> {
    let st = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().map_err(|e| format!("cp: {e}"))?;
    st.success().then_some(()).ok_or_else(|| format!("cp -a {} {} failed: {st}", from.display(), to.display()))
}

/// Processes whose command line mentions `needle` (a VMM started on a trial's paths).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (pid != std::process::id() && cmd.contains(needle)).then(|| format!("{pid}: {cmd}"))
        })
        .collect()
}

//! The `cargo xtask` commands as a user runs them: the real xtask binary (`OPENSHELL_XTASK`, set by
//! `cargo xtask e2e`), its exit codes checked exactly and its `--json` documents parsed and checked
//! field by field, against facts gathered here independently (`/proc`, the lock holder, digests
//! computed by the trial).
//!
//! Isolation: each trial has its own instances (`XDG_CONFIG_HOME`), its own instance names and host
//! port, its own `TMPDIR`, and `--vmm` names the backend under test. A trial that tampers with an
//! artifact does it in a copy in its own store (`OPENSHELL_CACHE_DIR`); the shared store is only
//! ever read. Every instance a trial starts is stopped on every way out, failures included.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use openshell_artifacts::{sha256_file, Digest};
use openshell_instance::state::{GatewayInstance, Metadata};
use openshell_vm::{procfs, VmmChoice};
use serde_json::{json, Value};

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("cli::detach_status_logs_and_stop", detach_status_logs_and_stop),
    ("cli::port_zero_gives_each_gateway_a_free_port", port_zero_gives_each_gateway_a_free_port),
    ("cli::second_run_of_a_running_name_is_refused", second_run_of_a_running_name_is_refused),
    ("cli::two_runs_of_one_name_at_once_boot_exactly_one", two_runs_of_one_name_at_once_boot_exactly_one),
    ("cli::damaged_instance_files_are_named_and_recovered", damaged_instance_files_are_named_and_recovered),
    ("cli::reset_replaces_the_pki", reset_replaces_the_pki),
    ("cli::root_disk_keeps_its_data_disk_until_reset", root_disk_keeps_its_data_disk_until_reset),
    ("cli::ready_timeout_expiry_leaves_nothing_running", ready_timeout_expiry_leaves_nothing_running),
    ("cli::sigint_stops_a_foreground_run", sigint_stops_a_foreground_run),
    ("cli::passt_killed_fails_the_instance_and_status_says_why", passt_killed_fails_the_instance_and_status_says_why),
    ("cli::vmm_killed_fails_the_instance_and_status_says_why", vmm_killed_fails_the_instance_and_status_says_why),
    ("cli::restart_on_failure_brings_the_gateway_back", restart_on_failure_brings_the_gateway_back),
    ("cli::verify_exit_codes_and_json", verify_exit_codes_and_json),
    ("cli::check_exit_codes_and_json", check_exit_codes_and_json),
    ("cli::rootfs_check_detects_a_tampered_file", rootfs_check_detects_a_tampered_file),
    ("cli::kernel_json_is_the_provenance", kernel_json_is_the_provenance),
    ("cli::bench_boot_json", bench_boot_json),
    ("cli::bench_boots_pass_the_preflight_like_vm_run", bench_boots_pass_the_preflight_like_vm_run),
    ("cli::exec_exit_code_and_the_kept_state_dir", exec_exit_code_and_the_kept_state_dir),
    ("cli::exec_ctrl_c_grace_and_second_ctrl_c", exec_ctrl_c_grace_and_second_ctrl_c),
    ("cli::restart_on_failure_gives_up_after_5", restart_on_failure_gives_up_after_5),
    ("cli::stop_during_a_restarts_boot_abandons_it", stop_during_a_restarts_boot_abandons_it),
    ("cli::bench_exec_json", bench_exec_json),
    ("cli::bench_load_json", bench_load_json),
    ("cli::bench_forward_json", bench_forward_json),
    ("cli::bench_disk_json", bench_disk_json),
    ("cli::bench_soak_json", bench_soak_json),
    ("cli::bench_compare_json", bench_compare_json),
    ("cli::bench_memory_json", bench_memory_json),
    ("cli::bench_many_json", bench_many_json),
];

/// Bound on one xtask command, to fail a wedged one rather than hang: `vm run --detach` itself
/// gives up after its ready timeout (60 s) + 30 s.
const COMMAND_LIMIT: Duration = Duration::from_secs(240);

/// The xtask binary with one trial's environment.
pub(crate) struct Cli {
    bin: PathBuf,
    /// `--vmm` for every command that boots.
    pub(crate) vmm: &'static str,
    pub(crate) dir: PathBuf,
    /// `OPENSHELL_CACHE_DIR` when the trial has its own store.
    cache: Option<PathBuf>,
}

/// What one xtask command did.
pub(crate) struct Ran {
    args: String,
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Ran {
    pub(crate) fn show(&self) -> String {
        format!(
            "`xtask {}` exited {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args, self.code, self.stdout, self.stderr
        )
    }

    /// Its stdout as one JSON document.
    fn json(&self) -> Result<Value, String> {
        serde_json::from_str(&self.stdout)
            .map_err(|e| format!("stdout is not one JSON document ({e}):\n{}", self.show()))
    }
}

/// A pipe read on its own thread, readable while the process still runs.
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: JoinHandle<()>,
}

impl Capture {
    fn new(mut r: impl Read + Send + 'static) -> Capture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = Arc::clone(&buf);
        let thread = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Capture { buf, thread }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    fn finish(self) -> String {
        let _ = self.thread.join();
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
}

/// A child process that is killed if it is still running when dropped (a failed trial).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A running xtask command with both outputs captured.
pub(crate) struct Spawned {
    child: KillOnDrop,
    args: String,
    stdout: Capture,
    stderr: Capture,
}

impl Spawned {
    /// Waits for it to exit, at most `limit`; kills it past that.
    pub(crate) fn wait(mut self, limit: Duration) -> Result<Ran, String> {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.0.try_wait().map_err(|e| e.to_string())? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.0.kill();
                let _ = self.child.0.wait();
                return Err(format!(
                    "`xtask {}` still running after {} s (killed)\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.args,
                    limit.as_secs(),
                    self.stdout.text(),
                    self.stderr.text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Ran { args: self.args, code: status.code(), stdout: self.stdout.finish(), stderr: self.stderr.finish() })
    }

    /// Waits until `ready` holds for what it has written so far (stdout, stderr); fails if it
    /// exits first or `limit` passes.
    pub(crate) fn stderr_text(&self) -> String {
        self.stderr.text()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.0.id()
    }

    pub(crate) fn wait_for(&mut self, limit: Duration, ready: impl Fn(&str, &str) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if ready(&self.stdout.text(), &self.stderr.text()) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.0.try_wait() {
                return Err(format!(
                    "`xtask {}` exited ({status}) before it got there\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.args,
                    self.stdout.text(),
                    self.stderr.text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "`xtask {}` did not get there within {} s\n--- stderr ---\n{}",
                    self.args,
                    limit.as_secs(),
                    self.stderr.text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Cli {
    pub(crate) fn new(dir: &TrialDir, vmm: VmmChoice) -> Result<Cli, Failed> {
        let bin = std::env::var_os("OPENSHELL_XTASK").map(PathBuf::from).filter(|p| p.is_file()).ok_or(
            "OPENSHELL_XTASK is not set to the xtask binary; run the VM suites with `cargo xtask e2e --vm`, which sets it",
        )?;
        for d in ["config", "tmp"] {
            std::fs::create_dir_all(dir.path().join(d)).map_err(|e| e.to_string())?;
        }
        Ok(Cli { bin, vmm: support::vmm_name(vmm), dir: dir.path(), cache: None })
    }

    fn root(&self) -> PathBuf {
        self.dir.join("config/openshell/gateways")
    }

    fn instance(&self, name: &str) -> GatewayInstance {
        GatewayInstance::new(&self.root(), name).expect("trial instance names are valid")
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("XDG_CONFIG_HOME", self.dir.join("config"))
            .env("TMPDIR", self.dir.join("tmp"))
            // What a user sees by default: an error without anyhow's backtrace after it.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match &self.cache {
            Some(cache) => c.env("OPENSHELL_CACHE_DIR", cache),
            None => &mut c,
        };
        c
    }

    pub(crate) fn spawn_with(&self, mut cmd: Command, args: &[&str]) -> Result<Spawned, String> {
        let mut child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        let stdout = Capture::new(child.stdout.take().unwrap());
        let stderr = Capture::new(child.stderr.take().unwrap());
        Ok(Spawned { child: KillOnDrop(child), args: args.join(" "), stdout, stderr })
    }

    fn spawn(&self, args: &[&str]) -> Result<Spawned, String> {
        self.spawn_with(self.command(args), args)
    }

    pub(crate) fn run(&self, args: &[&str]) -> Result<Ran, String> {
        self.spawn(args)?.wait(COMMAND_LIMIT)
    }

    /// `vm run --detach` of instance `name` on 127.0.0.1:`port`, which must succeed.
    fn detach(&self, name: &str, port: u16, extra: &[&str]) -> Result<Ran, String> {
        let publish = format!("{port}:30051");
        let mut args = vec!["vm", "run", "--detach", "--name", name, "-p", &publish, "--vmm", self.vmm];
        args.extend_from_slice(extra);
        let ran = self.run(&args)?;
        if ran.code != Some(0) || !ran.stderr.contains(&format!("SERVING over mTLS at 127.0.0.1:{port}")) {
            return Err(format!("the detached gateway did not come up:\n{}", ran.show()));
        }
        Ok(ran)
    }

    /// A failure with what the trial's instances left: each supervisor.log and console.
    fn fail(&self, dir: TrialDir, msg: impl Into<String>) -> Failed {
        let mut msg = msg.into();
        for entry in std::fs::read_dir(self.root()).into_iter().flatten().flatten() {
            let inst = self.instance(&entry.file_name().to_string_lossy());
            for (what, path) in [("supervisor.log", inst.dir.join("supervisor.log")), ("console", inst.console_path())]
            {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    msg.push_str(&format!(
                        "\n--- {} {what} (last 30 lines) ---\n{}",
                        inst.name,
                        support::tail(&text, 30)
                    ));
                }
            }
        }
        dir.fail(msg)
    }
}

/// Stops the instance when dropped: a detached supervisor runs in its own session and would
/// outlive a failed trial.
struct StopOnDrop(GatewayInstance);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.stop(Duration::from_secs(15));
    }
}

/// The pids a running instance recorded: (supervisor, VMM, passt).
fn recorded_pids(inst: &GatewayInstance) -> Result<(Metadata, u32, u32, u32), String> {
    let m = inst.read_metadata().ok_or_else(|| format!("no readable {}", inst.metadata_path().display()))?;
    match (m.supervisor_pid, m.vm_pid, m.passt_pid) {
        (Some(s), Some(v), Some(p)) => Ok((m, s, v, p)),
        other => Err(format!("metadata.json does not record supervisor, VMM and passt pids: {other:?}")),
    }
}

/// The program a VMM of backend `vmm` runs as.
fn vmm_program(vmm: &str) -> &'static str {
    if vmm == "krun" {
        "openshell-vmm"
    } else {
        "qemu-system"
    }
}

/// What of an instance is still there: its recorded processes (while they still run the program
/// they ran), listeners on its port, and any process whose command line names the trial's paths.
fn leftovers(cli: &Cli, port: u16, pids: &[(u32, &str)]) -> Vec<String> {
    let mut left: Vec<String> = pids
        .iter()
        .filter(|(pid, prog)| procfs::process(*pid).program_is_any(&[prog]))
        .map(|(pid, prog)| format!("{prog} pid {pid}"))
        .collect();
    left.extend(support::tcp_listeners(port).into_iter().map(|a| format!("a listener on {a}:{port}")));
    left.extend(support::processes_mentioning(&cli.dir.to_string_lossy()));
    left
}

/// `field` of a JSON object, or an error naming it and the document.
fn field<'a>(doc: &'a Value, key: &str) -> Result<&'a Value, String> {
    doc.get(key).ok_or_else(|| format!("no {key:?} in {doc}"))
}

fn expect_fields(doc: &Value, what: &str, want: &[(&str, Value)]) -> Result<(), String> {
    for (k, v) in want {
        let got = field(doc, k)?;
        if got != v {
            return Err(format!("{what}: {k} is {got}, want {v}\n{doc:#}"));
        }
    }
    Ok(())
}

/// A running instance as `vm status --json` must show it, each field against a fact found here:
/// the pid holding the instance lock, that process's command line, the VMM's parent.
fn check_status_serving(cli: &Cli, doc: &Value, name: &str, port: u16) -> Result<(), String> {
    let inst = cli.instance(name);
    let (_, sup, vm, _) = recorded_pids(&inst)?;
    expect_fields(
        doc,
        "status --json",
        &[
            ("name", json!(name)),
            ("running", json!(true)),
            ("health", json!("SERVING")),
            ("endpoint", json!(format!("127.0.0.1:{port}"))),
            ("supervisor_pid", json!(sup)),
            ("vm_pid", json!(vm)),
            ("mtls_dir", json!(inst.mtls_dir())),
        ],
    )?;
    if doc.get("stale").is_some() || doc.get("restarting").is_some() {
        return Err(format!("status --json reports stale state or a restart on a healthy instance: {doc:#}"));
    }
    let holders = procfs::flock_holders(&inst.lock_path());
    if holders != [sup] {
        return Err(format!("the instance lock is held by {holders:?}, status says supervisor {sup}"));
    }
    let s = procfs::process(sup);
    let request = inst.dir.join("supervise.json");
    if !s.program_is_any(&["openshell-supervisor"]) || !s.cmdline.ends_with(&*request.to_string_lossy()) {
        return Err(format!(
            "supervisor pid {sup} is not a live `openshell-supervisor {}`: {:?}",
            request.display(),
            s.cmdline
        ));
    }
    let v = procfs::process(vm);
    if !v.program_is_any(&[vmm_program(cli.vmm)]) || v.ppid != Some(sup) {
        return Err(format!(
            "vm pid {vm} is not a {} child of the supervisor: ppid {:?}, {:?}",
            vmm_program(cli.vmm),
            v.ppid,
            v.cmdline
        ));
    }
    for f in ["ca.crt", "tls.crt", "tls.key"] {
        if !inst.mtls_dir().join(f).is_file() {
            return Err(format!("mtls_dir {} has no {f}", inst.mtls_dir().display()));
        }
    }
    Ok(())
}

/// A stopped instance as `vm status --json` must show it.
fn check_status_stopped(doc: &Value, name: &str, port: u16) -> Result<(), String> {
    expect_fields(
        doc,
        "status --json of a stopped instance",
        &[
            ("name", json!(name)),
            ("running", json!(false)),
            ("health", json!("not running")),
            ("endpoint", json!(format!("127.0.0.1:{port}"))),
            ("supervisor_pid", Value::Null),
            ("vm_pid", Value::Null),
        ],
    )
}

/// Runs a trial body against its own `Cli`; a failure carries the instances' logs and keeps the
/// trial's directory.
pub(crate) fn in_cli(
    dir: TrialDir,
    vmm: VmmChoice,
    body: impl FnOnce(&mut Cli) -> Result<(), String>,
) -> Result<(), Failed> {
    let mut cli = Cli::new(&dir, vmm)?;
    match body(&mut cli) {
        Ok(()) => Ok(()),
        Err(e) => Err(cli.fail(dir, e)),
    }
}

/// `-p 0:30051` on two gateways at once: each gets a free port of its own, the one its metadata,
/// `status` and the SERVING line name, and both answer mTLS health there.
fn port_zero_gives_each_gateway_a_free_port(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let mut guards = Vec::new();
        let mut ports = Vec::new();
        for name in ["any-port-a", "any-port-b"] {
            guards.push(StopOnDrop(cli.instance(name)));
            let up = cli.run(&["vm", "run", "--detach", "--name", name, "-p", "0:30051", "--vmm", cli.vmm])?;
            let meta =
                cli.instance(name).read_metadata().ok_or_else(|| format!("{name} has no readable metadata.json"))?;
            let port: u16 = meta
                .endpoint
                .strip_prefix("127.0.0.1:")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("{name}'s metadata endpoint {:?} is not 127.0.0.1:PORT", meta.endpoint))?;
            if up.code != Some(0)
                || port == 0
                || !up.stderr.contains(&format!("SERVING over mTLS at 127.0.0.1:{port}"))
                || meta.gateway_endpoint != format!("https://127.0.0.1:{port}")
            {
                return Err(format!("{name} with -p 0:30051 (metadata port {port}):\n{}", up.show()));
            }
            let st = cli.run(&["vm", "status", "--name", name, "--json"])?;
            check_status_serving(cli, &st.json()?, name, port)?;
            ports.push(port);
        }
        if ports[0] == ports[1] {
            return Err(format!("both gateways got port {}", ports[0]));
        }
        drop(guards);
        Ok(())
    })
}

fn detach_status_logs_and_stop(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| detach_status_logs_and_stop_in(cli))
}

fn detach_status_logs_and_stop_in(cli: &Cli) -> Result<(), String> {
    let (name, port) = ("detached", support::free_port());
    let inst = cli.instance(name);
    let guard = StopOnDrop(inst.clone());
    let up = cli.detach(name, port, &[])?;
    if !up.stderr.contains("new PKI") {
        return Err(format!("a first boot does not say it made a new PKI:\n{}", up.show()));
    }
    // The detached supervisor (`openshell-supervisor`) logs what a foreground `vm run` prints.
    let log = std::fs::read_to_string(inst.dir.join("supervisor.log")).map_err(|e| format!("supervisor.log: {e}"))?;
    if !log.contains("boot timeline") || !log.contains(&format!("SERVING over mTLS at 127.0.0.1:{port}")) {
        return Err(format!("supervisor.log lacks the boot timeline or the SERVING line:\n{log}"));
    }
    let (_, sup, vm, passt) = recorded_pids(&inst)?;

    let st = cli.run(&["vm", "status", "--name", name, "--json"])?;
    if st.code != Some(0) {
        return Err(format!("status of a SERVING instance must exit 0:\n{}", st.show()));
    }
    check_status_serving(cli, &st.json()?, name, port)?;
    let text = cli.run(&["vm", "status", "--name", name])?;
    let pids = format!("(supervisor {sup}, vm {vm})");
    if text.code != Some(0)
        || !text.stdout.contains("running at")
        || !text.stdout.contains(&pids)
        || !text.stdout.contains("health: SERVING")
    {
        return Err(format!("plain status of a SERVING instance:\n{}", text.show()));
    }

    let logs = cli.run(&["vm", "logs", "--name", name])?;
    let console = std::fs::read_to_string(inst.console_path()).unwrap_or_default();
    let ok = logs.code == Some(0)
        && console.starts_with(&logs.stdout)
        && logs.stdout.contains("exec /usr/bin/openshell-gateway")
        && openshell_vm::timeline::gateway_listening(&logs.stdout);
    if !ok {
        return Err(format!("vm logs is not the instance's console up to the gateway listening:\n{}", logs.show()));
    }

    // `logs -f` follows while the instance runs and ends by itself when it stops.
    let mut follow = cli.spawn(&["vm", "logs", "--name", name, "-f"])?;
    follow.wait_for(COMMAND_LIMIT, |out, _| openshell_vm::timeline::gateway_listening(out))?;
    let stop = cli.run(&["vm", "stop", "--name", name])?;
    if stop.code != Some(0) || !stop.stderr.contains(&format!("gateway {name:?}: stopped")) {
        return Err(format!("vm stop of a running instance:\n{}", stop.show()));
    }
    let followed =
        follow.wait(COMMAND_LIMIT).map_err(|e| format!("vm logs -f kept following a stopped instance: {e}"))?;
    let console = std::fs::read_to_string(inst.console_path()).unwrap_or_default();
    if followed.code != Some(0) || followed.stdout != console || !followed.stderr.contains("is not running") {
        return Err(format!(
            "vm logs -f must end with exit 0 once the instance stops, having printed the whole console:\n{}",
            followed.show()
        ));
    }

    let left = leftovers(cli, port, &[(sup, "openshell-supervisor"), (vm, vmm_program(cli.vmm)), (passt, "passt")]);
    if !left.is_empty() {
        return Err(format!("left running after vm stop: {left:?}"));
    }
    let st = cli.run(&["vm", "status", "--name", name, "--json"])?;
    if st.code != Some(1) {
        return Err(format!("status of a stopped instance must exit 1:\n{}", st.show()));
    }
    check_status_stopped(&st.json()?, name, port)?;
    let again = cli.run(&["vm", "stop", "--name", name])?;
    if again.code != Some(0) || !again.stderr.contains("was not running") {
        return Err(format!("a second vm stop:\n{}", again.show()));
    }
    drop(guard);
    Ok(())
}

fn second_run_of_a_running_name_is_refused(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| second_run_refused_in(cli))
}

fn second_run_refused_in(cli: &Cli) -> Result<(), String> {
    let (name, port) = ("taken", support::free_port());
    let inst = cli.instance(name);
    let _guard = StopOnDrop(inst.clone());
    cli.detach(name, port, &[])?;
    let (_, sup, vm, _) = recorded_pids(&inst)?;
    let ca = std::fs::read(inst.mtls_dir().join("ca.crt")).map_err(|e| e.to_string())?;
    // Each on a free port of its own, so only the running instance can be the reason to refuse.
    for extra in [&[][..], &["--detach"][..], &["--reset"][..], &["--reset", "--detach"][..]] {
        let other = support::free_port();
        let publish = format!("{other}:30051");
        let mut args = vec!["vm", "run", "--name", name, "-p", &publish, "--vmm", cli.vmm];
        args.extend_from_slice(extra);
        let r = cli.run(&args)?;
        let names = format!("already running (supervisor pid {sup}); stop it with `cargo xtask vm stop --name {name}`");
        if r.code != Some(1) || !r.stderr.contains(&names) {
            return Err(format!(
                "a second `vm run {}` of a running name must exit 1 naming its supervisor:\n{}",
                extra.join(" "),
                r.show()
            ));
        }
        if !support::tcp_listeners(other).is_empty() {
            return Err(format!("the refused run left a listener on {other}"));
        }
    }
    // The running instance is untouched: same PKI, same supervisor and VMM, still SERVING.
    if std::fs::read(inst.mtls_dir().join("ca.crt")).ok() != Some(ca) {
        return Err("a refused `vm run --reset` replaced the running instance's CA".into());
    }
    let st = cli.run(&["vm", "status", "--name", name, "--json"])?;
    if st.code != Some(0) {
        return Err(format!("the running instance is no longer SERVING after the refused runs:\n{}", st.show()));
    }
    let doc = st.json()?;
    expect_fields(&doc, "status --json after refused runs", &[("supervisor_pid", json!(sup)), ("vm_pid", json!(vm))])
}

fn two_runs_of_one_name_at_once_boot_exactly_one(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| twin_runs_in(cli))
}

/// Two `vm run --detach --name twins` started together, on a new name (so they also race to make
/// its PKI), while a third party keeps testing the instance lock as `vm status` does: exactly one
/// boots, the other is refused naming the first's supervisor, and the one that runs is whole (its
/// PKI serves it, it alone holds the lock, one VMM runs). The tester's probes take the lock for an
/// instant each; a supervisor starting in such an instant must not take it for a twin.
fn twin_runs_in(cli: &Cli) -> Result<(), String> {
    let (name, port) = ("twins", support::free_port());
    let inst = cli.instance(name);
    let _guard = StopOnDrop(inst.clone());
    let publish = format!("{port}:30051");
    let args = ["vm", "run", "--detach", "--name", name, "-p", &publish, "--vmm", cli.vmm];
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (inst, done) = (inst.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut probes = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = inst.locked();
                probes += 1;
            }
            probes
        })
    };
    let started = Instant::now();
    let (a, b) = (cli.spawn(&args), cli.spawn(&args));
    let ran = a.and_then(|a| b.map(|b| (a, b))).and_then(|(a, b)| Ok((a.wait(COMMAND_LIMIT)?, b.wait(COMMAND_LIMIT)?)));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let probes = prober.join().map_err(|_| "the lock prober panicked".to_owned())?;
    let (a, b) = ran?;
    support::note(format!(
        "twin runs: both ended after {:.2} s; {probes} lock probes meanwhile",
        started.elapsed().as_secs_f64()
    ));
    let (up, refused) = match (a.code, b.code) {
        (Some(0), Some(1)) => (a, b),
        (Some(1), Some(0)) => (b, a),
        _ => return Err(format!("expected one run to exit 0 and the other 1:\n{}\n{}", a.show(), b.show())),
    };
    let (_, sup, vm, passt) = recorded_pids(&inst)?;
    let names = format!("already running (supervisor pid {sup}); stop it with `cargo xtask vm stop --name {name}`");
    if !up.stderr.contains(&format!("SERVING over mTLS at 127.0.0.1:{port}")) || !refused.stderr.contains(&names) {
        return Err(format!(
            "the run that exited 0 must say SERVING, the other must name supervisor {sup}:\n{}\n{}",
            up.show(),
            refused.show()
        ));
    }
    let st = cli.run(&["vm", "status", "--name", name, "--json"])?;
    if st.code != Some(0) {
        return Err(format!("the instance that won is not SERVING:\n{}", st.show()));
    }
    check_status_serving(cli, &st.json()?, name, port)?;
    // The VMM's command line names its files by fd, so its supervisor says whose it is.
    let vmms: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let p = procfs::process(pid);
            p.program_is_any(&[vmm_program(cli.vmm)])
                && p.ppid.is_some_and(|sup| procfs::process(sup).cmdline.contains(&*cli.dir.to_string_lossy()))
        })
        .collect();
    if vmms != [vm] {
        return Err(format!("expected the one VMM {vm} of the instance, found {vmms:?}"));
    }
    let stop = cli.run(&["vm", "stop", "--name", name])?;
    let left = leftovers(cli, port, &[(sup, "openshell-supervisor"), (vm, vmm_program(cli.vmm)), (passt, "passt")]);
    if stop.code != Some(0) || !left.is_empty() {
        return Err(format!("after vm stop: {left:?} left\n{}", stop.show()));
    }
    Ok(())
}

fn damaged_instance_files_are_named_and_recovered(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| damaged_files_in(cli))
}

/// The instance's files damaged under a running gateway, as a crash, a full disk or a careless
/// hand leaves them: `status`, `verify`, `logs`, `stop` and the next `vm run` each name what is
/// wrong and carry on (stop still stops, run repairs) instead of guessing or doing nothing.
/// Round 1: `metadata.json` truncated. Round 2: the console log deleted and the instance
/// directory opened to mode 755.
fn damaged_files_in(cli: &Cli) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let (name, port) = ("damaged", support::free_port());
    let inst = cli.instance(name);
    let _guard = StopOnDrop(inst.clone());
    cli.detach(name, port, &[])?;
    let (_, sup, vm, passt) = recorded_pids(&inst)?;

    // Round 1: metadata.json cut in half while the instance runs.
    let meta = std::fs::read(inst.metadata_path()).map_err(|e| e.to_string())?;
    std::fs::write(inst.metadata_path(), &meta[..meta.len() / 2]).map_err(|e| e.to_string())?;
    let st = cli.run(&["vm", "status", "--name", name, "--json"])?;
    let doc = st.json()?;
    expect_fields(
        &doc,
        "status --json with truncated metadata",
        &[("running", json!(true)), ("supervisor_pid", json!(sup))],
    )?;
    let problems = field(&doc, "problems")?.to_string();
    if st.code != Some(1) || !problems.contains("metadata.json is truncated") {
        return Err(format!("status must name the truncated metadata.json (and exit 1, not SERVING):\n{}", st.show()));
    }
    let text = cli.run(&["vm", "status", "--name", name])?;
    if !text.stdout.contains("problem: ") || !text.stdout.contains("metadata.json is truncated") {
        return Err(format!("plain status does not name the problem:\n{}", text.show()));
    }
    let verify = cli.run(&["verify", "--json", "--name", name])?;
    let error = verify.json()?.get("error").and_then(Value::as_str).unwrap_or_default().to_owned();
    if verify.code != Some(2) || !error.contains("is not valid metadata") {
        return Err(format!("verify with truncated metadata must exit 2 naming it:\n{}", verify.show()));
    }
    let stop = cli.run(&["vm", "stop", "--name", name])?;
    if stop.code != Some(0) || !stop.stderr.contains(&format!("gateway {name:?}: stopped")) {
        return Err(format!("vm stop must stop a running instance whose metadata is truncated:\n{}", stop.show()));
    }
    let left = leftovers(cli, port, &[(sup, "openshell-supervisor"), (vm, vmm_program(cli.vmm)), (passt, "passt")]);
    if !left.is_empty() || inst.locked() {
        return Err(format!("left running after vm stop: {left:?} (locked: {})", inst.locked()));
    }
    let st = cli.run(&["vm", "status", "--name", name, "--json"])?;
    let doc = st.json()?;
    expect_fields(
        &doc,
        "status --json of the stopped instance",
        &[("running", json!(false)), ("health", json!("not running"))],
    )?;
    let up = cli.detach(name, port, &[])?;
    let aside = inst.dir.join("metadata.json.unreadable");
    let log = std::fs::read_to_string(inst.dir.join("supervisor.log")).unwrap_or_default();
    if !up.stderr.contains("metadata.json is truncated") || !log.contains("moved it to") || !aside.is_file() {
        return Err(format!(
            "the next vm run must say it replaced the truncated metadata (kept at {}):\n{}\n{log}",
            aside.display(),
            up.show()
        ));
    }
    let (_, sup, vm, passt) = recorded_pids(&inst)?;

    // Round 2: the console log deleted and the directory opened to others.
    std::fs::remove_file(inst.console_path()).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&inst.dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    let st = cli.run(&["vm", "status", "--name", name, "--json"])?;
    let doc = st.json()?;
    let problems = field(&doc, "problems")?.to_string();
    if st.code != Some(0) || !problems.contains("is gone (deleted?)") || !problems.contains("is mode 755, not 700") {
        return Err(format!("status must stay SERVING and name the deleted console and the mode:\n{}", st.show()));
    }
    let logs = cli.run(&["vm", "logs", "--name", name])?;
    if logs.code != Some(1) || !logs.stderr.contains("is gone (deleted?)") {
        return Err(format!("vm logs must say the console log is gone:\n{}", logs.show()));
    }
    let verify = cli.run(&["verify", "--json", "--name", name])?;
    let doc = verify.json()?;
    let rows = matrix_doc(&doc, &format!("verify gateway {name}"), verify.code)?;
    if verify.code != Some(1) || row(rows, "console-clean")?["status"] != "FAIL" {
        return Err(format!("verify must fail its console row when the console is gone:\n{}", verify.show()));
    }
    let stop = cli.run(&["vm", "stop", "--name", name])?;
    let left = leftovers(cli, port, &[(sup, "openshell-supervisor"), (vm, vmm_program(cli.vmm)), (passt, "passt")]);
    if stop.code != Some(0) || !left.is_empty() {
        return Err(format!("after vm stop: {left:?} left\n{}", stop.show()));
    }
    cli.detach(name, port, &[])?;
    let mode = std::fs::metadata(&inst.dir).map_err(|e| e.to_string())?.permissions().mode() & 0o777;
    let log = std::fs::read_to_string(inst.dir.join("supervisor.log")).unwrap_or_default();
    if mode != 0o700 || !log.contains("was mode 755; set back to 700") || !inst.console_path().is_file() {
        return Err(format!("the next vm run must restore mode 700 (is {mode:o}) and a console log:\n{log}"));
    }
    let st = cli.run(&["vm", "status", "--name", name, "--json"])?;
    if st.code != Some(0) || st.json()?.get("problems").is_some() {
        return Err(format!("after the repairing run, status must be SERVING with no problems:\n{}", st.show()));
    }
    let (_, sup, vm, passt) = recorded_pids(&inst)?;
    cli.run(&["vm", "stop", "--name", name])?;
    let left = leftovers(cli, port, &[(sup, "openshell-supervisor"), (vm, vmm_program(cli.vmm)), (passt, "passt")]);
    if !left.is_empty() {
        return Err(format!("left running at the end: {left:?}"));
    }
    Ok(())
}

fn reset_replaces_the_pki(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| reset_replaces_the_pki_in(cli))
}

fn root_disk_keeps_its_data_disk_until_reset(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| root_disk_keeps_its_data_disk_until_reset_in(cli))
}

/// `debugfs` on a data disk (e2fsprogs): `-w` to write.
fn debugfs(image: &Path, write: bool, request: &str) -> Result<String, String> {
    let mut c = Command::new("debugfs");
    if write {
        c.arg("-w");
    }
    let out = c.args(["-R", request]).arg(image).output().map_err(|e| format!("debugfs: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Through the real flags: `vm run --root disk --disk-size` makes the data disk, `vm stop` leaves
/// it (unmounted clean by the guest), a warm `vm run --root disk` boots the same disk, and
/// `vm run --reset --root disk` starts from a new one. The host marks the disk between boots
/// (a file written into it with debugfs) to tell the same disk from a new one.
fn root_disk_keeps_its_data_disk_until_reset_in(cli: &Cli) -> Result<(), String> {
    let (name, port) = ("disk", support::free_port());
    let inst = cli.instance(name);
    let _guard = StopOnDrop(inst.clone());
    let data = inst.vm_dir().join(openshell_vm::DATA_DISK_FILE);
    let stop = || -> Result<(), String> {
        let stop = cli.run(&["vm", "stop", "--name", name])?;
        if stop.code != Some(0) {
            return Err(format!(
                "vm stop:
{}",
                stop.show()
            ));
        }
        Ok(())
    };
    cli.detach(name, port, &["--root", "disk", "--disk-size", "128M"])?;
    let size = std::fs::metadata(&data).map_err(|e| format!("no data disk at {}: {e}", data.display()))?.len();
    if size != 128 << 20 {
        return Err(format!("--disk-size 128M made a data disk of {size} bytes"));
    }
    stop()?;
    // needs_recovery is set while the guest has it mounted; its unmount at power-off clears it.
    let stats = debugfs(&data, false, "stats")?;
    let features = stats.lines().find(|l| l.starts_with("Filesystem features:")).unwrap_or("");
    if features.is_empty() || features.contains("needs_recovery") {
        return Err(format!("after vm stop the data disk was not unmounted cleanly:\n{stats}"));
    }
    debugfs(&data, true, "write /etc/hostname host-mark")?;
    cli.detach(name, port, &["--root", "disk"])?;
    stop()?;
    if !debugfs(&data, false, "ls -l /")?.contains("host-mark") {
        return Err("a warm `vm run --root disk` did not boot the same data disk (the host's mark is gone)".into());
    }
    cli.detach(name, port, &["--reset", "--root", "disk"])?;
    stop()?;
    let listing = debugfs(&data, false, "ls -l /")?;
    if listing.contains("host-mark") || !listing.contains("upper") {
        return Err(format!(
            "after `vm run --reset --root disk` the data disk is not a new one used by the guest:\n{listing}"
        ));
    }
    Ok(())
}

/// Every file under `dir` whose bytes are exactly `bytes`.
fn files_holding(dir: &Path, bytes: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            found.extend(files_holding(&p, bytes));
        } else if std::fs::read(&p).is_ok_and(|b| b == bytes) {
            found.push(p);
        }
    }
    found
}

fn health(
    endpoint: &str,
    bundle: &openshell_gateway::ClientBundle,
) -> Result<openshell_gateway::ServingStatus, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let ch = openshell_gateway::connect(endpoint, bundle, "localhost").await.map_err(|e| e.to_string())?;
        openshell_gateway::health(&ch).await.map_err(|e| e.to_string())
    })
}

fn reset_replaces_the_pki_in(cli: &Cli) -> Result<(), String> {
    let (name, port) = ("reset", support::free_port());
    let inst = cli.instance(name);
    let _guard = StopOnDrop(inst.clone());
    cli.detach(name, port, &[])?;
    let old = inst.client_bundle().map_err(|e| e.to_string())?;
    let stop = cli.run(&["vm", "stop", "--name", name])?;
    if stop.code != Some(0) {
        return Err(format!("vm stop:\n{}", stop.show()));
    }
    let up = cli.detach(name, port, &["--reset"])?;
    if !up.stderr.contains("new PKI") {
        return Err(format!("`vm run --reset` does not say it made a new PKI:\n{}", up.show()));
    }
    let new = inst.client_bundle().map_err(|e| e.to_string())?;
    if new.ca_pem == old.ca_pem || new.key_pem == old.key_pem {
        return Err("after --reset the instance still has its old CA or client key".into());
    }
    // The old PKI is gone: no file of the instance holds it, and the new gateway refuses it.
    for (what, bytes) in [("CA", &old.ca_pem), ("client key", &old.key_pem), ("client certificate", &old.cert_pem)] {
        let still = files_holding(&inst.dir, bytes.as_bytes());
        if !still.is_empty() {
            return Err(format!("the old {what} survived --reset in {still:?}"));
        }
    }
    let endpoint = format!("127.0.0.1:{port}");
    // First the new bundle is served on this endpoint: the proof that what follows is the live
    // gateway judging the old PKI, not a dead port that would fail every client alike.
    match health(&endpoint, &new) {
        Ok(openshell_gateway::ServingStatus::Serving) => {}
        other => return Err(format!("the reset gateway does not answer its new client bundle: {other:?}")),
    }
    use openshell_gateway::probe::{AlertDescription, CertificateError, RustlsError};
    use openshell_gateway::{TlsOutcome, TlsProbe};
    let probe = |p: &TlsProbe| openshell_gateway::probe(&endpoint, p, OLD_PKI_PROBE_GUARD).map_err(|e| e.to_string());
    // The old client certificate, offered to a client that trusts the new server (so this side
    // goes through): the gateway itself must refuse it. The old CA bears the new one's name (both
    // are the instance's), so the verifier finds an issuer of that name and its signature check
    // refuses: decrypt_error, as `mtls.rs` shows for a namesake CA on loopback.
    let new_trust = TlsProbe::with_bundle(&new, "localhost");
    let old_identity = TlsProbe { identity: Some((old.cert_pem.clone(), old.key_pem.clone())), ..new_trust };
    match probe(&old_identity)? {
        TlsOutcome::Refused { alert: AlertDescription::DecryptError, after_handshake: true } => {}
        other => {
            return Err(format!(
                "the reset gateway did not refuse the old client certificate with its decrypt_error alert: {other}"
            ))
        }
    }
    // And a host still holding the whole old bundle does not take the new gateway for its own:
    // the new server certificate names the old CA's namesake as issuer, whose signature fails.
    match probe(&TlsProbe::with_bundle(&old, "localhost"))? {
        TlsOutcome::ClientRejected(RustlsError::InvalidCertificate(CertificateError::BadSignature)) => Ok(()),
        other => Err(format!("a client with the old CA did not reject the reset gateway's certificate: {other}")),
    }
}

/// Each TLS step's hang guard in the old-PKI probes, not the property (the outcome is).
const OLD_PKI_PROBE_GUARD: Duration = Duration::from_secs(60);

fn ready_timeout_expiry_leaves_nothing_running(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| ready_timeout_in(cli))
}

fn ready_timeout_in(cli: &Cli) -> Result<(), String> {
    let (name, port) = ("never-ready", support::free_port());
    let inst = cli.instance(name);
    let _guard = StopOnDrop(inst.clone());
    // The instance's client bundle comes from another CA than its server: the gateway boots and
    // listens, but no readiness probe ever completes a handshake, however fast the host. So the
    // ready timeout expires for sure, with a live VM to clean up. The timeout itself is long enough
    // for the slowest boot here (a libkrun guest inside the nested host) to get to listening.
    const READY_TIMEOUT_S: u64 = 30;
    inst.ensure_pki().map_err(|e| e.to_string())?;
    let foreign = openshell_pki::Pki::generate("foreign").map_err(|e| e.to_string())?;
    foreign.write_client_bundle(&inst.mtls_dir()).map_err(|e| e.to_string())?;
    let publish = format!("{port}:30051");
    let r = cli.run(&[
        "vm",
        "run",
        "--name",
        name,
        "-p",
        &publish,
        "--vmm",
        cli.vmm,
        "--ready-timeout",
        &READY_TIMEOUT_S.to_string(),
    ])?;
    // The error ends with the console's last 50 lines: a contiguous run of the console file, as
    // long as it has that many, and the console shows a VM that booted and got as far as listening.
    let console = std::fs::read_to_string(inst.console_path()).unwrap_or_default();
    let console: Vec<&str> = console.lines().collect();
    let mut shown: Vec<&str> = match r.stderr.split_once("--- console (last 50 lines) ---\n") {
        Some((_, t)) => t.lines().collect(),
        None => Vec::new(),
    };
    while shown.last().is_some_and(|l| l.is_empty()) {
        shown.pop();
    }
    let ok = r.code == Some(1)
        && r.stderr.contains(&format!("not SERVING within {READY_TIMEOUT_S}s"))
        && !shown.is_empty()
        && shown.len() == console.len().min(50)
        && console.windows(shown.len()).any(|w| w == shown.as_slice())
        && console.iter().any(|l| l.contains("exec /usr/bin/openshell-gateway"))
        && openshell_vm::timeline::gateway_listening(&console.join("\n"));
    if !ok {
        return Err(format!(
            "an expired --ready-timeout must exit 1 with the last {} lines of a console that got to the gateway listening \
             (console has {} lines, the error showed {}):\n{}",
            console.len().min(50),
            console.len(),
            shown.len(),
            r.show()
        ));
    }
    let left = leftovers(cli, port, &[]);
    if !left.is_empty() || inst.locked() {
        return Err(format!("left running after the ready timeout: {left:?} (instance locked: {})", inst.locked()));
    }
    if inst.read_metadata().is_some_and(|m| m.vm_pid.is_some() || m.supervisor_pid.is_some()) {
        return Err("metadata.json records pids of a gateway that never became ready".into());
    }
    Ok(())
}

/// Bound on how long the supervisor may take to notice a dead child and stop the rest: a hang
/// guard only (the time taken is printed, not asserted).
const NOTICE_LIMIT: Duration = Duration::from_secs(60);

/// Polls `done` until it holds or `limit` passes; returns how long it took, or `what` with the
/// last state `done` described. `done` fails outright (outer `Err`) on a state that cannot lead
/// to success.
fn wait_until(
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> Result<Result<(), String>, String>,
) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        match done().map_err(|e| format!("not {what}: {e}"))? {
            Ok(()) => return Ok(t.elapsed()),
            Err(e) if t.elapsed() > limit => return Err(format!("{what} within {}s: {e}", limit.as_secs())),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn kill9(pid: u32) -> Result<(), String> {
    // A pid this trial read from the instance's metadata and just checked.
    if let Err(e) = openshell_vm::child::signal(pid, nix::sys::signal::Signal::SIGKILL) {
        return Err(format!("kill -9 {pid}: {e}"));
    }
    Ok(())
}

/// Kills the `victim` child ("passt" or "vm") of a detached gateway with SIGKILL, and checks that
/// the supervisor stops the rest and exits, and that `vm status` (plain and `--json`) says which
/// child died and how, with nothing running.
fn child_killed_in(cli: &Cli, victim: &str) -> Result<(), String> {
    let (name, port) = (format!("{victim}-killed"), support::free_port());
    let inst = cli.instance(&name);
    let _guard = StopOnDrop(inst.clone());
    cli.detach(&name, port, &[])?;
    let (_, sup, vm, passt) = recorded_pids(&inst)?;
    let (pid, child, prog) =
        if victim == "passt" { (passt, "passt", "passt") } else { (vm, "vmm", vmm_program(cli.vmm)) };
    if !procfs::process(pid).program_is_any(&[prog]) {
        return Err(format!("recorded {victim} pid {pid} is not a live {prog}"));
    }
    kill9(pid)?;
    let pids = [(sup, "openshell-supervisor"), (vm, vmm_program(cli.vmm)), (passt, "passt")];
    let took = wait_until(NOTICE_LIMIT, &format!("nothing of the instance left after kill -9 of {victim}"), || {
        let mut left = leftovers(cli, port, &pids);
        // A zombie is no leftover for `leftovers`, but one the supervisor never reaped is a bug.
        left.extend(
            pids.iter()
                .filter(|(p, _)| std::fs::metadata(format!("/proc/{p}")).is_ok())
                .map(|(p, what)| format!("{what} pid {p} (maybe a zombie)")),
        );
        if inst.locked() {
            left.push("the instance lock is held".into());
        }
        Ok(if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) })
    })?;
    eprintln!("kill -9 {victim} → nothing of the instance left after {:.2}s", took.as_secs_f64());

    let st = cli.run(&["vm", "status", "--name", &name, "--json"])?;
    let doc = st.json()?;
    if st.code != Some(1) {
        return Err(format!("status of a failed instance must exit 1:\n{}", st.show()));
    }
    check_status_stopped(&doc, &name, port)?;
    let failure = field(&doc, "failure")?;
    expect_fields(failure, "status --json failure", &[("child", json!(child)), ("signal", json!(9))])?;
    let at =
        field(failure, "at_unix")?.as_u64().ok_or_else(|| format!("failure.at_unix is not a number: {failure}"))?;
    let now = openshell_instance::state::now_unix();
    if at == 0 || at > now {
        return Err(format!("failure.at_unix {at} is not a time before now ({now})"));
    }
    if doc.get("stale").is_some() {
        return Err(format!("the supervisor left stale pids behind: {doc:#}"));
    }

    let text = cli.run(&["vm", "status", "--name", &name])?;
    let said = if child == "vmm" { "the VMM" } else { "passt" };
    let want = [
        format!("failed: {said} exited (signal 9) at "),
        "nothing left running".to_owned(),
        format!("start it again with cargo xtask vm run --name {name}"),
    ];
    if text.code != Some(1) || want.iter().any(|w| !text.stdout.contains(w.as_str())) || text.stdout.contains("Some(") {
        return Err(format!(
            "plain status of a failed instance must say {want:?} and no Rust Debug forms:\n{}",
            text.show()
        ));
    }
    let log = std::fs::read_to_string(inst.dir.join("supervisor.log")).map_err(|e| format!("supervisor.log: {e}"))?;
    let last = format!("exit code {}", 128 + 9);
    if !log.contains(&format!(
        "vm: {}",
        if child == "vmm" { "the VMM was killed by signal 9" } else { "passt exited (signal 9)" }
    )) || !log.contains(&last)
    {
        return Err(format!("supervisor.log does not end with the cause and {last}:\n{}", support::tail(&log, 20)));
    }
    Ok(())
}

fn passt_killed_fails_the_instance_and_status_says_why(
    _: &Artifacts,
    vmm: VmmChoice,
    dir: TrialDir,
) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| child_killed_in(cli, "passt"))
}

fn vmm_killed_fails_the_instance_and_status_says_why(
    _: &Artifacts,
    vmm: VmmChoice,
    dir: TrialDir,
) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| child_killed_in(cli, "vm"))
}

fn restart_on_failure_brings_the_gateway_back(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| restart_in(cli))
}

/// The first restart's pause in [`restart_in`] (`vm run --restart-backoff-ms`).
const RESTART_BACKOFF: Duration = Duration::from_secs(20);

fn restart_in(cli: &Cli) -> Result<(), String> {
    let (name, port) = ("restarted", support::free_port());
    let inst = cli.instance(name);
    let guard = StopOnDrop(inst.clone());
    // Restart 1 after 20 s, restart 2 after 40 s (not production's 1, 2 s): `vm status` and
    // `vm stop` below must land inside restart 2's pause, and 40 s holds them on any host this
    // runs on, so the trial asserts their order, not how fast the host is.
    let backoff_ms = RESTART_BACKOFF.as_millis().to_string();
    cli.detach(name, port, &["--restart", "on-failure", "--restart-backoff-ms", &backoff_ms])?;
    let (_, sup, vm, passt) = recorded_pids(&inst)?;
    kill9(passt)?;
    // Back when the same supervisor recorded a new VMM and passt.
    let took = wait_until(Duration::from_secs(180), "the gateway booted again", || {
        if !procfs::process(sup).alive {
            return Err(format!("the supervisor {sup} exited instead of restarting"));
        }
        Ok(match recorded_pids(&inst) {
            Ok((_, s, v, p)) if s == sup && v != vm && p != passt => Ok(()),
            Ok((_, s, v, p)) => Err(format!("supervisor {s}, vm {v}, passt {p}")),
            Err(e) => Err(e),
        })
    })?;
    eprintln!("kill -9 passt → SERVING again after {:.2}s", took.as_secs_f64());
    let gone = [(vm, vmm_program(cli.vmm)), (passt, "passt")];
    let left: Vec<String> = gone
        .iter()
        .filter(|(p, _)| std::fs::metadata(format!("/proc/{p}")).is_ok())
        .map(|(p, w)| format!("{w} pid {p}"))
        .collect();
    if !left.is_empty() {
        return Err(format!("the first boot's processes are still there (or unreaped) after the restart: {left:?}"));
    }
    let endpoint = format!("127.0.0.1:{port}");
    let bundle = inst.client_bundle().map_err(|e| e.to_string())?;
    let h = health(&endpoint, &bundle)?;
    if h != openshell_gateway::ServingStatus::Serving {
        return Err(format!("the restarted gateway at {endpoint} says {h:?}"));
    }
    let st = cli.run(&["vm", "status", "--name", name, "--json"])?;
    if st.code != Some(0) {
        return Err(format!("status of the restarted instance must exit 0:\n{}", st.show()));
    }
    let doc = st.json()?;
    check_status_serving(cli, &doc, name, port)?;
    expect_fields(&doc, "status --json of a restarted instance", &[("failure", Value::Null)])?;
    let log = std::fs::read_to_string(inst.dir.join("supervisor.log")).map_err(|e| format!("supervisor.log: {e}"))?;
    if !log.contains("restart 1/5 after passt exited (signal 9)") || !log.contains("restart 1/5: SERVING again") {
        return Err(format!("supervisor.log does not log the restart with its cause:\n{}", support::tail(&log, 20)));
    }
    // A file, not a terminal: no colour escapes; and each line says which instance and boot.
    if log.contains('\x1b') || !log.contains(&format!("gateway{{name={name} boot=1}}")) {
        return Err(format!(
            "supervisor.log has colour escapes or lines without the instance's span:\n{}",
            support::tail(&log, 20)
        ));
    }
    // A second failure, and `vm stop` during restart 2's pause (2 x RESTART_BACKOFF): the
    // instance stops and nothing boots again.
    let (_, sup, vm, passt) = recorded_pids(&inst)?;
    kill9(passt)?;
    let log_path = inst.dir.join("supervisor.log");
    // The pause the supervisor says is the one this trial asked for, on the line of the cause
    // ("restart 2/5 after passt exited (signal 9) at HH:MM:SS UTC: booting again in 40.0s").
    let (cause, pause) = (
        "restart 2/5 after passt exited (signal 9) at ",
        format!(": booting again in {:.1}s", (2 * RESTART_BACKOFF).as_secs_f64()),
    );
    wait_until(NOTICE_LIMIT, "the supervisor logged restart 2", || {
        let log = std::fs::read_to_string(&log_path).map_err(|e| format!("supervisor.log: {e}"))?;
        Ok(if log.lines().any(|l| l.contains(cause) && l.ends_with(&pause)) {
            Ok(())
        } else {
            Err(support::tail(&log, 5))
        })
    })?;
    // During the backoff, status says so rather than "running" with no VM.
    let st = cli.run(&["vm", "status", "--name", name])?;
    let said = ["restarting in ", "after passt exited (signal 9)", "(restart 2/5)"];
    if st.code != Some(1) || !said.iter().all(|s| st.stdout.contains(s)) || st.stdout.contains("Some(") {
        return Err(format!("vm status during restart 2's backoff must say {said:?} and exit 1:\n{}", st.show()));
    }
    let stop = cli.run(&["vm", "stop", "--name", name])?;
    if stop.code != Some(0) || !stop.stderr.contains(&format!("gateway {name:?}: stopped")) {
        return Err(format!("vm stop of the restarting instance:\n{}", stop.show()));
    }
    let left = leftovers(cli, port, &[(sup, "openshell-supervisor"), (vm, vmm_program(cli.vmm)), (passt, "passt")]);
    if !left.is_empty() || inst.locked() {
        return Err(format!("left running after vm stop: {left:?} (instance locked: {})", inst.locked()));
    }
    let log = std::fs::read_to_string(inst.dir.join("supervisor.log")).map_err(|e| format!("supervisor.log: {e}"))?;
    if log.contains("restart 2/5: SERVING again") {
        return Err(format!("the gateway booted again after vm stop:\n{}", support::tail(&log, 20)));
    }
    drop(guard);
    Ok(())
}

fn sigint_stops_a_foreground_run(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| sigint_in(cli))
}

fn sigint_in(cli: &Cli) -> Result<(), String> {
    let (name, port) = ("foreground", support::free_port());
    let inst = cli.instance(name);
    let publish = format!("{port}:30051");
    let args = ["vm", "run", "--name", name, "-p", &publish, "--vmm", cli.vmm];
    let mut cmd = cli.command(&args);
    // Its own process group, like a shell's foreground job: Ctrl-C signals the whole group.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut run = cli.spawn_with(cmd, &args)?;
    run.wait_for(support::GUEST_TIMEOUT, |_, err| err.contains("Ctrl-C stops it."))?;
    let (_, sup, vm, passt) = recorded_pids(&inst)?;
    if sup != run.child.0.id() {
        return Err(format!("metadata names supervisor {sup}, but the foreground run is pid {}", run.child.0.id()));
    }
    // The process group of the child this trial started.
    let group = nix::unistd::Pid::from_raw(run.child.0.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT);
    let ran = run.wait(Duration::from_secs(60))?;
    // Ctrl-C asks the guest to stop: the gateway shuts down cleanly on SIGTERM, init reports its
    // exit 0 and powers off, and `vm run` exits with what the guest reported (not a made-up 130).
    let guest_side = ["stop requested by the host: stopping the workload", "exit-code=0; powering off"];
    if ran.code != Some(0)
        || !guest_side.iter().all(|l| ran.stdout.contains(l))
        || !ran.stderr.contains("the guest reported exit code 0")
    {
        return Err(format!(
            "a foreground `vm run` stopped by Ctrl-C must stop its guest and exit with the guest's 0:\n{}",
            ran.show()
        ));
    }
    let left = leftovers(cli, port, &[(vm, vmm_program(cli.vmm)), (passt, "passt")]);
    if !left.is_empty() || inst.locked() {
        return Err(format!("left running after Ctrl-C: {left:?} (instance locked: {})", inst.locked()));
    }
    let st = cli.run(&["vm", "status", "--name", name, "--json"])?;
    if st.code != Some(1) {
        return Err(format!("status after Ctrl-C must exit 1:\n{}", st.show()));
    }
    check_status_stopped(&st.json()?, name, port)
}

/// The shape every matrix document shares (`check`, `check --guest`, `verify`): `{subject, ok,
/// exit_code, rows: [{id, status, required, reason, fix?}]}`, `ok` and `exit_code` agreeing with
/// each other, with the rows and with the process's exit code. Returns the rows.
fn matrix_doc<'a>(doc: &'a Value, subject: &str, code: Option<i32>) -> Result<&'a Vec<Value>, String> {
    let rows = field(doc, "rows")?.as_array().ok_or_else(|| format!("rows is not an array: {doc}"))?;
    let mut blocking = false;
    for r in rows {
        let id = field(r, "id")?.as_str().filter(|s| !s.is_empty());
        let status = field(r, "status")?.as_str();
        let required = field(r, "required")?.as_bool();
        let reason = field(r, "reason")?.as_str().filter(|s| !s.is_empty());
        let (Some(_), Some(status), Some(required), Some(_)) = (id, status, required, reason) else {
            return Err(format!("malformed row {r}"));
        };
        if !["PASS", "WARN", "FAIL"].contains(&status) {
            return Err(format!("row status {status:?} in {r}"));
        }
        if status != "PASS" && r.get("fix").and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err(format!("a {status} row without a fix: {r}"));
        }
        blocking |= required && status == "FAIL";
    }
    let want = if blocking { 1 } else { 0 };
    expect_fields(doc, subject, &[("subject", json!(subject)), ("ok", json!(!blocking)), ("exit_code", json!(want))])?;
    if code != Some(want) {
        return Err(format!("{subject}: the process exited {code:?}, its document says exit_code {want}"));
    }
    Ok(rows)
}

fn row<'a>(rows: &'a [Value], id: &str) -> Result<&'a Value, String> {
    rows.iter().find(|r| r["id"] == id).ok_or_else(|| format!("no {id:?} row"))
}

fn verify_exit_codes_and_json(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| verify_in(cli))
}

fn verify_in(cli: &Cli) -> Result<(), String> {
    // Exit 2: nothing to verify, and the document says so.
    for args in [&["verify", "--json"][..], &["verify", "--json", "--name", "nosuch"][..]] {
        let r = cli.run(args)?;
        let doc = r.json()?;
        let error = doc.get("error").and_then(Value::as_str).unwrap_or_default();
        if r.code != Some(2) || doc["ok"] != json!(false) || doc["exit_code"] != json!(2) || error.is_empty() {
            return Err(format!(
                "`{}` with nothing to verify must exit 2 with {{ok: false, exit_code: 2, error}}:\n{}",
                r.args,
                r.show()
            ));
        }
    }
    let (name, port) = ("verified", support::free_port());
    let inst = cli.instance(name);
    let _guard = StopOnDrop(inst.clone());
    cli.detach(name, port, &[])?;
    // Exit 0: the active instance (no --name) passes every row.
    let r = cli.run(&["verify", "--json"])?;
    let doc = r.json()?;
    let rows = matrix_doc(&doc, &format!("verify gateway {name}"), r.code)?;
    let ids: Vec<&str> = rows.iter().filter_map(|r| r["id"].as_str()).collect();
    if r.code != Some(0) || ids != crate::verify::ROWS || rows.iter().any(|r| r["status"] != "PASS") {
        return Err(format!("verify of a healthy gateway must pass rows {:?}:\n{}", crate::verify::ROWS, r.show()));
    }
    // Exit 1: its forward dies with passt, and the supervisor, noticing, ends the instance (the
    // in-process `gateway::verify_fails_when_forward_is_closed` covers a live VM without forward).
    let (_, _, _, passt) = recorded_pids(&inst)?;
    if procfs::process(passt).program_is_any(&["passt"]) {
        kill9(passt)?;
    }
    wait_until(NOTICE_LIMIT, "the instance ended after passt was killed", || {
        Ok(if support::tcp_listeners(port).is_empty() && !inst.locked() {
            Ok(())
        } else {
            Err(format!("port {port} listens or the lock is held"))
        })
    })?;
    let r = cli.run(&["verify", "--json", "--name", name])?;
    let doc = r.json()?;
    let rows = matrix_doc(&doc, &format!("verify gateway {name}"), r.code)?;
    let tcp = row(rows, "tcp")?;
    if r.code != Some(1)
        || tcp["status"] != "FAIL"
        || tcp["required"] != json!(true)
        || row(rows, "supervisor")?["status"] != "FAIL"
    {
        return Err(format!(
            "verify with the forward gone must exit 1 with failing tcp and supervisor rows:\n{}",
            r.show()
        ));
    }
    Ok(())
}

/// A store of this trial's own with copies of the artifacts (`cp -a`: the manifest still
/// describes the copy), laid out as the shared one: `<kind>/<key>/`.
fn own_store(a: &Artifacts, dir: &Path, with_kernel: bool) -> Result<PathBuf, String> {
    let cache = dir.join("cache");
    let mut copies = vec![(a.rootfs.clone(), openshell_artifacts::rootfs::STORE_KIND)];
    if with_kernel {
        copies.push((
            a.kernel.parent().ok_or("the kernel path has no directory")?.to_owned(),
            openshell_artifacts::kernel::STORE_KIND,
        ));
    }
    for (from, kind) in copies {
        let key = from.file_name().ok_or_else(|| format!("{} has no key directory", from.display()))?;
        std::fs::create_dir_all(cache.join(kind)).map_err(|e| e.to_string())?;
        support::copy(&from, &cache.join(kind).join(key))?;
    }
    Ok(cache)
}

/// Changes `/etc/hostname` in a rootfs: returns (file, recorded digest, found digest), computed
/// here independently of the code under test.
fn tamper(rootfs: &Path) -> Result<(PathBuf, Digest, Digest), String> {
    let file = rootfs.join("etc/hostname");
    let recorded = sha256_file(&file).map_err(|e| e.to_string())?;
    std::fs::write(&file, "tampered\n").map_err(|e| e.to_string())?;
    let found = sha256_file(&file).map_err(|e| e.to_string())?;
    Ok((file, recorded, found))
}

fn check_exit_codes_and_json(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    // `check` boots nothing, and `check --guest` must refuse the tampered rootfs before booting.
    dir.expect_refusal_before_boot();
    in_cli(dir, vmm, |cli| check_in(a, cli))
}

fn check_in(a: &Artifacts, cli: &mut Cli) -> Result<(), String> {
    let cache = own_store(a, &cli.dir, true)?;
    cli.cache = Some(cache.clone());
    let own_rootfs = cache.join("rootfs").join(a.rootfs.file_name().unwrap());
    let own_kernel = cache.join("kernel").join(a.kernel.parent().unwrap().file_name().unwrap()).join("vmlinux");
    let port = support::free_port();
    let check = |cli: &Cli| {
        let r = cli.run(&["check", "--json", "--vmm", cli.vmm, "--port", &port.to_string()])?;
        let doc = r.json()?;
        matrix_doc(&doc, "host", r.code)?;
        Ok::<_, String>((r, doc))
    };

    // Exit 0: this host boots with this backend, the artifacts match their records, the port is free.
    let (r, doc) = check(cli)?;
    let rows = doc["rows"].as_array().unwrap();
    let mut required = vec!["vmm", "kernel", "rootfs", "gateway-port", "disk"];
    if cfg!(target_os = "linux") {
        required.push("passt");
    }
    for id in &required {
        row(rows, id)?;
    }
    let pass = |id: &str, mentions: &str| {
        let r = row(rows, id)?;
        let ok = r["status"] == "PASS"
            && r["required"] == json!(true)
            && r["reason"].as_str().is_some_and(|s| s.contains(mentions));
        ok.then_some(()).ok_or_else(|| format!("the {id} row should PASS naming {mentions:?}: {r}"))
    };
    pass("kernel", &own_kernel.to_string_lossy())?;
    pass("rootfs", &own_rootfs.to_string_lossy())?;
    pass("gateway-port", &format!("127.0.0.1:{port} is free"))?;
    if r.code != Some(0) {
        return Err(format!("check on a host that boots with --vmm {} must exit 0:\n{}", cli.vmm, r.show()));
    }
    let kernel_sha = sha256_file(&a.kernel).map_err(|e| e.to_string())?.hex();
    let manifest_sha =
        openshell_artifacts::rootfs::RootfsBundle::open(&a.rootfs).map_err(|e| e.to_string())?.digest().hex();
    let prov = field(&doc, "provenance")?;
    if prov["kernel"]["vmlinux_sha256"] != json!(kernel_sha) || prov["rootfs"]["manifest_sha256"] != json!(manifest_sha)
    {
        return Err(format!(
            "provenance does not carry the artifacts' digests {kernel_sha} / {manifest_sha}: {prov:#}"
        ));
    }

    // Exit 1: the gateway's port is taken.
    let held = std::net::TcpListener::bind(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let (r, doc) = check(cli)?;
    drop(held);
    let p = row(doc["rows"].as_array().unwrap(), "gateway-port")?.clone();
    if r.code != Some(1)
        || p["status"] != "FAIL"
        || p["required"] != json!(true)
        || !p["reason"].as_str().unwrap_or_default().contains("in use")
    {
        return Err(format!("check with port {port} taken must exit 1 on a failing gateway-port row:\n{}", r.show()));
    }

    // Exit 1: a rootfs file changed after it was baked; the row names it and both digests.
    let (file, recorded, found) = tamper(&own_rootfs)?;
    let (r, doc) = check(cli)?;
    let f = row(doc["rows"].as_array().unwrap(), "rootfs")?.clone();
    let reason = f["reason"].as_str().unwrap_or_default();
    let named =
        [file.to_string_lossy().into_owned(), recorded.hex(), found.hex()].iter().all(|s| reason.contains(s.as_str()));
    if r.code != Some(1)
        || f["status"] != "FAIL"
        || !named
        || !f["fix"].as_str().unwrap_or_default().contains("cargo xtask rootfs")
    {
        return Err(format!(
            "check with a tampered rootfs must exit 1 naming {} and both digests:\n{}",
            file.display(),
            r.show()
        ));
    }

    // Exit 2: `check --guest` cannot run its checker on that rootfs: it refuses to boot it, says
    // why in the document, and no VM is started.
    let r = cli.run(&["check", "--guest", "--json", "--vmm", cli.vmm])?;
    let doc = r.json()?;
    let error = doc.get("error").and_then(Value::as_str).unwrap_or_default();
    let ok = r.code == Some(2)
        && doc["subject"] == "guest"
        && doc["ok"] == json!(false)
        && doc["exit_code"] == json!(2)
        && error.contains(&file.to_string_lossy().into_owned());
    if !ok {
        return Err(format!("check --guest on a tampered rootfs must exit 2 naming the file:\n{}", r.show()));
    }
    let started = support::processes_mentioning(&cli.dir.to_string_lossy());
    if !started.is_empty() {
        return Err(format!("check --guest started processes on a tampered rootfs: {started:?}"));
    }
    // The shared store was only read.
    if sha256_file(&a.rootfs.join("etc/hostname")).map_err(|e| e.to_string())? != recorded {
        return Err(format!("the shared rootfs {} changed", a.rootfs.display()));
    }
    Ok(())
}

fn rootfs_check_detects_a_tampered_file(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    dir.expect_no_vm();
    in_cli(dir, vmm, |cli| rootfs_check_in(a, cli))
}

fn rootfs_check_in(a: &Artifacts, cli: &mut Cli) -> Result<(), String> {
    // Nothing baked: exit 1, saying what builds it.
    cli.cache = Some(cli.dir.join("empty-cache"));
    let r = cli.run(&["rootfs", "--check"])?;
    if r.code != Some(1) || !r.stderr.contains("no rootfs has been baked") || !r.stderr.contains("cargo xtask rootfs") {
        return Err(format!(
            "rootfs --check with nothing baked must exit 1 and name `cargo xtask rootfs`:\n{}",
            r.show()
        ));
    }
    let cache = own_store(a, &cli.dir, false)?;
    cli.cache = Some(cache.clone());
    let own = cache.join("rootfs").join(a.rootfs.file_name().unwrap());
    let r = cli.run(&["rootfs", "--check"])?;
    if r.code != Some(0) || !r.stdout.contains("verified") || !r.stdout.contains(&own.to_string_lossy().into_owned()) {
        return Err(format!(
            "rootfs --check of an intact copy in OPENSHELL_CACHE_DIR must exit 0 naming it:\n{}",
            r.show()
        ));
    }
    let (file, recorded, found) = tamper(&own)?;
    let r = cli.run(&["rootfs", "--check"])?;
    let names = [
        own.to_string_lossy().into_owned(),
        "etc/hostname".into(),
        recorded.hex(),
        found.hex(),
        "cargo xtask rootfs".into(),
    ];
    if r.code != Some(1) || !names.iter().all(|n| r.stderr.contains(n.as_str())) {
        return Err(format!(
            "rootfs --check of a tampered {} must exit 1 naming it, both digests and the fix:\n{}",
            file.display(),
            r.show()
        ));
    }
    if sha256_file(&a.rootfs.join("etc/hostname")).map_err(|e| e.to_string())? != recorded {
        return Err(format!("the shared rootfs {} changed", a.rootfs.display()));
    }
    Ok(())
}

fn kernel_json_is_the_provenance(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    dir.expect_no_vm();
    in_cli(dir, vmm, |cli| kernel_json_in(a, cli))
}

fn kernel_json_in(a: &Artifacts, cli: &Cli) -> Result<(), String> {
    let r = cli.run(&["kernel", "--json"])?;
    let doc = r.json()?;
    if r.code != Some(0) {
        return Err(format!("kernel --json:\n{}", r.show()));
    }
    let recorded: Value = std::fs::read(a.kernel.with_file_name("provenance.json"))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))?;
    if doc != recorded {
        return Err(format!("kernel --json is not the kernel's provenance.json:\n{doc:#}\nvs\n{recorded:#}"));
    }
    // Field by field, against what the trial finds itself.
    let sha = sha256_file(&a.kernel).map_err(|e| e.to_string())?.hex();
    let frags: Vec<&str> =
        field(&doc, "fragments")?.as_array().into_iter().flatten().filter_map(|f| f["name"].as_str()).collect();
    let ok = doc["vmlinux_sha256"] == json!(sha)
        && doc["kernel_release"].as_str().is_some_and(|s| s.starts_with("6.1."))
        && doc["source_package"] == "linux-source-6.1"
        && doc["source_version"].as_str().is_some_and(|s| s.starts_with("6.1"))
        && doc["key"].as_str().is_some_and(|s| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()))
        && doc["built_at_unix"].as_u64().is_some_and(|t| t > 1_600_000_000)
        && doc["build_seconds"].as_f64().is_some_and(|s| s > 0.0)
        && doc["host"].as_str().is_some_and(|s| !s.is_empty())
        && ["microvm.config", "k8s-networking.config"].iter().all(|f| frags.contains(f));
    if !ok {
        return Err(format!("kernel --json fields do not describe {} (sha256 {sha}):\n{doc:#}", a.kernel.display()));
    }
    Ok(())
}

fn bench_boot_json(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| bench_in(cli))
}

fn bench_in(cli: &Cli) -> Result<(), String> {
    let r = cli.run(&["bench", "boot", "-n", "1", "--vmm", cli.vmm, "--json"])?;
    let doc = r.json()?;
    if r.code != Some(0) {
        return Err(format!("bench boot -n 1:\n{}", r.show()));
    }
    for mode in ["cold", "warm"] {
        let phases = field(&doc, mode)?.as_object().ok_or_else(|| format!("{mode} is not an object: {doc}"))?;
        for (phase, s) in phases {
            let num = |k: &str| s.get(k).and_then(Value::as_f64);
            // One boot: median, min and max are that boot's figure.
            let ok = s["n"] == json!(1)
                && num("median").is_some_and(|m| m >= 0.0 && Some(m) == num("min") && Some(m) == num("max"));
            if !ok {
                return Err(format!("{mode} / {phase}: want {{median = min = max, n: 1}}, got {s}"));
            }
        }
        let serving = phases.get("host: boot → mTLS SERVING").and_then(|s| s["median"].as_f64());
        let guest = phases.keys().filter(|k| k.starts_with("guest: ")).count();
        if !serving.is_some_and(|ms| ms > 0.0) || guest == 0 {
            return Err(format!("{mode}: no boot → SERVING figure or no guest phase:\n{doc:#}"));
        }
        println!("bench {mode}: boot → mTLS SERVING {:.0} ms", serving.unwrap());
    }
    // Its instances live in a temporary directory under the trial's TMPDIR.
    let left = support::processes_mentioning(&cli.dir.to_string_lossy());
    if !left.is_empty() {
        return Err(format!("the bench left processes running: {left:?}"));
    }
    Ok(())
}

fn bench_boots_pass_the_preflight_like_vm_run(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    // The bench boots the way `vm run` does (lock, recovery, preflight, launch, readiness), so a
    // rootfs that no longer matches its record stops it before any VMM starts, as it stops `vm run`.
    dir.expect_refusal_before_boot();
    in_cli(dir, vmm, |cli| bench_preflight_in(a, cli))
}

fn bench_preflight_in(a: &Artifacts, cli: &mut Cli) -> Result<(), String> {
    let cache = own_store(a, &cli.dir, true)?;
    cli.cache = Some(cache.clone());
    let own_rootfs = cache.join("rootfs").join(a.rootfs.file_name().unwrap());
    let (file, recorded, found) = tamper(&own_rootfs)?;
    let r = cli.run(&["bench", "boot", "-n", "1", "--vmm", cli.vmm, "--json"])?;
    let names = [
        "refusing to boot".to_owned(),
        file.to_string_lossy().into_owned(),
        recorded.hex(),
        found.hex(),
        "--allow-unverified".to_owned(),
    ];
    if r.code != Some(1) || !names.iter().all(|n| r.stderr.contains(n.as_str())) {
        return Err(format!(
            "bench boot on a tampered rootfs must be refused by the preflight (exit 1, naming {} and both \
             digests) before any VMM starts:\n{}",
            file.display(),
            r.show()
        ));
    }
    // A disk root is baked from the tree: a tree changed since its manifest is refused before
    // the bake seals it into an image under the digest it no longer has. Asked of QEMU's bench:
    // the bench boots disk roots on QEMU only, and the krun twin runs inside L1, whose xtask
    // bakes nothing.
    if cli.vmm == "qemu" {
        let r = cli.run(&["bench", "boot", "-n", "1", "--vmm", cli.vmm, "--root", "disk", "--json"])?;
        let names = ["refusing to bake a root disk from".to_owned(), own_rootfs.to_string_lossy().into_owned()];
        if r.code != Some(1)
            || !names.iter().all(|n| r.stderr.contains(n.as_str()))
            || !r.stderr.contains("etc/hostname")
        {
            return Err(format!("bench boot --root disk on a tampered rootfs must refuse to bake it:\n{}", r.show()));
        }
        if cache.join(openshell_artifacts::disk::STORE_KIND).exists() {
            return Err("the refused bake left a root disk in the store".to_owned());
        }
    }
    let left = support::processes_mentioning(&cli.dir.to_string_lossy());
    if !left.is_empty() {
        return Err(format!("the refused bench left processes running: {left:?}"));
    }
    Ok(())
}

/// The `openshell-vm-*` temporary state directories `vm run --exec` made under the trial's TMPDIR.
fn exec_temp_dirs(cli: &Cli) -> Vec<PathBuf> {
    std::fs::read_dir(cli.dir.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("openshell-vm-"))
        .map(|e| e.path())
        .collect()
}

fn exec_exit_code_and_the_kept_state_dir(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| exec_exit_code_in(cli))
}

/// `vm run --exec` as the README shows it: the guest command's exit code (3) is the process's,
/// its output is on stdout, and the temporary state directory is gone after. A guest that ends
/// without reporting a code (`reboot -f` bypasses init) is an error that keeps that directory and
/// names it, with the console inside.
fn exec_exit_code_in(cli: &Cli) -> Result<(), String> {
    let r = cli.run(&[
        "vm",
        "run",
        "--vmm",
        cli.vmm,
        "--exec",
        "/bin/sh",
        "--",
        "-c",
        "echo hello from $(uname -r); exit 3",
    ])?;
    if r.code != Some(3)
        || !r.stdout.lines().any(|l| l.trim().starts_with("hello from 6."))
        || !r.stderr.contains("the guest reported exit code 3")
    {
        return Err(format!("`vm run --exec` must exit with the guest's 3 and show its output:\n{}", r.show()));
    }
    let left = exec_temp_dirs(cli);
    if !left.is_empty() {
        return Err(format!("a successful --exec run left its temporary state directory: {left:?}"));
    }

    let r = cli.run(&["vm", "run", "--vmm", cli.vmm, "--net", "none", "--exec", "/bin/sh", "--", "-c", "reboot -f"])?;
    let kept = exec_temp_dirs(cli);
    // "(state directory kept for inspection: PATH)"
    let named = r
        .stderr
        .split_once("state directory kept for inspection: ")
        .and_then(|(_, p)| p.split_once(')'))
        .map(|(p, _)| PathBuf::from(p));
    let ok = r.code == Some(1)
        && r.stderr.contains("the guest ended without reporting an exit code")
        && kept.len() == 1
        && named.as_ref() == kept.first()
        && kept[0].join("console.log").is_file();
    if !ok {
        return Err(format!(
            "a guest that reports no exit code must fail (exit 1) naming its kept state directory (found {kept:?}), \
             which holds the console:\n{}",
            r.show()
        ));
    }
    let left = support::processes_mentioning(&cli.dir.to_string_lossy());
    if !left.is_empty() {
        return Err(format!("left running after the --exec runs: {left:?}"));
    }
    Ok(())
}

fn exec_ctrl_c_grace_and_second_ctrl_c(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| exec_ctrl_c_in(cli))
}

/// The workload of [`exec_ctrl_c_in`]: it unmounts the share (lazily, so init keeps running) and
/// ignores SIGTERM, so neither init nor the workload can answer the host's stop request and only
/// the host's own grace or a second Ctrl-C can end the run.
const DEAF_WORKLOAD: &str = "umount -l /run/openshell; trap '' TERM INT; echo workload-deaf; while :; do sleep 1; done";

/// `vm run --exec` stopped by Ctrl-C (SIGINT to its process group, as a terminal sends it) when
/// the guest cannot answer: (1) one Ctrl-C, and the host stops the VMM once its grace is over;
/// (2) a second Ctrl-C after the stop request was made, and the host stops it then. Each exits
/// 130 (128 + SIGINT, the host's own code) and its last line says which, with the time it waited;
/// nothing is left running.
fn exec_ctrl_c_in(cli: &Cli) -> Result<(), String> {
    for second in [false, true] {
        let args = ["vm", "run", "--vmm", cli.vmm, "--net", "none", "--exec", "/bin/sh", "--", "-c", DEAF_WORKLOAD];
        let mut cmd = cli.command(&args);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut run = cli.spawn_with(cmd, &args)?;
        run.wait_for(support::GUEST_TIMEOUT, |out, _| out.contains("workload-deaf"))?;
        let group = nix::unistd::Pid::from_raw(run.child.0.id() as i32);
        let asked = Instant::now();
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT);
        if second {
            // Once the host has asked the guest to stop (its request is in the share), Ctrl-C again.
            wait_until(NOTICE_LIMIT, "the host wrote its stop request into the share", || {
                Ok(match exec_temp_dirs(cli).iter().any(|d| d.join("share/stop-request").is_file()) {
                    true => Ok(()),
                    false => Err(format!("no share/stop-request under {:?}", exec_temp_dirs(cli))),
                })
            })?;
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT);
        }
        let ran = run.wait(Duration::from_secs(120))?;
        let took = asked.elapsed();
        let last = ran.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().to_owned();
        let says = if second { "a second signal came " } else { "the guest reported no exit code within " };
        // The figure the line gives: how long the host waited after asking the guest to stop.
        let waited: Option<f64> = last.split_once(says).and_then(|(_, r)| r.split_once('s')?.0.parse().ok());
        let grace = 10.0;
        let ok = ran.code == Some(130)
            && last.starts_with("vm: stopped after signal 2: ")
            && last.contains("(exit code 130 is the host's)")
            // The grace is a lower bound, which holds however slow the host: the host waited it out
            // before stopping the VMM. The second Ctrl-C must not have waited for it.
            && waited.is_some_and(|w| if second { w < grace } else { w >= grace && took.as_secs_f64() >= grace });
        if !ok {
            return Err(format!(
                "`vm run --exec` with a guest deaf to the stop request, {}, must exit 130 saying {says:?} and how long \
                 it waited (the last line says {waited:?} s; {:.1} s passed here):\n{}",
                if second { "then a second Ctrl-C" } else { "after one Ctrl-C" },
                took.as_secs_f64(),
                ran.show()
            ));
        }
        support::note(format!(
            "--exec Ctrl-C{}: exit 130 after {:.1} s: {last}",
            if second { " twice" } else { " once" },
            took.as_secs_f64()
        ));
    }
    let left = support::processes_mentioning(&cli.dir.to_string_lossy());
    if !left.is_empty() {
        return Err(format!("left running after the stopped --exec runs: {left:?}"));
    }
    Ok(())
}

/// Restarts `--restart on-failure` makes before it gives up (`supervise::Restart::ON_FAILURE`).
const MAX_RESTARTS: u32 = 5;

fn restart_on_failure_gives_up_after_5(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| gives_up_in(cli))
}

/// Waits until restart number `restart` is SERVING: the supervisor `sup` has recorded a VMM and
/// passt other than `vm` and `passt` and logged it (it logs after recording); fails if the
/// supervisor exits meanwhile.
fn wait_for_reboot(inst: &GatewayInstance, restart: u32, sup: u32, vm: u32, passt: u32) -> Result<(u32, u32), String> {
    let mut got = (0, 0);
    let logged = format!("restart {restart}/{MAX_RESTARTS}: SERVING again");
    wait_until(Duration::from_secs(180), &format!("restart {restart} booted the gateway again"), || {
        if !procfs::process(sup).alive {
            return Err(format!("the supervisor {sup} exited instead of restarting"));
        }
        let log = std::fs::read_to_string(inst.dir.join("supervisor.log")).unwrap_or_default();
        Ok(match recorded_pids(inst) {
            Ok((_, s, v, p)) if s == sup && v != vm && p != passt && log.contains(&logged) => {
                got = (v, p);
                Ok(())
            }
            Ok((_, s, v, p)) => Err(format!("supervisor {s}, vm {v}, passt {p}")),
            Err(e) => Err(e),
        })
    })?;
    Ok(got)
}

/// passt killed 6 times under `--restart on-failure` (first pause 100 ms): the supervisor boots
/// the gateway again 5 times, then gives up on the 6th death: it exits, nothing of any boot is
/// left, and `vm status` says it failed, why, and that it gave up after 5 restarts.
fn gives_up_in(cli: &Cli) -> Result<(), String> {
    let (name, port) = ("gives-up", support::free_port());
    let inst = cli.instance(name);
    let _guard = StopOnDrop(inst.clone());
    cli.detach(name, port, &["--restart", "on-failure", "--restart-backoff-ms", "100"])?;
    let (_, sup, mut vm, mut passt) = recorded_pids(&inst)?;
    let mut pids = vec![(sup, "openshell-supervisor")];
    for restart in 1..=MAX_RESTARTS {
        pids.extend([(vm, vmm_program(cli.vmm)), (passt, "passt")]);
        kill9(passt)?;
        (vm, passt) = wait_for_reboot(&inst, restart, sup, vm, passt)?;
    }
    pids.extend([(vm, vmm_program(cli.vmm)), (passt, "passt")]);
    kill9(passt)?;
    wait_until(NOTICE_LIMIT, "the supervisor gave up and nothing of the instance is left", || {
        let mut left = leftovers(cli, port, &pids);
        if inst.locked() {
            left.push("the instance lock is held".into());
        }
        Ok(if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) })
    })?;
    let st = cli.run(&["vm", "status", "--name", name, "--json"])?;
    let doc = st.json()?;
    check_status_stopped(&doc, name, port)?;
    expect_fields(&doc, "status --json after giving up", &[("gave_up_after_restarts", json!(MAX_RESTARTS))])?;
    expect_fields(
        field(&doc, "failure")?,
        "status --json failure",
        &[("child", json!("passt")), ("signal", json!(9))],
    )?;
    if st.code != Some(1) || doc.get("restarting").is_some() {
        return Err(format!("status after giving up must exit 1 with no restart pending:\n{}", st.show()));
    }
    let text = cli.run(&["vm", "status", "--name", name])?;
    let want = [
        "failed: passt exited (signal 9) at ",
        &format!("gave up after {MAX_RESTARTS} restarts"),
        "nothing left running",
    ];
    if text.code != Some(1) || !want.iter().all(|w| text.stdout.contains(w)) {
        return Err(format!("plain status after giving up must say {want:?}:\n{}", text.show()));
    }
    let log = std::fs::read_to_string(inst.dir.join("supervisor.log")).map_err(|e| format!("supervisor.log: {e}"))?;
    let gave_up = "passt exited (signal 9) at ";
    if !log.lines().any(|l| l.contains(gave_up) && l.contains(&format!("gave up after {MAX_RESTARTS} restarts")))
        || log.contains(&format!("restart {}/", MAX_RESTARTS + 1))
    {
        return Err(format!(
            "supervisor.log must end with the cause and `gave up after {MAX_RESTARTS} restarts`, and no restart {}:\n{}",
            MAX_RESTARTS + 1,
            support::tail(&log, 20)
        ));
    }
    Ok(())
}

fn stop_during_a_restarts_boot_abandons_it(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| stop_during_boot_in(cli))
}

/// The supervisor's children running `program`, other than `not`.
fn children_running(sup: u32, program: &str, not: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let p = procfs::process(pid);
            pid != not && p.ppid == Some(sup) && p.program_is_any(&[program])
        })
        .collect()
}

/// `vm stop` while a restart's boot is in progress: the restarted VMM is held (SIGSTOP) as soon
/// as the supervisor starts it, so the boot cannot finish whatever the host's speed; `vm stop`
/// must then end the instance without waiting for that boot (which would never be ready): the
/// supervisor abandons it, stops the held VMM and its passt, and exits; nothing is left, and the
/// restart never reports SERVING.
fn stop_during_boot_in(cli: &Cli) -> Result<(), String> {
    use nix::sys::signal::{kill, Signal};
    let (name, port) = ("stopped-booting", support::free_port());
    let inst = cli.instance(name);
    let _guard = StopOnDrop(inst.clone());
    cli.detach(name, port, &["--restart", "on-failure", "--restart-backoff-ms", "100"])?;
    let (_, sup, mut vm, mut passt) = recorded_pids(&inst)?;
    let mut pids = vec![(sup, "openshell-supervisor")];
    let log_path = inst.dir.join("supervisor.log");
    // The VMM must be held before its gateway is ready. That takes the guest a whole boot, against
    // one scan of /proc here; should the guest ever win, the restart is SERVING and the next one
    // is tried (the supervisor allows 5).
    let mut held = None;
    for restart in 1..=3 {
        pids.extend([(vm, vmm_program(cli.vmm)), (passt, "passt")]);
        kill9(passt)?;
        let mut new_vm = 0;
        wait_until(NOTICE_LIMIT, "the supervisor started the restart's VMM", || {
            if !procfs::process(sup).alive {
                return Err(format!("the supervisor {sup} exited instead of restarting"));
            }
            new_vm = children_running(sup, vmm_program(cli.vmm), vm).first().copied().unwrap_or(0);
            Ok(if new_vm != 0 { Ok(()) } else { Err("no new VMM child yet".into()) })
        })?;
        kill(nix::unistd::Pid::from_raw(new_vm as i32), Signal::SIGSTOP)
            .map_err(|e| format!("SIGSTOP {new_vm}: {e}"))?;
        pids.push((new_vm, vmm_program(cli.vmm)));
        // Ready before it was held: the supervisor records its pids, then logs it.
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let recorded = inst.read_metadata().and_then(|m| m.vm_pid) == Some(new_vm);
        if !recorded && !log.contains(&format!("restart {restart}/{MAX_RESTARTS}: SERVING again")) {
            held = Some((restart, new_vm));
            break;
        }
        support::note(format!("restart {restart}'s gateway was ready before its VMM could be held; trying the next"));
        let _ = kill(nix::unistd::Pid::from_raw(new_vm as i32), Signal::SIGCONT);
        (vm, passt) = wait_for_reboot(&inst, restart, sup, vm, passt)?;
    }
    let Some((restart, held_vm)) = held else {
        return Err("three restarts in a row were SERVING before their VMM could be held".into());
    };
    pids.extend(children_running(sup, "passt", 0).into_iter().map(|p| (p, "passt")));
    let stop = cli.run(&["vm", "stop", "--name", name])?;
    if stop.code != Some(0) || !stop.stderr.contains(&format!("gateway {name:?}: stopped")) {
        return Err(format!("vm stop during restart {restart}'s boot (VMM {held_vm} held):\n{}", stop.show()));
    }
    let left = leftovers(cli, port, &pids);
    if !left.is_empty() || inst.locked() || procfs::process(sup).alive {
        return Err(format!(
            "left running after vm stop: {left:?} (instance locked: {}, supervisor alive: {})",
            inst.locked(),
            procfs::process(sup).alive
        ));
    }
    let log = std::fs::read_to_string(&log_path).map_err(|e| format!("supervisor.log: {e}"))?;
    let abandoned =
        format!("restart {restart}/{MAX_RESTARTS}: stopped by signal 15 during its boot, which was abandoned");
    if !log.contains(&abandoned) || log.contains(&format!("restart {restart}/{MAX_RESTARTS}: SERVING again")) {
        return Err(format!(
            "supervisor.log must say {abandoned:?} and no SERVING for it:\n{}",
            support::tail(&log, 20)
        ));
    }
    Ok(())
}

/// `cargo xtask bench ARGS --json` through the CLI: its one JSON document, or why not. The bench
/// boots its own VMs in its own temporary directories, under the trial's TMPDIR.
pub(crate) fn bench_json(cli: &Cli, args: &[&str]) -> Result<Value, String> {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.push("--json");
    let r = cli.spawn(&all)?.wait(Duration::from_secs(600))?;
    if r.code != Some(0) {
        return Err(format!("the bench failed:\n{}", r.show()));
    }
    let doc = r.json()?;
    let left = support::processes_mentioning(&cli.dir.to_string_lossy());
    if !left.is_empty() {
        return Err(format!("`xtask {}` left processes running: {left:?}", r.args));
    }
    support::note(format!("xtask {}: {doc}", r.args));
    Ok(doc)
}

/// A positive, finite number at `path` (`/`-separated keys) in `doc`.
pub(crate) fn positive(doc: &Value, path: &str) -> Result<f64, String> {
    let v = path.split('/').fold(doc, |d, k| &d[k]);
    v.as_f64()
        .filter(|x| x.is_finite() && *x > 0.0)
        .ok_or_else(|| format!("{path} is {v}, not a positive number, in {doc:#}"))
}

/// A number at `path` that is 0 or more.
fn non_negative(doc: &Value, path: &str) -> Result<f64, String> {
    let v = path.split('/').fold(doc, |d, k| &d[k]);
    v.as_f64()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .ok_or_else(|| format!("{path} is {v}, not a number of 0 or more, in {doc:#}"))
}

/// `lo <= hi`, or an error naming both; every figure positive.
fn ordered(doc: &Value, names: &[&str]) -> Result<(), String> {
    in_order(doc, names, names.iter().map(|n| positive(doc, n)).collect::<Result<_, _>>()?)
}

/// As [`ordered`], with figures that may be 0.
fn ordered_from_zero(doc: &Value, names: &[&str]) -> Result<(), String> {
    in_order(doc, names, names.iter().map(|n| non_negative(doc, n)).collect::<Result<_, _>>()?)
}

fn in_order(doc: &Value, names: &[&str], values: Vec<f64>) -> Result<(), String> {
    match values.windows(2).position(|w| w[0] > w[1]) {
        None => Ok(()),
        Some(i) => Err(format!("{} ({}) > {} ({}) in {doc:#}", names[i], values[i], names[i + 1], values[i + 1])),
    }
}

/// `a` and `b` agree to a part in a million (figures computed from one another).
fn agrees(what: &str, a: f64, b: f64) -> Result<(), String> {
    ((a - b).abs() <= 1e-6 * a.abs().max(b.abs())).then_some(()).ok_or_else(|| format!("{what}: {a} vs {b}"))
}

/// `bench many -n 2`: two gateways at once, each on its own port, with its figures; nothing left.
fn bench_many_json(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let doc = bench_json(cli, &["many", "-n", "2", "--vmm", cli.vmm])?;
        let instances = doc["instances"].as_array().ok_or_else(|| format!("no instances in {doc:#}"))?;
        if doc["n"] != json!(2) || instances.len() != 2 || instances[0]["endpoint"] == instances[1]["endpoint"] {
            return Err(format!("bench many -n 2 must report two gateways on two endpoints: {doc:#}"));
        }
        for i in instances {
            // VMM start → SERVING is inside the wall time from the start of all boots.
            ordered(i, &["ready_ms", "wall_ms"])?;
            ordered(i, &["vmm_rss_mib", "vmm_peak_rss_mib"])?;
            positive(i, "passt_rss_mib")?;
        }
        positive(&doc, "host_available_before_mib")?;
        positive(&doc, "host_available_after_mib")?;
        let left = support::processes_mentioning(&cli.dir.to_string_lossy());
        if !left.is_empty() {
            return Err(format!("bench many left processes running: {left:?}"));
        }
        Ok(())
    })
}

fn bench_exec_json(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let doc = bench_json(cli, &["exec", "-n", "1", "--vmm", cli.vmm])?;
        positive(&doc, "first_ms")?;
        let one = positive(&doc, "wall_ms/median")?;
        agrees("one run: median = min", one, positive(&doc, "wall_ms/min")?)?;
        agrees("one run: median = max", one, positive(&doc, "wall_ms/max")?)?;
        let command = doc["command"].as_str().unwrap_or_default();
        if doc["wall_ms"]["n"] != json!(1) || !command.ends_with(&format!("vm run --vmm {} --exec /bin/true", cli.vmm))
        {
            return Err(format!("bench exec -n 1: want n 1 of `vm run --vmm {} --exec /bin/true`: {doc:#}", cli.vmm));
        }
        Ok(())
    })
}

/// The one element of the JSON array `doc`, or `rule` with the document.
fn the_one<'a>(doc: &'a Value, rule: &str) -> Result<&'a Value, String> {
    match doc.as_array().map(Vec::as_slice) {
        Some([one]) => Ok(one),
        _ => Err(format!("{rule}: {doc:#}")),
    }
}

fn bench_load_json(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let doc = bench_json(cli, &["load", "--shape", "4x5", "--vmm", cli.vmm])?;
        let round = the_one(&doc, "bench load with one --shape must report one round")?;
        expect_fields(
            round,
            "bench load 4x5",
            &[("clients", json!(4)), ("rpcs_per_client", json!(5)), ("errors", json!(0)), ("rpcs_ok", json!(20))],
        )?;
        if round["error_kinds"] != json!([]) {
            return Err(format!("no errors, but error kinds: {round:#}"));
        }
        ordered(round, &["connect_p50_ms", "connect_max_ms"])?;
        ordered(round, &["rpc_p50_ms", "rpc_p99_ms", "rpc_max_ms"])?;
        // Rates are counts over their phase's wall.
        agrees("RPC/s", positive(round, "rpcs_per_s")?, 20.0 / (positive(round, "rpc_phase_ms")? / 1e3))?;
        agrees(
            "connections/s",
            positive(round, "new_connections_per_s")?,
            4.0 / (positive(round, "connect_phase_ms")? / 1e3),
        )
    })
}

fn bench_forward_json(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let doc = bench_json(cli, &["forward", "--round-trips", "20", "--mib", "2", "--vmm", cli.vmm])?;
        // What the guest's sink counted is what was sent: 2 MiB.
        let sent = 2 * 1024 * 1024;
        expect_fields(
            &doc,
            "bench forward",
            &[("round_trips", json!(20)), ("sink_bytes_sent", json!(sent)), ("sink_bytes_counted", json!(sent))],
        )?;
        // One round trip may read as 0 µs under a coarse clock (the nested host's); the mean over
        // the whole run may not.
        positive(&doc, "rtt_us/mean")?;
        ordered_from_zero(&doc, &["rtt_us/p50", "rtt_us/p99", "rtt_us/max"])?;
        agrees("MiB/s", positive(&doc, "sink_mib_per_s")?, 2.0 / positive(&doc, "sink_seconds")?)
    })
}

/// `bench disk` with small sizes: each root's phases are there and did the work asked (the
/// figures' values are not judged), the data-disk phases only on the disk root, and the rates
/// are the MiB over their phase's seconds. libkrun boots disks only inside the nested host, so
/// there the bench must refuse before any VMM starts, saying so.
fn bench_disk_json(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    const FILES: u64 = 50;
    const MIB: u64 = 4;
    let args = ["disk", "--files", "50", "--mib", "4", "--disk-size", "64"];
    if vmm == VmmChoice::Krun {
        dir.expect_refusal_before_boot();
        return in_cli(dir, vmm, |cli| {
            let mut all = vec!["bench"];
            all.extend_from_slice(&args);
            all.extend(["--vmm", cli.vmm, "--json"]);
            let r = cli.spawn(&all)?.wait(Duration::from_secs(600))?;
            if r.code == Some(0) || !r.stderr.contains("bench disk runs on qemu only") {
                return Err(format!("bench disk --vmm krun must refuse, naming qemu:\n{}", r.show()));
            }
            Ok(())
        });
    }
    in_cli(dir, vmm, |cli| {
        let mut all = args.to_vec();
        all.extend(["--vmm", cli.vmm]);
        let doc = bench_json(cli, &all)?;
        expect_fields(&doc, "bench disk", &[("files", json!(FILES)), ("mib", json!(MIB))])?;
        for root in ["share", "disk"] {
            for phase in ["find", "read", "create-tmpfs", "readback-tmpfs"] {
                positive(&doc, &format!("{root}/{phase}/seconds"))?;
                positive(&doc, &format!("{root}/{phase}/count"))?;
            }
            for phase in ["create-tmpfs", "readback-tmpfs"] {
                if doc[root][phase]["count"] != json!(FILES) {
                    return Err(format!("{root}: {phase} must count the {FILES} files made: {doc:#}"));
                }
            }
        }
        for phase in ["create-data-disk", "readback-data-disk", "dd-write", "dd-read"] {
            if !doc["share"][phase].is_null() {
                return Err(format!("a share root has no data disk, but reports {phase}: {doc:#}"));
            }
            positive(&doc, &format!("disk/{phase}/seconds"))?;
        }
        let counts = [("create-data-disk", FILES), ("readback-data-disk", FILES), ("dd-write", MIB), ("dd-read", MIB)];
        for (phase, want) in counts {
            if doc["disk"][phase]["count"] != json!(want) {
                return Err(format!("disk/{phase}/count must be {want}: {doc:#}"));
            }
        }
        for (rate, phase) in [("write", "dd-write"), ("read", "dd-read")] {
            let secs = positive(&doc, &format!("disk/{phase}/seconds"))?;
            agrees(
                &format!("data disk {rate} MiB/s"),
                positive(&doc, &format!("data_disk_mib_per_s/{rate}"))?,
                MIB as f64 / secs,
            )?;
        }
        Ok(())
    })
}

fn bench_soak_json(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let doc = bench_json(cli, &["soak", "-n", "2", "--vmm", cli.vmm])?;
        expect_fields(
            &doc,
            "bench soak -n 2",
            &[
                ("cycles", json!(2)),
                ("failures", json!(0)),
                ("first_failure", Value::Null),
                ("cycles_with_leftovers", json!(0)),
                ("first_leak", Value::Null),
                ("cleanup", json!("nothing left")),
            ],
        )?;
        let (before, after) = (&doc["before"], &doc["after"]);
        if after["processes"] != json!([]) || after["listeners"] != json!(0) || after["fds"] != before["fds"] {
            return Err(format!("bench soak counted leftovers: {doc:#}"));
        }
        // A cycle is its detach and its stop, so it takes longer than either.
        for part in ["detach_ms", "stop_ms"] {
            ordered(&doc, &[&format!("{part}/min"), &format!("{part}/median"), &format!("{part}/max")])?;
            ordered(&doc, &[&format!("{part}/median"), "cycle_ms/median"])?;
        }
        Ok(())
    })
}

fn bench_compare_json(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        // Ours is `--vmm auto`, which is the trial's backend where this runs (krun's runs only where
        // libkrun runs directly, where auto picks it).
        let doc = bench_json(cli, &["compare", "-n", "1"])?;
        expect_fields(&doc, "bench compare -n 1", &[("rounds", json!(1)), ("naive_qemu_failure", Value::Null)])?;
        let figures = doc["figures"].as_object().ok_or_else(|| format!("no figures object: {doc:#}"))?;
        let rows = [
            "ours cold: VMM start → SERVING",
            "ours warm: VMM start → SERVING",
            "container: podman run → SERVING",
            "ours warm: VMM start → init started",
            "naive q35 QEMU: start → init started",
        ];
        for row in rows {
            let f = figures.get(row).ok_or_else(|| format!("no {row:?} figure: {doc:#}"))?;
            let m = positive(f, "median_ms")?;
            if f["n"] != json!(1)
                || agrees("", m, positive(f, "min_ms")?).is_err()
                || agrees("", m, positive(f, "max_ms")?).is_err()
            {
                return Err(format!("{row}: one round must give n 1 and median = min = max: {f}"));
            }
        }
        let med = |row: &str| figures[row]["median_ms"].as_f64().unwrap_or(f64::NAN);
        // Our init line comes before our SERVING, in the same boot.
        if med(rows[3]) >= med(rows[1]) {
            return Err(format!("ours warm: init started after SERVING: {doc:#}"));
        }
        agrees(
            "ratio ours/container",
            positive(&doc, "ratio_ours_warm_serving_over_container")?,
            med(rows[1]) / med(rows[2]),
        )?;
        agrees("ratio ours/naive", positive(&doc, "ratio_ours_init_over_naive_qemu_init")?, med(rows[3]) / med(rows[4]))
    })
}

fn bench_memory_json(_: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    in_cli(dir, vmm, |cli| {
        let doc = bench_json(cli, &["memory", "--mem", "256", "--vmm", cli.vmm])?;
        let row = the_one(&doc, "bench memory --mem 256 must report one row")?;
        expect_fields(
            row,
            "bench memory",
            &[("mem_mib", json!(256)), ("failed", Value::Null), ("load_errors", json!(0))],
        )?;
        positive(row, "ready_ms")?;
        // The guest touched part of its 256 MiB, which is part of the VMM's RSS; the peak is at
        // least what was resident when it was read before it.
        ordered(row, &["guest_touched_mib", "vmm_rss_mib", "vmm_peak_rss_mib"])?;
        if positive(row, "guest_touched_mib")? > 256.0 {
            return Err(format!("the guest touched more than its 256 MiB: {row}"));
        }
        let (rss, guest) = (positive(row, "vmm_rss_mib")?, positive(row, "guest_touched_mib")?);
        agrees("VMM overhead = RSS - guest", positive(row, "vmm_overhead_mib")?, rss - guest)
    })
}

//! Prototype: the krun trials on a host where libkrun runs only nested
//! ([`KrunPlace::NestedL1`]). Each such trial boots its own L1 (the nested host, through the QEMU
//! backend) with this test binary, `openshell-vmm` and the guest artifacts shared in, runs
//! `<this binary> --exact krun::X --nocapture` inside it, and reports that inner run's result:
//! passed only when the inner run says exactly one trial passed, so an inner trial that was
//! ignored or filtered out fails here instead of passing silently.
//!
//! Inside L1, [`INSIDE_L1_ENV`] is set: the inner binary runs its krun trials itself (L1's facts
//! say hardware KVM there anyway) and never nests again. The `cli::` trials run the host's xtask
//! binary there, with the host's store shared read-only and `OPENSHELL_BUILD=never`: L1 has no
//! toolchain, so that xtask boots the artifacts the host built, pinned by their store keys.
//!
//! [`exec_mode`] (hooked into `main`, like the supervisor mode) runs one command in L2 from the host
//! and exits with its code: `OPENSHELL_NESTED_EXEC=1 <this binary> /bin/sh -c 'exit 42'` boots L1,
//! which boots L2 through `openshell_vm::launch` with `--vmm krun`, and prints both consoles and the
//! timings of each level. For proving and debugging the nested path by hand.

use std::path::PathBuf;
use std::time::Instant;

use libtest_mimic::Failed;
use openshell_vm::nested::{L1Paths, NestedHost};
use openshell_vm::KrunPlace;

use crate::support::{self, Artifacts, TrialDir};
use openshell_guest::SHARE_MOUNT;

/// Set inside L1 for the inner run.
pub const INSIDE_L1_ENV: &str = "OPENSHELL_NESTED_L1";
/// Selects [`exec_mode`].
const EXEC_ENV: &str = "OPENSHELL_NESTED_EXEC";
/// Upper bound for one L1 (boot, the inner trial with its own L2 boots, power-off) under TCG; below
/// nextest's e2e terminate-after (300 s), so a wedged L1 is reported with its console.
const L1_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(280);

pub fn inside_l1() -> bool {
    std::env::var_os(INSIDE_L1_ENV).is_some()
}

/// The nested host from `OPENSHELL_NESTED_KERNEL` / `OPENSHELL_NESTED_ROOT` (set by `cargo xtask e2e`).
fn nested_host() -> Result<NestedHost, String> {
    let get = |k: &str| std::env::var_os(k).map(PathBuf::from).filter(|p| p.exists());
    match (get("OPENSHELL_NESTED_KERNEL"), get("OPENSHELL_NESTED_ROOT")) {
        (Some(kernel), Some(root)) => Ok(NestedHost { kernel, root }),
        _ => Err("krun runs only nested here, and OPENSHELL_NESTED_KERNEL/OPENSHELL_NESTED_ROOT are not set to a built nested host; run `cargo xtask e2e --vm`".into()),
    }
}

/// A krun trial that runs inside its own L1.
pub struct NestedTrial {
    name: String,
    artifacts: Artifacts,
    host: NestedHost,
    vmm: PathBuf,
}

/// Where a krun trial runs on a host where libkrun runs only nested.
pub enum Route {
    /// Inside its own L1.
    Nested(NestedTrial),
    /// It would, but the nested host is missing (not built, no artifacts): the reason.
    Cannot(String),
    /// Never nested, by design: the reason (it stays ignored even where krun is required).
    NotNested(String),
}

/// Trials that cannot run inside L1, and why.
const NOT_NESTED: &[(&str, &str)] = &[
    (
        "krun::cli::bench_compare_json",
        "compares with the gateway in a podman container on the host; L1 has no podman, so it runs where libkrun runs directly",
    ),
    (
        "krun::image::bench_image_json",
        "removes its image's entries from the store for its cold runs; L1 has the host's store read-only, so it runs where libkrun runs directly",
    ),
    (
        "krun::image::its_tree_is_the_one_podman_run_sees",
        "compares with podman run of the same image on the host; L1 has no podman, so it runs where libkrun runs directly",
    ),
    (
        "krun::image::a_debian_image_built_here_runs_python_and_dpkg",
        "builds its image with mmdebstrap and podman on the host and bakes it into the store, which L1 has read-only, so it runs where libkrun runs directly",
    ),
    (
        "krun::gateway::sdk::",
        "runs the OpenShell SDK, a Python venv on the host that L1 does not carry; it runs where libkrun runs directly",
    ),
];

/// The hook: `krun::X` on a host where libkrun runs only nested becomes a trial that runs it in
/// L1. `None` leaves the trial to the caller (other backends, krun running directly, inside L1).
pub fn route(full: &str, place: &KrunPlace, artifacts: &Result<Artifacts, String>) -> Option<Route> {
    if !full.starts_with("krun::") || inside_l1() || *place != KrunPlace::NestedL1 {
        return None;
    }
    if let Some((_, why)) = NOT_NESTED.iter().find(|(prefix, _)| full.starts_with(prefix)) {
        return Some(Route::NotNested(format!("krun runs only nested here, and this trial {why}")));
    }
    let ready = artifacts.clone().and_then(|a| Ok((a, nested_host()?, vmm_binary()?)));
    Some(match ready {
        Ok((artifacts, host, vmm)) => Route::Nested(NestedTrial { name: full.to_owned(), artifacts, host, vmm }),
        Err(why) => Route::Cannot(why),
    })
}

/// What a nested trial needs made on the host first: L1 gets the host's store read-only and
/// builds nothing.
type HostStep = fn(&Artifacts, &TrialDir) -> Result<(), String>;
const ON_THE_HOST_FIRST: &[(&str, HostStep)] = &[("krun::image::", crate::image::bake_on_host)];

impl NestedTrial {
    pub fn run(self, dir: TrialDir) -> Result<(), Failed> {
        for (_, step) in ON_THE_HOST_FIRST.iter().filter(|(prefix, _)| self.name.starts_with(prefix)) {
            if let Err(e) = step(&self.artifacts, &dir) {
                return Err(dir.fail(e));
            }
        }
        run_trial(&self.name, &self.artifacts, &self.host, &self.vmm, dir)
    }
}

fn vmm_binary() -> Result<PathBuf, String> {
    std::env::var_os("OPENSHELL_VMM")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .ok_or_else(|| "OPENSHELL_VMM not set to the openshell-vmm binary; run `cargo xtask e2e --vm`".into())
}

/// What one L1 run gave back.
pub struct L1Run {
    pub code: i32,
    pub console: String,
    /// Host seconds from starting QEMU to L1's init starting the command.
    pub l1_ready_s: Option<f64>,
    pub total_s: f64,
}

/// Boots L1 running `argv` (the test binary's path inside L1 is prepended) with the guest
/// artifacts and `openshell-vmm` shared in and the environment the inner binary needs; its state
/// goes to `state` in the trial's directory. An error says why L1 itself gave nothing back.
pub fn run_in_l1(
    dir: &TrialDir,
    state: &str,
    a: &Artifacts,
    host: &NestedHost,
    vmm: &std::path::Path,
    argv: &[&str],
    extra_env: &[(&str, &str)],
) -> Result<L1Run, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this test binary: {e}"))?;
    let mut paths = L1Paths::default();
    // The supervisor binary too: the trials that detach a gateway start it inside L1.
    let supervisor = std::path::Path::new(env!("CARGO_BIN_EXE_openshell-supervisor"));
    // gvproxy for the `gvproxy::` trials, run inside L1 beside libkrun, read-only in a share of
    // its own. QEMU's microvm has 8 virtio-mmio transports: the VMM's directory (cargo's
    // `target/debug`) is shared first, so this binary (in its `deps/`) takes no share of its own.
    let gvproxy = std::env::var_os("OPENSHELL_GVPROXY").map(PathBuf::from).filter(|p| p.is_file());
    if let Some(dir) = vmm.parent() {
        paths.share_dir(dir);
    }
    // The host's store, read-only, before the guest's artifacts (which it holds, so they take no
    // shares of their own): the xtask binary of the `cli::` trials runs from it and builds nothing.
    let store = HostStore::of(a);
    let mut cli_env = Vec::new();
    if let Some(store) = &store {
        let inside = paths.share_dir(&store.root);
        // What else the trials take from the store, at its path inside L1.
        for var in [crate::support::DEBIAN_ROOT_ENV, crate::support::DEBIAN_ROOT_DISK_ENV] {
            let host_path = std::env::var_os(var).map(PathBuf::from);
            if let Some(rel) = host_path.as_deref().and_then(|p| p.strip_prefix(&store.root).ok()) {
                cli_env.push((var.to_owned(), format!("{inside}/{}", rel.display())));
            }
        }
        cli_env.push(("OPENSHELL_CACHE_DIR".to_owned(), inside));
        cli_env.push(("OPENSHELL_KERNEL_KEY".to_owned(), store.kernel_key.clone()));
        cli_env.push(("OPENSHELL_ROOTFS_KEY".to_owned(), store.rootfs_key.clone()));
        cli_env.push(("OPENSHELL_BUILD".to_owned(), "never".to_owned()));
    }
    let xtask = std::env::var_os("OPENSHELL_XTASK").map(PathBuf::from).filter(|p| p.is_file());
    let shared = paths.share_file(&me).and_then(|bin| {
        let mut env = paths.share_guest(&a.kernel, &a.rootfs, vmm)?;
        env.extend(cli_env);
        if let Some(xtask) = &xtask {
            env.push(("OPENSHELL_XTASK".into(), paths.share_file(xtask)?));
        }
        env.push(("OPENSHELL_SUPERVISOR".into(), paths.share_file(supervisor)?));
        if let Some(gvproxy) = &gvproxy {
            env.push(("OPENSHELL_GVPROXY".into(), paths.share_file(gvproxy)?));
        }
        Ok((bin, env))
    });
    let (bin, guest_env) = shared.map_err(|e| e.to_string())?;
    let env = [
        ("OPENSHELL_E2E_REQUIRE", "1"),
        // The inner run's trial records (its VMM ledger included) go to L1's own share; this
        // process adds its ledger lines to its own once L1 is done.
        ("OPENSHELL_E2E_RECORDS", INNER_RECORDS),
        (INSIDE_L1_ENV, "1"),
        // A panic's message, not its backtrace, must fit in the tail a failure report keeps.
        ("RUST_BACKTRACE", "0"),
    ];
    let env =
        guest_env.into_iter().chain(env.iter().chain(extra_env).map(|(k, v)| (k.to_string(), v.to_string()))).collect();
    let argv: Vec<String> = std::iter::once(bin).chain(argv.iter().map(|s| s.to_string())).collect();
    let cfg =
        host.l1_config(dir.path().join(state), argv, env, paths).map_err(|e| format!("cannot configure L1: {e}"))?;
    let inner_records = cfg.share_dir().join(INNER_RECORDS.trim_start_matches(&format!("{SHARE_MOUNT}/")));
    std::fs::create_dir_all(&inner_records).map_err(|e| format!("cannot create {}: {e}", inner_records.display()))?;
    let started = Instant::now();
    let mut vm = crate::support::launch(&cfg).map_err(|e| format!("L1 launch failed: {e}"))?;
    let mut clock = ConsoleClock::new(started, &[L1_EXEC], false);
    let code = vm.wait(Some(&mut clock), Some(L1_TIMEOUT));
    drop(vm);
    dir.adopt_nested_records(&inner_records);
    let console = std::fs::read_to_string(cfg.console_path()).unwrap_or_default();
    match code {
        Ok(openshell_vm::VmExit::Guest(code)) => {
            Ok(L1Run { code, console, l1_ready_s: clock.at(L1_EXEC), total_s: started.elapsed().as_secs_f64() })
        }
        Ok(other) => Err(format!("L1 did not report an exit code: {other}")),
        Err(e) => Err(format!("L1 did not report: {e}")),
    }
}

/// The store the guest's artifacts were taken from (`<root>/kernel/<key>/<image>` and
/// `<root>/rootfs/<key>`), and their keys; `None` when they do not sit in a store.
struct HostStore {
    root: PathBuf,
    kernel_key: String,
    rootfs_key: String,
}

impl HostStore {
    fn of(a: &Artifacts) -> Option<HostStore> {
        use openshell_artifacts::{kernel, rootfs};
        let kernel_dir = a.kernel.parent()?;
        let kinds = (kernel_dir.parent()?, a.rootfs.parent()?);
        let root = kinds.0.parent()?;
        let named = |dir: &std::path::Path, kind: &str| dir.file_name().is_some_and(|n| n == kind);
        if !named(kinds.0, kernel::STORE_KIND) || !named(kinds.1, rootfs::STORE_KIND) || kinds.1.parent()? != root {
            return None;
        }
        let key = |dir: &std::path::Path| Some(dir.file_name()?.to_string_lossy().into_owned());
        Some(HostStore { root: root.to_owned(), kernel_key: key(kernel_dir)?, rootfs_key: key(&a.rootfs)? })
    }
}

/// Where the inner run keeps its trial records: inside L1's own share (virtio-mmio slots on QEMU's
/// microvm are few, so no share of its own).
const INNER_RECORDS: &str = "/run/openshell/records";

/// Init's step once it starts the command, in L1 and in L2 alike.
const L1_EXEC: &str = "] exec /";

/// A console sink that records when each marker first appears (seconds since `started`), to time
/// a boot's phases from outside; printed, never asserted. Optionally echoes to stdout.
struct ConsoleClock {
    started: Instant,
    line: String,
    marks: Vec<(&'static str, Option<f64>)>,
    echo: bool,
}

impl ConsoleClock {
    fn new(started: Instant, markers: &[&'static str], echo: bool) -> ConsoleClock {
        ConsoleClock { started, line: String::new(), marks: markers.iter().map(|m| (*m, None)).collect(), echo }
    }

    fn at(&self, marker: &str) -> Option<f64> {
        self.marks.iter().find(|(m, _)| *m == marker).and_then(|(_, t)| *t)
    }
}

impl std::io::Write for ConsoleClock {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.echo {
            let mut out = std::io::stdout();
            out.write_all(data)?;
            out.flush()?;
        }
        let now = self.started.elapsed().as_secs_f64();
        self.line.push_str(&String::from_utf8_lossy(data));
        // Only the unfinished last line is kept; each complete line is checked once.
        while let Some(end) = self.line.find('\n') {
            let line: String = self.line.drain(..=end).collect();
            for (_, t) in self.marks.iter_mut().filter(|(m, t)| t.is_none() && line.contains(*m)) {
                *t = Some(now);
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn secs(t: Option<f64>) -> String {
    t.map_or("?".into(), |s| format!("{s:.2}"))
}

/// Hook for `main`: with `OPENSHELL_NESTED_EXEC=1`, run the arguments as a command in L2 and return
/// its exit code (on the host: through an L1 of its own; inside L1: through libkrun).
pub fn exec_mode() -> Option<i32> {
    std::env::var_os(EXEC_ENV)?;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = if inside_l1() { exec_in_l2(argv) } else { exec_via_l1(&argv) };
    Some(result.unwrap_or_else(|e| {
        eprintln!("nested exec: {e}");
        125
    }))
}

/// On the host: boot L1 running this binary in exec mode, print L1's console and timings.
fn exec_via_l1(argv: &[String]) -> Result<i32, String> {
    let a = support::artifacts()?;
    let (host, vmm) = (nested_host()?, vmm_binary()?);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let run = run_in_l1(&TrialDir::new("l1-exec"), "state", &a, &host, &vmm, &argv, &[(EXEC_ENV, "1")])?;
    print!("{}", run.console);
    println!(
        "L1 (QEMU TCG, host clock): init ran the command after {} s; L1 exited after {:.2} s with {}",
        secs(run.l1_ready_s),
        run.total_s,
        run.code
    );
    Ok(run.code)
}

/// Inside L1: boot L2 with libkrun through the library, echo its console, print its timings.
fn exec_in_l2(argv: Vec<String>) -> Result<i32, String> {
    let a = support::artifacts()?;
    let dir = tempfile::Builder::new().prefix("l2-").tempdir().map_err(|e| e.to_string())?;
    let mut cfg = openshell_vm::VmConfig::exec(a.kernel, a.rootfs, dir.path().join("state"), argv);
    cfg.vmm = openshell_vm::VmmChoice::Krun;
    let started = Instant::now();
    let mut vm = crate::support::launch(&cfg).map_err(|e| e.to_string())?;
    let vmm_started = started.elapsed().as_secs_f64();
    const INIT: &str = "] init started";
    let mut clock = ConsoleClock::new(started, &[INIT, L1_EXEC], true);
    let code = vm.wait(Some(&mut clock), Some(support::GUEST_TIMEOUT)).map_err(|e| e.to_string())?.code();
    let exited = started.elapsed().as_secs_f64();
    // The guest kernel is `quiet`, so its start shows only through init's stamp (L2's clock since
    // its kernel started) subtracted from when that line arrived.
    let console = std::fs::read_to_string(cfg.console_path()).unwrap_or_default();
    let init_ms =
        openshell_vm::timeline::guest_steps(&console).into_iter().find(|(_, s)| s == "init started").map(|(ms, _)| ms);
    let kernel = clock.at(INIT).zip(init_ms).map(|(t, ms)| t - ms as f64 / 1e3);
    println!(
        "L2 ({}, L1 clock): openshell-vmm started {vmm_started:.2} s, kernel started ~{} s, init {} s, command {} s, exit {exited:.2} s",
        vm.backend,
        secs(kernel),
        secs(clock.at(INIT)),
        secs(clock.at(L1_EXEC)),
    );
    Ok(code)
}

/// The faults of the nested path that get a second L1, seen under load only, in several trials,
/// on TCG's emulated SVM (causes not found): libkrun's VMM inside L1 exiting 0 while its guest
/// reported nothing, the guest's console cut off mid-run; and a guest that stays silent, not one
/// step of init on its console (`krun::cli::bench_forward_json` once in three runs), so it never
/// reached userspace and the trial's property was never tried. Our init reports every step and an
/// exit code before every power-off, so where libkrun runs directly either is a failure of ours,
/// and nothing retries it there. As `RunningVm::wait`, the readiness wait and the benches word them,
/// and, third, as the guest kernel words the cause of a silent console in the libkrun log the
/// report carries (hvc0 not up when the kernel opened the console: three trials in one full run
/// under load; init then opens it itself, which a retry does not replace); and, fourth, a trial
/// whose guest did its part (it wrote into the share) while the console stayed empty, so the
/// ledger cannot count it as booted (`krun::sandbox::vmm_and_passt_run_unprivileged`, once):
const NESTED_FAULTS: [&str; 5] = [
    "(VMM exit status: 0)",
    "the VM exited (exit status: 0)",
    openshell_vm::timeline::SILENT_GUEST,
    "Warning: unable to open an initial console.",
    crate::support::NO_USERSPACE,
];

/// The [`NESTED_FAULTS`] wording a failure report holds, if any.
fn nested_fault(report: &str) -> Option<&'static str> {
    NESTED_FAULTS.iter().copied().find(|s| report.contains(s))
}

/// The harness's own check that the retry is keyed on those faults alone, held to the library's
/// real wording of them (a VMM's exit status 0, a silent guest) and to the failures it must not take for them.
pub fn fault_trial() -> libtest_mimic::Trial {
    libtest_mimic::Trial::test("setup::nested_retry_is_for_the_nested_faults_alone", || {
        use std::os::unix::process::ExitStatusExt;
        let status = |code: i32| std::process::ExitStatus::from_raw(code << 8).to_string();
        let no_code = |code| {
            openshell_vm::VmError::NoExitCode { status: status(code), console: "c".into(), tail: String::new() }
                .to_string()
        };
        let not_ready = |code| format!("the VM exited ({}) before its workload was ready (mtls:30051)", status(code));
        let silent = format!("not SERVING within 60s (last: refused); {}", openshell_vm::timeline::SILENT_GUEST);
        let no_console = "--- vmm.log (last 15 lines) ---\nprintk: bootconsole [earlyser0] enabled\nWarning: unable to open an initial console.".to_owned();
        let unbooted = format!("the trial passed, but none of its 1 VMM(s) {}", crate::support::NO_USERSPACE);
        for fault in [no_code(0), not_ready(0), silent, no_console, unbooted] {
            if nested_fault(&fault).is_none() {
                return Err(format!("not taken for the nested fault: {fault}").into());
            }
        }
        let others = [
            no_code(1),
            not_ready(1),
            "passt exited (exit code 0) before the workload was ready (mtls:30051)".to_owned(),
            "the gateway supervisor exited (exit status: 0) before it was ready".to_owned(),
            "L1 did not report: the guest was still running after 280s".to_owned(),
            "not SERVING within 60s (last: refused)".to_owned(),
            "the trial passed without starting a VMM, so it proves nothing about a VM".to_owned(),
            // What every failed inner run's report says around its own reason.
            "inside L1, `krun::net::x` did not pass (L1 exit code 101, inner summary \"test result: FAILED. 0 \
             passed; 1 failed; 0 ignored; 0 measured; 193 filtered out; finished in 1.52s\")\nthe trial panicked"
                .to_owned(),
        ];
        // The silent-guest key is for consoles without a step of init, and only those.
        if openshell_vm::timeline::silent("openshell-init: [  12 ms] init started\n")
            || !openshell_vm::timeline::silent("")
        {
            return Err("timeline::silent misreads a console".into());
        }
        match others.iter().find(|o| nested_fault(o).is_some()) {
            Some(o) => Err(format!("taken for the nested fault, and so retried: {o}").into()),
            None => Ok(()),
        }
    })
}

/// Runs of a trial in L1 when the earlier ones met [`NESTED_FAULTS`].
const NESTED_ATTEMPTS: u32 = 3;

/// Runs trial `name` inside its own L1 and passes only if the inner run passed exactly it. An
/// inner run failed by one of the [`NESTED_FAULTS`] runs again in a fresh L1, at most [`NESTED_ATTEMPTS`]
/// times in all (one trial met two of them in a row under load); each earlier run's failure
/// stays in the trial's notes (the e2e summary prints them), so the retry is never silent.
fn run_trial(name: &str, a: &Artifacts, host: &NestedHost, vmm: &std::path::Path, dir: TrialDir) -> Result<(), Failed> {
    let argv = ["--exact", name, "--nocapture", "--test-threads", "1"];
    for attempt in 1..=NESTED_ATTEMPTS {
        let run = match run_in_l1(&dir, &format!("state-{attempt}"), a, host, vmm, &argv, &[]) {
            Ok(run) => run,
            Err(e) => return Err(dir.fail(e)),
        };
        let summary = run.console.lines().rev().find(|l| l.starts_with("test result:")).unwrap_or("").to_owned();
        let l1 = run.l1_ready_s.map_or("?".into(), |s| format!("{s:.1}"));
        support::note(format!("nested: L1 ready after {l1} s, whole L1 run {:.1} s; inner: {summary}", run.total_s));
        if run.code == 0 && summary.contains(" 1 passed; 0 failed; 0 ignored") {
            return Ok(());
        }
        // The inner run's own failure report, from libtest's "failures:" section on.
        let lines: Vec<&str> = run.console.lines().collect();
        let from = lines.iter().position(|l| *l == "failures:").unwrap_or(lines.len().saturating_sub(80));
        let report = lines[from..].join("\n");
        let fault = nested_fault(&report);
        if let (Some(fault), true) = (fault, attempt < NESTED_ATTEMPTS) {
            let first = report.lines().find(|l| l.contains(fault)).unwrap_or(fault).trim().to_owned();
            support::note(format!("retried: a second L1 after a nested fault ({fault}): {first}"));
            continue;
        }
        return Err(dir.fail(format!(
            "inside L1, `{name}` did not pass (L1 exit code {}, inner summary {summary:?})\n--- inner report ---\n{report}",
            run.code
        )));
    }
    unreachable!("the second attempt returns")
}

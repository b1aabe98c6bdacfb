//! `cargo xtask bench many`: N gateways booted at once on one host, each the way `vm run` boots
//! one (its own instance, PKI and passt; `-p 0:30051`, so each forward gets a free port), and
//! what each costs once all of them serve: VMM start → mTLS SERVING, the wall time from the start
//! of all boots to its SERVING, the VMM's and passt's resident sets, and how much the host's
//! `MemAvailable` fell. Figures, never assertions: on a host with fewer cores than gateways the
//! boots queue for the CPU, and that is what this measures.

use std::time::Instant;

#[derive(clap::Args)]
pub struct ManyArgs {
    /// Gateways booted at once
    #[arg(short, long, default_value_t = 8)]
    n: usize,
    #[arg(long, default_value = "auto")]
    vmm: openshell_vm::VmmChoice,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Instance {
    name: String,
    endpoint: String,
    /// VMM start → mTLS SERVING.
    ready_ms: f64,
    /// The start of all boots → this one SERVING (its lock, recovery, preflight and launch too).
    wall_ms: f64,
    vmm_rss_mib: Option<f64>,
    vmm_peak_rss_mib: Option<f64>,
    passt_rss_mib: Option<f64>,
}

/// What a boot thread reports of its gateway, which it keeps running until told.
struct Booted {
    name: String,
    endpoint: String,
    backend: String,
    ready: std::time::Duration,
    wall: std::time::Duration,
    vmm: u32,
    passt: Option<u32>,
}

#[derive(serde::Serialize)]
struct Report {
    n: usize,
    backend: String,
    instances: Vec<Instance>,
    /// `MemAvailable` before the boots and with all of them serving, MiB.
    host_available_before_mib: f64,
    host_available_after_mib: f64,
}

impl ManyArgs {
    pub fn run(self) -> anyhow::Result<()> {
        anyhow::ensure!(self.n > 0, "-n must be at least 1");
        let sh = xshell::Shell::new()?;
        let a = super::Artifacts::build(&sh)?;
        crate::artifacts::ensure_vmm(&sh, self.vmm, openshell_vm::Net::Passt, None, openshell_artifacts::Arch::host())?;
        let tmp = tempfile::Builder::new().prefix("openshell-bench-many-").tempdir()?;
        let root = super::gateways_in(tmp.path());
        let before = mem_available_mib()?;
        let pb = crate::progress::spinner("bench many");
        pb.set_message(format!("booting {} gateways at once", self.n));
        let t0 = Instant::now();
        // Each gateway stays on the thread that booted it until all are measured: its VMM and
        // passt die with the thread that started them (PR_SET_PDEATHSIG is per thread).
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let done_rx = std::sync::Arc::new(std::sync::Mutex::new(done_rx));
        let (up_tx, up_rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..self.n)
            .map(|i| {
                let (a, root, vmm, up_tx, done_rx) =
                    (a.clone(), root.clone(), self.vmm, up_tx.clone(), done_rx.clone());
                std::thread::spawn(move || {
                    let name = format!("many-{i}");
                    match super::gateway(&a, vmm, &root, &name, None) {
                        Ok((_inst, s)) => {
                            let booted = Booted {
                                name,
                                endpoint: s.endpoint.clone(),
                                backend: s.vm.backend.to_string(),
                                ready: s.ready,
                                wall: t0.elapsed(),
                                vmm: s.vm.pid(),
                                passt: s.vm.passt_pid(),
                            };
                            let _ = up_tx.send(Ok(booted));
                            // Until the measuring is done (or the bench is gone).
                            let _ = done_rx.lock().map(|rx| rx.recv());
                        }
                        Err(e) => {
                            let _ = up_tx
                                .send(Err(format!("{name}: {}", format!("{e:#}").lines().next().unwrap_or_default())));
                        }
                    }
                })
            })
            .collect();
        drop(up_tx);
        let (mut up, mut failed) = (Vec::new(), Vec::new());
        // One report per thread (a thread keeps its sender while its gateway runs).
        for r in up_rx.iter().take(self.n) {
            match r {
                Ok(b) => up.push(b),
                Err(e) => failed.push(e),
            }
        }
        pb.finish_and_clear();
        let after = mem_available_mib()?;
        let mib = |k: u64| k as f64 / 1024.0;
        up.sort_by_key(|b| b.name.clone());
        let instances = up
            .iter()
            .map(|b| {
                let vmm = openshell_vm::timeline::rss_kib(b.vmm);
                let passt = b.passt.and_then(openshell_vm::timeline::rss_kib);
                Instance {
                    name: b.name.clone(),
                    endpoint: b.endpoint.clone(),
                    ready_ms: b.ready.as_secs_f64() * 1e3,
                    wall_ms: b.wall.as_secs_f64() * 1e3,
                    vmm_rss_mib: vmm.map(|(now, _)| mib(now)),
                    vmm_peak_rss_mib: vmm.map(|(_, peak)| mib(peak)),
                    passt_rss_mib: passt.map(|(now, _)| mib(now)),
                }
            })
            .collect();
        // Every gateway stops with its thread.
        for _ in 0..up.len() {
            let _ = done_tx.send(());
        }
        for t in threads {
            let _ = t.join();
        }
        anyhow::ensure!(
            failed.is_empty(),
            "{} of {} gateways did not serve:\n  {}",
            failed.len(),
            self.n,
            failed.join("\n  ")
        );
        let report = Report {
            n: self.n,
            backend: up.first().map(|b| b.backend.clone()).unwrap_or_default(),
            instances,
            host_available_before_mib: before,
            host_available_after_mib: after,
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", words(&report));
        }
        Ok(())
    }
}

fn words(r: &Report) -> String {
    let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let mut out = format!("bench many: {} gateways booted at once on {}:\n", r.n, r.backend);
    out.push_str(&format!(
        "  {:<9} {:<16} {:>11} {:>9} {:>12} {:>9} {:>10}\n",
        "instance", "endpoint", "SERVING ms", "wall ms", "VMM RSS MiB", "peak MiB", "passt MiB"
    ));
    for i in &r.instances {
        out.push_str(&format!(
            "  {:<9} {:<16} {:>11.0} {:>9.0} {:>12} {:>9} {:>10}\n",
            i.name,
            i.endpoint,
            i.ready_ms,
            i.wall_ms,
            cell(i.vmm_rss_mib),
            cell(i.vmm_peak_rss_mib),
            cell(i.passt_rss_mib)
        ));
    }
    let total: f64 = r.instances.iter().filter_map(|i| Some(i.vmm_rss_mib? + i.passt_rss_mib.unwrap_or(0.0))).sum();
    out.push_str(&format!(
        "  all serving: VMMs and passts resident {total:.0} MiB; host MemAvailable {:.0} → {:.0} MiB ({:.0} MiB less)\n",
        r.host_available_before_mib,
        r.host_available_after_mib,
        r.host_available_before_mib - r.host_available_after_mib
    ));
    out
}

/// The host's `MemAvailable`, MiB.
fn mem_available_mib() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:")?.trim().strip_suffix(" kB")?.trim().parse::<u64>().ok())
        .map(|k| k as f64 / 1024.0)
        .ok_or_else(|| anyhow::anyhow!("/proc/meminfo has no MemAvailable line"))
}

//! `cargo xtask bench boot`: boot the gateway N times, cold (fresh PKI) and warm (reused), and
//! print median/min/max of each boot phase, of boot → mTLS SERVING, and the peak RSS of the VMM
//! and passt. Figures, not assertions.

use std::time::Duration;

use openshell_artifacts::Store;
use openshell_vm::gateway::{self, GatewayInstance};
use openshell_vm::{timeline, VmmChoice};
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
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
}

impl BenchCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let BenchWhat::Boot { n, vmm, json } = self.what;
        anyhow::ensure!(n > 0, "-n must be at least 1");
        let sh = Shell::new()?;
        let store = Store::default_location();
        let kernel = crate::artifacts::ensure_kernel(&sh, &store, openshell_artifacts::kernel::KernelRole::Guest)?;
        let rootfs = crate::artifacts::ensure_rootfs(&sh, &store)?;
        crate::deps::ensure(&sh, &[crate::deps::PASST])?;
        let digests = (kernel.provenance.vmlinux_sha256.hex(), rootfs.digest().hex());
        let root = tempfile::Builder::new().prefix("openshell-bench-").tempdir()?;
        let mut report = serde_json::Map::new();
        for mode in ["cold", "warm"] {
            // (phase name, samples in ms), in the order the phases happen
            let mut samples: Vec<(String, Vec<f64>)> = Vec::new();
            let mut add = |phase: String, v: f64| match samples.iter_mut().find(|(p, _)| *p == phase) {
                Some((_, s)) => s.push(v),
                None => samples.push((phase, vec![v])),
            };
            let pb = crate::progress::spinner(format!("bench boot ({mode})"));
            for i in 0..n {
                pb.set_message(format!("boot {}/{n}", i + 1));
                let inst = GatewayInstance::new(root.path(), "bench")?;
                if mode == "cold" {
                    inst.reset()?;
                }
                inst.ensure_pki()?;
                let port = free_port()?;
                let mut cfg = inst.vm_config(kernel.vmlinux.clone(), rootfs.dir.clone(), (&digests.0, &digests.1), port, openshell_vm::NetMode::Passt)?;
                cfg.vmm = vmm;
                let mut vm = openshell_vm::launch(&cfg)?;
                let ready = gateway::wait_ready(&mut vm, &format!("127.0.0.1:{port}"), &inst.client_bundle()?, Duration::from_secs(120))?;
                for (ms, step) in timeline::guest_steps(&std::fs::read_to_string(&vm.console).unwrap_or_default()) {
                    add(format!("guest: {}", timeline::phase(&step)), ms as f64);
                }
                add("host: boot → mTLS SERVING".into(), ready.as_secs_f64() * 1e3);
                if let Some(k) = timeline::peak_rss_kib(vm.pid()) {
                    add("peak RSS VMM (MiB)".into(), k as f64 / 1024.0);
                }
                if let Some(k) = vm.passt_pid().and_then(timeline::peak_rss_kib) {
                    add("peak RSS passt (MiB)".into(), k as f64 / 1024.0);
                }
                drop(vm);
            }
            pb.finish_and_clear();
            let mut rows = serde_json::Map::new();
            if !json {
                println!("{mode} boots (n={n}):");
                println!("  {:<36} {:>9} {:>9} {:>9}", "phase (ms unless noted)", "median", "min", "max");
            }
            for (phase, mut v) in samples {
                v.sort_by(|a, b| a.total_cmp(b));
                let (med, min, max) = (v[v.len() / 2], v[0], v[v.len() - 1]);
                if !json {
                    println!("  {phase:<36} {med:>9.1} {min:>9.1} {max:>9.1}");
                }
                rows.insert(phase, serde_json::json!({"median": med, "min": min, "max": max, "n": v.len()}));
            }
            report.insert(mode.into(), rows.into());
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Ok(())
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

//! `cargo xtask bench exec`: `vm run --exec /bin/true` end to end, through the entry point a user
//! runs: this very xtask binary, spawned as a new process each time, so the figure holds the
//! binary's start, the artifact lookups, the preflight, the boot, the guest command and the
//! teardown. The first run is reported apart: it is where a rebuild of guest programs would show.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Timed runs (after one first run, reported apart)
    #[arg(short, long, default_value_t = 10)]
    n: usize,
    #[arg(long, default_value = "auto")]
    vmm: openshell_vm::VmmChoice,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

impl ExecArgs {
    pub fn run(self) -> anyhow::Result<()> {
        anyhow::ensure!(self.n > 0, "-n must be at least 1");
        let me = std::env::current_exe().context("cannot tell where the xtask binary is")?;
        let vmm = super::vmm_name(self.vmm);
        let once = || -> anyhow::Result<f64> {
            let t = Instant::now();
            let out = Command::new(&me)
                .args(["vm", "run", "--vmm", &vmm, "--exec", "/bin/true"])
                .env("RUST_BACKTRACE", "0")
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("cannot start {}", me.display()))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            anyhow::ensure!(
                out.status.success(),
                "`{} vm run --exec /bin/true` failed ({}); its stderr ends:\n{}",
                me.display(),
                out.status,
                super::tail(&String::from_utf8_lossy(&out.stderr), 20)
            );
            Ok(ms)
        };
        let pb = crate::progress::spinner("bench exec");
        pb.set_message("first run");
        let first = once()?;
        let mut walls = Vec::with_capacity(self.n);
        for i in 0..self.n {
            pb.set_message(format!("run {}/{}", i + 1, self.n));
            walls.push(once()?);
        }
        pb.finish_and_clear();
        let (med, min, max) = super::summary(&walls);
        if self.json {
            let doc = serde_json::json!({
                "command": format!("{} vm run --vmm {vmm} --exec /bin/true", me.display()),
                "first_ms": first,
                "wall_ms": {"median": med, "min": min, "max": max, "n": walls.len()},
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            println!("vm run --exec /bin/true through {} (n={}):", me.display(), self.n);
            println!("  first run            {first:>9.1} ms");
            println!("  wall median/min/max  {med:>9.1} {min:>9.1} {max:>9.1} ms");
        }
        Ok(())
    }
}

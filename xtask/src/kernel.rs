//! `cargo xtask kernel`: build the guest kernel (or find it cached) and print where it is.

use openshell_artifacts::Store;
use xshell::Shell;

#[derive(clap::Args)]
pub struct KernelCmd {
    /// Print the artifact's provenance as JSON
    #[arg(long)]
    json: bool,
}

impl KernelCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let sh = Shell::new()?;
        let started = std::time::Instant::now();
        let k = crate::artifacts::ensure_kernel(&sh, &Store::default_location())?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&k.provenance)?);
        } else {
            println!("kernel {} ({}) ready in {:.1}s", k.provenance.kernel_release, k.provenance.vmlinux_sha256, started.elapsed().as_secs_f64());
            println!("  {}", k.vmlinux.display());
        }
        Ok(())
    }
}

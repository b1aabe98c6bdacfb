//! `cargo xtask kernel` (placeholder until the kernel build lands).

#[derive(clap::Args)]
pub struct KernelCmd {}

impl KernelCmd {
    pub fn run(self) -> anyhow::Result<()> {
        anyhow::bail!("not yet implemented")
    }
}

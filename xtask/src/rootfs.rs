//! `cargo xtask rootfs`: bake the guest root directory (or find it cached) and print where it is.

use anyhow::Context;
use openshell_artifacts::{rootfs, Arch, Store};
use xshell::Shell;

#[derive(clap::Args)]
pub struct RootfsCmd {
    /// The guest's architecture; a foreign arch's root holds busybox and init only (enough for
    /// `vm run --exec`), cross-built
    #[arg(long, default_value_t = Arch::host())]
    arch: Arch,
    /// Re-hash the baked tree and compare it with its manifest instead of building
    #[arg(long)]
    check: bool,
}

impl RootfsCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let sh = Shell::new()?;
        let started = std::time::Instant::now();
        let store = Store::default_location();
        let bundle = if self.check {
            let b = crate::artifacts::baked_rootfs(&sh, &store, self.arch)?;
            rootfs::verify(&b).with_context(|| {
                format!(
                    "{} changed after it was baked: remove it and run `cargo xtask rootfs` to bake it anew",
                    b.dir.display()
                )
            })?;
            b
        } else {
            crate::artifacts::ensure_rootfs(&sh, &store, self.arch)?
        };
        println!(
            "rootfs {} ({} files, {} links) {} in {:.1}s",
            bundle.digest(),
            bundle.manifest.files.len(),
            bundle.manifest.symlinks.len(),
            if self.check { "verified" } else { "ready" },
            started.elapsed().as_secs_f64()
        );
        println!("  {}", bundle.dir.display());
        Ok(())
    }
}

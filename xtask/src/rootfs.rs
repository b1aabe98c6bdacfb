//! `cargo xtask rootfs`: bake a profile's guest root directory (or find it cached) and print
//! where it is.

use anyhow::Context;
use openshell_artifacts::{rootfs, Arch, Store};
use openshell_instance::profile::{self, Profile};
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
    /// Whose root: gateway (busybox, the default) or debian (bookworm minbase + python3, from
    /// Debian's archive)
    #[arg(long, default_value_t = profile::GATEWAY)]
    profile: Profile,
}

impl RootfsCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let sh = Shell::new()?;
        let started = std::time::Instant::now();
        let store = Store::default_location();
        let bundle = crate::artifacts::profile_root(&sh, &store, &self.profile, self.arch, !self.check)?;
        if self.check {
            rootfs::verify(&bundle).with_context(|| {
                format!(
                    "{} changed after it was baked: remove it and run `cargo xtask rootfs --profile {}` to bake it anew",
                    bundle.dir.display(),
                    self.profile
                )
            })?;
        }
        println!(
            "rootfs of profile {} {} ({} files, {} links) {} in {:.1}s",
            self.profile,
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

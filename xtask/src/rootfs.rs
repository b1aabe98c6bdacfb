//! `cargo xtask rootfs`: bake a profile's guest root directory (or find it cached) and print
//! where it is; with `--image REF`, the root disk of an OCI image instead.

use anyhow::Context;
use openshell_artifacts::{rootfs, Arch, Store};
use openshell_image::ImageRef;
use openshell_instance::profile::{self, Profile};
use serde_json::json;
use xshell::Shell;

#[derive(clap::Args)]
pub struct RootfsCmd {
    /// The guest's architecture; a foreign arch's root holds busybox and init only (enough for
    /// `vm run --exec`), cross-built
    #[arg(long, default_value_t = Arch::host(), conflicts_with = "image")]
    arch: Arch,
    /// Re-hash the baked tree and compare it with its manifest instead of building
    #[arg(long, conflicts_with = "image")]
    check: bool,
    /// Whose root: gateway (busybox, the default) or debian (bookworm minbase + python3, from
    /// Debian's archive)
    #[arg(long, default_value_t = profile::GATEWAY, conflicts_with = "image")]
    profile: Profile,
    /// Bake (or find) the read-only ext4 root disk of this OCI image instead: an OCI layout
    /// directory, an OCI or docker archive, or a local podman image (`oci:`, `oci-archive:`,
    /// `docker-archive:`, `podman:`), with our init and guest programs under /.openshell
    #[arg(long, value_name = "REF", value_parser = crate::image::parse_ref)]
    image: Option<ImageRef>,
    /// Machine-readable output (with --image): {image_dir, root, manifest_digest,
    /// disk, sha256, size_bytes, init, fresh, image_fresh, workload}
    #[arg(long, requires = "image")]
    json: bool,
}

impl RootfsCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let sh = Shell::new()?;
        let started = std::time::Instant::now();
        let store = Store::default_location();
        if let Some(image) = &self.image {
            let ours = crate::artifacts::ensure_rootfs(&sh, &store, Arch::host())?;
            let r = crate::artifacts::ensure_image_root(&sh, &store, &ours, image)?;
            if self.json {
                let out = json!({
                    "image_dir": r.image.dir,
                    "root": r.image.root(),
                    "manifest_digest": format!("sha256:{}", r.image.config.manifest_digest),
                    "disk": r.disk.image,
                    "sha256": r.disk.record.sha256.hex(),
                    "size_bytes": r.disk.record.size_bytes,
                    "init": openshell_guest::IMAGE_INIT_BIN,
                    "fresh": r.fresh_disk,
                    "image_fresh": r.fresh_image,
                    "workload": r.image.workload(),
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            println!(
                "image root disk sha256:{} of image sha256:{} {} in {:.1}s",
                r.disk.record.sha256.hex(),
                r.image.config.manifest_digest,
                if r.fresh_disk { "baked" } else { "already in the store" },
                started.elapsed().as_secs_f64()
            );
            println!("  {}", r.disk.image.display());
            return Ok(());
        }
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

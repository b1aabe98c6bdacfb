//! `cargo xtask image unpack REF`: unpack an OCI image into the artifact store (or find it there)
//! and print where its root is, its manifest digest, how many entries it holds and what it runs.
//! The work is `openshell-image`'s; this parses, shows progress and prints.

use std::time::Instant;

use anyhow::Context;
use openshell_artifacts::Store;
use openshell_image::{ImageRef, Workload};
use serde_json::json;

#[derive(clap::Args)]
pub struct ImageCmd {
    #[command(subcommand)]
    cmd: ImageSub,
}

#[derive(clap::Subcommand)]
enum ImageSub {
    /// Unpack an image into a verified root in the artifact store (kind `image`, keyed by the
    /// manifest digest); a second unpack of the same image finds it and does nothing
    Unpack {
        /// An OCI layout directory, an OCI or docker archive (podman/docker save), or a local
        /// podman image name; `oci:`, `oci-archive:`, `docker-archive:` or `podman:` say which
        #[arg(value_parser = parse_ref)]
        image: ImageRef,
        /// Machine-readable output: {dir, root, manifest_digest, entries, fresh, workload, config}
        #[arg(long)]
        json: bool,
    },
}

/// Parsed before `main` moves to the project root, so a relative path is the caller's.
pub fn parse_ref(s: &str) -> Result<ImageRef, String> {
    let abs = |p: &std::path::Path| std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()));
    Ok(match s.parse::<ImageRef>().map_err(|e| e.to_string())? {
        ImageRef::OciLayout(p) => ImageRef::OciLayout(abs(&p)?),
        ImageRef::OciArchive(p) => ImageRef::OciArchive(abs(&p)?),
        ImageRef::DockerArchive(p) => ImageRef::DockerArchive(abs(&p)?),
        local @ ImageRef::Local(_) => local,
    })
}

impl ImageCmd {
    pub fn run(self) -> anyhow::Result<()> {
        match self.cmd {
            ImageSub::Unpack { image, json } => unpack(&image, json),
        }
    }
}

fn unpack(image: &ImageRef, as_json: bool) -> anyhow::Result<()> {
    let store = Store::default_location();
    let started = Instant::now();
    let mut progress = crate::progress::BuildLines::new("image", "image", 1);
    let result = openshell_image::unpack(&store, image, &mut |line| progress.line(line));
    progress.finish();
    let unpacked = result.with_context(|| format!("unpacking {image:?}"))?;
    let img = &unpacked.image;
    let workload = img.workload();
    if as_json {
        let out = json!({
            "dir": img.dir,
            "root": img.root(),
            "manifest_digest": format!("sha256:{}", img.config.manifest_digest),
            "entries": img.config.entries,
            "fresh": unpacked.fresh,
            "workload": workload,
            "config": img.config,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "image sha256:{} {} in {:.1}s ({} entries{})",
        img.config.manifest_digest,
        if unpacked.fresh { "unpacked" } else { "already in the store" },
        started.elapsed().as_secs_f64(),
        img.config.entries,
        if img.config.rootless { ", rootless: no owners or device nodes" } else { "" }
    );
    println!("  {}", img.root().display());
    print_workload(&workload);
    Ok(())
}

fn print_workload(w: &Workload) {
    let argv = if w.argv.is_empty() { "(none: the image names no Entrypoint or Cmd)".into() } else { w.argv.join(" ") };
    println!("  argv: {argv}");
    println!("  cwd:  {}", w.cwd);
    println!("  user: {}", w.user.as_deref().unwrap_or("root"));
    for (k, v) in &w.env {
        println!("  env:  {k}={v}");
    }
}

//! `cargo xtask bench image REF`: an OCI image booted as a VM end to end through this xtask
//! binary, as a user runs `vm run --image`, cold beside warm. Cold: the image's unpacked tree and
//! its root disk are removed from the store first, so the run unpacks and verifies the image,
//! bakes its root disk (`mke2fs -d`) and boots it; warm: both are found. Each run ends at the exit
//! of the command, or with `--ready` at the line that says the probe passed (then Ctrl-C stops it,
//! outside the figure).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

#[derive(clap::Args)]
pub struct ImageArgs {
    /// The image, as `vm run --image` takes it (`oci:DIR`, `oci-archive:FILE`, `docker-archive:FILE`,
    /// `podman:NAME`)
    #[arg(value_parser = crate::image::parse_ref)]
    image: openshell_image::ImageRef,
    /// Runs of each mode
    #[arg(short, long, default_value_t = 3)]
    n: usize,
    #[arg(long, default_value = "auto")]
    vmm: openshell_vm::VmmChoice,
    /// Measure to this readiness probe (as `vm run --ready`: tcp:PORT, http:PORT[/PATH],
    /// grpc:PORT) instead of the command's exit; the probed port is forwarded from a free one
    #[arg(long, value_name = "PROBE")]
    ready: Option<openshell_instance::ready::Probe>,
    /// The command to run instead of the image's own (as `vm run --exec`)
    #[arg(long)]
    exec: Option<String>,
    /// Arguments of --exec
    #[arg(last = true, requires = "exec")]
    args: Vec<String>,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

/// What `rootfs --image --json` says of the image's store entries.
struct Entries {
    image_dir: PathBuf,
    disk_dir: PathBuf,
}

impl ImageArgs {
    pub fn run(self) -> anyhow::Result<()> {
        anyhow::ensure!(self.n > 0, "-n must be at least 1");
        let me = std::env::current_exe().context("cannot tell where the xtask binary is")?;
        let image = self.image.to_string();
        // Baked once up front, which also says where its entries are and fails early on a bad image.
        let entries = self.entries(&me, &image)?;
        let mut report = super::Report::new();
        let pb = crate::progress::spinner("bench image");
        for mode in ["cold", "warm"] {
            let mut samples = super::Samples::new();
            for i in 0..self.n {
                pb.set_message(format!("{mode} run {}/{}", i + 1, self.n));
                if mode == "cold" {
                    for d in [&entries.image_dir, &entries.disk_dir] {
                        std::fs::remove_dir_all(d)
                            .with_context(|| format!("removing {} for a cold run", d.display()))?;
                    }
                }
                let (phase, ms) = self.once(&me, &image)?;
                super::add(&mut samples, phase, ms);
            }
            report.push((mode.to_owned(), samples));
        }
        pb.finish_and_clear();
        if self.json {
            let mut doc = super::summarize_all(&report);
            doc["image"] = serde_json::json!(image);
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            let columns: Vec<(&str, &super::Samples)> = report.iter().map(|(m, s)| (m.as_str(), s)).collect();
            super::print_table(
                &format!("vm run --image {image} (n={}, cold = unpack + mke2fs + boot)", self.n),
                &columns,
            );
        }
        Ok(())
    }

    fn entries(&self, me: &std::path::Path, image: &str) -> anyhow::Result<Entries> {
        let out = Command::new(me)
            .args(["rootfs", "--image", image, "--json"])
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot start {}", me.display()))?;
        anyhow::ensure!(out.status.success(), "`rootfs --image {image}` failed ({})", out.status);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading `rootfs --image --json`")?;
        let path = |k: &str| doc[k].as_str().map(PathBuf::from).with_context(|| format!("`rootfs --json` has no {k}"));
        let disk = path("disk")?;
        let disk_dir = disk.parent().context("the root disk has no directory")?.to_owned();
        Ok(Entries { image_dir: path("image_dir")?, disk_dir })
    }

    /// One `vm run --image`: (the phase it measured, ms).
    fn once(&self, me: &std::path::Path, image: &str) -> anyhow::Result<(String, f64)> {
        let vmm = super::vmm_name(self.vmm);
        let mut args: Vec<String> =
            ["vm", "run", "--image", image, "--vmm", &vmm, "--disk-size", "256M"].map(String::from).to_vec();
        match &self.ready {
            Some(p) => {
                let publish = format!("{}:{}", super::free_port()?, p.guest_port);
                args.extend(["--net", "passt", "-p", &publish, "--ready", &p.to_string()].map(String::from));
            }
            None => args.extend(["--net", "none"].map(String::from)),
        }
        if let Some(exec) = &self.exec {
            args.extend(["--exec".to_owned(), exec.clone(), "--".to_owned()]);
            args.extend(self.args.iter().cloned());
        }
        let mut cmd = Command::new(me);
        cmd.args(&args).env("RUST_BACKTRACE", "0").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        // Its own process group, so the Ctrl-C that ends a --ready run reaches it as a terminal's does.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let t = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("cannot start {}", me.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut all = String::new();
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("vm: ready: ") {
                    let _ = tx.send(t.elapsed());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let cmdline = format!("{} {}", me.display(), args.join(" "));
        let measured = match &self.ready {
            Some(p) => {
                // A hang guard: the run's own --ready-timeout (60 s) ends it long before this.
                let ready = rx.recv_timeout(Duration::from_secs(600)).ok();
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGINT,
                );
                let _ = child.wait();
                let err = reader.join().unwrap_or_default();
                let ready = ready.with_context(|| {
                    format!("`{cmdline}` never said it was ready; its stderr ends:\n{}", super::tail(&err, 20))
                })?;
                (format!("host: vm run → ready ({p})"), ready)
            }
            None => {
                let status = child.wait()?;
                let wall = t.elapsed();
                let err = reader.join().unwrap_or_default();
                anyhow::ensure!(
                    err.contains("the guest reported exit code"),
                    "`{cmdline}` ended ({status}) without the guest's exit code; its stderr ends:\n{}",
                    super::tail(&err, 20)
                );
                ("host: vm run → the command's exit".to_owned(), wall)
            }
        };
        Ok((measured.0, measured.1.as_secs_f64() * 1e3))
    }
}

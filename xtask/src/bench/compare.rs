//! `cargo xtask bench compare`: our gateway beside its two alternatives, interleaved round by
//! round in one run so a noisy host weighs on all of them alike.
//! - **Container**: the same gateway binary and argv, from an image imported from our rootfs
//!   directory (`tar -C rootfs -c . | podman import -`, no registry), the instance's share mounted
//!   where the guest mounts it, the port published on 127.0.0.1. Timed from `podman run` to the
//!   first mTLS health SERVING (the same connect + health calls as our readiness), beside our
//!   boot's VMM start → SERVING (cold and warm, from [`super::boots`]).
//! - **Naive QEMU**: `-M q35` with its default devices, our kernel, our rootfs as an initramfs,
//!   and a distribution's command line (`console=ttyS0`, no `quiet`, none of our parameters).
//!   Our kernel has no PCI (`CONFIG_PCI` is off: the microVM has none), so on q35 it sees neither
//!   a PCI disk nor a NIC and cannot reach SERVING; what both can be timed on is VMM start → our
//!   init's first console line, which is what this compares.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

const IMAGE: &str = "localhost/openshell-gw";

#[derive(clap::Args)]
pub struct CompareArgs {
    /// Rounds (each: one cold and one warm boot of ours, one container, one naive QEMU)
    #[arg(short, long, default_value_t = 5)]
    n: usize,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

impl CompareArgs {
    pub fn run(self) -> anyhow::Result<()> {
        anyhow::ensure!(self.n > 0, "-n must be at least 1");
        let sh = xshell::Shell::new()?;
        crate::deps::ensure(&sh, &[crate::deps::COMPARE, crate::deps::QEMU, crate::deps::PASST])?;
        let a = super::Artifacts::build(&sh)?;
        // The naive QEMU is QEMU; ours is QEMU too on a host where libkrun cannot run, and the
        // plan says which otherwise.
        let vmm = openshell_vm::VmmChoice::Auto;
        crate::artifacts::ensure_vmm(&sh, vmm, openshell_vm::Net::Passt, None, openshell_artifacts::Arch::host())?;
        let work = tempfile::Builder::new().prefix("openshell-bench-compare-").tempdir()?;
        let conf = work.path().join("containers.conf");
        std::fs::write(&conf, openshell_image::PODMAN_CONF)?;
        let pb = crate::progress::spinner("bench compare");
        pb.set_message("podman import of the rootfs");
        import_image(&a.rootfs, &conf)?;
        pb.set_message("initramfs of the rootfs");
        let cpio = work.path().join("rootfs.cpio");
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!("cd '{}' && find . | cpio -o -H newc --quiet > '{}'", a.rootfs.display(), cpio.display()))
            .status()?;
        anyhow::ensure!(st.success(), "packing {} into an initramfs with cpio failed ({st})", a.rootfs.display());

        // The container's instance: its PKI and share, filled as for a VM; its argv is the VM's.
        let inst = openshell_instance::state::GatewayInstance::new(work.path(), "container")?;
        inst.ensure_pki()?;
        let cfg = inst.vm_config(
            a.kernel.clone(),
            a.rootfs.clone(),
            (&a.digests.0, &a.digests.1),
            &super::passt_on_a_free_port()?,
        )?;
        let bundle = inst.client_bundle()?;

        let mut ours = super::Report::new();
        let (mut container, mut naive) = (Vec::new(), Vec::new());
        let mut naive_failed = None;
        for i in 0..self.n {
            pb.set_message(format!("round {}/{}: ours", i + 1, self.n));
            for (mode, samples) in super::boots(1, vmm, &a, false)? {
                let into = match ours.iter_mut().find(|(m, _)| *m == mode) {
                    Some((_, s)) => s,
                    None => {
                        ours.push((mode.clone(), super::Samples::new()));
                        &mut ours.last_mut().expect("just pushed").1
                    }
                };
                for (phase, values) in samples {
                    for v in values {
                        super::add(into, phase.clone(), v);
                    }
                }
            }
            pb.set_message(format!("round {}/{}: container", i + 1, self.n));
            container.push(run_container(&conf, &cfg, &bundle, i)?);
            pb.set_message(format!("round {}/{}: naive QEMU", i + 1, self.n));
            match run_naive(&a.kernel, &cpio, work.path()) {
                Ok(ms) => naive.push(ms),
                Err(e) => {
                    naive_failed.get_or_insert(format!("{e:#}"));
                }
            }
        }
        pb.finish_and_clear();
        let get = |mode: &str, phase: &str| -> Vec<f64> {
            ours.iter()
                .find(|(m, _)| m == mode)
                .and_then(|(_, s)| s.iter().find(|(p, _)| p == phase))
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        const SERVING: &str = "host: boot → mTLS SERVING";
        let rows = [
            ("ours cold: VMM start → SERVING", get("cold", SERVING)),
            ("ours warm: VMM start → SERVING", get("warm", SERVING)),
            ("container: podman run → SERVING", container.clone()),
            ("ours warm: VMM start → init started", get("warm", super::INIT_SEEN)),
            ("naive q35 QEMU: start → init started", naive.clone()),
        ];
        let med = |v: &[f64]| if v.is_empty() { f64::NAN } else { super::summary(v).0 };
        let ratio_serving = med(&rows[1].1) / med(&rows[2].1);
        let ratio_init = med(&rows[3].1) / med(&rows[4].1);
        if self.json {
            let table: serde_json::Map<String, serde_json::Value> = rows
                .iter()
                .map(|(name, v)| {
                    let (m, lo, hi) = super::summary_or_nan(v);
                    (name.to_string(), serde_json::json!({"median_ms": m, "min_ms": lo, "max_ms": hi, "n": v.len()}))
                })
                .collect();
            let doc = serde_json::json!({
                "rounds": self.n, "figures": table,
                "ratio_ours_warm_serving_over_container": ratio_serving,
                "ratio_ours_init_over_naive_qemu_init": ratio_init,
                "naive_qemu_failure": naive_failed,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
            return Ok(());
        }
        println!("bench compare ({} interleaved rounds), ms:", self.n);
        println!("  {:<40} {:>9} {:>9} {:>9} {:>3}", "", "median", "min", "max", "n");
        for (name, v) in &rows {
            let (m, lo, hi) = super::summary_or_nan(v);
            println!("  {name:<40} {m:>9.1} {lo:>9.1} {hi:>9.1} {:>3}", v.len());
        }
        println!("  ratio ours warm SERVING / container SERVING: {ratio_serving:.2}");
        println!("  ratio ours init / naive q35 init:            {ratio_init:.2}");
        if let Some(f) = naive_failed {
            println!("  naive QEMU failed: {f}");
        }
        Ok(())
    }
}

fn podman(conf: &Path) -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", conf);
    c
}

/// `tar -C rootfs -c . | podman import - IMAGE`.
fn import_image(rootfs: &Path, conf: &Path) -> anyhow::Result<()> {
    let mut tar = Command::new("tar").arg("-C").arg(rootfs).args(["-c", "."]).stdout(Stdio::piped()).spawn()?;
    let out = podman(conf)
        .args(["import", "-", IMAGE])
        .stdin(tar.stdout.take().expect("piped"))
        .stdout(Stdio::null())
        .output()
        .context("cannot run podman")?;
    let tar_status = tar.wait()?;
    anyhow::ensure!(
        tar_status.success() && out.status.success(),
        "`tar -C {} -c . | podman import - {IMAGE}` failed (tar {tar_status}, podman {}): {}",
        rootfs.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// `podman run` → mTLS health SERVING, ms; the container is removed before returning.
fn run_container(
    conf: &Path,
    cfg: &openshell_vm::VmConfig,
    bundle: &openshell_gateway::ClientBundle,
    round: usize,
) -> anyhow::Result<f64> {
    let port = super::free_port()?;
    let name = format!("openshell-bench-{}-{round}", std::process::id());
    let t = Instant::now();
    let out = podman(conf)
        .args(["run", "-d", "--rm", "--name", &name, "-p"])
        .arg(format!("127.0.0.1:{port}:{}", openshell_instance::preset::GATEWAY_PORT))
        .arg("-v")
        .arg(format!("{}:/run/openshell:ro", cfg.share_dir().display()))
        .arg(IMAGE)
        .args(&cfg.exec.argv)
        .output()
        .context("cannot run podman")?;
    let removed = Removed { conf, name: &name };
    anyhow::ensure!(
        out.status.success(),
        "podman run failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let ms = serving(&format!("127.0.0.1:{port}"), bundle, t, Duration::from_secs(60))
        .with_context(|| format!("container {name} never said SERVING; its log: {}", removed.logs()))?;
    Ok(ms)
}

/// Removes the container when dropped, so a failed round leaves none.
struct Removed<'a> {
    conf: &'a Path,
    name: &'a str,
}

impl Removed<'_> {
    fn logs(&self) -> String {
        podman(self.conf)
            .args(["logs", self.name])
            .output()
            .map(|o| super::tail(&String::from_utf8_lossy(&[o.stdout, o.stderr].concat()), 10))
            .unwrap_or_default()
    }
}

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        let _ = podman(self.conf)
            .args(["rm", "-f", "-t", "0", self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Polls the gateway's mTLS health until SERVING: ms since `since`.
fn serving(
    endpoint: &str,
    bundle: &openshell_gateway::ClientBundle,
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut last = String::from("no probe yet");
    while since.elapsed() < timeout {
        let attempt = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), async {
                let ch = openshell_gateway::connect(endpoint, bundle, "localhost").await?;
                openshell_gateway::health(&ch).await
            })
            .await
        });
        match attempt {
            Ok(Ok(openshell_gateway::ServingStatus::Serving)) => return Ok(since.elapsed().as_secs_f64() * 1e3),
            Ok(Ok(other)) => last = format!("health said {other:?}"),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "a probe took over 2 s".into(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("not SERVING within {timeout:?}: {last}")
}

/// A naive QEMU's start → our init's first line on its serial console, ms.
fn run_naive(kernel: &Path, initramfs: &Path, work: &Path) -> anyhow::Result<f64> {
    let console = work.join("naive-console.log");
    let _ = std::fs::remove_file(&console);
    let t = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "512", "-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        // A distribution's line: the console, no `quiet`, none of our tuning. `rdinit` names our
        // init, as a distribution's initramfs would have its own /init.
        .args(["-append", &format!("console=ttyS0 rdinit={}", openshell_guest::INIT_BIN)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let result = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("] init started") {
            break Ok(t.elapsed().as_secs_f64() * 1e3);
        }
        if let Some(status) = qemu.try_wait()? {
            let mut err = String::new();
            let _ = qemu.stderr.take().map(|mut e| e.read_to_string(&mut err));
            break Err(anyhow::anyhow!(
                "naive QEMU exited ({status}) first: {}; console ends:\n{}",
                err.trim(),
                super::tail(&text, 10)
            ));
        }
        if t.elapsed() > Duration::from_secs(120) {
            break Err(anyhow::anyhow!("no init line within 120 s; console ends:\n{}", super::tail(&text, 10)));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    result
}

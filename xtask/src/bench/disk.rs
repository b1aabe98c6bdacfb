//! `cargo xtask bench disk`: the guest's file work on each root, side by side in one run. One VM
//! per root (a share root: the rootfs directory over virtio-9p; a disk root: its ext4 image under
//! overlayfs with a fresh data disk), booted as `vm run --exec` boots one, runs one busybox script
//! that times itself on the guest's clock (`/proc/uptime`, 10 ms steps) and prints a line per
//! phase. Every phase starts after `sync` and dropping the guest's caches, so reads come from the
//! root's transport, not from guest memory:
//! - `find`: `find / -xdev | wc -l`, every entry of the root tree looked up (busybox's tree is a
//!   few hundred entries, mostly applet symlinks, and only a handful of regular files);
//! - `read`: every regular file of that tree through `cat` (its bytes, ~16 MiB);
//! - `create-tmpfs` / `create-data-disk`: N small files made, synced and listed, on tmpfs (either
//!   root; a share root can write nowhere else) and on the data disk (a disk root's overlay);
//!   `readback-tmpfs` / `readback-data-disk`: the same files read back (`cat`);
//! - `dd-write` / `dd-read`: a disk root only, `dd` of M MiB onto the data disk with
//!   `conv=fsync`, then read back after dropping caches.
//!
//! The data disk is made before the VMM starts, so outside every figure. Figures, not assertions:
//! the run fails only when a phase is missing or reports nothing done.

use std::time::Duration;

use anyhow::Context;
use openshell_artifacts::Store;
use openshell_instance::check::{self, Verification};
use openshell_vm::{Root, VmConfig, VmExit, VmmChoice};

use crate::vm::RootFlag;

/// What the guest prints before each phase: `disk-bench: NAME START END COUNT`.
const MARK: &str = "disk-bench:";
/// A boot plus the phases on a slow (TCG) host; a guest that takes longer is stuck.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args)]
pub struct DiskArgs {
    /// Small files made on tmpfs and on the data disk
    #[arg(long, default_value_t = 2000)]
    files: usize,
    /// MiB written and read back with dd on the data disk
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// The disk root's data disk, in MiB (made afresh for the run)
    #[arg(long, default_value_t = openshell_artifacts::disk::DEFAULT_DATA_DISK_MIB)]
    disk_size: u64,
    #[arg(long, default_value = "auto")]
    vmm: VmmChoice,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

/// One phase as the guest timed it.
#[derive(Debug, Clone, PartialEq)]
struct Phase {
    name: String,
    seconds: f64,
    /// Files found, bytes read, files made, or MiB moved.
    count: u64,
}

impl DiskArgs {
    pub fn run(self) -> anyhow::Result<()> {
        anyhow::ensure!(self.files > 0 && self.mib > 0, "--files and --mib must be at least 1");
        anyhow::ensure!(
            (self.mib as u64) < self.disk_size,
            "--mib {} does not fit a {} MiB data disk: raise --disk-size",
            self.mib,
            self.disk_size
        );
        // As `bench boot --root disk`: libkrun boots disks only inside the nested host here.
        anyhow::ensure!(self.vmm != VmmChoice::Krun, "bench disk runs on qemu only; use --vmm qemu (or auto)");
        let sh = xshell::Shell::new()?;
        let a = super::Artifacts::build(&sh)?;
        crate::artifacts::ensure_vmm(&sh, self.vmm, openshell_vm::Net::None, None, openshell_artifacts::Arch::host())?;
        let bundle = openshell_artifacts::rootfs::RootfsBundle::open(&a.rootfs)?;
        let pb = crate::progress::spinner("bench disk");
        let mut runs = Vec::new();
        for (flag, size) in [(RootFlag::Share, None), (RootFlag::Disk, Some(self.disk_size))] {
            let root = flag.decide(size, &sh, &Store::default_location(), &bundle)?;
            pb.set_message(format!("{} root", root.kind()));
            runs.push((root.kind(), self.on(&a, root)?));
        }
        pb.finish_and_clear();
        let (share, disk) = (&runs[0].1, &runs[1].1);
        let rate = |n: &str| disk.iter().find(|p| p.name == n).map_or(f64::NAN, |p| p.count as f64 / p.seconds);
        if self.json {
            // Each root's phases by name: {"find": {"seconds": .., "count": ..}, ..}.
            let by_name = |phases: &[Phase]| -> serde_json::Map<String, serde_json::Value> {
                phases
                    .iter()
                    .map(|p| (p.name.clone(), serde_json::json!({"seconds": p.seconds, "count": p.count})))
                    .collect()
            };
            let doc = serde_json::json!({
                "files": self.files,
                "mib": self.mib,
                "share": by_name(share),
                "disk": by_name(disk),
                "data_disk_mib_per_s": {"write": rate("dd-write"), "read": rate("dd-read")},
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
            return Ok(());
        }
        println!("bench disk ({}; guest clock, caches dropped before each phase):", super::vmm_name(self.vmm));
        println!("  {:<44} {:>12} {:>12}", "", "share root", "disk root");
        let get = |p: &[Phase], n: &str| p.iter().find(|x| x.name == n).cloned();
        let secs = |p: Option<Phase>| p.map_or("-".to_owned(), |p| format!("{:.2} s", p.seconds));
        let files = get(share, "find").map_or(0, |p| p.count);
        let bytes = get(share, "read").map_or(0, |p| p.count);
        for (label, name) in [
            (format!("find / -xdev ({files} entries)"), "find"),
            (format!("read every file of / ({:.1} MiB)", bytes as f64 / 1048576.0), "read"),
            (format!("make {} small files on tmpfs", self.files), "create-tmpfs"),
            ("read them back".to_owned(), "readback-tmpfs"),
            (format!("make {} small files on the data disk", self.files), "create-data-disk"),
            ("read them back (caches dropped)".to_owned(), "readback-data-disk"),
        ] {
            println!("  {label:<44} {:>12} {:>12}", secs(get(share, name)), secs(get(disk, name)));
        }
        println!(
            "  data disk dd {} MiB: write (conv=fsync) {:.1} MiB/s, read (caches dropped) {:.1} MiB/s",
            self.mib,
            rate("dd-write"),
            rate("dd-read")
        );
        Ok(())
    }

    /// Boots one VM on `root`, runs the script, and returns its phases.
    fn on(&self, a: &super::Artifacts, root: Root) -> anyhow::Result<Vec<Phase>> {
        let disk = matches!(root, Root::Disk { .. });
        let state = tempfile::Builder::new().prefix("openshell-bench-disk-").tempdir()?;
        let argv = ["/bin/sh", "-c", &script(self.files, self.mib, disk)].iter().map(|s| s.to_string()).collect();
        let mut cfg = VmConfig::exec(a.kernel.clone(), a.rootfs.clone(), state.path().to_owned(), argv);
        cfg.vmm = self.vmm;
        cfg.root = root;
        let kind = cfg.root.kind();
        let (mut vm, _) = check::launch_checked(&cfg, Verification::Required)?;
        let exit = vm.wait(None, Some(RUN_TIMEOUT)).with_context(|| format!("the {kind}-root bench VM"))?;
        let console = std::fs::read_to_string(&vm.console).unwrap_or_default();
        drop(vm);
        anyhow::ensure!(
            matches!(exit, VmExit::Guest(0)),
            "the {kind}-root bench script ended with {exit:?}; console ends:\n{}",
            super::tail(&console, 20)
        );
        let phases = parse(&console);
        let mut want = vec!["find", "read", "create-tmpfs", "readback-tmpfs"];
        if disk {
            want.extend(["create-data-disk", "readback-data-disk", "dd-write", "dd-read"]);
        }
        for name in want {
            let p = phases.iter().find(|p| p.name == name);
            anyhow::ensure!(
                p.is_some_and(|p| p.count > 0 && p.seconds >= 0.0),
                "the {kind}-root guest reported no {name} phase with work done ({p:?}); console ends:\n{}",
                super::tail(&console, 20)
            );
        }
        // The 10 ms clock can read 0 for a fast phase; a rate over it would be infinite.
        Ok(phases.into_iter().map(|p| Phase { seconds: p.seconds.max(0.01), ..p }).collect())
    }
}

/// The guest's script (busybox ash). `t` is the guest clock; `phase NAME START COUNT` prints a
/// phase ending now; `fresh` syncs and drops the caches so the next phase reads its source.
fn script(files: usize, mib: usize, disk: bool) -> String {
    let mut s = format!(
        "t() {{ read u _ < /proc/uptime; echo $u; }}
phase() {{ echo \"{MARK} $1 $2 $(t) $3\"; }}
fresh() {{ sync; echo 3 > /proc/sys/vm/drop_caches; }}
make() {{ mkdir -p $1; fresh; s=$(t); i=0
  while [ $i -lt {files} ]; do echo $i > $1/f$i; i=$((i+1)); done
  sync; phase create-$2 $s $(ls -l $1 | grep -c '^-')
  fresh; s=$(t); phase readback-$2 $s $(cat $1/* | wc -l); }}
fresh; s=$(t); phase find $s $(find / -xdev | wc -l)
fresh; s=$(t); phase read $s $(find / -xdev -type f | xargs cat 2>/dev/null | wc -c)
make /tmp/disk-bench tmpfs
"
    );
    if disk {
        // On a disk root `/` is the overlay, whose writes land on the data disk.
        s.push_str(&format!(
            "make /disk-bench data-disk
fresh; s=$(t); dd if=/dev/zero of=/disk-bench/dd bs=1M count={mib} conv=fsync 2>/dev/null
phase dd-write $s $(($(stat -c %s /disk-bench/dd) / 1048576))
fresh; s=$(t); dd if=/disk-bench/dd of=/dev/null bs=1M 2>/dev/null; phase dd-read $s {mib}
"
        ));
    }
    s
}

/// The phases on the console: `disk-bench: NAME START END COUNT`, seconds from END - START.
fn parse(console: &str) -> Vec<Phase> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l[l.find(MARK)? + MARK.len()..].trim();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let [name, start, end, count] = f[..] else { return None };
            let (start, end): (f64, f64) = (start.parse().ok()?, end.parse().ok()?);
            // Rounded to the clock's 10 ms step: the subtraction's float noise is not a figure.
            let seconds = ((end - start) * 100.0).round() / 100.0;
            Some(Phase { name: name.to_owned(), seconds, count: count.parse().ok()? })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_read_from_console_lines() {
        let console = "[    1.0] random kernel line\ndisk-bench: find 1.50 1.75 412\n\
                       openshell-init: x\ndisk-bench: read 1.80 2.80 9437184\ndisk-bench: broken 1.0\n";
        let p = parse(console);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!((p[0].name.as_str(), p[0].count), ("find", 412));
        assert!((p[0].seconds - 0.25).abs() < 1e-9 && (p[1].seconds - 1.0).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn the_data_disk_phases_run_on_a_disk_root_only() {
        let share = script(10, 8, false);
        assert!(share.contains("make /tmp/disk-bench tmpfs") && !share.contains("data-disk") && !share.contains("dd "));
        let disk = script(10, 8, true);
        assert!(disk.contains("count=8 conv=fsync") && disk.contains("-lt 10 ]"), "{disk}");
    }
}

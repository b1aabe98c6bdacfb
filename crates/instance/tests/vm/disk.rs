//! Root disks (`--root disk`): the rootfs as a read-only ext4 image, with the VM's data disk
//! stacked on it by the guest's overlayfs. Each trial bakes its image into a store of its own
//! under its trial directory, so the tampering trial changes nothing another trial reads.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use openshell_artifacts::disk::{self, RootDiskSpec};
use openshell_vm::{Root, VmConfig, VmmChoice};

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("disk::gateway_on_an_ext4_root_answers_mtls_health", gateway_on_disk_root),
    ("disk::verify_warns_when_the_data_disk_is_nearly_full", verify_warns_on_a_nearly_full_data_disk),
    ("disk::data_disk_keeps_a_file_across_stop_and_run", data_disk_keeps_a_file),
    ("disk::reset_removes_the_data_disk", reset_removes_the_data_disk),
    ("disk::two_vms_on_one_root_disk_keep_their_writes_apart", two_vms_keep_their_writes_apart),
    ("disk::tampered_root_disk_is_refused_before_boot", tampered_root_disk_is_refused),
    ("disk::a_killed_guests_data_disk_is_replayed_at_the_next_boot", killed_guests_data_disk_is_replayed),
    ("disk::a_damaged_data_disk_stops_the_boot_naming_the_fix", damaged_data_disk_stops_the_boot),
];

/// The data disk the trials make: small, since each trial makes its own.
const DATA_MIB: u64 = 256;

/// What init prints once it has switched into the overlay.
const SWITCHED: &str = "root: overlay of /dev/vda (read-only) and data disk";

/// The trial's own root image of `a.rootfs`, baked into `dir/store`.
fn root_image(a: &Artifacts, dir: &TrialDir) -> Result<PathBuf, String> {
    let bundle = openshell_artifacts::rootfs::RootfsBundle::open(&a.rootfs).map_err(|e| e.to_string())?;
    let spec = RootDiskSpec::for_bundle(&bundle).map_err(|e| e.to_string())?;
    let store = openshell_artifacts::Store::new(dir.path().join("store"));
    Ok(disk::build(&store, &spec).map_err(|e| format!("baking the root disk: {e}"))?.image)
}

fn disk_root(a: &Artifacts, dir: &TrialDir) -> Result<Root, String> {
    Ok(Root::disk(root_image(a, dir)?, DATA_MIB))
}

/// Whether an ext4 image's journal needs replaying (`needs_recovery` among `dumpe2fs -h`'s
/// features): set while a journaled ext4 is mounted read-write, cleared by a clean unmount. Its
/// "Filesystem state" line says `clean` either way, so it proves nothing about an unmount.
fn needs_recovery(image: &Path) -> Result<bool, String> {
    let out = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .map_err(|e| format!("dumpe2fs (apt-get install -y e2fsprogs): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Filesystem features:"))
        .map(|f| f.split_whitespace().any(|x| x == "needs_recovery"))
        .ok_or_else(|| format!("dumpe2fs -h {} printed no features: {text}", image.display()))
}

fn gateway_on_disk_root(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let root = match disk_root(a, &dir) {
        Ok(r) => r,
        Err(e) => return Err(dir.fail(e)),
    };
    let booted = support::with_free_port(|port| {
        let mut g = support::gateway(a, vmm, &dir.path().join("gateways"), port)?;
        g.req.vm.root = Some(root.clone());
        let up = g.boot().map_err(|e| format!("boot: {e}"))?;
        Ok((g, up))
    });
    let (g, mut up) = match booted {
        Ok(b) => b,
        Err(e) => return Err(dir.fail(e)),
    };
    let result = (|| {
        crate::trials::served(&up.endpoint, &crate::trials::own_client(&g.inst)?)?;
        let console = std::fs::read_to_string(&up.vm.console).unwrap_or_default();
        if !console.contains(SWITCHED) {
            return Err(format!("the guest served, but not from the overlay on its disks; console:\n{console}"));
        }
        let data = g.inst.vm_dir().join(openshell_vm::DATA_DISK_FILE);
        if !data.is_file() {
            return Err(format!("no data disk at {}", data.display()));
        }
        support::note(format!("gateway on an ext4 root: VMM start -> mTLS SERVING {} ms", up.ready.as_millis()));
        // verify reads the image back from the VMM's command line and re-hashes it...
        let matrix = openshell_instance::verify::verify(&g.inst).map_err(|e| format!("verify could not run: {e}"))?;
        let row = |m: &openshell_matrix::Matrix| m.rows.iter().find(|r| r.id == "rootfs-digest").cloned();
        let passed = row(&matrix).ok_or("verify has no rootfs-digest row")?;
        let image = match &root {
            Root::Disk { image, .. } => image.clone(),
            Root::Share => unreachable!("a disk root"),
        };
        if matrix.exit_code() != 0 || !passed.reason.contains(&image.display().to_string()) {
            return Err(format!("verify of a healthy disk-root gateway:\n{}", matrix.render()));
        }
        // The image was read through the VMM's own descriptor, and the disk rows judged this root.
        if !passed.reason.contains(&format!("read through /proc/{}/fd/", up.vm.pid())) {
            return Err(format!("rootfs-digest was not read through the VMM's fd:\n{}", matrix.render()));
        }
        disk_rows_pass(&matrix, &image, &data)?;
        // `verify --json` prints this document: the disk rows are in it, with their verdicts.
        let json = matrix.to_json();
        let rows = json["rows"].as_array().ok_or("verify's JSON has no rows")?;
        for id in crate::verify::DISK_ROWS {
            if !rows.iter().any(|r| r["id"] == *id && r["status"] == "PASS" && r["required"] == true) {
                return Err(format!("verify's JSON lacks a required passing {id} row: {json}"));
            }
        }
        // ...and says so when it changed under the running guest.
        let mut bytes = std::fs::read(&image).map_err(|e| e.to_string())?;
        bytes[4096 + 100] ^= 1;
        std::fs::write(&image, bytes).map_err(|e| e.to_string())?;
        let matrix = openshell_instance::verify::verify(&g.inst).map_err(|e| format!("verify could not run: {e}"))?;
        let failed = row(&matrix).ok_or("verify has no rootfs-digest row")?;
        if failed.status != openshell_matrix::Status::Fail || !failed.reason.contains("the image hashes to") {
            return Err(format!("verify after the image changed:\n{}", matrix.render()));
        }
        Ok(())
    })();
    up.vm.stop();
    drop(up);
    result.map_err(|e| dir.fail(e))
}

/// The disk rows of a healthy disk-root gateway's matrix: each required and passing, and saying
/// what it found (the image read-only, the data disk read-write in the VMM and in the guest).
fn disk_rows_pass(matrix: &openshell_matrix::Matrix, image: &Path, data: &Path) -> Result<(), String> {
    let table = matrix.render();
    let row = |id: &str| matrix.row(id).cloned().ok_or_else(|| format!("verify has no {id} row:\n{table}"));
    let attached = row("disks-attached")?;
    let data = data.canonicalize().map_err(|e| format!("{}: {e}", data.display()))?;
    let want_attached = [
        format!("root image {} read-only", image.display()),
        format!("data disk {}", data.display()),
        "read-write".into(),
    ];
    let mounted = row("data-disk-mounted")?;
    let free = row("data-disk-free")?;
    let fine = |r: &openshell_matrix::Row| r.status == openshell_matrix::Status::Pass && r.required;
    if !fine(&attached) || !want_attached.iter().all(|w| attached.reason.contains(w.as_str())) {
        return Err(format!("disks-attached must pass naming {want_attached:?}:\n{table}"));
    }
    if !fine(&mounted)
        || !mounted.reason.starts_with("ext4 /dev/vd")
        || !mounted.reason.contains("/ is overlay read-write")
    {
        return Err(format!("data-disk-mounted must pass with ext4 read-write under an overlay /:\n{table}"));
    }
    // A fresh disk: free space is most of it (ext4's own metadata and journal take the rest).
    if !fine(&free) || !free.reason.contains("MiB free") {
        return Err(format!("data-disk-free must pass on a fresh {DATA_MIB} MiB disk:\n{table}"));
    }
    Ok(())
}

/// A data disk filled to within a few MiB before boot (a filler file written into it with
/// debugfs): the instance still serves, and `verify`'s free-space row warns, naming the fix,
/// while the matrix passes (a full disk is the workload's trouble, not a broken instance).
fn verify_warns_on_a_nearly_full_data_disk(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let result = (|| {
        let root = disk_root(a, &dir)?;
        support::with_free_port(|port| {
            let mut g = support::gateway(a, vmm, &dir.path().join("gateways"), port)?;
            let data = g.inst.vm_dir().join(openshell_vm::DATA_DISK_FILE);
            fill_data_disk(&data, &dir.path().join("filler"))?;
            g.req.vm.root = Some(root.clone());
            let mut up = g.boot().map_err(|e| format!("boot: {e}"))?;
            let matrix = openshell_instance::verify::verify(&g.inst).map_err(|e| format!("verify could not run: {e}"));
            up.vm.stop();
            let matrix = matrix?;
            let table = matrix.render();
            let free = matrix.row("data-disk-free").ok_or_else(|| format!("no data-disk-free row:\n{table}"))?;
            if free.status != openshell_matrix::Status::Warn
                || !free.reason.contains(&format!("under {}%", openshell_instance::verify::DATA_DISK_LOW_PERCENT))
                || !free.fix.contains("--disk-size")
            {
                return Err(format!(
                    "a nearly full data disk must warn on data-disk-free, naming --disk-size:\n{table}"
                ));
            }
            if matrix.exit_code() != 0 {
                return Err(format!("a nearly full data disk is a warning, not a failing instance:\n{table}"));
            }
            println!("{table}");
            Ok(())
        })
    })();
    result.map_err(|e| dir.fail(e))
}

/// Makes the smallest data disk at `data` and writes a file into it that leaves a few MiB free
/// (non-zero bytes, so debugfs cannot store it as holes).
fn fill_data_disk(data: &Path, filler: &Path) -> Result<(), String> {
    std::fs::create_dir_all(data.parent().ok_or("the data disk has no directory")?).map_err(|e| e.to_string())?;
    disk::create_data_disk(data, disk::DATA_DISK_MIN_MIB).map_err(|e| e.to_string())?;
    std::fs::write(filler, vec![0xa5u8; (disk::DATA_DISK_MIN_MIB as usize - 10) << 20]).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("debugfs")
        .arg("-w")
        .arg("-R")
        .arg(format!("write {} filler", filler.display()))
        .arg(data)
        .output()
        .map_err(|e| format!("debugfs ({}): {e}", disk::INSTALL_HINT))?;
    let said = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || said.contains("rror") {
        return Err(format!("debugfs write into {}: {said}", data.display()));
    }
    Ok(())
}

/// Boots `cfg` and, once `ready_line` is on the console, asks the guest to stop as `vm stop` does
/// (the share's stop request: init stops the workload, reports its code, unmounts the data disk).
fn run_then_stop(cfg: &VmConfig, ready_line: &str) -> Result<(i32, String), String> {
    let vm = launch_until(cfg, ready_line)?;
    stop_asked(cfg, vm)
}

/// Boots `cfg` and returns its running VM once the guest printed `ready_line`.
fn launch_until(cfg: &VmConfig, ready_line: &str) -> Result<openshell_vm::RunningVm, String> {
    let mut vm = support::launch(cfg).map_err(|e| format!("launch: {e}"))?;
    let deadline = Instant::now() + support::GUEST_TIMEOUT;
    loop {
        let console = std::fs::read_to_string(cfg.console_path()).unwrap_or_default();
        if console.lines().any(|l| l.trim() == ready_line) {
            return Ok(vm);
        }
        if vm.exited().is_some() || Instant::now() > deadline {
            return Err(format!("the guest never printed {ready_line:?}; console:\n{}", support::tail(&console, 30)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asks the guest of `vm` to stop and waits for it: (exit code, console text).
fn stop_asked(cfg: &VmConfig, mut vm: openshell_vm::RunningVm) -> Result<(i32, String), String> {
    std::fs::write(cfg.share_dir().join(openshell_guest::STOP_REQUEST_FILE), b"").map_err(|e| e.to_string())?;
    let code = match vm.wait(None, Some(support::GUEST_TIMEOUT)).map_err(|e| e.to_string())? {
        openshell_vm::VmExit::Guest(c) => c,
        other => return Err(format!("the guest reported no exit code: {other}")),
    };
    Ok((code, std::fs::read_to_string(cfg.console_path()).unwrap_or_default()))
}

fn data_disk_keeps_a_file(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let result = (|| {
        let root = disk_root(a, &dir)?;
        // A token of this run only, so a file from any earlier run cannot pass for it.
        let token = format!("kept-{}-{}", std::process::id(), support::free_port());
        let write = format!(
            "echo {token} > /root/kept && mkdir -p /var/lib/app && echo more > /var/lib/app/state && echo written \
             || exit 9; while :; do sleep 0.1; done"
        );
        let mut cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", &write]);
        cfg.root = root;
        let data = cfg.data_disk_path();
        let (code, console) = run_then_stop(&cfg, "written")?;
        // The workload was stopped by SIGTERM (143), and the guest powered off after unmounting.
        if code != 143 || !console.contains(SWITCHED) || !console.contains("data disk unmounted") {
            return Err(format!("first boot: exit {code}; console:\n{}", support::tail(&console, 30)));
        }
        if needs_recovery(&data)? {
            return Err(format!("after the guest powered off, {} still needs recovery: not unmounted", data.display()));
        }
        // Run again: the same state directory, so the same data disk.
        cfg.exec.argv = ["/bin/sh", "-c", "echo seen: $(cat /root/kept) $(cat /var/lib/app/state)"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (code, console) = support::boot_to_exit(&cfg).map_err(|e| format!("second boot: {e}"))?;
        let want = format!("seen: {token} more");
        if code != 0 || !console.lines().any(|l| l.trim() == want) {
            return Err(format!(
                "second boot: exit {code}, expected {want:?}; console:\n{}",
                support::tail(&console, 30)
            ));
        }
        // Written through the overlay into the data disk's upper layer, not the image.
        Ok(())
    })();
    result.map_err(|e| dir.fail(e))
}

fn reset_removes_the_data_disk(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let result = (|| {
        let root = disk_root(a, &dir)?;
        let (g, mut up) = support::with_free_port(|port| {
            let mut g = support::gateway(a, vmm, &dir.path().join("gateways"), port)?;
            g.req.vm.root = Some(root.clone());
            let up = g.boot().map_err(|e| format!("boot: {e}"))?;
            Ok((g, up))
        })?;
        let data = g.inst.vm_dir().join(openshell_vm::DATA_DISK_FILE);
        let made = data.is_file();
        up.vm.stop();
        drop(up);
        if !made {
            return Err(format!("the disk-root gateway ran without a data disk at {}", data.display()));
        }
        if !data.is_file() {
            return Err(format!("stopping the gateway removed its data disk {}", data.display()));
        }
        // What `vm run --reset` does before it boots.
        g.inst.reset().map_err(|e| e.to_string())?;
        if data.exists() {
            return Err(format!("--reset left the data disk {}", data.display()));
        }
        Ok(())
    })();
    result.map_err(|e| dir.fail(e))
}

fn tampered_root_disk_is_refused(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    dir.expect_refusal_before_boot();
    let image = match root_image(a, &dir) {
        Ok(i) => i,
        Err(e) => return Err(dir.fail(e)),
    };
    // One bit of the image, in its first MiB (the superblock and group descriptors live there).
    let flipped = std::fs::read(&image).map(|mut b| {
        b[4096 + 100] ^= 1;
        b
    });
    if let Err(e) = flipped.and_then(|b| std::fs::write(&image, b)) {
        return Err(dir.fail(format!("cannot tamper with {}: {e}", image.display())));
    }
    let mut cfg = support::config(a, &dir, vmm, &["/bin/true"]);
    cfg.root = Root::disk(image.clone(), DATA_MIB);
    match openshell_instance::check::launch_checked(&cfg, openshell_instance::check::Verification::Required) {
        Ok(_) => Err(dir.fail("a tampered root disk image booted")),
        Err(e) => {
            let msg = e.to_string();
            let named = msg.contains("root-disk") && msg.contains(&image.display().to_string());
            if !named || !msg.contains("does not match its rootdisk.json") || cfg.console_path().exists() {
                return Err(dir.fail(format!("not refused before boot, or refused without naming the image: {msg}")));
            }
            if cfg.data_disk_path().exists() {
                return Err(dir.fail("refused, but a data disk was made first"));
            }
            Ok(())
        }
    }
}

/// The VMM killed under a guest that wrote (and synced) to its data disk: the disk is left
/// needing recovery, the next boot's kernel replays the journal on mount, the file is there, and
/// that guest's power-off leaves the disk clean.
fn killed_guests_data_disk_is_replayed(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let result = (|| {
        let mut cfg = support::config(
            a,
            &dir,
            vmm,
            &["/bin/sh", "-c", "echo survived > /root/f && sync && echo synced; while :; do sleep 0.1; done"],
        );
        cfg.root = disk_root(a, &dir)?;
        let data = cfg.data_disk_path();
        let mut vm = support::launch(&cfg).map_err(|e| format!("launch: {e}"))?;
        let deadline = Instant::now() + support::GUEST_TIMEOUT;
        while !std::fs::read_to_string(cfg.console_path()).unwrap_or_default().lines().any(|l| l.trim() == "synced") {
            if vm.exited().is_some() || Instant::now() > deadline {
                return Err("the guest never printed \"synced\"".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The VMM is signalled, the guest gets no say: its data disk stays mounted, as after a crash.
        vm.stop();
        drop(vm);
        if !needs_recovery(&data)? {
            return Err(format!(
                "after the VMM was killed, {} needs no recovery: the trial proves nothing",
                data.display()
            ));
        }
        cfg.exec.argv = ["/bin/sh", "-c", "echo seen: $(cat /root/f)"].iter().map(|s| s.to_string()).collect();
        let (code, console) = support::boot_to_exit(&cfg).map_err(|e| format!("second boot: {e}"))?;
        if code != 0 || !console.lines().any(|l| l.trim() == "seen: survived") {
            return Err(format!("after the replay: exit {code}; console:\n{}", support::tail(&console, 30)));
        }
        if needs_recovery(&data)? {
            return Err(format!("after the second, clean power-off {} still needs recovery", data.display()));
        }
        Ok(())
    })();
    result.map_err(|e| dir.fail(e))
}

/// A data disk that is no ext4 at all (overwritten on the host): init cannot mount it, says why
/// and what to do on the console, and powers off without an exit code rather than boot on a root
/// that would forget what it writes.
fn damaged_data_disk_stops_the_boot(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let result = (|| {
        let mut cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", "echo workload-ran"]);
        cfg.root = disk_root(a, &dir)?;
        let data = cfg.data_disk_path();
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| e.to_string())?;
        std::fs::write(&data, vec![0xa5u8; 8 << 20]).map_err(|e| e.to_string())?;
        let mut vm = support::launch(&cfg).map_err(|e| format!("launch: {e}"))?;
        let outcome = vm.wait(None, Some(support::GUEST_TIMEOUT));
        let console = std::fs::read_to_string(cfg.console_path()).unwrap_or_default();
        match outcome {
            Err(openshell_vm::VmError::NoExitCode { tail, .. }) => {
                let said = console.contains("cannot set up the disk root") && console.contains("data disk /dev/vdb");
                if !said || !tail.contains("e2fsck -f data.ext4") || console.contains("workload-ran") {
                    return Err(format!("no exit code, but not for the damaged disk; console:\n{console}"));
                }
                Ok(())
            }
            other => Err(format!("a guest with a damaged data disk ended with {other:?}; console:\n{console}")),
        }
    })();
    result.map_err(|e| dir.fail(e))
}

fn two_vms_keep_their_writes_apart(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let result = (|| {
        let image = root_image(a, &dir)?;
        let record = disk::RootDisk::open(image.parent().ok_or("the root image has no directory")?)
            .map_err(|e| e.to_string())?;
        // Both VMs write the same paths, one of them a file the image holds, and stay up.
        let write = |who: &str| {
            format!(
                "echo {who} > /root/who && echo {who} > /etc/hostname && sync && echo written || exit 9; \
                 while :; do sleep 0.1; done"
            )
        };
        let vm_config = |who: &str| {
            let mut cfg = support::config(a, &dir, vmm, &["/bin/sh", "-c", &write(who)]);
            cfg.state_dir = dir.path().join(format!("state-{who}"));
            cfg.root = Root::disk(image.clone(), DATA_MIB);
            cfg
        };
        let (cfg_a, mut cfg_b) = (vm_config("a"), vm_config("b"));
        let vm_a = launch_until(&cfg_a, "written")?;
        // B boots on the same image while A runs: it sees the image's files, not A's.
        cfg_b.exec.argv = ["/bin/sh", "-c", "echo b-sees: $(cat /root/who 2>&1) / $(cat /etc/hostname)"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (code, console_b) = support::boot_to_exit(&cfg_b).map_err(|e| format!("VM b: {e}"))?;
        let (code_a, console_a) = stop_asked(&cfg_a, vm_a)?;
        let hostname = std::fs::read_to_string(a.rootfs.join("etc/hostname")).map_err(|e| e.to_string())?;
        let want = format!("b-sees: cat: can't open '/root/who': No such file or directory / {}", hostname.trim());
        if code != 0 || !console_b.lines().any(|l| l.trim() == want) {
            return Err(format!(
                "VM b, booted from the image VM a was writing over: exit {code}, expected {want:?}; console:\n{}",
                support::tail(&console_b, 30)
            ));
        }
        if code_a != 143 || !console_a.contains("data disk unmounted") {
            return Err(format!("VM a: exit {code_a}; console:\n{}", support::tail(&console_a, 30)));
        }
        // A's writes are on A's data disk alone: the image is still what was baked.
        let found = disk::verify(&record).map_err(|e| format!("the shared root image after both boots: {e}"))?;
        if found != record.record.sha256 {
            return Err(format!("the root image changed: {} != {}", found.hex(), record.record.sha256.hex()));
        }
        Ok(())
    })();
    result.map_err(|e| dir.fail(e))
}

//! Profiles (`--profile`): the `debian` profile's root, Debian bookworm minbase + python3 baked
//! from the archive with our programs on their paths, booted as a read-only ext4 root disk with a
//! data disk. `cargo xtask e2e` bakes it and its disk once into the store
//! (`OPENSHELL_DEBIAN_ROOT`, `OPENSHELL_DEBIAN_ROOT_DISK`).

use std::path::PathBuf;

use libtest_mimic::Failed;
use openshell_vm::{Root, VmmChoice};

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] = &[
    ("profile::debian_gateway_serves_mtls_and_verifies", debian_gateway_serves_mtls_and_verifies),
    ("profile::debian_runs_python_and_keeps_what_it_writes", debian_runs_python_and_keeps_what_it_writes),
];

/// Small: each trial makes its own.
const DATA_MIB: u64 = 256;

/// The guest kernel of `a` with the debian profile's root, and that root's disk image.
fn debian(a: &Artifacts) -> Result<(Artifacts, PathBuf), String> {
    let get = |k: &str| std::env::var_os(k).map(PathBuf::from).filter(|p| p.exists());
    match (get(support::DEBIAN_ROOT_ENV), get(support::DEBIAN_ROOT_DISK_ENV)) {
        (Some(rootfs), Some(image)) => Ok((Artifacts { kernel: a.kernel.clone(), rootfs }, image)),
        _ => Err(format!(
            "{} / {} are not set to the debian profile's baked root and disk; run `cargo xtask e2e --vm`",
            support::DEBIAN_ROOT_ENV,
            support::DEBIAN_ROOT_DISK_ENV
        )),
    }
}

fn debian_gateway_serves_mtls_and_verifies(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let (deb, image) = match debian(a) {
        Ok(d) => d,
        Err(e) => return Err(dir.fail(e)),
    };
    let booted = support::with_free_port(|port| {
        let mut g = support::gateway(&deb, vmm, &dir.path().join("gateways"), port)?;
        g.req.vm.root = Some(Root::disk(image.clone(), DATA_MIB));
        g.req.vm.mem_mib = Some(openshell_instance::profile::DEBIAN.mem_mib);
        let up = g.boot().map_err(|e| format!("boot: {e}"))?;
        Ok((g, up))
    });
    let (g, mut up) = match booted {
        Ok(b) => b,
        Err(e) => return Err(dir.fail(e)),
    };
    let result = (|| {
        crate::trials::served(&up.endpoint, &crate::trials::own_client(&g.inst)?)?;
        support::note(format!("debian profile: VMM start -> mTLS SERVING {} ms", up.ready.as_millis()));
        let matrix = openshell_instance::verify::verify(&g.inst).map_err(|e| format!("verify could not run: {e}"))?;
        let digest = matrix.rows.iter().find(|r| r.id == "rootfs-digest").ok_or("verify has no rootfs-digest row")?;
        if matrix.exit_code() != 0 || !digest.reason.contains(&image.display().to_string()) {
            return Err(format!("verify of a debian-profile gateway:\n{}", matrix.render()));
        }
        Ok(())
    })();
    up.vm.stop();
    drop(up);
    result.map_err(|e| dir.fail(e))
}

fn debian_runs_python_and_keeps_what_it_writes(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    let result = (|| {
        let (deb, image) = debian(a)?;
        // A token of this run only, so no earlier run's file can pass for it.
        let token = format!("kept-{}-{}", std::process::id(), support::free_port());
        let write = format!(
            "import os, sys, platform\n\
             os.makedirs('/var/lib/trial', exist_ok=True)\n\
             open('/var/lib/trial/token', 'w').write('{token}')\n\
             print('python', platform.python_version(), open('/etc/debian_version').read().strip())"
        );
        let mut cfg = support::config(&deb, &dir, vmm, &["/usr/bin/python3", "-c", &write]);
        cfg.root = Root::disk(image, DATA_MIB);
        cfg.mem_mib = openshell_instance::profile::DEBIAN.mem_mib;
        let (code, console) = support::boot_to_exit(&cfg)?;
        let said = console.lines().find(|l| l.starts_with("python 3.")).map(str::to_owned);
        let Some(said) = said.filter(|_| code == 0) else {
            return Err(format!("python3 in the debian root: exit {code}; console:\n{}", support::tail(&console, 30)));
        };
        support::note(format!("debian profile: {said}"));
        // The same state directory, so the same data disk: what the first boot wrote is there.
        cfg.exec.argv = ["/usr/bin/python3", "-c", "print('seen', open('/var/lib/trial/token').read())"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (code, console) = support::boot_to_exit(&cfg)?;
        let want = format!("seen {token}");
        if code != 0 || !console.lines().any(|l| l.trim() == want) {
            return Err(format!(
                "second boot: exit {code}, expected {want:?}; console:\n{}",
                support::tail(&console, 30)
            ));
        }
        Ok(())
    })();
    result.map_err(|e| dir.fail(e))
}

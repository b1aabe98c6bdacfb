//! Host tools the workflows need: probed up front, all of them, and installed with apt-get when we
//! are root (a fresh CI machine); otherwise the error names the one command that installs them.

use std::path::Path;

use anyhow::{bail, Context};
use xshell::{cmd, Shell};

/// (what must exist, the Debian package that provides it)
pub const KERNEL: &[(&str, &str)] = &[
    ("/usr/src/linux-source-6.1.tar.xz", "linux-source-6.1"),
    ("bc", "bc"),
    ("bison", "bison"),
    ("flex", "flex"),
    ("/usr/include/libelf.h", "libelf-dev"),
    ("/usr/include/openssl/ssl.h", "libssl-dev"),
    ("make", "make"),
    ("gcc", "gcc"),
    ("xz", "xz-utils"),
];
pub const ROOTFS: &[(&str, &str)] = &[("/bin/busybox", "busybox-static"), ("/usr/include/stdio.h", "libc6-dev")];
pub const PASST: &[(&str, &str)] = &[("passt", "passt")];
pub const QEMU: &[(&str, &str)] = &[("qemu-system-x86_64", "qemu-system-x86")];
/// The nested host: QEMU runs L1, mmdebstrap bakes its root.
pub const NESTED: &[(&str, &str)] = &[("qemu-system-x86_64", "qemu-system-x86"), ("mmdebstrap", "mmdebstrap")];

fn present(what: &str) -> bool {
    if what.starts_with('/') {
        Path::new(what).exists()
    } else {
        which::which(what).is_ok()
    }
}

/// Makes sure every tool in `sets` exists, installing the missing packages when running as root.
pub fn ensure(sh: &Shell, sets: &[&[(&str, &str)]]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> =
        sets.iter().flat_map(|s| s.iter()).filter(|(w, _)| !present(w)).map(|(_, p)| *p).collect();
    missing.sort();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get install -y {}", missing.join(" "));
    let root = nix::unistd::geteuid().is_root();
    if !root || which::which("apt-get").is_err() {
        bail!("missing host packages: {}; install them with: sudo {install}", missing.join(", "));
    }
    eprintln!("installing missing host packages: {}", missing.join(" "));
    cmd!(sh, "apt-get update -qq").run().context("apt-get update failed")?;
    cmd!(sh, "apt-get install -y -qq {missing...}")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()
        .with_context(|| format!("`{install}` failed"))?;
    Ok(())
}

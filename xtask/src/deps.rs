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
/// A guest of another arch than the host's: its kernel and init are cross-built, and it boots under
/// that arch's QEMU.
pub const CROSS_AARCH64: &[(&str, &str)] = &[
    ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    // glibc for static guest programs (their crt-static link).
    ("/usr/aarch64-linux-gnu/lib/libc.a", "libc6-dev-arm64-cross"),
];
pub const CROSS_X86_64: &[(&str, &str)] = &[("x86_64-linux-gnu-gcc", "gcc-x86-64-linux-gnu")];
pub const QEMU_AARCH64: &[(&str, &str)] = &[("qemu-system-aarch64", "qemu-system-arm")];
/// The nested host: QEMU runs L1, mmdebstrap bakes its root.
pub const NESTED: &[(&str, &str)] = &[("qemu-system-x86_64", "qemu-system-x86"), ("mmdebstrap", "mmdebstrap")];

/// The cross toolchain a build for `arch` needs here: none for the host's own arch.
pub fn cross(arch: openshell_artifacts::Arch) -> &'static [(&'static str, &'static str)] {
    use openshell_artifacts::Arch;
    match (arch.cross_compile(), arch) {
        (None, _) => &[],
        (Some(_), Arch::Aarch64) => CROSS_AARCH64,
        (Some(_), Arch::X86_64) => CROSS_X86_64,
    }
}

/// The QEMU that emulates a guest of `arch`.
pub fn qemu(arch: openshell_artifacts::Arch) -> &'static [(&'static str, &'static str)] {
    match arch {
        openshell_artifacts::Arch::X86_64 => QEMU,
        openshell_artifacts::Arch::Aarch64 => QEMU_AARCH64,
    }
}

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
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
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

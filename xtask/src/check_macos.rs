//! `cargo xtask check-macos`: type-checks and lints the workspace for `aarch64-apple-darwin` on
//! Linux (`cargo clippy --target aarch64-apple-darwin … -D warnings`), so the code under
//! `cfg(target_os = "macos")` is compiled by every `cargo xtask test`, not first by the Mac job.
//! It owns what that takes on a Linux host and nothing more: the target's standard library
//! (rustup), a C compiler with Apple's libc headers for the build scripts that compile C (zig's,
//! from PyPI's `ziglang`, behind `ci/zig-cc-macos`), and krun-sys' pkg-config probe and bindgen
//! pointed at the check-only header `crates/krun/check-macos/libkrun.h`. Nothing is linked: no Mac
//! binary comes out of it, and linking, signing and HVF stay the Mac jobs' to prove (docs/macos.md).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use xshell::{cmd, Shell};

/// The Rust target checked.
const TARGET: &str = "aarch64-apple-darwin";
/// The zig release PyPI's `ziglang` ships that the check was made clean with.
const ZIGLANG: &str = "0.17.1";
/// Its own target dir, so checking for another target never invalidates the host build's.
const TARGET_DIR: &str = "target/check-apple";

#[derive(clap::Args)]
pub struct CheckMacosCmd {}

impl CheckMacosCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let sh = Shell::new()?;
        crate::deps::ensure(&sh, &[crate::deps::CHECK_MACOS])?;
        run(&sh)
    }
}

/// The check itself, once [`crate::deps::CHECK_MACOS`] is installed (`cargo xtask test` installs
/// it in its one round with everything else).
pub fn run(sh: &Shell) -> anyhow::Result<()> {
    if !cfg!(target_os = "linux") {
        bail!(
            "cargo xtask check-macos checks the macOS code from Linux; on a Mac, check it natively: \
             cargo clippy --workspace --exclude openshell-guest --all-targets -- -D warnings"
        );
    }
    let root = crate::project_root();
    let target_dir = root.join(TARGET_DIR);
    add_target(sh)?;
    let zig = ensure_zig(sh, &target_dir)?;
    // cargo's and the build crates' spelling of the target in variable names.
    let var = TARGET.replace('-', "_");
    // krun-sys' build script reruns on its own wrapper.h and pkg-config's variables only, not on
    // the header its bindings come from: a check-only header that gained a call would keep the
    // old bindings in this target dir. Its digest, as a directory pkg-config looks in and finds
    // empty, makes the variable change whenever the header does.
    let pc_dir = root.join("crates/krun/check-macos");
    let header = openshell_artifacts::sha256_file(&pc_dir.join("libkrun.h"))
        .with_context(|| format!("cannot read {}", pc_dir.join("libkrun.h").display()))?;
    let pc_path = std::env::join_paths([pc_dir.clone(), pc_dir.join(format!(".header-{}", header.short()))])?;
    let env = [
        // The C compiler for the target only: host build scripts keep the host's cc.
        (format!("CC_{var}"), root.join("ci/zig-cc-macos").into_os_string()),
        ("OPENSHELL_ZIG".to_owned(), zig.into_os_string()),
        // zig's caches under the check's target dir, not in the user's home.
        ("ZIG_GLOBAL_CACHE_DIR".to_owned(), target_dir.join("zig-cache").into_os_string()),
        ("ZIG_LOCAL_CACHE_DIR".to_owned(), target_dir.join("zig-cache").into_os_string()),
        // krun-sys' `pkg_config::probe_library("libkrun")` for the target: the check-only .pc.
        (format!("PKG_CONFIG_PATH_{var}"), pc_path),
        (format!("PKG_CONFIG_ALLOW_CROSS_{var}"), "1".into()),
    ];
    cmd!(
        sh,
        "cargo clippy --quiet --keep-going --target {TARGET} --target-dir {target_dir}
         --workspace --exclude openshell-guest --all-targets -- -D warnings"
    )
    .envs(env)
    .run()
    .with_context(|| {
        format!(
            "clippy found errors or warnings in the code built for {TARGET} (above): fix them in the macOS cfg \
             code, then run `cargo xtask check-macos` again"
        )
    })
}

/// `rustup target add` when the target's standard library is missing (once per toolchain).
fn add_target(sh: &Shell) -> anyhow::Result<()> {
    let installed = cmd!(sh, "rustup target list --installed")
        .quiet()
        .read()
        .context("cannot ask rustup for the installed targets; the check needs rustup (https://rustup.rs)")?;
    if installed.lines().any(|t| t.trim() == TARGET) {
        return Ok(());
    }
    cmd!(sh, "rustup target add {TARGET}")
        .run()
        .with_context(|| format!("`rustup target add {TARGET}` failed; run it by hand"))
}

/// The zig binary of `ziglang==ZIGLANG`, installed into a venv under the check's target dir the
/// first time (~440 MB unpacked; `cargo clean` removes it, the next check installs it again).
fn ensure_zig(sh: &Shell, target_dir: &Path) -> anyhow::Result<PathBuf> {
    let venv = target_dir.join(format!("ziglang-{ZIGLANG}"));
    crate::pypi::ensure(sh, &venv, "ziglang", ZIGLANG)?;
    zig_in(sh, &venv).with_context(|| format!("ziglang=={ZIGLANG} installed, but {} has no zig binary", venv.display()))
}

/// The zig binary the venv's `ziglang` package carries, if it is installed and runs.
fn zig_in(sh: &Shell, venv: &Path) -> Option<PathBuf> {
    let python = venv.join("bin/python");
    if !python.is_file() {
        return None;
    }
    let script = "import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), 'zig'))";
    let zig = PathBuf::from(cmd!(sh, "{python} -c {script}").quiet().ignore_stderr().read().ok()?);
    let version = cmd!(sh, "{zig} version").quiet().ignore_stderr().read().ok()?;
    (version.trim() == ZIGLANG).then_some(zig)
}

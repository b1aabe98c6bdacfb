//! Whether this run may build what it needs. By default xtask installs host packages, builds the
//! kernel, the guest programs, the VMM and the supervisor, bakes the rootfs and fetches gvproxy
//! when they are missing. With `OPENSHELL_BUILD=never` it only takes what is already built: no apt,
//! no cargo, no kernel build, no bake, no fetch. That is how the CLI runs on a host without the
//! toolchain or the project's sources, such as the nested host the krun CLI trials run in.
//!
//! A key cannot be computed there (the kernel's needs the installed kernel source, the rootfs' the
//! guest programs' build), so the kernel and the rootfs are pinned by their store keys instead:
//! `OPENSHELL_KERNEL_KEY` and `OPENSHELL_ROOTFS_KEY` name the entries of the store (as
//! `OPENSHELL_CACHE_DIR` locates it) to boot, the guest kernel and root of the host's arch. The
//! VMM, the supervisor and gvproxy are the ones their usual lookups find (`OPENSHELL_VMM`,
//! `OPENSHELL_SUPERVISOR`, `OPENSHELL_GVPROXY` or the store).

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Context;
use openshell_artifacts::Store;

pub const ENV: &str = "OPENSHELL_BUILD";
const KERNEL_KEY: &str = "OPENSHELL_KERNEL_KEY";
const ROOTFS_KEY: &str = "OPENSHELL_ROOTFS_KEY";

/// Reads `OPENSHELL_BUILD` once, first thing in `main`, and refuses a value it does not know.
pub fn init() -> anyhow::Result<()> {
    NEVER.set(parse(std::env::var(ENV).ok().as_deref())?).ok();
    Ok(())
}

fn parse(value: Option<&str>) -> anyhow::Result<bool> {
    match value {
        None | Some("") => Ok(false),
        Some("never") => Ok(true),
        Some(other) => anyhow::bail!("{ENV}={other:?} is not a build policy: unset it, or set it to \"never\""),
    }
}

static NEVER: OnceLock<bool> = OnceLock::new();

/// Whether nothing may be built, installed or fetched in this run.
pub fn never() -> bool {
    *NEVER.get().expect("builds::init runs first in main")
}

/// The error for a step that would build, install or fetch `what` in a run that may not.
pub fn refused(what: &str) -> anyhow::Error {
    anyhow::anyhow!("{ENV}=never: {what} is not there, and this run builds, installs and fetches nothing; run it where the toolchain is, or unset {ENV}")
}

/// The pinned store entry of `kind` (`kernel`, `rootfs`) in a run that may not build.
pub fn pinned(store: &Store, kind: &str) -> anyhow::Result<PathBuf> {
    let var = if kind == openshell_artifacts::kernel::STORE_KIND { KERNEL_KEY } else { ROOTFS_KEY };
    pinned_by(store, kind, var, std::env::var(var).ok())
}

fn pinned_by(store: &Store, kind: &str, var: &str, key: Option<String>) -> anyhow::Result<PathBuf> {
    let key = key.filter(|k| !k.is_empty()).with_context(|| {
        format!("{ENV}=never takes the {kind} it boots by its store key, and {var} is not set; set it to the key directory's name under {}", store.root().join(kind).display())
    })?;
    let dir = store.root().join(kind).join(&key);
    let (done, make) =
        if kind == openshell_artifacts::rootfs::STORE_KIND { ("baked", "bake") } else { ("built", "build") };
    anyhow::ensure!(
        dir.is_dir(),
        "no {kind} has been {done} as {var}={key} names it (the store has no {}); {make} it with `cargo xtask {kind}` where the toolchain is",
        dir.display()
    );
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_never_or_nothing_is_a_policy() {
        assert!(!parse(None).unwrap());
        assert!(!parse(Some("")).unwrap());
        assert!(parse(Some("never")).unwrap());
        let e = parse(Some("no")).unwrap_err().to_string();
        assert!(e.contains("OPENSHELL_BUILD=\"no\" is not a build policy"), "{e}");
    }

    #[test]
    fn a_pin_names_an_entry_the_store_has() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().to_owned());
        std::fs::create_dir_all(tmp.path().join("rootfs/abc123")).unwrap();
        let got = pinned_by(&store, "rootfs", ROOTFS_KEY, Some("abc123".into())).unwrap();
        assert_eq!(got, tmp.path().join("rootfs/abc123"));
        let unset = pinned_by(&store, "rootfs", ROOTFS_KEY, None).unwrap_err().to_string();
        assert!(unset.contains("OPENSHELL_ROOTFS_KEY is not set"), "{unset}");
        let absent = pinned_by(&store, "kernel", KERNEL_KEY, Some("abc123".into())).unwrap_err().to_string();
        assert!(absent.contains("no kernel has been built") && absent.contains("cargo xtask kernel"), "{absent}");
    }
}

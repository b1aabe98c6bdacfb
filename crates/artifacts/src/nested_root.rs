//! The nested host's root directory (L1): Debian minbase from the archive plus passt and e2fsprogs, with the
//! guest's own init (`openshell-init`) as PID 1, so L1 runs the command in `exec.json` from its share
//! and writes the exit code back exactly as a guest does.
//!
//! Content-addressed like the rootfs: keyed by the sha256 of the recipe (suite, sources, packages,
//! the `mmdebstrap` options) and of the init, and recorded by the same [`Manifest`], which
//! [`rootfs::verify`](crate::rootfs::verify) re-hashes. The archive moves, so two bakes of one key on
//! different days can differ in content; the manifest and `nested-root.json` (every package with its
//! version) record what this one holds. It does not hold the guest artifacts, `openshell-vmm` or the
//! test binary: those are shared into L1 when it boots.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::command::{capture, run};
use crate::rootfs::{self, RootfsBundle, RootfsError, MANIFEST};
use crate::store::StoreError;
use crate::{sha256_file, Digest, DigestBuilder, Store};

pub const STORE_KIND: &str = "nested-root";
pub const INSTALL_HINT: &str = "apt-get install -y mmdebstrap";
/// Where the bake records what it installed, inside the tree (so the manifest covers it too).
pub const PROVENANCE: &str = "nested-root.json";
/// Where the init goes; Debian's `/sbin` is a link into `/usr/sbin`, which the kernel follows.
const INIT_DEST: &str = "usr/sbin/openshell-init";
/// L1's root is read-only, and init writes the nameserver it learns to `/run/resolv.conf` (as in
/// the guest's rootfs): without this link L1 keeps the build host's resolver, which it cannot reach.
const LINKS: &[(&str, &str)] = &[("etc/resolv.conf", "../run/resolv.conf")];
/// Files minbase leaves out that a program run in L1 reads: gvproxy (the `gvproxy::` trials run it
/// beside libkrun) refuses to start without `/etc/hosts` ("cannot add network services: open
/// /etc/hosts: no such file or directory").
const FILES: &[(&str, &str)] = &[("etc/hosts", "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n")];

/// Debian's suite: the host's (bookworm), so `openshell-vmm` and the test binary built on the host
/// find the same glibc in L1.
pub const SUITE: &str = "bookworm";
/// The archive, security updates included.
pub const SOURCES: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];
/// On top of minbase (which brings libc6 and libgcc-s1, all `openshell-vmm` links): passt, which
/// carries L2's network inside L1, and e2fsprogs, whose mke2fs makes the data disks (and the disk
/// trials' root images) of `--root disk` boots where the VMM runs. Nothing else: the trials bring
/// their own clients.
pub const PACKAGES: &[&str] = &["passt", "e2fsprogs"];
/// `mmdebstrap` options of the recipe. Documentation is dropped (a third of the tree, never read).
/// A `kvm` group, as Debian's udev package adds it (minbase has no udev): the VMM inside L1 starts
/// as `nobody` (minbase has it) with `/dev/kvm`'s group, which L1's init gives the device
/// (`openshell_vm::nested`).
const MMDEBSTRAP_OPTIONS: &[&str] = &[
    "--variant=minbase",
    "--customize-hook=chroot \"$1\" groupadd --system kvm",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
];

#[derive(Debug, thiserror::Error)]
pub enum NestedRootError {
    #[error("mmdebstrap is not installed; install it with: {INSTALL_HINT}")]
    NoMmdebstrap,
    #[error("{path} is missing; build the guest programs (`cargo xtask rootfs` does)")]
    NoInit { path: PathBuf },
    #[error(
        "`{command}` failed: {detail}; its output is above. Is Debian's archive reachable (http://deb.debian.org)?"
    )]
    Command { command: String, detail: String },
    #[error("nested root I/O at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("no nested root has been baked for the current recipe; run `cargo xtask nested-host`")]
    NotBuilt,
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<crate::command::CommandFailed> for NestedRootError {
    fn from(crate::command::CommandFailed { command, detail }: crate::command::CommandFailed) -> Self {
        NestedRootError::Command { command, detail }
    }
}

/// The inputs of a nested root.
#[derive(Debug, Clone)]
pub struct NestedRootInputs {
    pub suite: String,
    pub sources: Vec<String>,
    pub packages: Vec<String>,
    /// `openshell-init`, built static for the guest.
    pub init: PathBuf,
}

impl NestedRootInputs {
    /// The project's recipe with `init` as PID 1.
    pub fn recipe(init: PathBuf) -> NestedRootInputs {
        NestedRootInputs {
            suite: SUITE.into(),
            sources: SOURCES.iter().map(|s| s.to_string()).collect(),
            packages: PACKAGES.iter().map(|s| s.to_string()).collect(),
            init,
        }
    }

    /// Content address: the recipe and the init's digest.
    pub fn key(&self) -> Result<Digest, NestedRootError> {
        let mut b = DigestBuilder::new("openshell-nested-root/v1");
        b.str("suite", &self.suite);
        for s in &self.sources {
            b.str("source", s);
        }
        for p in &self.packages {
            b.str("package", p);
        }
        for o in MMDEBSTRAP_OPTIONS {
            b.str("option", o);
        }
        for (link, target) in LINKS {
            b.str("link", &format!("{link} -> {target}"));
        }
        for (file, text) in FILES {
            b.str("file", &format!("{file}: {text}"));
        }
        b.digest("init", &sha256_file(&self.init).map_err(|_| NestedRootError::NoInit { path: self.init.clone() })?);
        Ok(b.finish())
    }

    fn check(&self) -> Result<(), NestedRootError> {
        if !self.init.is_file() {
            return Err(NestedRootError::NoInit { path: self.init.clone() });
        }
        Ok(())
    }
}

/// `nested-root.json`: what the bake installed, from where, and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NestedRootProvenance {
    pub suite: String,
    pub sources: Vec<String>,
    pub key: Digest,
    /// `name version` of every installed package, sorted.
    pub packages: Vec<String>,
    pub init_sha256: Digest,
    pub built_at_unix: u64,
    pub build_seconds: f64,
}

/// The nested root already baked for `inputs`, without baking.
pub fn locate(store: &Store, inputs: &NestedRootInputs) -> Result<RootfsBundle, NestedRootError> {
    inputs.check()?;
    let dir = store.get(STORE_KIND, &inputs.key()?).ok_or(NestedRootError::NotBuilt)?;
    Ok(RootfsBundle::open(&dir)?)
}

/// Reads the provenance a bake recorded in the tree.
pub fn provenance(bundle: &RootfsBundle) -> Result<NestedRootProvenance, NestedRootError> {
    let path = bundle.dir.join(PROVENANCE);
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text)
        .map_err(|e| NestedRootError::Io { path, source: std::io::Error::new(std::io::ErrorKind::InvalidData, e) })
}

/// Disk a bake needs: a Debian minbase tree with passt is ~530 MiB in the store here.
const BAKE_BYTES: u64 = 640 << 20;

/// Bakes the nested root for `inputs` unless the store has it (about a minute: the packages come
/// from the archive). `on_line` sees every line of `mmdebstrap`'s output.
pub fn bake(
    store: &Store,
    inputs: &NestedRootInputs,
    on_line: &mut dyn FnMut(&str),
) -> Result<RootfsBundle, NestedRootError> {
    inputs.check()?;
    let key = inputs.key()?;
    if let Some(dir) = store.get(STORE_KIND, &key) {
        return Ok(RootfsBundle::open(&dir)?);
    }
    if which_mmdebstrap().is_none() {
        return Err(NestedRootError::NoMmdebstrap);
    }
    let dir = store.get_or_build(STORE_KIND, &key, BAKE_BYTES, |out| bake_into(inputs, &key, out, on_line))?;
    Ok(RootfsBundle::open(&dir)?)
}

fn which_mmdebstrap() -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("mmdebstrap")).find(|p| p.is_file())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NestedRootError {
    let path = path.to_owned();
    move |source| NestedRootError::Io { path, source }
}

fn bake_into(
    inputs: &NestedRootInputs,
    key: &Digest,
    out: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), NestedRootError> {
    let started = Instant::now();
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(MMDEBSTRAP_OPTIONS);
    if !inputs.packages.is_empty() {
        cmd.arg(format!("--include={}", inputs.packages.join(",")));
    }
    cmd.arg(&inputs.suite).arg(out).args(&inputs.sources);
    run(&mut cmd, on_line)?;
    // Device nodes: mmdebstrap makes a few in /dev, which the init covers with devtmpfs anyway, and a
    // manifest must not hash /dev/zero.
    let dev = out.join("dev");
    fs::remove_dir_all(&dev).and_then(|()| fs::create_dir(&dev)).map_err(io(&dev))?;
    for (link, target) in LINKS {
        let path = out.join(link);
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path).map_err(io(&path))?;
    }
    for (file, text) in FILES {
        let path = out.join(file);
        fs::write(&path, text).map_err(io(&path))?;
    }
    let init = out.join(INIT_DEST);
    fs::copy(&inputs.init, &init).map_err(io(&init))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).map_err(io(&init))?;
    let admindir = out.join("var/lib/dpkg");
    let listed = capture(
        Command::new("dpkg-query").arg("--admindir").arg(&admindir).args(["-W", "-f=${Package} ${Version}\\n"]),
    )?;
    let mut packages: Vec<String> = listed.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
    packages.sort();
    let provenance = NestedRootProvenance {
        suite: inputs.suite.clone(),
        sources: inputs.sources.clone(),
        key: key.clone(),
        packages,
        init_sha256: sha256_file(&init).map_err(io(&init))?,
        built_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        build_seconds: started.elapsed().as_secs_f64(),
    };
    let path = out.join(PROVENANCE);
    fs::write(&path, serde_json::to_string_pretty(&provenance).expect("provenance serializes")).map_err(io(&path))?;
    let manifest = rootfs::scan(out)?;
    let path = out.join(MANIFEST);
    fs::write(&path, serde_json::to_string_pretty(&manifest).expect("manifest serializes")).map_err(io(&path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(dir: &Path) -> NestedRootInputs {
        let init = dir.join("openshell-init");
        fs::write(&init, b"\x7fELF init").unwrap();
        NestedRootInputs::recipe(init)
    }

    #[test]
    fn key_follows_the_recipe_and_the_init() {
        let t = tempfile::tempdir().unwrap();
        let base = inputs(t.path());
        let key = base.key().unwrap();
        assert_eq!(key, base.clone().key().unwrap());
        let mut more = base.clone();
        more.packages.push("curl".into());
        assert_ne!(more.key().unwrap(), key);
        let mut other_suite = base.clone();
        other_suite.suite = "trixie".into();
        assert_ne!(other_suite.key().unwrap(), key);
        fs::write(&base.init, b"\x7fELF newer init").unwrap();
        assert_ne!(base.key().unwrap(), key);
    }

    #[test]
    fn missing_init_names_the_file_and_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let inp = NestedRootInputs::recipe(t.path().join("nope"));
        let err = bake(&Store::new(t.path()), &inp, &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("cargo xtask rootfs"), "{err}");
    }
}

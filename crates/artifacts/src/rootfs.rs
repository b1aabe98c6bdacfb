//! The guest root directory: busybox-static and its applets, the project's `rootfs/` overlay
//! (`/etc` basics) and the guest programs, plus `manifest.json` with the sha256 of every file.
//!
//! libkrun shares it over virtio-fs and QEMU over virtio-9p, read-only: the guest writes only to
//! tmpfs and to its per-instance share, so the manifest stays true for as long as the artifact
//! lives, and [`verify`] can prove it.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::store::StoreError;
use crate::{sha256_file, Digest, DigestBuilder, Store};

pub const STORE_KIND: &str = "rootfs";
pub const MANIFEST: &str = "manifest.json";
pub const BUSYBOX: &str = "/bin/busybox";
pub const INSTALL_HINT: &str = "apt-get install -y busybox-static";

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{path} is missing: {hint}")]
    Missing { path: PathBuf, hint: String },
    #[error("rootfs I/O at {path}: {source}{}", if source.kind() == std::io::ErrorKind::StorageFull {
        "; the disk holding the artifact store is full: free space there, or set OPENSHELL_CACHE_DIR to a directory on a disk with room"
    } else { "" })]
    Io { path: PathBuf, source: std::io::Error },
    #[error("rootfs {dir} has no readable {MANIFEST}; rebuild it with `cargo xtask rootfs`")]
    NoManifest { dir: PathBuf },
    #[error("rootfs file {path} does not match its manifest: recorded {recorded}, found {found}")]
    Tampered { path: String, recorded: String, found: String },
    #[error("no rootfs has been baked for the current inputs; run `cargo xtask rootfs`")]
    NotBuilt,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A file to place into the guest: `dest` is absolute inside the guest.
#[derive(Debug, Clone)]
pub struct GuestFile {
    pub source: PathBuf,
    pub dest: String,
    pub mode: u32,
}

/// The inputs of a rootfs.
#[derive(Debug, Clone)]
pub struct RootfsInputs {
    /// The busybox the guest runs.
    pub busybox: PathBuf,
    /// A busybox of the same version that runs on this host, asked for the applet list
    /// (`--list-full`): `busybox` itself unless the guest's arch is foreign.
    pub applet_lister: PathBuf,
    /// The project's `rootfs/` directory, copied as-is.
    pub overlay: PathBuf,
    /// Guest programs built for the guest (statically linked).
    pub programs: Vec<GuestFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub sha256: Digest,
    pub mode: u32,
}

/// `manifest.json`: every regular file and symlink of the tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, ManifestEntry>,
    pub symlinks: BTreeMap<String, String>,
}

impl Manifest {
    /// The rootfs digest: sha256 of the manifest's canonical JSON.
    pub fn digest(&self) -> Digest {
        Digest::of_bytes(serde_json::to_string(self).expect("manifest serializes").as_bytes())
    }
}

/// A baked rootfs.
#[derive(Debug, Clone)]
pub struct RootfsBundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl RootfsBundle {
    pub fn open(dir: &Path) -> Result<RootfsBundle, RootfsError> {
        let text =
            fs::read_to_string(dir.join(MANIFEST)).map_err(|_| RootfsError::NoManifest { dir: dir.to_owned() })?;
        let manifest = serde_json::from_str(&text).map_err(|_| RootfsError::NoManifest { dir: dir.to_owned() })?;
        Ok(RootfsBundle { dir: dir.to_owned(), manifest })
    }

    pub fn digest(&self) -> Digest {
        self.manifest.digest()
    }
}

impl RootfsInputs {
    /// Content address: the digest of every input file, its destination and mode.
    pub fn key(&self) -> Result<Digest, RootfsError> {
        let mut b = DigestBuilder::new("openshell-rootfs/v1");
        b.digest("busybox", &hash(&self.busybox)?);
        // Only a foreign guest has a lister of its own; the host arch's key stays what it was.
        if self.applet_lister != self.busybox {
            b.digest("applet-lister", &hash(&self.applet_lister)?);
        }
        let overlay = walk_overlay(&self.overlay)?;
        for (rel, path) in &overlay.files {
            let mode = fs::symlink_metadata(path).map_err(io(path))?.permissions().mode();
            b.str("overlay", rel).digest("sha256", &hash(path)?).str("mode", &format!("{mode:o}"));
        }
        for (rel, target) in &overlay.symlinks {
            b.str("overlay-symlink", rel).str("target", target);
        }
        for p in &self.programs {
            b.str("program", &p.dest).digest("sha256", &hash(&p.source)?).str("mode", &format!("{:o}", p.mode));
        }
        Ok(b.finish())
    }

    /// About what a bake writes: every input file once, and room for the manifest.
    fn bytes(&self) -> Result<u64, RootfsError> {
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).map_err(io(p));
        let mut total = size(&self.busybox)? + (1 << 20);
        for p in &self.programs {
            total += size(&p.source)?;
        }
        for (_, path) in &walk_overlay(&self.overlay)?.files {
            total += size(path)?;
        }
        Ok(total)
    }

    fn check(&self) -> Result<(), RootfsError> {
        if !self.busybox.is_file() {
            return Err(RootfsError::Missing { path: self.busybox.clone(), hint: INSTALL_HINT.into() });
        }
        for p in &self.programs {
            if !p.source.is_file() {
                return Err(RootfsError::Missing {
                    path: p.source.clone(),
                    hint: "build the guest programs (`cargo xtask rootfs` does)".into(),
                });
            }
        }
        Ok(())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.to_owned();
    move |source| RootfsError::Io { path, source }
}

fn hash(path: &Path) -> Result<Digest, RootfsError> {
    sha256_file(path).map_err(io(path))
}

/// The rootfs already baked for `inputs`, without baking.
pub fn locate(store: &Store, inputs: &RootfsInputs) -> Result<RootfsBundle, RootfsError> {
    inputs.check()?;
    let dir = store.get(STORE_KIND, &inputs.key()?).ok_or(RootfsError::NotBuilt)?;
    RootfsBundle::open(&dir)
}

/// Bakes the rootfs for `inputs` unless the store has it.
pub fn bake(store: &Store, inputs: &RootfsInputs) -> Result<RootfsBundle, RootfsError> {
    inputs.check()?;
    let key = inputs.key()?;
    let dir = store.get_or_build(STORE_KIND, &key, inputs.bytes()?, |out| bake_into(inputs, out))?;
    RootfsBundle::open(&dir)
}

fn bake_into(inputs: &RootfsInputs, out: &Path) -> Result<(), RootfsError> {
    fs::set_permissions(out, fs::Permissions::from_mode(0o755)).map_err(io(out))?;
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root", "var"] {
        fs::create_dir_all(out.join(d)).map_err(io(&out.join(d)))?;
    }
    place(&inputs.busybox, out, BUSYBOX, 0o755)?;
    let list = Command::new(&inputs.applet_lister).arg("--list-full").output().map_err(io(&inputs.applet_lister))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|l| !l.is_empty()) {
        let link = out.join(applet);
        if applet == "bin/busybox" || link.exists() {
            continue;
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        symlink(BUSYBOX, &link).map_err(io(&link))?;
    }
    let overlay = walk_overlay(&inputs.overlay)?;
    for (rel, path) in &overlay.files {
        let mode = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o7777;
        place(path, out, &format!("/{rel}"), mode)?;
    }
    for (rel, target) in &overlay.symlinks {
        let link = out.join(rel);
        let _ = fs::remove_file(&link);
        symlink(target, &link).map_err(io(&link))?;
    }
    for p in &inputs.programs {
        place(&p.source, out, &p.dest, p.mode)?;
    }
    let manifest = scan(out)?;
    let path = out.join(MANIFEST);
    fs::write(&path, serde_json::to_string_pretty(&manifest).expect("manifest serializes")).map_err(io(&path))?;
    Ok(())
}

fn place(source: &Path, root: &Path, dest: &str, mode: u32) -> Result<(), RootfsError> {
    let target = root.join(dest.trim_start_matches('/'));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let _ = fs::remove_file(&target);
    fs::copy(source, &target).map_err(io(&target))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(mode)).map_err(io(&target))?;
    Ok(())
}

/// What an overlay directory holds: its regular files as (relative path, full path), and its
/// symlinks as (relative path, target), e.g. `etc/resolv.conf` → `../run/resolv.conf` (the rootfs
/// is read-only, so files the guest must write point into its tmpfs). Both sorted.
#[derive(Default)]
struct Overlay {
    files: Vec<(String, PathBuf)>,
    symlinks: Vec<(String, String)>,
}

fn walk_overlay(dir: &Path) -> Result<Overlay, RootfsError> {
    let mut out = Overlay::default();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(io(&d))? {
            let path = entry.map_err(io(&d))?.path();
            let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
            let rel = || path.strip_prefix(dir).expect("under dir").to_string_lossy().into_owned();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                out.files.push((rel(), path));
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).map_err(io(&path))?.to_string_lossy().into_owned();
                out.symlinks.push((rel(), target));
            }
        }
    }
    out.files.sort();
    out.symlinks.sort();
    Ok(out)
}

/// Builds the manifest of a tree (excluding the manifest itself).
pub fn scan(root: &Path) -> Result<Manifest, RootfsError> {
    let mut m = Manifest::default();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(io(&d))? {
            let path = entry.map_err(io(&d))?.path();
            let rel = format!("/{}", path.strip_prefix(root).expect("under root").to_string_lossy());
            if rel == format!("/{MANIFEST}") {
                continue;
            }
            let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).map_err(io(&path))?;
                m.symlinks.insert(rel, target.to_string_lossy().into_owned());
            } else if meta.is_file() {
                let entry = ManifestEntry { sha256: hash(&path)?, mode: meta.permissions().mode() & 0o7777 };
                m.files.insert(rel, entry);
            } else {
                // A device node, fifo or socket has no content to record (and hashing /dev/zero
                // would never end): a tree holding one is not a root we bake.
                let why =
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file, directory or symlink");
                return Err(RootfsError::Io { path, source: why });
            }
        }
    }
    Ok(m)
}

/// Re-hashes the tree and compares it with the recorded manifest, naming the first difference.
pub fn verify(bundle: &RootfsBundle) -> Result<(), RootfsError> {
    let found = scan(&bundle.dir)?;
    let recorded = &bundle.manifest;
    for (path, entry) in &recorded.files {
        match found.files.get(path) {
            Some(f) if f == entry => {}
            other => {
                // Same content with another mode is tampering too; say which, or the two digests
                // would read as equal.
                let found = match other {
                    None => "(missing)".into(),
                    Some(f) if f.sha256 == entry.sha256 => {
                        format!("{} with mode {:o} (recorded mode {:o})", f.sha256.hex(), f.mode, entry.mode)
                    }
                    Some(f) => f.sha256.hex(),
                };
                return Err(RootfsError::Tampered { path: path.clone(), recorded: entry.sha256.hex(), found });
            }
        }
    }
    if let Some(extra) = found.files.keys().find(|p| !recorded.files.contains_key(*p)) {
        return Err(RootfsError::Tampered {
            path: extra.clone(),
            recorded: "(absent)".into(),
            found: "(added)".into(),
        });
    }
    if found.symlinks != recorded.symlinks {
        return Err(RootfsError::Tampered {
            path: "(symlinks)".into(),
            recorded: "manifest".into(),
            found: "changed".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(tmp: &Path) -> RootfsInputs {
        let overlay = tmp.join("overlay");
        fs::create_dir_all(overlay.join("etc")).unwrap();
        fs::write(overlay.join("etc/hostname"), "gateway\n").unwrap();
        let _ = fs::remove_file(overlay.join("etc/resolv.conf"));
        symlink("../run/resolv.conf", overlay.join("etc/resolv.conf")).unwrap();
        let prog = tmp.join("init");
        fs::write(&prog, b"\x7fELF fake").unwrap();
        // A stand-in for busybox that answers --list-full like the real one.
        let bb = tmp.join("busybox");
        fs::write(&bb, "#!/bin/sh\necho bin/sh; echo usr/bin/env\n").unwrap();
        fs::set_permissions(&bb, fs::Permissions::from_mode(0o755)).unwrap();
        RootfsInputs {
            busybox: bb.clone(),
            applet_lister: bb,
            overlay,
            programs: vec![GuestFile { source: prog, dest: "/sbin/openshell-init".into(), mode: 0o755 }],
        }
    }

    #[test]
    fn bakes_links_applets_and_records_every_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let b = bake(&store, &inputs(tmp.path())).unwrap();
        assert_eq!(fs::read_link(b.dir.join("bin/sh")).unwrap(), Path::new(BUSYBOX));
        assert!(b.manifest.files.contains_key("/sbin/openshell-init"));
        assert!(b.manifest.files.contains_key("/etc/hostname"));
        assert_eq!(b.manifest.symlinks.get("/usr/bin/env").map(String::as_str), Some(BUSYBOX));
        assert_eq!(b.manifest.symlinks.get("/etc/resolv.conf").map(String::as_str), Some("../run/resolv.conf"));
        verify(&b).unwrap();
    }

    #[test]
    fn same_inputs_same_dir_changed_input_new_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let inp = inputs(tmp.path());
        let a = bake(&store, &inp).unwrap();
        assert_eq!(bake(&store, &inp).unwrap().dir, a.dir);
        fs::write(inp.overlay.join("etc/hostname"), "other\n").unwrap();
        let c = bake(&store, &inp).unwrap();
        assert_ne!(c.dir, a.dir);
        assert_ne!(c.digest(), a.digest());
    }

    #[test]
    fn verify_names_a_tampered_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let b = bake(&store, &inputs(tmp.path())).unwrap();
        fs::write(b.dir.join("etc/hostname"), "evil\n").unwrap();
        let err = verify(&b).unwrap_err().to_string();
        assert!(err.contains("/etc/hostname"), "{err}");
    }

    #[test]
    fn verify_names_a_changed_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let b = bake(&store, &inputs(tmp.path())).unwrap();
        fs::set_permissions(b.dir.join("sbin/openshell-init"), fs::Permissions::from_mode(0o777)).unwrap();
        let err = verify(&b).unwrap_err().to_string();
        assert!(err.contains("/sbin/openshell-init") && err.contains("mode 777 (recorded mode 755)"), "{err}");
    }

    #[test]
    fn missing_busybox_names_the_install_command() {
        let tmp = tempfile::tempdir().unwrap();
        let mut inp = inputs(tmp.path());
        inp.busybox = tmp.path().join("nope");
        let err = bake(&Store::new(tmp.path()), &inp).unwrap_err().to_string();
        assert!(err.contains("apt-get install -y busybox-static"), "{err}");
    }
}

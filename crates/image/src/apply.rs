//! Applying layer tars, in order, to a root directory: the OCI image-spec's changeset rules
//! (whiteouts, opaque directories, later entries replacing earlier ones of any type) and the file
//! metadata a root needs to boot (owners, setuid/setgid/sticky modes, xattrs, device nodes, FIFOs,
//! hard links, symlinks).
//!
//! The tree is written without ever following a symlink: every path is cleaned to plain
//! components (a `..` is refused), each parent on the way is checked with `lstat`, and an entry
//! whose parent is a symlink is refused rather than resolved, so no layer can write outside the
//! root. Layers made by diffing a real filesystem never need to write through a symlink.
//!
//! This module applies tars it is handed; it does not verify blobs (`layout` does that first).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{lchown, symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{io, ImageError};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// What this process may do to the tree it writes: a fact probed once (`geteuid`) and passed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// Owners, device nodes and `security.*` xattrs are applied as the layers say.
    Root,
    /// Files are owned by the caller, device nodes are skipped, and so are `security.*` xattrs
    /// (the kernel refuses them): enough to inspect an image, not to boot it.
    Rootless,
}

impl Privilege {
    pub fn of_this_process() -> Privilege {
        if nix::unistd::geteuid().is_root() {
            Privilege::Root
        } else {
            Privilege::Rootless
        }
    }
}

/// A directory's mode and mtime, applied once all layers are in: a later entry written inside it
/// would change its mtime, and a read-only mode would stop a rootless writer adding to it.
#[derive(Debug, Clone, Copy)]
struct DirMeta {
    mode: u32,
    mtime: Option<u64>,
}

/// The root being built.
pub struct Tree {
    root: PathBuf,
    privilege: Privilege,
    dirs: BTreeMap<PathBuf, DirMeta>,
    /// Device nodes a rootless unpack could not create.
    pub skipped_devices: u64,
}

impl Tree {
    /// A tree at `root` (created if missing).
    pub fn new(root: &Path, privilege: Privilege) -> Result<Tree, ImageError> {
        fs::create_dir_all(root).map_err(io(root))?;
        let mut dirs = BTreeMap::new();
        dirs.insert(PathBuf::new(), DirMeta { mode: 0o755, mtime: None });
        Ok(Tree { root: root.to_owned(), privilege, dirs, skipped_devices: 0 })
    }

    /// Applies one layer's (uncompressed) tar. `layer` is its 1-based position, for messages.
    pub fn apply_layer(&mut self, layer: usize, tar: impl Read) -> Result<(), ImageError> {
        let mut archive = tar::Archive::new(tar);
        let tar_err = |e: io::Error| ImageError::Malformed {
            path: PathBuf::from(format!("layer {layer}")),
            what: "layer tar",
            why: e.to_string(),
        };
        // Paths this layer wrote: its own whiteouts and opaque markers do not remove them.
        let mut written: HashSet<PathBuf> = HashSet::new();
        for entry in archive.entries().map_err(tar_err)? {
            let mut entry = entry.map_err(tar_err)?;
            let raw = entry.path().map_err(tar_err)?.into_owned();
            let refuse = |why: String| ImageError::UnsafeEntry { layer, entry: raw.display().to_string(), why };
            let rel = clean(&raw).map_err(refuse)?;
            let kind = entry.header().entry_type();
            if kind.is_pax_global_extensions() {
                continue;
            }
            if rel.as_os_str().is_empty() {
                // The root itself (`./`): only its metadata.
                if kind.is_dir() {
                    let meta = EntryMeta::read(&mut entry).map_err(tar_err)?;
                    self.set_owner_and_xattrs(&self.root.clone(), &meta, true)?;
                    self.dirs.insert(PathBuf::new(), DirMeta { mode: meta.mode, mtime: Some(meta.mtime) });
                }
                continue;
            }
            let name = rel.file_name().expect("a cleaned non-empty path has a last component").to_string_lossy();
            let parent_rel = rel.parent().unwrap_or(Path::new("")).to_owned();
            if name == OPAQUE {
                let Some(dir) = self.existing_dir(&parent_rel).map_err(refuse)? else { continue };
                for child in fs::read_dir(&dir).map_err(io(&dir))? {
                    let child = child.map_err(io(&dir))?;
                    let child_rel = parent_rel.join(child.file_name());
                    if !written.contains(&child_rel) {
                        self.remove(&child_rel)?;
                    }
                }
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                let target_rel = parent_rel.join(hidden);
                let target_rel = clean(&target_rel).map_err(refuse)?;
                if !written.contains(&target_rel) && self.existing_dir(&parent_rel).map_err(refuse)?.is_some() {
                    self.remove(&target_rel)?;
                }
                continue;
            }
            let parent = self.make_parents(&parent_rel, &mut written).map_err(refuse)?;
            let path = parent.join(&*name);
            let existing = fs::symlink_metadata(&path).ok();
            let meta = EntryMeta::read(&mut entry).map_err(tar_err)?;
            written.insert(rel.clone());
            use tar::EntryType as T;
            match kind {
                T::Directory => {
                    if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                        if existing.is_some() {
                            self.remove(&rel)?;
                        }
                        fs::create_dir(&path).map_err(io(&path))?;
                    }
                    self.set_owner_and_xattrs(&path, &meta, true)?;
                    self.dirs.insert(rel, DirMeta { mode: meta.mode, mtime: Some(meta.mtime) });
                    continue;
                }
                T::Regular | T::Continuous | T::GNUSparse => {
                    if existing.is_some() {
                        self.remove(&rel)?;
                    }
                    let mut file =
                        fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(io(&path))?;
                    io::copy(&mut entry, &mut file).map_err(io(&path))?;
                }
                T::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(tar_err)?
                        .ok_or_else(|| refuse("a symlink without a target".into()))?
                        .into_owned();
                    if existing.is_some() {
                        self.remove(&rel)?;
                    }
                    symlink(&target, &path).map_err(io(&path))?;
                }
                T::Link => {
                    let target = entry
                        .link_name()
                        .map_err(tar_err)?
                        .ok_or_else(|| refuse("a hard link without a target".into()))?
                        .into_owned();
                    let target_rel = clean(&target).map_err(refuse)?;
                    if target_rel == rel {
                        continue;
                    }
                    let target_parent = self
                        .existing_dir(target_rel.parent().unwrap_or(Path::new("")))
                        .map_err(refuse)?
                        .ok_or_else(|| refuse(format!("its target {} does not exist", target_rel.display())))?;
                    let target_path = target_parent.join(target_rel.file_name().expect("non-empty"));
                    match fs::symlink_metadata(&target_path) {
                        Ok(m) if !m.is_dir() => {}
                        _ => return Err(refuse(format!("its target {} is not a file", target_rel.display()))),
                    }
                    if existing.is_some() {
                        self.remove(&rel)?;
                    }
                    // linkat(2) without AT_SYMLINK_FOLLOW: a link to a symlink is a link to the symlink.
                    fs::hard_link(&target_path, &path).map_err(io(&path))?;
                    // The inode's metadata is its first name's.
                    continue;
                }
                T::Char | T::Block | T::Fifo => {
                    if existing.is_some() {
                        self.remove(&rel)?;
                    }
                    if kind != T::Fifo && self.privilege == Privilege::Rootless {
                        self.skipped_devices += 1;
                        tracing::debug!(path = %rel.display(), "rootless: device node skipped");
                        written.remove(&rel);
                        continue;
                    }
                    let sflag = match kind {
                        T::Char => nix::sys::stat::SFlag::S_IFCHR,
                        T::Block => nix::sys::stat::SFlag::S_IFBLK,
                        _ => nix::sys::stat::SFlag::S_IFIFO,
                    };
                    // rustix's makedev exists on every target (nix's only on Linux), with the
                    // dev_t of each.
                    let dev = rustix::fs::makedev(meta.dev_major, meta.dev_minor);
                    nix::sys::stat::mknod(&path, sflag, nix::sys::stat::Mode::from_bits_truncate(0o600), dev)
                        .map_err(|e| ImageError::Io { path: path.clone(), source: e.into() })?;
                }
                other => {
                    return Err(ImageError::Unsupported(format!(
                        "layer {layer} entry {} has tar entry type {other:?}, which an image layer does not use",
                        raw.display()
                    )))
                }
            }
            let is_symlink = kind == T::Symlink;
            self.set_owner_and_xattrs(&path, &meta, !is_symlink && !matches!(kind, T::Char | T::Block | T::Fifo))?;
            if !is_symlink {
                // After chown, which clears setuid and setgid.
                fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode)).map_err(io(&path))?;
            }
            let t = filetime::FileTime::from_unix_time(meta.mtime as i64, 0);
            filetime::set_symlink_file_times(&path, t, t).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Applies the directories' modes and mtimes (deepest first, so setting a child's does not
    /// touch its parent's again) and counts what the tree holds.
    pub fn finish(self) -> Result<u64, ImageError> {
        for (rel, meta) in self.dirs.iter().rev() {
            let path = self.root.join(rel);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                _ => continue,
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode)).map_err(io(&path))?;
            if let Some(mtime) = meta.mtime {
                let t = filetime::FileTime::from_unix_time(mtime as i64, 0);
                filetime::set_symlink_file_times(&path, t, t).map_err(io(&path))?;
            }
        }
        count_entries(&self.root)
    }

    /// `rel`'s directory if it exists (without following symlinks), `None` if it does not.
    fn existing_dir(&self, rel: &Path) -> Result<Option<PathBuf>, String> {
        let mut cur = self.root.clone();
        for c in rel.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => return Err(through_symlink(rel, &cur, &self.root)),
                Ok(_) => return Ok(None),
                Err(_) => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// Creates `rel`'s missing directories (0755, like a tar that names a file before its
    /// directory) and returns its path; a symlink or a file on the way is refused.
    fn make_parents(&mut self, rel: &Path, written: &mut HashSet<PathBuf>) -> Result<PathBuf, String> {
        let mut cur = self.root.clone();
        let mut cur_rel = PathBuf::new();
        for c in rel.components() {
            cur.push(c);
            cur_rel.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => return Err(through_symlink(rel, &cur, &self.root)),
                Ok(_) => return Err(format!("its parent {} is not a directory", cur_rel.display())),
                Err(_) => {
                    fs::create_dir(&cur).map_err(|e| format!("cannot create {}: {e}", cur.display()))?;
                    self.dirs.insert(cur_rel.clone(), DirMeta { mode: 0o755, mtime: None });
                    written.insert(cur_rel.clone());
                }
            }
        }
        Ok(cur)
    }

    /// Removes `rel` whatever it is (a directory with everything below it; a symlink itself,
    /// never its target), and forgets the directories it held.
    fn remove(&mut self, rel: &Path) -> Result<(), ImageError> {
        let path = self.root.join(rel);
        let result = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {
                self.dirs.retain(|d, _| !d.starts_with(rel));
                fs::remove_dir_all(&path)
            }
            Ok(_) => fs::remove_file(&path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        result.map_err(io(&path))
    }

    fn set_owner_and_xattrs(&self, path: &Path, meta: &EntryMeta, user_xattrs: bool) -> Result<(), ImageError> {
        if self.privilege == Privilege::Root {
            lchown(path, Some(meta.uid), Some(meta.gid)).map_err(io(path))?;
        }
        for (name, value) in &meta.xattrs {
            let security = name.starts_with("security.");
            let allowed = match self.privilege {
                Privilege::Root => {
                    security || (name.starts_with("user.") && user_xattrs) || name.starts_with("trusted.")
                }
                Privilege::Rootless => name.starts_with("user.") && user_xattrs,
            };
            if !allowed {
                tracing::debug!(path = %path.display(), xattr = %name, "xattr not applied");
                continue;
            }
            xattr::set(path, name, value).map_err(io(path))?;
        }
        Ok(())
    }
}

fn through_symlink(rel: &Path, at: &Path, root: &Path) -> String {
    let at = at.strip_prefix(root).unwrap_or(at);
    format!(
        "its parent {} is a symlink, and writing through it could leave the root (wanted {})",
        at.display(),
        rel.display()
    )
}

/// A tar path as plain components below the root: `./a//b/` is `a/b`, `/a` is `a`, and any
/// `..` is refused (a layer has no business naming anything above where it stands).
pub(crate) fn clean(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => return Err("its path has a `..` component".into()),
            Component::Prefix(_) => return Err("its path has a prefix".into()),
        }
    }
    Ok(out)
}

/// The metadata of one tar entry that the tree keeps.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    dev_major: u32,
    dev_minor: u32,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl EntryMeta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<EntryMeta> {
        let h = entry.header();
        let bad = |what: &str, v: u64| io::Error::new(io::ErrorKind::InvalidData, format!("{what} {v} out of range"));
        let uid = h.uid()?;
        let gid = h.gid()?;
        // Only devices carry device numbers; other entries' fields may be blank.
        let device = matches!(h.entry_type(), tar::EntryType::Char | tar::EntryType::Block);
        let (dev_major, dev_minor) =
            if device { (h.device_major()?.unwrap_or(0), h.device_minor()?.unwrap_or(0)) } else { (0, 0) };
        let mut meta = EntryMeta {
            mode: h.mode()? & 0o7777,
            uid: u32::try_from(uid).map_err(|_| bad("uid", uid))?,
            gid: u32::try_from(gid).map_err(|_| bad("gid", gid))?,
            mtime: h.mtime()?,
            dev_major,
            dev_minor,
            xattrs: Vec::new(),
        };
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                let Ok(key) = ext.key() else { continue };
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    meta.xattrs.push((name.to_owned(), ext.value_bytes().to_vec()));
                } else if key == "mtime" {
                    // Seconds, maybe with a fraction: the tree keeps whole seconds.
                    if let Some(s) = ext.value().ok().and_then(|v| v.split('.').next()?.parse().ok()) {
                        meta.mtime = s;
                    }
                }
            }
        }
        Ok(meta)
    }
}

/// Everything below `root` (not `root` itself), of any type.
pub fn count_entries(root: &Path) -> Result<u64, ImageError> {
    let mut n = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(io(&d))? {
            let entry = entry.map_err(io(&d))?;
            n += 1;
            if entry.file_type().map_err(io(entry.path()))?.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(n)
}

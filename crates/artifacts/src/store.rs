//! The content-addressed artifact store: `<root>/<kind>/<key>/`, published by atomic rename.
//!
//! The default root is `$OPENSHELL_CACHE_DIR`, else `$XDG_CACHE_HOME/openshell-vm`, else
//! `~/.cache/openshell-vm`: outside the checkout, so a fresh clone on the same machine (CI) reuses a
//! kernel that took minutes to build.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot prepare the artifact store at {path}: {source} (set OPENSHELL_CACHE_DIR to a writable directory)")]
    Prepare { path: PathBuf, source: io::Error },
    #[error("cannot publish {path}: {source}")]
    Publish { path: PathBuf, source: io::Error },
    #[error(
        "not enough disk space for the {kind} at {dir}: it needs about {needed_mib} MiB and the filesystem holding it \
         has {free_mib} MiB free; free space there, or set OPENSHELL_CACHE_DIR to a directory on a disk with room"
    )]
    DiskFull { kind: String, dir: PathBuf, needed_mib: u64, free_mib: u64 },
}

/// Bytes free for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    // The field types differ by OS (fsblkcnt_t is 32 bits on macOS), hence the conversions.
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(st.blocks_available()) * u64::from(st.fragment_size()))
}

/// Whether a process with this pid exists: a temporary build directory of a live one is in use.
fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    // Signal 0 only checks for existence; EPERM means it exists under another user.
    matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Ok(()) | Err(nix::errno::Errno::EPERM))
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
    }

    /// The store at its default location (see the module docs).
    pub fn default_location() -> Self {
        Store::new(default_root())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the artifact of `kind` built from inputs `key` lives (whether or not it exists yet).
    pub fn path(&self, kind: &str, key: &Digest) -> PathBuf {
        self.root.join(kind).join(key.short())
    }

    /// A scratch directory for a build's work tree beside the store (`what`: its name, without
    /// dashes), removed when dropped, and by the next build if this process is killed first.
    pub fn scratch_dir(&self, what: &str) -> io::Result<tempfile::TempDir> {
        fs::create_dir_all(&self.root)?;
        tempfile::Builder::new().prefix(&format!("{TMP_PREFIX}{what}-{}-", std::process::id())).tempdir_in(&self.root)
    }

    /// The published directory for `(kind, key)`, if it has been built.
    pub fn get(&self, kind: &str, key: &Digest) -> Option<PathBuf> {
        let p = self.path(kind, key);
        p.is_dir().then_some(p)
    }

    /// Returns the directory for `(kind, key)`, running `build` into a fresh temporary directory
    /// first when it does not exist. Only a `build` that returns `Ok` is published, by renaming the
    /// temporary directory into place, so `get` never sees a half-built artifact; on error the
    /// temporary directory is removed. A build needing about `needed` bytes is refused up front,
    /// naming the disk, when the filesystem has less free.
    ///
    /// A process killed mid-build (Ctrl-C, SIGKILL, power loss) cannot remove its temporary
    /// directory, so each one carries its builder's pid and the next build of the same kind
    /// removes those whose builder is gone.
    pub fn get_or_build<E>(
        &self,
        kind: &str,
        key: &Digest,
        needed: u64,
        build: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<PathBuf, E>
    where
        E: From<StoreError>,
    {
        let dest = self.path(kind, key);
        if dest.is_dir() {
            return Ok(dest);
        }
        let parent = dest.parent().expect("store path has a parent");
        fs::create_dir_all(parent).map_err(|source| StoreError::Prepare { path: parent.to_owned(), source })?;
        sweep_abandoned(parent);
        sweep_abandoned(&self.root);
        let free = free_bytes(parent).map_err(|source| StoreError::Prepare { path: parent.to_owned(), source })?;
        if free < needed {
            let mib = |b: u64| b.div_ceil(1 << 20);
            return Err(StoreError::DiskFull {
                kind: kind.to_owned(),
                dir: parent.to_owned(),
                needed_mib: mib(needed),
                free_mib: free >> 20,
            }
            .into());
        }
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{TMP_PREFIX}{}-{}-", key.short(), std::process::id()))
            .tempdir_in(parent)
            .map_err(|source| StoreError::Prepare { path: parent.to_owned(), source })?;
        // Kept by hand rather than by TempDir's drop, which would recurse into whatever a killed
        // step left mounted inside (see `remove_unless_mounted`).
        let tmp_path = tmp.keep();
        if let Err(e) = build(&tmp_path) {
            remove_unless_mounted(&tmp_path);
            return Err(e);
        }
        match fs::rename(&tmp_path, &dest) {
            Ok(()) => Ok(dest),
            // Someone else published the same key meanwhile: same inputs, same artifact.
            Err(_) if dest.is_dir() => {
                remove_unless_mounted(&tmp_path);
                Ok(dest)
            }
            Err(source) => {
                remove_unless_mounted(&tmp_path);
                Err(StoreError::Publish { path: dest, source }.into())
            }
        }
    }
}

/// Temporary build directories: `.tmp-<key>-<pid>-<random>`, never a store entry (`get` looks
/// up `<key>` only).
const TMP_PREFIX: &str = ".tmp-";

/// Removes the temporary build directories under `parent` whose builder process is gone.
fn sweep_abandoned(parent: &Path) {
    for entry in fs::read_dir(parent).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TMP_PREFIX) else { continue };
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !alive(p)) {
            tracing::info!(dir = %entry.path().display(), "removing the temporary directory of an interrupted build");
            remove_unless_mounted(&entry.path());
        }
    }
}

/// Removes a temporary build directory, unless filesystems are still mounted below it: a killed
/// `mmdebstrap` leaves the host's `/proc`, `/sys` and a bind mount of the host's `/dev/shm` inside
/// its root, and removing recursively through that bind mount deletes the host's own files.
fn remove_unless_mounted(dir: &Path) {
    let mounted = mounts_below(dir);
    if mounted.is_empty() {
        let _ = fs::remove_dir_all(dir);
        return;
    }
    let list: Vec<String> = mounted.iter().map(|m| m.display().to_string()).collect();
    tracing::warn!(
        "not removing {}: {} filesystem(s) are still mounted below it ({}); run `umount -R` on each, then remove it",
        dir.display(),
        mounted.len(),
        list.join(", ")
    );
}

/// Mount points at or below `dir` (`/proc/self/mountinfo`; none where it cannot be read).
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_mount_points(&info).into_iter().filter(|m| m.starts_with(&dir)).collect()
}

/// Field 5 of each mountinfo line, with the kernel's octal escapes (`\040` for a space) undone.
fn parse_mount_points(info: &str) -> Vec<PathBuf> {
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            let mut out = Vec::new();
            let b = m.as_bytes();
            let mut i = 0;
            while i < b.len() {
                let octal = b.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(std::str::from_utf8(o).ok()?, 8).ok());
                match (b[i], octal) {
                    (b'\\', Some(c)) => {
                        out.push(c);
                        i += 4;
                    }
                    (c, _) => {
                        out.push(c);
                        i += 1;
                    }
                }
            }
            PathBuf::from(std::ffi::OsString::from(String::from_utf8_lossy(&out).into_owned()))
        })
        .collect()
}

fn default_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("OPENSHELL_CACHE_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("openshell-vm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E;
    impl From<StoreError> for E {
        fn from(_: StoreError) -> Self {
            E
        }
    }

    #[test]
    fn mount_points_are_read_with_their_escapes() {
        let info = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    90 30 0:5 /shm /root/.cache/x/.tmp-ab-1-z/dev/shm rw - tmpfs tmpfs rw\n\
                    91 30 0:6 / /mnt/a\\040b rw - tmpfs tmpfs rw\n";
        let points = parse_mount_points(info);
        assert_eq!(
            points,
            [PathBuf::from("/proc"), PathBuf::from("/root/.cache/x/.tmp-ab-1-z/dev/shm"), PathBuf::from("/mnt/a b")]
        );
    }

    #[test]
    #[cfg_attr(not(target_os = "linux"), ignore = "reads /proc/self/mountinfo, which macOS lacks")]
    fn a_directory_with_a_mount_below_it_is_kept() {
        // `/` has mounts below it on any Linux host (/proc at least); a fresh directory has none.
        assert!(!mounts_below(Path::new("/")).is_empty());
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("x");
        fs::create_dir(&inner).unwrap();
        assert!(mounts_below(dir.path()).is_empty());
        remove_unless_mounted(&inner);
        assert!(!inner.exists());
        // A real mount below a build directory (what a killed mmdebstrap leaves): kept, and the
        // mounted filesystem's files untouched. Mounting needs root, which the CI runs as.
        if std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n")) {
            let build = dir.path().join(".tmp-ab-1-z");
            let shm = build.join("dev/shm");
            fs::create_dir_all(&shm).unwrap();
            let mount = std::process::Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&shm).status().unwrap();
            assert!(mount.success(), "mount -t tmpfs as root");
            fs::write(shm.join("host-file"), "the host's").unwrap();
            remove_unless_mounted(&build);
            let survived = shm.join("host-file").exists();
            let _ = std::process::Command::new("umount").arg(&shm).status();
            assert!(survived && build.exists(), "a build directory with a mount below it was removed through it");
        } else {
            eprintln!("not root: the real-mount half of this test did not run (the CI runs it as root)");
        }
    }

    #[test]
    fn builds_once_then_returns_cached() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let key = Digest::of_bytes(b"inputs");
        let mut runs = 0;
        for _ in 0..2 {
            let dir = store
                .get_or_build::<E>("thing", &key, 0, |d| {
                    runs += 1;
                    fs::write(d.join("out"), b"x").unwrap();
                    Ok(())
                })
                .unwrap();
            assert_eq!(fs::read(dir.join("out")).unwrap(), b"x");
        }
        assert_eq!(runs, 1);
    }

    #[test]
    fn failed_build_publishes_nothing_and_leaves_no_temp() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let key = Digest::of_bytes(b"k");
        let r = store.get_or_build("thing", &key, 0, |d| {
            fs::write(d.join("partial"), b"x").unwrap();
            Err(E)
        });
        assert!(r.is_err());
        assert!(store.get("thing", &key).is_none());
        assert_eq!(fs::read_dir(root.path().join("thing")).unwrap().count(), 0);
    }

    #[test]
    fn an_interrupted_builds_directory_is_never_an_entry_and_is_swept_by_the_next_build() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let key = Digest::of_bytes(b"k");
        // What a build killed mid-way leaves: its temporary directory, named with a pid that is
        // gone (pid_max is at most 2^22 on Linux, so this one cannot exist).
        let kind_dir = root.path().join("thing");
        let dead = kind_dir.join(format!(".tmp-{}-{}-abc", key.short(), 1u32 << 23));
        let live = kind_dir.join(format!(".tmp-{}-{}-abc", key.short(), std::process::id()));
        for d in [&dead, &live] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join("partial"), b"x").unwrap();
        }
        assert!(store.get("thing", &key).is_none(), "a temporary directory is not an entry");
        let dir = store
            .get_or_build::<E>("thing", &key, 0, |d| {
                fs::write(d.join("out"), b"y").unwrap();
                Ok(())
            })
            .unwrap();
        assert!(!dir.join("partial").exists(), "the entry is the new build, not the partial one");
        assert!(!dead.exists(), "the dead builder's directory was swept");
        assert!(live.exists(), "a live builder's directory is left alone");
    }

    #[test]
    fn a_build_that_cannot_fit_is_refused_naming_the_disk_and_publishes_nothing() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let key = Digest::of_bytes(b"k");
        let mut ran = false;
        let err = store
            .get_or_build::<StoreError>("thing", &key, u64::MAX / 2, |_| {
                ran = true;
                Ok(())
            })
            .unwrap_err();
        let msg = err.to_string();
        assert!(!ran, "the build must not start");
        assert!(msg.contains("not enough disk space") && msg.contains(&root.path().display().to_string()), "{msg}");
        assert!(msg.contains("OPENSHELL_CACHE_DIR"), "{msg}");
        assert!(store.get("thing", &key).is_none());
        assert_eq!(fs::read_dir(root.path().join("thing")).unwrap().count(), 0);
    }
}

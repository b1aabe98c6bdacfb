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

    /// The published directory for `(kind, key)`, if it has been built.
    pub fn get(&self, kind: &str, key: &Digest) -> Option<PathBuf> {
        let p = self.path(kind, key);
        p.is_dir().then_some(p)
    }

    /// Returns the directory for `(kind, key)`, running `build` into a fresh temporary directory
    /// first when it does not exist. Only a `build` that returns `Ok` is published; on error the
    /// temporary directory is removed, so a half-built artifact is never seen.
    pub fn get_or_build<E>(
        &self,
        kind: &str,
        key: &Digest,
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
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".tmp-{}-", key.short()))
            .tempdir_in(parent)
            .map_err(|source| StoreError::Prepare { path: parent.to_owned(), source })?;
        build(tmp.path())?;
        let tmp_path = tmp.keep();
        match fs::rename(&tmp_path, &dest) {
            Ok(()) => Ok(dest),
            // Someone else published the same key meanwhile: same inputs, same artifact.
            Err(_) if dest.is_dir() => {
                let _ = fs::remove_dir_all(&tmp_path);
                Ok(dest)
            }
            Err(source) => {
                let _ = fs::remove_dir_all(&tmp_path);
                Err(StoreError::Publish { path: dest, source }.into())
            }
        }
    }
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
    fn builds_once_then_returns_cached() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let key = Digest::of_bytes(b"inputs");
        let mut runs = 0;
        for _ in 0..2 {
            let dir = store
                .get_or_build::<E>("thing", &key, |d| {
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
        let r = store.get_or_build("thing", &key, |d| {
            fs::write(d.join("partial"), b"x").unwrap();
            Err(E)
        });
        assert!(r.is_err());
        assert!(store.get("thing", &key).is_none());
        assert_eq!(fs::read_dir(root.path().join("thing")).unwrap().count(), 0);
    }
}

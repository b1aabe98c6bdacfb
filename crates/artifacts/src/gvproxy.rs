//! gvproxy (containers/gvisor-tap-vsock) from Debian's archive, for Linux hosts that have none.
//!
//! Debian 12 has no gvproxy package; trixie's (`gvproxy`, 0.8.1) is a Go program linked only
//! against glibc and runs on bookworm. [`fetch`] downloads its `.deb` with `apt-get download` from
//! a sources list of its own in a private apt state directory (the host's sources and lists are
//! never read or written), so apt authenticates the `.deb` against the archive's signed `Release`
//! and `Packages` index (`signed-by` Debian's archive keyring). It unpacks only `usr/bin/gvproxy`
//! into the store.
//!
//! Content-addressed by what was fetched: the key is the package's name, version and arch and the
//! sha256 of the `.deb`, all of which `gvproxy.json` records with the binary's own sha256.
//! [`locate`] re-hashes the binary against that record before it hands the path out, so a
//! modified binary is never run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::command::{capture, run};
use crate::store::StoreError;
use crate::{sha256_file, Arch, Digest, DigestBuilder, Store};

pub const STORE_KIND: &str = "gvproxy";
pub const PACKAGE: &str = "gvproxy";
/// The suite that has it (Debian 13); bookworm has no gvproxy.
pub const SUITE: &str = "trixie";
pub const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
pub const ARCHIVE: &str = "http://deb.debian.org/debian";
/// The binary inside a store entry, and the record beside it.
pub const BINARY: &str = "bin/gvproxy";
pub const PROVENANCE: &str = "gvproxy.json";
/// Where the package puts it.
const IN_PACKAGE: &str = "usr/bin/gvproxy";

#[derive(Debug, thiserror::Error)]
pub enum GvproxyError {
    #[error("{what} is not installed; install it with: apt-get install -y {package}")]
    MissingTool { what: &'static str, package: &'static str },
    #[error("`{command}` failed: {detail}; its output is above. Is Debian's archive reachable ({ARCHIVE})?")]
    Command { command: String, detail: String },
    #[error("gvproxy fetch I/O at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Unexpected(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<crate::command::CommandFailed> for GvproxyError {
    fn from(crate::command::CommandFailed { command, detail }: crate::command::CommandFailed) -> Self {
        GvproxyError::Command { command, detail }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GvproxyError + '_ {
    move |source| GvproxyError::Io { path: path.to_owned(), source }
}

/// `gvproxy.json`: what was fetched, from where, and the binary it gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GvproxyProvenance {
    pub package: String,
    pub version: String,
    /// Debian's name of the arch (`amd64`, `arm64`).
    pub arch: String,
    /// The apt source line it came from.
    pub source: String,
    /// The `.deb`'s file name in the archive's pool, and its sha256 (which apt checked against the
    /// signed index before handing it over).
    pub deb: String,
    pub deb_sha256: Digest,
    pub binary_sha256: Digest,
    pub key: Digest,
    pub fetched_at_unix: u64,
}

/// A gvproxy in the store, checked against its record.
#[derive(Debug, Clone)]
pub struct StoredGvproxy {
    pub binary: PathBuf,
    pub provenance: GvproxyProvenance,
}

/// The content address of a fetched package.
pub fn key(package: &str, version: &str, arch: &str, deb_sha256: &Digest) -> Digest {
    let mut b = DigestBuilder::new("openshell-gvproxy/v1");
    b.str("package", package).str("version", version).str("arch", arch).digest("deb", deb_sha256);
    b.finish()
}

/// The apt source line: Debian's archive, authenticated by Debian's keyring.
pub fn source_line() -> String {
    format!("deb [signed-by={KEYRING}] {ARCHIVE} {SUITE} main")
}

/// Opens a store entry: its record read and the binary re-hashed against it.
pub fn open(dir: &Path) -> Result<StoredGvproxy, String> {
    let record = dir.join(PROVENANCE);
    let text = fs::read_to_string(&record).map_err(|e| format!("{}: {e}", record.display()))?;
    let provenance: GvproxyProvenance =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", record.display()))?;
    let binary = dir.join(BINARY);
    let actual = sha256_file(&binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    if actual != provenance.binary_sha256 {
        return Err(format!(
            "{} has sha256 {actual}, but {} records {}: the store entry was modified; delete {} and fetch it again",
            binary.display(),
            record.display(),
            provenance.binary_sha256,
            dir.display()
        ));
    }
    let want = key(&provenance.package, &provenance.version, &provenance.arch, &provenance.deb_sha256);
    if dir.file_name().is_some_and(|n| *n != *want.short()) {
        return Err(format!("{} is not the entry its record's key {want} names", dir.display()));
    }
    Ok(StoredGvproxy { binary, provenance })
}

/// The newest-fetched gvproxy for `arch` in the store whose binary matches its record, without
/// fetching. Entries that fail their check are skipped with a warning.
pub fn locate(store: &Store, arch: Arch) -> Option<StoredGvproxy> {
    let kind = store.root().join(STORE_KIND);
    let mut found: Vec<StoredGvproxy> = fs::read_dir(&kind)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| match open(&e.path()) {
            Ok(g) => Some(g),
            Err(why) => {
                tracing::warn!(%why, "skipping a gvproxy store entry");
                None
            }
        })
        .filter(|g| g.provenance.arch == arch.debian())
        .collect();
    found.sort_by_key(|g| g.provenance.fetched_at_unix);
    found.pop()
}

/// Downloads Debian's gvproxy for `arch` (see the module docs) and publishes it in the store, or
/// returns the entry already there for the same `.deb`. Output of apt goes to `on_line`.
pub fn fetch(store: &Store, arch: Arch, on_line: &mut dyn FnMut(&str)) -> Result<StoredGvproxy, GvproxyError> {
    for (what, package) in [("apt-get", "apt"), ("dpkg-deb", "dpkg")] {
        if Command::new(what).arg("--version").output().is_err() {
            return Err(GvproxyError::MissingTool { what, package });
        }
    }
    if !Path::new(KEYRING).is_file() {
        return Err(GvproxyError::MissingTool { what: "Debian's archive keyring", package: "debian-archive-keyring" });
    }
    let work = store.scratch_dir("gvproxyfetch").map_err(io(store.root()))?;
    let w = work.path();
    let sources = w.join("sources.list");
    fs::write(&sources, format!("{}\n", source_line())).map_err(io(&sources))?;
    for d in ["lists/partial", "cache/archives/partial", "deb"] {
        fs::create_dir_all(w.join(d)).map_err(io(&w.join(d)))?;
    }
    // Every apt path of ours: the host's sources, lists and cache are never read or written.
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        for (k, v) in [
            ("Dir::Etc::SourceList", sources.display().to_string()),
            ("Dir::Etc::SourceParts", "/dev/null".into()),
            ("Dir::State::Lists", w.join("lists").display().to_string()),
            ("Dir::Cache", w.join("cache").display().to_string()),
            ("APT::Architectures", arch.debian().to_owned()),
            // The download directory is ours, not readable by apt's sandbox user.
            ("APT::Sandbox::User", "root".into()),
        ] {
            c.arg("-o").arg(format!("{k}={v}"));
        }
        c.args(args).current_dir(w.join("deb"));
        c
    };
    run(&mut apt(&["-q", "update"]), on_line)?;
    let pkg = format!("{PACKAGE}:{}", arch.debian());
    run(&mut apt(&["-q", "download", &pkg]), on_line)?;
    let deb = fs::read_dir(w.join("deb"))
        .map_err(io(&w.join("deb")))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| GvproxyError::Unexpected(format!("`apt-get download {pkg}` left no .deb")))?;
    let field = |name: &str| -> Result<String, GvproxyError> {
        Ok(capture(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name))?.trim().to_owned())
    };
    let (package, version, deb_arch) = (field("Package")?, field("Version")?, field("Architecture")?);
    if package != PACKAGE || deb_arch != arch.debian() {
        return Err(GvproxyError::Unexpected(format!(
            "{} is {package} for {deb_arch}, not {PACKAGE} for {}",
            deb.display(),
            arch.debian()
        )));
    }
    let deb_sha256 = sha256_file(&deb).map_err(io(&deb))?;
    let key = key(&package, &version, &deb_arch, &deb_sha256);
    let unpacked = w.join("unpacked");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked), on_line)?;
    let deb_name = deb.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = store.get_or_build(STORE_KIND, &key, 64 << 20, |out| -> Result<(), GvproxyError> {
        let binary = out.join(BINARY);
        fs::create_dir_all(out.join("bin")).map_err(io(out))?;
        fs::copy(unpacked.join(IN_PACKAGE), &binary).map_err(io(&unpacked.join(IN_PACKAGE)))?;
        let provenance = GvproxyProvenance {
            package: package.clone(),
            version: version.clone(),
            arch: deb_arch.clone(),
            source: source_line(),
            deb: deb_name.clone(),
            deb_sha256: deb_sha256.clone(),
            binary_sha256: sha256_file(&binary).map_err(io(&binary))?,
            key: key.clone(),
            fetched_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        };
        let json = serde_json::to_vec_pretty(&provenance).expect("provenance serializes");
        fs::write(out.join(PROVENANCE), json).map_err(io(&out.join(PROVENANCE)))
    })?;
    open(&dir).map_err(GvproxyError::Unexpected)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store entry as [`fetch`] publishes it, from a stand-in binary.
    fn entry(store: &Store, version: &str, at: u64, arch: Arch) -> PathBuf {
        let deb_sha256 = Digest::of_bytes(version.as_bytes());
        let key = key(PACKAGE, version, arch.debian(), &deb_sha256);
        store
            .get_or_build::<StoreError>(STORE_KIND, &key, 0, |out| {
                fs::create_dir_all(out.join("bin")).unwrap();
                fs::write(out.join(BINARY), format!("gvproxy {version}")).unwrap();
                let p = GvproxyProvenance {
                    package: PACKAGE.into(),
                    version: version.into(),
                    arch: arch.debian().into(),
                    source: source_line(),
                    deb: format!("gvproxy_{version}_amd64.deb"),
                    deb_sha256: deb_sha256.clone(),
                    binary_sha256: sha256_file(&out.join(BINARY)).unwrap(),
                    key: key.clone(),
                    fetched_at_unix: at,
                };
                fs::write(out.join(PROVENANCE), serde_json::to_vec(&p).unwrap()).unwrap();
                Ok(())
            })
            .unwrap()
    }

    #[test]
    fn the_key_covers_name_version_arch_and_the_debs_digest() {
        let d = Digest::of_bytes(b"deb");
        let k = key("gvproxy", "0.8.1-3", "amd64", &d);
        assert_ne!(k, key("gvproxy", "0.8.1-4", "amd64", &d));
        assert_ne!(k, key("gvproxy", "0.8.1-3", "arm64", &d));
        assert_ne!(k, key("gvproxy", "0.8.1-3", "amd64", &Digest::of_bytes(b"other")));
        assert_ne!(k, key("qemu-wrapper", "0.8.1-3", "amd64", &d));
    }

    #[test]
    fn locate_picks_the_newest_checked_entry_of_the_arch() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        assert!(locate(&store, Arch::X86_64).is_none());
        entry(&store, "0.8.1-3", 10, Arch::X86_64);
        let newer = entry(&store, "0.8.2-1", 20, Arch::X86_64);
        entry(&store, "0.9.0-1", 30, Arch::Aarch64);
        let found = locate(&store, Arch::X86_64).unwrap();
        assert_eq!((found.provenance.version.as_str(), found.binary), ("0.8.2-1", newer.join(BINARY)));
        // A modified binary is never handed out: the older, intact one is.
        fs::write(newer.join(BINARY), "tampered").unwrap();
        assert_eq!(locate(&store, Arch::X86_64).unwrap().provenance.version, "0.8.1-3");
        let err = open(&newer).unwrap_err();
        assert!(err.contains("was modified") && err.contains("fetch it again"), "{err}");
    }

    #[test]
    fn the_source_is_debians_archive_signed_by_its_keyring() {
        assert_eq!(
            source_line(),
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main"
        );
    }
}

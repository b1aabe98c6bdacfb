//! Where an image comes from ([`ImageRef`]), and turning each kind into an OCI layout on disk
//! ([`Source`]): a layout directory is used where it is; an archive is extracted into a scratch
//! directory beside the store; a docker archive is rewritten as a layout there; a local image is
//! exported by podman (or docker) first.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use openshell_artifacts::{Arch, Store};

use crate::error::{io, ImageError};
use crate::layout::Layout;

/// An image to unpack. Parsed from a string: `oci:DIR`, `oci-archive:FILE`,
/// `docker-archive:FILE` and `podman:NAME` say which; without a prefix, an existing directory is
/// an OCI layout, an existing file an archive of the kind its contents show, and anything else
/// the name of a local image (`localhost/t`, `debian:bookworm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    OciLayout(PathBuf),
    OciArchive(PathBuf),
    DockerArchive(PathBuf),
    Local(String),
}

/// The reference with its kind spelled out, as [`FromStr`] reads it back: what to pass to a
/// child process so that it resolves the same image.
impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::OciLayout(p) => write!(f, "oci:{}", p.display()),
            ImageRef::OciArchive(p) => write!(f, "oci-archive:{}", p.display()),
            ImageRef::DockerArchive(p) => write!(f, "docker-archive:{}", p.display()),
            ImageRef::Local(n) => write!(f, "podman:{n}"),
        }
    }
}

impl FromStr for ImageRef {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<ImageRef, ImageError> {
        let bad = |why: String| ImageError::Reference(format!("image reference {s:?}: {why}"));
        if s.is_empty() {
            return Err(bad("empty".into()));
        }
        if let Some(p) = s.strip_prefix("oci:") {
            return Ok(ImageRef::OciLayout(p.into()));
        }
        if let Some(p) = s.strip_prefix("oci-archive:") {
            return Ok(ImageRef::OciArchive(p.into()));
        }
        if let Some(p) = s.strip_prefix("docker-archive:") {
            return Ok(ImageRef::DockerArchive(p.into()));
        }
        if let Some(n) = s.strip_prefix("podman:").or_else(|| s.strip_prefix("containers-storage:")) {
            return Ok(ImageRef::Local(n.into()));
        }
        let path = Path::new(s);
        if path.is_dir() {
            if path.join("oci-layout").is_file() {
                return Ok(ImageRef::OciLayout(path.into()));
            }
            return Err(bad("a directory without an oci-layout file is not an OCI image layout".into()));
        }
        if path.is_file() {
            return match sniff_archive(path)? {
                Some(ArchiveKind::Oci) => Ok(ImageRef::OciArchive(path.into())),
                Some(ArchiveKind::Docker) => Ok(ImageRef::DockerArchive(path.into())),
                None => Err(bad(
                    "a tar with neither index.json (an OCI archive) nor manifest.json (a docker archive)".into()
                )),
            };
        }
        if s.starts_with('/') || s.starts_with('.') {
            return Err(bad("no such file or directory".into()));
        }
        Ok(ImageRef::Local(s.into()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArchiveKind {
    Oci,
    Docker,
}

/// Which kind of archive a tar is, from its member names. A docker 25+ `docker save` has both
/// `index.json` and `manifest.json`: it is a layout, and read as one.
fn sniff_archive(path: &Path) -> Result<Option<ArchiveKind>, ImageError> {
    let file = fs::File::open(path).map_err(io(path))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut docker = false;
    for entry in archive.entries().map_err(io(path))? {
        let entry = entry.map_err(io(path))?;
        let name = entry.path().map_err(io(path))?;
        let name = name.to_string_lossy();
        match name.trim_start_matches("./") {
            "index.json" | "oci-layout" => return Ok(Some(ArchiveKind::Oci)),
            "manifest.json" => docker = true,
            _ => {}
        }
    }
    Ok(docker.then_some(ArchiveKind::Docker))
}

/// An image as an OCI layout on disk, and the scratch directory that holds it if it was made
/// for the unpack (removed when this is dropped).
pub struct Source {
    pub layout: Layout,
    _scratch: Option<tempfile::TempDir>,
}

impl ImageRef {
    /// The image as an OCI layout. Long steps (export, extraction) are told to `on_line`.
    pub fn open(&self, store: &Store, on_line: &mut dyn FnMut(&str)) -> Result<Source, ImageError> {
        let scratch = || store.scratch_dir("image").map_err(io(store.root()));
        match self {
            ImageRef::OciLayout(dir) => Ok(Source { layout: Layout::open(dir)?, _scratch: None }),
            ImageRef::OciArchive(file) => {
                let tmp = scratch()?;
                on_line(&format!("extracting {}", file.display()));
                extract(file, tmp.path())?;
                Ok(Source { layout: Layout::open(tmp.path())?, _scratch: Some(tmp) })
            }
            ImageRef::DockerArchive(file) => {
                let tmp = scratch()?;
                on_line(&format!("extracting {}", file.display()));
                extract(file, tmp.path())?;
                crate::docker::to_layout(tmp.path())?;
                Ok(Source { layout: Layout::open(tmp.path())?, _scratch: Some(tmp) })
            }
            ImageRef::Local(name) => {
                let tmp = scratch()?;
                let archive = tmp.path().join("image.tar");
                let engine = Engine::find(name)?;
                on_line(&format!("exporting {name} with {}", engine.program()));
                engine.save(name, &archive)?;
                let layout = tmp.path().join("layout");
                fs::create_dir(&layout).map_err(io(&layout))?;
                on_line(&format!("extracting the export of {name}"));
                extract(&archive, &layout)?;
                fs::remove_file(&archive).map_err(io(&archive))?;
                if engine == Engine::Docker && !layout.join("oci-layout").is_file() {
                    crate::docker::to_layout(&layout)?;
                }
                Ok(Source { layout: Layout::open(&layout)?, _scratch: Some(tmp) })
            }
        }
    }
}

/// JSON blobs a peek keeps: manifests and indexes are a few KiB; layers are far bigger.
const PEEK_MAX_BLOB: u64 = 1 << 20;

impl ImageRef {
    /// The store entry of an archive's image for `arch`, found without extracting it: an OCI
    /// archive's index and small blobs (its manifests) are read, a docker archive's members
    /// hashed as they stream by. How a second unpack of the same archive does nothing. `None`
    /// when it is not in the store, when this is not an archive, or when the peek cannot tell
    /// (the full unpack then reports what is wrong).
    pub(crate) fn find_in_store(&self, store: &Store, arch: Arch) -> Result<Option<PathBuf>, ImageError> {
        if let ImageRef::DockerArchive(file) = self {
            let Ok(digest) = crate::docker::manifest_digest_of_archive(file) else { return Ok(None) };
            return Ok(store.get(crate::STORE_KIND, &digest));
        }
        let ImageRef::OciArchive(file) = self else { return Ok(None) };
        let tmp = store.scratch_dir("imagepeek").map_err(io(store.root()))?;
        if peek(file, tmp.path()).is_err() {
            return Ok(None);
        }
        let Ok(layout) = Layout::open(tmp.path()) else { return Ok(None) };
        Ok(layout.resolve(arch).ok().and_then(|r| store.get(crate::STORE_KIND, &r.digest)))
    }
}

/// Writes an archive's `oci-layout`, `index.json` and blobs of at most [`PEEK_MAX_BLOB`] into
/// `dest`: a partial layout, enough to resolve its manifest.
fn peek(archive_path: &Path, dest: &Path) -> Result<(), ImageError> {
    let file = fs::File::open(archive_path).map_err(io(archive_path))?;
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(256 * 1024, file));
    fs::create_dir_all(dest.join("blobs/sha256")).map_err(io(dest))?;
    for entry in archive.entries().map_err(io(archive_path))? {
        let mut entry = entry.map_err(io(archive_path))?;
        if !entry.header().entry_type().is_file() || entry.size() > PEEK_MAX_BLOB {
            continue;
        }
        let raw = entry.path().map_err(io(archive_path))?.into_owned();
        let Ok(rel) = crate::apply::clean(&raw) else { continue };
        let keep = rel == Path::new("index.json")
            || rel == Path::new("oci-layout")
            || (rel.parent() == Some(Path::new("blobs/sha256")));
        if keep {
            let path = dest.join(&rel);
            let mut out = fs::File::create(&path).map_err(io(&path))?;
            std::io::copy(&mut entry, &mut out).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// The container engine that exports a local image: podman if installed, else docker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    Podman,
    Docker,
}

impl Engine {
    fn find(name: &str) -> Result<Engine, ImageError> {
        Engine::find_in(name, &std::env::var_os("PATH").unwrap_or_default())
    }

    /// The engine on the search path `path` (a `PATH` value).
    pub(crate) fn find_in(name: &str, path: &std::ffi::OsStr) -> Result<Engine, ImageError> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let on_path = |program: &str| which::which_in(program, Some(path), &cwd).is_ok();
        if on_path("podman") {
            Ok(Engine::Podman)
        } else if on_path("docker") {
            Ok(Engine::Docker)
        } else {
            Err(ImageError::NoEngine { name: name.into() })
        }
    }

    fn program(self) -> &'static str {
        match self {
            Engine::Podman => "podman",
            Engine::Docker => "docker",
        }
    }

    fn save(self, name: &str, to: &Path) -> Result<(), ImageError> {
        let mut cmd = Command::new(self.program());
        cmd.arg("save");
        if self == Engine::Podman {
            cmd.args(["--format", "oci-archive"]);
        }
        cmd.arg("-o").arg(to).arg(name);
        let command = format!("{cmd:?}").replace('"', "");
        let out = cmd.output().map_err(io(self.program()))?;
        if !out.status.success() {
            return Err(ImageError::Engine {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }
}

/// Extracts an image archive's regular files and directories into `dest`. Member paths are
/// cleaned like layer paths (a `..` is refused); a symlink member (old `docker save` links
/// identical layers) becomes a hard link to its target inside `dest`, or an error.
fn extract(archive_path: &Path, dest: &Path) -> Result<(), ImageError> {
    let file = fs::File::open(archive_path).map_err(io(archive_path))?;
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(256 * 1024, file));
    let mut links = Vec::new();
    let refuse = |entry: &Path, why: String| {
        ImageError::Reference(format!("archive {} member {}: {why}", archive_path.display(), entry.display()))
    };
    for entry in archive.entries().map_err(io(archive_path))? {
        let mut entry = entry.map_err(io(archive_path))?;
        let raw = entry.path().map_err(io(archive_path))?.into_owned();
        let rel = crate::apply::clean(&raw).map_err(|why| refuse(&raw, why))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let path = dest.join(&rel);
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            fs::create_dir_all(&path).map_err(io(&path))?;
        } else if kind.is_file() {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(io(parent))?;
            }
            let mut out = fs::File::create(&path).map_err(io(&path))?;
            std::io::copy(&mut entry, &mut out).map_err(io(&path))?;
        } else if kind.is_symlink() || kind.is_hard_link() {
            let target = entry.link_name().map_err(io(archive_path))?.unwrap_or_default().into_owned();
            let target = if kind.is_symlink() { rel.parent().unwrap_or(Path::new("")).join(target) } else { target };
            let target = normalize(&target).ok_or_else(|| refuse(&raw, "its link leaves the archive".into()))?;
            links.push((rel, target));
        }
    }
    for (rel, target) in links {
        let (from, to) = (dest.join(&target), dest.join(&rel));
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        fs::hard_link(&from, &to).map_err(io(&to))?;
    }
    Ok(())
}

/// `a/b/../c` as `a/c`; `None` when a `..` would climb above the start.
pub(crate) fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            std::path::Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

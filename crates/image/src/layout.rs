//! An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`): choosing the
//! host's manifest from its index, and reading blobs only once their bytes match their digest.
//!
//! `index.json` is the one file a layout does not address by content; everything reached from it
//! (nested indexes, the manifest, the config, each layer) is checked against the digest and size
//! its descriptor names before it is parsed or applied.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use openshell_artifacts::{Arch, Digest};
use sha2::Digest as _;

use crate::error::{io, ImageError};

/// JSON blobs (indexes, manifests, configs) are read into memory; none is anywhere near this.
const MAX_JSON_BLOB: u64 = 16 << 20;

/// The index nesting we follow (an index of indexes, as some builders write): enough for any
/// real layout, and a bound on a malicious one.
const MAX_INDEX_DEPTH: usize = 4;

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

/// The manifest chosen for the host, with its digest (the image's identity in the store).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub digest: Digest,
    pub manifest: ImageManifest,
}

impl Layout {
    pub fn open(dir: &Path) -> Result<Layout, ImageError> {
        let marker = dir.join("oci-layout");
        let text = fs::read_to_string(&marker).map_err(|e| ImageError::Malformed {
            path: dir.to_owned(),
            what: "OCI image layout",
            why: format!("no readable oci-layout file ({e})"),
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ImageError::Malformed {
            path: marker.clone(),
            what: "oci-layout file",
            why: e.to_string(),
        })?;
        match v.get("imageLayoutVersion").and_then(|v| v.as_str()) {
            Some(ver) if ver.starts_with("1.") => Ok(Layout { dir: dir.to_owned() }),
            other => Err(ImageError::Unsupported(format!(
                "{} has imageLayoutVersion {other:?}; only 1.x layouts are understood",
                marker.display()
            ))),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    /// The manifest for `arch` on Linux.
    pub fn resolve(&self, arch: Arch) -> Result<Resolved, ImageError> {
        let path = self.dir.join("index.json");
        let bytes = fs::read(&path).map_err(io(&path))?;
        let index: ImageIndex = parse(&path, "image index", &bytes)?;
        let desc = self.select(&index, arch, 0)?;
        let digest = sha256_of(&desc)?;
        let bytes = self.read_blob("manifest", &desc)?;
        let manifest: ImageManifest = parse(&self.blob_path(&digest), "image manifest", &bytes)?;
        Ok(Resolved { digest, manifest })
    }

    fn select(&self, index: &ImageIndex, arch: Arch, depth: usize) -> Result<Descriptor, ImageError> {
        let want = arch.debian();
        let images: Vec<&Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| {
                matches!(d.media_type(), MediaType::ImageManifest | MediaType::ImageIndex)
                    || matches!(d.media_type(), MediaType::Other(m) if m == DOCKER_MANIFEST || m == DOCKER_MANIFEST_LIST)
            })
            .collect();
        let fits = |d: &&Descriptor| {
            d.platform().as_ref().is_none_or(|p| p.os().to_string() == "linux" && p.architecture().to_string() == want)
        };
        let matching: Vec<&Descriptor> = images.iter().copied().filter(fits).collect();
        // An entry that names the host's platform beats one that names none.
        let explicit: Vec<&Descriptor> = matching.iter().copied().filter(|d| d.platform().is_some()).collect();
        let chosen = match (explicit.as_slice(), matching.as_slice()) {
            ([one], _) | ([], [one]) => *one,
            ([], []) => {
                let have: Vec<String> = images
                    .iter()
                    .map(|d| match d.platform() {
                        Some(p) => format!("{}/{}", p.os(), p.architecture()),
                        None => format!("{} (no platform)", d.media_type()),
                    })
                    .collect();
                return Err(ImageError::NoPlatform {
                    want: format!("linux/{want}"),
                    layout: self.dir.clone(),
                    have: if have.is_empty() { "no image manifests".into() } else { have.join(", ") },
                });
            }
            _ => {
                let names: Vec<String> = matching
                    .iter()
                    .map(|d| {
                        d.annotations()
                            .as_ref()
                            .and_then(|a| a.get("org.opencontainers.image.ref.name").cloned())
                            .unwrap_or_else(|| d.digest().to_string())
                    })
                    .collect();
                return Err(ImageError::Unsupported(format!(
                    "{} holds {} images for linux/{want} ({}): export the one you want on its own",
                    self.dir.display(),
                    names.len(),
                    names.join(", ")
                )));
            }
        };
        let nested = matches!(chosen.media_type(), MediaType::ImageIndex)
            || matches!(chosen.media_type(), MediaType::Other(m) if m == DOCKER_MANIFEST_LIST);
        if !nested {
            return Ok(chosen.clone());
        }
        if depth >= MAX_INDEX_DEPTH {
            return Err(ImageError::Unsupported(format!(
                "{} nests image indexes deeper than {MAX_INDEX_DEPTH}",
                self.dir.display()
            )));
        }
        let bytes = self.read_blob("image index", chosen)?;
        let inner: ImageIndex = parse(&self.blob_path(&sha256_of(chosen)?), "image index", &bytes)?;
        self.select(&inner, arch, depth + 1)
    }

    /// A JSON blob's bytes, verified.
    pub fn read_blob(&self, what: &str, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
        let digest = sha256_of(desc)?;
        let path = self.existing_blob(what, &digest)?;
        let file = fs::File::open(&path).map_err(io(&path))?;
        let mut bytes = Vec::new();
        // One byte past the cap, so an oversized blob is seen as one rather than cut to fit.
        file.take(MAX_JSON_BLOB + 1).read_to_end(&mut bytes).map_err(io(&path))?;
        if bytes.len() as u64 > MAX_JSON_BLOB {
            return Err(ImageError::Unsupported(format!(
                "{what} blob {} is over {} MiB, too big for a JSON document",
                path.display(),
                MAX_JSON_BLOB >> 20
            )));
        }
        let found = Digest::of_bytes(&bytes);
        check(what, desc, &digest, &found, bytes.len() as u64)?;
        Ok(bytes)
    }

    /// A (large) blob's path, once its contents have been hashed and match.
    pub fn verify_blob(&self, what: &str, desc: &Descriptor) -> Result<PathBuf, ImageError> {
        let digest = sha256_of(desc)?;
        let path = self.existing_blob(what, &digest)?;
        let mut file = fs::File::open(&path).map_err(io(&path))?;
        let mut hasher = sha2::Sha256::new();
        let size = std::io::copy(&mut file, &mut hasher).map_err(io(&path))?;
        let found: [u8; 32] = hasher.finalize().into();
        let found = hex::encode(found).parse::<Digest>().expect("sha256 output is a digest");
        check(what, desc, &digest, &found, size)?;
        Ok(path)
    }

    fn existing_blob(&self, what: &str, digest: &Digest) -> Result<PathBuf, ImageError> {
        let path = self.blob_path(digest);
        if !path.is_file() {
            return Err(ImageError::MissingBlob {
                what: what.to_owned(),
                digest: digest.hex(),
                layout: self.dir.clone(),
            });
        }
        Ok(path)
    }
}

fn check(what: &str, desc: &Descriptor, expected: &Digest, found: &Digest, size: u64) -> Result<(), ImageError> {
    if found != expected || size != desc.size() {
        return Err(ImageError::BlobMismatch {
            what: what.to_owned(),
            expected: expected.hex(),
            found: found.hex(),
            expected_size: desc.size(),
            found_size: size,
        });
    }
    Ok(())
}

/// The sha256 a descriptor names; other algorithms are refused (no tool that makes images here
/// writes them).
pub fn sha256_of(desc: &Descriptor) -> Result<Digest, ImageError> {
    let hex = desc.as_digest_sha256().ok_or_else(|| {
        ImageError::Unsupported(format!(
            "descriptor digest {} is not sha256, the only algorithm supported",
            desc.digest()
        ))
    })?;
    hex.parse().map_err(ImageError::Unsupported)
}

pub fn parse<T: serde::de::DeserializeOwned>(path: &Path, what: &'static str, bytes: &[u8]) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::Malformed { path: path.to_owned(), what, why: e.to_string() })
}

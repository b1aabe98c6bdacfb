//! A docker archive (`docker save`, `podman save --format docker-archive`: `manifest.json`, the
//! config JSON and one tar per layer), rewritten in place as an OCI layout, so that one code path
//! unpacks every kind of image.
//!
//! A docker archive addresses nothing by digest but its config (named by its sha256, the image
//! id), so the manifest written here is made from what the files are. Integrity still holds: a
//! config named by a digest must match it, and each layer must uncompress to the config's
//! `diff_ids`, which the unpack checks.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use openshell_artifacts::{sha256_file, Digest};
use serde::Deserialize;
use serde_json::json;
use sha2::Digest as _;

use crate::error::{io, ImageError};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    layers: Vec<String>,
}

/// What the OCI manifest needs to know of a layer member: its sha256, size and first bytes
/// (which say its compression).
#[derive(Debug, Clone)]
pub struct Member {
    pub digest: Digest,
    pub size: u64,
    pub magic: [u8; 4],
}

impl Member {
    fn media_type(&self) -> &'static str {
        match self.magic {
            [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
            [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
            _ => "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

/// The one image a docker archive's `manifest.json` lists.
fn the_entry(manifest_path: &Path, text: &[u8]) -> Result<Entry, ImageError> {
    let mut entries: Vec<Entry> = crate::layout::parse(manifest_path, "docker archive manifest", text)?;
    if entries.len() != 1 {
        return Err(ImageError::Unsupported(format!(
            "{} lists {} images; save exactly one image into the archive",
            manifest_path.display(),
            entries.len()
        )));
    }
    Ok(entries.remove(0))
}

/// The OCI manifest of a docker archive's image: made from what its files are, so the same
/// archive always gives the same manifest (and store key).
fn oci_manifest(config: &[u8], layers: &[Member]) -> Vec<u8> {
    let layers: Vec<_> = layers
        .iter()
        .map(|l| json!({"mediaType": l.media_type(), "digest": format!("sha256:{}", l.digest.hex()), "size": l.size}))
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", Digest::of_bytes(config).hex()),
            "size": config.len(),
        },
        "layers": layers,
    });
    serde_json::to_vec(&manifest).expect("json serializes")
}

/// The manifest digest [`to_layout`] would give the archive's image, from one streaming read of
/// the archive (nothing extracted): how a second unpack of the same archive finds its store entry.
pub fn manifest_digest_of_archive(archive_path: &Path) -> Result<Digest, ImageError> {
    let file = fs::File::open(archive_path).map_err(io(archive_path))?;
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(256 * 1024, file));
    let mut members: HashMap<PathBuf, Member> = HashMap::new();
    let mut small: HashMap<PathBuf, Vec<u8>> = HashMap::new();
    let mut links: HashMap<PathBuf, PathBuf> = HashMap::new();
    for entry in archive.entries().map_err(io(archive_path))? {
        let mut entry = entry.map_err(io(archive_path))?;
        let raw = entry.path().map_err(io(archive_path))?.into_owned();
        let Ok(rel) = crate::apply::clean(&raw) else { continue };
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            if let Some(target) = entry.link_name().map_err(io(archive_path))? {
                let target = if kind.is_symlink() {
                    rel.parent().unwrap_or(Path::new("")).join(target)
                } else {
                    target.into_owned()
                };
                if let Some(target) = crate::reference::normalize(&target) {
                    links.insert(rel, target);
                }
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let mut hasher = sha2::Sha256::new();
        let mut magic = [0u8; 4];
        let mut keep = (entry.size() <= 1 << 20).then(Vec::new);
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = entry.read(&mut buf).map_err(io(archive_path))?;
            if n == 0 {
                break;
            }
            if size < 4 {
                let (at, k) = (size as usize, (4 - size as usize).min(n));
                magic[at..at + k].copy_from_slice(&buf[..k]);
            }
            hasher.update(&buf[..n]);
            if let Some(k) = keep.as_mut() {
                k.extend_from_slice(&buf[..n]);
            }
            size += n as u64;
        }
        let digest: [u8; 32] = hasher.finalize().into();
        let digest = hex::encode(digest).parse().expect("sha256 output is a digest");
        members.insert(rel.clone(), Member { digest, size, magic });
        if let Some(k) = keep {
            small.insert(rel, k);
        }
    }
    let resolve = |name: &str| -> Result<PathBuf, ImageError> {
        let rel = crate::apply::clean(Path::new(name))
            .map_err(|why| ImageError::Reference(format!("docker archive member {name:?}: {why}")))?;
        Ok(links.get(&rel).cloned().unwrap_or(rel))
    };
    let missing = |name: &str| ImageError::Malformed {
        path: archive_path.to_owned(),
        what: "docker archive",
        why: format!("it names {name}, which the archive does not hold"),
    };
    let manifest = small.get(Path::new("manifest.json")).ok_or_else(|| missing("manifest.json"))?;
    let entry = the_entry(&archive_path.join("manifest.json"), manifest)?;
    let config = small.get(&resolve(&entry.config)?).ok_or_else(|| missing(&entry.config))?;
    let layers = entry
        .layers
        .iter()
        .map(|name| members.get(&resolve(name)?).cloned().ok_or_else(|| missing(name)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Digest::of_bytes(&oci_manifest(config, &layers)))
}

/// Rewrites the extracted docker archive at `dir` as an OCI layout (`oci-layout`, `index.json`,
/// `blobs/sha256/`), moving the layer files rather than copying them.
pub fn to_layout(dir: &Path) -> Result<(), ImageError> {
    let manifest_path = dir.join("manifest.json");
    let text = fs::read(&manifest_path).map_err(io(&manifest_path))?;
    let entry = the_entry(&manifest_path, &text)?;
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io(&blobs))?;

    let config_path = member(dir, &entry.config)?;
    let config = fs::read(&config_path).map_err(io(&config_path))?;
    let config_digest = Digest::of_bytes(&config);
    if let Some(named) = digest_in_name(&entry.config) {
        if named != config_digest {
            return Err(ImageError::BlobMismatch {
                what: "config".into(),
                expected: named.hex(),
                found: config_digest.hex(),
                expected_size: config.len() as u64,
                found_size: config.len() as u64,
            });
        }
    }
    write_blob(&blobs, &config)?;

    let mut layers = Vec::new();
    for name in &entry.layers {
        let path = member(dir, name)?;
        let digest = sha256_file(&path).map_err(io(&path))?;
        let size = fs::metadata(&path).map_err(io(&path))?.len();
        let layer = Member { digest, size, magic: magic(&path)? };
        let blob = blobs.join(layer.digest.hex());
        if !blob.exists() {
            fs::rename(&path, &blob).map_err(io(&blob))?;
        }
        layers.push(layer);
    }
    let manifest = oci_manifest(&config, &layers);
    let manifest_digest = write_blob(&blobs, &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", manifest_digest.hex()),
            "size": manifest.len(),
        }],
    });
    let index_path = dir.join("index.json");
    fs::write(&index_path, serde_json::to_vec(&index).expect("json serializes")).map_err(io(&index_path))?;
    let marker = dir.join("oci-layout");
    fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(&marker))?;
    Ok(())
}

/// A member of the extracted archive, by the name `manifest.json` gives it.
fn member(dir: &Path, name: &str) -> Result<std::path::PathBuf, ImageError> {
    let rel = crate::apply::clean(Path::new(name))
        .map_err(|why| ImageError::Reference(format!("docker archive member {name:?}: {why}")))?;
    let path = dir.join(rel);
    if !path.is_file() {
        return Err(ImageError::Malformed {
            path: dir.join("manifest.json"),
            what: "docker archive manifest",
            why: format!("it names {name}, which the archive does not hold"),
        });
    }
    Ok(path)
}

/// The digest a member's name carries: `<hex>.json` (docker, podman) or `blobs/sha256/<hex>`.
fn digest_in_name(name: &str) -> Option<Digest> {
    let base = name.rsplit('/').next()?;
    base.strip_suffix(".json").unwrap_or(base).parse().ok()
}

fn write_blob(blobs: &Path, bytes: &[u8]) -> Result<Digest, ImageError> {
    let digest = Digest::of_bytes(bytes);
    let path = blobs.join(digest.hex());
    if !path.exists() {
        fs::write(&path, bytes).map_err(io(&path))?;
    }
    Ok(digest)
}

fn magic(path: &Path) -> Result<[u8; 4], ImageError> {
    let mut buf = [0u8; 4];
    let mut f = fs::File::open(path).map_err(io(path))?;
    let mut n = 0;
    while n < 4 {
        let r = f.read(&mut buf[n..]).map_err(io(path))?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(buf)
}

//! A docker archive (`docker save`, `podman save --format docker-archive`: `manifest.json`, the
//! config JSON and one tar per layer), rewritten in place as an OCI layout, so that one code path
//! unpacks every kind of image.
//!
//! A docker archive addresses nothing by digest but its config (named by its sha256, the image
//! id), so the manifest written here is made from what the files are. Integrity still holds: a
//! config named by a digest must match it, and each layer must uncompress to the config's
//! `diff_ids`, which the unpack checks.

use std::fs;
use std::io::Read;
use std::path::Path;

use openshell_artifacts::{sha256_file, Digest};
use serde::Deserialize;
use serde_json::json;

use crate::error::{io, ImageError};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    layers: Vec<String>,
}

/// Rewrites the extracted docker archive at `dir` as an OCI layout (`oci-layout`, `index.json`,
/// `blobs/sha256/`), moving the layer files rather than copying them.
pub fn to_layout(dir: &Path) -> Result<(), ImageError> {
    let manifest_path = dir.join("manifest.json");
    let text = fs::read(&manifest_path).map_err(io(&manifest_path))?;
    let entries: Vec<Entry> = crate::layout::parse(&manifest_path, "docker archive manifest", &text)?;
    let entry = match entries.as_slice() {
        [one] => one,
        many => {
            return Err(ImageError::Unsupported(format!(
                "{} lists {} images; save exactly one image into the archive",
                manifest_path.display(),
                many.len()
            )))
        }
    };
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
        let media_type = match magic(&path)? {
            [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
            [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
            _ => "application/vnd.oci.image.layer.v1.tar",
        };
        let blob = blobs.join(digest.hex());
        if !blob.exists() {
            fs::rename(&path, &blob).map_err(io(&blob))?;
        }
        layers.push(json!({"mediaType": media_type, "digest": format!("sha256:{}", digest.hex()), "size": size}));
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", config_digest.hex()),
            "size": config.len(),
        },
        "layers": layers,
    });
    let manifest = serde_json::to_vec(&manifest).expect("json serializes");
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

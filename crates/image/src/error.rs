//! What can go wrong unpacking an image, each case with what a user can do about it.

use std::path::PathBuf;

use openshell_artifacts::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image I/O at {path}: {source}{}", if source.kind() == std::io::ErrorKind::StorageFull {
        "; the disk holding the artifact store is full: free space there, or set OPENSHELL_CACHE_DIR to a directory on a disk with room"
    } else { "" })]
    Io { path: PathBuf, source: std::io::Error },
    /// A blob whose bytes are not the ones its descriptor names: corrupt, truncated or tampered.
    #[error(
        "{what} blob sha256:{expected} does not match its digest: found sha256:{found} ({found_size} bytes, descriptor says \
         {expected_size}); the image is corrupt or truncated: export it again"
    )]
    BlobMismatch { what: String, expected: String, found: String, expected_size: u64, found_size: u64 },
    /// A layer whose uncompressed tar is not the one the config's `rootfs.diff_ids` names.
    #[error(
        "layer {index} (blob sha256:{blob}) uncompresses to sha256:{found}, but the image config's diff_id is {expected}; \
         the image is corrupt: export it again"
    )]
    DiffIdMismatch { index: usize, blob: String, expected: String, found: String },
    #[error("blob sha256:{digest} ({what}) is missing from {layout}: the image layout is incomplete")]
    MissingBlob { what: String, digest: String, layout: PathBuf },
    #[error("{path} is not a valid {what}: {why}")]
    Malformed { path: PathBuf, what: &'static str, why: String },
    #[error("{0}")]
    Unsupported(String),
    /// A layer entry that would write outside the root, or through a symlink.
    #[error("layer {layer} entry {entry:?} is refused: {why}")]
    UnsafeEntry { layer: usize, entry: String, why: String },
    #[error("no manifest for {want} in {layout}: it has {have}")]
    NoPlatform { want: String, layout: PathBuf, have: String },
    #[error("{0}")]
    Reference(String),
    #[error(
        "the local image {name:?} needs podman or docker to export it, and neither is installed: \
         apt-get install -y podman"
    )]
    NoEngine { name: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Engine { command: String, status: String, stderr: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Wraps an I/O error with the path it happened at.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io { path, source }
}

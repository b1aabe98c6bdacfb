//! OCI images as roots: unpack an image (an OCI layout, an OCI or docker archive, or a local
//! podman/docker image) into a root tree in the artifact store, verified.
//!
//! Every blob is checked against its sha256 before it is used, each layer's uncompressed tar
//! against the config's `diff_ids` while it is applied, and the result is published whole or not
//! at all: `<store>/image/<manifest digest>/` holds `root/` (the tree) and `image.json`
//! ([`ImageConfig`]). A second unpack of the same image finds the entry and does nothing. This
//! crate unpacks; it does not run images, pull from registries, or print (progress goes to a
//! callback, detail to `tracing`).

mod apply;
mod config;
mod docker;
mod error;
mod layout;
mod reference;
mod user;

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, MediaType};
use openshell_artifacts::{Arch, Digest, Store};
use sha2::Digest as _;

pub use apply::Privilege;
pub use config::{ImageConfig, Workload};
pub use error::ImageError;
pub use layout::Layout;
pub use reference::{ImageRef, Source};
pub use user::{resolve_user, ImageUser};

/// A `containers.conf` under which podman runs containers on hosts like this project's CI
/// (Debian 12, hybrid cgroups, no CAP_SYS_RESOURCE): runc, since crun refuses hybrid cgroups, and
/// rlimits at or below the hard limits, which runc cannot raise. Exporting an image needs none of
/// it; `bench compare` and the VM suites' podman comparisons run podman with it.
pub const PODMAN_CONF: &str =
    "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n[engine]\nruntime = \"runc\"\n";

use error::io;

pub const STORE_KIND: &str = "image";
/// The tree, inside a store entry.
pub const ROOT: &str = "root";
/// The [`ImageConfig`], inside a store entry.
pub const IMAGE_JSON: &str = "image.json";

/// An unpacked image in the store.
#[derive(Debug, Clone)]
pub struct UnpackedImage {
    /// The store entry.
    pub dir: PathBuf,
    pub config: ImageConfig,
}

impl UnpackedImage {
    pub fn open(dir: &Path) -> Result<UnpackedImage, ImageError> {
        let path = dir.join(IMAGE_JSON);
        let bytes = fs::read(&path).map_err(io(&path))?;
        let config = layout::parse(&path, "image.json", &bytes)?;
        Ok(UnpackedImage { dir: dir.to_owned(), config })
    }

    /// The root tree.
    pub fn root(&self) -> PathBuf {
        self.dir.join(ROOT)
    }

    pub fn workload(&self) -> Workload {
        Workload::from_config(&self.config)
    }
}

/// What [`unpack`] did.
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub image: UnpackedImage,
    /// False when the store already had the image.
    pub fresh: bool,
}

/// Unpacks `image` for the host's architecture into `store`, unless it is there already.
/// `on_line` hears about the long steps (exporting, extracting, each layer).
pub fn unpack(store: &Store, image: &ImageRef, on_line: &mut dyn FnMut(&str)) -> Result<Unpacked, ImageError> {
    if let Some(dir) = image.find_in_store(store, Arch::host())? {
        return Ok(Unpacked { image: UnpackedImage::open(&dir)?, fresh: false });
    }
    let source = image.open(store, on_line)?;
    unpack_layout(store, &source.layout, Arch::host(), Privilege::of_this_process(), on_line)
}

/// Unpacks the image of `layout` for `arch` (the one way in: [`unpack`] comes here once it has a
/// layout on disk).
pub fn unpack_layout(
    store: &Store,
    layout: &Layout,
    arch: Arch,
    privilege: Privilege,
    on_line: &mut dyn FnMut(&str),
) -> Result<Unpacked, ImageError> {
    let resolved = layout.resolve(arch)?;
    let key = resolved.digest.clone();
    if let Some(dir) = store.get(STORE_KIND, &key) {
        return Ok(Unpacked { image: UnpackedImage::open(&dir)?, fresh: false });
    }
    let manifest = &resolved.manifest;
    let config_desc = manifest.config();
    let config_digest = layout::sha256_of(config_desc)?;
    let config_bytes = layout.read_blob("config", config_desc)?;
    let config: ImageConfiguration = layout::parse(&layout.blob_path(&config_digest), "image config", &config_bytes)?;
    let (os, image_arch) = (config.os().to_string(), config.architecture().to_string());
    if os != "linux" || image_arch != arch.debian() {
        return Err(ImageError::NoPlatform {
            want: format!("linux/{}", arch.debian()),
            layout: layout.dir().to_owned(),
            have: format!("an image for {os}/{image_arch} (its config says so)"),
        });
    }
    let layers = manifest.layers();
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != layers.len() {
        return Err(ImageError::Malformed {
            path: layout.blob_path(&config_digest),
            what: "image config",
            why: format!("it lists {} diff_ids for a manifest of {} layers", diff_ids.len(), layers.len()),
        });
    }
    // Every blob is verified before anything is applied: a corrupt last layer stops the unpack
    // before the first is written. A blob changed on disk between its check and its use is still
    // caught: the uncompressed stream must hash to the diff_id of the config verified above.
    let mut verified = Vec::with_capacity(layers.len());
    let mut needed: u64 = 1 << 20;
    for (i, layer) in layers.iter().enumerate() {
        on_line(&format!("verifying layer {}/{} ({} MiB)", i + 1, layers.len(), layer.size() >> 20));
        let compression = Compression::of(layer)?;
        verified.push((layout.verify_blob(&format!("layer {}", i + 1), layer)?, compression));
        needed += layer.size() * compression.expansion();
    }
    let dir = store.get_or_build(STORE_KIND, &key, needed, |out| {
        fs::set_permissions(out, fs::Permissions::from_mode(0o755)).map_err(io(out))?;
        let mut tree = apply::Tree::new(&out.join(ROOT), privilege)?;
        for (i, ((path, compression), layer)) in verified.iter().zip(layers).enumerate() {
            on_line(&format!("applying layer {}/{} ({} MiB)", i + 1, layers.len(), layer.size() >> 20));
            let file = fs::File::open(path).map_err(io(path))?;
            let mut tar = HashingReader::new(compression.reader(file, path)?);
            tree.apply_layer(i + 1, &mut tar)?;
            // The tar's end-of-archive blocks (and any padding after them) are part of the diff_id.
            io::copy(&mut tar, &mut io::sink()).map_err(io(path))?;
            let found = tar.finish();
            let expected = &diff_ids[i];
            if expected.strip_prefix("sha256:") != Some(found.hex().as_str()) {
                return Err(ImageError::DiffIdMismatch {
                    index: i + 1,
                    blob: layout::sha256_of(layer)?.hex(),
                    expected: expected.clone(),
                    found: found.hex(),
                });
            }
        }
        if tree.skipped_devices > 0 {
            tracing::warn!(skipped = tree.skipped_devices, "rootless unpack: device nodes were not created");
        }
        let entries = tree.finish()?;
        let image = ImageConfig::from_oci(
            &config,
            key.clone(),
            config_digest.clone(),
            entries,
            privilege == Privilege::Rootless,
        );
        let path = out.join(IMAGE_JSON);
        fs::write(&path, serde_json::to_string_pretty(&image).expect("image config serializes")).map_err(io(&path))?;
        Ok::<(), ImageError>(())
    })?;
    Ok(Unpacked { image: UnpackedImage::open(&dir)?, fresh: true })
}

/// A layer's compression, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn of(layer: &Descriptor) -> Result<Compression, ImageError> {
        Ok(match layer.media_type() {
            MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Compression::None,
            MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => Compression::Gzip,
            MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => Compression::Zstd,
            MediaType::Other(m) if m == "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
            MediaType::Other(m)
                if m == "application/vnd.docker.image.rootfs.diff.tar.gzip"
                    || m == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" =>
            {
                Compression::Gzip
            }
            other => {
                return Err(ImageError::Unsupported(format!(
                    "layer sha256:{} has media type {other}, which is not a layer tar (plain, gzip or zstd)",
                    layer.as_digest_sha256().unwrap_or("?")
                )))
            }
        })
    }

    /// Roughly how much bigger the tree is than the blob, for the store's disk-space check.
    fn expansion(self) -> u64 {
        match self {
            Compression::None => 1,
            Compression::Gzip | Compression::Zstd => 4,
        }
    }

    fn reader(self, file: fs::File, path: &Path) -> Result<Box<dyn Read>, ImageError> {
        let file = io::BufReader::with_capacity(256 * 1024, file);
        Ok(match self {
            Compression::None => Box::new(file),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file).map_err(io(path))?),
        })
    }
}

/// Hashes what is read through it: the uncompressed layer, for its diff_id.
struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader { inner, hasher: sha2::Sha256::new() }
    }

    fn finish(self) -> Digest {
        let out: [u8; 32] = self.hasher.finalize().into();
        hex::encode(out).parse().expect("sha256 output is a digest")
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests;

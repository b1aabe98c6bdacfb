//! Root disks: a baked [`RootfsBundle`] as an ext4 image (the guest's read-only lower layer), and
//! the empty ext4 data disk an instance writes to (its upper layer). Both are made with e2fsprogs'
//! `mke2fs -d DIR`, which copies a tree into a new filesystem as an ordinary user: no loop device,
//! no mount, no root.
//!
//! The root image is content-addressed like the other store kinds: its key is the rootfs digest,
//! the `mke2fs` version and every option and config line it is made with ([`RootDiskSpec::key`]).
//! It is written into a temporary store directory and renamed into place; `rootdisk.json`
//! records the image's sha256, which [`verify`] re-hashes. The data disk is not an artifact: it
//! belongs to an instance ([`create_data_disk`]), and nothing here deletes one.
//!
//! How reproducible the image is: the options pin everything mke2fs would otherwise pick from the
//! host or the clock: its own `mke2fs.conf` ([`MKE2FS_CONF`], so `/etc/mke2fs.conf` does not
//! count), the filesystem UUID and directory hash seed (derived from the key), the creation time
//! (`E2FSPROGS_FAKE_TIME`), the inode count, the block and inode sizes, the owner of `/`. What
//! mke2fs 1.47.0 copies from the tree as it finds it remains: each inode's atime, mtime and ctime
//! and its uid/gid (a bundle baked by root is all 0:0). So two bakes of one bundle hold the same
//! files, modes and layout, and their bytes differ in inode timestamps; the recorded sha256 is of
//! the image that was built, and [`verify`] holds every later read to it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::command::capture;
use crate::rootfs::RootfsBundle;
use crate::store::StoreError;
use crate::{sha256_file, Digest, DigestBuilder, Store};

pub const STORE_KIND: &str = "rootdisk";
/// The image inside a store entry, and the record beside it.
pub const IMAGE: &str = "root.ext4";
pub const RECORD: &str = "rootdisk.json";
pub const INSTALL_HINT: &str = "apt-get install -y e2fsprogs";
/// Block size of both disks.
const BLOCK: u64 = 4096;
/// Inode size of both disks (room for inline xattrs: ACLs, security labels, overlay's).
const INODE_SIZE: u64 = 256;
/// The creation time written into the root image (`E2FSPROGS_FAKE_TIME`): fixed, not the clock.
const FAKE_TIME: &str = "1";

/// The `mke2fs.conf` both disks are made with (`MKE2FS_CONFIG`), so the host's own config does not
/// change what is built. The ext4 features are Debian 12's defaults; every one is in 6.1's ext4.
pub const MKE2FS_CONF: &str = "[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{tool} is not installed; install it with: {INSTALL_HINT}")]
    MissingTool { tool: &'static str },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("disk I/O at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("root disk {dir} has no readable {RECORD}; rebuild it (any `vm run --root disk` does)")]
    NoRecord { dir: PathBuf },
    #[error(
        "root disk image {path} does not match {RECORD}: recorded sha256 {recorded}, found {found}; it changed after \
         it was built: remove {dir} and boot again to rebuild it"
    )]
    Tampered { path: PathBuf, dir: PathBuf, recorded: String, found: String },
    #[error("a data disk of {mib} MiB is out of range {DATA_DISK_MIN_MIB}..={DATA_DISK_MAX_MIB} MiB (--disk-size)")]
    DataSize { mib: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<crate::command::CommandFailed> for DiskError {
    fn from(crate::command::CommandFailed { command, detail }: crate::command::CommandFailed) -> Self {
        DiskError::Command { command, detail }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io { path: path.to_owned(), source }
}

/// `rootdisk.json`: what the image was made from and its sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootDiskRecord {
    pub rootfs_digest: Digest,
    pub mke2fs_version: String,
    /// The `mke2fs` arguments, without the image and source paths.
    pub options: Vec<String>,
    pub size_bytes: u64,
    pub sha256: Digest,
}

/// A root image in the store.
#[derive(Debug, Clone)]
pub struct RootDisk {
    pub dir: PathBuf,
    pub image: PathBuf,
    pub record: RootDiskRecord,
}

impl RootDisk {
    pub fn open(dir: &Path) -> Result<RootDisk, DiskError> {
        let no = || DiskError::NoRecord { dir: dir.to_owned() };
        let record =
            serde_json::from_str(&fs::read_to_string(dir.join(RECORD)).map_err(|_| no())?).map_err(|_| no())?;
        Ok(RootDisk { dir: dir.to_owned(), image: dir.join(IMAGE), record })
    }
}

/// What a root image is made from: the bundle, and mke2fs with the options below.
#[derive(Debug, Clone)]
pub struct RootDiskSpec {
    pub rootfs_digest: Digest,
    pub source: PathBuf,
    pub mke2fs_version: String,
    pub size_bytes: u64,
    pub inodes: u64,
}

impl RootDiskSpec {
    /// Sizes the image to the bundle (see [`fit`]) and asks the host's mke2fs its version.
    pub fn for_bundle(bundle: &RootfsBundle) -> Result<RootDiskSpec, DiskError> {
        let (size_bytes, inodes) = fit(&bundle.dir)?;
        Ok(RootDiskSpec {
            rootfs_digest: bundle.digest(),
            source: bundle.dir.clone(),
            mke2fs_version: mke2fs_version()?,
            size_bytes,
            inodes,
        })
    }

    /// The content address: the rootfs digest, mke2fs' version, its options and its config.
    pub fn key(&self) -> Digest {
        let mut b = DigestBuilder::new("openshell-rootdisk/v1");
        b.digest("rootfs", &self.rootfs_digest).str("mke2fs", &self.mke2fs_version).str("conf", MKE2FS_CONF);
        for o in self.options() {
            b.str("option", &o);
        }
        b.finish()
    }

    /// The UUID and hash seed of the filesystem: the key's first 128 bits, so one set of inputs
    /// always gets the same ones.
    fn uuid(&self) -> String {
        let mut b = DigestBuilder::new("openshell-rootdisk-uuid/v1");
        b.digest("rootfs", &self.rootfs_digest).str("mke2fs", &self.mke2fs_version);
        let h = b.finish().hex();
        format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    }

    /// `mke2fs` arguments, without the source tree and the image. `-T default`: the same usage type
    /// (and so the same config section) whatever the size; mke2fs would pick `small` or `floppy`
    /// for a small image. No journal: the image is only
    /// ever attached read-only, so there is nothing to replay. `-m 0`: no blocks reserved for root
    /// on a disk nobody writes. `-N`: the inodes the tree needs plus room, instead of one per 16 KiB.
    pub fn options(&self) -> Vec<String> {
        let uuid = self.uuid();
        [
            "-q",
            "-F",
            "-t",
            "ext4",
            "-T",
            "default",
            "-b",
            &BLOCK.to_string(),
            "-I",
            &INODE_SIZE.to_string(),
            "-N",
            &self.inodes.to_string(),
            "-m",
            "0",
            "-O",
            "^has_journal,^resize_inode",
            "-L",
            "openshell-root",
            "-U",
            &uuid,
            "-E",
            &format!("hash_seed={uuid},root_owner=0:0,nodiscard"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// The host's `mke2fs -V` first line (`mke2fs 1.47.0 (5-Feb-2023)`).
pub fn mke2fs_version() -> Result<String, DiskError> {
    let out = Command::new("mke2fs").arg("-V").output().map_err(|_| DiskError::MissingTool { tool: "mke2fs" })?;
    // mke2fs -V prints to stderr.
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    text.lines().find(|l| l.starts_with("mke2fs ")).map(|l| l.trim().to_owned()).ok_or_else(|| DiskError::Command {
        command: "mke2fs -V".into(),
        detail: format!("unexpected output {text:?}"),
    })
}

/// Bytes and inodes an image of the tree at `dir` needs: every file rounded up to blocks, a block
/// per directory (symlinks under 60 bytes live in their inode), plus 10 % and 4 MiB for ext4's
/// own metadata (group descriptors, bitmaps, inode tables, `lost+found`), rounded up to a MiB;
/// inodes: one per entry plus 64 spare.
pub fn fit(dir: &Path) -> Result<(u64, u64), DiskError> {
    let (mut blocks, mut entries) = (0u64, 0u64);
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).map_err(io(&d))? {
            let path = e.map_err(io(&d))?.path();
            let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
            entries += 1;
            if meta.is_dir() {
                blocks += 1;
                stack.push(path);
            } else if meta.is_file() {
                blocks += meta.len().div_ceil(BLOCK);
            } else if meta.file_type().is_symlink() && meta.len() >= 60 {
                blocks += 1;
            }
        }
    }
    let inodes = entries + 64;
    let raw = blocks * BLOCK * 11 / 10 + inodes * INODE_SIZE + (4 << 20);
    Ok((raw.div_ceil(1 << 20) << 20, inodes))
}

/// The root image already built for `spec`, without building (verified by the caller).
pub fn locate(store: &Store, spec: &RootDiskSpec) -> Option<RootDisk> {
    store.get(STORE_KIND, &spec.key()).and_then(|d| RootDisk::open(&d).ok())
}

/// Builds the root image for `spec` unless the store has it.
pub fn build(store: &Store, spec: &RootDiskSpec) -> Result<RootDisk, DiskError> {
    let dir = store.get_or_build(STORE_KIND, &spec.key(), spec.size_bytes, |out| build_into(spec, out))?;
    RootDisk::open(&dir)
}

fn build_into(spec: &RootDiskSpec, out: &Path) -> Result<(), DiskError> {
    let conf = out.join("mke2fs.conf");
    fs::write(&conf, MKE2FS_CONF).map_err(io(&conf))?;
    let image = out.join(IMAGE);
    // Sparse: mke2fs writes only what the filesystem holds.
    let f = fs::File::create(&image).map_err(io(&image))?;
    f.set_len(spec.size_bytes).map_err(io(&image))?;
    drop(f);
    mke2fs(&conf, &spec.options(), Some(&spec.source), &image, Some(FAKE_TIME))?;
    // World-readable whatever the umask, as the kernel and rootfs are: an unprivileged VMM opens
    // it by its fd path, which checks the file's mode.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&image, fs::Permissions::from_mode(0o644)).map_err(io(&image))?;
    fs::remove_file(&conf).map_err(io(&conf))?;
    let record = RootDiskRecord {
        rootfs_digest: spec.rootfs_digest.clone(),
        mke2fs_version: spec.mke2fs_version.clone(),
        options: spec.options(),
        size_bytes: spec.size_bytes,
        sha256: sha256_file(&image).map_err(io(&image))?,
    };
    let path = out.join(RECORD);
    fs::write(&path, serde_json::to_string_pretty(&record).expect("record serializes")).map_err(io(&path))?;
    Ok(())
}

fn mke2fs(
    conf: &Path,
    options: &[String],
    tree: Option<&Path>,
    image: &Path,
    fake_time: Option<&str>,
) -> Result<(), DiskError> {
    let mut cmd = Command::new("mke2fs");
    cmd.env("MKE2FS_CONFIG", conf).args(options);
    if let Some(t) = fake_time {
        cmd.env("E2FSPROGS_FAKE_TIME", t);
    }
    if let Some(tree) = tree {
        cmd.arg("-d").arg(tree);
    }
    cmd.arg(image);
    match capture(&mut cmd) {
        Ok(_) => Ok(()),
        Err(_) if which_mke2fs().is_none() => Err(DiskError::MissingTool { tool: "mke2fs" }),
        Err(e) => Err(e.into()),
    }
}

fn which_mke2fs() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/sbin".into(), "/usr/sbin".into()])
        .map(|d| d.join("mke2fs"))
        .find(|p| p.is_file())
}

/// Re-hashes the image against its record, naming the file, both digests and the fix.
pub fn verify(disk: &RootDisk) -> Result<Digest, DiskError> {
    let found = sha256_file(&disk.image).map_err(io(&disk.image))?;
    if found != disk.record.sha256 {
        return Err(DiskError::Tampered {
            path: disk.image.clone(),
            dir: disk.dir.clone(),
            recorded: disk.record.sha256.hex(),
            found: found.hex(),
        });
    }
    Ok(found)
}

/// A data disk's size unless the caller says otherwise: room for images and logs a workload keeps,
/// and free until written, since the file is sparse.
pub const DEFAULT_DATA_DISK_MIB: u64 = 4096;
pub const DATA_DISK_MIN_MIB: u64 = 64;
pub const DATA_DISK_MAX_MIB: u64 = 1 << 20;

/// Makes an empty ext4 data disk at `path` of `mib` MiB, sparse (a file of that length holding only
/// what mke2fs writes), through a temporary file renamed into place so a killed run leaves no
/// half-made disk. With a journal: this disk is written, and a guest that dies mid-write has it
/// replayed by the kernel at the next mount. Inode tables are left for the kernel's lazy init
/// (`lazy_itable_init`), which the guest skips (`noinit_itable`): a fresh sparse file reads zeros.
/// Refuses to touch an existing file.
pub fn create_data_disk(path: &Path, mib: u64) -> Result<(), DiskError> {
    if !(DATA_DISK_MIN_MIB..=DATA_DISK_MAX_MIB).contains(&mib) {
        return Err(DiskError::DataSize { mib });
    }
    if path.exists() {
        return Err(DiskError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a data disk is already there"),
        });
    }
    let parent = path.parent().unwrap_or(Path::new("."));
    let work = tempfile::Builder::new().prefix(".data-disk-").tempdir_in(parent).map_err(io(parent))?;
    let conf = work.path().join("mke2fs.conf");
    fs::write(&conf, MKE2FS_CONF).map_err(io(&conf))?;
    let tmp = work.path().join("data.ext4");
    let f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.set_len(mib << 20).map_err(io(&tmp))?;
    drop(f);
    let options: Vec<String> = [
        "-q",
        "-F",
        "-t",
        "ext4",
        "-T",
        "default",
        "-m",
        "0",
        "-L",
        "openshell-data",
        "-E",
        "root_owner=0:0,nodiscard,lazy_itable_init=1,lazy_journal_init=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    mke2fs(&conf, &options, None, &tmp, None)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// mke2fs and debugfs, which `cargo xtask test` installs: a test that needs them fails without
    /// them, saying how to get them, rather than passing having checked nothing. (Ignored off
    /// Linux, where the disk root is not baked.)
    fn require_e2fsprogs() {
        let have = which_mke2fs().is_some() && Command::new("debugfs").arg("-V").output().is_ok();
        assert!(have, "this test needs mke2fs and debugfs: {INSTALL_HINT}");
    }

    fn bundle(tmp: &Path) -> RootfsBundle {
        let dir = tmp.join("root");
        fs::create_dir_all(dir.join("sbin")).unwrap();
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::write(dir.join("sbin/openshell-init"), b"\x7fELF init").unwrap();
        fs::write(dir.join("etc/hostname"), "gateway\n").unwrap();
        symlink("/bin/busybox", dir.join("sbin/sh")).unwrap();
        let manifest = crate::rootfs::scan(&dir).unwrap();
        fs::write(dir.join(crate::rootfs::MANIFEST), serde_json::to_string(&manifest).unwrap()).unwrap();
        RootfsBundle::open(&dir).unwrap()
    }

    fn debugfs(image: &Path, request: &str) -> String {
        let out = Command::new("debugfs").args(["-R", request]).arg(image).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_key_follows_the_rootfs_and_mke2fs_and_the_options() {
        let spec = RootDiskSpec {
            rootfs_digest: Digest::of_bytes(b"a"),
            source: "/r".into(),
            mke2fs_version: "mke2fs 1.47.0 (5-Feb-2023)".into(),
            size_bytes: 16 << 20,
            inodes: 100,
        };
        let mut other = spec.clone();
        other.rootfs_digest = Digest::of_bytes(b"b");
        assert_ne!(spec.key(), other.key());
        let mut other = spec.clone();
        other.mke2fs_version = "mke2fs 1.47.1 (20-May-2024)".into();
        assert_ne!(spec.key(), other.key());
        let mut other = spec.clone();
        other.inodes = 101;
        assert_ne!(spec.key(), other.key());
        // The source path is where it was read from, not what it is.
        let mut other = spec.clone();
        other.source = "/elsewhere".into();
        assert_eq!(spec.key(), other.key());
        assert!(spec.options().iter().any(|o| o.starts_with("hash_seed=")), "{:?}", spec.options());
    }

    #[test]
    fn fit_leaves_room_for_the_files_and_the_filesystem() {
        let tmp = tempfile::tempdir().unwrap();
        let b = bundle(tmp.path());
        fs::write(b.dir.join("big"), vec![7u8; 3 << 20]).unwrap();
        let (bytes, inodes) = fit(&b.dir).unwrap();
        assert!(bytes >= (3 << 20) + (4 << 20) && bytes % (1 << 20) == 0, "{bytes}");
        assert!(inodes > 6, "{inodes}");
    }

    #[cfg_attr(not(target_os = "linux"), ignore = "the disk root is baked on Linux hosts only (e2fsprogs)")]
    #[test]
    fn bakes_the_tree_into_ext4_records_its_digest_and_is_cached() {
        require_e2fsprogs();
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let b = bundle(tmp.path());
        let spec = RootDiskSpec::for_bundle(&b).unwrap();
        let disk = build(&store, &spec).unwrap();
        assert_eq!(verify(&disk).unwrap(), disk.record.sha256);
        assert_eq!(disk.record.rootfs_digest, b.digest());
        assert_eq!(fs::metadata(&disk.image).unwrap().len(), spec.size_bytes);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&disk.image).unwrap().permissions().mode() & 0o777, 0o644);
        // The files are in it, with their modes, owned by root, and the symlink too.
        assert_eq!(debugfs(&disk.image, "cat /etc/hostname"), "gateway\n");
        let stat = debugfs(&disk.image, "stat /sbin/openshell-init");
        assert!(stat.contains("User:     0   Group:     0"), "{stat}");
        assert!(debugfs(&disk.image, "stat /sbin/sh").contains("Fast link dest: \"/bin/busybox\""));
        let features = debugfs(&disk.image, "features");
        assert!(features.contains("extent") && !features.contains("has_journal"), "{features}");
        // Cached: a second build returns the same entry without running mke2fs.
        let again = build(&store, &spec).unwrap();
        assert_eq!((again.dir, again.record), (disk.dir.clone(), disk.record.clone()));
        assert!(locate(&store, &spec).is_some());
        assert!(!disk.dir.join("mke2fs.conf").exists());
    }

    #[cfg_attr(not(target_os = "linux"), ignore = "the disk root is baked on Linux hosts only (e2fsprogs)")]
    #[test]
    fn verify_refuses_a_changed_image_naming_it_and_both_digests() {
        require_e2fsprogs();
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let disk = build(&store, &RootDiskSpec::for_bundle(&bundle(tmp.path())).unwrap()).unwrap();
        let mut bytes = fs::read(&disk.image).unwrap();
        bytes[2 << 20] ^= 1;
        fs::write(&disk.image, bytes).unwrap();
        let err = verify(&disk).unwrap_err().to_string();
        assert!(err.contains(&disk.image.display().to_string()), "{err}");
        assert!(err.contains(&disk.record.sha256.hex()) && err.contains("remove"), "{err}");
    }

    #[cfg_attr(not(target_os = "linux"), ignore = "the disk root is baked on Linux hosts only (e2fsprogs)")]
    #[test]
    fn a_data_disk_is_sparse_ext4_with_a_journal_and_never_overwritten() {
        require_e2fsprogs();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("data.ext4");
        create_data_disk(&path, 256).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 256 << 20);
        assert!(meta.blocks() * 512 < 64 << 20, "not sparse: {} bytes allocated", meta.blocks() * 512);
        assert_eq!(meta.mode() & 0o777, 0o600);
        let features = debugfs(&path, "features");
        assert!(features.contains("has_journal"), "{features}");
        let err = create_data_disk(&path, 256).unwrap_err().to_string();
        assert!(err.contains("already there"), "{err}");
        assert!(create_data_disk(&tmp.path().join("x"), 1).unwrap_err().to_string().contains("--disk-size"));
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1, "no temporary left behind");
    }
}

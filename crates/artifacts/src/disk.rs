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
    #[error(
        "{path} is already in the tree {tree}: our programs go on paths of their own and never over the root's \
         files; this root cannot take them (an image that ships its own {path} is not supported)"
    )]
    InTheWay { path: String, tree: PathBuf },
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

/// A host file put into a root image after `mke2fs -d` copied the tree, on a path the tree does
/// not have (our init and guest programs in an OCI image's root), owned by root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskAddition {
    /// Absolute path inside the image.
    pub dest: String,
    pub source: PathBuf,
    /// The source's sha256: part of the image's key.
    pub digest: Digest,
    pub mode: u32,
}

impl DiskAddition {
    pub fn new(source: &Path, dest: &str, mode: u32) -> Result<DiskAddition, DiskError> {
        Ok(DiskAddition {
            dest: dest.to_owned(),
            source: source.to_owned(),
            digest: sha256_file(source).map_err(io(source))?,
            mode,
        })
    }
}

/// Directories init mounts on before the overlay exists: on a read-only root it cannot make them,
/// so an image root that lacks one gets it (empty, root's, 0755; an existing one is left alone).
pub const MOUNT_POINTS: &[&str] = &["/proc", "/sys", "/dev", "/run", "/tmp"];

/// What a root image is made from: a tree (our rootfs bundle, or an unpacked OCI image's root),
/// the files added beside it, and mke2fs with the options below.
#[derive(Debug, Clone)]
pub struct RootDiskSpec {
    /// The tree's identity: the rootfs digest, or an OCI image's manifest digest.
    pub rootfs_digest: Digest,
    pub source: PathBuf,
    /// Added after the tree is copied, on paths it does not have ([`DiskAddition`]).
    pub additions: Vec<DiskAddition>,
    /// [`MOUNT_POINTS`] the tree lacks, made with the additions.
    pub mount_points: Vec<String>,
    pub mke2fs_version: String,
    pub size_bytes: u64,
    pub inodes: u64,
}

impl RootDiskSpec {
    /// Sizes the image to the bundle (see [`fit`]) and asks the host's mke2fs its version.
    pub fn for_bundle(bundle: &RootfsBundle) -> Result<RootDiskSpec, DiskError> {
        RootDiskSpec::for_tree(bundle.digest(), &bundle.dir, Vec::new())
    }

    /// A root image of the tree at `source` (identified by `digest`) with `additions` beside its
    /// files: refused if the tree already has a path an addition would take, so the tree's own
    /// files are never replaced.
    pub fn for_tree(digest: Digest, source: &Path, additions: Vec<DiskAddition>) -> Result<RootDiskSpec, DiskError> {
        for a in &additions {
            let on_host = source.join(a.dest.trim_start_matches('/'));
            if fs::symlink_metadata(&on_host).is_ok() {
                return Err(DiskError::InTheWay { path: a.dest.clone(), tree: source.to_owned() });
            }
        }
        let mount_points: Vec<String> = if additions.is_empty() {
            Vec::new()
        } else {
            MOUNT_POINTS
                .iter()
                .filter(|m| fs::symlink_metadata(source.join(m.trim_start_matches('/'))).is_err())
                .map(|m| m.to_string())
                .collect()
        };
        let (mut size_bytes, mut inodes) = fit(source)?;
        for a in &additions {
            let len = fs::metadata(&a.source).map_err(io(&a.source))?.len();
            size_bytes += len.div_ceil(1 << 20) << 20;
            // The file and each directory above it that may be new.
            inodes += a.dest.matches('/').count() as u64;
        }
        inodes += mount_points.len() as u64;
        Ok(RootDiskSpec {
            rootfs_digest: digest,
            source: source.to_owned(),
            additions,
            mount_points,
            mke2fs_version: mke2fs_version()?,
            size_bytes,
            inodes,
        })
    }

    /// The content address: the tree's digest, each addition (path, digest, mode), mke2fs'
    /// version, its options and its config.
    pub fn key(&self) -> Digest {
        let mut b = DigestBuilder::new("openshell-rootdisk/v1");
        b.digest("rootfs", &self.rootfs_digest).str("mke2fs", &self.mke2fs_version).str("conf", MKE2FS_CONF);
        for o in self.options() {
            b.str("option", &o);
        }
        for a in &self.additions {
            b.str("add", &a.dest).digest("add-digest", &a.digest).str("add-mode", &format!("{:o}", a.mode));
        }
        for m in &self.mount_points {
            b.str("mount-point", m);
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
    add_files(spec, &image)?;
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

/// Writes the spec's additions and missing mount points into the built image with `debugfs -w`
/// (e2fsprogs, no mount, no root): `mke2fs -d` takes one tree, and copying an image's tree to add
/// a few files would cost its size on disk and, without root, its owners. debugfs exits 0 even
/// when a request fails, so anything it says on stderr beyond its banner is a failure.
fn add_files(spec: &RootDiskSpec, image: &Path) -> Result<(), DiskError> {
    if spec.additions.is_empty() && spec.mount_points.is_empty() {
        return Ok(());
    }
    let mut script = String::new();
    let mut made: Vec<String> = Vec::new();
    let mut mkdir = |dir: &str, script: &mut String| {
        if !made.iter().any(|m| m == dir)
            && fs::symlink_metadata(spec.source.join(dir.trim_start_matches('/'))).is_err()
        {
            script.push_str(&format!("mkdir \"{dir}\"\nsif \"{dir}\" mode 040755\n"));
            made.push(dir.to_owned());
        }
    };
    for m in &spec.mount_points {
        mkdir(m, &mut script);
    }
    for a in &spec.additions {
        let (parent, name) = a.dest.rsplit_once('/').expect("an absolute path");
        let mut at = String::new();
        for part in parent.split('/').filter(|p| !p.is_empty()) {
            at = format!("{at}/{part}");
            mkdir(&at, &mut script);
        }
        let parent = if parent.is_empty() { "/" } else { parent };
        // `write` links its file into the current directory under the name given.
        script.push_str(&format!(
            "cd \"{parent}\"\nwrite \"{}\" \"{name}\"\nsif \"{name}\" mode 0{:o}\nsif \"{name}\" uid 0\nsif \"{name}\" gid 0\n",
            a.source.display(),
            0o100000 | a.mode
        ));
    }
    let out = Command::new("debugfs")
        .env("E2FSPROGS_FAKE_TIME", FAKE_TIME)
        .args(["-w", "-f", "-"])
        .arg(image)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("piped").write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .map_err(|_| DiskError::MissingTool { tool: "debugfs" })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs ")).collect();
    if !out.status.success() || !complaints.is_empty() {
        return Err(DiskError::Command {
            command: format!("debugfs -w -f - {}", image.display()),
            detail: format!("{}; requests:\n{script}", complaints.join("; ")),
        });
    }
    Ok(())
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
            additions: Vec::new(),
            mount_points: Vec::new(),
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

    #[cfg_attr(not(target_os = "linux"), ignore = "the disk root is baked on Linux hosts only (e2fsprogs)")]
    #[test]
    fn additions_go_beside_the_trees_files_which_keep_their_owners_and_modes() {
        require_e2fsprogs();
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let tree = tmp.path().join("image-root");
        fs::create_dir_all(tree.join("bin")).unwrap();
        fs::create_dir_all(tree.join("sbin")).unwrap();
        fs::write(tree.join("sbin/openshell-init"), b"the image's own").unwrap();
        fs::write(tree.join("bin/su"), b"setuid").unwrap();
        fs::set_permissions(tree.join("bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
        let init = tmp.path().join("init");
        fs::write(&init, b"\x7fELF our init").unwrap();
        let add = vec![DiskAddition::new(&init, "/.openshell/sbin/openshell-init", 0o755).unwrap()];
        let spec = RootDiskSpec::for_tree(Digest::of_bytes(b"img"), &tree, add.clone()).unwrap();
        assert!(spec.mount_points.contains(&"/proc".to_owned()), "{:?}", spec.mount_points);
        assert_ne!(spec.key(), RootDiskSpec::for_tree(Digest::of_bytes(b"img"), &tree, Vec::new()).unwrap().key());
        let disk = build(&store, &spec).unwrap();
        verify(&disk).unwrap();
        assert_eq!(debugfs(&disk.image, "cat /.openshell/sbin/openshell-init"), "\x7fELF our init");
        assert_eq!(debugfs(&disk.image, "cat /sbin/openshell-init"), "the image's own");
        let ours = debugfs(&disk.image, "stat /.openshell/sbin/openshell-init");
        assert!(ours.contains("Mode:  0755") && ours.contains("User:     0   Group:     0"), "{ours}");
        assert!(debugfs(&disk.image, "stat /bin/su").contains("Mode:  04755"));
        assert!(debugfs(&disk.image, "stat /proc").contains("Type: directory"));
        // A tree that has the path already is refused, naming it.
        fs::create_dir_all(tree.join(".openshell/sbin")).unwrap();
        fs::write(tree.join(".openshell/sbin/openshell-init"), b"x").unwrap();
        let err = RootDiskSpec::for_tree(Digest::of_bytes(b"img"), &tree, add).unwrap_err().to_string();
        assert!(err.contains("/.openshell/sbin/openshell-init") && err.contains("never over"), "{err}");
    }
}

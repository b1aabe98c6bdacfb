//! Unpacking synthetic images that each test builds itself (layers with the `tar` crate, an OCI
//! layout in a tempdir). Tests that need root (mknod of devices, chown to other uids) fail with a
//! message saying so when not run as root, rather than passing without testing anything.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;

fn require_root(what: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root ({what}); run it as root (CI does), e.g. `sudo -E cargo test -p openshell-image`"
    );
}

/// One layer tar, entry by entry.
struct LayerTar {
    b: tar::Builder<Vec<u8>>,
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_700_000_000);
    h.set_size(0);
    h
}

impl LayerTar {
    fn new() -> Self {
        LayerTar { b: tar::Builder::new(Vec::new()) }
    }

    fn put(&mut self, mut h: tar::Header, path: &str, data: &[u8]) -> &mut Self {
        // The path is written raw, so tests can hand in what `set_path` refuses (`..`).
        let name = &mut h.as_mut_bytes()[..100];
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.put(header(tar::EntryType::Directory, mode, 0, 0), path, b"")
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.file_as(path, data, 0o644, 0, 0)
    }

    fn file_as(&mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> &mut Self {
        self.put(header(tar::EntryType::Regular, mode, uid, gid), path, data)
    }

    fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = header(kind, 0o777, 0, 0);
        h.set_link_name(target).unwrap();
        self.put(h, path, b"")
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(tar::EntryType::Symlink, path, target)
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(tar::EntryType::Link, path, target)
    }

    fn node(&mut self, kind: tar::EntryType, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = header(kind, 0o620, 0, 5);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.put(h, path, b"")
    }

    /// A PAX extended header carrying xattrs for the entry after it.
    fn xattrs(&mut self, attrs: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (name, value) in attrs {
            let mut body = format!(" SCHILY.xattr.{name}=").into_bytes();
            body.extend_from_slice(value);
            body.push(b'\n');
            // The record's length counts its own digits.
            let mut len = body.len() + 1;
            while len.to_string().len() + body.len() != len {
                len += 1;
            }
            data.extend_from_slice(len.to_string().as_bytes());
            data.extend_from_slice(&body);
        }
        self.put(header(tar::EntryType::XHeader, 0o644, 0, 0), "PaxHeader", &data)
    }

    fn finish(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.b, tar::Builder::new(Vec::new())).into_inner().unwrap()
    }
}

#[derive(Clone, Copy)]
enum Pack {
    Plain,
    Gzip,
    Zstd,
}

/// An OCI layout in a tempdir.
struct TestImage {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    manifest: Digest,
    layers: Vec<Digest>,
}

fn write_blob(dir: &Path, bytes: &[u8]) -> Digest {
    let d = Digest::of_bytes(bytes);
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("blobs/sha256").join(d.hex()), bytes).unwrap();
    d
}

const CONFIG: &str = r#""config":{"Entrypoint":["/bin/app"],"Cmd":["--serve"],"Env":["PATH=/bin"],"WorkingDir":"/srv","User":"7","ExposedPorts":{"8080/tcp":{}}}"#;

fn image(layers: &[(Vec<u8>, Pack)]) -> TestImage {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut digests = Vec::new();
    for (tar, pack) in layers {
        diff_ids.push(format!("\"sha256:{}\"", Digest::of_bytes(tar).hex()));
        let (blob, media) = match pack {
            Pack::Plain => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
            Pack::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(tar).unwrap();
                (gz.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
            }
            Pack::Zstd => (zstd::encode_all(&tar[..], 1).unwrap(), "application/vnd.oci.image.layer.v1.tar+zstd"),
        };
        let d = write_blob(&dir, &blob);
        descs.push(format!(r#"{{"mediaType":"{media}","digest":"sha256:{}","size":{}}}"#, d.hex(), blob.len()));
        digests.push(d);
    }
    let arch = Arch::host().debian();
    let config = format!(
        r#"{{"architecture":"{arch}","os":"linux",{CONFIG},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    let config_digest = write_blob(&dir, config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},"layers":[{}]}}"#,
        config_digest.hex(),
        config.len(),
        descs.join(",")
    );
    let manifest_digest = write_blob(&dir, manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{},"platform":{{"os":"linux","architecture":"{arch}"}}}}]}}"#,
        manifest_digest.hex(),
        manifest.len()
    );
    fs::write(dir.join("index.json"), index).unwrap();
    TestImage { _tmp: tmp, dir, manifest: manifest_digest, layers: digests }
}

fn unpack_as(store: &Store, img: &TestImage, privilege: Privilege) -> Result<Unpacked, ImageError> {
    let layout = Layout::open(&img.dir)?;
    unpack_layout(store, &layout, Arch::host(), privilege, &mut |_| {})
}

fn unpack_ok(img: &TestImage) -> (tempfile::TempDir, UnpackedImage) {
    let store_dir = tempfile::tempdir().unwrap();
    let u = unpack_as(&Store::new(store_dir.path()), img, Privilege::of_this_process()).unwrap();
    assert!(u.fresh);
    (store_dir, u.image)
}

fn no_entries(store: &Path) {
    let kind = store.join(STORE_KIND);
    let left: Vec<_> = fs::read_dir(&kind).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "the store holds {left:?} after a failed unpack");
}

#[test]
fn unpacks_into_the_store_with_image_json_and_a_second_unpack_does_nothing() {
    let img = image(&[(
        LayerTar::new()
            .dir("bin", 0o755)
            .file_as("bin/app", b"#!/bin/sh\n", 0o755, 0, 0)
            .symlink("sbin", "bin")
            .finish(),
        Pack::Plain,
    )]);
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::new(store_dir.path());
    let first = unpack_as(&store, &img, Privilege::of_this_process()).unwrap();
    assert!(first.fresh);
    let u = first.image;
    assert_eq!(u.dir, store.path(STORE_KIND, &img.manifest), "keyed by the manifest digest");
    assert_eq!(fs::read(u.root().join("bin/app")).unwrap(), b"#!/bin/sh\n");
    assert_eq!(fs::read_link(u.root().join("sbin")).unwrap(), Path::new("bin"));
    let c = &u.config;
    assert_eq!(c.manifest_digest, img.manifest);
    assert_eq!(c.entries, 3);
    assert_eq!(c.exposed_ports, ["8080/tcp"]);
    let w = u.workload();
    assert_eq!(w.argv, ["/bin/app", "--serve"]);
    assert_eq!(w.env, [("PATH".to_owned(), "/bin".to_owned())]);
    assert_eq!((w.cwd.as_str(), w.user.as_deref()), ("/srv", Some("7")));
    // image.json is what other crates read.
    let reread = UnpackedImage::open(&u.dir).unwrap();
    assert_eq!(reread.config, u.config);

    // A second unpack finds the entry: even a layer blob gone missing is not looked at.
    fs::remove_file(img.dir.join("blobs/sha256").join(img.layers[0].hex())).unwrap();
    let again = unpack_as(&store, &img, Privilege::of_this_process()).unwrap();
    assert!(!again.fresh);
    assert_eq!(again.image.dir, u.dir);
}

#[test]
fn whiteouts_remove_what_lower_layers_put_but_not_their_own_layers_files() {
    let img = image(&[
        (
            LayerTar::new()
                .dir("etc", 0o755)
                .file("etc/gone", b"x")
                .dir("var/cache", 0o755)
                .file("var/cache/big", b"y")
                .file("etc/kept", b"z")
                .finish(),
            Pack::Plain,
        ),
        (
            LayerTar::new()
                .file("etc/.wh.gone", b"")
                .file("var/.wh.cache", b"")
                .file("etc/new", b"n")
                .file("etc/.wh.new", b"")
                .file("etc/.wh.never-was", b"")
                .finish(),
            Pack::Plain,
        ),
    ]);
    let (_s, u) = unpack_ok(&img);
    let r = u.root();
    assert!(!r.join("etc/gone").exists());
    assert!(!r.join("var/cache").exists(), "a whiteout of a directory removes all of it");
    assert!(r.join("var").is_dir());
    assert!(r.join("etc/kept").exists());
    assert!(r.join("etc/new").exists(), "a whiteout hides lower layers only");
    assert!(!r.join("etc/.wh.gone").exists(), "whiteout markers are not files of the tree");
}

#[test]
fn an_opaque_directory_hides_lower_contents_and_keeps_its_own() {
    let img = image(&[
        (
            LayerTar::new()
                .dir("opt", 0o755)
                .file("opt/old", b"o")
                .dir("opt/sub", 0o755)
                .file("opt/sub/x", b"x")
                .finish(),
            Pack::Plain,
        ),
        (LayerTar::new().dir("opt", 0o755).file("opt/.wh..wh..opq", b"").file("opt/new", b"n").finish(), Pack::Plain),
    ]);
    let (_s, u) = unpack_ok(&img);
    let names: Vec<_> = fs::read_dir(u.root().join("opt")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["new"]);
}

#[test]
fn later_layers_override_and_replace_across_types() {
    let img = image(&[
        (
            LayerTar::new()
                .file("same", b"old")
                .file("file-becomes-dir", b"f")
                .dir("dir-becomes-file", 0o755)
                .file("dir-becomes-file/inner", b"i")
                .symlink("link-becomes-file", "same")
                .finish(),
            Pack::Plain,
        ),
        (
            LayerTar::new()
                .file("same", b"new")
                .dir("file-becomes-dir", 0o750)
                .file("file-becomes-dir/child", b"c")
                .file("dir-becomes-file", b"now a file")
                .file("link-becomes-file", b"plain")
                .finish(),
            Pack::Gzip,
        ),
    ]);
    let (_s, u) = unpack_ok(&img);
    let r = u.root();
    assert_eq!(fs::read(r.join("same")).unwrap(), b"new");
    assert!(r.join("file-becomes-dir").is_dir());
    assert_eq!(fs::metadata(r.join("file-becomes-dir")).unwrap().permissions().mode() & 0o7777, 0o750);
    assert_eq!(fs::read(r.join("file-becomes-dir/child")).unwrap(), b"c");
    assert_eq!(fs::read(r.join("dir-becomes-file")).unwrap(), b"now a file");
    let m = fs::symlink_metadata(r.join("link-becomes-file")).unwrap();
    assert!(m.is_file(), "the symlink was replaced, not written through");
    assert_eq!(fs::read(r.join("same")).unwrap(), b"new", "the symlink's old target is untouched");
}

#[test]
fn gzip_and_zstd_layers_unpack() {
    let img = image(&[
        (LayerTar::new().file("a", b"gzip").finish(), Pack::Gzip),
        (LayerTar::new().file("b", b"zstd").finish(), Pack::Zstd),
    ]);
    let (_s, u) = unpack_ok(&img);
    assert_eq!(fs::read(u.root().join("a")).unwrap(), b"gzip");
    assert_eq!(fs::read(u.root().join("b")).unwrap(), b"zstd");
}

#[test]
fn modes_with_setuid_setgid_and_sticky_are_kept() {
    let img = image(&[(
        LayerTar::new()
            .file_as("suid", b"s", 0o4755, 0, 0)
            .file_as("sgid", b"g", 0o2711, 0, 0)
            .dir("tmp", 0o1777)
            .dir("ro", 0o555)
            .file("ro/inside", b"i")
            .finish(),
        Pack::Plain,
    )]);
    let (_s, u) = unpack_ok(&img);
    let mode = |p: &str| fs::symlink_metadata(u.root().join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("suid"), 0o4755);
    assert_eq!(mode("sgid"), 0o2711);
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("ro"), 0o555, "a directory's mode is applied after what is written inside it");
    assert!(u.root().join("ro/inside").exists());
}

#[test]
fn owners_and_xattrs_are_kept() {
    require_root("chown to other uids, security.capability");
    // cap_net_bind_service=ep, as setcap writes it (VFS_CAP_REVISION_2).
    let cap: &[u8] = &[0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let img = image(&[(
        LayerTar::new()
            .dir("home", 0o755)
            .put(header(tar::EntryType::Directory, 0o700, 1000, 1000), "home/u", b"")
            .file_as("home/u/f", b"mine", 0o4750, 1000, 50)
            .xattrs(&[("user.note", b"hello"), ("security.capability", cap)])
            .file_as("ping", b"elf", 0o755, 0, 0)
            .symlink("home/u/l", "f")
            .finish(),
        Pack::Plain,
    )]);
    let (_s, u) = unpack_ok(&img);
    let r = u.root();
    let m = fs::symlink_metadata(r.join("home/u/f")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 50));
    assert_eq!(m.permissions().mode() & 0o7777, 0o4750, "setuid survives the chown");
    let d = fs::symlink_metadata(r.join("home/u")).unwrap();
    assert_eq!((d.uid(), d.gid(), d.permissions().mode() & 0o7777), (1000, 1000, 0o700));
    let ping = r.join("ping");
    assert_eq!(xattr::get(&ping, "user.note").unwrap().as_deref(), Some(&b"hello"[..]));
    assert_eq!(xattr::get(&ping, "security.capability").unwrap().as_deref(), Some(cap));
    assert_eq!(xattr::get(r.join("home/u/f"), "user.note").unwrap(), None, "xattrs belong to the next entry only");
}

#[test]
fn device_nodes_and_fifos_are_made() {
    require_root("mknod of character and block devices");
    let img = image(&[(
        LayerTar::new()
            .dir("dev", 0o755)
            .node(tar::EntryType::Char, "dev/null", 1, 3)
            .node(tar::EntryType::Block, "dev/loop0", 7, 0)
            .node(tar::EntryType::Fifo, "dev/pipe", 0, 0)
            .finish(),
        Pack::Plain,
    )]);
    let (_s, u) = unpack_ok(&img);
    let m = |p: &str| fs::symlink_metadata(u.root().join(p)).unwrap();
    let null = m("dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), dev(1, 3));
    assert_eq!((null.gid(), null.permissions().mode() & 0o7777), (5, 0o620));
    let lp = m("dev/loop0");
    assert!(lp.file_type().is_block_device());
    assert_eq!(lp.rdev(), dev(7, 0));
    assert!(m("dev/pipe").file_type().is_fifo());
}

#[test]
fn a_rootless_unpack_skips_devices_and_says_so() {
    let img = image(&[(
        LayerTar::new()
            .node(tar::EntryType::Char, "null", 1, 3)
            .node(tar::EntryType::Fifo, "pipe", 0, 0)
            .file_as("f", b"x", 0o644, 1000, 1000)
            .finish(),
        Pack::Plain,
    )]);
    let store_dir = tempfile::tempdir().unwrap();
    let u = unpack_as(&Store::new(store_dir.path()), &img, Privilege::Rootless).unwrap().image;
    assert!(u.config.rootless);
    assert!(!u.root().join("null").exists());
    assert!(fs::symlink_metadata(u.root().join("pipe")).unwrap().file_type().is_fifo());
    let me = nix::unistd::geteuid().as_raw();
    assert_eq!(fs::metadata(u.root().join("f")).unwrap().uid(), me, "owners are the unpacker's");
}

#[test]
fn hard_links_share_an_inode_within_a_layer_and_across_layers() {
    let img = image(&[
        (
            LayerTar::new()
                .dir("usr/bin", 0o755)
                .file_as("usr/bin/perl", b"perl", 0o755, 0, 0)
                .hardlink("usr/bin/perl5", "usr/bin/perl")
                .finish(),
            Pack::Plain,
        ),
        (LayerTar::new().hardlink("./perl-top", "./usr/bin/perl").finish(), Pack::Plain),
    ]);
    let (_s, u) = unpack_ok(&img);
    let ino = |p: &str| fs::symlink_metadata(u.root().join(p)).unwrap().ino();
    assert_eq!(ino("usr/bin/perl"), ino("usr/bin/perl5"));
    assert_eq!(ino("usr/bin/perl"), ino("perl-top"));
    assert_eq!(fs::symlink_metadata(u.root().join("perl-top")).unwrap().nlink(), 3);
}

/// Each of these must be refused, write nothing outside the root, and leave no store entry.
#[test]
fn entries_that_would_leave_the_root_are_refused() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dot-dot", LayerTar::new().file("../escaped", b"x").finish()),
        ("dot-dot inside", LayerTar::new().dir("a", 0o755).file("a/../../escaped", b"x").finish()),
        (
            "through an absolute symlink",
            LayerTar::new().symlink("evil", "/OUTSIDE").file("evil/escaped", b"x").finish(),
        ),
        ("through a relative symlink", LayerTar::new().symlink("up", "..").file("up/escaped", b"x").finish()),
        ("hard link to ..", LayerTar::new().hardlink("h", "../outside-file").finish()),
        (
            "whiteout through a symlink",
            LayerTar::new().symlink("evil", "/OUTSIDE").file("evil/.wh.victim", b"").finish(),
        ),
    ];
    for (name, tar) in cases {
        let img = image(&[(tar, Pack::Plain)]);
        let store_dir = tempfile::tempdir().unwrap();
        // What a symlink named /OUTSIDE or .. would reach, were it followed: the store's parent.
        let outside = store_dir.path().join("OUTSIDE");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), b"v").unwrap();
        let err = unpack_as(&Store::new(store_dir.path()), &img, Privilege::of_this_process()).unwrap_err();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{name}: {err}");
        assert!(err.to_string().contains("is refused"), "{name}: {err}");
        no_entries(store_dir.path());
        assert!(outside.join("victim").exists(), "{name}");
        assert!(!store_dir.path().join("escaped").exists(), "{name}");
        assert!(!store_dir.path().join(STORE_KIND).join("escaped").exists(), "{name}");
    }
}

#[test]
fn an_absolute_entry_path_lands_inside_the_root() {
    let img = image(&[(LayerTar::new().file("/etc/abs", b"inside").finish(), Pack::Plain)]);
    let (_s, u) = unpack_ok(&img);
    assert_eq!(fs::read(u.root().join("etc/abs")).unwrap(), b"inside");
}

#[test]
fn a_corrupt_or_truncated_layer_names_both_digests_and_leaves_nothing() {
    for truncate in [false, true] {
        let img = image(&[
            (LayerTar::new().file("first", b"fine").finish(), Pack::Plain),
            (LayerTar::new().file("second", b"will be damaged").finish(), Pack::Gzip),
        ]);
        let blob = img.dir.join("blobs/sha256").join(img.layers[1].hex());
        let mut bytes = fs::read(&blob).unwrap();
        if truncate {
            bytes.truncate(bytes.len() / 2);
        } else {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
        }
        fs::write(&blob, &bytes).unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let err = unpack_as(&Store::new(store_dir.path()), &img, Privilege::of_this_process()).unwrap_err();
        let msg = err.to_string();
        let found = Digest::of_bytes(&bytes).hex();
        assert!(matches!(err, ImageError::BlobMismatch { .. }), "{msg}");
        assert!(msg.contains(&img.layers[1].hex()) && msg.contains(&found), "names expected and found: {msg}");
        assert!(msg.contains("layer 2"), "{msg}");
        no_entries(store_dir.path());
    }
}

#[test]
fn a_tampered_manifest_is_refused_before_anything() {
    let img = image(&[(LayerTar::new().file("f", b"x").finish(), Pack::Plain)]);
    let blob = img.dir.join("blobs/sha256").join(img.manifest.hex());
    let text = fs::read_to_string(&blob).unwrap().replace("\"schemaVersion\":2", "\"schemaVersion\": 2");
    fs::write(&blob, text).unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let err = unpack_as(&Store::new(store_dir.path()), &img, Privilege::of_this_process()).unwrap_err();
    assert!(err.to_string().contains(&img.manifest.hex()) && err.to_string().contains("manifest"), "{err}");
    no_entries(store_dir.path());
}

#[test]
fn a_layer_that_does_not_match_its_diff_id_is_refused() {
    let img = image(&[(LayerTar::new().file("f", b"x").finish(), Pack::Plain)]);
    // A new config with a wrong diff_id, and a manifest that names it: every digest checks out
    // but the layer is not the one the config promises.
    let manifest_path = img.dir.join("blobs/sha256").join(img.manifest.hex());
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    let config_hex = manifest["config"]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_owned();
    let config = fs::read_to_string(img.dir.join("blobs/sha256").join(&config_hex)).unwrap();
    let wrong = Digest::of_bytes(b"another layer").hex();
    let layer_diff = Digest::of_bytes(&LayerTar::new().file("f", b"x").finish()).hex();
    let config = config.replace(&layer_diff, &wrong);
    let new_config = write_blob(&img.dir, config.as_bytes());
    let mut manifest = manifest;
    manifest["config"]["digest"] = format!("sha256:{}", new_config.hex()).into();
    manifest["config"]["size"] = config.len().into();
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    let m = write_blob(&img.dir, &mbytes);
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{}}}]}}"#,
        m.hex(),
        mbytes.len()
    );
    fs::write(img.dir.join("index.json"), index).unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let err = unpack_as(&Store::new(store_dir.path()), &img, Privilege::of_this_process()).unwrap_err();
    assert!(matches!(err, ImageError::DiffIdMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&wrong) && err.to_string().contains(&layer_diff), "{err}");
    no_entries(store_dir.path());
}

#[test]
fn the_hosts_manifest_is_chosen_from_an_index_and_a_foreign_only_index_is_refused() {
    let img = image(&[(LayerTar::new().file("f", b"x").finish(), Pack::Plain)]);
    let index_path = img.dir.join("index.json");
    let host: serde_json::Value = serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    let host_entry = host["manifests"][0].clone();
    let foreign_arch = Arch::ALL.into_iter().find(|a| *a != Arch::host()).unwrap().debian();
    let mut foreign = host_entry.clone();
    foreign["digest"] = format!("sha256:{}", Digest::of_bytes(b"not here").hex()).into();
    foreign["platform"]["architecture"] = foreign_arch.into();
    // A nested index (what buildx writes): outer index -> inner index -> both platforms.
    let inner = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [foreign.clone(), host_entry]});
    let inner = serde_json::to_vec(&inner).unwrap();
    let inner_digest = write_blob(&img.dir, &inner);
    let outer = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": format!("sha256:{}", inner_digest.hex()), "size": inner.len()}]});
    fs::write(&index_path, serde_json::to_vec(&outer).unwrap()).unwrap();
    let (_s, u) = unpack_ok(&img);
    assert_eq!(u.config.manifest_digest, img.manifest);

    fs::write(
        &index_path,
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [foreign]})).unwrap(),
    )
    .unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let err = unpack_as(&Store::new(store_dir.path()), &img, Privilege::of_this_process()).unwrap_err();
    assert!(matches!(err, ImageError::NoPlatform { .. }), "{err}");
    assert!(err.to_string().contains(&format!("linux/{foreign_arch}")), "{err}");
}

/// A tar of a directory's files (what `podman save --format oci-archive` writes).
fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

#[test]
fn image_refs_parse_by_prefix_and_by_what_is_on_disk() {
    let img = image(&[(LayerTar::new().file("f", b"x").finish(), Pack::Plain)]);
    let archive = img.dir.with_file_name("image.tar");
    tar_dir(&img.dir, &archive);
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    assert_eq!(s(&img.dir).parse::<ImageRef>().unwrap(), ImageRef::OciLayout(img.dir.clone()));
    assert_eq!(s(&archive).parse::<ImageRef>().unwrap(), ImageRef::OciArchive(archive.clone()));
    assert_eq!("localhost/t".parse::<ImageRef>().unwrap(), ImageRef::Local("localhost/t".into()));
    assert_eq!("podman:x".parse::<ImageRef>().unwrap(), ImageRef::Local("x".into()));
    assert_eq!("docker-archive:/a.tar".parse::<ImageRef>().unwrap(), ImageRef::DockerArchive("/a.tar".into()));
    assert_eq!("oci-archive:/a.tar".parse::<ImageRef>().unwrap(), ImageRef::OciArchive("/a.tar".into()));
    assert!("/no/such/path".parse::<ImageRef>().unwrap_err().to_string().contains("no such file"));
    let plain_dir = tempfile::tempdir().unwrap();
    assert!(s(plain_dir.path()).parse::<ImageRef>().unwrap_err().to_string().contains("oci-layout"));
}

#[test]
fn an_oci_archive_unpacks_like_its_layout_and_leaves_no_scratch() {
    let img = image(&[(LayerTar::new().dir("etc", 0o755).file("etc/os-release", b"ID=test\n").finish(), Pack::Gzip)]);
    let archive = img.dir.with_file_name("image.tar");
    tar_dir(&img.dir, &archive);
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::new(store_dir.path());
    let r: ImageRef = archive.to_str().unwrap().parse().unwrap();
    let u = unpack(&store, &r, &mut |_| {}).unwrap();
    assert_eq!(u.image.config.manifest_digest, img.manifest);
    assert_eq!(fs::read(u.image.root().join("etc/os-release")).unwrap(), b"ID=test\n");
    let scratch: Vec<_> = fs::read_dir(store_dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(scratch.is_empty(), "the extracted archive was removed");
}

#[test]
fn a_docker_archive_unpacks_and_its_layers_are_held_to_the_configs_diff_ids() {
    let l1 = LayerTar::new().dir("bin", 0o755).file_as("bin/sh", b"shell", 0o755, 0, 0).finish();
    let l2 = LayerTar::new().file("bin/.wh.sh", b"").file("motd", b"hi").finish();
    let build = |layers: &[&[u8]], diff_ids: &[&[u8]]| {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = diff_ids.iter().map(|l| format!("\"sha256:{}\"", Digest::of_bytes(l).hex())).collect();
        let config = format!(
            r#"{{"architecture":"{}","os":"linux","config":{{"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
            Arch::host().debian(),
            ids.join(",")
        );
        let config_name = format!("{}.json", Digest::of_bytes(config.as_bytes()).hex());
        fs::write(dir.path().join(&config_name), &config).unwrap();
        let mut names = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            // Old docker's layout: <id>/layer.tar.
            let name = format!("layer{i}/layer.tar");
            fs::create_dir_all(dir.path().join(format!("layer{i}"))).unwrap();
            fs::write(dir.path().join(&name), l).unwrap();
            names.push(format!("\"{name}\""));
        }
        let manifest =
            format!(r#"[{{"Config":"{config_name}","RepoTags":["t:latest"],"Layers":[{}]}}]"#, names.join(","));
        fs::write(dir.path().join("manifest.json"), manifest).unwrap();
        let archive = tempfile::NamedTempFile::new().unwrap();
        tar_dir(dir.path(), archive.path());
        archive
    };
    let archive = build(&[&l1, &l2], &[&l1, &l2]);
    let r: ImageRef = archive.path().to_str().unwrap().parse().unwrap();
    assert_eq!(r, ImageRef::DockerArchive(archive.path().to_owned()));
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::new(store_dir.path());
    let u = unpack(&store, &r, &mut |_| {}).unwrap().image;
    assert!(!u.root().join("bin/sh").exists());
    assert_eq!(fs::read(u.root().join("motd")).unwrap(), b"hi");
    assert_eq!(u.workload().argv, ["/bin/sh"]);
    let mut lines = Vec::new();
    assert!(!unpack(&store, &r, &mut |l| lines.push(l.to_owned())).unwrap().fresh, "found in the store");
    assert!(lines.is_empty(), "the second unpack extracted nothing: {lines:?}");

    // Layers swapped against the config: the diff_ids catch it.
    let swapped = build(&[&l2, &l1], &[&l1, &l2]);
    let r = ImageRef::DockerArchive(swapped.path().to_owned());
    let err = unpack(&store, &r, &mut |_| {}).unwrap_err();
    assert!(matches!(err, ImageError::DiffIdMismatch { index: 1, .. }), "{err}");
}

#[test]
fn a_local_image_without_podman_or_docker_names_the_install_command() {
    let empty = tempfile::tempdir().unwrap();
    let err = reference::Engine::find_in("localhost/t", empty.path().as_os_str()).unwrap_err().to_string();
    assert!(err.contains("apt-get install -y podman") && err.contains("localhost/t"), "{err}");
}

#[test]
fn a_second_unpack_of_an_oci_archive_reads_its_manifest_and_extracts_nothing() {
    let img = image(&[(LayerTar::new().file("f", b"original").finish(), Pack::Plain)]);
    let archive = img.dir.with_file_name("image.tar");
    tar_dir(&img.dir, &archive);
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::new(store_dir.path());
    let r = ImageRef::OciArchive(archive.clone());
    assert!(unpack(&store, &r, &mut |_| {}).unwrap().fresh);
    // The same index and manifest with a damaged layer: a full unpack would refuse it, so a
    // second unpack that succeeds did not look at the layer.
    let blob = img.dir.join("blobs/sha256").join(img.layers[0].hex());
    let mut bytes = fs::read(&blob).unwrap();
    bytes[600] ^= 1;
    fs::write(&blob, bytes).unwrap();
    tar_dir(&img.dir, &archive);
    let mut lines = Vec::new();
    let again = unpack(&store, &r, &mut |l| lines.push(l.to_owned())).unwrap();
    assert!(!again.fresh);
    assert!(lines.is_empty(), "nothing extracted or applied: {lines:?}");
    assert_eq!(fs::read(again.image.root().join("f")).unwrap(), b"original");
    // Proof that the damage is real: unpacking into another store refuses it.
    let other = tempfile::tempdir().unwrap();
    let err = unpack(&Store::new(other.path()), &r, &mut |_| {}).unwrap_err();
    assert!(matches!(err, ImageError::BlobMismatch { .. }), "{err}");
}

/// A device number as `MetadataExt::rdev` reports it (u64), from the target's own dev_t.
#[allow(clippy::unnecessary_cast)] // dev_t is u64 on Linux, i32 on macOS
fn dev(major: u32, minor: u32) -> u64 {
    rustix::fs::makedev(major, minor) as u64
}

//! The real client is judge: a Debian image built here from Debian's archive (mmdebstrap), packed
//! into OCI layers by umoci (a second layer with whiteouts, a file turned directory and back, a
//! hard link, a setuid file, a FIFO, a device node, an xattr), unpacked by us and by
//! `umoci raw unpack`, and the two trees compared entry by entry: path, type, mode, owner, size
//! and sha256 of contents, symlink target, device number, link count, xattrs. A second test takes
//! the same root through `podman import` and our `ImageRef::Local` (a `podman save` export), and
//! through podman's docker archive.
//!
//! Slow (mmdebstrap: ~25 s and apt access to Debian's archive) and root-only, so ignored by
//! default: `cargo test -p openshell-image --test differential -- --ignored` as root, with
//! `apt-get install -y mmdebstrap umoci skopeo podman` done first.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use openshell_artifacts::{sha256_file, Arch, Store};
use openshell_image::{unpack, unpack_layout, ImageRef, Layout, Privilege};

/// (program, the Debian package that provides it)
const UMOCI_TOOLS: &[(&str, &str)] = &[("mmdebstrap", "mmdebstrap"), ("umoci", "umoci")];
const PODMAN_TOOLS: &[(&str, &str)] =
    &[("mmdebstrap", "mmdebstrap"), ("umoci", "umoci"), ("skopeo", "skopeo"), ("podman", "podman")];

/// All of a test's tools are probed up front, and the missing ones named with their install command.
fn preflight(tools: &[(&str, &str)]) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the differential test needs root (it unpacks owners and device nodes): run it as root"
    );
    let missing: Vec<&str> = tools.iter().filter(|(bin, _)| which::which(bin).is_err()).map(|(_, pkg)| *pkg).collect();
    assert!(missing.is_empty(), "missing tools: apt-get install -y {}", missing.join(" "));
}

fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One mmdebstrap root tar per test process: `cargo test` shares it between the two tests;
/// nextest, which runs each test in a process of its own, builds it once per test.
fn debian_tar() -> &'static Path {
    static TAR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = TAR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("rootfs.tar");
        let started = std::time::Instant::now();
        run(Command::new("mmdebstrap").args(["--quiet", "--variant=minbase", "bookworm"]).arg(&tar));
        eprintln!(
            "mmdebstrap: {:.1}s, {} MiB",
            started.elapsed().as_secs_f64(),
            fs::metadata(&tar).unwrap().len() >> 20
        );
        (dir, tar)
    });
    path
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    /// sha256 and size for files, target for symlinks, device number for devices.
    what: String,
    nlink: u64,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn scan(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let (kind, what) = if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            ("dir", String::new())
        } else if ft.is_symlink() {
            ("symlink", fs::read_link(&p).unwrap().display().to_string())
        } else if ft.is_file() {
            ("file", format!("{} {}", m.len(), sha256_file(&p).unwrap()))
        } else if ft.is_char_device() {
            ("char", format!("{:x}", m.rdev()))
        } else if ft.is_block_device() {
            ("block", format!("{:x}", m.rdev()))
        } else if ft.is_fifo() {
            ("fifo", String::new())
        } else {
            ("socket", String::new())
        };
        let xattrs = xattr::list(&p)
            .unwrap()
            .map(|n| {
                let name = n.to_string_lossy().into_owned();
                let value = xattr::get(&p, &n).unwrap().unwrap_or_default();
                (name, value)
            })
            .collect();
        let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
        let nlink = if ft.is_dir() { 0 } else { m.nlink() };
        let mode = if ft.is_symlink() { 0 } else { m.permissions().mode() & 0o7777 };
        out.insert(rel, Entry { kind, mode, uid: m.uid(), gid: m.gid(), what, nlink, xattrs });
    }
    out
}

/// Panics naming the first path where the trees differ.
fn assert_same_tree(ours: &Path, theirs: &Path) -> usize {
    let (a, b) = (scan(ours), scan(theirs));
    let paths: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for p in &paths {
        match (a.get(*p), b.get(*p)) {
            (Some(x), Some(y)) if x == y => {}
            (x, y) => panic!(
                "first differing path {p}:\n  ours:  {x:?}\n  umoci: {y:?}\n({} entries ours, {} umoci's)",
                a.len(),
                b.len()
            ),
        }
    }
    paths.len()
}

fn umoci_raw_unpack(layout: &Path, tag: &str, dest: &Path) {
    run(Command::new("umoci").args(["raw", "unpack", "--image"]).arg(format!("{}:{tag}", layout.display())).arg(dest));
}

#[test]
#[ignore = "builds a Debian image with mmdebstrap (needs root and Debian's archive): run with --ignored"]
fn two_layers_made_by_umoci_unpack_as_umoci_unpacks_them() {
    preflight(UMOCI_TOOLS);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let layout = w.join("layout");
    run(Command::new("umoci").args(["init", "--layout"]).arg(&layout));
    run(Command::new("umoci").args(["new", "--image"]).arg(format!("{}:t", layout.display())));

    // Layer 1: the Debian root, as mmdebstrap made it (owners, modes, xattrs kept by tar -p).
    let bundle = w.join("bundle1");
    run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:t", layout.display())).arg(&bundle));
    let rootfs = bundle.join("rootfs");
    run(Command::new("tar").args(["-xpf"]).arg(debian_tar()).arg("-C").arg(&rootfs).args([
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
    ]));
    run(Command::new("umoci").args(["repack", "--image"]).arg(format!("{}:t", layout.display())).arg(&bundle));

    // Layer 2: changes that need whiteouts and replacements, and the metadata a root needs.
    let bundle = w.join("bundle2");
    run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:t", layout.display())).arg(&bundle));
    let r = bundle.join("rootfs");
    fs::remove_dir_all(r.join("usr/share/doc")).unwrap();
    fs::remove_file(r.join("etc/motd")).unwrap();
    fs::create_dir(r.join("etc/motd")).unwrap();
    fs::write(r.join("etc/motd/now-a-dir"), "x").unwrap();
    fs::remove_dir_all(r.join("opt")).unwrap();
    fs::write(r.join("opt"), "now a file").unwrap();
    fs::write(r.join("usr/bin/suid-tool"), "s").unwrap();
    std::os::unix::fs::chown(r.join("usr/bin/suid-tool"), Some(0), Some(50)).unwrap();
    fs::set_permissions(r.join("usr/bin/suid-tool"), fs::Permissions::from_mode(0o4750)).unwrap();
    fs::hard_link(r.join("usr/bin/suid-tool"), r.join("usr/bin/suid-alias")).unwrap();
    run(Command::new("mkfifo").arg(r.join("run/fifo")));
    run(Command::new("mknod").arg(r.join("dev/null2")).args(["c", "1", "3"]));
    xattr::set(r.join("etc/hostname"), "user.note", b"kept").unwrap();
    std::os::unix::fs::symlink("../usr/share/zoneinfo/UTC", r.join("etc/localtime-link")).unwrap();
    run(Command::new("umoci").args(["repack", "--image"]).arg(format!("{}:t", layout.display())).arg(&bundle));

    let store_dir = w.join("store");
    let store = Store::new(&store_dir);
    let started = std::time::Instant::now();
    let ours = unpack_layout(&store, &Layout::open(&layout).unwrap(), Arch::host(), Privilege::Root, &mut |l| {
        eprintln!("{l}")
    })
    .unwrap();
    eprintln!("our unpack: {:.1}s, {} entries", started.elapsed().as_secs_f64(), ours.image.config.entries);
    assert!(ours.fresh);
    let theirs = w.join("umoci-root");
    umoci_raw_unpack(&layout, "t", &theirs);
    let n = assert_same_tree(&ours.image.root(), &theirs);
    assert!(n > 3000, "a Debian minbase root has thousands of entries, these trees {n}");
    assert!(!ours.image.root().join("usr/share/doc").exists());
    eprintln!("identical: {n} paths");
    let again =
        unpack_layout(&store, &Layout::open(&layout).unwrap(), Arch::host(), Privilege::Root, &mut |_| {}).unwrap();
    assert!(!again.fresh);
}

#[test]
#[ignore = "builds a Debian image with mmdebstrap and imports it into podman (needs root): run with --ignored"]
fn a_podman_image_unpacks_as_umoci_unpacks_its_export() {
    preflight(PODMAN_TOOLS);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let name = format!("localhost/openshell-image-diff-{}", std::process::id());
    run(Command::new("podman").args(["import", "--quiet"]).arg(debian_tar()).arg(&name));
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("podman").args(["rmi", "--force", &self.0]).output();
        }
    }
    let _remove = Remove(name.clone());

    let store = Store::new(w.join("store"));
    let image: ImageRef = name.parse().unwrap();
    assert_eq!(image, ImageRef::Local(name.clone()));
    let ours = unpack(&store, &image, &mut |l| eprintln!("{l}")).unwrap();

    // The reference: podman's own export of the same image, copied to a layout by skopeo.
    let archive = w.join("export.tar");
    run(Command::new("podman").args(["save", "--format", "oci-archive", "-o"]).arg(&archive).arg(&name));
    let layout = w.join("layout");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("oci:{}:t", layout.display())));
    let theirs = w.join("umoci-root");
    umoci_raw_unpack(&layout, "t", &theirs);
    let n = assert_same_tree(&ours.image.root(), &theirs);
    assert!(n > 3000, "{n}");
    eprintln!("identical: {n} paths");

    // The same image as a docker archive: another manifest (uncompressed layers), the same tree.
    let docker = w.join("docker.tar");
    run(Command::new("podman").args(["save", "--format", "docker-archive", "-o"]).arg(&docker).arg(&name));
    let image: ImageRef = docker.to_str().unwrap().parse().unwrap();
    assert_eq!(image, ImageRef::DockerArchive(docker.clone()));
    let from_docker = unpack(&store, &image, &mut |l| eprintln!("{l}")).unwrap();
    assert!(from_docker.fresh);
    let n = assert_same_tree(&from_docker.image.root(), &theirs);
    eprintln!("docker archive identical: {n} paths");
    let mut lines = Vec::new();
    assert!(!unpack(&store, &image, &mut |l| lines.push(l.to_owned())).unwrap().fresh);
    assert!(lines.is_empty(), "a second unpack of the docker archive extracted nothing: {lines:?}");
}

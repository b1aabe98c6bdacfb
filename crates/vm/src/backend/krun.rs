//! libkrun: the backend for hardware KVM (and HVF on macOS).
//!
//! The supervisor starts `openshell-vmm` with a [`KrunSpec`] on its command line, because
//! `krun_start_enter` takes over the process that calls it. On Linux the spec names every file by
//! the fd the VMM inherits (`/proc/self/fd/N`, see [`crate::sandbox`]), as QEMU's command line
//! does, so the VMM can start as `nobody` and its argv says what it holds. The root directory is shared as an
//! extra virtio-fs device tagged `rootfs` and mounted with `root=rootfs rootfstype=virtiofs`, the
//! same shape as the QEMU backend: libkrun's own `/dev/root` tag needs libkrunfw's kernel patches,
//! which our kernel (built from Debian's source) does not carry.

use std::path::PathBuf;
use std::process::Command;

use openshell_guest::{DATA_DISK_ID, ROOT_DISK_ID, SHARE_TAG, SHARE_TRANSPORT_PARAM};
use openshell_krun::KrunDisk;
pub use openshell_krun::KrunSpec;
use openshell_krun::UnixgramNet;

use crate::child::CHILD_FD;
use crate::net::Link;
use crate::sandbox::HandedFds;
use crate::VmConfig;

/// libkrun's default prolog (which a cmdline passed to `krun_set_kernel` replaces) with our init
/// and root; `earlyprintk` puts the first kernel lines on the serial console.
pub fn kernel_cmdline(cfg: &VmConfig) -> String {
    let init = cfg.root.init();
    let root = match cfg.root {
        crate::Root::Share => format!("root={} rootfstype=virtiofs", super::ROOT_TAG),
        crate::Root::Disk { .. } => super::disk_root_params(),
    };
    let line = format!(
        "reboot=k panic=-1 panic_print=0 nomodule console=hvc0 earlyprintk=serial,ttyS0,115200 \
         {root} ro quiet no-kvmapf init={init} {SHARE_TRANSPORT_PARAM}=virtiofs"
    );
    format!("{line} {}", super::init_params(cfg))
}

/// Where the VMM finds each file of `cfg`.
struct Files {
    kernel: PathBuf,
    rootfs: PathBuf,
    share: PathBuf,
    console: PathBuf,
    shares: Vec<PathBuf>,
    /// The root image and the data disk of a disk root.
    disks: Option<(PathBuf, PathBuf)>,
}

impl Files {
    /// Linux: the fds it inherits; the directories behind `/.` (libkrun opens them `O_NOFOLLOW`),
    /// the console the bounded pipe's write end ([`crate::console`]).
    #[cfg(target_os = "linux")]
    fn of(_cfg: &VmConfig, fds: &HandedFds) -> Files {
        use crate::sandbox::{dir_fd_path, fd_path};
        Files {
            kernel: fd_path(fds.kernel).into(),
            rootfs: dir_fd_path(fds.rootfs).into(),
            share: dir_fd_path(fds.share).into(),
            console: fd_path(fds.console).into(),
            shares: fds.shares.iter().map(|&fd| dir_fd_path(fd).into()).collect(),
            disks: fds.disks.map(|d| (fd_path(d.root).into(), fd_path(d.data).into())),
        }
    }

    /// macOS: by path, as before the handover existed, and the console into its file: nothing
    /// is dropped there (no root), and libkrun on HVF opening `/dev/fd/N` directories is untried.
    #[cfg(not(target_os = "linux"))]
    fn of(cfg: &VmConfig, _fds: &HandedFds) -> Files {
        Files {
            kernel: cfg.kernel.clone(),
            rootfs: cfg.rootfs.clone(),
            share: cfg.share_dir(),
            console: cfg.console_path(),
            shares: cfg.shares.iter().map(|s| s.host.clone()).collect(),
            disks: match &cfg.root {
                crate::Root::Share => None,
                crate::Root::Disk { image, .. } => Some((image.clone(), cfg.data_disk_path())),
            },
        }
    }
}

pub fn spec(cfg: &VmConfig, link: &Link, fds: &HandedFds) -> KrunSpec {
    let files = Files::of(cfg, fds);
    KrunSpec {
        vcpus: cfg.vcpus,
        mem_mib: cfg.mem_mib,
        root: files.rootfs.clone(),
        kernel: files.kernel,
        cmdline: kernel_cmdline(cfg),
        // What libkrun executes: our init itself (where this root carries it), without arguments
        // or environment. The command reaches the guest once, in `exec.json` in the share;
        // `krun_set_exec` would also put its argv and env on the guest kernel command line, where
        // every guest process can read them and a newline in a script aborts the VMM (libkrun's
        // cmdline builder: `InvalidAscii`).
        exec_path: cfg.root.init().into(),
        args: Vec::new(),
        env: Vec::new(),
        workdir: None,
        console_output: Some(files.console),
        serial_console: true,
        shares: [(super::ROOT_TAG.into(), files.rootfs), (SHARE_TAG.into(), files.share)]
            .into_iter()
            .chain(cfg.shares.iter().map(|s| s.mount.tag.clone()).zip(files.shares))
            .collect(),
        // The root image first: the guest kernel mounts /dev/vda. Serials as the guest checks them.
        disks: files
            .disks
            .map(|(root, data)| {
                vec![
                    KrunDisk { block_id: ROOT_DISK_ID.into(), image: root, read_only: true },
                    KrunDisk { block_id: DATA_DISK_ID.into(), image: data, read_only: false },
                ]
            })
            .unwrap_or_default(),
        log_level: cfg.log_level,
        // passt's socketpair, or gvproxy's stream link (Linux). libkrun's legacy call takes no
        // MAC and gives the guest 5a:94:ef:e4:0c:ee (libkrun 1.19.7 `krun_start_enter`), which
        // is gvproxy's static lease (`net::gvproxy::GUEST_MAC`) and which passt ignores.
        passt_fd: matches!(link, Link::Stream { .. }).then_some(CHILD_FD),
        net_unixgram: match link {
            Link::Unixgram { path, mac } => Some(UnixgramNet { path: path.clone(), mac: *mac, vfkit_magic: true }),
            _ => None,
        },
    }
}

/// `openshell-vmm` (`vmm`, located by [`crate::host::vmm_binary`]) with the spec it boots, its
/// files named by the fds it inherits (`files`).
pub fn command(vmm: &std::path::Path, cfg: &VmConfig, link: &Link, files: &HandedFds) -> Command {
    let mut c = Command::new(vmm);
    c.args(spec(cfg, link, files).to_args());
    // macOS: openshell-vmm links Homebrew's libkrun, which Apple silicon's Homebrew keeps off the
    // loader's default search path. The VMM is signed without the hardened runtime, so DYLD_*
    // reaches its loader and `vm run` works without the user exporting anything.
    #[cfg(target_os = "macos")]
    c.env("DYLD_FALLBACK_LIBRARY_PATH", dyld_fallback_path(std::env::var_os("DYLD_FALLBACK_LIBRARY_PATH")));
    c
}

/// Where Homebrew installs libkrun: Apple silicon, then Intel. What the VMM's loader searches on
/// macOS (and what `cargo xtask check` can name as where it looked).
pub const LIBKRUN_DIRS: &[&str] = &["/opt/homebrew/lib", "/usr/local/lib"];

/// `DYLD_FALLBACK_LIBRARY_PATH` for the VMM: the caller's own entries first, then
/// [`LIBKRUN_DIRS`], then the rest of dyld's default fallback (`~/lib`, `/usr/lib`), which setting
/// the variable would otherwise replace.
pub fn dyld_fallback_path(existing: Option<std::ffi::OsString>) -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = existing.map(|v| std::env::split_paths(&v).collect()).unwrap_or_default();
    let home_lib = std::env::var_os("HOME").map(|h| PathBuf::from(h).join("lib"));
    for d in LIBKRUN_DIRS.iter().map(PathBuf::from).chain(home_lib).chain([PathBuf::from("/usr/lib")]) {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    std::env::join_paths(dirs).expect("no ':' in these directories")
}

/// The kernel and root directory a running `openshell-vmm` was started with, as its argv names
/// them ([`command`]): the spec's kernel and its virtio-fs share tagged [`super::ROOT_TAG`] that
/// the guest mounts as its root (on Linux, fd paths: `backend::booted_artifacts` resolves them).
pub fn booted_artifacts(argv: &[String]) -> Result<super::BootedArtifacts, String> {
    let spec = KrunSpec::from_argv(argv)?;
    // libkrun still gets the rootfs directory (`krun_set_root`), but a disk root's guest mounts
    // the image: that is its root.
    if let Some(d) = spec.disks.iter().find(|d| d.block_id == ROOT_DISK_ID) {
        return Ok(super::BootedArtifacts { kernel: spec.kernel.clone(), rootfs: d.image.clone() });
    }
    let rootfs = spec
        .shares
        .iter()
        .find(|(tag, _)| tag == super::ROOT_TAG)
        .map(|(_, dir)| dir.clone())
        .ok_or_else(|| format!("its spec has no virtio-fs share tagged {}", super::ROOT_TAG))?;
    Ok(super::BootedArtifacts { kernel: spec.kernel, rootfs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(net: crate::Net) -> VmConfig {
        let mut c = VmConfig::exec("/k".into(), "/r".into(), "/st".into(), vec!["/bin/true".into()]);
        c.net = net;
        c
    }

    /// Fd numbers as a [`crate::sandbox::Handover`] would hand them over: 10, 11, … in order.
    fn files(c: &VmConfig) -> HandedFds {
        HandedFds {
            kernel: 10,
            rootfs: 11,
            share: 12,
            console: 13,
            shares: (14..).take(c.shares.len()).collect(),
            disks: None,
        }
    }

    fn spec_of(c: &VmConfig) -> KrunSpec {
        spec(c, &Link::of(c.net, crate::net::Attach::Krun, &c.state_dir), &files(c))
    }

    #[test]
    fn the_command_travels_only_in_the_share() {
        let mut c = cfg(crate::Net::None);
        c.exec.argv = vec!["/bin/sh".into(), "-c".into(), "echo one\necho two".into()];
        c.exec.env = vec![("SECRET".into(), "value".into())];
        let s = spec_of(&c);
        assert_eq!(
            (s.exec_path.as_str(), s.args.len(), s.env.len(), s.workdir),
            (openshell_guest::INIT_BIN, 0, 0, None)
        );
        assert!(!s.cmdline.contains("SECRET") && !s.cmdline.contains("echo"), "{}", s.cmdline);
    }

    #[test]
    fn passt_is_an_inherited_fd_and_gvproxy_its_stream_on_linux_and_a_vfkit_socket_on_macos() {
        let s = spec_of(&cfg(crate::Net::Passt));
        assert_eq!((s.passt_fd, s.net_unixgram), (Some(3), None));
        assert!(s.cmdline.contains("openshell.net=192.0.2.2/24,192.0.2.1"), "{}", s.cmdline);

        let s = spec_of(&cfg(crate::Net::Gvproxy));
        if cfg!(target_os = "macos") {
            assert_eq!(s.passt_fd, None);
            let net = s.net_unixgram.expect("gvproxy link");
            assert_eq!(net.path, std::path::Path::new("/st/gvproxy/link.sock"));
            assert_eq!(net.mac, [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]);
            assert!(net.vfkit_magic, "gvproxy's vfkit mode learns libkrun's address from the VFKT magic");
        } else {
            // gvproxy's released Linux builds have no vfkit link: its stream, at the inherited fd.
            assert_eq!((s.passt_fd, s.net_unixgram), (Some(3), None));
        }
        assert!(s.cmdline.contains("openshell.net=192.168.127.2/24,192.168.127.1"), "{}", s.cmdline);

        let s = spec_of(&cfg(crate::Net::None));
        assert_eq!((s.passt_fd, s.net_unixgram), (None, None));
        assert!(!s.cmdline.contains("openshell.net"));
    }

    #[test]
    #[cfg_attr(not(target_os = "linux"), ignore = "macOS names the files by path (no handover there)")]
    fn every_file_is_an_inherited_fd_and_the_argv_names_no_host_path() {
        use crate::sandbox::FD_DIR;
        let mut c = cfg(crate::Net::Passt);
        c.kernel = "/store/kernel/vmlinux".into();
        c.rootfs = "/store/rootfs/abc".into();
        c.shares = vec![crate::config::DirShare {
            host: "/h/work".into(),
            mount: openshell_guest::GuestMount { tag: "work".into(), path: "/run/work".into(), read_only: false },
        }];
        let s = spec_of(&c);
        assert_eq!(s.kernel, std::path::Path::new(&format!("{FD_DIR}/10")));
        assert_eq!(s.root, std::path::Path::new(&format!("{FD_DIR}/11/.")));
        assert_eq!(s.console_output.as_deref(), Some(std::path::Path::new(&format!("{FD_DIR}/13"))));
        let dirs: Vec<String> = s.shares.iter().map(|(t, d)| format!("{t}={}", d.display())).collect();
        assert_eq!(
            dirs,
            [format!("rootfs={FD_DIR}/11/."), format!("openshell={FD_DIR}/12/."), format!("work={FD_DIR}/14/.")]
        );
        let argv: Vec<String> = command(std::path::Path::new("/x/openshell-vmm"), &c, &Link::None, &files(&c))
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = argv.join(" ");
        assert!(!joined.contains("/store/") && !joined.contains("/st/") && !joined.contains("/h/"), "{joined}");
    }

    #[test]
    #[cfg_attr(not(target_os = "linux"), ignore = "macOS names the files by path (no handover there)")]
    fn a_disk_root_adds_the_image_first_read_only_then_the_data_disk() {
        let mut c = cfg(crate::Net::None);
        c.root = crate::Root::disk("/store/rootdisk/x/root.ext4".into(), 64);
        let mut fds = files(&c);
        fds.disks = Some(crate::sandbox::DiskFds { root: 20, data: 21, data_read: 22 });
        let s = spec(&c, &Link::None, &fds);
        let disks: Vec<(String, String, bool)> =
            s.disks.iter().map(|d| (d.block_id.clone(), d.image.display().to_string(), d.read_only)).collect();
        let fd = crate::sandbox::fd_path;
        assert_eq!(disks, [("openshell-root".to_owned(), fd(20), true), ("openshell-data".to_owned(), fd(21), false)]);
        assert!(s.cmdline.contains(" root=/dev/vda rootfstype=ext4 ro ") && s.cmdline.contains("openshell.root=disk"));
        assert_eq!(s.fds(), [10, 11, 12, 13, 20, 21]);
        let argv: Vec<String> = ["openshell-vmm".to_owned()].into_iter().chain(s.to_args()).collect();
        assert_eq!(booted_artifacts(&argv).unwrap().rootfs, std::path::Path::new(&fd(20)));
        assert!(spec_of(&cfg(crate::Net::None)).disks.is_empty());
    }

    #[test]
    fn booted_artifacts_are_what_the_spec_on_the_argv_names() {
        let c = cfg(crate::Net::Passt);
        let argv: Vec<String> = ["/x/openshell-vmm".to_owned()].into_iter().chain(spec_of(&c).to_args()).collect();
        let b = booted_artifacts(&argv).unwrap();
        let s = spec_of(&c);
        assert_eq!((b.kernel, b.rootfs), (s.kernel, s.root));

        let e = booted_artifacts(&argv[..1]).unwrap_err();
        assert!(e.contains("expected `openshell-vmm --spec JSON`"), "{e}");
        let mut no_root = spec_of(&c);
        no_root.shares.retain(|(tag, _)| tag != super::super::ROOT_TAG);
        let argv: Vec<String> = ["openshell-vmm".to_owned()].into_iter().chain(no_root.to_args()).collect();
        assert!(booted_artifacts(&argv).unwrap_err().contains("no virtio-fs share tagged rootfs"));
    }

    #[test]
    fn dyld_fallback_keeps_the_callers_entries_and_adds_homebrew() {
        let got = super::dyld_fallback_path(None).into_string().unwrap();
        assert!(got.starts_with("/opt/homebrew/lib:/usr/local/lib:"), "{got}");
        assert!(got.ends_with(":/usr/lib"), "{got}");
        let got = super::dyld_fallback_path(Some("/my/lib:/usr/local/lib".into())).into_string().unwrap();
        assert!(got.starts_with("/my/lib:/usr/local/lib:/opt/homebrew/lib:"), "{got}");
        assert_eq!(got.matches("/usr/local/lib").count(), 1, "{got}");
    }
}

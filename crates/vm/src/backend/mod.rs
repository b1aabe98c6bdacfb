//! The two VMMs behind one contract: boot the kernel with the rootfs directory shared read-only,
//! share the instance directory, record the console to a file, and exit when the guest powers off.

pub mod krun;
pub mod qemu;

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// libkrun: hardware KVM (Linux) or HVF (macOS), root over virtio-fs.
    Krun,
    /// QEMU microvm: KVM where hardware KVM exists, TCG otherwise; root over virtio-9p.
    Qemu { kvm: bool },
}

impl Backend {
    /// The backend's name without its accelerator: `krun` or `qemu`, as `--vmm` spells it.
    pub fn kind(self) -> &'static str {
        match self {
            Backend::Krun => "krun",
            Backend::Qemu { .. } => "qemu",
        }
    }

    /// Whether the VMM opens `/dev/kvm` (and so runs with its group, [`crate::sandbox::VmmUser`]):
    /// libkrun always on Linux (HVF on macOS), QEMU when it accelerates with KVM.
    pub fn uses_kvm(self) -> bool {
        match self {
            Backend::Krun => cfg!(target_os = "linux"),
            Backend::Qemu { kvm } => kvm,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Krun => f.write_str("krun"),
            Backend::Qemu { kvm: true } => f.write_str("qemu (kvm)"),
            Backend::Qemu { kvm: false } => f.write_str("qemu (tcg)"),
        }
    }
}

/// Parameters for our init, common to both backends: the host's wall clock (microvm has no RTC and
/// libkrun none the guest reads, and TLS certificate checks need a real date) and the network.
pub fn init_params(cfg: &crate::VmConfig) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut p = format!("openshell.time={now}");
    if let Some(guest) = cfg.net.guest() {
        p.push(' ');
        p.push_str(&guest.cmdline_param(cfg.dhcp));
    }
    if let crate::Root::Disk { .. } = cfg.root {
        p.push_str(&format!(" {}={}", openshell_guest::ROOT_PARAM, openshell_guest::ROOT_DISK));
    }
    let mounts: Vec<openshell_guest::GuestMount> = cfg.shares.iter().map(|s| s.mount.clone()).collect();
    if !mounts.is_empty() {
        p.push(' ');
        p.push_str(&openshell_guest::GuestMount::param(&mounts));
    }
    p
}

/// The kernel's root on a [`crate::Root::Disk`] VM, under both VMMs: the root image, attached
/// first, read-only and without a journal.
pub fn disk_root_params() -> String {
    format!("root={} rootfstype=ext4", openshell_guest::ROOT_DISK_DEV)
}

/// The tag of the device that serves the guest's root directory (`root=` on its command line):
/// a 9p `mount_tag` under QEMU, a virtio-fs share under libkrun.
pub const ROOT_TAG: &str = "rootfs";

/// The kernel file and root a VMM process was started with: the root directory, or a disk root's
/// image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootedArtifacts {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
}

/// What a running VMM of ours was started with, read back from its argv (`/proc/<pid>/cmdline`):
/// QEMU names both on its command line, `openshell-vmm` in the spec on its command line. Relative
/// paths resolve against the VMM's working directory `cwd`, and a `/proc/self/fd/N` (both get their
/// files open, see [`crate::sandbox`]) as what the VMM's fd N is, which `open_fd` reads
/// ([`crate::procfs::fd_target`]). This is the VMM's word, not the instance's records: what
/// `verify` re-hashes.
pub fn booted_artifacts(
    argv: &[String],
    cwd: &Path,
    open_fd: &dyn Fn(i32) -> Option<PathBuf>,
) -> Result<BootedArtifacts, String> {
    let program = argv.first().map(|a| a.rsplit('/').next().unwrap_or(a)).unwrap_or_default();
    let found = if program.starts_with("qemu-system") {
        qemu::booted_artifacts(argv)?
    } else if program == "openshell-vmm" {
        krun::booted_artifacts(argv)?
    } else {
        return Err(format!("{program:?} is not a VMM this project starts ({})", VMM_PROGRAMS.join(", ")));
    };
    let resolve = |p: PathBuf| -> Result<PathBuf, String> {
        match crate::sandbox::fd_of(&p) {
            Some(fd) => open_fd(fd).ok_or_else(|| {
                format!(
                    "it names {}, and that fd of the VMM cannot be read (run as the user that started it)",
                    p.display()
                )
            }),
            None => Ok(cwd.join(p)),
        }
    };
    Ok(BootedArtifacts { kernel: resolve(found.kernel)?, rootfs: resolve(found.rootfs)? })
}

/// What a VMM process of ours runs: a recorded VMM pid that runs neither is not ours any more.
pub const VMM_PROGRAMS: &[&str] = &["qemu-system", "openshell-vmm"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VmmChoice;

    #[test]
    fn parses_choices() {
        assert_eq!("qemu".parse::<VmmChoice>().unwrap(), VmmChoice::Qemu);
        assert!("xen".parse::<VmmChoice>().is_err());
    }

    #[test]
    fn booted_artifacts_by_program_with_relative_paths_from_the_cwd() {
        let argv: Vec<String> = [
            "/usr/bin/qemu-system-x86_64",
            "-kernel",
            "k/vmlinux",
            "-fsdev",
            "local,id=root,path=rootfs",
            "-device",
            "virtio-9p-device,fsdev=root,mount_tag=rootfs",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        let b = booted_artifacts(&argv, Path::new("/cwd"), &|_| None).unwrap();
        assert_eq!((b.kernel.as_path(), b.rootfs.as_path()), (Path::new("/cwd/k/vmlinux"), Path::new("/cwd/rootfs")));
        let e =
            booted_artifacts(&["/usr/bin/sleep".to_owned(), "9".to_owned()], Path::new("/"), &|_| None).unwrap_err();
        assert!(e.contains("\"sleep\" is not a VMM"), "{e}");
    }

    #[test]
    fn booted_artifacts_handed_over_as_fds_are_what_those_fds_are() {
        use crate::sandbox::fd_path;
        let argv: Vec<String> = vec![
            "qemu-system-x86_64".into(),
            "-kernel".into(),
            fd_path(10),
            "-fsdev".into(),
            format!("local,id=root,path={},readonly=on", fd_path(11)),
            "-device".into(),
            "virtio-9p-device,fsdev=root,mount_tag=rootfs".into(),
        ];
        let fds = |fd| match fd {
            10 => Some(PathBuf::from("/store/kernel/vmlinux")),
            11 => Some(PathBuf::from("/store/rootfs/abc")),
            _ => None,
        };
        let b = booted_artifacts(&argv, Path::new("/cwd"), &fds).unwrap();
        assert_eq!(
            (b.kernel.as_path(), b.rootfs.as_path()),
            (Path::new("/store/kernel/vmlinux"), Path::new("/store/rootfs/abc"))
        );
        let e = booted_artifacts(&argv, Path::new("/cwd"), &|_| None).unwrap_err();
        assert!(e.contains(&fd_path(10)) && e.contains("cannot be read"), "{e}");

        // openshell-vmm's spec names its root share behind `/.` (libkrun opens it O_NOFOLLOW).
        let mut cfg = crate::VmConfig::exec("/k".into(), "/r".into(), "/st".into(), vec!["/bin/true".into()]);
        cfg.net = crate::Net::None;
        let handed =
            crate::sandbox::HandedFds { kernel: 10, rootfs: 11, share: 12, console: 13, shares: vec![], disks: None };
        let spec = krun::spec(&cfg, &crate::net::Link::None, &handed);
        let argv: Vec<String> = ["/x/openshell-vmm".to_owned()].into_iter().chain(spec.to_args()).collect();
        let b = booted_artifacts(&argv, Path::new("/cwd"), &fds).unwrap();
        if cfg!(target_os = "linux") {
            assert_eq!(
                (b.kernel.as_path(), b.rootfs.as_path()),
                (Path::new("/store/kernel/vmlinux"), Path::new("/store/rootfs/abc"))
            );
        }
    }
}

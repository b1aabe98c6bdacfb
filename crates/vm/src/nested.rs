//! The nested host: where libkrun cannot run directly but QEMU's TCG emulates AMD SVM
//! ([`KrunPlace::NestedL1`](crate::KrunPlace)), an L1 VM gets a working `/dev/kvm` and libkrun
//! inside it boots our guest as L2.
//!
//! L1 is an ordinary VM of the QEMU backend (one way to start QEMU): the nested-host kernel (the
//! guest's config plus KVM), the nested root (Debian minbase with passt, `openshell-init` as PID 1),
//! 2 vCPUs and 2 GiB under TCG with `-cpu max`, told the host's TSC rate, networked through passt
//! (no forwards), and with host directories shared in (the guest artifacts, `openshell-vmm`, a test binary). Its init runs one command and
//! reports its exit code, as any guest's does. This module builds that config; what runs inside L1
//! is the caller's.

use std::path::{Path, PathBuf};

use openshell_guest::GuestMount;

use crate::config::DirShare;
use crate::{VmConfig, VmError, VmmChoice};

/// L1's size: room for two L2 guests of 512 MiB next to passt and the test binary; two vCPUs so an
/// L2 and its VMM's other threads do not take turns on one emulated CPU.
pub const L1_VCPUS: u8 = 2;
pub const L1_MEM_MIB: u32 = 2048;
/// Where L1's init mounts the shared host directories (`/run` is a tmpfs there, and L1's root is
/// read-only, so mount points are made below it).
pub const L1_SHARES: &str = "/run/nested";

/// What L1 runs before its command: Debian's udev rule for `/dev/kvm` (`GROUP="kvm", MODE="0660"`),
/// which L1, without udev, would not apply; devtmpfs leaves the device root's, 0600. The VMM inside
/// L1 starts as `nobody` with `/dev/kvm`'s group ([`crate::sandbox::VmmUser`]); the nested root
/// carries the `kvm` group (`openshell_artifacts::nested_root`).
const KVM_ACCESS: &str = "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm && exec \"$@\"";

/// A built nested host: the nested-host kernel and the nested root.
#[derive(Debug, Clone)]
pub struct NestedHost {
    pub kernel: PathBuf,
    pub root: PathBuf,
}

/// Host paths made visible inside L1: each path's directory is shared once (read-only), and
/// [`L1Paths::inside`] says where a host path appears in L1.
#[derive(Debug, Clone, Default)]
pub struct L1Paths {
    shares: Vec<DirShare>,
}

impl L1Paths {
    /// Shares the directory `dir` (read-only) and returns where it appears inside L1. A directory
    /// inside one already shared is reached through that share: QEMU's microvm has 8 virtio-mmio
    /// transports, and L1's root, its share, its RNG and its NIC take four of them. (On 9p each
    /// lookup makes a new inode, which a landlock rule on an older one never matches; the VMM's
    /// rules are on the files it is handed open, so any of them may sit below a share's root.)
    pub fn share_dir(&mut self, dir: &Path) -> String {
        if let Some((s, rest)) = self.shares.iter().find_map(|s| Some((s, dir.strip_prefix(&s.host).ok()?))) {
            return if rest.as_os_str().is_empty() {
                s.mount.path.clone()
            } else {
                format!("{}/{}", s.mount.path, rest.display())
            };
        }
        let tag = format!("l1share{}", self.shares.len());
        let path = format!("{L1_SHARES}/{tag}");
        self.shares
            .push(DirShare { host: dir.to_owned(), mount: GuestMount { tag, path: path.clone(), read_only: true } });
        path
    }

    /// Shares what libkrun inside L1 needs to boot our guest (its kernel and rootfs, and
    /// `openshell-vmm`), and returns the environment that names them there: `OPENSHELL_KERNEL`,
    /// `OPENSHELL_ROOTFS`, `OPENSHELL_VMM`, as the VM suites and the bench read them.
    pub fn share_guest(&mut self, kernel: &Path, rootfs: &Path, vmm: &Path) -> Result<Vec<(String, String)>, VmError> {
        Ok(vec![
            ("OPENSHELL_KERNEL".into(), self.share_file(kernel)?),
            ("OPENSHELL_ROOTFS".into(), self.share_dir(rootfs)),
            ("OPENSHELL_VMM".into(), self.share_file(vmm)?),
        ])
    }

    /// Shares the directory holding `file` and returns the file's path inside L1.
    pub fn share_file(&mut self, file: &Path) -> Result<String, VmError> {
        let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
            return Err(VmError::Invalid(format!("{} is not a file that can be shared into L1", file.display())));
        };
        Ok(format!("{}/{}", self.share_dir(dir), name.to_string_lossy()))
    }
}

impl NestedHost {
    /// L1 running `argv` (paths as L1 sees them) with `env`, the `paths` shared in, state under
    /// `state_dir`. Fails when the host's TSC rate cannot be read: without it, L1's KVM may
    /// never enter L2.
    pub fn l1_config(
        &self,
        state_dir: PathBuf,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        paths: L1Paths,
    ) -> Result<VmConfig, VmError> {
        let tsc = crate::host::tsc_khz().ok_or_else(|| {
            VmError::NoBackend(
                "the nested host needs the host's TSC rate, and this host's TSC is not invariant (no constant_tsc in /proc/cpuinfo)".into(),
            )
        })?;
        let argv = ["/bin/sh", "-c", KVM_ACCESS, "l1"].into_iter().map(str::to_owned).chain(argv).collect();
        let mut cfg = VmConfig::exec(self.kernel.clone(), self.root.clone(), state_dir, argv);
        cfg.vmm = VmmChoice::Qemu;
        cfg.vcpus = L1_VCPUS;
        cfg.mem_mib = L1_MEM_MIB;
        cfg.exec.env = env;
        cfg.shares = paths.shares;
        cfg.guest_tsc_khz = Some(tsc);
        // passt inside L1 (L2's network) refuses to start without a routable interface to model
        // the guest's side on ("External interface not usable"): L1 gets its own, through passt on
        // the host, with no forwards.
        cfg.net = crate::Net::Passt;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_inside_a_shared_one_takes_no_share_of_its_own() {
        let mut p = L1Paths::default();
        assert_eq!(p.share_dir(Path::new("/store")), "/run/nested/l1share0");
        assert_eq!(
            p.share_file(Path::new("/store/gvproxy/ab/bin/gvproxy")).unwrap(),
            "/run/nested/l1share0/gvproxy/ab/bin/gvproxy"
        );
        assert_eq!(p.share_dir(Path::new("/store/rootfs/cd")), "/run/nested/l1share0/rootfs/cd");
        // A sibling with a common prefix is not inside it.
        assert_eq!(p.share_dir(Path::new("/store2")), "/run/nested/l1share1");
        assert_eq!(p.shares.len(), 2);
    }

    #[test]
    fn a_directory_is_shared_once_and_files_keep_their_names() {
        let mut p = L1Paths::default();
        let bin = p.share_file(Path::new("/t/debug/deps/vm-123")).unwrap();
        let vmm = p.share_file(Path::new("/t/debug/openshell-vmm")).unwrap();
        let again = p.share_file(Path::new("/t/debug/deps/other")).unwrap();
        assert_eq!(bin, "/run/nested/l1share0/vm-123");
        assert_eq!(vmm, "/run/nested/l1share1/openshell-vmm");
        assert_eq!(again, "/run/nested/l1share0/other");
        assert_eq!(p.shares.len(), 2);
        assert!(p.shares.iter().all(|s| s.mount.read_only && s.mount.validate().is_ok()));
        assert!(p.share_file(Path::new("/")).is_err());
        let env =
            p.share_guest(Path::new("/s/k/vmlinux"), Path::new("/s/r"), Path::new("/t/debug/openshell-vmm")).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("OPENSHELL_KERNEL"), Some("/run/nested/l1share2/vmlinux"));
        assert_eq!(get("OPENSHELL_ROOTFS"), Some("/run/nested/l1share3"));
        assert_eq!(get("OPENSHELL_VMM"), Some("/run/nested/l1share1/openshell-vmm"));
    }
}

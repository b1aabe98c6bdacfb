//! Least privilege for the VMM, which parses guest-controlled device traffic and so should be able
//! to do little else. Owns three things: QEMU's seccomp filter ([`QEMU_SECCOMP`]), the user both
//! VMMs run as when we are root ([`VmmUser`], dropped to between fork and exec), and the files
//! they get open rather than by path ([`Handover`]). It does not own `openshell-vmm`'s landlock
//! confinement: that process confines itself once it has read its spec (`openshell_krun::confine`).
//!
//! Why the drop happens before exec, for both: nothing the VMM does needs root once its files are
//! open, so it never holds root at all, and one mechanism serves QEMU and `openshell-vmm` alike
//! (a drop inside `openshell-vmm` would be a second one, and would leave it root while it parses
//! its spec and sets up landlock). For QEMU there is a second reason: QEMU 7.2 installs its
//! seccomp filter while it parses options and calls `setgid`/`setuid` for `-runas` later, so with
//! `elevateprivileges=deny` it kills itself with SIGSYS (measured here).
//!
//! Why files are handed over open: started as `nobody`, the VMM could not reach the kernel, the
//! rootfs or the instance's share by path (they live under root's 0700 home and 0700 instance
//! directories). We open each one and the VMM finds it as `/proc/self/fd/N` (QEMU's kernel loader
//! and 9p exports, libkrun's kernel, virtio-fs shares and console open plain paths) or as
//! `/dev/fdset/N` (QEMU's console chardev). So the VMM's uid needs no path to anything: what it can
//! touch is what it was given, plus what any `nobody` can. The guest reads and writes the share
//! with the VMM's uid (9p `security_model=none`, libkrun's virtio-fs without CAP_SETUID), so the
//! share alone is handed to that uid ([`VmmUser::own_share`]), and the console pipe too, which
//! libkrun reopens by its fd path (a pipe is its creator's, mode 0600).
//!
//! Why `nobody` rather than a dedicated user: it exists on every Linux host, so neither a fresh
//! machine nor a library caller needs a privileged setup step; passt already drops to it; and with
//! the files handed over, the uid owns nothing reachable by path (the share it owns sits below a
//! root-only directory). A dedicated user would not separate one instance's VMM from another's
//! either: only a uid per instance would.
//!
//! macOS: nobody is root there, so there is nothing to drop; `openshell-vmm` is given its files
//! by path as before (`backend::krun::spec`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{VmConfig, VmError};

/// QEMU's seccomp filter: no obsolete syscalls, no set*id, no fork/exec, no scheduler or
/// resource-limit changes. Set on every QEMU we start, root or not.
pub const QEMU_SECCOMP: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The user the VMM runs as when we are root (see the module's note on why this one).
pub const VMM_USER: &str = "nobody";

/// Handed-over fds are moved at or above this number, so the network's `dup2` onto
/// [`crate::child::CHILD_FD`] can never land on one of them.
const FIRST_HANDED_FD: RawFd = 10;
const _: () = assert!(FIRST_HANDED_FD > crate::child::CHILD_FD);

/// Who the VMM runs as when started by root: [`VMM_USER`]'s uid and group, and as its only
/// supplementary group `/dev/kvm`'s when it uses KVM (both VMMs open the device by path); none
/// otherwise, not even root's or `nobody`'s own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl VmmUser {
    /// `None` when we are not root: the VMM then runs as the caller, who has nothing to drop.
    pub fn for_vmm(kvm: bool) -> Result<Option<VmmUser>, VmError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let (uid, gid) = lookup_user(VMM_USER).ok_or_else(|| {
            VmError::Invalid(format!(
                "the VMM runs as {VMM_USER:?} when started as root, and this host has no such user; create it \
                 (`useradd --system --no-create-home --shell /usr/sbin/nologin {VMM_USER}`)"
            ))
        })?;
        let groups = if kvm { vec![kvm_group(Path::new("/dev/kvm"))?] } else { Vec::new() };
        Ok(Some(VmmUser { uid, gid, groups }))
    }

    /// Gives the instance share (what the guest reads and writes through 9p or virtio-fs with the
    /// VMM's uid) to this user, contents included; symlinks are not followed. Secrets in it (the gateway's server
    /// key) keep their 0600: the VMM reads them on the guest's behalf and nobody else needs to.
    pub fn own_share(&self, share: &Path) -> Result<(), VmError> {
        chown_tree(share, self.uid, self.gid).map_err(|(path, source)| VmError::Io { path, source })
    }

    /// Makes `cmd` start as this user: supplementary groups, gid, then uid (the order that keeps
    /// the right to change the next), all between fork and exec so the VMM never holds root.
    pub fn drop_to(&self, cmd: &mut Command) {
        let (uid, gid, groups) = (self.uid, self.gid, self.groups.clone());
        // SAFETY: only async-signal-safe syscalls between fork and exec (the Vec is built before).
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                // As root, setgid and setuid set the real, effective and saved ids alike.
                if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // A change of credentials clears the parent-death signal asked for earlier.
                crate::child::die_with_parent()
            });
        }
    }
}

/// `name`'s uid and primary gid from the user database.
pub fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let user = nix::unistd::User::from_name(name).ok()??;
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

/// The group through which an unprivileged VMM may open `/dev/kvm`.
fn kvm_group(dev: &Path) -> Result<u32, VmError> {
    let meta = std::fs::metadata(dev).map_err(|source| VmError::Io { path: dev.to_owned(), source })?;
    if meta.mode() & 0o006 == 0o006 || meta.mode() & 0o060 == 0o060 && meta.gid() != 0 {
        return Ok(meta.gid());
    }
    Err(VmError::NoBackend(format!(
        "{} is mode {:o} group {}, so the VMM cannot use it once it drops root to {VMM_USER:?}; give it a group \
         (Debian's udev rule does: `chgrp kvm /dev/kvm && chmod 0660 /dev/kvm`)",
        dev.display(),
        meta.mode() & 0o777,
        meta.gid()
    )))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), (PathBuf, std::io::Error)> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| (path.to_owned(), e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| (path.to_owned(), e))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| (path.to_owned(), e))? {
            chown_tree(&entry.map_err(|e| (path.to_owned(), e))?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// The fd numbers a VMM finds its files at: the same numbers as in this process (the child
/// inherits them). What the command line names; plain numbers, so building it touches no file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandedFds {
    pub kernel: RawFd,
    pub rootfs: RawFd,
    pub share: RawFd,
    /// The console pipe's write end: QEMU's `/dev/fdset` accepts an fd whose access mode matches
    /// its own open (write-only).
    pub console: RawFd,
    /// One per [`VmConfig::shares`] entry, in order.
    pub shares: Vec<RawFd>,
    /// A [`crate::Root::Disk`] VM's two disks.
    pub disks: Option<DiskFds>,
}

/// The disks of a disk-root VM: the root image opened read-only, the data disk read-write, and
/// the data disk once more read-only. QEMU's `/dev/fdset` hands a drive the fd whose access mode
/// matches each open it makes, and QEMU 7.2 opens a writable drive read-only first (measured:
/// "Could not dup FD for /dev/fdset/N flags 0: Permission denied" with the read-write fd alone);
/// libvirt hands over both for the same reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskFds {
    pub root: RawFd,
    pub data: RawFd,
    pub data_read: RawFd,
}

pub use openshell_krun::child::{dir_fd_path, fd_of, fd_path, FD_DIR};

/// The files of a VM, opened by us, for the VMM to inherit.
#[derive(Debug)]
pub struct Handover {
    kernel: OwnedFd,
    rootfs: OwnedFd,
    share: OwnedFd,
    /// The write end of the console pipe (see [`crate::console`]).
    console: OwnedFd,
    /// The pipe's read end and the console log it goes to, until [`Self::take_console`].
    console_log: Option<(OwnedFd, std::fs::File)>,
    shares: Vec<OwnedFd>,
    disks: Option<[OwnedFd; 3]>,
}

impl Handover {
    /// Opens what `cfg` boots: the kernel and directories read-only; the console is a pipe whose
    /// read end [`crate::console`] copies into the console log, bounded, and whose write end is
    /// `user`'s (libkrun reopens it by its fd path, which a pipe's creator alone may).
    pub fn open(cfg: &VmConfig, user: Option<&VmmUser>) -> Result<Handover, VmError> {
        let read = |p: &Path| open_high(p, false);
        let path = cfg.console_path();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|source| VmError::Io { path: path.clone(), source })?;
        // std's pipe is close-on-exec on every Unix (pipe2 where there is one; macOS has none).
        let (pipe_r, pipe_w) = std::io::pipe().map_err(|source| VmError::Io { path: path.clone(), source })?;
        if let Some(user) = user {
            std::os::unix::fs::fchown(&pipe_w, Some(user.uid), Some(user.gid))
                .map_err(|source| VmError::Io { path: path.clone(), source })?;
        }
        Ok(Handover {
            kernel: read(&cfg.kernel)?,
            rootfs: read(&cfg.rootfs)?,
            share: read(&cfg.share_dir())?,
            console: dup_high(pipe_w.into(), &path)?,
            console_log: Some((pipe_r.into(), log)),
            shares: cfg.shares.iter().map(|s| read(&s.host)).collect::<Result<_, _>>()?,
            disks: match &cfg.root {
                crate::Root::Share => None,
                crate::Root::Disk { image, .. } => {
                    let data = cfg.data_disk_path();
                    Some([read(image)?, open_high(&data, true)?, read(&data)?])
                }
            },
        })
    }

    /// The console pipe's read end and the log file, for the writer thread (once).
    pub fn take_console(&mut self) -> Option<(OwnedFd, std::fs::File)> {
        self.console_log.take()
    }

    pub fn fds(&self) -> HandedFds {
        HandedFds {
            kernel: self.kernel.as_raw_fd(),
            rootfs: self.rootfs.as_raw_fd(),
            share: self.share.as_raw_fd(),
            console: self.console.as_raw_fd(),
            shares: self.shares.iter().map(AsRawFd::as_raw_fd).collect(),
            disks: self.disks.as_ref().map(|[root, data, data_read]| DiskFds {
                root: root.as_raw_fd(),
                data: data.as_raw_fd(),
                data_read: data_read.as_raw_fd(),
            }),
        }
    }

    /// Lets `cmd`'s child inherit the files (ours stay close-on-exec for every other child).
    pub fn give_to(&self, cmd: &mut Command) {
        let fds = self.fds();
        let disks = fds.disks.map(|d| [d.root, d.data, d.data_read]).into_iter().flatten();
        let all: Vec<RawFd> =
            [fds.kernel, fds.rootfs, fds.share, fds.console].into_iter().chain(fds.shares).chain(disks).collect();
        // SAFETY: only fcntl between fork and exec, on fds this value keeps open until after spawn.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &all {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
}

/// Opens `path` close-on-exec at fd [`FIRST_HANDED_FD`] or above.
fn open_high(path: &Path, write: bool) -> Result<OwnedFd, VmError> {
    let io = |source| VmError::Io { path: path.to_owned(), source };
    // Written means read and written: a disk the guest writes is read back too.
    let file = std::fs::OpenOptions::new().read(true).write(write).open(path).map_err(io)?;
    dup_high(file.into(), path)
}

/// `fd` moved to a close-on-exec fd at [`FIRST_HANDED_FD`] or above (`path` names it in errors).
#[allow(unsafe_code)]
fn dup_high(fd: OwnedFd, path: &Path) -> Result<OwnedFd, VmError> {
    let io = |source| VmError::Io { path: path.to_owned(), source };
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd (or -1), which we then own.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, FIRST_HANDED_FD) };
    if high < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    // SAFETY: `high` is a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(high) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handed_files_sit_above_the_network_fd_and_reopen_by_fd_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = VmConfig::exec(dir.path().join("k"), dir.path().into(), dir.path().join("s"), vec!["/x".into()]);
        std::fs::write(&cfg.kernel, b"kernel").unwrap();
        std::fs::create_dir_all(cfg.share_dir()).unwrap();
        std::fs::write(cfg.console_path(), b"").unwrap();
        cfg.shares = vec![crate::config::DirShare {
            host: dir.path().into(),
            mount: openshell_guest::GuestMount { tag: "x".into(), path: "/x".into(), read_only: true },
        }];
        let h = Handover::open(&cfg, None).unwrap();
        let fds = h.fds();
        for fd in [fds.kernel, fds.rootfs, fds.share, fds.console, fds.shares[0]] {
            assert!(fd >= FIRST_HANDED_FD, "{fd}");
        }
        assert_eq!(std::fs::read(fd_path(fds.kernel)).unwrap(), b"kernel");
        assert!(Path::new(&fd_path(fds.share)).is_dir());
        let missing = VmConfig::exec(dir.path().join("nope"), dir.path().into(), dir.path().join("s"), vec![]);
        assert!(matches!(Handover::open(&missing, None), Err(VmError::Io { path, .. }) if path.ends_with("nope")));
    }

    /// libkrun reopens the console pipe by its fd path, which only the pipe's owner may: the write
    /// end is the VMM user's, and that user can then open it (a child dropped to it, as the VMM).
    #[test]
    fn the_console_pipe_is_the_vmm_users_and_it_reopens_it() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: no other user to hand the pipe to");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = VmConfig::exec(dir.path().join("k"), dir.path().into(), dir.path().join("s"), vec!["/x".into()]);
        std::fs::write(&cfg.kernel, b"kernel").unwrap();
        std::fs::create_dir_all(cfg.share_dir()).unwrap();
        std::fs::write(cfg.console_path(), b"").unwrap();
        let (uid, gid) = lookup_user(VMM_USER).expect("a nobody user");
        let user = VmmUser { uid, gid, groups: Vec::new() };
        let mut h = Handover::open(&cfg, Some(&user)).unwrap();
        let fds = h.fds();
        let meta = std::fs::metadata(fd_path(fds.console)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (uid, gid));
        let mut child = Command::new("/bin/sh");
        child.args(["-c", &format!("echo reopened > {}", fd_path(fds.console))]);
        h.give_to(&mut child);
        user.drop_to(&mut child);
        let status = child.status().unwrap();
        let (pipe, _log) = h.take_console().unwrap();
        drop(h);
        let mut got = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(pipe), &mut got).unwrap();
        assert!(status.success() && got == "reopened\n", "{status}: {got:?}");
    }

    #[test]
    fn kvm_group_needs_group_or_world_access() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = kvm_group(&dev).unwrap_err().to_string();
        assert!(err.contains("mode 600") && err.contains("chmod 0660"), "{err}");
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(kvm_group(&dev).unwrap(), std::fs::metadata(&dev).unwrap().gid());
    }
}

//! What the host and the guest agree on: the exec request the host places in the instance share,
//! and where the guest reports the command's exit status. Shared so neither side guesses.

use serde::{Deserialize, Serialize};

#[cfg(target_os = "linux")]
pub mod ifconfig;
pub mod netconf;

/// Mount point of the per-instance share inside the guest (tag [`SHARE_TAG`]).
pub const SHARE_MOUNT: &str = "/run/openshell";
/// The virtio-9p / virtio-fs tag of the per-instance share.
pub const SHARE_TAG: &str = "openshell";
/// The exec request, relative to the share.
pub const EXEC_FILE: &str = "exec.json";
/// The exit status the guest writes back, relative to the share.
pub const EXIT_CODE_FILE: &str = "exit-code";
/// The host asks the guest to stop by creating this file in the share: init then stops the
/// workload (SIGTERM, SIGKILL after its grace) and reports its real exit status. A signal to the
/// VMM would end the guest without letting it say how its workload ended.
pub const STOP_REQUEST_FILE: &str = "stop-request";
/// The guest capability checker inside the rootfs (`openshell-guest-check`).
pub const GUEST_CHECK_BIN: &str = "/usr/bin/openshell-guest-check";
/// Where every root carries our init (the kernel's `init=`, libkrun's exec path).
pub const INIT_BIN: &str = "/sbin/openshell-init";
/// Where an image root carries our init: its own path, beside the image's files and never over
/// one of them (an image may well have a `/sbin/init` of its own).
pub const IMAGE_INIT_BIN: &str = "/.openshell/sbin/openshell-init";
/// The directory an image root keeps our programs under ([`IMAGE_INIT_BIN`] and the rest).
pub const IMAGE_GUEST_DIR: &str = "/.openshell";
/// Where every root carries the gateway (the gateway preset's workload).
pub const GATEWAY_BIN: &str = "/usr/bin/openshell-gateway";
/// Where the guest checker writes its matrix as JSON, relative to the share.
pub const GUEST_CHECK_FILE: &str = "guest-check.json";
/// Kernel command-line key telling init how the share is transported (`9p` or `virtiofs`).
pub const SHARE_TRANSPORT_PARAM: &str = "openshell.share";
/// Kernel command-line key listing the extra host directories init mounts (same transport as the
/// share) before it runs the command: `openshell.mounts=TAG:/path[:ro],…`.
pub const MOUNTS_PARAM: &str = "openshell.mounts";

/// Kernel command-line key saying where the guest's root comes from: absent for the root
/// directory the kernel mounted from a share (9p or virtio-fs), [`ROOT_DISK`] for the root image
/// the kernel mounted from the first virtio-blk disk, which init then stacks the data disk on.
pub const ROOT_PARAM: &str = "openshell.root";
/// [`ROOT_PARAM`]'s value for a disk root.
pub const ROOT_DISK: &str = "disk";
/// The device the kernel mounts as the root of a disk root (`root=`): the root image is the
/// first disk attached, so the first virtio-blk device. Init checks its serial is
/// [`ROOT_DISK_ID`] before it trusts it.
pub const ROOT_DISK_DEV: &str = "/dev/vda";
/// The virtio-blk serial (`VIRTIO_BLK_T_GET_ID`, at most 20 bytes) of the read-only root image:
/// QEMU's `serial=`, libkrun's `block_id`. The guest reads it at `/sys/block/vdX/serial`.
pub const ROOT_DISK_ID: &str = "openshell-root";
/// The virtio-blk serial of the instance's read-write data disk (ext4): overlayfs' upper layer.
pub const DATA_DISK_ID: &str = "openshell-data";
/// On the data disk: the overlay's upper and work directories.
pub const DATA_UPPER_DIR: &str = "upper";
pub const DATA_WORK_DIR: &str = "work";
/// On a disk root, where the root image stays mounted (read-only) once the overlay is `/`.
pub const LOWER_ROOT: &str = "/.openshell-lower";
/// On a disk root, where the data disk stays mounted (read-write, below [`LOWER_ROOT`]): init
/// mounts it there before the pivot, and the gateway's `Info` reports the mount found there.
pub const DATA_DISK_MOUNT: &str = "/.openshell-lower/run";

/// An extra host directory shared into the guest: its device tag and where init mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMount {
    pub tag: String,
    /// Absolute path inside the guest.
    pub path: String,
    pub read_only: bool,
}

impl GuestMount {
    /// Tags and paths travel on the kernel command line, separated by `:` and `,`: a tag is
    /// `[A-Za-z0-9_-]`, at most 31 bytes (virtio-fs and 9p both take that), and a path is absolute
    /// with neither separator nor whitespace. The rootfs and the instance share have their own tags.
    pub fn validate(&self) -> Result<(), String> {
        let tag_ok = |t: &str| {
            !t.is_empty() && t.len() <= 31 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !tag_ok(&self.tag) || self.tag == SHARE_TAG || self.tag == "rootfs" {
            return Err(format!("share tag {:?}: use 1-31 of [A-Za-z0-9_-], not `rootfs` or `{SHARE_TAG}`", self.tag));
        }
        let bad = |c: char| c == ',' || c == ':' || c.is_whitespace();
        if !self.path.starts_with('/') || self.path == "/" || self.path.contains(bad) {
            return Err(format!(
                "share mount point {:?}: use an absolute path below / without `,`, `:` or spaces",
                self.path
            ));
        }
        Ok(())
    }

    /// The command-line parameter for `mounts` (empty for none).
    pub fn param(mounts: &[GuestMount]) -> String {
        if mounts.is_empty() {
            return String::new();
        }
        let list: Vec<String> =
            mounts.iter().map(|m| format!("{}:{}{}", m.tag, m.path, if m.read_only { ":ro" } else { "" })).collect();
        format!("{MOUNTS_PARAM}={}", list.join(","))
    }

    /// The value of [`MOUNTS_PARAM`], as [`GuestMount::param`] wrote it.
    pub fn parse(value: &str) -> Result<Vec<GuestMount>, String> {
        value
            .split(',')
            .filter(|e| !e.is_empty())
            .map(|entry| {
                let mut parts = entry.split(':');
                let (tag, path, flag) = (parts.next(), parts.next(), parts.next());
                let m = match (tag, path, flag, parts.next()) {
                    (Some(t), Some(p), None | Some("ro"), None) => {
                        GuestMount { tag: t.into(), path: p.into(), read_only: flag.is_some() }
                    }
                    _ => return Err(format!("bad {MOUNTS_PARAM} entry {entry:?}: expected TAG:/path[:ro]")),
                };
                m.validate().map(|()| m)
            })
            .collect()
    }
}

/// The command the guest's init runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub workdir: Option<String>,
    /// Who the command runs as (an image's `User`, resolved to numbers on the host); `None` is
    /// root, as init itself runs.
    #[serde(default)]
    pub user: Option<ExecUser>,
}

/// Numeric identity for the workload: init calls setgroups, setgid, then setuid before exec, in
/// that order (a process that dropped its uid first could no longer change its groups).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from the image's `/etc/group`); may be empty.
    #[serde(default)]
    pub groups: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(tag: &str, path: &str, read_only: bool) -> GuestMount {
        GuestMount { tag: tag.into(), path: path.into(), read_only }
    }

    /// Init mounts the data disk at `/run` before it pivots the root image to [`LOWER_ROOT`].
    #[test]
    fn the_data_disk_mount_is_run_below_the_lower_root() {
        assert_eq!(DATA_DISK_MOUNT, format!("{LOWER_ROOT}/run"));
    }

    #[test]
    fn mounts_round_trip_through_the_command_line() {
        let mounts = vec![m("bin", "/nested/bin", true), m("work", "/work", false)];
        let param = GuestMount::param(&mounts);
        assert_eq!(param, "openshell.mounts=bin:/nested/bin:ro,work:/work");
        assert_eq!(GuestMount::parse(param.strip_prefix("openshell.mounts=").unwrap()).unwrap(), mounts);
        assert_eq!(GuestMount::param(&[]), "");
    }

    #[test]
    fn bad_tags_paths_and_entries_are_refused() {
        assert!(m("rootfs", "/x", true).validate().is_err());
        assert!(m(SHARE_TAG, "/x", true).validate().is_err());
        assert!(m("a b", "/x", true).validate().is_err());
        assert!(m(&"t".repeat(32), "/x", true).validate().is_err());
        assert!(m("t", "relative", true).validate().is_err());
        assert!(m("t", "/a,b", true).validate().is_err());
        assert!(m("t", "/", true).validate().is_err());
        assert!(GuestMount::parse("t:/x:rw").is_err());
        assert!(GuestMount::parse("t").is_err());
    }
}

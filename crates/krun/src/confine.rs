//! Landlock for `openshell-vmm`: once the spec is read, the VMM confines itself to the files that
//! spec names, so that libkrun's device emulation (which parses guest-controlled traffic) cannot
//! open anything else on the host. Linux only: landlock is a Linux LSM (on macOS the VMM runs
//! under the hypervisor entitlement and nothing here applies).
//!
//! What libkrun needs, and so what is allowed:
//! - read: the kernel (libkrun opens it at `krun_start_enter`), the root directory, and `/proc`
//!   (virtio-fs reopens its files through `/proc/self/fd`);
//! - read and write: `/dev/kvm` (ioctls themselves are not governed by the ABI versions handled
//!   here), the console output when it is a file;
//! - everything: the other virtio-fs shares (the instance share, which the guest writes).
//!
//! The launcher hands the kernel, the directories and the console over open and the spec names
//! them as `/proc/self/fd/N` (`openshell_vm::sandbox`), so each rule is on the very inode the
//! VMM then opens. That matters on 9p (the nested host's shares), where each lookup by path makes
//! a new inode that a rule on an older one never matches: by path, a rule on the kernel file alone
//! would not hold there. A console that is a pipe (the launcher's bounded console) gets no rule:
//! landlock does not govern pipes, and refuses rules on them.
//!
//! Shared libraries are mapped before this runs; libkrunfw, which libkrun would `dlopen` only to
//! supply a kernel, is not needed (we pass our own) and stays out of reach.

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use landlock::{path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI};

use crate::KrunSpec;

/// The newest ABI whose rights we name; older kernels enforce what they know (best effort), and a
/// kernel without landlock leaves the VMM unconfined, which [`confine`] reports.
const ABI_HANDLED: ABI = ABI::V3;

/// How far the confinement took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confined {
    Fully,
    Partially,
    /// The kernel has no landlock (not built, or not in the active LSM list).
    NotEnforced,
}

impl std::fmt::Display for Confined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Confined::Fully => "confined by landlock (fully enforced)",
            Confined::Partially => "confined by landlock (partially enforced: this kernel's landlock lacks some rights named, e.g. truncate before Linux 6.2)",
            Confined::NotEnforced => {
                "NOT confined: this kernel has no landlock (CONFIG_SECURITY_LANDLOCK, lsm=landlock)"
            }
        })
    }
}

/// The paths `spec` needs, by kind of access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowance {
    pub read: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    pub full: Vec<PathBuf>,
}

impl Allowance {
    pub fn of(spec: &KrunSpec) -> Allowance {
        let ro_disks = spec.disks.iter().filter(|d| d.read_only).map(|d| d.image.clone());
        let read: Vec<PathBuf> =
            [spec.kernel.clone(), spec.root.clone(), PathBuf::from("/proc")].into_iter().chain(ro_disks).collect();
        let mut full = Vec::new();
        // The root is shared again under its tag (the guest mounts it read-only): read already.
        for (_, dir) in spec.shares.iter().filter(|(_, dir)| *dir != spec.root) {
            full.push(dir.clone());
        }
        let rw_disks = spec.disks.iter().filter(|d| !d.read_only).map(|d| d.image.clone());
        let read_write =
            [PathBuf::from("/dev/kvm")].into_iter().chain(spec.console_output.clone()).chain(rw_disks).collect();
        Allowance { read, read_write, full }
    }
}

/// Restricts this process (and what it starts) to `spec`'s [`Allowance`]. Irreversible.
pub fn confine(spec: &KrunSpec) -> Result<Confined, String> {
    let a = Allowance::of(spec);
    // A pipe or socket is no file in a hierarchy: landlock refuses a rule on it (EBADFD) and
    // leaves opening it through `/proc/self/fd` ungoverned.
    let in_a_hierarchy =
        |p: &&PathBuf| std::fs::metadata(p).map_or(true, |m| !(m.file_type().is_fifo() || m.file_type().is_socket()));
    let read_write: Vec<&PathBuf> = a.read_write.iter().filter(in_a_hierarchy).collect();
    let rw = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_HANDLED))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(&a.read, AccessFs::from_read(ABI_HANDLED))))
        .and_then(|r| r.add_rules(path_beneath_rules(read_write, rw)))
        .and_then(|r| r.add_rules(path_beneath_rules(&a.full, AccessFs::from_all(ABI_HANDLED))))
        .and_then(|r| r.restrict_self())
        .map_err(|e| format!("landlock: {e}"))?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Confined::Fully,
        RulesetStatus::PartiallyEnforced => Confined::Partially,
        RulesetStatus::NotEnforced => Confined::NotEnforced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowance_reads_artifacts_and_writes_only_the_share_and_console() {
        // As the launcher writes it: every file an fd the VMM inherits.
        let spec: KrunSpec = serde_json::from_value(serde_json::json!({
            "vcpus": 1, "mem_mib": 512, "root": "/proc/self/fd/11/.", "kernel": "/proc/self/fd/10",
            "cmdline": "", "exec_path": "/sbin/openshell-init", "console_output": "/proc/self/fd/13",
            "shares": [["rootfs", "/proc/self/fd/11/."], ["openshell", "/proc/self/fd/12/."]],
        }))
        .unwrap();
        let a = Allowance::of(&spec);
        let paths = |v: &[PathBuf]| v.iter().map(|p| p.to_string_lossy().into_owned()).collect::<Vec<_>>();
        assert_eq!(paths(&a.read), ["/proc/self/fd/10", "/proc/self/fd/11/.", "/proc"]);
        assert_eq!(paths(&a.read_write), ["/dev/kvm", "/proc/self/fd/13"]);
        assert_eq!(paths(&a.full), ["/proc/self/fd/12/."]);
        assert!(spec.disks.is_empty(), "a spec written before disks existed reads without any");

        // A disk root: the image read-only, the data disk read and written, nothing more.
        let mut spec = spec;
        spec.disks = vec![
            crate::KrunDisk { block_id: "r".into(), image: "/proc/self/fd/14".into(), read_only: true },
            crate::KrunDisk { block_id: "d".into(), image: "/proc/self/fd/15".into(), read_only: false },
        ];
        let a = Allowance::of(&spec);
        assert_eq!(paths(&a.read), ["/proc/self/fd/10", "/proc/self/fd/11/.", "/proc", "/proc/self/fd/14"]);
        assert_eq!(paths(&a.read_write), ["/dev/kvm", "/proc/self/fd/13", "/proc/self/fd/15"]);
    }
}

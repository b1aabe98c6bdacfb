//! What the checks look at, as plain data: the host's virtualization, the VMM backends and helpers,
//! the artifacts with their recorded and actual digests, the ports and the free disk. Filled in by
//! [`probe`](super::probe) on a real host and by hand in tests; the rows decide from nothing else.

use std::path::PathBuf;
use std::time::Duration;

use openshell_artifacts::kernel::KernelProvenance;
use openshell_artifacts::Digest;
use serde::Serialize;

use crate::HostFacts;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Os {
    Linux,
    MacOs,
}

#[derive(Debug, Clone)]
pub struct Facts {
    pub os: Os,
    /// `vmx` or `svm` when `/proc/cpuinfo` shows it.
    pub cpu_virt_flag: Option<String>,
    /// The CPU flag `hypervisor`: this host is itself a VM, so any KVM here is nested.
    pub cpu_hypervisor: bool,
    pub kvm: KvmDevice,
    /// Only on macOS.
    pub macos: Option<MacFacts>,
    pub krun: KrunFacts,
    pub qemu: Option<Tool>,
    pub passt: Option<Tool>,
    pub kernel: Artifact<KernelProvenance>,
    pub rootfs: Artifact<RootfsProvenance>,
    /// Host ports the VM will forward from 127.0.0.1.
    pub ports: Vec<PortFacts>,
    /// Free space where the artifacts live; `None` when not asked (a boot's preflight).
    pub disk: Option<DiskFacts>,
}

#[derive(Debug, Clone, Default)]
pub struct KvmDevice {
    pub exists: bool,
    /// Why opening `/dev/kvm` read-write failed, if it did.
    pub open_error: Option<String>,
    /// Loaded KVM modules among `kvm_intel`, `kvm_amd`, `kvm_pvm`.
    pub modules: Vec<String>,
}

impl KvmDevice {
    pub fn usable(&self) -> bool {
        self.exists && self.open_error.is_none()
    }

    pub fn pvm(&self) -> bool {
        self.modules.iter().any(|m| m == "kvm_pvm")
    }
}

#[derive(Debug, Clone, Default)]
pub struct MacFacts {
    /// `sysctl kern.hv_support` is 1.
    pub hvf: bool,
    pub gvproxy: Option<Tool>,
    /// Whether `openshell-vmm` carries `com.apple.security.hypervisor`; `None` when not built.
    pub vmm_entitled: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct KrunFacts {
    /// `bundled` or `system` (the `openshell-krun` feature this build links).
    pub link_mode: String,
    pub version: Option<String>,
    /// The `openshell-vmm` binary that hosts a libkrun VM; `vm run` builds it on demand.
    pub vmm_binary: PathBuf,
    pub vmm_built: bool,
}

/// A helper program found on PATH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    pub path: PathBuf,
    pub version: Option<String>,
}

/// A guest artifact and how it compares with what was recorded when it was built.
#[derive(Debug, Clone)]
pub enum Artifact<P> {
    /// Not built for the current inputs: what was looked for.
    Missing(String),
    /// Present, but there is no readable record (`provenance.json` / `manifest.json`) to check it
    /// against.
    Unrecorded {
        path: PathBuf,
        why: String,
    },
    Checked(Checked<P>),
}

#[derive(Debug, Clone)]
pub struct Checked<P> {
    /// `vmlinux`, or the rootfs directory.
    pub path: PathBuf,
    /// The recorded digest: vmlinux sha256, or the rootfs manifest's digest.
    pub digest: Digest,
    pub provenance: P,
    /// The first file whose content differs from the record.
    pub mismatch: Option<Mismatch>,
    /// How long re-hashing took.
    pub hashed_in: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub file: PathBuf,
    pub recorded: String,
    pub found: String,
}

/// What the rootfs records about itself: its manifest (the sha256 of every file).
#[derive(Debug, Clone, Serialize)]
pub struct RootfsProvenance {
    pub manifest_sha256: Digest,
    pub files: usize,
    pub symlinks: usize,
    /// When `manifest.json` was written.
    pub baked_at_unix: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortFacts {
    pub port: u16,
    pub free: bool,
    /// Which gateway instance of ours is up on it, when one is.
    pub held_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFacts {
    pub path: PathBuf,
    pub free_bytes: Result<u64, String>,
}

impl Facts {
    /// The facts [`crate::backend::choose`] decides from. On macOS the "KVM" fields stand for the
    /// platform hypervisor (HVF), which is what libkrun uses there.
    pub fn host(&self) -> HostFacts {
        let qemu = self.qemu.as_ref().map(|t| t.path.clone());
        match &self.macos {
            Some(m) => HostFacts { kvm_usable: m.hvf, cpu_virt: m.hvf, kvm_pvm: false, qemu },
            None => HostFacts {
                kvm_usable: self.kvm.usable(),
                cpu_virt: self.cpu_virt_flag.is_some(),
                kvm_pvm: self.kvm.pvm(),
                qemu,
            },
        }
    }
}

//! What the checks look at, as plain data: the host's facts (the one [`HostFacts`] probe), the
//! artifacts with their recorded and actual digests, the ports and the free disk. Filled in by
//! [`probe`](super::probe) on a real host and by hand in tests; the rows decide from nothing else.

use std::path::PathBuf;
use std::time::Duration;

use openshell_artifacts::kernel::KernelProvenance;
use openshell_artifacts::Digest;
use serde::Serialize;

pub use openshell_vm::host::{HostFacts, KrunFacts, KvmDevice, MacFacts, Os, Tool};

#[derive(Debug, Clone)]
pub struct Facts {
    /// The one probe of the host ([`HostFacts::probe`]); the plan is made from it.
    pub host: HostFacts,
    pub kernel: Artifact<KernelProvenance>,
    pub rootfs: Artifact<RootfsProvenance>,
    /// The root disk image a `--root disk` boot attaches (`None`: the boot shares the rootfs).
    pub root_disk: Option<Artifact<openshell_artifacts::disk::RootDiskRecord>>,
    /// Host ports the VM will forward from 127.0.0.1.
    pub ports: Vec<PortFacts>,
    /// Free space where the artifacts live; `None` when not asked (a boot's preflight).
    pub disk: Option<DiskFacts>,
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
    /// Whether every file was re-hashed: not for a disk-root boot, whose guest never reads the
    /// tree (the root disk it boots is re-hashed instead, and its record names this manifest).
    pub rehashed: bool,
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

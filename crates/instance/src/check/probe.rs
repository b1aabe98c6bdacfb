//! Gathering [`Facts`] from the running host: the host's own facts (one [`HostFacts::probe`]), the
//! artifacts re-hashed against their records, the ports and the free disk. The only part of the
//! checks that touches the system; it decides nothing, and a probe that cannot find out records
//! that as a fact rather than failing.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Instant, UNIX_EPOCH};

use openshell_artifacts::kernel::{self, GuestKernel, KernelError, KernelProvenance};
use openshell_artifacts::rootfs::{self, RootfsBundle, RootfsError, MANIFEST};

use super::facts::{Artifact, Checked, DiskFacts, Facts, Mismatch, PortFacts, RootfsProvenance};
use crate::state::GatewayInstance;
use openshell_vm::HostFacts;

/// What to look at beyond the host itself.
#[derive(Debug, Clone)]
pub struct ProbeRequest {
    /// The kernel to check: its `vmlinux`, or what was looked for and not found.
    pub kernel: Result<PathBuf, String>,
    /// The rootfs directory to check, or what was looked for and not found.
    pub rootfs: Result<PathBuf, String>,
    /// The root disk image to check (`--root disk`), or none.
    pub root_disk: Option<PathBuf>,
    /// Host ports the VM will forward from 127.0.0.1.
    pub ports: Vec<u16>,
    /// The artifact store, for the free-disk fact; `None` leaves it out.
    pub store_root: Option<PathBuf>,
    /// Where gateway instances live, to say which of ours holds a taken port.
    pub gateways_root: PathBuf,
}

/// Probes the host once ([`HostFacts::probe`]) and the artifacts, ports and disk `req` names.
pub fn probe(req: &ProbeRequest) -> Facts {
    Facts {
        host: HostFacts::probe(),
        kernel: probe_kernel(&req.kernel),
        rootfs: probe_rootfs(&req.rootfs, req.root_disk.is_none()),
        root_disk: req.root_disk.as_deref().map(probe_root_disk),
        ports: req.ports.iter().map(|&p| probe_port(p, &req.gateways_root)).collect(),
        disk: req.store_root.as_ref().map(|p| probe_disk(p)),
    }
}

fn probe_kernel(located: &Result<PathBuf, String>) -> Artifact<KernelProvenance> {
    let vmlinux = match located {
        Ok(p) => p.clone(),
        Err(why) => return Artifact::Missing(why.clone()),
    };
    let unrecorded = |why: String| Artifact::Unrecorded { path: vmlinux.clone(), why };
    let Some(dir) = vmlinux.parent().filter(|d| d.join("provenance.json").is_file()) else {
        return unrecorded("no provenance.json beside it".into());
    };
    let mut k = match GuestKernel::open(dir) {
        Ok(k) => k,
        Err(e) => return unrecorded(e.to_string()),
    };
    // The record describes the kernel in its directory; check the file we were given against it.
    k.vmlinux = vmlinux.clone();
    let started = Instant::now();
    let mismatch = match kernel::verify(&k) {
        Ok(_) => None,
        Err(KernelError::Tampered { path, recorded, found }) => {
            Some(Mismatch { file: path, recorded: recorded.hex(), found: found.hex() })
        }
        Err(e) => return unrecorded(e.to_string()),
    };
    Artifact::Checked(Checked {
        path: vmlinux,
        digest: k.provenance.vmlinux_sha256.clone(),
        provenance: k.provenance,
        mismatch,
        hashed_in: started.elapsed(),
    })
}

/// The root image against `rootdisk.json` beside it.
fn probe_root_disk(image: &Path) -> Artifact<openshell_artifacts::disk::RootDiskRecord> {
    use openshell_artifacts::disk::{self, DiskError, RootDisk};
    let unrecorded = |why: String| Artifact::Unrecorded { path: image.to_owned(), why };
    let Some(dir) = image.parent() else { return unrecorded("no directory".into()) };
    let mut d = match RootDisk::open(dir) {
        Ok(d) => d,
        Err(e) => return unrecorded(e.to_string()),
    };
    d.image = image.to_owned();
    let started = Instant::now();
    let mismatch = match disk::verify(&d) {
        Ok(_) => None,
        Err(DiskError::Tampered { path, recorded, found, .. }) => Some(Mismatch { file: path, recorded, found }),
        Err(e) => return unrecorded(e.to_string()),
    };
    // The store entry, not the image: that is what a fix removes (the store rebuilds a missing entry).
    Artifact::Checked(Checked {
        path: dir.to_owned(),
        digest: d.record.sha256.clone(),
        provenance: d.record,
        mismatch,
        hashed_in: started.elapsed(),
    })
}

/// The rootfs against its manifest: every file re-hashed when `rehash`, else its manifest read
/// (a disk-root boot: a tree of root-only files, Debian's, cannot even be read by an unprivileged
/// VMM's share, and the guest boots the disk).
fn probe_rootfs(located: &Result<PathBuf, String>, rehash: bool) -> Artifact<RootfsProvenance> {
    let dir = match located {
        Ok(p) => p.clone(),
        Err(why) => return Artifact::Missing(why.clone()),
    };
    let bundle = match RootfsBundle::open(&dir) {
        Ok(b) => b,
        Err(e) => return Artifact::Unrecorded { path: dir, why: e.to_string() },
    };
    let started = Instant::now();
    let verified = if rehash { rootfs::verify(&bundle) } else { Ok(()) };
    let mismatch = match verified {
        Ok(()) => None,
        Err(RootfsError::Tampered { path, recorded, found }) => {
            Some(Mismatch { file: dir.join(path.trim_start_matches('/')), recorded, found })
        }
        Err(e) => return Artifact::Unrecorded { path: dir, why: e.to_string() },
    };
    let baked_at_unix = fs::metadata(dir.join(MANIFEST))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    let digest = bundle.digest();
    Artifact::Checked(Checked {
        provenance: RootfsProvenance {
            manifest_sha256: digest.clone(),
            files: bundle.manifest.files.len(),
            symlinks: bundle.manifest.symlinks.len(),
            baked_at_unix,
            rehashed: rehash,
        },
        path: dir,
        digest,
        mismatch,
        hashed_in: started.elapsed(),
    })
}

fn probe_port(port: u16, gateways_root: &Path) -> PortFacts {
    let free = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok();
    let held_by = if free { None } else { our_gateway_on(port, gateways_root) };
    PortFacts { port, free, held_by }
}

/// A running gateway instance of ours whose endpoint is `127.0.0.1:port`.
fn our_gateway_on(port: u16, root: &Path) -> Option<String> {
    let endpoint = format!("127.0.0.1:{port}");
    fs::read_dir(root).ok()?.flatten().find_map(|e| {
        let inst = GatewayInstance::new(root, &e.file_name().to_string_lossy()).ok()?;
        let meta = inst.read_metadata().filter(|m| m.endpoint == endpoint)?;
        inst.locked().then(|| {
            let pid = meta.supervisor_pid.map_or("unknown".into(), |p| p.to_string());
            format!("gateway {:?} (supervisor pid {pid})", inst.name)
        })
    })
}

/// Free bytes for an unprivileged writer on the file system holding `path` (or its nearest
/// existing ancestor: the store may not exist yet).
fn probe_disk(path: &Path) -> DiskFacts {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    // The block counts are u64 on Linux but u32 on macOS, hence the conversions.
    #[allow(clippy::useless_conversion)]
    let bytes = |st: nix::sys::statvfs::Statvfs| u64::from(st.blocks_available()) * u64::from(st.fragment_size());
    let free_bytes = nix::sys::statvfs::statvfs(existing).map(bytes).map_err(|e| std::io::Error::from(e).to_string());
    DiskFacts { path: path.to_owned(), free_bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tampered_rootfs_file_is_a_mismatch_fact_with_its_full_path() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("root");
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::write(dir.join("etc/hostname"), "gateway\n").unwrap();
        let manifest = rootfs::scan(&dir).unwrap();
        fs::write(dir.join(MANIFEST), serde_json::to_string(&manifest).unwrap()).unwrap();
        let Artifact::Checked(c) = probe_rootfs(&Ok(dir.clone()), true) else { panic!("not checked") };
        assert!(c.mismatch.is_none());
        assert_eq!(c.provenance.files, 1);
        fs::write(dir.join("etc/hostname"), "evil\n").unwrap();
        let Artifact::Checked(c) = probe_rootfs(&Ok(dir.clone()), true) else { panic!("not checked") };
        let m = c.mismatch.unwrap();
        assert_eq!(m.file, dir.join("etc/hostname"));
        assert_ne!(m.recorded, m.found);
    }

    #[test]
    fn kernel_without_provenance_is_unrecorded() {
        let t = tempfile::tempdir().unwrap();
        let k = t.path().join("vmlinux");
        fs::write(&k, b"x").unwrap();
        assert!(matches!(probe_kernel(&Ok(k)), Artifact::Unrecorded { .. }));
        assert!(matches!(probe_kernel(&Err("not built".into())), Artifact::Missing(_)));
    }

    #[test]
    fn a_bound_port_is_not_free_and_disk_space_is_read() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = tempfile::tempdir().unwrap();
        let p = probe_port(port, t.path());
        assert!(!p.free && p.held_by.is_none());
        assert!(probe_disk(&t.path().join("not/yet")).free_bytes.unwrap() > 0);
    }
}

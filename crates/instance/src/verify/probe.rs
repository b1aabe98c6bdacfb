//! Gathers [`Observations`] about one gateway instance from the host: its files, `/proc`, and
//! network probes each bounded by a short timeout. It judges nothing (that is [`super::decide`]);
//! it fails only when there is nothing to verify (no such instance, unreadable metadata).

use std::fs;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use openshell_matrix::Matrix;

use super::{decide, AttachedDisks, Attempt, InfoFacts, Leftover, MountFacts, NoCertificate, Observations, Rehashed};
use crate::state::{GatewayInstance, Metadata};
use openshell_vm::procfs;
use openshell_vm::VmError;

/// A refused or unrouted TCP connect answers at once; this bounds a black hole.
const TCP_TIMEOUT: Duration = Duration::from_secs(1);
/// Each TLS or gRPC step. The guest answers in milliseconds when healthy, even under TCG; a guest
/// that takes longer is not healthy, and `verify` must not hang on it.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// The name the gateway's server certificate carries.
const SERVER_NAME: &str = "localhost";

/// Probes `inst` and decides: the verification matrix.
pub fn verify(inst: &GatewayInstance) -> Result<Matrix, VmError> {
    Ok(decide(&probe(inst)?))
}

/// Everything `verify` looks at. Errors only when there is no instance to verify.
pub fn probe(inst: &GatewayInstance) -> Result<Observations, VmError> {
    let name = &inst.name;
    if !inst.dir.is_dir() {
        return Err(VmError::Instance(format!(
            "no gateway {name:?} at {}; start one with `cargo xtask vm run --detach --name {name}`",
            inst.dir.display()
        )));
    }
    let metadata = read_metadata(inst)?;
    let port = endpoint_port(&metadata.endpoint).ok_or_else(|| {
        VmError::Instance(format!(
            "{}: endpoint {:?} is not HOST:PORT; restart the gateway to rewrite it",
            inst.metadata_path().display(),
            metadata.endpoint
        ))
    })?;
    let locked = inst.locked();
    let lock_holders = procfs::flock_holders(&inst.lock_path());
    let supervisor = metadata.supervisor_pid.map(procfs::process);
    let vm = metadata.vm_pid.map(procfs::process);
    // The network helper holding the forward: passt or gvproxy, whichever the record names.
    let net = metadata.passt_pid.or(metadata.gvproxy_pid).map(procfs::process);
    let listeners = listeners(port, net.as_ref());

    let tcp = tcp_connect(&metadata.endpoint);
    let (mtls, without_cert, health, info) = match &tcp {
        Attempt::Done(_) => grpc_probes(inst, &metadata.endpoint),
        _ => {
            let why = format!("not tried: TCP to {} failed", metadata.endpoint);
            (
                Attempt::NotTried(why.clone()),
                Attempt::NotTried(why.clone()),
                Attempt::NotTried(why.clone()),
                Attempt::NotTried(why),
            )
        }
    };

    let booted = booted(vm.as_ref());
    let (kernel, rootfs) = match &booted {
        Ok((pid, b)) => (rehash_kernel(&b.kernel), rehash_rootfs(*pid, &b.rootfs)),
        Err(why) => (why.attempt(), why.attempt()),
    };
    // What the VMM runs decides; only without one to read does the record say.
    let disk_root = match &booted {
        Ok((_, b)) => !b.rootfs.is_dir(),
        Err(_) => metadata.rootfs_dir.as_deref().is_some_and(Path::is_file),
    };
    let disks = match &booted {
        Ok(_) if !disk_root => Attempt::NotTried("a share root has no disks".to_owned()),
        Ok((pid, b)) => attached_disks(*pid, &b.rootfs, &inst.vm_dir().join(openshell_vm::DATA_DISK_FILE)),
        Err(why) => why.attempt(),
    };
    let console_path = metadata.console_log.clone().unwrap_or_else(|| inst.vm_dir().join("console.log"));
    let console = match fs::read(&console_path) {
        Ok(bytes) => Attempt::Done(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) => Attempt::Failed(e.to_string()),
    };
    // gvproxy alive and running gvproxy: the record's pid is still the instance's helper.
    let live_gvproxy =
        locked && metadata.gvproxy_pid.is_some() && net.as_ref().is_some_and(|p| p.program_is_any(&["gvproxy"]));
    let leftovers = leftovers(inst, locked, live_gvproxy);
    Ok(Observations {
        name: name.clone(),
        metadata,
        port,
        locked,
        lock_holders,
        supervisor,
        vm,
        net,
        listeners,
        tcp,
        mtls,
        without_cert,
        health,
        info,
        kernel,
        rootfs,
        disk_root,
        disks,
        console,
        console_path,
        leftovers,
    })
}

fn read_metadata(inst: &GatewayInstance) -> Result<Metadata, VmError> {
    let path = inst.metadata_path();
    let name = &inst.name;
    let bytes = fs::read(&path).map_err(|e| {
        VmError::Instance(format!(
            "{}: {e}; gateway {name:?} has never become ready, start it with `cargo xtask vm run --detach --name {name}`",
            path.display()
        ))
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        VmError::Instance(format!(
            "{} is not valid metadata ({e}); `cargo xtask vm stop --name {name}`, then start it again to rewrite it",
            path.display()
        ))
    })
}

fn endpoint_port(endpoint: &str) -> Option<u16> {
    endpoint.rsplit_once(':')?.1.parse().ok().filter(|&p| p != 0)
}

/// The LISTEN sockets on `port`, each with whether the recorded network helper (passt or gvproxy) holds it, and if it does
/// not, who does (searched only then, since it walks every process).
fn listeners(
    port: u16,
    helper: Option<&procfs::ProcessFact>,
) -> Vec<(procfs::TcpListenerFact, Option<bool>, Option<procfs::ProcessFact>)> {
    procfs::tcp_listeners(port)
        .into_iter()
        .map(|l| {
            let by_helper = helper.filter(|p| p.alive).and_then(|p| procfs::holds_socket(p.pid, l.inode));
            if by_helper == Some(true) {
                return (l, Some(true), None);
            }
            match procfs::socket_owner(l.inode).map(procfs::process) {
                Some(owner) => {
                    let ours = helper.is_some_and(|p| p.pid == owner.pid);
                    (l, Some(ours), Some(owner))
                }
                None => (l, None, None),
            }
        })
        .collect()
}

fn tcp_connect(endpoint: &str) -> Attempt<Duration> {
    let addr = match endpoint.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        Ok(None) => return Attempt::Failed(format!("{endpoint} resolves to no address")),
        Err(e) => return Attempt::Failed(format!("{endpoint}: {e}")),
    };
    let t = Instant::now();
    match TcpStream::connect_timeout(&addr, TCP_TIMEOUT) {
        Ok(_) => Attempt::Done(t.elapsed()),
        Err(e) => Attempt::Failed(e.to_string()),
    }
}

type GrpcAttempts = (Attempt<Duration>, Attempt<NoCertificate>, Attempt<String>, Attempt<InfoFacts>);

/// mTLS channel, then (over it) health and Info, then a client without a certificate.
fn grpc_probes(inst: &GatewayInstance, endpoint: &str) -> GrpcAttempts {
    let not_tried = |why: &str| -> GrpcAttempts {
        (
            Attempt::Failed(why.to_owned()),
            Attempt::NotTried(format!("not tried: {why}")),
            Attempt::NotTried(format!("not tried: {why}")),
            Attempt::NotTried(format!("not tried: {why}")),
        )
    };
    let bundle = match inst.client_bundle() {
        Ok(b) => b,
        Err(e) => return not_tried(&format!("the stored client bundle: {e}")),
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return not_tried(&format!("tokio runtime: {e}")),
    };
    rt.block_on(async {
        let bounded = |what: &'static str| move |_| format!("{what}: no answer within {} s", RPC_TIMEOUT.as_secs());
        let t = Instant::now();
        let channel = tokio::time::timeout(RPC_TIMEOUT, openshell_gateway::connect(endpoint, &bundle, SERVER_NAME))
            .await
            .map_err(bounded("TLS handshake"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                let why = "not tried: the mTLS handshake failed".to_owned();
                return (
                    Attempt::Failed(e),
                    Attempt::NotTried(why.clone()),
                    Attempt::NotTried(why.clone()),
                    Attempt::NotTried(why),
                );
            }
        };
        let mtls = Attempt::Done(t.elapsed());
        let health = match tokio::time::timeout(RPC_TIMEOUT, openshell_gateway::health(&channel)).await {
            Ok(Ok(openshell_gateway::ServingStatus::Serving)) => Attempt::Done("SERVING".to_owned()),
            Ok(Ok(other)) => Attempt::Done(format!("{other:?}")),
            Ok(Err(e)) => Attempt::Failed(e.to_string()),
            Err(e) => Attempt::Failed(bounded("health")(e)),
        };
        let info = match tokio::time::timeout(RPC_TIMEOUT, openshell_gateway::info(&channel)).await {
            Ok(Ok(i)) => Attempt::Done(InfoFacts {
                version: i.version,
                kernel_release: i.kernel_release,
                boot_id: i.boot_id,
                uptime_ms: i.uptime_ms,
                kernel_sha256: i.kernel_sha256,
                rootfs_sha256: i.rootfs_sha256,
                root_mount: i.root.map(mount_facts),
                data_disk: i.data_disk.map(mount_facts),
            }),
            Ok(Err(e)) => Attempt::Failed(e.to_string()),
            Err(e) => Attempt::Failed(bounded("Info")(e)),
        };
        (mtls, without_certificate(endpoint, &bundle), health, info)
    })
}

/// The stored bundle's client without its certificate, against the endpoint that just served
/// the bundle, read until the server's verdict (a blocking probe, bounded by `RPC_TIMEOUT`).
fn without_certificate(endpoint: &str, bundle: &openshell_gateway::ClientBundle) -> Attempt<NoCertificate> {
    use openshell_gateway::{TlsOutcome, TlsProbe};
    let anonymous = TlsProbe { identity: None, ..TlsProbe::with_bundle(bundle, SERVER_NAME) };
    match openshell_gateway::probe(endpoint, &anonymous, RPC_TIMEOUT) {
        Err(e) => Attempt::Failed(e.to_string()),
        Ok(TlsOutcome::Served { .. }) => Attempt::Done(NoCertificate::Served),
        Ok(TlsOutcome::Refused { alert, .. }) => Attempt::Done(NoCertificate::Alert(format!("{alert:?}"))),
        Ok(other) => Attempt::Done(NoCertificate::NoVerdict(other.to_string())),
    }
}

fn mount_facts(m: openshell_gateway::proto::MountFact) -> MountFacts {
    let openshell_gateway::proto::MountFact { mount_point, fs_type, source, read_write, total_bytes, free_bytes } = m;
    MountFacts { mount_point, fs_type, source, read_write, total_bytes, free_bytes }
}

/// Why the VMM's artifacts were not read: no live VMM to read (not tried), or reading it failed.
enum Unread {
    NotTried(String),
    Failed(String),
}

impl Unread {
    fn attempt<T>(&self) -> Attempt<T> {
        match self {
            Unread::NotTried(why) => Attempt::NotTried(why.clone()),
            Unread::Failed(why) => Attempt::Failed(why.clone()),
        }
    }
}

/// The kernel and rootfs the running VMM was started with (its own command line, not the
/// instance's records), with the VMM's pid; or why they cannot be read.
fn booted(vm: Option<&procfs::ProcessFact>) -> Result<(u32, openshell_vm::backend::BootedArtifacts), Unread> {
    match vm {
        None => Err(Unread::NotTried("metadata.json records no VMM pid".to_owned())),
        Some(p) if !p.alive => Err(Unread::NotTried(format!("the VMM pid {} is dead", p.pid))),
        Some(p) if !p.program_is_any(openshell_vm::backend::VMM_PROGRAMS) => {
            Err(Unread::NotTried(format!("pid {} is not a VMM", p.pid)))
        }
        Some(p) => match (procfs::argv(p.pid), procfs::cwd(p.pid)) {
            (Some(argv), Some(cwd)) => {
                openshell_vm::backend::booted_artifacts(&argv, &cwd, &|fd| procfs::fd_target(p.pid, fd))
                    .map(|b| (p.pid, b))
                    .map_err(|e| Unread::Failed(format!("VMM pid {}: {e}", p.pid)))
            }
            _ => Err(Unread::Failed(format!(
                "cannot read /proc/{}/cmdline and cwd; run verify as the user that started the gateway",
                p.pid
            ))),
        },
    }
}

/// The descriptors VMM `pid` holds on the root image and on the data disk, with their modes.
fn attached_disks(pid: u32, root_image: &Path, data_disk: &Path) -> Attempt<AttachedDisks> {
    let Some(files) = procfs::open_files(pid) else {
        return Attempt::Failed(format!(
            "cannot list /proc/{pid}/fd and fdinfo; run verify as the user that started the gateway"
        ));
    };
    // fd targets are canonical paths; the state directory may be reached through a symlink.
    let data_disk = data_disk.canonicalize().unwrap_or_else(|_| data_disk.to_owned());
    let on = |path: &Path| -> Vec<(i32, bool)> {
        files.iter().filter(|f| f.target == path).map(|f| (f.fd, f.writable)).collect()
    };
    Attempt::Done(AttachedDisks {
        vmm_pid: pid,
        root_image: root_image.to_owned(),
        root: on(root_image),
        data: on(&data_disk),
        data_disk,
    })
}

fn rehash_kernel(vmlinux: &Path) -> Attempt<Rehashed> {
    let found = match openshell_artifacts::sha256_file(vmlinux) {
        Ok(d) => d.hex(),
        Err(e) => return Attempt::Failed(format!("{}: {e}", vmlinux.display())),
    };
    let recorded = match vmlinux.parent().map(openshell_artifacts::kernel::GuestKernel::open) {
        Some(Ok(k)) => Attempt::Done(k.provenance.vmlinux_sha256.hex()),
        Some(Err(e)) => Attempt::Failed(e.to_string()),
        None => Attempt::Failed(format!("{} has no directory", vmlinux.display())),
    };
    Attempt::Done(Rehashed { path: vmlinux.to_owned(), found, recorded, first_difference: None, read_through: None })
}

/// A disk root's image: it stands for the rootfs its `rootdisk.json` was baked from while it
/// hashes to that record's sha256, so `found` is that rootfs digest then, and the image's own
/// sha256 when it changed (which then differs from `recorded`, the record's rootfs digest).
///
/// The bytes are read through VMM `pid`'s own descriptor on the image, so what is hashed is the
/// file the VMM serves, even if `image` was replaced or renamed since boot.
fn rehash_root_disk(pid: u32, image: &Path) -> Attempt<Rehashed> {
    use openshell_artifacts::disk::{self, RootDisk};
    let fd = procfs::open_files(pid).and_then(|files| files.into_iter().find(|f| f.target == image).map(|f| f.fd));
    let Some(fd) = fd else {
        return Attempt::Failed(format!("VMM pid {pid} holds no descriptor on {} to read it through", image.display()));
    };
    let through = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
    let found = match openshell_artifacts::sha256_file(&through) {
        Ok(d) => d,
        Err(e) => return Attempt::Failed(format!("{} ({}): {e}", through.display(), image.display())),
    };
    let record = match image.parent().map(RootDisk::open) {
        Some(Ok(d)) => d.record,
        Some(Err(e)) => return Attempt::Failed(e.to_string()),
        None => return Attempt::Failed(format!("{} has no directory", image.display())),
    };
    let (found, first_difference) = if found == record.sha256 {
        (record.rootfs_digest.hex(), None)
    } else {
        let why = format!("the image hashes to {}, its {} records {}", found.hex(), disk::RECORD, record.sha256.hex());
        (found.hex(), Some(why))
    };
    Attempt::Done(Rehashed {
        path: image.to_owned(),
        found,
        recorded: Attempt::Done(record.rootfs_digest.hex()),
        first_difference,
        read_through: Some(through),
    })
}

fn rehash_rootfs(vmm_pid: u32, dir: &Path) -> Attempt<Rehashed> {
    use openshell_artifacts::rootfs;
    if dir.is_file() {
        return rehash_root_disk(vmm_pid, dir);
    }
    let found = match rootfs::scan(dir) {
        Ok(m) => m.digest().hex(),
        Err(e) => return Attempt::Failed(e.to_string()),
    };
    let (recorded, first_difference) = match rootfs::RootfsBundle::open(dir) {
        Ok(b) => {
            let recorded = b.digest().hex();
            // Only to name the file: the digests already differ or they do not.
            let first = if recorded != found { rootfs::verify(&b).err().map(|e| e.to_string()) } else { None };
            (Attempt::Done(recorded), first)
        }
        Err(e) => (Attempt::Failed(e.to_string()), None),
    };
    Attempt::Done(Rehashed { path: dir.to_owned(), found, recorded, first_difference, read_through: None })
}

/// Files that should not exist in the instance's state (see [`super::stale_findings`], item 5).
fn leftovers(inst: &GatewayInstance, running: bool, live_gvproxy: bool) -> Vec<Leftover> {
    let share = inst.vm_dir().join("share");
    let mut out = Vec::new();
    let mut add = |path: PathBuf, what: &'static str| {
        if path.exists() {
            out.push(Leftover { path, what });
        }
    };
    add(inst.dir.join(".metadata.json.tmp"), "interrupted metadata write");
    add(share.join(format!(".{}.tmp", openshell_guest::EXEC_FILE)), "interrupted exec request write");
    if running {
        add(share.join(openshell_guest::EXIT_CODE_FILE), "the guest's exit code although the instance runs");
    }
    let mut sockets = Vec::new();
    find_sockets(&inst.dir, 4, &mut sockets);
    // A running gvproxy's own sockets (its API and the VMM's link) are its, not left over.
    let gvproxy = openshell_vm::net::gvproxy::Sockets::in_dir(&inst.vm_dir()).dir;
    sockets.retain(|p| !(live_gvproxy && p.starts_with(&gvproxy)));
    out.extend(sockets.into_iter().map(|path| Leftover { path, what: "leftover unix socket" }));
    out
}

fn find_sockets(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_socket() {
            out.push(e.path());
        } else if ft.is_dir() && depth > 0 {
            find_sockets(&e.path(), depth - 1, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_ports() {
        assert_eq!(endpoint_port("127.0.0.1:30051"), Some(30051));
        assert_eq!(endpoint_port("[::1]:8080"), Some(8080));
        assert_eq!(endpoint_port("127.0.0.1"), None);
        assert_eq!(endpoint_port("127.0.0.1:0"), None);
    }

    #[test]
    fn missing_instance_and_metadata_are_verifier_errors() {
        let root = tempfile::tempdir().unwrap();
        let inst = GatewayInstance::new(root.path(), "nope").unwrap();
        let e = probe(&inst).unwrap_err().to_string();
        assert!(e.contains("no gateway \"nope\"") && e.contains("vm run --detach --name nope"), "{e}");
        fs::create_dir_all(&inst.dir).unwrap();
        let e = probe(&inst).unwrap_err().to_string();
        assert!(e.contains("never become ready"), "{e}");
        fs::write(inst.metadata_path(), "{").unwrap();
        let e = probe(&inst).unwrap_err().to_string();
        assert!(e.contains("not valid metadata"), "{e}");
    }

    /// A stopped instance on this host (no processes, a closed port): the matrix fails on the
    /// supervisor, forward and stale rows without the verifier erroring.
    #[test]
    fn stopped_instance_fails_its_rows_without_erroring() {
        let root = tempfile::tempdir().unwrap();
        let inst = GatewayInstance::new(&root.path().join("gateways"), "stopped").unwrap();
        fs::create_dir_all(inst.vm_dir()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let meta = Metadata {
            name: "stopped".into(),
            endpoint: format!("127.0.0.1:{port}"),
            gateway_endpoint: "https://127.0.0.1:1".into(),
            created_unix: 0,
            vm_pid: None,
            kernel_sha256: "k".into(),
            rootfs_sha256: "r".into(),
            backend: "qemu".into(),
            supervisor_pid: None,
            passt_pid: None,
            gvproxy_pid: None,
            kernel_path: None,
            rootfs_dir: None,
            console_log: None,
            failure: None,
            restarting: None,
            gave_up_after_restarts: None,
        };
        inst.write_metadata(&meta).unwrap();
        fs::write(inst.dir.join(".metadata.json.tmp"), "{}").unwrap();
        let m = verify(&inst).unwrap();
        assert_eq!(m.exit_code(), 1);
        for id in ["supervisor", "forward-loopback-only", "tcp", "console-clean", "no-stale-state"] {
            assert!(m.row(id).unwrap().blocks(), "{id}\n{}", m.render());
        }
        assert!(m.row("no-stale-state").unwrap().reason.contains(".metadata.json.tmp"), "{}", m.render());
        // write_metadata made it the active instance.
        assert_eq!(crate::state::active(&root.path().join("gateways")).as_deref(), Some("stopped"));
    }
}

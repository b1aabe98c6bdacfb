//! `verify`: is a running gateway instance what it claims to be? A matrix of PASS/WARN/FAIL rows
//! (see `openshell-matrix`) about one instance: its processes, its port forward, mutual TLS, the
//! gateway's answers, the artifacts it booted, its console and its on-disk state.
//!
//! Two layers. [`probe`] (in `verify/probe.rs`) gathers [`Observations`] from the host: `/proc`,
//! the instance's files, and short-timeout network probes, so a dead forward fails in
//! milliseconds and a hung guest in seconds, never hangs. [`decide`] turns observations into
//! rows and is pure, so every verdict is unit-tested on made-up observations. This module decides
//! nothing about *how* to fix an instance beyond naming the command; it stops and starts nothing.
//!
//! The rows, by id (all required):
//! - `supervisor`: a live process holds the instance lock (the instance runs).
//! - `vm-process` / `passt-process` (`gvproxy-process` for an instance on `--net gvproxy`): the
//!   recorded VMM and network helper pids are alive and run qemu or openshell-vmm / passt or gvproxy.
//! - `forward-loopback-only`: every LISTEN socket on the endpoint's port (from `/proc/net/tcp`
//!   and `/proc/net/tcp6`) is bound to 127.0.0.1, there is at least one, and each belongs to the
//!   recorded passt or gvproxy (socket inode found among `/proc/<pid>/fd`).
//! - `tcp`: a TCP connection to the endpoint opens.
//! - `mtls-handshake`: a TLS 1.3 channel opens with the stored client bundle (`mtls/`).
//! - `client-cert-required`: a client that trusts the CA but presents no certificate is refused
//!   by the gateway's own `CertificateRequired` alert (read with [`openshell_gateway::probe`],
//!   which reads on after the TLS 1.3 handshake, where that verdict arrives). Only tried after
//!   `mtls-handshake` passed, so the same endpoint is known to serve a good client. Anything else
//!   fails: a close without an alert, a reset or a timeout is what a dead or foreign peer does
//!   too, and the gateway as built always sends the alert, so none of them is evidence that the
//!   certificate check ran.
//! - `health`: `grpc.health.v1.Health/Check` says SERVING.
//! - `info`: `Gateway/Info` answers.
//! - `kernel-digest` / `rootfs-digest`: the kernel file and rootfs directory the *running VMM*
//!   was started with (read back from `/proc/<vmm pid>/cmdline`: QEMU's `-kernel` and the root
//!   9p `-fsdev path=`, or the kernel and root share of the spec on `openshell-vmm`'s; both name
//!   them as fds the VMM holds, `/proc/self/fd/N`, each resolved through `/proc/<vmm pid>/fd/N`
//!   to the file that fd is open on) are re-hashed now, the kernel as
//!   one file, the rootfs file by file against its `manifest.json`, and compared with the
//!   artifact's own record beside it (`provenance.json`'s `vmlinux_sha256`; the digest of
//!   `manifest.json`), then with `metadata.json`, then with `Info`.
//!
//!   What the guest's own report can and cannot prove: `Info`'s digests are the strings the host
//!   wrote into the guest's share before boot; the guest cannot hash the kernel it runs on (it
//!   has no access to the file), and a guest hashing its own root would only say what that guest
//!   chooses to say. So `Info` = `metadata.json` shows only that the endpoint is answered by the
//!   guest booted with this instance's share, never what it booted; the evidence is the host's
//!   re-hash. Its limits: QEMU and libkrun read the kernel once at start, so a kernel file changed
//!   after boot fails the row although the guest runs the old one (a false alarm, the safe side),
//!   and a file swapped for the boot and swapped back passes; the rootfs is served live from the
//!   directory, so its re-hash is what the guest reads from then on (up to its page cache).
//!
//!   A disk root's image is re-hashed through the VMM's own descriptor (`/proc/<vmm pid>/fd/N`,
//!   the open file itself, not a path that now names something else).
//! - `disks-attached`: a disk root's VMM holds the root image open read-only (every descriptor
//!   on it, by `/proc/<vmm pid>/fdinfo` flags) and the instance's `data.ext4` read-write.
//! - `data-disk-mounted`: the guest's `Info` says its data disk (at
//!   [`openshell_guest::DATA_DISK_MOUNT`]) is ext4, read-write, and `/` is overlayfs, read-write.
//! - `data-disk-free`: the data disk's free space (statvfs in the guest); WARN below
//!   [`DATA_DISK_LOW_PERCENT`] percent.
//!
//!   On a share root the three disk rows pass as "not applicable (share root)", optional.
//! - `console-clean`: the guest console has no kernel oops, panic, BUG, WARNING, call trace,
//!   lockup, stall or OOM kill line ([`kernel_trouble`]).
//! - `no-stale-state`: see [`stale_findings`] for the precise definition.

mod probe;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use openshell_matrix::{Matrix, Row};

use crate::state::Metadata;
pub use openshell_vm::backend::BootedArtifacts;
pub use openshell_vm::procfs::{ProcessFact, TcpListenerFact};
pub use probe::{probe, verify};

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt<T> {
    /// Not tried, and why (an earlier probe it depends on failed, or nothing was recorded).
    NotTried(String),
    /// Tried and failed, with the error.
    Failed(String),
    Done(T),
}

impl<T> Attempt<T> {
    fn why_not(&self) -> Option<&str> {
        match self {
            Attempt::NotTried(w) | Attempt::Failed(w) => Some(w),
            Attempt::Done(_) => None,
        }
    }
}

/// What the gateway's `Info` said, the part `verify` reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InfoFacts {
    pub version: String,
    pub kernel_release: String,
    pub boot_id: String,
    pub uptime_ms: u64,
    pub kernel_sha256: String,
    pub rootfs_sha256: String,
    /// The guest's `/` mount.
    pub root_mount: Option<MountFacts>,
    /// The guest's data disk mount (a disk root only).
    pub data_disk: Option<MountFacts>,
}

/// One guest mount as `Info` reports it (`MountFact`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountFacts {
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
    pub read_write: bool,
    /// 0: the guest's statvfs failed.
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// A disk root's disks as the running VMM holds them (`/proc/<pid>/fd` and `fdinfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedDisks {
    pub vmm_pid: u32,
    /// The root image the VMM's command line names.
    pub root_image: PathBuf,
    /// Each descriptor the VMM holds on the root image: (fd, writable).
    pub root: Vec<(i32, bool)>,
    /// The instance's data disk (`vm/data.ext4`).
    pub data_disk: PathBuf,
    /// Each descriptor the VMM holds on the data disk: (fd, writable).
    pub data: Vec<(i32, bool)>,
}

/// Below this share of its size free, `data-disk-free` warns: ext4 reserves nothing for an
/// unprivileged writer here, so what is left is what the workload gets.
pub const DATA_DISK_LOW_PERCENT: u64 = 10;

/// What the gateway did with a client that trusts its CA but presents no certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoCertificate {
    /// It served the client (sent application data after the handshake).
    Served,
    /// It sent this fatal TLS alert (rustls' name, e.g. `CertificateRequired`).
    Alert(String),
    /// Anything that is not a verdict: a close without an alert, a reset, a timeout.
    NoVerdict(String),
}

/// An artifact the running VMM was started with, re-hashed on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rehashed {
    /// The kernel file or rootfs directory, as the VMM's command line names it.
    pub path: PathBuf,
    /// Its sha256 now; for the rootfs, the digest of the manifest its tree hashes to now.
    pub found: String,
    /// The artifact's own record beside it: `provenance.json`'s `vmlinux_sha256`, or the digest
    /// of the rootfs's `manifest.json`.
    pub recorded: Attempt<String>,
    /// The rootfs only: the first file that differs from `manifest.json`, when one does.
    pub first_difference: Option<String>,
    /// A root disk: the VMM's descriptor it was read through (`/proc/<pid>/fd/N`).
    pub read_through: Option<PathBuf>,
}

/// A file or socket of the instance that should not exist in its current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub path: PathBuf,
    pub what: &'static str,
}

/// Everything `verify` looked at, before any verdict.
#[derive(Debug, Clone)]
pub struct Observations {
    pub name: String,
    pub metadata: Metadata,
    /// The endpoint's port (from `metadata.endpoint`).
    pub port: u16,
    /// Whether some process holds the instance lock (the supervisor).
    pub locked: bool,
    /// Who holds it, from `/proc/locks` (empty when unknown).
    pub lock_holders: Vec<u32>,
    pub supervisor: Option<ProcessFact>,
    pub vm: Option<ProcessFact>,
    /// The network helper: the recorded passt, or gvproxy ([`Observations::net_helper`]).
    pub net: Option<ProcessFact>,
    /// LISTEN sockets on `port`, each with whether the recorded network helper holds it (`None`:
    /// its fds could not be read or none was recorded) and otherwise who does.
    pub listeners: Vec<(TcpListenerFact, Option<bool>, Option<ProcessFact>)>,
    pub tcp: Attempt<Duration>,
    pub mtls: Attempt<Duration>,
    /// A client without a certificate, against the endpoint that just served the stored bundle.
    pub without_cert: Attempt<NoCertificate>,
    pub health: Attempt<String>,
    pub info: Attempt<InfoFacts>,
    /// The kernel the running VMM was started with, re-hashed, with its record.
    pub kernel: Attempt<Rehashed>,
    /// The rootfs the running VMM was started with, re-hashed against its manifest.
    pub rootfs: Attempt<Rehashed>,
    /// The instance boots a root disk (the VMM's command line names an image; without a VMM to
    /// read, `metadata.json`'s `rootfs_dir` is a file), not a shared root directory.
    pub disk_root: bool,
    /// A disk root's disks as the VMM holds them (not tried on a share root).
    pub disks: Attempt<AttachedDisks>,
    /// The console text of this boot, or why it could not be read.
    pub console: Attempt<String>,
    pub console_path: PathBuf,
    pub leftovers: Vec<Leftover>,
}

impl Observations {
    /// Which network helper carries the instance's forward: gvproxy when metadata.json records
    /// one, else passt (the Linux default, and what a record without either is checked for).
    pub fn net_helper(&self) -> &'static str {
        if self.metadata.gvproxy_pid.is_some() {
            "gvproxy"
        } else {
            "passt"
        }
    }
}

/// Console markers of a kernel in trouble. Each is printed by the kernel itself, at a log level
/// `quiet` still shows (or the line that precedes one); none appears on a healthy boot.
const KERNEL_TROUBLE: &[&str] = &[
    "Oops",
    "Kernel panic",
    "BUG:",
    "kernel BUG at",
    "WARNING: CPU:",
    "Call Trace:",
    "general protection fault",
    "Unable to handle kernel",
    "soft lockup",
    "hard LOCKUP",
    "rcu_sched detected stall",
    "rcu: INFO:",
    "blocked for more than",
    "Out of memory: Killed process",
    "invoked oom-killer",
];

/// The console lines that show the kernel in trouble (see [`KERNEL_TROUBLE`]).
pub fn kernel_trouble(console: &str) -> Vec<&str> {
    console.lines().map(str::trim_end).filter(|l| KERNEL_TROUBLE.iter().any(|m| l.contains(m))).collect()
}

/// Stale instance state: on-disk or process state that contradicts itself. Each finding is one
/// of these, precisely:
/// 1. the instance lock is held, but `/proc/locks` names a holder other than `metadata.json`'s
///    `supervisor_pid` (the metadata is from another run);
/// 2. the lock is held (the instance claims to run) but a recorded pid (supervisor, VMM, passt)
///    is dead;
/// 3. a recorded VMM or passt pid is alive and runs its program, but its parent is not the
///    recorded supervisor (the pid was reused, or the process outlived its supervisor);
/// 4. no lock is held (the instance claims to be stopped) but a recorded VMM or passt pid still
///    runs its program (an orphan; `vm stop` kills it);
/// 5. a leftover file: `.metadata.json.tmp` (an interrupted metadata write), a temp file in the
///    guest share, the guest's `exit-code` while the instance runs (its gateway already exited),
///    or a unix socket anywhere in the instance directory (nothing in a gateway instance creates
///    one: passt and the VMM share a socketpair).
pub fn stale_findings(o: &Observations) -> Vec<String> {
    let m = &o.metadata;
    let mut out = Vec::new();
    if o.locked {
        if let (Some(sup), false) = (m.supervisor_pid, o.lock_holders.is_empty()) {
            if !o.lock_holders.contains(&sup) {
                out.push(format!("lock held by pid {:?} but metadata.json names supervisor {sup}", o.lock_holders));
            }
        }
        for (what, p) in [("supervisor", &o.supervisor), ("VMM", &o.vm), (o.net_helper(), &o.net)] {
            if let Some(p) = p.as_ref().filter(|p| !p.alive) {
                out.push(format!("recorded {what} pid {} is dead while the instance holds its lock", p.pid));
            }
        }
    }
    let helper = [o.net_helper()];
    for (what, p, progs) in [("VMM", &o.vm, openshell_vm::backend::VMM_PROGRAMS), (helper[0], &o.net, &helper[..])] {
        let Some(p) = p.as_ref().filter(|p| p.program_is_any(progs)) else { continue };
        if !o.locked {
            out.push(format!("{what} pid {} still runs without a supervisor (orphan)", p.pid));
        } else if m.supervisor_pid.is_some() && p.ppid != m.supervisor_pid {
            out.push(format!(
                "{what} pid {} is a child of {:?}, not of supervisor {:?}",
                p.pid, p.ppid, m.supervisor_pid
            ));
        }
    }
    for l in &o.leftovers {
        out.push(format!("{} {}", l.what, l.path.display()));
    }
    out
}

/// The verdict on `o`: one row per check, in the order listed in the module docs.
pub fn decide(o: &Observations) -> Matrix {
    let name = &o.name;
    let m = &o.metadata;
    let restart =
        format!("restart it: `cargo xtask vm stop --name {name} && cargo xtask vm run --detach --name {name}`");
    let logs = format!("see `cargo xtask vm logs --name {name}`");
    let mut mx = Matrix::new(format!("verify gateway {name}"));

    mx.push(match (&o.supervisor, o.locked) {
        (_, false) => Row::fail(
            "supervisor",
            "not running: no process holds the instance lock",
            format!("start it: `cargo xtask vm run --detach --name {name}`"),
        ),
        (Some(s), true) if s.alive => Row::pass("supervisor", format!("pid {} holds the instance lock", s.pid)),
        (Some(s), true) => Row::fail(
            "supervisor",
            format!("the lock is held but recorded supervisor {} is dead", s.pid),
            restart.clone(),
        ),
        (None, true) => {
            Row::fail("supervisor", "the lock is held but metadata.json records no supervisor", restart.clone())
        }
    });

    mx.push(process_row(
        "vm-process",
        "VMM",
        &o.vm,
        openshell_vm::backend::VMM_PROGRAMS,
        &format!("{logs}; {restart}"),
    ));
    let helper = o.net_helper();
    mx.push(process_row(&format!("{helper}-process"), helper, &o.net, &[helper], &restart));
    mx.push(forward_row(o, &restart));

    mx.push(match &o.tcp {
        Attempt::Done(t) => Row::pass("tcp", format!("{} accepts connections ({} ms)", m.endpoint, t.as_millis())),
        other => Row::fail("tcp", format!("{}: {}", m.endpoint, other.why_not().unwrap_or_default()), restart.clone()),
    });
    mx.push(match &o.mtls {
        Attempt::Done(t) => {
            Row::pass("mtls-handshake", format!("TLS channel with the stored client bundle ({} ms)", t.as_millis()))
        }
        Attempt::NotTried(why) => Row::fail("mtls-handshake", why.clone(), restart.clone()),
        Attempt::Failed(e) => Row::fail(
            "mtls-handshake",
            e.clone(),
            format!("the client bundle in mtls/ must match the gateway's CA; {restart}"),
        ),
    });
    mx.push(match &o.without_cert {
        Attempt::Done(NoCertificate::Alert(a)) if a == REFUSAL_ALERT => Row::pass(
            "client-cert-required",
            format!("a client without a certificate is refused with the gateway's {REFUSAL_ALERT} alert"),
        ),
        Attempt::Done(NoCertificate::Alert(a)) => Row::fail(
            "client-cert-required",
            format!("a client without a certificate got the alert {a}, not the {REFUSAL_ALERT} this gateway sends: something else answers the TLS handshake"),
            format!("{logs}; {restart}"),
        ),
        Attempt::Done(NoCertificate::NoVerdict(what)) => Row::fail(
            "client-cert-required",
            format!("a client without a certificate got no {REFUSAL_ALERT} alert: {what}"),
            format!("{logs}; {restart}"),
        ),
        Attempt::Done(NoCertificate::Served) => Row::fail(
            "client-cert-required",
            "a client without a certificate was served",
            "the gateway must require client certificates (tls.rs: WebPkiClientVerifier); rebuild the rootfs: `cargo xtask rootfs`",
        ),
        Attempt::Failed(why) | Attempt::NotTried(why) => Row::fail("client-cert-required", why.clone(), restart.clone()),
    });
    mx.push(match &o.health {
        Attempt::Done(s) if s == "SERVING" => Row::pass("health", "grpc.health.v1.Health/Check: SERVING"),
        Attempt::Done(s) => Row::fail("health", format!("health says {s}"), format!("{logs}; {restart}")),
        other => Row::fail("health", other.why_not().unwrap_or_default().to_owned(), format!("{logs}; {restart}")),
    });
    mx.push(match &o.info {
        Attempt::Done(i) => Row::pass(
            "info",
            format!(
                "gateway {} on kernel {}, up {:.1} s, boot {}",
                i.version,
                i.kernel_release,
                i.uptime_ms as f64 / 1000.0,
                short(&i.boot_id)
            ),
        ),
        other => Row::fail("info", other.why_not().unwrap_or_default().to_owned(), format!("{logs}; {restart}")),
    });
    let info = match &o.info {
        Attempt::Done(i) => Ok(i),
        Attempt::NotTried(why) | Attempt::Failed(why) => Err(why.as_str()),
    };
    mx.push(digest_row(
        DigestCheck { id: "kernel-digest", what: "kernel", record_file: "provenance.json", fix: "stop the instance, rebuild the kernel (`cargo xtask kernel`) and start it again without --allow-unverified" },
        &o.kernel,
        (m.kernel_path.as_deref(), &m.kernel_sha256),
        info.map(|i| i.kernel_sha256.as_str()),
    ));
    mx.push(digest_row(
        DigestCheck { id: "rootfs-digest", what: "rootfs", record_file: "manifest.json", fix: "stop the instance, check the rootfs (`cargo xtask rootfs --check`) and start it again without --allow-unverified" },
        &o.rootfs,
        (m.rootfs_dir.as_deref(), &m.rootfs_sha256),
        info.map(|i| i.rootfs_sha256.as_str()),
    ));

    disk_rows(&mut mx, o, info, &restart);

    mx.push(match &o.console {
        Attempt::Done(text) => {
            let bad = kernel_trouble(text);
            match bad.first() {
                None => Row::pass(
                    "console-clean",
                    format!("{} lines, no oops/panic/BUG/WARNING/call trace", text.lines().count()),
                ),
                Some(first) => Row::fail(
                    "console-clean",
                    format!("{} kernel trouble line(s), first: {:?}", bad.len(), first.trim()),
                    format!("read the console: {}", o.console_path.display()),
                ),
            }
        }
        other => Row::fail(
            "console-clean",
            format!("{}: {}", o.console_path.display(), other.why_not().unwrap_or_default()),
            logs.clone(),
        ),
    });

    let stale = stale_findings(o);
    mx.push(if stale.is_empty() {
        Row::pass("no-stale-state", "lock holder, recorded pids and their parents agree; no leftover files")
    } else {
        Row::fail(
            "no-stale-state",
            stale.join("; "),
            format!(
                "`cargo xtask vm stop --name {name}` clears processes; remove the named files, then start it again"
            ),
        )
    });
    mx
}

/// `disks-attached`, `data-disk-mounted` and `data-disk-free` (see the module docs).
fn disk_rows(mx: &mut Matrix, o: &Observations, info: Result<&InfoFacts, &str>, restart: &str) {
    const IDS: [&str; 3] = ["disks-attached", "data-disk-mounted", "data-disk-free"];
    if !o.disk_root {
        for id in IDS {
            mx.push(Row::pass(id, "not applicable (share root)").optional());
        }
        return;
    }
    let name = &o.name;
    let fds = |v: &[(i32, bool)]| {
        v.iter()
            .map(|(fd, w)| format!("fd {fd} {}", if *w { "read-write" } else { "read-only" }))
            .collect::<Vec<_>>()
            .join(", ")
    };
    mx.push(match &o.disks {
        Attempt::NotTried(why) | Attempt::Failed(why) => {
            Row::fail(IDS[0], format!("not checked: {}", first_line(why)), restart.to_owned())
        }
        Attempt::Done(d) => {
            let (root, data) = (d.root_image.display(), d.data_disk.display());
            let pid = d.vmm_pid;
            if d.root.is_empty() {
                Row::fail(IDS[0], format!("VMM pid {pid} holds no descriptor on the root image {root}"), restart.to_owned())
            } else if d.root.iter().any(|(_, w)| *w) {
                Row::fail(
                    IDS[0],
                    format!("VMM pid {pid} holds the root image {root} writable ({}): the guest could change a disk every instance shares", fds(&d.root)),
                    format!("stop it (`cargo xtask vm stop --name {name}`), check the image (`cargo xtask rootfs --check`) and start it again; the launcher must hand the image read-only"),
                )
            } else if d.data.is_empty() {
                Row::fail(IDS[0], format!("VMM pid {pid} holds no descriptor on the data disk {data}"), restart.to_owned())
            } else if !d.data.iter().any(|(_, w)| *w) {
                Row::fail(
                    IDS[0],
                    format!("VMM pid {pid} holds the data disk {data} read-only only ({}): the guest's writes cannot land", fds(&d.data)),
                    restart.to_owned(),
                )
            } else {
                Row::pass(
                    IDS[0],
                    format!("VMM pid {pid}: root image {root} read-only ({}); data disk {data} ({})", fds(&d.root), fds(&d.data)),
                )
            }
        }
    });
    let logs = format!("read the console (`cargo xtask vm logs --name {name}`): init mounts the data disk");
    let data = match info {
        Err(why) => Err(format!("not asked: {}", first_line(why))),
        Ok(i) => match (&i.data_disk, &i.root_mount) {
            (None, _) => {
                Err(format!("the guest's Info reports nothing mounted at {}", openshell_guest::DATA_DISK_MOUNT))
            }
            (Some(d), root) => Ok((d, root)),
        },
    };
    let (d, root) = match data {
        Ok(v) => v,
        Err(why) => {
            mx.push(Row::fail(
                IDS[1],
                why.clone(),
                if info.is_ok() {
                    format!("{logs}; a gateway older than Info's data_disk needs `cargo xtask rootfs`")
                } else {
                    "see the info row".to_owned()
                },
            ));
            mx.push(Row::fail(IDS[2], format!("not measured: {why}"), "see the data-disk-mounted row"));
            return;
        }
    };
    let state = |m: &MountFacts| {
        format!("{} {} {}", m.fs_type, m.source, if m.read_write { "read-write" } else { "read-only" })
    };
    let repair = format!(
        "ext4 remounts itself read-only after an error: stop it (`cargo xtask vm stop --name {name}`), run `e2fsck -f` on its vm/{}, and start it again (or `--reset` to discard the data disk)",
        openshell_vm::DATA_DISK_FILE
    );
    mx.push(match root {
        _ if d.fs_type != "ext4" || !d.read_write => Row::fail(
            IDS[1],
            format!("the data disk at {} is {}, not ext4 read-write", d.mount_point, state(d)),
            repair,
        ),
        Some(r) if r.fs_type == "overlay" && r.read_write => {
            Row::pass(IDS[1], format!("{} at {}; / is overlay read-write", state(d), d.mount_point))
        }
        Some(r) => {
            Row::fail(IDS[1], format!("the data disk is mounted, but / is {}, not overlay read-write", state(r)), logs)
        }
        None => Row::fail(IDS[1], "the data disk is mounted, but the guest's Info reports no / mount", logs),
    });
    let mib = |b: u64| b / (1024 * 1024);
    mx.push(if d.total_bytes == 0 {
        Row::warn(IDS[2], format!("the guest could not statvfs {}", d.mount_point), "see the data-disk-mounted row")
    } else if d.free_bytes * 100 < d.total_bytes * DATA_DISK_LOW_PERCENT {
        Row::warn(
            IDS[2],
            format!(
                "{} MiB of {} MiB free ({}%), under {DATA_DISK_LOW_PERCENT}%",
                mib(d.free_bytes),
                mib(d.total_bytes),
                d.free_bytes * 100 / d.total_bytes
            ),
            format!("remove files in the guest, or start it again with a larger disk: `cargo xtask vm stop --name {name} && cargo xtask vm run --detach --name {name} --root disk --reset --disk-size MIB` (--reset discards the data disk)"),
        )
    } else {
        Row::pass(
            IDS[2],
            format!("{} MiB of {} MiB free ({}%)", mib(d.free_bytes), mib(d.total_bytes), d.free_bytes * 100 / d.total_bytes),
        )
    });
}

fn process_row(id: &str, what: &str, p: &Option<ProcessFact>, programs: &[&str], fix: &str) -> Row {
    match p {
        None => Row::fail(id, format!("metadata.json records no {what} pid"), fix.to_owned()),
        Some(p) if p.program_is_any(programs) => {
            Row::pass(id, format!("pid {} runs {}", p.pid, program_name(&p.cmdline)))
        }
        Some(p) if p.alive => Row::fail(
            id,
            format!("pid {} runs {:?}, not {what} (the pid was reused)", p.pid, program_name(&p.cmdline)),
            fix.to_owned(),
        ),
        Some(p) => Row::fail(id, format!("{what} pid {} is dead", p.pid), fix.to_owned()),
    }
}

fn forward_row(o: &Observations, restart: &str) -> Row {
    const ID: &str = "forward-loopback-only";
    let port = o.port;
    if o.listeners.is_empty() {
        return Row::fail(ID, format!("nothing listens on port {port}"), restart.to_owned());
    }
    let loopback = |a: &IpAddr| match a {
        IpAddr::V4(v4) => *v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6.to_ipv4_mapped() == Some(Ipv4Addr::LOCALHOST),
    };
    let exposed: Vec<String> = o
        .listeners
        .iter()
        .filter(|(l, ..)| !loopback(&l.addr))
        .map(|(l, ours, owner)| match (ours, owner) {
            (Some(true), _) => format!("{} ({} itself)", l.addr, o.net_helper()),
            (_, Some(p)) => format!("{} (pid {} {})", l.addr, p.pid, program_name(&p.cmdline)),
            _ => l.addr.to_string(),
        })
        .collect();
    if !exposed.is_empty() {
        return Row::fail(
            ID,
            format!("port {port} also listens on {}", exposed.join(", ")),
            format!(
                "the forward must be {}'s on 127.0.0.1:{port} only; stop whatever else binds the port, then {restart}",
                o.net_helper()
            ),
        );
    }
    let foreign: Vec<String> = o
        .listeners
        .iter()
        .filter(|(_, ours, _)| *ours == Some(false))
        .map(|(_, _, owner)| match owner {
            Some(p) => format!("pid {} ({})", p.pid, program_name(&p.cmdline)),
            None => "an unknown process".into(),
        })
        .collect();
    if !foreign.is_empty() {
        return Row::fail(
            ID,
            format!("127.0.0.1:{port} is held by {}, not by the instance's {}", foreign.join(", "), o.net_helper()),
            format!("stop that process, then {restart}"),
        );
    }
    if o.listeners.iter().any(|(_, ours, _)| ours.is_none()) {
        return Row::warn(
            ID,
            format!("port {port} listens on 127.0.0.1 only; which process owns it could not be read"),
            "run verify as the user that started the gateway (or root) to check the owner",
        );
    }
    let pid = o.net.as_ref().map_or(0, |p| p.pid);
    Row::pass(ID, format!("127.0.0.1:{port} only, held by {} pid {pid}", o.net_helper()))
}

/// The alert rustls' `WebPkiClientVerifier` sends a TLS 1.3 client that presents no certificate.
const REFUSAL_ALERT: &str = "CertificateRequired";

/// The fixed words of one digest row.
struct DigestCheck {
    id: &'static str,
    what: &'static str,
    record_file: &'static str,
    fix: &'static str,
}

/// The artifact the VMM has, re-hashed, against its own record, then against what
/// `metadata.json` says was booted, then against the guest's `Info` (which only echoes the share).
fn digest_row(
    c: DigestCheck,
    rehashed: &Attempt<Rehashed>,
    metadata: (Option<&std::path::Path>, &str),
    info: Result<&str, &str>,
) -> Row {
    let DigestCheck { id, what, record_file, fix } = c;
    let r = match rehashed {
        Attempt::Done(r) => r,
        Attempt::NotTried(why) | Attempt::Failed(why) => {
            return Row::fail(id, format!("not compared: {}", first_line(why)), fix)
        }
    };
    let path = r.path.display();
    let recorded = match &r.recorded {
        Attempt::Done(rec) => rec,
        Attempt::NotTried(why) | Attempt::Failed(why) => {
            return Row::fail(
                id,
                format!("the VMM runs {path}, whose {record_file} cannot be read: {}", first_line(why)),
                fix,
            )
        }
    };
    if &r.found != recorded {
        let at = r.first_difference.as_ref().map_or(String::new(), |d| format!(" (first difference: {d})"));
        return Row::fail(
            id,
            format!(
                "the VMM runs {path}, which hashes to {} now, but its {record_file} records {}{at}",
                r.found, recorded
            ),
            fix,
        );
    }
    let (meta_path, meta_digest) = metadata;
    if let Some(p) = meta_path.filter(|p| *p != r.path) {
        return Row::fail(
            id,
            format!("metadata.json says the instance booted {}, but its VMM runs {path}", p.display()),
            fix,
        );
    }
    if meta_digest != recorded {
        return Row::fail(
            id,
            format!(
                "metadata.json records {what} {} but the VMM's {path} is {} (as its {record_file} records)",
                short(meta_digest),
                short(recorded)
            ),
            fix,
        );
    }
    let through = r.read_through.as_ref().map_or(String::new(), |p| format!(" (read through {})", p.display()));
    let evidence =
        format!("{path} as the VMM has it{through}, re-hashed: {} = {record_file} = metadata.json", short(recorded));
    match info {
        Ok(i) if i == meta_digest => Row::pass(id, format!("{evidence} = Info")),
        Ok("") => Row::fail(id, format!("{evidence}, but the gateway reports no {what} digest"), fix),
        Ok(i) => Row::fail(
            id,
            format!("{evidence}, but the gateway's Info says {}: the endpoint answers for another boot", short(i)),
            "stop whatever else serves the endpoint; `cargo xtask vm status` names the instance",
        ),
        Err(why) => Row::warn(id, format!("{evidence}; Info not compared ({})", first_line(why)), "see the info row"),
    }
}

/// The first 16 hex digits, enough to tell digests apart in a table.
fn short(s: &str) -> &str {
    s.get(..16).unwrap_or(s)
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// The program's file name from a command line.
fn program_name(cmdline: &str) -> &str {
    let exe = cmdline.split(' ').next().unwrap_or_default();
    exe.rsplit('/').next().unwrap_or(exe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_matrix::Status;

    const K: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const R: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn proc(pid: u32, ppid: u32, cmd: &str) -> Option<ProcessFact> {
        Some(ProcessFact { pid, alive: true, ppid: Some(ppid), cmdline: cmd.into() })
    }

    fn dead(pid: u32) -> Option<ProcessFact> {
        Some(ProcessFact { pid, alive: false, ppid: None, cmdline: String::new() })
    }

    fn listener(addr: &str, ours: Option<bool>) -> (TcpListenerFact, Option<bool>, Option<ProcessFact>) {
        (TcpListenerFact { addr: addr.parse().unwrap(), port: 30051, inode: 7 }, ours, None)
    }

    /// TCP failed with `err`, so the probes never tried what needs a connection (`why`).
    fn tcp_failed(o: &mut Observations, err: &str, why: &str) {
        o.tcp = Attempt::Failed(err.into());
        o.mtls = Attempt::NotTried(why.into());
        o.without_cert = Attempt::NotTried(why.into());
        o.health = Attempt::NotTried(why.into());
        o.info = Attempt::NotTried(why.into());
    }

    fn rehashed(path: &str, found: &str, recorded: &str) -> Rehashed {
        Rehashed {
            path: path.into(),
            found: found.into(),
            recorded: Attempt::Done(recorded.into()),
            first_difference: None,
            read_through: None,
        }
    }

    /// The VMM is dead, so there is no command line to read the booted artifacts from.
    fn vmm_dead(o: &mut Observations) {
        o.vm = dead(11);
        o.kernel = Attempt::NotTried("the VMM pid 11 is dead".into());
        o.rootfs = Attempt::NotTried("the VMM pid 11 is dead".into());
    }

    /// A healthy running instance, as the probes would see it.
    fn healthy() -> Observations {
        Observations {
            name: "default".into(),
            metadata: Metadata {
                name: "default".into(),
                endpoint: "127.0.0.1:30051".into(),
                gateway_endpoint: "https://127.0.0.1:1".into(),
                created_unix: 1,
                vm_pid: Some(11),
                kernel_sha256: K.into(),
                rootfs_sha256: R.into(),
                backend: "qemu (tcg)".into(),
                supervisor_pid: Some(10),
                passt_pid: Some(12),
                gvproxy_pid: None,
                kernel_path: Some("/k/vmlinux".into()),
                rootfs_dir: Some("/r".into()),
                console_log: None,
                failure: None,
                restarting: None,
                gave_up_after_restarts: None,
            },
            port: 30051,
            locked: true,
            lock_holders: vec![10],
            supervisor: proc(10, 1, "/x/xtask vm run --name default"),
            vm: proc(11, 10, "/usr/bin/qemu-system-x86_64 -M microvm"),
            net: proc(12, 10, "/usr/bin/passt -f -q --fd 3"),
            listeners: vec![listener("127.0.0.1", Some(true))],
            tcp: Attempt::Done(Duration::from_millis(1)),
            mtls: Attempt::Done(Duration::from_millis(20)),
            without_cert: Attempt::Done(NoCertificate::Alert("CertificateRequired".into())),
            health: Attempt::Done("SERVING".into()),
            info: Attempt::Done(InfoFacts {
                version: "0.1.0".into(),
                kernel_release: "6.1.0".into(),
                boot_id: "abc".into(),
                uptime_ms: 5000,
                kernel_sha256: K.into(),
                rootfs_sha256: R.into(),
                root_mount: Some(MountFacts {
                    mount_point: "/".into(),
                    fs_type: "9p".into(),
                    source: "rootfs".into(),
                    read_write: false,
                    total_bytes: 1 << 30,
                    free_bytes: 1 << 29,
                }),
                data_disk: None,
            }),
            kernel: Attempt::Done(rehashed("/k/vmlinux", K, K)),
            rootfs: Attempt::Done(rehashed("/r", R, R)),
            disk_root: false,
            disks: Attempt::NotTried("a share root".into()),
            console: Attempt::Done(
                "Linux version 6.1\nopenshell-init: [  12 ms] mounted\ngateway listening on 0.0.0.0:30051\n".into(),
            ),
            console_path: "/g/default/vm/console.log".into(),
            leftovers: vec![],
        }
    }

    /// The matrix fails, and exactly these required rows are the ones failing.
    fn fails_with(o: &Observations, rows: &[&str]) -> Matrix {
        let m = decide(o);
        let failing: Vec<&str> = m.blocking().iter().map(|r| r.id.as_str()).collect();
        assert_eq!(failing, rows, "{}", m.render());
        assert_eq!(m.exit_code(), openshell_matrix::EXIT_REQUIRED_FAILED);
        m
    }

    #[test]
    fn a_gvproxy_instance_is_checked_for_its_gvproxy() {
        let mut o = healthy();
        (o.metadata.passt_pid, o.metadata.gvproxy_pid) = (None, Some(12));
        o.net = proc(12, 10, "/root/.cache/openshell-vm/gvproxy/ab/bin/gvproxy -listen unix:///proc/self/cwd/api.sock");
        let m = decide(&o);
        assert_eq!(m.exit_code(), 0, "{}", m.render());
        let row = m.row("gvproxy-process").expect("a gvproxy-process row");
        assert!(row.reason.contains("pid 12 runs gvproxy"), "{}", m.render());
        assert!(m.row("passt-process").is_none() && m.render().contains("held by gvproxy pid 12"), "{}", m.render());
        // A gvproxy pid reused by another program, or dead, fails that row.
        o.net = proc(12, 10, "/usr/bin/passt -f");
        fails_with(&o, &["gvproxy-process"]);
        o.net = dead(12);
        let m = fails_with(&o, &["gvproxy-process", "no-stale-state"]);
        assert!(m.render().contains("recorded gvproxy pid 12 is dead"), "{}", m.render());
    }

    #[test]
    fn healthy_instance_passes_every_row() {
        let m = decide(&healthy());
        assert_eq!(m.exit_code(), 0, "{}", m.render());
        assert!(m.rows.iter().all(|r| r.status == Status::Pass), "{}", m.render());
        const DISK_ROWS: [&str; 3] = ["disks-attached", "data-disk-mounted", "data-disk-free"];
        for r in &m.rows {
            // A share root has no disks: those rows say so and are not counted.
            let na = DISK_ROWS.contains(&r.id.as_str());
            assert_eq!(r.required, !na, "{}", m.render());
            assert!(!na || r.reason == "not applicable (share root)", "{}", m.render());
        }
        let ids: Vec<&str> = m.rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "supervisor",
                "vm-process",
                "passt-process",
                "forward-loopback-only",
                "tcp",
                "mtls-handshake",
                "client-cert-required",
                "health",
                "info",
                "kernel-digest",
                "rootfs-digest",
                "disks-attached",
                "data-disk-mounted",
                "data-disk-free",
                "console-clean",
                "no-stale-state"
            ]
        );
    }

    const MIB: u64 = 1024 * 1024;

    /// A healthy disk-root instance: the VMM holds the image read-only and the data disk both
    /// ways (QEMU's fdset), the guest's data disk is ext4 read-write under an overlay root.
    fn healthy_disk_root() -> Observations {
        let mut o = healthy();
        o.disk_root = true;
        o.rootfs = Attempt::Done(Rehashed {
            read_through: Some("/proc/11/fd/20".into()),
            ..rehashed("/store/rootdisk/ab/root.ext4", R, R)
        });
        o.metadata.rootfs_dir = Some("/store/rootdisk/ab/root.ext4".into());
        o.disks = Attempt::Done(AttachedDisks {
            vmm_pid: 11,
            root_image: "/store/rootdisk/ab/root.ext4".into(),
            root: vec![(20, false)],
            data_disk: "/g/default/vm/data.ext4".into(),
            data: vec![(21, true), (22, false)],
        });
        let mount = |point: &str, fs: &str, source: &str, free| MountFacts {
            mount_point: point.into(),
            fs_type: fs.into(),
            source: source.into(),
            read_write: true,
            total_bytes: 1024 * MIB,
            free_bytes: free,
        };
        with_info(&mut o, |i| {
            i.root_mount = Some(mount("/", "overlay", "overlay", 1000 * MIB));
            i.data_disk = Some(mount(openshell_guest::DATA_DISK_MOUNT, "ext4", "/dev/vdb", 1000 * MIB));
        });
        o
    }

    #[test]
    fn a_healthy_disk_root_passes_its_disk_rows() {
        let m = decide(&healthy_disk_root());
        assert_eq!(m.exit_code(), 0, "{}", m.render());
        assert!(m.rows.iter().all(|r| r.status == Status::Pass && r.required), "{}", m.render());
        let attached = &m.row("disks-attached").unwrap().reason;
        assert!(
            attached.contains("root.ext4 read-only (fd 20 read-only)") && attached.contains("fd 21 read-write"),
            "{attached}"
        );
        assert!(m.row("rootfs-digest").unwrap().reason.contains("read through /proc/11/fd/20"), "{}", m.render());
        assert_eq!(m.row("data-disk-free").unwrap().reason, "1000 MiB of 1024 MiB free (97%)");
    }

    #[test]
    fn disks_open_in_the_wrong_mode_fail() {
        let edit = |f: &dyn Fn(&mut AttachedDisks)| {
            let mut o = healthy_disk_root();
            if let Attempt::Done(d) = &mut o.disks {
                f(d);
            }
            let m = fails_with(&o, &["disks-attached"]);
            m.row("disks-attached").unwrap().reason.clone()
        };
        let r = edit(&|d| d.root.push((23, true)));
        assert!(r.contains("writable (fd 20 read-only, fd 23 read-write)"), "{r}");
        let r = edit(&|d| d.data.retain(|(_, w)| !*w));
        assert!(r.contains("read-only only (fd 22 read-only)"), "{r}");
        let r = edit(&|d| d.root.clear());
        assert!(r.contains("no descriptor on the root image"), "{r}");
        let r = edit(&|d| d.data.clear());
        assert!(r.contains("no descriptor on the data disk"), "{r}");
        let mut o = healthy_disk_root();
        o.disks = Attempt::Failed("cannot list /proc/11/fd; run verify as the user that started the gateway".into());
        let m = fails_with(&o, &["disks-attached"]);
        assert!(m.row("disks-attached").unwrap().reason.starts_with("not checked: cannot list"), "{}", m.render());
    }

    #[test]
    fn a_data_disk_not_mounted_read_write_fails() {
        let mut o = healthy_disk_root();
        with_info(&mut o, |i| i.data_disk.as_mut().unwrap().read_write = false);
        let m = fails_with(&o, &["data-disk-mounted"]);
        let row = m.row("data-disk-mounted").unwrap();
        assert!(
            row.reason.contains("ext4 /dev/vdb read-only, not ext4 read-write") && row.fix.contains("e2fsck -f"),
            "{}",
            m.render()
        );

        let mut o = healthy_disk_root();
        with_info(&mut o, |i| i.root_mount.as_mut().unwrap().fs_type = "ext4".into());
        let m = fails_with(&o, &["data-disk-mounted"]);
        assert!(m.row("data-disk-mounted").unwrap().reason.contains("not overlay"), "{}", m.render());

        // A guest that reports no data disk (an older gateway, or init never mounted it).
        let mut o = healthy_disk_root();
        with_info(&mut o, |i| i.data_disk = None);
        let m = fails_with(&o, &["data-disk-mounted", "data-disk-free"]);
        assert!(m.row("data-disk-free").unwrap().reason.starts_with("not measured"), "{}", m.render());

        // Without Info there is nothing to ask; the rows say why rather than passing.
        let mut o = healthy_disk_root();
        o.info = Attempt::Failed("Info: no answer within 3 s".into());
        let m = fails_with(&o, &["info", "data-disk-mounted", "data-disk-free"]);
        assert!(m.row("data-disk-mounted").unwrap().reason.contains("not asked: Info: no answer"), "{}", m.render());
    }

    #[test]
    fn a_nearly_full_data_disk_warns() {
        let mut o = healthy_disk_root();
        with_info(&mut o, |i| i.data_disk.as_mut().unwrap().free_bytes = 50 * MIB);
        let m = decide(&o);
        let row = m.row("data-disk-free").unwrap();
        assert_eq!((row.status, m.exit_code()), (Status::Warn, 0), "{}", m.render());
        assert!(
            row.reason.contains("50 MiB of 1024 MiB free (4%)") && row.fix.contains("--disk-size"),
            "{}",
            m.render()
        );
        with_info(&mut o, |i| i.data_disk.as_mut().unwrap().total_bytes = 0);
        assert_eq!(decide(&o).row("data-disk-free").unwrap().status, Status::Warn);
    }

    #[test]
    fn dead_vm_process_fails_its_row_and_is_stale() {
        let mut o = healthy();
        vmm_dead(&mut o);
        let m = fails_with(&o, &["vm-process", "kernel-digest", "rootfs-digest", "no-stale-state"]);
        assert!(m.row("vm-process").unwrap().reason.contains("11 is dead"));
        assert!(m.row("no-stale-state").unwrap().reason.contains("VMM pid 11 is dead"));
    }

    #[test]
    fn reused_pid_is_not_our_vmm() {
        let mut o = healthy();
        o.vm = proc(11, 1, "/usr/bin/sleep 100");
        let m = fails_with(&o, &["vm-process"]);
        assert!(m.row("vm-process").unwrap().reason.contains("reused"), "{}", m.render());
    }

    #[test]
    fn not_running_instance_fails_supervisor() {
        let mut o = healthy();
        o.locked = false;
        o.lock_holders.clear();
        o.supervisor = dead(10);
        vmm_dead(&mut o);
        o.net = dead(12);
        o.listeners.clear();
        tcp_failed(&mut o, "connection refused", "TCP failed");
        let m = fails_with(
            &o,
            &[
                "supervisor",
                "vm-process",
                "passt-process",
                "forward-loopback-only",
                "tcp",
                "mtls-handshake",
                "client-cert-required",
                "health",
                "info",
                "kernel-digest",
                "rootfs-digest",
            ],
        );
        assert!(m.row("supervisor").unwrap().fix.contains("vm run --detach --name default"));
    }

    #[test]
    fn forward_on_all_interfaces_fails() {
        let mut o = healthy();
        o.listeners.push(listener("0.0.0.0", Some(true)));
        let m = fails_with(&o, &["forward-loopback-only"]);
        assert!(m.row("forward-loopback-only").unwrap().reason.contains("0.0.0.0"));
        let mut o = healthy();
        o.listeners.push((listener("::", Some(false)).0, Some(false), proc(99, 1, "/usr/bin/python3 -c listen")));
        let m = fails_with(&o, &["forward-loopback-only"]);
        assert!(m.row("forward-loopback-only").unwrap().reason.contains(":: (pid 99 python3)"), "{}", m.render());
        // IPv6 loopback is loopback, but not the 127.0.0.1 the forward promises.
        let mut o = healthy();
        o.listeners = vec![listener("::1", Some(true))];
        fails_with(&o, &["forward-loopback-only"]);
    }

    #[test]
    fn forward_held_by_another_process_fails() {
        let mut o = healthy();
        o.listeners = vec![(listener("127.0.0.1", Some(false)).0, Some(false), proc(99, 1, "/usr/bin/nc -l 30051"))];
        let m = fails_with(&o, &["forward-loopback-only"]);
        assert!(m.row("forward-loopback-only").unwrap().reason.contains("pid 99 (nc)"), "{}", m.render());
    }

    #[test]
    fn forward_with_unknown_owner_warns() {
        let mut o = healthy();
        o.listeners = vec![listener("127.0.0.1", None)];
        let m = decide(&o);
        assert_eq!(m.row("forward-loopback-only").unwrap().status, Status::Warn);
        assert_eq!(m.exit_code(), 0);
    }

    #[test]
    fn closed_forward_fails_forward_and_tcp() {
        let mut o = healthy();
        o.net = dead(12);
        o.listeners.clear();
        tcp_failed(&mut o, "Connection refused (os error 111)", "TCP to 127.0.0.1:30051 failed");
        let m = fails_with(
            &o,
            &[
                "passt-process",
                "forward-loopback-only",
                "tcp",
                "mtls-handshake",
                "client-cert-required",
                "health",
                "info",
                "no-stale-state",
            ],
        );
        assert!(m.row("forward-loopback-only").unwrap().reason.contains("nothing listens on port 30051"));
        // The VM still runs: its artifacts are re-hashed from its command line all the same.
        assert_eq!(m.row("kernel-digest").unwrap().status, Status::Warn, "{}", m.render());
        assert!(m.render().contains("required failing: passt-process, forward-loopback-only, tcp"), "{}", m.render());
    }

    #[test]
    fn handshake_accepted_without_client_cert_fails() {
        let mut o = healthy();
        o.without_cert = Attempt::Done(NoCertificate::Served);
        let m = fails_with(&o, &["client-cert-required"]);
        assert!(m.row("client-cert-required").unwrap().reason.contains("was served"));
    }

    /// Only the gateway's own alert proves its certificate check ran: a close without an alert,
    /// a reset or a timeout is what a dead or foreign peer does too, and another alert is
    /// another TLS policy.
    #[test]
    fn refusal_is_the_certificate_required_alert_and_nothing_else() {
        let mut o = healthy();
        for what in [
            "closed by the server without an alert after the handshake",
            "I/O failed: Connection reset by peer (os error 104)",
            "I/O failed: Resource temporarily unavailable (os error 11)",
        ] {
            o.without_cert = Attempt::Done(NoCertificate::NoVerdict(what.into()));
            let m = fails_with(&o, &["client-cert-required"]);
            assert!(m.row("client-cert-required").unwrap().reason.contains(what), "{}", m.render());
        }
        o.without_cert = Attempt::Done(NoCertificate::Alert("HandshakeFailure".into()));
        let m = fails_with(&o, &["client-cert-required"]);
        assert!(m.row("client-cert-required").unwrap().reason.contains("HandshakeFailure"), "{}", m.render());
        o.without_cert = Attempt::Failed("probe TLS material: server CA: no CERTIFICATE block".into());
        fails_with(&o, &["client-cert-required"]);
    }

    /// The digest rows stand on the host's re-hash, so they still judge without Info, and say
    /// that Info was not compared.
    #[test]
    fn untested_client_cert_refusal_is_not_a_pass() {
        let mut o = healthy();
        o.mtls = Attempt::Failed("tls: bad certificate".into());
        o.without_cert = Attempt::NotTried("the mTLS handshake failed".into());
        o.health = Attempt::NotTried("the mTLS handshake failed".into());
        o.info = Attempt::NotTried("the mTLS handshake failed".into());
        let m = fails_with(&o, &["mtls-handshake", "client-cert-required", "health", "info"]);
        let row = m.row("kernel-digest").unwrap();
        assert_eq!(row.status, Status::Warn, "{}", m.render());
        assert!(row.reason.contains("Info not compared"), "{}", m.render());
    }

    #[test]
    fn not_serving_fails_health() {
        let mut o = healthy();
        o.health = Attempt::Done("NotServing".into());
        fails_with(&o, &["health"]);
    }

    fn with_info(o: &mut Observations, edit: impl FnOnce(&mut InfoFacts)) {
        if let Attempt::Done(i) = &mut o.info {
            edit(i);
        }
    }

    /// The finding this row was rebuilt for: a tampered kernel booted with --allow-unverified,
    /// where metadata.json and Info carry the record's digest (what `vm run` writes) and only the
    /// re-hash of the VMM's file tells the truth.
    #[test]
    fn tampered_artifacts_fail_although_info_and_metadata_agree_with_the_record() {
        let mut o = healthy();
        o.kernel = Attempt::Done(rehashed("/k/vmlinux", R, K));
        let m = fails_with(&o, &["kernel-digest"]);
        let reason = &m.row("kernel-digest").unwrap().reason;
        assert!(
            reason.contains("/k/vmlinux")
                && reason.contains(&format!("hashes to {R} now"))
                && reason.contains(&format!("provenance.json records {K}")),
            "{reason}"
        );

        let mut o = healthy();
        o.rootfs = Attempt::Done(Rehashed {
            first_difference: Some("rootfs file /etc/hostname does not match its manifest".into()),
            ..rehashed("/r", K, R)
        });
        let m = fails_with(&o, &["rootfs-digest"]);
        let reason = &m.row("rootfs-digest").unwrap().reason;
        assert!(
            reason.contains("manifest.json records bbbb")
                && reason.contains("first difference: rootfs file /etc/hostname"),
            "{reason}"
        );
    }

    #[test]
    fn digest_rows_name_what_disagrees() {
        // metadata.json names another kernel than the one the VMM runs.
        let mut o = healthy();
        o.metadata.kernel_path = Some("/other/vmlinux".into());
        let m = fails_with(&o, &["kernel-digest"]);
        assert!(
            m.row("kernel-digest").unwrap().reason.contains("booted /other/vmlinux, but its VMM runs /k/vmlinux"),
            "{}",
            m.render()
        );

        // metadata.json records another digest than the booted artifact's record.
        let mut o = healthy();
        o.metadata.rootfs_sha256 = K.into();
        let m = fails_with(&o, &["rootfs-digest"]);
        assert!(
            m.row("rootfs-digest").unwrap().reason.contains("metadata.json records rootfs aaaaaaaaaaaaaaaa"),
            "{}",
            m.render()
        );

        // Info answers for another boot.
        let mut o = healthy();
        with_info(&mut o, |i| i.kernel_sha256 = R.into());
        let m = fails_with(&o, &["kernel-digest"]);
        assert!(m.row("kernel-digest").unwrap().reason.contains("another boot"), "{}", m.render());

        let mut o = healthy();
        with_info(&mut o, |i| i.rootfs_sha256.clear());
        let m = fails_with(&o, &["rootfs-digest"]);
        assert!(m.row("rootfs-digest").unwrap().reason.contains("reports no rootfs digest"), "{}", m.render());

        let mut o = healthy();
        o.kernel = Attempt::Done(Rehashed {
            recorded: Attempt::Failed("/k/provenance.json: No such file".into()),
            ..rehashed("/k/vmlinux", K, K)
        });
        let m = fails_with(&o, &["kernel-digest"]);
        assert!(m.row("kernel-digest").unwrap().reason.contains("provenance.json cannot be read"), "{}", m.render());
    }

    #[test]
    fn digest_rows_without_a_vmm_to_read_fail() {
        let mut o = healthy();
        o.kernel = Attempt::NotTried("the VMM pid 11 is dead".into());
        o.rootfs = Attempt::Failed("VMM pid 11: no -kernel on its command line".into());
        let m = fails_with(&o, &["kernel-digest", "rootfs-digest"]);
        assert!(
            m.row("kernel-digest").unwrap().reason.contains("not compared: the VMM pid 11 is dead"),
            "{}",
            m.render()
        );
    }

    #[test]
    fn passing_digest_rows_say_what_they_compared() {
        let m = decide(&healthy());
        let reason = &m.row("kernel-digest").unwrap().reason;
        assert_eq!(
            reason,
            "/k/vmlinux as the VMM has it, re-hashed: aaaaaaaaaaaaaaaa = provenance.json = metadata.json = Info"
        );
    }

    #[test]
    fn oops_in_console_fails() {
        for line in [
            "[    1.2] BUG: kernel NULL pointer dereference, address: 0000000000000000",
            "Oops: 0002 [#1] PREEMPT SMP",
            "Kernel panic - not syncing: Attempted to kill init!",
            "WARNING: CPU: 0 PID: 1 at mm/slub.c:123 foo+0x1/0x2",
            "Call Trace:",
            "watchdog: BUG: soft lockup - CPU#0 stuck for 22s!",
            "Out of memory: Killed process 42 (openshell-gatew)",
        ] {
            let mut o = healthy();
            o.console = Attempt::Done(format!("Linux version 6.1\n{line}\ngateway listening\n"));
            let m = fails_with(&o, &["console-clean"]);
            assert!(m.row("console-clean").unwrap().reason.contains(line.trim()), "{}", m.render());
        }
    }

    #[test]
    fn unreadable_console_fails() {
        let mut o = healthy();
        o.console = Attempt::Failed("No such file or directory".into());
        fails_with(&o, &["console-clean"]);
    }

    #[test]
    fn stale_lock_holder_and_leftovers_fail() {
        let mut o = healthy();
        o.lock_holders = vec![77];
        let m = fails_with(&o, &["no-stale-state"]);
        assert!(m.row("no-stale-state").unwrap().reason.contains("names supervisor 10"));

        let mut o = healthy();
        o.leftovers = vec![
            Leftover { path: "/g/default/.metadata.json.tmp".into(), what: "interrupted metadata write" },
            Leftover { path: "/g/default/vm/share/exit-code".into(), what: "guest exit code while running" },
        ];
        let m = fails_with(&o, &["no-stale-state"]);
        let reason = &m.row("no-stale-state").unwrap().reason;
        assert!(reason.contains(".metadata.json.tmp") && reason.contains("exit-code"), "{reason}");
    }

    #[test]
    fn vmm_not_child_of_supervisor_is_stale() {
        let mut o = healthy();
        o.vm = proc(11, 500, "/usr/bin/qemu-system-x86_64");
        let m = fails_with(&o, &["no-stale-state"]);
        assert!(m.row("no-stale-state").unwrap().reason.contains("VMM pid 11 is a child of Some(500)"));
    }

    #[test]
    fn orphans_of_a_stopped_instance_are_stale() {
        let mut o = healthy();
        o.locked = false;
        o.lock_holders.clear();
        o.supervisor = dead(10);
        let stale = stale_findings(&o);
        assert_eq!(stale.len(), 2, "{stale:?}");
        assert!(stale[0].contains("VMM pid 11 still runs without a supervisor"));
    }

    #[test]
    fn trouble_markers_do_not_match_a_healthy_boot() {
        let boot = "Linux version 6.1.0 (root@host) #1 SMP PREEMPT_DYNAMIC\nCommand line: console=ttyS0 quiet\n\
                    openshell-init: [   40 ms] mounted /proc /sys /dev\ngateway listening on 0.0.0.0:30051 (mTLS)\n";
        assert!(kernel_trouble(boot).is_empty());
    }
}

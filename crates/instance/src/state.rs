//! A named gateway instance's files: each owns `$XDG_CONFIG_HOME/openshell/gateways/<name>/`
//! (0700): `mtls/` (the client bundle a CLI uses), `server/` (the gateway's certificate, key and
//! client CA, copied into the guest share at each boot), `vm/` (the VM's runtime state), the
//! instance lock and `metadata.json`; and `active_gateway` beside `gateways/`, which OpenShell's CLI
//! and SDK read. A warm boot reuses the PKI; `reset` removes it. What a gateway VM is lives in
//! [`crate::preset`].

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use openshell_vm::VmError;

/// Where a named gateway's files live.
#[derive(Debug, Clone)]
pub struct GatewayInstance {
    pub name: String,
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metadata {
    pub name: String,
    /// `127.0.0.1:PORT`.
    pub endpoint: String,
    /// The same endpoint as OpenShell's CLI and SDK look it up: [`gateway_url`].
    #[serde(default)]
    pub gateway_endpoint: String,
    pub created_unix: u64,
    pub vm_pid: Option<u32>,
    pub kernel_sha256: String,
    pub rootfs_sha256: String,
    pub backend: String,
    /// The process that owns the VM (the foreground `vm run`, or the detached one).
    #[serde(default)]
    pub supervisor_pid: Option<u32>,
    #[serde(default)]
    pub passt_pid: Option<u32>,
    #[serde(default)]
    pub gvproxy_pid: Option<u32>,
    /// The booted vmlinux; its directory holds the kernel's `provenance.json` (`verify` compares).
    #[serde(default)]
    pub kernel_path: Option<PathBuf>,
    /// The booted rootfs directory, with its `manifest.json`; or a disk root's image, with its
    /// `rootdisk.json` beside it.
    #[serde(default)]
    pub rootfs_dir: Option<PathBuf>,
    /// Where the guest console is recorded (`None`: `vm/console.log`).
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// The child whose death ended the instance, written by its supervisor as it gave up; cleared
    /// by the next boot.
    #[serde(default)]
    pub failure: Option<Failure>,
    /// Set while the supervisor waits out a restart's backoff (`--restart on-failure`), so status
    /// can say "restarting in N s" instead of "running" with no VM; cleared by the boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarting: Option<Restarting>,
    /// Set with [`Self::failure`] when `--restart on-failure` had used up its restarts (how many).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gave_up_after_restarts: Option<u32>,
}

/// A restart the supervisor has scheduled: the `attempt`th of `max`, booting at `boot_at_unix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restarting {
    pub attempt: u32,
    pub max: u32,
    pub boot_at_unix: u64,
}

/// A child of the supervisor that ended while the instance ran, and so ended it. In JSON:
/// `{"child": "passt", "signal": 9, "at_unix": …}` (`exit_code` instead of `signal` for an exit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub child: openshell_vm::Child,
    #[serde(flatten)]
    pub how: openshell_vm::Ended,
    pub at_unix: u64,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.at_unix % 86_400;
        write!(
            f,
            "{} exited ({}) at {:02}:{:02}:{:02} UTC",
            self.child,
            self.how,
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
    let path = path.to_owned();
    move |source| VmError::Io { path, source }
}

/// Copies `from` to `to` (mode included) unless `to` already holds the same bytes.
pub(crate) fn copy_if_changed(from: &Path, to: &Path) -> Result<(), VmError> {
    let bytes = fs::read(from).map_err(io_err(from))?;
    if fs::read(to).is_ok_and(|have| have == bytes) {
        return Ok(());
    }
    fs::copy(from, to).map(drop).map_err(io_err(to))
}

/// Writes `bytes` to `path` unless it already holds them.
pub(crate) fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), VmError> {
    if fs::read(path).is_ok_and(|have| have == bytes) {
        return Ok(());
    }
    fs::write(path, bytes).map_err(io_err(path))
}

pub(crate) fn pki_err(e: openshell_pki::PkiError) -> VmError {
    VmError::Invalid(format!("gateway PKI: {e}"))
}

/// `$XDG_CONFIG_HOME/openshell/gateways`, else `~/.config/openshell/gateways`.
pub fn gateways_root() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("openshell/gateways")
}

impl GatewayInstance {
    pub fn new(root: &Path, name: &str) -> Result<GatewayInstance, VmError> {
        let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(VmError::Invalid(format!("gateway name {name:?}: use letters, digits, '-' and '_'")));
        }
        Ok(GatewayInstance { name: name.to_owned(), dir: root.join(name) })
    }

    pub fn mtls_dir(&self) -> PathBuf {
        self.dir.join("mtls")
    }
    pub(crate) fn server_dir(&self) -> PathBuf {
        self.dir.join("server")
    }
    pub fn vm_dir(&self) -> PathBuf {
        self.dir.join("vm")
    }
    pub fn metadata_path(&self) -> PathBuf {
        self.dir.join("metadata.json")
    }
    /// The guest console of the instance's current (or last) boot.
    pub fn console_path(&self) -> PathBuf {
        self.read_metadata().and_then(|m| m.console_log).unwrap_or_else(|| self.vm_dir().join("console.log"))
    }

    /// Removes the instance's PKI and state (`--reset`). Refused while the instance runs: that
    /// would pull the PKI from under a live gateway, and removing its lock file would let a second
    /// supervisor take a fresh lock on the same name.
    pub fn reset(&self) -> Result<(), VmError> {
        self.ensure_stopped()?;
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&self.dir)(e)),
            _ => Ok(()),
        }
    }

    /// Reuses the stored PKI, or generates it on a cold boot. Returns whether it was generated.
    pub fn ensure_pki(&self) -> Result<bool, VmError> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(io_err(&self.dir))?;
        // Two `vm run`s of a new name at once must not each write half of a PKI: the second waits
        // for the first and then finds it. A lock of its own, held for milliseconds, so it never
        // reads as a running instance.
        let path = self.dir.join("pki.lock");
        let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
        let _pki_lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| VmError::Io { path: path.clone(), source: e.into() })?;
        let have = openshell_pki::load_client_bundle(&self.mtls_dir()).is_ok()
            && openshell_pki::load_server_material(&self.server_dir()).is_ok();
        if have {
            return Ok(false);
        }
        let pki = openshell_pki::Pki::generate(&format!("openshell-{}", self.name)).map_err(pki_err)?;
        pki.write_server_material(&self.server_dir()).map_err(pki_err)?;
        pki.write_client_bundle(&self.mtls_dir()).map_err(pki_err)?;
        Ok(true)
    }

    pub fn client_bundle(&self) -> Result<openshell_gateway::ClientBundle, VmError> {
        let b = openshell_pki::load_client_bundle(&self.mtls_dir()).map_err(pki_err)?;
        Ok(openshell_gateway::ClientBundle { ca_pem: b.ca_pem, cert_pem: b.cert_pem, key_pem: b.key_pem })
    }
    /// The metadata, when there is a readable one.
    pub fn read_metadata(&self) -> Option<Metadata> {
        self.load_metadata().ok().flatten()
    }

    /// The metadata (`None`: never written), or what is wrong with the file, in words a user
    /// can act on: unreadable, truncated, not valid JSON.
    pub fn load_metadata(&self) -> Result<Option<Metadata>, String> {
        let path = self.metadata_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{} cannot be read: {e}", path.display())),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            let how = if e.is_eof() { "truncated" } else { "corrupt" };
            format!("{} is {how} ({e}); the next `vm run` writes a new one", path.display())
        })
    }

    /// What is wrong with the instance's files, one line each, for `vm status`: unreadable
    /// metadata, a console log gone after a boot, a directory others can read (the client key is
    /// in it).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let meta = match self.load_metadata() {
            Ok(m) => m,
            Err(e) => {
                out.push(e);
                None
            }
        };
        if let Some(m) = &meta {
            let console = m.console_log.clone().unwrap_or_else(|| self.vm_dir().join("console.log"));
            if !console.exists() {
                out.push(format!(
                    "the console log {} is gone (deleted?); the next boot starts a new one",
                    console.display()
                ));
            }
        }
        use std::os::unix::fs::PermissionsExt;
        if let Some(mode) = fs::metadata(&self.dir).ok().map(|m| m.permissions().mode() & 0o777) {
            if mode != 0o700 {
                out.push(format!(
                    "{} is mode {mode:o}, not 700: other users may read the client key in it; the next `vm run` sets it back",
                    self.dir.display()
                ));
            }
        }
        out
    }

    /// The pid holding the instance lock, as it wrote it into the lock file (see [`Self::lock`]);
    /// meaningful only while [`Self::locked`].
    pub fn lock_holder(&self) -> Option<u32> {
        fs::read_to_string(self.lock_path()).ok().and_then(|t| t.trim().parse().ok())
    }

    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// Takes the instance lock for as long as the returned value lives, or names who holds it.
    /// The holder writes its pid into the lock file, so a refused twin can name it before the
    /// holder's metadata exists (it is written once the gateway is SERVING).
    pub fn lock(&self) -> Result<nix::fcntl::Flock<fs::File>, VmError> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(io_err(&self.dir))?;
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.lock_path())
            .map_err(io_err(&self.lock_path()))?;
        let lock = try_lock(f).map_err(|_| self.already_running())?;
        use std::io::Write;
        let mut file: &fs::File = &lock;
        file.set_len(0)
            .and_then(|()| file.write_all(std::process::id().to_string().as_bytes()))
            .map_err(io_err(&self.lock_path()))?;
        Ok(lock)
    }

    /// Fails, naming the supervisor, when the instance runs. For a caller about to touch the
    /// instance's files before it takes the lock itself (`vm run` checks this before it builds,
    /// resets or writes anything).
    pub fn ensure_stopped(&self) -> Result<(), VmError> {
        if self.locked() {
            return Err(self.already_running());
        }
        Ok(())
    }

    fn already_running(&self) -> VmError {
        let holder = self
            .lock_holder()
            .or_else(|| self.read_metadata().and_then(|m| m.supervisor_pid))
            .map_or("unknown".into(), |p| p.to_string());
        VmError::Instance(format!(
            "gateway {:?} is already running (supervisor pid {holder}); stop it with `cargo xtask vm stop --name {}`",
            self.name, self.name
        ))
    }

    /// Whether some process holds the instance lock (a live supervisor). On Linux this reads the
    /// kernel's table of locks (`/proc/locks`) and never takes the lock: a test that took it, even
    /// for an instant, would make a supervisor starting in that instant refuse to boot, as if a
    /// twin ran. Elsewhere the lock is taken and released at once, and `try_lock`'s retry keeps
    /// that instant from refusing a supervisor.
    pub fn locked(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            !openshell_vm::procfs::flock_holders(&self.lock_path()).is_empty()
        }
        #[cfg(not(target_os = "linux"))]
        {
            let Ok(f) = fs::OpenOptions::new().write(true).open(self.lock_path()) else { return false };
            try_lock(f).is_err()
        }
    }

    pub fn write_metadata(&self, m: &Metadata) -> Result<(), VmError> {
        let path = self.metadata_path();
        let tmp = self.dir.join(".metadata.json.tmp");
        let json = serde_json::to_vec_pretty(m).expect("metadata serializes");
        fs::write(&tmp, json).and_then(|()| fs::rename(&tmp, &path)).map_err(io_err(&path))?;
        // The active gateway is the one OpenShell's CLI and SDK talk to by default.
        if let Some(active) = self.dir.parent().and_then(active_path) {
            let tmp = active.with_extension(format!("tmp.{}", std::process::id()));
            fs::write(&tmp, &self.name).and_then(|()| fs::rename(&tmp, &active)).map_err(io_err(&active))?;
        }
        Ok(())
    }
}

/// How long a refused attempt at the instance lock is retried before the lock counts as held.
/// Where `locked()` tests the lock by taking and releasing it (not Linux), a probe holds it for
/// microseconds: a supervisor starting at that instant, or a second probe, must not read the
/// probe as a running twin. A real holder keeps it for the instance's life.
const LOCK_PROBE_GRACE: Duration = Duration::from_millis(200);

/// The instance lock on `f`, retried for [`LOCK_PROBE_GRACE`] while another probe may hold it.
fn try_lock(mut f: fs::File) -> Result<nix::fcntl::Flock<fs::File>, nix::errno::Errno> {
    let until = Instant::now() + LOCK_PROBE_GRACE;
    loop {
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < until => f = back,
            Err((_, e)) => return Err(e),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Where OpenShell's CLI and SDK read the active gateway's name: `active_gateway` beside the
/// `gateways/` directory `root` (`$XDG_CONFIG_HOME/openshell/active_gateway`).
fn active_path(root: &Path) -> Option<PathBuf> {
    Some(root.parent()?.join("active_gateway"))
}

/// The instance a CLI talks to by default: the last one that became ready under `root`.
pub fn active(root: &Path) -> Option<String> {
    let name = fs::read_to_string(active_path(root)?).ok()?;
    Some(name.trim().to_owned()).filter(|n| !n.is_empty())
}

/// `gateway_endpoint` as OpenShell's CLI and SDK read it from `metadata.json`: the URL of an
/// mTLS endpoint (`https`, since the bundle beside it is what they present).
pub fn gateway_url(endpoint: &str) -> String {
    format!("https://{endpoint}")
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_the_child_and_how_it_ended_in_json_and_words() {
        let f = Failure {
            child: openshell_vm::Child::Passt,
            how: openshell_vm::Ended::Signal(9),
            at_unix: 86_400 * 3 + 22 * 3600 + 41 * 60 + 58,
        };
        let json = serde_json::to_value(f).unwrap();
        assert_eq!(json, serde_json::json!({"child": "passt", "signal": 9, "at_unix": f.at_unix}));
        assert_eq!(serde_json::from_value::<Failure>(json).unwrap(), f);
        assert_eq!(f.to_string(), "passt exited (signal 9) at 22:41:58 UTC");
        let vmm = Failure { child: openshell_vm::Child::Vmm, how: openshell_vm::Ended::ExitCode(1), at_unix: 0 };
        assert_eq!(
            serde_json::to_value(vmm).unwrap(),
            serde_json::json!({"child": "vmm", "exit_code": 1, "at_unix": 0})
        );
        assert_eq!(vmm.to_string(), "the VMM exited (exit code 1) at 00:00:00 UTC");
    }

    #[test]
    fn metadata_written_before_failures_were_recorded_still_reads() {
        let t = tempfile::tempdir().unwrap();
        let inst = GatewayInstance::new(&t.path().join("gateways"), "t").unwrap();
        fs::create_dir_all(&inst.dir).unwrap();
        let old = r#"{"name":"t","endpoint":"127.0.0.1:1","created_unix":0,"vm_pid":null,"kernel_sha256":"","rootfs_sha256":"","backend":"qemu"}"#;
        fs::write(inst.metadata_path(), old).unwrap();
        assert_eq!(inst.read_metadata().expect("old metadata reads").failure, None);
    }

    /// `vm status` (or `logs -f`, `stop`) testing the lock over and over while supervisors start
    /// and stop: no start may be refused because a test of the lock held it at that instant.
    #[test]
    fn testing_the_lock_never_refuses_a_starting_supervisor() {
        let t = tempfile::tempdir().unwrap();
        let inst = GatewayInstance::new(&t.path().join("gateways"), "t").unwrap();
        drop(inst.lock().unwrap());
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let prober = {
            let (inst, done) = (inst.clone(), std::sync::Arc::clone(&done));
            std::thread::spawn(move || {
                let mut probes = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = inst.locked();
                    probes += 1;
                }
                probes
            })
        };
        let refused = (0..2000).filter(|_| inst.lock().is_err()).count();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let probes = prober.join().unwrap();
        assert!(probes > 0);
        assert_eq!(refused, 0, "{refused} of 2000 starts were refused while the lock was tested {probes} times");
    }

    #[test]
    #[cfg_attr(
        not(target_os = "linux"),
        ignore = "the lock holder is read from /proc/locks, which macOS lacks (there it is named from metadata.json)"
    )]
    fn a_refused_twin_names_the_holder_before_its_metadata_exists() {
        let t = tempfile::tempdir().unwrap();
        let inst = GatewayInstance::new(&t.path().join("gateways"), "t").unwrap();
        let _held = inst.lock().unwrap();
        assert!(inst.read_metadata().is_none());
        let err = inst.lock().unwrap_err().to_string();
        assert!(err.contains(&format!("supervisor pid {}", std::process::id())), "{err}");
        assert!(inst.locked());
    }

    #[test]
    fn reset_is_refused_while_the_instance_runs() {
        let t = tempfile::tempdir().unwrap();
        let inst = GatewayInstance::new(&t.path().join("gateways"), "t").unwrap();
        inst.ensure_pki().unwrap();
        // Held through another open file description, as a supervisor process would hold it.
        let lock = inst.lock().unwrap();
        let err = inst.reset().unwrap_err().to_string();
        assert!(err.contains("already running") && err.contains("vm stop --name t"), "{err}");
        assert!(inst.mtls_dir().join("ca.crt").is_file(), "the PKI of a running instance was removed");
        drop(lock);
        inst.reset().unwrap();
        assert!(!inst.dir.exists(), "reset of a stopped instance left {}", inst.dir.display());
    }
}

//! `cargo xtask vm run`: boot a VM, stream its console, exit with the guest command's exit code.

use std::path::PathBuf;

use clap::builder::ArgPredicate;
use openshell_artifacts::Store;
use std::process::ExitCode;
use std::time::Duration;

use openshell_guest::{ExecRequest, ExecUser};
use openshell_instance::check::{self, Verification};
use openshell_instance::profile::{self, Profile};
use openshell_instance::state::{self, GatewayInstance};
use openshell_instance::supervise;
use openshell_vm::{Overrides, Root, VmConfig, VmmChoice};
use xshell::Shell;

#[derive(clap::Args)]
pub struct VmCmd {
    #[command(subcommand)]
    cmd: VmSub,
}

#[allow(clippy::large_enum_variant)] // parsed once per process
#[derive(clap::Subcommand)]
enum VmSub {
    /// Boot the gateway VM (default), or with --exec run one command and exit with its code; with
    /// --image, boot an OCI image and run its own command (or --exec) and exit with its code
    Run(RunArgs),
    /// Show a gateway instance: running, pids, endpoint, mTLS health (exit 0 only when SERVING)
    Status {
        #[arg(long, default_value = "default")]
        name: String,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Stop a gateway instance (its VM and its passt or gvproxy with it)
    Stop {
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Print a gateway's guest console
    Logs {
        #[arg(long, default_value = "default")]
        name: String,
        /// Keep printing as the console grows, until the instance stops
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("disk_root").args(["root", "image"]).multiple(true))]
#[command(group = clap::ArgGroup::new("one_shot").args(["exec", "image"]).multiple(true))]
#[command(group = clap::ArgGroup::new("instance").args(["name", "reset", "detach", "restart"]).multiple(true))]
struct RunArgs {
    /// Run this command (absolute path inside the guest) instead of the gateway (or instead of
    /// the --image's own command)
    #[arg(long)]
    exec: Option<String>,
    /// Boot this OCI image as the root (an OCI layout directory, an OCI or docker archive, or a
    /// local podman image; `oci:`, `oci-archive:`, `docker-archive:`, `podman:` say which), baked
    /// into a read-only ext4 root disk with a data disk stacked on it, as `--root disk`. The
    /// image's config is the workload: Entrypoint+Cmd as argv (or --exec CMD -- ARGS), its Env
    /// under --env, its WorkingDir under --workdir, its User under --user. Like --exec, the VM is
    /// one-shot, without a gateway instance: it runs that command and exits with its code
    /// (forward its ports with -p)
    #[arg(long, value_name = "REF", value_parser = crate::image::parse_ref, conflicts_with_all = ["instance", "root", "arch", "dhcp"])]
    image: Option<openshell_image::ImageRef>,
    /// Who the --image's command runs as instead of the image's User: NAME, UID, NAME:GROUP or
    /// UID:GID (names from the image's /etc/passwd and /etc/group)
    #[arg(long, requires = "image")]
    user: Option<String>,
    /// Name of the gateway instance (its PKI and state live under $XDG_CONFIG_HOME/openshell/gateways/NAME)
    #[arg(long, default_value = "default", conflicts_with = "exec")]
    name: String,
    /// Throw away the instance's PKI and state first (a cold boot)
    #[arg(long, conflicts_with = "exec")]
    reset: bool,
    /// Seconds to wait for the gateway's mTLS health check to say SERVING, or for --ready's
    /// probe to pass [default: 60]
    #[arg(long)]
    ready_timeout: Option<u64>,
    /// With --exec or --image: wait until the command's service is up, through the -p forward to
    /// the probed guest port: tcp:PORT (a connection the guest keeps), http:PORT[/PATH] (an answer
    /// below 400) or grpc:PORT (plaintext grpc.health.v1 SERVING); then say so and keep running
    /// it in the foreground. A VM that exits first, or a probe still failing after
    /// --ready-timeout, fails the run
    #[arg(long, value_name = "PROBE", requires = "one_shot")]
    ready: Option<openshell_instance::ready::Probe>,
    /// Return once the gateway is ready, leaving it running in the background
    #[arg(long, conflicts_with = "exec")]
    detach: bool,
    /// What to do when passt/gvproxy or the VMM dies under the gateway: no (the instance ends,
    /// `vm status` says why) or on-failure (boot it again on the same port, at most 5 times, after
    /// 1, 2, 4, 8, 16 s; each restart is logged with its cause)
    #[arg(long, value_name = "no|on-failure", default_value = "no", conflicts_with = "exec")]
    restart: supervise::Restart,
    /// The first restart's pause in milliseconds instead of 1000, doubled at each restart.
    /// Hidden: for trials that assert the order of a restart's events without racing its pause
    #[arg(long, hide = true, value_name = "MS", conflicts_with = "exec")]
    restart_backoff_ms: Option<u64>,
    /// Arguments of the command
    #[arg(last = true)]
    args: Vec<String>,
    /// Virtual CPUs [default: 1]
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB (default: the profile's for the gateway, 256 for gateway and 512 for
    /// debian; 512 for --exec)
    #[arg(long)]
    mem: Option<u32>,
    /// Environment for the command, K=V (repeatable)
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory of the command inside the guest
    #[arg(long)]
    workdir: Option<String>,
    /// Also write the guest console to this file
    #[arg(long)]
    console: Option<PathBuf>,
    /// Which VMM: auto (decided from the host), krun (libkrun) or qemu (QEMU microvm)
    #[arg(long, default_value = "auto")]
    vmm: VmmChoice,
    /// Guest network: passt (the Linux default), gvproxy (the macOS default: found on PATH or in
    /// podman's libexec) or none. Forwards bind 127.0.0.1 only
    #[arg(long, value_name = "passt|gvproxy|none", default_value_if("gvproxy", ArgPredicate::IsPresent, "gvproxy"))]
    net: Option<openshell_vm::Net>,
    /// The gvproxy binary to use (implies --net gvproxy)
    #[arg(long, value_name = "PATH")]
    gvproxy: Option<PathBuf>,
    /// Forward 127.0.0.1:HOST to the guest's GUEST port (repeatable; needs a network; HOST 0
    /// picks a free port, which the gateway's metadata records). The gateway's endpoint is the
    /// forward to its port 30051 [default: 30051:30051]
    #[arg(short = 'p', long = "publish", value_name = "HOST:GUEST")]
    ports: Vec<openshell_vm::PortMap>,
    /// Address eth0 by DHCP from the network backend (static fallback) instead of the static
    /// address the host already knows (the default: no DHCP round trip on the boot path)
    #[arg(long)]
    dhcp: bool,
    /// State directory of this --exec VM (default: a fresh temporary directory; a gateway keeps its
    /// state under its instance directory)
    #[arg(long, requires = "one_shot")]
    state_dir: Option<PathBuf>,
    /// Boot even if the kernel or rootfs does not match its recorded sha256 (warns instead of refusing)
    #[arg(long)]
    allow_unverified: bool,
    /// The guest's root: share (the rootfs directory, read-only over virtio-9p/virtio-fs; nothing
    /// written outside the share outlives the guest) or disk (the rootfs as a read-only ext4
    /// image, with a data disk, data.ext4 in the VM's state directory, stacked on it by overlayfs:
    /// what the guest writes is kept across `vm stop`/`vm run`, and `--reset` removes it)
    /// [default: the profile's: share for gateway, disk for debian]
    #[arg(long, value_enum)]
    root: Option<RootFlag>,
    /// Size of the data disk a first disk-root (or `--image`) boot makes, sparse (MiB, or with a
    /// G/M suffix) [default: 4096 MiB]; an existing data disk keeps its size
    #[arg(long, value_name = "SIZE", value_parser = parse_size_mib)]
    disk_size: Option<u64>,
    /// What the VM is: gateway (the gateway on busybox, the default) or debian (the gateway on
    /// Debian bookworm minbase + python3, a disk root with a data disk, 512 MiB); `rootfs
    /// --profile` bakes its root ahead
    #[arg(long, default_value_t = profile::GATEWAY, conflicts_with = "image")]
    profile: Profile,
    /// The guest's architecture (default: the host's). A foreign one (aarch64 on x86_64) boots under
    /// QEMU's emulation with a root of busybox and init only, so it runs --exec commands only
    #[arg(long, requires = "exec")]
    arch: Option<openshell_artifacts::Arch>,
}

/// `--root`: where the guest's root comes from (`vm run`, `bench boot`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RootFlag {
    Share,
    Disk,
}

impl RootFlag {
    /// The root `profile` boots from unless `--root` says otherwise.
    pub fn of(profile: &Profile) -> RootFlag {
        if profile.disk_root {
            RootFlag::Disk
        } else {
            RootFlag::Share
        }
    }

    /// The [`Root`] of a VM booted from `rootfs`: the one place `--root` and `--disk-size` become
    /// one. A disk root's image is baked (or found; the preflight verifies it) here.
    pub fn decide(
        self,
        disk_size: Option<u64>,
        sh: &Shell,
        store: &Store,
        rootfs: &openshell_artifacts::rootfs::RootfsBundle,
    ) -> anyhow::Result<Root> {
        Ok(match self {
            RootFlag::Share if disk_size.is_some() => {
                anyhow::bail!("--disk-size sizes the data disk of --root disk; a share root has none")
            }
            RootFlag::Share => Root::Share,
            RootFlag::Disk => Root::disk(
                crate::artifacts::ensure_root_disk(sh, store, rootfs)?,
                disk_size.unwrap_or(openshell_artifacts::disk::DEFAULT_DATA_DISK_MIB),
            ),
        })
    }
}

/// `4096`, `512M` or `4G`, in MiB.
fn parse_size_mib(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.strip_suffix(['G', 'g']) {
        Some(n) => (n, 1024),
        None => (s.strip_suffix(['M', 'm']).unwrap_or(s), 1),
    };
    num.parse::<u64>().map(|n| n * mul).map_err(|_| format!("--disk-size {s:?}: expected MiB, or a number with M or G"))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("--env {s:?} is not K=V"))?;
    Ok((k.to_owned(), v.to_owned()))
}

impl VmCmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.cmd {
            VmSub::Run(args) => Ok(crate::exit_code(args.run()?)),
            VmSub::Status { name, json } => {
                let st = GatewayInstance::new(&state::gateways_root(), &name)?.status();
                if json {
                    println!("{}", serde_json::to_string_pretty(&st)?);
                } else {
                    println!("{}", status_line(&st));
                }
                Ok(if st.health == "SERVING" { ExitCode::SUCCESS } else { ExitCode::FAILURE })
            }
            VmSub::Stop { name } => {
                let inst = GatewayInstance::new(&state::gateways_root(), &name)?;
                for p in inst.problems() {
                    eprintln!("gateway {name:?}: {p}");
                }
                let stopped = inst.stop(Duration::from_secs(15))?;
                eprintln!("gateway {name:?}: {}", if stopped { "stopped" } else { "was not running" });
                Ok(ExitCode::SUCCESS)
            }
            VmSub::Logs { name, follow } => {
                let inst = GatewayInstance::new(&state::gateways_root(), &name)?;
                let path = inst.console_path();
                if !path.exists() {
                    if inst.read_metadata().is_some() {
                        anyhow::bail!(
                            "{}: the console log of gateway {name:?} is gone (deleted?); the next boot starts a new one",
                            path.display()
                        );
                    }
                    anyhow::bail!("{}: no console yet; has gateway {name:?} ever run?", path.display());
                }
                let mut console = openshell_vm::launch::Tail::new(&path);
                loop {
                    use std::io::Write;
                    // Asked before reading, so the last read takes everything the VM wrote.
                    let running = follow && inst.locked();
                    std::io::stdout().write_all(&console.read_new())?;
                    if !running {
                        if follow {
                            eprintln!("vm logs: gateway {name:?} is not running; nothing more will be written");
                        }
                        return Ok(ExitCode::SUCCESS);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

impl RunArgs {
    /// What the flags say about the VM, for the preset to take: the one place they are read.
    /// The network is decided here for both presets (an `--exec` VM's library preset has none),
    /// since the plan and its install round need it before anything boots.
    fn overrides(&self) -> Overrides {
        Overrides {
            arch: self.arch,
            vcpus: self.vcpus,
            // The profile's memory is the gateway's; an --exec or --image VM keeps its own default.
            mem_mib: self.mem.or((self.exec.is_none() && self.image.is_none()).then_some(self.profile.mem_mib)),
            vmm: Some(self.vmm),
            net: Some(self.net.unwrap_or(openshell_vm::Net::default_for(openshell_vm::host::Os::host()))),
            gvproxy: self.gvproxy.clone(),
            ports: self.ports.clone(),
            dhcp: self.dhcp,
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            console_log: self.console.clone(),
            // Decided in `root` once the image it names exists.
            root: None,
        }
    }

    /// `--root`, or the profile's.
    fn root(&self) -> RootFlag {
        self.root.unwrap_or(RootFlag::of(&self.profile))
    }

    fn run(self) -> anyhow::Result<i32> {
        let mut overrides = self.overrides();
        let arch = overrides.arch.unwrap_or_else(openshell_artifacts::Arch::host);
        let net = overrides.net.expect("overrides() decides the network");
        // A running instance is refused before anything is built, reset or written into its
        // share; the boot takes the lock for real.
        let instance = match (&self.exec, &self.image) {
            (Some(_), _) | (_, Some(_)) => None,
            (None, None) => {
                let inst = GatewayInstance::new(&state::gateways_root(), &self.name)?;
                inst.ensure_stopped()?;
                Some(inst)
            }
        };
        let sh = Shell::new()?;
        let store = Store::default_location();
        // One install round for all of it (and openshell-vmm built when the plan needs it), before
        // the kernel build asks for its share.
        crate::artifacts::ensure_vmm(&sh, self.vmm, net, self.gvproxy.as_deref(), arch)?;
        let kernel =
            crate::artifacts::ensure_kernel(&sh, &store, openshell_artifacts::kernel::KernelRole::Guest, arch)?;
        let rootfs = crate::artifacts::profile_root(&sh, &store, &self.profile, arch, true)?;
        let verification = if self.allow_unverified { Verification::AllowUnverified } else { Verification::Required };
        if instance.is_none() && self.ready.is_none() && self.ready_timeout.is_some() {
            anyhow::bail!("--ready-timeout bounds the wait for --ready PROBE (or for a gateway): add --ready");
        }
        if let Some(image) = &self.image {
            let base = self.image_workload(&sh, &store, &rootfs, image, &mut overrides)?;
            return self.run_exec(kernel.vmlinux, rootfs.dir, base, &overrides, verification);
        }
        overrides.root = Some(self.root().decide(self.disk_size, &sh, &store, &rootfs)?);
        let Some(inst) = instance else {
            let mut argv = vec![self.exec.clone().expect("exec mode")];
            argv.extend(self.args.clone());
            let base = ExecRequest { argv, env: Vec::new(), workdir: None, user: None };
            return self.run_exec(kernel.vmlinux, rootfs.dir, base, &overrides, verification);
        };
        if self.reset {
            inst.reset()?;
        }
        let cold = inst.ensure_pki()?;
        let digests = (kernel.provenance.vmlinux_sha256.hex(), rootfs.digest().hex());
        let mut req = supervise::Request::new(&state::gateways_root(), &self.name, kernel.vmlinux, rootfs.dir, digests);
        req.vm = overrides;
        if let Some(s) = self.ready_timeout {
            req.ready_timeout = Duration::from_secs(s);
        }
        req.verification = verification;
        req.restart = match self.restart_backoff_ms {
            Some(ms) => self.restart.with_backoff(Duration::from_millis(ms)),
            None => self.restart,
        };
        let pki = if cold { "new PKI" } else { "reused PKI" };
        if self.detach {
            // What the supervisor's recovery will repair (its log says it did), said here too.
            for p in inst.problems() {
                eprintln!("gateway {:?}: {p}", inst.name);
            }
            // Refuse here, in the caller's terminal; the supervisor checks again before it boots.
            let preflight = check::preflight(req.config()?, verification);
            // A twin `vm run --name` started since the first check holds the port by now: say
            // that the instance runs, not that its port is in use.
            inst.ensure_stopped()?;
            show_warnings(&preflight?);
            let supervisor = crate::artifacts::build_supervisor(&sh)?;
            let up = supervise::detach(&supervisor, &req)?;
            eprintln!(
                "gateway {:?} SERVING over mTLS at {} ({pki}; supervisor pid {}); `cargo xtask vm status --name {}`",
                inst.name,
                up.endpoint,
                up.child.id(),
                inst.name
            );
            return Ok(0);
        }
        let mut up = req.boot()?;
        show_warnings(&up.preflight);
        for line in &up.recovered {
            eprintln!("gateway {:?}: recovered stale state: {line}", inst.name);
        }
        eprintln!("vm: {} ({})", up.vm.backend, up.vm.backend_reason);
        let console = std::fs::read_to_string(&up.vm.console).unwrap_or_default();
        eprintln!("{}", openshell_vm::timeline::render(&console, up.ready));
        eprintln!(
            "gateway {:?} SERVING over mTLS at {} after {:.2}s ({pki}); client bundle: {}",
            inst.name,
            up.endpoint,
            up.ready.as_secs_f64(),
            inst.mtls_dir().display()
        );
        eprintln!("Ctrl-C stops it.");
        let exit = up.wait(Some(&mut std::io::stdout()), req.restart)?;
        eprintln!("vm: {exit} after {:.2}s", up.vm.started.elapsed().as_secs_f64());
        Ok(exit.code())
    }

    /// `vm run --image`: the image's root disk (baked unless the store has it) as the root, and
    /// what the image says to run as the command the flags then override: Entrypoint+Cmd unless
    /// --exec, its Env (then --env, applied by `VmConfig::update`), its WorkingDir (unless
    /// --workdir), its User (unless --user) resolved to numbers from the image's own files.
    fn image_workload(
        &self,
        sh: &Shell,
        store: &Store,
        rootfs: &openshell_artifacts::rootfs::RootfsBundle,
        image: &openshell_image::ImageRef,
        overrides: &mut Overrides,
    ) -> anyhow::Result<ExecRequest> {
        let r = crate::artifacts::ensure_image_root(sh, store, rootfs, image)?;
        tracing::info!(disk = %r.disk.image.display(), image = %r.image.dir.display(), "image root");
        overrides.root = Some(Root::Disk {
            image: r.disk.image.clone(),
            data_mib: self.disk_size.unwrap_or(openshell_artifacts::disk::DEFAULT_DATA_DISK_MIB),
            init: openshell_guest::IMAGE_INIT_BIN.to_owned(),
        });
        let w = r.image.workload();
        let argv = match &self.exec {
            Some(exec) => std::iter::once(exec.clone()).chain(self.args.iter().cloned()).collect(),
            None if w.argv.is_empty() => anyhow::bail!(
                "the image names no command (no Entrypoint or Cmd): pass --exec CMD [-- ARGS] to say what to run in it"
            ),
            None if !self.args.is_empty() => anyhow::bail!(
                "arguments after -- go with --exec; the image's own command is {:?}: pass --exec {} -- ARGS to change it",
                w.argv,
                w.argv[0]
            ),
            None => w.argv.clone(),
        };
        let mut env = w.env;
        let user = match self.user.as_deref().or(w.user.as_deref()) {
            Some(spec) => {
                let u = openshell_image::resolve_user(&r.image.root(), spec)?;
                // As container runtimes do: the user's own home unless the image sets HOME (init's
                // default, /root, is not a non-root user's to write).
                if let Some(home) = u.home.filter(|_| !env.iter().any(|(k, _)| k == "HOME")) {
                    env.push(("HOME".into(), home));
                }
                Some(ExecUser { uid: u.uid, gid: u.gid, groups: u.groups })
            }
            None => None,
        };
        Ok(ExecRequest { argv, env, workdir: Some(w.cwd), user })
    }

    /// `vm run --exec` and `--image`: one command in a VM of its own (no instance), preflight
    /// first. `base` is the command before the flags' overrides.
    fn run_exec(
        self,
        kernel: PathBuf,
        rootfs: PathBuf,
        base: ExecRequest,
        overrides: &Overrides,
        verification: Verification,
    ) -> anyhow::Result<i32> {
        // Lives as long as the VM: a one-shot --exec VM without --state-dir runs in a temp dir.
        let mut tmp = None;
        let state_dir = match &self.state_dir {
            Some(d) => d.clone(),
            None => tmp.insert(tempfile::Builder::new().prefix("openshell-vm-").tempdir()?).path().to_owned(),
        };
        let mut cfg = VmConfig::exec(kernel, rootfs, state_dir, Vec::new());
        cfg.exec = base;
        cfg.update(overrides);
        // Refused before anything boots: a probe of a port no forward reaches.
        let ready = match &self.ready {
            Some(p) => Some((p, p.endpoint(&cfg.ports)?)),
            None => None,
        };
        let (mut vm, preflight) = check::launch_checked(&cfg, verification)?;
        show_warnings(&preflight);
        eprintln!("vm: {} ({})", vm.backend, vm.backend_reason);
        // A forward of host port 0 has its port now, in the checked config.
        let ready = match ready {
            Some((p, _)) => Some((p, p.endpoint(&preflight.planned.cfg().ports)?)),
            None => None,
        };
        for p in
            preflight.planned.cfg().ports.iter().filter(|p| cfg.ports.iter().any(|c| c.host == 0 && c.guest == p.guest))
        {
            eprintln!("vm: forwarding 127.0.0.1:{} to the guest's port {}", p.host, p.guest);
        }
        // A Ctrl-C while it waits for readiness stops the guest as one during the run does.
        let mut asked = None;
        if let Some((probe, endpoint)) = ready {
            let signals = openshell_vm::launch::StopSignals::register();
            let timeout = self.ready_timeout.map_or(supervise::READY_TIMEOUT, Duration::from_secs);
            match openshell_instance::ready::wait(&mut vm, probe, &endpoint, timeout, Some(&signals)) {
                Ok(after) => {
                    eprintln!("vm: ready: {probe} {} at {endpoint} after {:.2}s", probe.said(), after.as_secs_f64())
                }
                Err(openshell_vm::VmError::StopRequested(sig)) => asked = Some(sig),
                Err(e) => match tmp.map(tempfile::TempDir::keep) {
                    Some(kept) => anyhow::bail!("{e}\n(state directory kept for inspection: {})", kept.display()),
                    None => return Err(e.into()),
                },
            }
        }
        let exit = match vm.wait_asked(Some(&mut std::io::stdout()), None, asked) {
            Ok(exit) => exit,
            // The error names the console in the temporary state directory: keep it to be read.
            Err(e) => match tmp.map(tempfile::TempDir::keep) {
                Some(kept) => anyhow::bail!("{e}\n(state directory kept for inspection: {})", kept.display()),
                None => return Err(e.into()),
            },
        };
        eprintln!("vm: {exit} after {:.2}s", vm.started.elapsed().as_secs_f64());
        Ok(exit.code())
    }
}

/// The preflight's WARN rows (an unverified artifact booted with --allow-unverified, a slow
/// backend), so nothing it let through goes unsaid.
fn show_warnings(p: &check::Preflight) {
    for r in p.warnings() {
        eprintln!("warning: {}: {}", r.id, r.reason);
    }
}

/// `vm status` for a person: one line, then one per problem with its files; no Rust `Debug` forms.
fn status_line(st: &openshell_instance::status::Status) -> String {
    let problems: String = st.problems.iter().map(|p| format!("\n  problem: {p}")).collect();
    format!("{}{problems}", status_summary(st))
}

/// [`status_line`] without the instance's file problems.
fn status_summary(st: &openshell_instance::status::Status) -> String {
    let name = &st.name;
    let pid = |p: Option<u32>| p.map_or("-".to_owned(), |p| p.to_string());
    let endpoint = st.endpoint.as_deref().unwrap_or("-");
    match (&st.restarting, &st.failure) {
        (Some(r), Some(failure)) => {
            return format!(
                "gateway {name:?}: restarting in {} s after {failure} (restart {}/{}) at {endpoint}; supervisor {}; \
                 `cargo xtask vm stop --name {name}` stops it",
                st.restart_in().unwrap_or(0),
                r.attempt,
                r.max,
                pid(st.supervisor_pid)
            )
        }
        (None, Some(failure)) if !st.running => {
            let gave_up = st.gave_up_after_restarts.map_or(String::new(), |n| format!("; gave up after {n} restarts"));
            return format!(
                "gateway {name:?}: failed: {failure}{gave_up}; nothing left running; start it again with cargo xtask vm run --name {name}"
            );
        }
        _ => {}
    }
    if !st.stale.is_empty() {
        return format!(
            "gateway {name:?}: stopped, but a supervisor that died left records behind ({}); \
             `cargo xtask vm stop --name {name}` clears them",
            st.stale.join("; ")
        );
    }
    format!(
        "gateway {name:?}: {} at {endpoint} (supervisor {}, vm {}); health: {}; client bundle: {}",
        if st.running { "running" } else { "stopped" },
        pid(st.supervisor_pid),
        pid(st.vm_pid),
        st.health,
        st.mtls_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use openshell_instance::preset::{GATEWAY_MEM_MIB, GATEWAY_PORT};
    use openshell_vm::config::{DEFAULT_VCPUS, EXEC_MEM_MIB};
    use openshell_vm::{Net, PortMap};

    use super::*;

    fn run_args(flags: &[&str]) -> RunArgs {
        let argv = ["xtask", "vm", "run"].iter().chain(flags);
        match crate::flags::Cli::try_parse_from(argv).unwrap().cmd {
            crate::flags::Cmd::Vm(VmCmd { cmd: VmSub::Run(a) }) => a,
            _ => unreachable!("parsed as vm run"),
        }
    }

    /// The gateway VM `vm run FLAGS` boots: the preset with the flags' overrides applied once.
    fn gateway(flags: &[&str]) -> VmConfig {
        let t = tempfile::tempdir().unwrap();
        let inst = GatewayInstance::new(&t.path().join("gateways"), "t").unwrap();
        inst.ensure_pki().unwrap();
        inst.vm_config("/k".into(), "/r".into(), ("a", "b"), &run_args(flags).overrides()).unwrap()
    }

    #[test]
    fn without_flags_the_gateway_is_the_preset() {
        let cfg = gateway(&[]);
        assert_eq!((cfg.vcpus, cfg.mem_mib), (DEFAULT_VCPUS, GATEWAY_MEM_MIB));
        assert_eq!(cfg.ports, [PortMap { host: GATEWAY_PORT, guest: GATEWAY_PORT }]);
        assert_eq!(cfg.net, Net::default_for(openshell_vm::host::Os::host()));
        assert!(!cfg.dhcp && cfg.exec.workdir.is_none() && cfg.console_log.is_none());
    }

    #[test]
    fn each_flag_lands_once() {
        let cfg = gateway(&[
            "--vcpus",
            "3",
            "--mem",
            "700",
            "--net",
            "gvproxy",
            "-p",
            "8080:80",
            "-p",
            "40051:30051",
            "--env",
            "A=1",
            "--env",
            "A=2",
            "--workdir",
            "/srv",
            "--dhcp",
            "--vmm",
            "qemu",
            "--console",
            "/c.log",
        ]);
        assert_eq!((cfg.vcpus, cfg.mem_mib, cfg.net, cfg.vmm), (3, 700, Net::Gvproxy, VmmChoice::Qemu));
        assert_eq!(cfg.ports, [PortMap { host: 8080, guest: 80 }, PortMap { host: 40051, guest: GATEWAY_PORT }]);
        assert_eq!(openshell_instance::preset::endpoint(&cfg).unwrap(), "127.0.0.1:40051");
        // The last --env of a name wins, and the name appears once.
        assert_eq!(cfg.exec.env.iter().filter(|(k, _)| k == "A").collect::<Vec<_>>(), [&("A".into(), "2".into())]);
        assert_eq!((cfg.exec.workdir.as_deref(), cfg.dhcp), (Some("/srv"), true));
        assert_eq!(cfg.console_log.as_deref(), Some(std::path::Path::new("/c.log")));
    }

    /// Help cannot read a constant, so it is held to them: a default changed in its one place
    /// fails here until the help says the same.
    #[test]
    fn the_help_states_the_defaults_defined_once() {
        let mut cmd = crate::flags::Cli::command();
        let run = cmd.find_subcommand_mut("vm").unwrap().find_subcommand_mut("run").unwrap();
        let help = |id: &str| {
            let arg = run.get_arguments().find(|a| a.get_id() == id).unwrap();
            arg.get_help().unwrap().to_string()
        };
        assert!(help("vcpus").contains(&format!("[default: {DEFAULT_VCPUS}]")), "{}", help("vcpus"));
        let mem = help("mem");
        let want = format!(
            "{GATEWAY_MEM_MIB} for gateway and {} for debian; {EXEC_MEM_MIB} for --exec",
            profile::DEBIAN.mem_mib
        );
        assert!(mem.replace('\n', " ").contains(&want), "{mem}");
        let ready = help("ready_timeout");
        assert!(ready.contains(&format!("[default: {}]", supervise::READY_TIMEOUT.as_secs())), "{ready}");
        let ports = help("ports");
        assert!(ports.contains(&format!("[default: {GATEWAY_PORT}:{GATEWAY_PORT}]")), "{ports}");
        let size = help("disk_size");
        let default = openshell_artifacts::disk::DEFAULT_DATA_DISK_MIB;
        assert!(size.contains(&format!("[default: {default} MiB]")), "{size}");
    }

    #[test]
    fn root_is_the_profiles_unless_asked_and_disk_size_reads_units() {
        assert!(run_args(&[]).root() == RootFlag::Share && run_args(&[]).disk_size.is_none());
        assert!(run_args(&["--profile", "debian"]).root() == RootFlag::Disk);
        assert!(run_args(&["--profile", "debian", "--root", "share"]).root() == RootFlag::Share);
        let a = run_args(&["--root", "disk", "--disk-size", "2G"]);
        assert!(a.root() == RootFlag::Disk);
        assert_eq!(a.disk_size, Some(2048));
        assert_eq!(run_args(&["--root", "disk", "--disk-size", "300M"]).disk_size, Some(300));
        assert_eq!(run_args(&["--root", "disk", "--disk-size", "300"]).disk_size, Some(300));
        assert!(
            crate::flags::Cli::try_parse_from(["xtask", "vm", "run", "--root", "disk", "--disk-size", "x"]).is_err()
        );
        // --image is a disk root: it takes --disk-size, and refuses what only a gateway or our own
        // rootfs has.
        assert_eq!(run_args(&["--image", "oci:/x", "--disk-size", "1G"]).disk_size, Some(1024));
        for clash in [&["--root", "disk"][..], &["--name", "a"], &["--detach"], &["--dhcp"], &["--arch", "aarch64"]] {
            let argv = ["xtask", "vm", "run", "--image", "oci:/x"].into_iter().chain(clash.iter().copied());
            assert!(crate::flags::Cli::try_parse_from(argv).is_err(), "--image with {clash:?}");
        }
        assert!(
            crate::flags::Cli::try_parse_from(["xtask", "vm", "run", "--user", "1"]).is_err(),
            "--user without --image"
        );
        let a = run_args(&["--image", "oci:/x", "--exec", "/bin/sh", "--state-dir", "/s", "--", "-c", "id"]);
        assert_eq!((a.exec.as_deref(), a.args.len()), (Some("/bin/sh"), 2));
        // Without a disk the flags decide nothing about the root: `root` does, once the image exists.
        assert_eq!(run_args(&["--root", "disk"]).overrides().root, None);
    }

    #[test]
    fn the_profile_decides_the_gateways_memory_not_an_execs() {
        assert_eq!(run_args(&[]).overrides().mem_mib, Some(GATEWAY_MEM_MIB));
        assert_eq!(run_args(&["--profile", "debian"]).overrides().mem_mib, Some(profile::DEBIAN.mem_mib));
        assert_eq!(run_args(&["--profile", "debian", "--mem", "300"]).overrides().mem_mib, Some(300));
        assert_eq!(run_args(&["--exec", "/bin/true"]).overrides().mem_mib, None);
        assert_eq!(run_args(&["--image", "oci:/x"]).overrides().mem_mib, None);
        let err = crate::flags::Cli::try_parse_from(["xtask", "vm", "run", "--profile", "ubuntu"]).err().unwrap();
        assert!(err.to_string().contains("the profiles are: gateway, debian"), "{err}");
    }
}

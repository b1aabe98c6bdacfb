//! `cargo xtask vm run`: boot a VM, stream its console, exit with the guest command's exit code.

use std::path::PathBuf;

use clap::builder::ArgPredicate;
use openshell_artifacts::Store;
use std::time::Duration;

use openshell_instance::check::{self, Verification};
use openshell_instance::gateway::{self, GatewayInstance};
use openshell_vm::{VmConfig, VmmChoice};
use xshell::Shell;

#[derive(clap::Args)]
pub struct VmCmd {
    #[command(subcommand)]
    cmd: VmSub,
}

#[allow(clippy::large_enum_variant)] // parsed once per process
#[derive(clap::Subcommand)]
enum VmSub {
    /// Boot the gateway VM (default), or with --exec run one command and exit with its code
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
struct RunArgs {
    /// Run this command (absolute path inside the guest) instead of the gateway
    #[arg(long)]
    exec: Option<String>,
    /// Name of the gateway instance (its PKI and state live under $XDG_CONFIG_HOME/openshell/gateways/NAME)
    #[arg(long, default_value = "default", conflicts_with = "exec")]
    name: String,
    /// Throw away the instance's PKI and state first (a cold boot)
    #[arg(long, conflicts_with = "exec")]
    reset: bool,
    /// Seconds to wait for the gateway's mTLS health check to say SERVING
    #[arg(long, default_value_t = 60, conflicts_with = "exec")]
    ready_timeout: u64,
    /// Return once the gateway is ready, leaving it running in the background
    #[arg(long, conflicts_with = "exec")]
    detach: bool,
    /// What to do when passt/gvproxy or the VMM dies under the gateway: no (the instance ends,
    /// `vm status` says why) or on-failure (boot it again on the same port, at most 5 times, after
    /// 1, 2, 4, 8, 16 s; each restart is logged with its cause)
    #[arg(long, value_name = "no|on-failure", default_value = "no", conflicts_with = "exec")]
    restart: openshell_instance::supervise::Restart,
    /// Arguments of the command
    #[arg(last = true)]
    args: Vec<String>,
    /// Virtual CPUs
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB
    #[arg(long, default_value_t = 512)]
    mem: u32,
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
    net: Option<openshell_vm::net::NetChoice>,
    /// The gvproxy binary to use (implies --net gvproxy)
    #[arg(long, value_name = "PATH")]
    gvproxy: Option<PathBuf>,
    /// Forward 127.0.0.1:HOST to the guest's GUEST port (repeatable; needs a network)
    #[arg(short = 'p', long = "publish", value_name = "HOST:GUEST")]
    ports: Vec<openshell_vm::PortMap>,
    /// Address eth0 by DHCP from the network backend (static fallback) instead of the static
    /// address the host already knows (the default: no DHCP round trip on the boot path)
    #[arg(long)]
    dhcp: bool,
    /// State directory of this --exec VM (default: a fresh temporary directory; a gateway keeps its
    /// state under its instance directory)
    #[arg(long, requires = "exec")]
    state_dir: Option<PathBuf>,
    /// Boot even if the kernel or rootfs does not match its recorded sha256 (warns instead of refusing)
    #[arg(long)]
    allow_unverified: bool,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("--env {s:?} is not K=V"))?;
    Ok((k.to_owned(), v.to_owned()))
}

impl VmCmd {
    pub fn run(self) -> anyhow::Result<()> {
        match self.cmd {
            VmSub::Run(args) => {
                let code = args.run()?;
                std::process::exit(code);
            }
            VmSub::Status { name, json } => {
                let st = GatewayInstance::new(&gateway::gateways_root(), &name)?.status();
                if json {
                    println!("{}", serde_json::to_string_pretty(&st)?);
                } else {
                    println!("{}", status_line(&st));
                }
                std::process::exit(if st.health == "SERVING" { 0 } else { 1 });
            }
            VmSub::Stop { name } => {
                let inst = GatewayInstance::new(&gateway::gateways_root(), &name)?;
                let stopped = inst.stop(Duration::from_secs(15))?;
                eprintln!("gateway {name:?}: {}", if stopped { "stopped" } else { "was not running" });
                Ok(())
            }
            VmSub::Logs { name, follow } => {
                let inst = GatewayInstance::new(&gateway::gateways_root(), &name)?;
                let path = inst.console_path();
                if !path.exists() {
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
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

impl RunArgs {
    fn run(self) -> anyhow::Result<i32> {
        // Before any build: a missing gvproxy should not cost a kernel build to find out.
        let net = openshell_vm::NetMode::resolve(self.net, self.gvproxy.clone())?;
        // A running instance is refused before anything is built, reset or written into its
        // share; `supervise::boot` takes the lock for real.
        let instance = match &self.exec {
            Some(_) => None,
            None => {
                let inst = GatewayInstance::new(&gateway::gateways_root(), &self.name)?;
                inst.ensure_stopped()?;
                Some(inst)
            }
        };
        let sh = Shell::new()?;
        let store = Store::default_location();
        // One install round for all of it, before the kernel build asks for its share.
        let host = openshell_vm::HostFacts::probe();
        crate::deps::ensure(&sh, &crate::artifacts::boot_packages(&net, self.vmm, &host))?;
        let kernel = crate::artifacts::ensure_kernel(&sh, &store, openshell_artifacts::kernel::KernelRole::Guest)?;
        let rootfs = crate::artifacts::ensure_rootfs(&sh, &store)?;
        // Lives as long as the VM: a one-shot --exec VM without --state-dir runs in a temp dir.
        let mut tmp = None;
        let gateway = match instance {
            None => None,
            Some(inst) => {
                if self.reset {
                    inst.reset()?;
                }
                let cold = inst.ensure_pki()?;
                let port = self.ports.first().map_or(gateway::GATEWAY_PORT, |p| p.host);
                let digests = (kernel.provenance.vmlinux_sha256.hex(), rootfs.digest().hex());
                let cfg = inst.vm_config(
                    kernel.vmlinux.clone(),
                    rootfs.dir.clone(),
                    (&digests.0, &digests.1),
                    port,
                    net.clone(),
                )?;
                Some((inst, cfg, cold, digests))
            }
        };
        let mut cfg = match &gateway {
            Some((_, cfg, _, _)) => cfg.clone(),
            None => {
                let mut argv = vec![self.exec.clone().expect("exec mode")];
                argv.extend(self.args.clone());
                let state_dir = match &self.state_dir {
                    Some(d) => d.clone(),
                    None => tmp.insert(tempfile::Builder::new().prefix("openshell-vm-").tempdir()?).path().to_owned(),
                };
                let mut cfg = VmConfig::exec(kernel.vmlinux.clone(), rootfs.dir.clone(), state_dir, argv);
                cfg.net = net;
                cfg.ports = self.ports.clone();
                cfg
            }
        };
        cfg.vcpus = self.vcpus;
        cfg.mem_mib = self.mem;
        cfg.exec.env = self.env;
        cfg.exec.workdir = self.workdir;
        cfg.console_log = self.console;
        cfg.vmm = self.vmm;
        cfg.dhcp = self.dhcp;
        crate::artifacts::ensure_vmm(&sh, cfg.vmm, &cfg.net)?;
        let verification = if self.allow_unverified { Verification::AllowUnverified } else { Verification::Required };
        if self.detach {
            let (inst, ..) = gateway.as_ref().expect("detach is gateway-only");
            // Refuse here, in the caller's terminal; the supervisor checks again before it boots.
            show_warnings(&check::preflight(&cfg, verification)?);
            let (_, _, cold, _) = gateway.as_ref().expect("detach is gateway-only");
            return detach(inst, self.ready_timeout, *cold);
        }
        let mut vm = match &gateway {
            Some((inst, _, cold, digests)) => {
                let up = openshell_instance::supervise::boot(
                    inst,
                    &cfg,
                    (&digests.0, &digests.1),
                    Duration::from_secs(self.ready_timeout),
                    verification,
                )?;
                show_warnings(&up.preflight);
                for line in &up.recovered {
                    eprintln!("gateway {:?}: recovered stale state: {line}", inst.name);
                }
                eprintln!("vm: {} ({})", up.vm.backend, up.vm.backend_reason);
                print_timeline(&up.vm.console, up.ready);
                eprintln!(
                    "gateway {:?} SERVING over mTLS at {} after {:.2}s ({} PKI); client bundle: {}",
                    inst.name,
                    up.endpoint,
                    up.ready.as_secs_f64(),
                    if *cold { "new" } else { "reused" },
                    inst.mtls_dir().display()
                );
                eprintln!("Ctrl-C stops it.");
                Running::Gateway(up)
            }
            None => {
                let (vm, preflight) = check::launch_checked(&cfg, verification)?;
                show_warnings(&preflight);
                eprintln!("vm: {} ({})", vm.backend, vm.backend_reason);
                Running::Exec(vm)
            }
        };
        let mut out = std::io::stdout();
        let (exit, started) = match &mut vm {
            Running::Gateway(up) => (up.wait(Some(&mut out), self.restart)?, up.vm.started),
            Running::Exec(vm) => (vm.wait(Some(&mut out), None)?, vm.started),
        };
        eprintln!("vm: {exit} after {:.2}s", started.elapsed().as_secs_f64());
        Ok(exit.code())
    }
}

/// The foreground VM: a supervised gateway (holding its instance lock) or a one-shot command.
#[allow(clippy::large_enum_variant)] // one per process
enum Running {
    Gateway(openshell_instance::supervise::Supervised),
    Exec(openshell_vm::RunningVm),
}

/// The preflight's WARN rows (an unverified artifact booted with --allow-unverified, a slow
/// backend), so nothing it let through goes unsaid.
fn show_warnings(p: &check::Preflight) {
    for r in p.warnings() {
        eprintln!("warning: {}: {}", r.id, r.reason);
    }
}

/// The boot timeline: init's millisecond stamps (guest clock since boot) and host-side readiness.
fn print_timeline(console: &std::path::Path, ready: Duration) {
    // Two clocks: the host's from VMM start, the guest's from its kernel's start (the VMM's own
    // startup, ~0.1-0.3 s under TCG, sits between them and is not observable from either).
    let text = std::fs::read_to_string(console).unwrap_or_default();
    eprintln!("boot timeline (host: ms since VMM start; guest: ms since its kernel started):");
    eprintln!("  host  {:>6} ms  VMM started", 0);
    eprintln!("  guest {:>6} ms  kernel started", 0);
    for (ms, what) in openshell_vm::timeline::guest_steps(&text) {
        eprintln!("  guest {ms:>6} ms  {what}");
    }
    eprintln!("  host  {:>6} ms  mTLS health SERVING", ready.as_millis());
}

/// Re-runs this `vm run` without `--detach` as a background supervisor (its own session, output to
/// `supervisor.log`), and returns when it reports ready, or fails with its log when it exits.
fn detach(inst: &GatewayInstance, ready_timeout: u64, cold: bool) -> anyhow::Result<i32> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--detach" && a != "--reset").collect();
    let log_path = inst.dir.join("supervisor.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(&args).stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the supervisor from our terminal.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(ready_timeout + 30);
    loop {
        if let Some(m) = inst.read_metadata().filter(|m| m.supervisor_pid == Some(child.id())) {
            // The supervisor finds the PKI this process generated, so only we know it was new.
            let pki = if cold { "new PKI" } else { "reused PKI" };
            eprintln!(
                "gateway {:?} SERVING over mTLS at {} ({pki}; supervisor pid {}); `cargo xtask vm status --name {}`",
                inst.name,
                m.endpoint,
                child.id(),
                inst.name
            );
            return Ok(0);
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            anyhow::bail!("the gateway supervisor exited ({status}) before it was ready:\n{log}");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the gateway was not ready within {}s; see {}", ready_timeout + 30, log_path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `vm status` for a person: one line, no Rust `Debug` forms.
fn status_line(st: &openshell_instance::status::Status) -> String {
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
            return format!(
                "gateway {name:?}: failed: {failure}; nothing left running; start it again with cargo xtask vm run --name {name}"
            )
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

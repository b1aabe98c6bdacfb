//! `cargo xtask vm run`: boot a VM, stream its console, exit with the guest command's exit code.

use std::path::PathBuf;

use openshell_artifacts::Store;
use std::time::Duration;

use openshell_vm::gateway::{self, GatewayInstance};
use openshell_vm::{VmConfig, VmmChoice};
use xshell::Shell;

#[derive(clap::Args)]
pub struct VmCmd {
    #[command(subcommand)]
    cmd: VmSub,
}

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
    /// Stop a gateway instance (its VM and passt with it)
    Stop {
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Print a gateway's guest console
    Logs {
        #[arg(long, default_value = "default")]
        name: String,
        /// Keep printing as the console grows
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
    /// Guest network for --exec: passt (user-mode, forwards bound to 127.0.0.1) or none (the gateway always uses passt)
    #[arg(long, default_value = "none")]
    net: openshell_vm::NetMode,
    /// Forward 127.0.0.1:HOST to the guest's GUEST port (repeatable; needs --net passt)
    #[arg(short = 'p', long = "publish", value_name = "HOST:GUEST", requires = "net")]
    ports: Vec<openshell_vm::PortMap>,
    /// State directory of this VM (default: a fresh temporary directory)
    #[arg(long)]
    state_dir: Option<PathBuf>,
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
                    println!(
                        "gateway {:?}: {} at {} (supervisor {:?}, vm {:?}); health: {}; client bundle: {}",
                        st.name,
                        if st.running { "running" } else { "stopped" },
                        st.endpoint.as_deref().unwrap_or("-"),
                        st.supervisor_pid,
                        st.vm_pid,
                        st.health,
                        st.mtls_dir.display()
                    );
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
                let path = inst.vm_dir().join("console.log");
                let mut pos = 0u64;
                loop {
                    let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}; has gateway {name:?} ever run?", path.display()))?;
                    if (bytes.len() as u64) > pos {
                        use std::io::Write;
                        std::io::stdout().write_all(&bytes[pos as usize..])?;
                        pos = bytes.len() as u64;
                    }
                    if !follow {
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
        let sh = Shell::new()?;
        let store = Store::default_location();
        let kernel = crate::artifacts::ensure_kernel(&sh, &store)?;
        let rootfs = crate::artifacts::ensure_rootfs(&sh, &store)?;
        let tmp;
        let state_dir = match self.state_dir {
            Some(d) => d,
            None => {
                tmp = tempfile::Builder::new().prefix("openshell-vm-").tempdir()?;
                tmp.path().to_owned()
            }
        };
        let gateway = match &self.exec {
            Some(_) => None,
            None => {
                let inst = GatewayInstance::new(&gateway::gateways_root(), &self.name)?;
                if self.reset {
                    inst.reset()?;
                }
                let cold = inst.ensure_pki()?;
                let port = self.ports.first().map_or(gateway::GATEWAY_PORT, |p| p.host);
                let digests = (kernel.provenance.vmlinux_sha256.hex(), rootfs.digest().hex());
                let cfg = inst.vm_config(kernel.vmlinux.clone(), rootfs.dir.clone(), (&digests.0, &digests.1), port)?;
                Some((inst, cfg, cold, digests))
            }
        };
        let mut cfg = match &gateway {
            Some((_, cfg, _, _)) => cfg.clone(),
            None => {
                let mut argv = vec![self.exec.clone().expect("exec mode")];
                argv.extend(self.args.clone());
                let mut cfg = VmConfig::exec(kernel.vmlinux.clone(), rootfs.dir.clone(), state_dir, argv);
                cfg.net = self.net;
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
        crate::artifacts::ensure_vmm(&sh, &mut cfg)?;
        if self.detach {
            let (inst, ..) = gateway.as_ref().expect("detach is gateway-only");
            return detach(inst, self.ready_timeout);
        }
        let _lock = match &gateway {
            Some((inst, ..)) => Some(inst.lock()?),
            None => None,
        };
        let mut vm = openshell_vm::launch(&cfg)?;
        eprintln!("vm: {} ({})", vm.backend, vm.backend_reason);
        if let Some((inst, cfg, cold, digests)) = &gateway {
            let endpoint = format!("127.0.0.1:{}", cfg.ports[0].host);
            let bundle = inst.client_bundle()?;
            let ready = gateway::wait_ready(&mut vm, &endpoint, &bundle, Duration::from_secs(self.ready_timeout))?;
            inst.write_metadata(&gateway::Metadata {
                name: inst.name.clone(),
                endpoint: endpoint.clone(),
                created_unix: gateway::now_unix(),
                vm_pid: Some(vm.pid()),
                kernel_sha256: digests.0.clone(),
                rootfs_sha256: digests.1.clone(),
                backend: vm.backend.to_string(),
                supervisor_pid: Some(std::process::id()),
                passt_pid: vm.passt_pid(),
            })?;
            print_timeline(&vm.console, ready);
            eprintln!(
                "gateway {:?} SERVING over mTLS at {endpoint} after {:.2}s ({} PKI); client bundle: {}",
                inst.name,
                ready.as_secs_f64(),
                if *cold { "new" } else { "reused" },
                inst.mtls_dir().display()
            );
            eprintln!("Ctrl-C stops it.");
        }
        let mut out = std::io::stdout();
        let code = vm.wait(Some(&mut out), None)?;
        eprintln!("vm: guest exited with {code} after {:.2}s", vm.started.elapsed().as_secs_f64());
        Ok(code)
    }
}

/// The boot timeline: init's millisecond stamps (guest clock since boot) and host-side readiness.
fn print_timeline(console: &std::path::Path, ready: Duration) {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    eprintln!("boot timeline:");
    eprintln!("  {:>7} ms  VMM started (host)", 0);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("openshell-init: [") {
            if let Some((ms, what)) = rest.split_once(" ms] ") {
                eprintln!("  {:>7} ms  {what} (guest)", ms.trim());
            }
        } else if line.starts_with("gateway listening") {
            eprintln!("  {:>7}     {line} (guest)", "");
        }
    }
    eprintln!("  {:>7} ms  mTLS health SERVING (host)", ready.as_millis());
}

/// Re-runs this `vm run` without `--detach` as a background supervisor (its own session, output to
/// `supervisor.log`), and returns when it reports ready, or fails with its log when it exits.
fn detach(inst: &GatewayInstance, ready_timeout: u64) -> anyhow::Result<i32> {
    if inst.locked() {
        inst.lock()?; // names the running supervisor
    }
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
            eprintln!("gateway {:?} SERVING over mTLS at {} (supervisor pid {}); `cargo xtask vm status --name {}`", inst.name, m.endpoint, child.id(), inst.name);
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

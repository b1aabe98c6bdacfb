//! `cargo xtask vm run`: boot a VM, stream its console, exit with the guest command's exit code.

use std::path::PathBuf;

use anyhow::Context;
use openshell_artifacts::Store;
use openshell_vm::{VmConfig, VmmChoice};
use xshell::{cmd, Shell};

#[derive(clap::Args)]
pub struct VmCmd {
    #[command(subcommand)]
    cmd: VmSub,
}

#[derive(clap::Subcommand)]
enum VmSub {
    /// Boot a VM and run a command in it; exits with the command's exit code
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Absolute path of the command inside the guest
    #[arg(long)]
    exec: String,
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
    /// Guest network: passt (user-mode, forwards bound to 127.0.0.1) or none
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
        let mut argv = vec![self.exec];
        argv.extend(self.args);
        let mut cfg = VmConfig::exec(kernel.vmlinux, rootfs.dir, state_dir, argv);
        cfg.vcpus = self.vcpus;
        cfg.mem_mib = self.mem;
        cfg.exec.env = self.env;
        cfg.exec.workdir = self.workdir;
        cfg.console_log = self.console;
        cfg.vmm = self.vmm;
        cfg.net = self.net;
        cfg.ports = self.ports;
        if cfg.net == openshell_vm::NetMode::Passt {
            crate::deps::ensure(&sh, &[crate::deps::PASST])?;
        }
        let host = openshell_vm::HostFacts::probe();
        if cfg.vmm != VmmChoice::Krun && !host.hardware_kvm() {
            crate::deps::ensure(&sh, &[crate::deps::QEMU])?;
        }
        if matches!(openshell_vm::backend::choose(cfg.vmm, &host), Ok((openshell_vm::Backend::Krun, _))) {
            cmd!(sh, "cargo build --quiet -p openshell-krun --bin openshell-vmm").quiet().run().context("building openshell-vmm failed")?;
            cfg.krun_vmm_binary = Some(crate::project_root().join("target/debug/openshell-vmm"));
        }
        let mut vm = openshell_vm::launch(&cfg)?;
        eprintln!("vm: {} ({})", vm.backend, vm.backend_reason);
        let mut out = std::io::stdout();
        let code = vm.wait(Some(&mut out), None)?;
        eprintln!("vm: guest exited with {code} after {:.2}s", vm.started.elapsed().as_secs_f64());
        Ok(code)
    }
}

//! `cargo xtask check`: can this host boot the VM, and with what? One row per capability (PASS /
//! WARN / FAIL, the reason, the fix) and the provenance of the artifacts; `--guest` checks the
//! inside of a booted guest instead.
//!
//! Exit code: 0 every required row passed, 1 a required row failed, 2 the checker itself failed.
//! It builds nothing: missing artifacts are reported with the command that builds them.

use openshell_artifacts::Store;
use openshell_instance::check::{self, ProbeRequest};
use openshell_instance::{preset, state};
use openshell_vm::VmmChoice;

#[derive(clap::Args)]
pub struct CheckCmd {
    /// Machine-readable output: {subject, ok, exit_code, rows:[…], provenance}
    #[arg(long)]
    json: bool,
    /// Check the guest instead: boot a VM and report what its kernel and init provide
    #[arg(long)]
    guest: bool,
    /// With --guest: the profile whose guest is checked, gateway (the default) or debian
    #[arg(long, default_value_t = openshell_instance::profile::GATEWAY, requires = "guest")]
    profile: openshell_instance::profile::Profile,
    /// The VMM the `vmm` row (and --guest) is about: auto, krun or qemu
    #[arg(long, default_value = "auto")]
    vmm: VmmChoice,
    /// The network the helper's row is about: passt, gvproxy or none (default: the platform's)
    #[arg(long, value_name = "passt|gvproxy|none", conflicts_with = "guest")]
    net: Option<openshell_vm::Net>,
    /// The host port the gateway-port row checks: the HOST of a `vm run -p HOST:30051`
    #[arg(long, default_value_t = preset::GATEWAY_PORT, conflicts_with = "guest")]
    port: u16,
}

impl CheckCmd {
    pub fn run(self) -> anyhow::Result<std::process::ExitCode> {
        let result = if self.guest { crate::guest_check::run(self.json, self.vmm, &self.profile) } else { self.host() };
        let code = result.unwrap_or_else(|e| {
            eprintln!("check could not run: {e:#}");
            openshell_matrix::EXIT_CHECKER_FAILED
        });
        Ok(crate::exit_code(code))
    }

    fn host(&self) -> anyhow::Result<i32> {
        let store = Store::default_location();
        let facts = check::probe(&ProbeRequest {
            kernel: crate::artifacts::locate_kernel(&store),
            rootfs: crate::artifacts::locate_rootfs(&store),
            root_disk: None,
            ports: vec![self.port],
            store_root: Some(store.root().to_owned()),
            gateways_root: state::gateways_root(),
        });
        let report = check::host_report(&facts, self.vmm, self.net);
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report.to_json())?);
        } else {
            print!("{}", report.render());
        }
        Ok(report.exit_code())
    }
}

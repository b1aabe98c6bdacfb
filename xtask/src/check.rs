//! `cargo xtask check`: capability matrices. `--guest` boots a VM and checks the guest kernel
//! (see `guest_check.rs`).

use openshell_vm::VmmChoice;

#[derive(clap::Args)]
pub struct CheckCmd {
    /// Print the matrix as one line of JSON
    #[arg(long)]
    json: bool,
    /// Boot a VM and check what the guest kernel can do (netns, veth, bridge, NAT, cgroups, seccomp, landlock)
    #[arg(long)]
    guest: bool,
    /// Which VMM boots the guest for --guest: auto, krun or qemu
    #[arg(long, default_value = "auto", requires = "guest")]
    vmm: VmmChoice,
}

impl CheckCmd {
    pub fn run(self) -> anyhow::Result<()> {
        if !self.guest {
            anyhow::bail!("only the guest matrix is on this branch: run `cargo xtask check --guest`");
        }
        let code = crate::guest_check::run(self.json, self.vmm)?;
        std::process::exit(code);
    }
}

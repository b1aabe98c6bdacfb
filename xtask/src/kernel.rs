//! `cargo xtask kernel`: build a kernel (or find it cached) and print where it is.

use openshell_artifacts::kernel::KernelRole;
use openshell_artifacts::{Arch, Store};
use xshell::Shell;

#[derive(clap::Args)]
pub struct KernelCmd {
    /// Which kernel: the guest's, or the nested host's (L1 with KVM, that runs libkrun's guest as L2)
    #[arg(long, value_enum, default_value_t = Role::Guest)]
    role: Role,
    /// The guest's architecture: x86_64 (QEMU microvm, libkrun on x86_64) or aarch64 (an arm64
    /// `Image` for QEMU's virt machine and libkrun on Apple silicon; cross-built on x86_64)
    #[arg(long, default_value_t = Arch::host())]
    arch: Arch,
    /// Print the artifact's provenance as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Role {
    Guest,
    NestedHost,
}

impl From<Role> for KernelRole {
    fn from(r: Role) -> KernelRole {
        match r {
            Role::Guest => KernelRole::Guest,
            Role::NestedHost => KernelRole::NestedHost,
        }
    }
}

impl KernelCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let sh = Shell::new()?;
        let started = std::time::Instant::now();
        let role = KernelRole::from(self.role);
        let k = crate::artifacts::ensure_kernel(&sh, &Store::default_location(), role, self.arch)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&k.provenance)?);
        } else {
            println!(
                "{role} kernel {} for {} ({}) ready in {:.1}s",
                k.provenance.kernel_release,
                k.provenance.arch,
                k.provenance.vmlinux_sha256,
                started.elapsed().as_secs_f64()
            );
            println!("  {}", k.vmlinux.display());
        }
        Ok(())
    }
}

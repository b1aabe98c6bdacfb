//! `cargo xtask nested-host`: build the nested host (L1 of a nested boot: its kernel and its Debian
//! root) or find it cached, and print where it is and what the plan says about libkrun here.

use openshell_artifacts::{debian, rootfs, Store};
use openshell_vm::{HostFacts, KrunPlace};
use xshell::Shell;

#[derive(clap::Args)]
pub struct NestedHostCmd {
    /// Re-hash the nested root against its manifest and the kernel against its provenance
    #[arg(long)]
    check: bool,
}

impl NestedHostCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let sh = Shell::new()?;
        let started = std::time::Instant::now();
        let (kernel, root) = crate::artifacts::ensure_nested_host(&sh, &Store::default_location())?;
        if self.check {
            openshell_artifacts::kernel::verify(&kernel)?;
            rootfs::verify(&root)?;
        }
        let prov = debian::provenance(&root)?;
        let state = if self.check { "verified" } else { "ready" };
        println!("nested host {state} in {:.1}s", started.elapsed().as_secs_f64());
        println!(
            "  kernel {} ({})  {}",
            kernel.provenance.kernel_release,
            kernel.provenance.vmlinux_sha256.short(),
            kernel.vmlinux.display()
        );
        println!(
            "  root   {} packages from {} ({} files, manifest {})  {}",
            prov.packages.len(),
            prov.suite,
            root.manifest.files.len(),
            root.digest().short(),
            root.dir.display()
        );
        let plan = openshell_vm::plan(&HostFacts::probe(), openshell_vm::VmmChoice::Krun, openshell_vm::Net::None);
        match plan.krun {
            KrunPlace::NestedL1 => {
                println!("  libkrun runs only nested on this host: the krun trials use this nested host")
            }
            KrunPlace::Direct => {
                println!("  libkrun runs directly on this host: the krun trials do not need the nested host")
            }
            KrunPlace::Nowhere(why) => println!("  libkrun cannot run here, nested or not: {why}"),
        }
        Ok(())
    }
}

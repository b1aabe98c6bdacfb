//! `cargo xtask codesign`: on macOS, signs the binaries that create VMs (`openshell-vmm` and the VM
//! suites' test binary) ad hoc with the hypervisor entitlement, then reads each signature back and
//! fails naming the key a binary lacks. On Linux nothing needs signing. The entitlements and the
//! `codesign` command lines live in `openshell_krun::codesign`.

use std::path::PathBuf;

use anyhow::Context;
use openshell_krun::codesign;
use xshell::{cmd, Shell};

#[derive(clap::Args)]
pub struct CodesignCmd {
    /// Only write the entitlements plist (crates/krun/entitlements.plist) from its typed
    /// definition, on any OS; a unit test fails when the checked-in file differs
    #[arg(long)]
    write_plist: bool,
}

impl CodesignCmd {
    pub fn run(self) -> anyhow::Result<()> {
        if self.write_plist {
            let path = crate::project_root().join("crates/krun/entitlements.plist");
            std::fs::write(&path, codesign::plist()).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
            return Ok(());
        }
        if !cfg!(target_os = "macos") {
            println!(
                "no signing needed on {}: KVM asks for no entitlement (Hypervisor.framework on macOS does)",
                std::env::consts::OS
            );
            return Ok(());
        }
        let sh = Shell::new()?;
        let mut bins = vec![crate::artifacts::build_vmm(&sh)?];
        bins.extend(vm_test_binaries(&sh)?);
        for bin in &bins {
            codesign::sign(bin).map_err(|e| anyhow::anyhow!("{e}; see `cargo xtask check`"))?;
            println!("signed and verified {} ({})", bin.display(), codesign::HYPERVISOR);
        }
        Ok(())
    }
}

/// The VM suites' test binaries (`crates/instance/tests/vm`), built without running, as cargo names them.
fn vm_test_binaries(sh: &Shell) -> anyhow::Result<Vec<PathBuf>> {
    let out = cmd!(sh, "cargo test --quiet --no-run --message-format=json -p openshell-instance --test vm")
        .read()
        .context("building the VM suites failed")?;
    Ok(out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .collect())
}

//! `cargo xtask sdk`: the published OpenShell Python SDK (PyPI `openshell`), the client that judges
//! our gateway, in a venv under `target/`. The suites use its python (`OPENSHELL_SDK_PYTHON`).

use std::path::PathBuf;

use xshell::Shell;

/// The SDK release the gateway is checked against.
pub const VERSION: &str = "0.1.5";

#[derive(clap::Args)]
pub struct SdkCmd {}

impl SdkCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let python = ensure(&Shell::new()?)?;
        println!("OpenShell SDK {VERSION}: export OPENSHELL_SDK_PYTHON={}", python.display());
        Ok(())
    }
}

/// The python of the SDK's venv, installed the first time.
pub fn ensure(sh: &Shell) -> anyhow::Result<PathBuf> {
    let venv = crate::project_root().join(format!("target/openshell-sdk-{VERSION}"));
    crate::pypi::ensure(sh, &venv, "openshell", VERSION)
}

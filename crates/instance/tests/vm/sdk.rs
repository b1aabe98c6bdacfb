//! The published OpenShell SDK (`pip install openshell`, installed by `cargo xtask sdk`) against a
//! gateway booted the way `vm run` boots it: it finds the gateway from the files `vm run` writes
//! (`active_gateway`, `gateway_endpoint`, the `mtls/` bundle), and what it gets is what users get.

use libtest_mimic::Failed;
use openshell_vm::VmmChoice;

use crate::support::{self, Artifacts, TrialDir};
use crate::trials::Body;

pub const TRIALS: &[(&str, Body)] =
    &[("gateway::sdk::finds_the_active_gateway_and_gets_its_health", finds_the_active_gateway_and_gets_its_health)];

fn sdk_python() -> Result<std::path::PathBuf, String> {
    std::env::var_os("OPENSHELL_SDK_PYTHON")
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_file())
        .ok_or_else(|| "OPENSHELL_SDK_PYTHON is not set to the OpenShell SDK's python; run `cargo xtask sdk`".into())
}

fn finds_the_active_gateway_and_gets_its_health(a: &Artifacts, vmm: VmmChoice, dir: TrialDir) -> Result<(), Failed> {
    match sdk_view(a, vmm, &dir) {
        Ok(view) => {
            println!("the SDK's view: {view}");
            Ok(())
        }
        Err(e) => Err(dir.fail(e)),
    }
}

fn sdk_view(a: &Artifacts, vmm: VmmChoice, dir: &TrialDir) -> Result<serde_json::Value, String> {
    let python = sdk_python()?;
    // The layout the SDK reads: $XDG_CONFIG_HOME/openshell/{active_gateway,gateways/NAME/}.
    let config = dir.path().join("config");
    let up = support::with_free_port(|port| {
        let g = support::gateway(a, vmm, &config.join("openshell/gateways"), port)?;
        g.boot().map_err(|e| format!("boot: {e}"))
    })?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vm/sdk.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .env("XDG_CONFIG_HOME", &config)
        .env_remove("OPENSHELL_GATEWAY")
        .output()
        .map_err(|e| format!("running {}: {e}", python.display()))?;
    drop(up);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "the SDK failed against the gateway ({}):\n{}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let got: serde_json::Value =
        serde_json::from_str(stdout.trim()).map_err(|e| format!("the SDK script printed {stdout:?}: {e}"))?;
    let version = env!("CARGO_PKG_VERSION");
    let want = serde_json::json!({"status": "SERVICE_STATUS_HEALTHY", "version": version});
    if got["health"] != want || got["info"]["gateway_version"] != version {
        return Err(format!("Health/GetGatewayInfo through the SDK: {got}, expected health {want}"));
    }
    // The gateway VM runs no compute driver yet: it lists none, and sandbox calls say so.
    if got["info"]["compute_drivers"] != 0 {
        return Err(format!("a gateway without a compute driver listed one: {got}"));
    }
    let listed = &got["list_sandboxes"];
    let details = listed["details"].as_str().unwrap_or_default();
    if listed["code"] != "FAILED_PRECONDITION" || details != openshell_gateway::sandboxes::NO_DRIVER {
        return Err(format!("ListSandboxes without a compute driver must say so (FAILED_PRECONDITION): {listed}"));
    }
    let unserved = &got["unserved"];
    let details = unserved["details"].as_str().unwrap_or_default();
    if unserved["code"] != "UNIMPLEMENTED" || !details.contains("GetSandboxLogs") {
        return Err(format!("an unserved method must answer UNIMPLEMENTED naming itself: {unserved}"));
    }
    Ok(got)
}

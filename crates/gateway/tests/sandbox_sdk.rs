//! The gateway's sandbox API driven end to end by the published OpenShell SDK: the real server
//! (mutual TLS, certificates from openshell-pki) on loopback, with the host-process test driver
//! (`support/host_processes.rs`) or with none, and `tests/sandbox_sdk.py` run by the SDK's python, connecting
//! as OpenShell's own clients do (`SandboxClient.from_active_cluster`: `metadata.json` and
//! `mtls/` under `$XDG_CONFIG_HOME/openshell/gateways/NAME/`). The script asserts each behaviour
//! and prints what it checked. Without the SDK the trial is ignored with that reason; under
//! `cargo xtask test` (`OPENSHELL_E2E_REQUIRE`) it fails instead.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use libtest_mimic::{Arguments, Failed, Trial};
use openshell_gateway::{serve, GatewayConfig, ServerMaterial};
use openshell_pki::Pki;

/// Each trial: its name, whether the gateway runs the test driver, and the checks the script must
/// report (one that never ran is a failure, not a pass).
const TRIALS: &[(&str, bool, &[&str])] = &[
    (
        "sdk_drives_sandboxes_over_mtls",
        true,
        &[
            "gateway_info",
            "context_exec",
            "stdin_env_workdir",
            "already_exists",
            "invalid_name",
            "missing_image",
            "list_pages",
            "label_selector",
            "delete_wait_deleted",
            "not_found",
        ],
    ),
    ("sdk_hears_a_gateway_without_a_driver_say_so", false, &["no_driver_info", "no_driver_sandbox_calls", "unserved"]),
];

fn main() {
    let args = Arguments::from_args();
    let python = std::env::var_os("OPENSHELL_SDK_PYTHON").filter(|p| std::path::Path::new(p).is_file());
    let trials = TRIALS
        .iter()
        .map(|&(name, with_driver, checks)| match python.clone() {
            Some(py) => Trial::test(name, move || drive(&py, name, with_driver, checks)),
            None if std::env::var_os("OPENSHELL_E2E_REQUIRE").is_some() => Trial::test(name, || {
                Err("OPENSHELL_SDK_PYTHON is not set to the OpenShell SDK's python; `cargo xtask test` installs it"
                    .into())
            }),
            None => Trial::test(name, || Ok(()))
                .with_ignored_flag(true)
                .with_kind("the OpenShell SDK is not installed: run `cargo xtask sdk` and set OPENSHELL_SDK_PYTHON"),
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

/// Writes the gateway's client files as OpenShell's CLI keeps them (dirs 0700, key 0600).
fn write_gateway_dir(config_home: &std::path::Path, gateway: &str, pki: &Pki, port: u16) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = config_home.join("openshell/gateways").join(gateway);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir.join("mtls"))?;
    let metadata = serde_json::json!({ "gateway_endpoint": format!("https://127.0.0.1:{port}") });
    std::fs::write(dir.join("metadata.json"), metadata.to_string())?;
    let b = pki.client_bundle();
    std::fs::write(dir.join("mtls/ca.crt"), &b.ca_pem)?;
    std::fs::write(dir.join("mtls/tls.crt"), &b.cert_pem)?;
    std::fs::write(dir.join("mtls/tls.key"), &b.key_pem)?;
    std::fs::set_permissions(dir.join("mtls/tls.key"), std::fs::Permissions::from_mode(0o600))
}

fn drive(python: &std::ffi::OsStr, name: &str, with_driver: bool, want: &[&str]) -> Result<(), Failed> {
    let pki = Pki::generate("sdk-test").map_err(|e| e.to_string())?;
    let m = pki.server_material();
    let material = ServerMaterial { client_ca_pem: m.client_ca_pem, cert_pem: m.cert_pem, key_pem: m.key_pem };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let port = listener.local_addr()?.port();
    let config = GatewayConfig {
        driver: with_driver.then(|| {
            Arc::new(support::host_processes::HostProcesses::default()) as Arc<dyn openshell_gateway::sandboxes::Driver>
        }),
        ..GatewayConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(async move {
        serve(listener, &material, config, async {
            let _ = stopped.await;
        })
        .await
    });

    let home = tempfile::tempdir()?;
    write_gateway_dir(home.path(), "sdk-test", &pki, port)?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sandbox_sdk.py");
    let out = Command::new(python)
        .arg(script)
        .arg(if with_driver { "driver" } else { "no-driver" })
        .env("XDG_CONFIG_HOME", home.path())
        .env("OPENSHELL_GATEWAY", "sdk-test")
        .output()
        .map_err(|e| format!("running {script}: {e}"))?;

    let _ = stop.send(());
    let served = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(30), server).await });
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{script} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    match served {
        Ok(Ok(Ok(_))) => {}
        other => return Err(format!("the gateway did not end cleanly after the script: {other:?}").into()),
    }
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim()).map_err(|e| format!("{script} printed no JSON report ({e}): {stdout}"))?;
    let checks: Vec<&str> = report["checks"].as_array().into_iter().flatten().filter_map(|c| c.as_str()).collect();
    for check in want {
        if !checks.contains(check) {
            return Err(format!("{script} did not report check {check}: {report}").into());
        }
    }
    println!("{name}: {} checks passed: {}", checks.len(), checks.join(", "));
    Ok(())
}

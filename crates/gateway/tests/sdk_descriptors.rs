//! Every message, enum and method of `proto/openshell.proto` and `proto/datamodel.proto` (and the
//! well-known types they import) against the published OpenShell SDK's
//! own descriptors (`openshell._proto.openshell_pb2.DESCRIPTOR`), field by field: number, type,
//! label, type name, oneof, proto3 optional. The SDK is a Python package, installed by `cargo xtask
//! sdk` (and by `cargo xtask test`, which exports `OPENSHELL_SDK_PYTHON`); without it this test is
//! ignored with that reason, and under `cargo xtask test` (`OPENSHELL_E2E_REQUIRE`) it fails.

use std::process::Command;

use libtest_mimic::{Arguments, Failed, Trial};

const NAME: &str = "openshell_proto_matches_the_sdk_descriptors";

fn main() {
    let args = Arguments::from_args();
    let python = std::env::var_os("OPENSHELL_SDK_PYTHON").filter(|p| std::path::Path::new(p).is_file());
    let trial = match python {
        Some(py) => Trial::test(NAME, move || compare(&py)),
        None if std::env::var_os("OPENSHELL_E2E_REQUIRE").is_some() => Trial::test(NAME, || {
            Err("OPENSHELL_SDK_PYTHON is not set to the OpenShell SDK's python; `cargo xtask test` installs it".into())
        }),
        None => Trial::test(NAME, || Ok(()))
            .with_ignored_flag(true)
            .with_kind("the OpenShell SDK is not installed: run `cargo xtask sdk` and set OPENSHELL_SDK_PYTHON"),
    };
    libtest_mimic::run(&args, vec![trial]).exit();
}

fn compare(python: &std::ffi::OsStr) -> Result<(), Failed> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let set = dir.path().join("openshell.desc");
    std::fs::write(&set, openshell_gateway::proto::openshell::DESCRIPTOR_SET).map_err(|e| e.to_string())?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk_descriptors.py");
    let out = Command::new(python).arg(script).arg(&set).output().map_err(|e| format!("running {script}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{script} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr)).into());
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{script} printed no JSON report ({e}): {}", String::from_utf8_lossy(&out.stdout)))?;
    let diffs = report["differences"].as_array().cloned().unwrap_or_default();
    let checked = &report["checked"];
    // An empty proto would compare equal to anything: the served methods must all have been seen.
    let methods = checked["methods"].as_u64().unwrap_or(0) as usize;
    if methods != openshell_gateway::openshell::SERVED.len() {
        return Err(format!(
            "the comparison saw {methods} methods, the gateway serves {}: {checked}",
            openshell_gateway::openshell::SERVED.len()
        )
        .into());
    }
    // Every package our protos declare must have been compared, not only the service's.
    let packages: Vec<&str> = checked["packages"].as_array().into_iter().flatten().filter_map(|p| p.as_str()).collect();
    for want in ["openshell.v1", "openshell.datamodel.v1", "google.protobuf"] {
        if !packages.contains(&want) {
            return Err(format!("the comparison never saw package {want}: {checked}").into());
        }
    }
    if !diffs.is_empty() {
        let lines: Vec<String> = diffs.iter().map(|d| format!("  {}", d.as_str().unwrap_or_default())).collect();
        return Err(format!("proto/openshell.proto differs from the OpenShell SDK's:\n{}", lines.join("\n")).into());
    }
    println!("{NAME}: {checked} compared, no difference");
    Ok(())
}

//! Generates the gRPC code for `proto/gateway.proto` and for `proto/openshell.proto` with
//! `proto/datamodel.proto` (and their descriptor set, which a test compares with the OpenShell
//! SDK's). It uses the protoc and the well-known types (`google/protobuf/*.proto`) shipped in the
//! `protoc-bin-vendored` crate so that a fresh machine needs no system package; an explicit
//! `PROTOC` (and `PROTOC_INCLUDE`) still wins.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/gateway.proto");
    println!("cargo:rerun-if-changed=proto/openshell.proto");
    println!("cargo:rerun-if-changed=proto/datamodel.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    println!("cargo:rerun-if-env-changed=PROTOC_INCLUDE");
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    if std::env::var_os("PROTOC_INCLUDE").is_none() {
        std::env::set_var("PROTOC_INCLUDE", protoc_bin_vendored::include_path()?);
    }
    tonic_build::configure().compile_protos(&["proto/gateway.proto"], &["proto"])?;
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").ok_or("cargo sets OUT_DIR")?);
    tonic_build::configure()
        .file_descriptor_set_path(out.join("openshell_descriptor.bin"))
        .compile_protos(&["proto/datamodel.proto", "proto/openshell.proto"], &["proto"])?;
    Ok(())
}

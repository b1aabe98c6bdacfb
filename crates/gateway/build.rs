//! Generates the gRPC code for `proto/gateway.proto` and `proto/openshell.proto` (with the
//! latter's descriptor set, which a test compares with the OpenShell SDK's). It uses the protoc
//! shipped in the `protoc-bin-vendored` crate so that a fresh machine needs
//! no system package; an explicit `PROTOC` still wins.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/gateway.proto");
    println!("cargo:rerun-if-changed=proto/openshell.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_build::configure().compile_protos(&["proto/gateway.proto"], &["proto"])?;
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").ok_or("cargo sets OUT_DIR")?);
    tonic_build::configure()
        .file_descriptor_set_path(out.join("openshell_descriptor.bin"))
        .compile_protos(&["proto/openshell.proto"], &["proto"])?;
    Ok(())
}

//! Generates the gRPC code for `proto/gateway.proto`. It uses the protoc
//! shipped in the `protoc-bin-vendored` crate so that a fresh machine needs
//! no system package; an explicit `PROTOC` still wins.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/gateway.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_build::configure().compile_protos(&["proto/gateway.proto"], &["proto"])?;
    Ok(())
}

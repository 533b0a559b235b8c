//! Generates the gRPC code from proto/ and a descriptor set for reflection.
//!
//! protox (a pure-Rust protobuf compiler, as tonic's own codegen uses) parses
//! the files, so building needs no system protoc.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(["preview/v1/preview.proto", "echo/v1/echo.proto"], ["proto"])?;
    std::fs::write(out.join("preview_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

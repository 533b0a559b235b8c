//! Generates the gRPC code from proto/ and a descriptor set for reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("preview_descriptor.bin"))
        .compile_protos(&["proto/preview/v1/preview.proto", "proto/echo/v1/echo.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

//! Code generated from `proto/preview/v1/preview.proto` by `build.rs`.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("preview.v1");

/// The encoded descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("preview_descriptor");

/// The echo test app's gRPC API (`proto/echo/v1/echo.proto`).
pub mod echo {
    tonic::include_proto!("preview.echo.v1");
}

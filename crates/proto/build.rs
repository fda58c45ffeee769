//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building
//! fluxo needs no system `protoc`, and keeps the descriptor set for gRPC
//! reflection and for the REST transcoder.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "fluxo/ledger/v1/ledger.proto",
        "fluxo/ledger/v1/events.proto",
        "fluxo/balance/v1/balance.proto",
        "fluxo/webhooks/v1/webhooks.proto",
        // Error details, so the REST gateway can render them as JSON.
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
    ];
    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true);
    // Comments feed the OpenAPI document's descriptions.
    compiler.include_source_info(true);
    compiler.open_files(files)?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Encoded by protox itself: converting through prost-types would drop the
    // google.api.http options, which the REST gateway routes by.
    std::fs::write(out.join("fluxo_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}

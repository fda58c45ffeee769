//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building
//! fluxo needs no system `protoc`, and keeps the descriptor set for gRPC
//! reflection and for the REST transcoder.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files =
        ["fluxo/ledger/v1/ledger.proto", "fluxo/ledger/v1/events.proto", "fluxo/balance/v1/balance.proto"];
    let descriptors = protox::compile(files, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("fluxo_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}

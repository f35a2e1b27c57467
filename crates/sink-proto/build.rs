//! Generates the sensor.v1 messages and client with the protoc binary that
//! `protoc-bin-vendored` ships, so a fresh machine needs no system protoc.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };

    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = proto_root.join("sensor/v1/sensor.proto");
    let descriptor = PathBuf::from(env::var("OUT_DIR")?).join("sensor_descriptor.bin");

    tonic_prost_build::configure()
        // The server is written by hand (crates/sink-stages/src/sources/grpc/mod.rs) so
        // that message-size limits can change live; only the client is generated.
        .build_server(false)
        // Labels in key order, as the sink keeps them.
        .btree_map(".")
        .file_descriptor_set_path(&descriptor)
        .compile_protos(&[proto], &[proto_root, well_known])?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}

//! Generates the OTLP metrics messages (and a client, for tests and the
//! benchmark) with the protoc binary that `protoc-bin-vendored` ships, so a
//! fresh machine needs no system protoc.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let service = root.join("opentelemetry/proto/collector/metrics/v1/metrics_service.proto");
    tonic_prost_build::configure()
        // The server is written by hand (src/grpc.rs) so that the limits act
        // before the body is read and change live; the requests are decoded
        // straight into readings (src/decode.rs).
        .build_server(false)
        .compile_protos(&[service], &[root])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

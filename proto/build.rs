//! Generates the gRPC code with `protox` (pure Rust), so no `protoc` binary is
//! needed, and the encoded descriptor set that gRPC reflection serves.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/delivery.proto");
    let fds = protox::compile(["proto/delivery.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("delivery_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().bytes(".daisi.delivery.v1.Event.payload").compile_fds(fds)?;
    Ok(())
}

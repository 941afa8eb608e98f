//! Generates the gRPC code with `protox` (pure Rust), so no `protoc` binary is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/delivery.proto");
    let fds = protox::compile(["proto/delivery.proto"], ["proto"])?;
    tonic_prost_build::configure().bytes(".daisi.delivery.v1.Event.payload").compile_fds(fds)?;
    Ok(())
}

//! The router-to-edge gRPC contract (`proto/delivery.proto`), generated at build time.
#![forbid(unsafe_code)]

/// `daisi.delivery.v1`
pub mod delivery {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("daisi.delivery.v1");
}

/// The encoded `FileDescriptorSet` of `proto/delivery.proto`, served by gRPC
/// reflection (`server.enable_reflection`).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/delivery_descriptor.bin"));

/// Fully qualified name of the edge's gRPC service.
pub const EDGE_DELIVERY_SERVICE: &str = "daisi.delivery.v1.EdgeDelivery";

/// Metadata key carrying `auth.internal_token` on every router -> edge stream.
pub const INTERNAL_TOKEN_HEADER: &str = "x-internal-token";

//! The router-to-edge gRPC contract (`proto/delivery.proto`), generated at build time.
#![forbid(unsafe_code)]

/// `daisi.delivery.v1`
pub mod delivery {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("daisi.delivery.v1");
}

/// Metadata key carrying `auth.internal_token` on every router -> edge stream.
pub const INTERNAL_TOKEN_HEADER: &str = "x-internal-token";

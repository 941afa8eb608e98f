//! Shared by the edge and the router: configuration and reload, tokens,
//! subject and key names, telemetry, health endpoints and dependency clients.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod deps;
pub mod endpoints;
pub mod health;
pub mod names;
pub mod registry;
pub mod reload;
pub mod scripts;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod token;

pub use config::{Config, Role};
pub use secret::Secret;

//! The load and latency harness of Daisi WS: scenarios (`idle`, `fanout`,
//! `routed`, `migration`) driven from worker processes against a running
//! stack or one it starts, with nats-server's WebSocket listener as the peer.
#![forbid(unsafe_code)]

pub mod cli;
pub mod cpu;
pub mod plot;
pub mod pool;
pub mod publish;
pub mod report;
pub mod scenario;
pub mod scrape;
pub mod stack;
pub mod stats;
pub mod wire;
pub mod worker;

//! The local stack in one command (`scripts/dev-stack.sh`, binary
//! `daisi-dev-stack`): starts `nats-server -js` and `redis-server` from the
//! system, one `daisi-router` and two `daisi-edge` processes configured only
//! through `DAISI_WS_*` environment variables with freshly generated dev
//! secrets, prints a ready-to-open demo URL with a valid token, and runs a
//! small publisher of sample events. Ctrl-C or SIGTERM stops everything in
//! order (publisher, edges and router, then Redis and NATS) and removes the
//! temporary state folder, leaving nothing running.
#![forbid(unsafe_code)]

pub mod args;
pub mod procs;
pub mod publisher;
pub mod secrets;
pub mod stack;

//! The router's metrics: Prometheus handles (SPEC §8) plus per-instance
//! counters, so a test or an operator can tell two routers in one process apart.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge, counter, gauge};

/// One counter both exported to Prometheus and kept for this router instance.
pub struct Tally {
    exported: Counter,
    local: AtomicU64,
}

impl Tally {
    fn new(exported: Counter) -> Self {
        Self { exported, local: AtomicU64::new(0) }
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.exported.increment(n);
        self.local.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// This instance's total so far.
    pub fn get(&self) -> u64 {
        self.local.load(Ordering::Relaxed)
    }
}

/// Every router metric.
pub struct RouterMetrics {
    /// Events every owning edge accepted (acked).
    pub routed: Tally,
    /// Events no live edge wanted (acked without delivery).
    pub unrouted: Tally,
    /// Invalid subjects or non-JSON bodies (terminated).
    pub invalid: Tally,
    /// Messages JetStream delivered more than once.
    pub redelivered: Tally,
    /// Naks because the route registry was rebuilding.
    pub rebuilding_naks: Tally,
    /// Naks because an edge failed or timed out.
    pub forward_retries: Tally,
    /// Naks because Redis could not resolve the routes.
    pub resolve_errors: Tally,
    /// Redis round trips made to resolve routes (one per pulled chunk whose
    /// subjects were not all cached, whatever its size).
    pub route_lookups: Tally,
    /// Events written to edge gRPC streams.
    pub grpc_sent: Tally,
    /// Route memberships removed because their edge's registration was gone.
    pub dead_members_removed: Tally,
    /// Times an edge's circuit breaker opened.
    pub circuit_opened: Tally,
    /// Deliveries settled without reaching an edge that stayed unreachable
    /// past `router.edge_unreachable_grace_ms` (per edge and event).
    pub undeliverable_unreachable: Tally,
    /// Edges whose death was confirmed (registration gone, no working stream).
    pub dead_edges: Tally,
    /// The stream was found missing and created again.
    pub stream_recreated: Tally,
    /// The durable consumer was found missing and created again.
    pub consumer_recreated: Tally,
    /// Messages nak'ed on their last allowed delivery (`max_deliver`).
    pub max_deliver_exhausted: Tally,
    /// Messages without JetStream metadata (terminated).
    pub no_metadata: Tally,
    /// Pull requests written off without the server's end status (decision
    /// 0035): partly served ones on nats-server 2.9, ones it forgot before
    /// 2.9.16, and those a server that stopped answering still held.
    pub pull_requests_written_off: Tally,
    /// Messages pulled and not yet acked, nak'ed or terminated.
    pub in_flight: Gauge,
}

impl RouterMetrics {
    /// Registers the handles (installing the process-wide recorder first).
    pub fn new() -> Self {
        let _ = daisi_common::telemetry::metrics_handle();
        // Moves only on a key layout bug: present from start, at zero.
        let _ = counter!("dws_redis_cross_slot_errors_total");
        let _ = counter!("dws_redis_cluster_reconnects_total");
        Self {
            routed: Tally::new(counter!("dws_router_routed_total")),
            unrouted: Tally::new(counter!("dws_router_unrouted_total")),
            invalid: Tally::new(counter!("dws_router_invalid_total")),
            redelivered: Tally::new(counter!("dws_router_redelivered_total")),
            rebuilding_naks: Tally::new(counter!("dws_router_rebuilding_naks_total")),
            forward_retries: Tally::new(counter!("dws_grpc_forward_retry_attempts_total")),
            resolve_errors: Tally::new(counter!("dws_router_resolve_errors_total")),
            route_lookups: Tally::new(counter!("dws_router_route_lookups_total")),
            grpc_sent: Tally::new(counter!("dws_grpc_messages_sent_total")),
            dead_members_removed: Tally::new(counter!("dws_router_dead_route_members_removed_total")),
            circuit_opened: Tally::new(counter!("dws_router_edge_circuit_opened_total")),
            undeliverable_unreachable: Tally::new(counter!(
                "dws_router_undeliverable_total", "reason" => "edge_unreachable"
            )),
            dead_edges: Tally::new(counter!("dws_router_dead_edges_total")),
            stream_recreated: Tally::new(counter!("dws_router_jetstream_recreated_total", "object" => "stream")),
            consumer_recreated: Tally::new(counter!("dws_router_jetstream_recreated_total", "object" => "consumer")),
            max_deliver_exhausted: Tally::new(counter!("dws_router_max_deliver_exhausted_total")),
            no_metadata: Tally::new(counter!("dws_router_no_metadata_total")),
            pull_requests_written_off: Tally::new(counter!("dws_router_pull_requests_written_off_total")),
            in_flight: gauge!("dws_router_in_flight_messages"),
        }
    }

    /// A snapshot of this instance's counters.
    pub fn stats(&self) -> RouterStats {
        RouterStats {
            routed: self.routed.get(),
            unrouted: self.unrouted.get(),
            invalid: self.invalid.get(),
            redelivered: self.redelivered.get(),
            rebuilding_naks: self.rebuilding_naks.get(),
            forward_retries: self.forward_retries.get(),
            resolve_errors: self.resolve_errors.get(),
            route_lookups: self.route_lookups.get(),
            grpc_sent: self.grpc_sent.get(),
            dead_members_removed: self.dead_members_removed.get(),
            circuit_opened: self.circuit_opened.get(),
            undeliverable_unreachable: self.undeliverable_unreachable.get(),
            dead_edges: self.dead_edges.get(),
            stream_recreated: self.stream_recreated.get(),
            consumer_recreated: self.consumer_recreated.get(),
            max_deliver_exhausted: self.max_deliver_exhausted.get(),
            no_metadata: self.no_metadata.get(),
            pull_requests_written_off: self.pull_requests_written_off.get(),
        }
    }
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// This router instance's counters (the Prometheus ones are process-wide).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouterStats {
    pub routed: u64,
    pub unrouted: u64,
    pub invalid: u64,
    pub redelivered: u64,
    pub rebuilding_naks: u64,
    pub forward_retries: u64,
    pub resolve_errors: u64,
    pub route_lookups: u64,
    pub grpc_sent: u64,
    pub dead_members_removed: u64,
    pub circuit_opened: u64,
    pub undeliverable_unreachable: u64,
    pub dead_edges: u64,
    pub stream_recreated: u64,
    pub consumer_recreated: u64,
    pub max_deliver_exhausted: u64,
    pub no_metadata: u64,
    pub pull_requests_written_off: u64,
}

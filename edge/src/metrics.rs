//! The edge's metric handles, registered once so hot paths skip the registry lookup.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// Every `reason` of `dws_auth_failure_total`.
pub const AUTH_FAILURE_REASONS: [&str; 5] =
    ["invalid_api_key", "bad_request", "token_expired", "invalid_token", "token_path_mismatch"];

/// Handles to every edge metric (names from SPEC §8).
pub struct EdgeMetrics {
    pub active_user: Gauge,
    pub active_admin: Gauge,
    pub connection_duration: Histogram,
    pub messages_sent: Counter,
    pub messages_received: Counter,
    pub auth_success: Counter,
    pub buffer_used: Gauge,
    pub dropped: Counter,
    pub delivery_latency: Histogram,
    pub refused_full: Counter,
    /// Connections closed at accept: too many not yet upgraded.
    pub refused_pending: Counter,
    pub closed_slow: Counter,
    /// Sockets that negotiated permessage-deflate.
    pub deflate_sockets: Counter,
    /// Frames written compressed (one per socket and message).
    pub compressed_frames: Counter,
    /// Bytes of messages compressed (once per message, whatever its fan-out).
    pub compression_in: Counter,
    /// What those messages compressed to, in bytes.
    pub compression_out: Counter,
    /// Socket tasks that ended in a panic (their guard released what they held).
    pub socket_task_panics: Counter,
    /// Stored events replayed to resuming sockets.
    pub replayed: Counter,
}

impl EdgeMetrics {
    pub fn new() -> Self {
        // Make sure the recorder exists before handles are taken.
        let _ = daisi_common::telemetry::metrics_handle();
        // Series that only move on rare events exist from start, at zero:
        // alerts and rate() need them before the first increment.
        for reason in AUTH_FAILURE_REASONS {
            let _ = counter!("dws_auth_failure_total", "reason" => reason);
        }
        for from in ["live_owner", "dead_owner"] {
            let _ = counter!("dws_session_takeovers_total", "from" => from);
        }
        for name in [
            "dws_session_lock_attempts_total",
            "dws_session_lock_success_total",
            "dws_session_reasserted_total",
            "dws_routes_reasserted_total",
            "dws_grpc_messages_received_total",
            "dws_grpc_duplicates_total",
            "dws_grpc_invalid_events_total",
            "dws_redis_cross_slot_errors_total",
            "dws_redis_cluster_reconnects_total",
        ] {
            let _ = counter!(name);
        }
        let _ = counter!("dws_grpc_refused_total", "reason" => "internal_token");
        Self {
            active_user: gauge!("dws_active_connections", "kind" => "user"),
            active_admin: gauge!("dws_active_connections", "kind" => "admin"),
            connection_duration: histogram!("dws_connection_duration_seconds"),
            messages_sent: counter!("dws_messages_sent_total"),
            messages_received: counter!("dws_messages_received_total"),
            auth_success: counter!("dws_auth_success_total"),
            buffer_used: gauge!("dws_websocket_buffer_used_count"),
            dropped: counter!("dws_websocket_messages_dropped_total"),
            delivery_latency: histogram!("dws_delivery_latency_seconds"),
            refused_full: counter!("dws_connections_refused_total", "reason" => "edge_full"),
            refused_pending: counter!("dws_connections_refused_total", "reason" => "pending_limit"),
            closed_slow: counter!("dws_connections_closed_slow_total"),
            deflate_sockets: counter!("dws_websocket_deflate_connections_total"),
            compressed_frames: counter!("dws_websocket_compressed_frames_total"),
            compression_in: counter!("dws_websocket_compression_input_bytes_total"),
            compression_out: counter!("dws_websocket_compression_output_bytes_total"),
            socket_task_panics: counter!("dws_socket_task_panics_total"),
            replayed: counter!("dws_resume_replayed_events_total"),
        }
    }

    /// `dws_resumes_total{outcome}`: replayed, retention, limit or unavailable.
    pub fn resume(&self, outcome: &'static str) {
        counter!("dws_resumes_total", "outcome" => outcome).increment(1);
    }

    /// `dws_auth_failure_total{reason}`.
    pub fn auth_failure(&self, reason: &'static str) {
        counter!("dws_auth_failure_total", "reason" => reason).increment(1);
    }
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

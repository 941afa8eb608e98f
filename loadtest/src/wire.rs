//! The parent ↔ worker protocol: the parent writes one [`Job`] line, then
//! [`Command`] lines, on the worker's stdin; the worker answers with
//! [`Event`] lines on its stdout. One JSON object per line.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// How the clients talk to the server under test.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Daisi WS: `ready`, `event` frames, `select_chat`.
    Daisi,
    /// nats-server's WebSocket listener: the NATS client protocol
    /// (`CONNECT`, `SUB`, `MSG`, `PING`/`PONG`) inside WebSocket frames.
    NatsWs,
}

/// One client socket.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SocketSpec {
    /// Full URL (Daisi: with token and API key; NATS: the listener).
    pub url: String,
    /// Daisi: chat to select once `ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_chat: Option<String>,
    /// NATS: subject to subscribe to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Which publish subject this socket listens to (index into the run's subjects).
    pub group: u32,
    /// Daisi: when the socket drops, reconnect here (scenario `resume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_url: Option<String>,
    /// Daisi: reconnect with `resume=<last seq seen>` (else a plain reconnect).
    #[serde(default)]
    pub resume: bool,
}

/// What one worker process does.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Job {
    pub worker: usize,
    pub protocol: Protocol,
    pub sockets: Vec<SocketSpec>,
    /// Source addresses; socket `i` binds `source_ips[i % len]` (empty = kernel's choice).
    pub source_ips: Vec<Ipv4Addr>,
    /// Handshakes in flight at once.
    pub connect_concurrency: usize,
    /// Deadline of one connect (TCP + WebSocket + `ready`), milliseconds.
    pub connect_timeout_ms: u64,
    /// Events whose per-event "last socket" latency is tracked (indices `0..track_events`).
    pub track_events: usize,
    /// Offer permessage-deflate in the handshake, as browsers do (idle only:
    /// this client cannot read compressed frames).
    #[serde(default)]
    pub offer_deflate: bool,
}

/// Parent → worker.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Send one client ping on every open socket and count the answers.
    Ping { timeout_ms: u64 },
    /// Take every session over `rounds` times with a new socket.
    Takeover { rounds: u32, concurrency: usize, timeout_ms: u64 },
    /// Send the full report.
    Report,
    /// Close every socket and exit.
    Close,
}

/// Running counters of one worker (summed by the parent).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Sockets whose connect sequence finished (ready, or failed).
    pub attempted: u64,
    /// Sockets that got `ready` (Daisi) or `PONG` after `SUB` (NATS).
    pub connected: u64,
    pub failed: u64,
    /// Measured (non-warm-up) events received, duplicates excluded.
    pub received: u64,
    /// Warm-up events received.
    pub warm: u64,
    /// Sockets that received at least one warm-up event.
    pub warm_sockets: u64,
    /// Events received again by the same socket (by stream seq, else by
    /// the payload's index); each is dropped, as an application would.
    pub duplicates: u64,
    /// Events received after a later one (counted in `received` too).
    #[serde(default)]
    pub reordered: u64,
    /// Frames that were not what the protocol promises.
    pub malformed: u64,
    /// Sockets closed by the server or the network while held.
    pub closed: u64,
    /// Server pings seen (the client answers them).
    pub server_pings: u64,
    /// Client pings sent / answered.
    pub pings_sent: u64,
    pub pongs: u64,
    /// Takeovers: done (new socket ready and old one closed with 4402) / failed.
    pub takeovers: u64,
    pub takeover_failed: u64,
    /// Sockets that dropped and got `ready` again on their fallback URL / gave up.
    #[serde(default)]
    pub reconnected: u64,
    #[serde(default)]
    pub reconnect_failed: u64,
    /// Reconnect attempts that failed and were retried.
    #[serde(default)]
    pub reconnect_retries: u64,
}

impl Progress {
    /// Adds another worker's counters.
    pub fn add(&mut self, o: &Progress) {
        self.attempted += o.attempted;
        self.connected += o.connected;
        self.failed += o.failed;
        self.received += o.received;
        self.warm += o.warm;
        self.warm_sockets += o.warm_sockets;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.malformed += o.malformed;
        self.closed += o.closed;
        self.server_pings += o.server_pings;
        self.pings_sent += o.pings_sent;
        self.pongs += o.pongs;
        self.takeovers += o.takeovers;
        self.takeover_failed += o.takeover_failed;
        self.reconnected += o.reconnected;
        self.reconnect_failed += o.reconnect_failed;
        self.reconnect_retries += o.reconnect_retries;
    }
}

/// A histogram as `(value, count)` pairs (values in nanoseconds).
pub type Buckets = Vec<(u64, u64)>;

/// The worker's final numbers.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct WorkerReport {
    pub progress: Progress,
    /// Publish → receive latency of measured events.
    pub latency: Buckets,
    /// Per tracked event: the largest latency seen by this worker, microseconds (0 = not seen).
    pub per_event_max_us: Vec<u32>,
    /// New socket's connect start → its `ready`.
    pub takeover_latency: Buckets,
    /// New socket's connect start → old socket's 4402 close.
    pub takeover_old_closed: Buckets,
    /// Wall time of the connect phase, milliseconds.
    pub connect_ms: u64,
    /// Wall time of the takeover phase, milliseconds.
    pub takeover_ms: u64,
    /// The worker's own resident memory, KiB.
    pub rss_kb: u64,
    /// The first few distinct errors.
    pub errors: Vec<String>,
    /// Sockets connected, per group.
    pub connected_per_group: Vec<u64>,
}

/// Worker → parent.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Event {
    /// Periodic counters.
    Progress(Progress),
    /// Every socket finished its connect sequence.
    Connected { progress: Progress, connect_ms: u64 },
    /// A [`Command::Ping`] finished.
    PingDone { progress: Progress },
    /// A [`Command::Takeover`] finished.
    TakeoverDone { progress: Progress, takeover_ms: u64 },
    /// Answer to [`Command::Report`].
    Report(Box<WorkerReport>),
}

/// The payload the publisher sends and the clients parse.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Payload {
    /// Publish time, unix nanoseconds.
    pub ts: i64,
    /// Event index within the run (per kind).
    pub i: u64,
    /// Warm-up event (not measured).
    #[serde(default)]
    pub w: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_one_line() {
        let e = Event::Connected { progress: Progress { connected: 3, ..Default::default() }, connect_ms: 5 };
        let line = serde_json::to_string(&e).unwrap();
        assert!(!line.contains('\n'));
        match serde_json::from_str::<Event>(&line).unwrap() {
            Event::Connected { progress, connect_ms } => {
                assert_eq!(progress.connected, 3);
                assert_eq!(connect_ms, 5);
            }
            other => panic!("{other:?}"),
        }
        let c: Command = serde_json::from_str(r#"{"cmd":"ping","timeout_ms":10}"#).unwrap();
        assert!(matches!(c, Command::Ping { timeout_ms: 10 }));
    }

    #[test]
    fn payload_ignores_extra_fields() {
        let p: Payload = serde_json::from_str(r#"{"ts":5,"i":2,"pad":"x"}"#).unwrap();
        assert_eq!(p, Payload { ts: 5, i: 2, w: false });
    }
}

//! Hostile and broken clients against a real edge (real Redis and NATS):
//! illegal frames, floods, half-sent messages and peers that stop reading.
//! Each test asserts what the user notices: a close code, and that the same
//! user can connect again at once.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use daisi_testkit::ws::{Seen, WsClient, user_token};
use daisi_testkit::{API_KEY, eventually};
use support::{RunningEdge, Servers, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

/// A WebSocket client that writes raw bytes, so it can send what no library would.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One server frame: opcode and payload.
#[derive(Debug)]
struct Frame {
    opcode: u8,
    payload: Vec<u8>,
}

impl Raw {
    /// Connects and completes the handshake; `rcvbuf` shrinks the TCP
    /// receive buffer (a peer whose window closes after a few KiB).
    async fn connect(addr: SocketAddr, path: &str, rcvbuf: Option<u32>) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let mut stream = socket.connect(addr).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(T, stream.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0, "connection closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buf.drain(..end);
        Self { stream, buf }
    }

    /// A masked client frame with a payload of any length.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x5a, 0xa5, 0x3c, 0xc3];
        let mut out = vec![first];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next server frame, or `None` once the connection ends.
    async fn next(&mut self, within: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await;
            match read.expect("nothing received in time") {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next text message as JSON, skipping pings and pongs.
    async fn json(&mut self) -> serde_json::Value {
        loop {
            let f = self.next(T).await.expect("a message");
            match f.opcode {
                0x1 => return serde_json::from_slice(&f.payload).unwrap(),
                0x9 | 0xa => continue,
                op => panic!("expected a text message, got opcode {op:#x}"),
            }
        }
    }

    /// Reads up to the server's close frame and returns its code (skipping
    /// events and control frames); `None` if the connection ended without one.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            let f = self.next(T).await?;
            if f.opcode == 0x8 {
                return f.payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            }
        }
    }
}

fn parse_server_frame(b: &[u8]) -> Option<(Frame, usize)> {
    let (&b0, &b1) = (b.first()?, b.get(1)?);
    assert_eq!(b1 & 0x80, 0, "server frames are never masked");
    let (header, len) = match b1 & 0x7f {
        126 => (4, u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize),
        127 => (10, u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize),
        n => (2, n as usize),
    };
    let payload = b.get(header..header + len)?.to_vec();
    Some((Frame { opcode: b0 & 0x0f, payload }, header + len))
}

fn user_path(company: &str, agent: &str, user: &str) -> String {
    format!("/ws/{company}/{agent}?token={}&x-api-key={API_KEY}", user_token(company, agent, user, 60))
}

#[tokio::test]
async fn overflow_frame_closes_with_1002_and_the_same_user_connects_again_at_once() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    assert!(
        edge.metrics().await.lines().any(|l| l == "dws_socket_task_panics_total 0"),
        "the panic counter is registered from the start"
    );
    let mut raw = Raw::connect(edge.addr(), &user_path("c1", "a1", "u1"), None).await;
    assert_eq!(raw.json().await["type"], "ready");
    // FIN=0 one-byte text, then a continuation whose 64-bit length is all ones.
    raw.send(&Raw::frame(0x01, b"x")).await;
    let mut overflow = vec![0x00, 0x80 | 127];
    overflow.extend_from_slice(&[0xff; 8]);
    overflow.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    raw.send(&overflow).await;
    assert_eq!(raw.close_code().await, Some(1002));

    // The same user, at once: the session was released.
    let mut again = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    again.expect_ready().await;
    assert_eq!(metric(&edge.metrics().await, "dws_socket_task_panics_total"), 0.0);
    assert_eq!(metric(&edge.metrics().await, "dws_active_connections{kind=\"user\"}"), 1.0);
}

#[tokio::test]
async fn illegal_lengths_and_close_codes_close_with_1002() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let masked_header = |len7: u8, extended: &[u8]| {
        let mut f = vec![0x81, 0x80 | len7];
        f.extend_from_slice(extended);
        f.extend_from_slice(&[1, 2, 3, 4]);
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("top bit of a 64-bit length", masked_header(127, &[0x80, 0, 0, 0, 0, 0, 0, 1])),
        ("5 encoded in 16 bits", masked_header(126, &[0, 5])),
        ("300 encoded in 64 bits", masked_header(127, &[0, 0, 0, 0, 0, 0, 1, 44])),
        ("close code 1005", Raw::frame(0x88, &[0x03, 0xed])),
        ("close code 2999", Raw::frame(0x88, &[0x0b, 0xb7])),
    ];
    for (i, (what, wire)) in cases.into_iter().enumerate() {
        let mut raw = Raw::connect(edge.addr(), &user_path("c1", "a1", &format!("u{i}")), None).await;
        assert_eq!(raw.json().await["type"], "ready");
        raw.send(&wire).await;
        assert_eq!(raw.close_code().await, Some(1002), "{what}");
    }
}

#[tokio::test]
async fn ping_flood_closes_with_4429() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.app.client_max_messages_per_second = 1;
    cfg.app.client_burst = 5;
    let edge = RunningEdge::start(cfg).await;
    let mut raw = Raw::connect(edge.addr(), &user_path("c1", "a1", "u1"), None).await;
    assert_eq!(raw.json().await["type"], "ready");
    let mut flood = Vec::new();
    for _ in 0..50 {
        flood.extend(Raw::frame(0x89, b"ping"));
    }
    raw.send(&flood).await;
    let error = raw.json().await;
    assert_eq!(error["payload"]["code"], "RateLimitExceeded", "{error}");
    assert_eq!(raw.close_code().await, Some(4429));
}

#[tokio::test]
async fn a_fragmented_message_left_open_is_closed_at_its_deadline() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.app.ping_interval_seconds = 1;
    cfg.app.pong_wait_seconds = 2;
    let edge = RunningEdge::start(cfg).await;
    let mut raw = Raw::connect(edge.addr(), &user_path("c1", "a1", "u1"), None).await;
    assert_eq!(raw.json().await["type"], "ready");
    raw.send(&Raw::frame(0x01, b"{\"type\":")).await;
    // The client stays chatty (pings), so only the message's own deadline can end it.
    let (mut read, mut write) = raw.stream.into_split();
    let pinger = tokio::spawn(async move {
        for _ in 0..40 {
            if write.write_all(&Raw::frame(0x89, b"")).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let mut buf = std::mem::take(&mut raw.buf);
    let code = tokio::time::timeout(T, async {
        loop {
            if let Some((f, used)) = parse_server_frame(&buf) {
                buf.drain(..used);
                if f.opcode == 0x8 {
                    return f.payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                }
                continue;
            }
            let mut chunk = [0u8; 4096];
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("closed within the deadline");
    pinger.abort();
    assert_eq!(code, Some(1008));
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_taken_over_within_the_takeover_wait() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let mut stuck = Raw::connect(edge.addr(), &user_path("c1", "a1", "u1"), Some(4096)).await;
    assert_eq!(stuck.json().await["type"], "ready");
    // Fill the path to the peer: its window closes and the edge's writes stall.
    let payload = format!(r#"{{"blob":"{}"}}"#, "z".repeat(30 * 1024));
    for seq in 1..=300 {
        edge.publish("websocket.c1.a1.chats", seq, &payload);
        if seq % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Pings the edge must answer while it cannot write: answering them must not wedge it.
    let mut pings = Vec::new();
    for _ in 0..10 {
        pings.extend(Raw::frame(0x89, b"are you there"));
    }
    stuck.send(&pings).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The same user on a new socket takes the session over (4402 goes to the old one).
    let mut fresh = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    match fresh.next(T).await {
        Seen::Json(v) => assert_eq!(v["type"], "ready", "takeover of a peer that does not read: {v}"),
        other => panic!("expected ready, got {other:?}"),
    }
    eventually(T, "one user socket left", || async {
        (metric(&edge.metrics().await, "dws_active_connections{kind=\"user\"}") == 1.0).then_some(())
    })
    .await;
}

/// Sends a handshake with `extra` headers (and `version`, `key`); returns the response head.
async fn handshake_head(addr: SocketAddr, version: &str, key: &str, extra: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n{extra}\r\n",
        user_path("c1", "a1", "u1")
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(T, stream.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn handshake_version_key_and_window_bits() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let head = handshake_head(edge.addr(), "8", key, "").await;
    assert!(head.starts_with("http/1.1 426"), "{head}");
    assert!(head.contains("sec-websocket-version: 13"), "{head}");
    for bad_key in ["abc", "dGhlIHNhbXBsZSBub25jZQ", "dGhlIHNhbXBsZSBub25jZQ=!", "AAAAAAAAAAAAAAAAAAAAAAAAAAAA"] {
        let head = handshake_head(edge.addr(), "13", bad_key, "").await;
        assert!(head.starts_with("http/1.1 400"), "{bad_key}: {head}");
    }
    let head = handshake_head(
        edge.addr(),
        "13",
        key,
        "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=15\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let ext = head.lines().find(|l| l.starts_with("sec-websocket-extensions:")).unwrap_or_default();
    assert!(ext.contains("permessage-deflate") && ext.contains("server_max_window_bits=15"), "{head}");
    let head = handshake_head(
        edge.addr(),
        "13",
        "AQIDBAUGBwgJCgsMDQ4PEA==",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 101") && !head.contains("server_max_window_bits"), "{head}");
}

/// Whether the server closed `stream` (EOF or reset) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut chunk = [0u8; 256];
    loop {
        match tokio::time::timeout(within, stream.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A response (a 408, say) may come before the close.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn slowloris_connections_are_closed_after_the_header_timeout_while_clients_still_connect() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.server.header_read_timeout_ms = 1500;
    let edge = RunningEdge::start(cfg).await;
    // 1,000 connections that each send one byte of a request line and stall.
    let mut slow = Vec::new();
    for _ in 0..1000 {
        let mut c = TcpStream::connect(edge.addr()).await.unwrap();
        c.write_all(b"G").await.unwrap();
        slow.push(c);
    }
    // A normal client still gets in meanwhile.
    let mut c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    c.expect_ready().await;
    // Every stalled connection is closed once its headers time out.
    for (i, conn) in slow.iter_mut().enumerate() {
        assert!(closed_within(conn, T).await, "slow connection {i} still open");
    }
    // The WebSocket, idle for longer than the header timeout, is untouched.
    c.send_text(r#"{"type":"select_chat","payload":{"chat_id":"x"}}"#).await;
    c.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(edge.publish("websocket.c1.a1.chats", 1, "{}"), 1);
    assert_eq!(c.event(T).await["seq"], 1);
}

#[tokio::test]
async fn connections_not_yet_upgraded_are_limited_and_upgraded_ones_are_not() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.server.max_pending_connections = 3;
    cfg.server.header_read_timeout_ms = 60_000;
    let edge = RunningEdge::start(cfg).await;
    // Upgraded sockets leave the pending count: more than 3 can be open.
    let mut sockets = Vec::new();
    for i in 0..5 {
        let mut c = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", &format!("u{i}"), 60))).await;
        c.expect_ready().await;
        sockets.push(c);
    }
    // Three idle connections fill the pending slots; the fourth is closed at once.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(edge.addr()).await.unwrap());
    }
    // Let the edge accept them before the next one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(edge.addr()).await.unwrap();
    assert!(closed_within(&mut extra, T).await, "a connection over the pending limit is closed");
    // Once they go, new connections are served again (and the refusal was counted).
    drop(idle);
    eventually(T, "served again", || async {
        let (status, _) = support::http(edge.addr(), "GET", "/health", &[], "").await;
        (status == 200).then_some(())
    })
    .await;
    let text = edge.metrics().await;
    assert!(metric(&text, "dws_connections_refused_total{reason=\"pending_limit\"}") >= 1.0);
}

#[tokio::test]
async fn a_full_edge_still_authenticates_first() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.server.max_connections = 1;
    let edge = RunningEdge::start(cfg).await;
    let mut first = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u1", 60))).await;
    first.expect_ready().await;
    // A bad token learns it is a bad token (4403), not that the edge is full.
    let mut bad = WsClient::connect(&edge.user_url("c1", "a1", "not-a-token")).await;
    bad.expect_error_then_close("InvalidToken", 4403).await;
    let mut second = WsClient::connect(&edge.user_url("c1", "a1", &user_token("c1", "a1", "u2", 60))).await;
    assert_eq!(second.next(T).await, Seen::Closed(Some(1013)));
}

#[tokio::test]
async fn a_protocol_error_with_input_still_arriving_ends_with_the_close_frame_and_no_reset() {
    let s = Servers::start();
    let edge = RunningEdge::start(s.config()).await;
    let mut raw = Raw::connect(edge.addr(), &user_path("c1", "a1", "u1"), None).await;
    assert_eq!(raw.json().await["type"], "ready");
    // A frame with a reserved bit set (no extension was negotiated), then
    // more bytes than the edge reads at once, as a client still sending would.
    let mut wire = vec![0xc1, 0x80, 1, 2, 3, 4];
    wire.extend(std::iter::repeat_n(0x42, 256 * 1024));
    raw.send(&wire).await;
    // Let the edge act (close, and in the past reset) before reading anything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(raw.close_code().await, Some(1002), "the close frame arrives");
    // The client answers the close, as browsers do: a socket the edge had
    // already reset refuses the write (and a browser reports an unclean close).
    let answer = raw.stream.write_all(&Raw::frame(0x88, &1002u16.to_be_bytes())).await;
    assert!(answer.is_ok(), "the edge reset the connection before the client could answer its close: {answer:?}");
    // Then the connection ends with the edge's FIN once we close ours, not a reset.
    raw.stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(T, raw.stream.read_to_end(&mut rest)).await.expect("the edge closes");
    assert!(end.is_ok(), "the connection ended with a reset: {end:?}");
}

/// The hub writes events straight to a socket whose writer is idle; the
/// socket's own task writes pongs. With more than the kernel buffers hold
/// (a peer reading nothing for a while), direct writes are cut short
/// mid-frame and the pongs queue up: the wire must still be whole frames,
/// every event once and in order, and every ping answered in order.
#[tokio::test]
async fn events_written_by_the_hub_and_pongs_of_the_socket_never_cut_into_each_other() {
    let s = Servers::start();
    let mut cfg = s.config();
    cfg.app.websocket_message_buffer_size = 1000;
    let edge = RunningEdge::start(cfg).await;
    let mut c = Raw::connect(edge.addr(), &user_path("c1", "a1", "u1"), Some(4096)).await;
    assert_eq!(c.json().await["type"], "ready");
    // 4 MiB of events: more than the edge's send buffer and the client's receive buffer.
    let payload = format!(r#"{{"blob":"{}"}}"#, "z".repeat(64 * 1024));
    let events = 64u64;
    for seq in 1..=events {
        assert_eq!(edge.publish("websocket.c1.a1.chats", seq, &payload), 1);
        if seq % 8 == 0 {
            c.send(&Raw::frame(0x89, format!("ping {seq}").as_bytes())).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (mut seqs, mut pongs) = (Vec::new(), Vec::new());
    while seqs.len() < events as usize || pongs.len() < (events / 8) as usize {
        // `next` parses every frame: a frame cut into by another fails here.
        let f = c.next(T).await.expect("the edge keeps the socket open");
        match f.opcode {
            0x1 => {
                let v: serde_json::Value = serde_json::from_slice(&f.payload).expect("a whole JSON event");
                assert_eq!(v["payload"]["blob"].as_str().map(str::len), Some(64 * 1024));
                seqs.push(v["seq"].as_u64().unwrap());
            }
            0xa => pongs.push(String::from_utf8(f.payload).unwrap()),
            0x9 => {}
            op => panic!("unexpected opcode {op:#x}"),
        }
    }
    assert_eq!(seqs, (1..=events).collect::<Vec<_>>(), "every event once, in order");
    let pinged: Vec<String> = (8..=events).step_by(8).map(|seq| format!("ping {seq}")).collect();
    assert_eq!(pongs, pinged, "every ping answered, in order");
}

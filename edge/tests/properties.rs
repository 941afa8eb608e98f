//! Property tests of everything that parses client input: the frame
//! decoder, permessage-deflate negotiation and inflate, client JSON and
//! tokens. Whatever the bytes, nothing panics, work stays bounded, and what
//! a correct client sends comes out as sent. The case count is bounded
//! (`PROPTEST_CASES`, default 256 per property) so CI time stays small.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use daisi_common::Secret;
use daisi_common::token::{AdminClaims, TokenKeys, UserClaims};
use daisi_edge::protocol;
use daisi_edge::ws::deflate;
use daisi_edge::ws::frame::{FrameError, Incoming, Reader};
use futures_util::StreamExt;
use proptest::prelude::*;
use tokio::io::{AsyncRead, ReadBuf};

const MAX: usize = 64 * 1024;

/// Everything a reader yields from `wire` (then EOF), with a deadline.
fn read_all(wire: &[u8], deflate: bool, max: usize) -> Vec<Result<Incoming, Option<u16>>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        let reader = Reader::new(wire, deflate, max);
        let all = reader.map(|r| r.map_err(|e: FrameError| e.close_code())).collect::<Vec<_>>();
        tokio::time::timeout(Duration::from_secs(10), all).await.expect("the reader ends")
    })
}

/// Hands out `wire` in reads of the given sizes, in turn, as a network
/// might; at the end, EOF, or (`stall`) a peer that sends nothing more.
struct Chopped {
    wire: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    turn: usize,
    stall: bool,
}

impl AsyncRead for Chopped {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at == this.wire.len() && this.stall {
            return Poll::Pending;
        }
        let size = this.sizes.get(this.turn % this.sizes.len().max(1)).copied().unwrap_or(1).max(1);
        this.turn += 1;
        let end = (this.at + size).min(this.wire.len()).min(this.at + buf.remaining());
        buf.put_slice(&this.wire[this.at..end]);
        this.at = end;
        Poll::Ready(Ok(()))
    }
}

/// What a reader yields from `wire` read in pieces of `sizes` (then EOF).
fn read_chopped(wire: &[u8], sizes: &[usize], deflate: bool) -> Vec<Result<Incoming, Option<u16>>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        let io = Chopped { wire: wire.to_vec(), at: 0, sizes: sizes.to_vec(), turn: 0, stall: false };
        let all = Reader::new(io, deflate, MAX).map(|r| r.map_err(|e: FrameError| e.close_code())).collect::<Vec<_>>();
        tokio::time::timeout(Duration::from_secs(10), all).await.expect("the reader ends")
    })
}

/// A masked client frame.
fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
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

/// A client message: text or binary, its fragments' sizes, compressed or not.
#[derive(Debug, Clone)]
struct Message {
    binary: bool,
    data: Vec<u8>,
    cuts: Vec<usize>,
    compress: bool,
    mask: [u8; 4],
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<bool>(),
        prop_oneof![proptest::collection::vec(any::<u8>(), 0..300), "[a-zé€😀 ]{0,200}".prop_map(String::into_bytes),],
        proptest::collection::vec(0usize..400, 0..4),
        any::<bool>(),
        any::<[u8; 4]>(),
    )
        .prop_map(|(binary, data, cuts, compress, mask)| {
            // Text must be UTF-8: arbitrary bytes go as binary.
            let binary = binary || std::str::from_utf8(&data).is_err();
            Message { binary, data, cuts, compress, mask }
        })
}

impl Message {
    /// The frames a client sends for this message.
    fn wire(&self) -> Vec<u8> {
        let body = if self.compress { deflate::compress(&self.data).unwrap().to_vec() } else { self.data.clone() };
        let mut cuts: Vec<usize> = self.cuts.iter().map(|c| c % (body.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces = Vec::new();
        let mut from = 0;
        for c in cuts {
            pieces.push(&body[from..c]);
            from = c;
        }
        pieces.push(&body[from..]);
        let mut out = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let fin = if i + 1 == pieces.len() { 0x80 } else { 0 };
            let opcode = if i > 0 {
                0x0
            } else if self.binary {
                0x2
            } else {
                0x1
            };
            let rsv1 = if i == 0 && self.compress { 0x40 } else { 0 };
            out.extend(client_frame(fin | rsv1 | opcode, piece, self.mask));
        }
        out
    }

    fn expected(&self) -> Incoming {
        if self.binary {
            Incoming::Binary(Bytes::from(self.data.clone()))
        } else {
            Incoming::Text(String::from_utf8(self.data.clone()).unwrap())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary bytes: the reader never panics, ends, and closes with a
    /// protocol code (or yields what it could read before EOF).
    #[test]
    fn reader_survives_any_bytes(wire in proptest::collection::vec(any::<u8>(), 0..2048), deflate in any::<bool>()) {
        for item in read_all(&wire, deflate, MAX) {
            if let Err(code) = item {
                prop_assert!(matches!(code, Some(1002 | 1007 | 1009)), "{code:?}");
            }
        }
    }

    /// Headers with hostile lengths (any 16- or 64-bit value) in any order
    /// with real frames: an error, never a panic or a huge allocation.
    #[test]
    fn reader_refuses_hostile_lengths(
        first in any::<u8>(),
        len7 in prop_oneof![Just(126u8), Just(127u8), 0u8..126],
        extended in any::<[u8; 8]>(),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
        prefix in proptest::option::of(message()),
    ) {
        let mut wire = prefix.map(|m| m.wire()).unwrap_or_default();
        wire.extend_from_slice(&[first, 0x80 | len7]);
        wire.extend_from_slice(&extended);
        wire.extend_from_slice(&tail);
        let _ = read_all(&wire, true, MAX);
    }

    /// What a correct client sends (fragmented, compressed, interleaved with
    /// pings) comes out exactly as sent.
    #[test]
    fn reader_round_trips_messages(messages in proptest::collection::vec(message(), 1..6)) {
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for m in &messages {
            wire.extend(m.wire());
            expected.push(Ok(m.expected()));
            wire.extend(client_frame(0x89, b"p", m.mask));
            expected.push(Ok(Incoming::Ping(Bytes::from_static(b"p"))));
        }
        prop_assert_eq!(read_all(&wire, true, MAX), expected);
    }

    /// However the bytes are split into reads (frame headers, payloads and
    /// characters cut anywhere), the reader yields the same, for correct
    /// clients and for a byte gone wrong anywhere.
    #[test]
    fn reads_split_anywhere_give_the_same_result(
        messages in proptest::collection::vec(message(), 1..4),
        flip in proptest::option::of((any::<usize>(), 1u8..=255)),
        sizes in proptest::collection::vec(1usize..48, 1..6),
    ) {
        let mut wire: Vec<u8> = messages.iter().flat_map(Message::wire).collect();
        let expected: Vec<_> = messages.iter().map(|m| Ok(m.expected())).collect();
        prop_assert_eq!(read_chopped(&wire, &sizes, true), expected);
        if let Some((at, bits)) = flip {
            let i = at % wire.len();
            wire[i] ^= bits;
            prop_assert_eq!(read_chopped(&wire, &sizes, true), read_all(&wire, true, MAX));
        }
    }

    /// Invalid text fails (1007) as soon as the byte that makes it invalid
    /// has arrived, though the rest of its frame never comes (Autobahn 6.4.3).
    #[test]
    fn invalid_text_fails_before_its_frame_is_complete(
        text in "[a-zé€😀 ]{0,200}",
        at in any::<usize>(),
        bad in prop_oneof![0x80u8..=0xc1, 0xf5u8..=0xff],
        tail in proptest::collection::vec(any::<u8>(), 0..100),
        sizes in proptest::collection::vec(1usize..48, 1..6),
        mask in any::<[u8; 4]>(),
    ) {
        let boundaries: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        let cut = boundaries[at % boundaries.len()];
        let mut payload = text.as_bytes()[..cut].to_vec();
        payload.push(bad);
        payload.extend_from_slice(&tail);
        let frame = client_frame(0x81, &payload, mask);
        let header = frame.len() - payload.len();
        // Everything up to the bad byte, then silence.
        let wire = frame[..header + cut + 1].to_vec();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let first = rt.block_on(async {
            let io = Chopped { wire, at: 0, sizes: sizes.clone(), turn: 0, stall: true };
            let mut reader = Reader::new(io, false, MAX);
            tokio::time::timeout(Duration::from_secs(10), reader.next()).await
        });
        let first = first.expect("fails without the rest of the frame").map(|r| r.map_err(|e| e.close_code()));
        prop_assert_eq!(first, Some(Err(Some(1007))));
    }

    /// Any `Sec-WebSocket-Extensions` value: no panic, and an accepted offer
    /// always gets the same no-context-takeover answer.
    #[test]
    fn negotiation_survives_any_header(headers in proptest::collection::vec(".{0,120}", 0..3)) {
        if let Some(answer) = deflate::negotiate(headers.iter().map(String::as_str)) {
            prop_assert!(answer.starts_with(deflate::RESPONSE));
        }
    }

    /// Offers built from the real parameters: accepted exactly when the edge
    /// can honour them, `server_max_window_bits` echoed.
    #[test]
    fn negotiation_of_real_offers(params in proptest::collection::vec(
        prop_oneof![
            Just("server_no_context_takeover".to_string()),
            Just("client_no_context_takeover".to_string()),
            Just("client_max_window_bits".to_string()),
            (8u8..=15).prop_map(|b| format!("client_max_window_bits={b}")),
            (8u8..=15).prop_map(|b| format!("server_max_window_bits={b}")),
        ], 0..4)) {
        let offer = std::iter::once("permessage-deflate".to_string()).chain(params.iter().cloned()).collect::<Vec<_>>().join("; ");
        let names: Vec<&str> = params.iter().map(|p| p.split('=').next().unwrap()).collect();
        let repeated = (0..names.len()).any(|i| names[..i].contains(&names[i]));
        let small_window = params.iter().any(|p| p.starts_with("server_max_window_bits=") && p != "server_max_window_bits=15");
        let answer = deflate::negotiate([offer.as_str()]);
        prop_assert_eq!(answer.is_some(), !repeated && !small_window, "{}", offer);
        if let Some(answer) = answer {
            prop_assert_eq!(answer.ends_with("server_max_window_bits=15"), names.contains(&"server_max_window_bits"));
        }
    }

    /// Arbitrary compressed data: inflate never panics and never produces
    /// more than its cap.
    #[test]
    fn inflate_is_bounded(data in proptest::collection::vec(any::<u8>(), 0..4096), cap in 0usize..100_000) {
        match deflate::inflate(&data, cap) {
            Ok(out) => prop_assert!(out.len() <= cap),
            Err(deflate::InflateError::TooBig(c)) => prop_assert_eq!(c, cap),
            Err(deflate::InflateError::Corrupt) => {}
        }
    }

    /// Compressed data cut anywhere never panics; whole data round-trips.
    #[test]
    fn inflate_round_trips_and_survives_cuts(data in proptest::collection::vec(any::<u8>(), 0..5000), cut in any::<usize>()) {
        let packed = deflate::compress(&data).unwrap();
        prop_assert_eq!(deflate::inflate(&packed, data.len()).unwrap(), data.clone());
        let _ = deflate::inflate(&packed[..cut % (packed.len() + 1)], 1 << 20);
    }

    /// Any client text: a parsed message or a BadRequest, never a panic.
    #[test]
    fn client_json_never_panics(text in ".{0,300}") {
        let _ = protocol::parse_client(&text);
    }

    /// JSON-shaped client messages with arbitrary values.
    #[test]
    fn client_json_shapes(kind in ".{0,20}", chat in ".{0,200}", extra in ".{0,20}") {
        let msg = serde_json::json!({"type": kind, "payload": {"chat_id": chat}, extra: 1}).to_string();
        let _ = protocol::parse_client(&msg);
    }

    /// Any token string: refused or accepted, never a panic.
    #[test]
    fn token_decoding_never_panics(token in prop_oneof![".{0,300}", "[A-Za-z0-9_-]{0,400}"]) {
        let keys = TokenKeys::new(&Secret::new(daisi_testkit::USER_AES_KEY), &[]).unwrap();
        let _ = keys.open::<UserClaims>(&token, 0);
        let _ = keys.open::<AdminClaims>(&token, 0);
    }

    /// A real token with one byte flipped is refused.
    #[test]
    fn tampered_tokens_are_refused(index in any::<usize>(), bit in 0u8..6) {
        let token = daisi_testkit::ws::user_token("c1", "a1", "u1", 600);
        let mut bytes = token.into_bytes();
        let i = index % bytes.len();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let pos = alphabet.iter().position(|&c| c == bytes[i]).unwrap_or(0);
        bytes[i] = alphabet[pos ^ (1 << bit)];
        let tampered = String::from_utf8(bytes).unwrap();
        let keys = TokenKeys::new(&Secret::new(daisi_testkit::USER_AES_KEY), &[]).unwrap();
        prop_assert!(keys.open::<UserClaims>(&tampered, 0).is_err());
    }
}

//! permessage-deflate (RFC 7692) without context takeover in either direction:
//! offer negotiation, compressing a server message once for every socket that
//! negotiated it, and inflating client messages under a size cap.
//!
//! No context takeover means a message never refers to an earlier one, so the
//! edge keeps no deflate state per socket: one compressor and one
//! decompressor per thread, reset for each message. A compressed event is
//! therefore the same bytes for every socket and is built once per event.

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension the edge answers with when it accepts an offer: neither side
/// keeps its LZ77 window between messages.
pub const RESPONSE: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// [`RESPONSE`] for an offer that named `server_max_window_bits=15`: a server
/// that accepts such an offer echoes the parameter (RFC 7692 §7.1.2.1).
pub const RESPONSE_WINDOW_15: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15";

/// Compression level for server messages. Each event is compressed once for
/// all its sockets, so a middle level costs little and saves bandwidth on
/// every socket.
const LEVEL: u32 = 6;

/// The four bytes an RFC 7692 sender strips from the end of each message
/// (the empty stored block of a sync flush) and a receiver appends back.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// An empty final block (fixed Huffman, end-of-block only). Fed after the
/// tail, it ends the stream only if the message stopped at a block boundary;
/// data cut short inside a block never reaches the end of the stream.
const END: [u8; 2] = [0x03, 0x00];

/// The `Sec-WebSocket-Extensions` answer to the client's offers, if one of
/// them is a permessage-deflate offer the edge can accept. Offers are tried
/// in the client's order; one that asks the server to use a window under 15
/// bits is declined (the compressor always uses 32 KiB), as is one with
/// unknown, repeated or malformed parameters. `headers` are the values of
/// every `Sec-WebSocket-Extensions` header line.
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    headers.into_iter().flat_map(|h| h.split(',')).find_map(offer_response)
}

/// Whether [`negotiate`] accepts one of the offers.
pub fn accepts<'a>(headers: impl IntoIterator<Item = &'a str>) -> bool {
    negotiate(headers).is_some()
}

fn offer_response(offer: &str) -> Option<&'static str> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next().is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate")) {
        return None;
    }
    let mut seen = [false; 4];
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (param, None),
        };
        let index = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            // The client limits the window we compress with: only 15 fits.
            "server_max_window_bits" if value.and_then(window_bits) == Some(15) => 2,
            "client_max_window_bits" if value.is_none_or(|v| window_bits(v).is_some()) => 3,
            _ => return None,
        };
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
    }
    Some(if seen[2] { RESPONSE_WINDOW_15 } else { RESPONSE })
}

/// A parameter value, bare or as a quoted string (RFC 7692 §5.1).
fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(v),
    }
}

fn window_bits(v: &str) -> Option<u8> {
    // RFC 7692 §7.1.2: 1*DIGIT without leading zeros, 8..=15.
    if v.starts_with('0') {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

thread_local! {
    static COMPRESS: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(LEVEL), false));
    static DECOMPRESS: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Compresses one whole message as RFC 7692 wants it on the wire: raw
/// deflate, sync-flushed, without the trailing `00 00 ff ff`. `None` if the
/// compressor fails (the message is then sent plain, which RFC 7692 allows).
///
/// One call into a buffer with room for the worst case (stored blocks): the
/// Rust backend wrote corrupt streams for some inputs when the output buffer
/// filled up mid-message and the call was repeated with more room (found by
/// Autobahn case 12.2.9; see decision 0026). Should that room ever not
/// suffice, the message goes out plain rather than through that path.
pub fn compress(input: &[u8]) -> Option<Bytes> {
    COMPRESS.with(|c| {
        let mut c = c.borrow_mut();
        c.reset();
        // Stored blocks cost 5 bytes per 64 KiB; the flush and the block
        // headers a few more.
        let room = input.len().saturating_add(input.len() / 8).saturating_add(64);
        let mut out = Vec::with_capacity(room);
        let status = c.compress_vec(input, &mut out, FlushCompress::Sync).ok()?;
        let whole = u64::try_from(input.len()).is_ok_and(|n| c.total_in() == n);
        if status != Status::Ok || !whole || out.len() == out.capacity() {
            return None;
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        // Events wait in socket queues: keep only what the frame needs.
        out.shrink_to_fit();
        Some(Bytes::from(out))
    })
}

/// Why a compressed client message was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// The message inflates to more than the cap (a decompression bomb or an
    /// oversized message): close with 1009.
    #[error("message inflates past {0} bytes")]
    TooBig(usize),
    /// Not a valid deflate stream: close with 1007.
    #[error("invalid compressed data")]
    Corrupt,
}

/// Inflates one compressed client message, refusing to produce more than
/// `cap` bytes (the work is bounded by the cap, whatever the input claims).
/// Data that stops inside a deflate block (truncated) is corrupt.
pub fn inflate(input: &[u8], cap: usize) -> Result<Vec<u8>, InflateError> {
    DECOMPRESS.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let limit = cap.saturating_add(1);
        let mut out = Vec::with_capacity(input.len().saturating_mul(4).clamp(256, limit.max(256)));
        for part in [input, &TAIL[..], &END[..]] {
            let mut rest = part;
            loop {
                if out.len() == out.capacity() {
                    out.reserve(out.capacity().min(limit.saturating_sub(out.len())).max(256));
                }
                let (was_in, was_out) = (d.total_in(), out.len());
                let status =
                    d.decompress_vec(rest, &mut out, FlushDecompress::Sync).map_err(|_| InflateError::Corrupt)?;
                let used = usize::try_from(d.total_in().saturating_sub(was_in)).map_err(|_| InflateError::Corrupt)?;
                rest = rest.get(used..).ok_or(InflateError::Corrupt)?;
                if out.len() > cap {
                    return Err(InflateError::TooBig(cap));
                }
                if status == Status::StreamEnd {
                    // A final block ends the message; anything after it is ignored.
                    return Ok(out);
                }
                if out.len() < out.capacity() {
                    if rest.is_empty() {
                        break;
                    }
                    if used == 0 && out.len() == was_out {
                        // Input left, room left, and no progress: not deflate.
                        return Err(InflateError::Corrupt);
                    }
                }
            }
        }
        // Even the empty final block did not end the stream: the message
        // stopped inside a block.
        Err(InflateError::Corrupt)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        // What Chromium and Firefox offer.
        assert!(accepts(["permessage-deflate; client_max_window_bits"]));
        assert!(accepts(["permessage-deflate"]));
        assert!(accepts(["permessage-deflate; server_no_context_takeover; client_no_context_takeover"]));
        assert!(accepts(["permessage-deflate; server_max_window_bits=15; client_max_window_bits=10"]));
        assert!(accepts(["x-webkit-deflate-frame", "permessage-deflate; client_max_window_bits=\"15\""]));
        // A first offer we cannot honour, then one we can.
        assert!(accepts(["permessage-deflate; server_max_window_bits=10, permessage-deflate"]));
        for refused in [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=09",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; unknown",
        ] {
            assert!(!accepts([refused]), "{refused}");
        }
        assert!(!accepts([]));
        // A window size the client set for the server is echoed when accepted.
        assert_eq!(negotiate(["permessage-deflate; server_max_window_bits=15"]), Some(RESPONSE_WINDOW_15));
        assert_eq!(negotiate(["permessage-deflate; server_max_window_bits=\"15\""]), Some(RESPONSE_WINDOW_15));
        assert_eq!(negotiate(["permessage-deflate; client_max_window_bits"]), Some(RESPONSE));
        assert_eq!(negotiate(["permessage-deflate; client_max_window_bits=\"15"]), None);
    }

    #[test]
    fn truncated_data_is_corrupt() {
        let text: String = (0..300).map(|i| format!("{i} words, ")).collect();
        let packed = compress(text.as_bytes()).unwrap();
        assert_eq!(inflate(&packed, 1 << 20).unwrap(), text.as_bytes());
        for cut in [1, 2, 5, packed.len() / 2, packed.len() - 1] {
            assert_eq!(inflate(&packed[..cut], 1 << 20), Err(InflateError::Corrupt), "cut at {cut}");
        }
        // A message ending in a final block (BFINAL) is whole without the tail.
        let mut c = Compress::new(Compression::fast(), false);
        let mut out = Vec::with_capacity(1024);
        c.compress_vec(b"final", &mut out, FlushCompress::Finish).unwrap();
        assert_eq!(inflate(&out, 100).unwrap(), b"final");
    }

    #[test]
    fn round_trip_without_context() {
        let json = br#"{"type":"event","payload":{"text":"hello hello hello hello hello"}}"#.repeat(40);
        let packed = compress(&json).unwrap();
        assert!(packed.len() < json.len() / 5, "{} -> {}", json.len(), packed.len());
        assert!(!packed.ends_with(&TAIL));
        // Each message stands alone: the same input gives the same bytes.
        assert_eq!(compress(&json).unwrap(), packed);
        assert_eq!(inflate(&packed, 1 << 20).unwrap(), json);
        assert_eq!(inflate(&compress(b"").unwrap(), 10).unwrap(), b"");
        // A stream written with flate2's own sync-flush framing inflates too.
        let mut c = Compress::new(Compression::fast(), false);
        let mut out = Vec::with_capacity(1024);
        c.compress_vec(b"abcabcabc", &mut out, FlushCompress::Sync).unwrap();
        assert_eq!(inflate(&out[..out.len() - 4], 100).unwrap(), b"abcabcabc");
    }

    #[test]
    fn large_poorly_compressible_messages_round_trip() {
        // Messages that need more output than half their size: the case that
        // corrupted streams when the compressor was called again for room.
        let mut x: u32 = 0x1234_5678;
        for len in [1000, 40_000, 65_536, 131_072, 300_000] {
            let data: Vec<u8> = (0..len)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    if x.is_multiple_of(3) { (i / 512) as u8 } else { x as u8 }
                })
                .collect();
            let packed = compress(&data).expect("compressed");
            assert!(packed.len() > len / 2, "{len}: {}", packed.len());
            assert_eq!(inflate(&packed, 1 << 20).unwrap(), data, "{len}");
        }
    }

    #[test]
    fn inflate_is_capped_and_rejects_garbage() {
        // 10 MB of zeros compress to ~10 KB: a bomb for a naive inflater.
        let bomb = compress(&vec![0u8; 10 << 20]).unwrap();
        assert!(bomb.len() < 20_000);
        assert_eq!(inflate(&bomb, 64 * 1024), Err(InflateError::TooBig(64 * 1024)));
        let ok = vec![b'a'; 64 * 1024];
        assert_eq!(inflate(&compress(&ok).unwrap(), 64 * 1024).unwrap(), ok);
        let over = vec![b'a'; 64 * 1024 + 1];
        assert_eq!(inflate(&compress(&over).unwrap(), 64 * 1024), Err(InflateError::TooBig(64 * 1024)));
        assert_eq!(inflate(&[0xff, 0xff, 0xff, 0xff, 0x00], 1024), Err(InflateError::Corrupt));
        // Still usable after an error.
        assert_eq!(inflate(&compress(b"fine").unwrap(), 1024).unwrap(), b"fine");
    }
}

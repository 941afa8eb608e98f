//! RFC 6455 framing, server side: a reader that turns client bytes into
//! messages (unmasking, reassembly, limits, permessage-deflate) and a writer
//! that puts whole prebuilt frames on the wire without copying them.
//!
//! Server frames are built once (`text`, `compressed_text`, …) as complete
//! wire bytes, so one event frame is a single shared allocation that every
//! socket writes as is. An idle socket holds no buffer at all: reads go
//! through a stack chunk and only a partial frame is kept on the heap.
//!
//! Every length read from the wire is checked before it is used: a length
//! with the top bit set or encoded in more bytes than needed is a protocol
//! error (1002), sums are checked, and buffers grow with the bytes that
//! actually arrive, never to a length a header merely declares.
//!
//! This module, with `deflate` and `upgrade`, is the edge's WebSocket codec:
//! it depends on nothing else of the edge, so the echo harness
//! (`edge/examples/echo.rs`) runs the conformance suite on exactly this code.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::deflate;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;

/// Bytes read from the socket per read call. It lives on the stack during
/// the read, so it costs an idle socket nothing.
const READ_CHUNK: usize = 4 * 1024;

/// A whole unmasked server frame: header and payload in one allocation.
fn encode(first: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len().saturating_add(10));
    out.extend_from_slice(&[first]);
    match payload.len() {
        n @ 0..=125 => out.extend_from_slice(&[n as u8]),
        n @ 126..=0xffff => {
            out.extend_from_slice(&[126]);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.extend_from_slice(&[127]);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out.freeze()
}

/// A text frame carrying `text` uncompressed.
pub fn text(text: &[u8]) -> Bytes {
    encode(FIN | OP_TEXT, text)
}

/// A text frame whose payload is already permessage-deflate compressed
/// (RSV1 set). Only for sockets that negotiated the extension.
pub fn compressed_text(deflated: &[u8]) -> Bytes {
    encode(FIN | RSV1 | OP_TEXT, deflated)
}

/// A binary frame carrying `data` uncompressed.
pub fn binary(data: &[u8]) -> Bytes {
    encode(FIN | OP_BINARY, data)
}

/// A binary frame whose payload is already permessage-deflate compressed.
pub fn compressed_binary(deflated: &[u8]) -> Bytes {
    encode(FIN | RSV1 | OP_BINARY, deflated)
}

/// An empty ping.
pub fn ping() -> Bytes {
    Bytes::from_static(&[FIN | OP_PING, 0])
}

/// A pong echoing the ping's payload (at most 125 bytes, checked on read).
pub fn pong(payload: &[u8]) -> Bytes {
    encode(FIN | OP_PONG, &payload[..payload.len().min(125)])
}

/// A close frame with `code` and a reason cut to fit a control frame.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(FIN | OP_CLOSE, &payload)
}

/// Whether `code` may appear in a close frame on the wire (RFC 6455 §7.4:
/// the defined codes, the IANA-registered 1012–1014, and 3000–4999).
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A message (or control frame) from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The client's close frame and its code, if it sent one.
    Close(Option<u16>),
}

/// Why reading from a client failed, each with the close code it earns.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// RFC 6455 violation: 1002.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// A message (before or after inflating) over the limit: 1009.
    #[error("message too big")]
    TooBig,
    /// Text that is not UTF-8, or compressed data that does not inflate: 1007.
    #[error("invalid data: {0}")]
    BadData(&'static str),
}

impl FrameError {
    /// The close code to send, or `None` when the connection is already gone.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            FrameError::Io(_) => None,
            FrameError::Protocol(_) => Some(1002),
            FrameError::TooBig => Some(1009),
            FrameError::BadData(_) => Some(1007),
        }
    }
}

/// A fragmented data message being reassembled.
struct Partial {
    opcode: u8,
    compressed: bool,
    data: Vec<u8>,
}

/// A parsed frame header.
#[derive(Debug)]
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header length in bytes.
    len: usize,
    payload_len: usize,
}

/// Parses the frame header at the start of `b`: `Ok(None)` while it is
/// incomplete. `in_message`: bytes of a fragmented message received so far,
/// if one is open. Every length is checked here, before anything is buffered.
fn parse_header(
    b: &[u8],
    in_message: Option<usize>,
    deflate: bool,
    max_message: usize,
) -> Result<Option<Header>, FrameError> {
    let (Some(&b0), Some(&b1)) = (b.first(), b.get(1)) else { return Ok(None) };
    let (fin, rsv1, opcode) = (b0 & FIN != 0, b0 & RSV1 != 0, b0 & 0x0f);
    if b0 & 0x30 != 0 {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    match opcode {
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin {
                return Err(FrameError::Protocol("fragmented control frame"));
            }
            if rsv1 {
                return Err(FrameError::Protocol("RSV1 on a control frame"));
            }
        }
        OP_CONTINUATION => {
            if in_message.is_none() {
                return Err(FrameError::Protocol("continuation without a message"));
            }
            if rsv1 {
                return Err(FrameError::Protocol("RSV1 on a continuation frame"));
            }
        }
        OP_TEXT | OP_BINARY => {
            if in_message.is_some() {
                return Err(FrameError::Protocol("new message inside a fragmented one"));
            }
            if rsv1 && !deflate {
                return Err(FrameError::Protocol("RSV1 without permessage-deflate"));
            }
        }
        _ => return Err(FrameError::Protocol("unknown opcode")),
    }
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("client frames must be masked"));
    }
    let (len_bytes, declared): (usize, u64) = match b1 & 0x7f {
        126 => {
            let Some(raw) = b.get(2..4) else { return Ok(None) };
            let n = u16::from_be_bytes([raw[0], raw[1]]);
            if n < 126 {
                return Err(FrameError::Protocol("length not minimally encoded"));
            }
            (2, u64::from(n))
        }
        127 => {
            let Some(raw) = b.get(2..10) else { return Ok(None) };
            let mut be = [0u8; 8];
            be.copy_from_slice(raw);
            let n = u64::from_be_bytes(be);
            if n >> 63 != 0 {
                return Err(FrameError::Protocol("length with the most significant bit set"));
            }
            if n <= 0xffff {
                return Err(FrameError::Protocol("length not minimally encoded"));
            }
            (8, n)
        }
        n => (0, u64::from(n)),
    };
    if opcode & 0x8 != 0 {
        if declared > 125 {
            return Err(FrameError::Protocol("control frame over 125 bytes"));
        }
    } else {
        let so_far = u64::try_from(in_message.unwrap_or(0)).map_err(|_| FrameError::TooBig)?;
        let total = so_far.checked_add(declared).ok_or(FrameError::TooBig)?;
        if total > u64::try_from(max_message).unwrap_or(u64::MAX) {
            return Err(FrameError::TooBig);
        }
    }
    let payload_len = usize::try_from(declared).map_err(|_| FrameError::TooBig)?;
    let len = 2 + len_bytes + 4;
    let Some(raw) = b.get(len - 4..len) else { return Ok(None) };
    let mut mask = [0; 4];
    mask.copy_from_slice(raw);
    Ok(Some(Header { fin, rsv1, opcode, mask, len, payload_len }))
}

/// Unmasks `payload` in place (`offset`: its position in the frame's payload).
fn unmask(payload: &mut [u8], mut mask: [u8; 4], offset: usize) {
    mask.rotate_left(offset % 4);
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let mut v = [0u8; 4];
        v.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u32::from_ne_bytes(v) ^ word).to_ne_bytes());
    }
    for (byte, m) in chunks.into_remainder().iter_mut().zip(mask) {
        *byte ^= m;
    }
}

/// UTF-8 validation of text that arrives in pieces (fragments, and the
/// parts of a frame as they are read), so invalid text fails as soon as the
/// bytes that make it invalid arrive: it keeps only the bytes of a character
/// not yet complete.
#[derive(Debug, Default, Clone, Copy)]
struct Utf8 {
    carry: [u8; 4],
    len: usize,
}

const NOT_UTF8: FrameError = FrameError::BadData("text is not UTF-8");

impl Utf8 {
    /// Checks `bytes` as the continuation of the text so far. A character
    /// cut at the end is fine: the next piece may complete it.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), FrameError> {
        // First complete (or refute) the character carried from before.
        while self.len > 0 {
            let Some((&b, rest)) = bytes.split_first() else { return Ok(()) };
            bytes = rest;
            let slot = self.carry.get_mut(self.len).ok_or(NOT_UTF8)?;
            *slot = b;
            self.len += 1;
            match std::str::from_utf8(&self.carry[..self.len]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_none() => {}
                Err(_) => return Err(NOT_UTF8),
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let cut = bytes.get(e.valid_up_to()..).unwrap_or_default();
                self.carry.get_mut(..cut.len()).ok_or(NOT_UTF8)?.copy_from_slice(cut);
                self.len = cut.len();
                Ok(())
            }
            Err(_) => Err(NOT_UTF8),
        }
    }

    /// The text is complete: no character may be left cut.
    fn end(&self) -> Result<(), FrameError> {
        if self.len == 0 { Ok(()) } else { Err(NOT_UTF8) }
    }
}

/// Reads client messages from `R`.
pub struct Reader<R> {
    io: R,
    /// Bytes of an incomplete frame; empty, and unallocated, between frames.
    buf: BytesMut,
    partial: Option<Box<Partial>>,
    /// Payload bytes of the frame at the head of `buf` already unmasked in
    /// place (and checked, for text): each byte is looked at once, as it arrives.
    scanned: usize,
    /// Validation state of the plain text message being received.
    utf8: Utf8,
    /// Since when a message has been incomplete (a frame partly received, or
    /// a fragmented message still open); `None` between messages.
    incomplete_since: Option<Instant>,
    deflate: bool,
    max_message: usize,
    done: bool,
    /// Set with `done` when the input could not be parsed (not at its end).
    unparsable: bool,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// `deflate`: the socket negotiated permessage-deflate. `max_message`:
    /// the largest message accepted, on the wire and after inflating.
    pub fn new(io: R, deflate: bool, max_message: usize) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            partial: None,
            scanned: 0,
            utf8: Utf8::default(),
            incomplete_since: None,
            deflate,
            max_message,
            done: false,
            unparsable: false,
        }
    }

    /// Since when the client has left a message incomplete (part of a frame,
    /// or a fragmented message without its final frame), if it has. The
    /// socket's owner closes a client that takes too long (see 0011).
    pub fn incomplete_since(&self) -> Option<Instant> {
        self.incomplete_since
    }

    /// The transport, to drain what the client still sends after a close:
    /// a socket closed with unread input is reset, and a reset can make the
    /// client's TCP stack discard what it received but has not read yet
    /// (the last replies and the close frame).
    pub fn into_inner(self) -> R {
        self.io
    }

    /// Whether reading stopped at input that is not valid WebSocket framing
    /// (the client may still be sending; its bytes can only be dropped raw).
    pub fn unparsable(&self) -> bool {
        self.unparsable
    }

    /// Bytes this reader holds for an incomplete message (for tests and
    /// the idle-cost budget).
    pub fn held_bytes(&self) -> usize {
        self.buf.capacity() + self.partial.as_ref().map_or(0, |p| p.data.capacity())
    }

    /// The next complete message in the buffer, if there is one.
    fn parse(&mut self) -> Result<Option<Incoming>, FrameError> {
        loop {
            let in_message = self.partial.as_ref().map(|p| p.data.len());
            let Some(h) = parse_header(&self.buf, in_message, self.deflate, self.max_message)? else {
                return Ok(None);
            };
            let total = h.len.checked_add(h.payload_len).ok_or(FrameError::TooBig)?;
            // Plain text is checked as it arrives, so a client sending
            // invalid text fails at once, not when its frame is complete.
            let text = match h.opcode {
                OP_TEXT => !h.rsv1,
                OP_CONTINUATION => self.partial.as_ref().is_some_and(|p| p.opcode == OP_TEXT && !p.compressed),
                _ => false,
            };
            if text && h.opcode == OP_TEXT && self.scanned == 0 {
                self.utf8 = Utf8::default();
            }
            let arrived = self.buf.len().min(total);
            let from = h.len.saturating_add(self.scanned);
            let fresh = self.buf.get_mut(from..arrived).unwrap_or_default();
            unmask(fresh, h.mask, self.scanned);
            if text {
                self.utf8.feed(fresh)?;
            }
            self.scanned = arrived.saturating_sub(h.len);
            if arrived < total {
                // Grows only as bytes arrive (see `poll_next`).
                return Ok(None);
            }
            self.scanned = 0;
            if text && h.fin {
                self.utf8.end()?;
            }
            let frame = self.buf.split_to(total);
            if self.buf.is_empty() {
                // Give the allocation back: an idle socket keeps no buffer.
                self.buf = BytesMut::new();
            }
            let payload = frame.get(h.len..).unwrap_or_default().to_vec();
            drop(frame);
            match h.opcode {
                OP_PING => return Ok(Some(Incoming::Ping(payload.into()))),
                OP_PONG => return Ok(Some(Incoming::Pong)),
                OP_CLOSE => return close_code(&payload).map(|c| Some(Incoming::Close(c))),
                OP_CONTINUATION => {
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(FrameError::Protocol("continuation without a message"));
                    };
                    partial.data.extend_from_slice(&payload);
                    if h.fin {
                        let Some(p) = self.partial.take() else {
                            return Err(FrameError::Protocol("continuation without a message"));
                        };
                        let Partial { opcode, compressed, data, .. } = *p;
                        return self.finish(opcode, compressed, data).map(Some);
                    }
                }
                opcode => {
                    if h.fin {
                        return self.finish(opcode, h.rsv1, payload).map(Some);
                    }
                    self.partial = Some(Box::new(Partial { opcode, compressed: h.rsv1, data: payload }));
                }
            }
        }
    }

    fn finish(&self, opcode: u8, compressed: bool, data: Vec<u8>) -> Result<Incoming, FrameError> {
        let data = if compressed {
            deflate::inflate(&data, self.max_message).map_err(|e| match e {
                deflate::InflateError::TooBig(_) => FrameError::TooBig,
                deflate::InflateError::Corrupt => FrameError::BadData("invalid compressed data"),
            })?
        } else {
            data
        };
        if opcode == OP_BINARY {
            return Ok(Incoming::Binary(data.into()));
        }
        String::from_utf8(data).map(Incoming::Text).map_err(|_| FrameError::BadData("text is not UTF-8"))
    }

    /// Keeps `incomplete_since` in step with the buffer after a parse.
    fn track_incomplete(&mut self, completed: bool) {
        let incomplete = self.partial.is_some() || !self.buf.is_empty();
        if !incomplete {
            self.incomplete_since = None;
        } else if self.incomplete_since.is_none() || (completed && self.partial.is_none()) {
            // A new message has begun (the bytes after a completed one).
            self.incomplete_since = Some(Instant::now());
        }
    }
}

/// The code of a close frame's payload; 1002 for a code that may not be
/// sent, 1007 for a reason that is not UTF-8.
fn close_code(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol("close frame with a one-byte body")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !close_code_allowed(code) {
                return Err(FrameError::Protocol("invalid close code"));
            }
            std::str::from_utf8(reason).map_err(|_| FrameError::BadData("close reason is not UTF-8"))?;
            Ok(Some(code))
        }
    }
}

impl<R: AsyncRead + Unpin> Stream for Reader<R> {
    type Item = Result<Incoming, FrameError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.parse() {
                Ok(Some(msg)) => {
                    this.track_incomplete(true);
                    return Poll::Ready(Some(Ok(msg)));
                }
                Ok(None) => this.track_incomplete(false),
                Err(e) => {
                    this.done = true;
                    this.unparsable = true;
                    this.buf = BytesMut::new();
                    this.partial = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            if let Err(e) = ready!(Pin::new(&mut this.io).poll_read(cx, &mut read)) {
                this.done = true;
                return Poll::Ready(Some(Err(e.into())));
            }
            if read.filled().is_empty() {
                this.done = true;
                return Poll::Ready(None);
            }
            this.buf.extend_from_slice(read.filled());
        }
    }
}

/// Most frames that may wait in a writer's urgent queue (pongs, pings, error
/// replies, the close). A peer that lets more pile up is not reading.
pub const MAX_URGENT: usize = 16;

/// Most frames handed to the kernel in one vectored write.
const MAX_IOVECS: usize = 64;

/// Writes prebuilt frames to `W` without copying them: a shared frame goes
/// to the kernel as is, and the frames waiting are handed over together in
/// one vectored write (one system call and, with `TCP_NODELAY`, as few
/// packets as the bytes need, instead of one of each per frame).
///
/// Besides the event frames queued with [`Writer::start`], a writer keeps a
/// short queue of urgent frames (control frames and replies) that go out as
/// soon as the frame being written is done, before any event not yet begun.
/// Queuing never waits, so a socket's task never blocks on a peer that does
/// not read: it queues, and writes whenever the peer makes room (see
/// [`Writer::poll_urgent`]).
pub struct Writer<W> {
    io: W,
    /// Frames on their way to the wire, in order; the first may be partly
    /// written. No allocation while empty.
    out: VecDeque<Bytes>,
    /// The first frame of `out` is partly written: nothing may go before it.
    started: bool,
    /// How many urgent frames wait at the front of `out` (after a partly
    /// written one): later urgent frames go behind them, in order.
    urgent_ahead: usize,
    /// Frames to write before any event not yet begun, oldest first (no allocation while empty).
    urgent: VecDeque<Bytes>,
    /// Since when the peer has accepted no byte of a frame that is waiting.
    stalled_since: Option<Instant>,
    /// A close frame was queued: nothing more is accepted.
    closing: bool,
}

/// The writer's urgent queue is full: the peer is not reading.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many frames waiting for a peer that does not read")]
pub struct Backlogged;

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub fn new(io: W) -> Self {
        Self {
            io,
            out: VecDeque::new(),
            started: false,
            urgent_ahead: 0,
            urgent: VecDeque::new(),
            stalled_since: None,
            closing: false,
        }
    }

    /// Queues a frame to go out before any other not yet started. Fails
    /// when too many are waiting; ignored once a close frame is queued.
    pub fn push_urgent(&mut self, frame: Bytes) -> Result<(), Backlogged> {
        if self.closing {
            return Ok(());
        }
        if self.urgent.len() >= MAX_URGENT {
            return Err(Backlogged);
        }
        self.urgent.push_back(frame);
        Ok(())
    }

    /// Queues the pong answering a ping. When pongs pile up, the oldest
    /// waiting one is dropped (RFC 6455 §5.5.3 asks only for the latest).
    pub fn push_pong(&mut self, payload: &[u8]) -> Result<(), Backlogged> {
        if !self.closing
            && self.urgent.len() >= MAX_URGENT
            && let Some(i) = self.urgent.iter().position(|f| f.first() == Some(&(FIN | OP_PONG)))
        {
            self.urgent.remove(i);
        }
        self.push_urgent(pong(payload))
    }

    /// Queues the close frame: the last frame this writer sends.
    pub fn push_close(&mut self, frame: Bytes) {
        if !self.closing {
            self.urgent.push_back(frame);
            self.closing = true;
        }
    }

    /// Whether a close frame has been queued.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Whether frames are being written or wait.
    pub fn busy(&self) -> bool {
        !self.out.is_empty() || !self.urgent.is_empty()
    }

    /// Since when the peer has accepted no byte of a waiting frame (a zero
    /// receive window); `None` while writes make progress or nothing waits.
    pub fn stalled_since(&self) -> Option<Instant> {
        self.stalled_since
    }

    /// The transport.
    pub fn get_ref(&self) -> &W {
        &self.io
    }

    /// Takes the unwritten rest of a frame that another writer began on the
    /// same transport: it goes out before anything else, urgent frames
    /// included (a frame cannot be interrupted).
    pub fn continue_frame(&mut self, rest: Bytes) {
        if !rest.is_empty() {
            self.out.push_front(rest);
            self.started = true;
        }
    }

    /// Queues `frame` (an event) behind the frames already waiting; it goes
    /// out with them in the next write. Ignored once a close frame is queued.
    pub fn start(&mut self, frame: Bytes) {
        if !self.closing && !frame.is_empty() {
            self.out.push_back(frame);
        }
    }

    /// Writes every waiting frame, urgent frames before any event not yet
    /// begun. Ready once nothing is left to write.
    pub fn poll_urgent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.urgent.is_empty() {
            // After the frame being written (a frame cannot be interrupted)
            // and the urgent frames already waiting, before everything else.
            let at = (usize::from(self.started) + self.urgent_ahead).min(self.out.len());
            for (i, frame) in self.urgent.drain(..).enumerate() {
                self.out.insert(at + i, frame);
                self.urgent_ahead += 1;
            }
            // Keep no capacity once drained.
            self.urgent = VecDeque::new();
        }
        ready!(self.poll_out(cx))?;
        Poll::Ready(Ok(()))
    }

    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let mut slices = [io::IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (slot, frame) in slices.iter_mut().zip(self.out.iter()) {
                *slot = io::IoSlice::new(frame);
                n += 1;
            }
            match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]) {
                Poll::Pending => {
                    if self.stalled_since.is_none() {
                        self.stalled_since = Some(Instant::now());
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => {
                    self.stalled_since = None;
                    self.consume(written);
                }
            }
        }
        // Drop the references to the (possibly shared) frames and the capacity.
        self.out = VecDeque::new();
        self.started = false;
        self.urgent_ahead = 0;
        Poll::Ready(Ok(()))
    }

    /// Removes `written` bytes from the front of `out`.
    fn consume(&mut self, mut written: usize) {
        while written > 0 {
            let Some(front) = self.out.front_mut() else { return };
            // The front is the frame begun, else the first urgent frame
            // waiting, if any: either way it leaves the urgent ones' count.
            if !self.started && self.urgent_ahead > 0 {
                self.urgent_ahead -= 1;
            }
            if written >= front.len() {
                written -= front.len();
                self.out.pop_front();
                self.started = false;
            } else {
                front.advance(written);
                self.started = true;
                return;
            }
        }
    }

    /// Flushes the transport (after [`poll_urgent`](Self::poll_urgent)).
    pub fn poll_flush_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_urgent(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Writes everything queued, then shuts the transport's write side down.
    pub fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_urgent(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<W: AsyncWrite + Unpin> Sink<Bytes> for Writer<W> {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_urgent(cx)
    }

    fn start_send(self: Pin<&mut Self>, frame: Bytes) -> io::Result<()> {
        self.get_mut().start(frame);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_io(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A masked client frame.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
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
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    /// A masked frame header with a raw 7-bit length and extended length bytes.
    fn masked_header(first: u8, len7: u8, extended: &[u8]) -> Vec<u8> {
        let mut out = vec![first, 0x80 | len7];
        out.extend_from_slice(extended);
        out.extend_from_slice(&[1, 2, 3, 4]);
        out
    }

    /// A compressed message with its last bytes cut off.
    fn truncated_deflate() -> Vec<u8> {
        let text: String = (0..40).map(|i| format!("{i} little words ")).collect();
        let packed = deflate::compress(text.as_bytes()).unwrap();
        packed[..packed.len() / 2].to_vec()
    }

    async fn read_all(bytes: Vec<u8>, deflate: bool) -> Vec<Result<Incoming, String>> {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::spawn(async move {
            // Written in small pieces so frames straddle reads.
            for piece in bytes.chunks(7) {
                if client.write_all(piece).await.is_err() {
                    return;
                }
            }
        });
        Reader::new(server, deflate, 1000).map(|r| r.map_err(|e| format!("{:?}", e.close_code()))).collect().await
    }

    #[tokio::test]
    async fn reads_messages_fragments_and_control_frames() {
        let mut wire = client_frame(FIN | OP_TEXT, b"hello");
        wire.extend(client_frame(OP_TEXT, b"frag"));
        wire.extend(client_frame(FIN | OP_PING, b"p"));
        wire.extend(client_frame(OP_CONTINUATION, b"men"));
        wire.extend(client_frame(FIN | OP_CONTINUATION, b"ted"));
        wire.extend(client_frame(FIN | OP_BINARY, &[1, 2]));
        wire.extend(client_frame(FIN | OP_TEXT, &[b'x'; 300]));
        wire.extend(client_frame(FIN | OP_PONG, b""));
        wire.extend(client_frame(FIN | OP_CLOSE, &[0x03, 0xe8, b'o', b'k']));
        let got = read_all(wire, false).await;
        assert_eq!(
            got,
            vec![
                Ok(Incoming::Text("hello".into())),
                Ok(Incoming::Ping(Bytes::from_static(b"p"))),
                Ok(Incoming::Text("fragmented".into())),
                Ok(Incoming::Binary(Bytes::from_static(&[1, 2]))),
                Ok(Incoming::Text("x".repeat(300))),
                Ok(Incoming::Pong),
                Ok(Incoming::Close(Some(1000))),
            ]
        );
    }

    #[tokio::test]
    async fn compressed_messages_when_negotiated() {
        let text = "select_chat ".repeat(50);
        let packed = deflate::compress(text.as_bytes()).unwrap();
        let mut wire = client_frame(FIN | RSV1 | OP_TEXT, &packed);
        // Fragmented: RSV1 only on the first frame.
        wire.extend(client_frame(RSV1 | OP_TEXT, &packed[..3]));
        wire.extend(client_frame(FIN | OP_CONTINUATION, &packed[3..]));
        let got = read_all(wire.clone(), true).await;
        assert_eq!(got, vec![Ok(Incoming::Text(text.clone())), Ok(Incoming::Text(text))]);
        // Without negotiation RSV1 is a protocol error.
        assert_eq!(read_all(wire, false).await, vec![Err("Some(1002)".into())]);
    }

    #[tokio::test]
    async fn violations_and_limits_earn_their_close_codes() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![FIN | OP_TEXT, 1, b'x'], "Some(1002)"),             // unmasked
            (client_frame(FIN | 0x20 | OP_TEXT, b"x"), "Some(1002)"), // RSV2
            (client_frame(FIN | 0x3, b"x"), "Some(1002)"),            // unknown opcode
            (client_frame(OP_PING, b"x"), "Some(1002)"),              // fragmented control
            (client_frame(FIN | OP_PING, &[0; 126]), "Some(1002)"),   // big control
            (client_frame(FIN | OP_CONTINUATION, b"x"), "Some(1002)"),
            (client_frame(FIN | OP_TEXT, &[0; 1001]), "Some(1009)"),
            (client_frame(FIN | OP_TEXT, &[0xff, 0xfe]), "Some(1007)"),
            (client_frame(FIN | OP_CLOSE, &[3]), "Some(1002)"),
            (client_frame(FIN | RSV1 | OP_TEXT, &deflate::compress(&[b'a'; 1001]).unwrap()), "Some(1009)"),
            (client_frame(FIN | RSV1 | OP_TEXT, &[0xff; 8]), "Some(1007)"),
            // Deflate data cut short: it never reaches the end of a block.
            (client_frame(FIN | RSV1 | OP_TEXT, &truncated_deflate()), "Some(1007)"),
            // Close codes that may not be sent, and a reason that is not UTF-8.
            (client_frame(FIN | OP_CLOSE, &[0x03, 0xed]), "Some(1002)"), // 1005
            (client_frame(FIN | OP_CLOSE, &[0x03, 0xe7]), "Some(1002)"), // 999
            (client_frame(FIN | OP_CLOSE, &[0x13, 0x88]), "Some(1002)"), // 5000
            (client_frame(FIN | OP_CLOSE, &[0x03, 0xe8, 0xff]), "Some(1007)"),
            // Lengths: non-minimal encodings, the top bit of a 64-bit length.
            (masked_header(FIN | OP_TEXT, 126, &[0, 5]), "Some(1002)"),
            (masked_header(FIN | OP_TEXT, 127, &[0, 0, 0, 0, 0, 0, 0x01, 0]), "Some(1002)"),
            (masked_header(FIN | OP_TEXT, 127, &[0xff; 8]), "Some(1002)"),
            (masked_header(FIN | OP_TEXT, 127, &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), "Some(1009)"),
            // A new message inside a fragmented one fails at its header.
            ([client_frame(OP_TEXT, b"a"), masked_header(FIN | OP_TEXT, 1, &[])].concat(), "Some(1002)"),
        ];
        for (wire, code) in cases {
            assert_eq!(read_all(wire.clone(), true).await, vec![Err(code.into())], "{wire:x?}");
        }
        // Fragments add up against the limit.
        let mut wire = client_frame(OP_TEXT, &[b'a'; 600]);
        wire.extend(client_frame(FIN | OP_CONTINUATION, &[b'a'; 600]));
        assert_eq!(read_all(wire, false).await, vec![Err("Some(1009)".into())]);
        // A message interleaved into a fragmented one.
        let mut wire = client_frame(OP_TEXT, b"a");
        wire.extend(client_frame(FIN | OP_TEXT, b"b"));
        assert_eq!(read_all(wire, false).await, vec![Err("Some(1002)".into())]);
    }

    #[tokio::test]
    async fn the_overflow_frame_is_a_protocol_error() {
        // FIN=0 one-byte text, then a continuation whose 64-bit length is all ones.
        let mut wire = client_frame(OP_TEXT, b"x");
        wire.extend(masked_header(OP_CONTINUATION, 127, &[0xff; 8]));
        wire.extend_from_slice(&[0; 64]);
        assert_eq!(read_all(wire, false).await, vec![Err("Some(1002)".into())]);
    }

    #[tokio::test]
    async fn invalid_text_fails_at_the_fragment_that_carries_it() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut reader = Reader::new(server, false, 1000);
        client.write_all(&client_frame(OP_TEXT, "καλη".as_bytes())).await.unwrap();
        // A character split across fragments is fine so far.
        client.write_all(&client_frame(OP_CONTINUATION, &"μέρα".as_bytes()[..3])).await.unwrap();
        client.write_all(&client_frame(OP_CONTINUATION, &[0xff])).await.unwrap();
        // No final frame: the error comes from the bad fragment alone.
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), reader.next()).await.unwrap();
        assert_eq!(got.unwrap().unwrap_err().close_code(), Some(1007));
    }

    #[tokio::test]
    async fn invalid_text_fails_before_its_frame_is_complete() {
        // Autobahn 6.4.3: one text frame sent in three parts, the second
        // carrying a code point above U+10FFFF; the third never comes.
        let (mut client, server) = tokio::io::duplex(1024);
        let mut reader = Reader::new(server, false, 1000);
        let good = "κόσμε".as_bytes();
        let frame = client_frame(FIN | OP_TEXT, &[good, &[0xf4, 0x90, 0x80, 0x80], b"edited"].concat());
        let header = frame.len() - good.len() - 10;
        client.write_all(&frame[..header + good.len()]).await.unwrap();
        client.write_all(&frame[header + good.len()..header + good.len() + 2]).await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), reader.next()).await;
        assert_eq!(got.expect("no need for the rest").unwrap().unwrap_err().close_code(), Some(1007));
    }

    #[tokio::test]
    async fn text_cut_inside_characters_comes_out_whole() {
        // Each byte in its own read: characters and the mask cut everywhere.
        let text = "aé€😀 κόσμε ".repeat(20);
        let mut wire = client_frame(OP_TEXT, &text.as_bytes()[..101]);
        wire.extend(client_frame(FIN | OP_CONTINUATION, &text.as_bytes()[101..]));
        wire.extend(client_frame(FIN | OP_TEXT, text.as_bytes()));
        let (mut client, server) = tokio::io::duplex(1);
        tokio::spawn(async move { client.write_all(&wire).await });
        let got: Vec<_> = Reader::new(server, false, 1000).take(2).map(Result::unwrap).collect().await;
        assert_eq!(got, vec![Incoming::Text(text.clone()), Incoming::Text(text)]);
    }

    #[tokio::test]
    async fn buffers_grow_with_the_bytes_that_arrive() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut reader = Reader::new(server, false, 1 << 20);
        // A header declaring 1 MiB, then only 10 bytes of it.
        let frame = client_frame(FIN | OP_BINARY, &vec![7; 1 << 20]);
        client.write_all(&frame[..24]).await.unwrap();
        let pending = tokio::time::timeout(std::time::Duration::from_millis(200), reader.next()).await;
        assert!(pending.is_err(), "nothing complete yet");
        assert!(reader.held_bytes() < 4096, "holds {} bytes for 24 received", reader.held_bytes());
        assert!(reader.incomplete_since().is_some());
        client.write_all(&frame[24..]).await.unwrap();
        let msg = reader.next().await.unwrap().unwrap();
        assert_eq!(msg, Incoming::Binary(vec![7; 1 << 20].into()));
        assert_eq!(reader.incomplete_since(), None);
        assert_eq!(reader.held_bytes(), 0);
    }

    #[tokio::test]
    async fn an_open_fragmented_message_stays_incomplete_through_pings() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut reader = Reader::new(server, false, 1000);
        client.write_all(&client_frame(OP_TEXT, b"half")).await.unwrap();
        client.write_all(&client_frame(FIN | OP_PING, b"")).await.unwrap();
        assert_eq!(reader.next().await.unwrap().unwrap(), Incoming::Ping(Bytes::new()));
        let since = reader.incomplete_since().expect("message still open");
        client.write_all(&client_frame(FIN | OP_PING, b"")).await.unwrap();
        assert_eq!(reader.next().await.unwrap().unwrap(), Incoming::Ping(Bytes::new()));
        assert_eq!(reader.incomplete_since(), Some(since), "pings do not extend the message's deadline");
        client.write_all(&client_frame(FIN | OP_CONTINUATION, b"!")).await.unwrap();
        assert_eq!(reader.next().await.unwrap().unwrap(), Incoming::Text("half!".into()));
        assert_eq!(reader.incomplete_since(), None);
    }

    /// Lets the writer finish and shut down while the peer reads everything.
    async fn shut_down_and_read(
        w: &mut Writer<tokio::io::DuplexStream>,
        mut client: tokio::io::DuplexStream,
    ) -> Vec<u8> {
        let write = futures_util::future::poll_fn(|cx| w.poll_shutdown(cx));
        let read = async move {
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut all).await.unwrap();
            all
        };
        let (written, all) = tokio::join!(write, read);
        written.unwrap();
        all
    }

    #[tokio::test]
    async fn urgent_frames_go_out_between_frames_and_never_wait() {
        let (client, server) = tokio::io::duplex(64);
        let mut w = Writer::new(server);
        let big = text(&[b'e'; 1000]);
        w.start(big.clone());
        // The first 64 bytes fill the pipe: the event is in progress.
        let first = futures_util::future::poll_fn(|cx| Poll::Ready(w.poll_urgent(cx))).await;
        assert!(first.is_pending(), "the peer reads nothing yet");
        assert!(w.stalled_since().is_some());
        // The peer reads nothing yet: queuing still returns at once.
        for i in 0..3u8 {
            w.push_pong(&[i]).unwrap();
        }
        w.push_urgent(text(b"reply")).unwrap();
        w.push_close(close(1000, ""));
        w.push_urgent(text(b"after close")).unwrap();
        assert!(w.closing());
        let all = shut_down_and_read(&mut w, client).await;
        let mut expected = big.to_vec();
        for i in 0..3u8 {
            expected.extend_from_slice(&pong(&[i]));
        }
        expected.extend_from_slice(&text(b"reply"));
        expected.extend_from_slice(&close(1000, ""));
        assert_eq!(all, expected, "the event in progress, then the urgent frames in order, nothing after the close");
    }

    #[tokio::test]
    async fn urgent_frames_queued_at_different_times_keep_their_order() {
        let (client, server) = tokio::io::duplex(64);
        let mut w = Writer::new(server);
        let events = [text(&[b'e'; 500]), text(&[b'f'; 500])];
        for e in &events {
            w.start(e.clone());
        }
        // The first event is begun; two pongs move behind it while the peer reads nothing.
        assert!(futures_util::future::poll_fn(|cx| Poll::Ready(w.poll_urgent(cx))).await.is_pending());
        w.push_pong(b"1").unwrap();
        w.push_pong(b"2").unwrap();
        assert!(futures_util::future::poll_fn(|cx| Poll::Ready(w.poll_urgent(cx))).await.is_pending());
        // A later pong goes behind them, not ahead: pongs answer pings in order.
        w.push_pong(b"3").unwrap();
        assert!(futures_util::future::poll_fn(|cx| Poll::Ready(w.poll_urgent(cx))).await.is_pending());
        let all = shut_down_and_read(&mut w, client).await;
        let mut expected = events[0].to_vec();
        for p in [b"1", b"2", b"3"] {
            expected.extend_from_slice(&pong(p));
        }
        expected.extend_from_slice(&events[1]);
        assert_eq!(all, expected);
    }

    /// Records each write call the writer makes.
    #[derive(Default)]
    struct Calls {
        writes: Vec<usize>,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Calls {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.writes.push(buf.len());
            self.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let n = bufs.iter().map(|b| b.len()).sum();
            self.writes.push(n);
            for b in bufs {
                self.bytes.extend_from_slice(b);
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn waiting_frames_go_out_in_one_write_urgent_ones_first() {
        let mut w = Writer::new(Calls::default());
        let events: Vec<Bytes> = (0..10u8).map(|i| text(&[b'a' + i; 100])).collect();
        for e in &events {
            w.start(e.clone());
        }
        // Not begun yet: a reply queued now goes before them.
        w.push_urgent(text(b"reply")).unwrap();
        futures_util::future::poll_fn(|cx| w.poll_flush_io(cx)).await.unwrap();
        let mut expected = text(b"reply").to_vec();
        for e in &events {
            expected.extend_from_slice(e);
        }
        assert_eq!(w.io.writes, vec![expected.len()], "eleven frames, one write");
        assert_eq!(w.io.bytes, expected);
        assert!(!w.busy());
        assert_eq!(w.out.capacity(), 0, "an idle writer keeps no queue");
    }

    #[test]
    fn urgent_queue_is_bounded_and_keeps_the_latest_pongs() {
        let (_client, server) = tokio::io::duplex(64);
        let mut w = Writer::new(server);
        for i in 0..(MAX_URGENT as u8 + 10) {
            w.push_pong(&[i]).unwrap();
        }
        assert_eq!(w.urgent.len(), MAX_URGENT);
        assert_eq!(w.urgent.back().unwrap()[..], pong(&[MAX_URGENT as u8 + 9])[..]);
        let (_client, server) = tokio::io::duplex(64);
        let mut w = Writer::new(server);
        for _ in 0..MAX_URGENT {
            w.push_urgent(text(b"r")).unwrap();
        }
        assert_eq!(w.push_urgent(text(b"r")), Err(Backlogged));
    }

    #[tokio::test]
    async fn idle_reader_holds_no_buffer() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut reader = Reader::new(server, false, 1000);
        client.write_all(&client_frame(FIN | OP_TEXT, &[b'a'; 500])).await.unwrap();
        assert_eq!(reader.next().await.unwrap().unwrap(), Incoming::Text("a".repeat(500)));
        assert_eq!(reader.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn writer_writes_frames_as_built() {
        let (client, server) = tokio::io::duplex(16);
        let mut w = Writer::new(server);
        let big = text(&[b'z'; 70_000]);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut client = client;
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut all).await.unwrap();
            all
        });
        w.send(text(b"hi")).await.unwrap();
        w.send(big.clone()).await.unwrap();
        w.send(close(1001, "bye")).await.unwrap();
        w.close().await.unwrap();
        drop(w);
        let all = reader.await.unwrap();
        let mut expected = vec![0x81, 2, b'h', b'i'];
        expected.extend_from_slice(&big);
        expected.extend_from_slice(&[0x88, 5, 0x03, 0xe9, b'b', b'y', b'e']);
        assert_eq!(all, expected);
        assert_eq!(&big[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(&text(&[0; 200])[..4], &[0x81, 126, 0, 200]);
        assert_eq!(compressed_text(b"x")[0], 0xc1);
        assert_eq!(ping()[..], [0x89, 0]);
        assert_eq!(close(1000, &"é".repeat(100)).len(), 2 + 2 + 122);
    }
}

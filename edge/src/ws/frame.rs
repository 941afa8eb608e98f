//! RFC 6455 framing, server side: a reader that turns client bytes into
//! messages (unmasking, reassembly, limits, permessage-deflate) and a writer
//! that puts whole prebuilt frames on the wire without copying them.
//!
//! Server frames are built once (`text`, `compressed_text`, …) as complete
//! wire bytes, so one event frame is a single shared allocation that every
//! socket writes as is. An idle socket holds no buffer at all: reads go
//! through a stack chunk and only a partial frame is kept on the heap.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

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
    let mut out = BytesMut::with_capacity(10 + payload.len());
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

/// An empty ping.
pub fn ping() -> Bytes {
    Bytes::from_static(&[FIN | OP_PING, 0])
}

/// A pong echoing the ping's payload (at most 125 bytes, checked on read).
pub fn pong(payload: &[u8]) -> Bytes {
    encode(FIN | OP_PONG, payload)
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

/// A message (or control frame) from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    /// A binary message; its content is never used.
    Binary,
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
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header length in bytes.
    len: usize,
    payload_len: usize,
}

/// Reads client messages from `R`.
pub struct Reader<R> {
    io: R,
    /// Bytes of an incomplete frame; empty, and unallocated, between frames.
    buf: BytesMut,
    partial: Option<Partial>,
    deflate: bool,
    max_message: usize,
    done: bool,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// `deflate`: the socket negotiated permessage-deflate. `max_message`:
    /// the largest message accepted, on the wire and after inflating.
    pub fn new(io: R, deflate: bool, max_message: usize) -> Self {
        Self { io, buf: BytesMut::new(), partial: None, deflate, max_message, done: false }
    }

    fn header(&self) -> Result<Option<Header>, FrameError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let (fin, rsv1, opcode) = (b[0] & FIN != 0, b[0] & RSV1 != 0, b[0] & 0x0f);
        if b[0] & 0x30 != 0 {
            return Err(FrameError::Protocol("reserved bits set"));
        }
        if b[1] & 0x80 == 0 {
            return Err(FrameError::Protocol("client frames must be masked"));
        }
        let (len_bytes, payload_len) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (2, u16::from_be_bytes([b[2], b[3]]) as u64),
            127 if b.len() >= 10 => (8, u64::from_be_bytes([b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]])),
            126 | 127 => return Ok(None),
            n => (0, n as u64),
        };
        let len = 2 + len_bytes + 4;
        if b.len() < len {
            return Ok(None);
        }
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin || payload_len > 125 {
                    return Err(FrameError::Protocol("control frames must be whole and at most 125 bytes"));
                }
                if rsv1 {
                    return Err(FrameError::Protocol("RSV1 on a control frame"));
                }
            }
            OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                if rsv1 && (!self.deflate || opcode == OP_CONTINUATION) {
                    return Err(FrameError::Protocol("RSV1 without permessage-deflate, or on a continuation"));
                }
                let so_far = self.partial.as_ref().map_or(0, |p| p.data.len()) as u64;
                if so_far + payload_len > self.max_message as u64 {
                    return Err(FrameError::TooBig);
                }
            }
            _ => return Err(FrameError::Protocol("unknown opcode")),
        }
        let mut mask = [0; 4];
        mask.copy_from_slice(&b[len - 4..len]);
        Ok(Some(Header { fin, rsv1, opcode, mask, len, payload_len: payload_len as usize }))
    }

    /// The next complete message in the buffer, if there is one.
    fn parse(&mut self) -> Result<Option<Incoming>, FrameError> {
        loop {
            let Some(h) = self.header()? else { return Ok(None) };
            let total = h.len + h.payload_len;
            if self.buf.len() < total {
                self.buf.reserve(total - self.buf.len());
                return Ok(None);
            }
            let frame = self.buf.split_to(total);
            if self.buf.is_empty() {
                // Give the allocation back: an idle socket keeps no buffer.
                self.buf = BytesMut::new();
            }
            let mut payload = frame[h.len..].to_vec();
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= h.mask[i & 3];
            }
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
                        let Partial { opcode, compressed, data } = self.partial.take().expect("checked above");
                        return self.finish(opcode, compressed, data).map(Some);
                    }
                }
                opcode => {
                    if self.partial.is_some() {
                        return Err(FrameError::Protocol("new message inside a fragmented one"));
                    }
                    if h.fin {
                        return self.finish(opcode, h.rsv1, payload).map(Some);
                    }
                    self.partial = Some(Partial { opcode, compressed: h.rsv1, data: payload });
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
            return Ok(Incoming::Binary);
        }
        String::from_utf8(data).map(Incoming::Text).map_err(|_| FrameError::BadData("text is not UTF-8"))
    }
}

fn close_code(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol("close frame with a one-byte body")),
        [a, b, reason @ ..] => {
            std::str::from_utf8(reason).map_err(|_| FrameError::BadData("close reason is not UTF-8"))?;
            Ok(Some(u16::from_be_bytes([*a, *b])))
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
                Ok(Some(msg)) => return Poll::Ready(Some(Ok(msg))),
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
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

/// Writes prebuilt frames to `W`, one at a time and without buffering: a
/// frame goes straight to the kernel, and a shared frame is never copied.
pub struct Writer<W> {
    io: W,
    /// The rest of the frame being written; empty when idle.
    pending: Bytes,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub fn new(io: W) -> Self {
        Self { io, pending: Bytes::new() }
    }

    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.advance(n);
        }
        // Drop the reference to the (possibly shared) frame.
        self.pending = Bytes::new();
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> Sink<Bytes> for Writer<W> {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_pending(cx)
    }

    fn start_send(self: Pin<&mut Self>, frame: Bytes) -> io::Result<()> {
        let this = self.get_mut();
        debug_assert!(this.pending.is_empty(), "start_send without poll_ready");
        this.pending = frame;
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
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
                Ok(Incoming::Binary),
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

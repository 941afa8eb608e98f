//! A WebSocket's TCP connection shared three ways: the socket's frame reader,
//! its frame writer, and the hub, which writes events straight to a socket
//! whose writer is idle (see `hub::SocketShared::flush` and decision 0036).
//! Every side works through `&TcpStream` (readiness and `try_*` calls), so
//! one `Arc<TcpStream>` serves them all; who may write when is the hub's
//! queue lock's business, not this module's.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The read side: first the bytes the HTTP server read past the upgrade
/// request (a client may send frames before it sees the 101), then the socket.
pub struct TcpRead {
    tcp: Arc<TcpStream>,
    pre: Bytes,
}

/// The write side. Dropping it does not shut the connection down; the
/// connection closes when the last side lets go of it.
pub struct TcpWrite {
    tcp: Arc<TcpStream>,
}

/// Splits an upgraded connection into its reader and writer halves.
pub fn split(tcp: TcpStream, pre: Bytes) -> (TcpRead, TcpWrite) {
    let tcp = Arc::new(tcp);
    // Even empty, hyper's bytes keep its whole read buffer (kilobytes) alive.
    let pre = if pre.is_empty() { Bytes::new() } else { pre };
    (TcpRead { tcp: tcp.clone(), pre }, TcpWrite { tcp })
}

impl TcpWrite {
    /// The connection, for writes made outside the socket's writer.
    pub fn stream(&self) -> &Arc<TcpStream> {
        &self.tcp
    }
}

impl AsyncRead for TcpRead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            this.pre.advance(n);
            if this.pre.is_empty() {
                this.pre = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            match this.tcp.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale: `try_read` cleared it, so the next
                // poll registers for the next edge.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TcpWrite {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.tcp.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = socket2::SockRef::from(&*self.tcp).shutdown(std::net::Shutdown::Write);
        // Already reset or closed by the peer: nothing is left to shut down.
        Poll::Ready(match r {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r,
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn reads_the_pre_read_bytes_first_then_the_socket() {
        let (mut client, server) = pair().await;
        let (mut rx, _tx) = split(server, Bytes::from_static(b"early "));
        client.write_all(b"late").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        rx.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early late");
    }

    #[tokio::test]
    async fn keeps_no_part_of_the_http_servers_buffer() {
        // hyper hands over what it read past the request as a piece of its
        // read buffer; an idle socket must not keep that buffer alive.
        let shared = |piece: &[u8]| {
            let mut buf = bytes::BytesMut::with_capacity(8192);
            buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
            buf.extend_from_slice(piece);
            let head = buf.split_to(18).freeze();
            (head, buf.freeze())
        };
        let (_c1, server) = pair().await;
        let (head, pre) = shared(b"");
        let (_rx, _tx) = split(server, pre);
        assert!(head.is_unique(), "nothing pre-read: the buffer is let go at once");
        let (mut client, server) = pair().await;
        let (head, pre) = shared(b"early");
        let (mut rx, _tx) = split(server, pre);
        let mut got = [0u8; 5];
        rx.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"early");
        assert!(head.is_unique(), "the pre-read bytes consumed: the buffer is let go");
        client.write_all(b"!").await.unwrap();
        rx.read_exact(&mut got[..1]).await.unwrap();
        assert_eq!(&got[..1], b"!");
    }

    #[tokio::test]
    async fn writes_and_shuts_down_only_the_write_side() {
        let (mut client, server) = pair().await;
        let (mut rx, mut tx) = split(server, Bytes::new());
        tx.write_all(b"hello").await.unwrap();
        // A write made around the writer lands in order with its own.
        tx.stream().try_write(b", world").unwrap();
        tx.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello, world", "the client reads everything, then the FIN");
        // The read side still works after the write side was shut down.
        client.write_all(b"bye").await.unwrap();
        drop(client);
        let mut back = Vec::new();
        rx.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye");
    }
}

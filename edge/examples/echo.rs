//! An echo server on exactly the edge's WebSocket codec (`daisi_edge::ws::
//! {upgrade, frame, deflate}`), for conformance runs of the Autobahn cases
//! (`scripts/conformance.sh`). Every text or binary message comes back as
//! it came (compressed when the client negotiated permessage-deflate), pings
//! are answered, closes are echoed; protocol errors close with the codec's
//! own code. It uses the same writer discipline as the edge: control frames
//! through the writer's urgent queue, never a wait on the peer inside the loop.
//!
//! Usage: `echo [ADDR]` (default `127.0.0.1:9001`); prints `listening on ADDR`.

use std::collections::VecDeque;
use std::time::Duration;

use axum::Router;
use axum::routing::any;
use bytes::Bytes;
use daisi_edge::ws::frame::{self, Incoming};
use daisi_edge::ws::upgrade::{Socket, WsUpgrade};
use daisi_edge::ws::{self, deflate};
use futures_util::StreamExt;
use futures_util::future::poll_fn;

/// Largest message echoed (section 9 sends 16 MiB).
const MAX_MESSAGE: usize = 64 << 20;

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9001".into());
    if addr == "--help" || addr == "-h" {
        println!("usage: echo [ADDR]   (WebSocket echo server on the edge's codec; default 127.0.0.1:9001)");
        return;
    }
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    println!("listening on {}", listener.local_addr().expect("address"));
    let app = Router::new().fallback(any(|upgrade: Result<WsUpgrade, ws::upgrade::NotUpgrade>| async move {
        match upgrade {
            Ok(upgrade) => upgrade.on_upgrade(true, MAX_MESSAGE, echo),
            Err(refused) => axum::response::IntoResponse::into_response(refused),
        }
    }));
    let service = hyper_util::service::TowerToHyperService::new(app);
    // HTTP/1.1 on plain TCP with TCP_NODELAY, as the edge serves it
    // (`serve_http`): the upgraded connection is the `TcpStream` itself.
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .with_upgrades();
            let _ = conn.await;
        });
    }
}

async fn echo(socket: Socket) {
    let Socket { reader: mut rx, writer: mut tx, deflate } = socket;
    let mut out: VecDeque<Bytes> = VecDeque::new();
    let close = loop {
        tokio::select! {
            msg = rx.next() => match msg {
                None => return,
                Some(Err(e)) => match e.close_code() {
                    Some(code) => break (frame::close(code, ""), false),
                    None => return,
                },
                Some(Ok(Incoming::Close(code))) => break (frame::close(code.unwrap_or(1000), ""), true),
                Some(Ok(Incoming::Ping(payload))) => {
                    let _ = tx.push_pong(&payload);
                }
                Some(Ok(Incoming::Pong)) => {}
                Some(Ok(Incoming::Text(text))) => out.push_back(data(false, text.as_bytes(), deflate)),
                Some(Ok(Incoming::Binary(bytes))) => out.push_back(data(true, &bytes, deflate)),
            },
            r = poll_fn(|cx| {
                loop {
                    std::task::ready!(tx.poll_urgent(cx))?;
                    match out.pop_front() {
                        Some(f) => tx.start(f),
                        None => return tx.poll_flush_io(cx),
                    }
                }
            }), if tx.busy() || !out.is_empty() => {
                if r.is_err() {
                    return;
                }
            }
        }
    };
    // Echo what is queued, then the close; wait briefly for the client's close.
    let (close_frame, client_closed) = close;
    let finish = async {
        for f in out.drain(..) {
            poll_fn(|cx| tx.poll_urgent(cx)).await?;
            tx.start(f);
        }
        // The echoes first: the close, as an urgent frame, would go before
        // frames not yet begun.
        poll_fn(|cx| tx.poll_flush_io(cx)).await?;
        tx.push_close(close_frame);
        poll_fn(|cx| tx.poll_flush_io(cx)).await?;
        if !client_closed {
            while let Some(Ok(msg)) = rx.next().await {
                if matches!(msg, Incoming::Close(_)) {
                    break;
                }
            }
        }
        poll_fn(|cx| tx.poll_shutdown(cx)).await?;
        // Read what the client still sends until it closes too, so the
        // socket is not reset under the replies it has not read yet.
        tokio::io::copy(&mut rx.into_inner(), &mut tokio::io::sink()).await.map(|_| ())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), finish).await;
}

/// A whole data frame echoing `payload`, compressed when negotiated.
fn data(binary: bool, payload: &[u8], compress: bool) -> Bytes {
    match (compress.then(|| deflate::compress(payload)).flatten(), binary) {
        (Some(packed), false) => frame::compressed_text(&packed),
        (Some(packed), true) => frame::compressed_binary(&packed),
        (None, false) => frame::text(payload),
        (None, true) => frame::binary(payload),
    }
}

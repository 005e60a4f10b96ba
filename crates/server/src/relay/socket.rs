//! Call sockets: the relay over a WebSocket, for devices whose UDP is
//! blocked (`GET /v1/calls/ws`).
//!
//! Each binary message is one relay datagram ([`subrosa_proto::relay`]), in
//! both directions. The socket's task only carries bytes: it hands what
//! arrives to the relay's task as [`Event::Frame`] and writes what the
//! relay's task hands back through a small bounded queue, so the relay's
//! state stays in its one task. A queue that is full (a slow reader) loses
//! the datagram, as a congested network would; a closed socket's session
//! goes at once. No signature is asked for the upgrade: the first `Join`
//! carries a token, which the relay checks as it checks one over UDP.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use axum::Extension;
use tokio::sync::mpsc;

use crate::{AppError, AppState};

/// The largest message a call socket takes: a datagram of the relay's
/// receive buffer.
const MAX_MESSAGE: usize = 2048;
/// Datagrams waiting to be written to one socket.
const QUEUE: usize = 64;
/// Events waiting for the relay's task, from all sockets.
const EVENTS: usize = 4096;
/// A write that takes longer than this closes the socket.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// A socket whose client sends no datagram for this long is closed, as an
/// idle UDP session is dropped: an opened socket that never joins would
/// otherwise hold a connection and the relay's memory for as long as its
/// opener liked. Clients send media or keep-alives well within it.
const IDLE: Duration = Duration::from_secs(30);

/// What a call socket tells the relay's task.
#[derive(Debug)]
pub enum Event {
    /// A socket opened: where to write the datagrams for it.
    Open {
        /// Its number.
        id: u64,
        /// Its queue.
        to: mpsc::Sender<Vec<u8>>,
    },
    /// A datagram arrived on it.
    Frame {
        /// Its number.
        id: u64,
        /// The address it connected from.
        ip: IpAddr,
        /// The datagram.
        bytes: Vec<u8>,
    },
    /// It closed.
    Closed {
        /// Its number.
        id: u64,
        /// The address it connected from.
        ip: IpAddr,
    },
}

/// The sockets' way to the relay's task, held by the router's state.
#[derive(Debug, Clone)]
pub struct CallSockets {
    events: mpsc::Sender<Event>,
    next: Arc<AtomicU64>,
}

/// A new pair: the router's end and the relay task's end.
pub fn channel() -> (CallSockets, mpsc::Receiver<Event>) {
    let (events, rx) = mpsc::channel(EVENTS);
    (CallSockets { events, next: Arc::new(AtomicU64::new(0)) }, rx)
}

/// `GET /v1/calls/ws`: upgrades to a call socket (404 without a relay).
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    // Absent when the router runs without a socket (tests).
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: axum::http::HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, AppError> {
    let Some(sockets) = state.call_sockets.clone() else {
        return Err(AppError::not_found());
    };
    let ws = ws.map_err(|_| AppError::bad_request("this route needs a WebSocket upgrade"))?;
    // Counted against the per-source cap as its client: the peer, or the
    // one a trusted proxy names.
    let ip = match peer {
        Some(Extension(ConnectInfo(addr))) => {
            crate::conn::limit_key(crate::conn::client_ip(addr.ip(), &headers, &state.limits.trusted_proxies))
        }
        None => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    };
    let shutdown = state.shutdown.clone();
    Ok(ws
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| run(sockets, ip, socket, shutdown)))
}

async fn run(
    sockets: CallSockets,
    ip: IpAddr,
    mut socket: WebSocket,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let id = sockets.next.fetch_add(1, Ordering::Relaxed);
    let (to, mut queue) = mpsc::channel::<Vec<u8>>(QUEUE);
    if sockets.events.send(Event::Open { id, to }).await.is_err() {
        return;
    }
    let idle = tokio::time::sleep(IDLE);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            got = socket.recv() => match got {
                Some(Ok(Message::Binary(bytes))) => {
                    idle.as_mut().reset(tokio::time::Instant::now() + IDLE);
                    let event = Event::Frame { id, ip, bytes: bytes.to_vec() };
                    if sockets.events.send(event).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                // Text is not spoken here; close, error and end all end it.
                _ => break,
            },
            out = queue.recv() => match out {
                Some(bytes) => {
                    let sent = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Binary(bytes.into()))).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        break;
                    }
                }
                None => break,
            },
            () = &mut idle => break,
            _ = shutdown.changed() => break,
        }
    }
    let _ = sockets.events.send(Event::Closed { id, ip }).await;
}

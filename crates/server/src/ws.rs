//! `GET /v1/ws`: pushes envelopes as they arrive and takes acknowledgements.
//!
//! The upgrade request is signed like any GET. The socket pushes every
//! pending envelope not yet pushed on it, then waits for a wake-up of its
//! device (sent by a send on this node), a periodic re-check (which also
//! catches sends on other nodes), a ping tick or a client frame. One frame is
//! in flight at a time and its size is bounded, so a slow client holds at
//! most one frame of memory, and one that stops reading is dropped.
//!
//! While the database is unreachable the socket stays open and looks again
//! every second; other storage failures close it with an error frame.
//!
//! With binary frames (`subrosa_proto::frames`, asked for by the upgrade's
//! `x-subrosa-frames` header) the socket also takes sends, once the device
//! signed the challenge the upgrade's answer carried. Each is stored and
//! answered in turn, one at a time (so a device's sends on one socket are
//! stored in the order sent), only once durable; each costs the device one
//! rate-limit token, as a signed send does, and its quota applies. Pushes
//! are binary then too, but for a batch that holds a commit's roster (JSON
//! text, as without frames).
//!
//! A removed device's socket is closed with an `unauthorized` error frame:
//! at once on this node (the removal revokes its subscription), within one
//! re-check on other nodes (each re-check looks the device up). A socket
//! opened with a key the device no longer has closes too (it reconnects with
//! its new key): at once on a local key change, else when its subscription
//! begins (a change that committed while the upgrade was answered) or at
//! the next re-check, which compare the key the socket authenticated with
//! against the device's current one.

use std::time::Duration;

use tokio::time::Instant;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use subrosa_proto::frames::{self, ClientBin, ServerBin, CHALLENGE_LEN, HEADER_CHALLENGE, HEADER_FRAMES};
use subrosa_proto::{ClientFrame, DeviceAddress, ErrorBody, ErrorCode, ServerFrame};

use crate::auth::AuthedKey;
use crate::store::StoreError;
use crate::wakeup::Woken;
use crate::{AppError, AppState};

/// Envelopes per pushed frame.
const BATCH: usize = 100;
/// Ciphertext bytes per pushed frame (a single larger envelope still goes alone).
const BATCH_BYTES: usize = 2 * 1024 * 1024;
/// Re-check the inbox this often even without a wake-up.
const RECHECK: Duration = Duration::from_secs(15);
/// Ping this often; a client silent for three periods is dropped.
const PING: Duration = Duration::from_secs(20);
/// A frame not written within this time drops the client.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// While the database is unreachable, look at the inbox again this often.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);
/// Largest frame a client may send without binary frames (acknowledgements
/// only); with them, a send frame may be as large as a send's HTTP body.
const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// Initial read buffer of a socket, and the most one read takes. Most client
/// frames are small (an acknowledgement is a few dozen bytes, a text
/// message's send frame a few hundred), and tungstenite zero-fills the
/// whole buffer on every read, so its default of 128 KiB would be resident
/// for every idle socket. A larger frame (up to [`MAX_CLIENT_FRAME`], or a
/// send's body with binary frames) grows the buffer to fit, and takes one
/// read per this many bytes.
const READ_BUFFER: usize = 256;

pub(crate) async fn upgrade(
    AuthedKey { device, key }: AuthedKey,
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, AppError> {
    let ws = ws.map_err(|_| AppError::bad_request("this route needs a WebSocket upgrade"))?;
    // The largest frame we push: a batch, or one envelope at the ciphertext
    // limit, base64-encoded, plus JSON framing. Room for two bounds the
    // per-socket buffer.
    let largest = BATCH_BYTES.max(state.limits.max_ciphertext_bytes) / 3 * 4 + 64 * 1024;
    let binary = headers.get(HEADER_FRAMES).is_some_and(|v| v.as_bytes() == b"1");
    let challenge = binary.then(|| {
        use rand::RngCore as _;
        let mut c = [0u8; CHALLENGE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut c);
        c
    });
    let max_in = if binary { state.limits.max_body_bytes.max(MAX_CLIENT_FRAME) } else { MAX_CLIENT_FRAME };
    let mode = match challenge {
        Some(challenge) => Mode::Binary { challenge, authed: false },
        None => Mode::Json,
    };
    // The upgrade's task keeps its closure for the socket's whole life:
    // boxed, what the closure captures is one pointer.
    let ctx = Box::new(Ctx { state, device, key });
    let mut response = ws
        .read_buffer_size(READ_BUFFER)
        // Each frame is written (and flushed) on its own: nothing to gather.
        .write_buffer_size(0)
        .max_message_size(max_in)
        .max_frame_size(max_in)
        .max_write_buffer_size(largest.saturating_mul(2))
        .on_upgrade(move |socket| {
            // Boxed before the task starts, so that the task's future (which
            // every idle socket keeps) holds two pointers, not two copies.
            let socket = Box::new(socket);
            async move {
                if let Err(reason) = run(ctx, socket, mode).await {
                    tracing::debug!(reason, "websocket closed");
                }
            }
        });
    if let Some(c) = challenge {
        let h = response.headers_mut();
        h.insert(HEADER_FRAMES, HeaderValue::from_static("1"));
        if let Ok(v) = HeaderValue::from_str(&hex::encode(c)) {
            h.insert(HEADER_CHALLENGE, v);
        }
    }
    Ok(response)
}

/// What the socket speaks.
enum Mode {
    /// Today's JSON text frames: pushes and acknowledgements only.
    Json,
    /// Binary frames; sends once the challenge is signed.
    Binary {
        /// Sent in the upgrade's answer; the device signs it.
        challenge: [u8; CHALLENGE_LEN],
        /// True once the device's signature over it verified.
        authed: bool,
    },
}

async fn send(socket: &mut WebSocket, msg: Message) -> Result<(), &'static str> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("send failed"),
        Err(_) => Err("client too slow"),
    }
}

async fn send_frame(socket: &mut WebSocket, frame: &ServerFrame) -> Result<(), &'static str> {
    let text = serde_json::to_string(frame).map_err(|_| "cannot encode frame")?;
    send(socket, Message::Text(text.into())).await
}

/// Pushes envelopes: binary in binary mode unless one carries a roster
/// (which binary frames do not hold), JSON text otherwise.
async fn push(socket: &mut WebSocket, mode: &Mode, messages: Vec<subrosa_proto::Envelope>) -> Result<(), &'static str> {
    if matches!(mode, Mode::Binary { .. }) && messages.iter().all(|m| m.roster.is_none()) {
        let bytes = ServerBin::Messages(messages).encode().map_err(|_| "cannot encode frame")?;
        return send(socket, Message::Binary(bytes.into())).await;
    }
    send_frame(socket, &ServerFrame::Messages { messages }).await
}

async fn send_bin(socket: &mut WebSocket, frame: &ServerBin) -> Result<(), &'static str> {
    let bytes = frame.encode().map_err(|_| "cannot encode frame")?;
    send(socket, Message::Binary(bytes.into())).await
}

async fn close_with_error(socket: &mut WebSocket, err: ErrorBody, code: u16) {
    let reason = err.code.as_str();
    let _ = send_frame(socket, &ServerFrame::Error(err.clone())).await;
    let _ = send(socket, Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
}

/// Closes the socket when the device is no longer active, or no longer has
/// the signature key the socket authenticated with (`key`). A database that
/// is unreachable for the moment leaves it open (the next re-check asks again).
async fn check_active(
    state: &AppState,
    device: &DeviceAddress,
    key: &[u8],
    socket: &mut WebSocket,
) -> Result<(), &'static str> {
    match state.store.device(device).await {
        Ok(Some(record)) if record.signature_key.as_slice() == key => Ok(()),
        Ok(Some(_)) => {
            close_rekeyed(socket).await;
            Err("device keys changed")
        }
        Ok(None) => {
            close_removed(socket).await;
            Err("device removed")
        }
        Err(StoreError::Unavailable(detail)) => {
            tracing::warn!(detail = %detail, "storage unavailable; socket kept open");
            Ok(())
        }
        Err(e) => {
            close_with_error(socket, AppError::from(e).body(), 1011).await;
            Err("storage failed")
        }
    }
}

/// Opened with the device's old key: the device reconnects with its new one.
async fn close_rekeyed(socket: &mut WebSocket) {
    let _ = send(socket, Message::Close(None)).await;
}

async fn close_removed(socket: &mut WebSocket) {
    close_unauthorized(socket, "this device was removed").await;
}

/// Closes with an `unauthorized` error frame saying why.
async fn close_unauthorized(socket: &mut WebSocket, why: &str) {
    let err = ErrorBody { code: ErrorCode::Unauthorized, message: why.into(), current_epoch: None };
    close_with_error(socket, err, 1008).await;
}

/// Acknowledgements cost the device's rate-limit tokens like signed
/// requests do (one per frame and one per hundred ids); past its limit the
/// socket simply reads its next frame later, so a flood of acks slows only
/// the device that sends it (TCP pushes back on it) and every other device
/// keeps its share of the server.
async fn charge_ack(state: &AppState, device: &DeviceAddress, ids: usize) {
    charge(state, device, u32::try_from(1 + ids / 100).unwrap_or(u32::MAX)).await;
}

/// Takes `cost` of the device's rate-limit tokens, waiting (at most 10 s)
/// when it has run out.
async fn charge(state: &AppState, device: &DeviceAddress, cost: u32) {
    let wait = state.device_limiter.charge(device, cost, std::time::Instant::now()).await;
    if !wait.is_zero() {
        tokio::time::sleep(wait.min(Duration::from_secs(10))).await;
    }
}

/// Counts one open WebSocket while it lives.
struct OpenSocket(crate::metrics::SharedMetrics);

impl OpenSocket {
    fn new(metrics: &crate::metrics::SharedMetrics) -> Self {
        metrics.websockets_open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics.websockets_opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        OpenSocket(std::sync::Arc::clone(metrics))
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.websockets_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Stores one send frame and answers it, only once durable (or refused).
/// The device pays one rate-limit token, as for a signed send.
async fn on_send(
    state: &AppState,
    device: &DeviceAddress,
    socket: &mut WebSocket,
    send_frame: frames::FrameSend,
) -> Result<(), &'static str> {
    let start = std::time::Instant::now();
    charge(state, device, 1).await;
    let mut request = send_frame.to_request();
    let answer = match crate::delivery::send(state, device, &mut request, None).await {
        Ok(out) => {
            state.metrics.request(crate::metrics::Op::Send, 200, None, start.elapsed());
            ServerBin::Sent { request: send_frame.request, duplicate: out.duplicate, server_time: out.server_time }
        }
        Err(e) => {
            let body = e.body();
            state.metrics.request(crate::metrics::Op::Send, e.status().as_u16(), Some(body.code), start.elapsed());
            ServerBin::Refused { request: send_frame.request, error: body }
        }
    };
    send_bin(socket, &answer).await
}

/// Polls `fut` once, without waiting: its output if it was ready.
fn poll_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(fut).poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// What a socket's task knows of its device, boxed once per socket.
struct Ctx {
    state: AppState,
    device: DeviceAddress,
    /// The signature key the upgrade authenticated with.
    key: Vec<u8>,
}

async fn run(ctx: Box<Ctx>, mut socket: Box<WebSocket>, mut mode: Mode) -> Result<(), &'static str> {
    // Memory: this future lives as long as the socket, mostly idle, so it
    // holds only what it waits on. Every step that runs (a fetch and its
    // pushes, a client frame, a re-check, a ping, a close) is boxed: its
    // state is on the heap while it runs and gone after, not reserved in
    // every idle socket's task.
    let (state, device, key) = (&ctx.state, &ctx.device, &ctx.key[..]);
    let _open = OpenSocket::new(&state.metrics);
    // Reading once at once releases the buffer of the upgrade's HTTP
    // request (hyper hands it over with the socket, until its first read),
    // rather than holding it while the store is asked below: a burst of
    // reconnections would hold one per socket. A frame already there is
    // handled after the check, as if read then.
    let early = poll_once(socket.recv());
    let mut wakeup = state.wakeups.subscribe(device);
    // A removal or key change that committed between the upgrade's
    // authentication and the subscription woke nothing here: look once more.
    Box::pin(check_active(state, device, key, &mut socket)).await?;
    if let Some(incoming) = early {
        if !Box::pin(on_incoming(state, device, key, &mut socket, &mut mode, incoming)).await? {
            return Ok(());
        }
    }
    let mut shutdown = state.shutdown.clone();
    // One timer for the re-check and the ping, at the sooner of the two.
    let start = Instant::now();
    let (mut recheck_at, mut ping_at) = (start + RECHECK, start + PING);
    let mut timer = Box::pin(tokio::time::sleep_until(recheck_at.min(ping_at)));
    let mut cursor = 0u64;
    let mut silent_pings = 0u32;
    // Set while the database is unreachable: look again soon, keep the socket.
    let mut retry: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    // Whether to look at the inbox: at first, then after a wake-up, a
    // re-check or a retry; not after an acknowledgement or a ping (nothing
    // new can have arrived unannounced: a send wakes the socket).
    let mut look = true;
    loop {
        if look {
            look = false;
            let unavailable = Box::pin(push_pending(state, device, &mut socket, &mode, &mut cursor)).await?;
            retry = unavailable.then(|| Box::pin(tokio::time::sleep(UNAVAILABLE_RETRY)));
        }
        let retry_due = async {
            match retry.as_mut() {
                Some(sleep) => sleep.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = retry_due => look = true,
            woken = wakeup.woken() => {
                if woken == Woken::Revoked {
                    Box::pin(close_removed(&mut socket)).await;
                    return Err("device removed");
                }
                if woken == Woken::Rekeyed {
                    Box::pin(close_rekeyed(&mut socket)).await;
                    return Err("device keys changed");
                }
                look = true;
            }
            () = &mut timer => {
                let now = Instant::now();
                if now >= recheck_at {
                    recheck_at = now + RECHECK;
                    Box::pin(check_active(state, device, key, &mut socket)).await?;
                    look = true;
                }
                if now >= ping_at {
                    ping_at = now + PING;
                    silent_pings += 1;
                    if silent_pings > 3 {
                        return Err("client silent");
                    }
                    Box::pin(send(&mut socket, Message::Ping(Default::default()))).await?;
                }
                timer.as_mut().reset(recheck_at.min(ping_at));
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    let bye = Message::Close(Some(CloseFrame { code: 1001, reason: "server shutting down".into() }));
                    let _ = Box::pin(send(&mut socket, bye)).await;
                    return Ok(());
                }
            }
            incoming = socket.recv() => {
                silent_pings = 0;
                if !Box::pin(on_incoming(state, device, key, &mut socket, &mut mode, incoming)).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// Pushes everything pending past `cursor`, one bounded frame at a time,
/// and moves the cursor. `Ok(true)` when the database is unreachable for the
/// moment (the socket stays open and looks again soon).
async fn push_pending(
    state: &AppState,
    device: &DeviceAddress,
    socket: &mut WebSocket,
    mode: &Mode,
    cursor: &mut u64,
) -> Result<bool, &'static str> {
    loop {
        let fetched = match crate::delivery::fetch(state, device, *cursor, BATCH, BATCH_BYTES).await {
            Ok(f) => f,
            Err(StoreError::Unavailable(detail)) => {
                tracing::warn!(detail = %detail, "storage unavailable; socket kept open");
                return Ok(true);
            }
            Err(e) => {
                let err = AppError::from(e).body();
                close_with_error(socket, err, 1011).await;
                return Err("storage failed");
            }
        };
        let Some(last) = fetched.last else { return Ok(false) };
        *cursor = last;
        if !fetched.messages.is_empty() {
            push(socket, mode, fetched.messages).await?;
        }
        if !fetched.full {
            return Ok(false);
        }
    }
}

/// Handles what the client sent: `Ok(false)` when it closed the socket.
async fn on_incoming(
    state: &AppState,
    device: &DeviceAddress,
    key: &[u8],
    socket: &mut WebSocket,
    mode: &mut Mode,
    incoming: Option<Result<Message, axum::Error>>,
) -> Result<bool, &'static str> {
    let frame = match incoming {
        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(false),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(true),
        // Today's JSON frames, in either mode.
        Some(Ok(Message::Text(t))) => json_frame(t.as_str().as_bytes()),
        Some(Ok(Message::Binary(b))) => match mode {
            Mode::Json => json_frame(&b),
            Mode::Binary { .. } => ClientBin::decode(&b).map_err(Some),
        },
    };
    let frame = match frame {
        Ok(frame) => frame,
        Err(why) => {
            // An older client's frame (the send frame without
            // `expires_at`) or a newer one's is said plainly.
            let message = match why {
                Some(frames::FrameError::Unknown) => "unknown frame type or version: this client needs an upgrade",
                _ => "malformed frame",
            };
            let err = ErrorBody { code: ErrorCode::BadRequest, message: message.into(), current_epoch: None };
            close_with_error(socket, err, 1008).await;
            return Err("malformed frame");
        }
    };
    match frame {
        ClientBin::Ack(ids) => {
            charge_ack(state, device, ids.len()).await;
            if let Err(e) = crate::delivery::acknowledge(state, device, &ids).await {
                close_with_error(socket, e.body(), 1008).await;
                return Err("ack refused");
            }
        }
        ClientBin::Auth(signature) => {
            let Mode::Binary { challenge, authed } = mode else {
                return Err("unreachable: auth outside binary mode");
            };
            if !crate::auth::verify_socket(key, challenge, device, &signature) {
                close_unauthorized(socket, "the socket's challenge signature does not verify").await;
                return Err("bad challenge signature");
            }
            *authed = true;
        }
        ClientBin::Send(s) => {
            if !matches!(mode, Mode::Binary { authed: true, .. }) {
                close_unauthorized(socket, "sign the socket's challenge before sending").await;
                return Err("send before auth");
            }
            on_send(state, device, socket, s).await?;
        }
    }
    Ok(true)
}

/// A JSON client frame (what every client sends without binary frames), as
/// the binary frame it means.
fn json_frame(bytes: &[u8]) -> Result<ClientBin, Option<frames::FrameError>> {
    match serde_json::from_slice::<ClientFrame>(bytes).map_err(|_| None)? {
        ClientFrame::Ack { ids } => Ok(ClientBin::Ack(ids)),
    }
}

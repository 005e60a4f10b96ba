//! The server API over HTTPS and a WebSocket, every request signed by the
//! device key.
//!
//! The client speaks TLS to servers (webpki roots, plus the PEM file named by
//! `SUBROSA_CA_CERT` for a self-hosted CA) and refuses plain `http://` to
//! anything but a loopback address.
//!
//! It follows no redirect (a 3xx is an error: a redirect would hand the
//! signed headers and the body to whatever host it names) and reads no
//! answer, HTTP body or WebSocket message, beyond [`MAX_ANSWER_BYTES`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use subrosa_core::DeviceIdentity;
use subrosa_proto::frames::{self, ClientBin, ServerBin};
use subrosa_proto::{
    canonical_request, ClientFrame, ErrorBody, ServerFrame, SignedHeaders, HEADER_DEVICE, HEADER_HANDLE, HEADER_NONCE,
    HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue as WsHeader;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use url::Url;

use crate::store::now_ms;
use crate::ClientError;

/// Environment variable naming an extra CA certificate (PEM) to trust.
pub const CA_CERT_ENV: &str = "SUBROSA_CA_CERT";

/// Largest answer read from the server, in bytes (an HTTP body or one
/// WebSocket message). The largest legitimate one is an inbox fetch, which
/// the server caps at its body limit (8 MiB of ciphertext by default, about
/// 11 MiB once base64-encoded in JSON); a WebSocket push is smaller.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// How long to wait for a connection to the server. A refused connection
/// fails at once; this bounds an unreachable host (a send then queues).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a server may stay silent in the middle of a request (before
/// its answer, or between two parts of it): a hung server queues a send
/// after this, not after [`REQUEST_TIMEOUT`].
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// How long one request may take, answer included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Checks a server URL: https anywhere, http only to loopback.
///
/// # Errors
/// [`ClientError::InsecureUrl`] or [`ClientError::BadUrl`].
pub fn check_server_url(s: &str) -> Result<Url, ClientError> {
    let url = Url::parse(s).map_err(|e| ClientError::BadUrl(format!("{s}: {e}")))?;
    match url.scheme() {
        "https" => {}
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
                Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
                Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                None => false,
            };
            if !loopback {
                return Err(ClientError::InsecureUrl(s.to_string()));
            }
        }
        _ => return Err(ClientError::BadUrl(format!("{s}: use https://HOST[:PORT]"))),
    }
    if url.host().is_none() {
        return Err(ClientError::BadUrl(format!("{s}: no host")));
    }
    Ok(url)
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Ok(path) = std::env::var(CA_CERT_ENV) {
        let pem = std::fs::read(&path).map_err(|e| ClientError::Io(format!("{CA_CERT_ENV}={path}: {e}")))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| ClientError::Io(format!("{CA_CERT_ENV}={path}: {e}")))?;
            roots.add(cert).map_err(|e| ClientError::Io(format!("{CA_CERT_ENV}={path}: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(ClientError::Io(format!("{CA_CERT_ENV}={path}: no PEM certificate in it")));
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Network(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn http_client(tls: &Arc<rustls::ClientConfig>) -> Result<reqwest::Client, ClientError> {
    reqwest::Client::builder()
        .use_preconfigured_tls((**tls).clone())
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| ClientError::Network(e.to_string()))
}

/// The server API of one device.
pub struct Api {
    http: reqwest::Client,
    tls: Arc<rustls::ClientConfig>,
    base: Url,
    /// Replaced when this device's signature key rotates (`devices rekey`).
    identity: std::sync::RwLock<std::sync::Arc<DeviceIdentity>>,
    crypto: subrosa_core::DefaultCrypto,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("base", &self.base.as_str()).finish_non_exhaustive()
    }
}

/// An unsigned request (link slots, for a device with no registered key yet).
///
/// # Errors
/// As [`Api::call`].
pub async fn call_unsigned<B: Serialize, R: DeserializeOwned>(
    base: &str,
    method: Method,
    path: &str,
    body: Option<&B>,
) -> Result<R, ClientError> {
    let base = check_server_url(base)?;
    let http = http_client(&tls_config()?)?;
    let url = base.join(path).map_err(|e| ClientError::BadUrl(e.to_string()))?;
    let mut req = http.request(method, url);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.map_err(|e| ClientError::Network(describe_reqwest(&e, &base)))?;
    decode_response(resp, &base).await
}

/// Reads an answer's body, refusing one over [`MAX_ANSWER_BYTES`] before
/// holding it (by its announced length, or as it streams in).
async fn read_limited(mut resp: reqwest::Response, base: &Url) -> Result<Vec<u8>, ClientError> {
    let too_large = || {
        ClientError::Protocol(format!(
            "{base} sent an answer over {} MiB; it was not read",
            MAX_ANSWER_BYTES / (1024 * 1024)
        ))
    };
    if resp.content_length().is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| ClientError::Network(describe_reqwest(&e, base)))? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn decode_response<R: DeserializeOwned>(resp: reqwest::Response, base: &Url) -> Result<R, ClientError> {
    let status = resp.status();
    if status.is_redirection() {
        return Err(ClientError::Protocol(format!(
            "{base} answered with a redirect ({status}); Subrosa follows none (check the server URL)"
        )));
    }
    let bytes = read_limited(resp, base).await?;
    if status.is_success() {
        serde_json::from_slice(&bytes)
            .map_err(|_| ClientError::Protocol(format!("unexpected answer from server ({status})")))
    } else {
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => Err(ClientError::Server { status: status.as_u16(), body: e }),
            Err(_) => Err(ClientError::Protocol(format!("server answered {status} without an error body"))),
        }
    }
}

/// A WebSocket to the server, over TLS or not.
pub type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a send frame waits for the server's answer before it counts as
/// lost (it stays queued and goes again, with its send id, so the server
/// stores it once). The server answers only once the send is durable, so
/// this is as generous as an HTTP request's.
pub const FRAME_ANSWER_TIMEOUT: Duration = REQUEST_TIMEOUT;

/// A live WebSocket to the server: binary frames
/// ([`subrosa_proto::frames`]) when the server offered them, else today's
/// JSON frames (an older server).
///
/// A task of its own reads the socket: it hands the answers to send frames
/// to the [`FrameLink`] that waits for them, and queues everything else
/// for [`next_frame`]. So a send waits for its answer while whoever reads
/// the pushes is busy (even when that reader is the one sending), and the
/// pushes wait, in order, to be read.
#[derive(Debug)]
pub struct Socket {
    link: Arc<FrameLink>,
    incoming: tokio::sync::mpsc::UnboundedReceiver<Pushed>,
    held: Arc<Held>,
    reader: tokio::task::JoinHandle<()>,
}

/// How many bytes of pushed frames a [`Socket`] keeps for [`next_frame`]
/// before it gives up on the connection: four of the largest frames. An
/// honest server has one frame in flight until it is acknowledged, so only
/// a server pushing without waiting reaches it, and it cannot fill the
/// device's memory that way.
pub const MAX_QUEUED_BYTES: usize = 4 * MAX_ANSWER_BYTES;

/// A pushed frame as the reader queued it, with the bytes it came in.
type Pushed = (usize, Result<ServerFrame, ClientError>);

/// The bytes of pushed frames queued and not yet read, shared by the
/// reader (which adds) and [`next_frame`] (which takes away).
#[derive(Debug)]
struct Held {
    queued: std::sync::atomic::AtomicUsize,
    limit: usize,
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.reader.abort();
        self.link.fail_pending();
    }
}

impl Socket {
    fn start(ws: WsStream, binary: bool) -> Socket {
        Socket::start_with_limit(ws, binary, MAX_QUEUED_BYTES)
    }

    fn start_with_limit(ws: WsStream, binary: bool, limit: usize) -> Socket {
        let (sink, stream) = ws.split();
        let link = Arc::new(FrameLink {
            sink: tokio::sync::Mutex::new(sink),
            binary,
            pending: std::sync::Mutex::new(Some(std::collections::HashMap::new())),
            next: std::sync::atomic::AtomicU32::new(1),
        });
        let (tx, incoming) = tokio::sync::mpsc::unbounded_channel();
        let held = Arc::new(Held { queued: std::sync::atomic::AtomicUsize::new(0), limit });
        let reader = tokio::spawn(read_socket(stream, Arc::clone(&link), Arc::clone(&held), tx));
        Socket { link, incoming, held, reader }
    }

    /// Whether the socket speaks binary frames (the server offered them and
    /// took this device's signature over its challenge).
    pub fn binary(&self) -> bool {
        self.link.binary
    }

    /// What sends over this socket: shared by every task of this device
    /// while the socket lives; `None` without binary frames.
    pub fn frame_link(&self) -> Option<Arc<FrameLink>> {
        self.link.binary.then(|| Arc::clone(&self.link))
    }

    /// Closes the socket.
    ///
    /// # Errors
    /// [`ClientError::Network`].
    pub async fn close(&mut self) -> Result<(), ClientError> {
        self.link.fail_pending();
        self.link.sink.lock().await.close().await.map_err(|e| ClientError::Network(e.to_string()))
    }
}

/// Sends waiting for the server's answer, by request number.
type Waiting = std::collections::HashMap<u32, tokio::sync::oneshot::Sender<Result<(), ErrorBody>>>;

/// The writing half of a [`Socket`], and the sends waiting for an answer.
pub struct FrameLink {
    sink: tokio::sync::Mutex<futures_util::stream::SplitSink<WsStream, WsMessage>>,
    binary: bool,
    /// Sends waiting for their answer, by request number; `None` once the
    /// socket closed (a send then goes over HTTP).
    pending: std::sync::Mutex<Option<Waiting>>,
    next: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for FrameLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameLink").field("binary", &self.binary).finish_non_exhaustive()
    }
}

impl FrameLink {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Option<Waiting>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the socket is still open (as far as its reader knows).
    pub fn is_open(&self) -> bool {
        self.lock_pending().is_some()
    }

    /// The socket closed: every send waiting hears so (it stays queued).
    fn fail_pending(&self) {
        self.lock_pending().take();
    }

    fn forget(&self, request: u32) {
        if let Some(p) = self.lock_pending().as_mut() {
            p.remove(&request);
        }
    }

    fn answer(&self, request: u32, answer: Result<(), ErrorBody>) {
        if let Some(waiting) = self.lock_pending().as_mut().and_then(|p| p.remove(&request)) {
            let _ = waiting.send(answer);
        }
    }

    /// Sends `request` (one without a commit guard) as a send frame and
    /// waits for the server's answer: `Ok` once it is durably stored.
    ///
    /// # Errors
    /// [`ClientError::Server`] for a refusal (with the status HTTP would
    /// have answered, so a retryable one is retried); [`ClientError::Network`]
    /// when the socket closed or no answer came in time (the caller keeps
    /// the send queued); [`ClientError::Bug`] for a commit or a send frames
    /// cannot carry.
    pub async fn send(&self, request: subrosa_proto::SendRequest) -> Result<(), ClientError> {
        let number = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let frame = frames::FrameSend::from_request(number, request)
            .ok_or_else(|| ClientError::Bug("a commit goes over HTTP, not a send frame".into()))?;
        let bytes = ClientBin::Send(frame).encode().map_err(|e| ClientError::Bug(e.to_string()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.lock_pending().as_mut() {
            Some(p) => p.insert(number, tx),
            None => return Err(ClientError::Network("the socket closed".into())),
        };
        let sent = self.sink.lock().await.send(WsMessage::Binary(bytes.into())).await;
        if let Err(e) = sent {
            self.forget(number);
            return Err(ClientError::Network(e.to_string()));
        }
        match tokio::time::timeout(FRAME_ANSWER_TIMEOUT, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(body))) => Err(ClientError::Server { status: refusal_status(body.code), body }),
            Ok(Err(_)) => Err(ClientError::Network("the socket closed before the server answered a send".into())),
            Err(_) => {
                self.forget(number);
                Err(ClientError::Network("the server did not answer a send in time".into()))
            }
        }
    }
}

/// The HTTP status a signed send would have been refused with, for a
/// refusal frame (which carries the code alone): what decides whether the
/// send is retried or marked failed.
fn refusal_status(code: subrosa_proto::ErrorCode) -> u16 {
    use subrosa_proto::ErrorCode as C;
    match code {
        C::RateLimited => 429,
        C::Internal => 500,
        C::Unavailable => 503,
        C::TooLarge | C::QuotaExceeded => 413,
        C::Unauthorized | C::StaleRequest | C::Replayed => 401,
        C::UnknownHandle | C::NotFound => 404,
        C::StaleEpoch => 409,
        C::NotAMember => 403,
        _ => 400,
    }
}

/// Reads `stream` until it ends: answers to their sends, the rest to
/// [`next_frame`] in order. An error is the last item queued; so is the
/// one that says the server pushed more than `held` allows unread (the
/// socket is then given up, and what was pushed comes again on the next).
async fn read_socket(
    mut stream: futures_util::stream::SplitStream<WsStream>,
    link: Arc<FrameLink>,
    held: Arc<Held>,
    tx: tokio::sync::mpsc::UnboundedSender<Pushed>,
) {
    use std::sync::atomic::Ordering;
    let malformed = || ClientError::Protocol("malformed frame from server".into());
    while let Some(msg) = stream.next().await {
        let size = match &msg {
            Ok(m) => m.len(),
            Err(_) => 0,
        };
        let held_now = held.queued.fetch_add(size, Ordering::AcqRel) + size;
        if held_now > held.limit {
            let _ = tx.send((
                0,
                Err(ClientError::Network(format!(
                    "the server pushed more than {} MiB this device had not stored yet; connecting again",
                    held.limit / (1024 * 1024)
                ))),
            ));
            break;
        }
        let item = match msg {
            Err(e) => Err(ClientError::Network(e.to_string())),
            Ok(WsMessage::Text(t)) => serde_json::from_str(t.as_str()).map_err(|_| malformed()),
            Ok(WsMessage::Binary(b)) if link.binary => match ServerBin::decode(&b) {
                Ok(ServerBin::Messages(messages)) => Ok(ServerFrame::Messages { messages }),
                Ok(ServerBin::Sent { request, .. }) => {
                    held.queued.fetch_sub(size, Ordering::AcqRel);
                    link.answer(request, Ok(()));
                    continue;
                }
                Ok(ServerBin::Refused { request, error }) => {
                    held.queued.fetch_sub(size, Ordering::AcqRel);
                    link.answer(request, Err(error));
                    continue;
                }
                Err(_) => Err(malformed()),
            },
            Ok(WsMessage::Binary(b)) => serde_json::from_slice(&b).map_err(|_| malformed()),
            Ok(WsMessage::Close(_)) => break,
            Ok(_) => {
                held.queued.fetch_sub(size, Ordering::AcqRel);
                continue;
            }
        };
        let last = item.is_err();
        if tx.send((size, item)).is_err() || last {
            break;
        }
    }
    link.fail_pending();
}

impl Api {
    /// An API client for `base` signing as `identity`.
    ///
    /// # Errors
    /// URL and TLS set-up errors.
    pub fn new(base: &str, identity: DeviceIdentity, crypto: subrosa_core::DefaultCrypto) -> Result<Self, ClientError> {
        let base = check_server_url(base)?;
        let tls = tls_config()?;
        let http = http_client(&tls)?;
        Ok(Api { http, tls, base, identity: std::sync::RwLock::new(std::sync::Arc::new(identity)), crypto })
    }

    /// Signs from now on as `identity` (this device after a key rotation).
    pub fn set_identity(&self, identity: DeviceIdentity) {
        let new = std::sync::Arc::new(identity);
        match self.identity.write() {
            Ok(mut g) => *g = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    fn identity(&self) -> std::sync::Arc<DeviceIdentity> {
        match self.identity.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The server URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The signature headers for one request (each call makes a new nonce).
    ///
    /// # Errors
    /// Signing failures.
    pub fn signed_headers(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<Vec<(&'static str, String)>, ClientError> {
        let nonce: [u8; 16] = rand::random();
        let identity = self.identity();
        let h = SignedHeaders {
            handle: identity.handle().to_string(),
            device: identity.device_id().to_hex(),
            timestamp: now_ms(),
            nonce: hex::encode(nonce),
        };
        let sig = identity.sign_with_device(&self.crypto, &canonical_request(method, path_and_query, &h, body))?;
        Ok(vec![
            (HEADER_HANDLE, h.handle),
            (HEADER_DEVICE, h.device),
            (HEADER_TIMESTAMP, h.timestamp.to_string()),
            (HEADER_NONCE, h.nonce),
            (HEADER_SIGNATURE, base64::engine::general_purpose::STANDARD.encode(sig)),
        ])
    }

    /// Sends a signed request and decodes the JSON answer.
    ///
    /// # Errors
    /// [`ClientError::Server`] with the server's code, or [`ClientError::Network`].
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Bug(e.to_string()))?,
            None => Vec::new(),
        };
        self.call_raw(method, path, bytes).await
    }

    /// Sends a signed request with a raw body.
    ///
    /// # Errors
    /// As [`Self::call`].
    pub async fn call_raw<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<R, ClientError> {
        let url = self.base.join(path).map_err(|e| ClientError::BadUrl(e.to_string()))?;
        let path_and_query = match url.query() {
            Some(q) => format!("{}?{}", url.path(), q),
            None => url.path().to_string(),
        };
        let headers = self.signed_headers(method.as_str(), &path_and_query, &body)?;
        let mut req = self.http.request(method, url);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req.send().await.map_err(|e| ClientError::Network(describe_reqwest(&e, &self.base)))?;
        decode_response(resp, &self.base).await
    }

    /// Sends a signed request and returns the answer's raw bytes (a blob
    /// download), at most `max` of them.
    ///
    /// # Errors
    /// As [`Self::call`]; [`ClientError::Protocol`] for an answer over `max`.
    pub async fn call_bytes(&self, method: Method, path: &str, max: usize) -> Result<Vec<u8>, ClientError> {
        let url = self.base.join(path).map_err(|e| ClientError::BadUrl(e.to_string()))?;
        let path_and_query = match url.query() {
            Some(q) => format!("{}?{}", url.path(), q),
            None => url.path().to_string(),
        };
        let headers = self.signed_headers(method.as_str(), &path_and_query, b"")?;
        let mut req = self.http.request(method, url);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = req.send().await.map_err(|e| ClientError::Network(describe_reqwest(&e, &self.base)))?;
        let status = resp.status();
        if !status.is_success() {
            return decode_response::<serde_json::Value>(resp, &self.base)
                .await
                .and_then(|_| Err(ClientError::Protocol(format!("server answered {status} to a download"))));
        }
        let bytes = read_limited(resp, &self.base).await?;
        if bytes.len() > max {
            return Err(ClientError::Protocol(format!("the server sent more than the {max} bytes asked for")));
        }
        Ok(bytes)
    }

    /// Opens the signed WebSocket.
    ///
    /// # Errors
    /// [`ClientError::Network`].
    pub async fn connect(&self) -> Result<Socket, ClientError> {
        let mut req = self.ws_request("/v1/ws")?;
        for (k, v) in self.signed_headers("GET", "/v1/ws", b"")? {
            let value = v.parse().map_err(|_| ClientError::Bug("header value".into()))?;
            req.headers_mut().insert(k, value);
        }
        // Binary frames when the server speaks them; an older server ignores
        // the header and answers without its own.
        req.headers_mut().insert(frames::HEADER_FRAMES, WsHeader::from_static("1"));
        let (mut ws, resp) = self.handshake(req, MAX_ANSWER_BYTES).await?;
        let offered = resp.headers().get(frames::HEADER_FRAMES).is_some_and(|v| v.as_bytes() == b"1");
        if !offered {
            return Ok(Socket::start(ws, false));
        }
        let challenge = resp
            .headers()
            .get(frames::HEADER_CHALLENGE)
            .and_then(|v| hex::decode(v.as_bytes()).ok())
            .and_then(|c| <[u8; frames::CHALLENGE_LEN]>::try_from(c).ok())
            .ok_or_else(|| ClientError::Protocol("the server offered binary frames without a challenge".into()))?;
        let identity = self.identity();
        let sig = identity.sign_with_device(&self.crypto, &frames::auth_message(&challenge, &identity.address()))?;
        let sig = <[u8; frames::SIGNATURE_LEN]>::try_from(sig.as_slice())
            .map_err(|_| ClientError::Bug("device signature length".into()))?;
        let auth = ClientBin::Auth(sig).encode().map_err(|e| ClientError::Bug(e.to_string()))?;
        ws.send(WsMessage::Binary(auth.into())).await.map_err(|e| ClientError::Network(e.to_string()))?;
        Ok(Socket::start(ws, true))
    }

    /// Opens a call socket (`/v1/calls/ws`): the call relay over a
    /// WebSocket, where UDP is blocked. Unsigned: the relay token in its
    /// first message admits it, as over UDP.
    ///
    /// # Errors
    /// [`ClientError::Network`]; the server's refusal (not found when it
    /// runs no relay).
    pub async fn call_socket(&self) -> Result<WsStream, ClientError> {
        let req = self.ws_request("/v1/calls/ws")?;
        // A datagram: a media packet and its header, or a token message.
        Ok(self.handshake(req, 2048).await?.0)
    }

    /// A WebSocket request for `path` on the server (ws or wss as its URL).
    fn ws_request(
        &self,
        path: &str,
    ) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, ClientError> {
        let mut url = self.base.join(path).map_err(|e| ClientError::BadUrl(e.to_string()))?;
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme).map_err(|_| ClientError::Bug("ws scheme".into()))?;
        url.as_str().into_client_request().map_err(|e| ClientError::Network(e.to_string()))
    }

    /// Opens a WebSocket with this client's TLS settings, messages of at
    /// most `max` bytes, and the errors said in one line.
    async fn handshake(
        &self,
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
        max: usize,
    ) -> Result<(WsStream, tokio_tungstenite::tungstenite::handshake::client::Response), ClientError> {
        let connector = tokio_tungstenite::Connector::Rustls(self.tls.clone());
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        // tokio-tungstenite follows no redirect: a 3xx comes back as `Http`.
        let handshake = tokio_tungstenite::connect_async_tls_with_config(req, Some(config), false, Some(connector));
        tokio::time::timeout(CONNECT_TIMEOUT * 2, handshake)
            .await
            .map_err(|_| ClientError::Network(format!("{} did not answer in time", self.base)))?
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) if resp.status().is_redirection() => {
                    ClientError::Protocol(format!(
                        "{} answered the WebSocket with a redirect ({}); Subrosa follows none",
                        self.base,
                        resp.status()
                    ))
                }
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    let body = resp.body().as_ref().and_then(|b| serde_json::from_slice::<ErrorBody>(b).ok());
                    match body {
                        Some(body) => ClientError::Server { status: resp.status().as_u16(), body },
                        None => ClientError::Network(format!("WebSocket refused: {}", resp.status())),
                    }
                }
                other => ClientError::Network(format!("cannot reach {}: {other}", self.base)),
            })
    }
}

/// Reads the next server frame, or `None` when the socket closed.
///
/// # Errors
/// [`ClientError::Network`] or [`ClientError::Protocol`].
pub async fn next_frame(socket: &mut Socket) -> Result<Option<ServerFrame>, ClientError> {
    let Some((size, item)) = socket.incoming.recv().await else {
        return Ok(None);
    };
    socket.held.queued.fetch_sub(size, std::sync::atomic::Ordering::AcqRel);
    item.map(Some)
}

/// Acknowledges envelopes over the socket.
///
/// # Errors
/// [`ClientError::Network`].
pub async fn send_ack(socket: &mut Socket, ids: Vec<u64>) -> Result<(), ClientError> {
    let msg = if socket.link.binary {
        WsMessage::Binary(ClientBin::Ack(ids).encode().map_err(|e| ClientError::Bug(e.to_string()))?.into())
    } else {
        let frame = serde_json::to_string(&ClientFrame::Ack { ids }).map_err(|e| ClientError::Bug(e.to_string()))?;
        WsMessage::Text(frame.into())
    };
    socket.link.sink.lock().await.send(msg).await.map_err(|e| ClientError::Network(e.to_string()))
}

fn describe_reqwest(e: &reqwest::Error, base: &Url) -> String {
    if e.is_timeout() {
        format!("{base} did not answer in time")
    } else if e.is_connect() {
        // The innermost cause says why: refused, unknown certificate issuer…
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        format!("cannot connect to {base}: {cause}")
    } else {
        format!("talking to {base}: {e}")
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;

    /// A server that pushes `frames` copies of an empty `messages` frame,
    /// padded with spaces to `size` bytes each, then keeps the socket open;
    /// `paced`, it waits for an acknowledgement after each (as ours does),
    /// else it pushes them all at once. And a [`Socket`] to it that keeps
    /// at most `limit` bytes unread.
    async fn flood(frames: usize, size: usize, limit: usize, paced: bool) -> Socket {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
            let mut frame = serde_json::to_string(&ServerFrame::Messages { messages: vec![] }).expect("encode");
            frame.push_str(&" ".repeat(size - frame.len()));
            for _ in 0..frames {
                if ws.send(WsMessage::Text(frame.clone().into())).await.is_err() {
                    return;
                }
                if paced && ws.next().await.is_none() {
                    return;
                }
            }
            // Holds the socket open until the client goes.
            while ws.next().await.is_some() {}
        });
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}")).await.expect("connect");
        Socket::start_with_limit(ws, false, limit)
    }

    #[tokio::test]
    async fn an_honest_server_never_reaches_the_limit() {
        // 64 frames of 1 KiB, far beyond the 8 KiB limit in all, but each
        // waits for the acknowledgement of the one before.
        let mut socket = flood(64, 1024, 8 * 1024, true).await;
        for _ in 0..64 {
            let frame = next_frame(&mut socket).await.expect("within the limit").expect("open");
            assert_eq!(frame, ServerFrame::Messages { messages: vec![] });
            send_ack(&mut socket, vec![1]).await.expect("ack");
        }
        assert_eq!(socket.held.queued.load(std::sync::atomic::Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_server_pushing_past_the_limit_unread_loses_the_socket_not_the_memory() {
        let mut socket = flood(64, 1024, 8 * 1024, false).await;
        // Nobody reads while the server floods.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut read = 0;
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(5), next_frame(&mut socket)).await {
                Ok(Ok(Some(_))) => read += 1,
                Ok(Ok(None)) => panic!("the socket ended without saying why"),
                Ok(Err(e)) => break e,
                Err(_) => panic!("the flood was queued without bound"),
            }
        };
        assert!(read <= 8, "at most the limit's worth was kept: {read} frames");
        assert!(err.to_string().contains("pushed more than"), "{err}");
        assert!(matches!(err, ClientError::Network(_)), "a network error, so the caller connects again");
    }
}

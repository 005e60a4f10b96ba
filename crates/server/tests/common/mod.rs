//! Helpers shared by the integration tests: test devices with real Ed25519
//! keys, signed requests, and a router over a fresh SQLite store.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http_body_util::BodyExt as _;
use subrosa_proto::{
    canonical_request, DeviceAddress, DeviceId, DeviceRecord, Handle, RegisterRequest, SignedHeaders, B64,
    HEADER_DEVICE, HEADER_HANDLE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use subrosa_server::store::{SqliteStore, Store};
use subrosa_server::{app, now_ms, AppState, Limits};
use tower::ServiceExt as _;

/// A device with its own signature key, for signing requests.
pub struct TestDevice {
    pub handle: Handle,
    pub device: DeviceId,
    pub key: Ed25519KeyPair,
    pub identity: Ed25519KeyPair,
}

impl TestDevice {
    pub fn new(prefix: &str) -> Self {
        let handle = Handle::new(&format!("{prefix}{}", hex::encode(rand::random::<[u8; 4]>()))).expect("handle");
        TestDevice {
            handle,
            device: DeviceId(rand::random()),
            key: Ed25519KeyPair::generate().expect("key"),
            identity: Ed25519KeyPair::generate().expect("key"),
        }
    }

    /// Another device of the same account (its own key; not yet added).
    pub fn sibling(&self) -> Self {
        TestDevice {
            handle: self.handle.clone(),
            device: DeviceId(rand::random()),
            key: Ed25519KeyPair::generate().expect("key"),
            identity: Ed25519KeyPair::generate().expect("key"),
        }
    }

    pub fn addr(&self) -> DeviceAddress {
        DeviceAddress { handle: self.handle.clone(), device: self.device }
    }

    pub fn record(&self) -> DeviceRecord {
        DeviceRecord {
            device_id: self.device,
            signature_key: B64(self.key.public_key().as_ref().to_vec()),
            certificate: B64(b"opaque certificate".to_vec()),
        }
    }

    pub fn register_body(&self) -> Vec<u8> {
        serde_json::to_vec(&RegisterRequest {
            handle: self.handle.clone(),
            identity_key: B64(self.identity.public_key().as_ref().to_vec()),
            device: self.record(),
        })
        .expect("json")
    }

    /// The five signature headers for a request.
    pub fn sign(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
        timestamp: u64,
        nonce: &str,
    ) -> Vec<(&'static str, String)> {
        let h = SignedHeaders {
            handle: self.handle.to_string(),
            device: self.device.to_hex(),
            timestamp,
            nonce: nonce.to_owned(),
        };
        let sig = self.key.sign(&canonical_request(method, path_and_query, &h, body));
        vec![
            (HEADER_HANDLE, h.handle),
            (HEADER_DEVICE, h.device),
            (HEADER_TIMESTAMP, timestamp.to_string()),
            (HEADER_NONCE, h.nonce),
            (HEADER_SIGNATURE, STANDARD.encode(sig.as_ref())),
        ]
    }

    /// A signed request with a fresh nonce and the current time.
    pub fn request(&self, method: &str, path_and_query: &str, body: Vec<u8>) -> Request<Body> {
        self.request_with(method, path_and_query, body, now_ms(), &fresh_nonce())
    }

    pub fn request_with(&self, method: &str, pq: &str, body: Vec<u8>, timestamp: u64, nonce: &str) -> Request<Body> {
        let mut b = Request::builder().method(method).uri(pq);
        for (k, v) in self.sign(method, pq, &body, timestamp, nonce) {
            b = b.header(k, v);
        }
        b.header("content-type", "application/json").body(Body::from(body)).expect("request")
    }
}

pub fn fresh_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// A router over a fresh store in a temp dir.
pub struct TestApp {
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn Store>,
    pub state: AppState,
    pub router: Router,
}

impl TestApp {
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("server.db")).expect("store"));
        // Publish key-directory epochs without waiting: tests register a lot.
        let state =
            AppState::new(Arc::clone(&store), limits).with_kt_publish_interval(std::time::Duration::from_millis(5));
        let router = app(state.clone());
        TestApp { dir, store, state, router }
    }

    /// Sends a request; returns the status and the JSON body (Null if none).
    pub async fn call(&self, req: Request<Body>) -> (StatusCode, serde_json::Value) {
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("non-JSON answer {status}: {:?}", String::from_utf8_lossy(&bytes)))
        };
        (status, json)
    }

    /// Adds a new device to `by`'s account, signed by `by`; panics unless it
    /// succeeds.
    pub async fn add_device(&self, by: &TestDevice) -> TestDevice {
        let d = by.sibling();
        let body = serde_json::to_vec(&serde_json::json!({ "device": d.record() })).expect("json");
        let (status, answer) = self.call(by.request("POST", "/v1/devices", body)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        d
    }

    /// Registers a new device; panics unless it succeeds.
    pub async fn register(&self, prefix: &str) -> TestDevice {
        let d = TestDevice::new(prefix);
        let (status, body) = self.call(d.request("POST", "/v1/accounts", d.register_body())).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        d
    }
}

/// Asserts status and error code.
#[track_caller]
pub fn assert_error(got: &(StatusCode, serde_json::Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "body: {}", got.1);
    assert_eq!(got.1["code"], code, "body: {}", got.1);
    assert!(got.1["message"].as_str().is_some_and(|m| !m.is_empty()), "body: {}", got.1);
}

/// One HTTP/1.1 exchange over any stream; returns status and JSON body.
pub async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    req: axum::http::Request<axum::body::Body>,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (parts, body) = req.into_parts();
    let body = http_body_util::BodyExt::collect(body).await.expect("body").to_bytes();
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
        parts.method,
        parts.uri,
        body.len()
    );
    for (k, v) in &parts.headers {
        if k != "content-length" {
            head.push_str(&format!("{k}: {}\r\n", v.to_str().expect("header")));
        }
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(&body).await.expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw);
    let status: u16 = text.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let (_, body) = text.split_once("\r\n\r\n").expect("head and body");
    // Bodies here are small and sent with a content-length, not chunked.
    let json = serde_json::from_str(body.trim()).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// [`exchange`] over a new TCP connection to `addr`.
pub async fn http(addr: std::net::SocketAddr, req: axum::http::Request<axum::body::Body>) -> (u16, serde_json::Value) {
    exchange(tokio::net::TcpStream::connect(addr).await.expect("connect"), req).await
}

/// Registers a new test device on a server process at `addr`.
pub async fn register(addr: std::net::SocketAddr, prefix: &str) -> TestDevice {
    let d = TestDevice::new(prefix);
    let (status, body) = http(addr, d.request("POST", "/v1/accounts", d.register_body())).await;
    assert_eq!(status, 201, "{body}");
    d
}

/// The `subrosa-server` binary under test, killed when dropped.
pub struct Spawned {
    /// The process.
    pub child: std::process::Child,
    /// Where it listens for HTTP.
    pub addr: std::net::SocketAddr,
    /// Its standard output, after the "listening on" line.
    pub stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server binary `bin` with `args` and `configure` applied
/// (environment, stderr), stdout piped, and waits for its ready line.
pub fn spawn_server(
    bin: &str,
    args: &[&std::ffi::OsStr],
    configure: impl FnOnce(&mut std::process::Command),
) -> Spawned {
    use std::io::BufRead as _;
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
    configure(&mut cmd);
    let mut child = cmd.spawn().expect("spawn");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("ready line");
    let addr = line.trim().strip_prefix("listening on http://").expect("ready line").parse().expect("addr");
    Spawned { child, addr, stdout }
}

/// A stand-in key package: the framing the server reads (MLS 1.0, wire
/// format `mls_key_package`, version, the classical suite 1) before
/// `tag`, which stands for the rest, opaque to the server.
#[allow(dead_code)]
pub fn kp(tag: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00, 0x01, 0x00, 0x05, 0x00, 0x01, 0x00, 0x01];
    out.extend_from_slice(tag);
    out
}

/// Creates a conversation whose roster is `members` on the server process
/// at `server` (a commit at epoch 0 framed as the server reads it; its
/// content stays opaque).
pub async fn roster_conversation(
    server: std::net::SocketAddr,
    by: &TestDevice,
    members: &[&TestDevice],
) -> subrosa_proto::ConversationId {
    let id = subrosa_proto::ConversationId(rand::random());
    let mut framed = vec![0x00, 0x01, 0x00, 0x02, 0x10];
    framed.extend_from_slice(id.as_bytes());
    framed.extend_from_slice(&0u64.to_be_bytes());
    framed.push(3);
    framed.extend_from_slice(b"commit");
    let others: Vec<_> = members.iter().filter(|m| m.handle != by.handle).map(|m| m.addr()).collect();
    let body = serde_json::json!({
        "conversation": id.to_hex(),
        "send_id": hex::encode(rand::random::<[u8; 16]>()),
        "commit": { "epoch": 0, "members": members.iter().map(|m| m.addr()).collect::<Vec<_>>() },
        "parts": [{ "kind": "commit", "recipients": others, "ciphertext": STANDARD.encode(&framed) }],
    });
    let (status, answer) =
        http(server, by.request("POST", "/v1/messages", serde_json::to_vec(&body).expect("json"))).await;
    assert_eq!(status, 200, "{answer}");
    id
}

/// Asks the server process at `server` for a call relay token: the status,
/// and the token and relay port when given.
pub async fn call_token(
    server: std::net::SocketAddr,
    device: &TestDevice,
    id: &subrosa_proto::ConversationId,
) -> (u16, Option<(subrosa_proto::relay::Token, u16)>) {
    let body = serde_json::to_vec(&serde_json::json!({ "conversation": id.to_hex() })).expect("json");
    let (status, answer) = http(server, device.request("POST", "/v1/calls/token", body)).await;
    if status != 200 {
        return (status, None);
    }
    let bytes = STANDARD.decode(answer["token"].as_str().expect("token")).expect("b64");
    let token = subrosa_proto::relay::Token(
        <[u8; subrosa_proto::relay::TOKEN_LEN]>::try_from(bytes.as_slice()).expect("token length"),
    );
    let port = u16::try_from(answer["udp_port"].as_u64().expect("port")).expect("port");
    (status, Some((token, port)))
}

//! The server on a real socket: WebSocket push, expiry, TLS, shutdown.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{exchange, http, register, TestDevice};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use subrosa_proto::{ConversationId, ServerFrame};
use subrosa_server::store::StoreError;
use subrosa_server::{start, RunningServer, ServerConfig, ServerError};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn server(dir: &tempfile::TempDir, tweak: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    let mut config = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().join("data"));
    tweak(&mut config);
    start(config).await.expect("server starts")
}

async fn send_text(addr: SocketAddr, from: &TestDevice, to: &TestDevice, ciphertext: &[u8]) {
    let body = json!({
        "conversation": ConversationId([5; 16]).to_hex(),
        "send_id": hex::encode(rand::random::<[u8; 16]>()),
        "parts": [{ "kind": "application", "recipients": [to.addr()], "ciphertext": b64(ciphertext) }],
    });
    let (status, answer) =
        http(addr, from.request("POST", "/v1/messages", serde_json::to_vec(&body).expect("json"))).await;
    assert_eq!(status, 200, "{answer}");
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect_ws(addr: SocketAddr, d: &TestDevice) -> Ws {
    let mut req = format!("ws://{addr}/v1/ws").into_client_request().expect("request");
    for (k, v) in d.sign("GET", "/v1/ws", b"", subrosa_server::now_ms(), &common::fresh_nonce()) {
        req.headers_mut().insert(k, v.parse().expect("header"));
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("upgrade");
    assert_eq!(resp.status(), 101);
    ws
}

async fn next_frame(ws: &mut Ws) -> ServerFrame {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame in time");
        match msg.expect("open").expect("frame") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_pushes_pending_and_new_messages_and_takes_acks() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |_| {}).await;
    let addr = srv.local_addr();
    assert_eq!(srv.url(), format!("http://{addr}"));
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;
    send_text(addr, &alice, &bob, b"queued before connect").await;

    let mut ws = connect_ws(addr, &bob).await;
    let ServerFrame::Messages { messages } = next_frame(&mut ws).await else { panic!("expected messages") };
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].ciphertext.as_slice(), b"queued before connect");
    let first_id = messages[0].id;

    // A new send is pushed promptly (woken, not polled), and only the new one.
    let started = Instant::now();
    send_text(addr, &alice, &bob, b"pushed live").await;
    let ServerFrame::Messages { messages } = next_frame(&mut ws).await else { panic!("expected messages") };
    assert!(started.elapsed() < Duration::from_secs(5), "push took {:?}", started.elapsed());
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].ciphertext.as_slice(), b"pushed live");
    let second_id = messages[0].id;
    assert!(second_id > first_id);

    // Acks over the socket delete the rows.
    ws.send(Message::Text(json!({ "type": "ack", "ids": [first_id, second_id] }).to_string().into()))
        .await
        .expect("ack");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = srv.state().store().stats().await.expect("stats");
        if stats.inbox_rows == 0 && stats.messages == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "ack over the socket did not delete: {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A malformed frame gets an error frame and a close.
    ws.send(Message::Text("{\"type\":\"ack\",\"ids\":\"nope\"}".into())).await.expect("send");
    let ServerFrame::Error(err) = next_frame(&mut ws).await else { panic!("expected an error frame") };
    assert_eq!(err.code.as_str(), "bad_request");
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "socket not closed after a malformed frame");

    // The server still serves; a second socket works.
    let mut ws = connect_ws(addr, &bob).await;
    send_text(addr, &alice, &bob, b"after").await;
    let ServerFrame::Messages { messages } = next_frame(&mut ws).await else { panic!("expected messages") };
    assert_eq!(messages[0].ciphertext.as_slice(), b"after");

    // Shutdown closes open sockets and stops accepting.
    tokio::time::timeout(Duration::from_secs(15), srv.shutdown()).await.expect("graceful shutdown in time");
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "socket left open by shutdown");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
}

/// A client frame sent in the same write as the upgrade request (so it is
/// already in the server's buffer when the socket starts) is handled, not
/// lost, and before the first push: the socket reads once at once to free
/// the request's buffer, and keeps what that read found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_sent_with_the_upgrade_is_handled_before_the_first_push() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |_| {}).await;
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;
    send_text(addr, &alice, &bob, b"first").await;
    let mut ws = connect_ws(addr, &bob).await;
    let ServerFrame::Messages { messages } = next_frame(&mut ws).await else { panic!("expected messages") };
    let first = messages[0].id;
    drop(ws);

    // The upgrade and an acknowledgement of `first`, in one write.
    let mut request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in bob.sign("GET", "/v1/ws", b"", subrosa_server::now_ms(), &common::fresh_nonce()) {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let ack = json!({ "type": "ack", "ids": [first] }).to_string();
    let mask = [0x5a, 0x17, 0xc3, 0x09];
    let mut bytes = request.into_bytes();
    bytes.extend([0x81, 0x80 | u8::try_from(ack.len()).expect("a short frame")]);
    bytes.extend(mask);
    bytes.extend(ack.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&bytes).await.expect("write");

    // The answer's head; whatever follows it is the socket's.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.expect("the upgrade's answer");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.state().store().stats().await.expect("stats").inbox_rows != 0 {
        assert!(Instant::now() < deadline, "the acknowledgement sent with the upgrade was lost");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Acknowledged before the first push: the first frame is the next message.
    send_text(addr, &alice, &bob, b"second").await;
    let ServerFrame::Messages { messages } = next_frame(&mut ws).await else { panic!("expected messages") };
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].ciphertext.as_slice(), b"second");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_must_be_signed() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |_| {}).await;
    let addr = srv.local_addr();
    let bob = register(addr, "bob").await;
    let req = format!("ws://{addr}/v1/ws").into_client_request().expect("request");
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("unsigned upgrade accepted: {:?}", other.map(|(_, r)| r.status())),
    }
    // A replayed upgrade is refused.
    let mut req = format!("ws://{addr}/v1/ws").into_client_request().expect("request");
    for (k, v) in bob.sign("GET", "/v1/ws", b"", subrosa_server::now_ms(), &common::fresh_nonce()) {
        req.headers_mut().insert(k, v.parse().expect("header"));
    }
    let (_ws, _) = tokio_tungstenite::connect_async(req.clone()).await.expect("first upgrade");
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("replayed upgrade accepted: {:?}", other.map(|(_, r)| r.status())),
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_messages_expire() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |c| c.message_ttl = Duration::from_secs(2)).await;
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;
    send_text(addr, &alice, &bob, b"expires").await;
    assert_eq!(srv.state().store().stats().await.expect("stats").messages, 1);
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let stats = srv.state().store().stats().await.expect("stats");
        if stats.messages == 0 && stats.inbox_rows == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "message not expired: {stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = http(addr, bob.request("GET", "/v1/inbox", vec![])).await;
    assert_eq!(status, 200);
    assert_eq!(body["messages"], json!([]));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_errors_are_clear() {
    let dir = tempfile::tempdir().expect("dir");
    let mut config = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().join("data"));
    // Nothing listens on port 1: a clear error, at once, rather than a hang.
    config.database = Some("postgres://subrosa@127.0.0.1:1/subrosa".into());
    let err = start(config).await.expect_err("unreachable database");
    assert!(matches!(err, ServerError::Store(StoreError::Unavailable(_))), "{err:?}");
    assert!(err.to_string().starts_with("database: storage unavailable"), "{err}");

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let config = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), file.join("data"));
    assert!(matches!(start(config).await, Err(ServerError::DataDir { .. })));

    let mut config = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().join("d2"));
    config.database = Some(format!("sqlite://{}", dir.path().join("custom.db").display()));
    let srv = start(config).await.expect("custom sqlite path");
    assert!(dir.path().join("custom.db").exists());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_with_tls() {
    let dir = tempfile::tempdir().expect("dir");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("self-signed certificate");
    std::fs::write(&cert, made.cert.pem()).expect("write cert");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
    let srv =
        server(&dir, |c| c.tls = Some(subrosa_server::TlsConfig { cert_path: cert.clone(), key_path: key.clone() }))
            .await;
    let addr = srv.local_addr();
    assert_eq!(srv.url(), format!("https://{addr}"));

    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&cert).expect("pem") {
        roots.add(c.expect("cert")).expect("root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let req = axum::http::Request::get("/v1/health").body(axum::body::Body::empty()).expect("req");
    let (status, body) = exchange(tls, req).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({ "status": "ok" }));

    // Plain HTTP on the TLS port gets no answer.
    let plain = tokio::time::timeout(
        Duration::from_secs(5),
        http(addr, axum::http::Request::get("/v1/health").body(axum::body::Body::empty()).expect("req")),
    );
    let plain = tokio::spawn(plain);
    assert!(!matches!(plain.await, Ok(Ok((200, _)))));
    srv.shutdown().await;

    // Unreadable TLS files are a clear startup error.
    let mut config = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().join("d3"));
    config.tls = Some(subrosa_server::TlsConfig { cert_path: dir.path().join("missing.pem"), key_path: key });
    assert!(matches!(start(config).await, Err(ServerError::Tls(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_pushes_large_and_many_envelopes_in_bounded_frames() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |_| {}).await;
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;
    let big = vec![0x5a; subrosa_proto::limits::MAX_CIPHERTEXT_BYTES];
    send_text(addr, &alice, &bob, &big).await;
    for i in 0..250u32 {
        send_text(addr, &alice, &bob, &i.to_le_bytes()).await;
    }
    let mut ws = connect_ws(addr, &bob).await;
    let mut got = Vec::new();
    let mut frames = 0;
    while got.len() < 251 {
        let ServerFrame::Messages { messages } = next_frame(&mut ws).await else { panic!("expected messages") };
        assert!(!messages.is_empty() && messages.len() <= 100, "frame of {}", messages.len());
        frames += 1;
        got.extend(messages);
    }
    assert!(frames >= 3, "{frames} frames");
    assert_eq!(got[0].ciphertext.as_slice(), &big[..]);
    assert!(got.windows(2).all(|w| w[0].id < w[1].id), "oldest first, each once");
    assert_eq!(got[250].ciphertext.as_slice(), &249u32.to_le_bytes());
    srv.shutdown().await;
}

async fn add_device(addr: SocketAddr, by: &TestDevice) -> TestDevice {
    let d = by.sibling();
    let body = serde_json::to_vec(&json!({ "device": d.record() })).expect("json");
    let (status, answer) = http(addr, by.request("POST", "/v1/devices", body)).await;
    assert_eq!(status, 200, "{answer}");
    d
}

/// Waits for an `unauthorized` error frame and the close that follows it.
async fn expect_removed(ws: &mut Ws, within: Duration) {
    let closed = tokio::time::timeout(within, async {
        let mut saw_error = false;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    if let Ok(ServerFrame::Error(err)) = serde_json::from_str(t.as_str()) {
                        assert_eq!(err.code.as_str(), "unauthorized");
                        saw_error = true;
                    }
                }
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return saw_error,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true), "the removed device's socket was not closed with an error frame");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_device_closes_its_socket() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |_| {}).await;
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;
    let bob2 = add_device(addr, &bob).await;
    let mut ws_bob = connect_ws(addr, &bob).await;
    let mut ws_bob2 = connect_ws(addr, &bob2).await;

    let started = Instant::now();
    let (status, answer) = http(addr, bob.request("DELETE", &format!("/v1/devices/{}", bob2.device), vec![])).await;
    assert_eq!(status, 200, "{answer}");
    expect_removed(&mut ws_bob2, Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "close took {:?}", started.elapsed());
    // A new socket of the removed device is refused; bob's own still works.
    let mut req = format!("ws://{addr}/v1/ws").into_client_request().expect("request");
    for (k, v) in bob2.sign("GET", "/v1/ws", b"", subrosa_server::now_ms(), &common::fresh_nonce()) {
        req.headers_mut().insert(k, v.parse().expect("header"));
    }
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("removed device upgraded: {:?}", other.map(|(_, r)| r.status())),
    }
    send_text(addr, &alice, &bob, b"still here").await;
    let ServerFrame::Messages { messages } = next_frame(&mut ws_bob).await else { panic!("expected messages") };
    assert_eq!(messages[0].ciphertext.as_slice(), b"still here");
    srv.shutdown().await;
}

/// A removal made elsewhere (another node sharing the database: no local
/// revocation) closes the socket at its next re-check.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removal_on_another_node_closes_the_socket_at_the_recheck() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |_| {}).await;
    let addr = srv.local_addr();
    let bob = register(addr, "bob").await;
    let bob2 = add_device(addr, &bob).await;
    let mut ws = connect_ws(addr, &bob2).await;
    // Let the socket reach its wait before the removal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    srv.state().store().remove_device(&bob2.addr()).await.expect("remove behind the node's back");
    expect_removed(&mut ws, Duration::from_secs(20)).await;
    srv.shutdown().await;
}

/// A key change this node was not told of (made on another node, or
/// committed while the upgrade was being answered) closes a socket opened
/// with the old key at its next re-check; the device reconnects with its new
/// key, and a socket opened with the current key stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_socket_opened_with_an_old_key_closes_at_the_recheck() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |_| {}).await;
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;
    let mut ws = connect_ws(addr, &bob).await;
    let mut ws_alice = connect_ws(addr, &alice).await;
    // Let the sockets reach their wait before the change.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Bob's device takes a new signature key behind this node's back.
    let mut new_bob = TestDevice::new("unused");
    new_bob.handle = bob.handle.clone();
    new_bob.device = bob.device;
    new_bob.identity = aws_lc_rs::signature::Ed25519KeyPair::generate().expect("key");
    let identity = srv.state().store().account(&bob.handle).await.expect("account").expect("exists").identity_key;
    srv.state()
        .store()
        .replace_keys(&bob.addr(), identity.as_slice().to_vec(), vec![new_bob.record()])
        .await
        .expect("rekey behind the node's back");
    let closed = tokio::time::timeout(Duration::from_secs(25), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the socket opened with bob's old key stayed open past a re-check");
    // With the new key bob's device connects and is pushed to; alice's
    // socket (unchanged key) was left open.
    let mut ws = connect_ws(addr, &new_bob).await;
    send_text(addr, &alice, &bob, b"after the rekey").await;
    let ServerFrame::Messages { messages } = next_frame(&mut ws).await else { panic!("expected messages") };
    assert_eq!(messages[0].ciphertext.as_slice(), b"after the rekey");
    send_text(addr, &new_bob, &alice, b"alice still connected").await;
    let got = next_frame(&mut ws_alice).await;
    let ServerFrame::Messages { messages } = got else { panic!("expected messages") };
    assert_eq!(messages[0].ciphertext.as_slice(), b"alice still connected");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_deletes_expired_link_slots() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |c| c.message_ttl = Duration::from_secs(2)).await;
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;
    let store = srv.state().store();
    let link = subrosa_proto::LinkId(rand::random());
    store.create_link(&link, &alice.handle, b"req".to_vec(), subrosa_server::now_ms() + 200).await.expect("create");
    let deadline = Instant::now() + Duration::from_secs(6);
    while store.stats().await.expect("stats").links > 0 {
        assert!(Instant::now() < deadline, "expired link slot not swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledgements_count_against_the_devices_rate_limit() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |c| {
        c.limits.requests_per_second = 1;
        c.limits.burst = 2;
    })
    .await;
    let addr = srv.local_addr();
    let bob = register(addr, "bob").await;
    // The upgrade took one of bob's two tokens; one frame acknowledging a
    // thousand ids costs eleven (the whole burst).
    let mut ws = connect_ws(addr, &bob).await;
    let ids: Vec<u64> = (1..=1000).collect();
    ws.send(Message::Text(json!({ "type": "ack", "ids": ids }).to_string().into())).await.expect("send");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The same device's signed requests now wait their turn: a token comes
    // back only after a second.
    let (status, body) = http(addr, bob.request("GET", "/v1/inbox", Vec::new())).await;
    assert_eq!(status, 429, "acks were free: {body}");
}

//! Binary frames on the WebSocket: the challenge, sends answered only once
//! stored, binary pushes and acknowledgements, the rate limit, and clients
//! that do not ask for frames (today's) served exactly as before.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{http, register, TestDevice};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use subrosa_proto::frames::{
    auth_message, ClientBin, FrameSend, ServerBin, CHALLENGE_LEN, HEADER_CHALLENGE, HEADER_FRAMES,
};
use subrosa_proto::{ConversationId, ErrorCode, MessageKind, SendId, SendPart, ServerFrame, B64};
use subrosa_server::{start, RunningServer, ServerConfig};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn server(dir: &tempfile::TempDir, tweak: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    let mut config = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().join("data"));
    tweak(&mut config);
    start(config).await.expect("server starts")
}

/// Opens the signed socket; with `frames`, asks for binary frames and
/// returns the challenge the server answered with.
async fn connect(addr: SocketAddr, d: &TestDevice, frames: bool) -> (Ws, Option<[u8; CHALLENGE_LEN]>) {
    let mut req = format!("ws://{addr}/v1/ws").into_client_request().expect("request");
    for (k, v) in d.sign("GET", "/v1/ws", b"", subrosa_server::now_ms(), &common::fresh_nonce()) {
        req.headers_mut().insert(k, v.parse().expect("header"));
    }
    if frames {
        req.headers_mut().insert(HEADER_FRAMES, "1".parse().expect("header"));
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("upgrade");
    assert_eq!(resp.status(), 101);
    let offered = resp.headers().get(HEADER_FRAMES).map(|v| v.as_bytes().to_vec());
    let challenge = resp
        .headers()
        .get(HEADER_CHALLENGE)
        .map(|v| <[u8; CHALLENGE_LEN]>::try_from(hex::decode(v.as_bytes()).expect("hex")).expect("challenge length"));
    if frames {
        assert_eq!(offered.as_deref(), Some(&b"1"[..]), "the server offers frames when asked");
    } else {
        assert!(offered.is_none() && challenge.is_none(), "no frames for a client that did not ask");
    }
    (ws, challenge)
}

fn auth(d: &TestDevice, challenge: &[u8; CHALLENGE_LEN]) -> Message {
    let sig = d.key.sign(&auth_message(challenge, &d.addr()));
    let sig = <[u8; 64]>::try_from(sig.as_ref()).expect("signature");
    Message::Binary(ClientBin::Auth(sig).encode().expect("auth").into())
}

fn send_frame(request: u32, send_id: SendId, to: &TestDevice, ciphertext: &[u8]) -> Message {
    let frame = ClientBin::Send(FrameSend {
        request,
        conversation: ConversationId([5; 16]),
        send_id,
        expires_at: None,
        parts: vec![SendPart {
            kind: MessageKind::Application,
            recipients: vec![to.addr()],
            ciphertext: B64(ciphertext.to_vec()),
        }],
    });
    Message::Binary(frame.encode().expect("send").into())
}

/// The next data frame, binary or JSON text.
enum Got {
    Bin(ServerBin),
    Json(ServerFrame),
    Closed,
}

async fn next(ws: &mut Ws) -> Got {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame in time");
        match msg {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Got::Closed,
            Some(Ok(Message::Binary(b))) => return Got::Bin(ServerBin::decode(&b).expect("a server frame")),
            Some(Ok(Message::Text(t))) => return Got::Json(serde_json::from_str(t.as_str()).expect("server frame")),
            Some(Ok(_)) => continue,
        }
    }
}

async fn refused_and_closed(ws: &mut Ws, code: &str) {
    let Got::Json(ServerFrame::Error(err)) = next(ws).await else { panic!("expected an error frame") };
    assert_eq!(err.code.as_str(), code, "{}", err.message);
    assert!(matches!(next(ws).await, Got::Closed), "socket left open");
}

async fn wait_empty(srv: &RunningServer) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = srv.state().store().stats().await.expect("stats");
        if stats.inbox_rows == 0 && stats.messages == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "acknowledged rows were not deleted: {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sends_pushes_and_acks_travel_as_binary_frames() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |_| {}).await;
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;

    let (mut a, challenge) = connect(addr, &alice, true).await;
    a.send(auth(&alice, &challenge.expect("challenge"))).await.expect("auth");
    let (mut b, challenge) = connect(addr, &bob, true).await;
    b.send(auth(&bob, &challenge.expect("challenge"))).await.expect("auth");

    let id = SendId(rand::random());
    a.send(send_frame(7, id, &bob, b"over the socket")).await.expect("send");
    let Got::Bin(ServerBin::Sent { request: 7, duplicate: false, .. }) = next(&mut a).await else {
        panic!("expected the send's answer")
    };
    // Answered once stored: the row is there for bob.
    assert_eq!(srv.state().store().stats().await.expect("stats").inbox_rows, 1);
    let Got::Bin(ServerBin::Messages(messages)) = next(&mut b).await else { panic!("expected a binary push") };
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].ciphertext.as_slice(), b"over the socket");
    assert_eq!(messages[0].sender, alice.addr());

    // A retry with the same send id is stored once.
    a.send(send_frame(8, id, &bob, b"over the socket")).await.expect("send");
    let Got::Bin(ServerBin::Sent { request: 8, duplicate: true, .. }) = next(&mut a).await else {
        panic!("expected a duplicate")
    };

    b.send(Message::Binary(ClientBin::Ack(vec![messages[0].id]).encode().expect("ack").into())).await.expect("ack");
    wait_empty(&srv).await;

    // A refused send is answered with the code HTTP would give, and the
    // socket stays usable.
    let stranger = TestDevice::new("nobody");
    a.send(send_frame(9, SendId(rand::random()), &stranger, b"x")).await.expect("send");
    let Got::Bin(ServerBin::Refused { request: 9, error }) = next(&mut a).await else { panic!("expected a refusal") };
    assert_eq!(error.code, ErrorCode::UnknownHandle, "{}", error.message);
    a.send(send_frame(10, SendId(rand::random()), &bob, b"again")).await.expect("send");
    let Got::Bin(ServerBin::Sent { request: 10, .. }) = next(&mut a).await else { panic!("expected an answer") };
    let Got::Bin(ServerBin::Messages(messages)) = next(&mut b).await else { panic!("expected a binary push") };
    assert_eq!(messages[0].ciphertext.as_slice(), b"again");

    // Today's JSON acknowledgement is taken on a binary socket too.
    b.send(Message::Text(json!({ "type": "ack", "ids": [messages[0].id] }).to_string().into())).await.expect("ack");
    wait_empty(&srv).await;

    // Bytes that are no frame close the socket.
    b.send(Message::Binary(vec![1, 0x7f].into())).await.expect("send");
    refused_and_closed(&mut b, "bad_request").await;
}

/// A send frame carries a disappearing message's expiry, which the server
/// keeps (capped at its message TTL, as for HTTP); the send frame of the
/// layout before it (type 2, no expiry) is refused with a plain word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_frame_carries_its_expiry_and_the_old_layout_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |_| {}).await;
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;
    let (mut a, challenge) = connect(addr, &alice, true).await;
    a.send(auth(&alice, &challenge.expect("challenge"))).await.expect("auth");

    let expiring = |request: u32, expires_at: u64| {
        let frame = ClientBin::Send(FrameSend {
            request,
            conversation: ConversationId([6; 16]),
            send_id: SendId(rand::random()),
            expires_at: Some(expires_at),
            parts: vec![SendPart {
                kind: MessageKind::Application,
                recipients: vec![bob.addr()],
                ciphertext: B64(vec![request as u8; 4]),
            }],
        });
        Message::Binary(frame.encode().expect("send").into())
    };
    let soon = subrosa_server::now_ms() + 60_000;
    a.send(expiring(1, soon)).await.expect("send");
    let Got::Bin(ServerBin::Sent { request: 1, .. }) = next(&mut a).await else { panic!("expected an answer") };
    // Past the message TTL: capped to it.
    a.send(expiring(2, u64::MAX)).await.expect("send");
    let Got::Bin(ServerBin::Sent { request: 2, .. }) = next(&mut a).await else { panic!("expected an answer") };
    let db = rusqlite::Connection::open(dir.path().join("data").join("server.db")).expect("db");
    let stored: Vec<Option<u64>> = db
        .prepare("SELECT expires_at FROM messages ORDER BY id")
        .expect("query")
        .query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("expiries");
    let ttl = subrosa_proto::limits::DEFAULT_MESSAGE_TTL_SECS * 1000;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0], Some(soon), "the frame's expiry is stored");
    let capped = stored[1].expect("an expiry");
    assert!(capped <= subrosa_server::now_ms() + ttl && capped + 60_000 > subrosa_server::now_ms() + ttl, "{capped}");

    // A send in the layout before `expires_at` existed (type 2).
    let mut old = vec![1, 2, 0, 0, 0, 3];
    old.extend_from_slice(&[6; 16]);
    old.extend_from_slice(&[7; 16]);
    old.extend_from_slice(&[1, 3, 0, 1, 3]); // one application part, one recipient: "bob"
    old.extend_from_slice(b"bob");
    old.extend_from_slice(bob.addr().device.as_bytes());
    old.extend_from_slice(&[0, 0, 0, 4, 3, 3, 3, 3]);
    a.send(Message::Binary(old.into())).await.expect("send");
    let Got::Json(ServerFrame::Error(err)) = next(&mut a).await else { panic!("expected an error frame") };
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(err.message.contains("needs an upgrade"), "{}", err.message);
    assert_eq!(srv.state().store().stats().await.expect("stats").messages, 2, "the old frame stored nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_needs_the_signed_challenge_of_its_own_socket() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |_| {}).await;
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;

    // No signature yet: refused, nothing stored.
    let (mut ws, _) = connect(addr, &alice, true).await;
    ws.send(send_frame(1, SendId(rand::random()), &bob, b"x")).await.expect("send");
    refused_and_closed(&mut ws, "unauthorized").await;

    // A signature over another socket's challenge (a replay) is refused.
    let (mut first, challenge) = connect(addr, &alice, true).await;
    let replayed = auth(&alice, &challenge.expect("challenge"));
    first.send(replayed.clone()).await.expect("auth");
    let (mut second, _) = connect(addr, &alice, true).await;
    second.send(replayed).await.expect("auth");
    refused_and_closed(&mut second, "unauthorized").await;

    // Another device's key over the right challenge is refused.
    let (mut third, challenge) = connect(addr, &alice, true).await;
    third.send(auth(&bob, &challenge.expect("challenge"))).await.expect("auth");
    refused_and_closed(&mut third, "unauthorized").await;

    // A socket that did not ask for frames takes none, and stays as today.
    let (mut plain, _) = connect(addr, &alice, false).await;
    plain.send(send_frame(1, SendId(rand::random()), &bob, b"x")).await.expect("send");
    refused_and_closed(&mut plain, "bad_request").await;

    // The first socket, signed, still sends.
    first.send(send_frame(2, SendId(rand::random()), &bob, b"ok")).await.expect("send");
    let Got::Bin(ServerBin::Sent { request: 2, .. }) = next(&mut first).await else { panic!("expected an answer") };
    assert_eq!(srv.state().store().stats().await.expect("stats").inbox_rows, 1);
}

/// What a client of today's main does on the socket (no frames header, a
/// JSON acknowledgement) still works, and its pushes are JSON text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_frames_is_served_as_before() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |_| {}).await;
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;
    let (mut a, challenge) = connect(addr, &alice, true).await;
    a.send(auth(&alice, &challenge.expect("challenge"))).await.expect("auth");
    let (mut b, _) = connect(addr, &bob, false).await;

    a.send(send_frame(1, SendId(rand::random()), &bob, b"to an old client")).await.expect("send");
    let Got::Bin(ServerBin::Sent { .. }) = next(&mut a).await else { panic!("expected an answer") };
    let Got::Json(ServerFrame::Messages { messages }) = next(&mut b).await else { panic!("expected a JSON push") };
    assert_eq!(messages[0].ciphertext.as_slice(), b"to an old client");
    // The exact bytes such a client sends.
    let ack = format!("{{\"type\":\"ack\",\"ids\":[{}]}}", messages[0].id);
    b.send(Message::Text(ack.into())).await.expect("ack");
    wait_empty(&srv).await;
}

/// Every send frame costs the device a rate-limit token, as a signed send
/// does: once the frames spent its burst, its next signed request is
/// refused (frames past the burst are only slowed: each waits for its
/// token before it is stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_frames_spend_the_devices_rate_limit() {
    let dir = tempfile::tempdir().expect("dir");
    let srv = server(&dir, |c| {
        c.limits.requests_per_second = 1;
        c.limits.burst = 6;
    })
    .await;
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;
    // The upgrade takes one token; five frames take the rest, two more
    // wait for theirs.
    let (mut a, challenge) = connect(addr, &alice, true).await;
    a.send(auth(&alice, &challenge.expect("challenge"))).await.expect("auth");
    for request in 0..7 {
        a.send(send_frame(request, SendId(rand::random()), &bob, b"x")).await.expect("send");
        let Got::Bin(ServerBin::Sent { .. }) = next(&mut a).await else { panic!("expected an answer") };
    }
    let (status, body) = http(addr, alice.request("GET", "/v1/keypackages", Vec::new())).await;
    assert_eq!(status, 429, "{body}");
}

//! The call relay of the real `subrosa-server` binary (`--relay-listen`):
//! tokens only for roster members, media only among addresses that proved
//! one, nothing sent to anyone else.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr as _;
use std::time::Duration;

use base64::Engine as _;
use common::{http, register, TestDevice};
use serde_json::json;
use subrosa_proto::relay::{Datagram, Token, TOKEN_LEN};
use subrosa_proto::ConversationId;

const BIN: &str = env!("CARGO_BIN_EXE_subrosa-server");

/// The binary with the call relay on, over a fresh data directory.
fn start() -> (common::Spawned, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["--listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0", "--data"];
    let mut args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    args.push(dir.path().as_os_str());
    (common::spawn_server(BIN, &args, |_| {}), dir)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Creates a conversation whose roster is `members` (a commit at epoch 0
/// framed as the server reads it; its content stays opaque).
async fn conversation(server: SocketAddr, by: &TestDevice, members: &[&TestDevice]) -> ConversationId {
    let id = ConversationId(rand::random());
    let mut framed = vec![0x00, 0x01, 0x00, 0x02, 0x10];
    framed.extend_from_slice(id.as_bytes());
    framed.extend_from_slice(&0u64.to_be_bytes());
    framed.push(3);
    framed.extend_from_slice(b"commit");
    let others: Vec<_> = members.iter().filter(|m| m.handle != by.handle).map(|m| m.addr()).collect();
    let body = json!({
        "conversation": id.to_hex(),
        "send_id": hex::encode(rand::random::<[u8; 16]>()),
        "commit": { "epoch": 0, "members": members.iter().map(|m| m.addr()).collect::<Vec<_>>() },
        "parts": [{ "kind": "commit", "recipients": others, "ciphertext": b64(&framed) }],
    });
    let (status, answer) =
        http(server, by.request("POST", "/v1/messages", serde_json::to_vec(&body).expect("json"))).await;
    assert_eq!(status, 200, "{answer}");
    id
}

/// Asks for a token: the status, and the token and relay port when given.
async fn token(server: SocketAddr, device: &TestDevice, id: &ConversationId) -> (u16, Option<(Token, u16)>) {
    let body = serde_json::to_vec(&json!({ "conversation": id.to_hex() })).expect("json");
    let (status, answer) = http(server, device.request("POST", "/v1/calls/token", body)).await;
    if status != 200 {
        return (status, None);
    }
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(answer["token"].as_str().expect("token")).expect("b64");
    let token = Token(<[u8; TOKEN_LEN]>::try_from(bytes.as_slice()).expect("token length"));
    let port = u16::try_from(answer["udp_port"].as_u64().expect("port")).expect("port");
    (status, Some((token, port)))
}

fn socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    // Waiting for a datagram that should not come: a bound on the wait,
    // not a measure of speed.
    s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    s
}

fn recv(s: &UdpSocket) -> Option<Datagram> {
    let mut buf = [0u8; 2048];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    Some(Datagram::decode(&buf[..n]).expect("the relay sends valid datagrams"))
}

fn join(s: &UdpSocket, relay: SocketAddr, token: Token) {
    s.send_to(&Datagram::Join(token).encode(), relay).expect("send");
    let Some(Datagram::Challenge(cookie)) = recv(s) else { panic!("no challenge") };
    s.send_to(&Datagram::Prove { cookie, token }.encode(), relay).expect("send");
    assert_eq!(recv(s), Some(Datagram::Joined));
}

#[tokio::test]
async fn the_relay_forwards_only_among_proven_members() {
    let (server, _dir) = start();
    let alice = register(server.addr, "alice").await;
    let bob = register(server.addr, "bob").await;
    let mallory = register(server.addr, "mallory").await;
    let call = conversation(server.addr, &alice, &[&alice, &bob]).await;

    // Tokens: members only.
    let (_, Some((alice_token, port))) = token(server.addr, &alice, &call).await else { panic!("alice: no token") };
    let (_, Some((bob_token, _))) = token(server.addr, &bob, &call).await else { panic!("bob: no token") };
    assert_eq!(token(server.addr, &mallory, &call).await.0, 403, "an outsider gets no token");
    let unknown = ConversationId(rand::random());
    assert_eq!(token(server.addr, &alice, &unknown).await.0, 403, "no token for a conversation without a roster");
    let relay = SocketAddr::from_str(&format!("127.0.0.1:{port}")).expect("relay addr");

    let a = socket();
    let b = socket();
    join(&a, relay, alice_token);
    join(&b, relay, bob_token);

    // Opaque media goes from one member to the other, byte for byte.
    let frame = Datagram::Media(b"an SFrame frame, opaque to the relay".to_vec());
    a.send_to(&frame.encode(), relay).expect("send");
    assert_eq!(recv(&b), Some(frame.clone()));
    b.send_to(&frame.encode(), relay).expect("send");
    assert_eq!(recv(&a), Some(frame.clone()));

    // An address that proved nothing: its media goes nowhere, a bad token
    // gets no answer, and a stolen token without the cookie makes no session.
    let m = socket();
    m.send_to(&frame.encode(), relay).expect("send");
    let mut forged = alice_token;
    forged.0[5] ^= 1;
    m.send_to(&Datagram::Join(forged).encode(), relay).expect("send");
    assert_eq!(recv(&m), None, "no answer to a forged token");
    m.send_to(&Datagram::Prove { cookie: [0; 32], token: alice_token }.encode(), relay).expect("send");
    assert_eq!(recv(&m), None, "no session without the address's cookie");
    m.send_to(&frame.encode(), relay).expect("send");
    assert_eq!(recv(&a), None, "nothing from the unproven address reached alice");
    assert_eq!(recv(&b), None, "nor bob");

    // Alice leaves: bob's media no longer reaches her.
    a.send_to(&Datagram::Leave.encode(), relay).expect("send");
    b.send_to(&frame.encode(), relay).expect("send");
    assert_eq!(recv(&a), None);
}

#[tokio::test]
async fn no_relay_no_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = [std::ffi::OsStr::new("--listen"), "127.0.0.1:0".as_ref(), "--data".as_ref(), dir.path().as_os_str()];
    let server = common::spawn_server(BIN, &args, |_| {});
    let addr = server.addr;
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;
    let call = conversation(addr, &alice, &[&alice, &bob]).await;
    assert_eq!(token(addr, &alice, &call).await.0, 404);
}

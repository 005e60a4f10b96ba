//! The call relay of the real `subrosa-server` binary (`--relay-listen`):
//! tokens only for roster members, media only among addresses that proved
//! one, nothing sent to anyone else.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr as _;
use std::time::Duration;

use common::{call_token as token, register, roster_conversation as conversation};
use subrosa_proto::relay::{Datagram, Token};
use subrosa_proto::ConversationId;

const BIN: &str = env!("CARGO_BIN_EXE_subrosa-server");

/// The binary with the call relay on, over a fresh data directory.
fn start() -> (common::Spawned, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    (start_in(&dir), dir)
}

/// The binary with the call relay on, over the data directory `dir`.
fn start_in(dir: &tempfile::TempDir) -> common::Spawned {
    let args = ["--listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0", "--data"];
    let mut args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    args.push(dir.path().as_os_str());
    common::spawn_server(BIN, &args, |_| {})
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

/// The relay key is kept in the database: a token issued before a restart
/// is still accepted after it (a per-process key would void it).
#[tokio::test]
async fn a_token_outlives_a_restart_of_its_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_in(&dir);
    let alice = register(server.addr, "alice").await;
    let bob = register(server.addr, "bob").await;
    let call = conversation(server.addr, &alice, &[&alice, &bob]).await;
    let (_, Some((before, _))) = token(server.addr, &alice, &call).await else { panic!("alice: no token") };
    drop(server);
    let server = start_in(&dir);
    let (_, Some((_, port))) = token(server.addr, &bob, &call).await else { panic!("bob: no token") };
    let relay = SocketAddr::from(([127, 0, 0, 1], port));
    join(&socket(), relay, before);
}

/// A call socket opened and never joined is closed once it has been quiet
/// as long as an idle UDP session may be, rather than held open for as
/// long as its opener likes.
#[tokio::test]
async fn a_call_socket_that_never_joins_is_closed() {
    use futures_util::StreamExt as _;
    let (server, _dir) = start();
    let url = format!("ws://{}/v1/calls/ws", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("the upgrade succeeds");
    // Bounds the wait; the relay's idle limit is 30 s.
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a silent call socket is still open after a minute");
}

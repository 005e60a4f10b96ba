//! The client's socket: binary frames when the server offers them, today's
//! JSON frames when it does not, and a pushed message received and
//! acknowledged either way. A server of today's main ignores the request's
//! `x-subrosa-frames` header; a proxy that strips it plays that server here.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{stripping_proxy, Server, PASS};
use subrosa_client::{Received, Subrosa};

fn to(handle: &str) -> subrosa_client::Target {
    subrosa_client::Target::Direct(handle.parse().expect("handle"))
}

async fn drain(who: &Subrosa) {
    while who.receive(Duration::ZERO, true, &mut |_| {}).await.expect("receive") > 0 {}
}

/// Registers a pair on `url`, checks which frames the socket speaks, and
/// has a message pushed to bob while he waits on the socket.
async fn pushed_message_arrives(server: &Server, url: &str, binary: bool) {
    let dir = tempfile::tempdir().expect("dir");
    let alice = Subrosa::register(&dir.path().join("alice"), PASS, "alice", url).await.expect("alice registers");
    let bob = Subrosa::register(&dir.path().join("bob"), PASS, "bob", url).await.expect("bob registers");
    let mut socket = bob.api().connect().await.expect("socket");
    assert_eq!(socket.binary(), binary, "binary frames when offered, JSON otherwise");
    socket.close().await.expect("close");

    alice.send_text(&to("bob"), "hello").await.expect("first message");
    drain(&bob).await;
    drain(&alice).await;

    let sender = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        alice.send_text(&to("bob"), "pushed").await.expect("send");
    };
    let mut texts = Vec::new();
    let mut collect = |r: &Received| {
        if let Received::Message(m) = r {
            texts.push(m.text.clone());
        }
    };
    let waiting = bob.receive(Duration::from_secs(30), true, &mut collect);
    let (got, ()) = tokio::join!(waiting, sender);
    assert!(got.expect("receive") >= 1);
    assert!(texts.iter().any(|t| t.contains("pushed")), "{texts:?}");
    // bob acknowledged over the socket: nothing is left queued for him
    // (alice may still have his receipts queued).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = server
            .db()
            .query_row(
                "SELECT COUNT(*) FROM inbox i JOIN devices d ON d.id = i.device WHERE d.handle = 'bob'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} envelopes left for bob");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_speaks_binary_frames_to_a_server_that_offers_them() {
    let server = Server::start_with(&["--rate-limit", "0"]);
    pushed_message_arrives(&server, &server.url, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_falls_back_to_json_frames_when_the_server_offers_none() {
    let server = Server::start_with(&["--rate-limit", "0"]);
    let upstream: SocketAddr = server.url.trim_start_matches("http://").parse().expect("server address");
    let proxy = stripping_proxy(upstream).await;
    pushed_message_arrives(&server, &format!("http://{proxy}"), false).await;
}

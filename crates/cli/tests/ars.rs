//! The Ars test and data retention: the server cannot read, fetch or keep
//! what people send.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_link_sent_in_a_chat_is_fetched_by_nobody_and_stored_nowhere_in_plaintext() {
    let server = Server::start();
    let canary = Canary::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");

    // Watch the server's sockets for the whole exchange: it may hold its
    // listener and the connections it accepted, nothing else.
    #[cfg(target_os = "linux")]
    let watch = SocketWatch::start(&server);

    let text = format!("the unique secret plan is at {}", canary.url);
    alice.send("bob", &text);

    // While queued: the server holds ciphertext only.
    assert!(server.count("messages") > 0);
    let check_server = |when: &str| {
        for needle in [canary.url.as_bytes(), b"unique secret plan".as_slice()] {
            let found = files_containing(&server.data_dir(), needle);
            assert!(found.is_empty(), "{when}: plaintext in server files {found:?}");
            assert!(
                !server.log().as_bytes().windows(needle.len()).any(|w| w == needle),
                "{when}: plaintext in server log"
            );
        }
    };
    check_server("queued");

    let got = bob.receive_json(&[]);
    assert_eq!(texts(&got), [text.as_str()]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(canary.hits(), 0, "somebody fetched the link");
    #[cfg(target_os = "linux")]
    {
        let (foreign, samples) = watch.finish();
        assert!(samples > 10, "the socket watch ran ({samples} samples)");
        assert!(foreign.is_empty(), "the server opened sockets of its own: {foreign:?}");
        // The watch does see outbound connections: bob's following client has one.
        let mut follow = bob.cmd(&["receive", "--follow"]).stdout(std::process::Stdio::null()).spawn().expect("spawn");
        let port: u16 = server.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
        let seen = wait_until(Duration::from_secs(10), || !foreign_sockets(follow.id(), port).is_empty());
        let _ = follow.kill();
        let _ = follow.wait();
        assert!(seen, "the socket watch cannot see a client's outbound connection");
    }
    check_server("delivered");
    assert!(!server.log().is_empty(), "the server log was captured");

    // Neither client keeps plaintext on disk: their stores are encrypted.
    for user in [&alice, &bob] {
        for needle in [canary.url.as_bytes(), b"unique secret plan".as_slice()] {
            let found = files_containing(&user.home(), needle);
            assert!(found.is_empty(), "{}'s home has plaintext in {found:?}", user.name);
        }
    }
    // …yet both can read their history.
    assert_eq!(texts(&alice.history_json("bob")), [text.as_str()]);
    assert_eq!(texts(&bob.history_json("alice")), [text.as_str()]);
}

#[test]
fn the_server_keeps_nothing_of_a_message_after_delivery() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "ephemeral on the server");
    assert!(server.count("inbox") >= 1);
    assert_eq!(texts(&bob.receive_json(&[])), ["ephemeral on the server"]);
    // bob's delivery receipt waits for alice's devices until they fetch it.
    assert!(alice.receive_json(&[]).is_empty());
    assert_eq!(server.count("inbox"), 0);
    assert_eq!(server.count("messages"), 0);
}

#[test]
fn undelivered_messages_expire() {
    let server = Server::start_with(&["--message-ttl", "2s"]);
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "nobody will read this in time");
    assert!(server.count("messages") > 0);
    assert!(
        wait_until(Duration::from_secs(15), || server.count("messages") == 0 && server.count("inbox") == 0),
        "not expired"
    );
    assert!(bob.receive_json(&[]).is_empty());
}

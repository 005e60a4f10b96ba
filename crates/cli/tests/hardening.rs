//! The running client cannot leave a core dump (which would hold the store
//! key and decrypted messages): its core-size limit is 0 from the start.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{wait_until, Server, User};

#[cfg(target_os = "linux")]
#[test]
fn a_running_client_has_core_dumps_off() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let mut follow = alice
        .cmd(&["receive", "--follow"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("follow starts");
    let limits = format!("/proc/{}/limits", follow.id());
    let mut line = String::new();
    let found = wait_until(Duration::from_secs(10), || {
        line = std::fs::read_to_string(&limits)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap_or_default()
            .to_string();
        line.split_whitespace().skip(4).take(2).all(|v| v == "0") && !line.is_empty()
    });
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(found, "core dumps still allowed: {line:?}");
}

/// A sender past its server quota of undelivered messages is told so in
/// one line and the send is refused (exit 1, nothing queued); once the
/// recipient fetched what waited, it sends again.
#[test]
fn a_send_over_the_server_quota_is_refused_in_one_line_until_the_recipient_fetches() {
    let server = Server::start_with(&["--quota-per-device", "12KiB"]);
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    // Text that does not compress, padded to over 8 KiB on the wire: the
    // second such message at the latest passes 12 KiB.
    let long: String =
        (0..5000u32).map(|i| char::from(b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8 % 26)).collect();
    let mut sent = 0;
    let refused = loop {
        let out = alice.run(&["send", "bob", &long]);
        if !out.status.success() {
            break out;
        }
        sent += 1;
        assert!(sent < 2, "two 8 KiB messages fitted in a 12 KiB quota");
    };
    common::assert_clean_error(&refused, "quota_exceeded");
    assert_eq!(common::exit_code(&refused), 1, "refused, not queued: {}", common::stderr(&refused));
    assert!(common::stderr(&refused).contains("12 KiB"), "{}", common::stderr(&refused));
    let got = common::texts(&bob.receive_json(&[]));
    assert_eq!(got.len(), 1 + sent, "the refused message never reached bob: {got:?}");
    alice.ok(&["send", "bob", &long]);
    assert_eq!(common::texts(&bob.receive_json(&[])), [long]);
}

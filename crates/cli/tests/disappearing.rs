//! Disappearing messages end to end: the built binaries, a real server
//! process, users in temporary directories. The timer is a setting of the
//! conversation every member agrees on (an MLS group-context extension),
//! every member sees who set it, and a message sent while it is on goes
//! from every member's store (rows and attachment files) and from the
//! server (ciphertext and blobs, delivered or not) once its time is up.

mod common;

use std::time::Duration;

use common::*;

/// Seconds of the timer the tests set: long enough for a send and a
/// receive to finish inside it on a busy machine.
const TIMER: u64 = 8;

fn events(msgs: &[serde_json::Value]) -> Vec<serde_json::Value> {
    msgs.iter().filter(|m| m["system"] == true).map(|m| m["event"].clone()).collect()
}

fn texts_of(msgs: &[serde_json::Value]) -> Vec<String> {
    msgs.iter().filter(|m| m["system"] == false).map(|m| m["text"].as_str().unwrap_or_default().to_string()).collect()
}

fn files_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Rows of the server's `messages` that carry an expiry.
fn timed_rows(server: &Server) -> i64 {
    server.count("messages WHERE expires_at IS NOT NULL")
}

#[test]
fn disappearing_messages_leave_every_store_and_the_server() {
    let server = Server::start_with(&["--sweep-interval", "1s"]);
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "before the timer");
    assert_eq!(texts_of(&bob.receive_json(&[])), ["before the timer"]);

    // Alice turns it on; both see who set it to what, as a typed line.
    let out = alice.ok(&["disappearing", "bob", &format!("{TIMER}s")]);
    assert!(out.contains(&format!("disappearing messages: {TIMER}s")), "{out}");
    let got = bob.receive_json(&[]);
    let set = serde_json::json!({"event": "disappearing", "by": "alice", "seconds": TIMER});
    assert_eq!(events(&got), std::slice::from_ref(&set), "{got:?}");
    assert!(got.iter().any(|m| m["text"] == format!("alice set disappearing messages to {TIMER}s")));
    assert!(alice
        .history_json("bob")
        .iter()
        .any(|m| m["event"] == set && m["text"] == format!("you set disappearing messages to {TIMER}s")));

    // A text and a file while it is on: both sides keep them until the timer.
    let token = rand_token();
    let secret = format!("gone soon {token}");
    let file = alice.dir.path().join("plans.txt");
    std::fs::write(&file, format!("the plans {token}").repeat(200)).expect("write file");
    alice.send("bob", &secret);
    alice.ok(&["send", "bob", "with a file", "--attach", file.to_str().expect("utf-8 path")]);
    let got = bob.receive_json(&[]);
    assert_eq!(texts_of(&got), [secret.as_str(), "with a file"], "{got:?}");
    for m in got.iter().filter(|m| m["system"] == false) {
        let expires = m["expires_at"].as_u64().expect("a timed message carries its expiry");
        let sent = m["sent_at"].as_u64().expect("sent_at");
        assert!(expires > sent && expires <= sent + TIMER * 1000, "{m:?}");
    }
    let bob_files = bob.home().join("attachments");
    assert_eq!(files_in(&bob_files), 1, "bob keeps the sealed file until the timer");
    assert!(texts_of(&alice.history_json("bob")).contains(&secret));
    // One more, with a file, that bob does not fetch before its time is up.
    alice.ok(&["send", "bob", "never fetched", "--attach", file.to_str().expect("utf-8 path")]);
    assert!(timed_rows(&server) >= 1, "the server keeps the undelivered one until its expiry");
    assert_eq!(server.count("blobs"), 1, "the undelivered file waits on the server until its expiry");

    // After the timer and a sweep: nothing of them anywhere.
    std::thread::sleep(Duration::from_secs(TIMER + 1));
    assert!(
        wait_until(Duration::from_secs(10), || timed_rows(&server) == 0 && server.count("blobs") == 0),
        "the server kept expired ciphertext or blobs"
    );
    for u in [&alice, &bob] {
        let history = u.history_json(if u.name == "alice" { "bob" } else { "alice" });
        let left = texts_of(&history);
        assert_eq!(left, ["before the timer"], "{} still holds {left:?}", u.name);
        assert!(history.iter().all(|m| m["expires_at"].is_null()));
    }
    assert_eq!(files_in(&bob_files), 0, "bob's sealed file outlived its message");
    let late = bob.receive_json(&[]);
    assert!(!texts_of(&late).iter().any(|t| t.contains("never fetched")), "{late:?}");

    // Off: both see it, and what is sent then stays.
    alice.ok(&["disappearing", "bob", "off"]);
    alice.send("bob", "after the timer");
    let got = bob.receive_json(&[]);
    let off = serde_json::json!({"event": "disappearing", "by": "alice", "seconds": null});
    assert!(events(&got).contains(&off), "{got:?}");
    assert_eq!(texts_of(&got), ["after the timer"]);
    assert!(got.iter().all(|m| m["expires_at"].is_null()));
}

/// Either member may set it (bob, who did not start the conversation), a
/// group's members all see it, and bad input is one clear line.
#[test]
fn any_member_sets_it_and_bad_input_is_refused() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "club", "bob", "carol"]);
    bob.receive_json(&[]);
    carol.receive_json(&[]);
    bob.ok(&["disappearing", "club", "1h"]);
    let set = serde_json::json!({"event": "disappearing", "by": "bob", "seconds": 3600});
    for u in [&alice, &carol] {
        let got = u.receive_json(&[]);
        assert!(events(&got).contains(&set), "{} saw {got:?}", u.name);
    }
    // Setting it again changes nothing and commits nothing.
    assert!(bob.ok(&["disappearing", "club", "60m"]).contains("(unchanged)"));

    for bad in ["5 parsecs", "0s", "5w", "h", "99999999999s"] {
        let out = bob.run(&["disappearing", "club", bad]);
        assert_clean_error(&out, "not a duration");
    }
    let out = bob.run(&["disappearing", "nobody", "1h"]);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
}

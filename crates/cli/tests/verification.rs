//! Safety numbers and verification, end to end.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::*;

#[test]
fn safety_numbers_match_on_both_sides_stay_stable_across_a_link_and_verify_marks_the_contact() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hi");
    bob.receive_json(&[]);

    let a = alice.ok(&["safety-number", "bob"]);
    let b = bob.ok(&["safety-number", "alice"]);
    assert_eq!(a, b);
    let groups: Vec<&str> = a.trim().split(' ').collect();
    assert_eq!(groups.len(), 12);
    assert!(groups.iter().all(|g| g.len() == 5 && g.chars().all(|c| c.is_ascii_digit())));

    // A second device of bob's: same account identity key, same number.
    let bob2 = User { name: "bob2".into(), dir: tempfile::tempdir().expect("tempdir") };
    let mut link = bob2
        .cmd(&["link", "bob", "--server", &server.url, "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(link.stdout.take().expect("stdout")).read_line(&mut line).expect("code");
    let code = line.trim().trim_start_matches("code: ").to_string();
    bob.ok(&["link", "--accept", &code]);
    assert!(link.wait().expect("link ends").success());
    bob2.receive_json(&[]);
    assert_eq!(bob2.ok(&["safety-number", "alice"]), a);
    alice.receive_json(&[]);
    assert_eq!(alice.ok(&["safety-number", "bob"]), a);

    // Verification needs a confirmation; without a terminal, --yes.
    assert_clean_error(&alice.run(&["verify", "bob"]), "confirm with --yes");
    assert!(alice.ok(&["contacts"]).contains("bob\tunverified"));
    assert!(alice.ok(&["history", "bob"]).starts_with("-- conversation with bob (not verified"));
    assert!(alice.ok(&["verify", "bob", "--yes"]).contains("bob is verified"));
    assert!(alice.ok(&["contacts"]).contains("bob\tverified"));
    assert!(alice.ok(&["history", "bob"]).starts_with("-- conversation with bob (verified)"));

    assert_clean_error(&alice.run(&["safety-number", "nobody"]), "unknown handle nobody");
    assert_clean_error(&alice.run(&["safety-number", "alice"]), "someone else");
    assert_clean_error(&alice.run(&["verify", "carol", "--yes"]), "unknown handle carol");
}

/// The operator replaces an account's identity key and devices with its own,
/// straight in its database (a key change as a client sees it).
fn swap_keys(server: &Server, handle: &str) {
    server.db().execute("UPDATE devices SET active = 0 WHERE handle = ?1", [handle]).expect("hide devices");
    let fake = plant_device(server, handle, 3);
    server
        .db()
        .execute(
            "UPDATE accounts SET identity_key = ?2 WHERE handle = ?1",
            rusqlite::params![handle, fake.identity_public()],
        )
        .expect("swap key");
}

#[test]
fn a_changed_identity_key_warns_and_blocks_sending_to_a_verified_contact() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    for u in [&bob, &carol] {
        alice.send(&u.name, "hello");
        u.receive_json(&[]);
    }
    alice.ok(&["verify", "bob", "--yes"]);
    let before = alice.ok(&["safety-number", "bob"]);

    swap_keys(&server, "bob");
    swap_keys(&server, "carol");

    // Verified bob: the change is noticed, pinned unverified, warned about,
    // and nothing is sent until alice verifies again or accepts it.
    assert_clean_error(&alice.run(&["group", "create", "club", "bob"]), "identity key changed since you verified it");
    assert!(alice.ok(&["contacts"]).contains("bob\tunverified"));
    let warning = "warning: bob's identity key changed; compare safety numbers again (subrosa verify bob)";
    assert!(alice.history_json("bob").iter().any(|m| m["system"] == true && m["text"] == warning));
    assert_ne!(alice.ok(&["safety-number", "bob"]), before);
    assert_clean_error(&alice.run(&["send", "bob", "still there?"]), "--accept-key-change");
    // Accepting the change sends it: the old conversation's devices are gone
    // from the server, so a new conversation with bob's current devices
    // carries the message, which history shows once.
    alice.ok(&["send", "bob", "still there?", "--accept-key-change"]);
    let h = alice.history_json("bob");
    assert_eq!(h.iter().filter(|m| m["text"] == "still there?").count(), 1);
    let convs: std::collections::HashSet<_> = h.iter().map(|m| m["conversation"].clone()).collect();
    assert_eq!(convs.len(), 2, "the message went to a new conversation");
    alice.ok(&["send", "bob", "and on it goes"]);
    // A new conversation uses the new key without asking again.
    alice.ok(&["group", "create", "club", "bob"]);

    // Unverified carol: warned, and it goes ahead (trust on first use).
    alice.ok(&["group", "create", "club2", "carol"]);
    assert!(alice
        .history_json("carol")
        .iter()
        .any(|m| m["text"]
            == "warning: carol's identity key changed; compare safety numbers again (subrosa verify carol)"));

    // Verifying the new number clears it for good.
    alice.ok(&["verify", "bob", "--yes"]);
    assert!(alice.ok(&["contacts"]).contains("bob\tverified"));
}

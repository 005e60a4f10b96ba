//! Post-compromise security end to end: a copy of a device's state (a stolen
//! disk image or backup, passphrase included) reads along only until the
//! device replaces its keys.

mod common;

use common::*;

/// The attacker's copy of `user`'s home directory, as another `User` that
/// runs the same device.
fn copy_of(user: &User) -> User {
    let thief = User { name: format!("copy of {}", user.name), dir: tempfile::tempdir().expect("tempdir") };
    copy_dir(&user.home(), &thief.home());
    thief
}

/// What the copy can read of what is queued for the device, without taking
/// it from the real device (the operator, or a network observer, hands the
/// attacker the same ciphertext).
fn copy_reads(thief: &User) -> Vec<String> {
    let out = thief.run(&["receive", "--json", "--no-ack"]);
    texts(&parse_json_lines(&String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn a_copy_of_bobs_state_reads_nothing_after_bob_replaces_his_keys() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    assert_eq!(texts(&bob.receive_json(&[])), ["hello"]);

    let thief = copy_of(&bob);

    // Before bob replaces his keys the copy reads what alice sends.
    alice.send("bob", "before the update");
    assert_eq!(copy_reads(&thief), ["before the update"]);
    assert_eq!(texts(&bob.receive_json(&[])), ["before the update"]);

    let devices_before = bob.ok(&["devices"]);
    let out = bob.ok(&["devices", "rekey"]);
    assert!(out.contains("replaced this device's keys in 1 conversation(s)"), "{out}");
    // A new signature key, published in the directory: `devices` shows
    // another fingerprint for this device, still certified.
    let devices_after = bob.ok(&["devices"]);
    assert_ne!(devices_before, devices_after);
    assert!(!devices_after.contains("NOT CERTIFIED"), "{devices_after}");
    // The copy still holds the old signature key: the server refuses it.
    let refused = thief.run(&["receive", "--json", "--no-ack"]);
    assert!(!refused.status.success(), "the copy still talks to the server");
    alice.receive_json(&[]);
    alice.send("bob", "after the update");
    let seen = copy_reads(&thief);
    assert!(!seen.iter().any(|t| t.contains("after the update")), "the copy still reads: {seen:?}");
    assert_eq!(texts(&bob.receive_json(&[])), ["after the update"]);

    // A conversation started after the update: the copy's key-package
    // secrets are for packages the server no longer hands out.
    alice.ok(&["group", "create", "later", "bob"]);
    alice.send("later", "secret plans");
    let seen = copy_reads(&thief);
    assert!(!seen.iter().any(|t| t.contains("secret plans")), "the copy joined: {seen:?}");
    assert!(texts(&bob.receive_json(&[])).contains(&"secret plans".to_string()));

    // And alice's side goes on normally, both ways: bob's new keys match
    // the directory, so nothing is flagged and no alert is raised.
    bob.send("alice", "all good");
    assert!(texts(&alice.receive_json(&[])).contains(&"all good".to_string()));
    let alerts = alice.ok(&["alerts"]);
    assert!(!alerts.contains("bob"), "{alerts}");
    alice.send("bob", "still fine");
    assert!(texts(&bob.receive_json(&[])).contains(&"still fine".to_string()));
}

/// A device that sends a lot replaces its keys on its own: after 100
/// messages in a conversation its next command commits an update.
#[test]
fn after_100_messages_the_sender_replaces_its_keys_by_itself() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    assert_eq!(texts(&bob.receive_json(&[])), ["hello"]);
    let thief = copy_of(&bob);

    // bob sends 100 messages (his delivery receipt for "hello" was the
    // first: receipts use the conversation's keys too, and a member that
    // never gets one must not fall more than mls-rs's 1024 generations
    // behind); the 101st command (a receive) rotates.
    for i in 0..99 {
        bob.send("alice", &format!("message {i}"));
    }
    alice.send("bob", "still readable by the copy");
    assert_eq!(copy_reads(&thief), ["still readable by the copy"]);
    bob.receive_json(&[]);
    assert_eq!(alice.receive_json(&[]).len(), 99);
    alice.send("bob", "after bob's own update");
    let seen = copy_reads(&thief);
    assert!(!seen.iter().any(|t| t.contains("after bob's own update")), "the copy still reads: {seen:?}");
    assert_eq!(texts(&bob.receive_json(&[])), ["after bob's own update"]);
}

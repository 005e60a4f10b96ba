//! Several devices per account, end to end: linking, sent-message sync,
//! membership visible to peers, removal, and a device the server invents.

mod common;

use std::time::Duration;

use common::*;

fn member_devices(u: &User, target: &str, handle: &str) -> usize {
    u.ok(&["members", target]).lines().filter(|l| l.starts_with(&format!("{handle}\t"))).count()
}

#[test]
fn a_linked_device_gets_every_conversation_and_its_account_s_sent_messages() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.send("bob", "before the second device");
    bob.receive_json(&[]);
    carol.ok(&["group", "create", "trio", "alice", "bob"]);

    let bob2 = User { name: "bob2".into(), dir: tempfile::tempdir().expect("tempdir") };
    let (link, code) = start_link(&server, &bob2, "bob", &["--with-history"]);
    assert_eq!(code.len(), 31, "{code}");
    let accepted = bob.ok(&["link", "--accept", &code]);
    assert!(accepted.contains("added it to 2 conversations"), "{accepted}");
    let out = link.wait_with_output().expect("link ends");
    assert!(out.status.success(), "{}", stderr(&out));

    // The new device joins bob's conversations and got recent history.
    bob2.receive_json(&[]);
    assert_eq!(texts(&bob2.history_json("alice")), ["before the second device"]);
    assert_eq!(bob.ok(&["devices"]).lines().count(), 2);

    // Peers see the new device, listed in members, as a system line.
    let lines: Vec<String> = alice
        .receive_json(&[])
        .iter()
        .filter(|m| m["system"] == true)
        .map(|m| m["text"].as_str().unwrap_or_default().into())
        .collect();
    assert!(lines.contains(&"bob's new device joined".to_string()), "{lines:?}");
    assert_eq!(member_devices(&alice, "bob", "bob"), 2);
    assert_eq!(member_devices(&alice, "trio", "bob"), 2);
    carol.receive_json(&[]);
    assert_eq!(member_devices(&carol, "trio", "bob"), 2);

    // New messages reach both of bob's devices, in every conversation.
    alice.send("bob", "to every bob");
    carol.send("trio", "trio news");
    for b in [&bob, &bob2] {
        let got = b.receive_json(&[]);
        let t = texts(&got);
        assert!(t.contains(&"to every bob".to_string()) && t.contains(&"trio news".to_string()), "{}: {t:?}", b.name);
    }
    // What one of bob's devices sends shows on the other as bob's own.
    bob.send("alice", "sent from the first device");
    bob2.send("trio", "sent from the second device");
    let on_bob2 = bob2.receive_json(&[]);
    assert!(on_bob2
        .iter()
        .any(|m| m["text"] == "sent from the first device" && m["outgoing"] == true && m["from"] == "bob"));
    let on_bob = bob.receive_json(&[]);
    assert!(on_bob.iter().any(|m| m["text"] == "sent from the second device" && m["outgoing"] == true));
    assert_eq!(texts(&alice.receive_json(&[])).iter().filter(|t| t.starts_with("sent from")).count(), 2);

    // bob removes his second device: out of every conversation, no more mail.
    let bob2_id = bob
        .ok(&["devices"])
        .lines()
        .find(|l| !l.contains("this device"))
        .and_then(|l| l.split('\t').next().map(str::to_string))
        .expect("second device");
    assert!(bob.ok(&["devices", "remove", &bob2_id]).contains("from 2 conversations"));
    assert_eq!(bob.ok(&["devices"]).lines().count(), 1);
    alice.send("bob", "after the removal");
    assert_eq!(member_devices(&alice, "bob", "bob"), 1);
    assert_eq!(member_devices(&alice, "trio", "bob"), 1);
    let out = bob2.run(&["receive", "--json"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("after the removal"));
    assert!(texts(&bob.receive_json(&[])).contains(&"after the removal".to_string()));
}

#[test]
fn a_device_the_server_invents_is_refused() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");

    // The operator adds a "bob" device whose certificate is by its own
    // identity key, with a key package, straight into its database.
    let ghost = plant_device(&server, "bob", 1);
    // alice will not write to bob while the server offers a device bob's
    // identity key did not certify.
    let out = alice.run(&["send", "bob", "for bob only"]);
    assert_clean_error(&out, "refused keys for bob");
    assert!(bob.receive_json(&[]).is_empty());
    // bob sees the ghost among his devices, flagged.
    let devices = bob.ok(&["devices"]);
    assert!(
        devices.lines().any(|l| l.starts_with(&ghost.device_id().to_hex()) && l.contains("NOT CERTIFIED")),
        "{devices}"
    );
}

#[test]
fn bad_link_input_gets_clear_errors() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let newdev = User { name: "new".into(), dir: tempfile::tempdir().expect("tempdir") };

    assert_clean_error(&alice.run(&["link", "--accept", "not-a-code"]), "not a link code");
    assert_clean_error(
        &alice.run(&["link", "--accept", "00000-00000-00000-00000-00000-0"]),
        "unknown or expired link code",
    );
    assert_clean_error(&newdev.run(&["link", "nobody", "--server", &server.url]), "unknown handle nobody");
    assert_clean_error(&alice.run(&["link", "alice", "--server", &server.url]), "already holds an account");
    assert_clean_error(&alice.run(&["devices", "remove", "zz"]), "invalid device id");
    assert_clean_error(&alice.run(&["devices", "remove", "0011223344556677"]), "no device");
    let own = alice.ok(&["devices"]).split('\t').next().map(str::to_string).expect("own id");
    assert_clean_error(&alice.run(&["devices", "remove", &own]), "device you are using");

    // Nobody approves: the new device gives up with a clear error and leaves nothing behind.
    let out = newdev.cmd(&["link", "alice", "--server", &server.url, "--timeout", "2"]).output().expect("runs");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("no device approved"), "{err}");
    assert!(!newdev.home().join("subrosa.db").exists());

    // A code whose request the server altered is refused: take a real code,
    // then swap the slot's request bytes.
    let (link, code) = start_link(&server, &newdev, "alice", &[]);
    server.db().execute("UPDATE links SET request = X'0102030405'", []).expect("tamper with the slot");
    assert_clean_error(&alice.run(&["link", "--accept", &code]), "does not match the code");
    drop(link);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(alice.ok(&["devices"]).lines().count(), 1);
}

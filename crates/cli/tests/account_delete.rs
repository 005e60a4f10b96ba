//! Deleting an account end to end: the built binaries, a real server
//! process, users in temporary directories.

mod common;

use common::*;

/// Rows of the server's `table` that belong to alice's devices (`column`
/// names the device).
fn alices(server: &Server, table: &str, column: &str) -> i64 {
    server.count(&format!("{table} WHERE {column} IN (SELECT id FROM devices WHERE handle = 'alice')"))
}

#[test]
fn a_deleted_account_leaves_nothing_on_the_server() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.send("bob", "hi bob");
    bob.receive_json(&[]);
    bob.send("alice", "hi alice");
    alice.ok(&["group", "create", "club", "bob", "carol"]);
    bob.receive_json(&[]);
    carol.receive_json(&[]);
    // Waiting for alice when she goes: a message and a file from bob.
    bob.send("club", "for everyone");
    let file = bob.dir.path().join("notes.txt");
    std::fs::write(&file, "notes ".repeat(100)).expect("write file");
    bob.ok(&["send", "alice", "a file", "--attach", file.to_str().expect("utf-8 path")]);
    assert!(alices(&server, "key_packages", "device") > 0);
    assert!(alices(&server, "inbox", "device") > 0);

    // Not without a confirmation.
    assert_clean_error(&alice.run(&["account", "delete"]), "not deleted");
    assert!(alices(&server, "key_packages", "device") > 0, "an unconfirmed delete changed something");

    let out = alice.ok(&["account", "delete", "--yes"]);
    assert!(out.contains("deleted the account alice (left 2 conversation(s))"), "{out}");

    // Nothing of hers is left but the tombstone and what others still fetch.
    for (table, column) in [
        ("key_packages", "device"),
        ("last_resort_packages", "device"),
        ("inbox", "device"),
        ("send_ids", "device"),
        ("conversation_members", "device"),
        ("blob_readers", "device"),
        ("blobs", "owner"),
    ] {
        assert_eq!(alices(&server, table, column), 0, "{table} still holds alice's rows");
    }
    assert_eq!(server.count("devices WHERE handle = 'alice' AND (active = 1 OR length(signature_key) > 0)"), 0);
    assert_eq!(server.count("nonces WHERE handle = 'alice'"), 0);
    assert_eq!(server.count("accounts WHERE handle = 'alice' AND length(identity_key) > 0"), 0);
    assert_eq!(server.count("blobs"), 0, "the file for alice outlived her");

    // Her leave reaches the others, whose clients commit it; then what she
    // sent is fetched and gone too.
    for u in [&bob, &carol] {
        u.receive_json(&[]);
        u.receive_json(&[]);
    }
    for u in [&bob, &carol] {
        let members = u.ok(&["members", "club"]);
        assert!(!members.contains("alice"), "{} still lists alice: {members}", u.name);
    }
    assert_eq!(alices(&server, "messages", "sender"), 0, "what alice sent outlived its fetching");

    // The handle is gone for good, and nobody can write to it.
    let again = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(subrosa_bin())
        .arg("--home")
        .arg(again.path().join("home"))
        .args(["register", "alice", "--server", &server.url])
        .env("SUBROSA_PASSPHRASE", "another passphrase")
        .env("SUBROSA_KEY_CACHE", "off")
        .output()
        .expect("subrosa runs");
    assert_clean_error(&out, "taken");
    let out = carol.run(&["send", "@alice", "are you there?"]);
    assert!(!out.status.success(), "a message to a deleted account was taken");
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    // The directory still audits as append-only with the deletion in it.
    carol.ok(&["audit", "--server", &server.url]);
}

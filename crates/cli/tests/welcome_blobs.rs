//! Welcomes too large to go inline travel through the blob store, with a
//! small reference in the Welcome part (`subrosa_proto::welcome_ref`).
//! Hundreds of devices would make a test slow, so the adder's debug build
//! is told a lower inline limit (`SUBROSA_TEST_INLINE_WELCOME_BYTES`,
//! ignored by release builds).

mod common;

use common::*;
use subrosa_client::welcomes::INLINE_LIMIT_ENV;
use subrosa_proto::welcome_ref::{WelcomeRef, ENCODED_LEN, MAGIC};

/// Any real Welcome is larger: every Welcome goes by reference.
const LOW_LIMIT: &str = "256";

/// Runs `args` as `u` with the low inline limit, asserting success.
fn ok_by_reference(u: &User, args: &[&str]) {
    let out = u.cmd(args).env(INLINE_LIMIT_ENV, LOW_LIMIT).output().expect("subrosa runs");
    assert!(out.status.success(), "{} {args:?}: {}", u.name, stderr(&out));
}

/// The Welcome parts the server holds (undelivered): their ciphertexts.
fn stored_welcomes(server: &Server) -> Vec<Vec<u8>> {
    let db = server.db();
    let mut q = db.prepare("SELECT ciphertext FROM messages WHERE kind = 'welcome'").expect("query");
    q.query_map([], |r| r.get::<_, Vec<u8>>(0)).expect("rows").map(|r| r.expect("row")).collect()
}

/// The groups `u` lists, by name.
fn group_names(u: &User) -> Vec<String> {
    u.ok(&["groups"]).lines().filter_map(|l| l.split_whitespace().next().map(str::to_string)).collect()
}

/// Alice, bob and carol on `server`, alice's group "club" with carol; then
/// alice adds bob (his Welcome by reference) while the operator plays
/// `attack`, which must leave the commit pending. Returns alice and bob.
fn bob_added_while(server: &Server, attack: serde_json::Value) -> (User, User) {
    let alice = User::register(server, "alice");
    let bob = User::register(server, "bob");
    User::register(server, "carol");
    alice.ok(&["group", "create", "club", "carol"]);
    server.attack(attack);
    let out = alice.cmd(&["group", "add", "club", "bob"]).env(INLINE_LIMIT_ENV, LOW_LIMIT).output().expect("runs");
    assert_eq!(exit_code(&out), EXIT_PENDING, "{}", stderr(&out));
    (alice, bob)
}

/// The one Welcome reference the server holds (`why` there is one), after
/// checking that the blob it names is on the server, complete.
fn the_stored_reference(server: &Server, why: &str) -> WelcomeRef {
    let welcomes: Vec<Vec<u8>> = stored_welcomes(server).into_iter().filter(|w| w.starts_with(&MAGIC)).collect();
    assert_eq!(welcomes.len(), 1, "{why}");
    let r = WelcomeRef::decode(&welcomes[0]).expect("a reference");
    let complete: i64 = server
        .db()
        .query_row("SELECT complete FROM blobs WHERE blob = ?1", [&r.blob.0[..]], |row| row.get(0))
        .expect("the referenced blob is there");
    assert_eq!(complete, 1);
    r
}

#[test]
fn a_member_added_by_a_welcome_that_went_by_reference_joins_and_reads() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "friends", "carol"]);
    carol.receive_json(&[]);
    assert_eq!(server.count("blobs"), 0, "an inline Welcome uses no blob");

    ok_by_reference(&alice, &["group", "add", "friends", "bob"]);
    // The server holds a small reference for bob, and the Welcome as a
    // complete blob only bob may fetch.
    let welcomes = stored_welcomes(&server);
    assert_eq!(welcomes.len(), 1, "one Welcome waits for bob");
    assert_eq!(welcomes[0].len(), ENCODED_LEN, "the Welcome part holds a reference");
    assert!(welcomes[0].starts_with(&MAGIC));
    let r = WelcomeRef::decode(&welcomes[0]).expect("a valid reference");
    let (size, complete, readers): (i64, i64, i64) = server
        .db()
        .query_row(
            "SELECT size, complete, (SELECT count(*) FROM blob_readers r WHERE r.blob = b.id) FROM blobs b WHERE blob = ?1",
            [&r.blob.0[..]],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .expect("the referenced blob is on the server");
    assert_eq!((size as u64, complete, readers), (r.size, 1, 1));
    assert!(r.size > 256);

    // Bob joins it like any Welcome and reads the group.
    let got = bob.receive_json(&[]);
    assert!(group_names(&bob).contains(&"friends".to_string()), "bob joined: {got:?}");
    let mut m: Vec<String> = bob
        .ok(&["members", "friends"])
        .lines()
        .filter(|l| !l.starts_with("ciphersuite"))
        .map(|l| l.split('\t').next().unwrap_or_default().to_string())
        .collect();
    m.sort();
    assert_eq!(m, ["alice", "bob", "carol"]);
    alice.send("friends", "welcome aboard");
    assert!(texts(&bob.receive_json(&[])).contains(&"welcome aboard".to_string()));
    bob.send("friends", "glad to be here");
    assert!(texts(&carol.receive_json(&[])).contains(&"glad to be here".to_string()));
    // Bob said he fetched it: the blob is gone, and nothing waits.
    assert_eq!(server.count("blobs"), 0, "the Welcome blob was released");
    assert!(stored_welcomes(&server).is_empty());
}

#[test]
fn a_welcome_blob_that_does_not_match_its_reference_is_refused_and_nothing_is_joined() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    ok_by_reference(&alice, &["group", "create", "secret", "bob"]);
    assert_eq!(server.count("blobs"), 1);
    // The operator swaps the blob's bytes for others of the same length.
    let n = server.db().execute("UPDATE blob_pieces SET data = randomblob(length(data))", []).expect("tamper");
    assert!(n >= 1);

    let out = bob.run(&["receive"]);
    assert!(out.status.success(), "receive: {}", stderr(&out));
    let shown = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(shown.contains("does not match its reference"), "the refusal is shown: {shown}");
    assert!(group_names(&bob).is_empty(), "bob joined nothing");
    // Refused for good: acknowledged, not fetched again.
    assert!(stored_welcomes(&server).is_empty());
    let again = bob.run(&["receive"]);
    assert!(again.status.success());
    assert!(group_names(&bob).is_empty());
}

/// A blocked account's Welcome by reference is dropped as an inline one
/// is: nothing downloaded (here a download would fail and stop the
/// receive), nothing joined, no alert, and nothing left on the server.
#[test]
fn a_blocked_senders_welcome_by_reference_is_dropped_without_a_download() {
    let server = Server::start_malicious();
    let mallory = User::register(&server, "mallory");
    let bob = User::register(&server, "bob");
    bob.ok(&["block", "mallory"]);
    ok_by_reference(&mallory, &["group", "create", "club", "bob"]);
    assert_eq!(stored_welcomes(&server).len(), 1);

    server.attack(serde_json::json!({"fail_blob_downloads": {"handle": "bob"}}));
    let out = bob.run(&["receive"]);
    assert!(out.status.success(), "nothing was downloaded: {}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "no alert: {}", stderr(&out));
    assert!(group_names(&bob).is_empty());
    assert!(stored_welcomes(&server).is_empty(), "acknowledged");
}

#[test]
fn a_welcome_whose_blob_cannot_be_downloaded_stays_queued_until_it_can() {
    let server = Server::start_malicious();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    ok_by_reference(&alice, &["group", "create", "club", "bob"]);

    server.attack(serde_json::json!({"fail_blob_downloads": {"handle": "bob"}}));
    let out = bob.run(&["receive"]);
    assert!(!out.status.success(), "a failed download is an error: {}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr(&out).contains("unavailable"), "{}", stderr(&out));
    assert!(group_names(&bob).is_empty());
    // Nothing lost: the Welcome and its blob wait on the server.
    assert_eq!(stored_welcomes(&server).len(), 1);
    assert_eq!(server.count("blobs"), 1);

    server.attack(serde_json::json!({}));
    bob.receive_json(&[]);
    assert_eq!(group_names(&bob), ["club"]);
    alice.send("club", "you made it");
    assert_eq!(texts(&bob.receive_json(&[])), ["you made it"]);
    assert!(stored_welcomes(&server).is_empty());
}

#[test]
fn a_commit_re_posted_after_a_lost_answer_never_names_a_blob_not_uploaded() {
    let server = Server::start_malicious();
    // The server stores and delivers the commit, but its answer is lost:
    // the commit stays pending, its Welcome whole in alice's store.
    let (alice, bob) = bob_added_while(&server, serde_json::json!({"lose_commit_answers": {"sender": "alice"}}));
    server.attack(serde_json::json!({}));
    // The next command posts it again: the form by reference, stored
    // beside the whole request once its blob was whole, is still within
    // its reuse window, so nothing is uploaded again, and the server
    // answers the send id as a duplicate.
    ok_by_reference(&alice, &["receive"]);
    assert_eq!(server.count("blobs"), 1, "the re-post sent the same reference, uploading nothing");
    // (Carol's inline Welcome waits too.)
    the_stored_reference(&server, "the re-post was a duplicate");

    bob.receive_json(&[]);
    assert_eq!(group_names(&bob), ["club"]);
    alice.send("club", "hello bob");
    assert_eq!(texts(&bob.receive_json(&[])), ["hello bob"]);
}

/// The first post of a commit never reached the server (answered
/// "unavailable" before anything was stored), and the next comes after its
/// Welcome's blob went: the re-post uploads the Welcome again from the
/// whole one kept in the store, so the new member finds a blob that lasts
/// as long as the commit waits for it. Naming the first blob again (as a
/// re-post within minutes does) would have left bob a Welcome he could
/// never fetch.
#[test]
fn a_commit_re_posted_after_its_welcome_blob_went_uploads_the_welcome_again() {
    // Messages and blobs are kept 10 s here (room for slow debug commands
    // on a busy machine between the re-post and bob's receive), so the
    // window in which a re-post names the same blob is 1 s (a tenth), and
    // the first blob goes within seconds.
    let server = Server::start_malicious_with(&["--message-ttl", "10s", "--sweep-interval", "1s"]);
    let (alice, bob) = bob_added_while(&server, serde_json::json!({"refuse_commits": {"sender": "alice"}}));
    assert_eq!(server.count("blobs"), 1, "the Welcome was uploaded before the post");
    assert!(stored_welcomes(&server).iter().all(|w| !w.starts_with(&MAGIC)), "nothing of the commit was stored");
    let first: Vec<u8> = server.db().query_row("SELECT blob FROM blobs", [], |r| r.get(0)).expect("the first blob");
    assert!(
        wait_until(std::time::Duration::from_secs(30), || server.count("blobs") == 0),
        "the first blob went at its TTL"
    );

    server.attack(serde_json::json!({}));
    ok_by_reference(&alice, &["receive"]);
    let r = the_stored_reference(&server, "the re-post was stored");
    assert_ne!(r.blob.0.to_vec(), first, "a new blob, not the one that went");

    let got = bob.receive_json(&[]);
    assert_eq!(group_names(&bob), ["club"], "bob joined: {got:?}");
    alice.send("club", "hello bob");
    assert_eq!(texts(&bob.receive_json(&[])), ["hello bob"]);
}

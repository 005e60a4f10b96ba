//! The operator turns malicious: `subrosa-attack-server` (a test-only build
//! that a production configuration cannot reach) plays it. In each test the
//! clients detect the attack and the attacker receives nothing.

mod common;

use common::*;
use serde_json::json;

/// Rows the server queued for a device it made up.
fn queued_for(server: &Server, device: &subrosa_core::DeviceIdentity) -> i64 {
    server
        .db()
        .query_row(
            "SELECT COUNT(*) FROM inbox JOIN devices ON devices.id = inbox.device WHERE devices.device_id = ?1",
            [device.device_id().to_hex()],
            |r| r.get(0),
        )
        .unwrap_or(0)
}

#[test]
fn a_key_package_substituted_for_bobs_is_refused() {
    let server = Server::start_malicious();
    let alice = User::register(&server, "alice");
    let _bob = User::register(&server, "bob");

    // The operator hands out a key package of its own, for a device of its
    // own, when alice asks for bob's.
    let (fake, engine) = fake_device("bob");
    server.attack(json!({
        "substitute_key_packages": {
            "handle": "bob",
            "with": [b64(&engine.generate_key_package().expect("kp"))],
            "device": device_record(&fake),
        }
    }));
    let out = alice.run(&["send", "bob", "for bob only"]);
    assert_clean_error(&out, "refused keys for bob");
    assert_eq!(server.count("messages"), 0, "nothing was sent to anyone");
    assert_eq!(queued_for(&server, &fake), 0);

    // Honest again: the conversation starts.
    server.attack(json!({}));
    alice.ok(&["send", "bob", "for bob only"]);
}

#[test]
fn a_ghost_device_in_alices_directory_entry_is_caught_by_alice_and_refused_by_bob() {
    let server = Server::start_malicious();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");

    // The operator adds a device of its own to alice's entry and publishes
    // it: the directory proofs are valid, but the device carries no
    // certificate by alice's identity key.
    let (ghost, _) = fake_device("alice");
    server.attack(json!({ "ghost_device": { "handle": "alice", "device": device_record(&ghost) } }));

    // alice's own monitoring notices at her next sync.
    let out = alice.run(&["receive"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("warning: the key directory lists a device {} for alice", ghost.device_id().to_hex())),
        "{err}"
    );
    // bob refuses to start a conversation with an entry holding a ghost.
    assert_clean_error(&bob.run(&["send", "alice", "hello"]), "not certified by their identity key");
    assert_eq!(queued_for(&server, &ghost), 0);
    assert_eq!(server.count("messages"), 0);
}

#[test]
fn a_forked_directory_is_caught_when_alice_and_bob_talk_and_alice_stops_sending() {
    let server = Server::start_malicious();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hi bob");
    assert_eq!(texts(&bob.receive_json(&[])), ["hi bob"]);
    bob.send("alice", "hi alice");
    assert_eq!(texts(&alice.receive_json(&[])), ["hi alice"]);

    // From the next epoch on, alice is shown a directory in which bob's
    // keys are the operator's; everyone else sees the real one.
    let (fake, engine) = fake_device("bob");
    server.attack(json!({
        "fork": {
            "victim": "alice",
            "handle": "bob",
            "identity_key": b64(fake.identity_public()),
            "devices": [device_record(&fake)],
            "key_packages": [b64(&engine.generate_key_package().expect("kp"))],
        }
    }));
    // alice's next request shows her the fork (an epoch of its own); it is
    // consistent in itself, so nothing is noticed yet.
    let out = alice.run(&["receive"]);
    assert!(out.status.success() && !stderr(&out).contains("warning"), "{}", stderr(&out));
    // A real change (carol registers) now gets the same epoch number in
    // both views, with different roots.
    let _carol = User::register(&server, "carol");

    // bob's next message carries the head the server signed for him; alice
    // holds the head the server signed for her at the same epoch: two
    // signed heads, one epoch, two roots. That is proof, not suspicion.
    bob.send("alice", "still me");
    let out = alice.run(&["receive", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(texts(&parse_json_lines(&String::from_utf8_lossy(&out.stdout))), ["still me"]);
    assert!(
        stderr(&out).contains("warning: the server signed two different key-directory heads for epoch"),
        "{}",
        stderr(&out)
    );

    // From now on alice sends nothing, to bob or anyone.
    assert_clean_error(&alice.run(&["send", "bob", "secret"]), "key directory fork");
    assert_clean_error(&alice.run(&["send", "carol", "secret"]), "key directory fork");
    assert_eq!(queued_for(&server, &fake), 0);
    assert!(!alice.history_json("bob").iter().any(|m| m["text"] == "secret"));

    // The alert names the server, and its proof is two heads the server's
    // own key signed for one epoch with different roots.
    let listed = alice.ok(&["alerts"]);
    assert!(listed.contains("FORK (sending blocked)") && listed.contains("the server"), "{listed}");
    let file = alice.dir.path().join("fork.json");
    alice.ok(&["alerts", "export", file.to_str().expect("utf-8 path")]);
    let proof: subrosa_client::kt::ForkProof =
        serde_json::from_slice(&std::fs::read(&file).expect("proof written")).expect("proof JSON");
    subrosa_client::kt::verify_fork_proof(&proof)
        .expect("both heads are validly signed, for one epoch, with different roots");
    let heads: Vec<subrosa_proto::kt::SignedHead> = proof
        .heads
        .iter()
        .map(|h| subrosa_proto::kt::SignedHead::decode(&hex::decode(h).expect("hex")).expect("a signed head"))
        .collect();
    assert_eq!(heads[0].epoch, heads[1].epoch);
    assert_ne!(heads[0].root, heads[1].root);
    // Signed by the key the server publishes (and bob pinned at registration).
    let head = server_head(&server);
    assert_eq!(head.signing_key.map(|k| k.into_inner()), Some(hex::decode(&proof.signing_key).expect("hex")));
    let forged = {
        let mut p = proof.clone();
        p.heads[1] = p.heads[0].clone();
        p
    };
    assert!(subrosa_client::kt::verify_fork_proof(&forged).is_err(), "two equal heads prove nothing");

    // Clearing a proven fork needs an explicit confirmation.
    assert_clean_error(&alice.run(&["alerts", "clear"]), "sending stays blocked");
    assert_clean_error(&alice.run(&["send", "carol", "secret"]), "key directory fork");
    alice.ok(&["alerts", "clear", "--yes"]);
    assert_eq!(alice.ok(&["alerts"]).trim(), "no alerts");
    // bob was never blocked.
    bob.send("alice", "bob can always send");
}

#[test]
fn a_server_that_will_not_confirm_a_head_it_signed_is_named_and_nothing_is_blocked() {
    let server = Server::start_malicious();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hi bob");
    assert_eq!(texts(&bob.receive_json(&[])), ["hi bob"]);

    // alice is shown the directory as it is now, and never anything newer.
    server.attack(json!({ "freeze": { "victim": "alice" } }));
    let out = alice.run(&["receive"]);
    assert!(out.status.success() && !stderr(&out).contains("warning"), "{}", stderr(&out));
    let _carol = User::register(&server, "carol");

    // bob's message carries the newer head the server signed for him;
    // asked for that epoch, the server tells alice it does not exist.
    bob.send("alice", "from the present");
    let out = alice.run(&["receive", "--json"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(texts(&parse_json_lines(&String::from_utf8_lossy(&out.stdout))), ["from the present"]);
    assert!(err.contains("warning: the server would not confirm the key-directory head for epoch"), "{err}");
    assert!(err.contains("that bob's message carried"), "{err}");

    // Evidence against the server, not a proof: nothing is blocked.
    let alerts = parse_json_lines(&alice.ok(&["alerts", "--json"]));
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!((&alerts[0]["concerns"], &alerts[0]["fork"]), (&json!("the server"), &json!(false)));
    alice.send("bob", "not blocked");
    assert_clean_error(&alice.run(&["alerts", "export", "proof.json"]), "no proven key-directory fork");
}

/// `GET /v1/kt/head`, unsigned, as anyone may ask.
fn server_head(server: &Server) -> subrosa_proto::kt::KtHead {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(subrosa_client::net::call_unsigned::<(), subrosa_proto::kt::KtHead>(
        &server.url,
        reqwest::Method::GET,
        "/v1/kt/head",
        None,
    ))
    .expect("head")
}

#[test]
fn dropped_replayed_and_reordered_messages_show_as_such() {
    let server = Server::start_malicious();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "one");
    assert_eq!(texts(&bob.receive_json(&[])), ["one"]);

    // The operator drops the next message to bob, and delivers the one
    // after twice.
    alice.send("bob", "two");
    alice.send("bob", "three");
    let queued: Vec<i64> = {
        let db = server.db();
        let mut stmt = db
            .prepare("SELECT inbox.id FROM inbox JOIN devices ON devices.id = inbox.device WHERE devices.handle = 'bob' ORDER BY inbox.id")
            .expect("query");
        stmt.query_map([], |r| r.get(0)).expect("rows").map(|r| r.expect("id")).collect()
    };
    assert_eq!(queued.len(), 2);
    server.attack(json!({ "messages": { "recipient": "bob", "drop": [queued[0]], "replay": true } }));
    let got = bob.receive_json(&[]);
    let shown = texts(&got);
    assert_eq!(
        shown,
        ["1 message from alice did not arrive: the server dropped or is withholding them", "three"],
        "a gap, not silence; the replay is shown once"
    );

    // Reordering: both arrive, the late one is marked.
    server.attack(json!({ "messages": { "recipient": "bob", "reorder": true } }));
    alice.send("bob", "four");
    alice.send("bob", "five");
    let shown = texts(&bob.receive_json(&[]));
    assert_eq!(
        shown,
        [
            "1 message from alice did not arrive: the server dropped or is withholding them",
            "five",
            "four",
            "the message above from alice arrived out of order"
        ]
    );
    server.attack(json!({}));
}

#[test]
fn audit_passes_on_an_honest_directory_and_fails_on_a_tampered_one() {
    let server = Server::start();
    for name in ["alice", "bob", "carol"] {
        User::register(&server, name);
    }
    let auditor = User { name: "auditor".into(), dir: tempfile::tempdir().expect("tempdir") };
    let out = auditor.ok(&["audit", "--server", &server.url]);
    assert!(out.contains("audited epochs 1 to 3: 2 append-only proof(s) verified"), "{out}");

    // The operator rewrites history: an old epoch's tree node changes.
    tamper_directory(&server);
    assert_clean_error(&auditor.run(&["audit", "--server", &server.url]), "not append-only");
}

/// Rewrites the root the directory published for an earlier epoch.
fn tamper_directory(server: &Server) {
    let n = server.db().execute("UPDATE kt_epochs SET root_hash = randomblob(32) WHERE epoch = 2", []).expect("tamper");
    assert_eq!(n, 1);
}

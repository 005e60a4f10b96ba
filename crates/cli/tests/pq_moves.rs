//! Conversations made before post-quantum conversations existed move to
//! the hybrid suite (MLS ReInit) once every member device can do it: the
//! first release's users (`tests/fixtures/v1`) run `devices rekey`, and
//! their 1:1 conversation, then their group, go on under suite 65100 with
//! the same members and the whole history, both ways. An operator that
//! withholds a member's post-quantum key package cannot make a half-moved
//! conversation: the move does not begin, and the conversation goes on.

mod common;

use common::v1::{fixtures, open_store, output, received, run};
use common::*;
use serde_json::json;

/// A copy of a first-release home (SQLite), pointed at `server`.
fn home(who: &str, server: &Server) -> User {
    common::v1::home("sqlite", who, server)
}

fn suite_of(user: &User, target: &str) -> u64 {
    let j: serde_json::Value = serde_json::from_str(&run(user, &["members", target, "--json"])).expect("one object");
    j["suite"].as_u64().expect("suite")
}

fn history(user: &User, target: &str) -> Vec<String> {
    texts(&parse_json_lines(&run(user, &["history", target, "--json"])))
}

fn alerts(user: &User) -> String {
    run(user, &["alerts"])
}

#[test]
fn first_release_conversations_move_to_post_quantum_keys_once_every_device_can() {
    let server = Server::start_on_copy_of(&fixtures().join("sqlite/server"), &[]);
    let (alice, bob, carol) = (home("alice", &server), home("bob", &server), home("carol", &server));
    for u in [&alice, &bob, &carol] {
        received(u);
    }
    assert_eq!(suite_of(&alice, "@bob"), 1, "the first release's conversations are classical");
    let old_direct = run(&alice, &["members", "@bob"]);

    // alice's device can do post-quantum now; bob's cannot yet: nothing moves.
    run(&alice, &["devices", "rekey"]);
    received(&bob);
    received(&alice);
    assert_eq!(suite_of(&bob, "@alice"), 1);

    // bob's can too: his next command moves their 1:1 conversation; the
    // group waits for carol.
    run(&bob, &["devices", "rekey"]);
    received(&bob);
    assert_eq!(suite_of(&bob, "@alice"), 65100, "bob moved the 1:1 conversation");
    received(&alice);
    assert_eq!(suite_of(&alice, "@bob"), 65100, "alice joined it as the continuation");
    assert_eq!(suite_of(&alice, "friends"), 1, "carol's device cannot do post-quantum yet");
    // The same two devices, under new keys.
    let devices = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("ciphersuite"))
            .map(|l| l.split('\t').take(2).collect::<Vec<_>>().join("\t"))
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(devices(&run(&alice, &["members", "@bob"])), devices(&old_direct));

    // It goes on both ways, with the whole history.
    run(&alice, &["send", "@bob", "quantum-safe now"]);
    assert!(received(&bob).contains(&"quantum-safe now".to_string()));
    run(&bob, &["send", "@alice", "and back"]);
    assert!(received(&alice).contains(&"and back".to_string()));
    let h = history(&alice, "@bob");
    for line in ["hello bob, from the v1 fixture", "quantum-safe now", "and back"] {
        assert!(h.contains(&line.to_string()), "{line:?} missing from {h:?}");
    }
    assert!(h.iter().any(|l| l.contains("moved this conversation to post-quantum keys")), "{h:?}");

    // carol rekeys: her next command moves the group, for everyone.
    run(&carol, &["devices", "rekey"]);
    received(&carol);
    for u in [&alice, &bob, &carol] {
        received(u);
        assert_eq!(suite_of(u, "friends"), 65100, "{}", u.name);
    }
    run(&carol, &["send", "friends", "the group is post-quantum"]);
    for u in [&alice, &bob] {
        assert!(received(u).contains(&"the group is post-quantum".to_string()), "{}", u.name);
    }
    let h = history(&bob, "friends");
    assert!(h.contains(&"group hello".to_string()) && h.contains(&"the group is post-quantum".to_string()), "{h:?}");
    // One group of that name is active, and nothing went wrong anywhere.
    let groups = run(&alice, &["groups"]);
    assert_eq!(groups.lines().filter(|l| l.contains("friends") && !l.contains("left")).count(), 1, "{groups}");
    for u in [&alice, &bob, &carol] {
        let a = alerts(u);
        assert!(!a.contains("could not"), "{}: {a}", u.name);
    }
}

/// The test-only malicious operator over the first release's data, alice
/// and bob caught up, alice's device able to do post-quantum (bob's not
/// yet), bob aware of it.
fn alice_rekeyed_on_the_attack_server() -> (Server, User, User) {
    let server = Server::start_malicious_on_copy_of(&fixtures().join("sqlite/server"));
    let (alice, bob) = (home("alice", &server), home("bob", &server));
    for u in [&alice, &bob] {
        received(u);
    }
    run(&alice, &["devices", "rekey"]);
    received(&bob);
    (server, alice, bob)
}

#[test]
fn a_withheld_post_quantum_key_package_stops_a_move_before_it_begins() {
    let (server, alice, bob) = alice_rekeyed_on_the_attack_server();
    // The operator hides alice's post-quantum packages when bob moves.
    server.attack(json!({ "withhold_post_quantum": { "handle": "alice" } }));
    run(&bob, &["devices", "rekey"]);
    received(&bob);
    assert_eq!(suite_of(&bob, "@alice"), 1, "no move without every member's package");
    assert!(alerts(&bob).contains("withheld the post-quantum key packages"), "{}", alerts(&bob));
    // Nothing is stuck: the conversation goes on, classical.
    run(&bob, &["send", "@alice", "still here"]);
    assert!(received(&alice).contains(&"still here".to_string()));
    run(&alice, &["send", "@bob", "me too"]);
    assert!(received(&bob).contains(&"me too".to_string()));

    // Honest again: the next change of keys moves it.
    server.attack(json!({}));
    run(&alice, &["devices", "rekey"]);
    received(&bob);
    received(&alice);
    assert_eq!(suite_of(&alice, "@bob"), 65100);
    assert_eq!(suite_of(&bob, "@alice"), 65100);
}

/// The member that committed a move loses the server's answer and is never
/// heard of again: the others wait (a message written meanwhile is queued,
/// not lost), and once it is overdue a member creates the new conversation
/// itself; the committer, back at last, joins that one.
#[test]
fn a_move_whose_committer_vanishes_is_completed_by_another_member() {
    let (server, alice, bob) = alice_rekeyed_on_the_attack_server();
    run(&bob, &["devices", "rekey"]);
    // alice's next command moves their conversation; the answer to her
    // move is lost (stored and delivered all the same), and she is gone.
    server.attack(json!({ "lose_commit_answers": { "sender": "alice" } }));
    output(&alice, &["receive"]);
    server.attack(json!({}));

    received(&bob);
    assert_eq!(suite_of(&bob, "@alice"), 1, "bob applied the move and waits for alice's new conversation");
    let out = output(&bob, &["send", "@alice", "written while it moves"]);
    assert_eq!(out.status.code(), Some(75), "queued, not lost: {}", stderr(&out));

    // An hour later (the wait, set back in bob's store), bob creates it.
    let old = parse_json_lines(&run(&bob, &["history", "@alice", "--json"]))[0]["conversation"]
        .as_str()
        .expect("conversation")
        .to_string();
    {
        let store = open_store(&bob);
        let key = format!("moving:{old}");
        store
            .write(|tx| {
                let mut v = tx.meta(&key)?.expect("bob is moving").to_vec();
                v[17..25].copy_from_slice(&0u64.to_le_bytes());
                tx.set_meta(&key, &v)
            })
            .expect("set the wait back");
    }
    received(&bob);
    assert_eq!(suite_of(&bob, "@alice"), 65100, "bob created the new conversation");
    received(&bob);

    // alice is back: her move's answer comes as a duplicate, and she joins
    // bob's conversation, where the queued message waits for her.
    let got = received(&alice);
    assert_eq!(suite_of(&alice, "@bob"), 65100);
    let mut got = got;
    got.extend(received(&alice));
    assert!(got.contains(&"written while it moves".to_string()), "{got:?}");
    run(&alice, &["send", "@bob", "back"]);
    assert!(received(&bob).contains(&"back".to_string()));
}

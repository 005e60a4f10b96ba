//! Post-quantum conversations by default: two users of the real binary get
//! a conversation of suite 65100 (ML-KEM-768 + X25519), `members` names it,
//! and an operator that withholds the post-quantum key packages to push a
//! conversation down to the classical suite is refused, not followed.

mod common;

use common::*;
use serde_json::json;

fn suite_line(members: &str) -> String {
    members.lines().find(|l| l.starts_with("ciphersuite\t")).unwrap_or_default().to_string()
}

#[test]
fn two_users_get_a_post_quantum_conversation_and_members_says_so() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello in the hybrid suite");
    assert_eq!(texts(&bob.receive_json(&[])), vec!["hello in the hybrid suite"]);
    bob.send("alice", "and back");
    assert!(texts(&alice.receive_json(&[])).contains(&"and back".to_string()));

    for u in [&alice, &bob] {
        let plain = u.ok(&["members", if u.name == "alice" { "bob" } else { "alice" }]);
        assert_eq!(suite_line(&plain), "ciphersuite\t65100\tML-KEM-768+X25519 (post-quantum)", "{plain}");
        assert_eq!(plain.lines().filter(|l| !l.starts_with("ciphersuite\t")).count(), 2, "{plain}");
    }
    let j: serde_json::Value =
        serde_json::from_str(&alice.ok(&["members", "bob", "--json"])).expect("members --json is one object");
    assert_eq!((j["suite"].as_u64(), j["post_quantum"].as_bool()), (Some(65100), Some(true)), "{j}");
    assert_eq!(j["members"].as_array().map(Vec::len), Some(2), "{j}");
    assert!(j["members"].as_array().expect("members").iter().all(|m| m["suite"] == json!(65100)));

    // Groups are post-quantum too.
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "hybrid", "bob", "carol"]);
    alice.send("hybrid", "to the group");
    assert!(texts(&carol.receive_json(&[])).contains(&"to the group".to_string()));
    assert!(suite_line(&carol.ok(&["members", "hybrid"])).starts_with("ciphersuite\t65100\t"));

    // The server filed each device's packages under both suites.
    let filed: Vec<i64> = {
        let db = server.db();
        let mut stmt = db.prepare("SELECT DISTINCT suite FROM last_resort_packages ORDER BY suite").expect("query");
        stmt.query_map([], |r| r.get(0)).expect("rows").map(|r| r.expect("row")).collect()
    };
    assert_eq!(filed, vec![1, 65100]);
}

#[test]
fn withheld_post_quantum_key_packages_are_refused_not_followed() {
    let server = Server::start_malicious();
    let alice = User::register(&server, "alice");
    let _bob = User::register(&server, "bob");

    // The operator says bob has no post-quantum package, hoping alice falls
    // back to a classical conversation; bob's certificate, which the key
    // directory carries, says his device can do post-quantum ones.
    server.attack(json!({ "withhold_post_quantum": { "handle": "bob" } }));
    let out = alice.run(&["send", "bob", "downgrade me"]);
    assert_clean_error(&out, "withheld the post-quantum key packages");
    assert_clean_error(&alice.run(&["members", "bob"]), "unknown conversation");

    // Honest again: the conversation is post-quantum.
    server.attack(json!({}));
    alice.send("bob", "not downgraded");
    assert!(suite_line(&alice.ok(&["members", "bob"])).starts_with("ciphersuite\t65100\t"));
}

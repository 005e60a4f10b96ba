//! Message requests and blocking end to end: the built binaries, a real
//! server process, users in temporary directories.

mod common;

use common::*;

fn texts_from(msgs: &[serde_json::Value], from: &str) -> Vec<String> {
    msgs.iter()
        .filter(|m| m["system"] == false && m["from"] == from)
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn state_of(u: &User, target: &str, text: &str) -> String {
    let h = u.history_json(target);
    let m = h.iter().find(|m| m["text"] == text).unwrap_or_else(|| panic!("{text:?} not in {h:?}"));
    m["state"].as_str().unwrap_or_default().to_string()
}

/// A stranger's first message is a request: marked so, listed, and owed
/// no delivery receipt until accepted; after `accept` receipts flow.
#[test]
fn a_strangers_message_is_a_request_until_accepted() {
    let server = Server::start();
    let bob = User::register(&server, "bob");
    let mallory = User::register(&server, "mallory");

    mallory.send("bob", "hello from a stranger");
    let got = bob.receive_json(&[]);
    let first = got.iter().find(|m| m["text"] == "hello from a stranger").expect("the message arrives");
    assert_eq!(first["request"], true, "{first:?}");
    let requests = bob.ok(&["requests"]);
    assert!(requests.starts_with("mallory\tdirect\t#"), "{requests:?}");
    assert!(bob.history_json("mallory").iter().all(|m| m["request"] == true));
    // Plain output says so too.
    mallory.send("bob", "still there?");
    let plain = bob.ok(&["receive"]);
    assert!(plain.contains("[request] mallory: still there?"), "{plain}");

    // No delivery receipt went back while it was a request.
    mallory.ok(&["receive"]);
    assert_eq!(state_of(&mallory, "bob", "hello from a stranger"), "sent");

    assert!(bob.ok(&["accept", "mallory"]).contains("accepted mallory"));
    assert_eq!(bob.ok(&["requests"]), "");
    assert!(bob.history_json("mallory").iter().all(|m| m["request"].is_null()));
    mallory.send("bob", "thanks");
    let got = bob.receive_json(&[]);
    assert!(got.iter().all(|m| m["request"].is_null()), "{got:?}");
    bob.ok(&["receive"]); // sends the receipt it owes
    mallory.ok(&["receive"]);
    assert_eq!(state_of(&mallory, "bob", "thanks"), "delivered");
    assert!(bob.ok(&["accept", "mallory"]).contains("not a message request"));
}

/// Someone this account wrote to, or started a conversation with, is a
/// contact: their messages and invitations are no requests. A group
/// invitation from a stranger is one.
#[test]
fn contacts_are_those_written_to_and_a_strangers_group_is_a_request() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let mallory = User::register(&server, "mallory");

    bob.send("alice", "hi alice");
    alice.receive_json(&[]);
    alice.send("bob", "hi bob");
    let got = bob.receive_json(&[]);
    assert_eq!(texts_from(&got, "alice"), ["hi bob"]);
    assert!(got.iter().all(|m| m["request"].is_null()), "a contact's answer is no request: {got:?}");
    alice.ok(&["group", "create", "friends", "bob"]);
    assert!(bob.receive_json(&[]).iter().all(|m| m["request"].is_null()));

    mallory.ok(&["group", "create", "offers", "bob"]);
    let got = bob.receive_json(&[]);
    assert!(got.iter().any(|m| m["target"] == "offers" && m["request"] == true), "{got:?}");
    assert!(bob.ok(&["requests"]).starts_with("offers\tgroup\t#"));
    // Answering in it accepts it.
    bob.send("offers", "no thanks");
    assert_eq!(bob.ok(&["requests"]), "");
}

/// A blocked account's messages never show, its invitations are not
/// joined, the server keeps nothing of them, and this account left the
/// conversations that were only with it; unblocking lets new ones through.
#[test]
fn a_blocked_accounts_messages_never_show() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let mallory = User::register(&server, "mallory");
    mallory.send("bob", "first");
    bob.receive_json(&[]);
    alice.ok(&["group", "create", "club", "bob", "mallory"]);
    bob.receive_json(&[]);
    mallory.receive_json(&[]);

    let out = bob.ok(&["block", "mallory"]);
    assert!(out.contains("blocked mallory (left 1 conversation(s))"), "{out}");
    mallory.send("club", "spam in the club");
    // Bob left their direct conversation: what mallory's client makes of
    // it is its own business; nothing of it may show at bob's.
    let _ = mallory.run(&["send", "bob", "spam direct"]);
    mallory.ok(&["group", "create", "more spam", "bob"]);
    alice.send("club", "alice still talks");
    let got = bob.receive_json(&[]);
    assert!(texts_from(&got, "mallory").is_empty(), "a blocked account's message showed: {got:?}");
    assert_eq!(texts_from(&got, "alice"), ["alice still talks"]);
    assert!(!bob.ok(&["groups"]).contains("more spam"), "a blocked account's invitation was joined");
    assert!(bob.history_json("club").iter().all(|m| m["text"] != "spam in the club"));
    assert_eq!(
        server.count("inbox WHERE device IN (SELECT id FROM devices WHERE handle = 'bob')"),
        0,
        "the server still holds something for bob: dropped messages must be acknowledged"
    );

    assert!(bob.ok(&["unblock", "mallory"]).contains("unblocked mallory"));
    mallory.send("club", "back again");
    let got = bob.receive_json(&[]);
    assert_eq!(texts_from(&got, "mallory"), ["back again"]);
    // What was dropped while blocked is no gap: no "did not arrive" line.
    assert!(got.iter().all(|m| m["event"]["event"] != "gap"), "a false gap after unblocking: {got:?}");
    let out = bob.run(&["block", "bob"]);
    assert_clean_error(&out, "your own account");
}

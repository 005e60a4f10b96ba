//! Reactions, replies, edits, deletes for everyone and receipts, end to
//! end: the built binary, a real server process, three users in temporary
//! directories. A member whose client does not play by the rules (it sends
//! an edit of someone else's message) is played by the library.

mod common;

use common::*;
use subrosa_client::{Subrosa, Target};
use subrosa_core::content::Body;
use subrosa_proto::{ConversationId, MessageId};

/// The object of `history --json` whose text is `text`.
fn find<'a>(history: &'a [serde_json::Value], text: &str) -> &'a serde_json::Value {
    history.iter().find(|m| m["text"] == text).unwrap_or_else(|| panic!("no {text:?} in {history:?}"))
}

fn by_id<'a>(history: &'a [serde_json::Value], id: &str) -> &'a serde_json::Value {
    history.iter().find(|m| m["id"] == id).unwrap_or_else(|| panic!("no message {id} in {history:?}"))
}

fn reactions(m: &serde_json::Value) -> Vec<(String, Vec<String>)> {
    m["reactions"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    let from =
                        r["from"].as_array().map(|f| f.iter().filter_map(|x| x.as_str().map(str::to_string)).collect());
                    (r["emoji"].as_str().unwrap_or_default().to_string(), from.unwrap_or_default())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn receipts(m: &serde_json::Value) -> Vec<(String, String)> {
    m["receipts"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    (r["member"].as_str().unwrap_or_default().into(), r["state"].as_str().unwrap_or_default().into())
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn reactions_replies_edits_deletes_and_receipts_reach_every_member_and_a_non_author_edit_is_refused() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    // Bob and carol wrote to alice before: she is their contact, so her
    // group is no message request and receipts flow at once.
    bob.send("alice", "hi alice");
    carol.send("alice", "hi alice");
    alice.ok(&["group", "create", "friends", "bob", "carol"]);
    alice.send("friends", "original words");
    alice.send("friends", "secret words");
    let mine = alice.history_json("friends");
    let original = find(&mine, "original words")["id"].as_str().expect("id").to_string();
    let secret = find(&mine, "secret words")["id"].as_str().expect("id").to_string();
    let group = find(&mine, "original words")["conversation"].as_str().expect("conversation").to_string();
    for u in [&bob, &carol] {
        let got = u.receive_json(&[]);
        assert!(got.iter().any(|m| m["id"] == original.as_str()), "{}: {got:?}", u.name);
    }

    // Receipts: bob's and carol's devices stored both messages and told
    // alice's devices alone.
    alice.receive_json(&[]);
    let mine = alice.history_json("friends");
    for id in [&original, &secret] {
        let m = by_id(&mine, id);
        assert_eq!(m["state"], "delivered", "{m}");
        assert_eq!(receipts(m), [("bob".into(), "delivered".into()), ("carol".into(), "delivered".into())]);
    }
    // Bob reads; carol turned read receipts off.
    assert_eq!(carol.ok(&["settings", "read-receipts", "off"]).trim(), "read receipts: off");
    assert!(carol.ok(&["read", "friends"]).contains("nobody was told"));
    assert!(bob.ok(&["read", "friends"]).starts_with("marked 2 message(s) read"));
    alice.receive_json(&[]);
    let m = by_id(&alice.history_json("friends"), &original).clone();
    assert_eq!(receipts(&m), [("bob".into(), "read".into()), ("carol".into(), "delivered".into())]);
    assert_eq!(m["state"], "delivered");

    // Reactions: one per member per emoji; `--remove` takes one back.
    bob.ok(&["react", "friends", &original, "\u{1f44d}"]);
    carol.ok(&["react", "friends", &original, "\u{1f44d}"]);
    carol.ok(&["react", "friends", &original, "\u{1f389}"]);
    carol.ok(&["react", "friends", &original, "\u{1f44d}"]);
    carol.ok(&["react", "friends", &original, "\u{1f389}", "--remove"]);
    // A reply, with the id it answers.
    carol.ok(&["send", "friends", "an answer", "--reply-to", &original]);
    // The author edits one message and deletes the other for everyone.
    alice.ok(&["edit", "friends", &original, "better words"]);
    alice.ok(&["delete", "friends", &secret]);
    // Carol is not the author: her client refuses, and when a modified
    // client sends it anyway, every member refuses it and says so.
    let out = carol.run(&["edit", "friends", &original, "forged words"]);
    assert_clean_error(&out, "only its author may edit it");
    assert_eq!(out.status.code(), Some(1));
    {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let me = Subrosa::open(&carol.home(), PASS).expect("opens the home");
        let to = Target::Conversation(group.parse::<ConversationId>().expect("id"));
        let target: MessageId = original.parse().expect("id");
        rt.block_on(me.send_body(&to, Body::Edit { target, text: "forged words".into() }, None)).expect("sent");
        rt.block_on(me.send_body(&to, Body::Delete { target }, None)).expect("sent");
    }

    for u in [&alice, &bob, &carol] {
        let live = u.receive_json(&[]);
        let history = u.history_json("friends");
        let m = by_id(&history, &original);
        assert_eq!((m["text"].as_str(), m["edited"].as_bool()), (Some("better words"), Some(true)), "{}: {m}", u.name);
        let thumbs = ("\u{1f44d}".to_string(), vec!["bob".to_string(), "carol".to_string()]);
        assert_eq!(reactions(m), [thumbs], "{}", u.name);
        let gone = by_id(&history, &secret);
        assert_eq!((gone["text"].as_str(), gone["deleted"].as_bool()), (Some(""), Some(true)), "{}", u.name);
        assert!(!history
            .iter()
            .any(|m| m["text"].as_str().is_some_and(|t| t.contains("secret") || t.contains("forged"))));
        let answer = find(&history, "an answer");
        assert_eq!(answer["reply_to"], original.as_str(), "{}", u.name);
        if u.name != "carol" {
            // The refusal is a typed system line, from carol's device.
            let refused: Vec<&str> = history
                .iter()
                .filter_map(|m| m["event"]["event"].as_str())
                .filter(|e| e.ends_with("_refused"))
                .collect();
            assert_eq!(refused, ["edit_refused", "delete_refused"], "{}: {history:?}", u.name);
            // `receive --json` showed the edited and deleted messages again,
            // with the same fields.
            assert!(live.iter().any(|m| m["id"] == original.as_str() && m["edited"] == true), "{}: {live:?}", u.name);
            assert!(live.iter().any(|m| m["id"] == secret.as_str() && m["deleted"] == true), "{}: {live:?}", u.name);
        }
        // Human output: the markers, the reactions, and the deleted line.
        let plain = u.ok(&["history", "friends"]);
        assert!(plain.contains("better words (edited) [\u{1f44d} bob, carol]"), "{plain}");
        assert!(plain.contains("[deleted]"), "{plain}");
        assert!(plain.contains(&format!("(re {}) an answer", &original[..8])), "{plain}");
    }
    // Carol's reply was delivered to both others, and read by bob once he reads again.
    bob.ok(&["read", "friends"]);
    carol.receive_json(&[]);
    let answer = find(&carol.history_json("friends"), "an answer").clone();
    assert_eq!(receipts(&answer), [("alice".into(), "delivered".into()), ("bob".into(), "read".into())]);
}

#[test]
fn bad_reactions_edits_and_deletes_are_refused_with_one_clear_line() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    bob.receive_json(&[]);
    let id = find(&alice.history_json("bob"), "hello")["id"].as_str().expect("id").to_string();
    for (args, needle) in [
        (vec!["react", "alice", "nothex", "x"], "is not a message id"),
        (vec!["react", "alice", &"ab".repeat(16), "x"], "no message"),
        (vec!["react", "alice", &id, "two words"], "a reaction is one emoji"),
        (vec!["react", "alice", &id, "\u{1b}[2J"], "a reaction is one emoji"),
        (vec!["edit", "alice", &id, "mine now"], "only its author may edit it"),
        (vec!["delete", "alice", &id], "only its author may delete it"),
        (vec!["send", "alice", "hi", "--reply-to", &"cd".repeat(16)], "no message"),
        (vec!["react", "nobody", &id, "x"], "nobody"),
    ] {
        let out = bob.run(&args);
        assert_clean_error(&out, needle);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
    }
    // Nothing was sent.
    assert!(alice.receive_json(&[]).is_empty());
}

/// What members said: the messages that are no system lines.
fn said(msgs: &[serde_json::Value]) -> Vec<serde_json::Value> {
    msgs.iter().filter(|m| m["system"] != true).cloned().collect()
}

/// Receipts go to their author's devices only, so the other members skip
/// those generations of the sender's ratchet, and an MLS receiver refuses a
/// message more than 1,024 generations ahead of the last it saw. However
/// many receipts bob owes alice, carol still reads bob's next message, even
/// one sent without the key update a command makes first.
#[test]
fn a_thousand_receipts_to_one_author_never_make_the_senders_next_message_unreadable_to_the_others() {
    // Sends are encrypted in one batch now and go out faster than the
    // server's per-device limit (200/s, bursts of 400); this test is about
    // ratchet generations, not that limit.
    let server = Server::start_with(&["--rate-limit", "0"]);
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "friends", "bob", "carol"]);
    alice.send("friends", "hello");
    let got = said(&bob.receive_json(&[]));
    assert_eq!(texts(&got), ["hello"]);
    assert_eq!(texts(&said(&carol.receive_json(&[]))), ["hello"]);
    let conversation = got[0]["conversation"].as_str().unwrap_or_default().parse::<ConversationId>().expect("id");
    let id = got[0]["id"].as_str().unwrap_or_default().parse::<MessageId>().expect("id");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let queued = {
        let me = Subrosa::open(&bob.home(), PASS).expect("opens bob's home");
        let queued = rt.block_on(me.test_owe_receipts(conversation, "alice", id, 1_100)).expect("receipts sent");
        rt.block_on(me.test_post_now(conversation, Body::Text("no update before me".into()))).expect("sent");
        queued
    };
    assert!(queued < 1_024, "{queued} receipts went to alice alone");
    assert_eq!(texts(&said(&carol.receive_json(&[]))), ["no update before me"]);
    // The next command commits an update first: the ratchets start again.
    bob.send("friends", "after an update");
    assert_eq!(texts(&said(&carol.receive_json(&[]))), ["after an update"]);
    assert_eq!(texts(&said(&alice.receive_json(&[]))), ["no update before me", "after an update"]);
}

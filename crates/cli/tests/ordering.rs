//! Commit ordering, end to end: only members change a conversation, a lost
//! answer never desyncs anyone, and a removed device is revoked first.
//!
//! A malicious user is played by test code that signs raw requests with a
//! registered device's own key (the client library opened on its home); the
//! lost answers by the test-only attack server (`lose_commit_answers`).

mod common;

use common::*;
use subrosa_client::Subrosa;
use subrosa_proto::{
    CommitGuard, ConversationId, DeviceAddress, Epoch, ErrorCode, MessageKind, SendId, SendPart, SendRequest,
    SendResponse, B64,
};

/// The id of a conversation as `history --json` names it.
fn conversation_of(u: &User, target: &str) -> ConversationId {
    let hex = u.history_json(target).iter().find_map(|m| m["conversation"].as_str().map(str::to_string)).expect("id");
    hex.parse().expect("conversation id")
}

/// A request as a malicious member or outsider would post it.
fn raw_send(conversation: ConversationId, epoch: Option<u64>, to: &DeviceAddress) -> SendRequest {
    SendRequest {
        conversation,
        send_id: SendId(rand::random()),
        commit: epoch.map(|e| CommitGuard { epoch: Epoch(e), members: None }),
        parts: vec![SendPart {
            kind: if epoch.is_some() { MessageKind::Commit } else { MessageKind::Application },
            recipients: vec![to.clone()],
            ciphertext: B64(framed(conversation, epoch)),
        }],
        expires_at: None,
    }
}

/// Garbage inside a valid MLS PrivateMessage framing (a commit when
/// `epoch` is given): what a member that wants to break a conversation
/// sends, since the server reads the framing.
fn framed(conversation: ConversationId, epoch: Option<u64>) -> Vec<u8> {
    let mut out = vec![0x00, 0x01, 0x00, 0x02, 0x10];
    out.extend_from_slice(conversation.as_bytes());
    out.extend_from_slice(&epoch.unwrap_or(0).to_be_bytes());
    out.push(if epoch.is_some() { 3 } else { 1 });
    out.extend_from_slice(&[0x00, 0x04, 0xDE, 0xAD, 0xBE, 0xEF, 0x04, 0xDE, 0xAD, 0xBE, 0xEF]);
    out
}

/// Posts as the device in `u`'s home; the server's error code, if any.
fn post_as(u: &User, req: &SendRequest) -> Result<SendResponse, Option<ErrorCode>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let me = Subrosa::open(&u.home(), PASS).expect("open");
        me.api().call::<_, SendResponse>(reqwest::Method::POST, "/v1/messages", Some(req)).await.map_err(|e| match e {
            subrosa_client::ClientError::Server { body, .. } => Some(body.code),
            _ => None,
        })
    })
}

fn address(u: &User) -> DeviceAddress {
    Subrosa::open(&u.home(), PASS).expect("open").identity().address()
}

/// Every text `u` receives now (system lines excluded), asserting `receive`
/// succeeded and dropped nothing.
fn receive_texts(u: &User) -> Vec<String> {
    let out = u.run(&["receive", "--json"]);
    assert!(out.status.success(), "{} receive: {}", u.name, stderr(&out));
    assert!(!stderr(&out).contains("dropped"), "{} dropped a message: {}", u.name, stderr(&out));
    parse_json_lines(&String::from_utf8_lossy(&out.stdout))
        .iter()
        .filter(|m| m["system"] != true)
        .filter_map(|m| m["text"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_non_member_who_knows_the_id_cannot_freeze_a_group() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    let mallory = User::register(&server, "mallory");
    alice.ok(&["group", "create", "club", "bob"]);
    bob.receive_json(&[]);
    let id = conversation_of(&alice, "club");
    let to = address(&alice);

    // Mallory learned the id (ids are not secret) and tries what froze
    // groups before: a guarded send to learn the epoch, then one at it.
    for epoch in 0..4 {
        assert_eq!(post_as(&mallory, &raw_send(id, Some(epoch), &to)).err(), Some(Some(ErrorCode::NotAMember)));
    }
    assert_eq!(post_as(&mallory, &raw_send(id, None, &to)).err(), Some(Some(ErrorCode::NotAMember)));

    // The members change the group as they like afterwards.
    alice.ok(&["group", "add", "club", "carol"]);
    carol.receive_json(&[]);
    bob.ok(&["group", "rename", "club", "society"]);
    alice.ok(&["group", "remove", "society", "carol"]);
    alice.send("society", "still ours");
    assert!(receive_texts(&bob).contains(&"still ours".to_string()));
    bob.ok(&["group", "leave", "society"]);
    alice.receive_json(&[]);
    let members = alice.ok(&["members", "society"]);
    assert!(!members.contains("bob") && !members.contains("carol"), "{members}");
    // Alone in it, alice still commits (her commit goes to herself).
    alice.ok(&["group", "rename", "society", "solo"]);
    assert!(alice.ok(&["groups"]).starts_with("solo\t"));
    // Carol, removed, is an outsider now too.
    assert_eq!(post_as(&carol, &raw_send(id, None, &to)).err(), Some(Some(ErrorCode::NotAMember)));
}

#[test]
fn a_lost_answer_to_a_commit_leaves_it_pending_and_the_next_command_completes_it() {
    let server = Server::start_malicious();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "club", "bob"]);
    bob.receive_json(&[]);

    server.attack(serde_json::json!({"lose_commit_answers": {"sender": "alice"}}));
    let out = alice.run(&["group", "add", "club", "carol"]);
    assert_eq!(exit_code(&out), EXIT_PENDING, "{}", stderr(&out));
    assert!(stderr(&out).starts_with("queued: "), "{}", stderr(&out));
    server.attack(serde_json::json!({}));

    // The server ordered it: bob and carol apply it at once.
    bob.receive_json(&[]);
    carol.receive_json(&[]);
    // The next command of alice's completes it (and her echo is skipped).
    assert!(receive_texts(&alice).is_empty());
    let lines: Vec<String> =
        alice.history_json("club").iter().filter_map(|m| m["text"].as_str().map(Into::into)).collect();
    assert_eq!(lines.iter().filter(|l| l.as_str() == "you added carol").count(), 1, "{lines:?}");

    // Nothing later is lost by anyone.
    bob.send("club", "from bob");
    carol.send("club", "from carol");
    alice.send("club", "from alice");
    assert_eq!(receive_texts(&alice), ["from bob", "from carol"]);
    assert_eq!(receive_texts(&bob), ["from carol", "from alice"]);
    assert_eq!(receive_texts(&carol), ["from bob", "from alice"]);

    // A second lost answer, then another member commits first: alice's
    // pending rename is completed (it was ordered) and bob's commit after
    // it is processed in order.
    server.attack(serde_json::json!({"lose_commit_answers": {"sender": "alice"}}));
    assert_eq!(exit_code(&alice.run(&["group", "rename", "club", "society"])), EXIT_PENDING);
    server.attack(serde_json::json!({}));
    bob.receive_json(&[]);
    bob.ok(&["group", "remove", "society", "carol"]);
    alice.send("society", "after both");
    assert_eq!(receive_texts(&bob), ["after both"]);
    assert_eq!(alice.ok(&["groups"]).lines().filter(|l| l.starts_with("society\t")).count(), 1);
}

#[test]
fn a_lost_answer_to_creating_a_conversation_never_forgets_it() {
    let server = Server::start_malicious();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let dave = User::register(&server, "dave");

    server.attack(serde_json::json!({"lose_commit_answers": {"sender": "alice"}}));
    assert_eq!(exit_code(&alice.run(&["group", "create", "club", "bob"])), EXIT_PENDING);
    // Starting a 1:1 by sending: the message waits with the conversation.
    let out = alice.run(&["send", "dave", "first words"]);
    assert_eq!(exit_code(&out), EXIT_PENDING, "{}", stderr(&out));
    server.attack(serde_json::json!({}));

    assert!(receive_texts(&bob).is_empty());
    assert!(receive_texts(&alice).is_empty(), "alice's next command completes both");
    assert!(alice.ok(&["groups"]).starts_with("club\t"));
    assert_eq!(receive_texts(&dave), ["first words"]);
    alice.send("club", "hello club");
    bob.send("club", "hello alice");
    dave.send("alice", "hello back");
    assert_eq!(receive_texts(&bob), ["hello club"]);
    assert_eq!(receive_texts(&alice), ["hello alice", "hello back"]);
    assert_eq!(texts(&alice.history_json("dave")).iter().filter(|t| *t == "first words").count(), 1);
}

#[test]
fn a_stolen_device_that_keeps_committing_is_revoked_first() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.ok(&["group", "create", "club", "bob"]);
    alice.send("bob", "hi");
    bob.receive_json(&[]);
    let stolen = User { name: "stolen".into(), dir: tempfile::tempdir().expect("tempdir") };
    let (link, code) = start_link(&server, &stolen, "alice", &[]);
    alice.ok(&["link", "--accept", &code]);
    assert!(link.wait_with_output().expect("link ends").status.success());
    stolen.receive_json(&[]);
    bob.receive_json(&[]);
    let club = conversation_of(&alice, "club");
    let direct = conversation_of(&alice, "bob");
    let to = address(&stolen);

    // The thief wins the next epoch of the group with a commit nobody can
    // process (it is a member, so the server takes it), and would go on.
    let mut frozen = false;
    for epoch in 0..8 {
        if post_as(&stolen, &raw_send(club, Some(epoch), &to)).is_ok() {
            frozen = true;
            break;
        }
    }
    assert!(frozen, "a member can win an epoch");

    let stolen_id = to.device.to_hex();
    let out = alice.run(&["devices", "remove", &stolen_id]);
    // The group the thief froze cannot be changed any more, and alice is
    // told who did it; but the device is revoked whatever happens there.
    assert_eq!(exit_code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("stuck"), "{}", stderr(&out));
    assert!(!alice.ok(&["devices"]).contains(&stolen_id));
    for epoch in 0..8 {
        assert!(post_as(&stolen, &raw_send(club, Some(epoch), &to)).is_err(), "revoked: it can commit no more");
    }
    assert!(post_as(&stolen, &raw_send(direct, None, &to)).is_err(), "nor send");
    // The alert names the device that won the epoch.
    let alerts = stderr(&out);
    assert!(
        alerts.lines().any(|l| l.starts_with("warning: ") && l.contains("stuck") && l.contains(&stolen_id)),
        "{alerts}"
    );

    // The 1:1 it did not freeze lost the device and works on.
    let members = alice.ok(&["members", "bob"]);
    assert!(!members.contains(&stolen_id), "{members}");
    alice.send("bob", "without the thief");
    // Bob drops the thief's commit (with a warning) and gets the message.
    let out = bob.run(&["receive", "--json"]);
    assert!(stderr(&out).contains("dropped a message from alice/"), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .lines()
            .any(|l| l.starts_with("warning: ") && l.contains(&stolen_id) && l.contains("could not be processed")),
        "the others are told who froze it: {}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("without the thief"));
    let out = stolen.run(&["receive", "--json"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("without the thief"));

    // The stuck group is re-created without the device that froze it; bob
    // saw it stuck too, so his copy is retired and the name means the new one.
    assert_clean_error(&bob.run(&["group", "recreate", "gang"]), "unknown group \"gang\"");
    let out = alice.ok(&["group", "recreate", "club"]);
    assert!(out.contains("re-created club as a new conversation"), "{out}");
    let out = bob.run(&["receive", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = texts(&parse_json_lines(&String::from_utf8_lossy(&out.stdout)));
    assert!(lines.iter().any(|t| t.contains("re-created club without") && t.contains(&stolen_id)), "{lines:?}");
    bob.ok(&["send", "club", "club again"]);
    assert!(receive_texts(&alice).contains(&"club again".to_string()));
    let members = alice.ok(&["members", "club"]);
    assert!(!members.contains(&stolen_id) && members.contains("bob"), "{members}");
    // A group that is not stuck is not re-created.
    alice.ok(&["group", "create", "calm", "bob"]);
    assert_clean_error(&alice.run(&["group", "recreate", "calm"]), "not stuck");
}

#[test]
fn members_are_told_when_the_server_lets_a_non_member_in() {
    let server = Server::start_malicious();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "club", "bob"]);
    bob.receive_json(&[]);
    // Honest: a commit's roster matches the members; no alert.
    alice.ok(&["group", "rename", "club", "society"]);
    let out = bob.run(&["receive"]);
    assert!(out.status.success() && !stderr(&out).contains("roster"), "{}", stderr(&out));

    let mallory = serde_json::json!({"handle": "mallory", "device": "00112233445566ff"});
    server.attack(serde_json::json!({"roster_extra": mallory}));
    alice.ok(&["group", "add", "society", "carol"]);
    let out = bob.run(&["receive"]);
    let warned = stderr(&out);
    assert!(
        warned
            .lines()
            .any(|l| l.starts_with("warning: ") && l.contains("mallory/00112233445566ff") && l.contains("roster")),
        "{warned}"
    );
    carol.receive_json(&[]);
}

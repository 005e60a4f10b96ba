//! The shared client handle (`subrosa_client::Client`) against a real
//! server process: what the terminal UI, the daemon and bots build on.
//! Commands by conversation id, one typed event stream read by several
//! subscribers, the follow loop on a task of its own (the handle is `Send`).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use subrosa_client::{Client, ClientEvent, MessageState, Subrosa};
use subrosa_proto::ConversationId;
use tokio::sync::broadcast::Receiver;

/// The next event a subscriber sees that `keep` accepts, within 30 s.
async fn next_where(rx: &mut Receiver<ClientEvent>, keep: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let e = rx.recv().await.expect("the stream goes on");
            if keep(&e) {
                return e;
            }
        }
    })
    .await
    .expect("the event arrived in time")
}

fn is_message(text: &str) -> impl Fn(&ClientEvent) -> bool + '_ {
    move |e| matches!(e, ClientEvent::Message(m) if m.text == text)
}

#[test]
fn two_subscribers_see_what_arrives_and_a_reply_goes_out_by_conversation_id() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "first");
    bob.receive_json(&[]);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = Client::new(Subrosa::open(&bob.home(), PASS).expect("open bob"));
        let (mut ui, mut bot) = (client.events(), client.events());
        // The follow loop runs on a task of its own.
        let running = client.spawn();
        next_where(&mut ui, |e| matches!(e, ClientEvent::Connected)).await;

        // While bob's handle is connected, alice sends from the command line.
        let alice_home = alice.home();
        let sent = tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(subrosa_bin())
                .args(["--home", alice_home.to_str().expect("utf-8"), "send", "bob", "second"])
                .env("SUBROSA_PASSPHRASE", PASS)
                .env("SUBROSA_KEY_CACHE", "off")
                .output()
                .expect("run subrosa");
            assert!(out.status.success(), "send: {}", stderr(&out));
        });
        sent.await.expect("alice sent");
        let got = next_where(&mut ui, is_message("second")).await;
        let ClientEvent::Message(m) = got else { unreachable!() };
        assert_eq!((m.from.as_str(), m.outgoing, m.system), ("alice", false, false));
        // The second subscriber reads the same stream on its own.
        next_where(&mut bot, is_message("second")).await;

        // bob answers by conversation id, not by a name the CLI resolves.
        let id: ConversationId = m.conversation.parse().expect("conversation id");
        let reply = client.send_text(&id, "reply by id").await.expect("sent");
        assert_eq!(reply.text, "reply by id");
        assert!(client.history(&id).expect("history").iter().any(|h| h.text == "reply by id"));
        // An id this device does not have is refused, not guessed.
        let unknown = ConversationId([7; 16]);
        assert!(client.send_text(&unknown, "nowhere").await.is_err());

        // Offline: the server goes away; a message is stored as queued, and
        // when the handle is connected again on its own, it goes out and
        // the subscribers are told its new state.
        tokio::task::block_in_place(|| server.kill());
        next_where(&mut ui, |e| matches!(e, ClientEvent::Disconnected { .. })).await;
        let queued = client.send_text(&id, "while away").await.expect("queued, not an error");
        assert_eq!(queued.state, Some(MessageState::Queued));
        tokio::task::block_in_place(|| server.restart_with(&[]));
        let sent = next_where(&mut ui, |e| matches!(e, ClientEvent::MessageState(m) if m.id == queued.id)).await;
        let ClientEvent::MessageState(sent) = sent else { unreachable!() };
        assert_eq!(sent.state, Some(MessageState::Sent));
        running.abort();
    });
    let got = alice.receive_json(&[]);
    let got = texts(&got);
    assert!(got.contains(&"reply by id".to_string()) && got.contains(&"while away".to_string()), "{got:?}");
}

#[test]
fn groups_are_made_and_changed_by_id_and_members_see_typed_system_lines() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    // Each side has the other's keys pinned.
    alice.send("bob", "hi");
    alice.send("carol", "hi");
    bob.receive_json(&[]);
    carol.receive_json(&[]);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let id = rt.block_on(async {
        let client = Client::new(Subrosa::open(&alice.home(), PASS).expect("open alice"));
        let id = client.create_group("club", &["bob".to_string()]).await.expect("created");
        assert!(client.conversations().expect("list").iter().any(|r| r.id == id && r.kind == "group"));
        client.group_rename(&id, "night club").await.expect("renamed");
        assert_eq!(client.group_add(&id, "carol").await.expect("added"), None, "carol was never a member");
        let mut accounts: Vec<String> =
            client.members(&id).expect("members").iter().map(|m| m.address.handle.to_string()).collect();
        accounts.dedup();
        assert_eq!(accounts, ["alice", "bob", "carol"]);
        // Ids this device does not have are refused, never guessed.
        assert!(client.group_rename(&ConversationId([9; 16]), "x").await.is_err());
        id
    });
    let got = bob.receive_json(&[]);
    let line = got
        .iter()
        .find(|m| m["system"] == true && m["text"] == "alice renamed the group to night club")
        .unwrap_or_else(|| panic!("no rename line in {got:?}"));
    assert_eq!(line["conversation"], id.to_hex());
    assert_eq!(line["event"], serde_json::json!({"event": "renamed", "by": "alice", "name": "night club"}));
    let added = got.iter().find(|m| m["event"]["event"] == "added").expect("an added line");
    assert_eq!(added["event"], serde_json::json!({"event": "added", "by": "alice", "member": "carol"}));
    let got = carol.receive_json(&[]);
    assert!(
        got.iter()
            .any(|m| m["event"] == serde_json::json!({"event": "added_you", "by": "alice", "group": "night club"})),
        "{got:?}"
    );
}

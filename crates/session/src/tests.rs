//! The session's rules, driven without a server: two devices on in-memory
//! stores, a fixed clock, and envelopes built by hand as the server would
//! deliver them (or as a malicious one might).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use subrosa_core::content::{Body, Content};
use subrosa_core::{ConversationInfo, DeviceIdentity};
use subrosa_proto::{ConversationId, Envelope, MessageId, MessageKind, SendRequest, B64};

use crate::store::{MemberCheck, MessageState, Store, StoredMessage};
use crate::{
    ClientError, Clock, DirectoryAnswer, Outgoing, PendingMeta, Session, StagedChange, SystemEvent, UNSUPPORTED_TEXT,
};

/// A clock that says what the test sets.
#[derive(Debug, Default)]
struct TestClock(AtomicU64);

impl Clock for TestClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

struct Device {
    session: Session,
    clock: Arc<TestClock>,
}

fn device(handle: &str) -> Device {
    let crypto = subrosa_core::default_crypto();
    let identity = DeviceIdentity::generate(&crypto, handle.parse().expect("handle"), 1).expect("identity");
    let clock = Arc::new(TestClock(AtomicU64::new(1_000)));
    // The store stamps its rows with the same clock: nothing reads the
    // system's (a web page has none).
    let store = Store::new(crate::store::MemoryStore::with_clock(clock.clone()));
    let session = Session::new(crypto, identity, store, clock.clone());
    Device { session, clock }
}

impl Device {
    fn key_package(&self) -> Vec<u8> {
        self.session.store().write(|_| Ok(self.session.engine().generate_key_package()?)).expect("key package")
    }

    /// Starts a direct conversation with the owner of `kp`, as the server
    /// would have ordered it; returns it and the Welcome envelope.
    fn start_direct(&self, peer: &str, kp: Vec<u8>) -> (ConversationId, Envelope) {
        let engine = self.session.engine();
        let commit = self
            .session
            .store()
            .write(|tx| {
                let c = engine.create_conversation(&ConversationInfo::direct(), &[kp])?;
                engine.confirm_commit(&c.conversation)?;
                tx.add_conversation(&c.conversation, "direct", "", Some(peer))?;
                Ok(c)
            })
            .expect("create");
        let welcome = commit.welcome.expect("a welcome");
        (commit.conversation, self.envelope(commit.conversation, MessageKind::Welcome, welcome))
    }

    fn send(&self, conversation: ConversationId, seq: u64, body: Body) -> Envelope {
        // Unique per device: a sender's retry (same id) is shown once.
        let mut id = [seq as u8; 16];
        id[..8].copy_from_slice(&self.session.identity().device_id().0);
        let mut content = Content::text(MessageId(id), 500 + seq, "");
        content.body = body;
        let content = content.with_context(seq, None);
        let (ct, _) = self
            .session
            .store()
            .write(|_| Ok(self.session.engine().encrypt(&conversation, &content)?))
            .expect("encrypt");
        self.envelope(conversation, MessageKind::Application, ct)
    }

    fn text(&self, conversation: ConversationId, seq: u64, text: &str) -> Envelope {
        self.send(conversation, seq, Body::Text(text.into()))
    }

    fn envelope(&self, conversation: ConversationId, kind: MessageKind, ciphertext: Vec<u8>) -> Envelope {
        Envelope {
            id: 1,
            conversation,
            sender: self.session.identity().address(),
            kind,
            ciphertext: B64(ciphertext),
            server_time: 0,
            roster: None,
        }
    }

    fn receive(&self, env: &Envelope) {
        self.session.process_envelope(env).expect("processed");
    }

    fn unseen(&self) -> Vec<StoredMessage> {
        self.session.store().write(|tx| tx.take_unseen()).expect("unseen")
    }

    fn alerts(&self) -> Vec<String> {
        self.session.store().write(|tx| tx.take_alerts()).expect("alerts")
    }
}

fn texts(ms: &[StoredMessage]) -> Vec<&str> {
    ms.iter().map(|m| m.text.as_str()).collect()
}

/// Alice and bob in a direct conversation bob joined.
fn pair() -> (Device, Device, ConversationId) {
    let (alice, bob) = (device("alice"), device("bob"));
    let (id, welcome) = alice.start_direct("bob", bob.key_package());
    bob.receive(&welcome);
    (alice, bob, id)
}

#[test]
fn a_welcome_starts_the_conversation_and_messages_are_stored_with_the_clock_handed_in() {
    let (alice, bob, id) = pair();
    let row = bob.session.store().read(|tx| tx.conversation(&id)).expect("read").expect("stored");
    assert_eq!((row.kind.as_str(), row.peer.as_deref()), ("direct", Some("alice")));
    bob.clock.0.store(42_000, Ordering::SeqCst);
    bob.receive(&alice.text(id, 1, "hello"));
    let got = bob.unseen();
    assert_eq!(texts(&got), ["hello"]);
    assert_eq!((got[0].from.as_str(), got[0].sent_at, got[0].received_at), ("alice", 501, 42_000));
    assert!(!got[0].outgoing && !got[0].system);
    // The contact's identity key was pinned on first sight.
    let pinned = bob.session.store().read(|tx| tx.contact_key("alice")).expect("read");
    assert_eq!(pinned.as_deref(), Some(alice.session.identity().identity_public()));
}

#[test]
fn a_gap_and_a_late_message_become_system_lines() {
    let (alice, bob, id) = pair();
    let (one, two, three) = (alice.text(id, 1, "one"), alice.text(id, 2, "two"), alice.text(id, 3, "three"));
    bob.receive(&one);
    bob.receive(&three);
    bob.receive(&two);
    let got = bob.unseen();
    assert_eq!(
        texts(&got),
        [
            "one",
            "1 message from alice did not arrive: the server dropped or is withholding them",
            "three",
            "two",
            "the message above from alice arrived out of order",
        ]
    );
    assert_eq!(got.iter().map(|m| m.system).collect::<Vec<_>>(), [false, true, false, false, true]);
    // Each system line is stored as the typed event it says, for every
    // front end to render in its own words.
    let events: Vec<Option<SystemEvent>> = got.iter().map(|m| m.event.clone()).collect();
    assert_eq!(
        events,
        [
            None,
            Some(SystemEvent::Gap { from: "alice".into(), missing: 1 }),
            None,
            None,
            Some(SystemEvent::Late { from: "alice".into() }),
        ]
    );
}

#[test]
fn a_kind_from_a_newer_subrosa_is_unsupported_counts_in_the_sequence_and_raises_nothing() {
    let (alice, bob, id) = pair();
    bob.receive(&alice.text(id, 1, "before"));
    bob.receive(&alice.send(id, 2, Body::Unsupported { kind: 999, payload: vec![1, 2, 3] }));
    bob.receive(&alice.text(id, 3, "after"));
    assert_eq!(texts(&bob.unseen()), ["before", UNSUPPORTED_TEXT, "after"]);
    assert!(bob.alerts().is_empty());
    assert!(bob.session.take_dropped().is_empty());
}

#[test]
fn an_envelope_delivered_twice_is_stored_once() {
    let (alice, bob, id) = pair();
    let env = alice.text(id, 1, "once");
    bob.receive(&env);
    bob.receive(&env);
    assert_eq!(texts(&bob.unseen()), ["once"]);
    assert!(bob.session.take_dropped().is_empty());
}

#[test]
fn a_sender_the_server_misnames_is_dropped_and_nothing_is_stored() {
    let (alice, bob, id) = pair();
    let mallory = device("mallory");
    let mut env = alice.text(id, 1, "from alice");
    env.sender = mallory.session.identity().address();
    bob.receive(&env);
    assert!(bob.unseen().is_empty());
    let dropped = bob.session.take_dropped();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert!(dropped[0].from.starts_with("mallory/"), "{dropped:?}");
    // The misnamed copy does not mark the genuine delivery processed.
    env.sender = alice.session.identity().address();
    bob.receive(&env);
    assert_eq!(texts(&bob.unseen()), ["from alice"]);
    assert!(bob.session.take_dropped().is_empty());
    bob.receive(&alice.text(id, 2, "and on"));
    assert_eq!(texts(&bob.unseen()), ["and on"], "no gap");
}

#[test]
fn the_processed_digest_is_pinned() {
    let env = Envelope {
        id: 9,
        conversation: ConversationId([3; 16]),
        sender: "alice/0102030405060708".parse().expect("address"),
        kind: MessageKind::Application,
        ciphertext: B64(vec![1, 2, 3]),
        server_time: 0,
        roster: None,
    };
    assert_eq!(
        hex::encode(crate::envelope_digest(&env)),
        "d4ab508ce560b49e83a4aa3d113edc8a5844c04a0f686a33270cab16482479da",
        "a change of this digest makes every stored envelope look new: a visible decision"
    );
}

#[test]
fn an_invitation_to_a_known_conversation_is_a_takeover_and_is_refused_with_an_alert() {
    let (alice, bob, id) = pair();
    // Mallory read the conversation's id (the operator sees it on every
    // send) and invites bob to a group of her own under it.
    let mallory = device("mallory");
    let engine = mallory.session.engine();
    let welcome = mallory
        .session
        .store()
        .write(|_| {
            let c = engine.create_conversation_with_id(id, &ConversationInfo::direct(), &[bob.key_package()])?;
            Ok(c.welcome.expect("welcome"))
        })
        .expect("mallory's group");
    bob.clock.0.store(77_000, Ordering::SeqCst);
    bob.receive(&mallory.envelope(id, MessageKind::Welcome, welcome));
    let stamped = bob.session.store().read(|tx| tx.alerts()).expect("alerts");
    assert_eq!(stamped.iter().map(|a| a.at).collect::<Vec<_>>(), [77_000], "stamped by the clock handed in");
    let alerts = bob.alerts();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(alerts[0].contains("already knows or knew") && alerts[0].starts_with("mallory"), "{alerts:?}");
    // The conversation bob has is untouched: alice's messages still arrive,
    // and mallory's key was never pinned.
    bob.receive(&alice.text(id, 1, "still here"));
    assert!(texts(&bob.unseen()).contains(&"still here"));
    assert_eq!(bob.session.store().read(|tx| tx.contact_key("mallory")).expect("read"), None);
}

#[test]
fn a_queued_send_is_encrypted_once_and_a_refused_one_leaves_no_gap() {
    let (alice, bob, id) = pair();
    let to = Outgoing { conversation: id, target: "bob", group: false };
    let outbox = || alice.session.store().read(|tx| tx.outbox()).expect("outbox");
    let refused = alice.session.queue_text(&to, "refused", MessageId([1; 16]), [1; 16]).expect("queued");
    assert_eq!(refused.state, Some(MessageState::Queued));
    let q = outbox().remove(0);
    let (request, seq) = alice.session.prepare_queued(q.id, None).expect("prepared").expect("a request");
    assert_eq!(seq, Some(1));
    // Made once: a second flush posts the same bytes (the server stores it once).
    assert_eq!(alice.session.prepare_queued(q.id, None).expect("again"), Some((request, None)));
    alice.session.queued_refused(&q, seq, "refused by the server").expect("refused");
    let m = alice.session.store().read(|tx| tx.message(&id, &[1; 16])).expect("read").expect("kept");
    assert_eq!((m.state, m.reason.as_deref()), (Some(MessageState::Failed), Some("refused by the server")));

    // The next message takes the number the refused one gave back, so bob
    // is told of no gap for a message nobody got.
    alice.session.queue_text(&to, "second", MessageId([2; 16]), [2; 16]).expect("queued");
    let q = outbox().remove(0);
    let (request, seq) = alice.session.prepare_queued(q.id, None).expect("prepared").expect("a request");
    assert_eq!(seq, Some(1));
    let req: SendRequest = serde_json::from_slice(&request).expect("a send request");
    assert_eq!(req.parts[0].recipients, [bob.session.identity().address()]);
    bob.receive(&alice.envelope(id, MessageKind::Application, req.parts[0].ciphertext.0.clone()));
    assert_eq!(texts(&bob.unseen()), ["second"]);
    alice.session.queued_sent(&q).expect("sent");
    assert!(outbox().is_empty());
    let m = alice.session.store().read(|tx| tx.message(&id, &[2; 16])).expect("read").expect("kept");
    assert_eq!(m.state, Some(MessageState::Sent));
}

/// Several queued sends are encrypted in one batch, their group written
/// once; and what that batch returns is durable: a device that stops right
/// after it (a crash, before anything else is written) and starts again
/// from its store never encrypts under a key the batch already used, so
/// every message still reads at bob's.
#[test]
fn a_batch_of_queued_sends_is_durable_before_any_of_it_leaves() {
    let (alice, bob, id) = pair();
    let to = Outgoing { conversation: id, target: "bob", group: false };
    for i in 1..=3u8 {
        alice.session.queue_text(&to, &format!("batched {i}"), MessageId([i; 16]), [i; 16]).expect("queued");
    }
    let made = alice.session.prepare_all_queued(None).expect("prepared");
    assert_eq!(made.iter().map(|(_, seq)| *seq).collect::<Vec<_>>(), [Some(1), Some(2), Some(3)]);
    let requests: Vec<Vec<u8>> = alice
        .session
        .store()
        .read(|tx| tx.outbox())
        .expect("outbox")
        .into_iter()
        .map(|q| q.request.expect("made in the batch"))
        .collect();
    assert_eq!(requests.len(), 3);

    // The crash: nothing of this process is kept but its store.
    let restarted = Session::new(
        subrosa_core::default_crypto(),
        (*alice.session.identity()).clone(),
        alice.session.store().clone(),
        alice.clock.clone(),
    );
    restarted.queue_text(&to, "after the restart", MessageId([9; 16]), [9; 16]).expect("queued");
    let q = restarted.store().read(|tx| tx.outbox()).expect("outbox").pop().expect("queued");
    let (last, _) = restarted.prepare_queued(q.id, None).expect("prepared").expect("a request");
    for request in requests.iter().chain([&last]) {
        let req: SendRequest = serde_json::from_slice(request).expect("a send request");
        bob.receive(&alice.envelope(id, MessageKind::Application, req.parts[0].ciphertext.0.clone()));
    }
    assert_eq!(texts(&bob.unseen()), ["batched 1", "batched 2", "batched 3", "after the restart"]);
}

#[test]
fn a_body_without_a_line_is_queued_and_sent_like_a_text_and_stores_no_line_for_its_sender() {
    let (alice, bob, id) = pair();
    let to = Outgoing { conversation: id, target: "bob", group: false };
    let body = Body::Unsupported { kind: 0x7f02, payload: vec![1, 2] };
    let none = alice.session.queue_body(&to, &body, MessageId([3; 16]), [3; 16], None).expect("queued");
    assert!(none.is_none(), "no history line was asked for");
    assert_eq!(alice.session.store().read(|tx| tx.message(&id, &[3; 16])).expect("read"), None);
    let q = alice.session.store().read(|tx| tx.outbox()).expect("outbox").remove(0);
    assert_eq!(q.message, Some((id, [3; 16])), "the outbox row names the message");
    let (request, seq) = alice.session.prepare_queued(q.id, None).expect("prepared").expect("a request");
    assert_eq!(seq, Some(1), "numbered in the sender's sequence like a text");
    let req: SendRequest = serde_json::from_slice(&request).expect("a send request");
    bob.receive(&alice.envelope(id, MessageKind::Application, req.parts[0].ciphertext.0.clone()));
    // This build knows no such kind: bob's copy says so, with no gap.
    assert_eq!(texts(&bob.unseen()), [UNSUPPORTED_TEXT]);
    alice.session.queued_sent(&q).expect("sent");
    // A shown body stores its line, queued.
    let shown = alice.session.queue_body(&to, &body, MessageId([4; 16]), [4; 16], Some("a line")).expect("queued");
    assert_eq!(shown.map(|m| (m.text, m.state)), Some(("a line".to_string(), Some(MessageState::Queued))));
    assert!(alice.session.store().read(|tx| tx.message(&id, &[4; 16])).expect("read").is_some());
}

impl Device {
    /// Stages and confirms a commit made by `f`, as the server would have
    /// ordered it; returns the commit's envelope and its Welcome's, if any.
    fn commit(
        &self,
        f: impl FnOnce(&crate::SessionEngine) -> Result<subrosa_core::OutgoingCommit, subrosa_core::CoreError>,
    ) -> (Envelope, Option<Envelope>) {
        let engine = self.session.engine();
        let c = self
            .session
            .store()
            .write(|_| {
                let c = f(engine)?;
                engine.confirm_commit(&c.conversation)?;
                Ok(c)
            })
            .expect("commit");
        let welcome = c.welcome.map(|w| self.envelope(c.conversation, MessageKind::Welcome, w));
        (self.envelope(c.conversation, MessageKind::Commit, c.commit), welcome)
    }
}

fn events(ms: &[StoredMessage]) -> Vec<SystemEvent> {
    ms.iter().filter_map(|m| m.event.clone()).collect()
}

#[test]
fn membership_changes_in_a_group_are_stored_as_typed_events() {
    let (alice, bob, carol) = (device("alice"), device("bob"), device("carol"));
    let club = ConversationInfo { kind: subrosa_core::ConversationKind::Group, name: "club".into() };
    let (welcome, id) = {
        let engine = alice.session.engine();
        let kp = bob.key_package();
        let c = alice
            .session
            .store()
            .write(|tx| {
                let c = engine.create_conversation(&club, &[kp])?;
                engine.confirm_commit(&c.conversation)?;
                tx.add_conversation(&c.conversation, "group", "club", None)?;
                Ok(c)
            })
            .expect("create");
        (alice.envelope(c.conversation, MessageKind::Welcome, c.welcome.expect("welcome")), c.conversation)
    };
    bob.receive(&welcome);
    let kp = carol.key_package();
    let (add, _) = alice.commit(|e| e.add_members(&id, &[kp]));
    bob.receive(&add);
    let renamed = ConversationInfo { name: "night club".into(), ..club };
    let (rename, _) = alice.commit(|e| e.rename(&id, &renamed));
    bob.receive(&rename);
    let carol_device = carol.session.identity().address();
    let (remove, _) = alice.commit(|e| e.remove_members(&id, std::slice::from_ref(&carol_device)));
    bob.receive(&remove);
    let got = bob.unseen();
    assert_eq!(
        events(&got),
        [
            SystemEvent::AddedYou { by: "alice".into(), group: "club".into() },
            SystemEvent::Added { by: "alice".into(), member: "carol".into() },
            SystemEvent::Renamed { by: "alice".into(), name: "night club".into() },
            SystemEvent::Removed { by: "alice".into(), member: "carol".into() },
        ]
    );
    assert_eq!(
        texts(&got),
        [
            "alice added you to club",
            "alice added carol",
            "alice renamed the group to night club",
            "alice removed carol"
        ]
    );
    let row = bob.session.store().read(|tx| tx.conversation(&id)).expect("read").expect("row");
    assert_eq!((row.name.as_str(), row.active), ("night club", true));
}

#[test]
fn a_direct_conversation_that_grows_a_third_account_is_closed_with_an_alert() {
    let (alice, bob, id) = pair();
    let mallory = device("mallory");
    let kp = mallory.key_package();
    let (add, _) = alice.commit(|e| e.add_members(&id, &[kp]));
    bob.receive(&add);
    let row = bob.session.store().read(|tx| tx.conversation(&id)).expect("read").expect("row");
    assert!(!row.active, "closed on this device");
    let alerts = bob.alerts();
    assert!(alerts.iter().any(|a| a.contains("holds exactly two accounts")), "{alerts:?}");
    assert!(events(&bob.unseen()).iter().any(|e| matches!(e, SystemEvent::Warning { .. })));
}

fn answer_for(d: &Device) -> DirectoryAnswer {
    let id = d.session.identity();
    DirectoryAnswer::Keys {
        identity_key: id.identity_public().to_vec(),
        devices: vec![(id.device_id().to_hex(), id.device_public().to_vec())],
    }
}

fn unchecked(d: &Device) -> Vec<MemberCheck> {
    d.session.store().read(|tx| tx.member_checks(None, crate::UNCHECKED)).expect("checks")
}

#[test]
fn member_devices_wait_for_the_directory_and_what_it_contradicts_is_refused_or_flagged() {
    // A Welcome whose inviter the directory contradicts: refused after all.
    let (alice, bob) = (device("alice"), device("bob"));
    let (id, welcome) = alice.start_direct("bob", bob.key_package());
    bob.receive(&welcome);
    let queued = unchecked(&bob);
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert!(queued[0].welcome && queued[0].handle == "alice");
    let verdict = bob
        .session
        .member_verdict(&queued[0], &DirectoryAnswer::Contradicts("no such account".into()))
        .expect("verdict");
    bob.session.settle_member_check(&queued[0], verdict).expect("settled");
    assert_eq!(bob.session.store().read(|tx| tx.conversation(&id)).expect("read"), None, "refused");
    assert!(bob.alerts().iter().any(|a| a.contains("refused the invitation from alice")));

    // Confirmed: pinned and no longer queued.
    let (alice, bob, id) = pair();
    let queued = unchecked(&bob);
    let verdict = bob.session.member_verdict(&queued[0], &answer_for(&alice)).expect("verdict");
    assert_eq!(verdict, None);
    bob.session.settle_member_check(&queued[0], verdict).expect("settled");
    assert!(unchecked(&bob).is_empty());
    assert!(bob.session.check_members_accepted(&id, "alice").is_ok());

    // A device added by a commit that the directory does not list: the
    // commit stays applied, the device is flagged and sending waits.
    let carol = device("carol");
    let club = ConversationInfo { kind: subrosa_core::ConversationKind::Group, name: "club".into() };
    let engine = alice.session.engine();
    let kp = bob.key_package();
    let c = alice
        .session
        .store()
        .write(|_| {
            let c = engine.create_conversation(&club, &[kp])?;
            engine.confirm_commit(&c.conversation)?;
            Ok(c)
        })
        .expect("group");
    let group = c.conversation;
    bob.receive(&alice.envelope(group, MessageKind::Welcome, c.welcome.expect("welcome")));
    for q in unchecked(&bob) {
        let v = bob.session.member_verdict(&q, &answer_for(&alice)).expect("verdict");
        bob.session.settle_member_check(&q, v).expect("settled");
    }
    let kp = carol.key_package();
    let (add, _) = alice.commit(|e| e.add_members(&group, &[kp]));
    bob.receive(&add);
    let queued = unchecked(&bob);
    assert_eq!(queued.len(), 1);
    assert!(!queued[0].welcome && queued[0].handle == "carol");
    let not_listed =
        DirectoryAnswer::Keys { identity_key: carol.session.identity().identity_public().to_vec(), devices: vec![] };
    let verdict = bob.session.member_verdict(&queued[0], &not_listed).expect("verdict");
    assert_eq!(verdict.as_deref(), Some("the directory does not list this device of carol"));
    bob.session.settle_member_check(&queued[0], verdict).expect("settled");
    assert!(matches!(
        bob.session.check_members_accepted(&group, "club"),
        Err(ClientError::DeviceNotAccepted { ref handle, .. }) if handle == "carol"
    ));
    assert!(events(&bob.unseen())
        .iter()
        .any(|e| matches!(e, SystemEvent::DeviceNotConfirmed { member, .. } if member == "carol")));
    assert_eq!(bob.session.engine().members(&group).expect("members").len(), 3, "the commit stays applied");
}

#[test]
fn a_pinned_key_moves_only_with_a_device_the_pinned_key_certified() {
    let crypto = subrosa_core::default_crypto();
    let (alice, bob, mallory) = (device("alice"), device("bob"), device("mallory"));
    let club = ConversationInfo { kind: subrosa_core::ConversationKind::Group, name: "club".into() };
    let engine = alice.session.engine();
    let kps = [bob.key_package(), mallory.key_package()];
    let c = alice
        .session
        .store()
        .write(|tx| {
            let c = engine.create_conversation(&club, &kps)?;
            engine.confirm_commit(&c.conversation)?;
            tx.add_conversation(&c.conversation, "group", "club", None)?;
            Ok(c)
        })
        .expect("group");
    let group = c.conversation;
    let welcome = alice.envelope(group, MessageKind::Welcome, c.welcome.expect("welcome"));
    bob.receive(&welcome);
    mallory.receive(&welcome);
    // bob pins alice's key on her first message.
    bob.receive(&alice.text(group, 1, "hello"));
    let pinned = || bob.session.store().read(|tx| tx.contact_key("alice")).expect("read");
    let real_key = alice.session.identity().identity_public().to_vec();
    assert_eq!(pinned(), Some(real_key.clone()));

    // mallory adds a device she made up for "alice", certified by a key of
    // her own: flagged, and alice's pin stays.
    let fake = device("alice");
    let (add, fake_welcome) = mallory.commit(|e| e.add_members(&group, &[fake.key_package()]));
    bob.receive(&add);
    alice.receive(&add);
    assert_eq!(pinned(), Some(real_key.clone()));
    // The made-up device then "rotates" its account's key: the pin must
    // not follow a device it never certified.
    // (mallory runs it with a bare engine: a session would refuse a group
    // where alice's real device carries another key.)
    let fake_welcome = fake_welcome.expect("welcome for the fake device");
    fake.session
        .store()
        .write(|_| Ok(fake.session.engine().join(fake_welcome.ciphertext.as_slice())?))
        .expect("the fake device joins");
    let rotated = fake.session.identity().with_new_identity_key(&crypto, 2).expect("rotated");
    let (update, _) = fake.commit(|e| e.update_credential(&group, &rotated));
    bob.receive(&update);
    alice.receive(&update);
    assert_eq!(pinned(), Some(real_key), "the pin did not follow the made-up device");
    let flagged = bob.session.store().read(|tx| tx.member_checks(Some(&group), crate::CONTRADICTED)).expect("checks");
    assert!(flagged.iter().any(|c| c.device == fake.session.identity().device_id().to_hex()), "{flagged:?}");
    bob.unseen();

    // alice's own rotation, by her device the pinned key certified, moves
    // it, once the key directory lists the new key.
    let real = alice.session.identity().with_new_identity_key(&crypto, 3).expect("rotated");
    let (update, _) = alice.commit(|e| e.update_credential(&group, &real));
    bob.receive(&update);
    assert_eq!(pinned(), Some(alice.session.identity().identity_public().to_vec()), "not before the directory");
    let queued: Vec<MemberCheck> = unchecked(&bob).into_iter().filter(|c| c.handle == "alice").collect();
    assert_eq!(queued.len(), 1, "{queued:?}");
    let listed = DirectoryAnswer::Keys {
        identity_key: real.identity_public().to_vec(),
        devices: vec![(real.device_id().to_hex(), real.device_public().to_vec())],
    };
    let verdict = bob.session.member_verdict(&queued[0], &listed).expect("verdict");
    bob.session.settle_member_check(&queued[0], verdict).expect("settled");
    assert_eq!(pinned(), Some(real.identity_public().to_vec()));
    assert!(events(&bob.unseen()).contains(&SystemEvent::KeyChanged { member: "alice".into() }));
}

/// A second device of `of`'s account: its own device id and signature key,
/// certified by the account's identity key.
fn linked(of: &Device) -> Device {
    let crypto = subrosa_core::default_crypto();
    let fresh = device(of.session.handle().as_str());
    let me = fresh.session.identity();
    let key = mls_rs_core::crypto::SignaturePublicKey::new(me.device_public().to_vec());
    let cert = of.session.identity().certify(&crypto, me.device_id(), &key, 1).expect("certify");
    let owner = of.session.identity();
    let identity = me
        .adopt_identity_key(
            &crypto,
            owner.identity_public(),
            &owner.identity_secret_bytes(),
            &cert.to_bytes().expect("cert"),
        )
        .expect("adopt");
    let session = Session::new(crypto, identity, fresh.session.store().clone(), fresh.clock.clone());
    Device { session, clock: fresh.clock }
}

/// A group of `members`' devices made by the first, joined by the rest,
/// with bob's checks of the members confirmed by the directory.
fn group_of(members: &[&Device], answers: &[DirectoryAnswer]) -> ConversationId {
    let club = ConversationInfo { kind: subrosa_core::ConversationKind::Group, name: "club".into() };
    let (first, rest) = members.split_first().expect("members");
    let kps: Vec<Vec<u8>> = rest.iter().map(|d| d.key_package()).collect();
    let engine = first.session.engine();
    let c = first
        .session
        .store()
        .write(|tx| {
            let c = engine.create_conversation(&club, &kps)?;
            engine.confirm_commit(&c.conversation)?;
            tx.add_conversation(&c.conversation, "group", "club", None)?;
            Ok(c)
        })
        .expect("group");
    let welcome = first.envelope(c.conversation, MessageKind::Welcome, c.welcome.expect("welcome"));
    for d in rest {
        d.receive(&welcome);
        settle_all(d, answers);
        // An invitation from someone not yet a contact is a request; the
        // tests after this one take it as accepted.
        let stranger = d.session.handle() != first.session.handle();
        assert_eq!(
            d.session.is_request(&c.conversation).expect("read"),
            stranger,
            "a stranger's invitation is a request"
        );
        d.session.accept(&c.conversation).expect("accept");
    }
    c.conversation
}

/// Settles every queued check of `d` with the answer for its account.
fn settle_all(d: &Device, answers: &[DirectoryAnswer]) {
    for q in unchecked(d) {
        let answer = answers
            .iter()
            .find(
                |a| matches!(a, DirectoryAnswer::Keys { devices, .. } if devices.iter().any(|(id, _)| *id == q.device)),
            )
            .cloned()
            .unwrap_or_else(|| DirectoryAnswer::Contradicts("not in this test's directory".into()));
        let v = d.session.member_verdict(&q, &answer).expect("verdict");
        d.session.settle_member_check(&q, v).expect("settled");
    }
}

fn account(devices: &[&DeviceIdentity]) -> DirectoryAnswer {
    DirectoryAnswer::Keys {
        identity_key: devices[0].identity_public().to_vec(),
        devices: devices.iter().map(|d| (d.device_id().to_hex(), d.device_public().to_vec())).collect(),
    }
}

#[test]
fn a_revoked_device_cannot_move_a_pin_with_a_key_of_its_own_and_the_other_devices_are_heard_during_a_rotation() {
    let crypto = subrosa_core::default_crypto();
    let (alice, bob) = (device("alice"), device("bob"));
    let (alice2, stolen) = (linked(&alice), linked(&alice));
    let old_alice = account(&[&alice.session.identity(), &alice2.session.identity(), &stolen.session.identity()]);
    let group = group_of(&[&alice, &alice2, &stolen, &bob], &[old_alice.clone(), answer_for(&bob)]);
    bob.receive(&alice.text(group, 1, "hello"));
    let pinned = || bob.session.store().read(|tx| tx.contact_key("alice")).expect("read");
    let old_key = alice.session.identity().identity_public().to_vec();
    assert_eq!(pinned(), Some(old_key.clone()));
    bob.unseen();

    // alice revoked `stolen` and rotated; its removal has not reached the
    // group yet. It certifies a key of its own making with the old key
    // (which it holds) and commits it: the pin stays until the directory
    // answers, and the directory lists alice's real new key.
    let real = alice.session.identity().with_new_identity_key(&crypto, 2).expect("rotated");
    let evil = stolen.session.identity().with_new_identity_key(&crypto, 2).expect("evil");
    let (update, _) = stolen.commit(|e| e.update_credential(&group, &evil));
    for d in [&bob, &alice, &alice2] {
        d.receive(&update);
    }
    assert_eq!(pinned(), Some(old_key.clone()), "a certification by the pinned key alone moves nothing");
    let real_cert = real
        .certify(
            &crypto,
            alice2.session.identity().device_id(),
            &mls_rs_core::crypto::SignaturePublicKey::new(alice2.session.identity().device_public().to_vec()),
            2,
        )
        .expect("certify");
    let new_alice = DirectoryAnswer::Keys {
        identity_key: real.identity_public().to_vec(),
        devices: vec![
            (real.device_id().to_hex(), real.device_public().to_vec()),
            (alice2.session.identity().device_id().to_hex(), real_cert.device_key().to_vec()),
        ],
    };
    settle_all(&bob, std::slice::from_ref(&new_alice));
    assert_eq!(pinned(), Some(old_key.clone()), "the pin did not follow the revoked device's key");
    let flagged = bob.session.store().read(|tx| tx.member_checks(Some(&group), crate::CONTRADICTED)).expect("checks");
    assert!(flagged.iter().any(|c| c.device == stolen.session.identity().device_id().to_hex()), "{flagged:?}");
    assert!(!events(&bob.unseen()).contains(&SystemEvent::KeyChanged { member: "alice".into() }));
    // What it sends under its own key is dropped.
    bob.receive(&stolen.text(group, 1, "send money"));
    assert!(texts(&bob.unseen()).iter().all(|t| !t.contains("send money")));
    assert_eq!(bob.session.take_dropped().len(), 1);

    // alice's real rotation moves the pin once the directory lists it.
    let (update, _) = alice.commit(|e| e.update_credential(&group, &real));
    for d in [&bob, &alice2, &stolen] {
        d.receive(&update);
    }
    // Before the directory answered, what she sends under the new key is
    // read (her device waits for the directory like an added one).
    let alice = Device {
        session: Session::new(crypto.clone(), real.clone(), alice.session.store().clone(), alice.clock.clone()),
        clock: alice.clock.clone(),
    };
    bob.receive(&alice.text(group, 2, "new key"));
    assert_eq!(texts(&bob.unseen()), ["new key"]);
    assert!(bob.session.take_dropped().is_empty());
    settle_all(&bob, &[new_alice]);
    assert_eq!(pinned(), Some(real.identity_public().to_vec()));
    assert!(events(&bob.unseen()).contains(&SystemEvent::KeyChanged { member: "alice".into() }));

    // alice2 has not adopted the new key yet: what it sends meanwhile under
    // the previous one is read, not dropped, and so is an update of its
    // leaf that keeps that key.
    bob.receive(&alice2.text(group, 1, "still me"));
    assert_eq!(texts(&bob.unseen()), ["still me"]);
    assert!(bob.session.take_dropped().is_empty());
    // A new signature key under the previous identity key (`devices
    // rekey` before adopting): an ordinary update, not a flagged device.
    let rekeyed = alice2.session.identity().with_new_device_key(&crypto, 3).expect("rekey");
    let (refresh, _) = alice2.commit(|e| e.update_credential(&group, &rekeyed));
    for d in [&bob, &stolen] {
        d.receive(&refresh);
    }
    let alice2 = Device {
        session: Session::new(crypto.clone(), rekeyed, alice2.session.store().clone(), alice2.clock.clone()),
        clock: alice2.clock.clone(),
    };
    let flagged = bob.session.store().read(|tx| tx.member_checks(Some(&group), crate::CONTRADICTED)).expect("checks");
    assert!(!flagged.iter().any(|c| c.device == alice2.session.identity().device_id().to_hex()), "{flagged:?}");
    bob.receive(&alice2.text(group, 2, "and again"));
    assert_eq!(texts(&bob.unseen()), ["and again"]);

    // The flagged device gets no such tolerance, even under the old key.
    // (Its leaf carries the evil key; a device added now with the previous
    // key is flagged like any device its pin does not certify.)
    let (add, _) = stolen.commit(|e| e.add_members(&group, &[linked(&alice2).key_package()]));
    bob.receive(&add);
    let flagged = bob.session.store().read(|tx| tx.member_checks(Some(&group), crate::CONTRADICTED)).expect("checks");
    assert_eq!(flagged.iter().filter(|c| c.handle == "alice").count(), 2, "{flagged:?}");
}

#[test]
fn this_accounts_other_devices_are_heard_under_the_previous_key_after_an_adoption() {
    let crypto = subrosa_core::default_crypto();
    let (alice, bob) = (device("alice"), device("bob"));
    let alice2 = linked(&alice);
    let answers = [account(&[&alice.session.identity(), &alice2.session.identity()]), answer_for(&bob)];
    let group = group_of(&[&bob, &alice, &alice2], &answers);
    // alice adopts a new key (as `finish_key_switch` does: the new identity,
    // and the previous public key remembered); alice2 has not yet.
    let old_key = alice.session.identity().identity_public().to_vec();
    let adopted = alice.session.identity().with_new_identity_key(&crypto, 2).expect("rotated");
    let store = alice.session.store().clone();
    store.write(|tx| tx.set_meta(crate::META_PREVIOUS_IDENTITY_KEY, &old_key)).expect("meta");
    let alice =
        Device { session: Session::new(crypto.clone(), adopted, store, alice.clock.clone()), clock: alice.clock };
    alice.unseen();
    alice.receive(&alice2.text(group, 1, "from my other device"));
    assert_eq!(texts(&alice.unseen()), ["from my other device"]);
    assert!(alice.session.take_dropped().is_empty());
    // Without the remembered key it would be dropped.
    alice.session.store().write(|tx| tx.delete_meta(crate::META_PREVIOUS_IDENTITY_KEY)).expect("meta");
    alice.receive(&alice2.text(group, 2, "again"));
    assert_eq!(alice.session.take_dropped().len(), 1);
}

#[test]
fn a_batch_keeps_group_state_in_memory_and_writes_it_once_it_holds() {
    let (alice, bob, id) = pair();
    let envs: Vec<Envelope> = (1..=5).map(|i| alice.text(id, i, &format!("m{i}"))).collect();
    let state = || bob.session.store().read(|tx| tx.group_state(&id.0)).expect("read").expect("state").to_vec();
    let before = state();
    bob.session.process_batch(&envs).expect("batch");
    assert_eq!(texts(&bob.unseen()), ["m1", "m2", "m3", "m4", "m5"]);
    // The ratchet moved on in the store (the used keys are gone from it).
    assert_ne!(state(), before, "the batch wrote the group's state");
    // What the batch kept in memory was written: a new session over the
    // same store (a restart) reads the next message.
    let restarted = Session::new(
        subrosa_core::default_crypto(),
        (*bob.session.identity()).clone(),
        bob.session.store().clone(),
        bob.clock.clone(),
    );
    restarted.process_envelope(&alice.text(id, 6, "m6")).expect("processed");
    assert!(restarted.take_dropped().is_empty());
    let after: Vec<String> =
        restarted.store().write(|tx| tx.take_unseen()).expect("unseen").into_iter().map(|m| m.text).collect();
    assert_eq!(after, ["m6"]);
}

#[test]
fn a_bad_envelope_in_a_batch_drops_alone_and_the_group_stays_readable() {
    let (alice, bob, id) = pair();
    let mut envs: Vec<Envelope> = (1..=5).map(|i| alice.text(id, i, &format!("m{i}"))).collect();
    // The server tampers with the third.
    let mut ct = envs[2].ciphertext.0.clone();
    let last = ct.len() - 1;
    ct[last] ^= 1;
    envs[2].ciphertext = B64(ct);
    bob.session.process_batch(&envs).expect("batch");
    assert_eq!(
        texts(&bob.unseen()),
        ["m1", "m2", "1 message from alice did not arrive: the server dropped or is withholding them", "m4", "m5"]
    );
    assert_eq!(bob.session.take_dropped().len(), 1);
    // The group state is where the four good messages left it.
    bob.receive(&alice.text(id, 6, "m6"));
    assert_eq!(texts(&bob.unseen()), ["m6"]);
    assert!(bob.session.take_dropped().is_empty());
}

#[test]
fn a_staged_commit_is_stored_with_its_request_and_skips_what_is_already_true() {
    let (alice, bob, id) = pair();
    // Adding a device that is already a member stages nothing.
    let bob_kp = B64(bob.key_package());
    let again = alice.session.stage_change(&id, &StagedChange::Add { key_packages: vec![bob_kp] }).expect("staged");
    assert!(again.is_none());
    // Removing a revoked device: the commit goes to the others, not to it.
    let bob_device = bob.session.identity().address();
    let change = StagedChange::Remove { devices: vec![bob_device.clone()], notify: false };
    let meta = PendingMeta { change: change.clone(), line: None };
    let pending = alice
        .session
        .store()
        .write(|tx| {
            let out = alice.session.stage_change(&id, &change)?.expect("a commit");
            alice.session.store_pending(tx, &out, &meta)
        })
        .expect("stored");
    let stored = alice.session.store().read(|tx| tx.pending_commit(&id)).expect("read").expect("pending");
    assert_eq!(stored.request, pending.request, "the request is stored before it is posted");
    let req: SendRequest = serde_json::from_slice(&pending.request).expect("a send request");
    let guard = req.commit.expect("an epoch guard");
    assert_eq!(guard.members, Some(vec![alice.session.identity().address()]));
    assert!(req.parts.iter().all(|p| !p.recipients.contains(&bob_device)), "the removed device is not told");
    assert_eq!(PendingMeta::decode(&stored.meta).expect("meta"), meta);
}

#[test]
fn a_leave_seen_by_a_batch_applied_twice_is_queued_once() {
    let (alice, bob, carol) = (device("alice"), device("bob"), device("carol"));
    let club = ConversationInfo { kind: subrosa_core::ConversationKind::Group, name: "club".into() };
    let engine = alice.session.engine();
    let kps = [bob.key_package(), carol.key_package()];
    let c = alice
        .session
        .store()
        .write(|tx| {
            let c = engine.create_conversation(&club, &kps)?;
            engine.confirm_commit(&c.conversation)?;
            tx.add_conversation(&c.conversation, "group", "club", None)?;
            Ok(c)
        })
        .expect("group");
    let group = c.conversation;
    let welcome = alice.envelope(group, MessageKind::Welcome, c.welcome.expect("welcome"));
    bob.receive(&welcome);
    carol.receive(&welcome);
    let (leave, _) = carol
        .session
        .store()
        .write(|_| Ok(carol.session.engine().propose_leave(&group)?))
        .expect("carol proposes to leave");
    let leave = carol.envelope(group, MessageKind::Commit, leave);
    // A tampered message after it makes the batch's first attempt fail,
    // so the batch is applied a second time, envelope by envelope.
    let mut bad = alice.text(group, 1, "tampered");
    let mut ct = bad.ciphertext.0.clone();
    let last = ct.len() - 1;
    ct[last] ^= 1;
    bad.ciphertext = B64(ct);
    bob.session.process_batch(&[leave, bad]).expect("batch");
    assert_eq!(bob.session.take_dropped().len(), 1);
    let queued = bob.session.next_leave_to_commit().expect("the leave is queued");
    assert_eq!(queued, (group, carol.session.identity().address()));
    assert_eq!(bob.session.next_leave_to_commit(), None, "and only once");
}

/// A key directory's head signer, as the server holds it.
struct Signer {
    secret: mls_rs_core::crypto::SignatureSecretKey,
    key: crate::directory::HeadKey,
}

impl Signer {
    fn new() -> Self {
        use mls_rs_core::crypto::{CipherSuiteProvider, CryptoProvider};
        let cs = subrosa_core::default_crypto()
            .cipher_suite_provider(mls_rs_core::crypto::CipherSuite::CURVE25519_AES128)
            .expect("ed25519");
        let (secret, public) = cs.signature_key_generate().expect("key");
        let key =
            crate::directory::HeadKey { key: public.as_bytes().try_into().expect("32 bytes"), directory_id: [7; 16] };
        Signer { secret, key }
    }

    fn head(&self, epoch: u64, root: u8) -> Vec<u8> {
        use mls_rs_core::crypto::{CipherSuiteProvider, CryptoProvider};
        let cs = subrosa_core::default_crypto()
            .cipher_suite_provider(mls_rs_core::crypto::CipherSuite::CURVE25519_AES128)
            .expect("ed25519");
        let mut h = subrosa_proto::kt::SignedHead {
            directory_id: self.key.directory_id,
            epoch,
            root: [root; 32],
            vrf_public_key: [1; 32],
            signed_at_ms: 5,
            signature: [0; 64],
        };
        h.signature = cs.sign(&self.secret, &h.to_be_signed()).expect("sign").try_into().expect("64 bytes");
        h.encode()
    }
}

fn decode(bytes: &[u8]) -> subrosa_proto::kt::SignedHead {
    subrosa_proto::kt::SignedHead::decode(bytes).expect("head")
}

#[test]
fn the_directory_chain_takes_one_root_per_epoch_and_two_signed_heads_prove_a_fork() {
    use crate::directory::ChainStep;
    let bob = device("bob");
    let s = &bob.session;
    let server = Signer::new();
    s.pin_head_key(&server.key).expect("pin");
    // The first head is trusted on first use and kept; again, nothing new.
    let h1 = server.head(1, 0xa1);
    assert_eq!(s.kt_server_head(&decode(&h1), &h1).expect("first"), ChainStep::Done);
    assert_eq!(s.kt_server_head(&decode(&h1), &h1).expect("again"), ChainStep::Done);
    assert!(s.kt_blocked().is_ok());
    // A later epoch must be joined by append-only proofs from the chain's end.
    let h4 = server.head(4, 0xa4);
    assert_eq!(s.kt_server_head(&decode(&h4), &h4).expect("later"), ChainStep::Audit { start: 1, end: 4 });
    let not_joined = [[0xb1; 32], [2; 32], [3; 32], [0xa4; 32]];
    assert!(matches!(s.kt_extend_chain(4, &[0xa4; 32], 1, &not_joined), Err(ClientError::KeyMismatch { .. })));
    let not_reaching = [[0xa1; 32], [2; 32], [3; 32], [0xb4; 32]];
    assert!(matches!(s.kt_extend_chain(4, &[0xa4; 32], 1, &not_reaching), Err(ClientError::KeyMismatch { .. })));
    s.kt_extend_chain(4, &[0xa4; 32], 1, &[[0xa1; 32], [2; 32], [3; 32], [0xa4; 32]]).expect("joined");
    s.kt_keep_head(4, &h4).expect("kept");
    // A known epoch with another root is refused.
    assert!(matches!(s.kt_chain_step(2, &[9; 32]), Err(ClientError::KeyMismatch { .. })));
    assert_eq!(s.kt_chain_step(3, &[3; 32]).expect("known"), ChainStep::Done);

    // The server signs a second head for epoch 4 with another root: proven,
    // recorded with its proof, and sending is blocked until cleared.
    let other4 = server.head(4, 0xc4);
    assert!(matches!(s.kt_server_head(&decode(&other4), &other4), Err(ClientError::DirectoryFork(_))));
    assert!(matches!(s.kt_blocked(), Err(ClientError::DirectoryFork(_))));
    let alerts = s.store().read(|tx| tx.alerts()).expect("alerts");
    let proof: crate::directory::ForkProof =
        serde_json::from_str(alerts.iter().find_map(|a| a.proof.as_deref()).expect("a proof")).expect("json");
    proof.verify(s.engine().crypto()).expect("the proof proves it");
    let mut forged = proof.clone();
    forged.heads[1] = forged.heads[0].clone();
    assert!(forged.verify(s.engine().crypto()).is_err(), "two equal heads prove nothing");
    s.store().write(|tx| tx.clear_alerts(true)).expect("cleared");
    assert!(s.kt_blocked().is_ok());
}

#[test]
fn a_gossiped_head_is_evidence_the_member_is_blamed_for_a_bad_one_and_the_server_for_a_refusal() {
    use crate::directory::{ChainStep, GossipStep, ServerHeadAnswer, THE_SERVER};
    let bob = device("bob");
    let s = &bob.session;
    let server = Signer::new();
    s.pin_head_key(&server.key).expect("pin");
    let h1 = server.head(1, 0xa1);
    s.kt_server_head(&decode(&h1), &h1).expect("first");
    let concerns = || -> Vec<String> {
        s.store().read(|tx| tx.alerts()).expect("alerts").into_iter().filter_map(|a| a.concerns).collect()
    };

    // Not signed by the directory: carol's fault, not the server's.
    let forger = Signer { key: server.key, ..Signer::new() };
    assert_eq!(s.kt_gossip_step("carol", &forger.head(2, 0xa2)).expect("step"), GossipStep::Done);
    assert_eq!(concerns(), ["carol"]);
    assert!(s.kt_blocked().is_ok());
    // The head this device holds: nothing to do.
    assert_eq!(s.kt_gossip_step("carol", &h1).expect("step"), GossipStep::Done);

    // A newer head: the server is asked for its own. The same root is
    // taken in through the chain.
    let g3 = server.head(3, 0xa3);
    let GossipStep::AskServer(head) = s.kt_gossip_step("carol", &g3).expect("step") else { panic!("ask") };
    let (own, bytes) =
        s.kt_gossip_with_server_head("carol", &head, &g3, ServerHeadAnswer::Signed(g3.clone())).expect("confirmed");
    assert_eq!(s.kt_server_head(&own, &bytes).expect("chain"), ChainStep::Audit { start: 1, end: 3 });
    // A refusal, or no signed head, is recorded against the server.
    let refused = s.kt_gossip_with_server_head("carol", &head, &g3, ServerHeadAnswer::Refused("no".into()));
    assert!(matches!(refused, Err(ClientError::KeyMismatch { .. })));
    let unsigned = s.kt_gossip_with_server_head("carol", &head, &g3, ServerHeadAnswer::Unsigned);
    assert!(matches!(unsigned, Err(ClientError::KeyMismatch { .. })));
    assert_eq!(concerns(), ["carol", THE_SERVER, THE_SERVER]);
    assert!(s.kt_blocked().is_ok(), "a refusal proves no fork");
    // The server's head for that epoch has another root than carol's: a
    // proven fork.
    let theirs = server.head(3, 0xb3);
    let fork = s.kt_gossip_with_server_head("carol", &head, &g3, ServerHeadAnswer::Signed(theirs));
    assert!(matches!(fork, Err(ClientError::DirectoryFork(_))));
    assert!(s.kt_blocked().is_err());
    s.store().write(|tx| tx.clear_alerts(true)).expect("cleared");

    // A head for an epoch this device holds, with another root: proven at once.
    assert_eq!(s.kt_gossip_step("dave", &server.head(1, 0xd1)).expect("step"), GossipStep::Done);
    assert!(matches!(s.kt_blocked(), Err(ClientError::DirectoryFork(_))));
}

#[test]
fn an_invitation_under_a_key_change_waiting_for_the_directory_is_joined_then_checked() {
    let crypto = subrosa_core::default_crypto();
    let (alice, bob, id) = pair();
    bob.receive(&alice.text(id, 1, "hello"));
    for q in unchecked(&bob) {
        let v = bob.session.member_verdict(&q, &answer_for(&alice)).expect("verdict");
        bob.session.settle_member_check(&q, v).expect("settled");
    }
    // alice rotates: her update and, right after, an invitation under the
    // new key reach bob in one batch, before his directory check ran.
    let real = alice.session.identity().with_new_identity_key(&crypto, 2).expect("rotated");
    let (update, _) = alice.commit(|e| e.update_credential(&id, &real));
    let alice = Device {
        session: Session::new(crypto.clone(), real.clone(), alice.session.store().clone(), alice.clock.clone()),
        clock: alice.clock.clone(),
    };
    let club = ConversationInfo { kind: subrosa_core::ConversationKind::Group, name: "club".into() };
    let kp = bob.key_package();
    let engine = alice.session.engine();
    let c = alice
        .session
        .store()
        .write(|_| {
            let c = engine.create_conversation(&club, &[kp])?;
            engine.confirm_commit(&c.conversation)?;
            Ok(c)
        })
        .expect("group");
    let welcome = alice.envelope(c.conversation, MessageKind::Welcome, c.welcome.expect("welcome"));
    bob.session.process_batch(&[update, welcome]).expect("batch");
    assert!(bob.alerts().is_empty(), "not refused as a key mismatch");
    assert!(bob.session.store().read(|tx| tx.conversation(&c.conversation)).expect("read").is_some(), "joined");
    // The directory confirms the new key: the pin moves, the group stays.
    let listed = DirectoryAnswer::Keys {
        identity_key: real.identity_public().to_vec(),
        devices: vec![(real.device_id().to_hex(), real.device_public().to_vec())],
    };
    for q in unchecked(&bob) {
        let v = bob.session.member_verdict(&q, &listed).expect("verdict");
        bob.session.settle_member_check(&q, v).expect("settled");
    }
    assert_eq!(
        bob.session.store().read(|tx| tx.contact_key("alice")).expect("pin"),
        Some(real.identity_public().to_vec())
    );
    assert!(bob.session.store().read(|tx| tx.conversation(&c.conversation)).expect("read").is_some());
    // An invitation under a key nobody committed is still refused.
    let stranger = alice.session.identity().with_new_identity_key(&crypto, 3).expect("made up");
    let forged = Device {
        session: Session::new(
            crypto,
            stranger,
            Store::new(crate::store::MemoryStore::with_clock(alice.clock.clone())),
            alice.clock.clone(),
        ),
        clock: alice.clock.clone(),
    };
    let kp = bob.key_package();
    let engine = forged.session.engine();
    let c = forged
        .session
        .store()
        .write(|_| {
            let c = engine.create_conversation(&club, &[kp])?;
            engine.confirm_commit(&c.conversation)?;
            Ok(c)
        })
        .expect("group");
    bob.receive(&forged.envelope(c.conversation, MessageKind::Welcome, c.welcome.expect("welcome")));
    assert!(bob.session.store().read(|tx| tx.conversation(&c.conversation)).expect("read").is_none(), "refused");
}

fn stored(d: &Device, id: ConversationId, m: [u8; 16]) -> StoredMessage {
    d.session.store().read(|tx| tx.message(&id, &m)).expect("read").expect("stored")
}

/// The id `Device::send` gives a message of `d` numbered `seq`.
fn id_of(d: &Device, seq: u64) -> MessageId {
    let mut id = [seq as u8; 16];
    id[..8].copy_from_slice(&d.session.identity().device_id().0);
    MessageId(id)
}

/// Alice, bob and carol in a group alice made.
fn trio() -> (Device, Device, Device, ConversationId) {
    let (alice, bob, carol) = (device("alice"), device("bob"), device("carol"));
    let answers = [
        account(&[&alice.session.identity()]),
        account(&[&bob.session.identity()]),
        account(&[&carol.session.identity()]),
    ];
    let id = group_of(&[&alice, &bob, &carol], &answers);
    (alice, bob, carol, id)
}

#[test]
fn a_reply_keeps_the_id_it_answers_and_reactions_are_one_per_member_per_emoji() {
    let (alice, bob, id) = pair();
    bob.receive(&alice.text(id, 1, "question"));
    let question = id_of(&alice, 1);
    alice.receive(&bob.send(id, 1, Body::Reply { text: "answer".into(), reply_to: question }));
    assert_eq!(alice.session.take_dropped(), []);
    let answer = stored(&alice, id, id_of(&bob, 1).0);
    assert_eq!((answer.text.as_str(), answer.reply_to), ("answer", Some(question.to_hex())));
    // Alice reacts to her own question (only bob stored it: this harness
    // keeps no sender's copy).
    let react = |seq, emoji: &str, remove| {
        bob.receive(&alice.send(id, seq, Body::Reaction { target: question, emoji: emoji.into(), remove }))
    };
    react(2, "\u{1f44d}", false);
    react(3, "\u{1f44d}", false);
    react(4, "\u{2764}", false);
    let reactions = |m: StoredMessage| m.reactions.into_iter().map(|r| (r.emoji, r.from)).collect::<Vec<_>>();
    assert_eq!(
        reactions(stored(&bob, id, question.0)),
        [("\u{1f44d}".into(), vec!["alice".to_string()]), ("\u{2764}".into(), vec!["alice".to_string()])]
    );
    react(5, "\u{1f44d}", true);
    assert_eq!(reactions(stored(&bob, id, question.0)), [("\u{2764}".into(), vec!["alice".to_string()])]);
    // Reactions are no messages: nothing new in history.
    let row = bob.session.store().read(|tx| tx.conversation(&id)).expect("read").expect("row");
    let history = bob.session.store().read(|tx| tx.history(&[row])).expect("history");
    assert_eq!(texts(&history), ["question"]);
}

#[test]
fn only_the_author_may_edit_or_delete_and_anyone_elses_attempt_is_refused_and_shown() {
    let (alice, bob, carol, id) = trio();
    let original = alice.text(id, 1, "original words");
    bob.receive(&original);
    carol.receive(&original);
    let target = id_of(&alice, 1);
    bob.unseen();
    // Carol is no author of alice's message.
    bob.receive(&carol.send(id, 1, Body::Edit { target, text: "forged".into() }));
    bob.receive(&carol.send(id, 2, Body::Delete { target }));
    let m = stored(&bob, id, target.0);
    assert_eq!((m.text.as_str(), m.edited, m.deleted), ("original words", false, false));
    assert_eq!(
        events(&bob.unseen()),
        [
            SystemEvent::EditRefused { from: "carol".into(), author: "alice".into() },
            SystemEvent::DeleteRefused { from: "carol".into(), author: "alice".into() },
        ]
    );
    // Alice is.
    bob.receive(&alice.send(id, 2, Body::Edit { target, text: "better words".into() }));
    let m = stored(&bob, id, target.0);
    assert_eq!((m.text.as_str(), m.edited), ("better words", true));
    // The edited message is shown again, with its new text.
    assert_eq!(texts(&bob.unseen()), ["better words"]);
    bob.receive(&alice.send(id, 3, Body::Delete { target }));
    let m = stored(&bob, id, target.0);
    assert_eq!((m.text.as_str(), m.deleted), ("", true));
    // The text is gone from the store, not only from one view.
    let row = bob.session.store().read(|tx| tx.conversation(&id)).expect("read").expect("row");
    let everything = bob.session.store().read(|tx| tx.history(&[row])).expect("history");
    assert!(everything.iter().all(|m| !m.text.contains("words")), "{everything:?}");
    // An edit after the delete does not bring it back.
    bob.receive(&alice.send(id, 4, Body::Edit { target, text: "back".into() }));
    assert_eq!(stored(&bob, id, target.0).text, "");
}

#[test]
fn an_edit_or_reaction_before_its_message_waits_for_it_and_is_judged_when_it_comes() {
    let (alice, bob, carol, id) = trio();
    let target = id_of(&alice, 1);
    let message = alice.text(id, 1, "first");
    let edit = alice.send(id, 2, Body::Edit { target, text: "edited".into() });
    let forged = carol.send(id, 1, Body::Edit { target, text: "forged".into() });
    let reaction = carol.send(id, 2, Body::Reaction { target, emoji: "x".into(), remove: false });
    bob.receive(&edit);
    bob.receive(&forged);
    bob.receive(&reaction);
    assert!(bob.session.store().read(|tx| tx.message(&id, &target.0)).expect("read").is_none());
    bob.receive(&message);
    let m = stored(&bob, id, target.0);
    assert_eq!((m.text.as_str(), m.edited), ("edited", true));
    assert_eq!(
        m.reactions.iter().map(|r| (r.emoji.as_str(), r.from.clone())).collect::<Vec<_>>(),
        [("x", vec!["carol".to_string()])]
    );
    assert!(events(&bob.unseen()).contains(&SystemEvent::EditRefused { from: "carol".into(), author: "alice".into() }));
}

#[test]
fn a_member_cannot_fill_the_store_with_actions_for_messages_that_never_come() {
    let (alice, bob, carol, id) = trio();
    let limit = crate::annotations::MAX_EARLY_ACTIONS_PER_MEMBER;
    for i in 0..limit + 20 {
        let mut target = [0xee; 16];
        target[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let emoji = "x".to_string();
        bob.receive(&carol.send(id, i as u64 + 1, Body::Reaction { target: MessageId(target), emoji, remove: false }));
    }
    let count = |who: &str| bob.session.store().read(|tx| tx.early_actions_from(&id, who)).expect("count");
    assert_eq!(count("carol"), limit, "bounded");
    // Another member's actions still wait for their message.
    let target = id_of(&alice, 1);
    bob.receive(&alice.send(id, 2, Body::Edit { target, text: "edited".into() }));
    assert_eq!(count("alice"), 1);
    bob.receive(&alice.text(id, 1, "first"));
    assert_eq!(stored(&bob, id, target.0).text, "edited");
}

/// What `d` posts for its oldest queued send: the request, decoded.
fn post_oldest(d: &Device) -> (crate::store::QueuedSend, SendRequest, Option<u64>) {
    let q = d.session.store().read(|tx| tx.outbox()).expect("outbox").remove(0);
    let (request, seq) = d.session.prepare_queued(q.id, None).expect("prepared").expect("a request");
    (q, serde_json::from_slice(&request).expect("a send request"), seq)
}

#[test]
fn receipts_go_to_the_author_alone_unnumbered_and_make_the_state_of_its_message() {
    let (alice, bob, carol, id) = trio();
    let to = Outgoing { conversation: id, target: "club", group: true };
    alice.session.queue_text(&to, "hello", MessageId([7; 16]), [7; 16]).expect("queued");
    let (q, req, _) = post_oldest(&alice);
    alice.session.queued_sent(&q).expect("sent");
    let hello = alice.envelope(id, MessageKind::Application, req.parts[0].ciphertext.0.clone());
    bob.receive(&hello);
    carol.receive(&hello);
    let state = || stored(&alice, id, [7; 16]);
    assert_eq!(state().state, Some(MessageState::Sent));
    // Bob owes alice a delivery receipt: to her devices alone, unnumbered.
    let (q, req, seq) = post_oldest(&bob);
    assert_eq!((req.parts[0].recipients.clone(), seq), (vec![alice.session.identity().address()], None));
    bob.session.queued_sent(&q).expect("sent");
    alice.receive(&bob.envelope(id, MessageKind::Application, req.parts[0].ciphertext.0.clone()));
    let (q, req, _) = post_oldest(&carol);
    carol.session.queued_sent(&q).expect("sent");
    alice.receive(&carol.envelope(id, MessageKind::Application, req.parts[0].ciphertext.0.clone()));
    assert_eq!(state().state, Some(MessageState::Delivered));
    // Read: bob reads, carol turned read receipts off.
    carol.session.set_read_receipts(false).expect("setting");
    assert_eq!(carol.session.mark_read(&id).expect("read"), 1);
    assert!(carol.session.store().read(|tx| tx.outbox()).expect("outbox").is_empty());
    assert_eq!(bob.session.mark_read(&id).expect("read"), 1);
    let (q, req, _) = post_oldest(&bob);
    bob.session.queued_sent(&q).expect("sent");
    alice.receive(&bob.envelope(id, MessageKind::Application, req.parts[0].ciphertext.0.clone()));
    let m = state();
    assert_eq!(m.state, Some(MessageState::Delivered));
    let detail: Vec<(String, MessageState)> = m.receipts.into_iter().map(|r| (r.member, r.state)).collect();
    assert_eq!(detail, [("bob".into(), MessageState::Read), ("carol".into(), MessageState::Delivered)]);
    // Receipts took no number: bob's next message is his first, and carol,
    // who got none of his receipts, sees no gap.
    bob.session.queue_text(&to, "after", MessageId([8; 16]), [8; 16]).expect("queued");
    let (_, req, seq) = post_oldest(&bob);
    assert_eq!(seq, Some(1));
    carol.unseen();
    carol.receive(&bob.envelope(id, MessageKind::Application, req.parts[0].ciphertext.0.clone()));
    assert_eq!(texts(&carol.unseen()), ["after"]);
}

#[test]
fn nobody_owes_a_receipt_for_their_own_accounts_messages() {
    let (alice, bob) = (device("alice"), device("bob"));
    let alice2 = linked(&alice);
    let answers =
        [account(&[&alice.session.identity(), &alice2.session.identity()]), account(&[&bob.session.identity()])];
    let id = group_of(&[&alice, &alice2, &bob], &answers);
    let to = Outgoing { conversation: id, target: "club", group: true };
    alice.session.queue_text(&to, "hello", MessageId([7; 16]), [7; 16]).expect("queued");
    let (q, req, _) = post_oldest(&alice);
    alice.session.queued_sent(&q).expect("sent");
    let hello = alice.envelope(id, MessageKind::Application, req.parts[0].ciphertext.0.clone());
    for d in [&alice2, &bob] {
        d.receive(&hello);
        assert_eq!(stored(d, id, [7; 16]).text, "hello");
    }
    // Bob owes alice a delivery receipt; alice's other device owes nobody.
    assert_eq!(post_oldest(&bob).1.parts[0].recipients.len(), 2, "to both of alice's devices");
    assert!(alice2.session.store().read(|tx| tx.outbox()).expect("outbox").is_empty());
}

fn call(call_id: u8, action: subrosa_core::call::CallAction) -> Body {
    Body::Call(subrosa_core::call::CallSignal { call_id: [call_id; 16], action, context: 7 })
}

#[test]
fn a_flood_of_call_signals_keeps_only_the_newest_in_memory() {
    use subrosa_core::call::CallAction;
    let (alice, bob, id) = pair();
    let n = crate::calls::MAX_QUEUED_SIGNALS + 6;
    for seq in 1..=n {
        bob.receive(&alice.send(id, seq as u64, call(seq as u8, CallAction::Ringing)));
    }
    let queued = bob.session.take_call_signals();
    assert_eq!(queued.len(), crate::calls::MAX_QUEUED_SIGNALS);
    assert_eq!(queued.first().map(|s| s.signal.call_id), Some([7; 16]), "the oldest six went");
    assert_eq!(queued.last().map(|s| s.signal.call_id), Some([n as u8; 16]));
    assert!(bob.session.take_call_signals().is_empty());
}

#[test]
fn a_call_row_whose_end_never_came_is_swept_a_day_later() {
    use subrosa_core::call::CallAction;
    let (alice, bob, id) = pair();
    let keys = |d: &Device| d.session.store().read(|tx| tx.meta_keys("call.")).expect("keys");
    // An offer whose hang-up never arrives (the caller crashed).
    bob.receive(&alice.send(id, 1, call(1, CallAction::Offer)));
    assert_eq!(keys(&bob), vec![format!("call.{}", hex::encode([1u8; 16]))]);
    // Within the day, another offer leaves it.
    bob.clock.0.fetch_add(crate::calls::CALL_ROW_TTL_MS, Ordering::SeqCst);
    bob.receive(&alice.send(id, 2, call(2, CallAction::Offer)));
    assert_eq!(keys(&bob).len(), 2);
    // Past the day, the next offer sweeps the first.
    bob.clock.0.fetch_add(1, Ordering::SeqCst);
    bob.receive(&alice.send(id, 3, call(3, CallAction::Offer)));
    assert_eq!(
        keys(&bob),
        vec![format!("call.{}", hex::encode([2u8; 16])), format!("call.{}", hex::encode([3u8; 16]))]
    );
    // A swept row's call still ends with a line; a kept one is still a missed call.
    bob.receive(&alice.send(id, 4, call(3, CallAction::Hangup)));
    let last = events(&bob.unseen()).pop();
    assert!(
        matches!(last, Some(SystemEvent::Call { action: crate::CallLine::Missed, .. })),
        "a kept row still tells a missed call: {last:?}"
    );
    assert_eq!(keys(&bob), vec![format!("call.{}", hex::encode([2u8; 16]))]);
}

/// `device` commits a move of `old` to `to`, and the server takes it: the
/// commit, as the other members receive it.
fn commit_move(device: &Device, old: &ConversationId, to: ConversationId) -> Vec<u8> {
    let meta = PendingMeta { change: StagedChange::Move { to }, line: None };
    device
        .session
        .store()
        .write(|tx| {
            let out = device.session.stage_change(old, &meta.change)?.expect("a move to commit");
            let pending = device.session.store_pending(tx, &out, &meta)?;
            device.session.finish_pending(tx, &pending)?;
            Ok(out.commit)
        })
        .expect("move")
}

/// A direct conversation moves to the post-quantum suite (see `moves`):
/// the committer's move and new conversation, the peer's join as its
/// continuation, a message sent in the old one just before its sender saw
/// the move (still read, until the new conversation's first commit), and a
/// message queued meanwhile (it waits, then goes to the new conversation).
#[test]
fn a_move_keeps_late_messages_and_sends_queued_ones_to_the_new_conversation() {
    let (alice, bob, old) = pair();
    let pq = subrosa_core::PQ_CIPHERSUITE;
    assert_ne!(alice.session.engine().suite(&old).expect("suite"), pq, "starts classical");
    let to = ConversationId([0x51; 16]);

    // alice commits the move; the server takes it.
    let commit = commit_move(&alice, &old, to);
    let moving = alice.session.store().read(|tx| crate::moves::moving(tx, &old)).expect("read").expect("moving");
    assert_eq!((moving.to, moving.creates, moving.since_ms), (to, true, 1_000));
    // Nothing more is committed in the old conversation.
    let again = alice.session.store().write(|_| alice.session.stage_change(&old, &StagedChange::Update));
    assert!(matches!(again, Err(ClientError::Core(subrosa_core::CoreError::Moving))), "{again:?}");

    // bob, who has not seen the move yet, writes in the old conversation.
    let late = bob.text(old, 1, "sent before I saw the move");

    // alice creates the new conversation with bob's post-quantum package.
    let kp = bob.session.store().write(|_| Ok(bob.session.engine().generate_key_package_in(pq)?)).expect("kp");
    let create = PendingMeta {
        change: StagedChange::Create {
            kind: "direct".into(),
            name: String::new(),
            peer: Some("bob".into()),
            first: None,
        },
        line: None,
    };
    let welcome = alice
        .session
        .store()
        .write(|tx| {
            let out = alice.session.engine().create_moved(&old, &to, &[kp])?;
            let pending = alice.session.store_pending(tx, &out, &create)?;
            alice.session.finish_pending(tx, &pending)?;
            Ok(out.welcome.expect("welcome"))
        })
        .expect("create");
    let row = |d: &Device, id| d.session.store().read(|tx| tx.conversation(&id)).expect("read").expect("row");
    assert!(!row(&alice, old).active && row(&alice, to).active);
    assert_eq!(row(&alice, to).peer.as_deref(), Some("bob"));
    assert_eq!(alice.session.engine().suite(&to).expect("suite"), pq);

    // The late message is still read (the old keys are kept for it).
    alice.receive(&late);
    assert!(texts(&alice.unseen()).contains(&"sent before I saw the move"));

    // bob applies the move, queues a message, then joins.
    bob.receive(&alice.envelope(old, MessageKind::Commit, commit));
    let queued = Outgoing { conversation: old, target: "alice", group: false };
    bob.session.queue_text(&queued, "written while moving", MessageId([0x77; 16]), [0x78; 16]).expect("queued");
    let q = bob.session.store().read(|tx| tx.outbox()).expect("outbox").remove(0);
    let waits = bob.session.prepare_queued(q.id, None);
    assert!(matches!(waits, Err(ClientError::Core(subrosa_core::CoreError::Moving))), "{waits:?}");
    bob.receive(&alice.envelope(to, MessageKind::Welcome, welcome));
    assert!(!row(&bob, old).active && row(&bob, to).active);
    assert_eq!(bob.session.engine().suite(&to).expect("suite"), pq);
    let (request, _) = bob.session.prepare_queued(q.id, None).expect("prepared").expect("a request");
    let request: SendRequest = serde_json::from_slice(&request).expect("json");
    assert_eq!(request.conversation, to, "the queued message goes to the new conversation");
    alice.receive(&bob.envelope(to, MessageKind::Application, request.parts[0].ciphertext.0.clone()));
    assert!(texts(&alice.unseen()).contains(&"written while moving"));
    let lines = |d: &Device| {
        let rows = [row(d, old), row(d, to)];
        d.session.store().read(|tx| tx.history(&rows)).expect("history")
    };
    assert!(lines(&bob).iter().any(|m| m.system && m.text.contains("moved this conversation to post-quantum keys")));
    assert!(lines(&alice).iter().any(|m| m.system && m.text.contains("continues as #5151")));

    // The first commit in the new conversation erases the old keys: a
    // message in the old one is no longer read.
    alice
        .session
        .store()
        .write(|tx| {
            let meta = PendingMeta { change: StagedChange::Update, line: None };
            let out = alice.session.stage_change(&to, &meta.change)?.expect("update");
            let pending = alice.session.store_pending(tx, &out, &meta)?;
            alice.session.finish_pending(tx, &pending)
        })
        .expect("update");
    alice.receive(&bob.text(old, 2, "far too late"));
    assert!(!texts(&alice.unseen()).contains(&"far too late"));
}

/// A member that names, as the conversation a move goes to, one this device
/// already has (another conversation of theirs) cannot make the move write
/// over its keys: the commit is refused and the committer named.
#[test]
fn a_move_to_an_id_this_device_knows_is_refused() {
    let (alice, bob, old) = pair();
    let (other, welcome) = alice.start_direct("bob", bob.key_package());
    bob.receive(&welcome);
    let commit = commit_move(&alice, &old, other);
    bob.receive(&alice.envelope(old, MessageKind::Commit, commit));
    assert_eq!(bob.session.store().read(|tx| crate::moves::moving(tx, &old)).expect("read"), None);
    assert!(bob.alerts().iter().any(|a| a.contains("alice")), "the committer is named");
    // The committer's own engine refuses to create over a stored group too.
    let pq = subrosa_core::PQ_CIPHERSUITE;
    let kp = bob.session.store().write(|_| Ok(bob.session.engine().generate_key_package_in(pq)?)).expect("kp");
    let over = alice.session.store().write(|_| Ok(alice.session.engine().create_moved(&old, &other, &[kp])?));
    assert!(
        matches!(over, Err(ClientError::Core(subrosa_core::CoreError::IdentityMismatch(_)))),
        "{:?}",
        over.map(|o| o.conversation)
    );
    assert!(alice.session.engine().members(&other).is_ok(), "the other conversation is untouched");
}

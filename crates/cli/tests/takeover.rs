//! No takeover (issue: close the reproduced attacks): a Welcome reusing a
//! conversation id is refused, a former member comes back only through a
//! new conversation, a direct conversation holds two accounts, targets are
//! never ambiguous, and member keys are checked against the key directory.
//!
//! The malicious party is "mallory", a legitimate account driven by a
//! test-only client built from the library (`Mallory` below: its own MLS
//! engine, signed requests through the client's API). What only the
//! operator can do (hand an envelope to a device) is done in the server's
//! database, as the operator would.

mod common;

use common::*;
use reqwest::Method;
use subrosa_client::net::Api;
use subrosa_core::content::Content;
use subrosa_core::{ConversationInfo, ConversationKind, DeviceIdentity};
use subrosa_proto::{
    ClaimRequest, ClaimResponse, CommitGuard, ConversationId, DeviceRecord, Empty, InboxResponse, KeyPackageCount,
    KeyPackageUpload, MessageId, MessageKind, RegisterRequest, SendId, SendPart, SendRequest, SendResponse, B64,
};

/// A malicious member: a real account whose device runs code of its own.
struct Mallory {
    rt: tokio::runtime::Runtime,
    id: DeviceIdentity,
    api: Api,
    engine: FakeEngine,
}

impl Mallory {
    fn register(server: &Server, handle: &str) -> Mallory {
        use mls_rs::storage_provider::in_memory::{InMemoryGroupStateStorage, InMemoryKeyPackageStorage};
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let crypto = subrosa_core::default_crypto();
        let id = DeviceIdentity::generate(&crypto, handle.parse().expect("handle"), 1).expect("identity");
        let engine = subrosa_core::Engine::new(
            crypto.clone(),
            id.clone(),
            InMemoryGroupStateStorage::new(),
            InMemoryKeyPackageStorage::new(),
        );
        let api = Api::new(&server.url, id.clone(), crypto).expect("api");
        let req = RegisterRequest {
            handle: handle.parse().expect("handle"),
            identity_key: B64(id.identity_public().to_vec()),
            device: DeviceRecord {
                device_id: id.device_id(),
                signature_key: B64(id.device_public().to_vec()),
                certificate: B64(id.certificate().to_bytes().expect("certificate")),
            },
        };
        let _: Empty = rt.block_on(api.call(Method::POST, "/v1/accounts", Some(&req))).expect("register mallory");
        // Packages of both suites, as every device of this version uploads.
        let one_time = subrosa_core::SUITES
            .iter()
            .flat_map(|s| (0..4).map(|_| B64(engine.generate_key_package_in(*s).expect("kp"))).collect::<Vec<_>>())
            .collect();
        let upload = KeyPackageUpload { one_time, last_resort: None, more_last_resort: vec![], replace: false };
        let _: KeyPackageCount =
            rt.block_on(api.call(Method::POST, "/v1/keypackages", Some(&upload))).expect("key packages");
        Mallory { rt, id, api, engine }
    }

    /// One key package of every device of `handle`, claimed as anyone can
    /// (of the post-quantum suite, as a client of this version starts
    /// conversations: a classical one would move to it by itself).
    fn claim(&self, handle: &str) -> Vec<Vec<u8>> {
        let req = ClaimRequest { handle: handle.parse().expect("handle"), suite: 65100 };
        let claim: ClaimResponse =
            self.rt.block_on(self.api.call(Method::POST, "/v1/keypackages/claim", Some(&req))).expect("claim");
        claim.packages.into_iter().map(|p| p.key_package.into_inner()).collect()
    }

    /// Makes a conversation under `id` (one that others already use) with
    /// the devices of `handles`, and hands its Welcome to them as the
    /// operator would: the server's own rules are no obstacle then.
    fn invite(&self, server: &Server, id: ConversationId, info: &ConversationInfo, handles: &[&str]) -> ConversationId {
        let kps: Vec<Vec<u8>> = handles.iter().flat_map(|h| self.claim(h)).collect();
        let out = self.engine.create_conversation_with_id(id, info, &kps).expect("mallory's group");
        self.engine.confirm_commit(&id).expect("confirm");
        deliver(server, &id, &self.id, "welcome", out.welcome.as_deref().expect("welcome"), handles);
        id
    }

    /// Starts a new conversation with the devices of these key packages
    /// through the server, as any member may.
    fn create(&self, info: &ConversationInfo, key_packages: &[Vec<u8>]) -> ConversationId {
        let id = ConversationId(rand_bytes());
        let out = self.engine.create_conversation_with_id(id, info, key_packages).expect("mallory's group");
        self.post_commit(&out);
        id
    }

    /// Adds the devices of these key packages to a conversation of hers,
    /// through the server.
    fn add(&self, id: ConversationId, key_packages: &[Vec<u8>]) {
        let out = self.engine.add_members(&id, key_packages).expect("add");
        self.post_commit(&out);
    }

    fn post_commit(&self, out: &subrosa_core::OutgoingCommit) {
        let mut parts = Vec::new();
        if !out.commit_recipients.is_empty() {
            parts.push(SendPart {
                kind: MessageKind::Commit,
                recipients: out.commit_recipients.clone(),
                ciphertext: B64(out.commit.clone()),
            });
        }
        if let Some(w) = &out.welcome {
            parts.push(SendPart {
                kind: MessageKind::Welcome,
                recipients: out.welcome_recipients.clone(),
                ciphertext: B64(w.clone()),
            });
        }
        self.post(SendRequest {
            conversation: out.conversation,
            send_id: SendId(rand_bytes()),
            commit: Some(CommitGuard { epoch: out.epoch, members: None }),
            parts,
            expires_at: None,
        });
        self.engine.confirm_commit(&out.conversation).expect("confirm");
    }

    fn post(&self, req: SendRequest) {
        let _: SendResponse =
            self.rt.block_on(self.api.call(Method::POST, "/v1/messages", Some(&req))).expect("mallory's send");
    }

    /// Sends a text in a conversation of hers, through the server.
    fn say(&self, id: ConversationId, text: &str) {
        let content = Content::text(MessageId(rand_bytes()), 1, text);
        let (ct, recipients) = self.engine.encrypt(&id, &content).expect("encrypt");
        self.post(SendRequest {
            conversation: id,
            send_id: SendId(rand_bytes()),
            commit: None,
            parts: vec![SendPart { kind: MessageKind::Application, recipients, ciphertext: B64(ct) }],
            expires_at: None,
        });
    }

    /// Sends any content body in a conversation of hers.
    fn send_body(&self, id: ConversationId, body: subrosa_core::content::Body) {
        let content = Content { body, ..Content::text(MessageId(rand_bytes()), 1, "") };
        let (ct, recipients) = self.engine.encrypt(&id, &content).expect("encrypt");
        self.post(SendRequest {
            conversation: id,
            send_id: SendId(rand_bytes()),
            commit: None,
            parts: vec![SendPart { kind: MessageKind::Application, recipients, ciphertext: B64(ct) }],
            expires_at: None,
        });
    }

    /// Everything in her inbox that she can decrypt, as text.
    fn read_inbox(&self) -> (usize, Vec<String>) {
        let inbox: InboxResponse =
            self.rt.block_on(self.api.call::<(), _>(Method::GET, "/v1/inbox?limit=500", None)).expect("inbox");
        let mut texts = Vec::new();
        for env in &inbox.messages {
            if let Ok(subrosa_core::Event::Message { content, .. }) =
                self.engine.process(&env.conversation, env.ciphertext.as_slice())
            {
                if let subrosa_core::content::Body::Text(t) = content.body {
                    texts.push(t);
                }
            }
        }
        (inbox.messages.len(), texts)
    }
}

fn rand_bytes() -> [u8; 16] {
    let a = rand_token().to_le_bytes();
    let b = rand_token().to_le_bytes();
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a);
    out[8..].copy_from_slice(&b);
    out
}

/// The operator hands an envelope from `sender` to every device of `to`.
fn deliver(server: &Server, id: &ConversationId, sender: &DeviceIdentity, kind: &str, bytes: &[u8], to: &[&str]) {
    let db = server.db();
    let sender_row: i64 = db
        .query_row("SELECT id FROM devices WHERE device_id = ?1", [sender.device_id().to_hex()], |r| r.get(0))
        .expect("sender's device");
    db.execute(
        "INSERT INTO messages (conversation, sender, kind, ciphertext, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![id.as_bytes().as_slice(), sender_row, kind, bytes, now_ms()],
    )
    .expect("message");
    let msg = db.last_insert_rowid();
    for h in to {
        let mut stmt = db.prepare("SELECT id FROM devices WHERE handle = ?1 AND active = 1").expect("prepare");
        let devices: Vec<i64> =
            stmt.query_map([h], |r| r.get(0)).expect("devices").collect::<Result<_, _>>().expect("rows");
        for d in devices {
            db.execute(
                "INSERT INTO inbox (device, message, created_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![d, msg, now_ms()],
            )
            .expect("inbox");
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn conversation_of(u: &User, target: &str) -> ConversationId {
    let h = u.history_json(target);
    let hex = h.first().and_then(|m| m["conversation"].as_str()).expect("a conversation").to_string();
    ConversationId::from_slice(&hex_decode(&hex)).expect("id")
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn group() -> ConversationInfo {
    ConversationInfo { kind: ConversationKind::Group, name: "hijacked".into() }
}

/// `receive` for a user, returning (stdout, stderr).
fn receive(u: &User) -> (String, String) {
    let out = u.run(&["receive", "--json"]);
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr(&out))
}

#[test]
fn a_welcome_reusing_a_conversation_id_is_refused_and_mallory_reads_nothing() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello bob");
    assert_eq!(texts(&bob.receive_json(&[])), ["hello bob"]);
    // The id is no secret: the operator sees it on every send.
    let id = conversation_of(&alice, "bob");

    let mallory = Mallory::register(&server, "mallory");
    mallory.invite(&server, id, &group(), &["alice", "bob"]);
    let (_, alice_err) = receive(&alice);
    let (_, bob_err) = receive(&bob);

    // What the attack is after: what they say next.
    alice.send("bob", "after the attempt");
    bob.send("alice", "still just us");
    let (queued, read) = mallory.read_inbox();
    assert!(read.is_empty(), "mallory read {read:?}");
    assert_eq!(queued, 0, "nothing is even addressed to mallory");
    assert_eq!(texts(&bob.receive_json(&[])), ["after the attempt"]);
    assert!(texts(&alice.receive_json(&[])).contains(&"still just us".to_string()));
    // Both still hold the conversation as it was…
    assert_eq!(conversation_of(&alice, "bob"), id);
    // …and were told who tried, as a warning and in the conversation.
    for (u, err) in [(&alice, alice_err), (&bob, bob_err)] {
        assert!(err.contains("warning:") && err.contains("mallory"), "{}: {err}", u.name);
        assert!(err.contains("already knows"), "{}: {err}", u.name);
        let lines = u.history_json(if u.name == "alice" { "bob" } else { "alice" });
        assert!(lines.iter().any(|m| m["system"] == true && m["text"].as_str().unwrap_or("").contains("mallory")));
    }
}

#[test]
fn a_removed_member_comes_back_only_in_a_new_conversation() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "club", "bob", "carol"]);
    alice.send("club", "welcome all");
    carol.receive_json(&[]);
    bob.receive_json(&[]);
    let old = conversation_of(&alice, "club");
    alice.ok(&["group", "remove", "club", "carol"]);
    carol.receive_json(&[]);
    bob.receive_json(&[]);

    // Someone who knows the id tries to let carol back in under it.
    let mallory = Mallory::register(&server, "mallory");
    mallory.invite(&server, old, &group(), &["carol"]);
    let (_, err) = receive(&carol);
    assert!(err.contains("warning:") && err.contains("mallory") && err.contains("already knows"), "{err}");
    assert_clean_error(&carol.run(&["send", "club", "am I back?"]), "no longer a member");

    // alice re-adds her: the group continues in a new conversation.
    let said = alice.ok(&["group", "add", "club", "carol"]);
    assert!(said.contains("new conversation"), "{said}");
    let new = conversation_of(&alice, "club");
    assert_ne!(new, old);
    let (out, _) = receive(&bob);
    assert!(out.contains("retired"), "bob is told the old one is retired: {out}");
    receive(&carol);
    bob.send("club", "hi carol, welcome back");
    let got = carol.receive_json(&[]);
    assert!(texts(&got).contains(&"hi carol, welcome back".to_string()), "{got:?}");
    assert!(got.iter().all(|m| m["conversation"] == new.to_hex()));
    let members = carol.ok(&["members", "club"]);
    for h in ["alice", "bob", "carol"] {
        assert!(members.contains(h), "{members}");
    }
}

#[test]
fn a_group_named_after_a_contact_does_not_capture_messages_to_them() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let mallory = User::register(&server, "mallory");
    alice.send("bob", "hi bob");
    bob.receive_json(&[]);
    // mallory names a group after bob, with alice in it.
    mallory.ok(&["group", "create", "bob", "alice"]);
    alice.receive_json(&[]);
    let trap = mallory.history_json("bob")[0]["conversation"].as_str().expect("id").to_string();

    let out = alice.run(&["send", "bob", "for bob only"]);
    assert_clean_error(&out, "ambiguous");
    let err = stderr(&out);
    assert!(err.contains("@bob") && err.contains(&format!("#{trap}")), "candidates listed: {err}");
    for cmd in [&["history", "bob"][..], &["members", "bob"]] {
        assert_clean_error(&alice.run(cmd), "ambiguous");
    }
    // Nothing went to mallory.
    assert!(mallory.receive_json(&[]).iter().all(|m| m["system"] == true));

    // `@bob` is always bob, `#ID` always the one conversation.
    alice.send("@bob", "for bob only");
    assert_eq!(texts(&bob.receive_json(&[])), ["for bob only"]);
    alice.send(&format!("#{}", &trap[..8]), "to the group called bob");
    assert_eq!(texts(&mallory.receive_json(&[])), ["to the group called bob"]);
    assert!(alice.ok(&["members", &format!("#{trap}")]).contains("mallory"));

    // Two groups with one name: refused with both listed.
    alice.ok(&["group", "create", "club", "bob"]);
    mallory.ok(&["group", "create", "club", "alice"]);
    alice.receive_json(&[]);
    let out = alice.run(&["send", "club", "which one?"]);
    assert_clean_error(&out, "ambiguous");
    assert_eq!(stderr(&out).matches("(group \"club\")").count(), 2, "{}", stderr(&out));
    assert_clean_error(&alice.run(&["group", "add", "club", "mallory"]), "ambiguous");
}

#[test]
fn a_direct_conversation_holds_exactly_two_accounts() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let _bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    let mallory = Mallory::register(&server, "mallory");

    // A "direct" Welcome with three accounts is refused.
    let mut kps = mallory.claim("alice");
    kps.extend(mallory.claim("bob"));
    let three = mallory.create(&ConversationInfo::direct(), &kps);
    let (_, err) = receive(&alice);
    assert!(err.contains("warning:") && err.contains("mallory") && err.contains("exactly two accounts"), "{err}");
    assert!(!alice.run(&["history", "mallory"]).status.success(), "no conversation with mallory");
    assert!(!alice.run(&["history", &format!("#{}", three.to_hex())]).status.success());

    // A direct conversation of two, later grown by a third account, is
    // shown and closed.
    let two = mallory.create(&ConversationInfo::direct(), &mallory.claim("alice"));
    receive(&alice);
    assert!(alice.ok(&["members", &format!("#{}", two.to_hex())]).contains("mallory"));
    let kps = mallory.claim("carol");
    mallory.add(two, &kps);
    let (out, err) = receive(&alice);
    assert!(err.contains("exactly two accounts") && err.contains("carol"), "{err}");
    assert!(out.contains("mallory added carol"), "the change is shown as a system line: {out}");
    drop(carol);
    // alice's next message to mallory goes to a new conversation of two.
    alice.send("mallory", "just us");
    let sent = alice.history_json("mallory");
    let just_us = sent.iter().find(|m| m["text"] == "just us").expect("sent");
    assert_ne!(just_us["conversation"], two.to_hex(), "not in the grown conversation");
}

/// Only an account's own devices hand each other its identity key: an
/// invitation to an "own devices" conversation holding another account is
/// refused, and an identity key sent anywhere else changes nothing.
#[test]
fn nobody_else_can_hand_a_device_an_identity_key() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let mallory = Mallory::register(&server, "mallory");
    let key_before = alice.ok(&["safety-number", "mallory"]);

    let own = mallory.create(&ConversationInfo::own(), &mallory.claim("alice"));
    let (_, err) = receive(&alice);
    assert!(err.contains("warning:") && err.contains("mallory") && err.contains("own devices"), "{err}");
    assert!(!alice.run(&["history", &format!("#{}", own.to_hex())]).status.success());

    // In a direct conversation, mallory's device sends alice an identity
    // key pair "for her devices": ignored, shown nowhere, adopted never.
    let direct = mallory.create(&ConversationInfo::direct(), &mallory.claim("alice"));
    receive(&alice);
    let (fake, _) = fake_device("alice");
    let cert = fake.certificate().to_bytes().expect("certificate");
    mallory.send_body(
        direct,
        subrosa_core::content::Body::IdentityKey(subrosa_core::content::IdentityHandover {
            identity_public: fake.identity_public().to_vec(),
            identity_secret: zeroize::Zeroizing::new(vec![7; 32]),
            certificates: vec![([0; 8], cert)],
        }),
    );
    mallory.say(direct, "did it work?");
    let (out, err) = receive(&alice);
    assert!(out.contains("did it work?"), "{out}");
    assert!(!err.contains("warning") && !err.contains("error"), "not even looked at: {err}");
    assert_eq!(alice.ok(&["safety-number", "mallory"]), key_before, "alice's identity key is unchanged");
    let devices = alice.ok(&["devices"]);
    assert!(!devices.contains("NOT CERTIFIED"), "{devices}");
}

/// The operator plants a device for its handle in the server's tables (it
/// is in no directory entry), so sends to a group holding it are accepted.
fn plant(server: &Server, id: &DeviceIdentity) {
    server
        .db()
        .execute(
            "INSERT INTO devices (handle, device_id, signature_key, certificate, active, created_at) VALUES (?1, ?2, ?3, ?4, 1, 0)",
            rusqlite::params![
                id.handle().as_str(),
                id.device_id().to_hex(),
                id.device_public(),
                id.certificate().to_bytes().expect("certificate")
            ],
        )
        .expect("planted device");
}

#[test]
fn a_device_the_directory_contradicts_blocks_sending_until_accepted() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let _carol = User::register(&server, "carol");
    alice.send("bob", "hi");
    bob.receive_json(&[]);
    let mallory = Mallory::register(&server, "mallory");
    let g = mallory
        .create(&ConversationInfo { kind: ConversationKind::Group, name: "gang".into() }, &mallory.claim("alice"));
    let (out, err) = receive(&alice);
    assert!(out.contains("mallory added you to gang"), "{out} {err}");
    alice.send("gang", "hello gang");

    // mallory adds a device for carol certified by a key of her own: alice
    // has never seen carol, the key directory says otherwise.
    let (fake_carol, fake_engine) = fake_device("carol");
    plant(&server, &fake_carol);
    mallory.add(g, &[fake_engine.generate_key_package_in(subrosa_core::PQ_CIPHERSUITE).expect("kp")]);
    let (out, err) = receive(&alice);
    let dev = fake_carol.device_id().to_hex();
    assert!(err.contains("warning:") && err.contains("mallory") && err.contains(&dev), "{err}");
    assert!(out.contains(&dev), "system line names the device: {out}");
    // The commit was applied: alice stays in step and reads what follows.
    mallory.say(g, "at the new epoch");
    assert!(texts(&alice.receive_json(&[])).contains(&"at the new epoch".to_string()));
    // Sending there is blocked until alice accepts the device.
    assert_clean_error(&alice.run(&["send", "gang", "blocked?"]), "accept-device");
    alice.ok(&["accept-device", "gang", &dev]);
    alice.send("gang", "accepted");

    // A device of bob's certified by another key than the one alice pinned
    // for him: the commit is applied too (not dropped as tampered), flagged.
    let (fake_bob, fake_bob_engine) = fake_device("bob");
    plant(&server, &fake_bob);
    mallory.add(g, &[fake_bob_engine.generate_key_package_in(subrosa_core::PQ_CIPHERSUITE).expect("kp")]);
    let (_, err) = receive(&alice);
    assert!(err.contains(&fake_bob.device_id().to_hex()) && !err.contains("dropped"), "{err}");
    mallory.say(g, "still in step");
    assert!(texts(&alice.receive_json(&[])).contains(&"still in step".to_string()));
    assert_clean_error(&alice.run(&["send", "gang", "blocked again?"]), "accept-device");
    // The direct conversation with bob is not affected.
    alice.send("bob", "unaffected");
}

#[test]
fn a_welcome_whose_members_the_directory_contradicts_is_refused() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let _carol = User::register(&server, "carol");
    let mallory = Mallory::register(&server, "mallory");
    let (fake_carol, fake_engine) = fake_device("carol");
    plant(&server, &fake_carol);
    let info = ConversationInfo { kind: ConversationKind::Group, name: "lure".into() };
    let mut kps = mallory.claim("alice");
    kps.push(fake_engine.generate_key_package_in(subrosa_core::PQ_CIPHERSUITE).expect("kp"));
    mallory.create(&info, &kps);
    let (stdout, err) = receive(&alice);
    assert!(err.contains("refused") && err.contains("mallory"), "{err}");
    assert!(!stdout.contains("lure"), "{stdout}");
    assert!(!alice.ok(&["groups"]).contains("lure"));
}

#[test]
fn a_store_made_by_the_first_wave_knows_every_conversation_id_it_held() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/sqlite");
    for who in ["alice", "bob", "carol"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).expect("home");
        for f in ["kdf.json", "subrosa.db"] {
            std::fs::copy(fixtures.join(who).join(f), home.join(f)).expect("copy fixture");
        }
        let store = <subrosa_client::store::Store as subrosa_client::store::OnDisk>::open(&home, "fixture passphrase")
            .expect("migrates");
        let mut rows = store.read(|tx| tx.active_conversations()).expect("conversations");
        rows.extend(store.read(|tx| tx.group_rows()).expect("groups"));
        assert!(!rows.is_empty(), "{who} holds conversations");
        for r in &rows {
            assert!(store.read(|tx| tx.ever_knew(&r.id)).expect("known"), "{who}: {} not recorded", r.id.to_hex());
        }
        let friends = store.read(|tx| tx.groups_named("friends")).expect("groups");
        assert!(!friends.is_empty(), "{who} is in friends");
        for g in &friends {
            // Whoever spoke (or made a change) there counts as a member seen.
            assert!(
                store.read(|tx| tx.was_member(&g.id, "alice")).expect("past members"),
                "{who}: alice created friends"
            );
        }
    }
}

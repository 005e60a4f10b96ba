//! The behaviour every [`Store`] backend must show.
//!
//! Each function takes a fresh or shared store and panics on a violation;
//! they use unique random handles and compare counts before and after, so
//! they can also run one after another on the same store ([`run_all`]).
//! A backend's test module calls them, one test per behaviour; the SQLite
//! backend does so in `store::sqlite::tests`.

#![allow(clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::sync::Arc;

use subrosa_proto::{
    BlobId, CommitGuard, ConversationId, DeviceAddress, DeviceId, DeviceRecord, Epoch, Handle, LinkId, MessageKind,
    SendId, SendPart, SendRequest, B64,
};

use super::{
    BlobLimits, ClaimKind, NewAccount, Quota, QuotaScope, Store, StoreError, CLAIM_WINDOW_MS, MAX_DEVICES_PER_ACCOUNT,
    MAX_STORED_KEY_PACKAGES, ONE_TIME_CLAIMS_PER_CLAIMER,
};

const NOW: u64 = 1_700_000_000_000;

/// A device record with random id and key bytes (the store checks neither).
pub fn random_device() -> DeviceRecord {
    DeviceRecord {
        device_id: DeviceId(rand::random()),
        signature_key: B64(rand::random::<[u8; 32]>().to_vec()),
        certificate: B64(b"certificate".to_vec()),
    }
}

fn random_handle(prefix: &str) -> Handle {
    Handle::new(&format!("{prefix}{}", hex::encode(rand::random::<[u8; 6]>()))).expect("valid handle")
}

/// A random conversation id.
pub fn random_conversation() -> ConversationId {
    ConversationId(rand::random())
}

/// Registers a new account with a random handle; returns its device.
pub async fn account(store: &Arc<dyn Store>, prefix: &str) -> DeviceAddress {
    let handle = random_handle(prefix);
    let device = random_device();
    let addr = DeviceAddress { handle: handle.clone(), device: device.device_id };
    store.register(NewAccount { handle, identity_key: vec![7; 32], device }, NOW).await.expect("register");
    addr
}

/// Adds a device to an account.
pub async fn second_device(store: &Arc<dyn Store>, handle: &Handle) -> DeviceAddress {
    let device = random_device();
    let addr = DeviceAddress { handle: handle.clone(), device: device.device_id };
    store.add_device(handle, device, NOW).await.expect("add device");
    addr
}

/// Two fresh accounts (one device each).
pub async fn two_devices(store: &Arc<dyn Store>) -> (DeviceAddress, DeviceAddress) {
    (account(store, "alice").await, account(store, "bob").await)
}

/// A send request with a random send id.
pub fn send_request(
    conversation: ConversationId,
    commit: Option<u64>,
    parts: Vec<(MessageKind, Vec<DeviceAddress>, Vec<u8>)>,
) -> SendRequest {
    SendRequest {
        conversation,
        send_id: SendId(rand::random()),
        commit: commit.map(|e| CommitGuard { epoch: Epoch(e), members: None }),
        parts: parts
            .into_iter()
            .map(|(kind, recipients, ciphertext)| SendPart { kind, recipients, ciphertext: B64(ciphertext) })
            .collect(),
        expires_at: None,
    }
}

fn app(recipients: Vec<DeviceAddress>, ciphertext: &[u8]) -> Vec<(MessageKind, Vec<DeviceAddress>, Vec<u8>)> {
    vec![(MessageKind::Application, recipients, ciphertext.to_vec())]
}

/// Calls `$m!(behaviour, …)` with every behaviour of the suite: the one list
/// that [`run_all`] and each backend's tests expand, so a behaviour added
/// here runs everywhere.
macro_rules! with_behaviours {
    ($m:ident) => {
        $m!(
            register_and_look_up,
            duplicate_handle_is_refused,
            claim_hands_one_time_once_then_last_resort,
            claims_hand_out_packages_of_the_suite_asked_for,
            concurrent_claims_never_share_a_package,
            key_package_upload_is_bounded,
            fan_out_stores_ciphertext_once,
            ack_deletes_only_own_rows_and_last_ack_drops_message,
            send_id_is_idempotent,
            unknown_recipient_stores_nothing,
            stale_epoch_is_refused_with_current,
            concurrent_commits_one_wins,
            expiry_removes_old_rows,
            disappearing_messages_go_at_their_expiry,
            nonce_replay_is_refused,
            send_with_nonce_refuses_replays,
            fetch_respects_cursor_limit_and_bytes,
            removed_device_disappears_everywhere,
            deleted_account_leaves_nothing_but_its_tombstone,
            last_device_cannot_be_removed,
            concurrent_removals_keep_one_device,
            device_count_is_bounded,
            link_slot_lifecycle,
            link_slots_expire,
            link_response_is_handed_out_once,
            one_signing_key_and_one_signed_head_per_epoch,
            non_member_is_refused_and_changes_nothing,
            commit_replaces_roster_with_declared_members,
            removed_device_leaves_rosters,
            commit_reaches_every_member_and_its_committer,
            key_set_replacement_follows_the_rule,
            quota_refuses_a_full_sender_until_its_messages_go,
            conversation_row_lives_while_a_member_device_remains,
            in_roster_follows_the_commits,
            the_relay_key_is_the_first_one_stored,
            send_checks_run_in_one_order,
            throttled_claims_take_last_resort_packages_first,
            one_claimer_draws_few_one_time_packages_an_hour,
            blob_upload_resumes_and_only_readers_download,
            blob_goes_once_every_reader_fetched_it,
            blob_size_limit_and_account_quota,
            blobs_expire_and_free_the_quota,
            concurrent_sends_get_the_answers_of_one_at_a_time,
        );
    };
}
#[cfg(test)]
pub(crate) use with_behaviours;

/// The relay key is stored once: later candidates (another node's, or
/// this node's after a restart) get the first one back.
pub async fn the_relay_key_is_the_first_one_stored(store: Arc<dyn Store>) {
    let first = store.relay_key([1; 32]).await.expect("relay key");
    assert_eq!(first, [1; 32], "a fresh store takes the first candidate");
    assert_eq!(store.relay_key([2; 32]).await.expect("relay key"), first);
    assert_eq!(store.relay_key(rand::random()).await.expect("relay key"), first);
}

/// Runs every behaviour, one after another, on one store.
pub async fn run_all(store: Arc<dyn Store>) {
    macro_rules! each {
        ($($name:ident),* $(,)?) => {
            $($name(Arc::clone(&store)).await;)*
        };
    }
    with_behaviours!(each);
}

/// Registration stores the identity key and device; lookups find them.
pub async fn register_and_look_up(store: Arc<dyn Store>) {
    let handle = random_handle("reg");
    let device = random_device();
    let addr = DeviceAddress { handle: handle.clone(), device: device.device_id };
    assert!(store.device(&addr).await.expect("device").is_none());
    assert!(store.account(&handle).await.expect("account").is_none());
    store
        .register(NewAccount { handle: handle.clone(), identity_key: vec![1; 32], device: device.clone() }, NOW)
        .await
        .expect("register");
    assert_eq!(store.device(&addr).await.expect("device"), Some(device.clone()));
    let info = store.account(&handle).await.expect("account").expect("account exists");
    assert_eq!(info.handle, handle);
    assert_eq!(info.identity_key.as_slice(), &[1; 32]);
    assert_eq!(info.devices, vec![device.clone()]);
    let other = DeviceAddress { handle: handle.clone(), device: DeviceId(rand::random()) };
    assert!(store.device(&other).await.expect("device").is_none());

    let second = random_device();
    store.add_device(&handle, second.clone(), NOW).await.expect("add device");
    let info = store.account(&handle).await.expect("account").expect("account exists");
    assert_eq!(info.devices, vec![device.clone(), second]);
    assert!(matches!(store.add_device(&handle, device, NOW).await, Err(StoreError::DeviceTaken)));
    let nobody = random_handle("nobody");
    assert!(matches!(store.add_device(&nobody, random_device(), NOW).await, Err(StoreError::UnknownHandle)));
}

/// A taken handle is refused and the first account is left as it was.
pub async fn duplicate_handle_is_refused(store: Arc<dyn Store>) {
    let first = account(&store, "dup").await;
    let again = store
        .register(NewAccount { handle: first.handle.clone(), identity_key: vec![9; 32], device: random_device() }, NOW)
        .await;
    assert!(matches!(again, Err(StoreError::HandleTaken)), "got {again:?}");
    let info = store.account(&first.handle).await.expect("account").expect("exists");
    assert_eq!(info.identity_key.as_slice(), &[7; 32]);
    assert_eq!(info.devices.len(), 1);
    assert_eq!(info.devices[0].device_id, first.device);
}

/// A one-time package is handed out once; then the last-resort one, again
/// and again; the caller's own device is skipped.
pub async fn claim_hands_one_time_once_then_last_resort(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let bob2 = second_device(&store, &bob.handle).await;
    assert!(matches!(store.claim_key_packages(&bob.handle, &alice).await, Err(StoreError::NoKeyPackage)));
    let nobody = random_handle("nobody");
    assert!(matches!(store.claim_key_packages(&nobody, &alice).await, Err(StoreError::UnknownHandle)));

    let count = store
        .upload_key_packages(&bob, vec![b"kp-1".to_vec(), b"kp-2".to_vec()], Some(b"kp-lr".to_vec()), false)
        .await
        .expect("upload");
    assert_eq!((count.one_time, count.last_resort), (2, true));
    let count = store.upload_key_packages(&bob2, vec![b"kp2-1".to_vec()], None, false).await.expect("upload");
    assert_eq!((count.one_time, count.last_resort), (1, false));

    let first = store.claim_key_packages(&bob.handle, &alice).await.expect("claim");
    assert_eq!(first.handle, bob.handle);
    assert_eq!(first.identity_key.as_slice(), &[7; 32]);
    assert_eq!(first.packages.len(), 2);
    let by_device = |c: &subrosa_proto::ClaimResponse, d: DeviceId| {
        c.packages.iter().find(|p| p.device.device_id == d).map(|p| (p.key_package.as_slice().to_vec(), p.last_resort))
    };
    assert_eq!(by_device(&first, bob.device), Some((b"kp-1".to_vec(), false)));
    assert_eq!(by_device(&first, bob2.device), Some((b"kp2-1".to_vec(), false)));

    let second = store.claim_key_packages(&bob.handle, &alice).await.expect("claim");
    assert_eq!(by_device(&second, bob.device), Some((b"kp-2".to_vec(), false)));
    assert_eq!(by_device(&second, bob2.device), None, "bob2 has no package left");
    assert_eq!(second.packages.len(), 1);

    for _ in 0..2 {
        let later = store.claim_key_packages(&bob.handle, &alice).await.expect("claim");
        assert_eq!(by_device(&later, bob.device), Some((b"kp-lr".to_vec(), true)));
    }
    let count = store.key_package_count(&bob).await.expect("count");
    assert_eq!((count.one_time, count.last_resort), (0, true));

    // bob's own device claiming bob's packages gets only the other device's.
    store.upload_key_packages(&bob2, vec![b"kp2-2".to_vec()], None, false).await.expect("upload");
    let own = store.claim_key_packages(&bob.handle, &bob).await.expect("claim");
    assert_eq!(own.packages.len(), 1);
    assert_eq!(own.packages[0].device.device_id, bob2.device);

    // A new last-resort package replaces the old one.
    store.upload_key_packages(&bob, vec![], Some(b"kp-lr-2".to_vec()), false).await.expect("upload");
    let replaced = store.claim_key_packages(&bob.handle, &alice).await.expect("claim");
    assert_eq!(by_device(&replaced, bob.device), Some((b"kp-lr-2".to_vec(), true)));

    // A device that rotates its keys replaces every one-time package it
    // still has: the old ones are never handed out again.
    store.upload_key_packages(&bob, vec![b"old-1".to_vec(), b"old-2".to_vec()], None, false).await.expect("upload");
    let count = store
        .upload_key_packages(&bob, vec![b"new-1".to_vec()], Some(b"kp-lr-3".to_vec()), true)
        .await
        .expect("upload");
    assert_eq!((count.one_time, count.last_resort), (1, true));
    let fresh = store.claim_key_packages(&bob.handle, &alice).await.expect("claim");
    assert_eq!(by_device(&fresh, bob.device), Some((b"new-1".to_vec(), false)));
    let after = store.claim_key_packages(&bob.handle, &alice).await.expect("claim");
    assert_eq!(by_device(&after, bob.device), Some((b"kp-lr-3".to_vec(), true)));
}

/// Packages are filed under their suite: a claim hands out only packages
/// of the suite it asks for (one-time, then that suite's last-resort one),
/// never one of another suite in their place; counts and the bound are per
/// suite; the classical suite is what the older calls mean.
pub async fn claims_hand_out_packages_of_the_suite_asked_for(store: Arc<dyn Store>) {
    const PQ: u16 = 65100;
    const CLASSICAL: u16 = subrosa_proto::CLASSICAL_SUITE;
    let (alice, bob) = two_devices(&store).await;
    let bob2 = second_device(&store, &bob.handle).await;
    let count = store
        .upload_key_packages_in(
            &bob,
            vec![(CLASSICAL, b"c-1".to_vec()), (PQ, b"q-1".to_vec()), (PQ, b"q-2".to_vec())],
            vec![(CLASSICAL, b"c-lr".to_vec()), (PQ, b"q-lr".to_vec())],
            false,
        )
        .await
        .expect("upload");
    assert_eq!((count.one_time, count.last_resort), (1, true), "the classical suite's, where older clients look");
    assert_eq!(count.of(PQ), subrosa_proto::SuiteCount { suite: PQ, one_time: 2, last_resort: true });
    // bob2 is a device with classical packages only.
    store.upload_key_packages(&bob2, vec![b"c2-1".to_vec()], Some(b"c2-lr".to_vec()), false).await.expect("upload");
    assert_eq!(store.key_package_count(&bob2).await.expect("count").of(PQ).one_time, 0);

    let claim = |suite| {
        let store = store.clone();
        let (bob, alice) = (bob.clone(), alice.clone());
        async move { store.claim_key_packages_in(&bob.handle, &alice, ClaimKind::OneTime, suite).await }
    };
    let by_device = |c: &subrosa_proto::ClaimResponse, d: DeviceId| {
        c.packages.iter().find(|p| p.device.device_id == d).map(|p| (p.key_package.as_slice().to_vec(), p.last_resort))
    };
    for expected in [b"q-1".as_slice(), b"q-2"] {
        let c = claim(PQ).await.expect("claim");
        assert_eq!(by_device(&c, bob.device), Some((expected.to_vec(), false)));
        assert_eq!(by_device(&c, bob2.device), None, "no package of another suite in its place");
    }
    let c = claim(PQ).await.expect("claim");
    assert_eq!(by_device(&c, bob.device), Some((b"q-lr".to_vec(), true)));
    // The classical suite's packages were untouched by those claims.
    let c = claim(CLASSICAL).await.expect("claim");
    assert_eq!(by_device(&c, bob.device), Some((b"c-1".to_vec(), false)));
    assert_eq!(by_device(&c, bob2.device), Some((b"c2-1".to_vec(), false)));
    let c = store.claim_key_packages(&bob.handle, &alice).await.expect("the older call: classical");
    assert_eq!(by_device(&c, bob.device), Some((b"c-lr".to_vec(), true)));
    // A suite nobody has packages of: none at all.
    assert!(matches!(claim(2).await, Err(StoreError::NoKeyPackage)));

    // A new last-resort package replaces its own suite's only.
    store.upload_key_packages_in(&bob, vec![], vec![(PQ, b"q-lr-2".to_vec())], false).await.expect("upload");
    assert_eq!(by_device(&claim(PQ).await.expect("claim"), bob.device), Some((b"q-lr-2".to_vec(), true)));
    assert_eq!(by_device(&claim(CLASSICAL).await.expect("claim"), bob.device), Some((b"c-lr".to_vec(), true)));

    // Replacing drops every suite's one-time packages, last-resort ones stay.
    store.upload_key_packages_in(&bob, vec![(PQ, b"q-3".to_vec())], vec![], false).await.expect("upload");
    let count = store.upload_key_packages_in(&bob, vec![], vec![], true).await.expect("replace");
    assert_eq!(count.of(PQ), subrosa_proto::SuiteCount { suite: PQ, one_time: 0, last_resort: true });

    // The bound holds per suite: a full classical store does not stop
    // post-quantum packages.
    let carol = account(&store, "carol").await;
    let full: Vec<(u16, Vec<u8>)> =
        (0..MAX_STORED_KEY_PACKAGES).map(|i| (CLASSICAL, i.to_be_bytes().to_vec())).collect();
    store.upload_key_packages_in(&carol, full, vec![], false).await.expect("a full classical store");
    assert!(matches!(
        store.upload_key_packages_in(&carol, vec![(CLASSICAL, b"x".to_vec())], vec![], false).await,
        Err(StoreError::TooManyKeyPackages)
    ));
    let count = store.upload_key_packages_in(&carol, vec![(PQ, b"q".to_vec())], vec![], false).await.expect("pq");
    assert_eq!((count.one_time, count.of(PQ).one_time), (MAX_STORED_KEY_PACKAGES, 1));
}

/// Many concurrent claims never hand the same one-time package out twice.
pub async fn concurrent_claims_never_share_a_package(store: Arc<dyn Store>) {
    let bob = account(&store, "bob").await;
    let packages: Vec<Vec<u8>> = (0..20).map(|i| format!("one-time-{i}").into_bytes()).collect();
    store.upload_key_packages(&bob, packages, Some(b"last".to_vec()), false).await.expect("upload");
    let mut claimers = Vec::new();
    for _ in 0..30 {
        claimers.push(account(&store, "claimer").await);
    }
    let tasks: Vec<_> = claimers
        .into_iter()
        .map(|c| {
            let store = Arc::clone(&store);
            let handle = bob.handle.clone();
            tokio::spawn(async move { store.claim_key_packages(&handle, &c).await })
        })
        .collect();
    let mut seen = HashSet::new();
    let mut last_resort = 0;
    for t in tasks {
        let claim = t.await.expect("task").expect("claim");
        assert_eq!(claim.packages.len(), 1);
        let p = &claim.packages[0];
        if p.last_resort {
            assert_eq!(p.key_package.as_slice(), b"last");
            last_resort += 1;
        } else {
            assert!(seen.insert(p.key_package.as_slice().to_vec()), "a one-time package was handed out twice");
        }
    }
    assert_eq!(seen.len(), 20);
    assert_eq!(last_resort, 10);
}

/// Uploads beyond the stored maximum are refused whole.
pub async fn key_package_upload_is_bounded(store: Arc<dyn Store>) {
    let bob = account(&store, "bob").await;
    let batch = |n: u64| (0..n).map(|i| i.to_le_bytes().to_vec()).collect::<Vec<_>>();
    store.upload_key_packages(&bob, batch(MAX_STORED_KEY_PACKAGES - 1), None, false).await.expect("upload");
    let refused = store.upload_key_packages(&bob, batch(2), None, false).await;
    assert!(matches!(refused, Err(StoreError::TooManyKeyPackages)), "got {refused:?}");
    let count = store.key_package_count(&bob).await.expect("count");
    assert_eq!(count.one_time, MAX_STORED_KEY_PACKAGES - 1);
    let ghost = DeviceAddress { handle: bob.handle.clone(), device: DeviceId(rand::random()) };
    assert!(matches!(
        store.upload_key_packages(&ghost, batch(1), None, false).await,
        Err(StoreError::UnknownDevice(_))
    ));
    assert!(matches!(store.key_package_count(&ghost).await, Err(StoreError::UnknownDevice(_))));
}

/// A send to three devices stores its ciphertext once with three inbox rows.
pub async fn fan_out_stores_ciphertext_once(store: Arc<dyn Store>) {
    let alice = account(&store, "alice").await;
    let bob = account(&store, "bob").await;
    let bob2 = second_device(&store, &bob.handle).await;
    let carol = account(&store, "carol").await;
    let before = store.stats().await.expect("stats");
    let conv = random_conversation();
    let recipients = vec![bob.clone(), bob2.clone(), carol.clone(), bob.clone()];
    let req = send_request(conv, None, app(recipients, b"fan-out ciphertext"));
    let out = store.send(&alice, &req, NOW).await.expect("send");
    assert!(!out.duplicate);
    assert_eq!(out.epoch, None);
    assert_eq!(out.server_time, NOW);
    let woken: HashSet<_> = out.recipients.into_iter().collect();
    assert_eq!(woken, HashSet::from([bob.clone(), bob2.clone(), carol.clone()]));
    let after = store.stats().await.expect("stats");
    assert_eq!(after.messages - before.messages, 1, "ciphertext stored once");
    assert_eq!(after.inbox_rows - before.inbox_rows, 3, "one row per device, duplicates merged");
    for d in [&bob, &bob2, &carol] {
        let env = store.fetch_inbox(d, 0, 10, usize::MAX).await.expect("fetch");
        assert_eq!(env.len(), 1);
        assert_eq!(env[0].ciphertext.as_slice(), b"fan-out ciphertext");
        assert_eq!(env[0].sender, alice);
        assert_eq!(env[0].conversation, conv);
        assert_eq!(env[0].kind, MessageKind::Application);
        assert_eq!(env[0].server_time, NOW);
    }
    assert!(store.fetch_inbox(&alice, 0, 10, usize::MAX).await.expect("fetch").is_empty());

    // Parts are delivered in order, with increasing ids.
    let req = send_request(
        conv,
        None,
        vec![
            (MessageKind::Commit, vec![bob.clone()], b"commit".to_vec()),
            (MessageKind::Welcome, vec![bob.clone()], b"welcome".to_vec()),
            (MessageKind::Application, vec![bob.clone()], b"app".to_vec()),
        ],
    );
    store.send(&alice, &req, NOW + 1).await.expect("send");
    let env = store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch");
    let kinds: Vec<_> = env.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [MessageKind::Application, MessageKind::Commit, MessageKind::Welcome, MessageKind::Application]);
    assert!(env.windows(2).all(|w| w[0].id < w[1].id));
}

/// An ack deletes only the acking device's rows; the message row goes with
/// the last of its inbox rows.
pub async fn ack_deletes_only_own_rows_and_last_ack_drops_message(store: Arc<dyn Store>) {
    let alice = account(&store, "alice").await;
    let bob = account(&store, "bob").await;
    let carol = account(&store, "carol").await;
    let req = send_request(random_conversation(), None, app(vec![bob.clone(), carol.clone()], b"two readers"));
    let before = store.stats().await.expect("stats");
    store.send(&alice, &req, NOW).await.expect("send");
    let bob_env = store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch");
    let carol_env = store.fetch_inbox(&carol, 0, 10, usize::MAX).await.expect("fetch");
    assert_eq!((bob_env.len(), carol_env.len()), (1, 1));

    // Carol acking bob's envelope id deletes nothing.
    assert_eq!(store.ack(&carol, &[bob_env[0].id]).await.expect("ack"), 0);
    assert_eq!(store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch").len(), 1);

    assert_eq!(store.ack(&bob, &[bob_env[0].id, bob_env[0].id, 999_999_999]).await.expect("ack"), 1);
    assert!(store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch").is_empty());
    let mid = store.stats().await.expect("stats");
    assert_eq!(mid.messages - before.messages, 1, "carol has not acked: the message stays");
    assert_eq!(store.fetch_inbox(&carol, 0, 10, usize::MAX).await.expect("fetch").len(), 1);

    assert_eq!(store.ack(&carol, &[carol_env[0].id]).await.expect("ack"), 1);
    let after = store.stats().await.expect("stats");
    assert_eq!(after.messages, before.messages, "the message row goes with the last ack");
    assert_eq!(after.inbox_rows, before.inbox_rows);
    assert_eq!(store.ack(&carol, &[carol_env[0].id]).await.expect("ack"), 0, "acks are idempotent");
}

/// A retried send id stores nothing again and answers as the first time.
pub async fn send_id_is_idempotent(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let conv = random_conversation();
    let req = send_request(conv, Some(0), app(vec![bob.clone()], b"commit once"));
    let first = store.send(&alice, &req, NOW).await.expect("send");
    assert!(!first.duplicate);
    assert_eq!(first.epoch, Some(Epoch(1)));
    let before = store.stats().await.expect("stats");
    let again = store.send(&alice, &req, NOW + 5).await.expect("retry");
    assert!(again.duplicate);
    assert_eq!(again.epoch, Some(Epoch(1)), "a retried commit reports the epoch it made");
    assert_eq!(again.server_time, NOW);
    assert!(again.recipients.is_empty());
    let after = store.stats().await.expect("stats");
    assert_eq!((after.messages, after.inbox_rows), (before.messages, before.inbox_rows));
    assert_eq!(store.conversation_epoch(&conv).await.expect("epoch"), Epoch(1));
    assert_eq!(store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch").len(), 1);

    // The same send id from another device is a different send.
    let carol = account(&store, "carol").await;
    let mut other = send_request(random_conversation(), None, app(vec![bob.clone()], b"x"));
    other.send_id = req.send_id;
    assert!(!store.send(&carol, &other, NOW).await.expect("send").duplicate);
}

/// A send naming an unknown device stores nothing at all.
pub async fn unknown_recipient_stores_nothing(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let ghost = DeviceAddress { handle: bob.handle.clone(), device: DeviceId(rand::random()) };
    let conv = random_conversation();
    let req = send_request(
        conv,
        Some(0),
        vec![
            (MessageKind::Commit, vec![bob.clone()], b"commit".to_vec()),
            (MessageKind::Application, vec![bob.clone(), ghost.clone()], b"app".to_vec()),
        ],
    );
    let before = store.stats().await.expect("stats");
    match store.send(&alice, &req, NOW).await {
        Err(StoreError::UnknownDevice(a)) => assert_eq!(a, ghost),
        other => panic!("expected UnknownDevice, got {other:?}"),
    }
    let after = store.stats().await.expect("stats");
    assert_eq!(
        (after.messages, after.inbox_rows, after.send_ids),
        (before.messages, before.inbox_rows, before.send_ids)
    );
    assert_eq!(store.conversation_epoch(&conv).await.expect("epoch"), Epoch(0), "no epoch bump");
    // The send id was not used up: fixing the request and retrying works.
    let mut fixed = req.clone();
    fixed.parts[1].recipients = vec![bob.clone()];
    assert!(!store.send(&alice, &fixed, NOW).await.expect("send").duplicate);
}

/// A commit for an old epoch is refused with the current epoch, atomically.
pub async fn stale_epoch_is_refused_with_current(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let conv = random_conversation();
    assert_eq!(store.conversation_epoch(&conv).await.expect("epoch"), Epoch(0));
    let wrong_start = send_request(conv, Some(3), app(vec![bob.clone()], b"c"));
    assert!(matches!(store.send(&alice, &wrong_start, NOW).await, Err(StoreError::StaleEpoch { current: Epoch(0) })));
    for e in 0..3 {
        let out = store.send(&alice, &send_request(conv, Some(e), app(vec![bob.clone()], b"c")), NOW).await;
        assert_eq!(out.expect("commit").epoch, Some(Epoch(e + 1)));
    }
    assert_eq!(store.conversation_epoch(&conv).await.expect("epoch"), Epoch(3));
    let before = store.stats().await.expect("stats");
    let stale = send_request(conv, Some(1), app(vec![bob.clone()], b"late commit"));
    match store.send(&alice, &stale, NOW).await {
        Err(StoreError::StaleEpoch { current }) => assert_eq!(current, Epoch(3)),
        other => panic!("expected StaleEpoch, got {other:?}"),
    }
    let after = store.stats().await.expect("stats");
    assert_eq!((after.messages, after.inbox_rows), (before.messages, before.inbox_rows), "nothing stored");
    assert_eq!(store.conversation_epoch(&conv).await.expect("epoch"), Epoch(3));
    // Application messages carry no guard and are never refused for epochs.
    assert!(store.send(&alice, &send_request(conv, None, app(vec![bob.clone()], b"m")), NOW).await.is_ok());
}

/// Of several concurrent commits for the same epoch exactly one wins.
pub async fn concurrent_commits_one_wins(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let mut senders = vec![alice];
    for _ in 0..7 {
        senders.push(account(&store, "member").await);
    }
    let conv = random_conversation();
    // Every sender is a member (a recipient of the creating commit).
    let mut members = vec![bob.clone()];
    members.extend(senders[1..].iter().cloned());
    store.send(&senders[0], &send_request(conv, Some(0), app(members, b"create")), NOW).await.expect("create");
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|s| {
            let store = Arc::clone(&store);
            let req = send_request(conv, Some(1), app(vec![bob.clone()], b"racing commit"));
            tokio::spawn(async move { store.send(&s, &req, NOW).await })
        })
        .collect();
    let mut wins = 0;
    let mut losses = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(out) => {
                assert_eq!(out.epoch, Some(Epoch(2)));
                wins += 1;
            }
            Err(StoreError::StaleEpoch { current }) => {
                assert_eq!(current, Epoch(2));
                losses += 1;
            }
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!((wins, losses), (1, 7));
    assert_eq!(store.conversation_epoch(&conv).await.expect("epoch"), Epoch(2));
    let env = store.fetch_inbox(&bob, 0, 100, usize::MAX).await.expect("fetch");
    assert_eq!(env.len(), 2, "the creating commit and the one winner");
}

/// A sweep removes inbox rows past their time to live and their messages,
/// and leaves newer ones.
pub async fn expiry_removes_old_rows(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let carol = account(&store, "carol").await;
    let conv = random_conversation();
    let old = send_request(conv, None, app(vec![bob.clone(), carol.clone()], b"old"));
    store.send(&alice, &old, 1_000).await.expect("send");
    let new = send_request(conv, None, app(vec![bob.clone()], b"new"));
    store.send(&alice, &new, 5_000).await.expect("send");
    let before = store.stats().await.expect("stats");
    let report = store.sweep(2_000, 0, 0, 0).await.expect("sweep");
    assert!(report.inbox_rows >= 2, "{report:?}");
    assert!(report.messages >= 1, "{report:?}");
    let after = store.stats().await.expect("stats");
    assert!(after.messages < before.messages);
    let env = store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch");
    assert_eq!(env.len(), 1);
    assert_eq!(env[0].ciphertext.as_slice(), b"new");
    assert!(store.fetch_inbox(&carol, 0, 10, usize::MAX).await.expect("fetch").is_empty());
    store.maintenance().await.expect("maintenance");

    // Send ids are swept too: after that, the same id is a new send.
    store.sweep(0, 0, 2_000, 0).await.expect("sweep");
    let again = store.send(&alice, &old, 6_000).await.expect("send");
    assert!(!again.duplicate);
}

/// A message sent with an expiry (disappearing messages) is swept at it,
/// delivered or not, and its bytes go back to the sender's quota; one
/// without an expiry, sent at the same time, stays.
pub async fn disappearing_messages_go_at_their_expiry(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let conv = random_conversation();
    let mut timed = send_request(conv, None, app(vec![bob.clone()], b"gone soon"));
    timed.expires_at = Some(NOW + 1_000);
    store.send(&alice, &timed, NOW).await.expect("send");
    let kept = send_request(conv, None, app(vec![bob.clone()], b"kept"));
    store.send(&alice, &kept, NOW).await.expect("send");
    let used = store.stored_bytes(&alice).await.expect("usage").0;

    // Before its expiry nothing goes.
    store.sweep(0, 0, 0, NOW + 999).await.expect("sweep");
    assert_eq!(store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch").len(), 2);

    let report = store.sweep(0, 0, 0, NOW + 1_000).await.expect("sweep");
    assert!(report.inbox_rows >= 1 && report.messages >= 1, "{report:?}");
    let left = store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch");
    assert_eq!(left.len(), 1, "the expired message is still queued");
    assert_eq!(left[0].ciphertext.as_slice(), b"kept");
    assert_eq!(store.stored_bytes(&alice).await.expect("usage").0, used - b"gone soon".len() as u64);
}

/// A nonce is accepted once per device; sweeping forgets old ones.
pub async fn nonce_replay_is_refused(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    assert!(store.check_nonce(&alice, &nonce, 10_000).await.expect("nonce"));
    assert!(!store.check_nonce(&alice, &nonce, 10_000).await.expect("nonce"), "replay accepted");
    assert!(!store.check_nonce(&alice, &nonce, 20_000).await.expect("nonce"), "replay with new time accepted");
    assert!(store.check_nonce(&bob, &nonce, 10_000).await.expect("nonce"), "nonces are per device");
    let other = hex::encode(rand::random::<[u8; 16]>());
    assert!(store.check_nonce(&alice, &other, 30_000).await.expect("nonce"));
    let report = store.sweep(0, 15_000, 0, 0).await.expect("sweep");
    assert!(report.nonces >= 2);
    assert!(!store.check_nonce(&alice, &other, 30_000).await.expect("nonce"), "a fresh nonce was swept");
}

/// A send with its nonce: stored once; a replayed nonce stores nothing; a
/// refused send still uses up its nonce.
pub async fn send_with_nonce_refuses_replays(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let conv = random_conversation();
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let req = send_request(conv, None, app(vec![bob.clone()], b"once"));
    let out = store
        .send_with_nonce(&alice, &nonce, NOW, &req, &Quota::UNLIMITED, NOW)
        .await
        .expect("send")
        .expect("new nonce");
    assert!(!out.duplicate);
    assert_eq!(out.recipients, vec![bob.clone()]);
    let again = send_request(conv, None, app(vec![bob.clone()], b"twice"));
    assert!(store
        .send_with_nonce(&alice, &nonce, NOW, &again, &Quota::UNLIMITED, NOW)
        .await
        .expect("replay")
        .is_none());
    assert!(!store.check_nonce(&alice, &nonce, NOW).await.expect("nonce"), "the nonce was not remembered");
    assert_eq!(store.fetch_inbox(&bob, 0, 100, usize::MAX).await.expect("fetch").len(), 1, "a replay was stored");
    let ghost = DeviceAddress { handle: bob.handle.clone(), device: DeviceId(rand::random()) };
    let refused = send_request(conv, None, app(vec![ghost.clone()], b"nobody"));
    let other = hex::encode(rand::random::<[u8; 16]>());
    match store.send_with_nonce(&alice, &other, NOW, &refused, &Quota::UNLIMITED, NOW).await {
        Err(StoreError::UnknownDevice(a)) => assert_eq!(a, ghost),
        other => panic!("expected UnknownDevice, got {other:?}"),
    }
    assert!(!store.check_nonce(&alice, &other, NOW).await.expect("nonce"), "a refused send forgot its nonce");
    let tight = Quota { device_bytes: 3, account_bytes: 3 };
    let third = hex::encode(rand::random::<[u8; 16]>());
    let big = send_request(conv, None, app(vec![bob.clone()], b"over"));
    assert!(matches!(
        store.send_with_nonce(&alice, &third, NOW, &big, &tight, NOW).await,
        Err(StoreError::QuotaExceeded { .. })
    ));
    assert!(!store.check_nonce(&alice, &third, NOW).await.expect("nonce"), "a send over quota forgot its nonce");
}

/// Fetching honours the cursor, the count limit and the byte budget.
pub async fn fetch_respects_cursor_limit_and_bytes(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let conv = random_conversation();
    for i in 0..5u8 {
        let req = send_request(conv, None, app(vec![bob.clone()], &[i; 100]));
        store.send(&alice, &req, NOW).await.expect("send");
    }
    let all = store.fetch_inbox(&bob, 0, 100, usize::MAX).await.expect("fetch");
    assert_eq!(all.len(), 5);
    let two = store.fetch_inbox(&bob, 0, 2, usize::MAX).await.expect("fetch");
    assert_eq!(two, all[..2].to_vec());
    let rest = store.fetch_inbox(&bob, all[1].id, 100, usize::MAX).await.expect("fetch");
    assert_eq!(rest, all[2..].to_vec());
    let budget = store.fetch_inbox(&bob, 0, 100, 250).await.expect("fetch");
    assert_eq!(budget.len(), 2);
    let tiny = store.fetch_inbox(&bob, 0, 100, 1).await.expect("fetch");
    assert_eq!(tiny.len(), 1, "at least one envelope even over budget");
    let ghost = DeviceAddress { handle: bob.handle.clone(), device: DeviceId(rand::random()) };
    assert!(store.fetch_inbox(&ghost, 0, 100, usize::MAX).await.expect("fetch").is_empty());
}

/// A deleted account leaves nothing: its devices' keys, key packages,
/// inboxes, roster places, blobs (its own and its reads), link slots and
/// claim windows go; others' messages to it go with their last inbox row;
/// what it sent and others have not fetched stays for them, and goes once
/// fetched. Its handle stays as a tombstone (no key, no
/// device) that cannot be registered again; other accounts are untouched.
pub async fn deleted_account_leaves_nothing_but_its_tombstone(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let alice2 = second_device(&store, &alice.handle).await;
    for d in [&alice, &alice2] {
        store.upload_key_packages(d, vec![b"kp".to_vec()], Some(b"lr".to_vec()), false).await.expect("upload");
    }
    store.upload_key_packages(&bob, vec![b"bob-kp".to_vec()], None, false).await.expect("upload");
    let conv = random_conversation();
    let members = [&alice, &alice2, &bob];
    store
        .send(&alice, &commit_with_members(conv, 0, &members, vec![bob.clone(), alice2.clone()]), NOW)
        .await
        .expect("commit");
    store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch");
    let acked: Vec<u64> =
        store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch").iter().map(|e| e.id).collect();
    store.ack(&bob, &acked).await.expect("ack");
    store.send(&alice, &send_request(conv, None, app(vec![bob.clone()], b"from alice")), NOW).await.expect("send");
    store
        .send(&bob, &send_request(conv, None, app(vec![alice.clone(), alice2.clone()], b"to alice")), NOW)
        .await
        .expect("send");
    let alices_blob = new_blob(&store, &alice, 10, std::slice::from_ref(&bob)).await;
    let bobs_blob = new_blob(&store, &bob, 10, &[alice.clone(), alice2.clone()]).await;
    store.create_link(&LinkId(rand::random()), &alice.handle, b"request".to_vec(), NOW + 60_000).await.expect("link");
    store.claim_key_packages_of(&alice.handle, &bob, ClaimKind::Counted { now_ms: NOW }).await.expect("claim");
    assert!(store.check_nonce(&alice, "nonce", NOW).await.expect("nonce"));

    // Only an active device of the account may delete it.
    let ghost = DeviceAddress { handle: alice.handle.clone(), device: DeviceId(rand::random()) };
    assert!(matches!(store.delete_account(&ghost).await, Err(StoreError::UnknownDevice(_))));

    let mut removed = store.delete_account(&alice2).await.expect("delete");
    removed.sort_by_key(|a| a.device.to_hex());
    let mut expected = vec![alice.clone(), alice2.clone()];
    expected.sort_by_key(|a| a.device.to_hex());
    assert_eq!(removed, expected);

    let tomb = store.account(&alice.handle).await.expect("account").expect("the tombstone stays");
    assert!(tomb.identity_key.is_empty() && tomb.devices.is_empty(), "{tomb:?}");
    let again = NewAccount { handle: alice.handle.clone(), identity_key: vec![8; 32], device: random_device() };
    assert!(matches!(store.register(again, NOW).await, Err(StoreError::HandleTaken)), "a deleted handle came back");
    for d in [&alice, &alice2] {
        assert!(store.device(d).await.expect("device").is_none());
        assert!(store.fetch_inbox(d, 0, 10, usize::MAX).await.expect("fetch").is_empty());
        assert!(!store.in_roster(&conv, d).await.expect("roster"));
        assert!(matches!(store.key_package_count(d).await, Err(StoreError::UnknownDevice(_))));
    }
    assert!(store.in_roster(&conv, &bob).await.expect("roster"), "bob stays in the conversation");
    let waiting = store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch");
    assert_eq!(waiting.len(), 1, "what alice sent bob before is his");
    assert_eq!(waiting[0].ciphertext.as_slice(), b"from alice");
    let before = store.stats().await.expect("stats").messages;
    store.ack(&bob, &[waiting[0].id]).await.expect("ack");
    assert_eq!(store.stats().await.expect("stats").messages, before - 1, "fetched, it goes");
    assert_eq!(store.stored_bytes(&alice).await.expect("usage").0, 0, "alice's sent bytes still count");
    assert_eq!(store.stored_bytes(&bob).await.expect("usage"), (0, 0), "bob's message to alice still counts");
    assert!(matches!(store.blob_status(&bob, &alices_blob, NOW).await, Err(StoreError::UnknownBlob)));
    assert!(matches!(
        store.claim_key_packages(&alice.handle, &bob).await,
        Err(StoreError::NoKeyPackage | StoreError::UnknownHandle)
    ));
    assert_eq!(
        store.one_time_claims_left(&bob.handle, &alice.handle, NOW).await.expect("left"),
        ONE_TIME_CLAIMS_PER_CLAIMER
    );
    // Bob's blob for alice alone goes (nobody can read it); his packages stay.
    assert!(matches!(store.blob_status(&bob, &bobs_blob, NOW).await, Err(StoreError::UnknownBlob)));
    let (new, readers) = (BlobId(rand::random()), [alice.clone()]);
    let refused = store.create_blob(&bob, &new, 10, &readers, &BlobLimits::UNLIMITED, NOW, BLOB_EXPIRY).await;
    assert!(matches!(refused, Err(StoreError::UnknownDevice(_))), "a deleted device is no reader");
    assert_eq!(store.key_package_count(&bob).await.expect("count").one_time, 1);
}

/// A removed device is gone from lookups, the account, claims and sends; its
/// key packages, pending inbox rows and orphaned messages are deleted; what
/// it sent before stays deliverable; its id is never reused.
pub async fn removed_device_disappears_everywhere(store: Arc<dyn Store>) {
    let alice = account(&store, "alice").await;
    let bob = account(&store, "bob").await;
    let bob2 = second_device(&store, &bob.handle).await;
    let bob2_record = store.device(&bob2).await.expect("device").expect("active");
    store.upload_key_packages(&bob, vec![b"bob-kp".to_vec()], None, false).await.expect("upload");
    store
        .upload_key_packages(
            &bob2,
            vec![b"bob2-kp-1".to_vec(), b"bob2-kp-2".to_vec()],
            Some(b"bob2-lr".to_vec()),
            false,
        )
        .await
        .expect("upload");
    let conv = random_conversation();
    store
        .send(&alice, &send_request(conv, None, app(vec![bob.clone(), bob2.clone()], b"shared")), NOW)
        .await
        .expect("send");
    store.send(&alice, &send_request(conv, None, app(vec![bob2.clone()], b"bob2 only")), NOW).await.expect("send");
    store.send(&bob2, &send_request(conv, None, app(vec![alice.clone()], b"from bob2")), NOW).await.expect("send");
    let before = store.stats().await.expect("stats");

    store.remove_device(&bob2).await.expect("remove");

    let after = store.stats().await.expect("stats");
    assert_eq!(before.one_time_key_packages - after.one_time_key_packages, 2, "its one-time packages are deleted");
    assert_eq!(before.last_resort_key_packages - after.last_resort_key_packages, 1, "its last-resort package too");
    assert_eq!(before.inbox_rows - after.inbox_rows, 2, "its pending rows are deleted");
    assert_eq!(before.messages - after.messages, 1, "only the message no one else waits for goes");
    assert!(store.device(&bob2).await.expect("device").is_none());
    let info = store.account(&bob.handle).await.expect("account").expect("exists");
    assert_eq!(info.devices.iter().map(|d| d.device_id).collect::<Vec<_>>(), vec![bob.device]);
    assert!(store.fetch_inbox(&bob2, 0, 10, usize::MAX).await.expect("fetch").is_empty());
    assert!(matches!(store.key_package_count(&bob2).await, Err(StoreError::UnknownDevice(_))));
    assert!(matches!(
        store.upload_key_packages(&bob2, vec![b"late".to_vec()], None, false).await,
        Err(StoreError::UnknownDevice(_))
    ));
    // Claims skip it; bob's own package is all there is.
    let claim = store.claim_key_packages(&bob.handle, &alice).await.expect("claim");
    assert_eq!(claim.packages.len(), 1);
    assert_eq!(claim.packages[0].device.device_id, bob.device);
    assert!(matches!(store.claim_key_packages(&bob.handle, &alice).await, Err(StoreError::NoKeyPackage)));
    // The shared message still waits for bob; what bob2 sent still reaches alice.
    let env = store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch");
    assert_eq!(env.iter().map(|e| e.ciphertext.as_slice()).collect::<Vec<_>>(), vec![&b"shared"[..]]);
    let env = store.fetch_inbox(&alice, 0, 10, usize::MAX).await.expect("fetch");
    assert_eq!(env.len(), 1);
    assert_eq!((env[0].sender.clone(), env[0].ciphertext.as_slice()), (bob2.clone(), &b"from bob2"[..]));
    // Sends naming it are refused like an unknown device, storing nothing.
    let req = send_request(conv, None, app(vec![bob.clone(), bob2.clone()], b"too late"));
    match store.send(&alice, &req, NOW).await {
        Err(StoreError::UnknownDevice(a)) => assert_eq!(a, bob2),
        other => panic!("expected UnknownDevice, got {other:?}"),
    }
    assert_eq!(store.stats().await.expect("stats").inbox_rows, after.inbox_rows);
    // Gone for good: removing again is unknown, the id cannot come back.
    assert!(matches!(store.remove_device(&bob2).await, Err(StoreError::UnknownDevice(_))));
    assert!(matches!(store.add_device(&bob.handle, bob2_record, NOW).await, Err(StoreError::DeviceTaken)));
    assert!(store.device(&bob2).await.expect("device").is_none());
    let ghost = DeviceAddress { handle: bob.handle.clone(), device: DeviceId(rand::random()) };
    assert!(matches!(store.remove_device(&ghost).await, Err(StoreError::UnknownDevice(_))));
    let nobody = DeviceAddress { handle: random_handle("nobody"), device: DeviceId(rand::random()) };
    assert!(matches!(store.remove_device(&nobody).await, Err(StoreError::UnknownDevice(_))));
}

/// An account's last active device cannot be removed, whoever asks.
pub async fn last_device_cannot_be_removed(store: Arc<dyn Store>) {
    let alice = account(&store, "alice").await;
    assert!(matches!(store.remove_device(&alice).await, Err(StoreError::LastDevice)));
    let alice2 = second_device(&store, &alice.handle).await;
    store.remove_device(&alice).await.expect("remove the first device");
    assert!(matches!(store.remove_device(&alice2).await, Err(StoreError::LastDevice)));
    let info = store.account(&alice.handle).await.expect("account").expect("exists");
    assert_eq!(info.devices.len(), 1);
    assert_eq!(info.devices[0].device_id, alice2.device);
    assert!(store.device(&alice2).await.expect("device").is_some());
}

/// Concurrent removals of every device of an account leave exactly one.
pub async fn concurrent_removals_keep_one_device(store: Arc<dyn Store>) {
    let first = account(&store, "many").await;
    let mut devices = vec![first.clone()];
    for _ in 0..4 {
        devices.push(second_device(&store, &first.handle).await);
    }
    let tasks: Vec<_> = devices
        .into_iter()
        .map(|d| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.remove_device(&d).await })
        })
        .collect();
    let (mut removed, mut refused) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => removed += 1,
            Err(StoreError::LastDevice) => refused += 1,
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!((removed, refused), (4, 1));
    let info = store.account(&first.handle).await.expect("account").expect("exists");
    assert_eq!(info.devices.len(), 1);
}

/// An account holds at most [`MAX_DEVICES_PER_ACCOUNT`] active devices;
/// removed ones do not count.
pub async fn device_count_is_bounded(store: Arc<dyn Store>) {
    let first = account(&store, "full").await;
    let mut last = first.clone();
    for _ in 1..MAX_DEVICES_PER_ACCOUNT {
        last = second_device(&store, &first.handle).await;
    }
    let refused = store.add_device(&first.handle, random_device(), NOW).await;
    assert!(matches!(refused, Err(StoreError::TooManyDevices)), "got {refused:?}");
    let info = store.account(&first.handle).await.expect("account").expect("exists");
    assert_eq!(info.devices.len() as u64, MAX_DEVICES_PER_ACCOUNT);
    store.remove_device(&last).await.expect("remove");
    store.add_device(&first.handle, random_device(), NOW).await.expect("room again after a removal");
}

fn random_link() -> LinkId {
    LinkId(rand::random())
}

/// A slot is visible and approvable only by its account, is approved once,
/// and its response is handed out once, after which the slot is gone.
pub async fn link_slot_lifecycle(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let link = random_link();
    let expires = NOW + 600_000;
    let nobody = random_handle("nobody");
    assert!(matches!(
        store.create_link(&link, &nobody, b"req".to_vec(), expires).await,
        Err(StoreError::UnknownHandle)
    ));
    let before = store.stats().await.expect("stats");
    store.create_link(&link, &alice.handle, b"link request".to_vec(), expires).await.expect("create");
    assert_eq!(store.stats().await.expect("stats").links, before.links + 1);
    assert!(matches!(
        store.create_link(&link, &bob.handle, b"other".to_vec(), expires).await,
        Err(StoreError::LinkTaken)
    ));

    let slot = store.link(&link, &alice.handle, NOW).await.expect("slot");
    assert_eq!(slot.link, link);
    assert_eq!(slot.handle, alice.handle);
    assert_eq!(slot.request, b"link request");
    assert_eq!(slot.expires_at, expires);
    assert!(!slot.approved);
    assert!(matches!(store.link(&link, &bob.handle, NOW).await, Err(StoreError::UnknownLink)));
    assert!(matches!(store.link(&random_link(), &alice.handle, NOW).await, Err(StoreError::UnknownLink)));
    assert_eq!(store.take_link_response(&link, NOW).await.expect("poll"), None, "pending");

    assert!(matches!(
        store.approve_link(&link, &bob.handle, b"stolen".to_vec(), NOW).await,
        Err(StoreError::UnknownLink)
    ));
    assert!(matches!(
        store.approve_link(&random_link(), &alice.handle, b"x".to_vec(), NOW).await,
        Err(StoreError::UnknownLink)
    ));
    store.approve_link(&link, &alice.handle, b"link response".to_vec(), NOW).await.expect("approve");
    assert!(matches!(
        store.approve_link(&link, &alice.handle, b"second".to_vec(), NOW).await,
        Err(StoreError::LinkAlreadyApproved)
    ));
    assert!(store.link(&link, &alice.handle, NOW).await.expect("slot").approved);

    assert_eq!(store.take_link_response(&link, NOW).await.expect("poll"), Some(b"link response".to_vec()));
    assert!(matches!(store.take_link_response(&link, NOW).await, Err(StoreError::UnknownLink)), "one time");
    assert!(matches!(store.link(&link, &alice.handle, NOW).await, Err(StoreError::UnknownLink)));
    assert_eq!(store.stats().await.expect("stats").links, before.links, "the slot is deleted");
    assert!(matches!(store.take_link_response(&random_link(), NOW).await, Err(StoreError::UnknownLink)));
}

/// An expired slot answers like a missing one before any sweep; the sweep
/// deletes it (and frees its id).
pub async fn link_slots_expire(store: Arc<dyn Store>) {
    let alice = account(&store, "alice").await;
    let (pending, approved) = (random_link(), random_link());
    let expires = NOW + 1_000;
    store.create_link(&pending, &alice.handle, b"pending".to_vec(), expires).await.expect("create");
    store.create_link(&approved, &alice.handle, b"approved".to_vec(), expires).await.expect("create");
    store.approve_link(&approved, &alice.handle, b"resp".to_vec(), expires - 1).await.expect("approve");
    assert!(store.link(&pending, &alice.handle, expires - 1).await.is_ok());
    assert_eq!(store.take_link_response(&pending, expires - 1).await.expect("poll"), None);
    for link in [pending, approved] {
        assert!(matches!(store.link(&link, &alice.handle, expires).await, Err(StoreError::UnknownLink)));
        assert!(matches!(store.take_link_response(&link, expires).await, Err(StoreError::UnknownLink)));
    }
    assert!(matches!(
        store.approve_link(&pending, &alice.handle, b"late".to_vec(), expires).await,
        Err(StoreError::UnknownLink)
    ));

    let before = store.stats().await.expect("stats");
    store.sweep(0, 0, 0, expires - 1).await.expect("sweep");
    assert_eq!(store.stats().await.expect("stats").links, before.links, "nothing expired yet");
    let report = store.sweep(0, 0, 0, expires).await.expect("sweep");
    assert!(report.links >= 2, "{report:?}");
    assert_eq!(store.stats().await.expect("stats").links, before.links - 2);
    // The id is free again.
    store.create_link(&pending, &alice.handle, b"again".to_vec(), expires + 1_000).await.expect("create");
    assert_eq!(store.link(&pending, &alice.handle, expires).await.expect("slot").request, b"again");
}

/// Of many concurrent polls of an approved slot exactly one gets the response.
pub async fn link_response_is_handed_out_once(store: Arc<dyn Store>) {
    let alice = account(&store, "alice").await;
    let link = random_link();
    store.create_link(&link, &alice.handle, b"req".to_vec(), NOW + 600_000).await.expect("create");
    store.approve_link(&link, &alice.handle, b"the response".to_vec(), NOW).await.expect("approve");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.take_link_response(&link, NOW).await })
        })
        .collect();
    let (mut got, mut gone) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(Some(r)) => {
                assert_eq!(r, b"the response");
                got += 1;
            }
            Err(StoreError::UnknownLink) => gone += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((got, gone), (1, 9));
}

/// The directory's head-signing key is made once (racing first starts
/// agree), and an epoch's signed head is stored once: every racing writer
/// gets the first one back.
pub async fn one_signing_key_and_one_signed_head_per_epoch(store: Arc<dyn Store>) {
    let kt = store.kt_storage();
    let first = kt.kt_signing_key([1; 32], [2; 16]).await.expect("key");
    assert_eq!(kt.kt_signing_key([3; 32], [4; 16]).await.expect("key"), first, "the stored key stays");
    let epoch = kt.kt_highest_signed().await.expect("highest").unwrap_or(0) + 1000;
    assert_eq!(kt.kt_signed_head(epoch).await.expect("read"), None);
    let writers: Vec<_> = (0u8..8)
        .map(|i| {
            let kt = Arc::clone(&kt);
            tokio::spawn(async move { kt.kt_put_signed_head(epoch, vec![i; 161]).await.expect("put") })
        })
        .collect();
    let mut stored = Vec::new();
    for w in writers {
        stored.push(w.await.expect("task"));
    }
    assert!(stored.windows(2).all(|w| w[0] == w[1]), "one head for the epoch");
    assert_eq!(kt.kt_signed_head(epoch).await.expect("read"), Some(stored[0].clone()));
    assert_eq!(kt.kt_highest_signed().await.expect("highest"), Some(epoch));
}

/// A commit declaring these members.
fn commit_with_members(
    conversation: ConversationId,
    epoch: u64,
    members: &[&DeviceAddress],
    recipients: Vec<DeviceAddress>,
) -> SendRequest {
    let mut req = send_request(conversation, Some(epoch), vec![(MessageKind::Commit, recipients, b"commit".to_vec())]);
    req.commit =
        Some(CommitGuard { epoch: Epoch(epoch), members: Some(members.iter().map(|m| (*m).clone()).collect()) });
    req
}

/// A device outside a conversation's roster can neither commit (whatever
/// the epoch it names) nor post to it, and its attempts change nothing: the
/// members go on committing.
pub async fn non_member_is_refused_and_changes_nothing(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let mallory = account(&store, "mallory").await;
    let conv = random_conversation();
    let create = commit_with_members(conv, 0, &[&alice, &bob], vec![bob.clone()]);
    assert_eq!(store.send(&alice, &create, NOW).await.expect("create").epoch, Some(Epoch(1)));
    let before = store.stats().await.expect("stats");
    for epoch in [0, 1, 2] {
        let attack = commit_with_members(conv, epoch, &[&mallory], vec![alice.clone()]);
        assert!(matches!(store.send(&mallory, &attack, NOW).await, Err(StoreError::NotAMember)), "commit at {epoch}");
        let legacy = send_request(conv, Some(epoch), app(vec![alice.clone()], b"legacy commit"));
        assert!(matches!(store.send(&mallory, &legacy, NOW).await, Err(StoreError::NotAMember)));
    }
    let post = send_request(conv, None, app(vec![alice.clone(), bob.clone()], b"spam"));
    assert!(matches!(store.send(&mallory, &post, NOW).await, Err(StoreError::NotAMember)));
    let after = store.stats().await.expect("stats");
    assert_eq!((after.messages, after.inbox_rows), (before.messages, before.inbox_rows), "nothing stored");
    assert_eq!(store.conversation_epoch(&conv).await.expect("epoch"), Epoch(1), "the epoch did not move");
    let alice_inbox = store.fetch_inbox(&alice, 0, 10, usize::MAX).await.expect("fetch");
    assert_eq!(alice_inbox.len(), 1, "only the echo of her own creating commit");
    // The members are not stalled.
    let next = commit_with_members(conv, 1, &[&alice, &bob], vec![alice.clone()]);
    assert_eq!(store.send(&bob, &next, NOW).await.expect("bob commits").epoch, Some(Epoch(2)));
    let hello = send_request(conv, None, app(vec![bob.clone()], b"hello"));
    assert!(store.send(&alice, &hello, NOW).await.is_ok());
    // A conversation the server has no roster for yet accepts anyone's
    // application messages (there is nothing to check against).
    let open = send_request(random_conversation(), None, app(vec![alice.clone()], b"hi"));
    assert!(store.send(&mallory, &open, NOW).await.is_ok());
}

/// Each accepted commit replaces the roster with the members it declares;
/// an older client's commit (no list) adds its sender and recipients.
pub async fn commit_replaces_roster_with_declared_members(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let carol = account(&store, "carol").await;
    let conv = random_conversation();
    // Legacy creation: sender and recipients are the roster.
    let create = send_request(conv, Some(0), vec![(MessageKind::Welcome, vec![bob.clone()], b"welcome".to_vec())]);
    store.send(&alice, &create, NOW).await.expect("create");
    let from_bob = send_request(conv, None, app(vec![alice.clone()], b"m"));
    assert!(store.send(&bob, &from_bob, NOW).await.is_ok(), "a recipient of the creating send is a member");
    let from_carol = send_request(conv, None, app(vec![alice.clone()], b"m"));
    assert!(matches!(store.send(&carol, &from_carol, NOW).await, Err(StoreError::NotAMember)));
    // Alice adds carol and removes bob.
    let change = commit_with_members(conv, 1, &[&alice, &carol], vec![bob.clone(), carol.clone()]);
    store.send(&alice, &change, NOW).await.expect("commit");
    let from_carol = send_request(conv, None, app(vec![alice.clone()], b"m"));
    assert!(store.send(&carol, &from_carol, NOW).await.is_ok(), "carol was added");
    let from_bob = send_request(conv, None, app(vec![alice.clone()], b"m"));
    assert!(matches!(store.send(&bob, &from_bob, NOW).await, Err(StoreError::NotAMember)), "bob was removed");
    let bob_commit = commit_with_members(conv, 2, &[&bob], vec![alice.clone()]);
    assert!(matches!(store.send(&bob, &bob_commit, NOW).await, Err(StoreError::NotAMember)));
    // A retry of an accepted send answers as a duplicate, roster or not.
    let again = store.send(&alice, &change, NOW).await.expect("retry");
    assert!(again.duplicate);
    assert_eq!(again.epoch, Some(Epoch(2)));
}

/// Who may have a call relay token: exactly the active devices of the
/// roster the commits set; nobody for a conversation without one.
pub async fn in_roster_follows_the_commits(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let carol = account(&store, "carol").await;
    let phone = second_device(&store, &alice.handle).await;
    let conv = random_conversation();
    assert!(!store.in_roster(&conv, &alice).await.expect("read"), "unknown conversation");
    let create = commit_with_members(conv, 0, &[&alice, &phone, &bob], vec![phone.clone(), bob.clone()]);
    store.send(&alice, &create, NOW).await.expect("create");
    for (device, member) in [(&alice, true), (&phone, true), (&bob, true), (&carol, false)] {
        assert_eq!(store.in_roster(&conv, device).await.expect("read"), member, "{device}");
    }
    let other = random_conversation();
    assert!(!store.in_roster(&other, &alice).await.expect("read"), "another conversation");
    let remove_bob = commit_with_members(conv, 1, &[&alice, &phone], vec![phone.clone(), bob.clone()]);
    store.send(&alice, &remove_bob, NOW).await.expect("commit");
    assert!(!store.in_roster(&conv, &bob).await.expect("read"), "bob was removed");
    store.remove_device(&phone).await.expect("remove");
    assert!(!store.in_roster(&conv, &phone).await.expect("read"), "a revoked device");
    assert!(store.in_roster(&conv, &alice).await.expect("read"));
}

/// A removed device leaves the rosters: a commit that still lists it (its
/// removal not committed yet) does not bring it back.
pub async fn removed_device_leaves_rosters(store: Arc<dyn Store>) {
    let alice = account(&store, "alice").await;
    let stolen = second_device(&store, &alice.handle).await;
    let bob = account(&store, "bob").await;
    let conv = random_conversation();
    let create = commit_with_members(conv, 0, &[&alice, &stolen, &bob], vec![stolen.clone(), bob.clone()]);
    store.send(&alice, &create, NOW).await.expect("create");
    store.remove_device(&stolen).await.expect("remove");
    assert!(store.send(&stolen, &send_request(conv, None, app(vec![bob.clone()], b"m")), NOW).await.is_err());
    // Bob commits before learning of the removal: his list still names it.
    let commit = commit_with_members(conv, 1, &[&alice, &stolen, &bob], vec![alice.clone()]);
    store.send(&bob, &commit, NOW).await.expect("bob commits: a revoked device in the list is skipped");
    let fetched = store.fetch_inbox(&alice, 0, 10, usize::MAX).await.expect("fetch");
    assert_eq!(fetched.len(), 2, "her echo and bob's commit");
}

/// An accepted commit reaches every device of the roster, even those its
/// committer did not name, and its committer too when it declares its
/// members (the echo); an older client's commit is not echoed.
pub async fn commit_reaches_every_member_and_its_committer(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let carol = account(&store, "carol").await;
    let conv = random_conversation();
    let create = commit_with_members(conv, 0, &[&alice, &bob, &carol], vec![bob.clone(), carol.clone()]);
    let out = store.send(&alice, &create, NOW).await.expect("create");
    assert!(out.recipients.contains(&alice), "the committer is woken for its echo");
    // Bob names only alice: carol gets the commit anyway.
    let commit = commit_with_members(conv, 1, &[&alice, &bob, &carol], vec![alice.clone()]);
    store.send(&bob, &commit, NOW).await.expect("commit");
    let inbox = |who: DeviceAddress| {
        let store = Arc::clone(&store);
        async move { store.fetch_inbox(&who, 0, 100, usize::MAX).await.expect("fetch") }
    };
    let got = inbox(carol.clone()).await;
    assert_eq!(got.len(), 2, "carol: the creation and bob's commit");
    // A commit carries the roster it left; other messages none.
    let mut roster = got[1].roster.clone().expect("a commit carries the roster");
    roster.sort_by_key(|a| a.to_string());
    let mut expected = vec![alice.clone(), bob.clone(), carol.clone()];
    expected.sort_by_key(|a| a.to_string());
    assert_eq!(roster, expected);
    assert_eq!(inbox(bob.clone()).await.len(), 2, "bob: the creation and his own commit's echo");
    assert_eq!(inbox(alice.clone()).await.len(), 2, "alice: her echo and bob's commit");
    // An application message is not fanned out beyond whom it names.
    store.send(&bob, &send_request(conv, None, app(vec![alice.clone()], b"m")), NOW).await.expect("send");
    assert_eq!(inbox(carol.clone()).await.len(), 2);
    assert!(inbox(alice.clone()).await.last().expect("message").roster.is_none());
    // A legacy commit (no member list) reaches the roster but not its sender.
    store
        .send(
            &carol,
            &send_request(conv, Some(2), vec![(MessageKind::Commit, vec![alice.clone()], b"c".to_vec())]),
            NOW,
        )
        .await
        .expect("legacy commit");
    assert_eq!(inbox(carol.clone()).await.len(), 2, "no echo for a legacy client");
    assert_eq!(inbox(bob.clone()).await.len(), 3);
    // A device the commit adds gets its Welcome, not the commit (it could
    // not process it): the commit goes to the roster before it.
    let dave = account(&store, "dave").await;
    let mut add = commit_with_members(conv, 3, &[&alice, &bob, &carol, &dave], vec![bob.clone()]);
    add.parts.push(SendPart {
        kind: MessageKind::Welcome,
        recipients: vec![dave.clone()],
        ciphertext: B64(b"w".to_vec()),
    });
    store.send(&alice, &add, NOW).await.expect("add dave");
    let got = inbox(dave.clone()).await;
    assert_eq!(got.iter().map(|e| e.kind).collect::<Vec<_>>(), [MessageKind::Welcome]);
}

/// `replace_keys`: a device may replace its own signature key, or the
/// account's identity key with every device re-certified; never another
/// device's key, never a set that is not exactly the active devices. Key
/// packages made under old keys are gone.
pub async fn key_set_replacement_follows_the_rule(store: Arc<dyn Store>) {
    let alice = account(&store, "alice").await;
    let alice2 = second_device(&store, &alice.handle).await;
    let carol = account(&store, "carol").await;
    for d in [&alice, &alice2] {
        store.upload_key_packages(d, vec![b"kp".to_vec()], Some(b"lr".to_vec()), false).await.expect("upload");
    }
    let current = store.account(&alice.handle).await.expect("account").expect("exists");
    let record = |d: &DeviceAddress| current.devices.iter().find(|r| r.device_id == d.device).cloned().expect("listed");
    let identity = current.identity_key.as_slice().to_vec();

    // A device's own new signature key: only its packages go.
    let mut own = record(&alice);
    own.signature_key = B64(vec![1; 32]);
    own.certificate = B64(b"new certificate".to_vec());
    store.replace_keys(&alice, identity.clone(), vec![own.clone(), record(&alice2)]).await.expect("rekey");
    let after = store.account(&alice.handle).await.expect("account").expect("exists");
    assert!(after.devices.contains(&own));
    assert_eq!(store.device(&alice).await.expect("device").expect("active").signature_key, own.signature_key);
    let claimed = store.claim_key_packages(&alice.handle, &carol).await.expect("alice2 still has packages");
    assert_eq!(claimed.packages.len(), 1);
    assert_eq!(claimed.packages[0].device.device_id, alice2.device);

    // Another device's signature key: refused, nothing changed.
    let mut theirs = record(&alice2);
    theirs.signature_key = B64(vec![2; 32]);
    let refused = store.replace_keys(&alice, identity.clone(), vec![own.clone(), theirs]).await;
    assert!(matches!(refused, Err(StoreError::KeySet(_))), "{refused:?}");
    // Another device's certificate without a new identity key: refused.
    let mut recert = record(&alice2);
    recert.certificate = B64(b"other".to_vec());
    let refused = store.replace_keys(&alice, identity.clone(), vec![own.clone(), recert.clone()]).await;
    assert!(matches!(refused, Err(StoreError::KeySet(_))), "{refused:?}");
    // Not exactly the active devices: refused.
    let refused = store.replace_keys(&alice, identity.clone(), vec![own.clone()]).await;
    assert!(matches!(refused, Err(StoreError::KeySet(_))), "{refused:?}");
    let refused =
        store.replace_keys(&alice, identity.clone(), vec![own.clone(), record(&alice2), random_device()]).await;
    assert!(matches!(refused, Err(StoreError::KeySet(_))), "{refused:?}");
    assert_eq!(store.account(&alice.handle).await.expect("account").expect("exists"), after);

    // A new identity key with every device re-certified: every package goes.
    store.replace_keys(&alice, vec![9; 32], vec![own.clone(), recert.clone()]).await.expect("rotate");
    let rotated = store.account(&alice.handle).await.expect("account").expect("exists");
    assert_eq!(rotated.identity_key.as_slice(), &[9; 32]);
    assert!(rotated.devices.contains(&recert));
    assert!(matches!(store.claim_key_packages(&alice.handle, &carol).await, Err(StoreError::NoKeyPackage)));

    // A revoked device can replace nothing.
    store.remove_device(&alice2).await.expect("remove");
    let refused = store.replace_keys(&alice2, vec![9; 32], vec![own.clone()]).await;
    assert!(matches!(refused, Err(StoreError::UnknownDevice(_))), "{refused:?}");
}

/// The quota (see [`Quota`]): a sender's undelivered ciphertext counts once
/// whatever its recipients, until its message row goes (last ack, expiry,
/// removal of the recipients); past the device's or the account's quota a
/// send is refused and stores nothing; other senders are not affected; a
/// duplicate costs nothing.
pub async fn quota_refuses_a_full_sender_until_its_messages_go(store: Arc<dyn Store>) {
    let quota = Quota { device_bytes: 100, account_bytes: 150 };
    let alice = account(&store, "alice").await;
    let alice2 = second_device(&store, &alice.handle).await;
    let bob = account(&store, "bob").await;
    let bob2 = second_device(&store, &bob.handle).await;
    let carol = account(&store, "carol").await;
    let conv = random_conversation();
    let send = |from: &DeviceAddress, to: Vec<DeviceAddress>, bytes: usize| {
        let (store, from, req) = (Arc::clone(&store), from.clone(), send_request(conv, None, app(to, &vec![1; bytes])));
        async move { store.send_within(&from, &req, &quota, NOW).await }
    };
    let first = send_request(conv, None, app(vec![bob.clone(), bob2.clone()], &[1; 60]));
    store.send_within(&alice, &first, &quota, NOW).await.expect("60 bytes");
    assert_eq!(store.stored_bytes(&alice).await.expect("usage"), (60, 60), "counted once for two recipients");
    let before = store.stats().await.expect("stats");
    match send(&alice, vec![bob.clone()], 41).await {
        Err(StoreError::QuotaExceeded { scope: QuotaScope::Device, limit: 100 }) => {}
        other => panic!("expected the device quota, got {other:?}"),
    }
    let after = store.stats().await.expect("stats");
    assert_eq!((after.messages, after.inbox_rows), (before.messages, before.inbox_rows), "nothing stored");
    assert_eq!(store.stored_bytes(&alice).await.expect("usage"), (60, 60));
    send(&alice, vec![bob.clone()], 40).await.expect("up to the quota exactly");
    assert!(store.send_within(&alice, &first, &quota, NOW).await.expect("retry").duplicate, "a duplicate is free");
    send(&carol, vec![bob.clone()], 100).await.expect("another sender has a quota of its own");
    match send(&alice2, vec![bob.clone()], 51).await {
        Err(StoreError::QuotaExceeded { scope: QuotaScope::Account, limit: 150 }) => {}
        other => panic!("expected the account quota, got {other:?}"),
    }
    send(&alice2, vec![bob.clone()], 50).await.expect("up to the account's quota");
    assert_eq!(store.stored_bytes(&alice2).await.expect("usage"), (50, 150));
    // Bob's first device acknowledges everything: the message his second
    // device still waits for stays counted; the others free their bytes.
    let ids: Vec<u64> =
        store.fetch_inbox(&bob, 0, 100, usize::MAX).await.expect("fetch").iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 4);
    store.ack(&bob, &ids).await.expect("ack");
    assert_eq!(store.stored_bytes(&alice).await.expect("usage"), (60, 60));
    assert_eq!(store.stored_bytes(&carol).await.expect("usage"), (0, 0));
    assert!(matches!(send(&alice, vec![bob.clone()], 41).await, Err(StoreError::QuotaExceeded { .. })));
    let ids: Vec<u64> =
        store.fetch_inbox(&bob2, 0, 100, usize::MAX).await.expect("fetch").iter().map(|e| e.id).collect();
    store.ack(&bob2, &ids).await.expect("ack");
    assert_eq!(store.stored_bytes(&alice).await.expect("usage"), (0, 0));
    send(&alice, vec![bob.clone()], 100).await.expect("freed by the acknowledgements");
    // Expiry and the removal of a recipient free bytes too.
    store.sweep(NOW + 1, 0, 0, NOW).await.expect("sweep");
    assert_eq!(store.stored_bytes(&alice).await.expect("usage"), (0, 0), "expired");
    send(&alice2, vec![bob2.clone()], 30).await.expect("send");
    assert_eq!(store.stored_bytes(&alice2).await.expect("usage"), (30, 30));
    store.remove_device(&bob2).await.expect("remove");
    assert_eq!(store.stored_bytes(&alice2).await.expect("usage"), (0, 0), "its recipient was removed");
    // Without a quota the bytes are still counted (a quota set later is exact).
    store.send(&alice, &send_request(conv, None, app(vec![bob.clone()], &[1; 500])), NOW).await.expect("unlimited");
    assert_eq!(store.stored_bytes(&alice).await.expect("usage"), (500, 500));
}

/// A conversation's row (epoch, roster) stays while any device of its
/// roster remains, whoever else leaves, and goes when the last one is
/// removed: the server keeps nothing about a conversation nobody is in.
pub async fn conversation_row_lives_while_a_member_device_remains(store: Arc<dyn Store>) {
    let alice = account(&store, "alice").await;
    let alice2 = second_device(&store, &alice.handle).await;
    let bob = account(&store, "bob").await;
    let bob2 = second_device(&store, &bob.handle).await;
    let before = store.stats().await.expect("stats").conversations;
    let conv = random_conversation();
    let create = commit_with_members(conv, 0, &[&alice, &bob], vec![bob.clone()]);
    store.send(&alice, &create, NOW).await.expect("create");
    let other = random_conversation();
    store.send(&bob2, &commit_with_members(other, 0, &[&bob2], vec![bob2.clone()]), NOW).await.expect("create");
    assert_eq!(store.stats().await.expect("stats").conversations, before + 2);
    store.remove_device(&bob).await.expect("remove bob's device");
    assert_eq!(store.conversation_epoch(&conv).await.expect("epoch"), Epoch(1), "alice's device remains");
    let hello = send_request(conv, None, app(vec![alice2.clone()], b"m"));
    assert!(matches!(store.send(&bob2, &hello, NOW).await, Err(StoreError::NotAMember)), "the roster stays too");
    // A commit by the remaining member keeps it.
    store.send(&alice, &commit_with_members(conv, 1, &[&alice], vec![alice.clone()]), NOW).await.expect("commit");
    assert_eq!(store.conversation_epoch(&conv).await.expect("epoch"), Epoch(2));
    store.remove_device(&alice).await.expect("remove alice's device");
    assert_eq!(store.conversation_epoch(&conv).await.expect("epoch"), Epoch(0), "its last member left: forgotten");
    assert_eq!(store.stats().await.expect("stats").conversations, before + 1, "the other conversation stays");
    assert_eq!(store.conversation_epoch(&other).await.expect("epoch"), Epoch(1));
}

/// A send is checked in one order, the same on every backend (see
/// `store::rules::send`): the sender, then its send id (a duplicate is
/// answered before anything else), membership, the epoch guard, the
/// recipients, the quota. So a stale commit that still names a device
/// removed since is told `stale_epoch` (process the winning commit and
/// retry), never `unknown_device`; and a refusal stores nothing.
pub async fn send_checks_run_in_one_order(store: Arc<dyn Store>) {
    let alice = account(&store, "alice").await;
    let bob = account(&store, "bob").await;
    let bob2 = second_device(&store, &bob.handle).await;
    let mallory = account(&store, "mallory").await;
    let conv = random_conversation();
    let create = commit_with_members(conv, 0, &[&alice, &bob, &bob2], vec![bob.clone(), bob2.clone()]);
    store.send(&alice, &create, NOW).await.expect("create");
    let hello = send_request(conv, None, app(vec![bob.clone(), bob2.clone()], b"hello"));
    store.send(&alice, &hello, NOW).await.expect("hello");
    // Bob's second device is removed; a commit moves the epoch on.
    store.remove_device(&bob2).await.expect("remove");
    let next = commit_with_members(conv, 1, &[&alice, &bob], vec![bob.clone()]);
    store.send(&bob, &next, NOW).await.expect("bob commits");
    let before = store.stats().await.expect("stats");
    let quota = Quota { device_bytes: 1, account_bytes: 1 };

    // A stale commit that names the removed device: stale, whatever else is wrong.
    let stale = commit_with_members(conv, 1, &[&alice, &bob, &bob2], vec![bob.clone(), bob2.clone()]);
    for q in [Quota::UNLIMITED, quota] {
        match store.send_within(&alice, &stale, &q, NOW).await {
            Err(StoreError::StaleEpoch { current: Epoch(2) }) => {}
            other => panic!("a stale commit naming a removed device: expected stale_epoch, got {other:?}"),
        }
    }
    let legacy = send_request(conv, Some(0), app(vec![bob2.clone()], b"old commit"));
    assert!(matches!(store.send(&alice, &legacy, NOW).await, Err(StoreError::StaleEpoch { current: Epoch(2) })));
    // Membership comes before the epoch guard and the recipients.
    let intruder = commit_with_members(conv, 0, &[&mallory], vec![bob2.clone()]);
    assert!(matches!(store.send(&mallory, &intruder, NOW).await, Err(StoreError::NotAMember)));
    let spam = send_request(conv, None, app(vec![bob2.clone()], b"spam"));
    assert!(matches!(store.send(&mallory, &spam, NOW).await, Err(StoreError::NotAMember)));
    // The removed sender itself is unknown before anything else.
    let from_removed = commit_with_members(conv, 0, &[&bob2], vec![alice.clone()]);
    match store.send(&bob2, &from_removed, NOW).await {
        Err(StoreError::UnknownDevice(d)) => assert_eq!(d, bob2),
        other => panic!("expected the sender unknown, got {other:?}"),
    }
    // The recipients come before the quota.
    let current = commit_with_members(conv, 2, &[&alice, &bob], vec![bob.clone(), bob2.clone()]);
    match store.send_within(&alice, &current, &quota, NOW).await {
        Err(StoreError::UnknownDevice(d)) => assert_eq!(d, bob2),
        other => panic!("a current commit naming a removed device: expected unknown_device, got {other:?}"),
    }
    let after = store.stats().await.expect("stats");
    assert_eq!((after.messages, after.inbox_rows), (before.messages, before.inbox_rows), "nothing stored");
    assert_eq!(store.conversation_epoch(&conv).await.expect("epoch"), Epoch(2), "the epoch did not move");
    // A duplicate is answered first of all: a retry of an accepted send
    // whose recipient was removed since, over quota, is still a duplicate.
    let again = store.send_within(&alice, &hello, &quota, NOW).await.expect("duplicate");
    assert!(again.duplicate);
    let again = store.send_within(&alice, &create, &quota, NOW).await.expect("duplicate commit");
    assert_eq!((again.duplicate, again.epoch), (true, Some(Epoch(1))));
    // Over quota, with everything else right.
    let big = send_request(conv, None, app(vec![bob.clone()], b"too much"));
    assert!(matches!(store.send_within(&alice, &big, &quota, NOW).await, Err(StoreError::QuotaExceeded { .. })));
}

/// A claim past its target's one-time budget ([`ClaimKind::LastResortFirst`])
/// takes the last-resort package of each device that has one, leaving its
/// one-time packages, and a one-time package of a device without one (so it
/// still reaches every device).
pub async fn throttled_claims_take_last_resort_packages_first(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let bob2 = second_device(&store, &bob.handle).await;
    store.upload_key_packages(&bob, vec![b"kp-1".to_vec()], Some(b"kp-lr".to_vec()), false).await.expect("upload");
    store.upload_key_packages(&bob2, vec![b"kp2-1".to_vec()], None, false).await.expect("upload");
    let got = store.claim_key_packages_of(&bob.handle, &alice, ClaimKind::LastResortFirst).await.expect("claim");
    let of = |d: &DeviceAddress| {
        got.packages
            .iter()
            .find(|p| p.device.device_id == d.device)
            .map(|p| (p.key_package.as_slice().to_vec(), p.last_resort))
            .expect("a package of every device")
    };
    assert_eq!(of(&bob), (b"kp-lr".to_vec(), true));
    assert_eq!(of(&bob2), (b"kp2-1".to_vec(), false), "no last-resort package: a one-time one");
    assert_eq!(store.key_package_count(&bob).await.expect("count").one_time, 1, "bob's one-time package stays");
    assert_eq!(store.key_package_count(&bob2).await.expect("count").one_time, 0);
    // An unthrottled claim takes the one-time package as before.
    let got = store.claim_key_packages(&bob.handle, &alice).await.expect("claim");
    assert_eq!(got.packages.len(), 1, "bob2 has nothing left");
    assert_eq!((got.packages[0].key_package.as_slice(), got.packages[0].last_resort), (&b"kp-1"[..], false));
    let nobody = random_handle("nobody");
    let missing = store.claim_key_packages_of(&nobody, &alice, ClaimKind::LastResortFirst).await;
    assert!(matches!(missing, Err(StoreError::UnknownHandle)));
}

/// [`ClaimKind::Counted`]: one account draws one-time packages of another
/// in at most [`ONE_TIME_CLAIMS_PER_CLAIMER`] claims per window, then gets
/// last-resort packages; other claimers keep their own allowance, the
/// window starts over after [`CLAIM_WINDOW_MS`], a claim that found no
/// one-time package spends nothing, and the target's own devices are not
/// counted.
pub async fn one_claimer_draws_few_one_time_packages_an_hour(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let carol = account(&store, "carol").await;
    let bob2 = second_device(&store, &bob.handle).await;
    let kps: Vec<Vec<u8>> = (0..8).map(|i| format!("kp-{i}").into_bytes()).collect();
    store.upload_key_packages(&bob, kps, Some(b"kp-lr".to_vec()), false).await.expect("upload");
    let counted = |now_ms| ClaimKind::Counted { now_ms };
    let claim = |by: DeviceAddress, now_ms: u64| {
        let (store, target) = (Arc::clone(&store), bob.handle.clone());
        async move {
            let got = store.claim_key_packages_of(&target, &by, counted(now_ms)).await.expect("claim");
            let p = got.packages.iter().find(|p| p.device.device_id == bob.device).expect("bob's package");
            (p.key_package.as_slice().to_vec(), p.last_resort)
        }
    };
    let left = |who: &DeviceAddress, now_ms: u64| {
        let (store, who, target) = (Arc::clone(&store), who.handle.clone(), bob.handle.clone());
        async move { store.one_time_claims_left(&who, &target, now_ms).await.expect("left") }
    };
    assert_eq!(left(&alice, NOW).await, ONE_TIME_CLAIMS_PER_CLAIMER);
    for i in 0..ONE_TIME_CLAIMS_PER_CLAIMER {
        assert!(!claim(alice.clone(), NOW + i).await.1, "claim {i} within the allowance");
    }
    assert_eq!(left(&alice, NOW + 10).await, 0);
    assert_eq!(claim(alice.clone(), NOW + 10).await, (b"kp-lr".to_vec(), true), "past it: last resort");
    let one_time = |store: Arc<dyn Store>, d: DeviceAddress| async move {
        store.key_package_count(&d).await.expect("count").one_time
    };
    let spent = ONE_TIME_CLAIMS_PER_CLAIMER;
    assert_eq!(one_time(Arc::clone(&store), bob.clone()).await, 8 - spent, "the last-resort claim took none");
    // Another claimer has an allowance of its own.
    assert_eq!(left(&carol, NOW + 10).await, ONE_TIME_CLAIMS_PER_CLAIMER);
    assert!(!claim(carol.clone(), NOW + 10).await.1, "carol's own allowance");
    // The window starts at the first claim and lasts CLAIM_WINDOW_MS.
    assert_eq!(left(&alice, NOW + CLAIM_WINDOW_MS - 1).await, 0);
    assert!(claim(alice.clone(), NOW + CLAIM_WINDOW_MS - 1).await.1, "still the first window");
    assert_eq!(left(&alice, NOW + CLAIM_WINDOW_MS).await, ONE_TIME_CLAIMS_PER_CLAIMER);
    assert!(!claim(alice.clone(), NOW + CLAIM_WINDOW_MS).await.1, "a new window");
    assert_eq!(left(&alice, NOW + CLAIM_WINDOW_MS).await, ONE_TIME_CLAIMS_PER_CLAIMER - 1);
    // A node whose clock lags the one that opened the window keeps it.
    assert_eq!(left(&alice, NOW).await, ONE_TIME_CLAIMS_PER_CLAIMER - 1);
    // The target's own devices are not counted.
    for _ in 0..3 {
        assert!(!claim(bob2.clone(), NOW + 20).await.1, "own devices are not counted");
    }
    assert_eq!(one_time(Arc::clone(&store), bob.clone()).await, 8 - spent - 5);
    // A claim that found only the last-resort package spends nothing.
    let erin = account(&store, "erin").await;
    store.upload_key_packages(&erin, Vec::new(), Some(b"erin-lr".to_vec()), false).await.expect("upload");
    let got = store.claim_key_packages_of(&erin.handle, &carol, counted(NOW)).await.expect("claim");
    assert!(got.packages[0].last_resort);
    assert_eq!(store.one_time_claims_left(&carol.handle, &erin.handle, NOW).await.expect("left"), 2);
    // An unknown target is refused before anything is counted.
    let nobody = random_handle("nobody");
    let missing = store.claim_key_packages_of(&nobody, &alice, counted(NOW)).await;
    assert!(matches!(missing, Err(StoreError::UnknownHandle)));
    // The sweeper forgets windows an hour old; they counted nothing any more.
    store.sweep(0, 0, 0, NOW + 3 * CLAIM_WINDOW_MS).await.expect("sweep");
    assert_eq!(left(&alice, NOW + 3 * CLAIM_WINDOW_MS).await, ONE_TIME_CLAIMS_PER_CLAIMER);
}

/// Far enough ahead that no other behaviour's sweep reaches it.
const BLOB_EXPIRY: u64 = NOW + 1_000_000_000;

async fn new_blob(store: &Arc<dyn Store>, owner: &DeviceAddress, size: u64, readers: &[DeviceAddress]) -> BlobId {
    let blob = BlobId(rand::random());
    store
        .create_blob(owner, &blob, size, readers, &BlobLimits::UNLIMITED, NOW, BLOB_EXPIRY)
        .await
        .expect("create blob");
    blob
}

/// An upload takes pieces only at its received offset (a retried piece is
/// told where the upload stands, never stored twice) and never past its
/// size; it finishes only whole; only the named readers download it, only
/// once finished, any range; to everyone else it does not exist.
pub async fn blob_upload_resumes_and_only_readers_download(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let carol = account(&store, "carol").await;
    let blob = new_blob(&store, &alice, 10, std::slice::from_ref(&bob)).await;
    let status = store.blob_status(&alice, &blob, NOW).await.expect("status");
    assert_eq!((status.size, status.received, status.complete), (10, 0, false));
    assert!(matches!(
        store.append_blob(&alice, &blob, 3, b"xyz", NOW).await,
        Err(StoreError::BlobOffset { received: 0 })
    ));
    let s = store.append_blob(&alice, &blob, 0, b"0123", NOW).await.expect("append");
    assert_eq!(s.received, 4);
    // The same piece again (its answer was lost): refused, with the offset.
    assert!(matches!(
        store.append_blob(&alice, &blob, 0, b"0123", NOW).await,
        Err(StoreError::BlobOffset { received: 4 })
    ));
    assert!(matches!(
        store.append_blob(&alice, &blob, 4, b"4567890", NOW).await,
        Err(StoreError::BlobOverrun { size: 10 })
    ));
    assert!(matches!(store.append_blob(&bob, &blob, 4, b"45", NOW).await, Err(StoreError::UnknownBlob)));
    assert!(matches!(store.finish_blob(&alice, &blob, NOW).await, Err(StoreError::BlobIncomplete)));
    assert!(matches!(store.read_blob(&bob, &blob, 0, 10, NOW).await, Err(StoreError::BlobIncomplete)));
    assert_eq!(store.blob_status(&alice, &blob, NOW).await.expect("status").received, 4);
    store.append_blob(&alice, &blob, 4, b"456", NOW).await.expect("append");
    store.append_blob(&alice, &blob, 7, b"789", NOW).await.expect("append");
    assert!(store.finish_blob(&alice, &blob, NOW).await.expect("finish").complete);
    assert!(store.finish_blob(&alice, &blob, NOW).await.expect("finish again").complete);
    assert!(matches!(store.append_blob(&alice, &blob, 10, b"x", NOW).await, Err(StoreError::BlobOffset { .. })));

    assert_eq!(store.read_blob(&bob, &blob, 0, 100, NOW).await.expect("read"), b"0123456789");
    assert_eq!(store.read_blob(&bob, &blob, 2, 6, NOW).await.expect("read"), b"234567");
    assert_eq!(store.read_blob(&bob, &blob, 5, 1, NOW).await.expect("read"), b"5");
    assert!(store.read_blob(&bob, &blob, 10, 5, NOW).await.expect("read").is_empty());
    assert!(store.blob_status(&bob, &blob, NOW).await.expect("status").complete);
    for stranger in [&carol, &alice] {
        assert!(matches!(store.read_blob(stranger, &blob, 0, 10, NOW).await, Err(StoreError::UnknownBlob)));
    }
    assert!(matches!(store.blob_status(&carol, &blob, NOW).await, Err(StoreError::UnknownBlob)));
    assert!(matches!(store.blob_fetched(&carol, &blob, NOW).await, Err(StoreError::UnknownBlob)));
    let missing = BlobId(rand::random());
    assert!(matches!(store.read_blob(&bob, &missing, 0, 10, NOW).await, Err(StoreError::UnknownBlob)));

    // A reader that is not an active device: nothing is created.
    let ghost = DeviceAddress { handle: bob.handle.clone(), device: DeviceId(rand::random()) };
    let refused =
        store.create_blob(&alice, &BlobId(rand::random()), 5, &[ghost], &BlobLimits::UNLIMITED, NOW, BLOB_EXPIRY).await;
    assert!(matches!(refused, Err(StoreError::UnknownDevice(_))), "got {refused:?}");
}

/// A blob stays until every reader said it fetched it (each reader once,
/// whatever it repeats), then it is gone, pieces and all.
pub async fn blob_goes_once_every_reader_fetched_it(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let carol = account(&store, "carol").await;
    let blob = new_blob(&store, &alice, 3, &[bob.clone(), carol.clone(), bob.clone()]).await;
    store.append_blob(&alice, &blob, 0, b"abc", NOW).await.expect("append");
    assert!(matches!(store.blob_fetched(&bob, &blob, NOW).await, Err(StoreError::BlobIncomplete)));
    store.finish_blob(&alice, &blob, NOW).await.expect("finish");
    let before = store.stats().await.expect("stats");
    assert!(!store.blob_fetched(&bob, &blob, NOW).await.expect("fetched"));
    assert!(!store.blob_fetched(&bob, &blob, NOW).await.expect("fetched twice"), "one reader deleted it twice");
    assert_eq!(store.read_blob(&carol, &blob, 0, 3, NOW).await.expect("read"), b"abc");
    assert!(store.blob_fetched(&carol, &blob, NOW).await.expect("fetched"));
    assert!(matches!(store.read_blob(&carol, &blob, 0, 3, NOW).await, Err(StoreError::UnknownBlob)));
    assert!(matches!(store.blob_status(&alice, &blob, NOW).await, Err(StoreError::UnknownBlob)));
    let after = store.stats().await.expect("stats");
    assert_eq!(after.blobs + 1, before.blobs);
    assert_eq!(after.blob_bytes + 3, before.blob_bytes);
}

/// The size limit, then the account's quota (all its devices together,
/// counted by declared size from creation), each with its own error;
/// the quota frees as blobs go.
pub async fn blob_size_limit_and_account_quota(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let alice2 = second_device(&store, &alice.handle).await;
    let limits = BlobLimits { max_bytes: 100, account_bytes: 150 };
    let create = |owner: &DeviceAddress, size: u64| {
        let (store, owner, bob) = (Arc::clone(&store), owner.clone(), bob.clone());
        async move {
            let blob = BlobId(rand::random());
            store.create_blob(&owner, &blob, size, &[bob], &limits, NOW, BLOB_EXPIRY).await.map(|()| blob)
        }
    };
    // The limit names a file's size; its blob may carry the sealing's
    // overhead on top, and not a byte more.
    let over = limits.max_blob() + 1;
    assert!(matches!(create(&alice, over).await, Err(StoreError::BlobTooLarge { limit: 100 })));
    let first = create(&alice, 100).await.expect("within the quota");
    assert!(matches!(create(&alice2, 51).await, Err(StoreError::BlobQuotaExceeded { limit: 150 })));
    create(&alice2, 50).await.expect("exactly the quota");
    assert!(matches!(create(&alice, 1).await, Err(StoreError::BlobQuotaExceeded { limit: 150 })));
    // Another account has its own.
    let other = BlobId(rand::random());
    store.create_blob(&bob, &other, 100, std::slice::from_ref(&alice), &limits, NOW, BLOB_EXPIRY).await.expect("bob");
    // Delivered: the bytes are free again.
    store.append_blob(&alice, &first, 0, &[7; 100], NOW).await.expect("append");
    store.finish_blob(&alice, &first, NOW).await.expect("finish");
    assert!(store.blob_fetched(&bob, &first, NOW).await.expect("fetched"));
    create(&alice, 100).await.expect("freed by delivery");
}

/// A blob past its expiry is unknown at once and swept (finished or not),
/// and its bytes leave its account's quota.
pub async fn blobs_expire_and_free_the_quota(store: Arc<dyn Store>) {
    let (alice, bob) = two_devices(&store).await;
    let limits = BlobLimits { max_bytes: 100, account_bytes: 100 };
    let expires = NOW + 1_000;
    let done = BlobId(rand::random());
    store.create_blob(&alice, &done, 60, std::slice::from_ref(&bob), &limits, NOW, expires).await.expect("create");
    store.append_blob(&alice, &done, 0, &[1; 60], NOW).await.expect("append");
    store.finish_blob(&alice, &done, NOW).await.expect("finish");
    let half = BlobId(rand::random());
    store.create_blob(&alice, &half, 40, std::slice::from_ref(&bob), &limits, NOW, expires).await.expect("create");
    store.append_blob(&alice, &half, 0, &[2; 20], NOW).await.expect("append");
    assert_eq!(store.read_blob(&bob, &done, 0, 60, expires - 1).await.expect("read").len(), 60);
    assert!(matches!(store.read_blob(&bob, &done, 0, 60, expires).await, Err(StoreError::UnknownBlob)));
    assert!(matches!(store.append_blob(&alice, &half, 20, &[2; 20], expires).await, Err(StoreError::UnknownBlob)));
    let report = store.sweep(0, 0, 0, expires).await.expect("sweep");
    assert!(report.blobs >= 2, "{report:?}");
    let again = BlobId(rand::random());
    store.create_blob(&alice, &again, 100, &[bob], &limits, expires, expires + 1_000).await.expect("quota freed");
}

/// What one send of [`concurrent_sends_get_the_answers_of_one_at_a_time`]
/// must be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Stored(Vec<DeviceAddress>),
    Duplicate(u64),
    Epoch(Epoch),
    NotAMember,
    Unknown(DeviceAddress),
    OverQuota,
}

/// Many sends at once (a backend may take them together: PostgreSQL
/// commits a node's concurrent plain sends in one transaction) get, each,
/// the answer the one check order gives it alone: plain sends, multi-part
/// sends, a duplicate, a commit, and each refusal, mixed in one wave. Each
/// recipient's queue then holds exactly what was accepted, each sender's
/// usage counts it, and acknowledgements taken at once (another device's
/// ids among them) delete only their own rows and give the bytes back.
pub async fn concurrent_sends_get_the_answers_of_one_at_a_time(store: Arc<dyn Store>) {
    let quota = Quota { device_bytes: 100_000, account_bytes: 1_000_000 };
    let alice = account(&store, "alice").await;
    let alice2 = second_device(&store, &alice.handle).await;
    let bob = account(&store, "bob").await;
    let carol = account(&store, "carol").await;
    let dave = account(&store, "dave").await;
    let erin = account(&store, "erin").await;
    let erin2 = second_device(&store, &erin.handle).await;
    store.remove_device(&erin2).await.expect("remove");
    let nobody = DeviceAddress { handle: bob.handle.clone(), device: DeviceId(rand::random()) };
    let open = random_conversation();
    let closed = random_conversation();
    let create = commit_with_members(closed, 0, &[&alice, &bob], vec![bob.clone()]);
    assert_eq!(store.send(&alice, &create, NOW).await.expect("create").epoch, Some(Epoch(1)));
    let first = send_request(open, None, app(vec![bob.clone()], b"first"));
    store.send_within(&alice, &first, &quota, NOW - 5).await.expect("first");
    let fill = send_request(open, None, app(vec![bob.clone()], &vec![9; 99_990]));
    store.send_within(&dave, &fill, &quota, NOW).await.expect("dave fills his quota");

    let mut wave: Vec<(DeviceAddress, SendRequest, Expect)> = Vec::new();
    for round in 0..6 {
        for i in 0..8 {
            let body = format!("plain {round} {i}").into_bytes();
            wave.push((
                alice.clone(),
                send_request(open, None, app(vec![bob.clone()], &body)),
                Expect::Stored(vec![bob.clone()]),
            ));
        }
        let mut two = send_request(
            open,
            None,
            vec![
                (MessageKind::Application, vec![bob.clone(), alice2.clone()], format!("two a {round}").into_bytes()),
                (MessageKind::Application, vec![alice2.clone(), carol.clone()], format!("two b {round}").into_bytes()),
            ],
        );
        two.expires_at = Some(NOW + 3_600_000);
        wave.push((alice.clone(), two, Expect::Stored(vec![bob.clone(), alice2.clone(), carol.clone()])));
        let reply =
            send_request(closed, None, app(vec![alice.clone(), alice2.clone()], format!("reply {round}").as_bytes()));
        wave.push((bob.clone(), reply, Expect::Stored(vec![alice.clone(), alice2.clone()])));
        wave.push((alice.clone(), first.clone(), Expect::Duplicate(NOW - 5)));
        let spam = send_request(closed, None, app(vec![bob.clone()], b"spam"));
        wave.push((carol.clone(), spam, Expect::NotAMember));
        let lost = send_request(open, None, app(vec![bob.clone(), nobody.clone()], b"lost"));
        wave.push((carol.clone(), lost, Expect::Unknown(nobody.clone())));
        let ghost = send_request(open, None, app(vec![bob.clone()], b"ghost"));
        wave.push((erin2.clone(), ghost, Expect::Unknown(erin2.clone())));
        let over = send_request(open, None, app(vec![bob.clone()], b"one byte too many"));
        wave.push((dave.clone(), over, Expect::OverQuota));
    }
    let commit = commit_with_members(closed, 1, &[&alice, &bob], vec![bob.clone()]);
    wave.push((alice.clone(), commit, Expect::Epoch(Epoch(2))));

    let answers = futures_util::future::join_all(wave.iter().map(|(from, req, _)| {
        let store = Arc::clone(&store);
        async move { store.send_within(from, req, &quota, NOW).await }
    }))
    .await;
    for ((from, req, expect), answer) in wave.iter().zip(answers) {
        let ok = match (expect, &answer) {
            (Expect::Stored(to), Ok(out)) => {
                !out.duplicate && out.epoch.is_none() && out.server_time == NOW && &out.recipients == to
            }
            (Expect::Duplicate(at), Ok(out)) => out.duplicate && out.server_time == *at && out.recipients.is_empty(),
            (Expect::Epoch(e), Ok(out)) => !out.duplicate && out.epoch == Some(*e),
            (Expect::NotAMember, Err(StoreError::NotAMember)) => true,
            (Expect::Unknown(d), Err(StoreError::UnknownDevice(got))) => got == d,
            (Expect::OverQuota, Err(StoreError::QuotaExceeded { scope: QuotaScope::Device, .. })) => true,
            _ => false,
        };
        assert!(ok, "{from} sending {:?}: expected {expect:?}, got {answer:?}", req.parts[0].ciphertext.0);
    }

    // Each queue holds what was accepted, and nothing refused.
    let queued = |addr: DeviceAddress| {
        let store = Arc::clone(&store);
        async move {
            let mut bodies: Vec<String> = store
                .fetch_inbox(&addr, 0, 10_000, usize::MAX)
                .await
                .expect("fetch")
                .iter()
                .filter(|e| e.kind == MessageKind::Application && e.ciphertext.0.len() < 100)
                .map(|e| String::from_utf8_lossy(&e.ciphertext.0).into_owned())
                .collect();
            bodies.sort();
            bodies
        }
    };
    let expected = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let mut for_bob = vec!["first".to_owned()];
    let mut for_alice2 = Vec::new();
    let mut for_carol = Vec::new();
    let mut for_alice = Vec::new();
    for round in 0..6 {
        for i in 0..8 {
            for_bob.push(format!("plain {round} {i}"));
        }
        for_bob.push(format!("two a {round}"));
        for_alice2.extend([format!("two a {round}"), format!("two b {round}"), format!("reply {round}")]);
        for_carol.push(format!("two b {round}"));
        for_alice.push(format!("reply {round}"));
    }
    assert_eq!(queued(bob.clone()).await, expected(for_bob), "bob's queue");
    assert_eq!(queued(alice2.clone()).await, expected(for_alice2), "alice's second device's queue");
    assert_eq!(queued(carol.clone()).await, expected(for_carol), "carol's queue");
    assert_eq!(queued(alice.clone()).await, expected(for_alice), "alice's queue");

    // Each accepted send counted once against its sender.
    let alice_bytes: u64 = wave
        .iter()
        .filter(|(from, _, e)| *from == alice && matches!(e, Expect::Stored(_) | Expect::Epoch(_)))
        .map(|(_, req, _)| req.parts.iter().map(|p| p.ciphertext.0.len() as u64).sum::<u64>())
        .sum::<u64>()
        + b"first".len() as u64
        + b"commit".len() as u64;
    assert_eq!(store.stored_bytes(&alice).await.expect("usage").0, alice_bytes, "alice's usage");
    assert_eq!(store.stored_bytes(&dave).await.expect("usage").0, 99_990, "dave's usage");

    // Acknowledgements at once, each naming some of another device's ids too.
    let mut everyone: Vec<(DeviceAddress, Vec<u64>)> = Vec::new();
    for addr in [&alice, &alice2, &bob, &carol] {
        let ids = store.fetch_inbox(addr, 0, 10_000, usize::MAX).await.expect("fetch").iter().map(|e| e.id).collect();
        everyone.push((addr.clone(), ids));
    }
    let stolen: Vec<u64> = everyone[2].1.iter().take(3).copied().collect();
    let acks = futures_util::future::join_all(everyone.iter().enumerate().flat_map(|(k, (addr, ids))| {
        let store = Arc::clone(&store);
        let mut chunks: Vec<Vec<u64>> = ids.chunks(5).map(<[u64]>::to_vec).collect();
        if k != 2 {
            chunks.push(stolen.clone());
        }
        chunks.push(ids.iter().take(2).copied().collect());
        chunks.into_iter().map(move |chunk| {
            let (store, addr) = (Arc::clone(&store), addr.clone());
            async move { (addr.clone(), store.ack(&addr, &chunk).await.expect("ack")) }
        })
    }))
    .await;
    for (addr, ids) in &everyone {
        let deleted: u64 = acks.iter().filter(|(a, _)| a == addr).map(|(_, n)| *n).sum();
        assert_eq!(deleted, ids.len() as u64, "{addr}: each of its rows deleted once, no other device's");
        assert!(store.fetch_inbox(addr, 0, 10, usize::MAX).await.expect("fetch").is_empty(), "{addr}: queue empty");
    }
    assert_eq!(store.stored_bytes(&alice).await.expect("usage").0, 0, "alice's bytes given back");
    assert_eq!(store.stored_bytes(&bob).await.expect("usage").0, 0, "bob's bytes given back");
    assert_eq!(store.stored_bytes(&dave).await.expect("usage").0, 0, "dave's bytes given back");
}

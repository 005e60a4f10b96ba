//! The behaviour every [`Store`] backend must show.
//!
//! Each function takes a fresh store and panics on a violation. A backend's
//! test module instantiates all of them with [`with_behaviours`], one test
//! per behaviour: the SQLCipher backend in `subrosa-client`'s `sqlite::tests`,
//! the in-memory one in `memory::tests`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::mpsc;
use std::thread;

use mls_rs_core::group::{GroupState, GroupStateStorage};
use subrosa_core::content::{Body, Content};
use subrosa_core::{ConversationInfo, DeviceIdentity, Engine, Event};
use subrosa_proto::{ConversationId, DeviceAddress, MessageId};
use zeroize::Zeroizing;

use super::*;

/// Every behaviour, for a backend's test module to instantiate.
#[macro_export]
macro_rules! with_behaviours {
    ($m:ident) => {
        $m!(
            meta_round_trip,
            contacts_are_pinned_once_and_key_changes_are_remembered,
            conversations_are_found_by_peer_name_and_prefix,
            ids_stay_known_after_the_conversation_goes,
            key_update_bookkeeping,
            member_checks_upsert_filter_and_drop,
            history_keeps_one_copy_per_message_id_in_arrival_order,
            system_lines_keep_their_typed_event,
            received_after_seq_replays_from_a_number_or_a_time_in_arrival_order,
            unseen_messages_are_handed_out_once,
            sequence_numbers_count_gaps_and_late_arrivals,
            outbox_keeps_sending_order_and_requests,
            pending_commits_one_per_conversation,
            directory_keeps_the_first_root_and_head_per_epoch,
            alerts_are_deduplicated_shown_once_and_cleared,
            group_state_keeps_the_newest_epochs,
            group_state_versions_name_the_stored_bytes,
            key_packages_one_time_and_last_resort,
            a_failed_write_leaves_nothing,
            a_panicking_write_leaves_nothing_and_the_store_goes_on,
            mls_writes_join_the_transaction_that_caused_them,
            a_write_in_progress_is_invisible_to_a_concurrent_reader,
            concurrent_writers_serialize,
            a_write_inside_a_read_is_refused,
            two_engines_exchange_a_message_over_the_store,
            replies_reactions_edits_and_deletes_are_stored,
            a_reaction_sent_last_wins_whatever_order_it_arrives_in,
            receipts_make_the_state_of_own_messages,
            early_actions_and_owed_receipts_wait_and_are_taken_once,
            attachments_are_kept_per_message_and_move_from_pending_to_saved,
            a_conversations_files_are_read_in_one_go,
            link_previews_are_kept_with_their_message_and_go_with_its_text,
        );
    };
}
pub use crate::with_behaviours;

fn conv(n: u8) -> ConversationId {
    ConversationId([n; 16])
}

fn no(why: &str) -> ClientError {
    ClientError::Input(why.into())
}

fn message(from: &str, text: &str, at: u64) -> StoredMessage {
    StoredMessage {
        from: from.into(),
        device: "00".repeat(8),
        sent_at: at,
        received_at: at,
        text: text.into(),
        ..StoredMessage::default()
    }
}

pub fn received_after_seq_replays_from_a_number_or_a_time_in_arrival_order(store: Store) {
    let (a, b, own) = (ConversationId([4; 16]), ConversationId([5; 16]), ConversationId([6; 16]));
    store
        .write(|tx| {
            tx.add_conversation(&a, "direct", "", Some("bob"))?;
            tx.add_conversation(&b, "group", "club", None)?;
            tx.add_conversation(&own, "own", "", None)
        })
        .expect("conversations");
    store
        .write(|tx| {
            tx.insert_message(&message("bob", "old", 10), &a, &[1; 16], true)?;
            tx.insert_message(&message("carol", "in the club", 30), &b, &[2; 16], false)?;
            tx.insert_message(&message("alice", "hidden", 40), &own, &[3; 16], false)?;
            tx.insert_message(&message("bob", "new", 20), &a, &[4; 16], false)
        })
        .expect("messages");
    let read = |after, since| store.read(|tx| tx.received_after_seq(after, since)).expect("read");
    let texts = |after, since| read(after, since).into_iter().map(|(_, m)| m.text).collect::<Vec<_>>();
    // Arrival order (not time order), never the own devices' conversation.
    assert_eq!(texts(0, 0), ["old", "in the club", "new"]);
    assert_eq!(texts(0, 20), ["in the club", "new"]);
    assert_eq!(texts(0, 31), Vec::<String>::new());
    let replayed = read(0, 30);
    assert_eq!((replayed[0].1.target.as_str(), replayed[0].1.group), ("club", true));
    // The numbers grow in arrival order; after one of them comes exactly
    // what arrived later, whatever its clock said.
    let all = read(0, 0);
    let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(texts(seqs[0], 0), ["in the club", "new"]);
    assert_eq!(texts(seqs[1], 0), ["new"]);
    assert_eq!(texts(seqs[2], 0), Vec::<String>::new());
    assert_eq!(texts(u64::MAX, 0), Vec::<String>::new());
    // A later message lands after every number handed out before it.
    store.write(|tx| tx.insert_message(&message("bob", "later", 1), &a, &[5; 16], false)).expect("insert");
    assert_eq!(texts(seqs[2], 0), ["later"]);
}

pub fn system_lines_keep_their_typed_event(store: Store) {
    let id = ConversationId([3; 16]);
    store.write(|tx| tx.add_conversation(&id, "group", "club", None)).expect("conversation");
    let event = crate::SystemEvent::Removed { by: "bob".into(), member: "carol".into() };
    let line = StoredMessage { system: true, event: Some(event.clone()), ..message("bob", "bob removed carol", 1) };
    store.write(|tx| tx.insert_message(&line, &id, &[1; 16], false)).expect("insert");
    store.write(|tx| tx.insert_message(&message("bob", "plain", 2), &id, &[2; 16], false)).expect("insert");
    let row = store.read(|tx| tx.conversation(&id)).expect("read").expect("row");
    let history = store.read(|tx| tx.history(&[row])).expect("history");
    assert_eq!(history.iter().map(|m| m.event.clone()).collect::<Vec<_>>(), [Some(event.clone()), None]);
    let unseen = store.write(|tx| tx.take_unseen()).expect("unseen");
    assert_eq!(unseen[0].event, Some(event));
    assert_eq!(unseen[0].text, "bob removed carol");
}

pub fn meta_round_trip(store: Store) {
    assert_eq!(store.read(|tx| tx.meta("k")).expect("read").map(|v| v.to_vec()), None);
    store.write(|tx| tx.set_meta("k", b"one")).expect("set");
    store.write(|tx| tx.set_meta("k", b"two")).expect("replace");
    assert_eq!(store.read(|tx| tx.meta("k")).expect("read").map(|v| v.to_vec()), Some(b"two".to_vec()));
    store.write(|tx| tx.delete_meta("k")).expect("delete");
    assert_eq!(store.read(|tx| tx.meta("k")).expect("read").map(|v| v.to_vec()), None);
    store.write(|tx| tx.delete_meta("never set")).expect("deleting nothing is fine");
    // A prefix lists its keys only, in order; `_` and `%` are not patterns.
    store
        .write(|tx| {
            for k in ["call.b", "call.a", "calls", "call_x", "cal", "call%"] {
                tx.set_meta(k, b"v")?;
            }
            Ok(())
        })
        .expect("set");
    assert_eq!(store.read(|tx| tx.meta_keys("call.")).expect("keys"), vec!["call.a", "call.b"]);
    assert_eq!(store.read(|tx| tx.meta_keys("call%")).expect("keys"), vec!["call%"]);
    assert!(store.read(|tx| tx.meta_keys("nothing")).expect("keys").is_empty());
}

pub fn contacts_are_pinned_once_and_key_changes_are_remembered(store: Store) {
    store
        .write(|tx| {
            tx.pin_contact("carol", &[3; 32])?;
            tx.pin_contact("bob", &[1; 32])?;
            tx.pin_contact("bob", &[2; 32]) // pinned on first use: ignored
        })
        .expect("pin");
    assert_eq!(store.read(|tx| tx.contact_key("bob")).expect("key"), Some(vec![1; 32]));
    assert_eq!(store.read(|tx| tx.contact_key("dave")).expect("key"), None);
    // An unverified contact's key change blocks nothing.
    assert!(!store.write(|tx| tx.change_contact_key("carol", &[4; 32])).expect("change"));
    assert!(!store.read(|tx| tx.key_change_pending("carol")).expect("pending"));
    store.write(|tx| tx.set_verified("bob", true)).expect("verify");
    assert!(store.write(|tx| tx.change_contact_key("bob", &[5; 32])).expect("change"));
    let (pending, contacts) = store.read(|tx| Ok((tx.key_change_pending("bob")?, tx.contacts()?))).expect("read");
    assert!(pending);
    assert_eq!(
        contacts,
        [
            Contact { handle: "bob".into(), identity_key: hex::encode([5; 32]), verified: false },
            Contact { handle: "carol".into(), identity_key: hex::encode([4; 32]), verified: false },
        ]
    );
    store.write(|tx| tx.clear_key_change("bob")).expect("accept");
    assert!(!store.read(|tx| tx.key_change_pending("bob")).expect("pending"));
    store.write(|tx| tx.change_contact_key("bob", &[6; 32])).expect("change");
    store.write(|tx| tx.set_verified("bob", true)).expect("verify again");
    let c = store.read(|tx| Ok((tx.key_change_pending("bob")?, tx.contacts()?))).expect("read");
    assert!(!c.0 && c.1[0].verified, "verifying clears the pending change");
    // The key before the last change is remembered (and only that one); a
    // "change" to the same key forgets nothing.
    let previous = |h: &'static str| store.read(move |tx| tx.contact_previous_key(h)).expect("previous");
    assert_eq!(previous("bob"), Some(vec![5; 32]));
    assert_eq!(previous("carol"), Some(vec![3; 32]));
    store.write(|tx| tx.change_contact_key("bob", &[6; 32])).expect("same key");
    assert_eq!(previous("bob"), Some(vec![5; 32]));
    assert_eq!(previous("dave"), None);
    store.write(|tx| tx.pin_contact("dave", &[7; 32])).expect("pin");
    assert_eq!(previous("dave"), None, "a first pin has no previous key");
}

pub fn conversations_are_found_by_peer_name_and_prefix(store: Store) {
    store
        .write(|tx| {
            tx.add_conversation(&conv(0xa1), "direct", "", Some("bob"))?;
            tx.add_conversation(&conv(0xa2), "group", "team", None)?;
            tx.add_conversation(&conv(0xb3), "group", "team", None)?;
            tx.add_conversation(&conv(0xa1), "group", "ignored", None) // already there
        })
        .expect("add");
    let row = store.read(|tx| tx.conversation(&conv(0xa1))).expect("read").expect("exists");
    assert_eq!(
        row,
        ConversationRow {
            id: conv(0xa1),
            kind: "direct".into(),
            name: "".into(),
            peer: Some("bob".into()),
            active: true
        }
    );
    assert_eq!(row.target(), "bob");
    store.write(|tx| tx.deactivate_conversation(&conv(0xa2))).expect("leave");
    store.write(|tx| tx.set_conversation_name(&conv(0xb3), "team")).expect("rename");
    let ids = |v: Vec<ConversationRow>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    store
        .read(|tx| {
            assert_eq!(tx.direct_conversation("bob")?, Some(conv(0xa1)));
            assert_eq!(tx.direct_conversation("carol")?, None);
            assert_eq!(ids(tx.conversations_with("bob")?), [conv(0xa1)]);
            assert_eq!(ids(tx.conversations_by_prefix("a")?), [conv(0xa1), conv(0xa2)]);
            assert_eq!(ids(tx.conversations_by_prefix(&"b3".repeat(16))?), [conv(0xb3)]);
            // Active first.
            assert_eq!(ids(tx.groups_named("team")?), [conv(0xb3), conv(0xa2)]);
            assert_eq!(ids(tx.group_rows()?), [conv(0xa2), conv(0xb3)]);
            assert_eq!(ids(tx.active_conversations()?), [conv(0xa1), conv(0xb3)]);
            assert!(tx.conversation_created_at(&conv(0xa1))? > 0);
            assert_eq!(tx.conversation_created_at(&conv(0x99))?, 0);
            Ok(())
        })
        .expect("read");
    // A deactivated direct conversation is not the one to send to.
    store.write(|tx| tx.deactivate_conversation(&conv(0xa1))).expect("deactivate");
    assert_eq!(store.read(|tx| tx.direct_conversation("bob")).expect("read"), None);
}

pub fn ids_stay_known_after_the_conversation_goes(store: Store) {
    store
        .write(|tx| {
            tx.add_conversation(&conv(1), "group", "g", None)?;
            tx.put_group_state(&conv(1).0, b"state", &[(0, &b"e0"[..])])?;
            tx.note_members(&conv(1), &["bob", "carol"])?;
            tx.insert_message(&message("bob", "hi", 1), &conv(1), &[1; 16], true)?;
            tx.add_linked_conversation(&conv(2), "direct", "", Some("bob"))?;
            tx.add_linked_conversation(&conv(1), "group", "g", None)
        })
        .expect("write");
    store
        .read(|tx| {
            assert_eq!(tx.known_conversation(&conv(1))?, Some(false), "held, not only linked");
            assert_eq!(tx.known_conversation(&conv(2))?, Some(true));
            assert!(tx.was_member(&conv(1), "carol")? && !tx.was_member(&conv(1), "dave")?);
            Ok(())
        })
        .expect("read");
    // Joining a linked-only conversation makes it held.
    store.write(|tx| tx.put_group_state(&conv(2).0, b"state", &[])).expect("join");
    assert_eq!(store.read(|tx| tx.known_conversation(&conv(2))).expect("read"), Some(false));
    store.write(|tx| tx.drop_refused_conversation(&conv(1))).expect("drop");
    store
        .read(|tx| {
            assert!(tx.conversation(&conv(1))?.is_none());
            assert!(tx.group_state(&conv(1).0)?.is_none());
            assert!(tx.ever_knew(&conv(1))?, "the tombstone stays");
            assert!(!tx.ever_knew(&conv(3))?);
            Ok(())
        })
        .expect("read");
    // Re-adding it shows no history of before.
    store.write(|tx| tx.add_conversation(&conv(1), "group", "g", None)).expect("add");
    let row = store.read(|tx| tx.conversation(&conv(1))).expect("read").expect("row");
    assert!(store.read(|tx| tx.history(&[row])).expect("history").is_empty());
}

pub fn key_update_bookkeeping(store: Store) {
    let dev = DeviceAddress { handle: "bob".parse().expect("handle"), device: subrosa_proto::DeviceId([1; 8]) };
    assert_eq!(store.read(|tx| tx.key_update_state(&conv(1))).expect("read"), (0, 0));
    store.write(|tx| tx.note_sent(&conv(1))).expect("sent");
    assert_eq!(store.read(|tx| tx.key_update_state(&conv(1))).expect("read"), (0, 1));
    store.write(|tx| tx.add_conversation(&conv(2), "group", "g", None)).expect("add");
    let (at, sent) = store.read(|tx| tx.key_update_state(&conv(2))).expect("read");
    assert!(at > 0 && sent == 0, "creating or joining gives fresh keys");
    store
        .write(|tx| {
            tx.note_sent(&conv(2))?;
            tx.note_sent(&conv(2))?;
            tx.note_own_update(&conv(1), 77)
        })
        .expect("write");
    assert_eq!(store.read(|tx| tx.key_update_state(&conv(2))).expect("read"), (at, 2));
    assert_eq!(store.read(|tx| tx.key_update_state(&conv(1))).expect("read"), (77, 0));
    store
        .write(|tx| {
            tx.note_member_update(&conv(1), &dev, 10)?;
            tx.note_member_update(&conv(1), &dev, 5) // older: ignored
        })
        .expect("write");
    assert_eq!(store.read(|tx| tx.member_update(&conv(1), &dev)).expect("read"), Some(10));
    assert_eq!(store.read(|tx| tx.member_update(&conv(2), &dev)).expect("read"), None);
}

pub fn member_checks_upsert_filter_and_drop(store: Store) {
    let check = |c: u8, handle: &str, device: &str, state: &str| MemberCheck {
        conversation: conv(c),
        handle: handle.into(),
        device: device.into(),
        device_key: vec![1],
        identity_key: vec![2],
        added_by: "alice/00".into(),
        welcome: true,
        state: state.into(),
        why: String::new(),
    };
    store
        .write(|tx| {
            tx.add_member_check(&check(1, "bob", "b1", "unchecked"))?;
            tx.add_member_check(&check(1, "bob", "b2", "unchecked"))?;
            tx.add_member_check(&check(2, "carol", "c1", "unchecked"))?;
            // The same device again: replaced in place (its `welcome` stays).
            tx.add_member_check(&MemberCheck {
                device_key: vec![9],
                welcome: false,
                ..check(1, "bob", "b1", "unchecked")
            })
        })
        .expect("add");
    let all = store.read(|tx| tx.member_checks(None, "unchecked")).expect("read");
    assert_eq!(all.iter().map(|c| c.device.as_str()).collect::<Vec<_>>(), ["b1", "b2", "c1"]);
    assert_eq!((all[0].device_key.clone(), all[0].welcome), (vec![9], true));
    store.write(|tx| tx.set_member_check(&conv(1), "bob", "b2", "contradicted", "another key")).expect("set");
    let bad = store.read(|tx| tx.member_checks(Some(&conv(1)), "contradicted")).expect("read");
    assert_eq!((bad.len(), bad[0].why.as_str()), (1, "another key"));
    assert_eq!(store.read(|tx| tx.member_checks(Some(&conv(2)), "contradicted")).expect("read"), []);
    assert_eq!(store.write(|tx| tx.drop_member_check(&conv(1), "bob", Some("b1"))).expect("drop"), 1);
    assert_eq!(store.write(|tx| tx.drop_member_check(&conv(1), "bob", None)).expect("drop"), 1);
    assert_eq!(store.read(|tx| tx.member_checks(None, "unchecked")).expect("read").len(), 1);
}

pub fn history_keeps_one_copy_per_message_id_in_arrival_order(store: Store) {
    let rows = store
        .write(|tx| {
            tx.add_conversation(&conv(1), "direct", "", Some("bob"))?;
            tx.add_conversation(&conv(2), "group", "team", None)?;
            assert!(tx.insert_message(&message("bob", "one", 1), &conv(1), &[1; 16], true)?);
            assert!(tx.insert_message(&message("carol", "two", 2), &conv(2), &[1; 16], true)?);
            assert!(!tx.insert_message(&message("bob", "again", 3), &conv(1), &[1; 16], true)?);
            let own =
                StoredMessage { outgoing: true, state: Some(MessageState::Queued), ..message("alice", "three", 4) };
            assert!(tx.insert_message(&own, &conv(1), &[3; 16], true)?);
            let before = StoredMessage { outgoing: true, ..message("alice", "from another device", 5) };
            assert!(tx.insert_message(&before, &conv(1), &[4; 16], true)?);
            Ok(vec![tx.conversation(&conv(1))?.expect("1"), tx.conversation(&conv(2))?.expect("2")])
        })
        .expect("write");
    let h = store.read(|tx| tx.history(&rows)).expect("history");
    assert_eq!(h.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["one", "two", "three", "from another device"]);
    assert_eq!((h[0].target.as_str(), h[0].group, h[0].state), ("bob", false, None));
    assert_eq!((h[1].target.as_str(), h[1].group), ("team", true));
    assert_eq!((h[1].id.clone(), h[1].conversation.clone()), (hex::encode([1; 16]), conv(2).to_hex()));
    assert_eq!(h[2].state, Some(MessageState::Queued));
    assert_eq!(h[3].state, Some(MessageState::Sent), "an own message stored without a state reads as sent");
    store.write(|tx| tx.set_message_state(&conv(1), &[3; 16], MessageState::Failed, Some("too large"))).expect("fail");
    let m = store.read(|tx| tx.message(&conv(1), &[3; 16])).expect("read").expect("exists");
    assert_eq!((m.state, m.reason.as_deref()), (Some(MessageState::Failed), Some("too large")));
    store.write(|tx| tx.set_message_state(&conv(1), &[3; 16], MessageState::Sent, None)).expect("sent");
    let m = store.read(|tx| tx.message(&conv(1), &[3; 16])).expect("read").expect("exists");
    assert_eq!((m.state, m.reason), (Some(MessageState::Sent), None));
    store.write(|tx| tx.delete_message(&conv(1), &[3; 16])).expect("delete");
    assert!(store.read(|tx| tx.message(&conv(1), &[3; 16])).expect("read").is_none());
    assert!(store.read(|tx| tx.message(&conv(9), &[1; 16])).expect("read").is_none());
    // The newest message makes a direct conversation the one to send to.
    store
        .write(|tx| {
            tx.add_conversation(&conv(3), "direct", "", Some("bob"))?;
            tx.insert_message(&message("bob", "newer", u64::MAX / 2), &conv(1), &[5; 16], true)
        })
        .expect("write");
    assert_eq!(store.read(|tx| tx.direct_conversation("bob")).expect("read"), Some(conv(1)));
    // Processed ciphertexts.
    assert!(!store.read(|tx| tx.is_processed(b"digest")).expect("read"));
    store.write(|tx| tx.mark_processed(b"digest")).expect("mark");
    store.write(|tx| tx.mark_processed(b"digest")).expect("twice is fine");
    assert!(store.read(|tx| tx.is_processed(b"digest")).expect("read"));
}

pub fn unseen_messages_are_handed_out_once(store: Store) {
    store
        .write(|tx| {
            tx.add_conversation(&conv(1), "direct", "", Some("bob"))?;
            tx.insert_message(&message("bob", "seen", 1), &conv(1), &[1; 16], true)?;
            tx.insert_message(&message("bob", "a", 2), &conv(1), &[2; 16], false)?;
            tx.insert_message(&message("bob", "b", 3), &conv(1), &[3; 16], false)?;
            Ok(())
        })
        .expect("write");
    let first = store.write(|tx| tx.take_unseen()).expect("take");
    assert_eq!(first.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(first[0].target, "bob");
    assert!(store.write(|tx| tx.take_unseen()).expect("take").is_empty());
}

pub fn sequence_numbers_count_gaps_and_late_arrivals(store: Store) {
    store
        .write(|tx| {
            assert_eq!(tx.next_seq(&conv(1))?, 1);
            assert_eq!(tx.next_seq(&conv(1))?, 2);
            assert_eq!(tx.next_seq(&conv(2))?, 1);
            tx.release_seq(&conv(1), 1)?; // not the last: kept
            assert_eq!(tx.next_seq(&conv(1))?, 3);
            tx.release_seq(&conv(1), 3)?;
            assert_eq!(tx.next_seq(&conv(1))?, 3);
            assert_eq!(tx.arrived_seq(&conv(1), "bob/01", 1)?, Some(0));
            assert_eq!(tx.arrived_seq(&conv(1), "bob/01", 4)?, Some(2));
            assert_eq!(tx.arrived_seq(&conv(1), "bob/01", 3)?, None, "late");
            assert_eq!(tx.arrived_seq(&conv(1), "bob/01", 4)?, None, "replayed");
            assert_eq!(tx.arrived_seq(&conv(1), "bob/02", 1)?, Some(0));
            assert_eq!(tx.arrived_seq(&conv(2), "bob/01", 2)?, Some(1));
            Ok(())
        })
        .expect("write");
}

pub fn outbox_keeps_sending_order_and_requests(store: Store) {
    assert!(store.read(|tx| tx.outbox_is_empty()).expect("read"));
    store
        .write(|tx| {
            tx.push_outbox(&[1; 16], &conv(1), &[11; 16], b"content one")?;
            tx.push_outbox_request(&[2; 16], b"request two")?;
            tx.push_outbox(&[3; 16], &conv(2), &[13; 16], b"content three")
        })
        .expect("push");
    assert!(store.write(|tx| tx.push_outbox_request(&[2; 16], b"again")).is_err(), "a send id is used once");
    let q = store.read(|tx| tx.outbox()).expect("read");
    assert_eq!(q.iter().map(|q| q.send_id[0]).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(
        (q[0].message, q[0].content.as_deref(), q[0].request.as_deref()),
        (Some((conv(1), [11; 16])), Some(&b"content one"[..]), None)
    );
    assert_eq!(
        (q[1].message, q[1].content.as_deref(), q[1].request.as_deref()),
        (None, None, Some(&b"request two"[..]))
    );
    store.write(|tx| tx.set_outbox_request(q[0].id, b"encrypted one")).expect("encrypt");
    let row = store.read(|tx| tx.outbox_row(q[0].id)).expect("read").expect("row");
    assert_eq!(row.request.as_deref(), Some(&b"encrypted one"[..]));
    store.write(|tx| tx.pop_outbox(q[1].id)).expect("pop");
    assert!(store.read(|tx| tx.outbox_row(q[1].id)).expect("read").is_none());
    // A send queued later goes after what is queued, whatever the ids.
    store.write(|tx| tx.push_outbox_request(&[0; 16], b"four")).expect("push");
    let q = store.read(|tx| tx.outbox()).expect("read");
    assert_eq!(q.iter().map(|q| q.send_id[0]).collect::<Vec<_>>(), [1, 3, 0]);
    store.write(|tx| q.iter().try_for_each(|r| tx.pop_outbox(r.id))).expect("pop all");
    assert!(store.read(|tx| tx.outbox_is_empty()).expect("read"));
}

pub fn pending_commits_one_per_conversation(store: Store) {
    let p = |c: u8, s: u8| PendingCommit {
        conversation: conv(c),
        send_id: [s; 16],
        request: vec![s; 3],
        commit_digest: vec![s; 32],
        meta: vec![s],
        by_reference: None,
    };
    store
        .write(|tx| {
            tx.put_pending_commit(&p(1, 1))?;
            tx.put_pending_commit(&p(2, 2))?;
            tx.put_pending_commit(&p(1, 3)) // replaces the first
        })
        .expect("put");
    let got = store.read(|tx| tx.pending_commit(&conv(1))).expect("read").expect("there");
    assert_eq!((got.send_id, got.request, got.commit_digest, got.meta), ([3; 16], vec![3; 3], vec![3; 32], vec![3]));
    assert_eq!(store.read(|tx| tx.pending_commit_conversations()).expect("read"), [conv(2), conv(1)]);
    assert!(got.by_reference.is_none());
    // Its form by reference kept beside it (the whole request stays), only
    // for the commit staged now, and replaced by a later one.
    let by_ref = |b: &[u8], at: u64| ByReference { request: b.to_vec(), uploaded_at_ms: at, reuse_until_ms: at + 10 };
    let other = by_ref(b"other", 1);
    assert!(!store.write(|tx| tx.set_pending_commit_by_reference(&conv(2), &[9; 16], &other)).expect("set"));
    assert!(store.read(|tx| tx.pending_commit(&conv(2))).expect("read").expect("there").by_reference.is_none());
    for (body, at) in [(&b"by reference"[..], 5), (b"uploaded again", 1_700_000_000_000)] {
        let r = by_ref(body, at);
        assert!(store.write(|tx| tx.set_pending_commit_by_reference(&conv(2), &[2; 16], &r)).expect("set"));
        let got = store.read(|tx| tx.pending_commit(&conv(2))).expect("read").expect("there");
        assert_eq!((got.send_id, got.request, got.meta), ([2; 16], vec![2; 3], vec![2]));
        assert_eq!(got.by_reference, Some(r));
    }
    assert_eq!(store.read(|tx| tx.pending_commit_conversations()).expect("read"), [conv(2), conv(1)]);
    // Staged again: a new commit has no form by reference.
    store.write(|tx| tx.put_pending_commit(&p(2, 4))).expect("put");
    assert!(store.read(|tx| tx.pending_commit(&conv(2))).expect("read").expect("there").by_reference.is_none());
    store.write(|tx| tx.delete_pending_commit(&conv(2))).expect("delete");
    assert!(store.read(|tx| tx.pending_commit(&conv(2))).expect("read").is_none());
    assert_eq!(store.read(|tx| tx.pending_commit_conversations()).expect("read"), [conv(1)]);
}

pub fn directory_keeps_the_first_root_and_head_per_epoch(store: Store) {
    assert_eq!(store.read(|tx| tx.kt_range()).expect("read"), None);
    store
        .write(|tx| {
            tx.put_kt_roots(5, &[[5; 32], [6; 32]])?;
            tx.put_kt_roots(6, &[[0; 32], [7; 32]])?; // epoch 6 is kept as it was
            tx.put_kt_signed_head(3, &b"three"[..])?;
            tx.put_kt_signed_head(9, &b"nine"[..])?;
            tx.put_kt_signed_head(3, &b"other"[..])
        })
        .expect("write");
    store
        .read(|tx| {
            assert_eq!(tx.kt_range()?, Some((5, 7)));
            assert_eq!(tx.kt_root(6)?, Some(vec![6; 32]));
            assert_eq!(tx.kt_root(8)?, None);
            assert_eq!(tx.kt_signed_head(3)?.as_deref(), Some(&b"three"[..]));
            assert_eq!(tx.kt_newest_signed_head()?.as_deref(), Some(&b"nine"[..]));
            Ok(())
        })
        .expect("read");
    store
        .write(|tx| {
            tx.push_kt_head_gossip("bob", 4, b"bob4")?;
            tx.push_kt_head_gossip("carol", 2, b"carol2")?;
            tx.push_kt_head_gossip("bob", 3, b"bob3")?; // older: ignored
            tx.push_kt_head_gossip("carol", 6, b"carol6")
        })
        .expect("gossip");
    let g = store.read(|tx| tx.kt_head_gossip()).expect("read");
    assert_eq!(g, [("bob".to_string(), b"bob4".to_vec()), ("carol".to_string(), b"carol6".to_vec())]);
    store
        .write(|tx| {
            tx.drop_kt_head_gossip("bob", b"bob3")?; // not the one held: kept
            tx.drop_kt_head_gossip("carol", b"carol6")
        })
        .expect("drop");
    assert_eq!(store.read(|tx| tx.kt_head_gossip()).expect("read"), [("bob".to_string(), b"bob4".to_vec())]);
}

pub fn alerts_are_deduplicated_shown_once_and_cleared(store: Store) {
    store
        .write(|tx| {
            tx.add_alert("drained")?;
            tx.add_alert("drained")?;
            tx.add_alert_about("the server", "fork at 7", Some("{\"proof\":1}"))?;
            tx.add_alert_about("bob", "bob's key", None)
        })
        .expect("add");
    let a = store.read(|tx| tx.alerts()).expect("read");
    assert_eq!(a.iter().map(|a| a.text.as_str()).collect::<Vec<_>>(), ["drained", "fork at 7", "bob's key"]);
    assert!(a[0].id < a[1].id && a[1].id < a[2].id);
    assert_eq!((a[0].concerns.as_deref(), a[0].fork), (None, false));
    assert_eq!(
        (a[1].concerns.as_deref(), a[1].fork, a[1].proof.as_deref()),
        (Some("the server"), true, Some("{\"proof\":1}"))
    );
    assert_eq!(store.write(|tx| tx.take_alerts()).expect("take").len(), 3);
    assert!(store.write(|tx| tx.take_alerts()).expect("take").is_empty());
    assert_eq!(store.read(|tx| tx.open_fork()).expect("read").as_deref(), Some("fork at 7"));
    assert_eq!(store.write(|tx| tx.clear_alerts(false)).expect("clear"), 2);
    assert_eq!(store.read(|tx| tx.alerts()).expect("read").len(), 1);
    assert!(store.read(|tx| tx.open_fork()).expect("read").is_some(), "a fork needs clearing on purpose");
    // A cleared alert stays cleared when raised again.
    store.write(|tx| tx.add_alert("drained")).expect("again");
    assert_eq!(store.read(|tx| tx.alerts()).expect("read").len(), 1);
    assert_eq!(store.write(|tx| tx.clear_alerts(true)).expect("clear"), 1);
    assert!(store.read(|tx| tx.open_fork()).expect("read").is_none());
}

pub fn group_state_keeps_the_newest_epochs(store: Store) {
    let g = conv(4).0;
    store
        .write(|tx| {
            tx.put_group_state(&g, b"s1", &[(1, &b"e1"[..]), (2, &b"e2"[..])])?;
            tx.put_group_state(&g, b"s2", &[(3, &b"e3"[..]), (2, &b"e2'"[..])])
        })
        .expect("write");
    store
        .read(|tx| {
            assert_eq!(tx.group_state(&g)?.as_deref().map(Vec::as_slice), Some(&b"s2"[..]));
            assert_eq!(tx.group_epoch(&g, 2)?.as_deref().map(Vec::as_slice), Some(&b"e2'"[..]));
            assert_eq!(tx.max_group_epoch(&g)?, Some(3));
            assert!(tx.group_state(&[9; 16])?.is_none() && tx.max_group_epoch(&[9; 16])?.is_none());
            assert!(tx.ever_knew(&conv(4))?, "a group id held once stays known");
            Ok(())
        })
        .expect("read");
    store.write(|tx| tx.put_group_state(&g, b"s3", &[(4, &b"e4"[..])])).expect("write");
    store
        .read(|tx| {
            assert!(tx.group_epoch(&g, 1)?.is_none(), "epochs older than the newest three are erased");
            assert!(tx.group_epoch(&g, 2)?.is_some());
            Ok(())
        })
        .expect("read");
    store.write(|tx| tx.deactivate_conversation(&conv(4))).expect("leave");
    assert!(store.read(|tx| Ok(tx.group_state(&g)?.is_none() && tx.max_group_epoch(&g)?.is_none())).expect("read"));
}

/// A group state's version names its bytes: it changes with them (in any
/// piece), comes back with them, is untouched by a write that rolled back,
/// and goes with the group. The engine's loaded groups rely on it.
pub fn group_state_versions_name_the_stored_bytes(store: Store) {
    let g = conv(5).0;
    let version = |store: &Store| store.read(|tx| tx.group_state_version(&g)).expect("read");
    assert_eq!(version(&store), None, "no group, no version");
    let big: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    let mut changed = big.clone();
    changed[149_999] ^= 1;
    store.write(|tx| tx.put_group_state(&g, &big, &[])).expect("write");
    let v1 = version(&store).expect("a stored state has a version");
    store.write(|tx| tx.put_group_state(&g, &changed, &[])).expect("write");
    let v2 = version(&store).expect("version");
    assert_ne!(v1, v2, "a change in the last piece changes the version");
    store.write(|tx| tx.put_group_state(&g, &changed[..100_000], &[])).expect("write");
    assert_ne!(version(&store), Some(v2), "so does a shorter state");
    store.write(|tx| tx.put_group_state(&g, &big, &[])).expect("write");
    assert_eq!(version(&store), Some(v1), "the same bytes, the same version");
    let failed = store.write(|tx| {
        tx.put_group_state(&g, &changed, &[])?;
        Err::<(), _>(ClientError::Bug("roll back".into()))
    });
    assert!(failed.is_err());
    assert_eq!(version(&store), Some(v1), "a write rolled back leaves the version");
    store.write(|tx| tx.deactivate_conversation(&conv(5))).expect("leave");
    assert_eq!(version(&store), None);
}

pub fn key_packages_one_time_and_last_resort(store: Store) {
    store
        .write(|tx| {
            tx.put_key_package(b"one", b"secret one")?;
            tx.put_key_package(b"last", b"secret last")?;
            tx.mark_newest_key_package_last_resort()
        })
        .expect("write");
    store
        .write(|tx| {
            tx.delete_key_package(b"one")?;
            tx.delete_key_package(b"last") // the last-resort one stays
        })
        .expect("use");
    store
        .read(|tx| {
            assert!(tx.key_package(b"one")?.is_none());
            assert_eq!(tx.key_package(b"last")?.as_deref().map(Vec::as_slice), Some(&b"secret last"[..]));
            Ok(())
        })
        .expect("read");
    // A refill makes a last-resort package of each suite, together.
    store
        .write(|tx| {
            tx.put_key_package(b"newer last", b"n")?;
            tx.mark_newest_key_package_last_resort()?;
            tx.put_key_package(b"newer last pq", b"n")?;
            tx.mark_newest_key_package_last_resort()
        })
        .expect("write");
    assert_eq!(subrosa_core::SUITES.len(), 2);
    // Nothing is older than 0; every last-resort one was made now, so the
    // cut-off erases nothing, and only the newest of each suite stays
    // last-resort.
    assert_eq!(store.write(|tx| tx.erase_key_packages_before(0)).expect("erase"), 0);
    store
        .write(|tx| {
            tx.delete_key_package(b"last")?; // no longer last-resort
            tx.delete_key_package(b"newer last")?;
            tx.delete_key_package(b"newer last pq")
        })
        .expect("use");
    assert!(store.read(|tx| tx.key_package(b"last")).expect("read").is_none());
    assert!(store.read(|tx| tx.key_package(b"newer last")).expect("read").is_some());
    assert!(store.read(|tx| tx.key_package(b"newer last pq")).expect("read").is_some());
    assert_eq!(store.write(|tx| tx.erase_key_packages_before(now_ms() + 60_000)).expect("erase"), 2);
    assert!(store.read(|tx| tx.key_package(b"newer last")).expect("read").is_none());
}

pub fn a_failed_write_leaves_nothing(store: Store) {
    let r: Result<(), _> = store.write(|tx| {
        tx.pin_contact("bob", &[1; 32])?;
        tx.add_conversation(&conv(1), "direct", "", Some("bob"))?;
        tx.insert_message(&message("bob", "hi", 1), &conv(1), &[1; 16], false)?;
        tx.push_outbox_request(&[1; 16], b"request")?;
        tx.put_group_state(&conv(1).0, b"state", &[(0, &b"e"[..])])?;
        tx.put_key_package(b"kp", b"secret")?;
        tx.add_alert("alert")?;
        tx.set_meta("k", b"v")?;
        assert_eq!(tx.contact_key("bob")?, Some(vec![1; 32]), "a write sees its own changes");
        Err(no("refused"))
    });
    assert!(matches!(r, Err(ClientError::Input(ref s)) if s == "refused"), "the closure's error comes back");
    store
        .read(|tx| {
            assert!(tx.contact_key("bob")?.is_none());
            assert!(tx.conversation(&conv(1))?.is_none() && !tx.ever_knew(&conv(1))?);
            assert!(tx.outbox_is_empty()?);
            assert!(tx.group_state(&conv(1).0)?.is_none() && tx.key_package(b"kp")?.is_none());
            assert!(tx.alerts()?.is_empty() && tx.meta("k")?.is_none());
            Ok(())
        })
        .expect("read");
    assert!(store.write(|tx| tx.take_unseen()).expect("take").is_empty());
    // The store is usable after.
    store.write(|tx| tx.pin_contact("bob", &[2; 32])).expect("write");
    assert_eq!(store.read(|tx| tx.contact_key("bob")).expect("read"), Some(vec![2; 32]));
}

pub fn a_panicking_write_leaves_nothing_and_the_store_goes_on(store: Store) {
    let panicked = {
        let store = store.clone();
        thread::spawn(move || {
            let _ = store.write(|tx| -> Result<(), ClientError> {
                tx.pin_contact("bob", &[1; 32])?;
                panic!("a bug in the middle of a write");
            });
        })
        .join()
    };
    assert!(panicked.is_err());
    assert!(store.read(|tx| tx.contact_key("bob")).expect("read").is_none());
    store.write(|tx| tx.pin_contact("carol", &[2; 32])).expect("the next write goes through");
    assert!(store.read(|tx| tx.contact_key("carol")).expect("read").is_some());
    assert!(store.read(|tx| tx.contact_key("bob")).expect("read").is_none());
}

pub fn mls_writes_join_the_transaction_that_caused_them(store: Store) {
    let state = |id: u8| GroupState { id: vec![id; 16], data: Zeroizing::new(b"state".to_vec()) };
    // mls-rs writes through the adapter from inside a write closure: they
    // go or stay with it.
    let r: Result<(), _> = store.write(|tx| {
        store.groups().write(state(1), Vec::new(), Vec::new()).map_err(|e| no(&e.to_string()))?;
        assert!(tx.group_state(&[1; 16])?.is_some(), "the adapter wrote into this transaction");
        Err(no("rolled back"))
    });
    assert!(r.is_err());
    assert!(store.groups().state(&[1; 16]).expect("read").is_none());
    store
        .write(|tx| {
            store.groups().write(state(2), Vec::new(), Vec::new()).map_err(|e| no(&e.to_string()))?;
            tx.set_meta("with it", b"1")
        })
        .expect("commit");
    assert!(store.groups().state(&[2; 16]).expect("read").is_some());
    // Outside a transaction, the adapter makes one of its own.
    store.groups().write(state(3), Vec::new(), Vec::new()).expect("own transaction");
    assert!(store.read(|tx| tx.group_state(&[3; 16])).expect("read").is_some());
}

pub fn a_write_in_progress_is_invisible_to_a_concurrent_reader(store: Store) {
    for commits in [false, true] {
        let (started, wait_started) = mpsc::channel();
        let (read_done, wait_read) = mpsc::channel::<()>();
        let writer = {
            let store = store.clone();
            thread::spawn(move || {
                store.write(|tx| {
                    tx.pin_contact("first", &[1; 32])?;
                    started.send(()).expect("signal");
                    // Give the reader every chance to read now: a backend
                    // that let it in would show it half of this write.
                    let _ = wait_read.recv_timeout(std::time::Duration::from_millis(300));
                    tx.pin_contact("second", &[2; 32])?;
                    if commits {
                        Ok(())
                    } else {
                        Err(no("abandoned"))
                    }
                })
            })
        };
        wait_started.recv().expect("the writer started");
        let seen = store
            .read(|tx| Ok((tx.contact_key("first")?.is_some(), tx.contact_key("second")?.is_some())))
            .expect("read");
        let _ = read_done.send(());
        assert_eq!(writer.join().expect("writer").is_ok(), commits);
        assert_eq!(seen, (commits, commits), "a reader saw a write in progress or rolled back");
    }
}

pub fn concurrent_writers_serialize(store: Store) {
    const EACH: u32 = 40;
    let count = |tx: &dyn Tx| -> Result<u32, ClientError> {
        Ok(tx.meta("counter")?.map_or(0, |v| u32::from_le_bytes(v.as_slice().try_into().unwrap_or([0; 4]))))
    };
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let store = store.clone();
            thread::spawn(move || {
                for _ in 0..EACH {
                    store
                        .write(|tx| {
                            let n = count(tx)?;
                            thread::yield_now();
                            tx.set_meta("counter", &(n + 1).to_le_bytes())
                        })
                        .expect("write");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    assert_eq!(store.read(count).expect("read"), 3 * EACH, "no write was lost");
}

pub fn a_write_inside_a_read_is_refused(store: Store) {
    let r = store.read(|_| store.write(|tx| tx.set_meta("k", b"v")));
    assert!(matches!(r, Err(ClientError::Bug(_))), "{r:?}");
    assert!(store.read(|tx| tx.meta("k")).expect("read").is_none());
    // A write inside a write joins it.
    store.write(|_| store.write(|tx| tx.set_meta("k", b"v"))).expect("nested");
    assert!(store.read(|tx| tx.meta("k")).expect("read").is_some());
    // A failed write inside a write leaves nothing of its own, and the
    // outer one keeps what it did before and after (a savepoint).
    store
        .write(|tx| {
            tx.set_meta("before", b"1")?;
            let inner = store.write(|tx| {
                tx.set_meta("inner", b"2")?;
                tx.delete_meta("k")?;
                Err::<(), _>(no("inner fails"))
            });
            assert!(inner.is_err());
            tx.set_meta("after", b"3")
        })
        .expect("outer");
    let kept = |k: &str| store.read(|tx| tx.meta(k)).expect("read").is_some();
    assert!(kept("before") && kept("after") && kept("k") && !kept("inner"));
}

pub fn two_engines_exchange_a_message_over_the_store(store: Store) {
    // Bob's device uses a store of the same backend's kind; alice's is the
    // one under test. Every MLS write of hers goes through its adapters.
    let bob_store = Store::memory();
    let crypto = subrosa_core::default_crypto();
    let id = |h: &str| DeviceIdentity::generate(&crypto, h.parse().expect("handle"), 1).expect("identity");
    let alice = Engine::new(crypto.clone(), id("alice"), store.groups(), store.key_packages());
    let bob = Engine::new(crypto.clone(), id("bob"), bob_store.groups(), bob_store.key_packages());
    let kp = bob_store.write(|_| Ok(bob.generate_key_package()?)).expect("key package");
    let commit = store
        .write(|tx| {
            let c = alice.create_conversation(&ConversationInfo::direct(), &[kp])?;
            tx.add_conversation(&c.conversation, "direct", "", Some("bob"))?;
            Ok(c)
        })
        .expect("create");
    store.write(|_| Ok(alice.confirm_commit(&commit.conversation)?)).expect("confirm");
    let welcome = commit.welcome.expect("a welcome");
    let joined = bob_store.write(|_| Ok(bob.join(&welcome)?)).expect("join");
    assert!(matches!(joined, Event::Joined { conversation, .. } if conversation == commit.conversation));
    let content = Content::text(MessageId([7; 16]), 5, "over the store");
    let (ciphertext, _) = store.write(|_| Ok(alice.encrypt(&commit.conversation, &content)?)).expect("encrypt");
    let got = bob_store.write(|_| Ok(bob.process(&commit.conversation, &ciphertext)?)).expect("decrypt");
    match got {
        Event::Message { content, .. } => assert!(matches!(content.body, Body::Text(ref t) if t == "over the store")),
        other => panic!("not a message: {other:?}"),
    }
    // A failed write keeps alice's ratchet where it was (nothing of an
    // encryption whose ciphertext never left is kept); a committed one moves it.
    let state = || store.read(|tx| tx.group_state(&commit.conversation.0)).expect("read").expect("state").to_vec();
    let before = state();
    let _ = store.write(|_| -> Result<(), ClientError> {
        alice.encrypt(&commit.conversation, &content)?;
        Err(no("not sent"))
    });
    assert_eq!(state(), before);
    store.write(|_| Ok(alice.encrypt(&commit.conversation, &content)?)).expect("encrypt");
    assert_ne!(state(), before);
    assert_eq!(alice.members(&commit.conversation).expect("members").len(), 2);
}

pub fn replies_reactions_edits_and_deletes_are_stored(store: Store) {
    let id = conv(7);
    store.write(|tx| tx.add_conversation(&id, "group", "club", None)).expect("conversation");
    let reply = StoredMessage { reply_to: Some("01".repeat(16)), ..message("bob", "answer", 2) };
    store
        .write(|tx| {
            tx.insert_message(&message("alice", "question", 1), &id, &[1; 16], true)?;
            tx.insert_message(&reply, &id, &[2; 16], true)
        })
        .expect("insert");
    let get = |m: u8| store.read(|tx| tx.message(&id, &[m; 16])).expect("read").expect("stored");
    assert_eq!(get(2).reply_to.as_deref(), Some("01".repeat(16).as_str()));
    assert_eq!(get(1).reply_to, None);
    // One reaction per member per emoji; grouped by emoji in the order they came.
    store
        .write(|tx| {
            tx.set_reaction(&id, &[1; 16], "bob", "+1", true, 3)?;
            tx.set_reaction(&id, &[1; 16], "bob", "+1", true, 4)?;
            tx.set_reaction(&id, &[1; 16], "carol", "ok", true, 5)?;
            tx.set_reaction(&id, &[1; 16], "carol", "+1", true, 6)
        })
        .expect("react");
    let reactions = |m: StoredMessage| m.reactions.into_iter().map(|r| (r.emoji, r.from)).collect::<Vec<_>>();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(reactions(get(1)), [("+1".into(), s(&["bob", "carol"])), ("ok".into(), s(&["carol"]))]);
    // A reaction shows the message again to `receive`.
    let unseen = store.write(|tx| tx.take_unseen()).expect("unseen");
    assert_eq!(unseen.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["question"]);
    store.write(|tx| tx.set_reaction(&id, &[1; 16], "bob", "+1", false, 7)).expect("take back");
    assert_eq!(reactions(get(1)), [("ok".into(), s(&["carol"])), ("+1".into(), s(&["carol"]))]);
    // Edits: the one sent last wins, whatever the order they arrive in.
    assert!(store.write(|tx| tx.edit_message(&id, &[1; 16], "second", 20)).expect("edit"));
    assert!(!store.write(|tx| tx.edit_message(&id, &[1; 16], "first", 10)).expect("edit"));
    assert_eq!((get(1).text.as_str(), get(1).edited), ("second", true));
    assert!(!get(2).edited);
    // A delete drops text and reactions; nothing edits it back.
    store.write(|tx| tx.erase_message(&id, &[1; 16])).expect("erase");
    assert!(!store.write(|tx| tx.edit_message(&id, &[1; 16], "back", 30)).expect("edit"));
    let gone = get(1);
    assert_eq!((gone.text.as_str(), gone.deleted, gone.reactions.len()), ("", true, 0));
    let row = store.read(|tx| tx.conversation(&id)).expect("read").expect("row");
    let history = store.read(|tx| tx.history(&[row])).expect("history");
    assert_eq!(
        history.iter().map(|m| (m.text.as_str(), m.deleted)).collect::<Vec<_>>(),
        [("", true), ("answer", false)]
    );
}

pub fn a_reaction_sent_last_wins_whatever_order_it_arrives_in(store: Store) {
    let id = conv(17);
    store.write(|tx| tx.add_conversation(&id, "group", "club", None)).expect("conversation");
    store
        .write(|tx| {
            tx.insert_message(&message("alice", "one", 1), &id, &[1; 16], true)?;
            tx.insert_message(&message("alice", "two", 2), &id, &[2; 16], true)
        })
        .expect("insert");
    let set = |m: u8, on: bool, at: u64| {
        store.write(|tx| tx.set_reaction(&id, &[m; 16], "bob", "+1", on, at)).expect("react")
    };
    let shown = |m: u8| {
        let got = store.read(|tx| tx.message(&id, &[m; 16])).expect("read").expect("stored");
        got.reactions.iter().any(|r| r.emoji == "+1" && r.from == ["bob"])
    };
    // Added at 10, taken back at 20; the add arrives again late (another
    // device of bob's, a reorder): it stays taken back.
    set(1, true, 10);
    set(1, false, 20);
    set(1, true, 15);
    assert!(!shown(1), "an older add brought a taken-back reaction back");
    // Added again later: shown.
    set(1, true, 25);
    assert!(shown(1));
    // Taken back and added at the same time: taking back wins, in either order.
    set(1, false, 25);
    assert!(!shown(1));
    set(1, true, 25);
    assert!(!shown(1));
    // The take-back arrives before the add it takes back: nothing shows.
    set(2, false, 20);
    set(2, true, 10);
    assert!(!shown(2), "a take-back that came first was forgotten");
    // An add stays once made, whatever older take-back comes after.
    set(2, true, 30);
    set(2, false, 5);
    assert!(shown(2));
}

pub fn receipts_make_the_state_of_own_messages(store: Store) {
    use subrosa_core::content::ReceiptKind::{Delivered, Read};
    let id = conv(8);
    store.write(|tx| tx.add_conversation(&id, "group", "club", None)).expect("conversation");
    let mine = StoredMessage { outgoing: true, state: Some(MessageState::Sent), ..message("alice", "hello", 1) };
    store.write(|tx| tx.insert_message(&mine, &id, &[1; 16], true)).expect("insert");
    let get = || store.read(|tx| tx.message(&id, &[1; 16])).expect("read").expect("stored");
    // Without recipients (a message of an older version), receipts say nothing.
    assert_eq!((get().state, get().receipts.len()), (Some(MessageState::Sent), 0));
    store.write(|tx| tx.set_recipients(&id, &[1; 16], &["bob".into(), "carol".into()])).expect("recipients");
    let detail = |m: StoredMessage| m.receipts.into_iter().map(|r| (r.member, r.state)).collect::<Vec<_>>();
    assert_eq!(detail(get()), [("bob".into(), MessageState::Sent), ("carol".into(), MessageState::Sent)]);
    store.write(|tx| tx.add_receipt(&id, &[1; 16], "bob", Read, 2)).expect("receipt");
    assert_eq!(get().state, Some(MessageState::Sent));
    store.write(|tx| tx.add_receipt(&id, &[1; 16], "carol", Delivered, 3)).expect("receipt");
    assert_eq!(get().state, Some(MessageState::Delivered));
    // A late delivery receipt never undoes a read one.
    store.write(|tx| tx.add_receipt(&id, &[1; 16], "bob", Delivered, 4)).expect("receipt");
    assert_eq!(detail(get()), [("bob".into(), MessageState::Read), ("carol".into(), MessageState::Delivered)]);
    store.write(|tx| tx.add_receipt(&id, &[1; 16], "carol", Read, 5)).expect("receipt");
    assert_eq!(get().state, Some(MessageState::Read));
    // Queued or failed messages keep their state.
    store.write(|tx| tx.set_message_state(&id, &[1; 16], MessageState::Failed, Some("no"))).expect("state");
    assert_eq!(get().state, Some(MessageState::Failed));
    // Above the detail limit: the state, no list.
    let many: Vec<String> = (0..=RECEIPT_DETAIL_LIMIT).map(|i| format!("m{i}")).collect();
    let big = StoredMessage { outgoing: true, state: Some(MessageState::Sent), ..message("alice", "all", 6) };
    store.write(|tx| tx.insert_message(&big, &id, &[2; 16], true)).expect("insert");
    store.write(|tx| tx.set_recipients(&id, &[2; 16], &many)).expect("recipients");
    store.write(|tx| many.iter().try_for_each(|m| tx.add_receipt(&id, &[2; 16], m, Delivered, 7))).expect("receipts");
    let big = store.read(|tx| tx.message(&id, &[2; 16])).expect("read").expect("stored");
    assert_eq!((big.state, big.receipts.len()), (Some(MessageState::Delivered), 0));
    // Messages of others are read once: the second time owes nothing.
    store.write(|tx| tx.insert_message(&message("bob", "hi", 8), &id, &[3; 16], false)).expect("insert");
    let read = store.write(|tx| tx.mark_read(&id, 9)).expect("read");
    assert_eq!(read, [([3; 16], "bob".to_string())]);
    assert!(store.write(|tx| tx.mark_read(&id, 10)).expect("read").is_empty());
}

pub fn early_actions_and_owed_receipts_wait_and_are_taken_once(store: Store) {
    use subrosa_core::content::ReceiptKind::{Delivered, Read};
    let (a, b) = (conv(9), conv(10));
    let action = |n: u8| EarlyAction { from: "bob".into(), device: "01".repeat(8), content: vec![n; 3] };
    store
        .write(|tx| {
            tx.push_early_action(&a, &[1; 16], &action(1))?;
            tx.push_early_action(&a, &[2; 16], &action(2))?;
            tx.push_early_action(&a, &[1; 16], &action(3))?;
            tx.push_early_action(&b, &[1; 16], &action(4))
        })
        .expect("push");
    assert_eq!(store.read(|tx| tx.early_actions_from(&a, "bob")).expect("count"), 3);
    assert_eq!(store.read(|tx| tx.early_actions_from(&a, "carol")).expect("count"), 0);
    let taken = store.write(|tx| tx.take_early_actions(&a, &[1; 16])).expect("take");
    assert_eq!(taken, [action(1), action(3)]);
    assert_eq!(store.read(|tx| tx.early_actions_from(&a, "bob")).expect("count"), 1);
    assert!(store.write(|tx| tx.take_early_actions(&a, &[1; 16])).expect("take").is_empty());
    // A delete forgets what waited for the message.
    store.write(|tx| tx.add_conversation(&a, "direct", "", Some("bob"))).expect("conversation");
    store.write(|tx| tx.insert_message(&message("bob", "x", 1), &a, &[2; 16], true)).expect("insert");
    store.write(|tx| tx.erase_message(&a, &[2; 16])).expect("erase");
    assert!(store.write(|tx| tx.take_early_actions(&a, &[2; 16])).expect("take").is_empty());
    assert_eq!(store.write(|tx| tx.take_early_actions(&b, &[1; 16])).expect("take"), [action(4)]);
    // Receipts owed: grouped by conversation, author and kind, once per message.
    store
        .write(|tx| {
            tx.push_receipt_due(&a, &[1; 16], "bob", Delivered)?;
            tx.push_receipt_due(&a, &[2; 16], "bob", Delivered)?;
            tx.push_receipt_due(&a, &[1; 16], "bob", Delivered)?;
            tx.push_receipt_due(&a, &[3; 16], "carol", Delivered)?;
            tx.push_receipt_due(&a, &[1; 16], "bob", Read)?;
            tx.push_receipt_due(&b, &[4; 16], "bob", Delivered)
        })
        .expect("push");
    let due = store.write(|tx| tx.take_receipts_due()).expect("take");
    let got: Vec<_> = due.iter().map(|d| (d.conversation, d.author.as_str(), d.kind, d.ids.clone())).collect();
    assert_eq!(
        got,
        [
            (a, "bob", Delivered, vec![[1; 16], [2; 16]]),
            (a, "carol", Delivered, vec![[3; 16]]),
            (a, "bob", Read, vec![[1; 16]]),
            (b, "bob", Delivered, vec![[4; 16]]),
        ]
    );
    assert!(store.write(|tx| tx.take_receipts_due()).expect("take").is_empty());
}

/// A message's files are stored once, in order, with their keys; received
/// ones wait as pending until downloaded, then wait to be saved; a refused
/// one keeps its reason.
pub fn attachments_are_kept_per_message_and_move_from_pending_to_saved(store: Store) {
    use subrosa_core::attachment::AttachedFile;
    let file = |n: u8| AttachedFile {
        blob: [n; 16],
        key: Zeroizing::new([n + 1; 32]),
        sha256: [n + 2; 32],
        size: u64::from(n) * 1000,
        name: format!("file {n}.txt"),
        media_type: "text/plain".into(),
    };
    let (c, m) = (conv(7), [9u8; 16]);
    store
        .write(|tx| {
            tx.put_attachments(&c, &m, &[file(1), file(2)], AttachmentState::Pending)?;
            // Delivered again: nothing changes.
            tx.put_attachments(&c, &m, &[file(3)], AttachmentState::Pending)?;
            tx.put_attachments(&conv(8), &[1; 16], &[file(4)], AttachmentState::Sent)
        })
        .expect("put");
    let rows = store.read(|tx| tx.attachments_of(&c, &m)).expect("read");
    assert_eq!(rows.iter().map(|a| (a.index, a.file.clone())).collect::<Vec<_>>(), vec![(0, file(1)), (1, file(2))]);
    assert!(rows.iter().all(|a| a.state == AttachmentState::Pending && a.local.is_none() && a.saved.is_none()));
    assert_eq!(store.read(|tx| tx.pending_attachments()).expect("pending").len(), 2);

    store
        .write(|tx| {
            tx.set_attachment(&c, &m, 0, &AttachmentState::Stored, Some("b1.blob"), None)?;
            tx.set_attachment(&c, &m, 1, &AttachmentState::Refused("altered".into()), None, None)
        })
        .expect("set");
    let pending = store.read(|tx| tx.pending_attachments()).expect("pending");
    assert!(pending.is_empty());
    let unsaved = store.read(|tx| tx.unsaved_attachments()).expect("unsaved");
    assert_eq!(unsaved.len(), 1);
    assert_eq!(unsaved[0].local.as_deref(), Some("b1.blob"));
    store
        .write(|tx| tx.set_attachment(&c, &m, 0, &AttachmentState::Stored, None, Some("/tmp/file 1.txt")))
        .expect("saved");
    assert!(store.read(|tx| tx.unsaved_attachments()).expect("unsaved").is_empty());
    let rows = store.read(|tx| tx.attachments_of(&c, &m)).expect("read");
    assert_eq!(rows[0].local.as_deref(), Some("b1.blob"), "the blob's name stays when the path is set");
    assert_eq!(rows[0].saved.as_deref(), Some("/tmp/file 1.txt"));
    assert_eq!(rows[1].state, AttachmentState::Refused("altered".into()));
}

/// A message's link preview (thumbnail included) is stored with it and
/// read back with it; a delete for everyone drops it with the text.
pub fn link_previews_are_kept_with_their_message_and_go_with_its_text(store: Store) {
    use subrosa_core::preview::{ImageKind, LinkPreview, Thumbnail};
    let id = conv(7);
    store.write(|tx| tx.add_conversation(&id, "group", "club", None)).expect("conversation");
    let preview = LinkPreview {
        url: "https://a.example/".into(),
        title: "A".into(),
        description: "about a".into(),
        thumbnail: Some(Thumbnail { kind: ImageKind::Png, bytes: b"\x89PNG\r\n\x1a\n1".to_vec() }),
    };
    let with = StoredMessage { preview: Some(preview.clone().into()), ..message("bob", "https://a.example/", 1) };
    store
        .write(|tx| {
            tx.insert_message(&with, &id, &[1; 16], true)?;
            tx.insert_message(&message("bob", "none", 2), &id, &[2; 16], true)
        })
        .expect("insert");
    let get = |m: u8| store.read(|tx| tx.message(&id, &[m; 16])).expect("read").expect("stored");
    let got = get(1).preview.expect("a preview");
    assert!(got.has_thumbnail);
    assert_eq!(got.to_core(), preview, "thumbnail and all");
    assert_eq!(get(2).preview, None);
    store.write(|tx| tx.erase_message(&id, &[1; 16])).expect("erase");
    assert_eq!(get(1).preview, None, "deleted for everyone: the preview goes with the text");
}

/// Every file of one conversation, in one read: each message's in order,
/// messages in the order their files were stored, nothing of another
/// conversation.
pub fn a_conversations_files_are_read_in_one_go(store: Store) {
    use subrosa_core::attachment::AttachedFile;
    let file = |n: u8| AttachedFile {
        blob: [n; 16],
        key: Zeroizing::new([n + 1; 32]),
        sha256: [n + 2; 32],
        size: u64::from(n),
        name: format!("file {n}"),
        media_type: "text/plain".into(),
    };
    let c = conv(7);
    store
        .write(|tx| {
            tx.put_attachments(&c, &[2; 16], &[file(1), file(2)], AttachmentState::Pending)?;
            tx.put_attachments(&conv(8), &[2; 16], &[file(3)], AttachmentState::Pending)?;
            tx.put_attachments(&c, &[1; 16], &[file(4)], AttachmentState::Sent)
        })
        .expect("put");
    let rows = store.read(|tx| tx.attachments_in(&c)).expect("read");
    let got: Vec<(Vec<u8>, u32, String)> =
        rows.iter().map(|a| (a.message_id.clone(), a.index, a.file.name.clone())).collect();
    assert_eq!(
        got,
        vec![
            (vec![2; 16], 0, "file 1".to_string()),
            (vec![2; 16], 1, "file 2".to_string()),
            (vec![1; 16], 0, "file 4".to_string()),
        ]
    );
    assert!(store.read(|tx| tx.attachments_in(&conv(9))).expect("none").is_empty());
}

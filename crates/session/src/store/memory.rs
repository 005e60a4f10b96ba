//! The in-memory backend: the same behaviour as the SQLCipher store (the
//! conformance suite says so), nothing kept beyond the process.
//!
//! The tables live behind the store's gate (see the module header of
//! `store`). A write transaction works on a copy of them and replaces the
//! committed tables with it only when its closure returns `Ok`: a failed
//! write leaves nothing, and a reader, which waits for the gate, never sees
//! a write in progress. Rows keep their insertion order where the SQL
//! backend orders by `rowid`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use subrosa_proto::{ConversationId, DeviceAddress};
use zeroize::Zeroizing;

use subrosa_core::content::ReceiptKind;

use super::*;
use crate::Clock;

type Conv = [u8; 16];

#[derive(Clone, Default)]
struct KeyPackageRow {
    id: Vec<u8>,
    data: Zeroizing<Vec<u8>>,
    last_resort: bool,
    created_at: u64,
}

#[derive(Clone)]
struct ContactRow {
    handle: String,
    identity_key: Vec<u8>,
    verified: bool,
    key_change_pending: bool,
    previous_key: Option<Vec<u8>>,
}

#[derive(Clone)]
struct ConversationRec {
    row: ConversationRow,
    created_at: u64,
    last_activity: u64,
}

#[derive(Clone)]
struct MessageRec {
    conversation: Conv,
    message_id: Vec<u8>,
    from: String,
    device: String,
    sent_at: u64,
    received_at: u64,
    text: String,
    outgoing: bool,
    system: bool,
    seen: bool,
    state: Option<MessageState>,
    reason: Option<String>,
    event: Option<crate::SystemEvent>,
    reply_to: Option<Vec<u8>>,
    /// When the edit applied last was sent.
    edited_at: Option<u64>,
    deleted: bool,
    /// `(member, emoji, sent at, on)`, in the order they came; a taken
    /// back reaction stays as `on = false` so that an older "add" arriving
    /// after it cannot bring it back.
    reactions: Vec<(String, String, u64, bool)>,
    recipients: Vec<String>,
    receipts: Vec<(String, ReceiptKind)>,
    read_at: Option<u64>,
    preview: Option<crate::store::MessagePreview>,
    expires_at: Option<u64>,
}

#[derive(Clone)]
struct AlertRec {
    alert: Alert,
    shown: bool,
    cleared: bool,
}

/// Every table; cloned at the start of a write transaction.
#[derive(Clone, Default)]
struct Tables {
    meta: BTreeMap<String, Zeroizing<Vec<u8>>>,
    groups: BTreeMap<Vec<u8>, Zeroizing<Vec<u8>>>,
    epochs: BTreeMap<(Vec<u8>, u64), Zeroizing<Vec<u8>>>,
    key_packages: Vec<KeyPackageRow>,
    contacts: Vec<ContactRow>,
    conversations: Vec<ConversationRec>,
    messages: BTreeMap<u64, MessageRec>,
    next_message: u64,
    processed: BTreeSet<Vec<u8>>,
    outbox: BTreeMap<i64, QueuedSend>,
    next_outbox: i64,
    kt_roots: BTreeMap<u64, Vec<u8>>,
    kt_signed_heads: BTreeMap<u64, Vec<u8>>,
    kt_head_gossip: Vec<(String, u64, Vec<u8>)>,
    alerts: Vec<AlertRec>,
    seq_out: BTreeMap<Conv, u64>,
    seq_in: BTreeMap<(Conv, String), u64>,
    known: BTreeMap<Conv, bool>,
    past_members: BTreeSet<(Conv, String)>,
    member_checks: Vec<MemberCheck>,
    key_updates: BTreeMap<Conv, (u64, u64)>,
    member_updates: BTreeMap<(Conv, String), u64>,
    pending_commits: Vec<PendingCommit>,
    early_actions: Vec<(Conv, Vec<u8>, EarlyAction)>,
    receipts_due: Vec<(Conv, [u8; 16], String, ReceiptKind)>,
    attachments: Vec<AttachmentRow>,
}

struct State {
    committed: Tables,
    /// The copy an open write transaction works on.
    working: Option<Tables>,
}

/// A store that keeps everything in memory.
pub struct MemoryStore {
    gate: Gate,
    /// Stamps rows (alerts, conversations, key packages) with the time.
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store on the system clock.
    #[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
    pub fn new() -> Self {
        Self::with_clock(Arc::new(crate::SystemClock))
    }

    /// An empty store that stamps rows with `clock` (a web page's, say:
    /// wasm32 has no system clock).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        MemoryStore {
            gate: Gate::default(),
            clock,
            state: Mutex::new(State { committed: Tables::default(), working: None }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for MemoryStore {
    fn read_dyn(&self, f: &mut dyn FnMut(&dyn Tx) -> Result<(), ClientError>) -> Result<(), ClientError> {
        let entered = self.gate.enter(false)?;
        if entered.outer() {
            // A write that panicked left its copy behind: it never committed.
            self.lock().working = None;
        }
        f(&MemTx { state: &self.state, clock: &*self.clock })
    }

    fn write_dyn(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), ClientError>) -> Result<(), ClientError> {
        let entered = self.gate.enter(true)?;
        let mut tx = MemTx { state: &self.state, clock: &*self.clock };
        if !entered.outer() {
            // A write inside a write is a savepoint (see the SQLCipher store).
            let saved = self.lock().working.clone();
            let result = f(&mut tx);
            if result.is_err() {
                self.lock().working = saved;
            }
            return result;
        }
        {
            let mut s = self.lock();
            s.working = Some(s.committed.clone());
        }
        let result = f(&mut tx);
        let mut s = self.lock();
        let working = s.working.take();
        if let (Ok(()), Some(w)) = (&result, working) {
            s.committed = w;
        }
        result
    }
}

struct MemTx<'a> {
    state: &'a Mutex<State>,
    clock: &'a dyn Clock,
}

impl MemTx<'_> {
    fn with<T>(&self, f: impl FnOnce(&mut Tables) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let State { committed, working } = &mut *s;
        f(working.as_mut().unwrap_or(committed))
    }
}

fn stored(m: &MessageRec, c: &ConversationRow) -> StoredMessage {
    let state = if m.outgoing && !m.system { Some(m.state.unwrap_or(MessageState::Sent)) } else { None };
    let mut out = StoredMessage {
        id: hex::encode(&m.message_id),
        conversation: c.id.to_hex(),
        target: c.target(),
        group: c.kind == "group",
        from: m.from.clone(),
        device: m.device.clone(),
        sent_at: m.sent_at,
        received_at: m.received_at,
        text: m.text.clone(),
        outgoing: m.outgoing,
        system: m.system,
        state,
        reason: if state == Some(MessageState::Failed) { m.reason.clone() } else { None },
        event: m.event.clone(),
        reply_to: m.reply_to.as_ref().map(hex::encode),
        edited: m.edited_at.is_some(),
        deleted: m.deleted,
        reactions: Vec::new(),
        receipts: Vec::new(),
        preview: m.preview.clone(),
        expires_at: m.expires_at,
        request: false,
        dangerous_links: Vec::new(),
    };
    let mut reactions: Vec<Reaction> = Vec::new();
    for (member, emoji, _, on) in &m.reactions {
        if !on {
            continue;
        }
        match reactions.iter_mut().find(|r| r.emoji == *emoji) {
            Some(r) => r.from.push(member.clone()),
            None => reactions.push(Reaction { emoji: emoji.clone(), from: vec![member.clone()] }),
        }
    }
    out.reactions = reactions;
    if let Some(stored) = out.state {
        (out.state, out.receipts) = {
            let (s, d) = receipt_state(stored, &m.recipients, &m.receipts);
            (Some(s), d)
        };
    }
    out
}

impl Tables {
    fn conversation(&self, id: &Conv) -> Option<&ConversationRec> {
        self.conversations.iter().find(|c| c.row.id.0 == *id)
    }

    fn conversations_where(&self, keep: impl Fn(&ConversationRow) -> bool) -> Vec<ConversationRow> {
        let mut v: Vec<&ConversationRec> = self.conversations.iter().filter(|c| keep(&c.row)).collect();
        v.sort_by_key(|c| c.created_at);
        v.into_iter().map(|c| c.row.clone()).collect()
    }

    fn add_alert(&mut self, at: u64, concerns: Option<&str>, text: &str, proof: Option<&str>) {
        if self.alerts.iter().any(|a| a.alert.text == text) {
            return;
        }
        let id = self.alerts.last().map_or(1, |a| a.alert.id + 1);
        self.alerts.push(AlertRec {
            alert: Alert {
                id,
                at,
                concerns: concerns.map(str::to_string),
                fork: proof.is_some(),
                text: text.to_string(),
                proof: proof.map(str::to_string),
            },
            shown: false,
            cleared: false,
        });
    }

    fn forget_conversation(&mut self, id: &Conv) {
        self.conversations.retain(|c| c.row.id.0 != *id);
        self.groups.remove(id.as_slice());
        self.epochs.retain(|(g, _), _| g.as_slice() != id.as_slice());
        self.key_updates.remove(id);
    }
}

impl Meta for MemTx<'_> {
    fn meta(&self, key: &str) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError> {
        Ok(self.with(|t| t.meta.get(key).cloned()))
    }

    fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<(), ClientError> {
        self.with(|t| t.meta.insert(key.to_string(), Zeroizing::new(value.to_vec())));
        Ok(())
    }

    fn delete_meta(&mut self, key: &str) -> Result<(), ClientError> {
        self.with(|t| t.meta.remove(key));
        Ok(())
    }

    fn meta_keys(&self, prefix: &str) -> Result<Vec<String>, ClientError> {
        Ok(self.with(|t| {
            t.meta.range(prefix.to_string()..).map(|(k, _)| k).take_while(|k| k.starts_with(prefix)).cloned().collect()
        }))
    }
}

impl Directory for MemTx<'_> {
    fn kt_root(&self, epoch: u64) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(self.with(|t| t.kt_roots.get(&epoch).cloned()))
    }

    fn kt_range(&self) -> Result<Option<(u64, u64)>, ClientError> {
        Ok(self.with(|t| t.kt_roots.keys().next().copied().zip(t.kt_roots.keys().next_back().copied())))
    }

    fn put_kt_roots(&mut self, from: u64, roots: &[[u8; 32]]) -> Result<(), ClientError> {
        self.with(|t| {
            for (i, root) in roots.iter().enumerate() {
                t.kt_roots.entry(from + i as u64).or_insert_with(|| root.to_vec());
            }
        });
        Ok(())
    }

    fn kt_signed_head(&self, epoch: u64) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(self.with(|t| t.kt_signed_heads.get(&epoch).cloned()))
    }

    fn kt_newest_signed_head(&self) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(self.with(|t| t.kt_signed_heads.values().next_back().cloned()))
    }

    fn put_kt_signed_head(&mut self, epoch: u64, head: &[u8]) -> Result<(), ClientError> {
        self.with(|t| t.kt_signed_heads.entry(epoch).or_insert_with(|| head.to_vec()).len());
        Ok(())
    }

    fn push_kt_head_gossip(&mut self, source: &str, epoch: u64, head: &[u8]) -> Result<(), ClientError> {
        self.with(|t| match t.kt_head_gossip.iter_mut().find(|(s, _, _)| s == source) {
            Some(g) if epoch > g.1 => *g = (source.to_string(), epoch, head.to_vec()),
            Some(_) => {}
            None => t.kt_head_gossip.push((source.to_string(), epoch, head.to_vec())),
        });
        Ok(())
    }

    fn kt_head_gossip(&self) -> Result<Vec<(String, Vec<u8>)>, ClientError> {
        Ok(self.with(|t| {
            let mut v = t.kt_head_gossip.clone();
            v.sort_by_key(|g| g.1);
            v.into_iter().map(|(s, _, h)| (s, h)).collect()
        }))
    }

    fn drop_kt_head_gossip(&mut self, source: &str, head: &[u8]) -> Result<(), ClientError> {
        self.with(|t| t.kt_head_gossip.retain(|(s, _, h)| !(s == source && h == head)));
        Ok(())
    }

    fn add_alert_about(&mut self, concerns: &str, text: &str, proof: Option<&str>) -> Result<(), ClientError> {
        let at = self.clock.now_ms();
        self.with(|t| t.add_alert(at, Some(concerns), text, proof));
        Ok(())
    }

    fn alerts(&self) -> Result<Vec<Alert>, ClientError> {
        Ok(self.with(|t| t.alerts.iter().filter(|a| !a.cleared).map(|a| a.alert.clone()).collect()))
    }

    fn clear_alerts(&mut self, forks: bool) -> Result<usize, ClientError> {
        Ok(self.with(|t| {
            let mut n = 0;
            for a in t.alerts.iter_mut().filter(|a| !a.cleared && (forks || !a.alert.fork)) {
                a.cleared = true;
                a.shown = true;
                n += 1;
            }
            n
        }))
    }

    fn open_fork(&self) -> Result<Option<String>, ClientError> {
        Ok(self.with(|t| t.alerts.iter().find(|a| a.alert.fork && !a.cleared).map(|a| a.alert.text.clone())))
    }

    fn add_alert(&mut self, text: &str) -> Result<(), ClientError> {
        let at = self.clock.now_ms();
        self.with(|t| t.add_alert(at, None, text, None));
        Ok(())
    }

    fn take_alerts(&mut self) -> Result<Vec<String>, ClientError> {
        Ok(self.with(|t| {
            let mut out = Vec::new();
            for a in t.alerts.iter_mut().filter(|a| !a.shown) {
                a.shown = true;
                out.push(a.alert.text.clone());
            }
            out
        }))
    }
}

impl Contacts for MemTx<'_> {
    fn contact_key(&self, handle: &str) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(self.with(|t| t.contacts.iter().find(|c| c.handle == handle).map(|c| c.identity_key.clone())))
    }

    fn pin_contact(&mut self, handle: &str, identity_key: &[u8]) -> Result<(), ClientError> {
        self.with(|t| {
            if !t.contacts.iter().any(|c| c.handle == handle) {
                t.contacts.push(ContactRow {
                    handle: handle.to_string(),
                    identity_key: identity_key.to_vec(),
                    verified: false,
                    key_change_pending: false,
                    previous_key: None,
                });
            }
        });
        Ok(())
    }

    fn set_verified(&mut self, handle: &str, verified: bool) -> Result<(), ClientError> {
        self.with(|t| {
            if let Some(c) = t.contacts.iter_mut().find(|c| c.handle == handle) {
                c.verified = verified;
                c.key_change_pending = false;
            }
        });
        Ok(())
    }

    fn change_contact_key(&mut self, handle: &str, identity_key: &[u8]) -> Result<bool, ClientError> {
        Ok(self.with(|t| match t.contacts.iter_mut().find(|c| c.handle == handle) {
            Some(c) => {
                let was_verified = c.verified;
                if c.identity_key != identity_key {
                    c.previous_key = Some(std::mem::replace(&mut c.identity_key, identity_key.to_vec()));
                }
                c.verified = false;
                c.key_change_pending = was_verified;
                was_verified
            }
            None => false,
        }))
    }

    fn key_change_pending(&self, handle: &str) -> Result<bool, ClientError> {
        Ok(self.with(|t| t.contacts.iter().any(|c| c.handle == handle && c.key_change_pending)))
    }

    fn contact_previous_key(&self, handle: &str) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(self.with(|t| t.contacts.iter().find(|c| c.handle == handle).and_then(|c| c.previous_key.clone())))
    }

    fn clear_key_change(&mut self, handle: &str) -> Result<(), ClientError> {
        self.with(|t| {
            if let Some(c) = t.contacts.iter_mut().find(|c| c.handle == handle) {
                c.key_change_pending = false;
            }
        });
        Ok(())
    }

    fn contacts(&self) -> Result<Vec<Contact>, ClientError> {
        Ok(self.with(|t| {
            let mut v: Vec<Contact> = t
                .contacts
                .iter()
                .map(|c| Contact {
                    handle: c.handle.clone(),
                    identity_key: hex::encode(&c.identity_key),
                    verified: c.verified,
                })
                .collect();
            v.sort_by(|a, b| a.handle.cmp(&b.handle));
            v
        }))
    }
}

impl Conversations for MemTx<'_> {
    fn add_conversation(
        &mut self,
        id: &ConversationId,
        kind: &str,
        name: &str,
        peer: Option<&str>,
    ) -> Result<(), ClientError> {
        let now = self.clock.now_ms();
        self.with(|t| {
            if t.conversation(&id.0).is_none() {
                t.conversations.push(ConversationRec {
                    row: ConversationRow {
                        id: *id,
                        kind: kind.to_string(),
                        name: name.to_string(),
                        peer: peer.map(str::to_string),
                        active: true,
                    },
                    created_at: now,
                    last_activity: now,
                });
            }
            t.known.entry(id.0).or_insert(false);
            t.key_updates.entry(id.0).or_insert((now, 0));
        });
        Ok(())
    }

    fn conversation_created_at(&self, id: &ConversationId) -> Result<u64, ClientError> {
        Ok(self.with(|t| t.conversation(&id.0).map_or(0, |c| c.created_at)))
    }

    fn known_conversation(&self, id: &ConversationId) -> Result<Option<bool>, ClientError> {
        Ok(self.with(|t| t.known.get(&id.0).copied()))
    }

    fn add_linked_conversation(
        &mut self,
        id: &ConversationId,
        kind: &str,
        name: &str,
        peer: Option<&str>,
    ) -> Result<(), ClientError> {
        let fresh = self.known_conversation(id)?.is_none();
        self.add_conversation(id, kind, name, peer)?;
        if fresh {
            self.with(|t| t.known.insert(id.0, true));
        }
        Ok(())
    }

    fn note_members(&mut self, id: &ConversationId, handles: &[&str]) -> Result<(), ClientError> {
        self.with(|t| {
            for h in handles {
                t.past_members.insert((id.0, h.to_string()));
            }
        });
        Ok(())
    }

    fn was_member(&self, id: &ConversationId, handle: &str) -> Result<bool, ClientError> {
        Ok(self.with(|t| t.past_members.contains(&(id.0, handle.to_string()))))
    }

    fn add_member_check(&mut self, c: &MemberCheck) -> Result<(), ClientError> {
        self.with(|t| {
            match t
                .member_checks
                .iter_mut()
                .find(|m| m.conversation == c.conversation && m.handle == c.handle && m.device == c.device)
            {
                // As the SQL upsert: everything but `welcome` is replaced.
                Some(m) => *m = MemberCheck { welcome: m.welcome, ..c.clone() },
                None => t.member_checks.push(c.clone()),
            }
        });
        Ok(())
    }

    fn member_checks(
        &self,
        conversation: Option<&ConversationId>,
        state: &str,
    ) -> Result<Vec<MemberCheck>, ClientError> {
        Ok(self.with(|t| {
            t.member_checks
                .iter()
                .filter(|m| m.state == state && conversation.is_none_or(|c| m.conversation == *c))
                .cloned()
                .collect()
        }))
    }

    fn set_member_check(
        &mut self,
        conversation: &ConversationId,
        handle: &str,
        device: &str,
        state: &str,
        why: &str,
    ) -> Result<(), ClientError> {
        self.with(|t| {
            for m in t
                .member_checks
                .iter_mut()
                .filter(|m| m.conversation == *conversation && m.handle == handle && m.device == device)
            {
                m.state = state.to_string();
                m.why = why.to_string();
            }
        });
        Ok(())
    }

    fn drop_member_check(
        &mut self,
        conversation: &ConversationId,
        handle: &str,
        device: Option<&str>,
    ) -> Result<usize, ClientError> {
        Ok(self.with(|t| {
            let before = t.member_checks.len();
            t.member_checks.retain(|m| {
                !(m.conversation == *conversation && m.handle == handle && device.is_none_or(|d| m.device == d))
            });
            before - t.member_checks.len()
        }))
    }

    fn drop_refused_conversation(&mut self, id: &ConversationId) -> Result<(), ClientError> {
        self.with(|t| {
            t.messages.retain(|_, m| m.conversation != id.0);
            t.early_actions.retain(|(c, _, _)| *c != id.0);
            t.receipts_due.retain(|(c, _, _, _)| *c != id.0);
            t.member_checks.retain(|m| m.conversation != *id);
            t.seq_in.retain(|(c, _), _| *c != id.0);
        });
        self.forget_conversation(id)
    }

    fn forget_conversation(&mut self, id: &ConversationId) -> Result<(), ClientError> {
        self.with(|t| t.forget_conversation(&id.0));
        Ok(())
    }

    fn direct_conversation(&self, peer: &str) -> Result<Option<ConversationId>, ClientError> {
        Ok(self.with(|t| {
            t.conversations
                .iter()
                .filter(|c| c.row.kind == "direct" && c.row.peer.as_deref() == Some(peer) && c.row.active)
                .max_by_key(|c| (c.last_activity, c.created_at))
                .map(|c| c.row.id)
        }))
    }

    fn conversation(&self, id: &ConversationId) -> Result<Option<ConversationRow>, ClientError> {
        Ok(self.with(|t| t.conversation(&id.0).map(|c| c.row.clone())))
    }

    fn conversations_with(&self, peer: &str) -> Result<Vec<ConversationRow>, ClientError> {
        Ok(self.with(|t| t.conversations_where(|c| c.kind == "direct" && c.peer.as_deref() == Some(peer))))
    }

    fn conversations_by_prefix(&self, prefix: &str) -> Result<Vec<ConversationRow>, ClientError> {
        let prefix = prefix.to_ascii_lowercase();
        Ok(self.with(|t| t.conversations_where(|c| c.id.to_hex().starts_with(&prefix))))
    }

    fn groups_named(&self, name: &str) -> Result<Vec<ConversationRow>, ClientError> {
        let mut v = self.with(|t| t.conversations_where(|c| c.kind == "group" && c.name == name));
        v.sort_by_key(|c| !c.active);
        Ok(v)
    }

    fn group_rows(&self) -> Result<Vec<ConversationRow>, ClientError> {
        Ok(self.with(|t| t.conversations_where(|c| c.kind == "group")))
    }

    fn active_conversations(&self) -> Result<Vec<ConversationRow>, ClientError> {
        Ok(self.with(|t| t.conversations_where(|c| c.active)))
    }

    fn set_conversation_name(&mut self, id: &ConversationId, name: &str) -> Result<(), ClientError> {
        self.with(|t| {
            if let Some(c) = t.conversations.iter_mut().find(|c| c.row.id == *id) {
                c.row.name = name.to_string();
            }
        });
        Ok(())
    }

    fn deactivate_conversation(&mut self, id: &ConversationId) -> Result<(), ClientError> {
        self.with(|t| {
            if let Some(c) = t.conversations.iter_mut().find(|c| c.row.id == *id) {
                c.row.active = false;
            }
            t.groups.remove(id.0.as_slice());
            t.epochs.retain(|(g, _), _| g.as_slice() != id.0.as_slice());
        });
        Ok(())
    }

    fn retire_conversation(&mut self, id: &ConversationId) -> Result<(), ClientError> {
        self.with(|t| {
            if let Some(c) = t.conversations.iter_mut().find(|c| c.row.id == *id) {
                c.row.active = false;
            }
        });
        Ok(())
    }

    fn key_update_state(&self, conversation: &ConversationId) -> Result<(u64, u64), ClientError> {
        Ok(self.with(|t| t.key_updates.get(&conversation.0).copied().unwrap_or((0, 0))))
    }

    fn note_sent(&mut self, conversation: &ConversationId) -> Result<(), ClientError> {
        self.with(|t| t.key_updates.entry(conversation.0).or_insert((0, 0)).1 += 1);
        Ok(())
    }

    fn note_own_update(&mut self, conversation: &ConversationId, at_ms: u64) -> Result<(), ClientError> {
        self.with(|t| t.key_updates.insert(conversation.0, (at_ms, 0)));
        Ok(())
    }

    fn note_member_update(
        &mut self,
        conversation: &ConversationId,
        device: &DeviceAddress,
        at_ms: u64,
    ) -> Result<(), ClientError> {
        self.with(|t| {
            let at = t.member_updates.entry((conversation.0, device.to_string())).or_insert(at_ms);
            *at = (*at).max(at_ms);
        });
        Ok(())
    }

    fn member_update(&self, conversation: &ConversationId, device: &DeviceAddress) -> Result<Option<u64>, ClientError> {
        Ok(self.with(|t| t.member_updates.get(&(conversation.0, device.to_string())).copied()))
    }
}

impl History for MemTx<'_> {
    fn next_seq(&mut self, conversation: &ConversationId) -> Result<u64, ClientError> {
        Ok(self.with(|t| {
            let last = t.seq_out.entry(conversation.0).or_insert(0);
            *last += 1;
            *last
        }))
    }

    fn release_seq(&mut self, conversation: &ConversationId, seq: u64) -> Result<(), ClientError> {
        self.with(|t| {
            if let Some(last) = t.seq_out.get_mut(&conversation.0).filter(|l| **l == seq) {
                *last -= 1;
            }
        });
        Ok(())
    }

    fn arrived_seq(
        &mut self,
        conversation: &ConversationId,
        device: &str,
        seq: u64,
    ) -> Result<Option<u64>, ClientError> {
        Ok(self.with(|t| {
            let last = t.seq_in.get(&(conversation.0, device.to_string())).copied().unwrap_or(0);
            if seq <= last {
                return None;
            }
            t.seq_in.insert((conversation.0, device.to_string()), seq);
            Some(seq - last - 1)
        }))
    }

    fn insert_message(
        &mut self,
        m: &StoredMessage,
        conversation: &ConversationId,
        message_id: &[u8],
        seen: bool,
    ) -> Result<bool, ClientError> {
        Ok(self.with(|t| {
            if t.messages.values().any(|r| r.conversation == conversation.0 && r.message_id == message_id) {
                return false;
            }
            t.next_message += 1;
            t.messages.insert(
                t.next_message,
                MessageRec {
                    conversation: conversation.0,
                    message_id: message_id.to_vec(),
                    from: m.from.clone(),
                    device: m.device.clone(),
                    sent_at: m.sent_at,
                    received_at: m.received_at,
                    text: m.text.clone(),
                    outgoing: m.outgoing,
                    system: m.system,
                    seen,
                    state: m.state,
                    reason: None,
                    event: m.event.clone(),
                    reply_to: m.reply_to.as_deref().and_then(|h| hex::decode(h).ok()),
                    edited_at: None,
                    deleted: false,
                    reactions: Vec::new(),
                    recipients: Vec::new(),
                    receipts: Vec::new(),
                    // This account's own messages and system lines owe nobody a receipt.
                    read_at: (m.outgoing || m.system).then_some(m.received_at),
                    preview: m.preview.clone(),
                    expires_at: m.expires_at,
                },
            );
            if let Some(c) = t.conversations.iter_mut().find(|c| c.row.id == *conversation) {
                c.last_activity = m.received_at;
            }
            true
        }))
    }

    fn delete_message(&mut self, conversation: &ConversationId, message_id: &[u8]) -> Result<(), ClientError> {
        self.with(|t| t.messages.retain(|_, m| !(m.conversation == conversation.0 && m.message_id == message_id)));
        Ok(())
    }

    fn set_message_expiry(
        &mut self,
        conversation: &ConversationId,
        message_id: &[u8],
        expires_at: u64,
    ) -> Result<(), ClientError> {
        self.with(|t| {
            for m in t.messages.values_mut() {
                if m.conversation == conversation.0 && m.message_id == message_id && m.expires_at.is_none() {
                    m.expires_at = Some(expires_at);
                }
            }
        });
        Ok(())
    }

    fn delete_expired(&mut self, now_ms: u64) -> Result<Vec<String>, ClientError> {
        Ok(self.with(|t| {
            let gone: Vec<(Conv, Vec<u8>)> = t
                .messages
                .values()
                .filter(|m| m.deleted || m.expires_at.is_some_and(|at| at <= now_ms))
                .map(|m| (m.conversation, m.message_id.clone()))
                .collect();
            t.messages.retain(|_, m| m.expires_at.is_none_or(|at| at > now_ms));
            let mut files = Vec::new();
            t.attachments.retain(|a| {
                let expired = gone.iter().any(|(c, id)| a.conversation.0 == *c && a.message_id == *id);
                if expired {
                    files.extend(a.local.clone());
                }
                !expired
            });
            files
        }))
    }

    fn history(&self, conversations: &[ConversationRow]) -> Result<Vec<StoredMessage>, ClientError> {
        Ok(self.with(|t| {
            let mut out: Vec<(u64, StoredMessage)> = Vec::new();
            for c in conversations {
                for (seq, m) in t.messages.iter().filter(|(_, m)| m.conversation == c.id.0) {
                    out.push((*seq, stored(m, c)));
                }
            }
            out.sort_by_key(|(seq, _)| *seq);
            out.into_iter().map(|(_, m)| m).collect()
        }))
    }

    fn received_after_seq(&self, after_seq: u64, since_ms: u64) -> Result<Vec<(u64, StoredMessage)>, ClientError> {
        Ok(self.with(|t| {
            t.messages
                .range(after_seq.saturating_add(1)..)
                .filter(|(_, m)| m.received_at >= since_ms)
                .filter_map(|(seq, m)| {
                    t.conversation(&m.conversation).filter(|c| c.row.kind != "own").map(|c| (*seq, stored(m, &c.row)))
                })
                .collect()
        }))
    }

    fn take_unseen(&mut self) -> Result<Vec<StoredMessage>, ClientError> {
        self.with(|t| {
            let mut out = Vec::new();
            let unseen: Vec<u64> = t.messages.iter().filter(|(_, m)| !m.seen).map(|(s, _)| *s).collect();
            for seq in unseen {
                let Some(m) = t.messages.get(&seq) else { continue };
                let row = t
                    .conversation(&m.conversation)
                    .ok_or_else(|| ClientError::Store("message of an unknown conversation".into()))?;
                out.push(stored(m, &row.row));
                if let Some(m) = t.messages.get_mut(&seq) {
                    m.seen = true;
                }
            }
            Ok(out)
        })
    }

    fn is_processed(&self, digest: &[u8]) -> Result<bool, ClientError> {
        Ok(self.with(|t| t.processed.contains(digest)))
    }

    fn mark_processed(&mut self, digest: &[u8]) -> Result<(), ClientError> {
        self.with(|t| t.processed.insert(digest.to_vec()));
        Ok(())
    }

    fn set_message_state(
        &mut self,
        conversation: &ConversationId,
        message_id: &[u8],
        state: MessageState,
        reason: Option<&str>,
    ) -> Result<(), ClientError> {
        self.with(|t| {
            for m in t.messages.values_mut().filter(|m| m.conversation == conversation.0 && m.message_id == message_id)
            {
                m.state = Some(state);
                m.reason = reason.map(str::to_string);
            }
        });
        Ok(())
    }

    fn message(&self, conversation: &ConversationId, message_id: &[u8]) -> Result<Option<StoredMessage>, ClientError> {
        Ok(self.with(|t| {
            let row = t.conversation(&conversation.0)?;
            t.messages
                .values()
                .find(|m| m.conversation == conversation.0 && m.message_id == message_id)
                .map(|m| stored(m, &row.row))
        }))
    }
}

impl MemTx<'_> {
    fn with_message<T>(
        &self,
        conversation: &ConversationId,
        message_id: &[u8],
        f: impl FnOnce(&mut MessageRec) -> T,
    ) -> Option<T> {
        self.with(|t| {
            t.messages.values_mut().find(|m| m.conversation == conversation.0 && m.message_id == message_id).map(f)
        })
    }
}

impl Annotations for MemTx<'_> {
    fn set_reaction(
        &mut self,
        conversation: &ConversationId,
        message_id: &[u8],
        member: &str,
        emoji: &str,
        on: bool,
        at: u64,
    ) -> Result<(), ClientError> {
        self.with_message(conversation, message_id, |m| {
            let found = m.reactions.iter().position(|(w, e, _, _)| w == member && e == emoji);
            if let Some(i) = found {
                let (_, _, prev_at, prev_on) = m.reactions[i];
                if !crate::store::reaction_supersedes(at, on, prev_at, prev_on) {
                    return;
                }
                if prev_on == on {
                    m.reactions[i].2 = at;
                    return;
                }
                // Changed: a reaction added again comes last, as a new one.
                m.reactions.remove(i);
            }
            m.reactions.push((member.to_string(), emoji.to_string(), at, on));
            m.seen = false;
        });
        Ok(())
    }

    fn edit_message(
        &mut self,
        conversation: &ConversationId,
        message_id: &[u8],
        text: &str,
        at: u64,
    ) -> Result<bool, ClientError> {
        Ok(self
            .with_message(conversation, message_id, |m| {
                if m.deleted || m.edited_at.is_some_and(|e| e > at) {
                    return false;
                }
                m.text = text.to_string();
                m.edited_at = Some(at);
                m.seen = false;
                true
            })
            .unwrap_or(false))
    }

    fn erase_message(&mut self, conversation: &ConversationId, message_id: &[u8]) -> Result<(), ClientError> {
        self.with_message(conversation, message_id, |m| {
            m.text = String::new();
            m.preview = None;
            m.deleted = true;
            m.reactions.clear();
            m.seen = false;
        });
        self.with(|t| t.early_actions.retain(|(c, target, _)| !(*c == conversation.0 && target == message_id)));
        Ok(())
    }

    fn mark_unseen(&mut self, conversation: &ConversationId, message_id: &[u8]) -> Result<(), ClientError> {
        self.with_message(conversation, message_id, |m| m.seen = false);
        Ok(())
    }

    fn set_recipients(
        &mut self,
        conversation: &ConversationId,
        message_id: &[u8],
        members: &[String],
    ) -> Result<(), ClientError> {
        self.with_message(conversation, message_id, |m| m.recipients = members.to_vec());
        Ok(())
    }

    fn add_receipt(
        &mut self,
        conversation: &ConversationId,
        message_id: &[u8],
        member: &str,
        kind: ReceiptKind,
        _at: u64,
    ) -> Result<(), ClientError> {
        self.with_message(conversation, message_id, |m| match m.receipts.iter_mut().find(|(w, _)| w == member) {
            Some((_, k)) => *k = (*k).max(kind),
            None => m.receipts.push((member.to_string(), kind)),
        });
        Ok(())
    }

    fn push_early_action(
        &mut self,
        conversation: &ConversationId,
        target: &[u8],
        action: &EarlyAction,
    ) -> Result<(), ClientError> {
        self.with(|t| t.early_actions.push((conversation.0, target.to_vec(), action.clone())));
        Ok(())
    }

    fn early_actions_from(&self, conversation: &ConversationId, sender: &str) -> Result<usize, ClientError> {
        Ok(self.with(|t| t.early_actions.iter().filter(|(c, _, a)| *c == conversation.0 && a.from == sender).count()))
    }

    fn take_early_actions(
        &mut self,
        conversation: &ConversationId,
        target: &[u8],
    ) -> Result<Vec<EarlyAction>, ClientError> {
        Ok(self.with(|t| {
            let (taken, kept) = std::mem::take(&mut t.early_actions)
                .into_iter()
                .partition(|(c, m, _)| *c == conversation.0 && m == target);
            t.early_actions = kept;
            taken.into_iter().map(|(_, _, a): (Conv, Vec<u8>, EarlyAction)| a).collect()
        }))
    }

    fn push_receipt_due(
        &mut self,
        conversation: &ConversationId,
        message_id: &[u8; 16],
        author: &str,
        kind: ReceiptKind,
    ) -> Result<(), ClientError> {
        self.with(|t| {
            if !t.receipts_due.iter().any(|(c, m, _, k)| *c == conversation.0 && m == message_id && *k == kind) {
                t.receipts_due.push((conversation.0, *message_id, author.to_string(), kind));
            }
        });
        Ok(())
    }

    fn take_receipts_due(&mut self) -> Result<Vec<ReceiptDue>, ClientError> {
        Ok(self.with(|t| {
            let mut out: Vec<ReceiptDue> = Vec::new();
            for (c, m, author, kind) in std::mem::take(&mut t.receipts_due) {
                let conversation = ConversationId(c);
                match out.iter_mut().find(|d| d.conversation == conversation && d.author == author && d.kind == kind) {
                    Some(d) => d.ids.push(m),
                    None => out.push(ReceiptDue { conversation, author, kind, ids: vec![m] }),
                }
            }
            out
        }))
    }

    fn mark_read(&mut self, conversation: &ConversationId, at: u64) -> Result<Vec<([u8; 16], String)>, ClientError> {
        Ok(self.with(|t| {
            let mut out = Vec::new();
            for m in t.messages.values_mut().filter(|m| m.conversation == conversation.0 && m.read_at.is_none()) {
                m.read_at = Some(at);
                if let Ok(id) = <[u8; 16]>::try_from(m.message_id.as_slice()) {
                    out.push((id, m.from.clone()));
                }
            }
            out
        }))
    }
}

impl Outbox for MemTx<'_> {
    fn push_outbox_request(&mut self, send_id: &[u8; 16], request: &[u8]) -> Result<(), ClientError> {
        self.push(QueuedSend {
            id: 0,
            send_id: *send_id,
            message: None,
            content: None,
            request: Some(request.to_vec()),
        })
    }

    fn push_outbox(
        &mut self,
        send_id: &[u8; 16],
        conversation: &ConversationId,
        message_id: &[u8; 16],
        content: &[u8],
    ) -> Result<(), ClientError> {
        self.push(QueuedSend {
            id: 0,
            send_id: *send_id,
            message: Some((*conversation, *message_id)),
            content: Some(content.to_vec()),
            request: None,
        })
    }

    fn outbox(&self) -> Result<Vec<QueuedSend>, ClientError> {
        Ok(self.with(|t| t.outbox.values().cloned().collect()))
    }

    fn outbox_row(&self, id: i64) -> Result<Option<QueuedSend>, ClientError> {
        Ok(self.with(|t| t.outbox.get(&id).cloned()))
    }

    fn outbox_is_empty(&self) -> Result<bool, ClientError> {
        Ok(self.with(|t| t.outbox.is_empty()))
    }

    fn set_outbox_request(&mut self, id: i64, request: &[u8]) -> Result<(), ClientError> {
        self.with(|t| {
            if let Some(q) = t.outbox.get_mut(&id) {
                q.request = Some(request.to_vec());
            }
        });
        Ok(())
    }

    fn pop_outbox(&mut self, id: i64) -> Result<(), ClientError> {
        self.with(|t| t.outbox.remove(&id));
        Ok(())
    }

    fn put_pending_commit(&mut self, p: &PendingCommit) -> Result<(), ClientError> {
        self.with(|t| {
            // As `INSERT OR REPLACE`: a replaced row goes to the end.
            t.pending_commits.retain(|q| q.conversation != p.conversation);
            t.pending_commits.push(p.clone());
        });
        Ok(())
    }

    fn set_pending_commit_by_reference(
        &mut self,
        conversation: &ConversationId,
        send_id: &[u8; 16],
        by_reference: &ByReference,
    ) -> Result<bool, ClientError> {
        Ok(self.with(|t| {
            match t.pending_commits.iter_mut().find(|p| p.conversation == *conversation && p.send_id == *send_id) {
                Some(p) => {
                    p.by_reference = Some(by_reference.clone());
                    true
                }
                None => false,
            }
        }))
    }

    fn pending_commit(&self, conversation: &ConversationId) -> Result<Option<PendingCommit>, ClientError> {
        Ok(self.with(|t| t.pending_commits.iter().find(|p| p.conversation == *conversation).cloned()))
    }

    fn pending_commit_conversations(&self) -> Result<Vec<ConversationId>, ClientError> {
        Ok(self.with(|t| t.pending_commits.iter().map(|p| p.conversation).collect()))
    }

    fn delete_pending_commit(&mut self, conversation: &ConversationId) -> Result<(), ClientError> {
        self.with(|t| t.pending_commits.retain(|p| p.conversation != *conversation));
        Ok(())
    }
}

impl MemTx<'_> {
    fn push(&mut self, mut q: QueuedSend) -> Result<(), ClientError> {
        self.with(|t| {
            if t.outbox.values().any(|o| o.send_id == q.send_id) {
                return Err(ClientError::Store("outbox: send id used twice".into()));
            }
            t.next_outbox += 1;
            q.id = t.next_outbox;
            t.outbox.insert(q.id, q);
            Ok(())
        })
    }
}

impl MlsState for MemTx<'_> {
    fn mark_newest_key_package_last_resort(&mut self) -> Result<(), ClientError> {
        self.with(|t| {
            if let Some(k) = t.key_packages.last_mut() {
                k.last_resort = true;
            }
        });
        Ok(())
    }

    fn erase_key_packages_before(&mut self, cutoff_ms: u64) -> Result<usize, ClientError> {
        Ok(self.with(|t| {
            let before = t.key_packages.len();
            t.key_packages.retain(|k| k.created_at >= cutoff_ms);
            let n = before - t.key_packages.len();
            // One last-resort package per suite, made together: the
            // newest `SUITES.len()` stay marked.
            let mut kept = 0;
            for k in t.key_packages.iter_mut().rev() {
                if k.last_resort {
                    kept += 1;
                    k.last_resort = kept <= subrosa_core::SUITES.len();
                }
            }
            n
        }))
    }

    fn group_state(&self, group_id: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError> {
        Ok(self.with(|t| t.groups.get(group_id).cloned()))
    }

    fn group_state_version(&self, group_id: &[u8]) -> Result<Option<subrosa_core::StateVersion>, ClientError> {
        use sha2::Digest as _;
        Ok(self.with(|t| t.groups.get(group_id).map(|s| sha2::Sha256::digest(s.as_slice()).into())))
    }

    fn group_epoch(&self, group_id: &[u8], epoch: u64) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError> {
        Ok(self.with(|t| t.epochs.get(&(group_id.to_vec(), epoch)).cloned()))
    }

    fn max_group_epoch(&self, group_id: &[u8]) -> Result<Option<u64>, ClientError> {
        Ok(self.with(|t| t.epochs.keys().filter(|(g, _)| g.as_slice() == group_id).map(|(_, e)| *e).max()))
    }

    fn put_group_state(&mut self, group_id: &[u8], state: &[u8], epochs: &[(u64, &[u8])]) -> Result<(), ClientError> {
        let id = Conv::try_from(group_id).ok();
        self.with(|t| {
            t.groups.insert(group_id.to_vec(), Zeroizing::new(state.to_vec()));
            if let Some(id) = id {
                t.known.insert(id, false);
            }
            for (epoch, data) in epochs {
                t.epochs.insert((group_id.to_vec(), *epoch), Zeroizing::new(data.to_vec()));
            }
            let newest = t.epochs.keys().filter(|(g, _)| g.as_slice() == group_id).map(|(_, e)| *e).max();
            if let Some(newest) = newest {
                t.epochs.retain(|(g, e), _| g.as_slice() != group_id || *e + EPOCHS_KEPT > newest);
            }
        });
        Ok(())
    }

    fn key_package(&self, id: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError> {
        Ok(self.with(|t| t.key_packages.iter().find(|k| k.id == id).map(|k| k.data.clone())))
    }

    fn put_key_package(&mut self, id: &[u8], data: &[u8]) -> Result<(), ClientError> {
        let now = self.clock.now_ms();
        self.with(|t| match t.key_packages.iter_mut().find(|k| k.id == id) {
            Some(k) => k.data = Zeroizing::new(data.to_vec()),
            None => t.key_packages.push(KeyPackageRow {
                id: id.to_vec(),
                data: Zeroizing::new(data.to_vec()),
                last_resort: false,
                created_at: now,
            }),
        });
        Ok(())
    }

    fn delete_key_package(&mut self, id: &[u8]) -> Result<(), ClientError> {
        self.with(|t| t.key_packages.retain(|k| k.id != id || k.last_resort));
        Ok(())
    }
}

impl AttachmentStore for MemTx<'_> {
    fn put_attachments(
        &mut self,
        conversation: &ConversationId,
        message_id: &[u8],
        files: &[subrosa_core::attachment::AttachedFile],
        state: AttachmentState,
    ) -> Result<(), ClientError> {
        self.with(|t| {
            if t.attachments.iter().any(|a| a.conversation == *conversation && a.message_id == message_id) {
                return;
            }
            for (index, file) in (0u32..).zip(files) {
                t.attachments.push(AttachmentRow {
                    conversation: *conversation,
                    message_id: message_id.to_vec(),
                    index,
                    file: file.clone(),
                    state: state.clone(),
                    local: None,
                    saved: None,
                });
            }
        });
        Ok(())
    }

    fn attachments_in(&self, conversation: &ConversationId) -> Result<Vec<AttachmentRow>, ClientError> {
        Ok(self.with(|t| t.attachments.iter().filter(|a| a.conversation == *conversation).cloned().collect()))
    }

    fn attachments_of(
        &self,
        conversation: &ConversationId,
        message_id: &[u8],
    ) -> Result<Vec<AttachmentRow>, ClientError> {
        Ok(self.with(|t| {
            t.attachments
                .iter()
                .filter(|a| a.conversation == *conversation && a.message_id == message_id)
                .cloned()
                .collect()
        }))
    }

    fn pending_attachments(&self) -> Result<Vec<AttachmentRow>, ClientError> {
        Ok(self.with(|t| t.attachments.iter().filter(|a| a.state == AttachmentState::Pending).cloned().collect()))
    }

    fn unsaved_attachments(&self) -> Result<Vec<AttachmentRow>, ClientError> {
        Ok(self.with(|t| {
            t.attachments.iter().filter(|a| a.state == AttachmentState::Stored && a.saved.is_none()).cloned().collect()
        }))
    }

    fn set_attachment(
        &mut self,
        conversation: &ConversationId,
        message_id: &[u8],
        index: u32,
        state: &AttachmentState,
        local: Option<&str>,
        saved: Option<&str>,
    ) -> Result<(), ClientError> {
        self.with(|t| {
            for a in t.attachments.iter_mut() {
                if a.conversation == *conversation && a.message_id == message_id && a.index == index {
                    a.state = state.clone();
                    if let Some(l) = local {
                        a.local = Some(l.to_owned());
                    }
                    if let Some(s) = saved {
                        a.saved = Some(s.to_owned());
                    }
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance;
    use super::*;

    macro_rules! conformance_tests {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    conformance::$name(Store::memory());
                }
            )*
        };
    }

    crate::with_behaviours!(conformance_tests);
}

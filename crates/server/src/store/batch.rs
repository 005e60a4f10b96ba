//! Sends and acknowledgements taken together, in one transaction with
//! set-based statements: how a backend whose every statement is a round
//! trip (PostgreSQL) stores a busy node's traffic without paying ten round
//! trips and a commit per message.
//!
//! The rules stay those of [`super::rules`]. A batch only ever *stores* a
//! send that the one rule, [`rules::send`], would store as it is: a plain
//! send (no commit guard) whose sender is an active device, whose send id
//! is new, whose sender may send to the conversation, whose recipients are
//! all active devices and which fits the [`Quota`]. Every other send (a
//! duplicate, a refusal, a commit, a send id seen twice in one batch) is
//! handed back as [`Batched::Alone`], and its caller runs it through
//! [`rules::send`] after the batch, in a transaction of its own, where it
//! gets the one check order's answer. So no refusal is decided here, and a
//! batch cannot drift from the rule: it is the rule's common case, taken
//! many at a time.
//!
//! Acknowledgements never refuse; [`ack_batch`] is [`rules::ack`] for many
//! devices at once.
//!
//! Locks (for backends with concurrent writers) are taken as
//! [`rules::send`] takes them: recipients' device rows in id order before
//! any inbox id is drawn (so each device's ids still commit in increasing
//! order), then the senders' usage counters in device order.

use std::collections::{HashMap, HashSet};

use subrosa_proto::{ConversationId, DeviceAddress, Handle, MessageKind, SendId, SendRequest};

use super::rules::{self, DeviceRow, MessageRow};
use super::{part_recipients, send_bytes, Quota, SendOutcome, StoreError};

/// One send offered to a batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchSend<'a> {
    /// The sending device (authenticated by the transport).
    pub sender: &'a DeviceAddress,
    /// What it sends.
    pub request: &'a SendRequest,
    /// When it arrived, ms since the Unix epoch.
    pub now_ms: u64,
}

/// What a batch did with one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Batched {
    /// Stored, as [`rules::send`] would have stored it.
    Stored(SendOutcome),
    /// Not a plain send: run it through [`rules::send`] alone.
    Alone,
}

/// A message row a batch inserts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewMessage<'a> {
    pub conversation: &'a ConversationId,
    pub sender: DeviceRow,
    pub kind: MessageKind,
    pub ciphertext: &'a [u8],
    pub expires_at: Option<u64>,
    pub created_at: u64,
}

/// Set-based statements, each one round trip however many rows it takes.
/// Every slice answer is in the order of the input.
#[allow(async_fn_in_trait)] // crate-private, as `rules::Statements`
pub(crate) trait BatchStatements: rules::Statements {
    /// The rows of these devices, `None` for one that is not active.
    async fn device_rows(&mut self, addrs: &[&DeviceAddress]) -> Result<Vec<Option<DeviceRow>>, Self::Error>;
    /// Whether each (device, send id) was recorded before.
    async fn send_ids_seen(&mut self, ids: &[(DeviceRow, &SendId)]) -> Result<Vec<bool>, Self::Error>;
    /// Whether each sender may send to each conversation now: it has no
    /// roster, or the sender is in it (as [`rules::Statements::conversation`]).
    async fn senders_allowed(&mut self, pairs: &[(&ConversationId, DeviceRow)]) -> Result<Vec<bool>, Self::Error>;
    /// Locks these devices' usage counters, given in increasing order and
    /// without repeats, and returns their totals.
    async fn lock_usages(&mut self, devices: &[DeviceRow]) -> Result<Vec<u64>, Self::Error>;
    /// The undelivered bytes of each account's devices together.
    async fn account_usages(&mut self, handles: &[&Handle]) -> Result<Vec<u64>, Self::Error>;
    /// Records send ids (each `(device, send id, now)`); returns how many
    /// were new. A concurrent transaction recording the same id makes it
    /// wait, then not count.
    async fn record_send_ids(&mut self, ids: &[(DeviceRow, &SendId, u64)]) -> Result<u64, Self::Error>;
    /// Adds bytes to usage counters locked by [`Self::lock_usages`].
    async fn add_usages(&mut self, adds: &[(DeviceRow, u64)]) -> Result<(), Self::Error>;
    /// Stores messages; their rows, in the order given.
    async fn insert_messages(&mut self, messages: &[NewMessage<'_>]) -> Result<Vec<MessageRow>, Self::Error>;
    /// Queues messages for devices (each `(device, message, now)`), ids
    /// drawn in the order given.
    async fn insert_inbox_at(&mut self, rows: &[(DeviceRow, MessageRow, u64)]) -> Result<(), Self::Error>;
    /// Deletes these (device, inbox id) rows where they exist; returns
    /// each deleted row as (its index in `rows`, its message).
    async fn delete_inbox_pairs(&mut self, rows: &[(DeviceRow, u64)]) -> Result<Vec<(usize, MessageRow)>, Self::Error>;
}

/// Stores the plain sends among `sends` in the transaction the backend
/// opened, and says of every other one that it goes [`Batched::Alone`]. A
/// sender's sends after one of its own that goes alone go alone too, so a
/// device's sends are never stored out of the order the batch got them.
///
/// `Ok(None)`: a concurrent transaction recorded one of the send ids
/// meanwhile; the backend rolls this transaction back and runs every send
/// alone.
///
/// # Errors
/// The backend's; the backend rolls back and runs every send alone.
pub(crate) async fn send_batch<S: BatchStatements>(
    s: &mut S,
    sends: &[BatchSend<'_>],
    quota: &Quota,
) -> Result<Option<Vec<Batched>>, S::Error> {
    let n = sends.len();
    let mut alone = vec![false; n];
    for (i, send) in sends.iter().enumerate() {
        alone[i] = send.request.commit.is_some();
    }

    // 1. The senders are active devices.
    let senders: Vec<&DeviceAddress> = sends.iter().map(|b| b.sender).collect();
    let sender_rows = s.device_rows(&senders).await?;
    let mut row = vec![0; n];
    for i in 0..n {
        match sender_rows[i] {
            Some(r) => row[i] = r,
            None => alone[i] = true,
        }
    }

    // 2. Send ids never seen, in the store or earlier in this batch.
    let mut in_batch: HashSet<(DeviceRow, &SendId)> = HashSet::with_capacity(n);
    for i in 0..n {
        if !alone[i] && !in_batch.insert((row[i], &sends[i].request.send_id)) {
            alone[i] = true;
        }
    }
    let asked: Vec<usize> = (0..n).filter(|&i| !alone[i]).collect();
    let ids: Vec<(DeviceRow, &SendId)> = asked.iter().map(|&i| (row[i], &sends[i].request.send_id)).collect();
    for (&i, seen) in asked.iter().zip(s.send_ids_seen(&ids).await?) {
        alone[i] |= seen;
    }

    // 3. The senders may send to their conversations.
    let asked: Vec<usize> = (0..n).filter(|&i| !alone[i]).collect();
    let pairs: Vec<(&ConversationId, DeviceRow)> =
        asked.iter().map(|&i| (&sends[i].request.conversation, row[i])).collect();
    for (&i, allowed) in asked.iter().zip(s.senders_allowed(&pairs).await?) {
        alone[i] |= !allowed;
    }
    spread_alone(sends, &mut alone);

    // 4. Every recipient an active device, all locked at once in id order.
    let per_send: Vec<Vec<Vec<DeviceAddress>>> = sends
        .iter()
        .enumerate()
        .map(|(i, b)| if alone[i] { Vec::new() } else { part_recipients(b.request, b.sender, &[]) })
        .collect();
    let mut recipients: Vec<&DeviceAddress> = Vec::new();
    let mut distinct: HashSet<&DeviceAddress> = HashSet::new();
    for addr in per_send.iter().flatten().flatten() {
        if distinct.insert(addr) {
            recipients.push(addr);
        }
    }
    let mut row_of: HashMap<&DeviceAddress, DeviceRow> = HashMap::with_capacity(recipients.len());
    if !recipients.is_empty() {
        for (addr, r) in recipients.iter().zip(s.lock_recipients(&recipients).await?) {
            if let Some(r) = r {
                row_of.insert(*addr, r);
            }
        }
    }
    for i in 0..n {
        if !alone[i] && per_send[i].iter().flatten().any(|a| !row_of.contains_key(a)) {
            alone[i] = true;
        }
    }
    spread_alone(sends, &mut alone);

    // 5. The quota, counted send by send in batch order as `rules::send`
    //    would count them one after another.
    let mut devices: Vec<DeviceRow> = (0..n).filter(|&i| !alone[i]).map(|i| row[i]).collect();
    devices.sort_unstable();
    devices.dedup();
    if devices.is_empty() {
        return Ok(Some(vec![Batched::Alone; n]));
    }
    let mut device_total: HashMap<DeviceRow, u64> =
        devices.iter().copied().zip(s.lock_usages(&devices).await?).collect();
    if *quota != Quota::UNLIMITED {
        let mut handles: Vec<&Handle> = (0..n).filter(|&i| !alone[i]).map(|i| &sends[i].sender.handle).collect();
        handles.sort_unstable();
        handles.dedup();
        let mut account_total: HashMap<&Handle, u64> =
            handles.iter().copied().zip(s.account_usages(&handles).await?).collect();
        let mut over: HashSet<DeviceRow> = HashSet::new();
        for i in 0..n {
            if alone[i] || over.contains(&row[i]) {
                alone[i] = true;
                continue;
            }
            let incoming = send_bytes(sends[i].request);
            let device = device_total.get(&row[i]).copied().unwrap_or(0);
            let account = account_total.get(&sends[i].sender.handle).copied().unwrap_or(0);
            if quota.check(device, account, incoming).is_err() {
                // Its answer is the rule's: alone, with its sender's later sends.
                alone[i] = true;
                over.insert(row[i]);
                continue;
            }
            device_total.insert(row[i], device.saturating_add(incoming));
            account_total.insert(&sends[i].sender.handle, account.saturating_add(incoming));
        }
    }
    let stored: Vec<usize> = (0..n).filter(|&i| !alone[i]).collect();
    if stored.is_empty() {
        return Ok(Some(vec![Batched::Alone; n]));
    }

    // 6. Written: the send ids, the usage, the messages, their inbox rows.
    let ids: Vec<(DeviceRow, &SendId, u64)> =
        stored.iter().map(|&i| (row[i], &sends[i].request.send_id, sends[i].now_ms)).collect();
    if s.record_send_ids(&ids).await? != ids.len() as u64 {
        return Ok(None);
    }
    let mut added: HashMap<DeviceRow, u64> = HashMap::new();
    for &i in &stored {
        let bytes = added.entry(row[i]).or_default();
        *bytes = bytes.saturating_add(send_bytes(sends[i].request));
    }
    let mut adds: Vec<(DeviceRow, u64)> = added.into_iter().collect();
    adds.sort_unstable();
    s.add_usages(&adds).await?;

    let mut messages = Vec::new();
    for &i in &stored {
        let b = &sends[i];
        for part in &b.request.parts {
            messages.push(NewMessage {
                conversation: &b.request.conversation,
                sender: row[i],
                kind: part.kind,
                ciphertext: part.ciphertext.as_slice(),
                expires_at: b.request.expires_at,
                created_at: b.now_ms,
            });
        }
    }
    let message_rows = s.insert_messages(&messages).await?;
    if message_rows.len() != messages.len() {
        return Err(StoreError::Internal("a batch insert returned the wrong number of rows".into()).into());
    }
    let mut next_message = message_rows.into_iter();
    let mut inbox = Vec::new();
    let mut outcomes: Vec<Batched> = vec![Batched::Alone; n];
    let mut woken: Vec<DeviceAddress> = Vec::new();
    let mut woken_set: HashSet<&DeviceAddress> = HashSet::new();
    for &i in &stored {
        let b = &sends[i];
        let mut send_recipients: Vec<DeviceAddress> = Vec::new();
        let mut seen: HashSet<&DeviceAddress> = HashSet::new();
        for addrs in &per_send[i] {
            let message = next_message
                .next()
                .ok_or_else(|| StoreError::Internal("a batch insert returned too few rows".into()))?;
            let mut here = HashSet::new();
            for addr in addrs {
                if here.insert(addr) {
                    inbox.push((row_of[addr], message, b.now_ms));
                }
                if seen.insert(addr) {
                    send_recipients.push(addr.clone());
                }
                if woken_set.insert(addr) {
                    woken.push(addr.clone());
                }
            }
        }
        outcomes[i] = Batched::Stored(SendOutcome {
            duplicate: false,
            epoch: None,
            server_time: b.now_ms,
            recipients: send_recipients,
        });
    }
    s.insert_inbox_at(&inbox).await?;
    s.notify_wake(&woken).await?;
    Ok(Some(outcomes))
}

/// Once a send goes alone, so do its sender's later sends in the batch.
fn spread_alone(sends: &[BatchSend<'_>], alone: &mut [bool]) {
    let mut stopped: HashSet<&DeviceAddress> = HashSet::new();
    for (i, b) in sends.iter().enumerate() {
        if alone[i] {
            stopped.insert(b.sender);
        } else if stopped.contains(b.sender) {
            alone[i] = true;
        }
    }
}

/// Acknowledges for many devices at once: for each `(device, ids)`, what
/// [`rules::ack`] would answer run one after another in this order (an id
/// named twice counts once, for the first to name it).
///
/// # Errors
/// The backend's.
pub(crate) async fn ack_batch<S: BatchStatements>(
    s: &mut S,
    acks: &[(&DeviceAddress, &[u64])],
) -> Result<Vec<u64>, S::Error> {
    let addrs: Vec<&DeviceAddress> = acks.iter().map(|(a, _)| *a).collect();
    let rows = s.device_rows(&addrs).await?;
    let mut pairs: Vec<(DeviceRow, u64)> = Vec::new();
    let mut owner: Vec<usize> = Vec::new();
    for (k, ((_, ids), row)) in acks.iter().zip(&rows).enumerate() {
        if let Some(row) = row {
            for &id in *ids {
                pairs.push((*row, id));
                owner.push(k);
            }
        }
    }
    let mut counts = vec![0u64; acks.len()];
    if pairs.is_empty() {
        return Ok(counts);
    }
    let deleted = s.delete_inbox_pairs(&pairs).await?;
    // A pair named twice was deleted once: it counts for its first naming.
    let mut first: HashMap<(DeviceRow, u64), usize> = HashMap::with_capacity(pairs.len());
    for (j, pair) in pairs.iter().enumerate() {
        first.entry(*pair).or_insert(j);
    }
    let mut messages = Vec::with_capacity(deleted.len());
    for (j, message) in deleted {
        let j = pairs.get(j).and_then(|p| first.get(p)).copied().unwrap_or(j);
        if let Some(&k) = owner.get(j) {
            counts[k] += 1;
        }
        messages.push(message);
    }
    s.drop_orphans(messages).await?;
    Ok(counts)
}

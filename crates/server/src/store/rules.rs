//! The delivery service's domain rules, written once above the backends.
//!
//! Each rule here (the order a send is checked in, its de-duplication, the
//! limits, the epoch guard, the last-device rule, the removal cascade, the
//! key-set replacement, key-package claims, acknowledgements) runs
//! inside one backend transaction and reaches the data only through
//! [`Statements`]: a backend implements the statements (SQL, and how it
//! keeps concurrent writers apart: SQLite's single writer, PostgreSQL's row
//! locks) and calls the rule from inside the transaction it opened. So the
//! rules cannot drift between backends, and a backend cannot weaken a
//! guarantee by reordering checks: it only decides what each statement
//! locks. The conformance suite (`store::conformance`) runs against every
//! backend and pins the order (`send_checks_run_in_one_order`).
//!
//! The SQLite backend's statements never wait (they run on its writer
//! thread): it drives a rule with [`ready`].

use std::collections::HashSet;
use std::future::Future;
use std::task::{Context, Poll, Waker};

use subrosa_proto::{
    BlobId, BlobStatus, ConversationId, DeviceAddress, Epoch, Handle, KeyPackageCount, LinkId, MessageKind, SendId,
    SendRequest,
};

use super::{
    encode_roster, part_recipients, roster_change, send_bytes, BlobLimits, Quota, RosterChange, SendOutcome,
    StoreError, MAX_DEVICES_PER_ACCOUNT, MAX_STORED_KEY_PACKAGES,
};

/// A device's internal row id (both backends number devices with an integer
/// key that is never reused).
pub(crate) type DeviceRow = i64;
/// A stored message's internal row id.
pub(crate) type MessageRow = i64;

/// What a send reads of its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConversationState {
    /// The current epoch (0 for an unknown conversation).
    pub epoch: Epoch,
    /// Whether the sender may send to it: it has no roster yet, or the
    /// sender's device is in it.
    pub sender_allowed: bool,
}

/// A send id seen before, as first stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SeenSend {
    /// The epoch its commit moved the conversation to, if it carried one.
    pub epoch: Option<Epoch>,
    /// When it was stored, ms since the Unix epoch.
    pub created_at: u64,
}

/// The statements a backend runs inside one transaction, each a plain read
/// or write of its tables; every decision is the rules'. Where a statement
/// says it locks, a backend with concurrent writers takes that lock (and in
/// the order the rules call them, so two rules never deadlock); a backend
/// whose writes run one at a time has nothing to lock.
#[allow(async_fn_in_trait)] // crate-private; the backends' futures are what they are
pub(crate) trait Statements {
    /// The backend's failure type (a [`StoreError`] answer converts into it).
    type Error: From<StoreError>;

    /// The row of an active device.
    async fn device_row(&mut self, addr: &DeviceAddress) -> Result<Option<DeviceRow>, Self::Error>;
    /// The row of an active device, locked against concurrent changes of
    /// its key packages.
    async fn lock_device(&mut self, addr: &DeviceAddress) -> Result<Option<DeviceRow>, Self::Error>;
    /// Locks the account (against concurrent device additions and
    /// removals); false when there is no such account.
    async fn lock_account(&mut self, handle: &Handle) -> Result<bool, Self::Error>;
    /// How many active devices the account has.
    async fn active_devices(&mut self, handle: &Handle) -> Result<u64, Self::Error>;

    /// Records a send id, or answers how it was first stored. A concurrent
    /// send with the same id waits for the first to commit or roll back.
    async fn claim_send_id(
        &mut self,
        sender: DeviceRow,
        send_id: &SendId,
        now_ms: u64,
    ) -> Result<Option<SeenSend>, Self::Error>;
    /// Notes the epoch a recorded send id's commit moved its conversation to.
    async fn set_send_epoch(&mut self, sender: DeviceRow, send_id: &SendId, epoch: Epoch) -> Result<(), Self::Error>;
    /// The conversation's epoch and whether `sender` may send to it, as
    /// committed now (under the conversation's lock when this transaction
    /// holds it).
    async fn conversation(
        &mut self,
        conversation: &ConversationId,
        sender: DeviceRow,
    ) -> Result<ConversationState, Self::Error>;
    /// Moves the conversation from epoch `from` to the next, creating it
    /// when `from` is 0 and it is unknown, and locks its row; `None` (and
    /// nothing changed) when its epoch is not `from`.
    async fn advance_epoch(&mut self, conversation: &ConversationId, from: Epoch)
        -> Result<Option<Epoch>, Self::Error>;
    /// The active devices of the conversation's roster.
    async fn roster(&mut self, conversation: &ConversationId) -> Result<Vec<DeviceAddress>, Self::Error>;
    /// Applies a roster change (inactive devices skipped) and forgets the
    /// conversation when its roster is then empty.
    async fn set_roster(&mut self, conversation: &ConversationId, change: RosterChange<'_>) -> Result<(), Self::Error>;
    /// The rows of these devices, locked in row order, `None` for one that
    /// is not an active device.
    async fn lock_recipients(&mut self, addrs: &[&DeviceAddress]) -> Result<Vec<Option<DeviceRow>>, Self::Error>;
    /// Adds `bytes` to the device's undelivered bytes (locking its counter);
    /// returns its new total.
    async fn add_usage(&mut self, device: DeviceRow, bytes: u64) -> Result<u64, Self::Error>;
    /// The undelivered bytes of all the account's devices.
    async fn account_usage(&mut self, handle: &Handle) -> Result<u64, Self::Error>;
    /// Stores one part's ciphertext; with `expires_at`, the sweep deletes
    /// it then whether delivered or not (disappearing messages).
    #[allow(clippy::too_many_arguments)] // one column each
    async fn insert_message(
        &mut self,
        conversation: &ConversationId,
        sender: DeviceRow,
        kind: MessageKind,
        ciphertext: &[u8],
        roster: Option<&[u8]>,
        expires_at: Option<u64>,
        now_ms: u64,
    ) -> Result<MessageRow, Self::Error>;
    /// Queues messages for devices, ids drawn in the order given.
    async fn insert_inbox(&mut self, rows: &[(DeviceRow, MessageRow)], now_ms: u64) -> Result<(), Self::Error>;
    /// Tells every node (on commit) to wake these devices' sockets.
    async fn notify_wake(&mut self, addrs: &[DeviceAddress]) -> Result<(), Self::Error>;

    /// Stores a new device of the account; false when the account has or
    /// had a device with this id.
    async fn insert_device(
        &mut self,
        handle: &Handle,
        device: &subrosa_proto::DeviceRecord,
        now_ms: u64,
    ) -> Result<bool, Self::Error>;
    /// Locks the conversations whose roster holds the device (in id order)
    /// and returns them.
    async fn lock_conversations_of(&mut self, device: DeviceRow) -> Result<Vec<ConversationId>, Self::Error>;
    /// Marks the device removed.
    async fn deactivate(&mut self, device: DeviceRow) -> Result<(), Self::Error>;
    /// Deletes the device's one-time key packages, and with `last_resort`
    /// its last-resort one too.
    async fn delete_key_packages(&mut self, device: DeviceRow, last_resort: bool) -> Result<(), Self::Error>;
    /// Takes the device out of every roster and forgets each of
    /// `conversations` whose roster is then empty.
    async fn leave_rosters(&mut self, device: DeviceRow, conversations: &[ConversationId]) -> Result<(), Self::Error>;
    /// Deletes the device's inbox rows; returns the messages they pointed at.
    async fn delete_inbox_of(&mut self, device: DeviceRow) -> Result<Vec<MessageRow>, Self::Error>;
    /// Deletes those of these messages no inbox row points at any more,
    /// giving their bytes back to their senders; returns how many went.
    async fn drop_orphans(&mut self, messages: Vec<MessageRow>) -> Result<u64, Self::Error>;
    /// Tells every node (on commit) that this device is revoked.
    async fn notify_revoked(&mut self, addr: &DeviceAddress) -> Result<(), Self::Error>;

    /// How many key packages the device holds, by suite.
    async fn count_key_packages(&mut self, device: DeviceRow) -> Result<KeyPackageCount, Self::Error>;
    /// Stores one-time key packages, each under its suite, in order.
    async fn insert_key_packages(&mut self, device: DeviceRow, packages: &[(u16, Vec<u8>)]) -> Result<(), Self::Error>;
    /// Stores or replaces the device's last-resort key package of `suite`.
    async fn set_last_resort(&mut self, device: DeviceRow, suite: u16, package: &[u8]) -> Result<(), Self::Error>;

    /// The account's identity key.
    async fn identity_key(&mut self, handle: &Handle) -> Result<Option<Vec<u8>>, Self::Error>;
    /// The account's active devices, in row order.
    async fn devices_of(
        &mut self,
        handle: &Handle,
    ) -> Result<Vec<(DeviceRow, subrosa_proto::DeviceRecord)>, Self::Error>;
    /// Deletes and returns the device's oldest one-time key package; one
    /// that a concurrent claim is taking is skipped, never waited for, so
    /// each is handed out once.
    async fn take_one_time(&mut self, device: DeviceRow, suite: u16) -> Result<Option<Vec<u8>>, Self::Error>;
    /// The device's last-resort key package of `suite`.
    async fn last_resort(&mut self, device: DeviceRow, suite: u16) -> Result<Option<Vec<u8>>, Self::Error>;
    /// The (claimer account, target account) claim window, as (start ms,
    /// claims counted), locked against concurrent claims of the same pair;
    /// created as `(now_ms, 0)` when there is none.
    async fn lock_claim_window(
        &mut self,
        claimer: &Handle,
        target: &Handle,
        now_ms: u64,
    ) -> Result<(u64, u64), Self::Error>;
    /// Stores the pair's claim window.
    async fn set_claim_window(
        &mut self,
        claimer: &Handle,
        target: &Handle,
        start_ms: u64,
        claims: u64,
    ) -> Result<(), Self::Error>;

    /// The account with its active devices.
    async fn account(&mut self, handle: &Handle) -> Result<Option<subrosa_proto::AccountInfo>, Self::Error>;
    /// Replaces the account's identity key.
    async fn set_identity_key(&mut self, handle: &Handle, key: &[u8]) -> Result<(), Self::Error>;
    /// Replaces a device's signature key and certificate.
    async fn set_device_keys(
        &mut self,
        device: DeviceRow,
        record: &subrosa_proto::DeviceRecord,
    ) -> Result<(), Self::Error>;
    /// Tells every node (on commit) that this device's keys changed.
    async fn notify_keys_changed(&mut self, addr: &DeviceAddress) -> Result<(), Self::Error>;
    /// Deletes the device's inbox rows among `ids`; returns the messages
    /// they pointed at, one per row deleted.
    async fn delete_inbox_rows(&mut self, device: DeviceRow, ids: &[u64]) -> Result<Vec<MessageRow>, Self::Error>;

    /// Stores a new account; false when the handle is taken.
    async fn insert_account(&mut self, handle: &Handle, identity_key: &[u8], now_ms: u64) -> Result<bool, Self::Error>;
    /// Whether the account exists.
    async fn account_exists(&mut self, handle: &Handle) -> Result<bool, Self::Error>;
    /// Stores a link slot; false when a slot (even an expired one) has this id.
    async fn insert_link(
        &mut self,
        link: &LinkId,
        handle: &Handle,
        request: &[u8],
        expires_at_ms: u64,
    ) -> Result<bool, Self::Error>;
    /// Locks a slot of `handle` that has not expired at `now_ms`; whether it
    /// has a response (`None`: no such slot).
    async fn lock_link(&mut self, link: &LinkId, handle: &Handle, now_ms: u64) -> Result<Option<bool>, Self::Error>;
    /// Stores a slot's response.
    async fn set_link_response(&mut self, link: &LinkId, response: &[u8]) -> Result<(), Self::Error>;
    /// Locks a slot that has not expired at `now_ms`; its response
    /// (`None`: no such slot).
    async fn lock_link_response(&mut self, link: &LinkId, now_ms: u64) -> Result<Option<Option<Vec<u8>>>, Self::Error>;
    /// Deletes a slot.
    async fn delete_link(&mut self, link: &LinkId) -> Result<(), Self::Error>;
    /// Deletes everything stored for an account whose devices were all
    /// removed already (see [`delete_account`]): [`PURGE_ACCOUNT`], run in
    /// order; its devices' keys and certificates are erased, and the
    /// account row kept as a tombstone with an empty identity key.
    async fn purge_account(&mut self, handle: &Handle) -> Result<(), Self::Error>;
}

/// What [`Statements::purge_account`] deletes, in order (foreign keys
/// first), each statement taking the handle as `?1` (PostgreSQL: `$1`):
/// what waits for its devices (removed ones too), their key packages, send
/// ids, roster places and blobs (as owner and as reader; others' blobs only
/// it could read go too), its nonces, link
/// slots and claim windows (as claimer and as target). What its devices
/// sent and others have not fetched yet (their leave proposals among it)
/// stays for them until fetched or expired, so the device rows stay, as
/// ids without keys, while it does.
pub(crate) const PURGE_ACCOUNT: &[&str] = &[
    "DELETE FROM inbox WHERE device IN (SELECT id FROM devices WHERE handle = ?1)",
    "DELETE FROM key_packages WHERE device IN (SELECT id FROM devices WHERE handle = ?1)",
    "DELETE FROM last_resort_packages WHERE device IN (SELECT id FROM devices WHERE handle = ?1)",
    "DELETE FROM send_ids WHERE device IN (SELECT id FROM devices WHERE handle = ?1)",
    "DELETE FROM conversation_members WHERE device IN (SELECT id FROM devices WHERE handle = ?1)",
    "DELETE FROM blob_pieces WHERE blob IN
       (SELECT b.id FROM blobs b JOIN devices d ON d.id = b.owner WHERE d.handle = ?1)",
    "DELETE FROM blob_readers WHERE device IN (SELECT id FROM devices WHERE handle = ?1)
       OR blob IN (SELECT b.id FROM blobs b JOIN devices d ON d.id = b.owner WHERE d.handle = ?1)",
    "DELETE FROM blobs WHERE owner IN (SELECT id FROM devices WHERE handle = ?1)",
    "DELETE FROM nonces WHERE handle = ?1",
    "DELETE FROM links WHERE handle = ?1",
    "DELETE FROM claim_windows WHERE claimer = ?1 OR target = ?1",
];

/// Run after [`PURGE_ACCOUNT`], without parameters: others' blobs that only
/// the account's devices could read (nobody else ever will).
pub(crate) const PURGE_UNREADABLE_BLOBS: &[&str] = &[
    "DELETE FROM blob_pieces WHERE blob IN
       (SELECT b.id FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM blob_readers r WHERE r.blob = b.id))",
    "DELETE FROM blobs WHERE NOT EXISTS (SELECT 1 FROM blob_readers r WHERE r.blob = blobs.id)",
];

/// Deletes an account: [`super::Store::delete_account`]'s rule. Each
/// active device goes as a removal does (out of every roster, its inbox
/// and what no one else waits for gone, its sockets told), then
/// everything else stored for the account; the account row stays as a
/// tombstone, so the handle cannot be registered again. Returns the
/// devices removed.
pub(crate) async fn delete_account<S: Statements>(
    s: &mut S,
    caller: &DeviceAddress,
) -> Result<Vec<DeviceAddress>, S::Error> {
    let handle = &caller.handle;
    if !s.lock_account(handle).await? {
        return Err(StoreError::UnknownDevice(caller.clone()).into());
    }
    s.device_row(caller).await?.ok_or_else(|| StoreError::UnknownDevice(caller.clone()))?;
    let mut removed = Vec::new();
    for (device, record) in s.devices_of(handle).await? {
        let conversations = s.lock_conversations_of(device).await?;
        s.deactivate(device).await?;
        s.leave_rosters(device, &conversations).await?;
        let messages = s.delete_inbox_of(device).await?;
        s.drop_orphans(messages).await?;
        let addr = DeviceAddress { handle: handle.clone(), device: record.device_id };
        s.notify_revoked(&addr).await?;
        removed.push(addr);
    }
    s.purge_account(handle).await?;
    Ok(removed)
}

/// Stores a send: [`super::Store::send_within`]'s rule.
///
/// The one check order, the same on every backend:
/// 1. the sender is an active device, else `UnknownDevice(sender)`;
/// 2. a send id seen before answers as a duplicate, before any other
///    check (a retry whose answer was lost must get it, whatever changed);
/// 3. the sender is in the conversation's roster, else `NotAMember`;
/// 4. a commit's guard names the current epoch, else `StaleEpoch`: a stale
///    commit is told so even when it names devices removed since (its
///    sender processes the winning commit, which shows the removal, and
///    retries), and membership is checked again under the conversation's
///    lock, against a concurrent commit that removed the sender;
/// 5. every recipient is an active device, else `UnknownDevice(recipient)`;
/// 6. the [`Quota`].
///
/// Any refusal rolls the whole transaction back: nothing is stored.
pub(crate) async fn send<S: Statements>(
    s: &mut S,
    sender: &DeviceAddress,
    request: &SendRequest,
    quota: &Quota,
    now_ms: u64,
) -> Result<SendOutcome, S::Error> {
    let sender_row = s.device_row(sender).await?.ok_or_else(|| StoreError::UnknownDevice(sender.clone()))?;
    if let Some(seen) = s.claim_send_id(sender_row, &request.send_id, now_ms).await? {
        return Ok(SendOutcome {
            duplicate: true,
            epoch: seen.epoch,
            server_time: seen.created_at,
            recipients: Vec::new(),
        });
    }
    let conversation = &request.conversation;
    let state = s.conversation(conversation, sender_row).await?;
    if !state.sender_allowed {
        return Err(StoreError::NotAMember.into());
    }
    // The epoch guard; a commit goes to the roster it was accepted against
    // (read under the conversation's lock), and leaves the roster it sets.
    let (epoch, roster, stored_roster) = match &request.commit {
        None => (None, Vec::new(), None),
        Some(guard) => {
            let Some(next) = s.advance_epoch(conversation, guard.epoch).await? else {
                let current = s.conversation(conversation, sender_row).await?.epoch;
                return Err(StoreError::StaleEpoch { current }.into());
            };
            if !s.conversation(conversation, sender_row).await?.sender_allowed {
                return Err(StoreError::NotAMember.into());
            }
            let before = s.roster(conversation).await?;
            if let Some(change) = roster_change(sender, request) {
                s.set_roster(conversation, change).await?;
            }
            let after = encode_roster(&s.roster(conversation).await?)?;
            (Some(next), before, after)
        }
    };

    // Every distinct recipient, in order of first mention.
    let per_part = part_recipients(request, sender, &roster);
    let mut recipients: Vec<&DeviceAddress> = Vec::new();
    let mut seen: HashSet<&DeviceAddress> = HashSet::new();
    for addr in per_part.iter().flatten() {
        if seen.insert(addr) {
            recipients.push(addr);
        }
    }
    let rows = s.lock_recipients(&recipients).await?;
    let mut row_of = std::collections::HashMap::with_capacity(recipients.len());
    for (addr, row) in recipients.iter().zip(rows) {
        let row = row.ok_or_else(|| StoreError::UnknownDevice((*addr).clone()))?;
        row_of.insert(*addr, row);
    }

    // The quota (see `store::Quota`): counted in the same transaction.
    let incoming = send_bytes(request);
    let device_total = s.add_usage(sender_row, incoming).await?;
    if *quota != Quota::UNLIMITED {
        let account_total = s.account_usage(&sender.handle).await?;
        quota.check(device_total.saturating_sub(incoming), account_total.saturating_sub(incoming), incoming)?;
    }

    let mut inbox = Vec::new();
    for (part, addrs) in request.parts.iter().zip(&per_part) {
        let roster = stored_roster.as_deref().filter(|_| part.kind == MessageKind::Commit);
        let message = s
            .insert_message(
                conversation,
                sender_row,
                part.kind,
                part.ciphertext.as_slice(),
                roster,
                request.expires_at,
                now_ms,
            )
            .await?;
        let mut here = HashSet::new();
        for addr in addrs {
            if here.insert(addr) {
                inbox.push((row_of[addr], message));
            }
        }
    }
    s.insert_inbox(&inbox, now_ms).await?;
    if let Some(e) = epoch {
        s.set_send_epoch(sender_row, &request.send_id, e).await?;
    }
    let woken: Vec<DeviceAddress> = recipients.into_iter().cloned().collect();
    s.notify_wake(&woken).await?;
    Ok(SendOutcome { duplicate: false, epoch, server_time: now_ms, recipients: woken })
}

/// Adds a device: [`super::Store::add_device`]'s rule (the device limit).
pub(crate) async fn add_device<S: Statements>(
    s: &mut S,
    handle: &Handle,
    device: &subrosa_proto::DeviceRecord,
    now_ms: u64,
) -> Result<(), S::Error> {
    // The account's lock keeps the count true until commit.
    if !s.lock_account(handle).await? {
        return Err(StoreError::UnknownHandle.into());
    }
    if s.active_devices(handle).await? >= MAX_DEVICES_PER_ACCOUNT {
        return Err(StoreError::TooManyDevices.into());
    }
    if !s.insert_device(handle, device, now_ms).await? {
        return Err(StoreError::DeviceTaken.into());
    }
    Ok(())
}

/// Removes a device: [`super::Store::remove_device`]'s rule (the
/// last-device rule and the removal cascade).
pub(crate) async fn remove_device<S: Statements>(s: &mut S, addr: &DeviceAddress) -> Result<(), S::Error> {
    // The account's lock: two devices removing each other cannot both see
    // two active devices and leave none.
    if !s.lock_account(&addr.handle).await? {
        return Err(StoreError::UnknownDevice(addr.clone()).into());
    }
    let device = s.device_row(addr).await?.ok_or_else(|| StoreError::UnknownDevice(addr.clone()))?;
    if s.active_devices(&addr.handle).await? <= 1 {
        return Err(StoreError::LastDevice.into());
    }
    // Its conversations' rows before the device row, as a send takes them:
    // a commit racing this removal lands before it or finds the
    // conversation as it left it.
    let conversations = s.lock_conversations_of(device).await?;
    s.deactivate(device).await?;
    s.delete_key_packages(device, true).await?;
    s.leave_rosters(device, &conversations).await?;
    // Its pending rows, then every message no other device still waits for.
    let messages = s.delete_inbox_of(device).await?;
    s.drop_orphans(messages).await?;
    s.notify_revoked(addr).await?;
    Ok(())
}

/// A device's package counts from what the backends read: one-time
/// packages per suite, and the suites it has a last-resort package of. The
/// classical suite's counts also go in the fields older clients read.
pub(crate) fn package_count(one_time: &[(u16, u64)], last_resort: &[u16]) -> KeyPackageCount {
    let mut suites: Vec<u16> = one_time.iter().map(|(s, _)| *s).chain(last_resort.iter().copied()).collect();
    suites.sort_unstable();
    suites.dedup();
    let suites: Vec<subrosa_proto::SuiteCount> = suites
        .into_iter()
        .map(|suite| subrosa_proto::SuiteCount {
            suite,
            one_time: one_time.iter().filter(|(s, _)| *s == suite).map(|(_, n)| *n).sum(),
            last_resort: last_resort.contains(&suite),
        })
        .collect();
    let mut count = KeyPackageCount { one_time: 0, last_resort: false, suites };
    let classical = count.of(subrosa_proto::CLASSICAL_SUITE);
    count.one_time = classical.one_time;
    count.last_resort = classical.last_resort;
    count
}

/// Stores key packages, each under its suite: [`super::Store::upload_key_packages_in`]'s
/// rule (the bound on stored packages, per suite).
pub(crate) async fn upload_key_packages<S: Statements>(
    s: &mut S,
    addr: &DeviceAddress,
    one_time: &[(u16, Vec<u8>)],
    last_resort: &[(u16, Vec<u8>)],
    replace: bool,
) -> Result<KeyPackageCount, S::Error> {
    // The device's lock keeps concurrent uploads under the bound.
    let device = s.lock_device(addr).await?.ok_or_else(|| StoreError::UnknownDevice(addr.clone()))?;
    if replace {
        s.delete_key_packages(device, false).await?;
    }
    let before = s.count_key_packages(device).await?;
    for (suite, _) in one_time {
        let adding = one_time.iter().filter(|(s, _)| s == suite).count() as u64;
        if before.of(*suite).one_time.saturating_add(adding) > MAX_STORED_KEY_PACKAGES {
            return Err(StoreError::TooManyKeyPackages.into());
        }
    }
    if !one_time.is_empty() {
        s.insert_key_packages(device, one_time).await?;
    }
    for (suite, lr) in last_resort {
        s.set_last_resort(device, *suite, lr).await?;
    }
    s.count_key_packages(device).await
}

/// Hands out one key package of every active device of `handle` but
/// `requester`: [`super::Store::claim_key_packages_of`]'s rule. With
/// [`ClaimKind::OneTime`] a one-time package (deleted, so handed out once)
/// or else the last-resort one; with [`ClaimKind::LastResortFirst`] the
/// last-resort package, or a one-time one for a device that has none (so a
/// throttled claim still reaches every device).
///
/// [`ClaimKind::OneTime`]: super::ClaimKind::OneTime
/// [`ClaimKind::LastResortFirst`]: super::ClaimKind::LastResortFirst
pub(crate) async fn claim_key_packages<S: Statements>(
    s: &mut S,
    handle: &Handle,
    requester: &DeviceAddress,
    kind: super::ClaimKind,
    suite: u16,
) -> Result<subrosa_proto::ClaimResponse, S::Error> {
    use subrosa_proto::{ClaimedKeyPackage, B64};
    let identity_key = s.identity_key(handle).await?.ok_or(StoreError::UnknownHandle)?;
    // The claimer's own allowance of the target's one-time packages, read
    // under the pair's lock: `counted` is the window to bump if this claim
    // draws a one-time package.
    let mut counted = None;
    let last_resort_first = match kind {
        super::ClaimKind::OneTime => false,
        super::ClaimKind::LastResortFirst => true,
        super::ClaimKind::Counted { .. } if requester.handle == *handle => false,
        super::ClaimKind::Counted { now_ms } => {
            let row = s.lock_claim_window(&requester.handle, handle, now_ms).await?;
            let (start, claims) = claim_window(row, now_ms);
            counted = Some((start, claims));
            claims >= super::ONE_TIME_CLAIMS_PER_CLAIMER
        }
    };
    let mut packages = Vec::new();
    for (row, record) in s.devices_of(handle).await? {
        if *handle == requester.handle && record.device_id == requester.device {
            continue;
        }
        let (package, last_resort) = if last_resort_first {
            match s.last_resort(row, suite).await? {
                Some(kp) => (Some(kp), true),
                None => (s.take_one_time(row, suite).await?, false),
            }
        } else {
            match s.take_one_time(row, suite).await? {
                Some(kp) => (Some(kp), false),
                None => (s.last_resort(row, suite).await?, true),
            }
        };
        if let Some(kp) = package {
            packages.push(ClaimedKeyPackage { device: record, key_package: B64(kp), last_resort });
        }
    }
    if packages.is_empty() {
        return Err(StoreError::NoKeyPackage.into());
    }
    // Only a claim that drew a one-time package spends the allowance (one
    // past it, which got last-resort packages first, changes nothing).
    if let Some((start, claims)) = counted {
        if !last_resort_first && packages.iter().any(|p| !p.last_resort) {
            s.set_claim_window(&requester.handle, handle, start, claims.saturating_add(1)).await?;
        }
    }
    Ok(subrosa_proto::ClaimResponse {
        handle: handle.clone(),
        identity_key: B64(identity_key),
        packages,
        kt: None,
        devices: Vec::new(),
    })
}

/// A pair's claim window as it stands at `now_ms`: the stored (start,
/// claims), or a fresh `(now_ms, 0)` once [`super::CLAIM_WINDOW_MS`] has
/// passed since its start. A start after `now_ms` (a node whose clock is
/// ahead wrote it) keeps the window: a lagging node must not reopen it.
pub(crate) fn claim_window(stored: (u64, u64), now_ms: u64) -> (u64, u64) {
    let (start, claims) = stored;
    if now_ms.saturating_sub(start) >= super::CLAIM_WINDOW_MS {
        (now_ms, 0)
    } else {
        (start, claims)
    }
}

/// [`super::Store::one_time_claims_left`] from the pair's stored window
/// (`None`: no claim yet).
pub(crate) fn one_time_claims_left(stored: Option<(u64, u64)>, now_ms: u64) -> u64 {
    let claims = stored.map_or(0, |w| claim_window(w, now_ms).1);
    super::ONE_TIME_CLAIMS_PER_CLAIMER.saturating_sub(claims)
}

/// Replaces an account's keys: [`super::Store::replace_keys`]'s rule (see
/// [`super::check_key_set`]); key packages made under the old keys go.
pub(crate) async fn replace_keys<S: Statements>(
    s: &mut S,
    caller: &DeviceAddress,
    identity_key: &[u8],
    devices: &[subrosa_proto::DeviceRecord],
) -> Result<(), S::Error> {
    // The account's lock orders this against device additions and removals.
    if !s.lock_account(&caller.handle).await? {
        return Err(StoreError::UnknownDevice(caller.clone()).into());
    }
    s.device_row(caller).await?.ok_or_else(|| StoreError::UnknownDevice(caller.clone()))?;
    let current = s.account(&caller.handle).await?.ok_or(StoreError::UnknownHandle)?;
    let stale = super::check_key_set(&current, caller, identity_key, devices)?;
    s.set_identity_key(&caller.handle, identity_key).await?;
    for d in devices {
        let addr = DeviceAddress { handle: caller.handle.clone(), device: d.device_id };
        let row = s.device_row(&addr).await?.ok_or(StoreError::UnknownDevice(addr))?;
        s.set_device_keys(row, d).await?;
        if stale.contains(&d.device_id) {
            s.delete_key_packages(row, true).await?;
        }
    }
    // Every node drops its cached key for the caller.
    s.notify_keys_changed(caller).await?;
    Ok(())
}

/// Acknowledges envelopes: [`super::Store::ack`]'s rule. Only the device's
/// own rows go, and every message whose last row went; an unknown device
/// acknowledges nothing.
pub(crate) async fn ack<S: Statements>(s: &mut S, addr: &DeviceAddress, ids: &[u64]) -> Result<u64, S::Error> {
    let Some(device) = s.device_row(addr).await? else { return Ok(0) };
    let messages = s.delete_inbox_rows(device, ids).await?;
    let deleted = messages.len() as u64;
    s.drop_orphans(messages).await?;
    Ok(deleted)
}

/// Creates an account: [`super::Store::register`]'s rule.
pub(crate) async fn register<S: Statements>(
    s: &mut S,
    account: &super::NewAccount,
    now_ms: u64,
) -> Result<(), S::Error> {
    if !s.insert_account(&account.handle, &account.identity_key, now_ms).await? {
        return Err(StoreError::HandleTaken.into());
    }
    if !s.insert_device(&account.handle, &account.device, now_ms).await? {
        return Err(StoreError::Internal("a new account already had a device".into()).into());
    }
    Ok(())
}

/// Opens a link slot: [`super::Store::create_link`]'s rule.
pub(crate) async fn create_link<S: Statements>(
    s: &mut S,
    link: &LinkId,
    handle: &Handle,
    request: &[u8],
    expires_at_ms: u64,
) -> Result<(), S::Error> {
    if !s.account_exists(handle).await? {
        return Err(StoreError::UnknownHandle.into());
    }
    if !s.insert_link(link, handle, request, expires_at_ms).await? {
        return Err(StoreError::LinkTaken.into());
    }
    Ok(())
}

/// Approves a link slot, once: [`super::Store::approve_link`]'s rule.
pub(crate) async fn approve_link<S: Statements>(
    s: &mut S,
    link: &LinkId,
    handle: &Handle,
    response: &[u8],
    now_ms: u64,
) -> Result<(), S::Error> {
    match s.lock_link(link, handle, now_ms).await? {
        None => Err(StoreError::UnknownLink.into()),
        Some(true) => Err(StoreError::LinkAlreadyApproved.into()),
        Some(false) => s.set_link_response(link, response).await,
    }
}

/// Hands out a slot's response once, the slot going with it:
/// [`super::Store::take_link_response`]'s rule.
pub(crate) async fn take_link_response<S: Statements>(
    s: &mut S,
    link: &LinkId,
    now_ms: u64,
) -> Result<Option<Vec<u8>>, S::Error> {
    match s.lock_link_response(link, now_ms).await? {
        None => Err(StoreError::UnknownLink.into()),
        Some(None) => Ok(None),
        Some(Some(response)) => {
            s.delete_link(link).await?;
            Ok(Some(response))
        }
    }
}

/// A stored blob, as a rule reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlobRow {
    /// Its internal row id.
    pub row: i64,
    /// The uploading device.
    pub owner: DeviceRow,
    /// Declared size.
    pub size: u64,
    /// Bytes received.
    pub received: u64,
    /// Finished by its owner.
    pub complete: bool,
}

impl BlobRow {
    fn status(&self) -> BlobStatus {
        BlobStatus { size: self.size, received: self.received, complete: self.complete }
    }
}

/// The statements of the blob rules (see [`super::BlobLimits`]), beside
/// [`Statements`].
#[allow(async_fn_in_trait)] // crate-private, as `Statements`
pub(crate) trait BlobStatements: Statements {
    /// Bytes of blobs the account's devices own now.
    async fn account_blob_bytes(&mut self, handle: &Handle) -> Result<u64, Self::Error>;
    /// Stores a new blob; `None` when a blob (even an expired one) has this id.
    async fn insert_blob(
        &mut self,
        blob: &BlobId,
        owner: DeviceRow,
        size: u64,
        now_ms: u64,
        expires_at_ms: u64,
    ) -> Result<Option<i64>, Self::Error>;
    /// Lets these devices read the blob.
    async fn insert_blob_readers(&mut self, blob: i64, readers: &[DeviceRow]) -> Result<(), Self::Error>;
    /// A blob that has not expired at `now_ms`, locked against concurrent
    /// appends, finishes and fetches.
    async fn lock_blob(&mut self, blob: &BlobId, now_ms: u64) -> Result<Option<BlobRow>, Self::Error>;
    /// A blob that has not expired at `now_ms` (a plain read).
    async fn blob(&mut self, blob: &BlobId, now_ms: u64) -> Result<Option<BlobRow>, Self::Error>;
    /// Stores a piece at `offset` and sets the received count to its end.
    async fn append_piece(&mut self, blob: i64, offset: u64, bytes: &[u8]) -> Result<(), Self::Error>;
    /// Marks the blob complete.
    async fn set_blob_complete(&mut self, blob: i64) -> Result<(), Self::Error>;
    /// Whether the device may read the blob.
    async fn is_blob_reader(&mut self, blob: i64, device: DeviceRow) -> Result<bool, Self::Error>;
    /// The stored pieces overlapping `[offset, offset + length)`, as
    /// (start, bytes), in order.
    async fn blob_pieces(&mut self, blob: i64, offset: u64, length: u64) -> Result<Vec<(u64, Vec<u8>)>, Self::Error>;
    /// Marks the reader done; returns how many readers have not said so.
    async fn mark_blob_fetched(&mut self, blob: i64, device: DeviceRow) -> Result<u64, Self::Error>;
    /// Deletes the blob, its readers and its pieces.
    async fn delete_blob(&mut self, blob: i64) -> Result<(), Self::Error>;
}

/// Opens a blob upload: [`super::Store::create_blob`]'s rule. Checked in
/// one order: the owner, the size limit, the readers, the account's quota
/// (under the account's lock, so concurrent uploads cannot both pass it).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn create_blob<S: BlobStatements>(
    s: &mut S,
    owner: &DeviceAddress,
    blob: &BlobId,
    size: u64,
    readers: &[DeviceAddress],
    limits: &BlobLimits,
    now_ms: u64,
    expires_at_ms: u64,
) -> Result<(), S::Error> {
    if !s.lock_account(&owner.handle).await? {
        return Err(StoreError::UnknownDevice(owner.clone()).into());
    }
    let owner_row = s.device_row(owner).await?.ok_or_else(|| StoreError::UnknownDevice(owner.clone()))?;
    if size > limits.max_blob() {
        return Err(StoreError::BlobTooLarge { limit: limits.max_bytes }.into());
    }
    let mut distinct: Vec<&DeviceAddress> = Vec::with_capacity(readers.len());
    let mut seen = HashSet::new();
    for r in readers {
        if seen.insert(r) {
            distinct.push(r);
        }
    }
    let rows = s.lock_recipients(&distinct).await?;
    let mut reader_rows = Vec::with_capacity(rows.len());
    for (addr, row) in distinct.iter().zip(rows) {
        reader_rows.push(row.ok_or_else(|| StoreError::UnknownDevice((*addr).clone()))?);
    }
    let used = s.account_blob_bytes(&owner.handle).await?;
    if used.saturating_add(size) > limits.account_bytes {
        return Err(StoreError::BlobQuotaExceeded { limit: limits.account_bytes }.into());
    }
    let row = s.insert_blob(blob, owner_row, size, now_ms, expires_at_ms).await?.ok_or(StoreError::BlobTaken)?;
    s.insert_blob_readers(row, &reader_rows).await?;
    Ok(())
}

/// The owner's blob, locked, or [`StoreError::UnknownBlob`].
async fn owned_blob<S: BlobStatements>(
    s: &mut S,
    owner: &DeviceAddress,
    blob: &BlobId,
    now_ms: u64,
) -> Result<BlobRow, S::Error> {
    let owner_row = s.device_row(owner).await?.ok_or(StoreError::UnknownBlob)?;
    match s.lock_blob(blob, now_ms).await? {
        Some(b) if b.owner == owner_row => Ok(b),
        _ => Err(StoreError::UnknownBlob.into()),
    }
}

/// Appends a piece: [`super::Store::append_blob`]'s rule. A retried piece
/// whose first answer was lost is told [`StoreError::BlobOffset`] with
/// where the upload stands, never stored twice.
pub(crate) async fn append_blob<S: BlobStatements>(
    s: &mut S,
    owner: &DeviceAddress,
    blob: &BlobId,
    offset: u64,
    bytes: &[u8],
    now_ms: u64,
) -> Result<BlobStatus, S::Error> {
    let b = owned_blob(s, owner, blob, now_ms).await?;
    if b.complete || offset != b.received {
        return Err(StoreError::BlobOffset { received: b.received }.into());
    }
    let end = offset.saturating_add(bytes.len() as u64);
    if end > b.size {
        return Err(StoreError::BlobOverrun { size: b.size }.into());
    }
    if !bytes.is_empty() {
        s.append_piece(b.row, offset, bytes).await?;
    }
    Ok(BlobStatus { size: b.size, received: end, complete: false })
}

/// Where a blob stands, for its owner or a reader:
/// [`super::Store::blob_status`]'s rule.
pub(crate) async fn blob_status<S: BlobStatements>(
    s: &mut S,
    caller: &DeviceAddress,
    blob: &BlobId,
    now_ms: u64,
) -> Result<BlobStatus, S::Error> {
    let caller_row = s.device_row(caller).await?.ok_or(StoreError::UnknownBlob)?;
    let b = s.blob(blob, now_ms).await?.ok_or(StoreError::UnknownBlob)?;
    if b.owner != caller_row && !s.is_blob_reader(b.row, caller_row).await? {
        return Err(StoreError::UnknownBlob.into());
    }
    Ok(b.status())
}

/// Finishes an upload: [`super::Store::finish_blob`]'s rule.
pub(crate) async fn finish_blob<S: BlobStatements>(
    s: &mut S,
    owner: &DeviceAddress,
    blob: &BlobId,
    now_ms: u64,
) -> Result<BlobStatus, S::Error> {
    let b = owned_blob(s, owner, blob, now_ms).await?;
    if b.received != b.size {
        return Err(StoreError::BlobIncomplete.into());
    }
    if !b.complete {
        s.set_blob_complete(b.row).await?;
    }
    Ok(BlobStatus { complete: true, ..b.status() })
}

/// A reader's download of a finished blob: [`super::Store::read_blob`]'s
/// rule (plain reads: it runs beside the writers).
pub(crate) async fn read_blob<S: BlobStatements>(
    s: &mut S,
    reader: &DeviceAddress,
    blob: &BlobId,
    offset: u64,
    length: u64,
    now_ms: u64,
) -> Result<Vec<u8>, S::Error> {
    let reader_row = s.device_row(reader).await?.ok_or(StoreError::UnknownBlob)?;
    let b = s.blob(blob, now_ms).await?.ok_or(StoreError::UnknownBlob)?;
    if !s.is_blob_reader(b.row, reader_row).await? {
        return Err(StoreError::UnknownBlob.into());
    }
    if !b.complete {
        return Err(StoreError::BlobIncomplete.into());
    }
    let end = offset.saturating_add(length).min(b.size);
    if offset >= end {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(usize::try_from(end - offset).unwrap_or(0));
    let mut at = offset;
    for (start, bytes) in s.blob_pieces(b.row, offset, end - offset).await? {
        let piece_end = start.saturating_add(bytes.len() as u64);
        if start > at || piece_end <= at {
            return Err(StoreError::Internal("a stored blob has a gap".into()).into());
        }
        let from = usize::try_from(at - start).map_err(|_| StoreError::Internal("blob piece offset".into()))?;
        let to = usize::try_from(piece_end.min(end) - start).map_err(|_| StoreError::Internal("blob piece".into()))?;
        out.extend_from_slice(
            bytes.get(from..to).ok_or_else(|| StoreError::Internal("a stored blob piece is short".into()))?,
        );
        at = piece_end.min(end);
        if at == end {
            break;
        }
    }
    if at != end {
        return Err(StoreError::Internal("a stored blob is shorter than its size".into()).into());
    }
    Ok(out)
}

/// A reader fetched a blob: [`super::Store::blob_fetched`]'s rule; the
/// last reader's word deletes it.
pub(crate) async fn blob_fetched<S: BlobStatements>(
    s: &mut S,
    reader: &DeviceAddress,
    blob: &BlobId,
    now_ms: u64,
) -> Result<bool, S::Error> {
    let reader_row = s.device_row(reader).await?.ok_or(StoreError::UnknownBlob)?;
    let b = s.lock_blob(blob, now_ms).await?.ok_or(StoreError::UnknownBlob)?;
    if !s.is_blob_reader(b.row, reader_row).await? {
        return Err(StoreError::UnknownBlob.into());
    }
    if !b.complete {
        return Err(StoreError::BlobIncomplete.into());
    }
    if s.mark_blob_fetched(b.row, reader_row).await? == 0 {
        s.delete_blob(b.row).await?;
        return Ok(true);
    }
    Ok(false)
}

/// Runs a rule over statements that never wait (SQLite's, on its writer
/// thread) to its end, without an executor.
///
/// # Errors
/// The rule's own; [`StoreError::Internal`] if a statement did wait (a bug).
pub(crate) fn ready<T>(rule: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    let mut rule = std::pin::pin!(rule);
    match rule.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => Err(StoreError::Internal("a storage statement waited on the writer thread".into())),
    }
}

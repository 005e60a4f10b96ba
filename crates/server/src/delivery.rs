//! Fetch, deliver, acknowledge: the one path by which queued envelopes
//! leave the store, whether a device fetches them over HTTP
//! (`GET /v1/inbox`, `POST /v1/inbox/ack`) or its WebSocket pushes them
//! (`ws.rs`). The transports only frame what this module answers.
//!
//! The contract both keep: an envelope stays queued until its device
//! acknowledges it (a client acknowledges only after its own store
//! committed the message), so a connection lost at any point loses
//! nothing; an acknowledgement names at most [`MAX_ACK_IDS`] ids and deletes
//! only the acknowledging device's rows.

use subrosa_proto::limits::MAX_ACK_IDS;
use subrosa_proto::{DeviceAddress, Envelope};

use crate::metrics::MessageEvent;
use crate::store::StoreError;
use crate::{AppError, AppState};

/// One fetch of a device's queue.
#[derive(Debug)]
pub(crate) struct Fetched {
    /// What to hand the device, oldest first.
    pub messages: Vec<Envelope>,
    /// The id of the last envelope read from the store (delivered or not),
    /// where the next fetch of this connection starts; `None` when the
    /// queue held nothing past the cursor.
    pub last: Option<u64>,
    /// True when the store had at least `limit` envelopes: more may wait.
    pub full: bool,
}

/// Up to `limit` envelopes of `device` past `after`, about `max_bytes` of
/// ciphertext at most (at least one when any is queued), as the device is
/// to see them. What a test build's malicious operator withholds
/// (`hooks::deliver`) is acknowledged away here, so it is never fetched
/// again.
///
/// # Errors
/// The store's; [`StoreError::Unavailable`] lets a caller keep its
/// connection and look again later.
pub(crate) async fn fetch(
    state: &AppState,
    device: &DeviceAddress,
    after: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<Fetched, StoreError> {
    let batch = state.store.fetch_inbox(device, after, limit, max_bytes).await?;
    let last = batch.last().map(|e| e.id);
    let full = batch.len() >= limit;
    let (messages, dropped) = crate::hooks::deliver(state, device, batch);
    if !dropped.is_empty() {
        state.store.ack(device, &dropped).await?;
    }
    state.metrics.messages(MessageEvent::Delivered, messages.len() as u64);
    Ok(Fetched { messages, last, full })
}

/// Deletes `device`'s envelopes among `ids` (another device's ids are left
/// alone), and every message whose last envelope went. Returns how many
/// envelopes were deleted. Rate-limiting is the transport's (a signed
/// request's, or the socket's charge).
///
/// # Errors
/// 413 for more than [`MAX_ACK_IDS`] ids; the store's.
pub(crate) async fn acknowledge(state: &AppState, device: &DeviceAddress, ids: &[u64]) -> Result<u64, AppError> {
    if ids.len() > MAX_ACK_IDS {
        return Err(AppError::too_large(format!("at most {MAX_ACK_IDS} ids per acknowledgement")));
    }
    let deleted = state.store.ack(device, ids).await?;
    state.metrics.messages(MessageEvent::Acknowledged, deleted);
    Ok(deleted)
}

//! Send, fetch, deliver, acknowledge: the one path by which envelopes
//! enter the store (a signed `POST /v1/messages` or a socket's send frame)
//! and leave it, whether a device fetches them over HTTP
//! (`GET /v1/inbox`, `POST /v1/inbox/ack`) or its WebSocket pushes them
//! (`ws.rs`). The transports only frame what this module answers.
//!
//! The contract both keep: an envelope stays queued until its device
//! acknowledges it (a client acknowledges only after its own store
//! committed the message), so a connection lost at any point loses
//! nothing; an acknowledgement names at most [`MAX_ACK_IDS`] ids and deletes
//! only the acknowledging device's rows.

use subrosa_proto::limits::{MAX_ACK_IDS, MAX_PARTS};
use subrosa_proto::{DeviceAddress, Envelope, MessageKind, SendPart, SendRequest};

use crate::auth::now_ms;
use crate::metrics::{MessageEvent, Transport};
use crate::store::{SendOutcome, StoreError};
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

/// Stores a send (signed HTTP or a socket's frame) once it passed every
/// check, and wakes its recipients once it is durable. `nonce` is the
/// signed request's (stored in the same transaction); a socket's frame has
/// none, as the socket authenticated once, with a challenge bound to it.
/// A disappearing message's `expires_at` is capped at the message TTL
/// here, for both transports: it is kept no longer than any other.
///
/// # Errors
/// 400/413 for a send over the limits or with wrong framing; 401 replayed
/// for a nonce seen before; the store's.
pub(crate) async fn send(
    state: &AppState,
    device: &DeviceAddress,
    request: &mut SendRequest,
    nonce: Option<(&str, u64)>,
) -> Result<SendOutcome, AppError> {
    validate_send(request, state)?;
    let ttl = crate::routes::ttl_ms(state);
    request.expires_at = request.expires_at.map(|at| at.min(now_ms().saturating_add(ttl)));
    let request = &*request;
    state.metrics.send_transport(if nonce.is_some() { Transport::Http } else { Transport::Frame });
    let (quota, now) = (&state.limits.quota, now_ms());
    let out = match nonce {
        Some((nonce, timestamp_ms)) => state
            .store
            .send_with_nonce(device, nonce, timestamp_ms, request, quota, now)
            .await?
            .ok_or_else(crate::auth::replayed)?,
        None => state.store.send_within(device, request, quota, now).await?,
    };
    // Only now is everything durably stored: wake the recipients.
    let event = if out.duplicate { MessageEvent::Duplicate } else { MessageEvent::Stored };
    state.metrics.messages(event, 1);
    for addr in &out.recipients {
        state.wakeups.wake(addr);
    }
    Ok(out)
}

pub(crate) fn validate_send(req: &SendRequest, state: &AppState) -> Result<(), AppError> {
    let limits = &state.limits;
    if req.parts.is_empty() {
        return Err(AppError::bad_request("a send needs at least one part"));
    }
    if req.parts.len() > MAX_PARTS {
        return Err(AppError::too_large(format!("at most {MAX_PARTS} parts per send")));
    }
    for part in &req.parts {
        if part.recipients.is_empty() {
            return Err(AppError::bad_request("a part needs at least one recipient"));
        }
        if part.recipients.len() > limits.max_recipients {
            return Err(AppError::too_large(format!("at most {} recipients per part", limits.max_recipients)));
        }
        if part.ciphertext.is_empty() {
            return Err(AppError::bad_request("a part's ciphertext is empty"));
        }
        if part.ciphertext.len() > limits.max_ciphertext_bytes {
            return Err(AppError::too_large(format!("a ciphertext is over {} bytes", limits.max_ciphertext_bytes)));
        }
    }
    check_framing(req)?;
    if let Some(members) = req.commit.as_ref().and_then(|g| g.members.as_ref()) {
        if members.len() > limits.max_recipients.saturating_add(1) {
            return Err(AppError::too_large(format!("at most {} members", limits.max_recipients.saturating_add(1))));
        }
    }
    Ok(())
}

/// Reads what a send's MLS framing says rather than trusting its labels:
/// a guarded send's commit part must be an MLS commit of this conversation
/// made in the guard's epoch, and a guarded send past epoch 0 must carry
/// one (a creating send may carry its Welcome alone); a real MLS commit
/// never travels without the guard, whatever its part is labelled.
fn check_framing(req: &SendRequest) -> Result<(), AppError> {
    use subrosa_proto::framing::{content_type, private_framing};
    let conversation = req.conversation.as_bytes().as_slice();
    match &req.commit {
        Some(guard) => {
            let commits: Vec<&SendPart> = req.parts.iter().filter(|p| p.kind == MessageKind::Commit).collect();
            if commits.is_empty() && guard.epoch.0 > 0 {
                return Err(AppError::bad_request("a commit guard needs a commit part"));
            }
            if commits.len() > 1 {
                return Err(AppError::bad_request("a send carries at most one commit"));
            }
            for part in commits {
                let f = private_framing(part.ciphertext.as_slice())
                    .map_err(|e| AppError::bad_request(format!("the commit part: {e}")))?;
                if f.group_id != conversation {
                    return Err(AppError::bad_request("the commit is for another conversation"));
                }
                if f.content_type != content_type::COMMIT {
                    return Err(AppError::bad_request("the commit part is not an MLS commit"));
                }
                if f.epoch != guard.epoch.0 {
                    return Err(AppError::bad_request(format!(
                        "the commit was made in epoch {}, not the guard's {}",
                        f.epoch, guard.epoch.0
                    )));
                }
            }
        }
        None => {
            let unguarded_commit = req.parts.iter().any(|p| {
                private_framing(p.ciphertext.as_slice()).is_ok_and(|f| f.content_type == content_type::COMMIT)
            });
            if unguarded_commit {
                return Err(AppError::bad_request("an MLS commit needs the commit guard"));
            }
        }
    }
    Ok(())
}

//! Welcomes too large to go inline (`subrosa_proto::welcome_ref`): the
//! sender uploads the MLS Welcome, as it is, to the blob store for its
//! recipients and posts a small reference in its place; the recipient
//! downloads and checks it before the session sees the envelope, which then
//! joins it exactly as an inline Welcome.
//!
//! Crash safety (sender): the stored pending commit keeps the whole Welcome
//! (`Session::store_pending` does not change). Once its blob was uploaded
//! whole, the request by reference is stored beside it
//! (`PendingCommit::by_reference`, before the post). So a posted reference
//! never names a blob that was not uploaded, whatever crashed when, and a
//! re-post soon after (a lost answer, a restart) sends the same reference
//! without uploading again; the server answers it as a duplicate by its
//! send id if it had ordered the first. A re-post later than
//! `reuse_window_ms` uploads again from the whole Welcome: a blob goes at
//! its TTL counted from its upload, and the new member must find it there
//! for as long as the commit waits. A crash mid-upload leaves an unfinished
//! blob, gone at the blob TTL, and the next post uploads again.
//!
//! Receiver: a reference is resolved before its batch reaches the session.
//! A download that fails for want of an answer leaves the envelope (and
//! every later one of the batch) unacknowledged, so the server delivers it
//! again; a reference the server's blob does not match (size, SHA-256), or
//! whose blob is gone or refused, is refused: an alert, nothing joined, and
//! the envelope acknowledged.

use std::borrow::Cow;

use subrosa_proto::welcome_ref::{WelcomeRef, MAX_INLINE_WELCOME_BYTES};
use subrosa_proto::{BlobId, Envelope, ErrorCode, MessageKind, SendRequest, B64};
use subrosa_session::store::ByReference;

use crate::{is_transient, ClientError, Subrosa};

/// The environment variable that lowers the inline limit in a debug build
/// (bytes), so the end-to-end tests send a Welcome by reference without
/// hundreds of devices. Release builds ignore it.
pub const INLINE_LIMIT_ENV: &str = "SUBROSA_TEST_INLINE_WELCOME_BYTES";

/// How long after its upload a Welcome's blob may be named again by a
/// re-post of its commit (ms), for a blob the server keeps `lifetime_ms`:
/// a tenth of that, at most an hour (`MAX_REUSE_MS`). A re-post the server
/// had not ordered before is a new message, kept for the whole message
/// TTL, while its blob goes at the TTL counted from the upload: naming an
/// older blob would leave the new member a shorter time, or none, to fetch
/// its Welcome. After the window the re-post uploads the Welcome again.
pub(crate) fn reuse_window_ms(lifetime_ms: u64) -> u64 {
    (lifetime_ms / 10).min(MAX_REUSE_MS)
}

/// The longest a Welcome's blob is named again after its upload: an hour.
pub(crate) const MAX_REUSE_MS: u64 = 60 * 60 * 1000;

/// The largest Welcome this device puts inline.
fn inline_limit() -> usize {
    #[cfg(debug_assertions)]
    if let Some(n) = std::env::var(INLINE_LIMIT_ENV).ok().and_then(|v| v.trim().parse().ok()) {
        return n;
    }
    MAX_INLINE_WELCOME_BYTES
}

/// A batch made ready for the session.
struct Resolved<'a> {
    /// The envelopes for the session, references replaced by their Welcomes.
    pub envelopes: Cow<'a, [Envelope]>,
    /// Envelopes refused here (acknowledged with the batch).
    pub refused: Vec<u64>,
    /// The blobs downloaded, to say fetched once the batch is acknowledged.
    pub blobs: Vec<BlobId>,
    /// Why the batch stops short: an envelope whose Welcome could not be
    /// downloaded for want of an answer (it and those after it stay queued).
    pub stopped: Option<ClientError>,
}

/// A processed batch.
pub(crate) struct Batch {
    /// The delivery ids to acknowledge.
    pub ids: Vec<u64>,
    /// The Welcome blobs to release once they are acknowledged
    /// ([`Subrosa::release_welcome_blobs`]).
    pub blobs: Vec<BlobId>,
    /// Why the batch stopped short (see [`Resolved::stopped`]): what was
    /// not processed stays queued on the server.
    pub stopped: Option<ClientError>,
}

/// Why a referenced Welcome was not fetched.
enum FetchError {
    /// No answer: try again later.
    Transient(ClientError),
    /// Never joinable: refuse it.
    Refused(String),
    /// The blob is not on the server (any more).
    Gone,
}

impl Subrosa {
    /// A stored commit request with each Welcome part over the inline
    /// limit uploaded as a blob for the part's recipients (expiring at the
    /// server's blob TTL, like an attachment outside a disappearing
    /// conversation) and a reference in its place; `None` when every
    /// Welcome goes inline. The form by reference may be posted again
    /// until [`ByReference::reuse_until_ms`] ([`reuse_window_ms`]).
    ///
    /// # Errors
    /// The server's refusal of the blob (`blob_too_large`,
    /// `blob_quota_exceeded`) or [`ClientError::Network`]; a stored request
    /// that does not parse is a bug.
    pub(crate) async fn with_welcome_references(&self, request: &[u8]) -> Result<Option<ByReference>, ClientError> {
        let limit = inline_limit();
        // Every part's ciphertext is in the request, base64 (longer).
        if request.len() <= limit {
            return Ok(None);
        }
        let mut req: SendRequest = serde_json::from_slice(request)
            .map_err(|e| ClientError::Bug(format!("a stored commit request does not parse: {e}")))?;
        let over = |p: &subrosa_proto::SendPart| {
            p.kind == MessageKind::Welcome
                && p.ciphertext.as_slice().len() > limit
                && !WelcomeRef::is_reference(p.ciphertext.as_slice())
        };
        if !req.parts.iter().any(over) {
            return Ok(None);
        }
        let uploaded_at_ms = self.now_ms();
        let mut reuse_until_ms = u64::MAX;
        for part in req.parts.iter_mut().filter(|p| over(p)) {
            let welcome = part.ciphertext.as_slice();
            let created = self.api.blob_create(welcome.len() as u64, part.recipients.clone(), None).await?;
            upload_bytes(&self.api, &created.blob, welcome).await?;
            part.ciphertext = B64(WelcomeRef::new(created.blob, welcome).encode());
            let window = reuse_window_ms(created.expires_at.saturating_sub(uploaded_at_ms));
            reuse_until_ms = reuse_until_ms.min(uploaded_at_ms.saturating_add(window));
        }
        let request = serde_json::to_vec(&req).map_err(|e| ClientError::Bug(e.to_string()))?;
        Ok(Some(ByReference { request, uploaded_at_ms, reuse_until_ms }))
    }

    /// Processes a fetched batch: its Welcome references resolved, then the
    /// session's [`subrosa_session::Session::process_batch`].
    ///
    /// # Errors
    /// Store errors.
    pub(crate) async fn process_fetched(&self, envs: &[Envelope]) -> Result<Batch, ClientError> {
        let r = self.resolve_welcomes(envs).await?;
        let mut ids = self.process_batch(&r.envelopes)?;
        ids.extend(r.refused);
        Ok(Batch { ids, blobs: r.blobs, stopped: r.stopped })
    }

    /// Downloads and checks the Welcome of every reference in `envs`, in
    /// order, stopping at the first that gets no answer.
    ///
    /// # Errors
    /// Store errors (writing an alert).
    async fn resolve_welcomes<'a>(&self, envs: &'a [Envelope]) -> Result<Resolved<'a>, ClientError> {
        let is_ref = |e: &Envelope| e.kind == MessageKind::Welcome && WelcomeRef::is_reference(e.ciphertext.as_slice());
        if !envs.iter().any(is_ref) {
            return Ok(Resolved {
                envelopes: Cow::Borrowed(envs),
                refused: Vec::new(),
                blobs: Vec::new(),
                stopped: None,
            });
        }
        let mut out =
            Resolved { envelopes: Cow::Owned(Vec::new()), refused: Vec::new(), blobs: Vec::new(), stopped: None };
        let mut ready = Vec::with_capacity(envs.len());
        for env in envs {
            // A blocked account's invitation is dropped by the session
            // without a word: nothing of it is downloaded first, so a
            // blocked sender cannot make this device fetch up to
            // `MAX_WELCOME_BYTES`, nor raise an alert by a bad reference.
            if !is_ref(env)
                || self.store().read(|tx| subrosa_session::requests::is_blocked(tx, env.sender.handle.as_str()))?
            {
                ready.push(env.clone());
                continue;
            }
            match self.fetch_welcome(env.ciphertext.as_slice()).await {
                Ok((blob, welcome)) => {
                    ready.push(Envelope { ciphertext: B64(welcome), ..env.clone() });
                    out.blobs.push(blob);
                }
                Err(FetchError::Transient(e)) => {
                    out.stopped = Some(e);
                    break;
                }
                Err(e @ (FetchError::Refused(_) | FetchError::Gone)) => {
                    let gone = matches!(e, FetchError::Gone);
                    let why = match e {
                        FetchError::Refused(why) => why,
                        _ => "its blob is not on the server".to_string(),
                    };
                    self.store().write(|tx| {
                        // Delivered again after this device joined it and
                        // said it fetched the blob (the acknowledgement was
                        // lost): nothing to say.
                        if gone && tx.conversation(&env.conversation)?.is_some() {
                            return Ok(());
                        }
                        tx.add_alert(&format!(
                            "{} sent a Welcome to conversation #{} by reference that was refused ({why}); it was not joined",
                            env.sender,
                            env.conversation.to_hex()
                        ))
                    })?;
                    out.refused.push(env.id);
                }
            }
        }
        out.envelopes = Cow::Owned(ready);
        Ok(out)
    }

    /// The Welcome a reference names, downloaded whole and checked.
    async fn fetch_welcome(&self, reference: &[u8]) -> Result<(BlobId, Vec<u8>), FetchError> {
        let r = WelcomeRef::decode(reference).map_err(|e| FetchError::Refused(e.to_string()))?;
        let sort = |e: ClientError| {
            if is_transient(&e) && !matches!(e, ClientError::Protocol(_)) {
                FetchError::Transient(e)
            } else if e.code() == Some(ErrorCode::UnknownBlob) {
                FetchError::Gone
            } else {
                FetchError::Refused(e.to_string())
            }
        };
        let size = usize::try_from(r.size).map_err(|_| FetchError::Refused("too large".into()))?;
        // The size is the sender's word: grown as pieces come, not
        // allocated whole on its say-so.
        let mut welcome = Vec::with_capacity(size.min(crate::blobs::PIECE));
        while welcome.len() < size {
            let piece = self.api.blob_download(&r.blob, welcome.len() as u64).await.map_err(sort)?;
            if piece.is_empty() {
                return Err(FetchError::Refused(format!("its blob ends at byte {} of {}", welcome.len(), r.size)));
            }
            if welcome.len() + piece.len() > size {
                return Err(FetchError::Refused(format!("its blob is longer than {} bytes", r.size)));
            }
            welcome.extend_from_slice(&piece);
        }
        r.check(&welcome).map_err(|e| FetchError::Refused(e.to_string()))?;
        Ok((r.blob, welcome))
    }

    /// Says the Welcome blobs of an acknowledged batch were fetched, so the
    /// server deletes each once every recipient did. Best effort: a blob
    /// not so released goes at its TTL.
    pub(crate) async fn release_welcome_blobs(&self, blobs: &[BlobId]) {
        for blob in blobs {
            // A failure costs only the server's space until the TTL.
            let _ = self.api.blob_fetched(blob).await;
        }
    }
}

/// Uploads `bytes` to the open upload `blob` in pieces, resuming where the
/// server says it stands after a piece whose answer was lost, and finishes it.
async fn upload_bytes(api: &crate::net::Api, blob: &BlobId, bytes: &[u8]) -> Result<(), ClientError> {
    let mut status = api.blob_status(blob).await?;
    while status.received < status.size {
        let from = usize::try_from(status.received).map_err(|_| ClientError::Bug("offset".into()))?;
        let to = bytes.len().min(from.saturating_add(crate::blobs::PIECE));
        let piece = bytes
            .get(from..to)
            .ok_or_else(|| ClientError::Protocol("the server's upload offset is past the Welcome".into()))?;
        status = match api.blob_append(blob, status.received, piece.to_vec()).await {
            Ok(s) => s,
            Err(e) if e.code() == Some(ErrorCode::BlobOffset) => api.blob_status(blob).await?,
            Err(e) => return Err(e),
        };
    }
    if !status.complete {
        api.blob_finish(blob).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_named_again_for_a_tenth_of_its_lifetime_and_at_most_an_hour() {
        let day = 24 * 60 * 60 * 1000;
        assert_eq!(reuse_window_ms(30 * day), MAX_REUSE_MS, "the default TTL: an hour");
        assert_eq!(reuse_window_ms(6_000), 600, "a 6 s TTL: 0.6 s");
        assert_eq!(reuse_window_ms(0), 0, "a blob already gone (or clocks apart): never");
        let r = ByReference { request: Vec::new(), uploaded_at_ms: 1_000, reuse_until_ms: 1_600 };
        assert!(r.usable_at(1_000) && r.usable_at(1_599));
        assert!(!r.usable_at(1_600), "the window is over");
        assert!(!r.usable_at(999), "the clock went back: upload again");
    }
}

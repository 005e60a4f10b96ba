//! The plaintext inside every MLS application message.
//!
//! Encoding: `version || MLS-encoded fields || zero padding`, where the whole
//! is padded up to a bucket so that ciphertext sizes reveal only the bucket:
//! 256 bytes, then powers of two up to 64 KiB, then multiples of 64 KiB.
//! Version 2 (written now) adds, to version 1's id, time and body, the
//! sender's per-conversation sequence number (so a message the server drops
//! shows as a gap) and the newest key-directory head the sender verified (so
//! two members can tell when the server shows them different directories).
//! The decoder reads both versions and rejects others and non-zero padding.

use mls_rs_codec::{MlsDecode, MlsEncode, MlsSize};
use subrosa_proto::MessageId;

use crate::CoreError;

const VERSION_1: u8 = 1;
const VERSION: u8 = 2;
/// Largest text a message may carry, in bytes.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// A decoded message content.
#[derive(Clone, PartialEq, Eq)]
pub struct Content {
    /// End-to-end message id (de-duplication key).
    pub message_id: MessageId,
    /// Sender's clock, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// What it says.
    pub body: Body,
    /// The sending device's sequence number in this conversation, from 1
    /// (0: not numbered, as in version 1).
    pub seq: u64,
    /// The newest key-directory head the sender verified: epoch and root hash.
    pub kt_head: Option<(u64, [u8; 32])>,
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Message text never goes into logs or panics.
        f.debug_struct("Content")
            .field("message_id", &self.message_id)
            .field("sent_at_ms", &self.sent_at_ms)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// The kinds of content.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Body {
    /// A text message (links included: they are text, and nobody but the
    /// recipients ever sees them).
    Text(String),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Text(t) => write!(f, "Text(<{} bytes>)", t.len()),
        }
    }
}

#[derive(MlsSize, MlsEncode, MlsDecode)]
struct WireV1 {
    message_id: [u8; 16],
    sent_at_ms: u64,
    kind: u8,
    payload: Vec<u8>,
}

#[derive(MlsSize, MlsEncode, MlsDecode)]
struct WireV2 {
    message_id: [u8; 16],
    sent_at_ms: u64,
    kind: u8,
    payload: Vec<u8>,
    seq: u64,
    kt_epoch: u64,
    /// Empty, or the 32-byte root hash of `kt_epoch`.
    kt_root: Vec<u8>,
}

const KIND_TEXT: u8 = 1;

/// The padded size for a plaintext of `len` bytes.
pub fn bucket(len: usize) -> usize {
    const STEP: usize = 64 * 1024;
    if len <= 256 {
        256
    } else if len <= STEP {
        len.next_power_of_two()
    } else {
        len.div_ceil(STEP) * STEP
    }
}

impl Content {
    /// A text message.
    pub fn text(message_id: MessageId, sent_at_ms: u64, text: impl Into<String>) -> Self {
        Content { message_id, sent_at_ms, body: Body::Text(text.into()), seq: 0, kt_head: None }
    }

    /// Numbers the message and attaches the sender's directory head.
    pub fn with_context(mut self, seq: u64, kt_head: Option<(u64, [u8; 32])>) -> Self {
        self.seq = seq;
        self.kt_head = kt_head;
        self
    }

    /// Encodes and pads.
    ///
    /// # Errors
    /// [`CoreError::Malformed`] when the text is over [`MAX_TEXT_BYTES`].
    pub fn encode(&self) -> Result<Vec<u8>, CoreError> {
        let (kind, payload) = match &self.body {
            Body::Text(t) => {
                if t.len() > MAX_TEXT_BYTES {
                    return Err(CoreError::Malformed("message: text over 64 KiB"));
                }
                (KIND_TEXT, t.as_bytes().to_vec())
            }
        };
        let (kt_epoch, kt_root) = match self.kt_head {
            Some((epoch, root)) => (epoch, root.to_vec()),
            None => (0, Vec::new()),
        };
        let wire = WireV2 {
            message_id: self.message_id.0,
            sent_at_ms: self.sent_at_ms,
            kind,
            payload,
            seq: self.seq,
            kt_epoch,
            kt_root,
        };
        let mut out = vec![VERSION];
        wire.mls_encode(&mut out).map_err(|_| CoreError::Bug("content encoding"))?;
        out.resize(bucket(out.len()), 0);
        Ok(out)
    }

    /// Decodes untrusted plaintext.
    ///
    /// # Errors
    /// [`CoreError::UnsupportedVersion`] or [`CoreError::Malformed`].
    pub fn decode(bytes: &[u8]) -> Result<Self, CoreError> {
        let (&version, mut rest) = bytes.split_first().ok_or(CoreError::Malformed("content: empty"))?;
        let wire = match version {
            VERSION_1 => {
                let w = WireV1::mls_decode(&mut rest).map_err(|_| CoreError::Malformed("content"))?;
                WireV2 {
                    message_id: w.message_id,
                    sent_at_ms: w.sent_at_ms,
                    kind: w.kind,
                    payload: w.payload,
                    seq: 0,
                    kt_epoch: 0,
                    kt_root: Vec::new(),
                }
            }
            VERSION => WireV2::mls_decode(&mut rest).map_err(|_| CoreError::Malformed("content"))?,
            _ => return Err(CoreError::UnsupportedVersion(version)),
        };
        let kt_head = match wire.kt_root.len() {
            0 => None,
            32 => {
                let mut root = [0u8; 32];
                root.copy_from_slice(&wire.kt_root);
                Some((wire.kt_epoch, root))
            }
            _ => return Err(CoreError::Malformed("content: directory root is not 32 bytes")),
        };
        if rest.iter().any(|&b| b != 0) {
            return Err(CoreError::Malformed("content: non-zero padding"));
        }
        let body = match wire.kind {
            KIND_TEXT => Body::Text(
                String::from_utf8(wire.payload).map_err(|_| CoreError::Malformed("content: text is not UTF-8"))?,
            ),
            _ => return Err(CoreError::Malformed("content: unknown kind")),
        };
        Ok(Content {
            message_id: MessageId(wire.message_id),
            sent_at_ms: wire.sent_at_ms,
            body,
            seq: wire.seq,
            kt_head,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads_to_buckets() {
        let c = Content::text(MessageId([1; 16]), 42, "see https://example.test/x");
        let bytes = c.encode().expect("encodes");
        assert_eq!(bytes.len(), 256);
        assert_eq!(Content::decode(&bytes).ok(), Some(c));
        let long = Content::text(MessageId([2; 16]), 1, "x".repeat(300));
        assert_eq!(long.encode().map(|b| b.len()).ok(), Some(512));
        assert_eq!(bucket(70_000), 128 * 1024);
        let numbered = Content::text(MessageId([3; 16]), 7, "hi").with_context(9, Some((4, [7; 32])));
        assert_eq!(Content::decode(&numbered.encode().expect("encodes")).ok(), Some(numbered));
    }

    #[test]
    fn reads_version_1() {
        let wire = WireV1 { message_id: [5; 16], sent_at_ms: 3, kind: KIND_TEXT, payload: b"old".to_vec() };
        let mut bytes = vec![VERSION_1];
        wire.mls_encode(&mut bytes).expect("encodes");
        bytes.resize(256, 0);
        let c = Content::decode(&bytes).expect("decodes");
        assert_eq!((c.seq, c.kt_head, c.body), (0, None, Body::Text("old".into())));
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        assert!(Content::decode(&[]).is_err());
        assert!(Content::decode(&[9, 0, 0]).is_err());
        assert!(Content::decode(&[1, 0xff]).is_err());
        let mut bytes = Content::text(MessageId([1; 16]), 42, "hi").encode().expect("encodes");
        if let Some(last) = bytes.last_mut() {
            *last = 1;
        }
        assert!(Content::decode(&bytes).is_err());
        for n in 0..40 {
            let _ = Content::decode(&bytes[..n]);
        }
        assert!(Content::text(MessageId([1; 16]), 1, "x".repeat(MAX_TEXT_BYTES + 1)).encode().is_err());
    }
}

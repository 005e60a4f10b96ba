//! The plaintext inside every MLS application message.
//!
//! Encoding (version 1): `0x01 || MLS-encoded Body || zero padding`, where the
//! whole is padded up to a bucket so that ciphertext sizes reveal only the
//! bucket: 256 bytes, then powers of two up to 64 KiB, then multiples of 64 KiB.
//! The decoder rejects unknown versions and non-zero padding.

use mls_rs_codec::{MlsDecode, MlsEncode, MlsSize};
use subrosa_proto::MessageId;

use crate::CoreError;

const VERSION: u8 = 1;
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
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Message text never goes into logs or panics.
        f.debug_struct("Content")
            .field("message_id", &self.message_id)
            .field("sent_at_ms", &self.sent_at_ms)
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
        Content { message_id, sent_at_ms, body: Body::Text(text.into()) }
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
        let wire = WireV1 { message_id: self.message_id.0, sent_at_ms: self.sent_at_ms, kind, payload };
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
        if version != VERSION {
            return Err(CoreError::UnsupportedVersion(version));
        }
        let wire = WireV1::mls_decode(&mut rest).map_err(|_| CoreError::Malformed("content"))?;
        if rest.iter().any(|&b| b != 0) {
            return Err(CoreError::Malformed("content: non-zero padding"));
        }
        let body = match wire.kind {
            KIND_TEXT => Body::Text(
                String::from_utf8(wire.payload).map_err(|_| CoreError::Malformed("content: text is not UTF-8"))?,
            ),
            _ => return Err(CoreError::Malformed("content: unknown kind")),
        };
        Ok(Content { message_id: MessageId(wire.message_id), sent_at_ms: wire.sent_at_ms, body })
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

//! The plaintext inside every MLS application message.
//!
//! Encoding (version 3, written now): `0x03 || MLS-encoded envelope ||
//! zero padding`, where the envelope is `{message id, sent-at ms, sequence
//! number, gossiped head, kind (u16), payload}` and the whole is padded up
//! to a bucket so that ciphertext sizes reveal only the bucket: 256 bytes,
//! then powers of two up to 64 KiB, then multiples of 64 KiB.
//!
//! Every kind has its own versioned payload: `payload version (u8) ||
//! MLS-encoded fields of that version`. A kind this version does not know,
//! or a payload version newer than it reads, still decodes: as
//! [`Body::Unsupported`], whose bytes are kept, so a newer client's message
//! counts in the sender's sequence and is shown as unsupported instead of
//! being reported as tampered.
//!
//! Kinds: 1 text (payload version 1: the text; version 2, written only for
//! a reply: the text and the id of the message it answers), 2 identity
//! key, 3 reaction, 4 edit, 5 delete (for everyone), 6 receipt, 7
//! attachment, 8 call signal, 9 text with a link preview. Reactions,
//! edits, deletes and receipts name the message they concern by its
//! end-to-end id; whether the sender may do that is the session's rule,
//! not the encoding's.
//!
//! The gossiped head is the newest signed key-directory head the sender
//! holds (`subrosa_proto::kt::SignedHead`'s bytes), carried opaque here and
//! checked by the receiver. Versions 1 (id, time, kind, body; text only)
//! and 2 (plus the sequence number and an unsigned `(epoch, root)` head,
//! which is ignored now) still decode. Non-zero padding and unknown
//! versions of the envelope are refused.

use mls_rs_codec::{MlsDecode, MlsEncode, MlsSize};
use subrosa_proto::MessageId;

use crate::CoreError;

const VERSION_1: u8 = 1;
const VERSION_2: u8 = 2;
const VERSION: u8 = 3;
/// Largest text a message may carry, in bytes.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Largest gossiped head accepted, in bytes (a signed head is 161).
pub const MAX_HEAD_BYTES: usize = 1024;

/// The kind numbers of the content kinds this version knows.
pub mod kind {
    /// A text message.
    pub const TEXT: u16 = 1;
    /// The account's new identity key, handed to its other devices (only in
    /// the conversation of the account's own devices).
    pub const IDENTITY_KEY: u16 = 2;
    /// A call signal (offer, ringing, answer, busy, hang-up):
    /// [`crate::call::CallSignal`].
    pub const CALL: u16 = 8;
    /// Files, each a pointer to a sealed blob on the server with its key
    /// (see [`crate::attachment`]).
    pub const ATTACHMENT: u16 = 7;
    /// A reaction to a message (or taking one back).
    pub const REACTION: u16 = 3;
    /// The author's new text of one of its messages.
    pub const EDIT: u16 = 4;
    /// The author's deletion of one of its messages, for everyone.
    pub const DELETE: u16 = 5;
    /// Delivery or read receipts for messages of the conversation.
    pub const RECEIPT: u16 = 6;
    /// A text with the preview its sender's device made of its first link
    /// (see [`crate::preview`]).
    pub const PREVIEW: u16 = 9;
}

/// Largest reaction accepted, in bytes of UTF-8 (the longest emoji
/// sequences, skin tones and joiners included, take about 35).
pub const MAX_EMOJI_BYTES: usize = 64;
/// Most message ids one receipt names; a device with more to acknowledge
/// sends several.
pub const MAX_RECEIPT_IDS: usize = 512;

/// What a receipt says of the messages it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ReceiptKind {
    /// A device of the sender's account stored them.
    Delivered,
    /// The account's user has seen them.
    Read,
}

impl ReceiptKind {
    fn to_wire(self) -> u8 {
        match self {
            ReceiptKind::Delivered => 1,
            ReceiptKind::Read => 2,
        }
    }

    fn from_wire(b: u8) -> Option<Self> {
        match b {
            1 => Some(ReceiptKind::Delivered),
            2 => Some(ReceiptKind::Read),
            _ => None,
        }
    }
}

/// The account's new identity key pair and the certificates it made for the
/// account's devices, sent by the device that rotated it to the account's
/// other devices. The secret is zeroized on drop and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct IdentityHandover {
    /// The new identity public key.
    pub identity_public: Vec<u8>,
    /// The new identity secret key.
    pub identity_secret: zeroize::Zeroizing<Vec<u8>>,
    /// A certificate by the new key for each device of the account, by
    /// device id.
    pub certificates: Vec<([u8; 8], Vec<u8>)>,
}

impl std::fmt::Debug for IdentityHandover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityHandover")
            .field("devices", &self.certificates.len())
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

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
    /// The newest signed key-directory head the sender holds, as encoded by
    /// the server (unverified here).
    pub kt_head: Option<Vec<u8>>,
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
    /// The account's new identity key for its other devices.
    IdentityKey(IdentityHandover),
    /// A text message that answers another one of the conversation (text
    /// payload version 2: old clients show it as unsupported).
    Reply {
        /// What it says.
        text: String,
        /// The message it answers.
        reply_to: MessageId,
    },
    /// A reaction to a message, or (`remove`) taking it back.
    Reaction {
        /// The message reacted to.
        target: MessageId,
        /// The reaction: a short string, an emoji by convention (1 to
        /// [`MAX_EMOJI_BYTES`] bytes, no control or white-space characters).
        emoji: String,
        /// Takes back this sender's reaction `emoji`.
        remove: bool,
    },
    /// The new text of a message (only its author's edit is applied).
    Edit {
        /// The message edited.
        target: MessageId,
        /// Its text from now on.
        text: String,
    },
    /// A message deleted for everyone (only its author's delete is applied).
    Delete {
        /// The message deleted.
        target: MessageId,
    },
    /// Receipts for messages of the conversation (1 to
    /// [`MAX_RECEIPT_IDS`] distinct ids).
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// The messages.
        ids: Vec<MessageId>,
    },
    /// Files with a caption.
    Attachment(crate::attachment::Attachments),
    /// A call signal.
    Call(crate::call::CallSignal),
    /// A text with a preview of its first link, made by the sender's
    /// device (kind 9: old clients show it as unsupported).
    Preview {
        /// What it says.
        text: String,
        /// What the sender's device found at the link.
        preview: crate::preview::LinkPreview,
    },
    /// A kind (or a payload version of a known kind) this version does not
    /// read, sent by a newer Subrosa. Kept as it came.
    Unsupported {
        /// The kind number.
        kind: u16,
        /// The payload, its version byte first.
        payload: Vec<u8>,
    },
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Text(t) => write!(f, "Text(<{} bytes>)", t.len()),
            Body::IdentityKey(h) => write!(f, "{h:?}"),
            Body::Reply { text, reply_to } => write!(f, "Reply(<{} bytes> to {reply_to:?})", text.len()),
            Body::Reaction { target, remove, .. } => write!(f, "Reaction(to {target:?}, remove: {remove})"),
            Body::Edit { target, text } => write!(f, "Edit({target:?}, <{} bytes>)", text.len()),
            Body::Delete { target } => write!(f, "Delete({target:?})"),
            Body::Receipt { kind, ids } => write!(f, "Receipt({kind:?}, {} ids)", ids.len()),
            Body::Attachment(a) => write!(f, "{a:?}"),
            Body::Call(c) => write!(f, "Call({})", c.action.as_str()),
            Body::Preview { text, preview } => write!(f, "Preview(<{} bytes>, {preview:?})", text.len()),
            Body::Unsupported { kind, payload } => write!(f, "Unsupported(kind {kind}, <{} bytes>)", payload.len()),
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

#[derive(MlsSize, MlsEncode, MlsDecode)]
struct WireV3 {
    message_id: [u8; 16],
    sent_at_ms: u64,
    seq: u64,
    /// Empty, or a signed directory head.
    kt_head: Vec<u8>,
    kind: u16,
    /// `payload version || fields`.
    payload: Vec<u8>,
}

/// Text, payload version 1.
#[derive(MlsSize, MlsEncode, MlsDecode)]
struct TextV1 {
    text: Vec<u8>,
}
const TEXT_V1: u8 = 1;

/// Text, payload version 2: adds the message it answers. Written only for
/// replies (a plain text stays version 1, which every client reads), so a
/// version 2 without `reply_to` is not canonical and refused.
#[derive(MlsSize, MlsEncode, MlsDecode)]
struct TextV2 {
    text: Vec<u8>,
    reply_to: Option<[u8; 16]>,
}
const TEXT_V2: u8 = 2;

/// A reaction, payload version 1. `remove` is 0 or 1 (any other byte is
/// refused: one meaning, one encoding).
#[derive(MlsSize, MlsEncode, MlsDecode)]
struct ReactionV1 {
    target: [u8; 16],
    emoji: Vec<u8>,
    remove: u8,
}

/// An edit, payload version 1.
#[derive(MlsSize, MlsEncode, MlsDecode)]
struct EditV1 {
    target: [u8; 16],
    text: Vec<u8>,
}

/// A delete for everyone, payload version 1.
#[derive(MlsSize, MlsEncode, MlsDecode)]
struct DeleteV1 {
    target: [u8; 16],
}

/// Receipts, payload version 1: `kind` 1 delivered, 2 read.
#[derive(MlsSize, MlsEncode, MlsDecode)]
struct ReceiptV1 {
    kind: u8,
    ids: Vec<[u8; 16]>,
}

/// Payload version 1 of reactions, edits, deletes and receipts.
const PAYLOAD_V1: u8 = 1;

#[derive(MlsSize, MlsEncode, MlsDecode)]
struct CertificateEntry {
    device_id: [u8; 8],
    certificate: Vec<u8>,
}

/// An identity key handover, payload version 1.
#[derive(MlsSize, MlsEncode, MlsDecode)]
struct IdentityKeyV1 {
    identity_public: Vec<u8>,
    identity_secret: Vec<u8>,
    certificates: Vec<CertificateEntry>,
}
const IDENTITY_KEY_V1: u8 = 1;
/// An account has at most a few dozen devices; anything larger is refused.
const MAX_HANDOVER_CERTIFICATES: usize = 64;

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

fn text_body(text: Vec<u8>) -> Result<Body, CoreError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(CoreError::Malformed("content: text over 64 KiB"));
    }
    String::from_utf8(text).map(Body::Text).map_err(|_| CoreError::Malformed("content: text is not UTF-8"))
}

fn check_emoji(emoji: &str) -> Result<(), CoreError> {
    if emoji.is_empty() || emoji.len() > MAX_EMOJI_BYTES || emoji.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(CoreError::Malformed("content: reaction is not a short emoji"));
    }
    Ok(())
}

fn check_receipt(ids: &[MessageId]) -> Result<(), CoreError> {
    if ids.is_empty() || ids.len() > MAX_RECEIPT_IDS {
        return Err(CoreError::Malformed("content: receipt names no ids or too many"));
    }
    let mut sorted: Vec<&MessageId> = ids.iter().collect();
    sorted.sort_by_key(|m| m.0);
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(CoreError::Malformed("content: receipt names an id twice"));
    }
    Ok(())
}

/// Decodes the fields of a payload (after its version byte), all of them.
fn fields<T: MlsDecode>(payload: &[u8], what: &'static str) -> Result<T, CoreError> {
    let mut rest = payload.get(1..).unwrap_or_default();
    let t = T::mls_decode(&mut rest).map_err(|_| CoreError::Malformed(what))?;
    if !rest.is_empty() {
        return Err(CoreError::Malformed(what));
    }
    Ok(t)
}

/// Reads a version-3 payload of `kind`: known kinds and payload versions
/// are decoded, anything else is kept as [`Body::Unsupported`].
fn decode_payload(kind: u16, payload: Vec<u8>) -> Result<Body, CoreError> {
    match (kind, payload.first()) {
        (kind::TEXT, Some(&TEXT_V1)) => {
            let mut rest = &payload[1..];
            let t = TextV1::mls_decode(&mut rest).map_err(|_| CoreError::Malformed("content: text payload"))?;
            if !rest.is_empty() {
                return Err(CoreError::Malformed("content: text payload"));
            }
            text_body(t.text)
        }
        (kind::IDENTITY_KEY, Some(&IDENTITY_KEY_V1)) => {
            let mut rest = &payload[1..];
            let mut h = IdentityKeyV1::mls_decode(&mut rest)
                .map_err(|_| CoreError::Malformed("content: identity key payload"))?;
            let secret = zeroize::Zeroizing::new(std::mem::take(&mut h.identity_secret));
            if !rest.is_empty() || h.certificates.len() > MAX_HANDOVER_CERTIFICATES {
                return Err(CoreError::Malformed("content: identity key payload"));
            }
            Ok(Body::IdentityKey(IdentityHandover {
                identity_public: h.identity_public,
                identity_secret: secret,
                certificates: h.certificates.into_iter().map(|c| (c.device_id, c.certificate)).collect(),
            }))
        }
        (kind::TEXT, Some(&TEXT_V2)) => {
            let t: TextV2 = fields(&payload, "content: text payload")?;
            let reply_to = t.reply_to.ok_or(CoreError::Malformed("content: text version 2 without a reply"))?;
            match text_body(t.text)? {
                Body::Text(text) => Ok(Body::Reply { text, reply_to: MessageId(reply_to) }),
                _ => Err(CoreError::Bug("text_body made something else")),
            }
        }
        (kind::REACTION, Some(&PAYLOAD_V1)) => {
            let r: ReactionV1 = fields(&payload, "content: reaction payload")?;
            let emoji =
                String::from_utf8(r.emoji).map_err(|_| CoreError::Malformed("content: reaction is not UTF-8"))?;
            check_emoji(&emoji)?;
            let remove = match r.remove {
                0 => false,
                1 => true,
                _ => return Err(CoreError::Malformed("content: reaction payload")),
            };
            Ok(Body::Reaction { target: MessageId(r.target), emoji, remove })
        }
        (kind::EDIT, Some(&PAYLOAD_V1)) => {
            let e: EditV1 = fields(&payload, "content: edit payload")?;
            match text_body(e.text)? {
                Body::Text(text) => Ok(Body::Edit { target: MessageId(e.target), text }),
                _ => Err(CoreError::Bug("text_body made something else")),
            }
        }
        (kind::DELETE, Some(&PAYLOAD_V1)) => {
            let d: DeleteV1 = fields(&payload, "content: delete payload")?;
            Ok(Body::Delete { target: MessageId(d.target) })
        }
        (kind::RECEIPT, Some(&PAYLOAD_V1)) => {
            let r: ReceiptV1 = fields(&payload, "content: receipt payload")?;
            let kind = ReceiptKind::from_wire(r.kind).ok_or(CoreError::Malformed("content: receipt kind"))?;
            let ids: Vec<MessageId> = r.ids.into_iter().map(MessageId).collect();
            check_receipt(&ids)?;
            Ok(Body::Receipt { kind, ids })
        }
        (kind::ATTACHMENT, Some(_)) => match crate::attachment::Attachments::decode_payload(&payload)? {
            Some(a) => Ok(Body::Attachment(a)),
            None => Ok(Body::Unsupported { kind, payload }),
        },
        (kind::PREVIEW, Some(_)) => match crate::preview::LinkPreview::decode_payload(&payload)? {
            Some((text, preview)) => Ok(Body::Preview { text, preview }),
            None => Ok(Body::Unsupported { kind, payload }),
        },
        (
            kind::TEXT
            | kind::PREVIEW
            | kind::IDENTITY_KEY
            | kind::REACTION
            | kind::EDIT
            | kind::DELETE
            | kind::RECEIPT
            | kind::ATTACHMENT
            | kind::CALL,
            None,
        ) => Err(CoreError::Malformed("content: empty payload")),
        (kind::CALL, Some(&crate::call::CALL_V1)) => Ok(Body::Call(crate::call::CallSignal::decode_v1(&payload[1..])?)),
        _ => Ok(Body::Unsupported { kind, payload }),
    }
}

fn check_text(text: &str) -> Result<(), CoreError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(CoreError::Malformed("message: text over 64 KiB"));
    }
    Ok(())
}

/// `version || fields`.
fn payload(version: u8, fields: &impl MlsEncode) -> Result<Vec<u8>, CoreError> {
    let mut out = vec![version];
    fields.mls_encode(&mut out).map_err(|_| CoreError::Bug("content encoding"))?;
    Ok(out)
}

impl Content {
    /// A message of any kind, not numbered yet (see [`Self::with_context`]).
    pub fn new(message_id: MessageId, sent_at_ms: u64, body: Body) -> Self {
        Content { message_id, sent_at_ms, body, seq: 0, kt_head: None }
    }

    /// A text message.
    pub fn text(message_id: MessageId, sent_at_ms: u64, text: impl Into<String>) -> Self {
        Self::new(message_id, sent_at_ms, Body::Text(text.into()))
    }

    /// Numbers the message and attaches the sender's signed directory head.
    pub fn with_context(mut self, seq: u64, kt_head: Option<Vec<u8>>) -> Self {
        self.seq = seq;
        self.kt_head = kt_head;
        self
    }

    /// Encodes and pads.
    ///
    /// # Errors
    /// [`CoreError::Malformed`] when the text is over [`MAX_TEXT_BYTES`],
    /// the head over [`MAX_HEAD_BYTES`], a reaction is not a short emoji
    /// (see [`Body::Reaction`]) or a receipt names no ids, too many or one
    /// twice.
    pub fn encode(&self) -> Result<Vec<u8>, CoreError> {
        let (kind, payload) = match &self.body {
            Body::Text(t) => {
                if t.len() > MAX_TEXT_BYTES {
                    return Err(CoreError::Malformed("message: text over 64 KiB"));
                }
                let mut payload = vec![TEXT_V1];
                TextV1 { text: t.as_bytes().to_vec() }
                    .mls_encode(&mut payload)
                    .map_err(|_| CoreError::Bug("content encoding"))?;
                (kind::TEXT, payload)
            }
            Body::IdentityKey(h) => {
                let mut payload = vec![IDENTITY_KEY_V1];
                let wire = IdentityKeyV1 {
                    identity_public: h.identity_public.clone(),
                    identity_secret: h.identity_secret.to_vec(),
                    certificates: h
                        .certificates
                        .iter()
                        .map(|(d, c)| CertificateEntry { device_id: *d, certificate: c.clone() })
                        .collect(),
                };
                let encoded = wire.mls_encode(&mut payload).map_err(|_| CoreError::Bug("content encoding"));
                zeroize::Zeroize::zeroize(&mut { wire.identity_secret });
                encoded?;
                (kind::IDENTITY_KEY, payload)
            }
            Body::Reply { text, reply_to } => {
                check_text(text)?;
                let wire = TextV2 { text: text.as_bytes().to_vec(), reply_to: Some(reply_to.0) };
                (kind::TEXT, payload(TEXT_V2, &wire)?)
            }
            Body::Reaction { target, emoji, remove } => {
                check_emoji(emoji)?;
                let wire = ReactionV1 { target: target.0, emoji: emoji.as_bytes().to_vec(), remove: u8::from(*remove) };
                (kind::REACTION, payload(PAYLOAD_V1, &wire)?)
            }
            Body::Edit { target, text } => {
                check_text(text)?;
                let wire = EditV1 { target: target.0, text: text.as_bytes().to_vec() };
                (kind::EDIT, payload(PAYLOAD_V1, &wire)?)
            }
            Body::Delete { target } => (kind::DELETE, payload(PAYLOAD_V1, &DeleteV1 { target: target.0 })?),
            Body::Receipt { kind: receipt, ids } => {
                check_receipt(ids)?;
                let wire = ReceiptV1 { kind: receipt.to_wire(), ids: ids.iter().map(|m| m.0).collect() };
                (kind::RECEIPT, payload(PAYLOAD_V1, &wire)?)
            }
            Body::Attachment(a) => (kind::ATTACHMENT, a.encode_payload()?),
            Body::Call(c) => (kind::CALL, c.encode_payload()?),
            Body::Preview { text, preview } => (kind::PREVIEW, preview.encode_payload(text)?),
            Body::Unsupported { kind, payload } => (*kind, payload.clone()),
        };
        let kt_head = self.kt_head.clone().unwrap_or_default();
        if kt_head.len() > MAX_HEAD_BYTES {
            return Err(CoreError::Malformed("message: directory head too long"));
        }
        let wire = WireV3 {
            message_id: self.message_id.0,
            sent_at_ms: self.sent_at_ms,
            seq: self.seq,
            kt_head,
            kind,
            payload,
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
        let content = match version {
            VERSION_1 | VERSION_2 => {
                let (message_id, sent_at_ms, kind, payload, seq) = if version == VERSION_1 {
                    let w = WireV1::mls_decode(&mut rest).map_err(|_| CoreError::Malformed("content"))?;
                    (w.message_id, w.sent_at_ms, w.kind, w.payload, 0)
                } else {
                    let w = WireV2::mls_decode(&mut rest).map_err(|_| CoreError::Malformed("content"))?;
                    if !(w.kt_root.is_empty() || w.kt_root.len() == 32) {
                        return Err(CoreError::Malformed("content: directory root is not 32 bytes"));
                    }
                    (w.message_id, w.sent_at_ms, w.kind, w.payload, w.seq)
                };
                // Versions 1 and 2 had one kind, text, with a raw payload,
                // and no client ever wrote another. Another kind is refused:
                // kept as unsupported, it would be written again as
                // version 3, where its number may mean a kind with payloads
                // of its own (a version 1 "kind 3" would come back as a
                // reaction that does not decode).
                let body = match u16::from(kind) {
                    kind::TEXT => text_body(payload)?,
                    _ => return Err(CoreError::Malformed("content: versions 1 and 2 carry text only")),
                };
                Content { message_id: MessageId(message_id), sent_at_ms, body, seq, kt_head: None }
            }
            VERSION => {
                let w = WireV3::mls_decode(&mut rest).map_err(|_| CoreError::Malformed("content"))?;
                if w.kt_head.len() > MAX_HEAD_BYTES {
                    return Err(CoreError::Malformed("content: directory head too long"));
                }
                Content {
                    message_id: MessageId(w.message_id),
                    sent_at_ms: w.sent_at_ms,
                    body: decode_payload(w.kind, w.payload)?,
                    seq: w.seq,
                    kt_head: (!w.kt_head.is_empty()).then_some(w.kt_head),
                }
            }
            _ => return Err(CoreError::UnsupportedVersion(version)),
        };
        if rest.iter().any(|&b| b != 0) {
            return Err(CoreError::Malformed("content: non-zero padding"));
        }
        Ok(content)
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
        let numbered = Content::text(MessageId([3; 16]), 7, "hi").with_context(9, Some(vec![7; 161]));
        assert_eq!(Content::decode(&numbered.encode().expect("encodes")).ok(), Some(numbered));
    }

    /// The encoding of every kind, byte for byte: a change of format is a
    /// visible decision (old clients read what this writes).
    #[test]
    fn snapshot_of_every_kind() {
        let text = Content::text(MessageId([0xaa; 16]), 0x0102, "hi").with_context(5, Some(vec![0xbb; 3]));
        let bytes = text.encode().expect("encodes");
        assert_eq!(bytes.len(), 256, "padded to the first bucket");
        let unpadded = concat!(
            "03",                               // envelope version
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", // message id
            "0000000000000102",                 // sent at (ms)
            "0000000000000005",                 // sequence number
            "03bbbbbb",                         // gossiped head (length-prefixed)
            "0001",                             // kind: text
            "04",                               // payload length
            "01",                               // text payload version 1
            "026869",                           // "hi"
        );
        let n = unpadded.len() / 2;
        assert_eq!(hex::encode(&bytes[..n]), unpadded);
        assert!(bytes[n..].iter().all(|&b| b == 0), "zero padding");

        let future = Content {
            message_id: MessageId([0x11; 16]),
            sent_at_ms: 9,
            body: Body::Unsupported { kind: 0x7f01, payload: vec![2, 0xde, 0xad] },
            seq: 6,
            kt_head: None,
        };
        let bytes = future.encode().expect("encodes");
        let unpadded = concat!(
            "03",
            "11111111111111111111111111111111",
            "0000000000000009",
            "0000000000000006",
            "00",     // no head
            "7f01",   // a kind this version does not know
            "03",     // payload length
            "02dead", // its payload, kept as it came
        );
        let n = unpadded.len() / 2;
        assert_eq!(hex::encode(&bytes[..n]), unpadded);
        assert_eq!(Content::decode(&bytes).ok(), Some(future));
    }

    #[test]
    fn snapshot_of_an_identity_key_handover() {
        let handover = Content {
            message_id: MessageId([0x22; 16]),
            sent_at_ms: 1,
            body: Body::IdentityKey(IdentityHandover {
                identity_public: vec![0xa1; 2],
                identity_secret: zeroize::Zeroizing::new(vec![0x5e; 2]),
                certificates: vec![([0xd1; 8], vec![0xce; 3])],
            }),
            seq: 2,
            kt_head: None,
        };
        let bytes = handover.encode().expect("encodes");
        let unpadded = concat!(
            "03",
            "22222222222222222222222222222222",
            "0000000000000001",
            "0000000000000002",
            "00",               // no head
            "0002",             // kind: identity key
            "14",               // payload length
            "01",               // payload version 1
            "02a1a1",           // identity public key
            "025e5e",           // identity secret key
            "0c",               // certificates (length of the list)
            "d1d1d1d1d1d1d1d1", // device id
            "03cecece",         // its certificate
        );
        let n = unpadded.len() / 2;
        assert_eq!(hex::encode(&bytes[..n]), unpadded);
        assert_eq!(Content::decode(&bytes).ok(), Some(handover.clone()));
        assert!(!format!("{handover:?}").contains("5e"), "the secret never reaches Debug");
    }

    fn snapshot(body: Body, payload_hex: &str) {
        let c = Content { message_id: MessageId([0x33; 16]), sent_at_ms: 1, body, seq: 2, kt_head: None };
        let bytes = c.encode().expect("encodes");
        let unpadded = format!(
            "03{}{}{}00{payload_hex}",
            "33".repeat(16),
            "0000000000000001", // sent at
            "0000000000000002", // sequence number
        );
        let n = unpadded.len() / 2;
        assert_eq!(hex::encode(&bytes[..n]), unpadded);
        assert!(bytes[n..].iter().all(|&b| b == 0), "zero padding");
        assert_eq!(Content::decode(&bytes).ok(), Some(c));
    }

    /// Replies, reactions, edits, deletes and receipts, byte for byte.
    #[test]
    fn snapshot_of_replies_reactions_edits_deletes_and_receipts() {
        let target = MessageId([0xcc; 16]);
        let cc = "cc".repeat(16);
        snapshot(
            Body::Reply { text: "ok".into(), reply_to: target },
            // kind, payload length, version 2, text, reply_to present, id
            &format!("0001{}02{}{}{}", "15", "026f6b", "01", cc),
        );
        snapshot(
            Body::Reaction { target, emoji: "\u{1f44d}".into(), remove: false },
            // kind 3, length, version 1, target, emoji (4 bytes), remove 0
            &format!("0003{}01{cc}{}{}", "17", "04f09f918d", "00"),
        );
        snapshot(
            Body::Reaction { target, emoji: "\u{1f44d}".into(), remove: true },
            &format!("0003{}01{cc}{}{}", "17", "04f09f918d", "01"),
        );
        snapshot(Body::Edit { target, text: "new".into() }, &format!("0004{}01{cc}{}", "15", "036e6577"));
        snapshot(Body::Delete { target }, &format!("0005{}01{cc}", "11"));
        snapshot(
            Body::Receipt { kind: ReceiptKind::Read, ids: vec![target, MessageId([0xdd; 16])] },
            // kind 6, length, version 1, read (2), list of 32 bytes
            &format!("0006{}01{}{}{cc}{}", "23", "02", "20", "dd".repeat(16)),
        );
        snapshot(
            Body::Receipt { kind: ReceiptKind::Delivered, ids: vec![target] },
            &format!("0006{}01{}{}{cc}", "13", "01", "10"),
        );
    }

    fn payload_of(kind: u16, payload: Vec<u8>) -> Vec<u8> {
        let c = Content {
            message_id: MessageId([1; 16]),
            sent_at_ms: 1,
            body: Body::Unsupported { kind, payload },
            seq: 1,
            kt_head: None,
        };
        c.encode().expect("encodes")
    }

    /// One meaning, one encoding; and the limits hold on both sides.
    #[test]
    fn refuses_non_canonical_and_oversized_payloads() {
        let t = [0xcc; 16];
        let mut wire = Vec::new();
        // A version-2 text without a reply: version 1 says that.
        TextV2 { text: b"hi".to_vec(), reply_to: None }.mls_encode(&mut wire).expect("encodes");
        assert!(Content::decode(&payload_of(kind::TEXT, [vec![TEXT_V2], wire].concat())).is_err());
        // `remove` other than 0 or 1.
        let mut wire = Vec::new();
        ReactionV1 { target: t, emoji: "x".into(), remove: 2 }.mls_encode(&mut wire).expect("encodes");
        assert!(Content::decode(&payload_of(kind::REACTION, [vec![PAYLOAD_V1], wire].concat())).is_err());
        // Reactions: empty, too long, control characters, white space.
        for emoji in ["", " ", "a\u{1b}[2J", "\n", &"x".repeat(MAX_EMOJI_BYTES + 1)] {
            let mut wire = Vec::new();
            ReactionV1 { target: t, emoji: emoji.as_bytes().to_vec(), remove: 0 }
                .mls_encode(&mut wire)
                .expect("encodes");
            assert!(
                Content::decode(&payload_of(kind::REACTION, [vec![PAYLOAD_V1], wire].concat())).is_err(),
                "{emoji:?}"
            );
            let body = Body::Reaction { target: MessageId(t), emoji: emoji.into(), remove: false };
            assert!(Content { body, ..Content::text(MessageId(t), 1, "") }.encode().is_err());
        }
        let longest = "x".repeat(MAX_EMOJI_BYTES);
        let body = Body::Reaction { target: MessageId(t), emoji: longest, remove: false };
        assert!(Content { body, ..Content::text(MessageId(t), 1, "") }.encode().is_ok());
        // Receipts: an unknown kind, no ids, too many, one twice.
        for (kind, ids) in [
            (3u8, vec![t]),
            (1, vec![]),
            (1, vec![t; 2]),
            (
                1,
                (0..=MAX_RECEIPT_IDS)
                    .map(|i| [(i % 256) as u8, (i / 256) as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
                    .collect(),
            ),
        ] {
            let mut wire = Vec::new();
            ReceiptV1 { kind, ids: ids.clone() }.mls_encode(&mut wire).expect("encodes");
            assert!(Content::decode(&payload_of(kind::RECEIPT, [vec![PAYLOAD_V1], wire].concat())).is_err());
        }
        let most: Vec<MessageId> = (0..MAX_RECEIPT_IDS)
            .map(|i| MessageId([(i % 256) as u8, (i / 256) as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
            .collect();
        let body = Body::Receipt { kind: ReceiptKind::Delivered, ids: most.clone() };
        let bytes = Content { body, ..Content::text(MessageId(t), 1, "") }.encode().expect("the most ids encode");
        assert!(matches!(Content::decode(&bytes).map(|c| c.body), Ok(Body::Receipt { ids, .. }) if ids == most));
        let body = Body::Receipt { kind: ReceiptKind::Delivered, ids: [most, vec![MessageId([9; 16])]].concat() };
        assert!(Content { body, ..Content::text(MessageId(t), 1, "") }.encode().is_err());
        // Texts of edits and replies: at most 64 KiB, UTF-8.
        let long = "x".repeat(MAX_TEXT_BYTES + 1);
        for body in [
            Body::Edit { target: MessageId(t), text: long.clone() },
            Body::Reply { text: long, reply_to: MessageId(t) },
        ] {
            assert!(Content { body, ..Content::text(MessageId(t), 1, "") }.encode().is_err());
        }
        let mut wire = Vec::new();
        EditV1 { target: t, text: vec![0xff] }.mls_encode(&mut wire).expect("encodes");
        assert!(Content::decode(&payload_of(kind::EDIT, [vec![PAYLOAD_V1], wire].concat())).is_err());
        // Trailing bytes inside a payload, and empty payloads.
        for k in [kind::REACTION, kind::EDIT, kind::DELETE, kind::RECEIPT] {
            assert!(Content::decode(&payload_of(k, vec![])).is_err());
        }
        assert!(Content::decode(&payload_of(kind::DELETE, [vec![PAYLOAD_V1], t.to_vec(), vec![0]].concat())).is_err());
        // A newer payload version of these kinds is unsupported, not malformed.
        let got = Content::decode(&payload_of(kind::REACTION, vec![2, 7])).expect("decodes");
        assert_eq!(got.body, Body::Unsupported { kind: kind::REACTION, payload: vec![2, 7] });
        // Debug never shows a text or a reaction.
        let secret = Body::Edit { target: MessageId(t), text: "secret words".into() };
        assert!(!format!("{secret:?}").contains("secret"));
        let secret = Body::Reaction { target: MessageId(t), emoji: "\u{1f92b}".into(), remove: false };
        assert!(!format!("{secret:?}").contains('\u{1f92b}'));
    }

    #[test]
    fn snapshot_of_an_attachment() {
        use crate::attachment::{AttachedFile, Attachments};
        let c = Content {
            message_id: MessageId([0x33; 16]),
            sent_at_ms: 2,
            body: Body::Attachment(Attachments {
                caption: String::new(),
                reply_to: None,
                files: vec![AttachedFile {
                    blob: [0xb1; 16],
                    key: zeroize::Zeroizing::new([0x4b; 32]),
                    sha256: [0x5a; 32],
                    size: 1,
                    name: "a".into(),
                    media_type: "x/y".into(),
                }],
            }),
            seq: 1,
            kt_head: None,
        };
        let bytes = c.encode().expect("encodes");
        let unpadded = [
            "03",
            "33333333333333333333333333333333",
            "0000000000000002",
            "0000000000000001",
            "00",   // no head
            "0007", // kind: attachment
            "4063", // payload length
            "01",   // payload version 1
            "00",   // no caption
            "00",   // no reply
            "405e", // files
            "b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1",
            "4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b",
            "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a",
            "0000000000000001",
            "0161",     // name
            "03782f79", // media type
        ]
        .concat();
        let n = unpadded.len() / 2;
        assert_eq!(hex::encode(&bytes[..n]), unpadded);
        assert_eq!(Content::decode(&bytes).ok(), Some(c));
        // A newer payload version of the kind is kept, not refused.
        let newer = Content {
            message_id: MessageId([0x34; 16]),
            sent_at_ms: 2,
            body: Body::Unsupported { kind: kind::ATTACHMENT, payload: vec![2, 1, 2] },
            seq: 1,
            kt_head: None,
        };
        assert_eq!(Content::decode(&newer.encode().expect("encodes")).ok(), Some(newer));
    }

    #[test]
    fn snapshot_of_a_call_signal() {
        let offer = Content {
            message_id: MessageId([0x33; 16]),
            sent_at_ms: 2,
            body: Body::Call(crate::call::CallSignal {
                call_id: [0xc1; 16],
                action: crate::call::CallAction::Offer,
                context: 0x0a0b0c0d0e,
            }),
            seq: 4,
            kt_head: None,
        };
        let bytes = offer.encode().expect("encodes");
        let unpadded = concat!(
            "03",
            "33333333333333333333333333333333",
            "0000000000000002",
            "0000000000000004",
            "00",                               // no head
            "0008",                             // kind: call
            "1a",                               // payload length
            "01",                               // payload version 1
            "c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1", // call id
            "01",                               // action: offer
            "0000000a0b0c0d0e",                 // the sender's SFrame context id
        );
        let n = unpadded.len() / 2;
        assert_eq!(hex::encode(&bytes[..n]), unpadded);
        assert_eq!(bytes.len(), 256, "padded like any message");
        assert_eq!(Content::decode(&bytes).ok(), Some(offer));
        // A later payload version is a newer Subrosa's, not tampering.
        let mut newer = bytes.clone();
        newer[1 + 16 + 8 + 8 + 1 + 2 + 1] = 2;
        assert!(matches!(Content::decode(&newer).map(|c| c.body), Ok(Body::Unsupported { kind: kind::CALL, .. })));
        // Version 1 with an unknown action is malformed.
        let mut bad = bytes;
        bad[1 + 16 + 8 + 8 + 1 + 2 + 1 + 1 + 16] = 0;
        assert!(Content::decode(&bad).is_err());
    }

    #[test]
    fn snapshot_of_a_text_with_a_link_preview() {
        use crate::preview::LinkPreview;
        let preview = LinkPreview { url: "https://a.b".into(), title: "T".into(), ..LinkPreview::default() };
        let c = Content {
            message_id: MessageId([0x33; 16]),
            sent_at_ms: 2,
            body: Body::Preview { text: "https://a.b".into(), preview },
            seq: 1,
            kt_head: None,
        };
        let bytes = c.encode().expect("encodes");
        let unpadded = concat!(
            "03",
            "33333333333333333333333333333333",
            "0000000000000002",
            "0000000000000001",
            "00",                       // no head
            "0009",                     // kind: text with a link preview
            "1e",                       // payload length
            "01",                       // payload version 1
            "0b68747470733a2f2f612e62", // text
            "0b68747470733a2f2f612e62", // URL
            "0154",                     // title
            "00",                       // no description
            "00",                       // no thumbnail type
            "00",                       // no thumbnail
        );
        let n = unpadded.len() / 2;
        assert_eq!(hex::encode(&bytes[..n]), unpadded);
        assert_eq!(Content::decode(&bytes).ok(), Some(c));
        // A newer payload version is a newer Subrosa's, not tampering.
        let mut newer = bytes.clone();
        newer[1 + 16 + 8 + 8 + 1 + 2 + 1] = 2;
        assert!(matches!(Content::decode(&newer).map(|c| c.body), Ok(Body::Unsupported { kind: kind::PREVIEW, .. })));
        assert!(Content::decode(&payload_of(kind::PREVIEW, vec![])).is_err());
    }

    #[test]
    fn an_unknown_kind_or_payload_version_is_unsupported_not_malformed() {
        for (kind, payload) in [(0x0200u16, vec![1, 2, 3]), (kind::TEXT, vec![9, 0])] {
            let c = Content {
                message_id: MessageId([4; 16]),
                sent_at_ms: 1,
                body: Body::Unsupported { kind, payload: payload.clone() },
                seq: 3,
                kt_head: None,
            };
            let got = Content::decode(&c.encode().expect("encodes")).expect("decodes");
            assert_eq!(got.seq, 3);
            assert_eq!(got.body, Body::Unsupported { kind, payload });
        }
    }

    #[test]
    fn reads_versions_1_and_2() {
        let wire = WireV1 { message_id: [5; 16], sent_at_ms: 3, kind: 1, payload: b"old".to_vec() };
        let mut bytes = vec![VERSION_1];
        wire.mls_encode(&mut bytes).expect("encodes");
        bytes.resize(256, 0);
        let c = Content::decode(&bytes).expect("decodes");
        assert_eq!((c.seq, c.kt_head, c.body), (0, None, Body::Text("old".into())));

        let wire = WireV2 {
            message_id: [6; 16],
            sent_at_ms: 4,
            kind: 1,
            payload: b"v2".to_vec(),
            seq: 8,
            kt_epoch: 3,
            kt_root: vec![1; 32],
        };
        let mut bytes = vec![VERSION_2];
        wire.mls_encode(&mut bytes).expect("encodes");
        bytes.resize(256, 0);
        let c = Content::decode(&bytes).expect("decodes");
        // Version 2's unsigned head is no evidence of anything: ignored.
        assert_eq!((c.seq, c.kt_head, c.body), (8, None, Body::Text("v2".into())));
    }

    /// Found by the `content_decode` fuzz target: a version 1 envelope of
    /// kind 3 decoded (as unsupported) and was written again as a version
    /// 3 reaction that did not decode. Whatever decodes now re-encodes to
    /// something that decodes the same.
    #[test]
    fn an_old_envelope_of_another_kind_than_text_is_refused() {
        for kind in [0u8, 2, 3, 9, 200] {
            let wire = WireV1 { message_id: [5; 16], sent_at_ms: 3, kind, payload: vec![1, 0x0e, 1, 0] };
            let mut bytes = vec![VERSION_1];
            wire.mls_encode(&mut bytes).expect("encodes");
            bytes.resize(256, 0);
            assert!(matches!(Content::decode(&bytes), Err(CoreError::Malformed(_))), "v1 kind {kind}");
        }
        let found = "01ffffffffffff460346ffc6c63c3c3c3c3c3cc6bcc6c665fd030e0100c6c6c6c6c6024eb9030e0000";
        let found = hex::decode(found).expect("hex");
        if let Ok(c) = Content::decode(&found) {
            let again = c.encode().expect("encodes");
            assert_eq!(Content::decode(&again).ok(), Some(c));
        }
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

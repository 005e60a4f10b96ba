//! The content of an attachment message (kind 7): a caption, an optional
//! reply, and for each file the pointer to its blob on the server with
//! everything needed to fetch, open and check it: the key, the SHA-256 of
//! the file, its name, media type and size. The server never sees any of
//! this; it sees only the blob, whose bytes are sealed under the key.
//!
//! Payload version 1: `0x01 || MLS-encoded {caption, reply_to (empty or 16
//! bytes), files: [{blob id, key, sha256, size, name, media type}]}`,
//! decoded canonically (every field in range, nothing left over).

use mls_rs_codec::{MlsDecode, MlsEncode, MlsSize};
use subrosa_proto::MessageId;
use zeroize::{Zeroize, Zeroizing};

use crate::CoreError;

/// Payload version 1.
pub const ATTACHMENT_V1: u8 = 1;
/// Most files one message carries.
pub const MAX_FILES: usize = 32;
/// Longest file name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest media type, in bytes.
pub const MAX_MEDIA_TYPE_BYTES: usize = 127;
/// Largest file size a pointer may claim (1 TiB: far above any server's
/// blob limit, and far below what would overflow a length computation).
pub const MAX_FILE_BYTES: u64 = 1 << 40;

/// One file of an attachment message.
#[derive(Clone, PartialEq, Eq)]
pub struct AttachedFile {
    /// The blob's id on the server.
    pub blob: [u8; 16],
    /// The key the blob is sealed under (zeroized on drop, never printed).
    pub key: Zeroizing<[u8; 32]>,
    /// SHA-256 of the file.
    pub sha256: [u8; 32],
    /// The file's size in bytes (the blob is longer: padded and tagged).
    pub size: u64,
    /// The sender's name for it (untrusted: sanitise before use).
    pub name: String,
    /// Its media type as the sender guessed it (untrusted).
    pub media_type: String,
}

impl std::fmt::Debug for AttachedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names are content: never in logs either.
        f.debug_struct("AttachedFile").field("size", &self.size).field("key", &"<redacted>").finish_non_exhaustive()
    }
}

/// An attachment message.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Attachments {
    /// Text sent with the files (may be empty).
    pub caption: String,
    /// The message this one answers.
    pub reply_to: Option<MessageId>,
    /// The files, at least one.
    pub files: Vec<AttachedFile>,
}

impl std::fmt::Debug for Attachments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachments")
            .field("caption", &format_args!("<{} bytes>", self.caption.len()))
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

#[derive(MlsSize, MlsEncode, MlsDecode)]
struct FileV1 {
    blob: [u8; 16],
    key: [u8; 32],
    sha256: [u8; 32],
    size: u64,
    name: Vec<u8>,
    media_type: Vec<u8>,
}

#[derive(MlsSize, MlsEncode, MlsDecode)]
struct AttachmentsV1 {
    caption: Vec<u8>,
    reply_to: Vec<u8>,
    files: Vec<FileV1>,
}

fn check_file(name: &str, media_type: &str, size: u64) -> Result<(), CoreError> {
    if name.len() > MAX_NAME_BYTES {
        return Err(CoreError::Malformed("attachment: file name too long"));
    }
    if media_type.len() > MAX_MEDIA_TYPE_BYTES || !media_type.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CoreError::Malformed("attachment: media type"));
    }
    if size > MAX_FILE_BYTES {
        return Err(CoreError::Malformed("attachment: file too large"));
    }
    Ok(())
}

impl Attachments {
    /// The payload, its version byte first.
    ///
    /// # Errors
    /// [`CoreError::Malformed`] for no file or too many, a caption over
    /// [`crate::content::MAX_TEXT_BYTES`], or a field out of range.
    pub fn encode_payload(&self) -> Result<Vec<u8>, CoreError> {
        if self.files.is_empty() || self.files.len() > MAX_FILES {
            return Err(CoreError::Malformed("attachment: one to 32 files"));
        }
        if self.caption.len() > crate::content::MAX_TEXT_BYTES {
            return Err(CoreError::Malformed("attachment: caption over 64 KiB"));
        }
        let mut files = Vec::with_capacity(self.files.len());
        for f in &self.files {
            check_file(&f.name, &f.media_type, f.size)?;
            files.push(FileV1 {
                blob: f.blob,
                key: *f.key,
                sha256: f.sha256,
                size: f.size,
                name: f.name.as_bytes().to_vec(),
                media_type: f.media_type.as_bytes().to_vec(),
            });
        }
        let mut wire = AttachmentsV1 {
            caption: self.caption.as_bytes().to_vec(),
            reply_to: self.reply_to.map(|m| m.0.to_vec()).unwrap_or_default(),
            files,
        };
        let mut out = vec![ATTACHMENT_V1];
        let encoded = wire.mls_encode(&mut out).map_err(|_| CoreError::Bug("attachment encoding"));
        for f in &mut wire.files {
            f.key.zeroize();
        }
        encoded?;
        Ok(out)
    }

    /// Decodes a version-1 payload (without its version byte), canonically.
    ///
    /// # Errors
    /// [`CoreError::Malformed`].
    pub fn decode_v1(mut bytes: &[u8]) -> Result<Self, CoreError> {
        let bad = || CoreError::Malformed("attachment payload");
        let mut wire = AttachmentsV1::mls_decode(&mut bytes).map_err(|_| bad())?;
        let out = (|| {
            if !bytes.is_empty() || wire.files.is_empty() || wire.files.len() > MAX_FILES {
                return Err(bad());
            }
            if wire.caption.len() > crate::content::MAX_TEXT_BYTES {
                return Err(CoreError::Malformed("attachment: caption over 64 KiB"));
            }
            let caption = String::from_utf8(std::mem::take(&mut wire.caption)).map_err(|_| bad())?;
            let reply_to = match wire.reply_to.len() {
                0 => None,
                16 => {
                    let mut id = [0u8; 16];
                    id.copy_from_slice(&wire.reply_to);
                    Some(MessageId(id))
                }
                _ => return Err(bad()),
            };
            let mut files = Vec::with_capacity(wire.files.len());
            for f in &mut wire.files {
                let name = String::from_utf8(std::mem::take(&mut f.name)).map_err(|_| bad())?;
                let media_type = String::from_utf8(std::mem::take(&mut f.media_type)).map_err(|_| bad())?;
                check_file(&name, &media_type, f.size)?;
                files.push(AttachedFile {
                    blob: f.blob,
                    key: Zeroizing::new(f.key),
                    sha256: f.sha256,
                    size: f.size,
                    name,
                    media_type,
                });
            }
            Ok(Attachments { caption, reply_to, files })
        })();
        for f in &mut wire.files {
            f.key.zeroize();
        }
        out
    }

    /// Decodes a payload with its version byte: `Ok(None)` for a version
    /// this build does not read.
    ///
    /// # Errors
    /// [`CoreError::Malformed`].
    pub fn decode_payload(payload: &[u8]) -> Result<Option<Self>, CoreError> {
        match payload.split_first() {
            Some((&ATTACHMENT_V1, rest)) => Self::decode_v1(rest).map(Some),
            Some(_) => Ok(None),
            None => Err(CoreError::Malformed("attachment: empty payload")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Attachments {
        Attachments {
            caption: "hi".into(),
            reply_to: Some(MessageId([0x0e; 16])),
            files: vec![AttachedFile {
                blob: [0xb1; 16],
                key: Zeroizing::new([0x4b; 32]),
                sha256: [0x5a; 32],
                size: 0x0102,
                name: "a.txt".into(),
                media_type: "text/plain".into(),
            }],
        }
    }

    /// The payload byte for byte: a change of format is a visible decision.
    #[test]
    fn snapshot_of_version_1() {
        let bytes = sample().encode_payload().expect("encodes");
        let expected = [
            "01",                                                               // payload version
            "026869",                                                           // caption "hi"
            "100e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e",                               // reply to
            "4069",                                                             // files (length)
            "b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1",                                 // blob id
            "4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b", // key
            "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a", // sha256
            "0000000000000102",                                                 // size
            "05612e747874",                                                     // name
            "0a746578742f706c61696e",                                           // media type
        ]
        .concat();
        assert_eq!(hex::encode(&bytes), expected);
        assert_eq!(Attachments::decode_payload(&bytes).expect("decodes"), Some(sample()));
    }

    #[test]
    fn keys_and_names_never_reach_debug() {
        let text = format!("{:?}", sample());
        assert!(!text.contains("4b") && !text.contains("75") && !text.contains("a.txt"), "{text}");
    }

    #[test]
    fn refuses_what_is_out_of_range() {
        let mut none = sample();
        none.files.clear();
        assert!(none.encode_payload().is_err());
        let mut long = sample();
        long.files[0].name = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(long.encode_payload().is_err());
        let mut media = sample();
        media.files[0].media_type = "text/plain\n".into();
        assert!(media.encode_payload().is_err());
        let mut huge = sample();
        huge.files[0].size = MAX_FILE_BYTES + 1;
        assert!(huge.encode_payload().is_err());

        let good = sample().encode_payload().expect("encodes");
        // Trailing bytes, every truncation, a reply id of the wrong size.
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(Attachments::decode_payload(&trailing).is_err());
        for n in 0..good.len() {
            assert!(Attachments::decode_payload(&good[..n]).is_err(), "prefix of {n} bytes decoded");
        }
        let mut odd_reply = good.clone();
        odd_reply[4] = 0x0f;
        assert!(Attachments::decode_payload(&odd_reply).is_err());
        // A newer payload version is not this build's to read.
        assert_eq!(Attachments::decode_payload(&[2, 0]).expect("newer"), None);
    }
}

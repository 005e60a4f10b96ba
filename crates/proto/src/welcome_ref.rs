//! The Welcome reference: what a Welcome part carries instead of the MLS
//! Welcome when the Welcome is too large to travel inline. A Welcome holds
//! the whole ratchet tree (in its encrypted GroupInfo), so it grows with the
//! group: past about 370 devices (post-quantum suite) or 2,000 (classical)
//! it no longer fits in one send part ([`crate::limits::MAX_CIPHERTEXT_BYTES`]).
//! The sender then uploads the Welcome's bytes, as they are (they are
//! already MLS ciphertext to the new members), as a blob that only the
//! Welcome's recipients may download, and the Welcome part carries this
//! reference. The recipient downloads the blob, checks its size and SHA-256
//! against the reference, and joins it exactly as an inline Welcome.
//!
//! ```text
//! WelcomeRef = magic "SRWELREF" (8 bytes) || version: u16 (1)
//!           || blob id (16 bytes) || size: u64 || SHA-256 of the Welcome (32 bytes)
//! ```
//!
//! Integers are big-endian; the encoding is exactly [`ENCODED_LEN`] bytes
//! (anything else is refused, so there is one encoding per reference). An
//! MLS message starts with its version, `0x0001` (mls10), and the magic
//! starts with `0x53 0x52`, so a reference is never mistaken for an MLS
//! Welcome, nor a Welcome for a reference.

use sha2::{Digest, Sha256};

use crate::BlobId;

/// The first bytes of every Welcome reference.
pub const MAGIC: [u8; 8] = *b"SRWELREF";
/// The version this code writes and reads.
pub const VERSION: u16 = 1;
/// The length of an encoded reference.
pub const ENCODED_LEN: usize = MAGIC.len() + 2 + 16 + 8 + 32;
/// Largest Welcome a sender puts inline, in bytes: larger ones go by
/// reference. Comfortably below [`crate::limits::MAX_CIPHERTEXT_BYTES`]
/// (1 MiB), so a Welcome near the limit never depends on the exact
/// accounting of the server's part limit.
pub const MAX_INLINE_WELCOME_BYTES: usize = 768 * 1024;
/// Largest Welcome a recipient downloads by reference, in bytes: about
/// 23,000 devices in a post-quantum group (2.85 KB each), over 100,000 in
/// a classical one (0.5 KB), and below the server's default blob limit
/// ([`crate::limits::DEFAULT_MAX_BLOB_BYTES`]). A reference naming more
/// is refused before anything is downloaded (the Welcome is held in
/// memory to be joined).
pub const MAX_WELCOME_BYTES: u64 = 64 * 1024 * 1024;

/// Why bytes are not a Welcome reference, or a blob not the Welcome it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WelcomeRefError {
    /// The bytes do not start with [`MAGIC`].
    #[error("not a Welcome reference")]
    Magic,
    /// A version this code does not read.
    #[error("Welcome reference version {0} is not supported")]
    Version(u16),
    /// Not exactly [`ENCODED_LEN`] bytes.
    #[error("a Welcome reference of {0} bytes (expected {ENCODED_LEN})")]
    Length(usize),
    /// A size of zero or over [`MAX_WELCOME_BYTES`].
    #[error("a Welcome reference names {0} bytes (at most {MAX_WELCOME_BYTES})")]
    Size(u64),
    /// The blob is not as long as the reference says.
    #[error("the Welcome blob holds {got} bytes, its reference says {want}")]
    SizeMismatch {
        /// What the reference says.
        want: u64,
        /// What the blob holds.
        got: u64,
    },
    /// The blob's SHA-256 is not the reference's.
    #[error("the Welcome blob does not match its reference's SHA-256")]
    HashMismatch,
}

/// A reference to a Welcome stored as a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WelcomeRef {
    /// The blob that holds the Welcome.
    pub blob: BlobId,
    /// The Welcome's length in bytes.
    pub size: u64,
    /// The SHA-256 of the Welcome.
    pub sha256: [u8; 32],
}

impl WelcomeRef {
    /// The reference to `welcome`, uploaded as `blob`.
    pub fn new(blob: BlobId, welcome: &[u8]) -> Self {
        WelcomeRef { blob, size: welcome.len() as u64, sha256: Sha256::digest(welcome).into() }
    }

    /// True when `bytes` start as a Welcome reference does (a Welcome part
    /// holding anything else is an inline Welcome).
    pub fn is_reference(bytes: &[u8]) -> bool {
        bytes.starts_with(&MAGIC)
    }

    /// The encoding (exactly [`ENCODED_LEN`] bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&self.blob.0);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.sha256);
        out
    }

    /// Decodes a reference, accepting only the canonical encoding.
    ///
    /// # Errors
    /// [`WelcomeRefError::Magic`], [`WelcomeRefError::Version`] (checked
    /// first, so a later version of another length says so),
    /// [`WelcomeRefError::Length`], [`WelcomeRefError::Size`].
    pub fn decode(bytes: &[u8]) -> Result<Self, WelcomeRefError> {
        let rest = bytes.strip_prefix(&MAGIC).ok_or(WelcomeRefError::Magic)?;
        let (version, rest) = rest.split_first_chunk::<2>().ok_or(WelcomeRefError::Length(bytes.len()))?;
        let version = u16::from_be_bytes(*version);
        if version != VERSION {
            return Err(WelcomeRefError::Version(version));
        }
        if bytes.len() != ENCODED_LEN {
            return Err(WelcomeRefError::Length(bytes.len()));
        }
        let (blob, rest) = rest.split_first_chunk::<16>().ok_or(WelcomeRefError::Length(bytes.len()))?;
        let (size, rest) = rest.split_first_chunk::<8>().ok_or(WelcomeRefError::Length(bytes.len()))?;
        let sha256: [u8; 32] = rest.try_into().map_err(|_| WelcomeRefError::Length(bytes.len()))?;
        let size = u64::from_be_bytes(*size);
        if size == 0 || size > MAX_WELCOME_BYTES {
            return Err(WelcomeRefError::Size(size));
        }
        Ok(WelcomeRef { blob: BlobId(*blob), size, sha256 })
    }

    /// Checks that `welcome` (the downloaded blob) is the Welcome this
    /// reference names.
    ///
    /// # Errors
    /// [`WelcomeRefError::SizeMismatch`], [`WelcomeRefError::HashMismatch`].
    pub fn check(&self, welcome: &[u8]) -> Result<(), WelcomeRefError> {
        let got = welcome.len() as u64;
        if got != self.size {
            return Err(WelcomeRefError::SizeMismatch { want: self.size, got });
        }
        // Both values are public (the server holds the blob and the
        // reference), so a plain comparison leaks nothing.
        if Sha256::digest(welcome).as_slice() != self.sha256 {
            return Err(WelcomeRefError::HashMismatch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WelcomeRef {
        WelcomeRef { blob: BlobId([0x11; 16]), size: 900_000, sha256: [0xab; 32] }
    }

    /// The wire form, byte for byte: a change is a visible decision.
    #[test]
    fn snapshot_of_version_1() {
        let bytes = sample().encode();
        assert_eq!(
            hex::encode(&bytes),
            format!("535257454c524546{}{}{}{}", "0001", "11".repeat(16), "00000000000dbba0", "ab".repeat(32))
        );
        assert_eq!(bytes.len(), ENCODED_LEN);
        assert_eq!(WelcomeRef::decode(&bytes), Ok(sample()));
    }

    /// No MLS message (version 0x0001 first) is taken for a reference.
    #[test]
    fn an_mls_message_is_never_a_reference() {
        assert!(!WelcomeRef::is_reference(&[0x00, 0x01, 0x00, 0x03]));
        assert!(WelcomeRef::is_reference(&sample().encode()));
        assert_eq!(WelcomeRef::decode(&[0x00, 0x01, 0x00, 0x03]), Err(WelcomeRefError::Magic));
    }

    #[test]
    fn refuses_bad_input() {
        let good = sample().encode();
        let mut magic = good.clone();
        magic[0] ^= 1;
        assert_eq!(WelcomeRef::decode(&magic), Err(WelcomeRefError::Magic));
        let mut version = good.clone();
        version[9] = 2;
        assert_eq!(WelcomeRef::decode(&version), Err(WelcomeRefError::Version(2)));
        let mut zero = good.clone();
        zero[8] = 0;
        zero[9] = 0;
        assert_eq!(WelcomeRef::decode(&zero), Err(WelcomeRefError::Version(0)));
        for n in 0..ENCODED_LEN {
            assert!(WelcomeRef::decode(&good[..n]).is_err(), "truncated to {n} bytes");
        }
        assert_eq!(WelcomeRef::decode(&good[..9]), Err(WelcomeRefError::Length(9)));
        assert_eq!(WelcomeRef::decode(&good[..40]), Err(WelcomeRefError::Length(40)));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(WelcomeRef::decode(&long), Err(WelcomeRefError::Length(ENCODED_LEN + 1)));
        let over = WelcomeRef { size: MAX_WELCOME_BYTES + 1, ..sample() };
        assert_eq!(WelcomeRef::decode(&over.encode()), Err(WelcomeRefError::Size(MAX_WELCOME_BYTES + 1)));
        let empty = WelcomeRef { size: 0, ..sample() };
        assert_eq!(WelcomeRef::decode(&empty.encode()), Err(WelcomeRefError::Size(0)));
        let most = WelcomeRef { size: MAX_WELCOME_BYTES, ..sample() };
        assert_eq!(WelcomeRef::decode(&most.encode()), Ok(most));
    }

    #[test]
    fn checks_the_blob_against_the_reference() {
        let welcome = b"\x00\x01\x00\x03 an MLS Welcome".to_vec();
        let r = WelcomeRef::new(BlobId([7; 16]), &welcome);
        assert_eq!(r.check(&welcome), Ok(()));
        let mut swapped = welcome.clone();
        swapped[5] ^= 1;
        assert_eq!(r.check(&swapped), Err(WelcomeRefError::HashMismatch));
        assert_eq!(
            r.check(&welcome[1..]),
            Err(WelcomeRefError::SizeMismatch { want: welcome.len() as u64, got: welcome.len() as u64 - 1 })
        );
    }
}

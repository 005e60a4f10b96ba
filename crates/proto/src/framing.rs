//! The cleartext framing of an MLS `PrivateMessage` (RFC 9420 §6.3), which
//! the server reads to check a commit's labels: the group id, the epoch and
//! the content type travel in the clear before the encrypted part.
//!
//! ```text
//! MLSMessage    = version: u16 (1 = mls10) || wire_format: u16 (2 = private) || PrivateMessage
//! PrivateMessage = group_id<V> || epoch: u64 || content_type: u8 || …
//! ```
//!
//! `<V>` is MLS's variable-length vector: a 1-, 2- or 4-byte length prefix
//! (the top two bits of the first byte say which), in its shortest form.
//! Only this prefix is read; the rest is opaque.

/// MLS 1.0.
const MLS10: u16 = 1;
/// `wire_format` of a `PrivateMessage`.
const WIRE_FORMAT_PRIVATE: u16 = 2;

/// MLS content types.
pub mod content_type {
    /// An application message.
    pub const APPLICATION: u8 = 1;
    /// A proposal.
    pub const PROPOSAL: u8 = 2;
    /// A commit.
    pub const COMMIT: u8 = 3;
}

/// What a `PrivateMessage` says in the clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateFraming<'a> {
    /// The group (conversation) id.
    pub group_id: &'a [u8],
    /// The epoch the message was made in.
    pub epoch: u64,
    /// [`content_type`] of the content.
    pub content_type: u8,
}

/// Why bytes are not a `PrivateMessage` this decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FramingError {
    /// The bytes end before the framing does.
    #[error("truncated MLS framing")]
    Truncated,
    /// Not MLS 1.0.
    #[error("not an MLS 1.0 message")]
    Version,
    /// Not a `PrivateMessage`.
    #[error("not an MLS PrivateMessage")]
    WireFormat,
    /// A length prefix that is reserved or not in its shortest form.
    #[error("invalid MLS length prefix")]
    Length,
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], FramingError> {
    if bytes.len() < n {
        return Err(FramingError::Truncated);
    }
    let (head, tail) = bytes.split_at(n);
    *bytes = tail;
    Ok(head)
}

fn u16_of(bytes: &mut &[u8]) -> Result<u16, FramingError> {
    let b = take(bytes, 2)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

/// An MLS variable-length vector's length (RFC 9420 §2.1.2).
fn length(bytes: &mut &[u8]) -> Result<usize, FramingError> {
    let first = *take(bytes, 1)?.first().ok_or(FramingError::Truncated)?;
    let (len, min) = match first >> 6 {
        0 => (u32::from(first & 0x3F), 0),
        1 => {
            let b = take(bytes, 1)?;
            ((u32::from(first & 0x3F) << 8) | u32::from(b[0]), 64)
        }
        2 => {
            let b = take(bytes, 3)?;
            (
                (u32::from(first & 0x3F) << 24) | (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]),
                16384,
            )
        }
        _ => return Err(FramingError::Length),
    };
    if len < min {
        return Err(FramingError::Length);
    }
    usize::try_from(len).map_err(|_| FramingError::Length)
}

/// Reads the cleartext framing of an MLS `PrivateMessage`.
///
/// # Errors
/// [`FramingError`] when the bytes are not one (the rest of the message is
/// not checked).
pub fn private_framing(bytes: &[u8]) -> Result<PrivateFraming<'_>, FramingError> {
    let mut rest = bytes;
    if u16_of(&mut rest)? != MLS10 {
        return Err(FramingError::Version);
    }
    if u16_of(&mut rest)? != WIRE_FORMAT_PRIVATE {
        return Err(FramingError::WireFormat);
    }
    let n = length(&mut rest)?;
    let group_id = take(&mut rest, n)?;
    let e = take(&mut rest, 8)?;
    let epoch = u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
    let content_type = *take(&mut rest, 1)?.first().ok_or(FramingError::Truncated)?;
    Ok(PrivateFraming { group_id, epoch, content_type })
}

/// `wire_format` of a `KeyPackage`.
const WIRE_FORMAT_KEY_PACKAGE: u16 = 5;

/// Reads the ciphersuite of an MLS `KeyPackage` message, which the server
/// files each uploaded package under (RFC 9420 §10):
///
/// ```text
/// MLSMessage = version: u16 (1) || wire_format: u16 (5 = key package) || KeyPackage
/// KeyPackage = version: u16 (1) || cipher_suite: u16 || …
/// ```
///
/// # Errors
/// [`FramingError`] when the bytes are not one (the rest is not checked:
/// clients verify the package).
pub fn key_package_suite(bytes: &[u8]) -> Result<u16, FramingError> {
    let mut rest = bytes;
    if u16_of(&mut rest)? != MLS10 {
        return Err(FramingError::Version);
    }
    if u16_of(&mut rest)? != WIRE_FORMAT_KEY_PACKAGE {
        return Err(FramingError::WireFormat);
    }
    if u16_of(&mut rest)? != MLS10 {
        return Err(FramingError::Version);
    }
    u16_of(&mut rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte-level snapshot of the framing this decoder reads.
    #[test]
    fn reads_the_cleartext_framing() {
        let mut msg = vec![0x00, 0x01, 0x00, 0x02, 0x04, b'g', b'r', b'o', b'u'];
        msg.extend_from_slice(&7u64.to_be_bytes());
        msg.push(content_type::COMMIT);
        msg.extend_from_slice(&[0x00, 0x00, 0x00]);
        let f = private_framing(&msg).expect("framing");
        assert_eq!(f, PrivateFraming { group_id: b"grou", epoch: 7, content_type: 3 });
        // Two-byte length prefix.
        let mut long = vec![0x00, 0x01, 0x00, 0x02, 0x40, 0x40];
        long.extend_from_slice(&[0xAA; 64]);
        long.extend_from_slice(&1u64.to_be_bytes());
        long.push(1);
        assert_eq!(private_framing(&long).expect("framing").group_id.len(), 64);
    }

    /// Byte-level snapshot of the key package header read for its suite.
    #[test]
    fn reads_a_key_package_suite() {
        let kp = [0x00, 0x01, 0x00, 0x05, 0x00, 0x01, 0xFE, 0x4C, 0x20, 0xAA];
        assert_eq!(key_package_suite(&kp), Ok(65100));
        assert_eq!(key_package_suite(&[0x00, 0x01, 0x00, 0x05, 0x00, 0x01, 0x00, 0x01]), Ok(1));
        assert_eq!(key_package_suite(&kp[..7]), Err(FramingError::Truncated));
        assert_eq!(key_package_suite(&[0x00, 0x01, 0x00, 0x02, 0x00, 0x01, 0x00, 0x01]), Err(FramingError::WireFormat));
        assert_eq!(key_package_suite(&[0x00, 0x02, 0x00, 0x05, 0x00, 0x01, 0x00, 0x01]), Err(FramingError::Version));
        assert_eq!(key_package_suite(&[0x00, 0x01, 0x00, 0x05, 0x00, 0x07, 0x00, 0x01]), Err(FramingError::Version));
    }

    #[test]
    fn refuses_what_is_not_a_private_message() {
        assert_eq!(private_framing(b""), Err(FramingError::Truncated));
        assert_eq!(private_framing(&[0, 2, 0, 2, 0]), Err(FramingError::Version));
        assert_eq!(private_framing(&[0, 1, 0, 1, 0]), Err(FramingError::WireFormat));
        assert_eq!(private_framing(&[0, 1, 0, 2, 0xC0]), Err(FramingError::Length));
        assert_eq!(private_framing(&[0, 1, 0, 2, 0x40, 0x01]), Err(FramingError::Length), "not shortest form");
        assert_eq!(private_framing(&[0, 1, 0, 2, 0x05, 1, 2]), Err(FramingError::Truncated));
        assert_eq!(private_framing(&[0, 1, 0, 2, 0x00, 0, 0, 0]), Err(FramingError::Truncated));
    }
}

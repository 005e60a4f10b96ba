//! Attachment encryption: each file under a fresh random key, in
//! authenticated segments (the STREAM construction over AES-256-GCM, from
//! RustCrypto's `aead-stream`), padded to a size bucket.
//!
//! A blob is the padded plaintext (the file, then zeros up to
//! [`padded_len`]) cut into [`SEGMENT`]-byte segments, each sealed with a
//! nonce that holds its position and whether it is the last one: a
//! truncated, reordered, repeated or altered segment fails to open. The
//! key, the file's size and its SHA-256 travel inside the MLS message that
//! points at the blob, so a recipient knows exactly how long the blob must
//! be, that the padding must be zeros, and which file it must give.
//!
//! Each key seals one plaintext only: the sender seals a file once into a
//! staged blob and uploads (and resumes) from that, never sealing again,
//! so the all-zero nonce prefix is never used twice with one key.
//!
//! No I/O of its own: readers and writers are handed in.

use std::io::{Read, Write};

use aead_stream::aead::array::Array;
use aead_stream::{DecryptorBE32, EncryptorBE32};
use aes_gcm::Aes256Gcm;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

// The sizes are shared with the server, which limits blobs by files.
pub use subrosa_proto::blob::{blob_len, padded_len, segments, MIN_PADDED, SEGMENT, TAG};

/// An attachment's key: 32 random bytes, zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct AttachmentKey(Zeroizing<[u8; 32]>);

impl AttachmentKey {
    /// A fresh random key.
    pub fn random() -> Self {
        AttachmentKey(Zeroizing::new(rand::random()))
    }

    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        AttachmentKey(Zeroizing::new(bytes))
    }

    /// A key from a slice of exactly 32 bytes.
    ///
    /// # Errors
    /// [`AttachmentError::Malformed`] for another length.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, AttachmentError> {
        let arr: [u8; 32] =
            bytes.try_into().map_err(|_| AttachmentError::Malformed("an attachment key must be 32 bytes"))?;
        Ok(Self::from_bytes(arr))
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for AttachmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttachmentKey(<redacted>)")
    }
}

/// Why an attachment could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachmentError {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A segment failed to open: the blob was altered, truncated, reordered
    /// or sealed under another key.
    #[error("the attachment was altered, truncated or reordered (its encryption does not verify)")]
    Tampered,
    /// The blob is longer than its size says.
    #[error("the attachment is longer than its sender said")]
    TooLong,
    /// The opened file does not have the SHA-256 its sender gave.
    #[error("the attachment does not match its sender's SHA-256")]
    Digest,
    /// The padding after the file is not zeros.
    #[error("the attachment's padding was altered")]
    Padding,
    /// The file to send changed size while it was read.
    #[error("the file changed while it was read; send it again")]
    FileChanged,
    /// A size or key that cannot be right.
    #[error("{0}")]
    Malformed(&'static str),
}

/// The plaintext length of segment `i` of a padded file of `padded`
/// bytes: [`SEGMENT`], or what is left for the last one.
fn segment_len(padded: u64, i: u64) -> Result<usize, AttachmentError> {
    usize::try_from(padded.saturating_sub(i.saturating_mul(SEGMENT as u64)).min(SEGMENT as u64))
        .map_err(|_| AttachmentError::Malformed("segment size"))
}

fn key_array(key: &AttachmentKey) -> Array<u8, aead_stream::aead::array::typenum::U32> {
    Array::from(*key.as_bytes())
}

/// Reads until `buf` is full or the reader ends; returns how much it read.
fn read_full(src: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Seals exactly `size` bytes read from `src` into `dst` under `key`;
/// returns the file's SHA-256. `progress` hears the plaintext bytes done.
///
/// # Errors
/// [`AttachmentError::Io`]; [`AttachmentError::FileChanged`] when `src`
/// holds fewer or more than `size` bytes.
pub fn seal(
    key: &AttachmentKey,
    size: u64,
    src: &mut impl Read,
    dst: &mut impl Write,
    progress: &mut dyn FnMut(u64),
) -> Result<[u8; 32], AttachmentError> {
    let total = segments(size);
    let padded = padded_len(size);
    let mut enc = Some(EncryptorBE32::<Aes256Gcm>::new(&key_array(key), &Array::default()));
    let mut hash = Sha256::new();
    let mut buf = Zeroizing::new(Vec::with_capacity(SEGMENT + TAG));
    let mut done: u64 = 0;
    for i in 0..total {
        let this = segment_len(padded, i)?;
        let from_file = usize::try_from(size.saturating_sub(done).min(this as u64))
            .map_err(|_| AttachmentError::Malformed("segment size"))?;
        buf.clear();
        buf.resize(this, 0);
        if read_full(src, &mut buf[..from_file])? != from_file {
            return Err(AttachmentError::FileChanged);
        }
        hash.update(&buf[..from_file]);
        done += from_file as u64;
        if i + 1 == total {
            let e = enc.take().ok_or(AttachmentError::Malformed("segment after the last"))?;
            e.encrypt_last_in_place(&[], &mut *buf).map_err(|_| AttachmentError::Malformed("segment too long"))?;
        } else {
            let e = enc.as_mut().ok_or(AttachmentError::Malformed("segment after the last"))?;
            e.encrypt_next_in_place(&[], &mut *buf).map_err(|_| AttachmentError::Malformed("too many segments"))?;
        }
        dst.write_all(&buf)?;
        progress(done);
    }
    let mut probe = [0u8; 1];
    if read_full(src, &mut probe)? != 0 {
        return Err(AttachmentError::FileChanged);
    }
    dst.flush()?;
    Ok(hash.finalize().into())
}

/// Opens a blob read from `src` (exactly [`blob_len`]`(size)` bytes) under
/// `key`, writing the file's `size` bytes to `dst` as segments verify, and
/// checks the padding and the SHA-256. On an error `dst` may hold a
/// verified prefix of the file: a caller writing where the user looks
/// removes it.
///
/// # Errors
/// [`AttachmentError::Tampered`] (also for a blob cut short),
/// [`AttachmentError::TooLong`], [`AttachmentError::Padding`],
/// [`AttachmentError::Digest`], [`AttachmentError::Io`].
pub fn open(
    key: &AttachmentKey,
    size: u64,
    digest: &[u8; 32],
    src: &mut impl Read,
    dst: &mut impl Write,
    progress: &mut dyn FnMut(u64),
) -> Result<(), AttachmentError> {
    let total = segments(size);
    let padded = padded_len(size);
    let mut dec = Some(DecryptorBE32::<Aes256Gcm>::new(&key_array(key), &Array::default()));
    let mut hash = Sha256::new();
    let mut buf = Zeroizing::new(Vec::with_capacity(SEGMENT + TAG));
    let mut done: u64 = 0;
    for i in 0..total {
        let this = segment_len(padded, i)?;
        buf.clear();
        buf.resize(this + TAG, 0);
        if read_full(src, &mut buf)? != this + TAG {
            return Err(AttachmentError::Tampered);
        }
        if i + 1 == total {
            let d = dec.take().ok_or(AttachmentError::Malformed("segment after the last"))?;
            d.decrypt_last_in_place(&[], &mut *buf).map_err(|_| AttachmentError::Tampered)?;
        } else {
            let d = dec.as_mut().ok_or(AttachmentError::Malformed("segment after the last"))?;
            d.decrypt_next_in_place(&[], &mut *buf).map_err(|_| AttachmentError::Tampered)?;
        }
        let from_file = usize::try_from(size.saturating_sub(done).min(buf.len() as u64))
            .map_err(|_| AttachmentError::Malformed("segment size"))?;
        let (file, pad) = buf.split_at(from_file);
        if pad.iter().any(|b| *b != 0) {
            return Err(AttachmentError::Padding);
        }
        hash.update(file);
        dst.write_all(file)?;
        done += from_file as u64;
        progress(done);
    }
    let mut probe = [0u8; 1];
    if read_full(src, &mut probe)? != 0 {
        return Err(AttachmentError::TooLong);
    }
    let got: [u8; 32] = hash.finalize().into();
    if !constant_time_eq(&got, digest) {
        return Err(AttachmentError::Digest);
    }
    dst.flush()?;
    Ok(())
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A file name from another person, made safe to create in a directory the
/// user chose: only its last path component, without control characters,
/// path separators or leading dots, at most 200 bytes, never empty.
pub fn safe_file_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut out: String = last
        .chars()
        .filter(|c| {
            !c.is_control()
                && !matches!(
                    c,
                    '/' | '\\'
                        | '\u{061c}'
                        | '\u{200b}'..='\u{200f}'
                        | '\u{202a}'..='\u{202e}'
                        | '\u{2066}'..='\u{2069}'
                        | '\u{feff}'
                )
        })
        .collect();
    let trimmed = out.trim_start_matches(['.', ' ']).trim_end_matches([' ', '.']).to_owned();
    out = trimmed;
    while out.len() > 200 {
        out.pop();
    }
    if out.is_empty() {
        "attachment".to_owned()
    } else {
        out
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sealed(size: usize) -> (AttachmentKey, Vec<u8>, Vec<u8>, [u8; 32]) {
        let key = AttachmentKey::random();
        let file: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
        let mut blob = Vec::new();
        let digest = seal(&key, size as u64, &mut &file[..], &mut blob, &mut |_| {}).expect("seal");
        (key, file, blob, digest)
    }

    #[test]
    fn round_trips_at_segment_edges() {
        for size in [0, 1, 4095, 4096, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT + 17, 1_000_000] {
            let (key, file, blob, digest) = sealed(size);
            assert_eq!(blob.len() as u64, blob_len(size as u64), "size {size}");
            assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&file)));
            let mut out = Vec::new();
            open(&key, size as u64, &digest, &mut &blob[..], &mut out, &mut |_| {}).expect("open");
            assert_eq!(out, file, "size {size}");
        }
    }

    #[test]
    fn sizes_leak_only_a_bucket() {
        assert_eq!(padded_len(0), MIN_PADDED);
        assert_eq!(padded_len(1), MIN_PADDED);
        assert_eq!(padded_len(100 << 20), 100 << 20);
        // Neighbouring sizes share a bucket.
        assert_eq!(padded_len(30_000_001), padded_len(30_100_000));
        for size in [5000u64, 123_456, 30 << 20, (30 << 20) + 1] {
            let p = padded_len(size);
            assert!(p >= size && p <= size + size / 8, "{size} -> {p}");
        }
    }

    #[test]
    fn tampering_is_detected() {
        let size = 3 * SEGMENT + 100;
        let (key, _, blob, digest) = sealed(size);
        let seg = SEGMENT + TAG;
        let open_blob = |b: &[u8]| open(&key, size as u64, &digest, &mut &b[..], &mut Vec::new(), &mut |_| {});
        // One flipped bit.
        let mut flipped = blob.clone();
        flipped[seg + 5] ^= 1;
        assert!(matches!(open_blob(&flipped), Err(AttachmentError::Tampered)));
        // Two segments swapped.
        let mut swapped = blob.clone();
        let (a, b) = swapped.split_at_mut(seg);
        a.swap_with_slice(&mut b[..seg]);
        assert!(matches!(open_blob(&swapped), Err(AttachmentError::Tampered)));
        // Cut after a whole segment: the next one is missing.
        assert!(matches!(open_blob(&blob[..2 * seg]), Err(AttachmentError::Tampered)));
        // A blob one segment shorter, presented as complete (its last
        // segment was sealed as "not last"): refused too.
        // Its digest is right for the shorter file: only the STREAM's
        // last-segment flag tells.
        let shorter = 2 * SEGMENT;
        let (k2, f2, b2, _) = sealed(shorter + SEGMENT);
        let d: [u8; 32] = Sha256::digest(&f2[..shorter]).into();
        assert!(matches!(
            open(&k2, shorter as u64, &d, &mut &b2[..2 * seg], &mut Vec::new(), &mut |_| {}),
            Err(AttachmentError::Tampered)
        ));
        // Trailing bytes.
        let mut longer = blob.clone();
        longer.push(0);
        assert!(matches!(open_blob(&longer), Err(AttachmentError::TooLong)));
        // Another key.
        let other = AttachmentKey::random();
        assert!(matches!(
            open(&other, size as u64, &digest, &mut &blob[..], &mut Vec::new(), &mut |_| {}),
            Err(AttachmentError::Tampered)
        ));
        // The right blob with another digest.
        assert!(matches!(
            open(&key, size as u64, &[0; 32], &mut &blob[..], &mut Vec::new(), &mut |_| {}),
            Err(AttachmentError::Digest)
        ));
        assert!(open_blob(&blob).is_ok());
    }

    #[test]
    fn a_file_that_changes_size_is_refused() {
        let key = AttachmentKey::random();
        let file = vec![1u8; 1000];
        assert!(matches!(
            seal(&key, 999, &mut &file[..], &mut Vec::new(), &mut |_| {}),
            Err(AttachmentError::FileChanged)
        ));
        assert!(matches!(
            seal(&key, 1001, &mut &file[..], &mut Vec::new(), &mut |_| {}),
            Err(AttachmentError::FileChanged)
        ));
    }

    #[test]
    fn names_are_made_safe() {
        assert_eq!(safe_file_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_file_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(safe_file_name(".bashrc"), "bashrc");
        assert_eq!(safe_file_name("a\u{1b}[31mb\nc.txt"), "a[31mbc.txt");
        assert_eq!(safe_file_name("evil\u{202e}txt.exe"), "eviltxt.exe");
        // Bidi isolates and the Arabic letter mark reorder text just as well.
        assert_eq!(safe_file_name("evil\u{2067}txt.exe"), "eviltxt.exe");
        assert_eq!(safe_file_name("a\u{061c}\u{2066}\u{2069}\u{200b}b.pdf"), "ab.pdf");
        assert_eq!(safe_file_name(""), "attachment");
        assert_eq!(safe_file_name("..."), "attachment");
        assert_eq!(safe_file_name("dir/"), "attachment");
        assert!(safe_file_name(&"x".repeat(1000)).len() <= 200);
        assert_eq!(safe_file_name("photo 1.jpg"), "photo 1.jpg");
    }

    #[test]
    fn keys_are_redacted() {
        let key = AttachmentKey::from_bytes([0x41; 32]);
        assert_eq!(format!("{key:?}"), "AttachmentKey(<redacted>)");
    }
}

//! An attachment blob's size as both sides compute it: the client seals a
//! file into exactly [`blob_len`] bytes, and the server, which sees only
//! blobs, turns its limit on files into a limit on blobs with the same
//! function (it grows with the file: a file at most N bytes long seals to
//! at most `blob_len(N)`).

/// Plaintext bytes per sealed segment.
pub const SEGMENT: usize = 64 * 1024;
/// The authentication tag each segment adds.
pub const TAG: usize = 16;
/// Files smaller than this are padded up to it (so tiny files all look alike).
pub const MIN_PADDED: u64 = 4096;

/// The padded plaintext length of a file of `size` bytes: Padmé (at most
/// about 12 % more, and a size leaks only O(log log size) bits), and at
/// least [`MIN_PADDED`].
pub fn padded_len(size: u64) -> u64 {
    let l = size.max(MIN_PADDED);
    // Padmé (Nikitin et al., "Reducing metadata leakage from encrypted
    // files and communication with PURBs"): keep the top bits of the
    // length, round the rest up.
    let e = 63 - u64::from(l.leading_zeros());
    let s = 64 - u64::from(e.leading_zeros());
    let last_bits = e - s;
    let mask = (1u64 << last_bits) - 1;
    l.checked_add(mask).map_or(l, |v| v & !mask)
}

/// How many segments a file of `size` bytes is sealed in.
pub fn segments(size: u64) -> u64 {
    padded_len(size).div_ceil(SEGMENT as u64).max(1)
}

/// The blob length of a file of `size` bytes: its padded length plus a tag
/// per segment.
pub fn blob_len(size: u64) -> u64 {
    padded_len(size).saturating_add(segments(size).saturating_mul(TAG as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A limit on files is a limit on blobs only because no larger file
    /// seals to a smaller blob.
    #[test]
    fn blob_len_never_shrinks_as_files_grow() {
        let mut last = 0;
        for size in (0..3_000_000u64).step_by(997).chain([100_000_000, 104_857_600, 104_857_601]) {
            let b = blob_len(size);
            assert!(b >= last && b >= size, "{size}: {b} after {last}");
            last = b;
        }
        // A file of an arbitrary size pads past it by more than the tags:
        // 100,000,000 bytes round up to 100,663,296.
        assert_eq!(padded_len(100_000_000), 100_663_296);
        assert_eq!(blob_len(1 << 20), (1 << 20) + 16 * 16);
    }
}

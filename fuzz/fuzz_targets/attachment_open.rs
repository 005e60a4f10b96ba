//! Attachment blobs come from the server (any bytes at all), opened under a
//! key, size and digest from a member's message (any values at all).
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_client::attachment::{open, AttachmentKey, blob_len};

fuzz_target!(|data: &[u8]| {
    if data.len() < 34 {
        return;
    }
    let (head, blob) = data.split_at(34);
    let key = AttachmentKey::from_bytes([head[0]; 32]);
    // A size near the blob's, so that whole segments get tried, or any size.
    let size = if head[1] & 1 == 0 {
        u64::from(head[1]) * 997 % (blob.len() as u64 + 1)
    } else {
        u64::from(u16::from_le_bytes([head[2], head[3]]))
    };
    let _ = blob_len(size);
    let digest = [head[4]; 32];
    let mut out = Vec::new();
    let _ = open(&key, size, &digest, &mut &blob[..], &mut out, &mut |_| {});
    assert!(out.len() as u64 <= size);
});

//! A Welcome part comes from any sender through the server (any bytes at
//! all): a reference decodes canonically or not at all, and a blob is
//! checked against it without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_proto::welcome_ref::{WelcomeRef, ENCODED_LEN, MAX_WELCOME_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = WelcomeRef::decode(data) {
        assert!(WelcomeRef::is_reference(data));
        assert!(r.size > 0 && r.size <= MAX_WELCOME_BYTES);
        assert_eq!(r.encode(), data);
    }
    // The rest of the input as the downloaded blob.
    if data.len() >= ENCODED_LEN {
        let (head, blob) = data.split_at(ENCODED_LEN);
        if let Ok(r) = WelcomeRef::decode(head) {
            let _ = r.check(blob);
        }
    }
});

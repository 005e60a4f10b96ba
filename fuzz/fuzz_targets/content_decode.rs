//! The plaintext decoder every application message goes through after MLS.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_core::content::Content;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Content::decode(data) {
        // What decodes must re-encode to something that decodes the same.
        if let Ok(bytes) = c.encode() {
            assert_eq!(Content::decode(&bytes).ok(), Some(c));
        }
    }
});

//! The call signal's payload (content kind 8), as a member sends it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_core::call::CallSignal;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = CallSignal::decode_v1(data) {
        // Canonical: what decodes re-encodes to the same bytes.
        let bytes = s.encode_payload().expect("a decoded signal encodes");
        assert_eq!(&bytes[1..], data);
    }
});

//! The MLS PrivateMessage framing the server reads from every commit.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = subrosa_proto::framing::private_framing(data) {
        assert!(f.group_id.len() < data.len());
    }
});

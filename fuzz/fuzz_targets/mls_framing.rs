//! The MLS PrivateMessage framing the server reads from every commit, and
//! the key package header it files each uploaded package's suite by.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = subrosa_proto::framing::private_framing(data) {
        assert!(f.group_id.len() < data.len());
    }
    if subrosa_proto::framing::key_package_suite(data).is_ok() {
        assert!(data.len() >= 8);
    }
});

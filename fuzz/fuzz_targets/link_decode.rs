//! Link codes are typed by people; link requests come from anyone via the server.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_core::link::{parse_link_code, LinkRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_link_code(s);
    }
    if let Ok(r) = LinkRequest::from_bytes(data) {
        let _ = r.handle();
        assert_eq!(r.to_bytes().ok().as_deref(), Some(data));
    }
});

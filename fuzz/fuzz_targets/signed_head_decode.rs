//! A signed directory head off the wire (gossiped by any member, or in a
//! server answer): decoding never panics and accepts only canonical bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use subrosa_proto::kt::SignedHead;

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = SignedHead::decode(data) {
        assert_eq!(head.encode(), data);
    }
});

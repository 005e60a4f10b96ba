//! A dangerous-link list file, as a user might be handed one (any bytes),
//! and the links of any text checked against a list.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_core::linklist::{self, LinkList};

fuzz_target!(|data: &[u8]| {
    // No key signs fuzzed bytes: everything must be refused, never panic.
    assert!(LinkList::verify(data, &[[7; 32], linklist::RELEASE_KEY]).is_err());
    let text = String::from_utf8_lossy(data);
    for link in linklist::links_in(&text) {
        let _ = linklist::expressions(link);
    }
});

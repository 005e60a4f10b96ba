//! A web page's HTML as the link-preview reader takes it (any bytes: the
//! site is anyone's).
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_core::preview::{MAX_DESCRIPTION_BYTES, MAX_TITLE_BYTES};

fuzz_target!(|data: &[u8]| {
    let e = subrosa_client::preview::extract(&String::from_utf8_lossy(data));
    assert!(e.title.is_none_or(|t| t.len() <= MAX_TITLE_BYTES));
    assert!(e.description.is_none_or(|d| d.len() <= MAX_DESCRIPTION_BYTES));
});

//! Session key cache entries are read from the kernel keyring, where any
//! process of the same user may have planted bytes of its choosing.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_client::keycache::entry_admits;

fuzz_target!(|data: &[u8]| {
    let _ = entry_admits(data, "correct horse battery staple");
    if let Some((&n, rest)) = data.split_first() {
        let (entry, pass) = rest.split_at((n as usize).min(rest.len()));
        if let Ok(pass) = std::str::from_utf8(pass) {
            let _ = entry_admits(entry, pass);
        }
    }
});

//! A text with a link preview (content kind 9), as a member sends it, and
//! the preview as the client store keeps it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_core::preview::LinkPreview;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((text, p))) = LinkPreview::decode_payload(data) {
        // Canonical: what decodes re-encodes to the same bytes.
        let bytes = p.encode_payload(&text).expect("a decoded preview encodes");
        assert_eq!(bytes, data);
        let stored = p.to_stored().expect("stores");
        assert_eq!(LinkPreview::from_stored(&stored).ok(), Some(p));
    }
    let _ = LinkPreview::from_stored(data);
});

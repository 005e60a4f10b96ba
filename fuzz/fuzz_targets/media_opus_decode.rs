//! What a member's frame carries once it authenticated: an Opus packet,
//! checked and decoded (and its FEC copy) by libopus. A member can send
//! anything.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_media::codec::{Decoder, FRAME_SAMPLES};

fuzz_target!(|data: &[u8]| {
    let Ok(mut decoder) = Decoder::new() else {
        return;
    };
    if let Ok(samples) = decoder.decode_fec(data) {
        assert_eq!(samples.len(), FRAME_SAMPLES);
    }
    if let Ok(samples) = decoder.decode(data) {
        assert_eq!(samples.len(), FRAME_SAMPLES);
    }
    if let Ok(samples) = decoder.conceal() {
        assert_eq!(samples.len(), FRAME_SAMPLES);
    }
});

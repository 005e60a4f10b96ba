//! The receiving end of a call: every datagram the relay forwards goes
//! through SFrame header parsing and authentication before anything else.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_media::secure::{ContextId, Epoch, EpochSecret, LeafIndex, Receiver, Sender};
use zeroize::Zeroizing;

fn secret() -> EpochSecret {
    EpochSecret::new(Zeroizing::new(vec![7; 16])).expect("16 bytes")
}

fuzz_target!(|data: &[u8]| {
    let mut receiver = Receiver::new(secret(), Epoch(3));
    // Open a genuine frame first, so the key cache and replay window are
    // in play for the fuzzed one.
    let mut sender = Sender::new(&secret(), Epoch(3), LeafIndex(1), ContextId::from_bits(9))
        .expect("sender");
    let genuine = sender.seal(b"frame").expect("seal");
    assert!(receiver.open(&genuine).is_ok());
    if let Ok(opened) = receiver.open(data) {
        // Only a frame sealed under the key can open; nothing here forges one.
        assert_eq!(opened.epoch, Epoch(3));
    }
});

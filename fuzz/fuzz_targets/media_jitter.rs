//! The jitter buffer takes sequence numbers from authenticated frames, but a
//! member chooses them: any order, gap or jump must leave it sound.
#![no_main]
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use subrosa_media::jitter::{JitterBuffer, JitterConfig, Playout};

fuzz_target!(|data: &[u8]| {
    let mut jb = JitterBuffer::new(JitterConfig::default());
    let mut clock = 0u64;
    for op in data.chunks(9) {
        if op.len() < 9 {
            break;
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&op[1..9]);
        let seq = u64::from_le_bytes(seq);
        clock = clock.saturating_add(u64::from(op[0] & 0x3f));
        if op[0] & 0x40 != 0 {
            jb.push(seq, vec![op[0]], Duration::from_millis(clock));
        }
        if op[0] & 0x80 != 0 {
            match jb.pop() {
                Playout::Fec { seq, .. } | Playout::Packet { seq, .. } => {
                    assert!(seq < u64::MAX);
                }
                Playout::Waiting | Playout::Conceal { .. } => {}
            }
        }
    }
});

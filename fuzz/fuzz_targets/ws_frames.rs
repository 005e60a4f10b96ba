//! The socket's binary frames (`subrosa_proto::frames`): the server decodes
//! every client frame from untrusted bytes, the client every server frame.
//! Neither may panic, and whatever decodes encodes back to the same bytes
//! (the decoders accept canonical frames only).
#![no_main]

use libfuzzer_sys::fuzz_target;
use subrosa_proto::frames::{ClientBin, ServerBin};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = ClientBin::decode(data) {
        assert_eq!(frame.encode().ok().as_deref(), Some(data));
    }
    if let Ok(frame) = ServerBin::decode(data) {
        let again = frame.encode().ok().and_then(|b| ServerBin::decode(&b).ok());
        assert_eq!(again, Some(frame));
    }
});

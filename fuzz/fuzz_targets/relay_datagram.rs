//! Every UDP datagram that reaches the call relay, from anyone.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_proto::relay::Datagram;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Datagram::decode(data) {
        // Decoding is strict: what decodes is exactly what it encodes to.
        assert_eq!(d.encode(), data);
    }
});

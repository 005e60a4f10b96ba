//! Device certificates arrive inside MLS credentials from any member.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_core::DeviceCertificate;

fuzz_target!(|data: &[u8]| {
    if let Ok(cert) = DeviceCertificate::from_bytes(data) {
        let _ = cert.verify(&subrosa_core::default_crypto());
        let _ = cert.address();
        // Only canonical encodings decode.
        assert_eq!(cert.to_bytes().ok().as_deref(), Some(data));
    }
});

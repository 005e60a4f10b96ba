//! Key packages come from the server, which may be hostile.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mls_rs::storage_provider::in_memory::{InMemoryGroupStateStorage, InMemoryKeyPackageStorage};
use subrosa_core::{DeviceIdentity, Engine};

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static ENGINE: Engine<subrosa_core::DefaultCrypto, InMemoryGroupStateStorage, InMemoryKeyPackageStorage> = {
            let crypto = subrosa_core::default_crypto();
            let id = DeviceIdentity::generate(&crypto, "fuzzer".parse().expect("handle"), 0).expect("identity");
            Engine::new(crypto, id, InMemoryGroupStateStorage::new(), InMemoryKeyPackageStorage::new())
        };
    }
    ENGINE.with(|e| {
        let _ = e.inspect_key_package(data);
        let _ = e.join(data);
    });
});

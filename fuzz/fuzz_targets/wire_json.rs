//! Every JSON body the server or the client decodes from the other side.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_proto::*;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<RegisterRequest>(data);
    let _ = serde_json::from_slice::<KeyPackageUpload>(data);
    let _ = serde_json::from_slice::<ClaimRequest>(data);
    let _ = serde_json::from_slice::<ClaimResponse>(data);
    let _ = serde_json::from_slice::<SendRequest>(data);
    let _ = serde_json::from_slice::<InboxResponse>(data);
    let _ = serde_json::from_slice::<AckRequest>(data);
    let _ = serde_json::from_slice::<ServerFrame>(data);
    let _ = serde_json::from_slice::<ClientFrame>(data);
    let _ = serde_json::from_slice::<ErrorBody>(data);
    let _ = serde_json::from_slice::<KeySetUpdate>(data);
    let _ = serde_json::from_slice::<AccountInfo>(data);
    let _ = serde_json::from_slice::<BlobCreate>(data);
});

//! Key-directory proofs come from the server: a lookup proof with every key
//! fetch, append-only proofs on every new epoch. Decoding and checking them
//! must refuse garbage without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subrosa_proto::kt::{KtAudit, KtLookup};
use subrosa_proto::{Handle, B64};

fuzz_target!(|data: &[u8]| {
    let (head, proof) = data.split_at(data.len().min(33));
    let epoch = u64::from(head.first().copied().unwrap_or(1));
    let root = B64(head.get(1..).unwrap_or_default().to_vec());
    let lookup = KtLookup { epoch, root_hash: root.clone(), proof: B64(proof.to_vec()), signed_head: None };
    let handle = Handle::new("alice").expect("handle");
    let vrf = [7u8; 32];
    assert!(subrosa_client::kt::verify_lookup(&vrf, &handle, b"ik", &[], Some(&lookup)).is_err());
    let audit = KtAudit { from: 1, to: 2, root_hashes: vec![root.clone(), root], proofs: vec![B64(proof.to_vec())] };
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let _ = rt.block_on(subrosa_client::kt::verify_audit(&audit, 1, 2));
});

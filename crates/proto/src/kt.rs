//! Key transparency: what the server's auditable key directory publishes.
//!
//! The directory (Meta's `akd`) maps each handle (the label) to a digest of
//! the account's public keys (the value, [`directory_value`]). Every change
//! to an account's keys is published in a new epoch whose root hash commits
//! to the whole directory; a lookup proof shows what a handle maps to at an
//! epoch, and an append-only proof shows that one epoch's directory only
//! grew into the next. The proofs are akd's protobuf encodings, opaque here.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v1/kt/head` | [`KtHead`] |
//! | `GET /v1/kt/lookup/{handle}` | [`KtLookup`] |
//! | `GET /v1/kt/audit?from=A&to=B` | [`KtAudit`] |
//!
//! All three are signed like every other request, except that `audit` and
//! `head` may also be called unsigned, so that anyone can audit.
//! [`crate::AccountInfo`] and [`crate::ClaimResponse`] carry a [`KtLookup`]
//! for the handle they describe.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{DeviceRecord, B64};

/// akd's domain-separation label for Subrosa's directory. Server and
/// clients use `akd::ExperimentalConfiguration<L>` (akd 0.13, feature
/// `experimental`) with an `L: akd::DomainLabel` returning these bytes.
pub const AKD_DOMAIN_LABEL: &[u8] = b"subrosa key directory v1";

/// The most epochs one `audit` request may span.
pub const MAX_AUDIT_EPOCHS: u64 = 64;

/// The directory's current epoch, its root hash and its VRF public key
/// (a client pins the VRF key the first time it sees it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KtHead {
    /// The latest published epoch (0 before the first publish).
    pub epoch: u64,
    /// The root hash of that epoch (32 bytes).
    pub root_hash: B64,
    /// The VRF public key that hides labels in the tree.
    pub vrf_public_key: B64,
}

/// A lookup proof for one handle at one epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KtLookup {
    /// The epoch the proof is for.
    pub epoch: u64,
    /// That epoch's root hash (32 bytes).
    pub root_hash: B64,
    /// akd's `LookupProof`, protobuf-encoded.
    pub proof: B64,
}

/// Append-only proofs from epoch `from` to epoch `to`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KtAudit {
    /// The first epoch (at least 1).
    pub from: u64,
    /// The last epoch, at most [`MAX_AUDIT_EPOCHS`] after `from`.
    pub to: u64,
    /// The root hashes of epochs `from..=to`, in order.
    pub root_hashes: Vec<B64>,
    /// `proofs[i]` shows that epoch `from + i` grew into `from + i + 1`:
    /// akd's `SingleAppendOnlyProof`, protobuf-encoded. One fewer than
    /// `root_hashes`.
    pub proofs: Vec<B64>,
}

/// The directory value for an account: SHA-256 over a domain separator, the
/// identity key and every device record, sorted by device id, each field
/// length-prefixed. Adding, removing or changing a device, or the identity
/// key, changes it; both the server (when it publishes) and the clients
/// (when they check a lookup) compute it.
pub fn directory_value(identity_key: &[u8], devices: &[DeviceRecord]) -> [u8; 32] {
    let mut sorted: Vec<&DeviceRecord> = devices.iter().collect();
    sorted.sort_by_key(|d| d.device_id);
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(b"subrosa directory value v1");
    field(identity_key);
    for d in sorted {
        field(d.device_id.as_bytes());
        field(d.signature_key.as_slice());
        field(d.certificate.as_slice());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceId;

    fn device(id: u8, key: u8) -> DeviceRecord {
        DeviceRecord {
            device_id: DeviceId([id; 8]),
            signature_key: B64(vec![key; 32]),
            certificate: B64(vec![key ^ 1; 70]),
        }
    }

    #[test]
    fn value_ignores_order_but_not_content() {
        let (a, b) = (device(1, 10), device(2, 20));
        let v = directory_value(b"ik", &[a.clone(), b.clone()]);
        assert_eq!(v, directory_value(b"ik", &[b.clone(), a.clone()]));
        assert_ne!(v, directory_value(b"ik", std::slice::from_ref(&a)));
        assert_ne!(v, directory_value(b"other", &[a.clone(), b.clone()]));
        assert_ne!(v, directory_value(b"ik", &[a, device(2, 21)]));
    }
}

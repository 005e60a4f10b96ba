//! Safety numbers: what two people compare to know they hold each other's
//! real identity keys.
//!
//! The construction is Signal's numeric fingerprint: for each party, SHA-512
//! iterated 5,200 times over a domain label, its identity key and its handle;
//! the first 30 bytes become 30 digits (six 5-byte chunks, each mod 100,000).
//! The two halves are ordered so both sides print the same 60 digits. Only
//! account identity keys go in, so linking a device does not change it.

use sha2::{Digest, Sha512};
use subrosa_proto::Handle;

const ITERATIONS: usize = 5200;
const LABEL: &[u8] = b"subrosa-safety-number-v1";

fn half(identity_key: &[u8], handle: &Handle) -> String {
    let mut hash = Sha512::new()
        .chain_update(LABEL)
        .chain_update((identity_key.len() as u32).to_be_bytes())
        .chain_update(identity_key)
        .chain_update(handle.as_str().as_bytes())
        .finalize();
    for _ in 0..ITERATIONS {
        hash = Sha512::new().chain_update(hash).chain_update(identity_key).finalize();
    }
    hash[..30]
        .chunks(5)
        .map(|c| {
            let v = c.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            format!("{:05}", v % 100_000)
        })
        .collect()
}

/// The 60-digit safety number of two accounts, the same on both sides.
pub fn safety_number(a: (&Handle, &[u8]), b: (&Handle, &[u8])) -> String {
    let (x, y) = (half(a.1, a.0), half(b.1, b.0));
    if x <= y {
        x + &y
    } else {
        y + &x
    }
}

/// The number in twelve groups of five digits, for reading aloud.
pub fn grouped(number: &str) -> String {
    number.as_bytes().chunks(5).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(" ")
}

/// A short fingerprint of one device key, for telling devices apart in a
/// list: the first 8 bytes of its SHA-256, in groups of four hex digits.
/// (Not a substitute for the safety number, which covers the account.)
pub fn key_fingerprint(key: &[u8]) -> String {
    let digest = sha2::Sha256::digest(key);
    let hex = hex::encode(&digest[..8]);
    hex.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_sixty_digits_and_sensitive_to_keys_and_handles() {
        let (alice, bob) = (Handle::new("alice").expect("h"), Handle::new("bob").expect("h"));
        let n = safety_number((&alice, &[1; 32]), (&bob, &[2; 32]));
        assert_eq!(n.len(), 60);
        assert!(n.chars().all(|c| c.is_ascii_digit()));
        assert_eq!(n, safety_number((&bob, &[2; 32]), (&alice, &[1; 32])));
        assert_ne!(n, safety_number((&alice, &[1; 32]), (&bob, &[3; 32])));
        assert_ne!(n, safety_number((&alice, &[1; 32]), (&Handle::new("bobby").expect("h"), &[2; 32])));
        assert_eq!(grouped(&n).split(' ').count(), 12);
        let f = key_fingerprint(&[1; 32]);
        assert_eq!(f.len(), 19);
        assert_ne!(f, key_fingerprint(&[2; 32]));
    }
}

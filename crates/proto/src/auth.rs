//! Signed requests.
//!
//! The server stores no passwords. Every request carries the sending device's
//! address, a timestamp, a random nonce and an Ed25519 signature by the
//! device's key over [`canonical_request`]. The server refuses a timestamp
//! more than [`MAX_CLOCK_SKEW_MS`] from its clock and a nonce it has seen, so a
//! captured request cannot be replayed.

use sha2::{Digest, Sha256};

/// Header: the sending device's handle.
pub const HEADER_HANDLE: &str = "x-subrosa-handle";
/// Header: the sending device's id (hex).
pub const HEADER_DEVICE: &str = "x-subrosa-device";
/// Header: ms since the Unix epoch when the request was signed.
pub const HEADER_TIMESTAMP: &str = "x-subrosa-timestamp";
/// Header: 16 random bytes (hex), unique per request.
pub const HEADER_NONCE: &str = "x-subrosa-nonce";
/// Header: base64 Ed25519 signature over [`canonical_request`].
pub const HEADER_SIGNATURE: &str = "x-subrosa-signature";

/// How far a request's timestamp may be from the server's clock.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// The values of the signature headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// Handle text.
    pub handle: String,
    /// Device id text.
    pub device: String,
    /// Timestamp, ms.
    pub timestamp: u64,
    /// Nonce, hex.
    pub nonce: String,
}

/// SHA-256 of a request body, hex.
pub fn body_digest(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The exact bytes a device signs for one request. The domain-separation
/// prefix keeps these signatures from ever being valid as MLS signatures
/// (which are made over a labelled, length-prefixed structure).
pub fn canonical_request(method: &str, path_and_query: &str, h: &SignedHeaders, body: &[u8]) -> Vec<u8> {
    format!(
        "subrosa-request-v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path_and_query,
        h.handle,
        h.device,
        h.timestamp,
        h.nonce,
        body_digest(body)
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_binds_every_field() {
        let h = SignedHeaders { handle: "alice".into(), device: "00".repeat(8), timestamp: 5, nonce: "ab".into() };
        let base = canonical_request("post", "/v1/messages", &h, b"{}");
        assert!(base.starts_with(b"subrosa-request-v1\nPOST\n/v1/messages\nalice\n"));
        assert_ne!(base, canonical_request("POST", "/v1/inbox", &h, b"{}"));
        assert_ne!(base, canonical_request("POST", "/v1/messages", &h, b"{ }"));
        let h2 = SignedHeaders { timestamp: 6, ..h.clone() };
        assert_ne!(base, canonical_request("POST", "/v1/messages", &h2, b"{}"));
    }
}

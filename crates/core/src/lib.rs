//! The Subrosa protocol engine, without I/O.
//!
//! It holds no sockets and no files: callers hand it bytes and storage
//! handles (mls-rs's storage traits, implemented by the client over its
//! encrypted database) and get bytes and events back. The same engine serves
//! the command line, the server-side tests and, later, the web client.
//!
//! - [`identity`]: the account identity key, device keys and the device
//!   certificate that binds them; the MLS identity provider that checks it.
//! - [`call`]: call signalling (offer, answer, hang-up), a content kind.
//! - [`content`]: the versioned, padded plaintext inside every application message.
//! - [`safety`]: safety numbers from two accounts' identity keys.
//! - [`link`]: linking a new device to an account.
//! - [`preview`]: a text with its sender's preview of its first link.
//! - [`linklist`]: the signed list of dangerous links, checked on the device.
//! - [`engine`]: MLS conversations (RFC 9420 via mls-rs): create, join, commit,
//!   encrypt, decrypt.

pub mod attachment;
pub mod call;
pub mod content;
pub mod engine;
mod error;
pub mod identity;
pub mod link;
pub mod linklist;
#[cfg(any(feature = "rustcrypto", test))]
pub mod pq;
pub mod preview;
pub mod safety;

pub use engine::{
    key_package_suite, CallKeying, ConversationInfo, ConversationKind, Engine, Event, GroupVersions, LastVersions,
    MemberInfo, OutgoingCommit, StateVersion,
};
pub use error::CoreError;
pub use identity::{DeviceCertificate, DeviceIdentity};
pub use mls_rs::CipherSuite;

/// The classical ciphersuite: MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519.
/// Conversations created before post-quantum ones, and those with a device
/// that cannot do [`PQ_CIPHERSUITE`], use it; device signature keys,
/// certificates and request signatures are its Ed25519 in both suites.
pub const CIPHERSUITE: mls_rs::CipherSuite = mls_rs::CipherSuite::CURVE25519_AES128;

/// The post-quantum ciphersuite of every new conversation whose devices can
/// all do it: suite 1 with its KEM replaced by the hybrid of ML-KEM-768 and
/// X25519 (mls-rs's X-Wing-style combiner; code point 65100 of mls-rs, in
/// the private range, no standard one being assigned yet).
pub const PQ_CIPHERSUITE: mls_rs::CipherSuite = mls_rs::CipherSuite::new(65100);

/// The suites a device of this build can take part in, best first.
pub const SUITES: [mls_rs::CipherSuite; 2] = [PQ_CIPHERSUITE, CIPHERSUITE];

/// A short name for a suite, as `subrosa members` shows it.
pub fn suite_name(suite: mls_rs::CipherSuite) -> &'static str {
    if suite == PQ_CIPHERSUITE {
        "ML-KEM-768+X25519 (post-quantum)"
    } else if suite == CIPHERSUITE {
        "X25519 (classical)"
    } else {
        "unknown"
    }
}

/// The crypto provider the native clients use.
#[cfg(feature = "awslc")]
pub type DefaultCrypto = mls_rs_crypto_awslc::AwsLcCryptoProvider;

/// A fresh instance of the default crypto provider.
#[cfg(feature = "awslc")]
pub fn default_crypto() -> DefaultCrypto {
    mls_rs_crypto_awslc::AwsLcCryptoProvider::default()
}

/// The pure-Rust crypto provider (RustCrypto): the WebAssembly client's,
/// since AWS-LC does not build for wasm32. It is RustCrypto's provider with
/// suite 65100 added ([`pq`]). Both providers speak both suites and
/// interoperate (see the interop tests).
#[cfg(feature = "rustcrypto")]
pub type RustCrypto = pq::RustCryptoPq;

/// Fills `buf` with random bytes from the crypto provider.
///
/// # Errors
/// [`CoreError::Crypto`] if the provider's random source fails.
pub fn random_bytes<C: mls_rs::CryptoProvider>(crypto: &C, buf: &mut [u8]) -> Result<(), CoreError> {
    use mls_rs::CipherSuiteProvider as _;
    let cs = crypto.cipher_suite_provider(CIPHERSUITE).ok_or(CoreError::Bug("ciphersuite unsupported by provider"))?;
    cs.random_bytes(buf).map_err(|e| CoreError::Crypto(format!("{e:?}")))
}

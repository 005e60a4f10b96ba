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
pub mod preview;
pub mod safety;

pub use engine::{CallKeying, ConversationInfo, ConversationKind, Engine, Event, MemberInfo, OutgoingCommit};
pub use error::CoreError;
pub use identity::{DeviceCertificate, DeviceIdentity};

/// The one ciphersuite Subrosa speaks: MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519.
pub const CIPHERSUITE: mls_rs::CipherSuite = mls_rs::CipherSuite::CURVE25519_AES128;

/// The crypto provider the native clients use.
#[cfg(feature = "awslc")]
pub type DefaultCrypto = mls_rs_crypto_awslc::AwsLcCryptoProvider;

/// A fresh instance of the default crypto provider.
#[cfg(feature = "awslc")]
pub fn default_crypto() -> DefaultCrypto {
    mls_rs_crypto_awslc::AwsLcCryptoProvider::default()
}

/// The pure-Rust crypto provider (RustCrypto): the WebAssembly client's,
/// since AWS-LC does not build for wasm32. Both providers speak the same
/// ciphersuite and interoperate (see the interop test).
#[cfg(feature = "rustcrypto")]
pub type RustCrypto = mls_rs_crypto_rustcrypto::RustCryptoProvider;

/// Fills `buf` with random bytes from the crypto provider.
///
/// # Errors
/// [`CoreError::Crypto`] if the provider's random source fails.
pub fn random_bytes<C: mls_rs::CryptoProvider>(crypto: &C, buf: &mut [u8]) -> Result<(), CoreError> {
    use mls_rs::CipherSuiteProvider as _;
    let cs = crypto.cipher_suite_provider(CIPHERSUITE).ok_or(CoreError::Bug("ciphersuite unsupported by provider"))?;
    cs.random_bytes(buf).map_err(|e| CoreError::Crypto(format!("{e:?}")))
}

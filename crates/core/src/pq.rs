//! The post-quantum suite on the pure-Rust provider.
//!
//! mls-rs-crypto-awslc (the native clients' provider) offers suite 65100:
//! MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519 with its KEM replaced by a
//! hybrid of ML-KEM-768 and X25519, put together by mls-rs-crypto-hpke's
//! X-Wing-style combiner (the shared secret is SHA3-256 over a label, both
//! shared secrets, the X25519 ciphertext and public key; key pairs are
//! derived through SHAKE128). mls-rs-crypto-rustcrypto, which the web
//! client uses because AWS-LC does not build for wasm32, has no ML-KEM.
//! [`RustCryptoPq`] is that provider with the same combiner over RustCrypto's
//! pure-Rust `ml-kem`; every other suite goes to `RustCryptoProvider`
//! unchanged. Nothing here is cryptography of our own: the combiner, HPKE,
//! ML-KEM, X25519, SHA3 and SHAKE are the crates'; this module only plugs
//! them together the way the AWS-LC provider does, so that the two are
//! byte-compatible (see the cross-provider tests in `engine.rs`).
//!
//! Keys are in the same formats as AWS-LC's: an ML-KEM-768 public key of
//! 1184 bytes and its FIPS 203 expanded secret key of 2400 bytes, followed by
//! the X25519 key, so a secret key derived on one provider is the same bytes
//! on the other.

use mls_rs_core::crypto::{
    CipherSuite, CipherSuiteProvider, CryptoProvider, HpkeCiphertext, HpkePsk, HpkePublicKey, HpkeSecretKey,
    SignaturePublicKey, SignatureSecretKey,
};
use mls_rs_core::error::IntoAnyError;
use mls_rs_crypto_hpke::dhkem::DhKem;
use mls_rs_crypto_hpke::kem_combiner::xwing::{CombinedKem, XWingSharedSecretHashInput};
use mls_rs_crypto_hpke::kem_combiner::FixedLengthKemType;
use mls_rs_crypto_rustcrypto::aead::Aead;
use mls_rs_crypto_rustcrypto::ecdh::Ecdh;
use mls_rs_crypto_rustcrypto::kdf::Kdf;
use mls_rs_crypto_rustcrypto::{RustCryptoCipherSuite, RustCryptoError, RustCryptoProvider};
use mls_rs_crypto_traits::{KdfType, KemId, KemResult, KemType};
use zeroize::Zeroizing;

use crate::PQ_CIPHERSUITE;

/// The classical suite the hybrid one is built on (its signature scheme,
/// KDF, AEAD, hash and X25519 half).
const BASE: CipherSuite = CipherSuite::CURVE25519_AES128;

/// ML-KEM-768 sizes (FIPS 203, table 3).
const MLKEM768_PUBLIC: usize = 1184;
const MLKEM768_SECRET: usize = 2400;
const MLKEM768_CIPHERTEXT: usize = 1088;
/// ML-KEM's key generation seed, d || z.
const MLKEM_SEED: usize = 64;

/// What can go wrong in the ML-KEM half.
#[derive(Debug, thiserror::Error)]
pub enum MlKemError {
    /// A key or ciphertext of the wrong length, or a public key that fails
    /// FIPS 203's modulus check.
    #[error("invalid ML-KEM key or ciphertext")]
    InvalidKey,
    /// The system's random generator failed.
    #[error("random generator: {0}")]
    Random(String),
    /// Expanding a seed of another length failed.
    #[error("seed expansion")]
    Kdf,
}

impl IntoAnyError for MlKemError {
    fn into_dyn_error(self) -> Result<Box<dyn std::error::Error + Send + Sync>, Self> {
        Ok(self.into())
    }
}

fn random<const N: usize>() -> Result<[u8; N], MlKemError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| MlKemError::Random(e.to_string()))?;
    Ok(out)
}

/// ML-KEM-768 as an HPKE KEM, over RustCrypto's `ml-kem`, with the key
/// derivation and formats of the AWS-LC provider's `MlKemKem`.
#[derive(Clone, Debug)]
pub struct MlKem768 {
    /// Expands a derivation seed that is not exactly [`MLKEM_SEED`] bytes.
    kdf: Kdf,
}

impl MlKem768 {
    fn new() -> Option<Self> {
        Some(MlKem768 { kdf: Kdf::new(BASE)? })
    }

    /// The key pair of a 64-byte seed `d || z` (FIPS 203 ML-KEM.KeyGen_internal).
    #[allow(deprecated)] // the expanded secret key: AWS-LC's format, see the module docs
    fn key_pair(seed: &[u8; MLKEM_SEED]) -> (HpkeSecretKey, HpkePublicKey) {
        use ml_kem::{ExpandedKeyEncoding as _, KeyExport as _};
        let dk = ml_kem::DecapsulationKey768::from_seed((*seed).into());
        let secret = dk.to_expanded_bytes();
        let public = dk.encapsulation_key().to_bytes();
        (HpkeSecretKey::from(secret.to_vec()), HpkePublicKey::from(public.to_vec()))
    }

    /// Encapsulation with the given 32 random bytes `m` (FIPS 203
    /// ML-KEM.Encaps_internal): what [`KemType::encap`] does with fresh
    /// randomness, and what a known-answer test does with fixed bytes.
    ///
    /// # Errors
    /// [`MlKemError::InvalidKey`] for a malformed public key.
    pub fn encap_with(&self, remote_key: &HpkePublicKey, m: &[u8; 32]) -> Result<KemResult, MlKemError> {
        let bytes: &[u8; MLKEM768_PUBLIC] = remote_key.as_ref().try_into().map_err(|_| MlKemError::InvalidKey)?;
        let ek = ml_kem::EncapsulationKey768::new(&(*bytes).into()).map_err(|_| MlKemError::InvalidKey)?;
        let (ct, shared) = ek.encapsulate_deterministic(&(*m).into());
        Ok(KemResult { enc: ct.to_vec(), shared_secret: shared.to_vec() })
    }
}

impl KemType for MlKem768 {
    type Error = MlKemError;

    fn kem_id(&self) -> u16 {
        // As AWS-LC's ML-KEM (no code point is assigned); the combiner
        // states its own.
        15
    }

    fn generate_deterministic(&self, ikm: &[u8]) -> Result<(HpkeSecretKey, HpkePublicKey), MlKemError> {
        let seed: Zeroizing<[u8; MLKEM_SEED]> = match ikm.try_into() {
            Ok(s) => Zeroizing::new(s),
            Err(_) => {
                let wide = self.kdf.expand(ikm, &[], MLKEM_SEED).map_err(|_| MlKemError::Kdf)?;
                Zeroizing::new(wide.as_slice().try_into().map_err(|_| MlKemError::Kdf)?)
            }
        };
        Ok(Self::key_pair(&seed))
    }

    fn generate(&self) -> Result<(HpkeSecretKey, HpkePublicKey), MlKemError> {
        let seed = Zeroizing::new(random::<MLKEM_SEED>()?);
        Ok(Self::key_pair(&seed))
    }

    fn public_key_validate(&self, key: &HpkePublicKey) -> Result<(), MlKemError> {
        let bytes: &[u8; MLKEM768_PUBLIC] = key.as_ref().try_into().map_err(|_| MlKemError::InvalidKey)?;
        ml_kem::EncapsulationKey768::new(&(*bytes).into()).map(|_| ()).map_err(|_| MlKemError::InvalidKey)
    }

    fn encap(&self, remote_key: &HpkePublicKey) -> Result<KemResult, MlKemError> {
        let m = Zeroizing::new(random::<32>()?);
        self.encap_with(remote_key, &m)
    }

    #[allow(deprecated)] // the expanded secret key: AWS-LC's format, see the module docs
    fn decap(&self, enc: &[u8], secret_key: &HpkeSecretKey, _local: &HpkePublicKey) -> Result<Vec<u8>, MlKemError> {
        use ml_kem::{Decapsulate as _, ExpandedKeyEncoding as _};
        let sk: &[u8; MLKEM768_SECRET] = secret_key.as_ref().try_into().map_err(|_| MlKemError::InvalidKey)?;
        let dk = ml_kem::DecapsulationKey768::from_expanded_bytes(&(*sk).into()).map_err(|_| MlKemError::InvalidKey)?;
        let ct: &[u8; MLKEM768_CIPHERTEXT] = enc.try_into().map_err(|_| MlKemError::InvalidKey)?;
        Ok(dk.decapsulate(&(*ct).into()).to_vec())
    }

    fn seed_length_for_derive(&self) -> usize {
        MLKEM_SEED
    }
}

impl FixedLengthKemType for MlKem768 {
    fn public_key_size(&self) -> usize {
        MLKEM768_PUBLIC
    }

    fn secret_key_size(&self) -> usize {
        MLKEM768_SECRET
    }

    fn enc_size(&self) -> usize {
        MLKEM768_CIPHERTEXT
    }
}

/// SHA3-256, the combiner's hash.
#[derive(Clone, Copy, Debug)]
pub struct Sha3_256;

/// SHAKE128, the combiner's seed expansion.
#[derive(Clone, Copy, Debug)]
pub struct Shake128;

/// Hashing cannot fail; the traits still want an error type.
#[derive(Debug, thiserror::Error)]
#[error("hash")]
pub struct HashError;

impl IntoAnyError for HashError {
    fn into_dyn_error(self) -> Result<Box<dyn std::error::Error + Send + Sync>, Self> {
        Ok(self.into())
    }
}

impl mls_rs_crypto_traits::Hash for Sha3_256 {
    type Error = HashError;

    fn hash(&self, input: &[u8]) -> Result<Vec<u8>, HashError> {
        use sha3::Digest as _;
        Ok(sha3::Sha3_256::digest(input).to_vec())
    }
}

impl mls_rs_crypto_traits::VariableLengthHash for Shake128 {
    type Error = HashError;

    fn hash(&self, input: &[u8], out_len: usize) -> Result<Vec<u8>, HashError> {
        use shake::digest::{ExtendableOutput as _, Update as _, XofReader as _};
        let mut xof = shake::Shake128::default();
        xof.update(input);
        let mut out = vec![0u8; out_len];
        xof.finalize_xof().read(&mut out);
        Ok(out)
    }
}

/// The X25519 half: the same HPKE DHKEM as the classical suite's.
type X25519Kem = DhKem<Ecdh, Kdf>;

/// ML-KEM-768 + X25519 as the AWS-LC provider combines them.
pub type HybridKem = CombinedKem<MlKem768, X25519Kem, Sha3_256, Shake128, XWingSharedSecretHashInput>;

/// The hybrid KEM of suite 65100.
///
/// # Errors
/// `None` only if the underlying crates lack X25519 or HKDF-SHA256.
pub fn hybrid_kem() -> Option<HybridKem> {
    let kem_id = KemId::new(BASE)?;
    let x25519 = DhKem::new(Ecdh::new(BASE)?, Kdf::new(BASE)?, kem_id as u16, kem_id.n_secret());
    Some(CombinedKem::new_xwing(MlKem768::new()?, x25519, Sha3_256, Shake128))
}

/// `RustCryptoProvider` plus suite 65100 (see the module docs).
#[derive(Clone, Debug)]
pub struct RustCryptoPq {
    classical: RustCryptoProvider,
}

impl Default for RustCryptoPq {
    fn default() -> Self {
        RustCryptoPq { classical: RustCryptoProvider::new() }
    }
}

impl RustCryptoPq {
    /// The provider with every suite it supports.
    pub fn new() -> Self {
        Self::default()
    }
}

/// A suite of [`RustCryptoPq`]: one of RustCrypto's own, or the hybrid one
/// (RustCrypto's suite 1 with the hybrid KEM, naming itself 65100).
#[derive(Clone)]
pub enum RustCryptoPqSuite {
    /// A suite `RustCryptoProvider` has.
    Classical(<RustCryptoProvider as CryptoProvider>::CipherSuiteProvider),
    /// Suite 65100.
    Hybrid(RustCryptoCipherSuite<HybridKem, Kdf, Aead>),
}

impl std::fmt::Debug for RustCryptoPqSuite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RustCryptoPqSuite").field(&self.cipher_suite()).finish()
    }
}

impl CryptoProvider for RustCryptoPq {
    type CipherSuiteProvider = RustCryptoPqSuite;

    fn supported_cipher_suites(&self) -> Vec<CipherSuite> {
        let mut all = self.classical.supported_cipher_suites();
        all.push(PQ_CIPHERSUITE);
        all
    }

    fn cipher_suite_provider(&self, cipher_suite: CipherSuite) -> Option<RustCryptoPqSuite> {
        if cipher_suite == PQ_CIPHERSUITE {
            let suite = RustCryptoCipherSuite::new(BASE, hybrid_kem()?, Kdf::new(BASE)?, Aead::new(BASE)?)?;
            return Some(RustCryptoPqSuite::Hybrid(suite));
        }
        self.classical.cipher_suite_provider(cipher_suite).map(RustCryptoPqSuite::Classical)
    }
}

/// Runs `$body` on whichever suite `$self` is.
macro_rules! either {
    ($self:ident, $s:ident => $body:expr) => {
        match $self {
            RustCryptoPqSuite::Classical($s) => $body,
            RustCryptoPqSuite::Hybrid($s) => $body,
        }
    };
}

impl CipherSuiteProvider for RustCryptoPqSuite {
    type Error = RustCryptoError;
    type HpkeContextS = mls_rs_crypto_hpke::context::ContextS<Kdf, Aead>;
    type HpkeContextR = mls_rs_crypto_hpke::context::ContextR<Kdf, Aead>;

    fn cipher_suite(&self) -> CipherSuite {
        match self {
            RustCryptoPqSuite::Classical(s) => s.cipher_suite(),
            RustCryptoPqSuite::Hybrid(_) => PQ_CIPHERSUITE,
        }
    }

    fn hash(&self, data: &[u8]) -> Result<Vec<u8>, Self::Error> {
        either!(self, s => s.hash(data))
    }

    fn mac(&self, key: &[u8], data: &[u8]) -> Result<Vec<u8>, Self::Error> {
        either!(self, s => s.mac(key, data))
    }

    fn aead_seal(&self, key: &[u8], data: &[u8], aad: Option<&[u8]>, nonce: &[u8]) -> Result<Vec<u8>, Self::Error> {
        either!(self, s => s.aead_seal(key, data, aad, nonce))
    }

    fn aead_open(
        &self,
        key: &[u8],
        ciphertext: &[u8],
        aad: Option<&[u8]>,
        nonce: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Self::Error> {
        either!(self, s => s.aead_open(key, ciphertext, aad, nonce))
    }

    fn aead_key_size(&self) -> usize {
        either!(self, s => s.aead_key_size())
    }

    fn aead_nonce_size(&self) -> usize {
        either!(self, s => s.aead_nonce_size())
    }

    fn kdf_extract(&self, salt: &[u8], ikm: &[u8]) -> Result<Zeroizing<Vec<u8>>, Self::Error> {
        either!(self, s => s.kdf_extract(salt, ikm))
    }

    fn kdf_expand(&self, prk: &[u8], info: &[u8], len: usize) -> Result<Zeroizing<Vec<u8>>, Self::Error> {
        either!(self, s => s.kdf_expand(prk, info, len))
    }

    fn kdf_extract_size(&self) -> usize {
        either!(self, s => s.kdf_extract_size())
    }

    fn hpke_seal(
        &self,
        remote_key: &HpkePublicKey,
        info: &[u8],
        aad: Option<&[u8]>,
        pt: &[u8],
    ) -> Result<HpkeCiphertext, Self::Error> {
        either!(self, s => s.hpke_seal(remote_key, info, aad, pt))
    }

    fn hpke_seal_psk(
        &self,
        remote_key: &HpkePublicKey,
        info: &[u8],
        aad: Option<&[u8]>,
        pt: &[u8],
        psk: HpkePsk<'_>,
    ) -> Result<HpkeCiphertext, Self::Error> {
        either!(self, s => s.hpke_seal_psk(remote_key, info, aad, pt, psk))
    }

    fn hpke_open(
        &self,
        ciphertext: &HpkeCiphertext,
        local_secret: &HpkeSecretKey,
        local_public: &HpkePublicKey,
        info: &[u8],
        aad: Option<&[u8]>,
    ) -> Result<Zeroizing<Vec<u8>>, Self::Error> {
        either!(self, s => s.hpke_open(ciphertext, local_secret, local_public, info, aad))
    }

    fn hpke_open_psk(
        &self,
        ciphertext: &HpkeCiphertext,
        local_secret: &HpkeSecretKey,
        local_public: &HpkePublicKey,
        info: &[u8],
        aad: Option<&[u8]>,
        psk: HpkePsk<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, Self::Error> {
        either!(self, s => s.hpke_open_psk(ciphertext, local_secret, local_public, info, aad, psk))
    }

    fn hpke_setup_s(
        &self,
        remote_key: &HpkePublicKey,
        info: &[u8],
    ) -> Result<(Vec<u8>, Self::HpkeContextS), Self::Error> {
        either!(self, s => s.hpke_setup_s(remote_key, info))
    }

    fn hpke_setup_r(
        &self,
        kem_output: &[u8],
        local_secret: &HpkeSecretKey,
        local_public: &HpkePublicKey,
        info: &[u8],
    ) -> Result<Self::HpkeContextR, Self::Error> {
        either!(self, s => s.hpke_setup_r(kem_output, local_secret, local_public, info))
    }

    fn kem_derive(&self, ikm: &[u8]) -> Result<(HpkeSecretKey, HpkePublicKey), Self::Error> {
        either!(self, s => s.kem_derive(ikm))
    }

    fn kem_generate(&self) -> Result<(HpkeSecretKey, HpkePublicKey), Self::Error> {
        either!(self, s => s.kem_generate())
    }

    fn kem_public_key_validate(&self, key: &HpkePublicKey) -> Result<(), Self::Error> {
        either!(self, s => s.kem_public_key_validate(key))
    }

    fn random_bytes(&self, out: &mut [u8]) -> Result<(), Self::Error> {
        either!(self, s => CipherSuiteProvider::random_bytes(s, out))
    }

    fn signature_key_generate(&self) -> Result<(SignatureSecretKey, SignaturePublicKey), Self::Error> {
        either!(self, s => s.signature_key_generate())
    }

    fn signature_key_derive_public(&self, secret_key: &SignatureSecretKey) -> Result<SignaturePublicKey, Self::Error> {
        either!(self, s => s.signature_key_derive_public(secret_key))
    }

    fn sign(&self, secret_key: &SignatureSecretKey, data: &[u8]) -> Result<Vec<u8>, Self::Error> {
        either!(self, s => s.sign(secret_key, data))
    }

    fn verify(&self, public_key: &SignaturePublicKey, signature: &[u8], data: &[u8]) -> Result<(), Self::Error> {
        either!(self, s => s.verify(public_key, signature, data))
    }
}

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

/// The pure-Rust suite 65100 against AWS-LC's, below MLS: the same keys
/// from the same seed, and what one side encapsulates the other opens.
#[cfg(all(test, feature = "awslc"))]
mod tests {
    use super::*;
    use mls_rs_crypto_awslc::AwsLcCryptoProvider;

    fn ours() -> RustCryptoPqSuite {
        RustCryptoPq::new().cipher_suite_provider(PQ_CIPHERSUITE).expect("65100 on RustCrypto")
    }

    fn aws() -> <AwsLcCryptoProvider as CryptoProvider>::CipherSuiteProvider {
        AwsLcCryptoProvider::new().cipher_suite_provider(PQ_CIPHERSUITE).expect("65100 on AWS-LC")
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(bytes))
    }

    /// Known answer: the key pair MLS derives from a path secret is the
    /// same bytes on both providers (else a commit from one could not be
    /// processed by the other), pinned here so that a change of either
    /// side's derivation shows.
    #[test]
    fn both_providers_derive_the_same_hybrid_key_pair() {
        let ikm = [7u8; 32];
        let (sk, pk) = ours().kem_derive(&ikm).expect("derive");
        let (aws_sk, aws_pk) = aws().kem_derive(&ikm).expect("derive");
        assert_eq!(pk.as_ref(), aws_pk.as_ref(), "public keys");
        assert_eq!(sk.as_ref(), aws_sk.as_ref(), "secret keys (AWS-LC's expanded ML-KEM format)");
        assert_eq!((pk.len(), sk.len()), (MLKEM768_PUBLIC + 32, MLKEM768_SECRET + 32));
        assert_eq!(sha256_hex(&pk), KNOWN_PUBLIC_SHA256);
        assert_eq!(ours().cipher_suite(), PQ_CIPHERSUITE);
        assert!(RustCryptoPq::new().supported_cipher_suites().contains(&PQ_CIPHERSUITE));
        // Every other suite is RustCrypto's own.
        let classical = RustCryptoPq::new().cipher_suite_provider(crate::CIPHERSUITE).expect("suite 1");
        assert!(matches!(classical, RustCryptoPqSuite::Classical(_)));
        assert_eq!(classical.cipher_suite(), crate::CIPHERSUITE);
    }

    /// SHA-256 of the public key both providers derive from `[7; 32]`
    /// (recorded from them, which agree with each other).
    const KNOWN_PUBLIC_SHA256: &str = "82fbbd99d8146f3fb2da1f9873fee27420d7c4e0c6699cc66176887f666b3b8d";

    /// `sealer` encrypts to a key pair of `opener`'s, which decrypts;
    /// a flipped bit of the ML-KEM ciphertext is refused.
    fn seal_and_open<A: CipherSuiteProvider, B: CipherSuiteProvider>(sealer: &A, opener: &B) {
        let Ok((sk, pk)) = opener.kem_generate() else { panic!("key pair") };
        let Ok(ct) = sealer.hpke_seal(&pk, b"info", Some(b"aad"), b"a welcome secret") else { panic!("seal") };
        let Ok(pt) = opener.hpke_open(&ct, &sk, &pk, b"info", Some(b"aad")) else { panic!("open") };
        assert_eq!(pt.as_slice(), b"a welcome secret");
        let mut bad = ct.clone();
        bad.kem_output[5] ^= 1;
        assert!(opener.hpke_open(&bad, &sk, &pk, b"info", Some(b"aad")).is_err());
        assert_eq!(ct.kem_output.len(), MLKEM768_CIPHERTEXT + 32);
    }

    #[test]
    fn what_one_provider_seals_the_other_opens() {
        seal_and_open(&ours(), &aws());
        seal_and_open(&aws(), &ours());
        seal_and_open(&ours(), &ours());
    }

    /// Known answer for ML-KEM-768 alone: encapsulation with fixed
    /// randomness here, decapsulation by AWS-LC.
    #[test]
    fn a_fixed_encapsulation_decapsulates_on_aws_lc() {
        let seed = [3u8; MLKEM_SEED];
        let (sk, pk) = MlKem768::key_pair(&seed);
        let kem = MlKem768::new().expect("kem");
        let out = kem.encap_with(&pk, &[9u8; 32]).expect("encap");
        assert_eq!(out.enc.len(), MLKEM768_CIPHERTEXT);
        let again = kem.encap_with(&pk, &[9u8; 32]).expect("encap");
        assert_eq!(out.enc, again.enc, "deterministic for fixed randomness");
        let aws = mls_rs_crypto_awslc::MlKemKem::new(mls_rs::CipherSuite::ML_KEM_768).expect("AWS-LC ML-KEM");
        let (aws_sk, aws_pk) = aws.generate_deterministic(&seed).expect("derive");
        assert_eq!((aws_sk.as_ref(), aws_pk.as_ref()), (sk.as_ref(), pk.as_ref()));
        assert_eq!(aws.decap(&out.enc, &sk, &pk).expect("decap"), out.shared_secret);
        assert_eq!(kem.decap(&out.enc, &sk, &pk).expect("decap"), out.shared_secret);
        assert_eq!(sha256_hex(&out.shared_secret), KNOWN_SHARED_SHA256);
        // And the other way: AWS-LC encapsulates, we decapsulate.
        let theirs = aws.encap(&pk).expect("encap");
        assert_eq!(kem.decap(&theirs.enc, &sk, &pk).expect("decap"), theirs.shared_secret);
        assert!(kem.encap_with(&HpkePublicKey::from(vec![0u8; 10]), &[0; 32]).is_err());
        assert!(kem.decap(&out.enc[1..], &sk, &pk).is_err());
    }

    /// SHA-256 of the shared secret of seed `[3; 64]` and randomness
    /// `[9; 32]` (recorded; AWS-LC decapsulates the same one).
    const KNOWN_SHARED_SHA256: &str = "bca6e9dd6c11c6fcd6ecf3ab08e4be9aed3730e9aaa20f313c4be211ffe17829";
}

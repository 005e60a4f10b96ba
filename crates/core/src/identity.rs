//! Account identity key, device keys, and the certificate binding them.
//!
//! An account has one identity key (Ed25519). Each device has its own
//! signature key, which is its MLS signature key and signs its requests to
//! the server. The identity key certifies each device key with a
//! [`DeviceCertificate`]; the certificate travels as the device's MLS
//! credential, and [`CertificateIdentityProvider`] refuses any member whose
//! certificate does not verify or does not match its MLS signature key. So a
//! device the server invents cannot join a conversation. Safety numbers are
//! computed from identity keys, so they do not change when devices are added.

use mls_rs::crypto::{SignaturePublicKey, SignatureSecretKey};
use mls_rs::identity::basic::BasicCredential;
use mls_rs::identity::{CredentialType, SigningIdentity};
use mls_rs::time::MlsTime;
use mls_rs::{CipherSuiteProvider, CryptoProvider, ExtensionList, IdentityProvider};
use mls_rs_codec::{MlsDecode, MlsEncode, MlsSize};
use mls_rs_core::identity::MemberValidationContext;
use subrosa_proto::{DeviceAddress, DeviceId, Handle};
use zeroize::Zeroizing;

use crate::{CoreError, CIPHERSUITE};

const CERT_LABEL_V1: &[u8] = b"subrosa-device-certificate-v1";
const CERT_LABEL_V2: &[u8] = b"subrosa-device-certificate-v2";
/// Version 1: no suites listed (the device speaks the classical suite only).
const CERT_V1: u8 = 1;
/// Version 2 adds the MLS ciphersuites the device can take part in, so the
/// directory (which carries every certificate) says which devices can do
/// post-quantum conversations, signed by the identity key.
const CERT_V2: u8 = 2;

#[derive(Clone, PartialEq, Eq)]
struct CertBody {
    version: u8,
    handle: Vec<u8>,
    device_id: [u8; 8],
    identity_key: Vec<u8>,
    device_key: Vec<u8>,
    issued_at_ms: u64,
    /// Version 2 only (empty in version 1).
    suites: Vec<u16>,
}

impl MlsSize for CertBody {
    fn mls_encoded_len(&self) -> usize {
        let v2 = if self.version >= CERT_V2 { self.suites.mls_encoded_len() } else { 0 };
        self.version.mls_encoded_len()
            + self.handle.mls_encoded_len()
            + self.device_id.mls_encoded_len()
            + self.identity_key.mls_encoded_len()
            + self.device_key.mls_encoded_len()
            + self.issued_at_ms.mls_encoded_len()
            + v2
    }
}

impl MlsEncode for CertBody {
    fn mls_encode(&self, writer: &mut Vec<u8>) -> Result<(), mls_rs_codec::Error> {
        self.version.mls_encode(writer)?;
        self.handle.mls_encode(writer)?;
        self.device_id.mls_encode(writer)?;
        self.identity_key.mls_encode(writer)?;
        self.device_key.mls_encode(writer)?;
        self.issued_at_ms.mls_encode(writer)?;
        if self.version >= CERT_V2 {
            self.suites.mls_encode(writer)?;
        }
        Ok(())
    }
}

impl MlsDecode for CertBody {
    fn mls_decode(reader: &mut &[u8]) -> Result<Self, mls_rs_codec::Error> {
        let version = u8::mls_decode(reader)?;
        let handle = Vec::mls_decode(reader)?;
        let device_id = <[u8; 8]>::mls_decode(reader)?;
        let identity_key = Vec::mls_decode(reader)?;
        let device_key = Vec::mls_decode(reader)?;
        let issued_at_ms = u64::mls_decode(reader)?;
        let suites = if version >= CERT_V2 { Vec::mls_decode(reader)? } else { Vec::new() };
        Ok(CertBody { version, handle, device_id, identity_key, device_key, issued_at_ms, suites })
    }
}

#[derive(Clone, PartialEq, Eq, MlsSize, MlsEncode, MlsDecode)]
struct CertWire {
    body: CertBody,
    signature: Vec<u8>,
}

/// The account identity key's statement "this device key belongs to this
/// handle's device". Verified by every client before it accepts a member.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceCertificate {
    body: CertBody,
    signature: Vec<u8>,
    // Validated from body.handle when built.
    handle: Handle,
}

impl std::fmt::Debug for DeviceCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCertificate")
            .field("handle", &String::from_utf8_lossy(&self.body.handle))
            .field("device_id", &hex::encode(self.body.device_id))
            .finish_non_exhaustive()
    }
}

fn suite<C: CryptoProvider>(crypto: &C) -> Result<C::CipherSuiteProvider, CoreError> {
    crypto.cipher_suite_provider(CIPHERSUITE).ok_or(CoreError::Bug("ciphersuite unsupported by provider"))
}

fn signed_bytes(body: &CertBody) -> Result<Vec<u8>, CoreError> {
    let mut out = if body.version == CERT_V1 { CERT_LABEL_V1 } else { CERT_LABEL_V2 }.to_vec();
    body.mls_encode(&mut out).map_err(|_| CoreError::Bug("certificate encoding"))?;
    Ok(out)
}

impl DeviceCertificate {
    /// Issues a certificate for `device_key`, signed by the identity key.
    ///
    /// # Errors
    /// [`CoreError::Crypto`] when signing fails.
    pub fn issue<C: CryptoProvider>(
        crypto: &C,
        handle: &Handle,
        device_id: DeviceId,
        identity_public: &SignaturePublicKey,
        identity_secret: &SignatureSecretKey,
        device_key: &SignaturePublicKey,
        issued_at_ms: u64,
    ) -> Result<Self, CoreError> {
        let body = CertBody {
            version: CERT_V2,
            handle: handle.as_str().as_bytes().to_vec(),
            device_id: device_id.0,
            identity_key: identity_public.to_vec(),
            device_key: device_key.to_vec(),
            issued_at_ms,
            suites: crate::SUITES.iter().map(|s| u16::from(*s)).collect(),
        };
        let signature = suite(crypto)?
            .sign(identity_secret, &signed_bytes(&body)?)
            .map_err(|e| CoreError::Crypto(format!("{e:?}")))?;
        Ok(DeviceCertificate { body, signature, handle: handle.clone() })
    }

    /// Decodes untrusted bytes. Does not verify: call [`Self::verify`].
    ///
    /// # Errors
    /// [`CoreError::Malformed`].
    pub fn from_bytes(mut bytes: &[u8]) -> Result<Self, CoreError> {
        let all = bytes;
        let wire = CertWire::mls_decode(&mut bytes).map_err(|_| CoreError::Malformed("device certificate"))?;
        let canonical = wire.mls_encode_to_vec().map_err(|_| CoreError::Bug("certificate encoding"))?;
        let version_ok = wire.body.version == CERT_V1 || wire.body.version == CERT_V2;
        if !bytes.is_empty() || !version_ok || canonical != all {
            return Err(CoreError::Malformed("device certificate"));
        }
        let text =
            std::str::from_utf8(&wire.body.handle).map_err(|_| CoreError::Malformed("device certificate handle"))?;
        let handle = Handle::new(text).map_err(|_| CoreError::Malformed("device certificate handle"))?;
        if handle.as_str() != text {
            return Err(CoreError::Malformed("device certificate handle"));
        }
        Ok(DeviceCertificate { body: wire.body, signature: wire.signature, handle })
    }

    /// Encodes.
    ///
    /// # Errors
    /// Only on a bug.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CoreError> {
        CertWire { body: self.body.clone(), signature: self.signature.clone() }
            .mls_encode_to_vec()
            .map_err(|_| CoreError::Bug("certificate encoding"))
    }

    /// Checks the signature by the identity key named inside.
    ///
    /// # Errors
    /// [`CoreError::BadSignature`].
    pub fn verify<C: CryptoProvider>(&self, crypto: &C) -> Result<(), CoreError> {
        let key = SignaturePublicKey::new(self.body.identity_key.clone());
        suite(crypto)?
            .verify(&key, &self.signature, &signed_bytes(&self.body)?)
            .map_err(|_| CoreError::BadSignature("device certificate"))
    }

    /// The handle it certifies a device of.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
    /// The device id.
    pub fn device_id(&self) -> DeviceId {
        DeviceId(self.body.device_id)
    }
    /// The device address.
    pub fn address(&self) -> DeviceAddress {
        DeviceAddress { handle: self.handle(), device: self.device_id() }
    }
    /// The certifying identity public key.
    pub fn identity_key(&self) -> &[u8] {
        &self.body.identity_key
    }
    /// The certified device signature key.
    pub fn device_key(&self) -> &[u8] {
        &self.body.device_key
    }
    /// Whether the identity key states that the device can take part in
    /// conversations of `suite`. A version 1 certificate (issued before
    /// post-quantum conversations) speaks the classical suite only.
    pub fn supports(&self, suite: mls_rs::CipherSuite) -> bool {
        if self.body.version == CERT_V1 {
            return suite == CIPHERSUITE;
        }
        self.body.suites.contains(&u16::from(suite))
    }

    /// Reads the certificate of a member already in a group's roster. mls-rs
    /// admitted the member only after [`CertificateIdentityProvider`] checked
    /// it fully, so decoding suffices; re-verifying every signature on every
    /// commit would cost O(members) signature checks per message.
    ///
    /// # Errors
    /// [`CoreError::Malformed`].
    pub fn of_roster_member(si: &SigningIdentity) -> Result<Self, CoreError> {
        let basic = si.credential.as_basic().ok_or(CoreError::Malformed("credential type"))?;
        Self::from_bytes(basic.identifier())
    }

    /// Extracts and fully checks the certificate carried as an MLS credential:
    /// well-formed, signed by its identity key, and certifying exactly the
    /// signature key the member signs with.
    ///
    /// # Errors
    /// [`CoreError::Malformed`], [`CoreError::BadSignature`] or [`CoreError::IdentityMismatch`].
    pub fn from_signing_identity<C: CryptoProvider>(crypto: &C, si: &SigningIdentity) -> Result<Self, CoreError> {
        let basic = si.credential.as_basic().ok_or(CoreError::Malformed("credential type"))?;
        let cert = Self::from_bytes(basic.identifier())?;
        cert.verify(crypto)?;
        if cert.body.device_key != si.signature_key.as_bytes() {
            return Err(CoreError::IdentityMismatch("certificate is for another device key".into()));
        }
        Ok(cert)
    }
}

/// This device's keys and certificate. Secret halves are zeroized on drop
/// (mls-rs's `SignatureSecretKey` is `ZeroizeOnDrop`) and never printed.
#[derive(Clone)]
pub struct DeviceIdentity {
    handle: Handle,
    device_id: DeviceId,
    identity_public: SignaturePublicKey,
    identity_secret: SignatureSecretKey,
    device_public: SignaturePublicKey,
    device_secret: SignatureSecretKey,
    certificate: DeviceCertificate,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("handle", &self.handle)
            .field("device_id", &self.device_id)
            .field("secrets", &"<redacted>")
            .finish()
    }
}

#[derive(MlsSize, MlsEncode, MlsDecode)]
struct StoredIdentity {
    version: u8,
    identity_public: Vec<u8>,
    identity_secret: SignatureSecretKey,
    device_public: Vec<u8>,
    device_secret: SignatureSecretKey,
    certificate: Vec<u8>,
}

impl DeviceIdentity {
    /// Generates a new account identity key and a first device.
    ///
    /// # Errors
    /// [`CoreError::Crypto`] when key generation fails.
    pub fn generate<C: CryptoProvider>(crypto: &C, handle: Handle, now_ms: u64) -> Result<Self, CoreError> {
        let cs = suite(crypto)?;
        let (identity_secret, identity_public) =
            cs.signature_key_generate().map_err(|e| CoreError::Crypto(format!("{e:?}")))?;
        let (device_secret, device_public) =
            cs.signature_key_generate().map_err(|e| CoreError::Crypto(format!("{e:?}")))?;
        let mut id = [0u8; 8];
        cs.random_bytes(&mut id).map_err(|e| CoreError::Crypto(format!("{e:?}")))?;
        let device_id = DeviceId(id);
        let certificate = DeviceCertificate::issue(
            crypto,
            &handle,
            device_id,
            &identity_public,
            &identity_secret,
            &device_public,
            now_ms,
        )?;
        Ok(DeviceIdentity {
            handle,
            device_id,
            identity_public,
            identity_secret,
            device_public,
            device_secret,
            certificate,
        })
    }

    /// This device under a new account identity key: a fresh identity key
    /// pair and a certificate by it for this device's unchanged signature
    /// key. Other devices of the account are certified with
    /// [`Self::certify`] on the result.
    ///
    /// # Errors
    /// [`CoreError::Crypto`].
    pub fn with_new_identity_key<C: CryptoProvider>(&self, crypto: &C, now_ms: u64) -> Result<Self, CoreError> {
        let (identity_secret, identity_public) =
            suite(crypto)?.signature_key_generate().map_err(|e| CoreError::Crypto(format!("{e:?}")))?;
        let certificate = DeviceCertificate::issue(
            crypto,
            &self.handle,
            self.device_id,
            &identity_public,
            &identity_secret,
            &self.device_public,
            now_ms,
        )?;
        Ok(DeviceIdentity {
            handle: self.handle.clone(),
            device_id: self.device_id,
            identity_public,
            identity_secret,
            device_public: self.device_public.clone(),
            device_secret: self.device_secret.clone(),
            certificate,
        })
    }

    /// This device with a fresh signature key, certified by the account's
    /// identity key (`devices rekey`).
    ///
    /// # Errors
    /// [`CoreError::Crypto`].
    pub fn with_new_device_key<C: CryptoProvider>(&self, crypto: &C, now_ms: u64) -> Result<Self, CoreError> {
        let (device_secret, device_public) =
            suite(crypto)?.signature_key_generate().map_err(|e| CoreError::Crypto(format!("{e:?}")))?;
        let certificate = self.certify(crypto, self.device_id, &device_public, now_ms)?;
        Ok(DeviceIdentity { device_public, device_secret, certificate, ..self.clone() })
    }

    /// This device under an identity key another device of the account
    /// rotated to and handed over: `certificate` must certify this device's
    /// own signature key by `identity_public`, and the secret must match.
    ///
    /// # Errors
    /// [`CoreError::IdentityMismatch`] or [`CoreError::BadSignature`].
    pub fn adopt_identity_key<C: CryptoProvider>(
        &self,
        crypto: &C,
        identity_public: &[u8],
        identity_secret: &[u8],
        certificate: &[u8],
    ) -> Result<Self, CoreError> {
        let certificate = DeviceCertificate::from_bytes(certificate)?;
        if certificate.handle() != self.handle || certificate.device_id() != self.device_id {
            return Err(CoreError::IdentityMismatch("the certificate is for another device".into()));
        }
        let identity_secret = SignatureSecretKey::new(identity_secret.to_vec());
        let identity_public = SignaturePublicKey::new(identity_public.to_vec());
        // The secret must be the public key's: a signature by it verifies.
        let probe = suite(crypto)?
            .sign(&identity_secret, b"subrosa identity key handover check")
            .map_err(|e| CoreError::Crypto(format!("{e:?}")))?;
        suite(crypto)?
            .verify(&identity_public, &probe, b"subrosa identity key handover check")
            .map_err(|_| CoreError::IdentityMismatch("the handed-over identity key pair does not match".into()))?;
        Self::from_parts(
            crypto,
            identity_public,
            identity_secret,
            self.device_public.clone(),
            self.device_secret.clone(),
            certificate,
        )
    }

    /// The account identity secret key's bytes, only to hand it to another
    /// device of the account inside end-to-end encryption.
    pub fn identity_secret_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.identity_secret.as_bytes().to_vec())
    }

    /// Serialises the secrets for the encrypted local store.
    ///
    /// # Errors
    /// Only on a bug.
    pub fn to_secret_bytes(&self) -> Result<Zeroizing<Vec<u8>>, CoreError> {
        let stored = StoredIdentity {
            version: 1,
            identity_public: self.identity_public.to_vec(),
            identity_secret: self.identity_secret.clone(),
            device_public: self.device_public.to_vec(),
            device_secret: self.device_secret.clone(),
            certificate: self.certificate.to_bytes()?,
        };
        stored.mls_encode_to_vec().map(Zeroizing::new).map_err(|_| CoreError::Bug("identity encoding"))
    }

    /// Restores from [`Self::to_secret_bytes`].
    ///
    /// # Errors
    /// [`CoreError::Malformed`] when the bytes are not a stored identity.
    pub fn from_secret_bytes<C: CryptoProvider>(crypto: &C, mut bytes: &[u8]) -> Result<Self, CoreError> {
        let s = StoredIdentity::mls_decode(&mut bytes).map_err(|_| CoreError::Malformed("stored identity"))?;
        if s.version != 1 {
            return Err(CoreError::Malformed("stored identity version"));
        }
        let certificate = DeviceCertificate::from_bytes(&s.certificate)?;
        certificate.verify(crypto)?;
        Ok(DeviceIdentity {
            handle: certificate.handle(),
            device_id: certificate.device_id(),
            identity_public: SignaturePublicKey::new(s.identity_public),
            identity_secret: s.identity_secret,
            device_public: SignaturePublicKey::new(s.device_public),
            device_secret: s.device_secret,
            certificate,
        })
    }

    /// The account handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        self.device_id
    }
    /// This device's address.
    pub fn address(&self) -> DeviceAddress {
        DeviceAddress { handle: self.handle.clone(), device: self.device_id }
    }
    /// The account identity public key.
    pub fn identity_public(&self) -> &[u8] {
        self.identity_public.as_bytes()
    }
    /// This device's signature public key.
    pub fn device_public(&self) -> &[u8] {
        self.device_public.as_bytes()
    }
    /// This device's certificate.
    pub fn certificate(&self) -> &DeviceCertificate {
        &self.certificate
    }
    pub(crate) fn device_secret(&self) -> &SignatureSecretKey {
        &self.device_secret
    }

    pub(crate) fn identity_secret(&self) -> &SignatureSecretKey {
        &self.identity_secret
    }

    /// Certifies another device key of this account with the identity key.
    ///
    /// # Errors
    /// [`CoreError::Crypto`].
    pub fn certify<C: CryptoProvider>(
        &self,
        crypto: &C,
        device_id: DeviceId,
        device_key: &SignaturePublicKey,
        now_ms: u64,
    ) -> Result<DeviceCertificate, CoreError> {
        DeviceCertificate::issue(
            crypto,
            &self.handle,
            device_id,
            &self.identity_public,
            &self.identity_secret,
            device_key,
            now_ms,
        )
    }

    /// Assembles a linked device's identity from its parts (checked).
    ///
    /// # Errors
    /// [`CoreError::BadSignature`] or [`CoreError::IdentityMismatch`].
    pub(crate) fn from_parts<C: CryptoProvider>(
        crypto: &C,
        identity_public: SignaturePublicKey,
        identity_secret: SignatureSecretKey,
        device_public: SignaturePublicKey,
        device_secret: SignatureSecretKey,
        certificate: DeviceCertificate,
    ) -> Result<Self, CoreError> {
        certificate.verify(crypto)?;
        if certificate.identity_key() != identity_public.as_bytes()
            || certificate.device_key() != device_public.as_bytes()
        {
            return Err(CoreError::IdentityMismatch("certificate does not match the keys".into()));
        }
        Ok(DeviceIdentity {
            handle: certificate.handle(),
            device_id: certificate.device_id(),
            identity_public,
            identity_secret,
            device_public,
            device_secret,
            certificate,
        })
    }

    /// The MLS signing identity: the certificate as a basic credential.
    ///
    /// # Errors
    /// Only on a bug.
    pub fn signing_identity(&self) -> Result<SigningIdentity, CoreError> {
        Ok(SigningIdentity::new(
            BasicCredential::new(self.certificate.to_bytes()?).into_credential(),
            self.device_public.clone(),
        ))
    }

    /// Signs bytes with the device key (requests to the server).
    ///
    /// # Errors
    /// [`CoreError::Crypto`].
    pub fn sign_with_device<C: CryptoProvider>(&self, crypto: &C, data: &[u8]) -> Result<Vec<u8>, CoreError> {
        suite(crypto)?.sign(&self.device_secret, data).map_err(|e| CoreError::Crypto(format!("{e:?}")))
    }
}

/// Most certificates a [`CertCache`] holds; past it, it starts afresh (a
/// cache miss costs one decode and one signature check, nothing else).
/// Room for a few groups of 10,000 devices.
const CERT_CACHE_MAX: usize = 1 << 16;

/// Certificates already decoded, and whether their signature by the
/// identity key named inside verified, by their exact bytes (which hold
/// that identity key, the device key and the signature): so each
/// (identity key, certificate) is verified once, not at every load of a
/// group, every message and every commit, which made the cost of each grow
/// with the group. Shared by an engine's clones; public keys and
/// signatures only, nothing secret.
#[derive(Debug, Default)]
pub struct CertCache {
    entries: std::sync::Mutex<std::collections::HashMap<Box<[u8]>, CachedCert>>,
    /// Signature checks made (a figure for tests and benchmarks).
    checks: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Clone)]
struct CachedCert {
    cert: std::sync::Arc<DeviceCertificate>,
    /// The signature by the identity key inside verified.
    signature_ok: bool,
}

impl CertCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Box<[u8]>, CachedCert>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, bytes: &[u8], entry: CachedCert) {
        let mut map = self.lock();
        if map.len() >= CERT_CACHE_MAX && !map.contains_key(bytes) {
            map.clear();
        }
        map.insert(bytes.into(), entry);
    }

    /// The certificate in these bytes, decoded once (not verified).
    ///
    /// # Errors
    /// [`CoreError::Malformed`].
    pub fn decode(&self, bytes: &[u8]) -> Result<std::sync::Arc<DeviceCertificate>, CoreError> {
        if let Some(e) = self.lock().get(bytes) {
            return Ok(e.cert.clone());
        }
        let cert = std::sync::Arc::new(DeviceCertificate::from_bytes(bytes)?);
        self.remember(bytes, CachedCert { cert: cert.clone(), signature_ok: false });
        Ok(cert)
    }

    /// The certificate in these bytes, its signature verified once; a
    /// failed check is not remembered (it fails again, at its full cost).
    ///
    /// # Errors
    /// [`CoreError::Malformed`] or [`CoreError::BadSignature`].
    pub fn verified<C: CryptoProvider>(
        &self,
        crypto: &C,
        bytes: &[u8],
    ) -> Result<std::sync::Arc<DeviceCertificate>, CoreError> {
        let cert = match self.lock().get(bytes) {
            Some(CachedCert { cert, signature_ok: true }) => return Ok(cert.clone()),
            Some(CachedCert { cert, .. }) => cert.clone(),
            None => std::sync::Arc::new(DeviceCertificate::from_bytes(bytes)?),
        };
        // Outside the lock: members of a large tree are checked in parallel.
        self.checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        cert.verify(crypto)?;
        self.remember(bytes, CachedCert { cert: cert.clone(), signature_ok: true });
        Ok(cert)
    }

    /// The roster member's certificate (decoded once, not verified: see
    /// [`DeviceCertificate::of_roster_member`]).
    ///
    /// # Errors
    /// [`CoreError::Malformed`].
    pub fn of_roster_member(&self, si: &SigningIdentity) -> Result<std::sync::Arc<DeviceCertificate>, CoreError> {
        let basic = si.credential.as_basic().ok_or(CoreError::Malformed("credential type"))?;
        self.decode(basic.identifier())
    }

    /// As [`DeviceCertificate::from_signing_identity`], each certificate's
    /// signature verified once.
    ///
    /// # Errors
    /// [`CoreError::Malformed`], [`CoreError::BadSignature`] or [`CoreError::IdentityMismatch`].
    pub fn from_signing_identity<C: CryptoProvider>(
        &self,
        crypto: &C,
        si: &SigningIdentity,
    ) -> Result<std::sync::Arc<DeviceCertificate>, CoreError> {
        let basic = si.credential.as_basic().ok_or(CoreError::Malformed("credential type"))?;
        let cert = self.verified(crypto, basic.identifier())?;
        if cert.body.device_key != si.signature_key.as_bytes() {
            return Err(CoreError::IdentityMismatch("certificate is for another device key".into()));
        }
        Ok(cert)
    }

    /// How many signature checks it made.
    pub fn checks(&self) -> u64 {
        self.checks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many certificates it holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The MLS identity provider: a member is valid only with a verifying
/// [`DeviceCertificate`] for its exact signature key.
#[derive(Clone, Debug)]
pub struct CertificateIdentityProvider<C> {
    crypto: C,
    cache: std::sync::Arc<CertCache>,
}

impl<C> CertificateIdentityProvider<C> {
    /// Wraps a crypto provider, with a cache of its own.
    pub fn new(crypto: C) -> Self {
        Self::with_cache(crypto, std::sync::Arc::new(CertCache::new()))
    }

    /// Wraps a crypto provider, remembering certificates in `cache`.
    pub fn with_cache(crypto: C, cache: std::sync::Arc<CertCache>) -> Self {
        CertificateIdentityProvider { crypto, cache }
    }
}

impl mls_rs_core::error::IntoAnyError for CoreError {
    fn into_dyn_error(self) -> Result<Box<dyn std::error::Error + Send + Sync>, Self> {
        Ok(Box::new(self))
    }
}

impl<C: CryptoProvider + Clone> IdentityProvider for CertificateIdentityProvider<C> {
    type Error = CoreError;

    fn validate_member(
        &self,
        signing_identity: &SigningIdentity,
        _timestamp: Option<MlsTime>,
        _context: MemberValidationContext<'_>,
    ) -> Result<(), Self::Error> {
        self.cache.from_signing_identity(&self.crypto, signing_identity).map(|_| ())
    }

    fn validate_external_sender(
        &self,
        _signing_identity: &SigningIdentity,
        _timestamp: Option<MlsTime>,
        _extensions: Option<&ExtensionList>,
    ) -> Result<(), Self::Error> {
        // Subrosa has no external senders: the server may never propose.
        Err(CoreError::IdentityMismatch("external senders are not allowed".into()))
    }

    fn identity(
        &self,
        signing_identity: &SigningIdentity,
        _extensions: &ExtensionList,
    ) -> Result<Vec<u8>, Self::Error> {
        // identity() and valid_successor() only compare: mls-rs calls them
        // for every leaf, and validate_member has verified each one already.
        let cert = self.cache.of_roster_member(signing_identity)?;
        Ok(cert.address().to_string().into_bytes())
    }

    fn valid_successor(
        &self,
        predecessor: &SigningIdentity,
        successor: &SigningIdentity,
        _extensions: &ExtensionList,
    ) -> Result<bool, Self::Error> {
        // The same device may change its signature key (`devices rekey`) or
        // carry a certificate by its account's new identity key (rotated
        // after a removal). Whether that new key is the account's is for the
        // key directory to say: clients check it as for an added device.
        let a = self.cache.of_roster_member(predecessor)?;
        let b = self.cache.of_roster_member(successor)?;
        Ok(a.address() == b.address())
    }

    fn supported_types(&self) -> Vec<CredentialType> {
        vec![BasicCredential::credential_type()]
    }
}

#[cfg(all(test, feature = "awslc"))]
mod tests {
    use super::*;

    /// The cache remembers a good signature only: a forged certificate
    /// fails every time, even once its bytes were decoded, and the device
    /// key is compared at every use.
    #[test]
    fn the_certificate_cache_remembers_only_what_verified() {
        let crypto = crate::default_crypto();
        let cache = CertCache::new();
        let alice = DeviceIdentity::generate(&crypto, Handle::new("alice").expect("handle"), 1).expect("identity");
        let si = alice.signing_identity().expect("si");
        cache.from_signing_identity(&crypto, &si).expect("valid");
        cache.from_signing_identity(&crypto, &si).expect("still valid");
        assert_eq!(cache.checks(), 1, "verified once");

        let mut forged = alice.certificate().to_bytes().expect("bytes");
        let n = forged.len();
        forged[n - 1] ^= 1;
        cache.decode(&forged).expect("decodes: only the signature is wrong");
        for _ in 0..2 {
            assert!(cache.verified(&crypto, &forged).is_err(), "a decoded certificate is not a verified one");
        }
        let forged_si = SigningIdentity::new(
            BasicCredential::new(forged).into_credential(),
            SignaturePublicKey::new(alice.device_public().to_vec()),
        );
        assert!(cache.from_signing_identity(&crypto, &forged_si).is_err());

        // A good certificate under another device key is refused, cached or not.
        let mallory = DeviceIdentity::generate(&crypto, Handle::new("alice").expect("handle"), 1).expect("identity");
        let other_key =
            SigningIdentity::new(si.credential.clone(), SignaturePublicKey::new(mallory.device_public().to_vec()));
        assert!(cache.from_signing_identity(&crypto, &other_key).is_err());
    }

    #[test]
    fn certificates_verify_and_detect_forgery() {
        let crypto = crate::default_crypto();
        let alice = DeviceIdentity::generate(&crypto, Handle::new("alice").expect("handle"), 1).expect("identity");
        let si = alice.signing_identity().expect("si");
        let cert = DeviceCertificate::from_signing_identity(&crypto, &si).expect("valid");
        assert_eq!(cert.handle().as_str(), "alice");

        // A device key certified by someone else's identity key is refused.
        let mallory = DeviceIdentity::generate(&crypto, Handle::new("alice").expect("handle"), 1).expect("identity");
        let forged =
            SigningIdentity::new(si.credential.clone(), SignaturePublicKey::new(mallory.device_public().to_vec()));
        assert!(DeviceCertificate::from_signing_identity(&crypto, &forged).is_err());

        // Flipping a byte of the certificate breaks it.
        let mut bytes = cert.to_bytes().expect("bytes");
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        assert!(DeviceCertificate::from_bytes(&bytes).map(|c| c.verify(&crypto).is_err()).unwrap_or(true));

        let restored =
            DeviceIdentity::from_secret_bytes(&crypto, &alice.to_secret_bytes().expect("bytes")).expect("restores");
        assert_eq!(restored.address(), alice.address());
        assert!(!format!("{restored:?}").contains(&hex::encode(alice.device_public())));
    }

    fn body(version: u8, suites: Vec<u16>) -> CertBody {
        CertBody {
            version,
            handle: b"al".to_vec(),
            device_id: [0xD1; 8],
            identity_key: vec![0x1D; 2],
            device_key: vec![0xDE; 2],
            issued_at_ms: 5,
            suites,
        }
    }

    /// Byte snapshots of what the identity key signs: version 1 (no
    /// suites, devices from before post-quantum conversations) and version
    /// 2 (the suites the device speaks, after the other fields), each under
    /// its own label.
    #[test]
    fn certificate_bodies_are_stable() {
        let v1 = signed_bytes(&body(1, vec![])).expect("v1");
        assert_eq!(
            hex::encode(&v1),
            format!("{}0102616cd1d1d1d1d1d1d1d1021d1d02dede0000000000000005", hex::encode(CERT_LABEL_V1))
        );
        let v2 = signed_bytes(&body(2, vec![65100, 1])).expect("v2");
        assert_eq!(
            hex::encode(&v2),
            format!("{}0202616cd1d1d1d1d1d1d1d1021d1d02dede000000000000000504fe4c0001", hex::encode(CERT_LABEL_V2))
        );
        // Both decode back to what was encoded, and nothing else.
        for b in [body(1, vec![]), body(2, vec![65100, 1])] {
            let bytes = b.mls_encode_to_vec().expect("encode");
            assert!(CertBody::mls_decode(&mut bytes.as_slice()).expect("decode") == b);
        }
    }

    /// New certificates say the device can do both suites; a version 1
    /// one (still valid) only the classical one; and the server cannot turn
    /// a version 2 certificate into a version 1 one to hide the post-quantum
    /// suite: the signature no longer verifies.
    #[test]
    fn certificates_state_the_suites_and_cannot_be_downgraded() {
        let crypto = crate::default_crypto();
        let alice = DeviceIdentity::generate(&crypto, Handle::new("alice").expect("handle"), 1).expect("identity");
        let cert = alice.certificate().clone();
        assert!(cert.supports(crate::PQ_CIPHERSUITE) && cert.supports(CIPHERSUITE));
        assert!(!cert.supports(mls_rs::CipherSuite::P256_AES128));

        let mut v1 = cert.clone();
        v1.body.version = CERT_V1;
        v1.body.suites.clear();
        let bytes = v1.to_bytes().expect("bytes");
        let decoded = DeviceCertificate::from_bytes(&bytes).expect("a version 1 certificate decodes");
        assert!(decoded.supports(CIPHERSUITE) && !decoded.supports(crate::PQ_CIPHERSUITE));
        assert!(decoded.verify(&crypto).is_err(), "the signature was over version 2");

        // A genuine version 1 certificate (signed as one) still verifies.
        let mut old = v1.body.clone();
        old.identity_key = alice.identity_public().to_vec();
        let signature = suite(&crypto)
            .expect("suite")
            .sign(alice.identity_secret(), &signed_bytes(&old).expect("bytes"))
            .expect("sign");
        let genuine = DeviceCertificate { body: old, signature, handle: alice.handle().clone() };
        let genuine = DeviceCertificate::from_bytes(&genuine.to_bytes().expect("bytes")).expect("decode");
        genuine.verify(&crypto).expect("a version 1 certificate verifies");
        assert!(!genuine.supports(crate::PQ_CIPHERSUITE));

        // Versions other than 1 and 2 are refused.
        let mut v3 = cert.clone();
        v3.body.version = 3;
        assert!(DeviceCertificate::from_bytes(&v3.to_bytes().expect("bytes")).is_err());
    }
}

//! Linking a new device to an account, end to end.
//!
//! 1. The new device makes a [`PendingLink`]: a fresh device signature key
//!    and an HPKE key. Its public half, the [`LinkRequest`], goes to a server
//!    slot. The user sees a code: the slot id and a fingerprint of the request
//!    (80 bits of SHA-256), typed or scanned on an existing device.
//! 2. The existing device fetches the request, refuses it unless its
//!    fingerprint matches the code (so the server cannot swap in its own
//!    keys), certifies the new device key with the account identity key, and
//!    seals a [`LinkGrant`] (identity key pair, certificate, optional recent
//!    history) to the request's HPKE key.
//! 3. The new device opens the grant, checks the certificate, and becomes a
//!    full [`DeviceIdentity`] of the account.
//!
//! The server relays opaque bytes only.

use mls_rs::crypto::{HpkeCiphertext, HpkePublicKey, HpkeSecretKey, SignaturePublicKey, SignatureSecretKey};
use mls_rs::{CipherSuiteProvider, CryptoProvider};
use mls_rs_codec::{MlsDecode, MlsEncode, MlsSize};
use sha2::{Digest, Sha256};
use subrosa_proto::{DeviceId, Handle, LinkId};
use zeroize::Zeroizing;

use crate::identity::{DeviceCertificate, DeviceIdentity};
use crate::{CoreError, CIPHERSUITE};

const HPKE_INFO: &[u8] = b"subrosa-link-grant-v1";
const FINGERPRINT_BYTES: usize = 10;
const CODE_BYTES: usize = 6 + FINGERPRINT_BYTES;
/// Crockford's base32 alphabet: no I, L, O or U to misread.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// The new device's public keys, as published in the link slot.
#[derive(Clone, Debug, PartialEq, Eq, MlsSize, MlsEncode, MlsDecode)]
pub struct LinkRequest {
    version: u8,
    handle: Vec<u8>,
    device_id: [u8; 8],
    device_key: Vec<u8>,
    hpke_key: Vec<u8>,
    /// Whether the new device asks for recent history.
    pub with_history: bool,
}

/// A message of recent history handed to a new device.
#[derive(Clone, PartialEq, Eq, MlsSize, MlsEncode, MlsDecode)]
pub struct HistoryItem {
    /// Conversation id.
    pub conversation: [u8; 16],
    /// "direct" or "group".
    pub kind: String,
    /// Group name, or empty.
    pub name: String,
    /// Peer handle of a direct conversation, or empty.
    pub peer: String,
    /// End-to-end message id.
    pub message_id: Vec<u8>,
    /// Sender handle.
    pub from: String,
    /// Sender device (hex).
    pub device: String,
    /// Sender's clock, ms.
    pub sent_at: u64,
    /// Text.
    pub text: String,
    /// A system line.
    pub system: bool,
}

impl std::fmt::Debug for HistoryItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryItem").field("from", &self.from).finish_non_exhaustive()
    }
}

/// What the approving device seals to the new one (version 1, still read).
#[derive(MlsSize, MlsEncode, MlsDecode)]
struct LinkGrantWire {
    version: u8,
    identity_public: Vec<u8>,
    identity_secret: SignatureSecretKey,
    certificate: Vec<u8>,
    history: Vec<HistoryItem>,
}

/// Version 2 (written now): version 1 plus the key-directory head-signing
/// key the approving device pinned (empty when it had none), so the new
/// device trusts the same directory without asking the server.
#[derive(MlsSize, MlsEncode, MlsDecode)]
struct LinkGrantWireV2 {
    version: u8,
    identity_public: Vec<u8>,
    identity_secret: SignatureSecretKey,
    certificate: Vec<u8>,
    history: Vec<HistoryItem>,
    directory_key: Vec<u8>,
}

/// What a grant gave the new device.
#[derive(Debug)]
pub struct Granted {
    /// The new device's identity.
    pub identity: DeviceIdentity,
    /// Recent history, when asked for.
    pub history: Vec<HistoryItem>,
    /// The head-signing key of the key directory the approving device
    /// pinned (None from a version-1 grant or a device without one).
    pub directory_key: Option<Vec<u8>>,
}

/// The new device's secrets while it waits for approval.
pub struct PendingLink {
    request: LinkRequest,
    device_secret: SignatureSecretKey,
    hpke_secret: HpkeSecretKey,
}

impl std::fmt::Debug for PendingLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingLink").field("device_id", &hex::encode(self.request.device_id)).finish_non_exhaustive()
    }
}

fn suite<C: CryptoProvider>(crypto: &C) -> Result<C::CipherSuiteProvider, CoreError> {
    crypto.cipher_suite_provider(CIPHERSUITE).ok_or(CoreError::Bug("ciphersuite unsupported by provider"))
}

fn crypto_err(e: impl std::fmt::Debug) -> CoreError {
    CoreError::Crypto(format!("{e:?}"))
}

impl LinkRequest {
    /// Encodes for the link slot.
    ///
    /// # Errors
    /// Only on a bug.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CoreError> {
        self.mls_encode_to_vec().map_err(|_| CoreError::Bug("link request encoding"))
    }

    /// Decodes untrusted bytes.
    ///
    /// # Errors
    /// [`CoreError::Malformed`].
    pub fn from_bytes(mut bytes: &[u8]) -> Result<Self, CoreError> {
        let all = bytes;
        let r = Self::mls_decode(&mut bytes).map_err(|_| CoreError::Malformed("link request"))?;
        // Only the canonical encoding is accepted (one byte string per value).
        if !bytes.is_empty() || r.version != 1 || r.to_bytes()? != all {
            return Err(CoreError::Malformed("link request"));
        }
        Ok(r)
    }

    /// The handle the device asks to join.
    ///
    /// # Errors
    /// [`CoreError::Malformed`].
    pub fn handle(&self) -> Result<Handle, CoreError> {
        let s = std::str::from_utf8(&self.handle).map_err(|_| CoreError::Malformed("link request handle"))?;
        Handle::new(s).map_err(|_| CoreError::Malformed("link request handle"))
    }

    /// The new device id.
    pub fn device_id(&self) -> DeviceId {
        DeviceId(self.device_id)
    }

    /// The new device's signature key.
    pub fn device_key(&self) -> &[u8] {
        &self.device_key
    }
}

/// The code for a link slot and request: 16 bytes as 26 base32 characters,
/// grouped by five for reading aloud.
pub fn link_code(link: LinkId, request: &[u8]) -> String {
    let mut bytes = link.0.to_vec();
    bytes.extend_from_slice(&Sha256::digest(request)[..FINGERPRINT_BYTES]);
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out.as_bytes().chunks(5).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("-")
}

/// Parses a code the user typed: case and dashes and spaces don't matter;
/// O reads as 0, I and L as 1. Returns the slot and the request fingerprint.
///
/// # Errors
/// [`CoreError::Malformed`] when it is not a link code.
pub fn parse_link_code(code: &str) -> Result<(LinkId, [u8; FINGERPRINT_BYTES]), CoreError> {
    let mut bytes = Vec::with_capacity(CODE_BYTES);
    let (mut acc, mut bits, mut chars) = (0u32, 0u32, 0usize);
    for c in code.chars().filter(|c| !matches!(c, '-' | ' ')) {
        let c = match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            c => c,
        };
        let v = ALPHABET.iter().position(|&a| a as char == c).ok_or(CoreError::Malformed("link code"))?;
        acc = (acc << 5) | v as u32;
        bits += 5;
        chars += 1;
        if bits >= 8 {
            bits -= 8;
            bytes.push((acc >> bits) as u8);
        }
        acc &= (1 << bits) - 1;
    }
    if chars != (CODE_BYTES * 8).div_ceil(5) || bytes.len() != CODE_BYTES {
        return Err(CoreError::Malformed("link code"));
    }
    let link = LinkId::from_slice(&bytes[..6]).map_err(|_| CoreError::Malformed("link code"))?;
    let mut fp = [0u8; FINGERPRINT_BYTES];
    fp.copy_from_slice(&bytes[6..]);
    Ok((link, fp))
}

/// Checks a fetched request against the fingerprint from the code.
///
/// # Errors
/// [`CoreError::IdentityMismatch`] when the server handed out other keys.
pub fn check_fingerprint(request: &[u8], fingerprint: &[u8; FINGERPRINT_BYTES]) -> Result<(), CoreError> {
    if Sha256::digest(request)[..FINGERPRINT_BYTES] == fingerprint[..] {
        Ok(())
    } else {
        Err(CoreError::IdentityMismatch(
            "the link request does not match the code: it was altered or the code is wrong".into(),
        ))
    }
}

impl PendingLink {
    /// New device keys for `handle`.
    ///
    /// # Errors
    /// [`CoreError::Crypto`].
    pub fn new<C: CryptoProvider>(crypto: &C, handle: &Handle, with_history: bool) -> Result<Self, CoreError> {
        let cs = suite(crypto)?;
        let (device_secret, device_public) = cs.signature_key_generate().map_err(crypto_err)?;
        let (hpke_secret, hpke_public) = cs.kem_generate().map_err(crypto_err)?;
        let mut device_id = [0u8; 8];
        cs.random_bytes(&mut device_id).map_err(crypto_err)?;
        let request = LinkRequest {
            version: 1,
            handle: handle.as_str().as_bytes().to_vec(),
            device_id,
            device_key: device_public.to_vec(),
            hpke_key: hpke_public.to_vec(),
            with_history,
        };
        Ok(PendingLink { request, device_secret, hpke_secret })
    }

    /// The public request for the slot.
    pub fn request(&self) -> &LinkRequest {
        &self.request
    }

    /// Opens the grant and becomes a device of the account.
    ///
    /// # Errors
    /// [`CoreError::Crypto`] when it does not open, [`CoreError::Malformed`],
    /// or [`CoreError::IdentityMismatch`] when the certificate is not for
    /// this device or not by the identity key sent with it.
    pub fn complete<C: CryptoProvider>(
        self,
        crypto: &C,
        grant: &[u8],
    ) -> Result<(DeviceIdentity, Vec<HistoryItem>), CoreError> {
        self.complete_grant(crypto, grant).map(|g| (g.identity, g.history))
    }

    /// As [`PendingLink::complete`], with the directory key the grant carries.
    ///
    /// # Errors
    /// As [`PendingLink::complete`].
    pub fn complete_grant<C: CryptoProvider>(self, crypto: &C, grant: &[u8]) -> Result<Granted, CoreError> {
        let cs = suite(crypto)?;
        let ct = HpkeCiphertext::mls_decode(&mut &grant[..]).map_err(|_| CoreError::Malformed("link grant"))?;
        let aad = self.request.to_bytes()?;
        let pt = cs
            .hpke_open(
                &ct,
                &self.hpke_secret,
                &HpkePublicKey::from(self.request.hpke_key.clone()),
                HPKE_INFO,
                Some(&aad),
            )
            .map_err(|_| CoreError::BadSignature("link grant (does not open)"))?;
        let wire = match pt.first() {
            Some(1) => {
                let w =
                    LinkGrantWire::mls_decode(&mut pt.as_slice()).map_err(|_| CoreError::Malformed("link grant"))?;
                LinkGrantWireV2 {
                    version: w.version,
                    identity_public: w.identity_public,
                    identity_secret: w.identity_secret,
                    certificate: w.certificate,
                    history: w.history,
                    directory_key: Vec::new(),
                }
            }
            Some(2) => {
                LinkGrantWireV2::mls_decode(&mut pt.as_slice()).map_err(|_| CoreError::Malformed("link grant"))?
            }
            _ => return Err(CoreError::Malformed("link grant version")),
        };
        let cert = DeviceCertificate::from_bytes(&wire.certificate)?;
        cert.verify(crypto)?;
        let handle = self.request.handle()?;
        if cert.identity_key() != wire.identity_public
            || cert.device_key() != self.request.device_key
            || cert.device_id().0 != self.request.device_id
            || cert.handle() != handle
        {
            return Err(CoreError::IdentityMismatch("the link grant's certificate is not for this device".into()));
        }
        let identity = DeviceIdentity::from_parts(
            crypto,
            SignaturePublicKey::new(wire.identity_public),
            wire.identity_secret,
            SignaturePublicKey::new(self.request.device_key.clone()),
            self.device_secret,
            cert,
        )?;
        let directory_key = (!wire.directory_key.is_empty()).then_some(wire.directory_key);
        Ok(Granted { identity, history: wire.history, directory_key })
    }
}

impl DeviceIdentity {
    /// Approves a link request of this account: certifies the new device and
    /// seals the identity key pair, the certificate and `history` to it.
    /// Returns the grant and the new device's certificate.
    ///
    /// # Errors
    /// [`CoreError::IdentityMismatch`] when the request is for another
    /// handle, [`CoreError::Crypto`] on crypto failures.
    pub fn grant_link<C: CryptoProvider>(
        &self,
        crypto: &C,
        request_bytes: &[u8],
        history: Vec<HistoryItem>,
        now_ms: u64,
    ) -> Result<(Zeroizing<Vec<u8>>, DeviceCertificate), CoreError> {
        self.grant_link_with(crypto, request_bytes, history, now_ms, &[])
    }

    /// As [`DeviceIdentity::grant_link`], passing on the key directory's
    /// head-signing key this device pinned (empty: none).
    ///
    /// # Errors
    /// As [`DeviceIdentity::grant_link`].
    pub fn grant_link_with<C: CryptoProvider>(
        &self,
        crypto: &C,
        request_bytes: &[u8],
        history: Vec<HistoryItem>,
        now_ms: u64,
        directory_key: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, DeviceCertificate), CoreError> {
        let request = LinkRequest::from_bytes(request_bytes)?;
        if request.handle()? != *self.handle() {
            return Err(CoreError::IdentityMismatch("the link request is for another account".into()));
        }
        let cs = suite(crypto)?;
        let hpke_key = HpkePublicKey::from(request.hpke_key.clone());
        cs.kem_public_key_validate(&hpke_key).map_err(|_| CoreError::Malformed("link request key"))?;
        let device_key = SignaturePublicKey::new(request.device_key.clone());
        let cert = self.certify(crypto, request.device_id(), &device_key, now_ms)?;
        let wire = LinkGrantWireV2 {
            version: 2,
            identity_public: self.identity_public().to_vec(),
            identity_secret: self.identity_secret().clone(),
            certificate: cert.to_bytes()?,
            history,
            directory_key: directory_key.to_vec(),
        };
        let pt = Zeroizing::new(wire.mls_encode_to_vec().map_err(|_| CoreError::Bug("grant encoding"))?);
        let ct = cs.hpke_seal(&hpke_key, HPKE_INFO, Some(request_bytes), &pt).map_err(crypto_err)?;
        let bytes = ct.mls_encode_to_vec().map_err(|_| CoreError::Bug("grant encoding"))?;
        Ok((Zeroizing::new(bytes), cert))
    }
}

#[cfg(all(test, feature = "awslc"))]
mod tests {
    use super::*;

    #[test]
    fn a_device_links_and_a_swapped_request_or_bad_code_is_refused() {
        let crypto = crate::default_crypto();
        let alice = DeviceIdentity::generate(&crypto, Handle::new("alice").expect("h"), 0).expect("id");
        let pending = PendingLink::new(&crypto, alice.handle(), true).expect("pending");
        let request = pending.request().to_bytes().expect("bytes");
        let code = link_code(LinkId([1, 2, 3, 4, 5, 6]), &request);
        assert_eq!(code.len(), 26 + 5);
        let (link, fp) = parse_link_code(&code.to_lowercase().replace('-', " ")).expect("parses");
        assert_eq!(link, LinkId([1, 2, 3, 4, 5, 6]));
        check_fingerprint(&request, &fp).expect("matches");

        // The server swaps in its own request: the fingerprint catches it.
        let mallory = PendingLink::new(&crypto, alice.handle(), false).expect("pending");
        assert!(check_fingerprint(&mallory.request().to_bytes().expect("b"), &fp).is_err());

        let (grant, cert) = alice.grant_link(&crypto, &request, Vec::new(), 5).expect("grant");
        assert_eq!(cert.device_id(), pending.request().device_id());
        // Someone else's pending link cannot open it.
        assert!(mallory.complete(&crypto, &grant).is_err());
        let (second, history) = pending.complete(&crypto, &grant).expect("opens");
        assert!(history.is_empty());
        assert_eq!(second.identity_public(), alice.identity_public());
        assert_ne!(second.device_id(), alice.device_id());
        DeviceCertificate::from_signing_identity(&crypto, &second.signing_identity().expect("si")).expect("valid");

        // A non-canonical boolean (any non-zero byte decodes as true) is refused.
        let mut odd = request.clone();
        if let Some(last) = odd.last_mut() {
            *last = 0x38;
        }
        assert!(LinkRequest::from_bytes(&odd).is_err());
        for bad in ["", "12345", &code[..20], "UUUUU-UUUUU-UUUUU-UUUUU-UUUUU-U", &format!("{code}0")] {
            assert!(parse_link_code(bad).is_err(), "{bad:?}");
        }
        let bob = DeviceIdentity::generate(&crypto, Handle::new("bob").expect("h"), 0).expect("id");
        assert!(bob.grant_link(&crypto, &request, Vec::new(), 5).is_err(), "a grant for another account");
    }

    #[test]
    fn a_grant_passes_on_the_directory_key_and_version_1_grants_still_open() {
        let crypto = crate::default_crypto();
        let alice = DeviceIdentity::generate(&crypto, Handle::new("alice").expect("h"), 0).expect("id");
        let pending = PendingLink::new(&crypto, alice.handle(), false).expect("pending");
        let request = pending.request().to_bytes().expect("bytes");
        let (grant, _) = alice.grant_link_with(&crypto, &request, Vec::new(), 5, &[7; 48]).expect("grant");
        let granted = pending.complete_grant(&crypto, &grant).expect("opens");
        assert_eq!(granted.directory_key, Some(vec![7; 48]));

        // A grant as the first release sealed it.
        let pending = PendingLink::new(&crypto, alice.handle(), false).expect("pending");
        let request = pending.request().to_bytes().expect("bytes");
        let cert = alice
            .certify(
                &crypto,
                pending.request().device_id(),
                &SignaturePublicKey::new(pending.request().device_key.clone()),
                5,
            )
            .expect("cert");
        let v1 = LinkGrantWire {
            version: 1,
            identity_public: alice.identity_public().to_vec(),
            identity_secret: alice.identity_secret().clone(),
            certificate: cert.to_bytes().expect("cert bytes"),
            history: Vec::new(),
        };
        let cs = suite(&crypto).expect("suite");
        let pt = v1.mls_encode_to_vec().expect("encodes");
        let hpke_key = HpkePublicKey::from(pending.request().hpke_key.clone());
        let ct = cs.hpke_seal(&hpke_key, HPKE_INFO, Some(&request), &pt).expect("seals");
        let granted = pending.complete_grant(&crypto, &ct.mls_encode_to_vec().expect("encodes")).expect("opens");
        assert_eq!(granted.directory_key, None);
        assert_eq!(granted.identity.identity_public(), alice.identity_public());
    }
}

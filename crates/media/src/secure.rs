//! SFrame (RFC 9605) for call media, keyed from the conversation's MLS group
//! as RFC 9605 §5.2 describes.
//!
//! The caller exports one secret per MLS epoch
//! (`MLS-Exporter("SFrame 1.0 Base Key", "", 16)`) and hands it in as an
//! [`EpochSecret`]; this module never sees the MLS group. Every sender's key id
//! packs three fields (RFC 9605 §5.2, the `sframe` crate's [`MlsKeyId`]):
//!
//! ```text
//!  40 bits       16 bits      8 bits
//! +------------+------------+---------+
//! | context id | leaf index | epoch   |
//! +------------+------------+---------+
//! ```
//!
//! and the SFrame key is derived from the epoch secret and that key id, so
//! every sender, every epoch and every context has its own key. The context id
//! is drawn at random each time a device starts sending in a call: a call
//! restarted in the same epoch gets a new key, so a counter starting at 0
//! again never meets a key it was used with.
//!
//! A receiver keeps the current epoch and, for frames still in flight, the one
//! before it, minus the senders the change between them removed: a removed
//! member knows neither the new secret nor, after its removal, any old key the
//! receiver still accepts from it. Replays are refused per key id by the
//! `sframe` crate's sliding window.
//!
//! What this does not give: sender authentication inside the call. Every
//! member holding an epoch's secret can derive every key id's key, so a
//! member can seal frames under another member's leaf index (RFC 9605,
//! "Security Considerations"). Outsiders and removed members cannot; who
//! is in the call is known from the MLS messages, not from the frames. A
//! receiver plays at most [`crate::pipeline::MAX_STREAMS`] senders, so
//! made-up indexes cannot grow its state without bound.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use sframe::{
    frame::{
        validation::{ReplayAttackProtectionStore, Tolerance},
        EncryptedFrameView, MediaFrameView, MonotonicCounter,
    },
    header::KeyId,
    key::{DecryptionKey, EncryptionKey},
    mls::{MlsKeyId, MlsKeyIdBitRange},
    CipherSuite,
};
use zeroize::Zeroizing;

/// The SFrame cipher suite of every call: AES-128-GCM with HKDF-SHA256, the
/// one RFC 9605 makes mandatory to implement, and the AEAD of the
/// conversation's MLS suite.
pub const CIPHER_SUITE: CipherSuite = CipherSuite::AesGcm128Sha256;
/// Bits of the MLS epoch in a key id: 256 epochs apart before two collide,
/// far more than the two a receiver holds.
pub const EPOCH_BITS: u8 = 8;
/// Bits of the sender's MLS leaf index in a key id.
pub const INDEX_BITS: u8 = 16;
/// Bits of the random context id: what is left of the 64-bit key id.
pub const CONTEXT_BITS: u32 = 64 - EPOCH_BITS as u32 - INDEX_BITS as u32;
/// The length of the per-epoch secret the caller exports from MLS
/// (`AEAD.Nk` of [`CIPHER_SUITE`]).
pub const EPOCH_SECRET_LEN: usize = 16;
/// How far behind the newest frame of a sender a counter may lag before it
/// is refused as too old (frames; 128 × 20 ms = 2.56 s).
pub const REPLAY_WINDOW: usize = 128;
/// Decryption keys kept once they authenticated a frame; more senders than
/// this in one call only cost a key derivation per frame.
const KEY_CACHE: usize = 256;

fn bit_range() -> MlsKeyIdBitRange {
    // EPOCH_BITS + INDEX_BITS = 24 < 63: within the crate's documented range.
    MlsKeyIdBitRange::new(EPOCH_BITS, INDEX_BITS)
}

/// Errors of building keys and sealing frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The epoch secret is not [`EPOCH_SECRET_LEN`] bytes.
    #[error("an SFrame epoch secret must be {EPOCH_SECRET_LEN} bytes")]
    SecretLength,
    /// The leaf index does not fit the key id's index field.
    #[error("leaf index {0} does not fit in an SFrame key id")]
    LeafIndex(u32),
    /// A re-key to an epoch that is not newer than the current one.
    #[error("epoch {new} is not newer than {current}")]
    EpochNotNewer {
        /// the epoch the receiver holds
        current: u64,
        /// the epoch offered
        new: u64,
    },
    /// The sender's frame counter is used up (2^64 frames).
    #[error("the SFrame counter is exhausted")]
    CounterExhausted,
    /// The `sframe` crate refused; a bug in us (sizes are fixed here).
    #[error("SFrame internal error: {0}")]
    Internal(String),
}

/// Why a received frame was not opened. Each is normal traffic on a lossy,
/// hostile network: drop the frame and carry on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenError {
    /// Not a well-formed SFrame frame.
    #[error("malformed SFrame frame")]
    Malformed,
    /// The key id names an epoch this receiver does not hold.
    #[error("frame for an epoch this receiver does not hold")]
    UnknownEpoch,
    /// The key id names a sender removed from the conversation.
    #[error("frame from a removed sender")]
    RemovedSender,
    /// The counter was seen already, or is too far behind the newest.
    #[error("replayed or too old frame")]
    Replay,
    /// Authentication failed: wrong key, or the frame was altered.
    #[error("frame failed to authenticate")]
    Authentication,
    /// The call already plays the most senders it takes
    /// ([`crate::pipeline::MAX_STREAMS`]).
    #[error("frame from one sender too many")]
    TooManySenders,
    /// The frame authenticated, but its sender and context were not
    /// announced in the call's signalling
    /// ([`crate::pipeline::Incoming::admit`]).
    #[error("frame of a stream not announced in the call")]
    NotAdmitted,
}

/// An MLS epoch number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

/// A member's MLS leaf index, which names the sender in its key id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeafIndex(pub u32);

/// The random context id a device draws each time it starts sending in a
/// call, so a call restarted in the same epoch never reuses key and counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContextId(u64);

impl ContextId {
    /// A fresh random context id of [`CONTEXT_BITS`] bits.
    pub fn random() -> Self {
        Self(rand::random::<u64>() >> (64 - CONTEXT_BITS))
    }

    /// A chosen context id (tests, vectors), reduced to [`CONTEXT_BITS`] bits.
    pub fn from_bits(value: u64) -> Self {
        Self(value & ((1u64 << CONTEXT_BITS) - 1))
    }

    /// The value carried in the key id.
    pub fn value(self) -> u64 {
        self.0
    }
}

/// The per-epoch SFrame base secret exported from MLS. Zeroized on drop,
/// redacted in `Debug`, never `Copy`.
pub struct EpochSecret(Zeroizing<Vec<u8>>);

impl EpochSecret {
    /// Takes the exporter's output.
    ///
    /// # Errors
    /// [`KeyError::SecretLength`] unless it is [`EPOCH_SECRET_LEN`] bytes.
    pub fn new(secret: Zeroizing<Vec<u8>>) -> Result<Self, KeyError> {
        if secret.len() != EPOCH_SECRET_LEN {
            return Err(KeyError::SecretLength);
        }
        Ok(Self(secret))
    }

    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for EpochSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EpochSecret(redacted)")
    }
}

fn key_id(context: ContextId, epoch: Epoch, index: LeafIndex) -> Result<MlsKeyId, KeyError> {
    if u64::from(index.0) >= 1u64 << INDEX_BITS {
        return Err(KeyError::LeafIndex(index.0));
    }
    MlsKeyId::try_new(context.0, epoch.0, u64::from(index.0), bit_range())
        .map_err(|e| KeyError::Internal(e.to_string()))
}

/// One device's sending side in a call: seals each encoded frame.
///
/// The SFrame counter is the frame's sequence number: it starts at 0 when the
/// device starts sending and keeps counting across re-keys, so a receiver's
/// jitter buffer sees one continuous stream.
pub struct Sender {
    key: EncryptionKey,
    counter: MonotonicCounter,
    context: ContextId,
    index: LeafIndex,
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("key_id", &self.key.key_id())
            .field("counter", &self.counter.current())
            .finish_non_exhaustive()
    }
}

impl Sender {
    /// A sender at `epoch` as leaf `index`, under a fresh `context`
    /// ([`ContextId::random`]).
    ///
    /// # Errors
    /// [`KeyError::LeafIndex`] if the index does not fit the key id.
    pub fn new(secret: &EpochSecret, epoch: Epoch, index: LeafIndex, context: ContextId) -> Result<Self, KeyError> {
        let kid = key_id(context, epoch, index)?;
        let key = EncryptionKey::derive_from(CIPHER_SUITE, kid, secret.bytes())
            .map_err(|e| KeyError::Internal(e.to_string()))?;
        Ok(Self { key, counter: MonotonicCounter::default(), context, index })
    }

    /// Moves to the key of a new epoch (a membership change); the counter
    /// carries on.
    ///
    /// # Errors
    /// As [`Sender::new`].
    pub fn rekey(&mut self, secret: &EpochSecret, epoch: Epoch) -> Result<(), KeyError> {
        let kid = key_id(self.context, epoch, self.index)?;
        self.key = EncryptionKey::derive_from(CIPHER_SUITE, kid, secret.bytes())
            .map_err(|e| KeyError::Internal(e.to_string()))?;
        Ok(())
    }

    /// The counter the next sealed frame carries.
    pub fn next_counter(&self) -> u64 {
        self.counter.current()
    }

    /// Seals one media frame (an Opus packet) into an SFrame frame.
    ///
    /// # Errors
    /// [`KeyError::CounterExhausted`] after 2^64 frames.
    pub fn seal(&mut self, payload: &[u8]) -> Result<Vec<u8>, KeyError> {
        let frame = MediaFrameView::try_new(&mut self.counter, &payload).map_err(|_| KeyError::CounterExhausted)?;
        let sealed = frame.encrypt(&self.key).map_err(|e| KeyError::Internal(e.to_string()))?;
        Ok(sealed.as_ref().to_vec())
    }
}

/// A frame that authenticated: who sent it and its sequence number.
#[derive(Clone, PartialEq, Eq)]
pub struct Opened {
    /// The sender's leaf index, from the authenticated key id.
    pub sender: LeafIndex,
    /// The sender's context id for this call.
    pub context: ContextId,
    /// The epoch whose key opened it.
    pub epoch: Epoch,
    /// The SFrame counter: the sender's sequence number.
    pub counter: u64,
    /// The media frame (an Opus packet).
    pub payload: Vec<u8>,
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field("sender", &self.sender)
            .field("epoch", &self.epoch)
            .field("counter", &self.counter)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

struct HeldEpoch {
    epoch: Epoch,
    secret: EpochSecret,
    /// Senders the change after this epoch removed: refused in it.
    removed: Vec<LeafIndex>,
}

/// The receiving side of a call: opens the frames of every other sender.
pub struct Receiver {
    /// Newest last; at most two (the current one and the one before it).
    epochs: VecDeque<HeldEpoch>,
    keys: HashMap<KeyId, DecryptionKey>,
    replay: ReplayAttackProtectionStore,
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("epochs", &self.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// A receiver holding the secret of `epoch`.
    pub fn new(secret: EpochSecret, epoch: Epoch) -> Self {
        let mut epochs = VecDeque::new();
        epochs.push_back(HeldEpoch { epoch, secret, removed: Vec::new() });
        Self { epochs, keys: HashMap::new(), replay: ReplayAttackProtectionStore::new(Tolerance::new(REPLAY_WINDOW)) }
    }

    /// The epoch a membership change moved to. Frames of the previous epoch
    /// still in flight are accepted, except from the senders in `removed`;
    /// anything older is forgotten (its secret zeroized).
    ///
    /// # Errors
    /// [`KeyError::EpochNotNewer`] unless `epoch` is newer than the current.
    pub fn rekey(&mut self, secret: EpochSecret, epoch: Epoch, removed: &[LeafIndex]) -> Result<(), KeyError> {
        let current = self.current_epoch();
        if epoch <= current {
            return Err(KeyError::EpochNotNewer { current: current.0, new: epoch.0 });
        }
        if let Some(last) = self.epochs.back_mut() {
            last.removed.extend_from_slice(removed);
        }
        self.epochs.push_back(HeldEpoch { epoch, secret, removed: Vec::new() });
        while self.epochs.len() > 2 {
            self.epochs.pop_front();
        }
        let kept: Vec<Epoch> = self.epochs.iter().map(|e| e.epoch).collect();
        let lsb = |e: Epoch| e.0 & ((1 << EPOCH_BITS) - 1);
        let removed_now: Vec<LeafIndex> = removed.to_vec();
        let previous = kept.first().copied();
        self.keys.retain(|kid, _| {
            let id = MlsKeyId::from_key_id(*kid, bit_range());
            let held = kept.iter().any(|e| lsb(*e) == id.epoch_lsb());
            let gone = previous.is_some_and(|p| lsb(p) == id.epoch_lsb())
                && removed_now.iter().any(|r| u64::from(r.0) == id.member_index());
            held && !gone
        });
        let keys = &self.keys;
        self.replay.retain(|kid| keys.contains_key(&kid));
        Ok(())
    }

    /// The newest epoch held.
    pub fn current_epoch(&self) -> Epoch {
        self.epochs.back().map_or(Epoch(0), |e| e.epoch)
    }

    /// Authenticates and decrypts one SFrame frame.
    ///
    /// # Errors
    /// An [`OpenError`] saying why the frame is dropped.
    pub fn open(&mut self, packet: &[u8]) -> Result<Opened, OpenError> {
        let view = EncryptedFrameView::try_new(&packet).map_err(|_| OpenError::Malformed)?;
        let kid = view.header().key_id();
        let id = MlsKeyId::from_key_id(kid, bit_range());
        let held = self
            .epochs
            .iter()
            .find(|e| e.epoch.0 & ((1 << EPOCH_BITS) - 1) == id.epoch_lsb())
            .ok_or(OpenError::UnknownEpoch)?;
        let epoch = held.epoch;
        let sender = u32::try_from(id.member_index()).map_err(|_| OpenError::Malformed)?;
        if held.removed.contains(&LeafIndex(sender)) {
            return Err(OpenError::RemovedSender);
        }
        let map_err = |e: sframe::error::SframeError| match e {
            sframe::error::SframeError::FrameValidationFailed(_) => OpenError::Replay,
            sframe::error::SframeError::DecryptionFailure => OpenError::Authentication,
            sframe::error::SframeError::MissingDecryptionKey { .. } => OpenError::UnknownEpoch,
            _ => OpenError::Malformed,
        };
        let frame = if let Some(key) = self.keys.get(&kid) {
            view.validated_decrypt(key, &mut self.replay).map_err(map_err)?
        } else {
            // Derived for this frame, kept only once the frame authenticated,
            // so forged key ids cannot fill the cache.
            let key =
                DecryptionKey::derive_from(CIPHER_SUITE, kid, held.secret.bytes()).map_err(|_| OpenError::Malformed)?;
            let frame = view.validated_decrypt(&key, &mut self.replay).map_err(map_err)?;
            if self.keys.len() >= KEY_CACHE {
                self.keys.clear();
            }
            self.keys.insert(kid, key);
            frame
        };
        Ok(Opened {
            sender: LeafIndex(sender),
            context: ContextId(id.context_id()),
            epoch,
            counter: frame.counter(),
            payload: frame.payload().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> EpochSecret {
        EpochSecret::new(Zeroizing::new(vec![byte; EPOCH_SECRET_LEN])).expect("16 bytes")
    }

    fn sender(byte: u8, epoch: u64, index: u32) -> Sender {
        Sender::new(&secret(byte), Epoch(epoch), LeafIndex(index), ContextId::random()).expect("sender")
    }

    #[test]
    fn a_member_with_the_epoch_secret_opens_what_a_sender_sealed() {
        let mut alice = sender(7, 3, 1);
        let mut bob = Receiver::new(secret(7), Epoch(3));
        for i in 0..5u8 {
            let sealed = alice.seal(&[i; 40]).expect("seal");
            let opened = bob.open(&sealed).expect("open");
            assert_eq!(opened.payload, vec![i; 40]);
            assert_eq!(opened.sender, LeafIndex(1));
            assert_eq!(opened.epoch, Epoch(3));
            assert_eq!(opened.counter, u64::from(i));
        }
    }

    #[test]
    fn the_payload_is_not_in_the_clear() {
        let mut alice = sender(7, 3, 1);
        let payload = b"an opus packet that must not be seen";
        let sealed = alice.seal(payload).expect("seal");
        assert!(!sealed.windows(8).any(|w| payload.windows(8).any(|p| p == w)));
    }

    #[test]
    fn another_epoch_or_secret_does_not_open() {
        let mut alice = sender(7, 3, 1);
        let sealed = alice.seal(b"hello").expect("seal");
        // Same epoch number, another secret (another group, or a guess).
        let mut other = Receiver::new(secret(8), Epoch(3));
        assert_eq!(other.open(&sealed), Err(OpenError::Authentication));
        // Another epoch entirely.
        let mut later = Receiver::new(secret(7), Epoch(4));
        assert_eq!(later.open(&sealed), Err(OpenError::UnknownEpoch));
        // An epoch 256 later has the same low bits; the secret differs.
        let mut wrapped = Receiver::new(secret(9), Epoch(3 + 256));
        assert_eq!(wrapped.open(&sealed), Err(OpenError::Authentication));
    }

    #[test]
    fn a_removed_sender_cannot_be_heard_after_the_rekey() {
        let mut bob = Receiver::new(secret(1), Epoch(10));
        let mut carol = sender(1, 10, 2);
        let mut mallory = sender(1, 10, 5);
        assert!(bob.open(&mallory.seal(b"before").expect("seal")).is_ok());
        assert!(bob.open(&carol.seal(b"before").expect("seal")).is_ok());

        // Mallory is removed: epoch 11, a secret she does not know.
        bob.rekey(secret(2), Epoch(11), &[LeafIndex(5)]).expect("rekey");
        // Under the old epoch key she still holds: refused.
        assert_eq!(bob.open(&mallory.seal(b"after").expect("seal")), Err(OpenError::RemovedSender));
        // Claiming the new epoch with the only secret she has: refused.
        let mut forged = sender(1, 11, 5);
        assert_eq!(bob.open(&forged.seal(b"after").expect("seal")), Err(OpenError::Authentication));
        // Carol's frames in flight under epoch 10 still open, and her new
        // ones under epoch 11.
        assert!(bob.open(&carol.seal(b"in flight").expect("seal")).is_ok());
        carol.rekey(&secret(2), Epoch(11)).expect("rekey");
        let opened = bob.open(&carol.seal(b"new").expect("seal")).expect("open");
        assert_eq!(opened.epoch, Epoch(11));
        // Two changes later epoch 10 is gone for everyone.
        bob.rekey(secret(3), Epoch(12), &[]).expect("rekey");
        let mut late = sender(1, 10, 2);
        assert_eq!(bob.open(&late.seal(b"late").expect("seal")), Err(OpenError::UnknownEpoch));
    }

    #[test]
    fn a_replayed_frame_is_refused() {
        let mut alice = sender(7, 3, 1);
        let mut bob = Receiver::new(secret(7), Epoch(3));
        let first = alice.seal(b"one").expect("seal");
        let second = alice.seal(b"two").expect("seal");
        assert!(bob.open(&second).is_ok());
        // Reordered but new: accepted.
        assert!(bob.open(&first).is_ok());
        assert_eq!(bob.open(&first), Err(OpenError::Replay));
        assert_eq!(bob.open(&second), Err(OpenError::Replay));
        // Far too old for the window.
        let old = alice.seal(b"old").expect("seal");
        for _ in 0..(REPLAY_WINDOW + 5) {
            bob.open(&alice.seal(b"x").expect("seal")).expect("open");
        }
        assert_eq!(bob.open(&old), Err(OpenError::Replay));
    }

    #[test]
    fn any_altered_byte_is_detected() {
        let mut alice = sender(7, 3, 1);
        let sealed = alice.seal(b"twenty ms of speech").expect("seal");
        for i in 0..sealed.len() {
            let mut bob = Receiver::new(secret(7), Epoch(3));
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(bob.open(&bad).is_err(), "flipped byte {i} opened");
        }
        let mut bob = Receiver::new(secret(7), Epoch(3));
        assert!(bob.open(&sealed[..sealed.len() - 1]).is_err());
        assert_eq!(bob.open(&[]), Err(OpenError::Malformed));
    }

    #[test]
    fn a_restarted_call_in_the_same_epoch_uses_another_key() {
        let mut first = sender(7, 3, 1);
        let mut second = sender(7, 3, 1);
        // Same epoch, sender and counter 0: different key ids, different bytes.
        let a = first.seal(b"same").expect("seal");
        let b = second.seal(b"same").expect("seal");
        assert_ne!(a, b);
        let mut bob = Receiver::new(secret(7), Epoch(3));
        assert_ne!(bob.open(&a).expect("open").context, bob.open(&b).expect("open").context);
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(EpochSecret::new(Zeroizing::new(vec![0; 15])).is_err());
        assert!(Sender::new(&secret(1), Epoch(1), LeafIndex(1 << 16), ContextId::random()).is_err());
        let mut bob = Receiver::new(secret(1), Epoch(5));
        assert!(bob.rekey(secret(2), Epoch(5), &[]).is_err());
        assert_eq!(format!("{:?}", secret(1)), "EpochSecret(redacted)");
    }

    /// A fixed context, epoch, index and secret give fixed bytes: the wire
    /// format of a call's media frame (RFC 9605 header + AES-GCM) is a
    /// visible decision.
    #[test]
    fn snapshot_of_a_sealed_frame() {
        let mut alice =
            Sender::new(&secret(0x42), Epoch(0x0105), LeafIndex(3), ContextId::from_bits(0x0a0b0c)).expect("sender");
        let sealed = alice.seal(b"opus").expect("seal");
        let hex: String = sealed.iter().map(|b| format!("{b:02x}")).collect();
        // d0: extended key id of 6 bytes, counter 0 in the config byte;
        // key id 0a0b0c|0003|05: context, leaf index, epoch's low 8 bits;
        // then AES-GCM of "opus" (4 bytes) and its 16-byte tag.
        assert_eq!(hex, "d00a0b0c000305e69fdcf0b20bdbd058d3b5d7b09b16dc601346a8");
    }
}

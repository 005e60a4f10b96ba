//! The store key, cached for the login session outside the process.
//!
//! Turning the passphrase into the store key (Argon2id, see [`crate::store`])
//! costs about 30 ms, on purpose, and every `subrosa` command paid it. As
//! ssh-agent keeps a decrypted key for the session, the derived key is kept
//! in the Linux kernel's session keyring (keyrings(7)) for a limited time
//! (default [`DEFAULT_TTL`]); the next commands of the session open the store
//! with it, without the passphrase.
//!
//! - Who can read it: processes of the same user that possess the session
//!   keyring (those of the same login session, or of no session: the
//!   user-session keyring), processes of the same user that join it, and
//!   root. Not other users: the key grants them nothing, and its owner's
//!   other processes only see that it exists.
//! - The entry holds the key and a check value of the passphrase that made
//!   it, HMAC-SHA-256 keyed with the store key: a command given a passphrase
//!   uses the cached key only when the check value matches, so a wrong
//!   passphrase is never accepted. (Whoever can read the entry holds the store
//!   key already; the check value lets them test guesses of the passphrase
//!   itself at hash speed, which matters only if it is used elsewhere too.)
//! - A key that does not open the store (stale, planted, damaged) is dropped
//!   and the passphrase is used as if nothing was cached; nothing in the store
//!   is changed by a wrong key. No keyring (another OS, a container whose
//!   seccomp policy refuses keyctl, a full quota) means no cache, silently.
//! - The lifetime is absolute from when the key was cached (as `ssh-add -t`),
//!   not renewed by use. [`KeyCache::forget`] (`subrosa lock`) drops it at once.

use std::path::Path;
use std::time::Duration;

use aws_lc_rs::hmac;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::store::{OnDisk, Store};
use crate::ClientError;

/// How long a derived key stays cached unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);

/// Entry format: magic, store key, passphrase check value.
const MAGIC: &[u8; 4] = b"SRK1";
const ENTRY_LEN: usize = 4 + 32 + 32;
const CHECK_LABEL: &[u8] = b"subrosa passphrase check v1\0";

/// Whether and for how long derived keys are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    ttl: Option<Duration>,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy { ttl: Some(DEFAULT_TTL) }
    }
}

impl CachePolicy {
    /// Nothing cached, and nothing cached earlier used.
    pub fn off() -> Self {
        CachePolicy { ttl: None }
    }

    /// Cache for `ttl` (at least one second; zero means off).
    pub fn for_duration(ttl: Duration) -> Self {
        if ttl.is_zero() {
            Self::off()
        } else {
            CachePolicy { ttl: Some(ttl.max(Duration::from_secs(1))) }
        }
    }

    /// How long keys are cached; `None` when off.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// Parses `off` (or `0`, `no`, `false`), or a lifetime: seconds, or a
    /// number with `s`, `m` or `h`.
    ///
    /// # Errors
    /// [`ClientError::Input`] for anything else, or more than a week.
    pub fn parse(s: &str) -> Result<Self, ClientError> {
        let s = s.trim().to_ascii_lowercase();
        if matches!(s.as_str(), "off" | "no" | "false" | "0") {
            return Ok(Self::off());
        }
        let bad = || ClientError::Input(format!("key cache {s:?}: give `off` or a lifetime such as 900, 15m or 1h"));
        let (digits, unit) = match s.char_indices().last() {
            Some((i, 's')) => (&s[..i], 1),
            Some((i, 'm')) => (&s[..i], 60),
            Some((i, 'h')) => (&s[..i], 3600),
            _ => (s.as_str(), 1),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let secs = n.checked_mul(unit).filter(|&t| t <= 7 * 24 * 3600).ok_or_else(bad)?;
        Ok(Self::for_duration(Duration::from_secs(secs)))
    }
}

impl std::str::FromStr for CachePolicy {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A store key read from the cache, with the check value of its passphrase.
struct CachedKey {
    key: Zeroizing<[u8; 32]>,
    check: [u8; 32],
}

impl std::fmt::Debug for CachedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CachedKey(..)")
    }
}

impl CachedKey {
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != ENTRY_LEN || &bytes[..4] != MAGIC {
            return None;
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&bytes[4..36]);
        let mut check = [0u8; 32];
        check.copy_from_slice(&bytes[36..]);
        Some(CachedKey { key, check })
    }

    /// True when `passphrase` is the one this key was derived from (in constant time).
    fn admits(&self, passphrase: &str) -> bool {
        let k = hmac::Key::new(hmac::HMAC_SHA256, self.key.as_ref());
        hmac::verify(&k, &check_message(passphrase), &self.check).is_ok()
    }
}

fn check_message(passphrase: &str) -> Zeroizing<Vec<u8>> {
    let mut m = Zeroizing::new(Vec::with_capacity(CHECK_LABEL.len() + passphrase.len()));
    m.extend_from_slice(CHECK_LABEL);
    m.extend_from_slice(passphrase.as_bytes());
    m
}

fn encode(key: &[u8; 32], passphrase: &str) -> Zeroizing<Vec<u8>> {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let check = hmac::sign(&k, &check_message(passphrase));
    let mut entry = Zeroizing::new(Vec::with_capacity(ENTRY_LEN));
    entry.extend_from_slice(MAGIC);
    entry.extend_from_slice(key);
    entry.extend_from_slice(check.as_ref());
    entry
}

fn entry_name(home: &Path) -> Option<String> {
    let canonical = home.canonicalize().ok()?;
    let kdf = std::fs::read(home.join(crate::store::KDF_FILE)).ok()?;
    let mut h = Sha256::new();
    h.update(b"subrosa key cache v1\0");
    h.update(canonical.to_string_lossy().as_bytes());
    h.update([0]);
    h.update(&kdf);
    Some(format!("subrosa:store-key:{}", hex::encode(&h.finalize()[..16])))
}

/// The cache entry of one store.
#[derive(Debug, Clone)]
pub struct KeyCache {
    /// `None` when the store's `kdf.json` cannot be read (no store: nothing to cache).
    name: Option<String>,
    policy: CachePolicy,
}

impl KeyCache {
    /// The entry of the store in `home`, named after its canonical path and
    /// its `kdf.json` (which holds a random salt): another store, or a
    /// store made again in the same place, never finds this one's key.
    pub fn for_home(home: &Path, policy: CachePolicy) -> Self {
        KeyCache { name: entry_name(home), policy }
    }

    /// The keyring entry's description (no secret: a hash of the store's
    /// path and public parameters), `None` when there is no store.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn lookup(&self) -> Option<CachedKey> {
        self.policy.ttl?;
        let bytes = keyring::read(self.name.as_ref()?)?;
        let cached = CachedKey::decode(&bytes);
        if cached.is_none() {
            self.forget();
        }
        cached
    }

    fn put(&self, key: &[u8; 32], passphrase: &str) {
        let (Some(ttl), Some(name)) = (self.policy.ttl, self.name.as_ref()) else {
            return;
        };
        keyring::write(name, &encode(key, passphrase), ttl);
    }

    /// Caches `key` as if derived from `passphrase`, whatever it opens: a
    /// stale or planted entry, for end-to-end tests (crates/cli/tests).
    #[cfg(feature = "test-senders")]
    pub fn plant(&self, key: &[u8; 32], passphrase: &str) {
        self.put(key, passphrase);
    }

    /// Caches raw bytes as the entry (a damaged one), for end-to-end tests.
    #[cfg(feature = "test-senders")]
    pub fn plant_raw(&self, entry: &[u8]) {
        if let (Some(ttl), Some(name)) = (self.policy.ttl, self.name.as_ref()) {
            keyring::write(name, entry, ttl);
        }
    }

    /// Drops the cached key now. True when there was one.
    pub fn forget(&self) -> bool {
        self.name.as_ref().is_some_and(|n| keyring::remove(n))
    }

    /// Opens the store with the cached key, without a passphrase. `None`
    /// when nothing (usable) is cached: ask for the passphrase and call
    /// [`KeyCache::open_with_passphrase`]. A cached key that does not open
    /// the store is dropped.
    ///
    /// # Errors
    /// [`ClientError::NotRegistered`] and database errors.
    pub fn open(&self, home: &Path) -> Result<Option<Store>, ClientError> {
        let Some(cached) = self.lookup() else {
            return Ok(None);
        };
        match Store::open_with_derived_key(home, &cached.key) {
            Ok(store) => Ok(Some(store)),
            Err(ClientError::WrongPassphrase) => {
                self.forget();
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens the store with `passphrase`: with the cached key when it was
    /// derived from this very passphrase, else by deriving the key (and then
    /// caching it, replacing a stale entry).
    ///
    /// # Errors
    /// [`ClientError::WrongPassphrase`] when the passphrase does not open
    /// the store (a cached key is kept then), [`ClientError::NotRegistered`],
    /// database errors.
    pub fn open_with_passphrase(&self, home: &Path, passphrase: &str) -> Result<Store, ClientError> {
        if let Some(cached) = self.lookup().filter(|c| c.admits(passphrase)) {
            match Store::open_with_derived_key(home, &cached.key) {
                Ok(store) => return Ok(store),
                Err(ClientError::WrongPassphrase) => {
                    self.forget();
                }
                Err(e) => return Err(e),
            }
        }
        let key = Store::derive_key(home, passphrase)?;
        let store = Store::open_with_derived_key(home, &key)?;
        self.put(&key, passphrase);
        Ok(store)
    }
}

/// The kernel keyring, best effort: every failure reads as "nothing cached".
#[cfg(target_os = "linux")]
mod keyring {
    use std::time::Duration;

    use linux_keyutils::{KeyPermissionsBuilder, KeyRing, KeyRingIdentifier, Permission};
    use zeroize::Zeroizing;

    /// The session keyring (the kernel falls back to the user-session
    /// keyring for a process outside any login session).
    fn session() -> Option<KeyRing> {
        KeyRing::from_special_id(KeyRingIdentifier::Session, false).ok()
    }

    pub(super) fn read(name: &str) -> Option<Zeroizing<Vec<u8>>> {
        let key = session()?.search(name).ok()?;
        // One byte more than an entry: a longer payload reads as damaged.
        let mut buf = Zeroizing::new(vec![0u8; super::ENTRY_LEN + 1]);
        let n = key.read(&mut *buf).ok()?;
        let len = buf.len();
        buf.truncate(n.min(len));
        Some(buf)
    }

    pub(super) fn write(name: &str, entry: &[u8], ttl: Duration) {
        let Some(ring) = session() else { return };
        let Ok(key) = ring.add_key(name, entry) else { return };
        let secs = usize::try_from(ttl.as_secs().max(1)).unwrap_or(usize::MAX);
        if key.set_timeout(secs).is_err() {
            // Never leave a key that would not expire.
            let _ = key.invalidate();
            return;
        }
        // The possessor may use and replace it, not link it into a longer-
        // lived keyring; the owner's other processes only see it exists.
        let perms = KeyPermissionsBuilder::builder()
            .posessor(
                Permission::VIEW | Permission::READ | Permission::WRITE | Permission::SEARCH | Permission::SETATTR,
            )
            .user(Permission::VIEW)
            .build();
        let _ = key.set_perms(perms);
    }

    pub(super) fn remove(name: &str) -> bool {
        let Some(key) = session().and_then(|r| r.search(name).ok()) else { return false };
        key.invalidate().is_ok()
    }

    /// True when this process can add to and read from its session keyring.
    pub(super) fn available() -> bool {
        let name = format!("subrosa:probe:{}", hex::encode(rand::random::<[u8; 8]>()));
        let Some(ring) = session() else { return false };
        let Ok(key) = ring.add_key(&name, b"probe") else { return false };
        let ok = key.read_to_vec().is_ok_and(|v| v == b"probe");
        let _ = key.invalidate();
        ok
    }
}

#[cfg(not(target_os = "linux"))]
mod keyring {
    use std::time::Duration;
    use zeroize::Zeroizing;

    pub(super) fn read(_name: &str) -> Option<Zeroizing<Vec<u8>>> {
        None
    }
    pub(super) fn write(_name: &str, _entry: &[u8], _ttl: Duration) {}
    pub(super) fn remove(_name: &str) -> bool {
        false
    }
    pub(super) fn available() -> bool {
        false
    }
}

/// True when `entry` (bytes read from the keyring, where any process of the
/// user may have put them) decodes as a cache entry whose check value admits
/// `passphrase`. For the fuzz target (`fuzz/fuzz_targets/key_cache_entry.rs`).
#[doc(hidden)]
pub fn entry_admits(entry: &[u8], passphrase: &str) -> bool {
    CachedKey::decode(entry).is_some_and(|c| c.admits(passphrase))
}

/// True when the session keyring works here (tests skip when it does not:
/// a container's seccomp policy often refuses keyctl).
pub fn available() -> bool {
    keyring::available()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parses() {
        assert_eq!(CachePolicy::parse("off").ok(), Some(CachePolicy::off()));
        assert_eq!(CachePolicy::parse("0").ok(), Some(CachePolicy::off()));
        assert_eq!(CachePolicy::parse("900").ok().and_then(|p| p.ttl()), Some(Duration::from_secs(900)));
        assert_eq!(CachePolicy::parse("15m").ok().and_then(|p| p.ttl()), Some(Duration::from_secs(900)));
        assert_eq!(CachePolicy::parse("2h").ok().and_then(|p| p.ttl()), Some(Duration::from_secs(7200)));
        assert_eq!(CachePolicy::parse("30s").ok().and_then(|p| p.ttl()), Some(Duration::from_secs(30)));
        for bad in ["", "m", "-5", "1d", "15 minutes", "99999999999999999999", "200h"] {
            assert!(CachePolicy::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn entry_checks_its_passphrase() {
        let key = [7u8; 32];
        let entry = encode(&key, "right");
        let cached = CachedKey::decode(&entry).expect("decodes");
        assert_eq!(*cached.key, key);
        assert!(cached.admits("right"));
        assert!(!cached.admits("wrong"));
        assert!(!cached.admits("righ"));
        assert!(!cached.admits(""));
        // Damaged or foreign entries are not read as keys.
        assert!(CachedKey::decode(&entry[..ENTRY_LEN - 1]).is_none());
        let mut other = entry.to_vec();
        other[0] ^= 1;
        assert!(CachedKey::decode(&other).is_none());
        assert!(!format!("{cached:?}").contains('7'));
    }

    /// The entry format is persisted (in the kernel, across processes of
    /// different versions): a change must be a visible decision.
    #[test]
    fn entry_snapshot() {
        let entry = encode(&[0x11; 32], "correct horse battery staple");
        assert_eq!(
            hex::encode(&*entry),
            "53524b31\
             1111111111111111111111111111111111111111111111111111111111111111\
             6556e108f3f6b828cf5510f7c79ea29f90d3d7dd445e5b265f0b01d9dd4ec2d3"
        );
    }
}

//! The client's local store: the trait, the in-memory backend and the
//! conformance suite live in `subrosa-session` (re-exported here); this
//! module adds the SQLCipher backend every real device keeps its data in.

use std::path::Path;

use zeroize::Zeroizing;

pub use subrosa_session::store::*;

use crate::ClientError;

mod sqlite;

pub use sqlite::SqliteStore;
pub(crate) use sqlite::KDF_FILE;

/// The store on disk: [`Store`] constructors over [`SqliteStore`].
pub trait OnDisk: Sized {
    /// True when `home` holds a store.
    fn exists(home: &Path) -> bool;

    /// Creates a new encrypted store in `home` (which must not hold one).
    ///
    /// # Errors
    /// [`ClientError::AlreadyRegistered`] or I/O and database errors.
    fn create(home: &Path, passphrase: &str) -> Result<Self, ClientError>;

    /// Opens the encrypted store in `home`, migrating it to this version's schema.
    ///
    /// # Errors
    /// [`ClientError::NotRegistered`] when there is none,
    /// [`ClientError::WrongPassphrase`] when the passphrase does not open it.
    fn open(home: &Path, passphrase: &str) -> Result<Self, ClientError>;

    /// The key of the store in `home` derived from `passphrase` (Argon2id
    /// with the parameters in `kdf.json`: the slow part of opening). Not
    /// checked here: [`OnDisk::open_with_derived_key`] tells a wrong one.
    ///
    /// # Errors
    /// [`ClientError::NotRegistered`] when there is no store, or a damaged `kdf.json`.
    fn derive_key(home: &Path, passphrase: &str) -> Result<Zeroizing<[u8; 32]>, ClientError>;

    /// Opens the store in `home` with a key from [`OnDisk::derive_key`]
    /// (possibly one cached for the session, see [`crate::keycache`]).
    ///
    /// # Errors
    /// [`ClientError::NotRegistered`] when there is none,
    /// [`ClientError::WrongPassphrase`] when the key does not open it.
    fn open_with_derived_key(home: &Path, key: &[u8; 32]) -> Result<Self, ClientError>;

    /// Removes a store that was being created when its command failed, and
    /// `home` itself when the command created it: no half-made account stays.
    fn remove_unfinished(home: &Path, home_existed: bool);
}

impl OnDisk for Store {
    fn exists(home: &Path) -> bool {
        SqliteStore::exists(home)
    }

    fn create(home: &Path, passphrase: &str) -> Result<Self, ClientError> {
        Ok(Store::new(SqliteStore::create(home, passphrase)?))
    }

    fn open(home: &Path, passphrase: &str) -> Result<Self, ClientError> {
        Ok(Store::new(SqliteStore::open(home, passphrase)?))
    }

    fn derive_key(home: &Path, passphrase: &str) -> Result<Zeroizing<[u8; 32]>, ClientError> {
        SqliteStore::derive_key(home, passphrase)
    }

    fn open_with_derived_key(home: &Path, key: &[u8; 32]) -> Result<Self, ClientError> {
        Ok(Store::new(SqliteStore::open_with_derived_key(home, key)?))
    }

    fn remove_unfinished(home: &Path, home_existed: bool) {
        SqliteStore::remove_unfinished(home, home_existed)
    }
}

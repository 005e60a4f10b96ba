//! Storage of the key-transparency directory: the byte-level tables behind
//! akd's `Database` trait (see `crate::kt`).
//!
//! A backend implements [`KtStorage`] over three tables of its own database:
//! `kt_records` (akd's tree nodes and its single `Azks` record, each under
//! akd's binary id), `kt_values` (every published value of every label,
//! one row per label and epoch) and `kt_epochs` (the root hash of every
//! epoch, for audits), plus the one-row `kt_vrf` table with the VRF private
//! key. The akd-specific encoding lives in `crate::kt`, so a second backend
//! (PostgreSQL) mirrors only these few statements.

use async_trait::async_trait;

use super::StoreError;

/// One published value of a label (akd's `ValueState`, flattened).
#[derive(Clone, PartialEq, Eq)]
pub struct KtValueRow {
    /// The label (the handle's bytes).
    pub label: Vec<u8>,
    /// The epoch it was published in.
    pub epoch: u64,
    /// The label's version (1 for the first value).
    pub version: u64,
    /// The value (32 bytes for Subrosa's directory values).
    pub value: Vec<u8>,
    /// The VRF-derived tree label: value bits.
    pub node_label_val: [u8; 32],
    /// The VRF-derived tree label: length in bits.
    pub node_label_len: u32,
}

impl std::fmt::Debug for KtValueRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KtValueRow")
            .field("label_bytes", &self.label.len())
            .field("epoch", &self.epoch)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Which value of a label to read (akd's `ValueStateRetrievalFlag`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtSelector {
    /// The value with this version.
    Version(u64),
    /// The value published in exactly this epoch.
    Epoch(u64),
    /// The newest value published at or before this epoch.
    AtOrBefore(u64),
    /// The newest value.
    Newest,
    /// The oldest value.
    Oldest,
}

/// What one atomic write holds: records (tree nodes, the `Azks`) by key,
/// values, and the root hash of a newly completed epoch.
#[derive(Debug, Default)]
pub struct KtWrite {
    /// `(key, encoded record)`; an existing key is overwritten.
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
    /// Values; an existing `(label, epoch)` is overwritten.
    pub values: Vec<KtValueRow>,
    /// `(epoch, root hash)` when this write completes an epoch.
    pub epoch_root: Option<(u64, [u8; 32])>,
}

/// Held while one node publishes an epoch; dropping it lets the next one.
pub struct KtPublishLock(pub Box<dyn Send + Sync>);

impl std::fmt::Debug for KtPublishLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KtPublishLock")
    }
}

/// The key-transparency tables of one database. Every method is atomic and
/// safe under concurrent calls from several tasks and server nodes.
#[async_trait]
pub trait KtStorage: Send + Sync + std::fmt::Debug {
    /// Serializes publishing across the server nodes sharing this database
    /// (two nodes publishing the same epoch number would corrupt the
    /// directory). `None`: the backend serves one node (SQLite), whose
    /// publishes the in-process lock already serializes.
    async fn kt_publish_lock(&self) -> Result<Option<KtPublishLock>, StoreError> {
        Ok(None)
    }

    /// Writes everything in `batch` in one transaction.
    ///
    /// # Errors
    /// Backend failures only.
    async fn kt_write(&self, batch: KtWrite) -> Result<(), StoreError>;

    /// The records among `keys` that exist, as `(key, encoded record)`, in
    /// no particular order.
    ///
    /// # Errors
    /// Backend failures only.
    async fn kt_records(&self, keys: Vec<Vec<u8>>) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError>;

    /// Every value of a label, oldest epoch first.
    ///
    /// # Errors
    /// Backend failures only.
    async fn kt_values(&self, label: Vec<u8>) -> Result<Vec<KtValueRow>, StoreError>;

    /// The value of each of `labels` that `selector` picks (labels without
    /// one are left out).
    ///
    /// # Errors
    /// Backend failures only.
    async fn kt_select(&self, labels: Vec<Vec<u8>>, selector: KtSelector) -> Result<Vec<KtValueRow>, StoreError>;

    /// Root hashes of the epochs `from..=to` that are stored, in order.
    ///
    /// # Errors
    /// Backend failures only.
    async fn kt_epoch_roots(&self, from: u64, to: u64) -> Result<Vec<(u64, [u8; 32])>, StoreError>;

    /// The VRF private key: the stored one, or else `candidate`, stored now
    /// (when several nodes race, all get the one stored first).
    ///
    /// # Errors
    /// Backend failures only.
    async fn kt_vrf_key(&self, candidate: [u8; 32]) -> Result<[u8; 32], StoreError>;

    /// The head-signing key's seed and the directory id: the stored ones,
    /// or else the candidates, stored now (racing nodes all get the first).
    ///
    /// # Errors
    /// Backend failures only.
    async fn kt_signing_key(
        &self,
        candidate: [u8; 32],
        directory_id: [u8; 16],
    ) -> Result<([u8; 32], [u8; 16]), StoreError>;

    /// The signed head stored for `epoch`, if any.
    ///
    /// # Errors
    /// Backend failures only.
    async fn kt_signed_head(&self, epoch: u64) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores `head` as the signed head of `epoch` unless one is stored
    /// already, and returns the stored one (durable when this returns).
    ///
    /// # Errors
    /// Backend failures only.
    async fn kt_put_signed_head(&self, epoch: u64, head: Vec<u8>) -> Result<Vec<u8>, StoreError>;

    /// The highest epoch with a signed head.
    ///
    /// # Errors
    /// Backend failures only.
    async fn kt_highest_signed(&self) -> Result<Option<u64>, StoreError>;
}

//! Key transparency: the server side of Meta's auditable key directory
//! (`akd` 0.13) over the server's own database.
//!
//! - Configuration: `akd::ExperimentalConfiguration<SubrosaLabel>`, whose
//!   domain label is [`subrosa_proto::kt::AKD_DOMAIN_LABEL`]. Clients verify
//!   with the same configuration.
//! - Label: the handle's bytes. Value: [`subrosa_proto::kt::directory_value`]
//!   of the identity key and all active devices.
//! - Storage: [`db::AkdDb`] over the backend's [`KtStorage`] tables. No
//!   directory state is kept across requests: every operation opens a fresh
//!   akd `Directory` whose cache lives as long as that operation, so a node
//!   always sees epochs another node published.
//! - VRF key: 32 random bytes from the OS generated at first start and kept
//!   in the `kt_vrf` row; [`KtVrf`] never prints it.
//! - Publishing: [`KtService::publish_and_wait`] queues a handle and returns
//!   once an epoch holding its current keys is committed; one publisher at a
//!   time per process, at most one epoch per `publish_interval`, and every
//!   handle queued meanwhile goes into the same epoch.
//! - Signed heads: every head handed out (`head`, and with every lookup
//!   proof) is a [`SignedHead`] by the directory's Ed25519 head-signing key
//!   ([`KtSigner`], generated at first start, stored in `kt_signing`, shared
//!   by every node). A head is signed at most once per epoch: it is stored
//!   under the epoch's primary key before it is served, and re-served from
//!   there; a directory whose latest epoch is behind a head this node
//!   signed (the database was restored from an older backup) refuses to
//!   open ([`KtService::open`], `docs/key-transparency.md`).

pub mod db;
pub mod memory;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use akd::ecvrf::{VRFKeyStorage, VrfError};
use akd::errors::{AkdError, StorageError};
use akd::storage::StorageManager;
use akd::{AkdLabel, AkdValue, AzksParallelismConfig, DomainLabel};
use async_trait::async_trait;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use protobuf::Message as _;
use subrosa_proto::kt::{KtAudit, KtHead, KtLookup, SignedHead, AKD_DOMAIN_LABEL, MAX_AUDIT_EPOCHS};
use subrosa_proto::{AccountInfo, DeviceAddress, Handle, B64};
use zeroize::Zeroizing;

use crate::store::kt::KtStorage;
use crate::store::StoreError;
pub use db::AkdDb;

/// The akd domain-separation label of Subrosa's directory.
#[derive(Debug, Clone, Copy)]
pub struct SubrosaLabel;

impl DomainLabel for SubrosaLabel {
    fn domain_label() -> &'static [u8] {
        AKD_DOMAIN_LABEL
    }
}

/// The akd configuration both sides use.
pub type Tc = akd::ExperimentalConfiguration<SubrosaLabel>;

type Dir = akd::Directory<Tc, AkdDb, KtVrf>;

/// Why a directory operation failed (one line; never key material).
#[derive(Debug, Clone, thiserror::Error)]
#[error("key directory: {0}")]
pub struct KtError(String);

impl From<AkdError> for KtError {
    fn from(e: AkdError) -> Self {
        KtError(e.to_string())
    }
}

impl From<StoreError> for KtError {
    fn from(e: StoreError) -> Self {
        KtError(e.to_string())
    }
}

impl KtError {
    /// The one-line description (never key material).
    pub fn detail(&self) -> &str {
        &self.0
    }
}

/// Why a [`KtService`] request was not answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KtServiceError {
    /// The store failed, or the handle is unknown ([`StoreError::UnknownHandle`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The directory failed.
    #[error(transparent)]
    Directory(#[from] KtError),
    /// The request asks for what the directory cannot have (an epoch past
    /// the latest, a range too long).
    #[error("{0}")]
    BadRequest(String),
    /// The directory does not hold the account's current keys, even after
    /// publishing them (a bug in us).
    #[error("the directory does not hold the account's current keys")]
    NotPublished,
}

/// What the directory's service reads and who may change its answers: the
/// stored accounts, and in test builds the malicious operator's
/// substitutions (forks, ghost devices, forged accounts). Every hook but
/// [`KtSource::account`] is the identity by default. The web layer
/// implements it over its state; the service knows nothing of HTTP.
#[async_trait]
pub trait KtSource: Send + Sync {
    /// The account's keys as stored now.
    ///
    /// # Errors
    /// Backend failures; an unknown handle is `Ok(None)`.
    async fn account(&self, handle: &Handle) -> Result<Option<AccountInfo>, StoreError>;

    /// The account as the directory publishes it.
    fn published_account(&self, info: AccountInfo) -> AccountInfo {
        info
    }

    /// After a real epoch was published with these updates.
    async fn after_publish(&self, _dir: &KtDirectory, _updates: &[(Vec<u8>, Vec<u8>)]) {}

    /// Another directory to show `viewer` than the real one (`None`: the real one).
    ///
    /// # Errors
    /// When the other directory cannot be made.
    async fn view(
        &self,
        _real: &KtDirectory,
        _viewer: Option<&DeviceAddress>,
    ) -> Result<Option<KtDirectory>, KtServiceError> {
        Ok(None)
    }

    /// Another account answer for `handle` to show `viewer`, proven in `view`.
    ///
    /// # Errors
    /// When the forged answer cannot be made.
    async fn forged_account(
        &self,
        _view: &KtDirectory,
        _viewer: Option<&DeviceAddress>,
        _handle: &Handle,
    ) -> Result<Option<AccountInfo>, KtServiceError> {
        Ok(None)
    }
}

/// The VRF private key, held in memory once loaded. Its `Debug` is redacted.
#[derive(Clone)]
pub struct KtVrf {
    key: Arc<Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for KtVrf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KtVrf(redacted)")
    }
}

#[async_trait]
impl VRFKeyStorage for KtVrf {
    async fn retrieve(&self) -> Result<Vec<u8>, VrfError> {
        Ok(self.key.to_vec())
    }
}

impl KtVrf {
    /// Loads the stored VRF key, or generates one from the OS RNG and stores
    /// it (first start).
    ///
    /// # Errors
    /// Backend failures.
    pub async fn load_or_create(storage: &dyn KtStorage) -> Result<Self, KtError> {
        use rand::RngCore as _;
        let mut candidate = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(candidate.as_mut());
        let key = storage.kt_vrf_key(*candidate).await?;
        Ok(KtVrf { key: Arc::new(Zeroizing::new(key)) })
    }
}

/// The head-signing key (Ed25519) and the directory id, held in memory once
/// loaded. Its `Debug` is redacted.
#[derive(Clone)]
pub struct KtSigner {
    pair: Arc<Ed25519KeyPair>,
    directory_id: [u8; 16],
}

impl std::fmt::Debug for KtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KtSigner(redacted)")
    }
}

impl KtSigner {
    /// Loads the stored head-signing key and directory id, or generates
    /// both from the OS RNG and stores them (first start; racing nodes all
    /// end up with the one stored first).
    ///
    /// # Errors
    /// Backend failures, or a stored key that is not an Ed25519 seed.
    pub async fn load_or_create(storage: &dyn KtStorage) -> Result<Self, KtError> {
        use rand::RngCore as _;
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(seed.as_mut());
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let (stored, directory_id) = storage.kt_signing_key(*seed, id).await?;
        let stored = Zeroizing::new(stored);
        let pair = Ed25519KeyPair::from_seed_unchecked(stored.as_ref())
            .map_err(|_| KtError("the stored head-signing key is not an Ed25519 key".into()))?;
        Ok(KtSigner { pair: Arc::new(pair), directory_id })
    }

    /// The public key clients pin.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The directory id.
    pub fn directory_id(&self) -> [u8; 16] {
        self.directory_id
    }

    /// Signs a head (the caller stores it before serving it).
    pub fn sign(&self, epoch: u64, root: [u8; 32], vrf_public_key: [u8; 32], signed_at_ms: u64) -> SignedHead {
        let mut head = SignedHead {
            directory_id: self.directory_id,
            epoch,
            root,
            vrf_public_key,
            signed_at_ms,
            signature: [0; 64],
        };
        let sig = self.pair.sign(&head.to_be_signed());
        head.signature.copy_from_slice(sig.as_ref());
        head
    }
}

/// The highest epoch (and its root) this node signed, kept in a file in its
/// data directory, outside the database: a database restored from an older
/// backup forgets the heads it signed since, the file does not.
#[derive(Debug)]
pub struct SignedMark {
    path: std::path::PathBuf,
    at: Mutex<Option<(u64, [u8; 32])>>,
}

impl SignedMark {
    /// Reads the mark at `path` (none yet when the file is missing).
    ///
    /// # Errors
    /// An unreadable or malformed file.
    pub fn open(path: std::path::PathBuf) -> Result<Self, KtError> {
        let at = match std::fs::read_to_string(&path) {
            Ok(text) => Some(parse_mark(&text).ok_or_else(|| KtError(format!("{} is malformed", path.display())))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(KtError(format!("cannot read {}: {e}", path.display()))),
        };
        Ok(SignedMark { path, at: Mutex::new(at) })
    }

    /// The highest epoch recorded and its root.
    pub fn get(&self) -> Option<(u64, [u8; 32])> {
        *self.at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a signed head durably (write, fsync, rename) when it is newer.
    fn raise(&self, epoch: u64, root: [u8; 32]) -> Result<(), KtError> {
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        if at.is_some_and(|(e, _)| e >= epoch) {
            return Ok(());
        }
        let fail =
            |e: std::io::Error| KtError(format!("cannot record the signed epoch in {}: {e}", self.path.display()));
        let tmp = self.path.with_extension("tmp");
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp).map_err(fail)?;
            f.write_all(format!("{epoch} {}\n", hex::encode(root)).as_bytes()).map_err(fail)?;
            f.sync_all().map_err(fail)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(fail)?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        *at = Some((epoch, root));
        Ok(())
    }
}

fn parse_mark(text: &str) -> Option<(u64, [u8; 32])> {
    let (epoch, root) = text.trim().split_once(' ')?;
    let root = <[u8; 32]>::try_from(hex::decode(root).ok()?.as_slice()).ok()?;
    Some((epoch.parse().ok()?, root))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Is this akd error "no such label / record"?
fn is_not_found(e: &AkdError) -> bool {
    matches!(e, AkdError::Storage(StorageError::NotFound(_)))
}

/// One directory (the real one over the database, or the attack fork).
#[derive(Debug, Clone)]
pub struct KtDirectory {
    db: AkdDb,
    vrf: KtVrf,
    vrf_public: [u8; 32],
    signer: KtSigner,
    /// Where this node records the highest head it signed (the real
    /// directory of a server with a data directory).
    mark: Option<Arc<SignedMark>>,
    parallelism: AzksParallelismConfig,
}

impl KtDirectory {
    /// Opens (creating when new) the directory in these tables with the
    /// stored VRF key (generated on first use).
    ///
    /// # Errors
    /// Backend failures.
    pub async fn open(storage: Arc<dyn KtStorage>) -> Result<Self, KtError> {
        let vrf = KtVrf::load_or_create(storage.as_ref()).await?;
        let signer = KtSigner::load_or_create(storage.as_ref()).await?;
        Self::open_with_keys(storage, vrf, signer).await
    }

    /// Opens a directory with given VRF and head-signing keys (the attack
    /// fork shares the real one's, so that both views look alike and both
    /// are signed).
    ///
    /// # Errors
    /// Backend failures.
    pub async fn open_with_keys(storage: Arc<dyn KtStorage>, vrf: KtVrf, signer: KtSigner) -> Result<Self, KtError> {
        let public = vrf.get_vrf_public_key().await.map_err(|e| KtError(e.to_string()))?;
        let dir = KtDirectory {
            db: AkdDb::new(storage),
            vrf,
            vrf_public: public.to_bytes(),
            signer,
            mark: None,
            parallelism: AzksParallelismConfig::default(),
        };
        // Creates the empty tree (epoch 0) when the tables are new.
        dir.fresh().await?;
        Ok(dir)
    }

    /// The VRF key (for a fork that shares it).
    pub fn vrf(&self) -> &KtVrf {
        &self.vrf
    }

    /// The VRF public key.
    pub fn vrf_public_key(&self) -> [u8; 32] {
        self.vrf_public
    }

    /// The head-signing key.
    pub fn signer(&self) -> &KtSigner {
        &self.signer
    }

    /// The signed head of `epoch`, whose root is `root`: the one stored,
    /// or a new one, stored (and recorded in the node's mark) before it is
    /// returned. Never signs a second head for an epoch.
    ///
    /// # Errors
    /// Backend failures, or a stored head for this epoch with another root
    /// (the directory no longer matches what was signed: refused).
    pub async fn signed_head(&self, epoch: u64, root: [u8; 32]) -> Result<SignedHead, KtError> {
        let storage = self.db.storage();
        let stored = match storage.kt_signed_head(epoch).await? {
            Some(bytes) => bytes,
            None => {
                let head = self.signer.sign(epoch, root, self.vrf_public, now_ms());
                storage.kt_put_signed_head(epoch, head.encode()).await?
            }
        };
        let head = SignedHead::decode(&stored)
            .map_err(|_| KtError(format!("the stored head of epoch {epoch} is malformed")))?;
        if head.root != root || head.directory_id != self.signer.directory_id {
            return Err(KtError(format!(
                "a different head was already signed for epoch {epoch}: refusing to sign a second one"
            )));
        }
        if let Some(mark) = &self.mark {
            mark.raise(epoch, root)?;
        }
        Ok(head)
    }

    /// The signed head of an earlier (or the latest) epoch, `None` when it
    /// does not exist.
    ///
    /// # Errors
    /// Backend or akd failures.
    pub async fn signed_head_at(&self, epoch: u64) -> Result<Option<SignedHead>, KtError> {
        let (latest, root) = self.fresh().await?.get_epoch_hash().await.map(|h| (h.0, h.1))?;
        if epoch > latest {
            return Ok(None);
        }
        let root = if epoch == latest {
            root
        } else {
            match self.db.storage().kt_epoch_roots(epoch, epoch).await?.first() {
                Some((_, r)) => *r,
                None => return Ok(None),
            }
        };
        Ok(Some(self.signed_head(epoch, root).await?))
    }

    fn head_answer(&self, head: &SignedHead) -> KtHead {
        KtHead {
            epoch: head.epoch,
            root_hash: B64(head.root.to_vec()),
            vrf_public_key: B64(self.vrf_public.to_vec()),
            signing_key: Some(B64(self.signer.public_key().to_vec())),
            signed: Some(B64(head.encode())),
        }
    }

    /// An akd directory for one operation: its cache starts empty and is
    /// dropped with it, so it never serves another node's stale records.
    async fn fresh(&self) -> Result<Dir, KtError> {
        let storage = StorageManager::new(self.db.clone(), None, None, None);
        Ok(akd::Directory::new(storage, self.vrf.clone(), self.parallelism).await?)
    }

    /// Publishes a new epoch with these labels' values (labels must be
    /// distinct; unchanged values are skipped and no epoch is made when
    /// nothing changed). Returns the latest epoch and its root hash.
    ///
    /// The caller makes sure only one publish runs at a time in this
    /// process; the backend's publish lock covers the other nodes.
    ///
    /// # Errors
    /// Backend or akd failures.
    pub async fn publish(&self, updates: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(u64, [u8; 32]), KtError> {
        let updates = updates.into_iter().map(|(l, v)| (AkdLabel(l), AkdValue(v))).collect();
        // Across nodes, one publisher at a time; the directory is read
        // afresh under the lock, so it builds on the other nodes' epochs.
        let _lock = self.db.storage().kt_publish_lock().await?;
        let hash = self.fresh().await?.publish(updates).await?;
        Ok((hash.0, hash.1))
    }

    /// The latest epoch, its root hash and the VRF public key.
    ///
    /// # Errors
    /// Backend or akd failures.
    pub async fn head(&self) -> Result<KtHead, KtError> {
        let hash = self.fresh().await?.get_epoch_hash().await?;
        let signed = self.signed_head(hash.0, hash.1).await?;
        Ok(self.head_answer(&signed))
    }

    /// The signed head of `epoch` as a [`KtHead`], `None` when the directory
    /// has no such epoch.
    ///
    /// # Errors
    /// Backend or akd failures.
    pub async fn head_at(&self, epoch: u64) -> Result<Option<KtHead>, KtError> {
        Ok(self.signed_head_at(epoch).await?.map(|h| self.head_answer(&h)))
    }

    /// The lookup proof of a label at the latest epoch, with the value it
    /// proves; `None` when the label was never published.
    ///
    /// # Errors
    /// Backend or akd failures.
    pub async fn lookup(&self, label: &[u8]) -> Result<Option<(KtLookup, Vec<u8>)>, KtError> {
        let (proof, hash) = match self.fresh().await?.lookup(AkdLabel(label.to_vec())).await {
            Ok(r) => r,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let value = proof.value.0.clone();
        let bytes = akd::proto::specs::types::LookupProof::from(&proof)
            .write_to_bytes()
            .map_err(|e| KtError(format!("encoding a lookup proof: {e}")))?;
        let signed = self.signed_head(hash.0, hash.1).await?;
        Ok(Some((
            KtLookup {
                epoch: hash.0,
                root_hash: B64(hash.1.to_vec()),
                proof: B64(bytes),
                signed_head: Some(B64(signed.encode())),
            },
            value,
        )))
    }

    /// Append-only proofs from `from` to `to` (checked by the caller:
    /// `1 <= from <= to <= latest`, at most [`MAX_AUDIT_EPOCHS`] apart).
    ///
    /// # Errors
    /// Backend or akd failures, or a missing root hash.
    pub async fn audit(&self, from: u64, to: u64) -> Result<KtAudit, KtError> {
        let roots = self.db.storage().kt_epoch_roots(from, to).await?;
        let expected: Vec<u64> = (from..=to).collect();
        if roots.iter().map(|(e, _)| *e).collect::<Vec<_>>() != expected {
            return Err(KtError(format!("root hashes of epochs {from} to {to} are not all stored")));
        }
        let mut proofs = Vec::new();
        if to > from {
            let proof = self.fresh().await?.audit(from, to).await?;
            for p in &proof.proofs {
                let bytes = akd::proto::specs::types::SingleAppendOnlyProof::from(p)
                    .write_to_bytes()
                    .map_err(|e| KtError(format!("encoding an append-only proof: {e}")))?;
                proofs.push(B64(bytes));
            }
        }
        Ok(KtAudit { from, to, root_hashes: roots.into_iter().map(|(_, h)| B64(h.to_vec())).collect(), proofs })
    }

    /// The latest epoch.
    ///
    /// # Errors
    /// Backend or akd failures.
    pub async fn latest_epoch(&self) -> Result<u64, KtError> {
        Ok(self.fresh().await?.get_epoch_hash().await?.0)
    }
}

/// Handles waiting for an epoch, and the number of the batch that will take them.
#[derive(Debug, Default)]
struct Queue {
    pending: BTreeSet<Handle>,
    next_batch: u64,
}

/// The directory of a running server and its publisher.
#[derive(Debug)]
pub struct KtService {
    dir: KtDirectory,
    queue: Mutex<Queue>,
    /// The last batch committed.
    published: AtomicU64,
    /// Held by the one publisher; holds when it last published.
    publish_lock: tokio::sync::Mutex<Option<Instant>>,
    interval: Duration,
}

impl KtService {
    /// The service over a store's tables.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn open(storage: Arc<dyn KtStorage>, interval: Duration) -> Result<Self, KtError> {
        Self::open_marked(storage, interval, None).await
    }

    /// [`Self::open`], recording every head this node signs in the file
    /// `mark` (see [`SignedMark`]), and refusing to open a directory that is
    /// behind a head signed before (by this node, per the mark, or by any
    /// node, per the stored heads): the database was restored from an older
    /// backup, and serving it would sign a second head for an epoch that
    /// clients may already hold.
    ///
    /// # Errors
    /// Backend failures; the refusal above.
    pub async fn open_marked(
        storage: Arc<dyn KtStorage>,
        interval: Duration,
        mark: Option<std::path::PathBuf>,
    ) -> Result<Self, KtError> {
        let mut dir = KtDirectory::open(Arc::clone(&storage)).await?;
        let latest = dir.fresh().await?.get_epoch_hash().await?;
        let refuse = |signed: u64| {
            KtError(format!(
                "the directory is at epoch {}, but a head was already signed for epoch {signed}: the database \
                 was restored from an older backup; restore the newest one (see docs/key-transparency.md)",
                latest.0
            ))
        };
        if let Some(h) = storage.kt_highest_signed().await? {
            if h > latest.0 {
                return Err(refuse(h));
            }
        }
        if let Some(path) = mark {
            let mark = SignedMark::open(path)?;
            if let Some((e, root)) = mark.get() {
                if e > latest.0 || (e == latest.0 && root != latest.1) {
                    return Err(refuse(e));
                }
            }
            dir.mark = Some(Arc::new(mark));
        }
        Ok(KtService {
            dir,
            queue: Mutex::new(Queue { pending: BTreeSet::new(), next_batch: 1 }),
            published: AtomicU64::new(0),
            publish_lock: tokio::sync::Mutex::new(None),
            interval,
        })
    }

    /// The real directory.
    pub fn directory(&self) -> &KtDirectory {
        &self.dir
    }

    /// Queues `handle` and returns once an epoch with its keys as they are
    /// now stored has been committed (publishing it when no other request
    /// is doing so).
    ///
    /// # Errors
    /// Backend or akd failures of the publish that should have held it.
    pub async fn publish_and_wait(&self, src: &dyn KtSource, handle: &Handle) -> Result<(), KtServiceError> {
        let ticket = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.pending.insert(handle.clone());
            q.next_batch
        };
        loop {
            if self.published.load(Ordering::Acquire) >= ticket {
                return Ok(());
            }
            let mut last = self.publish_lock.lock().await;
            if self.published.load(Ordering::Acquire) >= ticket {
                return Ok(());
            }
            if let Some(at) = *last {
                tokio::time::sleep_until((at + self.interval).into()).await;
            }
            let (batch, handles) = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                let batch = q.next_batch;
                q.next_batch += 1;
                (batch, std::mem::take(&mut q.pending))
            };
            let result = self.publish_batch(src, &handles).await;
            *last = Some(Instant::now());
            match result {
                Ok(()) => self.published.store(batch, Ordering::Release),
                Err(e) => {
                    let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                    q.pending.extend(handles);
                    return Err(e);
                }
            }
        }
    }

    async fn publish_batch(&self, src: &dyn KtSource, handles: &BTreeSet<Handle>) -> Result<(), KtServiceError> {
        let mut updates = Vec::with_capacity(handles.len());
        for handle in handles {
            if let Some(info) = src.account(handle).await? {
                let info = src.published_account(info);
                let value = subrosa_proto::kt::directory_value(info.identity_key.as_slice(), &info.devices);
                updates.push((handle.as_str().as_bytes().to_vec(), value.to_vec()));
            }
        }
        if updates.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let (epoch, _) = self.dir.publish(updates.clone()).await?;
        tracing::debug!(epoch, handles = updates.len(), ms = started.elapsed().as_millis() as u64, "published");
        src.after_publish(&self.dir, &updates).await;
        Ok(())
    }

    /// `account` with the directory's lookup proof for it at the latest
    /// epoch, from the view `viewer` is shown. When the directory does not
    /// hold these keys yet (a change not yet published, or published before
    /// a crash), they are published first; the answer's keys always match
    /// its proof.
    ///
    /// # Errors
    /// 404 unknown_handle; backend or akd failures.
    pub async fn account_with_proof(
        &self,
        src: &dyn KtSource,
        viewer: Option<&DeviceAddress>,
        handle: &Handle,
    ) -> Result<AccountInfo, KtServiceError> {
        let view = self.view(src, viewer).await?;
        if let Some(info) = src.forged_account(&view, viewer, handle).await? {
            return Ok(info);
        }
        for attempt in 0..3 {
            let info = src.account(handle).await?.ok_or(StoreError::UnknownHandle)?;
            let mut info = src.published_account(info);
            let value = subrosa_proto::kt::directory_value(info.identity_key.as_slice(), &info.devices);
            if let Some((kt, proven)) = view.lookup(handle.as_str().as_bytes()).await? {
                if proven == value {
                    info.kt = Some(kt);
                    return Ok(info);
                }
            }
            if attempt < 2 {
                self.publish_and_wait(src, handle).await?;
            }
        }
        Err(KtServiceError::NotPublished)
    }

    /// The lookup proof of a handle at the latest epoch as `viewer` sees
    /// the directory.
    ///
    /// # Errors
    /// 404 unknown_handle; backend or akd failures.
    pub async fn lookup(
        &self,
        src: &dyn KtSource,
        viewer: Option<&DeviceAddress>,
        handle: &Handle,
    ) -> Result<KtLookup, KtServiceError> {
        let view = self.view(src, viewer).await?;
        if let Some((kt, _)) = view.lookup(handle.as_str().as_bytes()).await? {
            return Ok(kt);
        }
        // Registered but not in the directory (a publish lost in a crash):
        // publish now.
        src.account(handle).await?.ok_or(StoreError::UnknownHandle)?;
        self.publish_and_wait(src, handle).await?;
        match view.lookup(handle.as_str().as_bytes()).await? {
            Some((kt, _)) => Ok(kt),
            None => Err(StoreError::UnknownHandle.into()),
        }
    }

    /// The head as `viewer` sees it.
    ///
    /// # Errors
    /// Backend or akd failures.
    pub async fn head(&self, src: &dyn KtSource, viewer: Option<&DeviceAddress>) -> Result<KtHead, KtServiceError> {
        Ok(self.view(src, viewer).await?.head().await?)
    }

    /// The signed head of `epoch` as `viewer` sees the directory.
    ///
    /// # Errors
    /// 400 bad_request for an epoch the directory does not have; backend or
    /// akd failures.
    pub async fn head_at(
        &self,
        src: &dyn KtSource,
        viewer: Option<&DeviceAddress>,
        epoch: u64,
    ) -> Result<KtHead, KtServiceError> {
        self.view(src, viewer)
            .await?
            .head_at(epoch)
            .await?
            .ok_or_else(|| KtServiceError::BadRequest(format!("epoch {epoch} is beyond the latest epoch")))
    }

    /// Append-only proofs as `viewer` sees the directory.
    ///
    /// # Errors
    /// 400 bad_request for a range that is not `1 <= from <= to <= latest`
    /// with at most [`MAX_AUDIT_EPOCHS`] between; backend or akd failures.
    pub async fn audit(
        &self,
        src: &dyn KtSource,
        viewer: Option<&DeviceAddress>,
        from: u64,
        to: u64,
    ) -> Result<KtAudit, KtServiceError> {
        if from == 0 || to < from || to - from > MAX_AUDIT_EPOCHS {
            return Err(KtServiceError::BadRequest(format!(
                "need 1 <= from <= to with to - from at most {MAX_AUDIT_EPOCHS}"
            )));
        }
        let view = self.view(src, viewer).await?;
        let latest = view.latest_epoch().await?;
        if to > latest {
            return Err(KtServiceError::BadRequest(format!("to is beyond the latest epoch {latest}")));
        }
        Ok(view.audit(from, to).await?)
    }

    /// The directory `viewer` is shown: the real one unless `src` shows
    /// another.
    async fn view(&self, src: &dyn KtSource, viewer: Option<&DeviceAddress>) -> Result<KtDirectory, KtServiceError> {
        Ok(match src.view(&self.dir, viewer).await? {
            Some(other) => other,
            None => self.dir.clone(),
        })
    }
}

/// Base64 of bytes (for logs of sizes and tests).
pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

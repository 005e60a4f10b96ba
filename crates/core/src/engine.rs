//! MLS conversations.
//!
//! Every conversation, 1:1 included, is an MLS group whose id is the
//! [`ConversationId`]. Its kind and name travel in a private group-context
//! extension, so the server never sees them (handshake messages are sent as
//! MLS PrivateMessages). Each device is its own member; its credential is a
//! [`DeviceCertificate`](crate::DeviceCertificate).
//!
//! The engine reads and writes MLS state only through the storage handles it
//! is given; callers wrap each call in their own database transaction so that
//! MLS state and what they derive from it are committed together.

use mls_rs::client_builder::MlsConfig;
use mls_rs::group::{CommitEffect, ReceivedMessage};
use mls_rs::mls_rules::{CommitOptions, DefaultMlsRules, EncryptionOptions};
use mls_rs::{
    Client, CryptoProvider, ExtensionList, GroupStateStorage, KeyPackageStorage, MlsMessage, ProtocolVersion,
};
use mls_rs_codec::{MlsDecode, MlsEncode, MlsSize};
use mls_rs_core::extension::{ExtensionType, MlsCodecExtension};
use subrosa_proto::{ConversationId, DeviceAddress, Epoch};

use crate::content::Content;
use crate::identity::{CertCache, CertificateIdentityProvider, DeviceCertificate, DeviceIdentity};
use crate::{CoreError, CIPHERSUITE, SUITES};

/// Private-use extension type carrying [`ConversationInfo`].
const CONVERSATION_INFO_EXT: u16 = 0xF5B0;

#[derive(Clone, Debug, PartialEq, Eq, MlsSize, MlsEncode, MlsDecode)]
struct ConversationInfoExt {
    kind: u8,
    name: Vec<u8>,
}

impl MlsCodecExtension for ConversationInfoExt {
    fn extension_type() -> ExtensionType {
        ExtensionType::new(CONVERSATION_INFO_EXT)
    }
}

/// Private-use extension type carrying the disappearing-messages timer
/// (absent: off). A separate extension so a client that does not know it
/// never meets it: MLS lets a group-context extension in only when every
/// member's leaf lists it among its capabilities, so the timer cannot be
/// turned on while a member runs a version without it (the commit is
/// refused before it is sent), and such a version cannot be added while it
/// is on.
const DISAPPEARING_EXT: u16 = 0xF5B1;

/// The disappearing-messages timer, in seconds (never 0: off is no extension).
#[derive(Clone, Debug, PartialEq, Eq, MlsSize, MlsEncode, MlsDecode)]
struct DisappearingExt {
    seconds: u32,
}

impl MlsCodecExtension for DisappearingExt {
    fn extension_type() -> ExtensionType {
        ExtensionType::new(DISAPPEARING_EXT)
    }
}

/// Direct (1:1) or group conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConversationKind {
    /// Two accounts.
    Direct,
    /// A named group.
    Group,
    /// The account's own devices and nobody else: where one device hands
    /// the others the account's new identity key. Never shown as a
    /// conversation.
    Own,
}

/// What members know about a conversation, carried inside the encryption.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationInfo {
    /// Direct or group.
    pub kind: ConversationKind,
    /// The group's name (empty for direct conversations).
    pub name: String,
}

impl ConversationInfo {
    /// A 1:1 conversation.
    pub fn direct() -> Self {
        ConversationInfo { kind: ConversationKind::Direct, name: String::new() }
    }

    /// The conversation of the account's own devices.
    pub fn own() -> Self {
        ConversationInfo { kind: ConversationKind::Own, name: String::new() }
    }

    fn to_ext(&self) -> ConversationInfoExt {
        let kind = match self.kind {
            ConversationKind::Direct => 1,
            ConversationKind::Group => 2,
            ConversationKind::Own => 3,
        };
        ConversationInfoExt { kind, name: self.name.as_bytes().to_vec() }
    }

    fn from_ext(ext: &ConversationInfoExt) -> Result<Self, CoreError> {
        let kind = match ext.kind {
            1 => ConversationKind::Direct,
            2 => ConversationKind::Group,
            3 => ConversationKind::Own,
            _ => return Err(CoreError::Malformed("conversation kind")),
        };
        let name = String::from_utf8(ext.name.clone()).map_err(|_| CoreError::Malformed("conversation name"))?;
        Ok(ConversationInfo { kind, name })
    }
}

/// What a staged commit changes.
enum Change<'a> {
    Add(&'a [Vec<u8>]),
    Remove(&'a [DeviceAddress]),
    Info(&'a ConversationInfo),
    /// The disappearing-messages timer in seconds (`None`: off).
    Disappearing(Option<u32>),
    /// Only the proposals already received.
    Pending,
    /// Nothing but fresh keys for this device's leaf and path: the periodic
    /// update that gives post-compromise security.
    Update,
    /// Fresh leaf and path keys under a new signing identity of this same
    /// device: a new certificate (the account's identity key rotated) or a
    /// new signature key (`devices rekey`).
    Credential(&'a DeviceIdentity),
    /// Moves the conversation to `suite` under the new id (MLS ReInit,
    /// RFC 9420 §11.2): the only proposal of its commit.
    ReInit(ConversationId, mls_rs::CipherSuite),
}

/// A member device as its verified certificate describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    /// MLS leaf index.
    pub index: u32,
    /// Handle and device.
    pub address: DeviceAddress,
    /// The account identity key that certified the device.
    pub identity_key: Vec<u8>,
    /// The device's signature key.
    pub device_key: Vec<u8>,
}

/// A roster indexed by device address.
fn by_address(roster: &[MemberInfo]) -> std::collections::HashMap<&DeviceAddress, &MemberInfo> {
    roster.iter().map(|m| (&m.address, m)).collect()
}

/// The exporter label of RFC 9605 §5.2.
const SFRAME_EXPORTER_LABEL: &[u8] = b"SFrame 1.0 Base Key";
/// `AEAD.Nk` of the calls' SFrame suite (AES-128-GCM).
const SFRAME_SECRET_LEN: usize = 16;

/// One epoch of a conversation as a call keys its media from it
/// ([`Engine::call_keying`]). The secret is zeroized on drop and never
/// printed.
pub struct CallKeying {
    /// The epoch.
    pub epoch: Epoch,
    /// This device's leaf index (the sender index in its SFrame key ids).
    pub own_index: u32,
    /// Every member device at this epoch.
    pub members: Vec<MemberInfo>,
    /// The SFrame base key of the epoch.
    pub secret: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for CallKeying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallKeying")
            .field("epoch", &self.epoch)
            .field("own_index", &self.own_index)
            .field("members", &self.members.len())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A staged commit to hand to the server. It is stored as pending in the
/// group state; apply it with [`Engine::confirm_commit`] once the server
/// accepted it, or drop it with [`Engine::discard_commit`].
#[derive(Debug)]
pub struct OutgoingCommit {
    /// The conversation.
    pub conversation: ConversationId,
    /// The epoch the commit was made in (the server's ordering guard).
    pub epoch: Epoch,
    /// The commit, for the current members other than this device.
    pub commit: Vec<u8>,
    /// Existing members that must process the commit.
    pub commit_recipients: Vec<DeviceAddress>,
    /// The Welcome for the added devices, if any.
    pub welcome: Option<Vec<u8>>,
    /// Devices the Welcome is for.
    pub welcome_recipients: Vec<DeviceAddress>,
    /// Every member device once the commit applies, this one included (the
    /// roster the server keeps for the conversation).
    pub members_after: Vec<DeviceAddress>,
}

/// What processing an incoming message produced.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// This device joined a conversation through a Welcome.
    Joined {
        /// The conversation.
        conversation: ConversationId,
        /// Its kind and name.
        info: ConversationInfo,
        /// Every member device, this one included.
        members: Vec<MemberInfo>,
    },
    /// An application message, authenticated as from `sender`.
    Message {
        /// The conversation.
        conversation: ConversationId,
        /// The verified sending device.
        sender: MemberInfo,
        /// What it says.
        content: Content,
        /// The conversation's disappearing-messages timer (seconds) as the
        /// group context says it where the message was read.
        disappearing: Option<u32>,
    },
    /// A commit moved the conversation to a new epoch.
    Commit {
        /// The conversation.
        conversation: ConversationId,
        /// The new epoch.
        epoch: Epoch,
        /// The committing device.
        committer: MemberInfo,
        /// Devices added.
        added: Vec<MemberInfo>,
        /// Devices removed.
        removed: Vec<MemberInfo>,
        /// True when this device was removed.
        removed_self: bool,
        /// Removed devices that had proposed to leave (the rest were removed by the committer).
        left: Vec<DeviceAddress>,
        /// The new kind and name, when the commit changed them.
        renamed: Option<ConversationInfo>,
        /// The new disappearing-messages timer in seconds (`Some(None)`:
        /// turned off), when the commit changed it.
        disappearing: Option<Option<u32>>,
        /// Devices still in the conversation whose keys changed, as
        /// `(before, after)`: a new signature key or a certificate by a new
        /// identity key (the committer's own leaf, when it changed its
        /// credential). `before` says which key vouched for the device.
        updated: Vec<(MemberInfo, MemberInfo)>,
        /// The commit moved the conversation (MLS ReInit): the new
        /// conversation's id and suite. The old one takes nothing more
        /// (no commit, and this device sends nothing there); the members
        /// continue in the new one once a member sends its Welcome
        /// ([`Engine::join_resuming`]).
        moved_to: Option<(ConversationId, mls_rs::CipherSuite)>,
    },
    /// A member proposed to leave; some member must commit it
    /// ([`Engine::commit_pending`]).
    LeaveProposed {
        /// The conversation.
        conversation: ConversationId,
        /// The leaving device.
        member: MemberInfo,
    },
    /// Something with no effect for the user.
    Other,
}

/// The MLS rules every device applies to the commits it makes and the
/// ones it processes: mls-rs's defaults with the engine's options, and a
/// move (ReInit) only to the post-quantum suite, in MLS 1.0, under a
/// conversation id, from a classical conversation. A member that commits
/// another (a move back to the classical suite, to record now and break
/// later) is refused like any commit that cannot be processed.
#[derive(Clone, Debug)]
struct Rules(DefaultMlsRules);

impl mls_rs::MlsRules for Rules {
    type Error = CoreError;

    fn filter_proposals(
        &self,
        _direction: mls_rs::mls_rules::CommitDirection,
        _source: mls_rs::mls_rules::CommitSource,
        _roster: &mls_rs::group::Roster,
        context: &mls_rs::group::GroupContext,
        proposals: mls_rs::mls_rules::ProposalBundle,
    ) -> Result<mls_rs::mls_rules::ProposalBundle, CoreError> {
        for r in proposals.reinit_proposals() {
            let r = &r.proposal;
            let allowed = r.new_cipher_suite() == crate::PQ_CIPHERSUITE
                && context.cipher_suite != crate::PQ_CIPHERSUITE
                && r.new_version() == ProtocolVersion::MLS_10
                && r.group_id().len() == 16;
            if !allowed {
                return Err(CoreError::Unsupported("a move to another suite than the post-quantum one"));
            }
        }
        Ok(proposals)
    }

    fn commit_options(
        &self,
        roster: &mls_rs::group::Roster,
        context: &mls_rs::group::GroupContext,
        proposals: &mls_rs::mls_rules::ProposalBundle,
    ) -> Result<CommitOptions, CoreError> {
        self.0.commit_options(roster, context, proposals).map_err(|e| match e {})
    }

    fn encryption_options(
        &self,
        roster: &mls_rs::group::Roster,
        context: &mls_rs::group::GroupContext,
    ) -> Result<EncryptionOptions, CoreError> {
        self.0.encryption_options(roster, context).map_err(|e| match e {})
    }
}

/// The mls-rs configuration the engine builds its clients with.
type EngineConfig<C, G, K> = mls_rs::client_builder::MakeConfig<
    mls_rs::client_builder::WithMlsRules<
        Rules,
        mls_rs::client_builder::WithKeyPackageRepo<
            K,
            mls_rs::client_builder::WithGroupStateStorage<
                G,
                mls_rs::client_builder::WithIdentityProvider<
                    CertificateIdentityProvider<C>,
                    mls_rs::client_builder::WithCryptoProvider<C, mls_rs::client_builder::BaseConfig>,
                >,
            >,
        >,
    >,
>;

/// Groups kept in memory while a batch of application messages is
/// processed ([`Engine::begin_batch`]), written once at its end; by the
/// thread that runs the batch (others never see them).
type BatchGroups<C, G, K> = std::collections::HashMap<ConversationId, mls_rs::Group<EngineConfig<C, G, K>>>;
type Batch<C, G, K> = std::sync::Arc<std::sync::Mutex<Option<(std::thread::ThreadId, BatchGroups<C, G, K>)>>>;

/// A digest that names a group's stored state: equal digests, equal stored
/// bytes. The store computes it; the engine only compares.
pub type StateVersion = [u8; 32];

/// How the engine tells whether a group it kept loaded in memory is still
/// the one stored ([`Engine::with_loaded_groups`]). Versions name stored
/// bytes, so a group kept after it wrote (or read) version `v` is the group
/// any load of `v` would decode, whoever wrote `v` and whenever: a
/// transaction rolled back, another process's write or a restored backup
/// all show as another version, and the group is read again.
pub trait GroupVersions: Send + Sync {
    /// The version of the group's state stored now; `None` when the store
    /// cannot say (the group is then always read from the store).
    fn stored_version(&self, group_id: &[u8]) -> Option<StateVersion>;

    /// The version of the state this thread's last read or write of the
    /// group through the storage saw (in the same transaction as the
    /// bytes), taken: a second call says `None`.
    fn take_last(&self, group_id: &[u8]) -> Option<StateVersion>;
}

/// A loaded MLS group of the engine's configuration.
type MlsGroup<C, G, K> = mls_rs::Group<EngineConfig<C, G, K>>;

/// A group with the version of the stored state it equals, if known.
type VersionedGroup<C, G, K> = (MlsGroup<C, G, K>, Option<StateVersion>);

/// What a storage adapter remembers for [`GroupVersions::take_last`]: per
/// thread and group, the version of the state it last read or wrote.
/// Clones share it, as the adapter's clones (one in each mls-rs client
/// config, one handed to the engine) must.
#[derive(Clone, Debug, Default)]
pub struct LastVersions(std::sync::Arc<std::sync::Mutex<LastVersionMap>>);

type LastVersionMap = std::collections::HashMap<(std::thread::ThreadId, Vec<u8>), StateVersion>;

impl LastVersions {
    /// Remembers that this thread just read or wrote `version` of the
    /// group (`None`: a state with no version, forgetting any earlier one).
    pub fn note(&self, group_id: &[u8], version: Option<StateVersion>) {
        let key = (std::thread::current().id(), group_id.to_vec());
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match version {
            Some(v) => last.insert(key, v),
            None => last.remove(&key),
        };
    }

    /// What [`Self::note`] last said for this thread and group, taken.
    pub fn take(&self, group_id: &[u8]) -> Option<StateVersion> {
        let key = (std::thread::current().id(), group_id.to_vec());
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&key)
    }
}

/// Groups kept loaded across calls, newest first, each with the version
/// of the stored state it equals.
struct LoadedGroups<C, G, K>
where
    C: CryptoProvider + Clone + 'static,
    G: GroupStateStorage + Clone + 'static,
    K: KeyPackageStorage + Clone + 'static,
{
    versions: Option<std::sync::Arc<dyn GroupVersions>>,
    capacity: usize,
    groups: std::collections::VecDeque<(ConversationId, StateVersion, MlsGroup<C, G, K>)>,
}

/// The protocol engine of one device.
pub struct Engine<C, G, K>
where
    C: CryptoProvider + Clone + 'static,
    G: GroupStateStorage + Clone + 'static,
    K: KeyPackageStorage + Clone + 'static,
{
    crypto: C,
    /// Replaced whole when the account's identity key or this device's
    /// signature key rotates ([`Engine::set_identity`]).
    /// Clones share it: they are the same device.
    identity: std::sync::Arc<std::sync::RwLock<std::sync::Arc<DeviceIdentity>>>,
    groups: G,
    key_packages: K,
    /// Shared by clones, like the identity.
    batch: Batch<C, G, K>,
    /// Certificates decoded and verified, each once (shared by clones).
    certs: std::sync::Arc<CertCache>,
    /// Each conversation's roster, by the tree hash it was read at (shared
    /// by clones): a send does not walk the whole roster, and a commit reads
    /// only the roster it makes.
    recipients: std::sync::Arc<std::sync::Mutex<RosterCache>>,
    /// Groups kept loaded between calls (shared by clones; off unless
    /// [`Engine::with_loaded_groups`] turned it on).
    loaded: std::sync::Arc<std::sync::Mutex<LoadedGroups<C, G, K>>>,
}

/// Per conversation: the tree hash, every member device, and the member
/// devices but this one. The tree hash changes with any change of the tree
/// (credentials included), so an entry is never used for another roster.
type RosterCache = std::collections::HashMap<ConversationId, CachedRoster>;

/// One conversation's entry in the [`RosterCache`].
#[derive(Clone)]
struct CachedRoster {
    tree_hash: Vec<u8>,
    members: std::sync::Arc<Vec<MemberInfo>>,
    others: std::sync::Arc<Vec<DeviceAddress>>,
}

impl<C, G, K> Clone for Engine<C, G, K>
where
    C: CryptoProvider + Clone + 'static,
    G: GroupStateStorage + Clone + 'static,
    K: KeyPackageStorage + Clone + 'static,
{
    fn clone(&self) -> Self {
        Engine {
            crypto: self.crypto.clone(),
            identity: self.identity.clone(),
            groups: self.groups.clone(),
            key_packages: self.key_packages.clone(),
            batch: self.batch.clone(),
            certs: self.certs.clone(),
            recipients: self.recipients.clone(),
            loaded: self.loaded.clone(),
        }
    }
}

impl<C, G, K> std::fmt::Debug for Engine<C, G, K>
where
    C: CryptoProvider + Clone + 'static,
    G: GroupStateStorage + Clone + 'static,
    K: KeyPackageStorage + Clone + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("identity", &self.identity).finish_non_exhaustive()
    }
}

/// Whether an MLS message is a PrivateMessage carrying application data,
/// read from its public header (RFC 9420 §6.3: version, wire format,
/// group id, epoch, content type). Anything unexpected counts as "no", which
/// only costs the caller some work.
fn is_application_message(bytes: &[u8]) -> bool {
    const PRIVATE_MESSAGE: u16 = 2;
    const APPLICATION: u8 = 1;
    let mut rest = bytes;
    let header = (|| {
        let _version = u16::mls_decode(&mut rest).ok()?;
        let wire = u16::mls_decode(&mut rest).ok()?;
        let _group_id = Vec::<u8>::mls_decode(&mut rest).ok()?;
        let _epoch = u64::mls_decode(&mut rest).ok()?;
        let content_type = u8::mls_decode(&mut rest).ok()?;
        Some((wire, content_type))
    })();
    header == Some((PRIVATE_MESSAGE, APPLICATION))
}

/// The suite of a key package, read without checking anything else.
///
/// # Errors
/// [`CoreError::Malformed`] when it is not a key package.
pub fn key_package_suite(bytes: &[u8]) -> Result<mls_rs::CipherSuite, CoreError> {
    let msg = MlsMessage::from_bytes(bytes).map_err(|_| CoreError::Malformed("key package"))?;
    Ok(msg.as_key_package().ok_or(CoreError::Malformed("key package"))?.cipher_suite())
}

fn conversation_id(bytes: &[u8]) -> Result<ConversationId, CoreError> {
    ConversationId::from_slice(bytes).map_err(|_| CoreError::Malformed("conversation id"))
}

impl<C, G, K> Engine<C, G, K>
where
    C: CryptoProvider + Clone + 'static,
    G: GroupStateStorage + Clone + 'static,
    K: KeyPackageStorage + Clone + 'static,
{
    /// An engine for `identity` over the given storage.
    pub fn new(crypto: C, identity: DeviceIdentity, groups: G, key_packages: K) -> Self {
        Engine {
            crypto,
            identity: std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(identity))),
            groups,
            key_packages,
            batch: std::sync::Arc::new(std::sync::Mutex::new(None)),
            certs: std::sync::Arc::new(CertCache::new()),
            recipients: std::sync::Arc::default(),
            loaded: std::sync::Arc::new(std::sync::Mutex::new(LoadedGroups {
                versions: None,
                capacity: 0,
                groups: std::collections::VecDeque::new(),
            })),
        }
    }

    /// Keeps up to `capacity` groups loaded in memory between calls, so that
    /// a message to or from a large group does not decode its whole state
    /// (about 5 MB at 10,000 members) first. Before a kept group is used,
    /// `versions` must say the stored state is still the version it was
    /// kept at; otherwise it is dropped and the group read again. Writes
    /// are unchanged: every change is stored before the call returns.
    #[must_use]
    pub fn with_loaded_groups(self, versions: std::sync::Arc<dyn GroupVersions>, capacity: usize) -> Self {
        {
            let mut l = self.lock_loaded();
            l.versions = Some(versions);
            l.capacity = capacity;
            l.groups.clear();
        }
        self
    }

    fn lock_loaded(&self) -> std::sync::MutexGuard<'_, LoadedGroups<C, G, K>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The kept group of `conversation`, taken out, if the store still holds
    /// the version it was kept at (else it is dropped).
    fn take_loaded(&self, conversation: &ConversationId) -> Option<(MlsGroup<C, G, K>, StateVersion)> {
        let (versions, kept) = {
            let mut l = self.lock_loaded();
            let versions = l.versions.clone()?;
            let at = l.groups.iter().position(|(c, _, _)| c == conversation)?;
            (versions, l.groups.remove(at)?)
        };
        let (_, version, group) = kept;
        // Asked outside the lock: the store may wait for a transaction.
        (versions.stored_version(conversation.as_bytes()) == Some(version)).then_some((group, version))
    }

    /// Keeps `group`, which equals the stored state of `version`.
    fn keep_loaded(
        &self,
        conversation: &ConversationId,
        version: Option<StateVersion>,
        group: mls_rs::Group<EngineConfig<C, G, K>>,
    ) {
        let Some(version) = version else { return };
        let mut l = self.lock_loaded();
        if l.capacity == 0 {
            return;
        }
        l.groups.retain(|(c, _, _)| c != conversation);
        l.groups.push_front((*conversation, version, group));
        let capacity = l.capacity;
        l.groups.truncate(capacity);
    }

    /// The version the storage last saw for this thread's read or write of
    /// the group (`None` without [`Self::with_loaded_groups`]).
    fn last_version(&self, conversation: &ConversationId) -> Option<StateVersion> {
        let versions = self.lock_loaded().versions.clone()?;
        versions.take_last(conversation.as_bytes())
    }

    /// Writes `group`'s state, then keeps it loaded at the version written.
    fn save(
        &self,
        conversation: &ConversationId,
        mut group: mls_rs::Group<EngineConfig<C, G, K>>,
    ) -> Result<(), CoreError> {
        // A version left by an earlier read must not name this write.
        let _ = self.last_version(conversation);
        group.write_to_storage()?;
        let version = self.last_version(conversation);
        self.keep_loaded(conversation, version, group);
        Ok(())
    }

    /// Runs `f` on the groups of this thread's batch, if it runs one.
    fn with_batch<T>(&self, f: impl FnOnce(&mut BatchGroups<C, G, K>) -> T) -> Option<T> {
        let mut b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        match b.as_mut() {
            Some((owner, groups)) if *owner == std::thread::current().id() => Some(f(groups)),
            _ => None,
        }
    }

    /// Starts a batch: until [`Self::end_batch`], application messages are
    /// processed and encrypted on groups kept in memory, and their state is
    /// written once, at the end, instead of after every message (a catch-up
    /// of a large group, or a flush of several queued sends, otherwise
    /// decodes and re-encodes its whole tree per message). A ciphertext
    /// encrypted in a batch must not leave the device before the batch's
    /// state is written and committed: a crash would reuse its key.
    /// Anything else done to a conversation in the batch (a commit, a
    /// lookup, a send) first writes its group back, so it sees the state as
    /// of now. The caller runs the whole batch in one store transaction and
    /// must abandon it ([`Self::abort_batch`], rolling the transaction back)
    /// when any call in it failed: a failed message may have left its
    /// group's in-memory state changed. Only the thread that began the
    /// batch uses it (a batch never spans an await); another thread's calls
    /// meanwhile go to the store, whose transaction gate makes them wait
    /// for the batch's transaction to end.
    pub fn begin_batch(&self) {
        let mut b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        *b = Some((std::thread::current().id(), std::collections::HashMap::new()));
    }

    /// Writes every group the batch kept in memory, and ends it.
    ///
    /// # Errors
    /// [`CoreError::Mls`] when a write fails (then the batch is abandoned).
    pub fn end_batch(&self) -> Result<(), CoreError> {
        let groups = self.with_batch(std::mem::take).unwrap_or_default();
        self.abort_batch();
        for (conversation, g) in groups {
            self.save(&conversation, g)?;
        }
        Ok(())
    }

    /// Ends this thread's batch without writing what it kept in memory.
    pub fn abort_batch(&self) {
        let mut b = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        if b.as_ref().is_some_and(|(owner, _)| *owner == std::thread::current().id()) {
            *b = None;
        }
    }

    /// Writes back the group the batch keeps for `conversation`, if any.
    fn flush_batched(&self, conversation: &ConversationId) -> Result<(), CoreError> {
        let kept = self.with_batch(|b| b.remove(conversation)).flatten();
        if let Some(g) = kept {
            self.save(conversation, g)?;
        }
        Ok(())
    }

    /// This device's identity (a snapshot: a rotation replaces it).
    pub fn identity(&self) -> std::sync::Arc<DeviceIdentity> {
        match self.identity.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces this device's identity once a rotation is published: new
    /// key packages and new conversations use it. Each existing
    /// conversation changes its leaf with a [`Self::update_credential`]
    /// commit.
    pub fn set_identity(&self, identity: DeviceIdentity) {
        let new = std::sync::Arc::new(identity);
        match self.identity.write() {
            Ok(mut g) => *g = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
        // Kept groups were loaded by a client of the old identity.
        self.lock_loaded().groups.clear();
    }

    /// The crypto provider.
    pub fn crypto(&self) -> &C {
        &self.crypto
    }

    /// The mls-rs client of this device. Its suite is what new groups and
    /// key packages use; loading, joining and processing take the suite of
    /// the group or Welcome (both suites sign with the same Ed25519 key).
    fn client(&self) -> Result<Client<EngineConfig<C, G, K>>, CoreError> {
        self.client_in(CIPHERSUITE)
    }

    fn client_in(&self, suite: mls_rs::CipherSuite) -> Result<Client<EngineConfig<C, G, K>>, CoreError> {
        if !SUITES.contains(&suite) || self.crypto.cipher_suite_provider(suite).is_none() {
            return Err(CoreError::Unsupported("ciphersuite"));
        }
        let identity = self.identity();
        let rules = DefaultMlsRules::new()
            // Handshakes are PrivateMessages: membership changes and the
            // group name are hidden from the server. Padding hides lengths.
            .with_encryption_options(EncryptionOptions::new(true, mls_rs::client_builder::PaddingMode::StepFunction))
            // Every commit this device makes replaces its own leaf and path
            // keys (RFC 9420 §12.4): each one heals a past compromise of
            // this device's state, not only the periodic updates.
            .with_commit_options(CommitOptions::new().with_path_required(true));
        Ok(Client::builder()
            .crypto_provider(self.crypto.clone())
            .identity_provider(CertificateIdentityProvider::with_cache(self.crypto.clone(), self.certs.clone()))
            .group_state_storage(self.groups.clone())
            .key_package_repo(self.key_packages.clone())
            .extension_type(ExtensionType::new(CONVERSATION_INFO_EXT))
            .extension_type(ExtensionType::new(DISAPPEARING_EXT))
            .mls_rules(Rules(rules))
            .signing_identity(identity.signing_identity()?, identity.device_secret().clone(), suite)
            .build())
    }

    /// Generates a key package of the classical suite; its private keys go
    /// to the key package storage.
    ///
    /// # Errors
    /// [`CoreError::Mls`] on a storage or crypto failure.
    pub fn generate_key_package(&self) -> Result<Vec<u8>, CoreError> {
        self.generate_key_package_in(CIPHERSUITE)
    }

    /// Generates a key package of `suite` (one of [`SUITES`]).
    ///
    /// # Errors
    /// [`CoreError::Unsupported`] for another suite; [`CoreError::Mls`] on a
    /// storage or crypto failure.
    pub fn generate_key_package_in(&self, suite: mls_rs::CipherSuite) -> Result<Vec<u8>, CoreError> {
        let msg =
            self.client_in(suite)?.generate_key_package_message(ExtensionList::new(), ExtensionList::new(), None)?;
        Ok(msg.to_bytes()?)
    }

    /// The suite of a key package ([`key_package_suite`]).
    ///
    /// # Errors
    /// [`CoreError::Malformed`] when it is not a key package.
    pub fn key_package_suite(bytes: &[u8]) -> Result<mls_rs::CipherSuite, CoreError> {
        key_package_suite(bytes)
    }

    /// Checks a key package from the server and returns the device
    /// certificate it carries (verified against its own identity key; the
    /// caller compares that key with the one it expects for the handle).
    ///
    /// # Errors
    /// [`CoreError::Malformed`], [`CoreError::BadSignature`] or [`CoreError::IdentityMismatch`].
    pub fn inspect_key_package(&self, bytes: &[u8]) -> Result<DeviceCertificate, CoreError> {
        let msg = MlsMessage::from_bytes(bytes).map_err(|_| CoreError::Malformed("key package"))?;
        let kp = msg.as_key_package().ok_or(CoreError::Malformed("key package"))?;
        if !SUITES.contains(&kp.cipher_suite()) {
            return Err(CoreError::Malformed("key package ciphersuite"));
        }
        Ok((*self.certs.from_signing_identity(&self.crypto, kp.signing_identity())?).clone())
    }

    fn member_info(&self, m: &mls_rs::group::Member) -> Result<MemberInfo, CoreError> {
        let cert = self.certs.of_roster_member(&m.signing_identity)?;
        Ok(MemberInfo {
            index: m.index,
            address: cert.address(),
            identity_key: cert.identity_key().to_vec(),
            device_key: cert.device_key().to_vec(),
        })
    }

    /// Every member device but this one, read once per tree.
    fn recipients_of<Cfg: MlsConfig>(
        &self,
        conversation: &ConversationId,
        group: &mls_rs::Group<Cfg>,
    ) -> Result<std::sync::Arc<Vec<DeviceAddress>>, CoreError> {
        self.cached_roster(conversation, group, |r| r.others.clone())
    }

    /// Every member device, read once per tree.
    fn roster_of<Cfg: MlsConfig>(
        &self,
        conversation: &ConversationId,
        group: &mls_rs::Group<Cfg>,
    ) -> Result<std::sync::Arc<Vec<MemberInfo>>, CoreError> {
        self.cached_roster(conversation, group, |r| r.members.clone())
    }

    /// `pick` of the conversation's cached roster, read and cached first
    /// when the tree changed since.
    fn cached_roster<Cfg: MlsConfig, T>(
        &self,
        conversation: &ConversationId,
        group: &mls_rs::Group<Cfg>,
        pick: impl Fn(&CachedRoster) -> T,
    ) -> Result<T, CoreError> {
        let tree_hash = &group.context().tree_hash;
        let lock = || self.recipients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = lock().get(conversation) {
            if &entry.tree_hash == tree_hash {
                return Ok(pick(entry));
            }
        }
        let members = self.members_of(group)?;
        Ok(pick(&self.remember_roster(conversation, tree_hash, members)))
    }

    /// Caches `members` as the roster of `conversation` at `tree_hash`.
    fn remember_roster(
        &self,
        conversation: &ConversationId,
        tree_hash: &[u8],
        members: Vec<MemberInfo>,
    ) -> CachedRoster {
        let me = self.identity().address();
        let others = members.iter().map(|m| m.address.clone()).filter(|a| *a != me).collect();
        let entry = CachedRoster {
            tree_hash: tree_hash.to_vec(),
            members: std::sync::Arc::new(members),
            others: std::sync::Arc::new(others),
        };
        self.recipients.lock().unwrap_or_else(|p| p.into_inner()).insert(*conversation, entry.clone());
        entry
    }

    /// The roster after a commit, from the one before it: only the leaves
    /// the commit can have changed are read again (the committer's, each
    /// updater's, each removed one, and the blank leaves and those past the
    /// end that an add or an external join fills; RFC 9420 §12.3). Reading
    /// every leaf again cost O(members) certificate lookups per commit,
    /// most of an add's processing in a large group. A commit with a kind
    /// of proposal this does not know is read in full.
    fn roster_after_commit<Cfg: MlsConfig>(
        &self,
        conversation: &ConversationId,
        group: &mls_rs::Group<Cfg>,
        before: &[MemberInfo],
        committer: u32,
        applied: &[mls_rs::mls_rules::ProposalInfo<mls_rs::group::proposal::Proposal>],
    ) -> Result<std::sync::Arc<Vec<MemberInfo>>, CoreError> {
        use mls_rs::group::proposal::Proposal;
        use mls_rs::group::Sender;
        use mls_rs_core::group::ProposalType;
        let mut touched = std::collections::BTreeSet::from([committer]);
        let mut adds = 0u32;
        for p in applied {
            match (&p.proposal, &p.sender) {
                (Proposal::Remove(r), _) => {
                    touched.insert(r.to_remove());
                }
                (p, Sender::Member(i)) if p.proposal_type() == ProposalType::UPDATE => {
                    touched.insert(*i);
                }
                (p, _) if p.proposal_type() == ProposalType::ADD => adds += 1,
                (p, _)
                    if [ProposalType::PSK, ProposalType::GROUP_CONTEXT_EXTENSIONS, ProposalType::EXTERNAL_INIT]
                        .contains(&p.proposal_type()) => {}
                _ => return self.roster_of(conversation, group),
            }
        }
        // Adds (and an external joiner) take the leftmost blank leaves, then
        // extend the tree: every blank leaf before, and as many past the end.
        let mut next = 0u32;
        for m in before {
            touched.extend(next..m.index);
            next = m.index.saturating_add(1);
        }
        touched.extend(next..next.saturating_add(adds).saturating_add(1));
        let mut after: Vec<MemberInfo> = before.iter().filter(|m| !touched.contains(&m.index)).cloned().collect();
        for &i in &touched {
            if let Some(m) = group.member_at_index(i) {
                after.push(self.member_info(&m)?);
            }
        }
        after.sort_by_key(|m| m.index);
        debug_assert_eq!(after, self.members_of(group)?, "a commit's roster read by its changes");
        let tree_hash = &group.context().tree_hash;
        Ok(self.remember_roster(conversation, tree_hash, after).members)
    }

    fn members_of<Cfg: MlsConfig>(&self, group: &mls_rs::Group<Cfg>) -> Result<Vec<MemberInfo>, CoreError> {
        group.roster().members_iter().map(|m| self.member_info(&m)).collect()
    }

    fn info_of<Cfg: MlsConfig>(group: &mls_rs::Group<Cfg>) -> Result<ConversationInfo, CoreError> {
        let ext = group
            .context()
            .extensions
            .get_as::<ConversationInfoExt>()
            .map_err(|_| CoreError::Malformed("conversation info"))?
            .ok_or(CoreError::Malformed("conversation info missing"))?;
        ConversationInfo::from_ext(&ext)
    }

    fn disappearing_of<Cfg: MlsConfig>(group: &mls_rs::Group<Cfg>) -> Result<Option<u32>, CoreError> {
        let ext = group
            .context()
            .extensions
            .get_as::<DisappearingExt>()
            .map_err(|_| CoreError::Malformed("disappearing-messages timer"))?;
        Ok(ext.map(|e| e.seconds).filter(|s| *s > 0))
    }

    /// The conversation's disappearing-messages timer in seconds, as every
    /// member agreed on it (a group-context extension); `None` when off.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn disappearing(&self, conversation: &ConversationId) -> Result<Option<u32>, CoreError> {
        self.read_group(conversation, |g| Self::disappearing_of(g))
    }

    /// Stages a commit that sets the disappearing-messages timer (`None` or
    /// 0: off). Every member applies it; a member whose client does not
    /// support the timer makes MLS refuse the commit here, before anything
    /// is sent.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn set_disappearing(
        &self,
        conversation: &ConversationId,
        seconds: Option<u32>,
    ) -> Result<OutgoingCommit, CoreError> {
        self.stage(conversation, Change::Disappearing(seconds.filter(|s| *s > 0)))
    }

    /// Creates a conversation with the devices of `key_packages`, in their
    /// suite (the classical one when there are none), and stages the commit
    /// that adds them.
    ///
    /// # Errors
    /// [`CoreError::Mls`] when a key package is invalid (bad signature,
    /// certificate or ciphersuite) or storage fails;
    /// [`CoreError::SuiteMismatch`] when they are of different suites.
    pub fn create_conversation(
        &self,
        info: &ConversationInfo,
        key_packages: &[Vec<u8>],
    ) -> Result<OutgoingCommit, CoreError> {
        let suite = match key_packages.first() {
            Some(kp) => Self::key_package_suite(kp)?,
            None => CIPHERSUITE,
        };
        self.create_conversation_in(info, suite, key_packages)
    }

    /// Creates a conversation of `suite` (one of [`SUITES`]) with the
    /// devices of `key_packages`, which must all be of that suite, and
    /// stages the commit that adds them. A conversation keeps its suite.
    ///
    /// # Errors
    /// As [`Self::create_conversation`]; [`CoreError::Unsupported`] for
    /// another suite.
    pub fn create_conversation_in(
        &self,
        info: &ConversationInfo,
        suite: mls_rs::CipherSuite,
        key_packages: &[Vec<u8>],
    ) -> Result<OutgoingCommit, CoreError> {
        Self::check_suites(suite, key_packages)?;
        let mut exts = ExtensionList::new();
        exts.set_from(info.to_ext()).map_err(|_| CoreError::Bug("extension encoding"))?;
        let mut id = [0u8; 16];
        crate::random_bytes(&self.crypto, &mut id)?;
        let conversation = ConversationId(id);
        let group = self.client_in(suite)?.create_group_with_id(id.to_vec(), exts, ExtensionList::new(), None)?;
        self.save(&conversation, group)?;
        self.stage(&conversation, Change::Add(key_packages))
    }

    /// Every key package must be of `suite`: said plainly here rather than
    /// as mls-rs's error deep in a commit.
    fn check_suites(suite: mls_rs::CipherSuite, key_packages: &[Vec<u8>]) -> Result<(), CoreError> {
        for kp in key_packages {
            let theirs = Self::key_package_suite(kp)?;
            if theirs != suite {
                return Err(CoreError::SuiteMismatch { conversation: suite.into(), key_package: theirs.into() });
            }
        }
        Ok(())
    }

    /// The conversation's ciphersuite (a group keeps it; moving to another
    /// suite makes a new group, [`Self::move_to`]).
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn suite(&self, conversation: &ConversationId) -> Result<mls_rs::CipherSuite, CoreError> {
        self.read_group(conversation, |g| Ok(g.cipher_suite()))
    }

    /// TEST ONLY (feature `test-hooks`): [`Self::create_conversation`] under
    /// a chosen id, as an attacker who read a conversation's id would. No
    /// production build has it.
    ///
    /// # Errors
    /// As [`Self::create_conversation`].
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn create_conversation_with_id(
        &self,
        conversation: ConversationId,
        info: &ConversationInfo,
        key_packages: &[Vec<u8>],
    ) -> Result<OutgoingCommit, CoreError> {
        let suite = match key_packages.first() {
            Some(kp) => Self::key_package_suite(kp)?,
            None => CIPHERSUITE,
        };
        Self::check_suites(suite, key_packages)?;
        let mut exts = ExtensionList::new();
        exts.set_from(info.to_ext()).map_err(|_| CoreError::Bug("extension encoding"))?;
        let group = self.client_in(suite)?.create_group_with_id(
            conversation.as_bytes().to_vec(),
            exts,
            ExtensionList::new(),
            None,
        )?;
        self.save(&conversation, group)?;
        self.stage(&conversation, Change::Add(key_packages))
    }

    /// Applies the staged commit after the server accepted it.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn confirm_commit(&self, conversation: &ConversationId) -> Result<Epoch, CoreError> {
        let mut group = self.load(conversation)?;
        group.apply_pending_commit()?;
        let epoch = Epoch(group.current_epoch());
        self.save(conversation, group)?;
        Ok(epoch)
    }

    /// Whether a staged commit waits for the server's answer.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn has_pending_commit(&self, conversation: &ConversationId) -> Result<bool, CoreError> {
        self.read_group(conversation, |g| Ok(g.has_pending_commit()))
    }

    /// Drops the staged commit after the server refused it.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn discard_commit(&self, conversation: &ConversationId) -> Result<(), CoreError> {
        let mut group = self.load(conversation)?;
        group.clear_pending_commit();
        self.save(conversation, group)
    }

    fn load(&self, conversation: &ConversationId) -> Result<mls_rs::Group<EngineConfig<C, G, K>>, CoreError> {
        self.flush_batched(conversation)?;
        self.load_stored(conversation)
    }

    fn load_stored(&self, conversation: &ConversationId) -> Result<mls_rs::Group<EngineConfig<C, G, K>>, CoreError> {
        Ok(self.load_versioned(conversation)?.0)
    }

    /// The group as stored: the one kept loaded if the store still holds
    /// its version, else decoded from the store. With the version it
    /// equals, if known.
    fn load_versioned(&self, conversation: &ConversationId) -> Result<VersionedGroup<C, G, K>, CoreError> {
        if let Some((group, version)) = self.take_loaded(conversation) {
            return Ok((group, Some(version)));
        }
        let _ = self.last_version(conversation);
        match self.client()?.load_group(conversation.as_bytes()) {
            Ok(g) => Ok((g, self.last_version(conversation))),
            Err(mls_rs::error::MlsError::GroupNotFound) => Err(CoreError::UnknownConversation),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the conversation's group without changing it: the one this
    /// thread's batch keeps in memory (the newest state), else the stored
    /// one. A batch is left as it is, so a lookup between two messages of
    /// a batch costs no write and no load.
    fn read_group<T>(
        &self,
        conversation: &ConversationId,
        f: impl FnOnce(&mls_rs::Group<EngineConfig<C, G, K>>) -> Result<T, CoreError>,
    ) -> Result<T, CoreError> {
        let mut f = Some(f);
        // `f` must not enter the batch again: its lock is held meanwhile.
        let kept = self
            .with_batch(|b| match b.get(conversation) {
                Some(g) => f.take().map(|f| f(g)),
                None => None,
            })
            .flatten();
        if let Some(out) = kept {
            return out;
        }
        let f = f.take().ok_or(CoreError::Bug("a group lookup ran twice"))?;
        let (group, version) = self.load_versioned(conversation)?;
        let out = f(&group);
        // Read, not changed: it still equals the version it was loaded at.
        if out.is_ok() {
            self.keep_loaded(conversation, version, group);
        }
        out
    }

    /// The conversation's kind and name.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn info(&self, conversation: &ConversationId) -> Result<ConversationInfo, CoreError> {
        self.read_group(conversation, |g| Self::info_of(g))
    }

    /// Every member device, this one included.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn members(&self, conversation: &ConversationId) -> Result<Vec<MemberInfo>, CoreError> {
        self.read_group(conversation, |g| Ok(self.roster_of(conversation, g)?.to_vec()))
    }

    /// The conversation's current epoch.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn epoch(&self, conversation: &ConversationId) -> Result<Epoch, CoreError> {
        self.read_group(conversation, |g| Ok(Epoch(g.current_epoch())))
    }

    /// What a call's media keys come from at the conversation's current
    /// epoch: the SFrame base key of RFC 9605 §5.2,
    /// `MLS-Exporter("SFrame 1.0 Base Key", "", 16)`, with the epoch, this
    /// device's leaf index and every member's (for the key ids, and for
    /// telling which senders a change removed). Only members can compute
    /// it; a commit moves to a new epoch and so to a new key.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn call_keying(&self, conversation: &ConversationId) -> Result<CallKeying, CoreError> {
        self.flush_batched(conversation)?;
        self.read_group(conversation, |group| {
            let secret = group.export_secret(SFRAME_EXPORTER_LABEL, b"", SFRAME_SECRET_LEN)?;
            Ok(CallKeying {
                epoch: Epoch(group.current_epoch()),
                own_index: group.current_member_index(),
                members: self.members_of(group)?,
                secret: zeroize::Zeroizing::new(secret.as_bytes().to_vec()),
            })
        })
    }

    /// Encrypts content for the conversation and stores the advanced ratchet
    /// (before anything is sent, so a key is never used twice). Returns the
    /// ciphertext and the devices to deliver it to.
    ///
    /// In a batch ([`Self::begin_batch`]) the advanced ratchet stays in
    /// memory and is written at the batch's end: the caller must not let
    /// the ciphertext leave the device before [`Self::end_batch`] returned
    /// and its transaction committed.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn encrypt(
        &self,
        conversation: &ConversationId,
        content: &Content,
    ) -> Result<(Vec<u8>, Vec<DeviceAddress>), CoreError> {
        let batched = self.with_batch(|_| ()).is_some();
        let kept = if batched { self.with_batch(|b| b.remove(conversation)).flatten() } else { None };
        let mut group = match kept {
            Some(g) => g,
            None => self.load(conversation)?,
        };
        let made = (|| {
            let plaintext = content.encode()?;
            let msg = group.encrypt_application_message(&plaintext, Vec::new())?;
            let recipients = self.recipients_of(conversation, &group)?;
            Ok::<_, CoreError>((msg.to_bytes()?, recipients.to_vec()))
        })();
        if batched {
            // Back into the batch even after a failure: the ratchet may have
            // moved, and a later message must never start again from the
            // stored state (that would reuse a key).
            if self.with_batch(move |b| b.insert(*conversation, group)).is_none() {
                return Err(CoreError::Bug("a batch ended while it encrypted a message"));
            }
        } else if made.is_ok() {
            self.save(conversation, group)?;
        }
        made
    }

    /// Stages a commit adding the devices of `key_packages` to the
    /// conversation (each checked as in [`Self::inspect_key_package`]).
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`] (invalid key
    /// package, already a member…).
    pub fn add_members(
        &self,
        conversation: &ConversationId,
        key_packages: &[Vec<u8>],
    ) -> Result<OutgoingCommit, CoreError> {
        self.stage(conversation, Change::Add(key_packages))
    }

    /// Stages a commit removing the given member devices. The removed devices
    /// receive the commit too, so they learn they were removed.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`], [`CoreError::Mls`], or
    /// [`CoreError::IdentityMismatch`] when a device is not a member.
    pub fn remove_members(
        &self,
        conversation: &ConversationId,
        devices: &[DeviceAddress],
    ) -> Result<OutgoingCommit, CoreError> {
        self.stage(conversation, Change::Remove(devices))
    }

    /// Stages a commit that changes the conversation's name (inside the
    /// encryption: a group-context extension).
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn rename(&self, conversation: &ConversationId, info: &ConversationInfo) -> Result<OutgoingCommit, CoreError> {
        self.stage(conversation, Change::Info(info))
    }

    /// Stages a commit of the proposals received so far (a member's leave).
    /// `None` when there is nothing to commit.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn commit_pending(&self, conversation: &ConversationId) -> Result<Option<OutgoingCommit>, CoreError> {
        self.flush_batched(conversation)?;
        if !self.read_group(conversation, |g| Ok(g.commit_required()))? {
            return Ok(None);
        }
        self.stage(conversation, Change::Pending).map(Some)
    }

    /// Stages a commit that changes nothing but this device's own keys (its
    /// leaf and the path above it), so that a copy of this device's state
    /// taken before it can no longer follow the conversation
    /// (post-compromise security). Proposals already received go in too.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn update_keys(&self, conversation: &ConversationId) -> Result<OutgoingCommit, CoreError> {
        self.stage(conversation, Change::Update)
    }

    /// Stages a commit that replaces this device's leaf with `identity`: the
    /// same device (handle and id) with a new certificate or a new
    /// signature key, and fresh path keys. Confirmed like any commit; from
    /// then on the conversation's members see the new keys.
    ///
    /// # Errors
    /// [`CoreError::IdentityMismatch`] when `identity` is another device;
    /// as [`Self::update_keys`].
    pub fn update_credential(
        &self,
        conversation: &ConversationId,
        identity: &DeviceIdentity,
    ) -> Result<OutgoingCommit, CoreError> {
        if identity.address() != self.identity().address() {
            return Err(CoreError::IdentityMismatch("a new credential must be for this same device".into()));
        }
        self.stage(conversation, Change::Credential(identity))
    }

    /// Whether `conversation` can move to `suite` by an MLS ReInit: it is
    /// of another suite, every member device's certificate (this one's
    /// included) says it can take part in conversations of `suite`, and its
    /// tree has no blank leaf before the last member (mls-rs 0.57
    /// re-initializes only into a tree the size of the old one, and a new
    /// tree has no blanks).
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn can_move_to(&self, conversation: &ConversationId, suite: mls_rs::CipherSuite) -> Result<bool, CoreError> {
        if !self.identity().certificate().supports(suite) {
            return Ok(false);
        }
        self.read_group(conversation, |group| {
            if group.cipher_suite() == suite {
                return Ok(false);
            }
            let (mut count, mut last) = (0u32, 0u32);
            for m in group.roster().members_iter() {
                if !self.certs.of_roster_member(&m.signing_identity)?.supports(suite) {
                    return Ok(false);
                }
                count += 1;
                last = last.max(m.index);
            }
            Ok(count == last + 1)
        })
    }

    /// Stages the commit that moves `conversation` to `suite` under the new
    /// id `to` (an MLS ReInit). Once it is applied the conversation takes
    /// no more commits and this device must send nothing there; a member
    /// then creates `to` ([`Self::create_moved`]) and the others join it
    /// ([`Self::join_resuming`]).
    ///
    /// # Errors
    /// [`CoreError::Unsupported`] for a suite this build lacks, or while a
    /// member's leave waits to be committed; as [`Self::update_keys`].
    pub fn move_to(
        &self,
        conversation: &ConversationId,
        to: ConversationId,
        suite: mls_rs::CipherSuite,
    ) -> Result<OutgoingCommit, CoreError> {
        if !SUITES.contains(&suite) || self.crypto.cipher_suite_provider(suite).is_none() {
            return Err(CoreError::Unsupported("ciphersuite"));
        }
        self.stage(conversation, Change::ReInit(to, suite))
    }

    /// Creates `to`, the conversation that `old` moved to (its ReInit commit
    /// applied here), with `key_packages`, one of the new suite for every
    /// member device of `old` but this one: the same devices (mls-rs
    /// refuses any other set), bound to `old` by its resumption secret, so
    /// only its members can join and none can be slipped in. The new group
    /// is stored at epoch 1; the Welcome goes to the server as a new
    /// conversation's first request (epoch 0). `commit` holds the Welcome
    /// again: there is no commit for existing members, and its digest names
    /// the request.
    ///
    /// # Errors
    /// [`CoreError::Mls`] when `old` did not move (`PendingReInitNotFound`),
    /// a key package is invalid, of another suite or for another device set;
    /// [`CoreError::UnknownConversation`].
    pub fn create_moved(
        &self,
        old: &ConversationId,
        to: &ConversationId,
        key_packages: &[Vec<u8>],
    ) -> Result<OutgoingCommit, CoreError> {
        // Never over a stored group: the id was named by the committer.
        if self.client()?.load_group(to.as_bytes()).is_ok() {
            return Err(CoreError::IdentityMismatch(format!(
                "the move names #{}, a conversation this device already has",
                to.to_hex()
            )));
        }
        let group = self.load(old)?;
        let me = self.identity();
        let reinit = group.get_reinit_client(Some(me.device_secret().clone()), Some(me.signing_identity()?))?;
        let mut welcome_recipients = Vec::new();
        let mut messages = Vec::new();
        for kp in key_packages {
            welcome_recipients.push(self.inspect_key_package(kp)?.address());
            messages.push(MlsMessage::from_bytes(kp).map_err(|_| CoreError::Malformed("key package"))?);
        }
        let (group, welcomes) = reinit.commit(messages, ExtensionList::new(), None)?;
        let conversation = conversation_id(group.group_id())?;
        if conversation != *to {
            return Err(CoreError::IdentityMismatch("the moved group has another id than its move named".into()));
        }
        let welcome = welcomes.first().map(|w| w.to_bytes()).transpose()?;
        let mut members_after = welcome_recipients.clone();
        members_after.push(me.address());
        self.save(&conversation, group)?;
        Ok(OutgoingCommit {
            conversation,
            epoch: Epoch(0),
            commit: welcome.clone().unwrap_or_default(),
            commit_recipients: Vec::new(),
            welcome,
            welcome_recipients,
            members_after,
        })
    }

    /// Whether this device's leaf in `conversation` already carries
    /// `identity`'s certificate and signature key.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`].
    pub fn leaf_is(&self, conversation: &ConversationId, identity: &DeviceIdentity) -> Result<bool, CoreError> {
        self.flush_batched(conversation)?;
        let wanted = identity.signing_identity()?;
        self.read_group(conversation, |group| Ok(*group.current_member_signing_identity()? == wanted))
    }

    /// The one way a commit is made: load the group, put `change` into a
    /// commit (with any proposals received), store it as pending, and
    /// describe it for the server. The commit goes to every current member
    /// but this device (removed ones included, so they learn it).
    fn stage(&self, conversation: &ConversationId, change: Change<'_>) -> Result<OutgoingCommit, CoreError> {
        let mut group = self.load(conversation)?;
        if let Change::Add(kps) = &change {
            Self::check_suites(group.cipher_suite(), kps)?;
        }
        let epoch = Epoch(group.current_epoch());
        let members = self.roster_of(conversation, &group)?;
        let me = self.identity().address();
        let commit_recipients = members.iter().map(|m| m.address.clone()).filter(|a| *a != me).collect();
        let mut welcome_recipients = Vec::new();
        // Proposals received so far go into the commit: a member's leave.
        let leaving: Vec<u32> = group
            .get_cached_proposals()
            .iter()
            .filter_map(|p| match p.proposal() {
                mls_rs::group::proposal::Proposal::Remove(r) => Some(r.to_remove()),
                _ => None,
            })
            .collect();
        let mut members_after: Vec<DeviceAddress> =
            members.iter().filter(|m| !leaving.contains(&m.index)).map(|m| m.address.clone()).collect();
        let extensions = group.context().extensions.clone();
        let mut builder = group.commit_builder();
        match change {
            Change::Add(key_packages) => {
                for kp in key_packages {
                    welcome_recipients.push(self.inspect_key_package(kp)?.address());
                    let msg = MlsMessage::from_bytes(kp).map_err(|_| CoreError::Malformed("key package"))?;
                    builder = builder.add_member(msg)?;
                }
            }
            Change::Remove(devices) => {
                for d in devices {
                    let m = members
                        .iter()
                        .find(|m| m.address == *d)
                        .ok_or_else(|| CoreError::IdentityMismatch(format!("{d} is not a member")))?;
                    builder = builder.remove_member(m.index)?;
                    members_after.retain(|a| a != d);
                }
            }
            Change::Info(info) => {
                let mut exts = extensions;
                exts.set_from(info.to_ext()).map_err(|_| CoreError::Bug("extension encoding"))?;
                builder = builder.set_group_context_ext(exts)?;
            }
            Change::Disappearing(seconds) => {
                let mut exts = extensions;
                match seconds {
                    Some(seconds) => {
                        exts.set_from(DisappearingExt { seconds }).map_err(|_| CoreError::Bug("extension encoding"))?;
                    }
                    None => {
                        exts.remove(ExtensionType::new(DISAPPEARING_EXT));
                    }
                }
                builder = builder.set_group_context_ext(exts)?;
            }
            Change::Credential(identity) => {
                builder =
                    builder.set_new_signing_identity(identity.device_secret().clone(), identity.signing_identity()?);
            }
            Change::ReInit(to, suite) => {
                // RFC 9420 §12.2: a ReInit is the only proposal of its commit.
                if !leaving.is_empty() {
                    return Err(CoreError::Unsupported("a move while a leave waits to be committed"));
                }
                builder = builder.reinit(Some(to.as_bytes().to_vec()), ProtocolVersion::MLS_10, suite, extensions)?;
            }
            Change::Pending | Change::Update => {}
        }
        let output = builder.build()?;
        self.save(conversation, group)?;
        members_after.extend(welcome_recipients.iter().cloned());
        Ok(OutgoingCommit {
            conversation: *conversation,
            epoch,
            commit: output.commit_message.to_bytes()?,
            commit_recipients,
            welcome: output.welcome_messages.first().map(|w| w.to_bytes()).transpose()?,
            welcome_recipients,
            members_after,
        })
    }

    /// A proposal to remove this device, for the other members to commit.
    /// Returns the proposal and its recipients.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] or [`CoreError::Mls`].
    pub fn propose_leave(&self, conversation: &ConversationId) -> Result<(Vec<u8>, Vec<DeviceAddress>), CoreError> {
        let mut group = self.load(conversation)?;
        let me = group.current_member_index();
        let recipients = self.others(&group)?;
        let msg = group.propose_remove(me, Vec::new())?;
        self.save(conversation, group)?;
        Ok((msg.to_bytes()?, recipients))
    }

    fn others<Cfg: MlsConfig>(&self, group: &mls_rs::Group<Cfg>) -> Result<Vec<DeviceAddress>, CoreError> {
        let me = self.identity().address();
        Ok(self.members_of(group)?.into_iter().map(|m| m.address).filter(|a| *a != me).collect())
    }

    /// Joins a conversation from a Welcome.
    ///
    /// # Errors
    /// [`CoreError::Malformed`] or [`CoreError::Mls`] (not for us, invalid
    /// members, tampering).
    pub fn join(&self, welcome: &[u8]) -> Result<Event, CoreError> {
        self.join_checked(welcome, |_| Ok(()), |_, _, _| Ok(()))
    }

    /// Joins a conversation from a Welcome, asking the caller twice before
    /// anything is stored: `check_id` sees the conversation id read from the
    /// Welcome before joining (a refusal here leaves even the key package
    /// unused), `check_members` sees the id, kind, name and every member
    /// after the Welcome verified but before the group state is written.
    /// Either refusal writes nothing: a Welcome can never replace a stored
    /// group with the same id.
    ///
    /// # Errors
    /// As [`Self::join`], or whatever a check returns.
    pub fn join_checked<E: From<CoreError>>(
        &self,
        welcome: &[u8],
        check_id: impl FnOnce(&ConversationId) -> Result<(), E>,
        check_members: impl FnOnce(&ConversationId, &ConversationInfo, &[MemberInfo]) -> Result<(), E>,
    ) -> Result<Event, E> {
        self.join_resuming(welcome, check_id, &[], check_members)
    }

    /// Joins `welcome` as the continuation of one of the conversations
    /// `moving`: the one whose resumption secret opens it.
    fn join_moved(&self, welcome: &MlsMessage, moving: &[ConversationId]) -> Result<MlsGroup<C, G, K>, CoreError> {
        let me = self.identity();
        let mut last = CoreError::Mls(mls_rs::error::MlsError::OldGroupStateNotFound);
        for old in moving {
            let group = match self.load(old) {
                Ok(g) => g,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let joined = group
                .get_reinit_client(Some(me.device_secret().clone()), Some(me.signing_identity()?))
                .and_then(|reinit| reinit.join(welcome, None, None));
            match joined {
                Ok((group, _)) => return Ok(group),
                Err(e) => last = e.into(),
            }
        }
        Err(last)
    }

    /// As [`Self::join_checked`], for a device that also waits for the
    /// conversations `moving` continue in (their ReInit commits applied
    /// here): a Welcome whose secrets need one of their resumption secrets
    /// (its group info cannot be read without it, so neither can its id)
    /// is joined as that move, and only so: mls-rs checks the secret, the
    /// new suite, id and group extensions, and that the members are the
    /// old ones. `check_id` then sees the id after the join, before
    /// anything is stored. A Welcome of a moved conversation cannot be
    /// joined by a device that was not in the old one.
    ///
    /// # Errors
    /// As [`Self::join_checked`].
    pub fn join_resuming<E: From<CoreError>>(
        &self,
        welcome: &[u8],
        check_id: impl FnOnce(&ConversationId) -> Result<(), E>,
        moving: &[ConversationId],
        check_members: impl FnOnce(&ConversationId, &ConversationInfo, &[MemberInfo]) -> Result<(), E>,
    ) -> Result<Event, E> {
        let msg = MlsMessage::from_bytes(welcome).map_err(|_| CoreError::Malformed("welcome"))?;
        let client = self.client()?;
        let group = match client.examine_welcome_message(&msg) {
            Ok(group_info) => {
                check_id(&conversation_id(&group_info.group_context().group_id)?)?;
                client.join_group(None, &msg, None).map_err(CoreError::from)?.0
            }
            Err(mls_rs::error::MlsError::OldGroupStateNotFound) if !moving.is_empty() => {
                let group = self.join_moved(&msg, moving)?;
                check_id(&conversation_id(group.group_id())?)?;
                group
            }
            Err(e) => return Err(CoreError::from(e).into()),
        };
        let conversation = conversation_id(group.group_id())?;
        let info = Self::info_of(&group)?;
        let members = self.members_of(&group)?;
        // The id inside the joined group is the one checked (same GroupInfo),
        // but ask again cheaply rather than rely on it.
        check_members(&conversation, &info, &members)?;
        // The first commit or send after the join reads this roster again.
        self.remember_roster(&conversation, &group.context().tree_hash, members.clone());
        self.save(&conversation, group)?;
        Ok(Event::Joined { conversation, info, members })
    }

    /// Processes a commit or application message of a conversation.
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`], [`CoreError::Malformed`] or
    /// [`CoreError::Mls`] (tampered, replayed, wrong epoch…).
    pub fn process(&self, conversation: &ConversationId, bytes: &[u8]) -> Result<Event, CoreError> {
        let msg = MlsMessage::from_bytes(bytes).map_err(|_| CoreError::Malformed("MLS message"))?;
        if msg.group_id() != Some(conversation.as_bytes().as_slice()) {
            return Err(CoreError::Malformed("message for another conversation"));
        }
        // Only handshakes need the roster before them; an application
        // message needs its sender alone (O(1), not O(members)).
        let handshake = !is_application_message(bytes);
        // In a batch, an application message works on the group kept in
        // memory and leaves it there (written at the end of the batch).
        let batched = !handshake && self.with_batch(|_| ()).is_some();
        let kept = if batched { self.with_batch(|b| b.remove(conversation)).flatten() } else { None };
        let mut group = match kept {
            Some(g) => g,
            None => self.load(conversation)?,
        };
        let before = if handshake { self.roster_of(conversation, &group)? } else { std::sync::Arc::default() };
        let info_before = if handshake { Some(Self::info_of(&group)?) } else { None };
        let timer_before = Self::disappearing_of(&group)?;
        let event = match group.process_incoming_message(msg)? {
            ReceivedMessage::ApplicationMessage(app) => {
                let member = group.member_at_index(app.sender_index).ok_or(CoreError::Malformed("unknown sender"))?;
                let sender = self.member_info(&member)?;
                let content = Content::decode(app.data())?;
                Event::Message { conversation: *conversation, sender, content, disappearing: timer_before }
            }
            ReceivedMessage::Commit(commit) => {
                let removed_self = matches!(commit.effect, CommitEffect::Removed { .. });
                let applied = match &commit.effect {
                    CommitEffect::NewEpoch(ne) => ne.applied_proposals.as_slice(),
                    CommitEffect::Removed { new_epoch, .. } => new_epoch.applied_proposals.as_slice(),
                    CommitEffect::ReInit(_) => &[],
                };
                let after = if removed_self {
                    std::sync::Arc::default()
                } else {
                    self.roster_after_commit(conversation, &group, &before, commit.committer, applied)?
                };
                // The rosters compared by address through an index: a
                // scan of one roster per member of the other cost O(N²),
                // most of an add's processing in a large group.
                let (before_at, after_at) = (by_address(&before), by_address(&after));
                let added = after.iter().filter(|m| !before_at.contains_key(&m.address)).cloned().collect();
                let updated = after
                    .iter()
                    .filter_map(|m| {
                        before_at
                            .get(&m.address)
                            .filter(|b| b.identity_key != m.identity_key || b.device_key != m.device_key)
                            .map(|b| ((*b).clone(), m.clone()))
                    })
                    .collect();
                let me = self.identity().address();
                let removed = if removed_self {
                    // The group goes on without us; we only know we are out.
                    before.iter().filter(|b| b.address == me).cloned().collect()
                } else {
                    before.iter().filter(|b| !after_at.contains_key(&b.address)).cloned().collect()
                };
                let committer = before
                    .iter()
                    .find(|m| m.index == commit.committer)
                    .cloned()
                    .ok_or(CoreError::Malformed("commit from a non-member"))?;
                let info_before = info_before.ok_or(CoreError::Bug("commit read as an application message"))?;
                let info_after = if removed_self { info_before.clone() } else { Self::info_of(&group)? };
                let renamed = (info_after != info_before).then_some(info_after);
                let timer_after = if removed_self { timer_before } else { Self::disappearing_of(&group)? };
                let disappearing = (timer_after != timer_before).then_some(timer_after);
                let moved_to = match &commit.effect {
                    CommitEffect::ReInit(r) => {
                        Some((conversation_id(r.proposal.group_id())?, r.proposal.new_cipher_suite()))
                    }
                    _ => None,
                };
                let left = applied
                    .iter()
                    .filter_map(|p| match (&p.proposal, &p.sender) {
                        (mls_rs::group::proposal::Proposal::Remove(r), mls_rs::group::Sender::Member(i))
                            if r.to_remove() == *i =>
                        {
                            before.iter().find(|m| m.index == *i).map(|m| m.address.clone())
                        }
                        _ => None,
                    })
                    .collect();
                Event::Commit {
                    conversation: *conversation,
                    epoch: Epoch(group.current_epoch()),
                    committer,
                    added,
                    removed,
                    removed_self,
                    left,
                    renamed,
                    disappearing,
                    updated,
                    moved_to,
                }
            }
            ReceivedMessage::Proposal(p) => match (&p.proposal, &p.sender) {
                (mls_rs::group::proposal::Proposal::Remove(r), mls_rs::group::ProposalSender::Member(sender))
                    if r.to_remove() == *sender =>
                {
                    let member = before
                        .iter()
                        .find(|m| m.index == *sender)
                        .cloned()
                        .ok_or(CoreError::Malformed("proposal from a non-member"))?;
                    Event::LeaveProposed { conversation: *conversation, member }
                }
                // Subrosa clients propose nothing else; other proposals are
                // cached by mls-rs and committed with the next commit.
                _ => Event::Other,
            },
            _ => Event::Other,
        };
        if batched {
            match self.with_batch(move |b| b.insert(*conversation, group)) {
                Some(_) => return Ok(event),
                None => return Err(CoreError::Bug("a batch ended while it processed a message")),
            }
        }
        self.save(conversation, group)?;
        Ok(event)
    }
}

#[cfg(all(test, feature = "awslc"))]
mod tests {
    use super::*;
    use mls_rs::storage_provider::in_memory::{InMemoryGroupStateStorage, InMemoryKeyPackageStorage};
    use subrosa_proto::{Handle, MessageId};

    pub(super) type TestEngine = Engine<crate::DefaultCrypto, InMemoryGroupStateStorage, InMemoryKeyPackageStorage>;

    pub(super) fn engine(name: &str) -> TestEngine {
        let crypto = crate::default_crypto();
        let id = DeviceIdentity::generate(&crypto, Handle::new(name).expect("handle"), 0).expect("identity");
        Engine::new(crypto, id, InMemoryGroupStateStorage::new(), InMemoryKeyPackageStorage::new())
    }

    pub(super) fn text(ev: &Event) -> Option<String> {
        match ev {
            Event::Message { content, .. } => match &content.body {
                crate::content::Body::Text(t) => Some(t.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Each member's certificate is verified once per device: joining
    /// checks every member, and what follows (loading the group again,
    /// messages, a commit adding one device) checks only what is new.
    #[test]
    fn certificates_are_verified_once_per_device() {
        let alice = engine("alice");
        let bob = engine("bob");
        let mut kps = vec![bob.generate_key_package().expect("kp")];
        for i in 0..20 {
            kps.push(engine(&format!("member{i}")).generate_key_package().expect("kp"));
        }
        let info = ConversationInfo { kind: ConversationKind::Group, name: "many".into() };
        let out = alice.create_conversation(&info, &kps).expect("create");
        alice.confirm_commit(&out.conversation).expect("confirm");
        let conv = out.conversation;
        bob.join(out.welcome.as_deref().expect("welcome")).expect("joined");
        let after_join = bob.certs.checks();
        assert!(after_join >= 22, "every member checked on joining: {after_join}");

        for i in 0..3u8 {
            let c = Content::text(MessageId([i; 16]), 1, "hello");
            let (ct, _) = alice.encrypt(&conv, &c).expect("encrypt");
            bob.process(&conv, &ct).expect("read");
            bob.members(&conv).expect("members");
        }
        assert_eq!(bob.certs.checks(), after_join, "nothing new to check");

        let newcomer = engine("newcomer");
        let add = alice.add_members(&conv, &[newcomer.generate_key_package().expect("kp")]).expect("add");
        alice.confirm_commit(&conv).expect("confirm");
        bob.process(&conv, &add.commit).expect("processed");
        assert_eq!(bob.certs.checks(), after_join + 1, "only the new device checked");
    }

    #[test]
    fn a_refused_welcome_writes_nothing_and_leaves_the_key_package_usable() {
        let alice = engine("alice");
        let bob = engine("bob");
        let out = alice
            .create_conversation(&ConversationInfo::direct(), &[bob.generate_key_package().expect("kp")])
            .expect("create");
        alice.confirm_commit(&out.conversation).expect("confirm");
        let welcome = out.welcome.as_deref().expect("welcome");

        // Refused on its id: nothing joined, nothing stored.
        let mut seen = None;
        let refused = bob.join_checked(
            welcome,
            |id| {
                seen = Some(*id);
                Err(CoreError::IdentityMismatch("known id".into()))
            },
            |_, _, _| Ok(()),
        );
        assert!(matches!(refused, Err(CoreError::IdentityMismatch(_))));
        assert_eq!(seen, Some(out.conversation), "the id is read before joining");
        assert!(matches!(bob.members(&out.conversation), Err(CoreError::UnknownConversation)));

        // Refused on its members: still nothing stored.
        let refused = bob.join_checked(
            welcome,
            |_| Ok::<(), CoreError>(()),
            |_, info, members| {
                assert_eq!(info.kind, ConversationKind::Direct);
                assert_eq!(members.len(), 2);
                Err(CoreError::IdentityMismatch("two accounts".into()))
            },
        );
        assert!(refused.is_err());
        assert!(matches!(bob.members(&out.conversation), Err(CoreError::UnknownConversation)));

        // The same Welcome still joins once accepted: the key package was not spent.
        assert!(matches!(bob.join(welcome), Ok(Event::Joined { .. })));
        assert_eq!(bob.members(&out.conversation).expect("joined").len(), 2);
    }

    #[test]
    fn direct_conversation_round_trip_tamper_and_replay() {
        let alice = engine("alice");
        let bob = engine("bob");
        let kp = bob.generate_key_package().expect("kp");
        assert_eq!(alice.inspect_key_package(&kp).expect("valid").handle().as_str(), "bob");

        let out = alice.create_conversation(&ConversationInfo::direct(), &[kp]).expect("create");
        assert_eq!(out.epoch, Epoch(0));
        assert_eq!(out.welcome_recipients, vec![bob.identity().address()]);
        assert_eq!(alice.confirm_commit(&out.conversation).expect("confirm"), Epoch(1));

        let joined = bob.join(out.welcome.as_deref().expect("welcome")).expect("join");
        match &joined {
            Event::Joined { conversation, info, members } => {
                assert_eq!(*conversation, out.conversation);
                assert_eq!(info.kind, ConversationKind::Direct);
                assert_eq!(members.len(), 2);
            }
            other => panic!("unexpected {other:?}"),
        }

        let (ct, recipients) =
            alice.encrypt(&out.conversation, &Content::text(MessageId([1; 16]), 5, "hello bob")).expect("encrypt");
        assert_eq!(recipients, vec![bob.identity().address()]);
        assert!(!ct.windows(5).any(|w| w == b"hello"));
        assert!(is_application_message(&ct));
        assert!(!is_application_message(out.welcome.as_deref().unwrap_or_default()));
        assert!(!is_application_message(&out.commit));
        assert!(!is_application_message(b"\x00"));
        let ev = bob.process(&out.conversation, &ct).expect("decrypt");
        assert_eq!(text(&ev).as_deref(), Some("hello bob"));
        if let Event::Message { sender, .. } = &ev {
            assert_eq!(sender.address, alice.identity().address());
        }
        // The same ciphertext again: the key is gone (forward secrecy), refused.
        assert!(bob.process(&out.conversation, &ct).is_err());

        let (reply, _) =
            bob.encrypt(&out.conversation, &Content::text(MessageId([2; 16]), 6, "hi alice")).expect("encrypt");
        let mut tampered = reply.clone();
        let n = tampered.len();
        tampered[n - 20] ^= 0x01;
        assert!(alice.process(&out.conversation, &tampered).is_err());
        assert_eq!(text(&alice.process(&out.conversation, &reply).expect("decrypt")).as_deref(), Some("hi alice"));
    }

    /// A device's new credential reaches the others as an update that says
    /// what the device carried before (which key vouched for it), and a new
    /// credential for another device is refused.
    #[test]
    fn a_credential_update_names_the_keys_before_and_after() {
        let alice = engine("alice");
        let bob = engine("bob");
        let out = alice
            .create_conversation(&ConversationInfo::direct(), &[bob.generate_key_package().expect("kp")])
            .expect("create");
        alice.confirm_commit(&out.conversation).expect("confirm");
        bob.join(out.welcome.as_deref().expect("welcome")).expect("join");
        let conv = out.conversation;

        assert!(alice.update_credential(&conv, &bob.identity()).is_err(), "another device's credential");
        let before = alice.identity();
        let rotated = before.with_new_identity_key(alice.crypto(), 2).expect("rotate");
        assert!(!alice.leaf_is(&conv, &rotated).expect("leaf"));
        let commit = alice.update_credential(&conv, &rotated).expect("stage");
        alice.confirm_commit(&conv).expect("confirm");
        assert!(alice.leaf_is(&conv, &rotated).expect("leaf"));
        match bob.process(&conv, &commit.commit).expect("process") {
            Event::Commit { updated, .. } => {
                assert_eq!(updated.len(), 1);
                let (old, new) = &updated[0];
                assert_eq!(old.identity_key, before.identity_public());
                assert_eq!(new.identity_key, rotated.identity_public());
                assert_eq!(new.address, before.address());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn key_package_with_forged_certificate_is_refused() {
        let alice = engine("alice");
        let bob = engine("bob");
        let kp = bob.generate_key_package().expect("kp");
        let mut bad = kp.clone();
        let n = bad.len();
        bad[n / 2] ^= 0x40;
        assert!(alice.create_conversation(&ConversationInfo::direct(), &[bad]).is_err());
        assert!(alice.inspect_key_package(b"garbage").is_err());
    }
}

#[cfg(all(test, feature = "awslc"))]
mod group_tests {
    use super::tests::{engine, text, TestEngine};
    use super::*;
    use subrosa_proto::MessageId;

    fn group_info(name: &str) -> ConversationInfo {
        ConversationInfo { kind: ConversationKind::Group, name: name.into() }
    }

    /// A member reads a commit's roster from the leaves it changed, not the
    /// whole tree: removals leaving gaps, an add filling the leftmost gap,
    /// an add past the end, a leave proposal committed by reference, a new
    /// credential on the committer's path, and a removal at the tree's end
    /// each give the roster the committer reads in full.
    #[test]
    fn a_commit_roster_read_by_its_changes_equals_the_whole_tree() {
        let names = ["alice", "bob", "carol", "dave", "erin", "frank"];
        let [alice, bob, carol, dave, erin, frank] = names.map(engine);
        let kps: Vec<_> = [&bob, &carol, &dave, &erin].iter().map(|e| e.generate_key_package().expect("kp")).collect();
        let out = alice.create_conversation(&group_info("roster"), &kps).expect("create");
        let conv = out.conversation;
        alice.confirm_commit(&conv).expect("confirm");
        for e in [&bob, &carol, &dave, &erin] {
            e.join(out.welcome.as_deref().expect("welcome")).expect("join");
        }
        let apply = |commit: &OutgoingCommit, by: &TestEngine, readers: &[&TestEngine]| {
            by.confirm_commit(&conv).expect("confirm");
            let whole = by.members(&conv).expect("members");
            for r in readers {
                r.process(&conv, &commit.commit).expect("process");
                assert_eq!(r.members(&conv).expect("members"), whole, "{:?}", r.identity().address());
            }
        };
        let address = |e: &TestEngine| e.identity().address();
        // Gaps at leaves 2 and 3.
        let c = alice.remove_members(&conv, &[address(&carol), address(&dave)]).expect("remove");
        apply(&c, &alice, &[&bob, &erin]);
        // frank takes the leftmost gap; a second new device of frank's
        // account the next one; a third goes past the end.
        let frank2 = engine("frank");
        let frank3 = engine("frank");
        let kps: Vec<_> = [&frank, &frank2, &frank3].iter().map(|e| e.generate_key_package().expect("kp")).collect();
        let c = erin.add_members(&conv, &kps).expect("add");
        apply(&c, &erin, &[&alice, &bob]);
        let indices: Vec<u32> = bob.members(&conv).expect("members").iter().map(|m| m.index).collect();
        assert_eq!(indices, [0, 1, 2, 3, 4, 5]);
        for e in [&frank, &frank2, &frank3] {
            e.join(c.welcome.as_deref().expect("welcome")).expect("join");
        }
        // bob leaves by a proposal that alice commits by reference.
        let (proposal, _) = bob.propose_leave(&conv).expect("propose");
        for e in [&alice, &erin, &frank] {
            e.process(&conv, &proposal).expect("proposal");
        }
        let c = alice.commit_pending(&conv).expect("commit").expect("a pending proposal");
        apply(&c, &alice, &[&erin, &frank]);
        // erin's new certificate arrives on her commit's path.
        let rotated = erin.identity().with_new_identity_key(erin.crypto(), 2).expect("rotate");
        let c = erin.update_credential(&conv, &rotated).expect("stage");
        apply(&c, &erin, &[&alice, &frank]);
        // The last leaf goes: the tree shrinks.
        let c = alice.remove_members(&conv, &[address(&frank3)]).expect("remove");
        apply(&c, &alice, &[&erin, &frank]);
        assert_eq!(frank.members(&conv).expect("members").len(), 4);
    }

    /// Members compute one SFrame base key per epoch (RFC 9605 §5.2); a
    /// removal moves the others to a key the removed member cannot compute.
    #[test]
    fn call_keys_are_shared_per_epoch_and_a_removal_rekeys() {
        let (alice, bob, carol) = (engine("alice"), engine("bob"), engine("carol"));
        let kps = vec![bob.generate_key_package().expect("kp"), carol.generate_key_package().expect("kp")];
        let out = alice.create_conversation(&group_info("call"), &kps).expect("create");
        let conv = out.conversation;
        alice.confirm_commit(&conv).expect("confirm");
        for e in [&bob, &carol] {
            e.join(out.welcome.as_deref().expect("welcome")).expect("join");
        }
        let keys: Vec<CallKeying> =
            [&alice, &bob, &carol].iter().map(|e| e.call_keying(&conv).expect("keys")).collect();
        assert_eq!(keys[0].secret.len(), SFRAME_SECRET_LEN);
        assert!(keys.iter().all(|k| k.secret == keys[0].secret && k.epoch == keys[0].epoch));
        let mut indexes: Vec<u32> = keys.iter().map(|k| k.own_index).collect();
        indexes.sort_unstable();
        indexes.dedup();
        assert_eq!(indexes.len(), 3, "each member its own sender index");
        assert!(format!("{:?}", keys[0]).contains("redacted"));

        let remove = alice.remove_members(&conv, &[carol.identity().address()]).expect("remove");
        alice.confirm_commit(&conv).expect("confirm");
        bob.process(&conv, &remove.commit).expect("bob follows");
        let _ = carol.process(&conv, &remove.commit);
        let (a, b) = (alice.call_keying(&conv).expect("keys"), bob.call_keying(&conv).expect("keys"));
        assert_eq!(a.secret, b.secret);
        assert_eq!(a.epoch, Epoch(keys[0].epoch.0 + 1));
        assert_ne!(a.secret, keys[0].secret, "a new epoch, a new key");
        assert_eq!(a.members.len(), 2);
        if let Ok(c) = carol.call_keying(&conv) {
            assert_ne!(c.secret, a.secret, "the removed member cannot compute the new key");
        }
    }

    /// The disappearing-messages timer: a commit every member applies and
    /// reads as a change of it, messages read under it carry it, and its
    /// extension's bytes are pinned (a change of them is a visible decision).
    #[test]
    fn disappearing_timer_is_agreed_by_commit_and_carried_by_messages() {
        assert_eq!(DisappearingExt { seconds: 3600 }.mls_encode_to_vec().expect("encode"), [0, 0, 0x0e, 0x10]);
        let (alice, bob) = (engine("alice"), engine("bob"));
        let out =
            alice.create_conversation(&group_info("club"), &[bob.generate_key_package().expect("kp")]).expect("create");
        let conv = out.conversation;
        alice.confirm_commit(&conv).expect("confirm");
        bob.join(&out.welcome.expect("welcome")).expect("join");
        assert_eq!(bob.disappearing(&conv).expect("timer"), None);

        let set = alice.set_disappearing(&conv, Some(3600)).expect("stage");
        alice.confirm_commit(&conv).expect("confirm");
        match bob.process(&conv, &set.commit).expect("commit") {
            Event::Commit { disappearing: Some(Some(3600)), renamed: None, .. } => {}
            other => panic!("expected the timer set, got {other:?}"),
        }
        assert_eq!(bob.disappearing(&conv).expect("timer"), Some(3600));
        let (ct, _) = alice.encrypt(&conv, &Content::text(MessageId([1; 16]), 1, "timed")).expect("encrypt");
        assert!(matches!(bob.process(&conv, &ct).expect("decrypt"), Event::Message { disappearing: Some(3600), .. }));

        // Off removes the extension; an update changes nothing of it.
        let off = alice.set_disappearing(&conv, None).expect("stage");
        alice.confirm_commit(&conv).expect("confirm");
        assert!(matches!(
            bob.process(&conv, &off.commit).expect("commit"),
            Event::Commit { disappearing: Some(None), .. }
        ));
        let update = alice.update_keys(&conv).expect("stage");
        alice.confirm_commit(&conv).expect("confirm");
        assert!(matches!(
            bob.process(&conv, &update.commit).expect("commit"),
            Event::Commit { disappearing: None, .. }
        ));
        let (ct, _) = alice.encrypt(&conv, &Content::text(MessageId([2; 16]), 2, "kept")).expect("encrypt");
        assert!(matches!(bob.process(&conv, &ct).expect("decrypt"), Event::Message { disappearing: None, .. }));
    }

    #[test]
    fn group_lifecycle_rename_remove_leave_and_a_lost_commit_race() {
        let (alice, bob, carol, dave) = (engine("alice"), engine("bob"), engine("carol"), engine("dave"));
        let kps = vec![bob.generate_key_package().expect("kp"), carol.generate_key_package().expect("kp")];
        let out = alice.create_conversation(&group_info("friends"), &kps).expect("create");
        let conv = out.conversation;
        alice.confirm_commit(&conv).expect("confirm");
        let welcome = out.welcome.expect("welcome");
        for e in [&bob, &carol] {
            assert!(
                matches!(e.join(&welcome).expect("join"), Event::Joined { info, members, .. } if info.name == "friends" && members.len() == 3)
            );
        }

        // Everyone sends, everyone else reads.
        for (i, sender) in [&alice, &bob, &carol].into_iter().enumerate() {
            let (ct, recipients) =
                sender.encrypt(&conv, &Content::text(MessageId([i as u8; 16]), 1, "hi")).expect("encrypt");
            assert_eq!(recipients.len(), 2);
            for r in [&alice, &bob, &carol] {
                if r.identity().address() != sender.identity().address() {
                    assert!(matches!(r.process(&conv, &ct).expect("decrypt"), Event::Message { .. }));
                }
            }
        }

        // A race: alice renames and bob adds dave at the same epoch. The
        // server accepts alice's; bob drops his, processes hers, and retries.
        let rename = alice.rename(&conv, &group_info("best friends")).expect("rename");
        let add = bob.add_members(&conv, &[dave.generate_key_package().expect("kp")]).expect("add");
        assert_eq!(rename.epoch, add.epoch);
        alice.confirm_commit(&conv).expect("alice wins");
        bob.discard_commit(&conv).expect("bob discards");
        for e in [&bob, &carol] {
            match e.process(&conv, &rename.commit).expect("process rename") {
                Event::Commit { renamed: Some(info), committer, .. } => {
                    assert_eq!(info.name, "best friends");
                    assert_eq!(committer.address, alice.identity().address());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let add = bob.add_members(&conv, &[dave.generate_key_package().expect("kp")]).expect("add again");
        assert_eq!(add.epoch, Epoch(rename.epoch.0 + 1));
        bob.confirm_commit(&conv).expect("bob's add lands");
        assert_eq!(add.commit_recipients.len(), 2);
        for e in [&alice, &carol] {
            assert!(
                matches!(e.process(&conv, &add.commit).expect("add"), Event::Commit { added, .. } if added.len() == 1)
            );
        }
        dave.join(add.welcome.as_deref().expect("welcome")).expect("dave joins");

        // alice removes carol; carol learns it and can read nothing after.
        let remove = alice.remove_members(&conv, &[carol.identity().address()]).expect("remove");
        assert!(remove.commit_recipients.contains(&carol.identity().address()));
        assert!(!remove.members_after.contains(&carol.identity().address()));
        alice.confirm_commit(&conv).expect("confirm");
        assert_eq!(remove.members_after.len(), alice.members(&conv).expect("members").len());
        assert!(matches!(
            carol.process(&conv, &remove.commit).expect("removed"),
            Event::Commit { removed_self: true, .. }
        ));
        for e in [&bob, &dave] {
            e.process(&conv, &remove.commit).expect("remove");
        }
        let (ct, recipients) = alice.encrypt(&conv, &Content::text(MessageId([9; 16]), 1, "after")).expect("encrypt");
        assert!(!recipients.contains(&carol.identity().address()));
        assert!(carol.process(&conv, &ct).is_err(), "a removed member cannot decrypt");
        assert!(matches!(bob.process(&conv, &ct).expect("bob reads"), Event::Message { .. }));

        // dave leaves: he proposes, bob commits it.
        let (proposal, _) = dave.propose_leave(&conv).expect("propose");
        for e in [&alice, &bob] {
            assert!(
                matches!(e.process(&conv, &proposal).expect("proposal"), Event::LeaveProposed { member, .. } if member.address == dave.identity().address())
            );
        }
        let commit = bob.commit_pending(&conv).expect("commit").expect("something to commit");
        bob.confirm_commit(&conv).expect("confirm");
        let mut after: Vec<_> = bob.members(&conv).expect("members").into_iter().map(|m| m.address).collect();
        let mut declared = commit.members_after.clone();
        after.sort_by_key(|a| a.to_string());
        declared.sort_by_key(|a| a.to_string());
        assert_eq!(declared, after, "the declared roster is the roster after the leave");
        assert!(matches!(
            dave.process(&conv, &commit.commit).expect("dave out"),
            Event::Commit { removed_self: true, .. }
        ));
        assert!(
            matches!(alice.process(&conv, &commit.commit).expect("alice"), Event::Commit { removed, .. } if removed.len() == 1)
        );
        assert_eq!(alice.members(&conv).expect("members").len(), 2);
        assert!(alice.commit_pending(&conv).expect("nothing").is_none());
    }

    /// What a committer whose answer was lost relies on: processing the
    /// echo of its own staged commit applies it (mls-rs matches it), and
    /// the declared roster is the one after it.
    #[test]
    fn the_echo_of_a_staged_commit_applies_it() {
        let alice = engine("alice");
        let bob = engine("bob");
        let carol = engine("carol");
        let kp = bob.generate_key_package().expect("kp");
        let out = alice.create_conversation(&ConversationInfo::direct(), &[kp]).expect("create");
        alice.confirm_commit(&out.conversation).expect("confirm");
        bob.join(out.welcome.as_deref().expect("welcome")).expect("join");
        let conv = out.conversation;
        let add = alice.add_members(&conv, &[carol.generate_key_package().expect("kp")]).expect("add");
        assert!(alice.has_pending_commit(&conv).expect("pending"));
        assert_eq!(add.members_after.len(), 3);
        // The server reads the commit's cleartext framing (our encoding of
        // it is mls-rs's).
        let framing = subrosa_proto::framing::private_framing(&add.commit).expect("a PrivateMessage");
        assert_eq!(framing.group_id, conv.as_bytes().as_slice());
        assert_eq!((framing.epoch, framing.content_type), (1, subrosa_proto::framing::content_type::COMMIT));
        match alice.process(&conv, &add.commit).expect("own echo") {
            Event::Commit { epoch, added, .. } => {
                assert_eq!(epoch, Epoch(2));
                assert_eq!(added.len(), 1);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!alice.has_pending_commit(&conv).expect("pending"));
        bob.process(&conv, &add.commit).expect("bob applies the same commit");
        let (ct, _) = alice.encrypt(&conv, &Content::text(MessageId([3; 16]), 1, "in step")).expect("encrypt");
        let framing = subrosa_proto::framing::private_framing(&ct).expect("a PrivateMessage");
        assert_eq!((framing.epoch, framing.content_type), (2, subrosa_proto::framing::content_type::APPLICATION));
        assert!(matches!(bob.process(&conv, &ct).expect("bob reads"), Event::Message { .. }));
    }

    /// A classical group moves to the post-quantum suite (MLS ReInit): every
    /// member applies the move from the old group's commit, the committer
    /// creates the new group with the same devices (no other device can be
    /// slipped in), and the Welcome joins only as the continuation of the
    /// old group, whose resumption secret it needs.
    #[test]
    fn a_classical_group_moves_to_the_post_quantum_suite_with_the_same_members() {
        use crate::{CIPHERSUITE, PQ_CIPHERSUITE};
        let (alice, bob, carol, mallory) = (engine("alice"), engine("bob"), engine("carol"), engine("mallory"));
        let kps = [&bob, &carol].map(|e| e.generate_key_package_in(CIPHERSUITE).expect("kp"));
        let out = alice.create_conversation_in(&group_info("club"), CIPHERSUITE, &kps).expect("create");
        let conv = out.conversation;
        alice.confirm_commit(&conv).expect("confirm");
        let welcome = out.welcome.expect("welcome");
        for e in [&bob, &carol] {
            e.join(&welcome).expect("join");
        }
        assert!(alice.can_move_to(&conv, PQ_CIPHERSUITE).expect("check"));
        assert!(!alice.can_move_to(&conv, CIPHERSUITE).expect("check"), "already there");

        let to = ConversationId([9; 16]);
        let mv = alice.move_to(&conv, to, PQ_CIPHERSUITE).expect("move");
        alice.confirm_commit(&conv).expect("confirm the move");
        for e in [&bob, &carol] {
            match e.process(&conv, &mv.commit).expect("apply the move") {
                Event::Commit { moved_to, added, removed, .. } => {
                    assert_eq!(moved_to, Some((to, PQ_CIPHERSUITE)));
                    assert!(added.is_empty() && removed.is_empty());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // The old group takes no more commits.
        assert!(alice.update_keys(&conv).expect_err("moved").is_moved());
        assert!(bob.update_keys(&conv).expect_err("moved").is_moved());

        // The server cannot add a listener: a package of another device is
        // refused, and so is a set missing a member.
        let pq = |e: &TestEngine| e.generate_key_package_in(PQ_CIPHERSUITE).expect("kp");
        let with_mallory = [pq(&bob), pq(&carol), pq(&mallory)];
        assert!(alice.create_moved(&conv, &to, &with_mallory).is_err(), "a stranger slipped into the move");
        assert!(alice.create_moved(&conv, &to, &[pq(&bob)]).is_err(), "a member left out of the move");

        let created = alice.create_moved(&conv, &to, &[pq(&bob), pq(&carol)]).expect("create the new group");
        assert_eq!(created.conversation, to);
        assert_eq!(created.epoch, Epoch(0));
        assert_eq!(alice.suite(&to).expect("suite"), PQ_CIPHERSUITE);
        assert_eq!(alice.info(&to).expect("info").name, "club", "the group context goes with it");
        let welcome = created.welcome.expect("welcome");
        assert_eq!(created.welcome_recipients.len(), 2);

        // Joined as anything but the move, the Welcome fails: it needs the
        // old group's resumption secret.
        assert!(bob.join(&welcome).is_err(), "joined a moved group without the old one");
        for e in [&bob, &carol] {
            let joined = e
                .join_resuming(&welcome, |_| Ok::<_, CoreError>(()), &[conv], |_, _, _| Ok(()))
                .expect("join as the move");
            assert!(
                matches!(joined, Event::Joined { conversation, members, .. } if conversation == to && members.len() == 3)
            );
            assert_eq!(e.suite(&to).expect("suite"), PQ_CIPHERSUITE);
        }
        // A move only ever goes to the post-quantum suite: a member cannot
        // move the conversation back (the same rule refuses such a commit
        // from another member), nor move it again.
        for suite in [CIPHERSUITE, PQ_CIPHERSUITE] {
            let back = alice.move_to(&to, ConversationId([3; 16]), suite).expect_err("refused");
            assert!(matches!(back, CoreError::Mls(_)), "{back:?}");
            alice.discard_commit(&to).ok();
        }
        let (ct, recipients) = alice.encrypt(&to, &Content::text(MessageId([5; 16]), 1, "quantum-safe")).expect("send");
        assert_eq!(recipients.len(), 2);
        for e in [&bob, &carol] {
            assert_eq!(text(&e.process(&to, &ct).expect("read")).as_deref(), Some("quantum-safe"));
        }
    }

    /// mls-rs re-initializes only into a tree the size of the old one: a
    /// group with a blank leaf before its last member is not offered a move.
    #[test]
    fn a_group_with_a_gap_in_its_tree_is_not_moved() {
        use crate::{CIPHERSUITE, PQ_CIPHERSUITE};
        let (alice, bob, carol) = (engine("alice"), engine("bob"), engine("carol"));
        let kps = [&bob, &carol].map(|e| e.generate_key_package_in(CIPHERSUITE).expect("kp"));
        let out = alice.create_conversation_in(&group_info("gap"), CIPHERSUITE, &kps).expect("create");
        let conv = out.conversation;
        alice.confirm_commit(&conv).expect("confirm");
        alice.remove_members(&conv, &[bob.identity().address()]).expect("remove bob");
        alice.confirm_commit(&conv).expect("confirm");
        assert!(!alice.can_move_to(&conv, PQ_CIPHERSUITE).expect("check"));
    }
}

/// A device on the pure-Rust provider (the future web client's) and one on
/// AWS-LC (the native clients') in one conversation, both ways: the
/// providers interoperate byte for byte.
#[cfg(all(test, feature = "awslc"))]
mod provider_interop {
    use super::*;
    use mls_rs::storage_provider::in_memory::{InMemoryGroupStateStorage, InMemoryKeyPackageStorage};
    use mls_rs_crypto_rustcrypto::RustCryptoProvider;
    use subrosa_proto::{Handle, MessageId};

    fn engine<C: CryptoProvider + Clone + 'static>(
        crypto: C,
        name: &str,
    ) -> Engine<C, InMemoryGroupStateStorage, InMemoryKeyPackageStorage> {
        let id = DeviceIdentity::generate(&crypto, Handle::new(name).expect("handle"), 0).expect("identity");
        Engine::new(crypto, id, InMemoryGroupStateStorage::new(), InMemoryKeyPackageStorage::new())
    }

    fn text(ev: Event) -> String {
        match ev {
            Event::Message { content, .. } => match content.body {
                crate::content::Body::Text(t) => t,
                other => panic!("unexpected body {other:?}"),
            },
            other => panic!("unexpected event {other:?}"),
        }
    }

    #[test]
    fn a_rustcrypto_device_and_an_aws_lc_device_talk_both_ways() {
        let native = engine(crate::default_crypto(), "alice");
        let web = engine(RustCryptoProvider::default(), "bob");
        // The web device's key package and certificate pass the native checks.
        let kp = web.generate_key_package().expect("kp");
        assert_eq!(native.inspect_key_package(&kp).expect("valid").handle().as_str(), "bob");
        let out = native.create_conversation(&ConversationInfo::direct(), &[kp]).expect("create");
        native.confirm_commit(&out.conversation).expect("confirm");
        web.join(out.welcome.as_deref().expect("welcome")).expect("the web device joins");
        let conv = out.conversation;

        let (ct, _) = native.encrypt(&conv, &Content::text(MessageId([1; 16]), 1, "from aws-lc")).expect("encrypt");
        assert_eq!(text(web.process(&conv, &ct).expect("decrypt")), "from aws-lc");
        let (ct, _) = web.encrypt(&conv, &Content::text(MessageId([2; 16]), 2, "from rustcrypto")).expect("encrypt");
        assert_eq!(text(native.process(&conv, &ct).expect("decrypt")), "from rustcrypto");

        // A commit made with the pure-Rust provider (its key update) is
        // processed natively, and the conversation goes on.
        let update = web.update_keys(&conv).expect("update");
        web.confirm_commit(&conv).expect("confirm");
        assert!(matches!(native.process(&conv, &update.commit).expect("commit"), Event::Commit { .. }));
        let (ct, _) = native.encrypt(&conv, &Content::text(MessageId([3; 16]), 3, "after")).expect("encrypt");
        assert_eq!(text(web.process(&conv, &ct).expect("decrypt")), "after");
    }

    /// One conversation of suite 65100 between a device on AWS-LC and one
    /// on the pure-Rust provider, created by `creator`: the Welcome, a
    /// commit by each side (new path keys: the hybrid KEM both ways) and
    /// messages both ways.
    fn pq_conversation<A, B>(creator: &TestEngineOf<A>, joiner: &TestEngineOf<B>)
    where
        A: CryptoProvider + Clone + 'static,
        B: CryptoProvider + Clone + 'static,
    {
        let kp = joiner.generate_key_package_in(crate::PQ_CIPHERSUITE).expect("kp");
        assert_eq!(crate::key_package_suite(&kp).expect("suite"), crate::PQ_CIPHERSUITE);
        creator.inspect_key_package(&kp).expect("a valid package");
        let out =
            creator.create_conversation_in(&ConversationInfo::direct(), crate::PQ_CIPHERSUITE, &[kp]).expect("create");
        creator.confirm_commit(&out.conversation).expect("confirm");
        let conv = out.conversation;
        joiner.join(out.welcome.as_deref().expect("welcome")).expect("join");
        assert_eq!(creator.suite(&conv).expect("suite"), crate::PQ_CIPHERSUITE);
        assert_eq!(joiner.suite(&conv).expect("suite"), crate::PQ_CIPHERSUITE);

        let (ct, _) = creator.encrypt(&conv, &Content::text(MessageId([1; 16]), 1, "one")).expect("encrypt");
        assert_eq!(text(joiner.process(&conv, &ct).expect("decrypt")), "one");
        let update = joiner.update_keys(&conv).expect("update");
        joiner.confirm_commit(&conv).expect("confirm");
        assert!(matches!(creator.process(&conv, &update.commit).expect("commit"), Event::Commit { .. }));
        let update = creator.update_keys(&conv).expect("update");
        creator.confirm_commit(&conv).expect("confirm");
        assert!(matches!(joiner.process(&conv, &update.commit).expect("commit"), Event::Commit { .. }));
        let (ct, _) = joiner.encrypt(&conv, &Content::text(MessageId([2; 16]), 2, "two")).expect("encrypt");
        assert_eq!(text(creator.process(&conv, &ct).expect("decrypt")), "two");
    }

    type TestEngineOf<C> = Engine<C, InMemoryGroupStateStorage, InMemoryKeyPackageStorage>;

    #[test]
    fn a_post_quantum_conversation_between_aws_lc_and_pure_rust_both_ways() {
        pq_conversation(&engine(crate::default_crypto(), "alice"), &engine(crate::pq::RustCryptoPq::new(), "bob"));
        pq_conversation(&engine(crate::pq::RustCryptoPq::new(), "carol"), &engine(crate::default_crypto(), "dave"));
    }

    /// A conversation keeps its suite: a key package of the other one is
    /// refused with a plain error, and a new conversation cannot mix them.
    #[test]
    fn suites_do_not_mix() {
        let alice = engine(crate::default_crypto(), "alice");
        let bob = engine(crate::default_crypto(), "bob");
        let carol = engine(crate::default_crypto(), "carol");
        let pq = bob.generate_key_package_in(crate::PQ_CIPHERSUITE).expect("kp");
        let classical = carol.generate_key_package().expect("kp");
        let mixed = alice.create_conversation(&ConversationInfo::direct(), &[pq.clone(), classical.clone()]);
        assert!(matches!(mixed, Err(CoreError::SuiteMismatch { conversation: 65100, key_package: 1 })), "{mixed:?}");
        let out = alice.create_conversation(&ConversationInfo::direct(), &[pq]).expect("create");
        alice.confirm_commit(&out.conversation).expect("confirm");
        assert_eq!(alice.suite(&out.conversation).expect("suite"), crate::PQ_CIPHERSUITE);
        let add = alice.add_members(&out.conversation, &[classical]);
        assert!(matches!(add, Err(CoreError::SuiteMismatch { conversation: 65100, key_package: 1 })), "{add:?}");
        assert!(matches!(
            alice.generate_key_package_in(mls_rs::CipherSuite::P256_AES128),
            Err(CoreError::Unsupported(_))
        ));
        // No package yet: the classical suite, as before.
        let alone = alice.create_conversation(&ConversationInfo::own(), &[]).expect("create");
        assert_eq!(alice.suite(&alone.conversation).expect("suite"), crate::CIPHERSUITE);
    }
}

/// Groups kept loaded between calls ([`Engine::with_loaded_groups`]).
#[cfg(all(test, feature = "awslc"))]
mod loaded_tests {
    use super::*;
    use mls_rs::storage_provider::in_memory::{InMemoryGroupStateStorage, InMemoryKeyPackageStorage};
    use mls_rs_core::group::{EpochRecord, GroupState};
    use sha2::Digest as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use subrosa_proto::{Handle, MessageId};

    /// In-memory group storage that names each stored state by its
    /// SHA-256 and counts the states read.
    #[derive(Clone, Default)]
    struct Versioned {
        inner: InMemoryGroupStateStorage,
        last: LastVersions,
        reads: Arc<AtomicUsize>,
    }

    impl Versioned {
        fn digest(&self, id: &[u8]) -> Option<StateVersion> {
            let state = self.inner.state(id).ok()??;
            Some(sha2::Sha256::digest(state.as_slice()).into())
        }
    }

    impl GroupStateStorage for Versioned {
        type Error = <InMemoryGroupStateStorage as GroupStateStorage>::Error;

        fn state(&self, id: &[u8]) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, Self::Error> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let state = self.inner.state(id)?;
            self.last.note(id, state.as_ref().map(|s| sha2::Sha256::digest(s.as_slice()).into()));
            Ok(state)
        }

        fn epoch(&self, id: &[u8], epoch: u64) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, Self::Error> {
            self.inner.epoch(id, epoch)
        }

        fn write(
            &mut self,
            state: GroupState,
            inserts: Vec<EpochRecord>,
            updates: Vec<EpochRecord>,
        ) -> Result<(), Self::Error> {
            let id = state.id.clone();
            let version = sha2::Sha256::digest(state.data.as_slice()).into();
            self.inner.write(state, inserts, updates)?;
            self.last.note(&id, Some(version));
            Ok(())
        }

        fn max_epoch_id(&self, id: &[u8]) -> Result<Option<u64>, Self::Error> {
            self.inner.max_epoch_id(id)
        }
    }

    impl GroupVersions for Versioned {
        fn stored_version(&self, id: &[u8]) -> Option<StateVersion> {
            self.digest(id)
        }

        fn take_last(&self, id: &[u8]) -> Option<StateVersion> {
            self.last.take(id)
        }
    }

    type Kept = Engine<crate::DefaultCrypto, Versioned, InMemoryKeyPackageStorage>;

    /// An engine of `identity` over `store`, keeping groups loaded.
    fn kept(identity: &DeviceIdentity, store: &Versioned, key_packages: &InMemoryKeyPackageStorage) -> Kept {
        let crypto = crate::default_crypto();
        let id =
            DeviceIdentity::from_secret_bytes(&crypto, &identity.to_secret_bytes().expect("export")).expect("import");
        Engine::new(crypto, id, store.clone(), key_packages.clone()).with_loaded_groups(Arc::new(store.clone()), 4)
    }

    fn text_of(ev: Event) -> String {
        super::tests::text(&ev).unwrap_or_else(|| panic!("not a text message: {ev:?}"))
    }

    /// A group kept loaded serves the next calls without reading the store,
    /// and is dropped as soon as the store holds another state: here a
    /// second engine of the same device (another process on the same
    /// store) sends in between. Using the kept group then would encrypt
    /// with a key the other engine already used, which the receiver
    /// refuses.
    #[test]
    fn a_kept_group_is_used_only_while_the_store_holds_its_version() {
        let crypto = crate::default_crypto();
        let alice = DeviceIdentity::generate(&crypto, Handle::new("alice").expect("handle"), 0).expect("identity");
        let (store, key_packages) = (Versioned::default(), InMemoryKeyPackageStorage::new());
        let one = kept(&alice, &store, &key_packages);
        let two = kept(&alice, &store, &key_packages);
        let bob = super::tests::engine("bob");

        let out = one
            .create_conversation(&ConversationInfo::direct(), &[bob.generate_key_package().expect("kp")])
            .expect("create");
        let conv = out.conversation;
        one.confirm_commit(&conv).expect("confirm");
        bob.join(out.welcome.as_deref().expect("welcome")).expect("join");

        let send = |e: &Kept, i: u8| {
            e.encrypt(&conv, &Content::text(MessageId([i; 16]), 1, format!("m{i}"))).expect("encrypt").0
        };
        let reads = store.reads.load(Ordering::SeqCst);
        let m1 = send(&one, 1);
        let m2 = send(&one, 2);
        assert_eq!(one.epoch(&conv).expect("epoch"), Epoch(1));
        assert_eq!(store.reads.load(Ordering::SeqCst), reads, "the kept group served the sends and the lookup");

        let m3 = send(&two, 3);
        let m4 = send(&one, 4);
        assert_eq!(store.reads.load(Ordering::SeqCst), reads + 2, "each engine read the state once");
        for (m, want) in [(m1, "m1"), (m2, "m2"), (m3, "m3"), (m4, "m4")] {
            assert_eq!(text_of(bob.process(&conv, &m).expect("every message decrypts")), want);
        }
    }

    /// A change the store did not keep (its transaction rolled back, here
    /// the stored state put back) is not used either: the next call reads
    /// what the store holds.
    #[test]
    fn a_state_the_store_did_not_keep_is_read_again() {
        let crypto = crate::default_crypto();
        let alice = DeviceIdentity::generate(&crypto, Handle::new("alice").expect("handle"), 0).expect("identity");
        let (store, key_packages) = (Versioned::default(), InMemoryKeyPackageStorage::new());
        let one = kept(&alice, &store, &key_packages);
        let bob = super::tests::engine("bob");
        let out = one
            .create_conversation(&ConversationInfo::direct(), &[bob.generate_key_package().expect("kp")])
            .expect("create");
        let conv = out.conversation;
        one.confirm_commit(&conv).expect("confirm");
        bob.join(out.welcome.as_deref().expect("welcome")).expect("join");

        let before = store.inner.state(conv.as_bytes()).expect("read").expect("stored");
        let dropped = one.encrypt(&conv, &Content::text(MessageId([1; 16]), 1, "never sent")).expect("encrypt").0;
        // Roll back: the store holds the state before that message again.
        let mut inner = store.inner.clone();
        inner
            .write(GroupState { id: conv.as_bytes().to_vec(), data: before }, Vec::new(), Vec::new())
            .expect("restore");
        let reads = store.reads.load(Ordering::SeqCst);
        let sent = one.encrypt(&conv, &Content::text(MessageId([2; 16]), 2, "sent")).expect("encrypt").0;
        assert_eq!(store.reads.load(Ordering::SeqCst), reads + 1, "read again");
        assert_eq!(text_of(bob.process(&conv, &sent).expect("decrypts")), "sent");
        // The rolled-back message used the same key and is now refused.
        assert!(bob.process(&conv, &dropped).is_err());
    }
}

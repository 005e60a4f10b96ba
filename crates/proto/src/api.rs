//! Request and response bodies of the HTTP and WebSocket API (JSON).
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /v1/health` | | `{"status":"ok"}` (unsigned) |
//! | `POST /v1/accounts` | [`RegisterRequest`] | `201` [`Empty`] |
//! | `GET /v1/accounts/{handle}` | | [`AccountInfo`] |
//! | `POST /v1/keypackages` | [`KeyPackageUpload`] | [`KeyPackageCount`] |
//! | `GET /v1/keypackages` | | [`KeyPackageCount`] |
//! | `POST /v1/keypackages/claim` | [`ClaimRequest`] | [`ClaimResponse`] |
//! | `POST /v1/messages` | [`SendRequest`] | [`SendResponse`] |
//! | `GET /v1/inbox?limit=N` | | [`InboxResponse`] |
//! | `POST /v1/inbox/ack` | [`AckRequest`] | [`AckResponse`] |
//! | `GET /v1/ws` | WebSocket of [`ServerFrame`] / [`ClientFrame`] | |
//! | `POST /v1/devices` | [`AddDeviceRequest`] | [`AccountInfo`] |
//! | `DELETE /v1/devices/{device_id}` | | [`AccountInfo`] |
//! | `PUT /v1/accounts/keys` | [`KeySetUpdate`] | [`AccountInfo`] |
//! | `POST /v1/links` (unsigned) | [`LinkCreateRequest`] | `201` [`LinkCreated`] |
//! | `GET /v1/links/{link}` | | [`LinkSlot`] |
//! | `POST /v1/links/{link}/approve` | [`LinkApproveRequest`] | [`Empty`] |
//! | `GET /v1/links/{link}/response` (unsigned) | | [`LinkResponse`] |
//! | `POST /v1/blobs` | [`BlobCreate`] | `201` [`BlobCreated`] |
//! | `PUT /v1/blobs/{blob}?offset=N` | the next bytes (octet-stream) | [`BlobStatus`] |
//! | `GET /v1/blobs/{blob}/status` | | [`BlobStatus`] |
//! | `POST /v1/blobs/{blob}/finish` | [`Empty`] | [`BlobStatus`] |
//! | `GET /v1/blobs/{blob}?offset=N&length=M` | | the bytes (octet-stream) |
//! | `POST /v1/blobs/{blob}/fetched` | [`Empty`] | [`BlobFetched`] |
//! | `POST /v1/calls/token` | [`crate::relay::CallTokenRequest`] | [`crate::relay::CallToken`] |
//!
//! Key transparency routes are listed in [`crate::kt`].
//!
//! Every request but health is signed by the device (see [`crate::SignedHeaders`]);
//! registration is signed by the device key it registers.
//! Every error is an HTTP 4xx/5xx with an [`ErrorBody`].

use serde::{Deserialize, Serialize};

use crate::{BlobId, ConversationId, DeviceAddress, DeviceId, Epoch, Handle, LinkId, SendId, B64};

/// An empty JSON object.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Empty {}

/// Creates an account and its first device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The handle asked for.
    pub handle: Handle,
    /// The account's identity public key (Ed25519).
    pub identity_key: B64,
    /// The first device.
    pub device: DeviceRecord,
}

/// A device as the server knows it: an id, the device's signature key, and
/// the certificate by which the account identity key vouches for it. The
/// server stores the certificate opaquely; clients check it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// The device id.
    pub device_id: DeviceId,
    /// The device's signature public key (Ed25519): it signs requests and is
    /// the device's MLS signature key.
    pub signature_key: B64,
    /// The certificate by the account identity key.
    pub certificate: B64,
}

/// An account's public keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountInfo {
    /// The handle.
    pub handle: Handle,
    /// The identity public key.
    pub identity_key: B64,
    /// Its active devices.
    pub devices: Vec<DeviceRecord>,
    /// The directory's lookup proof that this handle maps to
    /// [`crate::kt::directory_value`] of these keys.
    #[serde(default)]
    pub kt: Option<crate::kt::KtLookup>,
}

/// A batch of one-time key packages and optionally a new last-resort one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPackageUpload {
    /// One-time key packages (MLS `KeyPackage` messages, opaque to the server).
    pub one_time: Vec<B64>,
    /// A last-resort key package, handed out when no one-time package is left;
    /// replaces the previous one of its ciphersuite.
    #[serde(default)]
    pub last_resort: Option<B64>,
    /// Last-resort packages of further ciphersuites (at most one each; the
    /// server reads each package's suite from its bytes). Left out when
    /// empty, so older servers accept the rest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_last_resort: Vec<B64>,
    /// Drop every one-time package the server still holds for this device
    /// before storing these (the device replaces old keys; see the client's
    /// key rotation). Left out when false, so older servers accept the rest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace: bool,
}

/// How many one-time key packages the server still holds for this device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyPackageCount {
    /// Unclaimed one-time packages of the classical suite.
    pub one_time: u64,
    /// Whether a last-resort package of the classical suite is stored.
    pub last_resort: bool,
    /// The same for every suite the device has packages of (the classical
    /// one included), by suite. Left out when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suites: Vec<SuiteCount>,
}

impl KeyPackageCount {
    /// The counts of one suite (zero when the device has none of it).
    pub fn of(&self, suite: u16) -> SuiteCount {
        self.suites.iter().find(|c| c.suite == suite).cloned().unwrap_or(SuiteCount {
            suite,
            one_time: 0,
            last_resort: false,
        })
    }
}

/// A device's key packages of one MLS ciphersuite.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SuiteCount {
    /// The suite (its MLS code point).
    pub suite: u16,
    /// Unclaimed one-time packages.
    pub one_time: u64,
    /// Whether a last-resort package is stored.
    pub last_resort: bool,
}

/// The classical MLS ciphersuite (1, X25519), which a claim asks for when it
/// names none.
pub const CLASSICAL_SUITE: u16 = 1;

fn is_classical(suite: &u16) -> bool {
    *suite == CLASSICAL_SUITE
}

fn classical() -> u16 {
    CLASSICAL_SUITE
}

/// Claims one key package of every device of a handle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// Whose packages.
    pub handle: Handle,
    /// Of which MLS ciphersuite: devices with no package of it get none.
    /// Left out for the classical suite, so older servers accept it.
    #[serde(default = "classical", skip_serializing_if = "is_classical")]
    pub suite: u16,
}

/// One key package per device of the handle (the caller's own device excluded).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimResponse {
    /// The handle.
    pub handle: Handle,
    /// Its identity public key.
    pub identity_key: B64,
    /// One entry per device that had a package.
    pub packages: Vec<ClaimedKeyPackage>,
    /// The directory's lookup proof for the handle's keys: its value must be
    /// [`crate::kt::directory_value`] of the identity key and *all* the
    /// handle's devices, listed in `devices`.
    #[serde(default)]
    pub kt: Option<crate::kt::KtLookup>,
    /// All the handle's devices (those without a package too), so a client
    /// can recompute the directory value.
    #[serde(default)]
    pub devices: Vec<DeviceRecord>,
}

/// A claimed key package with the device it belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimedKeyPackage {
    /// The device.
    pub device: DeviceRecord,
    /// The key package (an MLS message).
    pub key_package: B64,
    /// True when this was the last-resort package (handed out again later).
    pub last_resort: bool,
}

/// What a stored message is, so a client can process handshakes first.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// An MLS Welcome for the recipient devices.
    Welcome,
    /// An MLS commit (handshake), ordered per conversation by the server.
    Commit,
    /// An MLS application message.
    Application,
}

impl MessageKind {
    /// Stable text form, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Welcome => "welcome",
            MessageKind::Commit => "commit",
            MessageKind::Application => "application",
        }
    }
    /// Parses the stored text form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "welcome" => Some(MessageKind::Welcome),
            "commit" => Some(MessageKind::Commit),
            "application" => Some(MessageKind::Application),
            _ => None,
        }
    }
}

/// The server's commit-ordering check for a send that carries a commit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CommitGuard {
    /// The epoch the commit was made in. The server accepts it only when this
    /// is the conversation's current epoch (0 creates the conversation), and
    /// then moves the conversation to `epoch + 1`.
    pub epoch: Epoch,
    /// The conversation's member devices after this commit, as the
    /// committer's MLS roster says (the committer included). The server
    /// keeps it as the conversation's roster: only devices in it may send
    /// to the conversation. A client that sends it also gets its own commit
    /// delivered back (the echo), so a lost answer never desyncs it.
    /// Absent from older clients: the server then adds the send's sender
    /// and recipients to the roster it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<DeviceAddress>>,
}

/// One ciphertext and the devices it goes to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SendPart {
    /// What it is.
    pub kind: MessageKind,
    /// Recipient devices.
    pub recipients: Vec<DeviceAddress>,
    /// The ciphertext, uploaded once whatever the number of recipients.
    pub ciphertext: B64,
}

/// Stores parts for their recipients, atomically: all or nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// The conversation (MLS group id).
    pub conversation: ConversationId,
    /// Idempotency key: a retried send with the same key is stored once.
    pub send_id: SendId,
    /// Present when the send carries a commit.
    #[serde(default)]
    pub commit: Option<CommitGuard>,
    /// The parts, delivered in this order.
    pub parts: Vec<SendPart>,
    /// When the conversation's disappearing-messages timer is on: the time
    /// (ms since the Unix epoch) after which the server deletes these parts
    /// whether delivered or not. It tells the server the timer; the server
    /// bounds it by its own message TTL. Absent otherwise (and then left out
    /// of the bytes, so a request without it is what older servers accept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// The answer to a send: it is durably stored for every recipient device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SendResponse {
    /// True when this send id had been stored before (a retry).
    pub duplicate: bool,
    /// The conversation's epoch after this send, when it carried a commit.
    #[serde(default)]
    pub epoch: Option<Epoch>,
    /// The server's time of storing, ms since the Unix epoch.
    pub server_time: u64,
}

/// One stored message for this device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    /// The delivery id, increasing in delivery order; acknowledge it.
    pub id: u64,
    /// The conversation.
    pub conversation: ConversationId,
    /// The sending device, as authenticated by the server (MLS authenticates
    /// it again end to end).
    pub sender: DeviceAddress,
    /// What it is.
    pub kind: MessageKind,
    /// The ciphertext.
    pub ciphertext: B64,
    /// When the server stored it, ms since the Unix epoch.
    pub server_time: u64,
    /// With a commit: the conversation's roster as the server stored it
    /// when it accepted the commit (the devices it lets send there). Members
    /// compare it with the MLS roster and alert on a device the server lets
    /// in that is not a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roster: Option<Vec<DeviceAddress>>,
}

/// Queued messages, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InboxResponse {
    /// The envelopes.
    pub messages: Vec<Envelope>,
}

/// Acknowledges delivered envelopes: the server deletes them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    /// Envelope ids.
    pub ids: Vec<u64>,
}

/// How many envelopes were deleted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AckResponse {
    /// Deleted count.
    pub deleted: u64,
}

/// A frame the server pushes on the WebSocket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Newly queued envelopes.
    Messages {
        /// The envelopes, oldest first.
        messages: Vec<Envelope>,
    },
    /// The server is closing the socket for this reason.
    Error(ErrorBody),
}

/// A frame a client sends on the WebSocket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Acknowledges envelopes, as [`AckRequest`].
    Ack {
        /// Envelope ids.
        ids: Vec<u64>,
    },
}

/// Stable error codes. The text of [`ErrorBody::message`] may change; codes do not.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The body is not valid JSON of the expected shape.
    BadRequest,
    /// The body or a part of it is over a limit.
    TooLarge,
    /// The request's signature headers are missing, malformed or wrong.
    Unauthorized,
    /// The signed request's timestamp is too far from the server's clock.
    StaleRequest,
    /// This signed request was seen before.
    Replayed,
    /// The handle is taken.
    HandleTaken,
    /// No such account or device.
    UnknownHandle,
    /// No key package is left for any device of the handle.
    NoKeyPackage,
    /// The commit was made for an epoch that is not the conversation's current one.
    StaleEpoch,
    /// The sending device is not in the conversation's roster (403).
    NotAMember,
    /// Too many requests; slow down.
    RateLimited,
    /// The server failed; try again later.
    Internal,
    /// The storage backend is unreachable; try again later.
    Unavailable,
    /// No such route.
    NotFound,
    /// The sender has too many undelivered bytes stored on the server (its
    /// device's or its account's quota, 413); it frees as recipients fetch
    /// and acknowledge. Not retried by itself: the send is refused.
    QuotaExceeded,
    /// The blob is larger than the server's maximum blob size (413).
    BlobTooLarge,
    /// The uploader's account holds as many blob bytes as its quota allows
    /// (413); they free as recipients fetch its blobs, or at their expiry.
    BlobQuotaExceeded,
    /// An upload piece does not start where the blob's received bytes end
    /// (409): ask `GET /v1/blobs/{blob}/status` and resume from there.
    BlobOffset,
    /// The blob is not complete yet: it cannot be finished or downloaded (409).
    BlobIncomplete,
    /// No such blob for this device: never made, expired, fetched by every
    /// recipient, or the device is neither its uploader nor a recipient (404).
    UnknownBlob,
    /// A code this version does not know (sent by a newer server): the
    /// answer's HTTP status still says whether to retry.
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// The code's stable text.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Other => "other",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::StaleRequest => "stale_request",
            ErrorCode::Replayed => "replayed",
            ErrorCode::HandleTaken => "handle_taken",
            ErrorCode::UnknownHandle => "unknown_handle",
            ErrorCode::NoKeyPackage => "no_key_package",
            ErrorCode::StaleEpoch => "stale_epoch",
            ErrorCode::NotAMember => "not_a_member",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotFound => "not_found",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::BlobTooLarge => "blob_too_large",
            ErrorCode::BlobQuotaExceeded => "blob_quota_exceeded",
            ErrorCode::BlobOffset => "blob_offset",
            ErrorCode::BlobIncomplete => "blob_incomplete",
            ErrorCode::UnknownBlob => "unknown_blob",
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// One human-readable line.
    pub message: String,
    /// With [`ErrorCode::StaleEpoch`]: the conversation's current epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_epoch: Option<Epoch>,
}

/// Adds a device to the caller's account (signed by an existing device of it).
/// Used when a new device is linked; the certificate is by the identity key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddDeviceRequest {
    /// The new device.
    pub device: DeviceRecord,
}

/// Replaces the caller's account keys (`PUT /v1/accounts/keys`): a new
/// identity key with every active device re-certified by it (after a
/// device removal), or the caller's own new signature key (`devices
/// rekey`). The server checks only the shape (exactly the active devices;
/// only the caller's signature key may change); clients check every
/// certificate against the directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySetUpdate {
    /// The account's identity public key, new or unchanged.
    pub identity_key: B64,
    /// Every active device of the account.
    pub devices: Vec<DeviceRecord>,
}

/// Opens a link slot for a new device of `handle` (unsigned: the new device
/// has no registered key yet). The request is opaque to the server: the new
/// device's public keys, which the approving device checks against the
/// fingerprint in the code the user typed or scanned.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkCreateRequest {
    /// The account the device wants to join.
    pub handle: Handle,
    /// Opaque link request (at most [`crate::limits::MAX_LINK_REQUEST_BYTES`]).
    pub request: B64,
}

/// A link slot was opened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkCreated {
    /// The slot.
    pub link: LinkId,
    /// When it expires, ms since the Unix epoch.
    pub expires_at: u64,
}

/// A link slot as a device of the account sees it (`GET /v1/links/{id}`, signed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkSlot {
    /// The slot.
    pub link: LinkId,
    /// The new device's opaque request.
    pub request: B64,
    /// When it expires, ms since the Unix epoch.
    pub expires_at: u64,
}

/// Approves a link: the opaque response, encrypted to the new device
/// (`POST /v1/links/{id}/approve`, signed by a device of the account).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkApproveRequest {
    /// Opaque response (at most [`crate::limits::MAX_LINK_BYTES`]).
    pub response: B64,
}

/// What the new device polls (`GET /v1/links/{id}/response`, unsigned: the
/// response is encrypted to its key).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkResponse {
    /// The response once a device approved, else `None`.
    pub response: Option<B64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commit guard on the wire: an older client's form (no member
    /// list) still parses, and a guard without one serialises as before.
    #[test]
    fn commit_guard_bytes_are_stable() {
        let old: CommitGuard = serde_json::from_str(r#"{"epoch":3}"#).expect("older client's guard");
        assert_eq!(old, CommitGuard { epoch: Epoch(3), members: None });
        assert_eq!(serde_json::to_string(&old).expect("json"), r#"{"epoch":3}"#);
        let alice = DeviceAddress { handle: Handle::new("alice").expect("handle"), device: DeviceId([0xA1; 8]) };
        let new = CommitGuard { epoch: Epoch(4), members: Some(vec![alice]) };
        let json = r#"{"epoch":4,"members":[{"handle":"alice","device":"a1a1a1a1a1a1a1a1"}]}"#;
        assert_eq!(serde_json::to_string(&new).expect("json"), json);
        assert_eq!(serde_json::from_str::<CommitGuard>(json).expect("parse"), new);
        assert!(serde_json::from_str::<CommitGuard>(r#"{"epoch":4,"roster":[]}"#).is_err());
        let code: ErrorBody = serde_json::from_str(r#"{"code":"not_a_member","message":"m"}"#).expect("code");
        assert_eq!(code.code, ErrorCode::NotAMember);
        let newer: ErrorBody = serde_json::from_str(r#"{"code":"from_the_future","message":"m"}"#).expect("newer code");
        assert_eq!(newer.code, ErrorCode::Other);
        assert_eq!(ErrorCode::NotAMember.as_str(), "not_a_member");
    }

    /// A send on the wire: without an expiry its bytes are what they were
    /// before disappearing messages (what older servers accept and what
    /// stored outbox requests hold); with one, `expires_at` comes last.
    #[test]
    fn send_request_bytes_are_stable() {
        let bob = DeviceAddress { handle: Handle::new("bob").expect("handle"), device: DeviceId([0xB0; 8]) };
        let mut req = SendRequest {
            conversation: ConversationId([7; 16]),
            send_id: SendId([9; 16]),
            commit: None,
            parts: vec![SendPart {
                kind: MessageKind::Application,
                recipients: vec![bob],
                ciphertext: B64(vec![1, 2, 3]),
            }],
            expires_at: None,
        };
        let plain = r#"{"conversation":"07070707070707070707070707070707","send_id":"09090909090909090909090909090909","commit":null,"parts":[{"kind":"application","recipients":[{"handle":"bob","device":"b0b0b0b0b0b0b0b0"}],"ciphertext":"AQID"}]}"#;
        assert_eq!(serde_json::to_string(&req).expect("json"), plain);
        req.expires_at = Some(1_700_000_060_000);
        let timed = plain.replace("}]}", r#"}],"expires_at":1700000060000}"#);
        assert_eq!(serde_json::to_string(&req).expect("json"), timed);
        let back: SendRequest = serde_json::from_str(&timed).expect("parse");
        assert_eq!(back.expires_at, Some(1_700_000_060_000));
        let blob = BlobCreate { size: 4096, readers: vec![], expires_at: Some(5) };
        assert_eq!(serde_json::to_string(&blob).expect("json"), r#"{"size":4096,"readers":[],"expires_at":5}"#);
        let old: BlobCreate = serde_json::from_str(r#"{"size":4096,"readers":[]}"#).expect("older client's create");
        assert_eq!(old.expires_at, None);
    }

    /// A key-package upload on the wire: `replace` is left out when false,
    /// so an upload that replaces nothing is what older servers accept.
    #[test]
    fn key_package_upload_bytes_are_stable() {
        let plain = KeyPackageUpload {
            one_time: vec![B64(vec![1, 2])],
            last_resort: None,
            more_last_resort: vec![],
            replace: false,
        };
        assert_eq!(serde_json::to_string(&plain).expect("json"), r#"{"one_time":["AQI="],"last_resort":null}"#);
        let rotate = KeyPackageUpload {
            one_time: vec![],
            last_resort: Some(B64(vec![3])),
            more_last_resort: vec![],
            replace: true,
        };
        let json = r#"{"one_time":[],"last_resort":"Aw==","replace":true}"#;
        assert_eq!(serde_json::to_string(&rotate).expect("json"), json);
        let back: KeyPackageUpload = serde_json::from_str(json).expect("parse");
        assert!(back.replace);
        let old: KeyPackageUpload = serde_json::from_str(r#"{"one_time":["AQI="]}"#).expect("older client's upload");
        assert!(!old.replace && old.last_resort.is_none());
    }

    /// Key packages by suite on the wire: the classical suite's fields are
    /// where they always were, and a claim for it is what older servers
    /// took.
    #[test]
    fn key_package_suites_bytes_are_stable() {
        let alice = Handle::new("alice").expect("handle");
        let classical = ClaimRequest { handle: alice.clone(), suite: CLASSICAL_SUITE };
        assert_eq!(serde_json::to_string(&classical).expect("json"), r#"{"handle":"alice"}"#);
        let pq = ClaimRequest { handle: alice, suite: 65100 };
        let json = r#"{"handle":"alice","suite":65100}"#;
        assert_eq!(serde_json::to_string(&pq).expect("json"), json);
        assert_eq!(serde_json::from_str::<ClaimRequest>(json).expect("parse").suite, 65100);
        assert_eq!(serde_json::from_str::<ClaimRequest>(r#"{"handle":"alice"}"#).expect("old").suite, 1);

        let upload = KeyPackageUpload {
            one_time: vec![],
            last_resort: Some(B64(vec![1])),
            more_last_resort: vec![B64(vec![2])],
            replace: false,
        };
        let json = r#"{"one_time":[],"last_resort":"AQ==","more_last_resort":["Ag=="]}"#;
        assert_eq!(serde_json::to_string(&upload).expect("json"), json);
        assert_eq!(serde_json::from_str::<KeyPackageUpload>(json).expect("parse").more_last_resort.len(), 1);

        let count = KeyPackageCount {
            one_time: 3,
            last_resort: true,
            suites: vec![
                SuiteCount { suite: 1, one_time: 3, last_resort: true },
                SuiteCount { suite: 65100, one_time: 0, last_resort: true },
            ],
        };
        let json = r#"{"one_time":3,"last_resort":true,"suites":[{"suite":1,"one_time":3,"last_resort":true},{"suite":65100,"one_time":0,"last_resort":true}]}"#;
        assert_eq!(serde_json::to_string(&count).expect("json"), json);
        let back: KeyPackageCount = serde_json::from_str(json).expect("parse");
        assert_eq!(back.of(65100), SuiteCount { suite: 65100, one_time: 0, last_resort: true });
        let old: KeyPackageCount = serde_json::from_str(r#"{"one_time":3,"last_resort":true}"#).expect("old");
        assert_eq!(old.of(65100).one_time, 0);
    }

    /// A key-set replacement on the wire (also what a client stores while
    /// it is pending).
    #[test]
    fn key_set_update_bytes_are_stable() {
        let update = KeySetUpdate {
            identity_key: B64(vec![1]),
            devices: vec![DeviceRecord {
                device_id: DeviceId([0xA1; 8]),
                signature_key: B64(vec![2]),
                certificate: B64(vec![3]),
            }],
        };
        let json = r#"{"identity_key":"AQ==","devices":[{"device_id":"a1a1a1a1a1a1a1a1","signature_key":"Ag==","certificate":"Aw=="}]}"#;
        assert_eq!(serde_json::to_string(&update).expect("json"), json);
        let back: KeySetUpdate = serde_json::from_str(json).expect("parse");
        assert_eq!(back.devices, update.devices);
        assert!(serde_json::from_str::<KeySetUpdate>(r#"{"identity_key":"AQ==","devices":[],"x":1}"#).is_err());
    }
}

/// Opens an upload of an opaque blob (`POST /v1/blobs`): its whole size,
/// and the devices that may download it (the conversation's member
/// devices but the uploader). The blob goes once every one of them said it
/// fetched it, or at the server's message TTL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlobCreate {
    /// The blob's size in bytes (padded ciphertext; the server sees nothing else).
    pub size: u64,
    /// The devices that may download it.
    pub readers: Vec<DeviceAddress>,
    /// When the message that carries it disappears (ms since the Unix
    /// epoch): the server deletes the blob then, if earlier than its TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// An upload was opened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobCreated {
    /// The blob's id (random, picked by the server).
    pub blob: BlobId,
    /// When the server deletes it whatever happened, ms since the Unix epoch.
    pub expires_at: u64,
}

/// Where an upload stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobStatus {
    /// The declared size.
    pub size: u64,
    /// Bytes received so far (the next upload piece starts here).
    pub received: u64,
    /// True once the uploader finished it: recipients may download it.
    pub complete: bool,
}

/// A recipient fetched a blob to its end.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobFetched {
    /// True when this was the last recipient and the blob is deleted.
    pub deleted: bool,
}

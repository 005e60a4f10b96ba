//! Every error of the client side, each with a one-line message.

use subrosa_core::CoreError;
use subrosa_proto::{ConversationId, ErrorBody, ErrorCode};

/// Everything that can go wrong in the client, each with a one-line message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The passphrase does not open the store.
    #[error("wrong passphrase: the local store could not be opened (nothing was changed)")]
    WrongPassphrase,
    /// No account in this home directory.
    #[error("no account in {0}: run `subrosa register HANDLE --server URL` first")]
    NotRegistered(String),
    /// The home directory already holds an account.
    #[error("{0} already holds an account; use another --home")]
    AlreadyRegistered(String),
    /// A server URL that is not usable.
    #[error("invalid server URL {0}")]
    BadUrl(String),
    /// Plain http to a non-loopback host.
    #[error("refusing plain http to {0}: use https:// (plain http is allowed only to a loopback address)")]
    InsecureUrl(String),
    /// The server refused the request.
    #[error("server refused ({}): {}", .body.code.as_str(), .body.message)]
    Server {
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
    /// The server could not be reached.
    #[error("network: {0}")]
    Network(String),
    /// The server answered something unexpected.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Bad user input.
    #[error("{0}")]
    Input(String),
    /// The target is neither a contact nor a conversation.
    #[error("unknown conversation {0:?}: no conversation with that handle or group yet")]
    UnknownTarget(String),
    /// A key package or member that does not match the expected identity.
    #[error("refused keys for {handle}: {why}")]
    KeyMismatch {
        /// Whose.
        handle: String,
        /// What did not match.
        why: String,
    },
    /// A verified contact's identity key changed.
    #[error("{0}'s identity key changed since you verified it: compare safety numbers again (`subrosa verify {0}`), or send with --accept-key-change")]
    KeyChanged(String),
    /// The server showed this device a key directory inconsistent with what
    /// it or another member saw before.
    #[error("key directory fork: {0}; sending is blocked on this device")]
    DirectoryFork(String),
    /// A member device was added to the conversation whose keys the key
    /// directory contradicts; sending there waits for the user to accept or
    /// remove it.
    #[error("{target}: {by} added a device {device} of {handle} that the key directory does not confirm ({why}); sending there is blocked: accept it with `subrosa accept-device {target} {device}` or remove it with `subrosa group remove`")]
    DeviceNotAccepted {
        /// The conversation as the user names it.
        target: String,
        /// Whose device.
        handle: String,
        /// The device id (hex).
        device: String,
        /// Who added it.
        by: String,
        /// What the directory said.
        why: String,
    },
    /// A Welcome or change this device refuses (a takeover attempt, a
    /// direct conversation with a third account, keys the directory
    /// contradicts); the text is shown to the user as a warning.
    #[error("refused: {why}")]
    Refused {
        /// The conversation it concerned, when this device has it.
        conversation: Option<ConversationId>,
        /// What was refused, naming who sent it.
        why: String,
    },
    /// Protocol engine failure.
    #[error("{0}")]
    Core(#[from] CoreError),
    /// Local store failure.
    #[error("local store: {0}")]
    Store(String),
    /// File system failure.
    #[error("{0}")]
    Io(String),
    /// The server refused a message this device had queued.
    #[error("the server refused the message: {0}")]
    SendRefused(String),
    /// The work is stored on this device but not yet on the server (it could
    /// not be reached, or did not answer): the next command finishes it,
    /// exactly once. The CLI exits 75 (EX_TEMPFAIL) for this.
    #[error("{0}")]
    Pending(String),
    /// A bug in Subrosa.
    #[error("internal error: {0}")]
    Bug(String),
}

impl ClientError {
    /// The server's error code, when the server refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { body, .. } => Some(body.code),
            _ => None,
        }
    }
}

/// What can go wrong in the protocol engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// MLS refused a message or an operation (tampering, replay, wrong epoch…).
    #[error("MLS: {0}")]
    Mls(#[from] mls_rs::error::MlsError),
    /// Bytes that do not decode as what they claim to be.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A signature or certificate that does not verify.
    #[error("invalid signature on {0}")]
    BadSignature(&'static str),
    /// A key package or member that does not belong to who it claims.
    #[error("identity mismatch: {0}")]
    IdentityMismatch(String),
    /// The crypto provider failed.
    #[error("crypto provider: {0}")]
    Crypto(String),
    /// No such conversation in storage.
    #[error("unknown conversation")]
    UnknownConversation,
    /// An unsupported content version.
    #[error("unsupported content version {0}")]
    UnsupportedVersion(u8),
    /// A bug in Subrosa, not in the input.
    #[error("internal error: {0}")]
    Bug(&'static str),
}

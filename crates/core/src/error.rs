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
    /// Something this build does not do (a ciphersuite it does not speak).
    #[error("unsupported {0}")]
    Unsupported(&'static str),
    /// A key package of another suite than the conversation's.
    #[error("a key package of ciphersuite {key_package} for a conversation of ciphersuite {conversation}")]
    SuiteMismatch {
        /// The conversation's suite.
        conversation: u16,
        /// The key package's.
        key_package: u16,
    },
    /// The conversation moved to another suite (its MLS ReInit applied)
    /// and the conversation it continues in is not joined yet.
    #[error("the conversation is moving to post-quantum keys; it goes on once the new one is joined")]
    Moving,
    /// A bug in Subrosa, not in the input.
    #[error("internal error: {0}")]
    Bug(&'static str),
}

impl CoreError {
    /// Whether the local store failed underneath MLS (reading or writing
    /// group state or key packages): nothing is wrong with the input, and
    /// retrying later may succeed, so the caller must not treat the message
    /// as undecryptable.
    pub fn is_storage_failure(&self) -> bool {
        matches!(
            self,
            CoreError::Mls(
                mls_rs::error::MlsError::GroupStorageError(_) | mls_rs::error::MlsError::KeyPackageRepoError(_)
            )
        )
    }

    /// Whether the conversation moved (its MLS ReInit applied): it takes
    /// no more commits, and nothing is to be sent there.
    pub fn is_moved(&self) -> bool {
        matches!(self, CoreError::Moving | CoreError::Mls(mls_rs::error::MlsError::GroupUsedAfterReInit))
    }
}

#[cfg(test)]
mod tests {
    use mls_rs_core::error::IntoAnyError;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("disk full")]
    struct DiskFull;

    impl IntoAnyError for DiskFull {
        fn into_dyn_error(self) -> Result<Box<dyn std::error::Error + Send + Sync>, Self> {
            Ok(Box::new(self))
        }
    }

    #[test]
    fn storage_failures_under_mls_are_told_apart_from_bad_input() {
        let group = CoreError::Mls(mls_rs::error::MlsError::GroupStorageError(DiskFull.into_any_error()));
        let packages = CoreError::Mls(mls_rs::error::MlsError::KeyPackageRepoError(DiskFull.into_any_error()));
        assert!(group.is_storage_failure() && packages.is_storage_failure());
        assert!(!CoreError::Mls(mls_rs::error::MlsError::CommitRequired).is_storage_failure());
        assert!(!CoreError::Malformed("MLS message").is_storage_failure());
    }
}

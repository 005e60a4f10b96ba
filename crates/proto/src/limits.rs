//! Limits both sides enforce. The server's are configurable upwards; these
//! are the defaults and the client refuses to build requests beyond them.

/// Largest request body the server reads, in bytes.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Largest single ciphertext (one part of a send), in bytes.
pub const MAX_CIPHERTEXT_BYTES: usize = 1024 * 1024;
/// Most recipient devices of one send part.
pub const MAX_RECIPIENTS: usize = 1000;
/// Most parts in one send (a commit, its welcome, an application message).
pub const MAX_PARTS: usize = 4;
/// Most key packages in one upload.
pub const MAX_KEY_PACKAGES_PER_UPLOAD: usize = 200;
/// Largest key package, in bytes.
pub const MAX_KEY_PACKAGE_BYTES: usize = 16 * 1024;
/// Largest device certificate, in bytes.
pub const MAX_CERTIFICATE_BYTES: usize = 4096;
/// Most envelopes one inbox fetch returns.
pub const MAX_FETCH: usize = 500;
/// Most ids one acknowledgement carries.
pub const MAX_ACK_IDS: usize = 1000;
/// Default time an undelivered message is kept, in seconds (30 days).
pub const DEFAULT_MESSAGE_TTL_SECS: u64 = 30 * 24 * 3600;
/// Largest link response, in bytes (it may carry recent history).
pub const MAX_LINK_BYTES: usize = 4 * 1024 * 1024;
/// Largest link request, in bytes: a new device's public keys. Small, since
/// anyone may open a slot without signing.
pub const MAX_LINK_REQUEST_BYTES: usize = 16 * 1024;
/// How long a link slot stays open, in seconds.
pub const LINK_TTL_SECS: u64 = 600;
/// Largest attachment blob the server stores by default, in bytes (its
/// `--max-blob-size` raises or lowers it).
pub const DEFAULT_MAX_BLOB_BYTES: u64 = 100 * 1024 * 1024;
/// Largest piece of a blob one upload request carries, and one download
/// answer returns, in bytes: below [`MAX_BODY_BYTES`], so an upload is
/// many signed requests and an interrupted one resumes at the last piece.
pub const MAX_BLOB_PIECE_BYTES: usize = 4 * 1024 * 1024;

//! Errors: [`AppError`] for HTTP answers, [`ServerError`] for starting up.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use subrosa_proto::{Epoch, ErrorBody, ErrorCode};

use crate::store::StoreError;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// The data directory cannot be created or used.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS certificate or key cannot be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// The database cannot be opened, reached or migrated.
    #[error("database: {0}")]
    Store(#[from] StoreError),
}

/// An error answer: a status, a stable [`ErrorCode`] and one line for the
/// client. Internal details go to the log (without content), never to the
/// client.
#[derive(Debug, Clone)]
pub struct AppError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    current_epoch: Option<Epoch>,
    retry_after_secs: Option<u64>,
}

impl AppError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.len() > 300 {
            let mut cut = 300;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        AppError { status, code, message, current_epoch: None, retry_after_secs: None }
    }
    /// 400 bad_request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }
    /// 413 too_large.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, message)
    }
    /// 401 unauthorized.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }
    /// 404 not_found (no such route).
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route")
    }
    /// 429 rate_limited.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, "too many requests; slow down");
        e.retry_after_secs = Some(retry_after_secs.max(1));
        e
    }
    /// 500 internal; `detail` is logged, not sent.
    pub fn internal(detail: &str) -> Self {
        tracing::error!(detail, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, "the server failed; try again later")
    }
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }
    /// The body sent to the client.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { code: self.code, message: self.message.clone(), current_epoch: self.current_epoch }
    }
}

impl From<crate::kt::KtError> for AppError {
    fn from(e: crate::kt::KtError) -> Self {
        AppError::internal(e.detail())
    }
}

impl From<crate::kt::KtServiceError> for AppError {
    fn from(e: crate::kt::KtServiceError) -> Self {
        use crate::kt::KtServiceError;
        match e {
            KtServiceError::Store(e) => e.into(),
            KtServiceError::Directory(e) => e.into(),
            KtServiceError::BadRequest(message) => AppError::bad_request(message),
            other => AppError::internal(&other.to_string()),
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::HandleTaken => Self::new(StatusCode::CONFLICT, ErrorCode::HandleTaken, "handle taken"),
            // No code of its own yet: `bad_request` with a 409 and a clear line.
            StoreError::DeviceTaken => {
                Self::new(StatusCode::CONFLICT, ErrorCode::BadRequest, "device id already registered")
            }
            StoreError::TooManyDevices => Self::too_large(format!(
                "an account may have at most {} active devices",
                crate::store::MAX_DEVICES_PER_ACCOUNT
            )),
            StoreError::LastDevice => Self::bad_request("cannot remove the last device"),
            StoreError::KeySet(why) => Self::new(StatusCode::CONFLICT, ErrorCode::BadRequest, why),
            StoreError::UnknownLink => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such link request, or it expired")
            }
            StoreError::LinkAlreadyApproved => {
                Self::new(StatusCode::CONFLICT, ErrorCode::BadRequest, "this link request was already approved")
            }
            // The route retries with fresh random ids; reaching a client means
            // it failed every time.
            StoreError::LinkTaken => Self::internal("link id collision"),
            StoreError::UnknownHandle => Self::new(StatusCode::NOT_FOUND, ErrorCode::UnknownHandle, "unknown handle"),
            StoreError::UnknownDevice(addr) => {
                Self::new(StatusCode::NOT_FOUND, ErrorCode::UnknownHandle, format!("unknown device {addr}"))
            }
            StoreError::NoKeyPackage => Self::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NoKeyPackage,
                "no key package is left for any device of this handle",
            ),
            StoreError::TooManyKeyPackages => Self::too_large(format!(
                "a device may store at most {} one-time key packages",
                crate::store::MAX_STORED_KEY_PACKAGES
            )),
            StoreError::StaleEpoch { current } => {
                let mut err = Self::new(
                    StatusCode::CONFLICT,
                    ErrorCode::StaleEpoch,
                    format!("the conversation is at epoch {}", current.0),
                );
                err.current_epoch = Some(current);
                err
            }
            StoreError::QuotaExceeded { scope, limit } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::QuotaExceeded,
                format!(
                    "this {scope} has reached its quota of {} of undelivered messages on the server; \
                     sending works again as recipients fetch them",
                    crate::config::format_bytes(limit)
                ),
            ),
            StoreError::BlobTooLarge { limit } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BlobTooLarge,
                format!("this server stores attachments of at most {}", crate::config::format_bytes(limit)),
            ),
            StoreError::BlobQuotaExceeded { limit } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BlobQuotaExceeded,
                format!(
                    "this account has reached its quota of {} of attachments on the server; \
                     uploads work again as recipients fetch them",
                    crate::config::format_bytes(limit)
                ),
            ),
            StoreError::UnknownBlob => Self::new(
                StatusCode::NOT_FOUND,
                ErrorCode::UnknownBlob,
                "no such attachment: it expired, every recipient fetched it, or it is not for this device",
            ),
            StoreError::BlobOffset { received } => Self::new(
                StatusCode::CONFLICT,
                ErrorCode::BlobOffset,
                format!("the upload stands at byte {received}; resume from there"),
            ),
            StoreError::BlobOverrun { size } => {
                Self::bad_request(format!("more bytes than the attachment's declared size of {size}"))
            }
            StoreError::BlobIncomplete => {
                Self::new(StatusCode::CONFLICT, ErrorCode::BlobIncomplete, "the attachment's upload is not complete")
            }
            // The route retries with fresh random ids.
            StoreError::BlobTaken => Self::internal("blob id collision"),
            StoreError::NotAMember => Self::new(
                StatusCode::FORBIDDEN,
                ErrorCode::NotAMember,
                "this device is not a member of the conversation",
            ),
            StoreError::Unavailable(detail) => {
                tracing::error!(detail = %detail, "storage unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    "storage is unavailable; try again later",
                )
            }
            StoreError::Internal(detail) => Self::internal(&detail),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let retry = self.retry_after_secs;
        let mut resp = (self.status, Json(self.body())).into_response();
        // For the metrics' outcome label (`routes::log_request`).
        resp.extensions_mut().insert(self.code);
        if let Some(secs) = retry {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

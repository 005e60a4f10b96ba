//! Signed-request authentication (see [`subrosa_proto::canonical_request`]).
//!
//! Extractors: [`Authed`] for requests without a body (GET, the WebSocket
//! upgrade) and [`SignedJson`] for requests with a JSON body. Both check, in
//! this order: the signature headers are well formed, the device exists, the
//! signature verifies, the timestamp is within the skew window, the device
//! is within its rate limit, and the nonce is new (remembered in the store,
//! so every server node sharing the database refuses a replay). Device keys
//! are cached per node and dropped when the device is revoked (see
//! [`crate::wakeup`]).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{UnparsedPublicKey, ED25519};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use subrosa_proto::{
    canonical_request, DeviceAddress, DeviceId, ErrorCode, Handle, SignedHeaders, HEADER_DEVICE, HEADER_HANDLE,
    HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP, MAX_CLOCK_SKEW_MS,
};

use crate::{AppError, AppState};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The signature headers of a request, parsed but not yet checked.
#[derive(Debug, Clone)]
pub struct RequestSignature {
    /// The texts that were signed.
    pub headers: SignedHeaders,
    /// The device the request claims to come from.
    pub addr: DeviceAddress,
    /// The signature bytes.
    pub signature: Vec<u8>,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, AppError> {
    let value = headers.get(name).ok_or_else(|| AppError::unauthorized(format!("missing header {name}")))?;
    value.to_str().map_err(|_| AppError::unauthorized(format!("header {name} is not text")))
}

impl RequestSignature {
    /// Parses the five signature headers.
    ///
    /// # Errors
    /// 401 unauthorized when one is missing or malformed.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, AppError> {
        let handle_text = header(headers, HEADER_HANDLE)?;
        let device_text = header(headers, HEADER_DEVICE)?;
        let timestamp_text = header(headers, HEADER_TIMESTAMP)?;
        let nonce = header(headers, HEADER_NONCE)?;
        let signature_text = header(headers, HEADER_SIGNATURE)?;
        let handle = Handle::new(handle_text)
            .map_err(|_| AppError::unauthorized(format!("header {HEADER_HANDLE} is not a valid handle")))?;
        let device: DeviceId = device_text
            .parse()
            .map_err(|_| AppError::unauthorized(format!("header {HEADER_DEVICE} is not a device id")))?;
        let timestamp: u64 = timestamp_text
            .parse()
            .map_err(|_| AppError::unauthorized(format!("header {HEADER_TIMESTAMP} is not a number")))?;
        let nonce_ok = (32..=64).contains(&nonce.len()) && nonce.bytes().all(|b| b.is_ascii_hexdigit());
        if !nonce_ok {
            return Err(AppError::unauthorized(format!("header {HEADER_NONCE} must be 16 to 32 random bytes in hex")));
        }
        let signature = STANDARD.decode(signature_text).ok().filter(|s| s.len() == 64).ok_or_else(|| {
            AppError::unauthorized(format!("header {HEADER_SIGNATURE} is not a base64 Ed25519 signature"))
        })?;
        Ok(RequestSignature {
            headers: SignedHeaders {
                handle: handle_text.to_owned(),
                device: device_text.to_owned(),
                timestamp,
                nonce: nonce.to_owned(),
            },
            addr: DeviceAddress { handle, device },
            signature,
        })
    }

    /// Checks the signature against `key` over the canonical request.
    ///
    /// # Errors
    /// 401 unauthorized when it does not verify.
    pub fn verify(&self, key: &[u8], method: &str, path_and_query: &str, body: &[u8]) -> Result<(), AppError> {
        let msg = canonical_request(method, path_and_query, &self.headers, body);
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&msg, &self.signature)
            .map_err(|_| AppError::unauthorized("the request signature does not verify"))
    }

    /// Refuses a timestamp too far from the server's clock.
    ///
    /// # Errors
    /// 401 stale_request.
    pub fn check_fresh(&self, now_ms: u64) -> Result<(), AppError> {
        if now_ms.abs_diff(self.headers.timestamp) > MAX_CLOCK_SKEW_MS {
            return Err(AppError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::StaleRequest,
                "the request timestamp is too far from the server's clock",
            ));
        }
        Ok(())
    }

    /// The nonce as stored (hex is case-insensitive: "AB" and "ab" are the
    /// same nonce).
    pub fn stored_nonce(&self) -> String {
        self.headers.nonce.to_ascii_lowercase()
    }

    /// Remembers the nonce; refuses one seen before.
    ///
    /// # Errors
    /// 401 replayed; storage errors.
    pub async fn check_nonce(&self, state: &AppState) -> Result<(), AppError> {
        if state.store.check_nonce(&self.addr, &self.stored_nonce(), self.headers.timestamp).await? {
            Ok(())
        } else {
            Err(replayed())
        }
    }
}

/// Whether `signature` is the device's (`key`) over a socket's challenge
/// ([`subrosa_proto::frames::auth_message`]).
pub(crate) fn verify_socket(
    key: &[u8],
    challenge: &[u8; subrosa_proto::frames::CHALLENGE_LEN],
    device: &DeviceAddress,
    signature: &[u8],
) -> bool {
    let msg = subrosa_proto::frames::auth_message(challenge, device);
    UnparsedPublicKey::new(&ED25519, key).verify(&msg, signature).is_ok()
}

/// The answer to a request whose nonce was seen before.
pub fn replayed() -> AppError {
    AppError::new(StatusCode::UNAUTHORIZED, ErrorCode::Replayed, "this request was seen before")
}

/// Runs every check for a request by an existing device.
async fn authenticate(
    state: &AppState,
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<DeviceAddress, AppError> {
    Ok(authenticate_with_key(state, method, path_and_query, headers, body).await?.0)
}

/// [`authenticate`], with the signature key the request was checked against.
async fn authenticate_with_key(
    state: &AppState,
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(DeviceAddress, Vec<u8>), AppError> {
    let (sig, key) = authenticate_but_nonce(state, method, path_and_query, headers, body).await?;
    sig.check_nonce(state).await?;
    Ok((sig.addr, key))
}

/// Every check of [`authenticate`] but the nonce's, which the caller stores
/// together with its operation.
async fn authenticate_but_nonce(
    state: &AppState,
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(RequestSignature, Vec<u8>), AppError> {
    let sig = RequestSignature::from_headers(headers)?;
    let key = match state.wakeups.cached_key(&sig.addr, Instant::now()) {
        Some(key) => key,
        None => {
            // Read the revocation count first: a removal committing while we
            // read must not leave its device's key cached.
            let generation = state.wakeups.key_generation();
            let device =
                state.store.device(&sig.addr).await?.ok_or_else(|| AppError::unauthorized("unknown device"))?;
            let key = device.signature_key.into_inner();
            state.wakeups.remember_key(&sig.addr, &key, generation, Instant::now());
            key
        }
    };
    sig.verify(&key, method, path_and_query, body)?;
    sig.check_fresh(now_ms())?;
    state.device_limiter.check(&sig.addr, Instant::now()).await.map_err(AppError::rate_limited)?;
    Ok((sig, key))
}

fn path_and_query(parts: &Parts) -> &str {
    parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
}

/// How long a request body may take to arrive, whole.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads a body of at most `limit` bytes.
///
/// # Errors
/// 413 too_large beyond the limit, 400 when the body cannot be read.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, AppError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(AppError::too_large(format!("the body is over {limit} bytes")));
    }
    // A body that trickles in is dropped after BODY_TIMEOUT: the read-idle
    // timeout alone would let one byte every minute hold a request open.
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| AppError::bad_request(format!("the body did not arrive within {} s", BODY_TIMEOUT.as_secs())))?;
    read.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if err.is::<http_body_util::LengthLimitError>() {
                return AppError::too_large(format!("the body is over {limit} bytes"));
            }
            source = err.source();
        }
        AppError::bad_request("the body could not be read")
    })
}

/// Parses a JSON body; any failure is a 400 bad_request with serde's reason.
///
/// # Errors
/// 400 bad_request.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    serde_json::from_slice(bytes).map_err(|e| AppError::bad_request(format!("invalid JSON body: {e}")))
}

/// A device authenticated by a signed request without a body.
#[derive(Debug, Clone)]
pub struct Authed(pub DeviceAddress);

impl FromRequestParts<AppState> for Authed {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let addr = authenticate(state, parts.method.as_str(), path_and_query(parts), &parts.headers, b"").await?;
        Ok(Authed(addr))
    }
}

/// A device authenticated by a signed request without a body, and the
/// signature key it was checked against: a WebSocket keeps it, so that it
/// closes once the device's key is no longer that one.
#[derive(Debug, Clone)]
pub(crate) struct AuthedKey {
    /// The authenticated device.
    pub device: DeviceAddress,
    /// Its signature key when the request was checked.
    pub key: Vec<u8>,
}

impl FromRequestParts<AppState> for AuthedKey {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let (device, key) =
            authenticate_with_key(state, parts.method.as_str(), path_and_query(parts), &parts.headers, b"").await?;
        Ok(AuthedKey { device, key })
    }
}

/// A device authenticated by a signed request, and its JSON body.
#[derive(Debug, Clone)]
pub struct SignedJson<T> {
    /// The authenticated device.
    pub device: DeviceAddress,
    /// The parsed body.
    pub body: T,
}

impl<T: DeserializeOwned + Send> FromRequest<AppState> for SignedJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        let (parts, body) = req.into_parts();
        let bytes = read_body(&parts.headers, body, state.limits.max_body_bytes).await?;
        let device = authenticate(state, parts.method.as_str(), path_and_query(&parts), &parts.headers, &bytes).await?;
        let body = parse_json(&bytes)?;
        Ok(SignedJson { device, body })
    }
}

/// A device authenticated by a signed request, and its raw body of at
/// most [`subrosa_proto::limits::MAX_BLOB_PIECE_BYTES`] (an upload piece).
#[derive(Debug, Clone)]
pub struct SignedBytes {
    /// The authenticated device.
    pub device: DeviceAddress,
    /// The body.
    pub body: Bytes,
}

impl FromRequest<AppState> for SignedBytes {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        let (parts, body) = req.into_parts();
        let limit = subrosa_proto::limits::MAX_BLOB_PIECE_BYTES.min(state.limits.max_body_bytes);
        let body = read_body(&parts.headers, body, limit).await?;
        let device = authenticate(state, parts.method.as_str(), path_and_query(&parts), &parts.headers, &body).await?;
        Ok(SignedBytes { device, body })
    }
}

/// [`SignedJson`] with every check but the nonce's: the handler stores the
/// nonce in the same transaction as its operation (one commit instead of
/// two) and answers [`replayed`] when it was seen before.
#[derive(Debug, Clone)]
pub struct SignedJsonNonceLater<T> {
    /// The authenticated device (signature, time and rate limit checked).
    pub device: DeviceAddress,
    /// The nonce to store, as [`RequestSignature::stored_nonce`].
    pub nonce: String,
    /// The signed timestamp, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The parsed body.
    pub body: T,
}

impl<T: DeserializeOwned + Send> FromRequest<AppState> for SignedJsonNonceLater<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        let (parts, body) = req.into_parts();
        let bytes = read_body(&parts.headers, body, state.limits.max_body_bytes).await?;
        let (sig, _) =
            authenticate_but_nonce(state, parts.method.as_str(), path_and_query(&parts), &parts.headers, &bytes)
                .await?;
        let body = parse_json(&bytes)?;
        Ok(SignedJsonNonceLater {
            nonce: sig.stored_nonce(),
            timestamp_ms: sig.headers.timestamp,
            device: sig.addr,
            body,
        })
    }
}

/// A request that may be signed: the authenticated device when it carries
/// any signature header (checked exactly like [`Authed`]), else `None`.
#[derive(Debug, Clone)]
pub struct MaybeAuthed(pub Option<DeviceAddress>);

impl FromRequestParts<AppState> for MaybeAuthed {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let signed = [HEADER_HANDLE, HEADER_DEVICE, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE]
            .iter()
            .any(|h| parts.headers.contains_key(*h));
        if !signed {
            return Ok(MaybeAuthed(None));
        }
        let addr = authenticate(state, parts.method.as_str(), path_and_query(parts), &parts.headers, b"").await?;
        Ok(MaybeAuthed(Some(addr)))
    }
}

//! The attachment blob routes: a resumable upload (open, append pieces at
//! the received offset, finish), ranged downloads by the devices the
//! uploader named, and their word that they fetched it, after which the
//! blob goes. The server sees sizes and who may fetch; never a name, a
//! type or a key (those travel inside the MLS message that points here).
//!
//! Every route is a signed request like the rest of the API, so each piece
//! takes a token of the device's rate limit; the size limit and the
//! account's blob quota are the store's rule ([`crate::store::BlobLimits`]).

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use subrosa_proto::limits::MAX_BLOB_PIECE_BYTES;
use subrosa_proto::{BlobCreate, BlobCreated, BlobFetched, BlobId, BlobStatus, Empty};

use crate::auth::{now_ms, Authed, SignedBytes, SignedJson};
use crate::routes::id_from_path;
use crate::store::StoreError;
use crate::{AppError, AppState};

/// `POST /v1/blobs`: opens an upload.
pub(crate) async fn create(
    State(state): State<AppState>,
    SignedJson { device, body }: SignedJson<BlobCreate>,
) -> Result<impl IntoResponse, AppError> {
    if body.size == 0 {
        return Err(AppError::bad_request("an attachment blob cannot be empty"));
    }
    if body.readers.is_empty() {
        return Err(AppError::bad_request("an attachment needs at least one recipient device"));
    }
    if body.readers.len() > state.limits.max_recipients {
        return Err(AppError::too_large(format!(
            "at most {} recipient devices per attachment",
            state.limits.max_recipients
        )));
    }
    let now = now_ms();
    let ttl_ms = crate::routes::ttl_ms(&state);
    // A disappearing message's attachment goes with the message.
    let expires_at = now.saturating_add(ttl_ms).min(body.expires_at.unwrap_or(u64::MAX));
    // 128 random bits: a collision means a broken RNG; three tries and out.
    for _ in 0..3 {
        let blob = BlobId(rand::random());
        match state
            .store
            .create_blob(&device, &blob, body.size, &body.readers, &state.limits.blobs, now, expires_at)
            .await
        {
            Ok(()) => return Ok((StatusCode::CREATED, Json(BlobCreated { blob, expires_at }))),
            Err(StoreError::BlobTaken) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::BlobTaken.into())
}

/// `PUT /v1/blobs/{blob}?offset=N` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AppendQuery {
    offset: u64,
}

/// `PUT /v1/blobs/{blob}?offset=N`: the next piece of an upload.
pub(crate) async fn append(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<AppendQuery>, QueryRejection>,
    SignedBytes { device, body }: SignedBytes,
) -> Result<Json<BlobStatus>, AppError> {
    let blob: BlobId = id_from_path(path, "blob id")?;
    let Query(q) = query.map_err(|_| AppError::bad_request("offset must be a byte offset"))?;
    if body.is_empty() {
        return Err(AppError::bad_request("an upload piece cannot be empty"));
    }
    Ok(Json(state.store.append_blob(&device, &blob, q.offset, &body, now_ms()).await?))
}

/// `GET /v1/blobs/{blob}/status`: where an upload stands (its uploader
/// resumes from `received`).
pub(crate) async fn status(
    Authed(device): Authed,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<BlobStatus>, AppError> {
    let blob: BlobId = id_from_path(path, "blob id")?;
    Ok(Json(state.store.blob_status(&device, &blob, now_ms()).await?))
}

/// `POST /v1/blobs/{blob}/finish`: the upload is whole; recipients may
/// download it.
pub(crate) async fn finish(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    SignedJson { device, body: Empty {} }: SignedJson<Empty>,
) -> Result<Json<BlobStatus>, AppError> {
    let blob: BlobId = id_from_path(path, "blob id")?;
    Ok(Json(state.store.finish_blob(&device, &blob, now_ms()).await?))
}

/// `GET /v1/blobs/{blob}?offset=N&length=M` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DownloadQuery {
    #[serde(default)]
    offset: u64,
    length: Option<u64>,
}

/// `GET /v1/blobs/{blob}?offset=N&length=M`: up to
/// [`MAX_BLOB_PIECE_BYTES`] of a finished blob, for a recipient device
/// (an empty body at or past the end).
pub(crate) async fn download(
    Authed(device): Authed,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<DownloadQuery>, QueryRejection>,
) -> Result<Response, AppError> {
    let blob: BlobId = id_from_path(path, "blob id")?;
    if crate::hooks::fail_download(&state, &device) {
        return Err(AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            subrosa_proto::ErrorCode::Unavailable,
            "blob downloads fail (test attack)",
        ));
    }
    let Query(q) = query.map_err(|_| AppError::bad_request("offset and length must be byte counts"))?;
    let max = MAX_BLOB_PIECE_BYTES as u64;
    let length = q.length.unwrap_or(max).min(max);
    let bytes = state.store.read_blob(&device, &blob, q.offset, length, now_ms()).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// `POST /v1/blobs/{blob}/fetched`: a recipient has the whole blob; the
/// last one's word deletes it.
pub(crate) async fn fetched(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    SignedJson { device, body: Empty {} }: SignedJson<Empty>,
) -> Result<Json<BlobFetched>, AppError> {
    let blob: BlobId = id_from_path(path, "blob id")?;
    let deleted = state.store.blob_fetched(&device, &blob, now_ms()).await?;
    Ok(Json(BlobFetched { deleted }))
}

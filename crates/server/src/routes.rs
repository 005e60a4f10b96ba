//! The HTTP routes (see the table in [`subrosa_proto`]'s `api` module).

use std::net::IpAddr;
use std::time::Instant;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, MatchedPath, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use subrosa_proto::kt::{KtAudit, KtHead, KtLookup};
use subrosa_proto::limits::{
    LINK_TTL_SECS, MAX_CERTIFICATE_BYTES, MAX_FETCH, MAX_KEY_PACKAGES_PER_UPLOAD, MAX_KEY_PACKAGE_BYTES,
    MAX_LINK_BYTES, MAX_LINK_REQUEST_BYTES,
};
use subrosa_proto::{
    AccountInfo, AckRequest, AckResponse, AddDeviceRequest, ClaimRequest, ClaimResponse, DeviceAddress, DeviceId,
    DeviceRecord, Empty, ErrorCode, Handle, InboxResponse, KeyPackageCount, KeyPackageUpload, KeySetUpdate,
    LinkApproveRequest, LinkCreateRequest, LinkCreated, LinkId, LinkResponse, LinkSlot, RegisterRequest, SendRequest,
    SendResponse, B64,
};

use crate::auth::{
    now_ms, parse_json, read_body, Authed, MaybeAuthed, RequestSignature, SignedJson, SignedJsonNonceLater,
};
use crate::hooks::Source;
use crate::store::{ClaimKind, NewAccount, StoreError};
use crate::{ws, AppError, AppState};

/// Builds the router over a state; no socket needed (tests drive it with
/// `tower::ServiceExt::oneshot`).
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/accounts", post(register).delete(delete_account))
        .route("/v1/accounts/keys", put(replace_keys))
        .route("/v1/accounts/{handle}", get(account))
        .route("/v1/keypackages", post(upload_key_packages).get(key_package_count))
        .route("/v1/keypackages/claim", post(claim_key_packages))
        .route("/v1/messages", post(send))
        .route("/v1/inbox", get(inbox))
        .route("/v1/inbox/ack", post(ack))
        .route("/v1/ws", get(ws::upgrade))
        .route("/v1/devices", post(add_device))
        .route("/v1/devices/{device_id}", delete(remove_device))
        .route("/v1/links", post(create_link))
        .route("/v1/links/{link}", get(get_link))
        .route("/v1/links/{link}/approve", post(approve_link))
        .route("/v1/links/{link}/response", get(link_response))
        .route("/v1/blobs", post(crate::blobs::create))
        .route("/v1/blobs/{blob}", put(crate::blobs::append).get(crate::blobs::download))
        .route("/v1/blobs/{blob}/status", get(crate::blobs::status))
        .route("/v1/blobs/{blob}/finish", post(crate::blobs::finish))
        .route("/v1/blobs/{blob}/fetched", post(crate::blobs::fetched))
        .route("/v1/calls/token", post(crate::relay::token))
        .route("/v1/calls/ws", get(crate::relay::socket::upgrade))
        .route("/v1/kt/head", get(kt_head))
        .route("/v1/kt/lookup/{handle}", get(kt_lookup))
        .route("/v1/kt/audit", get(kt_audit))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Every request, unmatched ones included, is logged and counted.
        .layer(axum::middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state)
}

/// Logs method, route template, status and latency: never the query,
/// headers or body.
async fn log_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let took = start.elapsed();
    let error = resp.extensions().get::<ErrorCode>().copied();
    state.metrics.request(crate::metrics::Op::of(&method, &route), status, error, took);
    let ms = took.as_secs_f64() * 1000.0;
    if resp.status().is_server_error() {
        tracing::warn!(%method, route, status, latency_ms = ms, "request failed");
    } else {
        tracing::debug!(%method, route, status, latency_ms = ms, "request");
    }
    resp
}

async fn not_found() -> AppError {
    AppError::not_found()
}

async fn method_not_allowed() -> AppError {
    AppError::new(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::NotFound, "this route does not take that method")
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Where a request came from, for per-address limits: the peer, or the
/// client a trusted proxy names ([`crate::conn::client_ip`]); the
/// unspecified address when the router runs without a socket (tests), so
/// all such requests share one bucket.
fn client_ip_or_unspecified(state: &AppState, req: &Request) -> std::net::IpAddr {
    match req.extensions().get::<ConnectInfo<std::net::SocketAddr>>() {
        Some(c) => {
            crate::conn::limit_key(crate::conn::client_ip(c.0.ip(), req.headers(), &state.limits.trusted_proxies))
        }
        None => std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// The checks a device record passes before it is stored (registration and
/// added devices alike).
fn validate_device(device: &DeviceRecord) -> Result<(), AppError> {
    if device.signature_key.len() != 32 {
        return Err(AppError::bad_request("the device signature key must be a 32-byte Ed25519 public key"));
    }
    if device.certificate.len() > MAX_CERTIFICATE_BYTES {
        return Err(AppError::too_large(format!("the certificate is over {MAX_CERTIFICATE_BYTES} bytes")));
    }
    Ok(())
}

async fn register(State(state): State<AppState>, req: Request) -> Result<impl IntoResponse, AppError> {
    let ip = client_ip_or_unspecified(&state, &req);
    state.registration_limiter.check(&ip, Instant::now()).await.map_err(AppError::rate_limited)?;
    let (parts, body) = req.into_parts();
    let bytes = read_body(&parts.headers, body, state.limits.max_body_bytes).await?;
    let sig = RequestSignature::from_headers(&parts.headers)?;
    let reg: RegisterRequest = parse_json(&bytes)?;
    if sig.addr.handle != reg.handle || sig.addr.device != reg.device.device_id {
        return Err(AppError::unauthorized("the signature headers name another handle or device than the body"));
    }
    validate_device(&reg.device)?;
    if reg.identity_key.is_empty() || reg.identity_key.len() > 256 {
        return Err(AppError::bad_request("the identity key must be 1 to 256 bytes"));
    }
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    sig.verify(reg.device.signature_key.as_slice(), parts.method.as_str(), path, &bytes)?;
    sig.check_fresh(now_ms())?;
    sig.check_nonce(&state).await?;
    let handle = reg.handle.clone();
    state
        .store
        .register(
            NewAccount { handle: reg.handle, identity_key: reg.identity_key.into_inner(), device: reg.device },
            now_ms(),
        )
        .await?;
    // The new keys are in the directory before the client is told they
    // exist. The account is committed either way: a failed publish is
    // logged, and redone when the account is first served.
    if let Err(e) = publish(&state, &handle).await {
        tracing::warn!(code = e.code().as_str(), "publishing a registration failed; retried when served");
    }
    Ok((StatusCode::CREATED, Json(Empty {})))
}

fn handle_from_path(path: Result<Path<String>, PathRejection>) -> Result<Handle, AppError> {
    let Path(text) = path.map_err(|_| AppError::bad_request("invalid path"))?;
    Handle::new(&text).map_err(|e| AppError::bad_request(e.to_string()))
}

async fn account(
    Authed(device): Authed,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<AccountInfo>, AppError> {
    let handle = handle_from_path(path)?;
    let info = state.kt().await?.account_with_proof(&Source(&state), Some(&device), &handle).await?;
    if info.identity_key.is_empty() {
        // A deleted account's tombstone: its proof is at /v1/kt/lookup.
        return Err(StoreError::UnknownHandle.into());
    }
    Ok(Json(info))
}

/// `DELETE /v1/accounts`: deletes the caller's account, every device of
/// it and everything stored for it (`Store::delete_account`), closes its
/// devices' sockets, and publishes the deletion in the key directory (an
/// entry with no key and no device), so nobody can be handed a key for the
/// handle afterwards without the directory showing it.
async fn delete_account(Authed(caller): Authed, State(state): State<AppState>) -> Result<Json<Empty>, AppError> {
    let removed = state.store.delete_account(&caller).await?;
    for addr in &removed {
        state.wakeups.revoke(addr);
    }
    publish(&state, &caller.handle).await?;
    Ok(Json(Empty {}))
}

/// Last-resort packages of further suites one upload may carry (one per
/// suite; a client of this version has one further suite).
const MAX_SUITES_PER_UPLOAD: usize = 4;

async fn upload_key_packages(
    State(state): State<AppState>,
    SignedJson { device, body }: SignedJson<KeyPackageUpload>,
) -> Result<Json<KeyPackageCount>, AppError> {
    if body.one_time.len() > MAX_KEY_PACKAGES_PER_UPLOAD {
        return Err(AppError::too_large(format!("at most {MAX_KEY_PACKAGES_PER_UPLOAD} key packages per upload")));
    }
    if body.more_last_resort.len() > MAX_SUITES_PER_UPLOAD {
        return Err(AppError::bad_request(format!("at most {MAX_SUITES_PER_UPLOAD} last-resort key packages")));
    }
    for kp in body.one_time.iter().chain(body.last_resort.iter()).chain(body.more_last_resort.iter()) {
        if kp.is_empty() {
            return Err(AppError::bad_request("a key package is empty"));
        }
        if kp.len() > MAX_KEY_PACKAGE_BYTES {
            return Err(AppError::too_large(format!("a key package is over {MAX_KEY_PACKAGE_BYTES} bytes")));
        }
    }
    // Each package is filed under the suite its header names (the rest is
    // opaque here; clients verify packages).
    let by_suite = |b: B64| -> Result<(u16, Vec<u8>), AppError> {
        let suite = subrosa_proto::framing::key_package_suite(b.as_slice())
            .map_err(|_| AppError::bad_request("a key package is not an MLS KeyPackage message"))?;
        Ok((suite, b.into_inner()))
    };
    let one_time = body.one_time.into_iter().map(by_suite).collect::<Result<Vec<_>, _>>()?;
    let last_resort =
        body.last_resort.into_iter().chain(body.more_last_resort).map(by_suite).collect::<Result<Vec<_>, _>>()?;
    let mut suites: Vec<u16> = last_resort.iter().map(|(s, _)| *s).collect();
    suites.sort_unstable();
    suites.dedup();
    if suites.len() != last_resort.len() {
        return Err(AppError::bad_request("two last-resort key packages of one ciphersuite"));
    }
    Ok(Json(state.store.upload_key_packages_in(&device, one_time, last_resort, body.replace).await?))
}

async fn key_package_count(
    Authed(device): Authed,
    State(state): State<AppState>,
) -> Result<Json<KeyPackageCount>, AppError> {
    Ok(Json(state.store.key_package_count(&device).await?))
}

async fn claim_key_packages(
    State(state): State<AppState>,
    SignedJson { device, body }: SignedJson<ClaimRequest>,
) -> Result<Json<ClaimResponse>, AppError> {
    if let Some(forged) = crate::hooks::forged_claim(&state, &device, &body.handle).await? {
        return Ok(Json(forged));
    }
    if crate::hooks::withholds(&state, &body.handle, body.suite) {
        return Err(StoreError::NoKeyPackage.into());
    }
    // One account cannot drain another's one-time packages (each claim
    // deletes one per device): claims are limited per (requester account,
    // target account), on top of the requester's device limit, and of
    // those only the first few an hour draw one-time packages (the store
    // counts them: `ClaimKind::Counted`). An account's own devices claiming
    // each other's are not limited here. And many accounts together (a
    // swarm of new ones, each within its allowance) draw at most a budget
    // of the target's one-time packages; past it they get last-resort
    // packages: never refused, so the swarm cannot shut the target's real
    // contacts out either. A claimer past its own allowance does not touch
    // that budget, so one account cannot spend it for everyone. With rate
    // limits off (`--rate-limit 0`, benchmarks) none of this applies.
    let mut kind = ClaimKind::OneTime;
    if device.handle != body.handle && state.limits.requests_per_second != 0 {
        let pair = (device.handle.clone(), body.handle.clone());
        state.claim_limiter.check(&pair, Instant::now()).await.map_err(AppError::rate_limited)?;
        let now = now_ms();
        kind = ClaimKind::Counted { now_ms: now };
        if state.store.one_time_claims_left(&device.handle, &body.handle, now).await? == 0
            || state.claim_target_limiter.check(&body.handle, Instant::now()).await.is_err()
        {
            kind = ClaimKind::LastResortFirst;
        }
    }
    let mut response = state.store.claim_key_packages_in(&body.handle, &device, kind, body.suite).await?;
    // The keys and the proof are read after the claim: the packages' devices
    // are among them unless one was removed in between, which the client
    // notices.
    let info = state.kt().await?.account_with_proof(&Source(&state), Some(&device), &body.handle).await?;
    response.identity_key = info.identity_key;
    response.devices = info.devices;
    response.kt = info.kt;
    Ok(Json(crate::hooks::claim(&state, response)))
}

/// The message TTL in ms (the blobs' TTL is the same setting).
pub(crate) fn ttl_ms(state: &AppState) -> u64 {
    u64::try_from(state.limits.blob_ttl.as_millis()).unwrap_or(u64::MAX)
}

async fn send(
    State(state): State<AppState>,
    SignedJsonNonceLater { device, nonce, timestamp_ms, body }: SignedJsonNonceLater<SendRequest>,
) -> Result<Json<SendResponse>, AppError> {
    let mut body = body;
    if crate::hooks::refuse_send(&state, &device, body.commit.is_some()) {
        return Err(AppError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, "overloaded (test attack)"));
    }
    let out = crate::delivery::send(&state, &device, &mut body, Some((&nonce, timestamp_ms))).await?;
    if crate::hooks::lose_answer(&state, &device, body.commit.is_some()) {
        return Err(AppError::new(StatusCode::BAD_GATEWAY, ErrorCode::Unavailable, "answer lost (test attack)"));
    }
    Ok(Json(SendResponse { duplicate: out.duplicate, epoch: out.epoch, server_time: out.server_time }))
}

/// `GET /v1/inbox` query.
#[derive(Debug, Deserialize)]
struct InboxQuery {
    limit: Option<usize>,
}

async fn inbox(
    Authed(device): Authed,
    State(state): State<AppState>,
    query: Result<Query<InboxQuery>, QueryRejection>,
) -> Result<Json<InboxResponse>, AppError> {
    let Query(q) = query.map_err(|_| AppError::bad_request(format!("limit must be a number from 1 to {MAX_FETCH}")))?;
    let limit = match q.limit {
        None => MAX_FETCH,
        Some(0) => return Err(AppError::bad_request(format!("limit must be a number from 1 to {MAX_FETCH}"))),
        Some(n) => n.min(MAX_FETCH),
    };
    // Bound the answer's size too; the client fetches again after acking.
    let fetched = crate::delivery::fetch(&state, &device, 0, limit, state.limits.max_body_bytes).await?;
    Ok(Json(InboxResponse { messages: fetched.messages }))
}

async fn ack(
    State(state): State<AppState>,
    SignedJson { device, body }: SignedJson<AckRequest>,
) -> Result<Json<AckResponse>, AppError> {
    let deleted = crate::delivery::acknowledge(&state, &device, &body.ids).await?;
    Ok(Json(AckResponse { deleted }))
}

/// `POST /v1/devices`: adds a device to the caller's account. The
/// certificate by the identity key is stored opaquely; clients check it.
async fn add_device(
    State(state): State<AppState>,
    SignedJson { device, body }: SignedJson<AddDeviceRequest>,
) -> Result<Json<AccountInfo>, AppError> {
    validate_device(&body.device)?;
    state.store.add_device(&device.handle, body.device, now_ms()).await?;
    Ok(Json(changed_account(&state, &device).await?))
}

/// `PUT /v1/accounts/keys`: replaces the caller's account keys (identity key
/// rotation after a removal, or the caller's new signature key), then
/// publishes them in the directory.
async fn replace_keys(
    State(state): State<AppState>,
    SignedJson { device, body }: SignedJson<KeySetUpdate>,
) -> Result<Json<AccountInfo>, AppError> {
    for d in &body.devices {
        validate_device(d)?;
    }
    state.store.replace_keys(&device, body.identity_key.into_inner(), body.devices).await?;
    // This node at once (other nodes through the store's notification).
    state.wakeups.keys_changed(&device);
    Ok(Json(changed_account(&state, &device).await?))
}

/// Publishes the account's current keys and waits for the epoch.
async fn publish(state: &AppState, handle: &Handle) -> Result<(), AppError> {
    Ok(state.kt().await?.publish_and_wait(&Source(state), handle).await?)
}

/// The caller's account after a committed device change, with the proof of
/// its new keys. The change stays committed if the directory fails: the
/// answer then has no proof (`kt: null`), and the keys are published when
/// the account is next served.
async fn changed_account(state: &AppState, caller: &DeviceAddress) -> Result<AccountInfo, AppError> {
    let proven = match publish(state, &caller.handle).await {
        Ok(()) => state
            .kt()
            .await?
            .account_with_proof(&Source(state), Some(caller), &caller.handle)
            .await
            .map_err(AppError::from),
        Err(e) => Err(e),
    };
    match proven {
        Ok(info) => Ok(info),
        Err(e) => {
            tracing::warn!(code = e.code().as_str(), "publishing a device change failed; retried when served");
            Ok(state.store.account(&caller.handle).await?.ok_or(StoreError::UnknownHandle)?)
        }
    }
}

/// A hex id from the path; anything else is a 400.
pub(crate) fn id_from_path<T: std::str::FromStr>(
    path: Result<Path<String>, PathRejection>,
    what: &str,
) -> Result<T, AppError>
where
    T::Err: std::fmt::Display,
{
    let Path(text) = path.map_err(|_| AppError::bad_request("invalid path"))?;
    text.parse().map_err(|e: T::Err| AppError::bad_request(format!("invalid {what} in the path: {e}")))
}

/// `DELETE /v1/devices/{device_id}`: removes a device of the caller's own
/// account (itself included, unless it is the last one).
async fn remove_device(
    Authed(caller): Authed,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<AccountInfo>, AppError> {
    let device: DeviceId = id_from_path(path, "device id")?;
    let target = DeviceAddress { handle: caller.handle.clone(), device };
    state.store.remove_device(&target).await?;
    // Committed: close its sockets on this node now (other nodes notice at
    // their next re-check).
    state.wakeups.revoke(&target);
    Ok(Json(changed_account(&state, &caller).await?))
}

/// Refuses an empty or oversize opaque link blob.
fn check_link_blob(blob: &B64, what: &str, max: usize) -> Result<(), AppError> {
    if blob.is_empty() {
        return Err(AppError::bad_request(format!("the link {what} is empty")));
    }
    if blob.len() > max {
        return Err(AppError::too_large(format!("the link {what} is over {max} bytes")));
    }
    Ok(())
}

/// `POST /v1/links` (unsigned): opens a slot for a new device of a handle.
/// Limited per client IP in a bucket of its own (junk link requests must
/// not lock anyone out of registering).
async fn create_link(State(state): State<AppState>, req: Request) -> Result<impl IntoResponse, AppError> {
    let ip = client_ip_or_unspecified(&state, &req);
    state.link_create_limiter.check(&ip, Instant::now()).await.map_err(AppError::rate_limited)?;
    let (parts, body) = req.into_parts();
    let bytes = read_body(&parts.headers, body, state.limits.max_body_bytes).await?;
    let body: LinkCreateRequest = parse_json(&bytes)?;
    check_link_blob(&body.request, "request", MAX_LINK_REQUEST_BYTES)?;
    let request = body.request.into_inner();
    let expires_at = now_ms().saturating_add(LINK_TTL_SECS * 1000);
    // 48 random bits: a collision is rare, three in a row is a broken RNG.
    for _ in 0..3 {
        let link = LinkId(rand::random());
        match state.store.create_link(&link, &body.handle, request.clone(), expires_at).await {
            Ok(()) => return Ok((StatusCode::CREATED, Json(LinkCreated { link, expires_at }))),
            Err(StoreError::LinkTaken) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::LinkTaken.into())
}

/// `GET /v1/links/{link}`: a slot of the caller's account. A slot of another
/// account answers as a missing one.
async fn get_link(
    Authed(caller): Authed,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<LinkSlot>, AppError> {
    let link: LinkId = id_from_path(path, "link id")?;
    let slot = state.store.link(&link, &caller.handle, now_ms()).await?;
    Ok(Json(LinkSlot { link: slot.link, request: B64(slot.request), expires_at: slot.expires_at }))
}

/// `POST /v1/links/{link}/approve`: stores the opaque response, once.
async fn approve_link(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    SignedJson { device, body }: SignedJson<LinkApproveRequest>,
) -> Result<Json<Empty>, AppError> {
    let link: LinkId = id_from_path(path, "link id")?;
    check_link_blob(&body.response, "response", MAX_LINK_BYTES)?;
    state.store.approve_link(&link, &device.handle, body.response.into_inner(), now_ms()).await?;
    Ok(Json(Empty {}))
}

/// `GET /v1/links/{link}/response` (unsigned): `None` until approved; the
/// response once, after which the slot is gone.
async fn link_response(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Result<Json<LinkResponse>, AppError> {
    let ip = client_ip_or_unspecified(&state, &req);
    state.link_poll_limiter.check(&ip, Instant::now()).await.map_err(AppError::rate_limited)?;
    let link: LinkId = id_from_path(path, "link id")?;
    let response = state.store.take_link_response(&link, now_ms()).await?;
    Ok(Json(LinkResponse { response: response.map(B64) }))
}

/// Rate-limits an unsigned key-transparency read per client IP (signed ones
/// were limited per device by the extractor), charging `cost` tokens: an
/// audit costs one per epoch it asks for, so the costly request is the one
/// refused first, before any proof is built.
async fn check_public_kt(
    state: &AppState,
    viewer: &Option<DeviceAddress>,
    ip: IpAddr,
    cost: u32,
) -> Result<(), AppError> {
    if viewer.is_none() {
        state.kt_public_limiter.check_n(&ip, cost, Instant::now()).await.map_err(AppError::rate_limited)?;
    }
    Ok(())
}

/// `GET /v1/kt/head` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadQuery {
    epoch: Option<u64>,
}

/// `GET /v1/kt/head[?epoch=N]` (signed or not): the signed head of the
/// latest epoch (or of epoch N), with the VRF and head-signing keys.
async fn kt_head(
    MaybeAuthed(viewer): MaybeAuthed,
    State(state): State<AppState>,
    query: Result<Query<HeadQuery>, QueryRejection>,
    req: Request,
) -> Result<Json<KtHead>, AppError> {
    check_public_kt(&state, &viewer, client_ip_or_unspecified(&state, &req), 1).await?;
    let Query(q) = query.map_err(|_| AppError::bad_request("epoch must be an epoch number"))?;
    let kt = state.kt().await?;
    Ok(Json(match q.epoch {
        Some(epoch) => kt.head_at(&Source(&state), viewer.as_ref(), epoch).await?,
        None => kt.head(&Source(&state), viewer.as_ref()).await?,
    }))
}

/// `GET /v1/kt/lookup/{handle}` (signed): the lookup proof of a handle at
/// the latest epoch.
async fn kt_lookup(
    Authed(viewer): Authed,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<KtLookup>, AppError> {
    let handle = handle_from_path(path)?;
    Ok(Json(state.kt().await?.lookup(&Source(&state), Some(&viewer), &handle).await?))
}

/// `GET /v1/kt/audit` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    from: u64,
    to: u64,
}

/// `GET /v1/kt/audit?from=A&to=B` (signed or not): append-only proofs.
async fn kt_audit(
    MaybeAuthed(viewer): MaybeAuthed,
    State(state): State<AppState>,
    query: Result<Query<AuditQuery>, QueryRejection>,
    req: Request,
) -> Result<Json<KtAudit>, AppError> {
    let Query(q) = query.map_err(|_| AppError::bad_request("from and to must be epoch numbers"))?;
    let epochs = q.to.saturating_sub(q.from).saturating_add(1).min(u64::from(u32::MAX));
    let ip = client_ip_or_unspecified(&state, &req);
    check_public_kt(&state, &viewer, ip, u32::try_from(epochs).unwrap_or(u32::MAX)).await?;
    Ok(Json(state.kt().await?.audit(&Source(&state), viewer.as_ref(), q.from, q.to).await?))
}

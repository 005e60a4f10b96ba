//! Key transparency: the directory over SQLite (publish, lookup, audit,
//! restart) and its HTTP routes, with every proof verified as a client would.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{assert_error, TestApp, TestDevice};
use serde_json::json;
use subrosa_client::kt::{verify_audit, verify_lookup_value};
use subrosa_proto::kt::{directory_value, KtAudit, KtHead, KtLookup, MAX_AUDIT_EPOCHS};
use subrosa_proto::{AccountInfo, ClaimResponse, DeviceRecord, Handle};
use subrosa_server::kt::KtDirectory;
use subrosa_server::store::{NewAccount, SqliteStore, Store};

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unsigned(path: &str) -> Request<Body> {
    Request::builder().method("GET").uri(path).body(Body::empty()).expect("request")
}

fn value(n: u8) -> Vec<u8> {
    vec![n; 32]
}

fn label(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn handle(s: &str) -> Handle {
    Handle::new(s).expect("handle")
}

#[tokio::test]
async fn directory_round_trip_through_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    let store = SqliteStore::open(&dir.path().join("server.db")).expect("store");
    let kt = KtDirectory::open(store.kt_storage()).await.expect("open");
    assert_eq!(kt.head().await.expect("head").epoch, 0);

    let (e1, _) = kt.publish(vec![(label("alice"), value(1)), (label("bob"), value(2))]).await.expect("publish");
    let (e2, _) = kt.publish(vec![(label("alice"), value(3))]).await.expect("publish");
    assert_eq!((e1, e2), (1, 2));
    // Republishing an unchanged value makes no epoch.
    assert_eq!(kt.publish(vec![(label("bob"), value(2))]).await.expect("publish").0, 2);

    let vrf = kt.vrf_public_key();
    let (alice, proven) = kt.lookup(b"alice").await.expect("lookup").expect("alice is there");
    assert_eq!(proven, value(3));
    assert_eq!(alice.epoch, 2);
    verify_lookup_value(&vrf, &handle("alice"), &alice, &value(3)).expect("alice verifies");
    assert!(verify_lookup_value(&vrf, &handle("alice"), &alice, &value(1)).is_err(), "an old value must not verify");
    assert!(verify_lookup_value(&vrf, &handle("bob"), &alice, &value(3)).is_err(), "another label must not verify");
    let (bob, _) = kt.lookup(b"bob").await.expect("lookup").expect("bob");
    verify_lookup_value(&vrf, &handle("bob"), &bob, &value(2)).expect("bob verifies");
    assert!(kt.lookup(b"carol").await.expect("lookup").is_none());

    let audit = kt.audit(1, 2).await.expect("audit");
    assert_eq!((audit.root_hashes.len(), audit.proofs.len()), (2, 1));
    assert_eq!(audit.root_hashes[1], alice.root_hash);
    verify_audit(&audit, audit.from, audit.to).await.expect("append-only");
    let mut swapped = audit.clone();
    swapped.root_hashes.reverse();
    assert!(verify_audit(&swapped, swapped.from, swapped.to).await.is_err(), "swapped roots must not verify");
}

#[tokio::test]
async fn restart_keeps_directory_and_vrf_key() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("server.db");
    let (head, vrf) = {
        let store = SqliteStore::open(&path).expect("store");
        let kt = KtDirectory::open(store.kt_storage()).await.expect("open");
        kt.publish(vec![(label("alice"), value(1))]).await.expect("publish");
        kt.publish(vec![(label("bob"), value(2))]).await.expect("publish");
        (kt.head().await.expect("head"), kt.vrf_public_key())
    };
    let store = SqliteStore::open(&path).expect("reopen");
    let kt = KtDirectory::open(store.kt_storage()).await.expect("open again");
    assert_eq!(kt.vrf_public_key(), vrf, "the VRF key survives a restart");
    assert_eq!(kt.head().await.expect("head"), head, "the directory survives a restart");
    let (alice, _) = kt.lookup(b"alice").await.expect("lookup").expect("alice");
    verify_lookup_value(&vrf, &handle("alice"), &alice, &value(1)).expect("verifies after restart");
    assert_eq!(kt.publish(vec![(label("alice"), value(9))]).await.expect("publish").0, 3);
    verify_audit(&kt.audit(1, 3).await.expect("audit"), 1, 3).await.expect("append-only across the restart");
}

async fn head(t: &TestApp) -> KtHead {
    let (status, body) = t.call(unsigned("/v1/kt/head")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_value(body).expect("KtHead")
}

fn identity(d: &TestDevice) -> Vec<u8> {
    use aws_lc_rs::signature::KeyPair as _;
    d.identity.public_key().as_ref().to_vec()
}

#[tokio::test]
async fn kt_routes_answer_and_verify() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let h = head(&t).await;
    assert!(h.epoch >= 1, "registrations were published");
    let vrf = h.vrf_public_key.as_slice().to_vec();

    let (status, body) = t.call(alice.request("GET", &format!("/v1/kt/lookup/{}", bob.handle), vec![])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let lookup: KtLookup = serde_json::from_value(body).expect("KtLookup");
    assert_eq!((lookup.epoch, &lookup.root_hash), (h.epoch, &h.root_hash));
    verify_lookup_value(&vrf, &bob.handle, &lookup, &directory_value(&identity(&bob), &[bob.record()]))
        .expect("bob's lookup verifies against his keys");

    // Signed head and audit work too.
    let (status, signed_head) = t.call(alice.request("GET", "/v1/kt/head", vec![])).await;
    assert_eq!(status, StatusCode::OK, "{signed_head}");
    let (status, body) = t.call(unsigned(&format!("/v1/kt/audit?from=1&to={}", h.epoch))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let audit: KtAudit = serde_json::from_value(body).expect("KtAudit");
    assert_eq!(audit.root_hashes.last(), Some(&h.root_hash));
    verify_audit(&audit, audit.from, audit.to).await.expect("audit verifies");
    let (status, body) = t.call(alice.request("GET", "/v1/kt/audit?from=1&to=1", vec![])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["proofs"].as_array().map(Vec::len), Some(0));

    for bad in [
        "/v1/kt/audit",
        "/v1/kt/audit?from=1",
        "/v1/kt/audit?from=x&to=2",
        "/v1/kt/audit?from=0&to=1",
        "/v1/kt/audit?from=2&to=1",
        "/v1/kt/audit?from=1&to=99",
        "/v1/kt/audit?from=1&to=2&extra=3",
    ] {
        assert_error(&t.call(unsigned(bad)).await, StatusCode::BAD_REQUEST, "bad_request");
    }
    let too_wide = format!("/v1/kt/audit?from=1&to={}", MAX_AUDIT_EPOCHS + 2);
    assert_error(&t.call(unsigned(&too_wide)).await, StatusCode::BAD_REQUEST, "bad_request");
    assert_error(
        &t.call(alice.request("GET", "/v1/kt/lookup/nobody", vec![])).await,
        StatusCode::NOT_FOUND,
        "unknown_handle",
    );
    assert_error(
        &t.call(alice.request("GET", "/v1/kt/lookup/NOT%20A%20HANDLE", vec![])).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &t.call(unsigned(&format!("/v1/kt/lookup/{}", bob.handle))).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
}

fn check_account(vrf: &[u8], info: &AccountInfo) {
    let kt = info.kt.as_ref().expect("the answer carries a proof");
    let value = directory_value(info.identity_key.as_slice(), &info.devices);
    verify_lookup_value(vrf, &info.handle, kt, &value).expect("the proof matches the keys returned");
}

#[tokio::test]
async fn account_and_claim_carry_matching_proofs() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let bob2 = t.add_device(&bob).await;
    let vrf = head(&t).await.vrf_public_key.as_slice().to_vec();

    let (status, body) = t.call(alice.request("GET", &format!("/v1/accounts/{}", bob.handle), vec![])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let info: AccountInfo = serde_json::from_value(body).expect("AccountInfo");
    assert_eq!(info.devices.len(), 2);
    check_account(&vrf, &info);

    let kp = json!({ "one_time": [b64(&common::kp(b"kp of bob")), b64(&common::kp(b"another"))] });
    let (status, body) = t.call(bob.request("POST", "/v1/keypackages", serde_json::to_vec(&kp).unwrap())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claim = serde_json::to_vec(&json!({ "handle": bob.handle })).unwrap();
    let (status, body) = t.call(alice.request("POST", "/v1/keypackages/claim", claim)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claimed: ClaimResponse = serde_json::from_value(body).expect("ClaimResponse");
    assert_eq!(claimed.packages.len(), 1, "only bob's first device has packages");
    assert_eq!(claimed.devices.len(), 2, "all devices are listed");
    check_account(
        &vrf,
        &AccountInfo {
            handle: claimed.handle.clone(),
            identity_key: claimed.identity_key.clone(),
            devices: claimed.devices.clone(),
            kt: claimed.kt.clone(),
        },
    );

    // The device-management answers carry the new proof too.
    let (status, body) = t.call(bob.request("DELETE", &format!("/v1/devices/{}", bob2.device.to_hex()), vec![])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let after: AccountInfo = serde_json::from_value(body).expect("AccountInfo");
    assert_eq!(after.devices, vec![bob.record()]);
    check_account(&vrf, &after);
    assert!(after.kt.as_ref().unwrap().epoch > info.kt.as_ref().unwrap().epoch);
}

#[tokio::test]
async fn an_unpublished_account_is_published_before_it_is_served() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    // Stored but never published (as after a crash between the two).
    let carol = TestDevice::new("carol");
    let record: DeviceRecord = carol.record();
    t.store
        .register(NewAccount { handle: carol.handle.clone(), identity_key: identity(&carol), device: record }, 1)
        .await
        .expect("register");
    let vrf = head(&t).await.vrf_public_key.as_slice().to_vec();
    let (status, body) = t.call(alice.request("GET", &format!("/v1/accounts/{}", carol.handle), vec![])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    check_account(&vrf, &serde_json::from_value(body).expect("AccountInfo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_share_epochs() {
    let dir = tempfile::tempdir().expect("dir");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("server.db")).expect("store"));
    let state = subrosa_server::AppState::new(store, subrosa_server::Limits::default())
        .with_kt_publish_interval(std::time::Duration::from_millis(300));
    let t = TestApp { dir, store: Arc::clone(state.store()), router: subrosa_server::app(state.clone()), state };
    let first = t.register("first").await;
    let devices: Vec<TestDevice> = (0..8).map(|_| TestDevice::new("many")).collect();
    let calls = devices.iter().map(|d| t.call(d.request("POST", "/v1/accounts", d.register_body())));
    for (status, body) in futures_util::future::join_all(calls).await {
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let h = head(&t).await;
    assert!(h.epoch < 1 + 8, "8 concurrent registrations took {} epochs", h.epoch - 1);
    let vrf = h.vrf_public_key.as_slice().to_vec();
    for d in &devices {
        let (status, body) = t.call(first.request("GET", &format!("/v1/accounts/{}", d.handle), vec![])).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let info: AccountInfo = serde_json::from_value(body).expect("AccountInfo");
        assert_eq!(info.kt.as_ref().expect("kt").epoch, h.epoch, "no new epoch was needed to serve it");
        check_account(&vrf, &info);
    }
}

#[tokio::test]
async fn a_second_node_sees_epochs_the_first_published() {
    let a = TestApp::new();
    // Node B: its own connection, state and directory over the same database.
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&a.dir.path().join("server.db")).expect("store"));
    let state_b = subrosa_server::AppState::new(store, subrosa_server::Limits::default());
    let router_b = subrosa_server::app(state_b);
    let call_b = |req: Request<Body>| {
        let router = router_b.clone();
        async move {
            use http_body_util::BodyExt as _;
            use tower::ServiceExt as _;
            let resp = router.oneshot(req).await.expect("infallible");
            let status = resp.status();
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            (status, serde_json::from_slice::<serde_json::Value>(&bytes).expect("json"))
        }
    };
    let alice = a.register("alice").await;
    let (_, head_b) = call_b(unsigned("/v1/kt/head")).await;
    let head_b: KtHead = serde_json::from_value(head_b).expect("head");
    assert_eq!(head_b, head(&a).await, "B reads A's epoch and the same VRF key");
    let bob = a.register("bob").await;
    a.add_device(&bob).await;
    // B has not published anything; it serves A's latest epoch.
    let (status, body) = call_b(alice.request("GET", &format!("/v1/accounts/{}", bob.handle), vec![])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let info: AccountInfo = serde_json::from_value(body).expect("AccountInfo");
    assert_eq!(info.devices.len(), 2);
    assert_eq!(info.kt.as_ref().expect("kt").epoch, head(&a).await.epoch);
    check_account(head_b.vrf_public_key.as_slice(), &info);
}

fn pinned(kt: &KtDirectory) -> subrosa_client::kt::HeadKey {
    subrosa_client::kt::HeadKey { key: kt.signer().public_key(), directory_id: kt.signer().directory_id() }
}

#[tokio::test]
async fn heads_are_signed_once_per_epoch_and_the_key_survives_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("server.db");
    let (first, key) = {
        let store = SqliteStore::open(&path).expect("store");
        let kt = KtDirectory::open(store.kt_storage()).await.expect("open");
        kt.publish(vec![(label("alice"), value(1))]).await.expect("publish");
        let head = kt.head().await.expect("head");
        let signed = head.signed.clone().expect("signed");
        let h = subrosa_client::kt::verify_signed_head(&pinned(&kt), signed.as_slice()).expect("verifies");
        assert_eq!((h.epoch, h.root.to_vec()), (1, head.root_hash.clone().into_inner()));
        assert_eq!(h.vrf_public_key, kt.vrf_public_key());
        assert_eq!(head.signing_key.clone().map(|k| k.into_inner()), Some(kt.signer().public_key().to_vec()));
        // Asked again (and through a lookup), the same bytes: not a new signature.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert_eq!(kt.head().await.expect("head"), head);
        let (lookup, _) = kt.lookup(b"alice").await.expect("lookup").expect("alice");
        assert_eq!(lookup.signed_head, Some(signed));
        (head, pinned(&kt))
    };
    let store = SqliteStore::open(&path).expect("reopen");
    let kt = KtDirectory::open(store.kt_storage()).await.expect("open again");
    assert_eq!(pinned(&kt), key, "the head-signing key and directory id survive a restart");
    assert_eq!(kt.head_at(1).await.expect("head").expect("epoch 1"), first, "re-served, not re-signed");
    assert!(kt.head_at(2).await.expect("head").is_none());
}

/// A database restored from an older backup has forgotten the heads signed
/// since; the node's mark file has not: the directory refuses to open, so
/// no epoch ever gets a second, different head.
#[tokio::test]
async fn a_directory_behind_a_signed_head_refuses_to_open() {
    use subrosa_server::kt::KtService;
    let dir = tempfile::tempdir().expect("dir");
    let mark = dir.path().join("kt-signed-head");
    let interval = std::time::Duration::from_millis(1);
    let live = SqliteStore::open(&dir.path().join("live.db")).expect("store");
    let backup = SqliteStore::open(&dir.path().join("backup.db")).expect("store");
    let other = SqliteStore::open(&dir.path().join("other.db")).expect("store");
    {
        let svc = KtService::open_marked(live.kt_storage(), interval, Some(mark.clone())).await.expect("open");
        svc.directory().publish(vec![(label("alice"), value(1))]).await.expect("publish");
        svc.directory().publish(vec![(label("bob"), value(2))]).await.expect("publish");
        assert_eq!(svc.directory().head().await.expect("head").epoch, 2, "epoch 2 signed");
    }
    // The backup stopped at epoch 1; `other` reached epoch 2 with another root.
    KtDirectory::open(backup.kt_storage())
        .await
        .expect("open")
        .publish(vec![(label("alice"), value(1))])
        .await
        .expect("publish");
    let o = KtDirectory::open(other.kt_storage()).await.expect("open");
    o.publish(vec![(label("alice"), value(1))]).await.expect("publish");
    o.publish(vec![(label("bob"), value(3))]).await.expect("publish");
    for (name, store) in [("an older backup", &backup), ("another directory at that epoch", &other)] {
        let err = KtService::open_marked(store.kt_storage(), interval, Some(mark.clone())).await.expect_err(name);
        assert!(err.to_string().contains("restored from an older backup"), "{name}: {err}");
    }
    // The live database itself still opens.
    KtService::open_marked(live.kt_storage(), interval, Some(mark)).await.expect("the live directory opens");
}

//! The HTTP API through `app()`, with real Ed25519 signing.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{assert_error, fresh_nonce, TestApp, TestDevice};
use serde_json::json;
use std::str::FromStr as _;

use subrosa_proto::{ConversationId, LinkId, MAX_CLOCK_SKEW_MS};
use subrosa_server::{now_ms, Limits};

fn conv() -> String {
    ConversationId(rand::random()).to_hex()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn send_body(to: &[&TestDevice], ciphertext: &[u8], commit: Option<u64>, conversation: &str) -> serde_json::Value {
    let recipients: Vec<serde_json::Value> = to.iter().map(|d| serde_json::to_value(d.addr()).expect("json")).collect();
    let mut body = json!({
        "conversation": conversation,
        "send_id": hex::encode(rand::random::<[u8; 16]>()),
        "parts": [{ "kind": "application", "recipients": recipients, "ciphertext": b64(ciphertext) }],
    });
    if let Some(e) = commit {
        body["commit"] = json!({ "epoch": e });
        body["parts"][0]["kind"] = json!("commit");
        let id = ConversationId::from_str(conversation).expect("conversation id");
        body["parts"][0]["ciphertext"] = json!(b64(&framed_commit(&id, e, ciphertext)));
    }
    body
}

/// Bytes framed as an MLS commit of `conversation` made in `epoch` (the
/// server reads that framing; the rest stays opaque to it).
fn framed_commit(conversation: &ConversationId, epoch: u64, rest: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00, 0x01, 0x00, 0x02, 0x10];
    out.extend_from_slice(conversation.as_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.push(3);
    out.extend_from_slice(rest);
    out
}

fn bytes(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

#[tokio::test]
async fn health_is_unsigned() {
    let t = TestApp::new();
    let req = Request::get("/v1/health").body(Body::empty()).expect("req");
    let (status, body) = t.call(req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({ "status": "ok" }));
}

#[tokio::test]
async fn register_then_duplicate_handle_conflicts() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    // Another device key trying to take the same handle.
    let mut thief = TestDevice::new("x");
    thief.handle = alice.handle.clone();
    let got = t.call(thief.request("POST", "/v1/accounts", thief.register_body())).await;
    assert_error(&got, StatusCode::CONFLICT, "handle_taken");
    // The account is as registered, with the first device key.
    let got = t.call(alice.request("GET", &format!("/v1/accounts/{}", alice.handle), vec![])).await;
    assert_eq!(got.0, StatusCode::OK);
    assert_eq!(got.1["devices"].as_array().map(Vec::len), Some(1));
    assert_eq!(got.1["devices"][0]["signature_key"], json!(b64(alice.record().signature_key.as_slice())));
}

#[tokio::test]
async fn register_must_be_signed_by_the_registered_key() {
    let t = TestApp::new();
    let alice = TestDevice::new("alice");
    let other = TestDevice::new("other");
    // Headers and body name alice, the signature is by another key.
    let body = alice.register_body();
    let mut req = other.request("POST", "/v1/accounts", body.clone());
    for (k, v) in [("x-subrosa-handle", alice.handle.to_string()), ("x-subrosa-device", alice.device.to_hex())] {
        req.headers_mut().insert(k, v.parse().expect("header"));
    }
    assert_error(&t.call(req).await, StatusCode::UNAUTHORIZED, "unauthorized");
    // Headers naming another handle than the body.
    let req = other.request("POST", "/v1/accounts", body.clone());
    assert_error(&t.call(req).await, StatusCode::UNAUTHORIZED, "unauthorized");
    // Unsigned.
    let req = Request::post("/v1/accounts").body(Body::from(body)).expect("req");
    assert_error(&t.call(req).await, StatusCode::UNAUTHORIZED, "unauthorized");
    // A stale registration.
    let req = alice.request_with(
        "POST",
        "/v1/accounts",
        alice.register_body(),
        now_ms() - MAX_CLOCK_SKEW_MS - 1000,
        &fresh_nonce(),
    );
    assert_error(&t.call(req).await, StatusCode::UNAUTHORIZED, "stale_request");
    // Nothing got registered on the way.
    assert!(t.store.account(&alice.handle).await.expect("account").is_none());
    t.register("carol").await;
}

/// Every endpoint with a body: malformed, truncated, wrongly typed and
/// oversize bodies get a JSON error with the right code, and the server
/// still serves afterwards.
#[tokio::test]
async fn bad_bodies_get_stable_errors_on_every_endpoint() {
    let limits = Limits { max_body_bytes: 64 * 1024, ..Limits::default() };
    let t = TestApp::with_limits(limits);
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let good_send = bytes(&send_body(&[&bob], b"hello", None, &conv()));
    let many: Vec<String> = (0..10).map(|i| b64(&common::kp(format!("kp{i}").as_bytes()))).collect();
    let got = t.call(bob.request("POST", "/v1/keypackages", bytes(&json!({ "one_time": many })))).await;
    assert_eq!(got.0, StatusCode::OK);
    let endpoints: Vec<(&str, Vec<u8>, serde_json::Value)> = vec![
        (
            "/v1/keypackages",
            bytes(&json!({ "one_time": [b64(&common::kp(b"kp"))] })),
            json!({ "one_time": "not-a-list" }),
        ),
        ("/v1/keypackages/claim", bytes(&json!({ "handle": bob.handle })), json!({ "handle": 42 })),
        ("/v1/messages", good_send, json!({ "conversation": conv(), "send_id": "zz", "parts": [] })),
        ("/v1/inbox/ack", bytes(&json!({ "ids": [1, 2] })), json!({ "ids": ["one"] })),
    ];
    for (path, good, wrong_type) in &endpoints {
        let malformed = b"{ this is not json".to_vec();
        let truncated = good[..good.len() / 2].to_vec();
        for body in [malformed, truncated, bytes(wrong_type), b"[]".to_vec(), Vec::new()] {
            let got = t.call(alice.request("POST", path, body)).await;
            assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
        }
        let oversize = vec![b'a'; 64 * 1024 + 1];
        let got = t.call(alice.request("POST", path, oversize)).await;
        assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
        // An oversize body without a Content-Length (streamed) too.
        let mut req = alice.request("POST", path, Vec::new());
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..20).map(|_| Ok(vec![b' '; 8 * 1024])).collect();
        *req.body_mut() = Body::from_stream(futures_util::stream::iter(chunks));
        req.headers_mut().remove("content-length");
        assert_error(&t.call(req).await, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
        // The good body still works afterwards.
        let got = t.call(alice.request("POST", path, good.clone())).await;
        assert_eq!(got.0, StatusCode::OK, "{path}: {}", got.1);
    }
    // Registration: malformed and wrongly typed bodies.
    let d = TestDevice::new("dave");
    for body in
        [b"{".to_vec(), d.register_body()[..20].to_vec(), bytes(&json!({ "handle": "dave", "identity_key": 5 }))]
    {
        assert_error(&t.call(d.request("POST", "/v1/accounts", body)).await, StatusCode::BAD_REQUEST, "bad_request");
    }
    let got = t.call(d.request("POST", "/v1/accounts", vec![b'{'; 70 * 1024])).await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    // An unknown field is refused too.
    let mut reg: serde_json::Value = serde_json::from_slice(&d.register_body()).expect("json");
    reg["password"] = json!("hunter2");
    assert_error(&t.call(d.request("POST", "/v1/accounts", bytes(&reg))).await, StatusCode::BAD_REQUEST, "bad_request");
    let got = t.call(d.request("POST", "/v1/accounts", d.register_body())).await;
    assert_eq!(got.0, StatusCode::CREATED);
}

#[tokio::test]
async fn missing_or_invalid_signatures_are_refused_everywhere() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let stranger = TestDevice::new("stranger");
    let routes: Vec<(&str, String, Vec<u8>)> = vec![
        ("GET", format!("/v1/accounts/{}", alice.handle), vec![]),
        ("GET", "/v1/keypackages".into(), vec![]),
        ("POST", "/v1/keypackages".into(), bytes(&json!({ "one_time": [] }))),
        ("POST", "/v1/keypackages/claim".into(), bytes(&json!({ "handle": alice.handle }))),
        ("POST", "/v1/messages".into(), bytes(&send_body(&[&alice], b"x", None, &conv()))),
        ("GET", "/v1/inbox".into(), vec![]),
        ("POST", "/v1/inbox/ack".into(), bytes(&json!({ "ids": [] }))),
        ("GET", "/v1/ws".into(), vec![]),
        ("POST", "/v1/devices".into(), bytes(&json!({ "device": alice.sibling().record() }))),
        ("DELETE", format!("/v1/devices/{}", alice.device), vec![]),
        ("GET", format!("/v1/links/{}", LinkId(rand::random())), vec![]),
        ("POST", format!("/v1/links/{}/approve", LinkId(rand::random())), bytes(&json!({ "response": b64(b"r") }))),
    ];
    for (method, path, body) in &routes {
        // No headers at all.
        let req = Request::builder().method(*method).uri(path.as_str()).body(Body::from(body.clone())).expect("req");
        assert_error(&t.call(req).await, StatusCode::UNAUTHORIZED, "unauthorized");
        // Each header missing in turn.
        for missing in
            ["x-subrosa-handle", "x-subrosa-device", "x-subrosa-timestamp", "x-subrosa-nonce", "x-subrosa-signature"]
        {
            let mut req = alice.request(method, path, body.clone());
            req.headers_mut().remove(missing);
            assert_error(&t.call(req).await, StatusCode::UNAUTHORIZED, "unauthorized");
        }
        // Garbage header values.
        for (name, value) in [
            ("x-subrosa-handle", "NOT A HANDLE!"),
            ("x-subrosa-device", "xyz"),
            ("x-subrosa-timestamp", "yesterday"),
            ("x-subrosa-nonce", "short"),
            ("x-subrosa-signature", "%%%"),
            ("x-subrosa-signature", "AAAA"),
        ] {
            let mut req = alice.request(method, path, body.clone());
            req.headers_mut().insert(name, value.parse().expect("header"));
            assert_error(&t.call(req).await, StatusCode::UNAUTHORIZED, "unauthorized");
        }
        // A signature by the wrong key.
        let mut req = stranger.request(method, path, body.clone());
        for (k, v) in [("x-subrosa-handle", alice.handle.to_string()), ("x-subrosa-device", alice.device.to_hex())] {
            req.headers_mut().insert(k, v.parse().expect("header"));
        }
        assert_error(&t.call(req).await, StatusCode::UNAUTHORIZED, "unauthorized");
        // An unknown device.
        assert_error(
            &t.call(stranger.request(method, path, body.clone())).await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
        // A signature over another path (the query is signed too).
        let mut req = alice.request(method, path, body.clone());
        *req.uri_mut() = format!("{path}?limit=1").parse().expect("uri");
        assert_error(&t.call(req).await, StatusCode::UNAUTHORIZED, "unauthorized");
        // A tampered body.
        if !body.is_empty() {
            let mut tampered = body.clone();
            tampered.push(b' ');
            let mut req = alice.request(method, path, body.clone());
            *req.body_mut() = Body::from(tampered);
            req.headers_mut().remove("content-length");
            assert_error(&t.call(req).await, StatusCode::UNAUTHORIZED, "unauthorized");
        }
        // Stale and future timestamps.
        for ts in [now_ms() - MAX_CLOCK_SKEW_MS - 5_000, now_ms() + MAX_CLOCK_SKEW_MS + 5_000] {
            let req = alice.request_with(method, path, body.clone(), ts, &fresh_nonce());
            assert_error(&t.call(req).await, StatusCode::UNAUTHORIZED, "stale_request");
        }
    }
    // Still serving.
    let got = t.call(alice.request("GET", "/v1/keypackages", vec![])).await;
    assert_eq!(got.0, StatusCode::OK);
}

#[tokio::test]
async fn replayed_requests_are_refused() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let nonce = fresh_nonce();
    let ts = now_ms();
    let body = bytes(&send_body(&[&bob], b"once", None, &conv()));
    let first = t.call(alice.request_with("POST", "/v1/messages", body.clone(), ts, &nonce)).await;
    assert_eq!(first.0, StatusCode::OK);
    let again = t.call(alice.request_with("POST", "/v1/messages", body.clone(), ts, &nonce)).await;
    assert_error(&again, StatusCode::UNAUTHORIZED, "replayed");
    // Same nonce in upper case is the same nonce.
    let upper = nonce.to_ascii_uppercase();
    let again = t.call(alice.request_with("POST", "/v1/messages", body, ts, &upper)).await;
    assert_error(&again, StatusCode::UNAUTHORIZED, "replayed");
    // A replayed GET too.
    let n = fresh_nonce();
    assert_eq!(t.call(bob.request_with("GET", "/v1/inbox", vec![], ts, &n)).await.0, StatusCode::OK);
    assert_error(
        &t.call(bob.request_with("GET", "/v1/inbox", vec![], ts, &n)).await,
        StatusCode::UNAUTHORIZED,
        "replayed",
    );
    // A replayed registration.
    let carol = TestDevice::new("carol");
    let n = fresh_nonce();
    let reg = carol.register_body();
    assert_eq!(t.call(carol.request_with("POST", "/v1/accounts", reg.clone(), ts, &n)).await.0, StatusCode::CREATED);
    assert_error(
        &t.call(carol.request_with("POST", "/v1/accounts", reg, ts, &n)).await,
        StatusCode::UNAUTHORIZED,
        "replayed",
    );
    // Bob got the message exactly once, and the server still serves.
    let got = t.call(bob.request("GET", "/v1/inbox", vec![])).await;
    assert_eq!(got.1["messages"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn key_packages_claim_and_count() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let got = t.call(alice.request("POST", "/v1/keypackages/claim", bytes(&json!({ "handle": bob.handle })))).await;
    assert_error(&got, StatusCode::NOT_FOUND, "no_key_package");
    let got = t.call(alice.request("POST", "/v1/keypackages/claim", bytes(&json!({ "handle": "nobody-here" })))).await;
    assert_error(&got, StatusCode::NOT_FOUND, "unknown_handle");

    let upload = json!({ "one_time": [b64(&common::kp(b"kp-1")), b64(&common::kp(b"kp-2"))], "last_resort": b64(&common::kp(b"kp-last")) });
    let got = t.call(bob.request("POST", "/v1/keypackages", bytes(&upload))).await;
    let counted = json!({ "one_time": 2, "last_resort": true,
        "suites": [{ "suite": 1, "one_time": 2, "last_resort": true }] });
    assert_eq!(got, (StatusCode::OK, counted.clone()));
    let got = t.call(bob.request("GET", "/v1/keypackages", vec![])).await;
    assert_eq!(got, (StatusCode::OK, counted));

    let mut handed = Vec::new();
    for _ in 0..4 {
        let got = t.call(alice.request("POST", "/v1/keypackages/claim", bytes(&json!({ "handle": bob.handle })))).await;
        assert_eq!(got.0, StatusCode::OK, "{}", got.1);
        assert_eq!(got.1["handle"], json!(bob.handle));
        assert_eq!(got.1["identity_key"], json!(b64(bob_identity(&bob).as_slice())));
        let p = &got.1["packages"][0];
        assert_eq!(p["device"]["device_id"], json!(bob.device.to_hex()));
        handed.push((p["key_package"].as_str().unwrap_or_default().to_owned(), p["last_resort"].as_bool()));
    }
    assert_eq!(
        handed,
        vec![
            (b64(&common::kp(b"kp-1")), Some(false)),
            (b64(&common::kp(b"kp-2")), Some(false)),
            (b64(&common::kp(b"kp-last")), Some(true)),
            (b64(&common::kp(b"kp-last")), Some(true)),
        ]
    );
    let got = t.call(bob.request("GET", "/v1/keypackages", vec![])).await;
    assert_eq!(
        got.1,
        json!({ "one_time": 0, "last_resort": true, "suites": [{ "suite": 1, "one_time": 0, "last_resort": true }] })
    );

    // Limits: count and size.
    let many: Vec<String> = (0..201).map(|i| b64(&common::kp(format!("kp{i}").as_bytes()))).collect();
    let got = t.call(bob.request("POST", "/v1/keypackages", bytes(&json!({ "one_time": many })))).await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    let big = b64(&vec![1u8; 16 * 1024 + 1]);
    let got =
        t.call(bob.request("POST", "/v1/keypackages", bytes(&json!({ "one_time": [], "last_resort": big })))).await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    let got = t.call(bob.request("POST", "/v1/keypackages", bytes(&json!({ "one_time": [""] })))).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
}

fn bob_identity(bob: &TestDevice) -> Vec<u8> {
    use aws_lc_rs::signature::KeyPair as _;
    bob.identity.public_key().as_ref().to_vec()
}

#[tokio::test]
async fn account_lookup() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let got = t.call(alice.request("GET", &format!("/v1/accounts/{}", bob.handle), vec![])).await;
    assert_eq!(got.0, StatusCode::OK);
    assert_eq!(got.1["handle"], json!(bob.handle));
    assert_eq!(got.1["identity_key"], json!(b64(&bob_identity(&bob))));
    assert_eq!(got.1["devices"][0]["device_id"], json!(bob.device.to_hex()));
    assert_eq!(got.1["devices"][0]["certificate"], json!(b64(b"opaque certificate")));
    let got = t.call(alice.request("GET", "/v1/accounts/nobody-here", vec![])).await;
    assert_error(&got, StatusCode::NOT_FOUND, "unknown_handle");
    let got = t.call(alice.request("GET", "/v1/accounts/NOT!valid", vec![])).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn send_fetch_ack_round_trip() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let carol = t.register("carol").await;
    let c = conv();
    let body = send_body(&[&bob, &carol], b"ciphertext-1", None, &c);
    let got = t.call(alice.request("POST", "/v1/messages", bytes(&body))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["duplicate"], json!(false));
    assert!(got.1["server_time"].as_u64().is_some_and(|t| t > 0));
    // The same send id again: a duplicate, stored once.
    let got = t.call(alice.request("POST", "/v1/messages", bytes(&body))).await;
    assert_eq!(got.1["duplicate"], json!(true));
    assert_eq!(t.store.stats().await.expect("stats").messages, 1);
    assert_eq!(t.store.stats().await.expect("stats").inbox_rows, 2);

    let got = t.call(bob.request("GET", "/v1/inbox?limit=10", vec![])).await;
    assert_eq!(got.0, StatusCode::OK);
    let msgs = got.1["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["conversation"], json!(c));
    assert_eq!(msgs[0]["sender"], serde_json::to_value(alice.addr()).expect("json"));
    assert_eq!(msgs[0]["kind"], json!("application"));
    assert_eq!(msgs[0]["ciphertext"], json!(b64(b"ciphertext-1")));
    let id = msgs[0]["id"].as_u64().expect("id");

    // Carol cannot ack bob's envelope.
    let got = t.call(carol.request("POST", "/v1/inbox/ack", bytes(&json!({ "ids": [id] })))).await;
    assert_eq!(got.1, json!({ "deleted": 0 }));
    let got = t.call(bob.request("POST", "/v1/inbox/ack", bytes(&json!({ "ids": [id] })))).await;
    assert_eq!(got.1, json!({ "deleted": 1 }));
    assert!(t.call(bob.request("GET", "/v1/inbox", vec![])).await.1["messages"].as_array().is_some_and(Vec::is_empty));
    assert_eq!(t.store.stats().await.expect("stats").messages, 1, "carol has not acked");
    let cid = t.call(carol.request("GET", "/v1/inbox", vec![])).await.1["messages"][0]["id"].as_u64().expect("id");
    t.call(carol.request("POST", "/v1/inbox/ack", bytes(&json!({ "ids": [cid] })))).await;
    let stats = t.store.stats().await.expect("stats");
    assert_eq!((stats.messages, stats.inbox_rows), (0, 0), "nothing of the message is left");

    // Inbox limits.
    for q in ["limit=0", "limit=abc", "limit=-1"] {
        let got = t.call(bob.request("GET", &format!("/v1/inbox?{q}"), vec![])).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    }
    for i in 0..3u8 {
        t.call(alice.request("POST", "/v1/messages", bytes(&send_body(&[&bob], &[i], None, &c)))).await;
    }
    let got = t.call(bob.request("GET", "/v1/inbox?limit=2", vec![])).await;
    let ids: Vec<u64> = got.1["messages"].as_array().expect("list").iter().filter_map(|m| m["id"].as_u64()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] < ids[1]);
    let got = t.call(bob.request("GET", "/v1/inbox?limit=100000", vec![])).await;
    assert_eq!(got.1["messages"].as_array().map(Vec::len), Some(3));
    let too_many: Vec<u64> = (0..1001).collect();
    let got = t.call(bob.request("POST", "/v1/inbox/ack", bytes(&json!({ "ids": too_many })))).await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
}

#[tokio::test]
async fn commit_ordering_and_send_validation() {
    let limits = Limits { max_recipients: 2, max_ciphertext_bytes: 1000, ..Limits::default() };
    let t = TestApp::with_limits(limits);
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let carol = t.register("carol").await;
    let c = conv();
    let got = t.call(alice.request("POST", "/v1/messages", bytes(&send_body(&[&bob], b"c0", Some(0), &c)))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["epoch"], json!(1));
    // Bob commits for epoch 0 too late.
    let got = t.call(bob.request("POST", "/v1/messages", bytes(&send_body(&[&alice], b"c0'", Some(0), &c)))).await;
    assert_error(&got, StatusCode::CONFLICT, "stale_epoch");
    assert_eq!(got.1["current_epoch"], json!(1));
    let got = t.call(bob.request("POST", "/v1/messages", bytes(&send_body(&[&alice], b"c1", Some(1), &c)))).await;
    assert_eq!(got.1["epoch"], json!(2));

    // Unknown recipient device: 404 naming the address, nothing stored.
    let ghost = TestDevice::new("ghost");
    let before = t.store.stats().await.expect("stats");
    let got = t.call(alice.request("POST", "/v1/messages", bytes(&send_body(&[&bob, &ghost], b"x", None, &c)))).await;
    assert_error(&got, StatusCode::NOT_FOUND, "unknown_handle");
    assert!(got.1["message"].as_str().is_some_and(|m| m.contains(&ghost.addr().to_string())), "{}", got.1);
    assert_eq!(t.store.stats().await.expect("stats").inbox_rows, before.inbox_rows);
    assert_eq!(t.store.stats().await.expect("stats").messages, before.messages);

    // Limits.
    let got =
        t.call(alice.request("POST", "/v1/messages", bytes(&send_body(&[&bob, &carol, &alice], b"x", None, &c)))).await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    let got = t.call(alice.request("POST", "/v1/messages", bytes(&send_body(&[&bob], &[0; 1001], None, &c)))).await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    let mut five = send_body(&[&bob], b"x", None, &c);
    let part = five["parts"][0].clone();
    five["parts"] = json!([part, part, part, part, part]);
    assert_error(
        &t.call(alice.request("POST", "/v1/messages", bytes(&five))).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );
    let mut none = send_body(&[&bob], b"x", None, &c);
    none["parts"] = json!([]);
    assert_error(
        &t.call(alice.request("POST", "/v1/messages", bytes(&none))).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    let no_recipients = send_body(&[], b"x", None, &c);
    assert_error(
        &t.call(alice.request("POST", "/v1/messages", bytes(&no_recipients))).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    let mut bad_kind = send_body(&[&bob], b"x", None, &c);
    bad_kind["parts"][0]["kind"] = json!("reaction");
    assert_error(
        &t.call(alice.request("POST", "/v1/messages", bytes(&bad_kind))).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    let mut bad_b64 = send_body(&[&bob], b"x", None, &c);
    bad_b64["parts"][0]["ciphertext"] = json!("***");
    assert_error(
        &t.call(alice.request("POST", "/v1/messages", bytes(&bad_b64))).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let t = TestApp::new();
    let got = t.call(Request::get("/v1/nothing-here").body(Body::empty()).expect("req")).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let got = t.call(Request::get("/").body(Body::empty()).expect("req")).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let got = t.call(Request::delete("/v1/messages").body(Body::empty()).expect("req")).await;
    assert_eq!(got.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(got.1["code"], json!("not_found"));
    // A signed plain GET to the WebSocket route without an upgrade.
    let alice = t.register("alice").await;
    let got = t.call(alice.request("GET", "/v1/ws", vec![])).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn rate_limits_answer_429() {
    let limits = Limits { requests_per_second: 1, burst: 3, registrations_per_minute: 2, ..Limits::default() };
    let t = TestApp::with_limits(limits);
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let got =
        t.call(TestDevice::new("carol").request("POST", "/v1/accounts", TestDevice::new("x").register_body())).await;
    assert_error(&got, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(t.call(alice.request("GET", "/v1/inbox", vec![])).await.0);
    }
    assert_eq!(&statuses[..3], &[StatusCode::OK; 3]);
    assert_eq!(statuses[4], StatusCode::TOO_MANY_REQUESTS);
    let got = t.call(alice.request("GET", "/v1/inbox", vec![])).await;
    assert_error(&got, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    // Buckets are per device.
    assert_eq!(t.call(bob.request("GET", "/v1/inbox", vec![])).await.0, StatusCode::OK);
}

#[tokio::test]
async fn one_account_cannot_drain_anothers_key_packages() {
    let t = TestApp::new();
    let mallory = t.register("mallory").await;
    let carol = t.register("carol").await;
    let bob = t.register("bob").await;
    let many: Vec<String> = (0..50).map(|i| b64(&common::kp(format!("kp-{i}").as_bytes()))).collect();
    let upload = json!({ "one_time": many, "last_resort": b64(&common::kp(b"kp-last")) });
    assert_eq!(t.call(bob.request("POST", "/v1/keypackages", bytes(&upload))).await.0, StatusCode::OK);

    let claim = |who: &common::TestDevice| {
        who.request("POST", "/v1/keypackages/claim", bytes(&json!({ "handle": bob.handle })))
    };
    let limit = subrosa_server::CLAIMS_PER_PAIR_PER_HOUR as usize;
    let allowance = subrosa_server::store::ONE_TIME_CLAIMS_PER_CLAIMER as usize;
    for i in 0..limit {
        let got = t.call(claim(&mallory)).await;
        assert_eq!(got.0, StatusCode::OK);
        assert_eq!(got.1["packages"][0]["last_resort"], json!(i >= allowance), "claim {i}");
    }
    assert_error(&t.call(claim(&mallory)).await, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    // Mallory drew only its own allowance of one-time packages and did not
    // spend bob's shared budget past it: others still get one-time ones.
    let got = t.call(claim(&carol)).await;
    assert_eq!(got.0, StatusCode::OK);
    assert_eq!(got.1["packages"][0]["last_resort"], json!(false));
    let got = t.call(bob.request("GET", "/v1/keypackages", vec![])).await;
    assert_eq!(got.1["one_time"], json!(50 - allowance - 1));
    // An account's own devices are not limited when they claim each other's.
    let bob2 = t.add_device(&bob).await;
    for _ in 0..3 {
        assert_eq!(
            t.call(bob2.request("POST", "/v1/keypackages/claim", bytes(&json!({ "handle": bob.handle })))).await.0,
            StatusCode::OK
        );
    }
}

/// Many accounts, each within its own allowance, together draw at most the
/// target's one-time budget; past it every claim still succeeds, with the
/// last-resort package. The target's own devices are not counted.
#[tokio::test]
async fn many_accounts_cannot_drain_a_targets_one_time_packages() {
    let t = TestApp::new();
    let bob = t.register("bob").await;
    let many: Vec<String> = (0..50).map(|i| b64(&common::kp(format!("kp-{i}").as_bytes()))).collect();
    let upload = json!({ "one_time": many, "last_resort": b64(&common::kp(b"kp-last")) });
    assert_eq!(t.call(bob.request("POST", "/v1/keypackages", bytes(&upload))).await.0, StatusCode::OK);
    let budget = subrosa_server::ONE_TIME_CLAIMS_PER_TARGET_PER_HOUR as usize;
    let claim = |who: &common::TestDevice| {
        who.request("POST", "/v1/keypackages/claim", bytes(&json!({ "handle": bob.handle })))
    };
    let mut one_time = 0;
    for i in 0..10 {
        let sybil = t.register(&format!("sybil{i}")).await;
        for _ in 0..4 {
            let got = t.call(claim(&sybil)).await;
            assert_eq!(got.0, StatusCode::OK, "never refused: {}", got.1);
            if got.1["packages"][0]["last_resort"] == json!(false) {
                one_time += 1;
            }
        }
    }
    assert_eq!(one_time, budget, "40 claims by 10 accounts drew only the budget");
    let got = t.call(bob.request("GET", "/v1/keypackages", vec![])).await;
    assert_eq!(got.1["one_time"], json!(50 - budget));
    // The owner's own devices still draw one-time packages.
    let bob2 = t.add_device(&bob).await;
    let got = t.call(bob2.request("POST", "/v1/keypackages/claim", bytes(&json!({ "handle": bob.handle })))).await;
    assert_eq!(got.1["packages"][0]["last_resort"], json!(false));
}

/// A non-member who knows a conversation's id cannot move its epoch or post
/// to it, whatever epoch it names: `403 not_a_member`, nothing stored; the
/// members commit on. The echo: a committer that declares its members gets
/// its own commit back.
#[tokio::test]
async fn a_non_member_is_refused_and_cannot_freeze_the_conversation() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let mallory = t.register("mallory").await;
    let c = conv();
    let mut create = send_body(&[&bob], b"create", Some(0), &c);
    create["commit"]["members"] = json!([alice.addr(), bob.addr()]);
    let got = t.call(alice.request("POST", "/v1/messages", bytes(&create))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    for epoch in 0..4 {
        let attack = send_body(&[&alice], b"freeze", Some(epoch), &c);
        let got = t.call(mallory.request("POST", "/v1/messages", bytes(&attack))).await;
        assert_error(&got, StatusCode::FORBIDDEN, "not_a_member");
        assert!(got.1.get("current_epoch").is_none(), "the epoch is not told to outsiders");
    }
    let got = t.call(mallory.request("POST", "/v1/messages", bytes(&send_body(&[&alice], b"hi", None, &c)))).await;
    assert_error(&got, StatusCode::FORBIDDEN, "not_a_member");
    // Nothing reached alice but the echo of her own commit.
    let inbox = t.call(alice.request("GET", "/v1/inbox", vec![])).await;
    let messages = inbox.1["messages"].as_array().expect("list").clone();
    assert_eq!(messages.len(), 1, "{inbox:?}");
    assert_eq!(messages[0]["sender"], json!(alice.addr()));
    assert_eq!(messages[0]["roster"].as_array().map(Vec::len), Some(2));
    // Bob commits at epoch 1: it was never moved.
    let mut next = send_body(&[&alice], b"c1", Some(1), &c);
    next["commit"]["members"] = json!([alice.addr(), bob.addr()]);
    let got = t.call(bob.request("POST", "/v1/messages", bytes(&next))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["epoch"], json!(2));
}

/// The server reads a commit's MLS framing rather than trusting the labels:
/// a commit for another epoch or conversation, an application message
/// labelled as a commit, or a commit without the guard is refused.
#[tokio::test]
async fn commit_labels_must_match_the_mls_framing() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let c = conv();
    let id = ConversationId::from_str(&c).expect("id");
    let got = t.call(alice.request("POST", "/v1/messages", bytes(&send_body(&[&bob], b"c0", Some(0), &c)))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let post = |ciphertext: Vec<u8>, epoch: Option<u64>| {
        let mut body = send_body(&[&bob], b"x", None, &c);
        body["parts"][0]["kind"] = json!("commit");
        body["parts"][0]["ciphertext"] = json!(b64(&ciphertext));
        if let Some(e) = epoch {
            body["commit"] = json!({ "epoch": e });
        }
        alice.request("POST", "/v1/messages", bytes(&body))
    };
    // Labelled epoch 1, framed epoch 7: refused, the epoch does not move.
    assert_error(&t.call(post(framed_commit(&id, 7, b""), Some(1))).await, StatusCode::BAD_REQUEST, "bad_request");
    let other = ConversationId(rand::random());
    assert_error(&t.call(post(framed_commit(&other, 1, b""), Some(1))).await, StatusCode::BAD_REQUEST, "bad_request");
    let mut application = framed_commit(&id, 1, b"");
    application[5 + 16 + 8] = 1;
    assert_error(&t.call(post(application, Some(1))).await, StatusCode::BAD_REQUEST, "bad_request");
    assert_error(&t.call(post(b"garbage".to_vec(), Some(1))).await, StatusCode::BAD_REQUEST, "bad_request");
    // A real commit must carry the guard.
    assert_error(&t.call(post(framed_commit(&id, 1, b""), None)).await, StatusCode::BAD_REQUEST, "bad_request");
    // A guard past epoch 0 needs its commit.
    let mut welcome_only = send_body(&[&bob], b"w", None, &c);
    welcome_only["parts"][0]["kind"] = json!("welcome");
    welcome_only["commit"] = json!({ "epoch": 1 });
    let got = t.call(alice.request("POST", "/v1/messages", bytes(&welcome_only))).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    // The honest commit at epoch 1 still wins it.
    let got = t.call(post(framed_commit(&id, 1, b""), Some(1))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["epoch"], json!(2));
}

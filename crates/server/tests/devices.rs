//! Adding and removing devices, and link slots, through `app()` with real
//! Ed25519 signing.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{assert_error, TestApp, TestDevice};
use serde_json::json;
use subrosa_proto::limits::{LINK_TTL_SECS, MAX_CERTIFICATE_BYTES, MAX_LINK_BYTES, MAX_LINK_REQUEST_BYTES};
use subrosa_proto::{ConversationId, LinkId};
use subrosa_server::store::MAX_DEVICES_PER_ACCOUNT;
use subrosa_server::{now_ms, Limits};

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn bytes(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

fn unsigned(method: &str, path: &str, body: Vec<u8>) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("request")
}

fn send_body(to: &[&TestDevice], ciphertext: &[u8]) -> Vec<u8> {
    let recipients: Vec<serde_json::Value> = to.iter().map(|d| serde_json::to_value(d.addr()).expect("json")).collect();
    bytes(&json!({
        "conversation": ConversationId([9; 16]).to_hex(),
        "send_id": hex::encode(rand::random::<[u8; 16]>()),
        "parts": [{ "kind": "application", "recipients": recipients, "ciphertext": b64(ciphertext) }],
    }))
}

fn device_ids(info: &serde_json::Value) -> Vec<String> {
    info["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["device_id"].as_str().expect("id").to_owned())
        .collect()
}

async fn account_devices(t: &TestApp, by: &TestDevice, of: &TestDevice) -> Vec<String> {
    let got = t.call(by.request("GET", &format!("/v1/accounts/{}", of.handle), vec![])).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    device_ids(&got.1)
}

async fn upload(t: &TestApp, d: &TestDevice, packages: &[&[u8]]) {
    let one_time: Vec<String> = packages.iter().map(|p| b64(&common::kp(p))).collect();
    let got = t.call(d.request("POST", "/v1/keypackages", bytes(&json!({ "one_time": one_time })))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
}

async fn claim(t: &TestApp, by: &TestDevice, of: &TestDevice) -> (StatusCode, serde_json::Value) {
    t.call(by.request("POST", "/v1/keypackages/claim", bytes(&json!({ "handle": of.handle })))).await
}

fn claimed_devices(body: &serde_json::Value) -> Vec<String> {
    body["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| p["device"]["device_id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test]
async fn added_device_signs_requests_and_is_listed() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    // Not yet added: its signed requests are refused.
    let alice2 = alice.sibling();
    assert_error(&t.call(alice2.request("GET", "/v1/inbox", vec![])).await, StatusCode::UNAUTHORIZED, "unauthorized");

    let body = bytes(&json!({ "device": alice2.record() }));
    let got = t.call(alice.request("POST", "/v1/devices", body.clone())).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["handle"], json!(alice.handle));
    assert_eq!(device_ids(&got.1), vec![alice.device.to_hex(), alice2.device.to_hex()]);
    assert_eq!(got.1["devices"][1]["signature_key"], json!(b64(alice2.record().signature_key.as_slice())));
    assert_eq!(got.1["devices"][1]["certificate"], json!(b64(b"opaque certificate")));

    // The new device signs requests; others see it.
    assert_eq!(t.call(alice2.request("GET", "/v1/inbox", vec![])).await.0, StatusCode::OK);
    assert_eq!(account_devices(&t, &bob, &alice).await, vec![alice.device.to_hex(), alice2.device.to_hex()]);
    // It can add devices too, and messages reach it.
    let alice3 = t.add_device(&alice2).await;
    assert_eq!(
        t.call(bob.request("POST", "/v1/messages", send_body(&[&alice2, &alice3], b"hi"))).await.0,
        StatusCode::OK
    );
    let got = t.call(alice3.request("GET", "/v1/inbox", vec![])).await;
    assert_eq!(got.1["messages"].as_array().map(Vec::len), Some(1));

    // The same device id again, by any device: 409.
    let got = t.call(alice3.request("POST", "/v1/devices", body.clone())).await;
    assert_error(&got, StatusCode::CONFLICT, "bad_request");
    assert!(got.1["message"].as_str().is_some_and(|m| m.contains("device id already registered")), "{}", got.1);
    // Device ids are per account: bob may use the same id.
    let mut same_id = bob.sibling();
    same_id.device = alice2.device;
    let got = t.call(bob.request("POST", "/v1/devices", bytes(&json!({ "device": same_id.record() })))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);

    // Malformed records and bodies.
    let mut short_key = serde_json::to_value(alice.sibling().record()).expect("json");
    short_key["signature_key"] = json!(b64(&[1; 31]));
    let mut big_cert = serde_json::to_value(alice.sibling().record()).expect("json");
    big_cert["certificate"] = json!(b64(&vec![0; MAX_CERTIFICATE_BYTES + 1]));
    let mut extra = json!({ "device": alice.sibling().record() });
    extra["device"]["admin"] = json!(true);
    let mut bad_id = serde_json::to_value(alice.sibling().record()).expect("json");
    bad_id["device_id"] = json!("not-hex");
    for body in [
        bytes(&json!({ "device": short_key })),
        bytes(&json!({ "device": bad_id })),
        bytes(&extra),
        bytes(&json!({ "device": alice.sibling().record(), "handle": "someone-else" })),
        bytes(&json!({})),
        b"{ nope".to_vec(),
        Vec::new(),
    ] {
        assert_error(&t.call(alice.request("POST", "/v1/devices", body)).await, StatusCode::BAD_REQUEST, "bad_request");
    }
    let got = t.call(alice.request("POST", "/v1/devices", bytes(&json!({ "device": big_cert })))).await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    // Unsigned, or signed by the device being added itself: 401.
    let alice4 = alice.sibling();
    let body = bytes(&json!({ "device": alice4.record() }));
    assert_error(
        &t.call(unsigned("POST", "/v1/devices", body.clone())).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(&t.call(alice4.request("POST", "/v1/devices", body)).await, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(account_devices(&t, &bob, &alice).await.len(), 3, "nothing else was added");
}

#[tokio::test]
async fn device_count_is_bounded() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let mut last = None;
    for _ in 1..MAX_DEVICES_PER_ACCOUNT {
        last = Some(t.add_device(&alice).await);
    }
    let extra = alice.sibling();
    let got = t.call(alice.request("POST", "/v1/devices", bytes(&json!({ "device": extra.record() })))).await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert!(got.1["message"].as_str().is_some_and(|m| m.contains("at most 16 active devices")), "{}", got.1);
    // Removing one makes room.
    let last = last.expect("devices added");
    let got = t.call(alice.request("DELETE", &format!("/v1/devices/{}", last.device), vec![])).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = t.call(alice.request("POST", "/v1/devices", bytes(&json!({ "device": extra.record() })))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
}

#[tokio::test]
async fn removed_device_is_refused_everywhere() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let alice2 = t.add_device(&alice).await;
    let bob = t.register("bob").await;
    upload(&t, &alice, &[b"a1-kp"]).await;
    upload(&t, &alice2, &[b"a2-kp-1", b"a2-kp-2"]).await;
    let got = t.call(bob.request("POST", "/v1/messages", send_body(&[&alice, &alice2], b"to both"))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = t.call(bob.request("POST", "/v1/messages", send_body(&[&alice2], b"to alice2 only"))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let before = t.store.stats().await.expect("stats");

    let got = t.call(alice.request("DELETE", &format!("/v1/devices/{}", alice2.device), vec![])).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["handle"], json!(alice.handle));
    assert_eq!(device_ids(&got.1), vec![alice.device.to_hex()]);

    // Its signed requests are refused.
    for (method, path, body) in [
        ("GET", "/v1/inbox", vec![]),
        ("GET", "/v1/keypackages", vec![]),
        ("POST", "/v1/messages", send_body(&[&bob], b"from a ghost")),
        ("POST", "/v1/devices", bytes(&json!({ "device": alice2.sibling().record() }))),
        ("DELETE", &format!("/v1/devices/{}", alice.device), vec![]),
    ] {
        let got = t.call(alice2.request(method, path, body)).await;
        assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    // It is gone from the account and from claims; its packages and rows too.
    assert_eq!(account_devices(&t, &bob, &alice).await, vec![alice.device.to_hex()]);
    let got = claim(&t, &bob, &alice).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(claimed_devices(&got.1), vec![alice.device.to_hex()]);
    assert_error(&claim(&t, &bob, &alice).await, StatusCode::NOT_FOUND, "no_key_package");
    let after = t.store.stats().await.expect("stats");
    assert_eq!(before.one_time_key_packages - after.one_time_key_packages, 2 + 1, "its packages, and the claimed one");
    assert_eq!(before.inbox_rows - after.inbox_rows, 2);
    assert_eq!(before.messages - after.messages, 1, "the message for alice2 alone is gone");
    let got = t.call(alice.request("GET", "/v1/inbox", vec![])).await;
    assert_eq!(got.1["messages"].as_array().map(Vec::len), Some(1), "alice's copy stays");
    // Sends naming it: 404 like an unknown device, nothing stored.
    let got = t.call(bob.request("POST", "/v1/messages", send_body(&[&alice, &alice2], b"late"))).await;
    assert_error(&got, StatusCode::NOT_FOUND, "unknown_handle");
    assert!(got.1["message"].as_str().is_some_and(|m| m.contains(&alice2.addr().to_string())), "{}", got.1);
    assert_eq!(t.store.stats().await.expect("stats").inbox_rows, after.inbox_rows);
    // Removing it again, or a device that never existed: 404.
    let got = t.call(alice.request("DELETE", &format!("/v1/devices/{}", alice2.device), vec![])).await;
    assert_error(&got, StatusCode::NOT_FOUND, "unknown_handle");
    let got = t.call(alice.request("DELETE", "/v1/devices/0011223344556677", vec![])).await;
    assert_error(&got, StatusCode::NOT_FOUND, "unknown_handle");
    // Its id cannot be added back.
    let got = t.call(alice.request("POST", "/v1/devices", bytes(&json!({ "device": alice2.record() })))).await;
    assert_error(&got, StatusCode::CONFLICT, "bad_request");
}

#[tokio::test]
async fn removal_rules() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let bob2 = t.add_device(&bob).await;
    // The last device cannot go.
    let got = t.call(alice.request("DELETE", &format!("/v1/devices/{}", alice.device), vec![])).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    assert!(got.1["message"].as_str().is_some_and(|m| m.contains("cannot remove the last device")), "{}", got.1);
    // Another account's device is not found (it is looked up in the caller's account).
    let got = t.call(alice.request("DELETE", &format!("/v1/devices/{}", bob2.device), vec![])).await;
    assert_error(&got, StatusCode::NOT_FOUND, "unknown_handle");
    assert_eq!(account_devices(&t, &alice, &bob).await.len(), 2);
    // Bad ids: 400.
    for id in ["xyz", "00112233", "00112233445566778899", "zz11223344556677", "%20"] {
        let got = t.call(bob.request("DELETE", &format!("/v1/devices/{id}"), vec![])).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    }
    // Unsigned: 401.
    let got = t.call(unsigned("DELETE", &format!("/v1/devices/{}", bob2.device), vec![])).await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    // A device may remove itself; then it is refused, the other one serves.
    let got = t.call(bob2.request("DELETE", &format!("/v1/devices/{}", bob2.device), vec![])).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(device_ids(&got.1), vec![bob.device.to_hex()]);
    assert_error(&t.call(bob2.request("GET", "/v1/inbox", vec![])).await, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(t.call(bob.request("GET", "/v1/inbox", vec![])).await.0, StatusCode::OK);
    let got = t.call(bob.request("DELETE", &format!("/v1/devices/{}", bob.device), vec![])).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
}

/// A device claiming its own handle gets its account's other devices, never
/// itself: that is how it adds them to conversations.
#[tokio::test]
async fn own_claim_returns_the_other_devices() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let got = claim(&t, &alice, &alice).await;
    assert_error(&got, StatusCode::NOT_FOUND, "no_key_package");
    upload(&t, &alice, &[b"a1-kp"]).await;
    assert_error(&claim(&t, &alice, &alice).await, StatusCode::NOT_FOUND, "no_key_package");
    let alice2 = t.add_device(&alice).await;
    let alice3 = t.add_device(&alice).await;
    upload(&t, &alice2, &[b"a2-kp"]).await;
    upload(&t, &alice3, &[b"a3-kp"]).await;
    let got = claim(&t, &alice, &alice).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(claimed_devices(&got.1), vec![alice2.device.to_hex(), alice3.device.to_hex()]);
    assert_eq!(got.1["packages"][0]["key_package"], json!(b64(&common::kp(b"a2-kp"))));
    let got = claim(&t, &alice2, &alice).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(claimed_devices(&got.1), vec![alice.device.to_hex()], "alice3 has none left");
    assert_eq!(got.1["packages"][0]["key_package"], json!(b64(&common::kp(b"a1-kp"))));
}

async fn create_link(t: &TestApp, handle: &str, request: &[u8]) -> LinkId {
    let got = t.call(unsigned("POST", "/v1/links", bytes(&json!({ "handle": handle, "request": b64(request) })))).await;
    assert_eq!(got.0, StatusCode::CREATED, "{}", got.1);
    got.1["link"].as_str().expect("link").parse().expect("link id")
}

#[tokio::test]
async fn link_flow_provisions_a_new_device() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;

    // The new device opens a slot (unsigned).
    let started = now_ms();
    let got = t
        .call(unsigned("POST", "/v1/links", bytes(&json!({ "handle": alice.handle, "request": b64(b"new keys") }))))
        .await;
    assert_eq!(got.0, StatusCode::CREATED, "{}", got.1);
    let link: LinkId = got.1["link"].as_str().expect("link").parse().expect("12 hex digits");
    let expires_at = got.1["expires_at"].as_u64().expect("expiry");
    assert!(expires_at >= started + LINK_TTL_SECS * 1000 && expires_at <= now_ms() + LINK_TTL_SECS * 1000);
    let path = format!("/v1/links/{link}");
    let response_path = format!("/v1/links/{link}/response");
    let approve_path = format!("/v1/links/{link}/approve");

    // Nothing yet.
    assert_eq!(t.call(unsigned("GET", &response_path, vec![])).await, (StatusCode::OK, json!({ "response": null })));
    // A device of the account reads it; another account cannot tell it exists.
    let got = t.call(alice.request("GET", &path, vec![])).await;
    assert_eq!(
        got,
        (StatusCode::OK, json!({ "link": link.to_hex(), "request": b64(b"new keys"), "expires_at": expires_at }))
    );
    assert_error(&t.call(bob.request("GET", &path, vec![])).await, StatusCode::NOT_FOUND, "not_found");
    let approve = bytes(&json!({ "response": b64(b"sealed for the new device") }));
    assert_error(
        &t.call(bob.request("POST", &approve_path, approve.clone())).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(&t.call(unsigned("GET", &path, vec![])).await, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_error(
        &t.call(unsigned("POST", &approve_path, approve.clone())).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_eq!(
        t.call(unsigned("GET", &response_path, vec![])).await.1,
        json!({ "response": null }),
        "bob changed nothing"
    );

    // Alice's device adds the new device and approves, once.
    let new_device = alice.sibling();
    let got = t.call(alice.request("POST", "/v1/devices", bytes(&json!({ "device": new_device.record() })))).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let got = t.call(alice.request("POST", &approve_path, approve)).await;
    assert_eq!(got, (StatusCode::OK, json!({})));
    let again = bytes(&json!({ "response": b64(b"a second answer") }));
    let got = t.call(alice.request("POST", &approve_path, again)).await;
    assert_error(&got, StatusCode::CONFLICT, "bad_request");
    assert!(got.1["message"].as_str().is_some_and(|m| m.contains("already approved")), "{}", got.1);

    // The new device fetches the response once; then the slot is gone.
    let got = t.call(unsigned("GET", &response_path, vec![])).await;
    assert_eq!(got, (StatusCode::OK, json!({ "response": b64(b"sealed for the new device") })));
    assert_error(&t.call(unsigned("GET", &response_path, vec![])).await, StatusCode::NOT_FOUND, "not_found");
    assert_error(&t.call(alice.request("GET", &path, vec![])).await, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(t.store.stats().await.expect("stats").links, 0);
    // And it is a working device of the account.
    assert_eq!(t.call(new_device.request("GET", "/v1/inbox", vec![])).await.0, StatusCode::OK);
}

#[tokio::test]
async fn link_errors_have_stable_codes() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    // Unknown handle.
    let got =
        t.call(unsigned("POST", "/v1/links", bytes(&json!({ "handle": "nobody-here", "request": b64(b"k") })))).await;
    assert_error(&got, StatusCode::NOT_FOUND, "unknown_handle");
    // Malformed bodies.
    for body in [
        b"{ nope".to_vec(),
        Vec::new(),
        bytes(&json!({ "handle": alice.handle })),
        bytes(&json!({ "handle": "NOT valid!", "request": b64(b"k") })),
        bytes(&json!({ "handle": alice.handle, "request": "***" })),
        bytes(&json!({ "handle": alice.handle, "request": "" })),
        bytes(&json!({ "handle": alice.handle, "request": b64(b"k"), "device": "x" })),
    ] {
        assert_error(&t.call(unsigned("POST", "/v1/links", body)).await, StatusCode::BAD_REQUEST, "bad_request");
    }
    let big = bytes(&json!({ "handle": alice.handle, "request": b64(&vec![7; MAX_LINK_REQUEST_BYTES + 1]) }));
    assert_error(&t.call(unsigned("POST", "/v1/links", big)).await, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    let at_limit = bytes(&json!({ "handle": alice.handle, "request": b64(&vec![7; MAX_LINK_REQUEST_BYTES]) }));
    assert_eq!(t.call(unsigned("POST", "/v1/links", at_limit)).await.0, StatusCode::CREATED);

    // Bad link ids on every link route: 400; a well-formed unknown one: 404.
    let link = create_link(&t, alice.handle.as_str(), b"keys").await;
    for id in ["xyz", "0011", "00112233445566", "zz1122334455", "%20"] {
        let got = t.call(alice.request("GET", &format!("/v1/links/{id}"), vec![])).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
        let body = bytes(&json!({ "response": b64(b"r") }));
        let got = t.call(alice.request("POST", &format!("/v1/links/{id}/approve"), body)).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
        let got = t.call(unsigned("GET", &format!("/v1/links/{id}/response"), vec![])).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    }
    let unknown = LinkId(rand::random()).to_hex();
    assert_error(
        &t.call(alice.request("GET", &format!("/v1/links/{unknown}"), vec![])).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &t.call(unsigned("GET", &format!("/v1/links/{unknown}/response"), vec![])).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let got = t
        .call(alice.request("POST", &format!("/v1/links/{unknown}/approve"), bytes(&json!({ "response": b64(b"r") }))))
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    // Malformed, empty and oversize approvals leave the slot pending.
    let approve_path = format!("/v1/links/{link}/approve");
    for body in [
        b"[]".to_vec(),
        Vec::new(),
        bytes(&json!({ "response": "" })),
        bytes(&json!({ "response": 5 })),
        bytes(&json!({ "response": b64(b"r"), "extra": 1 })),
    ] {
        assert_error(&t.call(alice.request("POST", &approve_path, body)).await, StatusCode::BAD_REQUEST, "bad_request");
    }
    let big = bytes(&json!({ "response": b64(&vec![1; MAX_LINK_BYTES + 1]) }));
    assert_error(&t.call(alice.request("POST", &approve_path, big)).await, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    let got = t.call(unsigned("GET", &format!("/v1/links/{link}/response"), vec![])).await;
    assert_eq!(got, (StatusCode::OK, json!({ "response": null })));
    // Wrong methods.
    let got = t.call(unsigned("DELETE", &format!("/v1/links/{link}"), vec![])).await;
    assert_eq!(got.0, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn expired_links_answer_not_found_and_are_swept() {
    let t = TestApp::new();
    let alice = t.register("alice").await;
    let (pending, approved) = (LinkId(rand::random()), LinkId(rand::random()));
    let expires = now_ms() + 300;
    t.store.create_link(&pending, &alice.handle, b"p".to_vec(), expires).await.expect("create");
    t.store.create_link(&approved, &alice.handle, b"a".to_vec(), expires).await.expect("create");
    let got = t
        .call(alice.request("POST", &format!("/v1/links/{approved}/approve"), bytes(&json!({ "response": b64(b"r") }))))
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    for link in [pending, approved] {
        assert_error(
            &t.call(alice.request("GET", &format!("/v1/links/{link}"), vec![])).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
        assert_error(
            &t.call(unsigned("GET", &format!("/v1/links/{link}/response"), vec![])).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
    }
    let got = t
        .call(alice.request("POST", &format!("/v1/links/{pending}/approve"), bytes(&json!({ "response": b64(b"r") }))))
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(t.store.stats().await.expect("stats").links, 2, "refused before the sweep");
    let report = t.store.sweep(0, 0, 0, now_ms()).await.expect("sweep");
    assert_eq!(report.links, 2);
    assert_eq!(t.store.stats().await.expect("stats").links, 0);
}

#[tokio::test]
async fn link_creation_and_polling_are_rate_limited() {
    let limits = Limits { registrations_per_minute: 2, requests_per_second: 1, burst: 2, ..Limits::default() };
    let t = TestApp::with_limits(limits);
    let alice = t.register("alice").await;
    // Link creation has a bucket of its own (two a minute here): junk link
    // requests must not lock anyone out of registering.
    let link = create_link(&t, alice.handle.as_str(), b"k").await;
    create_link(&t, alice.handle.as_str(), b"k2").await;
    let body = bytes(&json!({ "handle": alice.handle, "request": b64(b"k") }));
    assert_error(&t.call(unsigned("POST", "/v1/links", body)).await, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    t.register("bob").await;
    let path = format!("/v1/links/{link}/response");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(t.call(unsigned("GET", &path, vec![])).await.0);
    }
    assert_eq!(&statuses[..2], &[StatusCode::OK; 2]);
    assert_eq!(statuses[3], StatusCode::TOO_MANY_REQUESTS);
}

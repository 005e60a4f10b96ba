//! The malicious-operator controller (feature `test-attacks`): each attack
//! does what `crates/attack-server/README.md` says, and switches on and off
//! with the plan file while the server runs.
//!
//! `cargo test -p subrosa-server --features test-attacks --test attacks`

#![cfg(feature = "test-attacks")]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use common::TestDevice;
use http_body_util::BodyExt as _;
use serde_json::json;
use subrosa_client::kt::verify_lookup_value;
use subrosa_proto::kt::{directory_value, KtAudit, KtHead};
use subrosa_proto::{AccountInfo, ClaimResponse, ConversationId, DeviceId, DeviceRecord, InboxResponse, B64};
use subrosa_server::attacks::Attacks;
use subrosa_server::store::{SqliteStore, Store};
use subrosa_server::{app, AppState, Limits};
use tower::ServiceExt as _;

struct Evil {
    dir: tempfile::TempDir,
    router: Router,
}

impl Evil {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("server.db")).expect("store"));
        let state = AppState::new(store, Limits::default())
            .with_kt_publish_interval(Duration::from_millis(5))
            .with_attacks(Attacks::new(dir.path()));
        Evil { router: app(state), dir }
    }

    fn plan(&self, plan: serde_json::Value) {
        std::fs::write(self.dir.path().join("attacks.json"), plan.to_string()).expect("plan");
    }

    fn honest(&self) {
        let _ = std::fs::remove_file(self.dir.path().join("attacks.json"));
    }

    async fn call(&self, req: Request<Body>) -> (StatusCode, serde_json::Value) {
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, if bytes.is_empty() { serde_json::Value::Null } else { serde_json::from_slice(&bytes).expect("json") })
    }

    async fn ok<T: serde::de::DeserializeOwned>(&self, req: Request<Body>) -> T {
        let (status, body) = self.call(req).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).expect("shape")
    }

    async fn register(&self, prefix: &str) -> TestDevice {
        let d = TestDevice::new(prefix);
        let (status, body) = self.call(d.request("POST", "/v1/accounts", d.register_body())).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        d
    }

    async fn account(&self, by: &TestDevice, of: &TestDevice) -> AccountInfo {
        self.ok(by.request("GET", &format!("/v1/accounts/{}", of.handle), vec![])).await
    }

    async fn head(&self, by: &TestDevice) -> KtHead {
        self.ok(by.request("GET", "/v1/kt/head", vec![])).await
    }

    async fn claim(&self, by: &TestDevice, of: &TestDevice) -> ClaimResponse {
        let body = serde_json::to_vec(&json!({ "handle": of.handle })).unwrap();
        self.ok(by.request("POST", "/v1/keypackages/claim", body)).await
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn identity(d: &TestDevice) -> Vec<u8> {
    use aws_lc_rs::signature::KeyPair as _;
    d.identity.public_key().as_ref().to_vec()
}

fn ghost() -> DeviceRecord {
    DeviceRecord {
        device_id: DeviceId([0xee; 8]),
        signature_key: B64(vec![0xee; 32]),
        certificate: B64(b"forged".to_vec()),
    }
}

/// True when the answer's proof verifies for the keys it carries.
fn proof_matches(vrf: &[u8], info: &AccountInfo) -> bool {
    let value = directory_value(info.identity_key.as_slice(), &info.devices);
    verify_lookup_value(vrf, &info.handle, info.kt.as_ref().expect("kt"), &value).is_ok()
}

#[tokio::test]
async fn ghost_device_is_published_and_served() {
    let t = Evil::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let vrf = t.head(&bob).await.vrf_public_key.0;
    t.plan(json!({ "ghost_device": { "handle": alice.handle, "device": ghost() } }));
    let seen = t.account(&bob, &alice).await;
    assert!(seen.devices.contains(&ghost()), "the ghost is served");
    assert!(proof_matches(&vrf, &seen), "and published: the proof holds for the entry with the ghost");
    // Alice, looking herself up, sees the ghost in her own entry.
    let own = t.account(&alice, &alice).await;
    assert_eq!(own.devices.len(), 2);
    t.honest();
    let back = t.account(&bob, &alice).await;
    assert_eq!(back.devices, vec![alice.record()], "switched off: republished without the ghost");
    assert!(proof_matches(&vrf, &back));
}

#[tokio::test]
async fn substituted_key_packages_do_not_match_the_proof() {
    let t = Evil::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let upload =
        serde_json::to_vec(&json!({ "one_time": [b64(&common::kp(b"real kp 1")), b64(&common::kp(b"real kp 2"))] }))
            .unwrap();
    let _: serde_json::Value = t.ok(bob.request("POST", "/v1/keypackages", upload)).await;
    let vrf = t.head(&alice).await.vrf_public_key.0;
    t.plan(
        json!({ "substitute_key_packages": { "handle": bob.handle, "with": [b64(b"evil kp")], "device": ghost() } }),
    );
    let claimed = t.claim(&alice, &bob).await;
    assert_eq!(claimed.packages.len(), 1);
    assert_eq!(claimed.packages[0].key_package.0, b"evil kp");
    assert_eq!(claimed.packages[0].device, ghost());
    let info = AccountInfo {
        handle: claimed.handle.clone(),
        identity_key: claimed.identity_key.clone(),
        devices: claimed.devices.clone(),
        kt: claimed.kt.clone(),
    };
    assert!(proof_matches(&vrf, &info), "the proof is the honest one");
    assert!(!claimed.devices.contains(&ghost()), "so the substituted device is not among the proven devices");
    t.honest();
    assert_eq!(t.claim(&alice, &bob).await.packages[0].key_package.0, common::kp(b"real kp 2"));
}

#[tokio::test]
async fn fork_shows_the_victim_other_keys_with_valid_proofs() {
    let t = Evil::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    let carol = t.register("carol").await;
    let before = t.head(&alice).await;
    let mallory = TestDevice::new("mallory");
    t.plan(json!({
        "fork": {
            "victim": carol.handle,
            "handle": bob.handle,
            "identity_key": b64(&identity(&mallory)),
            "devices": [mallory.record()],
            "key_packages": [b64(b"mallory kp")],
        }
    }));
    let carol_sees = t.account(&carol, &bob).await;
    assert_eq!(carol_sees.identity_key.0, identity(&mallory));
    assert!(proof_matches(&before.vrf_public_key.0, &carol_sees), "the fork's proof is valid for the forged keys");
    let claimed = t.claim(&carol, &bob).await;
    assert_eq!(claimed.packages[0].key_package.0, b"mallory kp");
    let alice_sees = t.account(&alice, &bob).await;
    assert_eq!(alice_sees.identity_key.0, identity(&bob), "everyone else sees the real directory");
    assert!(proof_matches(&before.vrf_public_key.0, &alice_sees));
    // Carol's view of other handles stays consistent with her fork.
    assert!(proof_matches(&before.vrf_public_key.0, &t.account(&carol, &alice).await));

    // The next real publish: the same epoch number has two roots.
    let _dave = t.register("dave").await;
    let real = t.head(&alice).await;
    let forked = t.head(&carol).await;
    let epoch = before.epoch + 1;
    assert!(real.epoch >= epoch && forked.epoch >= epoch);
    let path = format!("/v1/kt/audit?from={epoch}&to={epoch}");
    let real_root: KtAudit = t.ok(alice.request("GET", &path, vec![])).await;
    let fork_root: KtAudit = t.ok(carol.request("GET", &path, vec![])).await;
    assert_ne!(real_root.root_hashes, fork_root.root_hashes, "epoch {epoch} has different roots in the two views");
    // Up to the divergence the views agree.
    let path = format!("/v1/kt/audit?from=1&to={}", before.epoch);
    let a: KtAudit = t.ok(alice.request("GET", &path, vec![])).await;
    let c: KtAudit = t.ok(carol.request("GET", &path, vec![])).await;
    assert_eq!(a.root_hashes, c.root_hashes);
    t.honest();
    assert_eq!(t.account(&carol, &bob).await.identity_key.0, identity(&bob));
}

#[tokio::test]
async fn messages_are_dropped_replayed_and_reordered() {
    let t = Evil::new();
    let alice = t.register("alice").await;
    let bob = t.register("bob").await;
    for i in 0..4u8 {
        let body = serde_json::to_vec(&json!({
            "conversation": ConversationId([9; 16]).to_hex(),
            "send_id": hex::encode(rand::random::<[u8; 16]>()),
            "parts": [{ "kind": "application", "recipients": [bob.addr()], "ciphertext": b64(&[i]) }],
        }))
        .unwrap();
        let _: serde_json::Value = t.ok(alice.request("POST", "/v1/messages", body)).await;
    }
    let honest: InboxResponse = t.ok(bob.request("GET", "/v1/inbox", vec![])).await;
    let ids: Vec<u64> = honest.messages.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 4);
    t.plan(json!({ "messages": { "recipient": bob.handle, "drop": [ids[1]], "replay": true, "reorder": true } }));
    let evil: InboxResponse = t.ok(bob.request("GET", "/v1/inbox", vec![])).await;
    let got: Vec<u64> = evil.messages.iter().map(|e| e.id).collect();
    assert_eq!(got, vec![ids[3], ids[3], ids[2], ids[2], ids[0], ids[0]]);
    t.honest();
    let after: InboxResponse = t.ok(bob.request("GET", "/v1/inbox", vec![])).await;
    let left: Vec<u64> = after.messages.iter().map(|e| e.id).collect();
    assert_eq!(left, vec![ids[0], ids[2], ids[3]], "the dropped one was acknowledged away");
}

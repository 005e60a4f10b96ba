//! Helpers shared by the integration tests: test devices with real Ed25519
//! keys, signed requests, and a router over a fresh SQLite store.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http_body_util::BodyExt as _;
use subrosa_proto::{
    canonical_request, DeviceAddress, DeviceId, DeviceRecord, Handle, RegisterRequest, SignedHeaders, B64,
    HEADER_DEVICE, HEADER_HANDLE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use subrosa_server::store::{SqliteStore, Store};
use subrosa_server::{app, now_ms, AppState, Limits};
use tower::ServiceExt as _;

/// A device with its own signature key, for signing requests.
pub struct TestDevice {
    pub handle: Handle,
    pub device: DeviceId,
    pub key: Ed25519KeyPair,
    pub identity: Ed25519KeyPair,
}

impl TestDevice {
    pub fn new(prefix: &str) -> Self {
        let handle = Handle::new(&format!("{prefix}{}", hex::encode(rand::random::<[u8; 4]>()))).expect("handle");
        TestDevice {
            handle,
            device: DeviceId(rand::random()),
            key: Ed25519KeyPair::generate().expect("key"),
            identity: Ed25519KeyPair::generate().expect("key"),
        }
    }

    /// Another device of the same account (its own key; not yet added).
    pub fn sibling(&self) -> Self {
        TestDevice {
            handle: self.handle.clone(),
            device: DeviceId(rand::random()),
            key: Ed25519KeyPair::generate().expect("key"),
            identity: Ed25519KeyPair::generate().expect("key"),
        }
    }

    pub fn addr(&self) -> DeviceAddress {
        DeviceAddress { handle: self.handle.clone(), device: self.device }
    }

    pub fn record(&self) -> DeviceRecord {
        DeviceRecord {
            device_id: self.device,
            signature_key: B64(self.key.public_key().as_ref().to_vec()),
            certificate: B64(b"opaque certificate".to_vec()),
        }
    }

    pub fn register_body(&self) -> Vec<u8> {
        serde_json::to_vec(&RegisterRequest {
            handle: self.handle.clone(),
            identity_key: B64(self.identity.public_key().as_ref().to_vec()),
            device: self.record(),
        })
        .expect("json")
    }

    /// The five signature headers for a request.
    pub fn sign(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
        timestamp: u64,
        nonce: &str,
    ) -> Vec<(&'static str, String)> {
        let h = SignedHeaders {
            handle: self.handle.to_string(),
            device: self.device.to_hex(),
            timestamp,
            nonce: nonce.to_owned(),
        };
        let sig = self.key.sign(&canonical_request(method, path_and_query, &h, body));
        vec![
            (HEADER_HANDLE, h.handle),
            (HEADER_DEVICE, h.device),
            (HEADER_TIMESTAMP, timestamp.to_string()),
            (HEADER_NONCE, h.nonce),
            (HEADER_SIGNATURE, STANDARD.encode(sig.as_ref())),
        ]
    }

    /// A signed request with a fresh nonce and the current time.
    pub fn request(&self, method: &str, path_and_query: &str, body: Vec<u8>) -> Request<Body> {
        self.request_with(method, path_and_query, body, now_ms(), &fresh_nonce())
    }

    pub fn request_with(&self, method: &str, pq: &str, body: Vec<u8>, timestamp: u64, nonce: &str) -> Request<Body> {
        let mut b = Request::builder().method(method).uri(pq);
        for (k, v) in self.sign(method, pq, &body, timestamp, nonce) {
            b = b.header(k, v);
        }
        b.header("content-type", "application/json").body(Body::from(body)).expect("request")
    }
}

pub fn fresh_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// A router over a fresh store in a temp dir.
pub struct TestApp {
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn Store>,
    pub state: AppState,
    pub router: Router,
}

impl TestApp {
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("server.db")).expect("store"));
        // Publish key-directory epochs without waiting: tests register a lot.
        let state =
            AppState::new(Arc::clone(&store), limits).with_kt_publish_interval(std::time::Duration::from_millis(5));
        let router = app(state.clone());
        TestApp { dir, store, state, router }
    }

    /// Sends a request; returns the status and the JSON body (Null if none).
    pub async fn call(&self, req: Request<Body>) -> (StatusCode, serde_json::Value) {
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("non-JSON answer {status}: {:?}", String::from_utf8_lossy(&bytes)))
        };
        (status, json)
    }

    /// Adds a new device to `by`'s account, signed by `by`; panics unless it
    /// succeeds.
    pub async fn add_device(&self, by: &TestDevice) -> TestDevice {
        let d = by.sibling();
        let body = serde_json::to_vec(&serde_json::json!({ "device": d.record() })).expect("json");
        let (status, answer) = self.call(by.request("POST", "/v1/devices", body)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        d
    }

    /// Registers a new device; panics unless it succeeds.
    pub async fn register(&self, prefix: &str) -> TestDevice {
        let d = TestDevice::new(prefix);
        let (status, body) = self.call(d.request("POST", "/v1/accounts", d.register_body())).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        d
    }
}

/// Asserts status and error code.
#[track_caller]
pub fn assert_error(got: &(StatusCode, serde_json::Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "body: {}", got.1);
    assert_eq!(got.1["code"], code, "body: {}", got.1);
    assert!(got.1["message"].as_str().is_some_and(|m| !m.is_empty()), "body: {}", got.1);
}

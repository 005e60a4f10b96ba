//! What an operator sees of the real `subrosa-server` binary: its Prometheus
//! endpoint on a listen address of its own, and its JSON log lines, after a
//! message went through it over HTTP and a WebSocket. Neither may carry a
//! handle, a device or conversation id, an address or message content.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use common::{http, register, TestDevice};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use subrosa_proto::ServerFrame;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_subrosa-server");

struct Server {
    spawned: common::Spawned,
    addr: SocketAddr,
    metrics: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// The binary with metrics on a port of its own and JSON logs at debug
/// level (every request logged) into a file.
fn start() -> Server {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("server.log");
    let data = dir.path().join("data");
    let args = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-format", "json", "--data"];
    let mut args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    args.push(data.as_os_str());
    let mut spawned = common::spawn_server(BIN, &args, |cmd| {
        cmd.env("RUST_LOG", "debug").stderr(std::fs::File::create(&log).expect("log file"));
    });
    let mut line = String::new();
    spawned.stdout.read_line(&mut line).expect("metrics line");
    let metrics = line
        .trim()
        .strip_prefix("metrics on http://")
        .and_then(|m| m.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics line: {line:?}"))
        .to_owned();
    let addr = spawned.addr;
    Server { spawned, addr, metrics, log, _dir: dir }
}

/// One scrape: the body, with a reader of one sample's value.
fn scrape(metrics: &str) -> Scrape {
    let mut s = std::net::TcpStream::connect(metrics).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let (_, body) = raw.split_once("\r\n\r\n").expect("head and body");
    Scrape(body.to_owned())
}

struct Scrape(String);

impl Scrape {
    /// The value of the sample named exactly `series` (name and labels).
    fn value(&self, series: &str) -> f64 {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
            .unwrap_or_else(|| panic!("{series} missing:\n{}", self.0))
    }
}

fn send_body(conversation: &str, to: &TestDevice, ciphertext: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let body = json!({
        "conversation": conversation,
        "send_id": hex::encode(rand::random::<[u8; 16]>()),
        "parts": [{ "kind": "application", "recipients": [to.addr()],
                    "ciphertext": base64::engine::general_purpose::STANDARD.encode(ciphertext) }],
    });
    serde_json::to_vec(&body).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_moves_the_counters_and_neither_metrics_nor_json_logs_name_anyone() {
    let mut server = start();
    assert_ne!(server.metrics, server.addr.to_string(), "metrics never share the public address");
    let before = scrape(&server.metrics);
    assert_eq!(before.value("subrosa_messages_total{event=\"stored\"}"), 0.0);

    let alice = register(server.addr, "alice").await;
    let bob = register(server.addr, "bob").await;
    let conversation = hex::encode(rand::random::<[u8; 16]>());
    let content = b"metrics-e2e-plaintext-marker";

    // Bob's socket is open when alice sends: the message is pushed to it.
    let mut req = format!("ws://{}/v1/ws", server.addr).into_client_request().expect("request");
    for (k, v) in bob.sign("GET", "/v1/ws", b"", subrosa_server::now_ms(), &common::fresh_nonce()) {
        req.headers_mut().insert(k, v.parse().expect("header"));
    }
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.expect("upgrade");
    assert_eq!(resp.status(), 101);
    let (status, answer) =
        http(server.addr, alice.request("POST", "/v1/messages", send_body(&conversation, &bob, content))).await;
    assert_eq!(status, 200, "{answer}");
    let id = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame in time");
        if let Message::Text(t) = msg.expect("open").expect("frame") {
            let ServerFrame::Messages { messages } = serde_json::from_str(t.as_str()).expect("frame") else {
                continue;
            };
            assert_eq!(messages[0].ciphertext.as_slice(), content);
            break messages[0].id;
        }
    };
    // A refused send: to a device that does not exist.
    let nobody = TestDevice::new("nobody");
    let (status, _) =
        http(server.addr, alice.request("POST", "/v1/messages", send_body(&conversation, &nobody, content))).await;
    assert_eq!(status, 404);
    // Bob fetches over HTTP too (the same envelope again), then acknowledges.
    let (status, inbox) = http(server.addr, bob.request("GET", "/v1/inbox", Vec::new())).await;
    assert_eq!((status, inbox["messages"][0]["id"].as_u64()), (200, Some(id)), "{inbox}");
    let ack = serde_json::to_vec(&json!({ "ids": [id] })).expect("json");
    assert_eq!(http(server.addr, bob.request("POST", "/v1/inbox/ack", ack)).await.0, 200);

    let after = scrape(&server.metrics);
    let v = |s: &str| after.value(s);
    assert_eq!(v("subrosa_messages_total{event=\"stored\"}"), 1.0);
    assert_eq!(v("subrosa_messages_total{event=\"delivered\"}"), 2.0, "pushed once, fetched once");
    assert_eq!(v("subrosa_messages_total{event=\"acknowledged\"}"), 1.0);
    assert_eq!(v("subrosa_request_outcomes_total{op=\"send\",outcome=\"ok\"}"), 1.0);
    assert_eq!(v("subrosa_request_outcomes_total{op=\"send\",outcome=\"unknown_handle\"}"), 1.0);
    assert_eq!(v("subrosa_request_outcomes_total{op=\"register\",outcome=\"ok\"}"), 2.0);
    assert_eq!(v("subrosa_request_outcomes_total{op=\"fetch\",outcome=\"ok\"}"), 1.0);
    assert_eq!(v("subrosa_request_outcomes_total{op=\"ack\",outcome=\"ok\"}"), 1.0);
    assert_eq!(v("subrosa_request_seconds_count{op=\"send\"}"), 2.0);
    assert_eq!(v("subrosa_request_seconds_bucket{op=\"send\",le=\"+Inf\"}"), 2.0);
    assert_eq!(v("subrosa_request_seconds_count{op=\"fetch\"}"), 1.0);
    assert_eq!(v("subrosa_websockets_opened_total"), 1.0);
    assert_eq!(v("subrosa_websockets_open"), 1.0);
    assert!(v("subrosa_connections_accepted_total") >= 7.0);
    assert_eq!(v("subrosa_inbox_rows"), 0.0, "acknowledged: nothing queued");
    assert!(!after.0.contains("subrosa_db_pool"), "SQLite has no pool to report");

    let ids = [
        alice.handle.to_string(),
        bob.handle.to_string(),
        nobody.handle.to_string(),
        alice.device.to_hex(),
        bob.device.to_hex(),
        conversation.clone(),
        "127.0.0.1".to_owned(),
        String::from_utf8_lossy(content).into_owned(),
    ];
    for id in &ids {
        assert!(!after.0.contains(id.as_str()), "{id} reached the metrics:\n{}", after.0);
    }

    // The logs: stop the server so they are complete, then read them.
    ws.send(Message::Close(None)).await.ok();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &server.spawned.child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
    assert!(server.spawned.child.wait().expect("exit").success());
    let logs = std::fs::read_to_string(&server.log).expect("logs");
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 8, "debug logs every request: {logs}");
    assert!(logs.contains("/v1/messages"), "the send's route template is logged: {logs}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{l}");
    }
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(content);
    // The listening line names the server's own address; nothing else may.
    for needle in ids.iter().filter(|i| i.as_str() != "127.0.0.1").chain([&encoded]) {
        assert!(!logs.contains(needle.as_str()), "content, a handle or an id in the log: {needle}\n{logs}");
    }
}

//! The real `subrosa-server` binary under cheap denial of service: a
//! slowloris from one address, idle keep-alive sockets, and clients behind
//! a trusted reverse proxy. Other loopback addresses (127.0.0.2 …) play the
//! other hosts.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_subrosa-server");

struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().expect("dir");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    let addr = line.trim().strip_prefix("listening on http://").expect("ready line").parse().expect("addr");
    Server { child, addr, _dir: dir }
}

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{from}:0").parse().expect("addr")).expect("bind");
    socket.connect(to).await.expect("connect")
}

/// One request and its whole answer (the server closes after it).
async fn request_from(from: &str, to: SocketAddr, head: &str) -> String {
    let mut s = connect_from(from, to).await;
    s.write_all(head.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// True when the server closes `s` (end of stream or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

const HEALTH: &str = "GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

#[tokio::test]
async fn a_slowloris_from_one_host_neither_holds_sockets_nor_shuts_anyone_out() {
    let server = start(&["--max-connections-per-ip", "20", "--header-timeout", "2s", "--idle-timeout", "30s"]);

    // The attacker opens 60 sockets and trickles header bytes into each.
    let mut held = Vec::new();
    for _ in 0..60 {
        let mut s = connect_from("127.0.0.1", server.addr).await;
        let _ = s.write_all(b"GET /v1/health HTTP/1.1\r\nx-a: ").await;
        held.push(s);
    }
    let started = Instant::now();
    // Beyond its 20, the server closes the attacker's sockets at once
    // (which 20 it keeps depends on the order the accepts ran in).
    let checks: Vec<_> = held
        .into_iter()
        .map(|mut s| tokio::spawn(async move { (closed_within(&mut s, Duration::from_millis(500)).await, s) }))
        .collect();
    let mut kept = Vec::new();
    for c in checks {
        let (closed, s) = c.await.expect("task");
        if !closed {
            kept.push(s);
        }
    }
    assert_eq!(kept.len(), 20, "connections over the per-address cap are closed at once");

    // Meanwhile another host is served promptly.
    let t = Instant::now();
    let answer = request_from("127.0.0.2", server.addr, HEALTH).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "health check from another host: {answer:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "served in {:?}", t.elapsed());

    // The 20 it holds go once the header timeout passes, however slowly
    // they keep trickling.
    let checks: Vec<_> = kept
        .into_iter()
        .map(|mut s| {
            let left = Duration::from_secs(5).saturating_sub(started.elapsed());
            tokio::spawn(async move {
                let _ = s.write_all(b"b").await;
                closed_within(&mut s, left).await
            })
        })
        .collect();
    let mut closed = 0;
    for c in checks {
        if c.await.expect("task") {
            closed += 1;
        }
    }
    assert_eq!(closed, 20, "half-sent requests are dropped after the header timeout");

    // And the attacker's own address is served again once its sockets are gone.
    let answer = request_from("127.0.0.1", server.addr, HEALTH).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_and_an_active_one_is_not() {
    let server = start(&["--idle-timeout", "2s"]);
    let mut idle = connect_from("127.0.0.1", server.addr).await;
    idle.write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.expect("answer");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let mut busy = connect_from("127.0.0.1", server.addr).await;
    for _ in 0..4 {
        busy.write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
        let n = busy.read(&mut buf).await.expect("answer");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "a busy connection stays open");
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    assert!(closed_within(&mut idle, Duration::from_secs(2)).await, "the idle keep-alive socket is closed");
}

/// `GET /v1/links/{id}/response` is unsigned and limited per client
/// address (burst: twice --rate-limit): the bucket it drains says whose
/// address the server saw.
async fn poll_link(from: &str, to: SocketAddr, forwarded_for: &str) -> u16 {
    let head = format!(
        "GET /v1/links/00112233aabb/response HTTP/1.1\r\nhost: x\r\nx-forwarded-for: {forwarded_for}\r\nconnection: close\r\n\r\n"
    );
    let answer = request_from(from, to, &head).await;
    answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn only_a_trusted_proxy_names_the_client_for_rate_limits() {
    let server = start(&["--rate-limit", "1", "--trusted-proxy", "127.0.0.3/32"]);
    let limited = |codes: &[u16]| codes.iter().filter(|&&c| c == 429).count();

    // Through the trusted proxy, each client has a bucket of its own.
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(poll_link("127.0.0.3", server.addr, "203.0.113.1").await);
    }
    assert_eq!(limited(&first[..2]), 0, "{first:?}");
    assert!(limited(&first[2..]) > 0, "the client behind the proxy is limited: {first:?}");
    assert_ne!(poll_link("127.0.0.3", server.addr, "203.0.113.2").await, 429, "another client is not");

    // Anyone else's header is ignored: changing it does not refill the bucket.
    let mut direct = Vec::new();
    for i in 0..4 {
        direct.push(poll_link("127.0.0.4", server.addr, &format!("198.51.100.{i}")).await);
    }
    assert!(limited(&direct[2..]) > 0, "a forged X-Forwarded-For picked a fresh bucket: {direct:?}");
}

/// One application message of `bytes` ciphertext bytes to `to`.
fn message_to(to: &[&common::TestDevice], bytes: usize) -> Vec<u8> {
    use base64::Engine as _;
    let body = serde_json::json!({
        "conversation": hex::encode(rand::random::<[u8; 16]>()),
        "send_id": hex::encode(rand::random::<[u8; 16]>()),
        "parts": [{ "kind": "application", "recipients": to.iter().map(|d| d.addr()).collect::<Vec<_>>(),
                    "ciphertext": base64::engine::general_purpose::STANDARD.encode(vec![7u8; bytes]) }],
    });
    serde_json::to_vec(&body).expect("json")
}

#[tokio::test]
async fn a_device_that_fills_its_quota_is_refused_until_its_messages_are_fetched() {
    let server = start(&["--quota-per-device", "64KiB", "--quota-per-account", "96KiB"]);
    let alice = common::register(server.addr, "alice").await;
    let bob = common::register(server.addr, "bob").await;
    let carol = common::register(server.addr, "carol").await;
    let send = |from: &common::TestDevice, to: &[&common::TestDevice], bytes: usize| {
        let req = from.request("POST", "/v1/messages", message_to(to, bytes));
        common::http(server.addr, req)
    };
    // 60 KiB to two devices counts once; 8 KiB more would pass 64 KiB.
    assert_eq!(send(&alice, &[&bob, &carol], 60 << 10).await.0, 200);
    let (status, body) = send(&alice, &[&bob], 8 << 10).await;
    assert_eq!((status, body["code"].as_str()), (413, Some("quota_exceeded")), "{body}");
    let message = body["message"].as_str().expect("message");
    assert!(message.contains("64 KiB") && !message.contains('\n'), "one clear line: {message}");
    // Other senders are not affected, and small sends still fit.
    assert_eq!(send(&carol, &[&bob], 60 << 10).await.0, 200);
    assert_eq!(send(&alice, &[&bob], 4 << 10).await.0, 200);

    // Bob fetches and acknowledges everything: alice's message to carol
    // still waits, so she is still near her quota.
    let ack_all = |who: &common::TestDevice| {
        let who_req = who.request("GET", "/v1/inbox", Vec::new());
        let server_addr = server.addr;
        async move {
            let (status, inbox) = common::http(server_addr, who_req).await;
            assert_eq!(status, 200, "{inbox}");
            let ids: Vec<u64> =
                inbox["messages"].as_array().expect("messages").iter().map(|m| m["id"].as_u64().expect("id")).collect();
            let body = serde_json::to_vec(&serde_json::json!({ "ids": ids })).expect("json");
            (ids.len(), body)
        }
    };
    let (n, body) = ack_all(&bob).await;
    assert_eq!(n, 3);
    assert_eq!(common::http(server.addr, bob.request("POST", "/v1/inbox/ack", body)).await.0, 200);
    assert_eq!(send(&alice, &[&bob], 8 << 10).await.0, 413, "the 60 KiB carol has not fetched still count");
    let (n, body) = ack_all(&carol).await;
    assert_eq!(n, 1);
    assert_eq!(common::http(server.addr, carol.request("POST", "/v1/inbox/ack", body)).await.0, 200);
    assert_eq!(send(&alice, &[&bob], 60 << 10).await.0, 200, "delivered and acknowledged: free again");

    // The account's quota covers all its devices.
    let alice2 = alice.sibling();
    let add = serde_json::to_vec(&serde_json::json!({ "device": alice2.record() })).expect("json");
    assert_eq!(common::http(server.addr, alice.request("POST", "/v1/devices", add)).await.0, 200);
    let (status, body) = send(&alice2, &[&bob], 40 << 10).await;
    assert_eq!((status, body["code"].as_str()), (413, Some("quota_exceeded")), "{body}");
    assert!(body["message"].as_str().expect("message").contains("account"), "{body}");
    assert_eq!(send(&alice2, &[&bob], 30 << 10).await.0, 200);
}

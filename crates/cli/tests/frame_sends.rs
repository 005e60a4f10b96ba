//! A connected device sends over its socket: `subrosa daemon` (the client
//! handle, one socket for pushes and sends) hands its sends to the server
//! as binary send frames, which the server's metrics count apart from
//! signed HTTP sends; against a server that offers no frames (a proxy
//! strips the header, as a server of today's main ignores it) the same
//! sends go over signed HTTP. Either way the recipient gets each message
//! once.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{BufReader, Read as _, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// `subrosa_sends_total{transport="…"}` from the metrics endpoint.
fn sends(metrics: &str, transport: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(metrics).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let series = format!("subrosa_sends_total{{transport=\"{transport}\"}} ");
    raw.lines()
        .find_map(|l| l.strip_prefix(&series).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in\n{raw}"))
}

/// `subrosa daemon --stdio` and a JSON-RPC client over it.
struct Daemon {
    child: Child,
    rpc: Rpc<BufReader<ChildStdout>, ChildStdin>,
}

impl Daemon {
    fn start(user: &User) -> Daemon {
        let mut child = user
            .cmd(&["daemon", "--stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("daemon starts");
        let write = child.stdin.take().expect("stdin");
        let read = BufReader::new(child.stdout.take().expect("stdout"));
        Daemon { child, rpc: Rpc { read, write, next: 0, seen: Vec::new() } }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.rpc.call(method, params)
    }

    fn wait_connected(&mut self) {
        let up = wait_until(Duration::from_secs(30), || {
            self.call("account", json!({})).get("connected") == Some(&json!(true))
        });
        assert!(up, "the daemon never connected");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// alice's daemon sends three messages to bob through `url`; returns how
/// many sends the server counted over frames and over HTTP meanwhile.
fn daemon_sends(url: &str, metrics: &str) -> (u64, u64) {
    let register = |name: &str| {
        let u = User { name: name.into(), dir: tempfile::tempdir().expect("tempdir") };
        u.ok(&["register", name, "--server", url]);
        u
    };
    let alice = register("alice");
    let bob = register("bob");
    // The conversation exists and every receipt of it is settled first.
    alice.send("bob", "hello");
    assert_eq!(texts(&bob.receive_json(&[])), ["hello"]);
    alice.ok(&["receive"]);

    let (frames_before, http_before) = (sends(metrics, "frame"), sends(metrics, "http"));
    let mut daemon = Daemon::start(&alice);
    daemon.wait_connected();
    for text in ["one", "two", "three"] {
        let sent = daemon.call("send", json!({ "recipient": "bob", "message": text }));
        assert_eq!(sent["state"], "sent", "{sent}");
    }
    let counted = (sends(metrics, "frame") - frames_before, sends(metrics, "http") - http_before);
    drop(daemon);
    // Each arrived, once.
    assert_eq!(texts(&bob.receive_json(&[])), ["one", "two", "three"]);
    counted
}

fn server_with_metrics() -> (Server, String) {
    // Port 0, read back from the server: a port picked here and bound
    // there could be taken meanwhile by another test's server.
    let server = Server::start_with(&["--rate-limit", "0", "--metrics-listen", "127.0.0.1:0"]);
    let metrics = server.metrics.clone().expect("the metrics address");
    (server, metrics)
}

#[test]
fn a_connected_device_sends_over_its_socket() {
    let (server, metrics) = server_with_metrics();
    let (frames, http) = daemon_sends(&server.url, &metrics);
    assert_eq!((frames, http), (3, 0), "(frame sends, HTTP sends) while the daemon sent three messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_frames_the_same_sends_go_over_signed_http() {
    let (server, metrics) = server_with_metrics();
    let upstream: SocketAddr = server.url.trim_start_matches("http://").parse().expect("server address");
    let proxy = format!("http://{}", stripping_proxy(upstream).await);
    let sent = tokio::task::spawn_blocking(move || daemon_sends(&proxy, &metrics)).await.expect("the sends ran");
    drop(server);
    assert_eq!(sent, (0, 3), "(frame sends, HTTP sends) through a server without frames");
}

//! Several `subrosa-server` nodes on one PostgreSQL database, and a database
//! outage. These tests need `SUBROSA_TEST_POSTGRES` (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`); each works in a fresh schema
//! and drops it at the end. Without the variable they pass, saying so.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{call_token, http, register, roster_conversation, TestDevice};
use futures_util::StreamExt as _;
use serde_json::json;
use subrosa_proto::{ConversationId, ErrorCode, ServerFrame};
use subrosa_server::store::postgres::{create_schema, drop_schema};
use subrosa_server::{start, ServerConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_subrosa-server");

/// A fresh schema, dropped on drop (panics included).
struct Schema {
    base: String,
    name: String,
    url: String,
}

impl Schema {
    async fn new() -> Option<Schema> {
        let Ok(base) = std::env::var("SUBROSA_TEST_POSTGRES") else {
            // Straight to stderr: the test harness captures eprintln! of passing tests.
            let test = std::thread::current().name().unwrap_or("a PostgreSQL test").to_string();
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!(
                    "skipped {test}: SUBROSA_TEST_POSTGRES is not set
"
                ),
            );
            return None;
        };
        let name = format!("s_{}", hex::encode(rand::random::<[u8; 6]>()));
        let url = create_schema(&base, &name).await.expect("create schema");
        Some(Schema { base, name, url })
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (base, name) = (self.base.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                let _ = rt.block_on(drop_schema(&base, &name));
            }
        })
        .join();
    }
}

/// A `subrosa-server` process; killed on drop.
struct Node {
    child: Child,
    addr: SocketAddr,
    /// Where its metrics are served, when started with `--metrics-listen`.
    metrics: Option<String>,
    /// The node's data directory (its signed-head mark), removed on drop.
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(database: &str) -> Node {
        Self::start_with(database, &["--rate-limit", "0"])
    }

    fn start_with(database: &str, extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().expect("data dir");
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path())
            .args(["--database", database])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("ready line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("bad ready line {line:?}"))
            .parse()
            .expect("address");
        let metrics = extra.contains(&"--metrics-listen").then(|| {
            line.clear();
            out.read_line(&mut line).expect("metrics line");
            line.trim().strip_prefix("metrics on http://").expect("metrics line").replace("/metrics", "")
        });
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = out.read_to_end(&mut sink);
        });
        Node { child, addr, metrics, _dir: dir }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn send_body(conversation: ConversationId, commit: Option<u64>, to: &TestDevice, ciphertext: &[u8]) -> Vec<u8> {
    let mut body = json!({
        "conversation": conversation.to_hex(),
        "send_id": hex::encode(rand::random::<[u8; 16]>()),
        "parts": [{ "kind": if commit.is_some() { "commit" } else { "application" },
                    "recipients": [to.addr()], "ciphertext": b64(ciphertext) }],
    });
    if let Some(e) = commit {
        body["commit"] = json!({ "epoch": e });
        // Framed as an MLS commit of this conversation in this epoch.
        let mut framed = vec![0x00, 0x01, 0x00, 0x02, 0x10];
        framed.extend_from_slice(conversation.as_bytes());
        framed.extend_from_slice(&e.to_be_bytes());
        framed.push(3);
        framed.extend_from_slice(ciphertext);
        body["parts"][0]["ciphertext"] = json!(b64(&framed));
    }
    serde_json::to_vec(&body).expect("json")
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect_ws(addr: SocketAddr, d: &TestDevice) -> Ws {
    let mut req = format!("ws://{addr}/v1/ws").into_client_request().expect("request");
    for (k, v) in d.sign("GET", "/v1/ws", b"", subrosa_server::now_ms(), &common::fresh_nonce()) {
        req.headers_mut().insert(k, v.parse().expect("header"));
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("upgrade");
    assert_eq!(resp.status(), 101);
    ws
}

async fn next_frame(ws: &mut Ws, within: Duration) -> ServerFrame {
    loop {
        let msg = tokio::time::timeout(within, ws.next()).await.expect("a frame in time");
        match msg.expect("open").expect("frame") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A message posted on node A reaches a socket on node B within a second
/// (LISTEN/NOTIFY, not B's 15 s re-check); a device removed through A has
/// its socket on B closed as promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_on_one_node_reaches_a_socket_on_another() {
    let Some(schema) = Schema::new().await else { return };
    let a = Node::start(&schema.url);
    let b = Node::start(&schema.url);
    let alice = register(a.addr, "alice").await;
    let bob = register(b.addr, "bob").await;

    let mut ws = connect_ws(b.addr, &bob).await;
    // Let the socket subscribe and find its inbox empty.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut latencies = Vec::new();
    for i in 0..5u8 {
        let started = Instant::now();
        let (status, answer) = http(
            a.addr,
            alice.request("POST", "/v1/messages", send_body(ConversationId([i; 16]), None, &bob, &[i; 40])),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let ServerFrame::Messages { messages } = next_frame(&mut ws, Duration::from_secs(5)).await else {
            panic!("expected messages")
        };
        latencies.push(started.elapsed());
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].ciphertext.as_slice(), &[i; 40]);
        assert_eq!(messages[0].sender, alice.addr());
    }
    eprintln!("cross-node push latencies: {latencies:?}");
    for l in &latencies {
        assert!(*l < Duration::from_secs(1), "a cross-node push took {l:?}");
    }

    // A second device of bob's, connected to B, removed through A.
    let bob2 = bob.sibling();
    let body = serde_json::to_vec(&json!({ "device": bob2.record() })).expect("json");
    let (status, answer) = http(a.addr, bob.request("POST", "/v1/devices", body)).await;
    assert_eq!(status, 200, "{answer}");
    let mut ws2 = connect_ws(b.addr, &bob2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let path = format!("/v1/devices/{}", bob2.device.to_hex());
    let (status, answer) = http(a.addr, bob.request("DELETE", &path, vec![])).await;
    assert_eq!(status, 200, "{answer}");
    let ServerFrame::Error(err) = next_frame(&mut ws2, Duration::from_secs(5)).await else {
        panic!("expected an error frame")
    };
    assert_eq!(err.code, ErrorCode::Unauthorized);
    assert!(started.elapsed() < Duration::from_secs(1), "cross-node revocation took {:?}", started.elapsed());
    drop((ws, ws2, a, b));
}

/// Joins the relay at `relay` from a fresh socket with `token`: whether it
/// answered the Join with a challenge and the Prove with `Joined`.
fn relay_accepts(relay: SocketAddr, token: subrosa_proto::relay::Token) -> bool {
    use subrosa_proto::relay::Datagram;
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    // A bound on waiting for an answer that may never come, not a measure.
    s.set_read_timeout(Some(Duration::from_millis(700))).expect("timeout");
    let recv = || {
        let mut buf = [0u8; 2048];
        let n = s.recv(&mut buf).ok()?;
        Datagram::decode(&buf[..n]).ok()
    };
    s.send_to(&Datagram::Join(token).encode(), relay).expect("send");
    let Some(Datagram::Challenge(cookie)) = recv() else { return false };
    s.send_to(&Datagram::Prove { cookie, token }.encode(), relay).expect("send");
    recv() == Some(Datagram::Joined)
}

/// A call relay token issued by one node is accepted by the relay of
/// another node of the same database (the relay key is kept in the
/// database, not made by each process), and by its issuer after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_token_from_one_node_is_accepted_by_another() {
    let Some(schema) = Schema::new().await else { return };
    let with_relay = ["--rate-limit", "0", "--relay-listen", "127.0.0.1:0"];
    let a = Node::start_with(&schema.url, &with_relay);
    let b = Node::start_with(&schema.url, &with_relay);
    let alice = register(a.addr, "alice").await;
    let bob = register(b.addr, "bob").await;
    let call = roster_conversation(a.addr, &alice, &[&alice, &bob]).await;
    let (_, Some((from_a, port_a))) = call_token(a.addr, &alice, &call).await else { panic!("no token from A") };
    let (_, Some((_, port_b))) = call_token(b.addr, &bob, &call).await else { panic!("no token from B") };
    assert_ne!(port_a, port_b, "two relays");
    let relay_b = SocketAddr::from(([127, 0, 0, 1], port_b));
    assert!(relay_accepts(relay_b, from_a), "B's relay refused a token A issued");
    // Still only real tokens: one bit changed and B does not answer.
    let mut forged = from_a;
    forged.0[20] ^= 1;
    assert!(!relay_accepts(relay_b, forged), "B's relay accepted a forged token");
    // A restarted node keeps the key: the token it issued before still works.
    drop(a);
    let a = Node::start_with(&schema.url, &with_relay);
    let (_, Some((_, port_a))) = call_token(a.addr, &alice, &call).await else { panic!("no token from A") };
    assert!(relay_accepts(SocketAddr::from(([127, 0, 0, 1], port_a)), from_a), "a restart voided A's token");
    drop((a, b));
}

/// Concurrent commits for one epoch of one conversation, posted through two
/// nodes: exactly one wins, every other gets `stale_epoch` with the new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_through_two_nodes_one_wins() {
    let Some(schema) = Schema::new().await else { return };
    let nodes = [Node::start(&schema.url), Node::start(&schema.url)];
    let bob = register(nodes[0].addr, "bob").await;
    let conv = ConversationId(rand::random());
    let creator = register(nodes[0].addr, "creator").await;
    let mut members = Vec::new();
    for i in 0..10 {
        members.push(register(nodes[i % 2].addr, "member").await);
    }
    // The racers are members: the creating commit declares them.
    let mut create: serde_json::Value =
        serde_json::from_slice(&send_body(conv, Some(0), &bob, b"create")).expect("json");
    let mut roster = vec![json!(creator.addr()), json!(bob.addr())];
    roster.extend(members.iter().map(|m| json!(m.addr())));
    create["commit"]["members"] = json!(roster);
    let create = serde_json::to_vec(&create).expect("json");
    let (status, answer) = http(nodes[1].addr, creator.request("POST", "/v1/messages", create)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["epoch"], 1);

    let bob = Arc::new(bob);
    let tasks: Vec<_> = members
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let addr = nodes[i % 2].addr;
            let bob = Arc::clone(&bob);
            tokio::spawn(async move {
                http(addr, m.request("POST", "/v1/messages", send_body(conv, Some(1), &bob, b"racing"))).await
            })
        })
        .collect();
    let (mut wins, mut losses) = (0, 0);
    for t in tasks {
        let (status, answer) = t.await.expect("task");
        match status {
            200 => {
                assert_eq!(answer["epoch"], 2);
                wins += 1;
            }
            409 => {
                assert_eq!(answer["code"], "stale_epoch", "{answer}");
                assert_eq!(answer["current_epoch"], 2, "{answer}");
                losses += 1;
            }
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert_eq!((wins, losses), (1, 9));
}

/// A TCP proxy in front of PostgreSQL that the test can cut and restore.
struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// While set, nothing is forwarded: the database looks hung.
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let p = Proxy { addr, target, tasks: Arc::default(), frozen: Arc::default() };
        p.serve(listener);
        p
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (target, tasks, frozen) = (self.target, Arc::clone(&self.tasks), Arc::clone(&self.frozen));
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let frozen = Arc::clone(&frozen);
                let conn = tokio::spawn(async move {
                    if let Ok(server) = tokio::net::TcpStream::connect(target).await {
                        let (mut client_rx, mut client_tx) = client.into_split();
                        let (mut server_rx, mut server_tx) = server.into_split();
                        tokio::select! {
                            () = forward(&mut client_rx, &mut server_tx, &frozen) => {}
                            () = forward(&mut server_rx, &mut client_tx, &frozen) => {}
                        }
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    fn freeze(&self, on: bool) {
        self.frozen.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Refuses new connections and cuts every open one.
    fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Accepts connections again on the same port.
    async fn restore(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot rebind {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(listener);
    }
}

/// Copies one direction, holding the bytes while `frozen`.
async fn forward(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    frozen: &std::sync::atomic::AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// While the database is unreachable, requests answer 503 `unavailable`
/// promptly instead of hanging; once it is back, the node serves again
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_outage_answers_unavailable_and_recovers() {
    let Some(schema) = Schema::new().await else { return };
    let config: tokio_postgres::Config = schema.url.parse().expect("url");
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => {
            eprintln!("skipped: the outage test needs a TCP PostgreSQL URL");
            return;
        }
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let target = tokio::net::lookup_host((host.as_str(), port)).await.expect("resolve").next().expect("address");
    let proxy = Proxy::start(target).await;
    // The same URL with the proxy's address in place of the database's.
    let url = schema.url.replacen(&format!("{host}:{port}"), &proxy.addr.to_string(), 1);
    assert_ne!(url, schema.url, "the test URL must name host:port explicitly");

    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().join("data"));
    cfg.database = Some(url);
    let srv = start(cfg).await.expect("server starts");
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;
    let bob = register(addr, "bob").await;
    let mut ws = connect_ws(addr, &bob).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    proxy.cut();
    let started = Instant::now();
    let (status, answer) = http(addr, alice.request("GET", "/v1/inbox", vec![])).await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["code"], "unavailable", "{answer}");
    assert!(took < Duration::from_secs(10), "an outage answer took {took:?}");
    eprintln!("answer during the outage after {took:?}");

    proxy.restore().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, answer) =
            http(addr, alice.request("POST", "/v1/messages", send_body(ConversationId([9; 16]), None, &bob, b"back")))
                .await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(Instant::now() < deadline, "the node did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Bob's socket stayed open through the outage and gets the message.
    let ServerFrame::Messages { messages } = next_frame(&mut ws, Duration::from_secs(5)).await else {
        panic!("expected messages")
    };
    assert_eq!(messages[0].ciphertext.as_slice(), b"back");
    let (status, answer) = http(addr, bob.request("GET", "/v1/inbox", vec![])).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["messages"].as_array().map(Vec::len), Some(1));
    drop(ws);
    srv.shutdown().await;
}

/// Every database connection of two in-process nodes is terminated
/// (`pg_terminate_backend`), listeners included. The nodes recover by
/// themselves, and a message sent meanwhile still reaches a socket on the
/// other node promptly: the reconnected listener wakes every local socket,
/// since a notification may have been lost while it was away.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_connections_are_replaced_and_no_wake_up_is_lost() {
    let Some(schema) = Schema::new().await else { return };
    let app_name = format!("subrosa_test_{}", schema.name);
    let url = format!("{}&application_name={app_name}", schema.url);
    let node = |dir: &tempfile::TempDir| {
        let mut cfg = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().join("data"));
        cfg.database = Some(url.clone());
        cfg
    };
    let (dir_a, dir_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let a = start(node(&dir_a)).await.expect("node a");
    let b = start(node(&dir_b)).await.expect("node b");
    let alice = register(a.local_addr(), "alice").await;
    let bob = register(b.local_addr(), "bob").await;
    let mut ws = connect_ws(b.local_addr(), &bob).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (admin, conn) = tokio_postgres::connect(&schema.base, tokio_postgres::NoTls).await.expect("admin");
    tokio::spawn(conn);
    let killed = admin
        .query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", &[&app_name])
        .await
        .expect("terminate");
    assert!(killed.len() >= 2, "at least both listeners: {}", killed.len());

    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    loop {
        let body = send_body(ConversationId([3; 16]), None, &bob, b"after the cut");
        let (status, answer) = http(a.local_addr(), alice.request("POST", "/v1/messages", body)).await;
        if status == 200 {
            break;
        }
        assert_eq!((status, answer["code"].as_str()), (503, Some("unavailable")), "{answer}");
        assert!(Instant::now() < deadline, "node a did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ServerFrame::Messages { messages } = next_frame(&mut ws, Duration::from_secs(5)).await else {
        panic!("expected messages")
    };
    assert_eq!(messages[0].ciphertext.as_slice(), b"after the cut");
    eprintln!("delivered across the reconnect after {:?}", started.elapsed());
    drop(ws);
    a.shutdown().await;
    b.shutdown().await;
}

/// A database that stops answering (a black hole, not a refusal): requests
/// answer 503 `unavailable` after the operation timeout instead of hanging,
/// and the node serves again once the database answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_database_times_out_instead_of_hanging() {
    let Some(schema) = Schema::new().await else { return };
    let config: tokio_postgres::Config = schema.url.parse().expect("url");
    let tokio_postgres::config::Host::Tcp(host) = config.get_hosts()[0].clone() else {
        eprintln!("skipped: the outage test needs a TCP PostgreSQL URL");
        return;
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let target = tokio::net::lookup_host((host.as_str(), port)).await.expect("resolve").next().expect("address");
    let proxy = Proxy::start(target).await;
    let url = schema.url.replacen(&format!("{host}:{port}"), &proxy.addr.to_string(), 1);
    assert_ne!(url, schema.url, "the test URL must name host:port explicitly");
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), dir.path().join("data"));
    cfg.database = Some(url);
    let srv = start(cfg).await.expect("server starts");
    let addr = srv.local_addr();
    let alice = register(addr, "alice").await;

    proxy.freeze(true);
    let started = Instant::now();
    let (status, answer) = http(addr, alice.request("GET", "/v1/inbox", vec![])).await;
    let took = started.elapsed();
    eprintln!("answer while the database hung after {took:?}");
    assert_eq!((status, answer["code"].as_str()), (503, Some("unavailable")), "{answer}");
    assert!(took < Duration::from_secs(20), "took {took:?}");

    // The database answers again (its stuck connections are gone).
    proxy.cut();
    proxy.freeze(false);
    proxy.restore().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, answer) = http(addr, alice.request("GET", "/v1/inbox", vec![])).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(Instant::now() < deadline, "the node did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    srv.shutdown().await;
}

/// An operation that waits for its batch first (a shared rate-limit
/// bucket's check does) answers `unavailable` within the one operation
/// timeout (10 s) when the database stalls it: not after the batch wait
/// (5 s) and then a whole timeout more for the same operation alone. Here
/// another session holds the buckets' table locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batched_operation_on_a_stalled_database_answers_within_one_timeout() {
    use subrosa_server::store::{PgStore, Store as _, StoreError, TokenRequest};
    let Some(schema) = Schema::new().await else { return };
    let store = PgStore::connect(&schema.url).await.expect("connects");
    let request = TokenRequest { kind: "test", key: "someone", rate: 1.0, burst: 10.0, cost: 1.0, debt: false };
    assert!(store.take_tokens(&request, subrosa_server::now_ms()).await.expect("answers").is_some());

    let (locker, connection) = tokio_postgres::connect(&schema.url, tokio_postgres::NoTls).await.expect("connect");
    let connection = tokio::spawn(connection);
    locker.batch_execute("BEGIN; LOCK TABLE rate_buckets IN ACCESS EXCLUSIVE MODE").await.expect("lock");
    let started = Instant::now();
    let got = store.take_tokens(&request, subrosa_server::now_ms()).await;
    let took = started.elapsed();
    eprintln!("a batched bucket check on a stalled database answered after {took:?}");
    assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
    assert!(took < Duration::from_secs(13), "took {took:?}: the batch wait, then a whole timeout alone");
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    drop(locker);
    let _ = connection.await;
}

/// Three nodes publish into one key directory at once: every epoch extends
/// the one before (append-only proofs verify end to end, on every node) and
/// every account's proof matches its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_publishing_at_once_keep_one_append_only_directory() {
    use subrosa_proto::kt::{directory_value, KtAudit, KtHead};
    let Some(schema) = Schema::new().await else { return };
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(&schema.url)).collect();
    let registrations = (0..12).map(|i| register(nodes[i % 3].addr, "kt"));
    let devices = futures_util::future::join_all(registrations).await;

    let get = |addr: SocketAddr, path: String| async move {
        let req = axum::http::Request::builder().method("GET").uri(path).body(axum::body::Body::empty()).expect("req");
        http(addr, req).await
    };
    let mut heads = Vec::new();
    for n in &nodes {
        let (status, body) = get(n.addr, "/v1/kt/head".into()).await;
        assert_eq!(status, 200, "{body}");
        heads.push(serde_json::from_value::<KtHead>(body).expect("head"));
    }
    assert!(heads.windows(2).all(|w| w[0] == w[1]), "every node serves the same head: {heads:?}");
    let head = &heads[0];
    // One head-signing key for every node, and one signed head per epoch:
    // every epoch, asked of every node at once, comes back as the same bytes.
    let key = head.signing_key.clone().expect("a signing key").into_inner();
    let signed = subrosa_proto::kt::SignedHead::decode(head.signed.as_ref().expect("signed").as_slice()).expect("head");
    let pinned = subrosa_client::kt::HeadKey {
        key: key.as_slice().try_into().expect("32 bytes"),
        directory_id: signed.directory_id,
    };
    for epoch in 1..=head.epoch {
        let asks = nodes.iter().flat_map(|n| [n.addr, n.addr]).map(|a| get(a, format!("/v1/kt/head?epoch={epoch}")));
        let answers = futures_util::future::join_all(asks).await;
        let mut seen = Vec::new();
        for (status, body) in answers {
            assert_eq!(status, 200, "{body}");
            let h: KtHead = serde_json::from_value(body).expect("head");
            assert_eq!(h.signing_key.as_ref().map(|k| k.as_slice()), Some(key.as_slice()), "one key for all nodes");
            let bytes = h.signed.expect("signed").into_inner();
            let decoded = subrosa_client::kt::verify_signed_head(&pinned, &bytes).expect("validly signed");
            assert_eq!(decoded.epoch, epoch);
            seen.push(bytes);
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "epoch {epoch} was signed more than once");
    }
    assert!((1..=12).contains(&head.epoch), "{} epochs", head.epoch);
    if head.epoch > 1 {
        let (status, body) = get(nodes[1].addr, format!("/v1/kt/audit?from=1&to={}", head.epoch)).await;
        assert_eq!(status, 200, "{body}");
        let audit: KtAudit = serde_json::from_value(body).expect("audit");
        subrosa_client::kt::verify_audit(&audit, audit.from, audit.to).await.expect("the directory only grew");
        assert_eq!(audit.root_hashes.last(), Some(&head.root_hash));
    }
    for (i, d) in devices.iter().enumerate() {
        let (status, body) =
            http(nodes[(i + 1) % 3].addr, d.request("GET", &format!("/v1/accounts/{}", d.handle), vec![])).await;
        assert_eq!(status, 200, "{body}");
        let info: subrosa_proto::AccountInfo = serde_json::from_value(body).expect("account");
        let kt = info.kt.as_ref().expect("a proof");
        let value = directory_value(info.identity_key.as_slice(), &info.devices);
        subrosa_client::kt::verify_lookup_value(head.vrf_public_key.as_slice(), &info.handle, kt, &value)
            .expect("proof verifies");
    }
}

/// Rate limits hold across nodes: one account claiming another's key
/// packages through two nodes in turn meets one limit of 30 (its bucket
/// refills at 30 an hour), not 30 per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_is_shared_by_the_nodes() {
    let Some(schema) = Schema::new().await else { return };
    let nodes = [
        Node::start_with(&schema.url, &["--rate-limit", "1000"]),
        Node::start_with(&schema.url, &["--rate-limit", "1000"]),
    ];
    let alice = register(nodes[0].addr, "alice").await;
    let bob = register(nodes[1].addr, "bob").await;
    let mut limited = [0, 0];
    for i in 0..40 {
        let node = &nodes[i % 2];
        let body = serde_json::to_vec(&json!({ "handle": bob.handle })).expect("json");
        let (status, answer) = http(node.addr, alice.request("POST", "/v1/keypackages/claim", body)).await;
        match status {
            429 => limited[i % 2] += 1,
            404 => assert_eq!(answer["code"], "no_key_package", "{answer}"),
            other => panic!("claim {i}: {other} {answer}"),
        }
    }
    assert_eq!(limited[0] + limited[1], 10, "30 claims in all, whichever node served them: {limited:?}");
    assert!(limited[0] > 0 && limited[1] > 0, "both nodes refuse once the shared bucket is empty: {limited:?}");
}

/// On PostgreSQL the metrics report the node's connection pool (SQLite has
/// none: `tests/metrics.rs` checks that it is absent there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_the_database_pool() {
    let Some(schema) = Schema::new().await else { return };
    let node = Node::start_with(&schema.url, &["--rate-limit", "0", "--metrics-listen", "127.0.0.1:0"]);
    register(node.addr, "alice").await;
    let metrics = node.metrics.as_deref().expect("metrics address");
    let scrape = {
        use std::io::Write as _;
        let mut s = std::net::TcpStream::connect(metrics).expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").expect("write");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("read");
        raw
    };
    let value = |series: &str| -> u64 {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
            .unwrap_or_else(|| panic!("{series} missing:\n{scrape}"))
    };
    let max = value("subrosa_db_pool_max_connections");
    let idle = value("subrosa_db_pool_connections{state=\"idle\"}");
    let busy = value("subrosa_db_pool_connections{state=\"busy\"}");
    assert_eq!(max, 16);
    assert!(idle >= 1, "the registration's connection went back to the pool:\n{scrape}");
    assert!(idle + busy <= max);
    assert_eq!(value("subrosa_db_pool_waiting"), 0);
    assert_eq!(value("subrosa_devices"), 1);
}

//! `load`: the load benchmark against a real `subrosa-server` process.
//!
//! Each simulated device has a real identity and device key
//! (`DeviceIdentity::generate`, as the client makes them), registers with a
//! signed `POST /v1/accounts` and opens the signed WebSocket. Then, by
//! `--paths` (both by default, each against a fresh server, so that one
//! command prints the old path as the baseline beside the new):
//! - `http`: sends with signed `POST /v1/messages` and acknowledges pushed
//!   JSON envelopes over the socket;
//! - `frames`: asks the upgrade for binary frames, signs the socket's
//!   challenge, then sends, receives and acknowledges as binary frames on
//!   the socket (`subrosa_proto::frames`).
//!
//! The devices do no MLS: each message is an opaque 200-byte "ciphertext",
//! which the server cannot tell from a real one.
//!
//! Registrations come from many loopback source addresses (127.0.1.x): the
//! server limits registrations per client IP (300 a minute), as devices of
//! a real deployment come from many addresses.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use futures_util::future::BoxFuture;
use futures_util::{SinkExt as _, StreamExt as _};
use subrosa_core::{DefaultCrypto, DeviceIdentity};
use subrosa_proto::frames::{self, ClientBin, FrameSend, ServerBin, HEADER_CHALLENGE, HEADER_FRAMES};
use subrosa_proto::{
    canonical_request, ClientFrame, ConversationId, DeviceAddress, DeviceRecord, Handle, MessageKind, RegisterRequest,
    SendId, SendPart, SendRequest, ServerFrame, SignedHeaders, B64, HEADER_DEVICE, HEADER_HANDLE, HEADER_NONCE,
    HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use tokio::io::AsyncBufReadExt as _;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::loadgen::{self, LoadOptions, Sink, Target};

/// Registrations per source address (the server allows a burst of 300 per IP).
const REGISTRATIONS_PER_ADDRESS: usize = 250;

/// Where the server comes from.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerOptions {
    /// Use this running server (http://HOST:PORT) instead of spawning one; needs --server-pid.
    #[arg(long, requires = "server_pid")]
    pub server: Option<String>,
    /// Process id of the server given by --server (for CPU and memory).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The server binary to spawn (default: subrosa-server next to this binary).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Extra argument for the spawned server, repeatable (e.g. --server-arg=--database --server-arg=postgres://…).
    #[arg(long, allow_hyphen_values = true)]
    pub server_arg: Vec<String>,
    /// Spawn this many server nodes on one PostgreSQL database (give it
    /// with --server-arg=--database …); device i talks to node i mod N, so
    /// most messages cross nodes. CPU and memory are the nodes' sum.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub nodes: u32,
}

/// How the load generator's devices send and acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Path {
    /// Signed `POST /v1/messages`; JSON pushes and acknowledgements.
    Http,
    /// Binary frames on the authenticated socket.
    Frames,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Http => "http",
            Path::Frames => "frames",
        }
    }
}

/// A `subrosa-server` child process with a temporary data directory.
pub(crate) struct SpawnedServer {
    child: tokio::process::Child,
    pub(crate) url: String,
    // Deleted when the run ends.
    _dir: tempfile::TempDir,
}

impl SpawnedServer {
    pub(crate) async fn start(o: &ServerOptions) -> anyhow::Result<Self> {
        let bin = match &o.server_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe().context("cannot find this binary")?.with_file_name("subrosa-server"),
        };
        anyhow::ensure!(
            bin.exists(),
            "{} not found: build it (cargo build --release -p subrosa-server) or pass --server-bin",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("subrosa-load-")
            .tempdir()
            .context("cannot create a temporary data directory")?;
        let log = std::fs::File::create(dir.path().join("server.log")).context("cannot create the server log")?;
        // Every device of the benchmark connects from one address: the
        // per-address connection cap (a denial-of-service defence) would
        // refuse all but the first few hundred, so it is lifted here unless
        // the caller set it.
        let cap: &[&str] = if o.server_arg.iter().any(|a| a.starts_with("--max-connections-per-ip")) {
            &[]
        } else {
            &["--max-connections-per-ip", "1000000"]
        };
        let mut child = tokio::process::Command::new(&bin)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data")
            .arg(dir.path().join("data"))
            .args(cap)
            .args(&o.server_arg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stdout = child.stdout.take().context("no server stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("the server did not announce its address within 60 s")?
            .context("cannot read the server's output")?;
        let Some(url) = line.as_deref().and_then(|l| l.strip_prefix("listening on ")) else {
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            bail!("the server did not start: {}", log.lines().last().unwrap_or("no output"));
        };
        println!(
            "server: {} {} (pid {}), data in {}",
            bin.display(),
            o.server_arg.join(" "),
            child.id().unwrap_or(0),
            dir.path().display()
        );
        Ok(SpawnedServer { url: url.trim_end_matches('/').to_owned(), child, _dir: dir })
    }

    pub(crate) async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // Graceful: SIGTERM through kill(1), as `unsafe` is not allowed here.
            let _ = tokio::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_ok() {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

struct Device {
    id: DeviceIdentity,
    addr: DeviceAddress,
    /// The node it talks to (index into `SubrosaTarget::bases`).
    node: usize,
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type WsWriter = futures_util::stream::SplitSink<WsStream, WsMessage>;
/// Sends waiting for their answer on one socket, by request number.
type Pending = Mutex<HashMap<u32, tokio::sync::oneshot::Sender<Result<(), String>>>>;

/// One connected device.
struct Conn {
    reader: tokio::task::AbortHandle,
    link: Arc<Link>,
}

/// The writing half of a device's socket, shared by its reader (which
/// acknowledges) and its sends (binary frames).
struct Link {
    binary: bool,
    writer: tokio::sync::Mutex<WsWriter>,
    next: std::sync::atomic::AtomicU32,
    pending: Pending,
}

impl Link {
    async fn write(&self, msg: WsMessage) -> anyhow::Result<()> {
        self.writer.lock().await.send(msg).await.context("writing to the socket")
    }

    async fn ack(&self, ids: Vec<u64>) -> anyhow::Result<()> {
        if self.binary {
            self.write(WsMessage::Binary(ClientBin::Ack(ids).encode().context("encode ack")?.into())).await
        } else {
            let ack = serde_json::to_string(&ClientFrame::Ack { ids }).context("encode ack")?;
            self.write(WsMessage::Text(ack.into())).await
        }
    }

    fn answer(&self, request: u32, result: Result<(), String>) {
        if let Some(w) = loadgen_lock(&self.pending).remove(&request) {
            let _ = w.send(result);
        }
    }
}

/// Reads one device's socket until it closes: delivers and acknowledges
/// pushed envelopes, and hands each send's answer to its waiter.
async fn read_loop(
    mut reader: futures_util::stream::SplitStream<WsStream>,
    link: Arc<Link>,
    sink: Arc<Sink>,
    who: String,
) {
    while let Some(msg) = reader.next().await {
        let messages = match msg {
            Ok(WsMessage::Text(text)) => match serde_json::from_str::<ServerFrame>(text.as_str()) {
                Ok(ServerFrame::Messages { messages }) => messages,
                Ok(ServerFrame::Error(e)) => {
                    eprintln!("{who}: server closed the socket: {}", e.message);
                    break;
                }
                Err(_) => {
                    eprintln!("{who}: malformed frame from the server");
                    break;
                }
            },
            Ok(WsMessage::Binary(bytes)) if link.binary => match ServerBin::decode(&bytes) {
                Ok(ServerBin::Messages(messages)) => messages,
                Ok(ServerBin::Sent { request, .. }) => {
                    link.answer(request, Ok(()));
                    continue;
                }
                Ok(ServerBin::Refused { request, error }) => {
                    link.answer(request, Err(format!("{}: {}", error.code.as_str(), error.message)));
                    continue;
                }
                Err(_) => {
                    eprintln!("{who}: malformed binary frame from the server");
                    break;
                }
            },
            Ok(WsMessage::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let ids = messages.iter().map(|m| m.id).collect();
        for m in &messages {
            sink.delivered(m.ciphertext.as_slice());
        }
        if link.ack(ids).await.is_err() {
            break;
        }
    }
    // Sends still waiting will not be answered on this socket.
    for (_, w) in loadgen_lock(&link.pending).drain() {
        let _ = w.send(Err("the socket closed".into()));
    }
}

/// The Subrosa side of the load benchmark.
pub struct SubrosaTarget {
    /// One base URL per node; device i uses `bases[i % len]`.
    bases: Vec<String>,
    path: Path,
    http: reqwest::Client,
    registration_clients: Vec<reqwest::Client>,
    devices: Vec<Device>,
    sockets: Mutex<HashMap<usize, Conn>>,
    crypto: DefaultCrypto,
    pids: Vec<u32>,
}

impl std::fmt::Debug for SubrosaTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubrosaTarget").field("bases", &self.bases).finish_non_exhaustive()
    }
}

fn http_client(local: Option<std::net::IpAddr>) -> anyhow::Result<reqwest::Client> {
    // reqwest is built without a default TLS provider; plain http still needs one set.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder()
        .local_address(local)
        .pool_max_idle_per_host(usize::MAX)
        .timeout(Duration::from_secs(120))
        .build()
        .context("cannot build the HTTP client")
}

impl SubrosaTarget {
    fn new(bases: Vec<String>, path: Path, pids: Vec<u32>, count: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(!bases.is_empty(), "no server to talk to");
        let crypto = subrosa_core::default_crypto();
        let run = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let now = subrosa_server::now_ms();
        let devices = (0..count)
            .map(|i| {
                let handle = Handle::new(&format!("l{run}d{i}")).context("benchmark handle")?;
                let id = DeviceIdentity::generate(&crypto, handle, now).context("cannot generate a device key")?;
                Ok(Device { addr: id.address(), id, node: i % bases.len().max(1) })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let addresses = count.div_ceil(REGISTRATIONS_PER_ADDRESS).clamp(1, 250);
        let registration_clients = (0..addresses)
            .map(|k| http_client(Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 1, (k + 1) as u8)))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(SubrosaTarget {
            bases,
            path,
            http: http_client(None)?,
            registration_clients,
            devices,
            sockets: Mutex::new(HashMap::new()),
            crypto,
            pids,
        })
    }

    fn device(&self, i: usize) -> anyhow::Result<&Device> {
        self.devices.get(i).with_context(|| format!("no device {i}"))
    }

    /// The node device `d` talks to.
    fn base(&self, d: &Device) -> &str {
        &self.bases[d.node]
    }

    /// The five signature headers for one request by device `i`.
    fn sign(&self, d: &Device, method: &str, path: &str, body: &[u8]) -> anyhow::Result<Vec<(&'static str, String)>> {
        let h = SignedHeaders {
            handle: d.addr.handle.to_string(),
            device: d.addr.device.to_hex(),
            timestamp: subrosa_server::now_ms(),
            nonce: hex::encode(rand::random::<[u8; 16]>()),
        };
        let sig =
            d.id.sign_with_device(&self.crypto, &canonical_request(method, path, &h, body))
                .context("cannot sign a request")?;
        Ok(vec![
            (HEADER_HANDLE, h.handle),
            (HEADER_DEVICE, h.device),
            (HEADER_TIMESTAMP, h.timestamp.to_string()),
            (HEADER_NONCE, h.nonce),
            (HEADER_SIGNATURE, base64::engine::general_purpose::STANDARD.encode(sig)),
        ])
    }

    async fn post(&self, client: &reqwest::Client, d: &Device, path: &str, body: Vec<u8>) -> anyhow::Result<u16> {
        let headers = self.sign(d, "POST", path, &body)?;
        let mut req = client.post(format!("{}{path}", self.base(d))).header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = req.body(body).send().await.with_context(|| format!("POST {path}"))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(status.as_u16());
        }
        let text = resp.text().await.unwrap_or_default();
        bail!("POST {path}: {status} {}", text.chars().take(200).collect::<String>())
    }
}

/// A conversation id per unordered pair of devices, as a 1:1 conversation would have.
fn conversation(a: usize, b: usize) -> ConversationId {
    let (lo, hi) = (a.min(b) as u64, a.max(b) as u64);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&lo.to_le_bytes());
    id[8..].copy_from_slice(&hi.to_le_bytes());
    ConversationId(id)
}

impl Target for SubrosaTarget {
    fn register(&self, i: usize) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let d = self.device(i)?;
            let req = RegisterRequest {
                handle: d.addr.handle.clone(),
                identity_key: B64(d.id.identity_public().to_vec()),
                device: DeviceRecord {
                    device_id: d.addr.device,
                    signature_key: B64(d.id.device_public().to_vec()),
                    certificate: B64(d.id.certificate().to_bytes().context("certificate")?),
                },
            };
            let body = serde_json::to_vec(&req).context("encode registration")?;
            let client = &self.registration_clients[i % self.registration_clients.len()];
            self.post(client, d, "/v1/accounts", body).await.with_context(|| format!("registering {}", d.addr))?;
            Ok(())
        })
    }

    fn connect(&self, i: usize, sink: Arc<Sink>) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let d = self.device(i)?;
            let url = format!("{}/v1/ws", self.base(d).replacen("http", "ws", 1));
            let mut req = url.into_client_request().context("WebSocket URL")?;
            for (k, v) in self.sign(d, "GET", "/v1/ws", b"")? {
                req.headers_mut().insert(k, v.parse().context("header value")?);
            }
            if self.path == Path::Frames {
                req.headers_mut().insert(HEADER_FRAMES, "1".parse().context("header value")?);
            }
            // Small buffers: 10,000 sockets live in this process too.
            let config = WebSocketConfig::default().read_buffer_size(8 * 1024).write_buffer_size(0);
            let (ws, resp) = tokio_tungstenite::connect_async_with_config(req, Some(config), true)
                .await
                .with_context(|| format!("WebSocket of {}", d.addr))?;
            let (mut writer, reader) = ws.split();
            let binary = self.path == Path::Frames;
            if binary {
                let challenge = resp
                    .headers()
                    .get(HEADER_CHALLENGE)
                    .and_then(|v| hex::decode(v.as_bytes()).ok())
                    .and_then(|c| <[u8; frames::CHALLENGE_LEN]>::try_from(c).ok())
                    .context("the server offered no binary frames (an older server? use --paths http)")?;
                let sig =
                    d.id.sign_with_device(&self.crypto, &frames::auth_message(&challenge, &d.addr))
                        .context("cannot sign the challenge")?;
                let sig = <[u8; frames::SIGNATURE_LEN]>::try_from(sig.as_slice()).context("signature length")?;
                let auth = ClientBin::Auth(sig).encode().context("encode auth")?;
                writer.send(WsMessage::Binary(auth.into())).await.context("sending the challenge's signature")?;
            }
            let link = Arc::new(Link {
                binary,
                writer: tokio::sync::Mutex::new(writer),
                next: std::sync::atomic::AtomicU32::new(0),
                pending: Mutex::new(HashMap::new()),
            });
            let task = tokio::spawn(read_loop(reader, Arc::clone(&link), sink, d.addr.to_string()));
            let conn = Conn { reader: task.abort_handle(), link };
            if let Some(old) = loadgen_lock(&self.sockets).insert(i, conn) {
                old.reader.abort();
            }
            Ok(())
        })
    }

    fn disconnect(&self, i: usize) {
        if let Some(c) = loadgen_lock(&self.sockets).remove(&i) {
            c.reader.abort();
        }
    }

    fn send(&self, from: usize, to: usize, mut body: Vec<u8>) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let d = self.device(from)?;
            let recipient = self.device(to)?.addr.clone();
            // Opaque bytes after the timing header, as a ciphertext would be.
            let header = body.len().min(32);
            rand::Rng::fill(&mut rand::thread_rng(), &mut body[header..]);
            let conversation = conversation(from, to);
            let send_id = SendId(rand::random());
            let parts =
                vec![SendPart { kind: MessageKind::Application, recipients: vec![recipient], ciphertext: B64(body) }];
            if self.path == Path::Frames {
                let link = loadgen_lock(&self.sockets)
                    .get(&from)
                    .map(|c| Arc::clone(&c.link))
                    .with_context(|| format!("device {from} is not connected"))?;
                let request = link.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (tx, rx) = tokio::sync::oneshot::channel();
                loadgen_lock(&link.pending).insert(request, tx);
                let frame = ClientBin::Send(FrameSend { request, conversation, send_id, expires_at: None, parts });
                link.write(WsMessage::Binary(frame.encode().context("encode send")?.into())).await?;
                return match rx.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => bail!("send frame: {e}"),
                    Err(_) => bail!("send frame: the socket closed"),
                };
            }
            let req = SendRequest { conversation, send_id, commit: None, parts, expires_at: None };
            let bytes = serde_json::to_vec(&req).context("encode send")?;
            self.post(&self.http, d, "/v1/messages", bytes).await?;
            Ok(())
        })
    }

    fn barrier(&self, _from: usize) -> BoxFuture<'_, anyhow::Result<()>> {
        // A send is answered only once durably stored.
        Box::pin(async { Ok(()) })
    }

    fn server_pids(&self) -> Vec<u32> {
        self.pids.clone()
    }
}

fn loadgen_lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `subrosa-bench load`.
pub async fn run(o: &LoadOptions, s: &ServerOptions, paths: &[Path]) -> anyhow::Result<()> {
    let nofile = loadgen::raise_nofile();
    let needed = o.registered() + 200;
    anyhow::ensure!(
        nofile as usize >= needed,
        "the open-files limit is {nofile}, {needed} are needed: raise the hard limit (ulimit -Hn)"
    );
    anyhow::ensure!(!paths.is_empty(), "--paths needs at least one of http, frames");
    anyhow::ensure!(
        s.nodes == 1 || (s.server.is_none() && s.server_arg.iter().any(|a| a.contains("postgres"))),
        "--nodes needs spawned servers on one PostgreSQL database (--server-arg=--database --server-arg=postgres://…)"
    );
    anyhow::ensure!(
        s.server.is_none() || paths.len() == 1,
        "with --server, give one --paths (each path needs a fresh server)"
    );
    let mut all = Vec::new();
    for (k, &path) in paths.iter().enumerate() {
        if k > 0 {
            println!();
        }
        println!("== path: {} ==", path.name());
        let results = run_path(o, s, path, nofile).await?;
        // The last path's figures go to --json (compare.sh sets them beside
        // ejabberd's); earlier ones beside it, named by path.
        let json = match (&o.json, k + 1 == paths.len()) {
            (Some(p), false) => Some(p.with_extension(format!("{}.json", path.name()))),
            (p, _) => p.clone(),
        };
        loadgen::write_json(&results, &LoadOptions { json, ..o.clone() })?;
        all.push((path, results));
    }
    if all.len() > 1 {
        print_paths(&all);
    }
    Ok(())
}

/// The paths' figures side by side, the first as the baseline.
fn print_paths(all: &[(Path, loadgen::Results)]) {
    let Some((base_path, base)) = all.first() else { return };
    println!();
    println!("before/after, against the {} path (ratio = path / {}):", base_path.name(), base_path.name());
    type Figure = fn(&loadgen::Results) -> Option<f64>;
    let figures: [(&str, Figure); 7] = [
        ("saturation: delivered msgs/s", |r| r.saturation.as_ref().map(|t| t.delivered_per_s)),
        ("saturation: server CPU µs/msg", |r| r.saturation.as_ref().map(|t| t.server_cpu_us_per_msg)),
        ("saturation: p99 ms", |r| r.saturation.as_ref().map(|t| t.p99_ms)),
        ("open loop: p99 ms", |r| r.open_loop.as_ref().map(|t| t.p99_ms)),
        ("open loop: server CPU µs/msg", |r| r.open_loop.as_ref().map(|t| t.server_cpu_us_per_msg)),
        ("deep queue: store msgs/s", |r| r.deep.as_ref().map(|d| d.store_per_s)),
        ("deep queue: drain msgs/s", |r| r.deep.as_ref().map(|d| d.drain_per_s)),
    ];
    for (what, f) in figures {
        let mut line = format!("{what:<34} {:>10}", f(base).map_or("-".into(), |v| format!("{v:.1}")));
        for (path, r) in &all[1..] {
            let (v, b) = (f(r), f(base));
            let ratio = match (v, b) {
                (Some(v), Some(b)) if b != 0.0 => format!("{:.2}x", v / b),
                _ => "-".into(),
            };
            line += &format!("   {}: {:>10} ({ratio})", path.name(), v.map_or("-".into(), |v| format!("{v:.1}")));
        }
        println!("{line}");
    }
}

async fn run_path(o: &LoadOptions, s: &ServerOptions, path: Path, nofile: u64) -> anyhow::Result<loadgen::Results> {
    let (spawned, bases, pids) = match &s.server {
        Some(url) => {
            let pid = s.server_pid.context("--server needs --server-pid")?;
            println!("server: {url} (external, pid {pid})");
            (Vec::new(), vec![url.trim_end_matches('/').to_owned()], vec![pid])
        }
        None => {
            let (mut spawned, mut bases, mut pids) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..s.nodes {
                let server = SpawnedServer::start(s).await?;
                pids.push(server.child.id().context("the server exited")?);
                bases.push(server.url.clone());
                spawned.push(server);
            }
            (spawned, bases, pids)
        }
    };
    let backend = match s.server_arg.iter().position(|a| a == "--database") {
        Some(k) => s.server_arg.get(k + 1).and_then(|u| u.split(':').next()).unwrap_or("?").to_owned(),
        None => match s.server_arg.iter().find_map(|a| a.strip_prefix("--database=")) {
            Some(u) => u.split(':').next().unwrap_or("?").to_owned(),
            None if s.server.is_some() => "external".to_owned(),
            None => "sqlite".to_owned(),
        },
    };
    println!(
        "devices: {} connected ({} registered), concurrency {}, {}-byte messages, open files {nofile}",
        o.devices,
        o.registered() + 1,
        o.concurrency,
        loadgen::MESSAGE_BYTES
    );
    let nodes = bases.len();
    let target = Arc::new(SubrosaTarget::new(bases, path, pids, o.registered() + 1)?);
    let name = match nodes {
        1 => format!("subrosa ({backend}, {})", path.name()),
        n => format!("subrosa ({backend}, {n} nodes, {})", path.name()),
    };
    let result = loadgen::run(Arc::clone(&target), &name, o).await;
    for i in 0..=o.registered() {
        target.disconnect(i);
    }
    for server in spawned {
        server.stop().await;
    }
    result
}

//! `load`: the load benchmark against a real `subrosa-server` process.
//!
//! Each simulated device has a real identity and device key
//! (`DeviceIdentity::generate`, as the client makes them), registers with a
//! signed `POST /v1/accounts`, opens the signed WebSocket, sends with signed
//! `POST /v1/messages` and acknowledges pushed envelopes over the socket, as
//! `subrosa-client` does. The devices do no MLS: each message is an opaque
//! 200-byte "ciphertext", which the server cannot tell from a real one.
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
}

/// The Subrosa side of the load benchmark.
pub struct SubrosaTarget {
    base: String,
    http: reqwest::Client,
    registration_clients: Vec<reqwest::Client>,
    devices: Vec<Device>,
    sockets: Mutex<HashMap<usize, tokio::task::AbortHandle>>,
    crypto: DefaultCrypto,
    pid: u32,
}

impl std::fmt::Debug for SubrosaTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubrosaTarget").field("base", &self.base).finish_non_exhaustive()
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
    fn new(base: String, pid: u32, count: usize) -> anyhow::Result<Self> {
        let crypto = subrosa_core::default_crypto();
        let run = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let now = subrosa_server::now_ms();
        let devices = (0..count)
            .map(|i| {
                let handle = Handle::new(&format!("l{run}d{i}")).context("benchmark handle")?;
                let id = DeviceIdentity::generate(&crypto, handle, now).context("cannot generate a device key")?;
                Ok(Device { addr: id.address(), id })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let addresses = count.div_ceil(REGISTRATIONS_PER_ADDRESS).clamp(1, 250);
        let registration_clients = (0..addresses)
            .map(|k| http_client(Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 1, (k + 1) as u8)))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(SubrosaTarget {
            base,
            http: http_client(None)?,
            registration_clients,
            devices,
            sockets: Mutex::new(HashMap::new()),
            crypto,
            pid,
        })
    }

    fn device(&self, i: usize) -> anyhow::Result<&Device> {
        self.devices.get(i).with_context(|| format!("no device {i}"))
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
        let mut req = client.post(format!("{}{path}", self.base)).header("content-type", "application/json");
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
            let url = format!("{}/v1/ws", self.base.replacen("http", "ws", 1));
            let mut req = url.into_client_request().context("WebSocket URL")?;
            for (k, v) in self.sign(d, "GET", "/v1/ws", b"")? {
                req.headers_mut().insert(k, v.parse().context("header value")?);
            }
            // Small buffers: 10,000 sockets live in this process too.
            let config = WebSocketConfig::default().read_buffer_size(8 * 1024).write_buffer_size(0);
            let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true)
                .await
                .with_context(|| format!("WebSocket of {}", d.addr))?;
            let who = d.addr.to_string();
            let task = tokio::spawn(async move {
                while let Some(msg) = ws.next().await {
                    let text = match msg {
                        Ok(WsMessage::Text(t)) => t,
                        Ok(WsMessage::Close(_)) | Err(_) => break,
                        Ok(_) => continue,
                    };
                    match serde_json::from_str::<ServerFrame>(text.as_str()) {
                        Ok(ServerFrame::Messages { messages }) => {
                            let ids = messages.iter().map(|m| m.id).collect();
                            for m in &messages {
                                sink.delivered(m.ciphertext.as_slice());
                            }
                            let ack = serde_json::to_string(&ClientFrame::Ack { ids }).unwrap_or_default();
                            if ws.send(WsMessage::Text(ack.into())).await.is_err() {
                                break;
                            }
                        }
                        Ok(ServerFrame::Error(e)) => {
                            eprintln!("{who}: server closed the socket: {}", e.message);
                            break;
                        }
                        Err(_) => {
                            eprintln!("{who}: malformed frame from the server");
                            break;
                        }
                    }
                }
            });
            if let Some(old) = loadgen_lock(&self.sockets).insert(i, task.abort_handle()) {
                old.abort();
            }
            Ok(())
        })
    }

    fn disconnect(&self, i: usize) {
        if let Some(h) = loadgen_lock(&self.sockets).remove(&i) {
            h.abort();
        }
    }

    fn send(&self, from: usize, to: usize, mut body: Vec<u8>) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let d = self.device(from)?;
            let recipient = self.device(to)?.addr.clone();
            // Opaque bytes after the timing header, as a ciphertext would be.
            let header = body.len().min(32);
            rand::Rng::fill(&mut rand::thread_rng(), &mut body[header..]);
            let req = SendRequest {
                conversation: conversation(from, to),
                send_id: SendId(rand::random()),
                commit: None,
                parts: vec![SendPart {
                    kind: MessageKind::Application,
                    recipients: vec![recipient],
                    ciphertext: B64(body),
                }],
                expires_at: None,
            };
            let bytes = serde_json::to_vec(&req).context("encode send")?;
            self.post(&self.http, d, "/v1/messages", bytes).await?;
            Ok(())
        })
    }

    fn barrier(&self, _from: usize) -> BoxFuture<'_, anyhow::Result<()>> {
        // A send is answered only once durably stored.
        Box::pin(async { Ok(()) })
    }

    fn server_pid(&self) -> u32 {
        self.pid
    }
}

fn loadgen_lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `subrosa-bench load`.
pub async fn run(o: &LoadOptions, s: &ServerOptions) -> anyhow::Result<()> {
    let nofile = loadgen::raise_nofile();
    let needed = o.registered() + 200;
    anyhow::ensure!(
        nofile as usize >= needed,
        "the open-files limit is {nofile}, {needed} are needed: raise the hard limit (ulimit -Hn)"
    );
    let (spawned, base, pid) = match &s.server {
        Some(url) => {
            let pid = s.server_pid.context("--server needs --server-pid")?;
            println!("server: {url} (external, pid {pid})");
            (None, url.trim_end_matches('/').to_owned(), pid)
        }
        None => {
            let server = SpawnedServer::start(s).await?;
            let pid = server.child.id().context("the server exited")?;
            let url = server.url.clone();
            (Some(server), url, pid)
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
    let target = Arc::new(SubrosaTarget::new(base, pid, o.registered() + 1)?);
    let result = loadgen::run(Arc::clone(&target), &format!("subrosa ({backend})"), o).await;
    for i in 0..=o.registered() {
        target.disconnect(i);
    }
    if let Some(server) = spawned {
        server.stop().await;
    }
    loadgen::write_json(&result?, o)
}

//! `xmpp`: the same load benchmark against an XMPP server (ejabberd, set up
//! by `bench/ejabberd/setup.sh`), over raw XMPP on TCP.
//!
//! Each device is a user registered in-band (XEP-0077). A connection does
//! what a minimal real client does: stream header, SASL PLAIN, stream
//! restart, resource bind, session, initial presence. Messages are `<message
//! type='chat'>` stanzas to the recipient's bare JID with a 200-byte body.
//! The reader is a small scanner for top-level stanzas (this server's own
//! output, one stream per socket), cheap enough that the generator is not
//! the bottleneck; its CPU is printed beside the server's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use futures_util::future::BoxFuture;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::loadgen::{self, LoadOptions, Sink, Target};

/// Where the XMPP server is.
#[derive(Debug, Clone, clap::Args)]
pub struct XmppOptions {
    /// Client-to-server address.
    #[arg(long, default_value = "127.0.0.1:5222")]
    pub address: String,
    /// The XMPP domain of the users.
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// Server process id (default: the beam.smp process running ejabberd).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Label of the server in the figures.
    #[arg(long, default_value = "ejabberd")]
    pub label: String,
}

const STREAM_NS: &str = "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'";
const PASSWORD: &str = "bench-password";
/// Longest time one set-up step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

struct Conn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pings: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>,
    task: tokio::task::AbortHandle,
}

/// The XMPP side of the load benchmark.
pub struct XmppTarget {
    address: String,
    domain: String,
    prefix: String,
    conns: Mutex<HashMap<usize, Arc<Conn>>>,
    pid: u32,
}

impl std::fmt::Debug for XmppTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XmppTarget").field("address", &self.address).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A stream during set-up: reads until a predicate finds what it waits for.
struct Setup {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    buf: Vec<u8>,
}

impl Setup {
    async fn open(address: &str, domain: &str) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(address).await.with_context(|| format!("cannot connect to {address}"))?;
        tcp.set_nodelay(true).context("TCP_NODELAY")?;
        let (read, write) = tcp.into_split();
        let mut s = Setup { read, write, buf: Vec::with_capacity(4096) };
        s.restart(domain).await?;
        Ok(s)
    }

    /// Opens (or reopens after SASL) the stream and waits for the features.
    async fn restart(&mut self, domain: &str) -> anyhow::Result<()> {
        self.buf.clear();
        self.send(&format!("<?xml version='1.0'?><stream:stream to='{domain}' {STREAM_NS}>")).await?;
        self.until(|b| find(b, b"</stream:features>").map(|p| p + 18)).await?;
        Ok(())
    }

    async fn send(&mut self, s: &str) -> anyhow::Result<()> {
        self.write.write_all(s.as_bytes()).await.context("cannot write to the XMPP server")
    }

    /// Reads until `done` returns the end of what it waited for; consumes up to there.
    async fn until(&mut self, done: impl Fn(&[u8]) -> Option<usize>) -> anyhow::Result<Vec<u8>> {
        let step = async {
            loop {
                if let Some(end) = done(&self.buf) {
                    let got: Vec<u8> = self.buf.drain(..end).collect();
                    return Ok(got);
                }
                if find(&self.buf, b"</stream:stream>").is_some() || find(&self.buf, b"<stream:error").is_some() {
                    bail!("the server closed the stream: {}", String::from_utf8_lossy(&self.buf));
                }
                let mut chunk = [0u8; 4096];
                let n = self.read.read(&mut chunk).await.context("cannot read from the XMPP server")?;
                if n == 0 {
                    bail!("the XMPP server closed the connection");
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(STEP_TIMEOUT, step).await.context("the XMPP server did not answer within 60 s")?
    }

    /// Waits for the answer to the IQ with this id; fails on an error answer.
    async fn iq_answer(&mut self, id: &str) -> anyhow::Result<()> {
        let got = self.until(|b| stanza_end_with_id(b, id)).await?;
        let text = String::from_utf8_lossy(&got);
        if text.contains("type='error'") || text.contains("type=\"error\"") {
            bail!("the server refused: {}", text.chars().take(300).collect::<String>());
        }
        Ok(())
    }
}

/// End of the `<iq>` stanza carrying `id`, once complete.
fn stanza_end_with_id(b: &[u8], id: &str) -> Option<usize> {
    let at = find(b, format!("id='{id}'").as_bytes()).or_else(|| find(b, format!("id=\"{id}\"").as_bytes()))?;
    let start = b[..at].iter().rposition(|&c| c == b'<')?;
    stanza_end(b, start)
}

/// End (exclusive) of the complete top-level element starting at `start`, if complete.
fn stanza_end(b: &[u8], start: usize) -> Option<usize> {
    let rest = &b[start..];
    let name_end = rest.iter().position(|&c| c == b' ' || c == b'>' || c == b'/')?;
    let name = &rest[1..name_end];
    let gt = rest.iter().position(|&c| c == b'>')?;
    if gt > 0 && rest[gt - 1] == b'/' {
        return Some(start + gt + 1);
    }
    let mut close = Vec::with_capacity(name.len() + 3);
    close.extend_from_slice(b"</");
    close.extend_from_slice(name);
    close.push(b'>');
    find(&rest[gt..], &close).map(|p| start + gt + p + close.len())
}

/// The text of `id='…'` in a stanza's opening tag.
fn attr<'a>(stanza: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let tag_end = stanza.iter().position(|&c| c == b'>')?;
    let tag = &stanza[..tag_end];
    for q in [b'\'', b'"'] {
        let mut pat = format!(" {name}=").into_bytes();
        pat.push(q);
        if let Some(p) = find(tag, &pat) {
            let v = &tag[p + pat.len()..];
            let e = v.iter().position(|&c| c == q)?;
            return Some(&v[..e]);
        }
    }
    None
}

/// Reads stanzas until the stream ends: message bodies go to the sink, IQ
/// answers to the ping waiters.
async fn read_loop(
    mut read: OwnedReadHalf,
    mut buf: Vec<u8>,
    sink: Arc<Sink>,
    pings: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>,
) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut pos = 0;
        while let Some(lt) = buf[pos..].iter().position(|&c| c == b'<').map(|p| p + pos) {
            if buf[lt..].starts_with(b"</stream:stream>") {
                return;
            }
            let Some(end) = stanza_end(&buf, lt) else { break };
            let stanza = &buf[lt..end];
            if stanza.starts_with(b"<message") {
                if let Some(b) = find(stanza, b"<body>") {
                    let body = &stanza[b + 6..];
                    if let Some(e) = find(body, b"</body>") {
                        sink.delivered(&body[..e]);
                    }
                }
            } else if stanza.starts_with(b"<iq") {
                if let Some(id) = attr(stanza, "id") {
                    if let Some(w) = lock(&pings).remove(String::from_utf8_lossy(id).as_ref()) {
                        let _ = w.send(());
                    }
                }
            }
            pos = end;
        }
        buf.drain(..pos);
        match read.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

impl XmppTarget {
    fn user(&self, i: usize) -> String {
        format!("{}u{i}", self.prefix)
    }

    fn conn(&self, i: usize) -> anyhow::Result<Arc<Conn>> {
        lock(&self.conns).get(&i).cloned().with_context(|| format!("device {i} is not connected"))
    }
}

impl Target for XmppTarget {
    fn register(&self, i: usize) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let user = self.user(i);
            let mut s = Setup::open(&self.address, &self.domain).await?;
            s.send(&format!(
                "<iq type='set' id='reg'><query xmlns='jabber:iq:register'><username>{user}</username>\
                 <password>{PASSWORD}</password></query></iq>"
            ))
            .await?;
            s.iq_answer("reg").await.with_context(|| format!("registering {user}"))?;
            let _ = s.send("</stream:stream>").await;
            Ok(())
        })
    }

    fn connect(&self, i: usize, sink: Arc<Sink>) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let user = self.user(i);
            let mut s = Setup::open(&self.address, &self.domain).await.with_context(|| format!("{user}: stream"))?;
            let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{PASSWORD}"));
            s.send(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>")).await?;
            let answer = s
                .until(|b| find(b, b"<success").or_else(|| find(b, b"<failure")).and_then(|p| stanza_end(b, p)))
                .await
                .with_context(|| format!("{user}: SASL"))?;
            if find(&answer, b"<failure").is_some() {
                bail!("SASL PLAIN refused for {user}: {}", String::from_utf8_lossy(&answer));
            }
            s.restart(&self.domain).await.with_context(|| format!("{user}: stream restart"))?;
            s.send("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>bench</resource></bind></iq>")
                .await?;
            s.iq_answer("bind").await.context("resource bind")?;
            s.send("<iq type='set' id='sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>").await?;
            s.iq_answer("sess").await.context("session")?;
            s.send("<presence/>").await?;
            let pings = Arc::new(Mutex::new(HashMap::new()));
            let Setup { read, write, buf } = s;
            let task = tokio::spawn(read_loop(read, buf, sink, Arc::clone(&pings))).abort_handle();
            let conn = Arc::new(Conn { writer: tokio::sync::Mutex::new(write), pings, task });
            if let Some(old) = lock(&self.conns).insert(i, conn) {
                old.task.abort();
            }
            Ok(())
        })
    }

    fn disconnect(&self, i: usize) {
        if let Some(c) = lock(&self.conns).remove(&i) {
            c.task.abort();
            // Dropping the last writer closes the socket.
        }
    }

    fn send(&self, from: usize, to: usize, body: Vec<u8>) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let conn = self.conn(from)?;
            // The body is ASCII (hex header and filler): no escaping needed.
            let body = String::from_utf8(body).context("message body")?;
            let stanza =
                format!("<message to='{}@{}' type='chat'><body>{body}</body></message>", self.user(to), self.domain);
            let mut writer = conn.writer.lock().await;
            writer.write_all(stanza.as_bytes()).await.context("cannot write a message")
        })
    }

    fn barrier(&self, from: usize) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let conn = self.conn(from)?;
            let id = format!("barrier{from}");
            let (tx, rx) = oneshot::channel();
            lock(&conn.pings).insert(id.clone(), tx);
            let iq = format!("<iq type='get' id='{id}' to='{}'><ping xmlns='urn:xmpp:ping'/></iq>", self.domain);
            conn.writer.lock().await.write_all(iq.as_bytes()).await.context("cannot write a ping")?;
            tokio::time::timeout(Duration::from_secs(600), rx)
                .await
                .context("no answer to the ping within 600 s")?
                .context("the stream closed before the ping answer")
        })
    }

    fn server_pids(&self) -> Vec<u32> {
        vec![self.pid]
    }
}

/// The process id of the beam.smp running ejabberd.
fn find_beam() -> anyhow::Result<u32> {
    for entry in std::fs::read_dir("/proc").context("cannot read /proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if comm.trim() == "beam.smp" && find(&cmdline, b"ejabberd").is_some() {
            return Ok(pid);
        }
    }
    bail!("no ejabberd beam.smp process: start it with bench/ejabberd/setup.sh start, or pass --server-pid")
}

/// `subrosa-bench xmpp`.
pub async fn run(o: &LoadOptions, x: &XmppOptions) -> anyhow::Result<()> {
    let nofile = loadgen::raise_nofile();
    let needed = o.registered() + 200;
    anyhow::ensure!(
        nofile as usize >= needed,
        "the open-files limit is {nofile}, {needed} are needed: raise the hard limit (ulimit -Hn)"
    );
    let pid = match x.server_pid {
        Some(p) => p,
        None => find_beam()?,
    };
    println!("server: {} at {} (pid {pid}), domain {}", x.label, x.address, x.domain);
    println!(
        "devices: {} connected ({} registered), concurrency {}, {}-byte bodies, open files {nofile}",
        o.devices,
        o.registered() + 1,
        o.concurrency,
        loadgen::MESSAGE_BYTES
    );
    let target = Arc::new(XmppTarget {
        address: x.address.clone(),
        domain: x.domain.clone(),
        prefix: format!("b{:06x}", rand::random::<u32>() & 0xff_ffff),
        conns: Mutex::new(HashMap::new()),
        pid,
    });
    let result = loadgen::run(Arc::clone(&target), &x.label, o).await;
    for i in 0..=o.registered() {
        target.disconnect(i);
    }
    loadgen::write_json(&result?, o)
}

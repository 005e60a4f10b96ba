//! `subrosa daemon`: JSON-RPC 2.0 for scripts and bots, over a Unix socket
//! or standard input and output.
//!
//! One request or response per line, after signal-cli's daemon: methods are
//! named after the commands (`send`, `receive`, `history`, `contacts`,
//! `groups`, `members`, `createGroup`, `safetyNumber`, `verify`) and answer
//! with the objects `--json` prints; `subscribe` turns on notifications
//! `{"jsonrpc":"2.0","method":"message","params":M}` where `M` is exactly a
//! `subrosa receive --json` line.
//!
//! Nothing is lost. The handle ([`Client::run`]) stores what arrives before
//! the server is acknowledged, whether or not anyone listens. Every stored
//! message has an arrival number (`seq`, the store's own, which only
//! grows), and the daemon hands each message out with it. What front ends
//! acknowledged is one such number, a high-water mark ([`Acked`], under one
//! meta key, so it is encrypted and committed like everything else): an
//! `ack {"seq": N}` moves it, and so does a `receive` once its answer was
//! written. `receive`, and `subscribe` without a cursor, replay everything
//! after it, then (for `subscribe`) what comes; a message a bot was sent
//! but did not acknowledge before it (or the daemon) died comes again on
//! the next `subscribe` (at least once: front ends deduplicate by `id`).
//! `subscribe {"after": SEQ}` replays from a bot's own cursor, and the
//! older `subscribe {"since": MS}` everything stored from `received_at` MS.
//!
//! Concurrency: one task per connection reads and answers requests in
//! order; a subscription is a task of its own that reads the handle's event
//! stream; both hand lines to the connection's one writer task, which
//! acknowledges what a `receive` answer handed over after it wrote it.
//!
//! Access: anyone who can connect to the socket uses the unlocked store, so
//! the socket is 0600 in a 0700 directory and a peer of another uid is
//! turned away. A lock file (`daemon.lock`, flock) keeps a second daemon off
//! the same home.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use subrosa_client::{Client, ClientError, ClientEvent, StoredMessage, Subrosa, Target};
use subrosa_proto::ConversationId;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, mpsc};

use crate::{one_line, term, with_advice};

mod calls;
mod rpc;
pub(crate) use rpc::COMMAND_QUEUED;
use rpc::*;

/// Longest request line; a longer one ends the connection.
const MAX_REQUEST: u64 = 1 << 20;
/// Where the acknowledged arrival number lives in the store's meta table.
const META_ACKED: &str = "cli.daemon.acked";
/// Where daemons before the arrival numbers kept what they handed over
/// (read once, to start [`Acked`] from it).
const META_CONSUMED: &str = "cli.daemon.consumed";
/// Longest `receive` wait, in seconds.
const MAX_WAIT_SECS: f64 = 3600.0;

/// The lock file, in the home directory.
pub fn lock_path(home: &Path) -> PathBuf {
    home.join("daemon.lock")
}

/// The socket when `--socket` is not given.
pub fn default_socket(home: &Path) -> PathBuf {
    home.join("daemon").join("socket")
}

/// Holds the home's daemon lock for as long as it lives.
#[derive(Debug)]
pub struct HomeLock(#[allow(dead_code)] std::fs::File);

/// Takes the home's daemon lock, or says that another daemon holds it.
///
/// # Errors
/// Another daemon runs on `home`; the lock file cannot be made.
pub fn lock_home(home: &Path) -> Result<HomeLock> {
    if !home.is_dir() {
        return Err(anyhow!("no device in {}: register or link one first", home.display()));
    }
    let path = lock_path(home);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(HomeLock(file)),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            Err(anyhow!("another subrosa daemon is already running on {}", home.display()))
        }
        Err(e) => Err(anyhow!("cannot lock {}: {e}", path.display())),
    }
}

/// What front ends acknowledged: every message up to arrival number `seq`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acked {
    /// The highest arrival number acknowledged.
    pub seq: u64,
}

impl Acked {
    fn encode(self) -> Result<Vec<u8>, ClientError> {
        serde_json::to_vec(&self).map_err(|e| ClientError::Bug(e.to_string()))
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The record of daemons before the arrival numbers: every message stored
/// before `floor` (ms, `received_at`) was handed over, and the ids in `ids`.
#[derive(Debug, Default, Deserialize)]
struct Consumed {
    floor: u64,
    ids: BTreeMap<String, u64>,
}

fn key(m: &StoredMessage) -> String {
    format!("{}/{}", m.conversation, m.id)
}

impl Consumed {
    fn wants(&self, m: &StoredMessage) -> bool {
        m.received_at >= self.floor && !self.ids.contains_key(&key(m))
    }
}

/// What a read of the store gives a front end: the messages for it, with
/// their arrival numbers, and the highest number read (own sends that are
/// not handed out included).
struct Pending {
    messages: Vec<(u64, StoredMessage)>,
    high: u64,
}

/// What went wrong that no answer carried, until a front end asks
/// (`failures`).
#[derive(Debug, Default, Serialize)]
struct Failures {
    /// Queued sends the server refused: `{message, reason}`.
    failed_sends: Vec<Value>,
    /// Messages dropped, not decryptable: `{from, reason}`.
    dropped: Vec<Value>,
    /// Files refused: `{name, reason}`.
    refused_files: Vec<Value>,
}

/// Most of each kind kept (a flood of undecryptable messages must not
/// grow the daemon without end); the count beyond is in the log only.
const MAX_FAILURES: usize = 1000;

impl Failures {
    fn push(list: &mut Vec<Value>, v: Value) {
        if list.len() < MAX_FAILURES {
            list.push(v);
        } else {
            tracing::warn!("more failures than are kept for front ends");
        }
    }
}

fn failed_value(f: &subrosa_client::FailedSend) -> Value {
    json!({ "message": f.message.as_ref().map(message_value), "reason": f.reason })
}

/// What the daemon shares between connections.
struct Shared {
    client: Client,
    /// The home directory (files are sealed into it, and kept there).
    home: PathBuf,
    /// What went wrong, for the next `failures`.
    failures: Mutex<Failures>,
    /// This device's id (hex): its own sends are not handed out.
    me: String,
    acked: Mutex<Acked>,
    /// The user's configuration (previews, notifications).
    config: crate::config::Config,
    /// Subscriptions of front ends that show desktop notifications
    /// themselves (the daemon then shows none).
    notifying_front_ends: std::sync::atomic::AtomicUsize,
    /// The account was deleted through this daemon.
    deleted: std::sync::atomic::AtomicBool,
    /// Told when the daemon has nothing left to serve (the account was
    /// deleted and the connection that asked closed).
    stop: tokio::sync::Notify,
    /// Whether the handle is connected to the server now (for `account`:
    /// a front end that starts later learns it without waiting for the
    /// next change).
    connected: std::sync::atomic::AtomicBool,
    /// What hangs up the call running through this daemon (one at a
    /// time); `None` while none runs.
    hang_up: Mutex<Option<Arc<tokio::sync::Notify>>>,
}

impl Shared {
    fn device(&self) -> &Subrosa {
        self.client.device()
    }

    /// Whether `m` goes to front ends at all: everything `receive` shows,
    /// not what this device sent itself.
    fn for_front_ends(&self, m: &StoredMessage) -> bool {
        !(m.outgoing && !m.system && m.device == self.me)
    }

    /// Messages stored after arrival number `after` and from `since_ms` on.
    fn pending(&self, after: u64, since_ms: u64) -> Result<Pending, ClientError> {
        let mut messages = self.device().store().read(|tx| tx.received_after_seq(after, since_ms))?;
        let high = messages.last().map_or(after, |(seq, _)| *seq);
        messages.retain(|(_, m)| self.for_front_ends(m));
        let (seqs, mut shown): (Vec<u64>, Vec<StoredMessage>) = messages.into_iter().unzip();
        self.device().mark_shown(&mut shown)?;
        let messages = seqs.into_iter().zip(shown).collect();
        Ok(Pending { messages, high })
    }

    /// A desktop notification of `m`, as the user chose (off by default;
    /// the terminal UI's policy, [`crate::tui::notify::note_for`]), unless
    /// a front end that shows its own is subscribed. Never waited for.
    fn notify_desktop(&self, m: &StoredMessage) {
        let policy = self.config.notifications.unwrap_or_default();
        if self.notifying_front_ends.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return;
        }
        // Held-back previews and request marks do not matter here: a note
        // carries at most the text.
        if let Some(note) = crate::tui::notify::note_for(policy, m, false) {
            tokio::spawn(async move { crate::tui::notify::show(&note).await });
        }
    }

    fn acked(&self) -> u64 {
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).seq
    }

    /// Moves the acknowledged number up to `seq` (never down), in the
    /// store; gives the number now acknowledged.
    fn ack(&self, seq: u64) -> Result<u64, ClientError> {
        let mut acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        if seq > acked.seq {
            let next = Acked { seq };
            let bytes = next.encode()?;
            self.device().store().write(|tx| tx.set_meta(META_ACKED, &bytes))?;
            *acked = next;
        }
        Ok(acked.seq)
    }
}

/// The acknowledged number. The first time, it starts from what an older
/// daemon handed over, or else just before the first message no `receive`
/// showed yet (everything, when all was shown).
fn load_acked(device: &Subrosa) -> Result<Acked, ClientError> {
    let store = device.store();
    if let Some(a) = store.read(|tx| tx.meta(META_ACKED))?.and_then(|b| Acked::decode(&b)) {
        return Ok(a);
    }
    let all = store.read(|tx| tx.received_after_seq(0, 0))?;
    let old: Option<Consumed> = store.read(|tx| tx.meta(META_CONSUMED))?.and_then(|b| serde_json::from_slice(&b).ok());
    let wanted: Box<dyn Fn(&StoredMessage) -> bool> = match old {
        Some(old) => Box::new(move |m| old.wants(m)),
        None => {
            let unseen: std::collections::HashSet<String> =
                store.write(|tx| tx.take_unseen())?.iter().map(key).collect();
            Box::new(move |m| unseen.contains(&key(m)))
        }
    };
    let seq = match all.iter().find(|(_, m)| wanted(m)) {
        Some((first, _)) => first.saturating_sub(1),
        None => all.last().map_or(0, |(seq, _)| *seq),
    };
    let acked = Acked { seq };
    store.write(|tx| tx.set_meta(META_ACKED, &acked.encode()?))?;
    Ok(acked)
}

/// Where the daemon listens.
#[derive(Debug)]
pub enum Listen {
    /// A Unix socket at this path.
    Socket(PathBuf),
    /// Standard input and output (one client; the daemon ends with it).
    Stdio,
}

/// Runs the daemon until it is stopped (SIGINT, SIGTERM), standard input
/// ends (`--stdio`), or the handle meets an error retrying cannot fix.
///
/// # Errors
/// The socket cannot be made; the store; the handle's fatal errors.
pub async fn run(
    client: &Client,
    home: &Path,
    config: &crate::config::Config,
    listen: Listen,
    _lock: HomeLock,
) -> Result<ExitCode> {
    let me = client.device().identity().device_id().to_hex();
    let acked = load_acked(client.device())?;
    let shared = Arc::new(Shared {
        client: client.clone(),
        home: home.to_path_buf(),
        failures: Mutex::new(Failures::default()),
        me,
        acked: Mutex::new(acked),
        config: config.clone(),
        notifying_front_ends: std::sync::atomic::AtomicUsize::new(0),
        deleted: std::sync::atomic::AtomicBool::new(false),
        stop: tokio::sync::Notify::new(),
        connected: std::sync::atomic::AtomicBool::new(false),
        hang_up: Mutex::new(None),
    });
    {
        // Subscribed before the handle's loop starts: no change is missed.
        let (shared, mut events) = (shared.clone(), client.events());
        tokio::spawn(async move {
            loop {
                let now = match events.recv().await {
                    Ok(ClientEvent::Connected) => true,
                    Ok(ClientEvent::Disconnected { .. }) => false,
                    // Kept for the next `failures`.
                    Ok(ClientEvent::SendFailed(f)) => {
                        let mut failures = shared.failures.lock().unwrap_or_else(|p| p.into_inner());
                        Failures::push(&mut failures.failed_sends, failed_value(&f));
                        continue;
                    }
                    Ok(ClientEvent::Message(m)) => {
                        shared.notify_desktop(&m);
                        continue;
                    }
                    Ok(ClientEvent::Dropped { from, reason }) => {
                        let dropped = json!({ "from": from, "reason": reason });
                        let mut failures = shared.failures.lock().unwrap_or_else(|p| p.into_inner());
                        Failures::push(&mut failures.dropped, dropped);
                        continue;
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                shared.connected.store(now, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    let running = {
        let shared = shared.clone();
        async move {
            let r = client.run().await;
            // The server refuses a deleted account's devices: that is the
            // end asked for, and the daemon stops once its answer went out.
            if shared.deleted.load(std::sync::atomic::Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
            r
        }
    };
    tokio::pin!(running);
    let stop = {
        let shared = shared.clone();
        async move {
            tokio::select! {
                () = stop_signal() => {}
                // The account is gone and the connection that deleted
                // it has closed (so it has its answer).
                () = shared.stop.notified() => {}
            }
        }
    };
    tokio::pin!(stop);
    match listen {
        Listen::Stdio => {
            eprintln!("subrosa daemon: serving JSON-RPC on standard input and output");
            let serve = serve_connection(shared, tokio::io::stdin(), tokio::io::stdout());
            tokio::select! {
                r = &mut running => r.map_err(anyhow::Error::from)?,
                () = serve => {}
                () = &mut stop => {}
            }
        }
        Listen::Socket(path) => {
            let listener = bind(&path)?;
            eprintln!("subrosa daemon: listening on {}", path.display());
            let uid = rustix::process::getuid().as_raw();
            let accept = async {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        // Out of descriptors, say: not a reason to spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    match stream.peer_cred() {
                        Ok(cred) if cred.uid() == uid => {}
                        _ => {
                            tracing::warn!("refused a connection from another user");
                            continue;
                        }
                    }
                    let (r, w) = stream.into_split();
                    tokio::spawn(serve_connection(shared.clone(), r, w));
                }
            };
            let result = tokio::select! {
                r = &mut running => r.map_err(anyhow::Error::from),
                () = accept => Ok(()),
                () = &mut stop => Ok(()),
            };
            let _ = std::fs::remove_file(&path);
            result?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// The socket at `path`, 0600, in a directory nobody else may enter.
fn bind(path: &Path) -> Result<tokio::net::UnixListener> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.uid() != rustix::process::getuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(anyhow!(
            "{} must be a directory of yours that nobody else may enter (mode 0700): the socket gives the unlocked store",
            dir.display()
        ));
    }
    // The lock is held: a socket left there that nobody answers is a dead
    // daemon's. Anything else (a file, a live daemon of another home) is
    // never removed.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt as _;
        if !meta.file_type().is_socket() {
            return Err(anyhow!("{} exists and is not a socket; give another --socket", path.display()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(anyhow!("{} is the socket of a running daemon; give another --socket", path.display()));
        }
        std::fs::remove_file(path).with_context(|| format!("removing the old socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// A connection's subscription, and whether its front end shows desktop
/// notifications itself.
#[derive(Default)]
struct Subscription {
    task: Option<tokio::task::JoinHandle<()>>,
    notifying: Option<NotifyingFrontEnd>,
}

/// One front end that shows its own desktop notifications, counted in
/// [`Shared`] for as long as it lives.
struct NotifyingFrontEnd(Arc<Shared>);

impl NotifyingFrontEnd {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.notifying_front_ends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        NotifyingFrontEnd(shared.clone())
    }
}

impl Drop for NotifyingFrontEnd {
    fn drop(&mut self) {
        self.0.notifying_front_ends.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A line for the writer, and the arrival number it acknowledges once
/// written (a `receive` answer).
type Outgoing = (String, Option<Handed>);

/// A `receive` answer's arrival number, and who waits until it was written
/// and acknowledged (the connection reads its next request only then, so a
/// `receive` right after gets what comes after).
struct Handed {
    seq: u64,
    done: tokio::sync::oneshot::Sender<()>,
}

/// Hands `line` to the writer; with `handed`, waits until it was written
/// and its messages acknowledged.
async fn answer(tx: &mpsc::Sender<Outgoing>, line: String, handed: Option<u64>) {
    let Some(seq) = handed else {
        let _ = tx.send((line, None)).await;
        return;
    };
    let (done, written) = tokio::sync::oneshot::channel();
    if tx.send((line, Some(Handed { seq, done }))).await.is_ok() {
        let _ = written.await;
    }
}

/// Serves one connection until it closes.
async fn serve_connection<R, W>(shared: Arc<Shared>, read: R, write: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Outgoing>(256);
    let writer = tokio::spawn(write_lines(shared.clone(), write, rx));
    let mut reader = BufReader::new(read);
    let mut subscription = Subscription::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_REQUEST + 1).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if line.len() as u64 > MAX_REQUEST {
            let _ = tx.send((error_line(Value::Null, INVALID_REQUEST, "request longer than 1 MiB"), None)).await;
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = match decode_line(&line) {
            Err(Failure(code, message)) => Some(error_line(Value::Null, code, &message)),
            Ok(Line::Batch(batch)) => {
                let mut answers = Vec::new();
                let mut handed = None;
                for request in batch {
                    // A `receive` later in the batch starts after what an
                    // earlier one handed over (acknowledged only once the
                    // whole answer is written): never the same messages twice.
                    let floor = handed.unwrap_or(0);
                    if let Some((v, h)) = handle(&shared, &tx, &mut subscription, request, floor).await {
                        answers.push(v);
                        handed = handed.max(h);
                    }
                }
                if !answers.is_empty() {
                    let line = term::json_line(&Value::Array(answers)).unwrap_or_default();
                    answer(&tx, line, handed).await;
                }
                None
            }
            Ok(Line::One(request)) => {
                if let Some((v, handed)) = handle(&shared, &tx, &mut subscription, request, 0).await {
                    answer(&tx, term::json_line(&v).unwrap_or_default(), handed).await;
                }
                None
            }
        };
        if let Some(r) = reply {
            let _ = tx.send((r, None)).await;
        }
    }
    if let Some(s) = subscription.task.take() {
        s.abort();
    }
    drop(subscription.notifying.take());
    drop(tx);
    let _ = writer.await;
    if shared.deleted.load(std::sync::atomic::Ordering::Relaxed) {
        shared.stop.notify_one();
    }
}

/// Writes lines in order; after a `receive` answer, acknowledges what it
/// handed over.
async fn write_lines<W: AsyncWrite + Unpin>(shared: Arc<Shared>, mut write: W, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some((mut line, handed)) = rx.recv().await {
        line.push('\n');
        if write.write_all(line.as_bytes()).await.is_err() || write.flush().await.is_err() {
            break;
        }
        if let Some(Handed { seq, done }) = handed {
            if let Err(e) = shared.ack(seq) {
                tracing::warn!("cannot record messages handed over: {e}");
            }
            let _ = done.send(());
        }
    }
}

fn error_line(id: Value, code: i64, message: &str) -> String {
    term::json_line(&error_value(id, code, message)).unwrap_or_default()
}

fn error_value(id: Value, code: i64, message: &str) -> Value {
    json!({ "jsonrpc": "2.0", "error": { "code": code, "message": message }, "id": id })
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = if matches!(e, ClientError::Pending(_)) { COMMAND_QUEUED } else { COMMAND_FAILED };
        Failure(code, one_line(&anyhow::Error::from(e)))
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure(COMMAND_FAILED, one_line(&e))
    }
}

/// The answer to one request (none for a notification), and the messages
/// it hands over; a `receive` hands over nothing at or below `floor`.
async fn handle(
    shared: &Arc<Shared>,
    tx: &mpsc::Sender<Outgoing>,
    subscription: &mut Subscription,
    request: Value,
    floor: u64,
) -> Option<(Value, Option<u64>)> {
    let Request { id, answer_id, method, params } = match decode_request(request) {
        Ok(r) => r,
        Err((answer_id, Failure(code, message))) => return Some((error_value(answer_id, code, &message), None)),
    };
    let result = call(shared, tx, subscription, &method, params, floor).await;
    // A request without an id is a notification: no answer, even an error.
    id.as_ref()?;
    Some(match result {
        Ok((value, handed)) => (json!({ "jsonrpc": "2.0", "result": value, "id": answer_id }), handed),
        Err(Failure(code, message)) => (error_value(answer_id, code, &message), None),
    })
}

enum Place {
    Id(ConversationId),
    Named(String),
}

impl Which {
    fn place(self) -> Result<Place, Failure> {
        match (self.recipient, self.conversation) {
            (Some(r), None) => Ok(Place::Named(r)),
            (None, Some(c)) => {
                c.parse().map(Place::Id).map_err(|_| invalid("conversation takes a conversation id: 32 hex digits"))
            }
            _ => Err(invalid("give either recipient or conversation")),
        }
    }
}

/// Where a command for a conversation goes.
async fn target_of(me: &Subrosa, place: Place) -> Result<Target, Failure> {
    Ok(match place {
        Place::Id(id) => Target::Conversation(id),
        Place::Named(target) => match crate::target::for_send(me, &target).await? {
            Target::Direct(handle) => match me.direct_conversation(&handle)? {
                Some(id) => Target::Conversation(id),
                // A first message makes the conversation.
                None => Target::Direct(handle),
            },
            other => other,
        },
    })
}

fn message_id(s: &str) -> Result<subrosa_proto::MessageId, Failure> {
    s.parse().map_err(|_| invalid("messageId takes a message id: 32 hex digits"))
}

/// A command's answer: done, or queued (sent later, not to be repeated).
fn queued(r: Result<(), ClientError>) -> Answer {
    match r {
        Ok(()) => Ok((json!({ "queued": false }), None)),
        Err(ClientError::Pending(_)) => Ok((json!({ "queued": true }), None)),
        Err(e) => Err(e.into()),
    }
}

fn message_value(m: &StoredMessage) -> Value {
    serde_json::to_value(&*with_advice(m)).unwrap_or(Value::Null)
}

/// A message as `receive --json` prints it, its files included (as this
/// device keeps them).
fn message_json(me: &Subrosa, m: &StoredMessage) -> Value {
    let mut v = message_value(m);
    let files = if m.system { Vec::new() } else { crate::attach::files_of(me, m) };
    if !files.is_empty() {
        v["attachments"] = crate::attach::json(&files);
    }
    v
}

/// A `members` item.
/// A member device as `members` hands it to front ends; `suite` is the
/// conversation's MLS ciphersuite (the same in every member's object).
pub(crate) fn member_value(
    handle: &str,
    device: &str,
    fingerprint: &str,
    this_device: bool,
    stale_days: Option<u64>,
    suite: subrosa_core::CipherSuite,
) -> Value {
    json!({
        "handle": handle,
        "device": device,
        "fingerprint": fingerprint,
        "this_device": this_device,
        "stale_days": stale_days,
        "suite": u16::from(suite),
    })
}

/// `members --json`: the conversation's suite and its member devices.
pub(crate) fn members_json(suite: subrosa_core::CipherSuite, members: Vec<Value>) -> Value {
    json!({
        "suite": u16::from(suite),
        "suite_name": subrosa_core::suite_name(suite),
        "post_quantum": suite == subrosa_core::PQ_CIPHERSUITE,
        "members": members,
    })
}

/// A history as `history --json` prints it: the files of all its messages
/// read in one query per conversation.
fn messages_json(me: &Subrosa, ms: &[StoredMessage]) -> Value {
    let mut files = crate::attach::files_by_message(me, ms);
    Value::Array(
        ms.iter()
            .map(|m| {
                let mut v = message_value(m);
                match files.remove(&m.id) {
                    Some(rows) if !m.system && !rows.is_empty() => v["attachments"] = crate::attach::json(&rows),
                    _ => {}
                }
                v
            })
            .collect(),
    )
}

/// A message handed to a front end: the `receive --json` object and its
/// arrival number, `seq`, to acknowledge it by (the snapshot's form).
#[cfg(test)]
fn numbered_value(seq: u64, m: &StoredMessage) -> Value {
    numbered(seq, message_value(m))
}

/// `v` with its arrival number.
fn numbered(seq: u64, mut v: Value) -> Value {
    if let Value::Object(o) = &mut v {
        o.insert("seq".into(), seq.into());
    }
    v
}

fn numbered_values(me: &Subrosa, ms: &[(u64, StoredMessage)]) -> Value {
    Value::Array(ms.iter().map(|(seq, m)| numbered(*seq, message_json(me, m))).collect())
}

type Answer = Result<(Value, Option<u64>), Failure>;

async fn call(
    shared: &Arc<Shared>,
    tx: &mpsc::Sender<Outgoing>,
    subscription: &mut Subscription,
    method: &str,
    p: Value,
    floor: u64,
) -> Answer {
    let client = &shared.client;
    let me = shared.device();
    let plain = |v: Value| -> Answer { Ok((v, None)) };
    match method {
        "send" => {
            let SendParams { recipient, conversation, message, reply_to, attachments, preview } = params(p)?;
            let place = Which { recipient, conversation }.place()?;
            // Stored and queued (the server away) is a result in state
            // `queued`, not an error: a bot must not send it again.
            let to = target_of(me, place).await?;
            // As `send`: the dangerous-link list, then the preview when
            // asked (or turned on); the same warnings, in `warnings`.
            let previews = attachments.is_empty()
                && reply_to.is_none()
                && (preview || me.previews()?.or(shared.config.previews).unwrap_or(false));
            let checked = crate::check_links(me, &message, previews, preview, &shared.config).await;
            let warned = |answer: Answer| -> Answer {
                let (mut v, handed) = answer?;
                if !checked.warnings.is_empty() {
                    v["warnings"] = json!(checked.warnings);
                }
                Ok((v, handed))
            };
            if !attachments.is_empty() {
                return warned(send_files(shared, tx, &to, &message, reply_to.is_some(), &attachments).await);
            }
            if let Some(made) = checked.preview.clone() {
                return warned(plain(message_json(me, &client.send_with_preview(&to, &message, made).await?)));
            }
            warned(match (reply_to, &to) {
                // A reply stored and queued comes back in state `queued`.
                (Some(id), Target::Conversation(c)) => {
                    plain(message_json(me, &client.reply(c, &message, message_id(&id)?).await?))
                }
                (Some(id), _) => {
                    let id = message_id(&id)?;
                    match me.reply(&to, &message, id, false).await {
                        Ok(m) => plain(message_json(me, &m)),
                        Err(ClientError::Pending(_)) => plain(json!({ "queued": true })),
                        Err(e) => Err(e.into()),
                    }
                }
                (None, _) => plain(message_json(me, &client.send_text_to(&to, &message).await?)),
            })
        }
        "saveFiles" => {
            let SaveFilesParams { recipient, conversation, message_id: id, dir } = params(p)?;
            let conversation = match (Which { recipient, conversation }).place()? {
                Place::Id(id) => id,
                Place::Named(t) => crate::target::conversation(me, &t)?,
            };
            let id = message_id(&id)?;
            let dir = PathBuf::from(dir);
            crate::config::check_downloads(&shared.home, &dir)?;
            let refused = me.fetch_attachments(&shared.home, &mut progress_lines(tx)).await?;
            me.save_attachments_of(&shared.home, &dir, &conversation, &id.0)?;
            if let Some((_, why)) = refused.iter().find(|(r, _)| r.conversation == conversation && r.message_id == id.0)
            {
                return Err(Failure(COMMAND_FAILED, format!("refused, not saved: {}", term::safe(why))));
            }
            let files = me.attachments_of(&conversation, &id.0)?;
            plain(json!({ "attachments": crate::attach::json(&files) }))
        }
        // Reactions, edits and deletes answer `{"queued": false}` once the
        // server has them, `{"queued": true}` when stored and sent later
        // (never to be sent again by the caller).
        "react" => {
            let ReactParams { recipient, conversation, message_id: id, emoji, remove } = params(p)?;
            let to = target_of(me, Which { recipient, conversation }.place()?).await?;
            let id = message_id(&id)?;
            queued(me.react(&to, id, &emoji, remove).await)
        }
        "edit" => {
            let EditParams { recipient, conversation, message_id: id, text } = params(p)?;
            let to = target_of(me, Which { recipient, conversation }.place()?).await?;
            let id = message_id(&id)?;
            queued(me.edit(&to, id, &text).await)
        }
        "delete" => {
            let DeleteParams { recipient, conversation, message_id: id } = params(p)?;
            let to = target_of(me, Which { recipient, conversation }.place()?).await?;
            let id = message_id(&id)?;
            queued(me.delete_for_everyone(&to, id).await)
        }
        "read" => {
            let id = match params::<Which>(p)?.place()? {
                Place::Id(id) => id,
                Place::Named(t) => crate::target::conversation(me, &t)?,
            };
            let receipts = me.read_receipts()?;
            match me.read(&id).await {
                Ok(n) => plain(json!({ "read": n, "queued": false, "readReceipts": receipts })),
                Err(ClientError::Pending(_)) => plain(json!({ "queued": true, "readReceipts": receipts })),
                Err(e) => Err(e.into()),
            }
        }
        "settings" => {
            let SettingsParams { read_receipts } = params(p)?;
            if let Some(on) = read_receipts {
                me.set_read_receipts(on)?;
            }
            plain(json!({ "readReceipts": me.read_receipts()? }))
        }
        // What went wrong since a front end last asked, where no answer
        // could carry it: queued sends the server refused, messages that
        // could not be decrypted, files refused (a `receive` without a
        // daemon prints them and exits with its status from them).
        "failures" => {
            params::<NoParams>(p)?;
            let mut failures = std::mem::take(&mut *shared.failures.lock().unwrap_or_else(|p| p.into_inner()));
            for f in me.take_failed_sends()? {
                failures.failed_sends.push(failed_value(&f));
            }
            plain(serde_json::to_value(&failures).unwrap_or(Value::Null))
        }
        "history" => {
            let history = match params::<Which>(p)?.place()? {
                Place::Id(id) => client.history(&id)?,
                Place::Named(target) => match crate::target::resolve(me, &target)? {
                    crate::target::Named::Conversation(row) => me.history(&row.id)?,
                    crate::target::Named::Direct(peer) => me.history_with(&peer)?,
                },
            };
            plain(messages_json(me, &history))
        }
        "receive" => {
            let ReceiveParams { timeout, downloads } = params(p)?;
            if !(0.0..=MAX_WAIT_SECS).contains(&timeout) || timeout.is_nan() {
                return Err(invalid(format!("timeout takes seconds from 0 to {MAX_WAIT_SECS}")));
            }
            let downloads = downloads.map(PathBuf::from);
            if let Some(dir) = &downloads {
                crate::config::check_downloads(&shared.home, dir)?;
            }
            let mut events = client.events();
            let mut got = shared.pending(shared.acked().max(floor), 0)?;
            if got.messages.is_empty() && timeout > 0.0 {
                let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
                while got.messages.is_empty() {
                    match tokio::time::timeout_at(deadline, events.recv()).await {
                        Err(_) | Ok(Err(broadcast::error::RecvError::Closed)) => break,
                        Ok(Ok(ClientEvent::Message(_) | ClientEvent::System(_)))
                        | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                            got = shared.pending(shared.acked().max(floor), 0)?;
                        }
                        Ok(Ok(_)) => {}
                    }
                }
            }
            // Files are downloaded and checked (and saved, when asked)
            // before the messages are handed over, as without a daemon.
            let refused = me.fetch_attachments(&shared.home, &mut |_, _, _| {}).await?;
            if let Some(dir) = &downloads {
                me.save_attachments(&shared.home, dir)?;
            }
            if !refused.is_empty() {
                let mut failures = shared.failures.lock().unwrap_or_else(|p| p.into_inner());
                for (row, why) in refused {
                    Failures::push(&mut failures.refused_files, json!({ "name": row.file.name, "reason": why }));
                }
            }
            // Acknowledged once the answer was written.
            let handed = (got.high > 0).then_some(got.high);
            Ok((numbered_values(me, &got.messages), handed))
        }
        "subscribe" => {
            let SubscribeParams { after, since, notifies } = params(p)?;
            if let Some(s) = subscription.task.take() {
                s.abort();
            }
            if notifies {
                // Counted until the connection closes.
                subscription.notifying.get_or_insert_with(|| NotifyingFrontEnd::new(shared));
            }
            let (after, since) = match (after, since) {
                (None, None) => (shared.acked(), 0),
                (after, since) => (after.unwrap_or(0), since.unwrap_or(0)),
            };
            // Subscribed before the replay is read: nothing falls between.
            let events = client.events();
            subscription.task = Some(tokio::spawn(notify(shared.clone(), tx.clone(), events, after, since)));
            plain(json!({ "subscribed": true, "after": after }))
        }
        "ack" => {
            let AckParams { seq } = params(p)?;
            // Only a number the store gave out: a wrong one (a time, say)
            // would otherwise move the mark past everything, for good.
            let known = seq == 0
                || me.store().read(|tx| tx.received_after_seq(seq - 1, 0))?.first().is_some_and(|(s, _)| *s == seq);
            if !known {
                return Err(invalid(format!("no message has the arrival number {seq}")));
            }
            plain(json!({ "acked": shared.ack(seq)? }))
        }
        "unsubscribe" => {
            params::<NoParams>(p)?;
            let was = subscription.task.take().map(|s| s.abort()).is_some();
            plain(json!({ "subscribed": false, "was": was }))
        }
        "contacts" => {
            params::<NoParams>(p)?;
            plain(serde_json::to_value(me.contacts()?).unwrap_or(Value::Null))
        }
        // Every security alert not cleared, shown or not: one raised while
        // no client was subscribed reached nobody live (the same objects
        // as `subrosa alerts --json`).
        "alerts" => {
            params::<NoParams>(p)?;
            plain(serde_json::to_value(me.alerts()?).unwrap_or(Value::Null))
        }
        "groups" => {
            params::<NoParams>(p)?;
            let groups: Vec<Value> = me
                .groups()?
                .into_iter()
                .map(|g| json!({ "name": g.name, "id": g.id, "members": g.members, "active": g.active }))
                .collect();
            plain(Value::Array(groups))
        }
        "members" => {
            let id = match params::<Which>(p)?.place()? {
                Place::Id(id) => id,
                Place::Named(t) => crate::target::conversation(me, &t)?,
            };
            let stale = me.stale_members(&id)?;
            let suite = me.conversation_suite(&id)?;
            let mine = me.identity().address();
            let members: Vec<Value> = me
                .members(&id)?
                .into_iter()
                .map(|m| {
                    let stale_days = stale.iter().find(|(a, _)| *a == m.address).map(|(_, d)| *d);
                    member_value(
                        m.address.handle.as_str(),
                        &m.address.device.to_hex(),
                        &subrosa_core::safety::key_fingerprint(&m.device_key),
                        m.address == mine,
                        stale_days,
                        suite,
                    )
                })
                .collect();
            plain(Value::Array(members))
        }
        "createGroup" => {
            let CreateGroupParams { name, members } = params(p)?;
            let g = me.create_group(&name, &members).await?;
            plain(json!({ "name": g.name, "id": g.id, "members": g.members, "active": g.active }))
        }
        // What a front end over the daemon (the terminal UI) lists: every
        // conversation, 1:1 and groups, and those left.
        "conversations" => {
            params::<NoParams>(p)?;
            let mut out = Vec::new();
            for row in client.conversations()? {
                let group = row.kind == "group";
                let verified = match &row.peer {
                    Some(peer) if !group => client.is_verified(peer)?,
                    _ => false,
                };
                out.push(json!({
                    "id": row.id.to_hex(),
                    "name": row.target(),
                    "group": group,
                    "active": row.active,
                    "verified": verified,
                    "request": me.is_request(&row.id)?,
                    "disappearing": me.disappearing_timer(&row.id),
                }));
            }
            plain(Value::Array(out))
        }
        "openDirect" => {
            let HandleParams { handle } = params(p)?;
            let id = client.open_direct(&handle).await?;
            plain(json!({ "conversation": id.to_hex() }))
        }
        "account" => {
            params::<NoParams>(p)?;
            let me = me.identity().address();
            let connected = shared.connected.load(std::sync::atomic::Ordering::Relaxed);
            plain(json!({ "handle": me.handle.as_str(), "device": me.device.to_hex(), "connected": connected }))
        }
        "groupAdd" => {
            let GroupMemberParams { group, handle } = params(p)?;
            let id = crate::target::group(me, &group).await?;
            // Someone who was a member before continues in a new
            // conversation: its id and members come back.
            let moved = me
                .group_add(&id, &handle)
                .await?
                .map(|g| json!({ "name": g.name, "id": g.id, "members": g.members, "active": g.active }));
            plain(json!({ "added": handle.trim_start_matches('@'), "conversation": id.to_hex(), "moved": moved }))
        }
        "groupRemove" => {
            let GroupMemberParams { group, handle } = params(p)?;
            let id = crate::target::group(me, &group).await?;
            me.group_remove(&id, &handle).await?;
            plain(json!({ "removed": handle.trim_start_matches('@'), "conversation": id.to_hex() }))
        }
        "groupLeave" => {
            let GroupParams { group } = params(p)?;
            let id = crate::target::group(me, &group).await?;
            me.group_leave(&id).await?;
            plain(json!({ "left": id.to_hex() }))
        }
        "groupRename" => {
            let GroupRenameParams { group, name } = params(p)?;
            let id = crate::target::group(me, &group).await?;
            me.group_rename(&id, &name).await?;
            plain(json!({ "renamed": id.to_hex(), "name": name }))
        }
        "safetyNumber" => {
            let HandleParams { handle } = params(p)?;
            let n = me.safety_number(&handle).await?;
            plain(json!({ "handle": handle.trim_start_matches('@'), "safety_number": n }))
        }
        "verify" => {
            // A script cannot look the other person in the eye: it says
            // which number was compared, and only that number verifies.
            // Compared and marked in one transaction.
            let VerifyParams { handle, safety_number } = params(p)?;
            me.verify_safety_number(&handle, &safety_number).await?;
            plain(json!({ "handle": handle.trim_start_matches('@'), "verified": true }))
        }
        "version" => {
            params::<NoParams>(p)?;
            plain(json!({ "version": env!("CARGO_PKG_VERSION") }))
        }
        "call" | "answer" => calls::run(shared, tx, method == "answer", p).await,
        "hangUp" => {
            params::<NoParams>(p)?;
            plain(calls::hang_up(shared))
        }
        _ => match conversation_settings(shared, method, p).await {
            Some(answer) => answer,
            None => Err(Failure(METHOD_NOT_FOUND, format!("no method {:?}", term::safe(method)))),
        },
    }
}

/// The methods of the commands about whom to hear from and how long
/// messages stay: `disappearing`, `requests`, `accept`, `block`,
/// `unblock`, `accountDelete`, `linklistStatus`, `linklistImport`. `None`
/// for another method.
async fn conversation_settings(shared: &Arc<Shared>, method: &str, p: Value) -> Option<Answer> {
    const METHODS: &[&str] = &[
        "disappearing",
        "requests",
        "accept",
        "block",
        "unblock",
        "accountDelete",
        "linklistStatus",
        "linklistImport",
    ];
    if !METHODS.contains(&method) {
        return None;
    }
    Some(settings_call(shared, method, p).await)
}

async fn settings_call(shared: &Arc<Shared>, method: &str, p: Value) -> Answer {
    let me = shared.device();
    match method {
        "disappearing" => {
            let DisappearingParams { recipient, conversation, duration } = params(p)?;
            let seconds = crate::parse_disappearing(&duration)?;
            let id = match (Which { recipient, conversation }).place()? {
                Place::Id(id) => id,
                Place::Named(t) => crate::target::conversation(me, &t)?,
            };
            let changed = me.set_disappearing(&id, seconds).await?;
            Ok((json!({ "conversation": id.to_hex(), "seconds": seconds, "changed": changed }), None))
        }
        "requests" => {
            params::<NoParams>(p)?;
            let rows: Vec<Value> = me.requests()?.iter().map(request_value).collect();
            Ok((Value::Array(rows), None))
        }
        "accept" => {
            let id = match params::<Which>(p)?.place()? {
                Place::Id(id) => id,
                Place::Named(t) => crate::target::conversation(me, &t)?,
            };
            let accepted = me.accept(&id)?;
            Ok((json!({ "conversation": id.to_hex(), "accepted": accepted }), None))
        }
        "block" => {
            let HandleParams { handle } = params(p)?;
            let left = me.block(&handle).await?;
            let left: Vec<String> = left.iter().map(ConversationId::to_hex).collect();
            Ok((json!({ "blocked": handle.trim_start_matches('@'), "left": left }), None))
        }
        "unblock" => {
            let HandleParams { handle } = params(p)?;
            let was = me.unblock(&handle)?;
            Ok((json!({ "unblocked": handle.trim_start_matches('@'), "was_blocked": was }), None))
        }
        "accountDelete" => {
            let AccountDeleteParams { handle } = params(p)?;
            let mine = me.handle().as_str().to_string();
            if handle.trim_start_matches('@') != mine {
                return Err(invalid("handle must be this account's handle, typed again"));
            }
            // Said first: the server refuses this device while the deletion
            // runs, which ends the handle's loop.
            shared.deleted.store(true, std::sync::atomic::Ordering::Relaxed);
            let left = match me.delete_account().await {
                Ok(left) => left,
                Err(e) => {
                    shared.deleted.store(false, std::sync::atomic::Ordering::Relaxed);
                    return Err(e.into());
                }
            };
            // Nothing is left to serve: the daemon stops once the
            // connection that asked closes.
            Ok((json!({ "deleted": mine, "left": left }), None))
        }
        "linklistStatus" => {
            params::<NoParams>(p)?;
            Ok((me.link_list()?.map_or(Value::Null, |l| json!({ "version": l.version(), "entries": l.len() })), None))
        }
        "linklistImport" => {
            let LinklistImportParams { file } = params(p)?;
            let path = PathBuf::from(file);
            if !path.is_absolute() {
                return Err(invalid("file takes an absolute path"));
            }
            let bytes = crate::read_list_file(&path)?;
            let v = match me.import_link_list(&bytes)? {
                subrosa_client::linklist::Imported::New { version, entries, replaced } => {
                    json!({ "version": version, "entries": entries, "replaced": replaced, "new": true })
                }
                subrosa_client::linklist::Imported::Same { version } => json!({ "version": version, "new": false }),
                _ => json!({ "new": false }),
            };
            Ok((v, None))
        }
        _ => Err(Failure(METHOD_NOT_FOUND, format!("no method {:?}", term::safe(method)))),
    }
}

/// A `requests` item: the conversation's name, `direct` or `group`, its id.
pub(crate) fn request_value(row: &subrosa_client::ConversationRow) -> Value {
    let kind = if row.kind == "group" { "group" } else { "direct" };
    json!({ "name": row.target(), "kind": kind, "id": row.id.to_hex() })
}

/// `send` with files: sealed, uploaded (with `progress` notifications on
/// the caller's connection) and sent as one message, as `send --attach`.
async fn send_files(
    shared: &Arc<Shared>,
    tx: &mpsc::Sender<Outgoing>,
    to: &Target,
    caption: &str,
    reply: bool,
    attachments: &[String],
) -> Answer {
    let me = shared.device();
    if reply {
        return Err(invalid("replyTo does not go with attachments yet: send the files, then reply"));
    }
    let paths: Vec<PathBuf> = attachments.iter().map(PathBuf::from).collect();
    // Relative to what? The daemon's working directory is not the caller's.
    if let Some(p) = paths.iter().find(|p| !p.is_absolute()) {
        return Err(invalid(format!("attachments take absolute paths: {}", term::safe(&p.to_string_lossy()))));
    }
    match me.send_attachments(&shared.home, to, caption, &paths, false, &mut progress_lines(tx)).await {
        Ok(Some(m)) => Ok((message_json(me, &m), None)),
        Ok(None) => Err(Failure(COMMAND_FAILED, "the files were sent without a history line".into())),
        Err(ClientError::Pending(_)) => Ok((json!({ "queued": true }), None)),
        Err(e) => Err(e.into()),
    }
}

/// A transfer's progress as `progress` notifications on one connection
/// (`{"label", "done", "total"}`, at most one per percent; dropped, never
/// waited for, when the connection is behind).
fn progress_lines(tx: &mpsc::Sender<Outgoing>) -> impl FnMut(&str, u64, u64) + Send {
    let tx = tx.clone();
    let mut last: Option<(String, u64)> = None;
    move |label: &str, done: u64, total: u64| {
        let percent = done.saturating_mul(100).checked_div(total).unwrap_or(0);
        if last.as_ref().is_some_and(|(l, p)| l == label && *p == percent) {
            return;
        }
        last = Some((label.to_string(), percent));
        let params = json!({ "label": label, "done": done, "total": total });
        if let Ok(line) = term::json_line(&json!({ "jsonrpc": "2.0", "method": "progress", "params": params })) {
            let _ = tx.try_send((line, None));
        }
    }
}

/// The notification of an event other than a message, if it has one:
/// `messageState` (one of this device's messages reached the server, or
/// was refused: the message in its new state), `alert`, `dropped`.
fn other_notification(e: &ClientEvent) -> Option<String> {
    let (method, params) = match e {
        ClientEvent::MessageState(m) => ("messageState", message_value(m)),
        ClientEvent::SendFailed(f) => ("messageState", message_value(f.message.as_ref()?)),
        ClientEvent::Alert(text) => ("alert", json!({ "text": text })),
        ClientEvent::Dropped { from, reason } => ("dropped", json!({ "from": from, "reason": reason })),
        // The daemon's own connection to the server, for front ends that
        // show it (the terminal UI says when it reconnects).
        ClientEvent::Connected => ("connection", json!({ "connected": true })),
        ClientEvent::Disconnected { reason, retry_in } => {
            ("connection", json!({ "connected": false, "reason": reason, "retry_in_ms": retry_in.as_millis() as u64 }))
        }
        _ => return None,
    };
    term::json_line(&json!({ "jsonrpc": "2.0", "method": method, "params": params })).ok()
}

/// A subscription: replays from the store what was stored after arrival
/// number `after` (and from `since_ms` on), then follows the event stream,
/// reading each new message back from the store with its number (so what
/// it missed while it fell behind comes too, in order).
async fn notify(
    shared: Arc<Shared>,
    tx: mpsc::Sender<Outgoing>,
    mut events: broadcast::Receiver<ClientEvent>,
    mut after: u64,
    mut since_ms: u64,
) {
    loop {
        match shared.pending(after, since_ms) {
            Ok(p) => {
                after = p.high;
                since_ms = 0;
                for (seq, m) in &p.messages {
                    let params = numbered(*seq, message_json(shared.device(), m));
                    let line = json!({ "jsonrpc": "2.0", "method": "message", "params": params });
                    if tx.send((term::json_line(&line).unwrap_or_default(), None)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!("cannot read the store for a subscription: {e}"),
        }
        // Until the next message (or a fall behind, which the store mends).
        loop {
            match events.recv().await {
                Ok(ClientEvent::Message(_) | ClientEvent::System(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    break
                }
                Ok(other) => {
                    // Live only (the store keeps the messages' states, not these events).
                    if let Some(line) = other_notification(&other) {
                        if tx.send((line, None)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_record_bytes_stay_the_same() {
        let a = Acked { seq: 1_234 };
        let bytes = a.encode().expect("encode");
        assert_eq!(String::from_utf8(bytes.clone()).expect("utf-8"), r#"{"seq":1234}"#);
        assert_eq!(Acked::decode(&bytes), Some(a));
        assert_eq!(Acked::decode(b"not json"), None);
    }

    /// The objects scripts parse, byte for byte (a change here breaks bots).
    #[test]
    fn result_shapes_stay_the_same() {
        let sent = StoredMessage {
            id: "0c0d".into(),
            conversation: "0a0b".into(),
            target: "alice".into(),
            from: "bob".into(),
            device: "0e0f".into(),
            sent_at: 1_700_000_000_000,
            received_at: 1_700_000_000_001,
            text: "hi \u{1b}[2J".into(),
            outgoing: true,
            state: Some(subrosa_client::store::MessageState::Queued),
            ..Default::default()
        };
        let line = |v: &Value| term::json_line(v).expect("a line");
        // `send`'s result (queued), and a `history` item.
        assert_eq!(
            line(&message_value(&sent)),
            r#"{"conversation":"0a0b","device":"0e0f","from":"bob","group":false,"id":"0c0d","outgoing":true,"received_at":1700000000001,"sent_at":1700000000000,"state":"queued","system":false,"target":"alice","text":"hi \u001b[2J"}"#
        );
        // A message handed to a front end, with its arrival number.
        let incoming = StoredMessage { outgoing: false, state: None, ..sent };
        assert_eq!(
            line(&numbered_value(7, &incoming)),
            r#"{"conversation":"0a0b","device":"0e0f","from":"bob","group":false,"id":"0c0d","outgoing":false,"received_at":1700000000001,"sent_at":1700000000000,"seq":7,"system":false,"target":"alice","text":"hi \u001b[2J"}"#
        );
        // A stranger's message, marked for showing (`request`, a link on
        // the dangerous-link list).
        let marked = StoredMessage {
            request: true,
            dangerous_links: vec!["https://evil.example/".into()],
            text: "see https://evil.example/".into(),
            ..incoming.clone()
        };
        assert_eq!(
            line(&message_value(&marked)),
            r#"{"conversation":"0a0b","dangerous_links":["https://evil.example/"],"device":"0e0f","from":"bob","group":false,"id":"0c0d","outgoing":false,"received_at":1700000000001,"request":true,"sent_at":1700000000000,"system":false,"target":"alice","text":"see https://evil.example/"}"#
        );
        // A `requests` item.
        let row = subrosa_client::ConversationRow {
            id: ConversationId([0xab; 16]),
            kind: "direct".into(),
            name: String::new(),
            peer: Some("mallory".into()),
            active: true,
        };
        assert_eq!(
            line(&request_value(&row)),
            r#"{"id":"abababababababababababababababab","kind":"direct","name":"mallory"}"#
        );
        // A `members` item.
        assert_eq!(
            line(&member_value("alice", "0102", "ab cd", false, Some(3), subrosa_core::PQ_CIPHERSUITE)),
            r#"{"device":"0102","fingerprint":"ab cd","handle":"alice","stale_days":3,"suite":65100,"this_device":false}"#
        );
        // `members --json`.
        assert_eq!(
            line(&members_json(subrosa_core::CIPHERSUITE, vec![])),
            r#"{"members":[],"post_quantum":false,"suite":1,"suite_name":"X25519 (classical)"}"#
        );
        // An error answer.
        assert_eq!(
            error_line(json!(4), INVALID_PARAMS, "invalid params: missing field `message`"),
            r#"{"error":{"code":-32602,"message":"invalid params: missing field `message`"},"id":4,"jsonrpc":"2.0"}"#
        );
    }

    #[test]
    fn requests_decode_and_bad_ones_get_their_error() {
        let code = |line: &[u8]| match decode_line(line) {
            Err(Failure(c, _)) => c,
            Ok(Line::Batch(b)) => i64::try_from(b.len()).expect("len"),
            Ok(Line::One(v)) => match decode_request(v) {
                Ok(_) => 0,
                Err((_, Failure(c, _))) => c,
            },
        };
        assert_eq!(code(br#"{"jsonrpc":"2.0","id":1,"method":"receive"}"#), 0);
        assert_eq!(code(b"{"), PARSE_ERROR);
        assert_eq!(code(b"[]"), INVALID_REQUEST);
        assert_eq!(code(b"[1,2]"), 2);
        assert_eq!(code(b"3"), INVALID_REQUEST);
        assert_eq!(code(br#"{"jsonrpc":"1.0","id":1,"method":"x"}"#), INVALID_REQUEST);
        assert_eq!(code(br#"{"jsonrpc":"2.0","id":[1],"method":"x"}"#), INVALID_REQUEST);
        assert_eq!(code(br#"{"jsonrpc":"2.0","id":1}"#), INVALID_REQUEST);
        assert_eq!(code(br#"{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}"#), INVALID_PARAMS);
        let Ok(Line::One(v)) = decode_line(br#"{"jsonrpc":"2.0","method":"ack","params":{"seq":5}}"#) else {
            panic!("one request")
        };
        let r = decode_request(v).ok().expect("a request");
        assert_eq!((r.id.is_none(), r.method.as_str()), (true, "ack"));
        assert_eq!(params::<AckParams>(r.params).ok().map(|a| a.seq), Some(5));
        assert!(params::<AckParams>(json!({ "seq": -1 })).is_err());
    }

    #[test]
    fn the_older_record_still_reads() {
        let old: Consumed = serde_json::from_str(r#"{"floor":100,"ids":{"0a0b/0c0d":101}}"#).expect("the older record");
        let msg = |id: &str, at| StoredMessage {
            id: id.into(),
            conversation: "0a0b".into(),
            received_at: at,
            ..Default::default()
        };
        assert!(!old.wants(&msg("00", 99)), "before the floor: handed over");
        assert!(!old.wants(&msg("0c0d", 101)), "listed: handed over");
        assert!(old.wants(&msg("0e0f", 101)));
    }
}

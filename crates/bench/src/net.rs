//! `latency` and `throughput`: real clients over a real server on loopback.
//!
//! `Subrosa::follow` takes a `&mut dyn FnMut` callback, so its future is not
//! `Send` and cannot be spawned on the multi-threaded runtime. Each
//! receiver therefore follows on its own OS thread with a current-thread
//! runtime (as a real device would run in its own process); senders, the
//! in-process server and the measurements run on the multi-threaded runtime.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use subrosa_client::{Client, ClientEvent, Subrosa};
use subrosa_server::{RunningServer, ServerConfig};
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio::task::JoinSet;

/// Size of every message text, in bytes.
const MESSAGE_BYTES: usize = 200;
/// Passphrase of the benchmark's throw-away stores.
const PASSPHRASE: &str = "subrosa-bench passphrase";
/// Give up waiting when nothing arrives for this long.
const STALL: Duration = Duration::from_secs(30);

/// The server the clients talk to: in-process, or given by `--server`.
struct Harness {
    server: Option<RunningServer>,
    url: String,
    // Holds the server's data and the clients' homes until the run ends.
    tmp: tempfile::TempDir,
}

impl Harness {
    async fn start(server: Option<String>) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("subrosa-bench-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let cores = crate::cores();
        match server {
            Some(url) => {
                println!("server: {url} (external); the {cores} cores of this machine run the clients only");
                Ok(Harness { server: None, url, tmp })
            }
            None => {
                let listen = "127.0.0.1:0".parse().context("loopback address")?;
                let config = ServerConfig::new(listen, tmp.path().join("server"));
                let running = subrosa_server::start(config).await.context("cannot start the in-process server")?;
                let url = running.url();
                println!(
                    "server: in-process subrosa_server::start at {url}, SQLite in {}",
                    tmp.path().join("server").display()
                );
                println!(
                    "caveat: the server, its SQLite database and every client share this machine's {cores} cores \
                     (one process, one multi-threaded tokio runtime; each receiver is a task on it)"
                );
                Ok(Harness { server: Some(running), url, tmp })
            }
        }
    }

    fn home(&self, name: &str) -> PathBuf {
        self.tmp.path().join("homes").join(name)
    }

    async fn shutdown(self) {
        if let Some(s) = self.server {
            s.shutdown().await;
        }
    }
}

/// A random suffix so that handles never collide on a reused server.
fn suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// `prefix` padded with `x` to [`MESSAGE_BYTES`].
fn message_text(prefix: String) -> String {
    let mut t = prefix;
    while t.len() < MESSAGE_BYTES {
        t.push('x');
    }
    t
}

async fn register(home: PathBuf, handle: String, url: String) -> anyhow::Result<Subrosa> {
    Subrosa::register(&home, PASSPHRASE, &handle, &url)
        .await
        .with_context(|| format!("cannot register {handle} on {url}"))
}

/// What a receiver thread reports.
#[derive(Debug)]
enum Delivery {
    /// A message from the peer, and when the callback saw it.
    Got { text: String, at: Instant },
    /// A message that could not be decrypted.
    Dropped { reason: String },
    /// `follow` ended with an error.
    Ended { who: String, error: String },
}

/// A receiver following through its shared client handle, on a task of
/// the benchmark's runtime (no thread of its own): one subscriber to the
/// handle's events forwards the deliveries.
struct Follower {
    running: tokio::task::JoinHandle<Result<(), subrosa_client::ClientError>>,
    forward: tokio::task::JoinHandle<()>,
}

impl Follower {
    fn spawn(who: String, device: Subrosa, tx: mpsc::UnboundedSender<Delivery>) -> anyhow::Result<Self> {
        let client = Client::new(device);
        let mut events = client.events();
        let running = client.spawn();
        let forward = tokio::spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx.send(Delivery::Ended { who, error: format!("fell {n} events behind") });
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let at = Instant::now();
                match event {
                    ClientEvent::Message(m) if !m.outgoing => {
                        let _ = tx.send(Delivery::Got { text: m.text, at });
                    }
                    ClientEvent::Dropped { reason, .. } => {
                        let _ = tx.send(Delivery::Dropped { reason });
                    }
                    // A benchmark does not ride out a lost connection.
                    ClientEvent::Disconnected { reason, .. } => {
                        let _ = tx.send(Delivery::Ended { who, error: reason });
                        return;
                    }
                    _ => {}
                }
            }
        });
        Ok(Follower { running, forward })
    }

    fn stop(self) {
        self.running.abort();
        self.forward.abort();
    }
}

/// Receives the next delivery, failing after [`STALL`] or when a follower died.
async fn next_delivery(rx: &mut mpsc::UnboundedReceiver<Delivery>) -> anyhow::Result<Delivery> {
    match tokio::time::timeout(STALL, rx.recv()).await {
        Err(_) => bail!("no message arrived for {} s", STALL.as_secs()),
        Ok(None) => bail!("every receiver stopped"),
        Ok(Some(Delivery::Ended { who, error })) => bail!("{who}'s follow ended: {error}"),
        Ok(Some(d)) => Ok(d),
    }
}

/// CPU time (user + system, all threads) this process used so far, from
/// `/proc/self/stat` (Linux, where the tick is 10 ms); `None` elsewhere.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name: state is the first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// One line on how busy the cores were over `wall`, and the CPU per message.
fn print_cpu(cpu: Option<Duration>, wall: Duration, messages: usize) {
    let Some(cpu) = cpu else { return };
    let cores = crate::cores();
    row(
        "process CPU while timed",
        format!(
            "{:.2} s over {:.2} s wall = {:.0}% of {cores} cores; {:.2} ms CPU per message (clients + server)",
            cpu.as_secs_f64(),
            wall.as_secs_f64(),
            100.0 * cpu.as_secs_f64() / (wall.as_secs_f64() * cores as f64).max(1e-9),
            ms(cpu) / messages.max(1) as f64
        ),
    );
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One labelled figure, aligned with [`print_distribution`].
fn row(label: &str, value: String) {
    println!("  {label:<34} {value}");
}

fn print_distribution(label: &str, values: &mut [Duration]) {
    values.sort();
    let mean = values.iter().sum::<Duration>().checked_div(values.len() as u32).unwrap_or_default();
    println!(
        "  {label:<34} p50 {:>8.2}  p90 {:>8.2}  p99 {:>8.2}  max {:>8.2}  mean {:>8.2}  (ms, n={})",
        ms(percentile(values, 0.50)),
        ms(percentile(values, 0.90)),
        ms(percentile(values, 0.99)),
        ms(values.last().copied().unwrap_or_default()),
        ms(mean),
        values.len()
    );
}

fn probe_index(text: &str, tag: &str) -> Option<usize> {
    let mut words = text.split_whitespace();
    (words.next()? == tag).then_some(())?;
    words.next()?.parse().ok()
}

/// `latency`: alice sends, bob's follow callback sees it.
pub async fn latency(messages: usize, server: Option<String>) -> anyhow::Result<()> {
    println!("latency: send_text (alice) -> follow callback (bob), {messages} messages of {MESSAGE_BYTES} bytes, one at a time");
    let h = Harness::start(server).await?;
    let sfx = suffix();
    let setup = Instant::now();
    let alice = register(h.home("alice"), format!("lat-alice-{sfx}"), h.url.clone()).await?;
    let bob = register(h.home("bob"), format!("lat-bob-{sfx}"), h.url.clone()).await?;
    let bob_handle = bob.handle().to_string();
    println!("setup: registered alice and bob in {:.0} ms", ms(setup.elapsed()));

    let (tx, mut rx) = mpsc::unbounded_channel();
    let follower = Follower::spawn("bob".into(), bob, tx)?;
    let result = latency_run(&alice, &bob_handle, messages, &mut rx).await;
    follower.stop();
    h.shutdown().await;
    let (first, mut total, mut send, cpu, wall) = result?;
    println!(
        "setup: conversation established (key package claim, group, Welcome, first message) in {:.1} ms",
        ms(first)
    );
    println!();
    print_distribution("end-to-end (send_text -> callback)", &mut total);
    print_distribution("send_text call alone (alice)", &mut send);
    row(
        "median difference",
        format!(
            "{:.2} ms (server push, bob's decrypt and store commit, partly overlapping alice's HTTP response)",
            ms(percentile(&total, 0.5).saturating_sub(percentile(&send, 0.5)))
        ),
    );
    print_cpu(cpu, wall, messages);
    Ok(())
}

/// Waits until bob's callback saw probe `i`; returns when.
async fn wait_for(rx: &mut mpsc::UnboundedReceiver<Delivery>, i: usize) -> anyhow::Result<Instant> {
    loop {
        match next_delivery(rx).await? {
            Delivery::Got { text, at } if probe_index(&text, "probe") == Some(i) => return Ok(at),
            Delivery::Got { .. } => {}
            Delivery::Dropped { reason } => bail!("bob dropped a message: {reason}"),
            Delivery::Ended { who, error } => bail!("{who}'s follow ended: {error}"),
        }
    }
}

/// First-message time, end-to-end and send_text times, CPU and wall time of the timed part.
type LatencyFigures = (Duration, Vec<Duration>, Vec<Duration>, Option<Duration>, Duration);

/// The direct conversation with `handle`.
fn direct(handle: &str) -> anyhow::Result<subrosa_client::Target> {
    Ok(subrosa_client::Target::Direct(handle.parse().map_err(|e| anyhow::anyhow!("handle {handle:?}: {e}"))?))
}

async fn latency_run(
    alice: &Subrosa,
    bob: &str,
    messages: usize,
    rx: &mut mpsc::UnboundedReceiver<Delivery>,
) -> anyhow::Result<LatencyFigures> {
    let t0 = Instant::now();
    let bob = &direct(bob)?;
    alice.send_text(bob, &message_text("probe 0 ".into())).await.context("alice's first message failed")?;
    let first = wait_for(rx, 0).await.context("the first message never arrived")? - t0;
    let mut total = Vec::with_capacity(messages);
    let mut send = Vec::with_capacity(messages);
    let (cpu0, wall0) = (process_cpu(), Instant::now());
    for i in 1..=messages {
        let text = message_text(format!("probe {i} "));
        let t0 = Instant::now();
        alice.send_text(bob, &text).await.with_context(|| format!("alice's message {i} failed"))?;
        let sent = Instant::now();
        let at = wait_for(rx, i).await.with_context(|| format!("message {i} never arrived"))?;
        total.push(at.saturating_duration_since(t0));
        send.push(sent - t0);
    }
    let cpu = process_cpu().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    Ok((first, total, send, cpu, wall0.elapsed()))
}

/// `throughput`: many pairs sending at once.
pub async fn throughput(pairs: usize, per_pair: usize, server: Option<String>) -> anyhow::Result<()> {
    println!(
        "throughput: {pairs} sender/receiver pairs ({} users), {per_pair} messages of {MESSAGE_BYTES} bytes per sender, all senders at once",
        pairs * 2
    );
    let h = Harness::start(server).await?;
    let sfx = suffix();

    // Register everyone before timing (Argon2id and 51 key packages each).
    let setup = Instant::now();
    let limit = Arc::new(Semaphore::new(crate::cores().max(1)));
    let mut tasks = JoinSet::new();
    for p in 0..pairs {
        for role in ["s", "r"] {
            let (home, handle, url, limit) =
                (h.home(&format!("{role}{p}")), format!("tp{role}{p}-{sfx}"), h.url.clone(), Arc::clone(&limit));
            tasks.spawn(async move {
                let _permit = limit.acquire().await.context("registration limiter closed")?;
                register(home, handle, url).await.map(|s| (p, role, s))
            });
        }
    }
    let mut senders: Vec<Option<Subrosa>> = (0..pairs).map(|_| None).collect();
    let mut receivers: Vec<Option<Subrosa>> = (0..pairs).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (p, role, s) = joined.context("a registration task panicked")??;
        if role == "s" {
            senders[p] = Some(s);
        } else {
            receivers[p] = Some(s);
        }
    }
    let senders: Vec<Arc<Subrosa>> = senders
        .into_iter()
        .map(|s| s.map(Arc::new).context("a sender was not registered"))
        .collect::<Result<_, _>>()?;
    let took = setup.elapsed();
    println!(
        "setup: registered {} users in {:.1} s ({:.0} ms each, {} at a time)",
        pairs * 2,
        took.as_secs_f64(),
        ms(took) / (pairs * 2) as f64,
        crate::cores()
    );

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut targets = Vec::with_capacity(pairs);
    let mut followers = Vec::with_capacity(pairs);
    for (p, r) in receivers.into_iter().enumerate() {
        let r = r.context("a receiver was not registered")?;
        targets.push(r.handle().to_string());
        followers.push(Follower::spawn(format!("receiver {p}"), r, tx.clone())?);
    }
    drop(tx);
    let result = throughput_run(&senders, &targets, per_pair, &mut rx).await;
    for f in followers {
        f.stop();
    }
    drop(senders);
    h.shutdown().await;
    result
}

async fn throughput_run(
    senders: &[Arc<Subrosa>],
    targets: &[String],
    per_pair: usize,
    rx: &mut mpsc::UnboundedReceiver<Delivery>,
) -> anyhow::Result<()> {
    let pairs = senders.len();
    // Establish every conversation (and every receiver's socket) first.
    let setup = Instant::now();
    let mut tasks = JoinSet::new();
    for (p, s) in senders.iter().enumerate() {
        let (s, target) = (Arc::clone(s), direct(&targets[p])?);
        tasks.spawn(async move {
            s.send_text(&target, &message_text(format!("tp {p} 0 ")))
                .await
                .with_context(|| format!("sender {p}'s first message failed"))
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a sender task panicked")??;
    }
    let mut established = 0;
    while established < pairs {
        if let Delivery::Got { .. } = next_delivery(rx).await.context("waiting for the first message of every pair")? {
            established += 1;
        }
    }
    println!(
        "setup: {pairs} conversations established and every receiver following in {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    // The timed part.
    let expected = pairs * per_pair;
    let cpu0 = process_cpu();
    let start = Instant::now();
    let mut send_tasks = JoinSet::new();
    for (p, s) in senders.iter().enumerate() {
        let (s, target) = (Arc::clone(s), direct(&targets[p])?);
        send_tasks.spawn(async move {
            let mut started = vec![start; per_pair];
            let mut errors = Vec::new();
            for seq in 1..=per_pair {
                started[seq - 1] = Instant::now();
                if let Err(e) = s.send_text(&target, &message_text(format!("tp {p} {seq} "))).await {
                    errors.push(e.to_string());
                }
            }
            if !errors.is_empty() {
                // Queued sends go out with the next send; there is none, so flush.
                if let Err(e) = s.flush_outbox().await {
                    errors.push(format!("final flush: {e}"));
                }
            }
            (p, started, errors, Instant::now())
        });
    }
    let mut started_at: Vec<Vec<Instant>> = vec![Vec::new(); pairs];
    let mut delivered_at: Vec<Vec<Option<Instant>>> = vec![vec![None; per_pair]; pairs];
    let (mut delivered, mut duplicates, mut dropped, mut strays) = (0usize, 0usize, Vec::new(), 0usize);
    let mut send_errors: Vec<String> = Vec::new();
    let mut senders_done: Option<Instant> = None;
    let mut last_delivery = start;
    let mut last_progress = Instant::now();
    while delivered < expected {
        tokio::select! {
            d = rx.recv() => match d {
                Some(Delivery::Got { text, at }) => {
                    last_progress = Instant::now();
                    let mut words = text.split_whitespace().skip(1);
                    let idx = words.next().and_then(|w| w.parse::<usize>().ok()).zip(words.next().and_then(|w| w.parse::<usize>().ok()));
                    match idx {
                        Some((p, seq)) if p < pairs && (1..=per_pair).contains(&seq) => {
                            let slot = &mut delivered_at[p][seq - 1];
                            if slot.is_some() {
                                duplicates += 1;
                            } else {
                                *slot = Some(at);
                                delivered += 1;
                                last_delivery = last_delivery.max(at);
                            }
                        }
                        _ => strays += 1,
                    }
                }
                Some(Delivery::Dropped { reason }) => dropped.push(reason),
                Some(Delivery::Ended { who, error }) => {
                    println!("warning: {who}'s follow ended: {error}");
                }
                None => break,
            },
            Some(joined) = send_tasks.join_next(), if !send_tasks.is_empty() => {
                let (p, started, errors, done) = joined.context("a sender task panicked")?;
                started_at[p] = started;
                send_errors.extend(errors);
                if send_tasks.is_empty() {
                    senders_done = Some(done);
                }
            }
            () = tokio::time::sleep_until((last_progress + STALL).into()) => {
                if send_tasks.is_empty() {
                    println!("warning: nothing arrived for {} s after the senders finished; counting the rest as lost", STALL.as_secs());
                    break;
                }
                last_progress = Instant::now();
            }
        }
    }
    let cpu = process_cpu().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    let wall = start.elapsed();
    while let Some(joined) = send_tasks.join_next().await {
        let (p, started, errors, done) = joined.context("a sender task panicked")?;
        started_at[p] = started;
        send_errors.extend(errors);
        senders_done = Some(senders_done.map_or(done, |d| d.max(done)));
    }

    let elapsed = last_delivery.saturating_duration_since(start);
    let lost = expected - delivered;
    println!();
    row("sent", format!("{expected} messages ({pairs} senders x {per_pair})"));
    row("delivered (counted at receivers)", delivered.to_string());
    row("lost", if lost == 0 { "0".into() } else { format!("{lost}   <-- NOT ZERO") });
    if duplicates + strays + dropped.len() + send_errors.len() > 0 {
        row("duplicates / strays / dropped", format!("{duplicates} / {strays} / {}", dropped.len()));
        row("send errors", send_errors.len().to_string());
        for e in send_errors.iter().chain(dropped.iter()).take(5) {
            println!("    e.g. {e}");
        }
    }
    row("first send -> last delivery", format!("{:.2} s", elapsed.as_secs_f64()));
    row("DELIVERED MESSAGES PER SECOND", format!("{:.0}", delivered as f64 / elapsed.as_secs_f64().max(1e-9)));
    if let Some(done) = senders_done {
        let s = done.saturating_duration_since(start);
        row(
            "senders finished after",
            format!("{:.2} s ({:.0} send_text calls/s)", s.as_secs_f64(), expected as f64 / s.as_secs_f64().max(1e-9)),
        );
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(delivered);
    for (p, row) in delivered_at.iter().enumerate() {
        for (i, at) in row.iter().enumerate() {
            if let (Some(at), Some(st)) = (at, started_at[p].get(i)) {
                lat.push(at.saturating_duration_since(*st));
            }
        }
    }
    print_distribution("latency under load", &mut lat);
    print_cpu(cpu, wall, delivered);
    Ok(())
}

/// `kt-start`: what checking the key directory adds to starting a
/// conversation. Times alice's first message to each of `contacts` new
/// people (claim, proof check, MLS group, send), then the directory work
/// inside it on its own: the self-monitoring lookup every sync does, the
/// proof check on the contact's keys, and an append-only step for a new epoch.
pub async fn kt_start(contacts: usize, server: Option<String>) -> anyhow::Result<()> {
    use reqwest::Method;
    use subrosa_proto::kt::{KtAudit, KtHead};
    use subrosa_proto::AccountInfo;

    println!("kt-start: alice's first message to {contacts} new contacts, and the key-directory checks inside it");
    let h = Harness::start(server).await?;
    let alice = register(h.home("alice"), format!("alice{}", suffix()), h.url.clone()).await?;
    let mut peers = Vec::with_capacity(contacts);
    for i in 0..contacts {
        let p = register(h.home(&format!("p{i}")), format!("p{i}x{}", suffix()), h.url.clone()).await?;
        peers.push(p.handle().clone());
    }
    alice.sync().await.context("alice's first sync")?;

    let mut first = Vec::with_capacity(contacts);
    for p in &peers {
        let t = Instant::now();
        alice
            .send_text(&subrosa_client::Target::Direct(p.clone()), &message_text("hello".into()))
            .await
            .context("first message")?;
        first.push(t.elapsed());
    }

    let head: KtHead = alice.api().call::<(), _>(Method::GET, "/v1/kt/head", None).await?;
    let vrf = head.vrf_public_key.as_slice().to_vec();
    let (mut monitor, mut verify, mut audit) = (Vec::new(), Vec::new(), Vec::new());
    let mut proof_bytes = 0usize;
    for p in &peers {
        // Self-monitoring, as every sync does: a round trip and a check.
        let t = Instant::now();
        let me: AccountInfo =
            alice.api().call::<(), _>(Method::GET, &format!("/v1/accounts/{}", alice.handle()), None).await?;
        subrosa_client::kt::verify_lookup(
            &vrf,
            alice.handle(),
            me.identity_key.as_slice(),
            &me.devices,
            me.kt.as_ref(),
        )?;
        monitor.push(t.elapsed());
        // The check on a contact's keys (the claim carries the same proof).
        let theirs: AccountInfo = alice.api().call::<(), _>(Method::GET, &format!("/v1/accounts/{p}"), None).await?;
        proof_bytes = theirs.kt.as_ref().map_or(0, |k| k.proof.len());
        let t = Instant::now();
        subrosa_client::kt::verify_lookup(
            &vrf,
            p,
            theirs.identity_key.as_slice(),
            &theirs.devices,
            theirs.kt.as_ref(),
        )?;
        verify.push(t.elapsed());
    }
    // One append-only step, fetched and checked, as when a new epoch appears.
    for e in 1..head.epoch.min(contacts as u64 + 1) {
        let t = Instant::now();
        let a: KtAudit =
            alice.api().call::<(), _>(Method::GET, &format!("/v1/kt/audit?from={e}&to={}", e + 1), None).await?;
        subrosa_client::kt::verify_audit(&a, e, e + 1).await?;
        audit.push(t.elapsed());
    }
    print_distribution("first message to a new contact", &mut first);
    print_distribution("self-monitor lookup (GET + check)", &mut monitor);
    print_distribution("contact proof check (CPU)", &mut verify);
    print_distribution("append-only step (GET + check)", &mut audit);
    row("lookup proof size", format!("{proof_bytes} bytes (protobuf)"));
    let extra = percentile(&monitor, 0.5) + percentile(&verify, 0.5);
    row(
        "directory work per first message",
        format!(
            "{:.2} ms of {:.2} ms median ({:.0}%), plus {:.2} ms when a new epoch appeared",
            ms(extra),
            ms(percentile(&first, 0.5)),
            100.0 * extra.as_secs_f64() / percentile(&first, 0.5).as_secs_f64().max(1e-9),
            ms(percentile(&audit, 0.5))
        ),
    );
    h.shutdown().await;
    Ok(())
}

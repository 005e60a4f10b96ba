//! The load benchmark shared by `load` (Subrosa) and `xmpp` (ejabberd): the
//! same devices, message size, traffic pattern and figures for both servers.
//!
//! A [`Target`] knows how to register devices, connect them and send one
//! message; everything else (phases, timing, percentiles, process CPU and
//! memory) lives here, so that both servers are measured by the same code.
//!
//! Phases, in order:
//! 1. register `max(--idle)` devices plus one deep-queue device;
//! 2. idle memory: server RSS with no device connected, then with each
//!    `--idle` count of authenticated, idle connections (cumulative), per
//!    connection; then every connection beyond `--devices` is closed;
//! 3. saturation (closed loop): `--concurrency` messages in flight end to
//!    end, each from a random connected device to a random other one; a new
//!    message goes out when one is delivered. Delivered msgs/s, server CPU
//!    per message, latency p50/p99;
//! 4. open loop at `--rate` msgs/s; when it is not sustained, again at lower
//!    rates (from 90% of the saturation throughput down) until one is;
//! 5. deep queue: `--deep` messages from `--deep-senders` concurrent senders
//!    into the inbox of the one device that stays offline (store rate), then
//!    that device connects and receives them all (drain rate).
//!
//! A message is delivered when the receiving connection read it (Subrosa:
//! the WebSocket push, acknowledged right after as a real client does;
//! XMPP: the `<message>` stanza). Latency is from just before the send to
//! that moment, both on this process's monotonic clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::future::BoxFuture;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;

/// Size of every message body, bytes.
pub const MESSAGE_BYTES: usize = 200;
/// Length of the text header at the start of every body: sequence number and send time, hex.
const HEADER_BYTES: usize = 32;

/// Options common to both load generators.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadOptions {
    /// Connected devices during the throughput, latency and deep-queue phases.
    #[arg(long, default_value_t = 2000)]
    pub devices: usize,
    /// Idle connection counts at which server memory is measured (cumulative); the largest is how many devices are registered.
    #[arg(long, value_delimiter = ',', default_value = "2000,10000")]
    pub idle: Vec<usize>,
    /// Messages in flight end to end in the closed-loop (saturation) phase.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Offered rate of the open-loop phase, msgs/s (0 skips the phase).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Warm-up before each timed phase, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Length of each timed phase, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Messages into the one deep offline queue (0 skips the phase).
    #[arg(long, default_value_t = 10_000)]
    pub deep: usize,
    /// Concurrent senders filling the deep queue.
    #[arg(long, default_value_t = 64)]
    pub deep_senders: usize,
    /// Concurrent registrations and connection set-ups.
    #[arg(long, default_value_t = 64)]
    pub setup_concurrency: usize,
    /// Open-loop sends still unanswered beyond which the rate counts as not sustained.
    #[arg(long, default_value_t = 5000)]
    pub max_in_flight: usize,
    /// Write the figures as JSON to this file (read by `subrosa-bench compare`).
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

impl LoadOptions {
    /// Checks the values; one clear line on error.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.devices >= 2, "--devices must be at least 2");
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        anyhow::ensure!(self.warmup >= 0.0 && self.warmup.is_finite(), "--warmup must be 0 or more seconds");
        anyhow::ensure!(self.seconds > 0.0 && self.seconds.is_finite(), "--seconds must be positive");
        anyhow::ensure!(self.deep == 0 || self.deep_senders >= 1, "--deep-senders must be at least 1");
        anyhow::ensure!(self.setup_concurrency >= 1, "--setup-concurrency must be at least 1");
        anyhow::ensure!(self.max_in_flight >= 1, "--max-in-flight must be at least 1");
        anyhow::ensure!(self.idle.iter().all(|&n| n >= 1), "every --idle count must be at least 1");
        Ok(())
    }

    /// Devices to register (excluding the deep-queue device).
    pub fn registered(&self) -> usize {
        self.idle.iter().copied().max().unwrap_or(0).max(self.devices)
    }
}

/// One server under test, as the phases see it. Device `i` is `0..registered`;
/// the deep-queue device is `registered` (never connected before the drain).
pub trait Target: Send + Sync + 'static {
    /// Registers devices `range` (called with chunks, concurrently).
    fn register(&self, device: usize) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Connects and authenticates device `i`; deliveries go to `sink`.
    fn connect(&self, device: usize, sink: Arc<Sink>) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Closes device `i`'s connection.
    fn disconnect(&self, device: usize);
    /// Sends one message; resolves when the server took it (Subrosa: the
    /// durable answer; XMPP: written to the socket, as XMPP has no answer).
    fn send(&self, from: usize, to: usize, body: Vec<u8>) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Resolves once every message `from` sent before is stored by the server
    /// (XMPP: a ping round trip on that stream; Subrosa: nothing to wait for).
    fn barrier(&self, from: usize) -> BoxFuture<'_, anyhow::Result<()>>;
    /// The server processes to measure (several nodes of one deployment:
    /// their CPU and memory are added up).
    fn server_pids(&self) -> Vec<u32>;
}

/// Where connections report what they received.
#[derive(Debug)]
pub struct Sink {
    base: Instant,
    delivered: AtomicU64,
    recording: AtomicBool,
    latencies_us: Mutex<Vec<u64>>,
    waiters: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    malformed: AtomicU64,
}

impl Sink {
    fn new() -> Self {
        Sink {
            base: Instant::now(),
            delivered: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            latencies_us: Mutex::new(Vec::new()),
            waiters: Mutex::new(HashMap::new()),
            malformed: AtomicU64::new(0),
        }
    }

    /// A message body of [`MESSAGE_BYTES`]: text header (sequence number and
    /// send time in hex) then `fill` bytes.
    pub fn body(&self, seq: u64, fill: impl Fn(usize) -> u8) -> Vec<u8> {
        let t = self.base.elapsed().as_nanos() as u64;
        let mut b = format!("{seq:016x}{t:016x}").into_bytes();
        b.extend((HEADER_BYTES..MESSAGE_BYTES).map(fill));
        b
    }

    /// Records one received body.
    pub fn delivered(&self, body: &[u8]) {
        let parsed = body
            .get(..HEADER_BYTES)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| Some((u64::from_str_radix(&h[..16], 16).ok()?, u64::from_str_radix(&h[16..], 16).ok()?)));
        let Some((seq, sent_ns)) = parsed else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let now = self.base.elapsed().as_nanos() as u64;
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if self.recording.load(Ordering::Relaxed) {
            lock(&self.latencies_us).push(now.saturating_sub(sent_ns) / 1000);
        }
        if let Some(w) = lock(&self.waiters).remove(&seq) {
            let _ = w.send(());
        }
    }

    fn delivered_count(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    fn start_recording(&self) {
        lock(&self.latencies_us).clear();
        self.recording.store(true, Ordering::Relaxed);
    }

    fn stop_recording(&self) -> Vec<u64> {
        self.recording.store(false, Ordering::Relaxed);
        let mut v = std::mem::take(&mut *lock(&self.latencies_us));
        v.sort_unstable();
        v
    }

    fn wait_for(&self, seq: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(seq, tx);
        rx
    }

    fn forget(&self, seq: u64) {
        lock(&self.waiters).remove(&seq);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Figures of one run, as written by `--json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    /// What was measured, e.g. "subrosa (sqlite)".
    pub server: String,
    /// Connected devices in the traffic phases.
    pub devices: usize,
    /// Closed-loop concurrency.
    pub concurrency: usize,
    /// Closed loop.
    pub saturation: Option<Traffic>,
    /// Open loop at `--rate`.
    pub open_loop: Option<Traffic>,
    /// The highest open-loop rate tried that was sustained, when `--rate` was not.
    pub sustained: Option<Traffic>,
    /// Server RSS per idle connection at each count.
    pub idle: Vec<IdleMemory>,
    /// Deep queue.
    pub deep: Option<DeepQueue>,
}

/// One traffic phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Traffic {
    /// Offered rate (open loop), msgs/s.
    pub offered_per_s: Option<f64>,
    /// Messages delivered during the timed window, per second.
    pub delivered_per_s: f64,
    /// Server CPU (user + system) per delivered message, µs.
    pub server_cpu_us_per_msg: f64,
    /// Server CPU over the window, in cores.
    pub server_cores: f64,
    /// This load generator's CPU per delivered message, µs.
    pub bench_cpu_us_per_msg: f64,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Whether the offered rate was sustained (open loop).
    pub sustained: Option<bool>,
}

/// Server memory with idle connections.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdleMemory {
    /// Idle authenticated connections.
    pub connections: usize,
    /// Server RSS with none, bytes.
    pub rss_base: u64,
    /// Server RSS with them, bytes.
    pub rss: u64,
    /// (rss - rss_base) / connections, bytes.
    pub per_connection: f64,
}

/// The deep-queue phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeepQueue {
    /// Messages queued.
    pub messages: usize,
    /// Stored per second.
    pub store_per_s: f64,
    /// Drained per second.
    pub drain_per_s: f64,
}

/// CPU time (user + system) of a process so far, from `/proc/PID/stat`.
pub fn process_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux configuration that matters.
    Some(Duration::from_millis(ticks * 10))
}

/// Resident set size of a process, bytes, from `/proc/PID/status`.
pub fn process_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time of several processes (the nodes of one deployment), added up.
fn processes_cpu(pids: &[u32]) -> anyhow::Result<Duration> {
    pids.iter().map(|pid| process_cpu(&pid.to_string()).with_context(|| format!("cannot read /proc/{pid}/stat"))).sum()
}

/// Resident set size of several processes, added up.
fn processes_rss(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|pid| process_rss(*pid).context("cannot read the server's RSS")).sum()
}

/// Raises this process's open-files limit to its hard limit (children inherit it).
pub fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// Nearest-rank percentile of sorted µs values, in ms.
fn percentile_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

/// CPU of the server and of this process, sampled together.
struct CpuMark {
    server: Duration,
    bench: Duration,
    at: Instant,
    delivered: u64,
}

impl CpuMark {
    fn take(pid: &[u32], sink: &Sink) -> anyhow::Result<Self> {
        Ok(CpuMark {
            server: processes_cpu(pid)?,
            bench: process_cpu("self").context("cannot read /proc/self/stat")?,
            at: Instant::now(),
            delivered: sink.delivered_count(),
        })
    }

    fn traffic(&self, end: &CpuMark, latencies: &[u64], offered: Option<f64>) -> Traffic {
        let msgs = end.delivered.saturating_sub(self.delivered).max(1) as f64;
        let wall = end.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let server = end.server.saturating_sub(self.server).as_secs_f64();
        Traffic {
            offered_per_s: offered,
            delivered_per_s: end.delivered.saturating_sub(self.delivered) as f64 / wall,
            server_cpu_us_per_msg: server * 1e6 / msgs,
            server_cores: server / wall,
            bench_cpu_us_per_msg: end.bench.saturating_sub(self.bench).as_secs_f64() * 1e6 / msgs,
            p50_ms: percentile_ms(latencies, 0.50),
            p99_ms: percentile_ms(latencies, 0.99),
            sustained: None,
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Picks a random ordered pair of distinct devices below `n`.
fn pair(n: usize) -> (usize, usize) {
    let mut rng = rand::thread_rng();
    let from = rng.gen_range(0..n);
    let mut to = rng.gen_range(0..n - 1);
    if to >= from {
        to += 1;
    }
    (from, to)
}

/// Runs `f(i)` for `i` in `range`, at most `limit` at a time; the first error wins.
async fn for_each<T, F>(target: &Arc<T>, range: std::ops::Range<usize>, limit: usize, f: F) -> anyhow::Result<()>
where
    T: Target + ?Sized,
    F: Fn(Arc<T>, usize) -> BoxFuture<'static, anyhow::Result<()>>,
{
    let mut set = JoinSet::new();
    for i in range {
        if set.len() >= limit {
            if let Some(r) = set.join_next().await {
                r.context("a set-up task failed")??;
            }
        }
        set.spawn(f(Arc::clone(target), i));
    }
    while let Some(r) = set.join_next().await {
        r.context("a set-up task failed")??;
    }
    Ok(())
}

/// The whole run; prints each figure as it is measured.
pub async fn run<T: Target>(target: Arc<T>, name: &str, o: &LoadOptions) -> anyhow::Result<Results> {
    let sink = Arc::new(Sink::new());
    let registered = o.registered();
    let deep_device = registered;
    let pids = target.server_pids();
    let pid = pids.as_slice();
    let mut results =
        Results { server: name.to_owned(), devices: o.devices, concurrency: o.concurrency, ..Default::default() };

    let t = Instant::now();
    for_each(&target, 0..registered + 1, o.setup_concurrency, |t, i| Box::pin(async move { t.register(i).await }))
        .await?;
    println!("registered {} devices in {:.1} s", registered + 1, t.elapsed().as_secs_f64());

    // Idle memory, cumulative counts.
    let mut idle: Vec<usize> = o.idle.clone();
    idle.sort_unstable();
    idle.dedup();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_base = processes_rss(pid)?;
    let mut connected = 0;
    for &n in &idle {
        let t = Instant::now();
        let s = Arc::clone(&sink);
        for_each(&target, connected..n, o.setup_concurrency, move |t, i| {
            let s = Arc::clone(&s);
            Box::pin(async move { t.connect(i, s).await })
        })
        .await?;
        connected = n;
        let took = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = processes_rss(pid)?;
        let per = rss.saturating_sub(rss_base) as f64 / n as f64;
        println!(
            "idle: {n} connections (set up in {took:.1} s): server RSS {:.1} MiB (base {:.1} MiB), {:.1} KiB per connection",
            rss as f64 / 1048576.0,
            rss_base as f64 / 1048576.0,
            per / 1024.0
        );
        results.idle.push(IdleMemory { connections: n, rss_base, rss, per_connection: per });
    }
    // Exactly --devices connected from here on.
    for i in o.devices..connected {
        target.disconnect(i);
    }
    if connected < o.devices {
        let s = Arc::clone(&sink);
        for_each(&target, connected..o.devices, o.setup_concurrency, move |t, i| {
            let s = Arc::clone(&s);
            Box::pin(async move { t.connect(i, s).await })
        })
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let seq = Arc::new(AtomicU64::new(1));
    let sat = closed_loop(&target, &sink, &seq, o, pid).await?;
    print_traffic("saturation (closed loop)", &sat);
    let sat_rate = sat.delivered_per_s;
    results.saturation = Some(sat);

    if o.rate > 0 {
        let open = open_loop(&target, &sink, &seq, o, pid, o.rate as f64).await?;
        print_traffic(&format!("open loop at {} msgs/s", o.rate), &open);
        let ok = open.sustained == Some(true);
        results.open_loop = Some(open);
        if !ok {
            let mut rate = (sat_rate * 0.9).min(o.rate as f64 * 0.8).floor();
            for _ in 0..5 {
                if rate < 1.0 {
                    break;
                }
                let r = open_loop(&target, &sink, &seq, o, pid, rate).await?;
                print_traffic(&format!("open loop at {rate:.0} msgs/s"), &r);
                if r.sustained == Some(true) {
                    results.sustained = Some(r);
                    break;
                }
                rate = (rate * 0.7).floor();
            }
            if results.sustained.is_none() {
                println!("no open-loop rate tried was sustained");
            }
        }
    }

    if o.deep > 0 {
        results.deep = Some(deep_queue(&target, &seq, o, deep_device).await?);
    }
    let malformed = sink.malformed.load(Ordering::Relaxed);
    if malformed > 0 {
        println!("warning: {malformed} received bodies were not ours");
    }
    Ok(results)
}

fn print_traffic(what: &str, t: &Traffic) {
    let sustained = match t.sustained {
        Some(true) => ", sustained",
        Some(false) => ", NOT sustained",
        None => "",
    };
    println!(
        "{what}: {:.0} delivered msgs/s{sustained}; latency p50 {:.2} ms, p99 {:.2} ms; server CPU {:.1} µs/msg ({:.2} cores); \
         load generator CPU {:.1} µs/msg",
        t.delivered_per_s, t.p50_ms, t.p99_ms, t.server_cpu_us_per_msg, t.server_cores, t.bench_cpu_us_per_msg
    );
}

/// Waits for a delivery, giving up after a while (a lost message must not hang the loop).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

async fn closed_loop<T: Target>(
    target: &Arc<T>,
    sink: &Arc<Sink>,
    seq: &Arc<AtomicU64>,
    o: &LoadOptions,
    pid: &[u32],
) -> anyhow::Result<Traffic> {
    let stop = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..o.concurrency {
        let (target, sink, seq, stop, lost) =
            (Arc::clone(target), Arc::clone(sink), Arc::clone(seq), Arc::clone(&stop), Arc::clone(&lost));
        let devices = o.devices;
        workers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (from, to) = pair(devices);
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let body = sink.body(n, |_| b'x');
                let got = sink.wait_for(n);
                if let Err(e) = target.send(from, to, body).await {
                    sink.forget(n);
                    return Err(e);
                }
                if tokio::time::timeout(DELIVERY_TIMEOUT, got).await.is_err() {
                    sink.forget(n);
                    lost.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        });
    }
    let result = async {
        tokio::time::sleep(secs(o.warmup)).await;
        sink.start_recording();
        let start = CpuMark::take(pid, sink)?;
        tokio::time::sleep(secs(o.seconds)).await;
        let end = CpuMark::take(pid, sink)?;
        let lat = sink.stop_recording();
        anyhow::Ok(start.traffic(&end, &lat, None))
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = workers.join_next().await {
        r.context("a sender task failed")??;
    }
    let lost = lost.load(Ordering::Relaxed);
    if lost > 0 {
        println!("warning: {lost} messages were not delivered within {} s", DELIVERY_TIMEOUT.as_secs());
    }
    result
}

/// Open loop: sends at `rate` on a 1 ms tick whatever the answers, for
/// warm-up plus the timed window. Sends that would exceed `--max-in-flight`
/// unanswered ones are dropped (the server is not keeping up). Not sustained
/// when any send was dropped, when fewer than 95% of the offered rate is
/// delivered, or when the messages sent are not all delivered 2 s after the
/// window.
async fn open_loop<T: Target>(
    target: &Arc<T>,
    sink: &Arc<Sink>,
    seq: &Arc<AtomicU64>,
    o: &LoadOptions,
    pid: &[u32],
    rate: f64,
) -> anyhow::Result<Traffic> {
    let in_flight = Arc::new(Semaphore::new(o.max_in_flight));
    let errors = Arc::new(Mutex::new(None::<String>));
    let begin = Instant::now();
    let total = secs(o.warmup + o.seconds);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut offered, mut sent, mut dropped) = (0u64, 0u64, 0u64);
    let mut start: Option<CpuMark> = None;
    let before = sink.delivered_count();
    while begin.elapsed() < total {
        tick.tick().await;
        let elapsed = begin.elapsed();
        if start.is_none() && elapsed >= secs(o.warmup) {
            sink.start_recording();
            start = Some(CpuMark::take(pid, sink)?);
        }
        let due = (elapsed.as_secs_f64() * rate) as u64;
        while offered < due {
            offered += 1;
            let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                dropped += 1;
                continue;
            };
            sent += 1;
            let (from, to) = pair(o.devices);
            let n = seq.fetch_add(1, Ordering::Relaxed);
            let body = sink.body(n, |_| b'x');
            let (target, errors) = (Arc::clone(target), Arc::clone(&errors));
            tokio::spawn(async move {
                if let Err(e) = target.send(from, to, body).await {
                    lock(&errors).get_or_insert(format!("{e:#}"));
                }
                drop(permit);
            });
        }
    }
    let end = CpuMark::take(pid, sink)?;
    let lat = sink.stop_recording();
    // Let the backlog drain (bounded) so that the next phase starts clean.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut drained_in_time = false;
    while Instant::now() < deadline {
        if sink.delivered_count() - before >= sent {
            drained_in_time = Instant::now() < begin + total + Duration::from_secs(2);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(e) = lock(&errors).take() {
        bail!("sending failed: {e}");
    }
    let start = start.context("the open-loop window never started")?;
    let mut t = start.traffic(&end, &lat, Some(rate));
    t.sustained = Some(dropped == 0 && drained_in_time && t.delivered_per_s >= 0.95 * rate);
    if dropped > 0 {
        println!(
            "open loop at {rate:.0} msgs/s: {dropped} of {offered} sends dropped ({} were unanswered at once)",
            o.max_in_flight
        );
    }
    Ok(t)
}

async fn deep_queue<T: Target>(
    target: &Arc<T>,
    seq: &Arc<AtomicU64>,
    o: &LoadOptions,
    deep_device: usize,
) -> anyhow::Result<DeepQueue> {
    // The drain counts on its own sink, so stray deliveries cannot mix in.
    let deep_sink = Arc::new(Sink::new());
    let next = Arc::new(AtomicU64::new(0));
    let senders = o.deep_senders.min(o.devices);
    let start = Instant::now();
    let mut set = JoinSet::new();
    for s in 0..senders {
        let (target, seq, next, sink) =
            (Arc::clone(target), Arc::clone(seq), Arc::clone(&next), Arc::clone(&deep_sink));
        let total = o.deep as u64;
        set.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                target.send(s, deep_device, sink.body(n, |_| b'x')).await?;
            }
            target.barrier(s).await
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("a deep-queue sender failed")??;
    }
    let stored = start.elapsed();
    let store_per_s = o.deep as f64 / stored.as_secs_f64();
    println!(
        "deep queue: {} messages stored for one offline device in {:.2} s: {store_per_s:.0} msgs/s ({senders} senders)",
        o.deep,
        stored.as_secs_f64()
    );
    let start = Instant::now();
    target.connect(deep_device, Arc::clone(&deep_sink)).await?;
    let deadline = start + Duration::from_secs(600);
    let mut last = (0, Instant::now());
    while deep_sink.delivered_count() < o.deep as u64 {
        let now = deep_sink.delivered_count();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(30) || Instant::now() > deadline {
            bail!("deep queue: the drain stalled after {now} of {} messages", o.deep);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let drained = start.elapsed();
    let drain_per_s = o.deep as f64 / drained.as_secs_f64();
    println!(
        "deep queue: drained by the device coming online in {:.2} s: {drain_per_s:.0} msgs/s",
        drained.as_secs_f64()
    );
    target.disconnect(deep_device);
    Ok(DeepQueue { messages: o.deep, store_per_s, drain_per_s })
}

/// Writes `results` to `--json` when given.
pub fn write_json(results: &Results, o: &LoadOptions) -> anyhow::Result<()> {
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(results).context("cannot encode the results")?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

//! `calls`: what a call adds to mouth-to-ear latency, what it costs a
//! client's CPU, and how many calls one relay carries, each beside a
//! baseline measured in the same run.
//!
//! **Latency and client CPU.** Two endpoints, each on its own thread with
//! its own 20 ms clock (the listener's half a frame behind the speaker's,
//! the average phase of two unsynchronised sound cards), call each other
//! for `--seconds` on loopback. Each one's input is a 5 ms tone burst every
//! 400 ms at a moving offset within the frame; mouth-to-ear is the time from
//! a burst's onset at the speaker's "microphone" (its sample time) to its
//! onset at the listener's "speaker" (the sample time of the frame played
//! at that tick), so it counts the 20 ms a frame takes to fill and the wait
//! for the next playout tick as a real device would. Two rows:
//! - (a) the baseline: raw PCM frames straight over UDP, no codec, no
//!   SFrame, no relay, no jitter buffer (at each tick the listener plays
//!   the newest frame that arrived since the last one, silence if none);
//! - (b) the call's chain as `subrosa call` runs it: Opus encode (32 kbit/s,
//!   in-band FEC), SFrame seal, the server's UDP relay (its own code, joined
//!   with a token by Join/Challenge/Prove), SFrame open, the adaptive
//!   jitter buffer, Opus decode.
//!
//! (b) − (a) is what encoding, encryption, relay and jitter buffer add. The
//! stages of (b) are also timed: encode + seal per frame, relay transit,
//! and the rest (Opus look-ahead, jitter-buffer depth). Client CPU is each
//! endpoint thread's own user + system time (getrusage of the thread) over
//! the call, as a share of one core; the relay thread's is printed too.
//!
//! **Relay capacity.** `N` concurrent 1:1 calls: `2N` devices, each sending
//! a 107-byte media datagram (an Opus frame's usual size sealed) every
//! 20 ms for `--step-seconds`, counted where they arrive. `N` doubles until
//! more than 1% is lost, then the gap is halved down to an eighth of the
//! last good step; the largest `N` at or under 1% is the figure. The
//! baseline is a plain UDP echo (each datagram sent back to its sender, no
//! tokens, no state) run the same way on the same kind of thread, so it
//! carries the same packets per second. The relay keeps its default limits;
//! the devices come from many loopback addresses (at most 50 per address)
//! so the per-source cap does not bind. The load runs in this process on a
//! two-thread runtime beside the relay's thread, so on a small machine the
//! generator competes with the relay; each step prints the relay thread's
//! CPU share, which shows whether the relay or the generator ran out.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::sys::resource::{getrusage, UsageWho};
use subrosa_media::codec::{EncoderConfig, FRAME_SAMPLES, SAMPLE_RATE};
use subrosa_media::jitter::{JitterConfig, FRAME};
use subrosa_media::pipeline::{Incoming, Outgoing};
use subrosa_media::secure::{ContextId, Epoch, EpochSecret, LeafIndex, Receiver, Sender};
use subrosa_proto::relay::{Datagram, Token};
use subrosa_proto::{ConversationId, DeviceAddress, DeviceId, Handle};
use subrosa_server::relay::{self, Issuer, RelayLimits};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use zeroize::Zeroizing;

/// Samples per millisecond.
const PER_MS: f64 = SAMPLE_RATE as f64 / 1000.0;
/// One burst every this many samples (400 ms).
const BURST_EVERY: usize = SAMPLE_RATE as usize * 2 / 5;
/// A burst lasts 5 ms.
const BURST_LEN: usize = SAMPLE_RATE as usize / 200;
/// The onset threshold, a quarter of the burst's amplitude.
const ONSET: i16 = 4_000;
/// Bursts skipped at the start (codec and jitter buffer settling).
const WARM_UP: usize = 2;
/// Devices bound to one loopback address (the relay's per-source cap is 100).
const PER_ADDRESS: usize = 50;

fn thread_cpu() -> Duration {
    let t = |tv: nix::sys::time::TimeVal| Duration::new(tv.tv_sec().max(0) as u64, (tv.tv_usec().max(0) as u32) * 1000);
    getrusage(UsageWho::RUSAGE_THREAD).map(|u| t(u.user_time()) + t(u.system_time())).unwrap_or_default()
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What a server thread runs.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// The server's relay, its default limits.
    Relay,
    /// Every datagram back to its sender.
    Echo,
}

/// A relay or an echo on its own thread and single-threaded runtime (the
/// relay is one task in the server too), which reports its thread's CPU.
struct ServerThread {
    addr: SocketAddr,
    issuer: Option<Arc<Issuer>>,
    stop: watch::Sender<bool>,
    probe: mpsc::UnboundedSender<oneshot::Sender<Duration>>,
    thread: std::thread::JoinHandle<()>,
}

impl ServerThread {
    fn start(kind: Kind) -> Result<Self> {
        let (stop, stop_rx) = watch::channel(false);
        let (probe, mut probe_rx) = mpsc::unbounded_channel::<oneshot::Sender<Duration>>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let any: SocketAddr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
                let started = match kind {
                    Kind::Relay => {
                        relay::bind(any, None).await.map_err(anyhow::Error::from).and_then(|(socket, issuer)| {
                            let addr = socket.local_addr()?;
                            // No call sockets here: their end is dropped.
                            let (_, events) = relay::socket::channel();
                            relay::spawn(socket, Arc::clone(&issuer), RelayLimits::default(), events, stop_rx.clone());
                            Ok((addr, Some(issuer)))
                        })
                    }
                    Kind::Echo => match UdpSocket::bind(any).await {
                        Ok(socket) => {
                            let addr = socket.local_addr();
                            let mut stop = stop_rx.clone();
                            tokio::spawn(async move {
                                let mut buf = vec![0u8; 2048];
                                loop {
                                    tokio::select! {
                                        got = socket.recv_from(&mut buf) => {
                                            let Ok((n, from)) = got else { continue };
                                            let _ = socket.try_send_to(&buf[..n], from);
                                        }
                                        _ = stop.changed() => return,
                                    }
                                }
                            });
                            addr.map(|a| (a, None)).map_err(anyhow::Error::from)
                        }
                        Err(e) => Err(e.into()),
                    },
                };
                let failed = started.is_err();
                let _ = ready_tx.send(started);
                if failed {
                    return;
                }
                let mut stop = stop_rx;
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        Some(reply) = probe_rx.recv() => { let _ = reply.send(thread_cpu()); }
                    }
                }
            });
        });
        let (addr, issuer) = ready_rx.recv().context("the server thread ended")??;
        Ok(Self { addr, issuer, stop, probe, thread })
    }

    /// The thread's CPU time so far.
    fn cpu(&self) -> Result<Duration> {
        let (tx, rx) = oneshot::channel();
        self.probe.send(tx).ok().context("the server thread ended")?;
        rx.blocking_recv().context("the server thread ended")
    }

    /// The same, from async code.
    async fn cpu_async(&self) -> Result<Duration> {
        let (tx, rx) = oneshot::channel();
        self.probe.send(tx).ok().context("the server thread ended")?;
        rx.await.context("the server thread ended")
    }

    fn token(&self, call: &ConversationId, name: &str) -> Result<Token> {
        let issuer = self.issuer.as_ref().context("an echo issues no tokens")?;
        let device = DeviceAddress { handle: Handle::from_str(name)?, device: DeviceId([1; 8]) };
        Ok(issuer.mint(call, &device, unix_seconds() + 3600))
    }

    fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.thread.join();
    }
}

/// Joins the relay from `socket` (connected to it): Join, Challenge, Prove, Joined.
async fn join(socket: &UdpSocket, token: Token) -> Result<()> {
    let mut buf = vec![0u8; 2048];
    let wait = Duration::from_millis(700);
    for _ in 0..5 {
        socket.send(&Datagram::Join(token).encode()).await?;
        let Ok(Ok(n)) = tokio::time::timeout(wait, socket.recv(&mut buf)).await else { continue };
        let Ok(Datagram::Challenge(cookie)) = Datagram::decode(&buf[..n]) else { continue };
        socket.send(&Datagram::Prove { cookie, token }.encode()).await?;
        let Ok(Ok(n)) = tokio::time::timeout(wait, socket.recv(&mut buf)).await else { continue };
        if matches!(Datagram::decode(&buf[..n]), Ok(Datagram::Joined)) {
            return Ok(());
        }
    }
    bail!("the relay did not let a device join")
}

// ---------------------------------------------------------------- latency

/// The speaker's input: bursts of a 1 kHz tone, each starting at another
/// offset within its frame, and the sample index of each onset.
fn bursts(frames: usize, seed: usize) -> (Vec<i16>, Vec<usize>) {
    let mut input = vec![0i16; frames * FRAME_SAMPLES];
    let mut onsets = Vec::new();
    let mut i = 0;
    loop {
        let at = i * BURST_EVERY + ((i + seed) * 337) % FRAME_SAMPLES;
        if at + BURST_LEN > input.len() {
            break;
        }
        for (j, s) in input[at..at + BURST_LEN].iter_mut().enumerate() {
            let phase = j as f64 * 1000.0 / f64::from(SAMPLE_RATE) * std::f64::consts::TAU;
            // Starts at its peak so the onset is its first sample.
            *s = (16_000.0 * phase.cos()) as i16;
        }
        onsets.push(at);
        i += 1;
    }
    (input, onsets)
}

/// The first sample at or after `from` loud enough to be a burst.
fn onset(output: &[i16], from: usize) -> Option<usize> {
    output.get(from..)?.iter().position(|s| s.unsigned_abs() >= ONSET.unsigned_abs()).map(|p| p + from)
}

/// One endpoint's way of sending and hearing.
enum Path {
    /// PCM as is; play the newest frame that arrived.
    Raw(VecDeque<Vec<i16>>),
    /// Opus + SFrame through the relay, jitter buffer.
    Call { out: Box<Outgoing>, inc: Box<Incoming> },
}

impl Path {
    fn encode(&mut self, frame: &[i16]) -> Result<Vec<u8>> {
        Ok(match self {
            Path::Raw(_) => frame.iter().flat_map(|s| s.to_le_bytes()).collect(),
            Path::Call { out, .. } => Datagram::Media(out.frame(frame)?).encode(),
        })
    }

    fn packet(&mut self, bytes: &[u8], arrival: Duration) {
        match self {
            Path::Raw(queue) => {
                queue.push_back(bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect());
            }
            Path::Call { inc, .. } => {
                if let Ok(Datagram::Media(m)) = Datagram::decode(bytes) {
                    let _ = inc.packet(&m, arrival);
                }
            }
        }
    }

    fn play(&mut self) -> Vec<i16> {
        match self {
            // The newest frame: one that came late is dropped rather than
            // delaying every frame after it.
            Path::Raw(queue) => {
                let newest = queue.pop_back();
                queue.clear();
                newest.unwrap_or_else(|| vec![0; FRAME_SAMPLES])
            }
            Path::Call { inc, .. } => inc.play(),
        }
    }
}

/// What one endpoint did.
struct Side {
    output: Vec<i16>,
    cpu: Duration,
    wall: Duration,
    sent_at: Vec<Instant>,
    arrived_at: Vec<Instant>,
    prep: Vec<Duration>,
}

/// Runs one endpoint for `frames` ticks of its own clock, which starts at
/// `start`: at each tick it hears what arrived, sends the frame captured
/// since the last tick and plays one frame.
fn endpoint(mut path: Path, socket: std::net::UdpSocket, input: &[i16], start: Instant, frames: usize) -> Result<Side> {
    let mut side = Side {
        output: Vec::with_capacity(frames * FRAME_SAMPLES),
        cpu: Duration::ZERO,
        wall: Duration::ZERO,
        sent_at: Vec::with_capacity(frames),
        arrived_at: Vec::with_capacity(frames),
        prep: Vec::with_capacity(frames),
    };
    let mut buf = vec![0u8; 4096];
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    let cpu0 = thread_cpu();
    for k in 0..frames {
        let tick = start + FRAME * u32::try_from(k)?;
        loop {
            let now = Instant::now();
            if now >= tick {
                break;
            }
            socket.set_read_timeout(Some(tick - now))?;
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let at = Instant::now();
                    side.arrived_at.push(at);
                    path.packet(&buf[..n], at.saturating_duration_since(start));
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e.into()),
            }
        }
        if k >= 1 {
            let t = Instant::now();
            let bytes = path.encode(&input[(k - 1) * FRAME_SAMPLES..k * FRAME_SAMPLES])?;
            side.prep.push(t.elapsed());
            match socket.send(&bytes) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e.into()),
            }
            side.sent_at.push(Instant::now());
        }
        side.output.extend(path.play());
    }
    side.cpu = thread_cpu().saturating_sub(cpu0);
    side.wall = start.elapsed();
    Ok(side)
}

/// Mouth-to-ear delays in ms of the bursts at `onsets` (speaker's samples)
/// in `output` (listener's samples), the listener's clock `offset_ms` behind.
fn delays(onsets: &[usize], output: &[i16], offset_ms: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut from = 0;
    for &n in onsets.iter().skip(WARM_UP) {
        let Some(m) = onset(output, from.max(n)) else { break };
        // The next search starts past this burst.
        from = m + BURST_LEN * 4;
        out.push((m as f64 / PER_MS + offset_ms) - n as f64 / PER_MS);
    }
    out
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let i = ((values.len() - 1) as f64 * p).round() as usize;
    values[i]
}

struct CallRun {
    delays: Vec<f64>,
    cpu: [f64; 2],
    prep_ms: f64,
    transit_ms: f64,
    relay_cpu: Option<f64>,
    bursts: usize,
}

fn epoch_secret(bytes: &[u8]) -> Result<EpochSecret> {
    Ok(EpochSecret::new(Zeroizing::new(bytes.to_vec()))?)
}

/// One 1:1 call of `frames` frames both ways, raw (`relay` None) or through it.
fn one_call(relay: Option<&ServerThread>, frames: usize) -> Result<CallRun> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let bind = || std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let (a, b) = (bind()?, bind()?);
    let (mut path_a, mut path_b) = (Path::Raw(VecDeque::new()), Path::Raw(VecDeque::new()));
    match relay {
        None => {
            a.connect(b.local_addr()?)?;
            b.connect(a.local_addr()?)?;
        }
        Some(relay) => {
            let call = ConversationId(rand::random());
            let secret: [u8; subrosa_media::secure::EPOCH_SECRET_LEN] = rand::random();
            let mut paths = Vec::new();
            for (i, socket) in [&a, &b].into_iter().enumerate() {
                socket.connect(relay.addr)?;
                let token = relay.token(&call, &format!("caller{i}"))?;
                let s = socket.try_clone()?;
                s.set_nonblocking(true)?;
                rt.block_on(async { join(&UdpSocket::from_std(s)?, token).await })?;
                let sender =
                    Sender::new(&epoch_secret(&secret)?, Epoch(1), LeafIndex(u32::try_from(i)?), ContextId::random())?;
                let out = Box::new(Outgoing::new(sender, EncoderConfig::default())?);
                let inc =
                    Box::new(Incoming::new(Receiver::new(epoch_secret(&secret)?, Epoch(1)), JitterConfig::default()));
                paths.push(Path::Call { out, inc });
            }
            path_b = paths.pop().context("two paths")?;
            path_a = paths.pop().context("two paths")?;
        }
    }
    drop(rt);
    for s in [&a, &b] {
        s.set_nonblocking(false)?;
    }
    let (input_a, onsets_a) = bursts(frames, 0);
    let (input_b, onsets_b) = bursts(frames, 1);
    let half = FRAME / 2;
    let start = Instant::now() + Duration::from_millis(50);
    let relay_cpu0 = relay.map(ServerThread::cpu).transpose()?;
    let (side_a, side_b) = std::thread::scope(|scope| {
        let ta = scope.spawn(|| endpoint(path_a, a, &input_a, start, frames));
        let tb = scope.spawn(|| endpoint(path_b, b, &input_b, start + half, frames));
        let join = |t: std::thread::ScopedJoinHandle<'_, Result<Side>>| {
            t.join().map_err(|_| anyhow::anyhow!("an endpoint thread panicked"))?
        };
        Ok::<_, anyhow::Error>((join(ta)?, join(tb)?))
    })?;
    let relay_cpu = match (relay, relay_cpu0) {
        (Some(r), Some(c0)) => Some(r.cpu()?.saturating_sub(c0).as_secs_f64() / side_a.wall.as_secs_f64()),
        _ => None,
    };
    let half_ms = half.as_secs_f64() * 1000.0;
    // a → b: b's clock is half a frame behind; b → a: a's is half a frame ahead,
    // which on a 20 ms clock is again half a frame behind.
    let mut all = delays(&onsets_a, &side_b.output, half_ms);
    all.extend(delays(&onsets_b, &side_a.output, -half_ms));
    let transit: Vec<f64> = side_a
        .sent_at
        .iter()
        .zip(&side_b.arrived_at)
        .chain(side_b.sent_at.iter().zip(&side_a.arrived_at))
        .map(|(s, a)| a.saturating_duration_since(*s).as_secs_f64() * 1000.0)
        .collect();
    let mut transit = transit;
    let mut prep: Vec<f64> = side_a.prep.iter().chain(&side_b.prep).map(|d| d.as_secs_f64() * 1000.0).collect();
    Ok(CallRun {
        bursts: onsets_a.len().saturating_sub(WARM_UP) + onsets_b.len().saturating_sub(WARM_UP),
        delays: all,
        cpu: [
            side_a.cpu.as_secs_f64() / side_a.wall.as_secs_f64(),
            side_b.cpu.as_secs_f64() / side_b.wall.as_secs_f64(),
        ],
        prep_ms: percentile(&mut prep, 0.5),
        transit_ms: percentile(&mut transit, 0.5),
        relay_cpu,
    })
}

fn latency(seconds: u64) -> Result<()> {
    let frames = usize::try_from(seconds * 50)?;
    println!(
        "latency and client CPU: one 1:1 call on loopback for {seconds} s, both ways; a 5 ms tone burst every 400 ms \
         from each side ({WARM_UP} skipped per side); listener's clock half a frame behind the speaker's"
    );
    let relay = ServerThread::start(Kind::Relay)?;
    let raw = one_call(None, frames)?;
    let call = one_call(Some(&relay), frames)?;
    relay.stop();
    println!("{:<62} {:>8} {:>8} {:>8} {:>8} {:>16}", "row", "heard", "p50 ms", "p90 ms", "max ms", "client CPU/core");
    let mut p50 = [0.0; 2];
    for (i, (name, run)) in [
        ("(a) raw PCM over UDP, no codec/SFrame/relay/jitter (baseline)", &raw),
        ("(b) Opus + SFrame + relay + jitter buffer (a call)", &call),
    ]
    .into_iter()
    .enumerate()
    {
        let mut d = run.delays.clone();
        p50[i] = percentile(&mut d, 0.5);
        println!(
            "{:<62} {:>4}/{:<3} {:>8.1} {:>8.1} {:>8.1} {:>7.2}% {:>6.2}%",
            name,
            run.delays.len(),
            run.bursts,
            p50[i],
            percentile(&mut d, 0.9),
            percentile(&mut d, 1.0),
            run.cpu[0] * 100.0,
            run.cpu[1] * 100.0
        );
    }
    println!(
        "added by encoding, encryption, relay and jitter buffer: {:.1} ms (p50 of (b) − p50 of (a))",
        p50[1] - p50[0]
    );
    println!(
        "stages of (b), p50: encode + seal {:.3} ms/frame; relay transit {:.3} ms (raw UDP one-way in (a): {:.3} ms); \
         the rest, Opus look-ahead and jitter-buffer depth: {:.1} ms",
        call.prep_ms,
        call.transit_ms,
        raw.transit_ms,
        p50[1] - p50[0] - call.prep_ms - (call.transit_ms - raw.transit_ms)
    );
    if let Some(c) = call.relay_cpu {
        println!("relay thread CPU during (b): {:.2}% of a core for one call", c * 100.0);
    }
    Ok(())
}

// --------------------------------------------------------------- capacity

/// One step's outcome.
struct Step {
    sent: u64,
    got: u64,
    server_cpu: f64,
}

impl Step {
    fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 1.0;
        }
        1.0 - self.got as f64 / self.sent as f64
    }
}

fn device_address(i: usize) -> Result<SocketAddr> {
    let a = i / PER_ADDRESS + 1;
    Ok(SocketAddr::from((Ipv4Addr::new(127, 1, u8::try_from(a >> 8)?, u8::try_from(a & 255)?), 0)))
}

/// `calls` 1:1 calls through `server` for `seconds`.
async fn step(server: &ServerThread, kind: Kind, calls: usize, seconds: u64) -> Result<Step> {
    let payload = Datagram::Media(vec![0x5a; 106]).encode();
    let mut sockets = Vec::with_capacity(calls * 2);
    for i in 0..calls * 2 {
        let s = UdpSocket::bind(device_address(i)?).await.with_context(|| format!("binding device {i}"))?;
        s.connect(server.addr).await?;
        sockets.push(Arc::new(s));
    }
    if let Kind::Relay = kind {
        let mut joins = tokio::task::JoinSet::new();
        for (pair, chunk) in sockets.chunks(2).enumerate() {
            let call = ConversationId(rand::random());
            for (j, s) in chunk.iter().enumerate() {
                let token = server.token(&call, &format!("c{pair}d{j}"))?;
                let s = Arc::clone(s);
                joins.spawn(async move { join(&s, token).await });
            }
            // A few hundred at a time, as devices would trickle in.
            if joins.len() >= 256 {
                while let Some(r) = joins.join_next().await {
                    r??;
                }
            }
        }
        while let Some(r) = joins.join_next().await {
            r??;
        }
    }
    let sent = Arc::new(AtomicU64::new(0));
    let got = Arc::new(AtomicU64::new(0));
    let begin = tokio::time::Instant::now() + Duration::from_millis(100);
    let end = begin + Duration::from_secs(seconds);
    let cpu0 = server.cpu_async().await?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut receivers = tokio::task::JoinSet::new();
    for (i, s) in sockets.iter().enumerate() {
        // Spread the devices over the frame, as real calls are.
        let offset = FRAME * u32::try_from(i % 20)? / 20;
        let (s2, sent, bytes) = (Arc::clone(s), Arc::clone(&sent), payload.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval_at(begin + offset, FRAME);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                let at = tick.tick().await;
                if at >= end {
                    return;
                }
                if s2.send(&bytes).await.is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let (s3, got, want) = (Arc::clone(s), Arc::clone(&got), payload.len());
        receivers.spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                if let Ok(n) = s3.recv(&mut buf).await {
                    if n == want {
                        got.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r?;
    }
    let wall = begin.elapsed();
    let server_cpu = server.cpu_async().await?.saturating_sub(cpu0).as_secs_f64() / wall.as_secs_f64();
    // What is still on its way arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    receivers.abort_all();
    if let Kind::Relay = kind {
        for s in &sockets {
            let _ = s.send(&Datagram::Leave.encode()).await;
        }
    }
    Ok(Step { sent: sent.load(Ordering::Relaxed), got: got.load(Ordering::Relaxed), server_cpu })
}

fn capacity(max_calls: usize, seconds: u64) -> Result<()> {
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    println!(
        "relay capacity: concurrent 1:1 calls, each device one 107-byte datagram per 20 ms for {seconds} s per step; \
         the calls double until more than 1% is lost, then the gap is halved (open files allowed: {nofile})"
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut best = [0usize; 2];
    println!("{:<34} {:>7} {:>10} {:>10} {:>8} {:>12}", "server", "calls", "sent", "arrived", "loss", "server CPU");
    for (slot, kind, name) in [(0, Kind::Echo, "(a) plain UDP echo (baseline)"), (1, Kind::Relay, "(b) the call relay")]
    {
        let server = ServerThread::start(kind)?;
        let mut calls = 50;
        while calls <= max_calls {
            let s = rt.block_on(step(&server, kind, calls, seconds))?;
            println!(
                "{:<34} {:>7} {:>10} {:>10} {:>7.2}% {:>11.1}%",
                name,
                calls,
                s.sent,
                s.got,
                s.loss() * 100.0,
                s.server_cpu * 100.0
            );
            if s.loss() > 0.01 {
                break;
            }
            best[slot] = calls;
            calls *= 2;
        }
        // Then halves the gap between the last step that held and the
        // first that did not, down to an eighth of it (400 and 800: 600,
        // then 500 or 700, then 450…750).
        let mut failed = calls;
        while best[slot] > 0 && failed <= max_calls && failed - best[slot] > best[slot] / 8 {
            let mid = (best[slot] + failed) / 2;
            let s = rt.block_on(step(&server, kind, mid, seconds))?;
            println!(
                "{:<34} {:>7} {:>10} {:>10} {:>7.2}% {:>11.1}%",
                name,
                mid,
                s.sent,
                s.got,
                s.loss() * 100.0,
                s.server_cpu * 100.0
            );
            if s.loss() > 0.01 {
                failed = mid;
            } else {
                best[slot] = mid;
            }
        }
        server.stop();
    }
    let say = |n: usize| if n == 0 { "under 50".to_string() } else { format!("{n}") };
    println!(
        "capacity at ≤1% loss (the largest step that held): relay {} calls, plain UDP echo {} calls{}",
        say(best[1]),
        say(best[0]),
        if best.contains(&max_calls) || best.iter().any(|b| b * 2 > max_calls) {
            " (a step limit was reached; raise --max-calls)"
        } else {
            ""
        }
    );
    Ok(())
}

/// Runs both parts.
pub fn run(seconds: u64, max_calls: usize, step_seconds: u64) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "calls: {cpus} cores; load average at start: {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    latency(seconds)?;
    println!();
    capacity(max_calls, step_seconds)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at end: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    Ok(())
}

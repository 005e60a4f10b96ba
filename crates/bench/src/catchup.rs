//! `catchup`: how fast a device that comes online decrypts and stores what
//! was queued for it, through the client session's rules (`subrosa-session`:
//! sequence numbers, pinning, history, dedup) over the real SQLCipher store.
//!
//! No server and no network: the envelopes are made beforehand, as the
//! server would deliver them, so the figure is the device's own work. Each
//! scenario has two receiving accounts that get the same messages and do
//! the same work but for the transaction size, taking turns so a change in
//! the machine's load hits both alike (in the 1:1 scenario each has its own
//! conversation with the sender):
//!
//! - batched: one transaction (one fsync) per 500 envelopes, each envelope
//!   in a savepoint of its own, as `receive` does since the session layer;
//! - baseline: one transaction per envelope, as before.
//!
//! (The in-memory store is a test backend that copies its tables per
//! transaction and savepoint, so it is no measure of the rules' own cost.)
//! Scenarios: a 1:1 conversation with `--direct` queued
//! messages; a group of `--group-members` with `--group-messages` queued
//! from ten senders.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use subrosa_client::store::{OnDisk, Store};
use subrosa_client::{Session, SystemClock};
use subrosa_core::content::Content;
use subrosa_core::{ConversationInfo, DeviceIdentity};
use subrosa_proto::{ConversationId, Envelope, MessageId, MessageKind, B64};

/// Envelopes per transaction on the batched path (the inbox page size).
const BATCH: usize = 500;

fn session(handle: &str, store: Store) -> anyhow::Result<Session> {
    let crypto = subrosa_core::default_crypto();
    let identity =
        DeviceIdentity::generate(&crypto, handle.parse().context("handle")?, subrosa_client::store::now_ms())?;
    Ok(Session::new(crypto, identity, store, Arc::new(SystemClock)))
}

fn key_package(s: &Session) -> anyhow::Result<Vec<u8>> {
    Ok(s.store().write(|_| Ok(s.engine().generate_key_package()?))?)
}

fn envelope(from: &Session, conversation: ConversationId, kind: MessageKind, id: u64, ct: Vec<u8>) -> Envelope {
    Envelope {
        id,
        conversation,
        sender: from.identity().address(),
        kind,
        ciphertext: B64(ct),
        server_time: 0,
        roster: None,
    }
}

/// The receivers of one scenario: batched and baseline, on SQLCipher.
struct Receivers {
    batched: Session,
    single: Session,
}

impl Receivers {
    fn new(dir: &Path, tag: &str) -> anyhow::Result<Self> {
        let disk = |name: &str| {
            Store::create(&dir.join(format!("{tag}-{name}")), "bench passphrase")
                .with_context(|| format!("cannot create the store of {name}"))
        };
        Ok(Receivers { batched: session("bob", disk("batched")?)?, single: session("carol", disk("single")?)? })
    }

    fn all(&self) -> [&Session; 2] {
        [&self.batched, &self.single]
    }

    fn key_packages(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        self.all().iter().map(|s| key_package(s)).collect()
    }

    /// Processes `envs[0]` on the batched receiver and `envs[1]` on the
    /// baseline, in turns of one batch; returns the seconds each spent.
    fn catch_up(&self, envs: [&[Envelope]; 2]) -> anyhow::Result<[f64; 2]> {
        let mut spent = [0f64; 2];
        for (a, b) in envs[0].chunks(BATCH).zip(envs[1].chunks(BATCH)) {
            let t = Instant::now();
            self.batched.process_batch(a)?;
            spent[0] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            for env in b {
                self.single.process_envelope(env)?;
            }
            spent[1] += t.elapsed().as_secs_f64();
        }
        for (s, envs) in self.all().into_iter().zip(envs) {
            let dropped = s.take_dropped();
            anyhow::ensure!(dropped.is_empty(), "a receiver dropped messages: {dropped:?}");
            let stored = s.store().write(|tx| tx.take_unseen())?.iter().filter(|m| !m.system).count();
            anyhow::ensure!(stored == envs.len(), "a receiver stored {stored} of {} messages", envs.len());
        }
        Ok(spent)
    }
}

fn print(label: &str, n: usize, spent: [f64; 2]) {
    let rate = |s: f64| n as f64 / s;
    println!("{label}: {n} queued messages");
    println!("  batched ({BATCH} per transaction), SQLCipher  {:>8.0} msgs/s", rate(spent[0]));
    println!("  baseline (1 per transaction), SQLCipher {:>8.0} msgs/s", rate(spent[1]));
    println!("  batched / baseline: {:.1}x", spent[1] / spent[0]);
}

/// 1:1: alice sends `n` messages to each receiver while they are away.
fn direct(dir: &Path, n: usize) -> anyhow::Result<()> {
    let alice = session("alice", Store::memory())?;
    let rx = Receivers::new(dir, "direct")?;
    let engine = alice.engine();
    let text = "x".repeat(100);
    let mut queued: Vec<Vec<Envelope>> = Vec::new();
    for (r, kp) in rx.all().into_iter().zip(rx.key_packages()?) {
        let commit = alice.store().write(|_| {
            let c = engine.create_conversation(&ConversationInfo::direct(), &[kp])?;
            engine.confirm_commit(&c.conversation)?;
            Ok(c)
        })?;
        let id = commit.conversation;
        r.process_envelope(&envelope(&alice, id, MessageKind::Welcome, 0, commit.welcome.context("no Welcome")?))?;
        let mut envs = Vec::with_capacity(n);
        for i in 1..=n as u64 {
            let content = Content::text(MessageId(message_id(0, i)), i, text.as_str()).with_context(i, None);
            let (ct, _) = alice.store().write(|_| Ok(engine.encrypt(&id, &content)?))?;
            envs.push(envelope(&alice, id, MessageKind::Application, i, ct));
        }
        queued.push(envs);
    }
    print("1:1 conversation", n, rx.catch_up([&queued[0], &queued[1]])?);
    Ok(())
}

/// A group of `members` accounts; ten of them send `n` messages in turn.
fn group(dir: &Path, members: usize, n: usize) -> anyhow::Result<()> {
    let creator = session("mem0", Store::memory())?;
    let others: Vec<Session> =
        (1..members - 1).map(|i| session(&format!("mem{i}"), Store::memory())).collect::<anyhow::Result<_>>()?;
    let rx = Receivers::new(dir, "group")?;
    let mut kps = rx.key_packages()?;
    for o in &others {
        kps.push(key_package(o)?);
    }
    let engine = creator.engine();
    let info = ConversationInfo { kind: subrosa_core::ConversationKind::Group, name: "bench".into() };
    let commit = creator.store().write(|_| {
        let c = engine.create_conversation(&info, &kps)?;
        engine.confirm_commit(&c.conversation)?;
        Ok(c)
    })?;
    let id = commit.conversation;
    let welcome = envelope(&creator, id, MessageKind::Welcome, 0, commit.welcome.context("no Welcome")?);
    for r in rx.all() {
        r.process_envelope(&welcome).context("joining")?;
    }
    let mut senders = vec![&creator];
    for o in others.iter().take(9) {
        o.store().write(|_| Ok(o.engine().join(welcome.ciphertext.as_slice())?))?;
        senders.push(o);
    }
    let text = "x".repeat(100);
    let mut envs = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let (k, s) = ((i as usize) % senders.len(), senders[(i as usize) % senders.len()]);
        let seq = i / senders.len() as u64 + 1;
        let content = Content::text(MessageId(message_id(k as u64, seq)), i, text.as_str()).with_context(seq, None);
        let (ct, _) = s.store().write(|_| Ok(s.engine().encrypt(&id, &content)?))?;
        envs.push(envelope(s, id, MessageKind::Application, i + 1, ct));
    }
    print(&format!("group of {members} members, 10 senders"), n, rx.catch_up([&envs, &envs])?);
    Ok(())
}

fn message_id(sender: u64, seq: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&sender.to_be_bytes());
    id[8..].copy_from_slice(&seq.to_be_bytes());
    id
}

/// Runs both scenarios with the stores in `dir` (a temporary directory in it).
pub fn run(direct_messages: usize, members: usize, group_messages: usize, dir: &Path) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("subrosa-bench-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot create a temporary directory in {}", dir.display()))?;
    println!("catch-up: decrypt and store through the client session (no network), stores in {}", dir.display());
    direct(tmp.path(), direct_messages)?;
    group(tmp.path(), members, group_messages)?;
    Ok(())
}

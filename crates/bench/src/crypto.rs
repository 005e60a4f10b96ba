//! `crypto`: encrypt + decrypt throughput of one message, from raw AES-GCM up
//! to the Subrosa engine over the client's encrypted store.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use mls_rs::group::ReceivedMessage;
use mls_rs::identity::basic::{BasicCredential, BasicIdentityProvider};
use mls_rs::identity::SigningIdentity;
use mls_rs::storage_provider::in_memory::{InMemoryGroupStateStorage, InMemoryKeyPackageStorage};
use mls_rs::{CipherSuite, CipherSuiteProvider as _, Client, CryptoProvider as _, ExtensionList, MlsMessage};
use mls_rs_crypto_awslc::AwsLcCryptoProvider;
use subrosa_client::store::{GroupStore, KeyPackageStore, OnDisk, Store};
use subrosa_client::ClientError;
use subrosa_core::content::{Body, Content};
use subrosa_core::{ConversationInfo, DeviceIdentity, Engine, Event};
use subrosa_proto::{ConversationId, Handle, MessageId};

/// What `crypto` was asked to do.
#[derive(Debug)]
pub struct Options {
    /// Fixed message count per row, or `None` for time-based.
    pub iterations: Option<u64>,
    /// Message size in bytes.
    pub size: usize,
    /// Least time per row when time-based.
    pub min_seconds: f64,
    /// Parent directory of the client stores of row (d).
    pub dir: Option<PathBuf>,
}

/// One measured row.
struct Row {
    label: &'static str,
    messages: u64,
    elapsed: Duration,
}

impl Row {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    fn micros_per_message(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1e6 / self.messages as f64
    }
}

/// Runs `step(i)` for a warm-up, then for a timed stretch.
///
/// With `--iterations N` the timed stretch is exactly N messages after a
/// warm-up of N/10. Otherwise the warm-up lasts a fifth of `min_seconds` and
/// gives the rate, and the timed stretch runs in chunks of about a
/// millisecond (the clock is read once per chunk) until `min_seconds` passed.
fn measure(
    label: &'static str,
    opts: &Options,
    mut step: impl FnMut(u64) -> anyhow::Result<()>,
) -> anyhow::Result<Row> {
    let mut i = 0u64;
    let mut run = |n: u64, i: &mut u64| -> anyhow::Result<()> {
        for _ in 0..n {
            step(*i)?;
            *i += 1;
        }
        Ok(())
    };
    match opts.iterations {
        Some(n) => {
            run((n / 10).max(10), &mut i)?;
            let start = Instant::now();
            run(n, &mut i)?;
            Ok(Row { label, messages: n, elapsed: start.elapsed() })
        }
        None => {
            let warm = Duration::from_secs_f64(opts.min_seconds / 5.0);
            let start = Instant::now();
            while start.elapsed() < warm || i < 10 {
                run(1, &mut i)?;
            }
            let rate = i as f64 / start.elapsed().as_secs_f64();
            let chunk = ((rate / 1000.0) as u64).max(1);
            let min = Duration::from_secs_f64(opts.min_seconds);
            let (start, first) = (Instant::now(), i);
            loop {
                run(chunk, &mut i)?;
                let elapsed = start.elapsed();
                if elapsed >= min {
                    return Ok(Row { label, messages: i - first, elapsed });
                }
            }
        }
    }
}

/// A slowdown factor, with enough digits when it is below one.
fn ratio(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}x")
    } else if r >= 1.0 {
        format!("{r:.2}x")
    } else {
        format!("{r:.4}x")
    }
}

/// The payload: `size` printable bytes (valid UTF-8, so every row carries the same bytes).
fn payload(size: usize) -> String {
    (0..size).map(|i| char::from(b'a' + (i % 26) as u8)).collect()
}

/// (a) AES-128-GCM seal + open with a fresh (counter) nonce per message.
fn aes_gcm(opts: &Options, payload: &[u8]) -> anyhow::Result<Row> {
    let key_bytes: [u8; 16] = rand::random();
    let sealer = LessSafeKey::new(
        UnboundKey::new(&AES_128_GCM, &key_bytes).map_err(|_| anyhow::anyhow!("AES-GCM key setup failed"))?,
    );
    let opener = LessSafeKey::new(
        UnboundKey::new(&AES_128_GCM, &key_bytes).map_err(|_| anyhow::anyhow!("AES-GCM key setup failed"))?,
    );
    let nonce = |i: u64| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&i.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    measure("(a) raw AES-128-GCM (aws-lc-rs)", opts, |i| {
        let mut buf = payload.to_vec();
        sealer
            .seal_in_place_append_tag(nonce(i), Aad::empty(), &mut buf)
            .map_err(|_| anyhow::anyhow!("AES-GCM seal failed"))?;
        let plain = opener
            .open_in_place(nonce(i), Aad::empty(), &mut buf)
            .map_err(|_| anyhow::anyhow!("AES-GCM open failed"))?;
        ensure!(plain == payload, "AES-GCM round trip returned other bytes");
        Ok(())
    })
}

const SUITE: CipherSuite = CipherSuite::CURVE25519_AES128;

fn mls_client(name: &str) -> anyhow::Result<Client<impl mls_rs::client_builder::MlsConfig>> {
    let crypto = AwsLcCryptoProvider::default();
    let cs = crypto.cipher_suite_provider(SUITE).context("AWS-LC does not offer CURVE25519_AES128")?;
    let (secret, public) =
        cs.signature_key_generate().map_err(|e| anyhow::anyhow!("signature key generation failed: {e:?}"))?;
    let identity = SigningIdentity::new(BasicCredential::new(name.as_bytes().to_vec()).into_credential(), public);
    Ok(Client::builder()
        .crypto_provider(crypto)
        .identity_provider(BasicIdentityProvider)
        .group_state_storage(InMemoryGroupStateStorage::new())
        .key_package_repo(InMemoryKeyPackageStorage::new())
        .signing_identity(identity, secret, SUITE)
        .build())
}

/// (b) Plain mls-rs: one group of two, state kept in memory only.
fn mls_alone(opts: &Options, payload: &[u8]) -> anyhow::Result<Row> {
    let alice = mls_client("alice")?;
    let bob = mls_client("bob")?;
    let mut alice_group =
        alice.create_group(ExtensionList::new(), ExtensionList::new(), None).context("mls-rs: create group")?;
    let kp = bob
        .generate_key_package_message(ExtensionList::new(), ExtensionList::new(), None)
        .context("mls-rs: key package")?;
    let commit =
        alice_group.commit_builder().add_member(kp).context("mls-rs: add member")?.build().context("mls-rs: commit")?;
    alice_group.apply_pending_commit().context("mls-rs: apply commit")?;
    let welcome = commit.welcome_messages.first().context("mls-rs: no Welcome")?;
    let (mut bob_group, _) = bob.join_group(None, welcome, None).context("mls-rs: join")?;
    measure("(b) mls-rs alone (in memory)", opts, |_| {
        let msg = alice_group.encrypt_application_message(payload, Vec::new()).context("mls-rs: encrypt")?;
        let bytes = msg.to_bytes().context("mls-rs: encode")?;
        let msg = MlsMessage::from_bytes(&bytes).context("mls-rs: decode")?;
        match bob_group.process_incoming_message(msg).context("mls-rs: decrypt")? {
            ReceivedMessage::ApplicationMessage(app) => {
                ensure!(app.data() == payload, "mls-rs round trip returned other bytes")
            }
            _ => bail!("mls-rs: expected an application message"),
        }
        Ok(())
    })
}

fn identity(name: &str) -> anyhow::Result<DeviceIdentity> {
    let crypto = subrosa_core::default_crypto();
    let handle = Handle::new(name).with_context(|| format!("handle {name}"))?;
    Ok(DeviceIdentity::generate(&crypto, handle, subrosa_client::store::now_ms())?)
}

fn message_id(i: u64) -> MessageId {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&i.to_be_bytes());
    MessageId(id)
}

fn check_text(event: &Event, text: &str) -> anyhow::Result<()> {
    match event {
        Event::Message { content, .. } => match &content.body {
            Body::Text(t) => ensure!(t == text, "Subrosa round trip returned other text"),
            _ => bail!("Subrosa: expected a text message"),
        },
        other => bail!("Subrosa: expected a message, got {other:?}"),
    }
    Ok(())
}

type MemEngine = Engine<subrosa_core::DefaultCrypto, InMemoryGroupStateStorage, InMemoryKeyPackageStorage>;

/// (c) Two Subrosa engines over in-memory storage.
fn subrosa_core(opts: &Options, text: &str) -> anyhow::Result<Row> {
    let engine = |name: &str| -> anyhow::Result<MemEngine> {
        Ok(Engine::new(
            subrosa_core::default_crypto(),
            identity(name)?,
            InMemoryGroupStateStorage::new(),
            InMemoryKeyPackageStorage::new(),
        ))
    };
    let alice = engine("alice")?;
    let bob = engine("bob")?;
    let kp = bob.generate_key_package().context("core: key package")?;
    let out = alice.create_conversation(&ConversationInfo::direct(), &[kp]).context("core: create conversation")?;
    alice.confirm_commit(&out.conversation).context("core: confirm commit")?;
    bob.join(out.welcome.as_deref().context("core: no Welcome")?).context("core: join")?;
    let conv = out.conversation;
    measure("(c) Subrosa core (in-memory storage)", opts, |i| {
        let content = Content::text(message_id(i), i, text);
        let (ct, _) = alice.encrypt(&conv, &content).context("core: encrypt")?;
        check_text(&bob.process(&conv, &ct).context("core: decrypt")?, text)
    })
}

type StoreEngine = Engine<subrosa_core::DefaultCrypto, GroupStore, KeyPackageStore>;

fn in_tx<T>(store: &Store, f: impl FnOnce() -> Result<T, subrosa_core::CoreError>) -> anyhow::Result<T> {
    Ok(store.write(|_| f().map_err(ClientError::from))?)
}

/// (d) The same over the client's SQLCipher stores, one transaction per call.
fn subrosa_store(opts: &Options, text: &str, parent: &Path) -> anyhow::Result<Row> {
    let dir = tempfile::Builder::new()
        .prefix("subrosa-bench-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a temporary directory in {}", parent.display()))?;
    let create = |name: &str| {
        Store::create(&dir.path().join(name), "bench passphrase")
            .with_context(|| format!("cannot create {name}'s store"))
    };
    over_client_store("(d) Subrosa core + SQLCipher store", opts, text, create)
}

/// (e) The same over the client's in-memory store: what the store trait and
/// its transactions cost without a disk.
fn subrosa_memory_store(opts: &Options, text: &str) -> anyhow::Result<Row> {
    over_client_store("(e) Subrosa core + in-memory store", opts, text, |_| Ok(Store::memory()))
}

fn over_client_store(
    label: &'static str,
    opts: &Options,
    text: &str,
    create: impl Fn(&str) -> anyhow::Result<Store>,
) -> anyhow::Result<Row> {
    let open = |name: &str| -> anyhow::Result<(Store, StoreEngine)> {
        let store = create(name)?;
        let engine = Engine::new(subrosa_core::default_crypto(), identity(name)?, store.groups(), store.key_packages());
        Ok((store, engine))
    };
    let (alice_store, alice) = open("alice")?;
    let (bob_store, bob) = open("bob")?;
    let kp = in_tx(&bob_store, || bob.generate_key_package()).context("store: key package")?;
    let out = in_tx(&alice_store, || alice.create_conversation(&ConversationInfo::direct(), &[kp]))
        .context("store: create conversation")?;
    let conv: ConversationId = out.conversation;
    in_tx(&alice_store, || alice.confirm_commit(&conv)).context("store: confirm commit")?;
    let welcome = out.welcome.context("store: no Welcome")?;
    in_tx(&bob_store, || bob.join(&welcome)).context("store: join")?;
    measure(label, opts, |i| {
        let content = Content::text(message_id(i), i, text);
        let (ct, _) = in_tx(&alice_store, || alice.encrypt(&conv, &content)).context("store: encrypt")?;
        let event = in_tx(&bob_store, || bob.process(&conv, &ct)).context("store: decrypt")?;
        check_text(&event, text)
    })
}

/// The file system type holding `path`, from /proc/self/mounts (Linux).
fn fs_type(path: &Path) -> String {
    let Ok(path) = path.canonicalize() else { return "unknown".into() };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return "unknown".into() };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mount, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mount).then(|| (mount.len(), kind.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
        .unwrap_or_else(|| "unknown".into())
}

/// Median time of a 4 KiB write + fsync in `dir` (the floor under every store commit).
fn fsync_cost(dir: &Path) -> anyhow::Result<Duration> {
    use std::io::{Seek as _, Write as _};
    let mut file = tempfile::tempfile_in(dir).with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let page = [0u8; 4096];
    let mut times = Vec::with_capacity(50);
    for _ in 0..50 {
        let t = Instant::now();
        file.rewind().context("seek")?;
        file.write_all(&page).context("write")?;
        file.sync_all().context("fsync")?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// Runs the five rows and prints them.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    let text = payload(opts.size);
    let parent = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    let padded = Content::text(message_id(0), 0, text.as_str()).encode().map(|b| b.len()).unwrap_or(0);
    println!(
        "crypto: encrypt + decrypt of one {}-byte message, single thread, {}",
        opts.size,
        match opts.iterations {
            Some(n) => format!("{n} messages per row after a warm-up"),
            None => format!("at least {:.1} s per row after a warm-up", opts.min_seconds),
        }
    );
    println!("  Subrosa pads the content to {padded} bytes before MLS; mls-rs applies its own step-function padding.");
    println!(
        "  row (d) stores live in {} ({}, 4 KiB write + fsync: {:.0} us median); SQLCipher with WAL and synchronous=FULL",
        parent.display(),
        fs_type(&parent),
        fsync_cost(&parent)?.as_secs_f64() * 1e6
    );
    println!();

    let rows = [
        aes_gcm(opts, text.as_bytes())?,
        mls_alone(opts, text.as_bytes())?,
        subrosa_core(opts, &text)?,
        subrosa_store(opts, &text, &parent)?,
        subrosa_memory_store(opts, &text)?,
    ];
    let aes = rows[0].rate();
    let mls = rows[1].rate();
    println!(
        "{:<40} {:>10} {:>12} {:>10} {:>12} {:>12}",
        "row", "messages", "msgs/s", "us/msg", "vs AES-GCM", "vs mls-rs"
    );
    for r in &rows {
        println!(
            "{:<40} {:>10} {:>12.0} {:>10.2} {:>12} {:>12}",
            r.label,
            r.messages,
            r.rate(),
            r.micros_per_message(),
            ratio(aes / r.rate()),
            ratio(mls / r.rate())
        );
    }
    println!();
    println!("  \"vs\" columns: how many times slower than that row (time per message ratio).");
    Ok(())
}

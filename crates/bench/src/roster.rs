//! What the conversation roster adds to a send on the server: the SQLite
//! store's time per application send (one recipient) in a conversation
//! without a roster (nothing to check) beside one with a roster of N
//! devices (the sender's membership is read in the send's transaction),
//! and the time of a commit that replaces a roster of N devices.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use subrosa_proto::{
    CommitGuard, ConversationId, DeviceAddress, DeviceRecord, Epoch, Handle, MessageKind, SendId, SendPart,
    SendRequest, B64,
};
use subrosa_server::store::{NewAccount, SqliteStore, Store};

async fn devices(store: &Arc<dyn Store>, n: usize) -> Result<Vec<DeviceAddress>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let handle = Handle::new(&format!("user{i}")).map_err(|e| anyhow!("{e}"))?;
        let device = subrosa_proto::DeviceId((i as u64).to_be_bytes());
        let record = DeviceRecord { device_id: device, signature_key: B64(vec![1; 32]), certificate: B64(vec![2; 64]) };
        store.register(NewAccount { handle: handle.clone(), identity_key: vec![3; 32], device: record }, 0).await?;
        out.push(DeviceAddress { handle, device });
    }
    Ok(out)
}

fn app(conversation: ConversationId, to: &DeviceAddress) -> SendRequest {
    SendRequest {
        conversation,
        send_id: SendId(rand::random()),
        commit: None,
        parts: vec![SendPart {
            kind: MessageKind::Application,
            recipients: vec![to.clone()],
            ciphertext: B64(vec![0xAB; 256]),
        }],
        expires_at: None,
    }
}

/// Mean time of `sends` application sends from `from` to `to`.
async fn time_sends(
    store: &Arc<dyn Store>,
    conversation: ConversationId,
    from: &DeviceAddress,
    to: &DeviceAddress,
    sends: usize,
) -> Result<Duration> {
    let t = Instant::now();
    for _ in 0..sends {
        store.send(from, &app(conversation, to), 1).await?;
    }
    Ok(t.elapsed() / u32::try_from(sends.max(1)).unwrap_or(u32::MAX))
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// Runs the roster benchmark for each roster size.
///
/// # Errors
/// Any failure of the store.
pub async fn run(sizes: &[usize], sends: usize) -> Result<()> {
    println!(
        "roster: SQLite store in process, {sends} application sends per row (256 B, one recipient); build profile: {}",
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    println!(
        "  {:<10} {:>16} {:>16} {:>12} {:>22}",
        "members", "no roster", "with roster", "difference", "commit replacing it"
    );
    for &n in sizes {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("server.db")).context("opening the store")?);
        let members = devices(&store, n.max(2)).await?;
        let (a, b) = (&members[0], &members[1]);
        let open = ConversationId([1; 16]);
        let guarded = ConversationId([2; 16]);
        let declare = |epoch: u64| SendRequest {
            conversation: guarded,
            send_id: SendId(rand::random()),
            commit: Some(CommitGuard { epoch: Epoch(epoch), members: Some(members.clone()) }),
            parts: vec![SendPart {
                kind: MessageKind::Welcome,
                recipients: vec![b.clone()],
                ciphertext: B64(vec![0xCD; 256]),
            }],
            expires_at: None,
        };
        store.send(a, &declare(0), 1).await?;
        // Warm both paths, then alternate rows so drift hits both alike.
        time_sends(&store, open, a, b, 50).await?;
        time_sends(&store, guarded, a, b, 50).await?;
        let (mut without, mut with) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..4 {
            without += time_sends(&store, open, a, b, sends / 4).await?;
            with += time_sends(&store, guarded, a, b, sends / 4).await?;
        }
        let (without, with) = (without / 4, with / 4);
        let t = Instant::now();
        store.send(a, &declare(1), 1).await?;
        let commit = t.elapsed();
        let diff = with.as_secs_f64() - without.as_secs_f64();
        println!(
            "  {:<10} {:>16} {:>16} {:>12} {:>22}",
            n,
            us(without),
            us(with),
            format!("{:+.0} µs", diff * 1e6),
            format!("{:.2} ms", commit.as_secs_f64() * 1e3)
        );
    }
    Ok(())
}

//! Group commit: a node's concurrent sends go to the database together, in
//! one transaction of set-based statements (`store::batch`), instead of one
//! transaction of about ten round trips each; so, apart, do its
//! acknowledgements, and its rate-limit checks and sockets' inbox reads go
//! many to a statement.
//!
//! [`WORKERS`] workers per queue (`--db-batch-workers`) take what callers
//! queued. A worker takes one job and whatever else is already waiting (up
//! to [`MAX_BATCH`]), runs them in one transaction and answers each. While
//! every worker is busy the queue fills, so batches grow with the load and
//! a lone request goes through alone, at once. A send the batch hands back
//! (`Batched::Alone`), a batch that failed (deadlock, lost connection,
//! timeout) and a queue with no workers (its runtime gone) all fall back to
//! the caller's own transaction: the batch path can make a send faster,
//! never lose or refuse it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use deadpool_postgres::GenericClient;
use subrosa_proto::{ConversationId, DeviceAddress, Envelope, Handle, SendId, SendRequest};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::{execute, query, to_i64, to_u64, Pg, PgStore, OP_TIMEOUT, R};
use crate::store::batch::{self, BatchSend, BatchStatements, Batched, NewMessage};
use crate::store::rules::{DeviceRow, MessageRow};
use crate::store::{Quota, SendOutcome, Tokens};

/// Most jobs in one transaction.
pub(super) const MAX_BATCH: usize = 128;
/// Workers per queue by default: transactions of one queue in flight at
/// once, so one batch's commit (its WAL flush) overlaps the next batch's
/// statements and one batch waiting on a lock held by another node does not
/// stall the node. Fewer workers make larger batches: on two cores shared with
/// PostgreSQL, one node delivered about 5,100 msgs/s with one worker, 4,640
/// with two, 3,430 with three and 2,620 with six (`subrosa-bench load`,
/// two runs each for one and two). Two keeps most of one's rate without
/// its single point of waiting.
pub(super) const WORKERS: usize = 2;
/// The queues: plain sends, acknowledgements, rate-limit checks, socket
/// reads.
pub(super) const QUEUES: usize = 4;
/// Jobs waiting at most; past it a caller waits for room.
const QUEUE: usize = 4 * MAX_BATCH;
/// How long a caller waits for its batch before it runs its job alone.
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// A send larger than this goes alone: a batch copies what it stores.
pub(super) const MAX_BATCHED_SEND_BYTES: u64 = 64 * 1024;

type Slot<J, O> = (J, oneshot::Sender<O>);

/// Jobs of one kind, and the workers that run them in batches.
pub(super) struct Queue<J, O> {
    tx: mpsc::Sender<Slot<J, O>>,
    /// Batches run, and jobs they took.
    counts: Arc<Counts>,
}

/// How a queue's batches went.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub batches: AtomicU64,
    pub jobs: AtomicU64,
    /// Jobs the batch answered (the rest ran alone).
    pub answered: AtomicU64,
}

impl<J, O> std::fmt::Debug for Queue<J, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl<J: Send + 'static, T: Send + 'static> Queue<J, Option<T>> {
    /// Starts `workers` workers on the current runtime, each running
    /// `run` over a batch (with a copy of `store` that holds no queue, see
    /// [`PgStore::without_queues`]) and answering the jobs in order. They
    /// stop when the last handle to the queue is dropped.
    pub(super) fn spawn<F, Fut>(store: &PgStore, workers: usize, run: F) -> Arc<Self>
    where
        F: Fn(PgStore, Vec<J>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Option<T>>> + Send,
    {
        let store = store.without_queues();
        let (tx, rx) = mpsc::channel::<Slot<J, Option<T>>>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let run = Arc::new(run);
        let counts = Arc::new(Counts::default());
        for _ in 0..workers {
            let (rx, run, counts, store) = (Arc::clone(&rx), Arc::clone(&run), Arc::clone(&counts), store.clone());
            tokio::spawn(async move {
                loop {
                    let slots = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { return };
                        let mut slots = vec![first];
                        while slots.len() < MAX_BATCH {
                            match rx.try_recv() {
                                Ok(slot) => slots.push(slot),
                                Err(_) => break,
                            }
                        }
                        slots
                    };
                    counts.batches.fetch_add(1, Ordering::Relaxed);
                    counts.jobs.fetch_add(slots.len() as u64, Ordering::Relaxed);
                    let (jobs, replies): (Vec<J>, Vec<oneshot::Sender<Option<T>>>) = slots.into_iter().unzip();
                    let outs = run(store.clone(), jobs).await;
                    counts.answered.fetch_add(outs.iter().filter(|o| o.is_some()).count() as u64, Ordering::Relaxed);
                    for (reply, out) in replies.into_iter().zip(outs) {
                        let _ = reply.send(out);
                    }
                }
            });
        }
        Arc::new(Queue { tx, counts })
    }

    /// Batches run so far, the jobs they took, and those they answered.
    pub(super) fn counts(&self) -> [u64; 3] {
        let c = &self.counts;
        [c.batches.load(Ordering::Relaxed), c.jobs.load(Ordering::Relaxed), c.answered.load(Ordering::Relaxed)]
    }

    /// Runs `job` in the next batch; `None` when the batch did not answer
    /// it, no worker did (the runtime that ran them is gone), or none did
    /// within [`BATCH_WAIT`]. The caller then runs the job alone, all of
    /// it within `OP_TIMEOUT` (`batched`). A batch that commits after its
    /// caller stopped waiting is harmless: the caller's own send finds the
    /// send id and answers `duplicate`, its acknowledgement finds the rows
    /// gone.
    pub(super) async fn run(&self, job: J) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        let asked = async {
            self.tx.send((job, reply)).await.ok()?;
            answer.await.ok().flatten()
        };
        tokio::time::timeout(BATCH_WAIT, asked).await.ok().flatten()
    }
}

/// A send waiting for its batch.
#[derive(Debug)]
pub(super) struct SendJob {
    pub sender: DeviceAddress,
    pub request: SendRequest,
    pub quota: Quota,
    pub now_ms: u64,
}

/// An acknowledgement waiting for its batch.
#[derive(Debug)]
pub(super) struct AckJob {
    pub device: DeviceAddress,
    pub ids: Vec<u64>,
}

/// A check of a shared rate-limit bucket waiting for its batch: the
/// bucket's salted key and the arguments of `PgStore::take_tokens`.
#[derive(Debug, Clone)]
pub(super) struct TokenJob {
    pub key: Vec<u8>,
    pub initial: f64,
    pub now_ms: i64,
    pub burst: f64,
    pub cost: f64,
    pub debt: bool,
    pub per_ms: f64,
}

/// Runs a batch of bucket checks: one statement per round of distinct
/// buckets (a bucket checked twice in one batch is checked again in the
/// next round, after the first). `None` for a check the batch could not
/// answer; its caller checks alone.
pub(super) async fn run_tokens(store: PgStore, jobs: Vec<TokenJob>) -> Vec<Option<Tokens>> {
    let (store, jobs) = (&store, jobs.as_slice());
    let mut out: Vec<Option<Tokens>> = jobs.iter().map(|_| None).collect();
    let work = async {
        let client = store.pool.get().await.ok()?;
        let mut left: Vec<usize> = (0..jobs.len()).collect();
        while !left.is_empty() {
            let mut round: Vec<usize> = Vec::with_capacity(left.len());
            let mut later = Vec::new();
            let mut keys = std::collections::HashSet::new();
            for i in left {
                if keys.insert(&jobs[i].key) {
                    round.push(i);
                } else {
                    later.push(i);
                }
            }
            let of_round: Vec<&TokenJob> = round.iter().map(|&i| &jobs[i]).collect();
            let answers = take_distinct(&client, &of_round).await.ok()?;
            for &i in &round {
                out[i] = answers.get(&jobs[i].key).copied();
            }
            left = later;
        }
        Some(())
    };
    let _ = tokio::time::timeout(OP_TIMEOUT, work).await;
    out
}

/// A socket's read of its inbox waiting for its batch (the arguments of
/// `Store::fetch_inbox`).
#[derive(Debug)]
pub(super) struct FetchJob {
    pub device: DeviceAddress,
    pub after: u64,
    pub limit: usize,
    pub max_bytes: usize,
}

/// Reads many devices' inboxes in one statement, each as
/// `PgStore::fetch_inbox` reads one; `None` for each when it failed.
pub(super) async fn run_fetches(store: PgStore, jobs: Vec<FetchJob>) -> Vec<Option<Vec<Envelope>>> {
    let (store, jobs) = (&store, jobs.as_slice());
    let addrs: Vec<&DeviceAddress> = jobs.iter().map(|j| &j.device).collect();
    let (handles, ids) = address_columns(&addrs);
    let after: Vec<i64> = jobs.iter().map(|j| to_i64(j.after)).collect();
    let limit: Vec<i64> = jobs.iter().map(|j| i64::try_from(j.limit).unwrap_or(i64::MAX)).collect();
    let work = async {
        let client = store.pool.get().await.ok()?;
        query(
            &client,
            "SELECT r.n, f.* FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                 WITH ORDINALITY AS r(handle, device_id, after, lim, n)
             CROSS JOIN LATERAL (
                 SELECT id FROM devices WHERE handle = r.handle AND device_id = r.device_id AND active LIMIT 1) me
             CROSS JOIN LATERAL (
                 SELECT i.id, m.conversation, d.handle, d.device_id, m.kind, m.ciphertext, m.created_at, m.roster
                 FROM inbox i
                 JOIN messages m ON m.id = i.message
                 JOIN devices d ON d.id = m.sender
                 WHERE i.device = me.id AND i.id > r.after
                 ORDER BY i.device, i.id
                 LIMIT r.lim) f
             ORDER BY r.n, f.id",
            &[&handles, &ids, &after, &limit],
        )
        .await
        .ok()
    };
    let Ok(Some(rows)) = tokio::time::timeout(OP_TIMEOUT, work).await else {
        return jobs.iter().map(|_| None).collect();
    };
    let mut by_job: Vec<Vec<tokio_postgres::Row>> = jobs.iter().map(|_| Vec::new()).collect();
    for r in rows {
        let n: i64 = r.get(0);
        if let Some(slot) = usize::try_from(n).ok().and_then(|n| n.checked_sub(1)).and_then(|i| by_job.get_mut(i)) {
            slot.push(r);
        }
    }
    by_job.iter().zip(jobs).map(|(rows, job)| super::envelopes(rows, 1, job.max_bytes).ok()).collect()
}

/// The one statement of a bucket check (`PgStore::take_tokens`), for
/// checks of distinct buckets: each is refilled by the time since its last
/// use (never negative, whatever the nodes' clocks; `f.tokens`), then taken
/// from, under one row lock, in key order. Answers by bucket key.
pub(super) async fn take_distinct<C: GenericClient>(c: &C, jobs: &[&TokenJob]) -> R<HashMap<Vec<u8>, Tokens>> {
    let col = |f: fn(&TokenJob) -> f64| jobs.iter().map(|j| f(j)).collect::<Vec<f64>>();
    let keys: Vec<&[u8]> = jobs.iter().map(|j| j.key.as_slice()).collect();
    let (initial, burst, cost, per_ms) = (col(|j| j.initial), col(|j| j.burst), col(|j| j.cost), col(|j| j.per_ms));
    let now: Vec<i64> = jobs.iter().map(|j| j.now_ms).collect();
    let debt: Vec<bool> = jobs.iter().map(|j| j.debt).collect();
    let rows = query(
        c,
        "WITH r(key, initial, now_ms, burst, cost, debt, per_ms) AS (
             SELECT * FROM unnest($1::bytea[], $2::float8[], $3::int8[], $4::float8[], $5::float8[],
                                  $6::bool[], $7::float8[]))
         INSERT INTO rate_buckets AS b (key, tokens, updated_ms, taken)
         SELECT key, initial, now_ms, TRUE FROM r ORDER BY key
         ON CONFLICT (key) DO UPDATE SET (tokens, taken, updated_ms) = (
             SELECT CASE
                        WHEN q.debt THEN GREATEST(f.tokens - q.cost, -q.burst)
                        WHEN f.tokens >= q.cost THEN f.tokens - q.cost
                        ELSE f.tokens
                    END,
                    q.debt OR f.tokens >= q.cost,
                    GREATEST(b.updated_ms, q.now_ms)
             FROM r q,
                  LATERAL (SELECT LEAST(q.burst, b.tokens + GREATEST(q.now_ms - b.updated_ms, 0) * q.per_ms)) f(tokens)
             WHERE q.key = excluded.key)
         RETURNING key, taken, tokens",
        &[&keys, &initial, &now, &burst, &cost, &debt, &per_ms],
    )
    .await?;
    Ok(rows.iter().map(|r| (r.get::<_, Vec<u8>>(0), Tokens { taken: r.get(1), left: r.get(2) })).collect())
}

/// Runs a batch of sends; `None` for each one its caller must run alone.
pub(super) async fn run_sends(store: PgStore, jobs: Vec<SendJob>) -> Vec<Option<SendOutcome>> {
    let (store, jobs) = (&store, jobs.as_slice());
    let alone = || jobs.iter().map(|_| None).collect();
    let Some(first) = jobs.first() else { return Vec::new() };
    // One quota per batch (every job of a node has the node's); a job
    // with another goes alone.
    let quota = first.quota;
    let sends: Vec<BatchSend<'_>> =
        jobs.iter().map(|j| BatchSend { sender: &j.sender, request: &j.request, now_ms: j.now_ms }).collect();
    let other_quota: Vec<bool> = jobs.iter().map(|j| j.quota != quota).collect();
    let work = async {
        let mut client = store.pool.get().await.ok()?;
        let tx = client.transaction().await.ok()?;
        let mut pg = Pg { c: &tx, channel: &store.channel };
        let outcome = batch_of(&mut pg, &sends, &other_quota, &quota).await;
        match outcome {
            Ok(Some(outcomes)) => {
                tx.commit().await.ok()?;
                Some(outcomes)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = ?e, "a batch of sends failed; each runs alone");
                None
            }
        }
    };
    match tokio::time::timeout(OP_TIMEOUT, work).await {
        Ok(Some(outcomes)) => outcomes
            .into_iter()
            .map(|o| match o {
                Batched::Stored(out) => Some(out),
                Batched::Alone => None,
            })
            .collect(),
        _ => alone(),
    }
}

/// The batch rule over the sends whose quota is the batch's.
async fn batch_of(
    pg: &mut Pg<'_, deadpool_postgres::Transaction<'_>>,
    sends: &[BatchSend<'_>],
    other_quota: &[bool],
    quota: &Quota,
) -> R<Option<Vec<Batched>>> {
    if !other_quota.iter().any(|o| *o) {
        return batch::send_batch(pg, sends, quota).await;
    }
    let keep: Vec<usize> = (0..sends.len()).filter(|&i| !other_quota[i]).collect();
    let some: Vec<BatchSend<'_>> = keep.iter().map(|&i| sends[i]).collect();
    let Some(outcomes) = batch::send_batch(pg, &some, quota).await? else { return Ok(None) };
    let mut all = vec![Batched::Alone; sends.len()];
    for (i, o) in keep.into_iter().zip(outcomes) {
        all[i] = o;
    }
    Ok(Some(all))
}

/// Runs a batch of acknowledgements; `None` for each when the batch failed.
pub(super) async fn run_acks(store: PgStore, jobs: Vec<AckJob>) -> Vec<Option<u64>> {
    let (store, jobs) = (&store, jobs.as_slice());
    let acks: Vec<(&DeviceAddress, &[u64])> = jobs.iter().map(|j| (&j.device, j.ids.as_slice())).collect();
    let work = async {
        let mut client = store.pool.get().await.ok()?;
        let tx = client.transaction().await.ok()?;
        let mut pg = Pg { c: &tx, channel: &store.channel };
        match batch::ack_batch(&mut pg, &acks).await {
            Ok(counts) => {
                tx.commit().await.ok()?;
                Some(counts)
            }
            Err(e) => {
                tracing::debug!(error = ?e, "a batch of acknowledgements failed; each runs alone");
                None
            }
        }
    };
    match tokio::time::timeout(OP_TIMEOUT, work).await {
        Ok(Some(counts)) => counts.into_iter().map(Some).collect(),
        _ => jobs.iter().map(|_| None).collect(),
    }
}

/// Columns of device addresses, for `unnest`.
fn address_columns<'a>(addrs: &[&'a DeviceAddress]) -> (Vec<&'a str>, Vec<String>) {
    (addrs.iter().map(|a| a.handle.as_str()).collect(), addrs.iter().map(|a| a.device.to_hex()).collect())
}

// The set-based statements look rows up per input row (`LATERAL` with
// `LIMIT 1`, which the planner cannot flatten into a join; a correlated
// scalar subquery; `= ANY`), never by joining a whole table: a hash join over a sequential
// scan is what the planner picks for a young table whose statistics are not
// gathered yet, and it costs the table's size per batch.

/// Input positions (`n`, 1-based) answered by a query, as 0-based flags.
fn flags(rows: &[tokio_postgres::Row], len: usize) -> Vec<bool> {
    let mut out = vec![false; len];
    for r in rows {
        let n: i64 = r.get(0);
        if let Some(slot) = usize::try_from(n).ok().and_then(|n| n.checked_sub(1)).and_then(|i| out.get_mut(i)) {
            *slot = true;
        }
    }
    out
}

impl<C: GenericClient + Sync> BatchStatements for Pg<'_, C> {
    async fn device_rows(&mut self, addrs: &[&DeviceAddress]) -> R<Vec<Option<DeviceRow>>> {
        let (handles, ids) = address_columns(addrs);
        let rows = query(
            self.c,
            "SELECT r.n, d.id FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS r(handle, device_id, n)
             CROSS JOIN LATERAL (
                 SELECT id FROM devices WHERE handle = r.handle AND device_id = r.device_id AND active LIMIT 1) d",
            &[&handles, &ids],
        )
        .await?;
        let mut out = vec![None; addrs.len()];
        for r in rows {
            let n: i64 = r.get(0);
            if let Some(slot) = usize::try_from(n).ok().and_then(|n| n.checked_sub(1)).and_then(|i| out.get_mut(i)) {
                *slot = Some(r.get(1));
            }
        }
        Ok(out)
    }

    async fn send_ids_seen(&mut self, ids: &[(DeviceRow, &SendId)]) -> R<Vec<bool>> {
        let devices: Vec<i64> = ids.iter().map(|(d, _)| *d).collect();
        let send_ids: Vec<&[u8]> = ids.iter().map(|(_, s)| &s.0[..]).collect();
        let rows = query(
            self.c,
            "SELECT r.n FROM unnest($1::bigint[], $2::bytea[]) WITH ORDINALITY AS r(device, send_id, n)
             CROSS JOIN LATERAL (
                 SELECT 1 FROM send_ids s WHERE s.device = r.device AND s.send_id = r.send_id LIMIT 1) s",
            &[&devices, &send_ids],
        )
        .await?;
        Ok(flags(&rows, ids.len()))
    }

    async fn senders_allowed(&mut self, pairs: &[(&ConversationId, DeviceRow)]) -> R<Vec<bool>> {
        let conversations: Vec<&[u8]> = pairs.iter().map(|(c, _)| &c.0[..]).collect();
        let senders: Vec<i64> = pairs.iter().map(|(_, d)| *d).collect();
        // The pairs refused: a conversation with a roster that lacks the sender.
        let rows = query(
            self.c,
            "SELECT r.n FROM unnest($1::bytea[], $2::bigint[]) WITH ORDINALITY AS r(conversation, sender, n)
             CROSS JOIN LATERAL (SELECT id, has_roster FROM conversations WHERE id = r.conversation LIMIT 1) c
             WHERE c.has_roster AND NOT EXISTS (
                 SELECT 1 FROM conversation_members m WHERE m.conversation = c.id AND m.device = r.sender)",
            &[&conversations, &senders],
        )
        .await?;
        Ok(flags(&rows, pairs.len()).into_iter().map(|refused| !refused).collect())
    }

    async fn lock_usages(&mut self, devices: &[DeviceRow]) -> R<Vec<u64>> {
        // In device order, as `release` locks them.
        let rows = query(
            self.c,
            "INSERT INTO device_usage (device, bytes) SELECT d, 0 FROM unnest($1::bigint[]) AS t(d) ORDER BY d
             ON CONFLICT (device) DO UPDATE SET bytes = device_usage.bytes RETURNING device, bytes",
            &[&devices],
        )
        .await?;
        let total: HashMap<i64, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(devices.iter().map(|d| to_u64(total.get(d).copied().unwrap_or(0))).collect())
    }

    async fn account_usages(&mut self, handles: &[&Handle]) -> R<Vec<u64>> {
        let names: Vec<&str> = handles.iter().map(|h| h.as_str()).collect();
        let rows = query(
            self.c,
            "SELECT r.n, (
                 SELECT COALESCE(SUM(bytes), 0)::BIGINT FROM device_usage
                 WHERE device = ANY(ARRAY(SELECT id FROM devices WHERE handle = r.handle)))
             FROM unnest($1::text[]) WITH ORDINALITY AS r(handle, n)",
            &[&names],
        )
        .await?;
        let mut out = vec![0; handles.len()];
        for r in rows {
            let n: i64 = r.get(0);
            if let Some(slot) = usize::try_from(n).ok().and_then(|n| n.checked_sub(1)).and_then(|i| out.get_mut(i)) {
                *slot = to_u64(r.get(1));
            }
        }
        Ok(out)
    }

    async fn record_send_ids(&mut self, ids: &[(DeviceRow, &SendId, u64)]) -> R<u64> {
        let devices: Vec<i64> = ids.iter().map(|(d, _, _)| *d).collect();
        let send_ids: Vec<&[u8]> = ids.iter().map(|(_, s, _)| &s.0[..]).collect();
        let times: Vec<i64> = ids.iter().map(|(_, _, t)| to_i64(*t)).collect();
        execute(
            self.c,
            "INSERT INTO send_ids (device, send_id, epoch, created_at)
             SELECT d, s, NULL, t FROM unnest($1::bigint[], $2::bytea[], $3::bigint[]) AS r(d, s, t)
             ON CONFLICT (device, send_id) DO NOTHING",
            &[&devices, &send_ids, &times],
        )
        .await
    }

    async fn add_usages(&mut self, adds: &[(DeviceRow, u64)]) -> R<()> {
        let devices: Vec<i64> = adds.iter().map(|(d, _)| *d).collect();
        let bytes: Vec<i64> = adds.iter().map(|(_, b)| to_i64(*b)).collect();
        execute(
            self.c,
            "UPDATE device_usage u SET bytes = u.bytes + a.b
             FROM unnest($1::bigint[], $2::bigint[]) AS a(d, b) WHERE u.device = ANY($1::bigint[]) AND u.device = a.d",
            &[&devices, &bytes],
        )
        .await?;
        Ok(())
    }

    async fn insert_messages(&mut self, messages: &[NewMessage<'_>]) -> R<Vec<MessageRow>> {
        let conversations: Vec<&[u8]> = messages.iter().map(|m| &m.conversation.0[..]).collect();
        let senders: Vec<i64> = messages.iter().map(|m| m.sender).collect();
        let kinds: Vec<&str> = messages.iter().map(|m| m.kind.as_str()).collect();
        let ciphertexts: Vec<&[u8]> = messages.iter().map(|m| m.ciphertext).collect();
        let created: Vec<i64> = messages.iter().map(|m| to_i64(m.created_at)).collect();
        let expires: Vec<Option<i64>> = messages.iter().map(|m| m.expires_at.map(to_i64)).collect();
        let rows = query(
            self.c,
            "INSERT INTO messages (conversation, sender, kind, ciphertext, created_at, expires_at)
             SELECT c, s, k, x, t, e
             FROM unnest($1::bytea[], $2::bigint[], $3::text[], $4::bytea[], $5::bigint[], $6::bigint[])
                  WITH ORDINALITY AS r(c, s, k, x, t, e, n)
             ORDER BY n
             RETURNING id",
            &[&conversations, &senders, &kinds, &ciphertexts, &created, &expires],
        )
        .await?;
        // Ids are drawn row by row in the order inserted, so in increasing
        // order: sorted, they are the input's order.
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    async fn insert_inbox_at(&mut self, rows: &[(DeviceRow, MessageRow, u64)]) -> R<()> {
        let devices: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let messages: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let times: Vec<i64> = rows.iter().map(|r| to_i64(r.2)).collect();
        execute(
            self.c,
            "INSERT INTO inbox (device, message, created_at)
             SELECT d, m, t FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) WITH ORDINALITY AS r(d, m, t, n)
             ORDER BY n",
            &[&devices, &messages, &times],
        )
        .await?;
        Ok(())
    }

    async fn delete_inbox_pairs(&mut self, pairs: &[(DeviceRow, u64)]) -> R<Vec<(usize, MessageRow)>> {
        let devices: Vec<i64> = pairs.iter().map(|p| p.0).collect();
        let ids: Vec<i64> = pairs.iter().map(|p| to_i64(p.1)).collect();
        let rows = query(
            self.c,
            // `i.id = ANY` lets the plan find the rows by primary key
            // rather than join the whole inbox.
            "DELETE FROM inbox i USING unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS a(device, id, n)
             WHERE i.id = ANY($2::bigint[]) AND i.device = a.device AND i.id = a.id
             RETURNING a.n, i.message",
            &[&devices, &ids],
        )
        .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let n: i64 = r.get(0);
                usize::try_from(n).ok().and_then(|n| n.checked_sub(1)).map(|j| (j, r.get(1)))
            })
            .collect())
    }
}

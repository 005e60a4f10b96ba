//! Prometheus metrics for operators, on a listen address of their own
//! (`--metrics-listen`), never on the public one.
//!
//! Every label is drawn from a fixed set (a status class, a route template,
//! an error code): never a handle, device id, conversation id or address,
//! so a scrape says how the server is doing and nothing about who uses it.
//! Counters are plain atomics bumped on the request path; queue depths are
//! read from the store when scraped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;

use crate::store::{PoolState, StoreStats};
use crate::AppState;

/// Upper bounds (seconds) of the request-latency histogram buckets.
const LATENCY_BUCKETS: [f64; 9] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// What a request did, as far as operators need to tell requests apart: the
/// `op` label. A fixed set, so a label never carries a path's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// `POST /v1/messages`.
    Send,
    /// `GET /v1/inbox`.
    Fetch,
    /// `POST /v1/inbox/ack`.
    Ack,
    /// `POST /v1/keypackages/claim`.
    Claim,
    /// `POST /v1/accounts`.
    Register,
    /// `GET /v1/ws` (the upgrade only; the socket's life is not a request).
    Socket,
    /// Everything else, unmatched routes included.
    Other,
}

impl Op {
    const ALL: [Op; 7] = [Op::Send, Op::Fetch, Op::Ack, Op::Claim, Op::Register, Op::Socket, Op::Other];

    /// The op of a request, from its method and route template (never its
    /// path, which holds handles and ids).
    pub(crate) fn of(method: &axum::http::Method, route: &str) -> Op {
        use axum::http::Method;
        match (method, route) {
            (&Method::POST, "/v1/messages") => Op::Send,
            (&Method::GET, "/v1/inbox") => Op::Fetch,
            (&Method::POST, "/v1/inbox/ack") => Op::Ack,
            (&Method::POST, "/v1/keypackages/claim") => Op::Claim,
            (&Method::POST, "/v1/accounts") => Op::Register,
            (&Method::GET, "/v1/ws") => Op::Socket,
            _ => Op::Other,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Op::Send => "send",
            Op::Fetch => "fetch",
            Op::Ack => "ack",
            Op::Claim => "claim",
            Op::Register => "register",
            Op::Socket => "websocket",
            Op::Other => "other",
        }
    }

    fn index(self) -> usize {
        Op::ALL.iter().position(|o| *o == self).unwrap_or(Op::ALL.len() - 1)
    }
}

/// A latency histogram (cumulative at render time).
#[derive(Debug, Default)]
struct Histogram {
    /// Per bucket, then +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// What became of messages: the `event` label of `subrosa_messages_total`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum MessageEvent {
    /// A send stored for delivery.
    Stored,
    /// A send whose id was seen before (answered, not stored again).
    Duplicate,
    /// Envelopes handed to a device (HTTP fetch or WebSocket push); an
    /// envelope fetched again after a lost connection counts again.
    Delivered,
    /// Envelopes a device acknowledged (deleted).
    Acknowledged,
}

impl MessageEvent {
    const ALL: [MessageEvent; 4] =
        [MessageEvent::Stored, MessageEvent::Duplicate, MessageEvent::Delivered, MessageEvent::Acknowledged];

    fn as_str(self) -> &'static str {
        match self {
            MessageEvent::Stored => "stored",
            MessageEvent::Duplicate => "duplicate",
            MessageEvent::Delivered => "delivered",
            MessageEvent::Acknowledged => "acknowledged",
        }
    }
}

/// How a send reached the server: the `transport` label of
/// `subrosa_sends_total`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Transport {
    /// A signed `POST /v1/messages`.
    Http,
    /// A send frame on a device's authenticated WebSocket.
    Frame,
}

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests answered, by status class (1xx..5xx → index 0..4).
    requests: [AtomicU64; 5],
    /// Requests answered, by (op, outcome): `ok` or the answer's stable
    /// error code. Both halves are `&'static str` from fixed sets.
    outcomes: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Request latency, per [`Op`] (indexed as [`Op::ALL`]).
    latency: [Histogram; Op::ALL.len()],
    /// Messages by [`MessageEvent`] (indexed as [`MessageEvent::ALL`]).
    messages: [AtomicU64; MessageEvent::ALL.len()],
    /// TCP connections open now, accepted in all, and refused by the
    /// per-address cap.
    pub(crate) connections_open: AtomicU64,
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    /// WebSockets open now, and opened in all.
    pub(crate) websockets_open: AtomicU64,
    pub(crate) websockets_opened: AtomicU64,
    /// Sends that passed validation, by [`Transport`] (indexed as its
    /// discriminant), whatever the store then answered.
    sends: [AtomicU64; 2],
}

impl Metrics {
    /// Counts one answered request: its status class, its op's latency, and
    /// its outcome (`error`: the stable code of the answer, when it has one).
    pub(crate) fn request(&self, op: Op, status: u16, error: Option<subrosa_proto::ErrorCode>, took: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class].fetch_add(1, Ordering::Relaxed);
        self.latency[op.index()].observe(took);
        let outcome = match error {
            Some(code) => code.as_str(),
            None if status < 400 => "ok",
            // An answer not made by `AppError` (none today).
            None => "error",
        };
        if let Ok(mut map) = self.outcomes.lock() {
            *map.entry((op.as_str(), outcome)).or_default() += 1;
        }
    }

    /// Counts one send that reached the store, by how it came.
    pub(crate) fn send_transport(&self, transport: Transport) {
        self.sends[transport as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` messages of one event.
    pub(crate) fn messages(&self, event: MessageEvent, n: u64) {
        self.messages[event as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// The counters in Prometheus' text format (0.0.4), with the store's
    /// queue depths and pool state when known.
    fn render(&self, stats: Option<StoreStats>, pool: Option<PoolState>) -> String {
        let mut out = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let header = |out: &mut String, name: &str, help: &str, kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };

        header(&mut out, "subrosa_requests_total", "HTTP requests answered, by status class.", "counter");
        for (i, c) in self.requests.iter().enumerate() {
            let _ = writeln!(out, "subrosa_requests_total{{class=\"{}xx\"}} {}", i + 1, load(c));
        }
        header(
            &mut out,
            "subrosa_request_outcomes_total",
            "HTTP requests answered, by operation and outcome (ok or the error code).",
            "counter",
        );
        if let Ok(map) = self.outcomes.lock() {
            for ((op, outcome), n) in map.iter() {
                let _ = writeln!(out, "subrosa_request_outcomes_total{{op=\"{op}\",outcome=\"{outcome}\"}} {n}");
            }
        }
        header(&mut out, "subrosa_request_seconds", "Time to answer a request, by operation.", "histogram");
        for (op, h) in Op::ALL.iter().zip(&self.latency) {
            let op = op.as_str();
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                cumulative += load(&h.buckets[i]);
                let _ = writeln!(out, "subrosa_request_seconds_bucket{{op=\"{op}\",le=\"{bound}\"}} {cumulative}");
            }
            cumulative += load(&h.buckets[LATENCY_BUCKETS.len()]);
            let _ = writeln!(out, "subrosa_request_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {cumulative}");
            let _ = writeln!(out, "subrosa_request_seconds_sum{{op=\"{op}\"}} {}", load(&h.sum_micros) as f64 / 1e6);
            let _ = writeln!(out, "subrosa_request_seconds_count{{op=\"{op}\"}} {cumulative}");
        }
        header(
            &mut out,
            "subrosa_messages_total",
            "Messages by event: sends stored or duplicate, envelopes delivered or acknowledged.",
            "counter",
        );
        for (event, c) in MessageEvent::ALL.iter().zip(&self.messages) {
            let _ = writeln!(out, "subrosa_messages_total{{event=\"{}\"}} {}", event.as_str(), load(c));
        }
        header(&mut out, "subrosa_sends_total", "Sends handed to the store, by transport (http or frame).", "counter");
        for (transport, c) in ["http", "frame"].iter().zip(&self.sends) {
            let _ = writeln!(out, "subrosa_sends_total{{transport=\"{transport}\"}} {}", load(c));
        }
        let plain = [
            ("subrosa_connections_open", "TCP connections open.", "gauge", load(&self.connections_open)),
            (
                "subrosa_connections_accepted_total",
                "TCP connections accepted.",
                "counter",
                load(&self.connections_accepted),
            ),
            (
                "subrosa_connections_refused_total",
                "Connections refused by the per-address cap.",
                "counter",
                load(&self.connections_refused),
            ),
            ("subrosa_websockets_open", "WebSockets open.", "gauge", load(&self.websockets_open)),
            ("subrosa_websockets_opened_total", "WebSockets opened.", "counter", load(&self.websockets_opened)),
        ];
        for (name, help, kind, value) in plain {
            header(&mut out, name, help, kind);
            let _ = writeln!(out, "{name} {value}");
        }
        if let Some(s) = stats {
            let depths = [
                ("subrosa_inbox_rows", "Undelivered inbox rows (one per recipient device).", s.inbox_rows),
                ("subrosa_stored_messages", "Stored ciphertexts not yet delivered to every recipient.", s.messages),
                ("subrosa_devices", "Devices, removed ones included.", s.devices),
                ("subrosa_one_time_key_packages", "One-time key packages stored.", s.one_time_key_packages),
            ];
            for (name, help, value) in depths {
                header(&mut out, name, help, "gauge");
                let _ = writeln!(out, "{name} {value}");
            }
        }
        if let Some(p) = pool {
            header(&mut out, "subrosa_db_pool_connections", "Database connections open, by state.", "gauge");
            let busy = p.open.saturating_sub(p.idle);
            let _ = writeln!(out, "subrosa_db_pool_connections{{state=\"idle\"}} {}", p.idle);
            let _ = writeln!(out, "subrosa_db_pool_connections{{state=\"busy\"}} {busy}");
            let pool_gauges = [
                ("subrosa_db_pool_max_connections", "Most connections the database pool opens.", p.max),
                ("subrosa_db_pool_waiting", "Requests waiting for a database connection.", p.waiting),
            ];
            for (name, help, value) in pool_gauges {
                header(&mut out, name, help, "gauge");
                let _ = writeln!(out, "{name} {value}");
            }
            header(
                &mut out,
                "subrosa_db_batches_total",
                "Database batches run (a transaction or statement taking many requests at once), by kind.",
                "counter",
            );
            for (kind, [batches, _, _]) in crate::store::BATCH_KINDS.iter().zip(p.batches) {
                let _ = writeln!(out, "subrosa_db_batches_total{{kind=\"{kind}\"}} {batches}");
            }
            header(
                &mut out,
                "subrosa_db_batched_total",
                "Requests taken by database batches, by kind and whether the batch answered them (the rest ran alone).",
                "counter",
            );
            for (kind, [_, jobs, answered]) in crate::store::BATCH_KINDS.iter().zip(p.batches) {
                let alone = jobs.saturating_sub(answered);
                let _ = writeln!(out, "subrosa_db_batched_total{{kind=\"{kind}\",answered=\"yes\"}} {answered}");
                let _ = writeln!(out, "subrosa_db_batched_total{{kind=\"{kind}\",answered=\"no\"}} {alone}");
            }
        }
        out
    }
}

async fn scrape(State(state): State<AppState>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    // A store that cannot answer leaves the depths out; the counters still say
    // how requests fare.
    let stats = state.store.stats().await.ok();
    let body = state.metrics.render(stats, state.store.pool_state());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Serves `GET /metrics` on `listener` until the server stops.
pub(crate) fn serve(state: AppState, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    let mut stop = state.shutdown.clone();
    let app = Router::new().route("/metrics", get(scrape)).with_state(state);
    tokio::spawn(async move {
        let shutdown = async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    return;
                }
            }
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!(error = %e, "metrics listener stopped");
        }
    })
}

/// Binds the metrics address.
///
/// # Errors
/// The address cannot be bound.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// A shared, cheap handle.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_classes_outcomes_buckets_and_depths_without_any_identifier() {
        let m = Metrics::default();
        m.request(Op::Send, 200, None, Duration::from_millis(3));
        m.request(Op::Fetch, 404, Some(subrosa_proto::ErrorCode::UnknownHandle), Duration::from_millis(30));
        m.request(Op::Send, 503, Some(subrosa_proto::ErrorCode::Unavailable), Duration::from_secs(9));
        m.messages(MessageEvent::Delivered, 4);
        m.connections_open.store(2, Ordering::Relaxed);
        let stats = StoreStats { inbox_rows: 7, ..Default::default() };
        let pool =
            PoolState { max: 16, open: 5, idle: 3, waiting: 1, batches: [[2, 9, 8], [1, 4, 4], [0, 0, 0], [3, 3, 3]] };
        let text = m.render(Some(stats), Some(pool));
        for line in [
            "subrosa_requests_total{class=\"2xx\"} 1",
            "subrosa_requests_total{class=\"4xx\"} 1",
            "subrosa_requests_total{class=\"5xx\"} 1",
            "subrosa_request_outcomes_total{op=\"send\",outcome=\"ok\"} 1",
            "subrosa_request_outcomes_total{op=\"send\",outcome=\"unavailable\"} 1",
            "subrosa_request_outcomes_total{op=\"fetch\",outcome=\"unknown_handle\"} 1",
            "subrosa_request_seconds_bucket{op=\"send\",le=\"0.005\"} 1",
            "subrosa_request_seconds_bucket{op=\"send\",le=\"5\"} 1",
            "subrosa_request_seconds_bucket{op=\"send\",le=\"+Inf\"} 2",
            "subrosa_request_seconds_count{op=\"send\"} 2",
            "subrosa_request_seconds_bucket{op=\"fetch\",le=\"0.01\"} 0",
            "subrosa_request_seconds_bucket{op=\"fetch\",le=\"0.05\"} 1",
            "subrosa_request_seconds_count{op=\"other\"} 0",
            "subrosa_messages_total{event=\"delivered\"} 4",
            "subrosa_messages_total{event=\"stored\"} 0",
            "subrosa_connections_open 2",
            "subrosa_inbox_rows 7",
            "subrosa_db_pool_connections{state=\"idle\"} 3",
            "subrosa_db_pool_connections{state=\"busy\"} 2",
            "subrosa_db_pool_max_connections 16",
            "subrosa_db_pool_waiting 1",
            "subrosa_db_batches_total{kind=\"send\"} 2",
            "subrosa_db_batched_total{kind=\"send\",answered=\"yes\"} 8",
            "subrosa_db_batched_total{kind=\"send\",answered=\"no\"} 1",
            "subrosa_db_batched_total{kind=\"ack\",answered=\"yes\"} 4",
            "subrosa_db_batches_total{kind=\"rate_limit\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        // Without a pool (SQLite) the pool's metrics are absent, not zero.
        assert!(!m.render(Some(stats), None).contains("subrosa_db_pool"));
    }

    #[test]
    fn ops_come_from_route_templates_only() {
        use axum::http::Method;
        assert_eq!(Op::of(&Method::POST, "/v1/messages"), Op::Send);
        assert_eq!(Op::of(&Method::GET, "/v1/inbox"), Op::Fetch);
        assert_eq!(Op::of(&Method::POST, "/v1/inbox/ack"), Op::Ack);
        assert_eq!(Op::of(&Method::GET, "/v1/messages"), Op::Other);
        assert_eq!(Op::of(&Method::GET, "/v1/accounts/{handle}"), Op::Other);
        assert_eq!(Op::of(&Method::GET, ""), Op::Other);
    }

    /// The names, help and types operators' dashboards and alerts rely on:
    /// changing one is a visible decision (update `tests/data/metrics-help.txt`).
    #[test]
    fn snapshot_of_metric_names_help_and_types() {
        let text = Metrics::default().render(Some(StoreStats::default()), Some(PoolState::default()));
        let headers: String = text.lines().filter(|l| l.starts_with("# ")).map(|l| format!("{l}\n")).collect();
        assert_eq!(headers, include_str!("../tests/data/metrics-help.txt"));
    }
}

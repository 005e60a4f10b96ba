//! Prometheus metrics for operators, on a listen address of their own
//! (`--metrics-listen`), never on the public one.
//!
//! Every label is drawn from a fixed set (a status class, a route template,
//! an error code): never a handle, device id, conversation id or address,
//! so a scrape says how the server is doing and nothing about who uses it.
//! Counters are plain atomics bumped on the request path; queue depths are
//! read from the store when scraped.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;

use crate::AppState;

/// Upper bounds (seconds) of the request-latency histogram buckets.
const LATENCY_BUCKETS: [f64; 9] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests answered, by status class (1xx..5xx → index 0..4).
    requests: [AtomicU64; 5],
    /// Request latency histogram (cumulative per bucket, then +Inf).
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_micros: AtomicU64,
    /// TCP connections open now, and refused by the per-address cap.
    pub(crate) connections_open: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    /// WebSockets open now.
    pub(crate) websockets_open: AtomicU64,
    /// Sends the store accepted.
    pub(crate) sends_stored: AtomicU64,
}

impl Metrics {
    /// Counts one answered request.
    pub(crate) fn request(&self, status: u16, took: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The counters in Prometheus' text format (0.0.4), with the store's
    /// queue depths.
    fn render(&self, stats: Option<crate::store::StoreStats>) -> String {
        let mut out = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP subrosa_requests_total HTTP requests answered, by status class.");
        let _ = writeln!(out, "# TYPE subrosa_requests_total counter");
        for (i, c) in self.requests.iter().enumerate() {
            let _ = writeln!(out, "subrosa_requests_total{{class=\"{}xx\"}} {}", i + 1, load(c));
        }
        let _ = writeln!(out, "# HELP subrosa_request_seconds Time to answer a request.");
        let _ = writeln!(out, "# TYPE subrosa_request_seconds histogram");
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += load(&self.latency_buckets[i]);
            let _ = writeln!(out, "subrosa_request_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += load(&self.latency_buckets[LATENCY_BUCKETS.len()]);
        let _ = writeln!(out, "subrosa_request_seconds_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "subrosa_request_seconds_sum {}", load(&self.latency_sum_micros) as f64 / 1e6);
        let _ = writeln!(out, "subrosa_request_seconds_count {cumulative}");
        let gauges = [
            ("subrosa_connections_open", "TCP connections open.", "gauge", load(&self.connections_open)),
            (
                "subrosa_connections_refused_total",
                "Connections refused by the per-address cap.",
                "counter",
                load(&self.connections_refused),
            ),
            ("subrosa_websockets_open", "WebSockets open.", "gauge", load(&self.websockets_open)),
            ("subrosa_sends_stored_total", "Sends stored for delivery.", "counter", load(&self.sends_stored)),
        ];
        for (name, help, kind, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        if let Some(s) = stats {
            let depths = [
                ("subrosa_inbox_rows", "Undelivered inbox rows (one per recipient device).", s.inbox_rows),
                ("subrosa_stored_messages", "Stored ciphertexts not yet delivered to every recipient.", s.messages),
                ("subrosa_devices", "Devices, removed ones included.", s.devices),
                ("subrosa_one_time_key_packages", "One-time key packages stored.", s.one_time_key_packages),
            ];
            for (name, help, value) in depths {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
            }
        }
        out
    }
}

async fn scrape(State(state): State<AppState>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    // A store that cannot answer leaves the depths out; the counters still say
    // how requests fare.
    let stats = state.store.stats().await.ok();
    let body = state.metrics.render(stats);
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
    fn renders_classes_buckets_and_depths_without_any_identifier() {
        let m = Metrics::default();
        m.request(200, Duration::from_millis(3));
        m.request(404, Duration::from_millis(30));
        m.request(503, Duration::from_secs(9));
        m.connections_open.store(2, Ordering::Relaxed);
        let text = m.render(Some(crate::store::StoreStats { inbox_rows: 7, ..Default::default() }));
        assert!(text.contains("subrosa_requests_total{class=\"2xx\"} 1"), "{text}");
        assert!(text.contains("subrosa_requests_total{class=\"4xx\"} 1"));
        assert!(text.contains("subrosa_requests_total{class=\"5xx\"} 1"));
        assert!(text.contains("subrosa_request_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("subrosa_request_seconds_bucket{le=\"0.05\"} 2"));
        assert!(text.contains("subrosa_request_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("subrosa_request_seconds_count 3"));
        assert!(text.contains("subrosa_connections_open 2"));
        assert!(text.contains("subrosa_inbox_rows 7"));
    }
}

//! Server configuration, validated before anything runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use subrosa_proto::limits;

use crate::ServerError;

/// Where TLS material comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM file with the certificate chain.
    pub cert_path: PathBuf,
    /// PEM file with the private key.
    pub key_path: PathBuf,
}

/// Limits the server enforces on clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest ciphertext of one send part, in bytes.
    pub max_ciphertext_bytes: usize,
    /// Most recipient devices of one send part.
    pub max_recipients: usize,
    /// Sustained signed requests per second per device; 0 turns the
    /// per-device limit off.
    pub requests_per_second: u32,
    /// Requests a device may make in a burst above the sustained rate.
    pub burst: u32,
    /// Registrations per minute per client IP address; 0 turns the limit off.
    pub registrations_per_minute: u32,
    /// Open connections one client address may hold (trusted proxies exempt).
    pub max_connections_per_ip: usize,
    /// A connection on which no byte moved either way for this long is closed.
    pub idle_timeout: Duration,
    /// A request whose headers did not all arrive within this time is dropped.
    pub header_timeout: Duration,
    /// Reverse proxies whose `X-Forwarded-For`/`Forwarded` headers name the
    /// client for rate limits; they are exempt from the per-address cap.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Undelivered ciphertext one device, and one account, may have stored
    /// (see [`crate::store::Quota`]).
    pub quota: crate::store::Quota,
    /// The largest blob, and the blob bytes one account may store.
    pub blobs: crate::store::BlobLimits,
    /// How long a blob is kept at most (the message TTL; [`crate::start`]
    /// sets it from [`ServerConfig::message_ttl`]).
    pub blob_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: limits::MAX_BODY_BYTES,
            max_ciphertext_bytes: limits::MAX_CIPHERTEXT_BYTES,
            max_recipients: limits::MAX_RECIPIENTS,
            requests_per_second: 200,
            burst: 400,
            registrations_per_minute: 300,
            max_connections_per_ip: 256,
            idle_timeout: Duration::from_secs(75),
            header_timeout: Duration::from_secs(10),
            trusted_proxies: Vec::new(),
            quota: crate::store::Quota { device_bytes: DEFAULT_DEVICE_QUOTA, account_bytes: DEFAULT_ACCOUNT_QUOTA },
            blobs: crate::store::BlobLimits {
                max_bytes: limits::DEFAULT_MAX_BLOB_BYTES,
                account_bytes: DEFAULT_BLOB_QUOTA,
            },
            blob_ttl: Duration::from_secs(limits::DEFAULT_MESSAGE_TTL_SECS),
        }
    }
}

/// Default quota of undelivered ciphertext per device: 256 MiB, far above
/// a month of text to offline contacts, and a 554 MB flood from one device
/// stops halfway.
pub const DEFAULT_DEVICE_QUOTA: u64 = 256 << 20;
/// Default quota of undelivered ciphertext per account (all its devices).
pub const DEFAULT_ACCOUNT_QUOTA: u64 = 1 << 30;
/// Default quota of stored attachment blobs per account: ten blobs of the
/// largest size waiting for their recipients.
pub const DEFAULT_BLOB_QUOTA: u64 = 1 << 30;

/// Parses a size: `256MiB`, `1GiB`, `512KiB`, `1000` (bytes); `none` (or
/// `0`) for no limit, as `u64::MAX`.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("none") || s == "0" {
        return Ok(u64::MAX);
    }
    let bad = || format!("invalid size {s:?}: use e.g. 256MiB, 1GiB, 512KiB, plain bytes, or none");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).filter(|&b| b > 0).ok_or_else(bad)
}

/// A size for people: `256 MiB`, `1 GiB`, `700 bytes`.
pub fn format_bytes(n: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} bytes")
}

/// Everything [`crate::start`] needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Directory for the SQLite database and other state.
    pub data_dir: PathBuf,
    /// Database URL: `None` or `sqlite://PATH` for SQLite (default
    /// `DATA_DIR/server.db`); `postgres://…` for PostgreSQL (several nodes
    /// may share it).
    pub database: Option<String>,
    /// With PostgreSQL: the pool's size and the batch workers per queue.
    pub postgres: crate::store::postgres::PgOptions,
    /// Serve HTTPS from these PEM files.
    pub tls: Option<TlsConfig>,
    /// How long an undelivered message is kept.
    pub message_ttl: Duration,
    /// How often expired messages are swept (at most half the TTL is used).
    pub sweep_interval: Duration,
    /// Limits on clients.
    pub limits: Limits,
    /// The key directory publishes at most one epoch per this interval.
    pub kt_publish_interval: Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`); never the public
    /// address. `None`: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the call relay listens (UDP); `None`: no relay.
    pub relay_listen: Option<SocketAddr>,
    /// The malicious-operator controller (only `subrosa-attack-server` sets it).
    #[cfg(feature = "test-attacks")]
    pub attacks: Option<std::sync::Arc<crate::attacks::Attacks>>,
}

impl ServerConfig {
    /// A configuration with the defaults: no TLS, SQLite in `data_dir`,
    /// messages kept 30 days, sweeps every minute, the protocol's limits.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        ServerConfig {
            listen,
            data_dir,
            database: None,
            postgres: crate::store::postgres::PgOptions::default(),
            tls: None,
            message_ttl: Duration::from_secs(limits::DEFAULT_MESSAGE_TTL_SECS),
            sweep_interval: Duration::from_secs(60),
            limits: Limits::default(),
            kt_publish_interval: crate::DEFAULT_KT_PUBLISH_INTERVAL,
            metrics_listen: None,
            relay_listen: None,
            #[cfg(feature = "test-attacks")]
            attacks: None,
        }
    }

    /// The sweep period actually used: the configured interval, but at most
    /// half the TTL (so a short TTL is honoured promptly) and at least 100 ms.
    pub fn effective_sweep_interval(&self) -> Duration {
        self.sweep_interval.min(self.message_ttl / 2).max(Duration::from_millis(100))
    }
}

/// Which storage backend a database URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL server.
    Postgres(String),
}

impl DatabaseUrl {
    /// Parses `--database`: absent means `DATA_DIR/server.db`.
    ///
    /// # Errors
    /// [`ServerError::Config`] for an unknown scheme or an empty path.
    pub fn parse(url: Option<&str>, data_dir: &std::path::Path) -> Result<Self, ServerError> {
        let Some(url) = url else {
            return Ok(DatabaseUrl::Sqlite(data_dir.join("server.db")));
        };
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(ServerError::Config("--database sqlite:// needs a file path".into()));
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(url.to_owned()));
        }
        Err(ServerError::Config("--database must be sqlite://PATH or postgres://… (scheme not recognised)".into()))
    }
}

/// Parses a duration: `30d`, `12h`, `90m`, `2s`, `500ms` or plain seconds.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("invalid duration {s:?}: use e.g. 30d, 12h, 90m, 2s, 500ms or plain seconds");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs).ok_or_else(bad);
    match unit {
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        "ms" => Ok(Duration::from_millis(n)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "d", "1x", "-1s", "1.5h", "99999999999999999999d", "1 d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("none"), Ok(u64::MAX));
        assert_eq!(parse_size("0"), Ok(u64::MAX));
        for bad in ["", "MiB", "1.5GiB", "-1", "99999999999TiB", "1 MiB", "1PB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(format_bytes(256 << 20), "256 MiB");
        assert_eq!(format_bytes(1 << 30), "1 GiB");
        assert_eq!(format_bytes(1500), "1500 bytes");
    }

    #[test]
    fn database_urls() {
        let dir = std::path::Path::new("/data");
        assert_eq!(DatabaseUrl::parse(None, dir).ok(), Some(DatabaseUrl::Sqlite("/data/server.db".into())));
        assert_eq!(
            DatabaseUrl::parse(Some("sqlite:///tmp/x.db"), dir).ok(),
            Some(DatabaseUrl::Sqlite("/tmp/x.db".into()))
        );
        assert!(matches!(DatabaseUrl::parse(Some("postgres://h/db"), dir), Ok(DatabaseUrl::Postgres(_))));
        assert!(DatabaseUrl::parse(Some("mysql://h/db"), dir).is_err());
        assert!(DatabaseUrl::parse(Some("sqlite://"), dir).is_err());
    }

    #[test]
    fn sweep_interval_follows_short_ttl() {
        let mut c = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), "d".into());
        assert_eq!(c.effective_sweep_interval(), Duration::from_secs(60));
        c.message_ttl = Duration::from_secs(2);
        assert_eq!(c.effective_sweep_interval(), Duration::from_secs(1));
    }
}

//! The `subrosa-server` command line, shared by the binary and the
//! test-only `subrosa-attack-server`.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory as _, FromArgMatches as _, Parser};

use crate::{parse_duration, Limits, ServerConfig, TlsConfig};

/// Subrosa delivery service: relays and orders opaque end-to-end encrypted
/// messages. It holds no keys and fetches no links.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Data directory (created when missing).
    #[arg(long = "data", default_value = "./subrosa-data")]
    data: PathBuf,
    /// Database: sqlite://PATH (default DATA/server.db) or postgres://…
    #[arg(long)]
    database: Option<String>,
    /// PEM certificate chain; serves HTTPS (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key (needs --tls-cert).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// How long undelivered messages are kept: 30d, 12h, 90m, 2s or seconds.
    #[arg(long, default_value = "30d", value_parser = parse_ttl)]
    message_ttl: Duration,
    /// How often expired messages, blobs and disappearing messages are
    /// deleted (at most half the message TTL): 60s, 5s…
    #[arg(long, default_value = "60s", value_parser = parse_ttl)]
    sweep_interval: Duration,
    /// Most recipient devices of one message part.
    #[arg(long, default_value_t = subrosa_proto::limits::MAX_RECIPIENTS, value_parser = parse_positive)]
    max_recipients: usize,
    /// Signed requests per second per device (burst: twice that); 0 = no limit.
    #[arg(long, default_value_t = 200)]
    rate_limit: u32,
    /// A reverse proxy (address or CIDR, repeatable) whose X-Forwarded-For /
    /// Forwarded headers name the client for rate limits; it is exempt from
    /// the per-address connection cap.
    #[arg(long = "trusted-proxy", value_name = "CIDR", value_parser = parse_cidr)]
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address, e.g.
    /// 127.0.0.1:9100; keep it off the public network.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Run the call relay on this UDP address, e.g. 0.0.0.0:3478: it
    /// forwards end-to-end encrypted call media among a call's devices.
    #[arg(long, value_name = "ADDR")]
    relay_listen: Option<SocketAddr>,
    /// Log lines as `text` (colour only on a terminal) or one JSON object
    /// per line (`json`), for a log collector.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Open connections one client address may hold.
    #[arg(long, default_value_t = 256, value_parser = parse_positive)]
    max_connections_per_ip: usize,
    /// Close a connection on which nothing moved for this long (WebSockets
    /// are pinged every 20 s, so they stay): 75s, 5m…
    #[arg(long, default_value = "75s", value_parser = parse_timeout)]
    idle_timeout: Duration,
    /// Drop a request whose headers did not arrive within this time.
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    header_timeout: Duration,
    /// Undelivered ciphertext one device may have sent and stored here
    /// (256MiB, 1GiB, 512KiB, bytes, or none); past it sends are refused
    /// with 413 quota_exceeded until recipients fetch what waits.
    #[arg(long, default_value = "256MiB", value_parser = crate::config::parse_size)]
    quota_per_device: u64,
    /// The same for all the devices of one account together.
    #[arg(long, default_value = "1GiB", value_parser = crate::config::parse_size)]
    quota_per_account: u64,
    /// The largest attachment the server stores (a file of this size fits:
    /// the limit applies to the blob such a file seals to, padding included);
    /// larger uploads are refused with 413 blob_too_large.
    #[arg(long, default_value = "100MiB", value_parser = crate::config::parse_size)]
    max_blob_size: u64,
    /// Attachment blobs one account may have stored together (until their
    /// recipients fetched them, or they expire at the message TTL); past it
    /// uploads are refused with 413 blob_quota_exceeded.
    #[arg(long, default_value = "1GiB", value_parser = crate::config::parse_size)]
    blob_quota_per_account: u64,
    /// With PostgreSQL: connections this node keeps at most. Follow the
    /// database host's cores; it must exceed 4 × --db-batch-workers.
    #[arg(long, default_value_t = crate::store::postgres::POOL_SIZE, value_parser = parse_positive)]
    db_pool_size: usize,
    /// With PostgreSQL: workers per batch queue (sends, acknowledgements,
    /// rate-limit checks, socket reads), each a transaction in flight;
    /// fewer make larger batches. 0 runs every operation alone.
    #[arg(long, default_value_t = crate::store::postgres::PgOptions::default().batch_workers)]
    db_batch_workers: usize,
}

/// An address (a /32 or /128) or a CIDR block.
fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not an address or CIDR block (e.g. 10.0.0.0/8, ::1)"))
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err("a timeout must be at least 1s".into());
    }
    Ok(d)
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err("the message TTL must be at least 1s".into());
    }
    Ok(d)
}

/// The whole `subrosa-server` command line under the name `name` (with
/// `about` for `--help` when given):
/// arguments, logging, the runtime, and a server that stops gracefully on
/// SIGTERM or SIGINT. `customize` sees the configuration last (the test-only
/// attack server installs its controller there).
pub fn main(name: &'static str, about: Option<&'static str>, customize: impl FnOnce(&mut ServerConfig)) -> ExitCode {
    let mut command = Args::command().name(name).bin_name(name);
    if let Some(about) = about {
        command = command.about(about);
    }
    let matches = command.try_get_matches();
    let args = match matches.and_then(|m| Args::from_arg_matches(&m)) {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // akd logs every publish and lookup at info level.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,akd=warn"));
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    if args.log_format == "json" {
        logs.json().init();
    } else {
        // No colour codes in files and journals.
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }

    let mut config = ServerConfig::new(args.listen, args.data);
    config.database = args.database;
    config.postgres =
        crate::store::postgres::PgOptions { pool_size: args.db_pool_size, batch_workers: args.db_batch_workers };
    if let Err(e) = config.postgres.check() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    config.tls = match (args.tls_cert, args.tls_key) {
        (Some(cert_path), Some(key_path)) => Some(TlsConfig { cert_path, key_path }),
        _ => None,
    };
    config.message_ttl = args.message_ttl;
    config.sweep_interval = args.sweep_interval;
    config.metrics_listen = args.metrics_listen;
    config.relay_listen = args.relay_listen;
    config.limits = Limits {
        max_recipients: args.max_recipients,
        requests_per_second: args.rate_limit,
        burst: args.rate_limit.saturating_mul(2),
        max_connections_per_ip: args.max_connections_per_ip,
        idle_timeout: args.idle_timeout,
        header_timeout: args.header_timeout,
        trusted_proxies: args.trusted_proxies,
        quota: crate::store::Quota { device_bytes: args.quota_per_device, account_bytes: args.quota_per_account },
        blobs: crate::store::BlobLimits { max_bytes: args.max_blob_size, account_bytes: args.blob_quota_per_account },
        ..Limits::default()
    };
    customize(&mut config);

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(name, config))
}

async fn run(name: &str, config: ServerConfig) -> ExitCode {
    // Install the handlers before announcing readiness, so a signal sent right
    // after the ready line is handled gracefully rather than killing us.
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name}: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let server = match crate::start(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(1);
        }
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {}", server.url());
        if let Some(addr) = server.metrics_addr() {
            let _ = writeln!(out, "metrics on http://{addr}/metrics");
        }
        let _ = out.flush();
    }
    let trigger = server.shutdown_trigger();
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!("shutting down");
        trigger.trigger();
    });
    server.wait().await;
    ExitCode::SUCCESS
}

/// SIGTERM and SIGINT (Ctrl-C elsewhere).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    #[cfg(not(unix))]
    fn install() -> std::io::Result<Self> {
        Ok(Signals {})
    }

    #[cfg(unix)]
    async fn recv(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    #[cfg(not(unix))]
    async fn recv(self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}

//! `subrosa-bench`: benchmarks that print figures (no timed assertions).
//!
//! Run each subcommand in release mode:
//!
//! ```text
//! cargo run --release -p subrosa-bench -- crypto     [--iterations N] [--size 200] [--min-seconds 1] [--dir DIR]
//! cargo run --release -p subrosa-bench -- catchup    [--direct 10000] [--group-members 100] [--group-messages 1000] [--dir DIR]
//! cargo run --release -p subrosa-bench -- latency    [--messages 200] [--server URL]
//! cargo run --release -p subrosa-bench -- throughput [--pairs 50] [--messages-per-pair 40] [--server URL]
//! cargo run --release -p subrosa-bench -- kt-publish [--handles 10000] [--batch 10000] [--samples 50]
//! cargo run --release -p subrosa-bench -- media      [--frames 5000]
//! cargo run --release -p subrosa-bench -- calls      [--seconds 10] [--max-calls 3200] [--step-seconds 3]
//! cargo build --release -p subrosa-cli -p subrosa-server && cargo run --release -p subrosa-bench -- coldstart [--sends 15]
//! cargo build --release -p subrosa-cli -p subrosa-server && cargo run --release -p subrosa-bench -- tui-start [--conversations 100] [--messages 10000] [--rounds 10]
//! ```
//!
//! - `catchup`: decrypt-and-store msgs/s of a device coming online to
//!   queued messages through the client session over SQLCipher, one
//!   transaction per 500 envelopes beside the baseline of one per envelope
//!   (see `catchup.rs`).
//!
//! - `coldstart`: whole-process wall and CPU time of a cold `subrosa send`
//!   over a real server process, with the session key cache beside the
//!   baseline without it (see `coldstart.rs`).
//!
//! - `tui-start`: whole-process wall time of `subrosa tui` from spawn to
//!   its first frame on a pseudo-terminal, with 100 conversations and
//!   10,000 messages beside the baseline of one conversation with one
//!   message (see `tuistart.rs`).
//!
//! - `crypto`: messages per second for encrypt + decrypt of one message of
//!   `--size` bytes, in five rows measured in the same run: (a) raw
//!   AES-128-GCM seal + open with aws-lc-rs (fresh nonce per message);
//!   (b) mls-rs alone: two plain mls-rs clients (basic credentials, AWS-LC,
//!   in-memory storage, CURVE25519_AES128, state never written to storage)
//!   in a two-member group, `encrypt_application_message` on one and
//!   `process_incoming_message` on the other; (c) two `subrosa_core::Engine`s
//!   over in-memory storage, `encrypt` + `process` (content encoding and
//!   padding, certificate-checked roster lookups, state loaded from and
//!   written to storage on every call); (d) the same over the client's real
//!   SQLCipher stores, each call in a `Store::write` (the cost of
//!   persisting every message); (e) the same over the client's in-memory
//!   store (what the store trait and its transactions cost without a
//!   disk). Each row prints msgs/s and its ratio to
//!   (a) and (b). Without `--iterations` each row runs at least
//!   `--min-seconds` after a warm-up.
//! - `latency`: end-to-end latency over a real server on loopback (started
//!   in-process in a temporary directory unless `--server` is given): from
//!   the moment alice calls `send_text` to the moment bob's `follow` callback
//!   sees that message. The conversation is established first; then
//!   `--messages` messages are sent one at a time (the next once the previous
//!   arrived), and p50/p90/p99/max are printed in ms.
//! - `throughput`: `--pairs` concurrent sender/receiver pairs (twice as many
//!   registered users) over the real server. Receivers follow over
//!   WebSockets; once every pair's conversation exists, all senders send
//!   `--messages-per-pair` messages each at once. Prints the messages
//!   delivered per second counted at the receivers (first send to last
//!   delivery), the total delivered and any lost.
//! - `kt-publish`: the key directory over a fresh SQLite database: the
//!   time to publish `--handles` handles in epochs of `--batch`, then one
//!   epoch with 1 and one with 100 changed handles on top; the lookup proof's
//!   size (protobuf), its generation time and the client's verification time
//!   (protobuf decode + `akd::client::lookup_verify`); and the size and
//!   verification time of one epoch's append-only proof.
//! - `media`: CPU per 20 ms call frame: Opus encode + decode alone (the
//!   baseline), then with SFrame seal + open, then the whole chain with the
//!   jitter buffer and playout, each with its ratio to the baseline
//!   (`media.rs`).
//! - `calls`: a call's mouth-to-ear latency (tone bursts through Opus,
//!   SFrame, the server's relay and the jitter buffer on loopback) and each
//!   endpoint's CPU, beside raw PCM over UDP; then how many concurrent 1:1
//!   calls the relay carries at ≤1% loss, beside a plain UDP echo
//!   (`calls.rs`).
//!
//! Everything (clients and, by default, the server) runs in this one process
//! on a multi-threaded tokio runtime, so on a small machine the server and
//! the clients compete for the same cores; the header of each run says so.

mod attachments;
mod calls;
mod catchup;
mod coldstart;
mod compare;
mod crypto;
mod groups;
mod kt;
mod load;
mod loadgen;
mod media;
mod net;
mod roster;
mod tuistart;
mod updates;
mod xmpp;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Subrosa benchmarks: crypto overhead, end-to-end latency, server throughput.
#[derive(Debug, Parser)]
#[command(name = "subrosa-bench", version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Upload and download MiB/s of one attachment through an in-process
    /// server, beside raw AES-256-GCM over the same bytes.
    Attachments {
        /// The file's size in MiB.
        #[arg(long, default_value_t = 100)]
        mib: u64,
    },
    /// Encrypt+decrypt msgs/s: raw AES-GCM, mls-rs alone, Subrosa core, Subrosa core over the client store.
    Crypto {
        /// Messages per row (default: as many as fit in --min-seconds).
        #[arg(long)]
        iterations: Option<u64>,
        /// Message size in bytes.
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// Least time per row when --iterations is not given.
        #[arg(long, default_value_t = 1.0)]
        min_seconds: f64,
        /// Where the client stores of row (d) live (default: the system temp directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Catch-up: decrypt-and-store msgs/s of a device coming online to queued
    /// messages, batched against one transaction per message.
    Catchup {
        /// Messages queued in a 1:1 conversation.
        #[arg(long, default_value_t = 10_000)]
        direct: usize,
        /// Members of the group (at least 12: ten senders, two receivers).
        #[arg(long, default_value_t = 100)]
        group_members: usize,
        /// Messages queued in the group.
        #[arg(long, default_value_t = 1_000)]
        group_messages: usize,
        /// Where the stores live (default: the system temp directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// End-to-end latency from send_text to the receiver's follow callback.
    Latency {
        /// Messages to time.
        #[arg(long, default_value_t = 200)]
        messages: usize,
        /// Use this server instead of starting one in-process.
        #[arg(long)]
        server: Option<String>,
    },
    /// What key-directory verification adds to starting a conversation.
    KtStart {
        /// New contacts alice starts a conversation with.
        #[arg(long, default_value_t = 30)]
        contacts: usize,
        /// Use this server instead of starting one in-process.
        #[arg(long)]
        server: Option<String>,
    },
    /// Delivered messages per second with many concurrent sender/receiver pairs.
    Throughput {
        /// Sender/receiver pairs.
        #[arg(long, default_value_t = 50)]
        pairs: usize,
        /// Messages each sender sends.
        #[arg(long, default_value_t = 40)]
        messages_per_pair: usize,
        /// Use this server instead of starting one in-process.
        #[arg(long)]
        server: Option<String>,
    },
    /// Load benchmark: N devices over real WebSockets against a real subrosa-server process.
    Load {
        #[command(flatten)]
        load: loadgen::LoadOptions,
        #[command(flatten)]
        server: load::ServerOptions,
        /// How devices send and acknowledge, each path a whole run against a fresh server: `http`
        /// (signed requests and JSON frames, the baseline) and `frames` (binary frames on the socket).
        #[arg(long, value_delimiter = ',', default_value = "http,frames")]
        paths: Vec<load::Path>,
    },
    /// The same load benchmark against an XMPP server (ejabberd; see bench/ejabberd/setup.sh).
    Xmpp {
        #[command(flatten)]
        load: loadgen::LoadOptions,
        #[command(flatten)]
        xmpp: xmpp::XmppOptions,
    },
    /// Prints the figures of a `load --json` and an `xmpp --json` run side by side.
    Compare {
        /// JSON written by `load --json`.
        subrosa: PathBuf,
        /// JSON written by `xmpp --json`.
        ejabberd: PathBuf,
    },
    /// Group scaling through subrosa-core beside mls-rs alone, and server fan-out.
    Groups {
        /// Group sizes.
        #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
        sizes: Vec<usize>,
        /// Application messages per encrypt/decrypt row.
        #[arg(long, default_value_t = 2000)]
        messages: usize,
        /// Messages per batch in the batched rows (the state is written
        /// once per batch, as a flush of queued sends or a fetched page).
        #[arg(long, default_value_t = 50)]
        batch: usize,
    },
    /// What the conversation roster check adds to a send on the server (SQLite store).
    Roster {
        /// Roster sizes.
        #[arg(long, value_delimiter = ',', default_value = "2,100,1000")]
        sizes: Vec<usize>,
        /// Application sends per row.
        #[arg(long, default_value_t = 2000)]
        sends: usize,
    },
    /// What a periodic key update costs: commit time, size and processing, beside mls-rs alone.
    Updates {
        /// Group sizes (the last one is used for the per-day cost).
        #[arg(long, value_delimiter = ',', default_value = "2,100,1000")]
        sizes: Vec<usize>,
    },
    /// A call's mouth-to-ear latency and client CPU beside raw PCM over UDP, and the relay's
    /// capacity in 1:1 calls beside a plain UDP echo.
    Calls {
        /// Length of each timed call (raw and through the relay).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// The most concurrent calls to try.
        #[arg(long, default_value_t = 3200)]
        max_calls: usize,
        /// Length of each capacity step.
        #[arg(long, default_value_t = 3)]
        step_seconds: u64,
    },
    /// CPU per 20 ms call frame: Opus alone (baseline), + SFrame, + jitter buffer and playout.
    Media {
        /// Frames per row (5000 frames = 100 s of audio).
        #[arg(long, default_value_t = 5000)]
        frames: usize,
    },
    /// Whole-process time of a cold `subrosa send`, with the session key cache and without (the baseline).
    Coldstart {
        /// Timed processes per row.
        #[arg(long, default_value_t = 15)]
        sends: usize,
        #[command(flatten)]
        server: load::ServerOptions,
    },
    /// Whole-process time of `subrosa tui` to its first frame: many conversations beside one (the baseline).
    TuiStart {
        /// Conversations (groups with one other member).
        #[arg(long, default_value_t = 100)]
        conversations: usize,
        /// Messages in all, spread evenly.
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
        /// Timed processes per row.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        #[command(flatten)]
        server: load::ServerOptions,
    },
    /// Key-directory publish time, proof sizes and verification times.
    KtPublish {
        /// Handles in the directory.
        #[arg(long, default_value_t = 10_000)]
        handles: usize,
        /// Handles per epoch of the initial bulk publish.
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
        /// Lookups to time.
        #[arg(long, default_value_t = 50)]
        samples: usize,
    },
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// ", 1-minute load average L" from /proc/loadavg (Linux), so a busy machine shows in the figures' header.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(|l| format!(", 1-minute load average {l} before the run")))
        .unwrap_or_default()
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("subrosa-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let profile = if cfg!(debug_assertions) { "debug (figures are meaningless: use --release)" } else { "release" };
    println!(
        "subrosa-bench {} ({profile} build), machine: {} cores{}",
        env!("CARGO_PKG_VERSION"),
        cores(),
        load_average()
    );
    match args.command {
        Command::Attachments { mib } => {
            anyhow::ensure!((1..=1024).contains(&mib), "--mib must be 1 to 1024");
            runtime()?.block_on(attachments::run(mib))
        }
        Command::Crypto { iterations, size, min_seconds, dir } => {
            anyhow::ensure!(size > 0, "--size must be at least 1");
            anyhow::ensure!(size <= subrosa_core::content::MAX_TEXT_BYTES, "--size must be at most 64 KiB");
            anyhow::ensure!(iterations != Some(0), "--iterations must be at least 1");
            anyhow::ensure!(min_seconds > 0.0, "--min-seconds must be positive");
            crypto::run(&crypto::Options { iterations, size, min_seconds, dir })
        }
        Command::Latency { messages, server } => {
            anyhow::ensure!(messages > 0, "--messages must be at least 1");
            runtime()?.block_on(net::latency(messages, server))
        }
        Command::KtStart { contacts, server } => {
            anyhow::ensure!(contacts > 0, "--contacts must be at least 1");
            runtime()?.block_on(net::kt_start(contacts, server))
        }
        Command::Throughput { pairs, messages_per_pair, server } => {
            anyhow::ensure!(pairs > 0, "--pairs must be at least 1");
            anyhow::ensure!(messages_per_pair > 0, "--messages-per-pair must be at least 1");
            runtime()?.block_on(net::throughput(pairs, messages_per_pair, server))
        }
        Command::Load { load, server, paths } => {
            load.check()?;
            runtime()?.block_on(load::run(&load, &server, &paths))
        }
        Command::Xmpp { load, xmpp } => {
            load.check()?;
            runtime()?.block_on(xmpp::run(&load, &xmpp))
        }
        Command::Catchup { direct, group_members, group_messages, dir } => {
            anyhow::ensure!(direct > 0 && group_messages > 0, "--direct and --group-messages must be at least 1");
            anyhow::ensure!(group_members >= 12, "--group-members must be at least 12");
            catchup::run(direct, group_members, group_messages, &dir.unwrap_or_else(std::env::temp_dir))
        }
        Command::Compare { subrosa, ejabberd } => compare::run(&subrosa, &ejabberd),
        Command::Groups { sizes, messages, batch } => {
            anyhow::ensure!(sizes.iter().all(|&n| n >= 2), "every --sizes entry must be at least 2");
            anyhow::ensure!(messages > 0, "--messages must be at least 1");
            anyhow::ensure!(batch > 0, "--batch must be at least 1");
            runtime()?.block_on(groups::run(&sizes, messages, batch))
        }
        Command::Roster { sizes, sends } => {
            anyhow::ensure!(sends >= 4, "--sends must be at least 4");
            runtime()?.block_on(roster::run(&sizes, sends))
        }
        Command::Updates { sizes } => {
            anyhow::ensure!(sizes.iter().all(|&n| n >= 2), "every --sizes entry must be at least 2");
            updates::run(&sizes)
        }
        Command::Calls { seconds, max_calls, step_seconds } => calls::run(seconds, max_calls, step_seconds),
        Command::Media { frames } => {
            anyhow::ensure!(frames >= 10, "--frames must be at least 10");
            media::run(frames)
        }
        Command::Coldstart { sends, server } => {
            anyhow::ensure!(sends > 0, "--sends must be at least 1");
            anyhow::ensure!(server.server.is_none(), "coldstart spawns its own server: --server is not supported");
            runtime()?.block_on(coldstart::run(sends, &server))
        }
        Command::TuiStart { conversations, messages, rounds, server } => {
            anyhow::ensure!(conversations > 0 && rounds > 0, "--conversations and --rounds must be at least 1");
            anyhow::ensure!(messages >= conversations, "--messages must be at least --conversations (one each)");
            anyhow::ensure!(server.server.is_none(), "tui-start spawns its own server: --server is not supported");
            runtime()?.block_on(tuistart::run(conversations, messages, rounds, &server))
        }
        Command::KtPublish { handles, batch, samples } => {
            anyhow::ensure!(handles >= 100, "--handles must be at least 100");
            anyhow::ensure!(batch > 0, "--batch must be at least 1");
            anyhow::ensure!(samples > 0, "--samples must be at least 1");
            runtime()?.block_on(kt::run(handles, batch, samples))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the tokio runtime")
}

//! `coldstart`: the whole-process time of a cold `subrosa send` to an
//! established contact, with the session key cache and without it.
//!
//! Runs the real binaries: a `subrosa-server` process on loopback (see
//! `load::SpawnedServer`) and the `subrosa` beside this binary, two users
//! in temporary homes. alice and bob exchange one message each way first
//! (the 1:1 conversation exists, both sides' keys are pinned); then
//! `--sends` rounds, each timing one `subrosa send bob …` process in every
//! mode, the modes taking turns so a change in the machine's load hits them
//! alike:
//!
//! - baseline: `SUBROSA_KEY_CACHE=off`, the passphrase in
//!   `SUBROSA_PASSPHRASE`: Argon2id derives the store key every time (the
//!   behaviour before the cache);
//! - cache, passphrase given: the key cached in the session keyring, the
//!   passphrase still given (as scripts do) and checked against the entry;
//! - cache, no passphrase: the key cached, no passphrase;
//! - through a daemon: a `subrosa daemon` runs on alice's home and the
//!   `send` goes through its socket (no passphrase, no key derivation, no
//!   connection of its own). The other modes pass `--no-daemon`. The
//!   daemon's own CPU time is not in its row (it is not a waited-for
//!   child until the end).
//!
//! Wall time is from spawn to exit as seen here; CPU time is the child's
//! user + system time (getrusage of waited-for children). Prints medians and
//! the 90th percentile. The cached rows are skipped, with a message, where
//! the kernel keyring is unavailable.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::resource::{getrusage, UsageWho};

use crate::load::{ServerOptions, SpawnedServer};

const PASS: &str = "coldstart benchmark passphrase";

#[derive(Clone, Copy)]
enum Mode {
    Baseline,
    CachedWithPass,
    CachedNoPass,
    Daemon,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline: cache off, Argon2id every time",
            Mode::CachedWithPass => "cache on, SUBROSA_PASSPHRASE given",
            Mode::CachedNoPass => "cache on, no passphrase",
            Mode::Daemon => "through a running daemon (its CPU not counted)",
        }
    }
}

struct Timing {
    wall: Duration,
    cpu: Duration,
}

fn children_cpu() -> anyhow::Result<Duration> {
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).context("getrusage")?;
    let t = |tv: nix::sys::time::TimeVal| Duration::new(tv.tv_sec().max(0) as u64, (tv.tv_usec().max(0) as u32) * 1000);
    Ok(t(u.user_time()) + t(u.system_time()))
}

struct Cli {
    bin: PathBuf,
}

impl Cli {
    fn command(&self, home: &Path, mode: Mode, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--home").arg(home);
        if !matches!(mode, Mode::Daemon) {
            c.arg("--no-daemon");
        }
        c.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        c.env_remove("SUBROSA_HOME").env_remove("SUBROSA_LOG");
        match mode {
            Mode::Baseline => c.env("SUBROSA_KEY_CACHE", "off").env("SUBROSA_PASSPHRASE", PASS),
            Mode::Daemon => c.env("SUBROSA_KEY_CACHE", "off").env_remove("SUBROSA_PASSPHRASE"),
            Mode::CachedWithPass => c.env("SUBROSA_KEY_CACHE", "15m").env("SUBROSA_PASSPHRASE", PASS),
            Mode::CachedNoPass => c.env("SUBROSA_KEY_CACHE", "15m").env_remove("SUBROSA_PASSPHRASE"),
        };
        c
    }

    fn run(&self, home: &Path, mode: Mode, args: &[&str]) -> anyhow::Result<Timing> {
        let cpu_before = children_cpu()?;
        let start = Instant::now();
        let out = self.command(home, mode, args).output().with_context(|| format!("running {}", self.bin.display()))?;
        let wall = start.elapsed();
        let cpu = children_cpu()?.saturating_sub(cpu_before);
        if !out.status.success() {
            bail!("subrosa {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(Timing { wall, cpu })
    }
}

/// `subrosa daemon` on a home, ended (SIGKILL) when dropped.
struct Daemon(std::process::Child);

impl Daemon {
    fn start(cli: &Cli, home: &Path) -> anyhow::Result<Daemon> {
        use std::io::BufRead as _;
        let mut child = cli
            .command(home, Mode::Baseline, &["daemon"])
            .spawn()
            .with_context(|| format!("running {} daemon", cli.bin.display()))?;
        let mut err = std::io::BufReader::new(child.stderr.take().context("the daemon's stderr")?);
        let mut first = String::new();
        err.read_line(&mut first).context("reading the daemon's first line")?;
        if !first.contains("listening on") {
            let _ = child.kill();
            bail!("the daemon did not start: {}", first.trim());
        }
        // The rest is read, so the daemon never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Ok(Daemon(child))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn quantile(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

pub async fn run(sends: usize, server: &ServerOptions) -> anyhow::Result<()> {
    let here = std::env::current_exe().context("cannot find this binary")?;
    let bin = here.with_file_name(format!("subrosa{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(bin.exists(), "{} not found: build it (cargo build --release -p subrosa-cli)", bin.display());
    let cli = Cli { bin };
    let spawned = SpawnedServer::start(server).await?;
    let result = tokio::task::block_in_place(|| measure(&cli, &spawned.url, sends));
    spawned.stop().await;
    result
}

fn measure(cli: &Cli, url: &str, sends: usize) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("subrosa-coldstart-").tempdir().context("temporary directory")?;
    let alice = dir.path().join("alice");
    let bob = dir.path().join("bob");
    for (home, handle) in [(&alice, "alice"), (&bob, "bob")] {
        cli.run(home, Mode::Baseline, &["register", handle, "--server", url])?;
    }
    cli.run(&alice, Mode::Baseline, &["send", "bob", "hello"])?;
    cli.run(&bob, Mode::Baseline, &["receive"])?;
    cli.run(&bob, Mode::Baseline, &["send", "alice", "hello back"])?;
    cli.run(&alice, Mode::Baseline, &["receive"])?;

    let cached = subrosa_client::keycache::available();
    let modes: &[Mode] = if cached {
        // Fills the cache.
        cli.run(&alice, Mode::CachedWithPass, &["contacts"])?;
        &[Mode::Baseline, Mode::CachedWithPass, Mode::CachedNoPass, Mode::Daemon]
    } else {
        println!("the kernel keyring is not available here: the cached rows are not measured");
        &[Mode::Baseline, Mode::Daemon]
    };
    let _daemon = Daemon::start(cli, &alice)?;
    println!(
        "cold `subrosa send bob TEXT` (established 1:1, loopback server), {sends} processes per row, rows interleaved"
    );
    let mut rows: Vec<(Vec<Duration>, Vec<Duration>)> = modes.iter().map(|_| (Vec::new(), Vec::new())).collect();
    // One untimed round: the page cache holds the binaries and databases.
    for &mode in modes {
        cli.run(&alice, mode, &["send", "bob", "warm-up"])?;
    }
    for i in 0..sends {
        for (row, &mode) in rows.iter_mut().zip(modes) {
            let t = cli.run(&alice, mode, &["send", "bob", &format!("message {i}")])?;
            row.0.push(t.wall);
            row.1.push(t.cpu);
        }
    }
    if cached {
        let out = cli.command(&alice, Mode::CachedNoPass, &["lock"]).output().context("subrosa lock")?;
        anyhow::ensure!(out.status.success(), "subrosa lock failed");
    }
    println!("{:<44} {:>12} {:>12} {:>12} {:>12}", "", "wall p50 ms", "wall p90 ms", "CPU p50 ms", "CPU p90 ms");
    let mut base_wall = None;
    for ((wall, cpu), &mode) in rows.iter_mut().zip(modes) {
        let (w50, w90, c50, c90) = (quantile(wall, 0.5), quantile(wall, 0.9), quantile(cpu, 0.5), quantile(cpu, 0.9));
        let ratio = match base_wall {
            None => {
                base_wall = Some(w50);
                String::new()
            }
            Some(b) => format!("  ({:.2}x the baseline's wall)", w50 / b),
        };
        println!("{:<44} {w50:>12.1} {w90:>12.1} {c50:>12.1} {c90:>12.1}{ratio}", mode.label());
    }
    Ok(())
}

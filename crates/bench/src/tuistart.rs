//! `tui-start`: whole-process time of `subrosa tui` from spawn to its first
//! frame, on a home with `--conversations` conversations holding
//! `--messages` messages in all, beside the baseline of a home with one
//! conversation of one message.
//!
//! Runs the real binaries: a `subrosa-server` process on loopback and the
//! `subrosa` beside this binary, each TUI on a pseudo-terminal of its own
//! (120×40) made here, with `--exit-after-first-frame` (hidden: the process
//! ends once the first frame is on the terminal). Homes are made in this
//! process: alice creates `--conversations` groups with bob and sends one
//! message to each (real MLS conversations on the server); the rest of the
//! messages are written into her store directly (half from bob, half hers,
//! in the same rows a received or sent message makes), since start-up reads
//! the store and never the server. carol, the baseline, has one group with
//! bob and one message. The rows take turns, so a change in the machine's
//! load hits them alike. Where the kernel keyring is there, the store key
//! comes from the session key cache (filled once, emptied at the end), so
//! the figure is the UI's own start-up; elsewhere it is derived every time
//! (Argon2id, as after a reboot), which both rows then include.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use subrosa_client::store::StoredMessage;
use subrosa_client::{MessageState, Subrosa, Target};

use crate::load::{ServerOptions, SpawnedServer};

const PASS: &str = "tui start-up benchmark passphrase";

pub async fn run(conversations: usize, messages: usize, rounds: usize, server: &ServerOptions) -> anyhow::Result<()> {
    let here = std::env::current_exe().context("cannot find this binary")?;
    let bin = here.with_file_name(format!("subrosa{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(bin.exists(), "{} not found: build it (cargo build --release -p subrosa-cli)", bin.display());
    // Making the homes is many requests in a row from one device: not what
    // is measured, so the server's per-device rate limit is off unless
    // --server-arg says otherwise.
    let mut server = server.clone();
    if !server.server_arg.iter().any(|a| a.starts_with("--rate-limit")) {
        server.server_arg.extend(["--rate-limit".to_string(), "0".to_string()]);
    }
    let spawned = SpawnedServer::start(&server).await?;
    let dir = tempfile::Builder::new().prefix("subrosa-tuistart-").tempdir().context("temporary directory")?;
    let result = async {
        let (big, small) = make_homes(dir.path(), &spawned.url, conversations, messages).await?;
        tokio::task::block_in_place(|| measure(&bin, &big, &small, conversations, messages, rounds))
    }
    .await;
    spawned.stop().await;
    result
}

async fn make_homes(
    dir: &Path,
    url: &str,
    conversations: usize,
    messages: usize,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (big, small) = (dir.join("alice"), dir.join("carol"));
    let alice = Subrosa::register(&big, PASS, "alice", url).await?;
    let _bob = Subrosa::register(&dir.join("bob"), PASS, "bob", url).await?;
    let carol = Subrosa::register(&small, PASS, "carol", url).await?;
    let one = carol.create_group("one", &["bob".to_string()]).await?;
    carol.send_text(&Target::Conversation(one.id.parse()?), "hello").await?;
    println!("making {conversations} conversations with {messages} messages in all…");
    let per = messages.div_ceil(conversations).max(1);
    let mut left = messages;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    for i in 0..conversations {
        let g = alice.create_group(&format!("group {i}"), &["bob".to_string()]).await?;
        let id: subrosa_proto::ConversationId = g.id.parse()?;
        alice.send_text(&Target::Conversation(id), &format!("hello group {i}")).await?;
        let n = per.min(left).saturating_sub(1);
        left = left.saturating_sub(n + 1);
        alice.store().write(|tx| {
            for k in 0..n {
                let mine = k % 2 == 1;
                let at = now - ((n - k) as u64) * 60_000;
                let message_id: [u8; 16] = rand::random();
                let m = StoredMessage {
                    id: hex::encode(message_id),
                    conversation: g.id.clone(),
                    target: g.name.clone(),
                    group: true,
                    from: if mine { "alice" } else { "bob" }.into(),
                    device: hex::encode([7u8; 16]),
                    sent_at: at,
                    received_at: at,
                    text: format!("message {k} of group {i}: a line of ordinary length for a chat message"),
                    outgoing: mine,
                    state: mine.then_some(MessageState::Sent),
                    ..StoredMessage::default()
                };
                tx.insert_message(&m, &id, &message_id, true)?;
            }
            Ok(())
        })?;
    }
    Ok((big, small))
}

/// How the store key is had: from the session key cache, or derived.
fn key_env(c: &mut Command, cached: bool) {
    if cached {
        c.env("SUBROSA_KEY_CACHE", "15m").env_remove("SUBROSA_PASSPHRASE");
    } else {
        c.env("SUBROSA_KEY_CACHE", "off").env("SUBROSA_PASSPHRASE", PASS);
    }
}

/// Runs `subrosa` once with the passphrase and the cache on (filling it),
/// or `lock` (emptying it).
fn cache(bin: &Path, home: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(bin)
        .arg("--home")
        .arg(home)
        .args(args)
        .env("SUBROSA_KEY_CACHE", "15m")
        .env("SUBROSA_PASSPHRASE", PASS)
        .env_remove("SUBROSA_HOME")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "subrosa {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// One `subrosa tui` to its first frame, on a pseudo-terminal: its wall time.
fn first_frame(bin: &Path, home: &Path, cached: bool) -> anyhow::Result<Duration> {
    let size = nix::pty::Winsize { ws_row: 40, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(&size, None::<&nix::sys::termios::Termios>).context("openpty")?;
    let slave = std::fs::File::from(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let start = Instant::now();
    let mut command = Command::new(bin);
    key_env(&mut command, cached);
    let mut child = command
        .arg("--home")
        .arg(home)
        .args(["tui", "--exit-after-first-frame"])
        .env("TERM", "xterm-256color")
        .env_remove("SUBROSA_HOME")
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave))
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
    // The terminal's other end stays open only in the child: once it
    // exits, reading the master ends.
    drop(command);
    // Read what it draws, so it never waits on a full terminal; the read
    // ends (EIO) once the child closed the terminal.
    let drain = std::thread::spawn(move || {
        let mut screen = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            screen.extend_from_slice(&buf[..n]);
        }
        screen
    });
    let status = child.wait()?;
    let wall = start.elapsed();
    let screen = drain.join().map_err(|_| anyhow::anyhow!("the terminal reader failed"))?;
    if !status.success() {
        bail!("subrosa tui: {status}: {}", String::from_utf8_lossy(&screen).trim());
    }
    // The frame was drawn: the list's title is on it.
    anyhow::ensure!(
        String::from_utf8_lossy(&screen).contains("Conversations"),
        "subrosa tui ended without drawing its frame"
    );
    Ok(wall)
}

fn quantile(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

fn measure(
    bin: &Path,
    big: &Path,
    small: &Path,
    conversations: usize,
    messages: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let cached = subrosa_client::keycache::available();
    if cached {
        cache(bin, small, &["contacts"])?;
        cache(bin, big, &["contacts"])?;
    }
    // One untimed round: the page cache holds the binary and the stores.
    first_frame(bin, small, cached)?;
    first_frame(bin, big, cached)?;
    let (mut base, mut full) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        base.push(first_frame(bin, small, cached)?);
        full.push(first_frame(bin, big, cached)?);
    }
    if cached {
        cache(bin, small, &["lock"])?;
        cache(bin, big, &["lock"])?;
    }
    let key =
        if cached { "store key from the session key cache" } else { "store key derived each time (no keyring here)" };
    println!(
        "`subrosa tui` from spawn to its first frame (whole process, {key}), {rounds} runs per row, rows interleaved"
    );
    println!("{:<52} {:>12} {:>12}", "", "wall p50 ms", "wall p90 ms");
    let (b50, b90) = (quantile(&mut base, 0.5), quantile(&mut base, 0.9));
    println!("{:<52} {b50:>12.1} {b90:>12.1}", "baseline: 1 conversation, 1 message");
    let (f50, f90) = (quantile(&mut full, 0.5), quantile(&mut full, 0.9));
    let label = format!("{conversations} conversations, {messages} messages");
    println!("{label:<52} {f50:>12.1} {f90:>12.1}  (+{:.1} ms over the baseline)", f50 - b50);
    Ok(())
}

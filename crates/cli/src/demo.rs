//! `subrosa demo`: a server and two users in a temporary directory, a short
//! conversation with a link in it, and a look at what the server stored.
//!
//! The link points at a canary HTTP server the demo runs on 127.0.0.1; the
//! demo counts every connection it receives. Subrosa's server has no HTTP
//! client, and the recipient's client does not fetch links, so it stays 0.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use subrosa_client::{Received, Subrosa, Target};

use crate::term::{safe, safe_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PASSPHRASE: &str = "demo passphrase";

/// Counts every connection to a tiny HTTP server on 127.0.0.1.
async fn canary() -> Result<(String, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("starting the canary server")?;
    let addr = listener.local_addr()?;
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\ncanary\n").await;
            });
        }
    });
    let token: [u8; 8] = rand::random();
    Ok((format!("http://{addr}/invite/{}", hex::encode(token)), hits))
}

struct Stored {
    messages: Vec<(i64, String, usize, Vec<u8>)>,
    inbox_rows: i64,
}

/// Reads the server's SQLite database directly, as its operator could.
fn server_view(db: &std::path::Path) -> Result<Stored> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .context("opening the server's database")?;
    let mut stmt = conn.prepare("SELECT id, kind, ciphertext FROM messages ORDER BY id")?;
    let messages = stmt
        .query_map([], |r| {
            let ct: Vec<u8> = r.get(2)?;
            Ok((r.get(0)?, r.get(1)?, ct.len(), ct.iter().take(24).copied().collect()))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let inbox_rows = conn.query_row("SELECT count(*) FROM inbox", [], |r| r.get(0))?;
    Ok(Stored { messages, inbox_rows })
}

/// Every byte the server keeps on disk, searched for a needle.
fn server_files_contain(dir: &std::path::Path, needle: &[u8]) -> Result<bool> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() {
            let bytes = std::fs::read(&path)?;
            if bytes.windows(needle.len()).any(|w| w == needle) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

async fn receive_print(who: &Subrosa) -> Result<()> {
    let name = who.handle().to_string();
    let mut on = |r: &Received| match r {
        Received::Message(m) => out!("  {name} receives   {}: {}", safe(&m.from), safe_message(&m.text)),
        Received::Dropped { from, reason } => {
            out!("  {name} dropped a message from {}: {}", safe(from), safe(reason))
        }
        Received::Alert(a) => out!("  {name} alert: {}", safe(a)),
        Received::Failed(f) => out!("  {name}'s queued message was refused: {}", safe(&f.reason)),
        Received::Sent(_) => {}
    };
    who.receive(Duration::from_secs(5), true, &mut on).await?;
    Ok(())
}

pub async fn run() -> Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let data = dir.path().join("server");
    out!("Subrosa demo: everything lives in {} and is removed at the end.\n", dir.path().display());

    let config = subrosa_server::ServerConfig::new("127.0.0.1:0".parse()?, data.clone());
    let server = subrosa_server::start(config).await.context("starting the server")?;
    let url = server.url();
    out!("1. A server on the embedded SQLite store listens on {url}.");

    let (link, hits) = canary().await?;
    out!("   A canary web server counts every visit to {link}.\n");

    let alice = Subrosa::register(&dir.path().join("alice"), PASSPHRASE, "alice", &url).await?;
    let bob = Subrosa::register(&dir.path().join("bob"), PASSPHRASE, "bob", &url).await?;
    out!("2. alice and bob register: a handle and a device key each, no phone number, no e-mail.");
    out!("   Their keys never leave their devices; their local stores are encrypted with their passphrase.\n");

    let first = format!("Hi Bob! The plan is here: {link}");
    alice.send_text(&Target::Direct(bob.handle().clone()), &first).await?;
    out!("3. alice sends   \"{first}\"");
    out!("   (bob is offline: the server queues the ciphertext for bob's device)\n");

    let db = data.join("server.db");
    let queued = server_view(&db)?;
    out!("4. What the server stored, read straight from its database:");
    for (id, kind, len, head) in &queued.messages {
        let what = match kind.as_str() {
            "welcome" => "MLS Welcome (bob's invitation to the conversation)",
            "application" => "MLS application message",
            other => other,
        };
        out!("   #{id} {what}: {len} bytes, starting {}…", hex::encode(head));
    }
    out!("   (the server knows the conversation only as a random id; no names, no text, no link)");
    out!("   inbox rows waiting for delivery: {}", queued.inbox_rows);
    let leaked = server_files_contain(&data, link.as_bytes())? || server_files_contain(&data, b"The plan is here")?;
    out!(
        "   does the link or the text appear anywhere in the server's files? {}\n",
        if leaked { "YES (bug!)" } else { "no" }
    );

    out!("5. bob comes online:");
    receive_print(&bob).await?;
    bob.send_text(&Target::Direct(alice.handle().clone()), "Got it, thanks. Nobody else can read this.").await?;
    out!("  bob sends       \"Got it, thanks. Nobody else can read this.\"");
    receive_print(&alice).await?;
    // Each device told the other it got the message (a delivery receipt,
    // encrypted like any message): bob fetches alice's.
    receive_print(&bob).await?;

    // Let the server finish deleting acknowledged rows.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = server_view(&db)?;
    out!("\n6. After delivery the server keeps: {} messages, {} inbox rows.", after.messages.len(), after.inbox_rows);
    // Give any would-be fetcher a moment before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = hits.load(Ordering::SeqCst);
    out!("7. Visits to the link: {n}. (Skype's servers fetched links sent in chats; Subrosa's server has no way to.)");

    server.shutdown().await;
    if leaked || n != 0 || !after.messages.is_empty() {
        anyhow::bail!("the demo saw the server keep or fetch something it must not");
    }
    out!("\nNext: run a real server and two clients, see README.md.");
    Ok(())
}

//! Attachments on the command line: progress bars, downloading and saving
//! what arrived, and how a message's files are shown.

use std::io::IsTerminal as _;
use std::path::Path;

use anyhow::Result;
use subrosa_client::store::{AttachmentRow, AttachmentState, StoredMessage};
use subrosa_client::Subrosa;

use crate::term::safe;

/// Files below this size get no progress bar.
const BAR_FROM: u64 = 4 << 20;

/// A progress bar on a terminal's stderr for transfers above a few MiB,
/// made when the first figure arrives.
pub(crate) struct Bar {
    label: String,
    bar: Option<indicatif::ProgressBar>,
    on_terminal: bool,
}

impl Bar {
    pub(crate) fn new(label: String) -> Self {
        Bar { label, bar: None, on_terminal: std::io::stderr().is_terminal() }
    }

    pub(crate) fn set(&mut self, done: u64, total: u64) {
        if !self.on_terminal || total < BAR_FROM {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            {
                bar.set_style(style);
            }
            bar.set_message(self.label.clone());
            bar
        });
        bar.set_position(done);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// A message's files as stored.
pub(crate) fn files_of(me: &Subrosa, m: &StoredMessage) -> Vec<AttachmentRow> {
    let (Ok(conversation), Ok(id)) = (m.conversation.parse(), hex::decode(&m.id)) else { return Vec::new() };
    me.attachments_of(&conversation, &id).unwrap_or_default()
}

/// The files of every message of `messages` (one conversation's, or a few),
/// by message id (hex), read with one query per conversation.
pub(crate) fn files_by_message(
    me: &Subrosa,
    messages: &[StoredMessage],
) -> std::collections::HashMap<String, Vec<AttachmentRow>> {
    let mut conversations: Vec<&str> = messages.iter().map(|m| m.conversation.as_str()).collect();
    conversations.sort_unstable();
    conversations.dedup();
    let mut out: std::collections::HashMap<String, Vec<AttachmentRow>> = std::collections::HashMap::new();
    for c in conversations {
        let Ok(id) = c.parse() else { continue };
        for row in me.attachments_in(&id).unwrap_or_default() {
            out.entry(hex::encode(&row.message_id)).or_default().push(row);
        }
    }
    out
}

/// The `attachments` of a JSON message line: `{name, size, sha256, path}`
/// (`path` once saved).
pub(crate) fn json(files: &[AttachmentRow]) -> serde_json::Value {
    files
        .iter()
        .map(|a| {
            let mut o = serde_json::json!({
                "name": a.file.name,
                "size": a.file.size,
                "sha256": hex::encode(a.file.sha256),
            });
            if let Some(p) = &a.saved {
                o["path"] = serde_json::Value::String(p.clone());
            }
            if let AttachmentState::Refused(why) = &a.state {
                o["refused"] = serde_json::Value::String(why.clone());
            }
            // Where this device's copy stands (the human lines say it too).
            o["state"] = match &a.state {
                AttachmentState::Sent => "sent",
                AttachmentState::Pending => "pending",
                AttachmentState::Stored => "stored",
                AttachmentState::Refused(_) => "refused",
                _ => "unknown",
            }
            .into();
            o
        })
        .collect()
}

/// One line per file, for people (names made safe for the terminal), from
/// the `attachments` of a JSON message line (as printed here or handed out
/// by a daemon, so both print the same).
pub(crate) fn lines(files: &serde_json::Value) -> Vec<String> {
    let text = |f: &serde_json::Value, k: &str| f[k].as_str().unwrap_or_default().to_owned();
    files
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let status = match (f["path"].as_str(), f["state"].as_str()) {
                (Some(p), _) => format!("saved to {}", safe(p)),
                (None, Some("refused")) => format!("refused: {}", safe(&text(f, "refused"))),
                (None, Some("pending")) => "not downloaded yet".to_owned(),
                (None, Some("sent")) => "sent".to_owned(),
                _ => "kept encrypted; save it with `subrosa receive --downloads DIR`".to_owned(),
            };
            format!(
                "    [file] {} ({} bytes, sha256 {}) {status}",
                safe(&text(f, "name")),
                f["size"].as_u64().unwrap_or(0),
                safe(&text(f, "sha256"))
            )
        })
        .collect()
}

/// A file refused on download, told on stderr.
pub(crate) fn print_refused(name: &str, why: &str) {
    eprintln!("error: the attachment {} was refused and not kept: {}", safe(name), safe(why));
}

/// Downloads and checks what arrived, then saves it into `downloads` when
/// given. Returns the refused files, each told on stderr.
pub(crate) async fn fetch_and_save(me: &Subrosa, home: &Path, downloads: Option<&Path>) -> Result<usize> {
    if let Some(dir) = downloads {
        if !dir.is_dir() {
            anyhow::bail!("--downloads {}: not a directory", dir.display());
        }
    }
    let mut bars: Vec<Bar> = Vec::new();
    let mut current = String::new();
    let refused = me
        .fetch_attachments(home, &mut |name, done, total| {
            if current != name || bars.is_empty() {
                current = name.to_owned();
                bars.push(Bar::new(format!("downloading {}", safe(name))));
            }
            if let Some(b) = bars.last_mut() {
                b.set(done, total);
            }
        })
        .await?;
    drop(bars);
    for (row, why) in &refused {
        print_refused(&row.file.name, why);
    }
    if let Some(dir) = downloads {
        me.save_attachments(home, dir)?;
    }
    Ok(refused.len())
}

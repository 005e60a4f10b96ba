//! Commands through a running daemon.
//!
//! While `subrosa daemon` runs on a home, the commands it has a method for
//! go through its socket: no passphrase, no second key derivation, no
//! second crypto start-up, and one process holding the connection to the
//! server. They print exactly what they print without it (the daemon's
//! answers are the objects `--json` prints). A command it has no method
//! for, `--no-daemon`, or no daemon running: the command opens the store
//! itself, as always.
//!
//! The socket is found where the daemon makes it by default
//! (`HOME/daemon/socket`), and used only in a directory of this user's that
//! nobody else may enter, and only when the process answering is this
//! user's: a socket someone else planted would otherwise read every message
//! this command sends.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use subrosa_client::{ClientError, StoredMessage};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::{print_safety_number, print_shown, safe, Command, GroupCommand, MessageState};

/// Longest answer line read from the daemon.
const MAX_ANSWER: u64 = 64 << 20;

/// A connection to this home's daemon.
pub struct Daemon {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
    next_id: u64,
    /// The home directory it serves.
    home: std::path::PathBuf,
}

/// Whether the daemon has a method for `command` (as given): those it has
/// not, and flags it does not take, run on the store directly.
pub fn routes(command: &Command) -> bool {
    match command {
        // Files go by their absolute paths: the daemon reads, seals and
        // uploads them (and saves what came, with --downloads).
        Command::Send { accept_key_change, .. } => !accept_key_change,
        Command::Receive { no_ack, .. } => !no_ack,
        Command::React { .. } | Command::Edit { .. } | Command::Delete { .. } => true,
        Command::Read { .. } | Command::Settings(crate::SettingsCommand::ReadReceipts { .. }) => true,
        Command::History { .. }
        | Command::Contacts
        | Command::Groups
        | Command::Members { .. }
        | Command::SafetyNumber { .. }
        | Command::Verify { .. } => true,
        Command::Group(g) => !matches!(g, GroupCommand::Recreate { .. }),
        Command::Disappearing { .. }
        | Command::Requests
        | Command::Accept { .. }
        | Command::Block { .. }
        | Command::Unblock { .. }
        | Command::Account(crate::AccountCommand::Delete { .. })
        | Command::Linklist(_) => true,
        // The daemon holds the socket the call's signals come on.
        Command::Call { .. } | Command::Answer { .. } => true,
        _ => false,
    }
}

/// Connects to the daemon of `home`, if one runs there.
///
/// # Errors
/// A daemon socket that answers for another user.
pub async fn connect(home: &Path) -> Result<Option<Daemon>> {
    let path = crate::daemon::default_socket(home);
    let Some(dir) = path.parent() else { return Ok(None) };
    let uid = rustix::process::getuid().as_raw();
    match std::fs::metadata(dir) {
        // The daemon makes its directory 0700 and refuses anything else:
        // a socket elsewhere is not its.
        Ok(meta) if meta.is_dir() && meta.uid() == uid && meta.mode() & 0o077 == 0 => {}
        _ => return Ok(None),
    }
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        // None there, or a dead daemon's socket: the store directly.
        Err(_) => return Ok(None),
    };
    let cred = stream.peer_cred().context("asking who serves the daemon socket")?;
    if cred.uid() != uid {
        return Err(anyhow!(
            "{} is served by another user's process; not used (remove it, or pass --no-daemon)",
            path.display()
        ));
    }
    let (read, write) = stream.into_split();
    Ok(Some(Daemon { read: BufReader::new(read), write, next_id: 1, home: home.to_path_buf() }))
}

impl Daemon {
    /// Sends one request and waits for its answer (notifications that
    /// come meanwhile are not for a request and are skipped).
    pub(crate) async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.call_hearing(method, params, &mut |_| {}).await
    }

    /// As [`Self::call`], handing the notifications that come meanwhile (a
    /// transfer's `progress`) to `heard`.
    pub(crate) async fn call_hearing(
        &mut self,
        method: &str,
        params: Value,
        heard: &mut (dyn FnMut(&Value) + Send),
    ) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }))?;
        line.push(b'\n');
        self.write.write_all(&line).await.context("writing to the daemon")?;
        loop {
            let v = self.next_line().await?;
            if v.get("id") != Some(&json!(id)) {
                if v.get("id").is_none() {
                    heard(&v);
                }
                continue;
            }
            if let Some(e) = v.get("error") {
                let message = e.get("message").and_then(Value::as_str).unwrap_or("the daemon refused");
                // Stored, not yet on the server: exit 75 as without a
                // daemon, so a script does not make the change twice.
                if e.get("code").and_then(Value::as_i64) == Some(crate::daemon::COMMAND_QUEUED) {
                    return Err(ClientError::Pending(message.trim_start_matches("queued: ").to_string()).into());
                }
                return Err(anyhow!("{message}"));
            }
            return v.get("result").cloned().ok_or_else(|| anyhow!("the daemon answered without a result"));
        }
    }

    /// The next line the daemon wrote, as JSON.
    pub(crate) async fn next_line(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        let n = tokio::io::AsyncReadExt::take(&mut self.read, MAX_ANSWER)
            .read_until(b'\n', &mut line)
            .await
            .context("reading from the daemon")?;
        if n == 0 {
            return Err(anyhow!("the daemon closed the connection"));
        }
        serde_json::from_slice(&line).context("the daemon's answer is not JSON")
    }

    /// Runs `command` through the daemon; `None` for one it does not route
    /// (see [`routes`]).
    ///
    /// # Errors
    /// The command's error as the daemon gave it, in one line.
    pub async fn run(mut self, command: &Command) -> Result<ExitCode> {
        match command {
            Command::Send { target, text, reply_to, attach, .. } if !attach.is_empty() => {
                if reply_to.is_some() {
                    return Err(anyhow!("--reply-to does not go with --attach yet: send the files, then reply"));
                }
                // The daemon's working directory is not this one.
                let mut paths = Vec::new();
                for p in attach {
                    let abs = std::path::absolute(p).with_context(|| format!("cannot read {}", p.display()))?;
                    let Some(abs) = abs.to_str() else {
                        return Err(anyhow!(
                            "{}: a path that is not UTF-8 cannot go through the daemon (use --no-daemon)",
                            p.display()
                        ));
                    };
                    paths.push(abs.to_string());
                }
                let caption = text.as_deref().unwrap_or_default();
                let params = json!({ "target": target, "text": caption, "attachments": paths });
                let mut bar: Option<(String, crate::attach::Bar)> = None;
                let sent = self
                    .call_hearing("send", params, &mut |v| {
                        let p = &v["params"];
                        let (Some(label), Some(done), Some(total)) =
                            (p["label"].as_str(), p["done"].as_u64(), p["total"].as_u64())
                        else {
                            return;
                        };
                        if bar.as_ref().is_none_or(|(l, _)| l != label) {
                            bar = Some((label.to_owned(), crate::attach::Bar::new(safe(label).into_owned())));
                        }
                        if let Some((_, b)) = bar.as_mut() {
                            b.set(done, total);
                        }
                    })
                    .await;
                drop(bar);
                let sent = sent?;
                warn(&sent);
                queued(sent.clone())?;
                let m = message(sent)?;
                out!("sent {} to {} with {} file(s)", m.id, safe(&m.target), attach.len());
            }
            Command::Call { target, media, timeout } => return self.run_call(Some(target), media, *timeout).await,
            Command::Answer { media, timeout } => return self.run_call(None, media, *timeout).await,
            Command::Read { target } => {
                let done = self.call("read", json!({ "target": target })).await?;
                queued(done.clone())?;
                crate::print_read(done["read"].as_u64().unwrap_or(0), done["readReceipts"] != json!(false));
            }
            Command::Settings(crate::SettingsCommand::ReadReceipts { value }) => {
                let on = value.as_ref().map(|v| *v == crate::OnOff::On);
                let now = self.call("settings", json!({ "readReceipts": on })).await?;
                crate::print_read_receipts(now["readReceipts"] == json!(true));
            }
            Command::Send { target, text, reply_to, preview, .. } => {
                let text = text.as_deref().unwrap_or_default();
                let params = json!({ "target": target, "text": text, "replyTo": reply_to, "preview": preview });
                let sent = self.call("send", params).await?;
                warn(&sent);
                if sent.get("queued") == Some(&json!(true)) {
                    return Err(ClientError::Pending(subrosa_client::QUEUED.into()).into());
                }
                let m = message(sent)?;
                if m.state == Some(MessageState::Queued) {
                    // As without a daemon: stored, sent exactly once, exit 75.
                    return Err(ClientError::Pending(subrosa_client::QUEUED.into()).into());
                }
                out!("sent {} to {}", m.id, safe(&m.target));
            }
            Command::Receive { json, timeout, follow, downloads, .. } => {
                if !(0.0..=86_400.0 * 365.0).contains(timeout) || timeout.is_nan() {
                    return Err(anyhow!("--timeout takes a number of seconds from 0"));
                }
                if *follow {
                    return self.follow(*json).await;
                }
                let downloads = match downloads {
                    None => None,
                    Some(d) => {
                        let abs = std::path::absolute(d).with_context(|| format!("--downloads {}", d.display()))?;
                        if !abs.is_dir() {
                            return Err(anyhow!("--downloads {}: not a directory", d.display()));
                        }
                        Some(abs.to_str().map(String::from).ok_or_else(|| {
                            anyhow!(
                                "--downloads {}: not UTF-8, so not through the daemon (use --no-daemon)",
                                d.display()
                            )
                        })?)
                    }
                };
                // The daemon waits at most an hour per call; longer waits
                // are several calls.
                let mut left = *timeout;
                loop {
                    let wait = left.min(3600.0);
                    let got = self.call("receive", json!({ "timeout": wait, "downloads": downloads })).await?;
                    let got = got.as_array().cloned().unwrap_or_default();
                    for m in &got {
                        print_shown(&message(m.clone())?, m.get("attachments"), *json);
                    }
                    left -= wait;
                    if !got.is_empty() || left <= 0.0 {
                        break;
                    }
                }
                // What went wrong meanwhile, told and ending as it would
                // without a daemon.
                return self.failures().await;
            }
            Command::History { target, json } => {
                let history = self.call("history", json!({ "target": target })).await?;
                let values: Vec<Value> = history.as_array().cloned().unwrap_or_default();
                let history: Vec<StoredMessage> = values.iter().map(|m| message(m.clone())).collect::<Result<_>>()?;
                if !json {
                    if let Some(m) = history.first().filter(|m| !m.group) {
                        let verified = self
                            .call("contacts", json!({}))
                            .await?
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| c["handle"] == json!(m.target) && c["verified"] == json!(true));
                        let state = if verified {
                            "verified".to_string()
                        } else {
                            format!("not verified: compare safety numbers with `subrosa verify {}`", m.target)
                        };
                        out!("-- conversation with {} ({state})", safe(&m.target));
                    }
                }
                for (m, v) in history.iter().zip(&values) {
                    print_shown(m, v.get("attachments"), *json);
                }
            }
            Command::Contacts => {
                for c in list(self.call("contacts", json!({})).await?) {
                    let state = if c["verified"] == json!(true) { "verified" } else { "unverified" };
                    let key = text(&c["identity_key"]);
                    out!("{}\t{}\t{}", safe(&text(&c["handle"])), state, safe(&key[..16.min(key.len())]));
                }
            }
            Command::Groups => {
                for g in list(self.call("groups", json!({})).await?) {
                    let state = if g["active"] == json!(true) { names(&g["members"]) } else { "(left)".to_string() };
                    out!("{}\t{}\t{}", safe(&text(&g["name"])), safe(&state), safe(&text(&g["id"])));
                }
            }
            Command::Members { target, json } => {
                let members = list(self.call("members", json!({ "target": target })).await?);
                let suite = members
                    .first()
                    .and_then(|m| m["suite"].as_u64())
                    .and_then(|s| u16::try_from(s).ok())
                    .map(subrosa_core::CipherSuite::new)
                    .ok_or_else(|| anyhow::anyhow!("the daemon did not name the conversation's ciphersuite"))?;
                if *json {
                    out!("{}", crate::daemon::members_json(suite, members));
                    return Ok(ExitCode::SUCCESS);
                }
                for m in members {
                    let mut notes = Vec::new();
                    if m["this_device"] == json!(true) {
                        notes.push("(this device)".to_string());
                    }
                    if let Some(days) = m["stale_days"].as_u64() {
                        notes.push(format!("(stale: no key update for {days} days)"));
                    }
                    let notes = if notes.is_empty() { String::new() } else { format!("\t{}", notes.join(" ")) };
                    out!(
                        "{}\t{}\t{}{notes}",
                        safe(&text(&m["handle"])),
                        safe(&text(&m["device"])),
                        safe(&text(&m["fingerprint"]))
                    );
                }
                out!("ciphersuite\t{}\t{}", u16::from(suite), subrosa_core::suite_name(suite));
            }
            Command::SafetyNumber { handle } => {
                let n = self.call("safetyNumber", json!({ "handle": handle })).await?;
                print_safety_number(&text(&n["safety_number"]));
            }
            Command::Verify { handle, yes } => {
                let n = text(&self.call("safetyNumber", json!({ "handle": handle })).await?["safety_number"]);
                print_safety_number(&n);
                crate::confirm_verified(handle, *yes)?;
                // Only the number shown here verifies (compared and marked
                // in one transaction by the daemon).
                self.call("verify", json!({ "handle": handle, "safetyNumber": n })).await?;
                out!("{handle} is verified");
            }
            Command::React { target, message_id, emoji, remove } => {
                let params = json!({ "target": target, "messageId": message_id, "emoji": emoji, "remove": remove });
                queued(self.call("react", params).await?)?;
                out!("{} {}", if *remove { "took back your reaction to" } else { "reacted to" }, message_id);
            }
            Command::Edit { target, message_id, text } => {
                queued(self.call("edit", json!({ "target": target, "messageId": message_id, "text": text })).await?)?;
                out!("edited {message_id}");
            }
            Command::Delete { target, message_id } => {
                queued(self.call("delete", json!({ "target": target, "messageId": message_id })).await?)?;
                out!("deleted {message_id} for everyone");
            }
            Command::Group(g) => match g {
                GroupCommand::Create { name, handles } => {
                    let g = self.call("createGroup", json!({ "name": name, "members": handles })).await?;
                    out!("created {} with {}", safe(&text(&g["name"])), safe(&names(&g["members"])));
                }
                GroupCommand::Add { name, handle } => {
                    let done = self.call("groupAdd", json!({ "group": name, "handle": handle })).await?;
                    match done.get("moved").filter(|m| !m.is_null()) {
                        None => out!("added {} to {}", safe(handle), safe(name)),
                        Some(g) => out!(
                            "{} was a member of {} before, so it continues in a new conversation #{} with {}; \
                             the old one is retired",
                            safe(handle),
                            safe(name),
                            safe(&text(&g["id"])),
                            safe(&names(&g["members"]))
                        ),
                    }
                }
                GroupCommand::Remove { name, handle } => {
                    self.call("groupRemove", json!({ "group": name, "handle": handle })).await?;
                    out!("removed {} from {}", safe(handle), safe(name));
                }
                GroupCommand::Leave { name } => {
                    self.call("groupLeave", json!({ "group": name })).await?;
                    out!("left {}", safe(name));
                }
                GroupCommand::Rename { name, new } => {
                    self.call("groupRename", json!({ "group": name, "name": new })).await?;
                    out!("renamed {} to {}", safe(name), safe(new));
                }
                GroupCommand::Recreate { .. } => return Err(anyhow!("group recreate does not go through a daemon")),
            },
            _ => return self.run_settings(command).await,
        }
        Ok(ExitCode::SUCCESS)
    }

    /// The commands about whom to hear from and how long messages stay,
    /// through the daemon (printing what they print without it).
    async fn run_settings(mut self, command: &Command) -> Result<ExitCode> {
        match command {
            Command::Disappearing { target, duration } => {
                // Checked here too: a typo is told before anything is asked.
                let seconds = crate::parse_disappearing(duration)?;
                let done = self.call("disappearing", json!({ "target": target, "duration": duration })).await?;
                crate::print_disappearing(seconds, done["changed"] == json!(true));
            }
            Command::Requests => {
                for r in list(self.call("requests", json!({})).await?) {
                    out!("{}\t{}\t#{}", safe(&text(&r["name"])), safe(&text(&r["kind"])), safe(&text(&r["id"])));
                }
            }
            Command::Accept { target } => {
                let done = self.call("accept", json!({ "target": target })).await?;
                crate::print_accepted(target, done["accepted"] == json!(true));
            }
            Command::Block { handle } => {
                let done = self.call("block", json!({ "handle": handle })).await?;
                out!("blocked {} (left {} conversation(s))", safe(handle), list(done["left"].clone()).len());
            }
            Command::Unblock { handle } => {
                let done = self.call("unblock", json!({ "handle": handle })).await?;
                crate::print_unblocked(handle, done["was_blocked"] == json!(true));
            }
            Command::Account(crate::AccountCommand::Delete { yes }) => {
                let mine = text(&self.call("account", json!({})).await?["handle"]);
                crate::confirm_deletion(&mine, *yes)?;
                let done = self.call("accountDelete", json!({ "handle": mine })).await?;
                crate::print_deleted(&mine, done["left"].as_u64().unwrap_or(0), &self.home);
            }
            Command::Linklist(crate::LinklistCommand::Status) => {
                let l = self.call("linklistStatus", json!({})).await?;
                crate::print_link_list(l["version"].as_u64().zip(l["entries"].as_u64()));
            }
            Command::Linklist(crate::LinklistCommand::Import { file }) => {
                let abs = std::path::absolute(file).with_context(|| format!("cannot read {}", file.display()))?;
                let Some(abs) = abs.to_str() else {
                    return Err(anyhow!(
                        "{}: a path that is not UTF-8 cannot go through the daemon (use --no-daemon)",
                        file.display()
                    ));
                };
                let done = self.call("linklistImport", json!({ "file": abs })).await?;
                let version = done["version"].as_u64().unwrap_or(0);
                if done["new"] == json!(true) {
                    crate::print_imported(version, done["entries"].as_u64().unwrap_or(0), done["replaced"].as_u64());
                } else {
                    out!("the dangerous-link list version {version} is already imported");
                }
            }
            _ => return Err(anyhow!("this command does not go through a daemon")),
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Prints what the daemon kept of what went wrong (refused sends,
    /// dropped messages, refused files) as `receive` without it would, and
    /// exits as it would.
    /// `call TARGET` (with a target) or `answer`: the call runs in the
    /// daemon, which reads and writes the WAV files by their absolute
    /// paths; its steps print as they come.
    async fn run_call(
        &mut self,
        target: Option<&String>,
        media: &crate::call::MediaArgs,
        timeout: f64,
    ) -> Result<ExitCode> {
        let path = |flag: &str, p: &Option<std::path::PathBuf>| -> Result<Option<String>> {
            let Some(p) = p else { return Ok(None) };
            let abs = std::path::absolute(p).with_context(|| format!("{flag} {}", p.display()))?;
            abs.to_str().map(|s| Some(s.to_string())).ok_or_else(|| {
                anyhow!(
                    "{flag} {}: a path that is not UTF-8 cannot go through the daemon (use --no-daemon)",
                    p.display()
                )
            })
        };
        let mut params = json!({
            "input": path("--input", &media.input)?,
            "output": path("--output", &media.output)?,
            "mute": media.mute,
            "duration": media.duration,
            "timeout": timeout,
            "relay": media.relay.map(|r| r.to_string()),
        });
        let method = match target {
            Some(t) => {
                params["target"] = json!(t);
                "call"
            }
            None => "answer",
        };
        let done = self
            .call_hearing(method, params, &mut |v| {
                if v["method"] == json!("callProgress") {
                    if let Some(text) = v["params"]["text"].as_str() {
                        out!("{}", safe(text));
                    }
                }
            })
            .await?;
        out!("{}", safe(done["text"].as_str().unwrap_or("the call ended")));
        Ok(ExitCode::SUCCESS)
    }

    async fn failures(&mut self) -> Result<ExitCode> {
        let f = self.call("failures", json!({})).await?;
        for s in list(f["failed_sends"].clone()) {
            let message = match s.get("message").filter(|m| !m.is_null()) {
                Some(m) => Some(message(m.clone())?),
                None => None,
            };
            crate::print_failed(&subrosa_client::FailedSend { message, reason: text(&s["reason"]) });
        }
        let refused = list(f["refused_files"].clone());
        for r in &refused {
            crate::attach::print_refused(&text(&r["name"]), &text(&r["reason"]));
        }
        let dropped = list(f["dropped"].clone());
        for d in &dropped {
            crate::print_dropped(&text(&d["from"]), &text(&d["reason"]));
        }
        if !refused.is_empty() {
            return Ok(ExitCode::FAILURE);
        }
        Ok(crate::dropped_exit(dropped.len()).unwrap_or(ExitCode::SUCCESS))
    }

    /// `receive --follow`: subscribes and prints each message as the daemon
    /// pushes it, acknowledging it once printed, until the daemon goes.
    async fn follow(mut self, json: bool) -> Result<ExitCode> {
        self.call("subscribe", json!({})).await?;
        loop {
            let v = self.next_line().await?;
            let params = v.get("params").cloned().unwrap_or(Value::Null);
            match v.get("method").and_then(Value::as_str) {
                Some("message") => {}
                Some("alert") => {
                    eprintln!("warning: {}", safe(&text(&params["text"])));
                    continue;
                }
                Some("dropped") => {
                    eprintln!(
                        "warning: dropped a message from {} that could not be decrypted or authenticated: {}",
                        safe(&text(&params["from"])),
                        safe(&text(&params["reason"]))
                    );
                    continue;
                }
                _ => continue,
            }
            let seq = params.get("seq").and_then(Value::as_u64);
            print_shown(&message(params.clone())?, params.get("attachments"), json);
            // Printed: the daemon need not hand it out again. (An answer
            // to this comes later and is skipped.)
            if let Some(seq) = seq {
                let ack = json!({ "jsonrpc": "2.0", "id": 0, "method": "ack", "params": { "seq": seq } });
                let mut line = serde_json::to_vec(&ack)?;
                line.push(b'\n');
                self.write.write_all(&line).await.context("writing to the daemon")?;
            }
        }
    }
}

/// The warnings of a `send` answer (dangerous links, no preview made),
/// on stderr as without a daemon.
fn warn(answer: &Value) {
    for w in answer["warnings"].as_array().into_iter().flatten() {
        eprintln!("warning: {}", safe(&text(w)));
    }
}

/// A change the daemon stored but could not send yet is, as without it,
/// exit 75 (it goes out exactly once, later).
fn queued(answer: Value) -> Result<()> {
    if answer.get("queued") == Some(&json!(true)) {
        return Err(ClientError::Pending(subrosa_client::QUEUED.into()).into());
    }
    Ok(())
}

/// A message object of the daemon's (a `receive --json` line, perhaps with
/// its arrival number, which is not printed).
pub(crate) fn message(v: Value) -> Result<StoredMessage> {
    serde_json::from_value(v).context("the daemon sent a message this version cannot read")
}

fn list(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        _ => Vec::new(),
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn names(v: &Value) -> String {
    v.as_array().into_iter().flatten().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")
}

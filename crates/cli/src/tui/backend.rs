//! What the terminal UI runs on: this process's own client handle, or the
//! daemon running on the same home (then the UI needs no passphrase and
//! opens no second connection; see `crate::via`). Both give the state
//! machine the same inputs: conversations with their histories, typed
//! [`ClientEvent`]s, and the answers to its actions.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use std::path::Path;

use subrosa_client::{Client, ClientError, ClientEvent, StoredMessage, Target};
use subrosa_proto::{ConversationId, MessageId};
use tokio::sync::{broadcast, mpsc};

use super::state::{Conversation, FileInfo, Input};
#[cfg(unix)]
use crate::via::message;

/// A member device as the members overlay lists it.
pub struct MemberLine {
    pub handle: String,
    pub device: String,
    pub fingerprint: String,
    pub this_device: bool,
}

/// Where the UI's data and actions go.
#[derive(Clone)]
pub enum Backend {
    /// This process's own handle (the store opened here).
    Local(Client),
    /// A daemon on the same home, over its socket.
    #[cfg(unix)]
    Daemon(Remote),
}

/// The daemon, reached through one connection for requests (in turn) and
/// one more for its notifications.
#[cfg(unix)]
#[derive(Clone)]
pub struct Remote {
    calls: Arc<tokio::sync::Mutex<crate::via::Daemon>>,
    home: std::path::PathBuf,
    handle: String,
}

/// The handle's loop (or the daemon's notifications): it ends only with an
/// error that retrying cannot fix.
pub type Running = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

fn conversation_id(hex: &str) -> Result<ConversationId> {
    hex.parse().map_err(|_| anyhow!("a conversation id that is not hex: {hex}"))
}

fn message_id(hex: &str) -> Result<MessageId> {
    hex.parse().map_err(|_| anyhow!("a message id that is not hex: {hex}"))
}

/// The files of `m` as this device keeps them (message id, files), if
/// it has any.
fn local_files(c: &Client, m: &StoredMessage) -> Option<(String, Vec<FileInfo>)> {
    if m.system {
        return None;
    }
    let rows = crate::attach::files_of(c.device(), m);
    (!rows.is_empty()).then(|| (m.id.clone(), FileInfo::from_json(&crate::attach::json(&rows))))
}

/// How long a call from the UI may last (it ends when someone hangs up).
const CALL_LIMIT_SECS: f64 = 4.0 * 3600.0;
/// How long a call from the UI rings.
const RING_SECS: f64 = 45.0;
/// How long `:answer` waits for a call to ring.
const ANSWER_WAIT_SECS: f64 = 30.0;

/// A call that cannot open the sound card says so in the UI's words (the
/// command line's error names its flags).
fn sound_card(e: anyhow::Error) -> anyhow::Error {
    if crate::one_line(&e).contains("--features audio") {
        anyhow!(
            "calls in the terminal UI need the sound card: this subrosa was built without it \
             (cargo build --features audio); headless, `subrosa call --input/--output` takes WAV files"
        )
    } else {
        e
    }
}

/// A change that was stored: `true` when it waits for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued(pub bool);

fn queued(r: Result<(), ClientError>) -> Result<Queued> {
    match r {
        Ok(()) => Ok(Queued(false)),
        Err(ClientError::Pending(_)) => Ok(Queued(true)),
        Err(e) => Err(e.into()),
    }
}

/// This account's newest message in the conversation `id` (a file message
/// just stored and queued).
fn latest_own(c: &Client, id: &str) -> Result<StoredMessage> {
    c.history(&conversation_id(id)?)?
        .into_iter()
        .rev()
        .find(|m| m.outgoing && !m.system)
        .ok_or_else(|| anyhow!("the file was stored without a history line"))
}

#[cfg(unix)]
impl Remote {
    /// The daemon of `home` (`daemon`: a connection to it).
    pub async fn new(home: &std::path::Path, daemon: crate::via::Daemon) -> Result<Remote> {
        let calls = Arc::new(tokio::sync::Mutex::new(daemon));
        let account = calls.lock().await.call("account", json!({})).await?;
        let handle = account["handle"].as_str().unwrap_or_default().to_string();
        Ok(Remote { calls, home: home.to_path_buf(), handle })
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value> {
        self.calls.lock().await.call(method, params).await
    }

    /// As [`Self::call`], handing the notifications that come before the
    /// answer (a transfer's progress) to `heard`.
    async fn call_hearing(&self, method: &str, params: Value, heard: &mut (dyn FnMut(&Value) + Send)) -> Result<Value> {
        self.calls.lock().await.call_hearing(method, params, heard).await
    }
}

impl Backend {
    /// This account's handle.
    pub fn handle(&self) -> String {
        match self {
            Backend::Local(c) => c.device().handle().to_string(),
            #[cfg(unix)]
            Backend::Daemon(r) => r.handle.clone(),
        }
    }

    /// Starts the flow of events into `tx`; the returned future is the
    /// handle's loop (local) or the daemon's notifications, and ends only
    /// when that cannot go on. `notifies`: this UI shows desktop
    /// notifications of its own, so a daemon should show none meanwhile.
    pub async fn start(&self, tx: mpsc::UnboundedSender<Input>, notifies: bool) -> Result<Running> {
        match self {
            Backend::Local(client) => {
                // Subscribed before the loop starts: nothing falls between.
                let mut events = client.events();
                let reader = client.clone();
                tokio::spawn(async move {
                    loop {
                        let input = match events.recv().await {
                            Ok(e) => Input::Client(e),
                            Err(broadcast::error::RecvError::Lagged(n)) => Input::Lagged(n),
                            Err(broadcast::error::RecvError::Closed) => return,
                        };
                        // A message's files, as stored with it.
                        let files = match &input {
                            Input::Client(ClientEvent::Message(m)) => local_files(&reader, m).map(|(id, files)| {
                                Input::Files { conversation: m.conversation.clone(), message: id, files }
                            }),
                            _ => None,
                        };
                        if tx.send(input).is_err() || files.is_some_and(|f| tx.send(f).is_err()) {
                            return;
                        }
                    }
                });
                let client = client.clone();
                Ok(Box::pin(async move { client.run().await.map_err(|e| e.to_string()) }))
            }
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let mut feed =
                    crate::via::connect(&r.home).await?.ok_or_else(|| anyhow!("the daemon is no longer running"))?;
                // From now on: what is stored already comes with the
                // conversations (a message in both is shown once).
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                // A UI that shows its own desktop notifications (it knows
                // what is on screen) has the daemon show none meanwhile; one
                // whose notifications are off leaves the daemon's as its
                // user set them.
                feed.call("subscribe", json!({ "since": now.saturating_sub(1000), "notifies": notifies })).await?;
                // Where the daemon's own connection stands now; changes
                // come as notifications.
                let account = r.call("account", json!({})).await?;
                let _ = tx.send(Input::Client(if account["connected"] == json!(true) {
                    ClientEvent::Connected
                } else {
                    ClientEvent::Disconnected {
                        reason: "the daemon is not connected to the server".into(),
                        retry_in: Duration::ZERO,
                    }
                }));
                Ok(Box::pin(async move {
                    loop {
                        let v = feed.next_line().await.map_err(|e| format!("the daemon went away: {e}"))?;
                        let Some(event) = event_of(&v) else { continue };
                        // A message's files come inside its object.
                        let files = match (&event, v["params"].get("attachments")) {
                            (ClientEvent::Message(m), Some(a)) => Some(Input::Files {
                                conversation: m.conversation.clone(),
                                message: m.id.clone(),
                                files: FileInfo::from_json(a),
                            }),
                            _ => None,
                        };
                        if tx.send(Input::Client(event)).is_err() || files.is_some_and(|f| tx.send(f).is_err()) {
                            return Ok(());
                        }
                    }
                }))
            }
        }
    }

    /// Every conversation with its history.
    pub async fn load(&self) -> Result<Vec<Conversation>> {
        match self {
            Backend::Local(client) => {
                let mut out = Vec::new();
                for row in client.conversations()? {
                    let group = row.kind == "group";
                    let verified = match &row.peer {
                        Some(p) if !group => client.is_verified(p)?,
                        _ => false,
                    };
                    let messages = client.history(&row.id)?;
                    // One read for the conversation's files, not one per message.
                    let mut by_message = crate::attach::files_by_message(client.device(), &messages);
                    let files = messages
                        .iter()
                        .filter(|m| !m.system)
                        .filter_map(|m| {
                            let rows = by_message.remove(&m.id)?;
                            Some((m.id.clone(), FileInfo::from_json(&crate::attach::json(&rows))))
                        })
                        .collect();
                    out.push(Conversation {
                        id: row.id.to_hex(),
                        name: row.target(),
                        group,
                        active: row.active,
                        verified,
                        unread: 0,
                        messages,
                        files,
                        request: client.device().is_request(&row.id)?,
                        disappearing: client.device().disappearing_timer(&row.id),
                    });
                }
                Ok(out)
            }
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let mut out = Vec::new();
                let rows = r.call("conversations", json!({})).await?;
                for row in rows.as_array().into_iter().flatten() {
                    let id = row["id"].as_str().unwrap_or_default().to_string();
                    let history = r.call("history", json!({ "conversation": id })).await?;
                    let values = history.as_array().cloned().unwrap_or_default();
                    let messages = values.iter().map(|m| message(m.clone())).collect::<Result<Vec<_>>>()?;
                    let files = messages
                        .iter()
                        .zip(&values)
                        .filter_map(|(m, v)| {
                            let files = FileInfo::from_json(v.get("attachments")?);
                            (!files.is_empty()).then(|| (m.id.clone(), files))
                        })
                        .collect();
                    out.push(Conversation {
                        id,
                        name: row["name"].as_str().unwrap_or_default().to_string(),
                        group: row["group"] == json!(true),
                        active: row["active"] == json!(true),
                        verified: row["verified"] == json!(true),
                        unread: 0,
                        messages,
                        files,
                        request: row["request"] == json!(true),
                        disappearing: row["disappearing"].as_u64().and_then(|s| u32::try_from(s).ok()),
                    });
                }
                Ok(out)
            }
        }
    }

    /// Sends `text` to the conversation `id` (hex): the message as stored,
    /// sent or queued.
    pub async fn send_text(&self, id: &str, text: &str) -> Result<StoredMessage> {
        match self {
            Backend::Local(c) => Ok(c.send_text(&conversation_id(id)?, text).await?),
            #[cfg(unix)]
            Backend::Daemon(r) => message(r.call("send", json!({ "conversation": id, "message": text })).await?),
        }
    }

    /// Answers the message `to` of the conversation `id` with `text`: the
    /// reply as stored, sent or queued.
    pub async fn reply(&self, id: &str, to: &str, text: &str) -> Result<StoredMessage> {
        match self {
            Backend::Local(c) => Ok(c.reply(&conversation_id(id)?, text, message_id(to)?).await?),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let sent = r.call("send", json!({ "conversation": id, "message": text, "replyTo": to })).await?;
                message(sent)
            }
        }
    }

    /// Reacts to (or, `remove`, takes back the reaction to) a message.
    pub async fn react(&self, id: &str, message: &str, emoji: &str, remove: bool) -> Result<Queued> {
        let to = Target::Conversation(conversation_id(id)?);
        match self {
            Backend::Local(c) => queued(c.device().react(&to, message_id(message)?, emoji, remove).await),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let params = json!({ "conversation": id, "messageId": message, "emoji": emoji, "remove": remove });
                Ok(Queued(r.call("react", params).await?["queued"] == json!(true)))
            }
        }
    }

    /// Replaces the text of this account's message.
    pub async fn edit(&self, id: &str, message: &str, text: &str) -> Result<Queued> {
        let to = Target::Conversation(conversation_id(id)?);
        match self {
            Backend::Local(c) => queued(c.device().edit(&to, message_id(message)?, text).await),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let params = json!({ "conversation": id, "messageId": message, "text": text });
                Ok(Queued(r.call("edit", params).await?["queued"] == json!(true)))
            }
        }
    }

    /// Deletes this account's message for everyone.
    pub async fn delete(&self, id: &str, message: &str) -> Result<Queued> {
        let to = Target::Conversation(conversation_id(id)?);
        match self {
            Backend::Local(c) => queued(c.device().delete_for_everyone(&to, message_id(message)?).await),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let params = json!({ "conversation": id, "messageId": message });
                Ok(Queued(r.call("delete", params).await?["queued"] == json!(true)))
            }
        }
    }

    /// Sends the file at `path` to the conversation `id`; `progress` hears
    /// (what, bytes, total) while it is sealed and uploaded. The message as
    /// stored, with its files.
    pub async fn attach(
        &self,
        home: &Path,
        id: &str,
        path: &Path,
        progress: &mut (dyn FnMut(&str, u64, u64) + Send),
    ) -> Result<(StoredMessage, Vec<FileInfo>)> {
        match self {
            Backend::Local(c) => {
                let me = c.device();
                let to = Target::Conversation(conversation_id(id)?);
                let paths = [path.to_path_buf()];
                let sent = match me.send_attachments(home, &to, "", &paths, false, progress).await {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(anyhow!("the file was sent without a history line")),
                    // Stored and queued: it goes out with the next connection.
                    Err(ClientError::Pending(_)) => latest_own(c, id)?,
                    Err(e) => return Err(e.into()),
                };
                let files = FileInfo::from_json(&crate::attach::json(&crate::attach::files_of(me, &sent)));
                Ok((sent, files))
            }
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
                let params = json!({ "conversation": id, "attachments": [path] });
                let sent = r
                    .call_hearing("send", params, &mut |v| {
                        if v["method"] == json!("progress") {
                            let p = &v["params"];
                            let label = p["label"].as_str().unwrap_or_default();
                            progress(label, p["done"].as_u64().unwrap_or(0), p["total"].as_u64().unwrap_or(0));
                        }
                    })
                    .await?;
                if sent["queued"] == json!(true) {
                    return Err(anyhow!("stored; it goes out when the connection is back"));
                }
                let files = FileInfo::from_json(&sent["attachments"]);
                Ok((message(sent)?, files))
            }
        }
    }

    /// Downloads what arrived and saves the files of one message into
    /// `dir`: its files as they are now.
    pub async fn save(
        &self,
        home: &Path,
        id: &str,
        message: &str,
        dir: &Path,
        progress: &mut (dyn FnMut(&str, u64, u64) + Send),
    ) -> Result<Vec<FileInfo>> {
        match self {
            Backend::Local(c) => {
                let me = c.device();
                let cid = conversation_id(id)?;
                let mid = message_id(message)?;
                let refused = me.fetch_attachments(home, progress).await?;
                me.save_attachments_of(home, dir, &cid, &mid.0)?;
                let rows = me.attachments_of(&cid, &mid.0)?;
                if let Some((_, why)) = refused.iter().find(|(r, _)| r.conversation == cid && r.message_id == mid.0) {
                    return Err(anyhow!("refused, not saved: {why}"));
                }
                Ok(FileInfo::from_json(&crate::attach::json(&rows)))
            }
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let params = json!({ "conversation": id, "messageId": message, "dir": dir });
                let files = r
                    .call_hearing("saveFiles", params, &mut |v| {
                        if v["method"] == json!("progress") {
                            let p = &v["params"];
                            let label = p["label"].as_str().unwrap_or_default();
                            progress(label, p["done"].as_u64().unwrap_or(0), p["total"].as_u64().unwrap_or(0));
                        }
                    })
                    .await?;
                Ok(FileInfo::from_json(&files["attachments"]))
            }
        }
    }

    /// Marks what the conversation `id` shows as read: its authors get
    /// read receipts, unless this device turned them off.
    pub async fn read(&self, id: &str) -> Result<()> {
        match self {
            Backend::Local(c) => c.device().read(&conversation_id(id)?).await.map(|_| ()).map_err(Into::into),
            #[cfg(unix)]
            Backend::Daemon(r) => r.call("read", json!({ "conversation": id })).await.map(|_| ()),
        }
    }

    /// Accepts the message request `id`: whether it was one.
    pub async fn accept(&self, id: &str) -> Result<bool> {
        match self {
            Backend::Local(c) => Ok(c.device().accept(&conversation_id(id)?)?),
            #[cfg(unix)]
            Backend::Daemon(r) => Ok(r.call("accept", json!({ "conversation": id })).await?["accepted"] == json!(true)),
        }
    }

    /// Sets the disappearing-messages timer of `id` (`None`: off): whether
    /// it changed.
    pub async fn set_disappearing(&self, id: &str, seconds: Option<u32>) -> Result<bool> {
        match self {
            Backend::Local(c) => Ok(c.set_disappearing(&conversation_id(id)?, seconds).await?),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let duration = seconds.map_or_else(|| "off".to_string(), |s| format!("{s}s"));
                let v = r.call("disappearing", json!({ "conversation": id, "duration": duration })).await?;
                Ok(v["changed"] == json!(true))
            }
        }
    }

    /// Marks `handle` verified if `number` is still its safety number.
    pub async fn verify(&self, handle: &str, number: &str) -> Result<()> {
        match self {
            Backend::Local(c) => Ok(c.verify_safety_number(handle, number).await?),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                r.call("verify", json!({ "handle": handle, "safetyNumber": number })).await.map(|_| ())
            }
        }
    }

    /// The 1:1 conversation with `handle` (started when there is none): its id.
    pub async fn open_direct(&self, handle: &str) -> Result<String> {
        match self {
            Backend::Local(c) => Ok(c.open_direct(handle).await?.to_hex()),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let v = r.call("openDirect", json!({ "handle": handle })).await?;
                Ok(v["conversation"].as_str().unwrap_or_default().to_string())
            }
        }
    }

    /// Creates a group: its id.
    pub async fn create_group(&self, name: &str, members: &[String]) -> Result<String> {
        match self {
            Backend::Local(c) => Ok(c.create_group(name, members).await?.to_hex()),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let v = r.call("createGroup", json!({ "name": name, "members": members })).await?;
                Ok(v["id"].as_str().unwrap_or_default().to_string())
            }
        }
    }

    /// Adds `handle`; the new conversation's id when it was a member before.
    pub async fn group_add(&self, id: &str, handle: &str) -> Result<Option<String>> {
        match self {
            Backend::Local(c) => Ok(c.group_add(&conversation_id(id)?, handle).await?.map(|i| i.to_hex())),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let v = r.call("groupAdd", json!({ "group": format!("#{id}"), "handle": handle })).await?;
                Ok(v["moved"]["id"].as_str().map(String::from))
            }
        }
    }

    /// Removes `handle` from the group `id`.
    pub async fn group_remove(&self, id: &str, handle: &str) -> Result<()> {
        match self {
            Backend::Local(c) => Ok(c.group_remove(&conversation_id(id)?, handle).await?),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                r.call("groupRemove", json!({ "group": format!("#{id}"), "handle": handle })).await.map(|_| ())
            }
        }
    }

    /// Renames the group `id`.
    pub async fn group_rename(&self, id: &str, name: &str) -> Result<()> {
        match self {
            Backend::Local(c) => Ok(c.group_rename(&conversation_id(id)?, name).await?),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                r.call("groupRename", json!({ "group": format!("#{id}"), "name": name })).await.map(|_| ())
            }
        }
    }

    /// Leaves the group `id`.
    pub async fn group_leave(&self, id: &str) -> Result<()> {
        match self {
            Backend::Local(c) => Ok(c.group_leave(&conversation_id(id)?).await?),
            #[cfg(unix)]
            Backend::Daemon(r) => r.call("groupLeave", json!({ "group": format!("#{id}") })).await.map(|_| ()),
        }
    }

    /// Every member device of the conversation `id`.
    /// Calls the conversation `to` (id, hex), or answers the call that
    /// rings (`None`), with the sound card, until either side hangs up or
    /// `hang_up` is told; each step's line goes to `on`. Returns how it
    /// ended, in a line. Over the daemon the call runs there, on a
    /// connection of its own (so the UI's requests go on meanwhile).
    ///
    /// # Errors
    /// No sound card in this build, busy, no answer, no call; network
    /// and store errors.
    pub async fn voice_call(
        &self,
        to: Option<&str>,
        hang_up: Arc<tokio::sync::Notify>,
        on: &mut (dyn FnMut(String) + Send),
    ) -> Result<String> {
        match self {
            Backend::Local(c) => {
                let media = crate::call::MediaArgs {
                    input: None,
                    output: None,
                    mute: false,
                    duration: CALL_LIMIT_SECS,
                    relay: None,
                };
                let mut steps = |p: subrosa_client::calls::CallProgress| {
                    if let Some(line) = crate::call::progress_line(&p) {
                        on(line);
                    }
                };
                let report = match to {
                    Some(id) => {
                        let target = format!("#{id}");
                        crate::call::place(c, &target, &media, RING_SECS, Some(hang_up), &mut steps).await
                    }
                    None => crate::call::take(c, &media, ANSWER_WAIT_SECS, Some(hang_up), &mut steps).await,
                };
                crate::call::outcome(&media, &report.map_err(sound_card)?)
            }
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let Some(mut line) = crate::via::connect(&r.home).await? else {
                    return Err(anyhow!("the daemon stopped"));
                };
                let (method, mut params) = match to {
                    Some(id) => ("call", json!({ "conversation": id, "timeout": RING_SECS })),
                    None => ("answer", json!({ "timeout": ANSWER_WAIT_SECS })),
                };
                params["duration"] = json!(CALL_LIMIT_SECS);
                let mut heard = |v: &Value| {
                    if v["method"] == json!("callProgress") {
                        if let Some(text) = v["params"]["text"].as_str() {
                            on(text.to_string());
                        }
                    }
                };
                let call = line.call_hearing(method, params, &mut heard);
                tokio::pin!(call);
                let done = loop {
                    tokio::select! {
                        done = &mut call => break done,
                        _ = hang_up.notified() => {
                            r.call("hangUp", json!({})).await?;
                        }
                    }
                };
                Ok(done.map_err(sound_card)?["text"].as_str().unwrap_or("the call ended").to_string())
            }
        }
    }

    pub async fn members(&self, id: &str) -> Result<Vec<MemberLine>> {
        match self {
            Backend::Local(c) => {
                let me = c.device().identity().address();
                Ok(c.members(&conversation_id(id)?)?
                    .into_iter()
                    .map(|m| MemberLine {
                        handle: m.address.handle.to_string(),
                        device: m.address.device.to_hex(),
                        fingerprint: subrosa_core::safety::key_fingerprint(&m.device_key),
                        this_device: m.address == me,
                    })
                    .collect())
            }
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let v = r.call("members", json!({ "conversation": id })).await?;
                Ok(v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| MemberLine {
                        handle: m["handle"].as_str().unwrap_or_default().to_string(),
                        device: m["device"].as_str().unwrap_or_default().to_string(),
                        fingerprint: m["fingerprint"].as_str().unwrap_or_default().to_string(),
                        this_device: m["this_device"] == json!(true),
                    })
                    .collect())
            }
        }
    }

    /// The safety number with `handle`.
    pub async fn safety_number(&self, handle: &str) -> Result<String> {
        match self {
            Backend::Local(c) => Ok(c.safety_number(handle).await?),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let v = r.call("safetyNumber", json!({ "handle": handle })).await?;
                Ok(v["safety_number"].as_str().unwrap_or_default().to_string())
            }
        }
    }

    /// Whether `handle` is verified (false when that cannot be read).
    pub async fn is_verified(&self, handle: &str) -> bool {
        match self {
            Backend::Local(c) => c.is_verified(handle).unwrap_or(false),
            #[cfg(unix)]
            Backend::Daemon(r) => {
                let handle = handle.trim_start_matches('@');
                r.call("contacts", json!({}))
                    .await
                    .ok()
                    .and_then(|v| v.as_array().cloned())
                    .into_iter()
                    .flatten()
                    .any(|c| c["handle"] == json!(handle) && c["verified"] == json!(true))
            }
        }
    }
}

/// The event a daemon notification says, if the UI shows it.
#[cfg(unix)]
fn event_of(v: &Value) -> Option<ClientEvent> {
    let p = v.get("params")?;
    let text = |k: &str| p[k].as_str().unwrap_or_default().to_string();
    Some(match v.get("method")?.as_str()? {
        "message" => {
            let m = message(p.clone()).ok()?;
            if m.system {
                ClientEvent::System(m)
            } else {
                ClientEvent::Message(m)
            }
        }
        "messageState" => ClientEvent::MessageState(message(p.clone()).ok()?),
        "alert" => ClientEvent::Alert(text("text")),
        "dropped" => ClientEvent::Dropped { from: text("from"), reason: text("reason") },
        "connection" if p["connected"] == json!(true) => ClientEvent::Connected,
        "connection" => ClientEvent::Disconnected {
            reason: text("reason"),
            retry_in: Duration::from_millis(p["retry_in_ms"].as_u64().unwrap_or(0)),
        },
        _ => return None,
    })
}

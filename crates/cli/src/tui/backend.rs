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
use subrosa_client::{Client, ClientEvent, StoredMessage};
use subrosa_proto::ConversationId;
use tokio::sync::{broadcast, mpsc};

use super::state::{Conversation, Input};
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
    /// when that cannot go on.
    pub async fn start(&self, tx: mpsc::UnboundedSender<Input>) -> Result<Running> {
        match self {
            Backend::Local(client) => {
                // Subscribed before the loop starts: nothing falls between.
                let mut events = client.events();
                tokio::spawn(async move {
                    loop {
                        let input = match events.recv().await {
                            Ok(e) => Input::Client(e),
                            Err(broadcast::error::RecvError::Lagged(n)) => Input::Lagged(n),
                            Err(broadcast::error::RecvError::Closed) => return,
                        };
                        if tx.send(input).is_err() {
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
                feed.call("subscribe", json!({ "since": now.saturating_sub(1000) })).await?;
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
                        if tx.send(Input::Client(event)).is_err() {
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
                    out.push(Conversation {
                        id: row.id.to_hex(),
                        name: row.target(),
                        group,
                        active: row.active,
                        verified,
                        unread: 0,
                        messages: client.history(&row.id)?,
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
                    let messages =
                        history.as_array().into_iter().flatten().map(|m| message(m.clone())).collect::<Result<_>>()?;
                    out.push(Conversation {
                        id,
                        name: row["name"].as_str().unwrap_or_default().to_string(),
                        group: row["group"] == json!(true),
                        active: row["active"] == json!(true),
                        verified: row["verified"] == json!(true),
                        unread: 0,
                        messages,
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

    /// Marks what the conversation `id` shows as read: its authors get
    /// read receipts, unless this device turned them off.
    pub async fn read(&self, id: &str) -> Result<()> {
        match self {
            Backend::Local(c) => c.device().read(&conversation_id(id)?).await.map(|_| ()).map_err(Into::into),
            #[cfg(unix)]
            Backend::Daemon(r) => r.call("read", json!({ "conversation": id })).await.map(|_| ()),
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

//! `call` and `answer` through the daemon. The call runs in the daemon,
//! which holds the device's socket and so hears the call's signals first
//! (a second process would wait for an offer the daemon already took).
//! One call at a time per daemon. Each step comes to the caller's
//! connection as a `callProgress` notification (`event`, its fields, and
//! `text`, the line the command prints); the answer says how the call
//! ended and what flowed. A call that never connected (busy, no answer,
//! no offer) is an error, as the command's exit status 1. `hangUp`, on
//! any connection, ends the running call (a front end's hang-up key).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};
use subrosa_client::calls::{CallEnd, CallProgress, CallReport};
use tokio::sync::{mpsc, Notify};

use super::rpc::{invalid, params, CallParams, Failure, Which};
use super::{term, Answer, Outgoing, Place, Shared};

/// Held while a call runs: a second one is refused meanwhile (it would
/// take the first one's signals), and `hangUp` tells this one.
struct Running<'a>(&'a Shared);

impl<'a> Running<'a> {
    fn start(shared: &'a Shared) -> Result<(Self, Arc<Notify>), Failure> {
        let mut slot = shared.hang_up.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Err(Failure(super::rpc::COMMAND_FAILED, "a call is already running through this daemon".into()));
        }
        let hang_up = Arc::new(Notify::new());
        *slot = Some(Arc::clone(&hang_up));
        Ok((Running(shared), hang_up))
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.hang_up.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// `hangUp`: ends the call running through this daemon (given up when it
/// has not connected yet); `{"hungUp": false}` when none runs.
pub(super) fn hang_up(shared: &Shared) -> Value {
    let running = shared.hang_up.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(n) = &running {
        n.notify_one();
    }
    json!({ "hungUp": running.is_some() })
}

fn absolute(what: &str, p: Option<String>) -> Result<Option<PathBuf>, Failure> {
    let Some(p) = p else { return Ok(None) };
    let p = PathBuf::from(p);
    if !p.is_absolute() {
        return Err(invalid(format!("{what} takes an absolute path (the daemon's directory is not yours)")));
    }
    Ok(Some(p))
}

/// `call` (`answering` false) or `answer`.
pub(super) async fn run(shared: &Arc<Shared>, tx: &mpsc::Sender<Outgoing>, answering: bool, p: Value) -> Answer {
    let CallParams { recipient, conversation, input, output, mute, duration, timeout, relay } = params(p)?;
    if input.is_some() && mute {
        return Err(invalid("input and mute do not go together"));
    }
    let relay = relay
        .map(|r| r.parse::<SocketAddr>())
        .transpose()
        .map_err(|_| invalid("relay takes an address and a port, e.g. 127.0.0.1:3479"))?;
    let media = crate::call::MediaArgs {
        input: absolute("input", input)?,
        output: absolute("output", output)?,
        mute,
        duration: duration.unwrap_or(30.0),
        relay,
    };
    let target = if answering {
        if recipient.is_some() || conversation.is_some() {
            return Err(invalid("answer takes no recipient: it answers the first call that rings"));
        }
        None
    } else {
        Some(match (Which { recipient, conversation }).place()? {
            Place::Named(t) => t,
            Place::Id(id) => format!("#{}", id.to_hex()),
        })
    };
    let (_running, hang_up) = Running::start(shared)?;
    let tx = tx.clone();
    let mut on = move |p: CallProgress| {
        if let Some(params) = progress_params(&p) {
            let note = json!({ "jsonrpc": "2.0", "method": "callProgress", "params": params });
            if let Ok(line) = term::json_line(&note) {
                let _ = tx.try_send((line, None));
            }
        }
    };
    let report = match target {
        None => crate::call::take(&shared.client, &media, timeout.unwrap_or(60.0), Some(hang_up), &mut on).await?,
        Some(t) => {
            crate::call::place(&shared.client, &t, &media, timeout.unwrap_or(45.0), Some(hang_up), &mut on).await?
        }
    };
    let text = crate::call::outcome(&media, &report)?;
    Ok((report_value(&report, text), None))
}

/// A `callProgress` notification's params, for the steps the command prints.
fn progress_params(p: &CallProgress) -> Option<Value> {
    let text = crate::call::progress_line(p)?;
    let mut v = match p {
        CallProgress::Calling { id } => json!({ "event": "calling", "call": id }),
        CallProgress::Ringing { at } => json!({ "event": "ringing", "at": at }),
        CallProgress::Incoming { from, conversation } => {
            json!({ "event": "incoming", "from": from, "conversation": conversation })
        }
        CallProgress::Connected { with } => json!({ "event": "connected", "with": with }),
        CallProgress::OverWebSocket => json!({ "event": "overWebSocket" }),
        CallProgress::Rekeyed { epoch } => json!({ "event": "rekeyed", "epoch": epoch }),
        _ => return None,
    };
    v["text"] = json!(text);
    Some(v)
}

/// The answer to a call that connected.
fn report_value(r: &CallReport, text: String) -> Value {
    let (end, by) = match &r.end {
        CallEnd::Duration => ("duration", None),
        CallEnd::HungUp { by } => ("hungUp", Some(by.clone())),
        CallEnd::Removed => ("removed", None),
        CallEnd::Cancelled => ("cancelled", None),
        _ => ("ended", None),
    };
    let s = &r.incoming;
    json!({
        "end": end,
        "by": by,
        "conversation": r.conversation.to_hex(),
        "call": hex::encode(r.call_id),
        "sent": r.sent,
        "received": s.opened,
        "refused": s.refused,
        "heardSecs": r.heard_secs,
        "fec": s.jitter.fec,
        "concealed": s.jitter.concealed,
        "rekeys": r.rekeys,
        "text": text,
    })
}

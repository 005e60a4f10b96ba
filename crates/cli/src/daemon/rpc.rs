//! The daemon's request decoder: a line of bytes to JSON-RPC 2.0 requests,
//! and each method's params to its fields. Untrusted input (anyone of the
//! user's processes on the socket), and pure: it needs only serde and
//! serde_json, so the fuzz crate includes this very file (`#[path]`)
//! without the command line becoming a library.

use serde::Deserialize;
use serde_json::Value;

// JSON-RPC 2.0 error codes.
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
/// The command failed (its one-line error is the message).
pub const COMMAND_FAILED: i64 = -32000;
/// The command's change is stored but not yet on the server; it goes out
/// once, later (the command line's exit status 75). Not to be repeated.
pub const COMMAND_QUEUED: i64 = -32001;

/// A failed call: a JSON-RPC error code and a one-line message.
pub struct Failure(pub i64, pub String);

pub fn invalid(message: impl Into<String>) -> Failure {
    Failure(INVALID_PARAMS, message.into())
}

/// A line: one request, or a batch of them (not yet checked).
pub enum Line {
    /// One request.
    One(Value),
    /// A batch, never empty.
    Batch(Vec<Value>),
}

/// Parses a line (not blank).
///
/// # Errors
/// Not JSON ([`PARSE_ERROR`]); an empty batch ([`INVALID_REQUEST`]).
pub fn decode_line(line: &[u8]) -> Result<Line, Failure> {
    match serde_json::from_slice(line) {
        Err(e) => Err(Failure(PARSE_ERROR, format!("parse error: {e}"))),
        Ok(Value::Array(batch)) if batch.is_empty() => Err(Failure(INVALID_REQUEST, "empty batch".into())),
        Ok(Value::Array(batch)) => Ok(Line::Batch(batch)),
        Ok(one) => Ok(Line::One(one)),
    }
}

/// A checked request.
pub struct Request {
    /// Its id as sent; `None` makes it a notification (no answer).
    pub id: Option<Value>,
    /// The id the answer carries.
    pub answer_id: Value,
    /// The method.
    pub method: String,
    /// Its params, always an object (`{}` when none were given).
    pub params: Value,
}

/// Checks one request of a line.
///
/// # Errors
/// Not a JSON-RPC 2.0 request object, with the id its error answer carries.
pub fn decode_request(request: Value) -> Result<Request, (Value, Failure)> {
    let Value::Object(mut request) = request else {
        return Err((Value::Null, Failure(INVALID_REQUEST, "a request is a JSON object".into())));
    };
    let id = request.remove("id");
    let valid_id = matches!(id, None | Some(Value::Null | Value::String(_) | Value::Number(_)));
    let answer_id = if valid_id { id.clone().unwrap_or(Value::Null) } else { Value::Null };
    if request.get("jsonrpc") != Some(&Value::String("2.0".into())) || !valid_id {
        return Err((answer_id, Failure(INVALID_REQUEST, "not a JSON-RPC 2.0 request".into())));
    }
    let Some(Value::String(method)) = request.remove("method") else {
        return Err((answer_id, Failure(INVALID_REQUEST, "the request names no method".into())));
    };
    let params = match request.remove("params") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(p @ Value::Object(_)) => p,
        Some(_) => return Err((answer_id, Failure(INVALID_PARAMS, "params must be an object".into()))),
    };
    Ok(Request { id, answer_id, method, params })
}

pub fn params<T: for<'de> Deserialize<'de>>(p: Value) -> Result<T, Failure> {
    serde_json::from_value(p).map_err(|e| invalid(format!("invalid params: {e}")))
}

/// Which conversation: `conversation` (its id in hex) or `recipient` (as
/// the commands take it: a handle, `@handle`, a group name, `#ID`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Which {
    #[serde(alias = "target")]
    pub recipient: Option<String>,
    pub conversation: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendParams {
    // `target` and `text` as the command line calls them; `recipient` and
    // `message` as signal-cli does.
    #[serde(alias = "target")]
    pub recipient: Option<String>,
    pub conversation: Option<String>,
    /// The text (with files: their caption, may be empty).
    #[serde(alias = "text", default)]
    pub message: String,
    /// The message this one answers (its id).
    #[serde(rename = "replyTo", alias = "reply_to")]
    pub reply_to: Option<String>,
    /// Files to send (absolute paths the daemon can read), as `send
    /// --attach`; `progress` notifications come while they upload.
    #[serde(default)]
    pub attachments: Vec<String>,
    /// Send a preview of the text's first https link, made by this device
    /// (as `send --preview`; without it, the device's setting decides).
    #[serde(default)]
    pub preview: bool,
}

/// `saveFiles`: download what arrived and save one message's files into
/// `dir` (an absolute directory outside the home directory).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SaveFilesParams {
    #[serde(alias = "target")]
    pub recipient: Option<String>,
    pub conversation: Option<String>,
    #[serde(alias = "message_id")]
    pub message_id: String,
    pub dir: String,
}

/// `react`: which conversation, which message, which emoji; `remove`
/// takes the reaction back.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReactParams {
    #[serde(alias = "target")]
    pub recipient: Option<String>,
    pub conversation: Option<String>,
    #[serde(alias = "message_id")]
    pub message_id: String,
    pub emoji: String,
    #[serde(default)]
    pub remove: bool,
}

/// `edit`: which conversation, which of this account's messages, its new text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EditParams {
    #[serde(alias = "target")]
    pub recipient: Option<String>,
    pub conversation: Option<String>,
    #[serde(alias = "message_id")]
    pub message_id: String,
    #[serde(alias = "message")]
    pub text: String,
}

/// `delete`: which conversation, which of this account's messages.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeleteParams {
    #[serde(alias = "target")]
    pub recipient: Option<String>,
    pub conversation: Option<String>,
    #[serde(alias = "message_id")]
    pub message_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveParams {
    /// Seconds to wait for a message when none is waiting.
    #[serde(default)]
    pub timeout: f64,
    /// Save received files into this directory (as `receive --downloads`;
    /// absolute, outside the home directory).
    pub downloads: Option<String>,
}

/// `settings`: each setting given is changed; the answer has them all.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SettingsParams {
    #[serde(alias = "read_receipts")]
    pub read_receipts: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeParams {
    /// Replay after this arrival number (a bot's own cursor).
    pub after: Option<u64>,
    /// Replay what was stored from this time on (ms), the older cursor.
    pub since: Option<u64>,
    /// This front end shows desktop notifications itself (the terminal
    /// UI): the daemon shows none while it is subscribed.
    #[serde(default)]
    pub notifies: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckParams {
    pub seq: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroupParams {
    pub name: String,
    pub members: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandleParams {
    pub handle: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VerifyParams {
    pub handle: String,
    pub safety_number: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `groupAdd` and `groupRemove`: the group (its name or `#ID`) and whom.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupMemberParams {
    pub group: String,
    pub handle: String,
}

/// `groupLeave`: the group (its name or `#ID`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupParams {
    pub group: String,
}

/// `groupRename`: the group (its name or `#ID`) and its new name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRenameParams {
    pub group: String,
    pub name: String,
}

/// `disappearing`: which conversation and the timer, as the command takes
/// it (`30s`, `5m`, `1h`, `1d`, `1w`, or `off`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisappearingParams {
    #[serde(alias = "target")]
    pub recipient: Option<String>,
    pub conversation: Option<String>,
    pub duration: String,
}

/// `accountDelete`: the account's handle, typed again (a bot cannot delete
/// the account by a slip of one method name).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountDeleteParams {
    pub handle: String,
}

/// `linklistImport`: a list file (an absolute path the daemon can read).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinklistImportParams {
    pub file: String,
}

/// `call` and `answer`: the commands' flags. Files are absolute paths the
/// daemon reads and writes; without `input` (and not `mute`) the daemon's
/// microphone, without `output` its speakers (a daemon built with the
/// `audio` feature). `call` takes `recipient` or `conversation`; `answer`
/// neither (it answers the first call that rings).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallParams {
    #[serde(alias = "target")]
    pub recipient: Option<String>,
    pub conversation: Option<String>,
    pub input: Option<String>,
    pub output: Option<String>,
    #[serde(default)]
    pub mute: bool,
    /// Seconds to stay in the call once connected (default 30).
    pub duration: Option<f64>,
    /// Seconds to ring (`call`, default 45) or to wait for a call
    /// (`answer`, default 60).
    pub timeout: Option<f64>,
    /// A UDP address to send media to instead of the relay the server names.
    pub relay: Option<String>,
}

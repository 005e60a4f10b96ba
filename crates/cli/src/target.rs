//! What the user types to name a conversation (DESIGN.md "Targets"),
//! resolved against this device's store. The client library takes
//! conversation ids; these rules, and their ambiguity errors, are the
//! command line's (the daemon's named targets use them too).
//!
//! - `@handle` is always that handle;
//! - `#ID` is always the one conversation whose id (hex) starts with ID;
//! - a bare name is a group with that name (active ones, else ones this
//!   device left) or a handle, and is refused, with the candidates listed,
//!   when it could be more than one of them. A handle counts when it is a
//!   contact or has a direct conversation here, so a group that someone
//!   named after a contact cannot capture what is sent to them.

use subrosa_client::store::ConversationRow;
use subrosa_client::{ClientError, Subrosa, Target};
use subrosa_proto::{ConversationId, Handle};

/// Fewest hex digits a `#ID` target may give.
const MIN_ID_PREFIX: usize = 6;

/// What a typed target names.
#[derive(Debug, Clone)]
pub enum Named {
    /// One conversation: a group by its name, or any conversation by id.
    Conversation(ConversationRow),
    /// The 1:1 conversation with a handle (which may not exist yet).
    Direct(Handle),
}

/// A conversation as a candidate of an ambiguous target.
fn describe(row: &ConversationRow) -> String {
    if row.kind == "group" {
        format!("#{} (group {:?})", row.id.to_hex(), row.name)
    } else {
        format!("#{} (direct with {})", row.id.to_hex(), row.target())
    }
}

/// Resolves `target` by the rules of this module.
///
/// # Errors
/// [`ClientError::UnknownTarget`], or [`ClientError::Input`] for an
/// ambiguous or malformed target.
pub fn resolve(me: &Subrosa, target: &str) -> Result<Named, ClientError> {
    if let Some(h) = target.strip_prefix('@') {
        return Handle::new(h).map(Named::Direct).map_err(|_| ClientError::UnknownTarget(target.to_string()));
    }
    if let Some(id) = target.strip_prefix('#') {
        let id = id.to_ascii_lowercase();
        if id.len() < MIN_ID_PREFIX || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ClientError::Input(format!(
                "{target:?}: #ID takes a conversation id in hex, at least {MIN_ID_PREFIX} digits \
                 (see `subrosa history TARGET --json`)"
            )));
        }
        let mut rows = me.store().read(|tx| tx.conversations_by_prefix(&id))?;
        // The account's own conversation carries keys, never messages.
        rows.retain(|r| r.kind != "own");
        return match rows.as_slice() {
            [row] => Ok(Named::Conversation(row.clone())),
            [] => Err(ClientError::UnknownTarget(target.to_string())),
            _ => Err(ClientError::Input(format!(
                "{target:?} is ambiguous: it could be {}; give more of the id",
                rows.iter().map(describe).collect::<Vec<_>>().join(", ")
            ))),
        };
    }
    let groups = me.store().read(|tx| tx.groups_named(target))?;
    let active: Vec<&ConversationRow> = groups.iter().filter(|g| g.active).collect();
    let groups: Vec<&ConversationRow> = if active.is_empty() { groups.iter().collect() } else { active };
    let handle = Handle::new(target).ok();
    let known_handle = match &handle {
        Some(h) => known(me, h)?,
        None => false,
    };
    if groups.len() + usize::from(known_handle) > 1 {
        let mut candidates = Vec::new();
        if known_handle {
            candidates.push(format!("@{target}"));
        }
        candidates.extend(groups.iter().map(|g| describe(g)));
        return Err(ClientError::Input(format!(
            "{target:?} is ambiguous: it could be {}; name one of them",
            candidates.join(", ")
        )));
    }
    if let [row] = groups.as_slice() {
        return Ok(Named::Conversation((*row).clone()));
    }
    handle.map(Named::Direct).ok_or_else(|| ClientError::UnknownTarget(target.to_string()))
}

/// Whether `handle` is a contact or has a direct conversation here.
fn known(me: &Subrosa, handle: &Handle) -> Result<bool, ClientError> {
    me.store().read(|tx| {
        Ok(tx.contact_key(handle.as_str())?.is_some() || !tx.conversations_with(handle.as_str())?.is_empty())
    })
}

/// Where `send TARGET` goes. A target this device does not know yet (a
/// group another member created or renamed, or a handle never written to)
/// is resolved again after catching up; a conversation or contact it knows
/// is used as typed, so a concurrent rename cannot make it unknown and
/// a send to a contact costs no extra round trip.
///
/// # Errors
/// As [`resolve`].
pub async fn for_send(me: &Subrosa, target: &str) -> Result<Target, ClientError> {
    match resolve(me, target) {
        Ok(Named::Conversation(row)) => return Ok(Target::Conversation(row.id)),
        Ok(Named::Direct(h)) if target.starts_with('@') || known(me, &h)? => return Ok(Target::Direct(h)),
        _ => {}
    }
    // Offline, the send itself says what it needs; what catching up
    // failed on, it meets again.
    let _ = me.sync().await;
    Ok(match resolve(me, target)? {
        Named::Conversation(row) => Target::Conversation(row.id),
        Named::Direct(h) => Target::Direct(h),
    })
}

/// The conversation `target` names that this device has: a direct one by
/// handle is the current one with them.
///
/// # Errors
/// As [`resolve`], and [`ClientError::UnknownTarget`] for a handle with no
/// conversation here.
pub fn conversation(me: &Subrosa, target: &str) -> Result<ConversationId, ClientError> {
    match resolve(me, target)? {
        Named::Conversation(row) => Ok(row.id),
        Named::Direct(peer) => {
            me.direct_conversation(&peer)?.ok_or_else(|| ClientError::UnknownTarget(target.to_string()))
        }
    }
}

/// The group named `name` by the rules above, active on this device.
fn group_now(me: &Subrosa, name: &str) -> Result<ConversationRow, ClientError> {
    match resolve(me, name) {
        Ok(Named::Conversation(row)) if row.kind != "group" => {
            Err(ClientError::Input(format!("{name:?} is a direct conversation, not a group")))
        }
        Ok(Named::Conversation(row)) if row.active => Ok(row),
        Ok(Named::Conversation(row)) => Err(ClientError::Input(format!("you are no longer a member of {}", row.name))),
        Ok(Named::Direct(_)) | Err(ClientError::UnknownTarget(_)) => {
            Err(ClientError::Input(format!("unknown group {name:?}: see `subrosa groups`")))
        }
        Err(e) => Err(e),
    }
}

/// The group the user named. Resolved before catching up, so a concurrent
/// rename by another member does not make the typed name unknown; a name
/// not known yet is looked up again after catching up (a group created or
/// renamed by another member that this device has not seen).
///
/// # Errors
/// As [`resolve`]; unknown, direct or left groups as [`ClientError::Input`].
pub async fn group(me: &Subrosa, name: &str) -> Result<ConversationId, ClientError> {
    match group_now(me, name) {
        Ok(row) => Ok(row.id),
        Err(ClientError::Input(_)) => {
            me.sync().await?;
            group_now(me, name).map(|row| row.id)
        }
        Err(e) => Err(e),
    }
}

//! Moving a conversation to the post-quantum suite (MLS ReInit, RFC 9420
//! §11.2), the rules without I/O.
//!
//! A conversation keeps its suite until every member device's certificate
//! says it can do the post-quantum one (devices registered before it
//! could, once they ran `devices rekey`). Then a member commits a ReInit
//! naming a new conversation id and suite 65100 in the old conversation,
//! where the server orders it like any commit, so every member sees the
//! same move. That member then creates the new conversation with the same
//! devices and sends its Welcome; MLS binds it to the old one by a secret
//! only the old members hold (the resumption PSK), checks that the devices
//! are the same ones, and every member joins it in place of the old one,
//! which is retired. Nobody can be slipped in, and a Welcome for a moved
//! conversation cannot be joined by anyone who was not in the old one.
//!
//! What this device remembers, in its store's meta table:
//! - `pq_check:<id>`: the conversation may be able to move (a member's keys
//!   changed, this device's did, or it was never looked at); the client
//!   looks at it at its next command and drops the mark.
//! - `moving:<old id>`: the ReInit of `old` is applied here: the new id,
//!   whether this device committed it (and so creates the new one), and
//!   since when (another member creates it after [`MOVE_FALLBACK_MS`]).
//!   Nothing is encrypted in `old` any more; queued messages wait.
//! - `moved_from:<new id>`: the old id, to join the Welcome of `new` as its
//!   continuation.
//! - `moved:<old id>`: the new id, once joined or created: queued messages
//!   of `old` go to `new`, and history shows both.
//! - `kept_after_move:<new id>`: the old id, whose MLS state is kept (the
//!   old conversation retired) until the first commit of `new` is applied
//!   here, so a message a member sent in `old` just before it saw the move
//!   is still read.

use subrosa_proto::{ConversationId, DeviceAddress};

use crate::store::{ConversationRow, Tx};
use crate::{ClientError, Session, SystemEvent};

/// The prefix of the marks of conversations to look at.
pub const PQ_CHECK_PREFIX: &str = "pq_check:";
/// Set once every conversation of a store made before moves existed was
/// marked to be looked at.
pub const META_PQ_SCANNED: &str = "pq_scanned";

/// The mark that `conversation` may be able to move.
pub fn pq_check_key(conversation: &ConversationId) -> String {
    format!("{PQ_CHECK_PREFIX}{}", conversation.to_hex())
}

fn moving_key(conversation: &ConversationId) -> String {
    format!("moving:{}", conversation.to_hex())
}

fn moved_from_key(conversation: &ConversationId) -> String {
    format!("moved_from:{}", conversation.to_hex())
}

fn moved_key(conversation: &ConversationId) -> String {
    format!("moved:{}", conversation.to_hex())
}

fn read_id(bytes: &[u8]) -> Option<ConversationId> {
    ConversationId::from_slice(bytes.get(..16)?).ok()
}

/// How long a member waits for the device that committed a move to create
/// the new conversation before it creates it itself (that device may be
/// gone for good). Two creations are harmless: the server orders one new
/// conversation's first request, and the other creator joins that one.
pub const MOVE_FALLBACK_MS: u64 = 3_600_000;

/// A ReInit applied here and not yet followed by the new conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moving {
    /// The new conversation's id.
    pub to: ConversationId,
    /// True when this device committed the move, and so creates `to`.
    pub creates: bool,
    /// When the move was applied here (ms).
    pub since_ms: u64,
}

impl Moving {
    /// Whether this device creates `to` now: it committed the move, or the
    /// member that did has not for [`MOVE_FALLBACK_MS`].
    pub fn creates_at(&self, now_ms: u64) -> bool {
        self.creates || now_ms.saturating_sub(self.since_ms) >= MOVE_FALLBACK_MS
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = self.to.as_bytes().to_vec();
        v.push(u8::from(self.creates));
        v.extend_from_slice(&self.since_ms.to_le_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        let to = read_id(v)?;
        let since_ms = v.get(17..25).and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_le_bytes);
        Some(Moving { to, creates: v.get(16) == Some(&1), since_ms })
    }
}

/// The move of `conversation` applied here and not completed, if any.
///
/// # Errors
/// Store errors.
pub fn moving(tx: &dyn Tx, conversation: &ConversationId) -> Result<Option<Moving>, ClientError> {
    Ok(tx.meta(&moving_key(conversation))?.and_then(|v| Moving::decode(&v)))
}

/// The conversations whose move is applied here and not completed.
///
/// # Errors
/// Store errors.
pub fn moving_conversations(tx: &dyn Tx) -> Result<Vec<ConversationId>, ClientError> {
    Ok(tx.meta_keys("moving:")?.iter().filter_map(|k| k.strip_prefix("moving:")?.parse().ok()).collect())
}

/// Where `conversation` moved, following every move since (`None`: it did
/// not move).
///
/// # Errors
/// Store errors.
pub fn moved_to(tx: &dyn Tx, conversation: &ConversationId) -> Result<Option<ConversationId>, ClientError> {
    let mut at = *conversation;
    let mut moved = None;
    // A chain is as long as the moves a conversation made (one per suite);
    // the bound only stops a store that loops.
    for _ in 0..8 {
        match tx.meta(&moved_key(&at))?.and_then(|v| read_id(&v)) {
            Some(next) => {
                moved = Some(next);
                at = next;
            }
            None => break,
        }
    }
    Ok(moved)
}

/// The conversations that moved into `conversation`, oldest first.
///
/// # Errors
/// Store errors.
pub fn moved_into(tx: &dyn Tx, conversation: &ConversationId) -> Result<Vec<ConversationId>, ClientError> {
    let mut chain = Vec::new();
    let mut at = *conversation;
    'outer: for _ in 0..8 {
        for key in tx.meta_keys("moved:")? {
            let Some(value) = tx.meta(&key)? else { continue };
            if read_id(&value) == Some(at) {
                let Some(old) = key.strip_prefix("moved:").and_then(|h| h.parse::<ConversationId>().ok()) else {
                    continue;
                };
                chain.insert(0, old);
                at = old;
                continue 'outer;
            }
        }
        break;
    }
    Ok(chain)
}

/// The conversation a Welcome for `new` continues, when this device
/// applied that move.
///
/// # Errors
/// Store errors.
pub fn continues(tx: &dyn Tx, new: &ConversationId) -> Result<Option<ConversationId>, ClientError> {
    Ok(tx.meta(&moved_from_key(new))?.and_then(|v| read_id(&v)))
}

/// The name of a suite in history lines.
pub fn suite_words(suite: u16) -> &'static str {
    if suite == u16::from(subrosa_core::PQ_CIPHERSUITE) {
        "post-quantum keys (ML-KEM-768 + X25519)"
    } else {
        "another ciphersuite"
    }
}

fn kept_key(conversation: &ConversationId) -> String {
    format!("kept_after_move:{}", conversation.to_hex())
}

impl Session {
    /// A commit of `conversation` was applied here: the keys of the
    /// conversation it continues, kept for late messages, are erased (every
    /// member that sends now has seen the move; the server ordered a commit
    /// in the new conversation after its Welcome).
    pub(crate) fn erase_moved_keys(&self, tx: &mut dyn Tx, conversation: &ConversationId) -> Result<(), ClientError> {
        let key = kept_key(conversation);
        if let Some(old) = tx.meta(&key)?.and_then(|v| read_id(&v)) {
            tx.deactivate_conversation(&old)?;
            tx.delete_meta(&key)?;
        }
        Ok(())
    }

    /// Another member's creation of the conversation `conversation` moves
    /// to was ordered before this device's: it waits for that one's
    /// Welcome (from now: the fallback does not fire again at once).
    ///
    /// # Errors
    /// Store errors.
    pub fn created_elsewhere(&self, tx: &mut dyn Tx, conversation: &ConversationId) -> Result<(), ClientError> {
        if let Some(m) = moving(&*tx, conversation)? {
            let m = Moving { creates: false, since_ms: self.now_ms(), ..m };
            tx.set_meta(&moving_key(conversation), &m.encode())?;
        }
        Ok(())
    }

    /// The ReInit of `old` to `to` is applied here (inside the caller's
    /// transaction): nothing more is sent in `old`; `creates` when this
    /// device committed it.
    pub(crate) fn note_move(
        &self,
        tx: &mut dyn Tx,
        old: &ConversationId,
        to: &ConversationId,
        creates: bool,
    ) -> Result<(), ClientError> {
        let m = Moving { to: *to, creates, since_ms: self.now_ms() };
        tx.set_meta(&moving_key(old), &m.encode())?;
        tx.set_meta(&moved_from_key(to), old.as_bytes())?;
        // Looked at by every command until the new conversation exists
        // here: the committer creates it (again after a lost answer or a
        // crash), another member once the committer is overdue.
        tx.set_meta(&pq_check_key(old), &[])
    }

    /// `new` exists here now (joined or created), continuing `old`: `old`
    /// is retired (its keys erased), both say so, and what was queued for
    /// `old` goes to `new`.
    pub(crate) fn finish_move(
        &self,
        tx: &mut dyn Tx,
        old: &ConversationId,
        new: &ConversationRow,
        by: &DeviceAddress,
    ) -> Result<(), ClientError> {
        tx.delete_meta(&moving_key(old))?;
        tx.delete_meta(&moved_from_key(&new.id))?;
        tx.delete_meta(&pq_check_key(old))?;
        tx.set_meta(&moved_key(old), new.id.as_bytes())?;
        // A message request stays one until the user accepts it.
        let request = crate::requests::request_key(old);
        if let Some(inviter) = tx.meta(&request)? {
            tx.set_meta(&crate::requests::request_key(&new.id), &inviter)?;
            tx.delete_meta(&request)?;
        }
        let suite = u16::from(self.engine().suite(&new.id)?);
        if let Some(old_row) = tx.conversation(old)? {
            let text = format!(
                "this conversation continues as #{} under {}; this one is retired",
                new.id.to_hex(),
                suite_words(suite)
            );
            self.record_system_line(tx, &old_row, by, SystemEvent::Note { text })?;
            // Its keys stay until the new conversation's first commit: a
            // message a member sent there just before it saw the move is
            // still read (`erase_moved_keys`).
            tx.retire_conversation(old)?;
            tx.set_meta(&kept_key(&new.id), old.as_bytes())?;
        }
        let text = format!("this conversation continues #{} under {}", old.to_hex(), suite_words(suite));
        self.record_system_line(tx, new, by, SystemEvent::Note { text })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The meta keys are a stored format: a change is a visible decision.
    #[test]
    fn the_stored_keys_are_stable() {
        let id = ConversationId([0xAB; 16]);
        assert_eq!(pq_check_key(&id), "pq_check:abababababababababababababababab");
        assert_eq!(moving_key(&id), "moving:abababababababababababababababab");
        assert_eq!(moved_from_key(&id), "moved_from:abababababababababababababababab");
        assert_eq!(moved_key(&id), "moved:abababababababababababababababab");
        assert_eq!(kept_key(&id), "kept_after_move:abababababababababababababababab");
        assert_eq!(read_id(&[7; 17]), Some(ConversationId([7; 16])));
        assert_eq!(read_id(&[7; 15]), None);
        let m = Moving { to: id, creates: true, since_ms: 0x0102_0304_0506_0708 };
        assert_eq!(hex::encode(m.encode()), format!("{}010807060504030201", "ab".repeat(16)));
        assert_eq!(Moving::decode(&m.encode()), Some(m));
        // The fallback: only the committer creates at once; any member once
        // it is overdue.
        let waiting = Moving { creates: false, since_ms: 1_000, ..m };
        assert!(!waiting.creates_at(1_000 + MOVE_FALLBACK_MS - 1));
        assert!(waiting.creates_at(1_000 + MOVE_FALLBACK_MS));
        assert!(m.creates_at(0));
    }
}

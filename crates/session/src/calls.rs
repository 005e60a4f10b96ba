//! Call signals that arrive (content kind `CALL`): what is stored, and what
//! a running call hears.
//!
//! Every signal but `ringing` leaves a typed system line
//! ([`SystemEvent::Call`]): "alice is calling", "bob answered the call",
//! "bob hung up", and "missed call from alice" when the caller hangs up
//! before any device of this account answered. Every signal, `ringing`
//! included, is also queued in memory for a call this process runs
//! ([`Session::take_call_signals`]), with the sender's MLS leaf index, so
//! the call admits exactly the media streams announced inside MLS.
//!
//! The queue is bounded ([`MAX_QUEUED_SIGNALS`], the oldest go first): a
//! process that never runs a call (`receive --follow`) or a member who
//! floods offers cannot grow it without end.
//!
//! Whether this account answered a call is kept in the store's meta table
//! (`call.<id>`: `offer` once another account's offer arrived, `answered`
//! once a device of this account answered, each followed by the time it was
//! written, 8 bytes big-endian ms), removed when the call ends. A call
//! whose end never arrives (the other side crashed) leaves its row; rows
//! older than [`CALL_ROW_TTL_MS`] are swept whenever a new one is written,
//! so they cannot pile up.

use serde::{Deserialize, Serialize};
use subrosa_core::call::{CallAction, CallSignal};
use subrosa_proto::{ConversationId, DeviceAddress};

use crate::store::{ConversationRow, Tx};
use crate::{ClientError, Session, SystemEvent};

/// What a call line says (the stored form of [`SystemEvent::Call`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CallLine {
    /// Someone calls.
    Offer,
    /// The callee's device rings (not stored; for completeness).
    Ringing,
    /// Someone answered.
    Answer,
    /// The callee was in another call.
    Busy,
    /// Someone left the call.
    Hangup,
    /// The caller hung up before any device of this account answered.
    Missed,
}

impl From<CallAction> for CallLine {
    fn from(a: CallAction) -> Self {
        match a {
            CallAction::Offer => CallLine::Offer,
            CallAction::Ringing => CallLine::Ringing,
            CallAction::Answer => CallLine::Answer,
            CallAction::Busy => CallLine::Busy,
            CallAction::Hangup => CallLine::Hangup,
        }
    }
}

/// A call signal that arrived, for a call running in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingSignal {
    /// The conversation it came in.
    pub conversation: ConversationId,
    /// The sending device (authenticated by MLS).
    pub from: DeviceAddress,
    /// The sender's MLS leaf index: the sender index in its SFrame key ids.
    pub sender_index: u32,
    /// The sender's clock when it sent it (ms since the Unix epoch).
    pub sent_at_ms: u64,
    /// What it says.
    pub signal: CallSignal,
}

/// Signals kept for a call this process may run; beyond it the oldest go.
pub const MAX_QUEUED_SIGNALS: usize = 64;
/// A `call.<id>` row older than this is swept (no call rings or lasts a day).
pub const CALL_ROW_TTL_MS: u64 = 24 * 60 * 60 * 1000;

const META_PREFIX: &str = "call.";

fn meta_key(call_id: &[u8; 16]) -> String {
    format!("{META_PREFIX}{}", hex::encode(call_id))
}

const STATE_OFFER: &[u8] = b"offer";
const STATE_ANSWERED: &[u8] = b"answered";

/// A `call.<id>` row's value: its state, then when it was written.
fn row_value(state: &[u8], at_ms: u64) -> Vec<u8> {
    let mut v = state.to_vec();
    v.extend_from_slice(&at_ms.to_be_bytes());
    v
}

/// The state and time of a row (a row written before times were kept has
/// none, and counts as old).
fn parse_row(value: &[u8]) -> (&[u8], Option<u64>) {
    for state in [STATE_OFFER, STATE_ANSWERED] {
        if let Some(rest) = value.strip_prefix(state) {
            return (state, <[u8; 8]>::try_from(rest).ok().map(u64::from_be_bytes));
        }
    }
    (value, None)
}

impl Session {
    /// Applies a call signal from a member (see the module documentation).
    ///
    /// # Errors
    /// Store errors.
    pub(crate) fn apply_call(
        &self,
        tx: &mut dyn Tx,
        row: &ConversationRow,
        from: &DeviceAddress,
        sent_at_ms: u64,
        signal: &CallSignal,
    ) -> Result<(), ClientError> {
        // The sender's leaf index names its media stream (only signals
        // look it up: a message's sender comes as an address).
        let sender_index = self
            .engine()
            .members(&row.id)?
            .into_iter()
            .find(|m| m.address == *from)
            .map(|m| m.index)
            .ok_or(ClientError::Core(subrosa_core::CoreError::Malformed("call signal from a non-member")))?;
        let incoming =
            IncomingSignal { conversation: row.id, from: from.clone(), sender_index, sent_at_ms, signal: *signal };
        {
            // A batch applied again after a failed attempt sees it twice.
            let mut q = self.lock_calls();
            if !q.contains(&incoming) {
                if q.len() >= MAX_QUEUED_SIGNALS {
                    q.remove(0);
                }
                q.push(incoming);
            }
        }
        self.note_call(tx, row, from, signal)
    }

    /// Records what a signal means for this account's history: by another
    /// member as it arrives, by this device once it sent it.
    ///
    /// # Errors
    /// Store errors.
    pub fn note_call(
        &self,
        tx: &mut dyn Tx,
        row: &ConversationRow,
        from: &DeviceAddress,
        signal: &CallSignal,
    ) -> Result<(), ClientError> {
        let key = meta_key(&signal.call_id);
        let mine = from.handle == *self.handle();
        let now = self.now_ms();
        let line = match signal.action {
            CallAction::Ringing => return Ok(()),
            CallAction::Offer if !mine => {
                sweep_call_rows(tx, now)?;
                tx.set_meta(&key, &row_value(STATE_OFFER, now))?;
                CallLine::Offer
            }
            CallAction::Answer if mine => {
                sweep_call_rows(tx, now)?;
                tx.set_meta(&key, &row_value(STATE_ANSWERED, now))?;
                CallLine::Answer
            }
            CallAction::Hangup if !mine => {
                let state = tx.meta(&key)?;
                tx.delete_meta(&key)?;
                if state.as_deref().map(|s| parse_row(s).0) == Some(STATE_OFFER) {
                    CallLine::Missed
                } else {
                    CallLine::Hangup
                }
            }
            CallAction::Hangup | CallAction::Busy if mine => {
                tx.delete_meta(&key)?;
                signal.action.into()
            }
            other => other.into(),
        };
        let event = SystemEvent::Call { by: from.handle.to_string(), call: hex::encode(signal.call_id), action: line };
        self.record_system_line(tx, row, from, event)
    }

    /// The call signals that arrived since the last call, oldest first.
    pub fn take_call_signals(&self) -> Vec<IncomingSignal> {
        std::mem::take(&mut *self.lock_calls())
    }
}

/// Deletes the `call.<id>` rows older than [`CALL_ROW_TTL_MS`] at `now`.
fn sweep_call_rows(tx: &mut dyn Tx, now: u64) -> Result<(), ClientError> {
    for key in tx.meta_keys(META_PREFIX)? {
        let old = match tx.meta(&key)? {
            Some(v) => parse_row(&v).1.is_none_or(|at| now.saturating_sub(at) > CALL_ROW_TTL_MS),
            None => false,
        };
        if old {
            tx.delete_meta(&key)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_row_is_its_state_then_its_time() {
        // The stored form: a change to it is a visible decision.
        let v = row_value(STATE_OFFER, 0x0102_0304_0506_0708);
        assert_eq!(v, b"offer\x01\x02\x03\x04\x05\x06\x07\x08");
        assert_eq!(row_value(STATE_ANSWERED, 1), b"answered\0\0\0\0\0\0\0\x01");
        assert_eq!(parse_row(&v), (STATE_OFFER, Some(0x0102_0304_0506_0708)));
        // A row from before times were kept is old; a garbled one too.
        assert_eq!(parse_row(b"offer"), (STATE_OFFER, None));
        assert_eq!(parse_row(b"answered\x01"), (STATE_ANSWERED, None));
        assert_eq!(parse_row(b"what").1, None);
    }
}

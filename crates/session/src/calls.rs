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
//! Whether this account answered a call is kept in the store's meta table
//! (`call.<id>`: `offer` once another account's offer arrived, `answered`
//! once a device of this account answered), removed when the call ends.

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

fn meta_key(call_id: &[u8; 16]) -> String {
    format!("call.{}", hex::encode(call_id))
}

const STATE_OFFER: &[u8] = b"offer";
const STATE_ANSWERED: &[u8] = b"answered";

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
        let line = match signal.action {
            CallAction::Ringing => return Ok(()),
            CallAction::Offer if !mine => {
                tx.set_meta(&key, STATE_OFFER)?;
                CallLine::Offer
            }
            CallAction::Answer if mine => {
                tx.set_meta(&key, STATE_ANSWERED)?;
                CallLine::Answer
            }
            CallAction::Hangup if !mine => {
                let state = tx.meta(&key)?;
                tx.delete_meta(&key)?;
                if state.as_deref().map(|s| &s[..]) == Some(STATE_OFFER) {
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

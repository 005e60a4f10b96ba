//! Call signalling: offer, ringing, answer, busy and hang-up, carried as
//! the content kind [`crate::content::kind::CALL`] inside the
//! conversation's MLS group, so the server learns only that a message
//! went by (and, from the relay, that packets flow).
//!
//! Payload version 1: `0x01 || MLS-encoded {call id ([u8; 16]), action
//! (u8), context id (u64)}`, decoded canonically (no trailing bytes, a
//! known action, a context id of at most 40 bits).
//!
//! - The **call id** is fresh random per call: it ties answer, busy and
//!   hang-up to one offer, and a stale offer to nothing.
//! - The **context id** is the SFrame context id (RFC 9605 §5.2; the
//!   media crate's `ContextId`) under which the sender's media flows in
//!   this call, 0 when it sends none (ringing, busy, hang-up). Announced
//!   inside MLS, it is the call's roster: a member plays only the streams
//!   whose sender announced them, whatever the relay forwards.
//!
//! What is deliberately absent: any key, and any address. Each device asks
//! its own server for a relay token (the answer names the relay's port on
//! the server's host), so nothing in a signal can point another member's
//! device at a third party, and nothing in one helps the server listen:
//! the media keys come from the conversation's MLS exporter, which only
//! members can compute.

use mls_rs_codec::{MlsDecode, MlsEncode, MlsSize};

use crate::CoreError;

/// Payload version 1.
pub(crate) const CALL_V1: u8 = 1;
/// The largest context id a signal carries (the 40 bits of an SFrame key
/// id's context field).
pub const MAX_CONTEXT: u64 = (1 << 40) - 1;

/// What a signal says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallAction {
    /// The sender calls: it is in the relay's call and sending.
    Offer,
    /// The callee's device has shown the call (a caller may say "ringing").
    Ringing,
    /// The callee took the call and is sending.
    Answer,
    /// The callee is in another call.
    Busy,
    /// The sender left the call (or gave up ringing: a missed call).
    Hangup,
}

impl CallAction {
    fn to_u8(self) -> u8 {
        match self {
            CallAction::Offer => 1,
            CallAction::Ringing => 2,
            CallAction::Answer => 3,
            CallAction::Busy => 4,
            CallAction::Hangup => 5,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => CallAction::Offer,
            2 => CallAction::Ringing,
            3 => CallAction::Answer,
            4 => CallAction::Busy,
            5 => CallAction::Hangup,
            _ => return None,
        })
    }

    /// The action's name as stored and shown in JSON (`offer`, `ringing`,
    /// `answer`, `busy`, `hangup`).
    pub fn as_str(self) -> &'static str {
        match self {
            CallAction::Offer => "offer",
            CallAction::Ringing => "ringing",
            CallAction::Answer => "answer",
            CallAction::Busy => "busy",
            CallAction::Hangup => "hangup",
        }
    }
}

/// One call signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallSignal {
    /// The call, fresh random per call.
    pub call_id: [u8; 16],
    /// What the sender says.
    pub action: CallAction,
    /// The SFrame context id the sender's media uses in this call (0: it
    /// sends none).
    pub context: u64,
}

#[derive(MlsSize, MlsEncode, MlsDecode)]
struct CallV1 {
    call_id: [u8; 16],
    action: u8,
    context: u64,
}

impl CallSignal {
    /// The payload, its version byte first.
    ///
    /// # Errors
    /// [`CoreError::Malformed`] for a context id over [`MAX_CONTEXT`].
    pub fn encode_payload(&self) -> Result<Vec<u8>, CoreError> {
        if self.context > MAX_CONTEXT {
            return Err(CoreError::Malformed("call: context id over 40 bits"));
        }
        let mut out = vec![CALL_V1];
        CallV1 { call_id: self.call_id, action: self.action.to_u8(), context: self.context }
            .mls_encode(&mut out)
            .map_err(|_| CoreError::Bug("call encoding"))?;
        Ok(out)
    }

    /// Reads a version-1 payload (the version byte already checked and
    /// skipped), canonically.
    ///
    /// # Errors
    /// [`CoreError::Malformed`] for anything else.
    pub fn decode_v1(mut fields: &[u8]) -> Result<Self, CoreError> {
        let bad = CoreError::Malformed("content: call payload");
        let w = CallV1::mls_decode(&mut fields).map_err(|_| CoreError::Malformed("content: call payload"))?;
        if !fields.is_empty() || w.context > MAX_CONTEXT {
            return Err(bad);
        }
        let action = CallAction::from_u8(w.action).ok_or(bad)?;
        Ok(CallSignal { call_id: w.call_id, action, context: w.context })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_round_trips_and_anything_else_is_refused() {
        for action in [CallAction::Offer, CallAction::Ringing, CallAction::Answer, CallAction::Busy, CallAction::Hangup]
        {
            let s = CallSignal { call_id: [7; 16], action, context: MAX_CONTEXT };
            let bytes = s.encode_payload().expect("encodes");
            assert_eq!(bytes[0], CALL_V1);
            assert_eq!(CallSignal::decode_v1(&bytes[1..]).ok(), Some(s));
        }
        let good = CallSignal { call_id: [1; 16], action: CallAction::Offer, context: 5 }.encode_payload().expect("ok");
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(CallSignal::decode_v1(&trailing[1..]).is_err());
        let mut unknown = good.clone();
        unknown[17] = 9;
        assert!(CallSignal::decode_v1(&unknown[1..]).is_err());
        let mut wide = good.clone();
        wide[18] = 1; // the context's top byte: over 40 bits
        assert!(CallSignal::decode_v1(&wide[1..]).is_err());
        for n in 1..good.len() {
            assert!(CallSignal::decode_v1(&good[1..n]).is_err(), "cut to {n} bytes");
        }
        assert!(CallSignal { call_id: [0; 16], action: CallAction::Hangup, context: MAX_CONTEXT + 1 }
            .encode_payload()
            .is_err());
    }
}

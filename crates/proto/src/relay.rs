//! The call relay: join tokens (HTTP) and the UDP datagrams.
//!
//! A device asks `POST /v1/calls/token` for a token to the call of one
//! conversation ([`CallTokenRequest`] → [`CallToken`]); the server issues it
//! only to a device in the conversation's roster. The relay then forwards
//! media only among addresses that proved such a token, after a round trip
//! that proves the address receives what is sent to it:
//!
//! ```text
//! device                                   relay
//!   Join { token }                   ──▶   (no state kept)
//!                                    ◀──   Challenge { cookie }   smaller than Join
//!   Prove { cookie, token }          ──▶   address proven: a session
//!                                    ◀──   Joined
//!   Media { SFrame bytes }           ◀─▶   forwarded to the call's other sessions
//!   Leave                            ──▶
//! ```
//!
//! Every datagram is `version (1) || type (1) || body`; the bodies are fixed
//! layouts (below), decoded strictly: a wrong length is refused. Media is
//! opaque: the relay never looks inside.

use serde::{Deserialize, Serialize};

use crate::{ConversationId, B64};

/// The datagram format version.
pub const VERSION: u8 = 1;
/// The length of a join token.
pub const TOKEN_LEN: usize = 65;
/// The length of a relay cookie.
pub const COOKIE_LEN: usize = 32;
/// The largest media body a datagram carries (an SFrame frame of Opus fits
/// many times over; under a 1280-byte IPv6 MTU with headers).
pub const MAX_MEDIA_BYTES: usize = 1200;

const JOIN: u8 = 1;
const CHALLENGE: u8 = 2;
const PROVE: u8 = 3;
const JOINED: u8 = 4;
const MEDIA: u8 = 5;
const LEAVE: u8 = 6;

/// `POST /v1/calls/token`: a token for the call of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CallTokenRequest {
    /// The conversation whose call to join.
    pub conversation: ConversationId,
}

/// The answer: a token and where the relay listens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CallToken {
    /// The token ([`TOKEN_LEN`] bytes), for this device and conversation.
    pub token: B64,
    /// The relay's UDP port, on the server's host.
    pub udp_port: u16,
    /// When the token stops being accepted for a join (ms since the epoch).
    pub expires_at_ms: u64,
}

/// A join token as the relay reads it (opaque to devices).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Token(pub [u8; TOKEN_LEN]);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(redacted)")
    }
}

/// One relay datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram {
    /// A device asks to join with its token.
    Join(Token),
    /// The relay answers with a cookie bound to the device's address.
    Challenge([u8; COOKIE_LEN]),
    /// The device proves it received the cookie.
    Prove {
        /// the cookie it received
        cookie: [u8; COOKIE_LEN],
        /// its token again
        token: Token,
    },
    /// The relay accepted the device into the call.
    Joined,
    /// Opaque media (an SFrame frame), at most [`MAX_MEDIA_BYTES`].
    Media(Vec<u8>),
    /// The device leaves the call.
    Leave,
}

/// Why a datagram was not decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatagramError {
    /// Not a relay datagram of this version.
    #[error("unknown relay datagram version or type")]
    Unknown,
    /// The body does not have its type's length.
    #[error("relay datagram of the wrong length")]
    Length,
}

impl Datagram {
    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body): (u8, &[u8]) = match self {
            Self::Join(t) => (JOIN, &t.0),
            Self::Challenge(c) => (CHALLENGE, c),
            Self::Prove { cookie, token } => {
                let mut out = vec![VERSION, PROVE];
                out.extend_from_slice(cookie);
                out.extend_from_slice(&token.0);
                return out;
            }
            Self::Joined => (JOINED, &[]),
            Self::Media(m) => (MEDIA, m),
            Self::Leave => (LEAVE, &[]),
        };
        let mut out = Vec::with_capacity(2 + body.len());
        out.push(VERSION);
        out.push(kind);
        out.extend_from_slice(body);
        out
    }

    /// Decodes one datagram, strictly.
    ///
    /// # Errors
    /// [`DatagramError`] for another version, an unknown type, or a body of
    /// the wrong length (media: empty or above [`MAX_MEDIA_BYTES`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, DatagramError> {
        let [version, kind, body @ ..] = bytes else {
            return Err(DatagramError::Unknown);
        };
        if *version != VERSION {
            return Err(DatagramError::Unknown);
        }
        let fixed = |n: usize| if body.len() == n { Ok(()) } else { Err(DatagramError::Length) };
        match *kind {
            JOIN => {
                let token = body.try_into().map_err(|_| DatagramError::Length)?;
                Ok(Self::Join(Token(token)))
            }
            CHALLENGE => Ok(Self::Challenge(body.try_into().map_err(|_| DatagramError::Length)?)),
            PROVE => {
                fixed(COOKIE_LEN + TOKEN_LEN)?;
                let (cookie, token) = body.split_at(COOKIE_LEN);
                Ok(Self::Prove {
                    cookie: cookie.try_into().map_err(|_| DatagramError::Length)?,
                    token: Token(token.try_into().map_err(|_| DatagramError::Length)?),
                })
            }
            JOINED => fixed(0).map(|()| Self::Joined),
            MEDIA if body.is_empty() || body.len() > MAX_MEDIA_BYTES => Err(DatagramError::Length),
            MEDIA => Ok(Self::Media(body.to_vec())),
            LEAVE => fixed(0).map(|()| Self::Leave),
            _ => Err(DatagramError::Unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Datagram> {
        vec![
            Datagram::Join(Token([0xaa; TOKEN_LEN])),
            Datagram::Challenge([0xcc; COOKIE_LEN]),
            Datagram::Prove { cookie: [0xcc; COOKIE_LEN], token: Token([0xaa; TOKEN_LEN]) },
            Datagram::Joined,
            Datagram::Media(vec![1, 2, 3]),
            Datagram::Leave,
        ]
    }

    /// The wire format is a visible decision: these bytes are it.
    #[test]
    fn snapshot_of_every_datagram() {
        let hex: Vec<String> = all().iter().map(|d| hex::encode(d.encode())).collect();
        assert_eq!(hex[0], format!("0101{}", "aa".repeat(TOKEN_LEN)));
        assert_eq!(hex[1], format!("0102{}", "cc".repeat(COOKIE_LEN)));
        assert_eq!(hex[2], format!("0103{}{}", "cc".repeat(COOKIE_LEN), "aa".repeat(TOKEN_LEN)));
        assert_eq!(hex[3], "0104");
        assert_eq!(hex[4], "0105010203");
        assert_eq!(hex[5], "0106");
        for d in all() {
            assert_eq!(Datagram::decode(&d.encode()), Ok(d));
        }
    }

    #[test]
    fn the_challenge_is_smaller_than_the_join() {
        let join = Datagram::Join(Token([0; TOKEN_LEN])).encode().len();
        let challenge = Datagram::Challenge([0; COOKIE_LEN]).encode().len();
        assert!(challenge < join);
    }

    #[test]
    fn anything_else_is_refused() {
        assert_eq!(Datagram::decode(&[]), Err(DatagramError::Unknown));
        assert_eq!(Datagram::decode(&[1]), Err(DatagramError::Unknown));
        assert_eq!(Datagram::decode(&[2, 5, 1]), Err(DatagramError::Unknown));
        assert_eq!(Datagram::decode(&[1, 9]), Err(DatagramError::Unknown));
        assert_eq!(Datagram::decode(&[1, 1, 0]), Err(DatagramError::Length));
        assert_eq!(Datagram::decode(&[1, 4, 0]), Err(DatagramError::Length));
        assert_eq!(Datagram::decode(&[1, 5]), Err(DatagramError::Length));
        let mut big = vec![1, 5];
        big.extend(vec![0; MAX_MEDIA_BYTES + 1]);
        assert_eq!(Datagram::decode(&big), Err(DatagramError::Length));
        let mut prove = Datagram::Prove { cookie: [0; COOKIE_LEN], token: Token([0; TOKEN_LEN]) }.encode();
        prove.push(0);
        assert_eq!(Datagram::decode(&prove), Err(DatagramError::Length));
    }
}

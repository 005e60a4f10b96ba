//! Binary WebSocket frames: sends, pushes and acknowledgements on a
//! device's already-authenticated socket, without HTTP, JSON, base64 or a
//! signature per message.
//!
//! A client asks for them by sending [`HEADER_FRAMES`] with the signed
//! upgrade (`GET /v1/ws`). A server that speaks them answers the upgrade
//! with the same header and a fresh random [`HEADER_CHALLENGE`]; one that
//! does not answers without them, and the client keeps today's JSON frames
//! and sends over signed HTTP. The client's first frame is then
//! [`ClientBin::Auth`]: its device signature over [`auth_message`], which
//! binds the challenge (new for every connection, so the signature is good
//! on this socket only) to the device. Until it verifies the server takes
//! no send; pushes and acknowledgements need only the signed upgrade, as
//! for JSON frames.
//!
//! Every frame is `version (1) || type (1) || body`, integers big-endian,
//! decoded strictly: trailing bytes, unknown types, counts the body cannot
//! hold and an invalid handle are refused. Layouts:
//!
//! ```text
//! address   = handle_len u8 || handle || device_id [8]
//! Auth      = signature [64]
//! Send      = request u32 || conversation [16] || send_id [16] ||
//!             expires_at u64 (ms since the Unix epoch; 0: none) || parts u8 ||
//!             parts × (kind u8 || recipients u16 || recipients × address ||
//!                      ciphertext_len u32 || ciphertext)
//! Ack       = ids u16 || ids × u64
//! Messages  = envelopes u16 || envelopes × (id u64 || conversation [16] ||
//!             sender address || kind u8 || server_time u64 ||
//!             ciphertext_len u32 || ciphertext)
//! Sent      = request u32 || duplicate u8 (0/1) || server_time u64
//! Refused   = request u32 || ErrorBody as JSON (rest of the frame)
//! ```
//!
//! Send is type 4. Type 2 was the same frame without `expires_at`; no
//! released client sent it (clients sent over signed HTTP until this
//! layout), so it is refused as unknown rather than kept as a second layout
//! to decode: a server answers it with a `bad_request` close that says so.
//!
//! A send over frames carries no commit guard: commits (rare, and the only
//! sends that move an epoch) keep going over signed HTTP, as does every
//! other request. An envelope that carries a roster (a commit's) is pushed
//! as JSON text, whatever the mode, so frames never hold one.

use crate::{ConversationId, DeviceAddress, DeviceId, Envelope, ErrorBody, Handle, MessageKind, SendId, SendPart, B64};

/// Upgrade request and response header: the client asks for binary frames
/// (`1`), the server says it speaks them (`1`).
pub const HEADER_FRAMES: &str = "x-subrosa-frames";
/// Upgrade response header: 32 random bytes (hex) the client signs in its
/// [`ClientBin::Auth`] frame.
pub const HEADER_CHALLENGE: &str = "x-subrosa-challenge";
/// The frame format version.
pub const VERSION: u8 = 1;
/// Length of a challenge, bytes.
pub const CHALLENGE_LEN: usize = 32;
/// Length of an Ed25519 signature, bytes.
pub const SIGNATURE_LEN: usize = 64;

const AUTH: u8 = 1;
/// The send frame without `expires_at` (type 2) is refused; see the module
/// documentation.
const SEND: u8 = 4;
const ACK: u8 = 3;
const MESSAGES: u8 = 0x81;
const SENT: u8 = 0x82;
const REFUSED: u8 = 0x83;

/// The bytes a device signs to authenticate a socket: a domain-separation
/// prefix (never valid as a signed request or an MLS signature), the
/// server's challenge and the device's address.
pub fn auth_message(challenge: &[u8; CHALLENGE_LEN], device: &DeviceAddress) -> Vec<u8> {
    let mut m = b"subrosa-socket-v1\n".to_vec();
    m.extend_from_slice(challenge);
    m.extend_from_slice(device.handle.as_str().as_bytes());
    m.push(b'\n');
    m.extend_from_slice(device.device.as_bytes());
    m
}

/// A send as frames carry it: [`crate::SendRequest`] without a commit guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameSend {
    /// Chosen by the client; the answer ([`ServerBin::Sent`] or
    /// [`ServerBin::Refused`]) names it.
    pub request: u32,
    /// The conversation.
    pub conversation: ConversationId,
    /// Idempotency key, as for HTTP.
    pub send_id: SendId,
    /// When the server may delete it unread (disappearing messages), ms
    /// since the Unix epoch; `None`: the server's message TTL.
    pub expires_at: Option<u64>,
    /// The parts.
    pub parts: Vec<SendPart>,
}

impl FrameSend {
    /// The same send as a signed HTTP request would carry it.
    pub fn to_request(&self) -> crate::SendRequest {
        crate::SendRequest {
            conversation: self.conversation,
            send_id: self.send_id,
            commit: None,
            parts: self.parts.clone(),
            expires_at: self.expires_at,
        }
    }

    /// The send of `request` as a frame numbered `number`, or `None` for
    /// one with a commit guard (those go over signed HTTP).
    pub fn from_request(number: u32, request: crate::SendRequest) -> Option<Self> {
        if request.commit.is_some() {
            return None;
        }
        Some(FrameSend {
            request: number,
            conversation: request.conversation,
            send_id: request.send_id,
            expires_at: request.expires_at,
            parts: request.parts,
        })
    }
}

/// A binary frame from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientBin {
    /// The device's signature over [`auth_message`].
    Auth([u8; SIGNATURE_LEN]),
    /// Store a send.
    Send(FrameSend),
    /// Acknowledge envelopes (as [`crate::AckRequest`]).
    Ack(Vec<u64>),
}

/// A binary frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerBin {
    /// Newly queued envelopes, oldest first (none with a roster).
    Messages(Vec<Envelope>),
    /// The send is durably stored for every recipient.
    Sent {
        /// The send's request number.
        request: u32,
        /// The send id had been stored before (a retry).
        duplicate: bool,
        /// When the server stored it, ms since the Unix epoch.
        server_time: u64,
    },
    /// The send was refused, as an HTTP send would have been.
    Refused {
        /// The send's request number.
        request: u32,
        /// Why.
        error: ErrorBody,
    },
}

/// Why bytes are not a frame this decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Another version, or an unknown type.
    #[error("unknown frame version or type")]
    Unknown,
    /// The body ends early or has bytes left over.
    #[error("frame of the wrong length")]
    Length,
    /// A field holds a value it cannot (a handle, a kind, a flag, a count).
    #[error("invalid field in a frame")]
    Field,
    /// The frame holds a value frames cannot carry (a roster; a count or
    /// length over what its field holds).
    #[error("this cannot be carried in a frame")]
    Unencodable,
}

fn kind_byte(kind: MessageKind) -> u8 {
    match kind {
        MessageKind::Welcome => 1,
        MessageKind::Commit => 2,
        MessageKind::Application => 3,
    }
}

fn kind_of(byte: u8) -> Result<MessageKind, FrameError> {
    match byte {
        1 => Ok(MessageKind::Welcome),
        2 => Ok(MessageKind::Commit),
        3 => Ok(MessageKind::Application),
        _ => Err(FrameError::Field),
    }
}

fn put_address(out: &mut Vec<u8>, a: &DeviceAddress) {
    let h = a.handle.as_str().as_bytes();
    // A handle is at most 32 bytes (`Handle::new`).
    out.push(h.len() as u8);
    out.extend_from_slice(h);
    out.extend_from_slice(a.device.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) -> Result<(), FrameError> {
    let n = u32::try_from(b.len()).map_err(|_| FrameError::Unencodable)?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}

fn count16(n: usize) -> Result<[u8; 2], FrameError> {
    u16::try_from(n).map(u16::to_be_bytes).map_err(|_| FrameError::Unencodable)
}

impl ClientBin {
    /// The bytes on the wire.
    ///
    /// # Errors
    /// [`FrameError::Unencodable`] for more parts, recipients or ids than
    /// their count field holds, a ciphertext over 4 GiB, or an `expires_at`
    /// of 0 (the wire's "none").
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = vec![VERSION];
        match self {
            Self::Auth(sig) => {
                out.push(AUTH);
                out.extend_from_slice(sig);
            }
            Self::Send(s) => {
                out.push(SEND);
                out.extend_from_slice(&s.request.to_be_bytes());
                out.extend_from_slice(s.conversation.as_bytes());
                out.extend_from_slice(s.send_id.as_bytes());
                let expires = match s.expires_at {
                    Some(0) => return Err(FrameError::Unencodable),
                    Some(at) => at,
                    None => 0,
                };
                out.extend_from_slice(&expires.to_be_bytes());
                out.push(u8::try_from(s.parts.len()).map_err(|_| FrameError::Unencodable)?);
                for p in &s.parts {
                    out.push(kind_byte(p.kind));
                    out.extend_from_slice(&count16(p.recipients.len())?);
                    for r in &p.recipients {
                        put_address(&mut out, r);
                    }
                    put_bytes(&mut out, p.ciphertext.as_slice())?;
                }
            }
            Self::Ack(ids) => {
                out.push(ACK);
                out.extend_from_slice(&count16(ids.len())?);
                for id in ids {
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
        }
        Ok(out)
    }

    /// Decodes one client frame, strictly.
    ///
    /// # Errors
    /// [`FrameError`].
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(bytes)?;
        let frame = match r.kind {
            AUTH => Self::Auth(r.array()?),
            SEND => {
                let request = r.u32()?;
                let conversation = ConversationId(r.array()?);
                let send_id = SendId(r.array()?);
                let expires_at = Some(r.u64()?).filter(|at| *at != 0);
                let n = usize::from(r.u8()?);
                // Each part takes at least 7 bytes: no allocation beyond the frame.
                let mut parts = Vec::with_capacity(n.min(r.left() / 7));
                for _ in 0..n {
                    let kind = kind_of(r.u8()?)?;
                    let count = usize::from(r.u16()?);
                    let mut recipients = Vec::with_capacity(count.min(r.left() / 12));
                    for _ in 0..count {
                        recipients.push(r.address()?);
                    }
                    let ciphertext = B64(r.bytes()?.to_vec());
                    parts.push(SendPart { kind, recipients, ciphertext });
                }
                Self::Send(FrameSend { request, conversation, send_id, expires_at, parts })
            }
            ACK => {
                let n = usize::from(r.u16()?);
                let mut ids = Vec::with_capacity(n.min(r.left() / 8));
                for _ in 0..n {
                    ids.push(r.u64()?);
                }
                Self::Ack(ids)
            }
            _ => return Err(FrameError::Unknown),
        };
        r.end()?;
        Ok(frame)
    }
}

impl ServerBin {
    /// The bytes on the wire.
    ///
    /// # Errors
    /// [`FrameError::Unencodable`] for an envelope with a roster, more than
    /// 65,535 envelopes, or a ciphertext over 4 GiB.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = vec![VERSION];
        match self {
            Self::Messages(envelopes) => {
                out.push(MESSAGES);
                out.extend_from_slice(&count16(envelopes.len())?);
                for e in envelopes {
                    if e.roster.is_some() {
                        return Err(FrameError::Unencodable);
                    }
                    out.extend_from_slice(&e.id.to_be_bytes());
                    out.extend_from_slice(e.conversation.as_bytes());
                    put_address(&mut out, &e.sender);
                    out.push(kind_byte(e.kind));
                    out.extend_from_slice(&e.server_time.to_be_bytes());
                    put_bytes(&mut out, e.ciphertext.as_slice())?;
                }
            }
            Self::Sent { request, duplicate, server_time } => {
                out.push(SENT);
                out.extend_from_slice(&request.to_be_bytes());
                out.push(u8::from(*duplicate));
                out.extend_from_slice(&server_time.to_be_bytes());
            }
            Self::Refused { request, error } => {
                out.push(REFUSED);
                out.extend_from_slice(&request.to_be_bytes());
                out.extend(serde_json::to_vec(error).map_err(|_| FrameError::Unencodable)?);
            }
        }
        Ok(out)
    }

    /// Decodes one server frame, strictly.
    ///
    /// # Errors
    /// [`FrameError`].
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(bytes)?;
        let frame = match r.kind {
            MESSAGES => {
                let n = usize::from(r.u16()?);
                // Each envelope takes at least 42 bytes.
                let mut envelopes = Vec::with_capacity(n.min(r.left() / 42));
                for _ in 0..n {
                    let id = r.u64()?;
                    let conversation = ConversationId(r.array()?);
                    let sender = r.address()?;
                    let kind = kind_of(r.u8()?)?;
                    let server_time = r.u64()?;
                    let ciphertext = B64(r.bytes()?.to_vec());
                    envelopes.push(Envelope { id, conversation, sender, kind, ciphertext, server_time, roster: None });
                }
                Self::Messages(envelopes)
            }
            SENT => {
                let request = r.u32()?;
                let duplicate = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(FrameError::Field),
                };
                Self::Sent { request, duplicate, server_time: r.u64()? }
            }
            REFUSED => {
                let request = r.u32()?;
                let error = serde_json::from_slice(r.rest()).map_err(|_| FrameError::Field)?;
                Self::Refused { request, error }
            }
            _ => return Err(FrameError::Unknown),
        };
        r.end()?;
        Ok(frame)
    }
}

/// A cursor over a frame's body.
struct Reader<'a> {
    kind: u8,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self, FrameError> {
        match bytes {
            [VERSION, kind, rest @ ..] => Ok(Reader { kind: *kind, rest }),
            _ => Err(FrameError::Unknown),
        }
    }

    fn left(&self) -> usize {
        self.rest.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.rest.len() < n {
            return Err(FrameError::Length);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        self.take(N)?.try_into().map_err(|_| FrameError::Length)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], FrameError> {
        let n = usize::try_from(self.u32()?).map_err(|_| FrameError::Length)?;
        self.take(n)
    }

    fn address(&mut self) -> Result<DeviceAddress, FrameError> {
        let n = usize::from(self.u8()?);
        let text = std::str::from_utf8(self.take(n)?).map_err(|_| FrameError::Field)?;
        let handle = Handle::new(text).map_err(|_| FrameError::Field)?;
        // Canonical only: `Handle::new` lower-cases and trims, the wire holds
        // the stored form.
        if handle.as_str() != text {
            return Err(FrameError::Field);
        }
        Ok(DeviceAddress { handle, device: DeviceId(self.array()?) })
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn end(&self) -> Result<(), FrameError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Length)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn addr(h: &str, d: u8) -> DeviceAddress {
        DeviceAddress { handle: Handle::new(h).expect("handle"), device: DeviceId([d; 8]) }
    }

    fn send() -> ClientBin {
        ClientBin::Send(FrameSend {
            request: 7,
            conversation: ConversationId([0xcc; 16]),
            send_id: SendId([0x55; 16]),
            expires_at: Some(0x0102_0304),
            parts: vec![SendPart {
                kind: MessageKind::Application,
                recipients: vec![addr("bob", 0xb0)],
                ciphertext: B64(vec![1, 2, 3]),
            }],
        })
    }

    fn envelope() -> Envelope {
        Envelope {
            id: 9,
            conversation: ConversationId([0xcc; 16]),
            sender: addr("ann", 0xa0),
            kind: MessageKind::Welcome,
            ciphertext: B64(vec![0xee, 0xff]),
            server_time: 0x0102,
            roster: None,
        }
    }

    /// The wire format is a visible decision: these bytes are it.
    #[test]
    fn snapshot_of_every_frame() {
        let auth = ClientBin::Auth([0x5a; SIGNATURE_LEN]);
        assert_eq!(hex::encode(auth.encode().expect("auth")), format!("0101{}", "5a".repeat(64)));
        assert_eq!(
            hex::encode(send().encode().expect("send")),
            format!(
                "0104{}{}{}{}{}{}{}{}{}{}",
                "00000007",
                "cc".repeat(16),
                "55".repeat(16),
                "0000000001020304", // expires at
                "01",               // one part
                "03",               // application
                "0001",             // one recipient
                "03626f62",         // "bob"
                "b0".repeat(8),     // its device id
                "00000003010203"    // the ciphertext
            )
        );
        let ack = ClientBin::Ack(vec![1, 0x0100]);
        assert_eq!(hex::encode(ack.encode().expect("ack")), "0103000200000000000000010000000000000100");
        let messages = ServerBin::Messages(vec![envelope()]);
        assert_eq!(
            hex::encode(messages.encode().expect("messages")),
            format!(
                "01810001{}{}{}{}{}{}{}",
                "0000000000000009", // id
                "cc".repeat(16),    // conversation
                "03616e6e",         // "ann"
                "a0".repeat(8),     // its device id
                "01",               // welcome
                "0000000000000102", // server time
                "00000002eeff"      // the ciphertext
            )
        );
        let sent = ServerBin::Sent { request: 7, duplicate: true, server_time: 5 };
        assert_eq!(hex::encode(sent.encode().expect("sent")), "018200000007010000000000000005");
        let refused = ServerBin::Refused {
            request: 1,
            error: ErrorBody { code: ErrorCode::TooLarge, message: "x".into(), current_epoch: None },
        };
        let bytes = refused.encode().expect("refused");
        assert_eq!(&bytes[..6], [1, 0x83, 0, 0, 0, 1]);
        assert_eq!(ServerBin::decode(&bytes), Ok(refused));
        for f in [auth, send(), ack] {
            assert_eq!(ClientBin::decode(&f.encode().expect("encode")), Ok(f));
        }
        for f in [messages, sent] {
            assert_eq!(ServerBin::decode(&f.encode().expect("encode")), Ok(f));
        }
    }

    /// The send frame before `expires_at` (type 2, the same bytes without
    /// it) is refused plainly, never read as the new layout.
    #[test]
    fn the_send_frame_without_expiry_is_refused() {
        let mut old = hex::decode(format!(
            "0102{}{}{}{}",
            "00000007",
            "cc".repeat(16),
            "55".repeat(16),
            "01030001" // one application part for one recipient…
        ))
        .expect("hex");
        old.extend_from_slice(b"\x03bob");
        old.extend_from_slice(&[0xb0; 8]);
        old.extend_from_slice(&[0, 0, 0, 3, 1, 2, 3]);
        assert_eq!(ClientBin::decode(&old), Err(FrameError::Unknown));
    }

    #[test]
    fn a_send_without_expiry_is_zero_on_the_wire() {
        let ClientBin::Send(mut s) = send() else { unreachable!() };
        s.expires_at = None;
        let bytes = ClientBin::Send(s.clone()).encode().expect("send");
        assert_eq!(&bytes[38..46], [0; 8]);
        assert_eq!(ClientBin::decode(&bytes), Ok(ClientBin::Send(s.clone())));
        s.expires_at = Some(0);
        assert_eq!(ClientBin::Send(s).encode(), Err(FrameError::Unencodable), "0 means none");
    }

    #[test]
    fn the_auth_message_binds_challenge_and_device() {
        let m = auth_message(&[1; CHALLENGE_LEN], &addr("ann", 2));
        assert!(m.starts_with(b"subrosa-socket-v1\n"));
        assert_ne!(m, auth_message(&[3; CHALLENGE_LEN], &addr("ann", 2)));
        assert_ne!(m, auth_message(&[1; CHALLENGE_LEN], &addr("ann", 4)));
        assert_ne!(m, auth_message(&[1; CHALLENGE_LEN], &addr("bob", 2)));
    }

    #[test]
    fn anything_else_is_refused() {
        assert_eq!(ClientBin::decode(&[]), Err(FrameError::Unknown));
        assert_eq!(ClientBin::decode(&[2, 1]), Err(FrameError::Unknown), "another version");
        assert_eq!(ClientBin::decode(&[1, 9]), Err(FrameError::Unknown), "unknown type");
        assert_eq!(ClientBin::decode(&[1, MESSAGES, 0, 0]), Err(FrameError::Unknown), "a server frame");
        assert_eq!(ClientBin::decode(&[1, AUTH, 0]), Err(FrameError::Length));
        assert_eq!(ClientBin::decode(&[1, ACK, 0, 1, 0]), Err(FrameError::Length), "count beyond the body");
        assert_eq!(ClientBin::decode(&[1, ACK, 0, 0, 0]), Err(FrameError::Length), "trailing byte");
        assert_eq!(ClientBin::decode(&[1, ACK, 0xff, 0xff]), Err(FrameError::Length), "a huge count, no bytes");
        let good = send().encode().expect("send");
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(ClientBin::decode(&trailing), Err(FrameError::Length));
        assert_eq!(ClientBin::decode(&good[..good.len() - 1]), Err(FrameError::Length));
        // The part's kind (offset 2 + 4 + 16 + 16 + 8 + 1).
        let mut kind = good.clone();
        kind[47] = 0;
        assert_eq!(ClientBin::decode(&kind), Err(FrameError::Field));
        // The handle in upper case is not its stored form.
        let mut upper = good.clone();
        upper[51] = b'B';
        assert_eq!(ClientBin::decode(&upper), Err(FrameError::Field));
        let mut sent = ServerBin::Sent { request: 1, duplicate: false, server_time: 0 }.encode().expect("sent");
        sent[6] = 2;
        assert_eq!(ServerBin::decode(&sent), Err(FrameError::Field));
        assert_eq!(ServerBin::decode(&[1, REFUSED, 0, 0, 0, 1, b'{']), Err(FrameError::Field));
        let with_roster = Envelope { roster: Some(vec![]), ..envelope() };
        assert_eq!(ServerBin::Messages(vec![with_roster]).encode(), Err(FrameError::Unencodable));
        assert_eq!(ClientBin::Ack(vec![0; 70_000]).encode(), Err(FrameError::Unencodable));
    }
}

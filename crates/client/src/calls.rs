//! Calls: signalling inside MLS, media keyed from MLS, through the server's
//! relay.
//!
//! ```text
//! caller                                   callee
//!   relay token, Join/Prove (UDP)
//!   Offer {call id, my context}  ── MLS ──▶  "alice is calling"
//!                                            relay token, Join/Prove
//!                                ◀── MLS ──  Answer {call id, my context}
//!   Opus → SFrame ─────── relay (opaque) ──▶ SFrame → jitter → Opus
//!   ◀─────────────────────────────────────── the same the other way
//!   Hangup                       ── MLS ──▶  "alice hung up"
//! ```
//!
//! **Keys.** Each side exports the conversation's SFrame base key for the
//! current MLS epoch (`subrosa_core::Engine::call_keying`, RFC 9605 §5.2)
//! and seals its frames under a key id of a fresh random context id, its
//! leaf index and the epoch. A commit during the call (a member added or
//! removed, a key update) moves both sides to the new epoch's key; the
//! senders the commit removed are refused even under the old one.
//!
//! **Roster.** A side plays only the streams announced in the call's MLS
//! signals (the sender's leaf index and context id), so what the relay
//! forwards cannot add a listener's voice or replay an old call.
//!
//! **Relay.** Each device asks its own server for a token
//! (`POST /v1/calls/token`, members only) and joins the relay on the
//! server's host at the port the answer names; the relay sees SFrame
//! ciphertext and the addresses packets come from.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What a call's system line says (re-exported for front ends).
pub use subrosa_session::CallLine;

use reqwest::Method;
use subrosa_core::call::{CallAction, CallSignal};
use subrosa_core::content::Body;
use subrosa_core::{CallKeying, MemberInfo};
use subrosa_media::codec::{EncoderConfig, FRAME_SAMPLES};
use subrosa_media::jitter::JitterConfig;
use subrosa_media::pipeline::{Incoming, IncomingStats, Outgoing};
use subrosa_media::secure::{ContextId, Epoch as MediaEpoch, EpochSecret, LeafIndex, Receiver, Sender};
use subrosa_proto::relay::{CallToken, CallTokenRequest, Datagram, Token, TOKEN_LEN};
use subrosa_proto::{ConversationId, ServerFrame};
use subrosa_session::IncomingSignal;
use tokio::net::UdpSocket;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use zeroize::Zeroizing;

use crate::{net, ClientError, Subrosa, Target};

/// How long an offer rings before the caller gives up (a missed call).
pub const RING_TIMEOUT: Duration = Duration::from_secs(45);
/// An offer sent longer ago than this is not answered (it is shown as a
/// call, but its caller has given up).
pub const OFFER_FRESH: Duration = Duration::from_secs(60);
/// How often a ringing caller proves its token again, so the relay (which
/// drops a session silent for 30 s) keeps it.
const RELAY_KEEPALIVE: Duration = Duration::from_secs(10);
/// How long to wait for each relay answer during a join, and how often to try.
const JOIN_WAIT: Duration = Duration::from_millis(700);
const JOIN_TRIES: u32 = 5;
const FRAME: Duration = Duration::from_millis(20);
/// How often a call looks for a new epoch in the store.
const EPOCH_CHECK: Duration = Duration::from_millis(500);

/// A sound card for a call, 20 ms of 48 kHz mono at a time. The call
/// takes a frame and plays one every 20 ms on its own clock; a device
/// buffers between that clock and its own.
pub trait AudioDevice: Send {
    /// The next 20 ms ([`FRAME_SAMPLES`]) the microphone captured, when a
    /// whole frame is ready; `None` sends [`CallOptions::input`] instead
    /// (silence once it ends), as a device without a microphone does.
    fn capture(&mut self) -> Option<Vec<i16>>;
    /// Hands the next 20 ms heard to the speakers (a device without
    /// speakers drops it).
    fn play(&mut self, frame: &[i16]);
}

/// A sound card shared with the call.
pub type SharedAudio = std::sync::Arc<std::sync::Mutex<dyn AudioDevice>>;

/// Settings of one call. `Debug` shows no audio.
#[derive(Clone)]
pub struct CallOptions {
    /// What this side says: 48 kHz mono samples, silence once they end.
    pub input: Vec<i16>,
    /// A sound card: its microphone before `input`, its speakers for
    /// what this side hears.
    pub audio: Option<SharedAudio>,
    /// Keep what this side hears in [`CallReport::output`] (a file to
    /// write); off, a long call with a sound card keeps nothing.
    pub record: bool,
    /// How long to stream once connected.
    pub duration: Duration,
    /// How long to ring (caller) or wait for an offer (callee).
    pub wait: Duration,
    /// Send media to this address instead of the relay the server names
    /// (a port forward; tests put a recording proxy there).
    pub relay: Option<SocketAddr>,
    /// Told when the user hangs up (a front end's hang-up key): a call
    /// that has not connected yet is given up ([`CallEnd::Cancelled`]; a
    /// caller's offer becomes a missed call there), one that has ends as
    /// its duration would. A `notify_one` before the call looks is kept.
    pub hang_up: Option<std::sync::Arc<tokio::sync::Notify>>,
}

/// Waits until `hang_up` is told; forever without one.
async fn hung_up(hang_up: &Option<std::sync::Arc<tokio::sync::Notify>>) {
    match hang_up {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

impl std::fmt::Debug for CallOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallOptions")
            .field("input_samples", &self.input.len())
            .field("audio", &self.audio.is_some())
            .field("record", &self.record)
            .field("duration", &self.duration)
            .field("wait", &self.wait)
            .field("relay", &self.relay)
            .field("hang_up", &self.hang_up.is_some())
            .finish()
    }
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallEnd {
    /// The chosen duration passed; this side hung up.
    Duration,
    /// The other side hung up.
    HungUp {
        /// Who.
        by: String,
    },
    /// The callee was busy.
    Busy {
        /// Who.
        by: String,
    },
    /// Nobody answered in time (the callee sees a missed call).
    NoAnswer,
    /// No offer came in time (`answer`).
    NoOffer,
    /// This device left the conversation during the call.
    Removed,
    /// This side hung up before the call connected.
    Cancelled,
}

/// What happened in a call, for the front end.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallProgress {
    /// The offer went out; `id` is the call's id (hex).
    Calling {
        /// The call id.
        id: String,
    },
    /// A device of the callee rings (it sent `ringing` inside MLS).
    Ringing {
        /// Whose device.
        at: String,
    },
    /// An offer arrived and is being answered.
    Incoming {
        /// The caller.
        from: String,
        /// The conversation (hex).
        conversation: String,
    },
    /// Both sides are in; media flows.
    Connected {
        /// The other side.
        with: String,
    },
    /// UDP to the relay got no answer (blocked): the media goes over a
    /// call socket, a WebSocket to the server.
    OverWebSocket,
    /// A commit moved the call to a new epoch's keys.
    Rekeyed {
        /// The new epoch.
        epoch: u64,
    },
}

/// What a call did. `Debug` shows no audio.
#[derive(Clone)]
pub struct CallReport {
    /// The conversation.
    pub conversation: ConversationId,
    /// The call id.
    pub call_id: [u8; 16],
    /// How it ended.
    pub end: CallEnd,
    /// What this side heard, from the first frame played (when
    /// [`CallOptions::record`] asked for it).
    pub output: Vec<i16>,
    /// Seconds heard, from the first frame played.
    pub heard_secs: f64,
    /// Frames sent.
    pub sent: u64,
    /// The receiving side's counters.
    pub incoming: IncomingStats,
    /// Re-keys during the call.
    pub rekeys: u32,
}

impl std::fmt::Debug for CallReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallReport")
            .field("end", &self.end)
            .field("output_samples", &self.output.len())
            .field("heard_secs", &self.heard_secs)
            .field("sent", &self.sent)
            .field("incoming", &self.incoming)
            .field("rekeys", &self.rekeys)
            .finish_non_exhaustive()
    }
}

/// A relay token and where to use it.
#[derive(Debug, Clone)]
pub struct RelayTicket {
    token: Token,
    /// The relay's UDP address.
    pub addr: SocketAddr,
}

/// How this device reaches the relay.
enum Transport {
    /// A UDP socket connected to the relay.
    Udp(UdpSocket),
    /// A call socket: the relay over a WebSocket to the server, where UDP
    /// is blocked. Its halves are locked apart, so a call may wait for
    /// media while it sends.
    Socket {
        to: tokio::sync::Mutex<futures_util::stream::SplitSink<net::WsStream, WsMessage>>,
        from: tokio::sync::Mutex<futures_util::stream::SplitStream<net::WsStream>>,
    },
}

/// This device's place in the relay: a UDP socket or a call socket that
/// proved a token.
struct MediaLink {
    transport: Transport,
    ticket: RelayTicket,
}

impl std::fmt::Debug for MediaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let over = match self.transport {
            Transport::Udp(_) => "udp",
            Transport::Socket { .. } => "call socket",
        };
        f.debug_struct("MediaLink").field("over", &over).field("relay", &self.ticket.addr).finish()
    }
}

impl MediaLink {
    /// Joins the relay over UDP (`Join`, `Challenge`, `Prove`, `Joined`,
    /// each answer awaited a while and the whole tried again on loss); when
    /// UDP gets no answer (blocked), over a call socket to the server.
    async fn join(ticket: RelayTicket, api: &net::Api) -> Result<Self, ClientError> {
        let local: SocketAddr =
            if ticket.addr.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
        let socket = UdpSocket::bind(local).await.map_err(|e| ClientError::Network(format!("call socket: {e}")))?;
        // Connected: the kernel hands this socket only the relay's datagrams.
        socket.connect(ticket.addr).await.map_err(|e| ClientError::Network(format!("relay {}: {e}", ticket.addr)))?;
        let udp = MediaLink { transport: Transport::Udp(socket), ticket: ticket.clone() };
        if udp.prove().await.is_ok() {
            return Ok(udp);
        }
        let udp_failed = format!("the call relay at {} does not answer over UDP", ticket.addr);
        let ws = api
            .call_socket()
            .await
            .map_err(|e| ClientError::Network(format!("{udp_failed}, nor its call socket: {e}")))?;
        let (to, from) = futures_util::StreamExt::split(ws);
        let link = MediaLink {
            transport: Transport::Socket { to: tokio::sync::Mutex::new(to), from: tokio::sync::Mutex::new(from) },
            ticket,
        };
        link.prove().await.map_err(|_| ClientError::Network(format!("{udp_failed}, nor over its call socket")))?;
        Ok(link)
    }

    /// Proves the token again (or for the first time): over UDP with the
    /// cookie round trip, over a call socket with the token alone.
    async fn prove(&self) -> Result<(), ClientError> {
        let token = self.ticket.token;
        for _ in 0..JOIN_TRIES {
            self.send(&Datagram::Join(token).encode()).await?;
            if let Transport::Udp(_) = self.transport {
                let Some(Datagram::Challenge(cookie)) = self.answer(|d| matches!(d, Datagram::Challenge(_))).await?
                else {
                    continue;
                };
                self.send(&Datagram::Prove { cookie, token }.encode()).await?;
            }
            if self.answer(|d| matches!(d, Datagram::Joined)).await?.is_some() {
                return Ok(());
            }
        }
        Err(ClientError::Network(format!("the call relay at {} does not answer", self.ticket.addr)))
    }

    /// Waits a while for a datagram `wanted` accepts (media in between is
    /// dropped: nobody plays it yet).
    async fn answer(&self, wanted: impl Fn(&Datagram) -> bool) -> Result<Option<Datagram>, ClientError> {
        let deadline = tokio::time::Instant::now() + JOIN_WAIT;
        loop {
            let Ok(got) = tokio::time::timeout_at(deadline, self.recv()).await else { return Ok(None) };
            if let Some(bytes) = got? {
                if let Ok(d) = Datagram::decode(&bytes) {
                    if wanted(&d) {
                        return Ok(Some(d));
                    }
                }
            }
        }
    }

    /// The next datagram from the relay: `None` for nothing usable (a UDP
    /// error such as a refused port, a WebSocket ping).
    ///
    /// # Errors
    /// The call socket closed.
    async fn recv(&self) -> Result<Option<Vec<u8>>, ClientError> {
        match &self.transport {
            Transport::Udp(socket) => {
                let mut buf = vec![0u8; 2048];
                Ok(socket.recv(&mut buf).await.ok().map(|n| {
                    buf.truncate(n);
                    buf
                }))
            }
            Transport::Socket { from, .. } => match futures_util::StreamExt::next(&mut *from.lock().await).await {
                Some(Ok(WsMessage::Binary(bytes))) => Ok(Some(bytes.to_vec())),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => Ok(None),
                _ => Err(ClientError::Network("the server closed the call socket".into())),
            },
        }
    }

    async fn send(&self, bytes: &[u8]) -> Result<(), ClientError> {
        match &self.transport {
            // A refused or full socket loses the datagram, as the network
            // would; only a socket that cannot send at all is an error.
            Transport::Udp(socket) => match socket.send(bytes).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                Err(e) => Err(ClientError::Network(format!("relay {}: {e}", self.ticket.addr))),
            },
            Transport::Socket { to, .. } => {
                futures_util::SinkExt::send(&mut *to.lock().await, WsMessage::Binary(bytes.to_vec().into()))
                    .await
                    .map_err(|e| ClientError::Network(format!("the call socket: {e}")))
            }
        }
    }

    async fn leave(&self) {
        let _ = self.send(&Datagram::Leave.encode()).await;
    }
}

/// The sound card, even after a callback panicked while holding it.
fn lock_audio(a: &SharedAudio) -> std::sync::MutexGuard<'_, dyn AudioDevice + 'static> {
    a.lock().unwrap_or_else(|p| p.into_inner())
}

/// One epoch's keys as the media engine takes them.
fn epoch_secret(k: &CallKeying) -> Result<EpochSecret, ClientError> {
    EpochSecret::new(Zeroizing::new(k.secret.to_vec())).map_err(|e| ClientError::Bug(e.to_string()))
}

/// The media of one call on this device: its outgoing stream, what it
/// hears, and the epoch its keys are of.
struct Media {
    outgoing: Outgoing,
    incoming: Incoming,
    epoch: u64,
    members: Vec<MemberInfo>,
    context: ContextId,
    rekeys: u32,
}

impl std::fmt::Debug for Media {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Media").field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

impl Media {
    fn new(keys: &CallKeying) -> Result<Self, ClientError> {
        let context = ContextId::random();
        let bug = |e: &dyn std::fmt::Display| ClientError::Bug(format!("call media: {e}"));
        let epoch = MediaEpoch(keys.epoch.0);
        let sender =
            Sender::new(&epoch_secret(keys)?, epoch, LeafIndex(keys.own_index), context).map_err(|e| bug(&e))?;
        let outgoing = Outgoing::new(sender, EncoderConfig::default()).map_err(|e| bug(&e))?;
        let incoming = Incoming::new(Receiver::new(epoch_secret(keys)?, epoch), JitterConfig::default());
        Ok(Media { outgoing, incoming, epoch: keys.epoch.0, members: keys.members.clone(), context, rekeys: 0 })
    }

    /// Moves to `keys` if they are of a newer epoch; the senders the change
    /// removed are refused from now on.
    fn rekey(&mut self, keys: &CallKeying) -> Result<bool, ClientError> {
        if keys.epoch.0 <= self.epoch {
            return Ok(false);
        }
        let bug = |e: &dyn std::fmt::Display| ClientError::Bug(format!("call re-key: {e}"));
        let removed: Vec<LeafIndex> = self
            .members
            .iter()
            .filter(|m| !keys.members.iter().any(|k| k.address == m.address))
            .map(|m| LeafIndex(m.index))
            .collect();
        let epoch = MediaEpoch(keys.epoch.0);
        self.outgoing.sender_mut().rekey(&epoch_secret(keys)?, epoch).map_err(|e| bug(&e))?;
        self.incoming.receiver_mut().rekey(epoch_secret(keys)?, epoch, &removed).map_err(|e| bug(&e))?;
        self.epoch = keys.epoch.0;
        self.members = keys.members.clone();
        self.rekeys += 1;
        Ok(true)
    }
}

/// The other devices in the call, as their MLS signals announced them.
#[derive(Debug, Default)]
struct Peers(Vec<subrosa_proto::DeviceAddress>);

impl Peers {
    /// Admits the stream `s` announces; true when its device is new here.
    fn join(&mut self, media: &mut Media, s: &IncomingSignal) -> bool {
        media.incoming.admit(LeafIndex(s.sender_index), ContextId::from_bits(s.signal.context));
        if self.0.contains(&s.from) {
            return false;
        }
        self.0.push(s.from.clone());
        true
    }

    /// Forgets the peers a commit removed from the conversation; the call
    /// ends when none is left.
    fn left_by_removal(&mut self, media: &Media, last: &mut String) -> Option<CallEnd> {
        let before = self.0.len();
        let in_it = |p: &subrosa_proto::DeviceAddress| media.members.iter().any(|m| m.address == *p);
        if let Some(gone) = self.0.iter().rfind(|p| !in_it(p)) {
            *last = gone.handle.to_string();
        }
        self.0.retain(in_it);
        if self.0.is_empty() && before > 0 {
            return Some(CallEnd::HungUp { by: std::mem::take(last) });
        }
        None
    }
}

impl Subrosa {
    /// A relay token for the call of `conversation` (members only), and
    /// the relay's address: `relay` if given, else the server's host at the
    /// port the server names.
    ///
    /// # Errors
    /// The server's refusal (`not_a_member`; not found when it runs no
    /// relay), network errors, a token of the wrong length.
    pub async fn relay_ticket(
        &self,
        conversation: &ConversationId,
        relay: Option<SocketAddr>,
    ) -> Result<RelayTicket, ClientError> {
        let answer: CallToken = self
            .api()
            .call(Method::POST, "/v1/calls/token", Some(&CallTokenRequest { conversation: *conversation }))
            .await
            .map_err(|e| match e {
                ClientError::Server { status: 404, .. } => {
                    ClientError::Input("this server runs no call relay (subrosa-server --relay-listen)".into())
                }
                e => e,
            })?;
        let token = <[u8; TOKEN_LEN]>::try_from(answer.token.0.as_slice())
            .map_err(|_| ClientError::Protocol("a relay token of the wrong length".into()))?;
        let addr = match relay {
            Some(a) => a,
            None => {
                let base = self.api().base();
                let host = base.host_str().ok_or_else(|| ClientError::BadUrl("the server URL has no host".into()))?;
                let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
                let found = tokio::net::lookup_host((host.as_str(), answer.udp_port))
                    .await
                    .map_err(|e| ClientError::Network(format!("the call relay's address {host}: {e}")))?
                    .next();
                found.ok_or_else(|| ClientError::Network(format!("no address for the call relay at {host}")))?
            }
        };
        Ok(RelayTicket { token: Token(token), addr })
    }

    /// The SFrame keys of `conversation`'s current epoch (see the module
    /// documentation).
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`] for a conversation this device is not in.
    pub fn call_keys(&self, conversation: &ConversationId) -> Result<CallKeying, ClientError> {
        let row = self.conversation(conversation)?;
        if !row.active {
            return Err(ClientError::Input(format!("you are no longer a member of {}", row.target())));
        }
        Ok(self.engine().call_keying(conversation)?)
    }

    async fn signal(&self, conversation: &ConversationId, signal: CallSignal) -> Result<(), ClientError> {
        self.send_body(&Target::Conversation(*conversation), Body::Call(signal), None).await?;
        // This device's own line ("you called", "you hung up"): the
        // account's other devices store theirs as the signal arrives.
        let row = self.conversation(conversation)?;
        let me = self.identity().address();
        self.store().write(|tx| self.note_call(tx, &row, &me, &signal))
    }

    /// Calls `conversation`: joins the relay, sends the offer, rings for
    /// `options.wait`, then streams `options.input` for `options.duration`
    /// and hangs up (see the module documentation).
    ///
    /// # Errors
    /// Network, server and store errors; a conversation this device is not in.
    pub async fn place_call(
        &self,
        conversation: &ConversationId,
        options: &CallOptions,
        on: &mut (dyn FnMut(CallProgress) + Send),
    ) -> Result<CallReport, ClientError> {
        self.sync().await?;
        self.take_call_signals();
        let keys = self.call_keys(conversation)?;
        let link = MediaLink::join(self.relay_ticket(conversation, options.relay).await?, self.api()).await?;
        if let Transport::Socket { .. } = link.transport {
            on(CallProgress::OverWebSocket);
        }
        let mut media = Media::new(&keys)?;
        let call_id: [u8; 16] = rand::random();
        let mut ws = self.api().connect().await?;
        let offer = CallSignal { call_id, action: CallAction::Offer, context: media.context.value() };
        self.signal(conversation, offer).await?;
        on(CallProgress::Calling { id: hex::encode(call_id) });
        let me = self.handle().clone();
        let deadline = tokio::time::Instant::now() + options.wait;
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + RELAY_KEEPALIVE, RELAY_KEEPALIVE);
        let report = |end: CallEnd, media: &Media| CallReport {
            conversation: *conversation,
            call_id,
            end,
            output: Vec::new(),
            heard_secs: 0.0,
            sent: 0,
            incoming: media.incoming.stats(),
            rekeys: media.rekeys,
        };
        // Devices whose ringing was shown (each once).
        let mut ringing: Vec<subrosa_proto::DeviceAddress> = Vec::new();
        let answer = loop {
            let from_others = |s: &IncomingSignal| {
                s.conversation == *conversation && s.signal.call_id == call_id && s.from.handle != me
            };
            let mut end = None;
            let mut answered = Vec::new();
            for s in self.take_call_signals().into_iter().filter(from_others) {
                match s.signal.action {
                    CallAction::Answer => answered.push(s),
                    CallAction::Busy => end = Some(CallEnd::Busy { by: s.from.handle.to_string() }),
                    CallAction::Hangup => end = Some(CallEnd::HungUp { by: s.from.handle.to_string() }),
                    CallAction::Ringing if !ringing.contains(&s.from) => {
                        on(CallProgress::Ringing { at: s.from.handle.to_string() });
                        ringing.push(s.from);
                    }
                    CallAction::Offer | CallAction::Ringing => {}
                }
            }
            if !answered.is_empty() {
                break answered;
            }
            if let Some(end) = end {
                link.leave().await;
                return Ok(report(end, &media));
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    // Nobody answered: the hang-up makes it a missed call there.
                    let hangup = CallSignal { call_id, action: CallAction::Hangup, context: 0 };
                    self.signal(conversation, hangup).await?;
                    link.leave().await;
                    return Ok(report(CallEnd::NoAnswer, &media));
                }
                _ = hung_up(&options.hang_up) => {
                    let hangup = CallSignal { call_id, action: CallAction::Hangup, context: 0 };
                    self.signal(conversation, hangup).await?;
                    link.leave().await;
                    return Ok(report(CallEnd::Cancelled, &media));
                }
                _ = keepalive.tick() => link.prove().await?,
                frame = net::next_frame(&mut ws) => self.on_frame(&mut ws, frame?).await?,
            }
        };
        let mut peers = Peers::default();
        for a in &answer {
            if peers.join(&mut media, a) {
                on(CallProgress::Connected { with: a.from.handle.to_string() });
            }
        }
        self.stream(conversation, call_id, &link, &mut ws, media, peers, options, on).await
    }

    /// Waits up to `options.wait` for a fresh offer in any conversation,
    /// answers it, streams `options.input` for `options.duration` (or until
    /// the caller hangs up) and hangs up.
    ///
    /// # Errors
    /// Network, server and store errors.
    pub async fn answer_call(
        &self,
        options: &CallOptions,
        on: &mut (dyn FnMut(CallProgress) + Send),
    ) -> Result<CallReport, ClientError> {
        let me = self.handle().clone();
        let mut ws = self.api().connect().await?;
        // What arrived before the socket was up is fetched now.
        self.sync().await?;
        let deadline = tokio::time::Instant::now() + options.wait;
        let mut offers: Vec<IncomingSignal> = Vec::new();
        // Other members who answered a group call before this device did.
        let mut answered: Vec<IncomingSignal> = Vec::new();
        let offer = loop {
            for s in self.take_call_signals() {
                let call = s.signal.call_id;
                match s.signal.action {
                    CallAction::Offer if s.from.handle != me && self.is_fresh(&s) => offers.push(s),
                    // Another device of this account took it, or refused it.
                    CallAction::Answer | CallAction::Busy if s.from.handle == me => {
                        offers.retain(|o| o.signal.call_id != call)
                    }
                    CallAction::Answer => answered.push(s),
                    // The caller gave up before we answered.
                    CallAction::Hangup => offers.retain(|o| o.signal.call_id != call || o.from != s.from),
                    _ => {}
                }
            }
            if let Some(o) = offers.pop() {
                break o;
            }
            let none = |end: CallEnd| CallReport {
                conversation: ConversationId([0; 16]),
                call_id: [0; 16],
                end,
                output: Vec::new(),
                heard_secs: 0.0,
                sent: 0,
                incoming: IncomingStats::default(),
                rekeys: 0,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(none(CallEnd::NoOffer)),
                _ = hung_up(&options.hang_up) => return Ok(none(CallEnd::Cancelled)),
                frame = net::next_frame(&mut ws) => self.on_frame(&mut ws, frame?).await?,
            }
        };
        let conversation = offer.conversation;
        let call_id = offer.signal.call_id;
        // The caller learns at once that a device got the offer.
        let ringing = CallSignal { call_id, action: CallAction::Ringing, context: 0 };
        self.signal(&conversation, ringing).await?;
        on(CallProgress::Incoming { from: offer.from.handle.to_string(), conversation: conversation.to_hex() });
        let keys = self.call_keys(&conversation)?;
        let link = MediaLink::join(self.relay_ticket(&conversation, options.relay).await?, self.api()).await?;
        if let Transport::Socket { .. } = link.transport {
            on(CallProgress::OverWebSocket);
        }
        let mut media = Media::new(&keys)?;
        let answer = CallSignal { call_id, action: CallAction::Answer, context: media.context.value() };
        self.signal(&conversation, answer).await?;
        answered.retain(|a| a.conversation == conversation && a.signal.call_id == call_id);
        let mut peers = Peers::default();
        for s in std::iter::once(&offer).chain(&answered) {
            if peers.join(&mut media, s) {
                on(CallProgress::Connected { with: s.from.handle.to_string() });
            }
        }
        self.stream(&conversation, call_id, &link, &mut ws, media, peers, options, on).await
    }

    /// Whether a signal was sent recently enough to act on (by the sender's
    /// clock: an offer that waited in the inbox is a call already given up).
    fn is_fresh(&self, s: &IncomingSignal) -> bool {
        let fresh = u64::try_from(OFFER_FRESH.as_millis()).unwrap_or(u64::MAX);
        self.now_ms().saturating_sub(s.sent_at_ms) <= fresh
    }

    /// One WebSocket frame during a call: a batch is processed, stored and
    /// acknowledged like any other (call signals land in the session's queue).
    async fn on_frame(&self, ws: &mut net::Socket, frame: Option<ServerFrame>) -> Result<(), ClientError> {
        match frame {
            None => Err(ClientError::Network("the server closed the connection during the call".into())),
            Some(ServerFrame::Messages { messages }) => {
                // A Welcome whose blob could not be downloaded (and what
                // followed it) stays queued for the next fetch, after the call.
                let batch = self.process_fetched(&messages).await?;
                net::send_ack(ws, batch.ids).await?;
                self.release_welcome_blobs(&batch.blobs).await;
                Ok(())
            }
            Some(ServerFrame::Error(e)) => Err(ClientError::Server { status: 0, body: e }),
        }
    }

    /// Re-keys the call when the conversation moved to a new epoch;
    /// `Some(Removed)` when this device is no longer in it.
    fn follow_epoch(
        &self,
        conversation: &ConversationId,
        media: &mut Media,
        on: &mut (dyn FnMut(CallProgress) + Send),
    ) -> Result<Option<CallEnd>, ClientError> {
        match self.call_keys(conversation) {
            Ok(keys) => {
                if media.rekey(&keys)? {
                    on(CallProgress::Rekeyed { epoch: keys.epoch.0 });
                }
                Ok(None)
            }
            Err(ClientError::Input(_)) | Err(ClientError::UnknownTarget(_)) => Ok(Some(CallEnd::Removed)),
            Err(e) => Err(e),
        }
    }

    /// Streams both ways for `options.duration`, or until the other side
    /// hangs up or this device leaves the conversation; re-keys on every
    /// commit; hangs up at the end unless the other side did.
    #[allow(clippy::too_many_arguments)]
    async fn stream(
        &self,
        conversation: &ConversationId,
        call_id: [u8; 16],
        link: &MediaLink,
        ws: &mut net::Socket,
        mut media: Media,
        mut peers: Peers,
        options: &CallOptions,
        on: &mut (dyn FnMut(CallProgress) + Send),
    ) -> Result<CallReport, ClientError> {
        let me = self.handle().clone();
        let start = Instant::now();
        let mut last_left = String::new();
        let frames = (options.duration.as_millis() / FRAME.as_millis()) as u64;
        let mut ticker = tokio::time::interval(FRAME);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut output: Vec<i16> = Vec::new();
        let mut heard = 0u64;
        let mut sent = 0u64;
        let mut input = options.input.chunks(FRAME_SAMPLES);
        // Another process of this device (a `group remove` meanwhile) may
        // move the epoch without this one hearing of it on its socket.
        let mut epoch_check = tokio::time::interval(EPOCH_CHECK);
        let end = loop {
            tokio::select! {
                // This side hangs up: as when the duration passes.
                _ = hung_up(&options.hang_up) => break CallEnd::Duration,
                _ = ticker.tick() => {
                    if sent >= frames {
                        break CallEnd::Duration;
                    }
                    let captured = options.audio.as_ref().and_then(|a| lock_audio(a).capture());
                    let from_input = input.next().map(<[i16]>::to_vec);
                    let mut frame = captured.or(from_input).unwrap_or_default();
                    frame.resize(FRAME_SAMPLES, 0);
                    let sealed = media.outgoing.frame(&frame).map_err(|e| ClientError::Bug(format!("call media: {e}")))?;
                    link.send(&Datagram::Media(sealed).encode()).await?;
                    sent += 1;
                    let played = media.incoming.play();
                    if let Some(a) = &options.audio {
                        lock_audio(a).play(&played);
                    }
                    if media.incoming.stats().jitter.played > 0 {
                        heard += 1;
                        if options.record {
                            output.extend(played);
                        }
                    }
                }
                got = link.recv() => {
                    // A datagram that is not media, or does not open, is dropped
                    // (counted in the report).
                    if let Some(bytes) = got? {
                        if let Ok(Datagram::Media(bytes)) = Datagram::decode(&bytes) {
                            let _ = media.incoming.packet(&bytes, start.elapsed());
                        }
                    }
                }
                _ = epoch_check.tick() => {
                    if let Some(end) = self.follow_epoch(conversation, &mut media, on)? {
                        break end;
                    }
                    if let Some(end) = peers.left_by_removal(&media, &mut last_left) {
                        break end;
                    }
                }
                frame = net::next_frame(ws) => {
                    self.on_frame(ws, frame?).await?;
                    for s in self.take_call_signals().into_iter().filter(|s| s.from.handle != me) {
                        let this_call = s.conversation == *conversation && s.signal.call_id == call_id;
                        match s.signal.action {
                            // A group call: another member joins.
                            CallAction::Answer | CallAction::Offer if this_call => {
                                let new = peers.join(&mut media, &s);
                                if new {
                                    on(CallProgress::Connected { with: s.from.handle.to_string() });
                                }
                            }
                            CallAction::Hangup if this_call => {
                                peers.0.retain(|p| *p != s.from);
                                last_left = s.from.handle.to_string();
                            }
                            // Someone else calls meanwhile: this device is busy.
                            CallAction::Offer if !this_call && self.is_fresh(&s) => {
                                let busy = CallSignal { call_id: s.signal.call_id, action: CallAction::Busy, context: 0 };
                                self.signal(&s.conversation, busy).await?;
                            }
                            _ => {}
                        }
                    }
                    if peers.0.is_empty() {
                        break CallEnd::HungUp { by: last_left };
                    }
                    if let Some(end) = self.follow_epoch(conversation, &mut media, on)? {
                        break end;
                    }
                    if let Some(end) = peers.left_by_removal(&media, &mut last_left) {
                        break end;
                    }
                }
            }
        };
        link.leave().await;
        if end == CallEnd::Duration {
            let hangup = CallSignal { call_id, action: CallAction::Hangup, context: 0 };
            self.signal(conversation, hangup).await?;
        }
        Ok(CallReport {
            conversation: *conversation,
            call_id,
            end,
            output,
            heard_secs: heard as f64 * FRAME.as_secs_f64(),
            sent,
            incoming: media.incoming.stats(),
            rekeys: media.rekeys,
        })
    }
}

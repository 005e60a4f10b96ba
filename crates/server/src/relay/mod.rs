//! The call relay: forwards opaque media datagrams among the devices of a
//! conversation's call over UDP (`--relay-listen ADDR`).
//!
//! **Who may use it.** `POST /v1/calls/token` ([`token`]) issues a join token
//! to a signed-in device that is in the conversation's roster (as the commits
//! set it); the token is an HMAC under the relay key (one per database,
//! made by the first node that needed it: [`Issuer::from_store`]) over the
//! conversation, a tag of the device and an expiry five minutes ahead. A token only limits abuse: the media keys come
//! from MLS, so the relay cannot listen whoever joins.
//!
//! **No amplification.** Nothing is ever sent to an address that has not
//! proved a token by a round trip: a `Join` is answered by a `Challenge`
//! (34 bytes, smaller than the 67-byte `Join`) carrying a cookie bound to
//! the sender's address, the token and the time, and keeps no state; only a
//! `Prove` that returns that cookie with the token makes a session. Media
//! from any address without a session is dropped unanswered, and media is
//! forwarded only to the call's other sessions.
//!
//! **Limits.** Per device: packets and bytes per second (token buckets); per
//! call: forwarded bytes per second and at most [`RelayLimits::max_devices_per_call`]
//! devices; at most [`RelayLimits::max_sessions`] sessions on the node, of
//! which one device holds at most [`RelayLimits::max_sessions_per_device`]
//! (calls at once) and one source at most
//! [`RelayLimits::max_sessions_per_source`] (an IPv4 address, or an IPv6
//! /64, which one host usually has whole), so neither one account (at most
//! 16 devices) nor one host can fill the node. Sessions idle for
//! [`RelayLimits::idle`] are dropped.
//!
//! **Nothing kept.** Media is never stored, parsed or logged; the relay logs
//! nothing about calls, devices or addresses. Its state is a map of live
//! sessions in one task (no locks). A token is accepted by every node of
//! the database, but a call's media meets only within one node's relay:
//! each device joins the relay of the node it asked (the token answer
//! names its port), so the devices of one call must ask the same node.
//!
//! **Where UDP is blocked.** A device may instead open a call socket,
//! `GET /v1/calls/ws` ([`socket`]): a WebSocket whose binary messages are
//! the same datagrams. Its `Join` makes a session at once (the TCP
//! handshake already proved the address, so no cookie round trip), the
//! token rule is the same, and its media is forwarded to and from the
//! call's UDP sessions alike; the relay still sees only SFrame ciphertext.
//!
//! Wire format: [`subrosa_proto::relay`].

pub mod socket;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use axum::extract::State;
use axum::Json;
use subrosa_proto::relay::{CallToken, CallTokenRequest, Datagram, Token, COOKIE_LEN, TOKEN_LEN};
use subrosa_proto::{ConversationId, DeviceAddress, B64};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::auth::{now_ms, SignedJson};
use crate::{AppError, AppState};

/// How long a token is accepted for a join.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// A cookie is accepted in the time slot it was made in and the next one.
const COOKIE_SLOT_SECS: u64 = 30;
const TOKEN_VERSION: u8 = 1;
const TOKEN_LABEL: &[u8] = b"subrosa-relay-token-v1";
const COOKIE_LABEL: &[u8] = b"subrosa-relay-cookie-v1";

/// The relay's limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayLimits {
    /// Devices in one call.
    pub max_devices_per_call: usize,
    /// Sessions on this node.
    pub max_sessions: usize,
    /// Sessions of one device (the calls it is in at once).
    pub max_sessions_per_device: usize,
    /// Sessions from one source: an IPv4 address or an IPv6 /64 (a NAT
    /// shared by a household or a carrier counts once, hence a generous
    /// default).
    pub max_sessions_per_source: usize,
    /// Packets per second one device may send (burst: twice that).
    pub packets_per_second: f64,
    /// Bytes per second one device may send (burst: twice that).
    pub bytes_per_second: f64,
    /// Bytes per second forwarded within one call, all copies counted.
    pub call_bytes_per_second: f64,
    /// A session that sent nothing for this long is dropped.
    pub idle: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_devices_per_call: 16,
            max_sessions: 10_000,
            // A device is in one call at a time in practice; room for a
            // second ringing and a stale one not yet swept.
            max_sessions_per_device: 4,
            // 16 devices of an account in calls at once behind one NAT,
            // several times over; 1% of the node.
            max_sessions_per_source: 100,
            // 50 frames a second is a call; twice that leaves room for FEC
            // bursts and a second stream.
            packets_per_second: 100.0,
            bytes_per_second: 64.0 * 1024.0,
            call_bytes_per_second: 4.0 * 1024.0 * 1024.0,
            idle: Duration::from_secs(30),
        }
    }
}

/// Mints and checks tokens and cookies: the node's relay key and the port
/// to name in token answers.
pub struct Issuer {
    key: hmac::Key,
    udp_port: u16,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer").field("udp_port", &self.udp_port).finish_non_exhaustive()
    }
}

/// An 8-byte tag of a device, so a token names it without a handle.
fn device_tag(device: &DeviceAddress) -> [u8; 8] {
    let d = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{}\n{}", device.handle.as_str(), device.device.to_hex()).as_bytes(),
    );
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&d.as_ref()[..8]);
    tag
}

/// What a valid token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Claim {
    call: ConversationId,
    device: [u8; 8],
}

const BODY_LEN: usize = 1 + 16 + 8 + 8;

impl Issuer {
    /// An issuer with a fresh random key, known to this process only (a
    /// relay without a database: tests and benchmarks).
    ///
    /// # Errors
    /// Only if the system's randomness fails.
    pub fn new(udp_port: u16) -> Result<Self, crate::ServerError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| crate::ServerError::Config("no randomness for the relay key".into()))?;
        Ok(Self { key, udp_port })
    }

    /// An issuer keyed from the database: the relay key `store` holds, or
    /// a fresh one it keeps from now on. Every node sharing the database
    /// then accepts the tokens any of them issued, so the devices of one
    /// call may join through different nodes, and a restart does not void
    /// the tokens out.
    ///
    /// # Errors
    /// [`crate::ServerError::Store`] when the store fails.
    pub async fn from_store(store: &dyn crate::store::Store, udp_port: u16) -> Result<Self, crate::ServerError> {
        let candidate: [u8; 32] = rand::random();
        let stored = zeroize::Zeroizing::new(store.relay_key(candidate).await?);
        Ok(Self { key: hmac::Key::new(hmac::HMAC_SHA256, stored.as_ref()), udp_port })
    }

    /// A token for `device` in the call of `call`, accepted until
    /// `expires_s` (seconds since the Unix epoch). The token route mints
    /// with it after checking the roster; so does a benchmark that drives
    /// the relay without a server around it.
    pub fn mint(&self, call: &ConversationId, device: &DeviceAddress, expires_s: u64) -> Token {
        let mut out = [0u8; TOKEN_LEN];
        out[0] = TOKEN_VERSION;
        out[1..17].copy_from_slice(call.as_bytes());
        out[17..25].copy_from_slice(&device_tag(device));
        out[25..33].copy_from_slice(&expires_s.to_be_bytes());
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(TOKEN_LABEL);
        ctx.update(&out[..BODY_LEN]);
        out[BODY_LEN..].copy_from_slice(ctx.sign().as_ref());
        Token(out)
    }

    fn check(&self, token: &Token, now_s: u64) -> Option<Claim> {
        let (body, mac) = token.0.split_at(BODY_LEN);
        let mut signed = Vec::with_capacity(TOKEN_LABEL.len() + BODY_LEN);
        signed.extend_from_slice(TOKEN_LABEL);
        signed.extend_from_slice(body);
        hmac::verify(&self.key, &signed, mac).ok()?;
        if body[0] != TOKEN_VERSION {
            return None;
        }
        let expires = u64::from_be_bytes(body[25..33].try_into().ok()?);
        if now_s > expires {
            return None;
        }
        Some(Claim { call: ConversationId(body[1..17].try_into().ok()?), device: body[17..25].try_into().ok()? })
    }

    fn cookie(&self, from: &SocketAddr, token: &Token, slot: u64) -> [u8; COOKIE_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(COOKIE_LABEL);
        ctx.update(&slot.to_be_bytes());
        match from.ip() {
            std::net::IpAddr::V4(ip) => ctx.update(&ip.to_ipv6_mapped().octets()),
            std::net::IpAddr::V6(ip) => ctx.update(&ip.octets()),
        }
        ctx.update(&from.port().to_be_bytes());
        ctx.update(&token.0);
        let mut out = [0u8; COOKIE_LEN];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    fn cookie_ok(&self, from: &SocketAddr, token: &Token, cookie: &[u8; COOKIE_LEN], now_s: u64) -> bool {
        let slot = now_s / COOKIE_SLOT_SECS;
        [slot, slot.saturating_sub(1)].iter().any(|s| {
            let want = self.cookie(from, token, *s);
            aws_lc_rs::constant_time::verify_slices_are_equal(&want, cookie).is_ok()
        })
    }
}

/// `POST /v1/calls/token`: a join token for a member device of the conversation.
pub(crate) async fn token(
    State(state): State<AppState>,
    SignedJson { device, body }: SignedJson<CallTokenRequest>,
) -> Result<Json<CallToken>, AppError> {
    let Some(issuer) = state.relay.as_ref() else {
        return Err(AppError::not_found());
    };
    if !state.store.in_roster(&body.conversation, &device).await? {
        return Err(crate::store::StoreError::NotAMember.into());
    }
    let expires_at_ms = now_ms().saturating_add(u64::try_from(TOKEN_LIFETIME.as_millis()).unwrap_or(u64::MAX));
    let token = issuer.mint(&body.conversation, &device, expires_at_ms / 1000);
    Ok(Json(CallToken { token: B64(token.0.to_vec()), udp_port: issuer.udp_port, expires_at_ms }))
}

/// Where a session's datagrams come from and go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A UDP address that proved a token by a round trip.
    Udp(SocketAddr),
    /// A call socket (WebSocket), numbered by this node, from `ip`.
    Socket {
        /// The socket's number on this node.
        id: u64,
        /// The address it connected from (for the per-source cap).
        ip: std::net::IpAddr,
    },
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: f64, now: Instant) -> Self {
        Self { level: rate * 2.0, at: now }
    }

    fn take(&mut self, amount: f64, rate: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * rate).min(rate * 2.0);
        self.at = now;
        if self.level >= amount {
            self.level -= amount;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct Session {
    claim: Claim,
    last_seen: Instant,
    packets: Bucket,
    bytes: Bucket,
}

#[derive(Debug)]
struct Call {
    members: Vec<Peer>,
    bytes: Bucket,
}

/// Counters of what the relay did (no identifiers in them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// challenges sent
    pub challenges: u64,
    /// sessions made
    pub joined: u64,
    /// media datagrams forwarded (each copy counted)
    pub forwarded: u64,
    /// datagrams dropped: malformed, unproven, invalid token or cookie, over a limit
    pub dropped: u64,
}

/// The relay's state, owned by its one task.
#[derive(Debug)]
pub struct Relay {
    issuer: Arc<Issuer>,
    limits: RelayLimits,
    sessions: HashMap<Peer, Session>,
    calls: HashMap<ConversationId, Call>,
    /// Sessions per [`source`] and per device tag, kept with `sessions`
    /// (no entry at zero), so a `Prove` checks its caps without a scan.
    per_source: HashMap<std::net::IpAddr, usize>,
    per_device: HashMap<[u8; 8], usize>,
    counters: RelayCounters,
}

/// What the per-source cap counts a session against: its IPv4 address, or
/// the /64 of its IPv6 address (IPv4-mapped ones as IPv4).
fn source(peer: &Peer) -> std::net::IpAddr {
    let ip = match peer {
        Peer::Udp(addr) => addr.ip(),
        Peer::Socket { ip, .. } => *ip,
    };
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                std::net::IpAddr::V6(std::net::Ipv6Addr::from(prefix))
            }
        },
        v4 => v4,
    }
}

/// One less in a count map, dropping the entry at zero.
fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// What to send in answer to one datagram.
pub type Out = Vec<(Peer, Vec<u8>)>;

impl Relay {
    /// A relay checking tokens with `issuer`.
    pub fn new(issuer: Arc<Issuer>, limits: RelayLimits) -> Self {
        Self {
            issuer,
            limits,
            sessions: HashMap::new(),
            calls: HashMap::new(),
            per_source: HashMap::new(),
            per_device: HashMap::new(),
            counters: RelayCounters::default(),
        }
    }

    /// What it did so far.
    pub fn counters(&self) -> RelayCounters {
        self.counters
    }

    fn drop_one(&mut self) -> Out {
        self.counters.dropped += 1;
        Vec::new()
    }

    fn remove(&mut self, addr: &Peer) {
        if let Some(s) = self.sessions.remove(addr) {
            decrement(&mut self.per_source, &source(addr));
            decrement(&mut self.per_device, &s.claim.device);
            if let Some(call) = self.calls.get_mut(&s.claim.call) {
                call.members.retain(|m| m != addr);
                if call.members.is_empty() {
                    self.calls.remove(&s.claim.call);
                }
            }
        }
    }

    /// Forgets `peer`'s session (its call socket closed).
    pub fn disconnect(&mut self, peer: &Peer) {
        self.remove(peer);
    }

    /// Handles one datagram from `from` at `now` (`now_s`: seconds since the
    /// Unix epoch, for token expiry) and returns what to send where.
    pub fn handle(&mut self, bytes: &[u8], from: Peer, now: Instant, now_s: u64) -> Out {
        let Ok(datagram) = Datagram::decode(bytes) else {
            return self.drop_one();
        };
        match (datagram, from) {
            (Datagram::Join(token), Peer::Udp(addr)) => {
                if self.issuer.check(&token, now_s).is_none() {
                    return self.drop_one();
                }
                self.counters.challenges += 1;
                let cookie = self.issuer.cookie(&addr, &token, now_s / COOKIE_SLOT_SECS);
                vec![(from, Datagram::Challenge(cookie).encode())]
            }
            // A call socket's address is proved by its TCP handshake.
            (Datagram::Join(token), Peer::Socket { .. }) => match self.issuer.check(&token, now_s) {
                Some(claim) => self.admit(claim, from, now),
                None => self.drop_one(),
            },
            (Datagram::Prove { cookie, token }, Peer::Udp(addr)) => {
                let Some(claim) = self.issuer.check(&token, now_s) else {
                    return self.drop_one();
                };
                if !self.issuer.cookie_ok(&addr, &token, &cookie, now_s) {
                    return self.drop_one();
                }
                self.admit(claim, from, now)
            }
            (Datagram::Media(_), _) => self.forward(bytes, from, now),
            (Datagram::Leave, _) => {
                if self.sessions.contains_key(&from) {
                    self.remove(&from);
                }
                Vec::new()
            }
            // Only the relay sends these; a call socket has nothing to prove.
            (Datagram::Challenge(_) | Datagram::Joined | Datagram::Prove { .. }, _) => self.drop_one(),
        }
    }

    /// Makes a session for a device that proved `claim` from `from`.
    fn admit(&mut self, claim: Claim, from: Peer, now: Instant) -> Out {
        // The same device from a new address (NAT rebinding, a
        // restart): the old session goes.
        let stale: Vec<Peer> = self
            .calls
            .get(&claim.call)
            .map(|c| {
                c.members.iter().filter(|a| self.sessions.get(a).is_some_and(|s| s.claim == claim)).copied().collect()
            })
            .unwrap_or_default();
        // Proving again (from the same address or a new one) keeps
        // the device's rate buckets: a fresh session must not
        // refill them, or a Prove every few packets would lift
        // the per-device limit.
        let carried = stale.iter().find_map(|a| self.sessions.get(a)).map(|s| (s.packets, s.bytes));
        for a in &stale {
            self.remove(a);
        }
        if self.sessions.contains_key(&from) {
            self.remove(&from);
        }
        let members = self.calls.get(&claim.call).map_or(0, |c| c.members.len());
        let of_source = self.per_source.get(&source(&from)).copied().unwrap_or(0);
        let of_device = self.per_device.get(&claim.device).copied().unwrap_or(0);
        if members >= self.limits.max_devices_per_call
            || self.sessions.len() >= self.limits.max_sessions
            || of_source >= self.limits.max_sessions_per_source
            || of_device >= self.limits.max_sessions_per_device
        {
            return self.drop_one();
        }
        let limits = self.limits;
        let (packets, bytes) = carried.unwrap_or_else(|| {
            (Bucket::full(limits.packets_per_second, now), Bucket::full(limits.bytes_per_second, now))
        });
        self.sessions.insert(from, Session { claim, last_seen: now, packets, bytes });
        *self.per_source.entry(source(&from)).or_default() += 1;
        *self.per_device.entry(claim.device).or_default() += 1;
        self.calls
            .entry(claim.call)
            .or_insert_with(|| Call { members: Vec::new(), bytes: Bucket::full(limits.call_bytes_per_second, now) })
            .members
            .push(from);
        self.counters.joined += 1;
        vec![(from, Datagram::Joined.encode())]
    }

    /// Forwards a media datagram from `from` to the other sessions of its call.
    fn forward(&mut self, bytes: &[u8], from: Peer, now: Instant) -> Out {
        let limits = self.limits;
        let Some(session) = self.sessions.get_mut(&from) else {
            return self.drop_one();
        };
        session.last_seen = now;
        let size = bytes.len() as f64;
        if !session.packets.take(1.0, limits.packets_per_second, now)
            || !session.bytes.take(size, limits.bytes_per_second, now)
        {
            return self.drop_one();
        }
        let call_id = session.claim.call;
        let Some(call) = self.calls.get_mut(&call_id) else {
            return self.drop_one();
        };
        let mut out = Vec::new();
        for to in call.members.iter().filter(|m| **m != from) {
            if !call.bytes.take(size, limits.call_bytes_per_second, now) {
                self.counters.dropped += 1;
                continue;
            }
            out.push((*to, bytes.to_vec()));
        }
        self.counters.forwarded += out.len() as u64;
        out
    }

    /// Drops sessions idle for longer than the limit.
    pub fn sweep(&mut self, now: Instant) {
        let idle = self.limits.idle;
        let gone: Vec<Peer> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_seen) > idle)
            .map(|(a, _)| *a)
            .collect();
        for a in gone {
            self.remove(&a);
        }
    }
}

fn unix_seconds() -> u64 {
    now_ms() / 1000
}

/// Binds the relay's UDP socket and makes its issuer (before the HTTP
/// routes are built, so the token route knows the port): keyed from
/// `store` when given (a server), else with a key of this process only.
///
/// # Errors
/// [`crate::ServerError::Bind`] when the address cannot be bound;
/// [`crate::ServerError::Store`] when the store fails.
pub async fn bind(
    addr: SocketAddr,
    store: Option<&dyn crate::store::Store>,
) -> Result<(UdpSocket, Arc<Issuer>), crate::ServerError> {
    let socket = UdpSocket::bind(addr).await.map_err(|source| crate::ServerError::Bind { addr, source })?;
    let port = socket.local_addr().map_err(|source| crate::ServerError::Bind { addr, source })?.port();
    let issuer = match store {
        Some(store) => Issuer::from_store(store, port).await?,
        None => Issuer::new(port)?,
    };
    Ok((socket, Arc::new(issuer)))
}

/// Runs the relay on `socket` and the call sockets' `events` until `stop`
/// changes.
pub fn spawn(
    socket: UdpSocket,
    issuer: Arc<Issuer>,
    limits: RelayLimits,
    mut events: tokio::sync::mpsc::Receiver<socket::Event>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut relay = Relay::new(issuer, limits);
        // Where each open call socket's datagrams go.
        let mut sockets: HashMap<u64, tokio::sync::mpsc::Sender<Vec<u8>>> = HashMap::new();
        let mut buf = vec![0u8; 2048];
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        loop {
            let out = tokio::select! {
                got = socket.recv_from(&mut buf) => {
                    let Ok((n, from)) = got else { continue };
                    relay.handle(&buf[..n], Peer::Udp(from), Instant::now(), unix_seconds())
                }
                Some(event) = events.recv() => match event {
                    socket::Event::Open { id, to } => {
                        sockets.insert(id, to);
                        continue;
                    }
                    socket::Event::Frame { id, ip, bytes } => {
                        relay.handle(&bytes, Peer::Socket { id, ip }, Instant::now(), unix_seconds())
                    }
                    socket::Event::Closed { id, ip } => {
                        sockets.remove(&id);
                        relay.disconnect(&Peer::Socket { id, ip });
                        continue;
                    }
                },
                _ = sweep.tick() => {
                    relay.sweep(Instant::now());
                    continue;
                }
                _ = stop.changed() => return,
            };
            for (to, bytes) in out {
                // A full socket buffer or queue loses the datagram, as the
                // network would.
                match to {
                    Peer::Udp(addr) => {
                        let _ = socket.try_send_to(&bytes, addr);
                    }
                    Peer::Socket { id, .. } => {
                        if let Some(queue) = sockets.get(&id) {
                            let _ = queue.try_send(bytes);
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use subrosa_proto::{DeviceId, Handle};

    use super::*;

    fn device(name: &str) -> DeviceAddress {
        DeviceAddress { handle: Handle::from_str(name).expect("handle"), device: DeviceId([7; 8]) }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    struct Fixture {
        relay: Relay,
        issuer: Arc<Issuer>,
        now: Instant,
        call: ConversationId,
    }

    impl Fixture {
        fn new(limits: RelayLimits) -> Self {
            let issuer = Arc::new(Issuer::new(1).expect("issuer"));
            Self {
                relay: Relay::new(Arc::clone(&issuer), limits),
                issuer,
                now: Instant::now(),
                call: ConversationId([1; 16]),
            }
        }

        fn send(&mut self, from: SocketAddr, d: &Datagram) -> Vec<(SocketAddr, Datagram)> {
            self.send_as(Peer::Udp(from), d)
                .into_iter()
                .map(|(to, d)| match to {
                    Peer::Udp(a) => (a, d),
                    Peer::Socket { id, .. } => (SocketAddr::from(([0, 0, 0, 0], u16::try_from(id).expect("id"))), d),
                })
                .collect()
        }

        fn send_as(&mut self, from: Peer, d: &Datagram) -> Vec<(Peer, Datagram)> {
            self.relay
                .handle(&d.encode(), from, self.now, 1000)
                .into_iter()
                .map(|(to, b)| (to, Datagram::decode(&b).expect("relay sends valid datagrams")))
                .collect()
        }

        fn join(&mut self, from: SocketAddr, name: &str) -> bool {
            let call = self.call;
            self.join_call(from, name, call)
        }

        fn join_call(&mut self, from: SocketAddr, name: &str, call: ConversationId) -> bool {
            let token = self.issuer.mint(&call, &device(name), 2000);
            let out = self.send(from, &Datagram::Join(token));
            let [(to, Datagram::Challenge(cookie))] = out.as_slice() else { return false };
            assert_eq!(*to, from);
            let out = self.send(from, &Datagram::Prove { cookie: *cookie, token });
            out == vec![(from, Datagram::Joined)]
        }
    }

    #[test]
    fn forwards_only_among_proven_members() {
        let mut f = Fixture::new(RelayLimits::default());
        assert!(f.join(addr(1), "alice"));
        assert!(f.join(addr(2), "bob"));
        let media = Datagram::Media(b"sframe".to_vec());
        assert_eq!(f.send(addr(1), &media), vec![(addr(2), media.clone())]);
        // An address that proved nothing gets nothing and causes nothing.
        assert!(f.send(addr(3), &media).is_empty());
        // Leaving stops the forwarding to it.
        assert!(f.send(addr(2), &Datagram::Leave).is_empty());
        assert!(f.send(addr(1), &media).is_empty());
    }

    #[test]
    fn no_answer_to_a_bad_token_and_no_session_without_the_cookie() {
        let mut f = Fixture::new(RelayLimits::default());
        let mut forged = f.issuer.mint(&f.call, &device("alice"), 2000);
        forged.0[3] ^= 1;
        assert!(f.send(addr(1), &Datagram::Join(forged)).is_empty());
        let expired = f.issuer.mint(&f.call, &device("alice"), 999);
        assert!(f.send(addr(1), &Datagram::Join(expired)).is_empty());
        let other = Issuer::new(1).expect("issuer");
        assert!(f.send(addr(1), &Datagram::Join(other.mint(&f.call, &device("alice"), 2000))).is_empty());
        // A cookie made for one address does not prove another (a spoofed
        // source cannot point the relay at a victim).
        let token = f.issuer.mint(&f.call, &device("alice"), 2000);
        let out = f.send(addr(1), &Datagram::Join(token));
        let [(_, Datagram::Challenge(cookie))] = out.as_slice() else { panic!("no challenge: {out:?}") };
        assert!(f.send(addr(9), &Datagram::Prove { cookie: *cookie, token }).is_empty());
        assert!(f.send(addr(1), &Datagram::Prove { cookie: [0; COOKIE_LEN], token }).is_empty());
        assert_eq!(f.relay.counters().joined, 0);
        // Answers before proof are never larger than what asked for them.
        let join = Datagram::Join(token).encode().len();
        let challenge = Datagram::Challenge(*cookie).encode().len();
        assert!(challenge < join);
    }

    #[test]
    fn a_device_over_its_rate_is_cut_off_and_a_full_call_refuses_more() {
        let limits = RelayLimits { packets_per_second: 10.0, max_devices_per_call: 2, ..RelayLimits::default() };
        let mut f = Fixture::new(limits);
        assert!(f.join(addr(1), "alice"));
        assert!(f.join(addr(2), "bob"));
        assert!(!f.join(addr(3), "carol"), "a third device in a call of two");
        let media = Datagram::Media(vec![0; 100]);
        let forwarded = (0..100).filter(|_| !f.send(addr(1), &media).is_empty()).count();
        assert_eq!(forwarded, 20, "a burst of twice the rate, then nothing");
        f.now += Duration::from_secs(1);
        assert!(!f.send(addr(1), &media).is_empty(), "refilled a second later");
    }

    #[test]
    fn proving_again_does_not_refill_a_devices_rate() {
        let limits = RelayLimits { packets_per_second: 10.0, ..RelayLimits::default() };
        let mut f = Fixture::new(limits);
        assert!(f.join(addr(1), "alice"));
        assert!(f.join(addr(2), "bob"));
        let media = Datagram::Media(vec![0; 100]);
        assert_eq!((0..100).filter(|_| !f.send(addr(1), &media).is_empty()).count(), 20);
        // Joining again, from the same address or a new one, at once.
        assert!(f.join(addr(1), "alice"));
        assert!(f.send(addr(1), &media).is_empty(), "still over its rate after a second Prove");
        assert!(f.join(addr(7), "alice"));
        assert!(f.send(addr(7), &media).is_empty(), "still over its rate from a new address");
    }

    #[test]
    fn a_rejoin_from_a_new_address_replaces_the_old_session_and_idle_ones_go() {
        let mut f = Fixture::new(RelayLimits::default());
        assert!(f.join(addr(1), "alice"));
        assert!(f.join(addr(2), "bob"));
        assert!(f.join(addr(5), "bob"));
        let media = Datagram::Media(vec![1]);
        assert_eq!(f.send(addr(1), &media), vec![(addr(5), media.clone())]);
        f.now += Duration::from_secs(31);
        f.relay.sweep(f.now);
        assert!(f.send(addr(1), &media).is_empty());
    }

    #[test]
    fn one_device_and_one_source_hold_only_their_share_of_the_sessions() {
        let limits = RelayLimits { max_sessions_per_device: 2, max_sessions_per_source: 3, ..RelayLimits::default() };
        let mut f = Fixture::new(limits);
        let call = |n: u8| ConversationId([n; 16]);
        let host_a = |port: u16| SocketAddr::from(([10, 0, 0, 1], port));
        let host_b = |port: u16| SocketAddr::from(([10, 0, 0, 2], port));
        // One device in many calls: two at once.
        assert!(f.join_call(host_a(1), "alice", call(1)));
        assert!(f.join_call(host_b(1), "alice", call(2)));
        assert!(!f.join_call(host_b(2), "alice", call(3)), "a third call of one device");
        // One source with many devices: three sessions at once.
        assert!(f.join_call(host_a(2), "bob", call(1)));
        assert!(f.join_call(host_a(3), "carol", call(1)));
        assert!(!f.join_call(host_a(4), "dave", call(1)), "a fourth session from one address");
        assert!(f.join_call(host_b(4), "dave", call(1)), "another address is not affected");
        // Proving again from an address already counted is not refused.
        assert!(f.join_call(host_a(3), "carol", call(1)));
        // Leaving frees the device's and the source's place.
        assert!(f.send(host_a(1), &Datagram::Leave).is_empty());
        assert!(f.join_call(host_a(5), "alice", call(3)));
        // An IPv6 host's /64 counts as one source; another /64 does not.
        let v6 = |net: u16, host: u16| SocketAddr::from(([0x2001, 0xdb8, 0, net, 0, 0, 0, host], 4000));
        for (i, name) in ["vsix1", "vsix2", "vsix3"].iter().enumerate() {
            assert!(f.join_call(v6(1, i as u16 + 1), name, call(4)));
        }
        assert!(!f.join_call(v6(1, 9), "vsix4", call(4)), "the same /64");
        assert!(f.join_call(v6(2, 9), "vsix4", call(4)), "another /64");
        // Idle sessions go, and with them their counts.
        f.now += Duration::from_secs(31);
        f.relay.sweep(f.now);
        assert!(f.relay.per_source.is_empty() && f.relay.per_device.is_empty());
        assert!(f.join_call(host_a(6), "alice", call(5)));
    }

    #[test]
    fn a_call_socket_joins_with_its_token_alone_and_shares_the_call_with_udp() {
        let mut f = Fixture::new(RelayLimits::default());
        assert!(f.join(addr(1), "alice"));
        let sock = Peer::Socket { id: 7, ip: std::net::IpAddr::from([10, 0, 0, 9]) };
        // A bad token gets nothing; a Prove means nothing on a socket.
        let mut forged = f.issuer.mint(&f.call, &device("bob"), 2000);
        forged.0[4] ^= 1;
        assert!(f.send_as(sock, &Datagram::Join(forged)).is_empty());
        let token = f.issuer.mint(&f.call, &device("bob"), 2000);
        assert!(f.send_as(sock, &Datagram::Prove { cookie: [0; COOKIE_LEN], token }).is_empty());
        assert_eq!(f.relay.counters().joined, 1);
        // A good one joins at once, without a cookie round trip.
        assert_eq!(f.send_as(sock, &Datagram::Join(token)), vec![(sock, Datagram::Joined)]);
        let media = Datagram::Media(b"sframe".to_vec());
        assert_eq!(f.send(addr(1), &media).len(), 1);
        assert_eq!(f.send_as(Peer::Udp(addr(1)), &media), vec![(sock, media.clone())]);
        assert_eq!(f.send_as(sock, &media), vec![(Peer::Udp(addr(1)), media.clone())]);
        // Closed: its session goes, and nothing more is sent to it.
        f.relay.disconnect(&sock);
        assert!(f.send_as(Peer::Udp(addr(1)), &media).is_empty());
        assert!(f.send_as(sock, &media).is_empty());
    }
}

//! Connection-level defences, below HTTP: a cap on open connections per
//! client address, and an idle timeout on every accepted socket.
//!
//! A slowloris client opens many sockets and trickles bytes into each, so
//! that the server holds them forever. Three limits close that, each cheap:
//! hyper's header-read timeout ends a request whose headers do not arrive in
//! time (set where the server is built), [`GuardAcceptor`] refuses a
//! connection beyond [`Limits::max_connections_per_ip`] from one address,
//! and [`Guarded`] closes a socket on which no byte moved either way for
//! [`Limits::idle_timeout`] (an idle keep-alive connection, a half-sent
//! body). WebSockets stay open: the server pings each one every 20 s and the
//! client's pong is traffic. Trusted reverse proxies are exempt from the
//! per-address cap (every user behind them shares their address); the
//! client address they forward is what [`client_ip`] reads for rate limits.
//!
//! Concurrency: the per-address counts are one `Mutex<HashMap>` taken once
//! when a connection is accepted and once when it closes.

use std::collections::HashMap;
use std::future::{ready, Future, Ready};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::HeaderMap;
use axum_server::accept::Accept;
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::Limits;

/// Whether `ip` is one of the configured reverse proxies.
pub fn is_trusted_proxy(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|net| net.contains(&ip))
}

/// An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`, what a dual-stack
/// socket reports) as the IPv4 address, so caps and proxy lists see one
/// address, not two.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The key per-address limits count under: an IPv4 address as it is, an
/// IPv6 address by its /64 (one host or home usually holds a whole /64, and
/// would otherwise get 2^64 fresh buckets and connection caps).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// The address a request came from, for per-address rate limits: the peer,
/// or, when the peer is a trusted proxy, the last address in
/// `X-Forwarded-For` (else `Forwarded: for=`) that is not itself a trusted
/// proxy. Headers from any other peer are ignored, so a client cannot pick
/// its own bucket.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted_proxy(peer, trusted) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(text) = value.to_str() else { continue };
        hops.extend(text.split(',').filter_map(|h| parse_hop(h.trim())));
    }
    if hops.is_empty() {
        for value in headers.get_all("forwarded") {
            let Ok(text) = value.to_str() else { continue };
            for element in text.split(',') {
                for pair in element.split(';') {
                    let pair = pair.trim();
                    if pair.len() > 4 && pair[..4].eq_ignore_ascii_case("for=") {
                        if let Some(ip) = parse_hop(pair[4..].trim_matches('"')) {
                            hops.push(ip);
                        }
                    }
                }
            }
        }
    }
    // Walk back from the proxy nearest to us: the first hop that is not a
    // trusted proxy is the client as far as anyone we trust can say.
    hops.into_iter().rev().map(canonical).find(|ip| !is_trusted_proxy(*ip, trusted)).unwrap_or(peer)
}

/// One hop of a forwarding header: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`
/// or `[2001:db8::1]:5678`.
fn parse_hop(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split(']').next().and_then(|h| h.parse().ok());
    }
    text.rsplit_once(':').and_then(|(host, _port)| host.parse::<std::net::Ipv4Addr>().ok()).map(IpAddr::V4)
}

/// Counts open connections per client address.
#[derive(Debug, Default)]
struct Counts(Mutex<HashMap<IpAddr, usize>>);

impl Counts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // A poisoned map is still a consistent map of counts.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One counted connection; gives its place back when dropped.
#[derive(Debug)]
struct Slot {
    counts: Arc<Counts>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.counts.lock();
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Counts one open connection in the metrics while it lives.
#[derive(Debug)]
struct OpenConnection(crate::metrics::SharedMetrics);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Accepts a TCP connection unless its address already holds
/// [`Limits::max_connections_per_ip`] (trusted proxies exempt), and wraps it
/// in [`Guarded`]. Runs before TLS, so a refused connection costs no
/// handshake.
#[derive(Debug, Clone)]
pub struct GuardAcceptor {
    counts: Arc<Counts>,
    metrics: crate::metrics::SharedMetrics,
    max_per_ip: usize,
    idle: Duration,
    trusted: Arc<Vec<IpNet>>,
}

impl GuardAcceptor {
    /// An acceptor enforcing `limits`.
    pub fn new(limits: &Limits, metrics: crate::metrics::SharedMetrics) -> Self {
        GuardAcceptor {
            counts: Arc::default(),
            metrics,
            max_per_ip: limits.max_connections_per_ip,
            idle: limits.idle_timeout,
            trusted: Arc::new(limits.trusted_proxies.clone()),
        }
    }

    fn reserve(&self, ip: IpAddr) -> Option<Slot> {
        let mut map = self.counts.lock();
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return None;
        }
        *n += 1;
        Some(Slot { counts: Arc::clone(&self.counts), ip })
    }
}

impl<S> Accept<TcpStream, S> for GuardAcceptor {
    type Stream = Guarded;
    type Service = S;
    type Future = Ready<io::Result<(Guarded, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let ip = match stream.peer_addr() {
            Ok(a) => canonical(a.ip()),
            Err(e) => return ready(Err(e)),
        };
        let slot = if is_trusted_proxy(ip, &self.trusted) {
            None
        } else {
            match self.reserve(limit_key(ip)) {
                Some(slot) => Some(slot),
                None => {
                    self.metrics.connections_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!("connection refused: too many open from one address");
                    return ready(Err(io::Error::other("too many connections from this address")));
                }
            }
        };
        ready(Ok((Guarded::new(stream, slot, self.idle, &self.metrics), service)))
    }
}

/// A TCP stream that fails with `TimedOut` once no byte moved in either
/// direction for its idle timeout, and that holds its address's slot.
#[derive(Debug)]
pub struct Guarded {
    inner: TcpStream,
    _slot: Option<Slot>,
    _open: OpenConnection,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Guarded {
    fn new(inner: TcpStream, slot: Option<Slot>, idle: Duration, metrics: &crate::metrics::SharedMetrics) -> Self {
        metrics.connections_open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics.connections_accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let open = OpenConnection(Arc::clone(metrics));
        Guarded { inner, _slot: slot, _open: open, idle, deadline: Box::pin(tokio::time::sleep(idle)) }
    }

    fn touch(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
    }

    /// Bytes written count as activity; a write that cannot go on counts
    /// towards the idle timeout like a read that waits.
    fn after_write(&mut self, cx: &mut Context<'_>, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }

    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "connection idle")),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, data);
        self.after_write(cx, written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let trusted = nets(&["10.0.0.0/8", "::1/128"]);
        let client: IpAddr = "203.0.113.7".parse().expect("ip");
        let proxy: IpAddr = "10.1.2.3".parse().expect("ip");
        let stranger: IpAddr = "198.51.100.1".parse().expect("ip");
        let xff = headers(&[("x-forwarded-for", "192.0.2.66, 203.0.113.7")]);
        assert_eq!(client_ip(proxy, &xff, &trusted), client);
        // A client that is not a proxy cannot choose its bucket.
        assert_eq!(client_ip(stranger, &xff, &trusted), stranger);
        // Through two trusted proxies: the first untrusted hop from the right.
        let chain = headers(&[("x-forwarded-for", "203.0.113.7, 10.9.9.9")]);
        assert_eq!(client_ip(proxy, &chain, &trusted), client);
        // RFC 7239, quoted IPv6 with a port, and a v4 with a port.
        let fwd = headers(&[("forwarded", "for=\"[2001:db8::5]:4711\";proto=https")]);
        assert_eq!(client_ip(proxy, &fwd, &trusted), "2001:db8::5".parse::<IpAddr>().expect("ip"));
        let port = headers(&[("x-forwarded-for", "203.0.113.7:5555")]);
        assert_eq!(client_ip(proxy, &port, &trusted), client);
        // Junk or nothing forwarded: the proxy's own address.
        assert_eq!(client_ip(proxy, &headers(&[("x-forwarded-for", "not an ip")]), &trusted), proxy);
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
        // A v4-mapped peer is the v4 address.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert_eq!(client_ip(mapped, &xff, &trusted), client);
        assert!(!is_trusted_proxy(client, &trusted));
        assert!(is_trusted_proxy("::1".parse().expect("ip"), &trusted));
    }

    #[test]
    fn ipv6_clients_count_per_64_and_ipv4_per_address() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(limit_key(a), limit_key(b), "one /64 is one client");
        assert_ne!(limit_key(a), limit_key(other));
        let v4: IpAddr = "203.0.113.7".parse().expect("ip");
        assert_eq!(limit_key(v4), v4);
        assert_eq!(limit_key("::ffff:203.0.113.7".parse().expect("ip")), v4);
        let limits = Limits { max_connections_per_ip: 1, ..Limits::default() };
        let acceptor = GuardAcceptor::new(&limits, Default::default());
        let _held = acceptor.reserve(limit_key(a)).expect("first");
        assert!(acceptor.reserve(limit_key(b)).is_none(), "a second address of the same /64 shares the cap");
    }

    #[test]
    fn slots_are_capped_per_address_and_given_back() {
        let limits = Limits { max_connections_per_ip: 2, ..Limits::default() };
        let acceptor = GuardAcceptor::new(&limits, Default::default());
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let first = acceptor.reserve(a).expect("first");
        let second = acceptor.reserve(a).expect("second");
        assert!(acceptor.reserve(a).is_none(), "a third from one address is refused");
        assert!(acceptor.reserve(b).is_some(), "another address is not affected");
        drop(first);
        let third = acceptor.reserve(a).expect("a slot came back");
        drop((second, third));
        assert!(acceptor.counts.lock().is_empty(), "closed connections leave nothing behind");
    }
}

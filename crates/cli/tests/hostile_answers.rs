//! What a server (or anything answering in its place) says cannot steer
//! the client: a redirect is not followed, so the signed request and its
//! body reach no third party (HTTP and WebSocket), and an answer of any
//! size is cut off at the client's limit instead of filling its memory.
//!
//! The stand-in is a raw TCP listener written here: it forwards to a real
//! server until told to answer a redirect or an endless body.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_clean_error, stderr, texts, Server, User};

const FORWARD: usize = 0;
const REDIRECT: usize = 1;
const REDIRECT_WS: usize = 2;
const HUGE_SIZED: usize = 3;
const HUGE_UNSIZED: usize = 4;

/// A listener that counts connections and answers nothing useful: where a
/// redirect points.
fn third_party() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let hits = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&hits);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            h.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    (url, hits)
}

struct Fake {
    url: String,
    mode: Arc<AtomicUsize>,
    /// Body bytes written by the last endless answer before the client hung up.
    streamed: Arc<AtomicUsize>,
}

fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&b[..n]);
    }
    Some(head)
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut b = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut b) {
        if n == 0 || to.write_all(&b[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

fn fake(upstream: &str, third: &str) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let upstream = upstream.trim_start_matches("http://").to_string();
    let third = third.to_string();
    let mode = Arc::new(AtomicUsize::new(FORWARD));
    let streamed = Arc::new(AtomicUsize::new(0));
    let (m, st) = (Arc::clone(&mode), Arc::clone(&streamed));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let (mode, streamed, upstream, third) =
                (m.load(Ordering::SeqCst), Arc::clone(&st), upstream.clone(), third.clone());
            std::thread::spawn(move || {
                let Some(head) = read_head(&mut client) else { return };
                let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
                let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                let redirect = mode == REDIRECT || (mode == REDIRECT_WS && path.starts_with("/v1/ws"));
                if redirect {
                    let answer = format!(
                        "HTTP/1.1 307 Temporary Redirect\r\nlocation: {third}{path}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = client.write_all(answer.as_bytes());
                } else if mode == HUGE_SIZED || mode == HUGE_UNSIZED {
                    let head = if mode == HUGE_SIZED {
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1073741824\r\n\r\n"
                    } else {
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
                    };
                    let _ = client.write_all(head.as_bytes());
                    let chunk = vec![b' '; 64 * 1024];
                    let mut sent = 0usize;
                    while sent < 1 << 30 && client.write_all(&chunk).is_ok() {
                        sent += chunk.len();
                        streamed.store(sent, Ordering::SeqCst);
                    }
                } else {
                    let Ok(mut server) = TcpStream::connect(&upstream) else { return };
                    if server.write_all(&head).is_err() {
                        return;
                    }
                    let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                    std::thread::spawn(move || pipe(c2, s2));
                    pipe(server, client);
                }
            });
        }
    });
    Fake { url, mode, streamed }
}

#[test]
fn redirects_are_not_followed_and_answers_are_bounded() {
    let server = Server::start();
    let (third, hits) = third_party();
    let fake = fake(&server.url, &third);
    let alice = User { name: "alice".into(), dir: tempfile::tempdir().expect("tempdir") };
    let out = alice.run(&["register", "alice", "--server", &fake.url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bob = User::register(&server, "bob");
    bob.send("alice", "hi");

    // A signed request answered with a redirect: an error, and nothing
    // reaches the third party.
    fake.mode.store(REDIRECT, Ordering::SeqCst);
    let out = alice.run(&["receive"]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(hits.load(Ordering::SeqCst), 0, "a redirect was followed to the third party");
    assert_clean_error(&out, "redirect");
    let out = alice.run(&["devices"]);
    assert_clean_error(&out, "redirect");
    // Registering somewhere that redirects: the same.
    let carol = User { name: "carol".into(), dir: tempfile::tempdir().expect("tempdir") };
    assert_clean_error(&carol.run(&["register", "carol", "--server", &fake.url]), "redirect");

    // The WebSocket: HTTP goes through, the upgrade is redirected.
    fake.mode.store(FORWARD, Ordering::SeqCst);
    assert_eq!(texts(&alice.receive_json(&[])), ["hi"]);
    fake.mode.store(REDIRECT_WS, Ordering::SeqCst);
    let out = alice.run(&["receive", "--timeout", "5"]);
    assert_clean_error(&out, "redirect");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(hits.load(Ordering::SeqCst), 0, "a redirect was followed to the third party");

    // Endless answers, announced or not: cut off at the limit.
    for mode in [HUGE_SIZED, HUGE_UNSIZED] {
        fake.mode.store(mode, Ordering::SeqCst);
        fake.streamed.store(0, Ordering::SeqCst);
        let started = Instant::now();
        let out = alice.run(&["receive"]);
        assert_clean_error(&out, "over 16 MiB");
        std::thread::sleep(Duration::from_millis(200));
        let streamed = fake.streamed.load(Ordering::SeqCst);
        assert!(streamed < 64 << 20, "mode {mode}: the client read {streamed} bytes of an endless answer");
        eprintln!("mode {mode}: gave up after {streamed} bytes streamed, in {:?}", started.elapsed());
    }

    // And all is well once the real server answers again.
    fake.mode.store(FORWARD, Ordering::SeqCst);
    alice.ok(&["receive"]);
}

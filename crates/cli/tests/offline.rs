//! Offline-first sending: a send to an existing conversation while the
//! server is unreachable is queued (exit 75), shown as queued, and sent
//! exactly once by the next command; a refusal is exit 1 or, for a queued
//! message, state `failed`; a lost answer is re-posted byte for byte; and a
//! script that re-sends only what exited 1 neither loses nor duplicates a
//! message while the server is SIGKILLed under it.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{exit_code, parse_json_lines, stderr, texts, wait_until, Server, User, EXIT_PENDING};

const QUEUED_LINE: &str = "queued: not yet on the server; the next subrosa command sends it";

/// The outgoing message with this text in `who`'s history with `target`.
fn own_message(who: &User, target: &str, text: &str) -> serde_json::Value {
    let h = who.history_json(target);
    let mine: Vec<_> = h.into_iter().filter(|m| m["outgoing"] == true && m["text"] == text).collect();
    assert_eq!(mine.len(), 1, "{text:?} once in {}'s history: {mine:?}", who.name);
    mine.into_iter().next().unwrap()
}

/// Whether a message's state says the server has it: `sent`, or already
/// `delivered` or `read` when the recipient's receipt came back.
fn on_server(state: &serde_json::Value) -> bool {
    ["sent", "delivered", "read"].iter().any(|s| state == s)
}

/// Everything `who` receives until a receive brings nothing new.
fn receive_all(who: &User) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    loop {
        let got = who.receive_json(&[]);
        if got.is_empty() {
            return all;
        }
        all.extend(got);
    }
}

#[test]
fn a_send_while_the_server_is_down_is_queued_and_the_next_command_sends_it_once() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    User::register(&server, "carol");
    alice.send("bob", "before");
    assert_eq!(texts(&bob.receive_json(&[])), ["before"]);

    server.kill();
    let started = Instant::now();
    let out = alice.run(&["send", "bob", "while the server is down"]);
    let took = started.elapsed();
    assert_eq!(exit_code(&out), EXIT_PENDING, "queued: exit 75; stderr {}", stderr(&out));
    assert_eq!(stderr(&out).trim_end(), QUEUED_LINE);
    assert!(out.stdout.is_empty(), "nothing on stdout: {:?}", String::from_utf8_lossy(&out.stdout));
    eprintln!("figure: a send that queues with the server down (connection refused) took {took:?}");

    // Commands that need no server do not wait for one.
    let m = own_message(&alice, "bob", "while the server is down");
    assert_eq!(m["state"], "queued");
    let plain = alice.ok(&["history", "bob"]);
    let line = plain.lines().find(|l| l.contains("while the server is down")).expect("in plain history");
    assert!(line.contains("[queued"), "plain history shows it queued: {line:?}");
    alice.ok(&["contacts"]);
    alice.ok(&["groups"]);
    alice.ok(&["members", "bob"]);
    alice.ok(&["safety-number", "bob"]);

    // A first message to someone new needs their keys: refused, nothing kept.
    let out = alice.run(&["send", "carol", "hello carol"]);
    assert_eq!(exit_code(&out), 1, "stderr {}", stderr(&out));
    assert!(stderr(&out).contains("needs the server"), "{}", stderr(&out));
    assert!(!alice.run(&["history", "carol"]).status.success(), "no conversation with carol was made");

    server.restart_with(&[]);
    // The next command that reaches the server sends it.
    alice.ok(&["receive"]);
    assert_eq!(own_message(&alice, "bob", "while the server is down")["state"], "sent");
    let got = receive_all(&bob);
    assert_eq!(texts(&got), ["while the server is down"]);
    assert_eq!(got[0]["id"], m["id"], "the message id it was queued under");
    // Never again.
    alice.ok(&["receive"]);
    alice.send("bob", "after");
    assert_eq!(texts(&receive_all(&bob)), ["after"]);
    // alice fetches bob's delivery receipts: nothing is left.
    alice.ok(&["receive"]);
    assert_eq!(server.count("messages"), 0);
}

#[test]
fn a_queued_message_the_server_refuses_is_marked_failed_and_a_refused_send_exits_1() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "g", "bob", "carol"]);
    bob.ok(&["receive"]);
    carol.ok(&["receive"]);

    server.kill();
    let out = alice.run(&["send", "g", "queued, then refused"]);
    assert_eq!(exit_code(&out), EXIT_PENDING, "stderr {}", stderr(&out));

    // Back, but refusing sends to more than one device (413 too_large).
    server.restart_with(&["--max-recipients", "1"]);
    let out = alice.run(&["receive"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("was refused by the server and not sent") && err.contains("recipients"),
        "the flushing command says so: {err}"
    );
    let m = own_message(&alice, "g", "queued, then refused");
    assert_eq!(m["state"], "failed");
    assert!(m["reason"].as_str().unwrap_or_default().contains("recipients"), "{m}");
    let plain = alice.ok(&["history", "g"]);
    assert!(plain.lines().any(|l| l.contains("queued, then refused") && l.contains("[failed: ")), "{plain}");

    // A send the server refuses outright: its error, exit 1, nothing queued.
    let out = alice.run(&["send", "g", "refused at once"]);
    assert_eq!(exit_code(&out), 1, "stderr {}", stderr(&out));
    assert!(stderr(&out).starts_with("error: ") && stderr(&out).contains("recipients"), "{}", stderr(&out));
    assert_eq!(own_message(&alice, "g", "refused at once")["state"], "failed");

    // Nothing of either is sent later.
    server.kill();
    server.restart_with(&[]);
    let out = alice.run(&["receive"]);
    assert!(out.status.success() && stderr(&out).is_empty(), "{}", stderr(&out));
    alice.send("g", "fine again");
    assert_eq!(texts(&receive_all(&bob)), ["fine again"]);
    assert_eq!(texts(&receive_all(&carol)), ["fine again"]);
}

#[test]
fn a_running_follow_sends_what_was_queued_once_the_server_is_back() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "before");
    bob.ok(&["receive"]);
    let mut follow = alice
        .cmd(&["receive", "--follow", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("follow starts");
    std::thread::sleep(Duration::from_millis(500));
    server.kill();
    let out = alice.run(&["send", "bob", "queued for follow"]);
    assert_eq!(exit_code(&out), EXIT_PENDING, "stderr {}", stderr(&out));
    server.restart_with(&[]);
    // follow reconnects (backoff up to 10 s) and flushes the outbox.
    let mut got = Vec::new();
    let delivered = wait_until(Duration::from_secs(30), || {
        got.extend(bob.receive_json(&[]));
        !got.is_empty()
    });
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(delivered, "the running follow sent the queued message");
    assert_eq!(texts(&got), ["queued for follow"]);
    assert!(on_server(&own_message(&alice, "bob", "queued for follow")["state"]));
    assert!(receive_all(&bob).is_empty());
}

/// A TCP proxy in front of a server. While `eat` is set, the answer to the
/// next `POST /v1/messages` is thrown away with its connection: the server
/// stored the send, the client never hears of it.
struct AnswerEater {
    url: String,
    eat: Arc<AtomicBool>,
    /// While set, every connection is closed at once: the server is
    /// unreachable for whoever talks through the proxy.
    down: Arc<AtomicBool>,
    /// While set, connections are accepted and never answered: a hung server.
    hang: Arc<AtomicBool>,
}

fn answer_eater(upstream: &str) -> AnswerEater {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let target = upstream.trim_start_matches("http://").to_string();
    let eat = Arc::new(AtomicBool::new(false));
    let down = Arc::new(AtomicBool::new(false));
    let hang = Arc::new(AtomicBool::new(false));
    let (eating, is_down, hung) = (Arc::clone(&eat), Arc::clone(&down), Arc::clone(&hang));
    let mut held = Vec::new();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            if is_down.load(Ordering::SeqCst) {
                drop(client);
                continue;
            }
            if hung.load(Ordering::SeqCst) {
                held.push(client); // read nothing, answer nothing, close nothing
                continue;
            }
            let (Ok(client), Ok(server)) = (client, TcpStream::connect(&target)) else { continue };
            let sending = Arc::new(AtomicBool::new(false));
            let (mut from_client, mut to_server) =
                (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
            let flag = Arc::clone(&sending);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = from_client.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let chunk = &buf[..n];
                    if chunk.starts_with(b"POST /v1/messages ") {
                        flag.store(true, Ordering::SeqCst);
                    } else if [&b"GET "[..], b"POST ", b"PUT ", b"DELETE "].iter().any(|m| chunk.starts_with(m)) {
                        flag.store(false, Ordering::SeqCst);
                    }
                    if to_server.write_all(chunk).is_err() {
                        break;
                    }
                }
                let _ = to_server.shutdown(Shutdown::Both);
            });
            let eat = Arc::clone(&eating);
            std::thread::spawn(move || {
                let (mut from_server, mut to_client) = (server, client);
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = from_server.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if sending.load(Ordering::SeqCst) && eat.swap(false, Ordering::SeqCst) {
                        break; // the answer is lost
                    }
                    if to_client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to_client.shutdown(Shutdown::Both);
                let _ = from_server.shutdown(Shutdown::Both);
            });
        }
    });
    AnswerEater { url, eat, down, hang }
}

/// Registers `name` with the server behind `proxy`.
fn register_via(proxy: &AnswerEater, name: &str) -> User {
    let u = User { name: name.into(), dir: tempfile::tempdir().expect("tempdir") };
    let out = u.run(&["register", name, "--server", &proxy.url]);
    assert!(out.status.success(), "{}", stderr(&out));
    u
}

/// alice (behind a proxy that can cut her off), bob and carol in group `g`,
/// everyone up to date; then alice is cut off and her send of `text` is
/// queued (exit 75).
fn group_with_alice_cut_off(text: &str) -> (Server, AnswerEater, User, User, User) {
    let server = Server::start();
    let proxy = answer_eater(&server.url);
    let alice = register_via(&proxy, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "g", "bob", "carol"]);
    bob.ok(&["receive"]);
    carol.ok(&["receive"]);
    proxy.down.store(true, Ordering::SeqCst);
    let out = alice.run(&["send", "g", text]);
    assert_eq!(exit_code(&out), EXIT_PENDING, "stderr {}", stderr(&out));
    (server, proxy, alice, bob, carol)
}

#[test]
fn a_queued_message_is_encrypted_after_the_removal_it_missed() {
    // alice is cut off and writes to the group; meanwhile bob removes carol.
    let (server, proxy, alice, bob, carol) = group_with_alice_cut_off("not for carol");
    bob.ok(&["group", "remove", "g", "carol"]);
    proxy.down.store(false, Ordering::SeqCst);

    // alice's next command processes the removal first, then encrypts.
    alice.ok(&["receive"]);
    assert_eq!(own_message(&alice, "g", "not for carol")["state"], "sent");
    assert_eq!(texts(&receive_all(&bob)), ["not for carol"]);
    let carol_got = receive_all(&carol);
    assert!(
        !texts(&carol_got).iter().any(|t| t == "not for carol"),
        "the removed member got the queued message: {carol_got:?}"
    );
    assert!(!carol.ok(&["history", "g"]).contains("not for carol"));
    // alice fetches bob's delivery receipt: nothing is left.
    alice.ok(&["receive"]);
    assert_eq!(server.count("messages"), 0, "nothing is left addressed to carol either");
}

#[test]
fn a_send_whose_answer_was_lost_exits_75_and_is_posted_again_byte_for_byte() {
    let server = Server::start();
    let proxy = answer_eater(&server.url);
    let alice = register_via(&proxy, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "first");
    assert_eq!(texts(&bob.receive_json(&[])), ["first"]);
    alice.ok(&["receive"]); // bob's delivery receipt
    assert_eq!(server.count("messages"), 0);

    proxy.eat.store(true, Ordering::SeqCst);
    let out = alice.run(&["send", "bob", "its answer is lost"]);
    assert!(!proxy.hang.load(Ordering::SeqCst));
    assert!(!proxy.eat.load(Ordering::SeqCst), "an answer was thrown away");
    assert_eq!(exit_code(&out), EXIT_PENDING, "stored on the server, unanswered: not exit 1; stderr {}", stderr(&out));
    assert_eq!(stderr(&out).trim_end(), QUEUED_LINE);
    assert_eq!(server.count("messages"), 1, "the server stored it");
    assert_eq!(own_message(&alice, "bob", "its answer is lost")["state"], "queued");

    // The next command posts the same request again: the server keeps one.
    alice.ok(&["receive"]);
    assert_eq!(server.count("messages"), 1, "the retry carried the same send id and bytes");
    assert_eq!(own_message(&alice, "bob", "its answer is lost")["state"], "sent");
    assert_eq!(texts(&receive_all(&bob)), ["its answer is lost"]);
}

/// How many messages the script sends; the server is SIGKILLed three times
/// meanwhile, each time down for a moment.
const STREAM: usize = 36;

#[test]
fn a_script_resending_only_exit_1_loses_and_duplicates_nothing_across_sigkills() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    bob.ok(&["receive"]);

    let attempts = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let killer = {
        let (attempts, done) = (Arc::clone(&attempts), Arc::clone(&done));
        let mut server = server;
        std::thread::spawn(move || {
            let mut kills = 0;
            for at in [STREAM / 4, STREAM / 2, 3 * STREAM / 4] {
                while attempts.load(Ordering::SeqCst) < at && !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Somewhere inside the send that is running now.
                std::thread::sleep(Duration::from_millis(rand_ms(80)));
                server.kill();
                kills += 1;
                std::thread::sleep(Duration::from_millis(300));
                server.restart_with(&[]);
            }
            (server, kills)
        })
    };

    let mut codes: HashMap<i32, usize> = HashMap::new();
    for i in 0..STREAM {
        let text = format!("stream-{i:03}");
        loop {
            attempts.fetch_add(1, Ordering::SeqCst);
            let out = alice.run(&["send", "bob", &text]);
            *codes.entry(exit_code(&out)).or_default() += 1;
            match exit_code(&out) {
                0 | 75 => break,
                1 => std::thread::sleep(Duration::from_millis(100)), // refused: send it again
                other => panic!("send exited {other}: {}", stderr(&out)),
            }
        }
    }
    done.store(true, Ordering::SeqCst);
    let (server, kills) = killer.join().expect("killer");
    assert_eq!(kills, 3);

    // Whatever is still queued goes with the next commands.
    let drained = wait_until(Duration::from_secs(30), || {
        let out = alice.run(&["receive"]);
        out.status.success()
            && !alice.history_json("bob").iter().any(|m| m["outgoing"] == true && !on_server(&m["state"]))
    });
    assert!(drained, "alice's outbox drained");
    let mut got = Vec::new();
    assert!(wait_until(Duration::from_secs(30), || {
        got.extend(bob.receive_json(&[]));
        got.iter().filter(|m| m["text"].as_str().is_some_and(|t| t.starts_with("stream-"))).count() >= STREAM
    }));
    got.extend(receive_all(&bob));

    let mut by_text: HashMap<String, usize> = HashMap::new();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for m in &got {
        *by_text.entry(m["text"].as_str().unwrap_or_default().to_string()).or_default() += 1;
        *by_id.entry(m["id"].as_str().unwrap_or_default().to_string()).or_default() += 1;
    }
    for i in 0..STREAM {
        let t = format!("stream-{i:03}");
        assert_eq!(by_text.get(&t), Some(&1), "{t} received exactly once: {by_text:?}");
    }
    assert!(by_id.values().all(|&n| n == 1), "each message id once");
    assert_eq!(got.len(), STREAM);
    let sent: Vec<_> = alice.history_json("bob").into_iter().filter(|m| m["outgoing"] == true).collect();
    assert_eq!(sent.len(), STREAM + 1, "alice's history holds each once");
    eprintln!("exit codes over {STREAM} messages with {kills} SIGKILLs: {codes:?}");
    drop(server);
}

fn rand_ms(max: u64) -> u64 {
    common::rand_token() % max
}

#[test]
fn history_json_is_parseable_line_per_message() {
    // The state field is only on outgoing messages.
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hi");
    bob.send("alice", "hello");
    alice.ok(&["receive"]);
    let h = parse_json_lines(&alice.ok(&["history", "bob", "--json"]));
    let states: Vec<_> = h.iter().map(|m| (m["text"].as_str().unwrap_or_default(), m.get("state").cloned())).collect();
    // bob's send caught up first: his device stored "hi" and told alice's.
    assert_eq!(states, [("hi", Some(serde_json::json!("delivered"))), ("hello", None)]);
}

/// Copies a directory tree (a fixture home) into `to`.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_tree(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn a_home_of_the_first_wave_migrates_and_its_sent_messages_read_as_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("alice");
    copy_tree(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/sqlite/alice"), &home);
    let out = std::process::Command::new(common::subrosa_bin())
        .arg("--home")
        .arg(&home)
        .args(["history", "bob", "--json"])
        .env("SUBROSA_PASSPHRASE", "fixture passphrase")
        .env("SUBROSA_KEY_CACHE", "off")
        .env_remove("SUBROSA_HOME")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    let h = parse_json_lines(&String::from_utf8_lossy(&out.stdout));
    let states: Vec<_> = h.iter().map(|m| (m["outgoing"] == true, m.get("state").cloned())).collect();
    assert_eq!(states, [(true, Some(serde_json::json!("sent"))), (false, None)]);
}

#[test]
fn a_send_to_a_hung_server_queues_after_the_read_timeout() {
    let server = Server::start();
    let proxy = answer_eater(&server.url);
    let alice = register_via(&proxy, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "first");
    bob.ok(&["receive"]);

    proxy.hang.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let out = alice.run(&["send", "bob", "to a hung server"]);
    let took = started.elapsed();
    assert_eq!(exit_code(&out), EXIT_PENDING, "stderr {}", stderr(&out));
    eprintln!("figure: a send that queues with a server that accepts and never answers took {took:?}");
    assert!(took < Duration::from_secs(50), "waited for the whole request timeout: {took:?}");

    proxy.hang.store(false, Ordering::SeqCst);
    alice.ok(&["receive"]);
    assert_eq!(texts(&receive_all(&bob)), ["to a hung server"]);
}

#[test]
fn a_queued_message_to_a_group_this_device_was_removed_from_fails_and_reaches_nobody() {
    let (server, proxy, alice, bob, carol) = group_with_alice_cut_off("too late");
    bob.ok(&["group", "remove", "g", "alice"]);
    proxy.down.store(false, Ordering::SeqCst);

    let out = alice.run(&["receive"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("no longer a member"), "{}", stderr(&out));
    let m = own_message(&alice, "g", "too late");
    assert_eq!(m["state"], "failed");
    for who in [&bob, &carol] {
        assert!(!texts(&receive_all(who)).iter().any(|t| t == "too late"), "{} got it", who.name);
    }
    assert_eq!(server.count("messages"), 0);
}

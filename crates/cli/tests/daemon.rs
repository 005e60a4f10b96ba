//! `subrosa daemon`: JSON-RPC 2.0 for scripts and bots, against a real
//! server, with a bot in Python (standard library only) on the socket.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A running `subrosa daemon` on a user's home.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(user: &User) -> Daemon {
        let mut child =
            user.cmd(&["daemon"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("daemon starts");
        let mut err = BufReader::new(child.stderr.take().expect("stderr"));
        let mut first = String::new();
        err.read_line(&mut first).expect("the daemon says where it listens");
        let socket = first
            .trim()
            .strip_prefix("subrosa daemon: listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .into();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = err.read_to_string(&mut rest);
            eprint!("{rest}");
        });
        Daemon { child, socket }
    }

    fn connect(&self) -> Rpc<BufReader<UnixStream>, UnixStream> {
        let stream = UnixStream::connect(&self.socket).expect("connect to the daemon");
        stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        Rpc { read: BufReader::new(stream.try_clone().expect("clone")), write: stream, next: 0, seen: Vec::new() }
    }

    /// SIGKILL: no chance to tidy up.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn history_texts<R: BufRead, W: Write>(rpc: &mut Rpc<R, W>, who: &str) -> Vec<String> {
    let a = rpc.call_raw("history", json!({ "recipient": who }));
    a["result"].as_array().map(|v| texts(v)).unwrap_or_default()
}

/// Waits until `user`'s daemon has stored `text` from `from`.
fn wait_stored<R: BufRead, W: Write>(rpc: &mut Rpc<R, W>, from: &str, text: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || history_texts(rpc, from).iter().any(|t| t == text)),
        "the daemon never stored {text:?}"
    );
}

const BOT: &str = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect(sys.argv[1])
f = s.makefile("rwb")

def send(obj):
    f.write((json.dumps(obj) + "\n").encode())
    f.flush()

def read():
    line = f.readline()
    if not line:
        sys.exit("the daemon closed the connection")
    return json.loads(line)

send({"jsonrpc": "2.0", "id": 1, "method": "subscribe"})
while True:
    m = read()
    if m.get("method") == "message" and not m["params"]["system"] and not m["params"]["outgoing"]:
        break
p = m["params"]
send({"jsonrpc": "2.0", "id": 2, "method": "send",
      "params": {"conversation": p["conversation"], "message": "pong: " + p["text"]}})
while True:
    r = read()
    if r.get("id") == 2:
        break
if "error" in r:
    sys.exit("send failed: " + json.dumps(r))
# Handled: acknowledged, so it does not come again.
send({"jsonrpc": "2.0", "id": 3, "method": "ack", "params": {"seq": p["seq"]}})
while True:
    a = read()
    if a.get("id") == 3:
        break
if a.get("result", {}).get("acked", 0) < p["seq"]:
    sys.exit("ack failed: " + json.dumps(a))
del p["seq"]
print(json.dumps({"got": p, "sent": r["result"]}))
"#;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn a_python_bot_gets_what_came_while_it_was_away_and_its_answer_arrives() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let daemon = Daemon::start(&bob);
    // The socket unlocks bob's store: only bob may open it.
    assert_eq!(mode(&daemon.socket), 0o600);
    assert_eq!(mode(daemon.socket.parent().expect("dir")), 0o700);

    // No bot is connected while alice writes; the daemon stores it.
    alice.send("bob", "ping");
    let mut watcher = daemon.connect();
    wait_stored(&mut watcher, "alice", "ping");

    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("bot.py");
    std::fs::write(&script, BOT).expect("write the bot");
    let out = std::process::Command::new("python3").arg(&script).arg(&daemon.socket).output().expect("python3 runs");
    assert!(out.status.success(), "bot: {}", stderr(&out));
    let said: Value = serde_json::from_slice(&out.stdout).expect("the bot's JSON");
    assert_eq!(said["got"]["text"], "ping");
    assert_eq!(said["got"]["from"], "alice");
    assert_eq!(said["sent"]["text"], "pong: ping");

    // The notification is the very object `receive --json` prints (and its
    // arrival number, which the bot took off).
    let cli_view = bob.history_json("alice");
    let stored = cli_view.iter().find(|m| m["text"] == "ping").expect("in history");
    // Bob had never written to alice: "ping" came as a message request,
    // marked so; the bot's answer accepted it, so history no longer is.
    let mut got = said["got"].clone();
    assert_eq!(got.as_object_mut().and_then(|o| o.remove("request")), Some(json!(true)));
    assert_eq!(&got, stored);

    // The bot acknowledged "ping": `receive` has nothing more; a cursor replays it.
    assert_eq!(watcher.call("receive", json!({})), json!([]));
    watcher.call("subscribe", json!({ "since": 0 }));
    let replayed: Vec<String> = (0..)
        .map(|_| watcher.notification())
        .map(|n| n["params"]["text"].as_str().unwrap_or_default().to_string())
        .take_while(|t| t != "ping")
        .take(50)
        .collect();
    assert!(replayed.len() < 50, "ping was not replayed: {replayed:?}");

    let got = alice.receive_json(&["--timeout", "30"]);
    assert!(texts(&got).contains(&"pong: ping".to_string()), "{got:?}");
}

#[test]
fn a_second_daemon_on_the_same_home_is_refused() {
    let server = Server::start();
    let bob = User::register(&server, "bob");
    let daemon = Daemon::start(&bob);
    for args in [&["daemon"][..], &["daemon", "--stdio"]] {
        let mut second = bob.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
        // A second daemon that did start would serve forever: end it.
        if !wait_until(Duration::from_secs(60), || second.try_wait().ok().flatten().is_some()) {
            let _ = second.kill();
        }
        let out = second.wait_with_output().expect("output");
        assert_clean_error(&out, "another subrosa daemon is already running");
    }
    // The first one goes on serving.
    let mut rpc = daemon.connect();
    assert!(rpc.call("version", json!({}))["version"].is_string());
    assert_eq!(rpc.call("groups", json!({})), json!([]));

    // SIGTERM: it stops, and takes its socket away.
    let mut daemon = daemon;
    let term =
        std::process::Command::new("kill").args(["-TERM", &daemon.child.id().to_string()]).status().expect("kill runs");
    assert!(term.success());
    let status = daemon.child.wait().expect("the daemon stops");
    assert!(status.success(), "{status:?}");
    assert!(!daemon.socket.exists(), "the socket stayed");

    // A --socket path that is not a socket is never removed.
    let file = bob.home().join("not-a-socket");
    std::fs::write(&file, "keep me").expect("file");
    let out = bob.cmd(&["daemon", "--socket", file.to_str().expect("utf-8")]).output().expect("runs");
    assert_clean_error(&out, "is not a socket");
    assert_eq!(std::fs::read_to_string(&file).expect("still there"), "keep me");
}

#[test]
fn malformed_requests_get_json_rpc_errors_and_the_daemon_keeps_serving() {
    let server = Server::start();
    let bob = User::register(&server, "bob");
    let mut child = bob
        .cmd(&["daemon", "--stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon starts");
    let stdin: ChildStdin = child.stdin.take().expect("stdin");
    let stdout: ChildStdout = child.stdout.take().expect("stdout");
    let mut rpc = Rpc { read: BufReader::new(stdout), write: stdin, next: 100, seen: Vec::new() };

    let code = |v: &Value| v["error"]["code"].as_i64().unwrap_or_else(|| panic!("not an error: {v}"));
    for (raw, want) in [
        (&b"{not json"[..], -32700),
        (b"\xff\xfe{}", -32700),
        (b"[]", -32600),
        (b"\"a string\"", -32600),
        (br#"{"id":1,"method":"groups"}"#, -32600),
        (br#"{"jsonrpc":"2.0","id":2,"method":"nope"}"#, -32601),
        (br#"{"jsonrpc":"2.0","id":3,"method":"send","params":{"message":"x"}}"#, -32602),
        (br#"{"jsonrpc":"2.0","id":4,"method":"send","params":["bob","x"]}"#, -32602),
        (br#"{"jsonrpc":"2.0","id":5,"method":"history","params":{"recipient":"nobody"}}"#, -32000),
        (br#"{"jsonrpc":"2.0","id":6,"method":"receive","params":{"timeout":-1}}"#, -32602),
    ] {
        rpc.line(raw);
        let a = rpc.answer();
        assert_eq!(code(&a), want, "{} -> {a}", String::from_utf8_lossy(raw));
        assert_eq!(a["jsonrpc"], "2.0");
    }
    // A notification (no id) gets no answer; the next call's answer is next.
    rpc.line(br#"{"jsonrpc":"2.0","method":"version"}"#);
    assert_eq!(rpc.call("groups", json!({})), json!([]));
    // A batch is answered as one.
    rpc.line(br#"[{"jsonrpc":"2.0","id":"a","method":"version"},{"jsonrpc":"2.0","id":"b","method":"nope"}]"#);
    let batch = rpc.read();
    assert_eq!(batch[0]["id"], "a");
    assert_eq!(code(&batch[1]), -32601);

    drop(rpc);
    let status = child.wait().expect("the daemon ends with its input");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_killed_daemon_loses_nothing() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let mut daemon = Daemon::start(&bob);
    let mut bot = daemon.connect();
    bot.call("subscribe", json!({}));
    let all: Vec<String> = (1..=6).map(|i| format!("m{i}")).collect();
    for t in &all[..3] {
        alice.send("bob", t);
    }
    // Mid-stream: the bot has one, the daemon maybe more, then SIGKILL.
    let first = bot.notification();
    let mut handed = vec![first["params"]["text"].as_str().unwrap_or_default().to_string()];
    daemon.kill();
    // What was written to the bot's socket before the kill was handed over
    // (the bot reads it); the rest must come after the restart.
    let rest: Vec<Value> = bot.drain().into_iter().map(|n| n["params"].clone()).collect();
    handed.extend(texts(&rest));
    for t in &all[3..] {
        alice.send("bob", t);
    }

    let daemon = Daemon::start(&bob);
    let mut rpc = daemon.connect();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let got = rpc.call("receive", json!({ "timeout": 5 }));
            handed.extend(texts(got.as_array().expect("array")));
            all.iter().all(|t| handed.contains(t))
        }),
        "lost some: handed over {handed:?}"
    );
}

#[test]
fn the_commands_answer_with_the_json_objects_and_others_text_stays_inert() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let daemon = Daemon::start(&bob);
    let mut rpc = daemon.connect();

    // Hostile text from alice: the line carries it escaped, the value intact.
    let hostile = "hi\u{1b}]0;pwned\u{7} \u{202e}gnp.exe \u{9b}2J";
    alice.send("bob", hostile);
    rpc.line(br#"{"jsonrpc":"2.0","id":"r","method":"receive","params":{"timeout":30}}"#);
    let mut raw = String::new();
    rpc.read.read_line(&mut raw).expect("an answer");
    for c in ['\u{1b}', '\u{7}', '\u{202e}', '\u{9b}'] {
        assert!(!raw.contains(c), "raw {c:?} in {raw:?}");
    }
    let answer: Value = serde_json::from_str(&raw).expect("JSON");
    let got = answer["result"].as_array().expect("array");
    let m = got.iter().find(|m| m["system"] == false).expect("alice's message");
    assert_eq!(m["text"], hostile);

    // alerts: none raised on this home.
    assert_eq!(rpc.call("alerts", json!({})), json!([]));

    // contacts, safetyNumber, verify (only with the number compared).
    let contacts = rpc.call("contacts", json!({}));
    assert_eq!(contacts[0]["handle"], "alice");
    assert_eq!(contacts[0]["verified"], false);
    let number = rpc.call("safetyNumber", json!({ "handle": "alice" }))["safety_number"].as_str().unwrap().to_string();
    let wrong = rpc.call_raw("verify", json!({ "handle": "alice", "safetyNumber": "1".repeat(60) }));
    assert_eq!(wrong["error"]["code"], -32000, "{wrong}");
    assert!(wrong["error"]["message"].as_str().unwrap().starts_with("not verified"), "{wrong}");
    assert_eq!(rpc.call("contacts", json!({}))[0]["verified"], false);
    rpc.call("verify", json!({ "handle": "alice", "safetyNumber": number }));
    assert_eq!(rpc.call("contacts", json!({}))[0]["verified"], true);

    // createGroup, groups, members, send by group name, history by id.
    let g = rpc.call("createGroup", json!({ "name": "ops", "members": ["alice"] }));
    assert_eq!(g["name"], "ops");
    assert_eq!(g["members"], json!(["alice", "bob"]));
    assert_eq!(rpc.call("groups", json!({}))[0]["id"], g["id"]);
    let members = rpc.call("members", json!({ "conversation": g["id"] }));
    let handles: Vec<&str> = members.as_array().unwrap().iter().map(|m| m["handle"].as_str().unwrap()).collect();
    assert_eq!(handles.len(), 2, "{members}");
    assert!(handles.contains(&"alice") && handles.contains(&"bob"));
    assert_eq!(members.as_array().unwrap().iter().filter(|m| m["this_device"] == true).count(), 1);
    let sent = rpc.call("send", json!({ "recipient": "ops", "message": "to the group" }));
    assert_eq!((sent["state"].as_str(), sent["group"].as_bool()), (Some("sent"), Some(true)));
    // The command line's names do too.
    rpc.call("send", json!({ "target": "ops", "text": "by target" }));
    let history = rpc.call("history", json!({ "conversation": g["id"] }));
    assert!(texts(history.as_array().unwrap()).contains(&"by target".to_string()));
    assert!(texts(history.as_array().unwrap()).contains(&"to the group".to_string()));
    let got = alice.receive_json(&["--timeout", "30"]);
    assert!(texts(&got).contains(&"to the group".to_string()), "{got:?}");
}

#[test]
fn a_send_queued_while_the_server_is_away_is_told_when_it_went_out() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    let daemon = Daemon::start(&bob);
    let mut rpc = daemon.connect();
    wait_stored(&mut rpc, "alice", "hello");
    rpc.call("subscribe", json!({}));

    server.kill();
    // Stored and queued: a result in state `queued`, not an error a bot
    // would send again, by name and by conversation id alike.
    let answer = rpc.call_raw("send", json!({ "recipient": "alice", "message": "while away" }));
    assert!(answer.get("error").is_none(), "{answer}");
    let queued = answer["result"].clone();
    assert_eq!(queued["state"], "queued", "{queued}");
    let by_id = rpc.call_raw("send", json!({ "conversation": queued["conversation"], "message": "by id" }));
    assert!(by_id.get("error").is_none(), "{by_id}");
    assert_eq!(by_id["result"]["state"], "queued", "{by_id}");
    server.restart_with(&[]);
    let sent = loop {
        let n = rpc.any_notification();
        if n["method"] == "messageState" && n["params"]["id"] == queued["id"] {
            break n;
        }
    };
    assert_eq!(sent["params"]["state"], "sent", "{sent}");
    assert_eq!(sent["params"]["text"], "while away");
    let mut got = texts(&alice.receive_json(&["--timeout", "30"]));
    if !got.contains(&"by id".to_string()) {
        got.extend(texts(&alice.receive_json(&["--timeout", "30"])));
    }
    // Each exactly once.
    for t in ["while away", "by id"] {
        assert_eq!(got.iter().filter(|g| *g == t).count(), 1, "{t}: {got:?}");
    }
}

/// The next message notification of `from` (system lines skipped), as
/// (seq, text); the texts of every message notification read on the way.
fn next_from<R: BufRead, W: Write>(rpc: &mut Rpc<R, W>, from: &str) -> (u64, String) {
    loop {
        let n = rpc.notification();
        let p = &n["params"];
        let seq = p["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {n}"));
        if p["system"] == false && p["from"] == from {
            return (seq, p["text"].as_str().unwrap_or_default().to_string());
        }
    }
}

#[test]
fn what_a_bot_did_not_acknowledge_comes_again_and_what_it_did_does_not() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let mut daemon = Daemon::start(&bob);

    // A bot gets "one" and dies before acknowledging it.
    alice.send("bob", "one");
    let mut bot = daemon.connect();
    assert_eq!(bot.call("subscribe", json!({}))["subscribed"], true);
    let (one, text) = next_from(&mut bot, "alice");
    assert_eq!(text, "one");
    drop(bot);

    // Its next run gets it again, under the same number, and acknowledges it.
    let mut bot = daemon.connect();
    bot.call("subscribe", json!({}));
    assert_eq!(next_from(&mut bot, "alice"), (one, "one".to_string()));
    assert_eq!(bot.call("ack", json!({ "seq": one }))["acked"], one);
    // Acknowledging an older number moves nothing back.
    assert_eq!(bot.call("ack", json!({ "seq": 0 }))["acked"], one);
    // A number no message has (a time in ms, say) is refused, not taken.
    let wrong = bot.call_raw("ack", json!({ "seq": 1_700_000_000_000u64 }));
    assert_eq!(wrong["error"]["code"], json!(-32602), "{wrong}");
    assert_eq!(bot.call("ack", json!({ "seq": 0 }))["acked"], one);
    drop(bot);

    // "two" arrives while no bot listens; then the daemon is killed.
    alice.send("bob", "two");
    let mut watcher = daemon.connect();
    wait_stored(&mut watcher, "alice", "two");
    drop(watcher);
    daemon.kill();

    // The acknowledgement outlived the daemon: "two" comes, "one" does not.
    let daemon = Daemon::start(&bob);
    let mut bot = daemon.connect();
    let subscribed = bot.call("subscribe", json!({}));
    assert!(subscribed["after"].as_u64().expect("after") >= one, "{subscribed}");
    let (two, text) = next_from(&mut bot, "alice");
    assert_eq!(text, "two");
    assert!(two > one);

    // A bot's own cursor replays exactly from the message after it.
    bot.call("subscribe", json!({ "after": one - 1 }));
    let first = bot.notification();
    assert_eq!(first["params"]["seq"], one, "{first}");
    assert_eq!(first["params"]["text"], "one");
    bot.call("subscribe", json!({ "after": one }));
    assert_eq!(next_from(&mut bot, "alice"), (two, "two".to_string()));

    // `receive` hands over what is not acknowledged, and acknowledges it.
    let mut rpc = daemon.connect();
    let got = rpc.call("receive", json!({}));
    let got = got.as_array().expect("array");
    assert!(got.iter().all(|m| m["seq"].as_u64().expect("seq") > one), "{got:?}");
    assert!(texts(got).contains(&"two".to_string()), "{got:?}");
    assert_eq!(rpc.call("receive", json!({})), json!([]));
}

/// `cmd` without the passphrase: only a daemon can serve it.
fn without_passphrase(user: &User, args: &[&str]) -> std::process::Output {
    user.cmd(args).env_remove("SUBROSA_PASSPHRASE").output().expect("subrosa runs")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn while_a_daemon_runs_the_commands_go_through_it_and_print_what_they_print_without_it() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let _carol = User::register(&server, "carol");
    alice.send("bob", "hello bob");
    let mut daemon = Daemon::start(&bob);
    let mut rpc = daemon.connect();
    wait_stored(&mut rpc, "alice", "hello bob");

    // No passphrase and no cached key: the store stays shut in these
    // processes, so only the daemon can have answered.
    let sent = without_passphrase(&bob, &["send", "alice", "through the daemon"]);
    assert!(sent.status.success(), "{}", stderr(&sent));
    assert!(stdout(&sent).starts_with("sent ") && stdout(&sent).trim_end().ends_with("to alice"), "{}", stdout(&sent));
    let got = alice.receive_json(&["--timeout", "30"]);
    assert!(texts(&got).contains(&"through the daemon".to_string()), "{got:?}");
    alice.send("bob", "and back");
    let got = without_passphrase(&bob, &["receive", "--json", "--timeout", "30"]);
    assert!(got.status.success(), "{}", stderr(&got));
    let got = parse_json_lines(&stdout(&got));
    assert!(texts(&got).contains(&"and back".to_string()), "{got:?}");
    assert!(got.iter().all(|m| m.get("seq").is_none()), "the daemon's arrival numbers are not printed: {got:?}");
    let created = without_passphrase(&bob, &["group", "create", "club", "alice", "carol"]);
    assert!(created.status.success(), "{}", stderr(&created));
    let said = stdout(&created);
    assert!(said.starts_with("created club with ") && said.contains("alice") && said.contains("carol"), "{said}");
    let renamed = without_passphrase(&bob, &["group", "rename", "club", "the club"]);
    assert!(renamed.status.success(), "{}", stderr(&renamed));

    // Each prints exactly what it prints without a daemon.
    for args in [
        &["history", "alice"][..],
        &["history", "alice", "--json"],
        &["history", "the club", "--json"],
        &["contacts"],
        &["groups"],
        &["members", "the club"],
        &["safety-number", "alice"],
    ] {
        let via = without_passphrase(&bob, args);
        let mut direct_args = vec!["--no-daemon"];
        direct_args.extend_from_slice(args);
        let direct = bob.run(&direct_args);
        assert!(via.status.success() && direct.status.success(), "{args:?}: {} / {}", stderr(&via), stderr(&direct));
        assert_eq!(stdout(&via), stdout(&direct), "{args:?}");
    }

    // A command the daemon has no method for opens the store itself, and
    // so needs the passphrase.
    let devices = without_passphrase(&bob, &["devices"]);
    assert_clean_error(&devices, "no passphrase");
    // An error the daemon meets is one line and a failure, as without it.
    let unknown = without_passphrase(&bob, &["send", "nobody-here", "hi"]);
    assert!(!unknown.status.success());
    assert_eq!(stderr(&unknown).lines().count(), 1, "{}", stderr(&unknown));

    // A socket in a directory others may enter is not the daemon's: never
    // used (anyone could have put it there to read what is sent).
    let dir = daemon.socket.parent().expect("dir").to_path_buf();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_clean_error(&without_passphrase(&bob, &["contacts"]), "no passphrase");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    assert!(without_passphrase(&bob, &["contacts"]).status.success());

    // A dead daemon's socket: the commands work without it.
    daemon.kill();
    assert!(daemon.socket.exists(), "SIGKILL leaves the socket");
    bob.ok(&["send", "alice", "after the daemon"]);
    assert_clean_error(&without_passphrase(&bob, &["contacts"]), "no passphrase");
}

#[test]
fn two_receives_in_one_batch_never_hand_out_the_same_message() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let daemon = Daemon::start(&bob);
    let mut rpc = daemon.connect();
    alice.send("bob", "once only");
    wait_stored(&mut rpc, "alice", "once only");
    rpc.line(br#"[{"jsonrpc":"2.0","id":1,"method":"receive"},{"jsonrpc":"2.0","id":2,"method":"receive"}]"#);
    let batch = rpc.answer();
    let first = texts(batch[0]["result"].as_array().expect("an array"));
    let second = texts(batch[1]["result"].as_array().expect("an array"));
    assert!(first.contains(&"once only".to_string()), "{batch}");
    assert!(!second.contains(&"once only".to_string()), "handed out twice: {batch}");
    assert_eq!(rpc.call("receive", json!({})), json!([]));
}

#[test]
fn a_bot_reacts_replies_edits_deletes_and_reads_and_sees_the_fields() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "question");
    let daemon = Daemon::start(&bob);
    let mut rpc = daemon.connect();
    wait_stored(&mut rpc, "alice", "question");
    let history = rpc.call("history", json!({ "recipient": "alice" }));
    let question = history.as_array().unwrap().iter().find(|m| m["text"] == "question").unwrap()["id"].clone();

    assert_eq!(
        rpc.call("react", json!({ "recipient": "alice", "messageId": question, "emoji": "+1" })),
        json!({ "queued": false })
    );
    let reply = rpc.call("send", json!({ "recipient": "alice", "message": "answer", "replyTo": question }));
    assert_eq!((reply["reply_to"].clone(), reply["state"].as_str()), (question.clone(), Some("sent")));
    let mine = reply["id"].clone();
    assert_eq!(
        rpc.call("edit", json!({ "recipient": "alice", "messageId": mine, "text": "better answer" })),
        json!({ "queued": false })
    );
    // Not bob's to edit or delete: refused, one line, nothing sent.
    let refused = rpc.call_raw("delete", json!({ "recipient": "alice", "messageId": question }));
    assert_eq!(refused["error"]["code"], -32000, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("only its author may delete it"), "{refused}");
    let bad = rpc.call_raw("react", json!({ "recipient": "alice", "messageId": "zz", "emoji": "+1" }));
    assert_eq!(bad["error"]["code"], -32602, "{bad}");
    assert_eq!(rpc.call("read", json!({ "recipient": "alice" }))["read"], 1);
    assert_eq!(rpc.call("read", json!({ "recipient": "alice" }))["read"], 0);

    alice.receive_json(&[]);
    let h = alice.history_json("bob");
    let q = h.iter().find(|m| m["id"] == question).unwrap();
    assert_eq!(q["reactions"], json!([{ "emoji": "+1", "from": ["bob"] }]));
    assert_eq!(q["state"], "read");
    let a = h.iter().find(|m| m["id"] == mine).unwrap();
    assert_eq!(
        (a["text"].as_str(), a["edited"].as_bool(), a["reply_to"].clone()),
        (Some("better answer"), Some(true), question)
    );
}

#[test]
fn a_change_the_daemon_stored_but_could_not_send_exits_75_and_a_call_around_the_daemon_is_refused() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    let daemon = Daemon::start(&bob);
    let mut rpc = daemon.connect();
    wait_stored(&mut rpc, "alice", "hello");
    let id = history_texts(&mut rpc, "alice");
    assert!(!id.is_empty());

    // A call that goes around the daemon would lose its signals to it:
    // refused, in one line.
    let out = bob.run(&["--no-daemon", "call", "alice", "--mute", "--duration", "1"]);
    assert_clean_error(&out, "call without --no-daemon, or stop it");

    // The server goes away: a send is stored and exits 75 ("queued:"), as
    // without a daemon, so a script does not send it again.
    server.kill();
    let out = without_passphrase(&bob, &["send", "alice", "while away"]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("queued:"), "{}", stderr(&out));
}

#[test]
fn read_settings_and_files_go_through_the_daemon_as_without_it() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    let daemon = Daemon::start(&bob);
    let mut rpc = daemon.connect();
    wait_stored(&mut rpc, "alice", "hello");

    // settings and read, with no passphrase: the daemon answered, and
    // what it changed is in the store.
    let off = without_passphrase(&bob, &["settings", "read-receipts", "off"]);
    assert!(off.status.success(), "{}", stderr(&off));
    assert_eq!(stdout(&off), "read receipts: off\n");
    let direct = bob.run(&["--no-daemon", "settings", "read-receipts"]);
    assert_eq!(stdout(&direct), "read receipts: off\n", "{}", stderr(&direct));
    let read = without_passphrase(&bob, &["read", "alice"]);
    assert!(read.status.success(), "{}", stderr(&read));
    assert_eq!(stdout(&read), "marked 1 message(s) read (read receipts are off: nobody was told)\n");
    let on = without_passphrase(&bob, &["settings", "read-receipts", "on"]);
    assert_eq!(stdout(&on), "read receipts: on\n", "{}", stderr(&on));
    assert_clean_error(&without_passphrase(&bob, &["read", "nobody-here"]), "nobody-here");

    // send --attach through the daemon, by a path relative to here: it
    // reaches alice intact.
    std::fs::write(bob.dir.path().join("plan.txt"), b"the plan").unwrap();
    let sent = bob
        .cmd(&["send", "alice", "see attached", "--attach", "plan.txt"])
        .current_dir(bob.dir.path())
        .env_remove("SUBROSA_PASSPHRASE")
        .output()
        .unwrap();
    assert!(sent.status.success(), "{}", stderr(&sent));
    assert!(stdout(&sent).contains("with 1 file(s)"), "{}", stdout(&sent));
    let alice_dl = alice.dir.path().join("downloads");
    std::fs::create_dir(&alice_dl).unwrap();
    assert!(wait_until(Duration::from_secs(60), || {
        alice.receive_json(&["--timeout", "1", "--downloads", alice_dl.to_str().unwrap()]);
        std::fs::read(alice_dl.join("plan.txt")).is_ok_and(|b| b == b"the plan")
    }));

    // receive --downloads through the daemon saves what came.
    std::fs::write(alice.dir.path().join("map.txt"), b"the map").unwrap();
    alice.ok(&["send", "bob", "--attach", alice.dir.path().join("map.txt").to_str().unwrap()]);
    let bob_dl = bob.dir.path().join("downloads");
    std::fs::create_dir(&bob_dl).unwrap();
    let mut printed = String::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let got = without_passphrase(&bob, &["receive", "--timeout", "2", "--downloads", bob_dl.to_str().unwrap()]);
            assert!(got.status.success(), "{}", stderr(&got));
            printed.push_str(&stdout(&got));
            std::fs::read(bob_dl.join("map.txt")).is_ok_and(|b| b == b"the map")
        }),
        "{printed}"
    );
    assert!(printed.contains(&format!("saved to {}", bob_dl.join("map.txt").display())), "{printed}");
    // A directory that is not there: one line, as without a daemon.
    let missing = bob.dir.path().join("missing");
    assert_clean_error(
        &without_passphrase(&bob, &["receive", "--downloads", missing.to_str().unwrap()]),
        "not a directory",
    );
}

#[test]
fn receive_through_the_daemon_tells_of_a_queued_send_the_server_refused() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "g", "bob", "carol"]);
    bob.ok(&["receive"]);
    carol.ok(&["receive"]);
    let daemon = Daemon::start(&alice);
    let mut rpc = daemon.connect();
    let _ = rpc.call("account", json!({}));

    server.kill();
    let out = without_passphrase(&alice, &["send", "g", "queued, then refused"]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    // Back, but refusing sends to more than one device: the daemon's own
    // connection flushes the queue, and the refusal waits for a front end.
    server.restart_with(&["--max-recipients", "1"]);
    let mut err = String::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let out = without_passphrase(&alice, &["receive", "--timeout", "1"]);
            assert!(out.status.success(), "as without a daemon, a refused send is a warning: {}", stderr(&out));
            err.push_str(&stderr(&out));
            err.contains("was refused by the server and not sent")
        }),
        "never told: {err}"
    );
    assert!(err.contains("recipients"), "{err}");
    // Told once.
    let again = without_passphrase(&alice, &["receive"]);
    assert!(!stderr(&again).contains("refused"), "{}", stderr(&again));
}

/// `requests`, `accept`, `disappearing`, `block`, `unblock`, `linklist`
/// and `account delete` go through a running daemon, print what they
/// print without it, and a bot has their methods with plain fields.
#[test]
fn requests_timers_blocks_and_account_deletion_go_through_the_daemon() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let _carol = User::register(&server, "carol");
    alice.send("bob", "hi bob");
    let mut daemon = Daemon::start(&bob);
    let mut rpc = daemon.connect();
    wait_stored(&mut rpc, "alice", "hi bob");

    // Bob never wrote to alice: her conversation is a request.
    let requests = rpc.call("requests", json!({}));
    let requests = requests.as_array().expect("an array");
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!((&requests[0]["name"], &requests[0]["kind"]), (&json!("alice"), &json!("direct")));
    let via = without_passphrase(&bob, &["requests"]);
    assert!(via.status.success(), "{}", stderr(&via));
    assert_eq!(stdout(&via), stdout(&bob.run(&["--no-daemon", "requests"])));
    assert!(stdout(&via).starts_with("alice\tdirect\t#"), "{}", stdout(&via));

    let said = |args: &[&str]| {
        let out = without_passphrase(&bob, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(said(&["accept", "alice"]), "accepted alice\n");
    assert_eq!(said(&["accept", "alice"]), "alice is not a message request (nothing to accept)\n");
    assert_eq!(rpc.call("requests", json!({})), json!([]));

    assert_eq!(said(&["disappearing", "alice", "1h"]), "disappearing messages: 1h\n");
    assert_eq!(said(&["disappearing", "alice", "1h"]), "disappearing messages: 1h (unchanged)\n");
    let timer = rpc.call("disappearing", json!({ "recipient": "alice", "duration": "off" }));
    assert_eq!((&timer["seconds"], &timer["changed"]), (&Value::Null, &json!(true)), "{timer}");
    assert!(history_texts(&mut rpc, "alice").iter().any(|t| t.ends_with("set disappearing messages to 1h")));
    // A bad duration: one line, refused before the daemon is asked.
    assert_clean_error(&without_passphrase(&bob, &["disappearing", "alice", "5y"]), "not a duration");
    let bad = rpc.call_raw("disappearing", json!({ "recipient": "alice", "duration": "5y" }));
    assert!(bad["error"]["message"].as_str().expect("an error").contains("not a duration"), "{bad}");

    assert_eq!(said(&["block", "carol"]), "blocked carol (left 0 conversation(s))\n");
    assert_eq!(said(&["unblock", "carol"]), "unblocked carol\n");
    assert_eq!(said(&["unblock", "carol"]), "carol was not blocked\n");
    assert_eq!(
        said(&["linklist", "status"]),
        "no dangerous-link list (import one with `subrosa linklist import FILE`)\n"
    );
    assert_eq!(rpc.call("linklistStatus", json!({})), Value::Null);

    // Deleting the account asks for its handle, typed again.
    let wrong = rpc.call_raw("accountDelete", json!({ "handle": "alice" }));
    assert_eq!(wrong["error"]["code"], json!(-32602), "{wrong}");
    let out = said(&["account", "delete", "--yes"]);
    assert!(out.starts_with("deleted the account bob (left 1 conversation(s))"), "{out}");
    // Nothing left to serve: the daemon ends by itself.
    assert!(
        wait_until(Duration::from_secs(30), || daemon.child.try_wait().expect("wait").is_some()),
        "the daemon still runs for a deleted account"
    );
    let reregister = bob.run(&["--no-daemon", "contacts"]);
    assert!(reregister.status.success(), "the store is left for the user: {}", stderr(&reregister));
}

/// The timer lives in the MLS group, so a member added after it was set
/// knows it though no line of its history says so: `conversations` (what
/// the terminal UI lists through a daemon) carries it.
#[test]
fn conversations_carry_the_timer_the_group_agreed_on() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let _bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "club", "bob"]);
    alice.ok(&["disappearing", "club", "1h"]);
    alice.ok(&["group", "add", "club", "carol"]);
    let daemon = Daemon::start(&carol);
    let mut rpc = daemon.connect();
    let mut club = Value::Null;
    assert!(
        wait_until(Duration::from_secs(30), || {
            let all = rpc.call("conversations", json!({}));
            club =
                all.as_array().into_iter().flatten().find(|c| c["name"] == json!("club")).cloned().unwrap_or_default();
            !club.is_null()
        }),
        "carol never joined the club"
    );
    assert_eq!(club["disappearing"], json!(3600), "{club}");
    // Turned off by its creator: carol's list says so once she has the commit.
    alice.ok(&["disappearing", "club", "off"]);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let all = rpc.call("conversations", json!({}));
            all.as_array().into_iter().flatten().any(|c| c["name"] == json!("club") && c["disappearing"].is_null())
        }),
        "the timer stayed on in carol's list"
    );
}

/// While a daemon runs, `subrosa answer` goes through it (it holds the
/// socket the offer comes on): the call connects and each side hears the
/// other. One call at a time; paths the daemon cannot place are refused.
#[test]
fn a_call_answered_through_the_daemon_carries_both_voices() {
    let relay = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let server = Server::start_with(&["--relay-listen", &relay.to_string()]);
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let daemon = Daemon::start(&bob);
    let mut rpc = daemon.connect();

    let dir = tempfile::tempdir().expect("tempdir");
    let wav = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let said = subrosa_media::quality::test_melody(3.0);
    let mut reply = said.clone();
    reply.reverse();
    subrosa_media::wav::write(Path::new(&wav("alice.wav")), &said).expect("write");
    subrosa_media::wav::write(Path::new(&wav("bob.wav")), &reply).expect("write");

    // The daemon reads and writes files by absolute paths only.
    let bad = rpc.call_raw("answer", json!({ "input": "bob.wav", "timeout": 1 }));
    assert_eq!(bad["error"]["code"], -32602, "{bad}");
    let bad = rpc.call_raw("answer", json!({ "recipient": "alice", "mute": true }));
    assert_eq!(bad["error"]["code"], -32602, "{bad}");

    // Bob answers without his passphrase: through the daemon.
    let args = [
        "answer",
        "--input",
        &wav("bob.wav"),
        "--output",
        &wav("bob-heard.wav"),
        "--duration",
        "10",
        "--timeout",
        "60",
    ];
    let answering = bob
        .cmd(&args)
        .env_remove("SUBROSA_PASSPHRASE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bob answers");
    // A second call through the same daemon meanwhile is refused.
    std::thread::sleep(Duration::from_secs(1));
    let second = without_passphrase(&bob, &["answer", "--mute", "--timeout", "1"]);
    assert_clean_error(&second, "a call is already running through this daemon");

    let out = alice.run(&[
        "call",
        "bob",
        "--input",
        &wav("alice.wav"),
        "--output",
        &wav("alice-heard.wav"),
        "--duration",
        "4",
    ]);
    assert!(out.status.success(), "alice's call: {}", stderr(&out));
    assert!(stdout(&out).contains("connected with bob"), "{}", stdout(&out));
    let bob_out = answering.wait_with_output().expect("bob's call ends");
    assert!(bob_out.status.success(), "bob's call: {}", stderr(&bob_out));
    let bob_said = stdout(&bob_out);
    assert!(bob_said.contains("alice is calling") && bob_said.contains("alice hung up"), "{bob_said}");

    let bob_heard = subrosa_media::wav::read(Path::new(&wav("bob-heard.wav"))).expect("bob's output");
    let alice_heard = subrosa_media::wav::read(Path::new(&wav("alice-heard.wav"))).expect("alice's output");
    let to_bob = subrosa_media::quality::similarity(&said, &bob_heard);
    let to_alice = subrosa_media::quality::similarity(&reply, &alice_heard);
    assert!(to_bob.correlation > 0.8, "alice → bob: {to_bob:?}");
    assert!(to_alice.correlation > 0.8, "bob → alice: {to_alice:?}");

    // The daemon is free again.
    let after = rpc.call_raw("answer", json!({ "mute": true, "output": wav("none.wav"), "timeout": 0 }));
    assert_eq!(after["error"]["message"], "no call came in", "{after}");
}

/// `hangUp` ends the call running through the daemon, on any connection:
/// one that rings is given up (a missed call at the other end), one that
/// is connected is hung up (the other side hears so at once).
#[test]
fn hang_up_ends_the_daemons_call_whether_it_rings_or_runs() {
    let relay = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let server = Server::start_with(&["--relay-listen", &relay.to_string()]);
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let daemon = Daemon::start(&bob);
    let mut control = daemon.connect();
    assert_eq!(control.call("hangUp", json!({})), json!({ "hungUp": false }), "nothing to hang up");

    let dir = tempfile::tempdir().expect("tempdir");
    let wav = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    subrosa_media::wav::write(Path::new(&wav("bob.wav")), &subrosa_media::quality::test_melody(2.0)).expect("write");

    // Bob calls alice, who does not answer; bob gives up while it rings.
    let mut calling = daemon.connect();
    let out = wav("none.wav");
    let ring = std::thread::spawn(move || {
        calling.call("call", json!({ "recipient": "alice", "mute": true, "output": out, "timeout": 60 }))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(control.call("hangUp", json!({})), json!({ "hungUp": true }));
    let given_up = ring.join().expect("the call returns");
    assert_eq!(given_up["end"], "cancelled", "{given_up}");
    alice.receive_json(&[]);
    let lines: Vec<String> =
        alice.history_json("bob").iter().filter_map(|m| m["text"].as_str().map(String::from)).collect();
    assert!(lines.iter().any(|l| l == "missed call from bob"), "{lines:?}");

    // Alice calls; bob's daemon answers, and bob hangs up mid-call.
    let mut answering = daemon.connect();
    let (input, output) = (wav("bob.wav"), wav("bob-heard.wav"));
    let answer = std::thread::spawn(move || {
        answering.call("answer", json!({ "input": input, "output": output, "duration": 60, "timeout": 60 }))
    });
    let started = std::time::Instant::now();
    let mut caller = alice
        .cmd(&["call", "bob", "--mute", "--output", &wav("alice-heard.wav"), "--duration", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("alice calls");
    let (lines_tx, said) = std::sync::mpsc::channel::<String>();
    let out = BufReader::new(caller.stdout.take().expect("stdout"));
    std::thread::spawn(move || out.lines().map_while(Result::ok).for_each(|l| drop(lines_tx.send(l))));
    let mut heard = Vec::new();
    while !heard.iter().any(|l: &String| l.contains("connected with bob")) {
        heard.push(said.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("never connected: {heard:?}")));
    }
    assert_eq!(control.call("hangUp", json!({})), json!({ "hungUp": true }));
    let answered = answer.join().expect("the answer returns");
    let status = caller.wait().expect("alice's call ends");
    // The rest of what alice's call printed (the reader ends with it).
    while let Ok(line) = said.recv_timeout(Duration::from_secs(5)) {
        heard.push(line);
    }
    assert!(started.elapsed() < Duration::from_secs(45), "the hang-up did not end the call");
    assert!(status.success(), "alice's call failed: {heard:?}");
    assert!(heard.iter().any(|l| l.starts_with("bob hung up")), "{heard:?}");
    assert_eq!(answered["end"], "duration", "this side hung up: {answered}");
    assert!(answered["heardSecs"].as_f64().is_some(), "{answered}");
}

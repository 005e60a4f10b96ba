//! A member's messages carry what only the server can sign (its directory
//! head) and what only a newer Subrosa knows (new content kinds). A
//! misbehaving or newer sender is played by a test-only client built from
//! the library (feature `test-senders`); the receivers are the real binary.

mod common;

use common::*;
use subrosa_client::Subrosa;
use subrosa_core::content::Body;
use subrosa_proto::kt::SignedHead;

/// Sends from `user`'s home with the library: `body`, carrying `head`.
fn send_raw(user: &User, peer: &str, body: Body, head: Option<Vec<u8>>) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let me = Subrosa::open(&user.home(), PASS).expect("opens the home");
    rt.block_on(me.test_send_raw(peer, body, head)).expect("sent");
}

fn newest_head(user: &User) -> Vec<u8> {
    let me = Subrosa::open(&user.home(), PASS).expect("opens the home");
    me.test_newest_head().expect("store").expect("a signed head")
}

fn text(t: &str) -> Body {
    Body::Text(t.into())
}

/// `alerts --json`, parsed.
fn alerts(user: &User) -> Vec<serde_json::Value> {
    parse_json_lines(&user.ok(&["alerts", "--json"]))
}

#[test]
fn a_members_forged_heads_are_dropped_and_blamed_on_that_member_never_on_the_server() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let mallory = User::register(&server, "mallory");
    mallory.send("alice", "hello");
    assert_eq!(texts(&alice.receive_json(&[])), ["hello"]);

    let real = newest_head(&mallory);
    let valid = SignedHead::decode(&real).expect("a signed head");
    let beyond = SignedHead { epoch: valid.epoch + 1_000, ..valid.clone() }.encode();
    let bad_signature = {
        let mut h = valid.clone();
        h.signature[0] ^= 1;
        h.encode()
    };
    let wrong_root = SignedHead { root: [0x5a; 32], ..valid.clone() }.encode();
    let forged: [(&str, Vec<u8>); 4] = [
        ("an epoch beyond the server's", beyond),
        ("a bad signature", bad_signature),
        ("a wrong root", wrong_root),
        ("bytes that are no head at all", vec![0xff; 40]),
    ];
    for (i, (what, head)) in forged.into_iter().enumerate() {
        let message = format!("forged {i}");
        send_raw(&mallory, "alice", text(&message), Some(head));
        // alice keeps receiving: the message is shown, nothing is dropped,
        let out = alice.run(&["receive", "--json"]);
        let err = stderr(&out);
        assert!(out.status.success(), "{what}: {err}");
        assert_eq!(texts(&parse_json_lines(&String::from_utf8_lossy(&out.stdout))), [message], "{what}");
        assert!(!err.contains("dropped") && !err.contains("fork"), "{what}: {err}");
        // and keeps sending.
        alice.send("mallory", &format!("reply {i}"));
    }
    // Each alert names mallory; none blames the server; no fork.
    let list = alerts(&alice);
    assert!(!list.is_empty());
    for a in &list {
        assert_eq!(a["concerns"], "mallory", "{a}");
        assert_eq!(a["fork"], false, "{a}");
        let t = a["text"].as_str().unwrap_or_default();
        assert!(t.starts_with("mallory's message carried a key-directory head that the server did not sign"), "{t}");
    }
    let plain = alice.ok(&["alerts"]);
    assert!(!plain.contains("FORK"), "{plain}");
    assert_eq!(texts(&mallory.receive_json(&[])), ["reply 0", "reply 1", "reply 2", "reply 3"]);

    // mallory's honest head (an old, validly signed one) is no alert.
    alice.ok(&["alerts", "clear"]);
    send_raw(&mallory, "alice", text("honest"), Some(real));
    assert_eq!(texts(&alice.receive_json(&[])), ["honest"]);
    assert_eq!(alice.ok(&["alerts"]).trim(), "no alerts");
    alice.send("mallory", "still fine");
}

#[test]
fn a_content_kind_from_a_newer_subrosa_is_shown_as_unsupported_and_raises_no_gap() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "first");
    assert_eq!(texts(&bob.receive_json(&[])), ["first"]);

    // A kind only this test knows (say, a reaction of a later release),
    // numbered in alice's sequence like any message.
    let head = newest_head(&alice);
    send_raw(&alice, "bob", Body::Unsupported { kind: 0x7f01, payload: vec![1, 0xde, 0xad] }, Some(head));
    let out = bob.run(&["receive", "--json"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("warning") && !err.contains("error"), "{err}");
    let got = parse_json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(texts(&got), ["unsupported message (sent by a newer Subrosa)"]);
    assert_eq!(got[0]["from"], "alice");

    // alice's next message: no gap, no reorder, nothing dropped.
    alice.send("bob", "second");
    let out = bob.run(&["receive", "--json"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(texts(&parse_json_lines(&String::from_utf8_lossy(&out.stdout))), ["second"], "{err}");
    let history = texts(&bob.history_json("alice"));
    assert_eq!(history, ["first", "unsupported message (sent by a newer Subrosa)", "second"]);
}

/// Runs the real binary on a fixture home.
fn fixture_run(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(subrosa_bin())
        .arg("--home")
        .arg(home)
        .args(args)
        .env("SUBROSA_PASSPHRASE", FIXTURE_PASS)
        .env("SUBROSA_KEY_CACHE", "off")
        .env_remove("SUBROSA_HOME")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("subrosa runs")
}

const FIXTURE_PASS: &str = "fixture passphrase";

/// Homes and server data made by the first release: the server gets a
/// head-signing key at its first start after the upgrade, and each home pins
/// it on first use and goes on talking, with no alert.
#[test]
fn homes_and_a_server_of_the_first_release_pin_the_head_key_on_first_use() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/sqlite");
    copy_dir(&fixtures, tmp.path());
    let mut child = std::process::Command::new(server_bin())
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(tmp.path().join("server"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("server starts");
    let url = {
        use std::io::BufRead as _;
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        lines.read_line(&mut first).expect("address");
        std::thread::spawn(move || {
            let mut sink = String::new();
            while lines.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        first.trim().strip_prefix("listening on ").expect("listening line").to_string()
    };
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    for home in [&alice, &bob] {
        let store = <subrosa_client::store::Store as subrosa_client::store::OnDisk>::open(home, FIXTURE_PASS)
            .expect("the old home opens");
        store.write(|tx| tx.set_meta("server_url", url.as_bytes())).expect("points at this run's server");
        assert!(store.read(|tx| tx.meta("kt_head_key")).expect("meta").is_none(), "nothing pinned before the upgrade");
    }

    let out = fixture_run(&alice, &["receive", "--json"]);
    let err = stderr(&out);
    assert!(out.status.success() && !err.contains("warning"), "{err}");
    assert_eq!(texts(&parse_json_lines(&String::from_utf8_lossy(&out.stdout))), ["queued for alice, undelivered"]);
    let out = fixture_run(&alice, &["send", "bob", "after the upgrade"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = fixture_run(&bob, &["receive", "--json"]);
    let err = stderr(&out);
    assert!(out.status.success() && !err.contains("warning"), "{err}");
    assert_eq!(texts(&parse_json_lines(&String::from_utf8_lossy(&out.stdout))), ["after the upgrade"]);
    for home in [&alice, &bob] {
        let out = fixture_run(home, &["alerts"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no alerts");
        let store =
            <subrosa_client::store::Store as subrosa_client::store::OnDisk>::open(home, FIXTURE_PASS).expect("opens");
        let pinned = store.read(|tx| tx.meta("kt_head_key")).expect("meta").expect("pinned on first use");
        assert_eq!(pinned.len(), 48);
    }
    assert!(tmp.path().join("server/kt-signed-head").exists(), "the node records what it signed");
    let _ = child.kill();
    let _ = child.wait();
}

/// A linked device trusts the directory key its approving device pinned at
/// registration: it is in the link grant, so the new device never takes it
/// from the server.
#[test]
fn a_linked_device_gets_the_head_signing_key_from_the_approving_device() {
    use std::io::BufRead as _;
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let alice2 = User { name: "alice2".into(), dir: tempfile::tempdir().expect("tempdir") };
    let mut child = alice2
        .cmd(&["link", "alice", "--server", &server.url, "--timeout", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn link");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("code line");
    let code = line.trim().strip_prefix("code: ").expect("a code").to_string();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    });
    alice.ok(&["link", "--accept", &code]);
    assert!(child.wait().expect("link ends").success());
    let key = |u: &User| {
        <subrosa_client::store::Store as subrosa_client::store::OnDisk>::open(&u.home(), PASS)
            .expect("opens")
            .read(|tx| tx.meta("kt_head_key"))
            .expect("meta")
            .map(|k| k.to_vec())
    };
    let first = key(&alice).expect("alice pinned at registration");
    assert_eq!(key(&alice2), Some(first), "the new device holds the same key right after linking");
}

//! Bad input gets a clear error, the server keeps serving, nothing stored is
//! lost, nothing panics.

mod common;

use std::time::Duration;

use common::*;
use subrosa_client::Subrosa;

#[test]
fn client_errors_are_one_clear_line_and_lose_nothing() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "kept safe");
    bob.receive_json(&[]);

    assert_clean_error(&alice.run(&["send", "nosuchuser", "hi"]), "unknown handle nosuchuser");
    assert_clean_error(&alice.run(&["send", "Not A Handle!", "hi"]), "unknown conversation");
    assert_clean_error(&alice.run(&["send", "bob", &"x".repeat(70_000)]), "too long");
    assert_clean_error(&alice.run(&["send", "bob", ""]), "empty message");
    assert_clean_error(&alice.run(&["history", "carol"]), "unknown conversation");
    assert_clean_error(&alice.run(&["receive", "--timeout", "-3"]), "unexpected argument");
    assert_clean_error(&alice.run(&["receive", "--timeout", "soon"]), "invalid value");
    assert_clean_error(&alice.run(&["frobnicate"]), "unrecognized subcommand");

    // Wrong passphrase: refused, nothing changed.
    let out = alice.cmd(&["history", "bob"]).env("SUBROSA_PASSPHRASE", "wrong").output().expect("runs");
    assert_clean_error(&out, "wrong passphrase");
    let out = alice.cmd(&["send", "bob", "x"]).env("SUBROSA_PASSPHRASE", "wrong").output().expect("runs");
    assert_clean_error(&out, "wrong passphrase");
    // No passphrase and no terminal to ask on.
    let out = alice.cmd(&["history", "bob"]).env_remove("SUBROSA_PASSPHRASE").output().expect("runs");
    assert_clean_error(&out, "SUBROSA_PASSPHRASE");

    // Registering again over an existing account, or a taken handle.
    assert_clean_error(&alice.run(&["register", "alice2", "--server", &server.url]), "already holds an account");
    let carol = User { name: "carol".into(), dir: tempfile::tempdir().expect("tempdir") };
    assert_clean_error(&carol.run(&["register", "alice", "--server", &server.url]), "handle_taken");
    assert!(!carol.home().join("subrosa.db").exists(), "a refused registration leaves no account behind");
    assert_clean_error(&carol.run(&["register", "carol", "--server", "http://example.com"]), "refusing plain http");
    assert_clean_error(&carol.run(&["register", "carol", "--server", "ftp://x"]), "invalid server url");
    assert_clean_error(&carol.run(&["send", "bob", "hi"]), "no account");
    assert_clean_error(&carol.run(&["register", "x", "--server", &server.url]), "invalid handle");

    // Everything stored before is still there.
    assert_eq!(texts(&alice.history_json("bob")), ["kept safe"]);
    assert_eq!(texts(&bob.history_json("alice")), ["kept safe"]);
    alice.send("bob", "still works");
    assert_eq!(texts(&bob.receive_json(&[])), ["still works"]);
}

#[test]
fn the_config_file_names_the_server_and_a_typo_in_it_is_one_line_that_changes_nothing() {
    let server = Server::start();
    let dave = User { name: "dave".into(), dir: tempfile::tempdir().expect("tempdir") };
    std::fs::create_dir_all(dave.home()).expect("home");
    let config = dave.home().join("config.toml");
    // Neither flag nor file: told where to put it.
    assert_clean_error(&dave.run(&["register", "dave"]), "config.toml");
    // A typo is named, with its line; nothing is created.
    std::fs::write(&config, format!("key_cache = \"off\"\nserer = \"{}\"\n", server.url)).expect("write");
    assert_clean_error(&dave.run(&["register", "dave"]), "line 2");
    assert!(!dave.home().join("subrosa.db").exists(), "nothing was created");
    std::fs::write(&config, format!("server = \"{}\"\n", server.url)).expect("write");
    dave.ok(&["register", "dave"]);
    // A flag still wins over the file.
    assert_clean_error(&dave.run(&["audit", "--server", "http://example.com"]), "plain http");
    let said = dave.ok(&["audit"]);
    assert!(said.starts_with("audited epochs"), "{said}");
}

#[test]
fn a_tampered_ciphertext_is_refused_and_the_conversation_goes_on() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    bob.receive_json(&[]);

    alice.send("bob", "this one will be tampered with");
    // The server (or anyone with its disk) flips one bit of the ciphertext.
    {
        let db = server.db();
        let (id, mut ct): (i64, Vec<u8>) = db
            .query_row("SELECT id, ciphertext FROM messages ORDER BY id DESC LIMIT 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("queued");
        let n = ct.len();
        ct[n - 30] ^= 0x04;
        db.execute("UPDATE messages SET ciphertext = ?1 WHERE id = ?2", rusqlite::params![ct, id]).expect("tamper");
    }
    let out = bob.run(&["receive", "--json"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("dropped a message from alice/"), "{err}");
    assert!(!err.contains("panicked"));
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "tampered text was shown");

    // The dropped message leaves a gap in alice's numbering, which bob sees.
    alice.send("bob", "after the tampering");
    let gap = "1 message from alice did not arrive: the server dropped or is withholding them";
    assert_eq!(texts(&bob.receive_json(&[])), [gap, "after the tampering"]);
    assert_eq!(texts(&bob.history_json("alice")), ["hello", gap, "after the tampering"]);
}

/// Raw requests, signed with a real device key, against the real server.
#[test]
fn the_server_answers_malformed_and_replayed_requests_with_stable_codes_and_keeps_serving() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let device = Subrosa::open(&alice.home(), PASS).expect("open alice");
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let http = reqwest::Client::new();
    let base = server.url.clone();

    let send = |method: &str,
                path: &str,
                body: Vec<u8>,
                signed: bool|
     -> (u16, serde_json::Value, Vec<(&'static str, String)>) {
        rt.block_on(async {
            let headers = device.api().signed_headers(method, path, &body).expect("sign");
            let mut req = http.request(method.parse().expect("method"), format!("{base}{path}"));
            if signed {
                for (k, v) in &headers {
                    req = req.header(*k, v);
                }
            }
            let resp = req.header("content-type", "application/json").body(body).send().await.expect("server answers");
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
            (status, body, headers)
        })
    };

    let endpoints = ["/v1/keypackages", "/v1/keypackages/claim", "/v1/messages", "/v1/inbox/ack"];
    let bad_bodies: [&[u8]; 6] =
        [b"", b"{", b"[]", b"{\"ids\":\"x\"}", b"{\"handle\":\"bob\",\"conversation\":", b"\xff\xfe"];
    for path in endpoints {
        for body in bad_bodies {
            let (status, json, _) = send("POST", path, body.to_vec(), true);
            assert_eq!(status, 400, "{path} {body:?} -> {status} {json}");
            assert_eq!(json["code"], "bad_request", "{path} {json}");
            assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        // Unsigned.
        let (status, json, _) = send("POST", path, b"{}".to_vec(), false);
        assert_eq!((status, json["code"].as_str()), (401, Some("unauthorized")), "{path}");
    }
    // Registration with a malformed body.
    for body in bad_bodies {
        let (status, json, _) = send("POST", "/v1/accounts", body.to_vec(), false);
        assert!(status == 400 || status == 401, "{status} {json}");
        assert!(json["code"].is_string());
    }
    // Oversized body: the server answers from the declared length, before
    // reading (or buffering) the body, so only the head is sent here.
    {
        use std::io::{Read, Write};
        let addr = base.trim_start_matches("http://");
        let mut sock = std::net::TcpStream::connect(addr).expect("connect");
        let mut head = format!(
            "POST /v1/messages HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            9 * 1024 * 1024
        );
        for (k, v) in device.api().signed_headers("POST", "/v1/messages", b"").expect("sign") {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("connection: close\r\n\r\n");
        sock.write_all(head.as_bytes()).expect("write head");
        sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut answer = Vec::new();
        let _ = sock.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("\"too_large\""), "{answer}");
    }
    // Unknown route.
    let (status, json, _) = send("GET", "/v1/nothing", Vec::new(), true);
    assert_eq!((status, json["code"].as_str()), (404, Some("not_found")));
    // Unknown handle.
    let (status, json, _) = send("POST", "/v1/keypackages/claim", br#"{"handle":"nobody"}"#.to_vec(), true);
    assert_eq!((status, json["code"].as_str()), (404, Some("unknown_handle")));

    // A replayed signed request: the exact same headers and body again.
    let (status, _, headers) = send("GET", "/v1/inbox", Vec::new(), true);
    assert_eq!(status, 200);
    let replay = rt.block_on(async {
        let mut req = http.get(format!("{base}/v1/inbox"));
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await.expect("answers");
        (resp.status().as_u16(), resp.json::<serde_json::Value>().await.unwrap_or_default())
    });
    assert_eq!((replay.0, replay.1["code"].as_str()), (401, Some("replayed")));

    // A signature over a different body is refused.
    let (_, _, h) = send("GET", "/v1/inbox", Vec::new(), true);
    let forged = rt.block_on(async {
        let mut req = http.post(format!("{base}/v1/inbox/ack"));
        for (k, v) in &h {
            req = req.header(*k, v);
        }
        req.body(r#"{"ids":[1]}"#).send().await.expect("answers").status().as_u16()
    });
    assert_eq!(forged, 401);

    // Still serving, nothing panicked, and the users can talk.
    let health =
        rt.block_on(async { http.get(format!("{base}/v1/health")).send().await.expect("health").status().as_u16() });
    assert_eq!(health, 200);
    alice.send("bob", "after the garbage");
    assert_eq!(texts(&bob.receive_json(&[])), ["after the garbage"]);
    std::thread::sleep(Duration::from_millis(100));
    assert!(!server.log().contains("panicked"));
}

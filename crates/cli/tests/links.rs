//! Link previews made by the sender's device and by nobody else, and the
//! dangerous-link list, end to end: the built binaries, a real server
//! process, a canary web server on 127.0.0.1, temporary directories.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Output;
use std::sync::{Arc, Mutex};

use common::*;
use ed25519_dalek::Signer;
use subrosa_core::linklist;

/// Lets a debug build fetch previews over plain HTTP from 127.0.0.1.
const LOOPBACK: (&str, &str) = ("SUBROSA_TEST_PREVIEW_LOOPBACK_HTTP", "1");
const LIST_KEY_ENV: &str = "SUBROSA_TEST_LINKLIST_KEY";

/// A web server on 127.0.0.1 that records every request (its head) and
/// answers each with the same response.
struct Site {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Site {
    fn start(content_type: &'static str, body: Vec<u8>) -> Site {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                seen.lock().expect("lock").push(String::from_utf8_lossy(&head).into_owned());
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                let _ = s.write_all(&body);
            }
        });
        Site { url: format!("http://{addr}/invite/{:016x}", rand_token()), requests }
    }

    fn hits(&self) -> usize {
        self.requests.lock().expect("lock").len()
    }

    fn request(&self, i: usize) -> String {
        self.requests.lock().expect("lock")[i].to_lowercase()
    }
}

/// A page whose title and description say things a terminal must not
/// obey, with a thumbnail served by `image`.
fn page(image: &Site) -> Site {
    let html = format!(
        "<!doctype html><html><head><title>fallback</title>\
         <meta property=\"og:title\" content=\"Canary &amp; friends\">\
         <meta property=\"og:description\" content=\"a \x1b[31mred\x1b[0m description\">\
         <meta property=\"og:image\" content=\"{}\"></head><body>hello</body></html>",
        image.url
    );
    Site::start("text/html; charset=utf-8", html.into_bytes())
}

fn png() -> Vec<u8> {
    [b"\x89PNG\r\n\x1a\n".as_slice(), &[0u8; 64]].concat()
}

fn run_env(user: &User, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = user.cmd(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("subrosa runs")
}

fn ok_env(user: &User, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = run_env(user, args, env);
    assert!(out.status.success(), "{} {args:?}: {}", user.name, stderr(&out));
    out
}

#[test]
fn a_preview_is_fetched_once_by_the_senders_device_and_never_by_recipients_or_the_server() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    // Bob wrote first: alice is his contact, so her previews show at once.
    bob.send("alice", "hi");
    let image = Site::start("image/png", png());
    let site = page(&image);
    let text = format!("our plan is at {} (secret)", site.url);

    ok_env(&alice, &["send", "bob", &text, "--preview"], &[LOOPBACK]);
    assert_eq!(site.hits(), 1, "the sender's device fetched the page once");
    assert_eq!(image.hits(), 1, "and its one thumbnail");
    let request = site.request(0);
    assert!(request.starts_with("get /invite/"), "{request}");
    assert!(request.contains("user-agent: mozilla/5.0 (compatible)\r\n"), "{request}");
    for header in ["cookie:", "referer:", "authorization:"] {
        assert!(!request.contains(header), "{header} in {request}");
    }
    assert!(!image.request(0).contains("referer:"), "no referrer on the thumbnail either");

    // The recipient (allowed to fetch plain HTTP, were it ever to fetch)
    // shows the sender's preview, fetching nothing.
    let got = run_env(&bob, &["receive", "--json"], &[LOOPBACK]);
    let got = parse_json_lines(&String::from_utf8_lossy(&got.stdout));
    assert_eq!(texts(&got), [text.as_str()]);
    let p = &got[0]["preview"];
    assert_eq!(p["url"], site.url.as_str());
    assert_eq!(p["title"], "Canary & friends");
    assert_eq!(p["has_thumbnail"], true);
    assert!(p["description"].as_str().is_some_and(|d| d.contains("red")));
    assert_eq!(p.as_object().map(|o| o.len()), Some(4), "{{url, title, description, has_thumbnail}}: {p}");
    let shown = String::from_utf8(ok_env(&bob, &["history", "alice"], &[LOOPBACK]).stdout).expect("utf-8");
    assert!(shown.contains("preview of") && shown.contains("Canary & friends"), "{shown}");
    assert!(!shown.contains('\x1b'), "the sender's description reaches no terminal raw: {shown:?}");
    // The sender's own history carries it too.
    let mine = alice.history_json("bob");
    let sent = mine.iter().find(|m| m["text"] == text.as_str()).expect("alice's message");
    assert_eq!(sent["preview"]["title"], "Canary & friends");
    assert_eq!((site.hits(), image.hits()), (1, 1), "recipients never fetch");

    // The server never saw the link, and cannot fetch it: still one request.
    let token = site.url.rsplit('/').next().expect("token");
    assert!(files_containing(&server.data_dir(), token.as_bytes()).is_empty(), "the link is on the server's disk");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(site.hits(), 1, "the server never fetched it");
}

#[test]
fn with_previews_off_nothing_is_fetched_and_the_setting_and_file_turn_them_on() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    // Bob writes first: alice and carol are his contacts, so their
    // previews show at once (a stranger's wait for `accept`).
    bob.send("alice", "hi");
    let image = Site::start("image/png", png());
    let site = page(&image);

    // Off by default.
    ok_env(&alice, &["send", "bob", &format!("plain {}", site.url)], &[LOOPBACK]);
    let got = run_env(&bob, &["receive", "--json"], &[LOOPBACK]);
    let got = parse_json_lines(&String::from_utf8_lossy(&got.stdout));
    assert_eq!(got.len(), 1);
    assert!(got[0].get("preview").is_none(), "{}", got[0]);
    assert_eq!(site.hits(), 0, "previews off: nobody fetched");

    // The device's setting.
    assert!(alice.ok(&["settings", "previews"]).contains("link previews: off"));
    assert!(alice.ok(&["settings", "previews", "on"]).contains("the site sees its IP address"));
    ok_env(&alice, &["send", "bob", &format!("on {}", site.url)], &[LOOPBACK]);
    assert_eq!(site.hits(), 1);
    alice.ok(&["settings", "previews", "off"]);
    ok_env(&alice, &["send", "bob", &format!("off {}", site.url)], &[LOOPBACK]);
    assert_eq!(site.hits(), 1, "turned off again");

    // The configuration file (the device's setting, once set, wins).
    std::fs::write(alice.home().join("config.toml"), "previews = true\n").expect("config");
    ok_env(&alice, &["send", "bob", &format!("file {}", site.url)], &[LOOPBACK]);
    assert_eq!(site.hits(), 1, "the device's `off` wins over the file");
    let carol = User::register(&server, "carol");
    bob.send("carol", "hi");
    std::fs::write(carol.home().join("config.toml"), "previews = true\n").expect("config");
    ok_env(&carol, &["send", "bob", &format!("file {}", site.url)], &[LOOPBACK]);
    assert_eq!(site.hits(), 2, "previews = true in the file");

    let got = run_env(&bob, &["receive", "--json"], &[LOOPBACK]);
    let got = parse_json_lines(&String::from_utf8_lossy(&got.stdout));
    let with: Vec<bool> = got.iter().map(|m| m.get("preview").is_some()).collect();
    assert_eq!(with, [true, false, false, true], "{got:?}");
    assert_eq!(site.hits(), 2, "the recipient fetched nothing");
}

#[test]
fn a_failed_or_refused_fetch_sends_the_message_without_a_preview_and_says_so() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let out = ok_env(&alice, &["send", "bob", &format!("http://127.0.0.1:{closed}/x"), "--preview"], &[LOOPBACK]);
    let err = stderr(&out);
    assert!(err.contains("sending without a preview") && err.lines().count() == 1, "{err}");

    // Without the test's allowance, plain HTTP is never fetched.
    let image = Site::start("image/png", png());
    let site = page(&image);
    let out = ok_env(&alice, &["send", "bob", &site.url, "--preview"], &[]);
    assert!(stderr(&out).contains("no https link"), "{}", stderr(&out));
    assert_eq!(site.hits(), 0);

    // A name that resolves to a private address is refused before any
    // connection, even with the test's allowance (it covers 127.0.0.1
    // written as a number only).
    let port = site.url.trim_start_matches("http://127.0.0.1:").split('/').next().expect("port").to_string();
    let by_name = format!("https://localhost:{port}/invite");
    let out = ok_env(&alice, &["send", "bob", &by_name, "--preview"], &[LOOPBACK]);
    let err = stderr(&out);
    assert!(err.contains("sending without a preview") && err.contains("no public address"), "{err}");
    assert_eq!(site.hits(), 0, "the preview client connected to a private address by name");

    let got = bob.receive_json(&[]);
    assert_eq!(got.len(), 3, "every message went");
    assert!(got.iter().all(|m| m.get("preview").is_none()), "{got:?}");
}

/// A list of `links` (their most specific expression), signed by `key`.
fn list(key: &ed25519_dalek::SigningKey, version: u64, links: &[&str]) -> Vec<u8> {
    let prefixes: Vec<Vec<u8>> = links.iter().map(|l| linklist::link_hashes(l)[0][..8].to_vec()).collect();
    let unsigned = linklist::unsigned_list(version, 8, &prefixes).expect("list");
    let sig = key.sign(&linklist::signed_message(&unsigned));
    [unsigned, sig.to_bytes().to_vec()].concat()
}

fn fresh_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&rand::random())
}

#[test]
fn a_listed_link_is_marked_on_both_sides_and_nothing_leaves_the_device() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let key = fresh_key();
    let env = [(LIST_KEY_ENV, hex::encode(key.verifying_key().as_bytes()))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let file = alice.dir.path().join("list.bin");
    std::fs::write(&file, list(&key, 1, &["https://evil.example/login"])).expect("write");
    for u in [&alice, &bob] {
        let out = ok_env(u, &["linklist", "import", file.to_str().expect("path")], &env);
        assert!(String::from_utf8_lossy(&out.stdout).contains("version 1 (1 entries)"));
    }

    let bad = "log in at HTTPS://Evil.Example/login#now, quickly";
    let out = ok_env(&alice, &["send", "bob", bad, "--preview"], &[&env[..], &[LOOPBACK]].concat());
    let err = stderr(&out);
    assert!(err.contains("HTTPS://Evil.Example/login#now is on your dangerous-link list"), "{err}");
    assert!(err.contains("not fetched"), "a listed link is never fetched for a preview: {err}");
    ok_env(&alice, &["send", "bob", "fine: https://example.org/login"], &env);

    let got = run_env(&bob, &["receive", "--json"], &env);
    let got = parse_json_lines(&String::from_utf8_lossy(&got.stdout));
    assert_eq!(got[0]["dangerous_links"], serde_json::json!(["HTTPS://Evil.Example/login#now"]));
    assert!(got[1].get("dangerous_links").is_none(), "{}", got[1]);
    let shown = String::from_utf8(ok_env(&bob, &["history", "alice"], &env).stdout).expect("utf-8");
    assert!(shown.contains("warning: dangerous link"), "{shown}");
    let mine = parse_json_lines(&String::from_utf8_lossy(&ok_env(&alice, &["history", "bob", "--json"], &env).stdout));
    assert_eq!(mine[0]["dangerous_links"], serde_json::json!(["HTTPS://Evil.Example/login#now"]));

    // The server holds nothing that names the link or the list.
    for needle in [&b"evil.example"[..], b"Evil.Example", &linklist::link_hashes("https://evil.example/login")[0][..8]]
    {
        assert!(files_containing(&server.data_dir(), needle).is_empty());
    }
}

#[test]
fn a_bad_signature_an_older_version_or_garbage_is_refused_and_the_stored_list_kept() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let key = fresh_key();
    let hex_key = hex::encode(key.verifying_key().as_bytes());
    let env = [(LIST_KEY_ENV, hex_key.as_str())];
    let dir = alice.dir.path();
    let write = |name: &str, bytes: Vec<u8>| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).expect("write");
        p.to_str().expect("path").to_string()
    };
    let v2 = write("v2", list(&key, 2, &["https://evil.example/"]));
    let v1 = write("v1", list(&key, 1, &["https://other.example/"]));
    let forged = write("forged", list(&fresh_key(), 9, &["https://other.example/"]));
    let garbage = write("garbage", b"https://evil.example/ is bad, trust me".to_vec());
    let mut flipped = list(&key, 3, &["https://other.example/"]);
    flipped[20] ^= 1;
    let flipped = write("flipped", flipped);

    ok_env(&alice, &["linklist", "import", &v2], &env);
    let status = |u: &User| String::from_utf8_lossy(&ok_env(u, &["linklist", "status"], &env).stdout).into_owned();
    assert!(status(&alice).contains("version 2 (1 entries)"));
    for (file, needle) in [
        (&v1, "not newer than version 2"),
        (&forged, "signature"),
        (&flipped, "signature"),
        (&garbage, "not a dangerous-link list"),
        (&dir.join("missing").to_string_lossy().into_owned(), "cannot read"),
    ] {
        assert_clean_error(&run_env(&alice, &["linklist", "import", file], &env), needle);
        assert!(status(&alice).contains("version 2 (1 entries)"), "kept after {file}");
    }
    // The test's key is trusted only because the environment names it.
    assert_clean_error(&run_env(&alice, &["linklist", "import", &v2], &[]), "signature");
    // The same list again changes nothing; a newer one replaces it.
    assert!(String::from_utf8_lossy(&ok_env(&alice, &["linklist", "import", &v2], &env).stdout)
        .contains("already imported"));
    let v3 = write("v3", list(&key, 3, &["https://other.example/"]));
    let out = ok_env(&alice, &["linklist", "import", &v3], &env);
    assert!(String::from_utf8_lossy(&out.stdout).contains("replacing version 2"));
    assert!(status(&alice).contains("version 3"));
}

/// A running daemon, killed when dropped.
#[cfg(unix)]
struct Daemon(std::process::Child);

#[cfg(unix)]
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `subrosa daemon` on `user`'s home, with `env`, once it listens.
#[cfg(unix)]
fn daemon(user: &User, env: &[(&str, &str)]) -> Daemon {
    use std::io::BufRead as _;
    let mut c = user.cmd(&["daemon"]);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child =
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().expect("daemon starts");
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut first = String::new();
    err.read_line(&mut first).expect("a first line");
    assert!(first.contains("listening on"), "{first}");
    // The rest is read (and shown), so the daemon never writes into a closed pipe.
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        eprint!("{rest}");
    });
    Daemon(child)
}

/// `args` without the passphrase (so only a running daemon can serve it).
#[cfg(unix)]
fn via_daemon(user: &User, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = user.cmd(args);
    c.env_remove("SUBROSA_PASSPHRASE");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("subrosa runs");
    assert!(out.status.success(), "{} {args:?} through the daemon: {}", user.name, stderr(&out));
    out
}

/// Through running daemons, links go as without them: the sender's
/// daemon checks its list (and `send` prints the same warning) and makes
/// the preview asked for; the recipient's daemon hands out a stranger's
/// message marked as a request, its preview held back until `accept`
/// (through the daemon too), and marks a listed link.
#[cfg(unix)]
#[test]
fn links_through_daemons_are_checked_previewed_and_marked_as_without_them() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let key = fresh_key();
    let env = [(LIST_KEY_ENV, hex::encode(key.verifying_key().as_bytes()))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let env: Vec<(&str, &str)> = [&env[..], &[LOOPBACK]].concat();
    let file = alice.dir.path().join("list.bin");
    std::fs::write(&file, list(&key, 1, &["https://evil.example/login"])).expect("write");
    for u in [&alice, &bob] {
        ok_env(u, &["linklist", "import", file.to_str().expect("path")], &env);
    }
    let _alices = daemon(&alice, &env);
    let _bobs = daemon(&bob, &env);

    let out = via_daemon(&alice, &["send", "bob", "see https://evil.example/login"], &env);
    let err = stderr(&out);
    assert!(err.contains("https://evil.example/login is on your dangerous-link list"), "{err}");
    let image = Site::start("image/png", png());
    let site = page(&image);
    let text = format!("party at {}", site.url);
    via_daemon(&alice, &["send", "bob", &text, "--preview"], &env);
    assert_eq!(site.hits(), 1, "alice's daemon fetched the page");
    let out = via_daemon(&alice, &["send", "bob", "no link here", "--preview"], &env);
    assert!(stderr(&out).contains("sending without a preview"), "{}", stderr(&out));

    // Bob never wrote to alice: her messages are a request.
    let mut got = Vec::new();
    for _ in 0..10 {
        let out = via_daemon(&bob, &["receive", "--json", "--timeout", "30"], &env);
        got.extend(parse_json_lines(&String::from_utf8_lossy(&out.stdout)));
        if got.len() >= 3 {
            break;
        }
    }
    assert_eq!(texts(&got), ["see https://evil.example/login", text.as_str(), "no link here"]);
    assert!(got.iter().all(|m| m["request"] == true), "{got:?}");
    assert_eq!(got[0]["dangerous_links"], serde_json::json!(["https://evil.example/login"]));
    assert!(got[1].get("preview").is_none(), "a request shows no preview: {}", got[1]);
    let shown = String::from_utf8_lossy(&via_daemon(&bob, &["history", "alice"], &env).stdout).into_owned();
    assert!(shown.contains("[request] alice: see") && shown.contains("warning: dangerous link"), "{shown}");
    assert!(!shown.contains("Canary"), "{shown}");
    let requests = String::from_utf8_lossy(&via_daemon(&bob, &["requests"], &env).stdout).into_owned();
    assert!(requests.starts_with("alice\tdirect\t#"), "{requests}");

    let out = via_daemon(&bob, &["accept", "alice"], &env);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "accepted alice\n");
    let history =
        parse_json_lines(&String::from_utf8_lossy(&via_daemon(&bob, &["history", "alice", "--json"], &env).stdout));
    let m = history.iter().find(|m| m["text"] == text.as_str()).expect("alice's message");
    assert_eq!(m["preview"]["title"], "Canary & friends", "shown once accepted: {m}");
    assert!(m.get("request").is_none(), "{m}");
    assert!(String::from_utf8_lossy(&via_daemon(&bob, &["requests"], &env).stdout).is_empty());
    assert_eq!(site.hits(), 1, "bob never fetched it");
}

/// A first message from a stranger is a request: its preview is kept but
/// not shown until the request is accepted (and never fetched by anyone
/// but its sender).
#[test]
fn a_strangers_preview_waits_until_the_request_is_accepted() {
    let server = Server::start();
    let mallory = User::register(&server, "mallory");
    let bob = User::register(&server, "bob");
    let image = Site::start("image/png", png());
    let site = page(&image);
    let text = format!("free prize at {}", site.url);
    ok_env(&mallory, &["send", "bob", &text, "--preview"], &[LOOPBACK]);
    assert_eq!(site.hits(), 1);

    let got = parse_json_lines(&String::from_utf8_lossy(&run_env(&bob, &["receive", "--json"], &[LOOPBACK]).stdout));
    let m = got.iter().find(|m| m["text"] == text.as_str()).expect("mallory's message");
    assert_eq!(m["request"], true, "{m}");
    assert!(m.get("preview").is_none(), "a request shows no preview: {m}");
    let shown = String::from_utf8(ok_env(&bob, &["history", "mallory"], &[LOOPBACK]).stdout).expect("utf-8");
    assert!(!shown.contains("Canary"), "{shown}");

    bob.ok(&["accept", "mallory"]);
    let history = bob.history_json("mallory");
    let m = history.iter().find(|m| m["text"] == text.as_str()).expect("mallory's message");
    assert_eq!(m["preview"]["title"], "Canary & friends", "shown once accepted: {m}");
    assert_eq!(site.hits(), 1, "bob never fetched it");
}

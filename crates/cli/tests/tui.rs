//! `subrosa tui` for real: the built binary in a tmux pane (120×40)
//! against a real server, driven with send-keys and read with
//! capture-pane, while another user works from the command line.
//!
//! Needs tmux (`.ci/run` installs it); without it the test says SKIPPED
//! and passes.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::{subrosa_bin, texts, wait_until, Server, User, PASS};

/// A private tmux server (its own socket) running one `subrosa tui`.
struct Pane {
    dir: tempfile::TempDir,
}

impl Pane {
    fn tmux_available() -> bool {
        Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success())
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("tmux.sock")
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux").arg("-S").arg(self.socket()).args(args).output().expect("tmux runs")
    }

    /// Starts `subrosa tui` for `user` in a detached 120×40 session.
    fn start(user: &User) -> Pane {
        Self::start_with(user, Some(PASS))
    }

    /// As [`Self::start`], with this passphrase in the environment (none:
    /// only a running daemon can serve it).
    fn start_with(user: &User, passphrase: Option<&str>) -> Pane {
        Self::start_args(user, passphrase, &[])
    }

    /// As [`Self::start_with`], with these arguments after `tui`.
    fn start_args(user: &User, passphrase: Option<&str>, args: &[&str]) -> Pane {
        Self::start_env(user, passphrase, args, &[])
    }

    /// As [`Self::start_args`], with these variables in the environment.
    fn start_env(user: &User, passphrase: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Pane {
        let pane = Pane { dir: tempfile::tempdir().expect("tempdir") };
        // No escape delay (Esc then q must stay two keys), and a pane that
        // stays after the TUI exits, so its last words can be read.
        let conf = pane.dir.path().join("tmux.conf");
        std::fs::write(&conf, "set -g escape-time 0\nset -g remain-on-exit on\nset -g status off\n").unwrap();
        // The shell around it writes the exit status (128+N for a signal)
        // and the TUI's standard error to files the test reads.
        let command = format!(
            "'{}' --home '{}' tui {} 2>'{}'; echo $? >'{}'",
            subrosa_bin().display(),
            user.home().display(),
            args.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(" "),
            pane.dir.path().join("stderr").display(),
            pane.dir.path().join("exit").display()
        );
        let out = Command::new("tmux")
            .arg("-S")
            .arg(pane.socket())
            .arg("-f")
            .arg(&conf)
            .args(["new-session", "-d", "-s", "tui", "-x", "120", "-y", "40", &command])
            .env("SUBROSA_PASSPHRASE", passphrase.unwrap_or_default())
            .env("SUBROSA_KEY_CACHE", "off")
            .env("TERM", "xterm-256color")
            .env_remove("SUBROSA_HOME")
            .env_remove("TMUX")
            .envs(env.iter().copied())
            .output()
            .expect("tmux runs");
        assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
        pane
    }

    /// tmux key names (`Enter`, `M-Enter`, `Escape`, `q`).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "tui"];
        args.extend_from_slice(keys);
        assert!(self.tmux(&args).status.success());
    }

    /// Text typed as it is.
    fn type_text(&self, text: &str) {
        assert!(self.tmux(&["send-keys", "-t", "tui", "-l", text]).status.success());
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-t", "tui"]).stdout).into_owned()
    }

    /// Waits until the screen shows `needle`; fails with the screen.
    fn wait_for(&self, needle: &str) -> String {
        let mut screen = String::new();
        let seen = wait_until(Duration::from_secs(60), || {
            screen = self.screen();
            screen.contains(needle)
        });
        assert!(seen, "the screen never showed {needle:?}; it shows:\n{screen}");
        screen
    }

    /// The TUI's exit status, once it ended.
    fn exit_status(&self) -> Option<String> {
        let status = std::fs::read_to_string(self.dir.path().join("exit")).ok()?;
        status.ends_with('\n').then(|| status.trim().to_string())
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

#[test]
fn a_message_appears_live_and_a_reply_typed_in_the_tui_arrives() {
    if !Pane::tmux_available() {
        eprintln!("SKIPPED: tmux is not installed, so `subrosa tui` was not driven end to end");
        return;
    }
    let mut server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");

    let pane = Pane::start(&alice);
    pane.wait_for("online");
    pane.wait_for("No conversations yet");

    // Bob writes from the command line while alice's TUI is open: a new
    // conversation and its message appear by themselves.
    bob.send("alice", "hello from bob");
    let screen = pane.wait_for("hello from bob");
    assert!(screen.contains("bob: hello from bob"), "{screen}");
    // Hostile text shows as visible escapes: had the ESC reached tmux, the
    // title sequence would have been swallowed, not printed.
    bob.send("alice", "\u{1b}]0;pwned\u{7}title");
    pane.wait_for("\\u{1b}]0;pwned\\u{7}title");

    // Alice answers in the TUI: one line, then two lines in one message.
    pane.keys(&["i"]);
    pane.wait_for("stop writing");
    pane.type_text("reply from alice");
    pane.keys(&["Enter"]);
    pane.type_text("line one");
    pane.keys(&["M-Enter"]);
    pane.type_text("line two");
    pane.keys(&["Enter"]);
    let screen = pane.wait_for("you: line one");
    assert!(screen.contains("you: reply from alice"), "{screen}");

    let mut got = Vec::new();
    let arrived = wait_until(Duration::from_secs(60), || {
        got.extend(texts(&bob.receive_json(&["--timeout", "2"])));
        got.contains(&"reply from alice".to_string()) && got.contains(&"line one\nline two".to_string())
    });
    assert!(arrived, "bob got {got:?}; alice's screen:\n{}", pane.screen());
    assert!(!pane.screen().contains("(queued)"), "sent, not left queued:\n{}", pane.screen());
    pane.keys(&["Escape"]);
    // Out of the composer: the chat's keys are on the help line.
    pane.wait_for("first/newest");

    // Commands: a direct conversation by handle, its safety number (the
    // one carol's CLI shows) marked verified, and a new group.
    let carol = User::register(&server, "carol");
    pane.type_text(":dm carol");
    pane.keys(&["Enter"]);
    pane.wait_for("carol · not verified");
    pane.keys(&["i"]);
    pane.type_text("hi carol");
    pane.keys(&["Enter", "Escape"]);
    pane.wait_for("you: hi carol");
    let mut got = Vec::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            got.extend(texts(&carol.receive_json(&["--timeout", "2"])));
            got.contains(&"hi carol".to_string())
        }),
        "carol got {got:?}"
    );
    let number = carol.ok(&["safety-number", "alice"]);
    let first_groups: Vec<&str> = number.split_whitespace().take(4).collect();
    pane.type_text(":safety");
    pane.keys(&["Enter"]);
    let screen = pane.wait_for("Safety number with carol");
    assert!(screen.contains(&first_groups.join(" ")), "carol's number {number:?} not on\n{screen}");
    pane.keys(&["v"]);
    pane.wait_for("carol ✓ verified");
    pane.type_text(":group \"night owls\" bob carol");
    pane.keys(&["Enter"]);
    pane.wait_for("#night owls (group)");
    pane.keys(&["i"]);
    pane.type_text("hello owls");
    pane.keys(&["Enter", "Escape"]);
    pane.wait_for("you: hello owls");
    let mut got = Vec::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            got.extend(texts(&bob.receive_json(&["--timeout", "2"])));
            got.contains(&"hello owls".to_string())
        }),
        "bob got {got:?}"
    );

    // The server goes away: the status line says so, a message typed
    // meanwhile shows as queued, and goes out by itself once it is back.
    server.kill();
    pane.wait_for("offline (");
    pane.keys(&["i"]);
    pane.type_text("sent while offline");
    pane.keys(&["Enter", "Escape"]);
    pane.wait_for("you: sent while offline (queued)");
    server.restart_with(&[]);
    pane.wait_for("reconnected");
    let mut screen = String::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            screen = pane.screen();
            screen.contains("you: sent while offline") && !screen.contains("(queued)")
        }),
        "still queued after reconnecting:\n{screen}"
    );
    let mut got = Vec::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            got.extend(texts(&bob.receive_json(&["--timeout", "2"])));
            got.contains(&"sent while offline".to_string())
        }),
        "bob got {got:?}"
    );

    // q: the TUI ends cleanly.
    pane.keys(&["q"]);
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            status = pane.exit_status();
            status.is_some()
        }),
        "q did not quit:\n{}",
        pane.screen()
    );
    assert_eq!(status.as_deref(), Some("0"), "exit status; stderr: {}", pane.stderr());
}

#[test]
fn through_a_running_daemon_the_tui_needs_no_passphrase_and_works_the_same() {
    if !Pane::tmux_available() {
        eprintln!("SKIPPED: tmux is not installed, so `subrosa tui` was not driven end to end");
        return;
    }
    // With a call relay: alice calls at the end.
    let relay = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let server = Server::start_with(&["--relay-listen", &relay.to_string()]);
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "before the tui");
    /// Ends the daemon however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut daemon = Killed(
        bob.cmd(&["daemon"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("daemon starts"),
    );
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(daemon.0.stderr.as_mut().expect("stderr")), &mut first)
        .expect("the daemon says where it listens");
    assert!(first.contains("listening on"), "{first}");

    // An empty passphrase would not open bob's store: the daemon serves
    // this TUI.
    let downloads = bob.dir.path().join("downloads");
    std::fs::create_dir(&downloads).unwrap();
    let pane = Pane::start_args(&bob, None, &["--downloads", downloads.to_str().unwrap()]);
    pane.wait_for("online");
    pane.wait_for("before the tui");
    alice.send("bob", "live through the daemon");
    pane.wait_for("alice: live through the daemon");
    pane.keys(&["i"]);
    pane.type_text("reply through the daemon");
    pane.keys(&["Enter", "Escape"]);
    pane.wait_for("you: reply through the daemon");
    let mut got = Vec::new();
    let arrived = wait_until(Duration::from_secs(60), || {
        got.extend(texts(&alice.receive_json(&["--timeout", "2"])));
        got.contains(&"reply through the daemon".to_string())
    });
    assert!(arrived, "alice got {got:?}; bob's screen:\n{}", pane.screen());

    // Files through the daemon: s saves one that came, A sends one, with
    // the daemon's progress.
    let theirs = alice.dir.path().join("from-alice.txt");
    std::fs::write(&theirs, b"via the daemon").unwrap();
    alice.ok(&["send", "bob", "--attach", theirs.to_str().unwrap()]);
    pane.wait_for("[file] from-alice.txt (14 B)");
    pane.keys(&["k", "s"]);
    pane.wait_for("1 file(s) saved in");
    assert_eq!(std::fs::read(downloads.join("from-alice.txt")).unwrap(), b"via the daemon");
    let mine = bob.dir.path().join("from-bob.txt");
    std::fs::write(&mine, b"and back").unwrap();
    pane.keys(&["Escape", "A"]);
    pane.type_text(mine.to_str().unwrap());
    pane.keys(&["Enter"]);
    pane.wait_for("[file] from-bob.txt (8 B) sent");
    let alice_dl = alice.dir.path().join("downloads");
    std::fs::create_dir(&alice_dl).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || {
            alice.receive_json(&["--timeout", "1", "--downloads", alice_dl.to_str().unwrap()]);
            std::fs::read(alice_dl.join("from-bob.txt")).is_ok_and(|b| b == b"and back")
        }),
        "alice never got from-bob.txt; bob's screen:\n{}",
        pane.screen()
    );

    // A call rings in the status line; :answer takes it through the
    // daemon, which has no sound card in this build and says so.
    let silence = alice.dir.path().join("heard.wav");
    let mut call = Killed(
        alice
            .cmd(&["call", "bob", "--mute", "--output", silence.to_str().unwrap(), "--timeout", "20"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("alice calls"),
    );
    pane.wait_for("alice is calling: :answer takes the call");
    if cfg!(not(feature = "audio")) {
        pane.keys(&["Escape", ":"]);
        pane.type_text("answer");
        pane.keys(&["Enter"]);
        pane.wait_for("calls in the terminal UI need the sound card");
    }
    let _ = call.0.kill();

    pane.keys(&["Escape", "q"]);
    assert!(wait_until(Duration::from_secs(30), || pane.exit_status().is_some()), "q did not quit");
    assert_eq!(pane.exit_status().as_deref(), Some("0"), "stderr: {}", pane.stderr());
    drop(daemon);
}

#[test]
fn a_shown_conversation_is_read_and_reactions_and_edits_appear_live() {
    if !Pane::tmux_available() {
        eprintln!("SKIPPED: tmux is not installed, so `subrosa tui` was not driven end to end");
        return;
    }
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "first words");
    bob.receive_json(&[]);
    let mine = alice.history_json("bob");
    let id = mine.iter().find(|m| m["text"] == "first words").unwrap()["id"].as_str().unwrap().to_string();

    // alice's TUI shows the conversation; bob reacts and she edits.
    let pane = Pane::start(&alice);
    pane.wait_for("you: first words");
    bob.ok(&["react", "alice", &id, "+1"]);
    pane.wait_for("you: first words [+1 bob]");
    alice.ok(&["edit", "bob", &id, "second words"]);
    // (the TUI sees its own device's edit when it reloads; bob's screen is
    // the command line.)
    assert!(bob.ok(&["receive"]).contains("alice: second words (edited)"));

    // bob's words shown in alice's TUI are read: bob sees `read`.
    bob.send("alice", "read me");
    pane.wait_for("bob: read me");
    let mut state = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(30), || {
            bob.receive_json(&[]);
            state = bob.history_json("alice").iter().find(|m| m["text"] == "read me").unwrap()["state"].clone();
            state == "read"
        }),
        "state {state}; alice's screen:\n{}",
        pane.screen()
    );
    pane.keys(&["q"]);
}

/// Waits until `user`'s history with `with` has a message that `pred`
/// accepts (receiving meanwhile); fails with what it had.
fn wait_for_history(user: &User, with: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let mut seen = Vec::new();
    let found = wait_until(Duration::from_secs(60), || {
        user.receive_json(&["--timeout", "1"]);
        seen = user.history_json(with);
        seen.iter().any(&pred)
    });
    assert!(found, "{} never saw {what}; history: {seen:#?}", user.name);
}

#[test]
fn on_a_selected_message_the_tui_replies_reacts_edits_deletes_and_moves_files() {
    if !Pane::tmux_available() {
        eprintln!("SKIPPED: tmux is not installed, so `subrosa tui` was not driven end to end");
        return;
    }
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    bob.send("alice", "pick me");
    alice.receive_json(&[]);
    let pick = alice.history_json("bob")[0]["id"].as_str().unwrap().to_string();
    let downloads = alice.dir.path().join("downloads");
    std::fs::create_dir(&downloads).unwrap();
    let pane = Pane::start_args(&alice, Some(PASS), &["--downloads", downloads.to_str().unwrap()]);
    pane.wait_for("bob: pick me");

    // k selects bob's message; the help line turns to what can be done.
    pane.keys(&["Tab", "k"]);
    pane.wait_for(" dd  delete");
    // + and an emoji: bob sees alice's reaction.
    pane.keys(&["+"]);
    pane.type_text("🎉");
    pane.keys(&["Enter"]);
    pane.wait_for("pick me [🎉 alice]");
    wait_for_history(&bob, "alice", "alice's reaction", |m| {
        m["text"] == "pick me" && m["reactions"][0]["emoji"] == "🎉" && m["reactions"][0]["from"][0] == "alice"
    });

    // r: a reply, quoted in the TUI, arrives as a reply to it.
    pane.keys(&["r"]);
    pane.wait_for("Reply to bob");
    pane.type_text("picked");
    pane.keys(&["Enter", "Escape"]);
    pane.wait_for("↱ bob: pick me");
    wait_for_history(&bob, "alice", "the reply", |m| m["text"] == "picked" && m["reply_to"] == pick.as_str());

    // j to alice's reply, e to change it: bob sees the new text, edited.
    pane.keys(&["j", "e"]);
    pane.wait_for("Edit your message");
    pane.keys(&["C-u"]);
    pane.type_text("chosen");
    pane.keys(&["Enter"]);
    pane.wait_for("you: chosen (edited)");
    wait_for_history(&bob, "alice", "the edit", |m| m["text"] == "chosen" && m["edited"] == true);

    // dd: deleted for everyone.
    pane.keys(&["d"]);
    pane.wait_for("d again deletes it");
    pane.keys(&["d"]);
    pane.wait_for("you: (deleted)");
    wait_for_history(&bob, "alice", "the delete", |m| m["deleted"] == true && m["outgoing"] == false);

    // bob edits from the command line: alice's screen shows it live.
    bob.ok(&["edit", "alice", &pick, "pick me, please"]);
    pane.wait_for("bob: pick me, please (edited)");

    // A: a file from a path typed in the composer reaches bob intact.
    let file = alice.dir.path().join("plan.txt");
    std::fs::write(&file, b"meet at the bridge").unwrap();
    pane.keys(&["Escape", "A"]);
    pane.wait_for("File to send");
    pane.type_text(file.to_str().unwrap());
    pane.keys(&["Enter"]);
    pane.wait_for("[file] plan.txt (18 B) sent");
    let bob_dl = bob.dir.path().join("downloads");
    std::fs::create_dir(&bob_dl).unwrap();
    let mut got = Vec::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            bob.receive_json(&["--timeout", "1", "--downloads", bob_dl.to_str().unwrap()]);
            got = std::fs::read(bob_dl.join("plan.txt")).unwrap_or_default();
            !got.is_empty()
        }),
        "bob never got plan.txt; alice's screen:\n{}",
        pane.screen()
    );
    assert_eq!(got, b"meet at the bridge");

    // bob sends a file; s on it saves it into alice's downloads directory.
    let theirs = bob.dir.path().join("map.txt");
    std::fs::write(&theirs, b"X marks the spot").unwrap();
    bob.ok(&["send", "alice", "the map", "--attach", theirs.to_str().unwrap()]);
    pane.wait_for("[file] map.txt (16 B) not downloaded yet");
    pane.keys(&["G", "k", "s"]);
    pane.wait_for("1 file(s) saved in");
    pane.wait_for(&format!("saved to {}", downloads.join("map.txt").display()));
    assert_eq!(std::fs::read(downloads.join("map.txt")).unwrap(), b"X marks the spot");

    pane.keys(&["q"]);
    assert!(wait_until(Duration::from_secs(30), || pane.exit_status().is_some()), "q did not quit");
    assert_eq!(pane.exit_status().as_deref(), Some("0"), "stderr: {}", pane.stderr());
}

/// A private D-Bus session bus, and a monitor printing every call to the
/// notification service on it (no notification server needs to answer: the
/// call itself is what the desktop would show).
struct Bus {
    daemon: std::process::Child,
    monitor: std::process::Child,
    address: String,
    seen: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Bus {
    fn start() -> Option<Bus> {
        // (dbus-monitor has no --version: that it runs at all is enough.)
        let available = |c: &str| Command::new(c).arg("--version").output().is_ok();
        if !available("dbus-daemon") || !available("dbus-monitor") {
            return None;
        }
        let mut daemon = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        let mut address = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(daemon.stdout.take()?), &mut address).ok()?;
        let address = address.trim().to_string();
        let mut monitor = Command::new("dbus-monitor")
            .args(["--address", &address, "interface='org.freedesktop.Notifications'"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (out, into) = (monitor.stdout.take()?, seen.clone());
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                into.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        Some(Bus { daemon, monitor, address, seen })
    }

    fn seen(&self) -> String {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.monitor.kill();
        let _ = self.daemon.kill();
        let _ = self.monitor.wait();
        let _ = self.daemon.wait();
    }
}

#[test]
fn a_desktop_notification_names_the_sender_and_never_the_text_unless_asked() {
    if !Pane::tmux_available() {
        eprintln!("SKIPPED: tmux is not installed, so `subrosa tui` was not driven end to end");
        return;
    }
    let Some(bus) = Bus::start() else {
        eprintln!("SKIPPED: no dbus-daemon and dbus-monitor, so notifications were not watched");
        return;
    };
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    bob.send("alice", "first");
    carol.send("alice", "first too");
    alice.receive_json(&[]);
    let env = [("DBUS_SESSION_BUS_ADDRESS", bus.address.as_str())];
    let pane = Pane::start_env(&alice, Some(PASS), &["--notifications", "on"], &env);
    pane.wait_for("online");
    // Whichever is on screen, the other one notifies.
    let shown = if pane.screen().contains("bob: first") { "bob" } else { "carol" };
    let other = if shown == "bob" { &carol } else { &bob };
    other.send("alice", "the secret <b>plan</b>");
    pane.wait_for("the secret");
    let mut seen = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            seen = bus.seen();
            seen.contains("New message")
        }),
        "no notification on the bus: {seen}"
    );
    assert!(seen.contains("member=Notify") && seen.contains(&format!("\"{}\"", other.name)), "{seen}");
    assert!(!seen.contains("secret"), "the text stays off the desktop: {seen}");
    pane.keys(&["q"]);
    drop(pane);

    // with-text: the text, its markup escaped. (The conversation that had
    // the newest message is on screen now: the first one writes.)
    let pane = Pane::start_env(&alice, Some(PASS), &["--notifications", "with-text"], &env);
    pane.wait_for("online");
    let first = if shown == "bob" { &bob } else { &carol };
    first.send("alice", "now <b>shown</b> & told");
    pane.wait_for("now <b>shown</b>");
    assert!(
        wait_until(Duration::from_secs(30), || {
            seen = bus.seen();
            seen.contains("now &lt;b&gt;shown&lt;/b&gt; &amp; told")
        }),
        "{seen}"
    );
    pane.keys(&["q"]);
}

/// The daemon shows desktop notifications as the terminal UI does (here
/// with the text, its markup escaped), and none while a terminal UI over it
/// shows its own;
/// that UI marks a message request, accepts it, and sets the
/// conversation's disappearing timer, all through the daemon.
#[test]
fn the_daemon_notifies_and_the_tui_over_it_accepts_a_request_and_sets_the_timer() {
    if !Pane::tmux_available() {
        eprintln!("SKIPPED: tmux is not installed, so `subrosa tui` was not driven end to end");
        return;
    }
    let Some(bus) = Bus::start() else {
        eprintln!("SKIPPED: no dbus-daemon and dbus-monitor, so notifications were not watched");
        return;
    };
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello stranger");
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut daemon = Killed(
        bob.cmd(&["daemon", "--notifications", "with-text"])
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("daemon starts"),
    );
    let mut err = std::io::BufReader::new(daemon.0.stderr.take().expect("stderr"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut err, &mut first).expect("the daemon says where it listens");
    assert!(first.contains("listening on"), "{first}");
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        eprint!("{rest}");
    });
    alice.send("bob", "the <b>plan</b>");
    let mut seen = String::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            seen = bus.seen();
            seen.contains("the &lt;b&gt;plan&lt;/b&gt;")
        }),
        "the daemon showed no notification: {seen}"
    );
    assert!(seen.contains("\"alice\""), "{seen}");

    // The UI over the daemon (no passphrase): the request is marked. Its
    // own notifications are off, so the daemon's go on as bob set them.
    let pane = Pane::start_with(&bob, None);
    pane.wait_for("online");
    pane.wait_for("alice (request)");
    pane.wait_for("Message request");
    alice.send("bob", "while the tui runs");
    pane.wait_for("while the tui runs");
    assert!(
        wait_until(Duration::from_secs(60), || bus.seen().contains("while the tui runs")),
        "a UI without notifications silenced the daemon's: {}",
        bus.seen()
    );
    pane.keys(&[":"]);
    pane.type_text("accept");
    pane.keys(&["Enter"]);
    pane.wait_for("accepted: receipts flow");
    pane.keys(&[":"]);
    pane.type_text("disappear 1h");
    pane.keys(&["Enter"]);
    // Shown once the conversations were read again, after both commands.
    let screen = pane.wait_for("disappearing 1h");
    assert!(!screen.contains("(request)") && !screen.contains("Message request"), "{screen}");
    pane.keys(&["q"]);
    assert!(wait_until(Duration::from_secs(30), || pane.exit_status().is_some()), "q did not quit");
    assert_eq!(pane.exit_status().as_deref(), Some("0"), "stderr: {}", pane.stderr());
    drop(pane);

    // A UI that shows its own notifications has the daemon show none
    // meanwhile (each message would otherwise come up twice).
    let env = [("DBUS_SESSION_BUS_ADDRESS", bus.address.as_str())];
    let pane = Pane::start_env(&bob, None, &["--notifications", "on"], &env);
    pane.wait_for("online");
    alice.send("bob", "behind a notifying tui");
    pane.wait_for("behind a notifying tui");
    pane.keys(&["q"]);
    assert!(wait_until(Duration::from_secs(30), || pane.exit_status().is_some()), "q did not quit");
    drop(pane);

    // With that UI gone the daemon notifies again; it did not while the UI
    // ran (that note would have come first).
    alice.send("bob", "after the tui");
    assert!(wait_until(Duration::from_secs(60), || bus.seen().contains("after the tui")), "no note after the UI quit");
    assert!(!bus.seen().contains("behind a notifying tui"), "{}", bus.seen());
    let timer = bob.history_json("alice");
    drop(daemon);
    assert!(timer.iter().any(|m| m["text"].as_str().is_some_and(|t| t.ends_with("disappearing messages to 1h"))));
}

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
        let pane = Pane { dir: tempfile::tempdir().expect("tempdir") };
        // No escape delay (Esc then q must stay two keys), and a pane that
        // stays after the TUI exits, so its last words can be read.
        let conf = pane.dir.path().join("tmux.conf");
        std::fs::write(&conf, "set -g escape-time 0\nset -g remain-on-exit on\nset -g status off\n").unwrap();
        // The shell around it writes the exit status (128+N for a signal)
        // and the TUI's standard error to files the test reads.
        let command = format!(
            "'{}' --home '{}' tui 2>'{}'; echo $? >'{}'",
            subrosa_bin().display(),
            user.home().display(),
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
    pane.wait_for("switch pane");

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
    let server = Server::start();
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
    let pane = Pane::start_with(&bob, None);
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
    pane.keys(&["q"]);
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

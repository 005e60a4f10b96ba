//! Text from other people never reaches the terminal raw: a message or a
//! group name holding an OSC title sequence, a C1 CSI, DEL or a bidi
//! override is printed with those characters neutralised, in `receive`,
//! `history` and `groups`, and in JSON escaped but exact.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use common::{parse_json_lines, Server, User};

/// An OSC that retitles the window, a bidi override, a C1 CSI, DEL, a
/// right-to-left isolate, and a line of its own posing as another sender.
const HOSTILE: &str =
    "\u{1b}]0;pwned\u{7}see \u{202e}gnp.exe \u{9b}31mred\u{7f} \u{2067}x\u{2069}\n[2026-01-01 00:00:00] carol: hi";

/// Characters a terminal acts on, or that reorder or hide text (newline and
/// tab aside: output is made of lines, some of tab-separated columns).
fn raw_controls(out: &[u8]) -> Vec<char> {
    String::from_utf8_lossy(out)
        .chars()
        .filter(|&c| {
            (c < ' ' && c != '\n' && c != '\t')
                || ('\u{7f}'..='\u{9f}').contains(&c)
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
        })
        .collect()
}

fn assert_clean(what: &str, out: &std::process::Output) {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    for (name, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let found = raw_controls(bytes);
        assert!(found.is_empty(), "{what} printed raw {found:?} on {name}: {:?}", String::from_utf8_lossy(bytes));
        assert!(!bytes.windows(2).any(|w| w == [0xc2, 0x9b]), "{what}: raw C1 CSI");
    }
}

#[test]
fn others_text_and_group_names_reach_the_terminal_neutralised() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", HOSTILE);

    let out = bob.run(&["receive"]);
    assert_clean("receive", &out);
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(shown.contains("\\u{1b}]0;pwned\\u{7}") && shown.contains("\\u{202e}"), "visible escapes: {shown}");
    // The forged line stays inside alice's message, indented.
    assert!(!shown.lines().any(|l| l.starts_with("[2026-01-01")), "a message forged a line: {shown}");

    let out = bob.run(&["history", "alice"]);
    assert_clean("history", &out);

    // JSON: exact once parsed, but no raw control on the terminal.
    alice.send("bob", HOSTILE);
    let out = bob.run(&["receive", "--json"]);
    assert_clean("receive --json", &out);
    let got = parse_json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["text"], HOSTILE, "the JSON carries the text exactly");
    let out = bob.run(&["history", "alice", "--json"]);
    assert_clean("history --json", &out);

    // A group name (only Cc controls are refused when creating one).
    let name = "\u{202e}fdp.exe\u{2066}";
    alice.ok(&["group", "create", name, "bob"]);
    let out = bob.run(&["receive"]);
    assert_clean("receive (group)", &out);
    let out = bob.run(&["groups"]);
    assert_clean("groups", &out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\\u{202e}fdp.exe"));
    let out = alice.run(&["groups"]);
    assert_clean("groups (creator)", &out);
}

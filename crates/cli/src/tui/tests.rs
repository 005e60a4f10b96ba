//! The screen, drawn on ratatui's `TestBackend`: snapshots of the main
//! views (text files in `snapshots/`, compared cell for cell; run with
//! `SUBROSA_UPDATE_SNAPSHOTS=1` to rewrite them after a deliberate change,
//! and read the diff), and what others' text can and cannot do to a screen.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use crossterm::event::{KeyCode, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::Terminal;
use subrosa_client::{ClientEvent, MessageState, StoredMessage, SystemEvent};

use super::render;
use super::state::tests::{chord, conversation, key, message, typed};
use super::state::{App, FileInfo, FileState, Input, Outcome, Overlay, Progress};
use crate::term::is_dangerous;

/// 2026-11-30 09:41:00 UTC, in ms.
const T0: u64 = 1_796_031_660_000;
const MINUTE: u64 = 60_000;

fn draw(app: &mut App, w: u16, h: u16) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(w, h)).expect("terminal");
    let mut scroll = 0;
    terminal.draw(|f| scroll = render::draw(f, app)).expect("draw");
    app.shown_scroll(scroll);
    let buffer = terminal.backend().buffer();
    (0..h)
        .map(|y| {
            let row: String = (0..w).map(|x| buffer[(x, y)].symbol().to_string()).collect();
            row.trim_end().to_string()
        })
        .collect()
}

fn snapshot(name: &str, lines: &[String]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/tui/snapshots").join(format!("{name}.txt"));
    let got = lines.join("\n") + "\n";
    if std::env::var_os("SUBROSA_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("no snapshot {}: run with SUBROSA_UPDATE_SNAPSHOTS=1", path.display()));
    assert!(got == want, "screen differs from {}:\n--- got ---\n{got}--- want ---\n{want}", path.display());
}

fn mine(conversation: &str, text: &str, at: u64, state: MessageState) -> StoredMessage {
    let mut m = message(conversation, "alice", text, at);
    m.outgoing = true;
    m.state = Some(state);
    m
}

fn system(conversation: &str, event: SystemEvent, at: u64) -> StoredMessage {
    let mut m = message(conversation, "", "", at);
    m.text = event.render("alice");
    m.system = true;
    m.event = Some(event);
    m
}

/// Alice with a verified 1:1 with bob and a group, and one unread.
fn sample() -> App {
    let mut app = App::new("alice");
    let mut bob = conversation(
        "aa",
        "bob",
        false,
        vec![
            message("aa", "bob", "are you coming tonight?", T0),
            mine("aa", "yes, after work", T0 + MINUTE, MessageState::Sent),
            message("aa", "bob", "great\nbring the map", T0 + 2 * MINUTE),
            mine("aa", "ok", T0 + 3 * MINUTE, MessageState::Queued),
        ],
    );
    bob.verified = true;
    let mut team = conversation(
        "bb",
        "night owls",
        true,
        vec![
            system("bb", SystemEvent::AddedYou { by: "carol".into(), group: "night owls".into() }, T0 - 10 * MINUTE),
            message("bb", "carol", "welcome!", T0 - 9 * MINUTE),
        ],
    );
    team.messages[1].group = true;
    app.handle(Input::Loaded { conversations: vec![bob, team], select: None });
    app.handle(Input::Client(ClientEvent::Connected));
    app.handle(Input::Client(ClientEvent::Message({
        let mut m = message("bb", "carol", "who brings snacks?", T0 + 4 * MINUTE);
        m.group = true;
        m
    })));
    // Back to bob's, the most recent but one.
    app.handle(key(KeyCode::Char('j')));
    app
}

#[test]
fn snapshot_list_and_chat() {
    let mut app = sample();
    snapshot("list_and_chat", &draw(&mut app, 80, 20));
}

#[test]
fn snapshot_writing_offline() {
    let mut app = sample();
    app.handle(Input::Client(ClientEvent::Disconnected {
        reason: "connection refused".into(),
        retry_in: Duration::from_secs(4),
    }));
    app.handle(key(KeyCode::Char('i')));
    typed(&mut app, "see you");
    app.handle(chord(KeyCode::Enter, KeyModifiers::ALT));
    typed(&mut app, "at 8");
    snapshot("writing_offline", &draw(&mut app, 80, 20));
}

#[test]
fn snapshot_group_chat_with_system_line_and_command_prompt() {
    let mut app = sample();
    app.handle(key(KeyCode::Char('k')));
    app.handle(key(KeyCode::Tab));
    app.handle(key(KeyCode::Char(':')));
    typed(&mut app, "add dave");
    snapshot("group_and_prompt", &draw(&mut app, 80, 20));
}

#[test]
fn snapshot_help() {
    let mut app = sample();
    app.handle(key(KeyCode::Char('?')));
    snapshot("help", &draw(&mut app, 80, 36));
}

#[test]
fn snapshot_empty_start() {
    let mut app = App::new("alice");
    snapshot("empty", &draw(&mut app, 80, 12));
}

#[test]
fn snapshot_safety_number_with_qr() {
    let mut app = sample();
    let number = "123456789012345678901234567890123456789012345678901234567890";
    let mut lines: Vec<String> = ["12345 67890 12345 67890", "12345 67890 12345 67890", "12345 67890 12345 67890"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    lines.push(String::new());
    lines.extend(super::qr_lines(number));
    app.handle(Input::Done(Outcome::Overlay(Overlay {
        title: "Safety number with bob".into(),
        lines,
        verify: Some(("bob".into(), "1234".into())),
    })));
    snapshot("safety_number", &draw(&mut app, 80, 36));
}

#[test]
fn chat_scrolls_back_and_is_clamped_at_the_top() {
    let mut app = App::new("alice");
    let messages = (0..40).map(|i| message("aa", "bob", &format!("line {i}"), T0 + i * MINUTE)).collect();
    app.handle(Input::Loaded { conversations: vec![conversation("aa", "bob", false, messages)], select: None });
    // (The list's preview shows the last message too: look at the chat's.)
    let screen = draw(&mut app, 60, 14);
    assert!(screen.iter().any(|l| l.contains("bob: line 39")), "the newest line shows: {screen:#?}");
    app.handle(key(KeyCode::Tab));
    app.handle(key(KeyCode::Char('g')));
    let screen = draw(&mut app, 60, 14);
    assert!(screen.iter().any(|l| l.contains("bob: line 0")), "g shows the first: {screen:#?}");
    assert!(!screen.iter().any(|l| l.contains("bob: line 39")));
    // Clamped: Ctrl-D after g moves half a page down, not from "infinity".
    let top = app.scroll;
    app.handle(chord(KeyCode::Char('d'), KeyModifiers::CONTROL));
    assert_eq!(app.scroll, top - 10);
    let screen = draw(&mut app, 60, 14);
    assert!(screen.iter().any(|l| l.contains("bob: line 10")) && !screen.iter().any(|l| l.contains("bob: line 9")));
    // A resize (smaller) keeps the scroll within bounds.
    draw(&mut app, 40, 8);
    app.handle(key(KeyCode::Char('G')));
    assert!(draw(&mut app, 40, 8).iter().any(|l| l.contains("bob: line 39")));
}

const HOSTILE: &str = "x\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m\u{202e}evil\u{2066}\u{200b}\r";

/// Every cell's text, to search for raw control characters.
fn cells(app: &mut App) -> String {
    draw(app, 100, 30).join("\n")
}

#[test]
fn no_escape_sequence_from_others_reaches_the_screen() {
    let mut app = App::new("alice");
    let mut group = conversation("bb", &format!("grp{HOSTILE}"), true, vec![]);
    group.messages.push({
        let mut m = message("bb", &format!("mallory{HOSTILE}"), &format!("hi{HOSTILE}\nsecond{HOSTILE}"), T0);
        m.group = true;
        m
    });
    group.messages.push(system("bb", SystemEvent::Renamed { by: "mallory".into(), name: format!("n{HOSTILE}") }, T0));
    let mut failed = mine("bb", "mine", T0, MessageState::Failed);
    failed.reason = Some(format!("server says{HOSTILE}"));
    group.messages.push(failed);
    app.handle(Input::Loaded { conversations: vec![group], select: None });
    app.handle(Input::Client(ClientEvent::Alert(format!("alert{HOSTILE}"))));
    app.handle(Input::Client(ClientEvent::Disconnected { reason: format!("r{HOSTILE}"), retry_in: Duration::ZERO }));
    let screen = cells(&mut app);
    let raw: Vec<char> = screen.chars().filter(|&c| c != '\n' && is_dangerous(c)).collect();
    assert!(raw.is_empty(), "raw control characters on screen: {raw:?}\n{screen}");
    // Shown, visibly, not dropped: the user sees that something odd was sent.
    assert!(screen.contains("\\u{1b}]0;pwned"), "{screen}");
    assert!(screen.contains("\\u{202e}evil"), "{screen}");
    assert!(screen.contains("second"), "a message's second line is shown: {screen}");

    // The same in a box (members, safety number) and in the draft.
    app.handle(Input::Done(Outcome::Overlay(Overlay {
        title: format!("t{HOSTILE}"),
        lines: vec![format!("member{HOSTILE}")],
        verify: None,
    })));
    let screen = cells(&mut app);
    assert!(screen.chars().all(|c| c == '\n' || !is_dangerous(c)), "{screen}");
    assert!(screen.contains("memberx\\u{1b}"), "{screen}");
    app.handle(key(KeyCode::Esc));
    app.handle(key(KeyCode::Char('i')));
    typed(&mut app, HOSTILE);
    let screen = cells(&mut app);
    assert!(screen.chars().all(|c| c == '\n' || !is_dangerous(c)), "{screen}");
}

/// Bob's 1:1 with what messages carry: a reply, reactions, an edit, a
/// delete, files, and alice's receipts.
fn annotated() -> App {
    let mut app = App::new("alice");
    let mut question = message("aa", "bob", "are you coming tonight? I could bring the map and the snacks", T0);
    question.reactions = vec![subrosa_client::store::Reaction { emoji: "👍".into(), from: vec!["alice".into()] }];
    let mut answer = mine("aa", "yes, after work", T0 + MINUTE, MessageState::Read);
    answer.reply_to = Some(question.id.clone());
    let mut edited = mine("aa", "at 8, not 7", T0 + 2 * MINUTE, MessageState::Delivered);
    edited.edited = true;
    let mut gone = message("aa", "bob", "", T0 + 3 * MINUTE);
    gone.deleted = true;
    let photo = message("aa", "bob", "the map", T0 + 4 * MINUTE);
    let sent = mine("aa", "ok", T0 + 5 * MINUTE, MessageState::Sent);
    let queued = mine("aa", "see you", T0 + 6 * MINUTE, MessageState::Queued);
    let mut bob = conversation("aa", "bob", false, vec![question, answer, edited, gone, photo.clone(), sent, queued]);
    bob.files.insert(
        photo.id,
        vec![
            FileInfo { name: "map.png".into(), size: 48_213, state: FileState::Pending, saved: None },
            FileInfo {
                name: "notes.txt".into(),
                size: 12,
                state: FileState::Stored,
                saved: Some("/home/alice/Downloads/notes.txt".into()),
            },
        ],
    );
    app.handle(Input::Loaded { conversations: vec![bob], select: None });
    app.handle(Input::Client(ClientEvent::Connected));
    app.handle(key(KeyCode::Tab));
    app
}

#[test]
fn snapshot_replies_reactions_edits_deletes_files_and_receipts() {
    let mut app = annotated();
    snapshot("annotations", &draw(&mut app, 80, 24));
}

#[test]
fn snapshot_a_selected_message_and_its_keys() {
    let mut app = annotated();
    for _ in 0..3 {
        app.handle(key(KeyCode::Char('k')));
    }
    snapshot("selected", &draw(&mut app, 80, 24));
}

#[test]
fn snapshot_replying_and_a_file_uploading() {
    let mut app = annotated();
    app.handle(key(KeyCode::Char('g')));
    app.handle(key(KeyCode::Char('r')));
    typed(&mut app, "I will");
    app.handle(Input::Progress(Progress { label: "uploading map.png".into(), done: 24_000, total: 48_213 }));
    snapshot("replying", &draw(&mut app, 80, 24));
}

#[test]
fn the_selected_message_is_scrolled_into_view() {
    let mut app = App::new("alice");
    let messages = (0..40).map(|i| message("aa", "bob", &format!("line {i}"), T0 + i * MINUTE)).collect();
    app.handle(Input::Loaded { conversations: vec![conversation("aa", "bob", false, messages)], select: None });
    app.handle(key(KeyCode::Tab));
    for _ in 0..20 {
        app.handle(key(KeyCode::Char('k')));
    }
    let screen = draw(&mut app, 60, 14);
    let marked: Vec<&String> = screen.iter().filter(|l| l.contains('›') && l.contains("bob: line")).collect();
    assert!(marked.len() == 1 && marked[0].contains("bob: line 20"), "line 20 selected and shown: {screen:#?}");
    // Back down past the newest: the view follows, then lets go.
    for _ in 0..20 {
        app.handle(key(KeyCode::Char('j')));
    }
    let screen = draw(&mut app, 60, 14);
    assert!(screen.iter().any(|l| l.contains("bob: line 39")), "{screen:#?}");
    assert_eq!(app.cursor, None);
}

#[test]
fn files_and_quotes_from_others_are_cleaned() {
    let mut app = App::new("alice");
    let mut quoted = message("aa", "bob", &format!("q{HOSTILE}"), T0);
    quoted.reactions =
        vec![subrosa_client::store::Reaction { emoji: format!("e{HOSTILE}"), from: vec![format!("m{HOSTILE}")] }];
    let mut reply = message("aa", "bob", "r", T0 + MINUTE);
    reply.reply_to = Some(quoted.id.clone());
    let mut bob = conversation("aa", "bob", false, vec![quoted, reply.clone()]);
    bob.files.insert(
        reply.id.clone(),
        vec![FileInfo {
            name: format!("f{HOSTILE}"),
            size: 1,
            state: FileState::Refused(format!("why{HOSTILE}")),
            saved: None,
        }],
    );
    app.handle(Input::Loaded { conversations: vec![bob], select: None });
    app.handle(Input::Progress(Progress { label: format!("uploading p{HOSTILE}"), done: 1, total: 2 }));
    app.handle(key(KeyCode::Tab));
    app.handle(key(KeyCode::Char('k')));
    app.handle(key(KeyCode::Char('r')));
    let screen = cells(&mut app);
    assert!(screen.chars().all(|c| c == '\n' || !is_dangerous(c)), "{screen}");
    assert!(screen.contains("[file] fx\\u{1b}"), "{screen}");
    assert!(screen.contains("↱ bob: qx\\u{1b}"), "{screen}");
}

/// A stranger's request (its preview held back, as the client hands it
/// over: none), with a timer; and a contact's message with its preview
/// (the sender's word, cleaned) and a link on the dangerous-link list.
fn links_and_requests() -> App {
    let mut app = App::new("alice");
    let mut prize = message("aa", "mallory", "free prize at https://prize.example/now", T0);
    prize.request = true;
    prize.dangerous_links = vec!["https://prize.example/now".into()];
    let mut mallory = conversation(
        "aa",
        "mallory",
        false,
        vec![
            system("aa", SystemEvent::Disappearing { by: "mallory".into(), seconds: Some(3_600) }, T0 - MINUTE),
            prize,
        ],
    );
    mallory.request = true;
    let mut party = message("bb", "bob", "party at https://party.example/tonight", T0 + MINUTE);
    party.preview = Some(subrosa_client::store::MessagePreview {
        url: "https://party.example/tonight".into(),
        title: "The \u{1b}[31mparty\u{1b}[0m".into(),
        description: "bring snacks\nand the map".into(),
        has_thumbnail: true,
        ..Default::default()
    });
    let mut login = message("bb", "bob", "log in at https://evil.example/login quickly", T0 + 2 * MINUTE);
    login.dangerous_links = vec!["https://evil.example/login".into()];
    let bob = conversation("bb", "bob", false, vec![party, login]);
    app.handle(Input::Loaded { conversations: vec![mallory, bob], select: None });
    app.handle(Input::Client(ClientEvent::Connected));
    app
}

#[test]
fn snapshot_a_request_with_its_timer_and_a_dangerous_link() {
    let mut app = links_and_requests();
    // The list is ordered by activity: mallory's request is below bob.
    app.handle(key(KeyCode::Char('j')));
    snapshot("request", &draw(&mut app, 80, 16));
}

#[test]
fn snapshot_a_preview_as_the_senders_word_and_a_dangerous_link() {
    let mut app = links_and_requests();
    let lines = draw(&mut app, 80, 16);
    snapshot("preview", &lines);
    assert!(!lines.iter().any(|l| l.chars().any(is_dangerous)), "nothing of the preview reaches the terminal raw");
}

#[test]
fn accept_and_disappear_act_on_the_open_conversation() {
    let mut app = links_and_requests();
    // bob's is open: no request there.
    let none = app.handle(key(KeyCode::Char(':')));
    assert!(none.is_empty());
    typed(&mut app, "accept");
    assert!(app.handle(key(KeyCode::Enter)).is_empty(), "bob's is not a request");
    app.handle(key(KeyCode::Char('j')));
    app.handle(key(KeyCode::Char(':')));
    typed(&mut app, "accept");
    assert_eq!(
        app.handle(key(KeyCode::Enter)),
        vec![super::state::Action::Run(super::state::Command::Accept { conversation: "aa".into() })]
    );
    app.handle(key(KeyCode::Char(':')));
    typed(&mut app, "disappear 1d");
    assert_eq!(
        app.handle(key(KeyCode::Enter)),
        vec![super::state::Action::Run(super::state::Command::Disappearing {
            conversation: "aa".into(),
            seconds: Some(86_400)
        })]
    );
    app.handle(key(KeyCode::Char(':')));
    typed(&mut app, "disappear off");
    assert_eq!(
        app.handle(key(KeyCode::Enter)),
        vec![super::state::Action::Run(super::state::Command::Disappearing {
            conversation: "aa".into(),
            seconds: None
        })]
    );
    app.handle(key(KeyCode::Char(':')));
    typed(&mut app, "disappear 5y");
    assert!(app.handle(key(KeyCode::Enter)).is_empty(), "a bad duration is refused in the UI");
    // A new timer from another member shows at once; writing accepts.
    app.handle(Input::Client(ClientEvent::System(system(
        "aa",
        SystemEvent::Disappearing { by: "mallory".into(), seconds: Some(60) },
        T0 + 5 * MINUTE,
    ))));
    assert_eq!(app.current().map(|c| c.disappearing), Some(Some(60)));
    app.handle(Input::Client(ClientEvent::MessageState(mine(
        "aa",
        "who are you?",
        T0 + 6 * MINUTE,
        MessageState::Sent,
    ))));
    assert_eq!(app.current().map(|c| c.request), Some(false));
}

#[test]
fn a_timer_set_before_joining_shows_though_no_line_says_so() {
    let mut app = App::new("alice");
    // The back end read the timer from the group; the history has no line.
    let mut club = conversation("cc", "club", true, vec![message("cc", "bob", "welcome", T0)]);
    club.disappearing = Some(3_600);
    // Where the back end knows none, the newest line decides.
    let old = conversation(
        "dd",
        "bob",
        false,
        vec![system("dd", SystemEvent::Disappearing { by: "bob".into(), seconds: Some(60) }, T0 - MINUTE)],
    );
    app.handle(Input::Loaded { conversations: vec![club, old], select: None });
    let timers: Vec<(String, Option<u32>)> = app.conversations.iter().map(|c| (c.id.clone(), c.disappearing)).collect();
    assert!(timers.contains(&("cc".into(), Some(3_600))), "{timers:?}");
    assert!(timers.contains(&("dd".into(), Some(60))), "{timers:?}");
}

#[test]
fn a_call_rings_in_the_status_line_and_the_commands_call_answer_and_hang_up() {
    use subrosa_client::calls::CallLine;
    let mut app = links_and_requests();
    let offer = |by: &str| SystemEvent::Call { by: by.into(), call: "c1".into(), action: CallLine::Offer };
    // bob's offer says how to take it; this account's own says nothing.
    app.handle(Input::Client(ClientEvent::System(system("bb", offer("alice"), T0 + MINUTE))));
    assert!(app.notice.as_ref().is_none_or(|n| !n.text.contains("is calling")), "{:?}", app.notice);
    // An offer that waited in the inbox for two minutes rang long ago.
    let mut stale = system("bb", offer("bob"), T0 + MINUTE);
    stale.received_at = T0 + 3 * MINUTE;
    app.handle(Input::Client(ClientEvent::System(stale)));
    assert!(app.notice.as_ref().is_none_or(|n| !n.text.contains("is calling")), "{:?}", app.notice);
    app.handle(Input::Client(ClientEvent::System(system("bb", offer("bob"), T0 + 2 * MINUTE))));
    let notice = app.notice.clone().expect("a notice");
    assert_eq!((notice.text.as_str(), notice.error), ("bob is calling: :answer takes the call", false));

    app.handle(key(KeyCode::Char(':')));
    typed(&mut app, "answer");
    assert_eq!(app.handle(key(KeyCode::Enter)), vec![super::state::Action::Call { conversation: None }]);
    app.handle(key(KeyCode::Char(':')));
    typed(&mut app, "hangup");
    assert_eq!(app.handle(key(KeyCode::Enter)), vec![super::state::Action::HangUp]);
    // :call calls the open conversation (bob's).
    let open = app.current().map(|c| c.id.clone());
    app.handle(key(KeyCode::Char(':')));
    typed(&mut app, "call");
    assert_eq!(app.handle(key(KeyCode::Enter)), vec![super::state::Action::Call { conversation: open }]);
    // With nothing open, nothing is called.
    let mut empty = App::new("alice");
    empty.handle(key(KeyCode::Char(':')));
    typed(&mut empty, "call");
    assert!(empty.handle(key(KeyCode::Enter)).is_empty());
    assert!(empty.notice.as_ref().is_some_and(|n| n.error), "{:?}", empty.notice);
}

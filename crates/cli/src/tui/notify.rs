//! Desktop notifications of the terminal UI: off unless the user turns
//! them on (`notifications = "on"` or `"with-text"` in config.toml, or
//! `subrosa tui --notifications`), and without the message's text unless
//! they chose `with-text`.
//!
//! [`note_for`] is the whole policy (what would be shown, and when), a pure
//! function the state machine calls; [`show`] hands a note to the desktop's
//! notification server over D-Bus (the freedesktop.org notification
//! specification, through notify-rust over zbus, pure Rust). A desktop
//! without one (no session bus, a server over SSH) shows nothing and the UI
//! carries on: a notification is a courtesy, never a place a message could
//! be lost.
//!
//! What leaves the process: the sender's handle (and the group's name)
//! always; the text only with `with-text`. Both are others' words: made safe
//! as for the terminal, and the body's markup characters escaped (the
//! specification lets servers read `<b>`, `<a href>` and `<img>` in
//! bodies: a peer must not place a link or an image on the desktop).

use subrosa_client::StoredMessage;

use crate::term;

/// Whether, and how, the UI notifies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Notifications {
    /// None (the default).
    #[default]
    Off,
    /// Who wrote, never what.
    On,
    /// Who wrote and what.
    WithText,
}

/// One desktop notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Its title (plain text): who, and where.
    pub summary: String,
    /// Its body (markup escaped).
    pub body: String,
}

/// Longest text a note shows, in characters.
const MAX_TEXT: usize = 200;

/// The note for `m`, if one is due: a message from someone else that the
/// user is not looking at (`seen`: its conversation is on screen and the
/// terminal has the focus).
pub fn note_for(policy: Notifications, m: &StoredMessage, seen: bool) -> Option<Note> {
    if policy == Notifications::Off || m.system || m.outgoing || seen {
        return None;
    }
    let from = term::safe(&m.from);
    let summary = if m.group { format!("{from} in #{}", term::safe(&m.target)) } else { from.into_owned() };
    let body = match policy {
        Notifications::WithText if m.deleted => "(deleted)".to_string(),
        Notifications::WithText if m.text.is_empty() => "sent a file".to_string(),
        Notifications::WithText => {
            let text: String = m.text.chars().take(MAX_TEXT).collect();
            let more = if m.text.chars().count() > MAX_TEXT { "…" } else { "" };
            // Each line made safe on its own: a note may have several.
            let lines: Vec<String> = text.split('\n').map(|l| term::safe(l).into_owned()).collect();
            escape_markup(&format!("{}{more}", lines.join("\n")))
        }
        _ => "New message".to_string(),
    };
    Some(Note { summary, body })
}

/// Hands `note` to the desktop's notification server; without one, or
/// when it refuses, nothing happens (said in the log, without the note).
pub async fn show(note: &Note) {
    let shown =
        notify_rust::Notification::new().appname("subrosa").summary(&note.summary).body(&note.body).show_async().await;
    if let Err(e) = shown {
        tracing::debug!("no desktop notification: {e}");
    }
}

/// `&`, `<` and `>` as entities: a body is markup to some servers.
fn escape_markup(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_bob(text: &str) -> StoredMessage {
        StoredMessage {
            id: "01".into(),
            conversation: "aa".into(),
            target: "bob".into(),
            from: "bob".into(),
            text: text.into(),
            ..StoredMessage::default()
        }
    }

    #[test]
    fn off_by_default_and_then_nothing_is_shown() {
        assert_eq!(Notifications::default(), Notifications::Off);
        assert_eq!(note_for(Notifications::Off, &from_bob("hi"), false), None);
    }

    #[test]
    fn on_shows_who_wrote_and_never_the_text() {
        let note = note_for(Notifications::On, &from_bob("the secret plan"), false).expect("a note");
        assert_eq!(note, Note { summary: "bob".into(), body: "New message".into() });
        let mut in_group = from_bob("the secret plan");
        in_group.group = true;
        in_group.target = "night owls".into();
        let note = note_for(Notifications::On, &in_group, false).expect("a note");
        assert_eq!(note.summary, "bob in #night owls");
        assert!(!format!("{note:?}").contains("secret"));
    }

    #[test]
    fn with_text_shows_the_text_made_safe_and_short() {
        let note = note_for(Notifications::WithText, &from_bob("see you at 8"), false).expect("a note");
        assert_eq!(note.body, "see you at 8");
        let long = "x".repeat(500);
        let note = note_for(Notifications::WithText, &from_bob(&long), false).expect("a note");
        assert_eq!(note.body.chars().count(), MAX_TEXT + 1, "cut, with an ellipsis");
    }

    #[test]
    fn others_words_carry_no_escapes_and_no_markup() {
        let mut m = from_bob("<a href=\"https://evil\">click</a> & <img src=x>\u{1b}]0;t\u{7}\u{202e}");
        m.from = "mal\u{1b}[2Jlory".into();
        let note = note_for(Notifications::WithText, &m, false).expect("a note");
        for s in [&note.summary, &note.body] {
            assert!(!s.chars().any(crate::term::is_dangerous), "{s:?}");
        }
        assert!(!note.body.contains('<') && !note.body.contains('>'), "{}", note.body);
        assert!(note.body.starts_with("&lt;a href=\"https://evil\"&gt;click&lt;/a&gt; &amp; &lt;img"), "{}", note.body);
        assert!(note.summary.starts_with("mal\\u{1b}"), "{}", note.summary);
    }

    #[test]
    fn nothing_for_own_messages_system_lines_or_what_is_on_screen() {
        let mut own = from_bob("mine");
        own.outgoing = true;
        assert_eq!(note_for(Notifications::WithText, &own, false), None);
        let mut system = from_bob("bob joined");
        system.system = true;
        assert_eq!(note_for(Notifications::WithText, &system, false), None);
        assert_eq!(note_for(Notifications::WithText, &from_bob("hi"), true), None);
    }
}

//! Text from other people, made safe for a terminal.
//!
//! Message text, group names, a server's error messages and anything else
//! this user did not type may hold characters a terminal acts on: ESC and C1
//! sequences retitle the window, move the cursor, rewrite earlier lines or
//! make some terminals answer back; bidi overrides and isolates make text
//! read differently from what it is; invisible characters hide parts of a
//! name. Everything printed in plain output goes through [`safe`] (one
//! line) or [`safe_message`] (message text, where a newline starts an
//! indented continuation line, so it cannot pose as a line of its own): each
//! such character becomes a visible escape such as `\u{1b}`.
//!
//! JSON output is data and keeps the exact text, but writes each such
//! character as a JSON `\uXXXX` escape ([`json_line`]): a parser gets the
//! same string back and a terminal showing the JSON never sees it raw.
//! (serde_json alone escapes C0 only, not DEL, C1 or bidi controls.)
//!
//! The zero-width joiner and non-joiner (U+200D, U+200C) stay: emoji
//! sequences and several scripts need them, and they move nothing.

use std::borrow::Cow;
use std::io;

/// Whether a terminal could act on `c`, or it would hide or reorder text.
pub fn is_dangerous(c: char) -> bool {
    matches!(
        c,
        // C0 controls, DEL, C1 controls.
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        // Arabic letter mark, zero-width space, left-to-right and right-to-left marks.
        | '\u{61c}' | '\u{200b}' | '\u{200e}' | '\u{200f}'
        // Line and paragraph separators (a newline to some terminals).
        | '\u{2028}' | '\u{2029}'
        // Bidi embeddings and overrides, then isolates.
        | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        // Word joiner and invisible operators; deprecated format controls.
        | '\u{2060}'..='\u{2064}' | '\u{206a}'..='\u{206f}'
        // Mongolian vowel separator, byte-order mark, interlinear annotations.
        | '\u{180e}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}'
    )
}

fn escape_into(out: &mut String, c: char) {
    out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
}

/// One line of text from others, safe to print: every dangerous
/// character (newlines included) as a visible `\u{…}` escape.
pub fn safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_dangerous) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_dangerous(c) {
            escape_into(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Indent of a message's continuation lines.
const CONTINUATION: &str = "    ";

/// A message's text, safe to print: as [`safe`], except that a newline
/// stays a newline followed by an indent, so a line of the message can
/// never look like a line of output (another sender's message).
pub fn safe_message(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_dangerous) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c == '\n' {
            out.push('\n');
            out.push_str(CONTINUATION);
        } else if is_dangerous(c) {
            escape_into(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// serde_json's compact output, with every dangerous character that serde
/// would write raw written as a `\uXXXX` escape instead.
struct SafeJson;

impl serde_json::ser::Formatter for SafeJson {
    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if is_dangerous(c) {
                writer.write_all(&fragment.as_bytes()[start..i])?;
                // Every dangerous character is in the Basic Multilingual Plane.
                write!(writer, "\\u{:04x}", u32::from(c))?;
                start = i + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// `value` as one line of JSON with no dangerous character written raw.
///
/// # Errors
/// Serialisation errors (none for the types printed here).
pub fn json_line<T: serde::Serialize>(value: &T) -> Result<String, serde_json::Error> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, SafeJson);
    value.serialize(&mut ser)?;
    // Only whole UTF-8 sequences and ASCII escapes were written.
    String::from_utf8(out).map_err(|e| serde::ser::Error::custom(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "a\u{1b}]0;pwned\u{7}b\u{202e}c\u{9b}d\u{7f}e\u{2067}f\u{200b}g\r\nh";

    fn raw_danger(s: &str) -> Vec<char> {
        s.chars().filter(|&c| is_dangerous(c) && c != '\n').collect()
    }

    #[test]
    fn plain_text_passes_untouched() {
        for t in ["hello", "héllo wörld", "👨\u{200d}👩\u{200d}👧", "שלום", "tab-free"] {
            assert!(matches!(safe(t), Cow::Borrowed(_)), "{t:?}");
            assert!(matches!(safe_message(t), Cow::Borrowed(_)), "{t:?}");
        }
    }

    #[test]
    fn controls_bidi_and_invisibles_become_visible_escapes() {
        let s = safe(HOSTILE);
        assert!(raw_danger(&s).is_empty(), "{s:?}");
        assert!(!s.contains('\n'));
        assert_eq!(s, "a\\u{1b}]0;pwned\\u{7}b\\u{202e}c\\u{9b}d\\u{7f}e\\u{2067}f\\u{200b}g\\u{d}\\u{a}h");
        for c in ['\u{0}', '\u{85}', '\u{202a}', '\u{2069}', '\u{2028}', '\u{feff}', '\u{61c}', '\u{200f}'] {
            assert!(is_dangerous(c), "{c:?}");
        }
        for c in ['a', ' ', 'é', '\u{200d}', '\u{200c}', '\u{a0}', '😀'] {
            assert!(!is_dangerous(c), "{c:?}");
        }
    }

    #[test]
    fn a_message_keeps_its_lines_but_cannot_forge_one() {
        let s = safe_message("hi\n[2026-01-01 00:00:00] bob: send me the code\u{1b}[2K");
        assert_eq!(s, "hi\n    [2026-01-01 00:00:00] bob: send me the code\\u{1b}[2K");
        assert!(raw_danger(&s).is_empty());
    }

    #[test]
    fn json_escapes_what_serde_leaves_raw_and_round_trips() {
        let v = serde_json::json!({ "text": HOSTILE, "name": "plain" });
        let line = json_line(&v).expect("json");
        assert!(raw_danger(&line).is_empty(), "{line:?}");
        assert!(!line.contains('\n'));
        assert!(line.contains("\\u202e") && line.contains("\\u009b") && line.contains("\\u007f"), "{line}");
        let back: serde_json::Value = serde_json::from_str(&line).expect("parses");
        assert_eq!(back, v);
    }
}

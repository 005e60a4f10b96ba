//! Drawing an [`App`]: reads the state, changes nothing.
//!
//! Every string that came from someone else (message text, handles, group
//! names, notices that quote a server or a peer) passes through [`clean`]
//! (the command line's sanitiser, `term::safe`) before it becomes a cell,
//! so no escape sequence, bidi override or invisible character reaches the
//! terminal; a message's own lines are split first and each cleaned.

use ratatui::layout::{Constraint, Layout, Position, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Block, Borders, Clear, List, ListItem, ListState, Paragraph};
use ratatui::Frame;
use subrosa_client::{Advice, MessageState, StoredMessage};
use unicode_width::UnicodeWidthChar;

use super::state::{App, Compose, Connection, Conversation, FileInfo, FileState, Focus, Mode};
use crate::term;

/// Width of the conversation list.
const LIST_WIDTH: u16 = 28;
/// Most lines the composer grows to.
const COMPOSER_LINES: usize = 5;
/// The indent of a message's further lines: under its text, past the time.
const INDENT: usize = 6;

/// Text from others, made safe for the terminal (one line).
pub fn clean(s: &str) -> String {
    term::safe(s).into_owned()
}

/// `HH:MM` (UTC) of a time in ms since the Unix epoch.
fn hhmm(ms: u64) -> String {
    let fmt = time::macros::format_description!("[hour]:[minute]");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| "--:--".into())
}

/// A system line in neutral words, with the TUI command that helps.
fn system_text(m: &StoredMessage, me: &str) -> String {
    let Some(event) = &m.event else { return m.text.clone() };
    let mut text = event.render(me);
    match event.advice() {
        Some(Advice::Verify { handle }) => text.push_str(&format!(" (:verify {handle})")),
        Some(Advice::AcceptDevice { device, .. }) => {
            text.push_str(&format!(" (subrosa accept-device #{} {device})", m.conversation))
        }
        _ => {}
    }
    text
}

fn width(s: &str) -> usize {
    s.chars().map(|c| c.width().unwrap_or(0)).sum()
}

/// Splits one line of (clean) text into pieces at most `first` wide, then
/// `rest` wide.
fn wrap(text: &str, first: usize, rest: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = String::new();
    let mut w = 0;
    let mut limit = first.max(1);
    for c in text.chars() {
        let cw = c.width().unwrap_or(0);
        if w + cw > limit && !line.is_empty() {
            out.push(std::mem::take(&mut line));
            w = 0;
            limit = rest.max(1);
        }
        line.push(c);
        w += cw;
    }
    out.push(line);
    out
}

/// The first line of a message, at most `max` columns (for a quote).
fn gist(text: &str, max: usize) -> String {
    let first = clean(text.split('\n').next().unwrap_or_default());
    if width(&first) <= max {
        return first;
    }
    let mut out = String::new();
    for c in first.chars() {
        if width(&out) + c.width().unwrap_or(0) + 1 > max {
            break;
        }
        out.push(c);
    }
    out.push('…');
    out
}

/// How a file of a message stands, in a few words.
fn file_line(f: &FileInfo) -> String {
    let state = match (&f.saved, &f.state) {
        (Some(path), _) => format!("saved to {}", clean(path)),
        (None, FileState::Sent) => "sent".into(),
        (None, FileState::Pending) => "not downloaded yet (s saves it)".into(),
        (None, FileState::Stored) => "kept encrypted here (s saves it)".into(),
        (None, FileState::Refused(why)) => format!("refused: {}", clean(why)),
    };
    format!("[file] {} ({}) {state}", clean(&f.name), size(f.size))
}

/// A byte count for people.
pub fn size(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1024 * 1024 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 1024 * 1024 * 1024 => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
        n => format!("{:.1} GiB", n as f64 / (1024.0 * 1024.0 * 1024.0)),
    }
}

/// The chat view's lines of one conversation, `width` columns wide, and
/// which of them (from, to: exclusive) the selected message takes.
fn chat_view(app: &App, c: &Conversation, width: usize) -> (Vec<Line<'static>>, Option<(usize, usize)>) {
    let mut lines = Vec::new();
    let mut selected = None;
    let pad = " ".repeat(INDENT);
    let dim = Style::default().fg(Color::DarkGray);
    if c.request {
        let say = "Message request: someone who is not a contact wrote. They get no receipts and their link \
                   previews stay hidden until you :accept.";
        for piece in wrap(say, width, width) {
            lines.push(Line::from(Span::styled(piece, Style::default().fg(Color::Magenta))));
        }
    }
    for m in &c.messages {
        let start = lines.len();
        let is_selected = app.cursor.as_deref() == Some(m.id.as_str()) && !m.id.is_empty();
        // The selected message: its time reversed and a mark after it.
        let time = if is_selected {
            Span::styled(format!("{}›", hhmm(m.sent_at)), Style::default().add_modifier(Modifier::REVERSED))
        } else {
            Span::styled(format!("{} ", hhmm(m.sent_at)), dim)
        };
        if m.system {
            let style = Style::default().fg(Color::Yellow).add_modifier(Modifier::ITALIC);
            let body = format!("* {}", clean(&system_text(m, &app.me)));
            for (i, piece) in
                wrap(&body, width.saturating_sub(INDENT), width.saturating_sub(INDENT)).into_iter().enumerate()
            {
                let lead = if i == 0 { time.clone() } else { Span::raw(pad.clone()) };
                lines.push(Line::from(vec![lead, Span::styled(piece, style)]));
            }
            if is_selected {
                selected = Some((start, lines.len()));
            }
            continue;
        }
        let (who, who_style) = if m.outgoing {
            ("you".to_string(), Style::default().fg(Color::Cyan).add_modifier(Modifier::BOLD))
        } else {
            (clean(&m.from), Style::default().fg(Color::Green).add_modifier(Modifier::BOLD))
        };
        // The message it answers, quoted in one line above it.
        if let Some(id) = &m.reply_to {
            let quoted = c.messages.iter().find(|q| &q.id == id && !q.system);
            let room = width.saturating_sub(INDENT + 2);
            let quote = match quoted {
                Some(q) if q.deleted => "(a deleted message)".to_string(),
                Some(q) => {
                    let by = if q.outgoing { "you".to_string() } else { clean(&q.from) };
                    gist(&format!("{by}: {}", q.text), room)
                }
                None => format!("(a message not here, {})", &id[..id.len().min(8)]),
            };
            lines.push(Line::from(vec![Span::raw(pad.clone()), Span::styled(format!("↱ {quote}"), dim)]));
        }
        let who = format!("{who}: ");
        let state = match m.state {
            Some(MessageState::Queued) => Some(Span::styled(" (queued)", Style::default().fg(Color::Yellow))),
            Some(MessageState::Failed) => Some(Span::styled(
                format!(" (failed: {})", clean(m.reason.as_deref().unwrap_or("refused by the server"))),
                Style::default().fg(Color::Red),
            )),
            Some(MessageState::Sent) => Some(Span::styled(" (sent)", dim)),
            Some(MessageState::Delivered) => Some(Span::styled(" (delivered)", dim)),
            Some(MessageState::Read) => Some(Span::styled(" (read)", dim)),
            _ => None,
        };
        let first_width = width.saturating_sub(INDENT + self::width(&who));
        let mut first = true;
        // A sender's name that leaves no room: the text starts below it.
        if first_width < 8 {
            lines.push(Line::from(vec![time.clone(), Span::styled(who.clone(), who_style)]));
            first = false;
        }
        // What a message carries besides its text: an edit, a delete,
        // reactions (all from others: cleaned).
        let mut body = String::from(if m.deleted { "(deleted)" } else { &m.text });
        if m.edited && !m.deleted {
            body.push_str(" (edited)");
        }
        for r in &m.reactions {
            body.push_str(&format!(" [{} {}]", r.emoji, r.from.join(", ")));
        }
        let text_lines: Vec<&str> = body.split('\n').collect();
        let last_index = text_lines.len() - 1;
        for (li, text_line) in text_lines.into_iter().enumerate() {
            let pieces = if first {
                wrap(&clean(text_line), first_width, width.saturating_sub(INDENT))
            } else {
                wrap(&clean(text_line), width.saturating_sub(INDENT), width.saturating_sub(INDENT))
            };
            let n = pieces.len();
            for (pi, piece) in pieces.into_iter().enumerate() {
                let mut spans = if first {
                    vec![time.clone(), Span::styled(who.clone(), who_style)]
                } else {
                    vec![Span::raw(pad.clone())]
                };
                first = false;
                spans.push(Span::raw(piece));
                if li == last_index && pi == n - 1 {
                    spans.extend(state.clone());
                }
                lines.push(Line::from(spans));
            }
        }
        link_lines(&mut lines, m, width);
        for f in c.files.get(&m.id).into_iter().flatten() {
            for piece in wrap(&file_line(f), width.saturating_sub(INDENT), width.saturating_sub(INDENT)) {
                lines.push(Line::from(vec![
                    Span::raw(pad.clone()),
                    Span::styled(piece, Style::default().fg(Color::Blue)),
                ]));
            }
        }
        if is_selected {
            selected = Some((start, lines.len()));
        }
    }
    (lines, selected)
}

/// Under a message: its link preview (the sender's word about a page, so
/// marked as such and cleaned), and each of its links on the
/// dangerous-link list.
fn link_lines(lines: &mut Vec<Line<'static>>, m: &StoredMessage, width: usize) {
    let pad = " ".repeat(INDENT);
    let room = width.saturating_sub(INDENT);
    if let Some(p) = m.preview.as_ref().filter(|_| !m.deleted) {
        let image = if p.has_thumbnail { " [image]" } else { "" };
        let text = format!("preview by the sender: {} | {} ({}){image}", p.title, p.description, p.url);
        for piece in wrap(&clean(&text), room, room) {
            lines.push(Line::from(vec![
                Span::raw(pad.clone()),
                Span::styled(piece, Style::default().fg(Color::Magenta).add_modifier(Modifier::ITALIC)),
            ]));
        }
    }
    for link in &m.dangerous_links {
        let text = format!("⚠ dangerous link (on your dangerous-link list): {link}");
        for piece in wrap(&clean(&text), room, room) {
            lines.push(Line::from(vec![
                Span::raw(pad.clone()),
                Span::styled(piece, Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)),
            ]));
        }
    }
}

/// Draws the whole screen; returns the chat view's scroll as drawn: within
/// what it can show and moved to show the selected message (for
/// [`App::shown_scroll`]).
pub fn draw(frame: &mut Frame, app: &App) -> usize {
    let [main, status, help] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1), Constraint::Length(1)]).areas(frame.area());
    let list_width = LIST_WIDTH.min(main.width / 3);
    let [list, chat] = Layout::horizontal([Constraint::Length(list_width), Constraint::Min(10)]).areas(main);
    draw_list(frame, app, list);
    let scroll = draw_chat(frame, app, chat);
    draw_status(frame, app, status);
    draw_help(frame, app, help);
    if let Some(o) = &app.overlay {
        draw_overlay(frame, o, main);
    }
    scroll
}

fn pane_block(title: String, focused: bool) -> Block<'static> {
    let style = if focused { Style::default().fg(Color::Cyan) } else { Style::default().fg(Color::DarkGray) };
    Block::default().borders(Borders::ALL).border_style(style).title(title)
}

fn draw_list(frame: &mut Frame, app: &App, area: Rect) {
    let focused = app.focus == Focus::List && app.mode == Mode::Normal;
    let items: Vec<ListItem> = app
        .conversations
        .iter()
        .map(|c| {
            let mut head = vec![Span::styled(
                if c.group { format!("#{}", clean(&c.name)) } else { clean(&c.name) },
                Style::default().add_modifier(Modifier::BOLD),
            )];
            if c.verified {
                head.push(Span::styled(" ✓", Style::default().fg(Color::Green)));
            }
            if !c.active {
                head.push(Span::styled(" (left)", Style::default().fg(Color::DarkGray)));
            }
            if c.unread > 0 {
                head.push(Span::styled(format!(" ({})", c.unread), Style::default().fg(Color::Yellow)));
            }
            if c.request {
                head.push(Span::styled(" (request)", Style::default().fg(Color::Magenta)));
            }
            let preview = match c.messages.last() {
                Some(m) if m.system => format!("* {}", system_text(m, &app.me)),
                Some(m) if m.outgoing => format!("you: {}", m.text),
                Some(m) if c.group => format!("{}: {}", m.from, m.text),
                Some(m) => m.text.clone(),
                None => "(no messages)".into(),
            };
            // One line of it: the first, cleaned.
            let preview = clean(preview.split('\n').next().unwrap_or_default());
            ListItem::new(Text::from(vec![
                Line::from(head),
                Line::from(Span::styled(format!("  {preview}"), Style::default().fg(Color::DarkGray))),
            ]))
        })
        .collect();
    let list = List::new(items)
        .block(pane_block(" Conversations ".into(), focused))
        .highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .highlight_symbol("›");
    let mut state = ListState::default().with_selected(app.selected_index());
    frame.render_stateful_widget(list, area, &mut state);
}

fn draw_chat(frame: &mut Frame, app: &App, area: Rect) -> usize {
    let composer_lines = app.composer.text.split('\n').count().clamp(1, COMPOSER_LINES) as u16;
    let [view, composer] = Layout::vertical([Constraint::Min(3), Constraint::Length(composer_lines + 2)]).areas(area);
    let focused = app.focus == Focus::Chat && app.mode == Mode::Normal;
    let Some(c) = app.current() else {
        let hint = Paragraph::new(Text::from(vec![
            Line::from("No conversations yet."),
            Line::from("Type :dm HANDLE to start one, :group NAME HANDLE... for a group,"),
            Line::from("or wait for a message. ? shows every key."),
        ]))
        .block(pane_block(" Chat ".into(), focused));
        frame.render_widget(hint, view);
        draw_composer(frame, app, composer);
        return 0;
    };
    let title = if c.group {
        format!(" #{} (group) ", clean(&c.name))
    } else if c.verified {
        format!(" {} ✓ verified ", clean(&c.name))
    } else {
        format!(" {} · not verified (:safety) ", clean(&c.name))
    };
    let title = if c.active { title } else { format!("{title}(you left) ") };
    let title = match c.disappearing {
        Some(s) => format!("{title}· disappearing {} ", subrosa_client::format_duration(s)),
        None => title,
    };
    let title = if c.request { format!("{title}· request (:accept) ") } else { title };
    let block = pane_block(title, focused);
    let inner = block.inner(view);
    frame.render_widget(block, view);
    let (lines, selected) = chat_view(app, c, usize::from(inner.width));
    let height = usize::from(inner.height);
    let max_scroll = lines.len().saturating_sub(height);
    let mut scroll = app.scroll.min(max_scroll);
    // The selected message in view: scrolled up or down just enough.
    if let Some((from, to)) = selected {
        let bottom = lines.len() - scroll;
        if to > bottom {
            scroll = lines.len() - to;
        }
        let top = lines.len() - scroll - height.min(lines.len() - scroll);
        if from < top {
            scroll = lines.len().saturating_sub(from + height);
        }
        scroll = scroll.min(max_scroll);
    }
    let end = lines.len() - scroll;
    let start = end.saturating_sub(height);
    let shown: Vec<Line> = lines[start..end].to_vec();
    frame.render_widget(Paragraph::new(Text::from(shown)), inner);
    if scroll > 0 {
        let more = format!(" ↓ {scroll} more (G) ");
        let w = width(&more) as u16;
        if inner.width > w {
            let at = Rect { x: inner.x + inner.width - w, y: view.y + view.height - 1, width: w, height: 1 };
            frame.render_widget(Paragraph::new(more).style(Style::default().fg(Color::Yellow)), at);
        }
    }
    draw_composer(frame, app, composer);
    scroll
}

fn draw_composer(frame: &mut Frame, app: &App, area: Rect) {
    let writing = app.mode == Mode::Insert;
    let title = match &app.compose {
        Compose::Reply(id) => {
            let quoted = app.current().and_then(|c| c.messages.iter().find(|m| &m.id == id));
            let by = quoted.map(|m| if m.outgoing { "yourself".to_string() } else { clean(&m.from) });
            format!(" Reply to {} (Enter sends, Esc cancels) ", by.unwrap_or_else(|| "a message".into()))
        }
        Compose::Edit(_) => " Edit your message (Enter saves it for everyone, Esc cancels) ".into(),
        Compose::Attach => " File to send: type its path (Enter sends, Esc cancels) ".into(),
        Compose::Message if writing => " Message (Enter sends, Alt-Enter new line) ".into(),
        Compose::Message => " Message (i to write) ".into(),
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(if writing { Style::default().fg(Color::Cyan) } else { Style::default().fg(Color::DarkGray) })
        .title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let text = &app.composer.text;
    let before = &text[..app.composer.cursor.min(text.len())];
    let row = before.matches('\n').count();
    let col = width(&clean(before.rsplit('\n').next().unwrap_or_default()));
    let first = row.saturating_sub(COMPOSER_LINES - 1);
    let lines: Vec<Line> = text.split('\n').skip(first).take(COMPOSER_LINES).map(|l| Line::from(clean(l))).collect();
    // Long lines scroll sideways with the cursor.
    let shift = col.saturating_sub(usize::from(inner.width).saturating_sub(1));
    frame.render_widget(Paragraph::new(Text::from(lines)).scroll((0, shift as u16)), inner);
    if writing {
        let x = inner.x + (col - shift) as u16;
        let y = inner.y + (row - first) as u16;
        frame.set_cursor_position(Position { x, y });
    }
}

fn draw_status(frame: &mut Frame, app: &App, area: Rect) {
    let mut spans = vec![Span::styled(format!("{} ", clean(&app.me)), Style::default().add_modifier(Modifier::BOLD))];
    spans.push(match &app.connection {
        Connection::Connecting => Span::styled("… connecting", Style::default().fg(Color::Yellow)),
        Connection::Online => Span::styled("● online", Style::default().fg(Color::Green)),
        Connection::Offline { reason, retry_in } => Span::styled(
            format!("○ offline ({}): retrying in {:.0} s, sending queues", clean(reason), retry_in.as_secs_f64()),
            Style::default().fg(Color::Red),
        ),
    });

    if let Some(p) = &app.progress {
        let figures = match p.done.saturating_mul(100).checked_div(p.total) {
            Some(percent) => format!(" {percent}% ({} of {})", size(p.done), size(p.total)),
            None => "…".into(),
        };
        spans.push(Span::raw(" │ "));
        spans.push(Span::styled(format!("{}{figures}", clean(&p.label)), Style::default().fg(Color::Cyan)));
    }
    if let Some(n) = &app.notice {
        let style = if n.error { Style::default().fg(Color::Red) } else { Style::default().fg(Color::Cyan) };
        spans.push(Span::raw(" │ "));
        spans.push(Span::styled(clean(&n.text), style));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_help(frame: &mut Frame, app: &App, area: Rect) {
    if app.mode == Mode::Command {
        let line = format!(":{}", clean(&app.prompt.text));
        frame.render_widget(Paragraph::new(line), area);
        let col = 1 + width(&clean(&app.prompt.text[..app.prompt.cursor.min(app.prompt.text.len())]));
        frame.set_cursor_position(Position { x: area.x + (col as u16).min(area.width.saturating_sub(1)), y: area.y });
        return;
    }
    let keys: &[(&str, &str)] = match (app.mode, app.focus) {
        (Mode::Insert, _) if app.compose == Compose::Attach => &[("Enter", "send the file"), ("Esc", "cancel")],
        (Mode::Insert, _) if app.compose != Compose::Message => {
            &[("Enter", "send"), ("Alt-Enter/Ctrl-J", "new line"), ("Esc", "cancel")]
        }
        (Mode::Insert, _) => &[("Enter", "send"), ("Alt-Enter/Ctrl-J", "new line"), ("Esc", "stop writing")],
        (_, Focus::List) => {
            &[("j/k", "move"), ("Tab", "switch pane"), ("i", "write"), (":", "command"), ("?", "help"), ("q", "quit")]
        }
        // On a selected message: what can be done with it.
        (_, Focus::Chat) if app.cursor_message().is_some() => &[
            ("r", "reply"),
            ("e", "edit"),
            ("dd", "delete"),
            ("+/-", "react"),
            ("s", "save"),
            ("Esc", "unselect"),
            ("?", "help"),
        ],
        (_, Focus::Chat) => &[
            ("j/k", "select"),
            ("g/G", "first/newest"),
            ("Tab", "pane"),
            ("i", "write"),
            ("A", "file"),
            ("?", "help"),
            ("q", "quit"),
        ],
    };
    let mut spans = Vec::new();
    for (k, what) in keys {
        spans.push(Span::styled(format!(" {k} "), Style::default().add_modifier(Modifier::REVERSED)));
        spans.push(Span::raw(format!(" {what} ")));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_overlay(frame: &mut Frame, o: &super::state::Overlay, area: Rect) {
    let mut lines: Vec<Line> = o.lines.iter().map(|l| Line::from(clean(l))).collect();
    if o.verify.is_some() {
        lines.push(Line::from(""));
        lines.push(Line::from(Span::styled(
            "v: mark verified (only if the numbers match)   Esc: close",
            Style::default().fg(Color::Cyan),
        )));
    }
    let w = lines.iter().map(|l| l.width()).max().unwrap_or(0).max(width(&o.title)) as u16 + 4;
    let w = w.min(area.width);
    let h = (lines.len() as u16 + 2).min(area.height);
    let rect = Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h };
    frame.render_widget(Clear, rect);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(Style::default().fg(Color::Cyan))
        .title(format!(" {} ", clean(&o.title)));
    frame.render_widget(Paragraph::new(Text::from(lines)).block(block), rect);
}

//! The terminal UI's state machine: no terminal, no network, no store.
//!
//! [`App::handle`] takes one [`Input`] (a key, a [`ClientEvent`] from the
//! handle, or the answer to an [`Action`] it asked for earlier) and returns
//! the actions the driver (`tui::run`) must carry out. Rendering
//! (`tui::render`) only reads an `App`. So every rule of the UI is tested
//! here with plain values, and the screen in snapshot tests.

use std::collections::BTreeMap;
use std::time::Duration;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use subrosa_client::{ClientEvent, MessageState, StoredMessage};

use super::notify::{self, Note, Notifications};

/// One conversation as the list and the chat view show it.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    /// Id (hex).
    pub id: String,
    /// The peer's handle, or the group's name (another member's choice).
    pub name: String,
    /// A group (else a direct conversation).
    pub group: bool,
    /// False once this device left or was removed.
    pub active: bool,
    /// A direct conversation whose peer this user marked verified.
    pub verified: bool,
    /// Messages that arrived while it was not on screen.
    pub unread: usize,
    /// History, oldest first.
    pub messages: Vec<StoredMessage>,
    /// The files of its messages that carry some, by message id.
    pub files: BTreeMap<String, Vec<FileInfo>>,
    /// A message request not yet accepted (someone who is not a contact
    /// started it): marked, and its link previews held back, until `:accept`.
    pub request: bool,
    /// Its disappearing-messages timer, in seconds (`None`: off).
    pub disappearing: Option<u32>,
}

/// A file of a message, as this device keeps it (the `attachments` item of
/// a `receive --json` line, read back).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileInfo {
    /// Its name, as the sender gave it (others' text: cleaned when shown).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Where this device's copy stands.
    pub state: FileState,
    /// Where it was saved, once saved.
    pub saved: Option<String>,
}

/// Where this device's copy of a file stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FileState {
    /// This device sent it.
    Sent,
    /// Not downloaded yet.
    #[default]
    Pending,
    /// Downloaded and checked, kept encrypted here.
    Stored,
    /// Refused (why: may quote the server or the sender).
    Refused(String),
}

impl FileInfo {
    /// The files of a message from its `attachments` JSON (as
    /// `crate::attach::json` writes it, here or in a daemon).
    pub fn from_json(v: &serde_json::Value) -> Vec<FileInfo> {
        let text = |f: &serde_json::Value, k: &str| f[k].as_str().unwrap_or_default().to_string();
        v.as_array()
            .into_iter()
            .flatten()
            .map(|f| FileInfo {
                name: text(f, "name"),
                size: f["size"].as_u64().unwrap_or(0),
                state: match f["state"].as_str() {
                    Some("sent") => FileState::Sent,
                    Some("stored") => FileState::Stored,
                    Some("refused") => FileState::Refused(text(f, "refused")),
                    _ => FileState::Pending,
                },
                saved: f["path"].as_str().map(String::from),
            })
            .collect()
    }
}

impl Conversation {
    /// When it last had a message (this device's clock), for ordering.
    fn last_activity(&self) -> u64 {
        self.messages.last().map(|m| if m.received_at > 0 { m.received_at } else { m.sent_at }).unwrap_or(0)
    }
}

/// Which pane the movement keys act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    /// The conversation list.
    List,
    /// The chat view.
    Chat,
}

/// What the keys do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Movement and one-key commands.
    Normal,
    /// Typing a message.
    Insert,
    /// Typing a `:` command.
    Command,
}

/// What Enter does with the composer's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compose {
    /// Sends it as a new message.
    Message,
    /// Sends it as a reply to this message (id, hex).
    Reply(String),
    /// Replaces the text of this (own) message (id, hex).
    Edit(String),
    /// Sends the file at the path typed.
    Attach,
}

/// A transfer under way, for the status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// What (`uploading NAME`, may hold a file name: cleaned when shown).
    pub label: String,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
}

/// The connection as the status line tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// Not yet connected since start.
    Connecting,
    /// Connected; pushes arrive.
    Online,
    /// Lost; the handle retries by itself.
    Offline {
        /// Why (may quote the server).
        reason: String,
        /// When it tries next.
        retry_in: Duration,
    },
}

/// A line of the status bar that the user should read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// What (may quote others: rendered through the sanitiser).
    pub text: String,
    /// An error or warning, shown as such.
    pub error: bool,
}

/// A box over the panes: help, members, a safety number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// Its title.
    pub title: String,
    /// Its lines (may hold others' text: rendered through the sanitiser).
    pub lines: Vec<String>,
    /// A safety number shown for a handle (handle, number): `v` marks the
    /// contact verified if the number is still theirs.
    pub verify: Option<(String, String)>,
}

/// A line editor (the composer and the `:` prompt): text and a cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Editor {
    /// The text.
    pub text: String,
    /// The cursor, a byte offset on a character boundary.
    pub cursor: usize,
}

impl Editor {
    fn insert(&mut self, c: char) {
        self.text.insert(self.cursor, c);
        self.cursor += c.len_utf8();
    }

    fn backspace(&mut self) {
        if let Some(c) = self.text[..self.cursor].chars().next_back() {
            self.cursor -= c.len_utf8();
            self.text.remove(self.cursor);
        }
    }

    fn delete(&mut self) {
        if self.cursor < self.text.len() {
            self.text.remove(self.cursor);
        }
    }

    fn left(&mut self) {
        if let Some(c) = self.text[..self.cursor].chars().next_back() {
            self.cursor -= c.len_utf8();
        }
    }

    fn right(&mut self) {
        if let Some(c) = self.text[self.cursor..].chars().next() {
            self.cursor += c.len_utf8();
        }
    }

    fn home(&mut self) {
        self.cursor = self.text[..self.cursor].rfind('\n').map_or(0, |i| i + 1);
    }

    fn end(&mut self) {
        self.cursor = self.text[self.cursor..].find('\n').map_or(self.text.len(), |i| self.cursor + i);
    }

    fn take(&mut self) -> String {
        self.cursor = 0;
        std::mem::take(&mut self.text)
    }

    /// The common editing keys; false for a key it does not handle.
    fn edit(&mut self, key: &KeyEvent) -> bool {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Char('u') if ctrl => {
                self.text.replace_range(..self.cursor, "");
                self.cursor = 0;
            }
            KeyCode::Char('a') if ctrl => self.home(),
            KeyCode::Char('e') if ctrl => self.end(),
            KeyCode::Char(c) if !ctrl => self.insert(c),
            KeyCode::Backspace => self.backspace(),
            KeyCode::Delete => self.delete(),
            KeyCode::Left => self.left(),
            KeyCode::Right => self.right(),
            KeyCode::Home => self.home(),
            KeyCode::End => self.end(),
            _ => return false,
        }
        true
    }
}

/// A command typed at the `:` prompt, for the driver to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open (or start) the direct conversation with a handle.
    Direct(String),
    /// Create a group with these members.
    CreateGroup {
        /// Its name.
        name: String,
        /// The other members' handles.
        members: Vec<String>,
    },
    /// Add an account to a group.
    Add {
        /// The group (id, hex).
        conversation: String,
        /// Whom.
        handle: String,
    },
    /// Remove an account from a group.
    Remove {
        /// The group (id, hex).
        conversation: String,
        /// Whom.
        handle: String,
    },
    /// Rename a group.
    Rename {
        /// The group (id, hex).
        conversation: String,
        /// The new name.
        name: String,
    },
    /// Leave a group.
    Leave {
        /// The group (id, hex).
        conversation: String,
    },
    /// Accept a message request.
    Accept {
        /// The conversation (id, hex).
        conversation: String,
    },
    /// Set a conversation's disappearing-messages timer.
    Disappearing {
        /// The conversation (id, hex).
        conversation: String,
        /// Seconds; `None` turns it off.
        seconds: Option<u32>,
    },
    /// Show a conversation's member devices.
    Members {
        /// The conversation (id, hex).
        conversation: String,
    },
    /// Show the safety number with a handle (and offer to mark it verified).
    SafetyNumber {
        /// Whose.
        handle: String,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `text` to the conversation (id, hex); answer with [`Input::Sent`].
    Send {
        /// Where.
        conversation: String,
        /// What.
        text: String,
    },
    /// Reload the conversations; answer with [`Input::Loaded`].
    Refresh {
        /// Select this conversation (id, hex) once loaded.
        select: Option<String>,
    },
    /// Carry out a command; answer with [`Input::Done`] (and a refresh
    /// where it changed conversations).
    Run(Command),
    /// Mark the handle verified; answer with [`Input::Done`].
    MarkVerified {
        /// Whose.
        handle: String,
        /// The number the user compared.
        number: String,
    },
    /// Send `text` in answer to the message `to`; answer with
    /// [`Input::Sent`].
    Reply {
        /// Where.
        conversation: String,
        /// The message answered (id, hex).
        to: String,
        /// What.
        text: String,
    },
    /// Send the file at `path`, reporting [`Input::Progress`]; answer with
    /// [`Input::Sent`].
    Attach {
        /// Where.
        conversation: String,
        /// The file, as typed.
        path: String,
    },
    /// React to a message (or take this account's reaction back); answer
    /// with [`Input::Done`] and a refresh.
    React {
        /// Where.
        conversation: String,
        /// The message (id, hex).
        message: String,
        /// The emoji.
        emoji: String,
        /// Take it back.
        remove: bool,
    },
    /// Replace the text of an own message; answer with [`Input::Done`] and
    /// a refresh.
    Edit {
        /// Where.
        conversation: String,
        /// The message (id, hex).
        message: String,
        /// The new text.
        text: String,
    },
    /// Delete an own message for everyone; answer with [`Input::Done`] and
    /// a refresh.
    Delete {
        /// Where.
        conversation: String,
        /// The message (id, hex).
        message: String,
    },
    /// Download a message's files and save them into the downloads
    /// directory; answer with [`Input::Files`] and [`Input::Done`].
    Save {
        /// Where.
        conversation: String,
        /// The message (id, hex).
        message: String,
    },
    /// Show a desktop notification (what and when: [`notify::note_for`]).
    Notify(Note),
    /// Call the conversation (id, hex), or answer the call that rings
    /// (`None`), with the sound card; each step comes as
    /// [`Input::Done`], the end too.
    Call {
        /// Whom to call; `None` answers.
        conversation: Option<String>,
    },
    /// Hang up the call this UI runs (or give it up while it rings).
    HangUp,
    /// Leave the UI.
    Quit,
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; a line for the status bar.
    Notice(String),
    /// Failed; the one-line error.
    Error(String),
    /// A box to show.
    Overlay(Overlay),
}

/// Everything the state machine reacts to.
#[derive(Debug, Clone)]
pub enum Input {
    /// A key press.
    Key(KeyEvent),
    /// The terminal changed size (the next frame is drawn to fit).
    Resize,
    /// An event of the handle.
    Client(ClientEvent),
    /// The handle's events came too fast and `n` were missed.
    Lagged(u64),
    /// Every conversation, freshly read (after [`Action::Refresh`]).
    Loaded {
        /// The conversations, histories included.
        conversations: Vec<Conversation>,
        /// Select this one (id, hex).
        select: Option<String>,
    },
    /// The answer to [`Action::Send`]: the message as stored (sent or
    /// queued), or the error.
    Sent(Result<StoredMessage, String>),
    /// The answer to a [`Command`] or [`Action::MarkVerified`].
    Done(Outcome),
    /// The files of a message, as this device now keeps them.
    Files {
        /// Its conversation (id, hex).
        conversation: String,
        /// The message (id, hex).
        message: String,
        /// Its files.
        files: Vec<FileInfo>,
    },
    /// A transfer moved on.
    Progress(Progress),
    /// The terminal gained (true) or lost the focus, where it says so.
    Focus(bool),
}

/// The help shown by `?` and `:help`.
pub const HELP: &[&str] = &[
    "Moving (no mouse needed)",
    "  Tab            switch between the list and the chat",
    "  j / k, arrows  next / previous conversation; in the chat, select",
    "                 the next / previous message (Esc: none)",
    "  g / G          first / last; first message / newest, unselected",
    "  Ctrl-U/Ctrl-D  scroll the chat half a page",
    "  Enter / l      open the selected conversation",
    "  i              write a message          q  quit",
    "On the selected message",
    "  r  reply     e  edit (yours)     dd  delete for everyone (yours)",
    "  +  react (type the emoji)        -   take your reaction back",
    "  s  save its files into the downloads directory",
    "  A  send a file: type its path, Enter sends (:attach PATH too)",
    "Writing",
    "  Enter          send",
    "  Alt-Enter      new line (also Ctrl-J; Shift-Enter where the",
    "                 terminal reports it)",
    "  Esc            stop writing (the draft stays; a reply, an edit",
    "                 or a file path is cancelled)",
    "Commands (type : first)",
    "  :dm HANDLE                 open a direct conversation",
    "  :group NAME HANDLE...      create a group (\"quote\" a name with spaces)",
    "  :add HANDLE / :remove HANDLE   change the open group's members",
    "  :rename NAME  :leave       rename or leave the open group",
    "  :members                   the open conversation's devices",
    "  :safety [HANDLE]           safety number and QR code; v marks verified",
    "  :verify [HANDLE]           the same",
    "  :react EMOJI  :unreact     on the selected message",
    "  :attach PATH  :save        send a file; save the selected message's",
    "  :accept  :disappear 1d|off accept the request; its timer (30s…4w, off)",
    "  :call :answer :hangup      call, answer, hang up        :quit  leave",
];

/// How long after it was sent an offer still rings in the status line
/// (`subrosa answer` takes offers of the last minute too).
const OFFER_RINGS_MS: u64 = 60_000;

/// Lines the chat view scrolls per Ctrl-U / Ctrl-D.
const HALF_PAGE: usize = 10;

/// The whole UI state.
#[derive(Debug, Clone)]
pub struct App {
    /// This account's handle.
    pub me: String,
    /// Conversations, most recently active first.
    pub conversations: Vec<Conversation>,
    /// The selected (and shown) conversation, by id.
    pub selected: Option<String>,
    /// Which pane moves.
    pub focus: Focus,
    /// What the keys do.
    pub mode: Mode,
    /// The message being written.
    pub composer: Editor,
    /// The `:` command being typed.
    pub prompt: Editor,
    /// How many lines the chat view is scrolled up from its newest line.
    pub scroll: usize,
    /// The connection.
    pub connection: Connection,
    /// The latest notice.
    pub notice: Option<Notice>,
    /// A box over the panes.
    pub overlay: Option<Overlay>,
    /// Set once the user quit.
    pub quit: bool,
    /// The selected message of the shown conversation (id, hex): the one
    /// `r`, `e`, `dd`, `+`, `-` and `s` act on.
    pub cursor: Option<String>,
    /// What Enter does with the composer's text.
    pub compose: Compose,
    /// The draft put aside while the composer holds an edit or a path.
    stash: Option<Editor>,
    /// A first `d` on this message (id): a second deletes it.
    delete_armed: Option<String>,
    /// A file being sent.
    pub progress: Option<Progress>,
    /// Desktop notifications: off unless the user turned them on.
    pub notifications: Notifications,
    /// Whether the terminal has the focus (true unless it said otherwise).
    pub focused: bool,
}

impl App {
    /// An empty UI for the account `me`.
    pub fn new(me: impl Into<String>) -> Self {
        App {
            me: me.into(),
            conversations: Vec::new(),
            selected: None,
            focus: Focus::List,
            mode: Mode::Normal,
            composer: Editor::default(),
            prompt: Editor::default(),
            scroll: 0,
            connection: Connection::Connecting,
            notice: None,
            overlay: None,
            quit: false,
            cursor: None,
            compose: Compose::Message,
            stash: None,
            delete_armed: None,
            progress: None,
            notifications: Notifications::Off,
            focused: true,
        }
    }

    /// The selected conversation.
    pub fn current(&self) -> Option<&Conversation> {
        let id = self.selected.as_ref()?;
        self.conversations.iter().find(|c| &c.id == id)
    }

    /// The selected conversation's place in the list.
    pub fn selected_index(&self) -> Option<usize> {
        let id = self.selected.as_ref()?;
        self.conversations.iter().position(|c| &c.id == id)
    }

    /// Takes the scroll the chat view was drawn with: within what it can
    /// show, and moved to show the selected message (the renderer knows
    /// how many lines that is).
    pub fn shown_scroll(&mut self, scroll: usize) {
        self.scroll = scroll;
    }

    /// The selected message, if it is still in the shown conversation.
    pub fn cursor_message(&self) -> Option<&StoredMessage> {
        let id = self.cursor.as_ref()?;
        self.current()?.messages.iter().find(|m| &m.id == id)
    }

    fn select(&mut self, id: Option<String>) {
        if id != self.selected {
            self.scroll = 0;
            self.cursor = None;
            self.delete_armed = None;
            // A reply or an edit belongs to the conversation it was for.
            if !matches!(self.compose, Compose::Message | Compose::Attach) {
                self.cancel_compose();
            }
        }
        self.selected = id;
        if let Some(c) = self.selected.clone().and_then(|id| self.conversations.iter_mut().find(|c| c.id == id)) {
            c.unread = 0;
        }
    }

    fn select_at(&mut self, index: usize) {
        let id = self.conversations.get(index).map(|c| c.id.clone());
        self.select(id);
    }

    fn sort(&mut self) {
        self.conversations.sort_by_key(|c| (!c.active, std::cmp::Reverse(c.last_activity())));
    }

    fn notice(&mut self, text: impl Into<String>) {
        self.notice = Some(Notice { text: text.into(), error: false });
    }

    fn error(&mut self, text: impl Into<String>) {
        self.notice = Some(Notice { text: text.into(), error: true });
    }

    /// Reacts to one input; returns what the driver must do.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        match input {
            Input::Key(key) => self.key(key),
            Input::Resize => Vec::new(),
            Input::Client(e) => self.client_event(e),
            Input::Lagged(n) => {
                self.error(format!("{n} events were missed; reloading"));
                vec![Action::Refresh { select: None }]
            }
            Input::Loaded { conversations, select } => {
                self.loaded(conversations, select);
                Vec::new()
            }
            Input::Sent(Ok(m)) => {
                self.progress = None;
                if m.state == Some(MessageState::Queued) {
                    self.notice("queued: not yet on the server; it goes out when the connection is back");
                }
                self.upsert(m, false);
                Vec::new()
            }
            Input::Sent(Err(e)) => {
                self.progress = None;
                self.error(format!("not sent: {e}"));
                Vec::new()
            }
            Input::Files { conversation, message, files } => {
                self.progress = None;
                if let Some(c) = self.conversations.iter_mut().find(|c| c.id == conversation) {
                    if files.is_empty() {
                        c.files.remove(&message);
                    } else {
                        c.files.insert(message, files);
                    }
                }
                Vec::new()
            }
            Input::Progress(p) => {
                self.progress = Some(p);
                Vec::new()
            }
            Input::Focus(focused) => {
                self.focused = focused;
                Vec::new()
            }
            Input::Done(Outcome::Notice(n)) => {
                self.notice(n);
                Vec::new()
            }
            Input::Done(Outcome::Error(e)) => {
                self.progress = None;
                self.error(e);
                Vec::new()
            }
            Input::Done(Outcome::Overlay(o)) => {
                self.overlay = Some(o);
                Vec::new()
            }
        }
    }

    fn loaded(&mut self, fresh: Vec<Conversation>, select: Option<String>) {
        let old = std::mem::take(&mut self.conversations);
        self.conversations = fresh
            .into_iter()
            .map(|mut c| {
                if let Some(o) = old.iter().find(|o| o.id == c.id) {
                    c.unread = o.unread;
                }
                // The timer as the group agreed on it (the back end reads
                // it from MLS); else as the newest line about it set it.
                c.disappearing = c.disappearing.or_else(|| {
                    c.messages
                        .iter()
                        .rev()
                        .find_map(|m| match &m.event {
                            Some(subrosa_client::SystemEvent::Disappearing { seconds, .. }) => Some(*seconds),
                            _ => None,
                        })
                        .flatten()
                });
                c
            })
            .collect();
        self.sort();
        let keep = select.or_else(|| self.selected.clone()).filter(|id| self.conversations.iter().any(|c| &c.id == id));
        match keep {
            Some(id) => {
                if select_is_new(&self.selected, &id) {
                    self.focus = Focus::Chat;
                }
                self.select(Some(id));
            }
            None => self.select_at(0),
        }
    }

    /// Adds `m` to its conversation, or replaces the stored copy of the
    /// same message (a state change). Returns whether the conversation was
    /// new to this UI.
    fn upsert(&mut self, m: StoredMessage, count_unread: bool) -> bool {
        self.upsert_message(m, count_unread).0
    }

    /// As [`Self::upsert`]; also whether the message was new (not a change
    /// of one already shown: an edit, a reaction).
    fn upsert_message(&mut self, m: StoredMessage, count_unread: bool) -> (bool, bool) {
        let shown = self.selected.as_deref() == Some(m.conversation.as_str());
        let (new, conversation) = match self.conversations.iter_mut().position(|c| c.id == m.conversation) {
            Some(i) => (false, &mut self.conversations[i]),
            None => {
                self.conversations.push(Conversation {
                    id: m.conversation.clone(),
                    name: m.target.clone(),
                    group: m.group,
                    active: true,
                    ..Conversation::default()
                });
                let last = self.conversations.len() - 1;
                (true, &mut self.conversations[last])
            }
        };
        conversation_marks(conversation, &m);
        let fresh = match conversation.messages.iter_mut().find(|x| x.id == m.id && !m.id.is_empty()) {
            Some(existing) => {
                *existing = m;
                false
            }
            None => {
                if count_unread && !shown {
                    conversation.unread += 1;
                }
                conversation.messages.push(m);
                true
            }
        };
        self.sort();
        if self.selected.is_none() {
            self.select_at(0);
        }
        (new, fresh)
    }

    /// Someone else's call offer: says how to answer it, while it can
    /// still be answered (one that waited in the inbox, or came with a
    /// sender's clock far behind, rang long ago).
    fn ringing(&mut self, m: &StoredMessage) {
        use subrosa_client::calls::CallLine;
        if let Some(subrosa_client::SystemEvent::Call { by, action: CallLine::Offer, .. }) = &m.event {
            if *by != self.me && m.received_at.saturating_sub(m.sent_at) <= OFFER_RINGS_MS {
                self.notice(format!("{by} is calling: :answer takes the call"));
            }
        }
    }

    fn client_event(&mut self, e: ClientEvent) -> Vec<Action> {
        match e {
            ClientEvent::Message(m) => {
                self.ringing(&m);
                let incoming = !m.outgoing;
                // Seen: on screen, in a terminal that has the focus.
                let seen = self.focused && self.selected.as_deref() == Some(m.conversation.as_str());
                let note = notify::note_for(self.notifications, &m, seen);
                let (new_conversation, new_message) = self.upsert_message(m, incoming);
                let mut actions = Vec::new();
                if let Some(note) = note.filter(|_| new_message) {
                    actions.push(Action::Notify(note));
                }
                if new_conversation {
                    // Its name and membership as the store has them.
                    actions.push(Action::Refresh { select: None });
                }
                return actions;
            }
            ClientEvent::System(m) => {
                self.ringing(&m);
                self.upsert(m, false);
                // Membership, names and keys may have changed.
                return vec![Action::Refresh { select: None }];
            }
            ClientEvent::MessageState(m) => {
                self.upsert(m, false);
            }
            ClientEvent::SendFailed(f) => {
                let what = match &f.message {
                    Some(m) => format!("your message to {} was refused by the server: {}", m.target, f.reason),
                    None => format!("a queued message was refused by the server: {}", f.reason),
                };
                if let Some(m) = f.message {
                    self.upsert(m, false);
                }
                self.error(what);
            }
            ClientEvent::Dropped { from, reason } => {
                self.error(format!("dropped a message from {from} that could not be decrypted: {reason}"))
            }
            ClientEvent::Alert(a) => self.error(format!("warning: {a}")),
            ClientEvent::Connected => {
                let was_offline = matches!(self.connection, Connection::Offline { .. });
                self.connection = Connection::Online;
                if was_offline {
                    self.notice("reconnected");
                }
            }
            ClientEvent::Disconnected { reason, retry_in } => {
                self.connection = Connection::Offline { reason, retry_in };
            }
            _ => {}
        }
        Vec::new()
    }

    fn key(&mut self, key: KeyEvent) -> Vec<Action> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl && key.code == KeyCode::Char('c') {
            self.quit = true;
            return vec![Action::Quit];
        }
        if let Some(o) = &self.overlay {
            match key.code {
                KeyCode::Char('v') => {
                    if let Some((handle, number)) = o.verify.clone() {
                        self.overlay = None;
                        return vec![Action::MarkVerified { handle, number }];
                    }
                }
                KeyCode::Esc | KeyCode::Enter | KeyCode::Char('q') => self.overlay = None,
                _ => {}
            }
            return Vec::new();
        }
        match self.mode {
            Mode::Insert => self.insert_key(key),
            Mode::Command => self.command_key(key),
            Mode::Normal => self.normal_key(key),
        }
    }

    fn insert_key(&mut self, key: KeyEvent) -> Vec<Action> {
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        let shift = key.modifiers.contains(KeyModifiers::SHIFT);
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Esc => {
                self.mode = Mode::Normal;
                if self.compose != Compose::Message {
                    self.cancel_compose();
                }
            }
            // A path is one line.
            KeyCode::Enter if (alt || shift) && self.compose != Compose::Attach => self.composer.insert('\n'),
            KeyCode::Enter if alt || shift => {}
            // Ctrl-J is a line feed: a new line on any terminal.
            KeyCode::Char('j') if ctrl && self.compose != Compose::Attach => self.composer.insert('\n'),
            KeyCode::Enter => return self.send(),
            _ => {
                self.composer.edit(&key);
            }
        }
        Vec::new()
    }

    /// Puts the draft of before an edit or a path back; a reply's text
    /// stays as a plain draft.
    fn cancel_compose(&mut self) {
        if matches!(self.compose, Compose::Edit(_) | Compose::Attach) {
            self.composer = self.stash.take().unwrap_or_default();
        }
        self.compose = Compose::Message;
    }

    /// Starts writing `compose` in the composer (`text` replaces the draft,
    /// which is put aside until the edit or the path is sent or cancelled).
    fn start_compose(&mut self, compose: Compose, text: Option<&str>) {
        if self.compose != Compose::Message {
            self.cancel_compose();
        }
        if let Some(text) = text {
            self.stash = Some(std::mem::take(&mut self.composer));
            self.composer.text = text.to_string();
            self.composer.cursor = text.len();
        }
        self.compose = compose;
        self.focus = Focus::Chat;
        self.mode = Mode::Insert;
    }

    fn send(&mut self) -> Vec<Action> {
        let Some(c) = self.current() else {
            self.error("no conversation: open one with :dm HANDLE");
            return Vec::new();
        };
        if !c.active {
            self.error("you are no longer a member of this conversation");
            return Vec::new();
        }
        let conversation = c.id.clone();
        if self.composer.text.trim().is_empty() {
            if matches!(self.compose, Compose::Edit(_)) {
                self.error("an edit cannot be empty: Esc, then dd deletes the message");
            }
            return Vec::new();
        }
        self.scroll = 0;
        let text = self.composer.take();
        let action = match std::mem::replace(&mut self.compose, Compose::Message) {
            Compose::Message => Action::Send { conversation, text },
            Compose::Reply(to) => Action::Reply { conversation, to, text },
            Compose::Edit(message) => {
                self.composer = self.stash.take().unwrap_or_default();
                self.mode = Mode::Normal;
                self.notice("editing…");
                Action::Edit { conversation, message, text }
            }
            Compose::Attach => {
                self.composer = self.stash.take().unwrap_or_default();
                self.mode = Mode::Normal;
                self.progress = Some(Progress { label: format!("sending {}", text.trim()), done: 0, total: 0 });
                Action::Attach { conversation, path: text.trim().to_string() }
            }
        };
        vec![action]
    }

    fn command_key(&mut self, key: KeyEvent) -> Vec<Action> {
        match key.code {
            KeyCode::Esc => {
                self.prompt.take();
                self.mode = Mode::Normal;
            }
            KeyCode::Enter => {
                let line = self.prompt.take();
                self.mode = Mode::Normal;
                return self.command(&line);
            }
            KeyCode::Backspace if self.prompt.text.is_empty() => self.mode = Mode::Normal,
            _ => {
                self.prompt.edit(&key);
            }
        }
        Vec::new()
    }

    fn normal_key(&mut self, key: KeyEvent) -> Vec<Action> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        // `dd`: a first d arms, a second on the same message deletes, any
        // other key disarms.
        let armed = self.delete_armed.take();
        match key.code {
            KeyCode::Char('q') => {
                self.quit = true;
                return vec![Action::Quit];
            }
            KeyCode::Char(':') => self.mode = Mode::Command,
            KeyCode::Char('?') => self.overlay = Some(help()),
            KeyCode::Tab | KeyCode::BackTab => {
                self.focus = if self.focus == Focus::List { Focus::Chat } else { Focus::List }
            }
            KeyCode::Char('i') | KeyCode::Char('a') => {
                if self.current().is_some() {
                    self.focus = Focus::Chat;
                    self.mode = Mode::Insert;
                } else {
                    self.error("no conversation yet: open one with :dm HANDLE or :group NAME HANDLE...");
                }
            }
            KeyCode::Char('A') => {
                if self.current().is_some() {
                    self.start_compose(Compose::Attach, Some(""));
                } else {
                    self.error("no conversation yet: open one with :dm HANDLE or :group NAME HANDLE...");
                }
            }
            _ => match self.focus {
                Focus::List => self.list_key(key),
                Focus::Chat => return self.chat_key(key, ctrl, armed),
            },
        }
        Vec::new()
    }

    fn list_key(&mut self, key: KeyEvent) {
        let n = self.conversations.len();
        if n == 0 {
            return;
        }
        let i = self.selected_index().unwrap_or(0);
        match key.code {
            KeyCode::Char('j') | KeyCode::Down => self.select_at((i + 1).min(n - 1)),
            KeyCode::Char('k') | KeyCode::Up => self.select_at(i.saturating_sub(1)),
            KeyCode::Char('g') | KeyCode::Home => self.select_at(0),
            KeyCode::Char('G') | KeyCode::End => self.select_at(n - 1),
            KeyCode::Enter | KeyCode::Char('l') | KeyCode::Right => self.focus = Focus::Chat,
            _ => {}
        }
    }

    /// Moves the message selection `by` messages (negative: older); past
    /// the newest, nothing is selected.
    fn move_cursor(&mut self, older: bool) {
        let Some(c) = self.current() else { return };
        let n = c.messages.len();
        if n == 0 {
            return;
        }
        let at = self.cursor.as_ref().and_then(|id| c.messages.iter().position(|m| &m.id == id));
        let next = match (at, older) {
            (None, true) => Some(n - 1),
            (None, false) => None,
            (Some(i), true) => Some(i.saturating_sub(1)),
            (Some(i), false) if i + 1 < n => Some(i + 1),
            (Some(_), false) => None,
        };
        self.cursor = next.map(|i| c.messages[i].id.clone());
        if self.cursor.is_none() {
            self.scroll = 0;
        }
    }

    fn chat_key(&mut self, key: KeyEvent, ctrl: bool, armed: Option<String>) -> Vec<Action> {
        match key.code {
            // Scrolling by pages lets go of the selection (the view would
            // otherwise jump back to it).
            KeyCode::Char('u') if ctrl => self.scroll_by(true),
            KeyCode::Char('d') if ctrl => self.scroll_by(false),
            KeyCode::PageUp => self.scroll_by(true),
            KeyCode::PageDown => self.scroll_by(false),
            KeyCode::Char('k') | KeyCode::Up => self.move_cursor(true),
            KeyCode::Char('j') | KeyCode::Down => self.move_cursor(false),
            KeyCode::Char('g') | KeyCode::Home => {
                self.cursor = self.current().and_then(|c| c.messages.first()).map(|m| m.id.clone());
                // The renderer clamps this to the top.
                self.scroll = usize::MAX;
            }
            KeyCode::Char('G') | KeyCode::End => {
                self.cursor = None;
                self.scroll = 0;
            }
            KeyCode::Esc if self.cursor.is_some() => self.cursor = None,
            KeyCode::Esc | KeyCode::Char('h') | KeyCode::Left => self.focus = Focus::List,
            KeyCode::Enter => self.mode = Mode::Insert,
            KeyCode::Char('r') => {
                if let Some(m) = self.acted_on("answer", false) {
                    self.start_compose(Compose::Reply(m.id), None);
                }
            }
            KeyCode::Char('e') => {
                if let Some(m) = self.acted_on("edit", true) {
                    self.start_compose(Compose::Edit(m.id.clone()), Some(&m.text));
                }
            }
            KeyCode::Char('d') => {
                if let Some(m) = self.acted_on("delete", true) {
                    if armed.as_ref() == Some(&m.id) {
                        self.notice("deleting…");
                        return vec![Action::Delete { conversation: m.conversation, message: m.id }];
                    }
                    self.notice("d again deletes it for everyone; any other key keeps it");
                    self.delete_armed = Some(m.id);
                }
            }
            // (Without a message to react to, `acted_on` says so.)
            KeyCode::Char('+') if self.acted_on("react to", false).is_some() => {
                self.mode = Mode::Command;
                self.prompt = Editor { text: "react ".into(), cursor: "react ".len() };
            }
            KeyCode::Char('-') => return self.unreact(None),
            KeyCode::Char('s') => return self.save(),
            _ => {}
        }
        Vec::new()
    }

    fn scroll_by(&mut self, up: bool) {
        self.cursor = None;
        self.scroll = if up { self.scroll.saturating_add(HALF_PAGE) } else { self.scroll.saturating_sub(HALF_PAGE) };
    }

    /// The selected message, if an action may be asked for it (`own`: only
    /// this account's); else says why not.
    fn acted_on(&mut self, what: &str, own: bool) -> Option<StoredMessage> {
        let Some(m) = self.cursor_message().cloned() else {
            self.error(format!("select a message to {what} first: k (or ↑) in the chat"));
            return None;
        };
        let why = if m.system {
            Some(format!("a system line is nobody's message: there is nothing to {what}"))
        } else if m.deleted {
            Some("that message was deleted".to_string())
        } else if own && !m.outgoing {
            Some(format!("you can {what} only your own messages"))
        } else if !self.current().is_some_and(|c| c.active) {
            Some("you are no longer a member of this conversation".to_string())
        } else {
            None
        };
        match why {
            Some(why) => {
                self.error(why);
                None
            }
            None => Some(m),
        }
    }

    /// Takes this account's reaction (`emoji`, or its only one) to the
    /// selected message back.
    fn unreact(&mut self, emoji: Option<&str>) -> Vec<Action> {
        let Some(m) = self.acted_on("take a reaction back from", false) else { return Vec::new() };
        let mine: Vec<&str> =
            m.reactions.iter().filter(|r| r.from.iter().any(|f| f == &self.me)).map(|r| r.emoji.as_str()).collect();
        let emoji = match (emoji, mine.as_slice()) {
            (Some(e), _) => e.to_string(),
            (None, [one]) => one.to_string(),
            (None, []) => {
                self.error("you have not reacted to that message");
                return Vec::new();
            }
            (None, _) => {
                self.error("you reacted with several: :unreact EMOJI says which");
                return Vec::new();
            }
        };
        self.notice("taking your reaction back…");
        vec![Action::React { conversation: m.conversation, message: m.id, emoji, remove: true }]
    }

    /// Saves the selected message's files.
    fn save(&mut self) -> Vec<Action> {
        let Some(m) = self.acted_on("save", false) else { return Vec::new() };
        let has_files = self.current().is_some_and(|c| c.files.contains_key(&m.id));
        if !has_files {
            self.error("that message has no files");
            return Vec::new();
        }
        self.notice("saving…");
        vec![Action::Save { conversation: m.conversation, message: m.id }]
    }

    /// Carries out a `:` command line.
    fn command(&mut self, line: &str) -> Vec<Action> {
        let words = match split_words(line) {
            Ok(w) => w,
            Err(e) => {
                self.error(e);
                return Vec::new();
            }
        };
        let Some((verb, args)) = words.split_first() else {
            return Vec::new();
        };
        // What acts on the selected message, or sends a file.
        match verb.as_str() {
            "react" => {
                let [emoji] = args else {
                    self.error("usage: :react EMOJI (on the selected message)");
                    return Vec::new();
                };
                let Some(m) = self.acted_on("react to", false) else { return Vec::new() };
                self.notice("reacting…");
                return vec![Action::React {
                    conversation: m.conversation,
                    message: m.id,
                    emoji: emoji.clone(),
                    remove: false,
                }];
            }
            "unreact" => {
                return match args {
                    [] => self.unreact(None),
                    [emoji] => self.unreact(Some(emoji)),
                    _ => {
                        self.error("usage: :unreact [EMOJI]");
                        Vec::new()
                    }
                }
            }
            "save" => return self.save(),
            "attach" => {
                let Some(c) = self.current().filter(|c| c.active).cloned() else {
                    self.error("open a conversation you are in first");
                    return Vec::new();
                };
                // The rest of the line as typed: a path may hold spaces.
                let path = line.trim_start().strip_prefix(verb.as_str()).unwrap_or_default().trim();
                if path.is_empty() {
                    self.error("usage: :attach PATH");
                    return Vec::new();
                }
                self.progress = Some(Progress { label: format!("sending {path}"), done: 0, total: 0 });
                return vec![Action::Attach { conversation: c.id, path: path.to_string() }];
            }
            _ => {}
        }
        let current = self.current().cloned();
        let group = || match &current {
            Some(c) if c.group => Ok(c.id.clone()),
            Some(_) => Err("the open conversation is not a group".to_string()),
            None => Err("no conversation is open".to_string()),
        };
        let one = |what: &str| match args {
            [a] => Ok(a.clone()),
            _ => Err(format!("usage: :{verb} {what}")),
        };
        let command = match verb.as_str() {
            "q" | "quit" => {
                self.quit = true;
                return vec![Action::Quit];
            }
            "call" => {
                let Some(c) = current.clone().filter(|c| c.active) else {
                    self.error("open a conversation you are in first");
                    return Vec::new();
                };
                self.notice(format!("calling {}…", c.name));
                return vec![Action::Call { conversation: Some(c.id) }];
            }
            "answer" | "pickup" => {
                self.notice("answering…");
                return vec![Action::Call { conversation: None }];
            }
            "hangup" | "hang" => return vec![Action::HangUp],
            "help" | "h" => {
                self.overlay = Some(help());
                return Vec::new();
            }
            "dm" | "open" | "chat" => one("HANDLE").map(Command::Direct),
            "group" if args.len() >= 2 => {
                Ok(Command::CreateGroup { name: args[0].clone(), members: args[1..].to_vec() })
            }
            "group" => Err("usage: :group NAME HANDLE...".to_string()),
            "add" => one("HANDLE").and_then(|handle| Ok(Command::Add { conversation: group()?, handle })),
            "remove" | "kick" => {
                one("HANDLE").and_then(|handle| Ok(Command::Remove { conversation: group()?, handle }))
            }
            "rename" if !args.is_empty() => {
                group().map(|conversation| Command::Rename { conversation, name: args.join(" ") })
            }
            "rename" => Err("usage: :rename NAME".to_string()),
            "leave" => group().map(|conversation| Command::Leave { conversation }),
            "accept" => match &current {
                Some(c) if c.request => Ok(Command::Accept { conversation: c.id.clone() }),
                Some(_) => Err("the open conversation is not a message request".to_string()),
                None => Err("no conversation is open".to_string()),
            },
            "disappear" | "disappearing" | "timer" => match (&current, args) {
                (Some(c), [d]) => crate::parse_disappearing(d)
                    .map(|seconds| Command::Disappearing { conversation: c.id.clone(), seconds })
                    .map_err(|e| e.to_string()),
                (Some(_), _) => Err(format!("usage: :{verb} DURATION (30s, 5m, 1h, 1d, 1w, or off)")),
                (None, _) => Err("no conversation is open".to_string()),
            },
            "members" | "devices" => match &current {
                Some(c) => Ok(Command::Members { conversation: c.id.clone() }),
                None => Err("no conversation is open".to_string()),
            },
            "safety" | "safety-number" | "verify" => match (args, &current) {
                ([h], _) => Ok(Command::SafetyNumber { handle: h.trim_start_matches('@').to_string() }),
                ([], Some(c)) if !c.group => Ok(Command::SafetyNumber { handle: c.name.clone() }),
                ([], _) => Err(format!("usage: :{verb} HANDLE (or open a direct conversation first)")),
                _ => Err(format!("usage: :{verb} [HANDLE]")),
            },
            other => Err(format!("unknown command :{other} (see :help)")),
        };
        match command {
            Ok(c) => {
                self.notice("working…");
                vec![Action::Run(c)]
            }
            Err(e) => {
                self.error(e);
                Vec::new()
            }
        }
    }
}

/// What a message tells of its conversation: whether it is (still) a
/// request (this account's own message accepts it), and a new
/// disappearing-messages timer.
fn conversation_marks(c: &mut Conversation, m: &StoredMessage) {
    if m.outgoing && !m.system {
        c.request = false;
    } else if !m.system {
        c.request = m.request;
    }
    if let Some(subrosa_client::SystemEvent::Disappearing { seconds, .. }) = &m.event {
        c.disappearing = *seconds;
    }
}

fn select_is_new(current: &Option<String>, id: &str) -> bool {
    current.as_deref() != Some(id)
}

fn help() -> Overlay {
    Overlay { title: "Help (Esc closes)".into(), lines: HELP.iter().map(|s| s.to_string()).collect(), verify: None }
}

/// Splits a command line into words; `"…"` keeps spaces in one word.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if quoted {
        return Err("a \" is not closed".into());
    }
    if any {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::expect_used)]

    use super::*;
    use crossterm::event::KeyEventKind;

    pub(crate) fn key(code: KeyCode) -> Input {
        Input::Key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    pub(crate) fn chord(code: KeyCode, m: KeyModifiers) -> Input {
        Input::Key(KeyEvent {
            code,
            modifiers: m,
            kind: KeyEventKind::Press,
            state: crossterm::event::KeyEventState::NONE,
        })
    }

    pub(crate) fn typed(app: &mut App, s: &str) -> Vec<Action> {
        s.chars().flat_map(|c| app.handle(key(KeyCode::Char(c)))).collect()
    }

    pub(crate) fn message(conversation: &str, from: &str, text: &str, at: u64) -> StoredMessage {
        StoredMessage {
            id: format!("{conversation}-{at}"),
            conversation: conversation.into(),
            target: from.into(),
            from: from.into(),
            sent_at: at,
            received_at: at,
            text: text.into(),
            ..StoredMessage::default()
        }
    }

    pub(crate) fn conversation(id: &str, name: &str, group: bool, messages: Vec<StoredMessage>) -> Conversation {
        Conversation { id: id.into(), name: name.into(), group, active: true, messages, ..Conversation::default() }
    }

    fn app_with_two() -> App {
        let mut app = App::new("alice");
        app.handle(Input::Loaded {
            conversations: vec![
                conversation("aa", "bob", false, vec![message("aa", "bob", "hi", 1_000)]),
                conversation("bb", "team", true, vec![message("bb", "carol", "yo", 2_000)]),
            ],
            select: None,
        });
        app
    }

    #[test]
    fn list_is_ordered_by_activity_and_the_first_is_selected() {
        let app = app_with_two();
        let names: Vec<_> = app.conversations.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["team", "bob"]);
        assert_eq!(app.selected.as_deref(), Some("bb"));
    }

    #[test]
    fn j_k_move_the_selection_and_tab_switches_panes() {
        let mut app = app_with_two();
        app.handle(key(KeyCode::Char('j')));
        assert_eq!(app.selected.as_deref(), Some("aa"));
        app.handle(key(KeyCode::Char('j')));
        assert_eq!(app.selected.as_deref(), Some("aa"), "stops at the end");
        app.handle(key(KeyCode::Char('k')));
        assert_eq!(app.selected.as_deref(), Some("bb"));
        app.handle(key(KeyCode::Char('G')));
        assert_eq!(app.selected.as_deref(), Some("aa"));
        app.handle(key(KeyCode::Char('g')));
        assert_eq!(app.selected.as_deref(), Some("bb"));
        app.handle(key(KeyCode::Tab));
        assert_eq!(app.focus, Focus::Chat);
        // In the chat, Ctrl-U scrolls back and Ctrl-D forward again.
        app.handle(chord(KeyCode::Char('u'), KeyModifiers::CONTROL));
        app.handle(chord(KeyCode::Char('u'), KeyModifiers::CONTROL));
        app.handle(chord(KeyCode::Char('d'), KeyModifiers::CONTROL));
        assert_eq!(app.scroll, HALF_PAGE);
        assert_eq!(app.selected.as_deref(), Some("bb"), "chat keys do not move the list");
        app.handle(key(KeyCode::Char('G')));
        assert_eq!(app.scroll, 0);
        app.handle(key(KeyCode::Tab));
        assert_eq!(app.focus, Focus::List);
    }

    /// Alice in a 1:1 with bob: his message, hers, his again.
    fn app_with_talk() -> App {
        let mut app = App::new("alice");
        let mut mine = message("aa", "alice", "mine", 2_000);
        mine.outgoing = true;
        mine.state = Some(MessageState::Sent);
        let mut sys = message("aa", "", "bob is verified", 500);
        sys.system = true;
        app.handle(Input::Loaded {
            conversations: vec![conversation(
                "aa",
                "bob",
                false,
                vec![sys, message("aa", "bob", "first", 1_000), mine, message("aa", "bob", "third", 3_000)],
            )],
            select: None,
        });
        app.handle(key(KeyCode::Tab));
        app
    }

    #[test]
    fn k_and_j_select_messages_in_the_chat_and_esc_lets_go() {
        let mut app = app_with_talk();
        assert_eq!(app.cursor, None, "nothing selected at first");
        app.handle(key(KeyCode::Char('k')));
        assert_eq!(app.cursor.as_deref(), Some("aa-3000"), "k selects the newest");
        app.handle(key(KeyCode::Up));
        app.handle(key(KeyCode::Char('k')));
        assert_eq!(app.cursor.as_deref(), Some("aa-1000"));
        app.handle(key(KeyCode::Char('j')));
        assert_eq!(app.cursor_message().map(|m| m.text.as_str()), Some("mine"));
        app.handle(key(KeyCode::Char('g')));
        assert_eq!(app.cursor.as_deref(), Some("aa-500"), "g: the first");
        app.handle(key(KeyCode::Char('k')));
        assert_eq!(app.cursor.as_deref(), Some("aa-500"), "stops at the first");
        app.handle(key(KeyCode::Esc));
        assert_eq!((app.cursor.as_deref(), app.focus), (None, Focus::Chat), "Esc lets go first");
        app.handle(key(KeyCode::Char('k')));
        for _ in 0..2 {
            app.handle(key(KeyCode::Char('j')));
        }
        assert_eq!(app.cursor, None, "j past the newest lets go");
        app.handle(key(KeyCode::Char('k')));
        app.handle(chord(KeyCode::Char('u'), KeyModifiers::CONTROL));
        assert_eq!(app.cursor, None, "scrolling by pages lets go");
        // Another conversation: nothing selected there.
        app.handle(key(KeyCode::Char('k')));
        app.handle(Input::Client(ClientEvent::Message(message("cc", "carol", "hey", 9_000))));
        assert!(app.cursor.is_some(), "a message elsewhere keeps the selection");
        app.handle(key(KeyCode::Tab));
        app.handle(key(KeyCode::Char('g')));
        assert_eq!(app.selected.as_deref(), Some("cc"));
        assert_eq!(app.cursor, None);
    }

    #[test]
    fn r_answers_the_selected_message() {
        let mut app = app_with_talk();
        app.handle(key(KeyCode::Char('r')));
        assert!(app.notice.as_ref().is_some_and(|n| n.error && n.text.contains("select a message")));
        assert_eq!(app.mode, Mode::Normal);
        app.handle(key(KeyCode::Char('k')));
        app.handle(key(KeyCode::Char('r')));
        assert_eq!((app.mode, app.compose.clone()), (Mode::Insert, Compose::Reply("aa-3000".into())));
        typed(&mut app, "yes");
        let actions = app.handle(key(KeyCode::Enter));
        assert_eq!(
            actions,
            vec![Action::Reply { conversation: "aa".into(), to: "aa-3000".into(), text: "yes".into() }]
        );
        assert_eq!(app.compose, Compose::Message, "the next message is a plain one");
        // Esc cancels a reply; what was typed stays as a plain draft.
        app.handle(key(KeyCode::Esc));
        app.handle(key(KeyCode::Char('r')));
        typed(&mut app, "hm");
        app.handle(key(KeyCode::Esc));
        assert_eq!((app.compose.clone(), app.composer.text.as_str()), (Compose::Message, "hm"));
        // A system line is nobody's to answer.
        app.handle(key(KeyCode::Char('g')));
        app.handle(key(KeyCode::Char('r')));
        assert_eq!(app.mode, Mode::Normal);
        assert!(app.notice.as_ref().is_some_and(|n| n.error && n.text.contains("system line")));
    }

    #[test]
    fn e_edits_only_own_messages_and_gives_the_draft_back() {
        let mut app = app_with_talk();
        app.handle(key(KeyCode::Char('i')));
        typed(&mut app, "draft");
        app.handle(key(KeyCode::Esc));
        app.handle(key(KeyCode::Char('k')));
        app.handle(key(KeyCode::Char('e')));
        assert_eq!(app.mode, Mode::Normal, "not bob's");
        assert_eq!(app.notice.as_ref().map(|n| n.text.as_str()), Some("you can edit only your own messages"));
        app.handle(key(KeyCode::Char('k')));
        app.handle(key(KeyCode::Char('e')));
        assert_eq!((app.mode, app.composer.text.as_str()), (Mode::Insert, "mine"), "the text to change");
        app.handle(key(KeyCode::Backspace));
        app.handle(key(KeyCode::Backspace));
        typed(&mut app, "ne, changed");
        assert_eq!(
            app.handle(key(KeyCode::Enter)),
            vec![Action::Edit { conversation: "aa".into(), message: "aa-2000".into(), text: "mine, changed".into() }]
        );
        assert_eq!((app.mode, app.composer.text.as_str()), (Mode::Normal, "draft"), "the draft is back");
        // Cancelled: the draft is back too; an emptied edit is refused.
        app.handle(key(KeyCode::Char('e')));
        app.handle(key(KeyCode::Esc));
        assert_eq!((app.compose.clone(), app.composer.text.as_str()), (Compose::Message, "draft"));
        app.handle(key(KeyCode::Char('e')));
        app.handle(chord(KeyCode::Char('u'), KeyModifiers::CONTROL));
        assert_eq!(app.handle(key(KeyCode::Enter)), Vec::new());
        assert!(app.notice.as_ref().is_some_and(|n| n.error && n.text.contains("dd deletes")));
    }

    #[test]
    fn dd_deletes_an_own_message_and_anything_else_disarms() {
        let mut app = app_with_talk();
        app.handle(key(KeyCode::Char('k')));
        app.handle(key(KeyCode::Char('k')));
        assert_eq!(app.handle(key(KeyCode::Char('d'))), Vec::new(), "one d only asks");
        assert!(app.notice.as_ref().is_some_and(|n| n.text.starts_with("d again")));
        app.handle(key(KeyCode::Char('x')));
        assert_eq!(app.handle(key(KeyCode::Char('d'))), Vec::new(), "disarmed by another key");
        assert_eq!(
            app.handle(key(KeyCode::Char('d'))),
            vec![Action::Delete { conversation: "aa".into(), message: "aa-2000".into() }]
        );
        // Not on bob's, nor on one already deleted.
        app.handle(key(KeyCode::Char('k')));
        app.handle(key(KeyCode::Char('d')));
        assert_eq!(app.handle(key(KeyCode::Char('d'))), Vec::new());
        app.conversations[0].messages[2].deleted = true;
        app.handle(key(KeyCode::Char('j')));
        app.handle(key(KeyCode::Char('d')));
        assert_eq!(app.handle(key(KeyCode::Char('d'))), Vec::new());
        assert_eq!(app.notice.as_ref().map(|n| n.text.as_str()), Some("that message was deleted"));
    }

    #[test]
    fn plus_reacts_and_minus_takes_back_this_accounts_reaction() {
        let mut app = app_with_talk();
        app.handle(key(KeyCode::Char('k')));
        app.handle(key(KeyCode::Char('+')));
        assert_eq!((app.mode, app.prompt.text.as_str()), (Mode::Command, "react "));
        typed(&mut app, "👍");
        assert_eq!(
            app.handle(key(KeyCode::Enter)),
            vec![Action::React {
                conversation: "aa".into(),
                message: "aa-3000".into(),
                emoji: "👍".into(),
                remove: false
            }]
        );
        assert_eq!(app.handle(key(KeyCode::Char('-'))), Vec::new(), "no reaction of alice's yet");
        app.conversations[0].messages[3].reactions = vec![
            subrosa_client::store::Reaction { emoji: "🎉".into(), from: vec!["bob".into()] },
            subrosa_client::store::Reaction { emoji: "👍".into(), from: vec!["bob".into(), "alice".into()] },
        ];
        assert_eq!(
            app.handle(key(KeyCode::Char('-'))),
            vec![Action::React {
                conversation: "aa".into(),
                message: "aa-3000".into(),
                emoji: "👍".into(),
                remove: true
            }]
        );
        assert_eq!(run(&mut app, "react"), Vec::new(), "an emoji is needed");
        assert_eq!(
            run(&mut app, "unreact 🎉"),
            vec![Action::React {
                conversation: "aa".into(),
                message: "aa-3000".into(),
                emoji: "🎉".into(),
                remove: true
            }]
        );
    }

    #[test]
    fn a_file_goes_from_a_path_typed_in_the_composer_and_its_progress_shows() {
        let mut app = app_with_talk();
        app.handle(key(KeyCode::Char('i')));
        typed(&mut app, "draft");
        app.handle(key(KeyCode::Esc));
        app.handle(key(KeyCode::Char('A')));
        assert_eq!((app.mode, app.compose.clone(), app.composer.text.as_str()), (Mode::Insert, Compose::Attach, ""));
        typed(&mut app, " /tmp/a file.txt ");
        app.handle(chord(KeyCode::Enter, KeyModifiers::ALT));
        assert!(!app.composer.text.contains('\n'), "a path is one line");
        assert_eq!(
            app.handle(key(KeyCode::Enter)),
            vec![Action::Attach { conversation: "aa".into(), path: "/tmp/a file.txt".into() }]
        );
        assert_eq!((app.mode, app.composer.text.as_str()), (Mode::Normal, "draft"));
        app.handle(Input::Progress(Progress { label: "uploading a file.txt".into(), done: 5, total: 10 }));
        assert_eq!(app.progress.as_ref().map(|p| p.done), Some(5));
        let mut m = message("aa", "alice", "", 4_000);
        m.outgoing = true;
        m.state = Some(MessageState::Sent);
        app.handle(Input::Sent(Ok(m)));
        assert_eq!(app.progress, None, "done: no progress left on the status line");
        assert_eq!(
            run(&mut app, "attach /tmp/b c.txt"),
            vec![Action::Attach { conversation: "aa".into(), path: "/tmp/b c.txt".into() }]
        );
        assert_eq!(run(&mut app, "attach"), Vec::new());
    }

    #[test]
    fn s_saves_the_files_of_the_selected_message() {
        let mut app = app_with_talk();
        app.handle(key(KeyCode::Char('k')));
        assert_eq!(app.handle(key(KeyCode::Char('s'))), Vec::new());
        assert_eq!(app.notice.as_ref().map(|n| n.text.as_str()), Some("that message has no files"));
        let file = FileInfo { name: "map.png".into(), size: 3, state: FileState::Pending, saved: None };
        app.handle(Input::Files { conversation: "aa".into(), message: "aa-3000".into(), files: vec![file.clone()] });
        assert_eq!(
            app.handle(key(KeyCode::Char('s'))),
            vec![Action::Save { conversation: "aa".into(), message: "aa-3000".into() }]
        );
        let saved = FileInfo { state: FileState::Stored, saved: Some("/dl/map.png".into()), ..file };
        app.handle(Input::Files { conversation: "aa".into(), message: "aa-3000".into(), files: vec![saved.clone()] });
        assert_eq!(app.current().expect("open").files.get("aa-3000"), Some(&vec![saved]));
    }

    #[test]
    fn a_new_message_notifies_as_the_user_chose_and_not_when_seen() {
        let mut app = app_with_two();
        let incoming = |text: &str, at| Input::Client(ClientEvent::Message(message("aa", "bob", text, at)));
        let notes = |actions: Vec<Action>| -> Vec<Note> {
            actions
                .into_iter()
                .filter_map(|a| match a {
                    Action::Notify(n) => Some(n),
                    _ => None,
                })
                .collect()
        };
        assert!(notes(app.handle(incoming("quiet", 3_000))).is_empty(), "off by default");
        app.notifications = Notifications::On;
        assert_eq!(
            notes(app.handle(incoming("secret", 4_000))),
            vec![Note { summary: "bob".into(), body: "New message".into() }]
        );
        // The same message again (a reaction to it, an edit): no second note.
        let mut changed = message("aa", "bob", "secret", 4_000);
        changed.edited = true;
        assert!(notes(app.handle(Input::Client(ClientEvent::Message(changed)))).is_empty());
        app.notifications = Notifications::WithText;
        // On screen in a focused terminal: seen, no note; unfocused: a note.
        app.handle(key(KeyCode::Char('g')));
        app.select(Some("aa".into()));
        assert!(notes(app.handle(incoming("in view", 5_000))).is_empty());
        app.handle(Input::Focus(false));
        assert_eq!(notes(app.handle(incoming("away", 6_000)))[0].body, "away");
    }

    #[test]
    fn files_are_read_from_the_attachments_json() {
        let v = serde_json::json!([
            {"name": "a.txt", "size": 3, "sha256": "00", "state": "stored", "path": "/dl/a.txt"},
            {"name": "b.bin", "size": 9, "sha256": "00", "state": "refused", "refused": "bad digest"},
            {"name": "c", "size": 1, "sha256": "00", "state": "pending"},
            {"name": "d", "size": 1, "sha256": "00", "state": "sent"}
        ]);
        let files = FileInfo::from_json(&v);
        assert_eq!(files.len(), 4);
        assert_eq!((files[0].state.clone(), files[0].saved.as_deref()), (FileState::Stored, Some("/dl/a.txt")));
        assert_eq!(files[1].state, FileState::Refused("bad digest".into()));
        assert_eq!((files[2].state.clone(), files[3].state.clone()), (FileState::Pending, FileState::Sent));
        assert!(FileInfo::from_json(&serde_json::json!("not a list")).is_empty());
    }

    #[test]
    fn an_incoming_message_counts_unread_unless_on_screen_and_moves_up() {
        let mut app = app_with_two();
        assert_eq!(app.selected.as_deref(), Some("bb"));
        app.handle(Input::Client(ClientEvent::Message(message("aa", "bob", "new", 3_000))));
        assert_eq!(app.conversations[0].id, "aa", "most recent first");
        assert_eq!(app.conversations[0].unread, 1);
        app.handle(Input::Client(ClientEvent::Message(message("bb", "carol", "seen", 4_000))));
        let team = app.conversations.iter().find(|c| c.id == "bb").expect("team");
        assert_eq!(team.unread, 0, "the open conversation has nothing unread");
        assert_eq!(app.selected.as_deref(), Some("bb"), "selection follows the conversation, not the row");
        app.handle(key(KeyCode::Char('j')));
        assert_eq!(app.selected.as_deref(), Some("aa"));
        assert_eq!(app.current().expect("open").unread, 0, "opening reads it");
    }

    #[test]
    fn a_message_in_a_new_conversation_adds_it_and_asks_for_a_refresh() {
        let mut app = App::new("alice");
        let actions = app.handle(Input::Client(ClientEvent::Message(message("cc", "dave", "hello", 5))));
        assert_eq!(actions, vec![Action::Refresh { select: None }]);
        assert_eq!(app.conversations.len(), 1);
        assert_eq!(app.current().expect("selected").name, "dave");
    }

    #[test]
    fn typing_while_messages_arrive_keeps_the_draft_and_enter_sends() {
        let mut app = app_with_two();
        app.handle(key(KeyCode::Char('i')));
        assert_eq!(app.mode, Mode::Insert);
        typed(&mut app, "hel");
        app.handle(Input::Client(ClientEvent::Message(message("aa", "bob", "interrupt", 9_000))));
        typed(&mut app, "lo");
        app.handle(chord(KeyCode::Enter, KeyModifiers::ALT));
        typed(&mut app, "x");
        app.handle(chord(KeyCode::Char('j'), KeyModifiers::CONTROL));
        typed(&mut app, "y");
        app.handle(key(KeyCode::Backspace));
        typed(&mut app, "z");
        let actions = app.handle(key(KeyCode::Enter));
        assert_eq!(actions, vec![Action::Send { conversation: "bb".into(), text: "hello\nx\nz".into() }]);
        assert!(app.composer.text.is_empty());
        assert_eq!(app.mode, Mode::Insert, "stays writing");
        assert!(app.handle(key(KeyCode::Enter)).is_empty(), "nothing to send");
        app.handle(key(KeyCode::Esc));
        assert_eq!(app.mode, Mode::Normal);
        // q in normal mode quits; typed in the composer it is a letter.
        app.handle(key(KeyCode::Char('i')));
        typed(&mut app, "q");
        assert!(!app.quit);
        app.handle(key(KeyCode::Esc));
        assert_eq!(app.handle(key(KeyCode::Char('q'))), vec![Action::Quit]);
        assert!(app.quit);
    }

    #[test]
    fn a_queued_send_shows_queued_then_sent() {
        let mut app = app_with_two();
        let mut m = message("bb", "alice", "later", 10_000);
        m.outgoing = true;
        m.state = Some(MessageState::Queued);
        app.handle(Input::Sent(Ok(m.clone())));
        let last = |app: &App| app.current().and_then(|c| c.messages.last().cloned()).expect("a message");
        assert_eq!(last(&app).state, Some(MessageState::Queued));
        assert!(app.notice.as_ref().is_some_and(|n| n.text.starts_with("queued")));
        m.state = Some(MessageState::Sent);
        app.handle(Input::Client(ClientEvent::MessageState(m)));
        assert_eq!(last(&app).state, Some(MessageState::Sent));
        assert_eq!(app.current().expect("open").messages.len(), 2, "replaced, not added");
    }

    #[test]
    fn connection_changes_show_in_the_status() {
        let mut app = App::new("alice");
        assert_eq!(app.connection, Connection::Connecting);
        app.handle(Input::Client(ClientEvent::Connected));
        assert_eq!(app.connection, Connection::Online);
        assert!(app.notice.is_none(), "a first connection is no news");
        app.handle(Input::Client(ClientEvent::Disconnected {
            reason: "refused".into(),
            retry_in: Duration::from_secs(2),
        }));
        assert!(matches!(app.connection, Connection::Offline { .. }));
        app.handle(Input::Client(ClientEvent::Connected));
        assert_eq!(app.connection, Connection::Online);
        assert_eq!(app.notice.as_ref().map(|n| n.text.as_str()), Some("reconnected"));
    }

    fn run(app: &mut App, line: &str) -> Vec<Action> {
        app.handle(key(KeyCode::Char(':')));
        assert_eq!(app.mode, Mode::Command);
        let mut actions = typed(app, line);
        actions.extend(app.handle(key(KeyCode::Enter)));
        assert_eq!(app.mode, Mode::Normal);
        actions
    }

    #[test]
    fn commands_parse_into_actions_on_the_open_conversation() {
        let mut app = app_with_two();
        assert_eq!(run(&mut app, "dm @dave"), vec![Action::Run(Command::Direct("@dave".into()))]);
        assert_eq!(
            run(&mut app, "group \"night owls\" bob carol"),
            vec![Action::Run(Command::CreateGroup {
                name: "night owls".into(),
                members: vec!["bob".into(), "carol".into()]
            })]
        );
        assert_eq!(
            run(&mut app, "add dave"),
            vec![Action::Run(Command::Add { conversation: "bb".into(), handle: "dave".into() })]
        );
        assert_eq!(
            run(&mut app, "remove dave"),
            vec![Action::Run(Command::Remove { conversation: "bb".into(), handle: "dave".into() })]
        );
        assert_eq!(run(&mut app, "members"), vec![Action::Run(Command::Members { conversation: "bb".into() })]);
        assert_eq!(run(&mut app, "safety"), Vec::new(), "a group has no one safety number");
        assert!(app.notice.as_ref().is_some_and(|n| n.error));
        app.handle(key(KeyCode::Char('j')));
        assert_eq!(run(&mut app, "add dave"), Vec::new(), "not a group");
        assert_eq!(app.notice.as_ref().map(|n| n.text.as_str()), Some("the open conversation is not a group"));
        assert_eq!(run(&mut app, "verify"), vec![Action::Run(Command::SafetyNumber { handle: "bob".into() })]);
        assert_eq!(run(&mut app, "frobnicate"), Vec::new());
        assert_eq!(run(&mut app, "q"), vec![Action::Quit]);
    }

    #[test]
    fn v_in_a_safety_number_box_marks_verified_and_esc_cancels_a_command() {
        let mut app = app_with_two();
        app.handle(Input::Done(Outcome::Overlay(Overlay {
            title: "safety".into(),
            lines: vec!["12345".into()],
            verify: Some(("bob".into(), "1234".into())),
        })));
        assert_eq!(app.handle(key(KeyCode::Char('j'))), Vec::new());
        assert_eq!(app.selected.as_deref(), Some("bb"), "keys go to the box while it is open");
        assert_eq!(
            app.handle(key(KeyCode::Char('v'))),
            vec![Action::MarkVerified { handle: "bob".into(), number: "1234".into() }]
        );
        assert!(app.overlay.is_none());
        app.handle(key(KeyCode::Char(':')));
        typed(&mut app, "quit");
        assert_eq!(app.handle(key(KeyCode::Esc)), Vec::new());
        assert!(!app.quit && app.prompt.text.is_empty());
    }

    #[test]
    fn a_refresh_keeps_unread_counts_and_selects_what_was_asked() {
        let mut app = app_with_two();
        app.handle(Input::Client(ClientEvent::Message(message("aa", "bob", "new", 3_000))));
        let mut fresh = vec![
            conversation("aa", "bob", false, vec![message("aa", "bob", "new", 3_000)]),
            conversation("bb", "team", true, vec![]),
            conversation("dd", "dave", false, vec![]),
        ];
        fresh[0].verified = true;
        app.handle(Input::Loaded { conversations: fresh, select: Some("dd".into()) });
        assert_eq!(app.selected.as_deref(), Some("dd"));
        assert_eq!(app.focus, Focus::Chat);
        let bob = app.conversations.iter().find(|c| c.id == "aa").expect("bob");
        assert_eq!((bob.unread, bob.verified), (1, true));
    }

    #[test]
    fn words_split_with_quotes() {
        assert_eq!(split_words(" a  \"b c\" d").expect("ok"), ["a", "b c", "d"]);
        assert_eq!(split_words("\"\"").expect("ok"), [""]);
        assert!(split_words("\"open").is_err());
    }
}

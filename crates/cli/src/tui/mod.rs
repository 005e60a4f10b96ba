//! `subrosa tui`: a terminal UI over the shared client handle.
//!
//! Three parts, so that every rule is testable without a terminal:
//! - [`state`]: the state machine (keys and [`ClientEvent`]s in, actions
//!   out; no I/O);
//! - [`render`]: draws a state with ratatui, and is where others' text is
//!   sanitised;
//! - this module, the driver: it owns the terminal (raw mode, alternate
//!   screen, restored on every exit, panics included), keeps the handle
//!   connected ([`Client::run`]), and carries out the actions.
//!
//! Concurrency: one loop on the command's runtime waits for the next input
//! (a key from the reader thread, an event of the handle, the answer of an
//! action) and redraws after each. Actions that talk to the server run as
//! tasks and post their answer back into the loop, so typing and live
//! updates never wait for the network: messages through one sender task,
//! in the order they were typed; commands (create a group, …) each on a
//! task of its own.
//! Keys are read on a plain thread (crossterm's `read` blocks); it ends
//! with the process.

pub mod backend;
pub mod notify;
pub mod render;
pub mod state;

#[cfg(test)]
mod tests;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use crossterm::event::{Event, KeyEventKind};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;
use tokio::sync::mpsc;

pub use backend::Backend;
use state::{Action, App, Command, Input, Outcome, Overlay, Progress};

/// The terminal in raw mode on the alternate screen; put back on drop.
struct Screen {
    terminal: Terminal<CrosstermBackend<std::io::Stdout>>,
}

fn restore() {
    let _ = crossterm::terminal::disable_raw_mode();
    let _ = crossterm::execute!(
        std::io::stdout(),
        crossterm::event::DisableFocusChange,
        crossterm::terminal::LeaveAlternateScreen,
        crossterm::cursor::Show
    );
}

impl Screen {
    fn enter() -> Result<Screen> {
        crossterm::terminal::enable_raw_mode().context("cannot switch the terminal to raw mode")?;
        // A panic must not leave the user's terminal raw and blank.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        // Focus reports tell whether the user sees the screen (for
        // notifications); a terminal without them just never sends one.
        crossterm::execute!(
            std::io::stdout(),
            crossterm::terminal::EnterAlternateScreen,
            crossterm::event::EnableFocusChange
        )
        .context("cannot switch to the alternate screen")?;
        let terminal = Terminal::new(CrosstermBackend::new(std::io::stdout())).context("cannot set up the terminal")?;
        Ok(Screen { terminal })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// What the UI needs besides its backend.
#[derive(Debug, Clone)]
pub struct Options {
    /// The home directory (files are sealed into it before they go).
    pub home: PathBuf,
    /// Where `s` saves a message's files (the configuration's `downloads`,
    /// or `--downloads`).
    pub downloads: Option<PathBuf>,
    /// End once the first frame is drawn (the start-up benchmark).
    pub exit_after_first_frame: bool,
    /// Desktop notifications.
    pub notifications: notify::Notifications,
}

/// A message for the sender task: they go out one after another, in the
/// order they were typed.
enum Outgoing {
    Text { conversation: String, text: String },
    Reply { conversation: String, to: String, text: String },
    Attach { conversation: String, path: String },
}

/// Runs the UI until the user quits, or the handle meets an error that
/// retrying cannot fix (then returned, after the terminal is restored).
pub async fn run(backend: Backend, options: Options) -> Result<ExitCode> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(anyhow!("subrosa tui needs a terminal (for scripts, see `subrosa daemon`)"));
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    let notifies = options.notifications != notify::Notifications::Off;
    let running = backend.start(tx.clone(), notifies).await?;
    tokio::pin!(running);
    // Messages go out one after another, in the order they were typed.
    let (sends, mut queue) = mpsc::unbounded_channel::<Outgoing>();
    let sender = {
        let (backend, tx, home) = (backend.clone(), tx.clone(), options.home.clone());
        tokio::spawn(async move {
            while let Some(next) = queue.recv().await {
                let result = match next {
                    Outgoing::Text { conversation, text } => backend.send_text(&conversation, &text).await,
                    Outgoing::Reply { conversation, to, text } => backend.reply(&conversation, &to, &text).await,
                    Outgoing::Attach { conversation, path } => {
                        let mut progress = progress_to(&tx);
                        match backend.attach(&home, &conversation, Path::new(&path), &mut progress).await {
                            Ok((m, files)) => {
                                let done = Input::Files { conversation, message: m.id.clone(), files };
                                let _ = tx.send(Input::Sent(Ok(m)));
                                let _ = tx.send(done);
                                continue;
                            }
                            Err(e) => Err(e),
                        }
                    }
                };
                let _ = tx.send(Input::Sent(result.map_err(|e| one_line(&e))));
            }
        })
    };
    let ctx = Ctx { tx: tx.clone(), sends, options, call: Arc::default() };
    let mut app = App::new(backend.handle());
    app.notifications = ctx.options.notifications;
    app.handle(Input::Loaded { conversations: backend.load().await?, select: None });

    let mut screen = Screen::enter()?;
    let keys = tx.clone();
    std::thread::spawn(move || loop {
        let event = crossterm::event::read();
        match &event {
            Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => {
                if keys.send(Input::Key(*k)).is_err() {
                    return;
                }
            }
            Ok(Event::Resize(..)) => {
                if keys.send(Input::Resize).is_err() {
                    return;
                }
            }
            Ok(Event::FocusGained | Event::FocusLost) => {
                if keys.send(Input::Focus(matches!(event, Ok(Event::FocusGained)))).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    });

    let mut failed = None;
    // The conversation the chat view shows, and how many messages it had.
    let mut shown: Option<(String, usize)> = None;
    loop {
        let mut scroll = 0;
        screen.terminal.draw(|f| scroll = render::draw(f, &app)).context("drawing")?;
        app.shown_scroll(scroll);
        if ctx.options.exit_after_first_frame {
            break;
        }
        let input = tokio::select! {
            Some(i) = rx.recv() => i,
            r = &mut running, if failed.is_none() => {
                // Only an error retrying cannot fix ends the handle's loop.
                failed = Some(r.err().unwrap_or_else(|| "disconnected".to_string()));
                break;
            }
        };
        for action in app.handle(input) {
            perform(&backend, action, &ctx);
        }
        if app.quit {
            break;
        }
        // What the chat view shows counts as read: its authors get read
        // receipts (unless this device turned them off), once per change.
        let now = app
            .selected
            .as_ref()
            .and_then(|id| app.conversations.iter().find(|c| &c.id == id).map(|c| (id.clone(), c.messages.len())));
        if now != shown {
            if let Some((id, _)) = now.clone() {
                let backend = backend.clone();
                // A failure (the server away) leaves the receipts queued.
                tokio::spawn(async move { backend.read(&id).await });
            }
            shown = now;
        }
    }
    drop(screen);
    sender.abort();
    match failed {
        Some(e) => Err(anyhow!("the connection ended: {e}")),
        None => Ok(ExitCode::SUCCESS),
    }
}

fn one_line(e: &anyhow::Error) -> String {
    crate::one_line(e)
}

/// Reads every conversation again and hands it to the state machine.
async fn reload(backend: &Backend, tx: &mpsc::UnboundedSender<Input>, select: Option<String>) {
    let input = match backend.load().await {
        Ok(conversations) => Input::Loaded { conversations, select },
        Err(e) => Input::Done(Outcome::Error(one_line(&e))),
    };
    let _ = tx.send(input);
}

/// Where actions post their answers, and the queue of messages to send.
struct Ctx {
    tx: mpsc::UnboundedSender<Input>,
    sends: mpsc::UnboundedSender<Outgoing>,
    options: Options,
    /// What hangs up the call this UI runs; `None` while none runs.
    call: Arc<std::sync::Mutex<Option<Arc<tokio::sync::Notify>>>>,
}

/// A transfer's progress as inputs, one per percent at most.
fn progress_to(tx: &mpsc::UnboundedSender<Input>) -> impl FnMut(&str, u64, u64) + Send {
    let tx = tx.clone();
    let mut last: Option<(String, u64)> = None;
    move |label: &str, done: u64, total: u64| {
        let percent = done.saturating_mul(100).checked_div(total).unwrap_or(0);
        if last.as_ref().is_some_and(|(l, p)| l == label && *p == percent) {
            return;
        }
        last = Some((label.to_string(), percent));
        let _ = tx.send(Input::Progress(Progress { label: label.to_string(), done, total }));
    }
}

/// The outcome of a reaction, edit or delete.
fn changed(done: &str, r: Result<backend::Queued>) -> Outcome {
    match r {
        Ok(backend::Queued(false)) => Outcome::Notice(done.to_string()),
        Ok(backend::Queued(true)) => Outcome::Notice(format!("{done} here; it goes out when the connection is back")),
        Err(e) => Outcome::Error(one_line(&e)),
    }
}

/// Carries out one action; what talks to the server (or the daemon) runs
/// as a task and posts its answer to `ctx.tx`.
fn perform(backend: &Backend, action: Action, ctx: &Ctx) {
    let backend = backend.clone();
    let tx = ctx.tx.clone();
    match action {
        Action::Quit => {}
        Action::Refresh { select } => {
            tokio::spawn(async move { reload(&backend, &tx, select).await });
        }
        Action::MarkVerified { handle, number } => {
            // The number the user compared is checked against the pinned
            // key and marked in one transaction: a key that changed while
            // the box was open is not verified.
            tokio::spawn(async move {
                let outcome = match backend.verify(&handle, &number).await {
                    Ok(()) => Outcome::Notice(format!("{handle} is verified")),
                    Err(e) => Outcome::Error(one_line(&e)),
                };
                let _ = tx.send(Input::Done(outcome));
                reload(&backend, &tx, None).await;
            });
        }
        Action::Send { conversation, text } => {
            let _ = ctx.sends.send(Outgoing::Text { conversation, text });
        }
        Action::Notify(note) => {
            // Off the loop; a desktop without a notification server is no news.
            tokio::spawn(async move { notify::show(&note).await });
        }
        Action::Reply { conversation, to, text } => {
            let _ = ctx.sends.send(Outgoing::Reply { conversation, to, text });
        }
        Action::Attach { conversation, path } => {
            let _ = ctx.sends.send(Outgoing::Attach { conversation, path });
        }
        Action::React { conversation, message, emoji, remove } => {
            tokio::spawn(async move {
                let r = backend.react(&conversation, &message, &emoji, remove).await;
                let _ = tx.send(Input::Done(changed(if remove { "reaction taken back" } else { "reacted" }, r)));
                reload(&backend, &tx, None).await;
            });
        }
        Action::Edit { conversation, message, text } => {
            tokio::spawn(async move {
                let _ = tx.send(Input::Done(changed("edited", backend.edit(&conversation, &message, &text).await)));
                reload(&backend, &tx, None).await;
            });
        }
        Action::Delete { conversation, message } => {
            tokio::spawn(async move {
                let r = backend.delete(&conversation, &message).await;
                let _ = tx.send(Input::Done(changed("deleted for everyone", r)));
                reload(&backend, &tx, None).await;
            });
        }
        Action::Save { conversation, message } => {
            let Some(dir) = ctx.options.downloads.clone() else {
                let _ = tx.send(Input::Done(Outcome::Error(
                    "no downloads directory: set downloads = \"/path\" in config.toml, or start with --downloads DIR"
                        .into(),
                )));
                return;
            };
            let home = ctx.options.home.clone();
            if let Err(e) = crate::config::check_downloads(&home, &dir) {
                let _ = tx.send(Input::Done(Outcome::Error(one_line(&e))));
                return;
            }
            tokio::spawn(async move {
                let mut progress = progress_to(&tx);
                let outcome = match backend.save(&home, &conversation, &message, &dir, &mut progress).await {
                    Ok(files) => {
                        let saved = files.iter().filter(|f| f.saved.is_some()).count();
                        let _ = tx.send(Input::Files { conversation, message, files });
                        Outcome::Notice(format!("{saved} file(s) saved in {}", dir.display()))
                    }
                    Err(e) => Outcome::Error(one_line(&e)),
                };
                let _ = tx.send(Input::Done(outcome));
            });
        }
        Action::Call { conversation } => {
            let hang_up = Arc::new(tokio::sync::Notify::new());
            {
                let mut running = ctx.call.lock().unwrap_or_else(|p| p.into_inner());
                if running.is_some() {
                    let _ = tx.send(Input::Done(Outcome::Error("a call is running: :hangup first".into())));
                    return;
                }
                *running = Some(Arc::clone(&hang_up));
            }
            let slot = Arc::clone(&ctx.call);
            tokio::spawn(async move {
                let steps = tx.clone();
                let mut on = move |line: String| {
                    let _ = steps.send(Input::Done(Outcome::Notice(line)));
                };
                let outcome = match backend.voice_call(conversation.as_deref(), hang_up, &mut on).await {
                    Ok(line) => Outcome::Notice(line),
                    Err(e) => Outcome::Error(one_line(&e)),
                };
                slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                let _ = tx.send(Input::Done(outcome));
                reload(&backend, &tx, None).await;
            });
        }
        Action::HangUp => {
            let running = ctx.call.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match running {
                Some(hang_up) => {
                    hang_up.notify_one();
                    let _ = tx.send(Input::Done(Outcome::Notice("hanging up…".into())));
                }
                None => {
                    let _ = tx.send(Input::Done(Outcome::Error("no call to hang up".into())));
                }
            }
        }
        Action::Run(command) => {
            tokio::spawn(async move {
                let (outcome, select) = match run_command(&backend, command).await {
                    Ok(done) => done,
                    Err(e) => (Outcome::Error(one_line(&e)), None),
                };
                let _ = tx.send(Input::Done(outcome));
                reload(&backend, &tx, select).await;
            });
        }
    }
}

/// The QR code of a safety number, in the command line's rendering.
pub fn qr_lines(number: &str) -> Vec<String> {
    qrcode::QrCode::new(number.as_bytes())
        .map(|qr| {
            qr.render::<qrcode::render::unicode::Dense1x2>()
                .quiet_zone(true)
                .build()
                .lines()
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// A command's outcome, and the conversation to select afterwards.
async fn run_command(backend: &Backend, command: Command) -> Result<(Outcome, Option<String>)> {
    Ok(match command {
        Command::Direct(handle) => {
            let id = backend.open_direct(&handle).await?;
            (Outcome::Notice(format!("conversation with {} open", handle.trim_start_matches('@'))), Some(id))
        }
        Command::CreateGroup { name, members } => {
            let id = backend.create_group(&name, &members).await?;
            (Outcome::Notice(format!("created {name}")), Some(id))
        }
        Command::Add { conversation, handle } => match backend.group_add(&conversation, &handle).await? {
            None => (Outcome::Notice(format!("added {handle}")), None),
            Some(id) => (
                Outcome::Notice(format!("{handle} was a member before: the group continues in a new conversation")),
                Some(id),
            ),
        },
        Command::Remove { conversation, handle } => {
            backend.group_remove(&conversation, &handle).await?;
            (Outcome::Notice(format!("removed {handle}")), None)
        }
        Command::Rename { conversation, name } => {
            backend.group_rename(&conversation, &name).await?;
            (Outcome::Notice(format!("renamed to {name}")), None)
        }
        Command::Leave { conversation } => {
            backend.group_leave(&conversation).await?;
            (Outcome::Notice("left the group".into()), None)
        }
        Command::Accept { conversation } => {
            let said = if backend.accept(&conversation).await? {
                "accepted: receipts flow and their link previews show"
            } else {
                "not a message request (nothing to accept)"
            };
            (Outcome::Notice(said.into()), Some(conversation))
        }
        Command::Disappearing { conversation, seconds } => {
            let changed = backend.set_disappearing(&conversation, seconds).await?;
            let what = match seconds {
                Some(s) => format!("disappearing messages: {}", subrosa_client::format_duration(s)),
                None => "disappearing messages: off".to_string(),
            };
            (Outcome::Notice(format!("{what}{}", if changed { "" } else { " (unchanged)" })), Some(conversation))
        }
        Command::Members { conversation } => {
            let mut lines = Vec::new();
            for m in backend.members(&conversation).await? {
                let this = if m.this_device { "  (this device)" } else { "" };
                lines.push(format!("{:<16} {}  {}{this}", m.handle, m.device, m.fingerprint));
            }
            lines.push(String::new());
            lines.push("handle, device id, key fingerprint of every member device".into());
            (Outcome::Overlay(Overlay { title: "Members".into(), lines, verify: None }), None)
        }
        Command::SafetyNumber { handle } => {
            let number = backend.safety_number(&handle).await?;
            let grouped = subrosa_core::safety::grouped(&number);
            let words: Vec<&str> = grouped.split(' ').collect();
            let mut lines: Vec<String> = words.chunks(4).map(|c| c.join(" ")).collect();
            lines.push(String::new());
            lines.extend(qr_lines(&number));
            lines.push(format!("Compare with {handle}'s screen, or scan their code."));
            let verified = backend.is_verified(&handle).await;
            if verified {
                lines.push(format!("{handle} is already verified."));
            }
            let title = format!("Safety number with {handle}");
            (Outcome::Overlay(Overlay { title, lines, verify: (!verified).then_some((handle, number)) }), None)
        }
    })
}

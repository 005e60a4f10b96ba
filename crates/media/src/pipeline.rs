//! The whole chain, sending and receiving, and a run of it from one WAV file
//! to another over a simulated network.
//!
//! [`Outgoing`] and [`Incoming`] are what a call uses for real; [`run`]
//! drives them with a seeded network model (loss, delay, jitter, hence
//! reordering) and a simulated clock, so a run is the same every time and
//! takes no wall time beyond the computing.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rand::{rngs::StdRng, Rng, SeedableRng};
use zeroize::Zeroizing;

use crate::codec::{CodecError, Decoder, Encoder, EncoderConfig, FRAME_SAMPLES};
use crate::jitter::{JitterBuffer, JitterConfig, JitterStats, Playout, FRAME};
use crate::secure::{
    ContextId, Epoch, EpochSecret, KeyError, LeafIndex, OpenError, Receiver, Sender, EPOCH_SECRET_LEN,
};
use crate::wav::{self, WavError};

/// Errors of running the chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// Opus refused.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// SFrame keys or sealing failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A WAV file could not be read or written.
    #[error(transparent)]
    Wav(#[from] WavError),
}

/// One device's outgoing stream: Opus, then SFrame.
#[derive(Debug)]
pub struct Outgoing {
    encoder: Encoder,
    sender: Sender,
}

impl Outgoing {
    /// A stream under `sender`'s key.
    ///
    /// # Errors
    /// [`PipelineError::Codec`] if libopus refuses the settings.
    pub fn new(sender: Sender, config: EncoderConfig) -> Result<Self, PipelineError> {
        Ok(Self { encoder: Encoder::new(config)?, sender })
    }

    /// Encodes and seals one 20 ms frame into the bytes to send.
    ///
    /// # Errors
    /// As [`Encoder::encode`] and [`Sender::seal`].
    pub fn frame(&mut self, samples: &[i16]) -> Result<Vec<u8>, PipelineError> {
        let packet = self.encoder.encode(samples)?;
        Ok(self.sender.seal(&packet)?)
    }

    /// The sender, to re-key it on a membership change.
    pub fn sender_mut(&mut self) -> &mut Sender {
        &mut self.sender
    }

    /// The encoder, to tell it the loss the receivers report.
    pub fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.encoder
    }
}

#[derive(Debug)]
struct Stream {
    context: ContextId,
    jitter: JitterBuffer,
    decoder: Decoder,
}

/// Counters of the receiving side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IncomingStats {
    /// frames that opened
    pub opened: u64,
    /// frames refused by SFrame (wrong key, removed sender, replay, tampering)
    pub refused: u64,
    /// opened frames Opus could not decode (concealed instead)
    pub undecodable: u64,
    /// the jitter buffers' counters, summed over senders
    pub jitter: JitterStats,
}

/// Most senders one call plays at once. A key id names its sender's leaf
/// index, and every member holding the epoch's secret can seal under any
/// leaf index (SFrame keys derived from a group secret authenticate the
/// group, not the member: RFC 9605, "Security Considerations"), so a
/// misbehaving member could open a stream, with its decoder and jitter
/// buffer, per made-up index. Past this many, frames of new senders are
/// refused.
pub const MAX_STREAMS: usize = 128;

/// The receiving side: opens every sender's frames, one jitter buffer and
/// decoder per sender, and mixes their playout.
#[derive(Debug)]
pub struct Incoming {
    receiver: Receiver,
    config: JitterConfig,
    streams: HashMap<LeafIndex, Stream>,
    /// When set, the only (sender, context) pairs played: the streams
    /// announced inside MLS by the call's signalling.
    admitted: Option<Vec<(LeafIndex, ContextId)>>,
    opened: u64,
    refused: u64,
    undecodable: u64,
}

impl Incoming {
    /// A receiving side holding `receiver`'s keys.
    pub fn new(receiver: Receiver, config: JitterConfig) -> Self {
        Self { receiver, config, streams: HashMap::new(), admitted: None, opened: 0, refused: 0, undecodable: 0 }
    }

    /// Plays the stream of `sender` under `context`, which the call's
    /// signalling announced inside MLS. Once any stream is admitted, frames
    /// of any other sender or context are refused
    /// ([`OpenError::NotAdmitted`]), even though they authenticate: every
    /// member can seal under any leaf index (see [`MAX_STREAMS`]), and a
    /// stream of another call in the same epoch would otherwise mix in.
    pub fn admit(&mut self, sender: LeafIndex, context: ContextId) {
        let list = self.admitted.get_or_insert_with(Vec::new);
        if !list.contains(&(sender, context)) {
            list.push((sender, context));
        }
    }

    /// The keys, to re-key on a membership change.
    pub fn receiver_mut(&mut self) -> &mut Receiver {
        &mut self.receiver
    }

    /// A packet arrived from the network at `arrival`.
    ///
    /// # Errors
    /// The [`OpenError`] it was dropped for (counted; the call carries on).
    pub fn packet(&mut self, bytes: &[u8], arrival: Duration) -> Result<(), OpenError> {
        let opened = match self.receiver.open(bytes) {
            Ok(o) => o,
            Err(e) => {
                self.refused += 1;
                return Err(e);
            }
        };
        if let Some(list) = &self.admitted {
            if !list.contains(&(opened.sender, opened.context)) {
                self.refused += 1;
                return Err(OpenError::NotAdmitted);
            }
        }
        self.opened += 1;
        let config = self.config;
        let fresh = || -> Option<Stream> {
            Some(Stream { context: opened.context, jitter: JitterBuffer::new(config), decoder: Decoder::new().ok()? })
        };
        let full = self.streams.len() >= MAX_STREAMS;
        let stream = match self.streams.get_mut(&opened.sender) {
            // The sender restarted its call: a new stream.
            Some(s) if s.context != opened.context => {
                if let Some(new) = fresh() {
                    *s = new;
                }
                s
            }
            Some(s) => s,
            None if full => {
                self.opened -= 1;
                self.refused += 1;
                return Err(OpenError::TooManySenders);
            }
            None => match fresh() {
                Some(new) => self.streams.entry(opened.sender).or_insert(new),
                None => return Ok(()),
            },
        };
        stream.jitter.push(opened.counter, opened.payload, arrival);
        Ok(())
    }

    /// The next 20 ms to play: every sender's frame, mixed.
    pub fn play(&mut self) -> Vec<i16> {
        let mut mix = vec![0i32; FRAME_SAMPLES];
        for stream in self.streams.values_mut() {
            let decoded = match stream.jitter.pop() {
                Playout::Waiting => continue,
                Playout::Packet { payload, .. } => stream.decoder.decode(&payload),
                Playout::Fec { next, .. } => stream.decoder.decode_fec(&next),
                Playout::Conceal { .. } => stream.decoder.conceal(),
            };
            let samples = match decoded {
                Ok(s) => s,
                Err(_) => {
                    self.undecodable += 1;
                    stream.decoder.conceal().unwrap_or_default()
                }
            };
            for (m, s) in mix.iter_mut().zip(samples) {
                *m += i32::from(s);
            }
        }
        mix.into_iter().map(|m| i16::try_from(m.clamp(i32::from(i16::MIN), i32::from(i16::MAX))).unwrap_or(0)).collect()
    }

    /// Whether any sender's stream has started.
    pub fn has_streams(&self) -> bool {
        !self.streams.is_empty()
    }

    /// What the receiving side did so far.
    pub fn stats(&self) -> IncomingStats {
        let mut jitter = JitterStats::default();
        for s in self.streams.values() {
            let j = s.jitter.stats();
            jitter.queued += j.queued;
            jitter.late += j.late;
            jitter.duplicates += j.duplicates;
            jitter.played += j.played;
            jitter.fec += j.fec;
            jitter.concealed += j.concealed;
            jitter.stretched += j.stretched;
            jitter.dropped += j.dropped;
        }
        IncomingStats { opened: self.opened, refused: self.refused, undecodable: self.undecodable, jitter }
    }
}

/// A seeded model of the network between two devices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Network {
    /// Probability that a packet is lost (0.0–1.0).
    pub loss: f64,
    /// Delay every packet has.
    pub base_delay: Duration,
    /// Extra delay, uniform between zero and this; packets overtake each
    /// other when it exceeds 20 ms.
    pub jitter: Duration,
    /// Seed of the random choices.
    pub seed: u64,
}

impl Default for Network {
    fn default() -> Self {
        Self { loss: 0.0, base_delay: Duration::from_millis(40), jitter: Duration::from_millis(60), seed: 1 }
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunReport {
    /// frames sent
    pub sent: u64,
    /// packets the network lost
    pub lost: u64,
    /// the receiving side's counters
    pub incoming: IncomingStats,
}

/// The keys of a run: the sender's and the receiver's epoch secret (the same
/// for a member; another for an outsider).
#[derive(Debug)]
pub struct RunKeys {
    /// what the sender seals with
    pub sender: EpochSecret,
    /// what the receiver opens with
    pub receiver: EpochSecret,
}

impl RunKeys {
    /// Both sides hold the same fresh random secret.
    ///
    /// # Errors
    /// Never in practice (the length is right).
    pub fn shared() -> Result<Self, KeyError> {
        let bytes: [u8; EPOCH_SECRET_LEN] = rand::random();
        Ok(Self {
            sender: EpochSecret::new(Zeroizing::new(bytes.to_vec()))?,
            receiver: EpochSecret::new(Zeroizing::new(bytes.to_vec()))?,
        })
    }
}

/// Runs `input` (48 kHz mono) through encode → SFrame → `network` → open →
/// jitter buffer → decode and returns what the listener hears, from the first
/// frame played (the buffer's initial fill is not included).
///
/// # Errors
/// [`PipelineError`] if the codec or the keys refuse.
pub fn run(input: &[i16], network: Network, keys: RunKeys) -> Result<(Vec<i16>, RunReport), PipelineError> {
    let epoch = Epoch(1);
    let sender = Sender::new(&keys.sender, epoch, LeafIndex(0), ContextId::random())?;
    let loss_percent = (network.loss * 100.0).round().clamp(0.0, 100.0) as u8;
    let mut outgoing = Outgoing::new(
        sender,
        EncoderConfig { expected_loss_percent: loss_percent.max(5), ..EncoderConfig::default() },
    )?;
    let jitter_config = JitterConfig::default();
    let mut incoming = Incoming::new(Receiver::new(keys.receiver, epoch), jitter_config);
    let mut rng = StdRng::seed_from_u64(network.seed);

    let frames = input.len().div_ceil(FRAME_SAMPLES);
    let mut arrivals: Vec<(Duration, Vec<u8>)> = Vec::with_capacity(frames);
    let mut lost = 0u64;
    for (i, chunk) in input.chunks(FRAME_SAMPLES).enumerate() {
        let mut frame = chunk.to_vec();
        frame.resize(FRAME_SAMPLES, 0);
        let bytes = outgoing.frame(&frame)?;
        if rng.gen_bool(network.loss.clamp(0.0, 1.0)) {
            lost += 1;
            continue;
        }
        let extra = network.jitter.mul_f64(rng.gen_range(0.0..=1.0));
        let sent_at = FRAME * u32::try_from(i).unwrap_or(u32::MAX);
        arrivals.push((sent_at + network.base_delay + extra, bytes));
    }
    arrivals.sort_by_key(|(at, _)| *at);

    // The playout clock: one frame every 20 ms until everything sent could
    // have been played, however deep the buffer went.
    let slack = (network.base_delay + network.jitter + jitter_config.max_delay).as_millis() / 20 + 4;
    let ticks = frames + usize::try_from(slack).unwrap_or(0);
    let mut output = Vec::with_capacity(ticks * FRAME_SAMPLES);
    let mut pending = arrivals.into_iter().peekable();
    for k in 0..ticks {
        let now = FRAME * u32::try_from(k).unwrap_or(u32::MAX);
        while let Some((at, bytes)) = pending.next_if(|(at, _)| *at <= now) {
            // A refused frame is counted in the stats and dropped.
            let _ = incoming.packet(&bytes, at);
        }
        let started = incoming.stats().jitter.played > 0;
        let frame = incoming.play();
        if started || incoming.stats().jitter.played > 0 {
            output.extend(frame);
        }
    }
    let report = RunReport { sent: u64::try_from(frames).unwrap_or(u64::MAX), lost, incoming: incoming.stats() };
    Ok((output, report))
}

/// [`run`] from one WAV file to another, with a fresh shared key.
///
/// # Errors
/// [`PipelineError::Wav`] for unreadable input or unwritable output, or as [`run`].
pub fn run_files(input: &Path, output: &Path, network: Network) -> Result<RunReport, PipelineError> {
    let samples = wav::read(input)?;
    let (out, report) = run(&samples, network, RunKeys::shared()?)?;
    wav::write(output, &out)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quality::{similarity, test_melody};

    fn net(loss: f64) -> Network {
        Network { loss, ..Network::default() }
    }

    #[test]
    fn made_up_sender_indexes_open_at_most_max_streams() {
        let secret = || EpochSecret::new(Zeroizing::new(vec![9; EPOCH_SECRET_LEN])).expect("secret");
        let mut incoming = Incoming::new(Receiver::new(secret(), Epoch(1)), JitterConfig::default());
        let mut refused = 0;
        for index in 0..(MAX_STREAMS as u32 + 40) {
            let mut forger = Sender::new(&secret(), Epoch(1), LeafIndex(index), ContextId::random()).expect("sender");
            let packet = forger.seal(&[0xf8, 0xff, 0xfe]).expect("sealed");
            if matches!(incoming.packet(&packet, Duration::ZERO), Err(OpenError::TooManySenders)) {
                refused += 1;
            }
        }
        assert_eq!(incoming.streams.len(), MAX_STREAMS);
        assert_eq!(refused, 40);
        assert_eq!(incoming.stats().refused, 40);
    }

    #[test]
    fn only_admitted_streams_are_played() {
        let secret = || EpochSecret::new(Zeroizing::new(vec![3; EPOCH_SECRET_LEN])).expect("secret");
        let mut incoming = Incoming::new(Receiver::new(secret(), Epoch(1)), JitterConfig::default());
        let (bob, other) = (ContextId::from_bits(11), ContextId::from_bits(12));
        incoming.admit(LeafIndex(1), bob);
        let seal = |index: u32, context: ContextId| {
            let mut s = Sender::new(&secret(), Epoch(1), LeafIndex(index), context).expect("sender");
            s.seal(&[0xf8, 0xff, 0xfe]).expect("sealed")
        };
        assert_eq!(incoming.packet(&seal(1, bob), Duration::ZERO), Ok(()));
        // The same member under a context nobody announced (another call, a
        // replay of an old one), and another leaf index: refused.
        assert_eq!(incoming.packet(&seal(1, other), Duration::ZERO), Err(OpenError::NotAdmitted));
        assert_eq!(incoming.packet(&seal(2, bob), Duration::ZERO), Err(OpenError::NotAdmitted));
        assert_eq!(incoming.stats().refused, 2);
        assert_eq!(incoming.streams.len(), 1);
    }

    #[test]
    fn a_clean_network_carries_the_melody() {
        let input = test_melody(4.0);
        let (out, report) = run(&input, net(0.0), RunKeys::shared().expect("keys")).expect("run");
        let s = similarity(&input, &out);
        assert_eq!(report.lost, 0);
        assert!(report.incoming.jitter.played > 150, "{report:?}");
        assert!(s.correlation > 0.9, "{s:?} {report:?}");
        assert!(s.energy_ratio_db.abs() < 3.0, "{s:?}");
    }

    #[test]
    fn five_percent_loss_is_repaired() {
        let input = test_melody(4.0);
        let (out, report) = run(&input, net(0.05), RunKeys::shared().expect("keys")).expect("run");
        let s = similarity(&input, &out);
        assert!(report.lost > 0, "{report:?}");
        assert!(report.incoming.jitter.fec > 0, "{report:?}");
        assert!(s.correlation > 0.88, "{s:?} {report:?}");
        assert!(s.energy_ratio_db.abs() < 3.0, "{s:?}");
    }

    #[test]
    fn twenty_percent_loss_still_resembles_the_input() {
        let input = test_melody(4.0);
        let (out, report) = run(&input, net(0.20), RunKeys::shared().expect("keys")).expect("run");
        let s = similarity(&input, &out);
        assert!(s.correlation > 0.75, "{s:?} {report:?}");
    }

    #[test]
    fn a_wrong_key_hears_nothing() {
        let input = test_melody(2.0);
        let keys = RunKeys {
            sender: RunKeys::shared().expect("keys").sender,
            receiver: RunKeys::shared().expect("keys").receiver,
        };
        let (out, report) = run(&input, net(0.0), keys).expect("run");
        assert_eq!(report.incoming.opened, 0);
        assert!(report.incoming.refused > 90);
        assert!(out.iter().all(|s| *s == 0));
    }

    #[test]
    fn wav_file_to_wav_file() {
        let dir = std::env::temp_dir().join(format!("subrosa-pipeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let input = test_melody(2.0);
        wav::write(&dir.join("in.wav"), &input).expect("write");
        let report = run_files(&dir.join("in.wav"), &dir.join("out.wav"), net(0.05)).expect("run");
        let out = wav::read(&dir.join("out.wav")).expect("read");
        let s = similarity(&input, &out);
        assert!(s.correlation > 0.85, "{s:?} {report:?}");
        assert!(run_files(&dir.join("missing.wav"), &dir.join("x.wav"), net(0.0)).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}

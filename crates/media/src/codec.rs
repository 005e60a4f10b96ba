//! Opus (libopus through the `opus` crate): 48 kHz mono, 20 ms frames, with
//! in-band forward error correction tuned to the loss the receiver reports.

use std::fmt;

/// Samples per second of every call.
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples in one 20 ms frame.
pub const FRAME_SAMPLES: usize = 960;
/// The largest Opus packet we produce or accept (RFC 6716 allows 1275 per frame).
pub const MAX_PACKET: usize = 1275;

/// Errors of the codec.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A frame to encode is not [`FRAME_SAMPLES`] samples.
    #[error("a frame must be {FRAME_SAMPLES} samples")]
    FrameLength,
    /// A received packet is not a 20 ms Opus packet.
    #[error("not a 20 ms Opus packet")]
    BadPacket,
    /// libopus refused.
    #[error("opus: {0}")]
    Opus(String),
}

impl From<opus::Error> for CodecError {
    fn from(e: opus::Error) -> Self {
        Self::Opus(e.description().to_string())
    }
}

/// Encoder settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Target bit rate (bits/s). 32 kbit/s keeps speech wide-band with room
    /// for the FEC copy.
    pub bitrate: i32,
    /// The packet loss the receiver reports, in percent (0–100): Opus spends
    /// that much more on the FEC copy of each frame.
    pub expected_loss_percent: u8,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self { bitrate: 32_000, expected_loss_percent: 10 }
    }
}

/// An Opus encoder for one outgoing stream.
pub struct Encoder {
    inner: opus::Encoder,
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Encoder")
    }
}

impl Encoder {
    /// A voice encoder with in-band FEC on.
    ///
    /// # Errors
    /// [`CodecError::Opus`] if libopus refuses a setting.
    pub fn new(config: EncoderConfig) -> Result<Self, CodecError> {
        let mut inner = opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)?;
        inner.set_bitrate(opus::Bitrate::Bits(config.bitrate))?;
        // Speech: keeps libopus in SILK or hybrid mode, where in-band FEC lives.
        inner.set_signal(opus::Signal::Voice)?;
        inner.set_inband_fec(true)?;
        let mut encoder = Self { inner };
        encoder.set_expected_loss(config.expected_loss_percent)?;
        Ok(encoder)
    }

    /// Tells the encoder how much loss to protect against (percent, capped at 100).
    ///
    /// # Errors
    /// [`CodecError::Opus`] if libopus refuses.
    pub fn set_expected_loss(&mut self, percent: u8) -> Result<(), CodecError> {
        self.inner.set_packet_loss_perc(i32::from(percent.min(100)))?;
        Ok(())
    }

    /// Encodes one 20 ms frame.
    ///
    /// # Errors
    /// [`CodecError::FrameLength`] unless `frame` is [`FRAME_SAMPLES`] long.
    pub fn encode(&mut self, frame: &[i16]) -> Result<Vec<u8>, CodecError> {
        if frame.len() != FRAME_SAMPLES {
            return Err(CodecError::FrameLength);
        }
        Ok(self.inner.encode_vec(frame, MAX_PACKET)?)
    }
}

/// An Opus decoder for one incoming stream.
pub struct Decoder {
    inner: opus::Decoder,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Decoder")
    }
}

/// Checks that an untrusted packet is one 20 ms Opus packet before libopus
/// decodes it, so every decoded packet is one frame of the playout clock.
fn check_packet(packet: &[u8]) -> Result<(), CodecError> {
    if packet.is_empty() || packet.len() > MAX_PACKET {
        return Err(CodecError::BadPacket);
    }
    match opus::packet::get_nb_samples(packet, SAMPLE_RATE) {
        Ok(FRAME_SAMPLES) => Ok(()),
        _ => Err(CodecError::BadPacket),
    }
}

impl Decoder {
    /// A decoder for 48 kHz mono.
    ///
    /// # Errors
    /// [`CodecError::Opus`] if libopus refuses.
    pub fn new() -> Result<Self, CodecError> {
        Ok(Self { inner: opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)? })
    }

    fn run(&mut self, packet: &[u8], fec: bool) -> Result<Vec<i16>, CodecError> {
        let mut out = vec![0i16; FRAME_SAMPLES];
        let n = self.inner.decode(packet, &mut out, fec)?;
        if n != FRAME_SAMPLES {
            return Err(CodecError::BadPacket);
        }
        Ok(out)
    }

    /// Decodes one received packet.
    ///
    /// # Errors
    /// [`CodecError::BadPacket`] for anything but a 20 ms Opus packet, or
    /// [`CodecError::Opus`] if libopus cannot decode it.
    pub fn decode(&mut self, packet: &[u8]) -> Result<Vec<i16>, CodecError> {
        check_packet(packet)?;
        self.run(packet, false)
    }

    /// Rebuilds a lost frame from the FEC copy the *next* packet carries
    /// (libopus conceals instead when that packet has none). Decode `next`
    /// itself afterwards as usual.
    ///
    /// # Errors
    /// As [`Decoder::decode`].
    pub fn decode_fec(&mut self, next: &[u8]) -> Result<Vec<i16>, CodecError> {
        check_packet(next)?;
        self.run(next, true)
    }

    /// Conceals a lost frame when no later packet is at hand (packet loss
    /// concealment: libopus extrapolates from what it decoded last).
    ///
    /// # Errors
    /// [`CodecError::Opus`] if libopus refuses.
    pub fn conceal(&mut self) -> Result<Vec<i16>, CodecError> {
        self.run(&[], false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vowel-like tone: a 200 Hz fundamental and a few harmonics.
    fn voice(frames: usize) -> Vec<i16> {
        (0..frames * FRAME_SAMPLES)
            .map(|n| {
                let t = n as f64 / f64::from(SAMPLE_RATE);
                let s: f64 = [(1.0, 200.0), (0.5, 400.0), (0.3, 600.0), (0.2, 1000.0)]
                    .iter()
                    .map(|(a, f)| a * (2.0 * std::f64::consts::PI * f * t).sin())
                    .sum();
                (s * 6000.0) as i16
            })
            .collect()
    }

    fn error(a: &[i16], b: &[i16]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>()
    }

    fn packets(input: &[i16], loss: u8) -> Vec<Vec<u8>> {
        let mut enc =
            Encoder::new(EncoderConfig { expected_loss_percent: loss, ..EncoderConfig::default() }).expect("encoder");
        input.chunks(FRAME_SAMPLES).map(|f| enc.encode(f).expect("encode")).collect()
    }

    #[test]
    fn a_frame_round_trips_at_48k_mono_20ms() {
        let input = voice(20);
        let pkts = packets(&input, 10);
        let mut dec = Decoder::new().expect("decoder");
        let mut out = Vec::new();
        for p in &pkts {
            assert!(p.len() < 200, "32 kbit/s is 80 bytes a frame, got {}", p.len());
            out.extend(dec.decode(p).expect("decode"));
        }
        assert_eq!(out.len(), input.len());
        let energy = |s: &[i16]| s.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>();
        let ratio = energy(&out[4800..]) / energy(&input[4800..]);
        assert!((0.5..2.0).contains(&ratio), "energy ratio {ratio}");
    }

    #[test]
    fn a_lost_frame_comes_back_from_fec_better_than_concealed() {
        let input = voice(30);
        let pkts = packets(&input, 20);
        let lost = 20;
        // The reference: what the decoder makes of frame `lost` when it arrives.
        let mut reference = Decoder::new().expect("decoder");
        let mut want = Vec::new();
        for p in &pkts[..=lost] {
            want = reference.decode(p).expect("decode");
        }
        let mut with_fec = Decoder::new().expect("decoder");
        let mut with_plc = Decoder::new().expect("decoder");
        for p in &pkts[..lost] {
            with_fec.decode(p).expect("decode");
            with_plc.decode(p).expect("decode");
        }
        let fec = with_fec.decode_fec(&pkts[lost + 1]).expect("fec");
        let plc = with_plc.conceal().expect("plc");
        assert_eq!(fec.len(), FRAME_SAMPLES);
        assert_eq!(plc.len(), FRAME_SAMPLES);
        assert_ne!(fec, plc, "the next packet carried no FEC copy");
        assert!(
            error(&fec, &want) < error(&plc, &want),
            "FEC {} is not closer than PLC {}",
            error(&fec, &want),
            error(&plc, &want)
        );
        // Concealment is not silence: it continues the voice.
        assert!(plc.iter().any(|s| s.unsigned_abs() > 500));
    }

    #[test]
    fn garbage_and_other_frame_sizes_are_refused() {
        let mut dec = Decoder::new().expect("decoder");
        assert!(dec.decode(&[]).is_err());
        assert!(dec.decode(&[0xff; 2000]).is_err());
        // A 10 ms CELT packet (TOC config 30): valid Opus, wrong frame size.
        assert!(dec.decode(&[30 << 3, 0, 0]).is_err());
        let mut enc = Encoder::new(EncoderConfig::default()).expect("encoder");
        assert!(enc.encode(&[0; 100]).is_err());
    }
}

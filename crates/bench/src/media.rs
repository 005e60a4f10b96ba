//! `media`: what a call costs the CPU per 20 ms frame, in three rows
//! measured in the same run over the same melody: (a) Opus alone, encode +
//! decode (the baseline); (b) Opus + SFrame, encode + seal + open + decode;
//! (c) the whole chain as a call runs it (`Outgoing` / `Incoming`: Opus,
//! SFrame, the jitter buffer and playout). Each row prints µs per frame,
//! the share of the 20 ms real-time budget one core spends on it, and its
//! ratio to (a); a fourth row times SFrame seal + open alone on a packet of
//! the same size. Each row is the fastest of five rounds, the rows
//! interleaved, so a busy machine skews them alike. Then the bytes SFrame
//! adds to each packet.

use std::time::{Duration, Instant};

use anyhow::Result;
use subrosa_media::codec::{Decoder, Encoder, EncoderConfig, FRAME_SAMPLES};
use subrosa_media::jitter::{JitterConfig, FRAME};
use subrosa_media::pipeline::{Incoming, Outgoing, RunKeys};
use subrosa_media::quality::test_melody;
use subrosa_media::secure::{ContextId, Epoch, LeafIndex, Receiver, Sender};

fn frames(n: usize) -> Vec<Vec<i16>> {
    let seconds = (n * FRAME_SAMPLES) as f64 / 48_000.0;
    test_melody(seconds + 0.1).chunks_exact(FRAME_SAMPLES).take(n).map(<[i16]>::to_vec).collect()
}

fn opus_alone(input: &[Vec<i16>]) -> Result<(Duration, usize)> {
    let mut enc = Encoder::new(EncoderConfig::default())?;
    let mut dec = Decoder::new()?;
    let mut bytes = 0;
    let t = Instant::now();
    for f in input {
        let p = enc.encode(f)?;
        bytes += p.len();
        std::hint::black_box(dec.decode(&p)?);
    }
    Ok((t.elapsed(), bytes))
}

fn opus_sframe(input: &[Vec<i16>]) -> Result<(Duration, usize)> {
    let keys = RunKeys::shared()?;
    let mut enc = Encoder::new(EncoderConfig::default())?;
    let mut dec = Decoder::new()?;
    let mut sender = Sender::new(&keys.sender, Epoch(1), LeafIndex(0), ContextId::random())?;
    let mut receiver = Receiver::new(keys.receiver, Epoch(1));
    let mut bytes = 0;
    let t = Instant::now();
    for f in input {
        let p = enc.encode(f)?;
        let sealed = sender.seal(&p)?;
        bytes += sealed.len();
        let opened = receiver.open(&sealed).map_err(|e| anyhow::anyhow!("open: {e}"))?;
        std::hint::black_box(dec.decode(&opened.payload)?);
    }
    Ok((t.elapsed(), bytes))
}

fn whole_chain(input: &[Vec<i16>]) -> Result<Duration> {
    let keys = RunKeys::shared()?;
    let sender = Sender::new(&keys.sender, Epoch(1), LeafIndex(0), ContextId::random())?;
    let mut out = Outgoing::new(sender, EncoderConfig::default())?;
    let mut inc = Incoming::new(Receiver::new(keys.receiver, Epoch(1)), JitterConfig::default());
    let t = Instant::now();
    for (i, f) in input.iter().enumerate() {
        let sealed = out.frame(f)?;
        let now = FRAME * u32::try_from(i)?;
        inc.packet(&sealed, now).map_err(|e| anyhow::anyhow!("open: {e}"))?;
        std::hint::black_box(inc.play());
    }
    Ok(t.elapsed())
}

fn sframe_alone(input: &[Vec<i16>]) -> Result<Duration> {
    // A real packet's size: what Opus makes of the first frame.
    let packet = Encoder::new(EncoderConfig::default())?.encode(&input[0])?;
    let keys = RunKeys::shared()?;
    let mut sender = Sender::new(&keys.sender, Epoch(1), LeafIndex(0), ContextId::random())?;
    let mut receiver = Receiver::new(keys.receiver, Epoch(1));
    let t = Instant::now();
    for _ in input {
        let sealed = sender.seal(&packet)?;
        std::hint::black_box(receiver.open(&sealed).map_err(|e| anyhow::anyhow!("open: {e}"))?);
    }
    Ok(t.elapsed())
}

pub fn run(n: usize) -> Result<()> {
    const ROUNDS: usize = 5;
    let input = frames(n);
    println!(
        "media: {n} frames of 20 ms (48 kHz mono, Opus 32 kbit/s with in-band FEC, SFrame AES-128-GCM), one thread"
    );
    println!("each row: the fastest of {ROUNDS} rounds, the rows interleaved within each round");
    // Warm-up: libopus tables, page faults.
    opus_sframe(&input[..input.len().min(200)])?;
    let mut best = [Duration::MAX; 4];
    let (mut bytes_a, mut bytes_b) = (0, 0);
    for _ in 0..ROUNDS {
        let (a, ba) = opus_alone(&input)?;
        let (b, bb) = opus_sframe(&input)?;
        let c = whole_chain(&input)?;
        let s = sframe_alone(&input)?;
        (bytes_a, bytes_b) = (ba, bb);
        for (slot, d) in best.iter_mut().zip([a, b, c, s]) {
            *slot = (*slot).min(d);
        }
    }
    let [a, b, c, s] = best;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let budget = FRAME.as_secs_f64() * 1e6;
    println!("{:<48} {:>12} {:>14} {:>10}", "row", "µs/frame", "% of 20 ms", "vs (a)");
    for (name, d) in [
        ("(a) Opus encode + decode (baseline)", a),
        ("(b) Opus + SFrame seal + open", b),
        ("(c) whole chain: + jitter buffer, playout", c),
        ("(s) SFrame seal + open alone", s),
    ] {
        println!(
            "{:<48} {:>12.1} {:>13.2}% {:>9.2}x",
            name,
            per(d),
            per(d) / budget * 100.0,
            d.as_secs_f64() / a.as_secs_f64()
        );
    }
    println!(
        "SFrame adds {:.1} bytes per packet on average ({:.1} B Opus → {:.1} B sealed)",
        (bytes_b as f64 - bytes_a as f64) / n as f64,
        bytes_a as f64 / n as f64,
        bytes_b as f64 / n as f64
    );
    Ok(())
}

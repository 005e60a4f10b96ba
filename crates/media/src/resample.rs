//! Sample-rate and channel conversion between a sound card and the call's
//! 48 kHz mono, by linear interpolation. Speech through Opus at 32 kbit/s
//! loses more than linear interpolation does, and a sound card that runs
//! at 48 kHz (most do) is passed through unchanged.
//!
//! Both converters keep their state between calls, so a stream may be
//! handed in callback by callback, whatever the callbacks' sizes.

/// Converts a stream pushed in pieces (a microphone's callbacks).
#[derive(Debug, Clone)]
pub struct Push {
    /// Input samples per output sample.
    step: f64,
    /// Where the next output sample falls, in input samples after `last`.
    pos: f64,
    last: f32,
}

impl Push {
    /// From `from` Hz to `to` Hz (both above zero; zero is taken as one).
    pub fn new(from: u32, to: u32) -> Self {
        Self { step: f64::from(from.max(1)) / f64::from(to.max(1)), pos: 1.0, last: 0.0 }
    }

    /// Converts `input` and appends the result to `out`.
    pub fn push(&mut self, input: impl IntoIterator<Item = f32>, out: &mut Vec<f32>) {
        for x in input {
            while self.pos <= 1.0 {
                // Weighted as two products, so a sample that falls on an
                // input sample (`pos` 1: the same rate) is that sample exactly.
                let t = self.pos as f32;
                out.push(self.last * (1.0 - t) + x * t);
                self.pos += self.step;
            }
            self.pos -= 1.0;
            self.last = x;
        }
    }
}

/// Converts a stream pulled sample by sample (a speaker's callbacks).
#[derive(Debug, Clone)]
pub struct Pull {
    /// Input samples per output sample.
    step: f64,
    /// Where the next output sample falls, in input samples after `a`.
    pos: f64,
    a: f32,
    b: f32,
}

impl Pull {
    /// From `from` Hz to `to` Hz (both above zero; zero is taken as one).
    pub fn new(from: u32, to: u32) -> Self {
        // Two samples are taken before the first output (which is the first input).
        Self { step: f64::from(from.max(1)) / f64::from(to.max(1)), pos: 2.0, a: 0.0, b: 0.0 }
    }

    /// The next output sample, taking input samples from `source` as needed.
    pub fn next(&mut self, mut source: impl FnMut() -> f32) -> f32 {
        while self.pos >= 1.0 {
            self.a = self.b;
            self.b = source();
            self.pos -= 1.0;
        }
        let t = self.pos as f32;
        let v = self.a * (1.0 - t) + self.b * t;
        self.pos += self.step;
        v
    }
}

/// The mean of one interleaved frame's channels.
pub fn mono(frame: &[f32]) -> f32 {
    if frame.is_empty() {
        return 0.0;
    }
    frame.iter().sum::<f32>() / frame.len() as f32
}

/// A sample in -1.0..=1.0 as 16 bits (clipped).
pub fn to_i16(x: f32) -> i16 {
    (x.clamp(-1.0, 1.0) * f32::from(i16::MAX)) as i16
}

/// A 16-bit sample in -1.0..=1.0.
pub fn from_i16(x: i16) -> f32 {
    f32::from(x) / f32::from(i16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, seconds: f64) -> Vec<f32> {
        let n = (f64::from(rate) * seconds) as usize;
        (0..n).map(|i| (i as f64 * 440.0 / f64::from(rate) * std::f64::consts::TAU).sin() as f32 * 0.5).collect()
    }

    #[test]
    fn the_same_rate_passes_samples_through() {
        let input = tone(48_000, 0.1);
        let mut out = Vec::new();
        let mut p = Push::new(48_000, 48_000);
        for chunk in input.chunks(37) {
            p.push(chunk.iter().copied(), &mut out);
        }
        assert_eq!(out, input);
        let mut pull = Pull::new(48_000, 48_000);
        let mut it = input.iter().copied();
        let pulled: Vec<f32> = (0..input.len()).map(|_| pull.next(|| it.next().unwrap_or(0.0))).collect();
        assert_eq!(pulled, input);
    }

    #[test]
    fn another_rate_keeps_the_length_in_time_and_the_waveform() {
        // 44.1 kHz to 48 kHz and back, in uneven pieces.
        let input = tone(44_100, 1.0);
        let mut up = Vec::new();
        let mut p = Push::new(44_100, 48_000);
        for chunk in input.chunks(441) {
            p.push(chunk.iter().copied(), &mut up);
        }
        assert!((up.len() as i64 - 48_000).abs() <= 2, "{} samples", up.len());
        let want = tone(48_000, 1.0);
        let worst = up.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 0.01, "off by {worst}");
        let mut down = Pull::new(48_000, 44_100);
        let mut it = up.iter().copied();
        let back: Vec<f32> = (0..44_000).map(|_| down.next(|| it.next().unwrap_or(0.0))).collect();
        let worst = back.iter().zip(&input).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 0.01, "off by {worst}");
    }

    #[test]
    fn channels_are_averaged_and_samples_clipped() {
        assert_eq!(mono(&[0.5, -0.5]), 0.0);
        assert_eq!(mono(&[]), 0.0);
        assert_eq!(to_i16(2.0), i16::MAX);
        assert_eq!(to_i16(-2.0), -i16::MAX);
        assert_eq!(from_i16(i16::MAX), 1.0);
    }
}

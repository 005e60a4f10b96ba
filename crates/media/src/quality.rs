//! How much an output recording resembles its input: measures of quality,
//! not of time, for tests and benchmarks.

use crate::codec::SAMPLE_RATE;

/// A test signal that a wrong key or a packet-order bug would ruin: a
/// phase-continuous melody whose note changes every 60 ms, at frequencies
/// whose period does not divide 20 ms (so a frame played out of place does
/// not line up), with a softer second harmonic.
pub fn test_melody(seconds: f64) -> Vec<i16> {
    const NOTES: [f64; 7] = [310.0, 470.0, 630.0, 830.0, 530.0, 370.0, 710.0];
    let rate = f64::from(SAMPLE_RATE);
    let total = (seconds * rate) as usize;
    let note_len = (0.060 * rate) as usize;
    let mut phase = 0.0f64;
    (0..total)
        .map(|n| {
            let note = NOTES[(n / note_len) % NOTES.len()];
            phase += 2.0 * std::f64::consts::PI * note / rate;
            let s = phase.sin() + 0.3 * (2.0 * phase).sin();
            (s * 7000.0) as i16
        })
        .collect()
}

/// How alike two recordings are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarity {
    /// Mean over 100 ms windows of the reference (those with sound) of the
    /// best normalised cross-correlation with the output near the window's
    /// place, following the output's drift (the jitter buffer stretches and
    /// shrinks time). 1.0 is identical; unrelated sound is near 0.
    pub correlation: f64,
    /// Output energy over reference energy, in dB (0 is the same loudness).
    pub energy_ratio_db: f64,
}

/// Decimates to 8 kHz by averaging six samples (tones in the melody are far
/// below 4 kHz), so the lag search stays cheap.
fn decimate(x: &[i16]) -> Vec<f64> {
    x.chunks(6).map(|c| c.iter().map(|s| f64::from(*s)).sum::<f64>() / c.len() as f64).collect()
}

fn normalised(a: &[f64], b: &[f64]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa <= 0.0 || bb <= 0.0 {
        return 0.0;
    }
    ab / (aa * bb).sqrt()
}

/// Compares `output` with `reference` (both 48 kHz mono).
pub fn similarity(reference: &[i16], output: &[i16]) -> Similarity {
    let r = decimate(reference);
    let o = decimate(output);
    let window = 800; // 100 ms at 8 kHz
    let first_search = 800i64; // the first window may sit up to 100 ms later
    let follow = 320i64; // later ones within ±40 ms of the previous lag
    let mut lag = 0i64;
    let mut first = true;
    let (mut sum, mut count) = (0.0, 0usize);
    for start in (0..r.len().saturating_sub(window)).step_by(window) {
        let w = &r[start..start + window];
        if w.iter().map(|x| x * x).sum::<f64>() / (window as f64) < 1.0e4 {
            continue;
        }
        let (lo, hi) = if first { (-80, first_search) } else { (lag - follow, lag + follow) };
        let mut best = (0.0f64, lag);
        for l in lo..=hi {
            let s = start as i64 + l;
            if s < 0 || (s as usize) + window > o.len() {
                continue;
            }
            let c = normalised(w, &o[s as usize..s as usize + window]);
            if c > best.0 {
                best = (c, l);
            }
        }
        first = false;
        lag = best.1;
        sum += best.0;
        count += 1;
    }
    let energy = |x: &[i16]| x.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / x.len().max(1) as f64;
    let (er, eo) = (energy(reference), energy(output));
    let energy_ratio_db = if er > 0.0 && eo > 0.0 { 10.0 * (eo / er).log10() } else { f64::NEG_INFINITY };
    Similarity { correlation: if count == 0 { 0.0 } else { sum / count as f64 }, energy_ratio_db }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measure_tells_alike_from_unlike() {
        let a = test_melody(1.0);
        let same = similarity(&a, &a);
        assert!(same.correlation > 0.99 && same.energy_ratio_db.abs() < 0.01);
        // Delayed by 25 ms: still alike.
        let mut late = vec![0i16; 1200];
        late.extend(&a);
        assert!(similarity(&a, &late).correlation > 0.99);
        // Its 20 ms frames pairwise swapped: unlike.
        let mut swapped = a.clone();
        for pair in swapped.chunks_mut(1920) {
            if pair.len() == 1920 {
                let (x, y) = pair.split_at_mut(960);
                x.swap_with_slice(y);
            }
        }
        let s = similarity(&a, &swapped);
        assert!(s.correlation < 0.8, "{s:?}");
        assert!(similarity(&a, &vec![0; a.len()]).correlation < 0.01);
    }
}

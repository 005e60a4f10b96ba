//! WAV files in and out (the `hound` crate), for headless calls and tests.
//!
//! Input is 16-bit PCM at 8 to 48 kHz, mono or stereo: stereo is mixed down
//! to mono, and another rate than 48 kHz converted to it (as a sound card's
//! is, `resample`: a speech synthesiser's 22,050 Hz, a CD's 44,100 Hz).
//! Faster rates are refused rather than converted down without a filter.
//! Output is 48 kHz 16-bit mono.

use std::path::Path;

use crate::codec::SAMPLE_RATE;

/// The slowest input rate taken.
pub const MIN_INPUT_RATE: u32 = 8000;

/// Errors of reading or writing a WAV file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WavError {
    /// The file could not be read or written, or is not a WAV file.
    #[error("{0}")]
    Io(#[from] hound::Error),
    /// A WAV file in a format calls do not take.
    #[error("the WAV file must be 16-bit PCM at 8000 to 48000 Hz, mono or stereo (it is {0})")]
    Format(String),
}

/// Reads a 16-bit PCM WAV file as 48 kHz mono samples.
///
/// # Errors
/// [`WavError::Io`] for a missing or malformed file, [`WavError::Format`] for
/// a rate outside 8–48 kHz, another depth or channel count.
pub fn read(path: &Path) -> Result<Vec<i16>, WavError> {
    let reader = hound::WavReader::open(path)?;
    let spec = reader.spec();
    if !(MIN_INPUT_RATE..=SAMPLE_RATE).contains(&spec.sample_rate)
        || spec.bits_per_sample != 16
        || spec.sample_format != hound::SampleFormat::Int
        || !(1..=2).contains(&spec.channels)
    {
        return Err(WavError::Format(format!(
            "{} Hz, {} bits, {} channels",
            spec.sample_rate, spec.bits_per_sample, spec.channels
        )));
    }
    let samples = reader.into_samples::<i16>().collect::<Result<Vec<i16>, _>>()?;
    let mono: Vec<i16> = if spec.channels == 1 {
        samples
    } else {
        samples
            .chunks(2)
            .map(|pair| {
                let sum: i32 = pair.iter().map(|s| i32::from(*s)).sum();
                i16::try_from(sum / 2).unwrap_or(0)
            })
            .collect()
    };
    if spec.sample_rate == SAMPLE_RATE {
        return Ok(mono);
    }
    let mut converter = crate::resample::Push::new(spec.sample_rate, SAMPLE_RATE);
    let mut out = Vec::with_capacity(mono.len() * SAMPLE_RATE as usize / spec.sample_rate as usize + 1);
    converter.push(mono.iter().map(|s| crate::resample::from_i16(*s)), &mut out);
    Ok(out.into_iter().map(crate::resample::to_i16).collect())
}

/// Writes mono samples as a 48 kHz 16-bit PCM WAV file.
///
/// # Errors
/// [`WavError::Io`] if the file cannot be written.
pub fn write(path: &Path, samples: &[i16]) -> Result<(), WavError> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec)?;
    for s in samples {
        writer.write_sample(*s)?;
    }
    writer.finalize()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_formats() {
        let dir = std::env::temp_dir().join(format!("subrosa-wav-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("a.wav");
        let samples: Vec<i16> = (0..1000).map(|i| (i * 7 % 2000 - 1000) as i16).collect();
        write(&path, &samples).expect("write");
        assert_eq!(read(&path).expect("read"), samples);

        let write_at = |name: &str, rate: u32, bits: u16, samples: &[i16]| {
            let path = dir.join(name);
            let spec = hound::WavSpec {
                channels: 1,
                sample_rate: rate,
                bits_per_sample: bits,
                sample_format: hound::SampleFormat::Int,
            };
            let mut w = hound::WavWriter::create(&path, spec).expect("create");
            for s in samples {
                if bits == 16 {
                    w.write_sample(*s).expect("sample");
                } else {
                    w.write_sample(i32::from(*s)).expect("sample");
                }
            }
            w.finalize().expect("finalize");
            path
        };
        // A slower rate (a speech synthesiser's) comes out at 48 kHz: as
        // long, and the same tone.
        let tone: Vec<i16> = (0..22_050)
            .map(|i| (8000.0 * (2.0 * std::f64::consts::PI * 440.0 * f64::from(i) / 22_050.0).sin()) as i16)
            .collect();
        let got = read(&write_at("b.wav", 22_050, 16, &tone)).expect("read");
        assert!((47_990..=48_010).contains(&got.len()), "{} samples for one second", got.len());
        let crossings = got.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count();
        assert!((438..=442).contains(&crossings), "{crossings} periods of a 440 Hz second");
        // Faster rates, other depths and rates below 8 kHz are refused.
        for (rate, bits) in [(96_000, 16), (4000, 16), (48_000, 24)] {
            let path = write_at("d.wav", rate, bits, &samples);
            assert!(matches!(read(&path), Err(WavError::Format(_))), "{rate} Hz, {bits} bits");
        }

        std::fs::write(dir.join("c.wav"), b"not a wav").expect("write");
        assert!(matches!(read(&dir.join("c.wav")), Err(WavError::Io(_))));
        std::fs::remove_dir_all(&dir).ok();
    }
}

//! WAV files in and out (the `hound` crate), for headless calls and tests.
//!
//! Input must be 48 kHz 16-bit PCM; stereo is mixed down to mono. Output is
//! 48 kHz 16-bit mono.

use std::path::Path;

use crate::codec::SAMPLE_RATE;

/// Errors of reading or writing a WAV file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WavError {
    /// The file could not be read or written, or is not a WAV file.
    #[error("{0}")]
    Io(#[from] hound::Error),
    /// A WAV file in a format calls do not take.
    #[error("the WAV file must be 48000 Hz 16-bit PCM, mono or stereo (it is {0})")]
    Format(String),
}

/// Reads a 48 kHz 16-bit PCM WAV file as mono samples.
///
/// # Errors
/// [`WavError::Io`] for a missing or malformed file, [`WavError::Format`] for
/// another rate, depth or channel count.
pub fn read(path: &Path) -> Result<Vec<i16>, WavError> {
    let reader = hound::WavReader::open(path)?;
    let spec = reader.spec();
    if spec.sample_rate != SAMPLE_RATE
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
    if spec.channels == 1 {
        return Ok(samples);
    }
    Ok(samples
        .chunks(2)
        .map(|pair| {
            let sum: i32 = pair.iter().map(|s| i32::from(*s)).sum();
            i16::try_from(sum / 2).unwrap_or(0)
        })
        .collect())
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

        let other = dir.join("b.wav");
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 8000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&other, spec).expect("create");
        w.write_sample(0i16).expect("sample");
        w.finalize().expect("finalize");
        assert!(matches!(read(&other), Err(WavError::Format(_))));

        std::fs::write(dir.join("c.wav"), b"not a wav").expect("write");
        assert!(matches!(read(&dir.join("c.wav")), Err(WavError::Io(_))));
        std::fs::remove_dir_all(&dir).ok();
    }
}

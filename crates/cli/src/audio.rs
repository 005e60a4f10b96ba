//! The sound card of `call` and `answer`, behind the `audio` feature (cpal;
//! on Linux it links ALSA, so building it needs libasound2-dev). Without
//! the feature a call takes WAV files or `--mute`, and says so plainly.
//!
//! **Threads.** cpal runs each stream's callback on a thread of its own
//! and its streams may not move between threads, so one thread builds
//! them and holds them until the call drops the card. The call and the
//! callbacks meet in two bounded queues of 48 kHz mono samples: what the
//! microphone captured, what the speakers are to play. A side that falls
//! behind loses the oldest samples instead of growing the queue (at most
//! [`MAX_QUEUED`]); a speaker with nothing to play plays silence.

/// What to say when a call has neither an input file nor a sound card.
#[cfg(not(feature = "audio"))]
const NO_SOUND_CARD: &str = "this subrosa was built without sound card support: \
give --input FILE.wav (16-bit, 8 to 48 kHz) and --output FILE.wav, or --mute to send silence; \
for the microphone and speakers, build it with `--features audio` (needs libasound2-dev)";

/// The sound card for a call: its microphone when `microphone`, its
/// speakers when `speakers`; `None` when neither is wanted.
///
/// # Errors
/// Without the `audio` feature: a microphone asked for. With it: no such
/// device, or one that refuses every format tried.
#[cfg(not(feature = "audio"))]
pub fn open(microphone: bool, _speakers: bool) -> anyhow::Result<Option<subrosa_client::calls::SharedAudio>> {
    if microphone {
        anyhow::bail!("{NO_SOUND_CARD}");
    }
    // What this side hears without --output goes nowhere, as before.
    Ok(None)
}

#[cfg(feature = "audio")]
pub use card::open;

#[cfg(feature = "audio")]
mod card {
    use std::collections::VecDeque;
    use std::sync::{mpsc, Arc, Mutex, MutexGuard};

    use anyhow::{anyhow, bail, Context as _, Result};
    use cpal::traits::{DeviceTrait as _, HostTrait as _, StreamTrait as _};
    use cpal::{FromSample, SampleFormat, SizedSample};
    use subrosa_client::calls::{AudioDevice, SharedAudio};
    use subrosa_media::codec::{FRAME_SAMPLES, SAMPLE_RATE};
    use subrosa_media::resample::{from_i16, mono, to_i16, Pull, Push};

    use super::MAX_QUEUED;

    type Queue = Arc<Mutex<VecDeque<i16>>>;

    fn lock(q: &Queue) -> MutexGuard<'_, VecDeque<i16>> {
        q.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bounded_extend(q: &Queue, samples: impl IntoIterator<Item = i16>) {
        let mut q = lock(q);
        q.extend(samples);
        let over = q.len().saturating_sub(MAX_QUEUED);
        q.drain(..over);
    }

    /// The open card: the two queues, and the thread holding the streams
    /// (it ends, and the streams stop, when this is dropped).
    struct Card {
        captured: Option<Queue>,
        to_play: Option<Queue>,
        _stop: mpsc::Sender<()>,
    }

    impl AudioDevice for Card {
        fn capture(&mut self) -> Option<Vec<i16>> {
            let mut q = lock(self.captured.as_ref()?);
            (q.len() >= FRAME_SAMPLES).then(|| q.drain(..FRAME_SAMPLES).collect())
        }

        fn play(&mut self, frame: &[i16]) {
            if let Some(q) = &self.to_play {
                bounded_extend(q, frame.iter().copied());
            }
        }
    }

    pub fn open(microphone: bool, speakers: bool) -> Result<Option<SharedAudio>> {
        if !microphone && !speakers {
            return Ok(None);
        }
        let captured = microphone.then(Queue::default);
        let to_play = speakers.then(Queue::default);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (stop, stopped) = mpsc::channel::<()>();
        let (c, p) = (captured.clone(), to_play.clone());
        std::thread::Builder::new()
            .name("sound card".into())
            .spawn(move || match streams(c, p) {
                Ok(streams) => {
                    let _ = ready_tx.send(Ok(()));
                    // Until the card is dropped (the sender goes).
                    let _ = stopped.recv();
                    drop(streams);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .context("starting the sound card's thread")?;
        ready_rx.recv().map_err(|_| anyhow!("the sound card's thread ended"))??;
        Ok(Some(Arc::new(Mutex::new(Card { captured, to_play, _stop: stop }))))
    }

    fn streams(captured: Option<Queue>, to_play: Option<Queue>) -> Result<Vec<cpal::Stream>> {
        let host = cpal::default_host();
        let mut out = Vec::new();
        if let Some(q) = captured {
            let device = host
                .default_input_device()
                .ok_or_else(|| anyhow!("no microphone found: give --input FILE.wav, or --mute"))?;
            let supported = device.default_input_config().context("the microphone's format")?;
            let config = supported.config();
            let stream = match supported.sample_format() {
                SampleFormat::F32 => input::<f32>(&device, &config, q),
                SampleFormat::I16 => input::<i16>(&device, &config, q),
                SampleFormat::U16 => input::<u16>(&device, &config, q),
                SampleFormat::I32 => input::<i32>(&device, &config, q),
                other => bail!("the microphone's sample format {other} is not supported"),
            }?;
            stream.play().context("starting the microphone")?;
            out.push(stream);
        }
        if let Some(q) = to_play {
            let device =
                host.default_output_device().ok_or_else(|| anyhow!("no speakers found: give --output FILE.wav"))?;
            let supported = device.default_output_config().context("the speakers' format")?;
            let config = supported.config();
            let stream = match supported.sample_format() {
                SampleFormat::F32 => output::<f32>(&device, &config, q),
                SampleFormat::I16 => output::<i16>(&device, &config, q),
                SampleFormat::U16 => output::<u16>(&device, &config, q),
                SampleFormat::I32 => output::<i32>(&device, &config, q),
                other => bail!("the speakers' sample format {other} is not supported"),
            }?;
            stream.play().context("starting the speakers")?;
            out.push(stream);
        }
        Ok(out)
    }

    /// A stream errors (a device unplugged): the call goes on with silence
    /// both ways; one line says why.
    fn report(e: cpal::Error) {
        eprintln!("sound card: {e}");
    }

    fn input<T>(device: &cpal::Device, config: &cpal::StreamConfig, q: Queue) -> Result<cpal::Stream>
    where
        T: SizedSample,
        f32: FromSample<T>,
    {
        let channels = usize::from(config.channels.max(1));
        let mut convert = Push::new(config.sample_rate, SAMPLE_RATE);
        let mut buf = Vec::new();
        let stream = device
            .build_input_stream(
                *config,
                move |data: &[T], _: &cpal::InputCallbackInfo| {
                    buf.clear();
                    let frames = data.chunks(channels).map(|f| {
                        let f: Vec<f32> = f.iter().map(|s| s.to_sample::<f32>()).collect();
                        mono(&f)
                    });
                    convert.push(frames, &mut buf);
                    bounded_extend(&q, buf.iter().map(|x| to_i16(*x)));
                },
                report,
                None,
            )
            .context("opening the microphone")?;
        Ok(stream)
    }

    fn output<T>(device: &cpal::Device, config: &cpal::StreamConfig, q: Queue) -> Result<cpal::Stream>
    where
        T: SizedSample + FromSample<f32>,
    {
        let channels = usize::from(config.channels.max(1));
        let mut convert = Pull::new(SAMPLE_RATE, config.sample_rate);
        let stream = device
            .build_output_stream(
                *config,
                move |data: &mut [T], _: &cpal::OutputCallbackInfo| {
                    let mut q = lock(&q);
                    for frame in data.chunks_mut(channels) {
                        let x = convert.next(|| q.pop_front().map_or(0.0, from_i16));
                        let s = T::from_sample(x);
                        frame.fill(s);
                    }
                },
                report,
                None,
            )
            .context("opening the speakers")?;
        Ok(stream)
    }
}

/// The most audio either queue holds: 200 ms.
#[cfg(feature = "audio")]
const MAX_QUEUED: usize = subrosa_media::codec::FRAME_SAMPLES * 10;

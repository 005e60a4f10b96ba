//! The media engine of Subrosa calls, sans-IO: bytes, samples and the time
//! go in, bytes and samples come out.
//!
//! A frame of speech flows through it like this:
//!
//! ```text
//! 20 ms of 48 kHz mono samples
//!   codec::Encoder      Opus, in-band FEC, told the expected loss
//!   secure::Sender      SFrame (RFC 9605) under the sender's key of this MLS epoch
//!   ... relay ...       opaque bytes
//!   secure::Receiver    authenticates and decrypts; refuses replays, other
//!                       epochs and removed senders
//!   jitter::JitterBuffer  reorders by the SFrame counter, adapts its delay,
//!                       drops what comes too late, asks for FEC or PLC
//!   codec::Decoder      Opus decode, FEC from the next packet, or concealment
//! 20 ms of samples
//! ```
//!
//! [`pipeline`] runs the whole chain from one WAV file to another over a
//! simulated network, for headless use and tests.

pub mod codec;
pub mod jitter;
pub mod pipeline;
pub mod quality;
pub mod resample;
pub mod secure;
pub mod wav;

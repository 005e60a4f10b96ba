//! An adaptive jitter buffer for one incoming stream of 20 ms frames.
//!
//! Packets go in with their sequence number (the SFrame counter, which the
//! sender never reuses) and the time they arrived; the playout clock takes
//! one frame out every 20 ms. Time is always handed in: the buffer reads no
//! clock, so tests replay any network exactly.
//!
//! **Delay.** Each packet's transit (arrival − seq × 20 ms) is kept for the
//! last [`JitterConfig::window`] packets; the spread between the fastest and
//! the slowest is the jitter the buffer must absorb. The target depth is that
//! spread in frames plus one, within [`JitterConfig::min_delay`] and
//! [`JitterConfig::max_delay`]. The buffer grows towards a larger target by
//! stretching (a concealed frame that consumes no packet) and shrinks towards
//! a smaller one by dropping a frame when it holds more than two frames too
//! many.
//!
//! **Loss.** A missing frame is declared lost once the buffer holds a target's
//! worth of later frames; the decoder then rebuilds it from the FEC copy in
//! the next packet when that one is here, or conceals it. A packet arriving
//! after its frame was played is dropped as late (and widens the spread, so
//! the next ones are not).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Duration;

/// The length of one frame.
pub const FRAME: Duration = Duration::from_millis(20);

/// Bounds and memory of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JitterConfig {
    /// The smallest delay the buffer keeps (rounded up to whole frames, at least one).
    pub min_delay: Duration,
    /// The largest delay it ever adds, however bad the network.
    pub max_delay: Duration,
    /// How many recent packets the jitter estimate remembers.
    pub window: usize,
    /// A packet this many frames beyond the playout point restarts the
    /// stream (the sender restarted, or a long outage) instead of waiting.
    pub max_ahead: u64,
}

impl Default for JitterConfig {
    fn default() -> Self {
        Self { min_delay: FRAME, max_delay: Duration::from_millis(300), window: 100, max_ahead: 100 }
    }
}

/// The highest sequence number the buffer takes (see [`JitterBuffer::push`]).
pub const MAX_SEQ: u64 = 1 << 62;

/// What [`JitterBuffer::push`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued for playout.
    Queued,
    /// Its frame was played already: dropped.
    Late,
    /// Already queued: dropped.
    Duplicate,
    /// Far beyond the playout point: the buffer restarted at it.
    Restarted,
}

/// What to play for the next 20 ms.
#[derive(Clone, PartialEq, Eq)]
pub enum Playout {
    /// Nothing received yet (or still filling): play silence.
    Waiting,
    /// Decode this packet.
    Packet {
        /// its sequence number
        seq: u64,
        /// the Opus packet
        payload: Vec<u8>,
    },
    /// Frame `seq` is lost; the next packet is here: decode its FEC copy.
    Fec {
        /// the lost frame
        seq: u64,
        /// the packet of `seq + 1`, which stays queued
        next: Vec<u8>,
    },
    /// Conceal: frame `seq` is lost, or (`None`) the buffer stretches by a frame.
    Conceal {
        /// the lost frame, or `None` for a stretch
        seq: Option<u64>,
    },
}

impl fmt::Debug for Playout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Waiting => f.write_str("Waiting"),
            Self::Packet { seq, .. } => write!(f, "Packet({seq})"),
            Self::Fec { seq, .. } => write!(f, "Fec({seq})"),
            Self::Conceal { seq } => write!(f, "Conceal({seq:?})"),
        }
    }
}

/// Counters of what the buffer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitterStats {
    /// packets queued
    pub queued: u64,
    /// packets dropped as late
    pub late: u64,
    /// duplicates dropped
    pub duplicates: u64,
    /// frames played from their packet
    pub played: u64,
    /// lost frames rebuilt from FEC
    pub fec: u64,
    /// lost frames concealed
    pub concealed: u64,
    /// frames inserted to grow the delay (or on an empty buffer)
    pub stretched: u64,
    /// frames dropped to shrink the delay
    pub dropped: u64,
}

/// The buffer for one sender's stream.
#[derive(Debug)]
pub struct JitterBuffer {
    config: JitterConfig,
    packets: BTreeMap<u64, Vec<u8>>,
    /// The next frame to play; `None` until playout starts.
    next: Option<u64>,
    /// Recent transits in microseconds (arrival − seq × 20 ms), oldest first.
    transits: VecDeque<i128>,
    target: u64,
    stats: JitterStats,
}

fn frames_of(d: Duration) -> u64 {
    let frame = FRAME.as_micros();
    u64::try_from(d.as_micros().div_ceil(frame)).unwrap_or(u64::MAX)
}

impl JitterBuffer {
    /// An empty buffer.
    pub fn new(config: JitterConfig) -> Self {
        let target = frames_of(config.min_delay).max(1);
        Self {
            config,
            packets: BTreeMap::new(),
            next: None,
            transits: VecDeque::new(),
            target,
            stats: JitterStats::default(),
        }
    }

    /// The current target depth.
    pub fn target_delay(&self) -> Duration {
        FRAME * u32::try_from(self.target).unwrap_or(u32::MAX)
    }

    /// What the buffer did so far.
    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    fn min_frames(&self) -> u64 {
        frames_of(self.config.min_delay).max(1)
    }

    fn max_frames(&self) -> u64 {
        frames_of(self.config.max_delay).max(self.min_frames())
    }

    fn observe(&mut self, seq: u64, arrival: Duration) {
        let media = i128::from(seq) * i128::try_from(FRAME.as_micros()).unwrap_or(20_000);
        let transit = i128::try_from(arrival.as_micros()).unwrap_or(i128::MAX) - media;
        self.transits.push_back(transit);
        while self.transits.len() > self.config.window.max(1) {
            self.transits.pop_front();
        }
        let (min, max) = self.transits.iter().fold((i128::MAX, i128::MIN), |(lo, hi), t| (lo.min(*t), hi.max(*t)));
        let spread = u64::try_from((max - min).max(0)).unwrap_or(u64::MAX);
        let frame = u64::try_from(FRAME.as_micros()).unwrap_or(20_000);
        let wanted = spread.div_ceil(frame).saturating_add(1);
        self.target = wanted.clamp(self.min_frames(), self.max_frames());
    }

    /// A packet arrived at `arrival` (any monotonic clock, the same one for
    /// every call).
    pub fn push(&mut self, seq: u64, payload: Vec<u8>, arrival: Duration) -> Pushed {
        // The sequence number is the sender's SFrame counter, chosen by any
        // member: one no honest stream reaches (2^62 frames of 20 ms is
        // longer than the universe has existed) is dropped, so the playout
        // arithmetic below can never overflow.
        if seq > MAX_SEQ {
            self.stats.late += 1;
            return Pushed::Late;
        }
        let restarted = match self.next {
            Some(next) if seq < next => {
                self.observe(seq, arrival);
                self.stats.late += 1;
                return Pushed::Late;
            }
            Some(next) if seq - next > self.config.max_ahead => true,
            None => {
                self.packets.first_key_value().is_some_and(|(first, _)| seq.abs_diff(*first) > self.config.max_ahead)
            }
            Some(_) => false,
        };
        if restarted {
            self.packets.clear();
            self.transits.clear();
            self.next = None;
        }
        if self.packets.contains_key(&seq) {
            self.stats.duplicates += 1;
            return Pushed::Duplicate;
        }
        self.observe(seq, arrival);
        self.packets.insert(seq, payload);
        self.stats.queued += 1;
        if restarted {
            Pushed::Restarted
        } else {
            Pushed::Queued
        }
    }

    /// The next 20 ms of playout.
    pub fn pop(&mut self) -> Playout {
        let Some(next) = self.next else {
            let (Some((first, _)), Some((last, _))) = (self.packets.first_key_value(), self.packets.last_key_value())
            else {
                return Playout::Waiting;
            };
            let (first, last) = (*first, *last);
            if last - first + 1 < self.target {
                return Playout::Waiting;
            }
            self.next = Some(first);
            return self.pop();
        };
        if let Some(payload) = self.packets.remove(&next) {
            self.stats.played += 1;
            let mut after = next + 1;
            let depth = self.packets.last_key_value().map_or(0, |(last, _)| last + 1 - after);
            if depth > self.target + 2 && self.packets.remove(&after).is_some() {
                self.stats.dropped += 1;
                after += 1;
            }
            self.next = Some(after);
            return Playout::Packet { seq: next, payload };
        }
        let depth = self.packets.last_key_value().map_or(0, |(last, _)| last.saturating_sub(next));
        if depth == 0 || depth < self.target {
            // Empty, or too little after the gap to give the missing frame
            // up yet: stretch, which also deepens the buffer.
            self.stats.stretched += 1;
            return Playout::Conceal { seq: None };
        }
        self.next = Some(next + 1);
        match self.packets.get(&(next + 1)) {
            Some(following) => {
                self.stats.fec += 1;
                Playout::Fec { seq: next, next: following.clone() }
            }
            None => {
                self.stats.concealed += 1;
                Playout::Conceal { seq: Some(next) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn kinds(out: &[Playout]) -> Vec<String> {
        out.iter().map(|p| format!("{p:?}")).collect()
    }

    #[test]
    fn a_sequence_number_near_the_top_is_dropped_not_a_panic() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        for seq in [u64::MAX, u64::MAX - 1, MAX_SEQ + 1] {
            assert_eq!(jb.push(seq, vec![0], ms(30)), Pushed::Late);
        }
        for _ in 0..10 {
            assert!(matches!(jb.pop(), Playout::Waiting));
        }
        // The stream goes on at an honest number.
        assert_eq!(jb.push(MAX_SEQ, vec![1], ms(40)), Pushed::Queued);
        let _ = jb.pop();
    }

    #[test]
    fn reorders_by_sequence_number() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        // 0 and 2 swap on the way; each arrives 30 ms after it was sent
        // except the swapped pair.
        jb.push(0, vec![0], ms(30));
        jb.push(2, vec![2], ms(70));
        jb.push(1, vec![1], ms(75));
        jb.push(3, vec![3], ms(90));
        let out: Vec<Playout> = (0..4).map(|_| jb.pop()).collect();
        assert_eq!(kinds(&out), ["Packet(0)", "Packet(1)", "Packet(2)", "Packet(3)"]);
    }

    #[test]
    fn waits_to_fill_then_plays_in_time() {
        let mut jb = JitterBuffer::new(JitterConfig { min_delay: ms(60), ..JitterConfig::default() });
        assert_eq!(jb.pop(), Playout::Waiting);
        jb.push(0, vec![0], ms(10));
        jb.push(1, vec![1], ms(30));
        assert_eq!(jb.pop(), Playout::Waiting);
        jb.push(2, vec![2], ms(50));
        assert_eq!(kinds(&[jb.pop()]), ["Packet(0)"]);
    }

    #[test]
    fn a_lost_frame_uses_fec_of_the_next_packet_or_is_concealed() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        let mut out = Vec::new();
        for seq in 0..10u64 {
            // 3 is lost; 6 and 7 are lost together.
            if ![3, 6, 7].contains(&seq) {
                jb.push(seq, vec![seq as u8], ms(seq * 20 + 5));
            }
            out.push(jb.pop());
        }
        assert_eq!(
            kinds(&out),
            [
                "Packet(0)",
                "Packet(1)",
                "Packet(2)",
                // 3 is missing and nothing later is here yet: stretch.
                "Conceal(None)",
                "Fec(3)",
                "Packet(4)",
                "Packet(5)",
                "Conceal(None)",
                "Conceal(Some(6))",
                "Fec(7)",
            ]
        );
        let s = jb.stats();
        assert_eq!((s.fec, s.concealed, s.stretched), (2, 1, 2));
    }

    #[test]
    fn late_and_duplicate_packets_are_dropped() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        jb.push(0, vec![0], ms(20));
        assert_eq!(jb.push(0, vec![0], ms(21)), Pushed::Duplicate);
        assert_eq!(kinds(&[jb.pop()]), ["Packet(0)"]);
        jb.push(2, vec![2], ms(60));
        jb.push(3, vec![3], ms(80));
        jb.push(4, vec![4], ms(100));
        // 1 is given up once a target's worth of later frames is here.
        assert_eq!(kinds(&[jb.pop()]), ["Fec(1)"]);
        assert_eq!(jb.push(1, vec![1], ms(200)), Pushed::Late);
        assert_eq!(jb.stats().late, 1);
        assert_eq!(jb.stats().duplicates, 1);
    }

    #[test]
    fn the_target_follows_the_jitter_within_bounds() {
        let config = JitterConfig { min_delay: ms(20), max_delay: ms(200), window: 50, max_ahead: 100 };
        let mut jb = JitterBuffer::new(config);
        // Every other packet is held back by a swing that depends on the
        // phase of the run: calm, 75 ms, 1 s, calm.
        let swing = |seq: u64| match seq {
            100..200 => 75,
            200..300 => 1000,
            _ => 0,
        };
        let mut arrivals: Vec<(u64, u64)> =
            (0..500).map(|seq| (seq * 20 + 40 + if seq % 2 == 1 { swing(seq) } else { 0 }, seq)).collect();
        arrivals.sort();
        let mut pending = arrivals.into_iter().peekable();
        let mut targets = Vec::new();
        for tick in 0..520u64 {
            let now = tick * 20;
            while let Some((at, seq)) = pending.next_if(|(at, _)| *at <= now) {
                jb.push(seq, vec![0], ms(at));
            }
            jb.pop();
            targets.push(jb.target_delay());
        }
        assert_eq!(targets[95], ms(20));
        // 75 ms of spread: four frames, plus one.
        assert_eq!(targets[195], ms(100));
        assert_eq!(targets[295], ms(200), "capped at max_delay");
        // Calm again: once the window forgets the swings, back to the floor.
        assert_eq!(targets[519], ms(20));
        let s = jb.stats();
        assert!(s.stretched > 0, "grew by stretching: {s:?}");
        assert!(s.dropped > 0, "shrank by dropping: {s:?}");
        assert!(s.late > 0, "a 1 s swing is too late for a 200 ms cap: {s:?}");
    }

    #[test]
    fn a_jump_far_ahead_restarts_the_stream() {
        let mut jb = JitterBuffer::new(JitterConfig::default());
        jb.push(0, vec![0], ms(20));
        jb.pop();
        assert_eq!(jb.push(5000, vec![1], ms(40)), Pushed::Restarted);
        assert_eq!(kinds(&[jb.pop()]), ["Packet(5000)"]);
    }
}

//! The instrument's arithmetic, kept free of IO so it can be tested on its own:
//! the latency histogram and its summary, the publisher's pacing, per-client loss
//! accounting, and reading the probe (sequence number and publish time) out of a
//! received message.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency the histogram keeps exactly (60 s, in microseconds); anything
/// slower is recorded as this.
const MAX_LATENCY_US: u64 = 60_000_000;

/// End-to-end latencies in microseconds, with 3 significant digits.
pub struct Latencies {
    hist: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("static histogram bounds are valid"),
        }
    }

    /// Records one latency. Zero (sub-microsecond, or a clock step backwards) is
    /// kept as 1 µs so it still counts; values past the range saturate.
    pub fn record(&mut self, micros: u64) {
        self.hist.saturating_record(micros.max(1));
    }

    pub fn record_all(&mut self, samples: &[u64]) {
        for &s in samples {
            self.record(s);
        }
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    pub fn summary(&self) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        if self.hist.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            samples: self.hist.len(),
            p50_ms: ms(self.hist.value_at_quantile(0.50)),
            p90_ms: ms(self.hist.value_at_quantile(0.90)),
            p99_ms: ms(self.hist.value_at_quantile(0.99)),
            p999_ms: ms(self.hist.value_at_quantile(0.999)),
            max_ms: ms(self.hist.max()),
            mean_ms: self.hist.mean() / 1000.0,
        }
    }
}

/// Percentiles of one run, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// One histogram shared by every client task. Clients batch their samples
/// ([`SampleBuffer`]) so the lock is taken once per batch, not per message: at
/// 100 k deliveries/s a per-message lock would be the bench's own bottleneck.
#[derive(Default)]
pub struct SharedLatencies(Mutex<Latencies>);

impl SharedLatencies {
    pub fn add(&self, samples: &[u64]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record_all(samples);
    }

    pub fn summary(&self) -> LatencySummary {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).summary()
    }
}

/// A client's unflushed latency samples.
pub struct SampleBuffer {
    samples: Vec<u64>,
}

impl SampleBuffer {
    /// Samples kept before they are handed to the shared histogram.
    pub const BATCH: usize = 512;

    pub fn new() -> Self {
        Self {
            samples: Vec::with_capacity(Self::BATCH),
        }
    }

    pub fn push(&mut self, micros: u64, into: &SharedLatencies) {
        self.samples.push(micros);
        if self.samples.len() >= Self::BATCH {
            self.flush(into);
        }
    }

    pub fn flush(&mut self, into: &SharedLatencies) {
        if !self.samples.is_empty() {
            into.add(&self.samples);
            self.samples.clear();
        }
    }
}

impl Default for SampleBuffer {
    fn default() -> Self {
        Self::new()
    }
}

/// Open-loop pacing of the publisher: message `i` is due at `i / rate` after the
/// start, whatever happened to the previous ones. A publisher that falls behind
/// sends the overdue messages back to back rather than stretching the schedule, so
/// the offered load stays what was asked for (no coordinated omission).
#[derive(Clone, Copy, Debug)]
pub struct Pacer {
    per_second: f64,
}

impl Pacer {
    /// `per_second` must be positive (the CLI refuses zero).
    pub fn new(per_second: f64) -> Self {
        Self { per_second }
    }

    /// When message `i` is due, counted from the start.
    pub fn due(&self, i: u64) -> Duration {
        Duration::from_secs_f64(i as f64 / self.per_second)
    }

    /// How many messages a run of `duration` publishes (at least one).
    pub fn total(&self, duration: Duration) -> u64 {
        ((duration.as_secs_f64() * self.per_second).round() as u64).max(1)
    }
}

/// What one client received, for loss accounting. The publisher numbers messages
/// 0, 1, 2, … and may have several in flight, so they can arrive out of order: a
/// bitmap of the sequence numbers seen tells a late message from a duplicate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// Distinct messages received.
    pub received: u64,
    /// Messages received more than once (counted from the second copy on).
    pub duplicates: u64,
    /// Messages that arrived after one with a higher sequence number.
    pub reordered: u64,
    /// Bytes of the messages received (payload, not WebSocket framing).
    pub bytes: u64,
    #[serde(skip)]
    seen: Vec<u64>,
    #[serde(skip)]
    highest: Option<u64>,
}

impl Delivery {
    pub fn observe(&mut self, seq: u64, bytes: usize) {
        self.bytes += bytes as u64;
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= 1 << bit;
        self.received += 1;
        match self.highest {
            Some(h) if seq < h => self.reordered += 1,
            _ => self.highest = Some(seq),
        }
    }

    /// Whether message `seq` was received.
    pub fn has(&self, seq: u64) -> bool {
        self.seen
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    /// Messages of `published` this client never got.
    pub fn lost(&self, published: u64) -> u64 {
        published.saturating_sub(self.received)
    }

    /// Adds another client's counts (not its bitmap).
    pub fn merge(&mut self, other: &Delivery) {
        self.received += other.received;
        self.duplicates += other.duplicates;
        self.reordered += other.reordered;
        self.bytes += other.bytes;
    }
}

/// Reconnect delays of a dropped client: exponential from `base`, capped, with
/// "equal jitter" (half the step fixed, half random) so that thousands of clients
/// dropped at the same instant do not all knock at the same instants again.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(50),
            cap: Duration::from_secs(1),
        }
    }
}

impl Backoff {
    /// The wait before attempt `attempt` (0 = the first reconnect); `unit` is a
    /// random number in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.cap);
        step / 2 + step.mul_f64(unit.clamp(0.0, 1.0) / 2.0)
    }
}

/// What a cloud-WebSocket event frame tells the bench: its durable id (`evt_<n>`;
/// none for progress), its type, and the job it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventFrame {
    pub id: Option<i64>,
    pub kind: String,
    pub job: Option<String>,
}

/// Reads a `{"type":"event","id":"evt_<n>","data":{"event","payload":{"id"}}}`
/// frame; anything else (replies, errors) is `None`.
pub fn event_frame(text: &[u8]) -> Option<EventFrame> {
    #[derive(serde::Deserialize)]
    struct Frame {
        #[serde(rename = "type")]
        kind: String,
        id: Option<String>,
        data: Data,
    }
    #[derive(serde::Deserialize)]
    struct Data {
        event: String,
        #[serde(default)]
        payload: serde_json::Value,
    }
    let frame: Frame = serde_json::from_slice(text).ok()?;
    if frame.kind != "event" {
        return None;
    }
    Some(EventFrame {
        id: frame
            .id
            .as_deref()
            .and_then(|id| id.strip_prefix("evt_"))
            .and_then(|n| n.parse().ok()),
        kind: frame.data.event,
        job: frame.data.payload["id"].as_str().map(str::to_owned),
    })
}

/// The probe every published message carries: its sequence number and the time it
/// was published (µs since the Unix epoch), as JSON fields `"seq"` and `"t_us"`.
/// Both systems deliver it somewhere inside a larger JSON text (or at the head of a
/// preview's bytes), so it is found by scanning rather than by parsing the whole
/// message (the load generator shares the machine with the pod: its per-message cost
/// is kept small).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub seq: u64,
    pub published_us: u64,
}

impl Probe {
    pub fn find(text: &[u8]) -> Option<Self> {
        Some(Self {
            seq: number_after(text, b"\"seq\":")?,
            published_us: number_after(text, b"\"t_us\":")?,
        })
    }
}

/// The unsigned integer right after the first `key` in `text`.
fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for d in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut l = Latencies::new();
        // 1..=1000 ms, one sample each.
        for ms in 1..=1000u64 {
            l.record(ms * 1000);
        }
        let s = l.summary();
        assert_eq!(s.samples, 1000);
        // Three significant digits: within 0.1 % of the exact order statistic.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(near(s.p50_ms, 500.0), "{s:?}");
        assert!(near(s.p90_ms, 900.0), "{s:?}");
        assert!(near(s.p99_ms, 990.0), "{s:?}");
        assert!(near(s.p999_ms, 999.0), "{s:?}");
        assert!(near(s.max_ms, 1000.0), "{s:?}");
        assert!(near(s.mean_ms, 500.5), "{s:?}");
    }

    #[test]
    fn empty_zero_and_huge_latencies() {
        assert_eq!(Latencies::new().summary(), LatencySummary::default());
        let mut l = Latencies::new();
        l.record(0);
        l.record(u64::MAX);
        let s = l.summary();
        assert_eq!(s.samples, 2);
        assert!(s.p50_ms > 0.0 && s.p50_ms < 0.01, "{s:?}");
        assert!(s.max_ms >= 59_000.0, "{s:?}");
    }

    #[test]
    fn batched_samples_all_reach_the_shared_histogram() {
        let shared = SharedLatencies::default();
        let mut buf = SampleBuffer::new();
        for i in 0..(SampleBuffer::BATCH as u64 * 2 + 7) {
            buf.push(100 + i, &shared);
        }
        assert_eq!(shared.summary().samples, SampleBuffer::BATCH as u64 * 2);
        buf.flush(&shared);
        assert_eq!(shared.summary().samples, SampleBuffer::BATCH as u64 * 2 + 7);
        buf.flush(&shared);
        assert_eq!(shared.summary().samples, SampleBuffer::BATCH as u64 * 2 + 7);
    }

    #[test]
    fn pacing_is_open_loop() {
        let p = Pacer::new(200.0);
        assert_eq!(p.due(0), Duration::ZERO);
        assert_eq!(p.due(1), Duration::from_millis(5));
        assert_eq!(p.due(400), Duration::from_secs(2));
        assert_eq!(p.total(Duration::from_secs(3)), 600);
        assert_eq!(Pacer::new(0.5).total(Duration::from_millis(100)), 1);
        let fast = Pacer::new(150_000.0);
        assert_eq!(fast.total(Duration::from_secs(2)), 300_000);
        assert!(fast.due(149_999) < Duration::from_secs(1));
    }

    #[test]
    fn loss_duplicates_and_reordering_are_counted() {
        let mut d = Delivery::default();
        for seq in [0, 1, 2, 4, 4, 3, 7, 200, 3] {
            d.observe(seq, 10);
        }
        assert_eq!(d.received, 7); // 0 1 2 3 4 7 200
        assert_eq!(d.duplicates, 2); // the second 4, the second 3
        assert_eq!(d.reordered, 1); // 3 after 4
        assert_eq!(d.bytes, 90);
        assert_eq!(d.lost(201), 194);
        assert_eq!(d.lost(2), 0);
        let mut total = Delivery::default();
        total.merge(&d);
        total.merge(&d);
        assert_eq!(
            (
                total.received,
                total.duplicates,
                total.reordered,
                total.bytes
            ),
            (14, 4, 2, 180)
        );
    }

    #[test]
    fn received_ids_can_be_checked_against_a_log() {
        let mut d = Delivery::default();
        for id in [3, 5, 64, 5] {
            d.observe(id, 1);
        }
        let log = [1u64, 3, 5, 64, 65, 1000];
        let missed: Vec<u64> = log.iter().copied().filter(|id| !d.has(*id)).collect();
        assert_eq!(missed, [1, 65, 1000]);
        assert_eq!(d.duplicates, 1);
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_in_the_upper_half() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(25));
        assert_eq!(b.delay(0, 0.999_999).as_millis(), 49);
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(200));
        // Capped at 1 s from the 5th attempt on, however many failed.
        assert_eq!(b.delay(5, 0.0), Duration::from_millis(500));
        assert_eq!(b.delay(u32::MAX, 0.0), Duration::from_millis(500));
        assert!(b.delay(u32::MAX, 1.0) <= Duration::from_secs(1));
        // A bad random number cannot stretch the wait.
        assert_eq!(b.delay(0, 7.0), Duration::from_millis(50));
    }

    #[test]
    fn event_frames_yield_id_type_and_job() {
        let completed = br#"{"type":"event","id":"evt_42","timestamp":"t","data":{"event":"job.completed","payload":{"id":"job_1","status":"completed"}}}"#;
        assert_eq!(
            event_frame(completed),
            Some(EventFrame {
                id: Some(42),
                kind: "job.completed".into(),
                job: Some("job_1".into())
            })
        );
        let progress = br#"{"type":"event","timestamp":"t","data":{"event":"job.progress","payload":{"job_id":"job_1","progress":5}}}"#;
        assert_eq!(event_frame(progress).unwrap().id, None);
        assert_eq!(
            event_frame(br#"{"type":"subscribed","data":{"events":["job.*"]}}"#),
            None
        );
        assert_eq!(event_frame(b"not json"), None);
    }

    #[test]
    fn the_probe_is_found_in_either_system_s_message() {
        let cloud = br#"{"type":"event","id":"evt_3","timestamp":"x","data":{"event":"job.bench","payload":{"seq":42,"t_us":1764620000123456,"pad":"aaaa"}}}"#;
        assert_eq!(
            Probe::find(cloud),
            Some(Probe {
                seq: 42,
                published_us: 1_764_620_000_123_456
            })
        );
        let nchan = br#"{"seq": 0, "t_us": 9, "pad":""}"#;
        assert_eq!(
            Probe::find(nchan),
            Some(Probe {
                seq: 0,
                published_us: 9
            })
        );
        assert_eq!(Probe::find(br#"{"type":"subscribed"}"#), None);
        assert_eq!(Probe::find(br#"{"seq":"x","t_us":1}"#), None);
        assert_eq!(
            Probe::find(br#"{"seq":99999999999999999999999,"t_us":1}"#),
            None
        );
    }
}

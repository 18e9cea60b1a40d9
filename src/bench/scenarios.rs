//! The workloads: connect the clients, offer the load at a paced rate, measure what
//! arrives, and read the server's CPU and memory around it.
//!
//! `fanout`, `slow` and `previews` share one engine ([`deliver`]): every reading
//! client counts what it got and records each message's latency; the publisher is
//! open-loop ([`Pacer`]). `idle` holds subscribed sockets and weighs them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::report::{Report, ServerFigures};
use super::stats::{Delivery, Pacer, Probe, SampleBuffer, SharedLatencies};
use super::system::{ServerProcs, cpu_percent};
use super::target::{ClientSocket, Stream, Target};
use crate::bus::now_micros;
use crate::domain::ids::JobId;

/// Clients connecting at the same time; more only queues in the accept backlog.
const CONNECT_CONCURRENCY: usize = 128;
/// How long after the last publish the bench waits for stragglers before counting
/// what did not arrive as lost.
const DRAIN: Duration = Duration::from_secs(5);
/// Publishes in flight at once, at most.
const MAX_IN_FLIGHT: usize = 64;
/// Pause between the last subscription and the first publish, so the server has
/// finished registering every subscriber (nchan registers them in Redis).
const SETTLE: Duration = Duration::from_millis(500);

/// What is published and to whom.
pub enum Load {
    /// Every message to every client of the tenant, `pad` making it the asked size.
    Events { pad: String },
    /// Frames of `size` bytes, round-robin over the jobs.
    Previews { jobs: Vec<JobId>, size: usize },
}

impl Load {
    async fn publish(&self, target: &Target, seq: u64) -> bool {
        let result = match self {
            Load::Events { pad } => target.publish_event(seq, pad).await,
            Load::Previews { jobs, size } => {
                let j = (seq % jobs.len() as u64) as usize;
                target.publish_preview(jobs, j, seq, *size).await
            }
        };
        result.is_ok()
    }

    /// Messages of the first `total` that a client of `stream` should receive.
    fn expected(&self, stream: Stream, total: u64) -> u64 {
        match (self, stream) {
            (Load::Previews { jobs, .. }, Stream::Previews(j)) => {
                let n = jobs.len() as u64;
                total / n + u64::from((j as u64) < total % n)
            }
            _ => total,
        }
    }

    fn jobs(&self) -> &[JobId] {
        match self {
            Load::Previews { jobs, .. } => jobs,
            Load::Events { .. } => &[],
        }
    }
}

/// Opens one socket per stream, `CONNECT_CONCURRENCY` at a time. Failed ones are
/// `None`; the first error is kept for the report.
pub async fn connect_all(
    target: &Target,
    streams: &[Stream],
    jobs: &[JobId],
) -> (Vec<Option<ClientSocket>>, Option<String>) {
    let results: Vec<_> = futures_util::stream::iter(streams.iter().copied())
        .map(|s| target.subscribe(s, jobs))
        .buffered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let mut first_error = None;
    let sockets = results
        .into_iter()
        .map(|r| match r {
            Ok(s) => Some(s),
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
                None
            }
        })
        .collect();
    (sockets, first_error)
}

/// Shared by the reading clients.
#[derive(Default)]
struct Shared {
    latencies: SharedLatencies,
    received: AtomicU64,
}

/// What one reading client saw.
#[derive(Default)]
struct Outcome {
    delivery: Delivery,
    last_receive: Option<Instant>,
    /// The close code, when the server closed the socket.
    closed: Option<u16>,
}

async fn read(mut socket: ClientSocket, shared: Arc<Shared>, stop: CancellationToken) -> Outcome {
    let mut out = Outcome::default();
    let mut samples = SampleBuffer::new();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            msg = socket.next() => msg,
        };
        let data: &[u8] = match &msg {
            Some(Ok(Message::Text(t))) => t.as_bytes(),
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(frame))) => {
                out.closed = Some(frame.as_ref().map_or(1005, |f| u16::from(f.code)));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => {
                out.closed.get_or_insert(1006);
                break;
            }
        };
        let Some(probe) = Probe::find(data) else {
            continue;
        };
        let now = now_micros();
        samples.push(now.saturating_sub(probe.published_us), &shared.latencies);
        let before = out.delivery.received;
        out.delivery.observe(probe.seq, data.len());
        if out.delivery.received > before {
            shared.received.fetch_add(1, Ordering::Relaxed);
        }
        out.last_receive = Some(Instant::now());
    }
    samples.flush(&shared.latencies);
    out
}

/// A client that stopped reading: it holds its socket and never reads again.
async fn hold(socket: ClientSocket, stop: CancellationToken) {
    stop.cancelled().await;
    drop(socket);
}

/// Samples the server every 100 ms and keeps the largest RSS seen.
async fn watch_peak(procs: ServerProcs, stop: CancellationToken) -> u64 {
    let mut peak = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return peak,
            _ = tick.tick() => peak = peak.max(procs.sample().rss_kib),
        }
    }
}

/// Parameters of a delivery run.
pub struct DeliverParams {
    pub streams: Vec<Stream>,
    /// Clients (by index into `streams`) that stop reading once subscribed.
    pub slow: usize,
    /// Messages published per second, in all.
    pub rate: f64,
    pub duration: Duration,
}

pub async fn deliver(
    target: &Target,
    procs: Option<&ServerProcs>,
    load: &Load,
    params: &DeliverParams,
    report: &mut Report,
) {
    let (sockets, first_error) = connect_all(target, &params.streams, load.jobs()).await;
    report.note_connections(&sockets, first_error);
    tokio::time::sleep(SETTLE).await;

    let pacer = Pacer::new(params.rate);
    let total = pacer.total(params.duration);
    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    let mut readers = Vec::new();
    let mut holders = Vec::new();
    let mut expected = 0;
    for (i, socket) in sockets.into_iter().enumerate() {
        let Some(socket) = socket else { continue };
        if i < params.slow {
            holders.push(tokio::spawn(hold(socket, stop.clone())));
        } else {
            expected += load.expected(params.streams[i], total);
            readers.push(tokio::spawn(read(socket, shared.clone(), stop.clone())));
        }
    }
    let peak = procs.map(|p| tokio::spawn(watch_peak(p.clone(), stop.clone())));
    let before = procs.map(ServerProcs::sample).unwrap_or_default();
    let me = ServerProcs::only(&[std::process::id()]);
    let me_before = me.sample();

    let start = Instant::now();
    let mut published = 0u64;
    let mut publish_errors = 0u64;
    // Each message goes out at its due time even while earlier ones are still in
    // flight (nchan answers a POST only after its Redis round trips): a publisher
    // that waited for each reply would measure its own latency, not the server's.
    let mut inflight = FuturesUnordered::new();
    let mut seq = 0;
    while seq < total || !inflight.is_empty() {
        let due = start + pacer.due(seq);
        tokio::select! {
            biased;
            Some(ok) = inflight.next(), if !inflight.is_empty() => {
                if ok { published += 1 } else { publish_errors += 1 }
            }
            _ = tokio::time::sleep_until(due.into()),
                if seq < total && inflight.len() < MAX_IN_FLIGHT =>
            {
                inflight.push(load.publish(target, seq));
                seq += 1;
            }
        }
    }
    let publish_secs = start.elapsed().as_secs_f64();
    let drain_until = Instant::now() + DRAIN;
    while shared.received.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = procs.map(ServerProcs::sample).unwrap_or_default();
    report.load_generator_cpu_percent = cpu_percent(&me_before, &me.sample());
    stop.cancel();

    let mut delivery = Delivery::default();
    let mut last_receive = None;
    let mut closed = 0;
    for r in readers {
        if let Ok(out) = r.await {
            delivery.merge(&out.delivery);
            last_receive = last_receive.max(out.last_receive);
            closed += u64::from(out.closed.is_some());
        }
    }
    for h in holders {
        let _ = h.await;
    }
    let peak_kib = match peak {
        Some(p) => p.await.unwrap_or(0),
        None => 0,
    };
    let window = last_receive
        .map(|t| t.duration_since(start).as_secs_f64())
        .unwrap_or(publish_secs)
        .max(publish_secs)
        .max(1e-3);
    report.published = published;
    report.publish_errors = publish_errors;
    report.offered_per_sec = published as f64 / publish_secs.max(1e-3);
    report.expected = expected;
    report.delivered = delivery.received;
    report.duplicates = delivery.duplicates;
    report.reordered = delivery.reordered;
    report.lost = expected.saturating_sub(delivery.received);
    report.closed_by_server = closed;
    report.window_secs = window;
    report.delivered_per_sec = delivery.received as f64 / window;
    report.mb_per_sec = delivery.bytes as f64 / window / 1e6;
    report.avg_message_bytes = if delivery.received + delivery.duplicates > 0 {
        delivery.bytes as f64 / (delivery.received + delivery.duplicates) as f64
    } else {
        0.0
    };
    report.latency = shared.latencies.summary();
    if procs.is_some() {
        report.server = Some(ServerFigures::new(
            &before,
            &after,
            peak_kib,
            report.connected,
        ));
    }
}

/// `idle`: subscribed sockets that receive nothing; what each costs the server.
pub async fn idle(
    target: &Target,
    procs: Option<&ServerProcs>,
    streams: &[Stream],
    hold_for: Duration,
    report: &mut Report,
) {
    let before = procs.map(ServerProcs::sample).unwrap_or_default();
    let (sockets, first_error) = connect_all(target, streams, &[]).await;
    report.note_connections(&sockets, first_error);
    let stop = CancellationToken::new();
    let shared = Arc::new(Shared::default());
    let readers: Vec<_> = sockets
        .into_iter()
        .flatten()
        .map(|s| tokio::spawn(read(s, shared.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(hold_for).await;
    let after = procs.map(ServerProcs::sample).unwrap_or_default();
    stop.cancel();
    let mut closed = 0;
    for r in readers {
        if let Ok(out) = r.await {
            closed += u64::from(out.closed.is_some());
        }
    }
    report.closed_by_server = closed;
    report.window_secs = hold_for.as_secs_f64();
    if procs.is_some() {
        report.server = Some(ServerFigures::new(
            &before,
            &after,
            after.rss_kib,
            report.connected,
        ));
    }
}

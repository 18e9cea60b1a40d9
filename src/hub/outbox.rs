//! A connection's outbox: what the pod still owes one client.
//!
//! Durable lifecycle events wait in a bounded FIFO; progress, previews, status
//! snapshots and control messages are latest-wins slots keyed by (kind, job, type),
//! so a slow client skips stale frames instead of queueing them. Everything pending
//! is handed out in arrival order (a replaced slot moves to the back), so a client
//! never sees a job's stale progress after its `job.completed`.
//!
//! When the lifecycle FIFO is full the client cannot keep up with what it must not
//! miss: the outbox drops everything and turns into [`CloseReason::TooSlow`]; the
//! transport closes with code [`CLOSE_TOO_SLOW`] and the client resumes from the last
//! event id it received.
//!
//! The connection task sleeps on a [`Notify`] until something arrives: no polling,
//! no timer per connection. An idle outbox holds no heap memory of its own.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::bus::{BusItem, Envelope, EnvelopeKind, SharedEnvelope};

/// WebSocket close code: the client fell too far behind on lifecycle events and must
/// reconnect, resuming after the last event id it received.
pub const CLOSE_TOO_SLOW: u16 = 4008;
/// WebSocket close code: the pod is shutting down; reconnect (to another pod) and resume.
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Bounds of one outbox.
#[derive(Clone, Copy, Debug)]
pub struct OutboxLimits {
    /// Lifecycle events pending before the connection is closed as too slow.
    pub lifecycle: usize,
    /// Distinct latest-wins slots (roughly: concurrently active jobs × kinds); when
    /// full, the oldest unsent slot is dropped — it was ephemeral anyway.
    pub latest: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            lifecycle: 256,
            latest: 32,
        }
    }
}

/// Why a connection must be closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Lifecycle events overflowed the outbox. Close code [`CLOSE_TOO_SLOW`].
    TooSlow {
        /// The last event id handed to the client, to resume after.
        last_event_id: Option<u64>,
    },
    /// The pod is shutting down. Close code [`CLOSE_GOING_AWAY`].
    ShuttingDown,
}

impl CloseReason {
    pub fn code(&self) -> u16 {
        match self {
            Self::TooSlow { .. } => CLOSE_TOO_SLOW,
            Self::ShuttingDown => CLOSE_GOING_AWAY,
        }
    }

    /// The close frame's reason text (well under the 123-byte limit).
    pub fn reason(&self) -> String {
        match self {
            Self::TooSlow {
                last_event_id: Some(id),
            } => format!("too slow; resume with since={id}"),
            Self::TooSlow {
                last_event_id: None,
            } => "too slow; resume from the start".to_owned(),
            Self::ShuttingDown => "server shutting down; reconnect".to_owned(),
        }
    }
}

/// What a connection should do next.
#[derive(Clone, Debug)]
pub enum Next {
    /// Render and send this.
    Envelope(SharedEnvelope),
    /// Envelopes may have been missed at this point: replay durable events after
    /// [`Outbox::last_event_id`] from the event log, then call
    /// [`Outbox::skip_events_through`] with the last replayed id.
    Resync,
    /// Close the transport with `reason.code()`; keeps being returned.
    Close(CloseReason),
}

impl Next {
    /// The envelope to send, if this is one.
    pub fn envelope(&self) -> Option<&SharedEnvelope> {
        match self {
            Self::Envelope(envelope) => Some(envelope),
            _ => None,
        }
    }
}

/// Sizes, for tests and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxStats {
    pub lifecycle: usize,
    pub latest: usize,
    pub resync_pending: bool,
    pub closed: bool,
}

pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the connection task; a permit is kept if it is not waiting yet.
    wake: Notify,
    limits: OutboxLimits,
}

#[derive(Default)]
struct State {
    /// Arrival order of everything pending, across the queue and the slots.
    seq: u64,
    lifecycle: VecDeque<(u64, SharedEnvelope)>,
    /// Few entries (active jobs), so a vector scanned linearly.
    latest: Vec<(u64, SharedEnvelope)>,
    /// Position of a pending resync; one replay covers several.
    resync: Option<u64>,
    close: Option<CloseReason>,
    last_event_id: Option<u64>,
    /// Events with ids up to this were already sent by a replay.
    skip_through: Option<u64>,
}

impl State {
    fn is_idle(&self) -> bool {
        self.lifecycle.is_empty()
            && self.latest.is_empty()
            && self.resync.is_none()
            && self.close.is_none()
    }

    fn already_sent(&self, event_id: u64) -> bool {
        self.skip_through.is_some_and(|through| event_id <= through)
    }

    fn push(&mut self, envelope: &SharedEnvelope, limits: &OutboxLimits) {
        if self.close.is_some() {
            return;
        }
        self.seq += 1;
        let seq = self.seq;
        if envelope.kind.is_durable() {
            if self.already_sent(envelope.id) {
                return;
            }
            if self.lifecycle.len() >= limits.lifecycle {
                self.close(CloseReason::TooSlow {
                    last_event_id: self.last_event_id,
                });
                return;
            }
            self.lifecycle.push_back((seq, envelope.clone()));
            return;
        }
        let slot = self
            .latest
            .iter()
            .position(|(_, pending)| same_slot(pending, envelope));
        let slot = match slot {
            Some(i) => i,
            None if self.latest.len() < limits.latest.max(1) => {
                self.latest.push((seq, envelope.clone()));
                return;
            }
            // Full: the oldest unsent ephemeral frame gives way.
            None => oldest(&self.latest).expect("a full slot list is not empty"),
        };
        self.latest[slot] = (seq, envelope.clone());
    }

    fn resync(&mut self) {
        if self.close.is_none() && self.resync.is_none() {
            self.seq += 1;
            self.resync = Some(self.seq);
        }
    }

    fn close(&mut self, reason: CloseReason) {
        if self.close.is_none() {
            self.close = Some(reason);
        }
        // Free the buffers, not just empty them: a closed connection may linger
        // until its task notices.
        self.lifecycle = VecDeque::new();
        self.latest = Vec::new();
        self.resync = None;
    }

    fn pop(&mut self) -> Option<Next> {
        if let Some(reason) = &self.close {
            return Some(Next::Close(reason.clone()));
        }
        loop {
            let queued = self.lifecycle.front().map(|(seq, _)| *seq);
            let slot = oldest(&self.latest);
            let slot_seq = slot.map(|i| self.latest[i].0);
            let first = [queued, slot_seq, self.resync]
                .into_iter()
                .flatten()
                .min()?;
            if self.resync == Some(first) {
                self.resync = None;
                return Some(Next::Resync);
            }
            if queued == Some(first) {
                let (_, envelope) = self.lifecycle.pop_front().expect("front exists");
                if self.already_sent(envelope.id) {
                    continue;
                }
                // Publishes follow commits from different tasks, so two events can
                // arrive out of id order; resuming after the highest id is still gap-free
                // because both were handed out.
                self.last_event_id = Some(
                    self.last_event_id
                        .map_or(envelope.id, |l| l.max(envelope.id)),
                );
                return Some(Next::Envelope(envelope));
            }
            let (_, envelope) = self.latest.swap_remove(slot.expect("slot exists"));
            return Some(Next::Envelope(envelope));
        }
    }
}

/// Latest-wins identity: same kind, same job, same type — and for control messages
/// the same id, so messages a publisher numbers (a ComfyUI worker's relayed
/// `progress_state`s) queue up instead of replacing each other, within the slot limit.
fn same_slot(a: &SharedEnvelope, b: &SharedEnvelope) -> bool {
    a.kind == b.kind
        && a.job == b.job
        && a.event_type() == b.event_type()
        && (a.kind != EnvelopeKind::Control || a.id == b.id)
}

fn oldest(slots: &[(u64, SharedEnvelope)]) -> Option<usize> {
    slots
        .iter()
        .enumerate()
        .min_by_key(|(_, (seq, _))| *seq)
        .map(|(i, _)| i)
}

impl Outbox {
    pub fn new(limits: OutboxLimits) -> Self {
        Self {
            state: Mutex::default(),
            wake: Notify::new(),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers an envelope; never blocks on the client.
    pub fn push(&self, envelope: &SharedEnvelope) {
        self.push_all(std::iter::once(envelope));
    }

    /// Offers a burst under one lock and at most one wake-up.
    pub fn push_all<'a>(&self, envelopes: impl IntoIterator<Item = &'a SharedEnvelope>) {
        let mut state = self.lock();
        let was_idle = state.is_idle();
        for envelope in envelopes {
            state.push(envelope, &self.limits);
        }
        self.wake_if(was_idle && !state.is_idle());
    }

    /// Records that envelopes may have been missed at this point.
    pub fn push_resync(&self) {
        let mut state = self.lock();
        let was_idle = state.is_idle();
        state.resync();
        self.wake_if(was_idle && !state.is_idle());
    }

    /// Offers a burst of bus items, keeping the envelopes `accept` wants; one lock,
    /// at most one wake-up, no allocation.
    pub fn push_items(&self, items: &[BusItem], accept: impl Fn(&Envelope) -> bool) {
        let mut state = self.lock();
        let was_idle = state.is_idle();
        for item in items {
            match item {
                BusItem::Envelope(envelope) if accept(envelope) => {
                    state.push(envelope, &self.limits)
                }
                BusItem::Envelope(_) => {}
                BusItem::Resync(_) => state.resync(),
            }
        }
        self.wake_if(was_idle && !state.is_idle());
    }

    /// Closes the outbox; pending envelopes are dropped.
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.lock();
        let was_idle = state.is_idle();
        state.close(reason);
        self.wake_if(was_idle);
    }

    // Only an empty → non-empty transition needs a wake-up: otherwise the task is
    // either draining (and will find the new item) or already woken.
    fn wake_if(&self, wake: bool) {
        if wake {
            self.wake.notify_one();
        }
    }

    /// The next thing to do, if any.
    pub fn try_next(&self) -> Option<Next> {
        self.lock().pop()
    }

    /// Waits for the next thing to do. Cancel-safe: nothing is taken until it returns,
    /// so it can sit in a `select!` next to the socket's reads.
    pub async fn next(&self) -> Next {
        loop {
            if let Some(next) = self.try_next() {
                return next;
            }
            self.wake.notified().await;
        }
    }

    /// The last durable event id handed out (what a client resumes after).
    pub fn last_event_id(&self) -> Option<u64> {
        self.lock().last_event_id
    }

    /// After a replay sent events up to `id`, drop live copies of them (pending or
    /// arriving later) and count `id` as delivered. Relies on a tenant's event ids
    /// being assigned in commit order, as the event log guarantees (DESIGN §5).
    pub fn skip_events_through(&self, id: u64) {
        let mut state = self.lock();
        state.skip_through = Some(state.skip_through.map_or(id, |s| s.max(id)));
        state.last_event_id = Some(state.last_event_id.map_or(id, |l| l.max(id)));
        let skip = state.skip_through;
        state
            .lifecycle
            .retain(|(_, e)| skip.is_none_or(|through| e.id > through));
    }

    pub fn stats(&self) -> OutboxStats {
        let state = self.lock();
        OutboxStats {
            lifecycle: state.lifecycle.len(),
            latest: state.latest.len(),
            resync_pending: state.resync.is_some(),
            closed: state.close.is_some(),
        }
    }
}

#[cfg(test)]
mod tests;

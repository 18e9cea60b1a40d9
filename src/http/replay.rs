//! Shared reads of the event log for streams that resume.
//!
//! After a pod restart every client comes back at once, and most resume from the
//! same `since`. Each reading the log on its own (and rendering every replayed event
//! on its own, with a store read for each completed job's outputs) ran the pool dry
//! in the storm bench, and the streams that timed out were closed and came back
//! again. Here concurrent reads of one page are one query, and a replayed event is
//! one [`SharedEnvelope`] per pod, rendered once per dialect like a live one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::bus::{Envelope, SharedEnvelope};
use crate::domain::ids::{JobId, TenantId};
use crate::publish::event_object;
use crate::store::events::{EventQuery, StoredEvent};
use crate::store::shared_reads::SharedReads;
use crate::store::{Store, StoreError};

/// Events read from the log per round trip while replaying.
pub const REPLAY_PAGE: i64 = 500;

/// Replayed events kept as shared envelopes.
const ENVELOPES_KEPT: usize = 8192;
/// How long a kept envelope is reused: its rendered frames carry signed links,
/// which should not reach a client close to their expiry.
const ENVELOPE_REUSE: Duration = Duration::from_secs(60);

/// A page of the log, shared by the streams that read it together.
pub type Page = Arc<[Replayed]>;

/// An event read for a replay, with its envelope: made when the page is read, not
/// by each stream that replays it (a storm of resuming clients replays the same
/// events thousands of times).
pub struct Replayed {
    pub event: StoredEvent,
    /// `None` for an event that cannot be an envelope (an id or type out of range).
    pub envelope: Option<SharedEnvelope>,
}

pub struct ReplayLog {
    pages: SharedReads<PageKey, Page>,
    newest: SharedReads<TenantId, i64>,
    envelopes: Mutex<Envelopes>,
}

/// Log reads of one kind that run at once; the pod's pool serves the rest of the API.
const READS_AT_ONCE: usize = 4;

impl Default for ReplayLog {
    fn default() -> Self {
        Self {
            pages: SharedReads::new(READS_AT_ONCE),
            newest: SharedReads::new(READS_AT_ONCE),
            envelopes: Mutex::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PageKey {
    tenant: TenantId,
    after: i64,
    job: Option<JobId>,
}

#[derive(Default)]
struct Envelopes {
    by_id: HashMap<i64, (Instant, SharedEnvelope)>,
    order: VecDeque<i64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ReplayLog {
    /// The next page of the tenant's events after `after` (of one job, if given),
    /// oldest first; shorter than [`REPLAY_PAGE`] at the end of the log.
    ///
    /// The read began no earlier than `not_before`: a stream passes the moment its
    /// live feed was in place, and a read that began before then may lack what
    /// committed in between, so it is not shared with that stream.
    pub async fn page(
        &self,
        store: &Store,
        tenant: TenantId,
        after: i64,
        job: Option<JobId>,
        not_before: Instant,
    ) -> Result<Page, Arc<StoreError>> {
        let key = PageKey { tenant, after, job };
        self.pages
            .get(key, not_before, || async {
                let query = EventQuery {
                    since: Some(after),
                    job,
                    limit: REPLAY_PAGE,
                    ..EventQuery::default()
                };
                let events = store.list_events(tenant, &query).await?;
                Ok(events
                    .into_iter()
                    .map(|event| Replayed {
                        envelope: self.envelope(&event),
                        event,
                    })
                    .collect())
            })
            .await
    }

    /// The id of the tenant's newest event (0 if none), read no earlier than
    /// `not_before`: where a stream that was not asked to resume starts from.
    pub async fn newest(
        &self,
        store: &Store,
        tenant: TenantId,
        not_before: Instant,
    ) -> Result<i64, Arc<StoreError>> {
        self.newest
            .get(tenant, not_before, || async {
                let query = EventQuery {
                    limit: 1,
                    ..EventQuery::default()
                };
                let newest = store.list_events(tenant, &query).await?;
                Ok(newest.last().map_or(0, |e| e.id))
            })
            .await
    }

    /// The event as an envelope shared by every stream of this pod that replays it.
    fn envelope(&self, event: &StoredEvent) -> Option<SharedEnvelope> {
        let now = Instant::now();
        let mut kept = lock(&self.envelopes);
        if let Some((made, envelope)) = kept.by_id.get(&event.id)
            && now.duration_since(*made) < ENVELOPE_REUSE
        {
            return Some(envelope.clone());
        }
        let payload = bytes::Bytes::from(event_object(event).to_string());
        let envelope = Envelope::event(
            event.tenant_id,
            event.job_id,
            u64::try_from(event.id).ok()?,
            &event.kind,
            payload,
        )
        .ok()?;
        let shared = SharedEnvelope::new(envelope);
        if kept.by_id.insert(event.id, (now, shared.clone())).is_none() {
            kept.order.push_back(event.id);
        }
        while kept.order.len() > ENVELOPES_KEPT {
            if let Some(old) = kept.order.pop_front() {
                kept.by_id.remove(&old);
            }
        }
        Some(shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(id: i64) -> StoredEvent {
        StoredEvent {
            id,
            tenant_id: TenantId::default(),
            kind: "job.queued".into(),
            severity: "info".into(),
            message: "queued".into(),
            data: json!({}),
            job_id: None,
            created_at: chrono::Utc::now(),
            prev_id: None,
        }
    }

    #[test]
    fn a_replayed_event_is_one_shared_envelope_and_the_oldest_are_dropped() {
        let log = ReplayLog::default();
        let a = log.envelope(&event(1)).unwrap();
        let b = log.envelope(&event(1)).unwrap();
        assert!(SharedEnvelope::ptr_eq(&a, &b));
        for id in 2..=(ENVELOPES_KEPT as i64 + 1) {
            log.envelope(&event(id)).unwrap();
        }
        let c = log.envelope(&event(1)).unwrap();
        assert!(!SharedEnvelope::ptr_eq(&a, &c), "evicted, so made afresh");
        assert!(lock(&log.envelopes).by_id.len() <= ENVELOPES_KEPT);
    }
}

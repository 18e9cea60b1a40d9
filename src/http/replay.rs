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

use tokio::sync::OnceCell;

use crate::bus::{Envelope, SharedEnvelope};
use crate::domain::ids::{JobId, TenantId};
use crate::publish::event_object;
use crate::store::events::{EventQuery, StoredEvent};
use crate::store::{Store, StoreError};

/// Events read from the log per round trip while replaying.
pub const REPLAY_PAGE: i64 = 500;

/// Replayed events kept as shared envelopes.
const ENVELOPES_KEPT: usize = 8192;
/// How long a kept envelope is reused: its rendered frames carry signed links,
/// which should not reach a client close to their expiry.
const ENVELOPE_REUSE: Duration = Duration::from_secs(60);
/// Page reads older than this are forgotten (no stream can join them any more).
const READ_KEPT: Duration = Duration::from_secs(5);

pub type Page = Arc<[StoredEvent]>;

#[derive(Default)]
pub struct ReplayLog {
    pages: SharedReads<PageKey, Page>,
    newest: SharedReads<TenantId, i64>,
    envelopes: Mutex<Envelopes>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PageKey {
    tenant: TenantId,
    after: i64,
    job: Option<JobId>,
}

/// Reads of the store that concurrent streams share. A stream joins the read of its
/// key that has not begun yet, or that began no earlier than its `not_before`;
/// otherwise it starts one. Few reads run at once, so during a storm the rest wait
/// as one pending read per key that every newcomer joins.
struct SharedReads<K, V> {
    reads: Mutex<HashMap<K, Arc<Read<V>>>>,
    running: tokio::sync::Semaphore,
}

struct Read<V> {
    created: Instant,
    /// Set just before the query is sent: its snapshot is no older than this.
    began: std::sync::OnceLock<Instant>,
    value: OnceCell<Result<V, Arc<StoreError>>>,
}

/// Reads of one kind that run at once; the pod's pool serves the rest of the API.
const READS_AT_ONCE: usize = 4;

impl<K, V> Default for SharedReads<K, V> {
    fn default() -> Self {
        Self {
            reads: Mutex::default(),
            running: tokio::sync::Semaphore::new(READS_AT_ONCE),
        }
    }
}

impl<K: Copy + Eq + std::hash::Hash, V: Clone> SharedReads<K, V> {
    async fn get<F, Fut>(&self, key: K, not_before: Instant, read: F) -> Result<V, Arc<StoreError>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<V, StoreError>>,
    {
        let shared = {
            let mut reads = lock(&self.reads);
            let joinable = |r: &Read<V>| r.began.get().is_none_or(|began| *began >= not_before);
            match reads.get(&key) {
                Some(r) if joinable(r) => r.clone(),
                _ => {
                    let now = Instant::now();
                    reads.retain(|_, r| now.duration_since(r.created) < READ_KEPT);
                    let r = Arc::new(Read {
                        created: now,
                        began: std::sync::OnceLock::new(),
                        value: OnceCell::new(),
                    });
                    reads.insert(key, r.clone());
                    r
                }
            }
        };
        shared
            .value
            .get_or_init(|| async {
                // Closed never: the semaphore lives as long as `self`.
                let _permit = self.running.acquire().await.ok();
                let _ = shared.began.set(Instant::now());
                read().await.map_err(Arc::new)
            })
            .await
            .clone()
    }
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
                store.list_events(tenant, &query).await.map(Page::from)
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
    pub fn envelope(&self, event: &StoredEvent) -> Option<SharedEnvelope> {
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

    #[tokio::test]
    async fn streams_share_a_read_unless_it_began_before_their_feed() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let reads: SharedReads<u8, usize> = SharedReads::default();
        let count = AtomicUsize::new(0);
        let read = || async {
            tokio::task::yield_now().await;
            Ok(count.fetch_add(1, Ordering::SeqCst))
        };
        let early = Instant::now();
        let (a, b) = tokio::join!(reads.get(1, early, read), reads.get(1, early, read));
        assert_eq!((a.unwrap(), b.unwrap()), (0, 0), "one read for both");
        // A stream whose feed started after that read began must not take its result.
        let late = Instant::now();
        assert_eq!(reads.get(1, late, read).await.unwrap(), 1);
        assert_eq!(reads.get(2, early, read).await.unwrap(), 2, "another key");
        assert_eq!(count.load(Ordering::SeqCst), 3);
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

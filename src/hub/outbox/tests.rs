use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::bus::{Envelope, EnvelopeKind, Meta};
use crate::domain::ids::{JobId, TenantId};

fn shared(tenant: TenantId, kind: EnvelopeKind, job: Option<JobId>, id: u64) -> SharedEnvelope {
    let mut env = Envelope::new(tenant, kind, Bytes::from(id.to_string()));
    env.job = job;
    env.id = id;
    if kind == EnvelopeKind::Event {
        env.meta = Meta::typed("job.progressed").unwrap();
    }
    SharedEnvelope::new(env)
}

fn drain(outbox: &Outbox) -> Vec<(EnvelopeKind, Option<JobId>, u64)> {
    let mut out = Vec::new();
    while let Some(next) = outbox.try_next() {
        match next {
            Next::Envelope(e) => out.push((e.kind, e.job, e.id)),
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

#[test]
fn slow_consumer_gets_only_the_latest_progress_and_preview_per_job() {
    let tenant = TenantId::new();
    let (a, b) = (JobId::new(), JobId::new());
    let outbox = Outbox::new(OutboxLimits::default());
    outbox.push(&shared(tenant, EnvelopeKind::Event, Some(a), 1));
    for i in 0..1000 {
        outbox.push(&shared(tenant, EnvelopeKind::Progress, Some(a), i));
        outbox.push(&shared(tenant, EnvelopeKind::Progress, Some(b), 10_000 + i));
        outbox.push(&shared(tenant, EnvelopeKind::Preview, Some(a), i));
    }
    outbox.push(&shared(tenant, EnvelopeKind::Event, Some(a), 2));
    assert_eq!(
        outbox.stats(),
        OutboxStats {
            lifecycle: 2,
            latest: 3,
            resync_pending: false,
            closed: false
        }
    );
    // Arrival order: the event, the newest of each slot, then the later event —
    // never a stale progress after the job's later lifecycle event.
    assert_eq!(
        drain(&outbox),
        vec![
            (EnvelopeKind::Event, Some(a), 1),
            (EnvelopeKind::Progress, Some(a), 999),
            (EnvelopeKind::Progress, Some(b), 10_999),
            (EnvelopeKind::Preview, Some(a), 999),
            (EnvelopeKind::Event, Some(a), 2),
        ]
    );
    assert_eq!(outbox.last_event_id(), Some(2));
}

#[test]
fn a_replaced_slot_moves_behind_newer_arrivals() {
    let tenant = TenantId::new();
    let job = JobId::new();
    let outbox = Outbox::new(OutboxLimits::default());
    outbox.push(&shared(tenant, EnvelopeKind::Progress, Some(job), 1));
    outbox.push(&shared(tenant, EnvelopeKind::Event, Some(job), 7));
    outbox.push(&shared(tenant, EnvelopeKind::Progress, Some(job), 2));
    assert_eq!(
        drain(&outbox),
        vec![
            (EnvelopeKind::Event, Some(job), 7),
            (EnvelopeKind::Progress, Some(job), 2),
        ]
    );
}

#[test]
fn lifecycle_overflow_closes_with_the_documented_code() {
    let tenant = TenantId::new();
    let outbox = Outbox::new(OutboxLimits {
        lifecycle: 4,
        latest: 4,
    });
    outbox.push(&shared(tenant, EnvelopeKind::Event, None, 10));
    assert!(matches!(outbox.try_next(), Some(Next::Envelope(e)) if e.id == 10));
    for id in 11..=14 {
        outbox.push(&shared(tenant, EnvelopeKind::Event, None, id));
    }
    assert!(!outbox.stats().closed, "exactly full is not overflow");
    outbox.push(&shared(tenant, EnvelopeKind::Event, None, 15));
    let reason = match outbox.try_next() {
        Some(Next::Close(reason)) => reason,
        other => panic!("expected Close, got {other:?}"),
    };
    assert_eq!(
        reason,
        CloseReason::TooSlow {
            last_event_id: Some(10)
        }
    );
    assert_eq!(reason.code(), CLOSE_TOO_SLOW);
    assert_eq!(reason.code(), 4008);
    assert_eq!(reason.reason(), "too slow; resume with since=10");
    // It stays closed, holds nothing, and ignores further pushes.
    outbox.push(&shared(tenant, EnvelopeKind::Progress, None, 16));
    assert!(matches!(outbox.try_next(), Some(Next::Close(_))));
    assert_eq!(
        outbox.stats(),
        OutboxStats {
            lifecycle: 0,
            latest: 0,
            resync_pending: false,
            closed: true
        }
    );
    assert_eq!(CloseReason::ShuttingDown.code(), 1001);
    assert!(
        CloseReason::TooSlow {
            last_event_id: Some(u64::MAX)
        }
        .reason()
        .len()
            <= 123
    );
}

#[test]
fn memory_stays_bounded_under_100k_pushes_without_reads() {
    let tenant = TenantId::new();
    let limits = OutboxLimits::default();

    // Ephemeral frames for ever-new jobs: slots stay at the limit.
    let outbox = Outbox::new(limits);
    for i in 0..100_000 {
        let kind = if i % 2 == 0 {
            EnvelopeKind::Progress
        } else {
            EnvelopeKind::Preview
        };
        outbox.push(&shared(tenant, kind, Some(JobId::new()), i));
    }
    let stats = outbox.stats();
    assert_eq!(stats.latest, limits.latest);
    assert_eq!(stats.lifecycle, 0);
    // The survivors are the newest ones.
    let ids: Vec<u64> = drain(&outbox).into_iter().map(|(_, _, id)| id).collect();
    assert_eq!(
        ids,
        (100_000 - limits.latest as u64..100_000).collect::<Vec<_>>()
    );

    // Lifecycle events: the queue never passes its bound; the connection is closed.
    let outbox = Outbox::new(limits);
    let mut max_len = 0;
    for i in 0..100_000 {
        outbox.push(&shared(tenant, EnvelopeKind::Event, None, i));
        max_len = max_len.max(outbox.stats().lifecycle);
    }
    assert_eq!(max_len, limits.lifecycle);
    assert!(outbox.stats().closed);
    assert_eq!(outbox.stats().lifecycle, 0);

    // The same progress slot over and over: one entry.
    let outbox = Outbox::new(limits);
    let job = Some(JobId::new());
    for i in 0..100_000 {
        outbox.push(&shared(tenant, EnvelopeKind::Progress, job, i));
    }
    assert_eq!(outbox.stats().latest, 1);
}

#[test]
fn slots_are_keyed_by_type_too() {
    let tenant = TenantId::new();
    let job = Some(JobId::new());
    let outbox = Outbox::new(OutboxLimits::default());
    for (i, ty) in ["executing", "progress", "executing"]
        .into_iter()
        .enumerate()
    {
        let mut env = Envelope::new(tenant, EnvelopeKind::Progress, Bytes::new());
        env.job = job;
        env.id = i as u64;
        env.meta = Meta::typed(ty).unwrap();
        outbox.push(&SharedEnvelope::new(env));
    }
    let got: Vec<u64> = drain(&outbox).into_iter().map(|(_, _, id)| id).collect();
    assert_eq!(got, vec![1, 2]);
}

#[test]
fn resync_is_ordered_and_replayed_events_are_skipped() {
    let tenant = TenantId::new();
    let outbox = Outbox::new(OutboxLimits::default());
    outbox.push(&shared(tenant, EnvelopeKind::Event, None, 1));
    outbox.push_resync();
    outbox.push_resync(); // one replay covers both
    outbox.push(&shared(tenant, EnvelopeKind::Event, None, 5));
    outbox.push(&shared(tenant, EnvelopeKind::Event, None, 6));
    assert!(matches!(outbox.try_next(), Some(Next::Envelope(e)) if e.id == 1));
    assert!(matches!(outbox.try_next(), Some(Next::Resync)));
    // The transport replays 2..=5 from the event log, then:
    outbox.skip_events_through(5);
    assert_eq!(outbox.last_event_id(), Some(5));
    outbox.push(&shared(tenant, EnvelopeKind::Event, None, 4)); // a late live copy
    assert!(matches!(outbox.try_next(), Some(Next::Envelope(e)) if e.id == 6));
    assert!(outbox.try_next().is_none());
    assert_eq!(outbox.last_event_id(), Some(6));
}

#[tokio::test]
async fn next_sleeps_until_something_arrives_and_is_cancel_safe() {
    let tenant = TenantId::new();
    let outbox = std::sync::Arc::new(Outbox::new(OutboxLimits::default()));
    // Cancelled while waiting: nothing is lost.
    assert!(
        tokio::time::timeout(Duration::from_millis(20), outbox.next())
            .await
            .is_err()
    );
    let waiter = tokio::spawn({
        let outbox = outbox.clone();
        async move {
            let mut ids = Vec::new();
            while ids.len() < 3 {
                match outbox.next().await {
                    Next::Envelope(e) => ids.push(e.id),
                    other => panic!("{other:?}"),
                }
            }
            ids
        }
    });
    for id in 1..=3 {
        outbox.push(&shared(tenant, EnvelopeKind::Event, None, id));
        tokio::task::yield_now().await;
    }
    let ids = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken")
        .unwrap();
    assert_eq!(ids, vec![1, 2, 3]);
    outbox.close(CloseReason::ShuttingDown);
    assert!(matches!(
        outbox.next().await,
        Next::Close(CloseReason::ShuttingDown)
    ));
}

#[test]
fn an_idle_outbox_is_small_and_owns_no_heap() {
    // Everything inline; the queue and slot vectors allocate only when used.
    let size = std::mem::size_of::<Outbox>();
    assert!(size <= 256, "Outbox is {size} bytes");
    let outbox = Outbox::new(OutboxLimits::default());
    let state = outbox.lock();
    assert_eq!(state.lifecycle.capacity(), 0);
    assert_eq!(state.latest.capacity(), 0);
}

#[test]
fn last_event_id_is_the_highest_handed_out() {
    let tenant = TenantId::new();
    let outbox = Outbox::new(OutboxLimits::default());
    // Two commits in id order whose publishes raced: both are delivered.
    outbox.push(&shared(tenant, EnvelopeKind::Event, None, 6));
    outbox.push(&shared(tenant, EnvelopeKind::Event, None, 5));
    let ids: Vec<u64> = drain(&outbox).into_iter().map(|(_, _, id)| id).collect();
    assert_eq!(ids, vec![6, 5]);
    assert_eq!(outbox.last_event_id(), Some(6));
}

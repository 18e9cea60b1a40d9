//! The pod's subscription registry: every client connection attaches here, and each
//! tenant with at least one connection on this pod has exactly one bus subscription
//! and one pump task feeding all of that tenant's outboxes.
//!
//! ```text
//! Redis ─▶ bus reader (decode once) ─▶ tenant pump ─┬▶ outbox ─▶ connection task ─▶ socket
//!                                                   ├▶ outbox ─▶ …
//!                                                   └▶ …
//! ```
//!
//! The pump never waits on a client: pushing into an outbox is a short lock, a
//! latest-wins replace or a bounded append, and at most one wake-up. Every outbox
//! receives the same [`SharedEnvelope`](crate::bus::SharedEnvelope), so payloads and
//! rendered frames are shared.
//!
//! A transport is a thin loop over a [`Connection`] (sketch; `ws`, `render_cloud` and
//! `replay_after` belong to the dialect):
//!
//! ```ignore
//! let conn = hub.attach(tenant, Filter::new(|_| false)).await; // until `subscribe`
//! if let Some(since) = resume_from {
//!     let last = replay_after(&store, tenant, since, &mut ws).await?; // event log
//!     conn.skip_events_through(last);
//! }
//! loop {
//!     tokio::select! {
//!         msg = ws.next() => match msg {
//!             Some(Ok(subscribe)) => {
//!                 let patterns = PatternSet::parse_all(subscribe.events())?;
//!                 conn.set_filter(Filter::new(move |env| {
//!                     env.event_type().is_some_and(|t| patterns.matches(t))
//!                 }));
//!             }
//!             _ => break, // client gone: dropping `conn` detaches it
//!         },
//!         next = conn.next() => match next {
//!             Next::Envelope(env) => {
//!                 // Rendered once per pod for all CloudWs sockets; a clone of Bytes here.
//!                 if let Some(frame) = env.rendered(Dialect::CloudWs, render_cloud) {
//!                     ws.send(frame).await?; // while this waits, the outbox coalesces
//!                 }
//!             }
//!             Next::Resync => {
//!                 let last = replay_after(&store, tenant, conn.last_event_id(), &mut ws).await?;
//!                 conn.skip_events_through(last);
//!             }
//!             Next::Close(reason) => {
//!                 ws.close(reason.code(), reason.reason()).await;
//!                 break;
//!             }
//!         },
//!         _ = shutdown.cancelled() => break,
//!     }
//! }
//! ```

mod order;
pub mod outbox;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, BusItem, Envelope};
use crate::domain::ids::TenantId;
use order::EventOrder;

pub use outbox::{
    CLOSE_GOING_AWAY, CLOSE_TOO_SLOW, CloseReason, Next, Outbox, OutboxLimits, OutboxStats,
};

/// Most bus items a pump takes in one go; a burst is pushed into each outbox under
/// one lock with one wake-up.
const BURST: usize = 64;

/// Which envelopes a connection wants, decided in the pump before anything is queued.
/// Must be cheap and must not block: it runs once per envelope per connection.
#[derive(Clone, Default)]
pub struct Filter(Option<Arc<Predicate>>);

type Predicate = dyn Fn(&Envelope) -> bool + Send + Sync;

impl Filter {
    /// Everything of the tenant.
    pub fn all() -> Self {
        Self(None)
    }

    pub fn new(accepts: impl Fn(&Envelope) -> bool + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(accepts)))
    }

    pub fn accepts(&self, envelope: &Envelope) -> bool {
        self.0.as_ref().is_none_or(|f| f(envelope))
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Filter(custom)"
        } else {
            "Filter(all)"
        })
    }
}

/// The pod's hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    bus: Bus,
    limits: OutboxLimits,
    /// Cancelling it closes every connection with [`CloseReason::ShuttingDown`].
    shutdown: CancellationToken,
    /// Owns the pump tasks, so the pod's shutdown can wait for them.
    tasks: TaskTracker,
    /// Lock order: `feeds` before any feed's `members`.
    feeds: Mutex<HashMap<TenantId, Arc<Feed>>>,
    next_id: AtomicU64,
}

/// One tenant's live feed on this pod.
struct Feed {
    tenant: TenantId,
    members: Mutex<HashMap<u64, Arc<Member>>>,
    /// Becomes true once the bus subscription is confirmed (or the pump gave up), so
    /// `attach` returns only when events committed afterwards will be delivered.
    ready: watch::Sender<bool>,
    /// Stops the pump: cancelled when the last member leaves, or by hub shutdown.
    stop: CancellationToken,
}

struct Member {
    outbox: Outbox,
    filter: RwLock<Filter>,
}

impl Hub {
    pub fn new(
        bus: Bus,
        limits: OutboxLimits,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        Self {
            inner: Arc::new(HubInner {
                bus,
                limits,
                shutdown,
                tasks: tasks.clone(),
                feeds: Mutex::default(),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// Attaches a client connection of `tenant`. Returns once live delivery is set
    /// up: subscribe first, then replay from the event log, then drain — that order
    /// leaves no gap (duplicates are removed with [`Connection::skip_events_through`]).
    pub async fn attach(&self, tenant: TenantId, filter: Filter) -> Connection {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let member = Arc::new(Member {
            outbox: Outbox::new(inner.limits),
            filter: RwLock::new(filter),
        });
        let (feed, created) = {
            let mut feeds = lock(&inner.feeds);
            let mut created = false;
            let feed = feeds
                .entry(tenant)
                .or_insert_with(|| {
                    created = true;
                    Arc::new(Feed {
                        tenant,
                        members: Mutex::default(),
                        ready: watch::Sender::new(false),
                        stop: inner.shutdown.child_token(),
                    })
                })
                .clone();
            lock(&feed.members).insert(id, member.clone());
            (feed, created)
        };
        if created {
            inner.tasks.spawn(pump(inner.clone(), feed.clone()));
        }
        let mut ready = feed.ready.subscribe();
        // Err only if the feed is gone, which cannot happen while we hold it.
        let _ = ready.wait_for(|ready| *ready).await;
        Connection {
            hub: inner.clone(),
            feed,
            id,
            member,
        }
    }

    /// Tenants with at least one connection on this pod.
    pub fn tenant_count(&self) -> usize {
        lock(&self.inner.feeds).len()
    }

    /// Connections attached on this pod.
    pub fn connection_count(&self) -> usize {
        lock(&self.inner.feeds)
            .values()
            .map(|feed| lock(&feed.members).len())
            .sum()
    }
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("bus", &self.inner.bus)
            .field("tenants", &self.tenant_count())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent across a panic elsewhere; keep serving.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Feeds one tenant's outboxes from its bus subscription until the last connection
/// leaves, the hub shuts down, or the bus closes.
async fn pump(hub: Arc<HubInner>, feed: Arc<Feed>) {
    let subscription = tokio::select! {
        _ = feed.stop.cancelled() => None,
        subscription = hub.bus.subscribe(feed.tenant) => Some(subscription),
    };
    feed.ready.send_replace(true);
    if let Some(mut subscription) = subscription {
        let mut order = EventOrder::default();
        let mut burst = Vec::with_capacity(BURST);
        loop {
            let held_until = order.deadline();
            tokio::select! {
                _ = feed.stop.cancelled() => break,
                _ = tokio::time::sleep_until(held_until.unwrap_or_else(tokio::time::Instant::now)),
                    if held_until.is_some() => order.release(&mut burst),
                item = subscription.recv() => match item {
                    None => break,
                    Some(item) => {
                        order.admit(item, &mut burst);
                        for _ in 1..BURST {
                            match subscription.try_recv() {
                                Some(item) => order.admit(item, &mut burst),
                                None => break,
                            }
                        }
                    }
                },
            }
            if !burst.is_empty() {
                feed.deliver(&burst);
                burst.clear();
            }
        }
    }
    retire(&hub, &feed);
}

impl Feed {
    fn deliver(&self, items: &[BusItem]) {
        let members = lock(&self.members);
        for member in members.values() {
            member.offer(items);
        }
    }
}

impl Member {
    fn offer(&self, items: &[BusItem]) {
        let filter = self.filter.read().unwrap_or_else(|e| e.into_inner());
        self.outbox
            .push_items(items, |envelope| filter.accepts(envelope));
    }
}

/// The pump has stopped: take the feed out of the map (so a new connection starts a
/// fresh one) and close whatever is still attached.
fn retire(hub: &HubInner, feed: &Arc<Feed>) {
    let mut feeds = lock(&hub.feeds);
    if feeds
        .get(&feed.tenant)
        .is_some_and(|current| Arc::ptr_eq(current, feed))
    {
        feeds.remove(&feed.tenant);
    }
    // Members left here mean the hub or the bus is shutting down; had they all
    // left, there would be none.
    for member in lock(&feed.members).values() {
        member.outbox.close(CloseReason::ShuttingDown);
    }
}

/// One client's attachment. Drop it when the client goes away.
pub struct Connection {
    hub: Arc<HubInner>,
    feed: Arc<Feed>,
    id: u64,
    member: Arc<Member>,
}

impl Connection {
    /// Waits for the next thing to send (or to do). Cancel-safe.
    pub async fn next(&self) -> Next {
        self.member.outbox.next().await
    }

    pub fn try_next(&self) -> Option<Next> {
        self.member.outbox.try_next()
    }

    /// Replaces the filter (a cloud client's `subscribe` changed its patterns).
    /// Envelopes already queued stay queued.
    pub fn set_filter(&self, filter: Filter) {
        *self
            .member
            .filter
            .write()
            .unwrap_or_else(|e| e.into_inner()) = filter;
    }

    /// See [`Outbox::skip_events_through`].
    pub fn skip_events_through(&self, id: u64) {
        self.member.outbox.skip_events_through(id);
    }

    pub fn last_event_id(&self) -> Option<u64> {
        self.member.outbox.last_event_id()
    }

    pub fn tenant(&self) -> TenantId {
        self.feed.tenant
    }

    pub fn stats(&self) -> OutboxStats {
        self.member.outbox.stats()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut feeds = lock(&self.hub.feeds);
        let mut members = lock(&self.feed.members);
        members.remove(&self.id);
        if members.is_empty() {
            if feeds
                .get(&self.feed.tenant)
                .is_some_and(|current| Arc::ptr_eq(current, &self.feed))
            {
                feeds.remove(&self.feed.tenant);
            }
            // The pump drops the bus subscription, which unsubscribes the channel
            // if nothing else on this pod holds it.
            self.feed.stop.cancel();
        }
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("tenant", &self.feed.tenant)
            .field("id", &self.id)
            .field("outbox", &self.stats())
            .finish()
    }
}

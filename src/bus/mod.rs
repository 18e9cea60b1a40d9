//! The fan-out fabric: publish an [`Envelope`] on one pod, receive it on every pod
//! that has a client of that tenant.
//!
//! One [`Bus`] per pod. With Redis it holds one dedicated pub/sub connection and one
//! publishing connection; a tenant's channel (`{prefix}:tenant:{uuid}`) is subscribed
//! only while some [`Subscription`] of that tenant lives on this pod (reference
//! counted), each message is decoded once, and the decoded [`SharedEnvelope`] is handed
//! to every local subscriber. The Redis reader never waits on a subscriber: each
//! channel feeds a bounded broadcast ring, and a subscriber that falls behind sees
//! [`BusItem::Resync`] instead of stalling the pod (Redis would otherwise disconnect
//! us, DESIGN §9). Exact channels only — never `PSUBSCRIBE`.
//!
//! Without Redis ([`Bus::in_process`]) the same interface fans out inside the process.
//!
//! When the Redis connection is lost the bus reconnects with backoff, resubscribes
//! every channel that still has subscribers, and then sends each of them
//! [`BusItem::Resync`]: whatever was published meanwhile is gone from pub/sub, so the
//! stream layer replays durable events from the event log.

pub mod envelope;
mod redis_bus;
mod registry;

use std::fmt;
use std::sync::Arc;

use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::ids::TenantId;

pub use envelope::{
    DecodeError, Dialect, Envelope, EnvelopeKind, Frame, Meta, MetaError, SharedEnvelope,
    meta_keys, now_micros,
};

use redis_bus::RedisBackend;
use registry::Registry;

/// What a [`Subscription`] yields.
#[derive(Clone, Debug)]
pub enum BusItem {
    Envelope(SharedEnvelope),
    /// Envelopes may have been missed (the cause says why): replay durable events
    /// from the event log after the last id delivered; ephemeral state will be
    /// refreshed by the next progress message.
    Resync(ResyncCause),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncCause {
    /// The Redis connection was lost and has been re-established (or the
    /// subscription was made while Redis was unreachable).
    Reconnected,
    /// This subscriber fell this many envelopes behind the channel's ring.
    Lagged(u64),
    /// An event's predecessor in the tenant's log may not have reached this pod's
    /// feed before it (`hub::order`): it did not within the hold, or the feed has
    /// nothing to compare with yet. It is in the log; replaying keeps streams gap-free.
    PredecessorMissing,
}

/// A pub/sub channel, without the deployment prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Everything about one tenant's jobs: `{prefix}:tenant:{uuid}`.
    Tenant(TenantId),
    /// A non-tenant channel (worker wake-ups, per-worker control): `{prefix}:ctl:{name}`.
    Control(ControlName),
}

/// The name of a control channel: 1–100 characters of `a-z 0-9 _ - . :`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ControlName(String);

impl ControlName {
    pub fn parse(name: &str) -> Result<Self, BusError> {
        let ok = !name.is_empty()
            && name.len() <= 100
            && name.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'_' | b'-' | b'.' | b':')
            });
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(BusError::InvalidTopic(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("invalid control channel name {0:?}")]
    InvalidTopic(String),
}

/// Settings of a pod's bus.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// Prefix of every channel, so deployments and tests can share one Redis.
    pub prefix: String,
    /// Envelopes buffered per channel for a subscriber that is momentarily busy
    /// before it is told to resync. Each slot costs ~50 bytes per subscribed channel.
    pub channel_capacity: usize,
}

impl BusConfig {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            channel_capacity: 128,
        }
    }
}

/// The pod's handle on the fabric. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<BusInner>,
}

struct BusInner {
    prefix: String,
    registry: Arc<Registry>,
    backend: Backend,
}

enum Backend {
    InProcess,
    /// Boxed: the connection handles are large and the in-process variant is empty.
    Redis(Box<RedisBackend>),
}

impl Bus {
    /// A bus that never leaves the process: for a single pod without Redis.
    pub fn in_process(config: BusConfig) -> Self {
        let registry = Arc::new(Registry::new(config.channel_capacity));
        Self::assemble(config, registry, Backend::InProcess)
    }

    /// A bus over Redis. Connects before returning (a pod that cannot reach its
    /// configured Redis at start should say so); afterwards reconnects on its own.
    /// The background reader stops when `shutdown` is cancelled or the last handle
    /// (bus or subscription) is dropped; it is spawned on `tasks`.
    pub async fn redis(
        client: redis::Client,
        config: BusConfig,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Self, BusError> {
        let registry = Arc::new(Registry::new(config.channel_capacity));
        // Round trips on this channel (an UNSUBSCRIBE that changes nothing) prove the
        // pub/sub connection is alive when no traffic does.
        let heartbeat = format!("{}:hb", config.prefix);
        let backend =
            redis_bus::connect(client, registry.clone(), heartbeat, shutdown, tasks).await?;
        Ok(Self::assemble(
            config,
            registry,
            Backend::Redis(Box::new(backend)),
        ))
    }

    fn assemble(config: BusConfig, registry: Arc<Registry>, backend: Backend) -> Self {
        Self {
            inner: Arc::new(BusInner {
                prefix: config.prefix,
                registry,
                backend,
            }),
        }
    }

    pub fn is_redis(&self) -> bool {
        matches!(self.inner.backend, Backend::Redis(_))
    }

    /// Channels with at least one subscription on this pod (for metrics and tests).
    pub fn subscribed_channels(&self) -> usize {
        self.inner.registry.channel_count()
    }

    /// The full channel name of `topic` on this deployment.
    pub fn channel_name(&self, topic: &Topic) -> String {
        match topic {
            Topic::Tenant(tenant) => format!("{}:tenant:{}", self.inner.prefix, tenant),
            Topic::Control(name) => format!("{}:ctl:{}", self.inner.prefix, name.as_str()),
        }
    }

    /// Publishes on the envelope's tenant channel.
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        self.publish_to(&Topic::Tenant(envelope.tenant), envelope)
            .await
    }

    /// Publishes on any topic (control channels for workers).
    pub async fn publish_to(&self, topic: &Topic, envelope: &Envelope) -> Result<(), BusError> {
        let channel = self.channel_name(topic);
        match &self.inner.backend {
            Backend::InProcess => {
                // Same-process delivery skips the codec: the clone only bumps the
                // payload's reference count.
                self.inner.registry.dispatch(
                    &channel,
                    BusItem::Envelope(SharedEnvelope::new(envelope.clone())),
                );
                Ok(())
            }
            Backend::Redis(redis) => redis.publish(&channel, envelope.encode()).await,
        }
    }

    /// Subscribes to a tenant's channel. See [`Bus::subscribe_topic`].
    pub async fn subscribe(&self, tenant: TenantId) -> Subscription {
        self.subscribe_topic(&Topic::Tenant(tenant)).await
    }

    /// Subscribes to a topic. Returns once Redis has confirmed the channel, so an
    /// event committed after this returns is delivered live; if Redis is unreachable
    /// it returns at once and the subscription gets a [`BusItem::Resync`] when the
    /// connection is back. Dropping the last subscription of a channel on this pod
    /// unsubscribes it.
    pub async fn subscribe_topic(&self, topic: &Topic) -> Subscription {
        let channel = self.channel_name(topic);
        let inner = &self.inner;
        let rx = inner.registry.join(&channel, || {
            if let Backend::Redis(redis) = &inner.backend {
                redis.subscribe(channel.clone());
            }
        });
        let subscription = Subscription {
            rx,
            guard: Guard {
                bus: self.inner.clone(),
                channel,
            },
        };
        if let Backend::Redis(redis) = &inner.backend {
            let (done, confirmed) = oneshot::channel();
            redis.barrier(done);
            // An error means "not confirmed": the bus is reconnecting or shutting down.
            let _ = confirmed.await;
        }
        subscription
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("prefix", &self.inner.prefix)
            .field("redis", &self.is_redis())
            .finish()
    }
}

/// A live feed of one channel on this pod.
pub struct Subscription {
    rx: broadcast::Receiver<BusItem>,
    guard: Guard,
}

impl Subscription {
    /// The next item; `None` once the bus has shut down. Cancel-safe.
    pub async fn recv(&mut self) -> Option<BusItem> {
        match self.rx.recv().await {
            Ok(item) => Some(item),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                Some(BusItem::Resync(ResyncCause::Lagged(n)))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next item if one is ready, for draining a burst without awaiting.
    pub fn try_recv(&mut self) -> Option<BusItem> {
        match self.rx.try_recv() {
            Ok(item) => Some(item),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                Some(BusItem::Resync(ResyncCause::Lagged(n)))
            }
            Err(_) => None,
        }
    }

    /// The full channel name this subscription listens on.
    pub fn channel(&self) -> &str {
        &self.guard.channel
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.guard.channel)
            .finish()
    }
}

/// Gives the subscription's reference back when dropped; the last one of a channel
/// unsubscribes it from Redis.
struct Guard {
    bus: Arc<BusInner>,
    channel: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let inner = &self.bus;
        inner.registry.leave(&self.channel, || {
            if let Backend::Redis(redis) = &inner.backend {
                redis.unsubscribe(self.channel.clone());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn control_names() {
        assert!(ControlName::parse("workers:wake").is_ok());
        assert!(ControlName::parse("worker.0192-abc").is_ok());
        for bad in ["", "Has Space", "a*", "x".repeat(101).as_str()] {
            assert!(ControlName::parse(bad).is_err(), "{bad:?}");
        }
        let bus = Bus::in_process(BusConfig::new("p"));
        let t = TenantId::new();
        assert_eq!(bus.channel_name(&Topic::Tenant(t)), format!("p:tenant:{t}"));
        assert_eq!(
            bus.channel_name(&Topic::Control(ControlName::parse("w").unwrap())),
            "p:ctl:w"
        );
    }

    #[tokio::test]
    async fn lagging_subscriber_is_told_to_resync() {
        let bus = Bus::in_process(BusConfig {
            prefix: "p".into(),
            channel_capacity: 4,
        });
        let tenant = TenantId::new();
        let mut sub = bus.subscribe(tenant).await;
        for i in 0..10 {
            let mut env = Envelope::new(tenant, EnvelopeKind::Progress, Bytes::new());
            env.id = i;
            bus.publish(&env).await.unwrap();
        }
        assert!(matches!(
            sub.recv().await,
            Some(BusItem::Resync(ResyncCause::Lagged(6)))
        ));
        // Then the newest four, in order.
        for i in 6..10 {
            match sub.recv().await {
                Some(BusItem::Envelope(env)) => assert_eq!(env.id, i),
                other => panic!("{other:?}"),
            }
        }
        assert!(sub.try_recv().is_none());
    }
}

//! The Redis transport: one publishing connection and one dedicated pub/sub
//! connection per pod, driven by a supervisor task that reconnects and resubscribes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::join_all;
use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub, PubSubSink, PubSubStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::registry::Registry;
use super::{BusError, BusItem, Envelope, ResyncCause, SharedEnvelope};

/// Longest wait for a connect or a command reply before the connection is presumed dead.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an otherwise idle pub/sub connection is checked; a half-open TCP
/// connection would otherwise look healthy forever.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(15);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Resubscriptions in flight at once after a reconnect (one reply each, pipelined).
const RESUBSCRIBE_BATCH: usize = 256;

pub(super) struct RedisBackend {
    publisher: ConnectionManager,
    /// To the supervisor, which owns the pub/sub connection.
    commands: mpsc::UnboundedSender<Command>,
}

enum Command {
    Subscribe(String),
    Unsubscribe(String),
    /// Answered once every earlier command has been acknowledged by Redis on the
    /// current connection; dropped unanswered while disconnected.
    Barrier(oneshot::Sender<()>),
}

pub(super) async fn connect(
    client: redis::Client,
    registry: Arc<Registry>,
    heartbeat: String,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<RedisBackend, BusError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(REQUEST_TIMEOUT)
        .set_response_timeout(REQUEST_TIMEOUT)
        .set_max_delay(BACKOFF_MAX.as_millis() as u64);
    let publisher = client.get_connection_manager_with_config(config).await?;
    let pubsub = timeout(REQUEST_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| timed_out())??;
    let (commands, receiver) = mpsc::unbounded_channel();
    let supervisor = Supervisor {
        client,
        registry,
        commands: receiver,
        shutdown,
        heartbeat,
    };
    tasks.spawn(supervisor.run(pubsub));
    Ok(RedisBackend {
        publisher,
        commands,
    })
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "redis did not answer in time",
    ))
}

impl RedisBackend {
    pub(super) async fn publish(&self, channel: &str, frame: Bytes) -> Result<(), BusError> {
        let mut conn = self.publisher.clone();
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(&frame[..])
            .query_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }

    // Sends fail only once the supervisor has stopped, when nothing is subscribed
    // any more and the registry is closed, so there is nothing to do about them.
    pub(super) fn subscribe(&self, channel: String) {
        let _ = self.commands.send(Command::Subscribe(channel));
    }

    pub(super) fn unsubscribe(&self, channel: String) {
        let _ = self.commands.send(Command::Unsubscribe(channel));
    }

    pub(super) fn barrier(&self, done: oneshot::Sender<()>) {
        let _ = self.commands.send(Command::Barrier(done));
    }
}

/// Owns the pub/sub connection for the life of the pod.
struct Supervisor {
    client: redis::Client,
    registry: Arc<Registry>,
    commands: mpsc::UnboundedReceiver<Command>,
    shutdown: CancellationToken,
    heartbeat: String,
}

/// Why serving a connection ended.
enum Ended {
    Lost,
    Stopped,
}

impl Supervisor {
    async fn run(mut self, first: PubSub) {
        let mut next = Some(first);
        let mut reconnected = false;
        loop {
            let pubsub = match next.take() {
                Some(pubsub) => pubsub,
                None => match self.reconnect().await {
                    Some(pubsub) => pubsub,
                    None => break,
                },
            };
            match self.serve(pubsub, reconnected).await {
                Ended::Stopped => break,
                Ended::Lost => {
                    tracing::warn!("redis pub/sub connection lost; reconnecting");
                    reconnected = true;
                }
            }
        }
        self.registry.close();
    }

    /// Connects with capped, jittered exponential backoff. While waiting, barriers
    /// are dropped unanswered (their subscriptions will get a Resync) and channel
    /// changes are dropped too: the registry snapshot taken on connect covers them.
    async fn reconnect(&mut self) -> Option<PubSub> {
        let mut delay = BACKOFF_MIN;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                result = timeout(REQUEST_TIMEOUT, self.client.get_async_pubsub()) => match result {
                    Ok(Ok(pubsub)) => {
                        tracing::info!("redis pub/sub connection re-established");
                        return Some(pubsub);
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "redis pub/sub reconnect failed"),
                    Err(_) => tracing::debug!("redis pub/sub reconnect timed out"),
                },
            }
            let jitter = rand::thread_rng().gen_range(0..=delay.as_millis() as u64 / 2);
            let pause = sleep(delay + Duration::from_millis(jitter));
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return None,
                    _ = &mut pause => break,
                    // Dropping a barrier unanswered tells its subscriber "not confirmed".
                    command = self.commands.recv() => {
                        command?;
                    }
                }
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    async fn serve(&mut self, pubsub: PubSub, reconnected: bool) -> Ended {
        let (mut sink, mut stream) = pubsub.split();

        // Everything queued so far is summed up by the registry's current channels;
        // taking both under the registry lock means every later join or leave is a
        // command still in the queue.
        let commands = &mut self.commands;
        let (channels, barriers) = self.registry.snapshot(|| {
            let mut barriers = Vec::new();
            while let Ok(command) = commands.try_recv() {
                if let Command::Barrier(done) = command {
                    barriers.push(done);
                }
            }
            barriers
        });
        for batch in channels.chunks(RESUBSCRIBE_BATCH) {
            let replies = join_all(batch.iter().map(|channel| {
                let mut sink = sink.clone();
                async move { timeout(REQUEST_TIMEOUT, sink.subscribe(channel)).await }
            }));
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ended::Stopped,
                replies = replies => {
                    if !replies.into_iter().all(|r| matches!(r, Ok(Ok(())))) {
                        return Ended::Lost;
                    }
                }
            }
        }
        for done in barriers {
            let _ = done.send(());
        }
        if reconnected && !channels.is_empty() {
            tracing::info!(channels = channels.len(), "resubscribed after reconnect");
        }
        // After a reconnect every subscriber may have missed envelopes. The first
        // connection has no earlier subscribers, and subscriptions queued while it
        // was being set up were confirmed above, so they missed nothing.
        if reconnected {
            for channel in &channels {
                self.registry
                    .dispatch(channel, BusItem::Resync(ResyncCause::Reconnected));
            }
        }

        let registry = &self.registry;
        tokio::select! {
            _ = self.shutdown.cancelled() => Ended::Stopped,
            () = read(&mut stream, registry) => Ended::Lost,
            ended = execute(&mut sink, &mut self.commands, &self.heartbeat) => ended,
        }
    }
}

/// Decodes each message once and hands it to the local subscribers; never waits on them.
async fn read(stream: &mut PubSubStream, registry: &Registry) {
    while let Some(message) = stream.next().await {
        let channel = message.get_channel_name();
        // The one copy per message per pod: redis-rs keeps the payload in a buffer we
        // cannot take ownership of. Every connection shares this copy.
        let frame = Bytes::copy_from_slice(message.get_payload_bytes());
        match Envelope::decode(frame) {
            Ok(envelope) => {
                registry.dispatch(channel, BusItem::Envelope(SharedEnvelope::new(envelope)))
            }
            Err(error) => tracing::warn!(channel, %error, "dropping undecodable bus message"),
        }
    }
}

/// Applies subscription changes in order, one acknowledged command at a time, and
/// checks an idle connection with a heartbeat.
async fn execute(
    sink: &mut PubSubSink,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    heartbeat: &str,
) -> Ended {
    let mut beat = interval_at(Instant::now() + HEARTBEAT_EVERY, HEARTBEAT_EVERY);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let reply = tokio::select! {
            command = commands.recv() => match command {
                None => return Ended::Stopped,
                Some(Command::Subscribe(channel)) => {
                    timeout(REQUEST_TIMEOUT, sink.subscribe(&channel)).await
                }
                Some(Command::Unsubscribe(channel)) => {
                    timeout(REQUEST_TIMEOUT, sink.unsubscribe(&channel)).await
                }
                Some(Command::Barrier(done)) => {
                    let _ = done.send(());
                    continue;
                }
            },
            _ = beat.tick() => timeout(REQUEST_TIMEOUT, sink.unsubscribe(heartbeat)).await,
        };
        match reply {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "redis pub/sub command failed");
                return Ended::Lost;
            }
            Err(_) => {
                tracing::warn!("redis pub/sub command timed out");
                return Ended::Lost;
            }
        }
    }
}

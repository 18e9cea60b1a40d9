//! The fan-out fabric against a real Redis: two buses in one process stand for two
//! pods. Every test uses its own channel prefix, and waits on events with a deadline.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use comfyfleet::bus::{
    Bus, BusConfig, BusItem, ControlName, Envelope, EnvelopeKind, ResyncCause, Subscription, Topic,
};
use comfyfleet::domain::ids::{JobId, TenantId};
use comfyfleet::domain::patterns::PatternSet;
use comfyfleet::hub::{CLOSE_GOING_AWAY, CloseReason, Connection, Filter, Hub, Next, OutboxLimits};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::redis_url;

const DEADLINE: Duration = Duration::from_secs(10);

fn unique_prefix() -> String {
    format!("cft{}", uuid::Uuid::new_v4().simple())
}

/// A "pod": a bus plus the shutdown handle and task tracker its owner keeps.
struct Pod {
    bus: Bus,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Pod {
    async fn redis(url: &str, prefix: &str) -> Pod {
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let client = redis::Client::open(url).unwrap();
        let bus = Bus::redis(client, BusConfig::new(prefix), shutdown.clone(), &tasks)
            .await
            .unwrap_or_else(|e| panic!("tests need Redis at {url} (TEST_REDIS_URL): {e}"));
        Pod {
            bus,
            shutdown,
            tasks,
        }
    }

    /// Stops the background reader and waits for it, as a pod's shutdown would.
    async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        timeout(DEADLINE, self.tasks.wait())
            .await
            .expect("bus tasks stop on shutdown");
    }
}

async fn next(sub: &mut Subscription) -> BusItem {
    timeout(DEADLINE, sub.recv())
        .await
        .expect("an item before the deadline")
        .expect("bus still running")
}

async fn next_envelope(sub: &mut Subscription) -> comfyfleet::bus::SharedEnvelope {
    match next(sub).await {
        BusItem::Envelope(env) => env,
        other => panic!("expected an envelope, got {other:?}"),
    }
}

fn event(tenant: TenantId, id: u64, event_type: &str) -> Envelope {
    Envelope::event(
        tenant,
        Some(JobId::new()),
        id,
        event_type,
        Bytes::from(format!("{{\"id\":{id}}}")),
    )
    .unwrap()
}

/// A preview image that is not valid UTF-8 and contains every byte value.
fn image() -> Bytes {
    let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x00, 0x0A, 0x0D];
    bytes.extend((0..=255u8).cycle().take(100_000));
    Bytes::from(bytes)
}

async fn delivers_across_pods_and_isolates_tenants(publisher: &Bus, receiver: &Bus) {
    let (a, b) = (TenantId::new(), TenantId::new());
    let mut sub_a = receiver.subscribe(a).await;
    let mut sub_b = receiver.subscribe(b).await;

    let sent = event(a, 41, "job.completed");
    publisher.publish(&sent).await.unwrap();
    let got = next_envelope(&mut sub_a).await;
    assert_eq!(*got.envelope(), sent);
    assert_eq!(got.event_type(), Some("job.completed"));

    let job = JobId::new();
    let preview = Envelope::preview(a, job, 3, "9", "image/jpeg", image()).unwrap();
    publisher.publish(&preview).await.unwrap();
    let got = next_envelope(&mut sub_a).await;
    assert_eq!(got.kind, EnvelopeKind::Preview);
    assert_eq!(got.payload, image(), "preview bytes arrive byte-exact");
    assert_eq!(got.job, Some(job));
    assert_eq!(got.meta.get("mime"), Some("image/jpeg"));

    // B's subscriber sees B's envelope first, although A's were published before it:
    // none of A's ever reached it.
    let for_b = event(b, 1, "job.queued");
    publisher.publish(&for_b).await.unwrap();
    assert_eq!(*next_envelope(&mut sub_b).await.envelope(), for_b);
    assert!(sub_b.try_recv().is_none());
    assert!(sub_a.try_recv().is_none());
}

#[tokio::test]
async fn redis_two_pods_deliver_byte_exact_and_isolate_tenants() {
    let prefix = unique_prefix();
    let pod1 = Pod::redis(&redis_url(), &prefix).await;
    let pod2 = Pod::redis(&redis_url(), &prefix).await;
    delivers_across_pods_and_isolates_tenants(&pod1.bus, &pod2.bus).await;
    // And the other way round, including to a subscriber on the publishing pod.
    delivers_across_pods_and_isolates_tenants(&pod2.bus, &pod1.bus).await;
    delivers_across_pods_and_isolates_tenants(&pod1.bus, &pod1.bus).await;
    pod1.stop().await;
    pod2.stop().await;
}

#[tokio::test]
async fn in_process_bus_delivers_and_isolates_tenants() {
    let bus = Bus::in_process(BusConfig::new(unique_prefix()));
    delivers_across_pods_and_isolates_tenants(&bus, &bus).await;
    // Nothing left subscribed once the subscriptions are gone.
    assert_eq!(bus.subscribed_channels(), 0);
    let tenant = TenantId::new();
    let s1 = bus.subscribe(tenant).await;
    let s2 = bus.subscribe(tenant).await;
    assert_eq!(bus.subscribed_channels(), 1);
    drop(s1);
    assert_eq!(bus.subscribed_channels(), 1);
    drop(s2);
    assert_eq!(bus.subscribed_channels(), 0);
}

#[tokio::test]
async fn control_topics_are_separate_channels() {
    let prefix = unique_prefix();
    let pod1 = Pod::redis(&redis_url(), &prefix).await;
    let pod2 = Pod::redis(&redis_url(), &prefix).await;
    let wake = Topic::Control(ControlName::parse("workers:wake").unwrap());
    let tenant = TenantId::new();
    let mut tenant_sub = pod2.bus.subscribe(tenant).await;
    let mut wake_sub = pod2.bus.subscribe_topic(&wake).await;
    let ping = Envelope::new(tenant, EnvelopeKind::Control, Bytes::from_static(b"wake"));
    pod1.bus.publish_to(&wake, &ping).await.unwrap();
    assert_eq!(*next_envelope(&mut wake_sub).await.envelope(), ping);
    assert!(tenant_sub.try_recv().is_none());
    pod1.stop().await;
    pod2.stop().await;
}

/// Channels under `prefix` that Redis has subscribers for, asked from a separate
/// connection.
async fn redis_channels(url: &str, prefix: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    channels.sort();
    channels
}

/// Waits until Redis's view of subscribed channels under `prefix` equals `expected`.
async fn wait_for_channels(url: &str, prefix: &str, expected: &[String]) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let channels = redis_channels(url, prefix).await;
        if channels == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Redis channels {channels:?}, expected {expected:?}"
        );
        // Redis offers no notification for (un)subscribes of another connection,
        // so this one state check is polled.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn redis_channel_is_held_only_while_the_pod_has_subscribers() {
    let url = redis_url();
    let prefix = unique_prefix();
    let pod = Pod::redis(&url, &prefix).await;
    let tenant = TenantId::new();
    let channel = pod.bus.channel_name(&Topic::Tenant(tenant));

    let first = pod.bus.subscribe(tenant).await;
    // `subscribe` returns once Redis confirmed, so no waiting is needed here.
    assert_eq!(redis_channels(&url, &prefix).await, vec![channel.clone()]);
    let second = pod.bus.subscribe(tenant).await;
    drop(first);
    // Subscribing to another channel waits for every earlier command, so after it
    // the tenant channel would be gone if dropping `first` had unsubscribed it.
    let other = pod.bus.subscribe(TenantId::new()).await;
    let other_channel = other.channel().to_owned();
    let mut both = vec![channel.clone(), other_channel.clone()];
    both.sort();
    assert_eq!(redis_channels(&url, &prefix).await, both);
    assert_eq!(pod.bus.subscribed_channels(), 2);

    drop(second);
    assert_eq!(pod.bus.subscribed_channels(), 1);
    wait_for_channels(&url, &prefix, &[other_channel]).await;
    drop(other);
    wait_for_channels(&url, &prefix, &[]).await;

    // Resubscribing after the last drop works again.
    let mut again = pod.bus.subscribe(tenant).await;
    pod.bus
        .publish(&event(tenant, 5, "job.started"))
        .await
        .unwrap();
    assert_eq!(next_envelope(&mut again).await.id, 5);
    pod.stop().await;
}

#[tokio::test]
async fn shutdown_ends_subscriptions() {
    let pod = Pod::redis(&redis_url(), &unique_prefix()).await;
    let mut sub = pod.bus.subscribe(TenantId::new()).await;
    pod.shutdown.cancel();
    let end = timeout(DEADLINE, sub.recv())
        .await
        .expect("ends before deadline");
    assert!(end.is_none());
    pod.stop().await;
}

/// A redis-server of the test's own, so it can be killed and restarted.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: tokio::process::Child,
}

impl OwnRedis {
    async fn start_on(port: u16, dir: tempfile::TempDir) -> OwnRedis {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server must be installed for this test");
        let redis = OwnRedis { port, dir, child };
        redis.wait_ready().await;
        redis
    }

    async fn start() -> OwnRedis {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port, tempfile::tempdir().unwrap()).await
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn wait_ready(&self) {
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn kill(mut self) -> (u16, tempfile::TempDir) {
        self.child.kill().await.expect("kill redis-server");
        (self.port, self.dir)
    }
}

#[tokio::test]
async fn redis_restart_resubscribes_and_signals_resync() {
    let redis = OwnRedis::start().await;
    let url = redis.url();
    let prefix = unique_prefix();
    let publisher = Pod::redis(&url, &prefix).await;
    let receiver = Pod::redis(&url, &prefix).await;
    let tenant = TenantId::new();
    let mut sub = receiver.bus.subscribe(tenant).await;
    let hub = Hub::new(
        receiver.bus.clone(),
        OutboxLimits::default(),
        receiver.shutdown.clone(),
        &receiver.tasks,
    );
    let conn = hub.attach(tenant, Filter::all()).await;
    publisher
        .bus
        .publish(&event(tenant, 1, "job.queued"))
        .await
        .unwrap();
    assert_eq!(next_envelope(&mut sub).await.id, 1);
    assert_eq!(next_from(&conn).await.envelope().unwrap().id, 1);

    let (port, dir) = redis.kill().await;
    let redis = OwnRedis::start_on(port, dir).await;

    // The receiving pod reconnects by itself, resubscribes, and says what it missed.
    match timeout(Duration::from_secs(30), sub.recv()).await {
        Ok(Some(BusItem::Resync(ResyncCause::Reconnected))) => {}
        other => panic!("expected a Resync after the restart, got {other:?}"),
    }
    wait_for_channels(&url, &prefix, &[sub.channel().to_owned()]).await;

    // The publishing connection may report the broken connection once before it
    // reconnects; a real publisher retries or relies on the event log.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(error) = publisher
        .bus
        .publish(&event(tenant, 2, "job.started"))
        .await
    {
        assert!(
            Instant::now() < deadline,
            "publish never recovered: {error}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(next_envelope(&mut sub).await.id, 2);
    // A hub connection learns of the gap in order: replay, then live again.
    assert!(matches!(next_from(&conn).await, Next::Resync));
    assert_eq!(next_from(&conn).await.envelope().unwrap().id, 2);

    drop(conn);
    publisher.stop().await;
    receiver.stop().await;
    drop(redis);
}

async fn next_from(conn: &Connection) -> Next {
    timeout(DEADLINE, conn.next())
        .await
        .expect("a delivery before the deadline")
}

#[tokio::test]
async fn hub_fans_out_to_1000_connections_sharing_one_payload() {
    let url = redis_url();
    let prefix = unique_prefix();
    let publisher = Pod::redis(&url, &prefix).await;
    let pod = Pod::redis(&url, &prefix).await;
    let hub = Hub::new(
        pod.bus.clone(),
        OutboxLimits::default(),
        pod.shutdown.clone(),
        &pod.tasks,
    );
    let (tenant, other) = (TenantId::new(), TenantId::new());
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(hub.attach(tenant, Filter::all()).await);
    }
    let bystander = hub.attach(other, Filter::all()).await;
    assert_eq!(hub.connection_count(), 1001);
    // One Redis subscription per tenant, however many connections.
    assert_eq!(hub.tenant_count(), 2);
    assert_eq!(pod.bus.subscribed_channels(), 2);
    let channel = pod.bus.channel_name(&Topic::Tenant(tenant));
    let mut redis_conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (_, subscribers): (String, u64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&channel)
        .query_async(&mut redis_conn)
        .await
        .unwrap();
    assert_eq!(subscribers, 1);

    let job = JobId::new();
    let preview = Envelope::preview(tenant, job, 1, "9", "image/png", image()).unwrap();
    publisher.bus.publish(&preview).await.unwrap();
    publisher
        .bus
        .publish(&event(tenant, 77, "job.completed"))
        .await
        .unwrap();

    let mut preview_ptr = None;
    let mut event_ptr = None;
    for conn in &conns {
        let got = next_from(conn).await;
        let env = got.envelope().expect("the preview");
        assert_eq!(env.kind, EnvelopeKind::Preview);
        assert_eq!(env.payload.len(), image().len());
        // Every connection holds the very same bytes: one decode, no copies.
        assert_eq!(
            *preview_ptr.get_or_insert(env.payload.as_ptr()),
            env.payload.as_ptr()
        );
        let got = next_from(conn).await;
        let env = got.envelope().expect("the event");
        assert_eq!(env.id, 77);
        assert_eq!(
            *event_ptr.get_or_insert(env.payload.as_ptr()),
            env.payload.as_ptr()
        );
        assert!(conn.try_next().is_none());
        assert_eq!(conn.last_event_id(), Some(77));
    }
    assert!(bystander.try_next().is_none(), "another tenant saw nothing");

    // The last connection of a tenant leaving releases its channel on Redis.
    conns.truncate(1);
    assert_eq!(hub.tenant_count(), 2);
    drop(conns);
    assert_eq!(hub.tenant_count(), 1);
    let bystander_channel = pod.bus.channel_name(&Topic::Tenant(other));
    wait_for_channels(&url, &prefix, &[bystander_channel]).await;
    drop(bystander);
    wait_for_channels(&url, &prefix, &[]).await;

    publisher.stop().await;
    pod.stop().await;
}

#[tokio::test]
async fn hub_filters_by_event_pattern() {
    let bus = Bus::in_process(BusConfig::new(unique_prefix()));
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let hub = Hub::new(
        bus.clone(),
        OutboxLimits::default(),
        shutdown.clone(),
        &tasks,
    );
    let tenant = TenantId::new();
    let patterns = PatternSet::parse_all(["job.completed", "model.*"]).unwrap();
    let conn = hub
        .attach(
            tenant,
            Filter::new(move |env| {
                env.kind == EnvelopeKind::Event
                    && env.event_type().is_some_and(|t| patterns.matches(t))
            }),
        )
        .await;
    let everything = hub.attach(tenant, Filter::all()).await;
    for (id, ty) in [(1, "job.started"), (2, "job.completed"), (3, "model.ready")] {
        bus.publish(&event(tenant, id, ty)).await.unwrap();
    }
    let progress = Envelope::new(tenant, EnvelopeKind::Progress, Bytes::from_static(b"{}"));
    bus.publish(&progress).await.unwrap();
    assert_eq!(next_from(&conn).await.envelope().unwrap().id, 2);
    assert_eq!(next_from(&conn).await.envelope().unwrap().id, 3);
    for id in [1, 2, 3] {
        assert_eq!(next_from(&everything).await.envelope().unwrap().id, id);
    }
    assert_eq!(
        next_from(&everything).await.envelope().unwrap().kind,
        EnvelopeKind::Progress
    );

    conn.set_filter(Filter::all());
    bus.publish(&event(tenant, 4, "job.started")).await.unwrap();
    assert_eq!(next_from(&conn).await.envelope().unwrap().id, 4);
    assert!(conn.try_next().is_none());

    // Shutting the hub down closes its connections with "going away".
    shutdown.cancel();
    match next_from(&conn).await {
        Next::Close(reason) => {
            assert_eq!(reason, CloseReason::ShuttingDown);
            assert_eq!(reason.code(), CLOSE_GOING_AWAY);
        }
        other => panic!("expected Close, got {other:?}"),
    }
    tasks.close();
    timeout(DEADLINE, tasks.wait()).await.expect("pumps stop");
    drop((conn, everything));
    assert_eq!(bus.subscribed_channels(), 0);
}

//! The systems under test, behind one interface: how a client subscribes and how a
//! message is published.
//!
//! - **comfyfleet**: clients speak the cloud dialect (`WS /developer/api/v1/ws`,
//!   `subscribe {events:["job.*"]}`) or watch a job on the session stream
//!   (`WS /api/run/ws?prompt_id=`); messages are published the way workers and API
//!   pods publish them, through a [`Publisher`] over Redis on the tenant's channel.
//! - **nchan**: clients are WebSocket subscribers of `{nchan}/sub/{channel}`;
//!   messages are HTTP `POST`s to `{nchan}/pub/{channel}`.
//!
//! Every message carries the probe (`"seq"`, `"t_us"`: publish time in µs) in its
//! body, so latency is measured from the publisher's clock to the client's receive.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::bus::now_micros;
use crate::domain::ids::{JobId, TenantId};
use crate::publish::Publisher;
use crate::store::events::StoredEvent;

pub type ClientSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long one client may take to connect and subscribe.
const SUBSCRIBE_DEADLINE: Duration = Duration::from_secs(60);

/// The event type fan-out messages are published as; `job.*` matches it.
pub const EVENT_TYPE: &str = "job.bench";

pub enum Target {
    Comfyfleet(Comfyfleet),
    Nchan(Nchan),
}

pub struct Comfyfleet {
    /// `ws://host:port`.
    pub ws_base: String,
    pub api_key: String,
    pub tenant: TenantId,
    pub publisher: Publisher,
}

pub struct Nchan {
    /// `http://host:port`; subscribers use `ws://host:port/sub/…`.
    pub base: url::Url,
    pub http: reqwest::Client,
    /// Prefixes this run's channel names, so messages buffered by an earlier run
    /// on the same nginx are never delivered to this one.
    pub run: String,
}

/// Which stream a client joins.
#[derive(Clone, Copy, Debug)]
pub enum Stream {
    /// The tenant's events (fan-out): every client gets every message.
    Events,
    /// One job's previews.
    Previews(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("the server closed the socket before the subscription was confirmed")]
    Closed,
    #[error("no subscription confirmation within {SUBSCRIBE_DEADLINE:?}")]
    Timeout,
    #[error("publish: {0}")]
    Publish(String),
}

/// Client sockets keep a small read buffer: tungstenite's default is 128 KiB, and
/// the load generator holds up to 10,000 of them.
pub fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

impl Target {
    pub fn name(&self) -> &'static str {
        match self {
            Target::Comfyfleet(_) => "comfyfleet",
            Target::Nchan(_) => "nchan",
        }
    }

    /// Opens a WebSocket and subscribes; returns once the server confirmed (cloud
    /// dialect) or the socket is open (session stream, nchan).
    pub async fn subscribe(
        &self,
        stream: Stream,
        jobs: &[JobId],
    ) -> Result<ClientSocket, ClientError> {
        tokio::time::timeout(SUBSCRIBE_DEADLINE, self.subscribe_now(stream, jobs))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    async fn subscribe_now(
        &self,
        stream: Stream,
        jobs: &[JobId],
    ) -> Result<ClientSocket, ClientError> {
        let url = match (self, stream) {
            (Target::Comfyfleet(cf), Stream::Events) => {
                format!("{}/developer/api/v1/ws?api_key={}", cf.ws_base, cf.api_key)
            }
            (Target::Comfyfleet(cf), Stream::Previews(j)) => format!(
                "{}/api/run/ws?api_key={}&prompt_id={}",
                cf.ws_base, cf.api_key, jobs[j]
            ),
            (Target::Nchan(n), stream) => {
                let mut ws = n.base.clone();
                let _ = ws.set_scheme("ws");
                ws.set_path(&format!("/sub/{}", n.channel(stream)));
                ws.to_string()
            }
        };
        let (mut socket, _) =
            tokio_tungstenite::connect_async_with_config(url, Some(client_config()), true).await?;
        if let (Target::Comfyfleet(_), Stream::Events) = (self, stream) {
            wait_for(&mut socket, "\"connected\"").await?;
            let subscribe = json!({"type": "subscribe", "data": {"events": ["job.*"]}});
            socket.send(Message::text(subscribe.to_string())).await?;
            wait_for(&mut socket, "\"subscribed\"").await?;
        }
        Ok(socket)
    }

    /// Publishes fan-out message `seq` with `pad` bytes of padding.
    pub async fn publish_event(&self, seq: u64, pad: &str) -> Result<(), ClientError> {
        match self {
            Target::Comfyfleet(cf) => {
                let event = StoredEvent {
                    id: i64::try_from(seq + 1).unwrap_or(i64::MAX),
                    tenant_id: cf.tenant,
                    kind: EVENT_TYPE.to_owned(),
                    severity: "info".to_owned(),
                    message: String::new(),
                    data: json!({"seq": seq, "t_us": now_micros(), "pad": pad}),
                    job_id: None,
                    created_at: chrono::Utc::now(),
                    prev_id: None,
                };
                cf.publisher.events(std::slice::from_ref(&event)).await;
                Ok(())
            }
            Target::Nchan(n) => {
                let body = format!(r#"{{"seq":{seq},"t_us":{},"pad":"{pad}"}}"#, now_micros());
                n.publish(&n.channel(Stream::Events), body.into_bytes())
                    .await
            }
        }
    }

    /// Publishes preview frame `seq` of job `j`: `size` bytes that start with the
    /// probe as ASCII (`{"seq":…,"t_us":…}`), so either transport's client reads it.
    pub async fn publish_preview(
        &self,
        jobs: &[JobId],
        j: usize,
        seq: u64,
        size: usize,
    ) -> Result<(), ClientError> {
        let mut body = format!(r#"{{"seq":{seq},"t_us":{}}}"#, now_micros()).into_bytes();
        body.resize(size.max(body.len()), b'x');
        match self {
            Target::Comfyfleet(cf) => {
                cf.publisher
                    .preview(
                        cf.tenant,
                        jobs[j],
                        seq,
                        "3",
                        "image/jpeg",
                        Bytes::from(body),
                    )
                    .await;
                Ok(())
            }
            Target::Nchan(n) => n.publish(&n.channel(Stream::Previews(j)), body).await,
        }
    }

    /// Padding that makes a fan-out message `size` bytes as the client receives it
    /// (comfyfleet wraps the payload in the cloud dialect's event envelope).
    pub fn pad_for(&self, size: usize) -> String {
        let probe = r#"{"seq":1000000,"t_us":1764620000000000,"pad":""}"#.len();
        let envelope = match self {
            // {"type":"event","id":"evt_1000001","timestamp":"2026-12-01T20:21:17.123Z",
            //  "data":{"event":"job.bench","payload":…}}
            Target::Comfyfleet(_) => 108,
            Target::Nchan(_) => 0,
        };
        "x".repeat(size.saturating_sub(probe + envelope))
    }
}

impl Nchan {
    fn channel(&self, stream: Stream) -> String {
        match stream {
            Stream::Events => format!("{}events", self.run),
            Stream::Previews(j) => format!("{}job{j}", self.run),
        }
    }

    async fn publish(&self, channel: &str, body: Vec<u8>) -> Result<(), ClientError> {
        let mut url = self.base.clone();
        url.set_path(&format!("/pub/{channel}"));
        let resp = self
            .http
            .post(url)
            .body(body)
            .send()
            .await
            .map_err(|e| ClientError::Publish(e.to_string()))?;
        let status = resp.status();
        // Drain the body so the keep-alive connection is reused.
        let _ = resp.bytes().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(ClientError::Publish(format!("nchan answered {status}")))
        }
    }
}

async fn wait_for(socket: &mut ClientSocket, marker: &str) -> Result<(), ClientError> {
    while let Some(msg) = socket.next().await {
        match msg? {
            Message::Text(t) if t.as_str().contains(marker) => return Ok(()),
            Message::Close(_) => return Err(ClientError::Closed),
            _ => {}
        }
    }
    Err(ClientError::Closed)
}

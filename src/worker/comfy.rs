//! The worker's ComfyUI client: HTTP (reqwest) and the WebSocket (tokio-tungstenite),
//! with ComfyUI's messages parsed into [`ComfyMessage`]. The framing follows the
//! recorded traces in `fixtures/comfyui` (PEERS.md §1).

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use url::Url;

/// Binary frame event types (ComfyUI `BinaryEventTypes`).
const PREVIEW_IMAGE: u32 = 1;
const PREVIEW_IMAGE_WITH_METADATA: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum ComfyError {
    #[error("ComfyUI is unreachable at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("ComfyUI answered {status} to {what}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("ComfyUI sent something unexpected for {what}: {detail}")]
    Protocol { what: String, detail: String },
    #[error("ComfyUI WebSocket: {0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("invalid ComfyUI URL: {0}")]
    BadUrl(String),
}

/// What `POST /prompt` said.
#[derive(Debug)]
pub enum Queued {
    Accepted {
        number: f64,
    },
    /// ComfyUI's 400 body (`error`, `node_errors`).
    Rejected(Value),
}

/// A message from ComfyUI's WebSocket.
#[derive(Debug, Clone, PartialEq)]
pub enum ComfyMessage {
    Status {
        queue_remaining: u64,
    },
    ExecutionStart {
        prompt_id: String,
    },
    ExecutionCached {
        prompt_id: String,
        nodes: Vec<String>,
    },
    /// `node: None` is the end-of-prompt marker. `prompt_id` is absent in the
    /// frame ComfyUI re-sends to a reconnecting client.
    Executing {
        prompt_id: Option<String>,
        node: Option<String>,
    },
    Progress {
        prompt_id: Option<String>,
        node: Option<String>,
        value: u64,
        max: u64,
    },
    Executed {
        prompt_id: String,
        node: String,
        output: Value,
    },
    Success {
        prompt_id: String,
    },
    Error {
        prompt_id: String,
        node_id: Option<String>,
        node_type: Option<String>,
        exception_type: String,
        exception_message: String,
    },
    Interrupted {
        prompt_id: String,
        node_id: Option<String>,
        node_type: Option<String>,
    },
    /// A preview frame; `prompt_id` and `node_id` come with the metadata variant.
    Preview {
        image: Bytes,
        mime: &'static str,
        prompt_id: Option<String>,
        node_id: Option<String>,
    },
    /// Anything else (`progress_state`, `feature_flags`, custom messages).
    Other,
}

fn str_field(data: &Value, key: &str) -> Option<String> {
    data.get(key).and_then(Value::as_str).map(String::from)
}

/// Parses a text frame. Unknown or malformed frames are `Other`: ComfyUI and its
/// custom nodes send many message types a worker need not understand.
pub fn parse_text(text: &str) -> ComfyMessage {
    let Ok(frame) = serde_json::from_str::<Value>(text) else {
        return ComfyMessage::Other;
    };
    let data = &frame["data"];
    let prompt = || str_field(data, "prompt_id");
    match frame["type"].as_str().unwrap_or_default() {
        "status" => ComfyMessage::Status {
            queue_remaining: data["status"]["exec_info"]["queue_remaining"]
                .as_u64()
                .unwrap_or(0),
        },
        "execution_start" => match prompt() {
            Some(prompt_id) => ComfyMessage::ExecutionStart { prompt_id },
            None => ComfyMessage::Other,
        },
        "execution_cached" => match prompt() {
            Some(prompt_id) => ComfyMessage::ExecutionCached {
                prompt_id,
                nodes: data["nodes"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|n| n.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            None => ComfyMessage::Other,
        },
        "executing" => ComfyMessage::Executing {
            prompt_id: prompt(),
            node: str_field(data, "node"),
        },
        "progress" => ComfyMessage::Progress {
            prompt_id: prompt(),
            node: str_field(data, "node"),
            value: data["value"].as_f64().unwrap_or(0.0).max(0.0) as u64,
            max: data["max"].as_f64().unwrap_or(0.0).max(0.0) as u64,
        },
        "executed" => match (prompt(), str_field(data, "node")) {
            (Some(prompt_id), Some(node)) => ComfyMessage::Executed {
                prompt_id,
                node,
                output: data["output"].clone(),
            },
            _ => ComfyMessage::Other,
        },
        "execution_success" => match prompt() {
            Some(prompt_id) => ComfyMessage::Success { prompt_id },
            None => ComfyMessage::Other,
        },
        "execution_error" => match prompt() {
            Some(prompt_id) => ComfyMessage::Error {
                prompt_id,
                node_id: str_field(data, "node_id"),
                node_type: str_field(data, "node_type"),
                exception_type: str_field(data, "exception_type")
                    .unwrap_or_else(|| "Exception".into()),
                exception_message: str_field(data, "exception_message").unwrap_or_default(),
            },
            None => ComfyMessage::Other,
        },
        "execution_interrupted" => match prompt() {
            Some(prompt_id) => ComfyMessage::Interrupted {
                prompt_id,
                node_id: str_field(data, "node_id"),
                node_type: str_field(data, "node_type"),
            },
            None => ComfyMessage::Other,
        },
        _ => ComfyMessage::Other,
    }
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Parses a binary frame: `u32 BE event type` + payload. Returns `Other` for event
/// types that are not previews and `None` for frames too short to be ComfyUI's.
pub fn parse_binary(frame: Bytes) -> Option<ComfyMessage> {
    match be_u32(&frame, 0)? {
        PREVIEW_IMAGE => {
            let mime = match be_u32(&frame, 4)? {
                2 => "image/png",
                _ => "image/jpeg",
            };
            Some(ComfyMessage::Preview {
                image: frame.slice(8..),
                mime,
                prompt_id: None,
                node_id: None,
            })
        }
        PREVIEW_IMAGE_WITH_METADATA => {
            let len = be_u32(&frame, 4)? as usize;
            let meta_end = 8usize.checked_add(len)?;
            let meta: Value = serde_json::from_slice(frame.get(8..meta_end)?).ok()?;
            let mime = match meta["image_type"].as_str() {
                Some("image/png") => "image/png",
                _ => "image/jpeg",
            };
            Some(ComfyMessage::Preview {
                image: frame.slice(meta_end..),
                mime,
                prompt_id: str_field(&meta, "prompt_id"),
                node_id: str_field(&meta, "node_id"),
            })
        }
        _ => Some(ComfyMessage::Other),
    }
}

/// One ComfyUI server, over HTTP.
#[derive(Clone, Debug)]
pub struct ComfyClient {
    http: reqwest::Client,
    base: Url,
}

impl ComfyClient {
    pub fn new(base: &str) -> Result<Self, ComfyError> {
        let base = Url::parse(base.trim_end_matches('/'))
            .map_err(|e| ComfyError::BadUrl(format!("{base:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ComfyError::BadUrl(format!(
                "{base}: expected http:// or https://"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ComfyError::BadUrl(e.to_string()))?;
        Ok(Self { http, base })
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base.as_str().trim_end_matches('/'))
    }

    async fn send(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ComfyError> {
        req.send().await.map_err(|source| ComfyError::Unreachable {
            url: format!("{} ({what})", self.base),
            source,
        })
    }

    async fn json(&self, what: &str, path: &str) -> Result<Value, ComfyError> {
        let resp = self.send(what, self.http.get(self.url(path))).await?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|source| ComfyError::Unreachable {
                url: self.base.to_string(),
                source,
            })?;
        if !status.is_success() {
            return Err(ComfyError::Status {
                what: what.into(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).chars().take(300).collect(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| ComfyError::Protocol {
            what: what.into(),
            detail: e.to_string(),
        })
    }

    /// `GET /system_stats` → the ComfyUI version.
    pub async fn version(&self) -> Result<Option<String>, ComfyError> {
        let stats = self.json("system stats", "/system_stats").await?;
        Ok(str_field(&stats["system"], "comfyui_version"))
    }

    /// `GET /object_info` → node class names and their schemas.
    pub async fn object_info(&self) -> Result<Map<String, Value>, ComfyError> {
        match self.json("object_info", "/object_info").await? {
            Value::Object(map) => Ok(map),
            _ => Err(ComfyError::Protocol {
                what: "object_info".into(),
                detail: "not a JSON object".into(),
            }),
        }
    }

    /// Every model file ComfyUI lists, across its model folders.
    pub async fn models(&self) -> Result<Vec<String>, ComfyError> {
        let folders = self.json("model folders", "/models").await?;
        let mut models = Vec::new();
        for folder in folders
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if let Ok(Value::Array(names)) = self.json("models", &format!("/models/{folder}")).await
            {
                models.extend(
                    names
                        .into_iter()
                        .filter_map(|n| n.as_str().map(String::from)),
                );
            }
        }
        models.sort();
        models.dedup();
        Ok(models)
    }

    /// `POST /upload/image` with `overwrite=true`: the job's input under its own name.
    pub async fn upload_image(&self, name: &str, bytes: Bytes) -> Result<(), ComfyError> {
        let part = reqwest::multipart::Part::stream(bytes).file_name(name.to_string());
        let form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("overwrite", "true")
            .text("type", "input");
        let resp = self
            .send(
                "upload",
                self.http.post(self.url("/upload/image")).multipart(form),
            )
            .await?;
        if !resp.status().is_success() {
            return Err(ComfyError::Status {
                what: "upload".into(),
                status: resp.status().as_u16(),
                body: resp.text().await.unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// `POST /prompt` with our job id as `prompt_id`.
    pub async fn queue_prompt(
        &self,
        prompt_id: &str,
        client_id: &str,
        graph: &Value,
        extra_data: &Value,
    ) -> Result<Queued, ComfyError> {
        let mut extra = extra_data.as_object().cloned().unwrap_or_default();
        extra.insert("client_id".into(), json!(client_id));
        let body = json!({
            "prompt": graph,
            "client_id": client_id,
            "prompt_id": prompt_id,
            "extra_data": extra,
        });
        let resp = self
            .send(
                "queue prompt",
                self.http.post(self.url("/prompt")).json(&body),
            )
            .await?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        match (status.as_u16(), parsed) {
            (200, Some(v)) => Ok(Queued::Accepted {
                number: v["number"].as_f64().unwrap_or(0.0),
            }),
            (400, Some(v)) => Ok(Queued::Rejected(v)),
            (code, _) => Err(ComfyError::Status {
                what: "queue prompt".into(),
                status: code,
                body: text.chars().take(300).collect(),
            }),
        }
    }

    /// `GET /history/{prompt_id}`: the prompt's entry, if ComfyUI has it.
    pub async fn history(&self, prompt_id: &str) -> Result<Option<Value>, ComfyError> {
        let all = self
            .json("history", &format!("/history/{prompt_id}"))
            .await?;
        Ok(all.get(prompt_id).cloned())
    }

    /// `GET /queue`: whether ComfyUI still has the prompt running or pending.
    pub async fn has_prompt(&self, prompt_id: &str) -> Result<bool, ComfyError> {
        let queue = self.json("queue", "/queue").await?;
        let listed = |key: &str| {
            queue[key]
                .as_array()
                .into_iter()
                .flatten()
                .any(|item| item.get(1).and_then(Value::as_str) == Some(prompt_id))
        };
        Ok(listed("queue_running") || listed("queue_pending"))
    }

    /// `GET /view`: an output file's bytes.
    pub async fn view(
        &self,
        filename: &str,
        subfolder: &str,
        kind: &str,
    ) -> Result<Bytes, ComfyError> {
        let req = self.http.get(self.url("/view")).query(&[
            ("filename", filename),
            ("subfolder", subfolder),
            ("type", kind),
        ]);
        let resp = self.send("view", req).await?;
        if !resp.status().is_success() {
            return Err(ComfyError::Status {
                what: format!("view {filename}"),
                status: resp.status().as_u16(),
                body: String::new(),
            });
        }
        resp.bytes()
            .await
            .map_err(|source| ComfyError::Unreachable {
                url: self.base.to_string(),
                source,
            })
    }

    /// Stops `prompt_id` whether it runs or waits: `/interrupt` for the running one,
    /// a queue delete for a pending one.
    pub async fn stop(&self, prompt_id: &str) -> Result<(), ComfyError> {
        self.send(
            "interrupt",
            self.http
                .post(self.url("/interrupt"))
                .json(&json!({"prompt_id": prompt_id})),
        )
        .await?;
        self.send(
            "queue delete",
            self.http
                .post(self.url("/queue"))
                .json(&json!({"delete": [prompt_id]})),
        )
        .await?;
        Ok(())
    }

    /// Opens `/ws?clientId=` and negotiates preview metadata, so every preview says
    /// which prompt it belongs to. Connect before queueing: ComfyUI drops frames
    /// for a client with no socket.
    pub async fn connect(&self, client_id: &str) -> Result<ComfySocket, ComfyError> {
        let mut ws_url = self.base.clone();
        let scheme = if self.base.scheme() == "https" {
            "wss"
        } else {
            "ws"
        };
        ws_url
            .set_scheme(scheme)
            .map_err(|_| ComfyError::BadUrl(self.base.to_string()))?;
        ws_url.set_path("/ws");
        ws_url.set_query(Some(&format!("clientId={client_id}")));
        let (mut stream, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(ws_url.as_str()),
        )
        .await
        .map_err(|_| ComfyError::Protocol {
            what: "websocket".into(),
            detail: "connect timed out".into(),
        })??;
        let flags = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}});
        stream.send(Message::text(flags.to_string())).await?;
        Ok(ComfySocket { stream })
    }
}

/// ComfyUI's WebSocket for one client id.
pub struct ComfySocket {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// ComfyUI's in-flight message types that the ComfyUI dialect of the API relays to
/// its clients as ComfyUI wrote them (the lifecycle ones it renders from job events).
pub const RELAYED_TYPES: [&str; 4] = [
    "execution_cached",
    "executing",
    "progress",
    "progress_state",
];

/// A message and, for a relayed type, the frame as received.
pub struct Received {
    pub message: ComfyMessage,
    pub relay: Option<RelayFrame>,
}

/// A text frame to pass on unchanged to the prompt's ComfyUI-dialect clients.
pub struct RelayFrame {
    /// One of [`RELAYED_TYPES`].
    pub kind: &'static str,
    pub prompt_id: Option<String>,
    /// `executing` with `node: null` (the end marker) is not relayed: the API sends
    /// its own once the outputs are stored.
    pub is_end_marker: bool,
    pub text: Bytes,
}

impl RelayFrame {
    fn of(text: &str) -> Option<Self> {
        let frame: Value = serde_json::from_str(text).ok()?;
        let kind = RELAYED_TYPES
            .into_iter()
            .find(|t| frame["type"].as_str() == Some(t))?;
        Some(Self {
            kind,
            prompt_id: frame["data"]["prompt_id"].as_str().map(str::to_owned),
            is_end_marker: kind == "executing" && frame["data"]["node"].is_null(),
            text: Bytes::copy_from_slice(text.as_bytes()),
        })
    }
}

impl ComfySocket {
    /// Reads and drops whatever arrived while no job was running (queue `status`
    /// broadcasts). Returns false if the socket has closed meanwhile.
    pub fn discard_pending(&mut self) -> bool {
        use futures_util::FutureExt;
        loop {
            match self.stream.next().now_or_never() {
                None => return true,
                Some(Some(Ok(Message::Close(_)))) | Some(Some(Err(_))) | Some(None) => {
                    return false;
                }
                Some(Some(Ok(_))) => {}
            }
        }
    }

    /// The next message; `None` when the socket closed.
    pub async fn next(&mut self) -> Option<Result<ComfyMessage, ComfyError>> {
        self.next_received()
            .await
            .map(|r| r.map(|received| received.message))
    }

    /// The next message with, for the relayed types, its original frame.
    pub async fn next_received(&mut self) -> Option<Result<Received, ComfyError>> {
        loop {
            let frame = match self.stream.next().await? {
                Ok(f) => f,
                Err(e) => return Some(Err(e.into())),
            };
            match frame {
                Message::Text(text) => {
                    return Some(Ok(Received {
                        message: parse_text(text.as_str()),
                        relay: RelayFrame::of(text.as_str()),
                    }));
                }
                Message::Binary(bytes) => {
                    if let Some(message) = parse_binary(bytes) {
                        return Some(Ok(Received {
                            message,
                            relay: None,
                        }));
                    }
                }
                Message::Close(_) => return None,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_recorded_message_shapes() {
        let m = parse_text(
            r#"{"type": "executing", "data": {"node": "3", "display_node": "3", "prompt_id": "p"}}"#,
        );
        assert_eq!(
            m,
            ComfyMessage::Executing {
                prompt_id: Some("p".into()),
                node: Some("3".into())
            }
        );
        let end = parse_text(r#"{"type": "executing", "data": {"node": null, "prompt_id": "p"}}"#);
        assert_eq!(
            end,
            ComfyMessage::Executing {
                prompt_id: Some("p".into()),
                node: None
            }
        );
        let p = parse_text(
            r#"{"type": "progress", "data": {"value": 2, "max": 20, "prompt_id": "p", "node": "3"}}"#,
        );
        assert_eq!(
            p,
            ComfyMessage::Progress {
                prompt_id: Some("p".into()),
                node: Some("3".into()),
                value: 2,
                max: 20
            }
        );
        let e = parse_text(
            r#"{"type": "execution_error", "data": {"prompt_id": "p", "node_id": "3", "node_type": "SaveImage", "exception_type": "Exception", "exception_message": "boom"}}"#,
        );
        assert!(
            matches!(e, ComfyMessage::Error { ref exception_message, .. } if exception_message == "boom")
        );
        assert_eq!(parse_text("not json"), ComfyMessage::Other);
        assert_eq!(
            parse_text(r#"{"type": "progress_state", "data": {}}"#),
            ComfyMessage::Other
        );
    }

    #[test]
    fn parses_both_preview_framings() {
        let mut legacy = vec![0, 0, 0, 1, 0, 0, 0, 1];
        legacy.extend_from_slice(&[0xff, 0xd8, 0xff]);
        match parse_binary(Bytes::from(legacy)).unwrap() {
            ComfyMessage::Preview {
                image,
                mime,
                prompt_id,
                ..
            } => {
                assert_eq!(&image[..], &[0xff, 0xd8, 0xff]);
                assert_eq!(mime, "image/jpeg");
                assert!(prompt_id.is_none());
            }
            other => panic!("{other:?}"),
        }
        let meta = br#"{"node_id": "3", "prompt_id": "p", "image_type": "image/png"}"#;
        let mut framed = vec![0, 0, 0, 4];
        framed.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        framed.extend_from_slice(meta);
        framed.extend_from_slice(b"\x89PNG");
        match parse_binary(Bytes::from(framed)).unwrap() {
            ComfyMessage::Preview {
                image,
                mime,
                prompt_id,
                node_id,
            } => {
                assert_eq!(&image[..], b"\x89PNG");
                assert_eq!(mime, "image/png");
                assert_eq!(prompt_id.as_deref(), Some("p"));
                assert_eq!(node_id.as_deref(), Some("3"));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_binary(Bytes::from_static(&[0, 0])).is_none());
        assert!(parse_binary(Bytes::from_static(&[0, 0, 0, 4, 0, 0, 1, 0, b'{'])).is_none());
    }
}

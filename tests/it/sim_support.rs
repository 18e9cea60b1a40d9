//! Helpers for the sim tests: a recorded-trace replayer that drives a sim the way
//! the capture client drove the real ComfyUI, and the structural comparison of
//! what came back (message types, field sets, JSON types, binary framing).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/comfyui")
}

pub fn load_trace(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixture_dir().join(name)).expect("fixture readable");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("fixture line is JSON"))
        .collect()
}

/// A frame as compared: text frames by type and shape, binary frames by framing.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Text { kind: String, shape: Value },
    Binary { event: u32, detail: Value },
}

/// The JSON "shape": same keys, JSON types, array lengths (except tracebacks,
/// whose frames are the server's own source lines). Numbers are compared as numbers.
pub fn shape(v: &Value, key: &str) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v, k))).collect())
        }
        // Tracebacks and argv are the server's own source lines and command line.
        Value::Array(_) if key == "traceback" || key == "argv" => json!("array"),
        Value::Array(a) => Value::Array(a.iter().map(|e| shape(e, "")).collect()),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!("null"),
    }
}

fn magic(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(&[0xff, 0xd8]) {
        "jpeg"
    } else if bytes.starts_with(&[0x89, b'P', b'N', b'G']) {
        "png"
    } else {
        "other"
    }
}

/// Parses a binary frame the way a ComfyUI client does.
pub fn binary_frame(b: &[u8]) -> (Frame, Vec<u8>) {
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let event = be(0);
    match event {
        1 => {
            let image = b[8..].to_vec();
            (
                Frame::Binary {
                    event,
                    detail: json!({"image_type": be(4), "magic": magic(&image)}),
                },
                image,
            )
        }
        4 => {
            let len = be(4) as usize;
            let meta: Value = serde_json::from_slice(&b[8..8 + len]).expect("metadata JSON");
            let image = b[8 + len..].to_vec();
            let detail = json!({"meta": shape(&meta, ""), "image_type": meta["image_type"], "magic": magic(&image)});
            (Frame::Binary { event, detail }, image)
        }
        _ => (
            Frame::Binary {
                event,
                detail: json!(null),
            },
            b[4..].to_vec(),
        ),
    }
}

pub fn expected_frame(line: &Value) -> Frame {
    if line["kind"] == "ws-text" {
        let j = &line["json"];
        return Frame::Text {
            kind: j["type"].as_str().unwrap_or("").to_owned(),
            shape: shape(&j["data"], ""),
        };
    }
    let event = line["event_type"].as_u64().unwrap_or(0) as u32;
    let kind = |hex: &str| {
        if hex.starts_with("ffd8") {
            "jpeg"
        } else if hex.starts_with("89504e47") {
            "png"
        } else {
            "other"
        }
    };
    let m = kind(line["image_magic_hex"].as_str().unwrap_or(""));
    let detail = match event {
        1 => json!({"image_type": line["image_type"], "magic": m}),
        4 => {
            json!({"meta": shape(&line["metadata"], ""), "image_type": line["metadata"]["image_type"], "magic": m})
        }
        _ => json!(null),
    };
    Frame::Binary { event, detail }
}

/// Everything a socket received, with a notification per frame.
#[derive(Default)]
pub struct Inbox {
    pub frames: Mutex<Vec<(Frame, Value, Vec<u8>)>>,
    pub arrived: Notify,
    /// Set when the server ended the connection.
    pub closed: std::sync::atomic::AtomicBool,
}

impl Inbox {
    pub async fn wait_closed(&self, what: &str) {
        let ok = tokio::time::timeout(DEADLINE, async {
            loop {
                let notified = self.arrived.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                notified.await;
            }
        })
        .await;
        assert!(ok.is_ok(), "{what}: socket still open");
    }

    pub async fn wait_for(&self, count: usize, what: &str) {
        self.wait_for_matching(count, what, |_| true).await;
    }

    /// Waits until `count` frames that `counts` accepts have arrived.
    pub async fn wait_for_matching(
        &self,
        count: usize,
        what: &str,
        counts: impl Fn(&Frame) -> bool,
    ) {
        let ok = tokio::time::timeout(DEADLINE, async {
            loop {
                let notified = self.arrived.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self
                    .frames
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(f, _, _)| counts(f))
                    .count()
                    >= count
                {
                    return;
                }
                notified.await;
            }
        })
        .await;
        assert!(
            ok.is_ok(),
            "{what}: waited for {count} frames, got {:?}",
            self.kinds()
        );
    }

    pub fn kinds(&self) -> Vec<String> {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .map(|(f, _, _)| match f {
                Frame::Text { kind, .. } => kind.clone(),
                Frame::Binary { event, .. } => format!("binary{event}"),
            })
            .collect()
    }

    /// Waits for the first text frame `pred` accepts.
    pub async fn wait_text(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let found = tokio::time::timeout(DEADLINE, async {
            loop {
                let notified = self.arrived.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let hit = self
                    .frames
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(f, v, _)| matches!(f, Frame::Text { .. }) && pred(v))
                    .map(|(_, v, _)| v.clone());
                if let Some(v) = hit {
                    return v;
                }
                notified.await;
            }
        })
        .await;
        match found {
            Ok(v) => v,
            Err(_) => panic!("{what}: not seen; got {:?}", self.kinds()),
        }
    }

    /// Waits until the prompt's end marker (`executing` with `node: null`).
    pub async fn wait_done(&self, prompt_id: &str) -> Value {
        self.wait_text("end of prompt", |v| {
            v["type"] == "executing"
                && v["data"]["node"].is_null()
                && v["data"]["prompt_id"] == prompt_id
        })
        .await
    }

    pub fn texts(&self, kind: &str) -> Vec<Value> {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, v, _)| v["type"] == kind)
            .map(|(_, v, _)| v.clone())
            .collect()
    }

    pub fn binaries(&self) -> Vec<(Frame, Vec<u8>)> {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|(f, _, _)| matches!(f, Frame::Binary { .. }))
            .map(|(f, _, i)| (f.clone(), i.clone()))
            .collect()
    }
}

/// POSTs JSON to the sim and returns (status, JSON body).
pub async fn post_json(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .expect("http");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

pub async fn get_bytes(base: &str, path: &str) -> (u16, Vec<u8>) {
    let resp = reqwest::get(format!("{base}{path}")).await.expect("http");
    (
        resp.status().as_u16(),
        resp.bytes().await.expect("body").to_vec(),
    )
}

pub type WsSink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

/// Opens a socket whose frames are collected into an [`Inbox`].
pub async fn connect(url: &str) -> (WsSink, Arc<Inbox>) {
    let (ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("websocket connects");
    let (sink, mut stream) = ws.split();
    let inbox = Arc::new(Inbox::default());
    let feed = inbox.clone();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let entry = match msg {
                Message::Text(t) => {
                    let v: Value =
                        serde_json::from_str(t.as_str()).expect("server text frame is JSON");
                    let kind = v["type"].as_str().unwrap_or("").to_owned();
                    (
                        Frame::Text {
                            kind,
                            shape: shape(&v["data"], ""),
                        },
                        v,
                        Vec::new(),
                    )
                }
                Message::Binary(b) => {
                    let (f, image) = binary_frame(&b);
                    (f, Value::Null, image)
                }
                _ => continue,
            };
            feed.frames.lock().unwrap().push(entry);
            feed.arrived.notify_waiters();
        }
        feed.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        feed.arrived.notify_waiters();
    });
    (sink, inbox)
}

pub async fn send_text(sink: &mut WsSink, text: &str) {
    sink.send(Message::text(text)).await.expect("ws send");
}

/// Compares one socket's frames with the recording: the sequence without `status`
/// must match frame by frame; `status` broadcasts race with everything else, so
/// only their number and shape are checked.
pub fn compare_frames(file: &str, conn: &str, expected: &[Frame], actual: &[Frame]) {
    let split = |fs: &[Frame]| {
        let (status, rest): (Vec<Frame>, Vec<Frame>) = fs
            .iter()
            .cloned()
            .partition(|f| matches!(f, Frame::Text { kind, .. } if kind == "status"));
        (status, rest)
    };
    let (es, er) = split(expected);
    let (as_, ar) = split(actual);
    for (i, (e, a)) in er.iter().zip(ar.iter()).enumerate() {
        if let (
            Frame::Text {
                kind: ka,
                shape: sa,
            },
            Frame::Text {
                kind: ke,
                shape: se,
            },
        ) = (a, e)
        {
            assert!(
                ka == ke && sa == se,
                "{file} {conn}: frame {i} (status aside): {ka} vs {ke}, at {}",
                first_diff(sa, se, "")
            );
        }
        assert_eq!(
            a, e,
            "{file} {conn}: frame {i} (status frames aside) differs"
        );
    }
    assert_eq!(
        ar.len(),
        er.len(),
        "{file} {conn}: frame count (status aside) differs"
    );
    assert_eq!(
        as_.len(),
        es.len(),
        "{file} {conn}: number of status frames differs"
    );
    for (a, e) in as_.iter().zip(es.iter()) {
        let (Frame::Text { shape: sa, .. }, Frame::Text { shape: se, .. }) = (a, e) else {
            continue;
        };
        // The status sent on connect carries `sid`; compare the rest.
        assert_eq!(sa["status"], se["status"], "{file} {conn}: status shape");
    }
}

/// Where two JSON values first differ, for readable failures.
pub fn first_diff(a: &Value, e: &Value, path: &str) -> String {
    match (a, e) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) if p != q => {
                        return first_diff(p, q, &format!("{path}.{k}"));
                    }
                    (None, _) | (_, None) => {
                        return format!("{path}.{k} (present on one side only)");
                    }
                    _ => {}
                }
            }
            path.to_owned()
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                if p != q {
                    return first_diff(p, q, &format!("{path}[{i}]"));
                }
            }
            path.to_owned()
        }
        _ => format!("{path}: sim {a} vs recorded {e}"),
    }
}

//! `GET /ws?clientId=`: ComfyUI's socket registry, handshake, `feature_flags`
//! negotiation and reconnect behaviour.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use poem::web::websocket::{Message, WebSocket, WebSocketConfig, WebSocketStream};
use poem::web::{Data, Query};
use poem::{IntoResponse, handler};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::state::{SOCKET_BACKLOG, Shared, SocketEntry};

#[derive(Deserialize)]
pub struct WsQuery {
    #[serde(rename = "clientId")]
    client_id: Option<String>,
}

/// Read buffer per socket: clients send next to nothing, so tungstenite's
/// 128 KiB default would only cost memory.
const READ_BUFFER: usize = 4 * 1024;

#[handler]
pub fn ws(
    ws: WebSocket,
    Query(q): Query<WsQuery>,
    shared: Data<&Arc<Shared>>,
) -> impl IntoResponse {
    let shared = shared.clone();
    let given = q.client_id.filter(|c| !c.is_empty());
    ws.config(WebSocketConfig::default().read_buffer_size(READ_BUFFER))
        .on_upgrade(move |socket| session(shared, given, socket))
}

/// The server's answer to `feature_flags` (= `GET /features`).
pub fn server_features(shared: &Shared) -> Value {
    json!({"supports_preview_metadata": true, "max_upload_size": shared.config.max_upload_size})
}

async fn session(shared: Arc<Shared>, given: Option<String>, socket: WebSocketStream) {
    let (tx, mut rx) = mpsc::channel::<Message>(SOCKET_BACKLOG);
    let kill = CancellationToken::new();
    let (sid, generation) = {
        let mut st = shared.lock();
        let sid = given.unwrap_or_else(|| st.random_hex_id());
        st.next_generation += 1;
        let generation = st.next_generation;
        // A reconnect replaces the old socket; like ComfyUI, the old connection is
        // left open but no longer receives anything.
        st.sockets.insert(
            sid.clone(),
            SocketEntry {
                generation,
                tx: tx.clone(),
                supports_preview_metadata: false,
                kill: kill.clone(),
            },
        );
        let mut status = st.status_data();
        status["sid"] = json!(sid);
        st.send_json(Some(&sid), "status", status);
        if st.current_client.as_deref() == Some(sid.as_str())
            && let Some(node) = st.last_node_id.clone()
        {
            st.send_json(Some(&sid), "executing", json!({"node": node}));
        }
        (sid, generation)
    };
    drop(tx);
    let (mut sink, mut stream) = socket.split();
    let mut first_message = true;
    // Closed when a reconnect replaced this socket: it stays open, silent.
    let mut feed_open = true;
    loop {
        tokio::select! {
            out = rx.recv(), if feed_open => match out {
                Some(msg) => {
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                }
                None => feed_open = false,
            },
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    if first_message {
                        first_message = !on_first_text(&shared, &sid, generation, &text);
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = kill.cancelled() => {
                // Fault injection: vanish without a close frame.
                unregister(&shared, &sid, generation);
                return;
            }
            _ = shared.shutdown.cancelled() => {
                let _ = sink.send(Message::Close(None)).await;
                break;
            }
        }
    }
    unregister(&shared, &sid, generation);
}

/// Handles a text frame while negotiation is open. Returns whether it used up the
/// first-message slot: only a parsed JSON object does (ComfyUI skips frames it
/// cannot parse).
fn on_first_text(shared: &Shared, sid: &str, generation: u64, text: &str) -> bool {
    let Ok(Value::Object(msg)) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    if msg.get("type").and_then(Value::as_str) == Some("feature_flags") {
        let supports = msg
            .get("data")
            .and_then(|d| d.get("supports_preview_metadata"))
            .and_then(Value::as_bool)
            == Some(true);
        let mut st = shared.lock();
        if let Some(entry) = st
            .sockets
            .get_mut(sid)
            .filter(|e| e.generation == generation)
        {
            entry.supports_preview_metadata = supports;
            let reply = server_features(shared);
            st.send_json(Some(sid), "feature_flags", reply);
        }
    }
    true
}

fn unregister(shared: &Shared, sid: &str, generation: u64) {
    let mut st = shared.lock();
    if st
        .sockets
        .get(sid)
        .is_some_and(|e| e.generation == generation)
    {
        st.sockets.remove(sid);
    }
}

// Shared by every page: the API client, the session stream (WS /api/run/ws) with
// reconnect and backoff, the page chrome, and the Activity panel.

/** A non-2xx answer; `body` is the parsed JSON body when there is one. */
export class ApiError extends Error {
  constructor(status, body) {
    super(describeError(status, body));
    this.status = status;
    this.body = body;
  }
}

function describeError(status, body) {
  const detail = body && (body.detail ?? body.error ?? body.title);
  if (typeof detail === "string") return detail;
  if (detail && typeof detail.message === "string") return detail.message;
  return `request failed (${status})`;
}

/** Sends to the login page, to come back to the current address afterwards. */
export function toLogin() {
  const here = location.pathname + location.search;
  location.assign(`/login?next=${encodeURIComponent(here)}`);
}

/**
 * Calls the API. `body` may be a plain object (sent as JSON) or FormData.
 * Resolves to the parsed JSON (or null for an empty body); a 401 leaves the page.
 */
export async function api(path, { method = "GET", body } = {}) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["content-type"] = "application/json";
  }
  const resp = await fetch(path, init);
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text };
  }
  if (resp.status === 401 && !path.startsWith("/api/auth/login")) {
    toLogin();
  }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

/** Builds an element: el("p", { class: "x", onclick: f }, "text", child). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export function formatTime(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleTimeString();
}

export function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  return s < 60 ? `${s}s` : `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
}

/** The number of an event id (`evt_<n>`), for ordering and `since=`. */
export function eventNumber(id) {
  const n = Number(String(id).replace(/^evt_/, ""));
  return Number.isFinite(n) ? n : 0;
}

/**
 * The session stream. One socket per page; listeners get:
 * - "progress" (state): a job's progress state (has `prompt_id`);
 * - "event" (event): a lifecycle event object, each id once, in order;
 * - "preview" ({ promptId, blob }): a preview frame of a job;
 * - "open" / "down": the socket connected / dropped (and will retry).
 * Reconnects with backoff and resumes with `since=` the last event id, so the
 * event feed has neither holes nor duplicates across a drop.
 */
export class SessionStream {
  constructor() {
    this.listeners = new Map();
    this.lastEvent = 0;
    this.seen = new Set();
    this.retry = 0;
    this.previewFor = null;
    this.socket = null;
  }

  on(kind, fn) {
    if (!this.listeners.has(kind)) this.listeners.set(kind, []);
    this.listeners.get(kind).push(fn);
  }

  emit(kind, value) {
    for (const fn of this.listeners.get(kind) ?? []) fn(value);
  }

  /** Records an event from history; returns false if it was already seen. */
  accept(event) {
    if (this.seen.has(event.id)) return false;
    this.seen.add(event.id);
    this.lastEvent = Math.max(this.lastEvent, eventNumber(event.id));
    return true;
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${location.host}/api/run/ws?preview_meta=1&since=evt_${this.lastEvent}`;
    const socket = new WebSocket(url);
    socket.binaryType = "blob";
    this.socket = socket;
    socket.onopen = () => {
      this.retry = 0;
      this.emit("open");
    };
    socket.onmessage = (msg) => this.receive(msg.data);
    socket.onclose = (ev) => {
      if (this.socket !== socket) return;
      if (ev.code === 4001) return toLogin();
      this.emit("down");
      // 0.5 s, 1 s, 2 s, 4 s, then every 8 s, with jitter so pods are not stampeded.
      const delay = Math.min(8000, 500 * 2 ** this.retry) * (0.75 + Math.random() / 2);
      this.retry += 1;
      setTimeout(() => this.connect(), delay);
    };
  }

  receive(data) {
    if (data instanceof Blob) {
      if (this.previewFor) this.emit("preview", { promptId: this.previewFor, blob: data });
      this.previewFor = null;
      return;
    }
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (msg.type === "preview") {
      this.previewFor = msg.prompt_id;
    } else if (msg.prompt_id) {
      this.emit("progress", msg);
    } else if (msg.type && msg.id) {
      if (this.accept(msg)) this.emit("event", msg);
    }
  }
}

/** The page chrome: who is signed in, sign-out, the connection line, Activity. */
export async function startPage(navKey) {
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === navKey) a.setAttribute("aria-current", "page");
  }
  const me = await api("/api/auth/me");
  document.getElementById("who").textContent =
    `${me.user?.email ?? me.api_key?.name ?? ""} · ${me.tenant.name}`;
  document.getElementById("logout").addEventListener("click", async () => {
    try {
      await api("/api/auth/logout", { method: "POST" });
    } finally {
      location.assign("/login");
    }
  });

  const stream = new SessionStream();
  const conn = document.getElementById("conn");
  stream.on("down", () => {
    conn.textContent = "Connection lost — reconnecting…";
    conn.hidden = false;
  });
  stream.on("open", () => {
    conn.hidden = true;
    conn.textContent = "";
  });
  await startActivity(stream);
  stream.connect();
  // Reachable from the console (and the e2e test, which drops the socket on purpose).
  window.comfyfleet = { me, stream };
  return { me, stream };
}

const ACTIVITY_LIMIT = 100;

async function startActivity(stream) {
  const list = document.getElementById("activity-list");
  const show = (event) => {
    const item = el(
      "li",
      {
        class: `sev-${event.severity}`,
        dataset: { id: event.id, type: event.type, job: event.data?.prompt_id ?? "" },
      },
      el("time", { datetime: event.timestamp }, formatTime(event.timestamp)),
      el("span", { class: "msg" }, event.message),
    );
    list.prepend(item);
    while (list.children.length > ACTIVITY_LIMIT) list.lastElementChild.remove();
  };
  try {
    // The newest 50, oldest first; each is put on top, so the newest ends there.
    const history = await api("/api/admin/events?limit=50");
    for (const event of history) {
      if (stream.accept(event)) show(event);
    }
  } catch (e) {
    list.append(el("li", { class: "sev-error" }, `Could not load activity: ${e.message}`));
  }
  stream.on("event", show);
}

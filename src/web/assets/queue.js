// Queue (/admin/queue): running and waiting jobs as live cards (progress and preview
// from the session stream), and the recent finished ones.
import { api, el, formatDuration, formatTime, startPage } from "./app.js";

const main = document.getElementById("main");
const sections = {
  running: el("ul", { class: "cards", id: "running" }),
  queued: el("ul", { class: "cards", id: "queued" }),
  recent: el("ul", { class: "cards", id: "recent" }),
};
const message = el("p", { class: "error", role: "alert", id: "queue-error" });
const names = new Map(); // workflow id → name
const progress = new Map(); // prompt id → latest progress state
const previews = new Map(); // prompt id → object URL of the latest frame

function card(job) {
  const name = names.get(job.workflow_id) ?? job.workflow_id ?? "Custom graph";
  const item = el("li", { class: `card job status-${job.status}`, dataset: { id: job.id, status: job.status } });
  const title = job.workflow_id
    ? el("a", { href: `/run/${encodeURIComponent(job.workflow_id)}?prompt_id=${encodeURIComponent(job.id)}` }, name)
    : name;
  item.append(el("h3", {}, title), el("p", { class: "hint" }, el("code", {}, job.id.slice(-8)), ` · ${job.status}`));
  if (job.status === "queued" || job.status === "accepted" || job.status === "uploaded") {
    if (job.queue_number) item.append(el("p", { class: "position" }, `Position ${job.queue_number}`));
    if (job.queue_reason) item.append(el("p", { class: "hint" }, job.queue_reason));
  }
  if (job.status === "running") {
    item.append(
      el("progress", { max: 100, value: 0, "aria-label": `Progress of ${name}` }),
      el("p", { class: "live hint" }),
      el("img", { class: "thumb preview", alt: `Preview of ${name}`, hidden: true }),
    );
  }
  if (["queued", "accepted", "uploaded", "running"].includes(job.status)) {
    item.append(
      el(
        "button",
        {
          type: "button",
          class: "cancel",
          disabled: job.cancel_requested,
          "aria-label": `Cancel ${name} ${job.id.slice(-8)}`,
          onclick: (ev) => cancel(job, ev.currentTarget),
        },
        job.cancel_requested ? "Cancelling…" : "Cancel",
      ),
    );
  } else {
    const image = job.outputs.find((o) => o.type === "image");
    if (image) item.append(el("img", { class: "thumb", src: image.download_url, alt: `Result of ${name}` }));
    const took = job.started_at && job.completed_at ? (new Date(job.completed_at) - new Date(job.started_at)) / 1000 : null;
    item.append(el("p", { class: "hint" }, [formatTime(job.completed_at ?? job.created_at), took != null ? `took ${formatDuration(took)}` : ""].filter(Boolean).join(" · ")));
    if (job.cause) {
      const c = job.cause;
      item.append(el("p", { class: "error cause" }, `${c.node_type ? `${c.node_type}: ` : ""}${c.exception_type ?? ""} ${c.exception_message ?? ""}`.trim()));
    }
  }
  paint(item, job.id);
  return item;
}

/** Applies the latest progress and preview of a job to its card, if it is shown. */
function paint(item, id) {
  const p = progress.get(id);
  const bar = item.querySelector("progress");
  if (p && bar) {
    bar.value = Number(p.percent) || 0;
    const parts = [`${bar.value}%`];
    if (p.node_title) parts.push(p.node_title);
    if (p.total_steps) parts.push(`step ${p.step}/${p.total_steps}`);
    if (p.eta_seconds != null) parts.push(`ETA ${formatDuration(p.eta_seconds)}`);
    item.querySelector(".live").textContent = parts.join(" · ");
  }
  const img = item.querySelector("img.preview");
  if (img && previews.has(id)) {
    img.src = previews.get(id);
    img.hidden = false;
  }
}

/** What a card shows that only a refresh changes; the stream paints the rest. */
function signature(job) {
  return [job.status, job.cancel_requested, job.queue_number, job.queue_reason, job.outputs.length].join("|");
}

/**
 * Brings a list to `jobs`, keeping the cards that did not change: a refresh must
 * not take the keyboard focus away from a Cancel button.
 */
function update(list, jobs) {
  if (jobs.length === 0) {
    if (!list.querySelector(".empty")) list.replaceChildren(el("li", { class: "empty" }, "None"));
    return;
  }
  const old = new Map([...list.children].map((li) => [li.dataset.id, li]));
  const wanted = jobs.map((job) => {
    const li = old.get(job.id);
    if (li && li.dataset.sig === signature(job)) return li;
    const fresh = card(job);
    fresh.dataset.sig = signature(job);
    return fresh;
  });
  for (const li of [...list.children]) if (!wanted.includes(li)) li.remove();
  wanted.forEach((li, i) => {
    if (list.children[i] !== li) list.insertBefore(li, list.children[i] ?? null);
  });
}

async function cancel(job, button) {
  button.disabled = true;
  button.textContent = "Cancelling…";
  try {
    await api(`/developer/api/v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" });
  } catch (e) {
    message.textContent = `Could not cancel: ${e.message}`;
  }
  scheduleRefresh();
}

let refreshing = null;
let again = false;
async function refresh() {
  if (refreshing) {
    again = true;
    return refreshing;
  }
  refreshing = (async () => {
    try {
      const q = await api("/api/admin/queue");
      for (const key of Object.keys(sections)) update(sections[key], q[key]);
      message.textContent = "";
    } catch (e) {
      message.textContent = `Could not load the queue: ${e.message}`;
    }
  })();
  await refreshing;
  refreshing = null;
  if (again) {
    again = false;
    await refresh();
  }
}

let timer = null;
function scheduleRefresh() {
  clearTimeout(timer);
  timer = setTimeout(refresh, 150);
}

const { stream } = await startPage("queue");
main.append(
  el("h1", {}, "Queue"),
  message,
  el("h2", {}, "Running"),
  sections.running,
  el("h2", {}, "Waiting"),
  sections.queued,
  el("h2", {}, "Recently finished"),
  sections.recent,
);
try {
  for (const w of await api("/api/run")) names.set(w.id, w.name);
} catch {
  // Cards fall back to the workflow id.
}
await refresh();

stream.on("progress", (p) => {
  progress.set(p.prompt_id, p);
  const item = sections.running.querySelector(`[data-id="${CSS.escape(p.prompt_id)}"]`);
  if (item) paint(item, p.prompt_id);
  else if (p.status === "running") scheduleRefresh();
});
stream.on("preview", ({ promptId, blob }) => {
  const old = previews.get(promptId);
  previews.set(promptId, URL.createObjectURL(blob));
  if (old) URL.revokeObjectURL(old);
  const item = sections.running.querySelector(`[data-id="${CSS.escape(promptId)}"]`);
  if (item) paint(item, promptId);
});
stream.on("event", (e) => {
  if (e.type.startsWith("job.")) scheduleRefresh();
});
stream.on("open", scheduleRefresh);
// The seed's pattern: the stream drives progress; a slow poll keeps the list honest.
setInterval(refresh, 15000);

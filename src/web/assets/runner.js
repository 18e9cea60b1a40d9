// Runner (/run/<workflow_id>): a form generated from the manifest's inputs, then the
// run watched live over the session stream — progress, preview, node outputs — and
// the result at the end.
import { api, el, formatDuration, startPage } from "./app.js";

const workflowId = decodeURIComponent(location.pathname.split("/")[2] ?? "");
const main = document.getElementById("main");
const fields = new Map(); // input id → { get(): value | undefined, error: element }

// ------------------------------------------------------------------ the form

function fieldBox(input, control, ...extra) {
  const error = el("p", { class: "error", id: `err-${input.id}`, role: "alert" });
  control.setAttribute("aria-describedby", error.id);
  const box = el(
    "div",
    { class: "field", dataset: { input: input.id } },
    el("label", { for: `in-${input.id}` }, input.label || input.id),
    control,
    ...extra,
    error,
  );
  return { box, error };
}

function numberField(input) {
  const isInt = input.type === "int" || input.type === "seed";
  const control = el("input", {
    id: `in-${input.id}`,
    name: input.id,
    type: "number",
    inputmode: isInt ? "numeric" : "decimal",
    step: isInt ? "1" : "any",
    min: input.min,
    max: input.max,
    value: input.default ?? "",
  });
  const extra = [];
  if (input.type === "seed") {
    extra.push(
      el(
        "button",
        {
          type: "button",
          class: "dice",
          title: "A random seed on each run (-1)",
          "aria-label": `Random ${input.label || "seed"}`,
          onclick: () => {
            control.value = "-1";
          },
        },
        "Random",
      ),
    );
  }
  if (input.min !== undefined || input.max !== undefined) {
    extra.push(el("span", { class: "hint" }, `${input.min ?? "…"} to ${input.max ?? "…"}`));
  }
  const { box, error } = fieldBox(input, control, el("span", { class: "row" }, ...extra));
  const get = () => (control.value.trim() === "" ? undefined : Number(control.value));
  return { box, error, get };
}

function imageField(input) {
  const file = el("input", { id: `in-${input.id}`, type: "file", accept: "image/png,image/jpeg,image/webp" });
  const thumb = el("img", { class: "thumb", alt: "", hidden: true });
  const status = el("span", { class: "hint", "aria-live": "polite" });
  const earlier = el(
    "select",
    { id: `earlier-${input.id}`, name: `${input.id}-earlier` },
    el("option", { value: "" }, "— none —"),
  );
  const drop = el(
    "div",
    { class: "drop" },
    el("p", {}, "Drop an image here, or choose a file."),
    file,
    thumb,
    status,
  );
  let chosen; // the stored filename

  const use = (filename, src) => {
    chosen = filename;
    thumb.src = src;
    thumb.alt = `Selected image ${filename}`;
    thumb.hidden = false;
    if (![...earlier.options].some((o) => o.value === filename)) {
      earlier.append(el("option", { value: filename, dataset: { src } }, filename));
    }
    earlier.value = filename;
  };
  const upload = async (blob) => {
    if (!blob) return;
    status.textContent = "Uploading…";
    const body = new FormData();
    body.append("file", blob, blob.name || "image.png");
    try {
      const { filename } = await api("/api/run/upload-image", { method: "POST", body });
      use(filename, URL.createObjectURL(blob));
      status.textContent = `Uploaded as ${filename}`;
    } catch (e) {
      status.textContent = "";
      box.querySelector(".error").textContent = e.message;
    }
  };
  file.addEventListener("change", () => upload(file.files[0]));
  drop.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    upload(ev.dataTransfer.files[0]);
  });
  earlier.addEventListener("change", () => {
    const option = earlier.selectedOptions[0];
    if (!earlier.value) {
      chosen = undefined;
      thumb.hidden = true;
    } else {
      use(earlier.value, option.dataset.src ?? "");
    }
  });
  // Earlier uploads of this tenant, newest first.
  api("/developer/api/v1/inputs?limit=50")
    .then((inputs) => {
      for (const i of inputs) {
        if (i.status === "ready" && (i.content_type ?? "").startsWith("image/")) {
          earlier.append(el("option", { value: i.filename, dataset: { src: i.download_url ?? "" } }, i.filename));
        }
      }
    })
    .catch(() => {});

  const { box, error } = fieldBox(
    input,
    drop,
    el("label", { for: earlier.id, class: "sub" }, "or re-use an earlier upload"),
    earlier,
  );
  // The label names the file input itself, not the drop area.
  drop.removeAttribute("aria-describedby");
  file.setAttribute("aria-describedby", error.id);
  return { box, error, get: () => chosen };
}

function buildField(input) {
  switch (input.type) {
    case "int":
    case "float":
    case "seed":
      return numberField(input);
    case "image":
      return imageField(input);
    case "bool": {
      const control = el("input", { id: `in-${input.id}`, type: "checkbox", checked: input.default === true });
      const { box, error } = fieldBox(input, control);
      return { box, error, get: () => control.checked };
    }
    case "select": {
      const control = el(
        "select",
        { id: `in-${input.id}`, name: input.id },
        (input.options ?? []).map((o) => el("option", { value: String(o), selected: o === input.default }, String(o))),
      );
      const { box, error } = fieldBox(input, control);
      return { box, error, get: () => control.value };
    }
    default: {
      const control = el("textarea", { id: `in-${input.id}`, name: input.id, rows: 3 }, input.default ?? "");
      const { box, error } = fieldBox(input, control);
      return { box, error, get: () => control.value };
    }
  }
}

function params() {
  const out = {};
  for (const [id, field] of fields) {
    const value = field.get();
    if (value !== undefined && !Number.isNaN(value)) out[id] = value;
  }
  return out;
}

/** Puts each error of a 400 beside its field; the rest above the Run button. */
function showErrors(err, general) {
  const detail = err.body?.detail;
  const errors = Array.isArray(detail?.errors) ? detail.errors : [];
  const loose = [];
  for (const e of errors) {
    const field = fields.get(e.field);
    if (field) field.error.textContent = e.message;
    else loose.push(`${e.field}: ${e.message}`);
  }
  if (detail?.node_errors && Object.keys(detail.node_errors).length) {
    for (const [node, info] of Object.entries(detail.node_errors)) {
      for (const e of info.errors ?? []) loose.push(`node ${node}: ${e.message}${e.details ? ` (${e.details})` : ""}`);
    }
  }
  general.textContent = loose.length ? loose.join("; ") : errors.length ? "" : err.message;
  const first = [...fields.values()].find((f) => f.error.textContent);
  first?.box.querySelector("input, select, textarea")?.focus();
}

// ------------------------------------------------------------------ the run

/** image, video or file: what a node output item is, by its name when not told. */
function mediaOf(item) {
  if (item.media === "image" || item.media === "video") return item.media;
  if (/\.(png|jpe?g|webp|gif)$/i.test(item.filename)) return "image";
  if (/\.(mp4|webm|mov)$/i.test(item.filename)) return "video";
  return "file";
}

class RunView {
  constructor(manifest, onAgain) {
    this.manifest = manifest;
    this.promptId = null;
    this.percent = el("progress", { id: "progress", max: 100, value: 0, "aria-label": "Progress" });
    this.percentText = el("span", { id: "percent" }, "0%");
    this.state = el("p", { id: "run-state", class: "state", role: "status" }, "");
    this.node = el("p", { id: "node" });
    this.steps = el("p", { id: "steps", class: "hint" });
    this.preview = el("img", { id: "preview", alt: "Live preview", hidden: true, dataset: { frames: "0" } });
    this.outputs = el("ul", { id: "node-outputs", class: "outputs" });
    this.result = el("div", { id: "result" });
    this.again = el("button", { type: "button", id: "again", hidden: true, onclick: onAgain }, "Run again");
    this.box = el(
      "section",
      { class: "card run", "aria-labelledby": "run-title", hidden: true },
      el("h2", { id: "run-title" }, "Run"),
      this.state,
      el("div", { class: "bar" }, this.percent, this.percentText),
      this.node,
      this.steps,
      this.preview,
      this.outputs,
      this.result,
      this.again,
    );
  }

  start(promptId, seeds) {
    this.promptId = promptId;
    this.box.hidden = false;
    this.box.dataset.promptId = promptId;
    this.box.dataset.status = "queued";
    this.state.textContent = "Queued…";
    this.percent.value = 0;
    this.percentText.textContent = "0%";
    this.node.textContent = "";
    this.steps.textContent = "";
    this.preview.hidden = true;
    this.preview.dataset.frames = "0";
    this.outputs.replaceChildren();
    this.result.replaceChildren();
    this.again.hidden = true;
    const used = Object.entries(seeds ?? {});
    if (used.length) {
      this.result.append(el("p", { id: "seeds" }, `Seeds: ${used.map(([k, v]) => `${k} = ${v}`).join(", ")}`));
    }
  }

  progress(p) {
    if (p.prompt_id !== this.promptId || this.finished()) return;
    this.box.dataset.status = p.status;
    this.state.textContent = p.status === "running" ? "Running" : "Queued…";
    const pct = Math.max(0, Math.min(100, Number(p.percent) || 0));
    this.percent.value = pct;
    this.percentText.textContent = `${pct}%`;
    this.node.textContent = p.node_title ? `Node: ${p.node_title}` : "";
    const parts = [];
    if (p.total_steps) parts.push(`step ${p.step}/${p.total_steps}`);
    if (p.effective_total) parts.push(`node ${p.nodes_done}/${p.effective_total}`);
    if (p.step_rate) parts.push(`${Number(p.step_rate).toFixed(2)} steps/s`);
    if (p.eta_seconds != null) parts.push(`ETA ${formatDuration(p.eta_seconds)}`);
    this.steps.textContent = parts.join(" · ");
    this.showNodeOutputs(p.node_outputs ?? {});
  }

  showNodeOutputs(nodeOutputs) {
    this.outputs.replaceChildren();
    for (const [nodeId, out] of Object.entries(nodeOutputs)) {
      for (const item of out.items ?? []) {
        const q = new URLSearchParams({ filename: item.filename, subfolder: item.subfolder ?? "", type: item.type ?? "output" });
        const href = `/api/comfyui/view?${q}`;
        this.outputs.append(
          el(
            "li",
            {},
            mediaOf(item) === "image" ? el("img", { src: href, alt: item.filename, class: "thumb" }) : null,
            mediaOf(item) === "video" ? el("video", { src: href, class: "thumb", muted: true, controls: true }) : null,
            el("a", { href }, `${out.node_title ?? `node ${nodeId}`}: ${item.filename}`),
          ),
        );
      }
    }
  }

  previewFrame({ promptId, blob }) {
    if (promptId !== this.promptId || this.finished()) return;
    const old = this.preview.src;
    this.preview.src = URL.createObjectURL(blob);
    if (old.startsWith("blob:")) URL.revokeObjectURL(old);
    this.preview.hidden = false;
    this.preview.dataset.frames = String(Number(this.preview.dataset.frames) + 1);
  }

  finished() {
    return ["completed", "failed", "cancelled"].includes(this.box.dataset.status);
  }

  async event(e) {
    if (e.data?.prompt_id !== this.promptId) return;
    if (["job.completed", "job.failed", "job.cancelled", "job.invalid"].includes(e.type)) await this.refresh();
  }

  /** Reads the job's status (after a terminal event, or a reconnect) and shows the end. */
  async refresh() {
    if (!this.promptId || this.finished()) return;
    const status = await api(`/api/run/status/${encodeURIComponent(this.promptId)}`);
    if (status.status === "completed") this.complete();
    else if (status.status === "error") this.fail(status.error);
    else if (status.status === "running") this.progress({ ...status, prompt_id: this.promptId });
  }

  complete() {
    this.box.dataset.status = "completed";
    this.state.textContent = "Completed";
    this.percent.value = 100;
    this.percentText.textContent = "100%";
    const video = this.manifest.outputs.some((o) => o.type === "video");
    const src = `/api/run/result/${encodeURIComponent(this.promptId)}?output_type=${video ? "video" : "image"}`;
    const media = video
      ? el("video", { id: "result-media", src, controls: true, autoplay: true, muted: true, loop: true, playsinline: true })
      : el("img", { id: "result-media", src, alt: `Result of ${this.manifest.name}` });
    this.result.append(
      media,
      el("p", {}, el("a", { id: "download", class: "button", href: src, download: "" }, "Download")),
    );
    this.again.hidden = false;
  }

  fail(message) {
    const cancelled = /cancel/i.test(message ?? "");
    this.box.dataset.status = cancelled ? "cancelled" : "failed";
    this.state.textContent = cancelled ? "Cancelled" : `Failed: ${message ?? "unknown error"}`;
    this.again.hidden = false;
  }
}

// ------------------------------------------------------------------ the page

async function render(stream) {
  let manifest;
  try {
    manifest = await api(`/api/run/${encodeURIComponent(workflowId)}`);
  } catch (e) {
    main.append(el("h1", {}, "Workflow not found"), el("p", {}, e.message), el("a", { href: "/run" }, "All workflows"));
    return;
  }
  document.title = `${manifest.name} · comfyfleet`;
  const general = el("p", { id: "form-error", class: "error", role: "alert" });
  const runButton = el("button", { type: "submit", class: "primary", id: "run" }, "Run");
  const form = el("form", { class: "card", id: "run-form", novalidate: true });
  for (const input of manifest.inputs) {
    const field = buildField(input);
    fields.set(input.id, field);
    form.append(field.box);
  }
  form.append(general, runButton);
  const view = new RunView(manifest, () => form.requestSubmit());
  main.append(
    el("p", { class: "crumbs" }, el("a", { href: "/run" }, "Workflows")),
    el("h1", {}, manifest.name),
    el("p", {}, manifest.description),
    el("div", { class: "runner" }, form, view.box),
  );

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    for (const f of fields.values()) f.error.textContent = "";
    general.textContent = "";
    runButton.disabled = true;
    const body = new FormData();
    body.append("params", JSON.stringify(params()));
    try {
      const run = await api(`/api/run/${encodeURIComponent(workflowId)}/execute`, { method: "POST", body });
      view.start(run.prompt_id, run.seeds);
      // A reload (or a link from the Queue page) comes back to this run.
      history.replaceState(null, "", `?prompt_id=${encodeURIComponent(run.prompt_id)}`);
      view.box.scrollIntoView({ block: "nearest" });
    } catch (e) {
      showErrors(e, general);
    } finally {
      runButton.disabled = false;
    }
  });

  const resume = new URLSearchParams(location.search).get("prompt_id");
  if (resume) {
    try {
      const job = await api(`/developer/api/v1/jobs/${encodeURIComponent(resume)}`);
      view.start(job.id, job.seeds);
      await view.refresh();
    } catch (e) {
      general.textContent = `Run ${resume}: ${e.message}`;
    }
  }

  stream.on("progress", (p) => view.progress(p));
  stream.on("preview", (f) => view.previewFrame(f));
  stream.on("event", (e) => view.event(e).catch(() => {}));
  // After a drop, the end of the run may have happened while we were away.
  stream.on("open", () => view.refresh().catch(() => {}));
}

const { stream } = await startPage("run");
await render(stream);

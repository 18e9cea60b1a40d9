// Workflows (/run): the tenant's workflows as cards, with whether the fleet can run them.
import { api, el, startPage } from "./app.js";

/** Whether one fresh, non-draining worker has every required node class and model. */
function readiness(workflow, workers) {
  const usable = workers.filter((w) => w.status !== "draining");
  if (usable.length === 0) return { ready: false, why: "No worker is online." };
  const fits = (w) =>
    workflow.required_nodes.every((n) => w.node_classes.includes(n)) &&
    workflow.required_models.every((m) => w.models.includes(m));
  if (usable.some(fits)) return { ready: true, why: "Ready" };
  const missing = [...workflow.required_nodes, ...workflow.required_models].filter(
    (need) => !usable.some((w) => w.node_classes.includes(need) || w.models.includes(need)),
  );
  return {
    ready: false,
    why: missing.length ? `Missing on every worker: ${missing.join(", ")}` : "No single worker has everything it needs.",
  };
}

async function render() {
  const main = document.getElementById("main");
  main.append(el("h1", {}, "Workflows"));
  const grid = el("ul", { class: "cards", id: "workflows" });
  main.append(grid);
  const [workflows, workers] = await Promise.all([api("/api/run"), api("/api/admin/workers")]);
  if (workflows.length === 0) grid.append(el("li", {}, "No workflows are installed."));
  for (const w of workflows) {
    const state = readiness(w, workers);
    grid.append(
      el(
        "li",
        { class: "card workflow", dataset: { id: w.id } },
        el("h2", {}, el("a", { href: `/run/${encodeURIComponent(w.id)}` }, w.name)),
        el("p", { class: "category" }, w.category),
        el("p", {}, w.description),
        el("p", { class: `readiness ${state.ready ? "ok" : "not-ready"}` }, state.why),
      ),
    );
  }
}

await startPage("run");
await render();

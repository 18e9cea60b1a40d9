// Login: email + password → the session cookie, then back to where the visitor was going.
import { api, el } from "./app.js";

/** Only a path on this site: never an absolute or protocol-relative URL. */
function nextPath() {
  const next = new URLSearchParams(location.search).get("next") ?? "";
  return next.startsWith("/") && !next.startsWith("//") && !next.startsWith("/\\") ? next : "/run";
}

const error = el("p", { id: "login-error", class: "error", role: "alert" });
const form = el(
  "form",
  { class: "card narrow", id: "login-form", novalidate: true },
  el("h1", {}, "Sign in"),
  el("label", { for: "email" }, "Email"),
  el("input", { id: "email", name: "email", type: "email", autocomplete: "username", required: true }),
  el("label", { for: "password" }, "Password"),
  el("input", {
    id: "password",
    name: "password",
    type: "password",
    autocomplete: "current-password",
    required: true,
  }),
  error,
  el("button", { type: "submit", class: "primary" }, "Sign in"),
);

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  error.textContent = "";
  const email = form.email.value.trim();
  const password = form.password.value;
  if (!email || !password) {
    error.textContent = "Enter your email and password.";
    return;
  }
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    await api("/api/auth/login", { method: "POST", body: { email, password } });
    location.assign(nextPath());
  } catch (e) {
    error.textContent = e.status === 401 ? "Wrong email or password." : e.message;
    form.password.select();
  } finally {
    button.disabled = false;
  }
});

document.getElementById("main").append(form);
form.email.focus();

// The chat page: sessions on the left, messages on the right, the answer
// streamed over EventSource. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
let currentSession = null;
let stream = null;

async function api(path, options = {}) {
  const response = await fetch(path, {
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    ...options,
  });
  if (response.status === 204) return null;
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    showLogin();
    throw new Error(body.error ? body.error.message : "sign in with an API key");
  }
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

function showLogin() { $("login").hidden = false; }

$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    await api("/api/login", { method: "POST", body: JSON.stringify({ key: $("api-key").value }) });
    $("login").hidden = true;
    $("login-error").textContent = "";
    loadSessions();
    showNotices();
  } catch (err) { $("login-error").textContent = err.message; }
});

// What the workers last saw of the model and the tools (GET /api/info).
const OFFLINE = "The offline test model is answering (it echoes what you say, deterministically, and calls tools " +
  "by simple rules: try \"list tables\", \"describe table orders\" or \"SELECT count(*) FROM customers\"). " +
  "Set OPENAI_BASE_URL, OPENAI_API_KEY and OPENAI_MODEL to use a real model.";

async function showNotices() {
  const info = await api("/api/info");
  const notes = [];
  if (info.model_status.ok === false) notes.push(["warning", `The model is not answering: ${info.model_status.error}`]);
  else if (info.offline_model) notes.push(["banner", OFFLINE]);
  const down = info.tools.filter((t) => t.ok === false);
  if (down.length) {
    notes.push(["warning", "Tools unavailable: " + down.map((t) => `${t.name} (${t.error})`).join("; ")]);
  }
  $("notices").replaceChildren(...notes.map(([kind, text]) => {
    const p = document.createElement("p");
    p.className = kind;
    p.textContent = text;
    return p;
  }));
}

// The model answers in Markdown: rendered (marked), then sanitised
// (DOMPurify) before it reaches the page, so its output can run no script
// and fetch nothing from elsewhere (the page's CSP says the same). Links open
// apart from the page. What people type is only ever text.
window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.hasAttribute("src")) {
    const url = new URL(node.getAttribute("src"), location.href);
    if (url.origin !== location.origin && url.protocol !== "data:") node.removeAttribute("src");
  }
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

function renderMarkdown(el, text) {
  el.innerHTML = window.DOMPurify.sanitize(window.marked.parse(text), {
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
    FORBID_ATTR: ["style"],
  });
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "assistant") renderMarkdown(div, text);
  else div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

// Re-render a streaming answer at most once a frame, however fast deltas come.
function renderer(el) {
  let text = "";
  let queued = false;
  return (next) => {
    text = next;
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; renderMarkdown(el, text); });
  };
}

async function loadSessions() {
  const { items } = await api("/api/sessions?limit=50");
  const list = $("sessions");
  list.innerHTML = "";
  for (const s of items) {
    const li = document.createElement("li");
    li.textContent = s.title || "Untitled chat";
    li.dataset.id = s.id;
    if (s.id === currentSession) li.className = "active";
    li.onclick = () => openSession(s.id);
    list.appendChild(li);
  }
  if (!currentSession && items.length) openSession(items[0].id);
}

async function openSession(id) {
  currentSession = id;
  if (stream) { stream.close(); stream = null; }
  for (const li of $("sessions").children) li.className = li.dataset.id === id ? "active" : "";
  const { items } = await api(`/api/sessions/${id}/messages`);
  $("messages").innerHTML = "";
  for (const m of items) {
    for (const call of m.tool_calls || []) toolCall(call).finish(call);
    bubble(m.role, m.content);
  }
}

// One tool call: its name and arguments, then (folded) what it returned.
function toolCall(call) {
  const box = document.createElement("details");
  box.className = "tool";
  const summary = document.createElement("summary");
  summary.textContent = `${call.name} ${JSON.stringify(call.arguments)} …`;
  const output = document.createElement("pre");
  box.append(summary, output);
  $("messages").appendChild(box);
  return {
    box,
    finish(done) {
      summary.textContent = `${call.name} ${JSON.stringify(call.arguments)} ${done.ok ? "✓" : "✗"}`;
      box.classList.add(done.ok ? "ok" : "error");
      output.textContent = done.output;
    },
  };
}

$("new-session").onclick = async () => {
  const s = await api("/api/sessions", { method: "POST", body: JSON.stringify({}) });
  currentSession = s.id;
  $("messages").innerHTML = "";
  loadSessions();
};

function follow(turn) {
  $("stop").hidden = false;
  $("stop").onclick = () => {
    $("stop").disabled = true;
    api(`/api/turns/${turn.id}/cancel`, { method: "POST" }).catch((err) => { $("status").textContent = err.message; });
  };
  let out = bubble("assistant", "");
  const show = renderer(out);
  let text = "";
  let calls = {};
  $("status").textContent = "queued…";
  stream = new EventSource(turn.events_url);
  const finish = (label) => {
    stream.close(); stream = null; $("status").textContent = label; loadSessions(); showNotices().catch(() => {});
    $("stop").hidden = true; $("stop").disabled = false;
  };
  stream.addEventListener("turn.started", () => { $("status").textContent = "answering…"; });
  stream.addEventListener("message.delta", (e) => { text += JSON.parse(e.data).delta; show(text); });
  stream.addEventListener("turn.restarted", () => {
    text = ""; show(text);
    for (const c of Object.values(calls)) c.box.remove();
    calls = {};
  });
  stream.addEventListener("tools.unavailable", (e) => {
    const names = JSON.parse(e.data).servers.map((s) => `${s.name} (${s.error})`).join("; ");
    bubble("notice", `Answering without the tools of: ${names}`);
    $("messages").appendChild(out);
  });
  stream.addEventListener("tool.started", (e) => {
    const d = JSON.parse(e.data);
    calls[d.call_id] = toolCall(d);
    $("messages").appendChild(out); // the answer goes below its tool calls
  });
  stream.addEventListener("tool.finished", (e) => {
    const d = JSON.parse(e.data);
    if (calls[d.call_id]) calls[d.call_id].finish(d);
  });
  stream.addEventListener("turn.snapshot", (e) => {
    const d = JSON.parse(e.data);
    text = d.text; show(text);
    if (["succeeded", "failed", "cancelled"].includes(d.status)) finish(d.status);
  });
  stream.addEventListener("turn.completed", (e) => { show(JSON.parse(e.data).answer); finish(""); });
  stream.addEventListener("turn.failed", (e) => {
    out.className = "msg failed"; show("Failed: " + JSON.parse(e.data).error.message); finish("");
  });
  stream.addEventListener("turn.cancelled", () => finish("cancelled"));
}

$("composer").addEventListener("submit", async (e) => {
  e.preventDefault();
  const message = $("message").value.trim();
  if (!message) return;
  if (!currentSession) {
    const s = await api("/api/sessions", { method: "POST", body: JSON.stringify({ title: message.slice(0, 80) }) });
    currentSession = s.id;
  }
  $("message").value = "";
  bubble("user", message);
  try {
    const turn = await api(`/api/sessions/${currentSession}/turns`, { method: "POST", body: JSON.stringify({ message }) });
    follow(turn);
  } catch (err) { $("status").textContent = err.message; }
});

$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});

loadSessions().then(showNotices).catch(() => {});

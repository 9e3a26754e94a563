// The chat page: sessions on the left, the open session's turns on the
// right. A session is drawn from its turns (GET /api/sessions/{id}/turns) and
// kept current by its event stream, which carries the turns of every tab and
// device that writes to it. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const ENDED = new Set(["succeeded", "failed", "cancelled", "interrupted"]);
const TURN_EVENTS = [
  "turn.started", "tools.unavailable", "message.delta", "tool.started", "tool.finished",
  "tool.approval_required", "turn.waiting", "tool.approval_decided", "turn.delayed", "turn.resumed",
  "turn.restarted", "turn.snapshot", "turn.completed", "turn.failed", "turn.cancelled",
  "turn.interrupted", "turn.rolled_back",
];
// A session stream resumed at a turn's highest possible seq continues with
// the turn after it: "every event of this turn is here already".
const LAST_SEQ = "9223372036854775807";
// Other tabs of this browser hear at once of sessions made, renamed or
// deleted and of turns sent; other devices see them when the page is next
// looked at, and a session's turns through its stream.
const tabs = "BroadcastChannel" in window ? new BroadcastChannel("turnstream") : null;

let current = null; // the open Conversation
let search = "";

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
  if (!response.ok) {
    const error = new Error(body.error ? body.error.message : response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, title, onclick, className = "") {
  const b = el("button", className, label);
  b.type = "button";
  b.title = title;
  b.setAttribute("aria-label", title);
  b.onclick = onclick;
  return b;
}

// For screen readers: a turn's end, a dropped connection. Streamed text is
// not read out delta by delta.
function announce(text) { $("announce").textContent = text; }

function showError(err) { announce(err.message); $("composer-error").textContent = err.message; }

function showLogin() { $("login").hidden = false; $("api-key").focus(); }

$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    await api("/api/login", { method: "POST", body: JSON.stringify({ key: $("api-key").value }) });
    $("login").hidden = true;
    $("login-error").textContent = "";
    $("message").focus();
    start();
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
  $("notices").replaceChildren(...notes.filter(([, text]) => !dismissed.has(text)).map(([kind, text]) => {
    const note = el("p", kind, text);
    note.append(button("✕", "Dismiss", () => { dismissed.add(text); note.remove(); }, "dismiss"));
    return note;
  }));
}

const dismissed = new Set(); // notices closed on this page

// The model answers in Markdown: rendered (marked), then sanitised
// (DOMPurify) before it reaches the page, so its output can run no script
// and fetch nothing from elsewhere (the page's CSP says the same). Links open
// apart from the page. What people type, and what tools return, is only ever
// text.
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

function renderMarkdown(target, text) {
  target.innerHTML = window.DOMPurify.sanitize(window.marked.parse(text), {
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
    FORBID_ATTR: ["style"],
  });
  for (const pre of target.querySelectorAll("pre")) {
    const copy = button("Copy", "Copy code", () => copyText(pre.textContent).then(
      () => { copy.textContent = "Copied"; setTimeout(() => { copy.textContent = "Copy"; }, 1500); },
      (err) => showError(err),
    ), "copy");
    const box = el("div", "code");
    pre.replaceWith(box);
    box.append(copy, pre);
  }
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  // A page served over plain HTTP to another host has no Clipboard API.
  const area = el("textarea");
  area.value = text;
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  if (!copied) throw new Error("the browser would not copy");
}

// Re-render a streaming answer at most once a frame, however fast deltas come.
function renderer(target) {
  let text = "";
  let queued = false;
  const draw = (next) => {
    text = next;
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; renderMarkdown(target, text); });
  };
  draw.now = (next) => { text = next; renderMarkdown(target, text); };
  return draw;
}

// ---- the sessions list ----

// The newest chats, and as many pages more as were shown already. Only
// chats (origin=chat): the sessions replays and evaluation runs make, one
// per question, are theirs, not the person's; each still opens by its
// address (#id).
let shownPages = 1;

async function loadSessions() {
  const q = search ? `&q=${encodeURIComponent(search)}` : "";
  const items = [];
  let cursor = null;
  for (let page = 0; page < shownPages; page++) {
    const body = await api(`/api/sessions?origin=chat&limit=50${q}` + (cursor ? `&cursor=${cursor}` : ""));
    items.push(...body.items);
    cursor = body.next_cursor;
    if (!cursor) break;
  }
  $("sessions").replaceChildren(...items.map(sessionItem));
  $("more-sessions").hidden = !cursor;
  $("no-sessions").hidden = items.length > 0;
  $("no-sessions").textContent = search ? "No chat has that in its title." : "No chats yet.";
  markOpen();
  const open = current && items.find((s) => s.id === current.id);
  if (open) current.describe(open).catch(() => {}); // its assistant may have changed elsewhere
  return items;
}

$("more-sessions").onclick = () => { shownPages += 1; loadSessions().catch(showError); };

function sessionItem(s) {
  const li = el("li");
  li.dataset.id = s.id;
  const title = s.title || "Untitled chat";
  const link = el("a", "title", title);
  link.href = `#${s.id}`; // opened by the hashchange: Enter and Tab work as on any link
  li.append(
    link,
    button("✎", `Rename “${title}”`, () => rename(li, s), "icon"),
    button("✕", `Delete “${title}”`, () => remove(s), "icon"),
  );
  return li;
}

function markOpen() {
  for (const li of $("sessions").children) {
    const open = current !== null && li.dataset.id === current.id;
    li.classList.toggle("active", open);
    li.querySelector("a").toggleAttribute("aria-current", open);
  }
}

function rename(li, s) {
  const input = el("input", "rename");
  input.value = s.title || "";
  input.maxLength = 200;
  input.setAttribute("aria-label", "New title");
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    try {
      if (save && input.value.trim() !== (s.title || "")) {
        await api(`/api/sessions/${s.id}`, { method: "PATCH", body: JSON.stringify({ title: input.value.trim() || null }) });
        tell({ kind: "sessions" });
      }
    } catch (err) { showError(err); }
    await loadSessions();
    $("sessions").querySelector(`li[data-id="${s.id}"] a`)?.focus();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") { e.preventDefault(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

async function remove(s) {
  if (!confirm(`Delete “${s.title || "Untitled chat"}” and everything said in it?`)) return;
  try {
    await api(`/api/sessions/${s.id}`, { method: "DELETE" });
  } catch (err) { if (err.status !== 404) { showError(err); return; } }
  tell({ kind: "sessions" });
  if (current && current.id === s.id) newChat();
  loadSessions();
}

function tell(message) { if (tabs) tabs.postMessage(message); }

if (tabs) {
  tabs.onmessage = ({ data }) => {
    if (data.kind === "sessions") {
      loadSessions().then(checkOpen).catch(() => {});
      loadAssistants().catch(() => {});
    }
    // A turn sent, or the path switched (a version chosen, an answer
    // regenerated, a question edited): the path is drawn again.
    if ((data.kind === "turn" || data.kind === "branch") && current && current.id === data.session) current.catchUp();
  };
}

// The open session may have been deleted elsewhere, or given another
// assistant.
async function checkOpen() {
  if (!current) return;
  try { await current.describe(); } catch (err) { if (err.status === 404) newChat(); }
}

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState !== "visible") return;
  loadSessions().then(checkOpen).catch(() => {});
  loadAssistants().catch(() => {});
  if (current) current.catchUp();
});

let searchTimer = null;
$("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => { search = $("search").value.trim(); loadSessions().catch(showError); }, 200);
});

function newChat() {
  if (current) current.close();
  current = null;
  history.replaceState(null, "", location.pathname);
  $("messages").replaceChildren();
  $("assistant").value = ""; // a new chat starts with the default assistant
  markOpen();
  controls();
  showAssistant();
  $("message").focus();
}

$("new-session").onclick = () => { newChat(); closeMenu(); };

window.addEventListener("hashchange", () => {
  const id = location.hash.slice(1);
  if (id && (!current || current.id !== id)) openSession(id);
  closeMenu();
});

// `session`: the Session as just made, else it is read.
async function openSession(id, session = null) {
  if (current) current.close();
  current = new Conversation(id);
  if (location.hash !== `#${id}`) history.replaceState(null, "", `#${id}`);
  $("messages").replaceChildren();
  markOpen();
  controls();
  showAssistant();
  try {
    await Promise.all([current.load(), current.describe(session)]);
  } catch (err) {
    if (err.status === 404) newChat();
    showError(err);
  }
}

// ---- a session's turns ----

// The page shows the session's active path (GET …/turns): its first
// question down to its leaf, which the server keeps (sessions.active_turn_id),
// so a reload shows the same branch. The session's stream carries the turns
// of every branch: a turn the page has not drawn is placed only where the
// path says, never simply appended.
class Conversation {
  constructor(id) {
    this.id = id;
    this.session = null; // the Session, once read: who answers it
    // turn id -> TurnView, for every turn heard of, on the path or not: a
    // turn of another branch keeps its state for when it is shown again
    this.views = new Map();
    // The views whose turn has not ended: the only ones whose state line
    // depends on the other turns (what they wait behind). Kept apart so
    // that drawing a state looks at these few, not at every turn, and a
    // long session draws in time linear in its turns.
    this.unended = new Set();
    this.path = []; // the turn ids shown, in order
    this.syncing = null; // a read of the path under way
    this.syncAgain = false; // the path changed meanwhile: that read is stale
    this.stream = null;
    this.position = null; // where the stream was opened
    this.lastId = null; // the last event id seen: where a reconnect resumes
    this.timer = null;
    this.closed = false;
  }

  // Every turn so far, then the stream from the first that has not ended
  // (from its first event), or from after the last.
  async load() {
    await this.sync(); // as any read of the path: one sent meanwhile is not lost to it
    if (this.closed) return;
    const turns = this.shown();
    const open = turns.find((t) => !t.ended);
    const last = turns[turns.length - 1];
    this.connect(open ? `${open.id}:0` : last ? `${last.id}:${LAST_SEQ}` : null);
    $("messages").scrollTop = $("messages").scrollHeight;
  }

  // The session itself (given, or read): who answers it. An assistant the
  // page has not listed yet (made elsewhere since) has the list read again.
  async describe(session = null) {
    const read = session || await api(`/api/sessions/${this.id}`);
    if (this.closed) return;
    this.session = read;
    if (read.assistant_id && assistants && !assistants.has(read.assistant_id)) await loadAssistants();
    showAssistant();
  }

  async turns(after) {
    const items = [];
    let cursor = after ? String(after) : null;
    do {
      const page = await api(`/api/sessions/${this.id}/turns` + (cursor ? `?cursor=${cursor}` : ""));
      items.push(...page.items);
      cursor = page.next_cursor;
    } while (cursor);
    return items;
  }

  // The path as the server has it now: after a turn sent or a branch chosen
  // elsewhere, a turn of the stream not drawn yet, or the page looked at
  // again. Reads under way at once make one more read, whose answer is drawn.
  catchUp() { return this.sync().catch(() => {}); }

  sync() {
    if (this.syncing) {
      this.syncAgain = true;
      return this.syncing;
    }
    this.syncing = (async () => {
      try {
        do {
          this.syncAgain = false;
          const turns = await this.turns(0);
          if (this.closed) return;
          if (!this.syncAgain) this.drawPath(turns);
        } while (this.syncAgain);
      } finally {
        this.syncing = null;
      }
    })();
    return this.syncing;
  }

  // Draw the path the API listed: its turns in order, each with its
  // versions; the turns of other branches leave the page.
  drawPath(turns) {
    if (this.closed) return;
    for (const t of turns) this.view(t.id).fill(t);
    this.path = turns.map((t) => t.id);
    this.layout();
    // A turn of the path that runs, never heard of on the stream (it ran on
    // a branch not shown, or began before the stream reached it): its
    // events from the first, so its text has no gap. One turn of a session
    // runs at a time, so no earlier one is skipped.
    const open = this.shown().find((v) => !v.ended);
    if (open && !open.seen && open.status !== "queued" && this.stream) this.restart(`${open.id}:0`);
  }

  // A turn just accepted (sent, regenerated, edited): it follows its
  // parent, so the path is the one to its parent, then it. If its parent
  // is not shown, the path is read instead.
  adopt(turn) {
    if (this.closed) return null;
    const view = this.view(turn.id);
    view.fill(turn);
    const at = turn.parent_id === null ? -1 : this.path.indexOf(turn.parent_id);
    if (turn.parent_id !== null && at === -1) {
      this.catchUp();
      return view;
    }
    if (this.syncing) this.syncAgain = true; // a read begun before this turn may not hold it
    this.path = [...this.path.slice(0, at + 1), turn.id];
    this.layout();
    return view;
  }

  // The views of the path, in order.
  shown() { return this.path.map((id) => this.views.get(id)).filter(Boolean); }

  view(turnId) {
    let view = this.views.get(turnId);
    if (!view) {
      view = new TurnView(this, turnId);
      this.views.set(turnId, view);
      this.unended.add(view);
    }
    return view;
  }

  // The page holds the path's turns, in order, and nothing else; a turn
  // already in its place is not moved (a control in it keeps the focus).
  // Layout is read once before and the scroll set once after, whatever
  // the path's length: reading it per turn would lay the page out again
  // for each (quadratic in the path).
  layout() {
    const box = $("messages");
    const follow = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const roots = this.shown().map((v) => v.root);
    roots.forEach((root, i) => {
      if (box.children[i] !== root) box.insertBefore(root, box.children[i] || null);
    });
    while (box.children.length > roots.length) box.lastElementChild.remove();
    for (const v of this.shown()) if (v.ended && !v.detailed) v.details(); // it ended while not shown
    // What is shown changed what a waiting turn waits behind ("the turn
    // before it" or another version's); an ended turn's line is its own.
    for (const v of this.unended) v.drawState();
    controls();
    if (follow) box.scrollTop = box.scrollHeight;
  }

  // Another version of a turn (a sibling): the path goes through it, down
  // its newest line, here and in the other tabs.
  async switchTo(view, sibling, direction) {
    try {
      await api(`/api/sessions/${this.id}/active`, { method: "PUT", body: JSON.stringify({ turn_id: sibling }) });
      tell({ kind: "branch", session: this.id });
      await this.sync();
    } catch (err) { showError(err); return; }
    const shown = this.views.get(sibling);
    if (!shown || !shown.root.isConnected) return;
    announce(`Version ${shown.siblings.indexOf(sibling) + 1} of ${shown.siblings.length}.`);
    const [first, other] = direction === "next" ? [shown.next, shown.previous] : [shown.previous, shown.next];
    (first && !first.disabled ? first : other)?.focus();
  }

  // A regeneration or an edit made this turn: the path now ends with it.
  branched(turn) {
    this.adopt(turn);
    tell({ kind: "branch", session: this.id });
    $("message").focus();
  }

  connect(after) {
    this.position = after;
    const url = `/api/sessions/${this.id}/events` + (after ? `?after=${encodeURIComponent(after)}` : "");
    const stream = new EventSource(url);
    this.stream = stream;
    for (const type of TURN_EVENTS) {
      stream.addEventListener(type, (e) => this.event(type, e));
    }
    stream.onopen = () => connection(null);
    stream.onerror = () => {
      if (this.closed) return;
      if (stream.readyState === EventSource.CONNECTING) {
        connection("Reconnecting…"); // the browser tries again by itself, with Last-Event-ID
        return;
      }
      // Closed: the server refused (an error status). Ask why, then try again.
      connection("Connection lost; trying again…");
      this.timer = setTimeout(() => this.reconnect(), 3000);
    };
  }

  // After the server refused the stream: see why (a session deleted, a
  // login ended), or try again.
  async reconnect(after = this.lastId || this.position) {
    if (this.closed) return;
    try {
      await api(`/api/sessions/${this.id}`);
    } catch (err) {
      if (err.status === 404) { connection(null); newChat(); return; }
      if (err.status === 401) { connection(null); return; }
      this.timer = setTimeout(() => this.reconnect(after), 3000);
      return;
    }
    this.connect(after);
  }

  restart(after) {
    if (this.closed) return;
    this.stream.close();
    this.connect(after);
  }

  event(type, e) {
    if (this.closed) return;
    if (e.lastEventId) this.lastId = e.lastEventId;
    const data = JSON.parse(e.data);
    const known = this.views.has(data.turn_id);
    const view = this.view(data.turn_id);
    // A turn sent elsewhere, on this branch or another: the path says
    // whether and where it is shown.
    if (!known) this.catchUp();
    view.apply(type, data);
    controls();
    const box = $("messages");
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
  }

  // The turn Stop cancels: the path's running one, else its first waiting.
  active() {
    const open = this.shown().filter((v) => !v.ended);
    return open.find((v) => v.status === "running") || open[0] || null;
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.stream) this.stream.close();
    connection(null);
  }
}

function connection(text) {
  $("connection").hidden = text === null;
  $("connection").textContent = text || "";
  if (text) announce(text);
}

class TurnView {
  constructor(conversation, id) {
    this.conversation = conversation;
    this.id = id;
    this.number = null;
    this.message = null;
    this.status = "queued";
    this.ended = false;
    this.seen = false; // the stream has spoken of it: its state there is the newest
    this.text = "";
    this.calls = new Map();
    this.asks = new Map(); // request id -> its approval card
    this.delay = null; // turn.delayed: why it waits in the queue, and until when
    this.model = null;
    this.usage = null;
    this.error = null;
    this.detailed = false; // its model and tokens read since it ended
    this.siblings = [id]; // the versions of this turn (regenerated, edited), oldest first
    this.editor = null; // the question being edited
    this.regenerating = false;
    this.root = el("article", "turn");
    this.root.dataset.turn = id;
    this.question = el("div", "msg user", "…");
    // Under the question: its versions ("‹ 2 / 3 ›") and Edit.
    this.bar = el("div", "ask-bar");
    this.versions = el("div", "versions");
    this.versions.setAttribute("role", "group");
    this.versions.setAttribute("aria-label", "Versions of this question");
    this.previous = button("‹", "Previous version", () => this.step(-1), "previous");
    this.next = button("›", "Next version", () => this.step(1), "next");
    this.count = el("span", "count");
    this.versions.append(this.previous, this.count, this.next);
    this.editButton = button("Edit", "Edit this question", () => this.startEdit(), "edit");
    this.bar.append(this.versions, this.editButton);
    this.tools = el("div", "tools");
    this.notes = el("div", "notes");
    this.answer = el("div", "msg assistant");
    this.answer.setAttribute("aria-busy", "true");
    this.state = el("p", "state");
    this.root.append(this.question, this.bar, this.tools, this.notes, this.answer, this.state);
    this.draw = renderer(this.answer);
    this.drawVersions();
    this.drawState();
  }

  // What the API says of the turn.
  fill(turn) {
    this.number = turn.number;
    if (turn.message !== undefined && this.message === null) {
      this.message = turn.message;
      this.question.textContent = turn.message;
    }
    if (turn.siblings) this.siblings = turn.siblings;
    this.drawVersions();
    if (turn.model) this.model = turn.model;
    if (turn.usage && turn.usage.completion_tokens) this.usage = turn.usage;
    if (ENDED.has(turn.status)) {
      this.end(turn.status, turn.answer, turn.error, turn.tools);
      this.detailed = true; // the list says who answered and what it cost
    } else if (!this.seen && !this.ended) this.status = turn.status;
    if (this.status === "waiting") this.loadApprovals();
    this.drawState();
  }

  // The calls it waits on, from Postgres: when its log no longer holds them.
  async loadApprovals() {
    try {
      const { items } = await api(`/api/turns/${this.id}/approvals`);
      for (const ask of items) {
        const decided = ask.decided_at !== null;
        if (!decided) this.ask({ ...ask, request_id: ask.id });
        else this.asks.get(ask.id)?.settle(ask);
      }
    } catch (err) { /* the turn may be gone; its stream says so */ }
  }

  ask(d) {
    if (this.asks.has(d.request_id)) return;
    const card = approvalCard(this, d);
    this.asks.set(d.request_id, card);
    this.tools.append(card.root);
  }

  // "‹ 2 / 3 ›" when the turn has other versions; Edit once its question is known.
  drawVersions() {
    const n = this.siblings.length;
    const at = this.siblings.indexOf(this.id);
    this.versions.hidden = n < 2;
    this.count.textContent = `${at + 1} / ${n}`;
    this.previous.disabled = at <= 0;
    this.next.disabled = at >= n - 1;
    this.editButton.hidden = this.message === null;
    this.bar.hidden = this.editor !== null || (this.versions.hidden && this.editButton.hidden);
  }

  // The version before or after this one: the path goes through it.
  step(by) {
    const sibling = this.siblings[this.siblings.indexOf(this.id) + by];
    if (sibling) this.conversation.switchTo(this, sibling, by > 0 ? "next" : "previous");
  }

  // The question in an editor: Send asks it in this turn's place (a new
  // version; what followed stays on the old one), Cancel leaves it as it was.
  // Enter sends and Shift+Enter starts a new line, as in the composer;
  // Escape cancels.
  startEdit() {
    if (this.editor) { this.editor.querySelector("textarea").focus(); return; }
    const form = el("form", "edit");
    const area = el("textarea");
    area.value = this.message;
    area.rows = Math.min(8, this.message.split("\n").length + 1);
    area.required = true;
    area.setAttribute("aria-label", "Your question, edited (Enter sends, Escape cancels)");
    const send = el("button", "send-edit", "Send");
    send.type = "submit";
    send.title = "Ask this instead: a new version of the question";
    form.append(area, send, button("Cancel", "Keep the question as it was", () => this.stopEdit(), "cancel-edit"));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const message = area.value.trim();
      if (message) this.sendEdit(message, form);
    });
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
      if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); this.stopEdit(); }
    });
    this.editor = form;
    this.question.hidden = true;
    this.question.after(form);
    this.drawVersions();
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
  }

  stopEdit(focus = true) {
    if (!this.editor) return;
    this.editor.remove();
    this.editor = null;
    this.question.hidden = false;
    this.drawVersions();
    if (focus) this.editButton.focus();
  }

  async sendEdit(message, form) {
    for (const control of form.elements) control.disabled = true;
    $("composer-error").textContent = "";
    try {
      const turn = await api(`/api/turns/${this.id}/edit`, { method: "POST", body: JSON.stringify({ message }) });
      this.stopEdit(false);
      this.conversation.branched({ ...turn, message, siblings: [...this.siblings, turn.id] });
    } catch (err) {
      for (const control of form.elements) control.disabled = false;
      showError(err);
    }
  }

  // The same question answered again, in this turn's place.
  async regenerate() {
    if (this.regenerating) return; // one new version per click, however many clicks
    this.regenerating = true;
    $("composer-error").textContent = "";
    try {
      const turn = await api(`/api/turns/${this.id}/regenerate`, { method: "POST" });
      this.conversation.branched({ ...turn, message: this.message, siblings: [...this.siblings, turn.id] });
    } catch (err) { showError(err); }
    this.regenerating = false;
  }

  // One event of the turn's stream. After its end, a replayed log or a
  // snapshot has nothing new to say.
  apply(type, d) {
    if (this.ended) return;
    this.seen = true;
    switch (type) {
      case "turn.started":
        this.status = "running";
        this.delay = null;
        break;
      case "message.delta":
        this.text += d.delta;
        this.draw(this.text);
        break;
      case "tool.approval_required":
        this.ask(d);
        break;
      case "turn.waiting":
        this.status = "waiting";
        askForAttention();
        break;
      case "tool.approval_decided":
        this.asks.get(d.request_id)?.settle(d);
        break;
      case "turn.delayed":
        this.status = "queued";
        this.delay = d;
        break;
      case "turn.resumed":
        this.status = "running";
        this.delay = null;
        this.text = d.text;
        this.draw(this.text);
        break;
      case "turn.restarted":
        this.text = "";
        this.draw(this.text);
        this.tools.replaceChildren();
        this.calls.clear();
        this.notes.replaceChildren(el("p", "notice", d.reason === "redelivered"
          ? "Started again on another worker." : "The model's stream broke; asking again."));
        break;
      case "tools.unavailable":
        this.notes.append(el("p", "notice",
          "Answering without the tools of: " + d.servers.map((s) => `${s.name} (${s.error})`).join("; ")));
        break;
      case "tool.started":
        this.calls.set(d.call_id, toolCall(this.tools, d));
        break;
      case "tool.finished":
        if (this.calls.has(d.call_id)) this.calls.get(d.call_id).finish(d);
        break;
      case "turn.snapshot":
        this.text = d.text || "";
        this.draw(this.text);
        if (ENDED.has(d.status)) this.end(d.status, d.text, d.error);
        else this.status = d.status;
        if (d.status === "waiting") this.loadApprovals();
        break;
      case "turn.completed":
        if (this.text !== d.answer) console.warn(`turnstream: turn ${this.id}: the streamed text differs from its answer`);
        this.usage = d.usage;
        this.end("succeeded", d.answer, null, d.tools);
        break;
      case "turn.failed":
        this.end("failed", null, d.error);
        break;
      case "turn.cancelled":
        this.end("cancelled");
        break;
      case "turn.interrupted":
        this.end("interrupted", d.answer);
        break;
      case "turn.rolled_back":
        this.remove();
        return;
    }
    // Said only of a turn shown: the stream also carries other branches'.
    if (this.ended && this.root.isConnected) {
      announce({
        succeeded: "Answer complete.",
        failed: `The answer failed: ${this.errorText()}`,
        cancelled: "Cancelled.",
        interrupted: "Interrupted by a newer message.",
      }[this.status]);
      this.details();
    }
    this.drawState();
  }

  errorText() { return this.error ? this.error.message : "unknown error"; }

  // Ahead of the session's other queued questions, the running one
  // interrupted for it: the session is drawn again in its new order.
  async sendNow() {
    try {
      await api(`/api/turns/${this.id}/send-now`, { method: "POST" });
      tell({ kind: "turn", session: this.conversation.id });
      if (current === this.conversation) await openSession(this.conversation.id);
    } catch (err) { showError(err); }
  }

  async cancel() {
    try {
      const turn = await api(`/api/turns/${this.id}/cancel`, { method: "POST" });
      if (ENDED.has(turn.status)) this.end(turn.status, turn.answer, turn.error);
      this.drawState();
    } catch (err) { showError(err); }
  }

  // It and its question were taken back (a newer message sent with rollback).
  remove() {
    this.ended = true;
    this.root.remove();
    this.conversation.views.delete(this.id);
    this.conversation.unended.delete(this);
    this.conversation.path = this.conversation.path.filter((id) => id !== this.id);
    for (const v of this.conversation.unended) v.drawState();
    announce("The earlier question was taken back.");
  }

  end(status, answer, error, tools) {
    if (this.ended) return;
    this.ended = true;
    this.conversation.unended.delete(this);
    this.status = status;
    this.error = error || null;
    if (answer !== null && answer !== undefined) this.text = answer;
    this.draw.now(this.text);
    this.answer.hidden = this.text === "";
    if (tools && this.calls.size === 0) {
      for (const call of tools) toolCall(this.tools, call).finish(call);
    }
    this.answer.setAttribute("aria-busy", "false");
    this.drawState();
    // The "queued behind" lines of the turns still to end change now; only
    // theirs (were every turn redrawn here, drawing a session of n ended
    // turns would redraw n turns n times).
    for (const v of this.conversation.unended) v.drawState();
  }

  // Which model answered and what it cost: from the turn, once it ended.
  async details() {
    this.detailed = true;
    try {
      const turn = await api(`/api/turns/${this.id}`);
      this.model = turn.model;
      this.usage = turn.usage;
      this.drawState();
    } catch (err) { /* the session may be gone; the answer stays */ }
  }

  drawState() {
    const parts = [];
    // One turn of a session runs at a time, whatever its branch.
    const ahead = [...this.conversation.unended].filter((v) => v !== this && v.number !== null && v.number < this.number);
    const waiting = ahead.length > 0;
    const line = {
      queued: this.delay ? delayText(this.delay)
        : ahead.some((v) => v.root.isConnected) ? "Queued behind the turn before it…"
          : waiting ? "Queued behind a turn of another version of this chat…" : "Queued…",
      running: this.text ? "Answering…" : "Thinking…",
      waiting: "Waiting for your approval…",
      failed: `Failed: ${this.errorText()}`,
      cancelled: "Cancelled.",
      interrupted: "Interrupted by a newer message.",
      succeeded: "",
    }[this.status];
    if (line) parts.push(el("span", "label", line));
    if (this.ended && this.model) {
      const used = this.usage ? ` · ${this.usage.prompt_tokens} tokens in, ${this.usage.completion_tokens} out` : "";
      parts.push(el("span", "meta", `${this.model}${used}`));
    }
    if (this.status === "queued" && waiting) { // the session's queue: take it out, or send it now
      parts.push(
        button("Send now", "Send this question now: the answer being written stops, keeping what it said",
          () => this.sendNow(), "send-now"),
        button("Cancel", "Take this question out of the queue", () => this.cancel(), "cancel"),
      );
    }
    if (this.ended && this.message !== null) { // one action: the question answered again, in its place
      parts.push(this.status === "failed" || this.status === "cancelled"
        ? button("Retry", "Retry: the question answered again, as a new version", () => this.regenerate(), "retry")
        : button("Regenerate", "Regenerate this answer: the question answered again, as a new version",
          () => this.regenerate(), "regenerate"));
    }
    this.state.replaceChildren(...parts);
    this.state.className = `state ${this.status}`;
    this.root.dataset.status = this.status;
    this.answer.classList.toggle("failed", this.status === "failed");
    if (!this.ended) this.answer.hidden = false;
  }
}

// A turn waiting in the queue for its model endpoint, and until when.
function delayText(d) {
  const at = new Date(d.retry_at).toLocaleTimeString();
  return `Model endpoint ${d.endpoint} unavailable; waiting in the queue, retrying at ${at}…`;
}

// One tool call: its name and arguments, then (folded) what it returned.
function toolCall(box, call) {
  const details = el("details", "tool");
  const summary = el("summary", "", `${call.name} ${JSON.stringify(call.arguments)} …`);
  const output = el("pre");
  details.append(summary, output);
  box.append(details);
  return {
    finish(done) {
      summary.textContent = `${call.name} ${JSON.stringify(call.arguments)} ${done.ok ? "✓" : "✗"}`;
      details.classList.add(done.ok ? "ok" : "error");
      output.textContent = done.output;
    },
  };
}

// ---- who answers: the assistants ----

// The caller's assistants by id, each at its latest (GET /api/assistants,
// by name); null until read.
let assistants = null;

async function loadAssistants() {
  const items = [];
  let cursor = null;
  do {
    const body = await api("/api/assistants?limit=100" + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
    items.push(...body.items);
    cursor = body.next_cursor;
  } while (cursor);
  assistants = new Map(items.map((a) => [a.id, a]));
  // Redrawn only when it changed, so a choice being made is not disturbed;
  // the choice stays unless its assistant is gone.
  const select = $("assistant");
  const options = [["", "Default"], ...items.map((a) => [a.id, a.name])];
  if (JSON.stringify(options) !== JSON.stringify([...select.options].map((o) => [o.value, o.text]))) {
    const chosen = select.value;
    select.replaceChildren(...options.map(([value, text]) => new Option(text, value)));
    select.value = assistants.has(chosen) ? chosen : "";
  }
  showAssistant();
  return assistants;
}

// A new chat offers the choice (Default: the operator's settings); an open
// session says who answers it instead: its assistant, with the version it
// is pinned to if any, or Default, also when its assistant is not (or no
// longer) among the caller's.
function showAssistant() {
  $("assistant-pick").hidden = current !== null;
  $("assistant-shown").hidden = current === null;
  showSessionActions();
  if (current === null) return;
  const session = current.session;
  $("assistant-name").textContent = session && assistants ? assistantName(session) : "…";
}

function assistantName(session) {
  const assistant = session.assistant_id ? assistants.get(session.assistant_id) : null;
  if (!assistant) return "Default";
  return session.assistant_version === null ? assistant.name : `${assistant.name} v${session.assistant_version}`;
}

// A tool call that waits for a person: what it would run, and the choices.
// The decision goes to the server; the card settles when the server says
// (here, or the decision's event from another tab).
function approvalCard(view, ask) {
  const card = el("section", "approval");
  card.dataset.request = ask.request_id;
  card.setAttribute("aria-label", `Approve ${ask.name}?`);
  const args = el("pre", "arguments", JSON.stringify(ask.arguments, null, 2));
  const editor = el("textarea", "arguments");
  editor.hidden = true;
  editor.setAttribute("aria-label", `Arguments of ${ask.name} (JSON)`);
  const reason = el("input", "reason");
  reason.hidden = true;
  reason.placeholder = "Why not? The model is told.";
  reason.setAttribute("aria-label", "Why the call is declined");
  const outcome = el("p", "outcome");
  outcome.setAttribute("role", "status");
  const choices = el("div", "choices");
  const decide = async (body) => {
    askForAttention(true);
    for (const b of choices.children) b.disabled = true;
    outcome.textContent = "";
    try {
      settle(await api(`/api/turns/${view.id}/approvals/${ask.request_id}`, { method: "POST", body: JSON.stringify(body) }));
    } catch (err) {
      outcome.textContent = err.message;
      for (const b of choices.children) b.disabled = false;
    }
  };
  const edit = button("Edit", `Change the arguments of ${ask.name} before it runs`, () => {
    if (editor.hidden) {
      editor.value = args.textContent;
      editor.hidden = false;
      args.hidden = true;
      edit.textContent = "Allow with these";
      editor.focus();
      return;
    }
    let edited;
    try { edited = JSON.parse(editor.value); } catch { outcome.textContent = "The arguments are not valid JSON."; return; }
    decide({ decision: "approve", arguments: edited });
  });
  const decline = button("Decline", `Do not run ${ask.name}; the model is told`, () => {
    if (reason.hidden) {
      reason.hidden = false;
      decline.textContent = "Decline with this reason";
      reason.focus();
      return;
    }
    const message = reason.value.trim();
    decide({ decision: "reject", ...(message ? { message } : {}) });
  });
  choices.append(
    button("Allow once", `Run ${ask.name} this time`, () => decide({ decision: "approve" })),
    button("Always for this chat", `Run ${ask.name} without asking for the rest of this chat`,
      () => decide({ decision: "approve", always: true })),
    edit,
    decline,
  );
  card.append(el("p", "ask", `Allow ${ask.server} › ${ask.tool}?`), args, editor, reason, choices, outcome);
  function settle(d) {
    if (card.dataset.status) return;
    card.dataset.status = d.status;
    choices.hidden = editor.hidden = reason.hidden = true;
    args.hidden = false;
    const edited = "decided_arguments" in d ? d.decided_arguments : d.arguments;
    if (edited) args.textContent = JSON.stringify(edited, null, 2);
    outcome.textContent = {
      approved: "Allowed.",
      rejected: `Declined${d.message ? `: ${d.message}` : "."}`,
      expired: "Declined: no one decided in time.",
    }[d.status] || "";
  }
  return { root: card, settle };
}

// A turn waits for a decision: say so, and in a tab that is not looked at,
// with a notification where the person allowed them (asked at their first
// decision: a browser asks only on a person's gesture).
function askForAttention(gesture = false) {
  if (!("Notification" in window)) return;
  if (gesture) {
    if (Notification.permission === "default") Notification.requestPermission().catch(() => {});
    return;
  }
  announce("A tool call waits for your approval.");
  if (document.hidden && Notification.permission === "granted") {
    new Notification("Turnstream", { body: "A tool call waits for your approval." });
  }
}

// ---- share and export the open session ----

// Share and Export are the open session's: its downloads are plain links
// (the login cookie goes with them), named by the server.
function showSessionActions() {
  $("session-actions").hidden = current === null;
  if (current === null) {
    if ($("share-dialog").open) $("share-dialog").close();
    return;
  }
  $("export-json").href = `/api/sessions/${current.id}/export?format=json`;
  $("export-json").title = "Download this chat as JSON: every version of every question";
  $("export-markdown").href = `/api/sessions/${current.id}/export?format=markdown`;
  $("export-markdown").title = "Download this chat as Markdown: the conversation shown";
}

// The Markdown is of the path this tab shows (its last turn named), even if
// another tab has switched the session's active path since.
$("export-markdown").addEventListener("click", () => {
  if (!current) return;
  const leaf = current.path[current.path.length - 1];
  const query = leaf ? `&turn_id=${encodeURIComponent(leaf)}` : "";
  $("export-markdown").href = `/api/sessions/${current.id}/export?format=markdown${query}`;
});

function shareUrl(share) { return new URL(share.url, location.origin).href; }

$("share").onclick = () => {
  if (!current) return;
  $("share-made").hidden = true;
  $("share-error").textContent = "";
  $("share-tools").checked = false; // tool calls are shared only when chosen, each time
  $("shares").replaceChildren();
  $("no-shares").hidden = true;
  $("share-dialog").showModal();
  loadShares().catch((err) => { $("share-error").textContent = err.message; });
};

$("share-close").onclick = () => $("share-dialog").close();

async function loadShares() {
  const conversation = current;
  const { items } = await api(`/api/sessions/${conversation.id}/shares`);
  if (current !== conversation) return;
  $("shares").replaceChildren(...items.map(shareItem));
  $("no-shares").hidden = items.length > 0;
}

function shareItem(share) {
  const li = el("li");
  li.dataset.share = share.id;
  const made = new Date(share.created_at).toLocaleString();
  const link = el("a", "link", shareUrl(share));
  link.href = shareUrl(share);
  link.target = "_blank";
  link.rel = "noopener noreferrer";
  const about = el("span", "muted", `made ${made}, ${share.include_tools ? "with" : "without"} tool calls`);
  li.append(link, about, button("Revoke", `Revoke the link made ${made}: it stops working`, () => revokeShare(share, li), "revoke"));
  return li;
}

// A link to a copy of the path this page shows (its last turn named, so
// a version chosen meanwhile in another tab is not the one shared).
$("share-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!current) return;
  const body = { include_tools: $("share-tools").checked };
  const leaf = current.path[current.path.length - 1];
  if (leaf) body.turn_id = leaf;
  $("share-create").disabled = true;
  $("share-error").textContent = "";
  try {
    const share = await api(`/api/sessions/${current.id}/shares`, { method: "POST", body: JSON.stringify(body) });
    $("share-link").value = shareUrl(share);
    $("share-link").dataset.share = share.id;
    $("share-made").hidden = false;
    $("share-link").focus();
    $("share-link").select();
    announce("Link created.");
    await loadShares();
  } catch (err) { $("share-error").textContent = err.message; }
  $("share-create").disabled = false;
});

$("share-copy").onclick = () => copyText($("share-link").value).then(
  () => { $("share-copy").textContent = "Copied"; setTimeout(() => { $("share-copy").textContent = "Copy"; }, 1500); },
  (err) => { $("share-error").textContent = err.message; },
);

async function revokeShare(share, li) {
  $("share-error").textContent = "";
  try {
    await api(`/api/shares/${share.id}`, { method: "DELETE" });
  } catch (err) { if (err.status !== 404) { $("share-error").textContent = err.message; return; } }
  if ($("share-link").dataset.share === share.id) $("share-made").hidden = true;
  // the focus goes on to the next link's Revoke, or back to Create link
  const next = li.nextElementSibling || li.previousElementSibling;
  li.remove();
  $("no-shares").hidden = $("shares").children.length > 0;
  (next ? next.querySelector("button.revoke") : $("share-create")).focus();
  announce("Link revoked: it no longer opens.");
}

// ---- the composer ----

function controls() {
  const active = current ? current.active() : null;
  $("stop").hidden = active === null;
  if (active === null) $("stop").disabled = false;
}

$("stop").onclick = async () => {
  const view = current && current.active();
  if (!view) return;
  $("stop").disabled = true;
  try {
    const turn = await api(`/api/turns/${view.id}/cancel`, { method: "POST" });
    if (ENDED.has(turn.status)) view.end(turn.status, turn.answer, turn.error);
  } catch (err) { showError(err); }
  $("stop").disabled = false;
  controls();
};

// One at a time, in the order typed: a second question sent while the
// first is making its session goes to the same session, after it.
let sending = Promise.resolve(true);

function send(message) {
  sending = sending.then(() => sendNow(message));
  return sending;
}

async function sendNow(message) {
  $("composer-error").textContent = "";
  try {
    if (!current) {
      const body = { title: message.slice(0, 80) };
      if ($("assistant").value) body.assistant_id = $("assistant").value;
      const s = await api("/api/sessions", { method: "POST", body: JSON.stringify(body) }).catch((err) => {
        if (err.status === 404) loadAssistants().catch(() => {}); // the assistant chosen is gone
        throw err;
      });
      tell({ kind: "sessions" });
      await openSession(s.id, s);
      loadSessions();
    }
    const conversation = current;
    const turn = await api(`/api/sessions/${conversation.id}/turns`, { method: "POST", body: JSON.stringify({ message }) });
    conversation.adopt({ ...turn, message });
    // A stream that has carried nothing yet began "from now", which may
    // have been after this turn was accepted, or even answered: follow it
    // from its first event instead.
    if (conversation.position === null && conversation.lastId === null) conversation.restart(`${turn.id}:0`);
    tell({ kind: "turn", session: conversation.id });
    const box = $("messages");
    box.scrollTop = box.scrollHeight;
    return true;
  } catch (err) {
    showError(err);
    return false;
  }
}

$("composer").addEventListener("submit", async (e) => {
  e.preventDefault();
  const message = $("message").value.trim();
  if (!message) return;
  $("message").value = "";
  if (!(await send(message))) $("message").value = message; // nothing lost on a refusal
});

$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});

// ---- a narrow screen: the sessions list slides over the conversation ----

function closeMenu() {
  document.body.classList.remove("menu-open");
  $("menu").setAttribute("aria-expanded", "false");
}

$("menu").onclick = () => {
  const open = document.body.classList.toggle("menu-open");
  $("menu").setAttribute("aria-expanded", String(open));
  if (open) $("new-session").focus();
};

document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && document.body.classList.contains("menu-open")) { closeMenu(); $("menu").focus(); }
});
document.querySelector("main").addEventListener("click", closeMenu);

async function start() {
  // The address's session opens at once: a question asked while the list
  // loads goes to it. Else, unless a session was opened meanwhile (a
  // question sent at once after signing in makes its own), the newest.
  const wanted = location.hash.slice(1);
  // (again, if a start before signing in opened it and was refused)
  const opened = wanted && (!current || current.id === wanted) ? openSession(wanted) : null;
  const items = await loadSessions();
  loadAssistants().catch(() => {});
  if (opened) await opened;
  else if (!current && items.length) await openSession(items[0].id);
  showNotices().catch(() => {});
}

start().catch(() => {});
